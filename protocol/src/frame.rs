//! Binary frames and their codec.
//!
//! Every WebSocket binary message carries exactly one frame: a type byte followed by a fixed
//! big-endian header and, for some types, a payload that runs to the end of the message. The
//! decoder is strict: a frame that is too short, too long, of an unknown type, or has a field out
//! of range is an error, never a guess. Client frames have type bytes `0x01..=0x7f`, agent frames
//! `0x81..=0xff`, so a frame sent the wrong way is an unknown type too.

use bytes::Bytes;
use thiserror::Error;

use crate::{
    MAX_CLIENT_FRAME, MAX_DIMENSION, MAX_EXIT_REASON, MAX_INPUT, MAX_OUTPUT_CHUNK, MAX_SNAPSHOT,
};

/// Frame type bytes, client to agent.
pub mod client_type {
    /// `OPEN cols:u16 rows:u16` — first frame of a new connection.
    pub const OPEN: u8 = 0x01;
    /// `RESUME client_id:[16] offset:u64 cols:u16 rows:u16` — first frame of a reconnect.
    pub const RESUME: u8 = 0x02;
    /// `INPUT bytes…` — keystrokes / pasted bytes for the shell.
    pub const INPUT: u8 = 0x03;
    /// `RESIZE cols:u16 rows:u16`.
    pub const RESIZE: u8 = 0x04;
    /// `ACK offset:u64` — every output byte before `offset` has been consumed.
    pub const ACK: u8 = 0x05;
    /// `PING nonce:u64` — the agent answers with `PONG nonce`.
    pub const PING: u8 = 0x06;
}

/// Frame type bytes, agent to client.
pub mod server_type {
    /// `WELCOME client_id:[16] mode:u8 window:u32 offset:u64 start:u8`.
    pub const WELCOME: u8 = 0x81;
    /// `OUTPUT offset:u64 bytes…`.
    pub const OUTPUT: u8 = 0x82;
    /// `SNAPSHOT offset:u64 cols:u16 rows:u16 flags:u8 bytes…` — one chunk of a snapshot.
    pub const SNAPSHOT: u8 = 0x83;
    /// `EXIT code:i32 reason…(UTF-8)`.
    pub const EXIT: u8 = 0x84;
    /// `PONG nonce:u64`.
    pub const PONG: u8 = 0x85;
    /// `SIZE cols:u16 rows:u16` — the pane's size from here on in the stream.
    pub const SIZE: u8 = 0x86;
}

/// Why a frame could not be decoded. Each variant maps to a close code with
/// [`crate::CloseCode::for_decode_error`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("frame type 0x{frame_type:02x} needs {expected} bytes, got {actual}")]
    BadLength {
        frame_type: u8,
        expected: usize,
        actual: usize,
    },
    #[error("frame of {actual} bytes exceeds the limit of {limit}")]
    TooLarge { actual: usize, limit: usize },
    #[error("frame type 0x{0:02x} must carry a payload")]
    EmptyPayload(u8),
    #[error("terminal size {cols}x{rows} out of range 1..={max}")]
    BadSize { cols: u16, rows: u16, max: u16 },
    #[error("unknown mode {0}")]
    BadMode(u8),
    #[error("unknown start kind {0}")]
    BadStart(u8),
    #[error("unknown snapshot flags 0x{0:02x}")]
    BadFlags(u8),
    #[error("exit reason is not UTF-8")]
    BadReason,
}

/// A terminal size in character cells, always within `1..=MAX_DIMENSION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Size {
    pub cols: u16,
    pub rows: u16,
}

impl Size {
    /// A checked size.
    pub fn new(cols: u16, rows: u16) -> Result<Self, DecodeError> {
        if cols == 0 || rows == 0 || cols > MAX_DIMENSION || rows > MAX_DIMENSION {
            return Err(DecodeError::BadSize {
                cols,
                rows,
                max: MAX_DIMENSION,
            });
        }
        Ok(Self { cols, rows })
    }
}

impl Default for Size {
    fn default() -> Self {
        Self { cols: 80, rows: 24 }
    }
}

/// Identifies one attached client across reconnects: 16 random bytes chosen by the agent.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(pub [u8; 16]);

