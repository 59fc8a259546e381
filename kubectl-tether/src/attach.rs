//! `kubectl tether attach NAME`: a terminal session in your own terminal, through the gateway.
//!
//! Raw mode for the life of the attach, the window size follows SIGWINCH, a dropped connection
//! is resumed without losing output, and the terminal is restored on every way out (normal exit,
//! error, signal, panic).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tether_protocol::client::{ClientError, Event, ResumeState, TerminalClient};
use tether_protocol::reconnect::{CloseAction, backoff, close_action};
use tether_protocol::{CloseCode, SUBPROTOCOL, Size, bearer_protocol};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::signin::Credentials;

/// Leaves raw mode when dropped, whatever the way out. Without a terminal on stdin (a pipe, a
/// test) there is nothing to switch.
struct RawMode(bool);

impl RawMode {
    fn enter() -> anyhow::Result<Self> {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return Ok(RawMode(false));
        }
        crossterm::terminal::enable_raw_mode().context("entering raw mode")?;
        Ok(RawMode(true))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if self.0 {
            let _ = crossterm::terminal::disable_raw_mode();
        }
    }
}

fn terminal_size() -> Size {
    crossterm::terminal::size()
        .ok()
        .and_then(|(c, r)| Size::new(c.clamp(1, 1000), r.clamp(1, 1000)).ok())
        .unwrap_or_default()
}

/// `ws(s)://host/ws/ns/name?mode=…` and the Origin the gateway expects (its own).
fn endpoint(
    gateway: &str,
    ns: &str,
    name: &str,
    observe: bool,
) -> anyhow::Result<(String, String)> {
    let gateway = gateway.trim_end_matches('/');
    let (scheme, rest) = gateway
        .split_once("://")
        .context("--gateway must be a URL like https://tether.example.com")?;
    let ws_scheme = match scheme {
        "https" | "wss" => "wss",
        "http" | "ws" => "ws",
        other => bail!("unsupported scheme {other}"),
    };
    let host = rest.split('/').next().unwrap_or(rest);
    let origin_scheme = if ws_scheme == "wss" { "https" } else { "http" };
    let mode = if observe { "observe" } else { "attach" };
    Ok((
        format!("{ws_scheme}://{host}/ws/{ns}/{name}?mode={mode}"),
        format!("{origin_scheme}://{host}"),
    ))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a connection attempt failed: worth retrying or not.
enum ConnectError {
    Fatal(String),
    Retry(String),
}

async fn connect(
    url: &str,
    origin: &str,
    token: &str,
    tls: Option<&Connector>,
) -> Result<Ws, ConnectError> {
    let mut req = url
        .into_client_request()
        .map_err(|e| ConnectError::Fatal(e.to_string()))?;
    let protocols = format!("{SUBPROTOCOL}, {}", bearer_protocol(token));
    let h = req.headers_mut();
    h.insert(
        "sec-websocket-protocol",
        protocols.parse().map_err(|_| {
            ConnectError::Fatal("the token has characters a header cannot carry".into())
        })?,
    );
    h.insert(
        "origin",
        origin
            .parse()
            .map_err(|_| ConnectError::Fatal("bad gateway URL".into()))?,
    );
    match tokio::time::timeout(
        Duration::from_secs(15),
        tokio_tungstenite::connect_async_tls_with_config(req, None, false, tls.cloned()),
    )
    .await
    {
        Err(_) => Err(ConnectError::Retry("timed out connecting".into())),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let status = resp.status();
            let words = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| status.to_string());
            let msg = format!("{} {words}", status.as_u16());
            if status.is_server_error() || status.as_u16() == 429 {
                Err(ConnectError::Retry(msg))
            } else {
                Err(ConnectError::Fatal(msg))
            }
        }
        // A certificate the client does not trust will not become trusted by retrying.
        Ok(Err(e @ tokio_tungstenite::tungstenite::Error::Tls(_))) => {
            Err(ConnectError::Fatal(format!("TLS: {e}")))
        }
        Ok(Err(e)) if e.to_string().contains("certificate") => {
            Err(ConnectError::Fatal(format!("TLS: {e}")))
        }
        Ok(Err(e)) => Err(ConnectError::Retry(e.to_string())),
    }
}

enum Input {
    Bytes(Vec<u8>),
    Resize,
    Detach,
    Eof,
}

