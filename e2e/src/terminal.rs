//! A terminal user through the gateway, for end-to-end tests: opens a session over the
//! WebSocket exactly as `docs/protocol.md` tells a client to (subprotocol `tether.v1`, the
//! token in a `tether.bearer.<base64url>` subprotocol, an allowed `Origin`), types a command
//! and reads what the shell printed.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use tether_protocol::{
    Mode, SUBPROTOCOL, Size,
    client::{Event, TerminalClient},
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{client::IntoClientRequest as _, http::HeaderValue},
};

/// The WebSocket a [`Terminal`] runs over.
pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// One open terminal connection.
#[derive(Debug)]
pub struct Terminal {
    client: TerminalClient<Ws>,
    seen: String,
}

impl Terminal {
    /// Opens `namespace/name` in `mode` at the gateway `addr` as the holder of `token`, with a
    /// wide terminal so that results are not wrapped.
    pub async fn open(
        addr: SocketAddr,
        origin: &str,
        token: &str,
        session: &str,
        mode: Mode,
    ) -> anyhow::Result<Terminal> {
        let mut req = format!("ws://{addr}/ws/{session}?mode={}", mode.as_str())
            .into_client_request()
            .context("building the upgrade request")?;
        let bearer = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
        let headers = req.headers_mut();
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&format!("{SUBPROTOCOL}, tether.bearer.{bearer}"))?,
        );
        headers.insert("origin", HeaderValue::from_str(origin)?);
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(20),
            tokio_tungstenite::connect_async(req),
        )
        .await
        .context("the WebSocket upgrade timed out")?
        .with_context(|| format!("upgrading to a WebSocket for {session}"))?;
        let size = Size {
            cols: 200,
            rows: 50,
        };
        let (client, _) =
            tokio::time::timeout(Duration::from_secs(20), TerminalClient::open(ws, size))
                .await
                .context("no WELCOME in 20s")??;
        Ok(Terminal {
            client,
            seen: String::new(),
        })
    }

    /// Types `command` and returns what it printed between two markers. The markers are
    /// printed by the shell and not typed literally (the echo of the typed line would match
    /// otherwise), so the result is the command's output only.
    pub async fn run(&mut self, command: &str, timeout: Duration) -> anyhow::Result<String> {
        let id: u32 = rand_id();
        let begin = format!("TETHER-BEGIN-{id}");
        let end = format!("TETHER-END-{id}");
        // `printf '%s-%s'` composes the marker at run time; the typed text never contains it.
        let line = format!(
            "printf '\\n%s-%s\\n' TETHER-BEGIN {id}; {command}; printf '\\n%s-%s\\n' TETHER-END {id}\r"
        );
        self.client.send_input(line.as_bytes()).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(start) = self.seen.rfind(&begin)
                && let Some(stop) = self.seen[start..].find(&end)
            {
                let text = self.seen[start + begin.len()..start + stop].to_string();
                self.seen.clear();
                return Ok(strip_ansi(&text).trim().to_string());
            }
            let event = tokio::time::timeout_at(deadline, self.client.next_event())
                .await
                .with_context(|| {
                    format!(
                        "`{command}` printed no end marker in {timeout:?}; the screen showed:\n{}",
                        strip_ansi(&self.seen)
                    )
                })??;
            match event {
                Event::Output { data, .. } => self.seen.push_str(&String::from_utf8_lossy(&data)),
                Event::Snapshot(s) => self.seen.push_str(&String::from_utf8_lossy(&s.data)),
                Event::Exit { code, reason } => bail!("the shell exited ({code}: {reason})"),
                Event::Closed { code, reason } => {
                    bail!("the connection closed ({code:?}: {reason})")
                }
                Event::Pong(_) | Event::Size(_) => {}
            }
        }
    }

    /// The underlying protocol client.
    pub fn client(&mut self) -> &mut TerminalClient<Ws> {
        &mut self.client
    }
}

fn rand_id() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

/// The text of terminal output without escape sequences and carriage returns.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.peek() {
                Some('[') => {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    chars.next();
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                            chars.next();
                            break;
                        }
                    }
                }
                // Other escapes: intermediate bytes (such as `(` of a character set
                // designation, ESC ( B), then one final byte.
                Some(_) => {
                    while chars.peek().is_some_and(|c| (' '..='/').contains(c)) {
                        chars.next();
                    }
                    chars.next();
                }
                None => {}
            },
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn strip_ansi_keeps_text_only() {
        assert_eq!(
            super::strip_ansi(
                "\u{1b}[1;32mok\u{1b}[0m\r\n\u{1b}]0;title\u{7}x\u{1b}(Bfish\u{1b}=y"
            ),
            "ok\nxfishy"
        );
    }
}
