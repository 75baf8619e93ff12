//! Typed async client for the gateway's WebSocket protocol (`/ws`, contract v1).
//!
//! - [`client`]: [`Client`], a cheap, cloneable handle to one connection, and [`ClientConfig`].
//! - [`subscription`]: [`Subscription`], a [`Stream`](futures_util::Stream) of [`Message`]s.
//! - [`error`]: [`ClientError`], [`CloseInfo`] and [`ErrorFrame`].
//! - `connection` (private): the task that owns the socket, assigns numeric `id`s and matches
//!   replies to commands.
//!
//! Commands with a reply (`subscribe`, `unsubscribe`, `publish`, `ping`, `refresh`) resolve on
//! the matching `ok` / `pong`, fail with [`ClientError::Server`] on an `error`, and with
//! [`ClientError::Closed`] if the connection ends first. Frames that answer nothing this client
//! sent are kept for inspection: uncorrelated `error` frames in [`Client::take_errors`] /
//! [`Client::next_error`], anything else in [`Client::take_unexpected`].
//!
//! ```no_run
//! use gateway_client::{Client, ClientError};
//!
//! # async fn demo() -> Result<(), ClientError> {
//! let client = Client::connect("ws://127.0.0.1:8080/ws").await?;
//! let mut sub = client.subscribe("chat:lobby").await?;
//! client.publish_json("chat:lobby", &serde_json::json!({"text": "hi"})).await?;
//! if let Some(msg) = sub.recv().await {
//!     assert_eq!(msg.data_json()["text"], "hi");
//! }
//! let rtt = client.ping().await?;
//! tracing::info!(?rtt, "pong");
//!
//! // Extra handshake headers:
//! let mut request = Client::request("ws://127.0.0.1:8080/ws")?;
//! request.headers_mut().insert("authorization", "Bearer abc".parse().expect("header value"));
//! let other = Client::connect_with(request).await?;
//!
//! let info = client.close().await;
//! assert_eq!(info.code, Some(1000));
//! # drop(other);
//! # Ok(())
//! # }
//! ```

pub mod client;
mod connection;
pub mod error;
mod shared;
pub mod subscription;

pub use client::{Client, ClientConfig};
pub use error::{ClientError, CloseInfo, ErrorFrame};
pub use gateway_protocol::ErrorCode;
pub use subscription::{Message, Subscription};
/// The WebSocket library this client is built on (for requests, headers and its error type).
pub use tokio_tungstenite::tungstenite;
