//! A minimal WebSocket client (RFC 6455) for the hot path of the load generator.
//!
//! Receiving is the load generator's main cost (a million deliveries per second), so subscribers
//! do not go through a general WebSocket stack: one `read` fills a per-connection buffer, frames
//! are parsed in place and handed out as borrowed slices. Nothing is allocated per frame.
//! Outgoing frames are masked as the RFC requires and written in batches.
//!
//! Limits, which the gateway's wire contract never needs: no extensions (no compression), no
//! fragmented messages (reported as [`WsError::Fragmented`]), no TLS.

use crate::target::Resolved;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Largest frame accepted from the server (the buffer grows up to this on demand).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest HTTP response head accepted during the handshake.
const MAX_HEAD: usize = 16 << 10;

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// 0x0, continuation of a fragmented message.
    Continuation,
    /// 0x1
    Text,
    /// 0x2
    Binary,
    /// 0x8
    Close,
    /// 0x9
    Ping,
    /// 0xA
    Pong,
}

impl Opcode {
    fn from_bits(b: u8) -> Option<Self> {
        Some(match b {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }
}

/// What went wrong on a connection.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// Socket error.
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// The server answered the upgrade with another status than 101.
    #[error("HTTP {0}")]
    Http(u16),
    /// The upgrade response was not a valid WebSocket handshake.
    #[error("bad handshake: {0}")]
    Handshake(&'static str),
    /// A frame broke RFC 6455 (reserved bits, masked server frame, bad opcode, ...).
    #[error("protocol: {0}")]
    Protocol(&'static str),
    /// A fragmented message (not used by the gateway; not supported here).
    #[error("fragmented message")]
    Fragmented,
    /// A frame above [`MAX_FRAME`].
    #[error("frame too large")]
    TooLarge,
    /// The step did not finish in time.
    #[error("timeout")]
    Timeout,
}

impl WsError {
    /// A short, stable label for error tallies (`"io: connection refused"` → `"io"` etc. keeps
    /// the tally small while staying readable).
    pub fn label(&self) -> String {
        match self {
            Self::Io(e) => format!("io: {}", e.kind()),
            Self::Http(s) => format!("http {s}"),
            Self::Handshake(w) => format!("handshake: {w}"),
            Self::Protocol(w) => format!("protocol: {w}"),
            Self::Fragmented => "fragmented".to_owned(),
            Self::TooLarge => "too large".to_owned(),
            Self::Timeout => "timeout".to_owned(),
        }
    }
}

/// The parsed head of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// FIN bit.
    pub fin: bool,
    /// Opcode.
    pub opcode: Opcode,
    /// Bytes of header (2 to 14).
    pub header_len: usize,
    /// Bytes of payload.
    pub payload_len: usize,
    /// Masking key, when the frame is masked (client frames).
    pub mask: Option<[u8; 4]>,
}

/// Parses a frame head at `b[0]`; `Ok(None)` when more bytes are needed.
pub fn parse_head(b: &[u8]) -> Result<Option<FrameHead>, WsError> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set"));
    }
    let fin = b[0] & 0x80 != 0;
    let opcode = Opcode::from_bits(b[0] & 0x0F).ok_or(WsError::Protocol("unknown opcode"))?;
    let masked = b[1] & 0x80 != 0;
    let (len, mut header_len) = match b[1] & 0x7F {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([b[2], b[3]])), 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(x), 10)
        }
        n => (u64::from(n), 2),
    };
    if matches!(opcode, Opcode::Close | Opcode::Ping | Opcode::Pong) && (len > 125 || !fin) {
        return Err(WsError::Protocol("bad control frame"));
    }
    let payload_len = usize::try_from(len).map_err(|_| WsError::TooLarge)?;
    if payload_len > MAX_FRAME {
        return Err(WsError::TooLarge);
    }
    let mask = if masked {
        if b.len() < header_len + 4 {
            return Ok(None);
        }
        let m = [b[header_len], b[header_len + 1], b[header_len + 2], b[header_len + 3]];
        header_len += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHead { fin, opcode, header_len, payload_len, mask }))
}

/// XORs `data` with the masking key (RFC 6455 §5.3).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends one complete frame (FIN set) to `out`, masked with `mask` when given.
pub fn encode_frame(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(0x80 | opcode.bits());
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mbit | len as u8);
    } else if let Ok(l) = u16::try_from(len) {
        out.push(mbit | 126);
        out.extend_from_slice(&l.to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], m);
        }
        None => out.extend_from_slice(payload),
    }
}

