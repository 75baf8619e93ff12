//! Channel names: 1 to 255 bytes of `A-Z a-z 0-9 _ - : . @ /`, validated once on parse.

use std::fmt;
use std::sync::Arc;

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a string is not a valid channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidChannel {
    /// The name is empty.
    #[error("channel name is empty")]
    Empty,
    /// The name is longer than [`MAX_CHANNEL_LEN`] bytes.
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    /// The name holds a byte outside the allowed set.
    #[error("channel name may only hold A-Z a-z 0-9 _ - : . @ /")]
    BadCharacter,
}

/// A validated channel name. Cheap to clone (a shared, immutable string).
///
/// Every name that reaches the hub or the backplane went through [`ChannelName::new`], so
/// it can be embedded in JSON and in a Redis channel name without escaping.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Validates `name` against the channel-name rules.
    pub fn new(name: &str) -> Result<Self, InvalidChannel> {
        validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks `name` against the channel-name rules without allocating.
pub fn validate(name: &str) -> Result<(), InvalidChannel> {
    if name.is_empty() {
        return Err(InvalidChannel::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(InvalidChannel::TooLong);
    }
    if !name.bytes().all(is_channel_byte) {
        return Err(InvalidChannel::BadCharacter);
    }
    Ok(())
}

fn is_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.' | b'@' | b'/')
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ChannelName {
    type Err = InvalidChannel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        let all = "AZaz09_-:.@/";
        assert_eq!(ChannelName::new(all).map(|c| c.to_string()), Ok(all.to_owned()));
        assert!(ChannelName::new(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn rejects_bad_names_with_the_reason() {
        assert_eq!(ChannelName::new(""), Err(InvalidChannel::Empty));
        assert_eq!(ChannelName::new(&"a".repeat(256)), Err(InvalidChannel::TooLong));
        for bad in ["a b", "a*", "é", "a\"b", "a\\b", "a\n", "{x}", "a,b"] {
            assert_eq!(ChannelName::new(bad), Err(InvalidChannel::BadCharacter), "{bad:?}");
        }
    }
}
