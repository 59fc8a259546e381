//! The session index: what the gateway knows about every `TerminalSession`, fed by a watch.
//!
//! Lookups on the connection path never call the API server; they read this index. The index is
//! a plain value changed by [`Index::apply`]/[`Index::delete`] and the watcher's re-list events, so
//! it is tested synchronously; [`run_watch`] is the thin plumbing that feeds it from kube-runtime.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tether_api::{Ownership, SessionPhase, Share, ShareMode, TerminalSession, conditions};

/// What the gateway needs of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `status.phase`, `Pending` until the operator writes one.
    pub phase: SessionPhase,
    /// `status.message`, what a person reads when the session is not Ready.
    pub message: String,
    /// `host:port` of the agent, only while the session is ready.
    pub endpoint: Option<String>,
    /// `status.podName` / `status.podUID`: the pod the operator created, which attach tickets
    /// name so the agent can check they are meant for it.
    pub pod: Option<(String, String)>,
    /// The person who owns it (annotation `tether.dev/owner`); `None` for a session reached
    /// through RBAC (owned by a service account, or by nobody recorded).
    pub owner: Option<String>,
    /// `spec.sharing`.
    pub sharing: Vec<Share>,
}

impl SessionView {
    /// Derives the view from the resource. `None` for an object without namespace or uid, which
    /// the API server never sends; such an object is skipped rather than stalling the watch.
    pub fn from_resource(s: &TerminalSession) -> Option<Self> {
        let namespace = s.namespace()?;
        let uid = s.uid()?;
        let status = s.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or_default();
        let condition_ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == conditions::READY && c.status == "True");
        let endpoint = status
            .endpoint
            .filter(|e| phase == SessionPhase::Ready && condition_ready && !e.trim().is_empty());
        let pod = status.pod_name.clone().zip(status.pod_uid.clone());
        Some(Self {
            namespace,
            name: s.name_any(),
            uid,
            phase,
            message: status.message.unwrap_or_default(),
            endpoint,
            pod,
            owner: match Ownership::of(s) {
                Ownership::Person(owner) => Some(owner),
                Ownership::Rbac => None,
            },
            sharing: s.spec.sharing.clone(),
        })
    }

    /// The mode `spec.sharing` gives this user with these groups.
    pub fn shared_mode(&self, user: &str, groups: &[String]) -> Option<ShareMode> {
        tether_api::shared_mode(&self.sharing, user, groups)
    }

    /// Ready to be attached: Ready phase, Ready condition and an endpoint.
    pub fn is_ready(&self) -> bool {
        self.endpoint.is_some()
    }

    /// `namespace/name`, as in attach tickets.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// How long the index remembers that a session was deleted, so a browser still attached to it
/// is told "deleted" rather than "no such session".
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(15 * 60);
/// At most this many deletions are remembered; the oldest go first.
pub const TOMBSTONE_CAP: usize = 4096;

/// The in-memory index.
#[derive(Debug, Default)]
pub struct Index {
    sessions: BTreeMap<(String, String), SessionView>,
    /// Objects seen during a re-list, swapped in when it completes.
    relisting: Option<BTreeMap<(String, String), SessionView>>,
    /// Recently deleted sessions and when the gateway learned it.
    deleted: BTreeMap<(String, String), Instant>,
    synced: bool,
}

/// The index shared between the watch task and the request handlers.
pub type SharedIndex = Arc<RwLock<Index>>;

impl Index {
    pub fn shared() -> SharedIndex {
        Arc::new(RwLock::new(Index::default()))
    }

    /// Adds or replaces a session.
    pub fn apply(&mut self, s: &TerminalSession) {
        let Some(view) = SessionView::from_resource(s) else {
            tracing::warn!(name = %s.name_any(), "skipping a session without namespace or uid");
            return;
        };
        let key = (view.namespace.clone(), view.name.clone());
        self.deleted.remove(&key);
        self.sessions.insert(key, view);
    }

    pub fn delete(&mut self, namespace: &str, name: &str) {
        self.delete_at(namespace, name, Instant::now());
    }

    /// Removes a session and remembers, until [`TOMBSTONE_TTL`] after `now`, that it was deleted.
    pub fn delete_at(&mut self, namespace: &str, name: &str, now: Instant) {
        let key = (namespace.to_owned(), name.to_owned());
        if self.sessions.remove(&key).is_some() {
            self.remember_deleted(key, now);
        }
    }

    fn remember_deleted(&mut self, key: (String, String), now: Instant) {
        self.deleted
            .retain(|_, at| now.saturating_duration_since(*at) < TOMBSTONE_TTL);
        while self.deleted.len() >= TOMBSTONE_CAP {
            let Some(oldest) = self
                .deleted
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.deleted.remove(&oldest);
        }
        self.deleted.insert(key, now);
    }

