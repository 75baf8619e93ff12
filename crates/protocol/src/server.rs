//! Server-to-client frames: replies (`ok`, `pong`, `error`) and the `message` frame.
//!
//! A `message` frame is encoded once per published message ([`encode_message`]) and the same
//! bytes are then shared by every subscriber. [`ServerFrame::decode`] is the client-side reader.

use crate::client::FrameId;
use crate::codes::ErrorCode;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// A frame the server sends, borrowed from its text when decoded.
#[derive(Debug)]
pub enum ServerFrame<'a> {
    /// A command succeeded.
    Ok {
        /// The command's `id`.
        id: Option<&'a RawValue>,
    },
    /// Answer to `ping`.
    Pong {
        /// The ping's `id`.
        id: Option<&'a RawValue>,
    },
    /// A command failed.
    Error {
        /// The command's `id`, when it had one and it could be read.
        id: Option<&'a RawValue>,
        /// The stable error code.
        code: ErrorCode,
        /// A human-readable explanation.
        message: Cow<'a, str>,
    },
    /// A message published on a channel this socket subscribed to.
    Message {
        /// The channel it was published on.
        channel: Cow<'a, str>,
        /// The published `data`, untouched.
        data: &'a RawValue,
    },
}

impl ServerFrame<'_> {
    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        match self {
            Self::Ok { id } => reply("ok", *id),
            Self::Pong { id } => reply("pong", *id),
            Self::Error { id, code, message } => encode_error(*id, *code, message),
            Self::Message { channel, data } => {
                // Channels on the wire are validated names: only escape when given something else.
                match crate::channel::validate(channel) {
                    Ok(()) => encode_message(channel, data),
                    Err(_) => {
                        let quoted = serde_json::Value::String(channel.to_string()).to_string();
                        format!(r#"{{"type":"message","channel":{quoted},"data":{}}}"#, data.get())
                    }
                }
            }
        }
    }
}

fn reply(kind: &str, id: Option<&RawValue>) -> String {
    match id {
        Some(id) => format!(r#"{{"type":"{kind}","id":{}}}"#, id.get()),
        None => format!(r#"{{"type":"{kind}"}}"#),
    }
}

/// Encodes `{"type":"ok","id":..}` for a command id.
pub fn encode_ok(id: &FrameId) -> String {
    reply("ok", Some(id.raw()))
}

/// Encodes `{"type":"pong","id":..}`; without an id, `{"type":"pong"}`.
pub fn encode_pong(id: Option<&FrameId>) -> String {
    reply("pong", id.map(FrameId::raw))
}

/// Encodes an `error` frame; `message` is escaped as a JSON string.
pub fn encode_error(id: Option<&RawValue>, code: ErrorCode, message: &str) -> String {
    let message = serde_json::Value::String(message.to_owned()).to_string();
    match id {
        Some(id) => format!(r#"{{"type":"error","id":{},"code":"{}","message":{message}}}"#, id.get(), code.as_str()),
        None => format!(r#"{{"type":"error","code":"{}","message":{message}}}"#, code.as_str()),
    }
}

/// Encodes the `message` frame for a validated channel name and a raw JSON payload, once per
/// published message; the result is what every subscriber receives, byte for byte.
pub fn encode_message(channel: &str, data: &RawValue) -> String {
    const HEAD: &str = r#"{"type":"message","channel":""#;
    const MID: &str = r#"","data":"#;
    let data = data.get();
    let mut out = String::with_capacity(HEAD.len() + channel.len() + MID.len() + data.len() + 1);
    out.push_str(HEAD);
    out.push_str(channel);
    out.push_str(MID);
    out.push_str(data);
    out.push('}');
    out
}

#[derive(Deserialize)]
struct LooseServerFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    code: Option<ErrorCode>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Why a server frame could not be read (client side).
#[derive(Debug, thiserror::Error)]
pub enum ServerDecodeError {
    /// Not JSON, or a field of the wrong type.
    #[error("invalid server frame: {0}")]
    Json(#[from] serde_json::Error),
    /// A `type` this version does not know.
    #[error("unknown server frame type `{0}`")]
    UnknownType(String),
    /// A field the frame type requires is absent.
    #[error("server frame `{0}` lacks field `{1}`")]
    Missing(&'static str, &'static str),
}

impl<'a> ServerFrame<'a> {
    /// Decodes a frame sent by the server (what a client does).
    pub fn decode(text: &'a str) -> Result<Self, ServerDecodeError> {
        let f: LooseServerFrame<'a> = serde_json::from_str(text)?;
        match &*f.kind {
            "ok" => Ok(Self::Ok { id: f.id }),
            "pong" => Ok(Self::Pong { id: f.id }),
            "error" => Ok(Self::Error {
                id: f.id,
                code: f.code.ok_or(ServerDecodeError::Missing("error", "code"))?,
                message: f.message.unwrap_or_default(),
            }),
            "message" => Ok(Self::Message {
                channel: f.channel.ok_or(ServerDecodeError::Missing("message", "channel"))?,
                data: f.data.ok_or(ServerDecodeError::Missing("message", "data"))?,
            }),
            other => Err(ServerDecodeError::UnknownType(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json(s: &str) -> Value {
        serde_json::from_str(s).expect("valid JSON")
    }

    #[test]
    fn encodes_the_contract_examples() {
        let data = RawValue::from_string(r#"{"text":"hi"}"#.into()).expect("raw");
        assert_eq!(
            json(&encode_message("chat:lobby", &data)),
            json(r#"{"type": "message", "channel": "chat:lobby", "data": {"text": "hi"}}"#)
        );
        assert_eq!(json(&encode_ok(&FrameId::number(1))), json(r#"{"type":"ok","id":1}"#));
        assert_eq!(json(&encode_pong(None)), json(r#"{"type":"pong"}"#));
        let id = RawValue::from_string("3".into()).expect("raw");
        assert_eq!(
            json(&encode_error(Some(&id), ErrorCode::Forbidden, "say \"no\"")),
            json(r#"{"type": "error", "id": 3, "code": "forbidden", "message": "say \"no\""}"#)
        );
    }

    #[test]
    fn decodes_what_it_encodes() {
        let data = RawValue::from_string("[1,2]".into()).expect("raw");
        let text = encode_message("a", &data);
        match ServerFrame::decode(&text) {
            Ok(ServerFrame::Message { channel, data }) => assert_eq!((&*channel, data.get()), ("a", "[1,2]")),
            other => panic!("{other:?}"),
        }
        let text = encode_error(None, ErrorCode::TooLarge, "x");
        assert!(matches!(ServerFrame::decode(&text), Ok(ServerFrame::Error { code: ErrorCode::TooLarge, .. })));
    }
}
