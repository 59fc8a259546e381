//! Gateway benchmarks: one run, ratios against a direct connection to the backend.
//!
//! `cargo bench -p tether-gateway --bench gateway` (env: `TETHER_BENCH_IDLE`, default 10000;
//! `TETHER_BENCH_STREAMS`, default 2000; `TETHER_BENCH_SECS`, default 5).
//!
//! Everything runs in this process: clients, the gateway and the agent-protocol test backend.
//! The gateway's share of memory and CPU is the difference between the proxied run and the same
//! clients connected directly to the backend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use tether_gateway::audit::AuditLog;
use tether_gateway::authz::StaticAccess;
use tether_gateway::index::Index;
use tether_gateway::server::bearer_protocol;
use tether_gateway::test_backend::{self, BackendStats};
use tether_gateway::{Args, Backends, Gateway};
use tether_protocol::ticket::{Signer, TicketRequest, Verifier, generate_keypair};
use tether_protocol::{ClientFrame, Mode, SUBPROTOCOL, ServerFrame, Size};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const ORIGIN: &str = "https://bench.example";

struct Setup {
    gateway: std::net::SocketAddr,
    backend: std::net::SocketAddr,
    signer: Signer,
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every proxied idle connection holds four descriptors in this one process (the client, both
/// sides of the gateway, the backend). Raises the open-file limit to fit `conns` of them (root
/// may raise the hard limit too) and returns how many fit.
fn fit_connections(conns: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = (conns as u64) * 4 + 512;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let limit = if soft >= want {
        soft
    } else if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok() {
        want
    } else {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        hard
    };
    let fit = (limit.saturating_sub(512) / 4) as usize;
    if fit < conns {
        eprintln!(
            "open-file limit {limit} fits only {fit} of {conns} connections; measuring {fit}"
        );
    }
    fit.min(conns)
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4
}

fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

async fn setup() -> Setup {
    let (private, public) = generate_keypair();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    std::fs::write(&key, &private).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "bench-token-0001,bench,devs\n").unwrap();
    let backend_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = backend_listener.local_addr().unwrap();
    let verifier = Arc::new(Verifier::new(&public, "bench/dev", "uid").unwrap());
    tokio::spawn(test_backend::serve(
        backend_listener,
        verifier,
        Arc::new(BackendStats::default()),
    ));
    let config = Args::try_parse_from([
        "tether-gateway".to_owned(),
        format!("--allowed-origin={ORIGIN}"),
        format!("--ticket-signing-key-file={}", key.display()),
        format!("--dev-token-file={}", tokens.display()),
        "--max-connections-per-user=100000".into(),
        "--handshake-rate=100000".into(),
        "--idle-timeout=600s".into(),
    ])
    .unwrap()
    .into_config()
    .unwrap();
    let index = Index::shared();
    {
        let mut s = tether_api::TerminalSession::new("dev", Default::default());
        s.metadata.namespace = Some("bench".into());
        s.metadata.uid = Some("uid".into());
        s.status = Some(tether_api::TerminalSessionStatus {
            phase: Some(tether_api::SessionPhase::Ready),
            endpoint: Some(backend.to_string()),
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
            access: Arc::new(StaticAccess::default().allow("devs", "bench", Mode::Attach)),
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
    std::mem::forget(dir);
    Setup {
        gateway,
        backend,
        signer: Signer::from_pem(&private).unwrap(),
    }
}

async fn connect(s: &Setup, via_gateway: bool) -> Ws {
    let mut req = if via_gateway {
        let mut r = format!("ws://{}/ws/bench/dev?mode=attach", s.gateway)
            .into_client_request()
            .unwrap();
        r.headers_mut().insert(
            "sec-websocket-protocol",
            format!("{SUBPROTOCOL}, {}", bearer_protocol("bench-token-0001"))
                .parse()
                .unwrap(),
        );
        r.headers_mut().insert("origin", ORIGIN.parse().unwrap());
        r
    } else {
        let ticket = s
            .signer
            .mint(&TicketRequest {
                user: "bench",
                session: "bench/dev",
                session_uid: "uid",
                pod_uid: None,
                mode: Mode::Attach,
                ttl_secs: 30,
            })
            .unwrap();
        let mut r = format!("ws://{}/attach", s.backend)
            .into_client_request()
            .unwrap();
        r.headers_mut()
            .insert("sec-websocket-protocol", SUBPROTOCOL.parse().unwrap());
        r.headers_mut()
            .insert("authorization", format!("Bearer {ticket}").parse().unwrap());
        r
    };
    let _ = &mut req;
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::binary(
        ClientFrame::Open {
            size: Size::default(),
        }
        .encode(),
    ))
    .await
    .unwrap();
    let _welcome = ws.next().await.unwrap().unwrap();
    ws
}

async fn next_output(ws: &mut Ws) -> usize {
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => {
                if let Ok(ServerFrame::Output { data, .. }) = ServerFrame::decode(&b) {
                    return data.len();
                }
            }
            _ => continue,
        }
    }
}

async fn latency(s: &Setup, via: bool, n: usize) -> (Duration, Duration) {
    let mut ws = connect(s, via).await;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        ws.send(Message::binary(
            ClientFrame::Input(b"x".to_vec().into()).encode(),
        ))
        .await
        .unwrap();
        next_output(&mut ws).await;
        samples.push(t.elapsed());
    }
    samples.sort();
    (samples[n / 2], samples[n * 99 / 100])
}

