//! `kubectl-tether login` as a process against the real provider (Keycloak, from tether-e2e):
//! the loopback redirect with the provider's own login form, the cache it leaves (0600 in
//! 0700), a forged callback refused, a refresh with a short token lifetime, logout; a login
//! that asks the gateway where to sign in and an attach through that gateway with the sign-in;
//! and the device grant up to the code it prints.

// The in-process gateway of ws-gateway's tests, shared rather than copied.
#[path = "../../ws-gateway/tests/common/mod.rs"]
mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tether_e2e::idp::{self, CLI_CLIENT_ID, IdpOptions, Keycloak};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

const STEP: Duration = Duration::from_secs(30);

/// Shorter than the CLI's refresh margin (60 s): every use of the sign-in refreshes it.
const LIFETIME: Duration = Duration::from_secs(30);

/// One Keycloak for the tests of this binary; it dies with the process.
static KEYCLOAK: tokio::sync::OnceCell<Result<Keycloak, String>> =
    tokio::sync::OnceCell::const_new();

async fn keycloak() -> &'static Keycloak {
    let started = KEYCLOAK
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let mut opts = IdpOptions::new(idp::test_dir());
                opts.token_lifetime = LIFETIME;
                Keycloak::start(&opts).map_err(|e| format!("{e:#}"))
            })
            .await
            .expect("the start does not panic")
        })
        .await;
    match started {
        Ok(kc) => kc,
        Err(e) => panic!("Keycloak did not start: {e}"),
    }
}

fn cli(cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kubectl-tether"));
    c.args(args)
        .env("KUBECACHEDIR", cache)
        .env_remove("HOME")
        .env_remove("TETHER_GATEWAY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn query(url: &str, key: &str) -> Option<String> {
    openidconnect::url::Url::parse(url)
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// The one sign-in file in the cache directory, and its JSON.
fn cached(cache: &Path) -> (PathBuf, serde_json::Value) {
    let dir = cache.join("tether");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let json = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    (files[0].clone(), json)
}

/// Runs `login` with the flags, plays alice on Keycloak's form, and answers the CLI's
/// callback; the CLI's stderr once it ended well.
async fn login_as_alice(kc: &Keycloak, cache: &Path, flags: &[&str]) -> String {
    let mut child = cli(cache, &["login", "--no-browser"])
        .args(flags)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let auth_url = read_until(&mut lines, &mut seen, |l| {
        l.trim().starts_with(&kc.authorization_endpoint())
    })
    .await
    .trim()
    .to_owned();
    let location = idp::login_through_form(&auth_url, "alice", "alice-password")
        .await
        .expect("alice signs in on Keycloak's form");
    let http = kubectl_tether::http::client(None).unwrap();
    assert_eq!(
        http.get(&location).send().await.unwrap().status().as_u16(),
        200
    );
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .unwrap()
        .unwrap();
    while let Ok(Ok(Some(l))) = tokio::time::timeout(STEP, lines.next_line()).await {
        seen.push_str(&l);
        seen.push('\n');
    }
    assert!(status.success(), "{status:?}\n{seen}");
    seen
}

/// Reads `stderr` until a line satisfies `pick`; that line, and everything read so far.
async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    seen: &mut String,
    pick: impl Fn(&str) -> bool,
) -> String {
    tokio::time::timeout(STEP, async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("the CLI ended first:\n{seen}"));
            seen.push_str(&line);
            seen.push('\n');
            if pick(&line) {
                return line;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("nothing like that on stderr:\n{seen}"))
}

#[tokio::test]
async fn login_through_the_browser_caches_a_private_refreshable_sign_in() {
    let kc = keycloak().await;
    let issuer = kc.issuer();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let provider = ["--issuer", &issuer, "--client-id", CLI_CLIENT_ID];

    // The loopback login: the URL on stderr, the provider's form played by tether-e2e.
    let mut child = cli(cache, &["login", "--no-browser"])
        .args(provider)
        .args(["--listen-port", &port.to_string()])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let auth_url = read_until(&mut lines, &mut seen, |l| {
        l.trim().starts_with(&kc.authorization_endpoint())
    })
    .await
    .trim()
    .to_owned();
    let callback = format!("http://127.0.0.1:{port}/callback");
    assert_eq!(
        query(&auth_url, "redirect_uri").as_deref(),
        Some(&*callback)
    );
    assert_eq!(
        query(&auth_url, "client_id").as_deref(),
        Some(CLI_CLIENT_ID)
    );
    assert_eq!(
        query(&auth_url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert!(query(&auth_url, "nonce").is_some_and(|n| n.len() >= 16));
    let state = query(&auth_url, "state").unwrap();
    assert!(state.len() >= 16);

    let http = kubectl_tether::http::client(None).unwrap();
    // A callback that is not this login's (another page's forged one) is refused, and the
    // login goes on waiting.
    let forged = http
        .get(format!("{callback}?code=forged&state=not-{state}"))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 400);

    let location = idp::login_through_form(&auth_url, "alice", "alice-password")
        .await
        .expect("alice signs in on Keycloak's form");
    assert!(location.starts_with(&callback), "{location}");
    let answer = http.get(&location).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    assert!(answer.text().await.unwrap().contains("close this tab"));
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .unwrap()
        .unwrap();
    while let Ok(Ok(Some(l))) = tokio::time::timeout(STEP, lines.next_line()).await {
        seen.push_str(&l);
        seen.push('\n');
    }
    assert!(status.success(), "{status:?}\n{seen}");
    assert!(seen.contains("as alice@tether.test"), "{seen}");
    // The listener is gone: a late callback finds nobody.
    assert!(
        http.get(&location).send().await.is_err(),
        "the callback listener outlived the login"
    );

    // The cache: one file, 0600 in a 0700 directory, a verified-looking ID token of alice.
    assert_eq!(mode(&cache.join("tether")), 0o700);
    let (file, json) = cached(cache);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(json["issuer"], issuer.as_str());
    assert_eq!(json["client_id"], CLI_CLIENT_ID);
    let id_token = json["id_token"].as_str().unwrap().to_owned();
    let refresh_token = json["refresh_token"].as_str().unwrap().to_owned();
    let claims = kubectl_tether::cache::id_token_payload(&id_token).unwrap();
    assert_eq!(claims["email"], "alice@tether.test");
    assert_eq!(claims["iss"], issuer.as_str());
    assert_eq!(json["expiry"], claims["exp"]);
    // Tokens never reach the terminal.
    assert!(!seen.contains(&id_token) && !seen.contains(&refresh_token));

    // The token runs out within the refresh margin: `status` refreshes it, says so, and the
    // new one replaces the old, still private.
    let out = tokio::time::timeout(STEP, cli(cache, &["status"]).args(provider).output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("alice@tether.test") && stdout.contains("refreshed just now"),
        "{stdout}{stderr}"
    );
    let (file2, json2) = cached(cache);
    assert_eq!(file2, file);
    assert_eq!(mode(&file2), 0o600);
    let refreshed = json2["id_token"].as_str().unwrap();
    assert_ne!(refreshed, id_token);
    assert_eq!(
        kubectl_tether::cache::id_token_payload(refreshed).unwrap()["email"],
        "alice@tether.test"
    );
    assert!(!stdout.contains(refreshed) && !stderr.contains(refreshed));

    // Logout forgets it; then there is nothing to use.
    let out = cli(cache, &["logout"])
        .args(provider)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!file.exists());
    let out = cli(cache, &["status"])
        .args(provider)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not signed in"),
        "{out:?}"
    );
}

