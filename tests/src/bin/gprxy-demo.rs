//! `make demo`: the whole of gprxy on this machine, no account anywhere.
//!
//! Starts a development issuer on loopback (NOT for production: it approves every device login),
//! PostgreSQL 18 with gprxy_validator preloaded and PostgreSQL 15 with gprxy_validator's SQL
//! side, both with sql/'s demo schema; gprxy in front of each (pass-through for 18, fallback for
//! 15) with a self-signed certificate made now. Then a tour: device-flow login through the proxy,
//! row-level security for two tenants, a refused expired token with the server's reason, a
//! session ended when its token expires, an opaque token checked by introspection and then
//! revoked, two issuers in one issuers file, the token helper and psql 15 through the fallback
//! proxy, a person's own role made at first login and kept in step with their IdP group (a third
//! PostgreSQL 18, `gprxy.provision = 'sync'`), psql 15 to PostgreSQL 18 through `gprxy connect`
//! with no password, the metrics. Each step prints the command a user would copy. It leaves everything running
//! with commands to try and cleans up on Ctrl-C, SIGTERM or SIGHUP, or when its parent (make)
//! dies: whatever it started is stopped and its folders deleted, mid-tour too.
//! `--check` runs the same tour, asserts every step's result and exits (used by `make test`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use gprxy_core::fingerprint;
use gprxy_core::session::UtcTime;
use gprxy_core::testkit::{now, test_ca, TestKey};
use gprxy_tests::connector::Connector;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::proxy::{context_conf, gprxy_bin, ContextKeyFile, FallbackSetup, Proxy};
use gprxy_tests::{apply_sql_file, oauth_psql_with, require_validator, Cluster, PgVersion};
use serde_json::json;

const AUD: &str = "gprxy-demo";
const ACME: &str = "11111111-1111-1111-1111-111111111111";
const GLOBEX: &str = "22222222-2222-2222-2222-222222222222";
/// The lifetime of the tokens client id `demo-short` gets (the session-end step).
const SHORT_SECS: i64 = 6;
/// How long the opaque-token issuer's active answers are kept (the revocation step waits it out).
const ANSWER_TTL_SECS: u64 = 3;

struct Tour {
    check: bool,
    failures: Vec<String>,
    step: usize,
}

/// Set by SIGINT, SIGTERM, SIGHUP, or the parent's death.
static STOP: AtomicBool = AtomicBool::new(false);

/// Unwinds out of the tour (dropping, so stopping and deleting, what it started).
struct Stopped;

/// Unwinds when a signal or the parent's death asked the demo to stop.
fn stop_if_asked() {
    if STOP.load(Ordering::SeqCst) {
        std::panic::resume_unwind(Box::new(Stopped));
    }
}

