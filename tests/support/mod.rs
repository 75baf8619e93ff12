//! Test harness: a private `redis-server` on a free port, gateway node processes, a raw
//! WebSocket and a raw HTTP client, and deadlines for every wait.
#![allow(dead_code, unused_imports, unreachable_pub)]

pub mod gateway;
pub mod http;
pub mod raw;
pub mod redis_server;

pub use gateway::{Backend, Cluster, Gateway};
pub use raw::RawSocket;
pub use redis_server::RedisServer;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long any single awaited event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Awaits `future`, failing the test with `what` if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Polls `check` every 20 ms until it returns true, failing after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A channel name no other test uses.
pub fn fresh_channel(label: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("t:{label}:{}:{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Sends a signal to a process by PID with the `kill` command.
pub fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name} {pid} failed");
}