impl ClientId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Debug for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientId({self})")
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Interactive or read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// May send input and resize.
    Attach,
    /// Read-only: input and resize are refused by the agent.
    Observe,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Attach => "attach",
            Mode::Observe => "observe",
        }
    }
    fn to_byte(self) -> u8 {
        match self {
            Mode::Attach => 0,
            Mode::Observe => 1,
        }
    }
    fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(Mode::Attach),
            1 => Ok(Mode::Observe),
            other => Err(DecodeError::BadMode(other)),
        }
    }
}

/// How the output of a connection starts, announced in `WELCOME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Start {
    /// A resume whose offset the agent still held: output continues exactly after it.
    Replay = 1,
    /// A new client, or a resume whose bytes are gone: a snapshot at the `WELCOME`'s offset
    /// comes before any output.
    Snapshot = 2,
}

impl Start {
    fn from_byte(b: u8) -> Result<Self, DecodeError> {
        match b {
            1 => Ok(Start::Replay),
            2 => Ok(Start::Snapshot),
            other => Err(DecodeError::BadStart(other)),
        }
    }
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Open {
        size: Size,
    },
    Resume {
        client_id: ClientId,
        offset: u64,
        size: Size,
    },
    Input(Bytes),
    Resize(Size),
    Ack(u64),
    Ping(u64),
}

/// One chunk of a `SNAPSHOT`: the pane (scrollback history, screen, cursor and modes) as of
/// output offset `offset`, as bytes that reproduce it on a terminal that was reset to `size`.
/// A snapshot larger than [`MAX_SNAPSHOT`] comes in several chunks, all with the same offset and
/// size, every one but the last with [`SNAPSHOT_FLAG_MORE`]; nothing else comes between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFrame {
    /// Output offset the snapshot stands for: the next `OUTPUT` starts here.
    pub offset: u64,
    /// The pane's size: the terminal the bytes are written to must have it.
    pub size: Size,
    /// Another chunk of this snapshot follows.
    pub more: bool,
    /// The agent kept only the newest history lines (tmux held more than a snapshot carries).
    pub truncated: bool,
    /// Terminal output: write it, chunk after chunk, to a terminal reset to `size`.
    pub data: Bytes,
}

pub const SNAPSHOT_FLAG_MORE: u8 = 0x01;
pub const SNAPSHOT_FLAG_TRUNCATED: u8 = 0x02;

impl SnapshotFrame {
    /// Splits a whole snapshot into frames of at most [`MAX_SNAPSHOT`] payload bytes (one frame,
    /// possibly empty, when `data` is small).
    pub fn chunks(offset: u64, size: Size, truncated: bool, data: &Bytes) -> Vec<SnapshotFrame> {
        let n = data.len().div_ceil(MAX_SNAPSHOT).max(1);
        (0..n)
            .map(|i| {
                let from = (i * MAX_SNAPSHOT).min(data.len());
                let to = ((i + 1) * MAX_SNAPSHOT).min(data.len());
                SnapshotFrame {
                    offset,
                    size,
                    more: i + 1 < n,
                    truncated,
                    data: data.slice(from..to),
                }
            })
            .collect()
    }
}

/// Frames the agent sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    Welcome {
        client_id: ClientId,
        mode: Mode,
        window: u32,
        offset: u64,
        start: Start,
    },
    Output {
        offset: u64,
        data: Bytes,
    },
    Snapshot(SnapshotFrame),
    Exit {
        code: i32,
        reason: String,
    },
    Pong(u64),
    /// The pane's size changed (or, right after `WELCOME`, what it is): the output after this
    /// frame was written at this size.
    Size(Size),
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
fn exact(frame: &[u8], expected: usize) -> Result<(), DecodeError> {
    if frame.len() != expected {
        return Err(DecodeError::BadLength {
            frame_type: frame[0],
            expected,
            actual: frame.len(),
        });
    }
    Ok(())
}
fn at_least(frame: &[u8], expected: usize) -> Result<(), DecodeError> {
    if frame.len() < expected {
        return Err(DecodeError::BadLength {
            frame_type: frame[0],
            expected,
            actual: frame.len(),
        });
    }
    Ok(())
}
fn size_at(b: &[u8]) -> Result<Size, DecodeError> {
    Size::new(be_u16(b), be_u16(&b[2..]))
}

