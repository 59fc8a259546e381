//! Authentication: who is behind a token.
//!
//! Three kinds of token are accepted, each only when configured: OIDC ID tokens checked against a
//! JWKS (algorithms pinned by configuration, never taken from the token; issuer, audience,
//! expiry and not-before checked), Kubernetes tokens through TokenReview with the gateway's own
//! audience, and static development tokens from a file. A JWT whose unverified `iss` names the
//! OIDC issuer is judged by OIDC alone; anything else goes to TokenReview. Tokens are never
//! logged.
//!
//! An ID token's claims become a Kubernetes identity exactly as kube-apiserver's OIDC
//! authenticator maps them ([`map_identity`]): the username claim, prefixed with the issuer URL
//! and `#` unless the claim is `email` or a prefix is configured (`-` for none); the groups
//! claim (a string or a list of strings), each prefixed with the groups prefix. An identity
//! that maps to a `system:` user or group is refused: those names belong to Kubernetes itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

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

/// How a person proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// An OIDC ID token, or a browser sign-in with the provider.
    Oidc,
    /// A Kubernetes token, through TokenReview.
    Kubernetes,
    /// A development token from `--dev-token-file`.
    Development,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Oidc => "oidc",
            Via::Kubernetes => "kubernetes",
            Via::Development => "development",
        }
    }
}

/// A bearer token that was accepted: who, how, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub user: UserInfo,
    pub via: Via,
    /// When the token stops being valid (its `exp`), when it has one.
    pub expires_at: Option<SystemTime>,
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
    #[error("too many unknown tokens are being presented: try again in a few seconds")]
    Throttled,
}

impl AuthError {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "no_token",
            AuthError::Invalid(_) => "bad_token",
            AuthError::Unavailable(_) => "authn_unavailable",
            AuthError::Throttled => "authn_throttled",
        }
    }
}

/// Asks the API server who a Kubernetes token belongs to.
pub trait TokenReviewer: Send + Sync + 'static {
    /// `Ok(None)` when the API server does not accept the token for any of `audiences` (an empty
    /// list means the API server's own audiences).
    fn review<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Option<UserInfo>, AuthError>>;
}

/// The audience Kubernetes tokens must name by default (`kubectl create token --audience tether`).
pub const DEFAULT_TOKEN_AUDIENCE: &str = "tether";

/// TokenReview through the gateway's own service account.
#[derive(Clone)]
pub struct KubeTokenReview(pub Client);

impl std::fmt::Debug for KubeTokenReview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeTokenReview")
    }
}

