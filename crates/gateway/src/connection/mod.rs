//! One socket's life, from upgrade to close, in one task.
//!
//! A single `select!` loop plays both pumps of the classic design: it reads client frames and
//! turns them into node calls, and it drains the [`Outbox`] (every queued frame, already encoded,
//! goes straight to the connection in vectored writes; a busy socket first lets `--write-linger`
//! pass since its last write, so one write carries more). Reading, control frames and the close
//! handshake are tungstenite's.
//! Publishes are pipelined: each is handed to the backplane at once (which fixes its place in the
//! channel's order) and answered in order when the backplane replies, up to [`MAX_IN_FLIGHT`]
//! at a time. A subscribe or unsubscribe is kept as the one pending command and reading pauses
//! until it resolves, while writing goes on. Heartbeats and token expiry are timers of the same
//! loop; a close (slow consumer, node shutdown through the [`roster::Roster`]) arrives on the
//! socket's [`CloseSwitch`]. [`Registration`] leaves the hub and the roster on every exit path,
//! panics and cancellation included.

pub mod frame;
pub mod outbox;
pub mod roster;
pub mod session;

pub use session::Session;

/// An upgraded WebSocket connection, as a socket's task owns it.
pub type WsStream = WebSocketStream<TokioIo<Upgraded>>;

use crate::node::{CommandError, Node, Published, Source};
use futures_util::{SinkExt, StreamExt};
use gateway_protocol::server::{encode_error, encode_ok, encode_pong};
use gateway_protocol::{ChannelName, ClientFrame, CloseCode, ErrorCode, FrameId};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use outbox::{CloseSwitch, ConnId, Frame, Inbox, Outbox};
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep, sleep, timeout};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};

/// A batch buffer larger than this is shrunk after its write, so a burst's memory is returned.
const KEPT_BATCH_CAPACITY: usize = 64;
/// Most publishes of one socket waiting for the backplane; beyond it the socket is not read.
const MAX_IN_FLIGHT: usize = 256;
/// Most frames one vectored write carries.
const MAX_SLICES: usize = 64;

/// Keeps a socket's hub entries, roster entry and gauges right: dropping it (on any exit)
/// removes the socket from every channel it had and from the roster.
struct Registration {
    node: Arc<Node>,
    conn: ConnId,
    channels: HashSet<ChannelName>,
}

impl Registration {
    fn new(node: Arc<Node>, conn: ConnId, switch: Arc<CloseSwitch>) -> Self {
        node.metrics().connections.inc();
        node.metrics().connects.inc();
        node.roster().add(conn, switch);
        Self { node, conn, channels: HashSet::new() }
    }
}

impl Registration {
    /// Leaves every channel now (the socket is closing: nothing more should be routed to it).
    fn leave(&mut self) {
        self.node.forget(self.conn, self.channels.drain());
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.leave();
        self.node.roster().remove(self.conn);
        self.node.metrics().connections.dec();
    }
}

/// What a pending backplane command resolved to.
enum Completion {
    Subscribed(Option<FrameId>, ChannelName, Result<(), CommandError>),
    Unsubscribed(Option<FrameId>),
}

type Pending = Pin<Box<dyn Future<Output = Completion> + Send>>;

