//! Client-to-server frames and their decoder.
//!
//! [`ClientFrame::decode`] turns any text into a frame or a [`DecodeError`] that already says which
//! error code to answer with and which `id` to echo. `data` stays raw JSON ([`RawValue`]) borrowed
//! from the input: the gateway never walks a payload.

use crate::channel::{ChannelName, InvalidChannel};
use crate::codes::ErrorCode;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// A command's `id`: a JSON string or number, kept as its exact JSON text so the reply echoes it
/// byte for byte. `null` counts as absent and never becomes a `FrameId`.
#[derive(Debug, Clone)]
pub struct FrameId(Box<RawValue>);

impl FrameId {
    /// Checks that `raw` is a JSON string or number; anything else is a `bad_request`.
    fn from_raw(raw: &RawValue) -> Result<Self, DecodeError> {
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'"' | b'-' | b'0'..=b'9') => Ok(Self(raw.to_owned())),
            _ => Err(DecodeError::new(None, ErrorCode::BadRequest, "`id` must be a string or a number")),
        }
    }

    /// A numeric id, as a client would send it.
    pub fn number(n: u64) -> Self {
        Self(RawValue::from_string(n.to_string()).unwrap_or_else(|_| unreachable_raw()))
    }

    /// The id's JSON text, e.g. `7` or `"a"`.
    pub fn json(&self) -> &str {
        self.0.get()
    }

    /// The id as raw JSON.
    pub fn raw(&self) -> &RawValue {
        &self.0
    }
}

impl PartialEq for FrameId {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl Eq for FrameId {}

fn unreachable_raw() -> Box<RawValue> {
    // A decimal integer is always valid JSON; this is never reached.
    RawValue::from_string("0".to_owned()).unwrap_or_else(|_| Box::<RawValue>::default())
}

/// One decoded client command. `data` and `token` borrow from the input text.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    /// `{"type":"subscribe","channel":..}`
    Subscribe {
        /// Echoed in the reply.
        id: Option<FrameId>,
        /// The channel to join.
        channel: ChannelName,
    },
    /// `{"type":"unsubscribe","channel":..}`
    Unsubscribe {
        /// Echoed in the reply.
        id: Option<FrameId>,
        /// The channel to leave.
        channel: ChannelName,
    },
    /// `{"type":"publish","channel":..,"data":..}`
    Publish {
        /// Echoed in the reply.
        id: Option<FrameId>,
        /// Where to publish.
        channel: ChannelName,
        /// The payload, any JSON value, untouched.
        data: &'a RawValue,
    },
    /// `{"type":"ping"}`
    Ping {
        /// Echoed in the `pong`.
        id: Option<FrameId>,
    },
    /// `{"type":"refresh","token":..}`: replaces the connection's JWT before it expires.
    Refresh {
        /// Echoed in the reply.
        id: Option<FrameId>,
        /// The new token.
        token: Cow<'a, str>,
    },
}

/// Why a text frame is not a valid command, with everything needed to answer it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    /// The command's `id`, when it could be read.
    pub id: Option<FrameId>,
    /// The error code to answer with.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: Cow<'static, str>,
}

impl DecodeError {
    fn new(id: Option<FrameId>, code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self { id, code, message: message.into() }
    }
}

/// Every field a command may carry, each kept raw so that one mistyped field does not hide the
/// `id`. Unknown fields are ignored (room for later extensions such as `since`).
#[derive(Deserialize)]
struct LooseFrame<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
}

/// Present means `Some`, even when the value is JSON `null` (which plain `Option` maps to `None`).
fn present<'de, D: Deserializer<'de>>(de: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(de).map(Some)
}

fn string_field<'a>(
    raw: Option<&'a RawValue>,
    name: &'static str,
    id: &Option<FrameId>,
) -> Result<Cow<'a, str>, DecodeError> {
    let raw =
        raw.ok_or_else(|| DecodeError::new(id.clone(), ErrorCode::BadRequest, format!("missing field `{name}`")))?;
    Cow::<str>::deserialize(raw)
        .map_err(|_| DecodeError::new(id.clone(), ErrorCode::BadRequest, format!("field `{name}` must be a string")))
}

fn channel_field(raw: Option<&RawValue>, id: &Option<FrameId>) -> Result<ChannelName, DecodeError> {
    let name = string_field(raw, "channel", id)?;
    ChannelName::new(&name)
        .map_err(|e: InvalidChannel| DecodeError::new(id.clone(), ErrorCode::BadChannel, e.to_string()))
}