impl TokenReviewer for KubeTokenReview {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Option<UserInfo>, AuthError>> {
        Box::pin(async move {
            let api: Api<TokenReview> = Api::all(self.0.clone());
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_owned()),
                    audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
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
            // The API server answers with the audiences the token is valid for, among those asked.
            if !audiences.is_empty()
                && !status
                    .audiences
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .any(|a| audiences.contains(a))
            {
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
    /// The `jwks_uri` of `{issuer}/.well-known/openid-configuration`.
    Discovery,
}

/// OIDC verification settings.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub issuer: String,
    /// Accepted `aud` values: a token naming any of them is accepted.
    pub audiences: Vec<String>,
    /// Only these algorithms are accepted, whatever a token's header says.
    pub algorithms: Vec<Algorithm>,
    pub jwks: JwksSource,
    pub mapping: IdentityMapping,
    /// Least time between two JWKS fetches caused by unknown `kid`s.
    pub refetch_interval: Duration,
}

/// How claims become a Kubernetes identity: kube-apiserver's `--oidc-username-claim`,
/// `--oidc-username-prefix`, `--oidc-groups-claim`, `--oidc-groups-prefix` and
/// `--oidc-required-claim`, with the same defaults and meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityMapping {
    /// Claim naming the user (`sub` by default).
    pub username_claim: String,
    /// `None`: the issuer URL and `#`, unless the claim is `email`. `Some("-")`: no prefix.
    pub username_prefix: Option<String>,
    /// Claim holding the groups, a string or a list of strings; `None`: no groups.
    pub groups_claim: Option<String>,
    /// Prepended to every group.
    pub groups_prefix: String,
    /// Claims that must be present with exactly these string values.
    pub required_claims: Vec<(String, String)>,
}

impl Default for IdentityMapping {
    fn default() -> Self {
        Self {
            username_claim: "sub".into(),
            username_prefix: None,
            groups_claim: None,
            groups_prefix: String::new(),
            required_claims: Vec::new(),
        }
    }
}

/// The `system:` prefix Kubernetes reserves for its own users and groups.
pub const RESERVED_PREFIX: &str = "system:";

/// Maps verified ID-token claims to a Kubernetes identity as kube-apiserver would, then refuses
/// reserved (`system:`) names.
pub fn map_identity(
    issuer: &str,
    mapping: &IdentityMapping,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<UserInfo, AuthError> {
    use serde_json::Value;
    for (claim, want) in &mapping.required_claims {
        if claims.get(claim).and_then(Value::as_str) != Some(want.as_str()) {
            return Err(AuthError::Invalid(format!(
                "the required claim {claim}={want} is missing"
            )));
        }
    }
    let claim = &mapping.username_claim;
    let name = match claims.get(claim) {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        Some(Value::String(_)) | None => {
            return Err(AuthError::Invalid(format!(
                "the username claim {claim} is missing or empty"
            )));
        }
        Some(_) => {
            return Err(AuthError::Invalid(format!(
                "the username claim {claim} is not a string"
            )));
        }
    };
    if claim == "email" {
        // As kube-apiserver: an email that the provider says is unverified names nobody.
        match claims.get("email_verified") {
            None | Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => {
                return Err(AuthError::Invalid(
                    "the email address is not verified (email_verified is false)".into(),
                ));
            }
            Some(_) => {
                return Err(AuthError::Invalid(
                    "the claim email_verified is not a boolean".into(),
                ));
            }
        }
    }
    // As kube-apiserver: an empty prefix is the same as none given.
    let user = match mapping.username_prefix.as_deref().filter(|p| !p.is_empty()) {
        Some("-") => name.to_owned(),
        Some(prefix) => format!("{prefix}{name}"),
        None if claim == "email" => name.to_owned(),
        None => format!("{issuer}#{name}"),
    };
    let raw_groups: Vec<String> = match mapping.groups_claim.as_ref().map(|c| (c, claims.get(c))) {
        None | Some((_, None)) | Some((_, Some(Value::Null))) => Vec::new(),
        Some((_, Some(Value::String(g)))) => vec![g.clone()],
        Some((c, Some(Value::Array(list)))) => list
            .iter()
            .map(|g| {
                g.as_str().map(str::to_owned).ok_or_else(|| {
                    AuthError::Invalid(format!("the groups claim {c} holds a non-string"))
                })
            })
            .collect::<Result<_, _>>()?,
        Some((c, Some(_))) => {
            return Err(AuthError::Invalid(format!(
                "the groups claim {c} is neither a string nor a list of strings"
            )));
        }
    };
    let groups: Vec<String> = raw_groups
        .iter()
        .map(|g| format!("{}{g}", mapping.groups_prefix))
        .collect();
    if user.starts_with(RESERVED_PREFIX) {
        return Err(AuthError::Invalid(format!(
            "the token maps to the user {user:?}; names beginning with system: are reserved for \
             Kubernetes and never accepted from an identity provider"
        )));
    }
    if let Some(g) = groups.iter().find(|g| g.starts_with(RESERVED_PREFIX)) {
        return Err(AuthError::Invalid(format!(
            "the token maps to the group {g:?}; names beginning with system: are reserved for \
             Kubernetes and never accepted from an identity provider"
        )));
    }
    Ok(UserInfo { user, groups })
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
            JwksSource::Discovery => {
                let url = self.discover_jwks_uri().await?;
                self.get_text(&url).await?
            }
            JwksSource::Url(url) => self.get_text(url).await?,
        };
        serde_json::from_str(&text).map_err(|e| AuthError::Unavailable(format!("bad JWKS: {e}")))
    }

