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
use gprxy_tests::proxy::{start_signed_context_upstream, ContextKeyFile, FallbackSetup, Proxy};
use gprxy_tests::{require_validator, validator_cluster, Cluster, PgVersion, TestCerts};
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
            .hba("host all gprxy_terminator 127.0.0.1/32 scram-sha-256")
            .hba(format!(
                "host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
                idp.issuer()
            ))
            .ident("m alice alice")
            .start();
        pg.sql(
            "CREATE ROLE alice LOGIN; CREATE ROLE plain_user LOGIN; CREATE EXTENSION gprxy_validator; \
             CREATE TABLE t (tag text); GRANT ALL ON t TO alice; SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE gprxy_terminator LOGIN PASSWORD 'terminator-1' IN ROLE pg_signal_backend",
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
        let pg = start_signed_context_upstream(
            Cluster::builder(version)
                .hba("host all app_admin,app_writer,app_reader 127.0.0.1/32 scram-sha-256"),
            &[&context_key.public],
        );
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

/// `strict`: ends mid-transaction with a query running; that server process is ended (a
/// cancel could be caught), the transaction is gone, and the pool's slot serves the next
/// session with a new process.
#[test]
fn fallback_strict_ends_mid_transaction_and_its_server_process() {
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
    assert_ne!(w.next_session_pid(&p, "dave", "writer"), before, "the ended process served again");
    assert_eq!(w.pg.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {before}")), "0");
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

// ---------------------------------------------------------------------------------------------
// #26: the attacks on a session's end and a pool's size, judged from the server's side.

/// Backends (other than the one asking) running a statement that contains `marker`.
fn running(pg: &Cluster, marker: &str) -> u32 {
    pg.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state <> 'idle' AND pid <> pg_backend_pid() \
         AND strpos(query, '{marker}') > 0"
    ))
    .parse()
    .unwrap()
}

/// The server processes of `user`.
fn backends_of(pg: &Cluster, user: &str) -> u32 {
    pg.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'")).parse().unwrap()
}

/// `ticks`: rows that say when they were written and when their transaction began.
fn create_ticks(pg: &Cluster, grantee: &str) {
    pg.sql(&format!(
        "CREATE TABLE ticks (tag text, at timestamptz DEFAULT clock_timestamp(), \
         xact_start timestamptz DEFAULT now()); GRANT ALL ON ticks TO {grantee}"
    ));
}

fn ticks_where(pg: &Cluster, condition: &str) -> u32 {
    pg.sql(&format!("SELECT count(*) FROM ticks WHERE {condition}")).parse().unwrap()
}

/// An extended-protocol batch with no Sync, begun outside a transaction before the end, then
/// COMMIT, INSERT and COMMIT sent after it: under `idle` none of it commits and the client reads
/// only the FATAL, at `exp`.
fn unsynced_batch_across_the_end(c: &mut PgConn, pg: &Cluster, exp: u64) {
    let mut before = gprxy_tests::pgwire::msg::extended("BEGIN");
    before.extend_from_slice(&gprxy_tests::pgwire::msg::extended("INSERT INTO t VALUES ('before the end')"));
    before.extend_from_slice(&gprxy_tests::pgwire::msg::flush());
    c.send_raw(&before).unwrap();
    sleep_until(exp as f64 + 1.5);
    let mut after = gprxy_tests::pgwire::msg::extended("COMMIT");
    after.extend_from_slice(&gprxy_tests::pgwire::msg::extended("INSERT INTO t VALUES ('after the end')"));
    after.extend_from_slice(&gprxy_tests::pgwire::msg::extended("COMMIT"));
    after.extend_from_slice(&gprxy_tests::pgwire::msg::sync());
    // The session may be closed already: the write is allowed to fail.
    let _ = c.send_raw(&after);
    let mut answered = Vec::new();
    let e = loop {
        match c.next_raw() {
            Ok((tag, _)) => answered.push(tag as char),
            Err(e) => break e,
        }
    };
    assert_fatal(&e, &expired_message(exp));
    // BEGIN's and the INSERT's answers came with the Flush, before the end; nothing after.
    assert!(!answered.contains(&'Z'), "answers after the end: {answered:?}");
    assert_eq!(count(pg, "before the end"), "0");
    assert_eq!(count(pg, "after the end"), "0");
}

#[test]
fn passthrough_idle_an_unsynced_batch_does_not_outlive_the_end() {
    let w = Direct::start();
    let p = w.proxy("policy = \"idle\"");
    let (token, exp) = w.token(3);
    let mut c = w.connect(&p, &token);
    unsynced_batch_across_the_end(&mut c, &w.pg, exp);
    assert!(backend_gone(&w.pg, "alice"), "the server process outlived the session");
}

#[test]
fn fallback_idle_an_unsynced_batch_does_not_outlive_the_end() {
    let w = Pooled::start();
    let p = w.proxy("policy = \"idle\"");
    let (token, exp) = w.token("alice", "writer", 3);
    let mut c = w.connect(&p, "alice", &token);
    let before = pid(&mut c);
    unsynced_batch_across_the_end(&mut c, &w.pg, exp);
    // Rolled back, reset and reused.
    assert_eq!(w.next_session_pid(&p, "dave", "writer"), before);
    assert_eq!(count(&w.pg, "before the end"), "0");
}

/// A DO loop that catches the cancel and commits every round.
const STUBBORN: &str =
    "DO $$BEGIN LOOP BEGIN PERFORM pg_sleep(0.05); EXCEPTION WHEN query_canceled THEN NULL; END; \
     INSERT INTO ticks (tag) VALUES ('stubborn'); COMMIT; END LOOP; END$$";

/// Alice's session runs [`STUBBORN`] across its end under `policy` (pools of one): the client
/// reads the FATAL on time. Returns the proxy, the session's server process and `exp`.
fn stubborn_across_the_end(w: &Pooled, policy: &str) -> (Proxy, String, u64) {
    create_ticks(&w.pg, "app_writer");
    let p = w.proxy(&format!("policy = \"{policy}\""));
    let (token, exp) = w.token("alice", "writer", 3);
    let mut c = w.connect(&p, "alice", &token);
    let doomed = pid(&mut c);
    let e = c.query(STUBBORN).unwrap_err();
    assert_fatal(&e, &expired_message(exp));
    assert_on_time(unix_now(), exp);
    (p, doomed, exp)
}

/// #26 item 1: under `strict` a statement that catches the cancel is not left running: its
/// server process is ended, nothing commits a moment after the end, and the pool's slot is
/// free again for the next session.
#[test]
fn fallback_strict_ends_a_backend_that_catches_the_cancel() {
    let w = Pooled::start();
    let (p, doomed, exp) = stubborn_across_the_end(&w, "strict");
    sleep_until(exp as f64 + 3.0);
    assert_eq!(
        w.pg.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {doomed}")),
        "0",
        "the process still runs"
    );
    let late = ticks_where(&w.pg, &format!("at > to_timestamp({exp}) + interval '1.5 s'"));
    assert_eq!(late, 0, "rows committed well after the end");
    assert!(ticks_where(&w.pg, "true") > 0, "the loop never ran");
    // The slot was kept until the process was gone, then freed: the next session gets one.
    assert_ne!(w.next_session_pid(&p, "dave", "writer"), doomed);
    let ended = p.wait_events("end_backend", 1);
    assert!(
        ended.iter().any(|e| e["role"] == "app_writer" && e["pid"].as_i64() == doomed.parse().ok()),
        "{ended:#?}"
    );
}

/// #26 item 1: clients that leave with a statement running (one of them a loop that catches
/// the cancel) do not leave server processes behind, and a pool of one never has more than one
/// server process serving clients (plus at most the one gprxy opens to end a backend).
#[test]
fn fallback_clients_that_leave_mid_statement_leave_no_backend_behind() {
    let w = Pooled::start();
    create_ticks(&w.pg, "app_writer");
    let p = w.proxy("policy = \"idle\"");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let most = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(backends_of(&w.pg, "app_writer"));
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        });
        for (i, sql) in ["SELECT pg_sleep(120) /* left-0 */", "SELECT pg_sleep(120) /* left-1 */", STUBBORN]
            .iter()
            .enumerate()
        {
            let (token, _) = w.token(&format!("user{i}"), "writer", 3600);
            let mut c = w.connect(&p, &format!("user{i}"), &token);
            c.send_raw(&gprxy_tests::pgwire::msg::query(sql)).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            drop(c);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while running(&w.pg, "pg_sleep(") > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.join().unwrap()
    });
    assert_eq!(running(&w.pg, "pg_sleep("), 0, "statements of clients that left still run");
    assert!(most <= 2, "{most} server processes of app_writer at once, pool of one");
    assert!(ticks_where(&w.pg, "true") > 0, "the loop never ran");
    let last = w.pg.sql("SELECT max(at) FROM ticks");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(ticks_where(&w.pg, &format!("at > '{last}'")), 0, "the loop still commits");
    // The slot is free again.
    let (token, _) = w.token("erin", "writer", 3600);
    let mut c = w.connect(&p, "erin", &token);
    assert_eq!(c.scalar("SELECT current_setting('app.user_id')").unwrap().as_deref(), Some("erin"));
}

