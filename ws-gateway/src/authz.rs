//! Authorization: Kubernetes RBAC through SubjectAccessReview, with a short-lived cache.
//!
//! The verbs are `attach` (interactive) and `observe` (read-only) on `terminalsessions` in group
//! `tether.dev`, never `get`: a role that may read sessions may not type into them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use tether_protocol::Mode;

use crate::authn::UserInfo;
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

#[derive(Debug, thiserror::Error)]
#[error("cannot check permissions right now: {0}")]
pub struct AuthzError(pub String);

/// Something that decides whether a user may use a session in a mode.
pub trait AccessReviewer: Send + Sync + 'static {
    fn review<'a>(
        &'a self,
        user: &'a UserInfo,
        namespace: &'a str,
        name: &'a str,
        mode: Mode,
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

impl AccessReviewer for KubeAccessReview {
    fn review<'a>(
        &'a self,
        user: &'a UserInfo,
        namespace: &'a str,
        name: &'a str,
        mode: Mode,
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
                        verb: Some(verb(mode).into()),
                        namespace: Some(namespace.into()),
                        name: Some(name.into()),
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
                format!(
                    "user {} may not {} terminalsessions/{name} in namespace {namespace}: {detail}",
                    user.user,
                    verb(mode)
                )
            };
            Ok(Decision {
                allowed: status.allowed,
                reason,
            })
        })
    }
}

type Key = (String, Vec<String>, String, String, Mode);

/// Caches decisions for a few seconds so a page listing sessions does not flood the API server.
pub struct Authorizer {
    reviewer: Arc<dyn AccessReviewer>,
    ttl: Duration,
    cache: Mutex<HashMap<Key, (Instant, Decision)>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// Entries beyond this are dropped wholesale; the cache is an optimisation, not state.
const MAX_CACHE_ENTRIES: usize = 10_000;

impl Authorizer {
    pub fn new(reviewer: Arc<dyn AccessReviewer>, ttl: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            reviewer,
            ttl,
            cache: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub async fn check(
        &self,
        user: &UserInfo,
        namespace: &str,
        name: &str,
        mode: Mode,
    ) -> Result<Decision, AuthzError> {
        let mut groups = user.groups.clone();
        groups.sort();
        let key: Key = (
            user.user.clone(),
            groups,
            namespace.into(),
            name.into(),
            mode,
        );
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, d)) = cache.get(&key)
                && at.elapsed() < self.ttl
            {
                return Ok(d.clone());
            }
        }
        let started = Instant::now();
        let decision = self.reviewer.review(user, namespace, name, mode).await;
        self.metrics
            .sar_duration
            .observe(started.elapsed().as_secs_f64());
        let decision = decision?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), decision.clone()));
        Ok(decision)
    }
}

/// A fixed policy for tests and local development without a cluster: `(user or group, namespace,
/// verb)` triples that are allowed; everything else is denied.
#[derive(Debug, Default, Clone)]
pub struct StaticAccess {
    pub rules: Vec<(String, String, Mode)>,
}

impl StaticAccess {
    pub fn allow(mut self, subject: &str, namespace: &str, mode: Mode) -> Self {
        self.rules.push((subject.into(), namespace.into(), mode));
        self
    }
}

impl AccessReviewer for StaticAccess {
    fn review<'a>(
        &'a self,
        user: &'a UserInfo,
        namespace: &'a str,
        name: &'a str,
        mode: Mode,
    ) -> BoxFuture<'a, Result<Decision, AuthzError>> {
        let allowed = self.rules.iter().any(|(s, ns, m)| {
            ns == namespace && *m == mode && (*s == user.user || user.groups.contains(s))
        });
        let reason = if allowed {
            "allowed".to_owned()
        } else {
            format!(
                "user {} may not {} terminalsessions/{name} in namespace {namespace}",
                user.user,
                verb(mode)
            )
        };
        Box::pin(async move { Ok(Decision { allowed, reason }) })
    }
}
