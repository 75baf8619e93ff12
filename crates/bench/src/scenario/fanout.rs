//! `fanout`: S subscribers on one channel, P publishers at a total rate R for T seconds.
//!
//! Subscribers go round-robin over the nodes and publishers start on the node after the first
//! subscriber's, so with two nodes half of the deliveries cross the backplane. Publishers never
//! subscribe. Every message carries its publisher, sequence and send time
//! ([`crate::payload`]); every subscriber checks that each publisher's sequence increases.

use super::{ConnectReport, Ctx, Meta, RunError, connect_many};
use crate::cli::Load;
use crate::payload::{self, Found, PublishFrame, Record, Reply};
use crate::progress::{Progress, si};
use crate::stats::{Percentiles, Tally, latency_histogram, record, round3};
use crate::sys::{CpuReport, CpuWatch, now_ns};
use crate::ws::{FrameReader, FrameWriter, Opcode, WsConn};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The parameters of one fan-out run.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutParams {
    /// Subscribers.
    pub subscribers: usize,
    /// Publishers.
    pub publishers: usize,
    /// Total publish rate, messages per second.
    pub rate: f64,
    /// Publishing time, seconds.
    pub duration_s: f64,
    /// Bytes of `data` per message.
    pub payload: usize,
    /// The channel.
    pub channel: String,
    /// Whether publishes carry an `id` (and get an `ok`).
    pub acks: bool,
    /// Drain: stop after this long without a delivery, seconds.
    pub drain_idle_s: f64,
    /// Drain: longest wait, seconds.
    pub drain_max_s: f64,
    /// Initial receive buffer per subscriber.
    pub read_buffer: usize,
    /// Largest publish batch.
    pub max_batch: usize,
    /// First publisher id (max-rate probes use distinct ids so stragglers of an earlier probe
    /// are recognised).
    pub publisher_base: u32,
}

impl FanoutParams {
    /// The parameters for `load` at `rate` for `duration` seconds.
    pub fn new(load: &Load, rate: f64, duration: f64, publisher_base: u32) -> Self {
        Self {
            subscribers: load.subscribers,
            publishers: load.publishers,
            rate,
            duration_s: duration,
            payload: load.payload,
            channel: load.channel.clone(),
            acks: !load.no_acks,
            drain_idle_s: load.drain_idle,
            drain_max_s: load.drain_max,
            read_buffer: load.read_buffer,
            max_batch: load.max_batch,
            publisher_base,
        }
    }

    /// Messages asked for: per publisher `floor(rate / P * T)`.
    pub fn target_messages(&self) -> u64 {
        let per_pub = (self.rate / self.publishers as f64 * self.duration_s).floor() as u64;
        per_pub * self.publishers as u64
    }
}

/// The publish side of a report.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    /// Messages asked for (rate × duration).
    pub target: u64,
    /// Messages written to the sockets. Fewer than `target`: the server pushed back through TCP
    /// (or the load generator could not keep up: see `cpu.bench_cores`).
    pub sent: u64,
    /// `sent` per second of the publishing window.
    pub sent_per_s: f64,
    /// `ok` replies.
    pub acks: u64,
    /// `error` replies.
    pub errors: u64,
    /// `error` replies by code.
    pub error_codes: Tally,
    /// Publish → `ok` time, µs.
    pub ack_latency_us: Percentiles,
    /// Publisher connections the server ended.
    pub publisher_disconnects: u64,
    /// How they ended.
    pub publisher_close_reasons: Tally,
}

/// The delivery side of a report.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryReport {
    /// `sent` × subscribers connected when publishing began.
    pub expected: u64,
    /// Records received (duplicates included).
    pub delivered: u64,
    /// `expected - delivered` (0 when more arrived than expected).
    pub lost: u64,
    /// `lost / expected`, percent.
    pub loss_pct: f64,
    /// Deliveries whose sequence was not above the last one seen from the same publisher on the
    /// same subscriber (out of order or duplicated).
    pub reordered: u64,
    /// Records of publishers not in this run (stragglers of an earlier run).
    pub stale: u64,
    /// Frames with the record marker that did not parse.
    pub malformed: u64,
    /// Other frames to subscribers (`error` replies are also in `server_errors`).
    pub foreign: u64,
    /// `error` frames subscribers received, by code.
    pub server_errors: Tally,
    /// `delivered` ÷ (last delivery − first send).
    pub delivered_per_s: f64,
    /// First send to last delivery, seconds.
    pub window_s: f64,
    /// Send → receive, µs.
    pub latency_us: Percentiles,
    /// Subscribers the server (or the network) disconnected during the run.
    pub subscriber_disconnects: u64,
    /// How they ended: `1008 slow consumer`, `eof`, ...
    pub close_reasons: Tally,
}

