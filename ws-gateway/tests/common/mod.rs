//! Test harness: a gateway on 127.0.0.1:0 with dev tokens, a test OIDC provider (RSA key and JWKS
//! file in `tests/data`), a static RBAC policy or a real one, and an agent-protocol backend.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::{SinkExt, StreamExt};
use tether_gateway::audit::AuditLog;
use tether_gateway::authn::TokenReviewer;
use tether_gateway::authz::{AccessReviewer, StaticAccess};
use tether_gateway::index::{Index, SharedIndex};
use tether_gateway::server::bearer_protocol;
use tether_gateway::test_backend::{self, BackendStats};
use tether_gateway::{Args, Backends, Gateway};
use tether_protocol::client::TerminalClient;
use tether_protocol::ticket::{Verifier, generate_keypair};
use tether_protocol::{Mode, SUBPROTOCOL, Size};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Every step is bounded so nothing hangs.
pub const STEP: Duration = Duration::from_secs(15);
pub const ORIGIN: &str = "https://allowed.example";
pub const NS: &str = "team-a";
pub const SESSION: &str = "dev";
pub const SESSION_UID: &str = "uid-dev-1";
pub const ISSUER: &str = "https://idp.example";
pub const AUDIENCE: &str = "tether";

/// Development tokens known to every test gateway.
pub const ALICE: &str = "alice-token-0001"; // attach + observe in team-a
pub const BOB: &str = "bob-token-000002"; // observe only in team-a
pub const CAROL: &str = "carol-token-0003"; // nothing anywhere

pub fn data(name: &str) -> PathBuf {
    // Through the workspace, so that kubectl-tether's tests, which share this module, find it.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../ws-gateway/tests/data")
        .join(name)
}

