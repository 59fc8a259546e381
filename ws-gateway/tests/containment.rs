//! The agent runs in the user's pod, under the user's control: the gateway treats it as
//! untrusted. Each test puts a malicious or stuck fake agent (a WebSocket server in the test)
//! behind the gateway and checks what the client and the audit log see.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use tether_gateway::authn::UserInfo;
use tether_gateway::authz::{AccessReviewer, AuthzError, Decision};
use tether_gateway::index::Index;
use tether_protocol::frame::Start;
use tether_protocol::{ClientFrame, ClientId, CloseCode, Mode, ServerFrame, Size};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// What the fake agent does once a client has sent its first frame.
#[derive(Clone, Copy)]
enum Behaviour {
    /// `WELCOME`, then a close with the gateway-only code 4411 and "access revoked".
    ForgeRevoked,
    /// `OUTPUT` before any `WELCOME`.
    OutputFirst,
    /// An `OUTPUT` frame of 1 MiB: over the protocol's 65536-byte payload limit.
    OversizedOutput,
    /// Accepts the upgrade, then never reads again.
    StopReading,
    /// Accepts TCP, never answers the upgrade.
    SilentHandshake,
}

fn welcome() -> Vec<u8> {
    ServerFrame::Welcome {
        client_id: ClientId::random(),
        mode: Mode::Attach,
        window: 1 << 20,
        offset: 0,
        start: Start::Replay,
    }
    .encode()
}

async fn fake_agent(behaviour: Behaviour) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if let Behaviour::SilentHandshake = behaviour {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    drop(stream);
                    return;
                }
                let Some(mut ws) = accept_as_agent(stream).await else {
                    return;
                };
                if let Behaviour::StopReading = behaviour {
                    // Holds the socket open and reads nothing more.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    drop(ws);
                    return;
                }
                let _first = ws.next().await;
                match behaviour {
                    Behaviour::ForgeRevoked => {
                        let _ = ws.send(Message::binary(welcome())).await;
                        let _ = ws
                            .send(Message::Close(Some(CloseFrame {
                                code: 4411.into(),
                                reason: "access revoked: you were fired".into(),
                            })))
                            .await;
                    }
                    Behaviour::OutputFirst => {
                        let f = ServerFrame::Output {
                            offset: 0,
                            data: bytes::Bytes::from_static(b"hello"),
                        };
                        let _ = ws.send(Message::binary(f.encode())).await;
                    }
                    Behaviour::OversizedOutput => {
                        let _ = ws.send(Message::binary(welcome())).await;
                        let mut f = vec![0x82u8; 9];
                        f.resize(9 + (1 << 20), b'x');
                        let _ = ws.send(Message::binary(f)).await;
                    }
                    _ => {}
                }
                // Keep the socket until the gateway closes it.
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    addr
}

/// RBAC that a test can turn off.
#[derive(Default)]
struct Switch(AtomicBool);

impl AccessReviewer for Switch {
    fn review<'a>(
        &'a self,
        _user: &'a UserInfo,
        _namespace: &'a str,
        _name: Option<&'a str>,
        _verb: &'a str,
    ) -> BoxFuture<'a, Result<Decision, AuthzError>> {
        let allowed = !self.0.load(Ordering::SeqCst);
        Box::pin(async move {
            Ok(Decision {
                allowed,
                reason: if allowed {
                    "allowed"
                } else {
                    "the binding was deleted"
                }
                .into(),
            })
        })
    }
}

async fn gateway_for(agent: std::net::SocketAddr, access: Arc<Switch>) -> TestGateway {
    gateway_with(agent, access, "30s").await
}

async fn gateway_with(
    agent: std::net::SocketAddr,
    access: Arc<Switch>,
    agent_timeout: &str,
) -> TestGateway {
    let idx = Index::shared();
    {
        let mut i = idx.write().unwrap();
        i.relist_begin();
        i.relist_apply(&ready_session(NS, SESSION, SESSION_UID, &agent.to_string()));
        i.relist_done();
    }
    TestGateway::start_with(Options {
        flags: vec![
            "--reauthorize-every=1s".into(),
            "--authz-cache-ttl=0s".into(),
            format!("--agent-timeout={agent_timeout}"),
        ],
        access: Some(access),
        index: Some(idx),
        ..Default::default()
    })
    .await
}

