//! The local node plays kubelet honestly enough for sessions: scheduled pods run as local
//! processes on their own loopback IPs, readiness comes from the probe, exit codes and
//! termination messages reach the pod status, deadlines kill, deletion stops the process.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use tether_e2e::{
    ControlPlane,
    node::{self, NodeOptions},
    wait::eventually,
};

const NODE: &str = "tether-test-node";

async fn start_node(cp: &'static ControlPlane) {
    static STARTED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    STARTED.get_or_init(|| {
        let kubeconfig = cp.user_kubeconfig(&format!("system:node:{NODE}"), &["system:nodes"]);
        let dir = cp.dir().join("local-node");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("a runtime");
            rt.block_on(async move {
                let client = tether_e2e::client_from_kubeconfig(&kubeconfig).await;
                let opts = NodeOptions {
                    name: NODE.into(),
                    dir,
                    bin_dirs: vec![],
                    ip_octet: 9,
                };
                if let Err(e) = node::run(client, opts, std::future::pending()).await {
                    eprintln!("local node stopped: {e:#}");
                }
            });
        });
    });
}

fn restricted_pod(name: &str, script: &str, extra: serde_json::Value) -> Pod {
    let mut pod = serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "containers": [{
                "name": "main", "image": "debian:bookworm",
                "command": ["/bin/sh", "-c", script],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "LISTEN", "value": "$(POD_IP):8080"},
                    {"name": "MSG", "value": "/dev/termination-log"},
                    {"name": "SCRATCH", "value": "/scratch/here"},
                ],
                "volumeMounts": [{"name": "tmp", "mountPath": "/scratch"}],
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
            }],
        }
    });
    merge(&mut pod, extra);
    serde_json::from_value(pod).expect("a valid pod")
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

async fn wait_for(pods: &Api<Pod>, name: &str, what: &str, pred: impl Fn(&Pod) -> bool) -> Pod {
    eventually(
        &format!("pod {name} gets {what}"),
        Duration::from_secs(60),
        || async {
            match pods.get_opt(name).await {
                Ok(Some(pod)) if pred(&pod) => Ok(pod),
                Ok(pod) => Err(serde_json::to_string_pretty(&pod.map(|p| p.status)).unwrap()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn pods_run_as_local_processes_with_kubelet_status() {
    let cp = ControlPlane::shared().await;
    start_node(cp).await;
    let ns = cp.namespace("node").await;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, ns.name());

    // Exit code and termination message, written through translated paths.
    let exits = restricted_pod(
        "exits",
        "echo \"scratch=$SCRATCH\" > \"$MSG\"; exit 3",
        serde_json::json!({}),
    );
    // Readiness from an HTTP probe on the pod's own loopback IP.
    let serves = restricted_pod(
        "serves",
        "exec python3 -m http.server --bind \"${LISTEN%:*}\" 8080",
        serde_json::json!({"spec": {"containers": [{
            "name": "main", "image": "debian:bookworm",
            "command": ["/bin/sh", "-c", "exec python3 -m http.server --bind \"${LISTEN%:*}\" 8080"],
            "env": [
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "LISTEN", "value": "$(POD_IP):8080"},
            ],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
        }]}}),
    );
    // Killed by its deadline.
    let overstays = restricted_pod(
        "overstays",
        "sleep 600",
        serde_json::json!({"spec": {"activeDeadlineSeconds": 2}}),
    );
    for pod in [&exits, &serves, &overstays] {
        pods.create(&PostParams::default(), pod)
            .await
            .expect("a restricted pod is admitted");
    }

    let done = wait_for(&pods, "exits", "phase Failed", |p| phase(p) == "Failed").await;
    let state = done.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .expect("a terminated state");
    assert_eq!(state.exit_code, 3);
    let message = state.message.unwrap_or_default();
    assert!(
        message.starts_with("scratch=/") && message.trim_end().ends_with("/v/tmp/here"),
        "the termination message went through the translated paths: {message:?}"
    );

    let up = wait_for(&pods, "serves", "Ready", ready).await;
    let ip = up.status.unwrap().pod_ip.unwrap();
    assert!(
        ip.starts_with("127.9."),
        "pod IP {ip} is a loopback address of its own"
    );

    let expired = wait_for(&pods, "overstays", "phase Failed", |p| phase(p) == "Failed").await;
    assert_eq!(
        expired.status.unwrap().reason.as_deref(),
        Some("DeadlineExceeded")
    );

    pods.delete("serves", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the local node removes the deleted pod",
        Duration::from_secs(30),
        || async {
            match pods.get_opt("serves").await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err("still there".to_string()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    let refused = tokio::net::TcpStream::connect((ip.as_str(), 8080))
        .await
        .is_err();
    assert!(
        refused,
        "the process of a deleted pod still listens on {ip}:8080"
    );
}
