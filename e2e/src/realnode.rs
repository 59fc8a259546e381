//! A real Kubernetes node on this machine: containerd 2 with runc, the kubelet, kube-proxy
//! (iptables) for Services, and kube-router (firewall only) for NetworkPolicy, all built from
//! their Go modules (see [`crate::binaries::ensure_node`]), with Debian's runc and CNI plugins.
//! Session pods run in real containers from images built from the repository's Dockerfile.
//!
//! The node's network is a Linux bridge, [`BRIDGE`], with the address [`NODE_IP`]. It exists
//! before the control plane starts, because the API server listens on it: pods reach the API
//! server through the `kubernetes` Service the way they do on any cluster, and nothing listens
//! beyond this machine (loopback and the bridge only; NodePorts only on the bridge address).
//!
//! Some host paths are fixed (`/run/containerd`, `/var/lib/kubelet`, `/run/netns`,
//! `/var/lib/cni`, the iptables chains, `/sys/fs/cgroup/*/kubepods`), so there is one real node
//! per machine; a lock file says so when a second one is started. [`cleanup`] removes
//! everything a node leaves on the host, whether it stopped cleanly or was killed: it runs
//! before every start and after every stop, so a second start on the same machine works.

use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    ControlPlane,
    binaries::{self, NodeBinaries},
    process,
};

/// The Node's name.
pub const NODE_NAME: &str = "tether-node";
/// The node's bridge: pods' veths join it, and the host has [`NODE_IP`] on it.
pub const BRIDGE: &str = "tether0";
/// The node's address: on the bridge, the pods' gateway, the API server's and the kubelet's.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// Pod addresses.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// containerd's socket (its default path, which `ctr` and the kubelet find).
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// The kubelet's root directory (its default: the device-plugin path is fixed anyway).
pub const KUBELET_ROOT: &str = "/var/lib/kubelet";
/// The sandbox ("pause") image, built here from Kubernetes' own `pause.c`.
pub const PAUSE_IMAGE: &str = "localhost/tether/pause:3.10";
/// containerd namespace the CRI uses.
const K8S_NAMESPACE: &str = "k8s.io";
/// Debian's CNI plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Held while a real node runs on this machine.
const LOCK_PATH: &str = "/run/tether-node.lock";

/// Debian packages the real node needs (installed by `cargo dev` when running as root).
pub const DEBIAN_PACKAGES: &[&str] = &[
    "runc",
    "containernetworking-plugins",
    "iptables",
    "ipset",
    "conntrack",
    "iproute2",
    "buildah",
    "mmdebstrap",
];

/// Why this machine cannot run the real node: every missing privilege or kernel feature, in
/// words, with the way out.
#[derive(Debug, thiserror::Error)]
#[error(
    "this machine cannot run a real Kubernetes node:\n{}\n\
     Run `cargo dev up --node=process` for the process stand-in (no containers, see README).",
    .missing.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n")
)]
pub struct Unsupported {
    /// What is missing.
    pub missing: Vec<String>,
}

/// Checks what the real node needs of this machine, without changing anything.
pub fn preflight() -> Result<(), Unsupported> {
    let mut missing = Vec::new();
    if !cfg!(target_os = "linux") {
        missing.push("Linux (containers need its namespaces and cgroups)".to_string());
    }
    if !nix::unistd::Uid::effective().is_root() {
        missing.push(
            "root: containerd, the kubelet and the bridge network need it (run as root)"
                .to_string(),
        );
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.contains("overlay") {
        missing.push("the overlay file system (containerd's snapshotter)".to_string());
    }
    if !Path::new("/sys/fs/cgroup/memory").exists()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        missing.push("cgroups with the memory controller at /sys/fs/cgroup".to_string());
    }
    if !Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        missing.push(
            "br_netfilter (net.bridge.bridge-nf-call-iptables): NetworkPolicy between pods on \
             the bridge depends on it; `modprobe br_netfilter`"
                .to_string(),
        );
    }
    if !Path::new("/proc/sys/net/ipv4/ip_forward").exists() {
        missing.push("IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)".to_string());
    }
    // The node takes over /run/containerd, /var/lib/kubelet and the KUBE-* chains, and its
    // clean-up removes them: never next to a runtime or kubelet that Tether did not start.
    let ours = our_binary_dirs();
    for_each_process(|pid, exe, _| {
        if is_foreign(&exe, &ours) {
            missing.push(format!(
                "no other container runtime or kubelet: process {pid} runs {}, and the real node \
                 would take over and then remove /run/containerd, /var/lib/kubelet and the \
                 KUBE-* iptables chains; stop it first",
                exe.display()
            ));
        }
    });
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Unsupported { missing })
    }
}

