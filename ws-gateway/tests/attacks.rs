//! The issue's attack list: each attempt is refused with the right status or close code while
//! the gateway keeps serving an honest client connected throughout.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::json;
use tether_protocol::{ClientFrame, CloseCode, Mode, Size};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn path(mode: &str) -> String {
    format!("/ws/{NS}/{SESSION}?mode={mode}")
}

#[tokio::test]
async fn every_attack_is_refused_while_an_honest_client_keeps_working() {
    let gw = TestGateway::start(&[
        "--max-frame-bytes=1024",
        "--max-connections-per-user=3",
        "--handshake-rate=1000",
    ])
    .await;
    let mut honest = gw.open(ALICE, Mode::Attach).await;
    still_serving(&mut honest, "first").await;

    // No token at all.
    let (status, body) = gw
        .ws(&path("attach"), Some(ORIGIN), None)
        .await
        .unwrap_err();
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("no token"),
        "{body}"
    );

    // alg: none.
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(good_claims("mallory", &["devs"]))
    );
    assert_eq!(
        gw.ws(&path("attach"), Some(ORIGIN), Some(&none))
            .await
            .unwrap_err()
            .0,
        401
    );

    // HS256 "signed" with the RSA public key as the HMAC secret.
    let public = std::fs::read(data("oidc-rsa.pub.pem")).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("test-key-1".into());
    let hs = jsonwebtoken::encode(
        &header,
        &good_claims("mallory", &["devs"]),
        &jsonwebtoken::EncodingKey::from_secret(&public),
    )
    .unwrap();
    let (status, body) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(&hs))
        .await
        .unwrap_err();
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not accepted"),
        "{body}"
    );

    // Expired, not yet valid, wrong issuer, wrong audience.
    let mut c = good_claims("alice-oidc", &["devs"]);
    c["exp"] = json!(now() - 3600);
    c["iat"] = json!(now() - 7200);
    assert_eq!(
        gw.ws(
            &path("attach"),
            Some(ORIGIN),
            Some(&id_token(c, Some("test-key-1")))
        )
        .await
        .unwrap_err()
        .0,
        401
    );
    let mut c = good_claims("alice-oidc", &["devs"]);
    c["nbf"] = json!(now() + 3600);
    assert_eq!(
        gw.ws(
            &path("attach"),
            Some(ORIGIN),
            Some(&id_token(c, Some("test-key-1")))
        )
        .await
        .unwrap_err()
        .0,
        401
    );
    let mut c = good_claims("alice-oidc", &["devs"]);
    c["aud"] = json!("someone-else");
    assert_eq!(
        gw.ws(
            &path("attach"),
            Some(ORIGIN),
            Some(&id_token(c, Some("test-key-1")))
        )
        .await
        .unwrap_err()
        .0,
        401
    );
    // A wrong issuer is not routed to OIDC at all; without TokenReview it is simply unknown.
    let mut c = good_claims("alice-oidc", &["devs"]);
    c["iss"] = json!("https://evil.example");
    assert_eq!(
        gw.ws(
            &path("attach"),
            Some(ORIGIN),
            Some(&id_token(c, Some("test-key-1")))
        )
        .await
        .unwrap_err()
        .0,
        401
    );

    // The same claims, correctly signed, do get in: the refusals above were for the right reason.
    let good = id_token(good_claims("alice-oidc", &["devs"]), Some("test-key-1"));
    let (ws, proto) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(&good))
        .await
        .unwrap();
    assert_eq!(
        proto.as_deref(),
        Some("tether.v2"),
        "only tether.v2 is selected, never the token"
    );
    drop(ws);

    // A flood of unknown kids: the JWKS is refetched at most once per interval.
    let fetches_before = gw.metric("tether_gateway_jwks_fetches_total").await;
    for i in 0..30 {
        let t = id_token(good_claims("x", &[]), Some(&format!("unknown-{i}")));
        assert_eq!(
            gw.ws(&path("attach"), Some(ORIGIN), Some(&t))
                .await
                .unwrap_err()
                .0,
            401
        );
    }
    let fetches = gw.metric("tether_gateway_jwks_fetches_total").await - fetches_before;
    assert!(fetches <= 1.0, "{fetches} JWKS fetches for 30 unknown kids");

    // A valid token for a namespace the user has no binding in, and a user with no rights.
    gw.index().write().unwrap().apply(&ready_session(
        "team-b",
        "other",
        "uid-other",
        &gw.backend_addr.to_string(),
    ));
    let (status, body) = gw
        .ws("/ws/team-b/other?mode=attach", Some(ORIGIN), Some(ALICE))
        .await
        .unwrap_err();
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("may not attach"),
        "{body}"
    );
    assert_eq!(
        gw.ws(&path("observe"), Some(ORIGIN), Some(CAROL))
            .await
            .unwrap_err()
            .0,
        403
    );
    // An observer may not attach.
    assert_eq!(
        gw.ws(&path("attach"), Some(ORIGIN), Some(BOB))
            .await
            .unwrap_err()
            .0,
        403
    );

    // An observer sending input, or a resize: closed as read-only by the gateway.
    for frame in [
        ClientFrame::Input(b"rm -rf /\r".to_vec().into()),
        ClientFrame::Resize(Size::new(100, 30).unwrap()),
    ] {
        let (mut ws, _) = gw
            .ws(&path("observe"), Some(ORIGIN), Some(BOB))
            .await
            .unwrap();
        send(
            &mut ws,
            ClientFrame::Open {
                size: Size::default(),
            }
            .encode(),
        )
        .await;
        send(&mut ws, frame.encode()).await;
        let (code, reason) = closed(&mut ws).await;
        assert_eq!(code, CloseCode::READ_ONLY.0, "{reason}");
        assert!(reason.contains("read-only"), "{reason}");
    }

    // Origins: foreign, null, missing, and the suffix trick.
    for origin in [
        Some("https://evil.example"),
        Some("null"),
        None,
        Some("https://allowed.example.evil.example"),
    ] {
        let (status, body) = gw
            .ws(&path("attach"), origin, Some(ALICE))
            .await
            .unwrap_err();
        assert_eq!(status, 403, "{origin:?}: {body}");
        assert!(body["error"].as_str().unwrap().contains("origin"), "{body}");
    }

    // A frame one byte over the limit.
    let (mut ws, _) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(ALICE))
        .await
        .unwrap();
    send(
        &mut ws,
        ClientFrame::Open {
            size: Size::default(),
        }
        .encode(),
    )
    .await;
    let mut big = vec![tether_protocol::frame::client_type::INPUT];
    big.resize(1025, b'x');
    send(&mut ws, big).await;
    assert_eq!(closed(&mut ws).await.0, CloseCode::FRAME_TOO_LARGE.0);
    // Exactly at the limit is fine.
    let (mut ws, _) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(ALICE))
        .await
        .unwrap();
    send(
        &mut ws,
        ClientFrame::Open {
            size: Size::default(),
        }
        .encode(),
    )
    .await;
    let mut ok = vec![tether_protocol::frame::client_type::INPUT];
    ok.resize(1024, b'y');
    send(&mut ws, ok).await;
    drop(ws);

    // A WebSocket whose OPEN never comes is closed with the handshake timeout.
    let (mut ws, _) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(ALICE))
        .await
        .unwrap();
    assert_eq!(closed(&mut ws).await.0, CloseCode::HANDSHAKE_TIMEOUT.0);

    // An HTTP handshake that never finishes is dropped by the server.
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /ws/team-a/dev HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(STEP, slow.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "a stalled handshake must be cut off");

    // More connections than the per-user cap (the honest one holds one of alice's three slots).
    let t2 = gw.open(ALICE, Mode::Observe).await;
    let t3 = gw.open(ALICE, Mode::Observe).await;
    let (status, body) = gw
        .ws(&path("observe"), Some(ORIGIN), Some(ALICE))
        .await
        .unwrap_err();
    assert_eq!(status, 429, "{body}");
    drop((t2, t3));

    still_serving(&mut honest, "last").await;
    let refused = gw.metric("tether_gateway_handshake_failures_total").await;
    assert!(refused >= 15.0, "handshake failures counted: {refused}");
}

