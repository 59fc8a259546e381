//! The Tether terminal wire protocol (see `docs/protocol.md`).
#![forbid(unsafe_code)]
