//! Deployment checks (issue 4).
//!
//! Static part (always runs): every deploy file that cannot run on a machine without Docker is
//! validated by its own tool: `docker-compose config`, `haproxy -c` on both rendered HAProxy
//! configs, `promtool check config`, `bash -n`, and the Grafana dashboard names only metrics the
//! gateway exports. A missing tool fails the test with the apt-get command that installs it.
//!
//! End to end: `deploy/local-cluster.sh` starts Redis, 3 gateway nodes and HAProxy on 127.0.0.1;
//! 300 WebSocket clients connect through the balancer, every node gets a share, a publish through
//! the balancer reaches everyone; then one node is drained with SIGTERM while numbered messages
//! keep being published: its clients get 1001 and come back through the balancer, and clients of
//! the other nodes receive every number in order. The gateway binary: `GATEWAY_BIN`, else the one
//! cargo built for this test (`CARGO_BIN_EXE_gateway`), else the newest `target/*/gateway`.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// Helpers shared by both parts
// ---------------------------------------------------------------------------------------------

/// Every metric name the gateway exports (the dashboard may use no other).
const EXPORTED: &[&str] = &[
    "gateway_connections",
    "gateway_connects_total",
    "gateway_disconnects_total",
    "gateway_frames_received_total",
    "gateway_frames_sent_total",
    "gateway_messages_published_total",
    "gateway_messages_delivered_total",
    "gateway_messages_dropped_total",
    "gateway_channels",
    "gateway_publish_latency_seconds",
    "gateway_backplane_up",
    "gateway_backplane_reconnects_total",
    "gateway_backplane_publish_errors_total",
    "gateway_canary_failures_total",
    "gateway_limit_hits_total",
    "gateway_auth_failures_total",
    "gateway_bad_frames_total",
    "gateway_ready",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
];
const HISTOGRAMS: &[&str] = &["gateway_publish_latency_seconds"];

/// The repository root: the nearest ancestor of this package holding `deploy/`.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|dir| dir.join("deploy/local-cluster.sh").is_file())
        .expect("no deploy/local-cluster.sh above CARGO_MANIFEST_DIR")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The Debian package that provides `tool`.
fn package_of(tool: &str) -> &str {
    match tool {
        "promtool" => "prometheus",
        other => other,
    }
}

/// Runs a validation tool from the repository root; a missing tool is a failure, not a skip.
fn run_tool(tool: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(tool).args(args).envs(envs.iter().copied()).current_dir(root()).output().unwrap_or_else(|e| {
        panic!(
            "cannot run `{tool}` ({e}); install it with: \
                 apt-get install -y --no-install-recommends {}",
            package_of(tool)
        )
    })
}

