//! Latency histograms, their JSON summary, and tallies of errors by label.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;

/// Highest value a latency histogram tracks (µs): 10 minutes. Larger values are clamped.
pub const MAX_TRACKED_US: u64 = 600_000_000;

/// A latency histogram in microseconds, 3 significant figures.
pub fn latency_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, MAX_TRACKED_US, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds are valid: {e}"),
    }
}

/// Percentiles of a latency histogram.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Percentiles {
    /// Summarises `h` (all zeros when empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Records `us` (clamped to the histogram's range).
#[inline]
pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_TRACKED_US));
}

/// Counts by label (error kinds, close codes), sorted by label in the JSON.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Tally(pub BTreeMap<String, u64>);

impl Tally {
    /// Adds `n` to `label`.
    pub fn add(&mut self, label: impl Into<String>, n: u64) {
        *self.0.entry(label.into()).or_insert(0) += n;
    }

    /// Sum over every label.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Merges another tally into this one.
    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.0 {
            self.add(k.clone(), *v);
        }
    }
}

/// Rounds to 3 decimals (keeps the JSON readable).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
