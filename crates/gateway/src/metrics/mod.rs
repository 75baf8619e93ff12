//! Prometheus metrics: one typed [`Metrics`] struct with its own registry.
//!
//! No global registry, so several nodes can live in one test process. Labels come only from
//! closed sets (reasons, codes, limits), never from channel names or client input. The two
//! metrics every socket write updates are kept per thread ([`writes`]).

pub mod writes;

pub use writes::WriteStats;

use prometheus::core::Collector;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric a node exports, registered in one [`Registry`].
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// WebSocket connections accepted.
    pub connects: IntCounter,
    /// WebSocket connections ended, by reason.
    pub disconnects: IntCounterVec,
    /// Frames read from sockets.
    pub frames_received: IntCounter,
    /// Frames written to sockets, and frames per write (`gateway_frames_sent_total`,
    /// `gateway_write_batch_frames`).
    pub writes: WriteStats,
    /// Messages accepted for publishing, by source (`ws`, `http`).
    pub messages_published: IntCounterVec,
    /// Message frames queued to local subscribers.
    pub messages_delivered: IntCounter,
    /// Messages not delivered to a local subscriber, by reason.
    pub messages_dropped: IntCounterVec,
    /// Channels with at least one local subscriber.
    pub channels: IntGauge,
    /// Time from a publish request to the backplane accepting it.
    pub publish_latency: Histogram,
    /// Steadily busy sockets, counted in the write budget (see `--write-linger` and `--write-rate`).
    pub busy_sockets: IntGauge,
    /// 1 while the backplane is connected and its probe comes back.
    pub backplane_up: IntGauge,
    /// Reconnections of the backplane's subscriber connection.
    pub backplane_reconnects: IntCounter,
    /// Publishes the backplane refused or failed.
    pub backplane_publish_errors: IntCounter,
    /// End-to-end probes that did not come back in time.
    pub canary_failures: IntCounter,
    /// Requests or frames refused by a limit, by limit.
    pub limit_hits: IntCounterVec,
    /// Refused credentials, by reason.
    pub auth_failures: IntCounterVec,
    /// Client frames answered with an error, by error code.
    pub bad_frames: IntCounterVec,
    /// 1 while the node accepts new sockets.
    pub ready: IntGauge,
}

/// Registers `metric` and returns it; `what` names it if that fails (a programming error: a
/// duplicate or malformed name, at start-up).
fn register<M: Collector + Clone + 'static>(registry: &Registry, what: &str, metric: M) -> M {
    registry.register(Box::new(metric.clone())).unwrap_or_else(|e| panic!("{what}: {e}"));
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, &format!("metric {name}"), c)
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, &format!("metric {name}"), c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(registry, &format!("metric {name}"), g)
}

impl Metrics {
    /// Creates and registers every metric, plus the process collector (CPU, memory, fds).
    ///
    /// Panics only on a programming error (a duplicate or malformed metric name), at start-up.
    pub fn new(node_id: &str) -> Self {
        let registry = Registry::new();
        let r = &registry;
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_publish_latency_seconds",
                "Time from a publish request to the backplane accepting it.",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("latency histogram: {e}"));
        let latency = register(r, "latency histogram", latency);
        let writes = register(r, "write stats", WriteStats::new());
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .unwrap_or_else(|e| panic!("process collector: {e}"));
        let info = IntGauge::with_opts(
            Opts::new("gateway_node_info", "Constant 1, labelled with this node's id.")
                .const_label("node_id", node_id)
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .unwrap_or_else(|e| panic!("node info: {e}"));
        info.set(1);
        register(r, "node info", info);
        Self {
            connections: gauge(r, "gateway_connections", "Open WebSocket connections."),
            connects: counter(r, "gateway_connects_total", "WebSocket connections accepted."),
            disconnects: counter_vec(
                r,
                "gateway_disconnects_total",
                "WebSocket connections ended, by reason.",
                "reason",
            ),
            frames_received: counter(r, "gateway_frames_received_total", "Frames read from sockets."),
            writes,
            messages_published: counter_vec(
                r,
                "gateway_messages_published_total",
                "Messages accepted for publishing, by source.",
                "source",
            ),
            messages_delivered: counter(
                r,
                "gateway_messages_delivered_total",
                "Message frames queued to local subscribers.",
            ),
            messages_dropped: counter_vec(
                r,
                "gateway_messages_dropped_total",
                "Messages not delivered to a local subscriber, by reason.",
                "reason",
            ),
            channels: gauge(r, "gateway_channels", "Channels with at least one local subscriber."),
            publish_latency: latency,
            busy_sockets: gauge(
                r,
                "gateway_busy_sockets",
                "Steadily busy sockets (two writes in a row with more than one message per linger): they share the write budget.",
            ),
            backplane_up: gauge(
                r,
                "gateway_backplane_up",
                "1 while the backplane is connected and its probe comes back.",
            ),
            backplane_reconnects: counter(
                r,
                "gateway_backplane_reconnects_total",
                "Reconnections of the backplane subscriber connection.",
            ),
            backplane_publish_errors: counter(
                r,
                "gateway_backplane_publish_errors_total",
                "Publishes the backplane refused or failed.",
            ),
            canary_failures: counter(
                r,
                "gateway_canary_failures_total",
                "End-to-end backplane probes that did not come back in time.",
            ),
            limit_hits: counter_vec(
                r,
                "gateway_limit_hits_total",
                "Requests or frames refused by a limit, by limit.",
                "limit",
            ),
            auth_failures: counter_vec(r, "gateway_auth_failures_total", "Refused credentials, by reason.", "reason"),
            bad_frames: counter_vec(
                r,
                "gateway_bad_frames_total",
                "Client frames answered with an error, by error code.",
                "code",
            ),
            ready: gauge(r, "gateway_ready", "1 while the node accepts new sockets."),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
