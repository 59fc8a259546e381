//! Leader election on a coordination.k8s.io Lease, through `kube-lease-manager`: only the
//! replica holding the lease runs the controller. A leader that loses the lease stops its
//! controller and exits, so it never acts on a stale belief; its supervisor restarts it as a
//! standby. A leader shutting down releases the lease so a standby takes over at once.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{Error, Result};

/// Where and how to hold the lease.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity in `holderIdentity`.
    pub identity: String,
    /// How long the lease stays valid without renewal.
    pub duration: Duration,
    /// How long before expiry the holder renews.
    pub grace: Duration,
}

/// A replica's stake in the lease.
#[derive(Debug)]
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<LeaseManager>>,
}

impl Leadership {
    /// Starts taking part in the election; the lease is created when missing.
    pub async fn start(client: Client, settings: &LeaseSettings) -> Result<Self> {
        let manager = LeaseManagerBuilder::new(client, &settings.name)
            .with_namespace(&settings.namespace)
            .with_identity(&settings.identity)
            .with_duration(settings.duration.as_secs())
            .with_grace(settings.grace.as_secs())
            .with_field_manager(format!("{}-lease", crate::FIELD_MANAGER))
            .build()
            .await
            .map_err(Error::Lease)?;
        let (state, task) = manager.watch().await;
        info!(identity = %settings.identity, lease = %format!("{}/{}", settings.namespace, settings.name), "standing for leader");
        Ok(Self { state, task })
    }

    /// Waits until this replica holds the lease. `false` when the election ended instead.
    pub async fn acquired(&mut self) -> bool {
        self.state.wait_for(|leading| *leading).await.is_ok()
    }

    /// Resolves when this replica no longer holds the lease (or the election ended).
    pub fn lost(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut state = self.state.clone();
        async move {
            let _ = state.wait_for(|leading| !*leading).await;
        }
    }

    /// Leaves the election, releasing the lease when held.
    pub async fn release(self) {
        drop(self.state);
        match self.task.await {
            Ok(Ok(_)) => info!("released the leader lease"),
            Ok(Err(e)) => {
                warn!(error = %e, "could not release the leader lease; it expires by itself")
            }
            Err(e) => warn!(error = %e, "lease task failed"),
        }
    }
}

/// An identity unique to this process: the host name and a random suffix.
pub fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tether-operator".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{host}_{:x}{nanos:08x}", std::process::id())
}
