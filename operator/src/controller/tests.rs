//! Reconcile against a mocked API server, controller-rs style: each scenario lists the exact
//! requests it expects, in order, with the answers; a timeout catches a request that was
//! expected but never made, or made but never expected.

use std::{sync::Arc, time::Duration};

use http::{Method, Request, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Client, client::Body};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tether_api::{TerminalSession, TerminalSessionStatus, conditions as c};

use super::*;
use crate::{
    config::Settings,
    status::{PodState, desired_status},
    testing::{PodExt, SessionExt, t0},
};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One expected request and the answer to it.
struct Expect {
    method: Method,
    path: &'static str,
    check: Box<dyn Fn(&Value) + Send>,
    status: u16,
    answer: Value,
}

fn expect(method: Method, path: &'static str, status: u16, answer: Value) -> Expect {
    Expect {
        method,
        path,
        check: Box::new(|_| {}),
        status,
        answer,
    }
}

impl Expect {
    fn checking(mut self, check: impl Fn(&Value) + Send + 'static) -> Self {
        self.check = Box::new(check);
        self
    }
}

const POD: &str = "/api/v1/namespaces/team-a/pods/dev-0f1e2d3c";
const PODS: &str = "/api/v1/namespaces/team-a/pods";
const POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/tether-sessions";
const STATUS: &str = "/apis/tether.dev/v1alpha1/namespaces/team-a/terminalsessions/dev/status";
const SESSION: &str = "/apis/tether.dev/v1alpha1/namespaces/team-a/terminalsessions/dev";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team-a/events";

/// A pod list as the API server answers the session-UID label selector.
fn pods(items: &[&Pod]) -> Value {
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "300"}, "items": items})
}

fn context() -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let metrics = Metrics::new(&mut Registry::default());
    let mut ctx = Context::new(client, Settings::default(), metrics, "test".into());
    ctx.clock = t0;
    (Arc::new(ctx), handle)
}

/// Serves `script` in order, checking each request's method, path, query and body.
async fn serve(mut handle: Handle, script: Vec<Expect>) -> Vec<Value> {
    let mut bodies = Vec::new();
    for e in script {
        let (req, send) = handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("expected {} {} but the client went away", e.method, e.path));
        assert_eq!(req.method(), &e.method, "method of {}", req.uri());
        assert_eq!(req.uri().path(), e.path);
        let query = req.uri().query().unwrap_or_default().to_string();
        if e.method == Method::GET && e.path == PODS {
            assert!(
                query.contains("labelSelector=tether.dev%2Fsession-uid%3D"),
                "the session's pods are listed by its UID label: {query}"
            );
        }
        if e.method == Method::POST && e.path == PODS {
            assert!(query.contains("fieldManager=tether-operator"), "{query}");
        }
        if e.method == Method::PATCH {
            assert!(query.contains("fieldManager=tether-operator"), "{query}");
            assert!(query.contains("force=true"), "{query}");
            assert_eq!(
                req.headers()["content-type"],
                "application/apply-patch+yaml",
                "every write is a server-side apply"
            );
        }
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (e.check)(&body);
        bodies.push(body.clone());
        let answer = match e.answer {
            // Echo what was applied, as the API server would return it. A status apply omits
            // the spec, which a served session always has.
            Value::Null if body["kind"] == "TerminalSession" => {
                let mut full = body;
                full["spec"] = json!({});
                full["metadata"]["namespace"] = json!("team-a");
                full
            }
            Value::Null => body,
            answer => answer,
        };
        send.send_response(
            Response::builder()
                .status(e.status)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
    }
    bodies
}

/// Runs one reconcile against `script`; fails when either side hangs.
async fn run(
    session: TerminalSession,
    ctx: Arc<Context>,
    handle: Handle,
    script: Vec<Expect>,
) -> (Result<Action>, Vec<Value>) {
    let server = tokio::spawn(serve(handle, script));
    let result = tokio::time::timeout(Duration::from_secs(2), reconcile(Arc::new(session), ctx))
        .await
        .expect("reconcile hung: it made a request the scenario did not expect");
    let bodies = tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("the scenario expected a request reconcile never made")
        .unwrap();
    (result, bodies)
}

fn ready_session() -> (TerminalSession, Pod) {
    let s = TerminalSession::test();
    let pod = s.test_pod().scheduled().running("10.0.0.7", true);
    let status = desired_status(&s, PodState::Present(&pod), t0());
    (s.with_status(status), pod)
}

