//! A small agent-protocol backend for the gateway's own tests and benchmarks: it verifies attach
//! tickets like the real agent, answers `OPEN` with `WELCOME` and an empty snapshot and
//! `RESUME` with a replay from the offset asked for, echoes `INPUT` back as
//! `OUTPUT` with correct offsets, reports resizes as output and refuses observers' input. There
//! is no pty and no tmux here; the real agent lives in `session-agent/`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{SinkExt, StreamExt};
use tether_protocol::frame::Start;
use tether_protocol::ticket::Verifier;
use tether_protocol::{ClientFrame, ClientId, CloseCode, Mode, SUBPROTOCOL, ServerFrame};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// Input that makes the backend drop the connection abruptly, as a crashed agent would.
pub const DROP_COMMAND: &[u8] = b"!drop";

/// What the backend saw, for assertions.
#[derive(Debug, Default)]
pub struct BackendStats {
    pub accepted: AtomicUsize,
    pub refused: AtomicUsize,
    pub open: AtomicUsize,
}

fn close(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.0.into(),
        reason: reason.to_owned().into(),
    }))
}

/// Serves `listener` forever (abort the task to stop it).
pub async fn serve(listener: TcpListener, verifier: Arc<Verifier>, stats: Arc<BackendStats>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let verifier = verifier.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut mode = None;
            // The callback's signature is tungstenite's; its error type is not ours to shrink.
            #[allow(clippy::result_large_err)]
            let ws = tokio_tungstenite::accept_hdr_async(
                stream,
                |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok());
                    let claims = tether_protocol::ticket::from_authorization(auth)
                        .and_then(|t| verifier.verify(t));
                    match claims {
                        Ok(c) => mode = Some(Mode::from(c.mode)),
                        Err(e) => {
                            let mut r = ErrorResponse::new(Some(e.to_string()));
                            *r.status_mut() = http::StatusCode::FORBIDDEN;
                            return Err(r);
                        }
                    }
                    resp.headers_mut().insert(
                        "sec-websocket-protocol",
                        http::HeaderValue::from_static(SUBPROTOCOL),
                    );
                    Ok(resp)
                },
            )
            .await;
            let (Ok(mut ws), Some(mode)) = (ws, mode) else {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                return;
            };
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            stats.open.fetch_add(1, Ordering::Relaxed);
            let mut offset = 0u64;
            let mut opened = false;
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Binary(b) = msg else {
                    if msg.is_close() {
                        break;
                    }
                    continue;
                };
                let reply = match ClientFrame::decode(&b) {
                    Err(e) => {
                        let code = CloseCode::for_decode_error(&e);
                        let _ = ws.send(close(code, code.reason())).await;
                        break;
                    }
                    Ok(ClientFrame::Open { size }) if !opened => {
                        // As the agent: a new client's output starts with a snapshot (empty here).
                        opened = true;
                        let welcome = ServerFrame::Welcome {
                            client_id: ClientId::random(),
                            mode,
                            window: 1 << 20,
                            offset: 0,
                            start: Start::Snapshot,
                        };
                        if ws.send(Message::binary(welcome.encode())).await.is_err() {
                            break;
                        }
                        ServerFrame::Snapshot(tether_protocol::SnapshotFrame {
                            offset: 0,
                            size,
                            more: false,
                            truncated: false,
                            data: bytes::Bytes::new(),
                        })
                    }
                    Ok(ClientFrame::Resume { offset: from, .. }) if !opened => {
                        opened = true;
                        offset = from;
                        ServerFrame::Welcome {
                            client_id: ClientId::random(),
                            mode,
                            window: 1 << 20,
                            offset,
                            start: Start::Replay,
                        }
                    }
                    Ok(ClientFrame::Input(_)) | Ok(ClientFrame::Resize(_))
                        if mode == Mode::Observe =>
                    {
                        let _ = ws
                            .send(close(CloseCode::READ_ONLY, CloseCode::READ_ONLY.reason()))
                            .await;
                        break;
                    }
                    // A way for tests to cut the agent side of a connection without a close frame.
                    Ok(ClientFrame::Input(data)) if data.as_ref() == DROP_COMMAND => break,
                    Ok(ClientFrame::Input(data)) => {
                        let f = ServerFrame::Output {
                            offset,
                            data: data.clone(),
                        };
                        offset += data.len() as u64;
                        f
                    }
                    Ok(ClientFrame::Resize(s)) => {
                        let data = bytes::Bytes::from(format!("resized {}x{}\r\n", s.cols, s.rows));
                        let f = ServerFrame::Output {
                            offset,
                            data: data.clone(),
                        };
                        offset += data.len() as u64;
                        f
                    }
                    Ok(ClientFrame::Ping(n)) => ServerFrame::Pong(n),
                    Ok(ClientFrame::Ack(_)) => continue,
                    Ok(_) => {
                        let _ = ws
                            .send(close(CloseCode::BAD_FRAME, CloseCode::BAD_FRAME.reason()))
                            .await;
                        break;
                    }
                };
                if ws.send(Message::binary(reply.encode())).await.is_err() {
                    break;
                }
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
