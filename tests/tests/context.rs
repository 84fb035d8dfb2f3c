//! Who may set a signed context (issue 14, item 2): a role that logs in by password and falls
//! under the claim policies (`analyst IN ROLE app_reader`) must not be able to give itself
//! another tenant's claims, on PostgreSQL 15 and 18, directly and through pass-through mode; and
//! the proxy's context key rotates with sessions running.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gprxy_core::context::{ContextKey, ContextSigner, NONCE_PARAMETER};
use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{connect_params, connect_tls, Auth, PgConn, PgError};
use gprxy_tests::proxy::{context_conf, ContextKeyFile, FallbackSetup, Proxy};
use gprxy_tests::{apply_sql_file, require_validator, validator_cluster, Cluster, PgVersion, TestCerts};
use serde_json::json;

const GLOBEX: &str = "22222222-2222-2222-2222-222222222222";
const GLOBEX_USERS: &str =
    "SELECT count(*) FROM users WHERE tenant_id = '22222222-2222-2222-2222-222222222222'";
const NOT_ALLOWED: &str = "gprxy: context refused: session user \"analyst\" is not in gprxy.context_roles";

/// A cluster with sql/'s schema, claim policies, demo rows and signed-context grants, the
/// proxy's key pinned, and `analyst` (password login, member of app_reader).
fn cluster(version: PgVersion, pinned: &[&str]) -> Cluster {
    require_validator(version);
    let hba = "host all analyst,app_admin,app_writer,app_reader 127.0.0.1/32 scram-sha-256";
    let mut b = match version {
        PgVersion::V18 => validator_cluster("db").hba(hba),
        older => Cluster::builder(older).hba(hba),
    };
    for line in context_conf(pinned) {
        b = b.conf(line);
    }
    let pg = b.start();
    pg.sql("CREATE EXTENSION gprxy_validator");
    for f in [
        "01_roles.sql",
        "02_schema.sql",
        "03_rls_gprxy_claims.sql",
        "04_demo_data.sql",
        "05_signed_context.sql",
    ] {
        apply_sql_file(&pg, "postgres", f);
    }
    pg.sql("SET password_encryption = 'scram-sha-256'; CREATE ROLE analyst LOGIN PASSWORD 'analyst-pw-1' IN ROLE app_reader; ALTER ROLE app_reader PASSWORD 'reader-pw-1'; ALTER ROLE app_writer PASSWORD 'writer-pw-1'");
    pg
}

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

fn own_key() -> Arc<ContextKey> {
    Arc::new(ContextKey::from_pem(ContextKey::generate_pem().unwrap().as_bytes()).unwrap())
}

/// The attack: `user` starts a connection with a nonce of its own (and `extra` startup
/// parameters), signs another tenant's claims with `key` and calls set_context. Returns
/// set_context's outcome and how many of the other tenant's users the session then reads.
fn forge(
    at: SocketAddr,
    user: &str,
    password: &str,
    key: Arc<ContextKey>,
    extra: &[(&str, &str)],
) -> (Result<(), PgError>, String) {
    let mut signer = ContextSigner::new(key).unwrap();
    let nonce = signer.nonce().to_owned();
    let mut params = vec![(NONCE_PARAMETER, nonce.as_str())];
    params.extend_from_slice(extra);
    let mut c = connect_params(at, user, "postgres", Auth::Password(password), &params).unwrap();
    signer.bind_backend(c.key.unwrap().0);
    let forged = signer.sign(None, vec![], json!({"tenant_id": GLOBEX}).as_object().cloned().unwrap());
    let outcome = c.query(&format!("SELECT gprxy.set_context('{forged}')")).map(|_| ());
    let rows = c.scalar(GLOBEX_USERS).unwrap().unwrap_or_default();
    (outcome, rows)
}

fn assert_refused(attempt: (Result<(), PgError>, String), message: &str) {
    let (outcome, rows) = attempt;
    let e = outcome.expect_err("a forged context was accepted");
    assert_eq!(e.code.as_deref(), Some("28000"), "{e}");
    assert_eq!(e.message, message);
    assert_eq!(rows, "0", "rows of the other tenant");
}

#[test]
fn a_password_role_cannot_forge_a_context_on_15() {
    let dir = tempfile::tempdir().unwrap();
    let proxy_key = ContextKeyFile::create(dir.path().join("context.key"));
    let pg = cluster(PgVersion::fallback_upstream(), &[&proxy_key.public]);
    let at = addr(pg.port());
    assert_refused(forge(at, "analyst", "analyst-pw-1", own_key(), &[]), NOT_ALLOWED);
    // Even with the proxy's real key (stolen), analyst is not a context role.
    assert_refused(forge(at, "analyst", "analyst-pw-1", proxy_key.key(), &[]), NOT_ALLOWED);
    // Settings in the startup packet (placeholders until the library loads) do not pin a key
    // or allow a role: the SIGHUP settings take only postgresql.conf's values.
    let mine = own_key();
    let options = format!("-c gprxy.context_keys={} -c gprxy.context_roles=analyst", mine.public_key());
    assert_refused(forge(at, "analyst", "analyst-pw-1", mine, &[("options", &options)]), NOT_ALLOWED);
    // A service account may call it, but only with a pinned key.
    assert_refused(
        forge(at, "app_reader", "reader-pw-1", own_key(), &[]),
        "gprxy: context refused: the context signature does not verify against any key in gprxy.context_keys",
    );
}

