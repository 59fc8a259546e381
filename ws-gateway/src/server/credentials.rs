//! Credentials on a request: the sealed browser-session cookie, bearer tokens (header or
//! subprotocol), and the [`Principal`] they name, refreshing a browser session when it is about
//! to end.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use base64::Engine as _;

use super::{ApiError, ClientAddr};
use crate::Gateway;
use crate::authn::{AuthError, Credential, UserInfo, Via};
use crate::sessions::{BrowserSession, SessionKey, Versioned, now_secs};

/// Name of the cookie holding the browser session's (encrypted) ID. It never holds a token.
pub const SESSION_COOKIE: &str = "tether_session";
pub use tether_protocol::{BEARER_PROTOCOL_PREFIX, bearer_protocol, bearer_protocol_token};

/// The raw value of every cookie called `name`.
pub(crate) fn cookies_named<'h>(
    headers: &'h HeaderMap,
    name: &'h str,
) -> impl Iterator<Item = String> + 'h {
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
pub(crate) fn seal(gw: &Gateway, name: &str, value: String) -> String {
    let mut jar = cookie::CookieJar::new();
    jar.private_mut(&gw.config.cookie_key)
        .add(cookie::Cookie::new(name.to_owned(), value));
    jar.get(name)
        .map(|c| c.value().to_owned())
        .unwrap_or_default()
}

/// The plain value of a sealed cookie; `None` when forged, altered or renamed.
pub(crate) fn unseal(gw: &Gateway, name: &str, sealed: String) -> Option<String> {
    let mut jar = cookie::CookieJar::new();
    jar.add_original(cookie::Cookie::new(name.to_owned(), sealed));
    jar.private(&gw.config.cookie_key)
        .get(name)
        .map(|c| c.value().to_owned())
}

/// The browser session ID from the request's cookie, when one decrypts.
pub(crate) fn session_id(gw: &Gateway, headers: &HeaderMap) -> Option<String> {
    cookies_named(headers, SESSION_COOKIE).find_map(|v| unseal(gw, SESSION_COOKIE, v))
}

pub(crate) fn bearer_header(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Offered subprotocols, in order.
pub(crate) fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// A `Set-Cookie` value; `max_age` zero clears the cookie.
pub(crate) fn cookie_header(
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
    pub(crate) fn from_bearer(c: Credential) -> Self {
        Self {
            user: c.user,
            via: c.via,
            expires_at: c.expires_at,
            session: None,
        }
    }

    pub(crate) fn from_session(key: SessionKey, s: &BrowserSession) -> Self {
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
pub(crate) async fn principal(
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

pub(crate) async fn user_from_request(
    gw: &Gateway,
    headers: &HeaderMap,
    client: ClientAddr,
) -> Result<UserInfo, ApiError> {
    Ok(principal_of_request(gw, headers, client).await?.user)
}

/// [`principal`] for the JSON API. A bearer token that no cache knows may cost a TokenReview:
/// such calls share the per-address budget of handshakes, so one client's flood of made-up
/// tokens slows that client, not everyone's sign-in.
pub(crate) async fn principal_of_request(
    gw: &Gateway,
    headers: &HeaderMap,
    ClientAddr(addr): ClientAddr,
) -> Result<Principal, ApiError> {
    let bearer = bearer_header(headers);
    if bearer.is_some() && session_id(gw, headers).is_none() && !gw.rate.check(addr) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests: slow down",
        ));
    }
    principal(gw, headers, bearer).await
}

/// Starts a browser session and answers with its cookie.
pub(crate) async fn start_session(
    gw: &Gateway,
    session: &BrowserSession,
) -> Result<HeaderValue, ApiError> {
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