#[tokio::test]
async fn a_new_session_gets_its_policy_then_its_pod_then_an_event_and_a_status() {
    let (ctx, handle) = context();
    let session = TerminalSession::test();
    let created = session.test_pod();
    let script = vec![
        expect(Method::GET, PODS, 200, pods(&[])),
        expect(Method::PATCH, POLICY, 200, Value::Null).checking(|b| {
            assert_eq!(b["kind"], "NetworkPolicy");
            assert_eq!(b["spec"]["ingress"][0]["ports"][0]["port"], 7681);
        }),
        expect(
            Method::POST,
            PODS,
            201,
            serde_json::to_value(&created).unwrap(),
        )
        .checking(|b| {
            assert_eq!(b["kind"], "Pod");
            assert_eq!(
                b["metadata"]["ownerReferences"][0]["uid"],
                "0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f0"
            );
            assert_eq!(b["spec"]["automountServiceAccountToken"], false);
            assert_eq!(
                b["spec"]["securityContext"]["seccompProfile"]["type"],
                "RuntimeDefault"
            );
        }),
        expect(Method::POST, EVENTS, 201, Value::Null).checking(|b| {
            assert_eq!(b["reason"], "PodCreated");
            assert_eq!(b["type"], "Normal");
            assert_eq!(b["regarding"]["name"], "dev");
        }),
        expect(Method::PATCH, STATUS, 200, Value::Null).checking(|b| {
            assert_eq!(b["apiVersion"], "tether.dev/v1alpha1");
            assert_eq!(b["kind"], "TerminalSession");
            assert_eq!(
                b["metadata"]["resourceVersion"], "100",
                "status writes are conditional"
            );
            assert!(
                b.get("spec").is_none(),
                "the operator never writes the spec"
            );
            assert_eq!(b["status"]["phase"], "Pending");
            assert_eq!(b["status"]["reason"], "Scheduling");
            assert_eq!(b["status"]["podName"], "dev-0f1e2d3c");
            assert_eq!(b["status"]["observedGeneration"], 1);
        }),
    ];
    let (result, _) = run(session, ctx, handle, script).await;
    assert_eq!(result.unwrap(), Action::requeue(RESYNC));
}

#[tokio::test]
async fn a_second_reconcile_of_an_unchanged_ready_session_makes_no_writes() {
    let (ctx, handle) = context();
    let (session, pod) = ready_session();
    let script = vec![expect(Method::GET, PODS, 200, pods(&[&pod]))];
    let (result, _) = run(session, ctx, handle, script).await;
    assert_eq!(result.unwrap(), Action::requeue(RESYNC));
}

