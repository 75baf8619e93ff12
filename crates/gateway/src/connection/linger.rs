//! When a socket writes its channels' messages: the write linger, and the node's write budget.
//!
//! A socket that receives rarely writes each message at once. A busy one (it receives more
//! than one message per `--write-linger`: see [`Linger::wrote`]) waits until one linger has
//! passed since its last write, so that one write carries everything
//! that arrived meanwhile: a loopback write costs the kernel about as much for one 150-byte frame
//! as for twenty (docs/architecture.md has the figures). A write of replies alone leaves the
//! rhythm as it was, so a subscribe's `ok` does not make the channel's first message wait.
//!
//! The node's steadily busy sockets (busy two writes in a row) share one [`WriteBudget`] of
//! `--write-rate` writes a second: when more of them are counted than one linger each allows,
//! every busy socket lingers longer (at most [`MAX_STRETCH`] lingers), so their writes carry
//! more each instead of their number, and the kernel's cost of each, growing until the node has
//! no CPU left for anything else.

use prometheus::IntGauge;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The longest a budget stretches a linger, in lingers.
pub const MAX_STRETCH: u32 = 10;

/// The node's write budget: how many of its sockets are steadily busy, and so how long each busy
/// socket lingers for their writes together to stay within `--write-rate` a second.
#[derive(Debug)]
pub struct WriteBudget {
    /// Steadily busy sockets (the `gateway_busy_sockets` gauge): each [`Linger`] with a streak of
    /// two busy writes counts once.
    busy: IntGauge,
    /// One second over the write rate: the linger each busy socket adds to the rest's (zero: no
    /// budget).
    per_socket: Duration,
}

impl WriteBudget {
    /// A budget of `writes_per_second` (0: none) whose busy sockets are counted in `busy`.
    pub fn new(writes_per_second: u32, busy: IntGauge) -> Self {
        let per_socket = match writes_per_second {
            0 => Duration::ZERO,
            rate => Duration::from_secs(1) / rate,
        };
        Self { busy, per_socket }
    }

    /// How long a busy socket lingers now: `period`, or longer if the counted sockets would write
    /// more often together than the budget allows, at most [`MAX_STRETCH`] periods.
    pub fn linger(&self, period: Duration) -> Duration {
        let busy = u32::try_from(self.busy.get()).unwrap_or(u32::MAX);
        self.per_socket.saturating_mul(busy).clamp(period, period.saturating_mul(MAX_STRETCH))
    }
}

/// A socket's write rhythm: whether it is busy, and when it last wrote channel messages.
#[derive(Debug)]
pub struct Linger {
    /// `--write-linger` (zero: never linger).
    period: Duration,
    /// The node's budget, shared by every socket.
    budget: Arc<WriteBudget>,
    /// When the last write of channel messages ended.
    last_write: Option<Instant>,
    /// Writes in a row (at most two) that carried more than one message per period since the
    /// write before (the first write of all: more than one message), with no linger since that
    /// ended with nothing to write. One makes the socket busy: it lingers, since waiting for its
    /// next write is worth the latency. Two in a row count it in the node's budget, so that a
    /// socket that only now and then gets two messages close together does not stretch
    /// everyone's linger.
    streak: u8,
}

impl Linger {
    /// The rhythm of a new socket: not busy.
    pub fn new(period: Duration, budget: Arc<WriteBudget>) -> Self {
        Self { period, budget, last_write: None, streak: 0 }
    }

    /// Records a write, ended at `now`, that carried `messages` channel messages. A write of
    /// replies alone (`messages == 0`) changes nothing. The write counts as busy if it carried
    /// more than one message per period since the last one: judged by the period, not by the
    /// linger the budget stretched it to, so a socket that receives less than one message per
    /// period is quiet however long it lingered.
    pub fn wrote(&mut self, messages: u64, now: Instant) {
        if messages == 0 {
            return;
        }
        let busy = !self.period.is_zero()
            && match self.last_write {
                None => messages > 1,
                Some(last) => {
                    let spread = self.period.saturating_mul(u32::try_from(messages).unwrap_or(u32::MAX));
                    spread > now.saturating_duration_since(last)
                }
            };
        self.set_streak(if busy { (self.streak + 1).min(2) } else { 0 });
        self.last_write = Some(now);
    }

    /// Records that a whole linger passed with no message to write: the socket is quiet again,
    /// and its next message is written at once. Also called when the socket closes.
    pub fn quiet(&mut self) {
        self.set_streak(0);
    }

    /// Whether the socket lingers before its next write.
    pub fn is_busy(&self) -> bool {
        self.streak > 0
    }

    fn set_streak(&mut self, streak: u8) {
        let (counted, counts) = (self.streak >= 2, streak >= 2);
        self.streak = streak;
        if counted != counts {
            if counts { self.budget.busy.inc() } else { self.budget.busy.dec() }
        }
    }

    /// When a socket with messages queued at `now` should write them: `None` means at once (it
    /// is not busy, or its linger has passed), otherwise one linger after its last write (a
    /// period, or longer while the node's budget is stretched). No message waits longer than
    /// one linger.
    pub fn until(&self, now: Instant) -> Option<Instant> {
        if !self.is_busy() {
            return None;
        }
        let due = self.last_write? + self.budget.linger(self.period);
        (now < due).then_some(due)
    }
}

