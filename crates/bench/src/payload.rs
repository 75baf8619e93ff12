//! The benchmark record carried in every published message, and the cheap readers of the
//! frames the server sends back.
//!
//! A record is a fixed-layout ASCII string, so it travels as a plain JSON string (`"data":"..."`)
//! and the server forwards it byte for byte:
//!
//! ```text
//! gb|pPPPPPP|sSSSSSSSSSSSS|tTTTTTTTTTTTTTTTT|xxxx...
//!    publisher sequence     send time, ns     padding up to the payload size
//! ```
//!
//! Publishers stamp the digits into a prebuilt frame; subscribers find the record with a
//! precompiled substring search and parse the digits in place: no allocation and no JSON
//! parsing per delivery.

use gateway_protocol::{ErrorCode, ServerFrame};
use memchr::memmem::Finder;
use std::sync::LazyLock;

/// What starts every record inside a frame (the opening quote of the JSON string included, so a
/// record can only match at the start of a string value).
pub const MARKER: &[u8] = b"\"gb|p";
const PUB_OFF: usize = 4;
const PUB_W: usize = 6;
const SEQ_OFF: usize = PUB_OFF + PUB_W + 2; // "|s"
const SEQ_W: usize = 12;
const TS_OFF: usize = SEQ_OFF + SEQ_W + 2; // "|t"
const TS_W: usize = 16;
/// Length of the fixed part of a record; the smallest payload.
pub const HEADER_LEN: usize = TS_OFF + TS_W + 1;
/// Largest publisher id a record can carry.
pub const MAX_PUBLISHER: u32 = 999_999;

static FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(MARKER));

/// One decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Publisher id (unique per publisher within one run).
    pub publisher: u32,
    /// Sequence number, from 1, per publisher.
    pub seq: u64,
    /// Send time on the process's monotonic clock ([`crate::clock::now_ns`]).
    pub ts_ns: u64,
}

/// The record text for a payload of `len` bytes (at least [`HEADER_LEN`]), all fields zero.
pub fn template(len: usize) -> Vec<u8> {
    let len = len.max(HEADER_LEN);
    let mut s = Vec::with_capacity(len);
    s.extend_from_slice(b"gb|p");
    s.resize(s.len() + PUB_W, b'0');
    s.extend_from_slice(b"|s");
    s.resize(s.len() + SEQ_W, b'0');
    s.extend_from_slice(b"|t");
    s.resize(s.len() + TS_W, b'0');
    s.push(b'|');
    s.resize(len, b'x');
    s
}

fn write_digits(dst: &mut [u8], mut v: u64) {
    for b in dst.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

#[inline]
fn read_digits(src: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for &b in src {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v * 10 + u64::from(d);
    }
    Some(v)
}

/// Writes the fields into a record made by [`template`] (starting at `rec[0]`).
pub fn stamp(rec: &mut [u8], r: Record) {
    write_digits(&mut rec[PUB_OFF..PUB_OFF + PUB_W], u64::from(r.publisher));
    write_digits(&mut rec[SEQ_OFF..SEQ_OFF + SEQ_W], r.seq);
    write_digits(&mut rec[TS_OFF..TS_OFF + TS_W], r.ts_ns);
}

/// Parses a record starting at `rec[0]` (`gb|p...`).
#[inline]
pub fn parse(rec: &[u8]) -> Option<Record> {
    if rec.len() < HEADER_LEN
        || !rec.starts_with(b"gb|p")
        || &rec[SEQ_OFF - 2..SEQ_OFF] != b"|s"
        || &rec[TS_OFF - 2..TS_OFF] != b"|t"
        || rec[TS_OFF + TS_W] != b'|'
    {
        return None;
    }
    Some(Record {
        publisher: u32::try_from(read_digits(&rec[PUB_OFF..PUB_OFF + PUB_W])?).ok()?,
        seq: read_digits(&rec[SEQ_OFF..SEQ_OFF + SEQ_W])?,
        ts_ns: read_digits(&rec[TS_OFF..TS_OFF + TS_W])?,
    })
}

/// What a received frame holds, as far as the benchmark cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A record (a `message` carrying a benchmark payload).
    Record(Record),
    /// The record marker, but not a well-formed record.
    Malformed,
    /// No record marker: a reply or a foreign message.
    None,
}

