//! One socket's bounded outgoing queue and the switch that closes the socket.
//!
//! The hub holds an [`Outbox`] per subscription and pushes shared frames into it without ever
//! waiting: a full queue means the socket cannot keep up, so it is closed as a slow consumer
//! instead of silently missing messages. The socket's task drains the [`Inbox`].
//!
//! The queue is an unbounded tokio channel bounded by our own counter: tokio's bounded channel
//! takes a mutex on every receive to hand the permit back, which showed in fan-out profiles;
//! one atomic add per push and one subtraction per drained batch keep the same bound.

use axum::extract::ws::Utf8Bytes;
use gateway_protocol::CloseCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use tokio::sync::{Notify, mpsc};

/// A frame ready to be written: shared, immutable, valid UTF-8. Cloning it is a refcount.
pub type Frame = Utf8Bytes;

/// Identifies one socket for the life of the process.
pub type ConnId = u64;

/// Shared between a socket's task and everyone who may ask it to close (the hub, when the
/// queue is full), with the queue's fill level. Node shutdown is signalled separately, by the
/// node's root token.
#[derive(Debug, Default)]
pub struct CloseSwitch {
    wake: Notify,
    reason: AtomicU8,
    /// Signalled when the queue reaches half its capacity: stop lingering, write now.
    urge: Notify,
    /// Frames pushed and not yet taken by the socket's task.
    queued: AtomicUsize,
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

    /// Resolves once the queue has filled to half its capacity since the last time it resolved.
    pub async fn urged(&self) {
        self.urge.notified().await;
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
    tx: mpsc::UnboundedSender<Frame>,
    switch: Arc<CloseSwitch>,
    capacity: usize,
}

/// The receiving half of a socket's queue, drained by the socket's task.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Frame>,
    switch: Arc<CloseSwitch>,
    /// Frames taken by [`Inbox::try_recv`] and not yet subtracted from the fill level.
    taken: usize,
}

impl Inbox {
    /// Waits for the next frame (cancel-safe). `None` once every [`Outbox`] is gone.
    pub async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await;
        if frame.is_some() {
            self.switch.queued.fetch_sub(1, Ordering::AcqRel);
        }
        frame
    }

    /// Takes the next frame if one is queued; call [`Inbox::settle`] after a batch.
    pub fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.taken += 1;
        Some(frame)
    }

    /// Frees the room of the frames taken by [`Inbox::try_recv`] since the last call.
    pub fn settle(&mut self) {
        if self.taken > 0 {
            self.switch.queued.fetch_sub(std::mem::take(&mut self.taken), Ordering::AcqRel);
        }
    }

    /// Frames waiting in the queue (approximate while pushes race with it).
    pub fn len(&self) -> usize {
        self.switch.queued.load(Ordering::Relaxed).saturating_sub(self.taken)
    }

    /// Whether no frame waits in the queue.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
    pub fn new(capacity: usize, switch: Arc<CloseSwitch>) -> (Self, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx, switch: switch.clone(), capacity }, Inbox { rx, switch, taken: 0 })
    }

    /// Queues `frame` without waiting. A full queue closes the socket with 1008 "slow consumer".
    pub fn push(&self, frame: Frame) -> Push {
        let queued = self.switch.queued.fetch_add(1, Ordering::AcqRel);
        if queued >= self.capacity {
            self.switch.queued.fetch_sub(1, Ordering::AcqRel);
            self.switch.close(CloseCode::SlowConsumer);
            return Push::SlowConsumer;
        }
        if queued + 1 == self.capacity.div_ceil(2) {
            self.switch.urge.notify_one();
        }
        match self.tx.send(frame) {
            Ok(()) => Push::Queued,
            Err(_) => {
                self.switch.queued.fetch_sub(1, Ordering::AcqRel);
                Push::Gone
            }
        }
    }

    /// The socket's close switch.
    pub fn switch(&self) -> &Arc<CloseSwitch> {
        &self.switch
    }
}
