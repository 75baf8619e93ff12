//! `idle`: N connections subscribed over K channels, held H seconds; the server's memory per
//! connection from each node's `/metrics` (`process_resident_memory_bytes`), sampled before the
//! first connection and while every connection is held.

use super::fanout::join_all;
use super::{ConnectReport, Ctx, Meta, RunError, connect_many};
use crate::cli::IdleArgs;
use crate::metrics;
use crate::progress::Progress;
use crate::stats::{Tally, round3};
use crate::sys::{CpuReport, CpuWatch, rss_bytes};
use crate::target::Resolved;
use crate::ws::{Opcode, WsConn};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The options of the run, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct IdleOpts {
    /// Connections asked for.
    pub connections: usize,
    /// Channels.
    pub channels: usize,
    /// Hold time, seconds.
    pub hold_s: f64,
    /// Settle time before the first held sample, seconds.
    pub settle_s: f64,
    /// Initial receive buffer per connection (client side).
    pub read_buffer: usize,
}

/// One node's memory, from its `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeMemory {
    /// The metrics URL.
    pub metrics_url: String,
    /// Connections this node got.
    pub connections: usize,
    /// RSS before connecting, bytes.
    pub before_bytes: Option<u64>,
    /// RSS `--settle` seconds after the last connection, bytes.
    pub settled_bytes: Option<u64>,
    /// RSS at the end of the hold, bytes.
    pub held_bytes: Option<u64>,
    /// The last scrape error, if any.
    pub error: Option<String>,
}

/// One `--server-pid`'s memory, from `/proc/PID/status`.
#[derive(Debug, Clone, Serialize)]
pub struct PidMemory {
    /// The process.
    pub pid: u32,
    /// VmRSS before connecting.
    pub before_bytes: Option<u64>,
    /// VmRSS after settling.
    pub settled_bytes: Option<u64>,
    /// VmRSS at the end of the hold.
    pub held_bytes: Option<u64>,
}

/// The hold phase.
#[derive(Debug, Clone, Serialize)]
pub struct HoldReport {
    /// Seconds every connection was held.
    pub held_s: f64,
    /// Connections that ended while held.
    pub disconnects: u64,
    /// How they ended.
    pub close_reasons: Tally,
    /// Frames received while held (pings, foreign messages).
    pub frames: u64,
}

/// The JSON summary of an `idle` run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Header.
    #[serde(flatten)]
    pub meta: Meta,
    /// Options.
    pub opts: IdleOpts,
    /// Connect phase.
    pub connect: ConnectReport,
    /// CPU over the connect phase.
    pub connect_cpu: CpuReport,
    /// Server CPU µs per connection opened (connect + upgrade + subscribe), with `--server-pid`.
    pub server_cpu_per_connect_us: Option<f64>,
    /// Per node, from `/metrics`.
    pub nodes: Vec<NodeMemory>,
    /// Sum over the nodes of (held − before), bytes.
    pub rss_delta_bytes: Option<i64>,
    /// `rss_delta_bytes / connected` (from `/metrics`, end of hold).
    pub bytes_per_connection: Option<f64>,
    /// The same from the sample after `--settle`.
    pub bytes_per_connection_settled: Option<f64>,
    /// Per `--server-pid`, from `/proc`.
    pub pids: Vec<PidMemory>,
    /// Sum over the pids of (held − before) / connected.
    pub proc_bytes_per_connection: Option<f64>,
    /// Hold phase.
    pub hold: HoldReport,
    /// CPU over the hold (what idle sockets cost).
    pub hold_cpu: CpuReport,
}

#[derive(Debug, Default)]
struct HoldShared {
    disconnects: AtomicU64,
    frames: AtomicU64,
    close_reasons: Mutex<Tally>,
}

fn distinct_nodes(targets: &[Resolved]) -> Vec<(Resolved, Vec<usize>)> {
    let mut out: Vec<(Resolved, Vec<usize>)> = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        match out.iter_mut().find(|(r, _)| r.addr == t.addr) {
            Some((_, idx)) => idx.push(i),
            None => out.push((t.clone(), vec![i])),
        }
    }
    out
}

