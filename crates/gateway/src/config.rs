//! Node configuration: every option as a clap flag with an environment variable and a default.
//!
//! [`Config`] is parsed once in `main.rs`, checked with [`Config::validate`] and then handed to
//! the library; the library itself never reads the environment.

use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default prefix of every Redis channel name (the deployment's namespace).
pub const DEFAULT_REDIS_PREFIX: &str = "gateway:";
/// Default capacity of one socket's outgoing queue, in frames.
pub const DEFAULT_QUEUE_SIZE: usize = 1024;
/// Default size limit of one incoming frame (and of a publish body), in bytes.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Default WebSocket read buffer per socket, in bytes.
pub const DEFAULT_READ_BUFFER_SIZE: usize = 1024;
/// Default size at which buffered outgoing frames are written without waiting for a flush.
pub const DEFAULT_WRITE_BUFFER_SIZE: usize = 32 * 1024;

/// How log lines are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Every option of a gateway node.
#[derive(Debug, Clone, Parser)]
#[command(name = "gateway", version, about = "Horizontally scalable WebSocket pub/sub gateway node.")]
pub struct Config {
    /// Address and port to serve HTTP and WebSocket on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Redis backplane URL (redis://host:port). Absent: a single node with an in-process backplane.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Prefix of every Redis channel this node uses; nodes sharing it form one cluster.
    #[arg(long, env = "GATEWAY_REDIS_PREFIX", default_value = DEFAULT_REDIS_PREFIX)]
    pub redis_prefix: String,

    /// This node's name in logs and metrics [default: the host name].
    #[arg(long, env = "GATEWAY_NODE_ID")]
    pub node_id: Option<String>,

    /// Bearer key required by POST /api/publish. Absent: the endpoint is open.
    #[arg(long, env = "GATEWAY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// HS256 secret; when set (or --jwt-public-key), /ws requires a valid JWT.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file with an RSA or EC public key for RS256/ES256 tokens.
    #[arg(long, env = "GATEWAY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Clock skew tolerated when checking a token's `exp` and `nbf`.
    #[arg(long, env = "GATEWAY_JWT_LEEWAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,

    /// How many messages a socket may fall behind on one channel, and how many replies may wait
    /// for it, before it is closed with 1008 "slow consumer". A socket half that far behind
    /// writes at once instead of lingering.
    #[arg(long, env = "GATEWAY_QUEUE_SIZE", default_value_t = DEFAULT_QUEUE_SIZE)]
    pub queue_size: usize,

    /// Largest incoming frame and /api/publish body, in bytes; larger frames close with 1009.
    #[arg(long, env = "GATEWAY_MAX_MESSAGE_SIZE", default_value_t = DEFAULT_MAX_MESSAGE_SIZE)]
    pub max_message_size: usize,

    /// WebSocket read buffer per socket, in bytes (resident for every idle socket).
    #[arg(long, env = "GATEWAY_READ_BUFFER_SIZE", default_value_t = DEFAULT_READ_BUFFER_SIZE)]
    pub read_buffer_size: usize,

    /// Buffer for the control frames a socket writes (pings, pongs, close), in bytes. Messages
    /// and replies are written from their shared, pre-encoded bytes and do not pass through it.
    #[arg(long, env = "GATEWAY_WRITE_BUFFER_SIZE", default_value_t = DEFAULT_WRITE_BUFFER_SIZE)]
    pub write_buffer_size: usize,

    /// Write coalescing: a busy socket (it receives more than one message per this long) that
    /// wrote less than this long ago waits until this long has passed before its next write, so
    /// one write carries every message queued meanwhile. Quieter sockets are written to at once.
    /// It adds at most this much latency to a busy socket (up to ten times as much while more
    /// sockets are busy than `--write-rate` allows): lower it for latency, raise it for less CPU
    /// per delivery. At most 1h; 0 disables.
    #[arg(long, env = "GATEWAY_WRITE_LINGER", default_value = "20ms", value_parser = humantime::parse_duration)]
    pub write_linger: Duration,

    /// The node's write budget: the most writes a second its busy sockets make together
    /// (default: 7500 per runtime worker thread). When more sockets are steadily busy (two
    /// writes in a row with more than one message per `--write-linger`) than one
    /// `--write-linger` each allows, every busy socket lingers longer, up to 10 lingers, so that
    /// writes carry more messages each instead of their per-write kernel cost taking the CPU.
    /// 0 disables the budget; at most 1000000000.
    #[arg(long, env = "GATEWAY_WRITE_RATE")]
    pub write_rate: Option<u32>,

    /// How long a socket may stay silent before the server pings it.
    #[arg(long, env = "GATEWAY_PING_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// How long after a ping the peer has to answer (any frame) before it is closed with 1008.
    #[arg(long, env = "GATEWAY_PONG_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub pong_timeout: Duration,

    /// Longest a write to one socket may take before the socket is dropped.
    #[arg(long, env = "GATEWAY_WRITE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// Longest an HTTP client may take to send its request headers (slowloris guard).
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Cross-site origins allowed to open /ws (comma-separated exact origins, or `*`). Requests
    /// without Origin and same-host origins are always allowed.
    #[arg(long, env = "GATEWAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// On SIGTERM, how long sockets get to flush before the node exits anyway.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Most sockets this node holds at once; upgrades beyond it get 503.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Most sockets from one client IP at once; upgrades beyond it get 429.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_IP", default_value_t = 10_000)]
    pub max_connections_per_ip: usize,

    /// Proxies (comma-separated IPs or CIDRs) whose X-Forwarded-For names the client IP.
    #[arg(long, env = "GATEWAY_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,

    /// Most channels one socket may subscribe to.
    #[arg(long, env = "GATEWAY_MAX_SUBSCRIPTIONS", default_value_t = 1024)]
    pub max_subscriptions: usize,

    /// Sustained publishes per second allowed to one socket (token bucket refill rate).
    #[arg(long, env = "GATEWAY_PUBLISH_RATE", default_value_t = 5000)]
    pub publish_rate: u32,

    /// Publishes one socket may send in a burst above the sustained rate (bucket size).
    #[arg(long, env = "GATEWAY_PUBLISH_BURST", default_value_t = 5000)]
    pub publish_burst: u32,

    /// Sustained frames other than `publish` per second allowed to one socket (token bucket
    /// refill rate). `subscribe`, `unsubscribe` and `refresh` beyond it are refused with
    /// `rate_limited`; `ping`, malformed or binary frames and WebSocket pings are still answered
    /// but count towards `--rate-limit-strikes`.
    #[arg(long, env = "GATEWAY_COMMAND_RATE", default_value_t = 200)]
    pub command_rate: u32,

    /// Frames other than `publish` one socket may send in a burst above the sustained rate
    /// (bucket size). At least `--max-subscriptions`, so a client may subscribe to all its
    /// channels at once.
    #[arg(long, env = "GATEWAY_COMMAND_BURST", default_value_t = 2048)]
    pub command_burst: u32,

    /// Sustained abuse: a socket that goes on sending while refused runs up a debt (each refused
    /// frame costs a token too, the refill pays it back); a debt of more than this many frames,
    /// or of one second of the budget's rate if that is more, closes it with 1008. Publishes and
    /// other frames are counted apart.
    #[arg(long, env = "GATEWAY_RATE_LIMIT_STRIKES", default_value_t = 100)]
    pub rate_limit_strikes: u32,

    /// Longest a Redis command (PUBLISH, SUBSCRIBE, connecting) may take before it counts as failed.
    #[arg(long, env = "GATEWAY_REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Interval of the end-to-end backplane probe (Redis only).
    #[arg(long, env = "GATEWAY_CANARY_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub canary_interval: Duration,

    /// How long a probe may take to come back before the subscriber connection is restarted.
    #[arg(long, env = "GATEWAY_CANARY_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub canary_timeout: Duration,

    /// Runtime worker threads (default: one per CPU). On a box shared with other busy processes,
    /// fewer workers than CPUs cut cross-core hand-offs; to use many cores, run more nodes.
    #[arg(long, env = "GATEWAY_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Log line format; the level comes from RUST_LOG (default `info`).
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Probe /healthz at the --listen address and exit 0 if healthy, 1 otherwise (for container
    /// healthchecks).
    #[arg(long)]
    pub healthcheck: bool,

    /// Serve /test/echo, an echo endpoint with the same socket layer as /ws (conformance testing only).
    #[arg(long, env = "GATEWAY_ECHO_ENDPOINT", hide = true)]
    pub echo_endpoint: bool,
}

/// Parses `10.0.0.0/8` or a bare address such as `127.0.0.1` (a single host).
fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{text}` is neither an IP address nor a CIDR block"))
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Parses a configuration from arguments only (no environment), for tests and embedding.
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_from(std::iter::once("gateway".into()).chain(args.into_iter().map(Into::into)))
    }

    /// Checks the options against each other before anything is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_owned()));
        if self.queue_size == 0 {
            return bad("--queue-size must be at least 1");
        }
        if self.max_message_size < 256 {
            return bad("--max-message-size must be at least 256 bytes");
        }
        if self.worker_threads == Some(0) {
            return bad("--worker-threads must be at least 1");
        }
        if self.read_buffer_size < 256 {
            return bad("--read-buffer-size must be at least 256 bytes");
        }
        if self.ping_interval.is_zero() || self.pong_timeout.is_zero() || self.write_timeout.is_zero() {
            return bad("--ping-interval, --pong-timeout and --write-timeout must be above zero");
        }
        if self.write_linger > Duration::from_secs(3600) {
            return bad("--write-linger must be at most 1h (a busy socket's messages wait up to ten lingers)");
        }
        if self.write_rate.is_some_and(|rate| rate > 1_000_000_000) {
            return bad("--write-rate must be at most 1000000000 writes a second (0 disables the budget)");
        }
        if self.publish_rate == 0 || self.publish_burst == 0 {
            return bad("--publish-rate and --publish-burst must be at least 1");
        }
        if self.command_rate == 0 || self.command_burst == 0 {
            return bad("--command-rate and --command-burst must be at least 1");
        }
        if (self.command_burst as usize) < self.max_subscriptions {
            return bad(&format!(
                "--command-burst ({}) must be at least --max-subscriptions ({}), so that a client may subscribe to all its channels at once",
                self.command_burst, self.max_subscriptions
            ));
        }
        if self.jwt_secret.is_some() && self.jwt_public_key.is_some() {
            return bad("give either --jwt-secret or --jwt-public-key, not both");
        }
        if self.jwt_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return bad("--jwt-secret must be at least 16 bytes");
        }
        if self.redis_prefix.is_empty() {
            return bad("--redis-prefix must not be empty");
        }
        Ok(())
    }

    /// The node id: `--node-id`, else the host name, else `gateway`.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "gateway".to_owned())
        })
    }

    /// Whether `ip` is a configured trusted proxy.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract_and_validate() {
        let c = Config::from_args(Vec::<String>::new()).expect("defaults parse");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!((c.queue_size, c.max_message_size), (1024, 65536));
        assert!(c.redis_url.is_none() && c.api_key.is_none() && c.jwt_secret.is_none());
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn rejects_contradictions() {
        let c = Config::from_args(["--queue-size", "0"]).expect("parses");
        assert!(c.validate().is_err());
        let c = Config::from_args(["--max-subscriptions", "5000"]).expect("parses");
        let why = c.validate().expect_err("the default command burst cannot cover 5000 subscribes");
        assert!(
            why.to_string().contains("--command-burst (2048) must be at least --max-subscriptions (5000)"),
            "{why}"
        );
        let c = Config::from_args(["--max-subscriptions", "5000", "--command-burst", "5000"]).expect("parses");
        c.validate().expect("a burst that covers them is fine");
        for args in [["--write-linger", "2h"], ["--write-rate", "2000000000"]] {
            let c = Config::from_args(args).expect("parses");
            assert!(c.validate().is_err(), "{args:?} is refused");
        }
        let c = Config::from_args(["--trusted-proxies", "10.0.0.0/8,127.0.0.1"]).expect("parses");
        assert!(c.is_trusted_proxy("10.1.2.3".parse().expect("ip")));
    }
}
