//! Benchmarks, printed as ratios measured in one run (not tests; nothing here asserts speed).
//!
//! `cargo bench -p tether-session-agent --bench agent` runs them all:
//!
//! 1. output: 50 MB of random data as base64 through the agent (every byte counted), against
//!    the same command in a bare pty, in tmux with no client attached (the cost no tmux-based
//!    design avoids) and in tmux attached in a bare pty;
//! 2. keystroke echo latency p50/p99 through the agent and through a bare pty;
//! 3. connect → first output (the snapshot) p50/p99;
//! 4. Ctrl-C after `yes`: time until the prompt's marker arrives, and the bytes received after
//!    the Ctrl-C;
//! 5. memory (RSS) of an idle session (agent + tmux server + shell) and with 1,000 observers.
//!
//! The agent is the release binary, started as its own process on 127.0.0.1. `TETHER_TMUX`
//! names the tmux binary for the agent and every baseline (default `/usr/bin/tmux`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_protocol::client::{Event, TerminalClient};
use tether_protocol::ticket::{Signer, TicketRequest, generate_keypair};
use tether_protocol::{Mode, SUBPROTOCOL, Size};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// 50,000,000 random bytes as base64 on one line: 66,666,668 characters, between two markers.
const PAYLOAD: &str = "head -c 50000000 /dev/urandom | base64 -w0";
const BASE64_CHARS: u64 = 66_666_668;
const ECHO_SAMPLES: usize = 300;
const CONNECT_SAMPLES: usize = 50;
const VIEWERS: usize = 1000;

fn output_cmd() -> String {
    format!("echo BEGIN-$((1+1)); {PAYLOAD}; echo; echo MARK-$((40+2))")
}
const BEGIN: &[u8] = b"BEGIN-2\r\n";
const MARKER: &[u8] = b"MARK-42";

/// The tmux binary of the agent and the baselines.
fn tmux_program() -> String {
    std::env::var("TETHER_TMUX").unwrap_or_else(|_| "/usr/bin/tmux".into())
}

/// Counts base64 characters between [`BEGIN`] and [`MARKER`] in a stream fed in pieces: what
/// arrived of the payload.
#[derive(Default)]
struct Counter {
    tail: Vec<u8>,
    begun: bool,
    chars: u64,
}

impl Counter {
    /// Feeds bytes; true once the end marker was seen.
    fn feed(&mut self, data: &[u8]) -> bool {
        let base64 = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
        let from = self.tail.len();
        self.tail.extend_from_slice(data);
        if !self.begun {
            if let Some(i) = find(&self.tail, BEGIN) {
                self.begun = true;
                let after = self.tail[i + BEGIN.len()..].to_vec();
                self.tail.clear();
                return self.feed(&after);
            }
        } else {
            let count = |bytes: &[u8]| bytes.iter().filter(|b| base64(b)).count() as u64;
            if let Some(at) = find(&self.tail, MARKER) {
                // Up to the marker, not what follows it; part of it may have been counted.
                if at >= from {
                    self.chars += count(&self.tail[from..at]);
                } else {
                    self.chars -= count(&self.tail[at..from]);
                }
                return true;
            }
            self.chars += count(&self.tail[from..]);
        }
        let keep = self
            .tail
            .len()
            .saturating_sub(BEGIN.len().max(MARKER.len()));
        self.tail.drain(..keep);
        false
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

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
        self.open_as(Mode::Attach, size).await
    }

