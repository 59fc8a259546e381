//! Browser sign-in through a real OpenID provider (Keycloak, `tether_e2e::idp`), played without a
//! browser: the gateway's `/auth/login`, the provider's own login form, the gateway's
//! `/auth/callback`. Then the attack list: forged and replayed callbacks, open redirects, copied
//! cookies, hostile claims from the provider itself, tokens that expire mid-connection.
//! (`e2e/tests/end_to_end.rs` signs in the same way in Chromium on the real node.)

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use tether_e2e::idp::{self, GATEWAY_CLIENT_ID, GATEWAY_CLIENT_SECRET, IdpOptions, Keycloak};
use tether_gateway::authz::StaticAccess;
use tether_gateway::signin::CallbackQuery;
use tether_protocol::{ClientFrame, Mode, Size};

/// ID tokens live this long, so one test can watch a connection outlive its token.
const LIFETIME: Duration = Duration::from_secs(20);
/// One gateway port per test: Keycloak knows each one's callback.
const TESTS: usize = 11;

fn ports() -> &'static [u16] {
    static PORTS: OnceLock<Vec<u16>> = OnceLock::new();
    PORTS.get_or_init(|| {
        let mut v = Vec::new();
        while v.len() < TESTS {
            let p = tether_e2e::free_port().unwrap();
            if !v.contains(&p) {
                v.push(p);
            }
        }
        v
    })
}

static KEYCLOAK: tokio::sync::OnceCell<Result<Keycloak, String>> =
    tokio::sync::OnceCell::const_new();

async fn keycloak() -> &'static Keycloak {
    let started = KEYCLOAK
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let mut opts = IdpOptions::new(idp::test_dir());
                opts.token_lifetime = LIFETIME;
                opts.refresh_tokens = false;
                opts.redirect_uris = ports()
                    .iter()
                    .map(|p| format!("http://127.0.0.1:{p}/auth/callback"))
                    .collect();
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

/// A gateway (test `n`) signing people in with Keycloak, mapping like a kube-apiserver with
/// `--oidc-username-claim=email --oidc-groups-prefix=oidc:` unless `flags` say otherwise.
async fn gateway(n: usize, flags: &[&str]) -> TestGateway {
    let kc = keycloak().await;
    let port = ports()[n];
    // Read once at start: the file goes with `dir` when this function returns.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, GATEWAY_CLIENT_SECRET).unwrap();
    let mut all = vec![
        format!("--oidc-issuer={}", kc.issuer()),
        format!(
            "--oidc-jwks-url={}/protocol/openid-connect/certs",
            kc.issuer()
        ),
        format!("--oidc-audience={GATEWAY_CLIENT_ID}"),
        format!("--oidc-audience={}", idp::CLI_CLIENT_ID),
        format!("--oidc-client-id={GATEWAY_CLIENT_ID}"),
        format!("--oidc-client-secret-file={}", secret.display()),
        format!("--external-url=http://127.0.0.1:{port}"),
    ];
    let defaults = [
        ("--oidc-username-claim", "--oidc-username-claim=email"),
        ("--oidc-groups-prefix", "--oidc-groups-prefix=oidc:"),
    ];
    for (flag, default) in defaults {
        if !flags.iter().any(|f| f.starts_with(flag)) {
            all.push(default.into());
        }
    }
    all.extend(flags.iter().map(|f| f.to_string()));
    let gw = TestGateway::start_with(Options {
        flags: all,
        port: Some(port),
        access: Some(Arc::new(
            StaticAccess::default()
                .allow("oidc:tether-developers", NS, Mode::Attach)
                .allow("oidc:tether-developers", NS, Mode::Observe)
                .allow("oidc:tether-observers", NS, Mode::Observe)
                .allow("devs", NS, Mode::Attach),
        )),
        ..Default::default()
    })
    .await;
    drop(dir);
    gw
}

fn header<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

/// `name=value` of the first `Set-Cookie` whose name starts with `prefix`.
fn cookie(head: &str, prefix: &str) -> Option<String> {
    header(head, "set-cookie")
        .into_iter()
        .find(|c| c.starts_with(prefix) && !c.contains("Max-Age=0"))
        .map(|c| c.split(';').next().unwrap().to_owned())
}

/// A started sign-in: the provider's URL and the state cookie.
async fn begin(gw: &TestGateway, next: &str) -> (String, String) {
    let (status, head, body) = gw
        .http("GET", &format!("/auth/login?next={next}"), &[], "")
        .await;
    assert_eq!(status, 302, "{head}{body}");
    let location = header(&head, "location")[0].to_owned();
    let state_cookie = cookie(&head, "tether_signin_").expect("a state cookie");
    (location, state_cookie)
}

/// The callback request's path and query, from the provider's redirect.
fn callback_path(redirect: &str) -> String {
    let u = url::Url::parse(redirect).unwrap();
    format!("{}?{}", u.path(), u.query().unwrap_or(""))
}

