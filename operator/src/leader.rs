//! Leader election on a coordination.k8s.io Lease, through `kube-lease-manager`: only the
//! replica holding the lease runs the controller. A leader that loses the lease stops its
//! controller and exits, so it never acts on a stale belief; its supervisor restarts it as a
//! standby. A leader shutting down releases the lease so a standby takes over at once.
//!
//! kube-lease-manager only reports a loss it sees: while the API server is unreachable its
//! renewals fail and it keeps believing it leads, while a standby that still reaches the server
//! takes the expired lease. So a leader also runs a watchdog, like client-go's renew deadline: it
//! reads the Lease itself and steps down when it has not seen its own unexpired hold for long
//! enough that the lease may expire before it could learn otherwise.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
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
    leases: Api<Lease>,
    settings: LeaseSettings,
    /// The task behind [`Leadership::lost`]; it holds a receiver of the manager's channel, so it
    /// must end before the manager can see that nobody listens and release the lease.
    watching: Option<JoinHandle<()>>,
}

impl Leadership {
    /// Starts taking part in the election; the lease is created when missing.
    pub async fn start(client: Client, settings: &LeaseSettings) -> Result<Self> {
        let leases = Api::namespaced(client.clone(), &settings.namespace);
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
        Ok(Self {
            state,
            task,
            leases,
            settings: settings.clone(),
            watching: None,
        })
    }

    /// Waits until this replica holds the lease. `false` when the election ended instead.
    pub async fn acquired(&mut self) -> bool {
        self.state.wait_for(|leading| *leading).await.is_ok()
    }

    /// Resolves when this replica no longer holds the lease (or the election ended), or can no
    /// longer show that it does before the lease would expire. Call it once elected.
    pub fn lost(&mut self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut state = self.state.clone();
        let leases = self.leases.clone();
        let settings = self.settings.clone();
        let (tx, mut rx) = watch::channel(false);
        if let Some(old) = self.watching.take() {
            old.abort();
        }
        self.watching = Some(tokio::spawn(async move {
            tokio::select! {
                _ = state.wait_for(|leading| !*leading) => {}
                _ = watchdog(leases, settings) => {}
            }
            let _ = tx.send(true);
        }));
        async move {
            // An error means `release` stopped the watch: shutting down, not lost.
            if rx.wait_for(|lost| *lost).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Leaves the election, releasing the lease when held.
    pub async fn release(mut self) {
        if let Some(watching) = self.watching.take() {
            watching.abort();
            let _ = watching.await;
        }
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

/// How much earlier than the lease's expiry a leader that has not seen its renewal steps down.
/// The renewal is due a whole grace before expiry, which leaves three quarters of the grace for
/// it to land and be read.
fn margin(settings: &LeaseSettings) -> Duration {
    settings.grace / 4
}

/// How often the watchdog reads the Lease: a few times within the window a renewal has.
fn check_every(settings: &LeaseSettings) -> Duration {
    (settings.grace / 4).max(Duration::from_millis(100))
}

/// Until when `lease` lets `identity` act: its renew time plus its duration, less `margin`.
/// `None` when someone else (or nobody) holds it.
pub fn acts_until(lease: &Lease, identity: &str, margin: Duration) -> Option<SystemTime> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = SystemTime::from(spec.renew_time.as_ref()?.0);
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
    Some((renewed + duration).checked_sub(margin).unwrap_or(renewed))
}

/// Returns when this replica must stop acting: the Lease names someone else or is gone, or the
/// time its last seen hold allows has come (the API server is unreachable, renewals fail). The
/// deadline is a timer of its own, so a slow or hanging read cannot delay it.
async fn watchdog(leases: Api<Lease>, settings: LeaseSettings) {
    let margin = margin(&settings);
    let every = check_every(&settings);
    // Until the first read: a lease just taken or renewed. The first read comes at once, since
    // a replica restarted under the same identity may hold an older renewal.
    let mut until = SystemTime::now() + settings.duration.saturating_sub(margin);
    let mut pause = Duration::ZERO;
    loop {
        let left = until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let wait = std::mem::replace(&mut pause, every);
        let read = async {
            tokio::time::sleep(wait).await;
            tokio::time::timeout(settings.duration, leases.get_opt(&settings.name)).await
        };
        tokio::select! {
            () = tokio::time::sleep(left) => {
                warn!("could not confirm the leader lease before it could expire; stepping down");
                return;
            }
            answer = read => match answer {
                Ok(Ok(Some(lease))) => match acts_until(&lease, &settings.identity, margin) {
                    Some(t) => until = t,
                    None => {
                        let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                        warn!(%holder, "the leader lease is held by another replica");
                        return;
                    }
                },
                Ok(Ok(None)) => {
                    warn!("the leader lease was deleted");
                    return;
                }
                Ok(Err(e)) => warn!(error = %e, "cannot read the leader lease"),
                Err(_) => warn!("reading the leader lease timed out"),
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::Timestamp;

    fn lease(holder: Option<&str>, renewed_secs: i64, duration: Option<i32>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed_secs).unwrap())),
                lease_duration_seconds: duration,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_holder_acts_until_renew_time_plus_duration_less_the_margin() {
        let until = acts_until(
            &lease(Some("me"), 1_000, Some(15)),
            "me",
            Duration::from_millis(1250),
        );
        assert_eq!(
            until,
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_013_750))
        );
    }

    #[test]
    fn anyone_else_or_a_lease_without_times_gives_no_right_to_act() {
        let m = Duration::from_secs(1);
        assert_eq!(
            acts_until(&lease(Some("other"), 1_000, Some(15)), "me", m),
            None
        );
        assert_eq!(acts_until(&lease(None, 1_000, Some(15)), "me", m), None);
        assert_eq!(acts_until(&lease(Some("me"), 1_000, None), "me", m), None);
        assert_eq!(
            acts_until(&lease(Some("me"), 1_000, Some(-5)), "me", m),
            None
        );
        assert_eq!(acts_until(&Lease::default(), "me", m), None);
    }

    #[test]
    fn checks_come_several_times_within_the_margin() {
        let s = LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "me".into(),
            duration: Duration::from_secs(15),
            grace: Duration::from_secs(5),
        };
        // Renewal is due 5 s before expiry; stepping down comes 1.25 s before it, so the
        // renewal has 3.75 s to land and be read: at least three reads.
        assert_eq!(margin(&s), Duration::from_millis(1250));
        assert!(check_every(&s) * 3 <= s.grace - margin(&s));
    }
}
