//! The two metrics every socket write updates: `gateway_frames_sent_total` and the
//! `gateway_write_batch_frames` histogram, kept in per-thread stripes.
//!
//! A node writes to its sockets tens of thousands of times a second from every worker thread.
//! Kept in a prometheus `IntCounter` and `Histogram`, each write made four or five atomic
//! updates of the same few cache lines from both cores, which bounced between them: 6-9 % of a
//! node's CPU at 1000 subscribers and 1000 messages a second (docs/benchmarks.md). Here each
//! thread adds to a stripe of its own, one cache line that stays with its core, and a scrape
//! sums the stripes. Every write is counted when it is recorded: nothing is batched or dropped.
//! Unlike prometheus's histogram, a scrape is not one snapshot: a write recorded while the
//! stripes are summed may count in the frames and not yet in its bucket (never the reverse).

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Upper bounds of the batch histogram's buckets, in frames (a `+Inf` bucket follows).
const BOUNDS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024];
/// Fewest stripes; a machine with more cores gets one per core, so that worker threads (one per
/// core by default) rarely share one.
const MIN_STRIPES: usize = 16;

/// One thread's share of the counts, alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    /// Frames written.
    frames: AtomicU64,
    /// Writes per bucket of [`BOUNDS`] (not cumulative), the last one `+Inf`.
    writes: [AtomicU64; BOUNDS.len() + 1],
}

/// Frames written to sockets, and how many each write carried. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct WriteStats {
    stripes: Arc<[Stripe]>,
    frames_desc: Desc,
    batch_desc: Desc,
}

impl WriteStats {
    /// Empty counts, described as `gateway_frames_sent_total` and `gateway_write_batch_frames`.
    ///
    /// Panics only on a programming error (a malformed metric name), at start-up.
    pub fn new() -> Self {
        let desc = |name: &str, help: &str| {
            Desc::new(name.into(), help.into(), Vec::new(), HashMap::new())
                .unwrap_or_else(|e| panic!("metric {name}: {e}"))
        };
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            stripes: (0..cores.max(MIN_STRIPES)).map(|_| Stripe::default()).collect(),
            frames_desc: desc("gateway_frames_sent_total", "Frames written to sockets."),
            batch_desc: desc("gateway_write_batch_frames", "Frames written to one socket per flush."),
        }
    }

    /// Records one write that carried `frames` frames.
    pub fn record(&self, frames: u64) {
        let stripe = &self.stripes[thread_ticket() % self.stripes.len()];
        stripe.frames.fetch_add(frames, Ordering::Relaxed);
        let bucket = BOUNDS.iter().position(|&bound| frames <= bound).unwrap_or(BOUNDS.len());
        // Release: a scrape that sees this write in its bucket sees its frames too.
        stripe.writes[bucket].fetch_add(1, Ordering::Release);
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.stripes.iter().map(|stripe| stripe.frames.load(Ordering::Relaxed)).sum()
    }

    /// Writes so far, per bucket of [`BOUNDS`] and `+Inf` (not cumulative).
    fn writes(&self) -> [u64; BOUNDS.len() + 1] {
        let mut writes = [0; BOUNDS.len() + 1];
        for stripe in self.stripes.iter() {
            for (total, count) in writes.iter_mut().zip(&stripe.writes) {
                *total += count.load(Ordering::Acquire);
            }
        }
        writes
    }
}

impl Default for WriteStats {
    fn default() -> Self {
        Self::new()
    }
}

/// The calling thread's number, given in turn as threads first write: threads take stripes in
/// turn.
fn thread_ticket() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static TICKET: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    // A thread whose locals are being torn down shares the first stripe.
    TICKET.try_with(|ticket| *ticket).unwrap_or(0)
}

impl Collector for WriteStats {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.frames_desc, &self.batch_desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // The buckets first: a write recorded meanwhile may then count in the frames and not yet
        // in the histogram, never the other way round (see `record`).
        let writes = self.writes();
        let frames = self.frames();

        let mut counter = proto::Counter::default();
        counter.set_value(frames as f64);
        let mut metric = proto::Metric::default();
        metric.set_counter(counter);
        let sent = family(&self.frames_desc, MetricType::COUNTER, metric);

        let mut histogram = proto::Histogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BOUNDS.len());
        for (bound, count) in BOUNDS.iter().zip(writes) {
            cumulative += count;
            let mut bucket = proto::Bucket::default();
            bucket.set_cumulative_count(cumulative);
            bucket.set_upper_bound(*bound as f64);
            buckets.push(bucket);
        }
        histogram.set_bucket(buckets);
        histogram.set_sample_count(writes.iter().sum());
        histogram.set_sample_sum(frames as f64);
        let mut metric = proto::Metric::default();
        metric.set_histogram(histogram);
        let batch = family(&self.batch_desc, MetricType::HISTOGRAM, metric);

        vec![sent, batch]
    }
}

fn family(desc: &Desc, kind: MetricType, metric: proto::Metric) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(kind);
    family.set_metric(vec![metric]);
    family
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, Registry, TextEncoder};

    fn exposition(stats: &WriteStats) -> String {
        let registry = Registry::new();
        registry.register(Box::new(stats.clone())).expect("registered");
        let mut out = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut out).expect("encoded");
        String::from_utf8(out).expect("text")
    }

    #[test]
    fn writes_from_several_threads_add_up_in_the_exposition() {
        let stats = WriteStats::new();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for frames in [1, 3, 20, 2000] {
                        stats.record(frames);
                    }
                });
            }
        });
        assert_eq!(stats.frames(), 4 * 2024);
        let text = exposition(&stats);
        for line in [
            "gateway_frames_sent_total 8096",
            "gateway_write_batch_frames_bucket{le=\"1\"} 4",
            "gateway_write_batch_frames_bucket{le=\"2\"} 4",
            "gateway_write_batch_frames_bucket{le=\"4\"} 8",
            "gateway_write_batch_frames_bucket{le=\"32\"} 12",
            "gateway_write_batch_frames_bucket{le=\"1024\"} 12",
            "gateway_write_batch_frames_bucket{le=\"+Inf\"} 16",
            "gateway_write_batch_frames_sum 8096",
            "gateway_write_batch_frames_count 16",
            "# TYPE gateway_write_batch_frames histogram",
            "# TYPE gateway_frames_sent_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