    /// How long ago the gateway saw this session deleted, if it did within [`TOMBSTONE_TTL`] and
    /// no session of that name exists again.
    pub fn deleted_since(&self, namespace: &str, name: &str, now: Instant) -> Option<Duration> {
        let key = (namespace.to_owned(), name.to_owned());
        if self.sessions.contains_key(&key) {
            return None;
        }
        let ago = now.saturating_duration_since(*self.deleted.get(&key)?);
        (ago < TOMBSTONE_TTL).then_some(ago)
    }

    /// A re-list starts: collect into a fresh map so deletions missed while disconnected vanish.
    pub fn relist_begin(&mut self) {
        self.relisting = Some(BTreeMap::new());
    }

    pub fn relist_apply(&mut self, s: &TerminalSession) {
        let Some(view) = SessionView::from_resource(s) else {
            return;
        };
        self.relisting
            .get_or_insert_with(BTreeMap::new)
            .insert((view.namespace.clone(), view.name.clone()), view);
    }

    /// The re-list is complete: it replaces the old content and the index counts as synced.
    /// Sessions missing from it were deleted while the watch was away.
    pub fn relist_done(&mut self) {
        if let Some(fresh) = self.relisting.take() {
            let now = Instant::now();
            let old = std::mem::replace(&mut self.sessions, fresh);
            for key in old.into_keys() {
                if !self.sessions.contains_key(&key) {
                    self.remember_deleted(key, now);
                }
            }
            for key in self.sessions.keys() {
                self.deleted.remove(key);
            }
        }
        self.synced = true;
    }

    /// Whether a full list has been seen (drives `/readyz`).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&SessionView> {
        self.sessions.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Every session, or those of one namespace, in name order.
    pub fn list(&self, namespace: Option<&str>) -> Vec<SessionView> {
        self.sessions
            .values()
            .filter(|v| namespace.is_none_or(|ns| v.namespace == ns))
            .cloned()
            .collect()
    }

    /// Feeds one watcher event.
    pub fn handle(&mut self, event: watcher::Event<TerminalSession>) {
        match event {
            watcher::Event::Apply(s) => self.apply(&s),
            watcher::Event::Delete(s) => {
                if let Some(ns) = s.namespace() {
                    self.delete(&ns, &s.name_any());
                }
            }
            watcher::Event::Init => self.relist_begin(),
            watcher::Event::InitApply(s) => self.relist_apply(&s),
            watcher::Event::InitDone => self.relist_done(),
        }
    }
}

