//! The foundation, proved on the real control plane: the CRD is served as users see it, bad
//! manifests are refused with words naming the field, RBAC and Pod Security are really on, and
//! garbage collection really runs.

use std::{path::Path, process::Command, time::Duration};

use k8s_openapi::api::{
    core::v1::{ConfigMap, Pod},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams, ValidationDirective},
};
use serde::Deserialize;
use tether_api::TerminalSession;
use tether_e2e::{ControlPlane, binaries, binaries::repo_root, wait::eventually};

async fn control_plane() -> &'static ControlPlane {
    let cp = ControlPlane::shared().await;
    cp.install_crds().await;
    cp
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> (bool, String) {
    let bins = binaries::ensure().expect("control-plane binaries");
    let out = Command::new(&bins.kubectl)
        .args(args)
        .env("KUBECONFIG", cp.admin_kubeconfig())
        .output()
        .expect("running kubectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn strict_apply() -> PatchParams {
    PatchParams::apply("tether-e2e-test").validation(ValidationDirective::Strict)
}

#[tokio::test]
async fn crds_in_the_repository_match_what_crdgen_prints() {
    let on_disk = std::fs::read_to_string(repo_root().join("crds/terminalsessions.yaml"))
        .expect("crds/terminalsessions.yaml exists");
    assert!(
        on_disk == tether_operator::crd_yaml(),
        "crds/terminalsessions.yaml is stale: run `cargo run -q --bin crdgen > crds/terminalsessions.yaml`"
    );
}

#[tokio::test]
async fn the_basic_example_is_created_read_back_and_listed_with_printer_columns() {
    let cp = control_plane().await;
    let ns = cp.namespace("crd").await;
    let example = std::fs::read_to_string(repo_root().join("examples/basic.yaml")).unwrap();
    let session: TerminalSession = serde_yaml_ng::from_str(&example).expect("the example parses");
    let api: Api<TerminalSession> = Api::namespaced(cp.admin_client().await, ns.name());
    api.patch("basic", &strict_apply(), &Patch::Apply(&session))
        .await
        .expect("the example is accepted");
    let back = api.get("basic").await.unwrap();
    assert_eq!(back.spec, session.spec, "the spec reads back unchanged");

    let (ok, table) = kubectl(cp, &["get", "ts", "-n", ns.name(), "-o", "wide"]);
    assert!(ok, "kubectl get ts failed: {table}");
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "PHASE", "READY", "REASON", "POD", "MESSAGE", "AGE"] {
        assert!(
            header.contains(column),
            "column {column} missing from:\n{table}"
        );
    }
    assert!(
        table.contains("basic"),
        "the session is not listed:\n{table}"
    );

    let (ok, categories) = kubectl(cp, &["get", "tether", "-n", ns.name()]);
    assert!(
        ok && categories.contains("basic"),
        "`kubectl get tether` lists sessions:\n{categories}"
    );
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_descriptions() {
    let cp = control_plane().await;
    // Discovery of a new CRD can lag its Established condition by a moment.
    let text = eventually(
        "kubectl explain terminalsession.spec succeeds",
        Duration::from_secs(10),
        || async {
            match kubectl(cp, &["explain", "terminalsession.spec"]) {
                (true, text) => Ok(text),
                (false, text) => Err(text),
            }
        },
    )
    .await;
    for needle in [
        "idleTimeoutSeconds",
        "Between 5 seconds and 7 days",
        "className",
        "StorageClass",
    ] {
        assert!(
            text.contains(needle),
            "`kubectl explain` lacks {needle:?}:\n{text}"
        );
    }
}

#[derive(Deserialize)]
struct InvalidCase {
    case: String,
    expect: String,
    spec: serde_json::Value,
}

#[tokio::test]
async fn invalid_manifests_are_refused_with_a_message_naming_the_field() {
    let cp = control_plane().await;
    let ns = cp.namespace("invalid").await;
    let api: Api<TerminalSession> = Api::namespaced(cp.admin_client().await, ns.name());
    let corpus = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/invalid-sessions.yaml"),
    )
    .unwrap();
    let cases: Vec<InvalidCase> = serde_yaml_ng::from_str(&corpus).expect("the corpus parses");
    assert!(cases.len() >= 20, "the corpus lost cases");
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let manifest = serde_json::json!({
            "apiVersion": "tether.dev/v1alpha1",
            "kind": "TerminalSession",
            "metadata": {"name": format!("bad-{i}")},
            "spec": case.spec,
        });
        match api
            .patch(
                &format!("bad-{i}"),
                &strict_apply(),
                &Patch::Apply(&manifest),
            )
            .await
        {
            Ok(_) => failures.push(format!("{}: accepted", case.case)),
            Err(kube::Error::Api(status)) => {
                // Server-side apply answers an undeclared field with 500 "field not declared in
                // schema" (upstream behaviour); every other refusal is a 422 Invalid.
                if ![400, 422, 500].contains(&status.code) || !status.message.contains(&case.expect)
                {
                    failures.push(format!(
                        "{}: HTTP {} {:?} does not contain {:?}",
                        case.case, status.code, status.message, case.expect
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: unexpected error {e}", case.case)),
        }
    }
    assert!(
        failures.is_empty(),
        "refusals went wrong:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn the_spec_is_immutable_once_created() {
    let cp = control_plane().await;
    let ns = cp.namespace("immutable").await;
    let api: Api<TerminalSession> = Api::namespaced(cp.admin_client().await, ns.name());
    let manifest = |idle: i64| {
        serde_json::json!({
            "apiVersion": "tether.dev/v1alpha1", "kind": "TerminalSession",
            "metadata": {"name": "fixed"}, "spec": {"idleTimeoutSeconds": idle},
        })
    };
    api.patch("fixed", &strict_apply(), &Patch::Apply(manifest(600)))
        .await
        .expect("created");
    let err = api
        .patch("fixed", &strict_apply(), &Patch::Apply(manifest(900)))
        .await
        .expect_err("a spec change is refused");
    assert!(err.to_string().contains("spec is immutable"), "{err}");
}

#[tokio::test]
async fn rbac_forbids_an_ordinary_user_until_a_role_binding_allows_it() {
    let cp = control_plane().await;
    let ns = cp.namespace("rbac").await;
    let alice = cp.user_client("alice", &["developers"]).await;
    let sessions: Api<TerminalSession> = Api::namespaced(alice, ns.name());
    let session = TerminalSession::new("alice-1", Default::default());
    match sessions.create(&PostParams::default(), &session).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status.message.contains("alice"),
                "the denial names the user: {status:?}"
            );
        }
        other => panic!("alice created a session without a binding: {other:?}"),
    }

    let admin = cp.admin_client().await;
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "session-creator"},
        "rules": [{"apiGroups": ["tether.dev"], "resources": ["terminalsessions"], "verbs": ["create", "get"]}],
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "developers-create-sessions"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "session-creator"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "developers"}],
    }))
    .unwrap();
    Api::<Role>::namespaced(admin.clone(), ns.name())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin, ns.name())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    // The authorizer learns of new bindings through a watch: allow it a moment.
    eventually(
        "the group binding lets alice create a session",
        Duration::from_secs(10),
        || async {
            sessions
                .create(&PostParams::default(), &session)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        },
    )
    .await;
    // The binding grants create and get, nothing more.
    let err = sessions
        .delete("alice-1", &DeleteParams::default())
        .await
        .expect_err("delete is not granted");
    assert!(err.to_string().contains("forbidden"), "{err}");
}

