//! Identities as kube-apiserver would make them, and connections that end with their credential.
//!
//! ID tokens here are signed with the test provider's key (`tests/data`), so every claim an
//! attacker might put in a token can be tried; `e2e/tests/signin.rs` does the same through a real
//! provider. An honest client stays connected and served throughout.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tether_protocol::{ClientFrame, Size};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn path(mode: &str) -> String {
    format!("/ws/{NS}/{SESSION}?mode={mode}")
}

async fn whoami(gw: &TestGateway, token: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = gw
        .http(
            "GET",
            "/api/whoami",
            &[("Authorization", &format!("Bearer {token}"))],
            "",
        )
        .await;
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}")),
    )
}

fn claims(sub: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = good_claims(sub, &[]);
    c.as_object_mut().unwrap().remove("groups");
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[tokio::test]
async fn claims_map_like_kube_apiserver_and_reserved_names_are_refused() {
    let gw = TestGateway::start(&[]).await;
    let mut honest = gw.open(ALICE, tether_protocol::Mode::Attach).await;

    // The default: `sub` prefixed with the issuer and `#`, so an IdP user named like a
    // Kubernetes user is not that user.
    let (status, who) = whoami(&gw, &id_token(claims("alice", json!({})), None)).await;
    assert_eq!(status, 200, "{who}");
    assert_eq!(who["user"], format!("{ISSUER}#alice"));
    assert_eq!(who["via"], "oidc");
    let (_, who) = whoami(&gw, &id_token(claims("system:admin", json!({})), None)).await;
    assert_eq!(who["user"], format!("{ISSUER}#system:admin"));

    // Groups are not prefixed by default (kube-apiserver's default): system: groups are refused.
    for groups in [json!(["system:masters"]), json!("system:masters")] {
        let token = id_token(claims("mallory", json!({"groups": groups})), None);
        let (status, body) = whoami(&gw, &token).await;
        assert_eq!(status, 401, "{groups}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("reserved for Kubernetes"),
            "{body}"
        );
        let (status, body) = gw
            .ws(&path("attach"), Some(ORIGIN), Some(&token))
            .await
            .unwrap_err();
        assert_eq!(status, 401, "{body}");
    }
    still_serving(&mut honest, "after-groups").await;
}

#[tokio::test]
async fn with_no_username_prefix_system_users_are_still_refused() {
    let gw = TestGateway::start(&["--oidc-username-prefix=-"]).await;
    let (status, who) = whoami(&gw, &id_token(claims("alice", json!({})), None)).await;
    assert_eq!((status, who["user"].as_str()), (200, Some("alice")));
    for sub in ["system:admin", "system:serviceaccount:default:default"] {
        let (status, body) = whoami(&gw, &id_token(claims(sub, json!({})), None)).await;
        assert_eq!(status, 401, "{sub}: {body}");
        assert!(body["error"].as_str().unwrap().contains(sub), "{body}");
    }
    // A groups prefix makes the same group harmless, as it does for kube-apiserver.
    let gw = TestGateway::start(&["--oidc-groups-prefix=oidc:"]).await;
    let token = id_token(claims("m", json!({"groups": ["system:masters"]})), None);
    let (status, who) = whoami(&gw, &token).await;
    assert_eq!(status, 200, "{who}");
    assert_eq!(who["groups"], json!(["oidc:system:masters"]));
}

#[tokio::test]
async fn an_email_username_needs_a_verified_email_and_has_no_prefix() {
    let gw = TestGateway::start(&["--oidc-username-claim=email"]).await;
    let ok = claims("1", json!({"email": "a@x.test", "email_verified": true}));
    let (status, who) = whoami(&gw, &id_token(ok, None)).await;
    assert_eq!((status, who["user"].as_str()), (200, Some("a@x.test")));
    let unverified = claims("1", json!({"email": "a@x.test", "email_verified": false}));
    let (status, body) = whoami(&gw, &id_token(unverified, None)).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not verified"));
}

#[tokio::test]
async fn a_token_that_expires_during_a_connection_ends_it_with_4440() {
    let gw = TestGateway::start(&[]).await;
    let mut honest = gw.open(ALICE, tether_protocol::Mode::Attach).await;
    let mut c = good_claims("alice", &["devs"]);
    c["exp"] = json!(now() + 3);
    let token = id_token(c, None);
    let (mut ws, _) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(&token))
        .await
        .expect("admitted while valid");
    send(
        &mut ws,
        ClientFrame::Open {
            size: Size::default(),
        }
        .encode(),
    )
    .await;
    let (code, reason) = closed_within(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(code, 4440, "{reason}");
    assert!(reason.contains("expired"), "{reason}");
    still_serving(&mut honest, "after-expiry").await;
}

/// A browser connection: the session cookie, no bearer token.
async fn ws_with_cookie(gw: &TestGateway, cookie: &str) -> Ws {
    let mut req = format!("ws://{}{}", gw.addr, path("attach"))
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert("sec-websocket-protocol", "tether.v2".parse().unwrap());
    h.insert("origin", ORIGIN.parse().unwrap());
    h.insert("cookie", cookie.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    send(
        &mut ws,
        ClientFrame::Open {
            size: Size::default(),
        }
        .encode(),
    )
    .await;
    ws
}

#[tokio::test]
async fn signing_out_ends_the_browsers_terminals_and_the_copied_cookie() {
    let gw = TestGateway::start(&[]).await;
    let cookie = gw.sign_in(ALICE).await;
    let copied = cookie.clone();
    let mut ws = ws_with_cookie(&gw, &cookie).await;
    let (status, _, body) = gw
        .http(
            "POST",
            "/api/logout",
            &[("Origin", ORIGIN), ("Cookie", &cookie)],
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (code, reason) = closed_within(&mut ws, Duration::from_secs(5)).await;
    assert_eq!((code, reason.as_str()), (4440, "you signed out"));
    // The copied cookie opens nothing now, on this or any replica (the store is shared).
    let mut req = format!("ws://{}{}", gw.addr, path("attach"))
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "tether.v2".parse().unwrap());
    req.headers_mut().insert("origin", ORIGIN.parse().unwrap());
    req.headers_mut().insert("cookie", copied.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("a signed-out cookie was let in: {:?}", other.map(|_| ())),
    }
    // A forged or altered cookie is refused before any lookup.
    let altered = format!("{}A", copied);
    let (status, _, _) = gw
        .http("GET", "/api/whoami", &[("Cookie", &altered)], "")
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn pasting_tokens_is_only_for_development_gateways() {
    let gw = TestGateway::start(&[]).await;
    // An ID token pasted into the development form is not a development token.
    let token = id_token(good_claims("alice", &["devs"]), None);
    let (status, _, body) = gw
        .http(
            "POST",
            "/api/login",
            &[("Content-Type", "application/json"), ("Origin", ORIGIN)],
            &format!(r#"{{"token":"{token}"}}"#),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = gw.http("GET", "/api/auth", &[], "").await;
    assert_eq!(status, 200);
    let auth: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(auth["developmentTokens"], true);
    assert_eq!(auth["browserSignIn"], false, "no --external-url here");
    assert_eq!(auth["oidc"]["issuer"], ISSUER);
}
