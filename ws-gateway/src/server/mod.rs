//! The HTTP surface: the page, the JSON API, the WebSocket upgrade, health and metrics.
//!
//! Every refusal before the upgrade is an HTTP status with a JSON `{"error": "..."}` in words;
//! after the upgrade the proxy closes with the protocol's close codes.
//!
//! - [`assets`]: the page, its files and the security headers every page carries;
//! - [`credentials`]: cookies, bearer tokens and the [`Principal`] behind a request;
//! - [`api`]: the JSON API and the sign-in pages;
//! - [`admission`]: whether a user may open a session now, and what ends an open connection;
//! - [`websocket`]: the upgrade, the agent dial and the proxied connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::Gateway;
use crate::authn::AuthError;

pub mod admission;
pub mod api;
pub mod assets;
pub mod credentials;
pub mod websocket;

pub use credentials::{
    BEARER_PROTOCOL_PREFIX, Principal, SESSION_COOKIE, SessionEnd, bearer_protocol,
    bearer_protocol_token, live_session,
};
pub use websocket::{AgentSocket, dial_agent};

/// The source address of a connection, inserted by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// A refusal in words.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": error.into() }),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let status = match e {
            AuthError::Unavailable(_) | AuthError::Throttled => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/", get(assets::index_page))
        .route("/index.html", get(assets::index_page))
        .route("/assets/{*path}", get(assets::asset))
        .route("/api/auth", get(api::auth_methods))
        .route("/api/login", post(api::login))
        .route("/api/logout", post(api::logout))
        .route("/auth/login", get(api::signin_begin))
        .route("/auth/callback", get(api::signin_callback))
        .route("/auth/done", get(api::signin_done))
        .route("/api/whoami", get(api::whoami))
        .route("/api/sessions", get(api::sessions))
        .route("/api/sessions/{namespace}/{name}", get(api::session_status))
        .route("/ws/{namespace}/{name}", get(websocket::websocket))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(api::readyz))
        .with_state(gw)
}

/// The admin listener's routes (`--admin-listen`): metrics and the probes, on a port of their
/// own that the Ingress does not expose. The public port answers `/metrics` with 404.
pub fn admin_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .with_state(gw)
}

pub(crate) fn refuse(gw: &Gateway, reason: &'static str, e: ApiError) -> ApiError {
    gw.metrics.handshake_failed(reason);
    e
}

/// The client's address, as the accept loop recorded it (0.0.0.0 when served some other way).
pub(crate) fn peer_of(req: &http::request::Parts) -> SocketAddr {
    req.extensions
        .get::<Peer>()
        .map(|p| p.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The client's address ([`crate::limits::client_address`]): the socket peer, or, when that is
/// one of `--trusted-proxies`, the address the proxies saw in `X-Forwarded-For`.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<Arc<Gateway>> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        gw: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let forwarded: Vec<&str> = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        Ok(ClientAddr(crate::limits::client_address(
            peer_of(parts).ip(),
            &forwarded,
            &gw.config.args.trusted_proxies,
        )))
    }
}
