//! One attached client: a `tmux attach` process in its own pty, the output it produced (kept for
//! resume), and the flow-control window that decides whether its pty is read at all.
//!
//! Offsets count bytes read from this client's pty since it was opened. The reader stops while
//! `read - acked >= window`: tmux then sees a slow terminal and, instead of queueing without
//! bound, skips intermediate frames and redraws once the client catches up, so `yes` cannot flood
//! a browser and Ctrl-C, which goes to tmux over a different path, stays responsive.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tether_protocol::{ClientId, Mode, Size};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::tmux::{SESSION, Tmux};
use crate::{Error, Result};

/// Read size of the pty reader; also the largest `OUTPUT` payload.
pub const READ_CHUNK: usize = 32 * 1024;

/// Output kept for resume: chunks as they were read, and the offset of the first one.
#[derive(Debug, Default)]
pub struct Ring {
    chunks: VecDeque<Bytes>,
    start: u64,
    end: u64,
}

impl Ring {
    pub fn start(&self) -> u64 {
        self.start
    }
    pub fn end(&self) -> u64 {
        self.end
    }

    fn push(&mut self, data: Bytes, keep: usize, acked: u64) {
        self.end += data.len() as u64;
        self.chunks.push_back(data);
        // Drop the oldest chunks beyond `keep` bytes, but never an unacknowledged one: the
        // window bounds those.
        while let Some(front) = self.chunks.front() {
            let len = front.len() as u64;
            if self.end - self.start - len < keep as u64 || self.start + len > acked {
                break;
            }
            self.start += len;
            self.chunks.pop_front();
        }
    }

    /// Up to `max` bytes of chunks from `from` on (which must be within the ring).
    pub fn read_from(&self, from: u64, max: usize) -> Vec<(u64, Bytes)> {
        let mut out = Vec::new();
        let mut pos = self.start;
        let mut total = 0;
        for c in &self.chunks {
            let len = c.len() as u64;
            if pos + len > from {
                let skip = from.saturating_sub(pos) as usize;
                let piece = c.slice(skip..);
                total += piece.len();
                out.push((pos + skip as u64, piece));
                if total >= max {
                    break;
                }
            }
            pos += len;
        }
        out
    }
}

/// Mutable state of a client, behind one lock.
#[derive(Debug)]
pub struct State {
    pub ring: Ring,
    /// Everything before this offset has been consumed by the client.
    pub acked: u64,
    /// Generation of the connection currently driving this client (0: none).
    pub connection: u64,
    /// Set while no connection drives the client; the grace period counts from here.
    pub disconnected_at: Option<Instant>,
    /// The pty reached end of file (tmux client gone).
    pub closed: bool,
}

/// What a new client is opened with.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    pub mode: Mode,
    pub user: String,
    pub size: Size,
    pub window: u32,
    /// Output kept for resume beyond the window.
    pub keep: usize,
    /// Tests only: tee the output stream into a file here.
    pub tee_dir: Option<&'a std::path::Path>,
}

/// An attached client.
#[derive(Debug)]
pub struct TermClient {
    pub id: ClientId,
    pub mode: Mode,
    pub user: String,
    pub window: u32,
    keep: usize,
    pub state: Mutex<State>,
    /// Bumped (to the read offset) whenever output arrives or the pty closes.
    pub output: watch::Sender<u64>,
    /// Bumped when the window opens (acknowledgement) so the reader resumes.
    acks: watch::Sender<u64>,
    /// Bumped to the generation of the connection that now drives the client.
    pub takeover: watch::Sender<u64>,
    writer: tokio::sync::Mutex<pty_process::OwnedWritePty>,
    child: Mutex<Option<tokio::process::Child>>,
    pid: Option<u32>,
}