/// The text without `#` comments (enough for our YAML and HAProxy files).
fn uncommented(text: &str) -> String {
    text.lines().map(|l| l.split('#').next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn assert_clean(what: &str, out: &Output) {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    assert!(!text.contains("[WARNING]") && !text.contains("[ALERT]"), "{what} warns:\n{text}");
}

/// A directory of its own under the system temp dir.
fn scratch_dir(tag: &str) -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("gateway-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

// ---------------------------------------------------------------------------------------------
// Static validation
// ---------------------------------------------------------------------------------------------

#[test]
fn compose_file_is_valid() {
    let out = run_tool("docker-compose", &["-f", "docker-compose.yml", "config", "-q"], &[]);
    assert_clean("docker-compose config", &out);
    let compose = read("docker-compose.yml");
    for needle in ["replicas: 3", "stop_grace_period: 30s", "dockerfile: deploy/Dockerfile", "--appendonly"] {
        assert!(compose.contains(needle), "docker-compose.yml lacks `{needle}`");
    }
    assert!(!uncommented(&compose).contains("container_name"), "a container_name would prevent --scale");
}

#[test]
fn haproxy_configs_are_valid() {
    let shared = uncommented(&read("deploy/haproxy/haproxy.cfg"));
    for needle in [
        "balance leastconn",
        "option httpchk GET /readyz",
        "http-check expect status 200",
        "timeout tunnel",
        "timeout client-fin",
        "timeout server-fin",
        "option forwardfor",
        "option redispatch",
        "retries 3",
    ] {
        assert!(shared.contains(needle), "deploy/haproxy/haproxy.cfg lacks `{needle}`");
    }
    // Cutting sessions when a node is marked down would lose the 1001 close of a drain.
    let all = uncommented(&format!("{shared}{}", read("deploy/haproxy/backend-compose.cfg")));
    assert!(!all.contains("shutdown-sessions"), "on-marked-down shutdown-sessions breaks drains");

    // The compose rendering: shared part + DNS server-template.
    let out = run_tool(
        "haproxy",
        &["-c", "-f", "deploy/haproxy/haproxy.cfg", "-f", "deploy/haproxy/backend-compose.cfg"],
        &[],
    );
    assert_clean("haproxy -c (compose)", &out);

    // The local rendering: shared part + static servers written by local-cluster.sh.
    let dir = scratch_dir("haproxy-check");
    let render = Command::new("bash")
        .arg(root().join("deploy/local-cluster.sh"))
        .arg("render")
        .envs([("NODES", "3"), ("BASE_PORT", "18081")])
        .output()
        .expect("bash");
    assert!(render.status.success(), "local-cluster.sh render: {}", String::from_utf8_lossy(&render.stderr));
    let backend = dir.join("backend-local.cfg");
    std::fs::write(&backend, &render.stdout).expect("write backend");
    let backend = backend.to_string_lossy().into_owned();
    let out = run_tool(
        "haproxy",
        &["-c", "-f", "deploy/haproxy/haproxy.cfg", "-f", &backend],
        &[("LB_BIND", "127.0.0.1:18080"), ("STATS_BIND", "127.0.0.1:18404")],
    );
    assert_clean("haproxy -c (local)", &out);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn prometheus_config_is_valid() {
    let out = run_tool("promtool", &["check", "config", "deploy/prometheus/prometheus.yml"], &[]);
    assert_clean("promtool check config", &out);
}

#[test]
fn local_cluster_script_parses() {
    // `shellcheck deploy/local-cluster.sh` is cleaner still; bash -n needs nothing installed.
    let out = run_tool("bash", &["-n", "deploy/local-cluster.sh"], &[]);
    assert_clean("bash -n deploy/local-cluster.sh", &out);
}

/// Metric names (`gateway_*`, `process_*`) in a PromQL expression, histogram suffixes stripped.
fn metric_names(expr: &str) -> Vec<String> {
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let bytes = expr.as_bytes();
    let mut names = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (i == 0 || !is_word(bytes[i - 1]))
            && (expr[i..].starts_with("gateway_") || expr[i..].starts_with("process_"));
        if !starts {
            i += 1;
            continue;
        }
        let end = (i..bytes.len()).find(|&j| !is_word(bytes[j]) || bytes[j] == b':').unwrap_or(bytes.len());
        let mut name = &expr[i..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix).filter(|base| HISTOGRAMS.contains(base)) {
                name = base;
            }
        }
        names.push(name.to_owned());
        i = end;
    }
    names
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match v {
                    Value::String(s) if key == "expr" => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_names_only_exported_metrics() {
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/gateway.json")).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(EXPORTED.contains(&name.as_str()), "dashboard uses `{name}`, not exported (in `{expr}`)");
            used.insert(name);
        }
    }
    // What the issue asks the wall to show.
    for wanted in [
        "gateway_connections",
        "gateway_messages_published_total",
        "gateway_messages_delivered_total",
        "gateway_messages_dropped_total",
        "gateway_disconnects_total",
        "gateway_backplane_up",
        "gateway_publish_latency_seconds",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(wanted), "the dashboard shows nothing from `{wanted}`");
    }
    assert!(exprs.iter().any(|e| e.contains("histogram_quantile")), "no latency quantile");
    // The list above must match what the gateway registers (a renamed metric breaks the wall).
    let sources = gateway_sources();
    for name in EXPORTED.iter().filter(|n| n.starts_with("gateway_")) {
        assert!(sources.contains(&format!("\"{name}\"")), "the gateway no longer registers `{name}`");
    }
    // Panels point at the provisioned datasource by uid.
    let datasource = read("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert!(datasource.contains("uid: prometheus"), "datasource uid changed: update the dashboard");
    let uids: BTreeSet<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| p["datasource"]["uid"].as_str().unwrap_or("<none>").to_owned())
        .collect();
    assert_eq!(uids, BTreeSet::from(["prometheus".to_owned()]), "panel datasources");
}

/// Every Rust source of the gateway crate, concatenated.
fn gateway_sources() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    let mut out = String::new();
    walk(&root().join("crates/gateway/src"), &mut out);
    out
}

