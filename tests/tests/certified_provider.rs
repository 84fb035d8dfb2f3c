//! gprxy against a real, OpenID Certified provider: panva's `oidc-provider` 9.13.3
//! (tests/provider), configured as README's Identity-provider notes say (RFC 9068 JWT access
//! tokens through a default resource, opaque tokens for another resource, rotating refresh
//! tokens). The validator on PostgreSQL 18 (psql 18's device flow, client credentials, refresh,
//! introspection and revocation, key rotation, sql/'s row-level security on the claims),
//! pass-through with the relay and the bridge, fallback mode on PostgreSQL 15, `gprxy login` /
//! `gprxy token`, and the interop gaps of #30 (the well-known issuer form, `--resource`,
//! `introspection_unsupported_token`, `identity_fallback_claim`). Each test also checks that no
//! token reached a log. Node or the module missing fails these tests; they never skip.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gprxy_tests::pgwire::{self, Auth, PgConn, PgError};
use gprxy_tests::provider::{
    config_dir, default_config, holds_a_jwt, jwt_claims, jwt_header, psql18_device_login,
    psql18_device_login_at, run_device_client, Provider, ACME, AUDIENCE, CLI_CLIENT, INTROSPECTION_CLIENT,
    INTROSPECTION_SECRET, JWT_RESOURCE, OPAQUE_RESOURCE, PSQL_CLIENT, SVC_CLIENT,
};
use gprxy_tests::proxy::{context_conf, gprxy_bin, ContextKeyFile, FallbackSetup, Proxy};
use gprxy_tests::{apply_sql_file, require_validator, validator_cluster, Cluster, PgVersion, TestCerts};

const REFUSED: &str = "OAuth bearer authentication failed for user";

/// PostgreSQL 18 with gprxy_validator preloaded, every loopback login OAuth from the provider
/// (scope `openid db:read`), alice, bob and svc mapped to roles of the same name.
fn validator(idp: &Provider, conf: &[&str]) -> Cluster {
    let mut b = validator_cluster(AUDIENCE)
        .hba(format!(
            "host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
            idp.issuer()
        ))
        .ident("m alice alice")
        .ident("m bob bob")
        .ident("m svc svc");
    for c in conf {
        b = b.conf(*c);
    }
    let pg = b.start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN; CREATE ROLE svc LOGIN; CREATE EXTENSION gprxy_validator");
    pg
}

fn bearer(pg: &Cluster, user: &str, token: &str) -> Result<PgConn, PgError> {
    pgwire::connect(SocketAddr::from(([127, 0, 0, 1], pg.port())), user, "postgres", Auth::Bearer(token))
}

fn scalar(c: &mut PgConn, sql: &str) -> String {
    c.scalar(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}")).unwrap_or_default()
}

fn last_audit(pg: &Cluster) -> String {
    pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned()
}

/// Logs in as `user` with `token` and expects a refusal with `reason` (and a detail starting
/// with `detail`, when given); neither the token nor its payload is in the server log.
fn refused(pg: &Cluster, user: &str, token: &str, reason: &str, detail: Option<&str>) {
    let audits = pg.log().matches("gprxy: oauth login").count();
    let err =
        bearer(pg, user, token).err().unwrap_or_else(|| panic!("login as {user} must be refused ({reason})"));
    assert_eq!(err.message, format!("{REFUSED} \"{user}\""), "{err:?}");
    assert_eq!(pg.log().matches("gprxy: oauth login").count(), audits + 1, "one audit line per attempt");
    let line = last_audit(pg);
    assert!(line.contains(&format!("oauth login refused reason={reason} ")), "expected {reason}: {line}");
    if let Some(d) = detail {
        assert!(line.contains(&format!("detail=\"{d}")), "expected detail {d:?}: {line}");
    }
    no_token_in(&pg.log(), token, "server log");
}

fn no_token_in(log: &str, token: &str, what: &str) {
    assert!(!log.contains(token), "a token is in the {what}");
    if let Some(payload) = token.split('.').nth(1) {
        assert!(!log.contains(payload), "a token's payload is in the {what}");
    }
    assert!(!holds_a_jwt(log), "something like a JWT is in the {what}");
}