/// Names of the node's own daemons.
const NODE_PROCESSES: &[&str] = &[
    "containerd",
    "containerd-shim-runc-v2",
    "kubelet",
    "kube-proxy",
    "kube-router",
];

/// Where Tether's node binaries live: the node cache and `$TETHER_NODE_BIN`.
fn our_binary_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![binaries::cache_root().join("node")];
    dirs.extend(std::env::var_os("TETHER_NODE_BIN").map(PathBuf::from));
    dirs.into_iter()
        .map(|d| fs::canonicalize(&d).unwrap_or(d))
        .collect()
}

/// Whether `exe` is one of the node's daemons that was not started from Tether's binaries.
fn is_foreign(exe: &Path, ours: &[PathBuf]) -> bool {
    exe.file_name()
        .is_some_and(|n| NODE_PROCESSES.iter().any(|p| n == *p))
        && !ours.iter().any(|d| exe.starts_with(d))
}

/// Options of [`RealNode::start`].
#[derive(Debug, Clone)]
pub struct RealNodeOptions {
    /// Directory for the node's configuration, certificates, containerd's image store and logs.
    pub dir: PathBuf,
    /// OCI archives to import into containerd before the kubelet starts.
    pub images: Vec<PathBuf>,
}

/// The node's network and the machine-wide lock, created before the control plane (which
/// listens on the bridge).
///
/// The lock is held by a small process of its own, `tether-dev reap-node`: it takes the lock,
/// says so, and holds it until its standard input (a pipe only this process writes) ends, which
/// happens when this value is dropped or this process dies however it dies (a test binary
/// killed by a timeout included). Then it runs [`cleanup`], so pods and containerd's shims,
/// which are not this process's children and would outlive it, are stopped, and only then
/// releases the lock: the next node on this machine cannot start into a half-removed one.
#[derive(Debug)]
pub struct NodeNetwork {
    reaper: Option<Child>,
}

impl NodeNetwork {
    /// Takes the machine's real-node lock (through the reaper at `dev_binary`), removes what an
    /// earlier node left behind, and creates the bridge with [`NODE_IP`].
    pub fn create(dev_binary: &Path) -> anyhow::Result<NodeNetwork> {
        preflight()?;
        let mut reaper = Command::new(dev_binary)
            .arg("reap-node")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} reap-node", dev_binary.display()))?;
        let mut said = String::new();
        let stdout = reaper.stdout.take().expect("piped");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut said)
            .context("reading the reaper's answer")?;
        if said.trim() != "locked" {
            let _ = reaper.wait();
            bail!("could not take the real node's lock {LOCK_PATH} (see above)");
        }
        cleanup();
        write_sysctl("net/ipv4/ip_forward", "1")?;
        write_sysctl("net/bridge/bridge-nf-call-iptables", "1")?;
        let mtu = uplink_mtu().unwrap_or(1500);
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["link", "set", BRIDGE, "mtu", &mtu.to_string()])?;
        ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        Ok(NodeNetwork {
            reaper: Some(reaper),
        })
    }
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        if let Some(mut reaper) = self.reaper.take() {
            drop(reaper.stdin.take());
            // The reaper stops what is left and removes the bridge; wait for it, so that what
            // follows (a leftover check, the next start) sees the machine clean.
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if !matches!(reaper.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = reaper.kill();
        }
    }
}

