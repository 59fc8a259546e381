//! The whole of Tether on one machine: the chart's CRDs and RBAC applied to a control plane, and
//! the operator, the gateway and the local node running as processes under the identities the
//! chart gives them (service-account tokens bound to the chart's roles, a node certificate).
//! `cargo dev up` and the end-to-end tests both stand on it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{ControlPlane, binaries, free_port, process};

/// The namespace the chart installs into.
pub const SYSTEM_NAMESPACE: &str = "tether-system";
/// The local node's name.
pub const NODE_NAME: &str = "tether-local";

/// A person who can log in to the local gateway with a development token.
#[derive(Debug, Clone)]
pub struct DevUser {
    /// User name RBAC sees.
    pub user: String,
    /// Group RBAC sees.
    pub group: String,
    /// The token to paste into the page (or `TETHER_TOKEN` for the CLI).
    pub token: String,
}

/// Options of [`Stack::start`].
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Directory for keys, kubeconfigs, logs and the local node's pods.
    pub dir: PathBuf,
    /// Port of the gateway on 127.0.0.1; 0 picks a free one.
    pub gateway_port: u16,
    /// Extra flags for the operator (for example shorter default timeouts in tests).
    pub operator_args: Vec<String>,
}

/// Operator, gateway and local node processes. Dropping it stops them.
#[derive(Debug)]
pub struct Stack {
    dir: PathBuf,
    bin_dir: PathBuf,
    admin_kubeconfig: PathBuf,
    operator_kubeconfig: PathBuf,
    gateway_kubeconfig: PathBuf,
    gateway_port: u16,
    operator_args: Vec<String>,
    operator: Option<Child>,
    gateway: Option<Child>,
    node: Option<Child>,
    /// Restarts so far and when the next may come, per component, as a kubelet's back-off.
    backoff: [Restarts; 2],
    /// Development users: `alice` and `carol` (group tether-devs), `bob` (group pair-watchers).
    pub users: Vec<DevUser>,
}