/// A complete frame borrowed from a [`FrameReader`]'s buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Opcode.
    pub opcode: Opcode,
    /// Unmasked payload.
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// For a close frame: its code (if any) and reason.
    pub fn close_info(&self) -> (Option<u16>, String) {
        if self.payload.len() >= 2 {
            let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
            (Some(code), String::from_utf8_lossy(&self.payload[2..]).into_owned())
        } else {
            (None, String::new())
        }
    }
}

/// Buffers incoming bytes and hands out complete frames.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    /// A reader whose buffer starts at `capacity` bytes (it grows for larger frames).
    pub fn new(capacity: usize) -> Self {
        Self { buf: vec![0; capacity.max(256)], start: 0, end: 0 }
    }

    /// Appends bytes (tests, and data that arrived with the handshake response).
    pub fn push(&mut self, data: &[u8]) {
        self.make_room(data.len());
        self.buf[self.end..self.end + data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// Bytes buffered and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn make_room(&mut self, want: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            let new_len = (self.end + want).next_power_of_two();
            self.buf.resize(new_len, 0);
        }
    }

    /// One `read` from `io` into the buffer; returns the byte count (0 at end of stream).
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<usize, WsError> {
        // Room for at least the rest of the pending frame, or a decent chunk.
        let mut want = 1024.min(self.buf.len() / 2).max(64);
        if let Some(head) = parse_head(&self.buf[self.start..self.end])? {
            let total = head.header_len + head.payload_len;
            want = want.max(total.saturating_sub(self.buffered()));
        }
        self.make_room(want);
        // Read as much as fits (fewer syscalls under load).
        let n = io.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Pops the next complete frame, if the buffer holds one.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, WsError> {
        let avail = &self.buf[self.start..self.end];
        let Some(head) = parse_head(avail)? else {
            return Ok(None);
        };
        let total = head.header_len + head.payload_len;
        if avail.len() < total {
            return Ok(None);
        }
        if !head.fin || head.opcode == Opcode::Continuation {
            return Err(WsError::Fragmented);
        }
        let from = self.start + head.header_len;
        let to = self.start + total;
        self.start = to;
        if let Some(m) = head.mask {
            // Server frames are never masked, but accept it (tests feed client frames too).
            apply_mask(&mut self.buf[from..to], m);
        }
        Ok(Some(Frame { opcode: head.opcode, payload: &self.buf[from..to] }))
    }
}

/// Builds masked client frames in a reusable buffer.
#[derive(Debug)]
pub struct FrameWriter {
    out: Vec<u8>,
    mask_state: u32,
}

impl FrameWriter {
    /// A writer with a buffer of `capacity` bytes and a masking-key sequence seeded by `seed`.
    pub fn new(capacity: usize, seed: u64) -> Self {
        // Any non-zero xorshift state; the keys need not be secret here (RFC 6455 wants them
        // unpredictable to defeat proxy cache poisoning, irrelevant on loopback).
        let s = (seed ^ (seed >> 32)) as u32;
        Self { out: Vec::with_capacity(capacity), mask_state: if s == 0 { 0x9E37_79B9 } else { s } }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        x.to_ne_bytes()
    }

    /// Queues one frame.
    pub fn push(&mut self, opcode: Opcode, payload: &[u8]) {
        let m = self.next_mask();
        encode_frame(&mut self.out, opcode, payload, Some(m));
    }

    /// Bytes queued.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// Writes everything queued with one `write_all`.
    pub async fn flush<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> Result<(), WsError> {
        if !self.out.is_empty() {
            io.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }
}

/// An open connection: the socket, its reader and its writer.
#[derive(Debug)]
pub struct WsConn {
    /// The socket.
    pub stream: TcpStream,
    /// Incoming frames.
    pub reader: FrameReader,
    /// Outgoing frames.
    pub writer: FrameWriter,
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Checks an HTTP upgrade response head against the key that was sent.
pub fn check_upgrade_response(head: &[u8], key: &str) -> Result<(), WsError> {
    let text = std::str::from_utf8(head).map_err(|_| WsError::Handshake("response is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        return Err(WsError::Handshake("not an HTTP/1.x response"));
    }
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or(WsError::Handshake("no status code"))?;
    if status != 101 {
        return Err(WsError::Http(status));
    }
    let expected = derive_accept_key(key.as_bytes());
    let mut accepted = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("sec-websocket-accept")
        {
            accepted = value.trim() == expected;
        }
    }
    if accepted { Ok(()) } else { Err(WsError::Handshake("missing or wrong Sec-WebSocket-Accept")) }
}

/// Opens a TCP connection to `target` and performs the WebSocket upgrade. `read_buffer` is the
/// initial size of the connection's receive buffer.
pub async fn connect(target: &Resolved, read_buffer: usize, seed: u64) -> Result<WsConn, WsError> {
    let mut stream = TcpStream::connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let key = generate_key();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.target.path_and_query, target.target.authority
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(WsError::Handshake("connection closed during the upgrade"));
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&head) {
            break end;
        }
        if head.len() > MAX_HEAD {
            return Err(WsError::Handshake("response head too large"));
        }
    };
    check_upgrade_response(&head[..end], &key)?;
    let mut reader = FrameReader::new(read_buffer);
    // Frames the server sent right behind the response head.
    reader.push(&head[end..]);
    Ok(WsConn { stream, reader, writer: FrameWriter::new(256, seed) })
}

