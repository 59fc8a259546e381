//! `cargo dev`: the two commands README.md starts with.
//!
//! - `cargo dev up` builds what is missing, starts a local control plane, installs the chart's
//!   CRDs and RBAC, runs the operator, the gateway and the local node under their chart
//!   identities, applies `examples/`, prints the URL and development tokens, and runs until
//!   Ctrl-C.
//! - `cargo dev test` installs what the tests need, then runs every check CI runs: formatting,
//!   clippy, and the whole test suite against the real control plane.

use std::{
    path::Path,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use tether_e2e::{
    ControlPlane, Options, binaries,
    cluster::{Cluster, ClusterOptions},
    node::{self, NodeOptions},
    realnode,
    stack::{self, Stack, StackOptions},
};

/// Which node `cargo dev up` runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum NodeKind {
    /// A real kubelet with containerd and runc.
    Real,
    /// Pods as processes on this machine (no root needed, no isolation).
    Process,
}

#[derive(Parser, Debug)]
#[command(name = "cargo dev", about = "Run Tether locally and test it", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a local cluster with Tether installed; stop with Ctrl-C.
    Up {
        /// Port of the local kube-apiserver (0 picks a free one).
        #[arg(long, default_value_t = 6443)]
        api_port: u16,
        /// Port of the gateway, where the page is served. With `--node=real` it is the gateway
        /// Service's node port on the node's bridge address (30000-32767); with
        /// `--node=process`, a port on 127.0.0.1 (0 picks a free one).
        #[arg(long)]
        gateway_port: Option<u16>,
        /// `real`: containerd, runc, kubelet, kube-proxy and kube-router on this machine, the
        /// images built from the Dockerfile, the chart installed with helm (needs root on
        /// Linux). `process`: the stand-in that runs each session pod as a plain process on
        /// this machine, with no container, image, cgroup, user or network isolation.
        #[arg(long, value_enum, default_value_t = NodeKind::Real)]
        node: NodeKind,
    },
    /// Remove what a killed real node left on this machine (containers, mounts, network
    /// namespaces, the bridge, iptables chains, ipsets, cgroups) and list anything that remains.
    CleanNode,
    /// Wait for standard input to end, then remove the real node (started by the harness).
    #[command(hide = true)]
    ReapNode,
    /// Install what the tests need, then run formatting, lint and the whole test suite.
    Test {
        /// Skip `cargo fmt --check` and clippy (for a quick local loop; CI runs them).
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (for example a test name filter after `--`).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Build (or find in the cache) the control-plane binaries and print where they are.
    BuildControlPlane {
        /// Also build the real node's binaries (kubelet, kube-proxy, containerd, ctr,
        /// containerd-shim-runc-v2, kube-router, pause) and print their directory on a second
        /// line.
        #[arg(long)]
        node: bool,
    },
    /// Run the local node (used by `up` and the tests; runs until killed).
    #[command(hide = true)]
    LocalNode {
        /// Kubeconfig of the node identity (system:node:NAME).
        #[arg(long)]
        kubeconfig: std::path::PathBuf,
        /// The Node's name.
        #[arg(long)]
        name: String,
        /// Directory for pods' volumes and logs.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Directory searched first for container commands.
        #[arg(long)]
        bin_dir: Vec<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up {
            api_port,
            gateway_port,
            node: NodeKind::Process,
        } => up(api_port, gateway_port.unwrap_or(8443)),
        Cmd::Up {
            api_port,
            gateway_port,
            node: NodeKind::Real,
        } => up_real(api_port, gateway_port.unwrap_or(30443)),
        Cmd::CleanNode => clean_node(),
        Cmd::ReapNode => reap_node(),
        Cmd::LocalNode {
            kubeconfig,
            name,
            dir,
            bin_dir,
        } => local_node(kubeconfig, name, dir, bin_dir),
        Cmd::Test {
            no_lint,
            cargo_test_args,
        } => test(no_lint, &cargo_test_args),
        Cmd::BuildControlPlane { node } => build_control_plane(node),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cargo dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn build_control_plane(node: bool) -> anyhow::Result<()> {
    let bins = binaries::ensure()?;
    println!(
        "{}",
        bins.kube_apiserver
            .parent()
            .expect("binaries live in a directory")
            .display()
    );
    if node {
        println!("{}", binaries::ensure_node()?.dir().display());
    }
    Ok(())
}

fn up(api_port: u16, gateway_port: u16) -> anyhow::Result<()> {
    let root = binaries::repo_root();
    let state = root.join(".tether");
    let started = std::time::Instant::now();
    ensure_debian_packages(&["tmux"])?;
    build_page(&root)?;
    step("building the control plane (cached after the first run)");
    let bins = binaries::ensure()?;
    step("building Tether");
    stack::build_binaries()?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        step("starting the control plane");
        let cp = ControlPlane::start(Options {
            dir: state.join("controlplane"),
            api_port,
            bind: None,
        })
        .await
        .context("starting the local control plane")?;
        let kubeconfig = state.join("kubeconfig");
        std::fs::copy(cp.admin_kubeconfig(), &kubeconfig)
            .with_context(|| format!("writing {}", kubeconfig.display()))?;
        step("starting the operator, the gateway and the local node");
        let mut stack = Stack::start(
            &cp,
            StackOptions {
                dir: state.join("stack"),
                gateway_port,
                operator_args: vec![],
            },
        )
        .await?;
        step("applying examples/ (kustomization: namespace tether-demo)");
        let examples = root.join("examples");
        stack::kubectl_apply(
            cp.admin_kubeconfig(),
            &["-k", &examples.display().to_string()],
            None,
        )?;
        println!();
        // From when `cargo dev up` was typed: cargo compiled this program before it started.
        let took = since_cargo_started().unwrap_or_else(|| started.elapsed());
        println!(
            "Tether is up in {:.0}s. Open {}",
            took.as_secs_f64(),
            stack.url()
        );
        print_access(&stack.users, &kubeconfig, &bins);
        println!(
            "Logs: {} and {}.",
            cp.dir().join("logs").display(),
            stack.dir().join("logs").display()
        );
        println!("Press Ctrl-C to stop everything.");
        // The operator and the gateway are processes here, not Deployments: restart them when
        // they exit (a leader that lost its lease exits on purpose), as a kubelet would.
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                done = &mut ctrl_c => {
                    done.context("waiting for Ctrl-C")?;
                    break;
                }
                _ = every.tick() => for line in stack.revive() {
                    println!("{line}");
                },
            }
        }
        println!("\nStopping Tether and the control plane.");
        stack.stop();
        cp.stop();
        Ok(())
    })
}

