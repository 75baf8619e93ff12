//! The scenarios and what they share: the run context, the connect phase, the report header.

pub mod churn;
pub mod fanout;
pub mod idle;
pub mod max_rate;

use crate::cli::Common;
use crate::progress::Progress;
use crate::stats::{Percentiles, Tally, latency_histogram, record};
use crate::target::Resolved;
use crate::ws::{self, SetupError, WsConn};
use futures_util::StreamExt;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Everything a scenario needs besides its own options.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The nodes, resolved.
    pub targets: Vec<Resolved>,
    /// Shared options.
    pub common: Common,
    /// Runtime threads (reported).
    pub threads: usize,
    /// Whether to show the progress line.
    pub progress: bool,
}

/// The header of every JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    /// `fanout`, `idle`, `churn` or `max-rate`.
    pub scenario: &'static str,
    /// `--label`.
    pub label: Option<String>,
    /// The tool's version.
    pub version: &'static str,
    /// Start of the run, seconds since the Unix epoch.
    pub unix_time: u64,
    /// The node URLs.
    pub urls: Vec<String>,
    /// Runtime threads of the load generator.
    pub threads: usize,
}

impl Ctx {
    /// The report header for `scenario`, stamped now.
    pub fn meta(&self, scenario: &'static str) -> Meta {
        Meta {
            scenario,
            label: self.common.label.clone(),
            version: env!("CARGO_PKG_VERSION"),
            unix_time: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            urls: self.targets.iter().map(|t| t.target.url.clone()).collect(),
            threads: self.threads,
        }
    }
}

/// How the connect phase went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectReport {
    /// Connections asked for.
    pub requested: usize,
    /// Connections open (and subscribed, where the scenario subscribes).
    pub connected: usize,
    /// Connections that failed.
    pub failed: usize,
    /// Failures by kind (`http 503`, `timeout`, `refused: rate_limited`, ...).
    pub errors: Tally,
    /// Time from dial to subscribed, per connection, µs.
    pub time_us: Percentiles,
    /// Connections opened per second over the phase.
    pub rate_per_s: f64,
    /// Length of the phase, seconds.
    pub wall_s: f64,
}

/// A masking-key seed for connection `i`.
pub fn seed(i: usize) -> u64 {
    (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ crate::sys::now_ns()
}

/// Opens `n` connections, connection `i` to `targets[(i + offset) % len]`, subscribing each to
/// `channel(i)` when that is `Some`. At most `--connect-concurrency` at a time, each within
/// `--connect-timeout`, the whole phase within `--connect-phase-timeout`.
pub async fn connect_many<F>(
    ctx: &Ctx,
    what: &'static str,
    n: usize,
    offset: usize,
    read_buffer: usize,
    channel: F,
) -> (Vec<(usize, WsConn)>, ConnectReport)
where
    F: Fn(usize) -> Option<String>,
{
    let t0 = Instant::now();
    let per_conn = Duration::from_secs_f64(ctx.common.connect_timeout);
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(ctx.common.connect_phase_timeout);
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let progress = {
        let (ok, bad) = (Arc::clone(&ok), Arc::clone(&bad));
        Progress::start(ctx.progress, Duration::from_secs(1), move || {
            format!("{what}: {}/{n} open, {} failed", ok.load(Relaxed), bad.load(Relaxed))
        })
    };
    let targets = &ctx.targets;
    let channel = &channel;
    let mut pending = futures_util::stream::iter(0..n)
        .map(|i| {
            let target = &targets[(i + offset) % targets.len()];
            async move {
                let started = Instant::now();
                let r = tokio::time::timeout(per_conn, async {
                    let mut c = ws::connect(target, read_buffer, seed(i)).await?;
                    if let Some(ch) = channel(i) {
                        c.subscribe(&ch, 1).await?;
                    }
                    Ok::<_, SetupError>(c)
                })
                .await;
                (i, started.elapsed(), r)
            }
        })
        .buffer_unordered(ctx.common.connect_concurrency);
    let mut conns = Vec::with_capacity(n);
    let mut errors = Tally::default();
    let mut hist = latency_histogram();
    loop {
        match tokio::time::timeout_at(deadline, pending.next()).await {
            Ok(Some((i, took, Ok(Ok(c))))) => {
                record(&mut hist, u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                conns.push((i, c));
                ok.fetch_add(1, Relaxed);
            }
            Ok(Some((_, _, Ok(Err(e))))) => {
                tracing::debug!(error = %e, "connection failed");
                errors.add(e.label(), 1);
                bad.fetch_add(1, Relaxed);
            }
            Ok(Some((_, _, Err(_)))) => {
                errors.add("timeout", 1);
                bad.fetch_add(1, Relaxed);
            }
            Ok(None) => break,
            Err(_) => {
                let left = n - conns.len() - usize::try_from(errors.total()).unwrap_or(n);
                errors.add("connect phase timeout", left as u64);
                break;
            }
        }
    }
    drop(pending);
    progress.finish();
    let wall_s = t0.elapsed().as_secs_f64();
    let failed = usize::try_from(errors.total()).unwrap_or(usize::MAX);
    if failed > 0 {
        tracing::warn!(what, failed, errors = ?errors.0, "some connections failed");
    }
    let report = ConnectReport {
        requested: n,
        connected: conns.len(),
        failed,
        errors,
        time_us: Percentiles::of(&hist),
        rate_per_s: conns.len() as f64 / wall_s.max(1e-9),
        wall_s,
    };
    (conns, report)
}

/// Why a run could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A publisher could not connect.
    #[error("publisher {0} could not connect: {1}")]
    Publisher(usize, String),
    /// No subscriber could connect.
    #[error("no connection could be opened ({0})")]
    NoConnections(String),
}
