//! Fallback mode against PostgreSQL 15 (Debian's) or 17 (`GPRXY_FALLBACK_PG=17`; `make test` runs
//! both): gprxy validates the token, maps its roles to a service account, logs in with
//! SCRAM-SHA-256 and sets the user's context.

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{connect_tls, Auth};
use gprxy_tests::proxy::{start_signed_context_upstream, ContextKeyFile, FallbackSetup, Proxy};
use gprxy_tests::{apply_sql_file, oauth_psql_with, require_validator, Cluster, PgVersion, TestCerts};
use serde_json::json;

struct World {
    idp: TestIssuer,
    key: TestKey,
    _pg: Cluster,
    proxy: Proxy,
    certs: TestCerts,
    context_key: ContextKeyFile,
}

fn start() -> World {
    start_with("")
}

fn start_with(fallback_extra: &str) -> World {
    start_full(fallback_extra, &[])
}

/// PostgreSQL 15 with gprxy_validator (SQL side: the signed context, its key pinned), the roles,
/// and gprxy in fallback mode in front of it.
fn start_full(fallback_extra: &str, pg_conf: &[&str]) -> World {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let (pg, certs, context_key) = server(pg_conf);
    let p = |n: &str| certs.dir().join(n);
    let (wpw, rpw, apw) = (p("writer.pw"), p("reader.pw"), p("admin.pw"));
    let proxy = Proxy::start(
        &FallbackSetup {
            upstream_port: pg.port(),
            cert: &certs.cert_path,
            key: &certs.key_path,
            issuer: &idp.issuer(),
            audience: "db",
            rules: &[
                ("admin", "app_admin", &apw),
                ("writer", "app_writer", &wpw),
                ("reader", "app_reader", &rpw),
            ],
            context_key: Some(&context_key.path),
            extra: fallback_extra,
        }
        .toml(),
    );
    World { idp, key, _pg: pg, proxy, certs, context_key }
}

/// PostgreSQL 15 with the extension's SQL side, the roles with their passwords (and password
/// files in the certificates' folder), and a pinned context key.
fn server(pg_conf: &[&str]) -> (Cluster, TestCerts, ContextKeyFile) {
    let version = PgVersion::fallback_upstream();
    require_validator(version);
    let certs = TestCerts::new();
    let context_key = ContextKeyFile::create(certs.dir().join("context.key"));
    let mut builder =
        Cluster::builder(version).hba("host all app_admin,app_writer,app_reader 127.0.0.1/32 scram-sha-256");
    for line in pg_conf {
        builder = builder.conf(*line);
    }
    let pg = start_signed_context_upstream(builder, &[&context_key.public]);
    pg.sql("SET password_encryption = 'scram-sha-256'; ALTER ROLE app_writer PASSWORD 'writer-secret-1'; ALTER ROLE app_reader PASSWORD 'reader-secret-1'; ALTER ROLE app_admin PASSWORD 'admin-secret-1'");
    let p = |n: &str| certs.dir().join(n);
    std::fs::write(p("writer.pw"), "writer-secret-1\n").unwrap();
    std::fs::write(p("reader.pw"), "reader-secret-1\n").unwrap();
    std::fs::write(p("admin.pw"), "admin-secret-1\n").unwrap();
    (pg, certs, context_key)
}

impl World {
    fn token(&self, sub: &str, roles: serde_json::Value, exp_delta: i64) -> String {
        self.token_for(sub, "11111111-1111-1111-1111-111111111111", roles, exp_delta)
    }

    fn token_for(&self, sub: &str, tenant: &str, roles: serde_json::Value, exp_delta: i64) -> String {
        let mut c = self.idp.claims(sub, "db");
        c["roles"] = roles;
        c["tenant_id"] = json!(tenant);
        c["exp"] = json!(gprxy_core::unix_time() + exp_delta);
        self.key.token(json!({"typ": "at+jwt"}), &c)
    }

    /// psql 15 with the token as its password.
    fn psql(&self, user: &str, token: &str, sslmode: &str, sql: &str) -> Result<String, String> {
        self.psql_with(&format!("user={user} sslmode={sslmode}"), token, sql)
    }

