//! HTTP routes and the per-connection protocol loop.

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
use futures::SinkExt;
use tether_protocol::frame::{Start, encode_output};
use tether_protocol::ticket::{self, Claims, TicketError, Verifier};
use tether_protocol::{
    ClientFrame, ClientId, CloseCode, MAX_CLIENT_FRAME, Mode, SUBPROTOCOL, ServerFrame, Size,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::{CodeLabel, Metrics, ModeLabel};
use crate::term::{Options, READ_CHUNK, TermClient};
use crate::tmux::Tmux;
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
/// Output sent per turn of the connection loop before input is looked at again.
const SEND_BATCH: usize = 256 * 1024;

/// The clients holding slots, and how many more are being opened right now; one lock, so that
/// admission is decided and its slot taken in one step.
#[derive(Default)]
struct Clients {
    map: HashMap<ClientId, Arc<TermClient>>,
    opening: usize,
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

struct Agent {
    cfg: Config,
    tmux: Tmux,
    verifier: Verifier,
    metrics: Arc<Metrics>,
    clients: Mutex<Clients>,
    connections: AtomicUsize,
    last_detached: Mutex<Instant>,
    ready: AtomicBool,
    ending: watch::Sender<Option<Ending>>,
    generation: AtomicU64,
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
    tmux.start(&cfg.state_dir, &cfg.command, &cfg.shell_env, size)
        .await?;
    let agent = Arc::new(Agent {
        tmux: tmux.clone(),
        verifier,
        metrics: Arc::new(Metrics::new()),
        clients: Mutex::new(Clients::default()),
        connections: AtomicUsize::new(0),
        last_detached: Mutex::new(Instant::now()),
        ready: AtomicBool::new(true),
        ending: watch::channel(None).0,
        generation: AtomicU64::new(0),
        cfg,
    });
    if let Some(dir) = &agent.cfg.recording_dir {
        crate::recording::start(&agent.tmux, &agent.cfg, dir, size).await?;
    }
    let app = axum::Router::new()
        .route("/attach", get(attach))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(agent.clone());
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Io("listener".into(), e))?;
    info!(%addr, session = %agent.cfg.session, "serving");
    let server = tokio::spawn(async move {
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

/// Polls tmux for the shell's exit and idleness, reaps clients past their grace period.
async fn supervise(agent: &Arc<Agent>, shutdown: impl Future<Output = ()>) -> Result<Outcome> {
    let mut tick = tokio::time::interval(POLL);
    let mut dead_since = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(Outcome::Terminated),
            _ = tick.tick() => {}
        }
        let state = agent.tmux.pane_state().await?;
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
            let keep = !st.closed && st.disconnected_at.is_none_or(|t| t.elapsed() < grace);
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

    let (client, start, offset) = match first {
        ClientFrame::Open { size } => {
            let limits = slots::Limits {
                max_clients: agent.cfg.max_clients,
                grace_per_user: agent.cfg.max_grace_clients_per_user,
            };
            let evicted = {
                let mut clients = agent.clients.lock().unwrap();
                let holders = clients.holders();
                match slots::admit(&holders, clients.opening, limits, &claims.sub, mode) {
                    slots::Admission::Full => None,
                    slots::Admission::Admit { evict } => {
                        clients.opening += 1;
                        Some(
                            evict
                                .iter()
                                .filter_map(|id| clients.map.remove(id))
                                .collect::<Vec<_>>(),
                        )
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
            let opts = Options {
                mode,
                user: claims.sub.clone(),
                size,
                window: agent.cfg.window,
                keep: agent.cfg.buffer_bytes,
                tee_dir: agent.cfg.debug_tee_dir.as_deref(),
            };
            let spawned = TermClient::spawn(&agent.tmux, opts, agent.metrics.clone());
            let spawned = {
                let mut clients = agent.clients.lock().unwrap();
                clients.opening -= 1;
                if let Ok(c) = &spawned {
                    clients.map.insert(c.id, c.clone());
                }
                spawned
            };
            let client = match spawned {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "could not attach tmux");
                    return close(&agent, socket, CloseCode::INTERNAL, None).await;
                }
            };
            (client, Start::New, 0)
        }
        ClientFrame::Resume {
            client_id,
            offset,
            size,
        } => {
            let found = agent.clients.lock().unwrap().map.get(&client_id).cloned();
            let held = found.as_ref().map(|c| {
                let st = c.state.lock().unwrap();
                (c.user.clone(), c.mode, st.ring.start(), st.ring.end())
            });
            let decision = resume::decide(
                held.as_ref().map(|(user, mode, start, end)| resume::Held {
                    user,
                    mode: *mode,
                    start: *start,
                    end: *end,
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
            let _ = client.resize(size).await;
            agent.metrics.resumes.inc();
            if start == Start::Replay {
                // The client holds everything before `offset`; the window counts from there.
                client.set_acked(from);
            }
            (client, start, from)
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
    let gauge = agent
        .metrics
        .clients
        .get_or_create(&ModeLabel {
            mode: mode.as_str().into(),
        })
        .clone();
    gauge.inc();
    info!(?mode, ?start, offset, "client connected");

    let end = drive(&agent, &mut socket, &client, generation, start, offset).await;

    gauge.dec();
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

/// The connection loop: output out (by offset, within the window), input and control in.
async fn drive(
    agent: &Agent,
    socket: &mut WebSocket,
    client: &Arc<TermClient>,
    generation: u64,
    start: Start,
    offset: u64,
) -> Result<End, axum::Error> {
    let welcome = ServerFrame::Welcome {
        client_id: client.id,
        mode: client.mode,
        window: client.window,
        offset,
        start,
    };
    socket
        .send(Message::Binary(welcome.encode().into()))
        .await?;
    let mut sent = offset;
    let mut last_ack = offset;
    if start == Start::Snapshot {
        match agent.tmux.snapshot(offset).await {
            Ok(snapshot) => {
                // The snapshot stands for everything up to `offset`.
                client.set_acked(offset);
                agent.metrics.snapshots.inc();
                socket
                    .send(Message::Binary(
                        ServerFrame::Snapshot(snapshot).encode().into(),
                    ))
                    .await?;
                // Output after `offset` is relative to what tmux last drew for this client; a
                // full redraw makes it consistent with the snapshot again.
                if let Some(pid) = client.pid()
                    && let Ok(Some(tty)) = agent.tmux.client_tty(pid).await
                {
                    let _ = agent.tmux.refresh_client(&tty).await;
                }
            }
            Err(e) => {
                warn!(error = %e, "snapshot failed");
                return Ok(End::Close(
                    CloseCode::INTERNAL,
                    Some("snapshot failed".into()),
                ));
            }
        }
    }

    let mut output = client.output.subscribe();
    let mut takeover = client.takeover.subscribe();
    let mut ending = agent.ending.subscribe();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_seen = Instant::now();
    loop {
        let (available, closed) = {
            let st = client.state.lock().unwrap();
            (st.ring.end(), st.closed)
        };
        if closed && sent >= available && agent.ending.borrow().is_none() {
            return Ok(End::Close(
                CloseCode::INTERNAL,
                Some("tmux client exited".into()),
            ));
        }
        tokio::select! {
            biased;
            _ = takeover.changed() => {
                let now = *takeover.borrow();
                if now == EVICTED {
                    let why = "an interactive client needed this slot".to_owned();
                    return Ok(End::Close(CloseCode::TOO_MANY_CLIENTS, Some(why)));
                }
                if now != generation {
                    return Ok(End::Close(CloseCode::TAKEN_OVER, None));
                }
            }
            _ = ending.changed() => {
                let e = *ending.borrow();
                match e {
                    Some(Ending::Exit(code)) => {
                        send_output(socket, client, &mut sent, usize::MAX).await?;
                        let exit = ServerFrame::Exit { code, reason: format!("the shell exited with status {code}") };
                        socket.send(Message::Binary(exit.encode().into())).await?;
                        return Ok(End::Close(CloseCode::NORMAL, None));
                    }
                    Some(Ending::Drain) => return Ok(End::Close(CloseCode::GOING_AWAY, None)),
                    None => {}
                }
            }
            msg = socket.recv() => {
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
                let bytes = match msg {
                    Message::Binary(b) => b,
                    Message::Close(Some(f)) if f.code == CloseCode::NORMAL.0 => return Ok(End::Left),
                    Message::Close(_) => return Ok(End::Gone),
                    Message::Ping(_) | Message::Pong(_) => continue,
                    Message::Text(_) => return Ok(End::Close(CloseCode::BAD_FRAME, Some("text messages are not part of tether.v1".into()))),
                };
                let frame = match ClientFrame::decode(&bytes) {
                    Ok(f) => f,
                    Err(e) => return Ok(End::Close(CloseCode::for_decode_error(&e), Some(e.to_string()))),
                };
                match frame {
                    ClientFrame::Input(data) => {
                        if client.mode == Mode::Observe {
                            return Ok(End::Close(CloseCode::READ_ONLY, None));
                        }
                        agent.metrics.bytes_in.inc_by(data.len() as u64);
                        if client.write_input(&data).await.is_err() {
                            return Ok(End::Close(CloseCode::INTERNAL, Some("tmux client exited".into())));
                        }
                    }
                    ClientFrame::Resize(size) => {
                        if client.mode == Mode::Observe {
                            return Ok(End::Close(CloseCode::READ_ONLY, None));
                        }
                        if client.resize(size).await.is_err() {
                            return Ok(End::Close(CloseCode::INTERNAL, Some("resize failed".into())));
                        }
                    }
                    ClientFrame::Ack(o) => {
                        if o > sent || o < last_ack {
                            let why = format!("ack {o} outside {last_ack}..={sent}");
                            return Ok(End::Close(CloseCode::BAD_OFFSET, Some(why)));
                        }
                        last_ack = o;
                        client.set_acked(o);
                    }
                    ClientFrame::Ping(n) => {
                        socket.send(Message::Binary(ServerFrame::Pong(n).encode().into())).await?;
                    }
                    ClientFrame::Open { .. } | ClientFrame::Resume { .. } => {
                        return Ok(End::Close(CloseCode::BAD_FRAME, Some("OPEN and RESUME are only valid as the first frame".into())));
                    }
                }
            }
            _ = std::future::ready(()), if sent < available => {
                send_output(socket, client, &mut sent, SEND_BATCH).await?;
            }
            r = output.changed(), if sent >= available => {
                if r.is_err() {
                    return Ok(End::Close(CloseCode::INTERNAL, None));
                }
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > KEEPALIVE_TIMEOUT {
                    return Ok(End::Close(CloseCode::KEEPALIVE_TIMEOUT, None));
                }
                socket.send(Message::Ping(Default::default())).await?;
            }
        }
    }
}

/// Sends output from `sent` on, at most about `max` bytes.
async fn send_output(
    socket: &mut WebSocket,
    client: &TermClient,
    sent: &mut u64,
    max: usize,
) -> Result<(), axum::Error> {
    let pieces = client.state.lock().unwrap().ring.read_from(*sent, max);
    if pieces.is_empty() {
        return Ok(());
    }
    for (offset, data) in pieces {
        debug_assert_eq!(offset, *sent, "output must be contiguous");
        for (i, chunk) in data.chunks(READ_CHUNK).enumerate() {
            let at = offset + (i * READ_CHUNK) as u64;
            socket
                .feed(Message::Binary(encode_output(at, chunk).into()))
                .await?;
        }
        *sent = offset + data.len() as u64;
    }
    socket.flush().await
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
