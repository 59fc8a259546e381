//! The reconciler: observe the session's pod, create it when it is missing, compute the
//! status, write what changed, clean up what finished.
//!
//! The pod is created (never applied over an existing one) under a fresh random name, and its
//! name and UID are recorded in the status; from then on only the pod with that UID is the
//! session's. A pod someone else made with the session's labels and owner reference is named in
//! the `ForeignPods` condition and never used. Other writes are Server-Side Applies under
//! [`FIELD_MANAGER`] or deletes with a UID precondition; the spec is never written. A second reconcile of an unchanged world makes no
//! request but reads. Status applies carry the session's resourceVersion, so a reconcile that
//! ran on a stale copy of the session (the watch lags behind our own writes) gets a conflict
//! and retries on the fresh copy instead of overwriting a newer status.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::{core::v1::Pod, networking::v1::NetworkPolicy},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{
        Controller,
        controller::{self, Action},
        events::{Event, EventType, Recorder, Reporter},
        reflector::ObjectRef,
        watcher,
    },
};
use serde_json::json;
use tether_api::{SessionPhase, TerminalSession, TerminalSessionStatus, conditions as c};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    Error, FIELD_MANAGER, Result,
    config::Settings,
    error::backoff,
    metrics::Metrics,
    network_policy::build_network_policy,
    pod::{build_pod, fresh_pod_name, is_owned_by, labels},
    status::{PodState, Rejection, desired_status, report_foreign_pods},
};

/// How often a live session is looked at again with no event: a safety net, not the driver.
const RESYNC: Duration = Duration::from_secs(300);
/// First retry of a refused pod; doubles up to [`MAX_BACKOFF`].
const REJECTION_BACKOFF: Duration = Duration::from_secs(5);
/// First retry after a transient error; doubles up to [`MAX_BACKOFF`].
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What every reconciliation shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The administrator's settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Metrics,
    recorder: Recorder,
    /// Refused pods: attempts so far and when to try again, per session.
    rejections: Mutex<HashMap<ObjectRef<TerminalSession>, (u32, Instant)>>,
    /// Consecutive failed reconciliations per session.
    failures: Mutex<HashMap<ObjectRef<TerminalSession>, u32>>,
    /// Pods this replica created whose name and UID the status does not hold yet (the status
    /// write failed, for example on a conflict): still ours on the retry.
    /// Keyed by session reference; the value is (session UID, pod name, pod UID), so a namesake
    /// created after a delete never inherits an entry.
    created: Mutex<HashMap<ObjectRef<TerminalSession>, (String, String, String)>>,
    clock: fn() -> Timestamp,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context whose events name `instance` as the reporting replica.
    pub fn new(client: Client, settings: Settings, metrics: Metrics, instance: String) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(instance),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            rejections: Mutex::default(),
            failures: Mutex::default(),
            created: Mutex::default(),
            clock: Timestamp::now,
        }
    }

    /// Drops the retry state of every session not in `live`.
    fn forget_all_but(&self, live: &std::collections::HashSet<ObjectRef<TerminalSession>>) {
        self.rejections
            .lock()
            .expect("not poisoned")
            .retain(|k, _| live.contains(k));
        self.failures
            .lock()
            .expect("not poisoned")
            .retain(|k, _| live.contains(k));
        self.created
            .lock()
            .expect("not poisoned")
            .retain(|k, _| live.contains(k));
    }

    async fn publish(
        &self,
        session: &TerminalSession,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self
            .recorder
            .publish(&event, &session.object_ref(&()))
            .await
        {
            // An event is worth a log line, not a failed reconciliation.
            warn!(error = %e, reason, "cannot publish event");
        }
    }
}

/// Reconciles one session. See the module documentation for the rules.
pub async fn reconcile(session: Arc<TerminalSession>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = session
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let span = info_span!("reconcile", %namespace, name = %session.name_any());
    async move {
        let started = Instant::now();
        ctx.metrics.reconciliations.inc();
        let result = reconcile_inner(&session, &ctx, &namespace).await;
        ctx.metrics.observe_reconcile(started.elapsed());
        if result.is_ok() {
            ctx.failures
                .lock()
                .expect("not poisoned")
                .remove(&ObjectRef::from_obj(&*session));
        }
        result
    }
    .instrument(span)
    .await
}