/// The reaper's side of [`NodeNetwork`]: takes the lock (or says who holds it and fails),
/// prints `locked`, waits for standard input to end, runs [`cleanup`] and releases the lock.
pub fn reap() -> anyhow::Result<()> {
    let mut lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .with_context(|| format!("opening {LOCK_PATH}"))?;
    if lock.try_lock().is_err() {
        let holder = fs::read_to_string(LOCK_PATH).unwrap_or_default();
        bail!(
            "another real Tether node runs on this machine ({}): there can be one per machine \
             (fixed host paths such as /run/containerd); stop it first",
            holder.trim()
        );
    }
    lock.set_len(0)?;
    write!(lock, "reaper pid {}", std::process::id())?;
    println!("locked");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    cleanup();
    drop(lock);
    Ok(())
}

/// The running node's processes. [`RealNode::stop`] (or dropping it) stops every pod, every
/// process and removes what they left on the host.
#[derive(Debug)]
pub struct RealNode {
    dir: PathBuf,
    bins: NodeBinaries,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    kube_proxy: Option<Child>,
    kube_router: Option<Child>,
    kubelet_args: Vec<String>,
}

impl RealNode {
    /// Starts containerd, imports the images, starts the kubelet, kube-proxy and kube-router,
    /// and returns once the Node is Ready.
    pub async fn start(cp: &ControlPlane, opts: RealNodeOptions) -> anyhow::Result<RealNode> {
        let bins = binaries::ensure_node()?;
        let started = Instant::now();
        let dir = opts.dir;
        for sub in ["logs", "pki", "cni/net.d", "containerd"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let admin = cp.admin_client().await;
        grant_node_components(&admin).await?;

        // Identities: the kubelet is system:node:NAME (Node authorizer, NodeRestriction),
        // kube-proxy is system:kube-proxy (the bootstrap role system:node-proxier), kube-router
        // gets a role of its own with what its firewall controller reads.
        let kubelet_kubeconfig =
            cp.user_kubeconfig(&format!("system:node:{NODE_NAME}"), &["system:nodes"]);
        let proxy_kubeconfig = cp.user_kubeconfig("system:kube-proxy", &[]);
        let router_kubeconfig = cp.user_kubeconfig(ROUTER_USER, &[]);
        let serving = cp.authority().serving_for(&[NODE_NAME], &[NODE_IP.into()]);
        let pki = dir.join("pki");
        write(&pki.join("ca.crt"), &cp.authority().cert_pem())?;
        write(&pki.join("kubelet.crt"), &serving.cert_pem)?;
        write(&pki.join("kubelet.key"), &serving.key_pem)?;

        write(&dir.join("cni/net.d/10-tether.conflist"), &cni_config())?;
        write(&dir.join("containerd.toml"), &containerd_config(&dir))?;
        let mut node = RealNode {
            dir: dir.clone(),
            bins: bins.clone(),
            containerd: None,
            kubelet: None,
            kube_proxy: None,
            kube_router: None,
            kubelet_args: Vec::new(),
        };
        node.containerd = Some(node.spawn(
            "containerd",
            &bins.containerd,
            &[format!(
                "--config={}",
                dir.join("containerd.toml").display()
            )],
        )?);
        node.wait_containerd().await?;
        let pause = crate::images::pause_image(&bins.pause, &dir.join("images"))?;
        node.import(&pause)?;
        for archive in &opts.images {
            node.import(archive)?;
        }

        write(&dir.join("kubelet.yaml"), &kubelet_config(&pki))?;
        node.kubelet_args = vec![
            format!("--config={}", dir.join("kubelet.yaml").display()),
            format!("--kubeconfig={}", kubelet_kubeconfig.display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_IP}"),
            "--v=1".to_string(),
        ];
        node.start_kubelet()?;
        node.wait_node_ready(cp).await?;

        write(
            &dir.join("kube-proxy.yaml"),
            &kube_proxy_config(&proxy_kubeconfig),
        )?;
        node.kube_proxy = Some(node.spawn(
            "kube-proxy",
            &bins.kube_proxy,
            &[
                format!("--config={}", dir.join("kube-proxy.yaml").display()),
                "--v=1".to_string(),
            ],
        )?);
        // kube-router reads its own Node at start, so it comes after the kubelet registered it.
        node.kube_router = Some(node.spawn(
            "kube-router",
            &bins.kube_router,
            &[
                format!("--kubeconfig={}", router_kubeconfig.display()),
                format!("--hostname-override={NODE_NAME}"),
                "--run-firewall=true".to_string(),
                "--run-router=false".to_string(),
                "--run-service-proxy=false".to_string(),
                "--enable-cni=false".to_string(),
                "--metrics-port=0".to_string(),
                "--health-port=0".to_string(),
                "--v=1".to_string(),
            ],
        )?);
        eprintln!(
            "tether-e2e: real node {NODE_NAME} Ready at {NODE_IP} in {:.1}s (files in {})",
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(node)
    }

    /// The directory of the node's files (logs in `logs/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Imports an OCI archive into containerd's `k8s.io` namespace, where the kubelet finds it.
    pub fn import(&self, archive: &Path) -> anyhow::Result<()> {
        let out = self
            .ctr()
            .args(["images", "import", "--local"])
            .arg(archive)
            .output()
            .context("running ctr images import")?;
        if !out.status.success() {
            bail!(
                "importing {} into containerd failed: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Stops the kubelet (SIGTERM, as a service manager would) and starts it again: running
    /// pods must keep running.
    pub async fn restart_kubelet(&mut self, cp: &ControlPlane) -> anyhow::Result<()> {
        if let Some(child) = self.kubelet.take() {
            process::stop_all(vec![child]);
        }
        self.start_kubelet()?;
        self.wait_node_ready(cp).await
    }

    /// The log of a node component, for failure messages.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text = fs::read_to_string(self.dir.join("logs").join(format!("{component}.log")))
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new(&self.bins.ctr);
        cmd.args(["--address", CONTAINERD_SOCKET, "--namespace", K8S_NAMESPACE]);
        cmd
    }

    fn start_kubelet(&mut self) -> anyhow::Result<()> {
        let args = self.kubelet_args.clone();
        self.kubelet = Some(self.spawn("kubelet", &self.bins.kubelet.clone(), &args)?);
        Ok(())
    }

    fn spawn(&self, name: &str, program: &Path, args: &[String]) -> anyhow::Result<Child> {
        let log_path = self.dir.join("logs").join(format!("{name}.log"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(program);
        // containerd starts the first `containerd-shim-runc-v2` on PATH: ours, never Debian's
        // 1.6 shim, which a 2.x containerd cannot speak to.
        let path = format!(
            "{}:{}",
            self.bins
                .containerd_shim_runc_v2
                .parent()
                .expect("the shim lives in a directory")
                .display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        cmd.args(args)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        process::die_with_parent(&mut cmd);
        process::spawn_kept(cmd).with_context(|| format!("starting {}", program.display()))
    }

    async fn wait_containerd(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.containerd.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "containerd exited ({status}); end of its log:\n{}",
                    self.log_tail("containerd", 20)
                );
            }
            if Path::new(CONTAINERD_SOCKET).exists()
                && self
                    .ctr()
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "containerd did not answer in 30s; end of its log:\n{}",
            self.log_tail("containerd", 20)
        )
    }

    /// Waits until this kubelet answers its health check and the Node is Ready (a Node still
    /// Ready from a kubelet before a restart says nothing about this one, its health check does).
    async fn wait_node_ready(&mut self, cp: &ControlPlane) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(cp.admin_client().await);
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = String::from("not registered");
        while Instant::now() < deadline {
            if let Some(child) = self.kubelet.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "the kubelet exited ({status}); end of its log:\n{}",
                    self.log_tail("kubelet", 30)
                );
            }
            if !crate::node::probe_http([127, 0, 0, 1].into(), 10248, "/healthz").await {
                last = "the kubelet's health check does not answer yet".into();
            } else if let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await {
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|c| c.type_ == "Ready");
                match ready {
                    Some(c) if c.status == "True" => return Ok(()),
                    Some(c) => last = c.message.unwrap_or(c.status),
                    None => last = "no Ready condition yet".into(),
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!(
            "Node {NODE_NAME} was not Ready after 90s ({last}); end of the kubelet's log:\n{}",
            self.log_tail("kubelet", 30)
        )
    }

    /// Stops every pod's processes, then the node's own. Mounts, network namespaces, chains,
    /// ipsets and cgroups are removed once, by the reaper, when the [`NodeNetwork`] goes.
    pub fn stop(&mut self) {
        let daemons: Vec<Child> = [self.kube_router.take(), self.kube_proxy.take()]
            .into_iter()
            .flatten()
            .collect();
        if daemons.is_empty() && self.kubelet.is_none() && self.containerd.is_none() {
            return;
        }
        process::stop_all(daemons);
        if let Some(kubelet) = self.kubelet.take() {
            process::stop_all(vec![kubelet]);
        }
        // Containers first (SIGTERM, a few seconds, SIGKILL), then the shims that watched
        // them, then containerd: a shim without its containerd would otherwise live on.
        stop_pod_processes(Duration::from_secs(3));
        kill_by_exe(&self.bins.containerd_shim_runc_v2);
        if let Some(containerd) = self.containerd.take() {
            process::stop_all(vec![containerd]);
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The user kube-router runs as.
const ROUTER_USER: &str = "tether-e2e:kube-router";

/// RBAC for kube-router's firewall controller: it watches pods, namespaces, nodes and network
/// policies, and nothing else.
async fn grant_node_components(client: &kube::Client) -> anyhow::Result<()> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    use kube::api::{Patch, PatchParams};
    let role = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": ROUTER_USER},
        "rules": [
            {"apiGroups": [""], "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
             "verbs": ["get", "list", "watch"]},
        ],
    });
    let binding = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": ROUTER_USER},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ROUTER_USER},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": ROUTER_USER}],
    });
    let pp = PatchParams::apply(crate::controlplane::FIELD_MANAGER).force();
    Api::<ClusterRole>::all(client.clone())
        .patch(ROUTER_USER, &pp, &Patch::Apply(role))
        .await
        .context("granting kube-router its role")?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(ROUTER_USER, &pp, &Patch::Apply(binding))
        .await
        .context("binding kube-router's role")?;
    Ok(())
}

