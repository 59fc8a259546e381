//! Optional asciicast v2 recording of the session's output.
//!
//! tmux copies the pane's raw output (what the shell wrote, before tmux draws it) into a fifo
//! (`pipe-pane -O`); the agent timestamps it into `<dir>/<namespace>_<name>_<unix time>.cast`.
//! Recording the pane rather than one client's drawing makes the file independent of who was
//! attached and at what size, which is what `asciinema play` expects.

use std::io::Write as _;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tether_protocol::Size;
use tokio::io::AsyncReadExt;
use tracing::warn;

use crate::tmux::Tmux;
use crate::{Config, Error, Result};

pub async fn start(tmux: &Tmux, cfg: &Config, dir: &Path, size: Size) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io(dir.display().to_string(), e))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = format!("{}_{now}.cast", cfg.session.replace('/', "_"));
    let path = dir.join(name);
    let mut file =
        std::fs::File::create(&path).map_err(|e| Error::Io(path.display().to_string(), e))?;
    let header = serde_json::json!({
        "version": 2,
        "width": size.cols,
        "height": size.rows,
        "timestamp": now,
        "env": { "TERM": "tmux-256color" },
        "title": cfg.session,
    });
    writeln!(file, "{header}").map_err(|e| Error::Io(path.display().to_string(), e))?;

    let fifo = cfg.state_dir.join("recording.fifo");
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(
        &fifo,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .map_err(|e| Error::Io(fifo.display().to_string(), e.into()))?;
    // Opened read-write so it neither blocks waiting for tmux nor sees end-of-file between
    // writers.
    let mut rx = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&fifo)
        .map_err(|e| Error::Io(fifo.display().to_string(), e))?;
    tmux.pipe_pane(&fifo).await?;

    let started = Instant::now();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = match rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            carry.extend_from_slice(&buf[..n]);
            // Keep an incomplete UTF-8 sequence at the end for the next read.
            let valid = match std::str::from_utf8(&carry) {
                Ok(_) => carry.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => carry.len(),
            };
            let text = String::from_utf8_lossy(&carry[..valid]).into_owned();
            carry.drain(..valid);
            let event = serde_json::json!([started.elapsed().as_secs_f64(), "o", text]);
            if let Err(e) = writeln!(file, "{event}") {
                warn!(error = %e, "recording stopped");
                return;
            }
        }
    });
    Ok(())
}
