//! The process's monotonic clock and CPU/memory readings from `/proc` (Linux).
//!
//! CPU time comes from `/proc/PID/stat` (`utime` + `stime`, fields 14 and 15) in clock ticks of
//! `USER_HZ`, which Linux fixes at 100 for `/proc` (what `getconf CLK_TCK` prints), so no libc
//! call is needed.

use serde::Serialize;
use std::sync::OnceLock;
use std::time::Instant;

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`; 100 on Linux).
pub const CLK_TCK: f64 = 100.0;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// The shared monotonic clock: nanoseconds since the first call in this process. Publishers and
/// subscribers live in one process, so send and receive times are directly comparable.
#[inline]
pub fn now_ns() -> u64 {
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Parses `utime + stime` (in ticks) from the text of a `/proc/PID/stat` file.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds (user + system) used so far by `pid`, or by this process when `None`.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    parse_stat_ticks(&text).map(|t| t as f64 / CLK_TCK)
}

/// Resident set size of `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A CPU-time stopwatch over this process and a set of other processes.
#[derive(Debug, Clone)]
pub struct CpuWatch {
    wall0: Instant,
    self0: f64,
    pids: Vec<(u32, Option<f64>)>,
    redis: Option<(u32, Option<f64>)>,
}

/// CPU used by one watched process over a measured window.
#[derive(Debug, Clone, Serialize)]
pub struct PidCpu {
    /// The process id.
    pub pid: u32,
    /// CPU seconds used in the window (`null` when `/proc` could not be read).
    pub cpu_s: Option<f64>,
}

/// What a [`CpuWatch`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    /// Wall-clock seconds of the window.
    pub wall_s: f64,
    /// CPU seconds the load generator itself used.
    pub bench_cpu_s: f64,
    /// `bench_cpu_s / wall_s`: 1.0 = one core busy; near 1.0 with `--threads 1`, the load
    /// generator, not the server, limits the figures.
    pub bench_cores: f64,
    /// Every `--server-pid`.
    pub servers: Vec<PidCpu>,
    /// Sum over the servers (`null` without `--server-pid`).
    pub server_cpu_s: Option<f64>,
    /// `server_cpu_s / wall_s`.
    pub server_cores: Option<f64>,
    /// CPU seconds of `--redis-pid`, when given.
    pub redis_cpu_s: Option<f64>,
}

impl CpuWatch {
    /// Starts measuring this process, the `servers` and, optionally, Redis.
    pub fn start(servers: &[u32], redis: Option<u32>) -> Self {
        Self {
            wall0: Instant::now(),
            self0: cpu_seconds(None).unwrap_or(0.0),
            pids: servers.iter().map(|&p| (p, cpu_seconds(Some(p)))).collect(),
            redis: redis.map(|p| (p, cpu_seconds(Some(p)))),
        }
    }

    /// Reads the counters again and reports the differences.
    pub fn stop(&self) -> CpuReport {
        let wall_s = self.wall0.elapsed().as_secs_f64().max(1e-9);
        let bench_cpu_s = (cpu_seconds(None).unwrap_or(0.0) - self.self0).max(0.0);
        let servers: Vec<PidCpu> = self
            .pids
            .iter()
            .map(|&(pid, before)| PidCpu {
                pid,
                cpu_s: before.zip(cpu_seconds(Some(pid))).map(|(b, a)| (a - b).max(0.0)),
            })
            .collect();
        let server_cpu_s = if servers.is_empty() { None } else { Some(servers.iter().filter_map(|s| s.cpu_s).sum()) };
        CpuReport {
            wall_s,
            bench_cpu_s,
            bench_cores: bench_cpu_s / wall_s,
            server_cores: server_cpu_s.map(|s| s / wall_s),
            servers,
            server_cpu_s,
            redis_cpu_s: self
                .redis
                .and_then(|(pid, before)| before.zip(cpu_seconds(Some(pid))).map(|(b, a)| (a - b).max(0.0))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let stat = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_stat_ticks(stat), Some(300));
    }

    #[test]
    fn reads_own_cpu() {
        assert!(cpu_seconds(None).is_some());
        assert!(rss_bytes(std::process::id()).unwrap_or(0) > 0);
    }
}
