//! HTTP routes and the per-connection protocol loop.
//!
//! The session has one tmux control client ([`ControlClient`]); its decoded `%output` is one
//! session-wide log with absolute offsets. A connection is a reader of that log from its own
//! offset, flow-controlled by its own window, and never slows the log or anyone else: a
//! connection that falls more than `--catch-up-bytes` behind is skipped forward to a fresh
//! [`Snapshot`], so a flood is never replayed to a slow viewer and the prompt after Ctrl-C
//! arrives promptly.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::SinkExt;
use tether_protocol::frame::{SnapshotFrame, Start, encode_output};
use tether_protocol::ticket::{self, Claims, TicketError, Verifier};
use tether_protocol::{
    ClientFrame, ClientId, CloseCode, MAX_CLIENT_FRAME, MAX_OUTPUT_CHUNK, MAX_SNAPSHOT_TOTAL, Mode,
    SUBPROTOCOL, ServerFrame, Size,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::control::Read;
use crate::control_client::{ControlClient, ControlError};
use crate::metrics::{CodeLabel, Metrics, ModeLabel};
use crate::snapshot::Snapshot;
use crate::tmux::{PANE_STATE_FORMAT, SESSION, Tmux};
use crate::{Config, Error, Outcome, Result, TerminationMessage};
use crate::{resume, slots};

/// How often tmux is polled for the shell's state and idle clients are reaped.
const POLL: Duration = Duration::from_millis(250);
/// How long a dead pane may lack an exit status before the agent ends without one.
const DEAD_WITHOUT_STATUS: Duration = Duration::from_secs(2);
/// Reported when the shell's exit status could not be learned.
pub const UNKNOWN_EXIT_STATUS: i32 = -1;
/// A connection must send `OPEN` or `RESUME` within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// WebSocket pings keep proxies from cutting idle connections…
const PING_EVERY: Duration = Duration::from_secs(15);
/// …and a peer silent for this long is gone.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(45);
/// Initial read buffer of a connection's WebSocket (it grows for larger frames).
const READ_BUFFER: usize = 4096;
/// Output sent per turn of the connection loop before input is looked at again.
const SEND_BATCH: usize = 256 * 1024;

/// One client of the session: who opened it, in which mode, and which connection drives it.
/// It holds no output: every client reads the session's one log.
#[derive(Debug)]
struct Viewer {
    id: ClientId,
    user: String,
    mode: Mode,
    state: Mutex<ViewerState>,
    /// Bumped to the generation of the connection that now drives the client.
    takeover: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct ViewerState {
    /// Generation of the connection currently driving this client (0: none).
    connection: u64,
    /// Set while no connection drives the client; the grace period counts from here.
    disconnected_at: Option<Instant>,
}

impl Viewer {
    fn new(user: String, mode: Mode) -> Arc<Self> {
        Arc::new(Self {
            id: ClientId::random(),
            user,
            mode,
            state: Mutex::new(ViewerState::default()),
            takeover: watch::channel(0).0,
        })
    }
}

/// The clients holding slots. Admission is decided and its slot taken under this one lock, so
/// no opening is ever pending outside it.
#[derive(Default)]
struct Clients {
    map: HashMap<ClientId, Arc<Viewer>>,
}

impl Clients {
    fn holders(&self) -> Vec<slots::Holder> {
        self.map
            .values()
            .map(|c| slots::Holder {
                id: c.id,
                user: c.user.clone(),
                mode: c.mode,
                disconnected_at: {
                    let st = c.state.lock().unwrap();
                    if st.connection == 0 {
                        Some(st.disconnected_at.unwrap_or_else(Instant::now))
                    } else {
                        None
                    }
                },
            })
            .collect()
    }
}

/// The takeover generation that tells a connection its client was evicted for a driver.
const EVICTED: u64 = u64::MAX;

/// How the session is ending, broadcast to connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exit(i32),
    Drain,
}

/// The pane's size: the size the driver asked for, where the driver is the attach connection
/// that connected last and is still connected. Observers never size the pane.
#[derive(Debug, Default)]
struct Drivers {
    /// (connection generation, size it wants), oldest first.
    wanted: Vec<(u64, Size)>,
}

impl Drivers {
    fn driver(&self) -> Option<Size> {
        self.wanted.last().map(|(_, s)| *s)
    }
}

/// The pane's size and the log offset from which output was written at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PaneSize {
    size: Size,
    from: u64,
}

/// A snapshot ready to send, shared by connections that ask while the pane is unchanged.
#[derive(Debug)]
struct Encoded {
    offset: u64,
    size: Size,
    truncated: bool,
    data: Bytes,
}

