//! The session's one tmux control client: a `tmux -C attach-session` child whose output feeds
//! the session-wide [`OutputLog`] and whose input carries commands, each answered in order.
//!
//! Every reply carries the log offset at which it arrived. tmux queues a reply behind the
//! `%output` it had queued before, so what a command saw of the pane (a `capture-pane`, the
//! cursor) is the state after exactly the bytes before that offset.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{oneshot, watch};

use crate::control::{DecodeError, Decoder, Event, OutputLog, Read, send_keys};

/// A reply to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `%end` rather than `%error`.
    pub ok: bool,
    /// The reply's lines, as tmux wrote them.
    pub lines: Vec<Vec<u8>>,
    /// The log's end when the reply arrived: the command saw the pane after exactly the bytes
    /// before it.
    pub offset: u64,
}

/// Why the control client cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("starting the tmux control client: {0}")]
    Start(String),
    #[error("tmux ended the control client{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Exited(Option<String>),
    #[error("the tmux control client broke the protocol: {0}")]
    Protocol(#[from] DecodeError),
    #[error("writing to the tmux control client: {0}")]
    Write(String),
    #[error("a command line must be one non-empty line (an empty line detaches)")]
    BadCommand,
    #[error("tmux refused {command:?}: {reason}")]
    Refused { command: String, reason: String },
}

/// The replies owed to one command line: one per command, but tmux skips the rest of a list
/// after a command fails (and a parse error is one `%error` for the whole line).
#[derive(Debug)]
struct Waiter {
    commands: usize,
    replies: Vec<Reply>,
    tx: oneshot::Sender<Vec<Reply>>,
}

#[derive(Debug)]
struct Shared {
    log: Mutex<OutputLog>,
    /// Answers owed, in the order the command lines were written.
    waiting: Mutex<VecDeque<Waiter>>,
    /// The log's end, for readers to wait on.
    end: watch::Sender<u64>,
    /// Set once when the client ended, with why.
    ended: watch::Sender<Option<ControlError>>,
}

/// The control client. Dropping it kills the child.
#[derive(Debug)]
pub struct ControlClient {
    shared: Arc<Shared>,
    input: tokio::sync::Mutex<ChildStdin>,
    _child: Child,
    pane: u32,
}