pub fn ready_session(
    ns: &str,
    name: &str,
    uid: &str,
    endpoint: &str,
) -> tether_api::TerminalSession {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    let mut s = tether_api::TerminalSession::new(name, Default::default());
    s.metadata.namespace = Some(ns.into());
    s.metadata.uid = Some(uid.into());
    s.status = Some(tether_api::TerminalSessionStatus {
        phase: Some(tether_api::SessionPhase::Ready),
        endpoint: Some(endpoint.into()),
        conditions: vec![Condition {
            type_: tether_api::conditions::READY.into(),
            status: "True".into(),
            reason: tether_api::conditions::REASON_AGENT_READY.into(),
            message: String::new(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }],
        ..Default::default()
    });
    s
}

#[derive(Default)]
pub struct Options {
    pub flags: Vec<String>,
    pub access: Option<Arc<dyn AccessReviewer>>,
    pub token_review: Option<Arc<dyn TokenReviewer>>,
    pub index: Option<SharedIndex>,
    /// Listen on this loopback port (default: any free one).
    pub port: Option<u16>,
}

pub struct TestGateway {
    pub addr: std::net::SocketAddr,
    /// The admin listener: metrics and probes.
    pub admin_addr: std::net::SocketAddr,
    pub gw: Arc<Gateway>,
    pub dir: tempfile::TempDir,
    pub backend_addr: std::net::SocketAddr,
    pub backend: Arc<BackendStats>,
    pub public_key: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<tether_gateway::Result<()>>>,
    backend_task: tokio::task::JoinHandle<()>,
}

impl TestGateway {
    pub async fn start(flags: &[&str]) -> Self {
        Self::start_with(Options {
            flags: flags.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    pub async fn start_with(opts: Options) -> Self {
        let (private, public) = generate_keypair();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port.unwrap_or(0)))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::Builder::new()
            .prefix("tether-gw")
            .tempdir()
            .unwrap();
        let key = dir.path().join("ticket.pem");
        std::fs::write(&key, &private).unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(
            &tokens,
            format!("{ALICE},alice,devs\n{BOB},bob,viewers\n{CAROL},carol\n"),
        )
        .unwrap();
        let mut argv: Vec<String> = vec![
            "tether-gateway".into(),
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            format!("--allowed-origin={ORIGIN}"),
            // The gateway's own origin, which the CLI sends.
            format!("--allowed-origin=http://{addr}"),
            format!("--ticket-signing-key-file={}", key.display()),
            format!("--dev-token-file={}", tokens.display()),
            format!("--oidc-audience={AUDIENCE}"),
            format!("--audit-log={}", dir.path().join("audit.jsonl").display()),
            "--handshake-timeout=2s".into(),
            "--drain-timeout=5s".into(),
        ];
        // The test provider unless the flags name another (a real one, as kubectl-tether's
        // login tests do).
        if !opts.flags.iter().any(|f| f.starts_with("--oidc-issuer")) {
            argv.push(format!("--oidc-issuer={ISSUER}"));
        }
        if !opts
            .flags
            .iter()
            .any(|f| f.starts_with("--oidc-groups-claim"))
        {
            argv.push("--oidc-groups-claim=groups".into());
        }
        if !opts.flags.iter().any(|f| f.starts_with("--oidc-jwks-url")) {
            argv.push(format!("--oidc-jwks-file={}", data("jwks.json").display()));
        }
        argv.extend(opts.flags.iter().cloned());
        let config = Args::try_parse_from(argv).unwrap().into_config().unwrap();

        // The backend plays the session agent of team-a/dev.
        let backend_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend_listener.local_addr().unwrap();
        let verifier =
            Arc::new(Verifier::new(&public, &format!("{NS}/{SESSION}"), SESSION_UID).unwrap());
        let backend = Arc::new(BackendStats::default());
        let backend_task = tokio::spawn(test_backend::serve(
            backend_listener,
            verifier,
            backend.clone(),
        ));

        let index = opts.index.unwrap_or_else(|| {
            let idx = Index::shared();
            {
                let mut i = idx.write().unwrap();
                i.relist_begin();
                i.relist_apply(&ready_session(
                    NS,
                    SESSION,
                    SESSION_UID,
                    &backend_addr.to_string(),
                ));
                i.relist_done();
            }
            idx
        });
        let access = opts.access.unwrap_or_else(|| {
            Arc::new(
                StaticAccess::default()
                    .allow("devs", NS, Mode::Attach)
                    .allow("devs", NS, Mode::Observe)
                    .allow("viewers", NS, Mode::Observe),
            )
        });
        let audit = AuditLog::open(config.args.audit_log.as_deref()).unwrap();
        let gw = Gateway::new(
            config,
            Backends {
                index,
                access,
                token_review: opts.token_review,
                sessions: std::sync::Arc::new(tether_gateway::sessions::MemoryStore::default()),
            },
            audit,
        );
        let (tx, rx) = oneshot::channel::<()>();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let task = tokio::spawn(tether_gateway::run(
            gw.clone(),
            listener,
            admin,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            admin_addr,
            gw,
            dir,
            backend_addr,
            backend,
            public_key: public,
            shutdown: Some(tx),
            task: Some(task),
            backend_task,
        }
    }

    pub fn index(&self) -> &SharedIndex {
        &self.gw.index
    }

    /// Asks the gateway to stop (as on SIGTERM) and waits for it to drain.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(STEP, task)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A WebSocket handshake: the socket, or the HTTP status and JSON body of the refusal.
    pub async fn ws(
        &self,
        path: &str,
        origin: Option<&str>,
        token: Option<&str>,
    ) -> Result<(Ws, Option<String>), (u16, serde_json::Value)> {
        let mut req = format!("ws://{}{path}", self.addr)
            .into_client_request()
            .unwrap();
        let mut protocols = SUBPROTOCOL.to_owned();
        if let Some(t) = token {
            protocols = format!("{protocols}, {}", bearer_protocol(t));
        }
        req.headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        match tokio::time::timeout(STEP, tokio_tungstenite::connect_async(req))
            .await
            .expect("handshake in time")
        {
            Ok((ws, resp)) => {
                let proto = resp
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.to_str().unwrap().to_owned());
                Ok((ws, proto))
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(serde_json::Value::Null);
                Err((status, body))
            }
            Err(e) => panic!("handshake failed: {e}"),
        }
    }

    /// Opens the test session as `token` in `mode` through the gateway.
    pub async fn open(&self, token: &str, mode: Mode) -> TerminalClient<Ws> {
        let (ws, _) = self
            .ws(
                &format!("/ws/{NS}/{SESSION}?mode={}", mode.as_str()),
                Some(ORIGIN),
                Some(token),
            )
            .await
            .expect("upgrade");
        let (t, _) = tokio::time::timeout(STEP, TerminalClient::open(ws, Size::default()))
            .await
            .unwrap()
            .unwrap();
        t
    }

    /// Signs in with a development token through `POST /api/login`; the `Cookie` header value
    /// of the browser session it starts.
    pub async fn sign_in(&self, token: &str) -> String {
        let (status, head, body) = self
            .http(
                "POST",
                "/api/login",
                &[("Content-Type", "application/json"), ("Origin", ORIGIN)],
                &format!(r#"{{"token":"{token}"}}"#),
            )
            .await;
        assert_eq!(status, 204, "sign-in refused: {body}");
        let set = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("set-cookie: ")
                    .or_else(|| l.strip_prefix("Set-Cookie: "))
            })
            .expect("a session cookie");
        set.split(';').next().unwrap().to_owned()
    }

    /// A plain HTTP request; returns status, headers and body.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        http_to(self.addr, method, path, headers, body).await
    }

    /// [`Self::http`] to the admin listener.
    pub async fn admin_http(&self, path: &str) -> (u16, String, String) {
        http_to(self.admin_addr, "GET", path, &[], "").await
    }
}