    /// psql 15 through the proxy with more connection options.
    fn psql_with(&self, options: &str, token: &str, sql: &str) -> Result<String, String> {
        let out = std::process::Command::new(PgVersion::V15.bin("psql"))
            .args(["-X", "-A", "-t", "-c", sql])
            .arg(format!("host=127.0.0.1 port={} dbname=postgres {options}", self.proxy.port))
            .env("PGPASSWORD", token)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

const CONTEXT: &str = "SELECT current_user, current_setting('app.user_id'), current_setting('app.tenant_id'), current_setting('app.roles'), current_setting('app.email'), gprxy.subject(), gprxy.claim('tenant_id'), array_to_string(gprxy.roles(), ',')";
const ACME: &str = "11111111-1111-1111-1111-111111111111";

#[test]
fn token_as_password_logs_in_as_the_mapped_account_with_context() {
    let w = start();
    let t = w.token("alice", json!(["writer"]), 300);
    assert_eq!(
        w.psql("alice", &t, "require", CONTEXT).unwrap(),
        format!("app_writer|alice|{ACME}|writer||alice|{ACME}|writer")
    );
    let r = w.token("bob", json!(["reader", "viewer"]), 300);
    assert_eq!(
        w.psql("bob", &r, "require", "SELECT current_user, current_setting('app.user_id')").unwrap(),
        "app_reader|bob"
    );
    let ok = w.proxy.wait_events("login", 2);
    assert!(ok.iter().all(|e| e["outcome"] == "success" && e["mechanism"] == "token-password"), "{ok:#?}");
    assert!(!w.proxy.log().contains(&t));
    assert!(!w.proxy.log().contains("writer-secret-1"), "a service-account password reached the log");
}

#[test]
fn refusals_each_with_a_clear_error() {
    let w = start();
    let expired = w.token("alice", json!(["writer"]), -120);
    let e = w.psql("alice", &expired, "require", "SELECT 1").unwrap_err();
    assert!(e.contains("FATAL:  gprxy: token refused (expired): token expired at"), "{e}");
    let no_role = w.token("alice", json!(["guest"]), 300);
    let e = w.psql("alice", &no_role, "require", "SELECT 1").unwrap_err();
    assert!(e.contains("FATAL:  gprxy: no role in the token maps to a service account"), "{e}");
    let t = w.token("alice", json!(["writer"]), 300);
    let e = w.psql("bob", &t, "require", "SELECT 1").unwrap_err();
    assert!(e.contains("FATAL:  gprxy: user name \"bob\" does not match the token"), "{e}");
    let e = w.psql("alice", &t, "disable", "SELECT 1").unwrap_err();
    assert!(e.contains("FATAL:  gprxy: token login requires TLS (sslmode=require or stronger)"), "{e}");
    let mut forged = t.clone().into_bytes();
    let i = forged.len() - 20;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let e = w.psql("alice", &String::from_utf8(forged).unwrap(), "require", "SELECT 1").unwrap_err();
    assert!(e.contains("FATAL:  gprxy: token refused (bad_signature): signature does not verify"), "{e}");
    for (claim, value, reason) in [
        ("aud", json!("another-service"), "aud_mismatch"),
        ("iss", json!("https://evil.example"), "iss_not_trusted"),
    ] {
        let mut c = w.idp.claims("alice", "db");
        c["roles"] = json!(["writer"]);
        c[claim] = value;
        let bad = w.key.token(json!({"typ": "at+jwt"}), &c);
        let e = w.psql("alice", &bad, "require", "SELECT 1").unwrap_err();
        assert!(e.contains(&format!("FATAL:  gprxy: token refused ({reason})")), "{e}");
    }
    let failures = w.proxy.wait_events("login", 7);
    assert!(failures.iter().all(|e| e["outcome"] == "failure" && e["sqlstate"] == "28000"), "{failures:#?}");
}

#[test]
fn psql_18_device_flow_through_the_fallback_proxy() {
    let w = start_with("client_auth = \"oauthbearer\"\nscope = \"openid db:read\"");
    let t = w.token("alice", json!(["writer"]), 300);
    w.idp.hand_out("fallback-alice", &t);
    let conn = format!("host=127.0.0.1 port={} user=alice dbname=postgres sslmode=require", w.proxy.port);
    let out = oauth_psql_with(&conn, &w.idp.issuer(), "fallback-alice", CONTEXT).unwrap();
    assert_eq!(out, format!("app_writer|alice|{ACME}|writer||alice|{ACME}|writer"));
    let events = w.proxy.wait_events("login", 2);
    assert_eq!(events.iter().filter(|e| e["outcome"] == "discovery").count(), 1, "{events:#?}");
    assert_eq!(
        events.iter().filter(|e| e["outcome"] == "success" && e["mechanism"] == "OAUTHBEARER").count(),
        1
    );
    // An expired token through the same path is refused with the reason.
    let expired = w.token("alice", json!(["writer"]), -120);
    w.idp.hand_out("fallback-expired", &expired);
    let e = oauth_psql_with(&conn, &w.idp.issuer(), "fallback-expired", "SELECT 1").unwrap_err();
    assert!(e.contains("gprxy: token refused (expired)"), "{e}");
}

#[test]
fn session_setting_policies_isolate_tenants_but_trust_the_client() {
    let w = start();
    for f in ["02_schema.sql", "03_rls_session_settings.sql", "04_demo_data.sql"] {
        apply_sql_file(&w._pg, "postgres", f);
    }
    let titles = "SELECT string_agg(title, ',' ORDER BY title) FROM posts";
    let acme = w.token("alice", json!(["writer"]), 300); // tenant 1111... (see token())
    assert_eq!(w.psql("alice", &acme, "require", titles).unwrap(), "acme public,alice private");
    let e = w.psql("alice", &acme, "require", "INSERT INTO posts (tenant_id, owner_id, title) VALUES ('11111111-1111-1111-1111-111111111111', 'dave', 'x')").unwrap_err();
    assert!(e.contains("new row violates row-level security policy for table \"posts\""), "{e}");
    // The weakness this style documents: the client can change its own context.
    let widened = format!(
        "SET app.tenant_id = '22222222-2222-2222-2222-222222222222'; SET app.user_id = 'bob'; {titles}"
    );
    assert_eq!(w.psql("alice", &acme, "require", &widened).unwrap(), "SET\nSET\nbob private,globex public");
}

#[test]
fn pool_of_one_never_leaks_context_across_2000_sessions() {
    let w = start_with("[fallback.pool]\ndefault_size = 1");
    let a = w.token_for("alice", "aaaaaaaa-0000-0000-0000-000000000000", json!(["writer"]), 3600);
    let b = w.token_for("bob", "bbbbbbbb-0000-0000-0000-000000000000", json!(["writer"]), 3600);
    let mut pids = std::collections::HashSet::new();
    for i in 0..2000 {
        let (user, token, tenant) =
            if i % 2 == 0 { ("alice", &a, "aaaaaaaa") } else { ("bob", &b, "bbbbbbbb") };
        let mut c = connect_tls(w.proxy.addr(), user, "postgres", Auth::Password(token), &w.certs.ca)
            .unwrap_or_else(|e| panic!("session {i}: {e}"));
        let row = c
            .query("SELECT current_setting('app.user_id'), left(current_setting('app.tenant_id'), 8), pg_backend_pid()::text")
            .unwrap()
            .remove(0);
        assert_eq!(row[0].as_deref(), Some(user), "session {i}");
        assert_eq!(row[1].as_deref(), Some(tenant), "session {i}");
        pids.insert(row[2].clone());
        // Whatever the client sets is gone for the next one.
        c.query("SET app.user_id = 'mallory'; SET app.tenant_id = 'leak'").unwrap();
        c.close();
    }
    assert_eq!(pids.len(), 1, "a pool of one used {} server connections", pids.len());
}

#[test]
fn pool_at_its_limit_waits_then_times_out_and_bad_connections_are_replaced() {
    let w = start_with("[fallback.pool]\ndefault_size = 1\nwait_timeout_ms = 500");
    let t = w.token("alice", json!(["writer"]), 3600);
    let connect = || connect_tls(w.proxy.addr(), "alice", "postgres", Auth::Password(&t), &w.certs.ca);
    let mut holder = connect().unwrap();
    let pid1 = holder.scalar("SELECT pg_backend_pid()").unwrap();
    let started = std::time::Instant::now();
    let e = connect().err().expect("the pool is full");
    assert!(started.elapsed() >= std::time::Duration::from_millis(500));
    assert_eq!(e.code.as_deref(), Some("53300"));
    assert_eq!(e.message, "gprxy: no free server connection for app_writer within 500 ms");
    holder.close();
    std::thread::sleep(std::time::Duration::from_millis(200));

    // The pooled connection is killed: the next client gets a new one.
    w._pg.sql(&format!("SELECT pg_terminate_backend({})", pid1.clone().unwrap()));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut c = connect().unwrap();
    let pid2 = c.scalar("SELECT pg_backend_pid()").unwrap();
    assert_ne!(pid1, pid2);
    // A client that leaves inside a transaction (#26): its transaction is rolled back on the
    // server, then the connection is reset and serves the next client.
    c.query("BEGIN; SET LOCAL app.user_id = 'mallory'; CREATE TEMP TABLE left_behind (x int)").unwrap();
    c.close();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut c = connect().unwrap();
    let pid3 = c.scalar("SELECT pg_backend_pid()").unwrap();
    assert_eq!(pid2, pid3, "a settled connection is reused");
    assert_eq!(c.scalar("SELECT to_regclass('pg_temp.left_behind')::text").unwrap(), None);
    assert_eq!(c.scalar("SELECT current_setting('app.user_id')").unwrap().as_deref(), Some("alice"));
    c.close();
    std::thread::sleep(std::time::Duration::from_millis(200));
    // A clean one is reused, and the pool's state is in the metrics.
    let mut c = connect().unwrap();
    let (up, down) = (
        w.proxy.metric("gprxy_relayed_bytes_total{direction=\"client_to_server\"}"),
        w.proxy.metric("gprxy_relayed_bytes_total{direction=\"server_to_client\"}"),
    );
    assert_eq!(c.scalar("SELECT pg_backend_pid()").unwrap(), pid3);
    // Relayed bytes are counted while the session runs: the query as sent, and an answer.
    assert_eq!(
        w.proxy.metric("gprxy_relayed_bytes_total{direction=\"client_to_server\"}") - up,
        (1 + 4 + "SELECT pg_backend_pid()".len() + 1) as f64
    );
    assert!(w.proxy.metric("gprxy_relayed_bytes_total{direction=\"server_to_client\"}") > down);
    let m = w.proxy.admin_get("/metrics");
    assert!(m.contains("gprxy_pool_in_use{database=\"postgres\",account=\"app_writer\"} 1"), "{m}");
    assert!(m.contains("gprxy_pool_idle{database=\"postgres\",account=\"app_writer\"} 0"), "{m}");
    assert!(m.contains("gprxy_pool_wait_seconds_count"), "{m}");
    c.close();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let m = w.proxy.admin_get("/metrics");
    assert!(m.contains("gprxy_pool_in_use{database=\"postgres\",account=\"app_writer\"} 0"), "{m}");
    assert!(m.contains("gprxy_pool_idle{database=\"postgres\",account=\"app_writer\"} 1"), "{m}");
}

/// The last signed context the proxy sent that the server log shows (log_statement = all).
fn logged_context(log: &str) -> Option<String> {
    // "parameters:" (PostgreSQL 15), "Parameters:" (17 and later).
    let line =
        log.lines().rev().find(|l| l.to_ascii_lowercase().contains("parameters:") && l.contains("'v2."))?;
    let start = line.rfind("'v2.")? + 1;
    let end = start + line[start..].find('\'')?;
    Some(line[start..end].to_owned())
}

#[test]
fn signed_context_cannot_be_widened_forged_or_replayed() {
    let w = start_full("[fallback.pool]\ndefault_size = 1", &["log_statement = 'all'"]);
    for f in ["02_schema.sql", "03_rls_gprxy_claims.sql", "04_demo_data.sql"] {
        apply_sql_file(&w._pg, "postgres", f);
    }
    let titles = "SELECT coalesce(string_agg(title, ',' ORDER BY title), '') FROM posts";
    let alice = w.token("alice", json!(["writer"]), 300);
    let bob = w.token_for("bob", "22222222-2222-2222-2222-222222222222", json!(["writer"]), 300);
    assert_eq!(w.psql("alice", &alice, "require", titles).unwrap(), "acme public,alice private");

    // SET changes the plain settings, not the claims the policies read.
    let widened = format!(
        "SET app.tenant_id = '22222222-2222-2222-2222-222222222222'; SET app.user_id = 'bob'; {titles}"
    );
    assert_eq!(w.psql("alice", &alice, "require", &widened).unwrap(), "SET\nSET\nacme public,alice private");

    // A context the client makes up.
    let e = w
        .psql(
            "alice",
            &alice,
            "require",
            "SELECT gprxy.set_context('v2.eyJuIjo5OSwic3ViIjoiYm9iIiwicm9sZXMiOltdLCJjbGFpbXMiOnt9fQ.AAAA')",
        )
        .unwrap_err();
    assert!(
        e.contains("ERROR:  gprxy: context refused: the context signature does not verify against any key in gprxy.context_keys"),
        "{e}"
    );

    // Alice's real context, taken from the server log, replayed by bob on the same connection.
    let stolen = logged_context(&w._pg.log()).expect("the proxy's set_context call is in the log");
    let e = w.psql("bob", &bob, "require", &format!("SELECT gprxy.set_context('{stolen}')")).unwrap_err();
    assert!(e.contains("ERROR:  gprxy: context refused: the context counter"), "{e}");
    assert!(e.contains("(replayed context)"), "{e}");
    assert_eq!(w.psql("bob", &bob, "require", titles).unwrap(), "bob private,globex public");

    // Clearing the context only narrows: nothing is visible without one.
    let cleared = "SELECT gprxy.reset_context(); SELECT count(*) FROM posts";
    assert_eq!(w.psql("alice", &alice, "require", cleared).unwrap(), "0");
}

#[test]
fn extension_accepts_only_contexts_signed_with_a_pinned_key_for_its_connection() {
    use gprxy_core::context::{ContextKey, ContextSigner, NONCE_PARAMETER};
    use gprxy_tests::pgwire::connect_params;
    use std::sync::Arc;
    let w = start();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", w._pg.port()).parse().unwrap();
    let claims = |sub: &str| json!({"sub": sub, "tenant_id": "t"}).as_object().cloned().unwrap();
    let pw = Auth::Password("writer-secret-1");
    // A connection started as the proxy starts one: its nonce, and contexts naming its process.
    let open = |signer: &mut ContextSigner, nonce: &str| {
        let c = connect_params(addr, "app_writer", "postgres", pw, &[(NONCE_PARAMETER, nonce)]).unwrap();
        signer.bind_backend(c.key.unwrap().0);
        c
    };
    let refused = |c: &mut gprxy_tests::pgwire::PgConn, ctx: &str| {
        let e = c.query(&format!("SELECT gprxy.set_context('{ctx}')")).unwrap_err();
        assert_eq!(e.code.as_deref(), Some("28000"), "{e}");
        e.message
    };

    let mut plain = connect_params(addr, "app_writer", "postgres", pw, &[]).unwrap();
    let mut signer = ContextSigner::new(w.context_key.key()).unwrap();
    signer.bind_backend(plain.key.unwrap().0);
    let ctx = signer.sign(Some("alice".into()), vec![], claims("alice"));
    assert_eq!(
        refused(&mut plain, &ctx),
        "gprxy: context refused: no gprxy.context_nonce was given at connection start"
    );

    let mut signer = ContextSigner::new(w.context_key.key()).unwrap();
    let nonce = signer.nonce().to_owned();
    let mut c = open(&mut signer, &nonce);
    let first = signer.sign(Some("alice".into()), vec!["writer".into()], claims("alice"));
    let second = signer.sign(Some("bob".into()), vec![], claims("bob"));
    c.query(&format!("SELECT gprxy.set_context('{second}')")).unwrap();
    assert_eq!(c.scalar("SELECT gprxy.subject()").unwrap().as_deref(), Some("bob"));
    assert_eq!(
        refused(&mut c, &first),
        "gprxy: context refused: the context counter 1 is not above 2 (replayed context)"
    );
    assert_eq!(
        refused(&mut c, &second),
        "gprxy: context refused: the context counter 2 is not above 2 (replayed context)"
    );

    // The same context on another connection: refused by its nonce, and by its process id when
    // the other connection copies the nonce.
    let mut other_signer = ContextSigner::new(w.context_key.key()).unwrap();
    let other_nonce = other_signer.nonce().to_owned();
    let mut d = open(&mut other_signer, &other_nonce);
    let other = "gprxy: context refused: the context was signed for another connection";
    assert_eq!(refused(&mut d, &second), other);
    let mut copied =
        connect_params(addr, "app_writer", "postgres", pw, &[(NONCE_PARAMETER, &nonce)]).unwrap();
    assert_eq!(refused(&mut copied, &second), other);
    assert_eq!(copied.scalar("SELECT gprxy.subject()").unwrap(), None);

    // A service account with a key of its own (not pinned) cannot sign.
    let own = Arc::new(ContextKey::from_pem(ContextKey::generate_pem().unwrap().as_bytes()).unwrap());
    let mut mallory = ContextSigner::new(own).unwrap();
    let mallory_nonce = mallory.nonce().to_owned();
    let mut m = open(&mut mallory, &mallory_nonce);
    let forged = mallory.sign(Some("admin".into()), vec!["admin".into()], claims("admin"));
    assert_eq!(
        refused(&mut m, &forged),
        "gprxy: context refused: the context signature does not verify against any key in gprxy.context_keys"
    );
    assert_eq!(m.scalar("SELECT gprxy.subject()").unwrap(), None);

    let twice = [(NONCE_PARAMETER, nonce.as_str()), (NONCE_PARAMETER, nonce.as_str())];
    let mut e = connect_params(addr, "app_writer", "postgres", pw, &twice).unwrap();
    signer.bind_backend(e.key.unwrap().0);
    let ctx = signer.sign(None, vec![], claims("x"));
    assert_eq!(
        refused(&mut e, &ctx),
        "gprxy: context refused: gprxy.context_nonce was given more than once at connection start"
    );
}

#[test]
fn client_startup_settings_apply_per_session_and_proxy_names_are_refused() {
    let w = start_with("[fallback.pool]\ndefault_size = 1");
    let t = w.token("alice", json!(["writer"]), 300);
    let run = |options: &str, sql: &str| {
        w.psql_with(
            &format!("user=alice sslmode=require application_name=myapp options='{options}'"),
            &t,
            sql,
        )
    };
    let show = "SELECT current_setting('application_name'), current_setting('search_path'), current_setting('statement_timeout')";
    assert_eq!(
        run("-c search_path=pg_catalog -c statement_timeout=5s", show).unwrap(),
        "myapp|pg_catalog|5s"
    );
    // The next client on the same pooled connection starts from the server's defaults.
    assert_eq!(run("", show).unwrap(), "myapp|\"$user\", public|0");
    let e = run("-c gprxy.context_nonce=AAAA", "SELECT 1").unwrap_err();
    assert!(
        e.contains("FATAL:  gprxy: startup parameter \"gprxy.context_nonce\" is set by the proxy"),
        "{e}"
    );
    let e = run("-c app.user_id=admin", "SELECT 1").unwrap_err();
    assert!(e.contains("FATAL:  gprxy: startup parameter \"app.user_id\" is set by the proxy"), "{e}");
    let e = run("-c no_such_setting=1", "SELECT 1").unwrap_err();
    assert!(
        e.contains(
            "FATAL:  gprxy: session set-up failed: unrecognized configuration parameter \"no_such_setting\""
        ),
        "{e}"
    );
}

#[test]
fn writer_writes_reader_reads_admin_sees_all_with_claim_policies() {
    let w = start();
    for f in ["02_schema.sql", "03_rls_gprxy_claims.sql", "04_demo_data.sql"] {
        apply_sql_file(&w._pg, "postgres", f);
    }
    let titles = "SELECT string_agg(title, ',' ORDER BY title) FROM posts";
    let writer = w.token("alice", json!(["writer"]), 300);
    let insert =
        format!("INSERT INTO posts (tenant_id, owner_id, title) VALUES ('{ACME}', 'alice', 'alice new')");
    assert_eq!(w.psql("alice", &writer, "require", &insert).unwrap(), "INSERT 0 1");
    assert_eq!(w.psql("alice", &writer, "require", titles).unwrap(), "acme public,alice new,alice private");
    // Another tenant's row, or another owner's, is refused by the policies.
    let foreign = "INSERT INTO posts (tenant_id, owner_id, title) VALUES ('22222222-2222-2222-2222-222222222222', 'alice', 'x')";
    let e = w.psql("alice", &writer, "require", foreign).unwrap_err();
    assert!(
        e.contains("new row violates row-level security policy \"tenant_isolation\" for table \"posts\""),
        "{e}"
    );

    let reader = w.token_for("bob", "22222222-2222-2222-2222-222222222222", json!(["reader"]), 300);
    assert_eq!(w.psql("bob", &reader, "require", titles).unwrap(), "bob private,globex public");
    let e = w
        .psql("bob", &reader, "require", "INSERT INTO posts (tenant_id, owner_id, title) VALUES ('22222222-2222-2222-2222-222222222222', 'bob', 'x')")
        .unwrap_err();
    assert!(e.contains("permission denied for table posts"), "{e}");

    // admin maps first (first rule wins) and its policy grants every row of every tenant.
    let admin = w.token("carol", json!(["reader", "admin"]), 300);
    assert_eq!(
        w.psql("carol", &admin, "require", &format!("SELECT current_user; {titles}")).unwrap(),
        "app_admin\nacme public,alice new,alice private,bob private,dave private,globex public"
    );
}

#[test]
fn pooled_sessions_get_their_own_cancel_keys() {
    use gprxy_tests::pgwire::cancel;
    use std::time::{Duration, Instant};
    let w = start_with("[fallback.pool]\ndefault_size = 1");
    let t = w.token("alice", json!(["writer"]), 300);
    let connect =
        || connect_tls(w.proxy.addr(), "alice", "postgres", Auth::Password(&t), &w.certs.ca).unwrap();
    let mut first = connect();
    let old_key = first.key.expect("BackendKeyData");
    let pid = first.scalar("SELECT pg_backend_pid()").unwrap();
    first.close();
    std::thread::sleep(Duration::from_millis(200));

    let mut second = connect();
    let key = second.key.expect("BackendKeyData");
    assert_eq!(second.scalar("SELECT pg_backend_pid()").unwrap(), pid, "the same pooled server connection");
    assert_eq!(key.0, old_key.0, "the key names the server's process");
    assert_ne!(key.1, old_key.1, "but its secret is the session's own");
    // The first session's key no longer reaches the connection.
    let addr = w.proxy.addr();
    let stale = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        cancel(addr, old_key).unwrap();
    });
    assert_eq!(second.scalar("SELECT pg_sleep(1)::text").unwrap().as_deref(), Some(""));
    stale.join().unwrap();
    // Its own key cancels.
    let started = Instant::now();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel(addr, key).unwrap();
    });
    let e = second.query("SELECT pg_sleep(30)").unwrap_err();
    canceller.join().unwrap();
    assert_eq!(e.code.as_deref(), Some("57014"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let cancels = w.proxy.wait_events("cancel", 2);
    assert_eq!(cancels.iter().filter(|e| e["outcome"] == "dropped").count(), 1, "{cancels:#?}");
    assert_eq!(cancels.iter().filter(|e| e["outcome"] == "forwarded").count(), 1, "{cancels:#?}");
}

#[test]
fn a_protocol_3_2_client_is_negotiated_down_to_3_0() {
    let w = start();
    let t = w.token("alice", json!(["writer"]), 300);
    let out = std::process::Command::new(PgVersion::V18.bin("psql"))
        .args(["-X", "-A", "-t", "-c", "SELECT current_user, gprxy.subject()", "-c", "\\conninfo"])
        .arg(format!(
            "host=127.0.0.1 port={} user=alice dbname=postgres sslmode=require max_protocol_version=3.2",
            w.proxy.port
        ))
        .env("PGPASSWORD", &t)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("app_writer|alice\n"), "{stdout}");
    assert!(stdout.contains("Protocol Version|3.0"), "{stdout}");
}

