//! Authorization: who may attach to or observe a session.
//!
//! A session owned by a person (annotation `tether.dev/owner`, recorded at admission) is used by
//! its owner and by whom its `spec.sharing` names, with no request to the API server. Anyone
//! else needs the verb `administer` on it. A session with no person as owner (GitOps, or made by
//! an administrator) is reached through RBAC's `attach` and `observe` verbs, as well as through
//! `administer` and its shares. Verbs are never `get`: a role that may read sessions may not type
//! into them.
//!
//! RBAC answers come from SubjectAccessReview through a bounded cache ([`moka`]) whose loads are
//! single-flight: identical concurrent questions share one review. At most
//! [`MAX_REVIEWS_IN_FLIGHT`] reviews are in flight per gateway, so a burst of page loads cannot
//! open hundreds of connections to the API server. Listing sessions asks per namespace, never
//! per session (see [`Authorizer::namespace_access`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use tether_api::{ADMINISTER_VERB, ShareMode};
use tether_protocol::Mode;
use tokio::sync::Semaphore;

use crate::authn::UserInfo;
use crate::index::{SessionView, SharedIndex};
use crate::metrics::Metrics;

/// The RBAC verb for a mode.
pub fn verb(mode: Mode) -> &'static str {
    match mode {
        Mode::Attach => "attach",
        Mode::Observe => "observe",
    }
}

/// An answer from the authorizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Why, in words (the API server's reason, or ours).
    pub reason: String,
}

impl Decision {
    fn allow(reason: impl Into<String>) -> Self {
        Self {
            allowed: true,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot check permissions right now: {0}")]
pub struct AuthzError(pub String);

/// Something that answers "may this user do `verb` on terminalsessions (named `name`, or all of
/// them when `None`) in this namespace?".
pub trait AccessReviewer: Send + Sync + 'static {
    fn review<'a>(
        &'a self,
        user: &'a UserInfo,
        namespace: &'a str,
        name: Option<&'a str>,
        verb: &'a str,
    ) -> BoxFuture<'a, Result<Decision, AuthzError>>;
}

/// SubjectAccessReview against the API server.
#[derive(Clone)]
pub struct KubeAccessReview(pub Client);

impl std::fmt::Debug for KubeAccessReview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeAccessReview")
    }
}

/// What a refusal says: the user, the verb, the object.
fn refusal(user: &UserInfo, namespace: &str, name: Option<&str>, verb: &str) -> String {
    let object = match name {
        Some(name) => format!("terminalsessions/{name}"),
        None => "terminalsessions".to_owned(),
    };
    format!(
        "user {} may not {verb} {object} in namespace {namespace}",
        user.user
    )
}

impl AccessReviewer for KubeAccessReview {
    fn review<'a>(
        &'a self,
        user: &'a UserInfo,
        namespace: &'a str,
        name: Option<&'a str>,
        verb: &'a str,
    ) -> BoxFuture<'a, Result<Decision, AuthzError>> {
        Box::pin(async move {
            let api: Api<SubjectAccessReview> = Api::all(self.0.clone());
            let sar = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.user.clone()),
                    groups: Some(user.groups.clone()),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(tether_api::GROUP.into()),
                        resource: Some("terminalsessions".into()),
                        verb: Some(verb.into()),
                        namespace: Some(namespace.into()),
                        name: name.map(Into::into),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let answer = api
                .create(&PostParams::default(), &sar)
                .await
                .map_err(|e| AuthzError(format!("SubjectAccessReview failed: {e}")))?;
            let status = answer.status.unwrap_or_default();
            let reason = if status.allowed {
                status.reason.unwrap_or_else(|| "allowed".into())
            } else {
                let detail = status
                    .reason
                    .filter(|r| !r.is_empty())
                    .or(status.evaluation_error)
                    .unwrap_or_else(|| "no RBAC rule allows it".into());
                format!("{}: {detail}", refusal(user, namespace, name, verb))
            };
            Ok(Decision {
                allowed: status.allowed,
                reason,
            })
        })
    }
}

/// Reviews in flight at once from one gateway.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 16;
/// Cached decisions at most; the least recently used go first.
const MAX_CACHE_ENTRIES: u64 = 20_000;