/// How an attach ended.
enum End {
    Exit(i32),
    Detached,
    /// Connection lost: resume from here.
    Lost(ResumeState, String),
    /// The agent forgot us: open a new client.
    Forgotten(String),
    Fatal(String),
}

async fn session(
    mut term: TerminalClient<Ws>,
    input: &mut mpsc::Receiver<Input>,
    out: &mut std::io::Stdout,
) -> End {
    loop {
        tokio::select! {
            ev = term.next_event() => match ev {
                Ok(Event::Output { data, .. }) => {
                    let _ = out.write_all(&data);
                    let _ = out.flush();
                }
                Ok(Event::Snapshot(s)) => {
                    // It starts with a terminal reset, then history, screen, cursor and modes.
                    let _ = out.write_all(&s.data);
                    let _ = out.flush();
                }
                // The pane's size is the driver's; an observer's terminal shows it as it fits.
                Ok(Event::Size(_)) => {}
                Ok(Event::Exit { code, .. }) => return End::Exit(code),
                Ok(Event::Pong(_)) => {}
                Ok(Event::Closed { code, reason }) => return closed(&term, code, reason),
                Err(ClientError::Closed { code, reason }) => return closed(&term, code, reason),
                Err(e) => return End::Lost(term.resume_state(), e.to_string()),
            },
            i = input.recv() => match i {
                Some(Input::Bytes(b)) => {
                    if let Err(e) = term.send_input(&b).await {
                        return End::Lost(term.resume_state(), e.to_string());
                    }
                }
                Some(Input::Resize) => {
                    if let Err(e) = term.resize(terminal_size()).await {
                        return End::Lost(term.resume_state(), e.to_string());
                    }
                }
                Some(Input::Detach) | Some(Input::Eof) | None => {
                    let _ = term.close().await;
                    return End::Detached;
                }
            },
        }
    }
}

/// Retries in a row after which `attach` gives up.
const MAX_FAILURES: u32 = 30;

/// The policy's wait before retry `attempt`, jittered by the clock's nanoseconds (no two
/// clients cut by one restart share them).
fn wait(attempt: u32) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    backoff(attempt, f64::from(nanos) / 1e9)
}

fn closed(term: &TerminalClient<Ws>, code: Option<CloseCode>, reason: String) -> End {
    let words = if reason.is_empty() {
        code.map(|c| c.reason().to_owned())
            .unwrap_or_else(|| "connection closed".into())
    } else {
        reason
    };
    match close_action(code.map(|c| c.0), false) {
        // An EXIT frame ends the session before its close; a 1000 alone is the same end.
        _ if code == Some(CloseCode::NORMAL) => End::Exit(0),
        // A new sign-in is fetched (or refreshed) before every reconnect.
        CloseAction::Reconnect | CloseAction::SignIn => End::Lost(term.resume_state(), words),
        CloseAction::Reopen => End::Forgotten(words),
        CloseAction::End => End::Fatal(match code {
            Some(c) => format!("{words} ({})", c.0),
            None => words,
        }),
    }
}

fn spawn_input(tx: mpsc::Sender<Input>, observe: bool) {
    // Keystrokes. Ctrl-] then `q` detaches locally, like telnet; everything else goes through.
    let keys = tx.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 4096];
        let mut escape = false;
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = keys.send(Input::Eof).await;
                    return;
                }
                Ok(n) => n,
            };
            let mut data = buf[..n].to_vec();
            if escape && data.first() == Some(&b'q') {
                let _ = keys.send(Input::Detach).await;
                return;
            }
            escape = data.last() == Some(&0x1d);
            if escape {
                data.pop();
            }
            if observe {
                // Observers may not type; only the detach sequence means anything.
                continue;
            }
            if !data.is_empty() && keys.send(Input::Bytes(data)).await.is_err() {
                return;
            }
        }
    });
    if !observe {
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if tx.send(Input::Resize).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// What `kubectl tether attach` was asked.
#[derive(Debug)]
pub struct AttachOptions {
    pub gateway: String,
    pub namespace: String,
    pub name: String,
    pub observe: bool,
    pub credentials: Credentials,
    /// Trust only these roots for a `wss://` gateway (else the public web roots).
    pub tls: Option<rustls::ClientConfig>,
}

/// Attaches until the shell exits (its status), the user detaches (0), a signal (128 + n) or
/// an error that reconnecting cannot mend.
pub async fn run(opts: AttachOptions) -> anyhow::Result<i32> {
    let (url, origin) = endpoint(&opts.gateway, &opts.namespace, &opts.name, opts.observe)?;
    let tls = opts.tls.map(|c| Connector::Rustls(Arc::new(c)));
    // Signals end the attach through the same path as everything else, so raw mode is left by
    // the guard.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::select! {
        r = attach(url, origin, &opts.credentials, &opts.gateway, opts.observe, tls) => r,
        _ = term.recv() => Ok(143),
        _ = hup.recv() => Ok(129),
    }
}

