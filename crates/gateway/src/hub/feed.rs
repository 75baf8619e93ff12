//! One channel's messages on this node, appended once and read by every local subscriber.
//!
//! A [`Feed`] is a chain of chunks of frame slots. Delivering a message fills the next slot: it
//! touches nothing per subscriber, except the subscribers that wait for a message at that
//! moment (a busy socket lingers instead, and reads what arrived when its linger is over). Each
//! subscriber reads the chain from its own position through a [`Reader`], which holds the chunk
//! it is in: a chunk lives while a reader (or the feed's tail) still needs it, and goes with
//! the last of them. Slots are filled in order by one appender at a time and never change, so
//! readers take no lock.
//!
//! How far behind each reader is stays visible to the hub through [`Subscriber::behind`], which
//! is how a subscriber that cannot keep up is found and closed (see `Hub::deliver`).

use crate::connection::outbox::{CloseSwitch, Frame};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Slots in a feed's first chunk; each next chunk has room for twice what the one before it
/// took, up to [`MAX_CHUNK_SLOTS`]. A quiet channel costs one small chunk.
const FIRST_CHUNK_SLOTS: usize = 4;
/// Slots in the largest chunk.
const MAX_CHUNK_SLOTS: usize = 32;
/// A chunk takes no more frames once it holds this many bytes, so that a quiet channel keeps
/// at most this much of its recent messages (plus one message) alive.
const MAX_CHUNK_BYTES: usize = 16 * 1024;

/// A run of consecutive messages of one feed.
#[derive(Debug)]
struct Chunk {
    /// Sequence number of the first slot.
    start: u64,
    slots: Box<[OnceLock<Frame>]>,
    /// Set when the chunk takes no more frames: how many slots it filled, and the next chunk.
    next: OnceLock<(usize, Arc<Chunk>)>,
}

impl Chunk {
    fn new(start: u64, slots: usize) -> Arc<Self> {
        Arc::new(Self { start, slots: (0..slots).map(|_| OnceLock::new()).collect(), next: OnceLock::new() })
    }
}

impl Drop for Chunk {
    /// Frees the chunks behind this one that nobody else holds in a loop: left to the default
    /// drop, a long chain (a reader far behind, many large messages) would recurse once per chunk.
    fn drop(&mut self) {
        let mut next = self.next.take();
        while let Some((_, chunk)) = next {
            next = Arc::into_inner(chunk).and_then(|mut chunk| chunk.next.take());
        }
    }
}

/// The appending end of a feed.
#[derive(Debug)]
struct Tail {
    chunk: Arc<Chunk>,
    /// Sequence number the next message gets.
    next_seq: u64,
    /// Bytes in the tail chunk's frames.
    bytes: usize,
}

/// One subscriber of a feed, as shared by the hub (to wake it, see how far behind it is and
/// close it) and its socket (which advances it).
#[derive(Debug)]
pub struct Subscriber {
    switch: Arc<CloseSwitch>,
    /// Sequence number of the first message this subscriber has not taken yet.
    taken: AtomicU64,
    /// It is in its feed's list of waiters (guarded by that list's lock).
    waiting: AtomicBool,
}

impl Subscriber {
    /// The socket's close switch.
    pub fn switch(&self) -> &Arc<CloseSwitch> {
        &self.switch
    }

    /// Messages appended to `feed` that this subscriber has not taken yet.
    pub fn behind(&self, feed: &Feed) -> u64 {
        feed.appended().saturating_sub(self.taken.load(Ordering::Acquire))
    }
}

/// One channel's message chain on this node.
#[derive(Debug)]
pub struct Feed {
    tail: Mutex<Tail>,
    /// Mirrors `tail.next_seq` for lock-free reads.
    appended: AtomicU64,
    /// How many subscribers are listed in `waiters`, so that an append with nobody waiting takes
    /// no lock. (Sequentially consistent with `appended`: a subscriber that lists itself and then
    /// finds nothing new, and an appender that publishes a message and then finds nobody listed,
    /// cannot both happen.)
    listed: AtomicUsize,
    /// Subscribers waiting for the next message: woken, and forgotten, by the next append.
    waiters: Mutex<Waiters>,
}

