//! One socket's life, from upgrade to close, in one task.
//!
//! A single `select!` loop plays both pumps of the classic design: it reads client frames and
//! turns them into node calls, and it writes the socket's replies (queued in its [`Replies`])
//! and its channels' messages (read from each channel's feed, see [`crate::hub::feed`]): every
//! frame, already encoded, goes straight to the connection, many per write; a busy socket first lets
//! `--write-linger` pass since its last write (see [`linger`]), so one write carries more.
//! Reading, control frames and the close handshake are tungstenite's.
//! Publishes are pipelined: each is handed to the backplane at once (which fixes its place in the
//! channel's order) and answered in order when the backplane replies, up to `MAX_IN_FLIGHT` (256)
//! at a time. A subscribe or unsubscribe is kept as the one pending command and reading pauses
//! until it resolves, while writing goes on. Heartbeats and token expiry are timers of the same
//! loop; a close (slow consumer, node shutdown through the [`roster::Roster`]) arrives on the
//! socket's [`CloseSwitch`]. `Registration` leaves the hub and the roster on every exit path,
//! panics and cancellation included.

pub mod frame;
pub mod linger;
pub mod outbox;
pub mod roster;
pub mod session;
pub mod transport;

pub use session::Session;

/// An upgraded WebSocket connection, as a socket's task owns it.
pub type WsStream = WebSocketStream<transport::Transport>;

use crate::hub::feed::Reader;
use crate::node::{CommandError, Node, Published, Source};
use futures_util::task::waker_ref;
use futures_util::{SinkExt, StreamExt};
use gateway_protocol::server::{encode_error, encode_ok, encode_pong};
use gateway_protocol::{ChannelName, ClientFrame, CloseCode, ErrorCode, FrameId};
use linger::Linger;
use outbox::{CloseSwitch, ConnId, Frame, Replies};
use session::Budget;
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
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
/// Most frames one write carries.
const MAX_SLICES: usize = 64;
/// Frames that add up to at most this many bytes are copied into one buffer for their write
/// (see [`write_gathered`]); larger ones are written in place.
const MAX_JOINED_BYTES: usize = 16 * 1024;

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
    Subscribed(Option<FrameId>, ChannelName, Result<Reader, CommandError>),
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
    let replies = Replies::new(node.config().queue_size, switch.clone());
    let registration = Registration::new(node.clone(), conn, switch.clone());
    let mut socket = Socket {
        ws,
        replies,
        linger: Linger::new(node.config().write_linger, node.write_budget().clone()),
        node,
        switch,
        registration,
        session,
        pending: None,
        readers: Vec::new(),
        publishes: VecDeque::new(),
        batch: VecDeque::new(),
        cut: Cut::default(),
        control_owed: false,
        lingering: false,
    };
    let exit = socket.serve().await;
    let label = match &exit {
        Exit::Close(code) => code.label(),
        Exit::Gone(why) => why,
        Exit::PeerClosed => "client_closed",
    };
    socket.node.metrics().disconnects.with_label_values(&[label]).inc();
    tracing::debug!(conn, reason = label, "socket closing");
    // Boxed, like a write that must wait: the task's future stays small for idle sockets, and
    // these states are short-lived.
    Box::pin(socket.finish(exit)).await;
}

