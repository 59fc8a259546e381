//! The Tether session agent: runs in a session pod, starts tmux for the session's shell, and
//! serves the `tether.v1` terminal protocol (see `docs/protocol.md`) to connections that present
//! a gateway-signed attach ticket.
//!
//! [`run`] is the whole agent on a bound listener; `main.rs` only parses flags, binds, and turns
//! the [`Outcome`] into an exit code. Tests call [`run`] in-process on `127.0.0.1:0`.
#![forbid(unsafe_code)]

pub mod config;
pub mod metrics;
mod recording;
mod server;
pub mod term;
pub mod tmux;

use std::future::Future;
use std::path::Path;

use serde::Serialize;
use thiserror::Error;
use tokio::net::TcpListener;

pub use config::{Args, Config};
pub use server::run;

/// Everything that can stop the agent from starting or serving.
#[derive(Debug, Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("tmux: {0}")]
    Tmux(String),
    #[error("pty: {0}")]
    Pty(#[source] pty_process::Error),
    #[error("ticket public key: {0}")]
    Ticket(#[source] tether_protocol::ticket::TicketError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the session ended. All three are clean ends: the agent exits 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The shell exited with this status (128+N when killed by signal N).
    ShellExited { code: i32 },
    /// No client attached and no output for the idle timeout.
    IdleTimeout,
    /// SIGTERM (or SIGINT): the pod is being deleted.
    Terminated,
}

/// The container termination message, one line of JSON. The operator maps `reason`:
/// `ShellExited` → phase Succeeded, `IdleTimeout` → Expired, `Terminated` → (pod deleted),
/// `Error` → Failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TerminationMessage {
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub message: String,
}

impl TerminationMessage {
    pub fn for_outcome(outcome: Outcome, idle_timeout_secs: u64) -> Self {
        match outcome {
            Outcome::ShellExited { code } => Self {
                reason: "ShellExited",
                exit_code: Some(code),
                message: format!("the shell exited with status {code}"),
            },
            Outcome::IdleTimeout => Self {
                reason: "IdleTimeout",
                exit_code: None,
                message: format!("no client attached and no output for {idle_timeout_secs}s"),
            },
            Outcome::Terminated => Self {
                reason: "Terminated",
                exit_code: None,
                message: "the agent received SIGTERM".into(),
            },
        }
    }

    pub fn error(e: &Error) -> Self {
        Self {
            reason: "Error",
            exit_code: None,
            message: e.to_string(),
        }
    }

    /// Writes the message; a failure is logged, never fatal (the path may not exist outside
    /// Kubernetes).
    pub fn write(&self, path: &Path) {
        let line = serde_json::to_string(self).unwrap_or_default() + "\n";
        if let Err(e) = std::fs::write(path, line) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the termination message");
        }
    }
}

/// Binds the listen address and runs until the session ends or `shutdown` resolves.
pub async fn bind_and_run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Outcome> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Io(format!("bind {}", config.listen), e))?;
    run(config, listener, shutdown).await
}
