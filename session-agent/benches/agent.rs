//! Benchmarks, printed as ratios measured in one run (not tests; nothing here asserts speed).
//!
//! `cargo bench -p tether-session-agent --bench agent` runs all three:
//!
//! 1. output: time until a marker after `head -c 50000000 /dev/zero | base64 -w0` through the
//!    agent and tmux, divided by the same command's time through a bare pty;
//! 2. keystroke echo latency p50/p99 through the agent and through a bare pty;
//! 3. memory (RSS) of an idle session (agent + tmux server + shell) and per attached client.
//!
//! The agent is the release binary, started as its own process on 127.0.0.1.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_protocol::client::{Event, TerminalClient};
use tether_protocol::ticket::{Signer, TicketRequest, generate_keypair};
use tether_protocol::{Mode, SUBPROTOCOL, Size};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const OUTPUT_CMD: &str = "head -c 50000000 /dev/zero | base64 -w0; echo; echo MARK-$((40+2))";
const MARKER: &[u8] = b"MARK-42";
const ECHO_SAMPLES: usize = 300;
const CLIENTS: usize = 10;

struct Agent {
    child: Child,
    addr: String,
    signer: Signer,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start(command: &[&str]) -> Agent {
        let (private, public) = generate_keypair();
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_tether-session-agent"))
            .args([
                "--listen",
                &addr,
                "--session",
                "bench/s",
                "--session-uid",
                "u",
            ])
            .arg("--ticket-public-key")
            .arg(&public)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--termination-message-path")
            .arg(dir.path().join("term"))
            .arg("--")
            .args(command)
            .env("PS1", "$ ")
            .env("RUST_LOG", "warn")
            .stderr(
                std::fs::File::create(dir.path().join("agent.log"))
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            )
            .spawn()
            .unwrap();
        let agent = Agent {
            child,
            addr,
            signer: Signer::from_pem(&private).unwrap(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&agent.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent did not start: {}",
                std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        agent
    }

    async fn open(
        &self,
        size: Size,
    ) -> TerminalClient<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    > {
        let ticket = self
            .signer
            .mint(&TicketRequest {
                user: "bench",
                session: "bench/s",
                session_uid: "u",
                pod_uid: None,
                mode: Mode::Attach,
                ttl_secs: 30,
            })
            .unwrap();
        let mut req = format!("ws://{}/attach", self.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
        req.headers_mut()
            .insert("Authorization", format!("Bearer {ticket}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        TerminalClient::open(ws, size).await.unwrap().0
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(self.dir.path().join("state/tmux.sock"))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.tmux(&["kill-server"]);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Reads events until `needle` shows up in the output.
async fn agent_until<S, E>(t: &mut TerminalClient<S>, needle: &[u8]) -> usize
where
    S: futures::Sink<tokio_tungstenite::tungstenite::Message, Error = E>
        + futures::Stream<Item = Result<tokio_tungstenite::tungstenite::Message, E>>
        + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut tail: Vec<u8> = Vec::new();
    let mut total = 0;
    loop {
        if let Event::Output { data, .. } = t.next_event().await.unwrap() {
            total += data.len();
            tail.extend_from_slice(&data);
            if contains(&tail, needle) {
                return total;
            }
            let keep = tail.len().saturating_sub(needle.len());
            tail.drain(..keep);
        }
    }
}

/// A shell in a bare pty, for the baseline.
struct Bare {
    pty: pty_process::Pty,
    _child: tokio::process::Child,
}

impl Bare {
    fn start(command: &[&str]) -> Bare {
        let (pty, pts) = pty_process::open().unwrap();
        pty.resize(pty_process::Size::new(24, 80)).unwrap();
        let child = pty_process::Command::new(command[0])
            .args(&command[1..])
            .env("PS1", "$ ")
            .kill_on_drop(true)
            .spawn(pts)
            .unwrap();
        Bare { pty, _child: child }
    }

    async fn until(&mut self, needle: &[u8]) -> usize {
        let mut buf = vec![0u8; 64 * 1024];
        let mut tail: Vec<u8> = Vec::new();
        let mut total = 0;
        loop {
            let n = self.pty.read(&mut buf).await.unwrap();
            total += n;
            tail.extend_from_slice(&buf[..n]);
            if contains(&tail, needle) {
                return total;
            }
            let keep = tail.len().saturating_sub(needle.len());
            tail.drain(..keep);
        }
    }
}

const SHELL: &[&str] = &["bash", "--noprofile", "--norc"];

async fn output_ratio() {
    let mut bare = Bare::start(SHELL);
    bare.pty.write_all(b"echo READY-$((1+1))\r").await.unwrap();
    bare.until(b"READY-2").await;
    let t0 = Instant::now();
    bare.pty
        .write_all(format!("{OUTPUT_CMD}\r").as_bytes())
        .await
        .unwrap();
    let bare_bytes = bare.until(MARKER).await;
    let bare_time = t0.elapsed();

    // tmux attached directly in a bare pty, same configuration, no agent: what tmux costs.
    let tdir = tempfile::tempdir().unwrap();
    let conf = tdir.path().join("tmux.conf");
    std::fs::write(&conf, tether_session_agent::tmux::TMUX_CONF).unwrap();
    let sock = tdir.path().join("tmux.sock");
    let (sock_s, conf_s) = (
        sock.to_string_lossy().into_owned(),
        conf.to_string_lossy().into_owned(),
    );
    let mut direct = Bare::start(&[
        "env",
        "TERM=xterm-256color",
        "tmux",
        "-u",
        "-S",
        &sock_s,
        "-f",
        &conf_s,
        "new-session",
        "bash",
        "--noprofile",
        "--norc",
    ]);
    direct
        .pty
        .write_all(b"echo READY-$((1+1))\r")
        .await
        .unwrap();
    direct.until(b"READY-2").await;
    let t0 = Instant::now();
    direct
        .pty
        .write_all(format!("{OUTPUT_CMD}\r").as_bytes())
        .await
        .unwrap();
    let direct_bytes = direct.until(MARKER).await;
    let direct_time = t0.elapsed();
    let _ = Command::new("tmux")
        .arg("-S")
        .arg(&sock)
        .arg("kill-server")
        .output();

    let agent = Agent::start(SHELL);
    let mut t = agent.open(Size::new(80, 24).unwrap()).await;
    t.send_input(b"echo READY-$((1+1))\r").await.unwrap();
    agent_until(&mut t, b"READY-2").await;
    let t0 = Instant::now();
    t.send_input(format!("{OUTPUT_CMD}\r").as_bytes())
        .await
        .unwrap();
    let agent_bytes = agent_until(&mut t, MARKER).await;
    let agent_time = t0.elapsed();
    println!("output: `{OUTPUT_CMD}`");
    println!(
        "  bare pty:        {:>8.3}s ({bare_bytes} bytes read)",
        bare_time.as_secs_f64()
    );
    println!(
        "  agent + tmux:    {:>8.3}s ({agent_bytes} bytes received over WebSocket)",
        agent_time.as_secs_f64()
    );
    println!(
        "  tmux direct:     {:>8.3}s ({direct_bytes} bytes read; tmux attached in a bare pty, no agent)",
        direct_time.as_secs_f64()
    );
    println!(
        "  ratio agent/bare: {:.3} (goal <= 1.1)",
        agent_time.as_secs_f64() / bare_time.as_secs_f64()
    );
    println!(
        "  ratio agent/tmux direct: {:.3} (what the agent adds to tmux itself)",
        agent_time.as_secs_f64() / direct_time.as_secs_f64()
    );
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

async fn echo_latency() {
    // `cat` in canonical mode: the line discipline echoes each keystroke.
    let mut bare = Bare::start(&["cat"]);
    let mut bare_samples = Vec::new();
    let mut buf = [0u8; 4096];
    for i in 0..ECHO_SAMPLES {
        let key: &[u8] = if i % 60 == 59 { b"\r" } else { b"a" };
        let t0 = Instant::now();
        bare.pty.write_all(key).await.unwrap();
        let _ = bare.pty.read(&mut buf).await.unwrap();
        bare_samples.push(t0.elapsed());
        if key == b"\r" {
            // cat prints the line back; drain it.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = tokio::time::timeout(Duration::from_millis(5), bare.pty.read(&mut buf)).await;
        }
    }

    let agent = Agent::start(&["cat"]);
    let mut t = agent.open(Size::new(80, 24).unwrap()).await;
    // Let tmux draw the first screen.
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            t.next_event().await.unwrap();
        }
    })
    .await;
    let mut agent_samples = Vec::new();
    for i in 0..ECHO_SAMPLES {
        let key: &[u8] = if i % 60 == 59 { b"\r" } else { b"a" };
        let t0 = Instant::now();
        t.send_input(key).await.unwrap();
        loop {
            if let Event::Output { .. } = t.next_event().await.unwrap() {
                break;
            }
        }
        agent_samples.push(t0.elapsed());
        if key == b"\r" {
            let _ = tokio::time::timeout(Duration::from_millis(10), async {
                loop {
                    t.next_event().await.unwrap();
                }
            })
            .await;
        }
    }
    let (b50, b99) = (
        percentile(&mut bare_samples, 0.5),
        percentile(&mut bare_samples, 0.99),
    );
    let (a50, a99) = (
        percentile(&mut agent_samples, 0.5),
        percentile(&mut agent_samples, 0.99),
    );
    println!("keystroke echo latency ({ECHO_SAMPLES} keys):");
    println!(
        "  bare pty:      p50 {:>8.1}us  p99 {:>8.1}us",
        b50.as_secs_f64() * 1e6,
        b99.as_secs_f64() * 1e6
    );
    println!(
        "  agent + tmux:  p50 {:>8.1}us  p99 {:>8.1}us",
        a50.as_secs_f64() * 1e6,
        a99.as_secs_f64() * 1e6
    );
    println!(
        "  ratio agent/bare: p50 {:.1}  p99 {:.1}",
        a50.as_secs_f64() / b50.as_secs_f64(),
        a99.as_secs_f64() / b99.as_secs_f64()
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(Path::new("/proc").join(p.to_string()).join("stat"))
            .unwrap_or_default();
        // pid (comm) state ppid …
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        if after
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok())
            == Some(pid)
        {
            out.push(p);
        }
    }
    out
}

async fn memory() {
    let agent = Agent::start(SHELL);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agent_pid = agent.child.id();
    let server: u32 = agent
        .tmux(&["display-message", "-p", "#{pid}"])
        .parse()
        .unwrap();
    let shell: u32 = agent
        .tmux(&["display-message", "-p", "#{pane_pid}"])
        .parse()
        .unwrap();
    let idle = (rss_kib(agent_pid), rss_kib(server), rss_kib(shell));
    let idle_total = idle.0 + idle.1 + idle.2;

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut t = agent.open(Size::new(80, 24).unwrap()).await;
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                t.next_event().await.unwrap();
            }
        })
        .await;
        clients.push(t);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attach_clients: u64 = children_of(agent_pid).into_iter().map(rss_kib).sum();
    let attached_total = rss_kib(agent_pid) + rss_kib(server) + rss_kib(shell) + attach_clients;
    println!("memory (RSS):");
    println!(
        "  idle session: {} KiB (agent {} + tmux server {} + shell {})",
        idle_total, idle.0, idle.1, idle.2
    );
    println!(
        "  per attached client: {} KiB (measured with {CLIENTS} clients: agent, tmux server and `tmux attach` processes)",
        attached_total.saturating_sub(idle_total) / CLIENTS as u64
    );
    drop(clients);
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful: run only
    // under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        output_ratio().await;
        echo_latency().await;
        memory().await;
    });
}