/// #26 item 4: a token inside the leeway (its `exp` 5 s ago) is refused at login, as the
/// validator refuses it, instead of being let in and ended at once.
#[test]
fn fallback_refuses_a_token_inside_the_leeway_at_login() {
    let w = Pooled::start();
    let p = w.proxy("policy = \"idle\"");
    let mut claims = w.idp.claims("alice", "db");
    let exp = gprxy_core::unix_time() as u64 - 5;
    claims["exp"] = json!(exp);
    claims["roles"] = json!(["writer"]);
    let token = w.key.token(json!({"typ": "at+jwt"}), &claims);
    let e = connect_tls(p.addr(), "alice", "postgres", Auth::Password(&token), &w.certs.ca)
        .err()
        .expect("refused");
    assert_fatal(&e, &expired_message(exp));
    let logins = p.wait_events("login", 1);
    assert_eq!(logins.last().unwrap()["outcome"], "failure", "{logins:#?}");
}

/// #26 item 1, pass-through with the server's own policy off: under `strict` a statement that
/// catches the cancel is ended by `[session] terminate_user` (a member of pg_signal_backend),
/// nothing commits a moment after the end; without it gprxy says in its log that the process
/// still runs.
#[test]
fn passthrough_strict_ends_a_process_that_catches_the_cancel_with_terminate_user() {
    let w = Direct::start();
    create_ticks(&w.pg, "alice");
    let pw = w.certs.dir().join("terminator.pw");
    std::fs::write(&pw, "terminator-1\n").unwrap();
    let p = w.proxy(&format!(
        "policy = \"strict\"\nterminate_user = \"gprxy_terminator\"\nterminate_password_file = \"{}\"",
        pw.display()
    ));
    let (token, exp) = w.token(3);
    let mut c = w.connect(&p, &token);
    let doomed = pid(&mut c);
    let e = c.query(STUBBORN).unwrap_err();
    assert_fatal(&e, &expired_message(exp));
    assert!(backend_gone(&w.pg, "alice"), "the server process outlived the session");
    sleep_until(exp as f64 + 2.0);
    assert_eq!(ticks_where(&w.pg, &format!("at > to_timestamp({exp}) + interval '1 s'")), 0);
    assert!(ticks_where(&w.pg, "true") > 0, "the loop never ran");
    let ended = p.wait_events("end_backend", 1);
    assert_eq!(ended[0]["role"], "gprxy_terminator", "{ended:#?}");
    assert_eq!(ended[0]["pid"].as_i64(), doomed.parse().ok());

    // Without terminate_user the cancel is all gprxy can do, and it says so.
    let p = w.proxy("policy = \"strict\"");
    let (token, exp) = w.token(3);
    let mut c = w.connect(&p, &token);
    let e = c.query(STUBBORN).unwrap_err();
    assert_fatal(&e, &expired_message(exp));
    let warned = p.wait_events("end_backend", 1);
    assert!(
        warned[0]["message"].as_str().unwrap_or("").contains("set [session] terminate_user"),
        "{warned:#?}"
    );
    w.pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'alice'");
}

