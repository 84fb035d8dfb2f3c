//! RFC 7662 introspection in gprxy_validator (PostgreSQL 18, preloaded): opaque tokens, the
//! revocation of JWTs, a cache across backends, and every way the endpoint can fail.

use std::net::SocketAddr;
use std::time::Duration;

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{self, Auth, PgConn, PgError};
use gprxy_tests::{alice_oauth_cluster, Cluster};
use serde_json::json;

const AUD: &str = "db";
const SECRET: &str = "s3cret-introspection-value";

struct Setup {
    idp: TestIssuer,
    key: TestKey,
    pg: Cluster,
}

/// A cluster trusting the test issuer through an issuers file whose entry has `tokens = mode`,
/// the introspection client `gprxy` with its secret in a file, and `extra` lines in its
/// `[issuer.introspection]` table.
fn setup(mode: &str, extra: &str, conf: &[&str]) -> Setup {
    let key = TestKey::rsa("key-1");
    let idp = TestIssuer::start(&[&key]);
    idp.introspection_client("gprxy", SECRET);
    let pg = alice_oauth_cluster("", &idp.issuer(), conf).start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE EXTENSION gprxy_validator");
    let secret = pg.data_dir().join("introspection-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let file = pg.data_dir().join("issuers.toml");
    std::fs::write(
        &file,
        format!(
            "[[issuer]]\nissuer = \"{}\"\naudience = [\"{AUD}\"]\ntokens = \"{mode}\"\n\n\
             [issuer.introspection]\nclient_id = \"gprxy\"\nclient_secret_file = \"{}\"\n{extra}\n",
            idp.issuer(),
            secret.display()
        ),
    )
    .unwrap();
    pg.sql(&format!("ALTER SYSTEM SET gprxy.issuers_file = '{}'", file.display()));
    pg.sql("SELECT pg_reload_conf()");
    assert!(
        pg.wait_for_log("parameter \"gprxy.issuers_file\" changed", Duration::from_secs(5)),
        "{}",
        pg.log()
    );
    Setup { idp, key, pg }
}

impl Setup {
    fn login(&self, token: &str) -> Result<PgConn, PgError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.pg.port()));
        pgwire::connect(addr, "alice", "postgres", Auth::Bearer(token))
    }

    /// An opaque token the issuer calls active for alice.
    fn opaque(&self, token: &str) -> String {
        self.idp.opaque_token(token, self.idp.claims("alice", AUD));
        token.to_owned()
    }

    fn jwt(&self) -> String {
        self.key.token(json!({"typ": "at+jwt"}), &self.idp.claims("alice", AUD))
    }

    fn last_audit(&self) -> String {
        self.pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned()
    }

    /// Logs in with `token` and expects a refusal with `reason` (and `detail`, when given).
    fn refused(&self, token: &str, reason: &str, detail: Option<&str>) {
        let err = self.login(token).err().expect("login must be refused");
        assert_eq!(err.message, "OAuth bearer authentication failed for user \"alice\"", "{err:?}");
        let line = self.last_audit();
        assert!(line.contains(&format!("oauth login refused reason={reason} ")), "expected {reason}: {line}");
        if let Some(d) = detail {
            assert!(line.contains(&format!("detail=\"{d}")), "expected detail {d:?}: {line}");
        }
        let log = self.pg.log();
        assert!(!log.contains(token), "token in the server log");
        assert!(!log.contains(SECRET), "client secret in the server log");
    }
}

#[test]
fn an_opaque_token_logs_in_and_a_hundred_logins_cost_one_introspection() {
    let s = setup("introspect", "", &[]);
    let token = s.opaque("opq-7f3a9c2e41b84d06a5e1");
    let mut c = s.login(&token).unwrap_or_else(|e| panic!("{e}\n{}", s.pg.log()));
    assert_eq!(
        c.scalar("SELECT system_user || ' ' || gprxy.subject()").unwrap().as_deref(),
        Some("oauth:alice alice")
    );
    c.close();
    for _ in 1..100 {
        s.login(&token).unwrap().close();
    }
    assert_eq!(s.idp.introspection_requests(), 1, "100 logins, each a new backend, one request");
    let line = s.last_audit();
    assert!(line.contains("oauth login authorized reason=ok role=\"alice\" authn_id=\"alice\""), "{line}");
    assert!(line.contains(" alg=\"-\" "), "an opaque token has no algorithm: {line}");
    assert!(!s.pg.log().contains(&token), "token in the server log");
}

#[test]
fn a_revoked_opaque_token_is_refused_once_the_cached_answer_is_stale() {
    let s = setup("introspect", "cache_ttl_max_secs = 1\ninactive_ttl_secs = 1", &[]);
    let token = s.opaque("opq-revoke-me-0123456789");
    s.login(&token).unwrap().close();
    s.idp.revoke_token(&token);
    std::thread::sleep(Duration::from_millis(1100));
    s.refused(&token, "token_inactive", Some("the issuer says the token is not active"));
    // An unknown opaque token is inactive too.
    s.refused("opq-never-issued", "token_inactive", None);
}