/// How the loop ended.
enum Exit {
    /// Send this close code, then finish the close handshake.
    Close(CloseCode),
    /// The peer is gone or the stream failed: nothing more to write.
    Gone(&'static str),
    /// The peer sent a close frame: the WebSocket layer has queued its answer, which is flushed,
    /// and nothing may follow it (RFC 6455 §5.5.1), so what is still queued is dropped.
    PeerClosed,
}

/// Runs one upgraded socket until it closes. Never panics on client input.
pub async fn run(ws: WsStream, node: Arc<Node>, session: Session) {
    let conn = node.next_conn_id();
    let switch = Arc::new(CloseSwitch::default());
    let (outbox, rx) = Outbox::new(node.config().queue_size, switch.clone());
    let registration = Registration::new(node.clone(), conn, switch.clone());
    let mut socket = Socket {
        ws,
        rx,
        node,
        outbox,
        switch,
        registration,
        session,
        pending: None,
        publishes: VecDeque::new(),
        batch: VecDeque::new(),
        written: 0,
        control_owed: false,
        lingering: false,
        last_flush: None,
    };
    let exit = socket.serve().await;
    let label = match &exit {
        Exit::Close(code) => code.label(),
        Exit::Gone(why) => why,
        Exit::PeerClosed => "client_closed",
    };
    socket.node.metrics().disconnects.with_label_values(&[label]).inc();
    tracing::debug!(conn, reason = label, "socket closing");
    // Boxed, like the writes below: the task's future stays small for idle sockets, and these
    // states are short-lived.
    Box::pin(socket.finish(exit)).await;
}

struct Socket {
    ws: WsStream,
    rx: Inbox,
    node: Arc<Node>,
    outbox: Outbox,
    switch: Arc<CloseSwitch>,
    registration: Registration,
    session: Session,
    pending: Option<Pending>,
    /// Publishes sent to the backplane and not yet answered, oldest first.
    publishes: VecDeque<(Option<FrameId>, Published)>,
    /// Frames taken from the queue and being written.
    batch: VecDeque<Frame>,
    /// Bytes of the batch's first frame already written (a write cut short resumes there).
    written: usize,
    /// The WebSocket layer may hold a control frame it owes the peer (the pong to a ping): flush
    /// it before writing frames of our own.
    control_owed: bool,
    /// Frames are queued and wait for the write linger to pass (see [`Socket::linger_until`]).
    lingering: bool,
    /// When the last batch was flushed (drives the write linger).
    last_flush: Option<Instant>,
}

impl Socket {
    async fn serve(&mut self) -> Exit {
        let config = self.node.config();
        let (ping_interval, pong_timeout) = (config.ping_interval, config.pong_timeout);
        let mut last_seen = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let heartbeat = sleep(ping_interval);
        tokio::pin!(heartbeat);
        let expiry = self.session.expiry_timer();
        tokio::pin!(expiry);
        let switch = self.switch.clone();
        let linger_over = sleep(Duration::ZERO);
        tokio::pin!(linger_over);

        loop {
            tokio::select! {
                biased;
                reason = switch.closed() => return Exit::Close(reason),
                () = self.rx.ready(), if !self.lingering => {
                    if !self.start_linger(linger_over.as_mut()) && let Err(exit) = Box::pin(self.write_batch(true)).await {
                        return exit;
                    }
                }
                // The linger is over, or a burst is filling the queue: write now, and linger again
                // right away, since a socket this busy will have more before the linger is over
                // (if it has none by then, it goes back to waiting for a first frame).
                () = async { tokio::select! { () = &mut linger_over => (), () = self.switch.urged() => () } },
                    if self.lingering =>
                {
                    self.lingering = false;
                    if self.rx.is_empty() {
                        continue;
                    }
                    if let Err(exit) = Box::pin(self.write_batch(true)).await {
                        return exit;
                    }
                    self.start_linger(linger_over.as_mut());
                }
                done = poll_pending(&mut self.pending) => {
                    self.pending = None;
                    self.complete(done);
                }
                (id, outcome) = next_published(&mut self.publishes), if !self.publishes.is_empty() => {
                    match outcome {
                        Ok(()) => self.reply_ok(id.as_ref()),
                        Err(e) => self.reply_error(id.as_ref(), e.code(), &e.to_string()),
                    }
                }
                // Reading pauses while our own queue is half full, so a client that pipelines faster
                // than its replies can be written is slowed down instead of overflowing its queue.
                incoming = self.ws.next(),
                    if self.pending.is_none() && self.publishes.len() < MAX_IN_FLIGHT && !self.rx.is_half_full() =>
                {
                    last_seen = Instant::now();
                    match incoming {
                        Some(Ok(message)) => {
                            if let Some(exit) = self.on_message(message) {
                                return exit;
                            }
                        }
                        Some(Err(e)) => return read_error(e),
                        None => return Exit::Gone("client_closed"),
                    }
                }
                () = &mut heartbeat => {
                    let now = Instant::now();
                    match ping_sent {
                        Some(sent) if last_seen < sent => return Exit::Close(CloseCode::HeartbeatTimeout),
                        _ if last_seen + ping_interval > now => {
                            ping_sent = None;
                            heartbeat.as_mut().reset(last_seen + ping_interval);
                        }
                        _ => {
                            if let Err(exit) = Box::pin(self.write_now(Message::Ping(Default::default()))).await {
                                return exit;
                            }
                            ping_sent = Some(now);
                            heartbeat.as_mut().reset(now + pong_timeout);
                        }
                    }
                }
                () = expiry_fired(&mut expiry) => {
                    // A refresh may have moved the expiry, or removed it (an `exp` too far to time).
                    match self.session.expires_at() {
                        Some(at) if at > Instant::now() => expiry.set(Some(Box::pin(tokio::time::sleep_until(at)))),
                        Some(_) => return Exit::Close(CloseCode::TokenExpired),
                        None => expiry.set(None),
                    }
                }
            }
        }
    }

