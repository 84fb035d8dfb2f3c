//! The proxy's `[session]` policy end to end (#20): a session ends when its token does.
//! Pass-through in front of PostgreSQL 18 (the validator's own session policy off, so that only
//! the proxy ends sessions) and fallback mode in front of 15 or 17 (`GPRXY_FALLBACK_PG`).
//!
//! Short tokens live [`LIFE`] seconds; the client must see the FATAL within a second of their
//! `exp` (a whole second, as the token has it).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gprxy_core::session::UtcTime;
use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{connect, connect_tls, Auth, PgConn, PgError};
use gprxy_tests::proxy::{context_conf, ContextKeyFile, FallbackSetup, Proxy};
use gprxy_tests::{apply_sql_file, require_validator, validator_cluster, Cluster, PgVersion, TestCerts};
use serde_json::{json, Value};

/// Seconds from a short token's issue to its `exp`.
const LIFE: u64 = 5;

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn sleep_until(unix: f64) {
    let left = unix - unix_now();
    if left > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(left));
    }
}

fn expired_message(exp: u64) -> String {
    format!("gprxy: the access token expired at {}; log in again", UtcTime(exp))
}

const MAX_AGE_MESSAGE: &str =
    "gprxy: the session reached its maximum age (6 s, max_session_age); log in again";

/// The session's end as the client sees it: FATAL 28000 with `message`, then the close.
/// Returns when (unix seconds) the FATAL came.
fn assert_ended(c: &mut PgConn, message: &str) -> f64 {
    let e = c.wait_for_end().unwrap_or_else(|e| panic!("no FATAL: {e}"));
    let at = unix_now();
    assert_fatal(&e, message);
    at
}

fn assert_fatal(e: &PgError, message: &str) {
    assert_eq!(
        (e.severity.as_str(), e.code.as_deref(), e.message.as_str()),
        ("FATAL", Some("28000"), message),
        "{e}"
    );
}

/// The end came within a second of `exp`, not before.
fn assert_on_time(at: f64, exp: u64) {
    let late = at - exp as f64;
    assert!((0.0..1.0).contains(&late), "ended {late:.3} s after exp");
}

fn count(pg: &Cluster, tag: &str) -> String {
    pg.sql(&format!("SELECT count(*) FROM t WHERE tag = '{tag}'"))
}

/// Waits (3 s at most) until `user` has no server process left; returns whether it did.
fn backend_gone(pg: &Cluster, user: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if pg.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'")) == "0" {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The audit lines of `event`, checked for what every one carries.
fn audit(p: &Proxy, event: &str, n: usize, policy: &str, mode: &str, issuer: &str) -> Vec<Value> {
    let events = p.wait_events(event, n);
    assert_eq!(events.len(), n, "{events:#?}");
    for e in &events {
        assert_eq!((e["policy"].as_str(), e["mode"].as_str()), (Some(policy), Some(mode)), "{e}");
        assert_eq!(e["iss"].as_str(), Some(issuer), "{e}");
        assert!(e["sub"].as_str().is_some_and(|s| !s.is_empty()), "{e}");
        assert!(e["age_secs"].as_u64().is_some(), "{e}");
        assert!(e["token_fp"].as_str().is_some_and(|s| !s.is_empty()), "{e}");
    }
    events
}

// ---------------------------------------------------------------------------------------------
// Pass-through (PostgreSQL 18 authenticates).

struct Direct {
    idp: TestIssuer,
    key: TestKey,
    pg: Cluster,
    certs: TestCerts,
}

impl Direct {
    fn start() -> Self {
        let key = TestKey::rsa("k");
        let idp = TestIssuer::start(&[&key]);
        let pg = validator_cluster("db")
            .conf("gprxy.session_policy = 'off'")
            .hba("host all plain_user 127.0.0.1/32 trust")
            .hba(format!(
                "host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
                idp.issuer()
            ))
            .ident("m alice alice")
            .start();
        pg.sql(
            "CREATE ROLE alice LOGIN; CREATE ROLE plain_user LOGIN; CREATE EXTENSION gprxy_validator; \
             CREATE TABLE t (tag text); GRANT ALL ON t TO alice",
        );
        Self { idp, key, pg, certs: TestCerts::new() }
    }

    fn proxy(&self, session: &str) -> Proxy {
        Proxy::start(&format!(
            "upstream = \"127.0.0.1:{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[session]\n{session}\n",
            self.pg.port(),
            self.certs.cert_path.display(),
            self.certs.key_path.display()
        ))
    }

    /// A token for alice expiring `life` seconds from now, and its `exp`.
    fn token(&self, life: u64) -> (String, u64) {
        let mut claims = self.idp.claims("alice", "db");
        let exp = gprxy_core::unix_time() as u64 + life;
        claims["exp"] = json!(exp);
        (self.key.token(json!({"typ": "at+jwt"}), &claims), exp)
    }

    fn connect(&self, p: &Proxy, token: &str) -> PgConn {
        connect(p.addr(), "alice", "postgres", Auth::Bearer(token)).unwrap()
    }
}

/// `idle`: an idle session ends at expiry; a transaction running across expiry commits first
/// and its client reads the COMMIT's answer, then the FATAL. A login without a token (trust)
/// is not ended.
#[test]
fn passthrough_idle_ends_at_expiry_after_a_running_transaction_commits() {
    let w = Direct::start();
    let p = w.proxy("policy = \"idle\"");
    let (idle_token, exp) = w.token(LIFE);
    let (busy_token, busy_exp) = w.token(LIFE);
    let mut plain = connect(p.addr(), "plain_user", "postgres", Auth::None).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut c = w.connect(&p, &idle_token);
            assert_eq!(c.scalar("SELECT 1").unwrap().as_deref(), Some("1"));
            assert_on_time(assert_ended(&mut c, &expired_message(exp)), exp);
        });
        s.spawn(|| {
            let mut c = w.connect(&p, &busy_token);
            c.query("BEGIN; INSERT INTO t VALUES ('committed')").unwrap();
            // Running when the token expires, and for a while after.
            let until = busy_exp as f64 + 1.5 - unix_now();
            c.query(&format!("SELECT pg_sleep({until:.3})")).unwrap();
            assert_eq!(c.query("COMMIT"), Ok(vec![]));
            let at = assert_ended(&mut c, &expired_message(busy_exp));
            assert!(at - (busy_exp as f64) < 2.5, "ended {} s after exp", at - busy_exp as f64);
        });
    });
    assert_eq!(count(&w.pg, "committed"), "1");
    assert_eq!(plain.scalar("SELECT 'no token, no end'").unwrap().as_deref(), Some("no token, no end"));
    let events = audit(&p, "session_expired", 2, "idle", "passthrough", &w.idp.issuer());
    assert!(events.iter().all(|e| e["ended_at"] == "idle_point" && e["reason"] == "token_expired"));
    assert_eq!(p.metric("gprxy_sessions_ended_total{mode=\"passthrough\",reason=\"token_expired\"}"), 2.0);
    let log = p.log();
    assert!(!log.contains(&idle_token) && !log.contains(&busy_token), "a token reached the log");
}

