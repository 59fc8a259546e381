//! The operator's lease renewals while the gateway reviews access for `GET /api/sessions`, on a
//! real kube-apiserver with the chart's API Priority and Fairness objects, in one run:
//! - idle;
//! - under the gateway's review pattern before issue 11: every request reviews attach and
//!   observe for every session in the cluster, all at once, uncached (ten concurrent requests,
//!   as in the finding);
//! - under today's gateway (`Authorizer::list_access`: per namespace and user, cached for the
//!   default 10 s, single-flight, at most 16 reviews in flight): 100 users polling every 5 s
//!   as the page does, 6 polls each.
//!
//! 1,000 sessions in 10 namespaces. The renewer acts as the operator's service account (so the
//! chart's FlowSchema puts it in `leader-election`) and does what a lease holder does: read the
//! Lease, patch a new `renewTime` conditional on its version, every 100 ms. The reviewer is the gateway's own
//! `KubeAccessReview` with the gateway's service account.
//!
//! `cargo bench -p tether-e2e --bench lease_under_review_load`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tether_api::{OWNER_ANNOTATION, TerminalSession, TerminalSessionSpec};
use tether_e2e::stack::{SYSTEM_NAMESPACE, apply_chart_kinds};
use tether_e2e::{ControlPlane, Options, client_from_kubeconfig};
use tether_gateway::authn::UserInfo;
use tether_gateway::authz::{AccessReviewer, Authorizer, KubeAccessReview, verb};
use tether_gateway::index::{Index, SessionView};
use tether_gateway::metrics::Metrics;
use tether_protocol::Mode;

const NAMESPACES: usize = 10;
const SESSIONS: usize = 1000;
const USERS: usize = 100;
/// How often the page polls the list, and how many times each user does in the bench.
const PAGE_POLL: Duration = Duration::from_secs(5);
const POLLS: usize = 6;
const OLD_CONCURRENT_REQUESTS: usize = 10;
const LEASE: &str = "tether-operator";

struct Latencies(Vec<Duration>);

