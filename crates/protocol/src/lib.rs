//! The gateway's wire contract (v1) as Rust types, with no I/O.
//!
//! - [`channel`]: [`ChannelName`], a validated channel name.
//! - [`client`]: [`ClientFrame`], what a client sends, decoded with `data` kept as raw JSON.
//! - [`server`]: [`ServerFrame`] replies and the pre-encoded `message` frame.
//! - [`codes`]: the stable [`ErrorCode`] strings and the [`CloseCode`]s the server uses.
//!
//! The human-readable contract lives in `docs/protocol.md` at the repository root.

pub mod channel;
pub mod client;
pub mod codes;
pub mod server;

pub use channel::{ChannelName, InvalidChannel, MAX_CHANNEL_LEN};
pub use client::{ClientFrame, DecodeError, FrameId};
pub use codes::{CloseCode, ErrorCode};
pub use server::{ServerFrame, encode_message};