/// The subscribers waiting for a feed's next message.
#[derive(Debug, Default)]
struct Waiters {
    list: Vec<Arc<Subscriber>>,
    /// The list's length at which subscribers that have left (only the list still holds them)
    /// are dropped from it: without that, a socket subscribing and unsubscribing in a loop on a
    /// quiet channel would grow the list until the next message.
    prune_at: usize,
}

/// The smallest list of waiters that is pruned.
const MIN_PRUNE_AT: usize = 16;

impl Default for Feed {
    fn default() -> Self {
        Self::new()
    }
}

impl Feed {
    /// An empty feed.
    pub fn new() -> Self {
        Self {
            tail: Mutex::new(Tail { chunk: Chunk::new(0, FIRST_CHUNK_SLOTS), next_seq: 0, bytes: 0 }),
            appended: AtomicU64::new(0),
            listed: AtomicUsize::new(0),
            waiters: Mutex::new(Waiters { list: Vec::new(), prune_at: MIN_PRUNE_AT }),
        }
    }

    /// How many messages were appended so far (the next one's sequence number).
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::SeqCst)
    }

    /// A reader positioned after every message appended so far, for the socket behind `switch`.
    pub fn reader(self: &Arc<Self>, switch: Arc<CloseSwitch>) -> Reader {
        let tail = self.tail.lock();
        let subscriber =
            Arc::new(Subscriber { switch, taken: AtomicU64::new(tail.next_seq), waiting: AtomicBool::new(false) });
        Reader { feed: self.clone(), chunk: tail.chunk.clone(), next: tail.next_seq, end: tail.next_seq, subscriber }
    }

    /// Appends `frame` and wakes the subscribers waiting for it; returns its sequence number.
    /// Appends to one feed must come one at a time in the channel's order (the hub's callers
    /// serialise them per channel); the lock only keeps a mistake from corrupting the chain.
    pub fn append(&self, frame: &Frame) -> u64 {
        let seq = {
            let mut tail = self.tail.lock();
            let used = usize::try_from(tail.next_seq - tail.chunk.start).unwrap_or(usize::MAX);
            let size = frame.wire().len();
            if used == tail.chunk.slots.len() || (used > 0 && tail.bytes + size > MAX_CHUNK_BYTES) {
                let slots = (used * 2).clamp(FIRST_CHUNK_SLOTS, MAX_CHUNK_SLOTS);
                let next = Chunk::new(tail.next_seq, slots);
                // Only this appender sets `next`, once per chunk.
                let _ = tail.chunk.next.set((used, next.clone()));
                tail.chunk = next;
                tail.bytes = 0;
            }
            let seq = tail.next_seq;
            let index = usize::try_from(seq - tail.chunk.start).unwrap_or(usize::MAX);
            // The slot is empty: each sequence number is appended once.
            let _ = tail.chunk.slots[index].set(frame.clone());
            tail.next_seq += 1;
            tail.bytes += size;
            self.appended.store(tail.next_seq, Ordering::SeqCst);
            seq
        };
        if self.listed.load(Ordering::SeqCst) == 0 {
            return seq;
        }
        let waiters = {
            let mut waiters = self.waiters.lock();
            self.listed.store(0, Ordering::SeqCst);
            for subscriber in &waiters.list {
                subscriber.waiting.store(false, Ordering::Release);
            }
            waiters.prune_at = MIN_PRUNE_AT;
            std::mem::take(&mut waiters.list)
        };
        for subscriber in waiters {
            subscriber.switch.wake_task();
        }
        seq
    }
}

/// A socket's position in one feed: the next message to write, and the chunk that holds it.
#[derive(Debug)]
pub struct Reader {
    feed: Arc<Feed>,
    chunk: Arc<Chunk>,
    /// Sequence number of the next message to write.
    next: u64,
    /// Where the write in progress stops (see [`Reader::mark`]).
    end: u64,
    subscriber: Arc<Subscriber>,
}

