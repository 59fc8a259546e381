//! The HTTP surface: the page, the JSON API, the WebSocket upgrade, health and metrics.
//!
//! Every refusal before the upgrade is an HTTP status with a JSON `{"error": "..."}` in words;
//! after the upgrade the proxy closes with the protocol's close codes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use tether_api::SessionPhase;
use tether_protocol::ticket::TicketRequest;
use tether_protocol::{Mode, SUBPROTOCOL};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument;

use crate::Gateway;
use crate::authn::{AuthError, UserInfo};
use crate::index::SessionView;
use crate::limits::origin_allowed;
use crate::metrics::ModeLabel;
use crate::proxy::{ProxySettings, proxy};

/// Name of the cookie holding the user's token.
pub const COOKIE: &str = "tether_token";
/// Prefix of the subprotocol that carries a bearer token for non-browser clients.
pub const BEARER_PROTOCOL_PREFIX: &str = "tether.bearer.";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Read buffer of each proxied WebSocket.
const READ_BUFFER: usize = 8 * 1024;

/// The source address of a connection, inserted by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

#[derive(rust_embed::Embed)]
#[folder = "web/dist/"]
#[allow_missing = true]
struct Assets;

const FALLBACK_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>Tether</title></head>\
<body><h1>Tether</h1><p>The page was not built into this gateway: run <code>cargo dev up</code> to build the page.</p></body></html>";

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
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
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
        .route("/", get(index_page))
        .route("/index.html", get(index_page))
        .route("/assets/{*path}", get(asset))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/whoami", get(whoami))
        .route("/api/sessions", get(sessions))
        .route("/api/sessions/{namespace}/{name}", get(session_status))
        .route("/ws/{namespace}/{name}", get(websocket))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(gw)
}

fn with_security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

async fn index_page() -> Response {
    let body: Body = match Assets::get("index.html") {
        Some(f) => Body::from(f.data.into_owned()),
        None => Body::from(FALLBACK_PAGE),
    };
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_security_headers(r)
}

async fn asset(Path(path): Path<String>) -> Response {
    let file = Assets::get(&format!("assets/{path}")).or_else(|| Assets::get(&path));
    let Some(file) = file else {
        return with_security_headers(StatusCode::NOT_FOUND.into_response());
    };
    let mime = file.metadata.mimetype().to_owned();
    let mut r = Response::new(Body::from(file.data.into_owned()));
    if let Ok(v) = HeaderValue::from_str(&mime) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_security_headers(r)
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw
        .index
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .is_synced()
    {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "session index not synced").into_response()
    }
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gw.metrics.encode(),
    )
        .into_response()
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_owned())
        .filter(|v| !v.is_empty())
}

fn bearer_header(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Offered subprotocols, in order.
fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The token from a `tether.bearer.<base64url>` subprotocol.
pub fn bearer_protocol_token(protocols: &[String]) -> Option<String> {
    let encoded = protocols
        .iter()
        .find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// The subprotocol that carries `token`, for clients.
pub fn bearer_protocol(token: &str) -> String {
    format!(
        "{BEARER_PROTOCOL_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
    )
}

fn check_post_origin(gw: &Gateway, headers: &HeaderMap) -> Result<(), ApiError> {
    // Browsers send Origin on every POST; a cross-site one is refused (SameSite=Strict is the
    // second wall). Non-browser clients without Origin are fine here: they hold the token anyway.
    if let Some(o) = headers.get(header::ORIGIN) {
        let o = o.to_str().unwrap_or("null");
        if !origin_allowed(Some(o), &gw.config.args.allowed_origins) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("origin {o} is not allowed"),
            ));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct LoginBody {
    token: String,
}

fn set_cookie(gw: &Gateway, value: &str, clear: bool) -> Result<HeaderValue, ApiError> {
    let mut c = cookie::Cookie::build((COOKIE, value.to_owned()))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(!gw.config.args.insecure_cookies);
    if clear {
        c = c.max_age(cookie::time::Duration::ZERO);
    }
    HeaderValue::from_str(&c.build().to_string())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "the token has invalid characters"))
}

async fn login(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_post_origin(&gw, &headers)?;
    let body: LoginBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "expected a JSON body {\"token\": \"...\"}",
        )
    })?;
    let token = body.token.trim();
    if token.is_empty()
        || !token
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b',' && b != b'"' && b != b'\\')
    {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token rejected: not a bearer token",
        ));
    }
    let user = gw.authn.authenticate(token).await?;
    tracing::info!(user = %user.user, "login");
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&gw, token, false)?);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