#[tokio::test]
async fn a_ready_pod_makes_the_session_ready_with_an_event() {
    let (ctx, handle) = context();
    let s = TerminalSession::test();
    let starting = desired_status(&s, PodState::Present(&s.test_pod().scheduled()), t0());
    let session = s.clone().with_status(starting);
    let pod = s.test_pod().scheduled().running("10.0.0.7", true);
    let script = vec![
        expect(Method::GET, PODS, 200, pods(&[&pod])),
        expect(Method::PATCH, STATUS, 200, Value::Null).checking(|b| {
            assert_eq!(b["status"]["phase"], "Ready");
            assert_eq!(b["status"]["endpoint"], "10.0.0.7:7681");
            let ready = b["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap()
                .clone();
            assert_eq!(ready["status"], "True");
        }),
        expect(Method::POST, EVENTS, 201, Value::Null).checking(|b| {
            assert_eq!(b["reason"], c::REASON_AGENT_READY);
            assert_eq!(b["type"], "Normal");
        }),
    ];
    let (result, _) = run(session, ctx.clone(), handle, script).await;
    assert_eq!(result.unwrap(), Action::requeue(RESYNC));
    let mut registry = Registry::default();
    registry.register("ttr", "", ctx.metrics.time_to_ready.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("ttr_count 1"),
        "time to ready is observed once: {text}"
    );
}

#[tokio::test]
async fn a_pod_refused_by_quota_is_reported_with_the_servers_reason_and_not_retried_hot() {
    let (ctx, handle) = context();
    let session = TerminalSession::test();
    let forbidden = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
        "message": "pods \"dev-0f1e2d3c\" is forbidden: exceeded quota: sessions, requested: pods=1, used: pods=1, limited: pods=1"
    });
    let script = vec![
        expect(Method::GET, PODS, 200, pods(&[])),
        expect(Method::PATCH, POLICY, 200, Value::Null),
        expect(Method::POST, PODS, 403, forbidden),
        expect(Method::PATCH, STATUS, 200, Value::Null).checking(|b| {
            assert_eq!(b["status"]["phase"], "Pending");
            assert_eq!(b["status"]["reason"], "PodRejected");
            assert!(
                b["status"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("exceeded quota")
            );
            let created = b["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "PodCreated")
                .unwrap()
                .clone();
            assert_eq!(
                (created["status"].as_str(), created["reason"].as_str()),
                (Some("False"), Some("Forbidden"))
            );
        }),
        expect(Method::POST, EVENTS, 201, Value::Null).checking(|b| {
            assert_eq!(b["reason"], "PodRejected");
            assert_eq!(b["type"], "Warning");
        }),
    ];
    let (result, bodies) = run(session.clone(), ctx.clone(), handle, script).await;
    assert_eq!(result.unwrap(), Action::requeue(REJECTION_BACKOFF));

    // Our own status write triggers the next reconcile at once: it must not hit the API.
    let status: TerminalSessionStatus =
        serde_json::from_value(bodies[3]["status"].clone()).unwrap();
    let session = session.with_status(status);
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    drop(service);
    let result = tokio::time::timeout(
        Duration::from_secs(2),
        reconcile(Arc::new(session), ctx.clone()),
    )
    .await
    .unwrap();
    drop(handle);
    match result.unwrap() {
        a if a == Action::await_change() => panic!("a refused pod must be retried"),
        a => assert!(a != Action::requeue(Duration::ZERO), "{a:?}"),
    }
    let rejected = ctx
        .metrics
        .errors
        .get_or_create(&crate::metrics::ErrorLabels {
            reason: "PodRejected".into(),
        })
        .get();
    assert_eq!(rejected, 1);
}

#[tokio::test]
async fn a_finished_shell_succeeds_and_its_pod_is_deleted() {
    let (ctx, handle) = context();
    let (session, pod) = ready_session();
    let pod = pod.terminated(
        r#"{"reason":"ShellExited","exitCode":0,"message":"bye"}"#,
        0,
    );
    let script = vec![
        expect(Method::GET, PODS, 200, pods(&[&pod])),
        expect(Method::PATCH, STATUS, 200, Value::Null).checking(|b| {
            assert_eq!(b["status"]["phase"], "Succeeded");
            assert_eq!(b["status"]["exitCode"], 0);
            assert!(
                b["status"].get("endpoint").is_none(),
                "no endpoint once finished"
            );
        }),
        expect(Method::POST, EVENTS, 201, Value::Null).checking(|b| {
            assert_eq!(b["reason"], "ShellExited");
        }),
        expect(
            Method::DELETE,
            POD,
            200,
            serde_json::to_value(&pod).unwrap(),
        )
        .checking(|b| {
            assert_eq!(b["preconditions"]["uid"], "pod-uid-1");
        }),
    ];
    let (result, _) = run(session, ctx, handle, script).await;
    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn a_pod_deleted_under_a_ready_session_fails_it_without_recreating() {
    let (ctx, handle) = context();
    let (session, _) = ready_session();
    let script = vec![
        expect(Method::GET, PODS, 200, pods(&[])),
        expect(Method::PATCH, STATUS, 200, Value::Null).checking(|b| {
            assert_eq!(b["status"]["phase"], "Failed");
            assert_eq!(b["status"]["reason"], "PodDeleted");
            assert!(b["status"].get("endpoint").is_none());
        }),
        expect(Method::POST, EVENTS, 201, Value::Null).checking(|b| {
            assert_eq!(b["type"], "Warning");
            assert_eq!(b["reason"], "PodDeleted");
        }),
    ];
    let (result, _) = run(session, ctx, handle, script).await;
    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn a_finished_session_past_its_ttl_is_deleted_with_a_uid_precondition() {
    let (ctx, handle) = context();
    let s = TerminalSession::test().with_ttl(10);
    let pod = s
        .test_pod()
        .scheduled()
        .terminated(r#"{"reason":"IdleTimeout","exitCode":0}"#, 0);
    let mut done = desired_status(&s, PodState::Present(&pod), t0());
    done.finish_time = Some(Time(t0() - Duration::from_secs(11)));
    let script = vec![
        expect(Method::GET, PODS, 200, pods(&[])),
        expect(
            Method::DELETE,
            SESSION,
            200,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        )
        .checking(|b| {
            assert_eq!(
                b["preconditions"]["uid"],
                "0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f0"
            );
        }),
    ];
    let (result, _) = run(s.with_status(done), ctx, handle, script).await;
    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn a_finished_session_within_its_ttl_waits_for_it() {
    let (ctx, handle) = context();
    let s = TerminalSession::test().with_ttl(60);
    let pod = s
        .test_pod()
        .scheduled()
        .terminated(r#"{"reason":"ShellExited","exitCode":0}"#, 0);
    let mut done = desired_status(&s, PodState::Present(&pod), t0());
    done.finish_time = Some(Time(t0() - Duration::from_secs(20)));
    let script = vec![expect(Method::GET, PODS, 200, pods(&[]))];
    let (result, _) = run(s.with_status(done), ctx, handle, script).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(40)));
}

#[tokio::test]
async fn a_server_error_fails_the_reconcile_and_retries_with_growing_backoff() {
    let (ctx, handle) = context();
    let session = TerminalSession::test();
    let unavailable = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "code": 503, "message": "etcd is away"});
    let script = vec![expect(Method::GET, PODS, 503, unavailable)];
    let (result, _) = run(session.clone(), ctx.clone(), handle, script).await;
    let err = result.unwrap_err();
    assert!(err.is_transient());
    let s = Arc::new(session);
    assert_eq!(
        error_policy(s.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        error_policy(s.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(
        error_policy(s, &err, ctx),
        Action::requeue(Duration::from_secs(4))
    );
}

#[tokio::test]
async fn a_status_write_from_a_stale_copy_conflicts_and_is_retried() {
    let (ctx, handle) = context();
    let (session, pod) = ready_session();
    let pod = pod.terminated(r#"{"reason":"ShellExited","exitCode":0}"#, 0);
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"});
    let script = vec![
        expect(Method::GET, PODS, 200, pods(&[&pod])),
        expect(Method::PATCH, STATUS, 409, conflict),
    ];
    let (result, _) = run(session, ctx, handle, script).await;
    let err = result.unwrap_err();
    assert_eq!(err.metric_label(), "Conflict");
    assert!(err.is_transient(), "retried on the fresh copy");
}

#[tokio::test]
async fn a_session_being_deleted_is_left_to_garbage_collection() {
    let (ctx, handle) = context();
    let mut session = TerminalSession::test();
    session.metadata.deletion_timestamp = Some(Time(t0()));
    let (result, _) = run(session, ctx, handle, vec![]).await;
    assert_eq!(result.unwrap(), Action::await_change());
}

/// A pod made by someone else before the operator got to the session: it has the session's
/// labels and a controller reference to it (what the hostile tenant did), and it is still not
/// the session's pod. The operator creates its own under a fresh name and reports the squatter.
fn squatter(session: &TerminalSession) -> Pod {
    let mut pod = session.test_pod();
    pod.metadata.name = Some("dev-squatter".into());
    pod.metadata.uid = Some("attacker-uid".into());
    pod
}

#[tokio::test]
async fn a_pod_that_only_claims_the_session_is_reported_and_never_used() {
    let (ctx, handle) = context();
    let session = TerminalSession::test();
    let foreign = squatter(&session);
    assert!(
        crate::pod::is_owned_by(&foreign, &session),
        "it claims the session"
    );
    let mut created = session.test_pod();
    created.metadata.name = Some("dev-bcdfghjklm".into());
    let script = vec![
        expect(Method::GET, PODS, 200, pods(&[&foreign])),
        expect(Method::PATCH, POLICY, 200, Value::Null),
        expect(
            Method::POST,
            PODS,
            201,
            serde_json::to_value(&created).unwrap(),
        )
        .checking(|b| {
            let name = b["metadata"]["name"].as_str().unwrap();
            assert!(name.starts_with("dev-") && name != "dev-squatter", "{name}");
        }),
        expect(Method::POST, EVENTS, 201, Value::Null).checking(|b| {
            assert_eq!(b["reason"], "PodCreated");
        }),
        expect(Method::POST, EVENTS, 201, Value::Null).checking(|b| {
            assert_eq!(b["type"], "Warning");
            assert_eq!(b["reason"], "ForeignPod");
            assert!(b["note"].as_str().unwrap().contains("dev-squatter"), "{b}");
        }),
        expect(Method::PATCH, STATUS, 200, Value::Null).checking(|b| {
            let st = &b["status"];
            assert_eq!(st["podName"], "dev-bcdfghjklm", "the operator's own pod");
            assert_eq!(st["podUID"], "pod-uid-1");
            let foreign = st["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "ForeignPods")
                .expect("reported in status");
            assert!(
                foreign["message"]
                    .as_str()
                    .unwrap()
                    .contains("dev-squatter")
            );
        }),
    ];
    let (result, _) = run(session, ctx, handle, script).await;
    result.unwrap();
}

#[tokio::test]
async fn a_squatter_next_to_the_recorded_pod_changes_nothing_but_the_report() {
    let (ctx, handle) = context();
    let (session, pod) = ready_session();
    let foreign = squatter(&session);
    let script = vec![
        // The squatter first: order must not matter.
        expect(Method::GET, PODS, 200, pods(&[&foreign, &pod])),
        expect(Method::POST, EVENTS, 201, Value::Null).checking(|b| {
            assert_eq!(b["reason"], "ForeignPod");
        }),
        expect(Method::PATCH, STATUS, 200, Value::Null).checking(|b| {
            let st = &b["status"];
            assert_eq!(st["phase"], "Ready");
            assert_eq!(st["podName"], "dev-0f1e2d3c");
            assert_eq!(
                st["endpoint"], "10.0.0.7:7681",
                "the recorded pod's address"
            );
        }),
    ];
    let (result, _) = run(session, ctx, handle, script).await;
    assert_eq!(result.unwrap(), Action::requeue(RESYNC));
}

#[tokio::test]
async fn a_pod_recreated_under_the_recorded_name_is_not_the_session_pod() {
    let (ctx, handle) = context();
    let (session, pod) = ready_session();
    let mut impostor = pod.clone();
    impostor.metadata.uid = Some("attacker-uid".into());
    let script = vec![
        expect(Method::GET, PODS, 200, pods(&[&impostor])),
        expect(Method::PATCH, STATUS, 200, Value::Null).checking(|b| {
            assert_eq!(b["status"]["phase"], "Failed");
            assert_eq!(b["status"]["reason"], "PodDeleted");
            assert!(b["status"].get("endpoint").is_none(), "{b}");
        }),
        expect(Method::POST, EVENTS, 201, Value::Null),
    ];
    let (result, _) = run(session, ctx, handle, script).await;
    result.unwrap();
}

#[tokio::test]
async fn a_refused_network_policy_is_named_in_status_and_no_pod_is_created_without_it() {
    let (ctx, handle) = context();
    let forbidden = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
        "message": "networkpolicies.networking.k8s.io \"tether-sessions\" is forbidden: User cannot create resource"
    });
    let script = vec![
        expect(Method::GET, PODS, 200, pods(&[])),
        expect(Method::PATCH, POLICY, 403, forbidden),
        expect(Method::PATCH, STATUS, 200, Value::Null).checking(|b| {
            assert_eq!(b["status"]["reason"], "PodRejected");
            let message = b["status"]["message"].as_str().unwrap();
            assert!(
                message.contains("refused the network policy tether-sessions"),
                "{message}"
            );
        }),
        expect(Method::POST, EVENTS, 201, Value::Null),
    ];
    let (result, _) = run(TerminalSession::test(), ctx, handle, script).await;
    assert_eq!(result.unwrap(), Action::requeue(REJECTION_BACKOFF));
}

#[tokio::test]
async fn retry_state_of_deleted_sessions_is_forgotten() {
    let (ctx, _handle) = context();
    let gone = ObjectRef::from_obj(&TerminalSession::test());
    let kept = ObjectRef::from_obj(&TerminalSession::test().with_name("kept"));
    ctx.failures.lock().unwrap().insert(gone.clone(), 3);
    ctx.failures.lock().unwrap().insert(kept.clone(), 1);
    ctx.rejections
        .lock()
        .unwrap()
        .insert(gone.clone(), (1, std::time::Instant::now()));
    ctx.forget_all_but(&std::collections::HashSet::from([kept.clone()]));
    assert_eq!(
        ctx.failures.lock().unwrap().keys().collect::<Vec<_>>(),
        vec![&kept]
    );
    assert!(ctx.rejections.lock().unwrap().is_empty());
}
