//! What the product promises about a session pod, proved from inside it on a real node
//! (containerd, runc, kubelet, kube-proxy, kube-router) with the images built from the
//! Dockerfile and the chart installed by helm: the sandbox the shell runs in, the network policy
//! around it, the limits in its cgroup, the shells of the session image, and a chart that can be
//! upgraded and a node whose kubelet can restart under live sessions.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use tether_api::{SessionPhase, TerminalSession};
use tether_e2e::{
    TestNamespace,
    cluster::Cluster,
    terminal::Terminal,
    wait::{eventually, never_within},
};
use tether_protocol::Mode;

const STEP: Duration = Duration::from_secs(30);

/// A namespace enforcing Pod Security `restricted` where alice may attach.
async fn tenant(cluster: &Cluster, prefix: &str) -> TestNamespace {
    let ns = cluster.cp.namespace(prefix).await;
    let binding = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "alice-attaches", "namespace": ns.name()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tether-user"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
    });
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(
        cluster.cp.admin_client().await,
        ns.name(),
    )
    .patch(
        "alice-attaches",
        &PatchParams::apply("e2e"),
        &Patch::Apply(binding),
    )
    .await
    .expect("binding alice to tether-user");
    ns
}

async fn apply_session(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> Api<TerminalSession> {
    let api: Api<TerminalSession> = Api::namespaced(cluster.cp.admin_client().await, ns);
    let manifest = serde_json::json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "TerminalSession",
        "metadata": {"name": name}, "spec": spec,
    });
    api.patch(name, &PatchParams::apply("e2e"), &Patch::Apply(manifest))
        .await
        .unwrap_or_else(|e| panic!("applying session {ns}/{name}: {e}"));
    api
}

async fn wait_phase(
    cluster: &Cluster,
    api: &Api<TerminalSession>,
    name: &str,
    want: SessionPhase,
) -> TerminalSession {
    let what = format!("session {name} reaches {want}");
    let found = tokio::time::timeout(
        Duration::from_secs(120),
        eventually(&what, Duration::from_secs(120), || async {
            let s = api.get(name).await.map_err(|e| e.to_string())?;
            let status = s.status.clone().unwrap_or_default();
            if status.phase == Some(want) {
                Ok(s)
            } else {
                Err(serde_json::to_string(&status).unwrap_or_default())
            }
        }),
    )
    .await;
    match found {
        Ok(s) => s,
        Err(_) => panic!(
            "{what}: timed out\n{}",
            tether_e2e::namespace::dump(
                &cluster.cp.admin_client().await,
                api.namespace().unwrap_or_default()
            )
            .await
        ),
    }
}

async fn alice_terminal(cluster: &Cluster, session: &str) -> Terminal {
    let alice = cluster
        .stack
        .users
        .iter()
        .find(|u| u.user == "alice")
        .expect("alice is a development user");
    Terminal::open(
        cluster.stack.gateway_addr(),
        &cluster.stack.origin(),
        &alice.token,
        session,
        Mode::Attach,
    )
    .await
    .unwrap_or_else(|e| panic!("alice opens {session} through the gateway: {e:#}"))
}