struct Agent {
    cfg: Config,
    control: ControlClient,
    verifier: Verifier,
    metrics: Arc<Metrics>,
    clients: Mutex<Clients>,
    connections: AtomicUsize,
    last_detached: Mutex<Instant>,
    ready: AtomicBool,
    ending: watch::Sender<Option<Ending>>,
    generation: AtomicU64,
    drivers: Mutex<Drivers>,
    /// Serializes resizes of the pane, so the size told to clients is the one tmux has.
    resizing: tokio::sync::Mutex<()>,
    size: watch::Sender<PaneSize>,
    /// The last snapshot, reused while the log has not moved and the pane was not resized.
    snapshot: tokio::sync::Mutex<Option<Arc<Encoded>>>,
    /// The shell's exit status, once the pane wrapper reported it in the output.
    exit_report: watch::Sender<Option<i32>>,
}

/// Runs the agent on `listener` until the shell exits, the session idles out, or `shutdown`
/// resolves; then drains connections, stops tmux and writes the termination message.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Outcome> {
    let verifier = Verifier::new(&cfg.ticket_public_key, &cfg.session, &cfg.session_uid)
        .map_err(Error::Ticket)?
        .for_pod(cfg.pod_uid.clone());
    let tmux = Tmux::new(&cfg.tmux, &cfg.state_dir);
    let size = Size::new(cfg.cols, cfg.rows).map_err(|e| Error::Config(e.to_string()))?;
    let result = serve(
        cfg.clone(),
        listener,
        shutdown,
        verifier,
        tmux.clone(),
        size,
    )
    .await;
    tmux.kill_server().await;
    match &result {
        Ok(outcome) => {
            TerminationMessage::for_outcome(*outcome, cfg.idle_timeout.map_or(0, |d| d.as_secs()))
                .write(&cfg.termination_message_path);
        }
        Err(e) => TerminationMessage::error(e).write(&cfg.termination_message_path),
    }
    result
}

fn control_error(e: ControlError) -> Error {
    Error::Tmux(e.to_string())
}

async fn serve(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    verifier: Verifier,
    tmux: Tmux,
    size: Size,
) -> Result<Outcome> {
    // The shell's PATH: its own from spec.env, else tmux's fixed one.
    let path = cfg
        .shell_env
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map_or(crate::tmux::BASE_PATH, |(_, value)| value.as_str());
    crate::check_command(&cfg.command, Some(std::ffi::OsStr::new(path)))?;
    // Tags the pane wrapper's exit report, so that output that merely looks like one is not.
    let nonce = ClientId::random().to_string();
    tmux.start(&cfg.state_dir, &cfg.command, &cfg.shell_env, size, &nonce)
        .await?;
    if let Some(dir) = &cfg.recording_dir {
        crate::recording::start(&tmux, &cfg, dir, size).await?;
    }
    // From here on every command goes through the control client: separate tmux processes
    // next to a control client have crashed tmux servers.
    let control = ControlClient::attach(
        tmux.program(),
        tmux.socket(),
        &crate::tmux::base_env(),
        SESSION,
        cfg.buffer_bytes,
    )
    .await
    .map_err(control_error)?;
    // A control client counts for the window's size only once it has one.
    let sized = control
        .command(&format!("refresh-client -C {}x{}", size.cols, size.rows))
        .await
        .map_err(control_error)?;
    if !sized.ok {
        return Err(Error::Tmux(format!(
            "refresh-client -C: {}",
            String::from_utf8_lossy(&sized.lines.concat())
        )));
    }
    let agent = Arc::new(Agent {
        control,
        verifier,
        metrics: Arc::new(Metrics::new()),
        clients: Mutex::new(Clients::default()),
        connections: AtomicUsize::new(0),
        last_detached: Mutex::new(Instant::now()),
        ready: AtomicBool::new(true),
        ending: watch::channel(None).0,
        generation: AtomicU64::new(0),
        drivers: Mutex::new(Drivers::default()),
        resizing: tokio::sync::Mutex::new(()),
        size: watch::channel(PaneSize { size, from: 0 }).0,
        snapshot: tokio::sync::Mutex::new(None),
        exit_report: watch::channel(None).0,
        cfg,
    });
    tokio::spawn(watch_exit_report(agent.clone(), nonce));
    let app = axum::Router::new()
        .route("/attach", get(attach))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(agent.clone());
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Io("listener".into(), e))?;
    info!(%addr, session = %agent.cfg.session, pane = agent.control.pane(), "serving");
    let server = tokio::spawn(async move {
        // No Nagle: a WELCOME and the snapshot after it, or an echoed keystroke, must not wait
        // for the peer's delayed ACK (40 ms measured before this).
        use axum::serve::ListenerExt as _;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "http server stopped");
        }
    });

    let outcome = supervise(&agent, shutdown).await;
    agent.ready.store(false, Ordering::SeqCst);
    agent.ending.send_replace(Some(match outcome {
        Ok(Outcome::ShellExited { code }) => Ending::Exit(code),
        _ => Ending::Drain,
    }));
    // Let connections say goodbye (EXIT frame / close code) before tmux goes away.
    let deadline = Instant::now() + agent.cfg.drain;
    while agent.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.abort();
    agent.clients.lock().unwrap().map.clear();
    info!(?outcome, "session ended");
    outcome
}