/// The real node: the images, the chart, the examples; prints the URL and runs until Ctrl-C.
fn up_real(api_port: u16, node_port: u16) -> anyhow::Result<()> {
    if !(30000..=32767).contains(&node_port) {
        bail!("--gateway-port {node_port} is not a node port (30000-32767) of the real node");
    }
    // Before anything slow: a machine that cannot run the node is told so at once.
    realnode::preflight()?;
    let root = binaries::repo_root();
    let state = root.join(".tether");
    let started = std::time::Instant::now();
    let mut packages = vec!["tmux"];
    packages.extend_from_slice(realnode::DEBIAN_PACKAGES);
    ensure_debian_packages(&packages)?;
    build_page(&root)?;
    step("building the control plane (cached after the first run)");
    let bins = binaries::ensure()?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let cluster = Cluster::start(ClusterOptions {
            dir: state.join("cluster"),
            api_port,
            gateway_node_port: node_port,
            operator_args: vec![],
        })
        .await?;
        let kubeconfig = state.join("kubeconfig");
        std::fs::copy(cluster.cp.admin_kubeconfig(), &kubeconfig)
            .with_context(|| format!("writing {}", kubeconfig.display()))?;
        step("applying examples/ (kustomization: namespace tether-demo)");
        let examples = root.join("examples");
        stack::kubectl_apply(
            cluster.cp.admin_kubeconfig(),
            &["-k", &examples.display().to_string()],
            None,
        )?;
        cluster.stack.wait_gateway_ready().await?;
        let took = since_cargo_started().unwrap_or_else(|| started.elapsed());
        println!();
        println!(
            "Tether is up in {:.0}s on a real node. Open {}",
            took.as_secs_f64(),
            cluster.stack.url()
        );
        println!(
            "(the gateway Service's NodePort on the node's bridge address: reachable from this \
             machine only)"
        );
        print_sign_in(&cluster.idp, &cluster.stack.origin());
        print_access(&cluster.stack.users, &kubeconfig, &bins);
        println!(
            "Logs: kubectl logs -n tether-system deploy/tether-gateway; node logs in {}.",
            cluster.node().await.dir().join("logs").display()
        );
        println!("Press Ctrl-C to stop everything.");
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        println!("\nStopping the node, its pods and the control plane.");
        drop(cluster);
        let left = realnode::leftovers();
        if !left.is_empty() {
            bail!(
                "the node left this behind (run `cargo dev clean-node`):\n  {}",
                left.join("\n  ")
            );
        }
        println!("Stopped; nothing of the node is left on this machine.");
        Ok(())
    })
}