async fn logout(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_post_origin(&gw, &headers)?;
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&gw, "", true)?);
    Ok(r)
}

async fn user_from_request(gw: &Gateway, headers: &HeaderMap) -> Result<UserInfo, ApiError> {
    let token = cookie_token(headers)
        .or_else(|| bearer_header(headers))
        .ok_or(AuthError::Missing)?;
    Ok(gw.authn.authenticate(&token).await?)
}

async fn whoami(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let user = user_from_request(&gw, &headers).await?;
    Ok(Json(json!({"user": user.user, "groups": user.groups})).into_response())
}

#[derive(Deserialize)]
struct SessionsQuery {
    namespace: Option<String>,
}

async fn sessions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(q): Query<SessionsQuery>,
) -> Result<Response, ApiError> {
    let user = user_from_request(&gw, &headers).await?;
    let list = gw
        .index
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .list(q.namespace.as_deref());
    let checks = list.into_iter().map(|s| {
        let gw = gw.clone();
        let user = user.clone();
        async move {
            let attach = gw
                .authz
                .check(&user, &s.namespace, &s.name, Mode::Attach)
                .await;
            let observe = gw
                .authz
                .check(&user, &s.namespace, &s.name, Mode::Observe)
                .await;
            (s, attach, observe)
        }
    });
    let mut out = Vec::new();
    for (s, attach, observe) in futures::future::join_all(checks).await {
        let (Ok(attach), Ok(observe)) = (attach, observe) else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot check permissions right now",
            ));
        };
        if !attach.allowed && !observe.allowed {
            continue;
        }
        out.push(json!({
            "namespace": s.namespace,
            "name": s.name,
            "phase": s.phase.as_str(),
            "ready": s.is_ready(),
            "message": s.message,
            "canAttach": attach.allowed,
            "canObserve": observe.allowed,
        }));
    }
    let mut r = Json(out).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

#[derive(Deserialize)]
struct WsQuery {
    mode: Option<String>,
}

/// Whether `user` may open `namespace/name` in `mode` now: the RBAC decision first (so nothing
/// about a session leaks to someone who may not see it), then the index. On refusal, the
/// handshake-failure label and the error the user reads.
async fn admit(
    gw: &Gateway,
    user: &UserInfo,
    namespace: &str,
    name: &str,
    mode: Mode,
) -> Result<(SessionView, String), (&'static str, ApiError)> {
    let decision = gw
        .authz
        .check(user, namespace, name, mode)
        .await
        .map_err(|e| {
            (
                "authz_unavailable",
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            )
        })?;
    if !decision.allowed {
        tracing::info!(user = %user.user, %namespace, %name, mode = mode.as_str(), "denied");
        return Err((
            "forbidden",
            ApiError::new(StatusCode::FORBIDDEN, decision.reason),
        ));
    }
    let index = gw.index.read().unwrap_or_else(|p| p.into_inner());
    let Some(session) = index.get(namespace, name).cloned() else {
        if let Some(ago) = index.deleted_since(namespace, name, std::time::Instant::now()) {
            return Err((
                "deleted",
                ApiError {
                    status: StatusCode::GONE,
                    body: json!({
                        "error": format!(
                            "terminal session {namespace}/{name} was deleted {}",
                            words_for(ago)
                        ),
                        "phase": "Deleted",
                    }),
                },
            ));
        }
        return Err((
            "not_found",
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no terminal session {name} in namespace {namespace}"),
            ),
        ));
    };
    drop(index);
    let Some(endpoint) = session.endpoint.clone() else {
        let transient = matches!(
            session.phase,
            SessionPhase::Pending | SessionPhase::Starting
        );
        let status = if transient {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::CONFLICT
        };
        let words = if session.message.is_empty() {
            format!("session {namespace}/{name} is {}, not Ready", session.phase)
        } else {
            format!(
                "session {namespace}/{name} is {}, not Ready: {}",
                session.phase, session.message
            )
        };
        return Err((
            "not_ready",
            ApiError {
                status,
                body: json!({"error": words, "phase": session.phase.as_str(), "message": session.message}),
            },
        ));
    };
    Ok((session, endpoint))
}