fn cni_config() -> String {
    let mtu = uplink_mtu().unwrap_or(1500);
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "tether",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "mtu": mtu,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP.to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    }))
    .expect("JSON serializes")
}

fn containerd_config(dir: &Path) -> String {
    format!(
        r#"version = 3
root = "{root}"
state = "/run/containerd"

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    # No registry is reachable: the sandbox image is built here from Kubernetes' pause.c.
    sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  # Root lacks CAP_SYS_RESOURCE in some VMs: runc then fails to lower oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{cni}"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "runc"
        SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
"#,
        root = dir.join("containerd").display(),
        cni = dir.join("cni/net.d").display(),
    )
}

fn kubelet_config(pki: &Path) -> String {
    let p = |f: &str| pki.join(f).display().to_string();
    let config = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP.to_string(),
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": p("kubelet.crt"),
        "tlsPrivateKeyFile": p("kubelet.key"),
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": p("ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": format!("unix://{CONTAINERD_SOCKET}"),
        "cgroupDriver": "cgroupfs",
        "failSwapOn": false,
        // cgroup v1 hosts (this VM kind is hybrid) are refused by default from 1.35 (KEP-5573).
        "failCgroupV1": false,
        "resolvConf": "/etc/resolv.conf",
        "clusterDomain": "cluster.local",
        // Images are imported, never pulled: nothing may collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "imageMinimumGCAge": "87600h",
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "serializeImagePulls": false,
        "maxPods": 110,
        "podPidsLimit": 4096,
        "rotateCertificates": false,
        "serverTLSBootstrap": false,
        "protectKernelDefaults": false,
        "makeIPTablesUtilChains": true,
        "shutdownGracePeriod": "0s",
        "nodeStatusUpdateFrequency": "2s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "20s",
        "logging": {"format": "text"},
    });
    serde_yaml_ng::to_string(&config).expect("YAML serializes")
}