#[test]
fn a_revoked_jwt_is_refused_in_jwt_plus_introspect_mode() {
    let s = setup("jwt+introspect", "cache_ttl_max_secs = 1", &[]);
    let jwt = s.jwt();
    s.login(&jwt).unwrap().close();
    assert_eq!(s.idp.introspection_requests(), 1);
    s.idp.revoke_token(&jwt);
    std::thread::sleep(Duration::from_millis(1100));
    s.refused(&jwt, "token_inactive", None);
    // Local checks come first: a forged token costs no request.
    let before = s.idp.introspection_requests();
    let forged = TestKey::rsa("key-1").token(json!({"typ": "at+jwt"}), &s.idp.claims("alice", AUD));
    s.refused(&forged, "bad_signature", None);
    assert_eq!(s.idp.introspection_requests(), before);
}

#[test]
fn a_wrong_client_secret_is_refused_with_its_reason_and_never_logged() {
    let s = setup("introspect", "", &[]);
    s.idp.introspection_client("gprxy", "another-secret");
    let token = s.opaque("opq-secret-mismatch-42");
    s.refused(
        &token,
        "introspection_client_refused",
        Some("the introspection endpoint refused gprxy's client credentials (HTTP 401)"),
    );
}

#[test]
fn an_endpoint_that_is_down_or_slow_refuses_the_login() {
    let s = setup("introspect", "", &["gprxy.http_read_timeout = 1000"]);
    let token = s.opaque("opq-endpoint-down-1");
    s.idp.introspection_status(Some(503));
    s.refused(&token, "introspection_unavailable", Some("introspection failed: "));
    assert!(s.last_audit().contains("/introspect\\\" answered HTTP 503"), "{}", s.last_audit());
    s.idp.introspection_status(None);
    s.idp.introspection_delay(Duration::from_secs(3));
    s.refused(&token, "introspection_unavailable", None);
    assert!(s.last_audit().contains("timed out"), "{}", s.last_audit());
}

/// Fallback mode (PostgreSQL 15, or 17 with `GPRXY_FALLBACK_PG=17`): issuer A's tokens are
/// opaque (`introspect`), issuer B's are JWTs whose revocation is asked (`jwt+introspect`).
struct Fallback {
    a: TestIssuer,
    b: TestIssuer,
    b_key: TestKey,
    proxy: gprxy_tests::proxy::Proxy,
    _pg: Cluster,
    _certs: gprxy_tests::TestCerts,
}

/// `a_ttl`: issuer A's `cache_ttl_max_secs` (B's is 1).
fn fallback(a_ttl: u64) -> Fallback {
    use gprxy_tests::{require_validator, PgVersion, TestCerts};
    let version = PgVersion::fallback_upstream();
    require_validator(version);
    let certs = TestCerts::new();
    let pg = Cluster::builder(version).hba("host all app_writer 127.0.0.1/32 scram-sha-256").start();
    gprxy_tests::apply_sql_file(&pg, "postgres", "01_roles.sql");
    pg.sql("SET password_encryption = 'scram-sha-256'; ALTER ROLE app_writer PASSWORD 'writer-secret-1'");
    let file = |name: &str, text: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = certs.dir().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let (writer_pw, secret) =
        (file("writer.pw", "writer-secret-1\n"), file("secret", &format!("{SECRET}\n")));
    let b_key = TestKey::rsa("kb");
    let (a, b) = (TestIssuer::start(&[]), TestIssuer::start(&[&b_key]));
    a.introspection_client("gprxy", SECRET);
    b.introspection_client("gprxy", SECRET);
    let entry = |idp: &TestIssuer, mode: &str, ttl: u64| {
        format!(
            "[[fallback.issuers]]\nissuer = \"{}\"\naudience = [\"{AUD}\"]\nrole_claim = \"roles\"\ntokens = \"{mode}\"\n\
             [fallback.issuers.introspection]\nclient_id = \"gprxy\"\nclient_secret_file = \"{}\"\ncache_ttl_max_secs = {ttl}\n",
            idp.issuer(),
            secret.display()
        )
    };
    let toml = format!(
        "upstream = \"127.0.0.1:{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[fallback]\nsigned_context = false\n\
         insecure_allow_http_loopback = true\nshared_subject_namespace = true\n{}{}[[fallback.map]]\nrole = \"writer\"\naccount = \"app_writer\"\n\
         [fallback.accounts.app_writer]\npassword_file = \"{}\"\n",
        pg.port(),
        certs.cert_path.display(),
        certs.key_path.display(),
        entry(&a, "introspect", a_ttl),
        entry(&b, "jwt+introspect", 1),
        writer_pw.display()
    );
    let proxy = gprxy_tests::proxy::Proxy::start(&toml);
    Fallback { a, b, b_key, proxy, _pg: pg, _certs: certs }
}