/// Resolves, with the reason in words, once RBAC no longer lets `user` use `mode` on the
/// session; checked every `--reauthorize-every` (never when that is zero). A check that cannot
/// reach the API server keeps the connection: an outage must not cut every terminal.
async fn reauthorize(
    gw: Arc<Gateway>,
    user: UserInfo,
    namespace: String,
    name: String,
    mode: Mode,
) -> String {
    let every = gw.config.args.reauthorize_every;
    if every.is_zero() {
        return std::future::pending().await;
    }
    // One SubjectAccessReview per connection per interval (the decision cache is shorter): a
    // random first delay spreads the checks, so clients that reconnected together after a
    // gateway restart do not re-check in bursts.
    let first = every.mul_f64(rand::random_range(0.5..1.5));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
    loop {
        tick.tick().await;
        match gw.authz.check(&user, &namespace, &name, mode).await {
            Ok(d) if d.allowed => {}
            Ok(d) => {
                tracing::info!(user = %user.user, %namespace, %name, mode = mode.as_str(), reason = %d.reason, "access revoked");
                return format!("access revoked: {}", d.reason);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-check access; keeping the connection")
            }
        }
    }
}

/// "just now", "40 s ago", "3 min ago", "2 h ago": how long ago, as a person says it.
fn words_for(ago: Duration) -> String {
    match ago.as_secs() {
        s if s < 5 => "just now".into(),
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s => format!("{} h ago", s / 3600),
    }
}

#[derive(Deserialize)]
struct SessionQuery {
    mode: Option<String>,
}

/// `GET /api/sessions/{namespace}/{name}?mode=attach|observe`: the answer the WebSocket upgrade
/// would give, as JSON. The page asks it when an upgrade fails (a browser only sees code 1006)
/// to tell "deleted", "not allowed" or "not Ready" from a network cut.
async fn session_status(
    State(gw): State<Arc<Gateway>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<SessionQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    // Each answer may cost a SubjectAccessReview: the same per-address budget as handshakes.
    if !gw.rate.check(peer_of(&req).ip()) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests: slow down",
        ));
    }
    let user = user_from_request(&gw, req.headers()).await?;
    let mode = parse_mode(q.mode.as_deref())?;
    let (session, _) = admit(&gw, &user, &namespace, &name, mode)
        .await
        .map_err(|(_, e)| e)?;
    let mut r = Json(json!({
        "namespace": session.namespace,
        "name": session.name,
        "phase": session.phase.as_str(),
        "ready": true,
        "message": session.message,
        "mode": mode.as_str(),
    }))
    .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

fn parse_mode(mode: Option<&str>) -> Result<Mode, ApiError> {
    match mode {
        None | Some("attach") => Ok(Mode::Attach),
        Some("observe") => Ok(Mode::Observe),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("mode {other:?} is neither attach nor observe"),
        )),
    }
}

fn refuse(gw: &Gateway, reason: &'static str, e: ApiError) -> ApiError {
    gw.metrics.handshake_failed(reason);
    e
}