/// `strict`: the session ends at expiry in the middle of a transaction and a running query;
/// the query is cancelled, the server process ends, and the transaction's rows are not there.
#[test]
fn passthrough_strict_ends_mid_transaction_and_rolls_it_back() {
    let w = Direct::start();
    let p = w.proxy("policy = \"strict\"");
    let (token, exp) = w.token(LIFE);
    let mut c = w.connect(&p, &token);
    c.query("BEGIN; INSERT INTO t VALUES ('rolled back')").unwrap();
    let e = c.query("SELECT pg_sleep(60)").unwrap_err();
    assert_on_time(unix_now(), exp);
    assert_fatal(&e, &expired_message(exp));
    assert!(backend_gone(&w.pg, "alice"), "the server process outlived the session");
    assert_eq!(count(&w.pg, "rolled back"), "0");
    let events = audit(&p, "session_expired", 1, "strict", "passthrough", &w.idp.issuer());
    assert_eq!(events[0]["ended_at"], "strict");
    assert_eq!(p.metric("gprxy_sessions_ended_total{mode=\"passthrough\",reason=\"token_expired\"}"), 1.0);
}

/// `off`: a session outlives its token; `max_session_age` still ends it, and one of a
/// long-lived token, at their next idle point.
#[test]
fn passthrough_off_keeps_sessions_past_expiry_until_the_maximum_age() {
    let w = Direct::start();
    let p = w.proxy("policy = \"off\"\nmax_session_age_secs = 6");
    let (short, exp) = w.token(2);
    let (long, _) = w.token(3600);
    std::thread::scope(|s| {
        s.spawn(|| {
            let login = unix_now();
            let mut c = w.connect(&p, &short);
            sleep_until(exp as f64 + 1.0);
            assert_eq!(c.scalar("SELECT 'past exp'").unwrap().as_deref(), Some("past exp"));
            let age = assert_ended(&mut c, MAX_AGE_MESSAGE) - login;
            assert!((6.0..8.0).contains(&age), "ended at {age:.3} s");
        });
        s.spawn(|| {
            let login = unix_now();
            let mut c = w.connect(&p, &long);
            let age = assert_ended(&mut c, MAX_AGE_MESSAGE) - login;
            assert!((6.0..8.0).contains(&age), "ended at {age:.3} s");
        });
    });
    let events = audit(&p, "session_max_age", 2, "off", "passthrough", &w.idp.issuer());
    assert!(events.iter().all(|e| e["reason"] == "max_age"), "{events:#?}");
    assert_eq!(p.metric("gprxy_sessions_ended_total{mode=\"passthrough\",reason=\"max_age\"}"), 2.0);
    assert_eq!(p.metric("gprxy_sessions_ended_total{mode=\"passthrough\",reason=\"token_expired\"}"), 0.0);
}