    async fn get_text(&self, url: &str) -> Result<String, AuthError> {
        self.http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| AuthError::Unavailable(format!("fetching {url}: {e}")))?
            .text()
            .await
            .map_err(|e| AuthError::Unavailable(format!("fetching {url}: {e}")))
    }

    /// The provider's `jwks_uri`, from a discovery document whose `issuer` is exactly ours.
    async fn discover_jwks_uri(&self) -> Result<String, AuthError> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer.trim_end_matches('/')
        );
        let doc: Discovery = serde_json::from_str(&self.get_text(&url).await?)
            .map_err(|e| AuthError::Unavailable(format!("bad discovery document {url}: {e}")))?;
        if doc.issuer != self.config.issuer {
            return Err(AuthError::Unavailable(format!(
                "the discovery document names the issuer {:?}, not {:?}",
                doc.issuer, self.config.issuer
            )));
        }
        Ok(doc.jwks_uri)
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

    /// Verifies an ID token and maps it to an identity.
    pub async fn verify(&self, token: &str) -> Result<Credential, AuthError> {
        self.verify_claims(token).await.map(|(c, _)| c)
    }

    /// Verifies an ID token; the identity and the verified claims (for `nonce`).
    pub async fn verify_claims(
        &self,
        token: &str,
    ) -> Result<(Credential, serde_json::Map<String, serde_json::Value>), AuthError> {
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
        validation.set_audience(&self.config.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // A little clock skew, no more: a live connection ends at `exp` itself.
        validation.leeway = 5;
        let mut last = None;
        for key in keys {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key,
                &validation,
            ) {
                Ok(data) => {
                    let user =
                        map_identity(&self.config.issuer, &self.config.mapping, &data.claims)?;
                    let expires_at = data
                        .claims
                        .get("exp")
                        .and_then(serde_json::Value::as_u64)
                        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
                    let credential = Credential {
                        user,
                        via: Via::Oidc,
                        expires_at,
                    };
                    return Ok((credential, data.claims));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(AuthError::Invalid(
            last.map(|e| e.to_string())
                .unwrap_or_else(|| "no key".into()),
        ))
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }
}

/// A JWT's payload, decoded but not verified: only to route a token, or to read the `exp` of
/// one the API server has accepted.
fn unverified_payload<T: serde::de::DeserializeOwned>(token: &str) -> Option<T> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn unverified_issuer(token: &str) -> Option<String> {
    unverified_payload::<UnverifiedIssuer>(token)?.iss
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
/// not cost a TokenReview per request.
pub const TOKEN_REVIEW_CACHE_TTL: Duration = Duration::from_secs(10);
/// How long a refused token is remembered: the same bad token again costs no TokenReview.
pub const TOKEN_REFUSAL_CACHE_TTL: Duration = Duration::from_secs(10);
const TOKEN_REVIEW_CACHE_MAX: u64 = 10_000;

/// How Kubernetes tokens are reviewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReviewPolicy {
    /// Audiences the token must be valid for (`--token-audience`, `tether` by default).
    pub audiences: Vec<String>,
    /// Also accept tokens for the API server's own audiences: full API credentials, off by
    /// default (`--accept-api-server-tokens`).
    pub accept_api_audience: bool,
    /// TokenReviews per second for tokens not in the caches, burst twice that.
    pub rate: u32,
}

impl Default for TokenReviewPolicy {
    fn default() -> Self {
        Self {
            audiences: vec![DEFAULT_TOKEN_AUDIENCE.into()],
            accept_api_audience: false,
            rate: 20,
        }
    }
}

type Digest = [u8; 32];

fn digest(token: &str) -> Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// A bounded map of token digests with an age limit; the least recently used go first.
type TtlCache<V> = moka::sync::Cache<Digest, V>;

fn ttl_cache<V: Clone + Send + Sync + 'static>(ttl: Duration) -> TtlCache<V> {
    moka::sync::Cache::builder()
        .max_capacity(TOKEN_REVIEW_CACHE_MAX)
        .time_to_live(ttl)
        .build()
}

/// Every configured way to authenticate.
pub struct Authenticator {
    pub dev_tokens: Option<HashMap<String, UserInfo>>,
    pub oidc: Option<Oidc>,
    pub token_review: Option<Arc<dyn TokenReviewer>>,
    pub policy: TokenReviewPolicy,
    /// Token digest → who TokenReview said it was.
    reviewed: TtlCache<Credential>,
    /// Token digest → why it was refused.
    refused: TtlCache<String>,
    /// Bounds TokenReviews of tokens in neither cache, whatever their source.
    review_rate: governor::DefaultDirectRateLimiter,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("dev_tokens", &self.dev_tokens.as_ref().map(|d| d.len()))
            .field("oidc", &self.oidc)
            .field("token_review", &self.token_review.is_some())
            .field("policy", &self.policy)
            .finish()
    }
}