async fn sample_nodes(nodes: &[(Resolved, Vec<usize>)]) -> Vec<Result<u64, String>> {
    let mut out = Vec::with_capacity(nodes.len());
    for (r, _) in nodes {
        out.push(metrics::resident_memory(r, Duration::from_secs(5)).await.map_err(|e| e.to_string()));
    }
    out
}

fn per_conn(before: &[Option<u64>], after: &[Option<u64>], n: usize) -> (Option<i64>, Option<f64>) {
    let pairs: Vec<(u64, u64)> = before.iter().zip(after).filter_map(|(b, a)| b.zip(*a)).collect();
    if pairs.is_empty() || pairs.len() != before.len() {
        return (None, None);
    }
    let delta: i64 = pairs.iter().map(|&(b, a)| a as i64 - b as i64).sum();
    (Some(delta), (n > 0).then(|| round3(delta as f64 / n as f64)))
}

/// Runs `idle`.
pub async fn run(ctx: &Ctx, a: &IdleArgs) -> Result<IdleReport, RunError> {
    let meta = ctx.meta("idle");
    let nodes = distinct_nodes(&ctx.targets);
    let before = sample_nodes(&nodes).await;
    for (r, (node, _)) in before.iter().zip(&nodes) {
        if let Err(e) = r {
            tracing::warn!(url = %node.target.metrics_url(), error = %e, "cannot read process_resident_memory_bytes");
        }
    }
    let pid_before: Vec<Option<u64>> = ctx.common.server_pids.iter().map(|&p| rss_bytes(p)).collect();

    let cpu = CpuWatch::start(&ctx.common.server_pids, ctx.common.redis_pid);
    let k = a.channels;
    let prefix = a.channel_prefix.clone();
    let (conns, connect) =
        connect_many(ctx, "idle connections", a.connections, 0, a.read_buffer, |i| Some(format!("{prefix}-{}", i % k)))
            .await;
    let connect_cpu = cpu.stop();
    if conns.is_empty() {
        return Err(RunError::NoConnections(format!("{:?}", connect.errors.0)));
    }
    let connected = conns.len();
    let mut per_node_count = vec![0usize; nodes.len()];
    for (i, _) in &conns {
        let t = i % ctx.targets.len();
        if let Some(n) = nodes.iter().position(|(_, idx)| idx.contains(&t)) {
            per_node_count[n] += 1;
        }
    }
    if let Some(path) = &a.ready_file
        && let Err(e) = std::fs::write(path, format!("{connected}\n"))
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the ready file");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let sh = Arc::new(HoldShared::default());
    let hold_cpu = CpuWatch::start(&ctx.common.server_pids, ctx.common.redis_pid);
    let held_from = std::time::Instant::now();
    let tasks: Vec<_> =
        conns.into_iter().map(|(_, c)| tokio::spawn(hold(c, Arc::clone(&sh), stop_rx.clone()))).collect();
    let progress = {
        let sh = Arc::clone(&sh);
        Progress::start(ctx.progress, Duration::from_secs(1), move || {
            format!(
                "idle: holding {connected} connections {:.0}s, {} dropped",
                held_from.elapsed().as_secs_f64(),
                sh.disconnects.load(Relaxed)
            )
        })
    };
    let hold_for = Duration::from_secs_f64(a.hold);
    let settle = Duration::from_secs_f64(a.settle.min(a.hold));
    tokio::time::sleep(settle).await;
    let settled = sample_nodes(&nodes).await;
    let pid_settled: Vec<Option<u64>> = ctx.common.server_pids.iter().map(|&p| rss_bytes(p)).collect();
    tokio::time::sleep(hold_for.saturating_sub(held_from.elapsed())).await;
    let held = sample_nodes(&nodes).await;
    let pid_held: Vec<Option<u64>> = ctx.common.server_pids.iter().map(|&p| rss_bytes(p)).collect();
    let held_s = held_from.elapsed().as_secs_f64();
    let hold_cpu = hold_cpu.stop();
    progress.finish();
    stop_tx.send_replace(true);
    join_all(tasks, Duration::from_secs(10)).await;

    let ok = |v: &[Result<u64, String>]| v.iter().map(|r| r.as_ref().ok().copied()).collect::<Vec<_>>();
    let (b, s, h) = (ok(&before), ok(&settled), ok(&held));
    let (rss_delta_bytes, bytes_per_connection) = per_conn(&b, &h, connected);
    let (_, bytes_per_connection_settled) = per_conn(&b, &s, connected);
    let (_, proc_bytes_per_connection) =
        if ctx.common.server_pids.is_empty() { (None, None) } else { per_conn(&pid_before, &pid_held, connected) };
    let node_reports = nodes
        .iter()
        .enumerate()
        .map(|(i, (r, _))| NodeMemory {
            metrics_url: r.target.metrics_url(),
            connections: per_node_count[i],
            before_bytes: b[i],
            settled_bytes: s[i],
            held_bytes: h[i],
            error: [&held[i], &settled[i], &before[i]].iter().find_map(|r| r.as_ref().err().cloned()),
        })
        .collect();
    let pids = ctx
        .common
        .server_pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| PidMemory {
            pid,
            before_bytes: pid_before[i],
            settled_bytes: pid_settled[i],
            held_bytes: pid_held[i],
        })
        .collect();
    Ok(IdleReport {
        meta,
        opts: IdleOpts {
            connections: a.connections,
            channels: a.channels,
            hold_s: a.hold,
            settle_s: a.settle,
            read_buffer: a.read_buffer,
        },
        server_cpu_per_connect_us: connect_cpu.server_cpu_s.map(|c| round3(c * 1e6 / connected as f64)),
        connect,
        connect_cpu,
        nodes: node_reports,
        rss_delta_bytes,
        bytes_per_connection,
        bytes_per_connection_settled,
        pids,
        proc_bytes_per_connection,
        hold: HoldReport {
            held_s: round3(held_s),
            disconnects: sh.disconnects.load(Relaxed),
            close_reasons: sh.close_reasons.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
            frames: sh.frames.load(Relaxed),
        },
        hold_cpu,
    })
}