impl ControlClient {
    /// Attaches to session `target` of the server at `socket`, with `tmux` by absolute path and
    /// the fixed environment `env`; returns once tmux answered the attach. Output goes to a log
    /// of `log_capacity` bytes; only the pane that is active at the attach is logged. `target`
    /// goes into a command line as it is: a session name the agent chose, never user data.
    pub async fn attach(
        tmux: &Path,
        socket: &Path,
        env: &[(&str, String)],
        target: &str,
        log_capacity: usize,
    ) -> Result<Self, ControlError> {
        let mut child = Command::new(tmux)
            .arg("-S")
            .arg(socket)
            .args(["-C", "attach-session", "-t", target])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ControlError::Start(format!("{}: {e}", tmux.display())))?;
        let input = child.stdin.take().expect("piped stdin");
        let mut output = child.stdout.take().expect("piped stdout");
        let shared = Arc::new(Shared {
            log: Mutex::new(OutputLog::new(log_capacity)),
            waiting: Mutex::new(VecDeque::new()),
            end: watch::channel(0).0,
            ended: watch::channel(None).0,
        });
        // The attach's own reply (not ours) comes first; tmux 3.3a drops commands sent before.
        let (attached_tx, attached_rx) = oneshot::channel();
        let (pane_tx, pane_rx) = watch::channel(None::<u32>);
        let reader = shared.clone();
        tokio::spawn(async move {
            let why = read_loop(&mut output, &reader, attached_tx, pane_rx).await;
            reader.ended.send_replace(Some(why));
            // Nobody will answer the commands still waiting.
            reader.waiting.lock().expect("not poisoned").clear();
        });
        let mut ended = shared.ended.subscribe();
        let attached = tokio::select! {
            attached = attached_rx => attached.is_ok(),
            _ = ended.wait_for(Option::is_some) => false,
        };
        if !attached {
            return Err(shared
                .ended
                .borrow()
                .clone()
                .unwrap_or(ControlError::Exited(None)));
        }
        let mut client = Self {
            shared,
            input: tokio::sync::Mutex::new(input),
            _child: child,
            pane: 0,
        };
        let reply = client
            .command(&format!("display-message -p -t {target} '#{{pane_id}}'"))
            .await?;
        client.pane = reply
            .lines
            .first()
            .and_then(|l| std::str::from_utf8(l).ok())
            .and_then(|l| l.strip_prefix('%'))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ControlError::Refused {
                command: "display-message #{pane_id}".into(),
                reason: format!("no pane id in {:?}", reply.lines),
            })?;
        pane_tx.send_replace(Some(client.pane));
        Ok(client)
    }

    /// The pane whose output is logged (`%N`).
    pub fn pane(&self) -> u32 {
        self.pane
    }

    /// Runs one command and returns its reply (a `%error` reply is `ok: false`).
    pub async fn command(&self, command: &str) -> Result<Reply, ControlError> {
        let mut replies = self.commands(&[command]).await?;
        Ok(replies.remove(0))
    }

    /// Runs several commands as one line, so tmux runs them one after the other with no pane
    /// output read in between: their replies share one offset. Returns the replies up to and
    /// including the first that failed (tmux runs none of the rest).
    pub async fn commands(&self, commands: &[&str]) -> Result<Vec<Reply>, ControlError> {
        if commands.is_empty()
            || commands
                .iter()
                .any(|c| c.trim().is_empty() || c.contains(['\n', '\r']))
        {
            return Err(ControlError::BadCommand);
        }
        let line = commands.join(" ; ");
        let answer = self.write_lines(&[(line, commands.len())]).await?;
        self.replies(answer.into_iter().next().expect("one line"))
            .await
    }

    /// Types `data` into the pane exactly (see [`send_keys`]); returns once tmux took all of it.
    /// All its command lines are written at once (tmux answers them in order), so a large
    /// paste costs one round trip, and no other input comes between its lines.
    pub async fn type_bytes(&self, data: &[u8]) -> Result<(), ControlError> {
        let target = format!("%{}", self.pane);
        let lines: Vec<(String, usize)> = send_keys(&target, data)
            .into_iter()
            .map(|line| (line, 1))
            .collect();
        for answer in self.write_lines(&lines).await? {
            if let Some(reply) = self.replies(answer).await?.into_iter().find(|r| !r.ok) {
                return Err(ControlError::Refused {
                    command: "send-keys".into(),
                    reason: String::from_utf8_lossy(&reply.lines.concat()).into_owned(),
                });
            }
        }
        Ok(())
    }

    /// Writes command lines (each with the number of commands on it) in one write, each owed
    /// its replies before it is written, so the reader never sees a reply nobody waits for.
    async fn write_lines(
        &self,
        lines: &[(String, usize)],
    ) -> Result<Vec<oneshot::Receiver<Vec<Reply>>>, ControlError> {
        let mut input = self.input.lock().await;
        if let Some(why) = self.shared.ended.borrow().clone() {
            return Err(why);
        }
        let mut answers = Vec::with_capacity(lines.len());
        let mut bytes = Vec::with_capacity(lines.iter().map(|(l, _)| l.len() + 1).sum());
        {
            let mut waiting = self.shared.waiting.lock().expect("not poisoned");
            for (line, commands) in lines {
                let (tx, rx) = oneshot::channel();
                waiting.push_back(Waiter {
                    commands: *commands,
                    replies: Vec::with_capacity(*commands),
                    tx,
                });
                answers.push(rx);
                bytes.extend_from_slice(line.as_bytes());
                bytes.push(b'\n');
            }
        }
        input
            .write_all(&bytes)
            .await
            .map_err(|e| ControlError::Write(e.to_string()))?;
        Ok(answers)
    }

    /// The replies to one line, or why the client ended before they came.
    async fn replies(
        &self,
        answer: oneshot::Receiver<Vec<Reply>>,
    ) -> Result<Vec<Reply>, ControlError> {
        answer.await.map_err(|_| {
            self.shared
                .ended
                .borrow()
                .clone()
                .unwrap_or(ControlError::Exited(None))
        })
    }

    /// The oldest offset the log still holds and the offset after its newest byte.
    pub fn offsets(&self) -> (u64, u64) {
        let log = self.shared.log.lock().expect("not poisoned");
        (log.start(), log.end())
    }

    /// Up to `max` bytes of the pane's output from `offset`.
    pub fn read(&self, offset: u64, max: usize) -> Read {
        self.shared
            .log
            .lock()
            .expect("not poisoned")
            .read(offset, max)
    }

    /// The log's end offset, to wait for more output on.
    pub fn end(&self) -> watch::Receiver<u64> {
        self.shared.end.subscribe()
    }

    /// Resolves with why once the control client has ended.
    pub async fn ended(&self) -> ControlError {
        let mut ended = self.shared.ended.subscribe();
        let why = ended
            .wait_for(Option::is_some)
            .await
            .map(|w| w.clone())
            .ok()
            .flatten();
        why.unwrap_or(ControlError::Exited(None))
    }
}

async fn read_loop(
    output: &mut tokio::process::ChildStdout,
    shared: &Shared,
    attached: oneshot::Sender<()>,
    pane: watch::Receiver<Option<u32>>,
) -> ControlError {
    let mut attached = Some(attached);
    let mut decoder = Decoder::default();
    let mut events = Vec::new();
    let mut buf = vec![0; 64 << 10];
    loop {
        let n = match output.read(&mut buf).await {
            Ok(0) => return ControlError::Exited(None),
            Ok(n) => n,
            Err(e) => return ControlError::Exited(Some(e.to_string())),
        };
        if let Err(e) = decoder.feed(&buf[..n], &mut events) {
            return e.into();
        }
        let mut appended = false;
        for event in events.drain(..) {
            match event {
                Event::Output { pane: from, data } => {
                    // Before the pane is known nothing can have been typed, so nothing is
                    // lost by keeping the one pane of a new session; afterwards, other panes
                    // (a user's own `tmux split-window`) are not the session's output.
                    if pane.borrow().is_none_or(|p| p == from) {
                        shared.log.lock().expect("not poisoned").append(&data);
                        appended = true;
                    }
                }
                Event::Reply {
                    ours, ok, lines, ..
                } => {
                    if !ours {
                        if let Some(tx) = attached.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    let offset = shared.log.lock().expect("not poisoned").end();
                    let mut waiting = shared.waiting.lock().expect("not poisoned");
                    let Some(waiter) = waiting.front_mut() else {
                        return ControlError::Protocol(DecodeError::Unexpected(
                            "a reply to a command nobody sent".into(),
                        ));
                    };
                    waiter.replies.push(Reply { ok, lines, offset });
                    if !ok || waiter.replies.len() == waiter.commands {
                        let done = waiting.pop_front().expect("a waiter");
                        let _ = done.tx.send(done.replies);
                    }
                }
                Event::Exit(why) => return ControlError::Exited(why),
                Event::Notification { .. } => {}
            }
        }
        if appended {
            let end = shared.log.lock().expect("not poisoned").end();
            shared.end.send_replace(end);
        }
    }
}