/// Waits `d`, stopping within a tenth of a second when asked to (the tour's waits for a token to
/// expire or a kept answer to go stale take seconds).
fn pause(d: Duration) {
    let until = Instant::now() + d;
    loop {
        stop_if_asked();
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

impl Tour {
    fn step(&mut self, what: &str) {
        stop_if_asked();
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

    /// Prints the command a user would copy to do what the step does.
    fn command(&self, cmd: &str) {
        println!("    $ {cmd}");
    }
}

/// The command line of psql 18 logging in with the device flow of `issuer`'s `client_id`.
fn psql18_command(conninfo: &str, issuer: &str, client_id: &str, sql: &str) -> String {
    format!(
        "PGOAUTHDEBUG=UNSAFE {} \"{conninfo} oauth_issuer={issuer} oauth_client_id={client_id}\" -X -A -t -c \"{sql}\"",
        PgVersion::V18.bin("psql").display()
    )
}

/// psql's error output without libpq's PGOAUTHDEBUG=UNSAFE trace, which holds the tokens in full.
fn without_trace(err: &str) -> String {
    let trace =
        |l: &str| l.starts_with("[libcurl]") || l.starts_with("[libpq]") || l.contains("access_token");
    err.lines().filter(|l| !trace(l)).collect::<Vec<_>>().join("\n")
}

/// [`oauth_psql_with`]: psql 18's device flow; an error is psql's output without the trace.
fn psql18(conninfo: &str, issuer: &str, client_id: &str, sql: &str) -> Result<String, String> {
    oauth_psql_with(conninfo, issuer, client_id, sql).map_err(|e| without_trace(&e))
}

/// psql's FATAL line in its error output (the whole output when there is none).
fn fatal_line(err: &str) -> String {
    let err = without_trace(err);
    err.lines().find(|l| l.contains("FATAL")).unwrap_or(&err).trim().to_owned()
}

/// Waits up to five seconds for the server log's gprxy audit line that contains all of `parts`.
fn audit_line(pg: &Cluster, parts: &[&str]) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = pg
            .log()
            .lines()
            .filter(|l| l.contains("gprxy: "))
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_owned);
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        pause(Duration::from_millis(50));
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

/// The session-end step: psql 18 logs in straight to PostgreSQL 18 with a short-lived token,
/// idles past its expiry, then sends its next statement; the server's side is judged by
/// pg_stat_activity and the audit line.
fn session_end(tour: &mut Tour, pg: &Cluster, conninfo: &str) {
    let psql18 = PgVersion::V18.bin("psql");
    let first = "SELECT pg_backend_pid(), gprxy.claims()->>'exp';";
    let next = "SELECT 1;";
    tour.command(&format!(
        "(echo \"{first}\"; sleep {}; echo '{next}') | PGOAUTHDEBUG=UNSAFE {} -X -A -t -v VERBOSITY=verbose \"{conninfo}\"",
        SHORT_SECS + 2,
        psql18.display()
    ));
    let mut child = Command::new(&psql18)
        .args(["-X", "-A", "-t", "-v", "VERBOSITY=verbose"])
        .arg(conninfo)
        .env("PGOAUTHDEBUG", "UNSAFE")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", psql18.display()));
    let mut stdin = child.stdin.take().expect("psql's stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("psql's stdout"));
    let _ = writeln!(stdin, "{first}");
    let mut answer = String::new();
    let _ = stdout.read_line(&mut answer);
    let parsed = answer
        .trim()
        .split_once('|')
        .and_then(|(p, e)| Some((p.parse::<u32>().ok()?, e.parse::<i64>().ok()?)));
    let Some((pid, exp)) = parsed else {
        drop(stdin);
        let out = child.wait_with_output().map(|o| without_trace(&String::from_utf8_lossy(&o.stderr)));
        tour.expect("psql logs in", &out.unwrap_or_default(), "(a backend pid and the token's exp)");
        tour.expect_that("psql logs in with the short-lived token", false);
        return;
    };
    println!(
        "    -> backend pid {pid}; the token expires at {} (exp {exp}); the session idles...",
        UtcTime(exp as u64)
    );
    // Past the expiry, before the client says anything: the server ended the session itself.
    let unix_now = || {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
    };
    pause(Duration::from_secs_f64((exp as f64 + 1.0 - unix_now()).max(0.0)));
    let alive = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut count = pg.sql(&alive);
    while count != "0" && Instant::now() < deadline {
        pause(Duration::from_millis(100));
        count = pg.sql(&alive);
    }
    tour.expect(&format!("a second after the expiry, before the next statement: {alive}"), &count, "0");
    let _ = writeln!(stdin, "{next}");
    drop(stdin);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    let out = child.wait_with_output().expect("psql");
    let err = String::from_utf8_lossy(&out.stderr);
    let said = fatal_line(&err);
    let said = said.find("FATAL").map_or(said.as_str(), |i| &said[i..]);
    tour.expect(
        &format!("psql, the next statement ({next})"),
        said,
        &format!("FATAL:  28000: gprxy: the access token expired at {}; log in again", UtcTime(exp as u64)),
    );
    tour.expect_that("psql exits with status 2 (connection lost)", out.status.code() == Some(2));
    let line = audit_line(pg, &["event=session_expired", &format!("[{pid}]")]);
    let line = line.as_deref().unwrap_or("(none)");
    tour.expect("server log (gprxy_validator's audit line)", line, line);
    tour.expect_that(
        "the audit line names policy idle, the role and alice",
        line.contains(
            "gprxy: event=session_expired policy=idle role=\"app_writer\" authn_id=\"alice\" sub=\"alice\"",
        ),
    );
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
        "Development issuers on loopback (they approve every device login: a test tool, never production)",
    );
    let key = Arc::new(TestKey::rsa("demo-key-1"));
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
    // A token made at each login, living SHORT_SECS: fresh whenever the user tries it.
    let (mint_key, mint_iss) = (key.clone(), iss.clone());
    idp.hand_out_minted("demo-short", SHORT_SECS, move || {
        token(&mint_key, &mint_iss, "alice", ACME, "writer", SHORT_SECS)
    });
    println!("    Acme SSO {iss}: discovery, JWKS, device flow; RS256 tokens for alice (Acme, writer) and bob (Globex, reader)");
    // An issuer of opaque tokens, checked by introspection (RFC 7662) with gprxy's client secret.
    let opaque_idp = TestIssuer::start(&[]);
    let opaque_iss = opaque_idp.issuer();
    let introspection_secret = format!("demo-secret-{}", fingerprint(bob.as_bytes()));
    opaque_idp.introspection_client("gprxy", &introspection_secret);
    let carol = format!("demo-opaque-{}", fingerprint(format!("{alice}{bob}").as_bytes()));
    let t = now();
    opaque_idp.opaque_token(
        &carol,
        json!({"iss": opaque_iss, "sub": "carol", "aud": AUD, "iat": t, "exp": t + 3600,
               "scope": "openid db:read", "email": "carol@acme.example", "roles": ["auditor"]}),
    );
    opaque_idp.hand_out("demo-carol", &carol);
    println!(
        "    Reference-token SSO {opaque_iss}: opaque tokens (carol, auditor) and an introspection endpoint"
    );
    // A second JWT issuer with an alice of its own: another person than Acme's alice.
    let partner_key = TestKey::rsa("partner-key-1");
    let partner = TestIssuer::start(&[&partner_key]);
    let partner_iss = partner.issuer();
    let partner_alice = partner_key.token(
        json!({"typ": "at+jwt"}),
        &json!({"iss": partner_iss, "sub": "alice", "aud": AUD, "iat": t, "nbf": t - 5, "exp": t + 3600,
                "scope": "openid db:read", "email": "alice@partner.example", "roles": ["partner"]}),
    );
    partner.hand_out("demo-partner-alice", &partner_alice);
    // A client that brings Partner's token to Acme's line (Acme's dev issuer hands it out).
    idp.hand_out("demo-stray", &partner_alice);
    println!("    Partner SSO {partner_iss}: RS256 tokens for Partner's own alice (partner)");

    tour.step("PostgreSQL 18 with gprxy_validator preloaded, and PostgreSQL 15 with its SQL side; sql/ demo schema in both");
    // One pg_hba line per issuer, each on roles of its own (step 9 says why); the dev issuers
    // are plain HTTP on loopback, which gprxy.insecure_allow_http_loopback allows (tests only).
    let line = |roles: &str, issuer: &str| {
        format!(
            "host all {roles} 127.0.0.1/32 oauth issuer=\"{issuer}\" scope=\"openid db:read\" delegate_ident_mapping=1"
        )
    };
    let pg18 = Cluster::builder(PgVersion::V18)
        .conf("shared_preload_libraries = 'gprxy_validator'")
        .conf("oauth_validator_libraries = 'gprxy_validator'")
        .conf("gprxy.insecure_allow_http_loopback = on")
        .conf("gprxy.session_policy = 'idle'")
        .hba(line("app_admin,app_writer,app_reader", &iss))
        .hba(line("app_auditor", &opaque_iss))
        .hba(line("app_partner", &partner_iss))
        .start();
    // The issuers file and the introspection secret, readable by the server's OS user.
    let secret_path = write(pg18.data_dir(), "introspection.secret", &format!("{introspection_secret}\n"));
    let issuers = format!(
        "[[issuer]]\nissuer = \"{iss}\"\naudience = [\"{AUD}\"]\nrole_claim = \"roles\"\n\
         role_map = {{ admin = \"app_admin\", writer = \"app_writer\", reader = \"app_reader\" }}\n\n\
         [[issuer]]\nissuer = \"{opaque_iss}\"\naudience = [\"{AUD}\"]\ntokens = \"introspect\"\n\
         role_claim = \"roles\"\nrole_map = {{ auditor = \"app_auditor\" }}\n\
         [issuer.introspection]\nclient_id = \"gprxy\"\nclient_secret_file = \"{}\"\n\
         cache_ttl_max_secs = {ANSWER_TTL_SECS}\ninactive_ttl_secs = 1\n\n\
         [[issuer]]\nissuer = \"{partner_iss}\"\naudience = [\"{AUD}\"]\nrole_claim = \"roles\"\n\
         role_map = {{ partner = \"app_partner\" }}\n",
        secret_path.display()
    );
    let issuers_path = write(pg18.data_dir(), "gprxy-issuers.toml", &issuers);
    pg18.sql(&format!("ALTER SYSTEM SET gprxy.issuers_file = '{}'", issuers_path.display()));
    pg18.sql("SELECT pg_reload_conf()");
    let loaded = pg18.wait_for_log("parameter \"gprxy.issuers_file\" changed", Duration::from_secs(10));
    pg18.sql(
        "CREATE EXTENSION gprxy_validator; CREATE ROLE app_auditor LOGIN; CREATE ROLE app_partner LOGIN",
    );
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
    // Roles from groups: a PostgreSQL 18 of its own, where people log in as themselves (started
    // now: its provisioner is up by the time the tour gets there).
    let people = Cluster::builder(PgVersion::V18)
        .conf("shared_preload_libraries = 'gprxy_validator'")
        .conf("oauth_validator_libraries = 'gprxy_validator'")
        .conf("gprxy.insecure_allow_http_loopback = on")
        .conf(format!("gprxy.audience = '{AUD}'"))
        .conf("gprxy.role_claim = 'roles'")
        .conf("gprxy.role_map = 'writer:app_writer,reader:app_reader'")
        .conf("gprxy.provision = 'sync'")
        .conf("gprxy.provision_role = 'gprxy_provisioner'")
        .hba(line("all", &iss))
        .start();
    people.sql("CREATE EXTENSION gprxy_validator");
    for f in ["01_roles.sql", "06_provisioning.sql"] {
        apply_sql_file(&people, "postgres", f);
    }
    let libs = pg18.sql("SHOW oauth_validator_libraries");
    tour.expect("PostgreSQL 18: SHOW oauth_validator_libraries", &libs, "gprxy_validator");
    let policy = pg18.sql("SHOW gprxy.session_policy");
    tour.expect("PostgreSQL 18: SHOW gprxy.session_policy", &policy, "idle");
    println!(
        "    PostgreSQL 18: gprxy.issuers_file = '{}' (three issuers, one pg_hba line each)",
        issuers_path.display()
    );
    tour.expect_that("the issuers file is loaded", loaded);
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
    tour.command(&psql18_command(&via18("app_writer"), &iss, "demo-alice", sql));
    println!(
        "    (PGOAUTHDEBUG=UNSAFE lets libpq 18 use this plain-HTTP issuer; it also makes libpq print its HTTP\n    \
         trace, tokens included: for a development issuer only)"
    );
    let out = psql18(&via18("app_writer"), &iss, "demo-alice", sql).unwrap_or_else(|e| e);
    tour.expect(sql, &out, &format!("app_writer|oauth:alice|alice@acme.example|{ACME}"));

    tour.step("Row-level security on gprxy.claim(): two users of two tenants run the same query");
    let titles = "SELECT string_agg(title, ', ' ORDER BY title) FROM posts";
    let out = psql18(&via18("app_writer"), &iss, "demo-alice", titles).unwrap_or_else(|e| e);
    tour.expect(&format!("alice (Acme): {titles}"), &out, "acme public, alice private");
    let out = psql18(&via18("app_reader"), &iss, "demo-bob", titles).unwrap_or_else(|e| e);
    tour.expect(&format!("bob (Globex): {titles}"), &out, "bob private, globex public");

    tour.step("An expired token is refused; the server log says why");
    tour.command(&psql18_command(&via18("app_writer"), &iss, "demo-expired", "SELECT 1"));
    let err = psql18(&via18("app_writer"), &iss, "demo-expired", "SELECT 1").err().unwrap_or_default();
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

    tour.step(&format!(
        "A session ends when its token does: a {SHORT_SECS} s token, the session idles past its expiry (gprxy.session_policy = idle)"
    ));
    // Straight to PostgreSQL 18: behind gprxy, the proxy's own [session] policy ends such a
    // session too, and whichever end comes first is the one the client reads.
    let direct = format!("host=127.0.0.1 port={} user=app_writer dbname=postgres", pg18.port());
    session_end(&mut tour, &pg18, &format!("{direct} oauth_issuer={iss} oauth_client_id=demo-short"));

    tour.step("An opaque token checked by introspection (RFC 7662), then revoked at its issuer");
    let sql = "SELECT current_user, system_user, gprxy.claim('email')";
    tour.command(&psql18_command(&via18("app_auditor"), &opaque_iss, "demo-carol", sql));
    let carol_fp = fingerprint(carol.as_bytes());
    let login = || psql18(&via18("app_auditor"), &opaque_iss, "demo-carol", sql).unwrap_or_else(|e| e);
    let out = login();
    let first_done = Instant::now();
    let want = "app_auditor|oauth:carol|carol@acme.example";
    tour.expect(
        &format!("carol's opaque token (token_fp={carol_fp}): the issuer's answer holds the claims"),
        &out,
        want,
    );
    let out = login();
    tour.expect("the same login again", &out, want);
    let asked = opaque_idp.introspection_requests().to_string();
    tour.expect(
        "introspection requests for the two logins (the answer is kept in shared memory)",
        &asked,
        "1",
    );
    opaque_idp.revoke_token(&carol);
    println!(
        "    the issuer revokes carol's token; an active answer is kept at most cache_ttl_max_secs = {ANSWER_TTL_SECS}, then asked again"
    );
    let stale = first_done + Duration::from_secs(ANSWER_TTL_SECS) + Duration::from_millis(300);
    pause(stale.saturating_duration_since(Instant::now()));
    let err = psql18(&via18("app_auditor"), &opaque_iss, "demo-carol", "SELECT 1").err().unwrap_or_default();
    tour.expect(
        "psql, the next login",
        &fatal_line(&err),
        &format!("connection to server at \"127.0.0.1\", port {} failed: FATAL:  OAuth bearer authentication failed for user \"app_auditor\"", passthrough.port),
    );
    let refused = audit_line(&pg18, &["oauth login refused", &format!("token_fp={carol_fp}")]);
    let refused = refused.as_deref().unwrap_or("(none)");
    tour.expect("server log (gprxy_validator's audit line)", refused, refused);
    tour.expect_that(
        "the audit line names reason=token_inactive",
        refused.contains(" reason=token_inactive "),
    );

    tour.step("Two issuers in one issuers file: each user logs in with its own issuer's token, on its issuer's pg_hba line");
    println!(
        "    Acme's line reaches app_admin, app_writer and app_reader, Partner's only app_partner. Both issue an\n    \
         alice: were one role reachable from both lines with plain identities, Partner's alice would be Acme's\n    \
         alice to pg_ident, system_user and every policy on gprxy.identity(), so gprxy_validator would refuse\n    \
         the login (issuers_share_role) unless the entries say issuer_qualified = true (identities\n    \
         <iss>#<sub>) or gprxy.shared_subject_namespace = on. Different roles keep the identities plain."
    );
    let sql = "SELECT current_user, system_user, gprxy.claim('iss')";
    tour.command(&psql18_command(&via18("app_writer"), &iss, "demo-alice", sql));
    let out = psql18(&via18("app_writer"), &iss, "demo-alice", sql).unwrap_or_else(|e| e);
    tour.expect("Acme's alice", &out, &format!("app_writer|oauth:alice|{iss}"));
    tour.command(&psql18_command(&via18("app_partner"), &partner_iss, "demo-partner-alice", sql));
    let out = psql18(&via18("app_partner"), &partner_iss, "demo-partner-alice", sql).unwrap_or_else(|e| e);
    tour.expect("Partner's alice", &out, &format!("app_partner|oauth:alice|{partner_iss}"));
    println!("    Partner's alice's token brought to Acme's line (Acme's dev issuer hands it to client id demo-stray):");
    tour.command(&psql18_command(&via18("app_writer"), &iss, "demo-stray", "SELECT 1"));
    let err = psql18(&via18("app_writer"), &iss, "demo-stray", "SELECT 1").err().unwrap_or_default();
    tour.expect(
        "psql",
        &fatal_line(&err),
        &format!("connection to server at \"127.0.0.1\", port {} failed: FATAL:  OAuth bearer authentication failed for user \"app_writer\"", passthrough.port),
    );
    let stray_fp = format!("token_fp={}", fingerprint(partner_alice.as_bytes()));
    let refused = audit_line(&pg18, &["oauth login refused", &stray_fp]);
    let refused = refused.as_deref().unwrap_or("(none)");
    tour.expect("server log (gprxy_validator's audit line)", refused, refused);
    tour.expect_that(
        "the audit line names reason=iss_mismatch and Partner as the token's issuer",
        refused.contains(" reason=iss_mismatch ") && refused.contains(&format!("iss=\"{partner_iss}\"")),
    );

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

    tour.step("Roles from groups: dana has no role; her first login makes it, with her IdP group's role, and a later login follows the group change");
    let dana_writer = token(&key, &iss, "dana", ACME, "writer", 3600);
    let dana_reader = token(&key, &iss, "dana", ACME, "reader", 3600);
    idp.hand_out("demo-dana", &dana_writer);
    idp.hand_out("demo-dana-moved", &dana_reader);
    println!(
        "    a third PostgreSQL 18 ({}): gprxy.provision = 'sync', gprxy.role_map = 'writer:app_writer,reader:app_reader',\n    \
         gprxy.provision_role = 'gprxy_provisioner' (sql/06_provisioning.sql), pg_hba: host all all ... oauth ... delegate_ident_mapping=1",
        people.root().display()
    );
    let ready = people.wait_for_log("gprxy: provisioner ready", Duration::from_secs(20));
    tour.expect_that("the provisioner is ready", ready);
    let exists = "SELECT count(*) FROM pg_roles WHERE rolname = 'dana'";
    tour.expect(&format!("before: {exists}"), &people.sql(exists), "0");
    let people_direct = format!("host=127.0.0.1 port={} user=dana dbname=postgres", people.port());
    let sql = "SELECT current_user, system_user, pg_has_role('app_writer', 'member'), pg_has_role('app_reader', 'member')";
    tour.command(&psql18_command(&people_direct, &iss, "demo-dana", sql));
    let out = psql18(&people_direct, &iss, "demo-dana", sql).unwrap_or_else(|e| without_trace(&e));
    tour.expect(sql, &out, "dana|oauth:dana|t|f");
    let members = "SELECT string_agg(g.rolname || ' granted by ' || gr.rolname, ', ') FROM pg_auth_members m \
         JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles gr ON gr.oid = m.grantor WHERE m.member = 'dana'::regrole";
    tour.expect(
        "the catalog: dana's memberships",
        &people.sql(members),
        "app_writer granted by gprxy_provisioner",
    );
    println!("    (the IdP moves dana from writer to reader; her next token says roles: [\"reader\"])");
    let out = psql18(&people_direct, &iss, "demo-dana-moved", sql).unwrap_or_else(|e| without_trace(&e));
    tour.expect(sql, &out, "dana|oauth:dana|f|t");
    tour.expect(
        "the catalog: dana's memberships",
        &people.sql(members),
        "app_reader granted by gprxy_provisioner",
    );
    let log = people.log();
    for action in [
        "create role=\"dana\"",
        "grant role=\"dana\" group=\"app_writer\"",
        "revoke role=\"dana\" group=\"app_writer\"",
        "grant role=\"dana\" group=\"app_reader\"",
    ] {
        let line = log.lines().find(|l| l.contains(&format!("gprxy: provision action={action}")));
        match line {
            Some(l) => println!("    -> {}", l.split_once(" LOG:  ").map_or(l, |(_, rest)| rest)),
            None => tour.expect_that(&format!("the audit line for {action}"), false),
        }
    }
    let listed = people.sql("SELECT role || ' ' || identity FROM gprxy.provisioned_roles");
    tour.expect("SELECT role, identity FROM gprxy.provisioned_roles", &listed, "dana dana");

    tour.step(
        "gprxy connect: psql 15 (no OAuth in its libpq) logs in to PostgreSQL 18 with no password, through the connector's socket",
    );
    // A token file another program keeps current (a Kubernetes projected token, Vault Agent):
    // here, alice's token written by the demo.
    let alice_jwt = write(dir, "alice.jwt", &alice);
    let connect_dir = tempfile::Builder::new().prefix("connect-").tempdir_in(dir).expect("temp dir");
    let connect_socket = connect_dir.path().join("sock");
    let connect_toml = format!(
        "[profile.demo]\nupstream = \"127.0.0.1:{}\"\nuser = \"app_writer\"\ndatabase = \"postgres\"\n\
         tls.ca_file = \"{}\"\ntls.server_name = \"localhost\"\nlisten.unix_dir = \"{}\"\n\
         token.source = \"file\"\ntoken.path = \"{}\"\n",
        passthrough.port,
        ca_path.display(),
        connect_socket.display(),
        alice_jwt.display()
    );
    let connect_path = connect_dir.path().join("connect.toml");
    println!("    {} (the profile: upstream is the pass-through, verify-full TLS):", connect_path.display());
    for l in connect_toml.lines() {
        println!("      {l}");
    }
    let connector = Connector::start_file(connect_dir, &connect_toml, "demo", connect_socket.clone());
    tour.command(&format!(
        "{} connect --config {} --profile demo --check",
        gprxy_bin().display(),
        connect_path.display()
    ));
    let (ok, said, err) = run(Command::new(gprxy_bin())
        .args(["connect", "--check", "--profile", "demo", "--config"])
        .arg(&connect_path));
    for l in said.lines() {
        println!("    -> {l}");
    }
    tour.expect_that(&format!("gprxy connect --check logs in{}", if ok { "" } else { &err }), ok);
    let via_connector =
        format!("host={} port=5432 user=app_writer dbname=postgres", connect_socket.display());
    let sql = "SELECT current_user, system_user, gprxy.claims()->>'email'";
    let (_, out, err) = run(Command::new(&psql15).args(["-X", "-A", "-t", "-c", sql, &via_connector]));
    let out = if out.is_empty() { err } else { out };
    tour.expect(
        &format!("{} \"{via_connector}\" -c \"{sql}\"", psql15.display()),
        &out,
        "app_writer|oauth:alice|alice@acme.example",
    );
    let log = connector.log();
    let line = log.lines().rfind(|l| l.contains("connect_login")).unwrap_or_default();
    println!("    {}: {line}", connector.dir().join("connect.log").display());
    tour.expect_that(
        "the connector's log names the token by its fingerprint, never the token",
        line.contains(&fingerprint(alice.as_bytes())) && !log.contains(&alice),
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
    println!("\nEverything is running. Try:");
    println!(
        "  device flow via gprxy:   PGOAUTHDEBUG=UNSAFE {} \"{} oauth_issuer={iss} oauth_client_id=demo-alice\" -c 'SELECT gprxy.claims()'",
        psql18.display(),
        via18("app_writer")
    );
    println!("                           (client id demo-bob logs in bob as app_reader)");
    println!(
        "  a session's end:         PGOAUTHDEBUG=UNSAFE {} \"{direct} oauth_issuer={iss} oauth_client_id=demo-short\" -v VERBOSITY=verbose",
        psql18.display()
    );
    println!(
        "                           (a new {SHORT_SECS} s token each login: wait, then run a statement)"
    );
    println!(
        "  the second issuer:       PGOAUTHDEBUG=UNSAFE {} \"{} oauth_issuer={partner_iss} oauth_client_id=demo-partner-alice\" -c 'SELECT gprxy.claims()'",
        psql18.display(),
        via18("app_partner")
    );
    println!(
        "  issuers file:            {} (carol's opaque token stays revoked: reason=token_inactive)",
        issuers_path.display()
    );
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
        "  gprxy connect:           {} \"{via_connector}\"   (profile {})",
        psql15.display(),
        connect_path.display()
    );
    println!(
        "  superuser (18):          {} -h {} -p {} -U postgres",
        psql18.display(),
        pg18.root().display(),
        pg18.port()
    );
    println!(
        "  roles from groups:       PGOAUTHDEBUG=UNSAFE {} \"{people_direct} oauth_issuer={iss} oauth_client_id=demo-dana\"",
        psql18.display()
    );
    println!("                           (demo-dana-moved: dana's token after the IdP moved her to reader)");
    println!(
        "  logs:                    {}, {} and {}",
        pg18.log_path().display(),
        pg15.log_path().display(),
        people.log_path().display()
    );
    println!("\nPress Ctrl-C to stop everything and delete {}.", dir.display());
    let _ = stop_rx.recv();
    println!("Stopping the proxies, PostgreSQL and the issuers; deleting the demo folders.");
    Ok(())
}