#[test]
fn a_rotated_key_is_fetched_once_and_an_unknown_one_refused() {
    let w = start_with("[fallback.keys]\nunknown_kid_cooldown_secs = 1");
    let first = w.token("alice", json!(["writer"]), 300);
    assert_eq!(w.psql("alice", &first, "require", "SELECT current_user").unwrap(), "app_writer");
    // The issuer adds a key; a token signed with it names a kid the cached keys lack.
    let rotated = TestKey::rsa("k2");
    w.idp.publish(&[&w.key, &rotated]);
    let mut c = w.idp.claims("alice", "db");
    c["roles"] = json!(["writer"]);
    let t2 = rotated.token(json!({"typ": "at+jwt"}), &c);
    std::thread::sleep(std::time::Duration::from_millis(1100)); // past the cooldown
    let fetches = w.idp.jwks_requests();
    assert_eq!(w.psql("alice", &t2, "require", "SELECT current_user").unwrap(), "app_writer");
    assert_eq!(w.idp.jwks_requests(), fetches + 1);
    // A key the issuer never published is refused, within the refetch cooldown without a fetch.
    let stranger = TestKey::rsa("k3");
    let t3 = stranger.token(json!({"typ": "at+jwt"}), &c);
    let e = w.psql("alice", &t3, "require", "SELECT 1").unwrap_err();
    assert!(e.contains("FATAL:  gprxy: token refused (kid_unknown)"), "{e}");
    assert_eq!(w.idp.jwks_requests(), fetches + 1);
}

