//! The Tether session agent: runs in a session pod, starts tmux for the session's shell, and
//! serves the `tether.v2` terminal protocol (see `docs/protocol.md`) to connections that present
//! a gateway-signed attach ticket.
//!
//! [`run`] is the whole agent on a bound listener; `main.rs` only parses flags, binds, and turns
//! the [`Outcome`] into an exit code. Tests call [`run`] in-process on `127.0.0.1:0`.
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod control_client;
pub mod metrics;
mod recording;
pub mod resume;
mod server;
pub mod slots;
pub mod snapshot;
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
    #[error("ticket public key: {0}")]
    Ticket(#[source] tether_protocol::ticket::TicketError),
    /// The session's command cannot be executed, so there is no shell to serve.
    #[error("the session command {command:?} cannot be started: {why}")]
    CommandNotFound { command: String, why: String },
}

/// Checks that `argv[0]` names a program `execvp(3)` would run with `path` (the `PATH` the
/// shell gets): an executable file, given by its path or found in one of `path`'s directories.
/// tmux would otherwise start, fail to exec it in the pane and report status 127 as if a shell
/// had run and exited.
pub fn check_command(argv: &[String], path: Option<&std::ffi::OsStr>) -> Result<()> {
    use nix::unistd::{AccessFlags, access};
    let Some(program) = argv.first() else {
        return Err(Error::Config("the session command is empty".into()));
    };
    let not_found = |why: String| Error::CommandNotFound {
        command: program.clone(),
        why,
    };
    let usable = |p: &Path| -> std::result::Result<(), String> {
        let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a file", p.display()));
        }
        access(p, AccessFlags::X_OK).map_err(|e| format!("{} is not executable: {e}", p.display()))
    };
    if program.contains('/') {
        return usable(Path::new(program)).map_err(not_found);
    }
    let dirs = path.map(std::env::split_paths).into_iter().flatten();
    let mut tried = Vec::new();
    for dir in dirs {
        let candidate = dir.join(program);
        match usable(&candidate) {
            Ok(()) => return Ok(()),
            Err(_) => tried.push(dir.display().to_string()),
        }
    }
    Err(not_found(format!(
        "no executable {program} in PATH ({})",
        tried.join(":")
    )))
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
/// `CommandNotFound` and `Error` → Failed.
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
            reason: match e {
                Error::CommandNotFound { .. } => "CommandNotFound",
                _ => "Error",
            },
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

#[cfg(test)]
mod command_tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        vec![s.to_string()]
    }

    #[test]
    fn an_absolute_program_must_exist_and_be_executable() {
        assert!(check_command(&argv("/bin/sh"), None).is_ok());
        let e = check_command(&argv("/bin/nonexistent-shell"), None).unwrap_err();
        assert!(matches!(e, Error::CommandNotFound { .. }), "{e}");
        assert!(e.to_string().contains("/bin/nonexistent-shell"), "{e}");
        // A directory and a file without the execute bit are no programs either.
        assert!(check_command(&argv("/tmp"), None).is_err());
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(check_command(&argv(f.path().to_str().unwrap()), None).is_err());
    }

    #[test]
    fn a_bare_name_is_looked_up_in_path() {
        let path = std::ffi::OsString::from("/nonexistent:/usr/bin:/bin");
        assert!(check_command(&argv("sh"), Some(&path)).is_ok());
        let e = check_command(&argv("no-such-shell-anywhere"), Some(&path)).unwrap_err();
        assert!(
            e.to_string()
                .contains("no executable no-such-shell-anywhere in PATH"),
            "{e}"
        );
        assert!(
            check_command(&argv("sh"), None).is_err(),
            "no PATH, no lookup"
        );
        assert!(check_command(&[], None).is_err());
    }

    #[test]
    fn the_termination_message_names_the_reason() {
        let e = check_command(&argv("/bin/nonexistent-shell"), None).unwrap_err();
        assert_eq!(TerminationMessage::error(&e).reason, "CommandNotFound");
    }
}