async fn reconcile_inner(
    session: &TerminalSession,
    ctx: &Context,
    namespace: &str,
) -> Result<Action> {
    if session.meta().deletion_timestamp.is_some() {
        // The pod goes with its owner through garbage collection; nothing to undo here.
        return Ok(Action::await_change());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let old = session.status.clone().unwrap_or_default();
    let now = (ctx.clock)();
    let key = ObjectRef::from_obj(session);
    if !old.phase.is_some_and(SessionPhase::is_finished)
        && old.reason.as_deref() == Some(c::REASON_POD_REJECTED)
    {
        // Our own status write triggers a reconcile at once; the backoff decides, not the echo.
        let wait = ctx
            .rejections
            .lock()
            .expect("not poisoned")
            .get(&key)
            .map(|(_, at)| at.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero());
        if let Some(wait) = wait {
            debug!(?wait, "pod refused before; waiting out the backoff");
            return Ok(Action::requeue(wait));
        }
    }
    let unrecorded = if old.pod_uid.is_some() {
        ctx.created.lock().expect("not poisoned").remove(&key);
        None
    } else {
        let session_uid = session.uid().unwrap_or_default();
        ctx.created
            .lock()
            .expect("not poisoned")
            .get(&key)
            .filter(|(uid, _, _)| *uid == session_uid)
            .map(|(_, name, pod_uid)| (name.clone(), pod_uid.clone()))
    };
    let (ours, foreign) = session_pods(session, &old, unrecorded.as_ref(), &pods).await?;

    if old.phase.is_some_and(SessionPhase::is_finished) {
        return finished(session, ctx, &pods, ours.as_ref(), &old, now).await;
    }

    let created: Option<Pod>;
    let rejection: Option<Rejection>;
    let observed = match &ours {
        Some(pod) => PodState::Present(pod),
        None if old.pod_name.is_some() || unrecorded.is_some() => PodState::Gone,
        None => match create_pod(session, ctx, namespace, &pods).await? {
            Ok(pod) => {
                ctx.rejections.lock().expect("not poisoned").remove(&key);
                let name = pod.name_any();
                ctx.created.lock().expect("not poisoned").insert(
                    key.clone(),
                    (
                        session.uid().unwrap_or_default(),
                        name.clone(),
                        pod.uid().unwrap_or_default(),
                    ),
                );
                info!(pod = %name, uid = ?pod.uid(), "created session pod");
                ctx.publish(
                    session,
                    EventType::Normal,
                    c::REASON_POD_CREATED,
                    format!("Created session pod {name}"),
                )
                .await;
                created = Some(pod);
                PodState::Present(created.as_ref().expect("just set"))
            }
            Err(refusal) => {
                rejection = Some(refusal);
                PodState::Rejected(rejection.as_ref().expect("just set"))
            }
        },
    };

    let mut new = desired_status(session, observed, now);
    report_foreign_pods(&mut new, &old, &foreign, session.metadata.generation, now);
    let reported = |st: &TerminalSessionStatus| {
        st.conditions
            .iter()
            .find(|cd| cd.type_ == c::FOREIGN_PODS)
            .map(|cd| cd.message.clone())
    };
    if let Some(message) = reported(&new)
        && reported(&old).as_ref() != Some(&message)
    {
        warn!(pods = ?foreign, "pods not created by the operator claim this session");
        ctx.publish(session, EventType::Warning, c::REASON_FOREIGN_POD, message)
            .await;
    }
    if new != old {
        patch_status(session, ctx, &new).await?;
    }
    record_transition(session, ctx, &old, &new).await;

    match observed {
        PodState::Rejected(r) => {
            ctx.metrics.error(c::REASON_POD_REJECTED);
            let mut map = ctx.rejections.lock().expect("not poisoned");
            let attempts = map.get(&key).map_or(0, |(n, _)| *n);
            let wait = backoff(attempts, REJECTION_BACKOFF, MAX_BACKOFF);
            map.insert(key, (attempts + 1, Instant::now() + wait));
            warn!(object = %r.object, code = r.code, reason = %r.reason, message = %r.message, ?wait, "the cluster refused it");
            Ok(Action::requeue(wait))
        }
        PodState::Present(pod) if new.phase.is_some_and(SessionPhase::is_finished) => {
            delete_pod(&pods, pod).await?;
            Ok(after_finish(session, &new, now))
        }
        _ if new.phase.is_some_and(SessionPhase::is_finished) => {
            Ok(after_finish(session, &new, now))
        }
        _ => Ok(Action::requeue(RESYNC)),
    }
}

/// The session's own pod, and the names of pods that only claim to be it.
///
/// Ours is the pod whose name and UID the status recorded when the operator created it, or that
/// this replica created a moment ago and could not record yet (`unrecorded`); a status written by
/// an operator before UIDs were recorded names only the pod. Every other pod with the session's
/// UID label is foreign.
async fn session_pods(
    session: &TerminalSession,
    old: &TerminalSessionStatus,
    unrecorded: Option<&(String, String)>,
    pods: &Api<Pod>,
) -> Result<(Option<Pod>, Vec<String>)> {
    let uid = session
        .uid()
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    // A consistent list (not `resourceVersion=0`, which may be stale): a pod created a moment
    // ago must not look gone, which would fail the session for good.
    let params = ListParams::default().labels(&format!("{}={uid}", labels::SESSION_UID));
    let mut ours = None;
    let mut foreign = Vec::new();
    for pod in pods.list(&params).await? {
        let (name, pod_uid) = (pod.name_any(), pod.uid().unwrap_or_default());
        let recorded = match (old.pod_name.as_deref(), old.pod_uid.as_deref(), unrecorded) {
            (Some(n), Some(u), _) => n == name && u == pod_uid,
            // A status written before UIDs were recorded: that pod, if it is no younger than
            // the PodCreated condition that recorded it (a pod made after it is someone else's).
            (Some(n), None, _) => {
                let recorded_at = old
                    .conditions
                    .iter()
                    .find(|cd| cd.type_ == c::POD_CREATED && cd.status == "True")
                    .map(|cd| cd.last_transition_time.0);
                let created_at = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
                n == name && matches!((created_at, recorded_at), (Some(p), Some(r)) if p <= r)
            }
            (None, _, Some((n, u))) => *n == name && *u == pod_uid,
            (None, _, None) => false,
        };
        if recorded && is_owned_by(&pod, session) && ours.is_none() {
            ours = Some(pod);
        } else {
            foreign.push(pod.name_any());
        }
    }
    foreign.sort();
    Ok((ours, foreign))
}

/// Applies the namespace's network policy, then the pod. A refusal of either is a
/// [`Rejection`] naming what was refused; any other failure is an error to retry.
async fn create_pod(
    session: &TerminalSession,
    ctx: &Context,
    namespace: &str,
    pods: &Api<Pod>,
) -> Result<std::result::Result<Pod, Rejection>> {
    let refused = |object: &str, e: kube::Error| match &e {
        kube::Error::Api(status) => Rejection::from_status(object, status).ok_or(Error::Kube(e)),
        _ => Err(Error::Kube(e)),
    };
    // The policy first, so the pod never runs unprotected.
    let policy = build_network_policy(namespace, &ctx.settings);
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if let Err(e) = policies
        .patch(&policy.name_any(), &params, &Patch::Apply(&policy))
        .await
    {
        let object = format!("network policy {}", policy.name_any());
        return Ok(Err(refused(&object, e)?));
    }
    // A create, never an apply: an apply would take over a pod someone else made first.
    let pod = build_pod(session, &ctx.settings, &fresh_pod_name(session))?;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match pods.create(&params, &pod).await {
        Ok(pod) => Ok(Ok(pod)),
        // Someone guessed 10 random characters: try another name on the retry.
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Kube(kube::Error::Api(s))),
        Err(e) => Ok(Err(refused("session pod", e)?)),
    }
}