// ---------------------------------------------------------------------------------------------
// Fallback (gprxy validates; pooled server connections, one per account here).

struct Pooled {
    idp: TestIssuer,
    key: TestKey,
    pg: Cluster,
    certs: TestCerts,
    _context_key: ContextKeyFile,
}

impl Pooled {
    /// PostgreSQL (15 or 17) with the signed context, the roles and table `t`.
    fn start() -> Self {
        let version = PgVersion::fallback_upstream();
        require_validator(version);
        let key = TestKey::rsa("k");
        let idp = TestIssuer::start(&[&key]);
        let certs = TestCerts::new();
        let context_key = ContextKeyFile::create(certs.dir().join("context.key"));
        let mut builder = Cluster::builder(version)
            .hba("host all app_admin,app_writer,app_reader 127.0.0.1/32 scram-sha-256");
        for line in context_conf(&[&context_key.public]) {
            builder = builder.conf(line);
        }
        let pg = builder.start();
        pg.sql("CREATE EXTENSION gprxy_validator");
        apply_sql_file(&pg, "postgres", "01_roles.sql");
        apply_sql_file(&pg, "postgres", "05_signed_context.sql");
        pg.sql(
            "SET password_encryption = 'scram-sha-256'; ALTER ROLE app_writer PASSWORD 'writer-secret-1'; \
             ALTER ROLE app_reader PASSWORD 'reader-secret-1'; CREATE TABLE t (tag text)",
        );
        std::fs::write(certs.dir().join("writer.pw"), "writer-secret-1\n").unwrap();
        std::fs::write(certs.dir().join("reader.pw"), "reader-secret-1\n").unwrap();
        Self { idp, key, pg, certs, _context_key: context_key }
    }

    /// The proxy with pools of one connection and these `[session]` lines.
    fn proxy(&self, session: &str) -> Proxy {
        let (wpw, rpw) = (self.certs.dir().join("writer.pw"), self.certs.dir().join("reader.pw"));
        let setup = FallbackSetup {
            upstream_port: self.pg.port(),
            cert: &self.certs.cert_path,
            key: &self.certs.key_path,
            issuer: &self.idp.issuer(),
            audience: "db",
            rules: &[("writer", "app_writer", &wpw), ("reader", "app_reader", &rpw)],
            context_key: Some(&self._context_key.path),
            extra: "[fallback.pool]\ndefault_size = 1",
        };
        Proxy::start(&format!("{}\n[session]\n{session}\n", setup.toml()))
    }

    /// A token for `sub` with `role` expiring `life` seconds from now, and its `exp`.
    fn token(&self, sub: &str, role: &str, life: u64) -> (String, u64) {
        let mut claims = self.idp.claims(sub, "db");
        let exp = gprxy_core::unix_time() as u64 + life;
        claims["exp"] = json!(exp);
        claims["roles"] = json!([role]);
        (self.key.token(json!({"typ": "at+jwt"}), &claims), exp)
    }

    fn connect(&self, p: &Proxy, user: &str, token: &str) -> PgConn {
        connect_tls(p.addr(), user, "postgres", Auth::Password(token), &self.certs.ca).unwrap()
    }

    /// A new session as `user` (a long-lived token) on the pool of `role`: its server process.
    fn next_session_pid(&self, p: &Proxy, user: &str, role: &str) -> String {
        let (token, _) = self.token(user, role, 3600);
        let mut c = self.connect(p, user, &token);
        let row = c.query("SELECT pg_backend_pid()::text, current_setting('app.user_id')").unwrap().remove(0);
        assert_eq!(row[1].as_deref(), Some(user), "the context is the new session's");
        c.close();
        row[0].clone().unwrap()
    }
}

fn pid(c: &mut PgConn) -> String {
    c.scalar("SELECT pg_backend_pid()::text").unwrap().unwrap()
}