#[test]
fn a_password_role_cannot_forge_a_context_on_18_directly_or_through_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let proxy_key = ContextKeyFile::create(dir.path().join("context.key"));
    let pg = cluster(PgVersion::V18, &[&proxy_key.public]);
    let at = addr(pg.port());
    assert_refused(forge(at, "analyst", "analyst-pw-1", own_key(), &[]), NOT_ALLOWED);
    let options = format!("-c gprxy.context_keys={}", own_key().public_key());
    let e =
        connect_params(at, "analyst", "postgres", Auth::Password("analyst-pw-1"), &[("options", &options)])
            .err()
            .expect("a startup packet cannot pin a key");
    assert_eq!(e.message, "parameter \"gprxy.context_keys\" cannot be changed now");
    assert_refused(
        forge(at, "app_reader", "reader-pw-1", own_key(), &[]),
        "gprxy: context refused: the context signature does not verify against any key in gprxy.context_keys",
    );

    let certs = TestCerts::new();
    let proxy = Proxy::start(&format!(
        "upstream = \"127.0.0.1:{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        pg.port(),
        certs.cert_path.display(),
        certs.key_path.display()
    ));
    assert_refused(forge(proxy.addr(), "analyst", "analyst-pw-1", own_key(), &[]), NOT_ALLOWED);
    // Pass-through drops the client's gprxy.* parameters: even a service account with a
    // context signed by the pinned key for its connection has no nonce to match.
    assert_refused(
        forge(proxy.addr(), "app_reader", "reader-pw-1", proxy_key.key(), &[]),
        "gprxy: context refused: no gprxy.context_nonce was given at connection start",
    );
    let dropped = proxy.wait_events("startup", 2);
    assert!(
        dropped.iter().all(|e| e["dropped"].as_str().unwrap_or("").contains("gprxy.context_nonce")),
        "{dropped:#?}"
    );
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_context_key_rotates_from_a_to_b_with_sessions_running() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let certs = TestCerts::new();
    let path = certs.dir().join("context.key");
    let a = ContextKeyFile::create(&path);
    let a_key = a.key();
    let pg = cluster(PgVersion::fallback_upstream(), &[&a.public]);
    let pw = certs.dir().join("writer.pw");
    std::fs::write(&pw, "writer-pw-1\n").unwrap();
    let proxy = Proxy::start(
        &FallbackSetup {
            upstream_port: pg.port(),
            cert: &certs.cert_path,
            key: &certs.key_path,
            issuer: &idp.issuer(),
            audience: "db",
            rules: &[("writer", "app_writer", &pw)],
            context_key: Some(&path),
            extra: "",
        }
        .toml(),
    );
    let token = |sub: &str| {
        let mut c = idp.claims(sub, "db");
        c["roles"] = json!(["writer"]);
        c["tenant_id"] = json!(GLOBEX);
        key.token(json!({"typ": "at+jwt"}), &c)
    };
    let login = |sub: &str| -> PgConn {
        connect_tls(proxy.addr(), sub, "postgres", Auth::Password(&token(sub)), &certs.ca).unwrap()
    };
    let subject = |c: &mut PgConn| c.scalar("SELECT gprxy.subject()").unwrap().unwrap_or_default();
    let pin = |keys: &[&str]| {
        let conf = pg.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!("gprxy.context_keys = '{}'\n", keys.join(", ")));
        std::fs::write(&conf, text).unwrap();
        pg.sql("SELECT pg_reload_conf()");
        let want = keys.join(", ");
        wait_until("the reload", || pg.sql("SHOW gprxy.context_keys") == want);
    };

    let mut old = login("alice");
    assert_eq!(subject(&mut old), "alice");

    // 1. Pin A and B. 2. Give the proxy B and reload it. 3. Unpin A.
    let b = ContextKeyFile::create(certs.dir().join("next.key"));
    pin(&[&a.public, &b.public]);
    std::fs::rename(&b.path, &path).unwrap();
    proxy.signal("HUP");
    proxy.wait_events("reload", 1);
    let keys = proxy.wait_events("context_key", 2);
    assert_eq!(keys.last().unwrap()["public_key"], b.public.as_str(), "{keys:#?}");
    let mut new = login("bob");
    assert_eq!(subject(&mut new), "bob");
    assert_eq!(subject(&mut old), "alice", "a session started under key A keeps its context");
    assert_eq!(old.scalar(GLOBEX_USERS).unwrap().as_deref(), Some("2"));

    pin(&[&b.public]);
    let mut after = login("carol");
    assert_eq!(subject(&mut after), "carol");
    assert_eq!(subject(&mut new), "bob");
    new.close();
    after.close();
    old.close();
    // Once A is unpinned, what A signs is refused, even for the connection it names.
    let mut signer = ContextSigner::new(a_key).unwrap();
    let nonce = signer.nonce().to_owned();
    let mut c = connect_params(
        addr(pg.port()),
        "app_writer",
        "postgres",
        Auth::Password("writer-pw-1"),
        &[(NONCE_PARAMETER, &nonce)],
    )
    .unwrap();
    signer.bind_backend(c.key.unwrap().0);
    let ctx = signer.sign(
        Some("mallory".into()),
        vec![],
        json!({"tenant_id": GLOBEX}).as_object().cloned().unwrap(),
    );
    let e = c.query(&format!("SELECT gprxy.set_context('{ctx}')")).unwrap_err();
    assert_eq!(
        e.message,
        "gprxy: context refused: the context signature does not verify against any key in gprxy.context_keys"
    );
    assert_eq!(c.scalar(GLOBEX_USERS).unwrap().as_deref(), Some("0"));

    // With no key pinned every context is refused, and a login through the proxy says why.
    pin(&[]);
    let e = connect_tls(proxy.addr(), "dave", "postgres", Auth::Password(&token("dave")), &certs.ca)
        .err()
        .expect("no key pinned: the session cannot be set up");
    assert_eq!(
        e.message,
        "gprxy: session set-up failed: gprxy: context refused: no context key is pinned (set gprxy.context_keys in postgresql.conf)"
    );
}