    /// When a busy socket should write what is queued: its previous flush was less than
    /// `--write-linger` ago, so waiting until that linger has passed lets one write carry
    /// everything that arrives meanwhile. `None`: write now (the socket receives rarely, or the
    /// queue is already half full). While it lingers the loop keeps reading, answering and
    /// heartbeating; only the queue waits.
    fn linger_until(&self) -> Option<Instant> {
        let flush_at = self.last_flush? + self.node.config().write_linger;
        (Instant::now() < flush_at && !self.rx.is_half_full()).then_some(flush_at)
    }

    /// Starts lingering (sets `timer` to the linger's end) if the socket should; returns
    /// whether it does.
    fn start_linger(&mut self, timer: Pin<&mut Sleep>) -> bool {
        let Some(flush_at) = self.linger_until() else { return false };
        self.lingering = true;
        timer.reset(flush_at);
        true
    }

    /// Writes everything queued, in as few vectored writes as the batch allows. With
    /// `abortable`, a close asked meanwhile (the queue overflowed while the peer stalled the
    /// write) ends the write at once; the batch keeps what was not written.
    async fn write_batch(&mut self, abortable: bool) -> Result<(), Exit> {
        let write_timeout = self.node.config().write_timeout;
        let Self { ws, rx, switch, batch, written, control_owed, .. } = self;
        rx.drain_into(batch);
        let metrics = self.node.metrics();
        let frames = batch.len() as u64;
        let write = async {
            timeout(write_timeout, async {
                // What the WebSocket layer holds (a pong it owes) goes out first, whole, so that
                // the frames below start on a frame boundary.
                if *control_owed {
                    ws.flush().await.map_err(|_| io::ErrorKind::BrokenPipe)?;
                    *control_owed = false;
                }
                write_frames(ws.get_mut(), batch, written, usize::MAX).await.map_err(|e| e.kind())
            })
            .await
        };
        let wrote = tokio::select! {
            biased;
            reason = switch.closed(), if abortable => return Err(Exit::Close(reason)),
            wrote = write => wrote,
        };
        self.last_flush = Some(Instant::now());
        if self.batch.capacity() > KEPT_BATCH_CAPACITY {
            self.batch.shrink_to(KEPT_BATCH_CAPACITY);
        }
        match wrote {
            Ok(Ok(())) => {
                metrics.frames_sent.inc_by(frames);
                metrics.write_batch.observe(frames as f64);
                Ok(())
            }
            Ok(Err(_)) => Err(Exit::Gone("write_error")),
            Err(_) => Err(Exit::Gone("write_timeout")),
        }
    }

    /// Writes one control message right away.
    async fn write_now(&mut self, message: Message) -> Result<(), Exit> {
        match timeout(self.node.config().write_timeout, self.ws.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Exit::Gone("write_error")),
            Err(_) => Err(Exit::Gone("write_timeout")),
        }
    }

    /// Queues a reply behind whatever is already queued (a full queue closes the socket).
    fn reply(&self, text: String) {
        self.outbox.push(Frame::text(&text));
    }

    fn reply_error(&self, id: Option<&FrameId>, code: ErrorCode, message: &str) {
        self.node.metrics().bad_frames.with_label_values(&[code.as_str()]).inc();
        self.reply(encode_error(id.map(FrameId::raw), code, message));
    }

    fn reply_ok(&self, id: Option<&FrameId>) {
        if let Some(id) = id {
            self.reply(encode_ok(id));
        }
    }