#[test]
fn psql18_device_flow_logs_in_through_the_validator_with_the_providers_claims() {
    let idp = Provider::start();
    let pg = validator(&idp, &[]);
    let out = psql18_device_login(
        &idp,
        "alice",
        &format!("host=127.0.0.1 port={} user=alice dbname=postgres", pg.port()),
        "SELECT current_user, system_user, gprxy.subject(), gprxy.claim('aud'), gprxy.claims()->>'iss', \
         gprxy.claims()->'roles'->>0, gprxy.claim('tenant_id'), gprxy.claim('client_id'), gprxy.claim('scope')",
    )
    .unwrap_or_else(|e| panic!("psql 18 failed:\n{e}\n{}", pg.log()));
    assert_eq!(
        out,
        format!("alice|oauth:alice|alice|db|{}|writer|{ACME}|{PSQL_CLIENT}|db:read", idp.issuer())
    );
    let line = last_audit(&pg);
    assert!(line.contains("oauth login authorized reason=ok role=\"alice\" authn_id=\"alice\""), "{line}");
    assert!(line.contains("alg=\"RS256\""), "{line}");
    assert!(!holds_a_jwt(&pg.log()), "a token is in the server log");

    // The provider's user signed in as bob: pg_ident refuses bob as alice.
    let err = psql18_device_login(
        &idp,
        "bob",
        &format!("host=127.0.0.1 port={} user=alice dbname=postgres", pg.port()),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(err.contains(&format!("{REFUSED} \"alice\"")), "{err}");
    assert!(
        pg.log().contains("no match in usermap \"m\" for user \"alice\" authenticated as \"bob\""),
        "{}",
        pg.log()
    );
}

#[test]
fn client_credentials_and_refreshed_tokens_log_in_through_the_validator() {
    let idp = Provider::start();
    let pg = validator(&idp, &[]);
    // Client credentials: a JWT whose sub is the client id (RFC 9068).
    let t = idp.client_credentials(None);
    assert_eq!(jwt_header(&t)["typ"], "at+jwt");
    let claims = jwt_claims(&t);
    assert_eq!(
        (claims["sub"].as_str(), claims["aud"].as_str()),
        (Some(SVC_CLIENT), Some(AUDIENCE)),
        "{claims}"
    );
    let mut c = bearer(&pg, "svc", &t).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log()));
    assert_eq!(
        scalar(&mut c, "SELECT current_user || '|' || system_user || '|' || gprxy.claim('client_id') || '|' || (gprxy.claims()->'roles'->>0)"),
        "svc|oauth:svc|svc|reader"
    );
    c.close();

    // A device login's refresh token gets a new JWT (the granted resource), rotated.
    let first = idp.device_tokens(CLI_CLIENT, "bob", &[]);
    let rt1 = first["refresh_token"].as_str().expect("a refresh token");
    let (status, second) = idp.refresh(CLI_CLIENT, rt1);
    assert_eq!(status, 200, "{second}");
    let rt2 = second["refresh_token"].as_str().expect("a rotated refresh token");
    assert_ne!(rt1, rt2, "the refresh token rotates");
    let at2 = second["access_token"].as_str().unwrap();
    assert_ne!(first["access_token"], second["access_token"]);
    assert_eq!(jwt_claims(at2)["aud"], AUDIENCE, "the refreshed token is a JWT for the database");
    let mut c = bearer(&pg, "bob", at2).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log()));
    assert_eq!(scalar(&mut c, "SELECT current_user || '|' || gprxy.subject()"), "bob|bob");
    c.close();
    // The first refresh token was used: replaying it is refused and ends the grant.
    let (status, replay) = idp.refresh(CLI_CLIENT, rt1);
    assert_eq!((status, replay["error"].as_str()), (400, Some("invalid_grant")), "{replay}");
    let (status, after) = idp.refresh(CLI_CLIENT, rt2);
    assert_eq!((status, after["error"].as_str()), (400, Some("invalid_grant")), "{after}");

    let log = pg.log();
    no_token_in(&log, &t, "server log");
    no_token_in(&log, at2, "server log");
}