impl ClientFrame {
    /// Decodes one client frame (one WebSocket binary message).
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let Some(&ty) = frame.first() else {
            return Err(DecodeError::Empty);
        };
        if frame.len() > MAX_CLIENT_FRAME {
            return Err(DecodeError::TooLarge {
                actual: frame.len(),
                limit: MAX_CLIENT_FRAME,
            });
        }
        match ty {
            client_type::OPEN => {
                exact(frame, 5)?;
                Ok(ClientFrame::Open {
                    size: size_at(&frame[1..])?,
                })
            }
            client_type::RESUME => {
                exact(frame, 29)?;
                let mut id = [0u8; 16];
                id.copy_from_slice(&frame[1..17]);
                Ok(ClientFrame::Resume {
                    client_id: ClientId(id),
                    offset: be_u64(&frame[17..]),
                    size: size_at(&frame[25..])?,
                })
            }
            client_type::INPUT => {
                if frame.len() == 1 {
                    return Err(DecodeError::EmptyPayload(ty));
                }
                Ok(ClientFrame::Input(Bytes::copy_from_slice(&frame[1..])))
            }
            client_type::RESIZE => {
                exact(frame, 5)?;
                Ok(ClientFrame::Resize(size_at(&frame[1..])?))
            }
            client_type::ACK => {
                exact(frame, 9)?;
                Ok(ClientFrame::Ack(be_u64(&frame[1..])))
            }
            client_type::PING => {
                exact(frame, 9)?;
                Ok(ClientFrame::Ping(be_u64(&frame[1..])))
            }
            other => Err(DecodeError::UnknownType(other)),
        }
    }

    /// Encodes the frame. Panics if an `Input` is empty or longer than [`MAX_INPUT`]: split
    /// input with [`ClientFrame::inputs`] instead.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ClientFrame::Open { size } => {
                let mut v = vec![client_type::OPEN];
                put_size(&mut v, *size);
                v
            }
            ClientFrame::Resume {
                client_id,
                offset,
                size,
            } => {
                let mut v = Vec::with_capacity(29);
                v.push(client_type::RESUME);
                v.extend_from_slice(&client_id.0);
                v.extend_from_slice(&offset.to_be_bytes());
                put_size(&mut v, *size);
                v
            }
            ClientFrame::Input(data) => {
                assert!(
                    !data.is_empty() && data.len() <= MAX_INPUT,
                    "input frame of {} bytes",
                    data.len()
                );
                let mut v = Vec::with_capacity(1 + data.len());
                v.push(client_type::INPUT);
                v.extend_from_slice(data);
                v
            }
            ClientFrame::Resize(size) => {
                let mut v = vec![client_type::RESIZE];
                put_size(&mut v, *size);
                v
            }
            ClientFrame::Ack(offset) => {
                let mut v = vec![client_type::ACK];
                v.extend_from_slice(&offset.to_be_bytes());
                v
            }
            ClientFrame::Ping(nonce) => {
                let mut v = vec![client_type::PING];
                v.extend_from_slice(&nonce.to_be_bytes());
                v
            }
        }
    }

    /// Splits arbitrary input into `INPUT` frames no larger than the limit.
    pub fn inputs(data: &[u8]) -> impl Iterator<Item = ClientFrame> + '_ {
        data.chunks(MAX_INPUT)
            .map(|c| ClientFrame::Input(Bytes::copy_from_slice(c)))
    }
}

fn put_size(v: &mut Vec<u8>, size: Size) {
    v.extend_from_slice(&size.cols.to_be_bytes());
    v.extend_from_slice(&size.rows.to_be_bytes());
}

/// Encodes an `OUTPUT` frame without building a [`ServerFrame`] first (the agent's hot path).
pub fn encode_output(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + data.len());
    v.push(server_type::OUTPUT);
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(data);
    v
}

