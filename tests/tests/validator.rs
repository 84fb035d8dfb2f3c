//! gprxy_validator inside a real PostgreSQL 18, logged into by a real psql 18 device flow.

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::{oauth_psql, require_validator, validator_cluster, Cluster, PgVersion};
use serde_json::json;

const AUD: &str = "db";

struct Setup {
    idp: TestIssuer,
    key: TestKey,
    pg: Cluster,
}

fn setup_with(hba_options: &str, conf: &[&str], ident: &[&str]) -> Setup {
    let key = TestKey::rsa("key-1");
    let idp = TestIssuer::start(&[&key]);
    let mut b = validator_cluster(AUD).hba(format!(
        "host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" {hba_options}",
        idp.issuer()
    ));
    for c in conf {
        b = b.conf(*c);
    }
    for i in ident {
        b = b.ident(*i);
    }
    let pg = b.start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE app_writer LOGIN; CREATE EXTENSION gprxy_validator");
    Setup { idp, key, pg }
}

fn setup() -> Setup {
    setup_with("map=m", &[], &["m alice alice"])
}

impl Setup {
    fn login(&self, user: &str, token: &str, sql: &str) -> Result<String, String> {
        let client = format!("c{}", gprxy_core::fingerprint(token.as_bytes()));
        self.idp.hand_out(&client, token);
        oauth_psql(self.pg.port(), user, &self.idp.issuer(), &client, sql)
    }

    fn token(&self, claims: serde_json::Value) -> String {
        self.key.token(json!({"typ": "at+jwt"}), &claims)
    }
}

#[test]
fn device_flow_login_shows_identity_and_claims() {
    let s = setup();
    let t = s.token(s.idp.claims("alice", AUD));
    let out = s
        .login(
            "alice",
            &t,
            "SELECT current_user, system_user, gprxy.subject(), gprxy.claim('aud'), gprxy.claims()->>'iss'",
        )
        .unwrap();
    assert_eq!(out, format!("alice|oauth:alice|alice|db|{}", s.idp.issuer()));
    assert!(
        s.pg.log().contains("gprxy: oauth login authorized reason=ok role=\"alice\" authn_id=\"alice\""),
        "{}",
        s.pg.log()
    );
}

const REFUSED: &str = "OAuth bearer authentication failed for user";

impl Setup {
    /// The newest audit line.
    fn last_audit(&self) -> String {
        self.pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned()
    }

    fn audits(&self) -> usize {
        self.pg.log().matches("gprxy: oauth login").count()
    }

    /// Logs in with `token`, expects a refusal with this reason code.
    fn refused(&self, user: &str, token: &str, reason: &str) {
        let before = self.audits();
        let err = self.login(user, token, "SELECT 1").expect_err("login must be refused");
        assert!(err.contains(&format!("{REFUSED} \"{user}\"")), "psql said:\n{err}");
        assert_eq!(self.audits(), before + 1, "one audit line per attempt");
        let line = self.last_audit();
        assert!(line.contains(&format!("oauth login refused reason={reason} ")), "expected {reason}: {line}");
        assert!(
            !line.contains(token) && !line.contains(token.split('.').nth(1).unwrap_or("-")),
            "token logged: {line}"
        );
    }
}

fn with(mut c: serde_json::Value, k: &str, v: serde_json::Value) -> serde_json::Value {
    c[k] = v;
    c
}

#[test]
fn refused_tokens_each_with_their_reason() {
    use gprxy_core::testkit::b64;
    let s = setup();
    let c = || s.idp.claims("alice", AUD);
    let now = gprxy_core::unix_time();
    s.refused("alice", &s.token(with(c(), "exp", json!(now - 120))), "expired");
    s.refused("alice", &s.token(with(c(), "nbf", json!(now + 600))), "not_yet_valid");
    s.refused("alice", &s.token(with(c(), "aud", json!("other-service"))), "aud_mismatch");
    s.refused("alice", &s.token(with(c(), "iss", json!("https://evil.example"))), "iss_mismatch");
    s.refused("alice", &s.token(with(c(), "iss", json!(format!("{}/", s.idp.issuer())))), "iss_mismatch");
    s.refused("alice", &s.token(with(c(), "scope", json!("openid"))), "scope_missing");

    let good = s.token(c());
    let (input, sig) = good.rsplit_once('.').unwrap();
    let mut flipped = sig.as_bytes().to_vec();
    flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };
    s.refused("alice", &format!("{input}.{}", String::from_utf8(flipped).unwrap()), "bad_signature");

    let stranger = TestKey::rsa("unknown-kid");
    s.refused("alice", &stranger.token(json!({"typ": "at+jwt"}), &c()), "kid_unknown");

    let none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"at+jwt"}"#), b64(c().to_string().as_bytes()));
    s.refused("alice", &none, "alg_none");

    // HS256 with the RSA public key as the HMAC secret: the classic confusion attack.
    let h = json!({"alg": "HS256", "typ": "at+jwt", "kid": "key-1"}).to_string();
    let si = format!("{}.{}", b64(h.as_bytes()), b64(c().to_string().as_bytes()));
    let tag = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &s.key.rsa_public_der()),
        si.as_bytes(),
    );
    s.refused("alice", &format!("{si}.{}", b64(tag.as_ref())), "alg_not_allowed");

    // A jku header pointing at the attacker's key server: never fetched.
    let evil = gprxy_core::testkit::TestServer::start(|_| gprxy_core::testkit::Response::status(200));
    let attacker = TestKey::rsa("attacker");
    let t = attacker.token(json!({"typ": "at+jwt", "jku": format!("{}/jwks", evil.url())}), &c());
    s.refused("alice", &t, "kid_unknown");
    assert_eq!(evil.request_count(), 0, "the jku server was contacted");
}