fn kube_proxy_config(kubeconfig: &Path) -> String {
    let config = serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": kubeconfig.display().to_string()},
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP.to_string(),
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        // NodePorts only on the bridge: nothing is exposed beyond this machine.
        "nodePortAddresses": [format!("{NODE_IP}/32")],
        // Leave the host's conntrack table size alone.
        "conntrack": {"maxPerCore": 0},
    });
    serde_yaml_ng::to_string(&config).expect("YAML serializes")
}

/// Removes everything a real node leaves on the host: pod and shim processes, mounts, network
/// namespaces, the bridge, iptables chains and ipsets, cgroups and state directories. Safe to
/// call when nothing is left; never fails (what it cannot remove it names on stderr).
pub fn cleanup() {
    stop_pod_processes(Duration::from_secs(1));
    kill_our_shims();
    unmount_under(&[
        "/run/containerd/",
        &format!("{KUBELET_ROOT}/"),
        "/run/netns/cni-",
    ]);
    for dir in ["/run/containerd", KUBELET_ROOT, "/var/lib/cni"] {
        if Path::new(dir).exists()
            && let Err(e) = fs::remove_dir_all(dir)
        {
            eprintln!("tether-e2e: cannot remove {dir}: {e}");
        }
    }
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("cni-") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    remove_iptables_chains();
    destroy_ipsets();
    let _ = Command::new("ip")
        .args(["link", "del", BRIDGE])
        .stderr(Stdio::null())
        .status();
    remove_cgroups();
}