/// The JSON summary of a `fanout` run.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Header.
    #[serde(flatten)]
    pub meta: Meta,
    /// Parameters.
    pub opts: FanoutParams,
    /// Subscriber connect phase.
    pub connect: ConnectReport,
    /// Publishing.
    pub publish: PublishReport,
    /// Deliveries.
    pub delivery: DeliveryReport,
    /// CPU over publishing and drain (load generator, servers, Redis).
    pub cpu: CpuReport,
    /// Server CPU µs per delivery (with `--server-pid`).
    pub server_cpu_per_delivery_us: Option<f64>,
    /// Load-generator CPU µs per delivery.
    pub bench_cpu_per_delivery_us: f64,
}

#[derive(Debug)]
struct SubShared {
    delivered: AtomicU64,
    reordered: AtomicU64,
    stale: AtomicU64,
    malformed: AtomicU64,
    foreign: AtomicU64,
    last_recv_ns: AtomicU64,
    disconnects: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    server_errors: Mutex<Tally>,
    close_reasons: Mutex<Tally>,
}

#[derive(Debug)]
struct PubShared {
    sent: AtomicU64,
    acks: AtomicU64,
    errors: AtomicU64,
    disconnects: AtomicU64,
    error_codes: Mutex<Tally>,
    close_reasons: Mutex<Tally>,
    ack_latency: Mutex<Histogram<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Send times of the last [`RING`] publishes of one publisher, by sequence, for ack latency.
const RING: usize = 1 << 14;

#[derive(Debug)]
struct AckRing {
    seq: Vec<AtomicU64>,
    ts: Vec<AtomicU64>,
}

impl AckRing {
    fn new() -> Self {
        Self { seq: (0..RING).map(|_| AtomicU64::new(0)).collect(), ts: (0..RING).map(|_| AtomicU64::new(0)).collect() }
    }
}

/// Runs one fan-out (used by `fanout` and by every `max-rate` probe).
pub async fn run(ctx: &Ctx, p: FanoutParams, scenario: &'static str) -> Result<FanoutReport, RunError> {
    let meta = ctx.meta(scenario);
    if p.rate / p.publishers as f64 > 5000.0 {
        tracing::warn!(
            per_publisher = p.rate / p.publishers as f64,
            "above the gateway's default --publish-rate of 5000/s per socket: expect rate_limited errors (add --publishers)"
        );
    }
    let npub = u32::try_from(p.publishers).unwrap_or(u32::MAX);
    if u64::from(p.publisher_base) + u64::from(npub) > u64::from(payload::MAX_PUBLISHER) {
        return Err(RunError::Publisher(0, "publisher ids exhausted".to_owned()));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let subs = Arc::new(SubShared {
        delivered: AtomicU64::new(0),
        reordered: AtomicU64::new(0),
        stale: AtomicU64::new(0),
        malformed: AtomicU64::new(0),
        foreign: AtomicU64::new(0),
        last_recv_ns: AtomicU64::new(0),
        disconnects: AtomicU64::new(0),
        latency: Mutex::new(latency_histogram()),
        server_errors: Mutex::new(Tally::default()),
        close_reasons: Mutex::new(Tally::default()),
    });

    // Subscribers.
    let channel = p.channel.clone();
    let (conns, connect) =
        connect_many(ctx, "subscribers", p.subscribers, 0, p.read_buffer, |_| Some(channel.clone())).await;
    if conns.is_empty() {
        return Err(RunError::NoConnections(format!("{:?}", connect.errors.0)));
    }
    let n_subs = conns.len() as u64;
    let mut sub_tasks: Vec<JoinHandle<()>> = Vec::with_capacity(conns.len());
    for (_, conn) in conns {
        sub_tasks.push(tokio::spawn(subscriber(conn, Arc::clone(&subs), stop_rx.clone(), p.publisher_base, npub)));
    }

    // Publishers: start on the second node so that, with two nodes, half of the deliveries
    // cross the backplane whichever node a subscriber is on.
    let pubs = Arc::new(PubShared {
        sent: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        disconnects: AtomicU64::new(0),
        error_codes: Mutex::new(Tally::default()),
        close_reasons: Mutex::new(Tally::default()),
        ack_latency: Mutex::new(latency_histogram()),
    });
    let (pconns, pconnect) = connect_many(ctx, "publishers", p.publishers, 1, 4096, |_| None).await;
    if pconns.len() < p.publishers {
        stop_tx.send_replace(true);
        join_all(sub_tasks, Duration::from_secs(5)).await;
        return Err(RunError::Publisher(pconns.len(), format!("{:?}", pconnect.errors.0)));
    }

    let target = p.target_messages();
    let cpu = CpuWatch::start(&ctx.common.server_pids, ctx.common.redis_pid);
    let start = Instant::now() + Duration::from_millis(20);
    let start_ns = now_ns() + 20_000_000;
    let progress = {
        let (subs, pubs) = (Arc::clone(&subs), Arc::clone(&pubs));
        let mut last = (std::time::Instant::now(), 0u64, crate::sys::cpu_seconds(None).unwrap_or(0.0));
        let t0 = std::time::Instant::now();
        Progress::start(ctx.progress, Duration::from_secs(1), move || {
            let now = std::time::Instant::now();
            let d = subs.delivered.load(Relaxed);
            let c = crate::sys::cpu_seconds(None).unwrap_or(0.0);
            let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
            let line = format!(
                "fanout {:>5.1}s | sent {}/{} acks {} err {} | delivered {} ({}/s) | sub disc {} | bench cpu {:.0}%",
                t0.elapsed().as_secs_f64(),
                si(pubs.sent.load(Relaxed) as f64),
                si(target as f64),
                si(pubs.acks.load(Relaxed) as f64),
                pubs.errors.load(Relaxed),
                si(d as f64),
                si((d - last.1) as f64 / dt),
                subs.disconnects.load(Relaxed),
                (c - last.2) / dt * 100.0,
            );
            last = (now, d, c);
            line
        })
    };

    let mut writers = Vec::with_capacity(pconns.len());
    let mut readers = Vec::with_capacity(pconns.len());
    for (j, (_, conn)) in pconns.into_iter().enumerate() {
        let id = p.publisher_base + j as u32;
        // Stagger the publishers evenly over one sending interval.
        let offset = Duration::from_secs_f64(j as f64 / p.rate);
        let WsConn { stream, reader, writer } = conn;
        let (rd, wr) = stream.into_split();
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        let ring = Arc::new(AckRing::new());
        readers.push(tokio::spawn(publisher_reader(
            rd,
            reader,
            Arc::clone(&wr),
            Arc::clone(&ring),
            Arc::clone(&pubs),
            stop_rx.clone(),
        )));
        writers.push(tokio::spawn(publisher_writer(
            wr,
            writer,
            ring,
            id,
            p.clone(),
            start + offset,
            Arc::clone(&pubs),
        )));
    }
    let send_bound = Duration::from_secs_f64(p.duration_s + 5.0);
    join_all(writers, send_bound).await;
    let send_end = Instant::now();

    // Drain: until everything arrived, nothing arrived for drain_idle, or drain_max passed.
    let sent = pubs.sent.load(Relaxed);
    let expected = sent * n_subs;
    let idle = Duration::from_secs_f64(p.drain_idle_s);
    let hard = send_end + Duration::from_secs_f64(p.drain_max_s);
    let mut seen = (subs.delivered.load(Relaxed), pubs.acks.load(Relaxed) + pubs.errors.load(Relaxed));
    let mut last_change = Instant::now();
    loop {
        let now = Instant::now();
        let cur = (subs.delivered.load(Relaxed), pubs.acks.load(Relaxed) + pubs.errors.load(Relaxed));
        let acks_done = !p.acks || cur.1 >= sent;
        if (cur.0 >= expected && acks_done) || now >= hard {
            break;
        }
        if cur != seen {
            seen = cur;
            last_change = now;
        } else if now.duration_since(last_change) >= idle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_report = cpu.stop();
    progress.finish();
    stop_tx.send_replace(true);
    join_all(readers, Duration::from_secs(5)).await;
    join_all(sub_tasks, Duration::from_secs(10)).await;

    let delivered = subs.delivered.load(Relaxed);
    let last_recv = subs.last_recv_ns.load(Relaxed);
    let window_s = if last_recv > start_ns { (last_recv - start_ns) as f64 / 1e9 } else { 0.0 };
    let lost = expected.saturating_sub(delivered);
    let send_window = send_end.duration_since(start).as_secs_f64().max(1e-9);
    let report = FanoutReport {
        meta,
        connect,
        publish: PublishReport {
            target,
            sent,
            sent_per_s: round3(sent as f64 / send_window),
            acks: pubs.acks.load(Relaxed),
            errors: pubs.errors.load(Relaxed),
            error_codes: lock(&pubs.error_codes).clone(),
            ack_latency_us: Percentiles::of(&lock(&pubs.ack_latency)),
            publisher_disconnects: pubs.disconnects.load(Relaxed),
            publisher_close_reasons: lock(&pubs.close_reasons).clone(),
        },
        delivery: DeliveryReport {
            expected,
            delivered,
            lost,
            loss_pct: if expected == 0 { 0.0 } else { lost as f64 * 100.0 / expected as f64 },
            reordered: subs.reordered.load(Relaxed),
            stale: subs.stale.load(Relaxed),
            malformed: subs.malformed.load(Relaxed),
            foreign: subs.foreign.load(Relaxed),
            server_errors: lock(&subs.server_errors).clone(),
            delivered_per_s: if window_s > 0.0 { round3(delivered as f64 / window_s) } else { 0.0 },
            window_s: round3(window_s),
            latency_us: Percentiles::of(&lock(&subs.latency)),
            subscriber_disconnects: subs.disconnects.load(Relaxed),
            close_reasons: lock(&subs.close_reasons).clone(),
        },
        server_cpu_per_delivery_us: cpu_report
            .server_cpu_s
            .filter(|_| delivered > 0)
            .map(|s| round3(s * 1e6 / delivered as f64)),
        bench_cpu_per_delivery_us: if delivered > 0 {
            round3(cpu_report.bench_cpu_s * 1e6 / delivered as f64)
        } else {
            0.0
        },
        cpu: cpu_report,
        opts: p,
    };
    Ok(report)
}

/// Awaits every task, at most `bound` in total; aborts those still running then.
pub async fn join_all(tasks: Vec<JoinHandle<()>>, bound: Duration) {
    let deadline = Instant::now() + bound;
    let mut late = 0usize;
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            abort.abort();
            late += 1;
        }
    }
    if late > 0 {
        tracing::debug!(late, "tasks aborted after the bound");
    }
}

enum Event {
    Stop,
    Read(Result<usize, crate::ws::WsError>),
}

/// Why a read ended the connection (end of stream or an error); `None` when it brought bytes.
fn read_failure(read: &Result<usize, crate::ws::WsError>) -> Option<String> {
    match read {
        Ok(0) => Some("eof".to_owned()),
        Err(e) => Some(e.label()),
        Ok(_) => None,
    }
}

/// Records one lost connection and why.
fn count_disconnect(disconnects: &AtomicU64, reasons: &Mutex<Tally>, why: String) {
    disconnects.fetch_add(1, Relaxed);
    lock(reasons).add(why, 1);
}

/// One subscriber: reads until stopped or disconnected, recording every record. Per read batch:
/// one clock reading, counters flushed to the shared atomics, latencies into the shared
/// histogram under one lock. Nothing allocated per delivery.
async fn subscriber(mut conn: WsConn, sh: Arc<SubShared>, mut stop: watch::Receiver<bool>, base: u32, npub: u32) {
    let mut last_seq = vec![0u64; npub as usize];
    let mut lat: Vec<u64> = Vec::with_capacity(256);
    let mut pong = [0u8; 125];
    loop {
        let ev = tokio::select! {
            biased;
            _ = stop.changed() => Event::Stop,
            r = conn.reader.fill(&mut conn.stream) => Event::Read(r),
        };
        let why = match ev {
            Event::Stop => {
                conn.close(Duration::from_secs(2)).await;
                return;
            }
            Event::Read(read) => read_failure(&read),
        };
        if let Some(why) = why {
            count_disconnect(&sh.disconnects, &sh.close_reasons, why);
            return;
        }
        let now = now_ns();
        let (mut n, mut reordered, mut stale, mut malformed, mut foreign) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut pong_len: Option<usize> = None;
        let mut closed: Option<String> = None;
        lat.clear();
        loop {
            let frame = match conn.reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    closed = Some(e.label());
                    break;
                }
            };
            match frame.opcode {
                Opcode::Text => match payload::find_record(frame.payload) {
                    Found::Record(Record { publisher, seq, ts_ns, .. }) => {
                        let idx = publisher.wrapping_sub(base);
                        if idx >= npub {
                            stale += 1;
                            continue;
                        }
                        n += 1;
                        lat.push(now.saturating_sub(ts_ns) / 1000);
                        let last = &mut last_seq[idx as usize];
                        if seq <= *last {
                            reordered += 1;
                        } else {
                            *last = seq;
                        }
                    }
                    Found::Malformed => malformed += 1,
                    Found::None => {
                        foreign += 1;
                        if let Reply::Error(_, code) = payload::classify(frame.payload) {
                            lock(&sh.server_errors).add(code.as_str(), 1);
                        }
                    }
                },
                Opcode::Ping => {
                    let len = frame.payload.len().min(pong.len());
                    pong[..len].copy_from_slice(&frame.payload[..len]);
                    pong_len = Some(len);
                }
                Opcode::Close => {
                    let (code, reason) = frame.close_info();
                    closed = Some(match code {
                        Some(c) => format!("{c} {reason}"),
                        None => "close (no code)".to_owned(),
                    });
                    break;
                }
                _ => foreign += 1,
            }
        }
        if n > 0 {
            sh.delivered.fetch_add(n, Relaxed);
            sh.last_recv_ns.fetch_max(now, Relaxed);
            let mut h = lock(&sh.latency);
            for &us in &lat {
                record(&mut h, us);
            }
        }
        for (counter, v) in
            [(&sh.reordered, reordered), (&sh.stale, stale), (&sh.malformed, malformed), (&sh.foreign, foreign)]
        {
            if v > 0 {
                counter.fetch_add(v, Relaxed);
            }
        }
        if let Some(why) = closed {
            sh.disconnects.fetch_add(1, Relaxed);
            lock(&sh.close_reasons).add(why, 1);
            return;
        }
        if let Some(len) = pong_len {
            conn.writer.push(Opcode::Pong, &pong[..len]);
            if conn.writer.flush(&mut conn.stream).await.is_err() {
                sh.disconnects.fetch_add(1, Relaxed);
                lock(&sh.close_reasons).add("error sending pong", 1);
                return;
            }
        }
    }
}

