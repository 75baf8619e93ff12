//! What can go wrong: [`ClientError`], plus [`CloseInfo`] (how a connection ended) and
//! [`ErrorFrame`] (an `error` frame that answered no command of this client).

use gateway_protocol::ErrorCode;
use std::fmt;
use tokio_tungstenite::tungstenite;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection or the WebSocket handshake failed (bad URL, refused, TLS, ...).
    #[error("cannot connect: {0}")]
    Connect(#[source] Box<tungstenite::Error>),
    /// The server answered the upgrade request with an HTTP status instead of `101`
    /// (e.g. 401 for a bad token, 403 for a refused `Origin`, 503 while draining).
    #[error("upgrade refused with HTTP {status}: {body}")]
    Rejected {
        /// The HTTP status code.
        status: u16,
        /// The response body as far as it arrived with the headers, lossily decoded as UTF-8.
        body: String,
    },
    /// The server answered the command with an `error` frame.
    #[error("server error `{code}`: {message}")]
    Server {
        /// The stable error code.
        code: ErrorCode,
        /// The server's human-readable explanation.
        message: String,
    },
    /// The connection ended before the command was answered (or was already over).
    #[error("connection closed: {0}")]
    Closed(CloseInfo),
    /// The server broke the wire contract (an undecodable reply, `ok` where `pong` was due, ...).
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The server's error code, for [`ClientError::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// How the connection ended, for [`ClientError::Closed`].
    pub fn close_info(&self) -> Option<&CloseInfo> {
        match self {
            Self::Closed(info) => Some(info),
            _ => None,
        }
    }

    pub(crate) fn connect(err: tungstenite::Error) -> Self {
        match err {
            tungstenite::Error::Http(response) => Self::Rejected {
                status: response.status().as_u16(),
                body: response.body().as_deref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default(),
            },
            other => Self::Connect(Box::new(other)),
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloseInfo {
    /// The close code of the server's close frame (e.g. 1008); `None` when the connection ended
    /// without a close frame carrying a code (TCP dropped, read error, close timeout).
    pub code: Option<u16>,
    /// The reason of the server's close frame (e.g. `slow consumer`). When `code` is `None`, a
    /// description of how the connection ended instead (may be empty).
    pub reason: String,
}

impl CloseInfo {
    /// Used when the connection task vanished without recording why (it never should).
    pub(crate) fn task_gone() -> Self {
        Self { code: None, reason: "connection task ended".to_owned() }
    }
}

impl fmt::Display for CloseInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "close code {code} `{}`", self.reason),
            None if self.reason.is_empty() => f.write_str("no close code"),
            None => write!(f, "no close code ({})", self.reason),
        }
    }
}

/// An `error` frame that answered none of this client's pending commands: it had no `id`
/// (e.g. the reply to a fire-and-forget command or to a malformed frame) or an unknown one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The frame's `id` as JSON text (e.g. `7` or `"a"`), if it had one.
    pub id: Option<String>,
    /// The stable error code.
    pub code: ErrorCode,
    /// The server's human-readable explanation.
    pub message: String,
}
