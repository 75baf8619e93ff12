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

use crate::config::Config;
use crate::connection;
use crate::node::Node;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::StreamExt;
use gateway_protocol::CloseCode;
use std::sync::Arc;
use tokio::time::timeout;

pub(super) async fn upgrade(State(node): State<Arc<Node>>, upgrade: WebSocketUpgrade) -> Response {
    let in_flight = node.tracker().token();
    super::ws::configure(upgrade, node.config()).on_upgrade(move |socket| async move {
        echo(socket, node.config()).await;
        drop(in_flight);
    })
}

async fn echo(mut socket: WebSocket, config: &Config) {
    let write_timeout = config.write_timeout;
    while let Some(message) = socket.next().await {
        let reply = match message {
            Ok(Message::Text(t)) => Message::Text(t),
            Ok(Message::Binary(b)) => Message::Binary(b),
            // Pings are answered and closes acknowledged by the WebSocket layer; reading on
            // flushes that answer, and the stream then ends.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_)) => continue,
            Err(e) => {
                let too_big = matches!(
                    e.into_inner().downcast_ref::<tungstenite::Error>(),
                    Some(tungstenite::Error::Capacity(_))
                );
                if too_big {
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
