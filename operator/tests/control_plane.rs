//! The operator against a real control plane (etcd, kube-apiserver with RBAC and Pod Security,
//! controller-manager with the garbage collector, scheduler), run as its own process under the
//! chart's ClusterRole (`charts/tether/files/operator-rules.yaml`), never as admin.
//!
//! There is no kubelet: where a test needs a running pod it binds the pod to a node and writes
//! the pod's status through `pods/status`, as a kubelet would. Every test watches its own
//! namespace with its own operator and Lease, so the tests run in parallel.
//!
//! The 1,000-session benchmark is here too, ignored by default; see operator/README.md.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, ResourceQuota},
        events::v1::Event,
        networking::v1::NetworkPolicy,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tether_api::{SessionPhase, TerminalSession, conditions as c};
use tether_e2e::ControlPlane;
use tether_e2e::wait::never_within;
use tokio::sync::OnceCell;

const OPERATOR_NAMESPACE: &str = "tether-system";
const OPERATOR_ACCOUNT: &str = "tether-operator";
const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../charts/tether/files/operator-rules.yaml"
);

/// The control plane with the CRDs installed and the operator's service account bound to the
/// chart's rules; returns the admin client and the operator's kubeconfig.
async fn setup() -> (&'static ControlPlane, Client, PathBuf) {
    static KUBECONFIG: OnceCell<PathBuf> = OnceCell::const_new();
    let cp = ControlPlane::shared().await;
    let kubeconfig = KUBECONFIG
        .get_or_init(|| async {
            cp.install_crds().await;
            let admin = cp.admin_client().await;
            let rules: Vec<PolicyRule> =
                serde_yaml_ng::from_str(&std::fs::read_to_string(RULES).expect("the chart's operator rules"))
                    .expect("operator-rules.yaml is a list of PolicyRules");
            let role: ClusterRole = serde_json::from_value(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": "tether-operator"}, "rules": rules,
            }))
            .unwrap();
            let pp = PatchParams::apply("tether-e2e").force();
            Api::<ClusterRole>::all(admin.clone())
                .patch("tether-operator", &pp, &Patch::Apply(&role))
                .await
                .expect("creating the operator's ClusterRole");
            let binding: ClusterRoleBinding = serde_json::from_value(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "tether-operator"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tether-operator"},
                "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE}],
            }))
            .unwrap();
            Api::<ClusterRoleBinding>::all(admin)
                .patch("tether-operator", &pp, &Patch::Apply(&binding))
                .await
                .expect("binding the operator's ClusterRole");
            cp.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT).await
        })
        .await
        .clone();
    (cp, cp.admin_client().await, kubeconfig)
}

/// A `tether-operator` process. Killed when dropped; its log is printed if the test failed.
struct Operator {
    child: Child,
    port: u16,
    log: PathBuf,
    identity: String,
}

impl Operator {
    fn start(
        cp: &ControlPlane,
        kubeconfig: &Path,
        namespace: &str,
        lease: &str,
        identity: &str,
    ) -> Self {
        let key = cp.dir().join("ticket-public-key.pem");
        if !key.exists() {
            std::fs::write(
                &key,
                "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n",
            )
            .unwrap();
        }
        let port = tether_e2e::free_port().expect("a free port");
        let log = cp.dir().join(format!("operator-{identity}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether-operator"));
        cmd.env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                "info,tether_operator=debug,kube_lease_manager=info",
            )
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .args(["--ticket-public-key-file", key.to_str().unwrap()])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--watch-namespace", namespace])
            .args([
                "--lease-name",
                lease,
                "--lease-namespace",
                OPERATOR_NAMESPACE,
            ])
            .args(["--leader-identity", identity])
            // Short, so takeovers are quick; with 2 s of grace a renewal has 1.5 s to be seen by the
            // leader's watchdog, which steps down 0.5 s before expiry.
            .args([
                "--lease-duration-seconds",
                "6",
                "--lease-grace-seconds",
                "2",
            ])
            .args(["--session-image", "tether-session:e2e"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        tether_e2e::process::die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("starting tether-operator");
        Self {
            child,
            port,
            log,
            identity: identity.into(),
        }
    }

    async fn get(&self, path: &str) -> Option<String> {
        http_get(self.port, path).await
    }

    /// The value of one metric sample, 0 when absent.
    async fn metric(&self, sample: &str) -> f64 {
        let text = self.get("/metrics").await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Waits for the process to exit; its exit code.
    async fn exited(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<_> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// CPU seconds (user + system) and peak RSS in MiB, from /proc.
    fn usage(&self) -> (f64, f64) {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map(|(_, r)| r.split(' ').collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let hz = 100.0; // USER_HZ on Linux
        let cpu = (ticks(11) + ticks(12)) / hz;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        (cpu, hwm_kib / 1024.0)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "==== log of operator {} ====\n{}",
                self.identity,
                self.log_tail(60)
            );
        }
    }
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// [`tether_e2e::wait::eventually`] for checks that answer `Some` once they hold.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    tether_e2e::wait::eventually(what, timeout, || {
        let pending = check();
        async move { pending.await.ok_or_else(|| "not yet".to_string()) }
    })
    .await
}

