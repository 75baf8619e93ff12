//! Token authentication: JWT verification and the channel permissions carried in its claims.
//!
//! One key, one algorithm: an HS256 secret, or an RSA (RS256) or EC P-256 (ES256) public key from
//! a PEM file. The token's header must name exactly that algorithm (no `none`, no confusion
//! between a public key and an HMAC secret), and `exp` is required.

use crate::config::Config;
use gateway_protocol::ChannelName;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde::Deserialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The key could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// The PEM file could not be read.
    #[error("cannot read --jwt-public-key {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The PEM holds neither an RSA nor an EC public key.
    #[error("--jwt-public-key {0} holds neither an RSA nor an EC (P-256) public key in PEM")]
    BadKey(String),
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the request.
    #[error("missing token: send `Authorization: Bearer <jwt>` or `?token=<jwt>`")]
    Missing,
    /// The token is past its `exp`.
    #[error("token expired")]
    Expired,
    /// The token has no `exp` claim.
    #[error("token has no `exp` claim")]
    NoExpiry,
    /// The header names another algorithm than the configured key's.
    #[error("token algorithm not allowed")]
    WrongAlgorithm,
    /// Bad signature, bad shape, bad claims.
    #[error("invalid token")]
    Invalid,
}

impl AuthError {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Expired => "expired",
            Self::NoExpiry => "no_exp",
            Self::WrongAlgorithm => "algorithm",
            Self::Invalid => "invalid",
        }
    }
}

/// Channels a token may use, from its `channels` claim.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChannelGrants {
    /// Patterns the holder may subscribe to; absent: none.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Patterns the holder may publish to; absent: none.
    #[serde(default)]
    pub publish: Vec<String>,
}

/// The claims the gateway reads; others are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// The user.
    #[serde(default)]
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch. Required: the `default` only lets a token without
    /// `exp` reach the validation, which refuses it as [`AuthError::NoExpiry`] (jsonwebtoken
    /// deserializes the claims before it checks the required ones).
    #[serde(default)]
    pub exp: u64,
    /// Channel permissions; absent: every channel.
    #[serde(default)]
    pub channels: Option<ChannelGrants>,
}

impl Claims {
    /// Time left before `exp` (zero if already past).
    pub fn time_left(&self) -> Duration {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Duration::from_secs(self.exp).saturating_sub(now)
    }

    /// Whether the token allows subscribing to `channel`.
    pub fn may_subscribe(&self, channel: &ChannelName) -> bool {
        self.channels.as_ref().is_none_or(|g| matches_any(&g.subscribe, channel.as_str()))
    }

    /// Whether the token allows publishing to `channel`.
    pub fn may_publish(&self, channel: &ChannelName) -> bool {
        self.channels.as_ref().is_none_or(|g| matches_any(&g.publish, channel.as_str()))
    }
}

/// An exact name, or a prefix ending in `*` (`*` alone matches everything).
fn matches_any(patterns: &[String], channel: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => p == channel,
    })
}

/// Verifies tokens with the configured key.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl Authenticator {
    /// The authenticator for `config`, or `None` when auth is off.
    pub fn from_config(config: &Config) -> Result<Option<Self>, AuthSetupError> {
        let (key, algorithm) = if let Some(secret) = &config.jwt_secret {
            (DecodingKey::from_secret(secret.as_bytes()), Algorithm::HS256)
        } else if let Some(path) = &config.jwt_public_key {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| AuthSetupError::Read { path: shown.clone(), source })?;
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (key, Algorithm::RS256)
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (key, Algorithm::ES256)
            } else {
                return Err(AuthSetupError::BadKey(shown));
            }
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = config.jwt_leeway.as_secs();
        Ok(Some(Self { key, validation }))
    }

    /// Checks signature, algorithm and expiry; returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        match decode::<Claims>(token.trim(), &self.key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::MissingRequiredClaim(claim) if claim == "exp" => AuthError::NoExpiry,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                    AuthError::WrongAlgorithm
                }
                _ => AuthError::Invalid,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_exact_or_prefix() {
        let p = vec!["news".to_owned(), "chat:*".to_owned()];
        assert!(matches_any(&p, "news") && matches_any(&p, "chat:lobby") && matches_any(&p, "chat:"));
        assert!(!matches_any(&p, "newsroom") && !matches_any(&p, "chat"));
        assert!(matches_any(&["*".to_owned()], "anything"));
        assert!(!matches_any(&[], "anything"));
    }
}