/// Finds the record in a frame the server sent (one `message` per frame under the contract).
#[inline]
pub fn find_record(frame: &[u8]) -> Found {
    match FINDER.find(frame) {
        Some(pos) => match parse(&frame[pos + 1..]) {
            Some(r) => Found::Record(r),
            None => Found::Malformed,
        },
        None => Found::None,
    }
}

/// A prebuilt publish frame (JSON text) whose record fields and `id` are rewritten per message
/// without allocating.
#[derive(Debug, Clone)]
pub struct PublishFrame {
    buf: Vec<u8>,
    rec_off: usize,
    base_len: usize,
    with_id: bool,
}

impl PublishFrame {
    /// `{"type":"publish","channel":"<channel>","data":"<record of payload bytes>"` plus, per
    /// message, `,"id":<seq>}` when `with_id` or `}`. `channel` must be a valid channel name
    /// (no escaping needed).
    pub fn new(channel: &str, payload: usize, with_id: bool) -> Self {
        let mut buf = Vec::with_capacity(64 + channel.len() + payload.max(HEADER_LEN));
        buf.extend_from_slice(b"{\"type\":\"publish\",\"channel\":\"");
        buf.extend_from_slice(channel.as_bytes());
        buf.extend_from_slice(b"\",\"data\":\"");
        let rec_off = buf.len();
        buf.extend_from_slice(&template(payload));
        buf.push(b'"');
        let base_len = buf.len();
        Self { buf, rec_off, base_len, with_id }
    }

    /// Stamps `r` (and, with ids, `"id": r.seq`) and returns the frame's text.
    pub fn stamp(&mut self, r: Record) -> &[u8] {
        stamp(&mut self.buf[self.rec_off..], r);
        self.buf.truncate(self.base_len);
        if self.with_id {
            self.buf.extend_from_slice(b",\"id\":");
            let mut digits = [0u8; 20];
            let mut n = r.seq;
            let mut i = digits.len();
            loop {
                i -= 1;
                digits[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            self.buf.extend_from_slice(&digits[i..]);
        }
        self.buf.push(b'}');
        &self.buf
    }
}

/// `{"type":"subscribe","channel":"<channel>","id":<id>}` for a valid channel name.
pub fn subscribe_frame(channel: &str, id: u64) -> String {
    format!(r#"{{"type":"subscribe","channel":"{channel}","id":{id}}}"#)
}

/// A reply frame (to a publisher or a subscriber), classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `ok` with a numeric id (or none).
    Ok(Option<u64>),
    /// `error` with its id (numeric, if any) and code.
    Error(Option<u64>, ErrorCode),
    /// `pong`.
    Pong,
    /// A `message` without a benchmark record.
    Message,
    /// Anything the decoder could not read.
    Unknown,
}

/// Classifies a reply; `{"type":"ok","id":N}` (the gateway's exact encoding) takes a fast path
/// without JSON parsing, anything else goes through the protocol crate's decoder.
pub fn classify(frame: &[u8]) -> Reply {
    const OK_HEAD: &[u8] = b"{\"type\":\"ok\",\"id\":";
    if let Some(rest) = frame.strip_prefix(OK_HEAD)
        && let Some(digits) = rest.strip_suffix(b"}")
        && !digits.is_empty()
        && digits.len() <= 19
        && let Some(id) = read_digits(digits)
    {
        return Reply::Ok(Some(id));
    }
    let Ok(text) = std::str::from_utf8(frame) else {
        return Reply::Unknown;
    };
    let numeric = |id: Option<&serde_json::value::RawValue>| id.and_then(|v| v.get().parse::<u64>().ok());
    match ServerFrame::decode(text) {
        Ok(ServerFrame::Ok { id }) => Reply::Ok(numeric(id)),
        Ok(ServerFrame::Error { id, code, .. }) => Reply::Error(numeric(id), code),
        Ok(ServerFrame::Pong { .. }) => Reply::Pong,
        Ok(ServerFrame::Message { .. }) => Reply::Message,
        Err(_) => Reply::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let t = template(0);
        assert_eq!(t.len(), HEADER_LEN);
        assert_eq!(&t[..], b"gb|p000000|s000000000000|t0000000000000000|");
    }
}
