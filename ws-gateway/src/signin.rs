//! Browser sign-in: the OIDC authorization code flow with PKCE.
//!
//! `GET /auth/login?next=/path` discovers the provider (`{issuer}/.well-known/openid-configuration`,
//! cached), makes a fresh `state`, `nonce` and PKCE verifier, keeps them in a short-lived
//! encrypted cookie named after the state (so sign-ins in several tabs do not clobber each
//! other), and redirects to the provider. `GET /auth/callback` finds that cookie by the returned
//! `state`, refuses a state it has seen before, exchanges the code with the verifier, verifies
//! the ID token with the gateway's pinned-algorithm verifier, checks its `nonce`, maps the
//! identity as kube-apiserver would and starts a [`BrowserSession`].
//!
//! `openidconnect` (ramosbugs/openidconnect-rs, the most used Rust OIDC relying-party crate) does
//! the discovery, authorization URL, PKCE, code exchange, refresh and RP-initiated logout URL;
//! tokens are still verified in one place ([`crate::authn::Oidc`]) for bearer tokens and
//! browser sign-ins alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openidconnect::core::{CoreAuthenticationFlow, CoreClient};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet, EndpointNotSet,
    EndpointSet, IssuerUrl, LogoutRequest, Nonce, OAuth2TokenResponse, PkceCodeChallenge,
    PkceCodeVerifier, PostLogoutRedirectUrl, ProviderMetadataWithLogout, RedirectUrl, RefreshToken,
    Scope, TokenResponse,
};
use serde::{Deserialize, Serialize};

use crate::authn::{AuthError, Oidc, Via};
use crate::sessions::{BrowserSession, now_secs, unix_secs};

/// How long a started sign-in may take (the provider's login form included).
pub const SIGN_IN_TIMEOUT: Duration = Duration::from_secs(600);
/// Prefix of the per-sign-in state cookies.
pub const STATE_COOKIE_PREFIX: &str = "tether_signin_";
/// How long a failed discovery is remembered before trying again.
const DISCOVERY_RETRY: Duration = Duration::from_secs(10);
/// How long a good discovery document is used before it is fetched again.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

/// Settings of browser sign-in.
#[derive(Debug, Clone)]
pub struct SignInConfig {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// Where browsers reach the gateway, e.g. `https://tether.example.com` (no trailing `/`).
    pub external_url: url::Url,
    pub scopes: Vec<String>,
    /// No session lasts longer, refreshes included.
    pub max_lifetime: Duration,
}

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

struct Provider {
    client: Client,
    end_session: Option<openidconnect::EndSessionUrl>,
    fetched: Instant,
}

/// The last discovery: the provider, or when and why it failed.
type Discovered = Result<Arc<Provider>, (Instant, String)>;

/// Why a sign-in failed, in words for the person.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("the identity provider cannot be reached: {0}")]
    Provider(String),
    #[error("the identity provider said: {0}")]
    Refused(String),
    #[error("{0}")]
    BadCallback(String),
    #[error(transparent)]
    Token(#[from] AuthError),
}

impl SignInError {
    /// A failure that says nothing about the sign-in itself: the provider could not be reached
    /// or answered with a server error, or its keys could not be fetched.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SignInError::Provider(_) | SignInError::Token(AuthError::Unavailable(_))
        )
    }
}

/// A token-endpoint failure: the provider's own `error` answer (a refusal), or transport,
/// server-error and parse failures (transient).
fn token_error<RE: std::error::Error + 'static, T: openidconnect::ErrorResponse + 'static>(
    what: &str,
    e: openidconnect::RequestTokenError<RE, T>,
) -> SignInError {
    match e {
        openidconnect::RequestTokenError::ServerResponse(r) => {
            SignInError::Refused(format!("the {what} was refused: {r}"))
        }
        other => SignInError::Provider(format!("the {what} failed: {other}")),
    }
}

/// What the state cookie holds (encrypted).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingSignIn {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    pub next: String,
    pub started: u64,
}

/// Starts and finishes browser sign-ins.
pub struct SignIn {
    pub config: SignInConfig,
    http: reqwest::Client,
    provider: tokio::sync::Mutex<Option<Discovered>>,
    /// States already used here, until their sign-in would have timed out anyway.
    used_states: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for SignIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignIn")
            .field("issuer", &self.config.issuer)
            .field("client_id", &self.config.client_id)
            .finish()
    }
}

/// The callback's query.
#[derive(Debug, Default, Deserialize)]
pub struct CallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// The state cookie's name for a state.
pub fn state_cookie_name(state: &str) -> String {
    let short: String = state
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect();
    format!("{STATE_COOKIE_PREFIX}{short}")
}