/// Watches every TerminalSession the client may list and feeds the index until the stream ends.
/// Errors are logged and retried with backoff; one bad object never stalls the watch.
pub async fn run_watch(client: Client, index: SharedIndex) {
    use kube::runtime::WatchStreamExt;
    let api: Api<TerminalSession> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => index
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .handle(event),
            Err(e) => tracing::warn!(error = %e, "session watch failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use tether_api::{TerminalSessionSpec, TerminalSessionStatus};

    fn session(ns: &str, name: &str) -> TerminalSession {
        let mut s = TerminalSession::new(name, TerminalSessionSpec::default());
        s.metadata.namespace = Some(ns.into());
        s.metadata.uid = Some(format!("uid-{name}"));
        s
    }

    fn ready(mut s: TerminalSession, endpoint: &str) -> TerminalSession {
        s.status = Some(TerminalSessionStatus {
            phase: Some(SessionPhase::Ready),
            endpoint: Some(endpoint.into()),
            conditions: vec![Condition {
                type_: conditions::READY.into(),
                status: "True".into(),
                reason: conditions::REASON_AGENT_READY.into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            }],
            ..Default::default()
        });
        s
    }

    #[test]
    fn a_ready_session_has_its_endpoint() {
        let mut idx = Index::default();
        idx.apply(&ready(session("a", "dev"), "10.0.0.1:7681"));
        let v = idx.get("a", "dev").unwrap();
        assert!(v.is_ready());
        assert_eq!(v.endpoint.as_deref(), Some("10.0.0.1:7681"));
        assert_eq!(v.key(), "a/dev");
        assert_eq!(v.uid, "uid-dev");
    }

    #[test]
    fn a_session_without_status_is_pending_and_not_ready() {
        let mut idx = Index::default();
        idx.apply(&session("a", "dev"));
        let v = idx.get("a", "dev").unwrap();
        assert_eq!(v.phase, SessionPhase::Pending);
        assert!(!v.is_ready());
    }

    #[test]
    fn an_endpoint_left_behind_after_ready_is_ignored() {
        let mut s = ready(session("a", "dev"), "10.0.0.1:7681");
        let status = s.status.as_mut().unwrap();
        status.phase = Some(SessionPhase::Succeeded);
        status.message = Some("the shell exited with status 0".into());
        let mut idx = Index::default();
        idx.apply(&s);
        let v = idx.get("a", "dev").unwrap();
        assert!(!v.is_ready());
        assert_eq!(v.message, "the shell exited with status 0");
    }

    #[test]
    fn the_ready_condition_must_be_true_too() {
        let mut s = ready(session("a", "dev"), "10.0.0.1:7681");
        s.status.as_mut().unwrap().conditions[0].status = "False".into();
        let mut idx = Index::default();
        idx.apply(&s);
        assert!(!idx.get("a", "dev").unwrap().is_ready());
    }

    #[test]
    fn deletes_remove_and_lists_filter_by_namespace() {
        let mut idx = Index::default();
        idx.apply(&session("a", "one"));
        idx.apply(&session("a", "two"));
        idx.apply(&session("b", "one"));
        assert_eq!(idx.list(None).len(), 3);
        assert_eq!(idx.list(Some("a")).len(), 2);
        idx.delete("a", "one");
        assert!(idx.get("a", "one").is_none());
        assert_eq!(idx.list(Some("a")).len(), 1);
    }

    #[test]
    fn a_relist_drops_sessions_deleted_while_disconnected_and_marks_synced() {
        let mut idx = Index::default();
        assert!(!idx.is_synced());
        idx.handle(watcher::Event::Init);
        idx.handle(watcher::Event::InitApply(session("a", "old")));
        idx.handle(watcher::Event::InitDone);
        assert!(idx.is_synced());
        assert!(idx.get("a", "old").is_some());

        idx.handle(watcher::Event::Init);
        // Until the re-list completes, lookups still see the old content.
        idx.handle(watcher::Event::InitApply(session("a", "new")));
        assert!(idx.get("a", "old").is_some());
        idx.handle(watcher::Event::InitDone);
        assert!(idx.get("a", "old").is_none());
        assert!(idx.get("a", "new").is_some());
    }

    #[test]
    fn a_deleted_session_is_remembered_until_it_returns_or_the_tombstone_expires() {
        let mut idx = Index::default();
        let t0 = Instant::now();
        assert_eq!(idx.deleted_since("a", "dev", t0), None);
        idx.apply(&session("a", "dev"));
        idx.delete_at("a", "dev", t0);
        let later = t0 + Duration::from_secs(30);
        assert_eq!(
            idx.deleted_since("a", "dev", later),
            Some(Duration::from_secs(30))
        );
        assert_eq!(idx.deleted_since("a", "other", later), None);
        assert_eq!(idx.deleted_since("a", "dev", t0 + TOMBSTONE_TTL), None);
        // Created again under the same name: it exists, so it is not "deleted".
        idx.apply(&session("a", "dev"));
        assert_eq!(idx.deleted_since("a", "dev", later), None);
        // Deleting what the index never held leaves no tombstone.
        idx.delete_at("a", "never", t0);
        assert_eq!(idx.deleted_since("a", "never", later), None);
    }

    #[test]
    fn tombstones_are_bounded_and_the_oldest_go_first() {
        let mut idx = Index::default();
        let t0 = Instant::now();
        for i in 0..TOMBSTONE_CAP + 10 {
            let name = format!("s{i}");
            idx.apply(&session("a", &name));
            idx.delete_at("a", &name, t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(idx.deleted.len(), TOMBSTONE_CAP);
        let now = t0 + Duration::from_secs(60);
        assert_eq!(idx.deleted_since("a", "s0", now), None);
        assert!(
            idx.deleted_since("a", &format!("s{}", TOMBSTONE_CAP + 9), now)
                .is_some()
        );
    }

    #[test]
    fn a_relist_remembers_sessions_that_vanished_while_the_watch_was_away() {
        let mut idx = Index::default();
        idx.handle(watcher::Event::Init);
        idx.handle(watcher::Event::InitApply(session("a", "gone")));
        idx.handle(watcher::Event::InitApply(session("a", "kept")));
        idx.handle(watcher::Event::InitDone);
        idx.handle(watcher::Event::Init);
        idx.handle(watcher::Event::InitApply(session("a", "kept")));
        idx.handle(watcher::Event::InitDone);
        let now = Instant::now();
        assert!(idx.deleted_since("a", "gone", now).is_some());
        assert_eq!(idx.deleted_since("a", "kept", now), None);
    }

    #[test]
    fn objects_without_namespace_are_skipped() {
        let mut idx = Index::default();
        let mut s = session("a", "dev");
        s.metadata.namespace = None;
        idx.apply(&s);
        assert!(idx.list(None).is_empty());
    }
}
