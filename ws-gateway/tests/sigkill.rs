//! On the real control plane: a gateway process killed with SIGKILL during attaches leaves no
//! attach without an end record. Its ledger (a ConfigMap per pod) is closed by another gateway
//! (its pod is gone) or by its own next start (a container restart), exactly once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures::SinkExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tether_api::TerminalSession;
use tether_gateway::server::bearer_protocol;
use tether_protocol::{ClientFrame, SUBPROTOCOL, Size};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Gateway {
    child: Child,
    port: u16,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_gateway(dir: &Path, kubeconfig: &Path, namespace: &str, pod: &str) -> Gateway {
    let port = tether_e2e::free_port().unwrap();
    let log = std::fs::File::create(dir.join(format!("gateway-{pod}-{port}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--admin-listen=127.0.0.1:0")
        .arg(format!(
            "--ticket-signing-key-file={}",
            dir.join("ticket.pem").display()
        ))
        .arg(format!("--dev-token-file={}", dir.join("tokens").display()))
        .arg(format!("--allowed-origin={ORIGIN}"))
        .arg(format!("--audit-log={}", dir.join("audit.jsonl").display()))
        .arg("--session-store=memory")
        .arg(format!("--session-namespace={namespace}"))
        .arg("--handshake-rate=1000")
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", pod)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Gateway { child, port }
}

async fn ready(gw: &Gateway, namespace: &str) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], gw.port));
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
                drop(s);
                // Ready, and the index has the Ready session.
                if http_to(addr, "GET", "/readyz", &[], "").await.0 == 200 {
                    let (status, _, _) = http_to(
                        addr,
                        "GET",
                        &format!("/api/sessions/{namespace}/{SESSION}?mode=attach"),
                        &[("Authorization", &format!("Bearer {ALICE}"))],
                        "",
                    )
                    .await;
                    if status == 200 {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the gateway is ready");
}

async fn attach(gw: &Gateway, namespace: &str) -> Ws {
    let mut req = format!("ws://127.0.0.1:{}/ws/{namespace}/{SESSION}", gw.port)
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert(
        "sec-websocket-protocol",
        format!("{SUBPROTOCOL}, {}", bearer_protocol(ALICE))
            .parse()
            .unwrap(),
    );
    h.insert("origin", ORIGIN.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    ws.send(Message::binary(
        ClientFrame::Open {
            size: Size::default(),
        }
        .encode(),
    ))
    .await
    .unwrap();
    ws
}

fn audit(dir: &Path, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["event"] == event)
        .collect()
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

#[tokio::test]
async fn a_gateway_killed_during_attaches_leaves_exactly_one_end_per_start() {
    let cp = tether_e2e::ControlPlane::shared().await;
    cp.install_crds().await;
    let admin = cp.admin_client().await;
    let ns = cp.namespace("gwkill").await;
    let n = ns.name().to_owned();

    // alice (group devs) may attach in the namespace.
    let apply = PatchParams::apply("tether-gateway-test").force();
    Api::<Role>::namespaced(admin.clone(), &n)
        .patch("attacher", &apply, &Patch::Apply(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "attacher"},
            "rules": [{"apiGroups": ["tether.dev"], "resources": ["terminalsessions"], "verbs": ["get", "list", "attach", "observe"]}],
        })))
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &n)
        .patch("devs", &apply, &Patch::Apply(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "devs"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "attacher"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "devs"}],
        })))
        .await
        .unwrap();

    let dir = tempfile::Builder::new()
        .prefix("tether-gw-kill")
        .tempdir()
        .unwrap();
    let (private, public) = tether_protocol::ticket::generate_keypair();
    std::fs::write(dir.path().join("ticket.pem"), &private).unwrap();
    std::fs::write(dir.path().join("tokens"), format!("{ALICE},alice,devs\n")).unwrap();

    // The session, its status pointing at a test backend in this process.
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let verifier = std::sync::Arc::new(
        tether_protocol::ticket::Verifier::new(&public, &format!("{n}/{SESSION}"), &uid).unwrap(),
    );
    tokio::spawn(tether_gateway::test_backend::serve(
        listener,
        verifier,
        Default::default(),
    ));
    sessions
        .patch_status(
            SESSION,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Ready", "endpoint": backend.to_string(), "message": "ready",
                "conditions": [{"type": "Ready", "status": "True", "reason": "AgentReady", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            }})),
        )
        .await
        .unwrap();

    let kubeconfig: PathBuf = cp.admin_kubeconfig().to_path_buf();
    let d = dir.path();

    // Gateway "a": three attaches, one ends normally, then SIGKILL.
    let mut a = start_gateway(d, &kubeconfig, &n, "gw-a");
    ready(&a, &n).await;
    let mut open_a = Vec::new();
    for _ in 0..3 {
        open_a.push(attach(&a, &n).await);
    }
    // An upgrade answers before the gateway has written its attach record (the ledger's
    // ConfigMap comes first, and no byte is proxied until both are written): wait for them.
    until("three attach records", || audit(d, "attach").len() == 3).await;
    let mut first = open_a.remove(0);
    first.close(None).await.unwrap();
    until("one end record", || audit(d, "detach").len() == 1).await;
    a.child.kill().unwrap(); // SIGKILL
    a.child.wait().unwrap();
    assert_eq!(audit(d, "attach").len(), 3);
    assert_eq!(
        audit(d, "detach").len(),
        1,
        "killed: its open attaches wrote nothing"
    );

    // Gateway "b", another pod: "a" is no Pod in the API server, so its ledger is an orphan.
    let mut b = start_gateway(d, &kubeconfig, &n, "gw-b");
    ready(&b, &n).await;
    until("the killed gateway's attaches are closed", || {
        audit(d, "detach").len() == 3
    })
    .await;
    // b's own attach, then b is killed too and starts again (a container restart: same pod).
    let _open_b = attach(&b, &n).await;
    until("b's attach is recorded", || audit(d, "attach").len() == 4).await;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let b2 = start_gateway(d, &kubeconfig, &n, "gw-b");
    ready(&b2, &n).await;
    until("the previous process's attach is closed", || {
        audit(d, "detach").len() == 4
    })
    .await;
    // A little longer: nothing is closed twice.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let starts = audit(d, "attach");
    let ends = audit(d, "detach");
    for s in &starts {
        let matching: Vec<_> = ends.iter().filter(|e| e["id"] == s["id"]).collect();
        assert_eq!(matching.len(), 1, "exactly one end for {s}: {ends:?}");
    }
    assert_eq!(ends.len(), starts.len());
    let crashed: Vec<_> = ends
        .iter()
        .filter(|e| e["endedBy"] == "gateway-crash")
        .collect();
    assert_eq!(crashed.len(), 3, "{ends:?}");
    assert!(
        crashed
            .iter()
            .any(|e| e["closeReason"] == "gateway gw-a ended without closing: killed or crashed"),
        "{crashed:?}"
    );
    assert!(
        crashed
            .iter()
            .any(|e| e["closeReason"] == "gateway gw-b ended without closing: killed or crashed"),
        "{crashed:?}"
    );
    assert_eq!(
        crashed
            .iter()
            .filter(|e| e["user"] == "alice" && e["session"] == format!("{n}/{SESSION}"))
            .count(),
        3
    );
    // The orphaned ledgers are gone; b's current one is there, with nothing open in it.
    let ledgers = Api::<ConfigMap>::namespaced(admin.clone(), &n)
        .list(&ListParams::default().labels("tether.dev/attach-ledger=true"))
        .await
        .unwrap();
    let names: Vec<_> = ledgers
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert_eq!(names, vec!["tether-gateway-attaches-gw-b".to_owned()]);
    drop(b2);
}
