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
    /// Bytes read from clients' ptys (sent or to be sent).
    pub bytes_out: Counter,
    /// Input bytes written to the session.
    pub bytes_in: Counter,
    pub resumes: Counter,
    pub snapshots: Counter,
    /// Times a client's pty reader stopped because its window was full.
    pub flow_pauses: Counter,
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
        let closes = Family::<CodeLabel, Counter>::default();
        registry.register("clients", "Connected clients by mode", clients.clone());
        registry.register(
            "output_bytes",
            "Bytes of terminal output read for clients",
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
            "Screen snapshots sent instead of a replay",
            snapshots.clone(),
        );
        registry.register(
            "flow_pauses",
            "Times a pty reader paused on a full window",
            flow_pauses.clone(),
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
