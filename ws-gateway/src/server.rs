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
use crate::authn::{AuthError, Credential, UserInfo, Via};
use crate::index::SessionView;
use crate::limits::origin_allowed;
use crate::metrics::ModeLabel;
use crate::proxy::{ProxySettings, proxy};
use crate::sessions::{BrowserSession, SessionKey, Versioned, now_secs};
use crate::signin::{CallbackQuery, PendingSignIn, SIGN_IN_TIMEOUT, safe_next, state_cookie_name};

/// Name of the cookie holding the browser session's (encrypted) ID. It never holds a token.
pub const SESSION_COOKIE: &str = "tether_session";
pub use tether_protocol::{BEARER_PROTOCOL_PREFIX, bearer_protocol, bearer_protocol_token};

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
        .route("/", get(index_page))
        .route("/index.html", get(index_page))
        .route("/assets/{*path}", get(asset))
        .route("/api/auth", get(auth_methods))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/auth/login", get(signin_begin))
        .route("/auth/callback", get(signin_callback))
        .route("/auth/done", get(signin_done))
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

/// The raw value of every cookie called `name`.
fn cookies_named<'h>(headers: &'h HeaderMap, name: &'h str) -> impl Iterator<Item = String> + 'h {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(move |c| c.name() == name)
        .map(|c| c.value().to_owned())
}

/// `value`, encrypted and authenticated (with its name) under the session key.
fn seal(gw: &Gateway, name: &str, value: String) -> String {
    let mut jar = cookie::CookieJar::new();
    jar.private_mut(&gw.config.cookie_key)
        .add(cookie::Cookie::new(name.to_owned(), value));
    jar.get(name)
        .map(|c| c.value().to_owned())
        .unwrap_or_default()
}

/// The plain value of a sealed cookie; `None` when forged, altered or renamed.
fn unseal(gw: &Gateway, name: &str, sealed: String) -> Option<String> {
    let mut jar = cookie::CookieJar::new();
    jar.add_original(cookie::Cookie::new(name.to_owned(), sealed));
    jar.private(&gw.config.cookie_key)
        .get(name)
        .map(|c| c.value().to_owned())
}

/// The browser session ID from the request's cookie, when one decrypts.
fn session_id(gw: &Gateway, headers: &HeaderMap) -> Option<String> {
    cookies_named(headers, SESSION_COOKIE).find_map(|v| unseal(gw, SESSION_COOKIE, v))
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

/// A `Set-Cookie` value; `max_age` zero clears the cookie.
fn cookie_header(
    gw: &Gateway,
    name: &str,
    value: &str,
    path: &str,
    same_site: cookie::SameSite,
    max_age: Option<Duration>,
) -> HeaderValue {
    let mut c = cookie::Cookie::build((name.to_owned(), value.to_owned()))
        .path(path.to_owned())
        .http_only(true)
        .same_site(same_site)
        .secure(!gw.config.args.insecure_cookies);
    if let Some(age) = max_age {
        c = c.max_age(cookie::time::Duration::seconds(age.as_secs() as i64));
    }
    // Names and values are ours (base64 and fixed names): always valid header text.
    HeaderValue::from_str(&c.build().to_string()).unwrap_or(HeaderValue::from_static(""))
}

/// Who is asking: a browser session, or a bearer token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: UserInfo,
    pub via: Via,
    pub expires_at: Option<std::time::SystemTime>,
    /// The browser session, when the request came with one.
    pub session: Option<SessionKey>,
}

impl Principal {
    fn from_bearer(c: Credential) -> Self {
        Self {
            user: c.user,
            via: c.via,
            expires_at: c.expires_at,
            session: None,
        }
    }

    fn from_session(key: SessionKey, s: &BrowserSession) -> Self {
        Self {
            user: s.user.clone(),
            via: s.via,
            expires_at: Some(s.expires()),
            session: Some(key),
        }
    }
}

/// Refresh a session this long before it would end, so a live terminal never sees a gap.
const REFRESH_AHEAD: u64 = 60;

/// Why a browser session is no longer usable, in words for the person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    SignedOut,
    Expired(String),
}

impl SessionEnd {
    pub fn words(&self) -> String {
        match self {
            SessionEnd::SignedOut => "you signed out".into(),
            SessionEnd::Expired(why) if why.is_empty() => "your sign-in expired".into(),
            SessionEnd::Expired(why) => format!("your sign-in expired: {why}"),
        }
    }
}

