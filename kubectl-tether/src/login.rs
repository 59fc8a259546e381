//! Signing in with the OIDC provider from a terminal: the authorization code flow with PKCE
//! through a loopback redirect (the default, like kubelogin), or the device authorization grant
//! (`--device`); and refreshing a sign-in. The protocol work (discovery, PKCE S256, state,
//! nonce, the token requests, the ID token's signature and claims) is the `openidconnect`
//! crate's; this module only wires it to the terminal, the browser and the cache.

use anyhow::{Context, bail};
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthenticationFlow, CoreClaimName, CoreClaimType, CoreClient,
    CoreClientAuthMethod, CoreDeviceAuthorizationResponse, CoreGrantType, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreJwsSigningAlgorithm,
    CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::{
    AdditionalProviderMetadata, AuthorizationCode, ClientId, CsrfToken, DeviceAuthorizationUrl,
    IdTokenVerifier, IssuerUrl, Nonce, NonceVerifier, OAuth2TokenResponse as _, PkceCodeChallenge,
    ProviderMetadata, RedirectUrl, RefreshToken, Scope, TokenResponse as _, reqwest,
};
use serde::{Deserialize, Serialize};

use crate::cache::{Entry, Provider};
use crate::loopback::{LOGIN_TIMEOUT, Loopback};

/// The client id of the CLI when the gateway does not name one.
pub const DEFAULT_CLIENT_ID: &str = "kubectl-tether";

/// The only signature algorithms an ID token may use, whatever the provider advertises.
pub const ALLOWED_ALGORITHMS: [CoreJwsSigningAlgorithm; 2] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
];

/// The discovery document's field for the device grant, which the core metadata leaves out.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct DeviceEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
}
impl AdditionalProviderMetadata for DeviceEndpoint {}

type Metadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// How `kubectl tether login` asks.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    /// The device authorization grant instead of the loopback redirect.
    pub device: bool,
    /// Try to open a browser (else only print the URL).
    pub open_browser: bool,
    /// Port of the loopback listener; 0 picks one.
    pub listen_port: u16,
    /// Scopes besides `openid`.
    pub scopes: Vec<String>,
}

