//! When a socket writes its channels' messages: the write linger.
//!
//! A socket that receives rarely writes each message at once. A busy one (its last write
//! carried several messages, or came less than one `--write-linger` after the write before)
//! waits until one linger has passed since its last write, so that one write carries everything
//! that arrived meanwhile: a loopback write costs the kernel about as much for one 150-byte frame
//! as for twenty (docs/architecture.md has the figures). A write of replies alone leaves the
//! rhythm as it was, so a subscribe's `ok` does not make the channel's first message wait.

use std::time::Duration;
use tokio::time::Instant;

/// A socket's write rhythm: whether it is busy, and when it last wrote channel messages.
#[derive(Debug)]
pub struct Linger {
    /// `--write-linger` (zero: never linger).
    period: Duration,
    /// When the last write of channel messages ended.
    last_write: Option<Instant>,
    /// The last write of channel messages carried several, or came less than a period after the
    /// one before: waiting for the next write is worth its latency.
    busy: bool,
}

impl Linger {
    /// The rhythm of a new socket: not busy.
    pub fn new(period: Duration) -> Self {
        Self { period, last_write: None, busy: false }
    }

    /// Records a write, ended at `now`, that carried `messages` channel messages. A write of
    /// replies alone (`messages == 0`) changes nothing.
    pub fn wrote(&mut self, messages: u64, now: Instant) {
        if messages == 0 {
            return;
        }
        self.busy = messages > 1 || self.last_write.is_some_and(|last| now < last + self.period);
        self.last_write = Some(now);
    }

    /// When a socket with messages queued at `now` should write them: `None` means at once (it
    /// is not busy, or its linger has passed), otherwise one period after its last write. No
    /// message waits longer than one period.
    pub fn until(&self, now: Instant) -> Option<Instant> {
        if !self.busy {
            return None;
        }
        let due = self.last_write? + self.period;
        (now < due).then_some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_millis(20);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_quiet_sockets_first_two_messages_are_written_at_once_and_the_third_waits() {
        let mut linger = Linger::new(PERIOD);
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
        let mut linger = Linger::new(PERIOD);
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
        let mut linger = Linger::new(Duration::ZERO);
        let start = Instant::now();
        linger.wrote(50, start);
        assert_eq!(linger.until(start), None);
    }
}
