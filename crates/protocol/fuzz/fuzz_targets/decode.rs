//! Fuzzes the protocol decoders with arbitrary bytes: `ClientFrame::decode` (what the gateway
//! runs on every client text frame) on the lossy UTF-8 of the input and, when the input is valid
//! UTF-8, on the input itself; and `ServerFrame::decode` (what clients run) on both.
//!
//! Beyond "no panic", it checks what the gateway relies on when it answers:
//! - an accepted command's channel is a valid channel name and its `id` is a JSON string or number;
//! - the `error` reply built from a decode error (which echoes the raw `id`) is valid JSON text
//!   that decodes back to the same code;
//! - a `message` frame built from an accepted `publish` is valid JSON carrying the same channel
//!   and the payload byte for byte;
//! - every server frame re-encodes to text that decodes and re-encodes to the same text.
//!
//! Run: `cd crates/protocol/fuzz && cargo +nightly fuzz run decode` (docs/security.md).
#![no_main]

use gateway_protocol::server::encode_error;
use gateway_protocol::{ChannelName, ClientFrame, ServerFrame, encode_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lossy = String::from_utf8_lossy(data);
    check(&lossy);
    if let Ok(text) = std::str::from_utf8(data)
        && text != lossy
    {
        check(text);
    }
});

fn check(text: &str) {
    check_client(text);
    check_server(text);
}

fn check_client(text: &str) {
    match ClientFrame::decode(text) {
        Ok(frame) => {
            if let Some(id) = frame.id() {
                let first = id.json().as_bytes().first().copied();
                assert!(matches!(first, Some(b'"' | b'-' | b'0'..=b'9')), "id {:?}", id.json());
            }
            match &frame {
                ClientFrame::Subscribe { channel, .. } | ClientFrame::Unsubscribe { channel, .. } => {
                    assert!(ChannelName::new(channel.as_str()).is_ok());
                }
                ClientFrame::Publish { channel, data, .. } => {
                    assert!(ChannelName::new(channel.as_str()).is_ok());
                    let message = encode_message(channel.as_str(), data);
                    match ServerFrame::decode(&message) {
                        Ok(ServerFrame::Message { channel: c, data: d }) => {
                            assert_eq!((&*c, d.get()), (channel.as_str(), data.get()));
                        }
                        other => panic!("message frame {message:?} decoded as {other:?}"),
                    }
                }
                ClientFrame::Ping { .. } | ClientFrame::Refresh { .. } => {}
            }
        }
        Err(e) => {
            assert!(!e.message.is_empty());
            let reply = encode_error(e.id.as_ref().map(|id| id.raw()), e.code, &e.message);
            match ServerFrame::decode(&reply) {
                Ok(ServerFrame::Error { code, .. }) => assert_eq!(code, e.code),
                other => panic!("error reply {reply:?} decoded as {other:?}"),
            }
            // Valid JSON text (the decode above read all of it); not necessarily a `Value`:
            // an echoed `id` such as `1E999` is valid JSON but out of `f64` range.
            let _: Box<serde_json::value::RawValue> = serde_json::from_str(&reply).expect("the error reply is JSON");
        }
    }
}

fn check_server(text: &str) {
    if let Ok(frame) = ServerFrame::decode(text) {
        let encoded = frame.encode();
        let again = ServerFrame::decode(&encoded).unwrap_or_else(|e| panic!("{encoded:?} does not decode: {e}"));
        assert_eq!(again.encode(), encoded);
    }
}