/// #26, the class: under `idle` a request the proxy let in before the end runs on, but the
/// server checks the end the signed context carries: a DO block that commits in a loop across
/// the end is ended at its first statement in a transaction that began after the end, so no
/// row of such a transaction commits, and its server process is ended.
#[test]
fn fallback_idle_a_loop_that_commits_across_the_end_is_stopped_by_the_server() {
    let w = Pooled::start();
    let (p, doomed, exp) = stubborn_across_the_end(&w, "idle");
    assert!(ticks_where(&w.pg, "true") > 0, "the loop never ran");
    assert_eq!(
        ticks_where(&w.pg, &format!("xact_start >= to_timestamp({exp})")),
        0,
        "committed after the end"
    );
    sleep_until(exp as f64 + 2.0);
    assert_eq!(w.pg.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {doomed}")), "0");
    // The pool's slot serves the next session.
    assert_ne!(w.next_session_pid(&p, "dave", "writer"), doomed);
}

/// Review of #26: the service account may call `gprxy.reset_context()`, and so may its client;
/// that does not switch off the server's check of the session's end (only the next signed context
/// replaces it): the committing loop is still stopped at the end.
#[test]
fn fallback_a_client_that_resets_its_context_still_cannot_commit_past_the_end() {
    let w = Pooled::start();
    create_ticks(&w.pg, "app_writer");
    let p = w.proxy("policy = \"idle\"");
    let (token, exp) = w.token("alice", "writer", 3);
    let mut c = w.connect(&p, "alice", &token);
    c.query("SELECT gprxy.reset_context()").unwrap();
    let e = c.query(STUBBORN).unwrap_err();
    assert_fatal(&e, &expired_message(exp));
    assert!(ticks_where(&w.pg, "true") > 0, "the loop never ran");
    assert_eq!(
        ticks_where(&w.pg, &format!("xact_start >= to_timestamp({exp})")),
        0,
        "committed after the end"
    );
}
