//! One socket's bounded queue of replies, and the switch that signals and closes the socket.
//!
//! The socket queues its replies (`ok`, `pong`, `error`) in its [`Replies`] without ever
//! waiting: a full queue means the client sends commands faster than it reads the answers, so
//! it is closed as a slow consumer. The socket's task drains the queue before it writes its
//! channels' messages. (Messages do not pass through here: each channel has one feed, read by
//! every subscriber, see [`crate::hub::feed`].)
//!
//! The queue is a plain `VecDeque` in the socket's task, drained whole: only that task pushes
//! to it and drains it (the backplane's answers to its publishes come back to the task, which
//! queues the replies), so there is no lock and no allocation shared with other tasks, and an
//! idle socket's queue keeps no pre-allocated block. A push wakes nobody (see `Replies::push`).
//!
//! Every signal to the socket's task from elsewhere (a channel's message for a waiting socket, a
//! channel falling behind, close asked, the connection's read side) is an atomic flag plus one
//! [`AtomicWaker`]: the task
//! polls them on every wake-up, so each poll must stay a few atomic operations. (A
//! `tokio::sync::Notify` takes its mutex whenever a waiting future is polled; shared by many
//! sockets, that mutex was a node-wide lock on every wake-up.)

pub use super::frame::Frame;
use futures_util::task::{ArcWake, AtomicWaker};
use gateway_protocol::CloseCode;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};

/// Identifies one socket for the life of the process.
pub type ConnId = u64;

/// Shared between a socket's task and everyone who may ask it to close (the hub for a slow
/// consumer, the node's roster at shutdown) or to write without lingering (the hub when a
/// channel falls behind; the task's own reply queue when half full). Also holds the task's
/// waker, which every signal from outside the task wakes, and is the waker of the connection's
/// read side (see [`CloseSwitch::take_read_wake`]): one allocation for everything a socket's task
/// looks at when it wakes. Only the socket's own task polls its futures, with the task's waker
/// (never with this switch as the waker, which would make it hold itself).
#[derive(Debug)]
pub struct CloseSwitch {
    reason: AtomicU8,
    /// Set when the socket should stop lingering and write now.
    urge: AtomicBool,
    /// The connection's read side woke the task, or returned a frame (more may be buffered):
    /// it must be polled again.
    read_woken: AtomicBool,
    /// The socket's task, waiting for a channel's message, the urge, a close or its client.
    task: AtomicWaker,
}

impl Default for CloseSwitch {
    /// Open, not urged, and the read side still to be polled a first time.
    fn default() -> Self {
        Self {
            reason: AtomicU8::new(NO_REASON),
            urge: AtomicBool::new(false),
            read_woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }
    }
}

/// The waker the socket's task gives its connection's read side: it notes that the read side
/// woke, then wakes the task.
impl ArcWake for CloseSwitch {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.read_woken.store(true, Ordering::Release);
        arc_self.task.wake();
    }
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
    /// Asks the socket to close with `reason`; the first reason given wins. Returns whether
    /// this call was the first.
    pub fn close(&self, reason: CloseCode) -> bool {
        let index = CLOSE_REASONS.iter().position(|r| *r == reason).unwrap_or(7) as u8 + 1;
        let first = self.reason.compare_exchange(NO_REASON, index, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if first {
            // The socket's task: its loop, or a write of its that the peer stalls.
            self.task.wake();
        }
        first
    }

    /// Wakes the socket's task: a channel it reads has a message for it.
    pub fn wake_task(&self) {
        self.task.wake();
    }

    /// Asks a lingering socket to write now: it is falling behind on a channel.
    pub fn urge(&self) {
        self.urge.store(true, Ordering::Release);
        self.task.wake();
    }

    /// Forgets an urge: the write it asked for has just happened.
    pub fn clear_urge(&self) {
        self.urge.store(false, Ordering::Release);
    }

    /// The reason given to [`CloseSwitch::close`], if any.
    pub fn reason(&self) -> Option<CloseCode> {
        match self.reason.load(Ordering::Acquire) {
            NO_REASON => None,
            i => CLOSE_REASONS.get(usize::from(i) - 1).copied(),
        }
    }

    /// Resolves once the queue has filled to half its capacity since the last time it resolved.
    /// Only the socket's own task may wait on it.
    pub async fn urged(&self) {
        std::future::poll_fn(|cx| self.poll_flag(cx, || self.urge.swap(false, Ordering::AcqRel).then_some(()))).await;
    }

    /// Resolves once the socket was asked to close, with the reason. Only the socket's own task
    /// may wait on it (from any number of places: they share the task's waker).
    pub async fn closed(&self) -> CloseCode {
        std::future::poll_fn(|cx| self.poll_flag(cx, || self.reason())).await
    }

    /// Registers the task's waker (for the next signal), then takes the read side's wake-up:
    /// whether the connection's read side must be polled, because it woke the task or returned a
    /// frame last time (see [`CloseSwitch::keep_reading`]). Only the socket's own task calls it.
    pub fn take_read_wake(&self, cx: &mut Context<'_>) -> bool {
        self.poll_flag(cx, || self.read_woken.swap(false, Ordering::AcqRel).then_some(())).is_ready()
    }

    /// The read side returned a frame: poll it again on the next turn, more may be buffered.
    pub fn keep_reading(&self) {
        self.read_woken.store(true, Ordering::Release);
    }

    /// Registers the task before reading the flag, so a signal between the two still wakes it.
    fn poll_flag<T>(&self, cx: &mut Context<'_>, read: impl FnOnce() -> Option<T>) -> Poll<T> {
        self.task.register(cx.waker());
        read().map_or(Poll::Pending, Poll::Ready)
    }
}

