//! The local node: plays kubelet for one Node on this machine, so a session goes from
//! `kubectl apply` to a browser without a container runtime.
//!
//! It registers the Node and renews its Lease; for each pod the scheduler binds to it, it runs
//! the pod's first container as a local process on a loopback address of its own (127.0.x.y,
//! the pod IP), reports status the way a kubelet does (Running, podIP, Ready from the readiness
//! probe, container state with exit code and termination message), enforces
//! `activeDeadlineSeconds`, and stops the process when the pod is deleted.
//!
//! What it does not do, honestly: no images (the container's command is looked up by its
//! basename on this machine's PATH), no cgroups or resource limits, no user, seccomp or
//! capability enforcement, no network policy, no mount namespaces (paths under emptyDir mounts
//! and the termination-message path are translated to per-pod host directories in env values
//! and the working directory), one container per pod, `restartPolicy: Never` semantics.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt as _, TryStreamExt as _};
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Container, Node, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{process::Command, sync::watch};

/// Field manager of everything the local node writes.
const MANAGER: &str = "tether-local-node";

/// Configuration of the local node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The Node's name; its kubeconfig should be `system:node:<name>` in `system:nodes`.
    pub name: String,
    /// Directory for per-pod volumes, logs and termination messages.
    pub dir: PathBuf,
    /// Extra directories searched first for container commands (for example `target/debug`).
    pub bin_dirs: Vec<PathBuf>,
    /// Second octet range of pod IPs: pods get 127.<octet>.x.y.
    pub ip_octet: u8,
}

/// Runs the local node until `shutdown` completes, the future is dropped, or the watch ends.
/// On `shutdown` every pod's process gets SIGTERM and a few seconds to stop, as when a kubelet
/// drains: a session agent then stops its tmux server, which would otherwise, daemonized,
/// outlive it. Dropped without shutdown, the processes are SIGKILLed with this process.
pub async fn run(
    client: Client,
    opts: NodeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.dir)?;
    register(&client, &opts.name).await?;
    let heartbeat = tokio::spawn(heartbeat(client.clone(), opts.name.clone()));
    let node = Arc::new(NodeState {
        client: client.clone(),
        opts,
        next_ip: Mutex::new(2),
        pids: Mutex::new(std::collections::HashSet::new()),
    });
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", node.opts.name));
    let mut running: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut events = watcher(pods, config).default_backoff().boxed();
    tokio::pin!(shutdown);
    let result = loop {
        let next = tokio::select! {
            next = events.try_next() => next,
            () = &mut shutdown => {
                node.stop_all_pods().await;
                break Ok(());
            }
        };
        let event = match next {
            Ok(Some(event)) => event,
            Ok(None) => break Ok(()),
            Err(e) => break Err(anyhow::anyhow!("watching pods: {e}")),
        };
        let (watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) = event else {
            continue;
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        running.retain(|_, tx| !tx.is_closed());
        if let Some(tx) = running.get(&uid) {
            let _ = tx.send(Some(pod));
        } else if !is_finished(&pod) || pod.metadata.deletion_timestamp.is_some() {
            let (tx, rx) = watch::channel(Some(pod.clone()));
            running.insert(uid, tx);
            tokio::spawn(run_pod(node.clone(), pod, rx));
        }
    };
    heartbeat.abort();
    result
}

struct NodeState {
    client: Client,
    opts: NodeOptions,
    next_ip: Mutex<u32>,
    /// Processes of running pods, for a graceful stop of the whole node.
    pids: Mutex<std::collections::HashSet<u32>>,
}