/// The validator with an issuers file for the provider: `tokens = mode`, introspection as the
/// `gprxy` client with its secret in a file, `extra` lines for the entry.
fn with_issuers_file(pg: &Cluster, idp: &Provider, name: &str, mode: &str, extra: &str) {
    let secret = pg.data_dir().join("introspection-secret");
    std::fs::write(&secret, format!("{INTROSPECTION_SECRET}\n")).unwrap();
    let file = pg.data_dir().join(name);
    let mut text = format!(
        "[[issuer]]\nissuer = \"{}\"\naudience = [\"{AUDIENCE}\"]\ntokens = \"{mode}\"\n{extra}\n",
        idp.issuer()
    );
    if mode != "jwt" {
        text.push_str(&format!(
            "\n[issuer.introspection]\nclient_id = \"{INTROSPECTION_CLIENT}\"\nclient_secret_file = \"{}\"\n\
             cache_ttl_max_secs = 1\ninactive_ttl_secs = 1\n",
            secret.display()
        ));
    }
    std::fs::write(&file, text).unwrap();
    pg.sql(&format!("ALTER SYSTEM SET gprxy.issuers_file = '{}'", file.display()));
    pg.sql("SELECT pg_reload_conf()");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pg.log().contains(&format!("parameter \"gprxy.issuers_file\" changed to \"{}\"", file.display())) {
        assert!(std::time::Instant::now() < deadline, "the reload was not seen:\n{}", pg.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn introspection_cluster(idp: &Provider) -> Cluster {
    require_validator(PgVersion::V18);
    let pg = validator_cluster("")
        .hba(format!(
            "host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
            idp.issuer()
        ))
        .ident("m alice alice")
        .ident("m svc svc")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE svc LOGIN; CREATE EXTENSION gprxy_validator");
    pg
}

#[test]
fn opaque_tokens_are_introspected_then_revoked_and_refused() {
    let idp = Provider::start();
    let pg = introspection_cluster(&idp);
    with_issuers_file(&pg, &idp, "issuers.toml", "introspect", "");

    // A user's opaque token (device flow for the opaque resource): identity from sub.
    let user = idp.device_tokens(PSQL_CLIENT, "alice", &[("resource", OPAQUE_RESOURCE)]);
    let alice = user["access_token"].as_str().unwrap().to_owned();
    assert_eq!(alice.split('.').count(), 1, "an opaque token");
    let mut c = bearer(&pg, "alice", &alice).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log()));
    assert_eq!(
        scalar(&mut c, "SELECT system_user || '|' || gprxy.identity() || '|' || gprxy.claim('client_id') || '|' || (gprxy.claims()->'roles'->>0)"),
        format!("oauth:alice|alice|{PSQL_CLIENT}|writer")
    );
    c.close();
    assert!(last_audit(&pg).contains(" alg=\"-\" "), "{}", last_audit(&pg));
    assert_eq!(idp.introspection_requests(), 1);

    // A client-credentials opaque token: the answer has client_id and no sub.
    let svc = idp.client_credentials(Some(OPAQUE_RESOURCE));
    assert_eq!(svc.split('.').count(), 1, "an opaque token");
    refused(&pg, "svc", &svc, "identity_missing", None);
    // #30 item 3: the entry names client_id as the identity when sub is absent.
    with_issuers_file(
        &pg,
        &idp,
        "issuers-fallback.toml",
        "introspect",
        "identity_fallback_claim = \"client_id\"",
    );
    let mut c = bearer(&pg, "svc", &svc).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log()));
    assert_eq!(scalar(&mut c, "SELECT current_user || '|' || gprxy.identity()"), "svc|svc");
    c.close();
    // The user's token still names the user by sub.
    bearer(&pg, "alice", &alice).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log())).close();

    // Revoked at the provider (RFC 7009, each by its own client): refused once the kept answers
    // are older than cache_ttl_max_secs.
    idp.revoke_svc_token(&svc);
    let (status, body) =
        idp.post("/token/revocation", None, &[("token", &alice), ("client_id", PSQL_CLIENT)]);
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(1200));
    refused(&pg, "svc", &svc, "token_inactive", Some("the issuer says the token is not active"));
    refused(&pg, "alice", &alice, "token_inactive", Some("the issuer says the token is not active"));
    let log = pg.log();
    assert!(!log.contains(INTROSPECTION_SECRET), "the introspection secret is in the server log");
    no_token_in(&log, &svc, "server log");
    no_token_in(&log, &alice, "server log");
}

#[test]
fn jwt_introspect_against_a_provider_that_does_not_introspect_jwts_has_its_own_reason() {
    let idp = Provider::start();
    let pg = introspection_cluster(&idp);
    with_issuers_file(&pg, &idp, "issuers.toml", "jwt+introspect", "");
    let t = idp.client_credentials(None);
    // The provider itself answers 400 unsupported_token_type for a JWT.
    let (status, body) = idp.post(
        "/token/introspection",
        Some((INTROSPECTION_CLIENT, INTROSPECTION_SECRET)),
        &[("token", &t)],
    );
    assert_eq!((status, body["error"].as_str()), (400, Some("unsupported_token_type")), "{body}");
    // #30 item 2: gprxy names it.
    refused(
        &pg,
        "svc",
        &t,
        "introspection_unsupported_token",
        Some("the introspection endpoint does not introspect this kind of token (unsupported_token_type)"),
    );
    // With tokens = "jwt" the same token logs in.
    with_issuers_file(&pg, &idp, "issuers-jwt.toml", "jwt", "");
    bearer(&pg, "svc", &t).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log())).close();
}