/// One publisher's sending side: message k is due at `start + k / (rate / P)`; when behind
/// schedule it sends everything due (at most `max_batch`) with one write. Stops once the target
/// is sent, or at `start + duration + 1 s` if the server pushed back so hard that it could not.
async fn publisher_writer(
    wr: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    mut writer: FrameWriter,
    ring: Arc<AckRing>,
    id: u32,
    p: FanoutParams,
    start: Instant,
    sh: Arc<PubShared>,
) {
    let rate = p.rate / p.publishers as f64;
    let total = (rate * p.duration_s).floor() as u64;
    let hard_end = start + Duration::from_secs_f64(p.duration_s + 1.0);
    let mut frame = PublishFrame::new(&p.channel, p.payload, p.acks);
    let mut sent = 0u64;
    tokio::time::sleep_until(start).await;
    while sent < total {
        let now = Instant::now();
        if now >= hard_end {
            tracing::debug!(id, sent, total, "publisher could not send everything in time");
            break;
        }
        let due = (((now.duration_since(start).as_secs_f64()) * rate).floor() as u64 + 1).min(total);
        let n = due.saturating_sub(sent).min(p.max_batch as u64);
        if n > 0 {
            for _ in 0..n {
                sent += 1;
                let ts = now_ns();
                let slot = (sent as usize) & (RING - 1);
                ring.seq[slot].store(sent, Relaxed);
                ring.ts[slot].store(ts, Relaxed);
                writer.push(Opcode::Text, frame.stamp(Record { publisher: id, seq: sent, ts_ns: ts }));
            }
            let mut w = wr.lock().await;
            match tokio::time::timeout_at(hard_end, writer.flush(&mut *w)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(id, error = %e, "publisher write failed");
                    sh.sent.fetch_add(n, Relaxed);
                    return;
                }
                Err(_) => {
                    tracing::debug!(id, "publisher write blocked past the deadline");
                    return;
                }
            }
            sh.sent.fetch_add(n, Relaxed);
        }
        if sent < total {
            let next = start + Duration::from_secs_f64(sent as f64 / rate);
            if next > Instant::now() {
                tokio::time::sleep_until(next.min(hard_end)).await;
            }
        }
    }
}

