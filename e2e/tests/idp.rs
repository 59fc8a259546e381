//! The test OpenID provider (Keycloak): its discovery document, the claims of its users, and
//! its login page played without a browser. No root and no cluster needed; one Keycloak is
//! shared by every test of this binary.

use std::time::Duration;

use base64::Engine as _;
use tether_e2e::idp::{self, IdpOptions, Keycloak};
use tokio::sync::OnceCell;

/// The gateway client's redirect URI in this realm.
const REDIRECT: &str = "http://127.0.0.1:18080/oauth/callback";
const LIFETIME: Duration = Duration::from_secs(20);

static KEYCLOAK: OnceCell<Result<Keycloak, String>> = OnceCell::const_new();

async fn keycloak() -> &'static Keycloak {
    let started = KEYCLOAK
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let mut opts = IdpOptions::new(idp::test_dir());
                opts.redirect_uris = vec![REDIRECT.to_string()];
                opts.token_lifetime = LIFETIME;
                opts.refresh_tokens = false;
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

fn claims(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("the payload is base64url");
    serde_json::from_slice(&bytes).expect("the payload is JSON")
}

fn user(name: &str) -> &'static idp::TestUser {
    idp::user(name).expect("a user of the realm")
}

fn query(url: &str, key: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

#[tokio::test]
async fn discovery_names_the_issuer_pkce_and_the_device_grant() {
    let kc = keycloak().await;
    let doc: serde_json::Value = reqwest::get(kc.discovery_url())
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["issuer"], kc.issuer().as_str());
    assert!(kc.issuer().ends_with("/realms/tether"));
    let methods = doc["code_challenge_methods_supported"].as_array().unwrap();
    assert!(methods.iter().any(|m| m == "S256"), "{methods:?}");
    assert!(
        doc["device_authorization_endpoint"]
            .as_str()
            .is_some_and(|e| e.starts_with(&kc.issuer())),
        "{doc}"
    );
    assert_eq!(doc["token_endpoint"], kc.token_endpoint().as_str());
    assert_eq!(
        doc["authorization_endpoint"],
        kc.authorization_endpoint().as_str()
    );
    let health = reqwest::get(kc.health_url()).await.unwrap();
    assert!(health.status().is_success(), "{}", health.status());
}

#[tokio::test]
async fn alice_gets_her_email_groups_and_the_configured_lifetime() {
    let kc = keycloak().await;
    let alice = kc.users()[0];
    assert_eq!(alice.username, "alice");
    let tokens = kc.password_grant(&alice).await.unwrap();
    let id = claims(&tokens.id_token);
    assert_eq!(id["iss"], kc.issuer().as_str());
    assert_eq!(id["email"], "alice@tether.test");
    assert_eq!(id["email_verified"], true);
    assert_eq!(id["preferred_username"], "alice");
    assert_eq!(id["groups"], serde_json::json!(["tether-developers"]));
    assert_eq!(id["aud"], idp::CLI_CLIENT_ID);
    assert!(
        (LIFETIME.as_secs() - 2..=LIFETIME.as_secs()).contains(&tokens.expires_in),
        "{}",
        tokens.expires_in
    );
    // Keycloak takes `iat` and `exp` from two readings of the clock: a second apart at times.
    let lifespan = id["exp"].as_u64().unwrap() - id["iat"].as_u64().unwrap();
    assert!(
        LIFETIME.as_secs().abs_diff(lifespan) <= 1,
        "exp - iat = {lifespan}"
    );
    let access = claims(&tokens.access_token);
    assert_eq!(access["groups"], serde_json::json!(["tether-developers"]));
    assert!(id.get("kube_name").is_none() && id.get("kube_groups").is_none());
    // The command line's client gets refresh tokens.
    assert!(tokens.refresh_token.is_some());

    let bob = kc.password_grant(&kc.users()[1]).await.unwrap();
    assert_eq!(
        claims(&bob.id_token)["groups"],
        serde_json::json!(["tether-observers"])
    );
}

