//! The node: owns the hub, the backplane, metrics, readiness and the shutdown tree, and runs the
//! subscribe / unsubscribe / publish lifecycle that every socket and the HTTP API go through.

use crate::auth::Authenticator;
use crate::backplane::memory::MemoryBackplane;
use crate::backplane::redis::RedisBackplane;
use crate::backplane::{Backplane, BackplaneError, PublishAck};
use crate::config::Config;
use crate::connection::linger::WriteBudget;
use crate::connection::outbox::{CloseSwitch, ConnId};
use crate::connection::roster::Roster;
use crate::hub::Hub;
use crate::hub::feed::Reader;
use crate::limits::ConnectionLimits;
use crate::metrics::Metrics;
use gateway_protocol::{ChannelName, ErrorCode, encode_message};
use serde_json::value::RawValue;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The JWT key could not be loaded.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthSetupError),
    /// The Redis URL is not usable.
    #[error("redis: {0}")]
    Redis(String),
}

/// Why a subscribe or publish failed; maps to one wire error code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The backplane cannot take the operation now.
    #[error(transparent)]
    Backplane(#[from] BackplaneError),
}

impl CommandError {
    /// The stable error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Backplane(_) => ErrorCode::BackplaneUnavailable,
        }
    }
}

/// Where a publish came from (a metrics label).
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A WebSocket client.
    Socket,
    /// `POST /api/publish`.
    Http,
}

/// One gateway node.
pub struct Node {
    config: Arc<Config>,
    node_id: String,
    hub: Arc<Hub>,
    backplane: Arc<dyn Backplane>,
    metrics: Metrics,
    auth: Option<Authenticator>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    roster: Arc<Roster>,
    write_budget: Arc<WriteBudget>,
    draining: AtomicBool,
    /// Serialises subscribe/unsubscribe per channel stripe, held across the backplane call.
    stripes: Box<[tokio::sync::Mutex<()>]>,
    next_conn: AtomicU64,
}

impl Node {
    /// Builds a node from a validated configuration. `shutdown` is the root of every task's
    /// cancellation; cancelling it starts the drain (see [`crate::http::serve`]).
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Arc<Self>, StartError> {
        config.validate()?;
        let node_id = config.node_id();
        let metrics = Metrics::new(&node_id);
        let hub = Arc::new(Hub::new(metrics.clone(), config.queue_size));
        let tracker = TaskTracker::new();
        let backplane: Arc<dyn Backplane> = match &config.redis_url {
            None => {
                metrics.backplane_up.set(1);
                Arc::new(MemoryBackplane::new(hub.clone()))
            }
            Some(url) => {
                RedisBackplane::start(url, &config, &node_id, hub.clone(), metrics.clone(), shutdown.clone(), &tracker)
                    .map_err(|e| StartError::Redis(e.to_string()))?
            }
        };
        let auth = Authenticator::from_config(&config)?;
        let limits = ConnectionLimits::new(&config);
        let roster = Arc::new(Roster::default());
        let write_budget = Arc::new(WriteBudget::new(write_rate(&config), metrics.busy_sockets.clone()));
        // Sockets do not watch the shutdown token themselves (see `connection::roster`).
        tracker.spawn({
            let (roster, shutdown) = (roster.clone(), shutdown.clone());
            async move {
                shutdown.cancelled().await;
                roster.close_all();
            }
        });
        metrics.ready.set(1);
        Ok(Arc::new(Self {
            config: Arc::new(config),
            node_id,
            hub,
            backplane,
            metrics,
            auth,
            limits,
            shutdown,
            tracker,
            roster,
            write_budget,
            draining: AtomicBool::new(false),
            stripes: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            next_conn: AtomicU64::new(1),
        }))
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The write budget its busy sockets share (see [`crate::connection::linger`]).
    pub fn write_budget(&self) -> &Arc<WriteBudget> {
        &self.write_budget
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The local hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The token authenticator, when JWT auth is on.
    pub fn auth(&self) -> Option<&Authenticator> {
        self.auth.as_ref()
    }

    /// Per-node and per-IP connection limits.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// The root cancellation token: cancelled when the node shuts down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Tracks every task the node spawns, sockets included.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Every live socket of the node.
    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Ready: accepting new sockets and the backplane is connected.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.backplane.is_up()
    }

    /// Whether the node is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Turns the node unready for good: the first step of a shutdown.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.metrics.ready.set(0);
    }

    fn stripe(&self, channel: &ChannelName) -> &tokio::sync::Mutex<()> {
        &self.stripes[self.hub.stripe(channel.as_str()) % self.stripes.len()]
    }

