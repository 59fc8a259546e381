//! The bidirectional copy between a client and its session agent.
//!
//! Generic over any WebSocket `Sink`/`Stream` of tungstenite messages on both sides, so unit tests
//! feed it channels and the server feeds it real sockets. One task, one message in flight per
//! direction: a slow reader on either side slows its writer instead of growing a buffer. Every
//! client frame is decoded before it is forwarded; observers' input and resize frames are refused
//! here as well as in the agent.

use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use tether_protocol::{ClientFrame, CloseCode, Mode};
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
}

/// How a proxied connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyOutcome {
    /// The close code the client was sent (or sent), `1006` for a vanished peer.
    pub code: u16,
    pub reason: String,
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

/// Close codes only the gateway may send; an agent that sends one is relayed as `4500`.
pub fn is_gateway_only(code: u16) -> bool {
    code == CloseCode::REVOKED.0 || code == CloseCode::SIGNED_OUT.0
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
        bytes_to_agent: 0,
        bytes_to_client: 0,
    };
    let send_timeout = settings.idle_timeout;

    // Closes the client with `code`, tells the agent we left, records the outcome.
    macro_rules! end {
        ($code:expr, $reason:expr) => {{
            let (code, reason): (u16, String) = ($code, $reason);
            let _ = timeout(Duration::from_secs(1), c_tx.send(close_msg(code, &reason))).await;
            let _ = timeout(
                Duration::from_secs(1),
                a_tx.send(close_msg(1000, "client left the gateway")),
            )
            .await;
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
            return out;
        }};
    }

    // The first frame must arrive within the handshake timeout and be OPEN or RESUME.
    let first = tokio::select! {
        m = timeout(settings.handshake_timeout, c_rx.next()) => m,
        () = shutdown.cancelled() => end!(CloseCode::GOING_AWAY.0, SHUTDOWN_REASON.into()),
    };
    match first {
        Err(_) => end!(
            CloseCode::HANDSHAKE_TIMEOUT.0,
            CloseCode::HANDSHAKE_TIMEOUT.reason().into()
        ),
        Ok(None) | Ok(Some(Err(_))) => {
            let _ = a_tx.send(close_msg(1000, "client left the gateway")).await;
            out.reason = "client disconnected before OPEN".into();
            return out;
        }
        Ok(Some(Ok(Message::Binary(b)))) => {
            if let Err((code, reason)) =
                check_client_frame(&b, settings.mode, settings.max_frame_bytes, true)
            {
                end!(code.0, reason);
            }
            out.bytes_to_agent += b.len() as u64;
            to_agent.inc_by(b.len() as u64);
            if a_tx.send(Message::Binary(b)).await.is_err() {
                end!(
                    CloseCode::INTERNAL.0,
                    "lost the connection to the session agent".into()
                );
            }
        }
        Ok(Some(Ok(Message::Close(_)))) => {
            let _ = a_tx.send(close_msg(1000, "client left the gateway")).await;
            out.code = 1000;
            out.reason = "client closed before OPEN".into();
            return out;
        }
        Ok(Some(Ok(_))) => end!(
            CloseCode::BAD_FRAME.0,
            "the first frame must be a binary OPEN or RESUME".into()
        ),
    }

    let ping_every = (settings.idle_timeout / 3).max(Duration::from_millis(100));
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut last_seen = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => end!(CloseCode::GOING_AWAY.0, SHUTDOWN_REASON.into()),
            (code, reason) = &mut ended => end!(code.0, reason),
            m = c_rx.next() => {
                last_seen = Instant::now();
                match m {
                    None => {
                        let _ = a_tx.send(close_msg(1000, "client left the gateway")).await;
                        out.reason = "client disconnected".into();
                        return out;
                    }
                    Some(Err(e)) => {
                        let e: BoxError = e.into();
                        if is_too_large(&*e) {
                            end!(CloseCode::FRAME_TOO_LARGE.0, "frame too large".into());
                        }
                        let _ = a_tx.send(close_msg(1000, "client left the gateway")).await;
                        out.reason = format!("client connection failed: {e}");
                        return out;
                    }
                    Some(Ok(Message::Binary(b))) => {
                        if let Err((code, reason)) =
                            check_client_frame(&b, settings.mode, settings.max_frame_bytes, false)
                        {
                            end!(code.0, reason);
                        }
                        out.bytes_to_agent += b.len() as u64;
                        to_agent.inc_by(b.len() as u64);
                        match timeout(send_timeout, a_tx.send(Message::Binary(b))).await {
                            Ok(Ok(())) => {}
                            _ => end!(CloseCode::INTERNAL.0, "lost the connection to the session agent".into()),
                        }
                    }
                    Some(Ok(Message::Text(_))) => end!(CloseCode::BAD_FRAME.0, "text messages are not part of tether.v1".into()),
                    Some(Ok(Message::Close(f))) => {
                        let (code, reason) = f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                        let _ = a_tx.send(close_msg(1000, "client left the gateway")).await;
                        out.code = code;
                        out.reason = if reason.is_empty() { "client closed".into() } else { reason };
                        return out;
                    }
                    Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
                }
            }
            m = a_rx.next() => match m {
                None | Some(Err(_)) => end!(CloseCode::INTERNAL.0, "lost the connection to the session agent".into()),
                Some(Ok(Message::Binary(b))) => {
                    out.bytes_to_client += b.len() as u64;
                    to_client.inc_by(b.len() as u64);
                    match timeout(send_timeout, c_tx.send(Message::Binary(b))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => {
                            let _ = a_tx.send(close_msg(1000, "client left the gateway")).await;
                            out.reason = "client connection failed".into();
                            return out;
                        }
                        Err(_) => end!(CloseCode::KEEPALIVE_TIMEOUT.0, "the client stopped reading".into()),
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    // The agent's code and words reach the client unchanged.
                    let (code, reason) = f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1000, String::new()));
                    // The agent runs in the user's pod: it may not speak for the gateway.
                    let (code, reason) = if is_gateway_only(code) {
                        (CloseCode::INTERNAL.0, format!("the session agent sent the gateway's close code {code}"))
                    } else {
                        (code, reason)
                    };
                    let reason = if reason.is_empty() { CloseCode(code).reason().to_owned() } else { reason };
                    let _ = timeout(Duration::from_secs(1), c_tx.send(close_msg(code, &reason))).await;
                    out.code = code;
                    out.reason = reason;
                    return out;
                }
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if timeout(send_timeout, c_tx.send(Message::Ping(Vec::new().into()))).await.is_err() {
                    end!(CloseCode::KEEPALIVE_TIMEOUT.0, "the client stopped reading".into());
                }
            }
            () = sleep_until(last_seen + settings.idle_timeout) => end!(
                CloseCode::KEEPALIVE_TIMEOUT.0,
                CloseCode::KEEPALIVE_TIMEOUT.reason().into()
            ),
        }
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
}