    async fn open_as(
        &self,
        mode: Mode,
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
                mode,
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
        // TCP_NODELAY, as browsers set it.
        let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
            .await
            .unwrap();
        TerminalClient::open(ws, size).await.unwrap().0
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new(tmux_program())
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

/// Reads events until the payload's end marker; returns the payload characters that arrived.
async fn agent_payload<S, E>(t: &mut TerminalClient<S>) -> u64
where
    S: futures::Sink<tokio_tungstenite::tungstenite::Message, Error = E>
        + futures::Stream<Item = Result<tokio_tungstenite::tungstenite::Message, E>>
        + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut counter = Counter::default();
    let mut dump = std::env::var_os("TETHER_BENCH_DUMP").map(|p| std::fs::File::create(p).unwrap());
    loop {
        let ev = t.next_event().await.unwrap();
        if let (Some(f), Event::Output { data, .. }) = (dump.as_mut(), &ev) {
            use std::io::Write as _;
            f.write_all(data).unwrap();
        }
        match ev {
            Event::Output { data, .. } if counter.feed(&data) => return counter.chars,
            Event::Snapshot(_) => panic!("the agent skipped output: the bench client fell behind"),
            _ => {}
        }
    }
}

impl Bare {
    async fn payload(&mut self) -> u64 {
        let mut buf = vec![0u8; 64 * 1024];
        let mut counter = Counter::default();
        loop {
            let n = self.pty.read(&mut buf).await.unwrap();
            if counter.feed(&buf[..n]) {
                return counter.chars;
            }
        }
    }
}

async fn output_ratio() {
    let cmd = output_cmd();
    let mut bare = Bare::start(SHELL);
    bare.pty.write_all(b"echo READY-$((1+1))\r").await.unwrap();
    bare.until(b"READY-2").await;
    let t0 = Instant::now();
    bare.pty
        .write_all(format!("{cmd}\r").as_bytes())
        .await
        .unwrap();
    let bare_chars = bare.payload().await;
    let bare_time = t0.elapsed();
    eprintln!("  ... bare pty: {:.3}s", bare_time.as_secs_f64());

    let tmux = tmux_program();
    let version = String::from_utf8_lossy(&Command::new(&tmux).arg("-V").output().unwrap().stdout)
        .trim()
        .to_owned();
    let tdir = tempfile::tempdir().unwrap();
    let conf = tdir.path().join("tmux.conf");
    std::fs::write(&conf, tether_session_agent::tmux::TMUX_CONF).unwrap();
    let sock = tdir.path().join("tmux.sock");
    let (sock_s, conf_s) = (
        sock.to_string_lossy().into_owned(),
        conf.to_string_lossy().into_owned(),
    );

    // tmux alone: the same tmux runs the command in a pane with no client attached. It still
    // reads and parses every byte into its screen: the floor of any design that keeps tmux.
    let t0 = Instant::now();
    let pane = format!("{PAYLOAD} >/dev/tty; {tmux} -S {sock_s} wait-for -S bench-done");
    let started = Command::new(&tmux)
        .args(["-u", "-S", &sock_s, "-f", &conf_s])
        .args([
            "new-session",
            "-d",
            "-x",
            "80",
            "-y",
            "24",
            "bash",
            "-c",
            &pane,
        ])
        .status()
        .unwrap();
    assert!(started.success());
    let waited = Command::new(&tmux)
        .args(["-S", &sock_s, "wait-for", "bench-done"])
        .status()
        .unwrap();
    assert!(waited.success());
    let alone_time = t0.elapsed();
    eprintln!("  ... tmux alone: {:.3}s", alone_time.as_secs_f64());
    let _ = Command::new(&tmux)
        .args(["-S", &sock_s, "kill-server"])
        .output();

    // tmux attached in a bare pty, same configuration, no agent.
    let mut direct = Bare::start(&[
        "env",
        "TERM=xterm-256color",
        &tmux,
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
        .write_all(format!("{cmd}\r").as_bytes())
        .await
        .unwrap();
    let direct_chars = direct.payload().await;
    let direct_time = t0.elapsed();
    eprintln!("  ... tmux attach: {:.3}s", direct_time.as_secs_f64());
    let _ = Command::new(&tmux)
        .args(["-S", &sock_s, "kill-server"])
        .output();

    let agent = Agent::start(SHELL);
    let mut t = agent.open(Size::new(80, 24).unwrap()).await;
    t.send_input(b"echo READY-$((1+1))\r").await.unwrap();
    agent_until(&mut t, b"READY-2").await;
    let t0 = Instant::now();
    t.send_input(format!("{cmd}\r").as_bytes()).await.unwrap();
    let agent_chars = agent_payload(&mut t).await;
    let agent_time = t0.elapsed();
    eprintln!("  ... agent: {:.3}s", agent_time.as_secs_f64());
    let share = |chars: u64| 100.0 * chars as f64 / BASE64_CHARS as f64;
    println!("output: `{PAYLOAD}` ({BASE64_CHARS} characters), {version}");
    println!(
        "  bare pty:          {:>8.3}s  {:>6.2}% of the characters arrived",
        bare_time.as_secs_f64(),
        share(bare_chars)
    );
    println!(
        "  tmux alone:        {:>8.3}s  (no client attached: tmux only reads the pane)",
        alone_time.as_secs_f64()
    );
    println!(
        "  tmux attach:       {:>8.3}s  {:>6.2}% arrived (tmux attached in a bare pty: a redraw)",
        direct_time.as_secs_f64(),
        share(direct_chars)
    );
    println!(
        "  agent:             {:>8.3}s  {:>6.2}% arrived over the WebSocket",
        agent_time.as_secs_f64(),
        share(agent_chars)
    );
    println!(
        "  ratios: agent/tmux alone {:.3} (goal <= 1.15), agent/bare pty {:.3}, agent/tmux attach {:.3}",
        agent_time.as_secs_f64() / alone_time.as_secs_f64(),
        agent_time.as_secs_f64() / bare_time.as_secs_f64(),
        agent_time.as_secs_f64() / direct_time.as_secs_f64()
    );
    assert_eq!(
        agent_chars, BASE64_CHARS,
        "the agent must deliver every byte"
    );
}

async fn connect_to_first_output() {
    let agent = Agent::start(SHELL);
    let mut samples = Vec::new();
    for _ in 0..CONNECT_SAMPLES {
        let t0 = Instant::now();
        let mut t = agent.open(Size::new(80, 24).unwrap()).await;
        loop {
            if let Event::Snapshot(_) | Event::Output { .. } = t.next_event().await.unwrap() {
                break;
            }
        }
        samples.push(t0.elapsed());
        t.close().await.unwrap();
    }
    println!(
        "connect -> first output (TCP connect, upgrade, OPEN, WELCOME, snapshot), {CONNECT_SAMPLES} connections:"
    );
    println!(
        "  p50 {:.2} ms  p99 {:.2} ms  (goal <= 5 ms)",
        percentile(&mut samples, 0.5).as_secs_f64() * 1e3,
        percentile(&mut samples, 0.99).as_secs_f64() * 1e3
    );
}

async fn ctrl_c_after_yes() {
    let agent = Agent::start(SHELL);
    let mut t = agent.open(Size::new(80, 24).unwrap()).await;
    t.send_input(b"echo READY-$((1+1))\r").await.unwrap();
    agent_until(&mut t, b"READY-2").await;
    t.send_input(b"yes\r").await.unwrap();
    let flood = Instant::now();
    let mut during = 0u64;
    let mut skips = 0;
    while flood.elapsed() < Duration::from_secs(3) {
        match t.next_event().await.unwrap() {
            Event::Output { data, .. } => during += data.len() as u64,
            Event::Snapshot(_) => skips += 1,
            _ => {}
        }
    }
    let t0 = Instant::now();
    t.send_input(b"\x03").await.unwrap();
    t.send_input(b"echo AFTER-$((6*7))\r").await.unwrap();
    let mut after = 0u64;
    let mut tail = Vec::new();
    loop {
        let data = match t.next_event().await.unwrap() {
            Event::Output { data, .. } => data.to_vec(),
            Event::Snapshot(s) => s.data.to_vec(),
            _ => continue,
        };
        after += data.len() as u64;
        tail.extend_from_slice(&data);
        if contains(&tail, b"AFTER-42") {
            break;
        }
        let keep = tail.len().saturating_sub(8);
        tail.drain(..keep);
    }
    println!("Ctrl-C after 3 s of `yes` ({during} bytes received, {skips} catch-up snapshots):");
    println!(
        "  the prompt's marker after {:.1} ms, {after} bytes received after the Ctrl-C",
        t0.elapsed().as_secs_f64() * 1e3
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

    let processes = children_of(agent_pid).len() + children_of(server).len();
    let mut viewers = Vec::new();
    let t0 = Instant::now();
    for _ in 0..VIEWERS {
        let mut t = agent
            .open_as(Mode::Observe, Size::new(80, 24).unwrap())
            .await;
        // The snapshot.
        t.next_event().await.unwrap();
        viewers.push(t);
    }
    let opened = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with = (rss_kib(agent_pid), rss_kib(server), rss_kib(shell));
    let after_processes = children_of(agent_pid).len() + children_of(server).len();
    println!("memory (RSS):");
    println!(
        "  idle session: {} KiB (agent {} + tmux server {} + shell {})",
        idle_total, idle.0, idle.1, idle.2
    );
    println!(
        "  with {VIEWERS} observers (opened in {:.1} s): agent {} KiB (+{:.1} KiB per viewer), tmux server {} KiB, processes {processes} -> {after_processes}",
        opened.as_secs_f64(),
        with.0,
        with.0.saturating_sub(idle.0) as f64 / VIEWERS as f64,
        with.1
    );
    drop(viewers);
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
        connect_to_first_output().await;
        ctrl_c_after_yes().await;
        memory().await;
    });
}
