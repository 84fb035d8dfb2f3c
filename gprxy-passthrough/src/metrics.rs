//! Prometheus metrics, served on the admin listener at /metrics (with /healthz).
//!
//! Label values come from fixed sets (a mechanism a client names is `other` unless gprxy knows
//! it; a pool is exported once it has logged in, so its database exists, and at most
//! [`MAX_POOL_LABEL_SETS`] of them); prometheus-client (0.26 and later) writes every label value
//! escaped as the text format requires.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// (database, account) pairs exported with their own labels; pools beyond are summed under
/// `database="(other)"`.
pub const MAX_POOL_LABEL_SETS: usize = 64;

/// The label of a login mechanism: the names gprxy knows, anything else `other`.
pub fn mechanism_label(name: &str) -> &'static str {
    match name {
        "OAUTHBEARER" => "OAUTHBEARER",
        "SCRAM-SHA-256" => "SCRAM-SHA-256",
        "SCRAM-SHA-256-PLUS" => "SCRAM-SHA-256-PLUS",
        "token-password" => "token-password",
        "password" => "password",
        "md5" => "md5",
        "gss" => "gss",
        "sspi" => "sspi",
        "trust" => "trust",
        "none" => "none",
        _ => "other",
    }
}

/// Labels of the login counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    /// [`mechanism_label`].
    pub mechanism: &'static str,
    /// `success`, `failure`, `discovery` or `aborted`.
    pub outcome: &'static str,
}

/// Labels of the byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `client_to_server` or `server_to_client`.
    pub direction: &'static str,
}

/// Labels of the ended-sessions counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionEndLabels {
    /// `passthrough` or `fallback`.
    pub mode: &'static str,
    /// `token_expired` or `max_age` (gprxy_core::EndReason::label).
    pub reason: &'static str,
}

/// Labels of the pool gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PoolLabels {
    /// Database.
    pub database: String,
    /// Service account.
    pub account: String,
}

/// One pool's gauges. They count from the pool's creation, and are exported once the pool
/// has logged in ([`Metrics::admit_pool`]); a pool that never did (a database that does not
/// exist) leaves no label behind.
#[derive(Debug, Default)]
pub struct PoolGauges {
    /// Connections lent to clients.
    pub in_use: Gauge,
    /// Connections idle.
    pub idle: Gauge,
    /// Clients waiting.
    pub waiting: Gauge,
    labels: OnceLock<PoolLabels>,
}

impl PoolGauges {
    /// Whether the pool is exported (it has logged in).
    pub fn admitted(&self) -> bool {
        self.labels.get().is_some()
    }
}