/// `KEY=value` pairs of a result line printed by the probe commands.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the shell's output: {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_runs_in_the_sandbox_the_product_promises() {
    let cluster = Cluster::shared().await;
    let ns = tenant(cluster, "sandbox").await;
    let api = apply_session(
        cluster,
        ns.name(),
        "sandboxed",
        serde_json::json!({
            "command": ["/bin/bash"],
            "resources": {
                "requests": {"cpu": "250m", "memory": "192Mi"},
                "limits": {"cpu": "500m", "memory": "256Mi"},
            },
        }),
    )
    .await;
    wait_phase(cluster, &api, "sandboxed", SessionPhase::Ready).await;
    let mut t = alice_terminal(cluster, &format!("{}/sandboxed", ns.name())).await;
    // One line of KEY=value results, each read inside the container by the shell itself.
    let probe = concat!(
        "echo uid=$(id -u) gid=$(id -g)",
        " capeff=$(awk '/^CapEff/{print $2}' /proc/self/status)",
        " nnp=$(awk '/^NoNewPrivs/{print $2}' /proc/self/status)",
        " seccomp=$(awk '/^Seccomp:/{print $2}' /proc/self/status)",
        " rootfs=$(touch /probe 2>/dev/null && echo writable || echo readonly)",
        " home=$(touch ~/probe && echo writable || echo readonly)",
        " tmp=$(touch /tmp/probe && echo writable || echo readonly)",
        " token=$(test -e /var/run/secrets/kubernetes.io/serviceaccount/token && echo mounted || echo none)",
        " hostroot=$(test -e /work -o -e /root/.cargo && echo visible || echo hidden)",
        " mem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max)",
        " quota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max)",
        " period=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us 2>/dev/null || cut -d' ' -f2 /sys/fs/cgroup/cpu.max)",
        " tmux=$(command -v tmux)",
        " tmuxv=$(tmux -V | tr ' ' _)",
    );
    let out = t.run(probe, STEP).await.expect("the probe runs");
    assert_eq!(field(&out, "uid"), "1000", "{out}");
    assert_eq!(field(&out, "gid"), "1000", "{out}");
    assert_eq!(
        field(&out, "capeff"),
        "0000000000000000",
        "no capabilities: {out}"
    );
    assert_eq!(field(&out, "nnp"), "1", "no new privileges: {out}");
    assert_eq!(field(&out, "seccomp"), "2", "a seccomp filter: {out}");
    assert_eq!(field(&out, "rootfs"), "readonly", "{out}");
    assert_eq!(field(&out, "home"), "writable", "{out}");
    assert_eq!(field(&out, "tmp"), "writable", "{out}");
    assert_eq!(
        field(&out, "token"),
        "none",
        "no service-account token: {out}"
    );
    assert_eq!(field(&out, "hostroot"), "hidden", "the host's files: {out}");
    assert_eq!(field(&out, "mem"), (256u64 << 20).to_string(), "{out}");
    let (quota, period): (u64, u64) = (
        field(&out, "quota").parse().unwrap(),
        field(&out, "period").parse().unwrap(),
    );
    assert_eq!(quota * 1000 / period, 500, "a 500m CPU limit: {out}");
    assert_eq!(
        field(&out, "tmux"),
        "/usr/bin/tmux",
        "the image's tmux: {out}"
    );
    // The agent in this pod runs the image's tmux, 3.7 or later, under the restricted profile.
    let version = field(&out, "tmuxv").replace('_', " ");
    let (major, minor) =
        tether_e2e::tmux_version(&version).unwrap_or_else(|| panic!("tmux -V: {out}"));
    assert!((major, minor) >= (3, 7), "the session's {version}");
}

/// A pod that tries to open a TCP connection to `target` and exits 0 when it could.
fn probe_pod(name: &str, labels: serde_json::Value, target: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe",
                "image": format!("localhost/tether/tether:{}", tether_e2e::cluster::IMAGE_TAG),
                "imagePullPolicy": "Never",
                "command": ["/bin/bash", "-c", format!("timeout 3 bash -c '</dev/tcp/{}'", target.replace(':', "/"))],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                "resources": {"limits": {"cpu": "100m", "memory": "32Mi"}},
            }],
        },
    }))
    .expect("a valid pod")
}

