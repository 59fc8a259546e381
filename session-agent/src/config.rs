//! Command-line flags, each with an environment fallback so the operator can configure the agent
//! through the pod spec alone.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::{Error, Result};

/// Serves one Tether terminal session: a tmux server running the session's shell, behind the
/// `tether.v1` WebSocket protocol on `GET /attach` (ticket in `Authorization: Bearer`), with
/// `GET /healthz`, `GET /readyz` and `GET /metrics` on the same address.
///
/// The shell command follows `--` (or TETHER_COMMAND as a JSON array); default `/bin/sh`.
///
/// On exit the agent writes one line of JSON to the termination message path:
/// {"reason":"ShellExited","exitCode":N,"message":..}, {"reason":"IdleTimeout",..} or
/// {"reason":"Terminated",..} (all exit 0), or {"reason":"Error",..} (exit 1).
#[derive(Debug, Clone, Parser)]
#[command(name = "tether-session-agent", version, verbatim_doc_comment)]
pub struct Args {
    /// Address for HTTP and WebSocket.
    #[arg(long, env = "TETHER_LISTEN", default_value = "0.0.0.0:7681")]
    pub listen: SocketAddr,

    /// The session this agent serves, "namespace/name"; tickets must name it in `sid`.
    #[arg(long, env = "TETHER_SESSION")]
    pub session: String,

    /// The session's resource UID; tickets must name it in `suid`.
    #[arg(long, env = "TETHER_SESSION_UID")]
    pub session_uid: String,

    /// This pod's UID (the operator sets it from the downward API). When set, tickets must name
    /// it in `pod`: a ticket the gateway made for another pod is refused with 4403.
    #[arg(long, env = "TETHER_POD_UID")]
    pub pod_uid: Option<String>,

    /// The gateway's Ed25519 public key (PEM) that signs attach tickets.
    #[arg(
        long,
        env = "TETHER_TICKET_PUBLIC_KEY",
        hide_env_values = true,
        allow_hyphen_values = true,
        conflicts_with = "ticket_public_key_file"
    )]
    pub ticket_public_key: Option<String>,

    /// File holding the gateway's Ed25519 public key (PEM).
    #[arg(long, env = "TETHER_TICKET_PUBLIC_KEY_FILE")]
    pub ticket_public_key_file: Option<PathBuf>,

    /// Exit once no client has been attached and the shell has printed nothing for this long.
    /// 0 disables.
    #[arg(long, env = "TETHER_IDLE_TIMEOUT_SECONDS", default_value_t = 0)]
    pub idle_timeout_seconds: u64,

    /// Where to write why the agent exited (Kubernetes reads it into the container status).
    #[arg(
        long,
        env = "TETHER_TERMINATION_MESSAGE_PATH",
        default_value = "/dev/termination-log"
    )]
    pub termination_message_path: PathBuf,

    /// The tmux program, by absolute path: never looked up in a PATH the session can change.
    #[arg(long, env = "TETHER_TMUX", default_value = "/usr/bin/tmux")]
    pub tmux: PathBuf,

    /// The shell's environment, a JSON array of {"name": ..., "value": ...} (the operator
    /// writes spec.env here). Applied to the shell through tmux only: the agent and tmux
    /// themselves run with a fixed environment, so LD_PRELOAD or PATH here reach the shell and
    /// nothing else.
    #[arg(long, env = "TETHER_SHELL_ENV", default_value = "[]")]
    pub shell_env: String,

    /// Directory for the private tmux socket and configuration.
    #[arg(long, env = "TETHER_STATE_DIR", default_value = "/tmp/tether")]
    pub state_dir: PathBuf,

    /// Initial terminal width.
    #[arg(long, env = "TETHER_COLS", default_value_t = 80, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub cols: u16,

    /// Initial terminal height.
    #[arg(long, env = "TETHER_ROWS", default_value_t = 24, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub rows: u16,

    /// When set, write an asciicast v2 recording of the session's output into this directory.
    #[arg(long, env = "TETHER_RECORDING_DIR")]
    pub recording_dir: Option<PathBuf>,

    /// Flow-control window: a connection is sent no more output while this many bytes are
    /// unacknowledged.
    #[arg(long, env = "TETHER_WINDOW_BYTES", default_value_t = 512 * 1024, value_parser = clap::value_parser!(u32).range(4096..))]
    pub window_bytes: u32,

    /// The session's output log: how many of the newest output bytes the agent keeps for
    /// resumes (at least the window). A resume from an offset older
    /// than that gets a snapshot.
    #[arg(long, env = "TETHER_BUFFER_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub buffer_bytes: usize,

    /// A connection whose unacknowledged backlog (the log's end minus what it acknowledged)
    /// exceeds this is skipped forward to a snapshot instead of being sent the bytes in between:
    /// a flood is never replayed to a slow viewer, and what follows Ctrl-C arrives promptly.
    #[arg(long, env = "TETHER_CATCH_UP_BYTES", default_value_t = 2 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(4096..))]
    pub catch_up_bytes: u64,

    /// How long a disconnected client is kept for a resume.
    #[arg(long, env = "TETHER_RESUME_GRACE_SECONDS", default_value_t = 60)]
    pub resume_grace_seconds: u64,

    /// Most clients (attached, observing or in their grace period) at once. An interactive
    /// client is never refused while a slot is held by an observer or a client in its grace
    /// period: the oldest of those makes room.
    #[arg(long, env = "TETHER_MAX_CLIENTS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_clients: u32,

    /// Clients one user may keep in their grace period (connection lost, not closed with 1000);
    /// a newer one replaces that user's oldest.
    #[arg(long, env = "TETHER_MAX_GRACE_CLIENTS_PER_USER", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_grace_clients_per_user: u32,

    /// How long SIGTERM waits for connections to close before the agent exits.
    #[arg(long, env = "TETHER_DRAIN_SECONDS", default_value_t = 5)]
    pub drain_seconds: u64,

    /// Log format.
    #[arg(long, env = "TETHER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// The shell and its arguments.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub session: String,
    pub session_uid: String,
    pub pod_uid: Option<String>,
    pub tmux: PathBuf,
    pub shell_env: Vec<(String, String)>,
    pub ticket_public_key: String,
    pub idle_timeout: Option<Duration>,
    pub termination_message_path: PathBuf,
    pub state_dir: PathBuf,
    pub cols: u16,
    pub rows: u16,
    pub recording_dir: Option<PathBuf>,
    pub window: u32,
    pub buffer_bytes: usize,
    pub catch_up_bytes: usize,
    pub resume_grace: Duration,
    pub max_clients: usize,
    pub max_grace_clients_per_user: usize,
    pub drain: Duration,
    pub command: Vec<String>,
}