struct Socket {
    ws: WsStream,
    /// Replies waiting for the next write.
    replies: Replies,
    node: Arc<Node>,
    switch: Arc<CloseSwitch>,
    registration: Registration,
    session: Session,
    pending: Option<Pending>,
    /// The socket's position in each channel it subscribes to (see [`crate::hub::feed`]).
    readers: Vec<(ChannelName, Reader)>,
    /// Publishes sent to the backplane and not yet answered, oldest first.
    publishes: VecDeque<(Option<FrameId>, Published)>,
    /// Replies taken from the queue and being written.
    batch: VecDeque<Frame>,
    /// Where a write cut short stopped (it resumes there).
    cut: Cut,
    /// The WebSocket layer may hold a control frame it owes the peer (the pong to a ping): flush
    /// it before writing frames of our own.
    control_owed: bool,
    /// Frames are queued and wait for the write linger to pass (see [`Socket::linger_until`]).
    lingering: bool,
    /// When the socket writes its channels' messages.
    linger: Linger,
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
                () = ready(&self.replies, &self.readers), if !self.lingering => {
                    if !self.start_linger(linger_over.as_mut(), Instant::now()) {
                        let wrote_at = match self.write_batch(true).await {
                            Ok(at) => at,
                            Err(exit) => return exit,
                        };
                        // A write that made the socket busy starts its linger, so that a linger
                        // with nothing to write at its end can find it quiet again. A busy
                        // socket that cannot linger after it wrote (replies alone, a whole linger
                        // after its last message) is quiet already. (The write took every queued
                        // reply, and only this task queues them, so the queue is empty here.)
                        if !self.start_linger(linger_over.as_mut(), wrote_at) {
                            self.linger.quiet();
                        }
                    }
                }
                // The linger is over, or a burst is filling the queue: write now, and linger again
                // right away, since a socket this busy will have more before the linger is over
                // (if it has none by then, it goes back to waiting for a first frame).
                () = async { tokio::select! { () = &mut linger_over => (), () = self.switch.urged() => () } },
                    if self.lingering =>
                {
                    self.lingering = false;
                    if !self.readers.iter().any(|(_, reader)| reader.has_unread()) {
                        // A whole linger without a message (not one cut short by a queue of
                        // replies): quiet again, the next one goes at once. Replies queued
                        // meanwhile are written now.
                        if linger_over.is_elapsed() {
                            self.linger.quiet();
                        }
                        if self.replies.is_empty() {
                            continue;
                        }
                    }
                    match self.write_batch(true).await {
                        Ok(wrote_at) => self.start_linger(linger_over.as_mut(), wrote_at),
                        Err(exit) => return exit,
                    };
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
                incoming = next_frame(&mut self.ws, &self.switch),
                    if self.pending.is_none() && self.publishes.len() < MAX_IN_FLIGHT && !self.replies.is_half_full() =>
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

    /// When the socket should write what is queued: once the linger has passed, if it is busy
    /// (see [`linger`]), so that one write carries everything that arrives meanwhile. `None`:
    /// write now (the socket receives rarely, or the queue is already half full). While it
    /// lingers the loop keeps reading, answering and heartbeating; only the queue waits.
    fn linger_until(&self, now: Instant) -> Option<Instant> {
        if self.replies.is_half_full() {
            return None;
        }
        self.linger.until(now)
    }

    /// Starts lingering (sets `timer` to the linger's end) if the socket should at `now` (the
    /// time a write just ended, or the current time); returns whether it does.
    fn start_linger(&mut self, timer: Pin<&mut Sleep>, now: Instant) -> bool {
        let Some(flush_at) = self.linger_until(now) else { return false };
        // An urge from before this write is answered by it.
        self.switch.clear_urge();
        self.lingering = true;
        timer.reset(flush_at);
        true
    }

    /// Writes everything queued, in as few writes as the batch allows, and returns when the
    /// write ended. Most writes finish at once (the connection takes the whole batch): those
    /// are done within the current poll, with nothing allocated and no timer armed. A write that
    /// would wait goes on in [`Socket::write_waiting`].
    async fn write_batch(&mut self, abortable: bool) -> Result<Instant, Exit> {
        // Replies first, then each channel's messages: a subscribe's `ok` goes out before the
        // channel's first message.
        self.replies.drain_into(&mut self.batch);
        let mut messages = 0;
        for (_, reader) in self.readers.iter_mut() {
            messages += reader.mark() as u64;
        }
        let frames = self.batch.len() as u64 + messages;
        let wrote = match self.write_at_once().await {
            Some(Ok(())) => Ok(()),
            Some(Err(_)) => Err(Exit::Gone("write_error")),
            None => Box::pin(self.write_waiting(abortable)).await,
        };
        let now = Instant::now();
        self.linger.wrote(messages, now);
        if self.batch.capacity() > KEPT_BATCH_CAPACITY {
            self.batch.shrink_to(KEPT_BATCH_CAPACITY);
        }
        wrote?;
        self.node.metrics().writes.record(frames);
        Ok(now)
    }

    /// Writes the batch if the connection takes all of it without waiting, within one poll.
    /// `None`: it would wait (or a pong the WebSocket layer owes must go first); whatever was
    /// written is already taken off the batch and the readers, and `cut` says where it stopped.
    async fn write_at_once(&mut self) -> Option<io::Result<()>> {
        if self.control_owed {
            return None;
        }
        let Self { ws, readers, batch, cut, .. } = self;
        std::future::poll_fn(|cx| {
            // Dropped before this poll returns: what it wrote is recorded in the batch, the readers
            // and `cut`, and it holds nothing else.
            let write = pin!(write_frames(ws.get_mut(), batch, readers, cut, usize::MAX));
            Poll::Ready(match write.poll(cx) {
                Poll::Ready(wrote) => Some(wrote),
                Poll::Pending => None,
            })
        })
        .await
    }

    /// Finishes writing the batch, waiting for the connection, for at most `--write-timeout`.
    /// With `abortable`, a close asked meanwhile (the queue overflowed while the peer stalled the
    /// write) ends the write at once; the batch keeps what was not written.
    async fn write_waiting(&mut self, abortable: bool) -> Result<(), Exit> {
        let write_timeout = self.node.config().write_timeout;
        let Self { ws, readers, switch, batch, cut, control_owed, .. } = self;
        let write = async {
            timeout(write_timeout, async {
                // What the WebSocket layer holds (a pong it owes) goes out first, whole, so that
                // the frames below start on a frame boundary.
                if *control_owed {
                    ws.flush().await.map_err(|_| io::ErrorKind::BrokenPipe)?;
                    *control_owed = false;
                }
                write_frames(ws.get_mut(), batch, readers, cut, usize::MAX).await.map_err(|e| e.kind())
            })
            .await
        };
        let wrote = tokio::select! {
            biased;
            reason = switch.closed(), if abortable => return Err(Exit::Close(reason)),
            wrote = write => wrote,
        };
        match wrote {
            Ok(Ok(())) => Ok(()),
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
    fn reply(&mut self, text: String) {
        self.replies.push(Frame::text(&text));
    }

    fn reply_error(&mut self, id: Option<&FrameId>, code: ErrorCode, message: &str) {
        self.node.metrics().bad_frames.with_label_values(&[code.as_str()]).inc();
        self.reply(encode_error(id.map(FrameId::raw), code, message));
    }

    fn reply_ok(&mut self, id: Option<&FrameId>) {
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
                if let Some(exit) = self.count_command() {
                    return Some(exit);
                }
                self.reply_error(None, ErrorCode::BadRequest, "binary frames are not supported: send JSON text frames");
                None
            }
            // Pings are answered by the WebSocket layer (its pong may wait in its buffer). Any
            // frame counts as a sign of life.
            Message::Ping(_) => {
                self.control_owed = true;
                self.count_command()
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
                if let Some(exit) = self.count_command() {
                    return Some(exit);
                }
                self.reply_error(e.id.as_ref(), e.code, &e.message);
                return None;
            }
        };
        let charged = match &frame {
            ClientFrame::Publish { id, .. } => self.charge(Budget::Publishes, id.as_ref()),
            ClientFrame::Subscribe { id, .. }
            | ClientFrame::Unsubscribe { id, .. }
            | ClientFrame::Refresh { id, .. } => self.charge(Budget::Commands, id.as_ref()),
            ClientFrame::Ping { .. } => self.count_command().map_or(Ok(()), |exit| Err(Some(exit))),
        };
        if let Err(exit) = charged {
            return exit;
        }
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
                self.readers.retain(|(subscribed, _)| *subscribed != channel);
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

    /// Charges a frame that costs the node real work (a publish, subscribe, unsubscribe or
    /// refresh) to `budget`, and refuses it once the budget is spent. `Err` holds what the
    /// frame's handler returns: the socket's exit for sustained abuse, else `None`, an `error`
    /// `rate_limited` for `id` having been queued.
    fn charge(&mut self, budget: Budget, id: Option<&FrameId>) -> Result<(), Option<Exit>> {
        match self.take_token(budget) {
            Ok(()) => Ok(()),
            Err(true) => Err(Some(Exit::Close(CloseCode::PolicyAbuse))),
            Err(false) => {
                self.reply_error(id, ErrorCode::RateLimited, budget.refusal());
                Err(None)
            }
        }
    }

    /// Counts a frame whose answer costs no more than a refusal would (a `ping`, a malformed or
    /// binary frame, a WebSocket ping) against the command budget: it is answered as usual, but
    /// a client that keeps sending such frames past the budget is closed for sustained abuse.
    fn count_command(&mut self) -> Option<Exit> {
        matches!(self.take_token(Budget::Commands), Err(true)).then_some(Exit::Close(CloseCode::PolicyAbuse))
    }

    /// Takes a token from `budget`, counting a refusal in `gateway_limit_hits_total`.
    fn take_token(&mut self, budget: Budget) -> Result<(), bool> {
        let taken = self.session.take_token(budget);
        if taken.is_err() {
            self.node.metrics().limit_hits.with_label_values(&[budget.label()]).inc();
        }
        taken
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
        let (conn, switch) = (self.registration.conn, self.switch.clone());
        self.pending = Some(Box::pin(async move {
            let result = node.subscribe(conn, switch, &channel).await;
            Completion::Subscribed(id, channel, result)
        }));
    }

    fn complete(&mut self, done: Completion) {
        match done {
            Completion::Subscribed(id, channel, Ok(reader)) => {
                // Most sockets have one channel: room for exactly one (a first push takes four).
                self.readers.reserve_exact(1);
                self.readers.push((channel, reader));
                self.reply_ok(id.as_ref());
            }
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
        self.linger.quiet();
        let flush =
            matches!(exit, Exit::Close(code) if !matches!(code, CloseCode::SlowConsumer | CloseCode::HeartbeatTimeout));
        if !self.detach_feeds(flush) {
            return;
        }
        let write_timeout = self.node.config().write_timeout;
        let code = match exit {
            Exit::Close(code) => code,
            Exit::Gone(_) => return,
            Exit::PeerClosed => {
                let _ = timeout(write_timeout, self.ws.flush()).await;
                return;
            }
        };
        if flush {
            if (!self.replies.is_empty() || !self.batch.is_empty()) && self.write_batch(false).await.is_err() {
                return;
            }
        } else if self.cut.written > 0 {
            // A frame cut mid-way must be finished before the close frame can follow it.
            let (io, batch) = (self.ws.get_mut(), &mut self.batch);
            if !matches!(timeout(write_timeout, write_frames(io, batch, &mut [], &mut self.cut, 1)).await, Ok(Ok(()))) {
                return;
            }
        }
        close_handshake(&mut self.ws, code, write_timeout).await;
    }

    /// Lets go of the channels' feeds as the socket closes, so that it pins none of their
    /// messages while it flushes and says goodbye (up to `--write-timeout` each): what it will
    /// still write is cloned into its own batch first, in the order a write takes it. That is a
    /// channel's frame cut mid-way (which must be finished before anything else), then, with
    /// `everything`, the queued replies and every message delivered to the socket so far.
    /// Returns false if a cut frame cannot be finished (not reached: a cut frame is always a
    /// marked one), in which case nothing more may be written.
    fn detach_feeds(&mut self, everything: bool) -> bool {
        if let Some(index) = self.cut.reader.take() {
            let reader = self.readers.get_mut(index).map(|(_, reader)| reader);
            let Some((frame, reader)) = reader.and_then(|reader| Some((reader.marked().next()?.clone(), reader)))
            else {
                return false;
            };
            self.batch.push_front(frame);
            reader.advance(1);
        }
        if everything {
            self.replies.drain_into(&mut self.batch);
            for (_, reader) in &mut self.readers {
                reader.take_all(&mut self.batch);
            }
        }
        self.readers.clear();
        true
    }
}

/// Where a write that was cut short stopped: one that would have waited (it goes on in
/// `Socket::write_waiting`), or one cancelled or timed out (the socket is closing).
#[derive(Debug, Default)]
struct Cut {
    /// Bytes of the first unwritten frame already out.
    written: usize,
    /// Whose frame that is: a channel's (the index of its reader), or else the first reply.
    reader: Option<usize>,
}

/// Writes up to `limit` frames to `io`, up to 64 per write: the replies in `batch`, then the
/// marked messages of each reader, each taken off (or passed) once it is fully written. `cut`
/// says how much of the first frame is already out and is kept up to date, so a write that is
/// cut short can be resumed.
async fn write_frames(
    io: &mut (impl AsyncWrite + Unpin),
    batch: &mut VecDeque<Frame>,
    readers: &mut [(ChannelName, Reader)],
    cut: &mut Cut,
    mut limit: usize,
) -> io::Result<()> {
    // A channel's frame cut mid-way is finished first: in place, with what follows it, if it is
    // still first in line (see `first_in_line`); otherwise alone, or the replies queued in front
    // of it would come before it.
    if let Some(index) = cut.reader.filter(|&index| !first_in_line(index, batch, readers)) {
        let Some((_, reader)) = readers.get_mut(index) else {
            return Err(io::Error::other("the channel of a frame cut mid-way is gone"));
        };
        while let Some(frame) = reader.marked().next() {
            let n = io.write(&frame.wire()[cut.written..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            cut.written += n;
            if cut.written == frame.wire().len() {
                reader.advance(1);
                limit = limit.saturating_sub(1);
                break;
            }
        }
        *cut = Cut::default();
    }
    while limit > 0 {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut frames = batch.iter().chain(readers.iter().flat_map(|(_, reader)| reader.marked())).take(limit);
        let Some(first) = frames.next() else { break };
        slices[0] = IoSlice::new(&first.wire()[cut.written..]);
        let mut count = 1;
        for (slot, frame) in slices[1..].iter_mut().zip(frames) {
            *slot = IoSlice::new(frame.wire());
            count += 1;
        }
        let mut n = write_gathered(io, &slices[..count]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let whole = written_through(batch.iter(), &mut n, &mut cut.written);
        batch.drain(..whole);
        limit -= whole;
        for (index, (_, reader)) in readers.iter_mut().enumerate() {
            if n == 0 {
                break;
            }
            let whole = written_through(reader.marked(), &mut n, &mut cut.written);
            if n == 0 {
                // The write ended among this reader's frames: inside one of them, or between.
                cut.reader = (cut.written > 0).then_some(index);
            }
            reader.advance(whole);
            limit -= whole;
        }
    }
    Ok(())
}

/// Whether the frame cut mid-way in reader `index`'s messages is the first a write would take
/// (nothing queued in front of it): then the write resumes it in place. That is the case when a
/// write that would have waited goes on (see `Socket::write_at_once`).
fn first_in_line(index: usize, batch: &VecDeque<Frame>, readers: &[(ChannelName, Reader)]) -> bool {
    batch.is_empty()
        && readers.get(index).is_some_and(|(_, reader)| reader.has_marked())
        && readers.iter().take(index).all(|(_, reader)| !reader.has_marked())
}

thread_local! {
    /// Where a write's small frames are joined (see [`write_gathered`]): one buffer per worker
    /// thread, used within a single poll, so no socket holds or allocates one.
    static JOINED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Writes `slices` in one write: small frames are first copied into one buffer, larger ones go
/// as they are in a vectored write. The kernel's cost per write grows with the number of pieces
/// (each is copied apart, with checks of its own), so a run of 150-byte messages is cheaper
/// joined in user space (docs/architecture.md has the figures). The join is redone on each poll
/// (a write that is not ready took nothing), so the buffer is never held across a wait.
async fn write_gathered(io: &mut (impl AsyncWrite + Unpin), slices: &[IoSlice<'_>]) -> io::Result<usize> {
    let total: usize = slices.iter().map(|slice| slice.len()).sum();
    if slices.len() == 1 || total > MAX_JOINED_BYTES {
        return io.write_vectored(slices).await;
    }
    std::future::poll_fn(|cx| {
        let joined = JOINED.try_with(|joined| {
            let mut joined = joined.borrow_mut();
            joined.clear();
            for slice in slices {
                joined.extend_from_slice(slice);
            }
            Pin::new(&mut *io).poll_write(cx, &joined)
        });
        // A thread whose locals are being torn down writes the pieces as they are.
        joined.unwrap_or_else(|_| Pin::new(&mut *io).poll_write_vectored(cx, slices))
    })
    .await
}

/// Takes the `n` bytes a write put out off `frames`, in order, the first from `written` on:
/// returns how many frames they cover whole, leaves in `n` what goes beyond `frames`, and in
/// `written` how much of a frame they end inside (0 at a frame's end).
fn written_through<'a>(frames: impl Iterator<Item = &'a Frame>, n: &mut usize, written: &mut usize) -> usize {
    let mut whole = 0;
    for frame in frames {
        if *n == 0 {
            break;
        }
        let left = frame.wire().len() - *written;
        if *n < left {
            *written += *n;
            *n = 0;
            break;
        }
        *n -= left;
        *written = 0;
        whole += 1;
    }
    whole
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

/// The next frame from the client. The stream is polled only when its read side woke the task
/// (or returned a frame last time), not on every wake-up: a busy socket wakes mostly for its
/// writes, and polling the read side each time (the WebSocket layer's waker proxy, the
/// connection's readiness lock) was a visible share of a fan-out profile. The stream is polled
/// with the socket's close switch as its waker (see [`CloseSwitch::take_read_wake`]).
async fn next_frame(ws: &mut WsStream, switch: &Arc<CloseSwitch>) -> Option<Result<Message, tungstenite::Error>> {
    std::future::poll_fn(|cx| {
        if !switch.take_read_wake(cx) {
            return Poll::Pending;
        }
        let waker = waker_ref(switch);
        let polled = ws.poll_next_unpin(&mut Context::from_waker(&waker));
        if polled.is_ready() {
            switch.keep_reading();
        }
        polled
    })
    .await
}

/// Resolves once a reply is queued or a channel has a message for the socket, without taking
/// anything (cancel-safe). Until then, a channel's message wakes the socket's task (a reply is
/// queued by the task itself, whose loop polls this again before it waits).
async fn ready(replies: &Replies, readers: &[(ChannelName, Reader)]) {
    std::future::poll_fn(|_: &mut Context<'_>| {
        if !replies.is_empty() {
            return Poll::Ready(());
        }
        for (_, reader) in readers {
            reader.wait();
        }
        if readers.iter().any(|(_, reader)| reader.has_unread()) { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::feed::Feed;
    use futures_util::FutureExt;
    use std::task::{Context, Poll};

    /// A connection that takes at most `per_write` bytes per write, and only `budget` bytes in
    /// all before it stalls (pending, like a peer that stopped reading).
    struct Throttled {
        wire: Vec<u8>,
        per_write: usize,
        budget: usize,
        /// How many pieces each write that took bytes was given.
        pieces: Vec<usize>,
    }

    impl AsyncWrite for Throttled {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.per_write).min(self.budget);
            if n == 0 {
                return Poll::Pending;
            }
            self.budget -= n;
            self.wire.extend_from_slice(&buf[..n]);
            self.pieces.push(1);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.per_write - n).min(self.budget);
                self.budget -= take;
                self.wire.extend_from_slice(&buf[..take]);
                n += take;
            }
            if n == 0 {
                return Poll::Pending;
            }
            self.pieces.push(bufs.len());
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The texts of the complete frames on `wire`, in order; panics on a torn frame.
    fn texts(mut wire: &[u8]) -> Vec<String> {
        let mut texts = Vec::new();
        while !wire.is_empty() {
            let mut cursor = std::io::Cursor::new(wire);
            let (_, length) = tungstenite::protocol::frame::FrameHeader::parse(&mut cursor)
                .ok()
                .flatten()
                .expect("a whole frame header");
            let start = cursor.position() as usize;
            let end = start + length as usize;
            texts.push(String::from_utf8(wire[start..end].to_vec()).expect("text"));
            wire = &wire[end..];
        }
        texts
    }

    /// A channel's feed holding `messages`, and one socket's reader of it with all of them
    /// marked for its next write.
    fn one_channel(messages: &[String]) -> (Arc<Feed>, Vec<(ChannelName, Reader)>) {
        let feed = Arc::new(Feed::new());
        let mut readers = vec![(ChannelName::new("a").expect("valid"), feed.reader(Arc::default()))];
        for message in messages {
            feed.append(&Frame::text(message));
        }
        readers[0].1.mark();
        (feed, readers)
    }

    fn numbered(count: usize) -> Vec<String> {
        (0..count).map(|n| format!("message {n}")).collect()
    }

    #[test]
    fn frames_too_large_to_join_are_written_in_place_whole_and_in_order() {
        let large = |n: usize| format!("{n}{}", "x".repeat(MAX_JOINED_BYTES / 2));
        let (_feed, mut readers) = one_channel(&[large(0), large(1), large(2)]);
        let mut batch = VecDeque::from([Frame::text("reply")]);
        let mut io = Throttled { wire: Vec::new(), per_write: 5000, budget: usize::MAX, pieces: Vec::new() };
        let wrote = write_frames(&mut io, &mut batch, &mut readers, &mut Cut::default(), usize::MAX).now_or_never();
        assert!(matches!(wrote, Some(Ok(()))));
        assert_eq!(texts(&io.wire), ["reply".to_owned(), large(0), large(1), large(2)]);
        assert_eq!(io.pieces[0], 4, "the first write is given the four frames in place");
        assert!(!readers[0].1.has_unread() && batch.is_empty());
    }

    #[test]
    fn a_write_that_would_wait_mid_frame_resumes_in_place_with_what_follows_in_one_write() {
        let (_feed, mut readers) = one_channel(&numbered(3));
        let mut batch = VecDeque::new();
        let mut cut = Cut::default();
        // The connection takes 15 bytes (inside the second message), then would wait.
        let mut io = Throttled { wire: Vec::new(), per_write: usize::MAX, budget: 15, pieces: Vec::new() };
        assert!(write_frames(&mut io, &mut batch, &mut readers, &mut cut, usize::MAX).now_or_never().is_none());
        assert_eq!((cut.reader, cut.written), (Some(0), 4));
        assert_eq!(io.pieces.len(), 1);

        // Nothing was queued in front of it: the rest of that frame and the next go in one write.
        io.budget = usize::MAX;
        let wrote = write_frames(&mut io, &mut batch, &mut readers, &mut cut, usize::MAX).now_or_never();
        assert!(matches!(wrote, Some(Ok(()))));
        assert_eq!(texts(&io.wire), ["message 0", "message 1", "message 2"]);
        assert_eq!(io.pieces.len(), 2, "resumed in one write: {:?}", io.pieces);
        assert!(!readers[0].1.has_unread());
        assert_eq!((cut.reader, cut.written), (None, 0));
    }

    #[test]
    fn a_write_cut_inside_a_channels_frame_finishes_that_frame_before_anything_queued_since() {
        let (feed, mut readers) = one_channel(&numbered(3));
        let mut batch = VecDeque::from([Frame::text("reply 0")]);
        let mut cut = Cut::default();
        // The peer stalls 9 bytes into the third message; the write is then abandoned.
        let mut io = Throttled { wire: Vec::new(), per_write: 7, budget: 9 + 11 + 20, pieces: Vec::new() };
        assert!(write_frames(&mut io, &mut batch, &mut readers, &mut cut, usize::MAX).now_or_never().is_none());
        assert_eq!((cut.reader, cut.written), (Some(0), 9));

        // Meanwhile a reply is queued and another message arrives.
        batch.push_back(Frame::text("reply 1"));
        feed.append(&Frame::text("message 3"));
        readers[0].1.mark();
        io.budget = usize::MAX;
        let wrote = write_frames(&mut io, &mut batch, &mut readers, &mut cut, usize::MAX).now_or_never();
        assert!(matches!(wrote, Some(Ok(()))));
        assert_eq!(texts(&io.wire), ["reply 0", "message 0", "message 1", "message 2", "reply 1", "message 3"]);
        assert!(io.pieces.iter().all(|&pieces| pieces == 1), "small frames are joined: {:?}", io.pieces);
        assert!(!readers[0].1.has_unread() && batch.is_empty());
        assert_eq!((cut.reader, cut.written), (None, 0));
    }
}