/// Holds one connection: answers pings, notes how it ends; closes on stop.
async fn hold(mut conn: WsConn, sh: Arc<HoldShared>, mut stop: watch::Receiver<bool>) {
    let note = |why: String| {
        sh.disconnects.fetch_add(1, Relaxed);
        sh.close_reasons.lock().unwrap_or_else(std::sync::PoisonError::into_inner).add(why, 1);
    };
    loop {
        let r = tokio::select! {
            biased;
            _ = stop.changed() => {
                conn.close(Duration::from_secs(2)).await;
                return;
            }
            r = conn.reader.fill(&mut conn.stream) => r,
        };
        match r {
            Ok(0) => return note("eof".to_owned()),
            Err(e) => return note(e.label()),
            Ok(_) => {}
        }
        let mut pong: Option<Vec<u8>> = None;
        let mut closed = None;
        loop {
            match conn.reader.next_frame() {
                Ok(Some(f)) => {
                    sh.frames.fetch_add(1, Relaxed);
                    match f.opcode {
                        Opcode::Ping => pong = Some(f.payload.to_vec()),
                        Opcode::Close => {
                            let (code, reason) = f.close_info();
                            closed =
                                Some(code.map_or_else(|| "close (no code)".to_owned(), |c| format!("{c} {reason}")));
                            break;
                        }
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    closed = Some(e.label());
                    break;
                }
            }
        }
        if let Some(why) = closed {
            return note(why);
        }
        if let Some(p) = pong {
            conn.writer.push(Opcode::Pong, &p);
            if conn.writer.flush(&mut conn.stream).await.is_err() {
                return note("error sending pong".to_owned());
            }
        }
    }
}