/// Parses `--shell-env`: names as the schema allows them (letters, digits, underscores, not
/// starting with a digit or TETHER_), values without NUL.
pub fn parse_shell_env(json: &str) -> Result<Vec<(String, String)>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Var {
        name: String,
        #[serde(default)]
        value: String,
    }
    let vars: Vec<Var> = serde_json::from_str(json).map_err(|e| {
        Error::Config(format!(
            "TETHER_SHELL_ENV must be a JSON array of {{\"name\", \"value\"}}: {e}"
        ))
    })?;
    vars.into_iter()
        .map(|v| {
            let valid = v
                .name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && v.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !v.name.starts_with("TETHER_");
            if !valid {
                return Err(Error::Config(format!(
                    "TETHER_SHELL_ENV: {:?} is not a usable variable name",
                    v.name
                )));
            }
            if v.value.contains('\0') {
                return Err(Error::Config(format!(
                    "TETHER_SHELL_ENV: the value of {} contains NUL",
                    v.name
                )));
            }
            Ok((v.name, v.value))
        })
        .collect()
}

impl Args {
    pub fn into_config(self) -> Result<Config> {
        let ticket_public_key = match (self.ticket_public_key, self.ticket_public_key_file) {
            (Some(k), _) => k,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| Error::Io(format!("{}", path.display()), e))?,
            (None, None) => {
                return Err(Error::Config(
                    "--ticket-public-key or --ticket-public-key-file is required".into(),
                ));
            }
        };
        let command = if !self.command.is_empty() {
            self.command
        } else if let Ok(json) = std::env::var("TETHER_COMMAND") {
            serde_json::from_str::<Vec<String>>(&json).map_err(|e| {
                Error::Config(format!(
                    "TETHER_COMMAND must be a JSON array of strings: {e}"
                ))
            })?
        } else {
            vec!["/bin/sh".into()]
        };
        if command.is_empty() {
            return Err(Error::Config("the shell command is empty".into()));
        }
        if !self.session.contains('/') {
            return Err(Error::Config("--session must be namespace/name".into()));
        }
        if !self.tmux.is_absolute() {
            return Err(Error::Config(format!(
                "--tmux must be an absolute path, not {}",
                self.tmux.display()
            )));
        }
        let shell_env = parse_shell_env(&self.shell_env)?;
        Ok(Config {
            listen: self.listen,
            session: self.session,
            session_uid: self.session_uid,
            pod_uid: self.pod_uid.filter(|u| !u.is_empty()),
            tmux: self.tmux,
            shell_env,
            ticket_public_key,
            idle_timeout: (self.idle_timeout_seconds > 0)
                .then(|| Duration::from_secs(self.idle_timeout_seconds)),
            termination_message_path: self.termination_message_path,
            state_dir: self.state_dir,
            cols: self.cols,
            rows: self.rows,
            recording_dir: self.recording_dir,
            window: self.window_bytes,
            catch_up_bytes: usize::try_from(self.catch_up_bytes).unwrap_or(usize::MAX),
            buffer_bytes: self.buffer_bytes.max(self.window_bytes as usize),
            resume_grace: Duration::from_secs(self.resume_grace_seconds),
            max_clients: self.max_clients as usize,
            max_grace_clients_per_user: self.max_grace_clients_per_user as usize,
            drain: Duration::from_secs(self.drain_seconds),
            command,
        })
    }
}
