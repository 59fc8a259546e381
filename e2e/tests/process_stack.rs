//! The process stand-in of `cargo dev up --node=process`: a component that exits is restarted,
//! as a Deployment's kubelet would, and takes up its work again.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tether_e2e::{
    ControlPlane,
    stack::{SYSTEM_NAMESPACE, Stack, StackOptions},
    wait::eventually,
};

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("tether-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

#[tokio::test]
async fn an_operator_that_exits_is_restarted_and_leads_again() {
    let cp = ControlPlane::shared().await;
    let dir = tempfile::tempdir().unwrap();
    let mut stack = Stack::start(
        cp,
        StackOptions {
            dir: dir.path().to_path_buf(),
            gateway_port: 0,
            operator_args: vec![],
        },
    )
    .await
    .expect("the stack starts");
    let leases: Api<Lease> = Api::namespaced(cp.admin_client().await, SYSTEM_NAMESPACE);
    let first = eventually("the operator leads", Duration::from_secs(60), || async {
        holder(&leases)
            .await
            .ok_or_else(|| "no holder yet".to_string())
    })
    .await;
    assert!(stack.revive().is_empty(), "nothing has exited yet");

    stack.crash_operator();
    let said = eventually("the operator is restarted", Duration::from_secs(30), || {
        let said = stack.revive();
        async move {
            if said.is_empty() {
                Err("not restarted yet".to_string())
            } else {
                Ok(said)
            }
        }
    })
    .await;
    assert!(
        said[0].starts_with("the operator exited") && said[0].contains("restarted it (restart 1"),
        "{said:?}"
    );
    // The new process stands for leader under a new identity and takes the lease once the
    // crashed one's expires.
    eventually(
        "the restarted operator leads",
        Duration::from_secs(60),
        || async {
            match holder(&leases).await {
                Some(h) if h != first => Ok(()),
                h => Err(format!("the lease is held by {h:?}")),
            }
        },
    )
    .await;
    stack.stop();
}
