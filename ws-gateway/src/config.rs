//! Command-line flags (each also an environment variable) and the checked configuration.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use jsonwebtoken::Algorithm;
use tether_protocol::ticket::Signer;

use crate::authn::{JwksSource, OidcConfig, UserInfo, parse_dev_tokens};
use crate::{Error, Result};

fn duration(s: &str) -> Result<Duration, String> {
    // Plain numbers are seconds; otherwise humantime ("500ms", "2m").
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// The Tether gateway: browser terminals for TerminalSessions, authorized by Kubernetes RBAC.
#[derive(Debug, Clone, Parser)]
#[command(name = "tether-gateway", version)]
pub struct Args {
    /// Address to listen on (plain HTTP; terminate TLS in front, or use --insecure-cookies on localhost).
    #[arg(long, env = "TETHER_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// An Origin allowed to open WebSockets and post to the API, matched exactly (repeatable).
    #[arg(
        long = "allowed-origin",
        env = "TETHER_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// OIDC issuer (`iss`) of accepted ID tokens.
    #[arg(long, env = "TETHER_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// OIDC audience (`aud`, the client ID) of accepted ID tokens.
    #[arg(long, env = "TETHER_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// JWKS of the OIDC provider, from a file.
    #[arg(long, env = "TETHER_OIDC_JWKS_FILE", conflicts_with = "oidc_jwks_url")]
    pub oidc_jwks_file: Option<PathBuf>,
    /// JWKS of the OIDC provider, from a URL.
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
    /// Claim naming the user.
    #[arg(long, env = "TETHER_OIDC_USERNAME_CLAIM", default_value = "sub")]
    pub oidc_username_claim: String,
    /// Claim listing the user's groups.
    #[arg(long, env = "TETHER_OIDC_GROUPS_CLAIM", default_value = "groups")]
    pub oidc_groups_claim: String,
    /// Least time between JWKS refetches caused by unknown key IDs.
    #[arg(long, env = "TETHER_OIDC_REFETCH_INTERVAL", default_value = "30s", value_parser = duration)]
    pub oidc_refetch_interval: Duration,
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
    /// WebSocket handshakes per second per source address (bursts of twice that).
    #[arg(long, env = "TETHER_HANDSHAKE_RATE", default_value_t = 20)]
    pub handshake_rate: u32,
    /// Time for a client to send its request headers, and then its first frame.
    #[arg(long, env = "TETHER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,
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
        let oidc = match (&self.oidc_issuer, &self.oidc_audience) {
            (None, None) => None,
            (Some(issuer), Some(audience)) => {
                let jwks = match (&self.oidc_jwks_file, &self.oidc_jwks_url) {
                    (Some(f), None) => JwksSource::File(f.clone()),
                    (None, Some(u)) => JwksSource::Url(u.clone()),
                    _ => {
                        return Err(Error::Config(
                            "OIDC needs exactly one of --oidc-jwks-file and --oidc-jwks-url".into(),
                        ));
                    }
                };
                let algorithms = self
                    .oidc_algorithms
                    .iter()
                    .map(|a| algorithm(a))
                    .collect::<Result<Vec<_>>>()?;
                if algorithms.is_empty() {
                    return Err(Error::Config("--oidc-algorithms is empty".into()));
                }
                Some(OidcConfig {
                    issuer: issuer.clone(),
                    audience: audience.clone(),
                    algorithms,
                    jwks,
                    username_claim: self.oidc_username_claim.clone(),
                    groups_claim: self.oidc_groups_claim.clone(),
                    refetch_interval: self.oidc_refetch_interval,
                })
            }
            _ => {
                return Err(Error::Config(
                    "--oidc-issuer and --oidc-audience go together".into(),
                ));
            }
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
        })
    }
}
