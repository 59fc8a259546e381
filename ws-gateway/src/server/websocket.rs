//! The WebSocket upgrade: cheap refusals, authentication, admission, the agent dial, then the
//! proxied connection with its audit record.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{self, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use tether_protocol::SUBPROTOCOL;
use tether_protocol::ticket::TicketRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tracing::Instrument;

use super::admission::{admit, credential_ends, parse_mode, reauthorize};
use super::credentials::{Principal, bearer_protocol_token, offered_protocols, principal};
use super::{ApiError, ClientAddr};
use crate::Gateway;
use crate::authn::UserInfo;
use crate::limits::origin_allowed;
use crate::metrics::ModeLabel;
use crate::proxy::{ProxySettings, proxy};

/// Read buffer of each proxied WebSocket.
const READ_BUFFER: usize = 8 * 1024;

#[derive(Deserialize)]
pub(crate) struct WsQuery {
    mode: Option<String>,
}

pub(crate) async fn websocket(
    State(gw): State<Arc<Gateway>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<WsQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    ClientAddr(address): ClientAddr,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Every refusal is counted and written to the audit log with who (once known), the client
    // address, the status and the reason.
    let who: std::sync::Mutex<Option<UserInfo>> = std::sync::Mutex::new(None);
    let attempted = format!("{namespace}/{name}");
    let refuse = |gw: &Gateway, reason: &'static str, e: ApiError| -> ApiError {
        let user = who.lock().unwrap_or_else(|p| p.into_inner()).clone();
        gw.audit.refused(
            user.as_ref(),
            &attempted,
            q.mode.as_deref().unwrap_or("attach"),
            &address.to_string(),
            e.status.as_u16(),
            reason,
            e.body["error"].as_str().unwrap_or(""),
        );
        super::refuse(gw, reason, e)
    };
    // Cheap refusals first: they cost nothing to check.
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("null"));
    if !origin_allowed(origin, &gw.config.args.allowed_origins) {
        return Err(refuse(
            &gw,
            "origin",
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!("origin {} is not allowed", origin.unwrap_or("(missing)")),
            ),
        ));
    }
    let rate_limited = |gw: &Gateway| {
        refuse(
            gw,
            "rate_limited",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many connection attempts: slow down",
            ),
        )
    };
    let protocols = offered_protocols(&headers);
    // axum checks the method, `Connection`, `Upgrade`, `Sec-WebSocket-Key` and
    // `Sec-WebSocket-Version: 13`.
    let upgrade = upgrade.map_err(|e| {
        refuse(
            &gw,
            "not_websocket",
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("expected a WebSocket upgrade: {}", e.body_text()),
            ),
        )
    })?;
    if !protocols.iter().any(|p| p == SUBPROTOCOL) {
        return Err(refuse(
            &gw,
            "subprotocol",
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the WebSocket subprotocol {SUBPROTOCOL} is required"),
            ),
        ));
    }
    let mode = parse_mode(q.mode.as_deref()).map_err(|e| refuse(&gw, "bad_request", e))?;

    // A bearer subprotocol (CLI) wins over the cookie: it is what the client chose to send.
    // The handshake budget is the user's once authenticated, so a flood without a credential
    // (which spends its client address's budget) cannot lock a signed-in user out.
    let bearer = bearer_protocol_token(&protocols);
    let authenticated = match bearer {
        Some(token) => gw
            .authn
            .authenticate(&token)
            .await
            .map(Principal::from_bearer)
            .map_err(|e| (e.label(), ApiError::from(e))),
        None => principal(&gw, &headers, None)
            .await
            .map_err(|e| ("no_token", e)),
    };
    let principal = match authenticated {
        Ok(p) => p,
        Err(_) if !gw.rate.check(address) => return Err(rate_limited(&gw)),
        Err((label, e)) => return Err(refuse(&gw, label, e)),
    };
    let user = principal.user.clone();
    *who.lock().unwrap_or_else(|p| p.into_inner()) = Some(user.clone());
    if !gw.rate.check_user(&user.user) {
        return Err(rate_limited(&gw));
    }
    let (session, endpoint) = admit(&gw, &user, &namespace, &name, mode)
        .await
        .map_err(|(reason, e)| refuse(&gw, reason, e))?;
    let Some(slot) = gw.conns.acquire(&user.user) else {
        return Err(refuse(
            &gw,
            "too_many_connections",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "user {} already has {} terminal connections open",
                    user.user, gw.config.args.max_connections_per_user
                ),
            ),
        ));
    };

    // Dial the agent before answering, so an unreachable agent is a status, not a dead socket.
    let ticket = gw
        .config
        .signer
        .mint(&TicketRequest {
            user: &user.user,
            session: &session.key(),
            session_uid: &session.uid,
            pod_uid: session.pod.as_ref().map(|(_, uid)| uid.as_str()),
            mode,
            ttl_secs: 30,
        })
        .map_err(|e| {
            refuse(
                &gw,
                "internal",
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot mint a ticket: {e}"),
                ),
            )
        })?;
    // Bounded by --agent-timeout (an agent that accepts TCP and never answers) and by
    // shutdown.
    let dialed = tokio::select! {
        r = dial_agent(&endpoint, &ticket, gw.config.args.agent_timeout) => r,
        () = gw.shutdown.cancelled() => Err("the gateway is shutting down".to_owned()),
    };
    let agent = dialed.map_err(|e| {
        tracing::warn!(%namespace, %name, %endpoint, error = %e, "cannot reach the agent");
        refuse(
            &gw,
            "agent_unreachable",
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("cannot reach the session agent: {e}"),
            ),
        )
    })?;

    let settings = ProxySettings {
        mode,
        max_frame_bytes: gw.config.args.max_frame_bytes,
        handshake_timeout: gw.config.args.handshake_timeout,
        idle_timeout: gw.config.args.idle_timeout,
        agent_send_timeout: gw.config.args.agent_timeout,
    };
    let session_key = session.key();
    let gw2 = gw.clone();
    // Tracked from now, so a drain waits for connections still finishing their upgrade.
    let tracked = gw.tasks.token();
    // Small read buffers: an idle terminal is the common case, and tungstenite's default
    // 128 KiB per socket would dominate the gateway's memory per connection. `tether.v2` is
    // the only protocol selected: a bearer subprotocol is never echoed.
    let upgrade = upgrade
        .protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .max_message_size(settings.max_frame_bytes * 2 + 1024)
        .max_frame_size(settings.max_frame_bytes * 2 + 1024)
        // Each message is written out before the next is taken from the agent: nothing is
        // gathered in the write buffer beyond the one message in flight.
        .write_buffer_size(0)
        .max_write_buffer_size(tether_protocol::MAX_SERVER_FRAME + 1024);
    Ok(upgrade.on_upgrade(move |socket| async move {
        let _tracked = tracked;
        let _slot = slot;
        let client = client_socket(socket);
        let label = ModeLabel {
            mode: mode.as_str(),
        };
        gw2.metrics.connections.get_or_create(&label).inc();
        gw2.metrics.connections_total.get_or_create(&label).inc();
        let mut record = gw2
            .audit
            .start(&user, &session_key, mode.as_str(), &address.to_string())
            .await;
        let span = tracing::info_span!("connection", user = %user.user, session = %session_key, mode = mode.as_str());
        tracing::info!(parent: &span, "attached");
        let revoked = reauthorize(gw2.clone(), user.clone(), namespace, name, mode);
        let signed_out = credential_ends(gw2.clone(), principal);
        let ended = async move {
            tokio::select! {
                why = revoked => (tether_protocol::CloseCode::REVOKED, why),
                why = signed_out => (tether_protocol::CloseCode::SIGNED_OUT, why),
            }
        };
        let outcome = proxy(
            client,
            agent,
            settings,
            gw2.shutdown.child_token(),
            ended,
            &gw2.metrics,
        )
        .instrument(span.clone())
        .await;
        gw2.metrics.connections.get_or_create(&label).dec();
        record.bytes_to_agent = outcome.bytes_to_agent;
        record.bytes_to_client = outcome.bytes_to_client;
        span.in_scope(|| tracing::info!(code = outcome.code, reason = %outcome.reason, "detached"));
        record.finish(outcome.ended_by.as_str(), outcome.code, &outcome.reason);
    }))
}

