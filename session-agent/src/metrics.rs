//! Prometheus metrics, prefix `tether_agent`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// Everything the agent counts.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connected clients by mode.
    pub clients: Family<ModeLabel, Gauge>,
    /// Bytes of the session's output sent to connections (each connection counts).
    pub bytes_out: Counter,
    /// Input bytes written to the session.
    pub bytes_in: Counter,
    pub resumes: Counter,
    pub snapshots: Counter,
    /// Times a connection stopped sending because its window was full.
    pub flow_pauses: Counter,
    /// Times a connection that fell too far behind was skipped forward to a snapshot.
    pub catch_ups: Counter,
    /// Connections closed by the agent, by close code name.
    pub closes: Family<CodeLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tether_agent");
        let clients = Family::<ModeLabel, Gauge>::default();
        let bytes_out = Counter::default();
        let bytes_in = Counter::default();
        let resumes = Counter::default();
        let snapshots = Counter::default();
        let flow_pauses = Counter::default();
        let catch_ups = Counter::default();
        let closes = Family::<CodeLabel, Counter>::default();
        registry.register("clients", "Connected clients by mode", clients.clone());
        registry.register(
            "output_bytes",
            "Bytes of terminal output sent to connections",
            bytes_out.clone(),
        );
        registry.register(
            "input_bytes",
            "Bytes of input written to the session",
            bytes_in.clone(),
        );
        registry.register(
            "resumes",
            "Connections that resumed a client",
            resumes.clone(),
        );
        registry.register(
            "snapshots",
            "Snapshots sent: to new clients, to resumes past the log, and to catch up",
            snapshots.clone(),
        );
        registry.register(
            "flow_pauses",
            "Times a connection paused on a full flow-control window",
            flow_pauses.clone(),
        );
        registry.register(
            "catch_ups",
            "Times a connection far behind was skipped forward to a snapshot",
            catch_ups.clone(),
        );
        registry.register(
            "closes",
            "Connections closed by the agent, by close code",
            closes.clone(),
        );
        Self {
            registry,
            clients,
            bytes_out,
            bytes_in,
            resumes,
            snapshots,
            flow_pauses,
            catch_ups,
            closes,
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
