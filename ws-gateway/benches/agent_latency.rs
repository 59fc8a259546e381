//! Echo latency and output time through gateway + real session agent (tmux, bash) versus
//! directly to the same agent, one run, ratios; then the memory of 1,000 observers connected
//! through the gateway (the viewers run in a child process, so this process's RSS is the
//! gateway's and the agent's).
//!
//! `cargo bench -p tether-gateway --bench agent_latency` (needs tmux and bash).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tether_gateway::audit::AuditLog;
use tether_gateway::authz::StaticAccess;
use tether_gateway::index::Index;
use tether_gateway::server::bearer_protocol;
use tether_gateway::{Args, Backends, Gateway};
use tether_protocol::client::{Event, TerminalClient};
use tether_protocol::ticket::{Signer, TicketRequest, generate_keypair};
use tether_protocol::{Mode, SUBPROTOCOL, Size};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
const ORIGIN: &str = "https://bench.example";

async fn term(url: &str, headers: &[(&'static str, String)]) -> TerminalClient<Ws> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let (mut t, _) = TerminalClient::open(ws, Size::new(120, 40).unwrap())
        .await
        .unwrap();
    // Let the prompt settle.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            t.next_event().await.unwrap();
        }
    })
    .await;
    t
}

async fn wait_for(t: &mut TerminalClient<Ws>, needle: &str) {
    let mut acc = String::new();
    while !acc.contains(needle) {
        match t.next_event().await.unwrap() {
            Event::Output { data, .. } => {
                acc.push_str(&String::from_utf8_lossy(&data));
                if acc.len() > 4096 {
                    acc.drain(..acc.len() - 64);
                }
            }
            Event::Snapshot(_) | Event::Pong(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

async fn measure(mut t: TerminalClient<Ws>, rounds: usize) -> (Duration, Duration, Duration) {
    let mut samples = Vec::new();
    for i in 0..rounds {
        let c = [b'a' + (i % 26) as u8];
        let s = Instant::now();
        t.send_input(&c).await.unwrap();
        wait_for(&mut t, std::str::from_utf8(&c).unwrap()).await;
        samples.push(s.elapsed());
        if i % 50 == 49 {
            t.send_input(b"\x15").await.unwrap(); // Ctrl-U: keep the line short
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    samples.sort();
    t.send_input(b"\x15").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = Instant::now();
    t.send_input(b"seq 1 200000; echo DONE-$((6*7))\r")
        .await
        .unwrap();
    wait_for(&mut t, "DONE-42").await;
    (samples[rounds / 2], samples[rounds * 99 / 100], s.elapsed())
}

/// Viewers opened by the child process.
const VIEWERS: usize = 1000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The child process: opens [`VIEWERS`] observers at `url`, says `ready` once each has its
/// snapshot, keeps reading (so pings are answered) until its stdin closes.
async fn viewers(url: String) {
    let mut tasks = Vec::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(50));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(VIEWERS);
    for _ in 0..VIEWERS {
        let (url, gate, tx) = (url.clone(), gate.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let mut req = url.as_str().into_client_request().unwrap();
            let protocols = format!("{SUBPROTOCOL}, {}", bearer_protocol("bench-token-0001"));
            req.headers_mut()
                .insert("sec-websocket-protocol", protocols.parse().unwrap());
            req.headers_mut().insert("origin", ORIGIN.parse().unwrap());
            let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
            let (mut t, _) = TerminalClient::open(ws, Size::default()).await.unwrap();
            t.next_event().await.unwrap();
            drop(permit);
            tx.send(()).await.unwrap();
            while t.next_event().await.is_ok() {}
        }));
    }
    for _ in 0..VIEWERS {
        rx.recv().await.unwrap();
    }
    println!("ready");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    for t in tasks {
        t.abort();
    }
}

#[tokio::main]
async fn main() {
    if let Ok(url) = std::env::var("TETHER_BENCH_VIEWERS_URL") {
        return viewers(url).await;
    }
    let (private, public) = generate_keypair();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tether_session_agent::Args::try_parse_from([
        "tether-session-agent".to_owned(),
        "--listen=127.0.0.1:0".into(),
        "--session=bench/agent".into(),
        "--session-uid=uid".into(),
        format!("--ticket-public-key={public}"),
        format!("--state-dir={}", dir.path().join("state").display()),
        format!(
            "--termination-message-path={}",
            dir.path().join("term").display()
        ),
        "--".into(),
        "env".into(),
        "PS1=$ ".into(),
        "HISTFILE=/dev/null".into(),
        "bash".into(),
        "--noprofile".into(),
        "--norc".into(),
    ])
    .unwrap()
    .into_config()
    .unwrap();
    let agent_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = agent_listener.local_addr().unwrap();
    tokio::spawn(tether_session_agent::run(
        cfg,
        agent_listener,
        std::future::pending(),
    ));

    let key = dir.path().join("k.pem");
    std::fs::write(&key, &private).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "bench-token-0001,bench,devs\n").unwrap();
    let config = Args::try_parse_from([
        "tether-gateway".to_owned(),
        format!("--allowed-origin={ORIGIN}"),
        format!("--ticket-signing-key-file={}", key.display()),
        format!("--dev-token-file={}", tokens.display()),
        "--max-connections-per-user=2000".into(),
        "--handshake-rate=100000".into(),
    ])
    .unwrap()
    .into_config()
    .unwrap();
    let index = Index::shared();
    {
        let mut s = tether_api::TerminalSession::new("agent", Default::default());
        s.metadata.namespace = Some("bench".into());
        s.metadata.uid = Some("uid".into());
        s.status = Some(tether_api::TerminalSessionStatus {
            phase: Some(tether_api::SessionPhase::Ready),
            endpoint: Some(agent.to_string()),
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "AgentReady".into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            }],
            ..Default::default()
        });
        let mut i = index.write().unwrap();
        i.relist_begin();
        i.relist_apply(&s);
        i.relist_done();
    }
    let gw = Gateway::new(
        config,
        Backends {
            index,
            access: Arc::new(
                StaticAccess::default()
                    .allow("devs", "bench", Mode::Attach)
                    .allow("devs", "bench", Mode::Observe),
            ),
            token_review: None,
            sessions: std::sync::Arc::new(tether_gateway::sessions::MemoryStore::default()),
        },
        AuditLog::open(None).unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = listener.local_addr().unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(tether_gateway::run(
        gw,
        listener,
        admin,
        std::future::pending(),
    ));
    // Wait for tmux.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let signer = Signer::from_pem(&private).unwrap();
    let ticket = signer
        .mint(&TicketRequest {
            user: "bench",
            session: "bench/agent",
            session_uid: "uid",
            pod_uid: None,
            mode: Mode::Attach,
            ttl_secs: 30,
        })
        .unwrap();
    let rounds = 300;
    let direct = term(
        &format!("ws://{agent}/attach"),
        &[
            ("sec-websocket-protocol", SUBPROTOCOL.into()),
            ("authorization", format!("Bearer {ticket}")),
        ],
    )
    .await;
    let (d50, d99, dout) = measure(direct, rounds).await;
    let via = term(
        &format!("ws://{gateway}/ws/bench/agent?mode=attach"),
        &[
            (
                "sec-websocket-protocol",
                format!("{SUBPROTOCOL}, {}", bearer_protocol("bench-token-0001")),
            ),
            ("origin", ORIGIN.into()),
        ],
    )
    .await;
    let (g50, g99, gout) = measure(via, rounds).await;
    println!("real agent (tmux + bash), {rounds} keystroke echoes, then `seq 1 200000`:");
    println!("  direct   echo p50 {d50:?} p99 {d99:?}  output {dout:?}");
    println!("  gateway  echo p50 {g50:?} p99 {g99:?}  output {gout:?}");
    println!(
        "  ratios: p50 x{:.2}, p99 x{:.2}, output time x{:.2}",
        g50.as_secs_f64() / d50.as_secs_f64(),
        g99.as_secs_f64() / d99.as_secs_f64(),
        gout.as_secs_f64() / dout.as_secs_f64()
    );

    // 1,000 observers through the gateway, from a child process.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib();
    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env(
            "TETHER_BENCH_VIEWERS_URL",
            format!("ws://{gateway}/ws/bench/agent?mode=observe"),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap();
    assert_eq!(line.trim(), "ready", "the viewers' process failed");
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with = rss_kib();
    println!(
        "{VIEWERS} observers through the gateway (opened in {:.1} s): gateway + agent RSS {before} -> {with} KiB, {:.1} KiB per viewer",
        opened.as_secs_f64(),
        with.saturating_sub(before) as f64 / VIEWERS as f64
    );
    drop(child);
}