/// Signs `user` in: `(status, head, body)` of the callback, and the callback path used.
async fn sign_in(gw: &TestGateway, user: &str, next: &str) -> ((u16, String, String), String) {
    let (location, state_cookie) = begin(gw, next).await;
    let u = idp::user(user).unwrap();
    let redirect = idp::login_through_form(&location, u.username, u.password)
        .await
        .unwrap();
    let path = callback_path(&redirect);
    let answer = gw
        .http("GET", &path, &[("Cookie", &state_cookie)], "")
        .await;
    (answer, format!("{path}\n{state_cookie}"))
}

async fn whoami(gw: &TestGateway, cookie: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = gw
        .http("GET", "/api/whoami", &[("Cookie", cookie)], "")
        .await;
    (status, serde_json::from_str(&body).unwrap_or_default())
}

#[tokio::test]
async fn alice_signs_in_through_the_providers_form_and_is_who_kubectl_would_say() {
    let gw = gateway(0, &[]).await;
    let started = std::time::Instant::now();
    let ((status, head, body), used) = sign_in(&gw, "alice", "/%23team-a/dev").await;
    println!(
        "the first sign-in took {:?} (discovery, the provider's form, code exchange, JWKS)",
        started.elapsed()
    );
    assert_eq!(status, 303, "{head}{body}");
    let again = std::time::Instant::now();
    let ((status2, _, _), _) = sign_in(&gw, "carol", "/").await;
    println!(
        "a later sign-in took {:?} (the provider's form and the code exchange)",
        again.elapsed()
    );
    assert_eq!(status2, 303);
    assert_eq!(header(&head, "location"), ["/#team-a/dev"]);
    let session = cookie(&head, "tether_session=").expect("a session cookie");
    let set = header(&head, "set-cookie").join("\n");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    // The cookie holds no token: not the ID token's header, not anything JWT-shaped.
    assert!(!session.contains("eyJ"), "{session}");
    let (status, who) = whoami(&gw, &session).await;
    assert_eq!(status, 200, "{who}");
    assert_eq!(who["user"], "alice@tether.test");
    assert_eq!(who["groups"], serde_json::json!(["oidc:tether-developers"]));
    assert_eq!(who["via"], "oidc");
    assert!(who["expiresAt"].is_string(), "{who}");

    // The same callback again (a replayed state), with its cookie: refused.
    let (path, state_cookie) = used.split_once('\n').unwrap();
    let (status, _, body) = gw.http("GET", path, &[("Cookie", state_cookie)], "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("already used"), "{body}");

    // Signed out: the copied cookie is useless, and the provider's sign-out is named.
    let (status, _, body) = gw
        .http(
            "POST",
            "/api/logout",
            &[("Origin", ORIGIN), ("Cookie", &session)],
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let out: serde_json::Value = serde_json::from_str(&body).unwrap();
    let end = out["endSessionUrl"].as_str().expect("an end-session URL");
    assert!(end.starts_with(&keycloak().await.issuer()), "{end}");
    assert!(end.contains("post_logout_redirect_uri="), "{end}");
    assert_eq!(whoami(&gw, &session).await.0, 401);
}

#[tokio::test]
async fn forged_callbacks_are_refused() {
    let gw = gateway(1, &[]).await;
    let kc = keycloak().await;
    let alice = idp::user("alice").unwrap();

    // A wrong state: no cookie names it.
    let (location, state_cookie) = begin(&gw, "/").await;
    let redirect = idp::login_through_form(&location, alice.username, alice.password)
        .await
        .unwrap();
    let path = callback_path(&redirect);
    let forged = path.replace("state=", "state=x");
    let (status, _, body) = gw
        .http("GET", &forged, &[("Cookie", &state_cookie)], "")
        .await;
    assert_eq!(status, 400, "{body}");
    // No state cookie at all (a callback planted in someone else's browser): refused.
    let (status, _, body) = gw.http("GET", &path, &[], "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not started here"), "{body}");

    // The gateway's own flow, driven step by step: a wrong nonce, a missing PKCE verifier.
    let signin = gw.gw.signin.as_ref().unwrap();
    let oidc = gw.gw.authn.oidc.as_ref().unwrap();
    for tamper in ["nonce", "verifier"] {
        let (url, mut pending) = signin.begin("/").await.unwrap();
        let redirect = idp::login_through_form(&url, alice.username, alice.password)
            .await
            .unwrap();
        let q = url::Url::parse(&redirect).unwrap();
        let get = |k: &str| {
            q.query_pairs()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
        };
        let query = CallbackQuery {
            code: get("code"),
            state: get("state"),
            ..Default::default()
        };
        match tamper {
            "nonce" => pending.nonce = "another-sign-ins-nonce".into(),
            _ => pending.verifier = String::new(),
        }
        let e = signin
            .finish(oidc, &query, Some(pending))
            .await
            .unwrap_err();
        println!("{tamper}: {e}");
        let words = e.to_string();
        match tamper {
            "nonce" => assert!(words.contains("nonce"), "{words}"),
            _ => assert!(words.contains("code exchange"), "{words}"),
        }
    }

    // A tampered redirect_uri: the provider refuses to send the code anywhere else.
    let (location, _) = begin(&gw, "/").await;
    let evil = url::Url::parse(&location).unwrap();
    let pairs: Vec<(String, String)> = evil
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "redirect_uri" {
                "https://evil.example/auth/callback".to_owned()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    let mut evil = evil.clone();
    evil.query_pairs_mut().clear().extend_pairs(pairs);
    assert!(
        idp::login_through_form(evil.as_str(), alice.username, alice.password)
            .await
            .is_err(),
        "{} sent a code to a redirect_uri it does not know",
        kc.issuer()
    );
}

#[tokio::test]
async fn the_return_path_never_leaves_the_gateway() {
    let gw = gateway(2, &[]).await;
    for next in [
        "https://evil.example/",
        "//evil.example/",
        "/%5Cevil.example",
        "%2F%2Fevil.example",
    ] {
        let ((status, head, body), _) = sign_in(&gw, "carol", next).await;
        assert_eq!(status, 303, "{next}: {body}");
        assert_eq!(header(&head, "location"), ["/"], "{next}");
    }
}

#[tokio::test]
async fn hostile_claims_from_the_provider_are_refused_or_harmless() {
    // mallory's groups claim lists system:masters; without a groups prefix that is refused.
    let gw = gateway(3, &["--oidc-groups-prefix="]).await;
    let ((status, _, body), _) = sign_in(&gw, "mallory", "/").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("system:masters") && body.contains("reserved"),
        "{body}"
    );
    // The same person as a bearer ID token (the CLI's), to the API and to the WebSocket.
    let kc = keycloak().await;
    let mallory = kc
        .password_grant(idp::user("mallory").unwrap())
        .await
        .unwrap();
    let (status, body) = gw
        .ws(
            &format!("/ws/{NS}/{SESSION}"),
            Some(ORIGIN),
            Some(&mallory.id_token),
        )
        .await
        .unwrap_err();
    assert_eq!(status, 401, "{body}");

    // Claims named by the attack users' attributes.
    let cases: [(&str, &[&str], Result<&str, &str>); 5] = [
        // groups as a plain string
        (
            "stringy",
            &["--oidc-groups-claim=kube_groups", "--oidc-groups-prefix="],
            Err("system:masters"),
        ),
        // a username equal to an existing Kubernetes user: prefixed with the issuer
        (
            "impostor-alice",
            &["--oidc-username-claim=kube_name"],
            Ok("#alice"),
        ),
        (
            "impostor-sa",
            &["--oidc-username-claim=kube_name"],
            Ok("#system:serviceaccount:default:default"),
        ),
        (
            "impostor-admin",
            &["--oidc-username-claim=kube_name"],
            Ok("#system:admin"),
        ),
        // and with prefixing turned off, a system: user is refused outright
        (
            "impostor-admin",
            &[
                "--oidc-username-claim=kube_name",
                "--oidc-username-prefix=-",
            ],
            Err("system:admin"),
        ),
    ];
    for (i, (user, flags, want)) in cases.into_iter().enumerate() {
        let gw = gateway(6 + i, flags).await;
        let token = kc.password_grant(idp::user(user).unwrap()).await.unwrap();
        let (status, _, body) = gw
            .http(
                "GET",
                "/api/whoami",
                &[("Authorization", &format!("Bearer {}", token.id_token))],
                "",
            )
            .await;
        match want {
            Ok(suffix) => {
                assert_eq!(status, 200, "{user}: {body}");
                let who: serde_json::Value = serde_json::from_str(&body).unwrap();
                let name = who["user"].as_str().unwrap();
                assert_eq!(name, format!("{}{suffix}", kc.issuer()), "{user}");
            }
            Err(word) => {
                assert_eq!(status, 401, "{user}: {body}");
                assert!(
                    body.contains(word) && body.contains("reserved"),
                    "{user}: {body}"
                );
            }
        }
        drop(gw);
    }
}

#[tokio::test]
async fn a_provider_token_that_expires_mid_connection_closes_it_with_4440() {
    let gw = gateway(5, &[]).await;
    let kc = keycloak().await;
    let alice = kc
        .password_grant(idp::user("alice").unwrap())
        .await
        .unwrap();
    let (mut ws, _) = gw
        .ws(
            &format!("/ws/{NS}/{SESSION}"),
            Some(ORIGIN),
            Some(&alice.id_token),
        )
        .await
        .expect("admitted while the token is valid");
    send(
        &mut ws,
        ClientFrame::Open {
            size: Size::default(),
        }
        .encode(),
    )
    .await;
    let started = std::time::Instant::now();
    let (code, reason) = closed_within(&mut ws, LIFETIME + Duration::from_secs(15)).await;
    println!("closed after {:?}: {code} {reason}", started.elapsed());
    assert_eq!(code, 4440, "{reason}");
    assert!(reason.contains("expired"), "{reason}");
}