impl NodeState {
    /// SIGTERM to every pod's process, then up to four seconds for them to exit (whoever stops
    /// the node SIGKILLs it after five).
    async fn stop_all_pods(&self) {
        let pids: Vec<u32> = self
            .pids
            .lock()
            .expect("pids lock")
            .iter()
            .copied()
            .collect();
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        while tokio::time::Instant::now() < deadline
            && !self.pids.lock().expect("pids lock").is_empty()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn allocate_ip(&self) -> Ipv4Addr {
        let mut next = self.next_ip.lock().expect("ip lock");
        let n = *next;
        *next += 1;
        Ipv4Addr::new(127, self.opts.ip_octet, (n >> 8) as u8, (n & 0xff) as u8)
    }
}

fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

async fn register(client: &Client, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "tether.dev/local-node": "true",
        }},
    });
    nodes
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(node),
        )
        .await?;
    let now = Time(Timestamp::now());
    let status = serde_json::json!({
        "status": {
            "capacity": {"cpu": "8", "memory": "16Gi", "pods": "1100", "ephemeral-storage": "100Gi"},
            "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "1100", "ephemeral-storage": "100Gi"},
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "tether local node is running pods as local processes",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "nodeInfo": {
                "architecture": std::env::consts::ARCH, "operatingSystem": "linux",
                "kubeletVersion": crate::binaries::KUBERNETES_VERSION, "kubeProxyVersion": "",
                "containerRuntimeVersion": "tether-local://0", "kernelVersion": "", "osImage": "",
                "bootID": "", "machineID": "", "systemUUID": "",
            },
        }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

async fn heartbeat(client: Client, name: String) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        let lease = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name},
            "spec": {
                "holderIdentity": name, "leaseDurationSeconds": 40,
                "renewTime": MicroTime(Timestamp::now()),
            },
        });
        if let Err(e) = leases
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(lease),
            )
            .await
        {
            eprintln!("tether-local-node: renewing the node lease failed: {e}");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// One pod's life on this node.
async fn run_pod(node: Arc<NodeState>, pod: Pod, mut updates: watch::Receiver<Option<Pod>>) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &ns);
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() || is_finished(&pod) {
        finalize_deletion(&pods, &name, &uid).await;
        return;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let Some(container) = spec.containers.first().cloned() else {
        fail(&pods, &name, "NoContainer", "the pod has no container").await;
        return;
    };
    let pod_ip = node.allocate_ip();
    // Short: tmux and other programs put unix sockets under these paths, and a socket path
    // must fit in 108 bytes. `pod` (namespace/name) is in the pod's own log and status.
    let pod_dir = node.opts.dir.join(&uid[..uid.len().min(8)]);
    let prepared = match prepare(&node.opts, &pod, &container, pod_ip, &pod_dir) {
        Ok(p) => p,
        Err(message) => {
            fail(&pods, &name, "CreateContainerConfigError", &message).await;
            return;
        }
    };
    let started_at = Timestamp::now();
    let log = match std::fs::File::create(pod_dir.join("container.log")) {
        Ok(f) => f,
        Err(e) => {
            fail(
                &pods,
                &name,
                "CreateContainerError",
                &format!("creating the log: {e}"),
            )
            .await;
            return;
        }
    };
    let mut cmd = Command::new(&prepared.program);
    cmd.args(&prepared.args)
        .env_clear()
        .envs(&prepared.env)
        .current_dir(&prepared.working_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("duplicating a log handle"))
        .stderr(log)
        .kill_on_drop(true);
    crate::process::die_with_parent(cmd.as_std_mut());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let message = format!("starting {}: {e}", prepared.program.display());
            fail(&pods, &name, "StartError", &message).await;
            return;
        }
    };
    let pid = child.id();
    if let Some(pid) = pid {
        node.pids.lock().expect("pids lock").insert(pid);
    }
    // Forgets the pid however this task ends.
    let _forget = ForgetPid(&node, pid);
    let probe = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .map(|h| {
            let port = match &h.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p as u16,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(named) => {
                    container
                        .ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref() == Some(named))
                        .map(|p| p.container_port as u16)
                        .unwrap_or(0)
                }
            };
            (port, h.path.clone().unwrap_or_else(|| "/".into()))
        });
    let mut ready = probe.is_none();
    patch_status(
        &pods,
        &name,
        running_status(&container, pod_ip, started_at, ready),
    )
    .await;
    let deadline = spec
        .active_deadline_seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s.max(0) as u64));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            exit = child.wait() => {
                let code = exit.ok().and_then(|s| s.code()).unwrap_or(137);
                let message = std::fs::read_to_string(&prepared.termination_message)
                    .unwrap_or_default();
                let message: String = message.chars().take(4096).collect();
                patch_status(&pods, &name, terminated_status(&container, pod_ip, started_at, code, &message)).await;
                wait_for_deletion(&mut updates).await;
                finalize_deletion(&pods, &name, &uid).await;
                return;
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                stop(&mut child, 0).await;
                let seconds = spec.active_deadline_seconds.unwrap_or_default();
                patch_status(&pods, &name, serde_json::json!({"status": {
                    "phase": "Failed", "reason": "DeadlineExceeded",
                    "message": format!("Pod was active on the node longer than the specified deadline ({seconds}s)"),
                    "conditions": conditions(false),
                    "containerStatuses": [container_status(&container, false, serde_json::json!({"terminated": {
                        "exitCode": 137, "reason": "DeadlineExceeded", "startedAt": Time(started_at), "finishedAt": Time(Timestamp::now()),
                    }}))],
                }})).await;
                wait_for_deletion(&mut updates).await;
                finalize_deletion(&pods, &name, &uid).await;
                return;
            }
            changed = updates.changed() => {
                let deleting = changed.is_err() || updates.borrow().as_ref().is_some_and(|p| p.metadata.deletion_timestamp.is_some());
                if deleting {
                    let grace = spec.termination_grace_period_seconds.unwrap_or(30).clamp(0, 30) as u64;
                    stop(&mut child, grace).await;
                    finalize_deletion(&pods, &name, &uid).await;
                    return;
                }
            }
            _ = tick.tick(), if probe.is_some() => {
                let (port, path) = probe.clone().expect("guarded by the branch condition");
                let ok = probe_http(pod_ip.into(), port, &path).await;
                if ok != ready {
                    ready = ok;
                    patch_status(&pods, &name, running_status(&container, pod_ip, started_at, ready)).await;
                }
            }
        }
    }
}