impl<'a> ClientFrame<'a> {
    /// Decodes one text frame. Never panics; every failure names its error code.
    pub fn decode(text: &'a str) -> Result<Self, DecodeError> {
        // serde reads a struct from a JSON array too; a command is an object and nothing else.
        if !text.trim_start().starts_with('{') {
            return Err(DecodeError::new(None, ErrorCode::BadRequest, "a command must be a JSON object"));
        }
        let loose: LooseFrame<'a> = serde_json::from_str(text).map_err(|e| {
            let what = if e.is_data() { "a command must be a JSON object" } else { "malformed JSON" };
            DecodeError::new(None, ErrorCode::BadRequest, format!("{what}: {e}"))
        })?;
        let id = loose.id.map(FrameId::from_raw).transpose()?;
        let kind = string_field(loose.kind, "type", &id)?;
        match &*kind {
            "subscribe" => Ok(Self::Subscribe { channel: channel_field(loose.channel, &id)?, id }),
            "unsubscribe" => Ok(Self::Unsubscribe { channel: channel_field(loose.channel, &id)?, id }),
            "publish" => {
                let channel = channel_field(loose.channel, &id)?;
                let data = loose
                    .data
                    .ok_or_else(|| DecodeError::new(id.clone(), ErrorCode::BadRequest, "missing field `data`"))?;
                Ok(Self::Publish { id, channel, data })
            }
            "ping" => Ok(Self::Ping { id }),
            "refresh" => Ok(Self::Refresh { token: string_field(loose.token, "token", &id)?, id }),
            other => {
                let mut shown: String = other.chars().take(32).collect();
                if shown.len() < other.len() {
                    shown.push('…');
                }
                Err(DecodeError::new(id, ErrorCode::BadRequest, format!("unknown type `{shown}`")))
            }
        }
    }

    /// The command's `id`, if it has one.
    pub fn id(&self) -> Option<&FrameId> {
        match self {
            Self::Subscribe { id, .. }
            | Self::Unsubscribe { id, .. }
            | Self::Publish { id, .. }
            | Self::Ping { id }
            | Self::Refresh { id, .. } => id.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (Option<String>, ErrorCode) {
        match ClientFrame::decode(text) {
            Ok(f) => panic!("{text} decoded as {f:?}"),
            Err(e) => (e.id.map(|i| i.json().to_owned()), e.code),
        }
    }

    #[test]
    fn decodes_every_command_of_the_contract() {
        match ClientFrame::decode(r#"{"type":"subscribe","channel":"chat:lobby","id":1}"#) {
            Ok(ClientFrame::Subscribe { id: Some(id), channel }) => {
                assert_eq!((id.json(), channel.as_str()), ("1", "chat:lobby"));
            }
            other => panic!("{other:?}"),
        }
        match ClientFrame::decode(r#"{"type":"publish","channel":"c","data":{"text": "hi"},"id":"x"}"#) {
            Ok(ClientFrame::Publish { id: Some(id), data, .. }) => {
                assert_eq!((id.json(), data.get()), ("\"x\"", r#"{"text": "hi"}"#));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ClientFrame::decode(r#"{"type":"unsubscribe","channel":"c"}"#),
            Ok(ClientFrame::Unsubscribe { id: None, .. })
        ));
        assert!(matches!(ClientFrame::decode(r#"{"type":"ping","id":null}"#), Ok(ClientFrame::Ping { id: None })));
        assert!(matches!(
            ClientFrame::decode(r#"{"type":"publish","channel":"c","data":null}"#),
            Ok(ClientFrame::Publish { .. })
        ));
        assert!(matches!(ClientFrame::decode(r#"{"type":"refresh","token":"t"}"#), Ok(ClientFrame::Refresh { .. })));
    }

    #[test]
    fn every_bad_input_names_its_code_and_keeps_the_id() {
        assert_eq!(err("{"), (None, ErrorCode::BadRequest));
        assert_eq!(err("[1]"), (None, ErrorCode::BadRequest));
        assert_eq!(err(r#"{"id":5}"#), (Some("5".into()), ErrorCode::BadRequest));
        assert_eq!(err(r#"{"type":"nope","id":"a"}"#), (Some("\"a\"".into()), ErrorCode::BadRequest));
        assert_eq!(err(r#"{"type":"subscribe","id":2}"#), (Some("2".into()), ErrorCode::BadRequest));
        assert_eq!(err(r#"{"type":"subscribe","channel":7,"id":2}"#), (Some("2".into()), ErrorCode::BadRequest));
        assert_eq!(err(r#"{"type":"subscribe","channel":"a b","id":3}"#), (Some("3".into()), ErrorCode::BadChannel));
        assert_eq!(err(r#"{"type":"publish","channel":"a","id":4}"#), (Some("4".into()), ErrorCode::BadRequest));
        assert_eq!(err(r#"{"type":"ping","id":{"a":1}}"#), (None, ErrorCode::BadRequest));
        assert_eq!(err(r#"{"type":1}"#), (None, ErrorCode::BadRequest));
    }
}
