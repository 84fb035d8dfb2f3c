//! Prometheus metrics, served on the admin listener at /metrics (with /healthz).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the login counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    /// SASL mechanism, `password`, `trust` or `none`.
    pub mechanism: String,
    /// `success`, `failure`, `discovery` or `aborted`.
    pub outcome: String,
}

/// Labels of the byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `client_to_server` or `server_to_client`.
    pub direction: &'static str,
}

/// Labels of the pool gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// Database.
    pub database: String,
    /// Service account.
    pub account: String,
}

/// Every metric gprxy exports.
pub struct Metrics {
    registry: Registry,
    /// Login attempts by mechanism and outcome.
    pub logins: Family<LoginLabels, Counter>,
    /// Time from accept to the end of authentication.
    pub login_duration: Histogram,
    /// Client connections open now.
    pub active: Gauge,
    /// Client connections accepted.
    pub connections: Counter,
    /// Bytes relayed after login.
    pub bytes: Family<DirectionLabels, Counter>,
    /// Failures to connect to the server.
    pub upstream_errors: Counter,
    /// Failed TLS handshakes with clients.
    pub tls_failures: Counter,
    /// Connections refused at the connection limit.
    pub rejected: Counter,
    /// Pooled server connections lent to clients.
    pub pool_in_use: Family<PoolLabels, Gauge>,
    /// Pooled server connections idle.
    pub pool_idle: Family<PoolLabels, Gauge>,
    /// Clients waiting for a pooled connection.
    pub pool_waiting: Family<PoolLabels, Gauge>,
    /// Time clients waited for a pooled connection.
    pub pool_wait: Histogram,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gprxy");
        let logins = Family::<LoginLabels, Counter>::default();
        registry.register("logins", "Login attempts by mechanism and outcome", logins.clone());
        let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let login_duration = Histogram::new(buckets);
        registry.register(
            "login_duration_seconds",
            "Time from accept to the end of authentication",
            login_duration.clone(),
        );
        let active = Gauge::default();
        registry.register("connections_active", "Client connections open now", active.clone());
        let connections = Counter::default();
        registry.register("connections", "Client connections accepted", connections.clone());
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register("relayed_bytes", "Bytes relayed after login", bytes.clone());
        let upstream_errors = Counter::default();
        registry.register(
            "upstream_connect_errors",
            "Failures to connect to the server",
            upstream_errors.clone(),
        );
        let tls_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes with clients",
            tls_failures.clone(),
        );
        let rejected = Counter::default();
        registry.register(
            "connections_rejected",
            "Connections refused at the connection limit",
            rejected.clone(),
        );
        let pool_in_use = Family::<PoolLabels, Gauge>::default();
        registry.register("pool_in_use", "Pooled server connections lent to clients", pool_in_use.clone());
        let pool_idle = Family::<PoolLabels, Gauge>::default();
        registry.register("pool_idle", "Pooled server connections idle", pool_idle.clone());
        let pool_waiting = Family::<PoolLabels, Gauge>::default();
        registry.register("pool_waiting", "Clients waiting for a pooled connection", pool_waiting.clone());
        let pool_wait = Histogram::new([0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0]);
        registry.register(
            "pool_wait_seconds",
            "Time clients waited for a pooled connection",
            pool_wait.clone(),
        );
        Self {
            registry,
            logins,
            login_duration,
            active,
            connections,
            bytes,
            upstream_errors,
            tls_failures,
            rejected,
            pool_in_use,
            pool_idle,
            pool_waiting,
            pool_wait,
        }
    }

    /// Counts one login.
    pub fn login(&self, mechanism: &str, outcome: &str) {
        self.logins
            .get_or_create(&LoginLabels { mechanism: mechanism.to_owned(), outcome: outcome.to_owned() })
            .inc();
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
