//! The bidirectional copy between a client and its session agent.
//!
//! Generic over any WebSocket `Sink`/`Stream` of tungstenite messages on both sides, so unit tests
//! feed it channels and the server feeds it real sockets. One task, one message in flight per
//! direction: a slow reader on either side slows its writer instead of growing a buffer. Every
//! client frame is decoded before it is forwarded; observers' input and resize frames are refused
//! here as well as in the agent.

use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use tether_protocol::frame::Start;
use tether_protocol::{ClientFrame, CloseCode, Mode, ServerFrame};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCode;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DirectionLabel, Metrics};

/// Reason sent with [`CloseCode::GOING_AWAY`] when the gateway stops.
pub const SHUTDOWN_REASON: &str = "gateway shutting down: reconnect";

/// How a proxied connection behaves.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub mode: Mode,
    /// Largest client message, in bytes.
    pub max_frame_bytes: usize,
    /// Time for the first client frame (`OPEN` or `RESUME`).
    pub handshake_timeout: Duration,
    /// A client from which nothing arrives for this long is closed; it is pinged every third.
    pub idle_timeout: Duration,
    /// Longest a message to the agent may take to be written: an agent that stops reading is
    /// closed after this, and never holds up revocation or shutdown meanwhile.
    pub agent_send_timeout: Duration,
}

/// Who ended a proxied connection, as the audit log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    /// The client closed or went away.
    Client,
    /// The agent closed or went away (its code was relayed, or replaced when forged).
    Agent,
    /// The gateway: RBAC no longer allows the connection (`4411`).
    GatewayRevoke,
    /// The gateway: the credential ended (`4440`).
    GatewaySignOut,
    /// The gateway is shutting down (`1001`).
    GatewayShutdown,
    /// The gateway closed it for a rule of the protocol: a bad frame from either side, a
    /// keep-alive or handshake timeout, an agent that stopped reading.
    GatewayProtocol,
}

impl EndedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::Client => "client",
            EndedBy::Agent => "agent",
            EndedBy::GatewayRevoke => "gateway-revoke",
            EndedBy::GatewaySignOut => "gateway-sign-out",
            EndedBy::GatewayShutdown => "gateway-shutdown",
            EndedBy::GatewayProtocol => "gateway-protocol",
        }
    }
}

/// How a proxied connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyOutcome {
    /// The close code the client was sent (or sent), `1006` for a vanished peer.
    pub code: u16,
    pub reason: String,
    pub ended_by: EndedBy,
    pub bytes_to_agent: u64,
    pub bytes_to_client: u64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn close_msg(code: u16, reason: &str) -> Message {
    // Control frames carry at most 125 bytes: two for the code, the rest for the reason.
    let mut reason = reason.to_owned();
    while reason.len() > 123 {
        reason.pop();
    }
    Message::Close(Some(CloseFrame {
        code: WsCode::from(code),
        reason: reason.into(),
    }))
}

/// Close codes only the gateway may send ([`CloseCode::GATEWAY_ONLY`]).
pub fn is_gateway_only(code: u16) -> bool {
    CloseCode::GATEWAY_ONLY.iter().any(|c| c.0 == code)
}

/// The close code and reason relayed to the client for an agent's close: the agent's own when
/// it is one the agent may send (`1000`, `1001`, or a protocol code that is not gateway-only),
/// else `4500` saying what the agent sent. The agent runs in the user's pod: it may not speak
/// for the gateway, nor invent codes the client cannot interpret.
pub fn relayed_agent_close(code: u16, reason: String) -> (u16, String) {
    let known = CloseCode::ALL.iter().any(|c| c.0 == code);
    if is_gateway_only(code) {
        (
            CloseCode::INTERNAL.0,
            format!("the session agent sent the gateway's close code {code}"),
        )
    } else if !known {
        (
            CloseCode::INTERNAL.0,
            format!("the session agent sent close code {code}, which tether.v2 does not define"),
        )
    } else if reason.is_empty() {
        (code, CloseCode(code).reason().to_owned())
    } else {
        (code, reason)
    }
}