fn session(name: &str, spec: serde_json::Value) -> TerminalSession {
    serde_json::from_value(json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "TerminalSession",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

async fn status_of(
    api: &Api<TerminalSession>,
    name: &str,
) -> Option<tether_api::TerminalSessionStatus> {
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.status)
}

async fn phase_is(
    api: &Api<TerminalSession>,
    name: &str,
    phase: SessionPhase,
) -> Option<tether_api::TerminalSessionStatus> {
    status_of(api, name)
        .await
        .filter(|s| s.phase == Some(phase))
}

fn now() -> String {
    Timestamp::from_second(Timestamp::now().as_second())
        .unwrap()
        .to_string()
}

/// Plays the kubelet: binds the pod to a node and reports its agent running and ready.
async fn kubelet_runs(admin: &Client, namespace: &str, pod: &str, ip: &str) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace);
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-1"},
    });
    pods.create_subresource::<_, serde_json::Value>(
        "binding",
        pod,
        &PostParams::default(),
        &binding,
    )
    .await
    .expect("binding the pod");
    let image = pods.get(pod).await.unwrap().spec.unwrap().containers[0]
        .image
        .clone();
    let t = now();
    let cond = |type_: &str| json!({"type": type_, "status": "True", "lastTransitionTime": t});
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1", "startTime": t,
        "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
        "containerStatuses": [{"name": "session", "image": image, "imageID": "", "ready": true, "restartCount": 0, "started": true,
            "state": {"running": {"startedAt": t}}}],
    }});
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("writing the pod status");
}

/// Plays the kubelet: the agent exited and wrote `message` as its termination message.
async fn kubelet_reports_exit(
    admin: &Client,
    namespace: &str,
    pod: &str,
    message: &str,
    code: i32,
) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace);
    let image = pods.get(pod).await.unwrap().spec.unwrap().containers[0]
        .image
        .clone();
    let t = now();
    let status = json!({"status": {
        "phase": if code == 0 { "Succeeded" } else { "Failed" },
        "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": t}],
        "containerStatuses": [{"name": "session", "image": image, "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                "message": message, "startedAt": t, "finishedAt": t}}}],
    }});
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("writing the pod status");
}

/// Plays the kubelet's part of a graceful delete: once the pod is terminating, remove it.
async fn kubelet_finishes_deletion(admin: &Client, namespace: &str, pod: &str) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace);
    // The garbage collector notices a new CRD's objects at its next discovery sync (30 s).
    eventually(
        &format!("pod {pod} to be terminating or gone"),
        Duration::from_secs(90),
        || async {
            match pods.get_opt(pod).await.unwrap() {
                None => Some(()),
                Some(p) if p.metadata.deletion_timestamp.is_some() => {
                    let _ = pods
                        .delete(
                            pod,
                            &DeleteParams {
                                grace_period_seconds: Some(0),
                                ..Default::default()
                            },
                        )
                        .await;
                    Some(())
                }
                Some(_) => None,
            }
        },
    )
    .await;
}

