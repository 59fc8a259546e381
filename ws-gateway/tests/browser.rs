//! A real browser: headless Chromium (Debian's `chromium`, driven by playwright-core from
//! `ws-gateway/web/test/browser.mjs`) opens the gateway's page, signs in with a development token,
//! opens a session, types a command and sees its output; a second page observes read-only; then
//! the gateway process is restarted mid-stream and the page resumes with no lost or repeated
//! output.
//!
//! Everything is real except the operator: a real control plane (RBAC decides through
//! SubjectAccessReview), the `tether-gateway` binary, and a `tether-session-agent` process with
//! tmux and bash, whose endpoint this test writes into the TerminalSession's status itself.
//!
//! Needs `chromium`, `tmux`, `node` and `npm` (`cargo dev test` installs them); runs `npm ci` and
//! `npm run build` in `ws-gateway/web` when `node_modules/` or `dist/` is missing.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tether_api::TerminalSession;

const SESSION: &str = "browser";
const USER: &str = "alice";
const GROUP: &str = "tether-browser-devs";
/// Lines printed while the gateway restarts.
const RESUME_LINES: u32 = 200;
/// The whole browser script, restart included, must finish within this.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);
const STEP: Duration = Duration::from_secs(30);

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("web")
}

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed ({status})");
}

/// Kills the agent's tmux server, which outlives the agent process.
struct TmuxServer(PathBuf);

impl Drop for TmuxServer {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.0)
            .arg("kill-server")
            .output();
    }
}

/// `npm ci` when the packages are missing, `npm run build` when the page is.
fn ensure_page() {
    let web = web_dir();
    if !web.join("node_modules/playwright-core").exists() {
        eprintln!("browser test: npm ci in {}", web.display());
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&web));
    }
    if !web.join("dist/index.html").exists() {
        eprintln!("browser test: npm run build in {}", web.display());
        run(Command::new("npm").args(["run", "build"]).current_dir(&web));
    }
}

/// A child process killed (and reaped) on drop.
struct Proc {
    child: Child,
    what: &'static str,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGTERM (the gateway tells clients to reconnect and drains), then waits for the exit.
    fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + STEP;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not exit within {STEP:?} of SIGTERM:\n{}",
            self.what,
            self.log_tail()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(what: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    Proc { child, what, log }
}

/// Status code of a plain `GET` on 127.0.0.1:`port`, 0 when nothing answers.
fn http_status(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool, on_timeout: impl FnOnce() -> String) {
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}:\n{}", on_timeout());
}

struct GatewayCmd {
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    kubeconfig: PathBuf,
    /// Where the browser sessions' Secrets go.
    namespace: String,
}

impl GatewayCmd {
    fn start(&self, generation: u32) -> Proc {
        let origin = format!("http://127.0.0.1:{}", self.port);
        let gw = spawn(
            "tether-gateway",
            Command::new(&self.bin)
                .arg(format!("--listen=127.0.0.1:{}", self.port))
                .arg("--admin-listen=127.0.0.1:0")
                .arg(format!(
                    "--dev-token-file={}",
                    self.dir.join("dev-tokens").display()
                ))
                .arg(format!(
                    "--ticket-signing-key-file={}",
                    self.dir.join("ticket-signing.pem").display()
                ))
                .arg(format!("--allowed-origin={origin}"))
                .arg("--insecure-cookies")
                // Sign-ins outlive a gateway restart: the same key, sessions in the API server.
                .arg(format!(
                    "--session-key-file={}",
                    self.dir.join("session-key").display()
                ))
                .arg(format!("--session-namespace={}", self.namespace))
                .arg("--handshake-rate=1000")
                .arg("--drain-timeout=3s")
                .env("KUBECONFIG", &self.kubeconfig)
                .env("RUST_LOG", "info"),
            self.dir.join(format!("gateway-{generation}.log")),
        );
        wait_until(
            "the gateway's /readyz",
            || http_status(self.port, "/readyz").0 == 200,
            || gw.log_tail(),
        );
        gw
    }
}