impl Agent {
    /// The shell's state, asked through the control client.
    async fn pane_state(&self) -> Result<crate::tmux::PaneState> {
        let pane = self.control.pane();
        let reply = self
            .control
            .command(&format!(
                "display-message -p -t %{pane} '{PANE_STATE_FORMAT}'"
            ))
            .await
            .map_err(control_error)?;
        if !reply.ok {
            return Err(Error::Tmux(format!(
                "display-message: {}",
                String::from_utf8_lossy(&reply.lines.concat())
            )));
        }
        Ok(crate::tmux::pane_state(&String::from_utf8_lossy(
            &reply.lines.concat(),
        )))
    }

    /// Records the size attach connection `generation` wants (a new one goes on top: it is the
    /// driver now; `None`: it left), then sizes the pane as the driver wants it.
    async fn want_size(&self, generation: u64, size: Option<Size>) {
        {
            let mut drivers = self.drivers.lock().unwrap();
            let at = drivers.wanted.iter().position(|(g, _)| *g == generation);
            match (at, size) {
                (Some(i), Some(size)) => drivers.wanted[i].1 = size,
                (None, Some(size)) => drivers.wanted.push((generation, size)),
                (Some(i), None) => {
                    drivers.wanted.remove(i);
                }
                (None, None) => {}
            }
        }
        self.apply_driver_size().await;
    }

    /// Sizes the pane as the driver wants it (nothing when it has that size already), and tells
    /// every connection (in stream order).
    async fn apply_driver_size(&self) {
        let _one = self.resizing.lock().await;
        let Some(want) = self.drivers.lock().unwrap().driver() else {
            return;
        };
        if self.size.borrow().size == want {
            return;
        }
        match self
            .control
            .command(&format!("refresh-client -C {}x{}", want.cols, want.rows))
            .await
        {
            Ok(r) if r.ok => {
                debug!(
                    cols = want.cols,
                    rows = want.rows,
                    at = r.offset,
                    "pane resized"
                );
                self.size.send_replace(PaneSize {
                    size: want,
                    from: r.offset,
                });
            }
            Ok(r) => warn!(
                error = %String::from_utf8_lossy(&r.lines.concat()),
                "tmux refused the resize"
            ),
            Err(e) => warn!(error = %e, "resize failed"),
        }
    }

    /// A snapshot of the pane now: the cached one while nothing changed, else a new capture
    /// (one at a time, so a crowd joining at once costs one capture).
    async fn snapshot(&self) -> Result<Arc<Encoded>, ControlError> {
        let mut cache = self.snapshot.lock().await;
        let end = self.control.offsets().1;
        let size = self.size.borrow().size;
        if let Some(c) = cache.as_ref()
            && c.offset == end
            && c.size == size
        {
            return Ok(c.clone());
        }
        let mut snap = Snapshot::capture(&self.control).await?;
        let truncated = snap.fit(MAX_SNAPSHOT_TOTAL);
        let size = Size::new(snap.width, snap.height).map_err(|e| {
            ControlError::Protocol(crate::control::DecodeError::Unexpected(e.to_string()))
        })?;
        let encoded = Arc::new(Encoded {
            offset: snap.offset,
            size,
            truncated,
            data: snap.to_ansi().into(),
        });
        *cache = Some(encoded.clone());
        Ok(encoded)
    }
}