impl Fallback {
    /// psql with the token as its password, through the proxy.
    fn psql(&self, token: &str, sql: &str) -> Result<String, String> {
        let out = std::process::Command::new(gprxy_tests::PgVersion::V15.bin("psql"))
            .args(["-X", "-A", "-t", "-c", sql])
            .arg(format!(
                "host=127.0.0.1 port={} dbname=postgres user=alice sslmode=require",
                self.proxy.port
            ))
            .env("PGPASSWORD", token)
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn claims(&self, idp: &TestIssuer) -> serde_json::Value {
        let mut c = idp.claims("alice", AUD);
        c["roles"] = json!(["writer"]);
        c
    }

    fn refused(&self, token: &str, reason: &str) {
        let e = self.psql(token, "SELECT 1").unwrap_err();
        assert!(e.contains(&format!("FATAL:  gprxy: token refused ({reason})")), "expected {reason}: {e}");
        let log = self.proxy.log();
        assert!(!log.contains(token) && !log.contains(SECRET), "token or secret in the proxy's log");
    }
}

#[test]
fn fallback_mode_introspects_opaque_tokens_once_and_refuses_revoked_jwts() {
    let f = fallback(60);
    let opaque = "opq-fallback-5d1e0c";
    f.a.opaque_token(opaque, f.claims(&f.a));
    assert_eq!(
        f.psql(opaque, "SELECT current_user, current_setting('app.user_id')")
            .unwrap_or_else(|e| panic!("{e}\n{}", f.proxy.log())),
        "app_writer|alice"
    );
    for _ in 0..99 {
        assert_eq!(f.psql(opaque, "SELECT current_user").unwrap(), "app_writer");
    }
    assert_eq!(f.a.introspection_requests(), 1, "100 logins, one request");
    assert_eq!(f.b.introspection_requests(), 0, "an opaque token is never sent to another issuer");

    let jwt = f.b_key.token(json!({"typ": "at+jwt"}), &f.claims(&f.b));
    assert_eq!(f.psql(&jwt, "SELECT current_user").unwrap(), "app_writer");
    f.b.revoke_token(&jwt);
    std::thread::sleep(Duration::from_millis(1100));
    f.refused(&jwt, "token_inactive");
}

#[test]
fn fallback_mode_refuses_revoked_opaque_tokens_and_an_endpoint_that_refuses_gprxy_or_is_down() {
    let f = fallback(1);
    let revoked = "opq-fallback-revoked-31";
    f.a.opaque_token(revoked, f.claims(&f.a));
    assert_eq!(f.psql(revoked, "SELECT current_user").unwrap(), "app_writer");
    f.a.revoke_token(revoked);
    std::thread::sleep(Duration::from_millis(1100));
    f.refused(revoked, "token_inactive");

    let opaque = "opq-fallback-down-77";
    f.a.opaque_token(opaque, f.claims(&f.a));
    f.a.introspection_client("gprxy", "rotated-elsewhere");
    f.refused(opaque, "introspection_client_refused");
    f.a.introspection_client("gprxy", SECRET);
    f.a.introspection_status(Some(503));
    f.refused(opaque, "introspection_unavailable");
    f.a.introspection_status(None);
    assert_eq!(f.psql(opaque, "SELECT current_user").unwrap(), "app_writer");
}

/// #27 item 4: a flood of random opaque tokens from many connections costs the issuer at most
/// its budget (`max_requests_per_sec` = 5: a burst of 5, then 5 a second), cluster-wide across
/// backends, discovery included (asked once, kept in shared memory); the rest are refused as
/// `introspection_throttled` with no request; a token whose answer is kept logs in throughout.
#[test]
fn a_flood_of_random_opaque_tokens_costs_the_issuer_at_most_its_budget() {
    let s = setup("introspect", "max_requests_per_sec = 5\nmax_concurrent_requests = 2", &[]);
    let good = s.opaque("opq-good-7c1e02b4a99d");
    s.login(&good).unwrap_or_else(|e| panic!("{e}\n{}", s.pg.log())).close();
    let before = s.idp.request_count();
    let started = std::time::Instant::now();
    std::thread::scope(|sc| {
        for t in 0..6 {
            let s = &s;
            sc.spawn(move || {
                for i in 0..25 {
                    assert!(s.login(&format!("opq-flood-{t}-{i}")).is_err());
                }
            });
        }
        sc.spawn(|| {
            for _ in 0..10 {
                s.login(&good).expect("a kept answer logs in during the flood").close();
            }
        });
    });
    let secs = started.elapsed().as_secs_f64();
    let cost = s.idp.request_count() - before;
    let bound = 5 + (5.0 * secs).ceil() as u64;
    assert!(cost <= bound, "150 random tokens cost {cost} requests in {secs:.1} s (at most {bound})");
    let throttled = s.pg.log().matches("oauth login refused reason=introspection_throttled ").count();
    assert!(throttled >= 150 - bound as usize, "{throttled} refused as introspection_throttled");
}