/// The live browser session `key`, refreshed with the provider when it is about to end.
/// `Ok(Err(_))`: the session is over (and deleted); `Err`: the store cannot be reached.
pub async fn live_session(
    gw: &Gateway,
    key: &SessionKey,
) -> Result<Result<BrowserSession, SessionEnd>, AuthError> {
    let unavailable = |e: crate::sessions::StoreError| AuthError::Unavailable(e.to_string());
    let Some(Versioned { session, .. }) = gw.sessions.get(key).await.map_err(unavailable)? else {
        return Ok(Err(SessionEnd::SignedOut));
    };
    let now = now_secs();
    if now + REFRESH_AHEAD < session.expires_at {
        return Ok(Ok(session));
    }
    // A refresh cannot carry it past its absolute end: no point asking in the last minute.
    let can_refresh = session.refresh_token.is_some() && now + REFRESH_AHEAD < session.absolute_end;
    let (Some(signin), Some(oidc), true) = (&gw.signin, &gw.authn.oidc, can_refresh) else {
        if session.is_expired() {
            let _ = gw.sessions.delete(key).await;
            return Ok(Err(SessionEnd::Expired(String::new())));
        }
        return Ok(Ok(session));
    };
    // One refresh per session at a time on this replica, and a fresh read from the store (not
    // the watch cache, which may not have our own last write yet): a second refresh with a
    // rotated refresh token would look like reuse to the provider.
    let lock = gw.refresh_lock(key);
    let _one = lock.lock().await;
    let Some(Versioned { session, version }) =
        gw.sessions.get_fresh(key).await.map_err(unavailable)?
    else {
        return Ok(Err(SessionEnd::SignedOut));
    };
    if now + REFRESH_AHEAD < session.expires_at {
        return Ok(Ok(session));
    }
    match signin.refresh(oidc, &session).await {
        Ok(fresh) => match gw.sessions.update(key, &fresh, &version).await {
            Ok(()) => Ok(Ok(fresh)),
            // Another replica refreshed it first: theirs stands.
            Err(crate::sessions::StoreError::Conflict) => match gw.sessions.get_fresh(key).await {
                Ok(Some(v)) => Ok(Ok(v.session)),
                Ok(None) => Ok(Err(SessionEnd::SignedOut)),
                Err(e) => Err(unavailable(e)),
            },
            Err(e) => Err(unavailable(e)),
        },
        // The provider cannot be reached or failed: the session stands while it is valid.
        Err(e) if e.is_transient() && !session.is_expired() => {
            tracing::warn!(error = %e, "cannot refresh a sign-in yet; it is still valid");
            Ok(Ok(session))
        }
        Err(e) if e.is_transient() => Err(AuthError::Unavailable(e.to_string())),
        Err(e) => {
            // Refused: unless another replica refreshed it meanwhile, the sign-in is over.
            match gw.sessions.delete_if(key, &version).await {
                Err(crate::sessions::StoreError::Conflict) => {
                    return match gw.sessions.get_fresh(key).await {
                        Ok(Some(v)) => Ok(Ok(v.session)),
                        Ok(None) => Ok(Err(SessionEnd::SignedOut)),
                        Err(e) => Err(unavailable(e)),
                    };
                }
                Err(e) => return Err(unavailable(e)),
                Ok(()) => {}
            }
            tracing::info!(user = %session.user.user, error = %e, "sign-in ended: refresh refused");
            Ok(Err(SessionEnd::Expired(e.to_string())))
        }
    }
}

/// Who is behind a request: its browser session cookie first, else `bearer`.
async fn principal(
    gw: &Gateway,
    headers: &HeaderMap,
    bearer: Option<String>,
) -> Result<Principal, ApiError> {
    if let Some(sid) = session_id(gw, headers) {
        let key = SessionKey::of(&sid);
        match live_session(gw, &key).await? {
            Ok(s) => return Ok(Principal::from_session(key, &s)),
            Err(end) if bearer.is_none() => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    format!("{}: sign in again", end.words()),
                ));
            }
            Err(_) => {}
        }
    }
    let token = bearer.ok_or(AuthError::Missing)?;
    Ok(Principal::from_bearer(gw.authn.authenticate(&token).await?))
}

