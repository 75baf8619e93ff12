//! [`Subscription`]: the stream of one `subscribe` call's messages, and the [`Message`] it yields.

use crate::connection::Command;
use futures_util::Stream;
use serde_json::value::RawValue;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// A message published on a channel, as the server delivered it.
#[derive(Debug, Clone)]
pub struct Message {
    /// The channel it was published on.
    pub channel: String,
    /// The published `data`, byte for byte.
    pub data: Box<RawValue>,
}

impl Message {
    /// `data` parsed as a [`serde_json::Value`] (`Null` in the unlikely case it nests deeper
    /// than `serde_json`'s recursion limit).
    pub fn data_json(&self) -> serde_json::Value {
        serde_json::from_str(self.data.get()).unwrap_or(serde_json::Value::Null)
    }
}

/// The connection task's end of a subscription.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) tx: mpsc::Sender<Message>,
    pub(crate) dropped: Arc<AtomicU64>,
}

/// The messages of one channel, from the moment the server acknowledged the `subscribe`.
///
/// A [`Stream`] of [`Message`]s (or use [`Subscription::recv`]). It ends (`None`) when the
/// connection ends or when [`Client::unsubscribe`](crate::Client::unsubscribe) for its channel
/// succeeded. Dropping it only stops local delivery; it does not unsubscribe on the server. While
/// it lives it keeps the connection open, like a [`Client`](crate::Client) handle.
///
/// Its queue holds [`ClientConfig::queue`](crate::ClientConfig::queue) messages; messages that
/// arrive while it is full are dropped and counted ([`Subscription::dropped`],
/// [`Client::dropped`](crate::Client::dropped)), so a slow reader never stalls the socket.
#[derive(Debug)]
pub struct Subscription {
    channel: String,
    rx: mpsc::Receiver<Message>,
    dropped: Arc<AtomicU64>,
    _connection: mpsc::Sender<Command>,
}

impl Subscription {
    pub(crate) fn new(
        channel: String,
        rx: mpsc::Receiver<Message>,
        dropped: Arc<AtomicU64>,
        connection: mpsc::Sender<Command>,
    ) -> Self {
        Self { channel, rx, dropped, _connection: connection }
    }

    /// The channel this subscription is for.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message; `None` once the subscription ended.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// A message that is already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// How many messages this subscription lost because its queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}
