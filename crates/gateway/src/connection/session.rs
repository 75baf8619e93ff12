//! What a socket is allowed to do: its token's claims, its expiry, and its budgets of publishes
//! and of other commands.

use crate::auth::Claims;
use crate::limits::{ConnectionSlot, TokenBucket};
use crate::node::Node;
use gateway_protocol::{ChannelName, ErrorCode};
use std::pin::Pin;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Everything decided about a socket before the upgrade, and what it may do afterwards.
pub struct Session {
    claims: Option<Claims>,
    expires_at: Option<Instant>,
    publishes: TokenBucket,
    commands: TokenBucket,
    _slot: Option<ConnectionSlot>,
}

/// A socket's rate budgets, each a token bucket of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// `publish` commands (`--publish-rate`, `--publish-burst`).
    Publishes,
    /// Every other frame a client sends but a WebSocket pong: `subscribe`, `unsubscribe`,
    /// `refresh` and `ping` commands, malformed or binary frames, WebSocket pings
    /// (`--command-rate`, `--command-burst`).
    Commands,
}

impl Budget {
    /// The label of its refusals in `gateway_limit_hits_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Publishes => "publish_rate",
            Self::Commands => "command_rate",
        }
    }

    /// The message of its `rate_limited` refusals.
    pub fn refusal(self) -> &'static str {
        match self {
            Self::Publishes => "publish rate limit exceeded; slow down",
            Self::Commands => "command rate limit exceeded; slow down",
        }
    }
}

/// A refusal: the error code and a message for the client.
pub type Refusal = (ErrorCode, &'static str);

impl Session {
    /// A session for a socket holding `slot`, authenticated by `claims` when auth is on.
    pub fn new(node: &Node, claims: Option<Claims>, slot: Option<ConnectionSlot>) -> Self {
        let config = node.config();
        // The leeway that let the token in also applies to its expiry: a token accepted within
        // the leeway must not be closed the moment it is connected.
        let expires_at = claims.as_ref().and_then(|c| expiry(c, config.jwt_leeway));
        Self {
            claims,
            expires_at,
            publishes: TokenBucket::new(config.publish_rate, config.publish_burst, config.rate_limit_strikes),
            commands: TokenBucket::new(config.command_rate, config.command_burst, config.rate_limit_strikes),
            _slot: slot,
        }
    }

    /// When the token expires, if there is one.
    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }

    /// A timer firing at the token's expiry (none without a token).
    pub fn expiry_timer(&self) -> Option<Pin<Box<Sleep>>> {
        self.expires_at.map(|at| Box::pin(tokio::time::sleep_until(at)))
    }

    /// Whether the token allows subscribing to `channel`.
    pub fn may_subscribe(&self, channel: &ChannelName) -> Result<(), Refusal> {
        match &self.claims {
            Some(c) if !c.may_subscribe(channel) => {
                Err((ErrorCode::Forbidden, "this token may not subscribe to that channel"))
            }
            _ => Ok(()),
        }
    }

    /// Whether the token allows publishing to `channel`.
    pub fn may_publish(&self, channel: &ChannelName) -> Result<(), Refusal> {
        match &self.claims {
            Some(c) if !c.may_publish(channel) => {
                Err((ErrorCode::Forbidden, "this token may not publish to that channel"))
            }
            _ => Ok(()),
        }
    }

    /// Takes one frame from `budget`; `Err(true)` means sustained abuse.
    pub fn take_token(&mut self, budget: Budget) -> Result<(), bool> {
        match budget {
            Budget::Publishes => self.publishes.take(),
            Budget::Commands => self.commands.take(),
        }
    }

    /// Replaces the token with a fresh one for the same subject; its grants apply from now on.
    pub fn refresh(&mut self, node: &Node, token: &str) -> Result<(), (ErrorCode, String)> {
        let Some(auth) = node.auth() else {
            return Err((ErrorCode::BadRequest, "authentication is off on this node: nothing to refresh".into()));
        };
        let claims = auth.verify(token).map_err(|e| {
            node.metrics().auth_failures.with_label_values(&[e.label()]).inc();
            (ErrorCode::Unauthorized, e.to_string())
        })?;
        if self.claims.as_ref().map(|c| &c.sub) != Some(&claims.sub) {
            node.metrics().auth_failures.with_label_values(&["subject_changed"]).inc();
            return Err((ErrorCode::Unauthorized, "a refreshed token must be for the same `sub`".into()));
        }
        self.expires_at = expiry(&claims, node.config().jwt_leeway);
        self.claims = Some(claims);
        Ok(())
    }
}

/// When a socket authenticated by `claims` must close: `exp` plus the leeway, on the monotonic
/// clock. `None` for an expiry too far away to represent (an `exp` of centuries): never.
fn expiry(claims: &Claims, leeway: Duration) -> Option<Instant> {
    Instant::now().checked_add(claims.time_left().saturating_add(leeway))
}
