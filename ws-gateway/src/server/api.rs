//! The JSON API (`/api/...`), the sign-in pages (`/auth/...`), health and metrics.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::admission::{admit, parse_mode};
use super::assets::{html_escape, html_page};
use super::credentials::{
    SESSION_COOKIE, bearer_header, cookie_header, cookies_named, principal, principal_of_request,
    seal, session_id, start_session, unseal, user_from_request,
};
use super::{ApiError, ClientAddr};
use crate::Gateway;
use crate::authn::{AuthError, Via};
use crate::limits::origin_allowed;
use crate::sessions::{BrowserSession, SessionKey, now_secs};
use crate::signin::{CallbackQuery, PendingSignIn, SIGN_IN_TIMEOUT, safe_next, state_cookie_name};

pub(crate) async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
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

pub(crate) async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        gw.metrics.encode(),
    )
        .into_response()
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
pub(crate) struct LoginBody {
    token: String,
}

/// `GET /api/auth`: how to sign in here.
pub(crate) async fn auth_methods(State(gw): State<Arc<Gateway>>) -> Response {
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
pub(crate) async fn login(
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
pub(crate) async fn logout(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
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
pub(crate) struct LoginQuery {
    next: Option<String>,
}

/// `GET /auth/login?next=/path`: off to the provider.
pub(crate) async fn signin_begin(
    State(gw): State<Arc<Gateway>>,
    Query(q): Query<LoginQuery>,
    ClientAddr(client): ClientAddr,
) -> Response {
    let Some(signin) = &gw.signin else {
        return signin_error(
            StatusCode::NOT_FOUND,
            "this gateway has no identity provider configured (--oidc-issuer and --external-url)",
        );
    };
    // Each start costs a discovery lookup and a cookie: the per-address budget of handshakes.
    if !gw.rate.check(client) {
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
pub(crate) async fn signin_callback(
    State(gw): State<Arc<Gateway>>,
    Query(q): Query<CallbackQuery>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
) -> Response {
    let (Some(signin), Some(oidc)) = (&gw.signin, &gw.authn.oidc) else {
        return signin_error(
            StatusCode::NOT_FOUND,
            "this gateway has no identity provider configured",
        );
    };
    if !gw.rate.check(client) {
        return signin_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many sign-in attempts: slow down",
        );
    }
    let cookie_name = q.state.as_deref().map(state_cookie_name);
    let pending: Option<PendingSignIn> = cookie_name.as_ref().and_then(|name| {
        cookies_named(&headers, name)
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
pub(crate) async fn signin_done() -> Response {
    html_page(
        StatusCode::OK,
        "Signed in",
        "<p>Signed in. You can close this window.</p><p><a href=\"/\">Back to Tether</a></p>",
        Some("/assets/done.js"),
    )
}

pub(crate) async fn whoami(
    State(gw): State<Arc<Gateway>>,
    client: ClientAddr,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let p = principal_of_request(&gw, &headers, client).await?;
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
pub(crate) struct SessionsQuery {
    namespace: Option<String>,
}

pub(crate) async fn sessions(
    State(gw): State<Arc<Gateway>>,
    client: ClientAddr,
    headers: HeaderMap,
    Query(q): Query<SessionsQuery>,
) -> Result<Response, ApiError> {
    let user = user_from_request(&gw, &headers, client).await?;
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
pub(crate) struct SessionQuery {
    mode: Option<String>,
}

/// `GET /api/sessions/{namespace}/{name}?mode=attach|observe`: the answer the WebSocket upgrade
/// would give, as JSON. The page asks it when an upgrade fails (a browser only sees code 1006)
/// to tell "deleted", "not allowed" or "not Ready" from a network cut.
pub(crate) async fn session_status(
    State(gw): State<Arc<Gateway>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<SessionQuery>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Each answer may cost a SubjectAccessReview: the same budget as handshakes, the user's
    // once authenticated, else the client address's.
    let too_many = || {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests: slow down",
        )
    };
    let user = match principal(&gw, &headers, bearer_header(&headers)).await {
        Ok(p) => p.user,
        Err(_) if !gw.rate.check(client) => return Err(too_many()),
        Err(e) => return Err(e),
    };
    if !gw.rate.check_user(&user.user) {
        return Err(too_many());
    }
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