impl Default for Authenticator {
    fn default() -> Self {
        Self::new(None, None, None, TokenReviewPolicy::default())
    }
}

/// The `exp` of a JWT, read without verification: only for a token the API server accepted.
fn unverified_expiry(token: &str) -> Option<SystemTime> {
    #[derive(Deserialize)]
    struct Exp {
        exp: Option<u64>,
    }
    let exp = unverified_payload::<Exp>(token)?.exp?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
}

impl Authenticator {
    pub fn new(
        dev_tokens: Option<HashMap<String, UserInfo>>,
        oidc: Option<Oidc>,
        token_review: Option<Arc<dyn TokenReviewer>>,
        policy: TokenReviewPolicy,
    ) -> Self {
        let rate =
            std::num::NonZeroU32::new(policy.rate.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).unwrap_or(rate));
        Self {
            dev_tokens,
            oidc,
            token_review,
            policy,
            reviewed: ttl_cache(TOKEN_REVIEW_CACHE_TTL),
            refused: ttl_cache(TOKEN_REFUSAL_CACHE_TTL),
            review_rate: governor::RateLimiter::direct(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
        }
    }

    /// Who is behind a bearer token: an ID token, a Kubernetes token or a development token.
    pub async fn authenticate(&self, token: &str) -> Result<Credential, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if let Some(dev) = &self.dev_tokens
            && let Some(u) = dev.get(token)
        {
            return Ok(Credential {
                user: u.clone(),
                via: Via::Development,
                expires_at: None,
            });
        }
        if let Some(oidc) = &self.oidc
            && (oidc.claims_issuer(token) || self.token_review.is_none())
        {
            return oidc.verify(token).await;
        }
        let Some(tr) = &self.token_review else {
            return Err(AuthError::Invalid("unknown token".into()));
        };
        let key = digest(token);
        if let Some(c) = self.reviewed.get(&key) {
            return Ok(c);
        }
        if let Some(why) = self.refused.get(&key) {
            return Err(AuthError::Invalid(why));
        }
        // A flood of made-up tokens must not become a flood of TokenReviews.
        if self.review_rate.check().is_err() {
            return Err(AuthError::Throttled);
        }
        let mut user = tr.review(token, &self.policy.audiences).await?;
        if user.is_none() && self.policy.accept_api_audience {
            user = tr.review(token, &[]).await?;
        }
        let Some(user) = user else {
            let why = if self.policy.accept_api_audience {
                "the API server does not accept it".to_owned()
            } else {
                format!(
                    "the API server does not accept it for the audience {} (a token for the API \
                     server itself is a full API credential and is not accepted: use `kubectl \
                     create token --audience {}`)",
                    self.policy.audiences.join(","),
                    self.policy
                        .audiences
                        .first()
                        .map(String::as_str)
                        .unwrap_or(DEFAULT_TOKEN_AUDIENCE)
                )
            };
            self.refused.insert(key, why.clone());
            return Err(AuthError::Invalid(why));
        };
        let credential = Credential {
            user,
            via: Via::Kubernetes,
            expires_at: unverified_expiry(token),
        };
        self.reviewed.insert(key, credential.clone());
        Ok(credential)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Accepts `good-k8s-token` for the audience `tether` and `api-token` only for the API
    /// server's own audiences (an empty list), and counts the reviews.
    struct Counting(AtomicUsize);

