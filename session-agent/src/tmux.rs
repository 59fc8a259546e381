//! The tmux server behind a session: started on a socket private to the agent, killed at the
//! end. While it runs, the agent talks to it only through its control client.
//!
//! Options are chosen so tmux is invisible to a browser user (see `TMUX_CONF`): no status bar,
//! no prefix key (Ctrl-B reaches the shell), no mouse capture (the browser selects text), no
//! escape delay, and panes that stay after the shell exits so its exit status can be read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_protocol::Size;
use tokio::process::Command;

use crate::{Error, Result};

/// The tmux session name inside the private server.
pub const SESSION: &str = "main";

/// Written to the state directory and loaded when the server starts.
pub const TMUX_CONF: &str = "\
# Written by tether-session-agent. tmux should be invisible in a browser terminal.
set -g status off
set -g mouse off
set -g prefix None
set -g prefix2 None
unbind -a -T prefix
set -s escape-time 0
set -g remain-on-exit on
set -g history-limit 10000
set -g default-terminal tmux-256color
set -sa terminal-overrides ',xterm-256color:Tc'
set -g window-size latest
set -g aggressive-resize on
set -s exit-empty off
set -s exit-unattached off
set -g destroy-unattached off
set -g set-titles off
set -g visual-bell off
set -g focus-events off
";

/// The pane's command: `/bin/sh` runs the session's command, then reports its exit status in
/// the output stream and waits for the agent's acknowledgement (a newline typed into the pane)
/// before the pane ends. tmux discards output still queued for control clients when a pane's
/// process exits; with the pane kept alive until the agent has seen the report, which tmux
/// writes after everything before it, no output is lost. `trap :` (a handler, not an ignore,
/// so the command still gets the default) keeps Ctrl-C meant for the command from ending the
/// wrapper; the report is `ESC ] 7701 ; <nonce> ; <status> BEL` (terminals ignore it).
const PANE_WRAPPER: &str = "trap : INT QUIT; n=$1; shift; \"$@\"; s=$?; \
printf '\\033]7701;%s;%d\\007' \"$n\" \"$s\"; stty -echo 2>/dev/null; read -r _; exit \"$s\"";

/// The OSC number of the exit report (see [`PANE_WRAPPER`]).
pub const EXIT_REPORT_OSC: &str = "7701";

/// The pane's argv for the session's `argv`, with the exit report tagged by `nonce`.
pub fn pane_command(nonce: &str, argv: &[String]) -> Vec<String> {
    let mut v = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        PANE_WRAPPER.to_owned(),
        "tether-pane".to_owned(),
        nonce.to_owned(),
    ];
    v.extend(argv.iter().cloned());
    v
}

/// Finds the exit report tagged by `nonce` in the output stream, fed in pieces.
#[derive(Debug)]
pub struct ExitReport {
    prefix: Vec<u8>,
    tail: Vec<u8>,
}

impl ExitReport {
    pub fn new(nonce: &str) -> Self {
        Self {
            prefix: format!("\x1b]{EXIT_REPORT_OSC};{nonce};").into_bytes(),
            tail: Vec::new(),
        }
    }

    /// Feeds output; the status once the whole report has been seen.
    pub fn feed(&mut self, data: &[u8]) -> Option<i32> {
        self.tail.extend_from_slice(data);
        if let Some(at) = self
            .tail
            .windows(self.prefix.len())
            .position(|w| w == self.prefix.as_slice())
        {
            let rest = &self.tail[at + self.prefix.len()..];
            if let Some(end) = rest.iter().position(|&b| b == 0x07) {
                let status = std::str::from_utf8(&rest[..end]).ok()?.parse().ok();
                self.tail.clear();
                return status;
            }
            // The report so far: keep it for the rest.
            self.tail.drain(..at);
            return None;
        }
        let keep = self.tail.len().saturating_sub(self.prefix.len());
        self.tail.drain(..keep);
        None
    }
}