/// What the gateway expects next from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Nothing yet: the first frame must be `WELCOME`.
    Welcome,
    /// A `SNAPSHOT` chunk at offset `at` must come next: right after `WELCOME start=2`, or
    /// while a snapshot has more chunks (`bytes` of it so far).
    Snapshot { at: u64, bytes: usize },
    /// Anything but `WELCOME`; the next `OUTPUT` must start at `next`.
    Streaming { next: u64 },
}

/// Checks one message from the agent against tether.v2: an agent-side frame the strict decoder
/// accepts (so within the protocol's sizes), in the order the protocol allows, with contiguous
/// output offsets. A snapshot's chunks must come together, carry the offset announced and stay
/// within [`tether_protocol::MAX_SNAPSHOT_TOTAL`]; a snapshot in the stream may only move the
/// offset forward.
pub fn check_agent_frame(bytes: &[u8], state: &mut AgentState) -> Result<(), String> {
    // A SNAPSHOT's payload is opaque bytes: check its fixed fields and its length, without the
    // copy that decoding the whole frame would make.
    const HEADER: usize = 14;
    let snapshot = tether_protocol::frame::server_type::SNAPSHOT;
    let frame = if bytes.first() == Some(&snapshot) && bytes.len() >= HEADER {
        if bytes.len() - HEADER > tether_protocol::MAX_SNAPSHOT {
            return Err(format!(
                "a bad frame: a SNAPSHOT chunk of {} bytes, over the protocol's limit",
                bytes.len()
            ));
        }
        ServerFrame::decode(&bytes[..HEADER])
    } else {
        ServerFrame::decode(bytes)
    }
    .map_err(|e| format!("a bad frame: {e}"))?;
    let chunk = |at: u64, sofar: usize, s: &tether_protocol::SnapshotFrame| {
        if s.offset != at {
            return Err(format!(
                "a SNAPSHOT chunk at offset {}, expected {at}",
                s.offset
            ));
        }
        let total = sofar + (bytes.len() - HEADER);
        if total > tether_protocol::MAX_SNAPSHOT_TOTAL {
            return Err(format!("a snapshot of more than {total} bytes"));
        }
        Ok(if s.more {
            AgentState::Snapshot { at, bytes: total }
        } else {
            AgentState::Streaming { next: at }
        })
    };
    *state = match (*state, &frame) {
        (AgentState::Welcome, ServerFrame::Welcome { start, offset, .. }) => match start {
            Start::Snapshot => AgentState::Snapshot {
                at: *offset,
                bytes: 0,
            },
            Start::Replay => AgentState::Streaming { next: *offset },
        },
        (AgentState::Welcome, _) => return Err("a frame before WELCOME".into()),
        (AgentState::Snapshot { at, bytes }, ServerFrame::Snapshot(s)) => chunk(at, bytes, s)?,
        (AgentState::Snapshot { .. }, _) => {
            return Err("a frame where a SNAPSHOT chunk was due".into());
        }
        (AgentState::Streaming { .. }, ServerFrame::Welcome { .. }) => {
            return Err("a second WELCOME".into());
        }
        (AgentState::Streaming { next }, ServerFrame::Snapshot(s)) => {
            if s.offset < next {
                return Err(format!(
                    "a SNAPSHOT at offset {} behind the output sent ({next})",
                    s.offset
                ));
            }
            chunk(s.offset, 0, s)?
        }
        (AgentState::Streaming { next }, ServerFrame::Output { offset, data }) => {
            if *offset != next {
                return Err(format!("OUTPUT at offset {offset}, expected {next}"));
            }
            AgentState::Streaming {
                next: next + data.len() as u64,
            }
        }
        (AgentState::Streaming { next }, _) => AgentState::Streaming { next },
    };
    Ok(())
}

