//! Which token a command uses: the one given (`--token`, `TETHER_TOKEN`, `TETHER_TOKEN_FILE`),
//! else the cached sign-in for the gateway's provider, refreshed when it expires within
//! [`REFRESH_MARGIN_SECS`](crate::cache::REFRESH_MARGIN_SECS).

use anyhow::{Context, bail};
use openidconnect::reqwest;

use crate::cache::{Cache, Entry, Freshness, Provider, now};
use crate::http::{AuthInfo, auth_info};
use crate::login::{DEFAULT_CLIENT_ID, refresh};

/// The words when there is nothing to sign in with.
pub fn not_signed_in(gateway: &str) -> String {
    format!(
        "not signed in: run `kubectl tether login --gateway {}`",
        crate::cache::gateway_key(gateway)
    )
}

/// The gateway said it has no OIDC sign-in.
#[derive(Debug)]
pub struct NoOidc(pub String);

impl std::fmt::Display for NoOidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the gateway {} does not sign in with OIDC: use a token (--token, --token-file)",
            self.0
        )
    }
}

impl std::error::Error for NoOidc {}

/// Where a provider comes from: flags, else the gateway's `/api/auth`, else what the last
/// `login --gateway` against it remembered.
pub async fn provider_for(
    http: &reqwest::Client,
    cache: &Cache,
    gateway: Option<&str>,
    issuer: Option<&str>,
    client_id: Option<&str>,
) -> anyhow::Result<Provider> {
    if let (Some(i), Some(c)) = (issuer, client_id) {
        return Ok(Provider::new(i, c));
    }
    let Some(gateway) = gateway else {
        match issuer {
            Some(i) => return Ok(Provider::new(i, DEFAULT_CLIENT_ID)),
            None => {
                bail!("say where to sign in: --gateway URL, or --issuer URL and --client-id ID")
            }
        }
    };
    let remembered = cache.gateway_provider(gateway)?;
    match auth_info(http, gateway).await {
        Ok(AuthInfo { oidc: Some(o), .. }) => {
            let issuer = issuer.map(str::to_owned).unwrap_or(o.issuer);
            // The gateway names the CLI's client; else the one a `login --gateway
            // --client-id` used with this issuer.
            let client_id = client_id
                .map(str::to_owned)
                .or(o.cli_client_id)
                .or_else(|| {
                    remembered
                        .filter(|p| p.issuer == issuer)
                        .map(|p| p.client_id)
                });
            match client_id {
                Some(c) => Ok(Provider::new(issuer, c)),
                None => bail!(
                    "the gateway {} names no OIDC client for the command line (its \
                     --oidc-cli-client-id): pass --client-id",
                    crate::cache::gateway_key(gateway)
                ),
            }
        }
        Ok(AuthInfo { oidc: None, .. }) => Err(NoOidc(crate::cache::gateway_key(gateway)).into()),
        // A gateway that cannot say (an older one, or unreachable now): what the last
        // `login --gateway` against it used.
        Err(e) => match remembered {
            Some(p) => Ok(Provider {
                issuer: issuer.map(str::to_owned).unwrap_or(p.issuer),
                client_id: client_id.map(str::to_owned).unwrap_or(p.client_id),
            }),
            None => Err(e),
        },
    }
}

/// How [`SignIn::entry`] came by its sign-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cached,
    Refreshed,
}

/// A cached sign-in, refreshed on use.
#[derive(Debug, Clone)]
pub struct SignIn {
    pub http: reqwest::Client,
    pub cache: Cache,
    pub provider: Provider,
    /// For the words of "not signed in".
    pub gateway: Option<String>,
}

impl SignIn {
    fn not_signed_in(&self) -> anyhow::Error {
        match &self.gateway {
            Some(g) => anyhow::anyhow!(not_signed_in(g)),
            None => anyhow::anyhow!(
                "not signed in to {} as {}: run `kubectl tether login --issuer {} --client-id {}`",
                self.provider.issuer,
                self.provider.client_id,
                self.provider.issuer,
                self.provider.client_id
            ),
        }
    }

    /// A usable sign-in, refreshed (and stored again) when it expires within the margin.
    pub async fn entry(&self) -> anyhow::Result<(Entry, Source)> {
        let Some(entry) = self.cache.load(&self.provider)? else {
            return Err(self.not_signed_in());
        };
        let t = now();
        match entry.freshness(t) {
            Freshness::Fresh => Ok((entry, Source::Cached)),
            Freshness::Stale => Err(self.not_signed_in()),
            Freshness::Refresh => match refresh(&self.http, &entry).await {
                Ok(new) => {
                    self.cache
                        .store(&new)
                        .context("keeping the refreshed sign-in")?;
                    Ok((new, Source::Refreshed))
                }
                // Still good for a little while: use it, and say why it was not renewed.
                Err(e) if entry.valid_for(t, 5) => {
                    eprintln!("kubectl-tether: could not refresh the sign-in: {e:#}");
                    Ok((entry, Source::Cached))
                }
                Err(e) => {
                    eprintln!("kubectl-tether: could not refresh the sign-in: {e:#}");
                    Err(self.not_signed_in())
                }
            },
        }
    }
}

/// The token of an attach, asked again for every (re)connection.
#[derive(Debug, Clone)]
pub enum Credentials {
    Fixed(String),
    SignIn(SignIn),
}

impl Credentials {
    pub fn is_sign_in(&self) -> bool {
        matches!(self, Credentials::SignIn(_))
    }

    pub async fn token(&self) -> anyhow::Result<String> {
        match self {
            Credentials::Fixed(t) => Ok(t.clone()),
            Credentials::SignIn(s) => Ok(s.entry().await?.0.id_token),
        }
    }
}