/// Follows the log for the pane wrapper's exit report (see [`crate::tmux::pane_command`]).
/// Everything the shell wrote is in the log before it; the wrapper then waits for the
/// acknowledgement, a newline typed into the pane, and ends.
async fn watch_exit_report(agent: Arc<Agent>, nonce: String) {
    let mut report = crate::tmux::ExitReport::new(&nonce);
    let mut end = agent.control.end();
    let mut at = 0;
    loop {
        match agent.control.read(at, 1 << 20) {
            Read::Bytes(data, next) => {
                at = next;
                if let Some(code) = report.feed(&data) {
                    agent.exit_report.send_replace(Some(code));
                    if let Err(e) = agent.control.type_bytes(b"\n").await {
                        debug!(error = %e, "the exit report's acknowledgement was not delivered");
                    }
                    return;
                }
            }
            Read::Gone { oldest } => at = oldest,
            Read::UpToDate | Read::Ahead { .. } => {
                if end.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Polls tmux for the shell's exit and idleness, reaps clients past their grace period.
async fn supervise(agent: &Arc<Agent>, shutdown: impl Future<Output = ()>) -> Result<Outcome> {
    let mut tick = tokio::time::interval(POLL);
    let mut dead_since = None;
    let mut reported = agent.exit_report.subscribe();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(Outcome::Terminated),
            why = agent.control.ended() => return Err(control_error(why)),
            Ok(()) = reported.changed() => {
                if let Some(code) = *reported.borrow() {
                    return Ok(Outcome::ShellExited { code });
                }
            }
            _ = tick.tick() => {}
        }
        let state = agent.pane_state().await?;
        if let Some(code) = state.exited {
            return Ok(Outcome::ShellExited { code });
        }
        // tmux 3.3 sometimes never learns the status of a dead pane; do not wait forever.
        match (state.dead, dead_since) {
            (true, None) => dead_since = Some(Instant::now()),
            (true, Some(t)) if t.elapsed() >= DEAD_WITHOUT_STATUS => {
                warn!("the shell exited but tmux has no exit status for it");
                return Ok(Outcome::ShellExited {
                    code: UNKNOWN_EXIT_STATUS,
                });
            }
            _ => {}
        }
        if let Some(idle) = agent.cfg.idle_timeout {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let quiet = Duration::from_secs(now.saturating_sub(state.activity));
            let detached = agent.last_detached.lock().unwrap().elapsed();
            if agent.connections.load(Ordering::SeqCst) == 0 && detached >= idle && quiet >= idle {
                return Ok(Outcome::IdleTimeout);
            }
        }
        let grace = agent.cfg.resume_grace;
        agent.clients.lock().unwrap().map.retain(|id, c| {
            let st = c.state.lock().unwrap();
            let keep = st.connection != 0 || st.disconnected_at.is_none_or(|t| t.elapsed() < grace);
            if !keep {
                debug!(client = %id, "client removed after its grace period");
            }
            keep
        });
    }
}

async fn readyz(State(agent): State<Arc<Agent>>) -> Response {
    if agent.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        agent.metrics.encode(),
    )
        .into_response()
}

/// `GET /attach`. The ticket is checked before the upgrade, but errors are reported after it, as
/// close codes, so that a browser behind the gateway learns why (it cannot see HTTP statuses of
/// a failed WebSocket handshake).
async fn attach(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let ticket = ticket::from_authorization(auth).and_then(|t| agent.verifier.verify(t));
    let ws = ws
        .protocols([SUBPROTOCOL])
        // Small read buffers: most connections are idle viewers, and tungstenite's default
        // 128 KiB per socket would be most of what a viewer costs.
        .read_buffer_size(READ_BUFFER)
        // Each frame (at most 64 KiB) goes out as it is fed: a viewer's socket keeps no
        // gathering buffer the size of the largest burst it ever saw.
        .write_buffer_size(0)
        // Larger than any valid frame, so that oversized frames reach the decoder and get a
        // precise close code; anything beyond this is cut by the WebSocket layer.
        .max_message_size(MAX_CLIENT_FRAME * 16)
        .max_frame_size(MAX_CLIENT_FRAME * 16);
    let negotiated = ws.selected_protocol().is_some();
    ws.on_upgrade(move |socket| async move {
        let span = info_span!(
            "connection",
            user = tracing::field::Empty,
            client = tracing::field::Empty
        );
        connection(agent, socket, ticket, negotiated)
            .instrument(span)
            .await;
    })
}

/// Why a connection loop ended.
enum End {
    /// The peer closed with `1000`: it is leaving for good, its client goes at once.
    Left,
    /// The peer went away (another close code, or a broken stream): keep its client for the
    /// grace period.
    Gone,
    /// The agent closes with this code.
    Close(CloseCode, Option<String>),
}

async fn connection(
    agent: Arc<Agent>,
    mut socket: WebSocket,
    ticket: Result<Claims, TicketError>,
    negotiated: bool,
) {
    let claims = match ticket {
        Ok(c) => c,
        Err(e) => {
            info!(error = %e, "ticket refused");
            return close(&agent, socket, e.close_code(), None).await;
        }
    };
    tracing::Span::current().record("user", claims.sub.as_str());
    if !negotiated {
        let why = format!("subprotocol {SUBPROTOCOL} required");
        return close(&agent, socket, CloseCode::BAD_FRAME, Some(why)).await;
    }
    if agent.ending.borrow().is_some() {
        return close(&agent, socket, CloseCode::GOING_AWAY, None).await;
    }
    let mode: Mode = claims.mode.into();

    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.recv()).await {
        Err(_) => return close(&agent, socket, CloseCode::HANDSHAKE_TIMEOUT, None).await,
        Ok(None) => return,
        Ok(Some(Err(e))) => return close(&agent, socket, recv_error_code(&e), None).await,
        Ok(Some(Ok(Message::Binary(b)))) => match ClientFrame::decode(&b) {
            Ok(f) => f,
            Err(e) => {
                return close(
                    &agent,
                    socket,
                    CloseCode::for_decode_error(&e),
                    Some(e.to_string()),
                )
                .await;
            }
        },
        Ok(Some(Ok(_))) => {
            let why = "the first message must be a binary OPEN or RESUME frame".to_owned();
            return close(&agent, socket, CloseCode::BAD_FRAME, Some(why)).await;
        }
    };

    let (client, start, offset, size) = match first {
        ClientFrame::Open { size } => {
            let limits = slots::Limits {
                max_clients: agent.cfg.max_clients,
                grace_per_user: agent.cfg.max_grace_clients_per_user,
            };
            let client = Viewer::new(claims.sub.clone(), mode);
            let evicted = {
                let mut clients = agent.clients.lock().unwrap();
                let holders = clients.holders();
                match slots::admit(&holders, 0, limits, &claims.sub, mode) {
                    slots::Admission::Full => None,
                    slots::Admission::Admit { evict } => {
                        let evicted: Vec<_> = evict
                            .iter()
                            .filter_map(|id| clients.map.remove(id))
                            .collect();
                        clients.map.insert(client.id, client.clone());
                        Some(evicted)
                    }
                }
            };
            let Some(evicted) = evicted else {
                return close(&agent, socket, CloseCode::TOO_MANY_CLIENTS, None).await;
            };
            for old in evicted {
                info!(client = %old.id, user = %old.user, "client evicted to make room");
                old.takeover.send_replace(EVICTED);
            }
            // Where the output starts is the snapshot's offset, learnt below.
            (client, Start::Snapshot, 0, size)
        }
        ClientFrame::Resume {
            client_id,
            offset,
            size,
        } => {
            let found = agent.clients.lock().unwrap().map.get(&client_id).cloned();
            let (start, end) = agent.control.offsets();
            let decision = resume::decide(
                found.as_ref().map(|c| resume::Held {
                    user: &c.user,
                    mode: c.mode,
                    start,
                    end,
                }),
                &claims.sub,
                mode,
                offset,
            );
            let (client, (start, from)) = match (found, decision) {
                (Some(client), Ok(decided)) => (client, decided),
                (_, Err((code, why))) => return close(&agent, socket, code, why).await,
                // `decide` refuses a client it was not given; kept total without a panic.
                (None, Ok(_)) => {
                    return close(&agent, socket, CloseCode::UNKNOWN_CLIENT, None).await;
                }
            };
            agent.metrics.resumes.inc();
            (client, start, from, size)
        }
        _ => {
            let why = "the first frame must be OPEN or RESUME".to_owned();
            return close(&agent, socket, CloseCode::BAD_FRAME, Some(why)).await;
        }
    };
    tracing::Span::current().record("client", tracing::field::display(client.id));

    // Claim the client; a connection still driving it is told to close. Under the clients lock:
    // a client evicted meanwhile (to make room for a driver) must not come back outside the map.
    let generation = agent.generation.fetch_add(1, Ordering::SeqCst) + 1;
    let claimed = {
        let clients = agent.clients.lock().unwrap();
        let present = clients.map.contains_key(&client.id);
        if present {
            let mut st = client.state.lock().unwrap();
            st.connection = generation;
            st.disconnected_at = None;
            client.takeover.send_replace(generation);
        }
        present
    };
    if !claimed {
        return close(&agent, socket, CloseCode::UNKNOWN_CLIENT, None).await;
    }
    agent.connections.fetch_add(1, Ordering::SeqCst);
    if mode == Mode::Attach {
        // The newest attach connection drives the pane's size.
        agent.want_size(generation, Some(size)).await;
    }
    let gauge = agent
        .metrics
        .clients
        .get_or_create(&ModeLabel {
            mode: mode.as_str().into(),
        })
        .clone();
    gauge.inc();
    info!(?mode, ?start, offset, "client connected");

    let mut conn = Conn {
        agent: &agent,
        socket: &mut socket,
        client: &client,
        generation,
        sent: offset,
        acked: offset,
        floor: offset,
        told: None,
        paused: false,
    };
    let end = conn.run(start).await;

    gauge.dec();
    if mode == Mode::Attach {
        agent.want_size(generation, None).await;
    }
    let still_ours = {
        let mut st = client.state.lock().unwrap();
        let ours = st.connection == generation;
        if ours {
            st.connection = 0;
            st.disconnected_at = Some(Instant::now());
        }
        ours
    };
    if still_ours {
        let mut clients = agent.clients.lock().unwrap();
        if matches!(end, Ok(End::Left)) {
            // Leaving for good (close code 1000): the slot is free at once.
            clients.map.remove(&client.id);
        } else {
            // Lost: kept for a resume, within the user's share of grace slots.
            let limits = slots::Limits {
                max_clients: agent.cfg.max_clients,
                grace_per_user: agent.cfg.max_grace_clients_per_user,
            };
            for id in slots::over_grace_limit(&clients.holders(), limits, &client.user) {
                debug!(client = %id, "grace-period client dropped: its user holds too many");
                clients.map.remove(&id);
            }
        }
    }
    if agent.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
        *agent.last_detached.lock().unwrap() = Instant::now();
    }
    match end {
        Ok(End::Left) => info!("client left"),
        Ok(End::Gone) | Err(_) => info!("client disconnected"),
        Ok(End::Close(code, why)) => {
            info!(
                code = code.0,
                reason = why.as_deref().unwrap_or(code.reason()),
                "closing connection"
            );
            close(&agent, socket, code, why).await;
        }
    }
}

