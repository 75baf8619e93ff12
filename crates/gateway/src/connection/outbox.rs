//! One socket's bounded outgoing queue and the switch that closes the socket.
//!
//! The hub holds an [`Outbox`] per subscription and pushes shared frames into it without ever
//! waiting: a full queue means the socket cannot keep up, so it is closed as a slow consumer
//! instead of silently missing messages.

use axum::extract::ws::Utf8Bytes;
use gateway_protocol::CloseCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use tokio::sync::{Notify, mpsc};

/// A frame ready to be written: shared, immutable, valid UTF-8. Cloning it is a refcount.
pub type Frame = Utf8Bytes;

/// Identifies one socket for the life of the process.
pub type ConnId = u64;

/// Shared between a socket's task and everyone who may ask it to close (the hub, when the
/// queue is full). Node shutdown is signalled separately, by the node's root token.
#[derive(Debug, Default)]
pub struct CloseSwitch {
    wake: Notify,
    reason: AtomicU8,
}

const NO_REASON: u8 = 0;

const CLOSE_REASONS: [CloseCode; 8] = [
    CloseCode::Normal,
    CloseCode::GoingAway,
    CloseCode::SlowConsumer,
    CloseCode::TokenExpired,
    CloseCode::PolicyAbuse,
    CloseCode::HeartbeatTimeout,
    CloseCode::TooBig,
    CloseCode::Internal,
];

impl CloseSwitch {
    /// Asks the socket to close with `reason`; the first reason given wins.
    pub fn close(&self, reason: CloseCode) {
        let index = CLOSE_REASONS.iter().position(|r| *r == reason).unwrap_or(7) as u8 + 1;
        if self.reason.compare_exchange(NO_REASON, index, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // One waiter (the socket's task); a stored permit covers the case where it is busy.
            self.wake.notify_one();
        }
    }

    /// The reason given to [`CloseSwitch::close`], if any.
    pub fn reason(&self) -> Option<CloseCode> {
        match self.reason.load(Ordering::Acquire) {
            NO_REASON => None,
            i => CLOSE_REASONS.get(usize::from(i) - 1).copied(),
        }
    }

    /// Resolves once the socket was asked to close, with the reason.
    pub async fn closed(&self) -> CloseCode {
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            self.wake.notified().await;
        }
    }
}

/// The sending half of a socket's queue, as held by the hub.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Frame>,
    switch: Arc<CloseSwitch>,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// The queue was full: the socket is now closing as a slow consumer.
    SlowConsumer,
    /// The socket is already gone.
    Gone,
}

impl Outbox {
    /// Creates a queue of `capacity` frames for a socket controlled by `switch`.
    pub fn new(capacity: usize, switch: Arc<CloseSwitch>) -> (Self, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx, switch }, rx)
    }

    /// Queues `frame` without waiting. A full queue closes the socket with 1008 "slow consumer".
    pub fn push(&self, frame: Frame) -> Push {
        match self.tx.try_send(frame) {
            Ok(()) => Push::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.switch.close(CloseCode::SlowConsumer);
                Push::SlowConsumer
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Push::Gone,
        }
    }

    /// The socket's close switch.
    pub fn switch(&self) -> &Arc<CloseSwitch> {
        &self.switch
    }
}