#[test]
fn sighup_keeps_sessions_and_closes_the_old_pools_politely() {
    use std::time::{Duration, Instant};
    let w = start();
    let t = w.token("alice", json!(["writer"]), 300);
    let writers = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_writer'";
    let wait_for = |n: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while w._pg.sql(writers) != n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(w._pg.sql(writers), n, "server connections of app_writer");
    };
    // One session in progress, one server connection idle in the pool.
    let mut running =
        connect_tls(w.proxy.addr(), "alice", "postgres", Auth::Password(&t), &w.certs.ca).unwrap();
    assert_eq!(w.psql("alice", &t, "require", "SELECT current_user").unwrap(), "app_writer");
    wait_for("2");

    w.proxy.signal("HUP");
    w.proxy.wait_events("reload", 1);
    // The idle connection is closed; the session keeps its connection and its context.
    wait_for("1");
    assert_eq!(running.scalar("SELECT gprxy.subject()").unwrap().as_deref(), Some("alice"));
    // When it ends, its connection is closed rather than returned to the old pool.
    running.close();
    wait_for("0");
    // New logins use the new pools.
    assert_eq!(w.psql("alice", &t, "require", "SELECT gprxy.subject()").unwrap(), "alice");
    let log = w._pg.log();
    assert!(!log.contains("unexpected EOF"), "a server connection was dropped without Terminate:\n{log}");
}