#[test]
fn metric_name_scanner() {
    assert_eq!(
        metric_names(r#"histogram_quantile(0.9, sum by (le) (rate(gateway_publish_latency_seconds_bucket[5m])))"#),
        ["gateway_publish_latency_seconds"]
    );
    assert_eq!(
        metric_names(r#"process_open_fds{job="gateway"} + x_gateway_no + gateway_ready"#),
        ["process_open_fds", "gateway_ready"]
    );
}

#[test]
fn dockerfile_copies_every_workspace_member() {
    let manifest = read("Cargo.toml");
    let start = manifest.find("members").expect("workspace members");
    let open = start + manifest[start..].find('[').expect("members list");
    let close = open + manifest[open..].find(']').expect("members list end");
    let members: BTreeSet<&str> =
        manifest[open + 1..close].split(',').map(|m| m.trim().trim_matches('"')).filter(|m| !m.is_empty()).collect();
    let dockerfile = read("deploy/Dockerfile");
    let copied: BTreeSet<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY ")?.split_whitespace().next()?.strip_suffix("/Cargo.toml"))
        .collect();
    assert_eq!(copied, members, "deploy/Dockerfile must COPY exactly the workspace members' manifests");
    for needle in ["--healthcheck", "HEALTHCHECK", "USER nonroot", "cargo build --release --locked -p gateway"] {
        assert!(dockerfile.contains(needle), "deploy/Dockerfile lacks `{needle}`");
    }
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "*"), ".dockerignore must start from nothing");
}

// ---------------------------------------------------------------------------------------------
// End to end through deploy/local-cluster.sh
// ---------------------------------------------------------------------------------------------

const CLIENTS: usize = 300;
const NODES: u16 = 3;
/// The node the test drains (1-based, as in the script).
const DRAINED: u16 = 2;
const CHANNEL: &str = "deploy:test";

/// `GATEWAY_BIN`, else the binary cargo built for this test, else the newest `target/*/gateway`.
fn gateway_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("GATEWAY_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "GATEWAY_BIN={} does not exist", bin.display());
        return bin;
    }
    // Set when this file is a test target of the `gateway` package.
    if let Some(bin) = option_env!("CARGO_BIN_EXE_gateway") {
        return PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    ["debug", "release"]
        .iter()
        .map(|profile| target.join(profile).join("gateway"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "no gateway binary under {}/{{debug,release}}: run `cargo build -p gateway` first \
                 (or set GATEWAY_BIN)",
                target.display()
            )
        })
}