#[test]
fn refused_token_still_names_who_tried_by_the_configured_claim() {
    let s = setup_with("map=m", &["gprxy.authn_claim = 'email'"], &["m alice@example.com alice"]);
    let mut c = with(s.idp.claims("alice", AUD), "email", json!("alice@example.com"));
    c["aud"] = json!("elsewhere");
    s.refused("alice", &s.token(c), "aud_mismatch");
    assert!(s.last_audit().contains("authn_id=\"alice@example.com\""), "{}", s.last_audit());
}

#[test]
fn without_preloading_each_backend_fetches_once() {
    require_validator(PgVersion::validator());
    let key = TestKey::rsa("key-1");
    let idp = TestIssuer::start(&[&key]);
    let pg = Cluster::builder(PgVersion::validator())
        .conf("oauth_validator_libraries = 'gprxy_validator'")
        .conf(format!("gprxy.audience = '{AUD}'"))
        .conf("gprxy.insecure_allow_http_loopback = on")
        .hba(format!(
            "host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
            idp.issuer()
        ))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN");
    let s = Setup { idp, key, pg };
    let t = s.token(s.idp.claims("alice", AUD));
    for _ in 0..3 {
        assert_eq!(s.login("alice", &t, "SELECT current_user").unwrap(), "alice");
    }
    // No shared cache: every new backend process fetched the keys itself.
    assert_eq!(s.idp.jwks_requests(), 3);
    assert!(!s.pg.log().contains("JWKS refresher started"));
}

#[test]
fn identity_not_mapped_for_the_requested_role_is_refused() {
    let s = setup();
    s.pg.sql("CREATE ROLE bob LOGIN");
    let err = s.login("bob", &s.token(s.idp.claims("alice", AUD)), "SELECT 1").unwrap_err();
    assert!(err.contains(&format!("{REFUSED} \"bob\"")), "{err}");
    // The token itself was good; pg_ident refused alice as bob.
    assert!(
        s.last_audit().contains("authorized reason=ok role=\"bob\" authn_id=\"alice\""),
        "{}",
        s.last_audit()
    );
    assert!(
        s.pg.log().contains("no match in usermap \"m\" for user \"bob\" authenticated as \"alice\""),
        "{}",
        s.pg.log()
    );
}

#[test]
fn delegated_mode_allows_only_roles_the_token_grants() {
    let s = setup_with(
        "delegate_ident_mapping=1",
        &[
            "gprxy.role_claim = 'https://gprxy.io/roles'",
            "gprxy.role_map = 'writer:app_writer, admin:app_admin'",
        ],
        &[],
    );
    let t = s.token(with(s.idp.claims("alice", AUD), "https://gprxy.io/roles", json!(["writer"])));
    assert_eq!(
        s.login("app_writer", &t, "SELECT current_user, system_user").unwrap(),
        "app_writer|oauth:alice"
    );
    s.refused("alice", &t, "role_not_granted");
    assert!(
        s.last_audit()
            .contains("detail=\"role \\\"alice\\\" is not among the roles the token grants (app_writer)\""),
        "{}",
        s.last_audit()
    );
}

#[test]
fn key_rotation_new_key_works_removed_key_refused() {
    let s = setup_with(
        "map=m",
        &["gprxy.jwks_unknown_kid_cooldown = 1", "gprxy.jwks_cache_ttl = 2", "gprxy.jwks_cache_ttl_min = 1"],
        &["m alice alice"],
    );
    let old = s.token(s.idp.claims("alice", AUD));
    assert_eq!(s.login("alice", &old, "SELECT 1").unwrap(), "1");
    let k2 = TestKey::p256("key-2");
    s.idp.publish(&[&s.key, &k2]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let new = k2.token(json!({"typ": "at+jwt"}), &s.idp.claims("alice", AUD));
    assert_eq!(s.login("alice", &new, "SELECT gprxy.subject()").unwrap(), "alice");
    s.idp.publish(&[&k2]);
    std::thread::sleep(std::time::Duration::from_millis(2200));
    s.refused("alice", &s.token(s.idp.claims("alice", AUD)), "kid_unknown");
    assert_eq!(s.login("alice", &new, "SELECT 1").unwrap(), "1");
}

#[test]
fn key_outage_served_until_max_staleness_then_closed() {
    let s = setup_with(
        "map=m",
        &["gprxy.jwks_cache_ttl = 2", "gprxy.jwks_cache_ttl_min = 1", "gprxy.jwks_max_staleness = 4"],
        &["m alice alice"],
    );
    let t = || s.token(s.idp.claims("alice", AUD));
    assert_eq!(s.login("alice", &t(), "SELECT 1").unwrap(), "1");
    s.idp.fail_jwks(Some(503));
    std::thread::sleep(std::time::Duration::from_millis(3000)); // expired, within staleness
    assert_eq!(s.login("alice", &t(), "SELECT 1").unwrap(), "1");
    std::thread::sleep(std::time::Duration::from_millis(4000)); // past expiry + staleness
    s.refused("alice", &t(), "keys_unavailable");
    s.idp.fail_jwks(None);
    // The backoff (shared by every backend and the refresher: 1 s, 2 s, 4 s after each failure)
    // ends; then the next attempt recovers.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let recovered = loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        match s.login("alice", &t(), "SELECT 1") {
            Ok(out) => break out,
            Err(e) if std::time::Instant::now() > deadline => panic!("not recovered: {e}"),
            Err(_) => {}
        }
    };
    assert_eq!(recovered, "1");
}

