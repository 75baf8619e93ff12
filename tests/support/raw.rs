//! A raw WebSocket (tokio-tungstenite) for asserting exact frames, close codes and bad input.

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// A WebSocket with no protocol logic: what is sent and received is exactly what the test says.
pub struct RawSocket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What came after the last frame: a close frame's code and reason, or none.
pub type Closed = Option<(u16, String)>;

impl RawSocket {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Self {
        let request = url.into_client_request().expect("valid url");
        Self::connect_request(request).await.unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    /// Connects with a prepared request (headers), returning the handshake error if refused.
    pub async fn connect_request(
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = super::within("WebSocket handshake", connect_async(request)).await?;
        Ok(Self { ws })
    }

    /// Sends a text frame.
    pub async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send text");
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, value: Value) {
        self.send(&value.to_string()).await;
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::binary(bytes)).await.expect("send binary");
    }

    /// The next text frame as JSON (control frames skipped); panics if the socket closes.
    pub async fn recv_json(&mut self) -> Value {
        loop {
            match super::within("a text frame", self.ws.next()).await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("server sends JSON"),
                Some(Ok(Message::Close(c))) => panic!("socket closed while waiting for a frame: {c:?}"),
                Some(Ok(_)) => continue,
                other => panic!("socket ended while waiting for a frame: {other:?}"),
            }
        }
    }

    /// Reads until the socket closes; returns the close code and reason, if a close frame came.
    pub async fn recv_close(&mut self) -> Closed {
        loop {
            match super::within("the socket to close", self.ws.next()).await {
                Some(Ok(Message::Close(Some(frame)))) => return Some((frame.code.into(), frame.reason.to_string())),
                Some(Ok(Message::Close(None))) => return None,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Sends a command and returns the reply with the same id (messages in between are skipped).
    pub async fn command(&mut self, mut command: Value, id: u64) -> Value {
        command["id"] = id.into();
        self.send_json(command).await;
        loop {
            let reply = self.recv_json().await;
            if reply["id"] == id {
                return reply;
            }
        }
    }

    /// Subscribes and waits for the `ok`.
    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self.command(serde_json::json!({"type": "subscribe", "channel": channel}), 900_001).await;
        assert_eq!(reply["type"], "ok", "subscribe {channel}: {reply}");
    }

    /// The underlying stream, for tests that must stop reading.
    pub fn inner(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }
}