/// A random block of `n` consecutive free ports on 127.0.0.1.
fn free_port_block(n: u16) -> u16 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let seed = u64::from(nanos) ^ (u64::from(std::process::id()) << 16);
    for attempt in 0..500u64 {
        let base = 20_000 + ((seed + attempt * 7_919) % 40_000) as u16;
        if (0..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no block of {n} free ports");
}

/// The running local cluster; `down` runs on drop, whatever happens.
struct Cluster {
    envs: Vec<(&'static str, String)>,
    state_dir: PathBuf,
    lb: SocketAddr,
    stats: SocketAddr,
    nodes: Vec<SocketAddr>,
    stopped: bool,
}

impl Cluster {
    fn new(bin: &Path) -> Self {
        let base = free_port_block(3 + NODES);
        let state_dir = scratch_dir("local-cluster");
        let envs = vec![
            ("GATEWAY_BIN", bin.to_string_lossy().into_owned()),
            ("NODES", NODES.to_string()),
            ("LB_PORT", base.to_string()),
            ("STATS_PORT", (base + 1).to_string()),
            ("REDIS_PORT", (base + 2).to_string()),
            ("BASE_PORT", (base + 3).to_string()),
            ("STATE_DIR", state_dir.to_string_lossy().into_owned()),
            ("DOWN_TIMEOUT", "20".to_owned()),
        ];
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            envs,
            state_dir,
            lb: addr(base),
            stats: addr(base + 1),
            nodes: (0..NODES).map(|i| addr(base + 3 + i)).collect(),
            stopped: false,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(root().join("deploy/local-cluster.sh")).args(args).envs(self.envs.iter().map(|(k, v)| (k, v)));
        // The test publishes without a key and connects without a token.
        for var in ["GATEWAY_API_KEY", "GATEWAY_JWT_SECRET", "GATEWAY_JWT_PUBLIC_KEY", "REDIS_URL"] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Runs the script in a blocking thread, with a deadline.
    async fn run(&self, args: &[&str], limit: Duration) -> Output {
        let mut cmd = tokio::process::Command::from(self.command(args));
        cmd.kill_on_drop(true);
        let out = timeout(limit, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("local-cluster.sh {args:?} took over {limit:?}"))
            .expect("bash");
        assert!(
            out.status.success(),
            "local-cluster.sh {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn down(&mut self) -> Output {
        let out = self.command(&["down"]).output().expect("bash");
        if out.status.success() {
            self.stopped = true;
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            let out = self.down();
            eprintln!("local-cluster.sh down: {}", String::from_utf8_lossy(&out.stderr));
        }
        if std::thread::panicking() {
            eprintln!("local cluster logs kept in {}", self.state_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

/// A minimal HTTP/1.1 request over a fresh connection: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, payload) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no HTTP response: {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line: {head:?}"))?;
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        Ok((status, if chunked { dechunk(payload) } else { payload.to_owned() }))
    };
    timeout(Duration::from_secs(5), exchange).await.map_err(|_| format!("{method} {addr}{path}: no answer in 5 s"))?
}

fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}

/// Sum of every sample of `name` (any labels) in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let value = match rest.chars().next() {
            Some(' ') => rest,
            Some('{') => rest.rsplit_once('}').map(|(_, v)| v).unwrap_or(""),
            _ => continue,
        };
        if let Some(v) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

async fn connections_on(node: SocketAddr) -> Result<f64, String> {
    let (status, body) = http(node, "GET", "/metrics", "").await?;
    if status != 200 {
        return Err(format!("{node}/metrics: {status}"));
    }
    metric(&body, "gateway_connections").ok_or_else(|| format!("{node}/metrics has no gateway_connections"))
}

/// Polls `probe` every 100 ms until it returns Some, or panics at the deadline with its last error.
async fn poll<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + limit;
    let mut last = String::from("never answered");
    loop {
        match probe().await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = e,
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what} (last: {last})");
        sleep(Duration::from_millis(100)).await;
    }
}

async fn publish(lb: SocketAddr, seq: u64) -> Result<(u16, String), String> {
    let body = json!({"channel": CHANNEL, "data": {"seq": seq}}).to_string();
    http(lb, "POST", "/api/publish", &body).await
}

// --- WebSocket clients -------------------------------------------------------------------------

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

enum Event {
    /// The client's subscribe was answered `ok` (again: after a reconnect).
    Subscribed(usize),
    /// A message of the test channel.
    Received(usize, u64),
    /// The server closed the socket (close code, if a close frame came).
    Closed(usize, Option<u16>),
    /// A reconnect attempt failed and will be retried.
    Retried,
    Failed(usize, String),
}

async fn connect_and_subscribe(url: &str) -> Result<Ws, String> {
    let attempt = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| format!("connect: {e}"))?;
        let subscribe = json!({"type": "subscribe", "channel": CHANNEL, "id": 1}).to_string();
        ws.send(Message::text(subscribe)).await.map_err(|e| format!("send: {e}"))?;
        while let Some(frame) = ws.next().await {
            if let Message::Text(text) = frame.map_err(|e| format!("read: {e}"))? {
                let reply: Value = serde_json::from_str(text.as_str()).map_err(|e| format!("{e}: {text}"))?;
                match reply["type"].as_str() {
                    Some("ok") if reply["id"] == 1 => return Ok(ws),
                    Some("error") => return Err(format!("subscribe refused: {text}")),
                    _ => {}
                }
            }
        }
        Err("closed before the subscribe was answered".to_owned())
    };
    timeout(Duration::from_secs(10), attempt).await.map_err(|_| "no ok within 10 s".to_owned())?
}

