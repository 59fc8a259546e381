//! Authentication: who is behind a token.
//!
//! Three kinds of token are accepted, each only when configured: OIDC ID tokens checked against a
//! JWKS (algorithms pinned by configuration, never taken from the token; issuer, audience,
//! expiry and not-before checked), Kubernetes tokens through TokenReview, and static development
//! tokens from a file. A JWT whose unverified `iss` names the OIDC issuer is judged by OIDC alone;
//! anything else goes to TokenReview. Tokens are never logged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

/// An authenticated person (or service account), as RBAC knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub user: String,
    pub groups: Vec<String>,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: log in first")]
    Missing,
    #[error("token rejected: {0}")]
    Invalid(String),
    #[error("cannot verify the token right now: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "no_token",
            AuthError::Invalid(_) => "bad_token",
            AuthError::Unavailable(_) => "authn_unavailable",
        }
    }
}

/// Asks the API server who a Kubernetes token belongs to.
pub trait TokenReviewer: Send + Sync + 'static {
    /// `Ok(None)` when the API server does not accept the token.
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Option<UserInfo>, AuthError>>;
}

/// TokenReview through the gateway's own service account.
#[derive(Clone)]
pub struct KubeTokenReview(pub Client);

impl std::fmt::Debug for KubeTokenReview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeTokenReview")
    }
}

impl TokenReviewer for KubeTokenReview {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Option<UserInfo>, AuthError>> {
        Box::pin(async move {
            let api: Api<TokenReview> = Api::all(self.0.clone());
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_owned()),
                    audiences: None,
                },
                ..Default::default()
            };
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| AuthError::Unavailable(format!("TokenReview failed: {e}")))?;
            let Some(status) = answer.status else {
                return Ok(None);
            };
            if status.authenticated != Some(true) {
                return Ok(None);
            }
            let Some(user) = status.user.and_then(|u| Some((u.username?, u.groups))) else {
                return Ok(None);
            };
            Ok(Some(UserInfo {
                user: user.0,
                groups: user.1.unwrap_or_default(),
            }))
        })
    }
}

/// Where the OIDC provider's keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

/// OIDC verification settings.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub issuer: String,
    pub audience: String,
    /// Only these algorithms are accepted, whatever a token's header says.
    pub algorithms: Vec<Algorithm>,
    pub jwks: JwksSource,
    /// Claim naming the user (`sub` by default).
    pub username_claim: String,
    /// Claim listing the groups (`groups` by default).
    pub groups_claim: String,
    /// Least time between two JWKS fetches caused by unknown `kid`s.
    pub refetch_interval: Duration,
}

struct KeyCache {
    keys: HashMap<String, DecodingKey>,
    /// Keys without a `kid`, tried when a token names none.
    anonymous: Vec<DecodingKey>,
    fetched_at: Option<Instant>,
}

/// Verifies OIDC ID tokens with a cached JWKS.
pub struct Oidc {
    config: OidcConfig,
    cache: RwLock<KeyCache>,
    /// Serializes fetches so a flood of unknown `kid`s causes one fetch, not many.
    fetch_lock: tokio::sync::Mutex<()>,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.config.issuer)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
struct UnverifiedIssuer {
    iss: Option<String>,
}

impl Oidc {
    pub fn new(config: OidcConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            cache: RwLock::new(KeyCache {
                keys: HashMap::new(),
                anonymous: Vec::new(),
                fetched_at: None,
            }),
            fetch_lock: tokio::sync::Mutex::new(()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            metrics,
        }
    }

    /// Whether a token claims to come from this issuer (unverified; only to route it).
    pub fn claims_issuer(&self, token: &str) -> bool {
        unverified_issuer(token).as_deref() == Some(self.config.issuer.as_str())
    }