#[tokio::test]
async fn chromium_signs_in_types_a_command_observes_and_resumes_across_a_gateway_restart() {
    let started = Instant::now();
    let gateway_bin = PathBuf::from(env!("CARGO_BIN_EXE_tether-gateway"));
    ensure_page();
    // The gateway embeds web/dist at compile time: build (again) now that the page exists, and the
    // agent binary with it.
    let bin_dir = tether_e2e::stack::build_binaries().expect("building the Tether binaries");
    if !gateway_bin.exists() {
        eprintln!(
            "SKIPPED: the gateway binary {} does not exist yet",
            gateway_bin.display()
        );
        return;
    }
    let agent_bin = bin_dir.join("tether-session-agent");
    assert!(agent_bin.exists(), "{} was not built", agent_bin.display());
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "headless Chromium is needed at {chromium}: apt-get install -y --no-install-recommends chromium"
    );

    // --- the control plane: a namespace, RBAC for the dev user's group, the session ----------
    let cp = tether_e2e::ControlPlane::shared().await;
    cp.install_crds().await;
    let admin = cp.admin_client().await;
    let ns = cp.namespace("browser").await;
    let n = ns.name().to_owned();
    let apply = PatchParams::apply("tether-browser-test").force();
    Api::<Role>::namespaced(admin.clone(), &n)
        .patch(
            "terminal-user",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "terminal-user"},
                "rules": [{"apiGroups": ["tether.dev"], "resources": ["terminalsessions"],
                           "verbs": ["get", "list", "watch", "attach", "observe"]}],
            })),
        )
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &n)
        .patch(
            "terminal-user",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "terminal-user"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "terminal-user"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": GROUP}],
            })),
        )
        .await
        .unwrap();
    let sessions = Api::<TerminalSession>::namespaced(admin.clone(), &n);
    let created = sessions
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tether.dev/v1alpha1", "kind": "TerminalSession",
                "metadata": {"name": SESSION}, "spec": {},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();

    // --- keys, token, the session agent -------------------------------------------------------
    let dir = tempfile::Builder::new()
        .prefix("tether-browser")
        .tempdir()
        .unwrap();
    let d = dir.path().to_path_buf();
    let (signing, public) = tether_protocol::ticket::generate_keypair();
    std::fs::write(d.join("ticket-signing.pem"), signing).unwrap();
    std::fs::write(d.join("ticket-public.pem"), public).unwrap();
    let token: String = {
        use rand::Rng as _;
        let mut rng = rand::rng();
        (0..32)
            .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
            .collect()
    };
    std::fs::write(d.join("dev-tokens"), format!("{token},{USER},{GROUP}\n")).unwrap();
    std::fs::write(d.join("session-key"), rand::random::<[u8; 32]>()).unwrap();

    let agent_port = tether_e2e::free_port().unwrap();
    let agent = spawn(
        "tether-session-agent",
        Command::new(&agent_bin)
            .arg(format!("--listen=127.0.0.1:{agent_port}"))
            .arg(format!("--session={n}/{SESSION}"))
            .arg(format!("--session-uid={uid}"))
            .arg(format!(
                "--ticket-public-key-file={}",
                d.join("ticket-public.pem").display()
            ))
            .arg(format!("--state-dir={}", d.join("agent-state").display()))
            .arg(format!(
                "--termination-message-path={}",
                d.join("termination-log").display()
            ))
            .args([
                "--",
                "env",
                "PS1=$ ",
                "HISTFILE=/dev/null",
                "TERM=xterm-256color",
                "bash",
                "--noprofile",
                "--norc",
            ]),
        d.join("agent.log"),
    );
    let _tmux = TmuxServer(d.join("agent-state").join("tmux.sock"));
    wait_until(
        "the agent's /readyz",
        || http_status(agent_port, "/readyz").0 == 200,
        || agent.log_tail(),
    );

    // What the operator would write once the pod is up.
    sessions
        .patch_status(
            SESSION,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Ready", "endpoint": format!("127.0.0.1:{agent_port}"), "message": "agent ready",
                "conditions": [{"type": "Ready", "status": "True", "reason": "AgentReady", "message": "",
                                "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            }})),
        )
        .await
        .unwrap();

    // --- the gateway, the browser script ------------------------------------------------------
    let kubeconfig = cp.admin_kubeconfig().to_path_buf();
    let script_dir = d.clone();
    let session = format!("{n}/{SESSION}");
    let outcome = tokio::task::spawn_blocking(move || {
        let port = tether_e2e::free_port().unwrap();
        let gwc = GatewayCmd {
            bin: gateway_bin,
            port,
            dir: script_dir.clone(),
            kubeconfig,
            namespace: n.clone(),
        };
        let mut gateway = Some(gwc.start(0));
        let (_, page) = http_status(port, "/");
        assert!(
            page.contains("/assets/app.js"),
            "the gateway does not serve the built page (was web/dist embedded?):\n{page}"
        );

        let mut node = Command::new("node")
            .arg("test/browser.mjs")
            .current_dir(web_dir())
            .env("TETHER_URL", format!("http://127.0.0.1:{port}"))
            .env("TETHER_TOKEN", &token)
            .env("TETHER_SESSION", &session)
            .env("TETHER_OBSERVE", "1")
            .env("TETHER_RESUME_LINES", RESUME_LINES.to_string())
            .env("TETHER_RESUME_DELAY", "0.02")
            .env("TETHER_RESTART_VIA_STDIO", "1")
            // Signed out under a live terminal: 4440, sign in again, the same client resumes.
            .env("TETHER_SIGNIN_AGAIN_LINES", "60")
            .env("TETHER_SCREENSHOT_DIR", script_dir.join("screenshots"))
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("running node (is Node.js installed?)");
        let mut stdin = node.stdin.take().unwrap();
        let stdout = node.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + SCRIPT_TIMEOUT;
        let mut restarts = 0;
        let mut transcript = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok(line) => {
                    println!("{line}");
                    if line.trim_end() == "TETHER-BROWSER restart-gateway" {
                        let t = Instant::now();
                        gateway.take().unwrap().terminate();
                        restarts += 1;
                        gateway = Some(gwc.start(restarts));
                        println!("browser test: gateway restarted in {:?}", t.elapsed());
                        let _ = writeln!(stdin, "restarted");
                        let _ = stdin.flush();
                    }
                    transcript.push(line);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(_)) = node.try_wait() {
                        // Drain what is left.
                        while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                            println!("{line}");
                            transcript.push(line);
                        }
                        break;
                    }
                    if Instant::now() >= deadline {
                        let _ = node.kill();
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = node.wait().unwrap();
        let gw_log = gateway.as_ref().map(|g| g.log_tail()).unwrap_or_default();
        drop(gateway);
        (status, restarts, transcript, gw_log)
    })
    .await
    .unwrap();

    let (status, restarts, lines, gw_log) = outcome;
    let elapsed = started.elapsed();
    if !status.success() {
        panic!(
            "the browser script failed ({status}); screenshots and transcripts in {}\n--- gateway log ---\n{gw_log}\n--- agent log ---\n{}",
            dir.keep().join("screenshots").display(),
            agent.log_tail(),
        );
    }
    assert_eq!(restarts, 1, "the gateway was restarted once mid-stream");
    assert!(
        lines.iter().any(|l| l.starts_with("TETHER-BROWSER ok")),
        "the script did not report ok:\n{}",
        lines.join("\n")
    );
    println!("browser test passed in {elapsed:?}");
    drop(agent);
}
