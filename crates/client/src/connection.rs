//! The connection task: the only owner of the socket.
//!
//! It takes [`Command`]s from the bounded channel shared by every handle, assigns each request a
//! numeric `id`, writes it, and matches `ok` / `pong` / `error` replies back to the waiting caller.
//! `message` frames go to the subscriptions' bounded queues with `try_send`: the reader never
//! waits for a consumer. Writing is done in a cancel-safe `poll` so reading continues while a write
//! is pending. When it ends, for whatever reason (even a panic), it publishes the [`CloseInfo`],
//! fails every pending command with [`ClientError::Closed`] and ends every subscription.

use crate::error::{ClientError, CloseInfo, ErrorFrame};
use crate::shared::Shared;
use crate::subscription::{Message, Route};
use futures_util::stream::SplitSink;
use futures_util::{Sink, StreamExt};
use gateway_protocol::ServerFrame;
use serde_json::value::RawValue;
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Frames queued for writing beyond which the task stops taking commands (backpressure).
const MAX_OUTGOING: usize = 64;

/// The reply to a request: the round trip time, or why it failed.
pub(crate) type Reply = oneshot::Sender<Result<Duration, ClientError>>;

/// What a handle asks of the connection task.
#[derive(Debug)]
pub(crate) enum Command {
    /// A command that waits for its reply. `head` is the frame's JSON text without the closing
    /// brace; the task appends `,"id":N}`.
    Request { head: String, kind: RequestKind, reply: Reply },
    /// A frame to write as is, expecting nothing.
    Send(WsMessage),
    /// Start the closing handshake (code 1000).
    Close,
}

/// What to do when a request's reply arrives.
#[derive(Debug)]
pub(crate) enum RequestKind {
    /// On `ok`, start routing `channel`'s messages to `route`.
    Subscribe { channel: String, route: Route },
    /// On `ok`, end every subscription of `channel`.
    Unsubscribe { channel: String },
    /// Expects `pong`.
    Ping,
    /// Expects `ok` (publish, refresh).
    Plain,
}

struct Pending {
    kind: RequestKind,
    reply: Reply,
    sent: Instant,
}

/// Settings of the task, taken from [`ClientConfig`](crate::ClientConfig).
pub(crate) struct TaskConfig {
    pub(crate) close_timeout: Duration,
}

struct Connection {
    shared: Arc<Shared>,
    closed_tx: watch::Sender<Option<CloseInfo>>,
    commands: mpsc::Receiver<Command>,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    routes: HashMap<String, Vec<Route>>,
    outgoing: VecDeque<WsMessage>,
    /// Something was handed to the sink and not flushed yet.
    unflushed: bool,
    /// The server's close frame, once received.
    peer_close: Option<CloseInfo>,
    /// We sent our close frame.
    closing: bool,
    /// Give up waiting for the closing handshake at this instant.
    deadline: Option<Instant>,
    /// Set when the loop ends; published by `Drop`.
    end: Option<CloseInfo>,
}

/// Spawns the task for an established WebSocket.
pub(crate) fn spawn(
    ws: Ws,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    closed_tx: watch::Sender<Option<CloseInfo>>,
    config: TaskConfig,
) {
    let conn = Connection {
        shared,
        closed_tx,
        commands,
        next_id: 1,
        pending: HashMap::new(),
        routes: HashMap::new(),
        outgoing: VecDeque::new(),
        unflushed: false,
        peer_close: None,
        closing: false,
        deadline: None,
        end: None,
    };
    tokio::spawn(run(ws, conn, config));
}

