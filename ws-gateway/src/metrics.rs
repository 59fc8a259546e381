//! Prometheus metrics, prefixed `tether_gateway_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `to_agent` (keystrokes, acks) or `to_client` (output).
    pub direction: &'static str,
}

/// Every metric of the gateway.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Open proxied connections by mode.
    pub connections: Family<ModeLabel, Gauge>,
    /// Proxied connections started, by mode.
    pub connections_total: Family<ModeLabel, Counter>,
    /// WebSocket handshakes refused, by reason.
    pub handshake_failures: Family<ReasonLabel, Counter>,
    /// Frame bytes forwarded, by direction.
    pub bytes: Family<DirectionLabel, Counter>,
    /// SubjectAccessReview round trips (cache misses only).
    pub sar_duration: Histogram,
    /// JWKS fetches (first use and unknown-`kid` refetches).
    pub jwks_fetches: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tether_gateway");
        let connections = Family::<ModeLabel, Gauge>::default();
        let connections_total = Family::<ModeLabel, Counter>::default();
        let handshake_failures = Family::<ReasonLabel, Counter>::default();
        let bytes = Family::<DirectionLabel, Counter>::default();
        let sar_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let jwks_fetches = Counter::default();
        registry.register(
            "connections",
            "Open proxied terminal connections",
            connections.clone(),
        );
        registry.register(
            "connections_started",
            "Proxied terminal connections started",
            connections_total.clone(),
        );
        registry.register(
            "handshake_failures",
            "WebSocket handshakes refused, by reason",
            handshake_failures.clone(),
        );
        registry.register("frame_bytes", "Frame bytes forwarded", bytes.clone());
        registry.register(
            "sar_duration_seconds",
            "SubjectAccessReview latency (cache misses)",
            sar_duration.clone(),
        );
        registry.register("jwks_fetches", "JWKS fetches", jwks_fetches.clone());
        Self {
            registry,
            connections,
            connections_total,
            handshake_failures,
            bytes,
            sar_duration,
            jwks_fetches,
        }
    }

    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