#[test]
fn hostile_database_names_cannot_inject_metrics_or_grow_the_pool_label_set() {
    use gprxy_tests::proxy::parse_metrics;
    let w = start();
    let (t, addr, ca) = (w.token("alice", json!(["writer"]), 3600), w.proxy.addr(), w.certs.ca.clone());
    let connect = move |db: &str| connect_tls(addr, "alice", db, Auth::Password(&t), &ca);
    connect("postgres").unwrap().close();
    let hostile = |i: usize| format!("x\"}} 1\ngprxy_pool_idle 9\n#{i}{}", "A".repeat(8_000));
    let e = connect(&hostile(0)).err().expect("no such database");
    assert_eq!(
        (e.code.as_deref(), e.message.as_str()),
        (Some("08006"), "gprxy: the service account could not log in")
    );
    let pool_series = |samples: &[gprxy_tests::proxy::Sample]| {
        samples
            .iter()
            .filter(|s| s.0.starts_with("gprxy_pool_") && !s.0.starts_with("gprxy_pool_wait_seconds"))
            .cloned()
            .collect::<Vec<_>>()
    };
    let samples = parse_metrics(&w.proxy.admin_get("/metrics"));
    let pools = pool_series(&samples);
    let postgres = |s: &gprxy_tests::proxy::Sample| {
        s.1.get("database").map(String::as_str) == Some("postgres")
            && s.1.get("account").map(String::as_str) == Some("app_writer")
    };
    assert_eq!(pools.len(), 3, "{pools:?}");
    assert!(pools.iter().all(postgres), "{pools:?}");

    // A thousand more: still only the real database's pool.
    std::thread::scope(|scope| {
        for th in 0..4 {
            let connect = &connect;
            scope.spawn(move || {
                for i in 0..250 {
                    let e = connect(&hostile(1 + th * 250 + i)).err().expect("no such database");
                    assert_eq!(e.code.as_deref(), Some("08006"), "{e}");
                }
            });
        }
    });
    let text = w.proxy.admin_get("/metrics");
    assert!(text.len() < 16 * 1024, "/metrics grew to {} bytes", text.len());
    let pools = pool_series(&parse_metrics(&text));
    assert_eq!(pools.len(), 3, "{pools:?}");
    assert!(pools.iter().all(postgres), "{pools:?}");
    let idle = pools.iter().find(|s| s.0 == "gprxy_pool_idle").unwrap();
    assert_eq!(idle.2, 1.0, "{pools:?}");
}

#[test]
fn fallback_refuses_a_startup_packet_naming_a_parameter_twice() {
    use gprxy_tests::pgwire::connect_params;
    let w = start();
    let t = w.token("alice", json!(["writer"]), 300);
    let addr: std::net::SocketAddr = w.proxy.addr();
    let e = connect_params(addr, "alice", "postgres", Auth::Password(&t), &[("database", "other")])
        .err()
        .expect("refused");
    assert_eq!(e.code.as_deref(), Some("08P01"), "{e}");
    assert_eq!(e.message, "gprxy: invalid startup packet: parameter \"database\" is given more than once");
}

#[test]
fn oauthbearer_client_auth_refuses_a_token_without_tls() {
    use gprxy_tests::pgwire::connect;
    let w = start_with("client_auth = \"oauthbearer\"");
    let t = w.token("alice", json!(["writer"]), 300);
    let e = connect(w.proxy.addr(), "alice", "postgres", Auth::Bearer(&t)).err().expect("refused");
    assert_eq!(e.code.as_deref(), Some("28000"), "{e}");
    assert_eq!(e.message, "gprxy: token login requires TLS (sslmode=require or stronger)");
    // Over TLS the same token logs in.
    let mut c = connect_tls(w.proxy.addr(), "alice", "postgres", Auth::Bearer(&t), &w.certs.ca).unwrap();
    assert_eq!(c.scalar("SELECT current_user").unwrap().as_deref(), Some("app_writer"));
}

#[test]
fn key_fetch_failures_reach_the_log_but_not_the_client() {
    let closed = gprxy_tests::free_port();
    let w = start_with(&format!("jwks_uri = \"http://127.0.0.1:{closed}/jwks\""));
    let t = w.token("alice", json!(["writer"]), 300);
    let e = connect_tls(w.proxy.addr(), "alice", "postgres", Auth::Password(&t), &w.certs.ca)
        .err()
        .expect("no keys");
    assert_eq!(e.code.as_deref(), Some("28000"), "{e}");
    assert_eq!(
        e.message,
        "gprxy: token refused (keys_unavailable): the issuer's signing keys are unavailable"
    );
    let events = w.proxy.wait_events("login", 1);
    assert_eq!(events[0]["error"], e.message.as_str(), "{events:?}");
    let detail = events[0]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&format!("127.0.0.1:{closed}/jwks")), "{events:?}");
}

#[test]
fn sighup_to_another_jwks_uri_drops_the_old_keys() {
    let w = start();
    let old = w.token("alice", json!(["writer"]), 300);
    assert_eq!(w.psql("alice", &old, "require", "SELECT current_user").unwrap(), "app_writer");
    // The configuration now takes the issuer's keys from another key set.
    let moved_key = TestKey::rsa("k-moved");
    let moved = TestIssuer::start(&[&moved_key]);
    let uri = format!("{}/jwks", moved.issuer());
    w.proxy.edit_config(|t| t.replacen("[fallback]\n", &format!("[fallback]\njwks_uri = \"{uri}\"\n"), 1));
    w.proxy.signal("HUP");
    let reload = w.proxy.wait_events("reload", 1);
    assert!(
        reload.iter().any(|e| e.to_string().contains("configuration and certificates reloaded")),
        "{reload:?}"
    );
    // The keys cached from the old place (still fresh) are not kept across the reload.
    let e = w.psql("alice", &old, "require", "SELECT 1").unwrap_err();
    assert!(e.contains("kid_unknown"), "{e}");
    let mut c = w.idp.claims("alice", "db");
    c["roles"] = json!(["writer"]);
    let new = moved_key.token(json!({"typ": "at+jwt"}), &c);
    assert_eq!(w.psql("alice", &new, "require", "SELECT current_user").unwrap(), "app_writer");
    assert_eq!(moved.jwks_requests(), 1);
}

/// Alice (after `setup`) sends `burst` as simple queries and Terminate in one write, and closes;
/// at once bob (another tenant) logs in on the same pool of one and sends
/// `ROLLBACK; SELECT 'bob-probe', pg_backend_pid(), gprxy.subject(), current_setting('app.user_id', true), <extra>`.
/// Returns alice's server process id, the rows bob received before his probe's, and the probe's.
fn bob_after_alices_burst(
    w: &World,
    setup: &str,
    burst: &[&str],
    extra: &str,
) -> (String, Vec<gprxy_tests::pgwire::Row>, gprxy_tests::pgwire::Row) {
    use postgres_protocol::message::frontend;
    let a = w.token("alice", json!(["writer"]), 300);
    let b = w.token_for("bob", "22222222-2222-2222-2222-222222222222", json!(["writer"]), 300);
    let mut alice =
        connect_tls(w.proxy.addr(), "alice", "postgres", Auth::Password(&a), &w.certs.ca).unwrap();
    let alice_pid = alice.scalar("SELECT pg_backend_pid()").unwrap().unwrap();
    if !setup.is_empty() {
        alice.query(setup).unwrap();
    }
    let mut out = bytes::BytesMut::new();
    for q in burst {
        frontend::query(q, &mut out).unwrap();
    }
    frontend::terminate(&mut out);
    alice.send_raw(&out).unwrap();
    drop(alice);
    let mut bob =
        connect_tls(w.proxy.addr(), "bob", "postgres", Auth::Password(&b), &w.certs.ca).expect("bob logs in");
    let mut probe = bytes::BytesMut::new();
    frontend::query(
        &format!("ROLLBACK; SELECT 'bob-probe', pg_backend_pid()::text, gprxy.subject(), current_setting('app.user_id', true), {extra}"),
        &mut probe,
    )
    .unwrap();
    bob.send_raw(&probe).unwrap();
    let (before, row) = bob.rows_until("bob-probe").expect("bob's probe is answered");
    (alice_pid, before, row)
}