/// Every process in a `kubepods` cgroup: SIGTERM, `grace`, then SIGKILL.
fn stop_pod_processes(grace: Duration) {
    let pids = pod_pids();
    if pids.is_empty() {
        return;
    }
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !pod_pids().is_empty() {
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..20 {
        let left = pod_pids();
        if left.is_empty() {
            return;
        }
        for pid in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The cgroup roots the kubelet makes (`kubepods` under each v1 controller, and cgroup2).
fn kubepods_cgroups() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
        for entry in entries.flatten() {
            let path = entry.path().join("kubepods");
            if path.is_dir() {
                roots.push(path);
            }
        }
    }
    let unified = Path::new("/sys/fs/cgroup/kubepods");
    if unified.is_dir() && !roots.iter().any(|r| r == unified) {
        roots.push(unified.to_path_buf());
    }
    roots
}

fn pod_pids() -> Vec<i32> {
    fn walk(dir: &Path, out: &mut Vec<i32>) {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), out);
                }
            }
        }
    }
    let mut pids = Vec::new();
    for root in kubepods_cgroups() {
        walk(&root, &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn remove_cgroups() {
    fn rmdir_deep(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_deep(&entry.path());
                }
            }
        }
        if let Err(e) = fs::remove_dir(dir) {
            eprintln!("tether-e2e: cannot remove cgroup {}: {e}", dir.display());
        }
    }
    for root in kubepods_cgroups() {
        rmdir_deep(&root);
    }
}

fn kill_by_exe(exe: &Path) {
    let want = fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    for_each_process(|pid, exe, _| {
        if exe == want {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    });
}

/// containerd's shims from Tether's binaries (a killed node's shims outlive it); never another
/// runtime's.
fn kill_our_shims() {
    let ours = our_binary_dirs();
    for_each_process(|pid, exe, _| {
        if exe
            .file_name()
            .is_some_and(|n| n == "containerd-shim-runc-v2")
            && ours.iter().any(|d| exe.starts_with(d))
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    });
}

fn for_each_process(mut f: impl FnMut(i32, PathBuf, String)) {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(exe) = fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline"))
            .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
            .unwrap_or_default();
        f(pid, exe, cmdline);
    }
}

