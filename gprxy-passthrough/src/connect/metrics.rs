//! The connector's metrics, served at `/metrics` (with `/healthz`) on `listen.metrics` by the
//! proxy's admin listener ([`crate::admin`]). Label values come from fixed sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the login counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    /// `OAUTHBEARER`, `password`, or `none` when no login was tried.
    pub mechanism: &'static str,
    /// `success`, `refused` (by the server or the connector), `no_token`, `unreachable`.
    pub outcome: &'static str,
}

/// Labels of the token-fetch counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// The source's kind.
    pub source: &'static str,
    /// `success` or `failure`.
    pub outcome: &'static str,
}

/// Labels of the refused-peer counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `unix` or `tcp`.
    pub listener: &'static str,
}

/// Labels of the byte counter: the proxy's.
pub use crate::metrics::DirectionLabels;

/// Every metric `gprxy connect` exports (prefix `gprxy_connect`).
pub struct Metrics {
    registry: Registry,
    /// Logins upstream by mechanism and outcome.
    pub logins: Family<LoginLabels, Counter>,
    /// Time from the startup packet to the server's ReadyForQuery.
    pub login_duration: Histogram,
    /// Token fetches by source and outcome (tokens reused from the cache are not fetches).
    pub token_fetches: Family<FetchLabels, Counter>,
    /// Connections from OS users not allowed, by listener.
    pub refused_peers: Family<ListenerLabels, Counter>,
    /// Connections refused because `max_connections` were open.
    pub refused_at_limit: Counter,
    /// Sessions relaying now.
    pub sessions: Gauge,
    /// Bytes relayed after login.
    pub bytes: Family<DirectionLabels, Counter>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gprxy_connect");
        let logins = Family::<LoginLabels, Counter>::default();
        registry.register("logins", "Logins upstream by mechanism and outcome", logins.clone());
        let login_duration =
            Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        registry.register(
            "login_duration_seconds",
            "Time from the startup packet to the server's ReadyForQuery",
            login_duration.clone(),
        );
        let token_fetches = Family::<FetchLabels, Counter>::default();
        registry.register("token_fetches", "Token fetches by source and outcome", token_fetches.clone());
        let refused_peers = Family::<ListenerLabels, Counter>::default();
        registry.register("refused_peers", "Connections from OS users not allowed", refused_peers.clone());
        let refused_at_limit = Counter::default();
        registry.register(
            "refused_at_limit",
            "Connections refused because max_connections were open",
            refused_at_limit.clone(),
        );
        let sessions = Gauge::default();
        registry.register("sessions_active", "Sessions relaying now", sessions.clone());
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register("relayed_bytes", "Bytes relayed after login", bytes.clone());
        Self {
            registry,
            logins,
            login_duration,
            token_fetches,
            refused_peers,
            refused_at_limit,
            sessions,
            bytes,
        }
    }

    /// Counts a login.
    pub fn login(&self, mechanism: &'static str, outcome: &'static str) {
        self.logins.get_or_create(&LoginLabels { mechanism, outcome }).inc();
    }

    /// The relayed-bytes counters: client to server, server to client.
    pub fn relayed_bytes(&self) -> (Counter, Counter) {
        let counter = |direction| self.bytes.get_or_create(&DirectionLabels { direction }).clone();
        (counter("client_to_server"), counter("server_to_client"))
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::admin::AdminSource for Metrics {
    fn metrics(&self) -> String {
        self.render()
    }

    fn draining(&self) -> bool {
        false
    }
}