    async fn fetch(&self) -> Result<JwkSet, AuthError> {
        self.metrics.jwks_fetches.inc();
        let text = match &self.config.jwks {
            JwksSource::File(path) => tokio::fs::read_to_string(path).await.map_err(|e| {
                AuthError::Unavailable(format!("reading JWKS {}: {e}", path.display()))
            })?,
            JwksSource::Url(url) => self
                .http
                .get(url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| AuthError::Unavailable(format!("fetching JWKS: {e}")))?
                .text()
                .await
                .map_err(|e| AuthError::Unavailable(format!("fetching JWKS: {e}")))?,
        };
        serde_json::from_str(&text).map_err(|e| AuthError::Unavailable(format!("bad JWKS: {e}")))
    }

    /// Refetches the JWKS unless it was fetched less than `refetch_interval` ago.
    async fn refresh(&self, force_first: bool) -> Result<(), AuthError> {
        let _guard = self.fetch_lock.lock().await;
        {
            let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = cache.fetched_at
                && (!force_first || at.elapsed() < self.config.refetch_interval)
            {
                return Ok(());
            }
        }
        let set = self.fetch().await;
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        // A failed fetch counts too: it must not be retried by every request.
        cache.fetched_at = Some(Instant::now());
        let set = set?;
        cache.keys.clear();
        cache.anonymous.clear();
        for jwk in &set.keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                tracing::warn!(kid = ?jwk.common.key_id, "skipping a JWK that cannot be used");
                continue;
            };
            match &jwk.common.key_id {
                Some(kid) => {
                    cache.keys.insert(kid.clone(), key);
                }
                None => cache.anonymous.push(key),
            }
        }
        Ok(())
    }

    fn keys_for(&self, kid: Option<&str>) -> Option<Vec<DecodingKey>> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        match kid {
            Some(kid) => cache.keys.get(kid).map(|k| vec![k.clone()]),
            None if cache.anonymous.is_empty() && cache.keys.len() == 1 => {
                Some(cache.keys.values().cloned().collect())
            }
            None if !cache.anonymous.is_empty() => Some(cache.anonymous.clone()),
            None => None,
        }
    }

    /// Verifies an ID token.
    pub async fn verify(&self, token: &str) -> Result<UserInfo, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("not a valid JWT: {e}")))?;
        if !self.config.algorithms.contains(&header.alg) {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        // First use: fetch. Unknown kid: refetch, at most once per interval.
        self.refresh(false).await?;
        let keys = match self.keys_for(header.kid.as_deref()) {
            Some(k) => k,
            None => {
                self.refresh(true).await?;
                self.keys_for(header.kid.as_deref())
                    .ok_or_else(|| AuthError::Invalid("signing key not known".into()))?
            }
        };
        // The header's algorithm is one of the pinned ones (checked above); the key's family
        // must match it, which jsonwebtoken checks against this single-entry list.
        let validation_alg = header.alg;
        let mut validation = Validation::new(validation_alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 30;
        let mut last = None;
        for key in keys {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key,
                &validation,
            ) {
                Ok(data) => return self.user_from_claims(&data.claims),
                Err(e) => last = Some(e),
            }
        }
        Err(AuthError::Invalid(
            last.map(|e| e.to_string())
                .unwrap_or_else(|| "no key".into()),
        ))
    }

    fn user_from_claims(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<UserInfo, AuthError> {
        let user = claims
            .get(&self.config.username_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                AuthError::Invalid(format!("claim {} missing", self.config.username_claim))
            })?;
        let groups = match claims.get(&self.config.groups_claim) {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        Ok(UserInfo {
            user: user.to_owned(),
            groups,
        })
    }
}

fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<UnverifiedIssuer>(&bytes).ok()?.iss
}

/// Development tokens: lines `token,user,group1|group2`.
pub fn parse_dev_tokens(text: &str) -> Result<HashMap<String, UserInfo>, String> {
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, ',');
        let (Some(token), Some(user)) = (parts.next(), parts.next()) else {
            return Err(format!("line {}: expected token,user,groups", n + 1));
        };
        if token.len() < 8 || user.is_empty() {
            return Err(format!(
                "line {}: token must be at least 8 characters and user non-empty",
                n + 1
            ));
        }
        let groups = parts
            .next()
            .unwrap_or("")
            .split('|')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect();
        out.insert(
            token.to_owned(),
            UserInfo {
                user: user.to_owned(),
                groups,
            },
        );
    }
    Ok(out)
}

