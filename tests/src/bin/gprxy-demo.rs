//! `make demo`: the whole of gprxy on this machine, no account anywhere.
//!
//! Starts a development issuer on loopback (NOT for production: it approves every device login),
//! PostgreSQL 18 with gprxy_validator preloaded and PostgreSQL 15 with gprxy_validator's SQL
//! side, both with sql/'s demo schema; gprxy in front of each (pass-through for 18, fallback for
//! 15) with a self-signed certificate made now. Then a tour: device-flow login through the proxy,
//! row-level security for two tenants, a refused expired token with the server's reason, the
//! token helper and psql 15 through the fallback proxy, the metrics. It leaves everything running
//! with commands to try and cleans up on Ctrl-C, SIGTERM or SIGHUP, or when its parent (make)
//! dies: whatever it started is stopped and its folders deleted, mid-tour too.
//! `--check` runs the same tour, asserts every step's result and exits (used by `make test`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use gprxy_core::testkit::{now, test_ca, TestKey};
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::proxy::{context_conf, gprxy_bin, ContextKeyFile, FallbackSetup, Proxy};
use gprxy_tests::{
    apply_sql_file, oauth_psql_with, require_validator, validator_cluster, Cluster, PgVersion,
};
use serde_json::json;

const AUD: &str = "gprxy-demo";
const ACME: &str = "11111111-1111-1111-1111-111111111111";
const GLOBEX: &str = "22222222-2222-2222-2222-222222222222";

struct Tour {
    check: bool,
    failures: Vec<String>,
    step: usize,
}

/// Set by SIGINT, SIGTERM, SIGHUP, or the parent's death.
static STOP: AtomicBool = AtomicBool::new(false);

/// Unwinds out of the tour (dropping, so stopping and deleting, what it started).
struct Stopped;

impl Tour {
    fn step(&mut self, what: &str) {
        if STOP.load(Ordering::SeqCst) {
            std::panic::resume_unwind(Box::new(Stopped));
        }
        self.step += 1;
        println!("\n[{}] {what}", self.step);
    }

    /// Prints a result and, with --check, records it when it differs from what the tour expects.
    fn expect(&mut self, label: &str, got: &str, want: &str) {
        println!("    {label}\n    -> {}", got.replace('\n', "\n    -> "));
        if self.check && got != want {
            self.failures.push(format!("step {}: {label}: got {got:?}, want {want:?}", self.step));
        }
    }

    fn expect_that(&mut self, label: &str, ok: bool) {
        if self.check && !ok {
            self.failures.push(format!("step {}: {label}", self.step));
        }
    }
}

/// A demo user's access token.
fn token(key: &TestKey, issuer: &str, sub: &str, tenant: &str, role: &str, lifetime: i64) -> String {
    let t = now();
    key.token(
        json!({"typ": "at+jwt"}),
        &json!({"iss": issuer, "sub": sub, "aud": AUD, "iat": t, "nbf": t - 5, "exp": t + lifetime,
                "scope": "openid db:read", "email": format!("{sub}@{}.example",
                    if tenant == ACME { "acme" } else { "globex" }),
                "roles": [role], "tenant_id": tenant}),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    p
}

/// Runs a command and returns (success, stdout, stderr), trimmed.
fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim_end().to_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let (stop_tx, stop_rx) = mpsc::channel();
    let on_signal = stop_tx.clone();
    // SIGINT, SIGTERM and SIGHUP (ctrlc's "termination" feature).
    ctrlc::set_handler(move || {
        STOP.store(true, Ordering::SeqCst);
        let _ = on_signal.send(());
    })
    .expect("install the signal handler");
    // A parent that dies (make stopped by SIGTERM or SIGKILL) leaves the demo orphaned: it notices
    // that it was handed to another parent and stops too.
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        if std::os::unix::process::parent_id() != parent {
            STOP.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(());
            return;
        }
    });
    // Everything the demo starts is dropped (stopped, deleted) when `demo` returns or unwinds.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| demo(check, &stop_rx)));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(failures)) => {
            eprintln!("\ndemo check FAILED:\n  {}", failures.join("\n  "));
            std::process::exit(1);
        }
        Err(payload) if payload.is::<Stopped>() => {
            println!("Stopped early: everything it started is stopped and deleted.")
        }
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