struct ForgetPid<'a>(&'a NodeState, Option<u32>);

impl Drop for ForgetPid<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.1 {
            self.0.pids.lock().expect("pids lock").remove(&pid);
        }
    }
}

struct Prepared {
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    working_dir: PathBuf,
    termination_message: PathBuf,
}

/// Turns a container into a local command line: env from values and the downward API,
/// `$(VAR)` expansion as the kubelet does it, and container paths translated to host paths.
fn prepare(
    opts: &NodeOptions,
    pod: &Pod,
    container: &Container,
    pod_ip: Ipv4Addr,
    pod_dir: &Path,
) -> Result<Prepared, String> {
    let spec = pod.spec.clone().unwrap_or_default();
    std::fs::create_dir_all(pod_dir).map_err(|e| format!("creating {}: {e}", pod_dir.display()))?;
    // Container path prefix → host directory, longest first.
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .ok_or_else(|| format!("volume {} is not defined", mount.name))?;
        if volume.empty_dir.is_none() {
            return Err(format!(
                "volume {}: the local node supports only emptyDir volumes",
                mount.name
            ));
        }
        let host = pod_dir.join("v").join(&mount.name);
        std::fs::create_dir_all(&host).map_err(|e| format!("creating {}: {e}", host.display()))?;
        mounts.push((mount.mount_path.trim_end_matches('/').to_string(), host));
    }
    mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let message_path = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    let termination_message = pod_dir.join("termination-log");
    let translate = |value: &str| -> String {
        if value == message_path {
            return termination_message.display().to_string();
        }
        for (prefix, host) in &mounts {
            if value == prefix {
                return host.display().to_string();
            }
            if let Some(rest) = value.strip_prefix(&format!("{prefix}/")) {
                return host.join(rest).display().to_string();
            }
        }
        value.to_string()
    };

    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), search_path(opts));
    env.insert(
        "HOSTNAME".into(),
        pod.metadata.name.clone().unwrap_or_default(),
    );
    let mut ordered: Vec<(String, String)> = Vec::new();
    for var in container.env.iter().flatten() {
        let value = if let Some(value_from) = &var.value_from {
            let field = value_from.field_ref.as_ref().ok_or_else(|| {
                format!(
                    "env {}: only fieldRef is supported by the local node",
                    var.name
                )
            })?;
            match field.field_path.as_str() {
                "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
                "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
                "status.podIP" => pod_ip.to_string(),
                "spec.nodeName" => opts.name.clone(),
                other => {
                    return Err(format!(
                        "env {}: fieldRef {other} is not supported",
                        var.name
                    ));
                }
            }
        } else {
            expand(var.value.as_deref().unwrap_or_default(), &ordered)
        };
        ordered.push((var.name.clone(), value));
    }
    for (k, v) in ordered.iter().cloned() {
        env.insert(k, translate(&v));
    }
    let env_list: Vec<(String, String)> = env.clone().into_iter().collect();
    let mut argv: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|a| translate(&expand(a, &env_list)))
        .collect();
    if argv.is_empty() {
        return Err("the container has no command: the local node runs no images".into());
    }
    let first = argv.remove(0);
    let program = resolve(opts, &first)?;
    let working_dir = container
        .working_dir
        .as_deref()
        .map(&translate)
        .map(PathBuf::from)
        .unwrap_or_else(|| pod_dir.to_path_buf());
    std::fs::create_dir_all(&working_dir).ok();
    Ok(Prepared {
        program,
        args: argv,
        env,
        working_dir,
        termination_message,
    })
}

/// `$(VAR)` expansion of the kubelet: known variables are replaced, `$$(VAR)` escapes, unknown
/// references stay as they are.
fn expand(value: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("$(")
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..end + 3]),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

fn search_path(opts: &NodeOptions) -> String {
    let mut dirs: Vec<PathBuf> = opts.bin_dirs.clone();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs)
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_default()
}

