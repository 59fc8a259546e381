//! The HTTP contract the page relies on, audit records, and draining on shutdown.

mod common;

use common::*;
use tether_protocol::client::Event;
use tether_protocol::{CloseCode, Mode};

fn cookie_from(head: &str) -> String {
    head.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_default()
        .split_once(':')
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn login_sets_a_strict_http_only_cookie_that_whoami_and_sessions_accept() {
    let gw = TestGateway::start(&[]).await;
    let (status, _, body) = gw
        .http(
            "POST",
            "/api/login",
            &[("Content-Type", "application/json"), ("Origin", ORIGIN)],
            r#"{"token":"wrong-token-123"}"#,
        )
        .await;
    assert_eq!(status, 401);
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string(),
        "{body}"
    );

    let (status, _, _) = gw
        .http(
            "POST",
            "/api/login",
            &[("Origin", "https://evil.example")],
            &format!(r#"{{"token":"{ALICE}"}}"#),
        )
        .await;
    assert_eq!(status, 403, "cross-site login refused");

    let (status, head, _) = gw
        .http(
            "POST",
            "/api/login",
            &[("Content-Type", "application/json"), ("Origin", ORIGIN)],
            &format!(r#"{{"token":"{ALICE}"}}"#),
        )
        .await;
    assert_eq!(status, 204);
    let set = cookie_from(&head);
    assert!(set.starts_with("tether_session="), "{set}");
    assert!(
        !set.contains(ALICE),
        "the cookie must not hold the token: {set}"
    );
    for attr in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/", "Max-Age="] {
        assert!(set.contains(attr), "{attr} missing in {set}");
    }
    let cookie = set.split(';').next().unwrap().to_owned();

    let (status, _, body) = gw
        .http("GET", "/api/whoami", &[("Cookie", &cookie)], "")
        .await;
    assert_eq!(status, 200, "{body}");
    let who: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(who["user"], "alice");
    assert_eq!(who["groups"], serde_json::json!(["devs"]));
    assert_eq!(gw.http("GET", "/api/whoami", &[], "").await.0, 401);

    gw.index()
        .write()
        .unwrap()
        .apply(&ready_session("team-b", "hidden", "uid-h", "127.0.0.1:1"));
    let (status, _, body) = gw
        .http("GET", "/api/sessions", &[("Cookie", &cookie)], "")
        .await;
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        list,
        serde_json::json!([{
            "namespace": NS, "name": SESSION, "phase": "Ready", "ready": true, "message": "",
            "owner": null, "canAttach": true, "canObserve": true,
        }]),
        "only sessions the user may open, team-b/hidden left out"
    );
    let (_, _, body) = gw
        .http(
            "GET",
            "/api/sessions?namespace=team-b",
            &[("Cookie", &cookie)],
            "",
        )
        .await;
    assert_eq!(body.trim(), "[]");
    let (_, _, body) = gw
        .http(
            "GET",
            "/api/sessions",
            &[("Cookie", &gw.sign_in(BOB).await)],
            "",
        )
        .await;
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["canAttach"], false);
    assert_eq!(list[0]["canObserve"], true);

    // The cookie works for the WebSocket too (a browser cannot set subprotocol tokens nicely).
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws/{NS}/{SESSION}?mode=observe", gw.addr),
    )
    .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "tether.v2".parse().unwrap());
    req.headers_mut().insert("origin", ORIGIN.parse().unwrap());
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    let (_ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "tether.v2");

    let (status, head, body) = gw
        .http(
            "POST",
            "/api/logout",
            &[("Origin", ORIGIN), ("Cookie", &cookie)],
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(cookie_from(&head).contains("Max-Age=0"), "{head}");
    // Signed out on the server: the same cookie, copied before, is useless now.
    let (status, _, body) = gw
        .http("GET", "/api/whoami", &[("Cookie", &cookie)], "")
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("you signed out"), "{body}");
}