/// A return path that stays on the gateway: `/...` with no scheme, host, `//`, `\` or control
/// characters. Anything else becomes `/`.
pub fn safe_next(next: Option<&str>) -> String {
    let Some(next) = next else {
        return "/".into();
    };
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.chars().any(|c| c.is_control() || c == ' ')
        && next.len() <= 2048;
    if !ok {
        return "/".into();
    }
    // Parsed against a placeholder origin, it must stay there (catches `/%2F/evil` tricks the
    // checks above might miss in some browser).
    let base = url::Url::parse("https://gateway.invalid/").ok();
    match base.as_ref().and_then(|b| b.join(next).ok()) {
        Some(u) if u.host_str() == Some("gateway.invalid") && u.scheme() == "https" => {
            next.to_owned()
        }
        _ => "/".into(),
    }
}

impl SignIn {
    pub fn new(config: SignInConfig) -> Self {
        let http = reqwest::Client::builder()
            // The provider's endpoints must answer themselves: a redirect is an error (SSRF).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Self {
            config,
            http,
            provider: tokio::sync::Mutex::new(None),
            used_states: Mutex::new(HashMap::new()),
        }
    }

    pub fn redirect_uri(&self) -> String {
        format!(
            "{}/auth/callback",
            self.config.external_url.as_str().trim_end_matches('/')
        )
    }

    async fn provider(&self) -> Result<Arc<Provider>, SignInError> {
        let mut slot = self.provider.lock().await;
        match &*slot {
            Some(Ok(p)) if p.fetched.elapsed() < DISCOVERY_TTL => return Ok(p.clone()),
            Some(Err((at, why))) if at.elapsed() < DISCOVERY_RETRY => {
                return Err(SignInError::Provider(why.clone()));
            }
            _ => {}
        }
        let r = self.discover().await;
        *slot = Some(match &r {
            Ok(p) => Ok(p.clone()),
            Err(e) => Err((Instant::now(), e.to_string())),
        });
        r.map_err(|e| SignInError::Provider(e.to_string()))
    }

    async fn discover(&self) -> Result<Arc<Provider>, String> {
        let issuer = IssuerUrl::new(self.config.issuer.clone()).map_err(|e| e.to_string())?;
        // Checks that the document's `issuer` is exactly ours.
        let metadata = ProviderMetadataWithLogout::discover_async(issuer, &self.http)
            .await
            .map_err(|e| format!("discovery failed: {e}"))?;
        let end_session = metadata.additional_metadata().end_session_endpoint.clone();
        let redirect = RedirectUrl::new(self.redirect_uri()).map_err(|e| e.to_string())?;
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.config.client_id.clone()),
            self.config.client_secret.clone().map(ClientSecret::new),
        )
        .set_redirect_uri(redirect);
        Ok(Arc::new(Provider {
            client,
            end_session,
            fetched: Instant::now(),
        }))
    }

    /// The provider's authorization URL and what the state cookie must hold.
    pub async fn begin(&self, next: &str) -> Result<(String, PendingSignIn), SignInError> {
        let provider = self.provider().await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = provider.client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        for scope in &self.config.scopes {
            if scope != "openid" {
                request = request.add_scope(Scope::new(scope.clone()));
            }
        }
        let (url, state, nonce) = request.set_pkce_challenge(challenge).url();
        Ok((
            url.to_string(),
            PendingSignIn {
                state: state.secret().clone(),
                nonce: nonce.secret().clone(),
                verifier: verifier.secret().clone(),
                next: next.to_owned(),
                started: now_secs(),
            },
        ))
    }

    /// Refuses a state seen before on this replica (the provider refuses a reused code too).
    fn first_use(&self, state: &str) -> bool {
        let mut used = self.used_states.lock().unwrap_or_else(|p| p.into_inner());
        used.retain(|_, at| at.elapsed() < SIGN_IN_TIMEOUT);
        used.insert(state.to_owned(), Instant::now()).is_none()
    }

    /// Checks the callback against the pending sign-in and turns the code into a session.
    pub async fn finish(
        &self,
        oidc: &Oidc,
        query: &CallbackQuery,
        pending: Option<PendingSignIn>,
    ) -> Result<(BrowserSession, String), SignInError> {
        // The provider's words are shown only for a sign-in started here (else anyone could
        // put text on the gateway's page with a link).
        if let Some(error) = &query.error {
            let ours = pending
                .as_ref()
                .is_some_and(|p| Some(&p.state) == query.state.as_ref());
            if !ours {
                return Err(SignInError::BadCallback(
                    "this sign-in was not started here or took too long: sign in again".into(),
                ));
            }
            let words = query.error_description.as_deref().unwrap_or("");
            return Err(SignInError::Refused(
                format!("{error} {words}").trim().to_owned(),
            ));
        }
        let (Some(code), Some(state)) = (&query.code, &query.state) else {
            return Err(SignInError::BadCallback(
                "the sign-in callback needs `code` and `state`".into(),
            ));
        };
        let Some(pending) = pending else {
            return Err(SignInError::BadCallback(
                "this sign-in was not started here or took too long: sign in again".into(),
            ));
        };
        if pending.state != *state {
            return Err(SignInError::BadCallback(
                "the sign-in state does not match: sign in again".into(),
            ));
        }
        if now_secs().saturating_sub(pending.started) > SIGN_IN_TIMEOUT.as_secs() {
            return Err(SignInError::BadCallback(
                "the sign-in took too long: sign in again".into(),
            ));
        }
        if !self.first_use(state) {
            return Err(SignInError::BadCallback(
                "this sign-in was already used: sign in again".into(),
            ));
        }
        let provider = self.provider().await?;
        let response = provider
            .client
            .exchange_code(AuthorizationCode::new(code.clone()))
            .map_err(|e| SignInError::Provider(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| token_error("code exchange", e))?;
        let id_token = response
            .id_token()
            .ok_or_else(|| SignInError::Refused("no ID token in the token response".into()))?
            .to_string();
        let (credential, claims) = oidc.verify_claims(&id_token).await?;
        if claims.get("nonce").and_then(|n| n.as_str()) != Some(pending.nonce.as_str()) {
            return Err(SignInError::BadCallback(
                "the ID token's nonce does not match this sign-in".into(),
            ));
        }
        let now = now_secs();
        let absolute_end = now + self.config.max_lifetime.as_secs();
        let token_end = credential.expires_at.map(unix_secs).unwrap_or(now);
        let session = BrowserSession {
            user: credential.user,
            via: Via::Oidc,
            subject: claims
                .get("sub")
                .and_then(|s| s.as_str())
                .map(str::to_owned),
            expires_at: token_end.min(absolute_end),
            absolute_end,
            created_at: now,
            refresh_token: response.refresh_token().map(|r| r.secret().clone()),
            id_token: Some(id_token),
        };
        Ok((session, pending.next))
    }

    /// A refreshed session, or why it cannot be refreshed.
    pub async fn refresh(
        &self,
        oidc: &Oidc,
        session: &BrowserSession,
    ) -> Result<BrowserSession, SignInError> {
        let Some(refresh) = &session.refresh_token else {
            return Err(SignInError::Refused("no refresh token".into()));
        };
        if now_secs() >= session.absolute_end {
            return Err(SignInError::Refused(
                "the sign-in reached its maximum lifetime".into(),
            ));
        }
        let provider = self.provider().await?;
        let token = RefreshToken::new(refresh.clone());
        let response = provider
            .client
            .exchange_refresh_token(&token)
            .map_err(|e| SignInError::Provider(e.to_string()))?
            .request_async(&self.http)
            .await
            .map_err(|e| token_error("refresh", e))?;
        let id_token = response
            .id_token()
            .ok_or_else(|| SignInError::Refused("no ID token in the refresh response".into()))?
            .to_string();
        let (credential, claims) = oidc.verify_claims(&id_token).await?;
        let subject = claims.get("sub").and_then(|s| s.as_str());
        if subject != session.subject.as_deref() {
            return Err(SignInError::Refused(
                "the refreshed ID token names another subject".into(),
            ));
        }
        let token_end = credential.expires_at.map(unix_secs).unwrap_or(0);
        Ok(BrowserSession {
            user: credential.user,
            expires_at: token_end.min(session.absolute_end),
            refresh_token: Some(
                response
                    .refresh_token()
                    .map(|r| r.secret().clone())
                    .unwrap_or_else(|| refresh.clone()),
            ),
            id_token: Some(id_token),
            ..session.clone()
        })
    }

    /// The provider's sign-out URL for a session, coming back to the gateway's page.
    pub async fn end_session_url(&self, session: &BrowserSession) -> Option<String> {
        let provider = self.provider().await.ok()?;
        let end = provider.end_session.clone()?;
        let back = PostLogoutRedirectUrl::new(format!(
            "{}/",
            self.config.external_url.as_str().trim_end_matches('/')
        ))
        .ok()?;
        let mut request = LogoutRequest::from(end)
            .set_client_id(ClientId::new(self.config.client_id.clone()))
            .set_post_logout_redirect_uri(back);
        if let Some(hint) = &session.id_token
            && let Ok(token) = hint.parse::<openidconnect::core::CoreIdToken>()
        {
            request = request.set_id_token_hint(&token);
        }
        Some(request.http_get_url().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_return_path_never_leaves_the_gateway() {
        for good in ["/", "/#ns/name", "/?session=a/b", "/auth/done"] {
            assert_eq!(safe_next(Some(good)), good);
        }
        for bad in [
            "https://evil.example/",
            "//evil.example/",
            "/\\evil.example",
            "\\\\evil.example",
            "evil.example",
            "javascript:alert(1)",
            "/\t/evil.example",
            "/ /evil",
            "",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn state_cookies_are_named_by_their_state() {
        assert_eq!(
            state_cookie_name("abc-DEF_123456789012345"),
            "tether_signin_abcDEF1234567890"
        );
    }
}
