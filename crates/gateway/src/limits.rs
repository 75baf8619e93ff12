//! Connection limits: sockets per node and per client IP, and the client-IP rule behind them.
//!
//! A [`ConnectionSlot`] is taken before the upgrade and released when the socket ends (on drop),
//! so the counts cannot drift.

use crate::config::Config;
use http::HeaderMap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The node holds `--max-connections` sockets.
    #[error("this node is at its connection limit")]
    NodeFull,
    /// This client IP holds `--max-connections-per-ip` sockets.
    #[error("too many connections from this address")]
    IpFull,
}

impl LimitError {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::NodeFull => "connections",
            Self::IpFull => "connections_per_ip",
        }
    }
}

struct Counts {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Counts sockets per node and per client IP.
#[derive(Clone)]
pub struct ConnectionLimits(Arc<Counts>);

/// A held place under the limits; dropping it gives the place back.
pub struct ConnectionSlot {
    counts: Arc<Counts>,
    ip: IpAddr,
}

impl ConnectionLimits {
    /// Limits from `--max-connections` and `--max-connections-per-ip`.
    pub fn new(config: &Config) -> Self {
        Self(Arc::new(Counts {
            max_total: config.max_connections,
            max_per_ip: config.max_connections_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        }))
    }

    /// Takes a place for a socket from `ip`, or says which limit is reached.
    pub fn acquire(&self, ip: IpAddr) -> Result<ConnectionSlot, LimitError> {
        let counts = &self.0;
        if counts.total.fetch_add(1, Ordering::AcqRel) >= counts.max_total {
            counts.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::NodeFull);
        }
        let mut per_ip = counts.per_ip.lock();
        let held = per_ip.entry(ip).or_insert(0);
        if *held >= counts.max_per_ip {
            drop(per_ip);
            counts.total.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::IpFull);
        }
        *held += 1;
        Ok(ConnectionSlot { counts: counts.clone(), ip })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per_ip = self.counts.per_ip.lock();
        if let Some(held) = per_ip.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                per_ip.remove(&self.ip);
            }
        }
        drop(per_ip);
        self.counts.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client's IP: the TCP peer, or, when the peer is a trusted proxy, the right-most address
/// of `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(config: &Config, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    // A node listening on `[::]` sees IPv4 peers as IPv4-mapped IPv6 addresses.
    let peer = peer.to_canonical();
    if !config.is_trusted_proxy(peer) {
        return peer;
    }
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|a| a.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()))
        .collect::<Vec<_>>();
    // From the nearest hop outwards: the first address not of a trusted proxy is the client.
    // An entry that is not an address stops the walk at the last hop we could trust.
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        match hop {
            Ok(ip) if config.is_trusted_proxy(ip) => client = ip,
            Ok(ip) => return ip,
            Err(_) => break,
        }
    }
    client
}