/// One connection reading the session's log.
struct Conn<'a> {
    agent: &'a Agent,
    socket: &'a mut WebSocket,
    client: &'a Viewer,
    generation: u64,
    /// The offset of the next byte to send.
    sent: u64,
    /// Everything before this the client acknowledged (or a snapshot replaced).
    acked: u64,
    /// Acknowledgements before this offset are stale: a snapshot replaced those bytes.
    floor: u64,
    /// The size this connection last told its client.
    told: Option<Size>,
    /// The window is full (counted once per pause in the metrics).
    paused: bool,
}

impl Conn<'_> {
    async fn send(&mut self, frame: &ServerFrame) -> Result<(), axum::Error> {
        self.socket
            .send(Message::Binary(frame.encode().into()))
            .await
    }

    /// Sends a snapshot of the pane now; output continues after it.
    async fn send_snapshot(&mut self, snap: &Encoded) -> Result<(), axum::Error> {
        for chunk in SnapshotFrame::chunks(snap.offset, snap.size, snap.truncated, &snap.data) {
            self.socket
                .feed(Message::Binary(
                    ServerFrame::Snapshot(chunk).encode().into(),
                ))
                .await?;
        }
        self.socket.flush().await?;
        self.agent.metrics.snapshots.inc();
        self.sent = snap.offset;
        self.acked = snap.offset;
        self.floor = snap.offset;
        self.told = Some(snap.size);
        Ok(())
    }

    /// Borrows only the agent (a `&self` future would need the socket to be `Sync`).
    async fn snapshot(&mut self) -> Option<Arc<Encoded>> {
        let agent = self.agent;
        match agent.snapshot().await {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "snapshot failed");
                None
            }
        }
    }

    async fn run(&mut self, start: Start) -> Result<End, axum::Error> {
        let agent = self.agent;
        let client = self.client;
        let snapshot_failed = || {
            Ok(End::Close(
                CloseCode::INTERNAL,
                Some("snapshot failed".into()),
            ))
        };
        // A snapshot is taken before the WELCOME, so the WELCOME's offset is the snapshot's.
        let first = match start {
            Start::Snapshot => match self.snapshot().await {
                Some(s) => Some(s),
                None => return snapshot_failed(),
            },
            Start::Replay => None,
        };
        let offset = first.as_ref().map_or(self.sent, |s| s.offset);
        let welcome = ServerFrame::Welcome {
            client_id: client.id,
            mode: client.mode,
            window: agent.cfg.window,
            offset,
            start,
        };
        self.send(&welcome).await?;
        match first {
            Some(snap) => self.send_snapshot(&snap).await?,
            None => {
                let size = agent.size.borrow().size;
                self.send(&ServerFrame::Size(size)).await?;
                self.told = Some(size);
            }
        }

        let mut output = agent.control.end();
        let mut sizes = agent.size.subscribe();
        let mut takeover = client.takeover.subscribe();
        let mut ending = agent.ending.subscribe();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        let mut last_seen = Instant::now();
        let window = u64::from(agent.cfg.window);
        let catch_up = agent.cfg.catch_up_bytes as u64;
        loop {
            let end = *output.borrow_and_update();
            let pane = *sizes.borrow_and_update();
            // A size change is told in stream order: once the output before it was sent.
            if self.told != Some(pane.size) && self.sent >= pane.from {
                self.send(&ServerFrame::Size(pane.size)).await?;
                self.told = Some(pane.size);
            }
            let behind = end.saturating_sub(self.acked);
            let in_flight = self.sent - self.acked;
            let can_send = self.sent < end && in_flight < window;
            if self.sent < end && !can_send && !self.paused {
                self.paused = true;
                agent.metrics.flow_pauses.inc();
            }
            tokio::select! {
                biased;
                _ = takeover.changed() => {
                    let now = *takeover.borrow();
                    if now == EVICTED {
                        let why = "an interactive client needed this slot".to_owned();
                        return Ok(End::Close(CloseCode::TOO_MANY_CLIENTS, Some(why)));
                    }
                    if now != self.generation {
                        return Ok(End::Close(CloseCode::TAKEN_OVER, None));
                    }
                }
                _ = ending.changed() => {
                    let e = *ending.borrow();
                    match e {
                        Some(Ending::Exit(code)) => {
                            self.flush_all().await?;
                            let exit = ServerFrame::Exit { code, reason: format!("the shell exited with status {code}") };
                            self.send(&exit).await?;
                            return Ok(End::Close(CloseCode::NORMAL, None));
                        }
                        Some(Ending::Drain) => return Ok(End::Close(CloseCode::GOING_AWAY, None)),
                        None => {}
                    }
                }
                msg = self.socket.recv() => {
                    last_seen = Instant::now();
                    let msg = match msg {
                        None => return Ok(End::Gone),
                        Some(Err(e)) => {
                            let code = recv_error_code(&e);
                            if code == CloseCode::FRAME_TOO_LARGE {
                                return Ok(End::Close(code, None));
                            }
                            return Ok(End::Gone);
                        }
                        Some(Ok(m)) => m,
                    };
                    if let Some(end) = self.on_message(msg).await? {
                        return Ok(end);
                    }
                }
                // Far behind while reading (it acknowledged output since its last snapshot), or
                // behind what the log still holds: skip to the pane as it is now.
                _ = std::future::ready(()), if (behind > catch_up && self.acked > self.floor)
                    || self.sent < agent.control.offsets().0 => {
                    let Some(snap) = self.snapshot().await else { return snapshot_failed() };
                    debug!(from = self.sent, to = snap.offset, "skipped forward to a snapshot");
                    agent.metrics.catch_ups.inc();
                    self.send_snapshot(&snap).await?;
                }
                _ = std::future::ready(()), if can_send => {
                    let limit = if self.told != Some(pane.size) && pane.from > self.sent {
                        pane.from - self.sent
                    } else {
                        u64::MAX
                    };
                    let max = (window - in_flight).min(SEND_BATCH as u64).min(limit) as usize;
                    self.send_output(max).await?;
                }
                r = output.changed(), if self.sent >= end => {
                    if r.is_err() {
                        return Ok(End::Close(CloseCode::INTERNAL, Some("tmux control client ended".into())));
                    }
                }
                _ = sizes.changed() => {}
                _ = ping.tick() => {
                    if last_seen.elapsed() > KEEPALIVE_TIMEOUT {
                        return Ok(End::Close(CloseCode::KEEPALIVE_TIMEOUT, None));
                    }
                    self.socket.send(Message::Ping(Default::default())).await?;
                }
            }
        }
    }

    /// Handles one message from the client; `Some` ends the connection.
    async fn on_message(&mut self, msg: Message) -> Result<Option<End>, axum::Error> {
        let agent = self.agent;
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Close(Some(f)) if f.code == CloseCode::NORMAL.0 => return Ok(Some(End::Left)),
            Message::Close(_) => return Ok(Some(End::Gone)),
            Message::Ping(_) | Message::Pong(_) => return Ok(None),
            Message::Text(_) => {
                let why = format!("text messages are not part of {SUBPROTOCOL}");
                return Ok(Some(End::Close(CloseCode::BAD_FRAME, Some(why))));
            }
        };
        let frame = match ClientFrame::decode(&bytes) {
            Ok(f) => f,
            Err(e) => {
                let code = CloseCode::for_decode_error(&e);
                return Ok(Some(End::Close(code, Some(e.to_string()))));
            }
        };
        match frame {
            ClientFrame::Input(data) => {
                if self.client.mode == Mode::Observe {
                    return Ok(Some(End::Close(CloseCode::READ_ONLY, None)));
                }
                agent.metrics.bytes_in.inc_by(data.len() as u64);
                if let Err(e) = agent.control.type_bytes(&data).await {
                    warn!(error = %e, "input not delivered");
                    let why = "tmux did not take the input".to_owned();
                    return Ok(Some(End::Close(CloseCode::INTERNAL, Some(why))));
                }
            }
            ClientFrame::Resize(size) => {
                if self.client.mode == Mode::Observe {
                    return Ok(Some(End::Close(CloseCode::READ_ONLY, None)));
                }
                agent.want_size(self.generation, Some(size)).await;
            }
            ClientFrame::Ack(o) => {
                if o > self.sent {
                    let why = format!("ack {o} beyond what was sent ({})", self.sent);
                    return Ok(Some(End::Close(CloseCode::BAD_OFFSET, Some(why))));
                }
                if o < self.floor {
                    // In flight when a snapshot replaced those bytes: stale, not wrong.
                    return Ok(None);
                }
                if o < self.acked {
                    let why = format!("ack {o} goes back (already {})", self.acked);
                    return Ok(Some(End::Close(CloseCode::BAD_OFFSET, Some(why))));
                }
                self.acked = o;
                self.paused = false;
            }
            ClientFrame::Ping(n) => {
                self.send(&ServerFrame::Pong(n)).await?;
            }
            ClientFrame::Open { .. } | ClientFrame::Resume { .. } => {
                let why = "OPEN and RESUME are only valid as the first frame".to_owned();
                return Ok(Some(End::Close(CloseCode::BAD_FRAME, Some(why))));
            }
        }
        Ok(None)
    }

    /// Sends output from `sent` on, at most about `max` bytes.
    async fn send_output(&mut self, max: usize) -> Result<(), axum::Error> {
        let data = match self.agent.control.read(self.sent, max) {
            Read::Bytes(data, _) => data,
            // Gone is handled by the caller's skip; nothing new or a made-up offset: nothing.
            Read::UpToDate | Read::Gone { .. } | Read::Ahead { .. } => return Ok(()),
        };
        for chunk in data.chunks(MAX_OUTPUT_CHUNK) {
            self.socket
                .feed(Message::Binary(encode_output(self.sent, chunk).into()))
                .await?;
            self.sent += chunk.len() as u64;
        }
        self.agent.metrics.bytes_out.inc_by(data.len() as u64);
        self.socket.flush().await
    }

    /// At the end of the session: everything up to the log's end, skipping forward to a
    /// snapshot if the bytes are gone.
    async fn flush_all(&mut self) -> Result<(), axum::Error> {
        loop {
            let (start, end) = self.agent.control.offsets();
            if self.sent >= end {
                return Ok(());
            }
            if self.sent < start {
                match self.snapshot().await {
                    Some(snap) => self.send_snapshot(&snap).await?,
                    None => return Ok(()),
                }
                continue;
            }
            self.send_output(SEND_BATCH).await?;
        }
    }
}

fn recv_error_code(e: &axum::Error) -> CloseCode {
    // By type, not by text: axum wraps tungstenite's error, whose `Capacity` is a message or
    // frame over the configured size.
    let too_large = std::error::Error::source(e)
        .and_then(|inner| inner.downcast_ref::<tungstenite_axum::Error>())
        .is_some_and(|t| matches!(t, tungstenite_axum::Error::Capacity(_)));
    if too_large {
        CloseCode::FRAME_TOO_LARGE
    } else {
        CloseCode::BAD_FRAME
    }
}

/// Closes with a code and waits briefly for the peer's close so the code is delivered.
async fn close(agent: &Agent, mut socket: WebSocket, code: CloseCode, why: Option<String>) {
    agent
        .metrics
        .closes
        .get_or_create(&CodeLabel {
            code: code.name().into(),
        })
        .inc();
    let reason = why.unwrap_or_else(|| code.reason().to_owned());
    // A close reason must fit in a control frame (123 bytes).
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame {
        code: code.0,
        reason: reason[..end].into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}
