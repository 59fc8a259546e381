//! A hostile neighbour, on the real control plane and the real node with the chart installed:
//! the owner a session records at admission, sharing, who may delete, and a pod squatted next to
//! a session's own. alice and carol are in the same group, bound to `tether-user` in the
//! namespace: RBAC alone would let each use the other's sessions.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use tether_api::{OWNER_ANNOTATION, SessionPhase, TerminalSession, conditions};
use tether_e2e::{
    TestNamespace,
    cluster::Cluster,
    terminal::Terminal,
    wait::{eventually, never_within},
};
use tether_protocol::Mode;

const STEP: Duration = Duration::from_secs(60);
const GROUP: &str = "tether-devs";

/// A namespace where the group of alice and carol is bound to tether-user, and mallory may
/// create pods (and nothing of Tether's).
async fn tenant(cluster: &Cluster, prefix: &str) -> TestNamespace {
    let ns = cluster.cp.namespace(prefix).await;
    let admin = cluster.cp.admin_client().await;
    let apply = |kind: &str, name: &str, body: serde_json::Value| {
        let (admin, ns, kind, name) = (
            admin.clone(),
            ns.name().to_owned(),
            kind.to_owned(),
            name.to_owned(),
        );
        async move {
            let gvk = kube::api::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", &kind);
            let ar = kube::api::ApiResource::from_gvk(&gvk);
            Api::<kube::api::DynamicObject>::namespaced_with(admin, &ns, &ar)
                .patch(&name, &PatchParams::apply("e2e"), &Patch::Apply(body))
                .await
                .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
        }
    };
    apply("RoleBinding", "devs-use-tether", serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "devs-use-tether"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tether-user"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": GROUP}],
    }))
    .await;
    apply("Role", "pod-maker", serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "pod-maker"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list"]},
                  {"apiGroups": ["tether.dev"], "resources": ["terminalsessions"], "verbs": ["get", "list"]}],
    }))
    .await;
    apply("RoleBinding", "mallory-makes-pods", serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "mallory-makes-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-maker"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"}],
    }))
    .await;
    ns
}

fn session(name: &str, owner: Option<&str>) -> TerminalSession {
    let mut s: TerminalSession = serde_json::from_value(serde_json::json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "TerminalSession",
        "metadata": {"name": name},
        "spec": {"idleTimeoutSeconds": 600},
    }))
    .unwrap();
    if let Some(owner) = owner {
        s.annotations_mut()
            .insert(OWNER_ANNOTATION.into(), owner.into());
    }
    s
}

/// The API server's refusal, in words.
fn refusal(r: Result<impl std::fmt::Debug, kube::Error>) -> String {
    match r {
        Ok(v) => panic!("the API server accepted it: {v:?}"),
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{s:?}");
            s.message
        }
        Err(e) => panic!("not a refusal: {e}"),
    }
}

fn token(cluster: &Cluster, user: &str) -> String {
    cluster
        .stack
        .users
        .iter()
        .find(|u| u.user == user)
        .unwrap_or_else(|| panic!("{user} is a development user"))
        .token
        .clone()
}

async fn open(
    cluster: &Cluster,
    user: &str,
    session: &str,
    mode: Mode,
) -> anyhow::Result<Terminal> {
    Terminal::open(
        cluster.stack.gateway_addr(),
        &cluster.stack.origin(),
        &token(cluster, user),
        session,
        mode,
    )
    .await
}