/// The client's WebSocket as a `Sink`/`Stream` of tungstenite messages, the proxy's currency.
fn client_socket(
    socket: WebSocket,
) -> impl Sink<Message, Error = axum::Error> + Stream<Item = Result<Message, axum::Error>> + Unpin {
    socket
        .with(|m: Message| futures::future::ready(Ok::<_, axum::Error>(to_axum(m))))
        .map(|r| r.map(from_axum))
}

fn to_axum(m: Message) -> ws::Message {
    match m {
        Message::Binary(b) => ws::Message::Binary(b),
        Message::Text(t) => ws::Message::Text(t.as_str().into()),
        Message::Ping(b) => ws::Message::Ping(b),
        Message::Pong(b) => ws::Message::Pong(b),
        Message::Close(f) => ws::Message::Close(f.map(|f| ws::CloseFrame {
            code: f.code.into(),
            reason: f.reason.as_str().into(),
        })),
        // Never produced by the proxy; tungstenite hides raw frames when reading.
        Message::Frame(_) => ws::Message::Binary(Default::default()),
    }
}

fn from_axum(m: ws::Message) -> Message {
    match m {
        ws::Message::Binary(b) => Message::Binary(b),
        ws::Message::Text(t) => Message::Text(t.as_str().into()),
        ws::Message::Ping(b) => Message::Ping(b),
        ws::Message::Pong(b) => Message::Pong(b),
        ws::Message::Close(f) => Message::Close(f.map(|f| CloseFrame {
            code: f.code.into(),
            reason: f.reason.as_str().into(),
        })),
    }
}

/// The WebSocket to a session agent.
pub type AgentSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `ws://<endpoint>/attach` with the ticket and the protocol's subprotocol.
pub async fn dial_agent(
    endpoint: &str,
    ticket: &str,
    within: Duration,
) -> Result<AgentSocket, String> {
    let mut req = format!("ws://{endpoint}/attach")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    req.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {ticket}")).map_err(|e| e.to_string())?,
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(tether_protocol::MAX_SERVER_FRAME + 1024))
        .max_frame_size(Some(tether_protocol::MAX_SERVER_FRAME + 1024))
        // Client frames are small (64 KiB); one at a time is written before the next is read.
        .write_buffer_size(0)
        .max_write_buffer_size(tether_protocol::MAX_CLIENT_FRAME * 2 + 1024);
    let (ws, _) = tokio::time::timeout(
        within,
        tokio_tungstenite::connect_async_with_config(req, Some(config), true),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok(ws)
}
