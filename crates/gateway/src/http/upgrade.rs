//! The WebSocket upgrade itself: the handshake is checked and answered here, with tungstenite's
//! server handshake, rather than by axum's extractor, so that a socket's task owns the upgraded
//! connection, taken back from hyper as the TCP stream it is (see
//! [`crate::connection::transport`]): it writes pre-encoded frames to it directly (see
//! [`crate::connection::frame`]) and leaves reading, control frames and the close handshake to
//! tungstenite.

use super::error::ApiError;
use crate::config::Config;
use crate::connection::WsStream;
use crate::connection::transport;
use crate::node::Node;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use gateway_protocol::ErrorCode;
use hyper::upgrade::OnUpgrade;
use std::future::Future;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

/// A valid upgrade request, not answered yet.
pub(super) struct Upgrade {
    response: Response,
    on_upgrade: OnUpgrade,
}

impl Upgrade {
    /// Checks `request`'s handshake (method, `Connection`, `Upgrade`, `Sec-WebSocket-Version: 13`,
    /// `Sec-WebSocket-Key`); a bad one is a 400 that says what is wrong.
    pub(super) fn check(request: &mut Request) -> Result<Self, ApiError> {
        let response =
            tungstenite::handshake::server::create_response_with_body(request, Body::empty).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, format!("bad WebSocket upgrade: {e}"))
            })?;
        let on_upgrade = request.extensions_mut().remove::<OnUpgrade>().ok_or_else(|| {
            ApiError::new(StatusCode::UPGRADE_REQUIRED, ErrorCode::BadRequest, "this connection cannot be upgraded")
        })?;
        Ok(Self { response, on_upgrade })
    }

    /// Answers `101 Switching Protocols` and, once the connection is upgraded, runs `serve` on
    /// it in a task of the node's tracker (so shutdown waits for it).
    pub(super) fn serve<F, Fut>(self, node: &Node, serve: F) -> Response
    where
        F: FnOnce(WsStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let config = socket_config(node.config());
        let on_upgrade = self.on_upgrade;
        node.tracker().spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    // Bytes the client sent right after its request (its first frames) are read
                    // first.
                    let (io, read_ahead) = transport::take_back(upgraded);
                    serve(WebSocketStream::from_partially_read(io, read_ahead, Role::Server, Some(config)).await).await
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        self.response
    }
}

/// The configured buffer and size limits of a socket.
fn socket_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(config.read_buffer_size)
        .write_buffer_size(config.write_buffer_size)
        .max_write_buffer_size(config.write_buffer_size + 2 * config.max_message_size.max(64 * 1024))
        .max_message_size(Some(config.max_message_size))
        .max_frame_size(Some(config.max_message_size))
}
