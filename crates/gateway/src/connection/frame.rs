//! Outgoing WebSocket frames, encoded once and written as they are to every socket that gets them.
//!
//! A server's frames are not masked (RFC 6455 §5.1), so the bytes of a text frame, header
//! included, are the same for every subscriber: a node frames each message once, when it arrives
//! (or is published locally), and a socket's task writes the shared bytes straight to its
//! connection, several frames per write. Nothing is framed per subscriber, and nothing is
//! copied but into the one buffer where a write joins its small frames.

use bytes::Bytes;
use std::io::Cursor;
use std::str::Utf8Error;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// One complete WebSocket text frame (final, unmasked), ready for the wire. Cloning it is a
/// reference count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    /// Frames `text` as one text frame.
    pub fn text(text: &str) -> Self {
        let header = FrameHeader { opcode: OpCode::Data(Data::Text), ..FrameHeader::default() };
        let length = text.len() as u64;
        let mut wire = Vec::with_capacity(header.len(length) + text.len());
        // Formatting into a Vec cannot fail: `io::Write` for `Vec` never returns an error.
        let _ = header.format(length, &mut wire);
        wire.extend_from_slice(text.as_bytes());
        Self(Bytes::from(wire))
    }

    /// Frames `bytes` as one text frame if they are valid UTF-8 (text from outside the node,
    /// such as the backplane, is checked once here).
    pub fn text_from_utf8(bytes: &[u8]) -> Result<Self, Utf8Error> {
        std::str::from_utf8(bytes).map(Self::text)
    }

    /// The bytes to write: header and payload.
    pub fn wire(&self) -> &[u8] {
        &self.0
    }

    /// The payload alone (the frame's text).
    pub fn payload(&self) -> &[u8] {
        let mut cursor = Cursor::new(&self.0[..]);
        match FrameHeader::parse(&mut cursor) {
            Ok(Some(_)) => &self.0[cursor.position() as usize..],
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_as_the_same_text_at_every_length_class() {
        for length in [0, 1, 125, 126, 65_535, 65_536, 70_000] {
            let text = "x".repeat(length);
            let frame = Frame::text(&text);
            assert_eq!(frame.payload(), text.as_bytes());
            let mut cursor = Cursor::new(frame.wire());
            let (header, len) = FrameHeader::parse(&mut cursor).ok().flatten().expect("a header");
            assert_eq!(
                (header.opcode, header.is_final, header.mask, len),
                (OpCode::Data(Data::Text), true, None, length as u64)
            );
        }
        assert!(Frame::text_from_utf8(b"\xff").is_err());
        assert_eq!(Frame::text_from_utf8(b"ok").map(|f| f.payload().to_vec()), Ok(b"ok".to_vec()));
    }
}
