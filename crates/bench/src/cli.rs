//! Command-line interface: the four scenarios and their options.
//!
//! Every option is bounded (see the `validate` methods): the tool refuses runs that would not
//! end in reasonable time or would open more sockets than a test machine can hold.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Load generator for the gateway (WebSocket pub/sub): fan-out, idle, churn and max-rate.
#[derive(Debug, Parser)]
#[command(name = "gateway-bench", version, about, long_about = None)]
pub struct Cli {
    /// The scenario.
    #[command(subcommand)]
    pub command: Command,

    /// Runtime threads: 1 = a current-thread runtime, leaving the other cores to the servers.
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,

    /// Also append the JSON summary (one line per run) to this file.
    #[arg(long, global = true)]
    pub json_out: Option<PathBuf>,

    /// No progress line on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// S subscribers on one channel, P publishers at a total rate R for T seconds: deliveries/s,
    /// loss, reordering, latency percentiles, disconnects, publish acks and errors.
    Fanout(FanoutArgs),
    /// N connections subscribed over K channels, held H seconds: server memory per connection
    /// from each node's `/metrics` (`process_resident_memory_bytes`).
    Idle(IdleArgs),
    /// C workers repeating connect, subscribe, close for T seconds: cycles/s, connect latency.
    Churn(ChurnArgs),
    /// The highest publish rate with loss <= a bound and p99 <= a bound, by bisection between
    /// `--low` and `--high` down to `--resolution`; every probe is a short fan-out run.
    MaxRate(MaxRateArgs),
}

/// Options shared by every scenario.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// A node's WebSocket URL (repeat for several nodes; connections go round-robin).
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/ws")]
    pub urls: Vec<String>,

    /// Allow URLs whose host is not loopback (127.0.0.0/8, ::1, localhost).
    #[arg(long)]
    pub allow_remote: bool,

    /// Free-form label copied into the JSON summary.
    #[arg(long)]
    pub label: Option<String>,

    /// A server process to measure (CPU from /proc/PID/stat; RSS for `idle`). Repeatable.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,

    /// The Redis process, to report its CPU separately.
    #[arg(long)]
    pub redis_pid: Option<u32>,

    /// Seconds one connection (TCP + upgrade + subscribe) may take.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// Seconds the whole connect phase may take; connections still pending then count as failed.
    #[arg(long, default_value_t = 120.0)]
    pub connect_phase_timeout: f64,

    /// Connections opened concurrently during the connect phase.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
}

/// Options of a fan-out load (shared by `fanout` and `max-rate`).
#[derive(Debug, Clone, Args)]
pub struct Load {
    /// Subscribers (all on one channel).
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,

    /// Publishers (connections that publish and do not subscribe); they share the rate.
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,

    /// Bytes of `data` per message (at least 43: the record header).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,

    /// The channel.
    #[arg(long, default_value = "bench")]
    pub channel: String,

    /// Publish without `id` (no `ok` per publish; errors are still reported).
    #[arg(long)]
    pub no_acks: bool,

    /// After publishing, stop waiting once no delivery arrived for this many seconds.
    #[arg(long, default_value_t = 2.0)]
    pub drain_idle: f64,

    /// After publishing, wait at most this many seconds for deliveries.
    #[arg(long, default_value_t = 15.0)]
    pub drain_max: f64,

    /// Initial receive buffer per subscriber, bytes (grows for larger frames).
    #[arg(long, default_value_t = 16384)]
    pub read_buffer: usize,

    /// Most messages one publisher writes in one batch when it is behind schedule.
    #[arg(long, default_value_t = 256)]
    pub max_batch: usize,
}

/// `fanout` options.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// The load.
    #[command(flatten)]
    pub load: Load,
    /// Total publish rate, messages per second (over all publishers).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Publishing time, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
}

/// `idle` options.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Connections.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Channels; connection i subscribes to `<prefix>-<i mod K>`.
    #[arg(long, default_value_t = 100)]
    pub channels: usize,
    /// Channel name prefix.
    #[arg(long, default_value = "bench")]
    pub channel_prefix: String,
    /// Seconds to hold the connections once all are open.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// Seconds after the last connection before the first memory sample.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Initial receive buffer per connection, bytes.
    #[arg(long, default_value_t = 1024)]
    pub read_buffer: usize,
    /// Create this file once every connection is open (for external samplers).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

/// `churn` options.
#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// Concurrent workers, each repeating connect, subscribe, close.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many cycles in total, even before the time is up.
    #[arg(long, default_value_t = 200_000)]
    pub max_cycles: u64,
    /// Channel name prefix; worker w subscribes to `<prefix>-<w>`.
    #[arg(long, default_value = "churn")]
    pub channel_prefix: String,
    /// Seconds one cycle may take before it counts as an error.
    #[arg(long, default_value_t = 10.0)]
    pub cycle_timeout: f64,
}