async fn idle(s: &Setup, via: bool, n: usize) -> (u64, Vec<Ws>) {
    let before = rss_kib();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(connect(s, via).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    (rss_kib().saturating_sub(before), conns)
}

/// `n` connections each sending 40 KB/s of input that the backend echoes back as output.
async fn streams(s: &Setup, via: bool, n: usize, secs: u64) -> (f64, u64) {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(connect(s, via).await);
    }
    let cpu0 = cpu_secs();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let chunk = vec![b'y'; 4000];
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let mut got = 0u64;
                while Instant::now() < deadline {
                    tick.tick().await;
                    ws.send(Message::binary(
                        ClientFrame::Input(chunk.clone().into()).encode(),
                    ))
                    .await
                    .unwrap();
                    got += next_output(&mut ws).await as u64;
                }
                got
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (cpu_secs() - cpu0, total)
}

/// Runs one measurement in a fresh process so freed memory of an earlier run cannot hide the
/// cost of a later one; prints one line of numbers.
fn child(phase: &str) -> Vec<f64> {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env("TETHER_BENCH_PHASE", phase)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; arguments are ignored.
    let (idle_want, streams_want) = (
        env("TETHER_BENCH_IDLE", 10_000),
        env("TETHER_BENCH_STREAMS", 2000),
    );
    // Child processes inherit the raised limit.
    let fit = fit_connections(idle_want.max(streams_want));
    let (n, m) = (idle_want.min(fit), streams_want.min(fit));
    let secs = env("TETHER_BENCH_SECS", 5) as u64;
    if let Ok(phase) = std::env::var("TETHER_BENCH_PHASE") {
        let s = setup().await;
        let via = phase.ends_with("gateway");
        if phase.starts_with("idle") {
            let (kib, _keep) = idle(&s, via, n).await;
            println!("{kib}");
        } else {
            let (cpu, bytes) = streams(&s, via, m, secs).await;
            println!("{cpu} {bytes}");
        }
        return;
    }

    let s = setup().await;
    let rounds = 2000;
    let (d50, d99) = latency(&s, false, rounds).await;
    let (g50, g99) = latency(&s, true, rounds).await;
    println!("echo latency over {rounds} round trips:");
    println!("  direct   p50 {d50:?} p99 {d99:?}");
    println!(
        "  gateway  p50 {g50:?} p99 {g99:?}  (p50 x{:.2}, p99 x{:.2})",
        g50.as_secs_f64() / d50.as_secs_f64(),
        g99.as_secs_f64() / d99.as_secs_f64()
    );

    let direct = child("idle-direct").first().copied().unwrap_or(0.0);
    let proxied = child("idle-gateway").first().copied().unwrap_or(0.0);
    println!(
        "{n} idle connections (fresh process each): RSS +{direct} KiB direct, +{proxied} KiB via gateway"
    );
    println!(
        "  gateway share ≈ {:.1} KiB per connection",
        (proxied - direct) / n as f64
    );

    let d = child("streams-direct");
    let g = child("streams-gateway");
    let (cpu_d, bytes_d) = (
        d.first().copied().unwrap_or(0.0),
        d.get(1).copied().unwrap_or(1.0),
    );
    let (cpu_g, bytes_g) = (
        g.first().copied().unwrap_or(0.0),
        g.get(1).copied().unwrap_or(1.0),
    );
    println!("{m} connections, each sending 40 KB/s that is echoed back, for {secs}s:");
    println!(
        "  direct   CPU {cpu_d:.2}s for {:.0} MB echoed ({:.1} ms/MB)",
        bytes_d / 1e6,
        1e9 * cpu_d / bytes_d
    );
    println!(
        "  gateway  CPU {cpu_g:.2}s for {:.0} MB echoed ({:.1} ms/MB)",
        bytes_g / 1e6,
        1e9 * cpu_g / bytes_g
    );
    println!(
        "  CPU per byte through the gateway x{:.2} of direct",
        (cpu_g / bytes_g) / (cpu_d / bytes_d)
    );
}
