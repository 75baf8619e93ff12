//! A horizontally scalable WebSocket pub/sub gateway node.
//!
//! # Map
//! - [`config`]: every option (clap flags and environment variables) and their defaults.
//! - [`node`]: the [`Node`]; hub, backplane, metrics, readiness, shutdown tree, and the
//!   subscribe / unsubscribe / publish lifecycle.
//! - [`hub`]: local routing, channel -> this node's subscribers, sharded.
//! - [`connection`]: one socket's life; [`connection::outbox`] holds its bounded reply
//!   queue and its close switch.
//! - [`backplane`]: the [`Backplane`](backplane::Backplane) seam, with in-memory and Redis
//!   implementations.
//! - [`http`]: the router (`/ws`, `/api/publish`, `/metrics`, `/healthz`, `/readyz`) and the
//!   accept loop with its graceful drain.
//! - [`auth`]: JWT verification and channel grants; [`limits`]: connection caps, client IP,
//!   the token bucket behind each socket's rate budgets.
//! - [`metrics`]: the Prometheus metrics.
//!
//! # The life of one published message
//! A text frame arrives in [`connection`]; the `protocol` crate decodes it, keeping `data` as raw
//! JSON. [`Node::publish`] encodes the outgoing `message` frame once and hands it to the
//! backplane, without touching the hub. The Redis backplane PUBLISHes it; Redis sends it to every
//! node subscribed to that channel, the publisher's own node included, so every node sees one
//! order. Each node's subscriber task frames the text once as a WebSocket frame
//! ([`connection::frame::Frame`]) and passes it to [`hub::Hub::deliver`], which appends it once
//! to the channel's [`hub::feed::Feed`] without waiting (a subscriber that falls a queue behind
//! is closed as a slow consumer). Each socket's task, when its linger ends, writes the feed's
//! frames from its own position, many frames per write. With the in-memory backplane,
//! publish frames and calls `deliver` directly.

pub mod auth;
pub mod backplane;
pub mod config;
pub mod connection;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod node;

pub use config::Config;
pub use node::{Node, StartError};

use std::future::Future;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Runs a node on `listener` until `signal` resolves, then drains it and returns.
pub async fn run(config: Config, listener: TcpListener, signal: impl Future<Output = ()>) -> Result<(), StartError> {
    let node = Node::start(config, CancellationToken::new()).await?;
    tracing::info!(
        node = node.node_id(),
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        backplane = node.backplane().kind(),
        "gateway node serving"
    );
    http::serve(node, listener, signal).await;
    Ok(())
}
