//! `gateway-bench` end to end: every scenario runs, bounded and small, against a real gateway node
//! (started in this process on a free loopback port, in-memory backplane), and its JSON summary
//! must report what a healthy node gives: everything delivered, in order, nothing failed.

use clap::Parser;
use gateway::config::Config;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A gateway node serving on a free port until dropped.
struct Node {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
}

impl Node {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().expect("its address");
        let config = Config::parse_from(["gateway", "--listen", &addr.to_string(), "--node-id", "bench-test"]);
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            gateway::run(config, listener, async move {
                let _ = stopped.await;
            })
            .await
            .expect("the node serves");
        });
        Self { addr, stop: Some(stop), served }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.served)
            .await
            .expect("the node drains")
            .expect("the node task ends cleanly");
    }
}

/// Runs `gateway-bench ARGS --quiet` and returns its JSON summary (the last stdout line).
async fn bench(args: &[&str]) -> Value {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway-bench"))
        .args(args)
        .arg("--quiet")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run).await.expect("gateway-bench ends").expect("it runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gateway-bench {args:?} failed: {}\n{stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no summary; stderr: {stderr}"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {last}"))
}

fn int(summary: &Value, pointer: &str) -> u64 {
    summary.pointer(pointer).and_then(Value::as_u64).unwrap_or_else(|| panic!("no integer at {pointer}: {summary}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_everything_in_order_and_reports_it() {
    let node = Node::start().await;
    let url = node.url();
    let s = bench(&[
        "fanout",
        "--url",
        &url,
        "--subscribers",
        "20",
        "--publishers",
        "2",
        "--rate",
        "200",
        "--duration",
        "1",
        "--payload",
        "100",
        "--drain-idle",
        "0.5",
    ])
    .await;
    assert_eq!(s["scenario"], "fanout");
    assert_eq!(int(&s, "/connect/connected"), 20);
    let sent = int(&s, "/publish/sent");
    assert!(sent >= 150, "sent {sent} of 200");
    assert_eq!(int(&s, "/publish/acks"), sent);
    assert_eq!(int(&s, "/publish/errors"), 0);
    assert_eq!(int(&s, "/delivery/expected"), sent * 20);
    assert_eq!(int(&s, "/delivery/delivered"), sent * 20);
    assert_eq!(int(&s, "/delivery/lost"), 0);
    assert_eq!(int(&s, "/delivery/reordered"), 0);
    assert_eq!(int(&s, "/delivery/malformed"), 0);
    assert_eq!(int(&s, "/delivery/latency_us/count"), sent * 20);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_holds_connections_and_reads_the_node_memory() {
    let node = Node::start().await;
    let url = node.url();
    let s = bench(&["idle", "--url", &url, "--connections", "200", "--channels", "10", "--hold", "1"]).await;
    assert_eq!(int(&s, "/connect/connected"), 200);
    assert_eq!(int(&s, "/hold/disconnects"), 0);
    assert_eq!(int(&s, "/nodes/0/connections"), 200, "{s}");
    assert!(s["bytes_per_connection"].as_f64().is_some_and(|b| b > 0.0), "{s}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_cycles_without_errors() {
    let node = Node::start().await;
    let url = node.url();
    let s = bench(&["churn", "--url", &url, "--workers", "4", "--duration", "1"]).await;
    assert!(int(&s, "/cycles") > 0, "{s}");
    assert_eq!(int(&s, "/failed"), 0, "{s}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_bisects_to_a_passing_rate() {
    let node = Node::start().await;
    let url = node.url();
    let s = bench(&[
        "max-rate",
        "--url",
        &url,
        "--subscribers",
        "10",
        "--publishers",
        "1",
        "--low",
        "20",
        "--high",
        "100",
        "--resolution",
        "40",
        "--probe-duration",
        "0.5",
        "--cooldown",
        "0",
        "--max-probes",
        "4",
        "--drain-idle",
        "0.3",
        "--p99-bound-ms",
        "1000",
    ])
    .await;
    let max_rate = s["max_rate"].as_f64().unwrap_or_else(|| panic!("no max_rate: {s}"));
    assert!((20.0..=100.0).contains(&max_rate), "{s}");
    let probes = int(&s, "/search/probes");
    assert!((2..=4).contains(&probes), "{s}");
    let listed = s["probes"].as_array().unwrap_or_else(|| panic!("no probes: {s}"));
    assert_eq!(listed.len() as u64, probes);
    // The best rate is one that passed.
    assert!(listed.iter().any(|p| p["passed"] == true && p["rate"].as_f64() == Some(max_rate)), "{s}");
    node.stop().await;
}