/// The identity provider's users, as the page's "Sign in" reaches them.
fn print_sign_in(idp: &tether_e2e::idp::Keycloak, gateway: &str) {
    println!();
    println!(
        "Sign in with the identity provider (Keycloak at {}):",
        idp.issuer()
    );
    for user in idp.users() {
        let can = match user.groups {
            ["tether-developers"] if user.username == "alice" => {
                "attaches to tether-demo's sessions"
            }
            ["tether-observers"] => "observes only",
            _ => "no access to tether-demo: another team",
        };
        println!(
            "  {:<6} password {:<16} {} groups {} → {can}",
            user.username,
            user.password,
            user.email,
            user.groups.join(",")
        );
    }
    println!(
        "  (the gateway maps them as kube-apiserver would with --oidc-username-claim=email \
         --oidc-groups-prefix=oidc:)"
    );
    println!("  kubectl tether login --gateway {gateway}  # the same, from a terminal");
}

fn print_access(users: &[stack::DevUser], kubeconfig: &Path, bins: &binaries::Binaries) {
    println!();
    println!("Development tokens (the page's \"Development token\" field, and tests):");
    for user in users {
        let role = if user.user == "alice" {
            "attach and observe"
        } else {
            "observe only"
        };
        println!("  token for {} ({role}): {}", user.user, user.token);
    }
    println!();
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!(
        "  export PATH={}:$PATH   # kubectl {}",
        bins.kubectl
            .parent()
            .expect("binaries live in a directory")
            .display(),
        binaries::KUBERNETES_VERSION
    );
    println!("  kubectl get ts -n tether-demo -w");
    println!();
}

fn clean_node() -> anyhow::Result<()> {
    realnode::cleanup();
    let left = realnode::leftovers();
    if left.is_empty() {
        println!("nothing of a real node is left on this machine");
        return Ok(());
    }
    bail!("still left:\n  {}", left.join("\n  "))
}

fn reap_node() -> anyhow::Result<()> {
    // Ctrl-C reaches the whole process group: outlive it to clean up after the others.
    #[allow(unsafe_code)]
    // SAFETY: replacing a signal disposition with SIG_IGN installs no handler code.
    unsafe {
        use nix::sys::signal::{SigHandler, Signal, signal};
        signal(Signal::SIGINT, SigHandler::SigIgn)?;
        signal(Signal::SIGTERM, SigHandler::SigIgn)?;
    }
    realnode::reap()
}

fn local_node(
    kubeconfig: std::path::PathBuf,
    name: String,
    dir: std::path::PathBuf,
    bin_dirs: Vec<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let client = tether_e2e::client_from_kubeconfig(&kubeconfig).await;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listening for SIGTERM")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        node::run(
            client,
            NodeOptions {
                name,
                dir,
                bin_dirs,
                ip_octet: 1,
            },
            shutdown,
        )
        .await
    })
}