/// Whether a WebSocket read failed because a message or frame was over the configured size, by
/// the error's type: tungstenite's own (the agent socket) or wrapped in axum's (the client's).
pub fn is_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if matches!(
            e.downcast_ref::<tokio_tungstenite::tungstenite::Error>(),
            Some(tokio_tungstenite::tungstenite::Error::Capacity(_))
        ) || matches!(
            e.downcast_ref::<tungstenite_axum::Error>(),
            Some(tungstenite_axum::Error::Capacity(_))
        ) {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Checks one client frame; `Err` is the close code and reason to end the connection with.
pub fn check_client_frame(
    bytes: &[u8],
    mode: Mode,
    max: usize,
    first: bool,
) -> Result<(), (CloseCode, String)> {
    if bytes.len() > max {
        return Err((
            CloseCode::FRAME_TOO_LARGE,
            format!("frame of {} bytes exceeds the limit of {max}", bytes.len()),
        ));
    }
    let frame = ClientFrame::decode(bytes).map_err(|e| {
        let code = CloseCode::for_decode_error(&e);
        (code, format!("{}: {e}", code.reason()))
    })?;
    match frame {
        ClientFrame::Open { .. } | ClientFrame::Resume { .. } if first => Ok(()),
        _ if first => Err((
            CloseCode::BAD_FRAME,
            "the first frame must be OPEN or RESUME".into(),
        )),
        ClientFrame::Input(_) | ClientFrame::Resize(_) if mode == Mode::Observe => {
            Err((CloseCode::READ_ONLY, CloseCode::READ_ONLY.reason().into()))
        }
        _ => Ok(()),
    }
}

/// Forwards frames until either side closes, the client idles out, `shutdown` fires, or
/// `ended` resolves with the close code and reason to send: [`CloseCode::REVOKED`] when RBAC no
/// longer allows the connection, [`CloseCode::SIGNED_OUT`] when its credential ended.
///
/// Every write to either side is raced against `shutdown` and `ended` and has a timeout, so a
/// peer that stops reading never holds up revocation or shutdown; the closes sent on the way
/// out are bounded too.
pub async fn proxy<C, CE, A, AE, R>(
    client: C,
    agent: A,
    settings: ProxySettings,
    shutdown: CancellationToken,
    ended: R,
    metrics: &Metrics,
) -> ProxyOutcome
where
    C: Sink<Message, Error = CE> + Stream<Item = Result<Message, CE>> + Unpin,
    A: Sink<Message, Error = AE> + Stream<Item = Result<Message, AE>> + Unpin,
    CE: Into<BoxError>,
    AE: Into<BoxError>,
    R: Future<Output = (CloseCode, String)>,
{
    let mut ended = std::pin::pin!(ended);
    let (mut c_tx, mut c_rx) = client.split();
    let (mut a_tx, mut a_rx) = agent.split();
    // Cloned out of the family: its guard must not live across awaits.
    let to_agent = metrics
        .bytes
        .get_or_create(&DirectionLabel {
            direction: "to_agent",
        })
        .clone();
    let to_client = metrics
        .bytes
        .get_or_create(&DirectionLabel {
            direction: "to_client",
        })
        .clone();
    let mut out = ProxyOutcome {
        code: 1006,
        reason: String::new(),
        ended_by: EndedBy::Client,
        bytes_to_agent: 0,
        bytes_to_client: 0,
    };
    let client_send_timeout = settings.idle_timeout;
    let agent_send_timeout = settings.agent_send_timeout;
    const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

    // Tells the agent how the client went (bounded: a stuck agent must not hold us): `1000` when
    // it left for good (its own close with 1000, a revocation, a protocol violation), so the
    // agent frees its slot at once; `1001` when it was lost or will be back (a broken connection,
    // any other close, our shutdown, a sign-out, a client that stopped reading), so the agent
    // keeps it for a resume.
    macro_rules! leave_agent {
        () => {
            leave_agent!(1001)
        };
        ($code:expr) => {{
            let code: u16 = $code;
            let words = if code == 1000 {
                "client left for good"
            } else {
                "client connection lost; it may resume"
            };
            let _ = timeout(CLOSE_TIMEOUT, a_tx.send(close_msg(code, words))).await;
        }};
    }
    // What the agent is told when the gateway ends a connection with `code`.
    let agent_code_for = |code: u16| -> u16 {
        if [
            CloseCode::GOING_AWAY.0,
            CloseCode::SIGNED_OUT.0,
            CloseCode::KEEPALIVE_TIMEOUT.0,
        ]
        .contains(&code)
        {
            1001
        } else {
            1000
        }
    };
    // Closes the client with `code`, tells the agent we left, records the outcome.
    macro_rules! end {
        ($by:expr, $code:expr, $reason:expr) => {{
            let (code, reason): (u16, String) = ($code, $reason);
            let _ = timeout(CLOSE_TIMEOUT, c_tx.send(close_msg(code, &reason))).await;
            leave_agent!(agent_code_for(code));
            // Give the client a moment to answer the close, as the protocol asks.
            let _ = timeout(Duration::from_millis(500), async {
                while let Some(Ok(m)) = c_rx.next().await {
                    if m.is_close() {
                        break;
                    }
                }
            })
            .await;
            out.code = code;
            out.reason = reason;
            out.ended_by = $by;
            return out;
        }};
    }
    // The peer, not a rule of ours, ended it: record that and stop.
    macro_rules! gone {
        ($by:expr, $code:expr, $reason:expr) => {{
            out.code = $code;
            out.reason = $reason;
            out.ended_by = $by;
            return out;
        }};
    }
    // Sends to one side, raced against shutdown and revocation, within `$within`.
    macro_rules! send_or_stop {
        ($tx:expr, $msg:expr, $within:expr) => {
            tokio::select! {
                r = timeout($within, $tx.send($msg)) => match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(false),
                    Err(_) => Err(true),
                },
                () = shutdown.cancelled() => end!(EndedBy::GatewayShutdown, CloseCode::GOING_AWAY.0, SHUTDOWN_REASON.into()),
                (code, reason) = &mut ended => end!(ended_by(code), code.0, reason),
            }
        };
    }
    let agent_stuck = || -> String { "the session agent stopped reading".into() };
    let agent_lost = || -> String { "lost the connection to the session agent".into() };

    // The first frame must arrive within the handshake timeout and be OPEN or RESUME.
    let first = tokio::select! {
        m = timeout(settings.handshake_timeout, c_rx.next()) => m,
        () = shutdown.cancelled() => end!(EndedBy::GatewayShutdown, CloseCode::GOING_AWAY.0, SHUTDOWN_REASON.into()),
        (code, reason) = &mut ended => end!(ended_by(code), code.0, reason),
    };
    match first {
        Err(_) => end!(
            EndedBy::GatewayProtocol,
            CloseCode::HANDSHAKE_TIMEOUT.0,
            CloseCode::HANDSHAKE_TIMEOUT.reason().into()
        ),
        Ok(None) | Ok(Some(Err(_))) => {
            leave_agent!();
            gone!(
                EndedBy::Client,
                1006,
                "client disconnected before OPEN".into()
            );
        }
        Ok(Some(Ok(Message::Binary(b)))) => {
            if let Err((code, reason)) =
                check_client_frame(&b, settings.mode, settings.max_frame_bytes, true)
            {
                end!(EndedBy::GatewayProtocol, code.0, reason);
            }
            out.bytes_to_agent += b.len() as u64;
            to_agent.inc_by(b.len() as u64);
            match send_or_stop!(a_tx, Message::Binary(b), agent_send_timeout) {
                Ok(()) => {}
                Err(true) => end!(
                    EndedBy::GatewayProtocol,
                    CloseCode::INTERNAL.0,
                    agent_stuck()
                ),
                Err(false) => end!(EndedBy::Agent, CloseCode::INTERNAL.0, agent_lost()),
            }
        }
        Ok(Some(Ok(Message::Close(_)))) => {
            leave_agent!();
            gone!(EndedBy::Client, 1000, "client closed before OPEN".into());
        }
        Ok(Some(Ok(_))) => end!(
            EndedBy::GatewayProtocol,
            CloseCode::BAD_FRAME.0,
            "the first frame must be a binary OPEN or RESUME".into()
        ),
    }

    let mut agent_state = AgentState::Welcome;
    let ping_every = (settings.idle_timeout / 3).max(Duration::from_millis(100));
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut last_seen = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => end!(EndedBy::GatewayShutdown, CloseCode::GOING_AWAY.0, SHUTDOWN_REASON.into()),
            (code, reason) = &mut ended => end!(ended_by(code), code.0, reason),
            m = c_rx.next() => {
                last_seen = Instant::now();
                match m {
                    None => {
                        leave_agent!();
                        gone!(EndedBy::Client, 1006, "client disconnected".into());
                    }
                    Some(Err(e)) => {
                        let e: BoxError = e.into();
                        if is_too_large(&*e) {
                            end!(EndedBy::GatewayProtocol, CloseCode::FRAME_TOO_LARGE.0, "frame too large".into());
                        }
                        leave_agent!();
                        gone!(EndedBy::Client, 1006, format!("client connection failed: {e}"));
                    }
                    Some(Ok(Message::Binary(b))) => {
                        if let Err((code, reason)) =
                            check_client_frame(&b, settings.mode, settings.max_frame_bytes, false)
                        {
                            end!(EndedBy::GatewayProtocol, code.0, reason);
                        }
                        out.bytes_to_agent += b.len() as u64;
                        to_agent.inc_by(b.len() as u64);
                        match send_or_stop!(a_tx, Message::Binary(b), agent_send_timeout) {
                            Ok(()) => {}
                            Err(true) => end!(EndedBy::GatewayProtocol, CloseCode::INTERNAL.0, agent_stuck()),
                            Err(false) => end!(EndedBy::Agent, CloseCode::INTERNAL.0, agent_lost()),
                        }
                    }
                    Some(Ok(Message::Text(_))) => end!(EndedBy::GatewayProtocol, CloseCode::BAD_FRAME.0, "text messages are not part of tether.v2".into()),
                    Some(Ok(Message::Close(f))) => {
                        let (code, reason) = f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                        leave_agent!(if code == 1000 { 1000 } else { 1001 });
                        gone!(EndedBy::Client, code, if reason.is_empty() { "client closed".into() } else { reason });
                    }
                    Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
                }
            }
            m = a_rx.next() => match m {
                None => end!(EndedBy::Agent, CloseCode::INTERNAL.0, agent_lost()),
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    tracing::warn!(error = %e, "agent connection failed");
                    if is_too_large(&*e) {
                        // The agent broke the protocol; the gateway ends the connection.
                        let why = "the session agent sent a message over tether.v2's size limits";
                        end!(EndedBy::GatewayProtocol, CloseCode::INTERNAL.0, why.to_owned())
                    } else {
                        end!(EndedBy::Agent, CloseCode::INTERNAL.0, agent_lost())
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    if let Err(why) = check_agent_frame(&b, &mut agent_state) {
                        tracing::warn!(bytes = b.len(), %why, "the session agent broke tether.v2; closing");
                        end!(EndedBy::GatewayProtocol, CloseCode::INTERNAL.0, format!("the session agent sent {why}"));
                    }
                    out.bytes_to_client += b.len() as u64;
                    to_client.inc_by(b.len() as u64);
                    match send_or_stop!(c_tx, Message::Binary(b), client_send_timeout) {
                        Ok(()) => {}
                        Err(false) => {
                            leave_agent!();
                            gone!(EndedBy::Client, 1006, "client connection failed".into());
                        }
                        Err(true) => end!(EndedBy::GatewayProtocol, CloseCode::KEEPALIVE_TIMEOUT.0, "the client stopped reading".into()),
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    tracing::warn!("the session agent sent a text message; closing");
                    end!(EndedBy::GatewayProtocol, CloseCode::INTERNAL.0, "the session agent sent a text message".into())
                }
                Some(Ok(Message::Close(f))) => {
                    let (code, reason) = f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1000, String::new()));
                    let (relayed, reason) = relayed_agent_close(code, reason);
                    if relayed != code {
                        tracing::warn!(code, "the session agent sent a close code it may not send; relayed as 4500");
                    }
                    let _ = timeout(CLOSE_TIMEOUT, c_tx.send(close_msg(relayed, &reason))).await;
                    gone!(EndedBy::Agent, relayed, reason);
                }
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if let Err(true) = send_or_stop!(c_tx, Message::Ping(Vec::new().into()), client_send_timeout) {
                    end!(EndedBy::GatewayProtocol, CloseCode::KEEPALIVE_TIMEOUT.0, "the client stopped reading".into());
                }
            }
            () = sleep_until(last_seen + settings.idle_timeout) => end!(
                EndedBy::GatewayProtocol,
                CloseCode::KEEPALIVE_TIMEOUT.0,
                CloseCode::KEEPALIVE_TIMEOUT.reason().into()
            ),
        }
    }
}

