//! Local routing: which sockets of this node listen to which channel.
//!
//! The map is split into shards, each behind its own read-write lock, so unrelated channels never
//! contend and delivery only takes a read lock. [`Hub::deliver`] pushes one shared frame into
//! every subscriber's [`Outbox`] without awaiting anything.

use crate::connection::outbox::{ConnId, Frame, Outbox, Push};
use crate::metrics::Metrics;
use gateway_protocol::ChannelName;
use indexmap::IndexMap;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

const SHARDS: usize = 64;

type Subscribers = IndexMap<ConnId, Outbox>;

/// Channel -> local subscribers, sharded by channel name.
pub struct Hub {
    shards: Box<[RwLock<HashMap<ChannelName, Subscribers>>]>,
    hasher: RandomState,
    metrics: Metrics,
}

impl Hub {
    /// An empty hub reporting to `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self { shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(), hasher: RandomState::new(), metrics }
    }

    /// The stripe (0..64) a channel belongs to; callers use it to serialise per channel.
    pub fn stripe(&self, channel: &str) -> usize {
        (self.hasher.hash_one(channel) as usize) % SHARDS
    }

    fn shard(&self, channel: &str) -> &RwLock<HashMap<ChannelName, Subscribers>> {
        &self.shards[self.stripe(channel)]
    }

    /// Adds a subscriber; returns true when it is the channel's first local subscriber.
    pub fn add(&self, channel: &ChannelName, conn: ConnId, outbox: Outbox) -> bool {
        let mut shard = self.shard(channel.as_str()).write();
        let subscribers = shard.entry(channel.clone()).or_default();
        let first = subscribers.is_empty();
        subscribers.insert(conn, outbox);
        if first {
            self.metrics.channels.inc();
        }
        first
    }

    /// Removes a subscriber; returns true when the channel has no local subscriber left.
    pub fn remove(&self, channel: &str, conn: ConnId) -> bool {
        let mut shard = self.shard(channel).write();
        let Some(subscribers) = shard.get_mut(channel) else { return false };
        if subscribers.swap_remove(&conn).is_none() {
            return false;
        }
        if subscribers.is_empty() {
            shard.remove(channel);
            self.metrics.channels.dec();
            return true;
        }
        false
    }

    /// Whether any local socket subscribes to `channel`.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.shard(channel).read().contains_key(channel)
    }

    /// Every channel with a local subscriber (used to re-subscribe after a backplane reconnect).
    pub fn channels(&self) -> Vec<ChannelName> {
        self.shards.iter().flat_map(|s| s.read().keys().cloned().collect::<Vec<_>>()).collect()
    }

    /// Number of local subscribers of `channel`.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.shard(channel).read().get(channel).map_or(0, IndexMap::len)
    }

    /// Queues `frame` to every local subscriber of `channel`; returns how many got it.
    /// Never waits: a subscriber whose queue is full is closed as a slow consumer.
    pub fn deliver(&self, channel: &str, frame: &Frame) -> usize {
        let shard = self.shard(channel).read();
        let Some(subscribers) = shard.get(channel) else { return 0 };
        let mut queued = 0;
        let mut slow = 0;
        for outbox in subscribers.values() {
            match outbox.push(frame.clone()) {
                Push::Queued => queued += 1,
                Push::SlowConsumer => slow += 1,
                Push::Gone => {}
            }
        }
        drop(shard);
        self.metrics.messages_delivered.inc_by(queued);
        if slow > 0 {
            self.metrics.messages_dropped.with_label_values(&["slow_consumer"]).inc_by(slow);
        }
        queued as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::outbox::CloseSwitch;
    use gateway_protocol::CloseCode;
    use std::sync::Arc;

    fn outbox(capacity: usize) -> (Outbox, crate::connection::outbox::Inbox) {
        Outbox::new(capacity, Arc::new(CloseSwitch::default()))
    }

    #[test]
    fn first_and_last_subscriber_are_reported() {
        let hub = Hub::new(Metrics::new("t"));
        let c = ChannelName::new("a").expect("valid");
        let (o1, _r1) = outbox(4);
        let (o2, _r2) = outbox(4);
        assert!(hub.add(&c, 1, o1));
        assert!(!hub.add(&c, 2, o2));
        assert!(!hub.remove("a", 1));
        assert!(!hub.remove("a", 1), "removing twice is a no-op");
        assert!(hub.remove("a", 2));
        assert!(!hub.has_subscribers("a") && hub.channels().is_empty());
    }

    #[test]
    fn a_full_queue_closes_the_slow_subscriber_only() {
        let hub = Hub::new(Metrics::new("t"));
        let c = ChannelName::new("a").expect("valid");
        let (slow, _slow_rx) = outbox(1);
        let (fast, fast_rx) = outbox(8);
        let slow_switch = slow.switch().clone();
        hub.add(&c, 1, slow);
        hub.add(&c, 2, fast);
        let frame = Frame::text("x");
        assert_eq!(hub.deliver("a", &frame), 2);
        assert_eq!(hub.deliver("a", &frame), 1);
        assert_eq!(slow_switch.reason(), Some(CloseCode::SlowConsumer));
        let mut batch = std::collections::VecDeque::new();
        fast_rx.drain_into(&mut batch);
        assert_eq!(batch.iter().map(Frame::payload).collect::<Vec<_>>(), [b"x", b"x"]);
    }
}