/// Runs a probe pod to completion: `true` when it connected.
async fn probe(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    labels: serde_json::Value,
    target: &str,
) -> bool {
    let pods: Api<Pod> = Api::namespaced(cluster.cp.admin_client().await, ns);
    pods.create(&PostParams::default(), &probe_pod(name, labels, target))
        .await
        .unwrap_or_else(|e| panic!("creating probe pod {ns}/{name}: {e}"));
    let phase = eventually(
        &format!("probe pod {ns}/{name} completes"),
        Duration::from_secs(60),
        || async {
            let pod = pods.get(name).await.map_err(|e| e.to_string())?;
            match pod.status.and_then(|s| s.phase).as_deref() {
                Some(p @ ("Succeeded" | "Failed")) => Ok(p.to_string()),
                other => Err(format!("phase {other:?}")),
            }
        },
    )
    .await;
    let _ = pods.delete(name, &Default::default()).await;
    phase == "Succeeded"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_lets_only_the_gateway_reach_the_agent() {
    let cluster = Cluster::shared().await;
    let ns = tenant(cluster, "netpol").await;
    let other = cluster.cp.namespace("neighbour").await;
    let api = apply_session(cluster, ns.name(), "fenced", serde_json::json!({})).await;
    let session = wait_phase(cluster, &api, "fenced", SessionPhase::Ready).await;
    let endpoint = session
        .status
        .and_then(|s| s.endpoint)
        .expect("a Ready session has an agent endpoint");
    let target = endpoint
        .trim_start_matches("ws://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // The gateway reaches the agent: alice's terminal works through it.
    let mut t = alice_terminal(cluster, &format!("{}/fenced", ns.name())).await;
    assert_eq!(
        t.run("echo via=gateway", STEP).await.unwrap(),
        "via=gateway"
    );
    // So does a pod carrying the gateway's labels in the gateway's namespace: the probe itself
    // can succeed, so its refusals below mean something.
    // kube-router adds a new pod to the policy's allowed sources within seconds of its start,
    // so the first attempts of a fresh pod may be refused: retried until one connects.
    let mut attempt = 0;
    eventually(
        "a pod labelled as the gateway, in the gateway's namespace, reaches the agent",
        Duration::from_secs(60),
        || {
            attempt += 1;
            let name = format!("probe-as-gateway-{attempt}");
            let target = target.clone();
            async move {
                let labels = serde_json::json!({"app.kubernetes.io/name": "tether-gateway"});
                if probe(cluster, "tether-system", &name, labels, &target).await {
                    Ok(())
                } else {
                    Err(format!("{name} could not connect to {target}"))
                }
            }
        },
    )
    .await;
    // A neighbour in the session's namespace and one in another namespace are refused; policy
    // takes a moment to reach kube-router's rules after the session appears, so the refusal is
    // waited for, then must hold.
    let mut attempt = 0;
    eventually(
        "a pod in the session's own namespace is refused",
        Duration::from_secs(60),
        || {
            attempt += 1;
            let name = format!("probe-same-ns-{attempt}");
            let ns = ns.name().to_string();
            let target = target.clone();
            async move {
                if probe(
                    cluster,
                    &ns,
                    &name,
                    serde_json::json!({"app": "neighbour"}),
                    &target,
                )
                .await
                {
                    Err(format!("{name} connected to {target}"))
                } else {
                    Ok(())
                }
            }
        },
    )
    .await;
    assert!(
        !probe(
            cluster,
            other.name(),
            "probe-other-ns",
            serde_json::json!({"app": "neighbour"}),
            &target
        )
        .await,
        "a pod in another namespace reached the agent at {target}"
    );
    // Even the gateway's labels do not help outside the gateway's namespace.
    assert!(
        !probe(
            cluster,
            other.name(),
            "probe-fake-gateway",
            serde_json::json!({"app.kubernetes.io/name": "tether-gateway"}),
            &target
        )
        .await,
        "a pod dressed as the gateway in another namespace reached {target}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shell_of_the_session_image_starts_and_runs_a_command() {
    let cluster = Cluster::shared().await;
    let ns = tenant(cluster, "shells").await;
    let shells = [
        ("bash", vec!["/bin/bash", "-l"]),
        ("zsh", vec!["/bin/zsh", "-f"]),
        ("fish", vec!["/usr/bin/fish", "--no-config"]),
        ("sh", vec!["/bin/sh"]),
    ];
    for (name, command) in &shells {
        apply_session(
            cluster,
            ns.name(),
            name,
            serde_json::json!({"command": command}),
        )
        .await;
    }
    let api: Api<TerminalSession> = Api::namespaced(cluster.cp.admin_client().await, ns.name());
    for (name, _) in &shells {
        wait_phase(cluster, &api, name, SessionPhase::Ready).await;
        let mut t = alice_terminal(cluster, &format!("{}/{name}", ns.name())).await;
        // A pipeline of external programs, in syntax all four accept (fish has no `$$` and
        // rejects a whole line that uses it): the container's processes named like the shell.
        let out = t
            .run(&format!("ps -e -o comm= | grep -x -e {name}"), STEP)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(
            out.lines().any(|l| l.trim() == *name),
            "{name} is not running in the session's container: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chart_upgrade_an_operator_replacement_and_a_kubelet_restart_disturb_no_session() {
    let cluster = Cluster::shared().await;
    let ns = tenant(cluster, "ops").await;
    let api = apply_session(
        cluster,
        ns.name(),
        "steady",
        serde_json::json!({"command": ["/bin/bash"]}),
    )
    .await;
    let before = wait_phase(cluster, &api, "steady", SessionPhase::Ready).await;
    let pods: Api<Pod> = Api::namespaced(cluster.cp.admin_client().await, ns.name());
    let pod_name = before.status.as_ref().unwrap().pod_name.clone().unwrap();
    let pod_uid = pods.get(&pod_name).await.unwrap().metadata.uid;
    let session = format!("{}/steady", ns.name());
    let mut t = alice_terminal(cluster, &session).await;
    t.run("export MARK=kept-$((6*7))", STEP).await.unwrap();

    // The same pod and the same container process (never restarted, started when it was),
    // and, unless `ready_may_blip`, a session that stays Ready.
    let started = |pod: &Pod| {
        pod.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|st| st.running.as_ref())
            .and_then(|r| r.started_at.clone())
    };
    let started_at = started(&pods.get(&pod_name).await.unwrap());
    assert!(started_at.is_some(), "the session container runs");
    let check = |ready_may_blip: bool| {
        let (pods, api, pod_name, pod_uid, started_at) =
            (&pods, &api, &pod_name, &pod_uid, &started_at);
        async move {
            let pod = pods.get(pod_name).await.map_err(|e| e.to_string())?;
            let restarts: i32 = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map(|cs| cs.iter().map(|c| c.restart_count).sum())
                .unwrap_or(0);
            let now_started = started(&pod);
            let s = api.get("steady").await.map_err(|e| e.to_string())?;
            let phase = s.status.and_then(|s| s.phase);
            let phase_ok = phase == Some(SessionPhase::Ready)
                || (ready_may_blip && phase == Some(SessionPhase::Starting));
            if pod.metadata.uid != *pod_uid
                || restarts != 0
                || now_started != *started_at
                || !phase_ok
            {
                return Err(format!(
                    "pod uid {:?}, restarts {restarts}, container started {now_started:?}, phase {phase:?}",
                    pod.metadata.uid
                ));
            }
            Ok(())
        }
    };
    let unchanged = || check(false);

    // helm upgrade with a changed value: a third gateway replica.
    cluster
        .stack
        .upgrade(&["gateway.replicas=3"])
        .expect("helm upgrade");
    unchanged().await.expect("after helm upgrade");
    // The connection opened before the upgrade is still open and typing into the same shell
    // (a scale-up replaces no gateway pod), and a fresh one lands on the same shell too.
    assert_eq!(
        t.run("echo mark=$MARK", STEP)
            .await
            .expect("the connection opened before `helm upgrade` still works"),
        "mark=kept-42"
    );
    let mut fresh = alice_terminal(cluster, &session).await;
    assert_eq!(
        fresh.run("echo mark=$MARK", STEP).await.unwrap(),
        "mark=kept-42"
    );

    // Deleting the operator's pods: the Deployment replaces them; the session is not touched
    // while the new operator takes the lease and reconciles.
    cluster
        .stack
        .delete_operator_pods()
        .await
        .expect("the operator's Deployment replaces its pods");
    never_within(
        "the session changes after the operator is replaced",
        Duration::from_secs(15),
        unchanged,
    )
    .await;
    // Also keeps the connection alive: the agent closes one silent for 45 s (4002).
    assert_eq!(
        t.run("echo mark=$MARK", STEP)
            .await
            .expect("the first connection still works after the operator's replacement"),
        "mark=kept-42"
    );

    // Restarting the kubelet leaves running pods running.
    cluster
        .node()
        .await
        .restart_kubelet(&cluster.cp)
        .await
        .expect("the kubelet restarts");
    // A restarted kubelet reports a running container unready until its next readiness probe
    // (every 2 s here), as on any cluster, so the session may show Starting for a moment; the
    // pod, its container and the shell in it go on untouched, and Ready comes back.
    never_within(
        "the session's pod or container changes after the kubelet restarts",
        Duration::from_secs(15),
        || check(true),
    )
    .await;
    eventually(
        "the session is Ready again after the kubelet restart",
        Duration::from_secs(30),
        || async { unchanged().await },
    )
    .await;
    // The gateway-to-agent connection goes pod to pod, past the kubelet: it never noticed.
    assert_eq!(
        t.run("echo mark=$MARK", STEP)
            .await
            .expect("the first connection still works after the kubelet restart"),
        "mark=kept-42"
    );

    cluster
        .stack
        .upgrade(&["gateway.replicas=2"])
        .expect("helm upgrade back");
}
