//! The real node as a machine sees it: a cluster starts, refuses what the runtime cannot run in
//! words, stops leaving no process, mount, network namespace, bridge, iptables chain, ipset or
//! cgroup behind, and starts again on the same machine.

use std::time::Duration;

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use tether_api::{SessionPhase, TerminalSession};
use tether_e2e::{
    binaries,
    cluster::{Cluster, ClusterOptions},
    realnode,
    wait::eventually,
};

async fn start(dir: &str, operator_args: Vec<String>) -> Cluster {
    Cluster::start(ClusterOptions {
        dir: binaries::repo_root().join("target/tether-e2e").join(dir),
        api_port: 0,
        gateway_node_port: 30444,
        operator_args,
    })
    .await
    .unwrap_or_else(|e| panic!("the cluster starts: {e:#}"))
}

async fn session(cluster: &Cluster, ns: &str, name: &str) -> Api<TerminalSession> {
    let api: Api<TerminalSession> = Api::namespaced(cluster.cp.admin_client().await, ns);
    let manifest = serde_json::json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "TerminalSession",
        "metadata": {"name": name}, "spec": {"command": ["/bin/bash"]},
    });
    api.patch(name, &PatchParams::apply("e2e"), &Patch::Apply(manifest))
        .await
        .unwrap();
    api
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_stops_clean_and_starts_again() {
    // First life: an operator configured with a RuntimeClass that does not exist. The API
    // server refuses every session pod; the session says so instead of waiting forever.
    let cluster = start(
        "lifecycle-1",
        vec!["--runtime-class-name=tether-no-such-runtime".into()],
    )
    .await;
    let ns = cluster.cp.namespace("lifecycle").await;
    let api = session(&cluster, ns.name(), "no-runtime").await;
    let status = eventually(
        "the missing RuntimeClass shows in the session's status",
        Duration::from_secs(60),
        || async {
            let st = api
                .get("no-runtime")
                .await
                .map_err(|e| e.to_string())?
                .status
                .unwrap_or_default();
            let message = st.message.clone().unwrap_or_default();
            if message.contains("tether-no-such-runtime") {
                Ok(st)
            } else {
                Err(format!("{st:?}"))
            }
        },
    )
    .await;
    assert_ne!(status.phase, Some(SessionPhase::Ready), "{status:?}");
    // A pod that is running when the node stops: its container must go with the node.
    drop(ns);
    drop(cluster);
    let left = realnode::leftovers();
    assert!(left.is_empty(), "the first node left behind: {left:#?}");

    // Second life on the same machine: a session runs in a container.
    let cluster = start("lifecycle-2", vec![]).await;
    let ns = cluster.cp.namespace("lifecycle").await;
    let api = session(&cluster, ns.name(), "runs").await;
    eventually(
        "a session on the restarted node becomes Ready",
        Duration::from_secs(120),
        || async {
            let st = api
                .get("runs")
                .await
                .map_err(|e| e.to_string())?
                .status
                .unwrap_or_default();
            if st.phase == Some(SessionPhase::Ready) {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            }
        },
    )
    .await;
    assert!(
        !realnode::leftovers().is_empty(),
        "a running node is visible to the leftover check, so its emptiness above means something"
    );
    drop(ns);
    drop(cluster);
    let left = realnode::leftovers();
    assert!(left.is_empty(), "the second node left behind: {left:#?}");
}
