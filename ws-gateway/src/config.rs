//! Command-line flags (each also an environment variable) and the checked configuration.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use jsonwebtoken::Algorithm;
use tether_protocol::ticket::Signer;

use crate::authn::{
    IdentityMapping, JwksSource, OidcConfig, TokenReviewPolicy, UserInfo, parse_dev_tokens,
};
use crate::signin::SignInConfig;
use crate::{Error, Result};

fn duration(s: &str) -> Result<Duration, String> {
    // Plain numbers are seconds; otherwise humantime ("500ms", "2m").
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither a CIDR (10.0.0.0/8) nor an address"))
}

/// The Tether gateway: browser terminals for TerminalSessions, authorized by Kubernetes RBAC.
#[derive(Debug, Clone, Parser)]
#[command(name = "tether-gateway", version)]
pub struct Args {
    /// Address to listen on (plain HTTP; terminate TLS in front, or use --insecure-cookies on localhost).
    #[arg(long, env = "TETHER_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Address of the admin listener: `/metrics`, `/healthz`, `/readyz`. All interfaces by
    /// default, so that kubelet probes and Prometheus reach it on the pod IP; it is a port of
    /// its own that the Service for users and the Ingress do not route.
    #[arg(long, env = "TETHER_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// Proxies (CIDRs, or single addresses) whose `X-Forwarded-For` is believed: when the TCP
    /// peer is one of them, the client is the rightmost address in the header that is not. From
    /// any other peer the header is ignored. Default: none.
    #[arg(
        long = "trusted-proxies",
        env = "TETHER_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_parser = cidr
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// An Origin allowed to open WebSockets and post to the API, matched exactly (repeatable).
    #[arg(
        long = "allowed-origin",
        env = "TETHER_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// OIDC issuer (`iss`) of accepted ID tokens, exactly; also where browser sign-in and
    /// `kubectl tether login` discover the provider (`{issuer}/.well-known/openid-configuration`).
    #[arg(long, env = "TETHER_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// Accepted `aud` values of ID tokens (repeatable): the gateway's client ID, and the CLI's
    /// if it has its own. Like kube-apiserver's `--oidc-client-id`.
    #[arg(
        long = "oidc-audience",
        env = "TETHER_OIDC_AUDIENCE",
        value_delimiter = ','
    )]
    pub oidc_audiences: Vec<String>,
    /// JWKS of the OIDC provider, from a file (default: the `jwks_uri` of discovery).
    #[arg(long, env = "TETHER_OIDC_JWKS_FILE", conflicts_with = "oidc_jwks_url")]
    pub oidc_jwks_file: Option<PathBuf>,
    /// JWKS of the OIDC provider, from a URL (default: the `jwks_uri` of discovery).
    #[arg(long, env = "TETHER_OIDC_JWKS_URL")]
    pub oidc_jwks_url: Option<String>,
    /// Accepted signature algorithms; a token naming another is refused.
    #[arg(
        long,
        env = "TETHER_OIDC_ALGORITHMS",
        value_delimiter = ',',
        default_value = "RS256,ES256"
    )]
    pub oidc_algorithms: Vec<String>,
    /// Claim naming the user, as kube-apiserver's `--oidc-username-claim`.
    #[arg(long, env = "TETHER_OIDC_USERNAME_CLAIM", default_value = "sub")]
    pub oidc_username_claim: String,
    /// Prepended to every username, as kube-apiserver's `--oidc-username-prefix`. Unset or
    /// empty: the issuer URL and `#`, unless the claim is `email`. `-`: no prefix.
    #[arg(long, env = "TETHER_OIDC_USERNAME_PREFIX")]
    pub oidc_username_prefix: Option<String>,
    /// Claim holding the groups (a string or a list of strings), as kube-apiserver's
    /// `--oidc-groups-claim`; unset (its default too): no groups. Usually `groups`.
    #[arg(long, env = "TETHER_OIDC_GROUPS_CLAIM", default_value = "")]
    pub oidc_groups_claim: String,
    /// Prepended to every group, as kube-apiserver's `--oidc-groups-prefix` (default none).
    #[arg(long, env = "TETHER_OIDC_GROUPS_PREFIX", default_value = "")]
    pub oidc_groups_prefix: String,
    /// `claim=value` that every ID token must carry (repeatable), as kube-apiserver's
    /// `--oidc-required-claim`.
    #[arg(
        long = "oidc-required-claim",
        env = "TETHER_OIDC_REQUIRED_CLAIMS",
        value_delimiter = ','
    )]
    pub oidc_required_claims: Vec<String>,
    /// Least time between JWKS refetches caused by unknown key IDs.
    #[arg(long, env = "TETHER_OIDC_REFETCH_INTERVAL", default_value = "30s", value_parser = duration)]
    pub oidc_refetch_interval: Duration,
    /// Client ID of the gateway for browser sign-in (default: the first `--oidc-audience`).
    #[arg(long, env = "TETHER_OIDC_CLIENT_ID")]
    pub oidc_client_id: Option<String>,
    /// File holding the gateway's client secret (a confidential client); without it the gateway
    /// signs in as a public client with PKCE only.
    #[arg(long, env = "TETHER_OIDC_CLIENT_SECRET_FILE")]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// Scopes asked for at sign-in (`openid` is always asked).
    #[arg(
        long,
        env = "TETHER_OIDC_SCOPES",
        value_delimiter = ',',
        default_value = "openid,email,profile"
    )]
    pub oidc_scopes: Vec<String>,
    /// Public client ID that `kubectl tether login` should use, advertised at `/api/auth`
    /// (must be one of the `--oidc-audience`s).
    #[arg(long, env = "TETHER_OIDC_CLI_CLIENT_ID")]
    pub oidc_cli_client_id: Option<String>,
    /// The URL browsers reach the gateway at (e.g. `https://tether.example.com`): the sign-in
    /// callback is `{url}/auth/callback`. Browser sign-in is on when this and `--oidc-issuer`
    /// are set.
    #[arg(long, env = "TETHER_EXTERNAL_URL")]
    pub external_url: Option<String>,
    /// File of at least 32 random bytes from which the cookie encryption key is derived; every
    /// replica needs the same one. Without it a random key is made (sign-ins then last only as
    /// long as this process and work on this replica only).
    #[arg(long, env = "TETHER_SESSION_KEY_FILE")]
    pub session_key_file: Option<PathBuf>,
    /// Longest a browser sign-in lasts, refreshes included.
    #[arg(long, env = "TETHER_SESSION_MAX_LIFETIME", default_value = "12h", value_parser = duration)]
    pub session_max_lifetime: Duration,
    /// Where browser sessions are kept: `kubernetes` (Secrets in `--session-namespace`, shared
    /// by every replica) or `memory` (this process only).
    #[arg(long, env = "TETHER_SESSION_STORE", default_value = "kubernetes")]
    pub session_store: String,
    /// Namespace of the browser-session Secrets (the gateway's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub session_namespace: String,
    /// Audience Kubernetes tokens must be issued for (repeatable): `kubectl create token
    /// --audience tether SA`.
    #[arg(
        long = "token-audience",
        env = "TETHER_TOKEN_AUDIENCES",
        value_delimiter = ',',
        default_value = "tether"
    )]
    pub token_audiences: Vec<String>,
    /// Also accept Kubernetes tokens issued for the API server itself. They are full API
    /// credentials that any service handed one could replay: off by default.
    #[arg(long, env = "TETHER_ACCEPT_API_SERVER_TOKENS")]
    pub accept_api_server_tokens: bool,
    /// TokenReviews per second for tokens not seen recently (bursts of twice that); beyond it
    /// unknown tokens get 503 "try again". Accepted and refused tokens are cached for 10 s.
    #[arg(long, env = "TETHER_TOKEN_REVIEW_RATE", default_value_t = 20)]
    pub token_review_rate: u32,
    /// Development only: a file of `token,user,group1|group2` lines accepted as they are.
    #[arg(long, env = "TETHER_DEV_TOKEN_FILE")]
    pub dev_token_file: Option<PathBuf>,
    /// Ed25519 private key (PKCS#8 PEM) that signs the agents' attach tickets.
    #[arg(long, env = "TETHER_TICKET_SIGNING_KEY_FILE")]
    pub ticket_signing_key_file: PathBuf,
    /// Largest WebSocket message a client may send, in bytes.
    #[arg(long, env = "TETHER_MAX_FRAME_BYTES", default_value_t = tether_protocol::MAX_CLIENT_FRAME)]
    pub max_frame_bytes: usize,
    /// Open terminal connections per user.
    #[arg(long, env = "TETHER_MAX_CONNECTIONS_PER_USER", default_value_t = 16)]
    pub max_connections_per_user: usize,
    /// WebSocket handshakes (and sign-in starts, status checks) per second per client address
    /// before authentication, and per user after (bursts of twice that).
    #[arg(long, env = "TETHER_HANDSHAKE_RATE", default_value_t = 20)]
    pub handshake_rate: u32,
    /// Time for a client to send its request headers, and then its first frame.
    #[arg(long, env = "TETHER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,
    /// Longest the agent may take to answer the dial (TCP and WebSocket handshake) and to take
    /// each message written to it; an agent slower than that is given up (`502` before the
    /// upgrade, `4500` after). Revocation and shutdown never wait for it.
    #[arg(long, env = "TETHER_AGENT_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub agent_timeout: Duration,
    /// A connection from which nothing (not even a pong) arrives for this long is closed.
    #[arg(long, env = "TETHER_IDLE_TIMEOUT", default_value = "90s", value_parser = duration)]
    pub idle_timeout: Duration,
    /// Audit log: a path to append JSON lines to, or `-` for stdout.
    #[arg(long, env = "TETHER_AUDIT_LOG")]
    pub audit_log: Option<String>,
    /// Cookies without `Secure`, for plain-HTTP development on localhost only.
    #[arg(long, env = "TETHER_INSECURE_COOKIES")]
    pub insecure_cookies: bool,
    /// How long an RBAC decision is cached.
    #[arg(long, env = "TETHER_AUTHZ_CACHE_TTL", default_value = "10s", value_parser = duration)]
    pub authz_cache_ttl: Duration,
    /// How often an open connection's RBAC decision is checked again; a denial closes it with
    /// 4411 "access revoked". `0s` checks only at the upgrade.
    #[arg(long, env = "TETHER_REAUTHORIZE_EVERY", default_value = "30s", value_parser = duration)]
    pub reauthorize_every: Duration,
    /// This gateway's pod (the downward API's `metadata.name`). With it, open attaches are kept
    /// in a ConfigMap `tether-gateway-attaches-<pod>` in `--session-namespace`, so that if this
    /// process is killed another (or its own next start) writes their end records.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// How often every gateway looks for the attach ledgers of gateways that are gone.
    #[arg(long, env = "TETHER_ATTACH_LEDGER_INTERVAL", default_value = "60s", value_parser = duration)]
    pub attach_ledger_interval: Duration,
    /// On shutdown, how long to wait for connections to close after telling them to reconnect.
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub drain_timeout: Duration,
}

