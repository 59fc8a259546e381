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
    node::{self, NodeOptions},
    stack::{self, Stack, StackOptions},
};

#[derive(Parser, Debug)]
#[command(name = "cargo dev", about = "Run Tether locally and test it", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the local control plane with Tether installed; stop with Ctrl-C.
    Up {
        /// Port of the local kube-apiserver (0 picks a free one).
        #[arg(long, default_value_t = 6443)]
        api_port: u16,
        /// Port of the gateway, where the page is served (0 picks a free one).
        #[arg(long, default_value_t = 8443)]
        gateway_port: u16,
    },
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
    BuildControlPlane,
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
        } => up(api_port, gateway_port),
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
        Cmd::BuildControlPlane => build_control_plane(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cargo dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn build_control_plane() -> anyhow::Result<()> {
    let bins = binaries::ensure()?;
    println!(
        "{}",
        bins.kube_apiserver
            .parent()
            .expect("binaries live in a directory")
            .display()
    );
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
        let bin_dir = bins.kubectl.parent().expect("binaries live in a directory");
        println!();
        // From when `cargo dev up` was typed: cargo compiled this program before it started.
        let took = since_cargo_started().unwrap_or_else(|| started.elapsed());
        println!(
            "Tether is up in {:.0}s. Open {}",
            took.as_secs_f64(),
            stack.url()
        );
        println!();
        for user in &stack.users {
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
            bin_dir.display(),
            binaries::KUBERNETES_VERSION
        );
        println!("  kubectl get ts -n tether-demo -w");
        println!();
        println!(
            "Logs: {} and {}.",
            cp.dir().join("logs").display(),
            stack.dir().join("logs").display()
        );
        println!("Press Ctrl-C to stop everything.");
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        println!("\nStopping Tether and the control plane.");
        stack.stop();
        cp.stop();
        Ok(())
    })
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
    // tmux for the agent's tests, Chromium for the browser tests.
    ensure_debian_packages(&["tmux", "chromium"])?;
    // Before any cargo build: the gateway embeds the page at compile time.
    build_page(&root)?;
    step("building the control plane (cached after the first run)");
    let bins = binaries::ensure()?;
    let bin_dir = bins
        .kubectl
        .parent()
        .expect("binaries live in a directory")
        .to_path_buf();
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
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !which(p)).collect();
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