/// A plain HTTP request to `addr`; returns status, headers and body.
pub async fn http_to(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Chunked bodies: good enough to take the JSON between the chunk sizes.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.lines()
            .collect::<Vec<_>>()
            .chunks(2)
            .filter_map(|c| c.get(1).copied())
            .collect::<String>()
    } else {
        body.to_owned()
    };
    (status, head.to_owned(), body)
}

impl TestGateway {
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, _, body) = self.admin_http("/metrics").await;
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.backend_task.abort();
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Reads events until the connection closes; returns the close code and reason.
pub async fn closed(ws: &mut Ws) -> (u16, String) {
    closed_within(ws, STEP).await
}

/// [`closed`], for closes that take longer than a step (a token's lifetime).
pub async fn closed_within(ws: &mut Ws, within: Duration) -> (u16, String) {
    tokio::time::timeout(within, async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
                Ok(Message::Close(None)) => return (1005, String::new()),
                Ok(_) => {}
                Err(_) => return (1006, String::new()),
            }
        }
        (1006, String::new())
    })
    .await
    .expect("closed in time")
}

pub async fn send(ws: &mut Ws, bytes: Vec<u8>) {
    ws.send(Message::binary(bytes)).await.unwrap();
}

/// An ID token signed with the test provider's RSA key.
pub fn id_token(claims: serde_json::Value, kid: Option<&str>) -> String {
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(data("oidc-rsa.pem")).unwrap())
            .unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn good_claims(sub: &str, groups: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "groups": groups,
        "iat": now(), "exp": now() + 600,
    })
}

/// The honest client still gets its echo.
pub async fn still_serving(t: &mut TerminalClient<Ws>, marker: &str) {
    t.send_input(marker.as_bytes()).await.unwrap();
    let got = tokio::time::timeout(STEP, async {
        let mut acc = Vec::new();
        loop {
            match t.next_event().await.unwrap() {
                tether_protocol::client::Event::Output { data, .. } => {
                    acc.extend_from_slice(&data);
                    if String::from_utf8_lossy(&acc).contains(marker) {
                        return;
                    }
                }
                // A new client's first frame is the (test backend's empty) snapshot.
                tether_protocol::client::Event::Pong(_)
                | tether_protocol::client::Event::Size(_)
                | tether_protocol::client::Event::Snapshot(_) => {}
                other => panic!("honest client lost its session: {other:?}"),
            }
        }
    })
    .await;
    assert!(got.is_ok(), "honest client got no echo of {marker}");
}

/// Accepts `stream` as a session agent would: the WebSocket upgrade with `tether.v2` selected.
/// `None` when the peer did not complete the upgrade. For fake agents in tests.
#[allow(dead_code)]
pub async fn accept_as_agent(stream: TcpStream) -> Option<WebSocketStream<TcpStream>> {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    #[allow(clippy::result_large_err)]
    let answer = |_: &Request, mut resp: Response| {
        resp.headers_mut()
            .insert("sec-websocket-protocol", SUBPROTOCOL.parse().unwrap());
        Ok(resp)
    };
    tokio_tungstenite::accept_hdr_async(stream, answer)
        .await
        .ok()
}