#[tokio::test]
async fn attack_users_carry_their_claims() {
    let kc = keycloak().await;
    let mallory = claims(&kc.password_grant(user("mallory")).await.unwrap().id_token);
    assert!(
        mallory["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "system:masters"),
        "{mallory}"
    );

    let stringy = kc.password_grant(user("stringy")).await.unwrap();
    for token in [&stringy.id_token, &stringy.access_token] {
        // A plain string, not an array of one.
        assert_eq!(claims(token)["kube_groups"], "system:masters");
    }

    for (name, kube_name) in [
        ("impostor-admin", "system:admin"),
        ("impostor-sa", "system:serviceaccount:default:default"),
        ("impostor-alice", "alice"),
    ] {
        let tokens = kc.password_grant(user(name)).await.unwrap();
        assert_eq!(claims(&tokens.id_token)["kube_name"], kube_name, "{name}");
        assert_eq!(
            claims(&tokens.access_token)["kube_name"],
            kube_name,
            "{name}"
        );
    }
}

#[tokio::test]
async fn the_gateway_logs_in_through_the_form_with_pkce() {
    let kc = keycloak().await;
    let pkce = idp::pkce();
    let state = idp::random_state();
    let url = kc.authorization_url(idp::GATEWAY_CLIENT_ID, REDIRECT, &state, &pkce.challenge);
    let carol = user("carol");
    let location = idp::login_through_form(&url, carol.username, carol.password)
        .await
        .unwrap();
    assert!(location.starts_with(REDIRECT), "{location}");
    assert!(location.contains("code="), "{location}");
    assert_eq!(query(&location, "state").as_deref(), Some(state.as_str()));
    let code = query(&location, "code").unwrap();

    // A wrong verifier is refused; the right one gets tokens, without a refresh token here.
    assert!(
        kc.exchange_code(&code, REDIRECT, &idp::pkce().verifier)
            .await
            .is_err()
    );
    let pkce2 = idp::pkce();
    let state2 = idp::random_state();
    let url = kc.authorization_url(idp::GATEWAY_CLIENT_ID, REDIRECT, &state2, &pkce2.challenge);
    let location = idp::login_through_form(&url, carol.username, carol.password)
        .await
        .unwrap();
    let code = query(&location, "code").unwrap();
    let tokens = kc
        .exchange_code(&code, REDIRECT, &pkce2.verifier)
        .await
        .unwrap();
    let id = claims(&tokens.id_token);
    assert_eq!(id["aud"], idp::GATEWAY_CLIENT_ID);
    assert_eq!(id["email"], "carol@tether.test");
    assert_eq!(id["groups"], serde_json::json!(["tether-developers"]));
    assert!(tokens.refresh_token.is_none(), "refresh tokens are off");
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    let kc = keycloak().await;
    let pkce = idp::pkce();
    let url = kc.authorization_url(
        idp::GATEWAY_CLIENT_ID,
        REDIRECT,
        &idp::random_state(),
        &pkce.challenge,
    );
    let err = idp::login_through_form(&url, "alice", "not-alices-password")
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
    let mut wrong = *user("alice");
    wrong.password = "not-alices-password";
    assert!(kc.password_grant(&wrong).await.is_err());
}

#[tokio::test]
async fn pkce_and_registered_redirects_are_enforced() {
    let kc = keycloak().await;
    // No code_challenge: the gateway client requires S256.
    let mut url = reqwest::Url::parse(&kc.authorization_endpoint()).unwrap();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", idp::GATEWAY_CLIENT_ID)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("scope", "openid")
        .append_pair("state", "s");
    assert!(
        idp::login_through_form(url.as_str(), "alice", "alice-password")
            .await
            .is_err()
    );
    // A redirect URI the gateway client does not have.
    let pkce = idp::pkce();
    let url = kc.authorization_url(
        idp::GATEWAY_CLIENT_ID,
        "http://127.0.0.1:18081/elsewhere",
        "s",
        &pkce.challenge,
    );
    assert!(
        idp::login_through_form(&url, "alice", "alice-password")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_cli_client_accepts_any_loopback_port() {
    let kc = keycloak().await;
    let alice = user("alice");
    for port in [tether_e2e::free_port().unwrap(), 8000] {
        let redirect = format!("http://127.0.0.1:{port}/callback");
        let pkce = idp::pkce();
        let url = kc.authorization_url(idp::CLI_CLIENT_ID, &redirect, "st", &pkce.challenge);
        let location = idp::login_through_form(&url, alice.username, alice.password)
            .await
            .unwrap();
        assert!(location.starts_with(&redirect), "{location}");
        assert_eq!(query(&location, "state").as_deref(), Some("st"));
    }
    // Not a loopback address: refused.
    let pkce = idp::pkce();
    let url = kc.authorization_url(
        idp::CLI_CLIENT_ID,
        "http://evil.test:8000/callback",
        "st",
        &pkce.challenge,
    );
    assert!(
        idp::login_through_form(&url, alice.username, alice.password)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_cli_client_can_start_a_device_authorization() {
    let kc = keycloak().await;
    let client = reqwest::Client::new();
    // Keycloak enforces the client's PKCE on the device grant too (RFC 8628 does not ask for
    // it): without a challenge it answers `Missing parameter: code_challenge_method`.
    let pkce = idp::pkce();
    let without = client
        .post(format!(
            "{}/protocol/openid-connect/auth/device",
            kc.issuer()
        ))
        .form(&[("client_id", idp::CLI_CLIENT_ID), ("scope", "openid")])
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), 400);
    let resp = client
        .post(format!(
            "{}/protocol/openid-connect/auth/device",
            kc.issuer()
        ))
        .form(&[
            ("client_id", idp::CLI_CLIENT_ID),
            ("scope", "openid"),
            ("code_challenge", &pkce.challenge),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let device: serde_json::Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{status}: {device}");
    assert!(device["user_code"].is_string(), "{device}");
    assert!(
        device["verification_uri"]
            .as_str()
            .is_some_and(|u| u.starts_with(&kc.issuer())),
        "{device}"
    );
    let pending = client
        .post(kc.token_endpoint())
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("client_id", idp::CLI_CLIENT_ID),
            ("device_code", device["device_code"].as_str().unwrap()),
            ("code_verifier", &pkce.verifier),
        ])
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = pending.json().await.unwrap();
    assert_eq!(body["error"], "authorization_pending", "{body}");

    // The gateway client has no device grant.
    let refused = client
        .post(format!(
            "{}/protocol/openid-connect/auth/device",
            kc.issuer()
        ))
        .form(&[
            ("client_id", idp::GATEWAY_CLIENT_ID),
            ("client_secret", idp::GATEWAY_CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap();
    assert!(!refused.status().is_success(), "{}", refused.status());
}

#[tokio::test]
async fn logout_redirects_to_a_registered_uri() {
    let kc = keycloak().await;
    let pkce = idp::pkce();
    let url = kc.authorization_url(idp::GATEWAY_CLIENT_ID, REDIRECT, "lo", &pkce.challenge);
    let alice = user("alice");
    let location = idp::login_through_form(&url, alice.username, alice.password)
        .await
        .unwrap();
    let code = query(&location, "code").unwrap();
    let tokens = kc
        .exchange_code(&code, REDIRECT, &pkce.verifier)
        .await
        .unwrap();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut logout =
        reqwest::Url::parse(&format!("{}/protocol/openid-connect/logout", kc.issuer())).unwrap();
    logout
        .query_pairs_mut()
        .append_pair("id_token_hint", &tokens.id_token)
        .append_pair("post_logout_redirect_uri", REDIRECT)
        .append_pair("state", "bye");
    let resp = client.get(logout).send().await.unwrap();
    assert!(resp.status().is_redirection(), "{}", resp.status());
    let to = resp.headers()["location"].to_str().unwrap();
    assert!(to.starts_with(REDIRECT), "{to}");
    assert_eq!(query(to, "state").as_deref(), Some("bye"));
}