#[tokio::test]
async fn login_with_the_device_grant_prints_where_to_go_and_the_code() {
    let kc = keycloak().await;
    let tmp = tempfile::tempdir().unwrap();
    let issuer = kc.issuer();
    let mut child = cli(tmp.path(), &["login", "--device", "--no-browser"])
        .args(["--issuer", &issuer, "--client-id", CLI_CLIENT_ID])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let uri = read_until(&mut lines, &mut seen, |l| l.trim().starts_with("http"))
        .await
        .trim()
        .to_owned();
    assert!(
        uri.starts_with(&issuer) && uri.contains("/device"),
        "{seen}"
    );
    let code_line = read_until(&mut lines, &mut seen, |l| l.contains("enter the code")).await;
    let code = code_line.rsplit(' ').next().unwrap();
    assert!(code.len() >= 8 && code.contains('-'), "{seen}");
    // Nobody enters it: the CLI keeps polling until stopped, and caches nothing.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), child.wait())
            .await
            .is_err()
    );
    child.kill().await.unwrap();
    assert!(!tmp.path().join("tether").exists() || cached_none(tmp.path()));
}

fn cached_none(cache: &Path) -> bool {
    std::fs::read_dir(cache.join("tether"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

#[tokio::test]
async fn login_asks_the_gateway_and_attach_then_uses_the_sign_in() {
    use std::sync::Arc;
    use tether_gateway::authz::StaticAccess;
    use tether_protocol::Mode;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let kc = keycloak().await;
    let issuer = kc.issuer();
    // A gateway that trusts Keycloak, with the CLI's client as an audience it advertises.
    let gw = common::TestGateway::start_with(common::Options {
        flags: vec![
            format!("--oidc-issuer={issuer}"),
            format!("--oidc-jwks-url={issuer}/protocol/openid-connect/certs"),
            format!("--oidc-audience={CLI_CLIENT_ID}"),
            format!("--oidc-cli-client-id={CLI_CLIENT_ID}"),
        ],
        access: Some(Arc::new(StaticAccess::default().allow(
            "tether-developers",
            common::NS,
            Mode::Attach,
        ))),
        ..Default::default()
    })
    .await;
    let gateway = format!("http://{}", gw.addr);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();

    // Only --gateway: the provider and the client come from its /api/auth.
    let said = login_as_alice(kc, cache, &["--gateway", &gateway]).await;
    assert!(
        said.contains(&issuer) && said.contains("alice@tether.test"),
        "{said}"
    );
    let remembered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("tether/gateways.json")).unwrap())
            .unwrap();
    assert_eq!(remembered[&gateway]["issuer"], issuer.as_str());
    assert_eq!(mode(&cache.join("tether/gateways.json")), 0o600);

    // attach without a token: the sign-in (refreshed first: 30 s tokens are within the
    // margin) reaches the gateway, which admits alice of tether-developers.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubectl-tether"));
    child
        .args([
            "attach",
            common::SESSION,
            "-n",
            common::NS,
            "--gateway",
            &gateway,
        ])
        .env("KUBECACHEDIR", cache)
        .env_remove("HOME")
        .env_remove("TETHER_TOKEN")
        .env_remove("TETHER_TOKEN_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = child.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"hello-signed-in").await.unwrap();
    let mut seen = Vec::new();
    let echoed = tokio::time::timeout(STEP, async {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("hello-signed-in") {
            let n = stdout.read(&mut buf).await.unwrap();
            if n == 0 {
                return false;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        true
    })
    .await
    .unwrap_or(false);
    drop(stdin);
    let out = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        echoed && out.status.success(),
        "{:?}: {}{}",
        out.status,
        String::from_utf8_lossy(&seen),
        String::from_utf8_lossy(&out.stderr)
    );
    let attach = gw
        .audit_lines()
        .into_iter()
        .find(|l| l["event"] == "attach")
        .expect("an attach record");
    assert_eq!(attach["mode"], "attach");
}