async fn opened(gw: &TestGateway) -> Ws {
    let (mut ws, _) = gw
        .ws(&format!("/ws/{NS}/{SESSION}"), Some(ORIGIN), Some(ALICE))
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

fn last_end(gw: &TestGateway) -> serde_json::Value {
    gw.audit_lines()
        .into_iter()
        .rfind(|l| l["event"] == "detach")
        .expect("an end record")
}

#[tokio::test]
async fn a_forged_revoked_close_from_the_agent_reaches_client_and_audit_as_4500() {
    let gw = gateway_for(fake_agent(Behaviour::ForgeRevoked).await, Arc::default()).await;
    let mut ws = opened(&gw).await;
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::INTERNAL.0, "{reason}");
    assert!(reason.contains("gateway's close code 4411"), "{reason}");
    let end = wait_for_end(&gw).await;
    assert_eq!(end["closeCode"], 4500, "{end}");
    assert_eq!(end["endedBy"], "agent", "{end}");
    assert!(
        !end["closeReason"]
            .as_str()
            .unwrap()
            .contains("access revoked"),
        "the agent's words never read as the gateway's decision: {end}"
    );
}

async fn wait_for_end(gw: &TestGateway) -> serde_json::Value {
    tokio::time::timeout(STEP, async {
        loop {
            if gw.audit_lines().iter().any(|l| l["event"] == "detach") {
                return last_end(gw);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("an end record in time")
}

#[tokio::test]
async fn agent_frames_out_of_order_or_over_the_protocols_limits_close_with_4500() {
    for (behaviour, words) in [
        (Behaviour::OutputFirst, "a frame before WELCOME"),
        (Behaviour::OversizedOutput, "size limits"),
    ] {
        let gw = gateway_for(fake_agent(behaviour).await, Arc::default()).await;
        let mut ws = opened(&gw).await;
        let (code, reason) = closed(&mut ws).await;
        assert_eq!(code, CloseCode::INTERNAL.0, "{reason}");
        assert!(reason.contains(words), "{reason}");
        let end = wait_for_end(&gw).await;
        assert_eq!(end["endedBy"], "gateway-protocol", "{end}");
    }
}

/// Sends 64 KiB inputs until the gateway stops taking them: the agent reads nothing, so the
/// gateway's write to it blocks once the socket buffers are full.
fn flood_input(
    ws: Ws,
) -> (
    futures::stream::SplitStream<Ws>,
    tokio::task::JoinHandle<()>,
) {
    let (mut tx, rx) = ws.split();
    let flood = tokio::spawn(async move {
        let input = ClientFrame::Input(vec![b'y'; 65535].into()).encode();
        while tx.send(Message::binary(input.clone())).await.is_ok() {}
    });
    (rx, flood)
}

async fn close_of(rx: &mut futures::stream::SplitStream<Ws>) -> u16 {
    while let Some(m) = rx.next().await {
        match m {
            Ok(Message::Close(Some(f))) => return u16::from(f.code),
            Ok(_) => {}
            Err(_) => return 1006,
        }
    }
    1006
}

#[tokio::test]
async fn an_agent_that_stops_reading_does_not_hold_up_revocation() {
    let access = Arc::new(Switch::default());
    let gw = gateway_for(fake_agent(Behaviour::StopReading).await, access.clone()).await;
    let ws = opened(&gw).await;
    let (mut rx, flood) = flood_input(ws);
    // Long enough for the socket buffers to fill and the gateway's write to block.
    tokio::time::sleep(Duration::from_secs(2)).await;
    access.0.store(true, Ordering::SeqCst);
    let revoked_at = Instant::now();
    let code = tokio::time::timeout(Duration::from_secs(5), close_of(&mut rx))
        .await
        .expect("the revocation is served while the agent is stuck");
    flood.abort();
    assert_eq!(code, CloseCode::REVOKED.0);
    // Re-checked every second (with jitter up to 1.5 s), then at most a second of closing.
    assert!(revoked_at.elapsed() < Duration::from_secs(4));
    assert_eq!(wait_for_end(&gw).await["endedBy"], "gateway-revoke");
}

#[tokio::test]
async fn an_agent_that_stops_reading_does_not_hold_up_shutdown() {
    let mut gw = gateway_for(fake_agent(Behaviour::StopReading).await, Arc::default()).await;
    let ws = opened(&gw).await;
    let (mut rx, flood) = flood_input(ws);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopping = Instant::now();
    let code = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), close_of(&mut rx)).await
    });
    gw.stop().await;
    let code = code
        .await
        .unwrap()
        .expect("closed while the agent is stuck");
    flood.abort();
    assert_eq!(code, CloseCode::GOING_AWAY.0);
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "drained in {:?} (drain timeout 5 s)",
        stopping.elapsed()
    );
    assert_eq!(last_end(&gw)["endedBy"], "gateway-shutdown");
}