/// One publisher's receiving side: counts `ok` and `error` replies, measures publish → `ok`,
/// answers pings; on stop, sends a close frame.
async fn publisher_reader(
    mut rd: OwnedReadHalf,
    mut reader: FrameReader,
    wr: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    ring: Arc<AckRing>,
    sh: Arc<PubShared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ctl = FrameWriter::new(64, crate::sys::now_ns());
    let mut lat: Vec<u64> = Vec::with_capacity(64);
    loop {
        let ev = tokio::select! {
            biased;
            _ = stop.changed() => Event::Stop,
            r = reader.fill(&mut rd) => Event::Read(r),
        };
        let why = match ev {
            Event::Stop => {
                ctl.push(Opcode::Close, &1000u16.to_be_bytes());
                let mut w = wr.lock().await;
                let _ = tokio::time::timeout(Duration::from_secs(1), ctl.flush(&mut *w)).await;
                return;
            }
            Event::Read(read) => read_failure(&read),
        };
        if let Some(why) = why {
            count_disconnect(&sh.disconnects, &sh.close_reasons, why);
            return;
        }
        let now = now_ns();
        let (mut acks, mut errors) = (0u64, 0u64);
        let mut closed = None;
        lat.clear();
        while let Ok(Some(f)) = reader.next_frame() {
            match f.opcode {
                Opcode::Text => match payload::classify(f.payload) {
                    Reply::Ok(Some(seq)) => {
                        acks += 1;
                        let slot = (seq as usize) & (RING - 1);
                        if ring.seq[slot].load(Relaxed) == seq {
                            lat.push(now.saturating_sub(ring.ts[slot].load(Relaxed)) / 1000);
                        }
                    }
                    Reply::Error(_, code) => {
                        errors += 1;
                        lock(&sh.error_codes).add(code.as_str(), 1);
                    }
                    _ => {}
                },
                Opcode::Ping => ctl.push(Opcode::Pong, f.payload),
                Opcode::Close => {
                    let (code, reason) = f.close_info();
                    closed = Some(code.map_or_else(|| "close (no code)".to_owned(), |c| format!("{c} {reason}")));
                    break;
                }
                _ => {}
            }
        }
        sh.acks.fetch_add(acks, Relaxed);
        sh.errors.fetch_add(errors, Relaxed);
        if !lat.is_empty() {
            let mut h = lock(&sh.ack_latency);
            for &us in &lat {
                record(&mut h, us);
            }
        }
        if let Some(why) = closed {
            sh.disconnects.fetch_add(1, Relaxed);
            lock(&sh.close_reasons).add(why, 1);
            return;
        }
        if ctl.pending() > 0 {
            let mut w = wr.lock().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), ctl.flush(&mut *w)).await;
        }
    }
}