/// Unmounts every mount point under one of `prefixes`, deepest first (lazily: a mount that is
/// still busy goes when its last user does).
fn unmount_under(prefixes: &[&str]) {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| {
            prefixes
                .iter()
                .any(|pre| p.starts_with(pre) || p == pre.trim_end_matches('/'))
        })
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        if let Err(e) = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("tether-e2e: cannot unmount {point}: {e}");
        }
    }
}

fn unescape_mount_path(raw: &str) -> String {
    raw.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Chains of kube-proxy, the kubelet and kube-router (`KUBE-…`) and of the CNI plugins
/// (`CNI-…`), in every table, with both iptables back ends and IPv6: the rules that jump to
/// them from the built-in chains are deleted, then the chains flushed and deleted, in one
/// `iptables-restore --noflush` per table so nothing is left half done.
fn remove_iptables_chains() {
    let ours = |chain: &str| chain.starts_with("KUBE-") || chain.starts_with("CNI-");
    for tool in [
        "iptables-nft",
        "iptables-legacy",
        "ip6tables-nft",
        "ip6tables-legacy",
    ] {
        let Ok(out) = Command::new(format!("{tool}-save"))
            .stderr(Stdio::null())
            .output()
        else {
            continue;
        };
        let saved = String::from_utf8_lossy(&out.stdout);
        let mut script = String::new();
        let mut table = String::new();
        let mut chains: Vec<String> = Vec::new();
        let mut deletes: Vec<String> = Vec::new();
        let mut flush_table = |table: &str, chains: &mut Vec<String>, deletes: &mut Vec<String>| {
            if table.is_empty() || (chains.is_empty() && deletes.is_empty()) {
                chains.clear();
                deletes.clear();
                return;
            }
            script.push_str(&format!("*{table}\n"));
            for d in deletes.drain(..) {
                script.push_str(&d);
                script.push('\n');
            }
            for c in chains.iter() {
                script.push_str(&format!("-F {c}\n"));
            }
            for c in chains.drain(..) {
                script.push_str(&format!("-X {c}\n"));
            }
            script.push_str("COMMIT\n");
        };
        for line in saved.lines() {
            if let Some(t) = line.strip_prefix('*') {
                flush_table(&table, &mut chains, &mut deletes);
                table = t.trim().to_string();
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if ours(name) {
                    chains.push(name.to_string());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or_default();
                let target = rule
                    .split_whitespace()
                    .skip_while(|w| *w != "-j" && *w != "-g")
                    .nth(1)
                    .unwrap_or_default();
                if !ours(chain) && ours(target) {
                    deletes.push(format!("-D {rule}"));
                }
            }
        }
        flush_table(&table, &mut chains, &mut deletes);
        if script.is_empty() {
            continue;
        }
        let restore = Command::new(format!("{tool}-restore"))
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        if let Ok(mut child) = restore {
            let _ = child
                .stdin
                .take()
                .expect("piped")
                .write_all(script.as_bytes());
            match child.wait_with_output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "tether-e2e: {tool}-restore could not remove the node's chains: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("tether-e2e: {tool}-restore: {e}"),
            }
        }
    }
}

/// kube-router's ipsets (`KUBE-…`, `kube-router-…`, and their `inet6:` twins).
fn destroy_ipsets() {
    let Ok(out) = Command::new("ipset")
        .args(["list", "-n"])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        let bare = name.strip_prefix("inet6:").unwrap_or(name);
        if bare.starts_with("KUBE-") || bare.starts_with("kube-router") {
            let _ = Command::new("ipset")
                .args(["destroy", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What is left of a node on this host, in words (empty when nothing): the test of
/// [`cleanup`], and what `cargo dev` reports after stopping.
pub fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    for_each_process(|pid, exe, cmdline| {
        let name = exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if [
            "containerd",
            "containerd-shim-runc-v2",
            "kubelet",
            "kube-proxy",
            "kube-router",
        ]
        .contains(&name.as_str())
        {
            left.push(format!("process {pid}: {}", cmdline.trim()));
        }
    });
    for pid in pod_pids() {
        left.push(format!("pod process {pid}"));
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for point in mountinfo.lines().filter_map(|l| l.split(' ').nth(4)) {
        // The kubelet bind-mounts its root directory onto itself.
        if point.starts_with("/run/containerd")
            || point.starts_with(KUBELET_ROOT)
            || point.starts_with("/run/netns/cni-")
        {
            left.push(format!("mount {point}"));
        }
    }
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("cni-") {
                left.push(format!("network namespace {name}"));
            }
        }
    }
    if Path::new(&format!("/sys/class/net/{BRIDGE}")).exists() {
        left.push(format!("bridge {BRIDGE}"));
    }
    for tool in ["iptables-nft-save", "iptables-legacy-save"] {
        if let Ok(out) = Command::new(tool).stderr(Stdio::null()).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(decl) = line.strip_prefix(':') {
                    let name = decl.split_whitespace().next().unwrap_or_default();
                    if name.starts_with("KUBE-") || name.starts_with("CNI-") {
                        left.push(format!("{tool}: chain {name}"));
                    }
                }
            }
        }
    }
    if let Ok(out) = Command::new("ipset").args(["list", "-n"]).output() {
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            let bare = name.strip_prefix("inet6:").unwrap_or(name);
            if bare.starts_with("KUBE-") || bare.starts_with("kube-router") {
                left.push(format!("ipset {name}"));
            }
        }
    }
    for root in kubepods_cgroups() {
        left.push(format!("cgroup {}", root.display()));
    }
    left
}