impl ServerFrame {
    /// Decodes one agent frame.
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let Some(&ty) = frame.first() else {
            return Err(DecodeError::Empty);
        };
        match ty {
            server_type::WELCOME => {
                exact(frame, 31)?;
                let mut id = [0u8; 16];
                id.copy_from_slice(&frame[1..17]);
                Ok(ServerFrame::Welcome {
                    client_id: ClientId(id),
                    mode: Mode::from_byte(frame[17])?,
                    window: u32::from_be_bytes([frame[18], frame[19], frame[20], frame[21]]),
                    offset: be_u64(&frame[22..]),
                    start: Start::from_byte(frame[30])?,
                })
            }
            server_type::OUTPUT => {
                at_least(frame, 9)?;
                let data = &frame[9..];
                if data.is_empty() {
                    return Err(DecodeError::EmptyPayload(ty));
                }
                if data.len() > MAX_OUTPUT_CHUNK {
                    return Err(DecodeError::TooLarge {
                        actual: frame.len(),
                        limit: MAX_OUTPUT_CHUNK + 9,
                    });
                }
                Ok(ServerFrame::Output {
                    offset: be_u64(&frame[1..]),
                    data: Bytes::copy_from_slice(data),
                })
            }
            server_type::SNAPSHOT => {
                at_least(frame, 14)?;
                if frame.len() - 14 > MAX_SNAPSHOT {
                    return Err(DecodeError::TooLarge {
                        actual: frame.len(),
                        limit: MAX_SNAPSHOT + 14,
                    });
                }
                let flags = frame[13];
                if flags & !(SNAPSHOT_FLAG_MORE | SNAPSHOT_FLAG_TRUNCATED) != 0 {
                    return Err(DecodeError::BadFlags(flags));
                }
                Ok(ServerFrame::Snapshot(SnapshotFrame {
                    offset: be_u64(&frame[1..]),
                    size: size_at(&frame[9..])?,
                    more: flags & SNAPSHOT_FLAG_MORE != 0,
                    truncated: flags & SNAPSHOT_FLAG_TRUNCATED != 0,
                    data: Bytes::copy_from_slice(&frame[14..]),
                }))
            }
            server_type::EXIT => {
                at_least(frame, 5)?;
                if frame.len() - 5 > MAX_EXIT_REASON {
                    return Err(DecodeError::TooLarge {
                        actual: frame.len(),
                        limit: MAX_EXIT_REASON + 5,
                    });
                }
                let code = i32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]);
                let reason =
                    std::str::from_utf8(&frame[5..]).map_err(|_| DecodeError::BadReason)?;
                Ok(ServerFrame::Exit {
                    code,
                    reason: reason.to_owned(),
                })
            }
            server_type::PONG => {
                exact(frame, 9)?;
                Ok(ServerFrame::Pong(be_u64(&frame[1..])))
            }
            server_type::SIZE => {
                exact(frame, 5)?;
                Ok(ServerFrame::Size(size_at(&frame[1..])?))
            }
            other => Err(DecodeError::UnknownType(other)),
        }
    }

    /// Encodes the frame. An `Exit` reason longer than [`MAX_EXIT_REASON`] is cut at a character
    /// boundary.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ServerFrame::Welcome {
                client_id,
                mode,
                window,
                offset,
                start,
            } => {
                let mut v = Vec::with_capacity(31);
                v.push(server_type::WELCOME);
                v.extend_from_slice(&client_id.0);
                v.push(mode.to_byte());
                v.extend_from_slice(&window.to_be_bytes());
                v.extend_from_slice(&offset.to_be_bytes());
                v.push(*start as u8);
                v
            }
            ServerFrame::Output { offset, data } => encode_output(*offset, data),
            ServerFrame::Snapshot(s) => {
                let mut v = Vec::with_capacity(14 + s.data.len());
                v.push(server_type::SNAPSHOT);
                v.extend_from_slice(&s.offset.to_be_bytes());
                put_size(&mut v, s.size);
                let mut flags = 0;
                if s.more {
                    flags |= SNAPSHOT_FLAG_MORE;
                }
                if s.truncated {
                    flags |= SNAPSHOT_FLAG_TRUNCATED;
                }
                v.push(flags);
                v.extend_from_slice(&s.data);
                v
            }
            ServerFrame::Size(size) => {
                let mut v = vec![server_type::SIZE];
                put_size(&mut v, *size);
                v
            }
            ServerFrame::Exit { code, reason } => {
                let mut end = reason.len().min(MAX_EXIT_REASON);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                let mut v = Vec::with_capacity(5 + end);
                v.push(server_type::EXIT);
                v.extend_from_slice(&code.to_be_bytes());
                v.extend_from_slice(&reason.as_bytes()[..end]);
                v
            }
            ServerFrame::Pong(nonce) => {
                let mut v = vec![server_type::PONG];
                v.extend_from_slice(&nonce.to_be_bytes());
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size() -> Size {
        Size::new(120, 40).unwrap()
    }

    #[test]
    fn every_client_frame_round_trips() {
        let frames = [
            ClientFrame::Open { size: size() },
            ClientFrame::Resume {
                client_id: ClientId([7; 16]),
                offset: u64::MAX - 1,
                size: size(),
            },
            ClientFrame::Input(Bytes::from_static(b"ls -l\r")),
            ClientFrame::Input(Bytes::from(vec![0u8; MAX_INPUT])),
            ClientFrame::Resize(Size::new(1, MAX_DIMENSION).unwrap()),
            ClientFrame::Ack(12345),
            ClientFrame::Ping(9),
        ];
        for f in frames {
            assert_eq!(ClientFrame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn every_server_frame_round_trips() {
        let frames = [
            ServerFrame::Welcome {
                client_id: ClientId([1; 16]),
                mode: Mode::Observe,
                window: 1 << 20,
                offset: 42,
                start: Start::Snapshot,
            },
            ServerFrame::Output {
                offset: 99,
                data: Bytes::from_static(b"hello\r\n"),
            },
            ServerFrame::Snapshot(SnapshotFrame {
                offset: 5,
                size: size(),
                more: true,
                truncated: true,
                data: Bytes::from_static(b"\x1b[31mred\x1b[0m\r\nline"),
            }),
            ServerFrame::Size(size()),
            ServerFrame::Exit {
                code: -1,
                reason: "shell exited".into(),
            },
            ServerFrame::Pong(7),
        ];
        for f in frames {
            assert_eq!(ServerFrame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn the_documented_bytes_are_the_encoded_bytes() {
        assert_eq!(
            ClientFrame::Open {
                size: Size::new(80, 24).unwrap()
            }
            .encode(),
            [0x01, 0, 80, 0, 24]
        );
        assert_eq!(
            ClientFrame::Ack(0x0102).encode(),
            [0x05, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        assert_eq!(encode_output(1, b"A"), [0x82, 0, 0, 0, 0, 0, 0, 0, 1, b'A']);
    }

    #[test]
    fn truncated_and_padded_frames_are_rejected() {
        for f in [
            ClientFrame::Open { size: size() },
            ClientFrame::Ack(1),
            ClientFrame::Resize(size()),
        ] {
            let bytes = f.encode();
            for cut in 1..bytes.len() {
                assert!(matches!(
                    ClientFrame::decode(&bytes[..cut]),
                    Err(DecodeError::BadLength { .. })
                ));
            }
            let mut long = bytes.clone();
            long.push(0);
            assert!(matches!(
                ClientFrame::decode(&long),
                Err(DecodeError::BadLength { .. })
            ));
        }
        assert_eq!(ClientFrame::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            ClientFrame::decode(&[client_type::INPUT]),
            Err(DecodeError::EmptyPayload(0x03))
        );
    }

    #[test]
    fn unknown_and_wrong_direction_types_are_rejected() {
        assert_eq!(
            ClientFrame::decode(&[0x00]),
            Err(DecodeError::UnknownType(0))
        );
        assert_eq!(
            ClientFrame::decode(&[0x7f, 1]),
            Err(DecodeError::UnknownType(0x7f))
        );
        assert_eq!(
            ClientFrame::decode(&encode_output(0, b"x")),
            Err(DecodeError::UnknownType(0x82))
        );
        assert_eq!(
            ServerFrame::decode(&ClientFrame::Ack(1).encode()),
            Err(DecodeError::UnknownType(0x05))
        );
    }

    #[test]
    fn oversized_frames_are_rejected() {
        let mut big = vec![client_type::INPUT];
        big.resize(MAX_CLIENT_FRAME + 1, b'a');
        assert!(matches!(
            ClientFrame::decode(&big),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn sizes_outside_the_range_are_rejected() {
        for (c, r) in [
            (0, 24),
            (80, 0),
            (65535, 24),
            (80, 65535),
            (MAX_DIMENSION + 1, 1),
        ] {
            let mut f = vec![client_type::RESIZE];
            f.extend_from_slice(&u16::to_be_bytes(c));
            f.extend_from_slice(&u16::to_be_bytes(r));
            assert!(
                matches!(ClientFrame::decode(&f), Err(DecodeError::BadSize { .. })),
                "{c}x{r}"
            );
        }
    }

    /// A plain randomized test of the decoders (the cargo-fuzz target in `fuzz/` does the same
    /// with coverage guidance): arbitrary bytes never panic, and whatever decodes re-encodes to
    /// the same bytes.
    #[test]
    fn random_bytes_never_panic_and_decoded_frames_reencode_identically() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e7e7e);
        for _ in 0..200_000 {
            let len = rng.random_range(0..40);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if let Some(first) = buf.first_mut() {
                // Bias towards known types so the interesting paths run often.
                if rng.random_bool(0.8) {
                    *first = [1u8, 2, 3, 4, 5, 6, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86]
                        [rng.random_range(0..12)];
                }
            }
            if let Ok(f) = ClientFrame::decode(&buf) {
                assert_eq!(f.encode(), buf);
            }
            if let Ok(f) = ServerFrame::decode(&buf) {
                assert_eq!(f.encode(), buf);
            }
        }
    }

    #[test]
    fn a_large_snapshot_is_chunked_and_the_chunks_concatenate_to_it() {
        let data = Bytes::from(
            (0..MAX_SNAPSHOT * 2 + 5)
                .map(|i| i as u8)
                .collect::<Vec<_>>(),
        );
        let chunks = SnapshotFrame::chunks(77, size(), false, &data);
        assert_eq!(chunks.len(), 3);
        assert!(chunks[0].more && chunks[1].more && !chunks[2].more);
        assert!(chunks.iter().all(|c| c.offset == 77 && c.size == size()));
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
        assert_eq!(joined, data);
        for c in &chunks {
            let bytes = ServerFrame::Snapshot(c.clone()).encode();
            assert!(bytes.len() <= crate::MAX_SERVER_FRAME);
        }
        let one = SnapshotFrame::chunks(1, size(), true, &Bytes::new());
        assert_eq!(one.len(), 1);
        assert!(!one[0].more && one[0].truncated && one[0].data.is_empty());
    }

    #[test]
    fn the_v2_agent_frames_have_their_documented_bytes() {
        assert_eq!(
            ServerFrame::Size(Size::new(80, 24).unwrap()).encode(),
            [0x86, 0, 80, 0, 24]
        );
        let snap = ServerFrame::Snapshot(SnapshotFrame {
            offset: 2,
            size: Size::new(80, 24).unwrap(),
            more: true,
            truncated: false,
            data: Bytes::from_static(b"x"),
        });
        assert_eq!(
            snap.encode(),
            [0x83, 0, 0, 0, 0, 0, 0, 0, 2, 0, 80, 0, 24, 1, b'x']
        );
        // Start 0 (v1's "new") is gone: a v2 agent always sends a snapshot to a new client.
        let mut w = ServerFrame::Welcome {
            client_id: ClientId([0; 16]),
            mode: Mode::Attach,
            window: 1,
            offset: 0,
            start: Start::Replay,
        }
        .encode();
        *w.last_mut().unwrap() = 0;
        assert_eq!(ServerFrame::decode(&w), Err(DecodeError::BadStart(0)));
        let mut bad = snap.encode();
        bad[13] = 0x04;
        assert_eq!(ServerFrame::decode(&bad), Err(DecodeError::BadFlags(0x04)));
    }
}