impl Reader {
    /// The subscriber this reader advances (the hub keeps it to watch and wake the socket).
    pub fn subscriber(&self) -> &Arc<Subscriber> {
        &self.subscriber
    }

    /// Whether a message waits to be written.
    pub fn has_unread(&self) -> bool {
        self.feed.appended() > self.next
    }

    /// Fixes what the next write takes: every message appended so far. Returns how many.
    pub fn mark(&mut self) -> usize {
        self.end = self.feed.appended();
        usize::try_from(self.end - self.next).unwrap_or(usize::MAX)
    }

    /// Whether a message up to the mark is not written yet.
    pub fn has_marked(&self) -> bool {
        self.end > self.next
    }

    /// The messages up to the mark not written yet, in order, borrowed from the feed.
    pub fn marked(&self) -> Marked<'_> {
        Marked { chunk: &self.chunk, next: self.next, end: self.end }
    }

    /// Moves past `count` written messages (at most up to the mark); the chunks behind them
    /// go once no other reader needs them.
    pub fn advance(&mut self, count: usize) {
        self.next = (self.next + count as u64).min(self.end.max(self.next));
        while let Some((filled, next)) = self.chunk.next.get() {
            if self.next - self.chunk.start < *filled as u64 {
                break;
            }
            self.chunk = next.clone();
        }
        self.subscriber.taken.store(self.next, Ordering::Release);
    }

    /// Clones every message not written yet to the back of `batch`, and moves past them; returns
    /// how many. (A closing socket keeps what it still has to write this way, and lets go of the
    /// feed.)
    pub fn take_all(&mut self, batch: &mut VecDeque<Frame>) -> usize {
        let count = self.mark();
        batch.extend(self.marked().cloned());
        self.advance(count);
        count
    }

    /// Asks the feed to wake the socket at its next append. The caller checks
    /// [`Reader::has_unread`] afterwards: an append between the two is then seen either way.
    pub fn wait(&self) {
        // Already listed (or being woken right now, which is as good).
        if self.subscriber.waiting.load(Ordering::Acquire) {
            return;
        }
        let mut waiters = self.feed.waiters.lock();
        if !self.subscriber.waiting.swap(true, Ordering::AcqRel) {
            waiters.list.push(self.subscriber.clone());
            if waiters.list.len() >= waiters.prune_at {
                waiters.list.retain(|subscriber| Arc::strong_count(subscriber) > 1);
                waiters.prune_at = (waiters.list.len() * 2).max(MIN_PRUNE_AT);
            }
            self.feed.listed.store(waiters.list.len(), Ordering::SeqCst);
        }
    }
}

impl Drop for Reader {
    /// A reader that is gone (its socket unsubscribed or closed) no longer counts as behind,
    /// even while its subscriber is still listed in the hub.
    fn drop(&mut self) {
        self.subscriber.taken.store(u64::MAX, Ordering::Release);
    }
}

/// The marked, unwritten messages of a [`Reader`], oldest first.
#[derive(Debug)]
pub struct Marked<'a> {
    chunk: &'a Chunk,
    next: u64,
    end: u64,
}

impl<'a> Iterator for Marked<'a> {
    type Item = &'a Frame;

