//! OIDC keys fetched from a JWKS URL: a valid ID token gets in, and a flood of unknown `kid`s
//! causes at most one refetch.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;

#[tokio::test]
async fn keys_come_from_the_jwks_url_and_refetches_stay_rate_limited() {
    let jwks = std::fs::read_to_string(data("jwks.json")).unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let body = jwks.clone();
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let gw = TestGateway::start(&[
        &format!("--oidc-jwks-url=http://{idp}/jwks"),
        "--handshake-rate=1000",
    ])
    .await;
    let path = format!("/ws/{NS}/{SESSION}?mode=attach");
    let good = id_token(good_claims("oidc-user", &["devs"]), Some("test-key-1"));
    assert!(gw.ws(&path, Some(ORIGIN), Some(&good)).await.is_ok());
    assert_eq!(served.load(Ordering::SeqCst), 1);
    for i in 0..20 {
        let t = id_token(good_claims("x", &[]), Some(&format!("rotated-{i}")));
        assert_eq!(
            gw.ws(&path, Some(ORIGIN), Some(&t)).await.unwrap_err().0,
            401
        );
    }
    assert!(
        served.load(Ordering::SeqCst) <= 2,
        "{} JWKS fetches",
        served.load(Ordering::SeqCst)
    );
    // The honest token still works from the cache.
    assert!(gw.ws(&path, Some(ORIGIN), Some(&good)).await.is_ok());
}