async fn run(ws: Ws, mut conn: Connection, config: TaskConfig) {
    let (mut sink, mut stream) = ws.split();
    let mut commands_open = true;
    let end = loop {
        let take_commands =
            commands_open && !conn.closing && conn.peer_close.is_none() && conn.outgoing.len() < MAX_OUTGOING;
        let write = conn.unflushed || !conn.outgoing.is_empty();
        let deadline = conn.deadline;
        tokio::select! {
            cmd = conn.commands.recv(), if take_commands => match cmd {
                Some(cmd) => conn.command(cmd, &config),
                None => {
                    // Every handle is gone: say goodbye.
                    commands_open = false;
                    conn.start_close(&config);
                }
            },
            res = poll_fn(|cx| poll_write(&mut sink, &mut conn.outgoing, cx)), if write => match res {
                Ok(()) => conn.unflushed = false,
                Err(e) => break conn.failed(&e),
            },
            msg = stream.next() => match msg {
                Some(Ok(msg)) => conn.frame(msg, &config),
                Some(Err(e)) => break conn.failed(&e),
                None => break conn.ended(),
            },
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                break conn.peer_close.clone().unwrap_or_else(|| CloseInfo {
                    code: None,
                    reason: "closing handshake timed out".to_owned(),
                });
            }
        }
    };
    tracing::debug!(%end, "connection ended");
    conn.end = Some(end);
    // `conn` drops here and publishes the end.
}

/// Hands every queued frame to the sink, then flushes. Cancel-safe: a frame leaves the queue only
/// once the sink took it.
fn poll_write(
    sink: &mut SplitSink<Ws, WsMessage>,
    outgoing: &mut VecDeque<WsMessage>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), tungstenite::Error>> {
    let mut sink = Pin::new(sink);
    while !outgoing.is_empty() {
        ready!(sink.as_mut().poll_ready(cx))?;
        if let Some(msg) = outgoing.pop_front() {
            sink.as_mut().start_send(msg)?;
        }
    }
    sink.poll_flush(cx)
}

/// The numeric id of a reply, if it is one this client could have assigned.
fn numeric_id(id: Option<&RawValue>) -> Option<u64> {
    id.and_then(|raw| raw.get().parse().ok())
}

impl Connection {
    fn command(&mut self, cmd: Command, config: &TaskConfig) {
        match cmd {
            Command::Request { mut head, kind, reply } => {
                let id = self.next_id;
                self.next_id += 1;
                head.push_str(",\"id\":");
                head.push_str(&id.to_string());
                head.push('}');
                self.pending.insert(id, Pending { kind, reply, sent: Instant::now() });
                self.queue(WsMessage::text(head));
            }
            Command::Send(msg) => self.queue(msg),
            Command::Close => self.start_close(config),
        }
    }

    fn queue(&mut self, msg: WsMessage) {
        self.outgoing.push_back(msg);
        self.unflushed = true;
    }