#[test]
fn a_burst_before_terminate_cannot_skip_the_pool_reset() {
    let w = start_with("[fallback.pool]\ndefault_size = 1");
    let burst = ["", "", "SELECT pg_sleep(2)", "BEGIN"];
    let (alice_pid, before, row) = bob_after_alices_burst(&w, "", &burst, "'x'");
    assert_eq!(before, Vec::<gprxy_tests::pgwire::Row>::new(), "bob received answers he did not ask for");
    assert_eq!(row[2].as_deref(), Some("bob"), "gprxy.subject() in bob's session: {row:?}");
    assert_eq!(row[3].as_deref(), Some("bob"), "app.user_id in bob's session: {row:?}");
    // Alice's requests were unanswered when she left (#26): they were cancelled and her open
    // transaction rolled back before her connection (now perhaps bob's) served anyone else;
    // nothing of hers still runs on the server.
    let _ = alice_pid;
    let running: u32 = w
        ._pg
        .sql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep(2)%'")
        .parse()
        .unwrap();
    assert_eq!(running, 0, "alice's statement still runs");
}

#[test]
fn a_copy_left_open_cannot_keep_a_temp_table_for_the_next_user() {
    let w = start_with("[fallback.pool]\ndefault_size = 1");
    for f in ["02_schema.sql", "03_rls_gprxy_claims.sql", "04_demo_data.sql"] {
        apply_sql_file(&w._pg, "postgres", f);
    }
    // A temp table named like the real one would shadow it for whoever gets the session next,
    // if the COPY swallowed the reset's DISCARD ALL. (PostgreSQL 15.20 instead ends the
    // connection: "protocol synchronization was lost", so bob's session died before the fix.)
    let plant = "CREATE TEMP TABLE posts (title text); INSERT INTO posts VALUES ('planted by alice')";
    let burst = ["", "", "SELECT pg_sleep(2)", "COPY posts FROM STDIN"];
    let titles = "(SELECT string_agg(title, ',' ORDER BY title) FROM posts)";
    let (alice_pid, before, row) = bob_after_alices_burst(&w, plant, &burst, titles);
    assert_eq!(before, Vec::<gprxy_tests::pgwire::Row>::new(), "bob received answers he did not ask for");
    assert_eq!(
        row[2..].to_vec(),
        [Some("bob".into()), Some("bob".into()), Some("bob private,globex public".into())]
    );
    assert_ne!(row[1].as_deref(), Some(alice_pid.as_str()), "alice's server connection was reused");
}

#[test]
fn sighup_returns_a_running_sessions_connection_to_its_own_pool() {
    use std::time::{Duration, Instant};
    // At debug1 the server logs a connection that ends without Terminate.
    let w = start_full("", &["log_min_messages = debug1"]);
    let t = w.token("alice", json!(["writer"]), 300);
    let idle = "gprxy_pool_idle{database=\"postgres\",account=\"app_writer\"}";
    let in_use = "gprxy_pool_in_use{database=\"postgres\",account=\"app_writer\"}";
    let writers = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_writer'";
    let wait_for = |n: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while w._pg.sql(writers) != n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(w._pg.sql(writers), n, "server connections of app_writer");
    };
    let mut running =
        connect_tls(w.proxy.addr(), "alice", "postgres", Auth::Password(&t), &w.certs.ca).unwrap();
    assert_eq!(w.psql("alice", &t, "require", "SELECT current_user").unwrap(), "app_writer");
    wait_for("2");
    assert_eq!((w.proxy.metric(idle), w.proxy.metric(in_use)), (1.0, 1.0));

    w.proxy.signal("HUP");
    w.proxy.wait_events("reload", 1);
    wait_for("1");
    assert_eq!(w.proxy.metric(idle), 0.0, "the old pool's idle connection was closed");
    assert_eq!(running.scalar("SELECT gprxy.subject()").unwrap().as_deref(), Some("alice"));
    running.close();
    wait_for("0");
    std::thread::sleep(Duration::from_millis(200));
    // The old pool retired the connection: it is not counted idle anywhere.
    assert_eq!((w.proxy.metric(idle), w.proxy.metric(in_use)), (0.0, 0.0));
    let log = w._pg.log();
    assert!(
        !log.contains("unexpected EOF on client connection"),
        "a server connection was dropped without Terminate:\n{log}"
    );
}

#[test]
fn required_claims_refuse_a_token_from_another_repository() {
    let w = start_with(
        "[fallback.required_claims]\nrepository = \"acme/app\"\nenvironment = [\"prod\", \"staging\"]\n",
    );
    let token = |repository: &str, environment: &str| {
        let mut c = w.idp.claims("alice", "db");
        c["roles"] = json!(["writer"]);
        c["repository"] = json!(repository);
        c["environment"] = json!(environment);
        w.key.token(json!({"typ": "at+jwt"}), &c)
    };
    let e = w.psql("alice", &token("evil/x", "prod"), "require", "SELECT 1").unwrap_err();
    assert!(
        e.contains(
            "FATAL:  gprxy: token refused (required_claim): required claim \"repository\" must equal \"acme/app\" (token: \"evil/x\")"
        ),
        "{e}"
    );
    let e = w.psql("alice", &token("acme/app", "dev"), "require", "SELECT 1").unwrap_err();
    assert!(
        e.contains("FATAL:  gprxy: token refused (required_claim): required claim \"environment\" must be one of \"prod\", \"staging\" (token: \"dev\")"),
        "{e}"
    );
    assert_eq!(
        w.psql(
            "alice",
            &token("acme/app", "staging"),
            "require",
            "SELECT current_user, gprxy.claim('repository')"
        )
        .unwrap(),
        "app_writer|acme/app"
    );
    let events = w.proxy.wait_events("login", 3);
    assert_eq!(events.iter().filter(|e| e["outcome"] == "failure" && e["sqlstate"] == "28000").count(), 2);
}

#[test]
fn a_privileged_service_account_is_never_logged_in() {
    let w = start();
    w._pg.sql("ALTER ROLE app_reader BYPASSRLS; ALTER ROLE app_admin SUPERUSER");
    let refused =
        "FATAL:  gprxy: the service account is refused (powers beyond its grants, or settings stored by ALTER ROLE)";
    let e = w.psql("bob", &w.token("bob", json!(["reader"]), 300), "require", "SELECT 1").unwrap_err();
    assert!(e.contains(refused), "{e}");
    let e = w.psql("carol", &w.token("carol", json!(["admin"]), 300), "require", "SELECT 1").unwrap_err();
    assert!(e.contains(refused), "{e}");
    let log = w.proxy.log();
    assert!(log.contains("\"account\":\"app_reader\"") && log.contains("\"powers\":\"BYPASSRLS\""), "{log}");
    assert!(log.contains("\"account\":\"app_admin\""), "{log}");
    // An ordinary account still works.
    let t = w.token("alice", json!(["writer"]), 300);
    assert_eq!(w.psql("alice", &t, "require", "SELECT current_user").unwrap(), "app_writer");
    // Alice plants a search_path for the account (any role may set its own defaults), for the
    // next user's new server connection: that connection is refused instead (a reload makes the
    // pools open new ones).
    w.psql("alice", &t, "require", "ALTER ROLE app_writer SET search_path = public, pg_catalog").unwrap();
    w.proxy.signal("HUP");
    w.proxy.wait_events("reload", 1);
    let e = w.psql("alice", &t, "require", "SELECT 1").unwrap_err();
    assert!(e.contains(refused), "{e}");
    assert!(w.proxy.log().contains("\"powers\":\"settings stored by ALTER ROLE\""), "{}", w.proxy.log());
    // Nor an account that can SET ROLE to a superuser through a chain of memberships.
    w._pg.sql(
        "ALTER ROLE app_writer RESET search_path; CREATE ROLE ops NOLOGIN; GRANT postgres TO ops; \
         GRANT ops TO app_writer",
    );
    w.proxy.signal("HUP");
    w.proxy.wait_events("reload", 2);
    let e = w.psql("alice", &t, "require", "SELECT 1").unwrap_err();
    assert!(e.contains(refused), "{e}");
    assert!(w.proxy.log().contains("\"powers\":\"member of postgres SUPERUSER"), "{}", w.proxy.log());
}