#[test]
fn two_hundred_logins_share_one_key_fetch() {
    let s = setup();
    let t = s.token(s.idp.claims("alice", AUD));
    for i in 0..200 {
        let out = s.login("alice", &t, "SELECT 1").unwrap_or_else(|e| panic!("login {i}: {e}"));
        assert_eq!(out, "1");
    }
    assert!(s.idp.jwks_requests() <= 2, "{} JWKS requests for 200 logins", s.idp.jwks_requests());
}

#[test]
fn claim_functions_cannot_be_changed_by_sql_and_are_null_without_oauth() {
    let s = setup();
    let t = s.token(s.idp.claims("alice", AUD));
    let attempts = "SELECT gprxy.subject();
         DO $$ BEGIN PERFORM set_config('gprxy.subject', 'mallory', false); EXCEPTION WHEN OTHERS THEN NULL; END $$;
         DO $$ BEGIN EXECUTE 'SET gprxy.claims = ''{}'''; EXCEPTION WHEN OTHERS THEN NULL; END $$;
         RESET ALL;
         DISCARD ALL;
         SELECT gprxy.subject() || ',' || gprxy.claim('sub') || ',' || (gprxy.claims()->>'sub');";
    assert_eq!(s.login("alice", &t, attempts).unwrap(), "alice\nalice,alice,alice");
    let err = s.login("alice", &t, "SET gprxy.subject = 'mallory'").unwrap_err();
    assert!(err.contains("invalid configuration parameter name \"gprxy.subject\""), "{err}");
    let err = s.login("alice", &t, "SELECT gprxy.set_context('v2.e30.AAAA')").unwrap_err();
    assert!(err.contains("ERROR:  permission denied for function set_context"), "{err}");
    s.pg.sql("GRANT EXECUTE ON FUNCTION gprxy.set_context(text) TO alice");
    let err = s.login("alice", &t, "SELECT gprxy.set_context('v2.e30.AAAA')").unwrap_err();
    assert!(
        err.contains("ERROR:  gprxy: context refused: the session logged in with a token; its identity cannot be replaced"),
        "{err}"
    );
    // A superuser over the socket (trust, no token): every function is NULL.
    assert_eq!(
        s.pg.sql("SELECT coalesce(gprxy.subject(), 'NULL') || coalesce(gprxy.claims()::text, 'NULL') || coalesce(gprxy.roles()::text, 'NULL') || coalesce(gprxy.claim('sub'), 'NULL')"),
        "NULLNULLNULLNULL"
    );
}

#[test]
fn bad_settings_are_refused_at_reload_with_the_setting_named() {
    let s = setup();
    let err = s.pg.try_sql("ALTER SYSTEM SET gprxy.allowed_algorithms = 'HS256'").unwrap_err();
    assert!(err.contains("invalid value for parameter \"gprxy.allowed_algorithms\": \"HS256\""), "{err}");
    assert!(err.contains("HS256 is never allowed (unsigned or symmetric)"), "{err}");
    // The same kind of value written into postgresql.conf is refused at reload; the old one stays.
    let conf = s.pg.data_dir().join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("gprxy.token_types = 'id_token'\n");
    std::fs::write(&conf, text).unwrap();
    s.pg.sql("SELECT pg_reload_conf()");
    let refused = "invalid value for parameter \"gprxy.token_types\": \"id_token\"";
    assert!(s.pg.wait_for_log(refused, std::time::Duration::from_secs(5)), "{}", s.pg.log());
    assert!(s.pg.log().contains("unknown token type \"id_token\": use at+jwt and/or JWT"));
    let t = s.token(s.idp.claims("alice", AUD));
    assert_eq!(s.login("alice", &t, "SHOW gprxy.token_types").unwrap(), "at+jwt");
}