impl Latencies {
    fn at(&self, q: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
}

/// Renews the Lease every 100 ms until `stop`, timing each read-and-write.
async fn renew(client: Client, stop: Arc<AtomicBool>) -> Latencies {
    let leases: Api<Lease> = Api::namespaced(client, SYSTEM_NAMESPACE);
    let mut took = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let lease = leases.get(LEASE).await.expect("reading the lease");
        // As kube-lease-manager does: a patch, conditional on the version just read.
        let renewal = serde_json::json!({
            "metadata": {"resourceVersion": lease.metadata.resource_version},
            "spec": {"renewTime": MicroTime(jiff::Timestamp::now())},
        });
        leases
            .patch(LEASE, &PatchParams::default(), &Patch::Merge(&renewal))
            .await
            .expect("renewing the lease");
        took.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Latencies(took)
}

/// Renews while `load` runs (or for `idle` when there is none); returns the reviews the load
/// made, how long it took, and the renewals' latencies.
async fn phase<F: Future<Output = usize>>(
    operator: &Client,
    load: F,
) -> (usize, Duration, Latencies) {
    let stop = Arc::new(AtomicBool::new(false));
    let renewer = tokio::spawn(renew(operator.clone(), stop.clone()));
    let started = Instant::now();
    let reviews = load.await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    (reviews, took, renewer.await.unwrap())
}

fn sessions() -> Vec<SessionView> {
    (0..SESSIONS)
        .map(|i| {
            let mut s = TerminalSession::new(&format!("s{i}"), TerminalSessionSpec::default());
            s.metadata.namespace = Some(format!("team-{}", i % NAMESPACES));
            s.metadata.uid = Some(format!("uid-{i}"));
            // Half are people's, half applied by GitOps.
            if i % 2 == 0 {
                s.metadata.annotations =
                    Some([(OWNER_ANNOTATION.to_string(), format!("user{}", i % USERS))].into());
            }
            SessionView::from_resource(&s).unwrap()
        })
        .collect()
}

fn users() -> Vec<UserInfo> {
    (0..USERS)
        .map(|u| UserInfo {
            user: format!("user{u}"),
            groups: vec![format!("team-{}", u % NAMESPACES)],
        })
        .collect()
}

fn report(name: &str, reviews: usize, took: Duration, l: &Latencies, idle: &Latencies) {
    println!(
        "  {name:<34} {reviews:>6} reviews in {:>6.2}s · {:>4} renewals · p50 {:>7.1?} p99 {:>8.1?} max {:>8.1?} · p99 ×{:.1} idle",
        took.as_secs_f64(),
        l.0.len(),
        l.at(0.5),
        l.at(0.99),
        l.at(1.0),
        l.at(0.99).as_secs_f64() / idle.at(0.99).as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    eprintln!("starting a control plane (etcd, kube-apiserver) …");
    let cp = ControlPlane::start(Options {
        dir: dir.path().join("cp"),
        api_port: 0,
        bind: None,
    })
    .await?;
    apply_chart_kinds(
        &cp,
        &[
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "PriorityLevelConfiguration",
            "FlowSchema",
        ],
    )
    .await?;
    let operator = client_from_kubeconfig(
        &cp.service_account_kubeconfig(SYSTEM_NAMESPACE, "tether-operator")
            .await,
    )
    .await;
    let gateway = client_from_kubeconfig(
        &cp.service_account_kubeconfig(SYSTEM_NAMESPACE, "tether-gateway")
            .await,
    )
    .await;
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(LEASE.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("bench".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    Api::<Lease>::namespaced(cp.admin_client().await, SYSTEM_NAMESPACE)
        .create(&PostParams::default(), &lease)
        .await?;
    let views = sessions();
    let users = users();
    println!(
        "Lease renewals (GET + PATCH, every 100 ms, operator's service account) on a real kube-apiserver with the chart's FlowSchemas;"
    );
    println!(
        "GET /api/sessions reviews: {SESSIONS} sessions in {NAMESPACES} namespaces, {USERS} users"
    );

    let idle_wait = async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        0
    };
    let (_, _, idle) = phase(&operator, idle_wait).await;

    let reviewer = Arc::new(KubeAccessReview(gateway.clone()));
    let old = async {
        // Ten requests at once, each reviewing both verbs for every session, all in flight.
        let requests = users.iter().take(OLD_CONCURRENT_REQUESTS).map(|user| {
            let (reviewer, views) = (reviewer.clone(), &views);
            async move {
                let reviews = views.iter().flat_map(|s| {
                    [Mode::Attach, Mode::Observe]
                        .map(|mode| reviewer.review(user, &s.namespace, Some(&s.name), verb(mode)))
                });
                futures::future::join_all(reviews)
                    .await
                    .into_iter()
                    .filter(Result::is_ok)
                    .count()
            }
        });
        futures::future::join_all(requests).await.into_iter().sum()
    };
    let (old_reviews, old_took, old_lat) = phase(&operator, old).await;

    let counting = Arc::new(Counting(reviewer.clone(), Default::default()));
    let authz = Arc::new(Authorizer::new(
        counting.clone(),
        Duration::from_secs(10),
        Arc::new(Metrics::new()),
        Index::shared(),
    ));
    let now = async {
        // As the page does: every user polls every 5 s, their polls spread over the period.
        let polls = users.iter().cloned().enumerate().map(|(u, user)| {
            let (authz, views) = (authz.clone(), views.clone());
            tokio::spawn(async move {
                tokio::time::sleep(PAGE_POLL * u as u32 / USERS as u32).await;
                let mut every = tokio::time::interval(PAGE_POLL);
                for _ in 0..POLLS {
                    every.tick().await;
                    authz.list_access(&user, &views).await.unwrap();
                }
            })
        });
        futures::future::join_all(polls).await;
        counting.1.load(Ordering::Relaxed)
    };
    let (now_reviews, now_took, now_lat) = phase(&operator, now).await;

    report("idle", 0, Duration::from_secs(10), &idle, &idle);
    report(
        &format!("before: {OLD_CONCURRENT_REQUESTS} requests, per session"),
        old_reviews,
        old_took,
        &old_lat,
        &idle,
    );
    report(
        &format!("now: {USERS} users polling every 5 s"),
        now_reviews,
        now_took,
        &now_lat,
        &idle,
    );
    cp.stop();
    Ok(())
}

/// Counts the reviews the authorizer sends.
struct Counting(Arc<KubeAccessReview>, std::sync::atomic::AtomicUsize);

impl AccessReviewer for Counting {
    fn review<'a>(
        &'a self,
        user: &'a UserInfo,
        namespace: &'a str,
        name: Option<&'a str>,
        verb: &'a str,
    ) -> futures::future::BoxFuture<
        'a,
        Result<tether_gateway::authz::Decision, tether_gateway::authz::AuthzError>,
    > {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.review(user, namespace, name, verb)
    }
}