/// (user, sorted groups, namespace, name or none for the whole namespace, verb)
type Key = (String, Vec<String>, String, Option<String>, &'static str);

/// What a user may do with the sessions of one namespace, from one review per verb.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceAccess {
    pub administer: bool,
    pub attach: bool,
    pub observe: bool,
}

/// Decides access: ownership and sharing from the session index, RBAC through a cache.
pub struct Authorizer {
    reviewer: Arc<dyn AccessReviewer>,
    index: SharedIndex,
    cache: moka::future::Cache<Key, Decision>,
    in_flight: Semaphore,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("cached", &self.cache.entry_count())
            .finish()
    }
}

/// How the session's owner and shares alone answer, before RBAC.
fn by_ownership(session: &SessionView, user: &UserInfo, mode: Mode) -> Option<Decision> {
    if session.owner.as_deref() == Some(user.user.as_str()) {
        return Some(Decision::allow("you own this session"));
    }
    match (session.shared_mode(&user.user, &user.groups), mode) {
        (Some(ShareMode::Attach), _) | (Some(ShareMode::Observe), Mode::Observe) => {
            Some(Decision::allow("the session is shared with you"))
        }
        _ => None,
    }
}

impl Authorizer {
    pub fn new(
        reviewer: Arc<dyn AccessReviewer>,
        ttl: Duration,
        metrics: Arc<Metrics>,
        index: SharedIndex,
    ) -> Self {
        Self {
            reviewer,
            index,
            cache: moka::future::Cache::builder()
                .max_capacity(MAX_CACHE_ENTRIES)
                .time_to_live(ttl.max(Duration::from_millis(1)))
                .build(),
            in_flight: Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
            metrics,
        }
    }

    /// One RBAC answer: from the cache, from a review another request already started for the
    /// same question, or from a new review (at most [`MAX_REVIEWS_IN_FLIGHT`] at once).
    pub async fn rbac(
        &self,
        user: &UserInfo,
        namespace: &str,
        name: Option<&str>,
        verb: &'static str,
    ) -> Result<Decision, AuthzError> {
        let mut groups = user.groups.clone();
        groups.sort();
        let key: Key = (
            user.user.clone(),
            groups,
            namespace.into(),
            name.map(Into::into),
            verb,
        );
        self.cache
            .try_get_with(key, async {
                let _slot = self
                    .in_flight
                    .acquire()
                    .await
                    .map_err(|_| AuthzError("the gateway is stopping".into()))?;
                let started = Instant::now();
                let decision = self.reviewer.review(user, namespace, name, verb).await;
                self.metrics
                    .sar_duration
                    .observe(started.elapsed().as_secs_f64());
                decision
            })
            .await
            .map_err(|e: Arc<AuthzError>| (*e).clone())
    }

    /// Whether `user` may use `namespace/name` in `mode` now. The session's owner and shares
    /// answer without the API server; otherwise `administer` (for a person's session) or
    /// `attach`/`observe` then `administer` (for a session without a person as owner) on that
    /// session's name. A session the index does not know is answered by RBAC as if it had no
    /// owner, so a refusal never tells whether it exists.
    pub async fn check(
        &self,
        user: &UserInfo,
        namespace: &str,
        name: &str,
        mode: Mode,
    ) -> Result<Decision, AuthzError> {
        let session = self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(namespace, name)
            .cloned();
        self.check_view(user, namespace, name, session.as_ref(), mode)
            .await
    }

    /// [`Self::check`] against a view of the session the caller already holds (or `None` for a
    /// session the index does not know), so that what is decided is exactly what is then used.
    pub async fn check_view(
        &self,
        user: &UserInfo,
        namespace: &str,
        name: &str,
        session: Option<&SessionView>,
        mode: Mode,
    ) -> Result<Decision, AuthzError> {
        if let Some(s) = session
            && let Some(d) = by_ownership(s, user, mode)
        {
            return Ok(d);
        }
        let owner = session.and_then(|s| s.owner.clone());
        if owner.is_none() {
            let d = self.rbac(user, namespace, Some(name), verb(mode)).await?;
            if d.allowed {
                return Ok(d);
            }
        }
        let d = self
            .rbac(user, namespace, Some(name), ADMINISTER_VERB)
            .await?;
        if d.allowed {
            return Ok(d);
        }
        Ok(Decision {
            allowed: false,
            reason: match owner {
                Some(owner) => format!(
                    "terminal session {namespace}/{name} belongs to {owner} and is not shared \
                     with {} for {}; ask the owner to add you to spec.sharing",
                    user.user,
                    mode.as_str()
                ),
                None => refusal(user, namespace, Some(name), verb(mode)),
            },
        })
    }