/// One client: subscribe, report every message, and after a 1001 close reconnect once through
/// the balancer (retrying until a deadline) and subscribe again.
async fn client(id: usize, url: String, events: mpsc::UnboundedSender<Event>) {
    let mut ws = match connect_and_subscribe(&url).await {
        Ok(ws) => ws,
        Err(e) => return drop(events.send(Event::Failed(id, e))),
    };
    let mut reconnected = false;
    loop {
        let _ = events.send(Event::Subscribed(id));
        let code = loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else {
                        let _ = events.send(Event::Failed(id, format!("not JSON: {text}")));
                        continue;
                    };
                    if frame["type"] == "message" && frame["channel"] == CHANNEL {
                        match frame["data"]["seq"].as_u64() {
                            Some(seq) => drop(events.send(Event::Received(id, seq))),
                            None => drop(events.send(Event::Failed(id, format!("unexpected: {text}")))),
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break None,
            }
        };
        let _ = events.send(Event::Closed(id, code));
        if code != Some(1001) || reconnected {
            return;
        }
        // Let the old socket finish its close handshake in the background.
        tokio::spawn(
            async move { timeout(Duration::from_secs(5), async { while ws.next().await.is_some() {} }).await },
        );
        reconnected = true;
        let deadline = Instant::now() + Duration::from_secs(10);
        ws = loop {
            match connect_and_subscribe(&url).await {
                Ok(ws) => break ws,
                Err(e) if Instant::now() >= deadline => {
                    return drop(events.send(Event::Failed(id, format!("reconnect: {e}"))));
                }
                Err(_) => {
                    let _ = events.send(Event::Retried);
                    sleep(Duration::from_millis(50)).await;
                }
            }
        };
    }
}

/// What the test knows about every client, built from the events.
struct Clients {
    events: mpsc::UnboundedReceiver<Event>,
    subscribed: Vec<u32>,
    received: Vec<Vec<u64>>,
    closes: Vec<Vec<Option<u16>>>,
    retries: usize,
}

impl Clients {
    fn apply(&mut self, event: Event) {
        match event {
            Event::Subscribed(c) => self.subscribed[c] += 1,
            Event::Received(c, seq) => self.received[c].push(seq),
            Event::Closed(c, code) => self.closes[c].push(code),
            Event::Retried => self.retries += 1,
            Event::Failed(c, why) => panic!("client {c}: {why}"),
        }
    }