#[tokio::test]
async fn an_agent_that_never_answers_the_upgrade_is_a_prompt_502() {
    let gw = gateway_with(
        fake_agent(Behaviour::SilentHandshake).await,
        Arc::default(),
        "2s",
    )
    .await;
    let started = Instant::now();
    let (status, body) = gw
        .ws(&format!("/ws/{NS}/{SESSION}"), Some(ORIGIN), Some(ALICE))
        .await
        .unwrap_err();
    assert_eq!(status, 502, "{body}");
    // --agent-timeout=2s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

/// An agent that welcomes the client and reports the close code the gateway ends with.
async fn listening_agent() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<u16>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let Some(mut ws) = accept_as_agent(stream).await else {
                    return;
                };
                let _first = ws.next().await;
                let _ = ws.send(Message::binary(welcome())).await;
                let code = loop {
                    match ws.next().await {
                        Some(Ok(Message::Close(f))) => break f.map_or(1005, |f| u16::from(f.code)),
                        Some(Ok(_)) => {}
                        _ => break 1006,
                    }
                };
                let _ = tx.send(code);
            });
        }
    });
    (addr, rx)
}

async fn next_code(codes: &mut tokio::sync::mpsc::UnboundedReceiver<u16>) -> u16 {
    tokio::time::timeout(Duration::from_secs(10), codes.recv())
        .await
        .expect("the agent's connection ended")
        .unwrap()
}

async fn welcomed(ws: &mut Ws) {
    let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap();
    assert!(matches!(m, Some(Ok(Message::Binary(_)))), "{m:?}");
}

/// The agent frees a client at once only when it leaves for good (`1000`); the gateway tells it
/// which: the client's own 1000 is relayed as 1000, a lost client connection and the gateway's
/// own shutdown as 1001, so those clients stay resumable.
#[tokio::test]
async fn the_agent_hears_1000_only_when_the_client_leaves_for_good() {
    let (agent, mut codes) = listening_agent().await;
    let mut gw = gateway_for(agent, Arc::default()).await;
    let mut ws = opened(&gw).await;
    welcomed(&mut ws).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: 1000.into(),
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    assert_eq!(next_code(&mut codes).await, 1000, "left for good");

    let mut ws = opened(&gw).await;
    welcomed(&mut ws).await;
    drop(ws); // a network cut
    assert_eq!(next_code(&mut codes).await, 1001, "lost: resumable");

    let mut ws = opened(&gw).await;
    welcomed(&mut ws).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: 1001.into(),
        reason: "tab closed".into(),
    })))
    .await
    .unwrap();
    assert_eq!(
        next_code(&mut codes).await,
        1001,
        "a closing tab may come back"
    );

    let mut ws = opened(&gw).await;
    welcomed(&mut ws).await;
    gw.stop().await;
    assert_eq!(
        next_code(&mut codes).await,
        1001,
        "the gateway restarting: resumable"
    );
    drop(ws);
}