/// Builds the browser page from its npm lockfile into `ws-gateway/web/dist/`, which the gateway
/// embeds at compile time.
fn build_page(root: &Path) -> anyhow::Result<()> {
    let web = root.join("ws-gateway/web");
    if !web.join("package-lock.json").exists() {
        return Ok(());
    }
    if !web.join("node_modules").exists() {
        step("npm ci (ws-gateway/web)");
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&web))?;
    }
    step("building the page (ws-gateway/web)");
    run(Command::new("npm").args(["run", "build"]).current_dir(&web))
}

fn test(no_lint: bool, cargo_test_args: &[String]) -> anyhow::Result<()> {
    let root = binaries::repo_root();
    // The end-to-end tests run on the real node: say at once when this machine cannot.
    realnode::preflight()?;
    // tmux for the agent's tests, Chromium for the browser tests, runc, CNI, iptables, buildah
    // and mmdebstrap for the real node and its images.
    // vim: the full-screen program the agent's late-viewer test runs.
    let mut packages = vec!["tmux", "vim", "chromium"];
    packages.extend_from_slice(realnode::DEBIAN_PACKAGES);
    ensure_debian_packages(&packages)?;
    // Before any cargo build: the gateway embeds the page at compile time.
    build_page(&root)?;
    step("building the control plane (cached after the first run)");
    let bins = binaries::ensure()?;
    let bin_dir = bins
        .kubectl
        .parent()
        .expect("binaries live in a directory")
        .to_path_buf();
    step("building the node: kubelet, kube-proxy, containerd, kube-router (cached)");
    let node_bins = binaries::ensure_node()?;
    step("installing the identity provider: Keycloak from Maven Central (cached)");
    tether_e2e::idp::ensure()?;
    let web = root.join("ws-gateway/web");
    if !no_lint {
        // esbuild strips types without checking them.
        step("tsc --noEmit (ws-gateway/web)");
        run(Command::new("npm")
            .args(["run", "typecheck"])
            .current_dir(&web))?;
    }
    step("the page's protocol unit tests (ws-gateway/web)");
    run(Command::new("npm")
        .args(["run", "test:unit"])
        .current_dir(&web))?;
    if !no_lint {
        step("cargo fmt --check");
        run(cargo(&root).args(["fmt", "--all", "--check"]))?;
        step("cargo clippy --workspace --all-targets -- -D warnings");
        run(cargo(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    step("cargo test --workspace");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run(cargo(&root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_test_args)
        .env("TETHER_CONTROLPLANE_BIN", &bin_dir)
        .env("TETHER_NODE_BIN", node_bins.dir())
        .env("PATH", path))?;
    step("all checks passed");
    Ok(())
}

/// How long ago the parent process started, when it is `cargo` (as under `cargo dev up`).
fn since_cargo_started() -> Option<std::time::Duration> {
    let parent = std::os::unix::process::parent_id();
    let comm = std::fs::read_to_string(format!("/proc/{parent}/comm")).ok()?;
    if comm.trim() != "cargo" {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{parent}/stat")).ok()?;
    // Field 22, counted after the parenthesised command name (fields 1 and 2).
    let ticks: f64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()?? as f64;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    (uptime >= ticks / hz).then(|| std::time::Duration::from_secs_f64(uptime - ticks / hz))
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Installs the Debian packages the tests need when running as root; otherwise names the exact
/// command and stops, since a test run must not ask for a password halfway through.
fn ensure_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !debian_package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = nix::unistd::Uid::effective().is_root();
    let command = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root {
        bail!(
            "the tests need {}; install them with:\n  sudo sh -c '{command}'",
            missing.join(", ")
        );
    }
    step(&format!("installing {} with apt-get", missing.join(", ")));
    run(Command::new("sh")
        .args(["-c", &command])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Whether dpkg has `package` installed; without dpkg (not Debian), whether a command of that
/// name is on PATH.
fn debian_package_installed(package: &str) -> bool {
    match Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(std::process::Stdio::null())
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).contains("install ok installed"),
        Err(_) => which(package),
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| is_executable(&d.join(program))))
        .unwrap_or(false)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
