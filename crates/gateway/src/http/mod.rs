//! HTTP: the router, and the accept loop that serves it and runs the graceful drain.
//!
//! Connections are served with hyper directly (not `axum::serve`) so that the header read has a
//! deadline (slowloris guard) and every connection task is tracked for shutdown.

mod api;
mod echo;
mod error;
mod upgrade;
mod ws;

pub use error::ApiError;

use crate::node::Node;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Every route of a node.
pub fn router(node: Arc<Node>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/api/publish", post(api::publish).layer(DefaultBodyLimit::max(node.config().max_message_size)))
        .route("/metrics", get(api::metrics))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz));
    if node.config().echo_endpoint {
        router = router.route("/test/echo", get(echo::upgrade));
    }
    router.with_state(node)
}

/// Serves `listener` until `signal` resolves, then drains: /readyz turns 503, the listener
/// closes, every socket is closed with 1001 after flushing, and the call returns once every task
/// ended or the shutdown grace ran out.
pub async fn serve(node: Arc<Node>, listener: TcpListener, signal: impl Future<Output = ()>) {
    let app = router(node.clone());
    let stop = node.shutdown_token().clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(node.config().handshake_timeout);
    tokio::pin!(signal);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut signal => break,
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(request)
        });
        let connection = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let stop = stop.clone();
        node.tracker().spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    drain(&node).await;
}

async fn drain(node: &Node) {
    tracing::info!(sockets = node.metrics().connections.get(), "draining");
    node.begin_drain();
    node.shutdown_token().cancel();
    node.tracker().close();
    let grace = node.config().shutdown_grace;
    if tokio::time::timeout(grace, node.tracker().wait()).await.is_err() {
        tracing::warn!(?grace, left = node.tracker().len(), "shutdown grace ran out");
    }
    tracing::info!("drained");
}
