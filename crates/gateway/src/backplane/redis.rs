//! The Redis backplane: Redis pub/sub carries every message to every interested node.
//!
//! - **Publishing** goes through a few "lanes", chosen by channel so one channel always uses one
//!   lane. A lane is a task with a queue and a long-lived connection from a deadpool pool (which
//!   creates and health-checks it). The task sends everything queued as one pipeline per round
//!   trip, in queue order, and answers each publisher when Redis replied. Publishers never wait
//!   for one another, and a channel's order is fixed the moment a message enters its lane.
//! - **Receiving** uses one pub/sub connection per node, owned by a supervisor task that
//!   reconnects forever with jittered exponential backoff and re-subscribes every channel that
//!   still has local subscribers. Its reader never waits on a socket: it hands each frame to the
//!   hub, which only does non-blocking queue pushes.
//! - **The canary** publishes a probe on this node's private channel and expects it back on the
//!   subscriber connection; a missing probe marks the backplane down (so /readyz fails) and
//!   restarts the subscriber, which catches a connection that looks alive but delivers nothing.
//!
//! Redis channel names are always `prefix + validated channel name`; the canary channel holds a
//! `#`, which no client channel name can, so clients cannot reach it.

use super::{Backplane, BackplaneError, PublishAck};
use crate::config::Config;
use crate::connection::frame::Frame;
use crate::hub::Hub;
use crate::metrics::Metrics;
use async_trait::async_trait;
use deadpool_redis::{Pool, Runtime};
use futures_util::StreamExt;
use gateway_protocol::ChannelName;
use parking_lot::{Mutex, RwLock};
use rand::Rng;
use redis::aio::{MultiplexedConnection, PubSubSink};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const LANES: usize = 4;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const SUBSCRIBE_BATCH: usize = 256;
/// Publishes waiting in one lane; beyond it, publishes are refused rather than queued.
const LANE_QUEUE: usize = 8192;
/// Most publishes sent to Redis in one pipeline.
const LANE_BATCH: usize = 512;

/// One publish waiting in a lane.
struct PublishRequest {
    channel: String,
    payload: String,
    ack: oneshot::Sender<Result<(), BackplaneError>>,
}

/// A Redis URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis configuration: {0}")]
pub struct RedisSetupError(String);

/// The Redis implementation of [`Backplane`].
pub struct RedisBackplane {
    shared: Arc<Shared>,
}

struct Shared {
    prefix: String,
    canary_channel: String,
    client: redis::Client,
    lanes: Box<[mpsc::Sender<PublishRequest>]>,
    /// Bumped when the subscriber reconnects: lanes then reopen their connections too.
    epoch: Arc<AtomicU64>,
    hub: Arc<Hub>,
    metrics: Metrics,
    timeout: Duration,
    /// Subscriber connected, re-subscribed, and the last probe (if any) came back.
    up: AtomicBool,
    /// Channels this node wants from Redis (those with local subscribers).
    wanted: Mutex<HashSet<ChannelName>>,
    /// The live subscriber connection's command half; `None` while reconnecting.
    sink: RwLock<Option<PubSubSink>>,
    /// Asks the supervisor to drop and re-open the subscriber connection.
    restart: Notify,
    /// The last probe sequence number seen on the subscriber connection.
    probe_seen: watch::Sender<u64>,
}

impl RedisBackplane {
    /// Creates the backplane and starts its supervisor and canary tasks on `tracker`. Redis
    /// need not be up yet: the node starts unready and connects as soon as it can.
    pub fn start(
        url: &str,
        config: &Config,
        node_id: &str,
        hub: Arc<Hub>,
        metrics: Metrics,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Self>, RedisSetupError> {
        let client = redis::Client::open(url).map_err(|e| RedisSetupError(e.to_string()))?;
        let mut pool_config = deadpool_redis::Config::from_url(url);
        let mut pool_settings = deadpool_redis::PoolConfig::new(LANES * 2);
        pool_settings.timeouts.wait = Some(config.redis_timeout);
        pool_settings.timeouts.create = Some(config.redis_timeout);
        pool_settings.timeouts.recycle = Some(config.redis_timeout);
        pool_config.pool = Some(pool_settings);
        let pool = pool_config.create_pool(Some(Runtime::Tokio1)).map_err(|e| RedisSetupError(e.to_string()))?;
        let epoch = Arc::new(AtomicU64::new(0));
        let lanes = (0..LANES)
            .map(|_| {
                let (tx, rx) = mpsc::channel(LANE_QUEUE);
                let lane = Lane { pool: pool.clone(), epoch: epoch.clone(), timeout: config.redis_timeout };
                tracker.spawn(lane.run(rx, shutdown.clone()));
                tx
            })
            .collect();
        let shared = Arc::new(Shared {
            prefix: config.redis_prefix.clone(),
            canary_channel: format!("{}#canary:{node_id}", config.redis_prefix),
            client,
            lanes,
            epoch,
            hub,
            metrics,
            timeout: config.redis_timeout,
            up: AtomicBool::new(false),
            wanted: Mutex::new(HashSet::new()),
            sink: RwLock::new(None),
            restart: Notify::new(),
            probe_seen: watch::channel(0).0,
        });
        shared.metrics.backplane_up.set(0);
        tracker.spawn(shared.clone().supervise(shutdown.clone()));
        tracker.spawn(shared.clone().canary(config.canary_interval, config.canary_timeout, shutdown));
        Ok(Arc::new(Self { shared }))
    }
}

impl Shared {
    fn redis_channel(&self, channel: &ChannelName) -> String {
        let mut name = String::with_capacity(self.prefix.len() + channel.as_str().len());
        name.push_str(&self.prefix);
        name.push_str(channel.as_str());
        name
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            self.metrics.backplane_up.set(i64::from(up));
            if up {
                tracing::info!("backplane up");
            } else {
                tracing::warn!("backplane down");
            }
        }
    }