async fn events_for(admin: &Client, namespace: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(admin.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

#[tokio::test]
async fn a_session_becomes_an_admitted_owned_pod_then_ready_and_its_pod_goes_with_it() {
    let (cp, admin, kubeconfig) = setup().await;
    let ns = cp.namespace("op-life").await;
    let op = Operator::start(cp, &kubeconfig, ns.name(), "life", "life-0");
    let sessions: Api<TerminalSession> = Api::namespaced(admin.clone(), ns.name());
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());

    let created = sessions
        .create(
            &PostParams::default(),
            &session(
                "dev",
                json!({"command": ["/bin/sh"], "idleTimeoutSeconds": 300}),
            ),
        )
        .await
        .unwrap();

    // The pod passed Pod Security `restricted` admission (the namespace enforces it) and is owned.
    let status = eventually("a pod name in status", Duration::from_secs(30), || async {
        status_of(&sessions, "dev")
            .await
            .filter(|s| s.pod_name.is_some())
    })
    .await;
    assert_eq!(status.phase, Some(SessionPhase::Pending), "{status:?}");
    assert!(status.endpoint.is_none());
    let pod_name = status.pod_name.unwrap();
    let pod = pods.get(&pod_name).await.expect("the pod in status exists");
    let owner = &pod.owner_references()[0];
    assert_eq!(
        (owner.uid.as_str(), owner.controller),
        (created.uid().unwrap().as_str(), Some(true))
    );
    assert_eq!(
        pod.spec.as_ref().unwrap().automount_service_account_token,
        Some(false)
    );
    let policy = Api::<NetworkPolicy>::namespaced(admin.clone(), ns.name())
        .get("tether-sessions")
        .await;
    assert!(policy.is_ok(), "the namespace's network policy exists");

    // The kubelet reports the agent ready: so does the session, with the endpoint.
    kubelet_runs(&admin, ns.name(), &pod_name, "10.244.0.5").await;
    let ready = eventually("phase Ready", Duration::from_secs(30), || {
        phase_is(&sessions, "dev", SessionPhase::Ready)
    })
    .await;
    assert_eq!(ready.endpoint.as_deref(), Some("10.244.0.5:7681"));
    assert!(ready.ready_time.is_some() && ready.start_time.is_some());
    let cond = ready
        .conditions
        .iter()
        .find(|c| c.type_ == c::READY)
        .unwrap();
    assert_eq!(cond.status, "True");
    let reasons: BTreeSet<String> = events_for(&admin, ns.name(), "dev")
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.contains(c::REASON_POD_CREATED) && reasons.contains(c::REASON_AGENT_READY),
        "{reasons:?}"
    );

    // Nothing changes, so nothing happens: no hot loop on our own writes.
    let before = op.metric("tether_operator_reconciliations_total").await;
    never_within(
        "more than one reconciliation of an unchanged session",
        Duration::from_secs(3),
        || async {
            let after = op.metric("tether_operator_reconciliations_total").await;
            if after - before > 1.0 {
                return Err(format!("{} reconciliations", after - before));
            }
            Ok(())
        },
    )
    .await;

    // Honest metrics, and not one permission missing under the chart's role.
    eventually(
        "the Ready session counted",
        Duration::from_secs(10),
        || async {
            (op.metric("tether_operator_sessions{phase=\"Ready\"}").await == 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        op.metric("tether_operator_session_time_to_ready_seconds_count")
            .await,
        1.0
    );
    assert_eq!(
        op.metric("tether_operator_reconcile_errors_total{reason=\"Forbidden\"}")
            .await,
        0.0
    );

    // Deleting the session deletes its pod through the owner reference.
    sessions
        .delete("dev", &DeleteParams::default())
        .await
        .unwrap();
    kubelet_finishes_deletion(&admin, ns.name(), &pod_name).await;
    eventually(
        "the pod garbage-collected",
        Duration::from_secs(30),
        || async {
            pods.get_opt(&pod_name)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_pod_the_quota_refuses_shows_in_status_and_is_retried_without_a_hot_loop() {
    let (cp, admin, kubeconfig) = setup().await;
    let ns = cp.namespace("op-quota").await;
    let quotas: Api<ResourceQuota> = Api::namespaced(admin.clone(), ns.name());
    let quota: ResourceQuota = serde_json::from_value(
        json!({"metadata": {"name": "sessions"}, "spec": {"hard": {"pods": "0"}}}),
    )
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    eventually(
        "the quota to be counted",
        Duration::from_secs(30),
        || async {
            quotas
                .get("sessions")
                .await
                .unwrap()
                .status
                .and_then(|s| s.hard)
                .map(|_| ())
        },
    )
    .await;
    let op = Operator::start(cp, &kubeconfig, ns.name(), "quota", "quota-0");
    let sessions: Api<TerminalSession> = Api::namespaced(admin.clone(), ns.name());
    sessions
        .create(&PostParams::default(), &session("dev", json!({})))
        .await
        .unwrap();

    let status = eventually("status PodRejected", Duration::from_secs(30), || async {
        status_of(&sessions, "dev")
            .await
            .filter(|s| s.reason.as_deref() == Some(c::REASON_POD_REJECTED))
    })
    .await;
    assert_eq!(status.phase, Some(SessionPhase::Pending));
    let message = status.message.unwrap();
    assert!(message.contains("exceeded quota"), "{message}");
    let created = status
        .conditions
        .iter()
        .find(|c| c.type_ == c::POD_CREATED)
        .unwrap();
    assert_eq!(
        (created.status.as_str(), created.reason.as_str()),
        ("False", "Forbidden")
    );
    let warnings: Vec<_> = events_for(&admin, ns.name(), "dev")
        .await
        .into_iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some(c::REASON_POD_REJECTED)
        })
        .collect();
    assert!(
        !warnings.is_empty(),
        "a Warning event says the pod was refused"
    );

    // No hot loop: over 8 s, the backoff (5 s, then 10 s) allows at most three attempts.
    never_within(
        "more than three refused attempts (a hot loop)",
        Duration::from_secs(8),
        || async {
            let attempts = op
                .metric("tether_operator_reconcile_errors_total{reason=\"PodRejected\"}")
                .await;
            if attempts > 3.0 {
                return Err(format!("{attempts} refused attempts"));
            }
            Ok(())
        },
    )
    .await;
    let attempts = op
        .metric("tether_operator_reconcile_errors_total{reason=\"PodRejected\"}")
        .await;
    assert!(attempts >= 1.0, "{attempts} refused attempts in 8 s");

    // Room in the quota: the next retry creates the pod.
    quotas
        .patch(
            "sessions",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hard": {"pods": "5"}}})),
        )
        .await
        .unwrap();
    let status = eventually(
        "the pod created after the quota grew",
        Duration::from_secs(45),
        || async {
            status_of(&sessions, "dev")
                .await
                .filter(|s| s.pod_name.is_some())
        },
    )
    .await;
    assert_ne!(status.reason.as_deref(), Some(c::REASON_POD_REJECTED));
}

#[tokio::test]
async fn agent_exits_finish_sessions_honestly_and_free_their_pods() {
    let (cp, admin, kubeconfig) = setup().await;
    let ns = cp.namespace("op-exit").await;
    let _op = Operator::start(cp, &kubeconfig, ns.name(), "exit", "exit-0");
    let sessions: Api<TerminalSession> = Api::namespaced(admin.clone(), ns.name());
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
    let cases = [
        (
            "shell",
            r#"{"reason":"ShellExited","exitCode":7,"message":"exit 7"}"#,
            0,
            SessionPhase::Succeeded,
            c::REASON_SHELL_EXITED,
        ),
        (
            "idle",
            r#"{"reason":"IdleTimeout","exitCode":0,"message":"idle"}"#,
            0,
            SessionPhase::Expired,
            c::REASON_IDLE_TIMEOUT,
        ),
        ("crash", "", 2, SessionPhase::Failed, c::REASON_AGENT_FAILED),
    ];
    for (name, ..) in &cases {
        sessions
            .create(
                &PostParams::default(),
                &session(name, json!({"ttlSecondsAfterFinished": 3})),
            )
            .await
            .unwrap();
    }
    for (i, (name, message, code, phase, reason)) in cases.iter().enumerate() {
        let pod = eventually("a pod", Duration::from_secs(30), || async {
            status_of(&sessions, name).await.and_then(|s| s.pod_name)
        })
        .await;
        kubelet_runs(&admin, ns.name(), &pod, &format!("10.244.1.{}", i + 1)).await;
        eventually("Ready", Duration::from_secs(30), || {
            phase_is(&sessions, name, SessionPhase::Ready)
        })
        .await;
        kubelet_reports_exit(&admin, ns.name(), &pod, message, *code).await;
        let st = eventually(&format!("{name} {phase}"), Duration::from_secs(30), || {
            phase_is(&sessions, name, *phase)
        })
        .await;
        assert_eq!(st.reason.as_deref(), Some(*reason), "{st:?}");
        assert!(st.endpoint.is_none() && st.finish_time.is_some());
        if *name == "shell" {
            assert_eq!(st.exit_code, Some(7));
        }
        // A finished session's pod is deleted to free the node.
        kubelet_finishes_deletion(&admin, ns.name(), &pod).await;
        eventually("the pod gone", Duration::from_secs(30), || async {
            pods.get_opt(&pod).await.unwrap().is_none().then_some(())
        })
        .await;
    }
    // The maximum lifetime is the pod's activeDeadlineSeconds; the kubelet fails the pod with
    // reason DeadlineExceeded when it passes.
    sessions
        .create(
            &PostParams::default(),
            &session(
                "old",
                json!({"maxLifetimeSeconds": 10, "ttlSecondsAfterFinished": 3}),
            ),
        )
        .await
        .unwrap();
    let pod = eventually("a pod", Duration::from_secs(30), || async {
        status_of(&sessions, "old").await.and_then(|s| s.pod_name)
    })
    .await;
    assert_eq!(
        pods.get(&pod)
            .await
            .unwrap()
            .spec
            .unwrap()
            .active_deadline_seconds,
        Some(10)
    );
    kubelet_runs(&admin, ns.name(), &pod, "10.244.1.9").await;
    eventually("Ready", Duration::from_secs(30), || {
        phase_is(&sessions, "old", SessionPhase::Ready)
    })
    .await;
    let deadline = json!({"status": {"phase": "Failed", "reason": "DeadlineExceeded",
        "message": "Pod was active on the node longer than the specified deadline",
        "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now()}]}});
    pods.patch_status(&pod, &PatchParams::default(), &Patch::Merge(&deadline))
        .await
        .unwrap();
    let st = eventually("old Expired", Duration::from_secs(30), || {
        phase_is(&sessions, "old", SessionPhase::Expired)
    })
    .await;
    assert_eq!(st.reason.as_deref(), Some(c::REASON_MAX_LIFETIME_EXCEEDED));
    kubelet_finishes_deletion(&admin, ns.name(), &pod).await;

    // ttlSecondsAfterFinished removes the finished sessions themselves.
    eventually(
        "finished sessions removed by their TTL",
        Duration::from_secs(30),
        || async {
            sessions
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_pod_deleted_under_a_ready_session_fails_it_and_is_not_recreated() {
    let (cp, admin, kubeconfig) = setup().await;
    let ns = cp.namespace("op-gone").await;
    let _op = Operator::start(cp, &kubeconfig, ns.name(), "gone", "gone-0");
    let sessions: Api<TerminalSession> = Api::namespaced(admin.clone(), ns.name());
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
    sessions
        .create(&PostParams::default(), &session("dev", json!({})))
        .await
        .unwrap();
    let pod = eventually("a pod", Duration::from_secs(30), || async {
        status_of(&sessions, "dev").await.and_then(|s| s.pod_name)
    })
    .await;
    kubelet_runs(&admin, ns.name(), &pod, "10.244.2.1").await;
    eventually("Ready", Duration::from_secs(30), || {
        phase_is(&sessions, "dev", SessionPhase::Ready)
    })
    .await;

    pods.delete(
        &pod,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let st = eventually("Failed", Duration::from_secs(30), || {
        phase_is(&sessions, "dev", SessionPhase::Failed)
    })
    .await;
    assert_eq!(st.reason.as_deref(), Some(c::REASON_POD_DELETED));
    assert!(st.endpoint.is_none());
    let ready = st.conditions.iter().find(|c| c.type_ == c::READY).unwrap();
    assert_eq!(ready.status, "False");
    never_within(
        "the operator recreates the deleted session's pod",
        Duration::from_secs(3),
        || async {
            let left = pods
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items;
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{} pods", left.len()))
            }
        },
    )
    .await;
}

#[tokio::test]
async fn of_two_replicas_only_the_leader_writes_and_the_other_takes_over() {
    let (cp, admin, kubeconfig) = setup().await;
    let ns = cp.namespace("op-leader").await;
    let mut first = Operator::start(cp, &kubeconfig, ns.name(), "leader", "replica-a");
    let leader_gauge = |op: &Operator| {
        let port = op.port;
        async move {
            let text = http_get(port, "/metrics").await.unwrap_or_default();
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("tether_operator_leader ")
                        .and_then(|v| v.trim().parse::<f64>().ok())
                })
                .unwrap_or(0.0)
        }
    };
    eventually("replica-a to lead", Duration::from_secs(30), || async {
        (leader_gauge(&first).await == 1.0).then_some(())
    })
    .await;
    let second = Operator::start(cp, &kubeconfig, ns.name(), "leader", "replica-b");
    eventually("replica-b to serve", Duration::from_secs(30), || async {
        second.get("/readyz").await.filter(|r| r.contains(" 200 "))
    })
    .await;

    let sessions: Api<TerminalSession> = Api::namespaced(admin.clone(), ns.name());
    for i in 0..5 {
        sessions
            .create(
                &PostParams::default(),
                &session(&format!("s{i}"), json!({})),
            )
            .await
            .unwrap();
    }
    for i in 0..5 {
        eventually("a pod", Duration::from_secs(30), || async {
            status_of(&sessions, &format!("s{i}"))
                .await
                .and_then(|s| s.pod_name)
        })
        .await;
    }
    assert_eq!(
        second.metric("tether_operator_reconciliations_total").await,
        0.0,
        "the standby reconciled"
    );
    assert_eq!(leader_gauge(&second).await, 0.0);
    let reporters: BTreeSet<String> = Api::<Event>::namespaced(admin.clone(), ns.name())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("tether-operator"))
        .filter_map(|e| e.reporting_instance)
        .collect();
    assert_eq!(
        reporters,
        BTreeSet::from(["replica-a".to_string()]),
        "only the leader wrote events"
    );

    // The leader stops gracefully and releases the lease: the standby takes over at once.
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        first.exited(Duration::from_secs(20)).await,
        Some(0),
        "graceful shutdown exits 0"
    );
    eventually("replica-b to lead", Duration::from_secs(20), || async {
        (leader_gauge(&second).await == 1.0).then_some(())
    })
    .await;
    sessions
        .create(&PostParams::default(), &session("after", json!({})))
        .await
        .unwrap();
    eventually(
        "the new leader to create a pod",
        Duration::from_secs(30),
        || async { status_of(&sessions, "after").await.and_then(|s| s.pod_name) },
    )
    .await;
    let after: BTreeSet<String> = events_for(&admin, ns.name(), "after")
        .await
        .into_iter()
        .filter_map(|e| e.reporting_instance)
        .collect();
    assert_eq!(after, BTreeSet::from(["replica-b".to_string()]));
}

#[tokio::test]
async fn a_leader_whose_lease_is_taken_stops_acting_and_exits() {
    let (cp, admin, kubeconfig) = setup().await;
    let ns = cp.namespace("op-usurp").await;
    let mut op = Operator::start(cp, &kubeconfig, ns.name(), "usurp", "usurp-a");
    eventually("usurp-a to lead", Duration::from_secs(30), || async {
        (op.metric("tether_operator_leader").await == 1.0).then_some(())
    })
    .await;
    // Another replica took the lease (say, across a partition): this one must stop at once.
    let micro = now().replace('Z', ".000000Z");
    let lease = json!({"spec": {"holderIdentity": "usurper", "renewTime": micro, "acquireTime": micro, "leaseDurationSeconds": 60}});
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(admin.clone(), OPERATOR_NAMESPACE)
        .patch("usurp", &PatchParams::default(), &Patch::Merge(&lease))
        .await
        .unwrap();
    assert_eq!(
        op.exited(Duration::from_secs(30)).await,
        Some(1),
        "a deposed leader exits 1"
    );
    let sessions: Api<TerminalSession> = Api::namespaced(admin.clone(), ns.name());
    sessions
        .create(&PostParams::default(), &session("dev", json!({})))
        .await
        .unwrap();
    never_within(
        "somebody acts without the lease",
        Duration::from_secs(3),
        || async {
            match status_of(&sessions, "dev").await {
                None => Ok(()),
                Some(st) => Err(format!("the session got a status: {st:?}")),
            }
        },
    )
    .await;
}

/// A TCP relay to the API server that the test can cut like a network partition: after the cut
/// it forwards nothing and answers nothing, but keeps every socket open (a black hole, not a
/// reset, so clients only learn from their own timeouts).
struct Relay {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let open = !*rx.borrow();
                    if open && let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                            _ = rx.wait_for(|cut| *cut) => {}
                        }
                        // Hold both ends open, silently.
                        std::future::pending::<()>().await;
                    }
                    std::future::pending::<()>().await;
                    drop(inbound);
                });
            }
        });
        Self { port, cut }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_steps_down_before_its_lease_can_expire() {
    let (cp, admin, kubeconfig) = setup().await;
    let ns = cp.namespace("op-partition").await;
    let server = cp.server().trim_start_matches("https://").to_string();
    let relay = Relay::start(server.parse().expect("the API server is at an IP:port")).await;
    let through_relay = cp.dir().join("operator-via-relay.kubeconfig");
    std::fs::write(
        &through_relay,
        std::fs::read_to_string(&kubeconfig)
            .unwrap()
            .replace(cp.server(), &format!("https://127.0.0.1:{}", relay.port)),
    )
    .unwrap();
    let mut op = Operator::start(cp, &through_relay, ns.name(), "partition", "partition-a");
    eventually("partition-a to lead", Duration::from_secs(30), || async {
        (op.metric("tether_operator_leader").await == 1.0).then_some(())
    })
    .await;
    // Let it renew at least once through the relay, then cut it off.
    tokio::time::sleep(Duration::from_secs(5)).await;
    relay.cut();
    let code = op.exited(Duration::from_secs(30)).await;
    let stopped_at = std::time::SystemTime::now();
    assert_eq!(code, Some(1), "a leader that cannot renew exits 1");
    assert!(
        op.log_tail(40).contains("stepping down"),
        "the log says why:\n{}",
        op.log_tail(40)
    );
    // It stopped before the lease it last renewed could expire, so no standby could have taken
    // over while it still acted.
    let lease =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(admin, OPERATOR_NAMESPACE)
            .get("partition")
            .await
            .unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("partition-a"));
    let expiry = std::time::SystemTime::from(spec.renew_time.unwrap().0)
        + Duration::from_secs(spec.lease_duration_seconds.unwrap() as u64);
    assert!(
        stopped_at < expiry,
        "stopped {:?} after the lease expired",
        stopped_at.duration_since(expiry).unwrap_or_default()
    );
}

