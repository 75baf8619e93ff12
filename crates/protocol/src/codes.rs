//! Stable error-code strings and the WebSocket close codes the server uses.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The stable `code` of an `error` frame (and of HTTP error bodies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, unknown `type`, a missing or mistyped field, a binary frame.
    BadRequest,
    /// The channel name breaks the channel-name rules.
    BadChannel,
    /// The frame or body is larger than the configured limit.
    TooLarge,
    /// The token does not allow this channel operation.
    Forbidden,
    /// No valid credentials (token or API key).
    Unauthorized,
    /// A per-connection or per-node limit was hit.
    RateLimited,
    /// The backplane (Redis) cannot take the operation right now.
    BackplaneUnavailable,
    /// A bug or an unexpected failure on the server.
    Internal,
}

impl ErrorCode {
    /// The stable wire string, e.g. `"bad_channel"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::BadChannel => "bad_channel",
            Self::TooLarge => "too_large",
            Self::Forbidden => "forbidden",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited => "rate_limited",
            Self::BackplaneUnavailable => "backplane_unavailable",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A WebSocket close code the server sends, with the reason text that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal close.
    Normal,
    /// 1001: the node is shutting down.
    GoingAway,
    /// 1008, `slow consumer`: the outgoing queue was full.
    SlowConsumer,
    /// 1008, `token expired`: the JWT expired and was not refreshed.
    TokenExpired,
    /// 1008, `rate limited`: sustained abuse of a limit.
    PolicyAbuse,
    /// 1008, `heartbeat timeout`: the peer stayed silent past the pong timeout.
    HeartbeatTimeout,
    /// 1009: a frame larger than the configured limit.
    TooBig,
    /// 1011: an internal error.
    Internal,
}

impl CloseCode {
    /// The numeric close code.
    pub const fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::SlowConsumer | Self::TokenExpired | Self::PolicyAbuse | Self::HeartbeatTimeout => 1008,
            Self::TooBig => 1009,
            Self::Internal => 1011,
        }
    }

    /// The close reason text sent with the code.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Normal => "normal close",
            Self::GoingAway => "going away",
            Self::SlowConsumer => "slow consumer",
            Self::TokenExpired => "token expired",
            Self::PolicyAbuse => "rate limited",
            Self::HeartbeatTimeout => "heartbeat timeout",
            Self::TooBig => "message too big",
            Self::Internal => "internal error",
        }
    }

    /// A short, stable label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::GoingAway => "shutdown",
            Self::SlowConsumer => "slow_consumer",
            Self::TokenExpired => "token_expired",
            Self::PolicyAbuse => "rate_limited",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::TooBig => "too_big",
            Self::Internal => "internal",
        }
    }
}