    fn on_message(&mut self, message: Message) -> Option<Exit> {
        match message {
            Message::Text(text) => {
                self.node.metrics().frames_received.inc();
                self.on_text(&text)
            }
            Message::Binary(_) => {
                self.node.metrics().frames_received.inc();
                self.reply_error(None, ErrorCode::BadRequest, "binary frames are not supported: send JSON text frames");
                None
            }
            // Pings are answered by the WebSocket layer (its pong may wait in its buffer); any
            // frame counts as a sign of life.
            Message::Ping(_) => {
                self.control_owed = true;
                None
            }
            Message::Pong(_) | Message::Frame(_) => None,
            // The WebSocket layer has queued its answer; no frame of ours may follow it.
            Message::Close(_) => Some(Exit::PeerClosed),
        }
    }

    fn on_text(&mut self, text: &str) -> Option<Exit> {
        let frame = match ClientFrame::decode(text) {
            Ok(frame) => frame,
            Err(e) => {
                self.reply_error(e.id.as_ref(), e.code, &e.message);
                return None;
            }
        };
        match frame {
            ClientFrame::Ping { id } => {
                if let Some(id) = id {
                    self.reply(encode_pong(Some(&id)));
                }
            }
            ClientFrame::Subscribe { id, channel } => self.on_subscribe(id, channel),
            ClientFrame::Unsubscribe { id, channel } => {
                if !self.registration.channels.remove(&channel) {
                    self.reply_ok(id.as_ref());
                    return None;
                }
                let node = self.node.clone();
                let conn = self.registration.conn;
                self.pending = Some(Box::pin(async move {
                    node.unsubscribe(conn, &channel).await;
                    Completion::Unsubscribed(id)
                }));
            }
            ClientFrame::Publish { id, channel, data } => {
                if let Err((code, why)) = self.session.may_publish(&channel) {
                    self.reply_error(id.as_ref(), code, why);
                    return None;
                }
                if let Err(strikes_out) = self.session.take_publish_token() {
                    self.node.metrics().limit_hits.with_label_values(&["publish_rate"]).inc();
                    if strikes_out {
                        return Some(Exit::Close(CloseCode::PolicyAbuse));
                    }
                    self.reply_error(id.as_ref(), ErrorCode::RateLimited, "publish rate limit exceeded; slow down");
                    return None;
                }
                let published = self.node.publish(&channel, data, Source::Socket);
                self.publishes.push_back((id, published));
            }
            ClientFrame::Refresh { id, token } => match self.session.refresh(&self.node, &token) {
                Ok(()) => self.reply_ok(id.as_ref()),
                Err((code, why)) => self.reply_error(id.as_ref(), code, &why),
            },
        }
        None
    }

    fn on_subscribe(&mut self, id: Option<FrameId>, channel: ChannelName) {
        if self.registration.channels.contains(&channel) {
            self.reply_ok(id.as_ref());
            return;
        }
        if let Err((code, why)) = self.session.may_subscribe(&channel) {
            self.reply_error(id.as_ref(), code, why);
            return;
        }
        if self.registration.channels.len() >= self.node.config().max_subscriptions {
            self.node.metrics().limit_hits.with_label_values(&["subscriptions"]).inc();
            self.reply_error(id.as_ref(), ErrorCode::RateLimited, "too many subscriptions on this connection");
            return;
        }
        // Recorded before the await, so that a socket dropped mid-subscribe still leaves the hub.
        self.registration.channels.insert(channel.clone());
        let node = self.node.clone();
        let (conn, outbox) = (self.registration.conn, self.outbox.clone());
        self.pending = Some(Box::pin(async move {
            let result = node.subscribe(conn, outbox, &channel).await;
            Completion::Subscribed(id, channel, result)
        }));
    }

    fn complete(&mut self, done: Completion) {
        match done {
            Completion::Subscribed(id, _, Ok(())) => self.reply_ok(id.as_ref()),
            Completion::Unsubscribed(id) => self.reply_ok(id.as_ref()),
            Completion::Subscribed(id, channel, Err(e)) => {
                self.registration.channels.remove(&channel);
                self.reply_error(id.as_ref(), e.code(), &e.to_string());
            }
        }
    }