async fn user_from_request(
    gw: &Gateway,
    headers: &HeaderMap,
    peer: Option<axum::Extension<Peer>>,
) -> Result<UserInfo, ApiError> {
    Ok(principal_of_request(gw, headers, peer).await?.user)
}

/// [`principal`] for the JSON API. A bearer token that no cache knows may cost a TokenReview:
/// such calls share the per-address budget of handshakes, so one client's flood of made-up
/// tokens slows that client, not everyone's sign-in.
async fn principal_of_request(
    gw: &Gateway,
    headers: &HeaderMap,
    peer: Option<axum::Extension<Peer>>,
) -> Result<Principal, ApiError> {
    let bearer = bearer_header(headers);
    if bearer.is_some()
        && session_id(gw, headers).is_none()
        && let Some(axum::Extension(Peer(addr))) = peer
        && !gw.rate.check(addr.ip())
    {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests: slow down",
        ));
    }
    principal(gw, headers, bearer).await
}

/// Starts a browser session and answers with its cookie.
async fn start_session(gw: &Gateway, session: &BrowserSession) -> Result<HeaderValue, ApiError> {
    use rand::RngCore as _;
    let mut id = [0u8; 32];
    rand::rng().fill_bytes(&mut id);
    let sid = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id);
    gw.sessions
        .create(&SessionKey::of(&sid), session)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let max_age = Duration::from_secs(session.absolute_end.saturating_sub(now_secs()));
    // Lax: the provider's redirect back to us is a cross-site navigation that must carry it.
    Ok(cookie_header(
        gw,
        SESSION_COOKIE,
        &seal(gw, SESSION_COOKIE, sid),
        "/",
        cookie::SameSite::Lax,
        Some(max_age),
    ))
}

/// `GET /api/auth`: how to sign in here.
async fn auth_methods(State(gw): State<Arc<Gateway>>) -> Response {
    let oidc = gw.authn.oidc.as_ref().map(|o| {
        json!({
            "issuer": o.config().issuer,
            "cliClientId": gw.config.args.oidc_cli_client_id,
        })
    });
    Json(json!({
        "oidc": oidc,
        "browserSignIn": gw.signin.is_some(),
        "developmentTokens": gw.authn.dev_tokens.is_some(),
    }))
    .into_response()
}