#[test]
fn key_rotation_costs_one_jwks_request_per_new_key() {
    // The key set also holds an encryption key, which gprxy passes over.
    let mut config = default_config();
    config["encryption_key"] = serde_json::json!(true);
    let idp = Provider::start_with(config);
    let published = gprxy_tests::provider::http("GET", &format!("{}/jwks", idp.issuer()), &[], None);
    assert!(published.body.contains("\"use\":\"enc\""), "{}", published.body);
    let pg = validator(&idp, &["gprxy.jwks_unknown_kid_cooldown = 1"]);
    let login = |t: &str| {
        let mut c = bearer(&pg, "svc", t).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log()));
        let v = scalar(&mut c, "SELECT gprxy.subject() || '|' || (gprxy.claims()->'roles'->>0) || '|' || gprxy.claim('tenant_id')");
        c.close();
        assert_eq!(v, format!("svc|reader|{ACME}"));
    };
    let t1 = idp.client_credentials(None);
    assert_eq!(jwt_header(&t1)["kid"], "rs256-1");
    login(&t1);
    login(&t1);
    let base = idp.jwks_requests();
    assert_eq!(base, 2, "one key-set request for the first logins (and this test's own)");

    for (alg, n) in [("ES256", 1), ("EdDSA", 2)] {
        std::thread::sleep(Duration::from_millis(1100)); // past the unknown-kid cooldown
        let kid = idp.rotate(alg);
        let t = idp.client_credentials(None);
        assert_eq!(
            (jwt_header(&t)["kid"].as_str(), jwt_header(&t)["alg"].as_str()),
            (Some(kid.as_str()), Some(alg))
        );
        login(&t);
        login(&t);
        assert_eq!(idp.jwks_requests(), base + n, "one refetch for the unknown kid {kid}");
        let line = last_audit(&pg);
        assert!(line.contains(&format!("kid=\"{kid}\" alg=\"{alg}\"")), "{line}");
    }
    // The first key is still published and still cached: its token still logs in, no request.
    login(&t1);
    assert_eq!(idp.jwks_requests(), base + 2);
    no_token_in(&pg.log(), &t1, "server log");
}