async fn patch_status(
    session: &TerminalSession,
    ctx: &Context,
    status: &TerminalSessionStatus,
) -> Result<()> {
    let api: Api<TerminalSession> =
        Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": TerminalSession::api_version(&()),
        "kind": TerminalSession::kind(&()),
        "metadata": {
            "name": session.name_any(),
            // A precondition: a stale copy of the session must not overwrite a newer status.
            "resourceVersion": session.resource_version(),
        },
        "status": status,
    });
    api.patch_status(
        &session.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn record_transition(
    session: &TerminalSession,
    ctx: &Context,
    old: &TerminalSessionStatus,
    new: &TerminalSessionStatus,
) {
    if old.ready_time.is_none()
        && let (Some(ready), Some(created)) = (&new.ready_time, &session.meta().creation_timestamp)
    {
        let took = ready.0.duration_since(created.0).as_secs_f64().max(0.0);
        ctx.metrics.time_to_ready.observe(took);
    }
    let phase_changed = old.phase != new.phase;
    let reason_changed = old.reason != new.reason;
    let reason = new.reason.clone().unwrap_or_default();
    let warning = new.phase == Some(SessionPhase::Failed)
        || (new.phase == Some(SessionPhase::Pending)
            && ![c::REASON_CREATING_POD, c::REASON_SCHEDULING].contains(&reason.as_str()))
        || (new.phase == Some(SessionPhase::Starting)
            && ![c::REASON_CONTAINER_CREATING, c::REASON_AGENT_STARTING]
                .contains(&reason.as_str()));
    // Every phase change is an event; within a phase only trouble is, so a session's events
    // read as its story and not as a log of the kubelet's progress.
    // A new session's PodCreated event already says what its first Pending means.
    let quiet_start = new.phase == Some(SessionPhase::Pending) && !warning;
    if !((phase_changed && !quiet_start) || (reason_changed && warning)) {
        return;
    }
    let phase = new.phase.unwrap_or_default();
    info!(%phase, %reason, "session transition");
    let type_ = if warning {
        EventType::Warning
    } else {
        EventType::Normal
    };
    ctx.publish(
        session,
        type_,
        &reason,
        new.message.clone().unwrap_or_default(),
    )
    .await;
}

/// A finished session: make sure its pod is gone, then honour `ttlSecondsAfterFinished`.
async fn finished(
    session: &TerminalSession,
    ctx: &Context,
    pods: &Api<Pod>,
    ours: Option<&Pod>,
    status: &TerminalSessionStatus,
    now: Timestamp,
) -> Result<Action> {
    if let Some(pod) = ours
        && pod.meta().deletion_timestamp.is_none()
    {
        delete_pod(pods, pod).await?;
    }
    let Some(ttl) = session.spec.ttl_seconds_after_finished else {
        return Ok(Action::await_change());
    };
    let finished_at = status.finish_time.as_ref().map_or(now, |t| t.0);
    let due = finished_at + Duration::from_secs(ttl.max(0) as u64);
    if now < due {
        return Ok(Action::requeue(now.duration_until(due).unsigned_abs()));
    }
    let api: Api<TerminalSession> =
        Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: session.uid(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    info!(
        ttl,
        "deleting the finished session: ttlSecondsAfterFinished passed"
    );
    match api.delete(&session.name_any(), &params).await {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(Action::await_change()),
        Err(e) => Err(e.into()),
    }
}

fn after_finish(
    session: &TerminalSession,
    status: &TerminalSessionStatus,
    now: Timestamp,
) -> Action {
    match session.spec.ttl_seconds_after_finished {
        Some(ttl) => {
            let at = status.finish_time.as_ref().map_or(now, |t| t.0);
            let due = at + Duration::from_secs(ttl.max(0) as u64);
            Action::requeue(
                now.duration_until(due)
                    .unsigned_abs()
                    .max(Duration::from_secs(1)),
            )
        }
        None => Action::await_change(),
    }
}

/// Deletes the pod of a finished session to free its node's resources. The UID precondition
/// makes sure a pod recreated in between is not the one deleted.
async fn delete_pod(pods: &Api<Pod>, pod: &Pod) -> Result<()> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match pods.delete(&pod.name_any(), &params).await {
        Ok(_) => {
            info!(pod = %pod.name_any(), "deleted the finished session's pod");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What to do after a failed reconciliation: transient errors retry with a backoff per
/// session (1 s doubling to 5 min), permanent ones wait for the session to change.
pub fn error_policy(session: Arc<TerminalSession>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.metric_label());
    if !error.is_transient() {
        warn!(name = %session.name_any(), error = %error, "reconcile failed; waiting for a change");
        return Action::await_change();
    }
    let mut failures = ctx.failures.lock().expect("not poisoned");
    let n = failures.entry(ObjectRef::from_obj(&*session)).or_default();
    let wait = backoff(*n, ERROR_BACKOFF, MAX_BACKOFF);
    *n += 1;
    warn!(name = %session.name_any(), error = %error, ?wait, "reconcile failed; retrying");
    Action::requeue(wait)
}

/// Runs the controller until `shutdown` resolves, then lets reconciliations in flight finish.
/// `ready` turns true once the watch caches have synced.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    concurrency: u16,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (sessions, pods): (Api<TerminalSession>, Api<Pod>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let controller = Controller::new(sessions, watcher::Config::default().any_semantic())
        .owns(pods, watcher::Config::default().labels(labels::SELECTOR))
        .with_config(controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown);
    let store = controller.store();
    ctx.metrics.count_sessions_in(store.clone());
    // Deleted sessions are never reconciled again; forget their backoff state now and then.
    let (prune_ctx, prune_store) = (ctx.clone(), store.clone());
    let pruner = tokio::spawn(async move {
        loop {
            tokio::time::sleep(RESYNC).await;
            let live: std::collections::HashSet<ObjectRef<TerminalSession>> = prune_store
                .state()
                .iter()
                .map(|s| ObjectRef::from_obj(&**s))
                .collect();
            prune_ctx.forget_all_but(&live);
        }
    });
    tokio::spawn(async move {
        // kube-runtime's readiness future keeps the waker of only one of its concurrent waiters
        // (the controller waits on it too), so a lone `.await` here may never be woken: the
        // leader then stayed unready forever on a real node. Look again every 250 ms instead;
        // once the controller's waiter has seen the store ready, every new look sees it.
        loop {
            match tokio::time::timeout(Duration::from_millis(250), store.wait_until_ready()).await {
                Ok(Ok(())) => {
                    ready.store(true, Ordering::SeqCst);
                    info!("watch caches synced");
                    break;
                }
                Ok(Err(_)) => break,
                Err(_) => {}
            }
        }
    });
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "reconcile error");
            }
        })
        .await;
    pruner.abort();
}

#[cfg(test)]
mod tests;
