//! An async terminal client over any WebSocket `Sink`/`Stream` of tungstenite messages.
//!
//! It does the bookkeeping every client needs and is easy to get wrong: it checks that output
//! arrives contiguously by offset, remembers where to resume, applies snapshots, and acknowledges
//! output so the agent's flow window keeps moving. Tests, the CLI and the gateway's own probes
//! build on it; a browser client follows the same rules (see `docs/protocol.md`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tether_protocol::client::{Event, TerminalClient};
//! # let ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> = todo!();
//! let (mut term, _welcome) = TerminalClient::open(ws, tether_protocol::Size::default()).await?;
//! term.send_input(b"echo hi\r").await?;
//! while let Event::Output { data, .. } = term.next_event().await? {
//!     print!("{}", String::from_utf8_lossy(&data));
//! }
//! let resume_from = term.resume_state(); // keep this to reconnect with `TerminalClient::resume`
//! # Ok(()) }
//! ```

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use thiserror::Error;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;

use crate::frame::Start;
use crate::{
    ClientFrame, ClientId, CloseCode, DecodeError, Mode, ServerFrame, Size, SnapshotFrame,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong on the client side.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    WebSocket(#[source] BoxError),
    #[error("undecodable frame from agent: {0}")]
    Decode(#[from] DecodeError),
    #[error("protocol violation by agent: {0}")]
    Protocol(String),
    #[error("connection closed: {code:?} {reason}")]
    Closed {
        code: Option<CloseCode>,
        reason: String,
    },
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Where a client stands in its output stream; what a reconnect needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeState {
    pub client_id: ClientId,
    /// Offset of the next byte the client expects (= bytes it holds).
    pub offset: u64,
}

/// The agent's `WELCOME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    pub client_id: ClientId,
    pub mode: Mode,
    pub window: u32,
    pub offset: u64,
    pub start: Start,
}

/// What the agent sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Terminal output starting at `offset` (always the offset the client expected).
    Output {
        offset: u64,
        data: Bytes,
    },
    /// A whole snapshot (its chunks put together, `more` false): reset the terminal to its size,
    /// drop its scrollback and write `data`; output continues at `snapshot.offset`. It comes
    /// first on every new connection, on a resume past what the agent holds, and whenever the
    /// client fell so far behind that the agent skipped it forward.
    Snapshot(SnapshotFrame),
    /// The pane's size from here on in the stream (first right after `WELCOME`).
    Size(Size),
    /// The shell exited; a close follows.
    Exit {
        code: i32,
        reason: String,
    },
    Pong(u64),
    /// The agent closed the connection.
    Closed {
        code: Option<CloseCode>,
        reason: String,
    },
}

/// A terminal connection speaking `tether.v2`.
#[derive(Debug)]
pub struct TerminalClient<S> {
    ws: S,
    welcome: Welcome,
    received: u64,
    acked: u64,
    auto_ack: bool,
    /// The chunks of a snapshot that has more to come.
    partial: Option<SnapshotFrame>,
}

impl<S, E> TerminalClient<S>
where
    S: Sink<Message, Error = E> + Stream<Item = Result<Message, E>> + Unpin,
    E: Into<BoxError>,
{
    /// Opens a new client on an upgraded WebSocket.
    pub async fn open(ws: S, size: Size) -> Result<(Self, Welcome)> {
        Self::start(ws, ClientFrame::Open { size }).await
    }

    /// Resumes a client after a reconnect.
    pub async fn resume(ws: S, state: ResumeState, size: Size) -> Result<(Self, Welcome)> {
        Self::start(
            ws,
            ClientFrame::Resume {
                client_id: state.client_id,
                offset: state.offset,
                size,
            },
        )
        .await
    }

    async fn start(ws: S, first: ClientFrame) -> Result<(Self, Welcome)> {
        let resume_offset = match &first {
            ClientFrame::Resume { offset, .. } => Some(*offset),
            _ => None,
        };
        let mut this = Self {
            ws,
            welcome: Welcome {
                client_id: ClientId([0; 16]),
                mode: Mode::Observe,
                window: 0,
                offset: 0,
                start: Start::Snapshot,
            },
            received: 0,
            acked: 0,
            auto_ack: true,
            partial: None,
        };
        this.send_frame(&first).await?;
        let frame = loop {
            match this.next_frame().await? {
                Some(f) => break f,
                None => continue,
            }
        };
        let ServerFrame::Welcome {
            client_id,
            mode,
            window,
            offset,
            start,
        } = frame
        else {
            return Err(ClientError::Protocol(format!(
                "expected WELCOME, got {frame:?}"
            )));
        };
        if start == Start::Replay && Some(offset) != resume_offset {
            return Err(ClientError::Protocol(format!(
                "replay from {offset}, asked for {resume_offset:?}"
            )));
        }
        this.welcome = Welcome {
            client_id,
            mode,
            window,
            offset,
            start,
        };
        this.received = offset;
        this.acked = offset;
        let welcome = this.welcome;
        Ok((this, welcome))
    }

    /// The agent's welcome for this connection.
    pub fn welcome(&self) -> Welcome {
        self.welcome
    }

    /// What to pass to [`TerminalClient::resume`] after the connection breaks.
    pub fn resume_state(&self) -> ResumeState {
        ResumeState {
            client_id: self.welcome.client_id,
            offset: self.received,
        }
    }

    /// Offset of the next output byte expected.
    pub fn offset(&self) -> u64 {
        self.received
    }

    /// Automatic acknowledgement (on by default): ack once a quarter of the window is unacked.
    /// Turn it off to ack by hand, e.g. only after rendering.
    pub fn set_auto_ack(&mut self, on: bool) {
        self.auto_ack = on;
    }

    /// Waits for the next event. Keep-alive pings are answered by the WebSocket library.
    pub async fn next_event(&mut self) -> Result<Event> {
        loop {
            let Some(frame) = self.next_frame_or_close().await? else {
                continue;
            };
            match frame {
                Err(close) => return Ok(close),
                Ok(ServerFrame::Snapshot(s)) => {
                    if let Some(p) = &self.partial
                        && (p.offset, p.size, p.truncated) != (s.offset, s.size, s.truncated)
                    {
                        return Err(ClientError::Protocol(format!(
                            "snapshot chunk at {} {:?} inside a snapshot at {} {:?}",
                            s.offset, s.size, p.offset, p.size
                        )));
                    }
                    let whole = match self.partial.take() {
                        None => s,
                        Some(mut p) => {
                            let mut data = Vec::with_capacity(p.data.len() + s.data.len());
                            data.extend_from_slice(&p.data);
                            data.extend_from_slice(&s.data);
                            p.data = data.into();
                            p.more = s.more;
                            p
                        }
                    };
                    if whole.data.len() > crate::MAX_SNAPSHOT_TOTAL {
                        return Err(ClientError::Protocol(format!(
                            "snapshot of more than {} bytes",
                            crate::MAX_SNAPSHOT_TOTAL
                        )));
                    }
                    if whole.more {
                        self.partial = Some(whole);
                        continue;
                    }
                    self.received = whole.offset;
                    self.acked = whole.offset;
                    return Ok(Event::Snapshot(whole));
                }
                Ok(_) if self.partial.is_some() => {
                    return Err(ClientError::Protocol(
                        "a frame between the chunks of a snapshot".into(),
                    ));
                }
                Ok(ServerFrame::Output { offset, data }) => {
                    if offset != self.received {
                        return Err(ClientError::Protocol(format!(
                            "output at offset {offset}, expected {}",
                            self.received
                        )));
                    }
                    self.received += data.len() as u64;
                    if self.auto_ack
                        && self.received - self.acked >= u64::from(self.welcome.window / 4).max(1)
                    {
                        self.ack(self.received).await?;
                    }
                    return Ok(Event::Output { offset, data });
                }
                Ok(ServerFrame::Exit { code, reason }) => return Ok(Event::Exit { code, reason }),
                Ok(ServerFrame::Pong(n)) => return Ok(Event::Pong(n)),
                Ok(ServerFrame::Size(size)) => return Ok(Event::Size(size)),
                Ok(f @ ServerFrame::Welcome { .. }) => {
                    return Err(ClientError::Protocol(format!("unexpected {f:?}")));
                }
            }
        }
    }

    /// Sends keystrokes, split into frames as needed.
    pub async fn send_input(&mut self, data: &[u8]) -> Result<()> {
        for f in ClientFrame::inputs(data) {
            self.send_frame(&f).await?;
        }
        Ok(())
    }

    pub async fn resize(&mut self, size: Size) -> Result<()> {
        self.send_frame(&ClientFrame::Resize(size)).await
    }

    /// Acknowledges every byte before `offset`.
    pub async fn ack(&mut self, offset: u64) -> Result<()> {
        self.acked = offset;
        self.send_frame(&ClientFrame::Ack(offset)).await
    }

    pub async fn ping(&mut self, nonce: u64) -> Result<()> {
        self.send_frame(&ClientFrame::Ping(nonce)).await
    }

    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<()> {
        self.send_raw(frame.encode()).await
    }

    /// Sends arbitrary bytes as one binary message (tests of the agent's strictness).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.ws
            .send(Message::binary(bytes))
            .await
            .map_err(|e| ClientError::WebSocket(e.into()))
    }

    /// Leaves for good: closes with `1000`, and the agent frees the client's slot at once (it
    /// cannot be resumed). To pause and resume later, drop the connection instead (or close
    /// with any other code): the agent then keeps the client for its grace period.
    pub async fn close(mut self) -> Result<()> {
        let _ = self
            .ws
            .send(Message::Close(Some(CloseFrame {
                code: WsCloseCode::Normal,
                reason: "bye".into(),
            })))
            .await;
        Ok(())
    }

    /// Gives the WebSocket back (e.g. to drop it without a close, like a network cut).
    pub fn into_inner(self) -> S {
        self.ws
    }

    async fn next_frame(&mut self) -> Result<Option<ServerFrame>> {
        match self.next_frame_or_close().await? {
            None => Ok(None),
            Some(Ok(f)) => Ok(Some(f)),
            Some(Err(Event::Closed { code, reason })) => Err(ClientError::Closed { code, reason }),
            Some(Err(_)) => unreachable!("only Closed is returned as Err"),
        }
    }

    /// `Ok(None)` for control messages; `Err(Event::Closed)` when the agent closed.
    async fn next_frame_or_close(&mut self) -> Result<Option<Result<ServerFrame, Event>>> {
        let msg = match self.ws.next().await {
            None => {
                return Ok(Some(Err(Event::Closed {
                    code: None,
                    reason: "stream ended".into(),
                })));
            }
            Some(Err(e)) => return Err(ClientError::WebSocket(e.into())),
            Some(Ok(m)) => m,
        };
        match msg {
            Message::Binary(b) => Ok(Some(Ok(ServerFrame::decode(&b)?))),
            Message::Close(frame) => {
                let (code, reason) = match frame {
                    Some(f) => (Some(CloseCode(u16::from(f.code))), f.reason.to_string()),
                    None => (None, String::new()),
                };
                Ok(Some(Err(Event::Closed { code, reason })))
            }
            Message::Text(_) => Err(ClientError::Protocol("text message from agent".into())),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(None),
        }
    }
}