/// Who ended a connection that `ended` closed.
fn ended_by(code: CloseCode) -> EndedBy {
    if code == CloseCode::REVOKED {
        EndedBy::GatewayRevoke
    } else {
        EndedBy::GatewaySignOut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::Size;

    fn open() -> Vec<u8> {
        ClientFrame::Open {
            size: Size::default(),
        }
        .encode()
    }

    #[test]
    fn observers_may_ack_and_ping_but_not_type_or_resize() {
        let input = ClientFrame::Input(b"ls\r".to_vec().into()).encode();
        let resize = ClientFrame::Resize(Size::default()).encode();
        let ack = ClientFrame::Ack(0).encode();
        let ping = ClientFrame::Ping(7).encode();
        for f in [&ack, &ping] {
            assert!(check_client_frame(f, Mode::Observe, 1024, false).is_ok());
        }
        for f in [&input, &resize] {
            assert_eq!(
                check_client_frame(f, Mode::Observe, 1024, false)
                    .unwrap_err()
                    .0,
                CloseCode::READ_ONLY
            );
            assert!(check_client_frame(f, Mode::Attach, 1024, false).is_ok());
        }
    }

    #[test]
    fn the_first_frame_must_open_or_resume() {
        assert!(check_client_frame(&open(), Mode::Attach, 1024, true).is_ok());
        let ack = ClientFrame::Ack(0).encode();
        assert_eq!(
            check_client_frame(&ack, Mode::Attach, 1024, true)
                .unwrap_err()
                .0,
            CloseCode::BAD_FRAME
        );
    }

    #[test]
    fn one_byte_over_the_limit_is_too_large_and_garbage_is_bad() {
        let mut big = vec![tether_protocol::frame::client_type::INPUT];
        big.resize(101, b'x');
        assert!(check_client_frame(&big, Mode::Attach, 101, false).is_ok());
        big.push(b'x');
        assert_eq!(
            check_client_frame(&big, Mode::Attach, 101, false)
                .unwrap_err()
                .0,
            CloseCode::FRAME_TOO_LARGE
        );
        assert_eq!(
            check_client_frame(&[0x7e], Mode::Attach, 101, false)
                .unwrap_err()
                .0,
            CloseCode::BAD_FRAME
        );
    }

    #[test]
    fn agent_frames_are_checked_for_type_order_and_offsets() {
        use tether_protocol::frame::SnapshotFrame;
        let welcome = |start, offset| {
            ServerFrame::Welcome {
                client_id: tether_protocol::ClientId::random(),
                mode: Mode::Attach,
                window: 1024,
                offset,
                start,
            }
            .encode()
        };
        let output = |offset| {
            ServerFrame::Output {
                offset,
                data: bytes::Bytes::from_static(b"x"),
            }
            .encode()
        };
        let snapshot = |offset, more| {
            ServerFrame::Snapshot(SnapshotFrame {
                offset,
                size: Size::default(),
                more,
                truncated: false,
                data: bytes::Bytes::from_static(b"$ "),
            })
            .encode()
        };
        let size = ServerFrame::Size(Size::default()).encode();
        let mut st = AgentState::Welcome;
        assert!(
            check_agent_frame(&output(0), &mut st).is_err(),
            "OUTPUT first"
        );

        // A replay streams from the WELCOME's offset, contiguously.
        let mut st = AgentState::Welcome;
        check_agent_frame(&welcome(Start::Replay, 7), &mut st).unwrap();
        check_agent_frame(&size, &mut st).unwrap();
        assert!(
            check_agent_frame(&output(6), &mut st).is_err(),
            "a gap back"
        );
        let mut st = AgentState::Streaming { next: 7 };
        check_agent_frame(&output(7), &mut st).unwrap();
        assert!(
            check_agent_frame(&output(9), &mut st).is_err(),
            "a gap ahead"
        );
        // A catch-up snapshot moves forward only.
        let mut st = AgentState::Streaming { next: 8 };
        assert!(check_agent_frame(&snapshot(5, false), &mut st).is_err());
        let mut st = AgentState::Streaming { next: 8 };
        check_agent_frame(&snapshot(100, false), &mut st).unwrap();
        check_agent_frame(&output(100), &mut st).unwrap();

        // A new client's snapshot comes first, at the WELCOME's offset, its chunks together.
        let mut st = AgentState::Welcome;
        check_agent_frame(&welcome(Start::Snapshot, 3), &mut st).unwrap();
        assert!(
            check_agent_frame(&output(3), &mut st).is_err(),
            "SNAPSHOT due"
        );
        let mut st = AgentState::Welcome;
        check_agent_frame(&welcome(Start::Snapshot, 3), &mut st).unwrap();
        assert!(
            check_agent_frame(&snapshot(4, false), &mut st).is_err(),
            "offset"
        );
        let mut st = AgentState::Welcome;
        check_agent_frame(&welcome(Start::Snapshot, 3), &mut st).unwrap();
        check_agent_frame(&snapshot(3, true), &mut st).unwrap();
        assert!(check_agent_frame(&size, &mut st).is_err(), "between chunks");
        let mut st = AgentState::Snapshot { at: 3, bytes: 2 };
        check_agent_frame(&snapshot(3, false), &mut st).unwrap();
        check_agent_frame(&output(3), &mut st).unwrap();
        assert!(check_agent_frame(&welcome(Start::Replay, 0), &mut st).is_err());
        // Too much snapshot in all.
        let mut st = AgentState::Snapshot {
            at: 3,
            bytes: tether_protocol::MAX_SNAPSHOT_TOTAL,
        };
        assert!(check_agent_frame(&snapshot(3, false), &mut st).is_err());
        // A client frame, and an OUTPUT over 65536 bytes of payload.
        let mut st = AgentState::Streaming { next: 0 };
        assert!(check_agent_frame(&open(), &mut st).is_err());
        let mut big = vec![tether_protocol::frame::server_type::OUTPUT; 9];
        big.resize(9 + 65537, b'x');
        assert!(check_agent_frame(&big, &mut st).is_err());
    }

    #[test]
    fn gateway_only_and_undefined_codes_from_the_agent_become_4500() {
        for code in [4411, 4440, 4999, 3000, 1008] {
            assert_eq!(relayed_agent_close(code, "x".into()).0, 4500, "{code}");
        }
        assert_eq!(relayed_agent_close(4404, String::new()).0, 4404);
        assert_eq!(
            relayed_agent_close(1000, "bye".into()),
            (1000, "bye".into())
        );
    }
}