#[tokio::test]
async fn pod_security_restricted_rejects_a_privileged_pod() {
    let cp = control_plane().await;
    let ns = cp.namespace("psa").await;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, ns.name());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "privileged"},
        "spec": {"containers": [{
            "name": "c", "image": "busybox",
            "securityContext": {"privileged": true},
        }]},
    }))
    .unwrap();
    match pods.create(&PostParams::default(), &pod).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("violates PodSecurity \"restricted:latest\"")
                    && status.message.contains("privileged"),
                "{status:?}"
            );
        }
        other => panic!("a privileged pod was admitted in a restricted namespace: {other:?}"),
    }
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_what_it_owns() {
    let cp = control_plane().await;
    let ns = cp.namespace("gc").await;
    let client: Client = cp.admin_client().await;
    let maps: Api<ConfigMap> = Api::namespaced(client, ns.name());
    let owner = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let owned: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.metadata.uid.clone().unwrap(),
        }]},
    }))
    .unwrap();
    maps.create(&PostParams::default(), &owned).await.unwrap();
    maps.delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    let what = format!(
        "the owned ConfigMap goes with its owner (controller-manager log:\n{})",
        cp.log_tail("kube-controller-manager", 20)
    );
    eventually(&what, Duration::from_secs(30), || async {
        match maps.get_opt("owned").await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err("still there".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
}
