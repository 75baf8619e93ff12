//! One error type for every HTTP refusal, rendered as `{"ok":false,"code":..,"message":..}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use gateway_protocol::ErrorCode;
use serde_json::json;
use std::borrow::Cow;

/// An HTTP error answer: a status, a stable error code and a message.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable error code, as in `error` frames.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: Cow<'static, str>,
}

impl ApiError {
    /// An error with a status, a code and a message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "ok": false, "code": self.code, "message": self.message });
        (self.status, Json(body)).into_response()
    }
}
