//! Prometheus metrics of the operator, prefixed `tether_operator_`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use kube::runtime::reflector::Store;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tether_api::{SessionPhase, TerminalSession};

/// Label set of `reconcile_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// [`crate::Error::metric_label`], or `PodRejected` for a pod the cluster refused.
    pub reason: String,
}

/// The operator's metrics; cheap to clone, every clone counts into the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Reconciliations started.
    pub reconciliations: Counter,
    /// Failed reconciliations and refused pods, by reason.
    pub errors: Family<ErrorLabels, Counter>,
    /// Time one reconciliation takes.
    pub reconcile_duration: Histogram,
    /// Time from a session's creation to its first Ready.
    pub time_to_ready: Histogram,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    sessions: SessionsByPhase,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            reconciliations: Counter::default(),
            errors: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            time_to_ready: Histogram::new(exponential_buckets(0.25, 2.0, 12)),
            leader: Gauge::default(),
            sessions: SessionsByPhase::default(),
        };
        let r = registry.sub_registry_with_prefix("tether_operator");
        r.register(
            "reconciliations",
            "Reconciliations started",
            m.reconciliations.clone(),
        );
        r.register(
            "reconcile_errors",
            "Failed reconciliations and refused session pods, by reason",
            m.errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time one reconciliation takes",
            m.reconcile_duration.clone(),
        );
        r.register(
            "session_time_to_ready_seconds",
            "Time from a session's creation to its first Ready",
            m.time_to_ready.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader lease",
            m.leader.clone(),
        );
        r.register_collector(Box::new(m.sessions.clone()));
        m
    }

    /// Counts one error.
    pub fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Records how long a reconciliation took.
    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// Counts sessions by phase from `store` at each scrape (the leader's watch cache).
    pub fn count_sessions_in(&self, store: Store<TerminalSession>) {
        *self.sessions.0.lock().expect("not poisoned") = Some(store);
    }
}

/// `tether_operator_sessions{phase}`, computed at scrape time from the watch cache, so deleted
/// sessions leave the count without the operator having to see their deletion.
#[derive(Clone, Debug, Default)]
struct SessionsByPhase(Arc<Mutex<Option<Store<TerminalSession>>>>);

impl Collector for SessionsByPhase {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(store) = self.0.lock().expect("not poisoned").clone() else {
            return Ok(());
        };
        let mut counts = [0i64; SessionPhase::ALL.len()];
        for s in store.state() {
            let phase = s
                .status
                .as_ref()
                .and_then(|st| st.phase)
                .unwrap_or_default();
            if let Some(i) = SessionPhase::ALL.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
        }
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "sessions",
            "TerminalSessions by phase, as the leader sees them",
            None,
            gauge.metric_type(),
        )?;
        for (phase, count) in SessionPhase::ALL.iter().zip(counts) {
            let labels = vec![("phase", phase.as_str())];
            ConstGauge::new(count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SessionExt;
    use kube::runtime::{reflector, watcher};
    use tether_api::TerminalSessionStatus;

    #[test]
    fn metrics_are_exposed_with_the_operator_prefix() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.reconciliations.inc();
        m.error("Conflict");
        m.observe_reconcile(Duration::from_millis(3));
        let (reader, mut writer) = reflector::store();
        let ready = TerminalSession::test().with_status(TerminalSessionStatus {
            phase: Some(SessionPhase::Ready),
            ..Default::default()
        });
        writer.apply_watcher_event(&watcher::Event::Apply(ready));
        writer.apply_watcher_event(&watcher::Event::Apply(
            TerminalSession::test().with_name("b"),
        ));
        m.count_sessions_in(reader);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("tether_operator_reconciliations_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"tether_operator_reconcile_errors_total{reason="Conflict"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("tether_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"tether_operator_sessions{phase="Ready"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tether_operator_sessions{phase="Pending"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tether_operator_sessions{phase="Failed"} 0"#),
            "{text}"
        );
    }
}
