//! A session ends when its token does: gprxy_validator alone in PostgreSQL 18 (no proxy), with
//! tokens that expire seconds after login (gprxy.session_policy, gprxy.max_session_age).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gprxy_core::session::UtcTime;
use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{self, Auth, PgConn, PgError};
use gprxy_tests::{alice_oauth_cluster, Cluster};
use serde_json::json;

const AUD: &str = "db";

struct Setup {
    idp: TestIssuer,
    key: TestKey,
    pg: Cluster,
}

fn setup(conf: &[&str]) -> Setup {
    let key = TestKey::rsa("key-1");
    let idp = TestIssuer::start(&[&key]);
    let pg = alice_oauth_cluster(AUD, &idp.issuer(), conf).start();
    pg.sql(
        "CREATE ROLE alice LOGIN; CREATE TABLE t (x int); GRANT ALL ON t TO alice; \
         CREATE EXTENSION gprxy_validator",
    );
    Setup { idp, key, pg }
}

fn now_f() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Sleeps until the unix time `t`.
fn sleep_until(t: f64) {
    let left = t - now_f();
    if left > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(left));
    }
}

impl Setup {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.pg.port()))
    }

    /// Logs alice in with a token that expires `secs` from now; returns the session and `exp`.
    fn login_expiring_in(&self, secs: i64) -> (PgConn, i64) {
        let exp = gprxy_core::unix_time() + secs;
        let mut claims = self.idp.claims("alice", AUD);
        claims["exp"] = json!(exp);
        let token = self.key.token(json!({"typ": "at+jwt"}), &claims);
        let conn = pgwire::connect(self.addr(), "alice", "postgres", Auth::Bearer(&token))
            .unwrap_or_else(|e| panic!("login failed: {e}\n{}", self.pg.log()));
        (conn, exp)
    }

    fn rows(&self) -> String {
        self.pg.sql("SELECT count(*) FROM t")
    }

    fn audit_lines(&self, event: &str) -> Vec<String> {
        let needle = format!("gprxy: event={event} ");
        self.pg.log().lines().filter(|l| l.contains(&needle)).map(str::to_owned).collect()
    }

    /// The audit lines of `event` once there are `n` (a backend writes its line as it exits,
    /// just after the client has read the FATAL).
    fn wait_audit_lines(&self, event: &str, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.audit_lines(event);
            if lines.len() >= n || std::time::Instant::now() > deadline {
                assert_eq!(lines.len(), n, "{}", self.pg.log());
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn expired_message(exp: i64) -> String {
    format!("gprxy: the access token expired at {}; log in again", UtcTime(exp as u64))
}

/// The session's end as the client reads it: FATAL, SQLSTATE 28000, gprxy's message.
fn assert_ended(e: &PgError, message: &str) {
    assert_eq!(
        (e.severity.as_str(), e.code.as_deref(), e.message.as_str()),
        ("FATAL", Some("28000"), message),
        "{e:?}"
    );
}

/// How long after `t` (unix seconds) it is now.
fn since(t: i64) -> f64 {
    now_f() - t as f64
}

#[test]
fn strict_ends_the_session_at_expiry_mid_transaction_and_its_rows_are_gone() {
    let s = setup(&["gprxy.session_policy = 'strict'"]);
    let (mut c, exp) = s.login_expiring_in(5);
    // An error cancels every timer PostgreSQL runs; the session's end must survive it.
    assert!(c.query("SELECT 1/0").unwrap_err().message.contains("division by zero"));
    c.query("BEGIN").unwrap();
    c.query("INSERT INTO t VALUES (1)").unwrap();
    // So does an error inside a savepoint, which leaves the transaction open.
    c.query("SAVEPOINT a").unwrap();
    assert!(c.query("SELECT 1/0").is_err());
    c.query("ROLLBACK TO a").unwrap();
    let e = c.next_error().unwrap();
    let late = since(exp);
    assert_ended(&e, &expired_message(exp));
    assert!((-0.05..1.0).contains(&late), "ended {late:.3} s after exp");
    assert_eq!(s.rows(), "0", "the open transaction rolled back");
    let audit = s.wait_audit_lines("session_expired", 1);
    assert!(
        audit[0].contains(&format!(
            "policy=strict role=\"alice\" authn_id=\"alice\" sub=\"alice\" iss=\"{}\" token_fp=",
            s.idp.issuer()
        )) && audit[0].contains(" age_s="),
        "{}",
        audit[0]
    );
}

#[test]
fn idle_ends_an_idle_session_at_expiry_and_lets_a_running_transaction_commit_first() {
    let s = setup(&["gprxy.session_policy = 'idle'"]);
    let (mut idle, exp_idle) = s.login_expiring_in(5);
    let (mut busy, exp_busy) = s.login_expiring_in(5);
    busy.query("BEGIN").unwrap();
    busy.query("INSERT INTO t VALUES (1)").unwrap();

    let e = idle.next_error().unwrap();
    let late = since(exp_idle);
    assert_ended(&e, &expired_message(exp_idle));
    assert!((-0.05..1.0).contains(&late), "idle session ended {late:.3} s after exp");

    // Past its token's expiry, inside its transaction: the session goes on until it commits.
    sleep_until(exp_busy as f64 + 1.2);
    busy.query("INSERT INTO t VALUES (2)").unwrap();
    busy.query("COMMIT").unwrap();
    let committed = now_f();
    let e = busy.next_error().unwrap();
    assert_ended(&e, &expired_message(exp_busy));
    let after_commit = now_f() - committed;
    assert!(after_commit < 1.0, "ended {after_commit:.3} s after its commit");
    assert_eq!(s.rows(), "2", "the transaction committed before the session ended");
    s.wait_audit_lines("session_expired", 2);
}

#[test]
fn idle_ends_a_session_that_never_goes_idle_at_the_hard_limit() {
    let s = setup(&["gprxy.session_policy = 'idle'", "gprxy.session_idle_hard_limit = '1s'"]);
    let (mut c, exp) = s.login_expiring_in(4);
    c.query("BEGIN").unwrap();
    c.query("INSERT INTO t VALUES (1)").unwrap();
    let e = c.next_error().unwrap();
    let late = since(exp);
    assert_ended(&e, &expired_message(exp));
    assert!((0.95..2.0).contains(&late), "ended {late:.3} s after exp, hard limit 1 s");
    assert_eq!(s.rows(), "0");
}

#[test]
fn off_keeps_the_session_past_expiry() {
    let s = setup(&["gprxy.session_policy = 'off'"]);
    let (mut c, exp) = s.login_expiring_in(3);
    sleep_until(exp as f64 + 1.5);
    assert_eq!(c.scalar("SELECT gprxy.subject()").unwrap().as_deref(), Some("alice"));
    assert!(s.audit_lines("session_expired").is_empty());
}

#[test]
fn max_session_age_ends_a_session_from_a_long_lived_token() {
    let s = setup(&["gprxy.max_session_age = '3s'"]);
    let login = now_f();
    let (mut c, _) = s.login_expiring_in(3600);
    let e = c.next_error().unwrap();
    let age = now_f() - login;
    assert_ended(&e, "gprxy: the session reached its maximum age (3 s, max_session_age); log in again");
    assert!((2.9..4.5).contains(&age), "ended at age {age:.3} s");
    let audit = s.wait_audit_lines("session_max_age", 1);
    assert!(audit[0].contains("policy=idle role=\"alice\""), "{}", audit[0]);
}

#[test]
fn a_session_policy_that_is_not_a_policy_is_refused() {
    let s = setup(&["gprxy.session_policy = 'strict'"]);
    let err = s.pg.try_sql("ALTER SYSTEM SET gprxy.session_policy = 'sometimes'").unwrap_err();
    assert!(
        err.contains("invalid value for parameter \"gprxy.session_policy\": \"sometimes\"")
            && err.contains("\"sometimes\" is not a session policy: use off, idle, strict"),
        "{err}"
    );
    assert_eq!(s.pg.sql("SHOW gprxy.session_policy"), "strict");
}

#[test]
fn a_validator_loaded_at_login_without_preloading_ends_sessions_too() {
    let s = setup(&["shared_preload_libraries = ''", "gprxy.session_policy = 'strict'"]);
    assert_eq!(s.pg.sql("SHOW shared_preload_libraries"), "");
    let (mut c, exp) = s.login_expiring_in(4);
    c.query("BEGIN").unwrap();
    c.query("INSERT INTO t VALUES (1)").unwrap();
    let e = c.next_error().unwrap();
    assert_ended(&e, &expired_message(exp));
    assert_eq!(s.rows(), "0");
}

/// A Bind to a statement that does not exist, with its Sync: an error with no transaction open
/// (PostgreSQL then cancels every timer of its own and runs no transaction callback).
fn bind_to_nothing(c: &mut PgConn) {
    let mut out = Vec::new();
    let body = b"\0nosuch\0\0\0\0\0\0\0";
    out.push(b'B');
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(b"S\0\0\0\x04");
    c.send_raw(&out).unwrap();
    let e = c.next_error().unwrap();
    assert_eq!(e.code.as_deref(), Some("26000"), "{e:?}");
    // The Sync's ReadyForQuery.
    while !matches!(c.next_message().unwrap(), postgres_protocol::message::backend::Message::ReadyForQuery(_))
    {
    }
    assert_eq!(c.scalar("SELECT 'in step'").unwrap().as_deref(), Some("in step"));
}

#[test]
fn strict_ends_the_session_whatever_errors_came_before() {
    let s = setup(&["gprxy.session_policy = 'strict'"]);
    let (mut c, exp) = s.login_expiring_in(5);
    bind_to_nothing(&mut c);
    // An error in a transaction block, then one in the failed block, then a new block.
    c.query("BEGIN").unwrap();
    assert!(c.query("SELECT 1/0").is_err());
    assert!(c.query("SELECT 1/0").is_err());
    c.query("ROLLBACK").unwrap();
    bind_to_nothing(&mut c);
    c.query("BEGIN").unwrap();
    c.query("INSERT INTO t VALUES (1)").unwrap();
    let e = c.next_error().unwrap();
    let late = since(exp);
    assert_ended(&e, &expired_message(exp));
    assert!((-0.05..1.0).contains(&late), "ended {late:.3} s after exp");
    assert_eq!(s.rows(), "0");
}

#[test]
fn idle_ends_a_client_that_always_has_its_next_command_queued() {
    let s = setup(&["gprxy.session_policy = 'idle'"]);
    let (mut c, exp) = s.login_expiring_in(4);
    bind_to_nothing(&mut c);
    // Two queries in one write: the first runs across the expiry (its transaction began
    // before it) and is answered; the second's transaction begins after: it is refused at
    // its start, though the backend never waited for the client in between.
    let sleep = (exp as f64 + 0.5 - now_f()).max(0.1);
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query(&format!("SELECT 'first', pg_sleep({sleep:.3})"), &mut out)
        .unwrap();
    postgres_protocol::message::frontend::query("INSERT INTO t VALUES (2)", &mut out).unwrap();
    c.send_raw(&out).unwrap();
    c.rows_until("first").unwrap();
    let e = c.next_error().unwrap();
    assert_ended(&e, &expired_message(exp));
    assert_eq!(s.rows(), "0", "the queued command never ran");
}

#[test]
fn a_token_inside_the_leeway_whose_session_would_end_at_once_is_refused() {
    let s = setup(&[]);
    let exp = gprxy_core::unix_time() - 5;
    let mut claims = s.idp.claims("alice", AUD);
    claims["exp"] = json!(exp);
    let token = s.key.token(json!({"typ": "at+jwt"}), &claims);
    let e = pgwire::connect(s.addr(), "alice", "postgres", Auth::Bearer(&token)).err().expect("refused");
    assert_eq!(e.message, "OAuth bearer authentication failed for user \"alice\"");
    let line = s.pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned();
    assert!(
        line.contains("oauth login refused reason=expired ")
            && line.contains("and gprxy.session_policy = idle ends its session then"),
        "{line}"
    );
}

/// A table whose rows say when they were written and when their transaction began, and a
/// function that writes one (as alice may).
fn ticks(s: &Setup) -> u32 {
    s.pg.sql(
        "CREATE TABLE ticks (at timestamptz DEFAULT clock_timestamp(), xact_start timestamptz DEFAULT now()); \
         GRANT ALL ON ticks TO alice; \
         CREATE FUNCTION tick() RETURNS int LANGUAGE sql AS $$ INSERT INTO ticks DEFAULT VALUES; SELECT 1 $$",
    );
    s.pg.sql("SELECT 'tick'::regproc::oid").parse().unwrap()
}

/// Rows whose transaction began at or after `unix` (the server's clock).
fn ticks_begun_after(s: &Setup, unix: i64) -> String {
    s.pg.sql(&format!("SELECT count(*) FROM ticks WHERE xact_start >= to_timestamp({unix})"))
}

/// #26 item 3: fast-path function calls always queued (FunctionCall reaches neither the
/// executor's nor the utility hook) do not keep an `idle` session to its hard limit: the first
/// call whose transaction began after the end is refused before it runs, and no row of one
/// commits.
#[test]
fn idle_ends_a_client_that_keeps_fast_path_calls_queued() {
    let s = setup(&["gprxy.session_policy = 'idle'"]);
    let oid = ticks(&s);
    let (mut c, exp) = s.login_expiring_in(3);
    let depth = 4;
    let mut burst = Vec::new();
    for _ in 0..depth {
        burst.extend_from_slice(&pgwire::msg::function_call(oid));
    }
    c.send_raw(&burst).unwrap();
    let (mut answers, mut after_exp) = (0u32, 0u32);
    let ended = loop {
        assert!(since(exp) < 20.0, "the session outlived its end by 20 s ({answers} answers)");
        match c.next_raw() {
            Ok((b'Z', _)) => {
                // One call answered: queue the next, so that one is always waiting (the write
                // fails once the server has closed; the FATAL is read next).
                let _ = c.send_raw(&pgwire::msg::function_call(oid));
            }
            Ok((b'V', _)) => {
                answers += 1;
                if since(exp) > 0.0 {
                    after_exp += 1;
                }
            }
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    let late = since(exp);
    assert_ended(&ended, &expired_message(exp));
    assert!(late < 1.0, "ended {late:.3} s after exp");
    assert!(answers > 10, "only {answers} calls ran before the end");
    assert_eq!(ticks_begun_after(&s, exp), "0", "{after_exp} calls answered after exp");
}

/// #26 item 4: without a POSIX timer (RLIMIT_SIGPENDING used up, here set to 0 for the server;
/// some machines have 0 for everyone) a token login is not refused; PostgreSQL's own timer ends
/// the session, armed again after an error, and the postmaster says once why.
#[test]
fn a_session_without_a_posix_timer_ends_on_postgresqls_own_timer() {
    let key = TestKey::rsa("key-1");
    let idp = TestIssuer::start(&[&key]);
    let pg = alice_oauth_cluster(AUD, &idp.issuer(), &["gprxy.session_policy = 'idle'"])
        .rlimit("--sigpending=0:0")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE TABLE t (x int); GRANT ALL ON t TO alice");
    let s = Setup { idp, key, pg };
    let (mut c, exp) = s.login_expiring_in(3);
    assert_eq!(c.scalar("SELECT 'before the end'").unwrap().as_deref(), Some("before the end"));
    assert!(
        s.pg.wait_for_log(
            "gprxy: no POSIX timer for session ends (Resource temporarily unavailable): sessions use PostgreSQL's timer",
            Duration::from_secs(5)
        ),
        "{}",
        s.pg.log()
    );
    // An error with no transaction open (PostgreSQL cancels its timers), then idle: PostgreSQL's
    // timer, armed again, ends the idle session at its end.
    bind_to_nothing(&mut c);
    let e = c.wait_for_end().unwrap();
    let late = since(exp);
    assert_ended(&e, &expired_message(exp));
    assert!((-0.05..1.0).contains(&late), "ended {late:.3} s after exp");
    assert_eq!(s.rows(), "0");
}

/// Review of #26: one simple Query message whose transactions all carry the message's start
/// time in PostgreSQL: a transaction opened inside it after the end (behind a sleep across the
/// end) is ended at its first statement, and its row never commits.
#[test]
fn idle_a_transaction_begun_after_the_end_inside_one_query_message_never_commits() {
    let s = setup(&["gprxy.session_policy = 'idle'"]);
    let (mut c, exp) = s.login_expiring_in(3);
    let sleep = exp as f64 + 1.0 - now_f();
    let e = c
        .query(&format!(
            "BEGIN; SELECT pg_sleep({sleep:.3}); COMMIT; BEGIN; INSERT INTO t VALUES (1); COMMIT"
        ))
        .unwrap_err();
    assert_ended(&e, &expired_message(exp));
    assert_eq!(s.rows(), "0", "a transaction begun after the end committed");
}
