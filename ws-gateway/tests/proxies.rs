//! Behind an ingress: `X-Forwarded-For` is believed only from `--trusted-proxies`, and handshake
//! budgets are the client address's before authentication and the user's after, so a flood
//! without a credential locks nobody signed in out.

mod common;

use common::*;
use tether_gateway::server::bearer_protocol;
use tether_protocol::SUBPROTOCOL;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A handshake through "the proxy" (the test connects from 127.0.0.1) for `forwarded_for`;
/// the HTTP status (101 when upgraded).
async fn handshake(
    gw: &TestGateway,
    forwarded_for: &str,
    token: Option<&str>,
    cookie: Option<&str>,
) -> u16 {
    let mut req = format!("ws://{}/ws/{NS}/{SESSION}", gw.addr)
        .into_client_request()
        .unwrap();
    let mut protocols = SUBPROTOCOL.to_owned();
    if let Some(t) = token {
        protocols = format!("{protocols}, {}", bearer_protocol(t));
    }
    let h = req.headers_mut();
    h.insert("sec-websocket-protocol", protocols.parse().unwrap());
    h.insert("origin", ORIGIN.parse().unwrap());
    h.insert("x-forwarded-for", forwarded_for.parse().unwrap());
    if let Some(c) = cookie {
        h.insert("cookie", c.parse().unwrap());
    }
    match tokio::time::timeout(STEP, tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake in time")
    {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

fn sources(gw: &TestGateway) -> Vec<String> {
    gw.audit_lines()
        .iter()
        .filter(|l| l["event"] == "attach")
        .map(|l| l["source"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_flood_without_credentials_through_a_trusted_proxy_leaves_signed_in_users_alone() {
    let gw = TestGateway::start(&[
        "--trusted-proxies=127.0.0.0/8,10.0.0.0/8",
        "--handshake-rate=2",
    ])
    .await;
    let cookie = gw.sign_in(ALICE).await;
    // One client address behind the proxy floods without a credential: its budget runs out.
    let mut limited = 0;
    for _ in 0..20 {
        if handshake(&gw, "203.0.113.7, 10.1.2.3", None, None).await == 429 {
            limited += 1;
        }
    }
    assert!(limited >= 10, "only {limited} of 20 were limited");
    // Many client addresses: each has a budget of its own, and the ones that fail are 401.
    for i in 0..40 {
        let status = handshake(&gw, &format!("198.51.100.{i}"), None, None).await;
        assert_eq!(status, 401, "client {i} behind the proxy");
    }
    // A signed-in user, even from the flooding address, connects: its budget is the user's.
    assert_eq!(
        handshake(&gw, "203.0.113.7", None, Some(&cookie)).await,
        101
    );
    assert_eq!(
        handshake(&gw, "192.0.2.44", Some(ALICE), None).await,
        101,
        "and with a bearer token"
    );
    // The audit names the client the proxy saw, not the proxy.
    let seen = sources(&gw);
    assert!(seen.contains(&"203.0.113.7".to_owned()), "{seen:?}");
    assert!(seen.contains(&"192.0.2.44".to_owned()), "{seen:?}");
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    // No --trusted-proxies: the test's 127.0.0.1 is the client, whatever it writes.
    let gw = TestGateway::start(&["--handshake-rate=2"]).await;
    let mut limited = 0;
    for i in 0..20 {
        // A different made-up address each time: were it believed, nothing would be limited.
        if handshake(&gw, &format!("198.51.100.{i}"), None, None).await == 429 {
            limited += 1;
        }
    }
    assert!(limited >= 10, "only {limited} of 20 were limited");
    assert_eq!(handshake(&gw, "203.0.113.7", Some(ALICE), None).await, 101);
    assert_eq!(sources(&gw), vec!["127.0.0.1".to_owned()]);
}
