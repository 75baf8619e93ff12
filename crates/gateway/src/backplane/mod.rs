//! The backplane: how a node hands a message to every node, itself included.
//!
//! [`Backplane`] is the small, object-safe seam between the node and the transport. Messages that
//! come back in go to the [`Hub`](crate::hub::Hub) given at construction, so the node and HTTP
//! code never know which implementation runs: [`memory`] for a single node, [`redis`] for a
//! cluster.

pub mod memory;
pub mod redis;

use async_trait::async_trait;
use gateway_protocol::ChannelName;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// Why the backplane could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackplaneError {
    /// The backplane is not connected (Redis down or restarting).
    #[error("backplane unavailable: {0}")]
    Unavailable(String),
}

/// Carries encoded message frames between nodes.
#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    /// Publishes a `message` frame's JSON text on `channel`. The message takes its place in the
    /// channel's order before this returns (so a caller may publish again without waiting); the
    /// returned [`PublishAck`] resolves once the backplane accepted it. Every node subscribed to
    /// `channel`, this one included, then delivers it to its hub.
    fn publish(&self, channel: &ChannelName, message: String) -> PublishAck;

    /// Starts receiving `channel`; returns once the subscription is live cluster-wide.
    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BackplaneError>;

    /// Stops receiving `channel`.
    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BackplaneError>;

    /// Whether the backplane can currently publish and subscribe.
    fn is_up(&self) -> bool;

    /// A short name for logs (`memory`, `redis`).
    fn kind(&self) -> &'static str;
}

/// The outcome of one publish, known at once or later.
#[derive(Debug)]
pub enum PublishAck {
    /// Already decided (the in-memory backplane, or an immediate refusal).
    Ready(Option<Result<(), BackplaneError>>),
    /// Decided when the backplane answers.
    Waiting(oneshot::Receiver<Result<(), BackplaneError>>),
}

impl PublishAck {
    /// An immediate refusal.
    pub fn refused(error: BackplaneError) -> Self {
        Self::Ready(Some(Err(error)))
    }
}

impl Future for PublishAck {
    type Output = Result<(), BackplaneError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Ready(outcome) => Poll::Ready(outcome.take().unwrap_or(Ok(()))),
            Self::Waiting(receiver) => Pin::new(receiver).poll(cx).map(|answer| {
                answer.unwrap_or_else(|_| Err(BackplaneError::Unavailable("the backplane stopped".into())))
            }),
        }
    }
}