/// `idle`: as in pass-through, and each server connection goes back to its pool of one: the
/// next session gets the same server process.
#[test]
fn fallback_idle_ends_at_expiry_after_a_running_transaction_commits_and_reuses_the_connection() {
    let w = Pooled::start();
    let p = w.proxy("policy = \"idle\"");
    let (idle_token, exp) = w.token("bob", "reader", LIFE);
    let (busy_token, busy_exp) = w.token("alice", "writer", LIFE);
    let (reader_pid, writer_pid) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut c = w.connect(&p, "bob", &idle_token);
            let pid = pid(&mut c);
            assert_on_time(assert_ended(&mut c, &expired_message(exp)), exp);
            pid
        });
        let writer = s.spawn(|| {
            let mut c = w.connect(&p, "alice", &busy_token);
            let pid = pid(&mut c);
            c.query("BEGIN; INSERT INTO t VALUES ('committed')").unwrap();
            let until = busy_exp as f64 + 1.5 - unix_now();
            c.query(&format!("SELECT pg_sleep({until:.3})")).unwrap();
            assert_eq!(c.query("COMMIT"), Ok(vec![]));
            let at = assert_ended(&mut c, &expired_message(busy_exp));
            assert!(at - (busy_exp as f64) < 2.5, "ended {} s after exp", at - busy_exp as f64);
            pid
        });
        (reader.join().unwrap(), writer.join().unwrap())
    });
    assert_eq!(count(&w.pg, "committed"), "1");
    assert_eq!(w.next_session_pid(&p, "carol", "reader"), reader_pid);
    assert_eq!(w.next_session_pid(&p, "dave", "writer"), writer_pid);
    let events = audit(&p, "session_expired", 2, "idle", "fallback", &w.idp.issuer());
    assert!(events.iter().all(|e| e["ended_at"] == "idle_point"), "{events:#?}");
    assert_eq!(p.metric("gprxy_sessions_ended_total{mode=\"fallback\",reason=\"token_expired\"}"), 2.0);
    let log = p.log();
    assert!(!log.contains(&idle_token) && !log.contains(&busy_token), "a token reached the log");
}

/// `strict`: ends mid-transaction with a query running; the pooled connection is cancelled,
/// rolled back, reset and reused by the next session.
#[test]
fn fallback_strict_ends_mid_transaction_rolls_back_and_reuses_the_connection() {
    let w = Pooled::start();
    let p = w.proxy("policy = \"strict\"");
    let (token, exp) = w.token("alice", "writer", LIFE);
    let mut c = w.connect(&p, "alice", &token);
    let before = pid(&mut c);
    c.query("BEGIN; INSERT INTO t VALUES ('rolled back'); SET LOCAL app.user_id = 'mallory'").unwrap();
    let e = c.query("SELECT pg_sleep(60)").unwrap_err();
    assert_on_time(unix_now(), exp);
    assert_fatal(&e, &expired_message(exp));
    assert_eq!(count(&w.pg, "rolled back"), "0");
    assert_eq!(w.next_session_pid(&p, "dave", "writer"), before, "the server connection was not reused");
    assert_eq!(count(&w.pg, "rolled back"), "0");
    let events = audit(&p, "session_expired", 1, "strict", "fallback", &w.idp.issuer());
    assert_eq!((events[0]["sub"].as_str(), events[0]["ended_at"].as_str()), (Some("alice"), Some("strict")));
    assert_eq!(p.metric("gprxy_sessions_ended_total{mode=\"fallback\",reason=\"token_expired\"}"), 1.0);
}

/// `off`: sessions outlive their tokens until `max_session_age`, which ends them (also one of a
/// long-lived token); the connections go back to their pools.
#[test]
fn fallback_off_keeps_sessions_past_expiry_until_the_maximum_age() {
    let w = Pooled::start();
    let p = w.proxy("policy = \"off\"\nmax_session_age_secs = 6");
    let (short, exp) = w.token("alice", "writer", 2);
    let (long, _) = w.token("bob", "reader", 3600);
    let pids = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let login = unix_now();
            let mut c = w.connect(&p, "alice", &short);
            let pid = pid(&mut c);
            sleep_until(exp as f64 + 1.0);
            assert_eq!(c.scalar("SELECT 'past exp'").unwrap().as_deref(), Some("past exp"));
            let age = assert_ended(&mut c, MAX_AGE_MESSAGE) - login;
            assert!((6.0..8.0).contains(&age), "ended at {age:.3} s");
            pid
        });
        let reader = s.spawn(|| {
            let login = unix_now();
            let mut c = w.connect(&p, "bob", &long);
            let pid = pid(&mut c);
            let age = assert_ended(&mut c, MAX_AGE_MESSAGE) - login;
            assert!((6.0..8.0).contains(&age), "ended at {age:.3} s");
            pid
        });
        (writer.join().unwrap(), reader.join().unwrap())
    });
    assert_eq!(w.next_session_pid(&p, "carol", "writer"), pids.0);
    assert_eq!(w.next_session_pid(&p, "dave", "reader"), pids.1);
    let events = audit(&p, "session_max_age", 2, "off", "fallback", &w.idp.issuer());
    assert!(events.iter().all(|e| e["reason"] == "max_age"), "{events:#?}");
    assert_eq!(p.metric("gprxy_sessions_ended_total{mode=\"fallback\",reason=\"max_age\"}"), 2.0);
}