/// Error or close while waiting for a reply during setup.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Transport or protocol failure.
    #[error("{0}")]
    Ws(#[from] WsError),
    /// The server answered with an `error` frame.
    #[error("refused: {0}")]
    Refused(String),
    /// The server closed the connection.
    #[error("closed {0:?} {1}")]
    Closed(Option<u16>, String),
}

impl SetupError {
    /// A short label for error tallies.
    pub fn label(&self) -> String {
        match self {
            Self::Ws(e) => e.label(),
            Self::Refused(code) => format!("refused: {code}"),
            Self::Closed(Some(c), r) => format!("closed {c} {r}"),
            Self::Closed(None, _) => "closed".to_owned(),
        }
    }
}

impl WsConn {
    /// Sends one text frame now.
    pub async fn send_text(&mut self, text: &[u8]) -> Result<(), WsError> {
        self.writer.push(Opcode::Text, text);
        self.writer.flush(&mut self.stream).await
    }

    /// Sends `subscribe` with `id` and waits for the `ok` with that id. Answers pings on the way.
    pub async fn subscribe(&mut self, channel: &str, id: u64) -> Result<(), SetupError> {
        self.send_text(crate::payload::subscribe_frame(channel, id).as_bytes()).await?;
        loop {
            let mut pong: Option<Vec<u8>> = None;
            while let Some(f) = self.reader.next_frame()? {
                match f.opcode {
                    Opcode::Text => match crate::payload::classify(f.payload) {
                        crate::payload::Reply::Ok(Some(got)) if got == id => return Ok(()),
                        crate::payload::Reply::Error(_, code) => return Err(SetupError::Refused(code.to_string())),
                        _ => {}
                    },
                    Opcode::Ping => pong = Some(f.payload.to_vec()),
                    Opcode::Close => {
                        let (code, reason) = f.close_info();
                        return Err(SetupError::Closed(code, reason));
                    }
                    _ => {}
                }
            }
            if let Some(p) = pong {
                self.writer.push(Opcode::Pong, &p);
                self.writer.flush(&mut self.stream).await?;
            }
            if self.reader.fill(&mut self.stream).await? == 0 {
                return Err(SetupError::Closed(None, "eof".to_owned()));
            }
        }
    }

    /// Sends a close frame (1000) and waits, at most `wait`, for the server to end the
    /// connection, so that the server side closes the TCP connection first (its TIME_WAIT, not
    /// ours). Errors are ignored: this is teardown.
    pub async fn close(mut self, wait: Duration) {
        self.writer.push(Opcode::Close, &1000u16.to_be_bytes());
        if self.writer.flush(&mut self.stream).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(wait, async {
            loop {
                match self.reader.fill(&mut self.stream).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        // Discard whatever is still in flight.
                        while let Ok(Some(_)) = self.reader.next_frame() {}
                    }
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_masked_and_unmasked_frames() {
        for len in [0usize, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, Opcode::Text, &payload, Some([1, 2, 3, 4]));
            encode_frame(&mut out, Opcode::Binary, &payload, None);
            let mut r = FrameReader::new(64);
            // Feed byte by byte for the small ones, in bulk for the large ones.
            if len < 200 {
                let mut got = 0;
                for b in &out {
                    r.push(std::slice::from_ref(b));
                    while let Some(f) = r.next_frame().expect("valid") {
                        assert_eq!(f.payload, &payload[..]);
                        got += 1;
                    }
                }
                assert_eq!(got, 2);
            } else {
                r.push(&out);
                let f = r.next_frame().expect("valid").expect("complete");
                assert_eq!((f.opcode, f.payload), (Opcode::Text, &payload[..]));
                let f = r.next_frame().expect("valid").expect("complete");
                assert_eq!((f.opcode, f.payload), (Opcode::Binary, &payload[..]));
                assert!(r.next_frame().expect("valid").is_none());
            }
        }
    }
}
