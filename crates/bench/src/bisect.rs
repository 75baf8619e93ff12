//! The search of `max-rate`: bisection between a low and a high rate down to a resolution.
//!
//! A pure state machine, so that it can be tested without a server: ask [`Bisection::next_rate`] for
//! the rate to probe, run the probe, report with [`Bisection::record`], repeat until `next`
//! returns `None`, then read [`Bisection::outcome`].
//!
//! Order: the low bound first (if it fails there is nothing to search), then the high bound (if
//! it passes the answer is "at least high"), then midpoints: a pass raises the lower edge, a fail
//! lowers the upper edge, until the interval is no wider than the resolution or the probe budget
//! is spent. The answer is the highest rate that passed. This assumes that pass/fail is monotonic
//! in the rate; on a noisy machine a wrong answer at one probe moves the result by at most that
//! probe's half interval.

use serde::Serialize;

/// Where the search stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Probing the low bound.
    Low,
    /// Probing the high bound.
    High,
    /// Probing midpoints.
    Bisect,
    /// Finished.
    Done,
}

/// How the search ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Interval narrowed to the resolution: the answer is within `resolution` of the true limit.
    Converged,
    /// Even the low bound failed.
    LowFailed,
    /// The high bound passed: the limit is at least `high` (raise `--high`).
    HighPassed,
    /// The probe budget ran out before the interval reached the resolution.
    Budget,
}

/// Result of a finished (or interrupted) search.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Outcome {
    /// Highest rate that passed (`None`: none did).
    pub best: Option<f64>,
    /// Lowest rate that failed (`None`: none did).
    pub lowest_failed: Option<f64>,
    /// How the search ended (`None` while still running).
    pub verdict: Option<Verdict>,
    /// Probes run.
    pub probes: usize,
}

/// Bisection state.
#[derive(Debug, Clone)]
pub struct Bisection {
    lo: f64,
    hi: f64,
    resolution: f64,
    max_probes: usize,
    probes: usize,
    phase: Phase,
    best: Option<f64>,
    lowest_failed: Option<f64>,
    verdict: Option<Verdict>,
    pending: Option<f64>,
}

impl Bisection {
    /// A search over `[low, high]` (swapped if reversed) that stops once the interval is at most
    /// `resolution` wide (at least 1e-9) or after `max_probes` probes (at least 1).
    pub fn new(low: f64, high: f64, resolution: f64, max_probes: usize) -> Self {
        let (lo, hi) = if low <= high { (low, high) } else { (high, low) };
        Self {
            lo,
            hi,
            resolution: resolution.max(1e-9),
            max_probes: max_probes.max(1),
            probes: 0,
            phase: Phase::Low,
            best: None,
            lowest_failed: None,
            verdict: None,
            pending: None,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The current interval `[lo, hi]`.
    pub fn interval(&self) -> (f64, f64) {
        (self.lo, self.hi)
    }

    /// The rate to probe next, or `None` when the search is over. Calling it again before
    /// [`Bisection::record`] returns the same rate.
    pub fn next_rate(&mut self) -> Option<f64> {
        if let Some(p) = self.pending {
            return Some(p);
        }
        if self.phase == Phase::Done {
            return None;
        }
        if self.probes >= self.max_probes {
            self.finish(Verdict::Budget);
            return None;
        }
        let rate = match self.phase {
            Phase::Low => self.lo,
            Phase::High => self.hi,
            Phase::Bisect => {
                if self.hi - self.lo <= self.resolution {
                    self.finish(Verdict::Converged);
                    return None;
                }
                (self.lo + self.hi) / 2.0
            }
            Phase::Done => return None,
        };
        self.pending = Some(rate);
        Some(rate)
    }

    /// Reports the outcome of the probe that [`Bisection::next_rate`] asked for.
    pub fn record(&mut self, passed: bool) {
        let Some(rate) = self.pending.take() else {
            return;
        };
        self.probes += 1;
        if passed {
            self.best = Some(self.best.map_or(rate, |b| b.max(rate)));
        } else {
            self.lowest_failed = Some(self.lowest_failed.map_or(rate, |f| f.min(rate)));
        }
        match (self.phase, passed) {
            (Phase::Low, false) => self.finish(Verdict::LowFailed),
            (Phase::Low, true) => {
                self.phase = if self.hi - self.lo <= self.resolution { Phase::Bisect } else { Phase::High }
            }
            (Phase::High, true) => self.finish(Verdict::HighPassed),
            (Phase::High, false) => self.phase = Phase::Bisect,
            (Phase::Bisect, true) => self.lo = rate,
            (Phase::Bisect, false) => self.hi = rate,
            (Phase::Done, _) => {}
        }
    }

    fn finish(&mut self, verdict: Verdict) {
        self.phase = Phase::Done;
        self.verdict = Some(verdict);
    }

    /// The result so far.
    pub fn outcome(&self) -> Outcome {
        Outcome { best: self.best, lowest_failed: self.lowest_failed, verdict: self.verdict, probes: self.probes }
    }
}