    /// What `user` may do with every session of `namespace`, for listing: one review per verb
    /// and namespace, cached, and only the verbs `need` asks for. RBAC rules limited to
    /// `resourceNames` are honoured when attaching (a review per session) but not here.
    pub async fn namespace_access(
        &self,
        user: &UserInfo,
        namespace: &str,
        need: NamespaceAccess,
    ) -> Result<NamespaceAccess, AuthzError> {
        let mut out = NamespaceAccess::default();
        if need.administer || need.attach || need.observe {
            out.administer = self
                .rbac(user, namespace, None, ADMINISTER_VERB)
                .await?
                .allowed;
        }
        if out.administer {
            return Ok(NamespaceAccess {
                administer: true,
                attach: true,
                observe: true,
            });
        }
        if need.attach {
            out.attach = self.rbac(user, namespace, None, "attach").await?.allowed;
        }
        if need.observe && !out.attach {
            out.observe = self.rbac(user, namespace, None, "observe").await?.allowed;
        }
        out.observe |= out.attach;
        Ok(out)
    }

    /// The modes `user` has on each of `sessions` (attach, observe), for the session list:
    /// ownership and sharing first, then [`Self::namespace_access`] for the namespaces where
    /// they do not settle it.
    pub async fn list_access(
        &self,
        user: &UserInfo,
        sessions: &[SessionView],
    ) -> Result<Vec<(bool, bool)>, AuthzError> {
        use std::collections::BTreeMap;
        let mut need: BTreeMap<&str, NamespaceAccess> = BTreeMap::new();
        let own: Vec<(bool, bool)> = sessions
            .iter()
            .map(|s| {
                let attach = by_ownership(s, user, Mode::Attach).is_some();
                let observe = attach || by_ownership(s, user, Mode::Observe).is_some();
                if !attach {
                    let n = need.entry(&s.namespace).or_default();
                    n.administer = true;
                    if s.owner.is_none() {
                        n.attach = true;
                        n.observe |= !observe;
                    }
                }
                (attach, observe)
            })
            .collect();
        let mut granted = BTreeMap::new();
        for (namespace, need) in need {
            granted.insert(
                namespace,
                self.namespace_access(user, namespace, need).await?,
            );
        }
        Ok(sessions
            .iter()
            .zip(own)
            .map(|(s, (attach, observe))| {
                let Some(g) = granted.get(s.namespace.as_str()) else {
                    return (attach, observe);
                };
                let rbac = s.owner.is_none();
                (
                    attach || g.administer || (rbac && g.attach),
                    observe || g.administer || (rbac && g.observe),
                )
            })
            .collect())
    }
}

/// A fixed policy for tests and local development without a cluster: `(user or group, namespace,
/// verb)` triples that are allowed; everything else is denied. A rule allows the verb on every
/// session of the namespace.
#[derive(Debug, Default, Clone)]
pub struct StaticAccess {
    pub rules: Vec<(String, String, String)>,
}

impl StaticAccess {
    /// Allows a mode's verb (`attach` or `observe`).
    pub fn allow(self, subject: &str, namespace: &str, mode: Mode) -> Self {
        self.allow_verb(subject, namespace, verb(mode))
    }

    /// Allows any verb, such as `administer`.
    pub fn allow_verb(mut self, subject: &str, namespace: &str, verb: &str) -> Self {
        self.rules
            .push((subject.into(), namespace.into(), verb.into()));
        self
    }
}