fn psql15(port: u16, options: &str, password: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(PgVersion::V15.bin("psql"))
        .args(["-X", "-A", "-t", "-c", sql])
        .arg(format!("host=localhost hostaddr=127.0.0.1 port={port} dbname=postgres {options}"))
        .env("PGPASSWORD", password)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn passthrough_relays_psql18_device_flow_and_bridges_client_credentials_tokens() {
    let idp = Provider::start();
    let pg = validator(&idp, &[]);
    let certs = TestCerts::new();
    let proxy_with = |extra: &str| {
        Proxy::start(&format!(
            "upstream = \"127.0.0.1:{}\"\n{extra}[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            pg.port(),
            certs.cert_path.display(),
            certs.key_path.display()
        ))
    };
    let tls = format!("sslmode=verify-full sslrootcert={}", certs.ca_path.display());
    // psql 18's device flow, relayed (a bridging proxy would ask psql for a password instead).
    let relay = proxy_with("");
    let out = psql18_device_login(
        &idp,
        "alice",
        &format!("host=localhost hostaddr=127.0.0.1 port={} user=alice dbname=postgres {tls}", relay.port),
        "SELECT current_user, system_user, gprxy.claim('tenant_id')",
    )
    .unwrap_or_else(|e| panic!("psql 18 through gprxy failed:\n{e}\n{}", relay.log()));
    assert_eq!(out, format!("alice|oauth:alice|{ACME}"));
    let relayed = relay.wait_events("login", 2);
    assert!(
        relayed.iter().any(|e| e["outcome"] == "success" && e["mechanism"] == "OAUTHBEARER"),
        "{relayed:#?}"
    );
    assert!(!holds_a_jwt(&relay.log()), "a token is in the proxy log");
    let proxy = proxy_with("[bridge]\ntoken_as_password = true\n");
    // A client-credentials token as psql 15's password, bridged to OAUTHBEARER.
    let t = idp.client_credentials(None);
    assert_eq!(
        psql15(proxy.port, &format!("user=svc {tls}"), &t, "SELECT current_user, gprxy.subject()").unwrap(),
        "svc|svc"
    );
    let events = proxy.wait_events("login", 1);
    assert!(
        events.iter().any(|e| e["outcome"] == "success" && e["user"] == "svc" && e["token_sub"] == "svc"),
        "{events:#?}"
    );
    // A refused bridge login: a token of the provider for svc, as another user.
    let err = psql15(proxy.port, &format!("user=alice {tls}"), &t, "SELECT 1").unwrap_err();
    assert!(err.contains(&format!("{REFUSED} \"alice\"")), "{err}");
    no_token_in(&proxy.log(), &t, "proxy log");
    no_token_in(&pg.log(), &t, "server log");
}

#[test]
fn fallback_on_15_takes_the_providers_tokens_as_passwords() {
    let idp = Provider::start();
    require_validator(PgVersion::V15);
    let certs = TestCerts::new();
    let context_key = ContextKeyFile::create(certs.dir().join("context.key"));
    let mut b =
        Cluster::builder(PgVersion::V15).hba("host all app_writer,app_reader 127.0.0.1/32 scram-sha-256");
    for line in context_conf(&[&context_key.public]) {
        b = b.conf(line);
    }
    let pg = b.start();
    pg.sql("CREATE EXTENSION gprxy_validator");
    apply_sql_file(&pg, "postgres", "01_roles.sql");
    apply_sql_file(&pg, "postgres", "05_signed_context.sql");
    pg.sql("SET password_encryption = 'scram-sha-256'; ALTER ROLE app_writer PASSWORD 'writer-secret-1'; ALTER ROLE app_reader PASSWORD 'reader-secret-1'");
    let p = |n: &str| certs.dir().join(n);
    std::fs::write(p("writer.pw"), "writer-secret-1\n").unwrap();
    std::fs::write(p("reader.pw"), "reader-secret-1\n").unwrap();
    let (wpw, rpw) = (p("writer.pw"), p("reader.pw"));
    let fallback_at = |issuer: &str, extra: &str| {
        Proxy::start(
            &FallbackSetup {
                upstream_port: pg.port(),
                cert: &certs.cert_path,
                key: &certs.key_path,
                issuer,
                audience: AUDIENCE,
                rules: &[("writer", "app_writer", &wpw), ("reader", "app_reader", &rpw)],
                context_key: Some(&context_key.path),
                extra,
            }
            .toml(),
        )
    };
    let fallback = |extra: &str| fallback_at(&idp.issuer(), extra);
    let proxy = fallback("");
    let tls = format!("sslmode=verify-full sslrootcert={}", certs.ca_path.display());
    let sql = "SELECT current_user, current_setting('app.user_id'), current_setting('app.roles'), gprxy.identity(), gprxy.claim('tenant_id')";
    // Client credentials: the client is the identity (sub), its roles map to app_reader.
    let svc = idp.client_credentials(None);
    assert_eq!(
        psql15(proxy.port, &format!("user=svc {tls}"), &svc, sql).unwrap(),
        format!("app_reader|svc|reader|svc|{ACME}")
    );
    // A user's token from the device flow: alice, a writer.
    let alice = idp.device_tokens(CLI_CLIENT, "alice", &[])["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        psql15(proxy.port, &format!("user=alice {tls}"), &alice, sql).unwrap(),
        format!("app_writer|alice|writer|alice|{ACME}")
    );
    // Refusals with their reasons: another user's name; an opaque token (this issuer's entry
    // validates JWTs; an opaque token names no issuer).
    let err = psql15(proxy.port, &format!("user=alice {tls}"), &svc, "SELECT 1").unwrap_err();
    assert!(err.contains("gprxy: user name \"alice\" does not match the token"), "{err}");
    let opaque = idp.client_credentials(Some(OPAQUE_RESOURCE));
    let err = psql15(proxy.port, &format!("user=svc {tls}"), &opaque, "SELECT 1").unwrap_err();
    assert!(err.contains("FATAL:  gprxy: token refused (iss_missing): token has no \"iss\" claim"), "{err}");
    // psql 18's device flow into fallback mode (OAUTHBEARER with gprxy's discovery answer).
    let bearer_proxy = fallback("client_auth = \"oauthbearer\"\nscope = \"openid db:read\"");
    let out = psql18_device_login(
        &idp,
        "bob",
        &format!(
            "host=localhost hostaddr=127.0.0.1 port={} user=bob dbname=postgres {tls}",
            bearer_proxy.port
        ),
        sql,
    )
    .unwrap_or_else(|e| panic!("psql 18 into fallback failed:\n{e}\n{}", bearer_proxy.log()));
    assert_eq!(out, format!("app_reader|bob|reader|bob|{ACME}"));
    let events = bearer_proxy.wait_events("login", 2);
    assert!(
        events.iter().any(|e| e["outcome"] == "success" && e["mechanism"] == "OAUTHBEARER"),
        "{events:#?}"
    );
    assert!(!holds_a_jwt(&bearer_proxy.log()), "a token is in the proxy log");
    // #30 item 1: fallback's issuer written as the provider's well-known URL; psql 18 is sent
    // that URL by the discovery answer and completes its device flow.
    let wk = format!("{}/.well-known/openid-configuration", idp.issuer());
    let wk_proxy = fallback_at(&wk, "client_auth = \"oauthbearer\"\nscope = \"openid db:read\"");
    let out = psql18_device_login_at(
        &idp,
        &wk,
        "alice",
        &format!("host=localhost hostaddr=127.0.0.1 port={} user=alice dbname=postgres {tls}", wk_proxy.port),
        sql,
    )
    .unwrap_or_else(|e| panic!("psql 18 into fallback (well-known issuer) failed:\n{e}\n{}", wk_proxy.log()));
    assert_eq!(out, format!("app_writer|alice|writer|alice|{ACME}"));
    assert!(!holds_a_jwt(&wk_proxy.log()), "a token is in the proxy log");
    let log = proxy.log();
    for t in [&svc, &alice, &opaque] {
        no_token_in(&log, t, "proxy log");
        no_token_in(&pg.log(), t, "server log");
    }
}

struct Cli {
    dir: tempfile::TempDir,
}

impl Cli {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(gprxy_bin())
            .args(args)
            .env("GPRXY_CONFIG_DIR", config_dir(self.dir.path()))
            .output()
            .unwrap()
    }

    fn credentials(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(config_dir(self.dir.path()).join("credentials.json")).unwrap())
            .unwrap()
    }
}