    /// Applies events until `done` holds, or panics at the deadline.
    async fn until(&mut self, what: &str, limit: Duration, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            match timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => self.apply(event),
                Ok(None) => panic!("every client task ended while waiting for {what}"),
                Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
            }
        }
    }

    fn drained(&self, c: usize) -> bool {
        !self.closes[c].is_empty()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cluster_balances_publishes_and_drains() {
    let bin = gateway_bin();
    for tool in ["haproxy", "redis-server"] {
        run_tool(tool, &["-v"], &[]);
    }
    let mut cluster = Cluster::new(&bin);
    let up = cluster.run(&["up"], Duration::from_secs(60)).await;
    eprintln!("{}", String::from_utf8_lossy(&up.stdout));
    let (lb, stats, nodes) = (cluster.lb, cluster.stats, cluster.nodes.clone());

    // 1. CLIENTS sockets through the balancer, each subscribed.
    let (tx, rx) = mpsc::unbounded_channel();
    let url = format!("ws://{lb}/ws");
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        tasks.spawn(client(id, url.clone(), tx.clone()));
    }
    drop(tx);
    let mut clients = Clients {
        events: rx,
        subscribed: vec![0; CLIENTS],
        received: vec![Vec::new(); CLIENTS],
        closes: vec![Vec::new(); CLIENTS],
        retries: 0,
    };
    clients.until("every client subscribed", Duration::from_secs(30), |c| c.subscribed.iter().all(|&n| n == 1)).await;

    // 2. Every node holds a share, and together they hold everyone.
    let shares = poll("every node to report its share", Duration::from_secs(10), || {
        let nodes = nodes.clone();
        async move {
            let mut shares = Vec::new();
            for node in nodes {
                shares.push(connections_on(node).await?);
            }
            let total: f64 = shares.iter().sum();
            if shares.iter().all(|&s| s > 0.0) && total as usize == CLIENTS {
                Ok(Some(shares))
            } else {
                Err(format!("connections per node {shares:?}"))
            }
        }
    })
    .await;
    eprintln!("connections per node: {shares:?}");

    // 3. A publish through the balancer reaches every client, whatever its node.
    let (status, body) = publish(lb, 0).await.expect("publish 0");
    assert_eq!(status, 200, "publish through the balancer: {body}");
    clients.until("seq 0 at every client", Duration::from_secs(10), |c| c.received.iter().all(|r| r == &[0])).await;

    // 4. Drain one node while numbered messages keep coming through the balancer.
    let expected_drained = shares[usize::from(DRAINED) - 1] as usize;
    let (progress_tx, mut progress) = watch::channel(0u64);
    let (stop_tx, stop) = watch::channel(false);
    let publisher = tokio::spawn(publisher(lb, progress_tx, stop));
    timeout(Duration::from_secs(10), progress.wait_for(|&seq| seq >= 10))
        .await
        .expect("publisher started")
        .expect("publisher");

    let drained_node = nodes[usize::from(DRAINED) - 1];
    let unready = tokio::spawn(async move {
        // Not 200 any more: 503 while draining, then refused once the node is gone.
        poll("the drained node to turn unready", Duration::from_secs(10), move || async move {
            Ok(match http(drained_node, "GET", "/readyz", "").await {
                Ok((200, _)) => None,
                Ok((status, _)) => Some(status.to_string()),
                Err(e) => Some(e),
            })
        })
        .await
    });
    let sigterm_at = *progress.borrow();
    let drain_started = Instant::now();
    cluster.run(&["stop-node", &DRAINED.to_string()], Duration::from_secs(10)).await;
    eprintln!("node{DRAINED} /readyz after SIGTERM: {}", unready.await.expect("readyz probe"));

    // Its clients get 1001 and come back through the balancer; nobody else is closed.
    clients
        .until("the drained node's clients to get 1001 and resubscribe", Duration::from_secs(25), |c| {
            (0..CLIENTS).filter(|&i| c.drained(i)).count() == expected_drained
                && (0..CLIENTS).filter(|&i| c.drained(i)).all(|i| c.subscribed[i] == 2)
        })
        .await;
    let resubscribed_at = *progress.borrow();
    eprintln!(
        "node{DRAINED} drained: {expected_drained} clients back through the balancer {:?} after SIGTERM \
         ({} failed attempts; published meanwhile: {sigterm_at}..={resubscribed_at})",
        drain_started.elapsed(),
        clients.retries
    );
    for (i, closes) in clients.closes.iter().enumerate() {
        assert!(closes.is_empty() || closes == &[Some(1001)], "client {i} was closed with {closes:?}");
    }

    // HAProxy took the node out; the node process exited.
    poll("HAProxy to mark the drained node DOWN", Duration::from_secs(10), || async move {
        let (_, csv) = http(stats, "GET", "/stats;csv", "").await?;
        let row = csv.lines().find(|l| l.starts_with(&format!("gateways,node{DRAINED},"))).unwrap_or("").to_owned();
        match row.split(',').nth(17) {
            Some(s) if s.starts_with("DOWN") || s == "MAINT" => Ok(Some(())),
            _ => Err(format!("stats row: {row}")),
        }
    })
    .await;
    poll("the drained node to exit", Duration::from_secs(15), || {
        let status = cluster.command(&["status"]).output();
        async move {
            let status = status.map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&status.stdout).into_owned();
            Ok(text.lines().any(|l| l.starts_with(&format!("node{DRAINED} ")) && l.ends_with("dead")).then_some(()))
        }
    })
    .await;

    // Keep publishing a little after everyone is back, then stop.
    timeout(Duration::from_secs(10), progress.wait_for(|&seq| seq >= resubscribed_at + 20))
        .await
        .expect("publisher went on")
        .expect("publisher");
    stop_tx.send_replace(true);
    let last = publisher.await.expect("publisher task").unwrap_or_else(|e| panic!("publisher: {e}"));
    clients
        .until(&format!("seq {last} at every client"), Duration::from_secs(15), |c| {
            c.received.iter().all(|r| r.last() == Some(&last))
        })
        .await;

    // 5. Nothing lost on the other nodes; the drained clients got everything after their return.
    let everything: Vec<u64> = (0..=last).collect();
    for (i, got) in clients.received.iter().enumerate() {
        if clients.drained(i) {
            assert!(got.windows(2).all(|w| w[0] < w[1]), "client {i} (drained): out of order or duplicated");
            // `resubscribed_at + 1` may have been accepted just before the last `ok`.
            let tail: Vec<u64> = got.iter().copied().filter(|&s| s > resubscribed_at + 1).collect();
            assert_eq!(tail, (resubscribed_at + 2..=last).collect::<Vec<_>>(), "client {i} (drained) missed messages");
        } else {
            assert!(
                got == &everything,
                "client {i} lost or reordered messages: {} of {} received",
                got.len(),
                everything.len()
            );
        }
    }

    // 6. The survivors hold everyone now.
    let survivors: Vec<SocketAddr> =
        nodes.iter().enumerate().filter(|(i, _)| *i != usize::from(DRAINED) - 1).map(|(_, n)| *n).collect();
    poll("the surviving nodes to hold every client", Duration::from_secs(10), || {
        let survivors = survivors.clone();
        async move {
            let mut total = 0.0;
            for node in survivors {
                total += connections_on(node).await?;
            }
            if total as usize == CLIENTS { Ok(Some(())) } else { Err(format!("{total} connections")) }
        }
    })
    .await;

    tasks.abort_all();
    let down = cluster.down();
    assert!(down.status.success(), "local-cluster.sh down: {}", String::from_utf8_lossy(&down.stderr));
}

/// Publishes 1, 2, 3... through the balancer, each after the previous one was accepted, about
/// every 10 ms until told to stop; returns the last number published.
async fn publisher(
    lb: SocketAddr,
    progress: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) -> Result<u64, String> {
    let mut seq = 0;
    loop {
        if *stop.borrow() {
            return Ok(seq);
        }
        seq += 1;
        // A refused connection is HAProxy's to retry; anything but 200 here is a failure.
        match publish(lb, seq).await {
            Ok((200, _)) => {}
            Ok((status, body)) => return Err(format!("publish {seq}: {status} {body}")),
            Err(e) => return Err(format!("publish {seq}: {e}")),
        }
        progress.send_replace(seq);
        let _ = timeout(Duration::from_millis(10), stop.changed()).await;
    }
}