fn demo(check: bool, stop_rx: &mpsc::Receiver<()>) -> Result<(), Vec<String>> {
    require_validator(PgVersion::V18);
    require_validator(PgVersion::V15);
    let mut tour = Tour { check, failures: Vec::new(), step: 0 };
    let files = tempfile::Builder::new().prefix("gprxy-demo-").tempdir().expect("temp dir");
    let dir = files.path();

    tour.step(
        "A development issuer on loopback (approves every device login: a test tool, never production)",
    );
    let key = TestKey::rsa("demo-key-1");
    let idp = TestIssuer::start(&[&key]);
    let iss = idp.issuer();
    let alice = token(&key, &iss, "alice", ACME, "writer", 3600);
    let bob = token(&key, &iss, "bob", GLOBEX, "reader", 3600);
    let expired = token(&key, &iss, "alice", ACME, "writer", -600);
    idp.hand_out("demo-alice", &alice);
    idp.hand_out("demo-bob", &bob);
    idp.hand_out("demo-expired", &expired);
    idp.hand_out_with_refresh("demo-cli", &alice, "demo-refresh", 3600);
    idp.on_refresh("demo-refresh", &alice, None, 3600);
    println!("    issuer {iss}: discovery, JWKS, device flow; RS256 tokens for alice (Acme, writer) and bob (Globex, reader)");

    tour.step("PostgreSQL 18 with gprxy_validator preloaded, and PostgreSQL 15 with its SQL side; sql/ demo schema in both");
    // The dev issuer is plain HTTP on loopback: validator_cluster allows that (tests only).
    let pg18 = validator_cluster(AUD)
        .conf("gprxy.role_claim = 'roles'")
        .conf("gprxy.role_map = 'admin:app_admin, writer:app_writer, reader:app_reader'")
        .hba(format!(
            "host all all 127.0.0.1/32 oauth issuer=\"{iss}\" scope=\"openid db:read\" delegate_ident_mapping=1"
        ))
        .start();
    pg18.sql("CREATE EXTENSION gprxy_validator");
    // Fallback mode's signed context: the proxy's key file, its public half pinned in
    // PostgreSQL 15's postgresql.conf with the service accounts that may set a context.
    let context_key = ContextKeyFile::create(dir.join("context.key"));
    let mut pg15 = Cluster::builder(PgVersion::V15)
        .hba("host all app_admin,app_writer,app_reader 127.0.0.1/32 scram-sha-256");
    for line in context_conf(&[&context_key.public]) {
        pg15 = pg15.conf(line);
    }
    let pg15 = pg15.start();
    pg15.sql("CREATE EXTENSION gprxy_validator");
    for pg in [&pg18, &pg15] {
        for f in ["01_roles.sql", "02_schema.sql", "03_rls_gprxy_claims.sql", "04_demo_data.sql"] {
            apply_sql_file(pg, "postgres", f);
        }
    }
    apply_sql_file(&pg15, "postgres", "05_signed_context.sql");
    let writer_pw = format!("demo-{}", gprxy_core::fingerprint(alice.as_bytes()));
    let reader_pw = format!("demo-{}", gprxy_core::fingerprint(bob.as_bytes()));
    pg15.sql(&format!(
        "SET password_encryption = 'scram-sha-256'; ALTER ROLE app_writer PASSWORD '{writer_pw}'; ALTER ROLE app_reader PASSWORD '{reader_pw}'"
    ));
    let libs = pg18.sql("SHOW oauth_validator_libraries");
    tour.expect("PostgreSQL 18: SHOW oauth_validator_libraries", &libs, "gprxy_validator");
    let ext15 = pg15.sql("SELECT extversion FROM pg_extension WHERE extname = 'gprxy_validator'");
    tour.expect("PostgreSQL 15: gprxy_validator version", &ext15, "0.1.0");

    tour.step("gprxy in front of each, TLS with a certificate made now (CA and localhost certificate)");
    let (ca, cert, tls_key) = test_ca();
    let ca_path = write(dir, "ca.pem", &ca);
    let cert_path = write(dir, "server.pem", &cert);
    let key_path = write(dir, "server.key", &tls_key);
    let tls = format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\n", cert_path.display(), key_path.display());
    let passthrough = Proxy::start(&format!("upstream = \"127.0.0.1:{}\"\n{tls}", pg18.port()));
    let writer_file = write(dir, "app_writer.pw", &writer_pw);
    let reader_file = write(dir, "app_reader.pw", &reader_pw);
    let fallback = Proxy::start(
        &FallbackSetup {
            upstream_port: pg15.port(),
            cert: &cert_path,
            key: &key_path,
            issuer: &iss,
            audience: AUD,
            rules: &[("writer", "app_writer", &writer_file), ("reader", "app_reader", &reader_file)],
            context_key: Some(&context_key.path),
            extra: "",
        }
        .toml(),
    );
    println!("    pass-through -> PostgreSQL 18: 127.0.0.1:{}", passthrough.port);
    println!("    fallback     -> PostgreSQL 15: 127.0.0.1:{} (signed context)", fallback.port);

    let via18 = |user: &str| {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={} user={user} dbname=postgres sslmode=verify-full sslrootcert={}",
            passthrough.port,
            ca_path.display()
        )
    };
    tour.step("psql 18 logs in through the proxy with the OAuth device flow (sslmode=verify-full)");
    let sql = "SELECT current_user, system_user, gprxy.claims()->>'email', gprxy.claims()->>'tenant_id'";
    let out = oauth_psql_with(&via18("app_writer"), &iss, "demo-alice", sql).unwrap_or_else(|e| e);
    tour.expect(sql, &out, &format!("app_writer|oauth:alice|alice@acme.example|{ACME}"));

    tour.step("Row-level security on gprxy.claim(): two users of two tenants run the same query");
    let titles = "SELECT string_agg(title, ', ' ORDER BY title) FROM posts";
    let out = oauth_psql_with(&via18("app_writer"), &iss, "demo-alice", titles).unwrap_or_else(|e| e);
    tour.expect(&format!("alice (Acme): {titles}"), &out, "acme public, alice private");
    let out = oauth_psql_with(&via18("app_reader"), &iss, "demo-bob", titles).unwrap_or_else(|e| e);
    tour.expect(&format!("bob (Globex): {titles}"), &out, "bob private, globex public");

    tour.step("An expired token is refused; the server log says why");
    let err =
        oauth_psql_with(&via18("app_writer"), &iss, "demo-expired", "SELECT 1").err().unwrap_or_default();
    let psql_said = err.lines().find(|l| l.contains("FATAL")).unwrap_or(&err).trim().to_owned();
    let want = format!("connection to server at \"127.0.0.1\", port {} failed: FATAL:  OAuth bearer authentication failed for user \"app_writer\"", passthrough.port);
    tour.expect("psql", &psql_said, &want);
    let refused = pg18.log().lines().find(|l| l.contains("gprxy: oauth login refused")).map(str::to_owned);
    let reason = refused
        .as_deref()
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("reason=")))
        .unwrap_or("-");
    tour.expect(
        "server log (gprxy_validator's audit line)",
        refused.as_deref().unwrap_or("(none)"),
        refused.as_deref().unwrap_or("(none)"),
    );
    tour.expect_that("the audit line names reason=expired", reason == "reason=expired");

    tour.step("The token helper and psql 15 through the fallback proxy (PostgreSQL 15, token as password)");
    let config_dir = dir.join("gprxy-config");
    let helper =
        |args: &[&str]| run(Command::new(gprxy_bin()).args(args).env("GPRXY_CONFIG_DIR", &config_dir));
    let (ok, _, said) =
        helper(&["login", "--issuer", &iss, "--client-id", "demo-cli", "--insecure-allow-http-loopback"]);
    println!(
        "    gprxy login --issuer {iss} --client-id demo-cli\n    -> {}",
        said.replace('\n', "\n    -> ")
    );
    tour.expect_that("gprxy login succeeds", ok);
    let (ok, from_helper, _) = helper(&["token"]);
    tour.expect_that("gprxy token prints alice's token", ok && from_helper == alice);
    let psql15 = PgVersion::V15.bin("psql");
    let via15 = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=alice dbname=postgres sslmode=verify-full sslrootcert={}",
        fallback.port,
        ca_path.display()
    );
    let sql15 = format!("SELECT current_user, gprxy.subject(), current_setting('app.tenant_id'); {titles}");
    let (_, out, err) = run(Command::new(&psql15)
        .args(["-X", "-A", "-t", "-c", &sql15, &via15])
        .env("PGPASSWORD", &from_helper));
    let out = if out.is_empty() { err } else { out };
    tour.expect(
        &format!("PGPASSWORD=$(gprxy token) psql15 ... -c \"{sql15}\""),
        &out,
        &format!("app_writer|alice|{ACME}\nacme public, alice private"),
    );
    let (_, out, _) = run(Command::new(&psql15)
        .args(["-X", "-A", "-t", "-c", "SET app.tenant_id = '22222222-2222-2222-2222-222222222222'; SELECT string_agg(title, ', ' ORDER BY title) FROM posts", &via15])
        .env("PGPASSWORD", &alice));
    tour.expect(
        "after SET app.tenant_id = '<Globex>' (the signed context ignores it)",
        &out,
        "SET\nacme public, alice private",
    );

    tour.step("Metrics");
    for (name, p) in [("pass-through", &passthrough), ("fallback", &fallback)] {
        let m = p.admin_get("/metrics");
        let lines: Vec<&str> = m.lines().filter(|l| l.starts_with("gprxy_logins_total")).collect();
        println!("    {name}: http://127.0.0.1:{}/metrics (and /healthz)", p.admin_port);
        for l in &lines {
            println!("      {l}");
        }
        tour.expect_that(
            &format!("{name} counts successful logins"),
            lines.iter().any(|l| l.contains("outcome=\"success\"")),
        );
    }
    tour.expect_that(
        "pass-through counts the refused login",
        passthrough
            .admin_get("/metrics")
            .lines()
            .any(|l| l.starts_with("gprxy_logins_total") && l.contains("outcome=\"failure\"")),
    );

    if check {
        if tour.failures.is_empty() {
            println!("\ndemo check: all {} steps passed", tour.step);
            return Ok(());
        }
        return Err(tour.failures);
    }
    let psql18 = PgVersion::V18.bin("psql");
    let alice_jwt = write(dir, "alice.jwt", &alice);
    println!("\nEverything is running. Try:");
    println!(
        "  device flow via gprxy:   PGOAUTHDEBUG=UNSAFE {} \"{} oauth_issuer={iss} oauth_client_id=demo-alice\" -c 'SELECT gprxy.claims()'",
        psql18.display(),
        via18("app_writer")
    );
    println!("                           (client id demo-bob logs in bob as app_reader)");
    println!(
        "  token helper:            export GPRXY_CONFIG_DIR={}; {} token",
        config_dir.display(),
        gprxy_bin().display()
    );
    println!(
        "  psql 15, fallback:       PGPASSWORD=$(cat {}) {} \"{via15}\"",
        alice_jwt.display(),
        psql15.display()
    );
    println!(
        "  superuser (18):          {} -h {} -p {} -U postgres",
        psql18.display(),
        pg18.root().display(),
        pg18.port()
    );
    println!("  logs:                    {} and {}", pg18.log_path().display(), pg15.log_path().display());
    println!("\nPress Ctrl-C to stop everything and delete {}.", dir.display());
    let _ = stop_rx.recv();
    println!("Stopping the proxies, PostgreSQL and the issuer; deleting the demo folders.");
    Ok(())
}