async fn attach(
    url: String,
    origin: String,
    credentials: &Credentials,
    gateway: &str,
    observe: bool,
    tls: Option<Connector>,
) -> anyhow::Result<i32> {
    let (tx, mut input) = mpsc::channel(64);
    // Fail before raw mode when there is no token or the first connection is refused, so
    // errors print cleanly.
    let token = credentials.token().await?;
    let first = match connect(&url, &origin, &token, tls.as_ref()).await {
        Ok(ws) => ws,
        Err(ConnectError::Fatal(m)) if m.starts_with("401") && credentials.is_sign_in() => {
            bail!(
                "cannot attach: {m}; {}",
                crate::signin::not_signed_in(gateway).replacen("not signed in", "sign in again", 1)
            )
        }
        Err(ConnectError::Fatal(m)) | Err(ConnectError::Retry(m)) => bail!("cannot attach: {m}"),
    };
    let _raw = RawMode::enter()?;
    spawn_input(tx, observe);
    let mut out = std::io::stdout();
    let mut state: Option<ResumeState> = None;
    let mut ws = Some(first);
    let mut failures = 0u32;
    loop {
        let socket = match ws.take() {
            Some(s) => s,
            // The cached sign-in may have been refreshed since (or need to be now).
            None => match connect(
                &url,
                &origin,
                &credentials
                    .token()
                    .await
                    .context("cannot reconnect without a token")?,
                tls.as_ref(),
            )
            .await
            {
                Ok(s) => s,
                Err(ConnectError::Fatal(m)) => bail!("cannot reconnect: {m}"),
                Err(ConnectError::Retry(m)) => {
                    failures += 1;
                    if failures > MAX_FAILURES {
                        bail!("giving up reconnecting: {m}");
                    }
                    eprint!("\r\n[tether] reconnecting ({m})\r\n");
                    tokio::time::sleep(wait(failures - 1)).await;
                    continue;
                }
            },
        };
        let size = terminal_size();
        let started = match state {
            Some(s) => TerminalClient::resume(socket, s, size).await,
            None => TerminalClient::open(socket, size).await,
        };
        let term = match started {
            Ok((t, _)) => t,
            Err(ClientError::Closed { code, .. })
                if close_action(code.map(|c| c.0), false) == CloseAction::Reopen =>
            {
                state = None;
                continue;
            }
            Err(ClientError::Closed {
                code: Some(c),
                reason,
            }) if close_action(Some(c.0), false) == CloseAction::End => {
                bail!("{reason} ({})", c.0)
            }
            Err(e) => {
                failures += 1;
                if failures > MAX_FAILURES {
                    bail!("giving up reconnecting: {e}");
                }
                tokio::time::sleep(wait(failures - 1)).await;
                continue;
            }
        };
        failures = 0;
        match session(term, &mut input, &mut out).await {
            End::Exit(code) => return Ok(code),
            End::Detached => return Ok(0),
            End::Lost(s, why) => {
                eprint!("\r\n[tether] connection lost ({why}); resuming\r\n");
                state = Some(s);
            }
            End::Forgotten(why) => {
                eprint!("\r\n[tether] {why}; opening a new view\r\n");
                state = None;
            }
            End::Fatal(why) => bail!("{why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_and_origin_follow_the_gateway_url() {
        let (url, origin) = endpoint("https://t.example.com/", "ns", "dev", true).unwrap();
        assert_eq!(url, "wss://t.example.com/ws/ns/dev?mode=observe");
        assert_eq!(origin, "https://t.example.com");
        let (url, origin) = endpoint("http://127.0.0.1:8443", "a", "b", false).unwrap();
        assert_eq!(url, "ws://127.0.0.1:8443/ws/a/b?mode=attach");
        assert_eq!(origin, "http://127.0.0.1:8443");
        assert!(endpoint("ftp://x", "a", "b", false).is_err());
    }
}
