//! `GET /ws`: every check that happens before the upgrade (draining, Origin, token, limits),
//! then the hand-over to [`crate::connection::run`].

use super::error::ApiError;
use super::upgrade::Upgrade;
use crate::auth::AuthError;
use crate::connection::{self, Session};
use crate::limits::{LimitError, client_ip};
use crate::node::Node;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use gateway_protocol::ErrorCode;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;

/// The query of `/ws`; only `token` is read.
#[derive(Deserialize)]
pub(super) struct WsQuery {
    token: Option<String>,
}

/// Checks the request and upgrades it.
pub(super) async fn upgrade(
    State(node): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    mut request: Request,
) -> Result<Response, ApiError> {
    if node.is_draining() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Internal, "node is shutting down"));
    }
    let upgrade = Upgrade::check(&mut request)?;
    check_origin(&node, &headers)?;
    let claims = match node.auth() {
        None => None,
        Some(auth) => {
            let token = bearer(&headers).or(query.as_ref().ok().and_then(|q| q.token.as_deref()));
            let verified = token.ok_or(AuthError::Missing).and_then(|t| auth.verify(t));
            Some(verified.map_err(|e| {
                node.metrics().auth_failures.with_label_values(&[e.label()]).inc();
                ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, e.to_string())
            })?)
        }
    };
    let ip = client_ip(node.config(), peer.ip(), &headers);
    let slot = node.limits().acquire(ip).map_err(|e| {
        node.metrics().limit_hits.with_label_values(&[e.label()]).inc();
        let status = match e {
            LimitError::NodeFull => StatusCode::SERVICE_UNAVAILABLE,
            LimitError::IpFull => StatusCode::TOO_MANY_REQUESTS,
        };
        ApiError::new(status, ErrorCode::RateLimited, e.to_string())
    })?;
    let session = Session::new(&node, claims, Some(slot));
    let serving = node.clone();
    Ok(upgrade.serve(&node, move |socket| connection::run(socket, serving, session)))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Allows no Origin, a same-host Origin, or one on the allow-list (`*` allows all).
fn check_origin(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let origin = origin.to_str().unwrap_or("");
    let allowed = &node.config().allowed_origins;
    if allowed.iter().any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin)) {
        return Ok(());
    }
    let origin_host = origin.split_once("://").map(|(_, rest)| rest.trim_end_matches('/'));
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if origin_host.is_some() && origin_host.map(str::to_ascii_lowercase) == host.map(str::to_ascii_lowercase) {
        return Ok(());
    }
    node.metrics().auth_failures.with_label_values(&["origin"]).inc();
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::Forbidden,
        format!("origin `{origin}` is not allowed; see --allowed-origins"),
    ))
}
