//! `GET /test/echo` (only with `--echo-endpoint`): echoes frames back through the same socket
//! settings as `/ws` (size limits, buffers, close handling). It exists for WebSocket conformance
//! runs (Autobahn test cases) and serves no product purpose.

use crate::node::Node;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::StreamExt;
use gateway_protocol::CloseCode;
use std::sync::Arc;

pub(super) async fn upgrade(State(node): State<Arc<Node>>, upgrade: WebSocketUpgrade) -> Response {
    let in_flight = node.tracker().token();
    super::ws::configure(upgrade, node.config()).on_upgrade(move |socket| async move {
        echo(socket).await;
        drop(in_flight);
    })
}

async fn echo(mut socket: WebSocket) {
    while let Some(message) = socket.next().await {
        let reply = match message {
            Ok(Message::Text(t)) => Message::Text(t),
            Ok(Message::Binary(b)) => Message::Binary(b),
            Ok(_) => continue,
            Err(e) => {
                if let Some(tungstenite::Error::Capacity(_)) = e.into_inner().downcast_ref::<tungstenite::Error>() {
                    let code = CloseCode::TooBig;
                    let frame = CloseFrame { code: code.code(), reason: code.reason().into() };
                    let _ = socket.send(Message::Close(Some(frame))).await;
                }
                return;
            }
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}