/// `PATH` of tmux and of the shell unless the session sets its own.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The whole environment of every tmux process the agent runs: fixed, never the agent's own
/// (which holds the agent's configuration) nor the session's `spec.env` (which reaches the shell
/// through `new-session -e` only). `HOME` is the agent's, which the operator sets.
pub fn base_env() -> Vec<(&'static str, String)> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/".into());
    vec![
        ("PATH", BASE_PATH.into()),
        ("HOME", home),
        ("LANG", "C.UTF-8".into()),
    ]
}

/// Handle on the private tmux server.
#[derive(Debug, Clone)]
pub struct Tmux {
    program: PathBuf,
    socket: PathBuf,
}

/// What the agent polls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaneState {
    /// `Some(status)` once the shell has exited (128+signal if killed by a signal).
    pub exited: Option<i32>,
    /// The pane is dead, whether or not tmux knows the status yet.
    pub dead: bool,
    /// Seconds since the epoch of the last output in the window.
    pub activity: u64,
}

impl Tmux {
    /// `program` is tmux's absolute path.
    pub fn new(program: &Path, state_dir: &Path) -> Self {
        Self {
            program: program.to_owned(),
            socket: state_dir.join("tmux.sock"),
        }
    }

    /// The tmux program the agent runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A `tmux` command on the private socket. `-u` because browsers speak UTF-8 whatever the
    /// container's locale says.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.env_clear().envs(base_env());
        c.arg("-u").arg("-S").arg(&self.socket);
        c.kill_on_drop(true);
        c
    }

    /// Starts the server with the shell in session [`SESSION`]; `env` is the shell's own
    /// environment on top of [`base_env`], set with `new-session -e` so that it never reaches
    /// the tmux server itself.
    pub async fn start(
        &self,
        state_dir: &Path,
        argv: &[String],
        env: &[(String, String)],
        size: Size,
        nonce: &str,
    ) -> Result<()> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::Io(state_dir.display().to_string(), e))?;
        let conf = state_dir.join("tmux.conf");
        std::fs::write(&conf, TMUX_CONF).map_err(|e| Error::Io(conf.display().to_string(), e))?;
        let mut c = self.command();
        c.arg("-f").arg(&conf);
        c.args([
            "new-session",
            "-d",
            "-s",
            SESSION,
            "-x",
            &size.cols.to_string(),
            "-y",
            &size.rows.to_string(),
        ]);
        for (name, value) in env {
            if name == "PATH" {
                // tmux gives a new session's panes the PATH of the client that created it, not
                // `-e PATH=`: so this one variable is the creating client's. tmux runs nothing by
                // name (the configuration above has no hooks or shell commands).
                c.env("PATH", value);
            } else {
                c.arg("-e").arg(format!("{name}={value}"));
            }
        }
        // The end of tmux's options: a command starting with `-` is still the command.
        c.arg("--");
        c.args(pane_command(nonce, argv));
        self.run(c).await?;
        Ok(())
    }

    async fn run(&self, mut c: Command) -> Result<String> {
        let out = tokio::time::timeout(Duration::from_secs(10), c.output())
            .await
            .map_err(|_| Error::Tmux("tmux command timed out".into()))?
            .map_err(|e| Error::Io("tmux".into(), e))?;
        if !out.status.success() {
            return Err(Error::Tmux(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `tmux ARGS…` and returns its stdout.
    pub async fn cmd(&self, args: &[&str]) -> Result<String> {
        let mut c = self.command();
        c.args(args);
        self.run(c).await
    }

    /// Starts copying the pane's raw output to a fifo (for the recording).
    pub async fn pipe_pane(&self, fifo: &Path) -> Result<()> {
        let shell_cmd = format!("exec cat > '{}'", fifo.display());
        self.cmd(&["pipe-pane", "-O", "-t", SESSION, &shell_cmd])
            .await
            .map(drop)
    }

    pub async fn kill_server(&self) {
        let _ = self.cmd(&["kill-server"]).await;
    }
}

/// What `display-message -p` prints for [`pane_state`]. Fields can be empty (no signal, or no
/// status yet): they are split on a separator, not on whitespace, so they keep their positions.
pub const PANE_STATE_FORMAT: &str =
    "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}:#{window_activity}:#{pane_pid}";

/// The shell's state from a line of [`PANE_STATE_FORMAT`].
pub fn pane_state(line: &str) -> PaneState {
    let line = line.trim();
    let mut state = parse_pane_state(line);
    if state.exited.is_none() && line.starts_with("1:") {
        // Seen under some parents: tmux marks the pane dead but never reaps the shell, so it
        // never learns the status. The zombie still carries it in /proc.
        let pid = line.rsplit(':').next().and_then(|p| p.parse::<u32>().ok());
        state.exited = pid.and_then(zombie_exit_status);
    }
    state
}

fn parse_pane_state(line: &str) -> PaneState {
    let f: Vec<&str> = line.split(':').collect();
    let num = |i: usize| f.get(i).and_then(|s| s.trim().parse::<i64>().ok());
    let activity = num(3).unwrap_or(0).max(0) as u64;
    // tmux marks the pane dead a moment before it has the status; until then it is not over.
    let exited = match (f.first().copied(), num(1), num(2)) {
        (Some("1"), Some(status), _) => Some(status as i32),
        (Some("1"), None, Some(signal)) => Some(128 + signal as i32),
        _ => None,
    };
    PaneState {
        exited,
        dead: f.first() == Some(&"1"),
        activity,
    }
}

/// The exit status of a zombie process, from field 52 (`exit_code`, a wait(2) status) of
/// `/proc/PID/stat`; 128+N for a death by signal N, as for a shell.
fn zombie_exit_status(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_zombie_stat(&stat)
}

fn parse_zombie_stat(stat: &str) -> Option<i32> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() != Some(&"Z") {
        return None;
    }
    let status: i32 = fields.get(49)?.parse().ok()?;
    Some(if status & 0x7f == 0 {
        (status >> 8) & 0xff
    } else {
        128 + (status & 0x7f)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombie_status_comes_from_the_exit_code_field() {
        let mut fields = vec!["0"; 50];
        fields[0] = "Z";
        fields[49] = "768"; // exit(3)
        let stat = format!("4242 (sh (x)) {}", fields.join(" "));
        assert_eq!(parse_zombie_stat(&stat), Some(3));
        fields[49] = "9"; // SIGKILL
        let stat = format!("4242 (sh) {}", fields.join(" "));
        assert_eq!(parse_zombie_stat(&stat), Some(137));
        fields[0] = "S";
        let stat = format!("4242 (sh) {}", fields.join(" "));
        assert_eq!(
            parse_zombie_stat(&stat),
            None,
            "a live process has no status"
        );
    }

    #[test]
    fn the_exit_report_is_found_across_pieces_and_only_with_its_nonce() {
        let mut r = ExitReport::new("n0nce");
        assert_eq!(
            r.feed(b"output \x1b]7701;other;3\x07 more"),
            None,
            "another nonce"
        );
        assert_eq!(r.feed(b"\x1b]77"), None);
        assert_eq!(r.feed(b"01;n0n"), None);
        assert_eq!(r.feed(b"ce;4"), None);
        assert_eq!(r.feed(b"2\x07"), Some(42));
        let mut r = ExitReport::new("n0nce");
        assert_eq!(r.feed(b"\x1b]7701;n0nce;130\x07"), Some(130));
        let mut r = ExitReport::new("n0nce");
        assert_eq!(r.feed(b"\x1b]7701;n0nce;x\x07"), None, "not a number");
    }

    #[test]
    fn pane_state_keeps_empty_fields_in_place() {
        let state = |exited, dead| PaneState {
            exited,
            dead,
            activity: 1_700_000_000,
        };
        assert_eq!(parse_pane_state("0:::1700000000"), state(None, false));
        assert_eq!(parse_pane_state("1:3::1700000000"), state(Some(3), true));
        assert_eq!(parse_pane_state("1::9:1700000000"), state(Some(137), true));
        // Dead, status not known yet: poll again rather than invent one.
        assert_eq!(parse_pane_state("1:::1700000000"), state(None, true));
    }
}