/// Exports the admitted pools' gauges, summed by labels (a reload's new pool and the old one
/// it replaced share theirs).
#[derive(Debug, Default)]
struct PoolCollector {
    pools: Mutex<Vec<Weak<PoolGauges>>>,
    admitted: Mutex<HashSet<(String, String)>>,
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut sums: BTreeMap<PoolLabels, [i64; 3]> = BTreeMap::new();
        {
            let mut pools = self.pools.lock();
            pools.retain(|w| w.strong_count() > 0);
            for g in pools.iter().filter_map(Weak::upgrade) {
                if let Some(labels) = g.labels.get() {
                    let sum = sums.entry(labels.clone()).or_default();
                    sum[0] += g.in_use.get();
                    sum[1] += g.idle.get();
                    sum[2] += g.waiting.get();
                }
            }
        }
        let gauges = [
            ("pool_in_use", "Pooled server connections lent to clients"),
            ("pool_idle", "Pooled server connections idle"),
            ("pool_waiting", "Clients waiting for a pooled connection"),
        ];
        for (i, (name, help)) in gauges.into_iter().enumerate() {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, sum) in &sums {
                ConstGauge::new(sum[i]).encode(metric.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
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
    /// The pools' gauges.
    pools: Arc<PoolCollector>,
    /// Time clients waited for a pooled connection.
    pub pool_wait: Histogram,
    /// Sessions the session policy ended, by mode and reason.
    pub sessions_ended: Family<SessionEndLabels, Counter>,
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
        let pools = Arc::new(PoolCollector::default());
        registry.register_collector(Box::new(pools.clone()));
        let pool_wait = Histogram::new([0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0]);
        registry.register(
            "pool_wait_seconds",
            "Time clients waited for a pooled connection",
            pool_wait.clone(),
        );
        let sessions_ended = Family::<SessionEndLabels, Counter>::default();
        registry.register(
            "sessions_ended",
            "Sessions ended by the session policy (token expired, maximum age)",
            sessions_ended.clone(),
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
            pools,
            pool_wait,
            sessions_ended,
        }
    }

    /// The relayed-bytes counters: client to server, server to client.
    pub fn relayed_bytes(&self) -> (Counter, Counter) {
        let counter = |direction| self.bytes.get_or_create(&DirectionLabels { direction }).clone();
        (counter("client_to_server"), counter("server_to_client"))
    }

    /// Counts one login (`mechanism` as the client or server named it).
    pub fn login(&self, mechanism: &str, outcome: &'static str) {
        let labels = LoginLabels { mechanism: mechanism_label(mechanism), outcome };
        self.logins.get_or_create(&labels).inc();
    }

    /// Counts a session the session policy ended.
    pub fn session_ended(&self, mode: &'static str, reason: &'static str) {
        self.sessions_ended.get_or_create(&SessionEndLabels { mode, reason }).inc();
    }

    /// Gauges for a new pool, exported once [`Metrics::admit_pool`] is called.
    pub fn pool_gauges(&self) -> Arc<PoolGauges> {
        let gauges = Arc::new(PoolGauges::default());
        let mut pools = self.pools.pools.lock();
        pools.retain(|w| w.strong_count() > 0);
        pools.push(Arc::downgrade(&gauges));
        gauges
    }

    /// Exports a pool that has logged in: under its (database, account) while fewer than
    /// [`MAX_POOL_LABEL_SETS`] pairs are, else under `database="(other)"`.
    pub fn admit_pool(&self, gauges: &PoolGauges, database: &str, account: &str) {
        if gauges.admitted() {
            return;
        }
        let mut admitted = self.pools.admitted.lock();
        let key = (database.to_owned(), account.to_owned());
        let database = if admitted.contains(&key) || admitted.len() < MAX_POOL_LABEL_SETS {
            admitted.insert(key);
            database
        } else {
            "(other)"
        };
        let _ = gauges.labels.set(PoolLabels { database: database.to_owned(), account: account.to_owned() });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_chosen_mechanisms_are_labelled_other() {
        let m = Metrics::new();
        m.login("x\"} 1\ngprxy_connections_active 9\n#", "failure");
        m.login("SCRAM-SHA-256", "success");
        let text = m.render();
        assert!(text.contains("gprxy_logins_total{mechanism=\"other\",outcome=\"failure\"} 1\n"), "{text}");
        assert!(text.contains("gprxy_logins_total{mechanism=\"SCRAM-SHA-256\",outcome=\"success\"} 1\n"));
        assert!(!text.contains("gprxy_connections_active 9"), "{text}");
    }

    #[test]
    fn ended_sessions_are_counted_by_mode_and_reason() {
        let m = Metrics::new();
        m.session_ended("passthrough", "token_expired");
        m.session_ended("passthrough", "token_expired");
        m.session_ended("fallback", "max_age");
        let text = m.render();
        assert!(
            text.contains("gprxy_sessions_ended_total{mode=\"passthrough\",reason=\"token_expired\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("gprxy_sessions_ended_total{mode=\"fallback\",reason=\"max_age\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn pool_labels_are_escaped_and_bounded() {
        let m = Metrics::new();
        let odd = m.pool_gauges();
        m.admit_pool(&odd, "a\\b\"c\nd", "app");
        odd.in_use.set(2);
        let text = m.render();
        assert!(
            text.contains("gprxy_pool_in_use{database=\"a\\\\b\\\"c\\nd\",account=\"app\"} 2\n"),
            "{text}"
        );
        let kept: Vec<_> = (0..MAX_POOL_LABEL_SETS + 10)
            .map(|i| {
                let g = m.pool_gauges();
                m.admit_pool(&g, &format!("db{i}"), "app");
                g.idle.inc();
                g
            })
            .collect();
        let text = m.render();
        let series = text.lines().filter(|l| l.starts_with("gprxy_pool_idle{")).count();
        assert_eq!(series, MAX_POOL_LABEL_SETS + 1, "{text}");
        assert!(text.contains("gprxy_pool_idle{database=\"(other)\",account=\"app\"} 11\n"), "{text}");
        drop(kept);
        let text = m.render();
        assert_eq!(text.lines().filter(|l| l.starts_with("gprxy_pool_idle{")).count(), 1, "{text}");
    }
}
