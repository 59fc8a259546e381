//! TLS trust, the HTTP client for the gateway and the provider, and the gateway's `/api/auth`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use openidconnect::reqwest;
use serde::Deserialize;

/// A TLS client configuration trusting only the CA certificates in `path`.
pub fn trust_only(path: &Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let mut count = 0;
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading the certificate authority {}", path.display()))?
    {
        let cert =
            cert.with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("a certificate in {} is not usable", path.display()))?;
        count += 1;
    }
    if count == 0 {
        bail!("{} holds no PEM certificate", path.display());
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS configuration")
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// The HTTP client for the gateway's API and the provider: no redirects followed (the OAuth
/// endpoints must answer themselves; following would open the door to SSRF), bounded time,
/// and the given trust (the public web roots when `None`).
pub fn client(tls: Option<&rustls::ClientConfig>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("kubectl-tether/", env!("CARGO_PKG_VERSION")));
    if let Some(tls) = tls {
        b = b.use_preconfigured_tls(tls.clone());
    }
    b.build().context("HTTP client")
}

/// The gateway's answer to `GET /api/auth`: how people sign in there.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuthInfo {
    #[serde(default)]
    pub oidc: Option<OidcInfo>,
    #[serde(default)]
    pub browser_sign_in: bool,
    #[serde(default)]
    pub development_tokens: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OidcInfo {
    pub issuer: String,
    #[serde(default)]
    pub cli_client_id: Option<String>,
}

/// `GET {gateway}/api/auth`.
pub async fn auth_info(http: &reqwest::Client, gateway: &str) -> anyhow::Result<AuthInfo> {
    let url = format!("{}/api/auth", crate::cache::gateway_key(gateway));
    let resp = http
        .get(&url)
        .header("accept", "application/json")
        .send()
        .await
        .with_context(|| format!("asking {url} how to sign in"))?;
    let status = resp.status();
    if !status.is_success() {
        bail!("asking {url} how to sign in: {status}");
    }
    let body = resp
        .bytes()
        .await
        .with_context(|| format!("reading {url}"))?;
    serde_json::from_slice(&body).with_context(|| format!("{url} did not answer the expected JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auth_answer_parses_with_and_without_oidc() {
        let a: AuthInfo = serde_json::from_str(
            r#"{"oidc":{"issuer":"https://idp/realms/t","cliClientId":"kubectl-tether"},
                "browserSignIn":true,"developmentTokens":false}"#,
        )
        .unwrap();
        let oidc = a.oidc.unwrap();
        assert_eq!(oidc.issuer, "https://idp/realms/t");
        assert_eq!(oidc.cli_client_id.as_deref(), Some("kubectl-tether"));
        assert!(a.browser_sign_in);
        let b: AuthInfo =
            serde_json::from_str(r#"{"oidc":null,"browserSignIn":false,"developmentTokens":true}"#)
                .unwrap();
        assert!(b.oidc.is_none() && b.development_tokens);
    }
}
