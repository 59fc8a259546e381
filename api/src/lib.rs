//! The `TerminalSession` custom resource, shared by the operator, the gateway and the tests.
//!
//! Everything a user can write is bounded here, in the schema the API server enforces, so a bad
//! manifest is refused at `kubectl apply` with a message naming the field instead of failing
//! later inside the operator. Nothing in the spec can make the session pod privileged: the
//! security context is the operator's, not the user's.
#![forbid(unsafe_code)]

mod session;

pub use session::*;

/// The API group of every Tether resource.
pub const GROUP: &str = "tether.dev";
/// The version of the `TerminalSession` API described here.
pub const VERSION: &str = "v1alpha1";
