//! `churn`: C workers, each repeating connect → subscribe → close as fast as it can for T
//! seconds, through the typed client ([`gateway_client::Client`]): what a reconnect storm costs.

use super::{Ctx, Meta};
use crate::cli::ChurnArgs;
use crate::progress::{Progress, si};
use crate::stats::{Percentiles, Tally, latency_histogram, record, round3};
use crate::sys::{CpuReport, CpuWatch};
use gateway_client::{Client, ClientConfig, ClientError};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The options of the run, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnOpts {
    /// Concurrent workers.
    pub workers: usize,
    /// Seconds.
    pub duration_s: f64,
    /// Cycle budget.
    pub max_cycles: u64,
    /// Per-cycle timeout, seconds.
    pub cycle_timeout_s: f64,
}

/// The JSON summary of a `churn` run.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    /// Header.
    #[serde(flatten)]
    pub meta: Meta,
    /// Options.
    pub opts: ChurnOpts,
    /// Cycles completed (connect, subscribe and close all succeeded).
    pub cycles: u64,
    /// Cycles that failed at some step.
    pub failed: u64,
    /// `cycles` per second.
    pub cycles_per_s: f64,
    /// Failures by step and kind.
    pub errors: Tally,
    /// Dial → WebSocket open, µs.
    pub connect_us: Percentiles,
    /// `subscribe` → `ok`, µs.
    pub subscribe_us: Percentiles,
    /// Close handshake, µs.
    pub close_us: Percentiles,
    /// Whole cycle, µs.
    pub cycle_us: Percentiles,
    /// CPU over the run.
    pub cpu: CpuReport,
    /// Server CPU µs per completed cycle (with `--server-pid`).
    pub server_cpu_per_cycle_us: Option<f64>,
}

#[derive(Debug)]
struct Shared {
    cycles: AtomicU64,
    failed: AtomicU64,
    started: AtomicU64,
    errors: Mutex<Tally>,
    hist: Mutex<[Histogram<u64>; 4]>,
}

fn error_label(step: &str, e: &ClientError) -> String {
    match e {
        ClientError::Connect(inner) => format!("{step}: {}", short_io(&inner.to_string())),
        ClientError::Rejected { status, .. } => format!("{step}: http {status}"),
        ClientError::Server { code, .. } => format!("{step}: {code}"),
        ClientError::Closed(info) => format!("{step}: closed {:?}", info.code),
        ClientError::Protocol(_) => format!("{step}: protocol"),
    }
}

fn short_io(s: &str) -> String {
    // Keep tallies small: drop "(os error N)" details and addresses.
    s.split(" (os error").next().unwrap_or(s).chars().take(60).collect()
}

/// Runs `churn`.
pub async fn run(ctx: &Ctx, a: &ChurnArgs) -> ChurnReport {
    let meta = ctx.meta("churn");
    let sh = Arc::new(Shared {
        cycles: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        started: AtomicU64::new(0),
        errors: Mutex::new(Tally::default()),
        hist: Mutex::new([latency_histogram(), latency_histogram(), latency_histogram(), latency_histogram()]),
    });
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(a.duration);
    let cpu = CpuWatch::start(&ctx.common.server_pids, ctx.common.redis_pid);
    let progress = {
        let sh = Arc::clone(&sh);
        let mut last = (Instant::now(), 0u64);
        Progress::start(ctx.progress, Duration::from_secs(1), move || {
            let now = Instant::now();
            let c = sh.cycles.load(Relaxed);
            let rate = (c - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-9);
            last = (now, c);
            format!(
                "churn {:>5.1}s | cycles {} ({}/s) | failed {}",
                t0.elapsed().as_secs_f64(),
                si(c as f64),
                si(rate),
                sh.failed.load(Relaxed)
            )
        })
    };
    let mut tasks = Vec::with_capacity(a.workers);
    for w in 0..a.workers {
        let sh = Arc::clone(&sh);
        let urls: Vec<String> = ctx.targets.iter().map(|t| t.target.url.clone()).collect();
        let channel = format!("{}-{w}", a.channel_prefix);
        let max_cycles = a.max_cycles;
        let cycle_timeout = Duration::from_secs_f64(a.cycle_timeout);
        tasks.push(tokio::spawn(async move {
            let mut k = w;
            while Instant::now() < deadline && sh.started.fetch_add(1, Relaxed) < max_cycles {
                let url = &urls[k % urls.len()];
                k += 1;
                match tokio::time::timeout(cycle_timeout, cycle(url, &channel)).await {
                    Ok(Ok(times)) => {
                        sh.cycles.fetch_add(1, Relaxed);
                        let mut h = sh.hist.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        for (hist, t) in h.iter_mut().zip(times) {
                            record(hist, u64::try_from(t.as_micros()).unwrap_or(u64::MAX));
                        }
                    }
                    Ok(Err(label)) => {
                        sh.failed.fetch_add(1, Relaxed);
                        sh.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).add(label, 1);
                    }
                    Err(_) => {
                        sh.failed.fetch_add(1, Relaxed);
                        sh.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).add("cycle timeout", 1);
                    }
                }
            }
        }));
    }
    let bound = Duration::from_secs_f64(a.duration + a.cycle_timeout + 5.0);
    super::fanout::join_all(tasks, bound).await;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    progress.finish();
    let cycles = sh.cycles.load(Relaxed);
    let h = sh.hist.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    ChurnReport {
        meta,
        opts: ChurnOpts {
            workers: a.workers,
            duration_s: a.duration,
            max_cycles: a.max_cycles,
            cycle_timeout_s: a.cycle_timeout,
        },
        cycles,
        failed: sh.failed.load(Relaxed),
        cycles_per_s: round3(cycles as f64 / wall.max(1e-9)),
        errors: sh.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
        connect_us: Percentiles::of(&h[0]),
        subscribe_us: Percentiles::of(&h[1]),
        close_us: Percentiles::of(&h[2]),
        cycle_us: Percentiles::of(&h[3]),
        server_cpu_per_cycle_us: cpu.server_cpu_s.filter(|_| cycles > 0).map(|s| round3(s * 1e6 / cycles as f64)),
        cpu,
    }
}

/// One connect → subscribe → close; the four durations (connect, subscribe, close, total).
async fn cycle(url: &str, channel: &str) -> Result<[Duration; 4], String> {
    let config = ClientConfig {
        read_buffer_size: 4096,
        queue: 16,
        commands: 16,
        close_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    let t0 = Instant::now();
    let client = Client::connect_with_config(url, config).await.map_err(|e| error_label("connect", &e))?;
    let t1 = Instant::now();
    let sub = client.subscribe(channel).await.map_err(|e| error_label("subscribe", &e))?;
    let t2 = Instant::now();
    drop(sub);
    let info = client.close().await;
    let t3 = Instant::now();
    if info.code.is_some_and(|c| c != 1000) {
        return Err(format!("close: code {}", info.code.unwrap_or_default()));
    }
    Ok([t1 - t0, t2 - t1, t3 - t2, t3 - t0])
}