    fn start_close(&mut self, config: &TaskConfig) {
        if self.closing || self.peer_close.is_some() {
            return;
        }
        self.closing = true;
        self.queue(WsMessage::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })));
        self.deadline = Some(Instant::now() + config.close_timeout);
    }

    fn frame(&mut self, msg: WsMessage, config: &TaskConfig) {
        match msg {
            WsMessage::Text(text) => self.text(text.as_str()),
            WsMessage::Binary(bytes) => {
                tracing::debug!(len = bytes.len(), "binary frame from the server");
                self.shared.push_unexpected(format!("<binary frame of {} bytes>", bytes.len()));
            }
            WsMessage::Close(frame) => {
                let info = match frame {
                    Some(f) => CloseInfo { code: Some(f.code.into()), reason: f.reason.to_string() },
                    None => CloseInfo::default(),
                };
                tracing::debug!(%info, "close frame from the server");
                self.peer_close = Some(info);
                // tungstenite answers the close itself; nothing else may be written now.
                self.outgoing.clear();
                self.unflushed = false;
                if self.deadline.is_none() {
                    self.deadline = Some(Instant::now() + config.close_timeout);
                }
            }
            // tungstenite answers pings itself.
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
        }
    }

    fn text(&mut self, text: &str) {
        match ServerFrame::decode(text) {
            Ok(ServerFrame::Message { channel, data }) => self.route(&channel, data),
            Ok(ServerFrame::Ok { id }) => self.reply(id, text, false),
            Ok(ServerFrame::Pong { id }) => self.reply(id, text, true),
            Ok(ServerFrame::Error { id, code, message }) => {
                match numeric_id(id).and_then(|n| self.pending.remove(&n)) {
                    Some(p) => {
                        let _ = p.reply.send(Err(ClientError::Server { code, message: message.into_owned() }));
                    }
                    None => {
                        tracing::debug!(%code, %message, "error frame without a pending command");
                        self.shared.push_error(ErrorFrame {
                            id: id.map(|raw| raw.get().to_owned()),
                            code,
                            message: message.into_owned(),
                        });
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "undecodable frame from the server");
                // Still fail the command it answers, if any, rather than leave it waiting.
                let id = serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64));
                match id.and_then(|n| self.pending.remove(&n)) {
                    Some(p) => {
                        let _ = p.reply.send(Err(ClientError::Protocol(format!("{e}: {text}"))));
                    }
                    None => self.shared.push_unexpected(text.to_owned()),
                }
            }
        }
    }

    fn reply(&mut self, id: Option<&RawValue>, text: &str, pong: bool) {
        let Some((id, p)) = numeric_id(id).and_then(|n| self.pending.remove_entry(&n)) else {
            tracing::debug!(frame = text, "reply without a pending command");
            self.shared.push_unexpected(text.to_owned());
            return;
        };
        let rtt = p.sent.elapsed();
        let outcome = match (p.kind, pong) {
            (RequestKind::Subscribe { channel, route }, false) => {
                let routes = self.routes.entry(channel).or_default();
                // Forget dropped subscriptions of this channel while at it.
                routes.retain(|r| !r.tx.is_closed());
                if !route.tx.is_closed() {
                    routes.push(route);
                }
                Ok(rtt)
            }
            (RequestKind::Unsubscribe { channel }, false) => {
                self.routes.remove(&channel);
                Ok(rtt)
            }
            (RequestKind::Ping, true) | (RequestKind::Plain, false) => Ok(rtt),
            (RequestKind::Ping, false) => Err(ClientError::Protocol(format!("`ok` answered ping {id}"))),
            (_, true) => Err(ClientError::Protocol(format!("`pong` answered command {id}"))),
        };
        let _ = p.reply.send(outcome);
    }

    fn route(&mut self, channel: &str, data: &RawValue) {
        let Some(routes) = self.routes.get_mut(channel) else {
            tracing::trace!(channel, "message for a channel without a live subscription");
            return;
        };
        routes.retain(|r| !r.tx.is_closed());
        for r in routes.iter() {
            let msg = Message { channel: channel.to_owned(), data: data.to_owned() };
            if let Err(mpsc::error::TrySendError::Full(_)) = r.tx.try_send(msg) {
                r.dropped.fetch_add(1, Ordering::Relaxed);
                self.shared.count_dropped();
                tracing::debug!(channel, "subscription queue full: message dropped");
            }
        }
        if routes.is_empty() {
            self.routes.remove(channel);
        }
    }

    /// The stream or the sink failed.
    fn failed(&self, e: &tungstenite::Error) -> CloseInfo {
        tracing::debug!(error = %e, "connection failed");
        self.peer_close.clone().unwrap_or_else(|| CloseInfo { code: None, reason: e.to_string() })
    }

    /// The stream ended.
    fn ended(&self) -> CloseInfo {
        self.peer_close
            .clone()
            .unwrap_or_else(|| CloseInfo { code: None, reason: "connection ended without a close frame".to_owned() })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let info = self.end.take().unwrap_or_else(CloseInfo::task_gone);
        self.closed_tx.send_replace(Some(info.clone()));
        self.shared.wake_all();
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(ClientError::Closed(info.clone())));
        }
        self.routes.clear();
        self.commands.close();
        while let Ok(cmd) = self.commands.try_recv() {
            if let Command::Request { reply, .. } = cmd {
                let _ = reply.send(Err(ClientError::Closed(info.clone())));
            }
        }
    }
}
