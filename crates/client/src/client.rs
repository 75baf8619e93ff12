//! [`Client`], the cheap handle to one connection, and its [`ClientConfig`].

use crate::connection::{self, Command, RequestKind, TaskConfig};
use crate::error::{ClientError, CloseInfo, ErrorFrame};
use crate::shared::Shared;
use crate::subscription::{Route, Subscription};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message as WsMessage};

/// Tuning of a [`Client`]. Start from [`ClientConfig::default`] and change fields.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Capacity of each [`Subscription`]'s queue; overflowing messages are dropped and counted.
    /// Default 4096.
    pub queue: usize,
    /// Largest message (and frame) accepted from the server, in bytes; a bigger one ends the
    /// connection. Default 16 MiB.
    pub max_message_size: usize,
    /// Capacity of the command channel from the handles to the connection task. Default 1024.
    pub commands: usize,
    /// How many uncorrelated frames [`Client::take_errors`] and [`Client::take_unexpected`] keep
    /// (the oldest are forgotten first). Default 64.
    pub history: usize,
    /// The socket's read buffer, allocated up front per connection: keep it small for many
    /// connections. Default 16 KiB.
    pub read_buffer_size: usize,
    /// How long to wait for the closing handshake before dropping the TCP connection. Default 5 s.
    pub close_timeout: Duration,
    /// Disable Nagle's algorithm (`TCP_NODELAY`). Default `true`.
    pub nodelay: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            queue: 4096,
            max_message_size: 16 << 20,
            commands: 1024,
            history: 64,
            read_buffer_size: 16 << 10,
            close_timeout: Duration::from_secs(5),
            nodelay: true,
        }
    }
}

/// A handle to one WebSocket connection to a gateway node.
///
/// Cheap to clone: every clone talks to the same connection task. The connection stays open while
/// any handle or [`Subscription`] lives, until [`Client::close`] or until the server ends it.
/// Every command method returns [`ClientError::Closed`] once the connection is over; none of them
/// waits forever for a reply that can no longer come.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    queue: usize,
}

/// Appends `s` as a JSON string; channel names (the common case) need no escaping.
fn push_json_str(out: &mut String, s: &str) {
    if gateway_protocol::channel::validate(s).is_ok() {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::String(s.to_owned()).to_string());
    }
}

/// `{"type":"<kind>","channel":"<channel>"` (no closing brace).
fn channel_head(kind: &str, channel: &str, extra: usize) -> String {
    let mut out = String::with_capacity(32 + kind.len() + channel.len() + extra);
    out.push_str("{\"type\":\"");
    out.push_str(kind);
    out.push_str("\",\"channel\":");
    push_json_str(&mut out, channel);
    out
}

fn publish_head(channel: &str, data: &str) -> String {
    let mut out = channel_head("publish", channel, data.len() + 24);
    out.push_str(",\"data\":");
    out.push_str(data);
    out
}

