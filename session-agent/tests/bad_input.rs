//! Every kind of bad input gets its own close code, and the agent keeps serving a witness client
//! that is attached throughout.

mod common;

use common::*;
use futures::SinkExt;
use tether_protocol::client::TerminalClient;
use tether_protocol::frame::client_type;
use tether_protocol::ticket::{
    AUDIENCE, Claims, ISSUER, Signer, TicketMode, TicketRequest, generate_keypair,
};
use tether_protocol::{ClientFrame, ClientId, CloseCode, Mode, Size};
use tokio_tungstenite::tungstenite::Message;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn witness_still_served(w: &mut Term, n: u32) {
    w.send_input(format!("echo witness-{}\r", n * 1000 + 1).as_bytes())
        .await
        .unwrap();
    read_until(w, &format!("witness-{}", n * 1000 + 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_their_close_codes_and_others_keep_working() {
    let agent = TestAgent::start(&[]).await;
    let mut witness = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut witness, "$ ").await;

    let resize = |c: u16, r: u16| {
        let mut v = vec![client_type::RESIZE];
        v.extend_from_slice(&c.to_be_bytes());
        v.extend_from_slice(&r.to_be_bytes());
        v
    };
    let mut oversized = vec![client_type::INPUT];
    oversized.resize(100_000, b'a');
    let cases: Vec<(&str, Vec<u8>, CloseCode)> = vec![
        (
            "truncated resize",
            vec![client_type::RESIZE, 0, 80],
            CloseCode::BAD_FRAME,
        ),
        (
            "truncated ack",
            vec![client_type::ACK, 0, 0, 1],
            CloseCode::BAD_FRAME,
        ),
        (
            "padded ping",
            vec![client_type::PING, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            CloseCode::BAD_FRAME,
        ),
        (
            "empty input",
            vec![client_type::INPUT],
            CloseCode::BAD_FRAME,
        ),
        ("empty frame", vec![], CloseCode::BAD_FRAME),
        ("unknown type", vec![0x42, 1, 2, 3], CloseCode::BAD_FRAME),
        (
            "agent frame type",
            vec![0x82, 0, 0, 0, 0, 0, 0, 0, 0, b'x'],
            CloseCode::BAD_FRAME,
        ),
        (
            "second open",
            ClientFrame::Open {
                size: Size::default(),
            }
            .encode(),
            CloseCode::BAD_FRAME,
        ),
        ("oversized input", oversized, CloseCode::FRAME_TOO_LARGE),
        ("resize 0", resize(0, 24), CloseCode::BAD_RESIZE),
        ("resize 65535", resize(65535, 24), CloseCode::BAD_RESIZE),
        (
            "resize garbage",
            vec![client_type::RESIZE, 0xff, 0x13, 0x37],
            CloseCode::BAD_FRAME,
        ),
        (
            "ack ahead of output",
            ClientFrame::Ack(u64::MAX).encode(),
            CloseCode::BAD_OFFSET,
        ),
    ];
    for (i, (what, bytes, expected)) in cases.into_iter().enumerate() {
        let mut t = agent.open(Mode::Attach, Size::default()).await;
        t.send_raw(bytes).await.unwrap();
        assert_eq!(close_code(&mut t).await, Some(expected), "{what}");
        witness_still_served(&mut witness, i as u32).await;
    }

    // An ack going backwards.
    let mut t = agent.open(Mode::Attach, Size::default()).await;
    t.set_auto_ack(false);
    t.send_input(b"echo some-output\r").await.unwrap();
    read_until(&mut t, "some-output\r\n").await;
    let at = t.offset();
    t.ack(at).await.unwrap();
    t.ack(at - 1).await.unwrap();
    assert_eq!(
        close_code(&mut t).await,
        Some(CloseCode::BAD_OFFSET),
        "ack backwards"
    );

    // A text message.
    let mut ws = agent.connect(Some(&agent.ticket(Mode::Attach))).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        raw_close_code(&mut ws).await,
        Some(CloseCode::BAD_FRAME.0),
        "text message"
    );

    // A first frame that is neither OPEN nor RESUME, and a truncated OPEN.
    for (what, first) in [
        ("input first", vec![client_type::INPUT, b'x']),
        ("truncated open", vec![client_type::OPEN, 0]),
    ] {
        let mut ws = agent.connect(Some(&agent.ticket(Mode::Attach))).await;
        ws.send(Message::binary(first)).await.unwrap();
        assert_eq!(
            raw_close_code(&mut ws).await,
            Some(CloseCode::BAD_FRAME.0),
            "{what}"
        );
    }

    // RESUME of a client the agent never had, and a resume offset ahead of the output.
    let ws = agent.connect(Some(&agent.ticket(Mode::Attach))).await;
    let state = tether_protocol::client::ResumeState {
        client_id: ClientId([9; 16]),
        offset: 0,
    };
    let err = TerminalClient::resume(ws, state, Size::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            tether_protocol::client::ClientError::Closed {
                code: Some(CloseCode::UNKNOWN_CLIENT),
                ..
            }
        ),
        "{err}"
    );
    let ws = agent.connect(Some(&agent.ticket(Mode::Attach))).await;
    let mut state = witness.resume_state();
    state.offset += 1_000_000;
    let err = TerminalClient::resume(ws, state, Size::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            tether_protocol::client::ClientError::Closed {
                code: Some(CloseCode::BAD_OFFSET),
                ..
            }
        ),
        "{err}"
    );

    witness_still_served(&mut witness, 99).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tickets_get_their_close_codes_and_others_keep_working() {
    let agent = TestAgent::start(&[]).await;
    let mut witness = agent.open(Mode::Attach, Size::default()).await;
    read_until(&mut witness, "$ ").await;

    let req = |session: &'static str, uid: &'static str| TicketRequest {
        user: "mallory",
        session,
        session_uid: uid,
        pod_uid: None,
        mode: Mode::Attach,
        ttl_secs: 30,
    };
    let expired = agent
        .signer
        .mint_at(&req(SESSION, SESSION_UID), now() - 300)
        .unwrap();
    let (forger_key, _) = generate_keypair();
    let forged = Signer::from_pem(&forger_key)
        .unwrap()
        .mint(&req(SESSION, SESSION_UID))
        .unwrap();
    let wrong_session = agent.signer.mint(&req("team-b/prod", SESSION_UID)).unwrap();
    let recreated_session = agent.signer.mint(&req(SESSION, "another-uid")).unwrap();
    let too_long = agent
        .signer
        .sign_claims(&Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: "mallory".into(),
            sid: SESSION.into(),
            suid: SESSION_UID.into(),
            pod: None,
            mode: TicketMode::Attach,
            iat: now(),
            exp: now() + 3600,
            jti: "long".into(),
        })
        .unwrap();
    let replayed = agent.ticket(Mode::Attach);
    let _first_use = agent.open_with_ticket(&replayed).await;

    let cases: Vec<(&str, Option<String>, CloseCode)> = vec![
        ("no ticket", None, CloseCode::TICKET_REQUIRED),
        (
            "garbage",
            Some("not.a.jwt".into()),
            CloseCode::TICKET_INVALID,
        ),
        ("expired", Some(expired), CloseCode::TICKET_EXPIRED),
        ("forged", Some(forged), CloseCode::TICKET_INVALID),
        (
            "lifetime over 60s",
            Some(too_long),
            CloseCode::TICKET_INVALID,
        ),
        ("replayed", Some(replayed), CloseCode::TICKET_REPLAYED),
        (
            "wrong session",
            Some(wrong_session),
            CloseCode::WRONG_SESSION,
        ),
        (
            "recreated session",
            Some(recreated_session),
            CloseCode::WRONG_SESSION,
        ),
    ];
    for (i, (what, ticket, expected)) in cases.into_iter().enumerate() {
        let mut ws = agent.connect(ticket.as_deref()).await;
        // Even a well-formed OPEN gets nothing but the close.
        let _ = ws
            .send(Message::binary(
                ClientFrame::Open {
                    size: Size::default(),
                }
                .encode(),
            ))
            .await;
        assert_eq!(raw_close_code(&mut ws).await, Some(expected.0), "{what}");
        witness_still_served(&mut witness, i as u32).await;
    }

    // Another user cannot resume alice's client, even with a valid ticket of their own.
    let ws = agent
        .connect(Some(&agent.ticket_for("mallory", Mode::Attach)))
        .await;
    let err = TerminalClient::resume(ws, witness.resume_state(), Size::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            tether_protocol::client::ClientError::Closed {
                code: Some(CloseCode::WRONG_SESSION),
                ..
            }
        ),
        "{err}"
    );
    witness_still_served(&mut witness, 99).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_limit_are_refused() {
    let agent = TestAgent::start(&["--max-clients=1"]).await;
    let mut first = agent.open(Mode::Attach, Size::default()).await;
    let ws = agent.connect(Some(&agent.ticket(Mode::Attach))).await;
    let err = TerminalClient::open(ws, Size::default()).await.unwrap_err();
    assert!(
        matches!(
            err,
            tether_protocol::client::ClientError::Closed {
                code: Some(CloseCode::TOO_MANY_CLIENTS),
                ..
            }
        ),
        "{err}"
    );
    witness_still_served(&mut first, 1).await;
}