    /// Sends the close frame and reads until the peer finishes the close handshake, each step
    /// bounded by the write timeout. What is queued (replies that explain the close, messages
    /// before a shutdown) is flushed first, unless the peer is the reason: a slow consumer or
    /// a silent peer gets its close frame at once.
    async fn finish(mut self, exit: Exit) {
        // A pending subscribe may hold its channel stripe's lock: release it before the close
        // handshake (the hub entry is covered by the registration, which already lists it).
        self.pending = None;
        self.registration.leave();
        let write_timeout = self.node.config().write_timeout;
        let code = match exit {
            Exit::Close(code) => code,
            Exit::Gone(_) => return,
            Exit::PeerClosed => {
                let _ = timeout(write_timeout, self.ws.flush()).await;
                return;
            }
        };
        if !matches!(code, CloseCode::SlowConsumer | CloseCode::HeartbeatTimeout) {
            if (!self.rx.is_empty() || !self.batch.is_empty()) && self.write_batch(false).await.is_err() {
                return;
            }
        } else if self.written > 0 {
            // A frame cut mid-way must be finished before the close frame can follow it.
            let (io, batch) = (self.ws.get_mut(), &mut self.batch);
            if !matches!(timeout(write_timeout, write_frames(io, batch, &mut self.written, 1)).await, Ok(Ok(()))) {
                return;
            }
        }
        close_handshake(&mut self.ws, code, write_timeout).await;
    }
}

/// Writes up to `limit` frames of `batch` to `io` in vectored writes, taking each frame off the
/// batch once it is fully written; `written` is how much of the first frame is already out, and
/// is kept up to date, so a write that is cut short (cancelled, timed out) can be resumed.
async fn write_frames(
    io: &mut (impl AsyncWrite + Unpin),
    batch: &mut VecDeque<Frame>,
    written: &mut usize,
    mut limit: usize,
) -> io::Result<()> {
    while limit > 0 && !batch.is_empty() {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let count = batch.len().min(MAX_SLICES).min(limit);
        for (slot, frame) in slices.iter_mut().zip(batch.iter()) {
            *slot = IoSlice::new(frame.wire());
        }
        slices[0] = IoSlice::new(&batch[0].wire()[*written..]);
        let mut n = io.write_vectored(&slices[..count]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(front) = batch.front() else { break };
            let left = front.wire().len() - *written;
            if n < left {
                *written += n;
                break;
            }
            n -= left;
            *written = 0;
            batch.pop_front();
            limit -= 1;
        }
    }
    Ok(())
}

/// Sends a close frame with `code` (bounded by `write_timeout`), then reads until the peer
/// completes the closing handshake, for at most `min(write_timeout, 5 s)`.
pub(crate) async fn close_handshake(ws: &mut WsStream, code: CloseCode, write_timeout: Duration) {
    let frame = CloseFrame { code: code.code().into(), reason: Utf8Bytes::from_static(code.reason()) };
    if !matches!(timeout(write_timeout, ws.send(Message::Close(Some(frame)))).await, Ok(Ok(()))) {
        return;
    }
    let _ =
        timeout(write_timeout.min(Duration::from_secs(5)), async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

/// Resolves with the oldest publish's outcome (answers go out in the order commands came in).
async fn next_published(
    queue: &mut VecDeque<(Option<FrameId>, Published)>,
) -> (Option<FrameId>, Result<(), CommandError>) {
    let outcome = std::future::poll_fn(|cx| match queue.front_mut() {
        Some((_, published)) => Pin::new(published).poll(cx),
        None => std::task::Poll::Pending,
    })
    .await;
    (queue.pop_front().and_then(|(id, _)| id), outcome)
}

/// Resolves with the pending command's outcome; never resolves while there is none.
async fn poll_pending(pending: &mut Option<Pending>) -> Completion {
    match pending {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn expiry_fired(timer: &mut Pin<&mut Option<Pin<Box<Sleep>>>>) {
    match timer.as_mut().as_pin_mut() {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

/// Maps a read error to how the socket ends: an oversized frame gets 1009, the rest just end.
fn read_error(error: tungstenite::Error) -> Exit {
    match error {
        tungstenite::Error::Capacity(_) => Exit::Close(CloseCode::TooBig),
        tungstenite::Error::Protocol(_) => Exit::Gone("protocol_error"),
        _ => Exit::Gone("read_error"),
    }
}
