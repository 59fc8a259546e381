//! Leader election on a coordination.k8s.io Lease, through `kube-lease-manager`: only the
//! replica holding the lease runs the controller. A leader that loses the lease stops its
//! controller and exits, so it never acts on a stale belief; its supervisor restarts it as a
//! standby. A leader shutting down releases the lease so a standby takes over at once.
//!
//! kube-lease-manager only reports a loss it sees: while the API server is unreachable its
//! renewals fail and it keeps believing it leads, while a standby that still reaches the server
//! takes the expired lease. So a leader also runs a watchdog, like client-go's renew deadline: it
//! reads the Lease itself and steps down when it has not seen its own unexpired hold for long
//! enough that the lease may expire before it could learn otherwise. A slow API server alone
//! does not end a leadership: reads overlap, so one stuck request does not hide the next
//! answer, while the deadline still never passes what an answer proved.

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
                _ = watchdog(|| leases.get_opt(&settings.name), settings.clone()) => {}
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

/// At most this many reads of the Lease are in flight at once.
const READS_IN_FLIGHT: usize = 3;

/// Returns when this replica must stop acting: the Lease names someone else or is gone, or the
/// time its last seen hold allows has come (the API server is unreachable, renewals fail). The
/// deadline is a timer of its own, so a slow or hanging read cannot delay it.
///
/// A slow API server alone does not make a leader step down: a new read starts every
/// [`check_every`] even while earlier ones are still waiting (at most [`READS_IN_FLIGHT`]), so
/// one request stuck in a queue or on a dead connection does not hide the answers of the next.
/// Whichever read answers, the deadline only moves to what that answer proves: the hold it
/// shows, as renewed at its `renewTime`, less the margin. It never moves past the lease's own
/// expiry, so no standby can take the lease while this replica still acts.
async fn watchdog<R, F>(read: R, settings: LeaseSettings)
where
    R: Fn() -> F,
    F: Future<Output = kube::Result<Option<Lease>>>,
{
    let margin = margin(&settings);
    // Until the first answer: a lease just taken or renewed. The first read starts at once,
    // since a replica restarted under the same identity may hold an older renewal.
    let mut until = SystemTime::now() + settings.duration.saturating_sub(margin);
    let mut answered = false;
    let mut tick = tokio::time::interval(check_every(&settings));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reads = futures::stream::FuturesUnordered::new();
    loop {
        let left = until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(left) => {
                warn!(in_flight = reads.len(), "could not confirm the leader lease before it could expire; stepping down");
                return;
            }
            _ = tick.tick(), if reads.len() < READS_IN_FLIGHT => {
                reads.push(tokio::time::timeout(settings.duration, read()));
            }
            Some(answer) = futures::StreamExt::next(&mut reads) => match answer {
                Ok(Ok(Some(lease))) => match acts_until(&lease, &settings.identity, margin) {
                    // The first answer replaces the guess, which may be later than the truth.
                    // An answer that overtook a newer one shows an older renewal: keep the later.
                    Some(t) => {
                        until = if answered { until.max(t) } else { t };
                        answered = true;
                    }
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

    fn settings(duration: u64, grace: u64) -> LeaseSettings {
        LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "me".into(),
            duration: Duration::from_secs(duration),
            grace: Duration::from_secs(grace),
        }
    }

    fn held_since(at: SystemTime, holder: &str, duration: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(Timestamp::try_from(at).unwrap())),
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A read that never answers, as a request stuck in the API server's queue.
    async fn stuck() -> kube::Result<Option<Lease>> {
        std::future::pending().await
    }

    #[tokio::test]
    async fn one_stuck_read_does_not_make_a_renewing_leader_step_down() {
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let read = || {
            let n = reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n == 0 {
                    stuck().await
                } else {
                    // Renewals land: every later answer shows a fresh hold.
                    Ok(Some(held_since(SystemTime::now(), "me", 2)))
                }
            }
        };
        // Three lease durations: the first read would have held the leader past its deadline.
        let outcome =
            tokio::time::timeout(Duration::from_secs(6), watchdog(read, settings(2, 1))).await;
        assert!(
            outcome.is_err(),
            "the leader stepped down though renewals landed"
        );
        assert!(reads.load(std::sync::atomic::Ordering::SeqCst) > 2);
    }

    #[tokio::test]
    async fn a_leader_that_hears_nothing_steps_down_before_its_lease_expires() {
        let renewed = SystemTime::now();
        tokio::time::timeout(Duration::from_secs(10), watchdog(stuck, settings(4, 2)))
            .await
            .expect("the watchdog never stepped down");
        let expiry = renewed + Duration::from_secs(4);
        assert!(
            SystemTime::now() < expiry,
            "stepped down {:?} after the lease expired",
            SystemTime::now().duration_since(expiry).unwrap_or_default()
        );
    }

    #[tokio::test]
    async fn the_first_answer_replaces_the_guess_even_when_it_shows_an_older_renewal() {
        // Restarted under the same identity: the lease it finds was renewed 3 s ago and expires
        // in 1 s, far earlier than the guess of a fresh hold.
        let renewed = SystemTime::now() - Duration::from_secs(3);
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let read = || {
            let n = reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n == 0 {
                    Ok(Some(held_since(renewed, "me", 4)))
                } else {
                    stuck().await
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), watchdog(read, settings(4, 2)))
            .await
            .expect("the watchdog never stepped down");
        assert!(SystemTime::now() < renewed + Duration::from_secs(4));
    }

    #[tokio::test]
    async fn another_holder_or_a_deleted_lease_ends_leadership_at_once() {
        let started = std::time::Instant::now();
        let other = || async { Ok(Some(held_since(SystemTime::now(), "usurper", 60))) };
        watchdog(other, settings(4, 2)).await;
        let gone = || async { Ok(None) };
        watchdog(gone, settings(4, 2)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
