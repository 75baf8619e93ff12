//! `GET /test/echo` (only with `--echo-endpoint`): echoes frames back through the same socket
//! settings as `/ws` (size limits, buffers, write timeout, close handling). It exists for
//! WebSocket conformance runs (the Autobahn cases of `tests/autobahn/run.sh`) and serves no
//! product purpose.
//!
//! Its close handling mirrors `connection::run`: pings and close frames are answered by the
//! WebSocket layer; an oversized frame is answered with 1009 `message too big`, after which the
//! peer's closing handshake is awaited for at most `min(--write-timeout, 5s)`; any other read
//! error (a protocol violation, invalid UTF-8) or a write that fails or times out drops the
//! connection without a close frame.

use super::error::ApiError;
use super::upgrade::Upgrade;
use crate::config::Config;
use crate::connection::{self, WsStream};
use crate::node::Node;
use axum::extract::{Request, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use gateway_protocol::CloseCode;
use std::sync::Arc;
use tokio::time::timeout;
use tungstenite::Message;

pub(super) async fn upgrade(State(node): State<Arc<Node>>, mut request: Request) -> Result<Response, ApiError> {
    let upgrade = Upgrade::check(&mut request)?;
    let serving = node.clone();
    Ok(upgrade.serve(&node, move |socket| async move { echo(socket, serving.config()).await }))
}

async fn echo(mut socket: WsStream, config: &Config) {
    let write_timeout = config.write_timeout;
    while let Some(message) = socket.next().await {
        let reply = match message {
            Ok(Message::Text(t)) => Message::Text(t),
            Ok(Message::Binary(b)) => Message::Binary(b),
            // Pings are answered and closes acknowledged by the WebSocket layer; reading on
            // flushes that answer, and the stream then ends.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_)) => continue,
            Err(e) => {
                if matches!(e, tungstenite::Error::Capacity(_)) {
                    connection::close_handshake(&mut socket, CloseCode::TooBig, write_timeout).await;
                }
                return;
            }
        };
        if !matches!(timeout(write_timeout, socket.send(reply)).await, Ok(Ok(()))) {
            return;
        }
    }
}