/// A socket's bounded queue of replies, owned by its task: only the task pushes (from its loop)
/// and drains it, so it needs no lock and no shared allocation.
#[derive(Debug)]
pub struct Replies {
    frames: VecDeque<Frame>,
    capacity: usize,
    /// Closed when the queue overflows, urged when it is half full.
    switch: Arc<CloseSwitch>,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// The queue was full: the socket is now closing as a slow consumer.
    SlowConsumer,
}

impl Replies {
    /// Creates a queue of `capacity` frames for a socket controlled by `switch`.
    pub fn new(capacity: usize, switch: Arc<CloseSwitch>) -> Self {
        Self { frames: VecDeque::new(), capacity, switch }
    }

    /// Queues `frame` without waiting. A full queue closes the socket with 1008 "slow consumer";
    /// a queue that reaches half its capacity raises the urge (stop lingering, write now).
    ///
    /// The socket's loop looks at the queue and the urge again before it waits, so a push wakes
    /// nobody; a push that overflows closes the socket, which wakes it like any close. (Waking
    /// the running task made the runtime poll it once more for nothing and wake an idle worker
    /// thread for that: one futex call and context switch per subscribe answered.)
    pub(super) fn push(&mut self, frame: Frame) -> Push {
        if self.frames.len() >= self.capacity {
            self.switch.close(CloseCode::SlowConsumer);
            return Push::SlowConsumer;
        }
        self.frames.push_back(frame);
        if self.frames.len() == self.half() {
            self.switch.urge.store(true, Ordering::Release);
        }
        Push::Queued
    }

    /// Moves every queued frame to the back of `batch`, freeing their room in the queue.
    pub fn drain_into(&mut self, batch: &mut VecDeque<Frame>) {
        if batch.is_empty() {
            std::mem::swap(&mut self.frames, batch);
        } else {
            batch.append(&mut self.frames);
        }
    }

    /// Frames waiting in the queue.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no frame waits in the queue.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether the queue is at least half full: time to write without lingering, and to stop
    /// reading the client (its replies would queue behind).
    pub fn is_half_full(&self) -> bool {
        self.frames.len() >= self.half()
    }

    /// The fill level at which the socket stops lingering and stops reading: half the capacity.
    fn half(&self) -> usize {
        self.capacity.div_ceil(2)
    }
}

/// A waker that counts its wake-ups, for tests of the socket's signals (here and in the feeds).
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct CountingWaker(std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl CountingWaker {
    /// Wake-ups so far.
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
impl futures_util::task::ArcWake for CountingWaker {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::waker;
    use std::future::Future;

    #[test]
    fn a_push_wakes_nobody_raises_the_urge_at_half_and_closes_the_socket_when_full() {
        let wakes = Arc::new(CountingWaker::default());
        let waker = waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let count = || wakes.count();
        let switch = Arc::new(CloseSwitch::default());
        let mut replies = Replies::new(8, switch.clone());

        assert!(replies.is_empty());
        let mut urged = std::pin::pin!(switch.urged());
        let mut closed = std::pin::pin!(switch.closed());
        assert!(urged.as_mut().poll(&mut cx).is_pending());
        assert!(closed.as_mut().poll(&mut cx).is_pending());
        for n in 1..4 {
            assert_eq!(replies.push(Frame::text(&n.to_string())), Push::Queued);
        }
        assert_eq!(replies.len(), 3);
        assert!(urged.as_mut().poll(&mut cx).is_pending(), "below half: no urge");
        // The fourth frame fills half the queue: the urge is raised for the loop to see, and
        // the task, which is the one pushing, is not woken.
        replies.push(Frame::text("4"));
        assert!(urged.as_mut().poll(&mut cx).is_ready());
        assert_eq!(count(), 0, "the socket's own pushes wake nobody");

        for n in 5..=8 {
            assert_eq!(replies.push(Frame::text(&n.to_string())), Push::Queued);
        }
        assert_eq!(count(), 0);
        assert_eq!(replies.push(Frame::text("9")), Push::SlowConsumer);
        assert_eq!(count(), 1, "closing wakes the task");
        assert_eq!(closed.as_mut().poll(&mut cx), Poll::Ready(CloseCode::SlowConsumer));

        let mut batch = VecDeque::new();
        replies.drain_into(&mut batch);
        assert_eq!(batch.len(), 8);
    }

    #[test]
    fn the_read_side_waking_the_switch_wakes_the_task_once_and_only_marks_the_read_side() {
        let wakes = Arc::new(CountingWaker::default());
        let waker = waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let switch = Arc::new(CloseSwitch::default());

        assert!(switch.take_read_wake(&mut cx), "a new socket's read side is polled a first time");
        assert!(!switch.take_read_wake(&mut cx), "then only when it asks");
        let mut urged = std::pin::pin!(switch.urged());
        let mut closed = std::pin::pin!(switch.closed());
        assert!(urged.as_mut().poll(&mut cx).is_pending());
        assert!(closed.as_mut().poll(&mut cx).is_pending());

        // The connection's read side wakes the waker it was polled with: the switch.
        futures_util::task::waker_ref(&switch).wake_by_ref();
        assert_eq!(wakes.count(), 1, "the task is woken once");
        assert!(urged.as_mut().poll(&mut cx).is_pending(), "a read wake-up is not an urge");
        assert!(closed.as_mut().poll(&mut cx).is_pending(), "nor a close");
        assert!(switch.take_read_wake(&mut cx));
        assert!(!switch.take_read_wake(&mut cx));

        // A frame was returned: more may be buffered, so the read side is polled again.
        switch.keep_reading();
        assert!(switch.take_read_wake(&mut cx));
        assert_eq!(wakes.count(), 1, "keeping on reading wakes nobody");
    }
}