/// The checked configuration.
#[derive(Debug)]
pub struct Config {
    pub args: Args,
    pub signer: Signer,
    pub dev_tokens: Option<HashMap<String, UserInfo>>,
    pub oidc: Option<OidcConfig>,
    /// Browser sign-in, when the provider and the external URL are configured.
    pub signin: Option<SignInConfig>,
    pub token_review: TokenReviewPolicy,
    pub cookie_key: cookie::Key,
}

fn algorithm(name: &str) -> Result<Algorithm> {
    let alg = match name.trim() {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        other => {
            return Err(Error::Config(format!(
                "--oidc-algorithms: {other} is not an accepted asymmetric algorithm"
            )));
        }
    };
    Ok(alg)
}

impl Args {
    pub fn into_config(self) -> Result<Config> {
        let pem = std::fs::read_to_string(&self.ticket_signing_key_file).map_err(|e| {
            Error::Config(format!(
                "--ticket-signing-key-file {}: {e}",
                self.ticket_signing_key_file.display()
            ))
        })?;
        let signer = Signer::from_pem(&pem)
            .map_err(|e| Error::Config(format!("--ticket-signing-key-file: {e}")))?;
        let dev_tokens = match &self.dev_token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::Config(format!("--dev-token-file {}: {e}", path.display()))
                })?;
                Some(parse_dev_tokens(&text).map_err(|e| {
                    Error::Config(format!("--dev-token-file {}: {e}", path.display()))
                })?)
            }
        };
        let oidc = match &self.oidc_issuer {
            None if !self.oidc_audiences.is_empty() => {
                return Err(Error::Config("--oidc-audience needs --oidc-issuer".into()));
            }
            None => None,
            Some(_) if self.oidc_audiences.is_empty() => {
                return Err(Error::Config(
                    "--oidc-issuer needs at least one --oidc-audience (the client ID)".into(),
                ));
            }
            Some(issuer) => {
                let jwks = match (&self.oidc_jwks_file, &self.oidc_jwks_url) {
                    (Some(f), None) => JwksSource::File(f.clone()),
                    (None, Some(u)) => JwksSource::Url(u.clone()),
                    _ => JwksSource::Discovery,
                };
                let algorithms = self
                    .oidc_algorithms
                    .iter()
                    .map(|a| algorithm(a))
                    .collect::<Result<Vec<_>>>()?;
                if algorithms.is_empty() {
                    return Err(Error::Config("--oidc-algorithms is empty".into()));
                }
                let required_claims = self
                    .oidc_required_claims
                    .iter()
                    .map(|kv| {
                        kv.split_once('=')
                            .filter(|(k, _)| !k.is_empty())
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .ok_or_else(|| {
                                Error::Config(format!(
                                    "--oidc-required-claim {kv:?}: expected claim=value"
                                ))
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                if let Some(cli) = &self.oidc_cli_client_id
                    && !self.oidc_audiences.contains(cli)
                {
                    return Err(Error::Config(format!(
                        "--oidc-cli-client-id {cli} must also be an --oidc-audience, or its \
                         tokens would be refused"
                    )));
                }
                Some(OidcConfig {
                    issuer: issuer.clone(),
                    audiences: self.oidc_audiences.clone(),
                    algorithms,
                    jwks,
                    mapping: IdentityMapping {
                        username_claim: self.oidc_username_claim.clone(),
                        username_prefix: self.oidc_username_prefix.clone(),
                        groups_claim: Some(self.oidc_groups_claim.clone())
                            .filter(|c| !c.is_empty()),
                        groups_prefix: self.oidc_groups_prefix.clone(),
                        required_claims,
                    },
                    refetch_interval: self.oidc_refetch_interval,
                })
            }
        };
        let signin = match (&oidc, &self.external_url) {
            (Some(oidc), Some(external)) => {
                let external_url = url::Url::parse(external.trim_end_matches('/'))
                    .map_err(|e| Error::Config(format!("--external-url {external}: {e}")))?;
                if !matches!(external_url.scheme(), "http" | "https")
                    || external_url.host_str().is_none()
                {
                    return Err(Error::Config(format!(
                        "--external-url {external}: expected http(s)://host[:port]"
                    )));
                }
                let client_secret = match &self.oidc_client_secret_file {
                    None => None,
                    Some(path) => Some(
                        std::fs::read_to_string(path)
                            .map_err(|e| {
                                Error::Config(format!(
                                    "--oidc-client-secret-file {}: {e}",
                                    path.display()
                                ))
                            })?
                            .trim()
                            .to_owned(),
                    ),
                };
                let client_id = self
                    .oidc_client_id
                    .clone()
                    .unwrap_or_else(|| oidc.audiences[0].clone());
                if !oidc.audiences.contains(&client_id) {
                    return Err(Error::Config(format!(
                        "--oidc-client-id {client_id} must also be an --oidc-audience"
                    )));
                }
                Some(SignInConfig {
                    issuer: oidc.issuer.clone(),
                    client_id,
                    client_secret,
                    external_url,
                    scopes: self.oidc_scopes.clone(),
                    max_lifetime: self.session_max_lifetime,
                })
            }
            (None, Some(_)) => {
                return Err(Error::Config(
                    "--external-url is for browser sign-in, which needs --oidc-issuer".into(),
                ));
            }
            _ => None,
        };
        let cookie_key = match &self.session_key_file {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| {
                    Error::Config(format!("--session-key-file {}: {e}", path.display()))
                })?;
                if bytes.len() < 32 {
                    return Err(Error::Config(format!(
                        "--session-key-file {}: needs at least 32 bytes, has {}",
                        path.display(),
                        bytes.len()
                    )));
                }
                cookie::Key::derive_from(&bytes)
            }
            None => {
                tracing::warn!(
                    "no --session-key-file: browser sign-ins last only as long as this process"
                );
                cookie::Key::generate()
            }
        };
        if !matches!(self.session_store.as_str(), "kubernetes" | "memory") {
            return Err(Error::Config(format!(
                "--session-store {}: expected kubernetes or memory",
                self.session_store
            )));
        }
        if self.token_audiences.iter().all(|a| a.trim().is_empty()) {
            return Err(Error::Config(
                "--token-audience is empty: Kubernetes tokens need an audience".into(),
            ));
        }
        let token_review = TokenReviewPolicy {
            audiences: self.token_audiences.clone(),
            accept_api_audience: self.accept_api_server_tokens,
            rate: self.token_review_rate.max(1),
        };
        if self.allowed_origins.is_empty() {
            tracing::warn!("no --allowed-origin: every WebSocket handshake will be refused");
        }
        if self.max_frame_bytes < 64 {
            return Err(Error::Config(
                "--max-frame-bytes must be at least 64".into(),
            ));
        }
        Ok(Config {
            args: self,
            signer,
            dev_tokens,
            oidc,
            signin,
            token_review,
            cookie_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration error for `flags`, with a valid ticket key.
    fn refusal(dir: &std::path::Path, flags: &[&str]) -> String {
        let key = dir.join("ticket.pem");
        std::fs::write(&key, tether_protocol::ticket::generate_keypair().0).unwrap();
        let mut argv = vec![
            "tether-gateway".to_owned(),
            format!("--ticket-signing-key-file={}", key.display()),
        ];
        argv.extend(flags.iter().map(|f| f.to_string()));
        match Args::try_parse_from(argv).unwrap().into_config() {
            Ok(_) => panic!("{flags:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sign_in_settings_that_cannot_work_are_refused_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short-key");
        std::fs::write(&short, b"too short").unwrap();
        let cases: [(&[&str], &str); 7] = [
            (
                &["--oidc-issuer=https://idp"],
                "needs at least one --oidc-audience",
            ),
            (&["--oidc-audience=a"], "needs --oidc-issuer"),
            (
                &[
                    "--oidc-issuer=https://idp",
                    "--oidc-audience=a",
                    "--oidc-cli-client-id=b",
                ],
                "must also be an --oidc-audience",
            ),
            (
                &[
                    "--oidc-issuer=https://idp",
                    "--oidc-audience=a",
                    "--oidc-required-claim=hd",
                ],
                "expected claim=value",
            ),
            (&["--external-url=https://t.example"], "needs --oidc-issuer"),
            (
                &[
                    "--oidc-issuer=https://idp",
                    "--oidc-audience=a",
                    "--external-url=t.example",
                ],
                "--external-url t.example",
            ),
            (&["--session-store=redis"], "expected kubernetes or memory"),
        ];
        for (flags, words) in cases {
            let e = refusal(dir.path(), flags);
            assert!(e.contains(words), "{flags:?}: {e}");
        }
        let e = refusal(
            dir.path(),
            &[&format!("--session-key-file={}", short.display())],
        );
        assert!(e.contains("needs at least 32 bytes, has 9"), "{e}");
    }
}