#[test]
fn preloaded_18_takes_a_signed_context_from_a_service_account_connection() {
    use gprxy_core::context::{ContextSigner, NONCE_PARAMETER};
    use gprxy_tests::pgwire::{connect_params, Auth};
    use gprxy_tests::proxy::ContextKeyFile;
    let dir = tempfile::tempdir().unwrap();
    let key = ContextKeyFile::create(dir.path().join("context.key"));
    let pg = validator_cluster(AUD)
        .hba("host all app_writer 127.0.0.1/32 scram-sha-256")
        .conf(format!("gprxy.context_keys = '{}'", key.public))
        .conf("gprxy.context_roles = 'app_writer'")
        .start();
    pg.sql("SET password_encryption = 'scram-sha-256'; CREATE ROLE app_writer LOGIN PASSWORD 'pw-1'; CREATE EXTENSION gprxy_validator; GRANT EXECUTE ON FUNCTION gprxy.set_context(text) TO app_writer");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", pg.port()).parse().unwrap();
    let mut signer = ContextSigner::new(key.key()).unwrap();
    let nonce = signer.nonce().to_owned();
    // The reserved gprxy. prefix admits the nonce in the startup packet, and only there.
    let mut c =
        connect_params(addr, "app_writer", "postgres", Auth::Password("pw-1"), &[(NONCE_PARAMETER, &nonce)])
            .unwrap();
    signer.bind_backend(c.key.unwrap().0);
    let ctx =
        signer.sign(Some("alice".into()), vec![], json!({"sub": "alice"}).as_object().cloned().unwrap());
    c.query(&format!("SELECT gprxy.set_context('{ctx}')")).unwrap();
    assert_eq!(c.scalar("SELECT gprxy.subject()").unwrap().as_deref(), Some("alice"));
    let e = c.query(&format!("SET {NONCE_PARAMETER} = 'x'")).unwrap_err();
    assert_eq!(e.message, "parameter \"gprxy.context_nonce\" cannot be set after connection start");
    // The trust anchor is postgresql.conf's: no session can pin a key or allow a role.
    let e = c.query("SET gprxy.context_keys = 'AAAA'").unwrap_err();
    assert_eq!(e.message, "parameter \"gprxy.context_keys\" cannot be changed now");
    let e = c.query("SELECT set_config('gprxy.context_roles', 'mallory', false)").unwrap_err();
    assert_eq!(e.message, "parameter \"gprxy.context_roles\" cannot be changed now");
}

impl Setup {
    fn audits_with(&self, reason: &str) -> usize {
        self.pg.log().matches(&format!("oauth login refused reason={reason} ")).count()
    }
}

#[test]
fn fifty_connections_with_an_unknown_kid_make_at_most_one_key_fetch_per_cooldown() {
    // Each connection is a new backend: the cooldown must hold across them (shared memory).
    let s = setup_with("map=m", &["gprxy.jwks_unknown_kid_cooldown = 120"], &["m alice alice"]);
    assert_eq!(s.login("alice", &s.token(s.idp.claims("alice", AUD)), "SELECT 1").unwrap(), "1");
    let warm = s.idp.jwks_requests();
    let stranger = TestKey::rsa("nope");
    let nope = stranger.token(json!({"typ": "at+jwt"}), &s.idp.claims("alice", AUD));
    std::thread::scope(|scope| {
        for _ in 0..5 {
            scope.spawn(|| {
                for _ in 0..10 {
                    let err = s.login("alice", &nope, "SELECT 1").expect_err("unknown kid must be refused");
                    assert!(err.contains(&format!("{REFUSED} \"alice\"")), "psql said:\n{err}");
                }
            });
        }
    });
    assert_eq!(s.audits_with("kid_unknown"), 50, "{}", s.pg.log());
    let fetched = s.idp.jwks_requests() - warm;
    assert!(fetched <= 1, "50 connections with an unknown kid made {fetched} JWKS requests");
}

#[test]
fn black_holed_issuer_does_not_slow_logins_with_known_keys() {
    use std::time::{Duration, Instant};
    let s = setup_with(
        "map=m",
        &[
            "gprxy.jwks_cache_ttl = 2",
            "gprxy.jwks_cache_ttl_min = 1",
            "gprxy.jwks_refresh_check_interval = 1",
            "gprxy.http_connect_timeout = 2000",
            "gprxy.http_read_timeout = 4000",
        ],
        &["m alice alice"],
    );
    let t = || s.token(s.idp.claims("alice", AUD));
    assert_eq!(s.login("alice", &t(), "SELECT 1").unwrap(), "1");
    s.idp.black_hole_jwks(true);
    let before = s.idp.jwks_requests();
    // Past the keys' expiry, and until someone's refresh attempt hangs in the black hole.
    std::thread::sleep(Duration::from_millis(2100));
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.idp.jwks_requests() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.idp.jwks_requests() > before, "nobody tried to refresh the keys");
    // For the next seven seconds (through the first attempt's 4 s timeout and the retries),
    // every login uses the known keys without waiting for the issuer.
    let until = Instant::now() + Duration::from_secs(7);
    let mut logins = 0;
    while Instant::now() < until {
        let started = Instant::now();
        assert_eq!(s.login("alice", &t(), "SELECT 1").unwrap(), "1");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "login {logins} waited {took:?} for the black hole");
        logins += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(logins >= 5, "only {logins} logins");
}

#[test]
fn reload_to_another_jwks_uri_drops_the_old_keys() {
    let s = setup();
    let old = s.token(s.idp.claims("alice", AUD));
    assert_eq!(s.login("alice", &old, "SELECT 1").unwrap(), "1");
    // The DBA points gprxy.jwks_uri at another key set (here another server's).
    let moved_key = TestKey::rsa("key-b");
    let moved = TestIssuer::start(&[&moved_key]);
    let uri = format!("{}/jwks", moved.issuer());
    s.pg.sql(&format!("ALTER SYSTEM SET gprxy.jwks_uri = '{uri}'"));
    s.pg.sql("SELECT pg_reload_conf()");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.pg.sql("SHOW gprxy.jwks_uri") != uri && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(s.pg.sql("SHOW gprxy.jwks_uri"), uri);
    // The keys fetched from the old place (in shared memory, still fresh) are not used.
    s.refused("alice", &old, "kid_unknown");
    let new = moved_key.token(json!({"typ": "at+jwt"}), &s.idp.claims("alice", AUD));
    assert_eq!(s.login("alice", &new, "SELECT gprxy.subject()").unwrap(), "alice");
    assert_eq!(moved.jwks_requests(), 1);
}