/// A token bucket: `rate` tokens per second, up to `burst`. A refused frame still costs a
/// token: the bucket goes into debt, which the refill pays back, so a client that keeps sending
/// faster than `rate` while refused runs its debt up, however its frames are spaced. A debt of
/// more than `strikes` frames, or of one second of `rate` if that is more, is sustained abuse:
/// a client sending at up to twice `rate` has at least a second to notice its refusals and slow
/// down.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: tokio::time::Instant,
    max_debt: f64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, strikes: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: tokio::time::Instant::now(),
            max_debt: f64::from(strikes.max(rate)),
        }
    }

    /// Takes a token. `Err(false)` for a refusal, `Err(true)` once the refusals not yet paid
    /// back by the refill exceed the allowed debt (sustained abuse).
    pub fn take(&mut self) -> Result<(), bool> {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        let granted = self.tokens >= 1.0;
        self.tokens -= 1.0;
        if granted { Ok(()) } else { Err(self.tokens < -self.max_debt) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::from_args(args.iter().copied()).expect("valid args")
    }

    #[test]
    fn per_ip_and_total_limits_release_on_drop() {
        let limits = ConnectionLimits::new(&config(&["--max-connections", "3", "--max-connections-per-ip", "2"]));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let s1 = limits.acquire(a).expect("first");
        let _s2 = limits.acquire(a).expect("second");
        assert_eq!(limits.acquire(a).err(), Some(LimitError::IpFull));
        let _s3 = limits.acquire(b).expect("other ip");
        assert_eq!(limits.acquire(b).err(), Some(LimitError::NodeFull));
        drop(s1);
        assert!(limits.acquire(a).is_ok());
    }

    #[test]
    fn forwarded_for_is_honoured_only_from_trusted_proxies() {
        let c = config(&["--trusted-proxies", "127.0.0.1"]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 127.0.0.1".parse().expect("header"));
        assert_eq!(client_ip(&c, "127.0.0.1".parse().expect("ip"), &h), "1.2.3.4".parse::<IpAddr>().expect("ip"));
        assert_eq!(client_ip(&c, "9.9.9.9".parse().expect("ip"), &h), "9.9.9.9".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn forwarded_for_stops_at_garbage_and_unmaps_ipv4() {
        let c = config(&["--trusted-proxies", "127.0.0.1,10.0.0.0/8"]);
        let proxy: IpAddr = "127.0.0.1".parse().expect("ip");
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", value.parse().expect("header"));
            client_ip(&c, proxy, &h)
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        // A hop that is not an address: whatever stands left of it was not vouched for.
        assert_eq!(with("6.6.6.6, unknown, 10.0.0.7"), ip("10.0.0.7"));
        assert_eq!(with("6.6.6.6, unknown"), proxy);
        // An IPv4-mapped IPv6 address is the IPv4 client it maps.
        assert_eq!(with("::ffff:1.2.3.4"), ip("1.2.3.4"));
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_refuses_then_strikes_out() {
        let mut bucket = TokenBucket::new(1, 2, 3);
        assert!(bucket.take().is_ok() && bucket.take().is_ok());
        assert_eq!(bucket.take(), Err(false));
        assert_eq!(bucket.take(), Err(false));
        assert_eq!(bucket.take(), Err(false));
        assert_eq!(bucket.take(), Err(true));
        // At 100 a second the allowed debt is one second of the rate, not three frames.
        let mut fast = TokenBucket::new(100, 1, 3);
        assert!(fast.take().is_ok());
        for _ in 0..100 {
            assert_eq!(fast.take(), Err(false));
        }
        assert_eq!(fast.take(), Err(true));
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_run_up_a_debt_that_the_refill_pays_back() {
        // Ten a second, so the allowed debt is ten frames (one second of the rate).
        let mut bucket = TokenBucket::new(10, 1, 3);
        assert!(bucket.take().is_ok());
        // Three frames per token, spaced by the refill: a token comes back between every few
        // refusals, yet the debt grows by two a round until it passes ten.
        let mut rounds = 0;
        let abused = loop {
            rounds += 1;
            tokio::time::advance(std::time::Duration::from_millis(100)).await;
            let takes = [bucket.take(), bucket.take(), bucket.take()];
            if takes.contains(&Err(true)) {
                break true;
            }
            if rounds == 100 {
                break false;
            }
        };
        assert!(abused && rounds <= 6, "closed after {rounds} rounds");
        // A client that stops while in debt is served again once the refill has paid it back.
        let mut bucket = TokenBucket::new(10, 1, 3);
        assert!(bucket.take().is_ok());
        assert_eq!((bucket.take(), bucket.take()), (Err(false), Err(false)));
        tokio::time::advance(std::time::Duration::from_millis(250)).await;
        assert_eq!(bucket.take(), Err(false), "the debt of two is not yet paid");
        tokio::time::advance(std::time::Duration::from_millis(200)).await;
        assert_eq!(bucket.take(), Ok(()));
    }
}