#[tokio::test]
async fn an_unknown_session_is_404_and_one_not_ready_says_its_phase_and_message() {
    let gw = TestGateway::start(&[]).await;
    let (status, body) = gw
        .ws("/ws/team-a/nope?mode=attach", Some(ORIGIN), Some(ALICE))
        .await
        .unwrap_err();
    assert_eq!(status, 404, "{body}");

    let mut s = ready_session(NS, "starting", "uid-s", "");
    s.status.as_mut().unwrap().phase = Some(tether_api::SessionPhase::Starting);
    s.status.as_mut().unwrap().message = Some("pulling image".into());
    gw.index().write().unwrap().apply(&s);
    let (status, body) = gw
        .ws("/ws/team-a/starting?mode=attach", Some(ORIGIN), Some(ALICE))
        .await
        .unwrap_err();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["phase"], "Starting");
    assert_eq!(body["message"], "pulling image");

    let mut s = ready_session(NS, "done", "uid-d", "127.0.0.1:1");
    s.status.as_mut().unwrap().phase = Some(tether_api::SessionPhase::Succeeded);
    gw.index().write().unwrap().apply(&s);
    let (status, body) = gw
        .ws("/ws/team-a/done?mode=attach", Some(ORIGIN), Some(ALICE))
        .await
        .unwrap_err();
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["phase"], "Succeeded");
}

