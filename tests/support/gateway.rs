//! Gateway node processes (the real binary) and clusters of them.

use super::http::{HttpResponse, request};
use super::{RedisServer, eventually, signal};
use gateway_client::Client;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One `gateway` process listening on a port of its own choosing.
pub struct Gateway {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Gateway {
    /// Starts `gateway --listen 127.0.0.1:0 ARGS...` (logging at `info`) and waits until it serves.
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::start_logging(name, args, "info")
    }

    /// Like [`Gateway::start`], with `RUST_LOG=rust_log`.
    pub fn start_logging(name: &str, args: &[&str], rust_log: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", rust_log)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json", "--node-id", name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the gateway binary starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (found_tx, found_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("gateway node serving") {
                    let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    if let Some(addr) = parsed["fields"]["listen"].as_str().and_then(|a| a.parse::<SocketAddr>().ok()) {
                        let _ = found_tx.send(addr);
                    }
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let addr = match found_rx.recv_timeout(Duration::from_secs(15)) {
            Ok(addr) => addr,
            Err(_) => panic!("gateway {name} did not start; its log:\n{}", logs.lock().expect("log lock").join("\n")),
        };
        Self { child, addr, logs, name: name.to_owned() }
    }

    /// The node's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A connected client.
    pub async fn client(&self) -> Client {
        super::within("client connect", Client::connect(&self.ws_url())).await.expect("client connects")
    }

    /// An HTTP request to this node.
    pub async fn http(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
        request(self.addr, method, path, headers, body).await
    }

    /// `POST /api/publish` with `data` as given (raw JSON text).
    pub async fn publish_http(&self, channel: &str, data: &str, key: Option<&str>) -> HttpResponse {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = auth.as_deref() {
            headers.push(("authorization", auth));
        }
        let channel = serde_json::Value::String(channel.to_owned());
        self.http("POST", "/api/publish", &headers, &format!(r#"{{"channel":{channel},"data":{data}}}"#)).await
    }

    /// The `/readyz` status code.
    pub async fn readyz(&self) -> u16 {
        self.http("GET", "/readyz", &[], "").await.status
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_readyz(&self, status: u16) {
        eventually(&format!("{} /readyz == {status}", self.name), || async { self.readyz().await == status }).await;
    }

    /// The value of one sample of `/metrics`, e.g. `gateway_connections` or
    /// `gateway_disconnects_total{reason="slow_consumer"}`; 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.http("GET", "/metrics", &[], "").await.body;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(key, _)| *key == sample)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until a metric sample equals `value`.
    pub async fn wait_metric(&self, sample: &str, value: f64) {
        eventually(&format!("{} {sample} == {value}", self.name), || async { self.metric(sample).await == value })
            .await;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        signal(self.pid(), "TERM");
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, failing after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "gateway {} did not exit within {limit:?}", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log lock").clone()
    }

    /// The whole log of a node that has shut down, once it is read up to the drain's line (lines
    /// are read in order by another thread: once that one is in, so is everything before it).
    pub async fn logs_through_drain(&self) -> Vec<String> {
        super::eventually("the drain's log line", || async { self.logs().iter().any(|l| l.contains("drained")) }).await;
        self.logs()
    }

    /// Resident memory of the process, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- log of gateway {} ----\n{}", self.name, self.logs().join("\n"));
        }
    }
}

/// Which backplane a cluster runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One node, in-process backplane.
    Memory,
    /// Two nodes sharing a private redis-server.
    Redis,
}

/// Gateway nodes sharing one backplane.
pub struct Cluster {
    /// The nodes.
    pub nodes: Vec<Gateway>,
    /// The Redis server, for `Backend::Redis`.
    pub redis: Option<RedisServer>,
    next: AtomicUsize,
}

impl Cluster {
    /// One memory node, or two Redis nodes, each started with `args`; waits until ready.
    pub async fn start(backend: Backend, args: &[&str]) -> Self {
        match backend {
            Backend::Memory => Self::memory(args).await,
            Backend::Redis => Self::redis(2, args).await,
        }
    }

    /// One node with the in-process backplane.
    pub async fn memory(args: &[&str]) -> Self {
        let node = Gateway::start("memory-0", args);
        node.wait_readyz(200).await;
        Self { nodes: vec![node], redis: None, next: AtomicUsize::new(0) }
    }

    /// `n` nodes on a private redis-server.
    pub async fn redis(n: usize, args: &[&str]) -> Self {
        let redis = RedisServer::start();
        let url = redis.url();
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut all = vec!["--redis-url", &url];
            all.extend_from_slice(args);
            nodes.push(Gateway::start(&format!("redis-{i}"), &all));
        }
        for node in &nodes {
            node.wait_readyz(200).await;
        }
        Self { nodes, redis: Some(redis), next: AtomicUsize::new(0) }
    }

    /// The next node, round robin, so that clients spread over the cluster.
    pub fn any_node(&self) -> &Gateway {
        &self.nodes[self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len()]
    }

    /// A client on the next node, round robin.
    pub async fn client(&self) -> Client {
        self.any_node().client().await
    }

    /// The Redis server (panics for a memory cluster).
    pub fn redis_server(&mut self) -> &mut RedisServer {
        self.redis.as_mut().expect("a Redis cluster")
    }
}