fn cli_login(idp: &Provider, account: &str, dir: &Path) -> (bool, String) {
    cli_login_with(idp, account, dir, &[])
}

fn cli_login_with(idp: &Provider, account: &str, dir: &Path, extra: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(gprxy_bin());
    cmd.args([
        "login",
        "--issuer",
        &idp.issuer(),
        "--client-id",
        CLI_CLIENT,
        "--insecure-allow-http-loopback",
    ])
    .args(["--scope", "openid offline_access db:read"])
    .args(extra)
    .env("GPRXY_CONFIG_DIR", config_dir(dir));
    let (ok, _, err) = run_device_client(cmd, "", "and enter the code", idp, account);
    (ok, err)
}

#[test]
fn gprxy_login_and_gprxy_token_rotate_refresh_tokens() {
    let idp = Provider::start();
    let pg = validator(&idp, &[]);
    let cli = Cli { dir: tempfile::tempdir().unwrap() };
    let (ok, err) = cli_login(&idp, "alice", cli.dir.path());
    assert!(ok, "gprxy login failed:\n{err}\n{}", idp.log());
    assert!(err.contains(&format!("To log in, open {}/device and enter the code ", idp.issuer())), "{err}");
    let stored = cli.credentials();
    let at1 = stored["access_token"].as_str().unwrap().to_owned();
    let rt1 = stored["refresh_token"].as_str().expect("a refresh token").to_owned();
    assert_eq!(jwt_claims(&at1)["aud"], AUDIENCE, "the default resource gave a JWT");
    assert!(!holds_a_jwt(&err), "the token reached the terminal");

    // Its access tokens live 30 s: gprxy token refreshes every time, and the provider rotates.
    let out = cli.run(&["token"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let at2 = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let rt2 = cli.credentials()["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(at2, at1);
    assert_ne!(rt2, rt1, "the rotated refresh token is stored");
    assert_eq!(jwt_claims(&at2)["sub"], "alice");
    let mut c = bearer(&pg, "alice", &at2).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log()));
    assert_eq!(
        scalar(&mut c, "SELECT current_user || '|' || gprxy.claim('client_id')"),
        format!("alice|{CLI_CLIENT}")
    );
    c.close();

    // A stolen first refresh token, replayed: the provider ends the grant, and gprxy token says
    // to log in again.
    let (status, replay) = idp.refresh(CLI_CLIENT, &rt1);
    assert_eq!((status, replay["error"].as_str()), (400, Some("invalid_grant")), "{replay}");
    let out = cli.run(&["token"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "gprxy: the refresh token was refused by the issuer (invalid_grant): run gprxy login again"
    );
    no_token_in(&pg.log(), &at2, "server log");
}

/// #30 item 1: the pg_hba line's issuer written as the provider's well-known URL, as
/// PostgreSQL 18's documentation allows: psql 18 completes the device flow with that URL as its
/// `oauth_issuer`, gprxy fetches the document as written and compares tokens' `iss` with the
/// issuer it names.
#[test]
fn a_well_known_issuer_url_on_the_pg_hba_line_works_with_the_provider() {
    let idp = Provider::start();
    let wk = format!("{}/.well-known/openid-configuration", idp.issuer());
    let pg = validator_cluster(AUDIENCE)
        .hba(format!("host all all 127.0.0.1/32 oauth issuer=\"{wk}\" scope=\"openid db:read\" map=m"))
        .ident("m alice alice")
        .ident("m svc svc")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE svc LOGIN; CREATE EXTENSION gprxy_validator");
    let out = psql18_device_login_at(
        &idp,
        &wk,
        "alice",
        &format!("host=127.0.0.1 port={} user=alice dbname=postgres", pg.port()),
        "SELECT system_user, gprxy.claim('iss')",
    )
    .unwrap_or_else(|e| panic!("psql 18 failed:\n{e}\n{}", pg.log()));
    assert_eq!(out, format!("oauth:alice|{}", idp.issuer()));
    assert!(last_audit(&pg).contains("authorized reason=ok"), "{}", last_audit(&pg));
    let counts = idp.counts();
    let doubled = "/.well-known/openid-configuration/.well-known/openid-configuration";
    assert_eq!(counts[doubled], serde_json::Value::Null, "the document was not fetched as written: {counts}");
    // A client-credentials token on the same line; another provider's token is not this one's.
    let t = idp.client_credentials(None);
    bearer(&pg, "svc", &t).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log())).close();
    let other = Provider::start();
    let stranger = other.client_credentials(None);
    refused(&pg, "svc", &stranger, "iss_mismatch", None);
    no_token_in(&pg.log(), &t, "server log");
}