/// `{issuer}/.well-known/openid-configuration` and the provider's keys.
async fn discover(http: &reqwest::Client, issuer: &str) -> anyhow::Result<Metadata> {
    let url = IssuerUrl::new(issuer.to_owned())
        .with_context(|| format!("the issuer {issuer:?} is not a URL"))?;
    Metadata::discover_async(url, http).await.with_context(|| {
        format!(
            "discovering the provider at {}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        )
    })
}

/// Signs in as `opts` says; the sign-in to cache.
pub async fn login(
    http: &reqwest::Client,
    provider: &Provider,
    opts: &LoginOptions,
) -> anyhow::Result<Entry> {
    let meta = discover(http, &provider.issuer).await?;
    if opts.device {
        device(http, meta, provider, opts).await
    } else {
        loopback(http, meta, provider, opts).await
    }
}

async fn loopback(
    http: &reqwest::Client,
    meta: Metadata,
    provider: &Provider,
    opts: &LoginOptions,
) -> anyhow::Result<Entry> {
    let mut listener = Loopback::bind(opts.listen_port).await?;
    let redirect = RedirectUrl::new(listener.redirect_uri())?;
    let client =
        CoreClient::from_provider_metadata(meta, ClientId::new(provider.client_id.clone()), None)
            .set_redirect_uri(redirect);
    let (challenge, pkce_verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .set_pkce_challenge(challenge);
    for s in &opts.scopes {
        request = request.add_scope(Scope::new(s.clone()));
    }
    let (url, state, nonce) = request.url();
    eprintln!(
        "To sign in to {}, open this URL in a browser:\n\n    {url}\n",
        provider.issuer
    );
    if opts.open_browser && open_browser(url.as_str()) {
        eprintln!("(a browser was asked to open it)");
    }
    eprintln!(
        "Waiting up to 5 min for the browser to come back to {}",
        listener.redirect_uri()
    );
    let mut arrived = listener.wait(state.secret(), LOGIN_TIMEOUT).await?;
    let code = std::mem::take(&mut arrived.code);
    let result = async {
        let token = client
            .exchange_code(AuthorizationCode::new(code))?
            .set_pkce_verifier(pkce_verifier)
            .request_async(http)
            .await
            .context("exchanging the authorization code at the provider")?;
        verified(client.id_token_verifier(), &token, &nonce, provider, None)
    }
    .await;
    arrived
        .answer(result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")))
        .await;
    result
}

async fn device(
    http: &reqwest::Client,
    meta: Metadata,
    provider: &Provider,
    opts: &LoginOptions,
) -> anyhow::Result<Entry> {
    let Some(endpoint) = meta
        .additional_metadata()
        .device_authorization_endpoint
        .clone()
    else {
        bail!(
            "{} offers no device authorization grant (its discovery document has no \
             device_authorization_endpoint): sign in without --device",
            provider.issuer
        );
    };
    let client =
        CoreClient::from_provider_metadata(meta, ClientId::new(provider.client_id.clone()), None)
            .set_device_authorization_url(endpoint);
    // PKCE here too: RFC 8628 does not ask for it, but it binds the polling to this process,
    // and providers that enforce PKCE on a client (Keycloak) refuse the grant without it.
    let (challenge, pkce_verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client
        .exchange_device_code()
        .add_extra_param("code_challenge", challenge.as_str().to_owned())
        .add_extra_param(
            "code_challenge_method",
            challenge.method().as_str().to_owned(),
        );
    for s in &opts.scopes {
        request = request.add_scope(Scope::new(s.clone()));
    }
    let details: CoreDeviceAuthorizationResponse = request
        .request_async(http)
        .await
        .context("asking the provider for a device code")?;
    eprintln!(
        "To sign in to {}, open\n\n    {}\n\nand enter the code {}",
        provider.issuer,
        details.verification_uri().as_str(),
        details.user_code().secret()
    );
    let complete = details.verification_uri_complete().map(|u| u.secret());
    if let Some(c) = complete {
        eprintln!("(or open {c}, which carries the code)");
    }
    if opts.open_browser
        && open_browser(complete.map_or(details.verification_uri().as_str(), |c| c.as_str()))
    {
        eprintln!("(a browser was asked to open it)");
    }
    let expires = details.expires_in().as_secs();
    eprintln!("Waiting up to {} min for the sign-in", expires.div_ceil(60));
    let token = client
        .exchange_device_access_token(&details)?
        .add_extra_param("code_verifier", pkce_verifier.secret().clone())
        .request_async(http, tokio::time::sleep, None)
        .await
        .context("waiting for the sign-in at the provider")?;
    // No nonce in this grant: the token comes straight from the token endpoint.
    verified(
        client.id_token_verifier(),
        &token,
        |_: Option<&Nonce>| Ok(()),
        provider,
        None,
    )
}

/// A new ID token for `entry` from its refresh token.
pub async fn refresh(http: &reqwest::Client, entry: &Entry) -> anyhow::Result<Entry> {
    let Some(refresh) = entry.refresh_token.clone() else {
        bail!("the sign-in has no refresh token");
    };
    let provider = entry.provider();
    let meta = discover(http, &provider.issuer).await?;
    let client =
        CoreClient::from_provider_metadata(meta, ClientId::new(provider.client_id.clone()), None);
    let refresh = RefreshToken::new(refresh);
    let token = client
        .exchange_refresh_token(&refresh)?
        .request_async(http)
        .await
        .context("refreshing the sign-in at the provider")?;
    // A refreshed ID token carries the first one's nonce, if any (OIDC Core §12.2).
    let new = verified(
        client.id_token_verifier(),
        &token,
        |_: Option<&Nonce>| Ok(()),
        &provider,
        Some(entry),
    )?;
    let sub = |jwt: &str| crate::cache::id_token_payload(jwt).and_then(|p| p.get("sub").cloned());
    if sub(&entry.id_token) != sub(&new.id_token) {
        bail!("the refreshed ID token is for another subject");
    }
    Ok(new)
}

/// The verified ID token of a token response, as a cache entry. A response without a new
/// refresh token keeps the previous one.
fn verified(
    verifier: IdTokenVerifier<'_, CoreJsonWebKey>,
    token: &CoreTokenResponse,
    nonce: impl NonceVerifier,
    provider: &Provider,
    previous: Option<&Entry>,
) -> anyhow::Result<Entry> {
    let id_token = token.id_token().context(
        "the provider answered without an ID token (is `openid` in the client's scopes?)",
    )?;
    let verifier = verifier.set_allowed_algs(ALLOWED_ALGORITHMS);
    let claims = id_token
        .claims(&verifier, nonce)
        .context("the provider's ID token did not verify")?;
    Ok(Entry {
        issuer: provider.issuer.clone(),
        client_id: provider.client_id.clone(),
        id_token: id_token.to_string(),
        refresh_token: token
            .refresh_token()
            .map(|r| r.secret().clone())
            .or_else(|| previous.and_then(|p| p.refresh_token.clone())),
        expiry: claims.expiration().timestamp(),
    })
}

/// Asks the desktop to open `url` (`xdg-open`; `open` on macOS); whether it could.
fn open_browser(url: &str) -> bool {
    let program = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    if !found {
        return false;
    }
    match std::process::Command::new(program)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
            true
        }
        Err(_) => false,
    }
}