#[test]
fn a_planted_search_path_cannot_hijack_the_next_users_set_up() {
    let w = start();
    // As on PostgreSQL 13 and 14 by default: the service account may create in public.
    w._pg.sql("GRANT CREATE ON SCHEMA public TO app_writer");
    let alice = w.token("alice", json!(["writer"]), 300);
    // Alice, as the shared account, plants a set_config that records its arguments, and a
    // search_path that puts it before pg_catalog's, for every new server connection.
    w.psql(
        "alice",
        &alice,
        "require",
        "CREATE TABLE public.loot (k text, v text); \
         CREATE FUNCTION public.set_config(text, text, boolean) RETURNS text LANGUAGE sql AS \
           'INSERT INTO public.loot VALUES ($1, $2); SELECT pg_catalog.set_config($1, $2, $3)'; \
         ALTER ROLE app_writer SET search_path = public, pg_catalog",
    )
    .unwrap();
    // The pools open new server connections (a reload retires the old ones).
    w.proxy.signal("HUP");
    w.proxy.wait_events("reload", 1);
    let bob = w.token("bob", json!(["writer"]), 300);
    let e = w.psql("bob", &bob, "require", "SELECT current_user").unwrap_err();
    assert!(
        e.contains("gprxy: the service account is refused (powers beyond its grants, or settings stored by ALTER ROLE)"),
        "{e}"
    );
    assert_eq!(w._pg.sql("SELECT count(*) FROM public.loot WHERE v LIKE '%bob%'").trim(), "0");
}

/// A fallback configuration with these rules and no issuer of its own: the test appends
/// `[[fallback.issuers]]` tables.
fn without_one_issuer(
    pg: &Cluster,
    certs: &TestCerts,
    context_key: &ContextKeyFile,
    rules: &[(&str, &str, &std::path::Path)],
) -> String {
    let setup = FallbackSetup {
        upstream_port: pg.port(),
        cert: &certs.cert_path,
        key: &certs.key_path,
        issuer: "unused",
        audience: "unused",
        rules,
        context_key: Some(&context_key.path),
        extra: "",
    };
    setup.toml().replace("issuer = \"unused\"\naudience = [\"unused\"]\nrole_claim = \"roles\"\n", "")
}

/// Three issuers in one proxy, each with its own policy: A (RSA key "k", audience db-a), B (a
/// P-256 key also named "k", audience db-b, its role "boss" mapped to "admin"), and C, whose keys
/// come from a file only (no network). Each one's tokens log in; none is checked against
/// another's keys or audience; an unknown issuer costs no request.
#[test]
fn several_issuers_each_with_its_own_policy_and_keys() {
    let (pg, certs, context_key) = server(&[]);
    let (ka, kb, kc) = (TestKey::rsa("k"), TestKey::p256("k"), TestKey::ed25519("c"));
    let (a, b) = (TestIssuer::start(&[&ka]), TestIssuer::start(&[&kb]));
    let c_iss = "https://c.offline.example";
    let c_keys = certs.dir().join("c-keys.json");
    std::fs::write(&c_keys, gprxy_core::testkit::jwks(&[&kc]).to_string()).unwrap();
    let p = |n: &str| certs.dir().join(n);
    let (wpw, rpw, apw) = (p("writer.pw"), p("reader.pw"), p("admin.pw"));
    let issuers = format!(
        "[[fallback.issuers]]\nissuer = \"{}\"\naudience = [\"db-a\"]\nrole_claim = \"roles\"\n\
         [[fallback.issuers]]\nissuer = \"{}\"\naudience = [\"db-b\"]\nrole_claim = \"roles\"\nrole_map = {{ boss = \"admin\", ops = \"ops\" }}\n\
         [[fallback.issuers]]\nissuer = \"{c_iss}\"\naudience = [\"db-c\"]\nrole_claim = \"roles\"\njwks_file = \"{}\"\n",
        a.issuer(),
        b.issuer(),
        c_keys.display()
    );
    let rules: [(&str, &str, &std::path::Path); 3] =
        [("admin", "app_admin", &apw), ("writer", "app_writer", &wpw), ("reader", "app_reader", &rpw)];
    let toml = without_one_issuer(&pg, &certs, &context_key, &rules);
    // A rule for one issuer only: "ops" means something at B, nothing at A.
    let b_only =
        format!("[[fallback.map]]\nrole = \"ops\"\naccount = \"app_admin\"\nissuer = \"{}\"\n", b.issuer());
    // The three issuers reach the same accounts with plain identities: the test says they issue
    // one namespace (else the proxy refuses the configuration, #27).
    let toml = toml.replacen("[fallback]\n", "[fallback]\nshared_subject_namespace = true\n", 1);
    let proxy = Proxy::start(&format!("{toml}{issuers}{b_only}"));
    let world = World { idp: a, key: TestKey::rsa("unused"), _pg: pg, proxy, certs, context_key };
    let token = |iss: &str, aud: &str, key: &TestKey, roles: serde_json::Value| {
        let t = gprxy_core::unix_time();
        let claims =
            json!({"iss": iss, "sub": "alice", "aud": aud, "iat": t, "exp": t + 300, "roles": roles});
        key.token(json!({"typ": "at+jwt"}), &claims)
    };
    let (a_iss, b_iss) = (world.idp.issuer(), b.issuer());
    let who = "SELECT current_user";
    assert_eq!(
        world.psql("alice", &token(&a_iss, "db-a", &ka, json!(["writer"])), "require", who).unwrap(),
        "app_writer"
    );
    assert_eq!(
        world.psql("alice", &token(&b_iss, "db-b", &kb, json!(["boss"])), "require", who).unwrap(),
        "app_admin"
    );
    assert_eq!(
        world.psql("alice", &token(c_iss, "db-c", &kc, json!(["reader"])), "require", who).unwrap(),
        "app_reader"
    );
    // The session's roles are B's after its role map.
    let roles = "SELECT array_to_string(gprxy.roles(), ',')";
    assert_eq!(
        world.psql("alice", &token(&b_iss, "db-b", &kb, json!(["boss"])), "require", roles).unwrap(),
        "admin"
    );
    // A rule that names B does not apply to A's tokens.
    assert_eq!(
        world.psql("alice", &token(&b_iss, "db-b", &kb, json!(["ops"])), "require", who).unwrap(),
        "app_admin"
    );
    let e = world.psql("alice", &token(&a_iss, "db-a", &ka, json!(["ops"])), "require", who).unwrap_err();
    assert!(e.contains("FATAL:  gprxy: no role in the token maps to a service account"), "{e}");
    // B's role map is B's alone: "boss" from A maps to nothing.
    let e = world.psql("alice", &token(&a_iss, "db-a", &ka, json!(["boss"])), "require", who).unwrap_err();
    assert!(e.contains("FATAL:  gprxy: no role in the token maps to a service account"), "{e}");
    // A's valid signature with B's audience: A's policy wants db-a.
    let e = world.psql("alice", &token(&a_iss, "db-b", &ka, json!(["writer"])), "require", who).unwrap_err();
    assert!(e.contains("FATAL:  gprxy: token refused (aud_mismatch)"), "{e}");
    // Both publish kid "k": a token that says it is B's but is signed with A's "k" meets B's key.
    let e = world.psql("alice", &token(&b_iss, "db-b", &ka, json!(["writer"])), "require", who).unwrap_err();
    assert!(e.contains("FATAL:  gprxy: token refused (key_mismatch)"), "{e}");
    let forged_c = token(c_iss, "db-c", &TestKey::ed25519("c"), json!(["reader"]));
    let e = world.psql("alice", &forged_c, "require", who).unwrap_err();
    assert!(e.contains("FATAL:  gprxy: token refused (bad_signature)"), "{e}");
    // An unknown issuer is refused before any key is looked for.
    let requests = (world.idp.request_count(), b.request_count());
    let stranger = TestIssuer::start(&[&ka]);
    let e = world
        .psql("alice", &token(&stranger.issuer(), "db-a", &ka, json!(["writer"])), "require", who)
        .unwrap_err();
    assert!(
        e.contains(&format!(
            "FATAL:  gprxy: token refused (iss_not_trusted): issuer \"{}\" is not trusted",
            stranger.issuer()
        )),
        "{e}"
    );
    assert_eq!(
        (world.idp.request_count(), b.request_count(), stranger.request_count()),
        (requests.0, requests.1, 0)
    );
    // C's keys come from the file: a new key there, after a reload, logs in; the old one not.
    let kc2 = TestKey::ed25519("c2");
    std::fs::write(&c_keys, gprxy_core::testkit::jwks(&[&kc2]).to_string()).unwrap();
    world.proxy.signal("HUP");
    world.proxy.wait_events("reload", 1);
    assert_eq!(
        world.psql("alice", &token(c_iss, "db-c", &kc2, json!(["reader"])), "require", who).unwrap(),
        "app_reader"
    );
    let e = world.psql("alice", &token(c_iss, "db-c", &kc, json!(["reader"])), "require", who).unwrap_err();
    assert!(e.contains("FATAL:  gprxy: token refused (kid_unknown)"), "{e}");
}