/// #30 item 4: a provider configured without a default resource issues opaque access tokens to
/// clients that send no `resource` (psql 18 is refused); `gprxy login --resource` asks for the
/// JWT resource at login and at every refresh, and its tokens log in.
#[test]
fn gprxy_login_resource_gets_jwts_from_a_provider_without_a_default_resource() {
    let mut config = default_config();
    config["default_resource"] = serde_json::json!(false);
    config["use_granted_resource"] = serde_json::json!(false);
    let idp = Provider::start_with(config);
    let pg = validator(&idp, &[]);
    // psql 18 cannot send resource: an opaque token, not a JWT, so the validator refuses it.
    let err = psql18_device_login(
        &idp,
        "alice",
        &format!("host=127.0.0.1 port={} user=alice dbname=postgres", pg.port()),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(err.contains(&format!("{REFUSED} \"alice\"")), "{err}");
    assert!(last_audit(&pg).contains("oauth login refused reason=malformed "), "{}", last_audit(&pg));

    let cli = Cli { dir: tempfile::tempdir().unwrap() };
    let (ok, err) = cli_login_with(&idp, "alice", cli.dir.path(), &["--resource", JWT_RESOURCE]);
    assert!(ok, "gprxy login --resource failed:\n{err}\n{}", idp.log());
    let at1 = cli.credentials()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(jwt_claims(&at1)["aud"], AUDIENCE, "--resource got a JWT for the database");
    // gprxy token refreshes (30 s tokens) and asks for the resource again: a JWT again.
    let out = cli.run(&["token"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let at2 = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_ne!(at2, at1);
    assert_eq!(jwt_claims(&at2)["aud"], AUDIENCE, "the refresh asked for the resource");
    let mut c = bearer(&pg, "alice", &at2).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log()));
    assert_eq!(
        scalar(&mut c, "SELECT current_user || '|' || gprxy.claim('tenant_id')"),
        format!("alice|{ACME}")
    );
    c.close();

    // Without --resource the same provider hands gprxy login an opaque token.
    let plain = Cli { dir: tempfile::tempdir().unwrap() };
    let (ok, err) = cli_login_with(&idp, "alice", plain.dir.path(), &[]);
    assert!(ok, "{err}");
    let opaque = plain.credentials()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(opaque.split('.').count(), 1, "an opaque token without a resource");
    no_token_in(&pg.log(), &at2, "server log");
}

/// sql/'s row-level security on the provider's claims (delegated mode: the `roles` claim picks
/// app_writer or app_reader, `tenant_id` and the identity pick the rows), judged by what each
/// session reads and may write.
#[test]
fn row_level_security_follows_the_providers_claims() {
    const GLOBEX: &str = "22222222-2222-2222-2222-222222222222";
    let mut config = default_config();
    config["accounts"]["bob"]["tenant_id"] = serde_json::json!(GLOBEX);
    let idp = Provider::start_with(config);
    let pg = validator_cluster(AUDIENCE)
        .conf("gprxy.role_claim = 'roles'")
        .conf("gprxy.role_map = 'writer:app_writer, reader:app_reader'")
        .hba(format!(
            "host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" delegate_ident_mapping=1",
            idp.issuer()
        ))
        .start();
    pg.sql("CREATE EXTENSION gprxy_validator");
    for f in ["01_roles.sql", "02_schema.sql", "03_rls_gprxy_claims.sql", "04_demo_data.sql"] {
        apply_sql_file(&pg, "postgres", f);
    }
    let titles = "SELECT string_agg(title, ',' ORDER BY title) FROM posts";
    // alice, a writer at Acme, through psql 18's device flow.
    let out = psql18_device_login(
        &idp,
        "alice",
        &format!("host=127.0.0.1 port={} user=app_writer dbname=postgres", pg.port()),
        &format!("{titles}; SELECT count(*) FROM users"),
    )
    .unwrap_or_else(|e| panic!("psql 18 failed:\n{e}\n{}", pg.log()));
    assert_eq!(out, "acme public,alice private\n2");
    // bob, a reader at Globex, with a token from the device flow driven here.
    let bob = idp.device_tokens(CLI_CLIENT, "bob", &[])["access_token"].as_str().unwrap().to_owned();
    let mut c = bearer(&pg, "app_reader", &bob).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log()));
    assert_eq!(scalar(&mut c, titles), "bob private,globex public");
    c.close();
    // bob's token grants no writer role.
    refused(&pg, "app_writer", &bob, "role_not_granted", None);
    // alice writes as herself only.
    let alice = idp.device_tokens(CLI_CLIENT, "alice", &[])["access_token"].as_str().unwrap().to_owned();
    let mut c = bearer(&pg, "app_writer", &alice).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log()));
    c.query(&format!(
        "INSERT INTO posts (tenant_id, owner_id, title) VALUES ('{ACME}', 'alice', 'new by alice')"
    ))
    .unwrap();
    let e = c
        .query(&format!(
            "INSERT INTO posts (tenant_id, owner_id, title) VALUES ('{ACME}', 'dave', 'new by dave')"
        ))
        .unwrap_err();
    assert_eq!(e.message, "new row violates row-level security policy for table \"posts\"", "{e:?}");
    c.close();
    assert_eq!(
        pg.sql("SELECT string_agg(owner_id, ',' ORDER BY owner_id) FROM posts WHERE title LIKE 'new by %'"),
        "alice"
    );
    no_token_in(&pg.log(), &alice, "server log");
}

/// A key the provider stops publishing: its tokens are refused (`kid_unknown`) once the cached
/// key set has expired and been fetched again; the new key's tokens log in throughout.
#[test]
fn a_retired_key_is_refused_once_the_cached_key_set_expires() {
    let idp = Provider::start();
    let pg = validator(
        &idp,
        &["gprxy.jwks_unknown_kid_cooldown = 1", "gprxy.jwks_cache_ttl = 2", "gprxy.jwks_cache_ttl_min = 1"],
    );
    let old = idp.client_credentials(None);
    bearer(&pg, "svc", &old).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log())).close();
    let kid = idp.rotate("ES256");
    idp.retire_old_keys();
    let published = gprxy_tests::provider::http("GET", &format!("{}/jwks", idp.issuer()), &[], None);
    assert!(!published.body.contains("\"rs256-1\""), "{}", published.body);
    std::thread::sleep(Duration::from_millis(2500));
    refused(&pg, "svc", &old, "kid_unknown", None);
    let new = idp.client_credentials(None);
    assert_eq!(jwt_header(&new)["kid"].as_str(), Some(kid.as_str()));
    bearer(&pg, "svc", &new).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log())).close();
}