impl Stack {
    /// Builds the binaries if needed, applies the chart's CRDs and RBAC, and starts the three
    /// processes; returns once the gateway answers `/readyz`.
    pub async fn start(cp: &ControlPlane, opts: StackOptions) -> anyhow::Result<Stack> {
        std::fs::create_dir_all(opts.dir.join("logs"))?;
        let bin_dir = build_binaries()?;
        apply_chart_rbac(cp).await?;
        let (signing, public) = tether_protocol::ticket::generate_keypair();
        write_private(&opts.dir.join("ticket-signing.pem"), &signing)?;
        write_private(&opts.dir.join("ticket-public.pem"), &public)?;
        let users = dev_users();
        let tokens: String = users
            .iter()
            .map(|u| format!("{},{},{}\n", u.token, u.user, u.group))
            .collect();
        write_private(&opts.dir.join("dev-tokens"), &tokens)?;
        let operator_kubeconfig = cp
            .service_account_kubeconfig(SYSTEM_NAMESPACE, "tether-operator")
            .await;
        let gateway_kubeconfig = cp
            .service_account_kubeconfig(SYSTEM_NAMESPACE, "tether-gateway")
            .await;
        let node_kubeconfig =
            cp.user_kubeconfig(&format!("system:node:{NODE_NAME}"), &["system:nodes"]);
        let gateway_port = if opts.gateway_port == 0 {
            free_port()?
        } else {
            opts.gateway_port
        };
        let mut stack = Stack {
            dir: opts.dir.clone(),
            bin_dir,
            admin_kubeconfig: cp.admin_kubeconfig().to_path_buf(),
            operator_kubeconfig,
            gateway_kubeconfig,
            gateway_port,
            operator_args: opts.operator_args,
            operator: None,
            gateway: None,
            node: None,
            backoff: Default::default(),
            users,
        };
        let dev = std::env::current_exe()?;
        let node_dir = opts.dir.join("node");
        stack.node = Some(stack.spawn(
            "local-node",
            &dev_binary(&dev)?,
            &[
                "local-node".into(),
                format!("--kubeconfig={}", node_kubeconfig.display()),
                format!("--name={NODE_NAME}"),
                format!("--dir={}", node_dir.display()),
                format!("--bin-dir={}", stack.bin_dir.display()),
            ],
            None,
        )?);
        stack.start_operator()?;
        stack.start_gateway()?;
        stack.wait_gateway_ready().await?;
        Ok(stack)
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.gateway_port)
    }

    /// The gateway's port on 127.0.0.1.
    pub fn gateway_port(&self) -> u16 {
        self.gateway_port
    }

    /// The directory of logs (`logs/<component>.log`) and keys.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig of the control plane under this stack.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// Kills the operator (SIGKILL, as a crash) and starts a new one.
    pub fn restart_operator(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.operator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.start_operator()
    }

    /// Kills the operator with SIGKILL and leaves it dead, as a crash; [`Stack::revive`] brings
    /// it back.
    pub fn crash_operator(&mut self) {
        if let Some(child) = self.operator.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the gateway gracefully (SIGTERM: it tells clients to reconnect) and starts a new
    /// one on the same port.
    pub async fn restart_gateway(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.gateway.take() {
            process::stop_all(vec![child]);
        }
        self.start_gateway()?;
        self.wait_gateway_ready().await
    }

    /// Restarts the operator or the gateway when it has exited, as a Deployment's kubelet
    /// would: at once the first time, then after a back-off that doubles up to 5 minutes and
    /// starts again once a process has run for 10 minutes. Call it every second or so; it
    /// returns what it did, for the console.
    pub fn revive(&mut self) -> Vec<String> {
        let mut done = Vec::new();
        for (index, name) in ["operator", "gateway"].into_iter().enumerate() {
            let child = if index == 0 {
                &mut self.operator
            } else {
                &mut self.gateway
            };
            let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) else {
                continue;
            };
            let restarts = &mut self.backoff[index];
            let now = Instant::now();
            let Some(delay) = restarts.due(now) else {
                continue;
            };
            *child = None;
            let started = if index == 0 {
                self.start_operator()
            } else {
                self.start_gateway()
            };
            done.push(match started {
                Ok(()) => format!(
                    "the {name} exited ({status}); restarted it (restart {}, after {}s; log {})",
                    self.backoff[index].count,
                    delay.as_secs(),
                    self.dir.join("logs").join(format!("{name}.log")).display()
                ),
                Err(e) => format!("the {name} exited ({status}) and could not be restarted: {e:#}"),
            });
        }
        done
    }

    fn start_operator(&mut self) -> anyhow::Result<()> {
        let mut args = vec![
            "--metrics-addr=127.0.0.1:0".to_string(),
            format!(
                "--ticket-public-key-file={}",
                self.dir.join("ticket-public.pem").display()
            ),
            "--session-image=ghcr.io/tether-dev/tether:dev".to_string(),
            format!("--lease-namespace={SYSTEM_NAMESPACE}"),
            "--lease-duration-seconds=4".to_string(),
            "--lease-grace-seconds=2".to_string(),
        ];
        args.extend(self.operator_args.iter().cloned());
        let program = self.bin_dir.join("tether-operator");
        let kubeconfig = self.operator_kubeconfig.clone();
        self.operator = Some(self.spawn("operator", &program, &args, Some(&kubeconfig))?);
        Ok(())
    }

    fn start_gateway(&mut self) -> anyhow::Result<()> {
        let port = self.gateway_port;
        let args = vec![
            format!("--listen=127.0.0.1:{port}"),
            // Metrics and probes have a listener of their own; any free loopback port here.
            "--admin-listen=127.0.0.1:0".to_string(),
            format!(
                "--ticket-signing-key-file={}",
                self.dir.join("ticket-signing.pem").display()
            ),
            format!("--dev-token-file={}", self.dir.join("dev-tokens").display()),
            format!("--allowed-origin=http://127.0.0.1:{port}"),
            format!("--allowed-origin=http://localhost:{port}"),
            "--insecure-cookies".to_string(),
            // One gateway process: sign-ins in its memory (the chart keeps them in Secrets).
            "--session-store=memory".to_string(),
            format!(
                "--audit-log={}",
                self.dir.join("logs/audit.jsonl").display()
            ),
            "--drain-timeout=3s".to_string(),
        ];
        let program = self.bin_dir.join("tether-gateway");
        let kubeconfig = self.gateway_kubeconfig.clone();
        self.gateway = Some(self.spawn("gateway", &program, &args, Some(&kubeconfig))?);
        Ok(())
    }

    async fn wait_gateway_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(child) = self.gateway.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "the gateway exited ({status}); see {}",
                    self.dir.join("logs/gateway.log").display()
                );
            }
            if crate::node::probe_http([127, 0, 0, 1].into(), self.gateway_port, "/readyz").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "the gateway was not ready after 60s; see {}",
            self.dir.join("logs/gateway.log").display()
        )
    }

    fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        kubeconfig: Option<&Path>,
    ) -> anyhow::Result<Child> {
        let log_path = self.dir.join("logs").join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_LOG", "info")
            .env("POD_NAMESPACE", SYSTEM_NAMESPACE);
        if let Some(k) = kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        process::die_with_parent(&mut cmd);
        cmd.spawn()
            .with_context(|| format!("starting {}", program.display()))
    }

    /// Stops every process.
    pub fn stop(&mut self) {
        let children: Vec<Child> = [self.gateway.take(), self.operator.take(), self.node.take()]
            .into_iter()
            .flatten()
            .collect();
        process::stop_all(children);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A component's restarts, for [`Stack::revive`]'s back-off.
#[derive(Debug, Default)]
struct Restarts {
    count: u32,
    /// When the last restart happened.
    last: Option<Instant>,
    /// When an exit was first seen, waiting for its back-off.
    exited: Option<Instant>,
}

impl Restarts {
    const FIRST: Duration = Duration::from_secs(10);
    const MAX: Duration = Duration::from_secs(300);
    const RESET_AFTER: Duration = Duration::from_secs(600);

    /// `Some(waited)` when a restart may happen now (and counts it), `None` while backing off.
    fn due(&mut self, now: Instant) -> Option<Duration> {
        let exited = *self.exited.get_or_insert(now);
        if self
            .last
            .is_some_and(|last| exited.duration_since(last) >= Self::RESET_AFTER)
        {
            self.count = 0;
        }
        let delay = match self.count {
            0 => Duration::ZERO,
            n => Self::FIRST
                .saturating_mul(1 << (n - 1).min(5))
                .min(Self::MAX),
        };
        if now.duration_since(exited) < delay {
            return None;
        }
        self.count += 1;
        self.last = Some(now);
        self.exited = None;
        Some(delay)
    }
}

/// The development users with fresh random tokens: `alice` (group tether-devs, who may attach in
/// `examples/`) and `bob` (group pair-watchers, who may only observe).
pub fn dev_users() -> Vec<DevUser> {
    vec![
        DevUser {
            user: "alice".into(),
            group: "tether-devs".into(),
            token: random_token(),
        },
        DevUser {
            user: "bob".into(),
            group: "pair-watchers".into(),
            token: random_token(),
        },
        // alice's neighbour: the same group, so RBAC alone would give her alice's sessions.
        DevUser {
            user: "carol".into(),
            group: "tether-devs".into(),
            token: random_token(),
        },
    ]
}

/// `cargo dev` runs as `tether-dev`; tests run from their own binary and find it next to the
/// other binaries of the workspace.
pub fn dev_binary(current: &Path) -> anyhow::Result<PathBuf> {
    if current.file_name().is_some_and(|n| n == "tether-dev") {
        return Ok(current.to_path_buf());
    }
    Ok(target_dir().join("tether-dev"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| binaries::repo_root().join("target"))
        .join("debug")
}

/// Builds the operator, gateway, agent and `tether-dev` binaries (a no-op when fresh).
pub fn build_binaries() -> anyhow::Result<PathBuf> {
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(binaries::repo_root())
        .args([
            "build",
            "--quiet",
            "-p",
            "tether-operator",
            "--bin",
            "tether-operator",
            "-p",
            "tether-gateway",
            "--bin",
            "tether-gateway",
            "-p",
            "tether-session-agent",
            "--bin",
            "tether-session-agent",
            "-p",
            "tether-e2e",
            "--bin",
            "tether-dev",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the Tether binaries failed ({status})");
    }
    Ok(target_dir())
}

/// Applies what the chart installs that is not a workload: CRDs, namespaces, service accounts,
/// roles and bindings, rendered by helm from `charts/tether`.
async fn apply_chart_rbac(cp: &ControlPlane) -> anyhow::Result<()> {
    apply_chart_kinds(
        cp,
        &[
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
        ],
    )
    .await
}

/// Applies the objects of these kinds from the chart's default rendering (in
/// [`SYSTEM_NAMESPACE`], which it creates), and the CRDs.
pub async fn apply_chart_kinds(cp: &ControlPlane, keep: &[&str]) -> anyhow::Result<()> {
    let bins = binaries::ensure()?;
    let out = binaries::Binaries::isolate_helm(&mut Command::new(&bins.helm))
        .args(["template", "tether"])
        .arg(binaries::repo_root().join("charts/tether"))
        .args(["--namespace", SYSTEM_NAMESPACE, "--include-crds"])
        .args(["--kube-version", binaries::KUBERNETES_VERSION])
        .output()
        .context("running helm template")?;
    if !out.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rendered = String::from_utf8(out.stdout)?;
    let mut docs =
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {SYSTEM_NAMESPACE}\n");
    for doc in rendered.split("\n---") {
        let kind = doc
            .lines()
            .find_map(|l| l.strip_prefix("kind: "))
            .unwrap_or_default()
            .trim();
        if keep.contains(&kind) {
            docs.push_str("---");
            docs.push_str(doc);
            docs.push('\n');
        }
    }
    kubectl_apply(cp.admin_kubeconfig(), &["-f", "-"], Some(&docs))?;
    crate::install_crds(&cp.admin_client().await).await?;
    Ok(())
}

/// `kubectl apply --server-side` with the admin kubeconfig.
pub fn kubectl_apply(
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let bins = binaries::ensure()?;
    let mut child = Command::new(&bins.kubectl)
        .args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=tether-dev",
        ])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("kubectl apply {} failed:\n{text}", args.join(" "));
    }
    Ok(text)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

fn random_token() -> String {
    use std::io::Read as _;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_like_a_kubelet_and_start_over_after_a_long_run() {
        let mut r = Restarts::default();
        let t0 = Instant::now();
        assert_eq!(
            r.due(t0),
            Some(Duration::ZERO),
            "the first exit restarts at once"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(r.due(t1), None, "the second waits");
        assert_eq!(r.due(t1 + Duration::from_secs(9)), None);
        assert_eq!(
            r.due(t1 + Duration::from_secs(10)),
            Some(Duration::from_secs(10))
        );
        let t2 = t1 + Duration::from_secs(11);
        assert_eq!(
            r.due(t2),
            None,
            "the back-off counts from when the exit was seen"
        );
        assert_eq!(r.due(t2 + Duration::from_secs(19)), None);
        assert_eq!(
            r.due(t2 + Duration::from_secs(20)),
            Some(Duration::from_secs(20))
        );
        for _ in 0..10 {
            r.count += 1;
        }
        let t3 = t2 + Duration::from_secs(21);
        assert_eq!(r.due(t3), None);
        assert_eq!(
            r.due(t3 + Restarts::MAX),
            Some(Restarts::MAX),
            "the back-off stops growing at 5 minutes"
        );
        let t4 = t3 + Restarts::MAX + Restarts::RESET_AFTER;
        assert_eq!(r.due(t4), Some(Duration::ZERO), "ten minutes up start over");
    }
}