    /// Queues a PUBLISH in `lane`; its place in the channel's order is fixed on return.
    fn enqueue(&self, lane: usize, channel: String, payload: String) -> PublishAck {
        let (ack, answer) = oneshot::channel();
        match self.lanes[lane].try_send(PublishRequest { channel, payload, ack }) {
            Ok(()) => PublishAck::Waiting(answer),
            Err(mpsc::error::TrySendError::Full(_)) => {
                PublishAck::refused(BackplaneError::Unavailable("backplane overloaded: publish queue full".into()))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                PublishAck::refused(BackplaneError::Unavailable("the backplane stopped".into()))
            }
        }
    }

    /// Keeps one subscriber connection alive for the life of the node.
    async fn supervise(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_START;
        let mut connected_before = false;
        while !shutdown.is_cancelled() {
            match self.connect_subscriber().await {
                Ok(stream) => {
                    if connected_before {
                        self.metrics.backplane_reconnects.inc();
                        // Whatever broke the subscriber connection likely broke the publishing
                        // ones too: lanes start afresh rather than fail a client's publish.
                        self.epoch.fetch_add(1, Ordering::AcqRel);
                    }
                    connected_before = true;
                    backoff = BACKOFF_START;
                    self.set_up(true);
                    self.read(stream, &shutdown).await;
                    self.set_up(false);
                    *self.sink.write() = None;
                }
                Err(e) => {
                    tracing::debug!(error = %e, ?backoff, "Redis subscriber connection failed; retrying");
                }
            }
            // Full jitter: a fleet of nodes does not reconnect in lock step.
            let pause = rand::rng().random_range(backoff / 2..=backoff);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        self.set_up(false);
    }

    /// Opens the pub/sub connection and subscribes the canary and every wanted channel.
    async fn connect_subscriber(&self) -> Result<redis::aio::PubSubStream, BackplaneError> {
        let unavailable = |e: String| BackplaneError::Unavailable(e);
        let pubsub = timeout(self.timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| unavailable("connecting to Redis timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        let (mut sink, stream) = pubsub.split();
        timeout(self.timeout, sink.subscribe(&self.canary_channel))
            .await
            .map_err(|_| unavailable("SUBSCRIBE timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        // Publish the sink before listing wanted channels: a subscribe racing with this either
        // lands in the list or finds the sink and subscribes itself (SUBSCRIBE is idempotent).
        *self.sink.write() = Some(sink.clone());
        let wanted: Vec<String> = self.wanted.lock().iter().map(|c| self.redis_channel(c)).collect();
        for batch in wanted.chunks(SUBSCRIBE_BATCH) {
            timeout(self.timeout, sink.subscribe(batch))
                .await
                .map_err(|_| unavailable("re-SUBSCRIBE timed out".into()))?
                .map_err(|e| unavailable(e.to_string()))?;
        }
        tracing::info!(channels = wanted.len(), "Redis subscriber connected");
        Ok(stream)
    }

    /// Hands every message to the hub until the connection ends or a restart is asked.
    async fn read(&self, mut stream: redis::aio::PubSubStream, shutdown: &CancellationToken) {
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.restart.notified() => return,
                message = stream.next() => message,
            };
            let Some(message) = message else {
                tracing::warn!("Redis subscriber connection lost");
                return;
            };
            let name = message.get_channel_name();
            if name == self.canary_channel {
                let seq = std::str::from_utf8(message.get_payload_bytes()).ok().and_then(|s| s.parse().ok());
                if let Some(seq) = seq {
                    self.probe_seen.send_replace(seq);
                }
                continue;
            }
            let Some(channel) = name.strip_prefix(self.prefix.as_str()) else { continue };
            match Frame::text_from_utf8(message.get_payload_bytes()) {
                Ok(frame) => {
                    self.hub.deliver(channel, &frame);
                }
                Err(_) => self.metrics.messages_dropped.with_label_values(&["invalid_frame"]).inc(),
            }
        }
    }

    /// Sends a probe every `interval` and expects it back within `deadline`.
    async fn canary(self: Arc<Self>, interval: Duration, deadline: Duration, shutdown: CancellationToken) {
        let mut seen = self.probe_seen.subscribe();
        let mut seq = 0u64;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            if self.sink.read().is_none() {
                continue; // the supervisor is reconnecting
            }
            seq += 1;
            let payload = seq.to_string();
            let lane = (seq as usize) % LANES;
            let probe = async {
                self.enqueue(lane, self.canary_channel.clone(), payload).await.ok()?;
                seen.wait_for(|s| *s >= seq).await.ok().map(|_| ())
            };
            if timeout(deadline, probe).await.ok().flatten().is_none() && !shutdown.is_cancelled() {
                self.metrics.canary_failures.inc();
                tracing::warn!(seq, "backplane probe did not come back; restarting the subscriber");
                self.set_up(false);
                // Only a reader that is running can be restarted; a missed signal is repeated by
                // the next failing probe.
                self.restart.notify_waiters();
            }
        }
    }
}

/// A publishing lane: a queue drained by one task over one connection.
struct Lane {
    pool: Pool,
    epoch: Arc<AtomicU64>,
    timeout: Duration,
}

impl Lane {
    /// Sends what is queued as one pipeline, waits for Redis, answers every publisher, repeats.
    async fn run(self, mut queue: mpsc::Receiver<PublishRequest>, shutdown: CancellationToken) {
        let mut connection: Option<(u64, MultiplexedConnection)> = None;
        let mut batch = Vec::with_capacity(LANE_BATCH);
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = queue.recv_many(&mut batch, LANE_BATCH) => received,
            };
            if received == 0 {
                return;
            }
            let outcome = self.send(&mut connection, &batch).await;
            if outcome.is_err() {
                connection = None;
            }
            for request in batch.drain(..) {
                let _ = request.ack.send(outcome.clone());
            }
        }
    }

