//! Test harness: an in-process agent on 127.0.0.1:0 with a private tmux in a temp dir, tickets
//! from a throwaway key pair, and clients over real WebSockets.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tether_protocol::client::{Event, TerminalClient};
use tether_protocol::ticket::{Signer, TicketRequest, generate_keypair};
use tether_protocol::{CloseCode, Mode, SUBPROTOCOL, Size};
use tether_session_agent::{Args, Outcome};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Term = TerminalClient<Ws>;

pub const SESSION: &str = "team-a/dev";
pub const SESSION_UID: &str = "0b9f-uid";
/// Every test step is bounded by this so nothing hangs.
pub const STEP: Duration = Duration::from_secs(20);

pub struct TestAgent {
    pub addr: std::net::SocketAddr,
    pub signer: Signer,
    pub public_key: String,
    pub dir: tempfile::TempDir,
    task: Option<JoinHandle<tether_session_agent::Result<Outcome>>>,
    shutdown: Option<oneshot::Sender<()>>,
}

/// The tmux the agent runs (`TETHER_TMUX`, as for the agent itself): the tests' own tmux commands
/// must be the same version as the server.
pub fn tmux_program() -> String {
    std::env::var("TETHER_TMUX").unwrap_or_else(|_| "/usr/bin/tmux".into())
}

/// A bash with a predictable prompt and no rc files.
pub fn shell() -> Vec<String> {
    [
        "env",
        "PS1=$ ",
        "HISTFILE=/dev/null",
        "bash",
        "--noprofile",
        "--norc",
    ]
    .map(String::from)
    .to_vec()
}

impl TestAgent {
    pub async fn start(flags: &[&str]) -> Self {
        Self::start_with(flags, &shell()).await
    }

