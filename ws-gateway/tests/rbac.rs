//! On the real control plane: RBAC bindings decide who may attach and who may observe, through
//! SubjectAccessReview from the gateway's own service account; Kubernetes tokens authenticate
//! through TokenReview; the index follows a real watch.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tether_api::TerminalSession;
use tether_gateway::authn::KubeTokenReview;
use tether_gateway::authz::KubeAccessReview;
use tether_gateway::index::{Index, run_watch};

async fn apply<K>(api: &Api<K>, name: &str, value: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply("tether-gateway-test").force(),
        &Patch::Apply(value),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {name}: {e}"));
}

/// The permissions the chart gives the gateway: review tokens and access, watch sessions.
async fn gateway_client(cp: &tether_e2e::ControlPlane, admin: &Client) -> Client {
    let kubeconfig = cp
        .service_account_kubeconfig("tether-system", "tether-gateway")
        .await;
    apply(
        &Api::<ClusterRole>::all(admin.clone()),
        "tether-gateway-test",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "tether-gateway-test"},
            "rules": [
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
                {"apiGroups": ["tether.dev"], "resources": ["terminalsessions"], "verbs": ["get", "list", "watch"]},
            ],
        }),
    )
    .await;
    apply(
        &Api::<ClusterRoleBinding>::all(admin.clone()),
        "tether-gateway-test",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "tether-gateway-test"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tether-gateway-test"},
            "subjects": [{"kind": "ServiceAccount", "name": "tether-gateway", "namespace": "tether-system"}],
        }),
    )
    .await;
    cp.client_from_kubeconfig(&kubeconfig).await
}

fn role(name: &str, verbs: &[&str]) -> serde_json::Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": name},
        "rules": [{"apiGroups": ["tether.dev"], "resources": ["terminalsessions"], "verbs": verbs}],
    })
}

fn binding(name: &str, role: &str, subject: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": [subject],
    })
}