impl Client {
    /// Connects to a `ws://` or `wss://` URL (e.g. `ws://127.0.0.1:8080/ws?token=...`) with the
    /// default [`ClientConfig`].
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with_config(url, ClientConfig::default()).await
    }

    /// Connects with a prepared request, to set headers such as `Origin` or `Authorization`.
    ///
    /// Start from [`Client::request`] (or `IntoClientRequest::into_client_request`), which fills
    /// in the WebSocket handshake headers, then add yours. Also accepts a URL string or a
    /// [`tungstenite::ClientRequestBuilder`](crate::tungstenite::ClientRequestBuilder).
    pub async fn connect_with(request: impl IntoClientRequest) -> Result<Self, ClientError> {
        Self::connect_with_config(request, ClientConfig::default()).await
    }

    /// Connects with a request (or URL) and a [`ClientConfig`]. An HTTP answer other than `101`
    /// is [`ClientError::Rejected`]; any other failure is [`ClientError::Connect`].
    pub async fn connect_with_config(
        request: impl IntoClientRequest,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let request = request.into_client_request().map_err(ClientError::connect)?;
        let limit = config.max_message_size.max(1);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.read_buffer_size.max(1))
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let uri = request.uri().clone();
        let (ws, _response) = tokio_tungstenite::connect_async_with_config(request, Some(ws_config), config.nodelay)
            .await
            .map_err(ClientError::connect)?;
        tracing::debug!(%uri, "connected");
        let (tx, rx) = mpsc::channel(config.commands.max(1));
        let (closed_tx, closed_rx) = watch::channel(None);
        let shared = Arc::new(Shared::new(config.history, closed_rx));
        let task = TaskConfig { close_timeout: config.close_timeout };
        connection::spawn(ws, rx, Arc::clone(&shared), closed_tx, task);
        Ok(Self { commands: tx, shared, queue: config.queue.max(1) })
    }

    /// The handshake request for `url` (WebSocket headers filled in), ready for extra headers and
    /// [`Client::connect_with`].
    pub fn request(url: &str) -> Result<Request, ClientError> {
        url.into_client_request().map_err(ClientError::connect)
    }

    /// Subscribes to `channel`; resolves once the server acknowledged with `ok` (from then on every
    /// message published on it reaches the returned [`Subscription`]). Several subscriptions to
    /// the same channel each get every message.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, ClientError> {
        let (tx, rx) = mpsc::channel(self.queue);
        let dropped = Arc::new(AtomicU64::new(0));
        let route = Route { tx, dropped: Arc::clone(&dropped) };
        let kind = RequestKind::Subscribe { channel: channel.to_owned(), route };
        self.call(channel_head("subscribe", channel, 24), kind).await?;
        Ok(Subscription::new(channel.to_owned(), rx, dropped, self.commands.clone()))
    }

    /// Unsubscribes from `channel`; on `ok`, every [`Subscription`] of this client for it ends
    /// (after yielding what it already queued).
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), ClientError> {
        let kind = RequestKind::Unsubscribe { channel: channel.to_owned() };
        self.call(channel_head("unsubscribe", channel, 24), kind).await.map(drop)
    }

    /// Publishes `data` on `channel` and waits for the server's `ok` (the backplane took it) or
    /// `error`.
    pub async fn publish(&self, channel: &str, data: &RawValue) -> Result<(), ClientError> {
        self.call(publish_head(channel, data.get()), RequestKind::Plain).await.map(drop)
    }

    /// [`Client::publish`] for a [`serde_json::Value`].
    pub async fn publish_json(&self, channel: &str, data: &serde_json::Value) -> Result<(), ClientError> {
        let data = data.to_string();
        self.call(publish_head(channel, &data), RequestKind::Plain).await.map(drop)
    }

    /// Publishes without an `id`: nothing is awaited but room in the command queue. A failure
    /// comes back as an `error` frame without `id` ([`Client::take_errors`]).
    pub async fn publish_nowait(&self, channel: &str, data: &RawValue) -> Result<(), ClientError> {
        let mut text = publish_head(channel, data.get());
        text.push('}');
        self.send(WsMessage::text(text)).await
    }

    /// Sends `ping` and returns the round trip time once the `pong` arrived.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        self.call("{\"type\":\"ping\"".to_owned(), RequestKind::Ping).await
    }

    /// Replaces the connection's token (`refresh`) and waits for `ok` or `error`.
    pub async fn refresh(&self, token: &str) -> Result<(), ClientError> {
        let mut head = String::with_capacity(32 + token.len());
        head.push_str("{\"type\":\"refresh\",\"token\":");
        push_json_str(&mut head, token);
        self.call(head, RequestKind::Plain).await.map(drop)
    }

    /// Sends `text` as one text frame, as is (for tests of malformed input). Replies to it are not
    /// matched to anything: they show up in [`Client::take_errors`] / [`Client::take_unexpected`].
    pub async fn send_raw_text(&self, text: String) -> Result<(), ClientError> {
        self.send(WsMessage::text(text)).await
    }

    /// Sends `bytes` as one binary frame (which the contract answers with `bad_request`).
    pub async fn send_raw_binary(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.send(WsMessage::Binary(Bytes::from(bytes))).await
    }

    /// Starts the closing handshake (code 1000) and waits until the connection ended.
    pub async fn close(&self) -> CloseInfo {
        // If the task is gone the connection is already over.
        let _ = self.commands.send(Command::Close).await;
        self.closed().await
    }

    /// Resolves when the connection ended, with the server's close code and reason.
    pub async fn closed(&self) -> CloseInfo {
        self.shared.closed().await
    }

    /// How the connection ended; `None` while it is open.
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.shared.close_info()
    }

    /// Whether the connection is over.
    pub fn is_closed(&self) -> bool {
        self.shared.close_info().is_some()
    }

    /// How many messages were dropped because a [`Subscription`]'s queue was full, over all
    /// subscriptions of this connection.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped()
    }

    /// Takes the recorded `error` frames that answered none of this client's commands (no `id`,
    /// or an unknown one), oldest first. Only the last [`ClientConfig::history`] are kept.
    pub fn take_errors(&self) -> Vec<ErrorFrame> {
        self.shared.take_errors()
    }

    /// Waits for the next uncorrelated `error` frame (the same queue as [`Client::take_errors`]);
    /// `None` once the connection ended and none is left.
    pub async fn next_error(&self) -> Option<ErrorFrame> {
        self.shared.next_error().await
    }

    /// Takes the other frames that matched nothing, as received, oldest first: `ok` / `pong` with
    /// no `id` or an unknown one, undecodable text, and binary frames (as
    /// `<binary frame of N bytes>`). Only the last [`ClientConfig::history`] are kept.
    pub fn take_unexpected(&self) -> Vec<String> {
        self.shared.take_unexpected()
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed(self.shared.close_info().unwrap_or_else(CloseInfo::task_gone))
    }

    async fn send(&self, msg: WsMessage) -> Result<(), ClientError> {
        self.commands.send(Command::Send(msg)).await.map_err(|_| self.closed_error())
    }

    async fn call(&self, head: String, kind: RequestKind) -> Result<Duration, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Request { head, kind, reply }).await.map_err(|_| self.closed_error())?;
        rx.await.unwrap_or_else(|_| Err(self.closed_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_escape_only_what_needs_it() {
        assert_eq!(channel_head("subscribe", "chat:lobby", 0), r#"{"type":"subscribe","channel":"chat:lobby""#);
        assert_eq!(channel_head("subscribe", "a\"b", 0), r#"{"type":"subscribe","channel":"a\"b""#);
        let mut frame = publish_head("c", r#"{"x":1}"#);
        frame.push('}');
        let v: serde_json::Value = serde_json::from_str(&frame).expect("valid JSON");
        assert_eq!(v, serde_json::json!({"type":"publish","channel":"c","data":{"x":1}}));
    }
}