    fn next(&mut self) -> Option<&'a Frame> {
        while self.next < self.end {
            let index = usize::try_from(self.next - self.chunk.start).unwrap_or(usize::MAX);
            if let Some(frame) = self.chunk.slots.get(index).and_then(OnceLock::get) {
                self.next += 1;
                return Some(frame);
            }
            // Below the mark every message is appended, so the slot is in a later chunk,
            // which is linked before the append that filled it.
            let (_, next) = self.chunk.next.get()?;
            self.chunk = next;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::outbox::CountingWaker;
    use futures_util::task::waker;
    use std::task::Context;

    fn texts(batch: &VecDeque<Frame>) -> Vec<String> {
        batch.iter().map(|f| String::from_utf8_lossy(f.payload()).into_owned()).collect()
    }

    #[test]
    fn readers_see_every_message_after_they_joined_in_order_across_chunks() {
        let feed = Arc::new(Feed::new());
        feed.append(&Frame::text("before"));
        let mut early = feed.reader(Arc::default());
        let mut batch = VecDeque::new();
        let mut expected = Vec::new();
        for n in 0..100 {
            feed.append(&Frame::text(&n.to_string()));
            expected.push(n.to_string());
            if n % 7 == 0 {
                early.take_all(&mut batch);
            }
        }
        let mut late = feed.reader(Arc::default());
        assert!(!late.has_unread(), "a new reader starts after what was appended before it");
        feed.append(&Frame::text("last"));
        early.take_all(&mut batch);
        expected.push("last".into());
        assert_eq!(texts(&batch), expected);
        assert_eq!(early.subscriber().behind(&feed), 0);

        let mut late_batch = VecDeque::new();
        assert_eq!(late.subscriber().behind(&feed), 1);
        assert_eq!(late.take_all(&mut late_batch), 1);
        assert_eq!(texts(&late_batch), ["last"]);
        assert_eq!(late.take_all(&mut late_batch), 0);
    }

    #[test]
    fn readers_that_come_and_go_on_a_quiet_feed_do_not_pile_up_as_waiters() {
        let feed = Arc::new(Feed::new());
        let staying = feed.reader(Arc::default());
        staying.wait();
        for _ in 0..10_000 {
            let reader = feed.reader(Arc::default());
            reader.wait();
        }
        let waiting = feed.waiters.lock().list.len();
        assert!(waiting < 2 * MIN_PRUNE_AT, "{waiting} waiters listed");
        assert!(feed.waiters.lock().list.iter().any(|s| Arc::ptr_eq(s, staying.subscriber())));
    }

    #[test]
    fn a_long_chain_behind_a_dropped_reader_is_freed_without_deep_recursion() {
        let feed = Arc::new(Feed::new());
        let reader = feed.reader(Arc::default());
        // Frames over half a chunk's bytes: one chunk each.
        let frame = Frame::text(&"x".repeat(MAX_CHUNK_BYTES / 2 + 1));
        for _ in 0..100_000 {
            feed.append(&frame);
        }
        drop(reader);
        assert_eq!(feed.appended(), 100_000);
    }

    #[test]
    fn large_frames_close_a_chunk_early_and_nothing_is_skipped() {
        let feed = Arc::new(Feed::new());
        let mut reader = feed.reader(Arc::default());
        let big = "x".repeat(MAX_CHUNK_BYTES / 2);
        let mut batch = VecDeque::new();
        for _ in 0..10 {
            feed.append(&Frame::text(&big));
        }
        assert_eq!(reader.take_all(&mut batch), 10);
        assert!(batch.iter().all(|f| f.payload().len() == big.len()));
    }

    #[test]
    fn an_append_wakes_waiting_readers_once_and_only_them() {
        let feed = Arc::new(Feed::new());
        let wakes = Arc::new(CountingWaker::default());
        let waker = waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let switch = Arc::new(CloseSwitch::default());
        let mut waiting = feed.reader(switch.clone());
        let _lingering = feed.reader(Arc::default());
        // Register the task's waker on the switch the way a socket's task does.
        let mut closed = std::pin::pin!(switch.closed());
        assert!(std::future::Future::poll(closed.as_mut(), &mut cx).is_pending());

        waiting.wait();
        waiting.wait();
        assert!(!waiting.has_unread());
        feed.append(&Frame::text("a"));
        assert_eq!(wakes.count(), 1, "woken once, though it asked twice");
        feed.append(&Frame::text("b"));
        assert_eq!(wakes.count(), 1, "a wait is used up by the append that wakes it");
        let mut batch = VecDeque::new();
        assert_eq!(waiting.take_all(&mut batch), 2);
    }
}