fn resolve(opts: &NodeOptions, command: &str) -> Result<PathBuf, String> {
    let base = Path::new(command)
        .file_name()
        .ok_or_else(|| format!("cannot run {command:?}"))?;
    let path = search_path(opts);
    std::env::split_paths(&path)
        .map(|d| d.join(base))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{} is not on this machine's PATH (the local node runs commands, not images)",
                base.to_string_lossy()
            )
        })
}

async fn stop(child: &mut tokio::process::Child, grace_seconds: u64) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if grace_seconds == 0
        || tokio::time::timeout(Duration::from_secs(grace_seconds), child.wait())
            .await
            .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn wait_for_deletion(updates: &mut watch::Receiver<Option<Pod>>) {
    loop {
        if updates
            .borrow()
            .as_ref()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
        {
            return;
        }
        if updates.changed().await.is_err() {
            return;
        }
    }
}

/// The kubelet's last word on a deleted pod: remove it for good once its containers are gone.
async fn finalize_deletion(pods: &Api<Pod>, name: &str, uid: &str) {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let _ = pods.delete(name, &params).await;
}

async fn fail(pods: &Api<Pod>, name: &str, reason: &str, message: &str) {
    eprintln!("tether-local-node: pod {name}: {reason}: {message}");
    patch_status(
        pods,
        name,
        serde_json::json!({"status": {"phase": "Failed", "reason": reason, "message": message}}),
    )
    .await;
}

async fn patch_status(pods: &Api<Pod>, name: &str, status: serde_json::Value) {
    if let Err(e) = pods
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(status))
        .await
    {
        eprintln!("tether-local-node: updating the status of pod {name}: {e}");
    }
}

fn conditions(ready: bool) -> serde_json::Value {
    let now = Time(Timestamp::now());
    let r = if ready { "True" } else { "False" };
    serde_json::json!([
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
        {"type": "ContainersReady", "status": r, "lastTransitionTime": now},
        {"type": "Ready", "status": r, "lastTransitionTime": now},
    ])
}

fn container_status(
    container: &Container,
    ready: bool,
    state: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "name": container.name, "ready": ready, "started": state.get("running").is_some(),
        "restartCount": 0, "image": container.image.clone().unwrap_or_default(),
        "imageID": "", "state": state,
    })
}

fn running_status(
    container: &Container,
    ip: Ipv4Addr,
    started: Timestamp,
    ready: bool,
) -> serde_json::Value {
    serde_json::json!({"status": {
        "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
        "hostIP": "127.0.0.1", "startTime": Time(started),
        "conditions": conditions(ready),
        "containerStatuses": [container_status(container, ready, serde_json::json!({"running": {"startedAt": Time(started)}}))],
    }})
}

fn terminated_status(
    container: &Container,
    ip: Ipv4Addr,
    started: Timestamp,
    code: i32,
    message: &str,
) -> serde_json::Value {
    serde_json::json!({"status": {
        "phase": if code == 0 { "Succeeded" } else { "Failed" },
        "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}], "hostIP": "127.0.0.1",
        "conditions": conditions(false),
        "containerStatuses": [container_status(container, false, serde_json::json!({"terminated": {
            "exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
            "message": message, "startedAt": Time(started), "finishedAt": Time(Timestamp::now()),
        }}))],
    }})
}

/// A minimal HTTP/1.1 GET for readiness probes: a status line of 2xx or 3xx is success, as for
/// the kubelet. Written by hand because the probe needs nothing else of an HTTP client.
pub(crate) async fn probe_http(ip: std::net::IpAddr, port: u16, path: &str) -> bool {
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\nUser-Agent: tether-local-node\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut head = [0u8; 16];
            let n = stream.read(&mut head).await.ok()?;
            let line = std::str::from_utf8(&head[..n]).ok()?;
            let code: u16 = line.split(' ').nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        };
        tokio::time::timeout(Duration::from_secs(1), attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::expand;

    fn vars() -> Vec<(String, String)> {
        vec![
            ("POD_IP".into(), "127.1.0.2".into()),
            ("PORT".into(), "7681".into()),
        ]
    }

    #[test]
    fn expand_replaces_known_variables_like_the_kubelet() {
        assert_eq!(expand("$(POD_IP):$(PORT)", &vars()), "127.1.0.2:7681");
    }

    #[test]
    fn expand_keeps_unknown_references_and_honours_escapes() {
        assert_eq!(
            expand("$(NOPE)/$$(POD_IP)/$", &vars()),
            "$(NOPE)/$(POD_IP)/$"
        );
        assert_eq!(expand("a$(unterminated", &vars()), "a$(unterminated");
    }
}