fn write_sysctl(key: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{key}");
    fs::write(&path, value).with_context(|| format!("setting {path} to {value}"))
}

/// MTU of the interface of the default route: pods' veths and the bridge must not exceed it.
fn uplink_mtu() -> Option<u32> {
    let routes = fs::read_to_string("/proc/net/route").ok()?;
    let dev = routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"00000000")).then(|| f[0].to_string())
    })?;
    fs::read_to_string(format!("/sys/class/net/{dev}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_machine_that_cannot_run_the_node_is_told_what_is_missing_and_the_way_out() {
        let e = super::Unsupported {
            missing: vec!["root: …".into(), "the overlay file system".into()],
        };
        let text = e.to_string();
        assert!(
            text.contains("  - root: …\n  - the overlay file system"),
            "{text}"
        );
        assert!(text.contains("cargo dev up --node=process"), "{text}");
    }

    #[test]
    fn only_daemons_outside_tethers_binaries_are_foreign() {
        use std::path::{Path, PathBuf};
        let ours = vec![PathBuf::from("/root/.cache/tether/node")];
        let foreign = |p: &str| super::is_foreign(Path::new(p), &ours);
        assert!(foreign("/usr/bin/containerd"), "Docker's containerd");
        assert!(
            foreign("/usr/local/bin/kubelet"),
            "another cluster's kubelet"
        );
        assert!(foreign("/usr/bin/containerd-shim-runc-v2"));
        assert!(!foreign("/root/.cache/tether/node/v1.34.4-abc/containerd"));
        assert!(!foreign("/root/.cache/tether/node/v1.34.4-abc/kube-router"));
        assert!(!foreign("/usr/bin/bash"), "not a node daemon");
        assert!(!foreign("/usr/bin/containerd-stress"), "names match whole");
    }

    #[test]
    fn the_cni_config_puts_pods_on_the_bridge_with_the_node_as_gateway() {
        let conf: serde_json::Value = serde_json::from_str(&super::cni_config()).unwrap();
        let bridge = &conf["plugins"][0];
        assert_eq!(bridge["bridge"], super::BRIDGE);
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(
            bridge["ipam"]["ranges"][0][0]["gateway"],
            super::NODE_IP.to_string()
        );
    }
}
