//! The loopback redirect of a native app (RFC 8252 §7.3): a listener on `127.0.0.1:<port>` that
//! takes the provider's redirect to `/callback` once, with the `state` this login sent. Any
//! other request is answered and ignored: a wrong or missing `state` gets 400 (it may be a
//! forged callback from another page), another path gets 404, and the wait goes on.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use openidconnect::url::Url;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The path of the redirect URI.
pub const CALLBACK_PATH: &str = "/callback";
/// How long the whole sign-in may take in the browser.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Largest request head read from the browser.
const MAX_REQUEST: usize = 16 * 1024;
/// Time for a connection to send its request line and headers.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound listener, accepting in the background until dropped.
#[derive(Debug)]
pub struct Loopback {
    addr: SocketAddr,
    requests: mpsc::Receiver<(String, TcpStream)>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The callback that carried the right `state`. Answer it once the code is exchanged, so the
/// browser tells the truth.
#[derive(Debug)]
pub struct Arrived {
    pub code: String,
    stream: TcpStream,
}

impl Arrived {
    pub async fn answer(mut self, outcome: Result<(), String>) {
        let (status, body) = match outcome {
            Ok(()) => (
                "200 OK",
                page(
                    "Signed in",
                    "kubectl tether is signed in. You can close this tab and go back to the terminal.",
                ),
            ),
            Err(why) => (
                "400 Bad Request",
                page(
                    "Sign-in failed",
                    &format!("kubectl tether could not sign in: {}", escape(&why)),
                ),
            ),
        };
        respond(&mut self.stream, status, &body).await;
    }
}

impl Loopback {
    /// Listens on `127.0.0.1:port` (`0`: a port the system picks).
    pub async fn bind(port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("listening on 127.0.0.1:{port} for the sign-in redirect"))?;
        let addr = listener.local_addr()?;
        let (tx, requests) = mpsc::channel(16);
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                // Each connection reads on its own: a browser's idle pre-connection must not
                // hold up the real callback.
                tokio::spawn(async move {
                    let mut stream = stream;
                    if let Ok(Some(target)) =
                        tokio::time::timeout(READ_TIMEOUT, read_target(&mut stream))
                            .await
                            .unwrap_or(Ok(None))
                    {
                        let _ = tx.send((target, stream)).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            requests,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>/callback`.
    pub fn redirect_uri(&self) -> String {
        format!("http://{}{CALLBACK_PATH}", self.addr)
    }

    /// Waits up to `timeout` for the callback carrying `state`. A callback with that state and
    /// an `error` ends the wait with that error (answered in the browser).
    pub async fn wait(&mut self, state: &str, timeout: Duration) -> anyhow::Result<Arrived> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (target, mut stream) =
                match tokio::time::timeout_at(deadline, self.requests.recv()).await {
                    Ok(Some(r)) => r,
                    Ok(None) => bail!("the sign-in listener stopped"),
                    Err(_) => bail!(
                        "no sign-in arrived within {}: the browser never came back to {}. \
                         Run `kubectl tether login` again",
                        human(timeout),
                        self.redirect_uri()
                    ),
                };
            let Ok(url) = Url::parse(&format!("http://127.0.0.1{target}")) else {
                respond(&mut stream, "400 Bad Request", &page("Bad request", "")).await;
                continue;
            };
            if url.path() != CALLBACK_PATH {
                respond(&mut stream, "404 Not Found", &page("Not found", "")).await;
                continue;
            }
            let param = |name: &str| {
                url.query_pairs()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.into_owned())
            };
            if !param("state").is_some_and(|s| constant_time_eq(s.as_bytes(), state.as_bytes())) {
                respond(
                    &mut stream,
                    "400 Bad Request",
                    &page(
                        "Sign-in refused",
                        "This callback does not belong to the sign-in kubectl tether started \
                         (its state does not match). It was ignored.",
                    ),
                )
                .await;
                continue;
            }
            if let Some(error) = param("error") {
                let why = match param("error_description") {
                    Some(d) => format!("{error}: {d}"),
                    None => error,
                };
                Arrived {
                    code: String::new(),
                    stream,
                }
                .answer(Err(why.clone()))
                .await;
                bail!("the provider refused the sign-in: {why}");
            }
            let Some(code) = param("code").filter(|c| !c.is_empty()) else {
                respond(
                    &mut stream,
                    "400 Bad Request",
                    &page("Sign-in refused", "The callback carries no code."),
                )
                .await;
                continue;
            };
            return Ok(Arrived { code, stream });
        }
    }
}

/// Reads a request head; its target when it is a GET.
async fn read_target(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            respond(stream, "431 Request Header Fields Too Large", "").await;
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut line = head.lines().next().unwrap_or("").split(' ');
    match (line.next(), line.next()) {
        (Some("GET"), Some(target)) if target.starts_with('/') => Ok(Some(target.to_owned())),
        _ => {
            respond(stream, "405 Method Not Allowed", "").await;
            Ok(None)
        }
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\n\
         Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn page(title: &str, text: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;margin:3em}}</style></head>\
         <body><h1>{title}</h1><p>{text}</p></body></html>"
    )
}

fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '&' => "&amp;".into(),
            '"' => "&quot;".into(),
            '\'' => "&#39;".into(),
            c => c.to_string(),
        })
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GET to the listener: status code and body.
    async fn get(addr: SocketAddr, target: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, out)
    }

    #[tokio::test]
    async fn only_the_callback_with_the_right_state_is_taken() {
        let mut lb = Loopback::bind(0).await.unwrap();
        assert_eq!(
            lb.redirect_uri(),
            format!("http://127.0.0.1:{}/callback", lb.addr().port())
        );
        let addr = lb.addr();
        let client = tokio::spawn(async move {
            // A browser's idle pre-connection holds nothing up.
            let _idle = TcpStream::connect(addr).await.unwrap();
            let wrong = get(addr, "/callback?code=stolen&state=not-the-state").await;
            let missing = get(addr, "/callback?code=stolen").await;
            let other = get(addr, "/favicon.ico").await;
            let right = get(addr, "/callback?code=the-code&state=s3cr3t").await;
            (wrong, missing, other, right)
        });
        let arrived = lb.wait("s3cr3t", Duration::from_secs(10)).await.unwrap();
        assert_eq!(arrived.code, "the-code");
        arrived.answer(Ok(())).await;
        let (wrong, missing, other, right) = client.await.unwrap();
        assert_eq!(wrong.0, 400, "{}", wrong.1);
        assert!(wrong.1.contains("does not match"), "{}", wrong.1);
        assert_eq!(missing.0, 400);
        assert_eq!(other.0, 404);
        assert_eq!(right.0, 200);
        assert!(right.1.contains("close this tab"), "{}", right.1);
    }

    #[tokio::test]
    async fn a_provider_error_with_the_right_state_ends_the_wait() {
        let mut lb = Loopback::bind(0).await.unwrap();
        let addr = lb.addr();
        let client = tokio::spawn(async move {
            get(
                addr,
                "/callback?state=s&error=access_denied&error_description=%3Cb%3Eno%3C%2Fb%3E",
            )
            .await
        });
        let err = lb.wait("s", Duration::from_secs(10)).await.unwrap_err();
        assert!(
            err.to_string().contains("access_denied: <b>no</b>"),
            "{err}"
        );
        let (status, body) = client.await.unwrap();
        assert_eq!(status, 400);
        // The provider's words are shown, not interpreted.
        assert!(body.contains("&lt;b&gt;no&lt;/b&gt;"), "{body}");
    }

    #[tokio::test]
    async fn no_callback_times_out_in_words() {
        let mut lb = Loopback::bind(0).await.unwrap();
        let err = lb
            .wait("s", Duration::from_millis(100))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no sign-in arrived within") && err.contains("/callback"),
            "{err}"
        );
        assert_eq!(human(LOGIN_TIMEOUT), "5 min");
    }
}
