//! Admission: whether a user may open a session in a mode now (RBAC first, then the index), and
//! what ends a connection once open (RBAC revoked, the credential ended).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use tether_api::SessionPhase;
use tether_protocol::Mode;

use super::ApiError;
use super::credentials::{Principal, live_session};
use crate::Gateway;
use crate::authn::UserInfo;
use crate::index::SessionView;

/// Whether `user` may open `namespace/name` in `mode` now: the access decision first (so nothing
/// about a session leaks to someone who may not see it), then the index. Both use one read of the
/// index: a session that gained an owner while a review was in flight is decided as it is now.
/// On refusal, the handshake-failure label and the error the user reads.
pub(crate) async fn admit(
    gw: &Gateway,
    user: &UserInfo,
    namespace: &str,
    name: &str,
    mode: Mode,
) -> Result<(SessionView, String), (&'static str, ApiError)> {
    let view = gw
        .index
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(namespace, name)
        .cloned();
    let decision = gw
        .authz
        .check_view(user, namespace, name, view.as_ref(), mode)
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
    let Some(session) = view else {
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
pub(crate) async fn reauthorize(
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
pub(crate) async fn credential_ends(gw: Arc<Gateway>, who: Principal) -> String {
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
pub(crate) fn words_for(ago: Duration) -> String {
    match ago.as_secs() {
        s if s < 5 => "just now".into(),
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s => format!("{} h ago", s / 3600),
    }
}

pub(crate) fn parse_mode(mode: Option<&str>) -> Result<Mode, ApiError> {
    match mode {
        None | Some("attach") => Ok(Mode::Attach),
        Some("observe") => Ok(Mode::Observe),
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("mode {other:?} is neither attach nor observe"),
        )),
    }
}