/// The client's address, as the accept loop recorded it (0.0.0.0 when served some other way).
fn peer_of(req: &Request) -> SocketAddr {
    req.extensions()
        .get::<Peer>()
        .map(|p| p.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

async fn websocket(
    State(gw): State<Arc<Gateway>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<WsQuery>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let peer = peer_of(&req);

    // Cheap refusals first: origin and rate cost nothing to check.
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("null"));
    if !origin_allowed(origin, &gw.config.args.allowed_origins) {
        return Err(refuse(
            &gw,
            "origin",
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!("origin {} is not allowed", origin.unwrap_or("(missing)")),
            ),
        ));
    }
    if !gw.rate.check(peer.ip()) {
        return Err(refuse(
            &gw,
            "rate_limited",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many connection attempts: slow down",
            ),
        ));
    }
    let protocols = offered_protocols(&headers);
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let (Some(key), true) = (key, is_upgrade) else {
        return Err(refuse(
            &gw,
            "not_websocket",
            ApiError::new(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade"),
        ));
    };
    if !protocols.iter().any(|p| p == SUBPROTOCOL) {
        return Err(refuse(
            &gw,
            "subprotocol",
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the WebSocket subprotocol {SUBPROTOCOL} is required"),
            ),
        ));
    }
    let mode = parse_mode(q.mode.as_deref()).map_err(|e| refuse(&gw, "bad_request", e))?;

    let token = bearer_protocol_token(&protocols).or_else(|| cookie_token(&headers));
    let Some(token) = token else {
        return Err(refuse(&gw, "no_token", AuthError::Missing.into()));
    };
    let user = match gw.authn.authenticate(&token).await {
        Ok(u) => u,
        Err(e) => return Err(refuse(&gw, e.label(), e.into())),
    };
    let (session, endpoint) = admit(&gw, &user, &namespace, &name, mode)
        .await
        .map_err(|(reason, e)| refuse(&gw, reason, e))?;
    let Some(slot) = gw.conns.acquire(&user.user) else {
        return Err(refuse(
            &gw,
            "too_many_connections",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "user {} already has {} terminal connections open",
                    user.user, gw.config.args.max_connections_per_user
                ),
            ),
        ));
    };

    // Dial the agent before answering, so an unreachable agent is a status, not a dead socket.
    let ticket = gw
        .config
        .signer
        .mint(&TicketRequest {
            user: &user.user,
            session: &session.key(),
            session_uid: &session.uid,
            mode,
            ttl_secs: 30,
        })
        .map_err(|e| {
            refuse(
                &gw,
                "internal",
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot mint a ticket: {e}"),
                ),
            )
        })?;
    let agent = dial_agent(&endpoint, &ticket, gw.config.args.handshake_timeout)
        .await
        .map_err(|e| {
            tracing::warn!(%namespace, %name, %endpoint, error = %e, "cannot reach the agent");
            refuse(
                &gw,
                "agent_unreachable",
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("cannot reach the session agent: {e}"),
                ),
            )
        })?;

    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded",
        ));
    };
    let settings = ProxySettings {
        mode,
        max_frame_bytes: gw.config.args.max_frame_bytes,
        handshake_timeout: gw.config.args.handshake_timeout,
        idle_timeout: gw.config.args.idle_timeout,
    };
    let session_key = session.key();
    let gw2 = gw.clone();
    gw.tasks.spawn(async move {
        let _slot = slot;
        let upgraded = match tokio::time::timeout(Duration::from_secs(10), on_upgrade).await {
            Ok(Ok(u)) => u,
            _ => return,
        };
        // Small read buffers: an idle terminal is the common case, and tungstenite's default
        // 128 KiB per socket would dominate the gateway's memory per connection.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(settings.max_frame_bytes * 2 + 1024))
            .max_frame_size(Some(settings.max_frame_bytes * 2 + 1024));
        let client = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            Some(ws_config),
        )
        .await;
        let label = ModeLabel {
            mode: mode.as_str(),
        };
        gw2.metrics.connections.get_or_create(&label).inc();
        gw2.metrics.connections_total.get_or_create(&label).inc();
        let mut record = gw2
            .audit
            .start(&user, &session_key, mode.as_str(), &peer.to_string());
        let span = tracing::info_span!("connection", user = %user.user, session = %session_key, mode = mode.as_str());
        tracing::info!(parent: &span, "attached");
        let revoked = reauthorize(gw2.clone(), user.clone(), namespace, name, mode);
        let outcome = proxy(
            client,
            agent,
            settings,
            gw2.shutdown.child_token(),
            revoked,
            &gw2.metrics,
        )
        .instrument(span.clone())
        .await;
        gw2.metrics.connections.get_or_create(&label).dec();
        record.bytes_to_agent = outcome.bytes_to_agent;
        record.bytes_to_client = outcome.bytes_to_client;
        span.in_scope(|| tracing::info!(code = outcome.code, reason = %outcome.reason, "detached"));
        record.finish(outcome.code, &outcome.reason);
    });

    let accept = derive_accept_key(key.as_bytes());
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept)
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "bad Sec-WebSocket-Key"))?,
    );
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    Ok(r)
}

/// The WebSocket to a session agent.
pub type AgentSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `ws://<endpoint>/attach` with the ticket and the protocol's subprotocol.
pub async fn dial_agent(
    endpoint: &str,
    ticket: &str,
    within: Duration,
) -> Result<AgentSocket, String> {
    let mut req = format!("ws://{endpoint}/attach")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    req.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {ticket}")).map_err(|e| e.to_string())?,
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(tether_protocol::MAX_SERVER_FRAME + 1024))
        .max_frame_size(Some(tether_protocol::MAX_SERVER_FRAME + 1024));
    let (ws, _) = tokio::time::timeout(
        within,
        tokio_tungstenite::connect_async_with_config(req, Some(config), true),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok(ws)
}
