//! Every live socket of the node, by its close switch, so that shutdown can close them all.
//!
//! A socket could instead wait on the node's shutdown token in its loop, but that token's
//! waiter list sits behind one mutex that every socket's task would take on every wake-up (see
//! [`super::outbox`]). Instead the node closes each socket's own switch once, at shutdown. The
//! roster is sharded by connection id, so connects and disconnects rarely meet on a lock.

use super::outbox::{CloseSwitch, ConnId};
use gateway_protocol::CloseCode;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const SHARDS: usize = 64;

/// One shard: its sockets by id.
type Shard = Mutex<HashMap<ConnId, Arc<CloseSwitch>>>;

/// The node's live sockets.
#[derive(Debug)]
pub struct Roster {
    shards: Box<[Shard]>,
    closing: AtomicBool,
}

impl Default for Roster {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Mutex::default()).collect(), closing: AtomicBool::new(false) }
    }
}

impl Roster {
    fn shard(&self, conn: ConnId) -> &Shard {
        &self.shards[(conn % SHARDS as u64) as usize]
    }

    /// Adds a socket. One added after [`Roster::close_all`] is closed at once, with 1001.
    pub fn add(&self, conn: ConnId, switch: Arc<CloseSwitch>) {
        self.shard(conn).lock().insert(conn, switch.clone());
        // `close_all` sets the flag before it walks the shards: either it finds this socket in
        // its shard, or this read sees the flag.
        if self.closing.load(Ordering::Acquire) {
            switch.close(CloseCode::GoingAway);
        }
    }

    /// Removes a socket (it is closing).
    pub fn remove(&self, conn: ConnId) {
        self.shard(conn).lock().remove(&conn);
    }

    /// Asks every socket, present and future, to close with 1001 "going away". Each one flushes
    /// what it has queued first (see [`super::run`]).
    pub fn close_all(&self) {
        self.closing.store(true, Ordering::Release);
        for shard in self.shards.iter() {
            let switches: Vec<_> = shard.lock().values().cloned().collect();
            for switch in switches {
                switch.close(CloseCode::GoingAway);
            }
        }
    }

    /// Number of live sockets.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no socket is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_all_reaches_present_and_later_sockets_but_not_departed_ones() {
        let roster = Roster::default();
        let (early, gone, late) =
            (Arc::new(CloseSwitch::default()), Arc::new(CloseSwitch::default()), Arc::new(CloseSwitch::default()));
        roster.add(1, early.clone());
        roster.add(2, gone.clone());
        roster.remove(2);
        roster.close_all();
        roster.add(3, late.clone());
        assert_eq!(early.reason(), Some(CloseCode::GoingAway));
        assert_eq!(gone.reason(), None);
        assert_eq!(late.reason(), Some(CloseCode::GoingAway));
        assert_eq!(roster.len(), 2);
    }
}