    /// Subscribes socket `conn` (controlled by `switch`) to `channel`; returns, once the
    /// subscription is live cluster-wide, the socket's reader of the channel, which holds every
    /// message delivered on this node since the socket joined the hub. On failure the hub is
    /// left as it was.
    pub async fn subscribe(
        &self,
        conn: ConnId,
        switch: Arc<CloseSwitch>,
        channel: &ChannelName,
    ) -> Result<Reader, CommandError> {
        if !self.backplane.is_up() {
            return Err(BackplaneError::Unavailable("backplane is not connected".into()).into());
        }
        let _serialised = self.stripe(channel).lock().await;
        let (reader, first) = self.hub.add(channel, conn, switch);
        if first && let Err(e) = self.backplane.subscribe(channel).await {
            self.hub.remove(channel.as_str(), conn);
            return Err(e.into());
        }
        Ok(reader)
    }

    /// Unsubscribes socket `conn` from `channel`, and the node from the backplane channel when
    /// it was the last local subscriber.
    pub async fn unsubscribe(&self, conn: ConnId, channel: &ChannelName) {
        let _serialised = self.stripe(channel).lock().await;
        if self.hub.remove(channel.as_str(), conn)
            && let Err(e) = self.backplane.unsubscribe(channel).await
        {
            tracing::debug!(%channel, error = %e, "backplane unsubscribe failed");
        }
    }

    /// Removes a departed socket from every channel it had, synchronously; channels left without
    /// a local subscriber are released from the backplane in the background.
    pub fn forget(self: &Arc<Self>, conn: ConnId, channels: impl IntoIterator<Item = ChannelName>) {
        for channel in channels {
            if self.hub.remove(channel.as_str(), conn) && !self.shutdown.is_cancelled() {
                let node = self.clone();
                self.tracker.spawn(async move {
                    let _serialised = node.stripe(&channel).lock().await;
                    // Someone may have subscribed again while this task waited for the stripe.
                    if !node.hub.has_subscribers(channel.as_str())
                        && let Err(e) = node.backplane.unsubscribe(&channel).await
                    {
                        tracing::debug!(%channel, error = %e, "backplane unsubscribe failed");
                    }
                });
            }
        }
    }

    /// Encodes the `message` frame once and hands it to the backplane right away, so the
    /// message's place in the channel's order is fixed when this returns. The returned
    /// [`Published`] resolves once the backplane accepted (or refused) it.
    pub fn publish(self: &Arc<Self>, channel: &ChannelName, data: &RawValue, source: Source) -> Published {
        let ack = if self.backplane.is_up() {
            self.backplane.publish(channel, encode_message(channel.as_str(), data))
        } else {
            PublishAck::refused(BackplaneError::Unavailable("backplane is not connected".into()))
        };
        Published { ack, started: Instant::now(), source, node: self.clone() }
    }

    /// The backplane in use.
    pub fn backplane(&self) -> &dyn Backplane {
        &*self.backplane
    }
}

/// A publish on its way: resolves once the backplane accepted or refused the message, and
/// records the outcome in the metrics.
pub struct Published {
    ack: PublishAck,
    started: Instant,
    source: Source,
    node: Arc<Node>,
}

impl Future for Published {
    type Output = Result<(), CommandError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let outcome = std::task::ready!(Pin::new(&mut self.ack).poll(cx));
        let metrics = &self.node.metrics;
        Poll::Ready(match outcome {
            Ok(()) => {
                metrics.publish_latency.observe(self.started.elapsed().as_secs_f64());
                let label = match self.source {
                    Source::Socket => "ws",
                    Source::Http => "http",
                };
                metrics.messages_published.with_label_values(&[label]).inc();
                Ok(())
            }
            Err(e) => {
                metrics.backplane_publish_errors.inc();
                Err(e.into())
            }
        })
    }
}

/// Writes a second per runtime worker thread that a node's busy sockets may make together by
/// default: at the 5-12 us of kernel and runtime work one write costs on a small virtual
/// machine, under a tenth of each core (docs/operations.md, Write budget).
const WRITES_PER_WORKER: u32 = 7_500;

/// `--write-rate`, or its default for the runtime the node runs on.
fn write_rate(config: &Config) -> u32 {
    config.write_rate.unwrap_or_else(|| {
        let workers = tokio::runtime::Handle::try_current().map_or(1, |runtime| runtime.metrics().num_workers());
        WRITES_PER_WORKER.saturating_mul(u32::try_from(workers).unwrap_or(u32::MAX))
    })
}