impl AccessReviewer for StaticAccess {
    fn review<'a>(
        &'a self,
        user: &'a UserInfo,
        namespace: &'a str,
        name: Option<&'a str>,
        verb: &'a str,
    ) -> BoxFuture<'a, Result<Decision, AuthzError>> {
        let allowed = self.rules.iter().any(|(s, ns, v)| {
            ns == namespace && v == verb && (*s == user.user || user.groups.contains(s))
        });
        let reason = if allowed {
            "allowed".to_owned()
        } else {
            refusal(user, namespace, name, verb)
        };
        Box::pin(async move { Ok(Decision { allowed, reason }) })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tether_api::{OWNER_ANNOTATION, Share, TerminalSession, TerminalSessionSpec};

    use super::*;
    use crate::index::Index;

    /// Counts reviews and the most in flight at once; answers after a delay like an API server.
    struct Counting {
        policy: StaticAccess,
        reviews: AtomicUsize,
        now: AtomicUsize,
        peak: AtomicUsize,
    }

    impl AccessReviewer for Counting {
        fn review<'a>(
            &'a self,
            user: &'a UserInfo,
            namespace: &'a str,
            name: Option<&'a str>,
            verb: &'a str,
        ) -> BoxFuture<'a, Result<Decision, AuthzError>> {
            Box::pin(async move {
                self.reviews.fetch_add(1, Ordering::SeqCst);
                let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
                self.peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                self.now.fetch_sub(1, Ordering::SeqCst);
                self.policy.review(user, namespace, name, verb).await
            })
        }
    }

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            user: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn session(ns: &str, name: &str, owner: Option<&str>, sharing: Vec<Share>) -> TerminalSession {
        let mut s = TerminalSession::new(
            name,
            TerminalSessionSpec {
                sharing,
                ..Default::default()
            },
        );
        s.metadata.namespace = Some(ns.into());
        s.metadata.uid = Some(format!("uid-{ns}-{name}"));
        if let Some(owner) = owner {
            s.metadata.annotations =
                Some([(OWNER_ANNOTATION.to_string(), owner.to_string())].into());
        }
        s
    }

    fn share(user: Option<&str>, group: Option<&str>, mode: ShareMode) -> Share {
        Share {
            user: user.map(Into::into),
            group: group.map(Into::into),
            mode,
        }
    }

    fn authorizer(
        policy: StaticAccess,
        sessions: &[TerminalSession],
    ) -> (Authorizer, Arc<Counting>) {
        let index = Index::shared();
        for s in sessions {
            index.write().unwrap().apply(s);
        }
        let counting = Arc::new(Counting {
            policy,
            reviews: AtomicUsize::new(0),
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        });
        let a = Authorizer::new(
            counting.clone(),
            Duration::from_secs(10),
            Arc::new(Metrics::new()),
            index,
        );
        (a, counting)
    }

    /// carol is bound to tether-user in team-a (attach and observe on every session there).
    fn tether_user_carol() -> StaticAccess {
        StaticAccess::default()
            .allow("carol", "team-a", Mode::Attach)
            .allow("carol", "team-a", Mode::Observe)
    }

    #[tokio::test]
    async fn only_the_owner_and_the_shares_reach_a_persons_session_not_the_namespaces_rbac() {
        let sessions = [session(
            "team-a",
            "alices",
            Some("alice"),
            vec![
                share(Some("bob"), None, ShareMode::Observe),
                share(None, Some("pairs"), ShareMode::Attach),
            ],
        )];
        let (a, counting) = authorizer(tether_user_carol(), &sessions);
        let check = |u: UserInfo, mode| {
            let a = &a;
            async move { a.check(&u, "team-a", "alices", mode).await.unwrap() }
        };
        assert!(check(user("alice", &[]), Mode::Attach).await.allowed);
        assert_eq!(
            counting.reviews.load(Ordering::SeqCst),
            0,
            "the owner costs no review"
        );
        assert!(check(user("bob", &[]), Mode::Observe).await.allowed);
        assert!(
            !check(user("bob", &[]), Mode::Attach).await.allowed,
            "observe share only"
        );
        assert!(check(user("dan", &["pairs"]), Mode::Attach).await.allowed);
        let carol = check(user("carol", &[]), Mode::Attach).await;
        assert!(
            !carol.allowed,
            "attach on the namespace does not reach a person's session"
        );
        assert!(
            carol.reason.contains("belongs to alice"),
            "{}",
            carol.reason
        );
        assert!(!check(user("carol", &[]), Mode::Observe).await.allowed);
    }

    #[tokio::test]
    async fn administer_reaches_every_session_and_rbac_reaches_sessions_without_an_owner() {
        let sessions = [
            session("team-a", "alices", Some("alice"), vec![]),
            session(
                "team-a",
                "gitops",
                Some("system:serviceaccount:flux:applier"),
                vec![],
            ),
            session("team-a", "unowned", None, vec![]),
        ];
        let policy = tether_user_carol().allow_verb("admins", "team-a", ADMINISTER_VERB);
        let (a, _) = authorizer(policy, &sessions);
        let admin = user("erin", &["admins"]);
        for name in ["alices", "gitops", "unowned"] {
            assert!(
                a.check(&admin, "team-a", name, Mode::Attach)
                    .await
                    .unwrap()
                    .allowed,
                "{name}"
            );
        }
        let carol = user("carol", &[]);
        assert!(
            a.check(&carol, "team-a", "gitops", Mode::Attach)
                .await
                .unwrap()
                .allowed
        );
        assert!(
            a.check(&carol, "team-a", "unowned", Mode::Attach)
                .await
                .unwrap()
                .allowed
        );
        assert!(
            !a.check(&carol, "team-a", "alices", Mode::Attach)
                .await
                .unwrap()
                .allowed
        );
        // Elsewhere nothing.
        assert!(
            !a.check(&carol, "team-b", "unowned", Mode::Attach)
                .await
                .unwrap()
                .allowed
        );
    }

    #[tokio::test]
    async fn identical_concurrent_questions_share_one_review_and_reviews_in_flight_are_bounded() {
        let (a, counting) = authorizer(tether_user_carol(), &[]);
        let a = Arc::new(a);
        let carol = user("carol", &[]);
        let same = (0..50).map(|_| {
            let (a, carol) = (a.clone(), carol.clone());
            tokio::spawn(async move { a.check(&carol, "team-a", "x", Mode::Attach).await })
        });
        for r in futures::future::join_all(same).await {
            assert!(r.unwrap().unwrap().allowed);
        }
        assert_eq!(counting.reviews.load(Ordering::SeqCst), 1, "single-flight");

        let distinct = (0..100).map(|i| {
            let (a, carol) = (a.clone(), carol.clone());
            tokio::spawn(async move {
                a.check(&carol, "team-a", &format!("s{i}"), Mode::Attach)
                    .await
            })
        });
        futures::future::join_all(distinct).await;
        let peak = counting.peak.load(Ordering::SeqCst);
        assert!(
            peak <= MAX_REVIEWS_IN_FLIGHT,
            "{peak} reviews in flight at once"
        );
        assert!(peak > 1, "reviews do run concurrently ({peak})");
    }

    #[tokio::test]
    async fn listing_costs_at_most_three_reviews_per_namespace_whatever_the_number_of_sessions() {
        let mut sessions = Vec::new();
        for ns in ["team-a", "team-b"] {
            for i in 0..100 {
                let owner = if i % 2 == 0 { Some("alice") } else { None };
                sessions.push(session(ns, &format!("s{i}"), owner, vec![]));
            }
        }
        let (a, counting) = authorizer(tether_user_carol(), &sessions);
        let views: Vec<SessionView> = sessions
            .iter()
            .map(|s| SessionView::from_resource(s).unwrap())
            .collect();
        let carol = user("carol", &[]);
        let access = a.list_access(&carol, &views).await.unwrap();
        let reviews = counting.reviews.load(Ordering::SeqCst);
        assert!(
            reviews <= 6,
            "{reviews} reviews for 200 sessions in 2 namespaces"
        );
        for (s, (attach, observe)) in views.iter().zip(&access) {
            let expected = s.namespace == "team-a" && s.owner.is_none();
            assert_eq!(
                (*attach, *observe),
                (expected, expected),
                "{}/{}",
                s.namespace,
                s.name
            );
        }
        // The page polls: the next listing within the cache period costs nothing.
        a.list_access(&carol, &views).await.unwrap();
        assert_eq!(counting.reviews.load(Ordering::SeqCst), reviews);
        // alice owns half of them and asks nothing for those.
        let alice = a.list_access(&user("alice", &[]), &views).await.unwrap();
        assert_eq!(alice.iter().filter(|(at, _)| *at).count(), 100);
    }
}
