//! Temporary namespaces for tests: labelled, Pod Security `restricted`, deleted afterwards, and
//! dumped when the test fails so the failure can be read without rerunning it.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::{
    Api,
    api::{DeleteParams, DynamicObject, ListParams, PostParams},
    core::{ApiResource, GroupVersionKind},
};

/// Label every test namespace carries, so leftovers can be found and removed by label.
pub const E2E_LABEL: &str = "tether.dev/e2e";

/// A namespace that lives as long as one test.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    pub(crate) async fn create(kubeconfig: PathBuf, prefix: &str) -> Self {
        let client = crate::client_from_kubeconfig(&kubeconfig).await;
        let suffix: String = {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos();
            format!("{:x}", nanos ^ (std::process::id() << 8))
        };
        let name = format!("{prefix}-{suffix}");
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": {
                    E2E_LABEL: "true",
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }
            }
        }))
        .expect("a valid namespace");
        Api::<Namespace>::all(client)
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating test namespace {name}: {e}"));
        Self { name, kubeconfig }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let name = self.name.clone();
        let kubeconfig = self.kubeconfig.clone();
        // Drop cannot await; a thread with its own runtime can, even inside a test's runtime.
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(async move {
                let client = crate::client_from_kubeconfig(&kubeconfig).await;
                if failed {
                    eprintln!("{}", dump(&client, &name).await);
                }
                let _ = Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::background())
                    .await;
            });
        });
        let _ = worker.join();
    }
}

/// What a person needs to read a failed test: the namespace's pods with their phases and
/// container states, its events in order, and its TerminalSessions with their status.
pub async fn dump(client: &kube::Client, namespace: &str) -> String {
    let mut out = format!("==== state of namespace {namespace} ====\n");
    match Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
    {
        Ok(pods) => {
            for pod in pods {
                let status = pod.status.unwrap_or_default();
                out.push_str(&format!(
                    "pod {} phase={} reason={} podIP={}\n",
                    pod.metadata.name.unwrap_or_default(),
                    status.phase.unwrap_or_default(),
                    status.reason.unwrap_or_default(),
                    status.pod_ip.unwrap_or_default(),
                ));
                for cs in status.container_statuses.unwrap_or_default() {
                    out.push_str(&format!(
                        "  container {} ready={} state={}\n",
                        cs.name,
                        cs.ready,
                        serde_json::to_string(&cs.state).unwrap_or_default()
                    ));
                }
            }
        }
        Err(e) => out.push_str(&format!("(listing pods failed: {e})\n")),
    }
    match Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
    {
        Ok(events) => {
            let mut events = events.items;
            events.sort_by_key(|e| e.metadata.creation_timestamp.clone());
            for e in events {
                out.push_str(&format!(
                    "event {} {}/{} {}: {}\n",
                    e.type_.unwrap_or_default(),
                    e.involved_object.kind.unwrap_or_default(),
                    e.involved_object.name.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default()
                ));
            }
        }
        Err(e) => out.push_str(&format!("(listing events failed: {e})\n")),
    }
    let gvk = GroupVersionKind::gvk(tether_api::GROUP, tether_api::VERSION, "TerminalSession");
    let ar = ApiResource::from_gvk(&gvk);
    if let Ok(sessions) = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &ar)
        .list(&ListParams::default())
        .await
    {
        for s in sessions {
            out.push_str(&format!(
                "terminalsession {} status={}\n",
                s.metadata.name.clone().unwrap_or_default(),
                s.data
                    .get("status")
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            ));
        }
    }
    out
}