/// The page asks `GET /api/sessions/{ns}/{name}?mode=` when an upgrade fails (a browser sees
/// only 1006) and shows the words; they must be the same answer the upgrade gives.
#[tokio::test]
async fn a_deleted_session_is_410_and_the_status_endpoint_gives_the_upgrades_answer() {
    let gw = TestGateway::start(&[]).await;
    let status = |token: &'static str, path: String| {
        let gw = &gw;
        async move {
            let cookie = gw.sign_in(token).await;
            let (code, _, body) = gw.http("GET", &path, &[("Cookie", &cookie)], "").await;
            let body: serde_json::Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
            (code, body)
        }
    };
    let url = |name: &str, mode: &str| format!("/api/sessions/{NS}/{name}?mode={mode}");

    // Ready and allowed: 200, with the phase.
    let (code, body) = status(ALICE, url(SESSION, "attach")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["phase"], "Ready");
    assert_eq!(body["mode"], "attach");
    // bob may observe, not attach; carol may do neither; a bad mode is a 400 that says so.
    assert_eq!(status(BOB, url(SESSION, "observe")).await.0, 200);
    assert_eq!(status(BOB, url(SESSION, "attach")).await.0, 403);
    assert_eq!(status(CAROL, url(SESSION, "observe")).await.0, 403);
    let (code, body) = status(ALICE, url(SESSION, "write")).await;
    assert_eq!(code, 400);
    assert!(
        body["error"].as_str().unwrap().contains("\"write\""),
        "{body}"
    );
    // No token: 401, as for the upgrade.
    let (code, _, _) = gw.http("GET", &url(SESSION, "attach"), &[], "").await;
    assert_eq!(code, 401);

    // Deleted: 410 with words that say so, from the upgrade and from the status endpoint.
    gw.index().write().unwrap().delete(NS, SESSION);
    let (code, body) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(ALICE))
        .await
        .unwrap_err();
    assert_eq!(code, 410, "{body}");
    let words = body["error"].as_str().unwrap();
    assert!(
        words.contains(&format!("{NS}/{SESSION}")) && words.contains("was deleted"),
        "{words}"
    );
    let (code, body) = status(ALICE, url(SESSION, "attach")).await;
    assert_eq!(code, 410, "{body}");
    assert!(body["error"].as_str().unwrap().contains("was deleted"));
    // Someone who may not see it learns nothing: still 403, not 410.
    assert_eq!(status(CAROL, url(SESSION, "observe")).await.0, 403);
    // Never existed: 404.
    assert_eq!(status(ALICE, url("never", "attach")).await.0, 404);
    let refused = gw
        .metric("tether_gateway_handshake_failures_total{reason=\"deleted\"}")
        .await;
    assert_eq!(
        refused, 1.0,
        "the status endpoint does not count as a failed handshake"
    );
}

#[tokio::test]
async fn the_handshake_rate_is_limited_per_source_address() {
    let gw = TestGateway::start(&["--handshake-rate=2"]).await;
    let mut limited = 0;
    for _ in 0..10 {
        if let Err((429, _)) = gw.ws(&path("attach"), Some(ORIGIN), Some(CAROL)).await {
            limited += 1;
        }
    }
    assert!(
        limited >= 5,
        "only {limited} of 10 rapid handshakes were limited"
    );
    // The status endpoint, which costs an access review too, shares the budget.
    let status = format!("/api/sessions/{NS}/{SESSION}?mode=attach");
    let cookie = gw.sign_in(ALICE).await;
    let mut limited = 0;
    for _ in 0..10 {
        if gw.http("GET", &status, &[("Cookie", &cookie)], "").await.0 == 429 {
            limited += 1;
        }
    }
    assert!(
        limited >= 5,
        "only {limited} of 10 rapid status requests were limited"
    );
}

#[tokio::test]
async fn idle_clients_are_closed_with_the_keepalive_code() {
    let gw = TestGateway::start(&["--idle-timeout=1s"]).await;
    let (mut ws, _) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(ALICE))
        .await
        .unwrap();
    send(
        &mut ws,
        ClientFrame::Open {
            size: Size::default(),
        }
        .encode(),
    )
    .await;
    // Hold the socket without reading: the pings go unanswered, so the client counts as gone.
    // (Its socket may be reset before it reads the close, so the gateway's record is asserted.)
    tokio::time::timeout(STEP, async {
        loop {
            if gw.audit_lines().iter().any(|l| l["event"] == "detach") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the idle client is closed");
    let lines = gw.audit_lines();
    let end = lines.iter().find(|l| l["event"] == "detach").unwrap();
    assert_eq!(end["closeCode"], CloseCode::KEEPALIVE_TIMEOUT.0, "{end}");
    drop(ws);
}

/// A message over the WebSocket layer's own limit (twice `--max-frame-bytes` and some) fails in
/// tungstenite, wrapped in axum's error: classified by its type as too large, `4413`.
#[tokio::test]
async fn a_message_over_the_websocket_limit_is_4413_by_error_type() {
    let gw = TestGateway::start(&["--max-frame-bytes=1024"]).await;
    let (mut ws, _) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(ALICE))
        .await
        .unwrap();
    send(
        &mut ws,
        ClientFrame::Open {
            size: Size::default(),
        }
        .encode(),
    )
    .await;
    let mut huge = vec![tether_protocol::frame::client_type::INPUT];
    huge.resize(64 * 1024, b'x');
    send(&mut ws, huge).await;
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::FRAME_TOO_LARGE.0, "{reason}");
    assert_eq!(reason, "frame too large");
}
