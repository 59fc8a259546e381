//! The Tether terminal wire protocol, shared by the session agent, the gateway, the CLI and the
//! tests. `docs/protocol.md` is the normative description; this crate is its reference
//! implementation:
//!
//! - [`frame`]: the binary frames and their strict codec;
//! - [`close`]: WebSocket close codes and what each means;
//! - [`ticket`]: attach tickets (Ed25519-signed JWTs) minted by the gateway, verified by the agent;
//! - [`bearer`]: how a non-browser client offers its token on the WebSocket upgrade;
//! - [`client`]: an async client that opens or resumes a terminal over any WebSocket
//!   `Sink`/`Stream` and keeps the offsets and acknowledgements right.
//!
//! There is no Kubernetes in here on purpose: a terminal client should not need it.
#![forbid(unsafe_code)]

pub mod bearer;
pub mod client;
pub mod close;
pub mod frame;
pub mod reconnect;
pub mod ticket;

pub use bearer::{BEARER_PROTOCOL_PREFIX, bearer_protocol, bearer_protocol_token};
pub use close::CloseCode;
pub use frame::{ClientFrame, ClientId, DecodeError, Mode, ServerFrame, Size, SnapshotFrame};

/// The WebSocket subprotocol (`Sec-WebSocket-Protocol`) of this version of the protocol.
pub const SUBPROTOCOL: &str = "tether.v2";

/// Largest frame a client may send (type byte included). Input larger than this must be split.
pub const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Largest `INPUT` payload: [`MAX_CLIENT_FRAME`] minus the type byte.
pub const MAX_INPUT: usize = MAX_CLIENT_FRAME - 1;
/// Largest `OUTPUT` payload the agent sends in one frame.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;
/// Largest payload of one `SNAPSHOT` chunk; a larger snapshot comes in several. As small as an
/// `OUTPUT`, so that no WebSocket buffer on the way grows beyond what output needs anyway.
pub const MAX_SNAPSHOT: usize = 64 * 1024;
/// Largest whole snapshot (all its chunks) an agent sends; it keeps the newest history lines
/// that fit and marks the snapshot truncated.
pub const MAX_SNAPSHOT_TOTAL: usize = 32 * 1024 * 1024;
/// Largest `EXIT` reason, in bytes of UTF-8.
pub const MAX_EXIT_REASON: usize = 1024;
/// Largest frame the agent sends (a snapshot chunk with its header).
pub const MAX_SERVER_FRAME: usize = MAX_SNAPSHOT + 64;
/// Terminal dimensions are `1..=MAX_DIMENSION` columns and rows.
pub const MAX_DIMENSION: u16 = 1000;
