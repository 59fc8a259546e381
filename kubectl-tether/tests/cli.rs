//! `kubectl-tether attach` as a process against the in-process gateway of ws-gateway's tests:
//! keystrokes reach the session, output comes back, a refusal is reported in words with a
//! failing exit status, and without a token the cached sign-in is used (or its absence said).

// The gateway harness of ws-gateway's tests, shared rather than copied. tether-gateway is only
// a dev-dependency: nothing of it links into the plugin.
#[path = "../../ws-gateway/tests/common/mod.rs"]
mod common;

use std::process::Stdio;

use common::*;
use tether_e2e::pki::Authority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

fn cli(gw: &TestGateway, token: &str, extra: &[&str]) -> Command {
    cli_to(&format!("http://{}", gw.addr), token, extra)
}

fn cli_to(gateway: &str, token: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kubectl-tether"));
    c.args(["attach", SESSION, "-n", NS, "--gateway", gateway])
        .args(extra)
        .env("TETHER_TOKEN", token)
        .env_remove("TETHER_TOKEN_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Types `text`, sees it echoed, closes stdin and expects a clean exit.
async fn echo_then_detach(mut child: tokio::process::Child, text: &str) {
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    wait_for(&mut stdout, text).await;
    detach(child, stdin).await;
}

/// Closes stdin, which detaches, and expects a clean exit.
async fn detach(mut child: tokio::process::Child, stdin: tokio::process::ChildStdin) {
    drop(stdin);
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn the_cli_attaches_types_and_detaches_at_end_of_input() {
    let gw = TestGateway::start(&[]).await;
    echo_then_detach(cli(&gw, ALICE, &[]).spawn().unwrap(), "hello-from-cli").await;
}

#[tokio::test]
async fn the_cli_reconnects_and_resumes_when_the_connection_is_lost() {
    let gw = TestGateway::start(&[]).await;
    let mut child = cli(&gw, ALICE, &[]).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    stdin.write_all(b"before").await.unwrap();
    wait_for(&mut stdout, "before").await;
    stdin
        .write_all(tether_gateway::test_backend::DROP_COMMAND)
        .await
        .unwrap();
    wait_for(&mut stderr, "resuming").await;
    stdin.write_all(b"after-the-drop").await.unwrap();
    wait_for(&mut stdout, "after-the-drop").await;
    detach(child, stdin).await;
    assert!(
        gw.backend
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}

async fn wait_for(out: &mut (impl AsyncReadExt + Unpin), text: &str) {
    let mut seen = Vec::new();
    tokio::time::timeout(STEP, async {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains(text) {
            let n = out.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {text:?}: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{text:?} did not arrive: {}",
            String::from_utf8_lossy(&seen)
        )
    });
}

/// Runs the CLI to its end, which must come within a step and fail; its stderr.
async fn fails(mut cmd: Command) -> String {
    let out = tokio::time::timeout(STEP, cmd.output())
        .await
        .expect("the CLI gives up at once instead of retrying")
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_refused_attach_is_explained_and_fails() {
    let gw = TestGateway::start(&[]).await;
    let err = fails(cli(&gw, BOB, &[])).await;
    assert!(
        err.contains("403") && err.contains("may not attach"),
        "{err}"
    );
}

/// A TLS front for the gateway, as an ingress would be: a certificate for localhost from a
/// throwaway CA, and the plain bytes forwarded to the gateway.
async fn tls_front(listener: tokio::net::TcpListener, to: std::net::SocketAddr, ca: &Authority) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pair = ca.serving(&[]);
    let certs = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return; // the client refused our certificate
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
}

#[tokio::test]
async fn over_wss_the_cli_trusts_the_given_certificate_authority_and_nothing_else() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let gw = TestGateway::start(&[&format!("--allowed-origin=https://localhost:{port}")]).await;
    let ca = Authority::new();
    tls_front(listener, gw.addr, &ca).await;
    let ca_file = gw.dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let https = format!("https://localhost:{port}");
    let over_tls = |extra: &[&str]| cli_to(&https, ALICE, extra);

    // Trusting the CA: attaches over wss:// and the echo comes back.
    let child = over_tls(&["--certificate-authority", ca_file.to_str().unwrap()])
        .spawn()
        .unwrap();
    echo_then_detach(child, "hello-over-tls").await;

    // The public web roots do not include our CA: refused at once, in words, not retried.
    let err = fails(over_tls(&[])).await;
    assert!(err.contains("TLS") && err.contains("certificate"), "{err}");

    // A CA file that holds no certificate is named in the error.
    let junk = gw.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let err = fails(over_tls(&[
        "--certificate-authority",
        junk.to_str().unwrap(),
    ]))
    .await;
    assert!(
        err.contains("junk.pem") && err.contains("no PEM certificate"),
        "{err}"
    );
}

/// The CLI with no token at all, its sign-in cache in `cache_dir`.
fn cli_signed_in(gw: &TestGateway, cache_dir: &std::path::Path) -> Command {
    let mut c = cli(gw, "", &[]);
    c.env_remove("TETHER_TOKEN")
        .env("KUBECACHEDIR", cache_dir)
        .env_remove("HOME");
    c
}

/// Caches `entry` as the sign-in of the gateway's provider: the one its `/api/auth` names,
/// else the one `login --gateway` would have remembered.
async fn cache_sign_in(
    gw: &TestGateway,
    cache_dir: &std::path::Path,
    id_token: String,
    expiry: i64,
    refresh_token: Option<String>,
) -> std::path::PathBuf {
    use kubectl_tether::cache::{Cache, Entry, Provider};
    let url = format!("http://{}", gw.addr);
    let http = kubectl_tether::http::client(None).unwrap();
    let provider = match kubectl_tether::http::auth_info(&http, &url).await {
        Ok(kubectl_tether::http::AuthInfo { oidc: Some(o), .. }) => Provider::new(
            o.issuer,
            o.cli_client_id.unwrap_or_else(|| "kubectl-tether".into()),
        ),
        _ => Provider::new(ISSUER, "kubectl-tether"),
    };
    let cache = Cache::at(cache_dir.join("tether"));
    cache.remember_gateway(&url, &provider).unwrap();
    cache
        .store(&Entry {
            issuer: provider.issuer,
            client_id: provider.client_id,
            id_token,
            refresh_token,
            expiry,
        })
        .unwrap()
}

#[tokio::test]
async fn without_a_token_the_cli_attaches_with_the_cached_sign_in() {
    let gw = TestGateway::start(&[]).await;
    let cache_dir = tempfile::tempdir().unwrap();
    let exp = now() + 600;
    let jwt = id_token(good_claims("oidc-alice", &["devs"]), Some("test-key-1"));
    cache_sign_in(&gw, cache_dir.path(), jwt, exp as i64, None).await;
    let child = cli_signed_in(&gw, cache_dir.path()).spawn().unwrap();
    echo_then_detach(child, "hello-with-the-cached-sign-in").await;
}

#[tokio::test]
async fn without_a_token_or_a_sign_in_the_cli_says_to_log_in() {
    let gw = TestGateway::start(&[]).await;
    let cache_dir = tempfile::tempdir().unwrap();
    let err = fails(cli_signed_in(&gw, cache_dir.path())).await;
    let expected = format!(
        "not signed in: run `kubectl tether login --gateway http://{}`",
        gw.addr
    );
    assert!(err.contains(&expected), "{err}");

    // A sign-in that has run out and cannot be refreshed is no sign-in.
    let jwt = id_token(good_claims("oidc-alice", &["devs"]), Some("test-key-1"));
    cache_sign_in(&gw, cache_dir.path(), jwt, now() as i64 - 10, None).await;
    let err = fails(cli_signed_in(&gw, cache_dir.path())).await;
    assert!(err.contains(&expected), "{err}");
    assert_eq!(
        gw.backend
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