/// How long an accepted Kubernetes token is remembered, so a page polling `/api/sessions` does
/// not cost a TokenReview per request. Refusals are not cached.
pub const TOKEN_REVIEW_CACHE_TTL: Duration = Duration::from_secs(10);
const TOKEN_REVIEW_CACHE_MAX: usize = 10_000;

/// Every configured way to authenticate.
#[derive(Default)]
pub struct Authenticator {
    pub dev_tokens: Option<HashMap<String, UserInfo>>,
    pub oidc: Option<Oidc>,
    pub token_review: Option<Arc<dyn TokenReviewer>>,
    /// SHA-256 of a token → who TokenReview said it was, and when.
    pub reviewed: std::sync::Mutex<HashMap<[u8; 32], (Instant, UserInfo)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("dev_tokens", &self.dev_tokens.as_ref().map(|d| d.len()))
            .field("oidc", &self.oidc)
            .field("token_review", &self.token_review.is_some())
            .finish()
    }
}

impl Authenticator {
    pub async fn authenticate(&self, token: &str) -> Result<UserInfo, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if let Some(dev) = &self.dev_tokens
            && let Some(u) = dev.get(token)
        {
            return Ok(u.clone());
        }
        if let Some(oidc) = &self.oidc
            && (oidc.claims_issuer(token) || self.token_review.is_none())
        {
            return oidc.verify(token).await;
        }
        if let Some(tr) = &self.token_review {
            use sha2::Digest as _;
            let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
            {
                let cache = self.reviewed.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((at, user)) = cache.get(&key)
                    && at.elapsed() < TOKEN_REVIEW_CACHE_TTL
                {
                    return Ok(user.clone());
                }
            }
            let user = tr
                .review(token)
                .await?
                .ok_or_else(|| AuthError::Invalid("the API server does not accept it".into()))?;
            let mut cache = self.reviewed.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= TOKEN_REVIEW_CACHE_MAX {
                cache.retain(|_, (at, _)| at.elapsed() < TOKEN_REVIEW_CACHE_TTL);
                if cache.len() >= TOKEN_REVIEW_CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(key, (Instant::now(), user.clone()));
            return Ok(user);
        }
        Err(AuthError::Invalid("unknown token".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    impl TokenReviewer for Counting {
        fn review<'a>(
            &'a self,
            token: &'a str,
        ) -> BoxFuture<'a, Result<Option<UserInfo>, AuthError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let answer = (token == "good-k8s-token").then(|| UserInfo {
                user: "system:serviceaccount:a:b".into(),
                groups: vec![],
            });
            Box::pin(async move { Ok(answer) })
        }
    }

    #[tokio::test]
    async fn accepted_kubernetes_tokens_are_reviewed_once_per_ttl_and_refusals_every_time() {
        let reviewer = Arc::new(Counting(AtomicUsize::new(0)));
        let authn = Authenticator {
            token_review: Some(reviewer.clone()),
            ..Default::default()
        };
        for _ in 0..3 {
            assert_eq!(
                authn.authenticate("good-k8s-token").await.unwrap().user,
                "system:serviceaccount:a:b"
            );
        }
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 1);
        for _ in 0..2 {
            assert!(authn.authenticate("bad-k8s-token").await.is_err());
        }
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn dev_token_lines_parse_with_and_without_groups() {
        let m = parse_dev_tokens("# comment\nabcdefgh,alice,devs|ops\n\nijklmnop,bob\n").unwrap();
        assert_eq!(m["abcdefgh"].groups, vec!["devs", "ops"]);
        assert!(m["ijklmnop"].groups.is_empty());
        assert!(parse_dev_tokens("short,alice").is_err());
        assert!(parse_dev_tokens("lonely-token-without-user").is_err());
    }

    #[test]
    fn the_unverified_issuer_is_read_for_routing_only() {
        use base64::Engine as _;
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let t = format!("{}.{}.sig", b("{}"), b(r#"{"iss":"https://idp"}"#));
        assert_eq!(unverified_issuer(&t).as_deref(), Some("https://idp"));
        assert_eq!(unverified_issuer("opaque-token"), None);
    }
}