/// The ticket of `user` in `mode`, opened; `None` when the agent refused with 4429.
async fn try_open(agent: &TestAgent, user: &str, mode: Mode) -> Option<Term> {
    let ws = agent.connect(Some(&agent.ticket_for(user, mode))).await;
    match TerminalClient::open(ws, Size::default()).await {
        Ok((t, _)) => Some(t),
        Err(tether_protocol::client::ClientError::Closed {
            code: Some(CloseCode::TOO_MANY_CLIENTS),
            ..
        }) => None,
        Err(e) => panic!("{user}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_who_opens_and_drops_connections_cannot_lock_anyone_out() {
    let agent = TestAgent::start(&["--max-clients=4", "--max-grace-clients-per-user=2"]).await;
    // mallory, an observer, opens and drops (no close: a "network cut") ten connections, each
    // leaving a client for its grace period.
    for _ in 0..10 {
        let t = try_open(&agent, "mallory", Mode::Observe)
            .await
            .expect("mallory may reuse her own grace slots");
        drop(t.into_inner());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // She holds at most two of the four; another observer still gets in.
    let _bob = try_open(&agent, "bob", Mode::Observe)
        .await
        .expect("bob observes: mallory's lost connections hold at most two slots");
    // mallory now keeps every remaining slot with live connections…
    let mut live = Vec::new();
    while let Some(t) = try_open(&agent, "mallory", Mode::Observe).await {
        live.push(t);
        assert!(live.len() <= 4, "more clients than slots");
    }
    // …and the driver is still admitted: an observer's slot makes room.
    let mut alice = try_open(&agent, "alice", Mode::Attach)
        .await
        .expect("a driver is never locked out by observers");
    alice.send_input(b"echo driver-$((6*7))\r").await.unwrap();
    read_until(&mut alice, "driver-42").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_with_1000_frees_its_slot_at_once_a_lost_one_keeps_it() {
    let agent = TestAgent::start(&["--max-clients=1"]).await;
    // Lost (dropped without a close): kept for a resume, so another observer is refused…
    let t = try_open(&agent, "alice", Mode::Observe).await.unwrap();
    let state = t.resume_state();
    drop(t.into_inner());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        try_open(&agent, "bob", Mode::Observe).await.is_none(),
        "the grace slot is alice's"
    );
    // …and alice resumes it.
    let ws = agent
        .connect(Some(&agent.ticket_for("alice", Mode::Observe)))
        .await;
    let (t, _) = TerminalClient::resume(ws, state, Size::default())
        .await
        .expect("alice resumes");
    // Leaving for good: the slot is free immediately.
    t.close().await.unwrap();
    // The close is asynchronous; a freed slot shows within moments, a kept one not for 60 s.
    let mut bob = None;
    for _ in 0..30 {
        bob = try_open(&agent, "bob", Mode::Observe).await;
        if bob.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(bob.is_some(), "the slot was not freed by a close with 1000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_openings_never_take_more_slots_than_there_are() {
    let agent = std::sync::Arc::new(TestAgent::start(&["--max-clients=3"]).await);
    let opens = (0..20).map(|i| {
        let agent = agent.clone();
        tokio::spawn(async move { try_open(&agent, &format!("user{i}"), Mode::Observe).await })
    });
    let admitted: Vec<Term> = futures::future::join_all(opens)
        .await
        .into_iter()
        .filter_map(|r| r.unwrap())
        .collect();
    assert_eq!(
        admitted.len(),
        3,
        "admitted {} of 20 with 3 slots",
        admitted.len()
    );
}