impl TermClient {
    /// Spawns `tmux attach` in a new pty and starts reading it.
    pub fn spawn(tmux: &Tmux, opts: Options<'_>, metrics: Arc<Metrics>) -> Result<Arc<Self>> {
        let Options {
            mode,
            user,
            size,
            window,
            keep,
            tee_dir,
        } = opts;
        let (pty, pts) = pty_process::open().map_err(Error::Pty)?;
        pty.resize(pty_process::Size::new(size.rows, size.cols))
            .map_err(Error::Pty)?;
        let mut cmd = pty_process::Command::new(tmux.program())
            .env_clear()
            .envs(crate::tmux::base_env())
            .arg("-u")
            .arg("-S")
            .arg(tmux.socket())
            .args(["attach-session", "-t", SESSION])
            .env("TERM", "xterm-256color")
            .kill_on_drop(true);
        if mode == Mode::Observe {
            // Read-only in tmux too (defence in depth; the agent already refuses the input), and
            // an observer's size never changes the window the attached users see.
            cmd = cmd.args(["-f", "read-only,ignore-size"]);
        }
        let child = cmd.spawn(pts).map_err(Error::Pty)?;
        let pid = child.id();
        let (mut reader, writer) = pty.into_split();
        let this = Arc::new(Self {
            id: ClientId::random(),
            mode,
            user,
            window,
            keep,
            state: Mutex::new(State {
                ring: Ring::default(),
                acked: 0,
                connection: 0,
                disconnected_at: None,
                closed: false,
            }),
            output: watch::channel(0).0,
            acks: watch::channel(0).0,
            takeover: watch::channel(0).0,
            writer: tokio::sync::Mutex::new(writer),
            child: Mutex::new(Some(child)),
            pid,
        });
        let mut tee = match tee_dir {
            Some(dir) => {
                let path = dir.join(this.id.to_string());
                Some(
                    std::fs::File::create(&path)
                        .map_err(|e| Error::Io(path.display().to_string(), e))?,
                )
            }
            None => None,
        };
        let weak = Arc::downgrade(&this);
        let mut acks = this.acks.subscribe();
        tokio::spawn(async move {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                // Flow control: wait for the window to open before reading.
                loop {
                    let Some(c) = weak.upgrade() else { return };
                    let full = {
                        let st = c.state.lock().unwrap();
                        st.ring.end - st.acked >= u64::from(c.window)
                    };
                    if !full {
                        break;
                    }
                    metrics.flow_pauses.inc();
                    drop(c);
                    if acks.changed().await.is_err() {
                        return;
                    }
                }
                let n = match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let Some(c) = weak.upgrade() else { return };
                let mut st = c.state.lock().unwrap();
                if n == 0 {
                    st.closed = true;
                    let end = st.ring.end;
                    drop(st);
                    c.output.send_replace(end);
                    return;
                }
                metrics.bytes_out.inc_by(n as u64);
                if let Some(f) = tee.as_mut() {
                    use std::io::Write as _;
                    let _ = f.write_all(&buf[..n]);
                }
                let acked = st.acked;
                st.ring
                    .push(Bytes::copy_from_slice(&buf[..n]), c.keep, acked);
                let end = st.ring.end;
                drop(st);
                c.output.send_replace(end);
            }
        });
        Ok(this)
    }

    /// Process id of the `tmux attach` client.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Records that everything before `offset` was consumed and reopens the window.
    pub fn set_acked(&self, offset: u64) {
        self.state.lock().unwrap().acked = offset;
        self.acks.send_modify(|v| *v += 1);
    }

    pub async fn write_input(&self, data: &[u8]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        w.write_all(data).await?;
        w.flush().await
    }

    pub async fn resize(&self, size: Size) -> Result<()> {
        self.writer
            .lock()
            .await
            .resize(pty_process::Size::new(size.rows, size.cols))
            .map_err(Error::Pty)
    }

    /// Ends the tmux client process.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // The child was spawned with kill_on_drop; tokio reaps it in the background.
            let _ = child.start_kill();
        }
    }
}

impl Drop for TermClient {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_history_but_never_unacked_bytes() {
        let mut r = Ring::default();
        for i in 0..10u8 {
            r.push(Bytes::from(vec![i; 10]), 30, 0);
        }
        // Nothing acked: everything stays.
        assert_eq!((r.start(), r.end()), (0, 100));
        r.push(Bytes::from(vec![10; 10]), 30, 100);
        assert_eq!((r.start(), r.end()), (80, 110));
        let got = r.read_from(85, usize::MAX);
        assert_eq!(got[0], (85, Bytes::from(vec![8; 5])));
        assert_eq!(got.iter().map(|(_, b)| b.len()).sum::<usize>(), 25);
    }
}