#[test]
fn required_claims_refuse_a_token_from_another_repository() {
    // GitHub-style: the issuer serves every repository; the audience is the workflow's choice.
    let s = setup_with(
        "map=m",
        &["gprxy.required_claims = 'repository in (acme/app | acme/infra), environment = prod'"],
        &["m alice alice"],
    );
    let token = |repository: &str, environment: &str| {
        let c = with(s.idp.claims("alice", AUD), "repository", json!(repository));
        s.token(with(c, "environment", json!(environment)))
    };
    s.refused("alice", &token("evil/x", "prod"), "required_claim");
    assert!(
        s.last_audit().contains(
            r#"detail="required claim \"repository\" must be one of \"acme/app\", \"acme/infra\" (token: \"evil/x\")""#
        ),
        "{}",
        s.last_audit()
    );
    s.refused("alice", &token("acme/app", "dev"), "required_claim");
    assert!(
        s.last_audit()
            .contains(r#"detail="required claim \"environment\" must equal \"prod\" (token: \"dev\")""#),
        "{}",
        s.last_audit()
    );
    s.refused("alice", &s.token(s.idp.claims("alice", AUD)), "required_claim");
    assert!(s.last_audit().contains("(token: missing)"), "{}", s.last_audit());
    assert_eq!(
        s.login("alice", &token("acme/infra", "prod"), "SELECT gprxy.claim('repository')").unwrap(),
        "acme/infra"
    );

    // A bad value is refused with the setting named, and the old constraints stay.
    let err = s.pg.try_sql("ALTER SYSTEM SET gprxy.required_claims = 'email_verified = false'").unwrap_err();
    assert!(err.contains("invalid value for parameter \"gprxy.required_claims\""), "{err}");
    assert!(err.contains("only true can be required of a boolean"), "{err}");
    s.refused("alice", &token("evil/x", "prod"), "required_claim");
}

#[test]
fn delegated_mode_never_maps_a_token_to_a_superuser_or_privileged_role() {
    // No role_map: the token's role names are used as they are, which is where a claim could
    // name any role.
    let s = setup_with("delegate_ident_mapping=1", &["gprxy.role_claim = 'roles'"], &[]);
    s.pg.sql("CREATE ROLE rls_skipper LOGIN BYPASSRLS; CREATE ROLE replicator LOGIN REPLICATION");
    let t = s.token(with(
        s.idp.claims("alice", AUD),
        "roles",
        json!(["postgres", "rls_skipper", "replicator", "app_writer"]),
    ));
    s.refused("postgres", &t, "role_privileged");
    assert!(
        s.last_audit().contains(
            r#"detail="role \"postgres\" has SUPERUSER, REPLICATION, BYPASSRLS, CREATEROLE: delegated mode never maps a token to such a role""#
        ),
        "{}",
        s.last_audit()
    );
    s.refused("rls_skipper", &t, "role_privileged");
    assert!(s.last_audit().contains(r#"role \"rls_skipper\" has BYPASSRLS:"#), "{}", s.last_audit());
    s.refused("replicator", &t, "role_privileged");
    assert!(s.last_audit().contains(r#"role \"replicator\" has REPLICATION:"#), "{}", s.last_audit());
    // Nor a role that can SET ROLE to one, through any chain of memberships, nor one that reads
    // the server's files.
    s.pg.sql(
        "CREATE ROLE ops NOLOGIN; GRANT postgres TO ops; CREATE ROLE tok LOGIN; GRANT ops TO tok; \
         CREATE ROLE filer LOGIN; GRANT pg_read_server_files TO filer",
    );
    let t2 = s.token(with(s.idp.claims("alice", AUD), "roles", json!(["tok", "filer"])));
    s.refused("tok", &t2, "role_privileged");
    assert!(
        s.last_audit()
            .contains(r#"role \"tok\" is a member of \"postgres\", which has powers beyond its grants"#),
        "{}",
        s.last_audit()
    );
    s.refused("filer", &t2, "role_privileged");
    assert!(
        s.last_audit().contains(r#"role \"filer\" is a member of \"pg_read_server_files\""#),
        "{}",
        s.last_audit()
    );
    // The same token still reaches an ordinary role it names.
    assert_eq!(
        s.login("app_writer", &t, "SELECT current_user, system_user").unwrap(),
        "app_writer|oauth:alice"
    );
    // Made a superuser later: refused from the next login on.
    s.pg.sql("ALTER ROLE app_writer SUPERUSER");
    s.refused("app_writer", &t, "role_privileged");
}

/// `gprxy.issuers_file`: three pg_hba lines with three issuers, each with its own audience and
/// keys (C's from a file on the server, no network); a fourth line's issuer is not in the file.
#[test]
fn an_issuers_file_gives_each_pg_hba_issuer_its_own_policy() {
    let (ka, kb, kc) = (TestKey::rsa("k"), TestKey::p256("k"), TestKey::ed25519("c"));
    let (a, b) = (TestIssuer::start(&[&ka]), TestIssuer::start(&[&kb]));
    // C and D hand out tokens for the device flow; their key endpoints must never be asked.
    let (c, d) = (TestIssuer::start(&[&kc]), TestIssuer::start(&[&kc]));
    let mut builder = validator_cluster("");
    for (user, idp) in [("alice", &a), ("bob", &b), ("carol", &c), ("dave", &d)] {
        builder = builder
            .hba(format!(
                "host all {user} 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m",
                idp.issuer()
            ))
            .ident(format!("m {user} {user}"));
    }
    let pg = builder.start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN; CREATE ROLE carol LOGIN; CREATE ROLE dave LOGIN; CREATE EXTENSION gprxy_validator");
    let c_keys = pg.data_dir().join("c-keys.json");
    std::fs::write(&c_keys, gprxy_core::testkit::jwks(&[&kc]).to_string()).unwrap();
    let file = pg.data_dir().join("issuers.toml");
    let entry = |idp: &TestIssuer, aud: &str, extra: &str| {
        format!("[[issuer]]\nissuer = \"{}\"\naudience = [\"{aud}\"]\n{extra}\n", idp.issuer())
    };
    let good = format!(
        "{}{}{}",
        entry(&a, "db-a", ""),
        entry(&b, "db-b", ""),
        entry(&c, "db-c", &format!("jwks_file = \"{}\"", c_keys.display()))
    );
    std::fs::write(&file, &good).unwrap();
    pg.sql(&format!("ALTER SYSTEM SET gprxy.issuers_file = '{}'", file.display()));
    pg.sql("SELECT pg_reload_conf()");
    assert!(
        pg.wait_for_log("parameter \"gprxy.issuers_file\" changed", std::time::Duration::from_secs(5)),
        "{}",
        pg.log()
    );

    let token = |idp: &TestIssuer, aud: &str, key: &TestKey, sub: &str| {
        key.token(json!({"typ": "at+jwt"}), &idp.claims(sub, aud))
    };
    let login = |user: &str, idp: &TestIssuer, token: &str| {
        let client = format!("c{}", gprxy_core::fingerprint(token.as_bytes()));
        idp.hand_out(&client, token);
        oauth_psql(pg.port(), user, &idp.issuer(), &client, "SELECT system_user")
    };
    let last_audit =
        || pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned();
    assert_eq!(login("alice", &a, &token(&a, "db-a", &ka, "alice")).unwrap(), "oauth:alice");
    assert_eq!(login("bob", &b, &token(&b, "db-b", &kb, "bob")).unwrap(), "oauth:bob");
    assert_eq!(login("carol", &c, &token(&c, "db-c", &kc, "carol")).unwrap(), "oauth:carol");
    assert_eq!(c.jwks_requests(), 0, "C's keys come from the file");
    // A's valid signature with B's audience: A's entry wants db-a.
    assert!(login("alice", &a, &token(&a, "db-b", &ka, "alice")).is_err());
    assert!(last_audit().contains("refused reason=aud_mismatch"), "{}", last_audit());
    // Both publish kid "k": a token of B's signed with A's "k" meets B's own key.
    assert!(login("bob", &b, &token(&b, "db-b", &ka, "bob")).is_err());
    assert!(last_audit().contains("refused reason=key_mismatch"), "{}", last_audit());
    // D is on a pg_hba line but not in the file: refused, and its keys never fetched.
    assert!(login("dave", &d, &token(&d, "db-a", &kc, "dave")).is_err());
    let refused = last_audit();
    assert!(
        refused.contains("refused reason=config") && refused.contains("is not in the issuers file"),
        "{refused}"
    );
    assert_eq!(d.jwks_requests(), 0);

    // Rotating C's keys: a new file and a reload.
    let kc2 = TestKey::ed25519("c2");
    std::fs::write(&c_keys, gprxy_core::testkit::jwks(&[&kc2]).to_string()).unwrap();
    pg.sql("SELECT pg_reload_conf()");
    let rotated = token(&c, "db-c", &kc2, "carol");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while login("carol", &c, &rotated).is_err() {
        assert!(std::time::Instant::now() < deadline, "the new key never took: {}", last_audit());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(login("carol", &c, &token(&c, "db-c", &kc, "carol")).is_err());
    assert!(last_audit().contains("refused reason=kid_unknown"), "{}", last_audit());

    // A broken file at reload is refused with its line named; the policy in force stays.
    std::fs::write(&file, format!("{good}[[issuer]]\nissuer = \"https://x\"\naudiences = [\"x\"]\n"))
        .unwrap();
    pg.sql("SELECT pg_reload_conf()");
    let named = "unknown field `audiences`";
    assert!(pg.wait_for_log(named, std::time::Duration::from_secs(5)), "{}", pg.log());
    assert!(pg.log().contains("invalid value for parameter \"gprxy.issuers_file\""), "{}", pg.log());
    let line = good.lines().count() + 3;
    assert!(
        pg.log().contains(&format!("issuers.toml: TOML error at line {line}, column 1 (key audiences): ")),
        "{}",
        pg.log()
    );
    assert_eq!(login("alice", &a, &token(&a, "db-a", &ka, "alice")).unwrap(), "oauth:alice");

    // A per-issuer setting also in postgresql.conf would be ignored: logins are refused instead.
    std::fs::write(&file, &good).unwrap();
    pg.sql("ALTER SYSTEM SET gprxy.required_claims = 'team = db'");
    pg.sql("SELECT pg_reload_conf()");
    assert!(pg.wait_for_log("parameter \"gprxy.required_claims\" changed", std::time::Duration::from_secs(5)));
    assert!(login("alice", &a, &token(&a, "db-a", &ka, "alice")).is_err());
    let refused = last_audit();
    assert!(
        refused.contains("refused reason=config") && refused.contains("gprxy.required_claims also set"),
        "{refused}"
    );
}

/// An issuers file that cannot be read when the server starts leaves no issuer trusted: every
/// login is refused with the file's error, never judged by the one-issuer settings instead.
#[test]
fn a_broken_issuers_file_at_start_refuses_every_login() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let pg = validator_cluster("db")
        .conf("gprxy.issuers_file = '/nonexistent/issuers.toml'")
        .hba(format!("host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m", idp.issuer()))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN");
    let token = key.token(json!({"typ": "at+jwt"}), &idp.claims("alice", "db"));
    idp.hand_out("c1", &token);
    assert!(oauth_psql(pg.port(), "alice", &idp.issuer(), "c1", "SELECT 1").is_err());
    let audit = pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned();
    assert!(audit.contains("refused reason=config"), "{audit}");
    assert!(
        audit.contains("gprxy.issuers_file: refused, so no issuer is trusted: /nonexistent/issuers.toml: No such file or directory"),
        "{audit}"
    );
}

/// One mapping of a process (/proc/<pid>/smaps): whether it maps the validator's library file,
/// its permissions, size, resident size and anonymous huge pages, in KiB.
#[derive(Debug, Default)]
struct Mapping {
    library: bool,
    perms: String,
    size: u64,
    rss: u64,
    anon_huge: u64,
}

fn mappings(pid: i32) -> Vec<Mapping> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("the backend's smaps");
    let mut found: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && first.split('-').all(|h| u64::from_str_radix(h, 16).is_ok()) {
            let perms = fields.next().unwrap_or_default().to_owned();
            found.push(Mapping {
                library: line.ends_with("/gprxy_validator.so"),
                perms,
                ..Mapping::default()
            });
        } else if let Some(m) = found.last_mut() {
            let kib = || fields.clone().next().and_then(|v| v.parse().ok()).expect("a size in kB");
            match first {
                "Size:" => m.size = kib(),
                "Rss:" => m.rss = kib(),
                "AnonHugePages:" => m.anon_huge = kib(),
                _ => {}
            }
        }
    }
    found
}

/// Logs `token` in as alice over the wire protocol and returns, from inside the session, its
/// backend's mappings and the faults it took.
fn backend_after_login(s: &Setup, token: &str) -> (Vec<Mapping>, u64) {
    use gprxy_tests::pgwire::{connect, Auth};
    let conn = connect(([127, 0, 0, 1], s.pg.port()).into(), "alice", "postgres", Auth::Bearer(token))
        .expect("token login");
    let (pid, _) = conn.key.expect("BackendKeyData");
    let seen = (mappings(pid), gprxy_tests::machine::minor_faults(pid));
    conn.close();
    seen
}

/// The KiB the postmaster's log says it kept resident.
fn kept_kib(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("KiB of code and constants kept in memory backends inherit, in 2 MiB pages"))
        .unwrap_or_else(|| panic!("no resident-code line in the log:\n{log}"));
    let before = line.split(" KiB of code").next().expect("line");
    before.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("KiB")
}

#[test]
fn backends_run_the_validators_code_from_memory_the_postmaster_kept() {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").expect("THP mode");
    assert!(
        thp.contains("[madvise]") || thp.contains("[always]"),
        "this test needs transparent huge pages (madvise or always): {thp}"
    );
    let on = setup_with("map=m", &["gprxy.resident_code = on"], &["m alice alice"]);
    let t = on.token(on.idp.claims("alice", AUD));
    backend_after_login(&on, &t); // the first login fetches the keys
    let (maps, faults_on) = backend_after_login(&on, &t);
    let kept = kept_kib(&on.pg.log());
    // The library's code is 6 MB: at least three of its 2 MiB blocks, and its constants' first.
    assert!(kept >= 4 * 2048, "kept only {kept} KiB");
    let huge: u64 = maps.iter().filter(|m| !m.library).map(|m| m.anon_huge).sum();
    assert!(huge >= kept, "the backend inherited {huge} KiB of huge pages, the postmaster kept {kept}");
    // No code is left a file mapping (its last part shares a huge page with the gap after it);
    // what may be is less than a 2 MiB block of constants.
    let code: Vec<_> = maps.iter().filter(|m| m.library && m.perms.contains('x')).collect();
    assert!(code.is_empty(), "code still mapped from the file: {code:?}");
    let read_only = |m: &&Mapping| m.library && m.perms.starts_with('r') && !m.perms.contains('w');
    let biggest = maps.iter().filter(read_only).map(|m| m.size).max().unwrap_or(0);
    assert!(biggest < 2048, "a read-only file mapping of {biggest} KiB is left: {maps:?}");
    drop(on);

    // Off is the default (#27): the postmaster's mappings are left as the loader made them.
    let off = setup();
    let t = off.token(off.idp.claims("alice", AUD));
    backend_after_login(&off, &t);
    let (maps, faults_off) = backend_after_login(&off, &t);
    assert!(!off.pg.log().contains("kept in memory backends inherit"), "copied without being asked");
    let code: Vec<_> = maps.iter().filter(|m| m.library && m.perms.contains('x')).collect();
    assert!(
        code.len() == 1 && code[0].size >= 3 * 2048 && code[0].rss > 0,
        "with the setting off the code is one file mapping the backend faulted in: {code:?}"
    );
    assert!(
        faults_on < faults_off,
        "a login with the code kept took {faults_on} page faults, without {faults_off}"
    );
}

/// Two issuers whose pg_hba lines can reach one role, with plain identities: the second's `alice`
/// would be the first's to pg_ident and to every policy written on gprxy.identity(). A `+group`
/// line reaches only the group's members (resolved in the catalog, as PostgreSQL does); once
/// the role joins the group, the login is refused with its own reason and no backend runs as
/// the role; the DBA's `gprxy.shared_subject_namespace` says the two are one namespace.
#[test]
fn two_issuers_reaching_one_role_with_plain_identities_are_refused() {
    let (ka, kb) = (TestKey::rsa("a"), TestKey::rsa("b"));
    let (a, b) = (TestIssuer::start(&[&ka]), TestIssuer::start(&[&kb]));
    let pg = validator_cluster("db")
        .hba(format!(
            "host all +contractors 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m",
            b.issuer()
        ))
        .hba(format!("host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m", a.issuer()))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE contractors NOLOGIN; CREATE EXTENSION gprxy_validator");
    let login = |idp: &TestIssuer, key: &TestKey| {
        let token = key.token(json!({"typ": "at+jwt"}), &idp.claims("alice", "db"));
        let client = format!("c{}", gprxy_core::fingerprint(token.as_bytes()));
        idp.hand_out(&client, &token);
        oauth_psql(pg.port(), "alice", &idp.issuer(), &client, "SELECT system_user")
    };
    let last_audit =
        || pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned();

    // B's line reaches contractors' members only; alice is not one.
    assert_eq!(login(&a, &ka).unwrap(), "oauth:alice");

    pg.sql("GRANT contractors TO alice");
    let err = login(&b, &kb).unwrap_err();
    assert!(err.contains(REFUSED), "{err}");
    let audit = last_audit();
    assert!(audit.contains("refused reason=issuers_share_role role=\"alice\" authn_id=\"alice\""), "{audit}");
    assert!(
        audit.contains(&format!(
            "detail=\"role \\\"alice\\\" is also reached with plain identities by issuer \\\"{}\\\" (see gprxy.shared_subject_namespace)\"",
            a.issuer()
        )),
        "{audit}"
    );
    // From the server's side: no backend ever ran as alice for it.
    assert_eq!(pg.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice'"), "0");

    pg.sql("ALTER SYSTEM SET gprxy.shared_subject_namespace = on");
    pg.sql("SELECT pg_reload_conf()");
    assert!(pg.wait_for_log(
        "parameter \"gprxy.shared_subject_namespace\" changed",
        std::time::Duration::from_secs(5)
    ));
    assert_eq!(login(&b, &kb).unwrap(), "oauth:alice");
}

/// #30 item 1: pg_hba.conf's `issuer` may be "a well-known URI that points directly to" the
/// discovery document. psql 18's device flow completes, and gprxy fetches that document as it is
/// (not `.../.well-known/openid-configuration/.well-known/...`), takes the issuer it names and
/// compares tokens' `iss` with it; an issuers-file entry written in the other form is found.
#[test]
fn a_well_known_issuer_url_on_the_pg_hba_line_is_that_documents_issuer() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let wk = format!("{}/.well-known/openid-configuration", idp.issuer());
    let pg = validator_cluster("db")
        .hba(format!("host all alice 127.0.0.1/32 oauth issuer=\"{wk}\" scope=\"openid\" map=m"))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE EXTENSION gprxy_validator");
    let login = |claims: serde_json::Value| {
        let token = key.token(json!({"typ": "at+jwt"}), &claims);
        let client = format!("c{}", gprxy_core::fingerprint(token.as_bytes()));
        idp.hand_out(&client, &token);
        oauth_psql(pg.port(), "alice", &wk, &client, "SELECT system_user, gprxy.claim('iss')")
    };
    let last_audit =
        || pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned();
    assert_eq!(login(idp.claims("alice", "db")).unwrap(), format!("oauth:alice|{}", idp.issuer()));
    assert!(last_audit().contains("authorized reason=ok"), "{}", last_audit());
    // A token naming the URL itself as its issuer is not that issuer's.
    let mut wrong = idp.claims("alice", "db");
    wrong["iss"] = json!(wk);
    assert!(login(wrong).is_err());
    assert!(last_audit().contains("refused reason=iss_mismatch"), "{}", last_audit());

    // The same issuer in an issuers file, written as its plain issuer: the entry is found.
    let file = pg.data_dir().join("issuers.toml");
    std::fs::write(&file, format!("[[issuer]]\nissuer = \"{}\"\naudience = [\"files-aud\"]\n", idp.issuer()))
        .unwrap();
    pg.sql(&format!("ALTER SYSTEM SET gprxy.issuers_file = '{}'", file.display()));
    pg.sql("ALTER SYSTEM SET gprxy.audience = ''");
    pg.sql("SELECT pg_reload_conf()");
    assert!(pg.wait_for_log("parameter \"gprxy.issuers_file\" changed", std::time::Duration::from_secs(5)));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while login(idp.claims("alice", "files-aud")).is_err() {
        assert!(std::time::Instant::now() < deadline, "the entry never applied: {}", last_audit());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(login(idp.claims("alice", "db")).is_err());
    assert!(last_audit().contains("refused reason=aud_mismatch"), "{}", last_audit());
}
