//! SubjectAccessReviews asked by `GET /api/sessions`, per-session (the gateway before issue 11)
//! against per-namespace (now), in one run: 1,000 sessions across 10 namespaces, 100 users who
//! each poll the list as the page does, with the same cache TTL. A counting reviewer answers
//! after 2 ms, like a nearby API server.
//!
//! `cargo bench -p tether-gateway --bench list_reviews`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tether_api::{OWNER_ANNOTATION, TerminalSession, TerminalSessionSpec};
use tether_gateway::authn::UserInfo;
use tether_gateway::authz::{AccessReviewer, Authorizer, AuthzError, Decision, StaticAccess, verb};
use tether_gateway::index::{Index, SessionView};
use tether_gateway::metrics::Metrics;
use tether_protocol::Mode;

const NAMESPACES: usize = 10;
const SESSIONS: usize = 1000;
const USERS: usize = 100;
const POLLS: usize = 3;

struct Counting(StaticAccess, AtomicUsize);

impl AccessReviewer for Counting {
    fn review<'a>(
        &'a self,
        user: &'a UserInfo,
        namespace: &'a str,
        name: Option<&'a str>,
        verb: &'a str,
    ) -> BoxFuture<'a, Result<Decision, AuthzError>> {
        Box::pin(async move {
            self.1.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.0.review(user, namespace, name, verb).await
        })
    }
}

fn setup() -> (Vec<SessionView>, Vec<UserInfo>, StaticAccess) {
    let index = Index::shared();
    let mut views = Vec::new();
    for i in 0..SESSIONS {
        let ns = format!("team-{}", i % NAMESPACES);
        let mut s = TerminalSession::new(&format!("s{i}"), TerminalSessionSpec::default());
        s.metadata.namespace = Some(ns);
        s.metadata.uid = Some(format!("uid-{i}"));
        // Half are people's, half applied by GitOps.
        if i % 2 == 0 {
            s.metadata.annotations =
                Some([(OWNER_ANNOTATION.to_string(), format!("user{}", i % USERS))].into());
        }
        index.write().unwrap().apply(&s);
        views.push(SessionView::from_resource(&s).unwrap());
    }
    let users: Vec<UserInfo> = (0..USERS)
        .map(|u| UserInfo {
            user: format!("user{u}"),
            groups: vec![format!("team-{}", u % NAMESPACES)],
        })
        .collect();
    // Each user's team is bound to tether-user in its own namespace.
    let mut access = StaticAccess::default();
    for n in 0..NAMESPACES {
        let ns = format!("team-{n}");
        access = access
            .allow(&ns, &ns, Mode::Attach)
            .allow(&ns, &ns, Mode::Observe);
    }
    (views, users, access)
}

async fn run(per_session: bool) -> (usize, Duration) {
    let (views, users, access) = setup();
    let counting = Arc::new(Counting(access, AtomicUsize::new(0)));
    let authz = Arc::new(Authorizer::new(
        counting.clone(),
        Duration::from_secs(600),
        Arc::new(Metrics::new()),
        Index::shared(),
    ));
    let started = Instant::now();
    for _ in 0..POLLS {
        let polls = users.iter().cloned().map(|user| {
            let (authz, views) = (authz.clone(), views.clone());
            tokio::spawn(async move {
                if per_session {
                    // What the list cost before: attach and observe reviewed for every session.
                    for s in &views {
                        for mode in [Mode::Attach, Mode::Observe] {
                            let _ = authz
                                .rbac(&user, &s.namespace, Some(&s.name), verb(mode))
                                .await;
                        }
                    }
                } else {
                    authz.list_access(&user, &views).await.unwrap();
                }
            })
        });
        futures::future::join_all(polls).await;
    }
    (counting.1.load(Ordering::Relaxed), started.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "GET /api/sessions: {SESSIONS} sessions in {NAMESPACES} namespaces, {USERS} users, {POLLS} polls each within the cache TTL"
    );
    let (before, t_before) = run(true).await;
    let (after, t_after) = run(false).await;
    println!("  per session (before): {before:>7} reviews in {t_before:.2?}");
    println!("  per namespace (now):  {after:>7} reviews in {t_after:.2?}");
    println!(
        "  ratio: {:.0}× fewer reviews, {:.0}× faster",
        before as f64 / after.max(1) as f64,
        t_before.as_secs_f64() / t_after.as_secs_f64().max(1e-9)
    );
}
