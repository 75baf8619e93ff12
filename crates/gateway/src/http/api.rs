//! Plain HTTP endpoints: `POST /api/publish`, `/metrics`, `/healthz`, `/readyz`.

use super::error::ApiError;
use crate::node::{Node, Source};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gateway_protocol::{ChannelName, ErrorCode};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use std::sync::Arc;
use subtle::ConstantTimeEq;

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /api/publish`: `{"channel":..,"data":..}`, answered once the backplane accepted it.
///
/// The body is read only after the API key was checked and a `content-length` within the limit
/// was announced, and it must arrive within the handshake timeout: an unauthenticated or slow
/// client can make the node neither buffer a body nor hold the connection.
pub(super) async fn publish(State(node): State<Arc<Node>>, request: Request) -> Result<Response, ApiError> {
    check_api_key(&node, request.headers())?;
    let limit = node.config().max_message_size;
    let too_large = || {
        node.metrics().limit_hits.with_label_values(&["body_size"]).inc();
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, format!("body larger than {limit} bytes"))
    };
    let announced = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let deadline = node.config().handshake_timeout;
    let body: Result<Bytes, BytesRejection> =
        tokio::time::timeout(deadline, Bytes::from_request(request, &())).await.map_err(|_| {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, ErrorCode::BadRequest, "request body not received in time")
        })?;
    // The router caps bodies at the same limit, so a larger one is refused while it streams in.
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        status => ApiError::new(status, ErrorCode::BadRequest, e.body_text()),
    })?;
    if body.len() > limit {
        return Err(too_large());
    }
    let parsed: PublishBody<'_> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            format!("body must be {{\"channel\": string, \"data\": any JSON}}: {e}"),
        )
    })?;
    let channel = ChannelName::new(&parsed.channel)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadChannel, e.to_string()))?;
    node.publish(&channel, parsed.data, Source::Http)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.to_string()))?;
    Ok(Json(json!({ "ok": true })).into_response())
}

/// Compares the Bearer key in constant time; open when no key is configured.
fn check_api_key(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &node.config().api_key else { return Ok(()) };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(key) if bool::from(key.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
        Some(_) => {
            node.metrics().auth_failures.with_label_values(&["api_key"]).inc();
            Err(ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "wrong API key"))
        }
        None => {
            node.metrics().auth_failures.with_label_values(&["api_key"]).inc();
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing API key: send `Authorization: Bearer <key>`",
            ))
        }
    }
}

/// `GET /metrics`: Prometheus text exposition.
pub(super) async fn metrics(State(node): State<Arc<Node>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics().render()).into_response()
}

/// `GET /healthz`: 200 while the process serves.
pub(super) async fn healthz() -> Response {
    Json(json!({ "ok": true })).into_response()
}

/// `GET /readyz`: 200 while accepting sockets with a connected backplane, else 503.
pub(super) async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let draining = node.is_draining();
    let backplane = node.backplane().is_up();
    let status = if !draining && backplane { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body =
        json!({ "ok": status == StatusCode::OK, "draining": draining, "backplane": backplane, "node": node.node_id() });
    (status, Json(body)).into_response()
}