/// `POST /api/login {"token"}`: development tokens only, into a browser session.
async fn login(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_post_origin(&gw, &headers)?;
    let Some(dev) = &gw.authn.dev_tokens else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "pasting a token is for development gateways only: use Sign in",
        ));
    };
    let body: LoginBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "expected a JSON body {\"token\": \"...\"}",
        )
    })?;
    let Some(user) = dev.get(body.token.trim()).cloned() else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token rejected: not a development token of this gateway",
        ));
    };
    tracing::info!(user = %user.user, via = "development", "signed in");
    let now = now_secs();
    let end = now + gw.config.args.session_max_lifetime.as_secs();
    let session = BrowserSession {
        user,
        via: Via::Development,
        subject: None,
        expires_at: end,
        absolute_end: end,
        created_at: now,
        refresh_token: None,
        id_token: None,
    };
    let cookie = start_session(&gw, &session).await?;
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(header::SET_COOKIE, cookie);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `POST /api/logout`: ends the browser session on the server (every replica), clears the
/// cookie, and names the provider's sign-out page.
async fn logout(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_post_origin(&gw, &headers)?;
    let mut end_session_url = None;
    if let Some(sid) = session_id(&gw, &headers) {
        let key = SessionKey::of(&sid);
        if let Ok(Some(v)) = gw.sessions.get(&key).await {
            tracing::info!(user = %v.session.user.user, "signed out");
            if let Some(signin) = &gw.signin
                && v.session.via == Via::Oidc
            {
                end_session_url = signin.end_session_url(&v.session).await;
            }
        }
        gw.sessions
            .delete(&key)
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    }
    let mut r = Json(json!({ "endSessionUrl": end_session_url })).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        cookie_header(
            &gw,
            SESSION_COOKIE,
            "",
            "/",
            cookie::SameSite::Lax,
            Some(Duration::ZERO),
        ),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A small page in words (sign-in errors, the popup's "done").
fn html_page(status: StatusCode, title: &str, body_html: &str, script: Option<&str>) -> Response {
    let script = script
        .map(|s| format!("<script src=\"{s}\"></script>"))
        .unwrap_or_default();
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <link rel=\"stylesheet\" href=\"/assets/main.css\">{script}</head><body><main class=\"card\">\
         <h1>{}</h1>{body_html}</main></body></html>",
        html_escape(title),
        html_escape(title)
    );
    let mut r = (status, page).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    with_security_headers(r)
}

fn signin_error(status: StatusCode, words: &str) -> Response {
    html_page(
        status,
        "Sign-in failed",
        &format!(
            "<p role=\"alert\" id=\"signin-error\">{}</p><p><a href=\"/\">Back to Tether</a></p>",
            html_escape(words)
        ),
        None,
    )
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

/// `GET /auth/login?next=/path`: off to the provider.
async fn signin_begin(
    State(gw): State<Arc<Gateway>>,
    Query(q): Query<LoginQuery>,
    req: Request,
) -> Response {
    let Some(signin) = &gw.signin else {
        return signin_error(
            StatusCode::NOT_FOUND,
            "this gateway has no identity provider configured (--oidc-issuer and --external-url)",
        );
    };
    // Each start costs a discovery lookup and a cookie: the per-address budget of handshakes.
    if !gw.rate.check(peer_of(&req).ip()) {
        return signin_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many sign-in attempts: slow down",
        );
    }
    let next = safe_next(q.next.as_deref());
    match signin.begin(&next).await {
        Ok((url, pending)) => {
            let name = state_cookie_name(&pending.state);
            let sealed = seal(
                &gw,
                &name,
                serde_json::to_string(&pending).unwrap_or_default(),
            );
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::FOUND;
            let h = r.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&url) {
                h.insert(header::LOCATION, v);
            }
            h.insert(
                header::SET_COOKIE,
                cookie_header(
                    &gw,
                    &name,
                    &sealed,
                    "/auth/callback",
                    cookie::SameSite::Lax,
                    Some(SIGN_IN_TIMEOUT),
                ),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a sign-in");
            signin_error(StatusCode::BAD_GATEWAY, &e.to_string())
        }
    }
}

/// `GET /auth/callback?code&state`: back from the provider.
async fn signin_callback(
    State(gw): State<Arc<Gateway>>,
    Query(q): Query<CallbackQuery>,
    req: Request,
) -> Response {
    let (Some(signin), Some(oidc)) = (&gw.signin, &gw.authn.oidc) else {
        return signin_error(
            StatusCode::NOT_FOUND,
            "this gateway has no identity provider configured",
        );
    };
    if !gw.rate.check(peer_of(&req).ip()) {
        return signin_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many sign-in attempts: slow down",
        );
    }
    let cookie_name = q.state.as_deref().map(state_cookie_name);
    let pending: Option<PendingSignIn> = cookie_name.as_ref().and_then(|name| {
        cookies_named(req.headers(), name)
            .find_map(|v| unseal(&gw, name, v))
            .and_then(|json| serde_json::from_str(&json).ok())
    });
    let clear = cookie_name.map(|name| {
        cookie_header(
            &gw,
            &name,
            "",
            "/auth/callback",
            cookie::SameSite::Lax,
            Some(Duration::ZERO),
        )
    });
    let result = signin.finish(oidc, &q, pending).await;
    let mut r = match result {
        Ok((session, next)) => match start_session(&gw, &session).await {
            Ok(cookie) => {
                tracing::info!(user = %session.user.user, groups = ?session.user.groups, via = "oidc", "signed in");
                let mut r = Response::new(Body::empty());
                *r.status_mut() = StatusCode::SEE_OTHER;
                let next = safe_next(Some(&next));
                if let Ok(v) = HeaderValue::from_str(&next) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                r.headers_mut().append(header::SET_COOKIE, cookie);
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            Err(e) => signin_error(e.status, e.body["error"].as_str().unwrap_or("")),
        },
        Err(e) => {
            tracing::info!(error = %e, "sign-in refused");
            let status = match e {
                crate::signin::SignInError::Provider(_) => StatusCode::BAD_GATEWAY,
                crate::signin::SignInError::Token(AuthError::Unavailable(_)) => {
                    StatusCode::BAD_GATEWAY
                }
                crate::signin::SignInError::Token(_) => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_REQUEST,
            };
            signin_error(status, &e.to_string())
        }
    };
    if let Some(clear) = clear {
        r.headers_mut().append(header::SET_COOKIE, clear);
    }
    r
}

/// `GET /auth/done`: where the "sign in again" popup lands; it closes itself.
async fn signin_done() -> Response {
    html_page(
        StatusCode::OK,
        "Signed in",
        "<p>Signed in. You can close this window.</p><p><a href=\"/\">Back to Tether</a></p>",
        Some("/assets/done.js"),
    )
}

async fn whoami(
    State(gw): State<Arc<Gateway>>,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let p = principal_of_request(&gw, &headers, peer).await?;
    let expires_at = p.expires_at.map(|t| {
        jiff::Timestamp::try_from(t)
            .map(|t| t.to_string())
            .unwrap_or_default()
    });
    let mut r = Json(json!({
        "user": p.user.user,
        "groups": p.user.groups,
        "via": p.via.as_str(),
        "expiresAt": expires_at,
    }))
    .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

#[derive(Deserialize)]
struct SessionsQuery {
    namespace: Option<String>,
}

async fn sessions(
    State(gw): State<Arc<Gateway>>,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
    Query(q): Query<SessionsQuery>,
) -> Result<Response, ApiError> {
    let user = user_from_request(&gw, &headers, peer).await?;
    let list = gw
        .index
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .list(q.namespace.as_deref());
    let Ok(access) = gw.authz.list_access(&user, &list).await else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cannot check permissions right now",
        ));
    };
    let mut out = Vec::new();
    for (s, (attach, observe)) in list.into_iter().zip(access) {
        if !attach && !observe {
            continue;
        }
        out.push(json!({
            "namespace": s.namespace,
            "name": s.name,
            "phase": s.phase.as_str(),
            "ready": s.is_ready(),
            "message": s.message,
            "owner": s.owner,
            "canAttach": attach,
            "canObserve": observe,
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

/// How often a connection admitted with a browser session looks whether it still exists.
const SESSION_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Resolves, with the reason in words, when the credential a connection was admitted with
/// ends: the browser session is signed out or expires without a refresh, or the bearer token
/// reaches its `exp`. A store that cannot be reached keeps the connection (an outage must not
/// cut every terminal); the token's own expiry still ends it.
async fn credential_ends(gw: Arc<Gateway>, who: Principal) -> String {
    match &who.session {
        Some(key) => {
            let mut tick = tokio::time::interval(SESSION_CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match live_session(&gw, key).await {
                    // A refresh may bring other groups: RBAC was asked about the old ones.
                    Ok(Ok(s)) if s.user != who.user => {
                        tracing::info!(user = %who.user.user, "identity changed at the provider");
                        return "your groups changed at the identity provider: sign in again"
                            .into();
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(end)) => {
                        tracing::info!(user = %who.user.user, reason = %end.words(), "sign-in ended");
                        return end.words();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot look up the sign-in; keeping the connection")
                    }
                }
            }
        }
        None => match who.expires_at {
            None => std::future::pending().await,
            Some(at) => {
                let left = at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::time::sleep(left).await;
                "your token expired: sign in again".into()
            }
        },
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
    let user = principal(&gw, req.headers(), bearer_header(req.headers()))
        .await?
        .user;
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

    // A bearer subprotocol (CLI) wins over the cookie: it is what the client chose to send.
    let bearer = bearer_protocol_token(&protocols);
    let principal = match bearer {
        Some(token) => gw
            .authn
            .authenticate(&token)
            .await
            .map(Principal::from_bearer)
            .map_err(|e| refuse(&gw, e.label(), e.into()))?,
        None => principal(&gw, &headers, None)
            .await
            .map_err(|e| refuse(&gw, "no_token", e))?,
    };
    let user = principal.user.clone();
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
            pod_uid: session.pod.as_ref().map(|(_, uid)| uid.as_str()),
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
        let signed_out = credential_ends(gw2.clone(), principal);
        let ended = async move {
            tokio::select! {
                why = revoked => (tether_protocol::CloseCode::REVOKED, why),
                why = signed_out => (tether_protocol::CloseCode::SIGNED_OUT, why),
            }
        };
        let outcome = proxy(
            client,
            agent,
            settings,
            gw2.shutdown.child_token(),
            ended,
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