    impl TokenReviewer for Counting {
        fn review<'a>(
            &'a self,
            token: &'a str,
            audiences: &'a [String],
        ) -> BoxFuture<'a, Result<Option<UserInfo>, AuthError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let ok = match token {
                "good-k8s-token" => audiences.iter().any(|a| a == "tether"),
                "api-token" => audiences.is_empty(),
                _ => false,
            };
            let answer = ok.then(|| UserInfo {
                user: "system:serviceaccount:a:b".into(),
                groups: vec![],
            });
            Box::pin(async move { Ok(answer) })
        }
    }

    fn reviewing(policy: TokenReviewPolicy) -> (Arc<Counting>, Authenticator) {
        let reviewer = Arc::new(Counting(AtomicUsize::new(0)));
        let authn = Authenticator::new(None, None, Some(reviewer.clone()), policy);
        (reviewer, authn)
    }

    #[tokio::test]
    async fn kubernetes_tokens_are_reviewed_once_per_ttl_and_so_are_refusals() {
        let (reviewer, authn) = reviewing(TokenReviewPolicy::default());
        for _ in 0..3 {
            let c = authn.authenticate("good-k8s-token").await.unwrap();
            assert_eq!(c.user.user, "system:serviceaccount:a:b");
            assert_eq!(c.via, Via::Kubernetes);
        }
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 1);
        for _ in 0..5 {
            assert!(authn.authenticate("bad-k8s-token").await.is_err());
        }
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 2, "a refusal is cached");
    }

    #[tokio::test]
    async fn an_api_server_token_is_refused_unless_allowed() {
        let (_, authn) = reviewing(TokenReviewPolicy::default());
        let e = authn.authenticate("api-token").await.unwrap_err();
        assert!(e.to_string().contains("--audience tether"), "{e}");
        let (_, authn) = reviewing(TokenReviewPolicy {
            accept_api_audience: true,
            ..Default::default()
        });
        assert!(authn.authenticate("api-token").await.is_ok());
    }

    #[tokio::test]
    async fn a_flood_of_unknown_tokens_is_throttled_not_reviewed() {
        let (reviewer, authn) = reviewing(TokenReviewPolicy {
            rate: 5,
            ..Default::default()
        });
        let mut throttled = 0;
        for i in 0..200 {
            if let Err(AuthError::Throttled) = authn.authenticate(&format!("random-{i}")).await {
                throttled += 1;
            }
        }
        let reviews = reviewer.0.load(Ordering::SeqCst);
        assert!(
            reviews <= 11,
            "{reviews} TokenReviews for 200 random tokens"
        );
        assert_eq!(throttled + reviews, 200);
    }

    fn claims(json: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        json.as_object().unwrap().clone()
    }

    const ISS: &str = "https://idp.example/realms/t";

    #[test]
    fn usernames_are_prefixed_with_the_issuer_unless_they_are_emails() {
        let m = IdentityMapping::default();
        let u = map_identity(ISS, &m, &claims(serde_json::json!({"sub": "alice"}))).unwrap();
        assert_eq!(u.user, "https://idp.example/realms/t#alice");
        let email = IdentityMapping {
            username_claim: "email".into(),
            ..Default::default()
        };
        let c = claims(serde_json::json!({"email": "a@x.test", "email_verified": true}));
        assert_eq!(map_identity(ISS, &email, &c).unwrap().user, "a@x.test");
        let c = claims(serde_json::json!({"email": "a@x.test", "email_verified": false}));
        assert!(map_identity(ISS, &email, &c).is_err());
        let c = claims(serde_json::json!({"email": "a@x.test"}));
        assert_eq!(map_identity(ISS, &email, &c).unwrap().user, "a@x.test");
        let none = IdentityMapping {
            username_prefix: Some("-".into()),
            ..Default::default()
        };
        let c = claims(serde_json::json!({"sub": "alice"}));
        assert_eq!(map_identity(ISS, &none, &c).unwrap().user, "alice");
        let empty = IdentityMapping {
            username_prefix: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(
            map_identity(ISS, &empty, &c).unwrap().user,
            format!("{ISS}#alice"),
            "an empty prefix is no prefix given, as for kube-apiserver"
        );
        let oidc = IdentityMapping {
            username_prefix: Some("oidc:".into()),
            ..Default::default()
        };
        assert_eq!(map_identity(ISS, &oidc, &c).unwrap().user, "oidc:alice");
    }

    #[test]
    fn groups_are_a_string_or_a_list_and_get_the_prefix() {
        let m = IdentityMapping {
            groups_claim: Some("groups".into()),
            groups_prefix: "oidc:".into(),
            ..Default::default()
        };
        let c = claims(serde_json::json!({"sub": "a", "groups": ["devs", "ops"]}));
        assert_eq!(
            map_identity(ISS, &m, &c).unwrap().groups,
            ["oidc:devs", "oidc:ops"]
        );
        let c = claims(serde_json::json!({"sub": "a", "groups": "devs"}));
        assert_eq!(map_identity(ISS, &m, &c).unwrap().groups, ["oidc:devs"]);
        let c = claims(serde_json::json!({"sub": "a", "groups": [1]}));
        assert!(map_identity(ISS, &m, &c).is_err());
        let c = claims(serde_json::json!({"sub": "a", "groups": {"x": 1}}));
        assert!(map_identity(ISS, &m, &c).is_err());
        let c = claims(serde_json::json!({"sub": "a", "groups": null}));
        assert!(map_identity(ISS, &m, &c).unwrap().groups.is_empty());
        let no_claim = IdentityMapping {
            groups_claim: None,
            ..Default::default()
        };
        let c = claims(serde_json::json!({"sub": "a", "groups": ["devs"]}));
        assert!(map_identity(ISS, &no_claim, &c).unwrap().groups.is_empty());
    }

    #[test]
    fn reserved_names_are_refused_with_words() {
        let bare = IdentityMapping {
            username_prefix: Some("-".into()),
            groups_claim: Some("groups".into()),
            ..Default::default()
        };
        for c in [
            serde_json::json!({"sub": "system:admin"}),
            serde_json::json!({"sub": "system:serviceaccount:default:default"}),
            serde_json::json!({"sub": "a", "groups": ["system:masters"]}),
            serde_json::json!({"sub": "a", "groups": "system:masters"}),
        ] {
            let e = map_identity(ISS, &bare, &claims(c.clone())).unwrap_err();
            assert!(
                e.to_string().contains("reserved for Kubernetes"),
                "{c}: {e}"
            );
        }
        // With a groups prefix, the same group is harmless, as it is to kube-apiserver.
        let prefixed = IdentityMapping {
            groups_claim: Some("groups".into()),
            groups_prefix: "oidc:".into(),
            ..Default::default()
        };
        let c = claims(serde_json::json!({"sub": "system:admin", "groups": ["system:masters"]}));
        let u = map_identity(ISS, &prefixed, &c).unwrap();
        assert_eq!(u.user, format!("{ISS}#system:admin"));
        assert_eq!(u.groups, ["oidc:system:masters"]);
    }

    #[test]
    fn required_claims_and_the_username_claim_must_be_present() {
        let m = IdentityMapping {
            required_claims: vec![("hd".into(), "example.com".into())],
            ..Default::default()
        };
        assert!(map_identity(ISS, &m, &claims(serde_json::json!({"sub": "a"}))).is_err());
        let c = claims(serde_json::json!({"sub": "a", "hd": "example.com"}));
        assert!(map_identity(ISS, &m, &c).is_ok());
        let d = IdentityMapping::default();
        assert!(map_identity(ISS, &d, &claims(serde_json::json!({"sub": ""}))).is_err());
        assert!(map_identity(ISS, &d, &claims(serde_json::json!({"sub": 7}))).is_err());
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
