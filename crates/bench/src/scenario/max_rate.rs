//! `max-rate`: the highest publish rate that holds loss <= a bound and p99 <= a bound, found by
//! bisection ([`crate::bisect`]) between `--low` and `--high`; every probe is a short, fresh
//! fan-out run (new connections, distinct publisher ids, a cooldown before it).

use super::fanout::{self, FanoutParams, FanoutReport};
use super::{Ctx, Meta, RunError};
use crate::bisect::{Bisection, Outcome, Phase};
use crate::cli::MaxRateArgs;
use crate::stats::round3;
use serde::Serialize;
use std::time::Duration;

/// One probe, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// Publish rate probed, messages per second.
    pub rate: f64,
    /// Which phase of the search asked for it.
    pub phase: Phase,
    /// Whether it held every bound.
    pub passed: bool,
    /// The bounds it broke.
    pub failed_because: Vec<String>,
    /// Messages sent / asked for.
    pub sent: u64,
    /// Messages asked for.
    pub target: u64,
    /// Deliveries per second.
    pub delivered_per_s: f64,
    /// Loss, percent.
    pub loss_pct: f64,
    /// Reordered deliveries.
    pub reordered: u64,
    /// Subscribers dropped.
    pub subscriber_disconnects: u64,
    /// Latency p50, µs.
    pub p50_us: u64,
    /// Latency p99, µs.
    pub p99_us: u64,
    /// Latency max, µs.
    pub max_us: u64,
    /// Publish errors.
    pub publish_errors: u64,
    /// Server CPU µs per delivery (with `--server-pid`).
    pub server_cpu_per_delivery_us: Option<f64>,
    /// Load-generator cores busy.
    pub bench_cores: f64,
}

/// The bounds of a passing probe, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct MaxRateOpts {
    /// Subscribers.
    pub subscribers: usize,
    /// Publishers.
    pub publishers: usize,
    /// Payload bytes.
    pub payload: usize,
    /// Search interval, messages per second.
    pub low: f64,
    /// Search interval, messages per second.
    pub high: f64,
    /// Resolution, messages per second.
    pub resolution: f64,
    /// Publishing seconds per probe.
    pub probe_duration_s: f64,
    /// Loss bound, percent.
    pub loss_bound_pct: f64,
    /// p99 bound, milliseconds.
    pub p99_bound_ms: f64,
    /// Smallest sent / target ratio.
    pub min_send_ratio: f64,
}

/// The JSON summary of a `max-rate` run.
#[derive(Debug, Clone, Serialize)]
pub struct MaxRateReport {
    /// Header.
    #[serde(flatten)]
    pub meta: Meta,
    /// Options.
    pub opts: MaxRateOpts,
    /// Highest passing publish rate, messages per second (`null`: even `--low` failed).
    pub max_rate: Option<f64>,
    /// `max_rate` × subscribers: deliveries per second asked for at that rate.
    pub max_deliveries_per_s: Option<f64>,
    /// Deliveries per second measured in the best passing probe.
    pub best_measured_delivered_per_s: Option<f64>,
    /// How the search ended.
    pub search: Outcome,
    /// Every probe, in order.
    pub probes: Vec<Probe>,
    /// The full report of the best passing probe.
    pub best: Option<Box<FanoutReport>>,
}

/// Judges a probe against the bounds; returns the bounds it broke.
pub fn judge(r: &FanoutReport, a: &MaxRateArgs) -> Vec<String> {
    let mut why = Vec::new();
    let d = &r.delivery;
    if r.connect.failed > 0 {
        why.push(format!("{} subscribers failed to connect", r.connect.failed));
    }
    if d.loss_pct > a.loss_bound_pct {
        why.push(format!("loss {:.3}% > {}%", d.loss_pct, a.loss_bound_pct));
    }
    let p99_ms = d.latency_us.p99 as f64 / 1000.0;
    if p99_ms > a.p99_bound_ms {
        why.push(format!("p99 {p99_ms:.1} ms > {} ms", a.p99_bound_ms));
    }
    if d.reordered > 0 {
        why.push(format!("{} reordered", d.reordered));
    }
    if d.subscriber_disconnects > 0 {
        why.push(format!("{} subscribers dropped", d.subscriber_disconnects));
    }
    if r.publish.errors > 0 {
        why.push(format!("{} publish errors", r.publish.errors));
    }
    let target = r.publish.target.max(1) as f64;
    if (r.publish.sent as f64) < a.min_send_ratio * target {
        why.push(format!("sent {} of {} (server pushed back)", r.publish.sent, r.publish.target));
    }
    why
}