/// A service account's password rotates the way a secrets agent delivers it: the server's
/// password and the file change, SIGHUP; new sessions log in with the new password, a running
/// session keeps its connection.
#[test]
fn a_rotated_service_account_password_is_picked_up_at_sighup() {
    let w = start();
    let t = w.token("alice", json!(["writer"]), 300);
    let mut running =
        connect_tls(w.proxy.addr(), "alice", "postgres", Auth::Password(&t), &w.certs.ca).unwrap();
    assert_eq!(running.scalar("SELECT current_user").unwrap().as_deref(), Some("app_writer"));
    w._pg.sql("SET password_encryption = 'scram-sha-256'; ALTER ROLE app_writer PASSWORD 'writer-secret-2'");
    std::fs::write(w.certs.dir().join("writer.pw"), "writer-secret-2\n").unwrap();
    w.proxy.signal("HUP");
    w.proxy.wait_events("reload", 1);
    // A new pool: its first connection logs in with the new password (the old one is refused
    // by the server now).
    assert_eq!(w.psql("alice", &t, "require", "SELECT current_user").unwrap(), "app_writer");
    assert_eq!(running.scalar("SELECT gprxy.subject()").unwrap().as_deref(), Some("alice"));
    assert!(!w.proxy.log().contains("writer-secret-2"), "a password reached the log");
}

/// #27 item 1: two issuers whose tokens both say `sub = alice` reach one service account. With
/// plain identities the proxy refuses the configuration; with `issuer_qualified` on both, each
/// `alice` is her issuer's: `gprxy.identity()` (carried in the signed context) tells them apart
/// and a policy on it keeps B's alice out of A's alice's rows; `gprxy.roles()` and `app.roles`
/// are the mapped roles.
#[test]
fn two_issuers_alice_are_two_people_to_the_policies() {
    let (pg, certs, context_key) = server(&[]);
    let (ka, kb) = (TestKey::rsa("ka"), TestKey::rsa("kb"));
    let (a, b) = (TestIssuer::start(&[&ka]), TestIssuer::start(&[&kb]));
    let wpw = certs.dir().join("writer.pw");
    let toml = without_one_issuer(&pg, &certs, &context_key, &[("writer", "app_writer", &wpw)]);
    let issuers = |qualified: bool| {
        format!(
            "[[fallback.issuers]]\nissuer = \"{}\"\naudience = [\"db\"]\nrole_claim = \"roles\"\nissuer_qualified = {qualified}\n\
             role_map = {{ \"DB.Writer\" = \"writer\" }}\n\
             [[fallback.issuers]]\nissuer = \"{}\"\naudience = [\"db\"]\nrole_claim = \"roles\"\nissuer_qualified = {qualified}\n\
             role_map = {{ \"DB.Writer\" = \"writer\" }}\n",
            a.issuer(),
            b.issuer()
        )
    };
    // Plain identities: refused at load, naming the issuers by position and no value.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gprxy.toml");
    std::fs::write(&file, format!("listen = \"127.0.0.1:0\"\n{toml}{}", issuers(false))).unwrap();
    let out = std::process::Command::new(gprxy_tests::proxy::gprxy_bin())
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("fallback: issuers 1 and 2 can reach one service account with plain identities"),
        "{err}"
    );

    pg.sql(
        "CREATE TABLE notes (owner text DEFAULT gprxy.identity(), body text); ALTER TABLE notes ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY own ON notes TO app_writer USING (owner = gprxy.identity()) WITH CHECK (owner = gprxy.identity()); \
         GRANT ALL ON notes TO app_writer",
    );
    let proxy = Proxy::start(&format!("{toml}{}", issuers(true)));
    let token = |iss: &str, key: &TestKey| {
        let t = gprxy_core::unix_time();
        let claims = json!({"iss": iss, "sub": "alice", "aud": "db", "iat": t, "exp": t + 300,
                            "roles": ["DB.Writer", "intern"]});
        key.token(json!({"typ": "at+jwt"}), &claims)
    };
    let (a_alice, b_alice) = (format!("{}#alice", a.issuer()), format!("{}#alice", b.issuer()));
    let mut ca =
        connect_tls(proxy.addr(), &a_alice, "postgres", Auth::Password(&token(&a.issuer(), &ka)), &certs.ca)
            .unwrap();
    let row = ca
        .query("SELECT gprxy.identity(), gprxy.subject(), array_to_string(gprxy.roles(), ','), current_setting('app.roles')")
        .unwrap()
        .remove(0);
    assert_eq!(
        row,
        vec![Some(a_alice.clone()), Some("alice".into()), Some("writer".into()), Some("writer".into())]
    );
    ca.query("INSERT INTO notes (body) VALUES ('a secret of A''s alice')").unwrap();
    ca.close();
    let mut cb =
        connect_tls(proxy.addr(), &b_alice, "postgres", Auth::Password(&token(&b.issuer(), &kb)), &certs.ca)
            .unwrap();
    assert_eq!(cb.scalar("SELECT gprxy.identity()").unwrap(), Some(b_alice.clone()));
    assert_eq!(
        cb.scalar("SELECT count(*) FROM notes").unwrap().as_deref(),
        Some("0"),
        "B's alice reads A's rows"
    );
    cb.query("UPDATE notes SET body = 'mine now'").unwrap();
    assert_eq!(pg.sql("SELECT count(*) FROM notes WHERE body = 'mine now'"), "0");
    let _ = context_key;
}