/// Creates and deletes sessions in rounds, SIGKILLing and restarting the operator between
/// rounds, then checks the world converged: every live session has exactly one pod, owned by
/// it and named in its status, and no pod belongs to a deleted session.
async fn churn(total: usize, restarts: usize, prefix: &str) -> (Duration, Vec<String>) {
    let (cp, admin, kubeconfig) = setup().await;
    let ns = cp.namespace(prefix).await;
    let sessions: Api<TerminalSession> = Api::namespaced(admin.clone(), ns.name());
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
    // One identity across restarts, as a restarted container keeps its pod's name.
    let mut op = Operator::start(cp, &kubeconfig, ns.name(), prefix, &format!("{prefix}-op"));
    let per_round = total.div_ceil(restarts + 1);
    let mut live: Vec<String> = Vec::new();
    let mut n = 0;
    let started = Instant::now();
    for round in 0..=restarts {
        for _ in 0..per_round.min(total - n) {
            let name = format!("s{n:04}");
            sessions
                .create(&PostParams::default(), &session(&name, json!({})))
                .await
                .unwrap();
            live.push(name);
            n += 1;
        }
        // Delete every third live session, some of them before the operator saw them.
        let doomed: Vec<String> = live.iter().step_by(3).cloned().collect();
        for name in &doomed {
            sessions
                .delete(name, &DeleteParams::background())
                .await
                .unwrap();
        }
        live.retain(|l| !doomed.contains(l));
        if round < restarts {
            tokio::time::sleep(Duration::from_millis(300 + 150 * round as u64)).await;
            op.signal(nix::sys::signal::Signal::SIGKILL);
            op.exited(Duration::from_secs(10))
                .await
                .expect("the operator dies on SIGKILL");
            drop(op);
            op = Operator::start(cp, &kubeconfig, ns.name(), prefix, &format!("{prefix}-op"));
        }
    }
    let live_set: BTreeSet<String> = live.iter().cloned().collect();
    eventually(
        "the world to converge",
        Duration::from_secs(120),
        || async {
            let all = sessions.list(&ListParams::default()).await.unwrap().items;
            let uids: BTreeMap<String, TerminalSession> =
                all.into_iter().map(|s| (s.uid().unwrap(), s)).collect();
            let names: BTreeSet<String> = uids.values().map(|s| s.name_any()).collect();
            if names != live_set {
                return None;
            }
            let pod_list = pods.list(&ListParams::default()).await.unwrap().items;
            let mut per_owner: BTreeMap<String, usize> = BTreeMap::new();
            for p in &pod_list {
                let owner = p
                    .owner_references()
                    .first()
                    .map(|o| o.uid.clone())
                    .unwrap_or_default();
                if !uids.contains_key(&owner) {
                    return None; // orphan, not collected yet
                }
                *per_owner.entry(owner).or_default() += 1;
            }
            let converged = uids.iter().all(|(uid, s)| {
                per_owner.get(uid) == Some(&1)
                    && s.status
                        .as_ref()
                        .and_then(|st| st.pod_name.as_ref())
                        .is_some_and(|p| pod_list.iter().any(|x| &x.name_any() == p))
            });
            assert!(
                per_owner.values().all(|&k| k <= 1),
                "a session with two pods: {per_owner:?}"
            );
            converged.then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    drop(op);
    (took, live)
}

#[tokio::test]
async fn churn_of_200_sessions_through_5_operator_kills_converges_without_orphans_or_duplicates() {
    let (took, live) = churn(200, 5, "op-churn").await;
    eprintln!(
        "churn: 200 sessions, 5 kills, {} live at the end, converged in {took:.1?}",
        live.len()
    );
}

/// The benchmark: 1,000 sessions created at once; prints time until every pod exists,
/// per-session latency (creation sent → pod seen) p50/p99, operator CPU seconds and peak RSS.
/// `cargo test -p tether-operator --test control_plane -- --ignored --nocapture bench_1000`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark, not a test: run it on purpose"]
async fn bench_1000_sessions_created_at_once() {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    const N: usize = 1000;
    let (cp, admin, kubeconfig) = setup().await;
    let ns = cp.namespace("op-bench").await;
    let op = Operator::start(cp, &kubeconfig, ns.name(), "bench", "bench-0");
    eventually("the operator to lead", Duration::from_secs(30), || async {
        (op.metric("tether_operator_leader").await == 1.0).then_some(())
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns.name());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watch = tokio::spawn(async move {
        let mut stream = watcher(pods, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(p)) = stream.next().await {
            if tx
                .send((
                    p.labels()
                        .get("tether.dev/session")
                        .cloned()
                        .unwrap_or_default(),
                    Instant::now(),
                ))
                .is_err()
            {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sessions: Api<TerminalSession> = Api::namespaced(admin.clone(), ns.name());
    let (cpu0, _) = op.usage();
    let start = Instant::now();
    let sent: BTreeMap<String, Instant> = futures::stream::iter(0..N)
        .map(|i| {
            let sessions = sessions.clone();
            async move {
                let name = format!("b{i:04}");
                sessions
                    .create(&PostParams::default(), &session(&name, json!({})))
                    .await
                    .unwrap();
                (name, Instant::now())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let created = start.elapsed();
    let mut seen: BTreeMap<String, Instant> = BTreeMap::new();
    while seen.len() < N {
        let (name, at) = tokio::time::timeout(Duration::from_secs(300), rx.recv())
            .await
            .expect("pods keep coming")
            .unwrap();
        seen.entry(name).or_insert(at);
    }
    let all_pods = start.elapsed();
    watch.abort();
    let mut lat: Vec<f64> = sent
        .iter()
        .map(|(n, t)| seen[n].saturating_duration_since(*t).as_secs_f64())
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    let (cpu1, rss) = op.usage();
    println!("bench: {N} sessions created by the client in {created:.2?}");
    println!("bench: every pod exists {all_pods:.2?} after the first create");
    println!(
        "bench: per-session latency (create sent -> pod seen): p50 {:.3}s p99 {:.3}s max {:.3}s",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "bench: operator CPU {:.2}s during the run, peak RSS {rss:.1} MiB",
        cpu1 - cpu0
    );
}