/// Runs `max-rate`.
pub async fn run(ctx: &Ctx, a: &MaxRateArgs) -> Result<MaxRateReport, RunError> {
    let meta = ctx.meta("max-rate");
    let mut search = Bisection::new(a.low, a.high, a.resolution, a.max_probes);
    let mut probes = Vec::new();
    let mut best: Option<Box<FanoutReport>> = None;
    let mut probe_no = 0u32;
    while let Some(rate) = search.next_rate() {
        let phase = search.phase();
        if probe_no > 0 && a.cooldown > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(a.cooldown)).await;
        }
        let (lo, hi) = search.interval();
        tracing::info!(probe = probe_no + 1, rate = round3(rate), lo = round3(lo), hi = round3(hi), "max-rate probe");
        let base = 1 + probe_no * u32::try_from(a.load.publishers).unwrap_or(1000);
        probe_no += 1;
        let mut params = FanoutParams::new(&a.load, rate, a.probe_duration, base);
        // A message still missing this long after sending stopped is far beyond the p99 bound:
        // waiting longer cannot turn a failing probe into a passing one.
        params.drain_max_s = params.drain_max_s.min(params.drain_idle_s.max(2.0 + 10.0 * a.p99_bound_ms / 1000.0));
        let report = fanout::run(ctx, params, "max-rate-probe").await?;
        let why = judge(&report, a);
        let passed = why.is_empty();
        tracing::info!(
            rate = round3(rate),
            passed,
            delivered_per_s = report.delivery.delivered_per_s,
            loss_pct = report.delivery.loss_pct,
            p99_us = report.delivery.latency_us.p99,
            why = ?why,
            "probe done"
        );
        probes.push(Probe {
            rate: round3(rate),
            phase,
            passed,
            failed_because: why,
            sent: report.publish.sent,
            target: report.publish.target,
            delivered_per_s: report.delivery.delivered_per_s,
            loss_pct: report.delivery.loss_pct,
            reordered: report.delivery.reordered,
            subscriber_disconnects: report.delivery.subscriber_disconnects,
            p50_us: report.delivery.latency_us.p50,
            p99_us: report.delivery.latency_us.p99,
            max_us: report.delivery.latency_us.max,
            publish_errors: report.publish.errors,
            server_cpu_per_delivery_us: report.server_cpu_per_delivery_us,
            bench_cores: round3(report.cpu.bench_cores),
        });
        search.record(passed);
        if passed && best.as_ref().is_none_or(|b| b.opts.rate < rate) {
            best = Some(Box::new(report));
        }
    }
    let outcome = search.outcome();
    let max_rate = outcome.best.map(round3);
    Ok(MaxRateReport {
        meta,
        opts: MaxRateOpts {
            subscribers: a.load.subscribers,
            publishers: a.load.publishers,
            payload: a.load.payload,
            low: a.low,
            high: a.high,
            resolution: a.resolution,
            probe_duration_s: a.probe_duration,
            loss_bound_pct: a.loss_bound_pct,
            p99_bound_ms: a.p99_bound_ms,
            min_send_ratio: a.min_send_ratio,
        },
        max_deliveries_per_s: max_rate.map(|r| round3(r * a.load.subscribers as f64)),
        best_measured_delivered_per_s: best.as_ref().map(|b| b.delivery.delivered_per_s),
        max_rate,
        search: outcome,
        probes,
        best,
    })
}