    async fn send(
        &self,
        connection: &mut Option<(u64, MultiplexedConnection)>,
        batch: &[PublishRequest],
    ) -> Result<(), BackplaneError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let conn = match connection {
            Some((opened_at, conn)) if *opened_at == epoch => conn,
            _ => {
                let pooled = self.pool.get().await.map_err(|e| BackplaneError::Unavailable(e.to_string()))?;
                &mut connection.insert((epoch, deadpool_redis::Connection::take(pooled))).1
            }
        };
        let mut pipeline = redis::pipe();
        for request in batch {
            pipeline.cmd("PUBLISH").arg(&request.channel).arg(request.payload.as_bytes()).ignore();
        }
        match timeout(self.timeout, pipeline.query_async::<()>(conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BackplaneError::Unavailable(e.to_string())),
            Err(_) => Err(BackplaneError::Unavailable("Redis did not answer PUBLISH in time".into())),
        }
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    fn publish(&self, channel: &ChannelName, message: String) -> PublishAck {
        let s = &self.shared;
        let lane = s.hub.stripe(channel.as_str()) % LANES;
        s.enqueue(lane, s.redis_channel(channel), message)
    }

    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BackplaneError> {
        let s = &self.shared;
        s.wanted.lock().insert(channel.clone());
        let sink = s.sink.read().clone();
        let result = match sink {
            None => Err(BackplaneError::Unavailable("Redis subscriber is reconnecting".into())),
            Some(mut sink) => match timeout(s.timeout, sink.subscribe(s.redis_channel(channel))).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(BackplaneError::Unavailable(e.to_string())),
                Err(_) => Err(BackplaneError::Unavailable("Redis did not confirm SUBSCRIBE in time".into())),
            },
        };
        if result.is_err() {
            s.wanted.lock().remove(channel);
        }
        result
    }

    async fn unsubscribe(&self, channel: &ChannelName) -> Result<(), BackplaneError> {
        let s = &self.shared;
        s.wanted.lock().remove(channel);
        let Some(mut sink) = s.sink.read().clone() else { return Ok(()) };
        match timeout(s.timeout, sink.unsubscribe(s.redis_channel(channel))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BackplaneError::Unavailable(e.to_string())),
            Err(_) => Err(BackplaneError::Unavailable("Redis did not confirm UNSUBSCRIBE in time".into())),
        }
    }

    fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
