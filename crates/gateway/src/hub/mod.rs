//! Local routing: which sockets of this node listen to which channel.
//!
//! The map is split into shards, each behind its own read-write lock, so unrelated channels never
//! contend and delivery only takes a read lock. Each channel with a local subscriber has a
//! [`Feed`]: [`Hub::deliver`] appends the shared frame to it once, whatever the number of
//! subscribers, and each subscriber's socket reads the feed from its own position when it
//! writes. Every so often a delivery also looks at how far behind each subscriber is: one that
//! falls half a queue behind is asked to write at once, one that falls a whole queue behind is
//! closed as a slow consumer.

pub mod feed;

use crate::connection::outbox::{CloseSwitch, ConnId, Frame};
use crate::metrics::Metrics;
use feed::{Feed, Reader, Subscriber};
use gateway_protocol::{ChannelName, CloseCode};
use indexmap::IndexMap;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

const SHARDS: usize = 64;

/// One channel's feed and its local subscribers.
struct Channel {
    feed: Arc<Feed>,
    subscribers: IndexMap<ConnId, Arc<Subscriber>>,
}

/// Channel -> local subscribers, sharded by channel name.
pub struct Hub {
    shards: Box<[RwLock<HashMap<ChannelName, Channel>>]>,
    hasher: RandomState,
    metrics: Metrics,
    /// How many messages a subscriber may fall behind before it is closed as a slow consumer.
    queue_size: u64,
    /// Every this many messages of a channel, a delivery checks how far behind its subscribers are.
    check_every: u64,
}

impl Hub {
    /// An empty hub reporting to `metrics`, closing subscribers that fall more than
    /// `queue_size` messages behind on a channel.
    pub fn new(metrics: Metrics, queue_size: usize) -> Self {
        let queue_size = queue_size.max(1) as u64;
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            metrics,
            queue_size,
            check_every: (queue_size / 8).clamp(1, 64),
        }
    }

    /// The stripe (0..64) a channel belongs to; callers use it to serialise per channel.
    pub fn stripe(&self, channel: &str) -> usize {
        (self.hasher.hash_one(channel) as usize) % SHARDS
    }

    fn shard(&self, channel: &str) -> &RwLock<HashMap<ChannelName, Channel>> {
        &self.shards[self.stripe(channel)]
    }

    /// Adds a subscriber; returns its reader of the channel, positioned after every message
    /// delivered so far, and whether it is the channel's first local subscriber.
    pub fn add(&self, channel: &ChannelName, conn: ConnId, switch: Arc<CloseSwitch>) -> (Reader, bool) {
        let mut shard = self.shard(channel.as_str()).write();
        let entry = shard
            .entry(channel.clone())
            .or_insert_with(|| Channel { feed: Arc::new(Feed::new()), subscribers: IndexMap::new() });
        let first = entry.subscribers.is_empty();
        let reader = entry.feed.reader(switch);
        entry.subscribers.insert(conn, reader.subscriber().clone());
        if first {
            self.metrics.channels.inc();
        }
        (reader, first)
    }

    /// Removes a subscriber; returns true when the channel has no local subscriber left.
    pub fn remove(&self, channel: &str, conn: ConnId) -> bool {
        let mut shard = self.shard(channel).write();
        let Some(entry) = shard.get_mut(channel) else { return false };
        if entry.subscribers.swap_remove(&conn).is_none() {
            return false;
        }
        if entry.subscribers.is_empty() {
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
        self.shard(channel).read().get(channel).map_or(0, |entry| entry.subscribers.len())
    }

    /// Delivers `frame` to every local subscriber of `channel`; returns how many there are.
    /// Never waits. Deliveries to one channel must come one at a time, in the channel's order.
    pub fn deliver(&self, channel: &str, frame: &Frame) -> usize {
        let shard = self.shard(channel).read();
        let Some(entry) = shard.get(channel) else { return 0 };
        let seq = entry.feed.append(frame);
        let subscribers = entry.subscribers.len();
        let (mut slow, mut lost) = (0, 0);
        if (seq + 1) % self.check_every == 0 {
            for subscriber in entry.subscribers.values() {
                let behind = subscriber.behind(&entry.feed);
                if behind > self.queue_size {
                    if subscriber.switch().close(CloseCode::SlowConsumer) {
                        slow += 1;
                        lost += behind;
                    }
                } else if behind >= self.queue_size.div_ceil(2) {
                    subscriber.switch().urge();
                }
            }
        }
        drop(shard);
        self.metrics.messages_delivered.inc_by(subscribers as u64);
        if slow > 0 {
            tracing::debug!(channel, slow, "subscribers closed as slow consumers");
            self.metrics.messages_dropped.with_label_values(&["slow_consumer"]).inc_by(lost);
        }
        subscribers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn first_and_last_subscriber_are_reported() {
        let hub = Hub::new(Metrics::new("t"), 4);
        let c = ChannelName::new("a").expect("valid");
        assert!(hub.add(&c, 1, Arc::default()).1);
        assert!(!hub.add(&c, 2, Arc::default()).1);
        assert!(!hub.remove("a", 1));
        assert!(!hub.remove("a", 1), "removing twice is a no-op");
        assert!(hub.remove("a", 2));
        assert!(!hub.has_subscribers("a") && hub.channels().is_empty());
    }

    #[test]
    fn a_subscriber_that_falls_a_queue_behind_is_closed_and_the_others_are_not() {
        let hub = Hub::new(Metrics::new("t"), 8);
        let c = ChannelName::new("a").expect("valid");
        let (slow_switch, fast_switch) = (Arc::new(CloseSwitch::default()), Arc::new(CloseSwitch::default()));
        let (_slow, _) = hub.add(&c, 1, slow_switch.clone());
        let (mut fast, _) = hub.add(&c, 2, fast_switch.clone());
        // A socket that has let go of its reader (unsubscribing) is never behind.
        let gone_switch = Arc::new(CloseSwitch::default());
        drop(hub.add(&c, 3, gone_switch.clone()).0);
        let mut batch = VecDeque::new();
        for n in 0..8 {
            assert_eq!(hub.deliver("a", &Frame::text(&n.to_string())), 3);
            fast.take_all(&mut batch);
        }
        assert_eq!(slow_switch.reason(), None, "a full queue is not yet too much");
        hub.deliver("a", &Frame::text("8"));
        fast.take_all(&mut batch);
        assert_eq!(slow_switch.reason(), Some(CloseCode::SlowConsumer));
        assert_eq!(fast_switch.reason(), None);
        assert_eq!(gone_switch.reason(), None);
        assert_eq!(batch.len(), 9);
    }
}