/// `max-rate` options.
#[derive(Debug, Clone, Args)]
pub struct MaxRateArgs {
    /// Shared options.
    #[command(flatten)]
    pub common: Common,
    /// The load of every probe.
    #[command(flatten)]
    pub load: Load,
    /// Lowest publish rate searched, messages per second.
    #[arg(long, default_value_t = 100.0)]
    pub low: f64,
    /// Highest publish rate searched, messages per second.
    #[arg(long, default_value_t = 5000.0)]
    pub high: f64,
    /// Stop when the interval is this narrow (messages per second).
    #[arg(long, default_value_t = 25.0)]
    pub resolution: f64,
    /// Seconds of publishing per probe.
    #[arg(long, default_value_t = 5.0)]
    pub probe_duration: f64,
    /// A probe passes with at most this loss, percent.
    #[arg(long, default_value_t = 0.1)]
    pub loss_bound_pct: f64,
    /// A probe passes with at most this p99 latency, milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub p99_bound_ms: f64,
    /// A probe passes only if the publishers sent at least this fraction of the target.
    #[arg(long, default_value_t = 0.98)]
    pub min_send_ratio: f64,
    /// Most probes.
    #[arg(long, default_value_t = 16)]
    pub max_probes: usize,
    /// Seconds to pause between probes (lets the servers drain).
    #[arg(long, default_value_t = 2.0)]
    pub cooldown: f64,
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.to_owned()) }
}

fn secs(x: f64, lo: f64, hi: f64, name: &str) -> Result<(), String> {
    check(x.is_finite() && (lo..=hi).contains(&x), &format!("{name} must be within {lo}..={hi} seconds"))
}

impl Common {
    /// Checks bounds.
    pub fn validate(&self) -> Result<(), String> {
        check(!self.urls.is_empty() && self.urls.len() <= 64, "give 1 to 64 --url")?;
        secs(self.connect_timeout, 0.1, 300.0, "--connect-timeout")?;
        secs(self.connect_phase_timeout, 1.0, 3600.0, "--connect-phase-timeout")?;
        check((1..=4096).contains(&self.connect_concurrency), "--connect-concurrency must be 1..=4096")
    }
}

impl Load {
    /// Checks bounds.
    pub fn validate(&self) -> Result<(), String> {
        check((1..=200_000).contains(&self.subscribers), "--subscribers must be 1..=200000")?;
        check((1..=1000).contains(&self.publishers), "--publishers must be 1..=1000")?;
        check(
            (crate::payload::HEADER_LEN..=60_000).contains(&self.payload),
            &format!("--payload must be {}..=60000 bytes", crate::payload::HEADER_LEN),
        )?;
        gateway_protocol::channel::validate(&self.channel).map_err(|e| format!("--channel: {e}"))?;
        secs(self.drain_idle, 0.05, 600.0, "--drain-idle")?;
        secs(self.drain_max, 0.05, 600.0, "--drain-max")?;
        check((256..=16 << 20).contains(&self.read_buffer), "--read-buffer must be 256..=16777216")?;
        check((1..=100_000).contains(&self.max_batch), "--max-batch must be 1..=100000")
    }
}

/// Highest total publish rate accepted, messages per second.
pub const MAX_RATE: f64 = 10_000_000.0;

impl FanoutArgs {
    /// Checks bounds.
    pub fn validate(&self) -> Result<(), String> {
        self.common.validate()?;
        self.load.validate()?;
        check(self.rate.is_finite() && self.rate > 0.0 && self.rate <= MAX_RATE, "--rate must be in (0, 1e7]")?;
        secs(self.duration, 0.1, 3600.0, "--duration")
    }
}

impl IdleArgs {
    /// Checks bounds.
    pub fn validate(&self) -> Result<(), String> {
        self.common.validate()?;
        check((1..=500_000).contains(&self.connections), "--connections must be 1..=500000")?;
        check((1..=1_000_000).contains(&self.channels), "--channels must be 1..=1000000")?;
        gateway_protocol::channel::validate(&format!("{}-0", self.channel_prefix))
            .map_err(|e| format!("--channel-prefix: {e}"))?;
        secs(self.hold, 0.0, 3600.0, "--hold")?;
        secs(self.settle, 0.0, 600.0, "--settle")?;
        check((256..=16 << 20).contains(&self.read_buffer), "--read-buffer must be 256..=16777216")
    }
}

impl ChurnArgs {
    /// Checks bounds.
    pub fn validate(&self) -> Result<(), String> {
        self.common.validate()?;
        check((1..=10_000).contains(&self.workers), "--workers must be 1..=10000")?;
        secs(self.duration, 0.1, 3600.0, "--duration")?;
        check((1..=100_000_000).contains(&self.max_cycles), "--max-cycles must be 1..=1e8")?;
        gateway_protocol::channel::validate(&format!("{}-0", self.channel_prefix))
            .map_err(|e| format!("--channel-prefix: {e}"))?;
        secs(self.cycle_timeout, 0.1, 600.0, "--cycle-timeout")
    }
}

impl MaxRateArgs {
    /// Checks bounds.
    pub fn validate(&self) -> Result<(), String> {
        self.common.validate()?;
        self.load.validate()?;
        let rate_ok = |r: f64| r.is_finite() && r > 0.0 && r <= MAX_RATE;
        check(rate_ok(self.low) && rate_ok(self.high) && self.low < self.high, "need 0 < --low < --high <= 1e7")?;
        check(
            self.resolution.is_finite() && self.resolution > 0.0 && self.resolution < self.high - self.low,
            "--resolution must be > 0 and below --high minus --low",
        )?;
        secs(self.probe_duration, 0.5, 600.0, "--probe-duration")?;
        secs(self.cooldown, 0.0, 600.0, "--cooldown")?;
        check((0.0..=100.0).contains(&self.loss_bound_pct), "--loss-bound-pct must be 0..=100")?;
        check(self.p99_bound_ms.is_finite() && self.p99_bound_ms > 0.0, "--p99-bound-ms must be > 0")?;
        check((0.0..=1.0).contains(&self.min_send_ratio), "--min-send-ratio must be 0..=1")?;
        check((2..=64).contains(&self.max_probes), "--max-probes must be 2..=64")
    }
}