    pub async fn start_with(flags: &[&str], command: &[String]) -> Self {
        let (private, public) = generate_keypair();
        let dir = tempfile::Builder::new()
            .prefix("tether-agent")
            .tempdir()
            .unwrap();
        let mut argv: Vec<String> = vec![
            "tether-session-agent".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--session={SESSION}"),
            format!("--session-uid={SESSION_UID}"),
            format!("--ticket-public-key={public}"),
            format!("--state-dir={}", dir.path().join("state").display()),
            format!(
                "--termination-message-path={}",
                dir.path().join("termination-log").display()
            ),
        ];
        argv.extend(flags.iter().map(|s| s.to_string()));
        argv.push("--".into());
        argv.extend(command.iter().cloned());
        let cfg = Args::try_parse_from(argv).unwrap().into_config().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(tether_session_agent::run(cfg, listener, async move {
            let _ = rx.await;
        }));
        let agent = Self {
            addr,
            signer: Signer::from_pem(&private).unwrap(),
            public_key: public,
            dir,
            task: Some(task),
            shutdown: Some(tx),
        };
        // Ready once tmux runs.
        tokio::time::timeout(STEP, async {
            while agent.http_get("/readyz").await.0 != 200 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("agent ready");
        agent
    }

    pub fn tmux_socket(&self) -> PathBuf {
        self.dir.path().join("state").join("tmux.sock")
    }

    /// Runs tmux on the agent's private socket (for comparisons like `capture-pane`).
    pub fn tmux(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(tmux_program())
            .arg("-S")
            .arg(self.tmux_socket())
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn ticket(&self, mode: Mode) -> String {
        self.ticket_for("alice", mode)
    }

    pub fn ticket_for(&self, user: &str, mode: Mode) -> String {
        self.signer
            .mint(&TicketRequest {
                user,
                session: SESSION,
                session_uid: SESSION_UID,
                pod_uid: None,
                mode,
                ttl_secs: 30,
            })
            .unwrap()
    }

    /// A raw WebSocket with the given ticket (or none).
    pub async fn connect(&self, ticket: Option<&str>) -> Ws {
        let mut req = format!("ws://{}/attach", self.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
        if let Some(t) = ticket {
            req.headers_mut()
                .insert("Authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(req))
            .await
            .unwrap()
            .unwrap();
        ws
    }

    pub async fn open(&self, mode: Mode, size: Size) -> Term {
        let ws = self.connect(Some(&self.ticket(mode))).await;
        let (t, _) = tokio::time::timeout(STEP, TerminalClient::open(ws, size))
            .await
            .unwrap()
            .unwrap();
        t
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = TcpStream::connect(self.addr).await else {
            return (0, String::new());
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return (0, String::new());
        }
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(STEP, s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.http_get("/metrics").await;
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Asks the agent to drain (as on SIGTERM) and waits for its outcome.
    pub async fn stop(&mut self) -> Outcome {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.outcome().await
    }

    /// Waits for the agent to end on its own.
    pub async fn outcome(&mut self) -> Outcome {
        let task = self.task.take().expect("agent running");
        tokio::time::timeout(STEP, task)
            .await
            .expect("agent ended in time")
            .unwrap()
            .unwrap()
    }

    pub fn termination_message(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.path().join("termination-log")).unwrap();
        serde_json::from_str(text.trim()).unwrap()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        // The tmux server outlives an aborted agent: kill it.
        let _ = std::process::Command::new(tmux_program())
            .arg("-S")
            .arg(self.tmux_socket())
            .arg("kill-server")
            .output();
    }
}

/// Reads output until `needle` appears; returns everything read (lossy UTF-8).
pub async fn read_until(t: &mut Term, needle: &str) -> String {
    let mut seen = String::new();
    let r = tokio::time::timeout(STEP, async {
        loop {
            match t.next_event().await.unwrap() {
                Event::Output { data, .. } => seen.push_str(&String::from_utf8_lossy(&data)),
                Event::Snapshot(s) => seen.push_str(&String::from_utf8_lossy(&s.data)),
                Event::Pong(_) | Event::Size(_) => {}
                other => panic!("unexpected {other:?} while waiting for {needle:?}"),
            }
            if seen.contains(needle) {
                return;
            }
        }
    })
    .await;
    assert!(
        r.is_ok(),
        "timed out waiting for {needle:?}; got {:?}",
        &seen[seen.len().saturating_sub(500)..]
    );
    seen
}

/// Waits for the agent to close the connection; returns the code.
pub async fn close_code(t: &mut Term) -> Option<CloseCode> {
    tokio::time::timeout(STEP, async {
        loop {
            match t.next_event().await {
                Ok(Event::Closed { code, .. }) => return code,
                Ok(_) => {}
                Err(tether_protocol::client::ClientError::Closed { code, .. }) => return code,
                Err(e) => panic!("error before close: {e}"),
            }
        }
    })
    .await
    .expect("closed in time")
}

/// Close code of a raw WebSocket (skipping data).
pub async fn raw_close_code(ws: &mut Ws) -> Option<u16> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    tokio::time::timeout(STEP, async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("closed in time")
}

/// Removes escape sequences and carriage returns: what a person would read.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\x1b' => match it.next() {
                Some('[') => {
                    for c in it.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    while let Some(c) = it.next() {
                        if c == '\x07' || (c == '\x1b' && it.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                Some('(' | ')' | '#') => {
                    it.next();
                }
                _ => {}
            },
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Reads output until none arrives for `quiet`; returns it.
pub async fn read_until_quiet(t: &mut Term, quiet: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(STEP, async {
        while let Ok(ev) = tokio::time::timeout(quiet, t.next_event()).await {
            match ev.unwrap() {
                Event::Output { data, .. } => seen.extend_from_slice(&data),
                Event::Snapshot(s) => seen.extend_from_slice(&s.data),
                _ => {}
            }
        }
    })
    .await;
    seen
}

impl TestAgent {
    pub async fn open_with_ticket(&self, ticket: &str) -> Term {
        let ws = self.connect(Some(ticket)).await;
        let (t, _) = tokio::time::timeout(STEP, TerminalClient::open(ws, Size::default()))
            .await
            .unwrap()
            .unwrap();
        t
    }
}