#[tokio::test]
async fn rbac_bindings_decide_attach_and_observe_and_get_is_not_enough() {
    let cp = tether_e2e::ControlPlane::shared().await;
    cp.install_crds().await;
    let admin = cp.admin_client().await;
    let ns = cp.namespace("gw").await;
    let n = ns.name().to_owned();
    let gateway = gateway_client(cp, &admin).await;

    let roles = Api::<Role>::namespaced(admin.clone(), &n);
    apply(
        &roles,
        "attacher",
        role("attacher", &["get", "list", "attach", "observe"]),
    )
    .await;
    apply(
        &roles,
        "viewer",
        role("viewer", &["get", "list", "observe"]),
    )
    .await;
    apply(&roles, "reader", role("reader", &["get", "list", "watch"])).await;
    let bindings = Api::<RoleBinding>::namespaced(admin.clone(), &n);
    let user =
        |u: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": u});
    apply(
        &bindings,
        "devs-attach",
        binding(
            "devs-attach",
            "attacher",
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "devs"}),
        ),
    )
    .await;
    apply(
        &bindings,
        "bob-view",
        binding("bob-view", "viewer", user("bob")),
    )
    .await;
    apply(
        &bindings,
        "carol-read",
        binding("carol-read", "reader", user("carol")),
    )
    .await;
    // A service account that may observe, to authenticate through TokenReview.
    let bot_kubeconfig = cp.service_account_kubeconfig(&n, "ci-bot").await;
    apply(
        &bindings,
        "bot-view",
        binding(
            "bot-view",
            "viewer",
            json!({"kind": "ServiceAccount", "name": "ci-bot", "namespace": n}),
        ),
    )
    .await;
    // The kubeconfig's token is for the API server itself: a full API credential, refused.
    let api_token = kube::config::Kubeconfig::read_from(&bot_kubeconfig)
        .unwrap()
        .auth_infos
        .into_iter()
        .find_map(|a| a.auth_info?.token)
        .map(|t| secrecy_expose(&t))
        .expect("a token in the service-account kubeconfig");
    // `kubectl create token ci-bot --audience tether`: accepted.
    let bot_token = cp
        .service_account_token(&n, "ci-bot", &["tether"], Duration::from_secs(600))
        .await;

    // The gateway's index follows a real watch with its own identity.
    let index = Index::shared();
    let watch = tokio::spawn(run_watch(gateway.clone(), index.clone()));
    let gw = TestGateway::start_with(Options {
        flags: vec![
            "--handshake-rate=1000".into(),
            "--authz-cache-ttl=1s".into(),
            "--reauthorize-every=1s".into(),
        ],
        access: Some(Arc::new(KubeAccessReview(gateway.clone()))),
        token_review: Some(Arc::new(KubeTokenReview(gateway.clone()))),
        index: Some(index.clone()),
        port: None,
    })
    .await;

    // A session whose status points at the test backend, as the operator would write it.
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
    // The harness's backend serves team-a/dev; this session lives in the test namespace.
    let backend = backend_for(&gw, &n, &uid).await;
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
    tokio::time::timeout(STEP, async {
        loop {
            if gw.http("GET", "/readyz", &[], "").await.0 == 200
                && index
                    .read()
                    .unwrap()
                    .get(&n, SESSION)
                    .is_some_and(|s| s.is_ready())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the watch sees the Ready session");

    let path = |mode: &str| format!("/ws/{n}/{SESSION}?mode={mode}");
    // alice (group devs) attaches and observes.
    assert!(
        gw.ws(&path("attach"), Some(ORIGIN), Some(ALICE))
            .await
            .is_ok()
    );
    assert!(
        gw.ws(&path("observe"), Some(ORIGIN), Some(ALICE))
            .await
            .is_ok()
    );
    // bob observes but may not attach; the reason names the verb.
    assert!(
        gw.ws(&path("observe"), Some(ORIGIN), Some(BOB))
            .await
            .is_ok()
    );
    let (status, body) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(BOB))
        .await
        .unwrap_err();
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("attach"), "{body}");
    // carol may get, list and watch sessions, and still neither attach nor observe.
    for mode in ["attach", "observe"] {
        let (status, body) = gw
            .ws(&path(mode), Some(ORIGIN), Some(CAROL))
            .await
            .unwrap_err();
        assert_eq!(status, 403, "carol {mode}: {body}");
    }
    // A Kubernetes service-account token, through TokenReview: observe yes, attach no.
    assert!(
        gw.ws(&path("observe"), Some(ORIGIN), Some(&bot_token))
            .await
            .is_ok()
    );
    assert_eq!(
        gw.ws(&path("attach"), Some(ORIGIN), Some(&bot_token))
            .await
            .unwrap_err()
            .0,
        403
    );
    let (status, body) = gw
        .ws(&path("observe"), Some(ORIGIN), Some(&api_token))
        .await
        .unwrap_err();
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--audience tether"),
        "the refusal says how to get a token that works: {body}"
    );
    let (status, _, body) = gw
        .http(
            "GET",
            "/api/whoami",
            &[("Authorization", &format!("Bearer {bot_token}"))],
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("system:serviceaccount:{n}:ci-bot")),
        "{body}"
    );

    // The session list reflects the same decisions.
    let (_, _, body) = gw
        .http(
            "GET",
            &format!("/api/sessions?namespace={n}"),
            &[("Cookie", &gw.sign_in(BOB).await)],
            "",
        )
        .await;
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["canAttach"], false, "{body}");
    assert_eq!(list[0]["canObserve"], true, "{body}");
    let (_, _, body) = gw
        .http(
            "GET",
            &format!("/api/sessions?namespace={n}"),
            &[("Cookie", &gw.sign_in(CAROL).await)],
            "",
        )
        .await;
    assert_eq!(body.trim(), "[]");

    // An open connection is checked again: removing bob's binding closes his observer with
    // 4411 and words that name the verb, while alice's attach stays open.
    let (mut bobs, _) = gw
        .ws(&path("observe"), Some(ORIGIN), Some(BOB))
        .await
        .unwrap();
    send(&mut bobs, open_frame()).await;
    let (mut alices, _) = gw
        .ws(&path("attach"), Some(ORIGIN), Some(ALICE))
        .await
        .unwrap();
    send(&mut alices, open_frame()).await;
    bindings
        .delete("bob-view", &Default::default())
        .await
        .unwrap();
    let (code, reason) = closed(&mut bobs).await;
    assert_eq!(code, 4411, "{reason}");
    assert!(
        reason.starts_with("access revoked") && reason.contains("observe"),
        "{reason}"
    );
    send(
        &mut alices,
        tether_protocol::ClientFrame::Input(b"still here\r".to_vec().into()).encode(),
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_secs(3), closed(&mut alices))
            .await
            .is_err(),
        "alice's connection stays open"
    );

    // Deleting the session removes it from the index; the gateway remembers it was deleted: 410.
    sessions.delete(SESSION, &Default::default()).await.unwrap();
    tokio::time::timeout(STEP, async {
        while index.read().unwrap().get(&n, SESSION).is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the watch sees the delete");
    assert_eq!(
        gw.ws(&path("observe"), Some(ORIGIN), Some(ALICE))
            .await
            .unwrap_err()
            .0,
        410
    );
    watch.abort();
}

fn open_frame() -> Vec<u8> {
    tether_protocol::ClientFrame::Open {
        size: tether_protocol::Size::default(),
    }
    .encode()
}

fn secrecy_expose(t: &secrecy::SecretString) -> String {
    use secrecy::ExposeSecret;
    t.expose_secret().to_owned()
}

/// A test backend verifying tickets for `namespace/dev` with this gateway's key.
async fn backend_for(gw: &TestGateway, namespace: &str, uid: &str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let verifier = Arc::new(
        tether_protocol::ticket::Verifier::new(
            &gw.public_key,
            &format!("{namespace}/{SESSION}"),
            uid,
        )
        .unwrap(),
    );
    tokio::spawn(tether_gateway::test_backend::serve(
        listener,
        verifier,
        Default::default(),
    ));
    addr
}
