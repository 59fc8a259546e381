//! The open-attach ledger: every attach has exactly one end record, even when a gateway is
//! killed (SIGKILL, OOM, node loss) and its connection tasks never write theirs.
//!
//! Each gateway process keeps its open attaches in a ConfigMap of its own namespace named
//! `tether-gateway-attaches-<pod>`, labelled `tether.dev/attach-ledger`, annotated with the pod
//! and a random ID of this process (`tether.dev/instance`). A key per open attach (its audit
//! `id`) holds the start record; it is added before the start record is written and removed
//! after the end record is.
//!
//! At start, and every `--attach-ledger-interval`, each gateway looks at every ledger: one of
//! its own pod but another process (the container restarted), or of a pod that no longer exists,
//! is an orphan. The gateway deletes the orphan with its `resourceVersion` as a precondition (so
//! of replicas that race, exactly one wins), then writes one end record per attach in it:
//! `endedBy: "gateway-crash"`, reason `gateway <pod> ended without closing: killed or crashed`.
//!
//! What it cannot do: a gateway killed between writing an end record and removing the key gets a
//! second end record from the reconciliation (a window of one API request); a ledger write that
//! fails (API server unreachable) is logged, and that attach then relies on its own end record.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::audit::AuditLog;

const LABEL: &str = "tether.dev/attach-ledger";
const POD: &str = "tether.dev/pod";
const INSTANCE: &str = "tether.dev/instance";

enum Op {
    Open(String, serde_json::Value, oneshot::Sender<()>),
    Close(String),
}

/// Handle to this process's ledger; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<Op>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Op")
    }
}

impl Ledger {
    /// Records an open attach; returns once it is in the ledger (or the write failed).
    pub async fn open(&self, id: &str, start: serde_json::Value) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Op::Open(id.to_owned(), start, done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        }
    }

    /// Removes an attach whose end record was written.
    pub fn close(&self, id: &str) {
        let _ = self.tx.send(Op::Close(id.to_owned()));
    }

    /// Starts the ledger of `pod` in `namespace`: reconciles orphans first (so the previous
    /// process of this pod is closed before this one writes), then serves writes and
    /// reconciles every `every`.
    pub async fn start(
        client: Client,
        namespace: &str,
        pod: &str,
        every: Duration,
        audit: AuditLog,
    ) -> Ledger {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let instance = format!("{:032x}", rand::random::<u128>());
        let me = Me {
            api,
            pods,
            pod: pod.to_owned(),
            instance,
            audit,
        };
        me.reconcile().await;
        me.create().await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    op = rx.recv() => match op {
                        None => return,
                        Some(Op::Open(id, start, done)) => {
                            me.set(&id, Some(start.to_string())).await;
                            let _ = done.send(());
                        }
                        Some(Op::Close(id)) => me.set(&id, None).await,
                    },
                    _ = tick.tick() => me.reconcile().await,
                }
            }
        });
        Ledger { tx }
    }
}

struct Me {
    api: Api<ConfigMap>,
    pods: Api<Pod>,
    pod: String,
    instance: String,
    audit: AuditLog,
}

impl Me {
    fn name(&self) -> String {
        format!("tether-gateway-attaches-{}", self.pod)
    }

    async fn create(&self) {
        let cm: ConfigMap = match serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": self.name(),
                "labels": {LABEL: "true"},
                "annotations": {POD: self.pod, INSTANCE: self.instance},
            },
        })) {
            Ok(cm) => cm,
            Err(_) => return,
        };
        if let Err(e) = self.api.create(&PostParams::default(), &cm).await {
            tracing::warn!(error = %e, "cannot create the attach ledger");
        }
    }

    async fn set(&self, id: &str, value: Option<String>) {
        let patch = json!({"data": {id: value}});
        for attempt in 0..3 {
            match self
                .api
                .patch(&self.name(), &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return,
                // Deleted under us (by a replica that took this pod for gone): make it again.
                Err(kube::Error::Api(e)) if e.code == 404 && attempt == 0 => self.create().await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot update the attach ledger");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Ends the attaches of every orphaned ledger, exactly once across replicas.
    async fn reconcile(&self) {
        let list = match self
            .api
            .list(&ListParams::default().labels(&format!("{LABEL}=true")))
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list attach ledgers");
                return;
            }
        };
        for cm in list {
            let ann = cm.metadata.annotations.clone().unwrap_or_default();
            let (Some(pod), Some(instance)) = (ann.get(POD), ann.get(INSTANCE)) else {
                continue;
            };
            let orphan = if *pod == self.pod {
                *instance != self.instance
            } else {
                matches!(self.pods.get_opt(pod).await, Ok(None))
            };
            if !orphan {
                continue;
            }
            let Some(name) = cm.metadata.name.clone() else {
                continue;
            };
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: cm.metadata.resource_version.clone(),
                    uid: cm.metadata.uid.clone(),
                }),
                ..Default::default()
            };
            // Only the replica whose delete succeeds writes the end records.
            if let Err(e) = self.api.delete(&name, &dp).await {
                tracing::debug!(error = %e, ledger = %name, "another replica reconciles it");
                continue;
            }
            let open: BTreeMap<String, String> = cm.data.unwrap_or_default();
            tracing::warn!(%pod, attaches = open.len(), "closing the attaches of a gateway that ended without closing them");
            for (id, start) in open {
                let start: serde_json::Value = serde_json::from_str(&start).unwrap_or_default();
                self.audit.orphan_end(
                    &id,
                    &start,
                    &format!("gateway {pod} ended without closing: killed or crashed"),
                );
            }
        }
    }
}