#[tokio::test]
async fn insecure_cookies_drop_secure_for_localhost_development() {
    let gw = TestGateway::start(&["--insecure-cookies"]).await;
    let (status, head, _) = gw
        .http(
            "POST",
            "/api/login",
            &[],
            &format!(r#"{{"token":"{ALICE}"}}"#),
        )
        .await;
    assert_eq!(status, 204);
    assert!(!cookie_from(&head).contains("Secure"), "{head}");
}

#[tokio::test]
async fn the_page_health_readiness_and_metrics_are_served() {
    let gw = TestGateway::start(&[]).await;
    let (status, head, body) = gw.http("GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );
    assert!(
        body.contains("<html") || body.contains("<!doctype") || body.contains("<!DOCTYPE"),
        "{body}"
    );
    assert_eq!(
        gw.http("GET", "/assets/does-not-exist.js", &[], "").await.0,
        404
    );
    assert_eq!(gw.http("GET", "/healthz", &[], "").await.0, 200);
    assert_eq!(gw.http("GET", "/readyz", &[], "").await.0, 200);
    // Metrics only on the admin listener, which also serves the probes.
    assert_eq!(gw.http("GET", "/metrics", &[], "").await.0, 404);
    let (status, _, body) = gw.admin_http("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("tether_gateway_jwks_fetches_total"), "{body}");
    assert_eq!(gw.admin_http("/healthz").await.0, 200);
    assert_eq!(gw.admin_http("/readyz").await.0, 200);
    assert_eq!(
        gw.admin_http("/").await.0,
        404,
        "the page is not on the admin port"
    );
}

#[tokio::test]
async fn readyz_waits_for_the_index_to_sync() {
    let gw = TestGateway::start_with(Options {
        index: Some(tether_gateway::index::Index::shared()),
        ..Default::default()
    })
    .await;
    assert_eq!(gw.http("GET", "/readyz", &[], "").await.0, 503);
    gw.index().write().unwrap().relist_done();
    assert_eq!(gw.http("GET", "/readyz", &[], "").await.0, 200);
}

#[tokio::test]
async fn each_attach_has_exactly_one_start_and_one_end_record_and_shutdown_says_reconnect() {
    let mut gw = TestGateway::start(&[]).await;
    // One that ends normally, one refused as read-only, one cut by shutdown.
    let mut t = gw.open(ALICE, Mode::Attach).await;
    t.send_input(b"hello").await.unwrap();
    while !matches!(t.next_event().await.unwrap(), Event::Output { .. }) {}
    t.close().await.unwrap();

    let (mut ws, _) = gw
        .ws(
            &format!("/ws/{NS}/{SESSION}?mode=observe"),
            Some(ORIGIN),
            Some(BOB),
        )
        .await
        .unwrap();
    send(
        &mut ws,
        tether_protocol::ClientFrame::Open {
            size: Default::default(),
        }
        .encode(),
    )
    .await;
    send(
        &mut ws,
        tether_protocol::ClientFrame::Input(b"x".to_vec().into()).encode(),
    )
    .await;
    assert_eq!(closed(&mut ws).await.0, CloseCode::READ_ONLY.0);

    let mut live = gw.open(ALICE, Mode::Attach).await;
    let stopping = tokio::spawn(async move {
        gw.stop().await;
        gw
    });
    let ev = tokio::time::timeout(STEP, async {
        loop {
            match live.next_event().await {
                Ok(Event::Closed { code, reason }) => return (code, reason),
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(ev.0, Some(CloseCode::GOING_AWAY));
    assert!(ev.1.contains("reconnect"), "{}", ev.1);
    let gw = stopping.await.unwrap();

    let lines = gw.audit_lines();
    let starts: Vec<_> = lines.iter().filter(|l| l["event"] == "attach").collect();
    let ends: Vec<_> = lines.iter().filter(|l| l["event"] == "detach").collect();
    assert_eq!(starts.len(), 3, "{lines:#?}");
    assert_eq!(ends.len(), 3, "{lines:#?}");
    for s in &starts {
        assert_eq!(
            ends.iter().filter(|e| e["id"] == s["id"]).count(),
            1,
            "one end for {s}"
        );
    }
    let first = ends.iter().find(|e| e["id"] == starts[0]["id"]).unwrap();
    assert_eq!(first["user"], "alice");
    assert_eq!(first["session"], format!("{NS}/{SESSION}"));
    assert_eq!(first["mode"], "attach");
    assert!(first["bytesToAgent"].as_u64().unwrap() > 5);
    assert!(first["bytesToClient"].as_u64().unwrap() > 5);
    // The client address (the socket peer here: no --trusted-proxies).
    assert_eq!(first["source"], "127.0.0.1");
    assert!(
        ends.iter()
            .any(|e| e["closeCode"] == CloseCode::READ_ONLY.0)
    );
    assert!(
        ends.iter()
            .any(|e| e["closeCode"] == CloseCode::GOING_AWAY.0)
    );
}

/// axum's `WebSocketUpgrade` checks what the hand-rolled upgrade did not: a
/// `Sec-WebSocket-Version` other than 13 is refused, where version 13 is upgraded.
#[tokio::test]
async fn an_upgrade_with_a_wrong_websocket_version_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start(&[]).await;
    let head_for = |version: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let req = format!(
            "GET /ws/{NS}/{SESSION} HTTP/1.1\r\nHost: x\r\nOrigin: {ORIGIN}\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\
             Sec-WebSocket-Protocol: tether.v2, {}\r\n\r\n",
            tether_gateway::server::bearer_protocol(ALICE)
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(STEP, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let refused = head_for("8").await;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    assert!(
        refused.contains("expected a WebSocket upgrade"),
        "{refused}"
    );
    let accepted = head_for("13").await;
    assert!(accepted.starts_with("HTTP/1.1 101"), "{accepted}");
    assert!(
        accepted
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol: tether.v2\r\n"),
        "only tether.v2 is selected, the token is not echoed: {accepted}"
    );
}

/// Refused attempts are audited with their status, reason, who (once known) and from where.
#[tokio::test]
async fn refused_attempts_are_audited_with_reason_who_and_where() {
    let gw = TestGateway::start(&["--handshake-rate=2"]).await;
    let at = |p: &str| format!("/ws/{NS}/{p}");
    assert_eq!(
        gw.ws(&at(SESSION), Some(ORIGIN), None).await.unwrap_err().0,
        401
    );
    assert_eq!(
        gw.ws(&at(SESSION), Some(ORIGIN), Some(CAROL))
            .await
            .unwrap_err()
            .0,
        403
    );
    assert_eq!(
        gw.ws(
            &format!("{}?mode=attach", at(SESSION)),
            Some(ORIGIN),
            Some(BOB)
        )
        .await
        .unwrap_err()
        .0,
        403
    );
    // Until the user's budget (burst of 4) is spent: bob's is, alice's is not.
    let mut limited = false;
    for _ in 0..6 {
        if gw
            .ws(&at(SESSION), Some(ORIGIN), Some(BOB))
            .await
            .unwrap_err()
            .0
            == 429
        {
            limited = true;
        }
    }
    assert!(limited);
    let refused: Vec<_> = gw
        .audit_lines()
        .into_iter()
        .filter(|l| l["event"] == "refused")
        .collect();
    let first = &refused[0];
    assert_eq!(first["status"], 401, "{first}");
    assert_eq!(first["user"], serde_json::Value::Null, "{first}");
    assert_eq!(first["source"], "127.0.0.1", "{first}");
    assert_eq!(first["session"], format!("{NS}/{SESSION}"), "{first}");
    assert_eq!(refused[1]["status"], 403);
    assert_eq!(refused[1]["user"], "carol");
    assert_eq!(refused[1]["reason"], "forbidden");
    assert!(
        refused[1]["error"].as_str().unwrap().contains("may not"),
        "{}",
        refused[1]
    );
    assert!(
        refused
            .iter()
            .any(|r| r["status"] == 429 && r["user"] == "bob" && r["reason"] == "rate_limited"),
        "{refused:?}"
    );
    assert!(
        !gw.audit_lines().iter().any(|l| l["event"] == "attach"),
        "nothing was admitted"
    );
}