async fn ready(api: &Api<TerminalSession>, name: &str) -> TerminalSession {
    eventually(&format!("{name} Ready"), STEP, || async {
        let s = api.get(name).await.map_err(|e| e.to_string())?;
        let phase = s.status.as_ref().and_then(|st| st.phase);
        if phase == Some(SessionPhase::Ready) {
            Ok(s)
        } else {
            Err(format!(
                "phase {phase:?}: {:?}",
                s.status.and_then(|st| st.message)
            ))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_has_one_owner_who_alone_shares_and_deletes_it() {
    let cluster = Cluster::shared().await;
    let ns = tenant(cluster, "owners").await;
    let alice: Api<TerminalSession> =
        Api::namespaced(cluster.cp.user_client("alice", &[GROUP]).await, ns.name());
    let carol: Api<TerminalSession> =
        Api::namespaced(cluster.cp.user_client("carol", &[GROUP]).await, ns.name());
    let pp = PostParams::default();

    // The owner is recorded at admission, and cannot be forged.
    let missing = refusal(alice.create(&pp, &session("mine", None)).await);
    assert!(
        missing.contains(r#"add the annotation tether.dev/owner: "alice""#),
        "{missing}"
    );
    let forged = refusal(alice.create(&pp, &session("mine", Some("carol"))).await);
    assert!(
        forged.contains(r#"must be your own user name "alice""#),
        "{forged}"
    );
    alice
        .create(&pp, &session("mine", Some("alice")))
        .await
        .expect("alice creates her session");
    let name = format!("{}/mine", ns.name());
    ready(&alice, "mine").await;

    // RBAC lets carol attach in this namespace; the owner does not.
    let Err(carol_attach) = open(cluster, "carol", &name, Mode::Attach).await else {
        panic!("carol attached to alice's session");
    };
    assert!(
        format!("{carol_attach:#}").contains("403"),
        "{carol_attach:#}"
    );
    assert!(
        open(cluster, "carol", &name, Mode::Observe).await.is_err(),
        "nor may she watch"
    );
    let mut term = open(cluster, "alice", &name, Mode::Attach)
        .await
        .expect("the owner attaches");
    let out = term.run("echo owner-$((6*7))", STEP).await.unwrap();
    assert!(out.contains("owner-42"), "{out}");

    // Nobody but the owner changes the owner, the sharing, or deletes it.
    let patch = |v: serde_json::Value| Patch::Merge(v);
    let relabel = refusal(
        carol
            .patch(
                "mine",
                &PatchParams::default(),
                &patch(
                    serde_json::json!({"metadata": {"annotations": {OWNER_ANNOTATION: "carol"}}}),
                ),
            )
            .await,
    );
    assert!(relabel.contains("cannot change"), "{relabel}");
    let share_self = refusal(
        carol
            .patch(
                "mine",
                &PatchParams::default(),
                &patch(
                    serde_json::json!({"spec": {"sharing": [{"user": "carol", "mode": "attach"}]}}),
                ),
            )
            .await,
    );
    assert!(
        share_self.contains(r#"only the owner "alice""#),
        "{share_self}"
    );
    let delete = refusal(carol.delete("mine", &DeleteParams::default()).await);
    assert!(delete.contains(r#"only the owner "alice""#), "{delete}");
    let relabel_own = refusal(
        alice
            .patch(
                "mine",
                &PatchParams::default(),
                &patch(serde_json::json!({"metadata": {"annotations": {OWNER_ANNOTATION: "bob"}}})),
            )
            .await,
    );
    assert!(relabel_own.contains("cannot change"), "{relabel_own}");
    let spec_change = alice
        .patch(
            "mine",
            &PatchParams::default(),
            &patch(serde_json::json!({"spec": {"image": "docker.io/attacker/x"}})),
        )
        .await
        .expect_err("the rest of the spec is immutable");
    assert!(
        spec_change
            .to_string()
            .contains("spec is immutable except spec.sharing"),
        "{spec_change}"
    );

    // The owner shares it with carol to watch: she may observe, not type.
    alice
        .patch(
            "mine",
            &PatchParams::default(),
            &patch(
                serde_json::json!({"spec": {"sharing": [{"user": "carol", "mode": "observe"}]}}),
            ),
        )
        .await
        .expect("the owner shares her session without any RoleBinding");
    let mut watching = eventually("carol observes once shared", STEP, || async {
        open(cluster, "carol", &name, Mode::Observe)
            .await
            .map_err(|e| format!("{e:#}"))
    })
    .await;
    assert!(
        open(cluster, "carol", &name, Mode::Attach).await.is_err(),
        "observe, not attach"
    );
    term.client()
        .send_input(b"echo shared-$((7*6))\r")
        .await
        .unwrap();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + STEP;
    while !seen.contains("shared-42") {
        let event = tokio::time::timeout_at(deadline, watching.client().next_event())
            .await
            .unwrap_or_else(|_| panic!("carol never saw alice's output; saw {seen:?}"))
            .expect("the observer's connection stays up");
        if let tether_protocol::client::Event::Output { data, .. } = event {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    alice
        .delete("mine", &DeleteParams::default())
        .await
        .expect("the owner deletes it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_squatting_on_a_session_is_reported_and_never_used() {
    let cluster = Cluster::shared().await;
    let ns = tenant(cluster, "squat").await;
    let alice: Api<TerminalSession> =
        Api::namespaced(cluster.cp.user_client("alice", &[GROUP]).await, ns.name());
    alice
        .create(&PostParams::default(), &session("victim", Some("alice")))
        .await
        .unwrap();
    let before = ready(&alice, "victim").await;
    let status = before.status.clone().unwrap();
    let (pod_name, pod_uid) = (
        status.pod_name.clone().unwrap(),
        status.pod_uid.clone().unwrap(),
    );
    assert_ne!(
        pod_name,
        format!("victim-{}", &before.uid().unwrap()[..8]),
        "unpredictable name"
    );

    // mallory, who may only make pods, makes one that claims to be the session's: its labels,
    // a controller reference to it, the name the old operator would have used.
    let mallory: Api<Pod> =
        Api::namespaced(cluster.cp.user_client("mallory", &[]).await, ns.name());
    let ours: Pod = Api::namespaced(cluster.cp.admin_client().await, ns.name())
        .get(&pod_name)
        .await
        .unwrap();
    let squat = format!("victim-{}", &before.uid().unwrap()[..8]);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": squat,
            "labels": ours.labels(),
            "ownerReferences": [{
                "apiVersion": "tether.dev/v1alpha1", "kind": "TerminalSession",
                "name": "victim", "uid": before.uid().unwrap(), "controller": true,
            }],
        },
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "session", "image": "localhost/tether/pause:3.10", "imagePullPolicy": "Never",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }))
    .unwrap();
    mallory
        .create(&PostParams::default(), &pod)
        .await
        .expect("mallory may create pods");

    let reported = eventually(
        "the squatter named in the session's status",
        STEP,
        || async {
            let s = alice.get("victim").await.map_err(|e| e.to_string())?;
            let st = s.status.ok_or("no status")?;
            let c = st
                .conditions
                .iter()
                .find(|c| c.type_ == conditions::FOREIGN_PODS)
                .ok_or("no ForeignPods condition yet")?
                .clone();
            Ok((st, c))
        },
    )
    .await;
    let (st, condition) = reported;
    assert!(condition.message.contains(&squat), "{}", condition.message);
    assert_eq!(
        st.pod_uid.as_deref(),
        Some(pod_uid.as_str()),
        "still its own pod"
    );
    assert_eq!(st.endpoint, status.endpoint, "still its own pod's address");
    assert_eq!(st.phase, Some(SessionPhase::Ready));
    never_within(
        "the session switching pods",
        Duration::from_secs(5),
        || async {
            let st = alice
                .get("victim")
                .await
                .map_err(|e| e.to_string())?
                .status
                .unwrap_or_default();
            match st.pod_uid.as_deref() == Some(pod_uid.as_str()) {
                true => Ok(()),
                false => Err(format!("podUID is now {:?}", st.pod_uid)),
            }
        },
    )
    .await;
    // The terminal is the operator's pod's: its hostname is that pod's name.
    let mut term = open(
        cluster,
        "alice",
        &format!("{}/victim", ns.name()),
        Mode::Attach,
    )
    .await
    .expect("alice attaches");
    let host = term.run("hostname", STEP).await.unwrap();
    assert!(host.contains(&pod_name) && !host.contains(&squat), "{host}");
    let events = cluster
        .stack
        .kubectl(&[
            "get",
            "events",
            "-n",
            ns.name(),
            "--field-selector",
            "reason=ForeignPod",
            "-o",
            "name",
        ])
        .unwrap();
    assert!(
        !events.trim().is_empty(),
        "a Warning event names the squatter"
    );
}

/// The gateway's reviews are served in a priority level of their own, and the operator's
/// leader-election Leases in the built-in `leader-election` level, as the API server itself
/// reports in its response headers (`X-Kubernetes-PF-PriorityLevel-UID`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_reviews_and_the_operators_leases_have_their_own_priority_levels() {
    let cluster = Cluster::shared().await;
    let ns = tether_e2e::stack::SYSTEM_NAMESPACE;
    let uid_of = |level: &str| {
        cluster
            .stack
            .kubectl(&[
                "get",
                "prioritylevelconfiguration",
                level,
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .unwrap()
    };
    // `kubectl -v=8` prints the response headers of each request; the last is the one asked
    // for (discovery comes first).
    let level_of = |user: &str, args: &[&str]| {
        let mut all = vec!["-v=8", "--as", user];
        all.extend_from_slice(args);
        let out = cluster
            .stack
            .kubectl(&all)
            .unwrap_or_else(|e| format!("{e:#}"));
        out.lines()
            .filter_map(|l| {
                let l = l.to_ascii_lowercase();
                let i = l.find("x-kubernetes-pf-prioritylevel-uid:")?;
                Some(
                    l[i + "x-kubernetes-pf-prioritylevel-uid:".len()..]
                        .trim()
                        .to_owned(),
                )
            })
            .next_back()
            .unwrap_or_else(|| panic!("no priority level header in: {out}"))
    };
    let sar = cluster.stack.dir().join("sar.json");
    std::fs::write(
        &sar,
        serde_json::json!({
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": "alice", "resourceAttributes": {"group": "tether.dev", "resource": "terminalsessions", "verb": "attach", "namespace": "default"}},
        })
        .to_string(),
    )
    .unwrap();
    let gateway = format!("system:serviceaccount:{ns}:tether-gateway");
    let operator = format!("system:serviceaccount:{ns}:tether-operator");
    assert_eq!(
        level_of(
            &gateway,
            &[
                "create",
                "--validate=false",
                "-f",
                sar.to_str().unwrap(),
                "-o",
                "name"
            ]
        ),
        uid_of("tether-gateway-reviews")
    );
    let leases = cluster
        .stack
        .kubectl(&["get", "leases", "-o", "name"])
        .unwrap();
    let lease = leases
        .lines()
        .find(|l| l.contains("tether"))
        .expect("the operator's lease")
        .trim()
        .to_owned();
    assert_eq!(
        level_of(&operator, &["get", &lease]),
        uid_of("leader-election")
    );
    // Anything else of the gateway's is not squeezed into the reviews' level.
    assert_ne!(
        level_of(&gateway, &["get", "terminalsessions", "-A", "-o", "name"]),
        uid_of("tether-gateway-reviews")
    );
}