impl Drop for Linger {
    fn drop(&mut self) {
        self.quiet();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_millis(20);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A budget of `rate` writes a second, with its busy-socket gauge.
    fn budget(rate: u32) -> Arc<WriteBudget> {
        Arc::new(WriteBudget::new(rate, IntGauge::new("busy", "busy sockets").expect("valid gauge")))
    }

    #[test]
    fn a_quiet_sockets_first_two_messages_are_written_at_once_and_the_third_waits() {
        let mut linger = Linger::new(PERIOD, budget(0));
        let start = Instant::now();
        assert_eq!(linger.until(start), None);
        linger.wrote(1, start);
        assert_eq!(linger.until(start + ms(1)), None, "one lone message after a quiet spell is not busy");
        linger.wrote(1, start + ms(1));
        assert_eq!(linger.until(start + ms(2)), Some(start + ms(21)), "two writes a linger apart are");
        assert_eq!(linger.until(start + ms(21)), None, "the linger has passed");
    }

    #[test]
    fn a_write_of_several_messages_makes_a_socket_busy_and_a_lone_one_later_makes_it_quiet() {
        let mut linger = Linger::new(PERIOD, budget(0));
        let start = Instant::now();
        linger.wrote(5, start);
        assert_eq!(linger.until(start), Some(start + PERIOD));
        // Replies alone change nothing, however late.
        linger.wrote(0, start + ms(500));
        assert_eq!(linger.until(start + ms(3)), Some(start + PERIOD));
        // One message, more than a linger after the last write: quiet again.
        linger.wrote(1, start + ms(100));
        assert_eq!(linger.until(start + ms(101)), None);
    }

    #[test]
    fn a_zero_linger_never_waits() {
        let mut linger = Linger::new(Duration::ZERO, budget(0));
        let start = Instant::now();
        linger.wrote(50, start);
        assert_eq!(linger.until(start), None);
    }

    /// Two busy writes in a row, the second at `at`: the socket is busy and counted.
    fn keep_busy(linger: &mut Linger, at: Instant) {
        linger.wrote(5, at - ms(1));
        linger.wrote(5, at);
    }

    #[test]
    fn busy_sockets_beyond_the_budget_stretch_everyones_linger_up_to_a_ceiling() {
        // 100 writes a second: two busy sockets fit in a 20 ms linger each (50 a second each),
        // four need 40 ms each.
        let budget = budget(100);
        let start = Instant::now() + ms(10);
        let mut sockets: Vec<Linger> = (0..4).map(|_| Linger::new(PERIOD, budget.clone())).collect();
        for linger in &mut sockets[..2] {
            keep_busy(linger, start);
        }
        assert_eq!(budget.busy.get(), 2);
        assert_eq!(sockets[0].until(start), Some(start + PERIOD), "within the budget: one linger");
        for linger in &mut sockets[2..] {
            keep_busy(linger, start);
        }
        assert_eq!(sockets[0].until(start), Some(start + ms(40)), "four busy sockets share 100 writes a second");
        // A socket gone quiet, or gone, no longer counts.
        sockets[3].wrote(1, start + ms(100));
        sockets.pop();
        sockets.pop();
        assert_eq!(budget.busy.get(), 2);
        assert_eq!(sockets[0].until(start), Some(start + PERIOD));
        // However many are busy, no socket lingers longer than the ceiling.
        budget.busy.set(1_000_000);
        assert_eq!(sockets[0].until(start), Some(start + PERIOD * MAX_STRETCH));
        budget.busy.set(2);
    }

    #[test]
    fn one_busy_write_makes_a_socket_linger_and_two_in_a_row_count_it_in_the_budget() {
        let budget = budget(1);
        let start = Instant::now();
        let mut linger = Linger::new(PERIOD, budget.clone());
        // Two messages close together now and then: the socket lingers once, uncounted, so its
        // linger is the period alone.
        linger.wrote(1, start);
        linger.wrote(1, start + ms(5));
        assert!(linger.is_busy());
        assert_eq!((budget.busy.get(), linger.until(start + ms(6))), (0, Some(start + ms(25))));
        linger.wrote(1, start + ms(300));
        assert!(!linger.is_busy());
        // A sustained stream: counted from its second busy write on.
        linger.wrote(4, start + ms(301));
        linger.wrote(4, start + ms(320));
        assert_eq!(budget.busy.get(), 1);
    }

    #[test]
    fn without_a_budget_the_linger_is_the_period_however_many_are_busy() {
        let budget = budget(0);
        let start = Instant::now() + ms(10);
        let mut sockets: Vec<Linger> = (0..50).map(|_| Linger::new(PERIOD, budget.clone())).collect();
        for linger in &mut sockets {
            keep_busy(linger, start);
        }
        assert_eq!(budget.busy.get(), 50);
        assert_eq!(sockets[0].until(start), Some(start + PERIOD));
        drop(sockets);
        assert_eq!(budget.busy.get(), 0, "every busy socket that closes leaves the count");
    }

    #[test]
    fn a_socket_below_one_message_per_period_is_quiet_however_long_the_stretched_linger() {
        // A stretched 200 ms linger gathers two messages of a socket that gets ten a second: that
        // is one per 100 ms, slower than one per 20 ms period, so it is not busy and does not
        // keep the stretch going.
        let budget = budget(1);
        let start = Instant::now() + ms(10);
        let mut linger = Linger::new(PERIOD, budget.clone());
        keep_busy(&mut linger, start);
        assert_eq!(linger.until(start), Some(start + PERIOD * MAX_STRETCH));
        linger.wrote(2, start + ms(200));
        assert_eq!(budget.busy.get(), 0);
        assert_eq!(linger.until(start + ms(201)), None);
        // Fifteen in the same 200 ms, twice, is more than one per period: busy and counted.
        linger.wrote(15, start + ms(400));
        linger.wrote(15, start + ms(600));
        assert_eq!(budget.busy.get(), 1);
        // A linger that ends with nothing to write makes it quiet at once.
        linger.quiet();
        assert_eq!((budget.busy.get(), linger.until(start + ms(601))), (0, None));
    }
}
