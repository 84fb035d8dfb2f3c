//! `gprxy connect` against a real, OpenID Certified provider: panva's `oidc-provider` 9.13.3
//! (tests/provider, as in certified_provider.rs). Each token source that asks an issuer, client
//! credentials with client_secret_basic, client_secret_post and private_key_jwt (RS256, ES256 and
//! EdDSA keys registered as each client's key set) and `gprxy login`'s stored device-flow login
//! with its rotating refresh token, logs in through the connector to PostgreSQL 18 with
//! gprxy_validator, judged by the identity the server reports and its audit line. The refresh
//! ahead of a token's end is judged by the provider's count of token requests and when they
//! came (short token lifetimes, no fixed waits for what can be waited for). No token or secret
//! reaches the connector's log or an error. Node or the module missing fails these tests; they
//! never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gprxy_tests::connector::{run_gprxy, write_config, Connector};
use gprxy_tests::provider::{
    config_dir, default_config, holds_a_jwt, jwt_claims, run_device_client, Provider, ACME, AUDIENCE,
    CLI_CLIENT, SVC_CLIENT, SVC_SECRET,
};
use gprxy_tests::{validator_cluster, Cluster, PgVersion, TestCerts};
use serde_json::{json, Value};

/// What the server says of the session: the role, the authenticated identity, the token's
/// subject and the client it was issued to.
const WHO: &str = "SELECT current_user, system_user, gprxy.subject(), gprxy.claim('client_id')";
/// A client_secret_post client.
const SVC_POST: &str = "svc-post";
const SVC_POST_SECRET: &str = "svc-post-secret-2b7e19c4a0";
/// private_key_jwt clients, one per signing algorithm.
const KEY_CLIENTS: [(&str, &str); 3] =
    [("RS256", "key-rs256"), ("ES256", "key-es256"), ("EdDSA", "key-eddsa")];
const REFUSED_CLIENT: &str = "the issuer refused the token request: invalid_client (HTTP 401)";

/// The provider (its clients: [`provider_config`]) and PostgreSQL 18 with TLS and
/// gprxy_validator, every loopback login OAuth from the provider: alice as alice, every
/// client-credentials client as svc.
struct World {
    idp: Provider,
    pg: Cluster,
    certs: TestCerts,
    dir: tempfile::TempDir,
}

/// The default provider configuration with svc-post and the private_key_jwt clients whose
/// public keys are `keys` (alg, client id, public key PEM), each with svc's claims.
fn provider_config(keys: &[(&str, &str, String)]) -> Value {
    let mut config = default_config();
    let none: [&str; 0] = [];
    let clients = config["clients"].as_array_mut().unwrap();
    clients.push(json!({ "client_id": SVC_POST, "client_secret": SVC_POST_SECRET,
        "token_endpoint_auth_method": "client_secret_post", "grant_types": ["client_credentials"],
        "response_types": none, "redirect_uris": none }));
    for (alg, id, pem) in keys {
        clients.push(json!({ "client_id": id, "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": alg, "public_key_pem": pem,
            "grant_types": ["client_credentials"], "response_types": none, "redirect_uris": none }));
    }
    let claims = json!({ "roles": ["reader"], "tenant_id": ACME });
    config["client_claims"][SVC_POST] = claims.clone();
    for (_, id) in KEY_CLIENTS {
        config["client_claims"][id] = claims.clone();
    }
    config
}

impl World {
    fn start(config: Value) -> Self {
        let idp = Provider::start_with(config);
        let certs = TestCerts::for_server();
        let mut b = validator_cluster(AUDIENCE)
            .tls(&certs)
            .hba(format!(
                "hostssl all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
                idp.issuer()
            ))
            .ident("m alice alice")
            .ident(format!("m {SVC_CLIENT} svc"))
            .ident(format!("m {SVC_POST} svc"));
        for (_, id) in KEY_CLIENTS {
            b = b.ident(format!("m {id} svc"));
        }
        let pg = b.start();
        pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE svc LOGIN; CREATE EXTENSION gprxy_validator");
        Self { idp, pg, certs, dir: tempfile::tempdir().expect("temp dir") }
    }

    /// The profile's upstream, TLS and default user lines.
    fn upstream(&self, user: &str) -> String {
        format!(
            "upstream = \"127.0.0.1:{}\"\nuser = \"{user}\"\ndatabase = \"postgres\"\ntls.ca_file = \"{}\"\ntls.server_name = \"localhost\"\n",
            self.pg.port(),
            self.certs.ca_path.display()
        )
    }

    /// A client-credentials profile for `client` with `auth` and its `credential` lines.
    fn client_profile(&self, client: &str, auth: &str, credential: &str) -> String {
        format!(
            "{}token.source = \"client_credentials\"\ntoken.issuer = \"{}\"\ntoken.client_id = \"{client}\"\ntoken.client_auth = \"{auth}\"\n{credential}token.scope = \"db:read\"\ntoken.insecure_allow_http_loopback = true\n",
            self.upstream("svc"),
            self.idp.issuer()
        )
    }

    /// svc's profile (client_secret_basic) with its secret in a file.
    fn svc_profile(&self) -> (String, PathBuf) {
        let file = self.private_file("svc.secret", &format!("{SVC_SECRET}\n"));
        let profile = self.client_profile(
            SVC_CLIENT,
            "client_secret_basic",
            &format!("token.client_secret_file = \"{}\"\n", file.display()),
        );
        (profile, file)
    }

    /// A file of this test only the connector's user may read.
    fn private_file(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn audits(&self) -> Vec<String> {
        self.pg.log().lines().filter(|l| l.contains("gprxy: oauth login")).map(str::to_owned).collect()
    }

    fn last_audit(&self) -> String {
        self.audits().pop().unwrap_or_default()
    }

    /// `gprxy token --profile p` for this profile: (success, stdout, stderr).
    fn gprxy_token(&self, profile: &str, env: &[(&str, &str)]) -> (bool, String, String) {
        let sub = tempfile::tempdir_in(self.dir.path()).unwrap();
        let config = write_config(sub.path(), profile, &sub.path().join("s"), None);
        run_gprxy(&["token", "--profile", "p", "--config", config.to_str().unwrap()], env)
    }

    /// `gprxy login` with the `cli` client (30 s tokens unless the test says otherwise) into
    /// `dir`, approved by the provider's user `account`.
    fn login(&self, dir: &Path, account: &str) -> Value {
        let mut cmd = Command::new(gprxy_tests::proxy::gprxy_bin());
        cmd.args([
            "login",
            "--issuer",
            &self.idp.issuer(),
            "--client-id",
            CLI_CLIENT,
            "--insecure-allow-http-loopback",
            "--scope",
            "openid offline_access db:read",
        ])
        .env("GPRXY_CONFIG_DIR", config_dir(dir));
        let (ok, _, err) = run_device_client(cmd, "", "and enter the code", &self.idp, account);
        assert!(ok, "gprxy login failed:\n{err}\n{}", self.idp.log());
        credentials(dir)
    }
}

fn credentials(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(config_dir(dir).join("credentials.json")).unwrap()).unwrap()
}

fn fp(token: &str) -> String {
    gprxy_core::fingerprint(token.as_bytes())
}

/// psql 15 with `conninfo` and no password anywhere; stdout or stderr.
fn psql(conninfo: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(PgVersion::V15.bin("psql"))
        .args(["-X", "-A", "-t", "-c", sql, conninfo])
        .env_remove("PGPASSWORD")
        .env_remove("PGHOST")
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn no_secret_in(text: &str, secrets: &[&str], what: &str) {
    for s in secrets {
        assert!(!text.contains(s), "a token or secret is in the {what}: {text}");
    }
    assert!(!holds_a_jwt(text), "something like a JWT is in the {what}: {text}");
}

/// Waits until `cond` holds, polling every 20 ms; panics with `what` after `limit`. Returns when
/// it held.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "waited {limit:?} in vain: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn client_secret_basic_and_client_secret_post_log_in_through_the_connector() {
    let w = World::start(provider_config(&[]));
    let (basic, _) = w.svc_profile();
    let post_secret = w.private_file("svc-post.secret", SVC_POST_SECRET);
    let post = w.client_profile(
        SVC_POST,
        "client_secret_post",
        &format!("token.client_secret_file = \"{}\"\n", post_secret.display()),
    );
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{SVC_CLIENT}:{SVC_SECRET}"));
    for (client, profile, in_header) in [(SVC_CLIENT, &basic, 1), (SVC_POST, &post, 0)] {
        let (before, basic_before) = (w.idp.token_requests(), w.idp.basic_token_requests());
        // Logged at the most verbose level, with every library's events: still no secret.
        let c = Connector::start_env(profile, false, &[("GPRXY_LOG", "trace")]);
        assert_eq!(psql(&c.conninfo("svc"), WHO).unwrap(), format!("svc|oauth:{client}|{client}|{client}"));
        let audit = w.last_audit();
        assert!(
            audit.contains(&format!("oauth login authorized reason=ok role=\"svc\" authn_id=\"{client}\"")),
            "{audit}"
        );
        assert!(audit.contains("alg=\"RS256\""), "{audit}");
        // A second connection reuses the token: one token request for both.
        assert_eq!(psql(&c.conninfo("svc"), "SELECT gprxy.claim('tenant_id')").unwrap(), ACME);
        assert_eq!(w.idp.token_requests(), before + 1, "{client}: one token request");
        // The provider takes a secret in the header or the form from any secret client: the
        // method used shows in whether the request had HTTP Basic authentication.
        assert_eq!(
            w.idp.basic_token_requests(),
            basic_before + in_header,
            "{client}: the secret in the header"
        );
        let logins = c.wait_events("connect_login", 2);
        let fetched: Vec<bool> = logins.iter().map(|e| e["fetched"].as_bool().unwrap()).collect();
        assert_eq!(fetched, [true, false], "{client}");
        assert_eq!(
            (logins[0]["sub"].as_str(), logins[0]["iss"].as_str(), logins[0]["mechanism"].as_str()),
            (Some(client), Some(w.idp.issuer().as_str()), Some("OAUTHBEARER"))
        );
        assert!(c.log().contains("TRACE"), "the log is not at trace level");
        no_secret_in(&c.log(), &[SVC_SECRET, SVC_POST_SECRET, &encoded], "connector log");
    }
    // --check fetches and logs in once, and says so.
    let sub = tempfile::tempdir_in(w.dir.path()).unwrap();
    let config = write_config(sub.path(), &basic, &sub.path().join("s"), None);
    let (ok, out, err) = run_gprxy(&["connect", "--check", "--config", config.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[1].starts_with("token (client_credentials): fingerprint ")
            && lines[1].contains(&format!(", sub {SVC_CLIENT}, iss {}, expires in ", w.idp.issuer())),
        "{out}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "logged in as svc to postgres on 127.0.0.1:{} (TLS verified for localhost, OAUTHBEARER); server version 18.",
            w.pg.port()
        )),
        "{out}"
    );
    no_secret_in(&(out + &err), &[SVC_SECRET], "output of --check");
}

#[test]
fn a_refused_client_secret_is_named_and_the_secret_shown_nowhere() {
    let w = World::start(provider_config(&[]));
    let (profile, file) = w.svc_profile();
    let wrong = "svc-wrong-secret-6d2a9f01";
    std::fs::write(&file, format!("{wrong}\n")).unwrap();
    let c = Connector::start_env(&profile, false, &[("GPRXY_LOG", "trace")]);
    let e = psql(&c.conninfo("svc"), WHO).unwrap_err();
    assert!(e.ends_with(&format!("FATAL:  gprxy connect: no token for profile p: {REFUSED_CLIENT}")), "{e}");
    let refused = c.wait_events("connect_login", 1);
    assert_eq!(
        (refused[0]["outcome"].as_str(), refused[0]["error"].as_str()),
        (Some("no_token"), Some(REFUSED_CLIENT))
    );
    assert_eq!(w.idp.token_requests(), 1);
    // Nothing reached the server: no login attempt, no audit line.
    assert!(w.audits().is_empty(), "{:?}", w.audits());
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{SVC_CLIENT}:{wrong}"));
    no_secret_in(&(e + &c.log()), &[wrong, SVC_SECRET, &encoded], "connector log or error");
    // `gprxy token` says the same.
    let (ok, out, err) = w.gprxy_token(&profile, &[]);
    assert!(!ok);
    assert_eq!(out, "");
    assert_eq!(err.trim(), format!("gprxy: profile p: token (client_credentials): {REFUSED_CLIENT}"));
    no_secret_in(&err, &[wrong, &encoded], "error");
}

/// A new key pair for `alg` (PKCS#8 PEM, mode 0600) in `dir`; returns its file and the public
/// key's PEM.
fn key_pair(dir: &Path, alg: &str) -> (PathBuf, String) {
    let openssl = |args: &[&str]| {
        let out =
            Command::new("openssl").args(args).output().expect("openssl (scripts/bootstrap.sh installs it)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let key = dir.join(format!("{}.key", alg.to_lowercase()));
    let k = key.to_str().unwrap();
    match alg {
        "RS256" => openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", k]),
        "ES256" => {
            openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", k])
        }
        "EdDSA" => openssl(&["genpkey", "-algorithm", "ED25519", "-out", k]),
        other => panic!("no key for {other}"),
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let public = openssl(&["pkey", "-in", k, "-pubout"]);
    (key, public)
}

#[test]
fn private_key_jwt_logs_in_with_rs256_es256_and_eddsa_keys() {
    let keys_dir = tempfile::tempdir().unwrap();
    let keys: Vec<(&str, &str, PathBuf, String)> = KEY_CLIENTS
        .iter()
        .map(|(alg, id)| {
            let (file, public) = key_pair(keys_dir.path(), alg);
            (*alg, *id, file, public)
        })
        .collect();
    let registered: Vec<(&str, &str, String)> =
        keys.iter().map(|(a, id, _, p)| (*a, *id, p.clone())).collect();
    let w = World::start(provider_config(&registered));
    let profile = |id: &str, alg: &str, key: &Path| {
        w.client_profile(
            id,
            "private_key_jwt",
            &format!("token.private_key_file = \"{}\"\ntoken.private_key_alg = \"{alg}\"\n", key.display()),
        )
    };
    for (alg, id, key, _) in &keys {
        let p = profile(id, alg, key);
        // Two requests, two assertions: the provider refuses a client assertion whose jti it
        // has seen, so both succeeding shows each was new.
        let mut tokens = Vec::new();
        for _ in 0..2 {
            let (ok, out, err) = w.gprxy_token(&p, &[]);
            assert!(ok, "{alg}: {err}\n{}", w.idp.log());
            let t = out.trim().to_owned();
            let claims = jwt_claims(&t);
            assert_eq!(
                (claims["client_id"].as_str(), claims["aud"].as_str()),
                (Some(*id), Some(AUDIENCE)),
                "{claims}"
            );
            tokens.push(t);
        }
        assert_ne!(tokens[0], tokens[1]);
        let c = Connector::start(&p, false);
        assert_eq!(psql(&c.conninfo("svc"), WHO).unwrap(), format!("svc|oauth:{id}|{id}|{id}"), "{alg}");
        let audit = w.last_audit();
        assert!(
            audit.contains(&format!("oauth login authorized reason=ok role=\"svc\" authn_id=\"{id}\"")),
            "{audit}"
        );
        no_secret_in(&c.log(), &[&tokens[0], &tokens[1]], "connector log");
    }
    // A key the client did not register is refused: another RSA key, and the EdDSA key for
    // the ES256 client (signed with EdDSA, which that client does not use).
    let other = tempfile::tempdir().unwrap();
    let (stranger, _) = key_pair(other.path(), "RS256");
    for (id, alg, key) in [("key-rs256", "RS256", &stranger), ("key-es256", "EdDSA", &keys[2].2)] {
        let (ok, out, err) = w.gprxy_token(&profile(id, alg, key), &[]);
        assert!(!ok && out.is_empty(), "{id} with a {alg} key it did not register");
        assert_eq!(err.trim(), format!("gprxy: profile p: token (client_credentials): {REFUSED_CLIENT}"));
    }
}

/// The `cli` client's tokens live `secs` seconds.
fn cli_tokens_live(config: &mut Value, secs: u64) {
    config["access_token_ttl_by_client"][CLI_CLIENT] = json!(secs);
}

#[test]
fn the_stored_device_login_logs_in_through_the_connector_and_is_refreshed_ahead_of_time() {
    let mut config = provider_config(&[]);
    cli_tokens_live(&mut config, 8);
    let w = World::start(config);
    let home = tempfile::tempdir().unwrap();
    let first = w.login(home.path(), "alice");
    let rt1 = first["refresh_token"].as_str().expect("a refresh token").to_owned();
    let creds = config_dir(home.path()).join("credentials.json");
    let profile = format!(
        "{}token.source = \"device\"\ntoken.credentials_file = \"{}\"\n",
        w.upstream("alice"),
        creds.display()
    );
    let c = Connector::start(&profile, false);
    let before = w.idp.token_requests();
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), format!("alice|oauth:alice|alice|{CLI_CLIENT}"));
    let audit = w.last_audit();
    assert!(audit.contains("oauth login authorized reason=ok role=\"alice\" authn_id=\"alice\""), "{audit}");
    // 8 s left is inside the refresh margin: the connection's fetch refreshed the login with
    // its refresh token, and the rotated one is stored.
    assert_eq!(w.idp.token_requests(), before + 1);
    let second = credentials(home.path());
    let rt2 = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rt2, rt1, "the rotated refresh token is stored");
    let logins = c.wait_events("connect_login", 1);
    let at2 = second["access_token"].as_str().unwrap().to_owned();
    assert_eq!(logins[0]["token_fp"], fp(&at2), "the connection used the refreshed token");
    let refreshed_at = Instant::now();
    // Ahead of its end (half its life, 4 s), the connector refreshes again with no connection.
    let seen =
        wait_until(Duration::from_secs(15), "a background refresh", || w.idp.token_requests() == before + 2);
    let after = seen - refreshed_at;
    assert!(after >= Duration::from_secs(2) && after < Duration::from_secs(7), "refreshed after {after:?}");
    let events = c.wait_events("token_refreshed", 1);
    let third = credentials(home.path());
    let at3 = third["access_token"].as_str().unwrap().to_owned();
    assert_eq!(events[0]["token_fp"], fp(&at3), "the background refresh stored its token");
    assert_ne!(third["refresh_token"], second["refresh_token"], "rotated again");
    // The next connection finds that token waiting.
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), format!("alice|oauth:alice|alice|{CLI_CLIENT}"));
    let logins = c.wait_events("connect_login", 2);
    assert_eq!(
        (logins[1]["fetched"].as_bool(), logins[1]["token_fp"].as_str()),
        (Some(false), Some(fp(&at3).as_str()))
    );
    // No refresh token was replayed along the way (the provider would have ended the grant):
    // gprxy token refreshes with the stored one.
    let env = [("GPRXY_CONFIG_DIR", config_dir(home.path()))];
    let out = Command::new(gprxy_tests::proxy::gprxy_bin()).arg("token").envs(env).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for t in [first["access_token"].as_str().unwrap(), &at2, &at3, &rt1, &rt2] {
        no_secret_in(&c.log(), &[t], "connector log");
    }
}

#[test]
fn two_connectors_sharing_one_device_login_refresh_it_once() {
    let mut config = provider_config(&[]);
    cli_tokens_live(&mut config, 8);
    let w = World::start(config);
    let home = tempfile::tempdir().unwrap();
    w.login(home.path(), "alice");
    let creds = config_dir(home.path()).join("credentials.json");
    let profile = format!(
        "{}token.source = \"device\"\ntoken.credentials_file = \"{}\"\n",
        w.upstream("alice"),
        creds.display()
    );
    // Two profiles (say, two databases) on the same login, each with its connector.
    let (a, b) = (Connector::start(&profile, false), Connector::start(&profile, false));
    // A slow provider: both connectors' refreshes of the login overlap.
    w.idp.delay_token_endpoint(1500);
    let before = w.idp.token_requests();
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| psql(&a.conninfo("alice"), WHO));
        let tb = s.spawn(|| psql(&b.conninfo("alice"), WHO));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    w.idp.delay_token_endpoint(0);
    let expected = format!("alice|oauth:alice|alice|{CLI_CLIENT}");
    assert_eq!(ra, Ok(expected.clone()), "through the first connector");
    assert_eq!(rb, Ok(expected), "through the second connector");
    // One refresh for both: the second waited for the first and took the token it stored (a
    // second refresh with the same refresh token would have been a replay, and the provider
    // ends the grant on one).
    assert_eq!(w.idp.token_requests(), before + 1);
    let stored = credentials(home.path())["access_token"].as_str().unwrap().to_owned();
    for c in [&a, &b] {
        assert_eq!(c.wait_events("connect_login", 1)[0]["token_fp"], fp(&stored));
    }
    // Their refreshes ahead of time (both due at the same moment): one request for both too,
    // whichever comes second taking the token the first stored.
    let refreshed: Vec<Value> = [&a, &b]
        .iter()
        .map(|c| {
            let e = c.wait_events("token_refreshed", 1);
            assert_eq!(e.len(), 1, "no refresh ahead of time");
            e[0].clone()
        })
        .collect();
    assert_eq!(w.idp.token_requests(), before + 2);
    let stored = credentials(home.path())["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        (&refreshed[0]["token_fp"], &refreshed[1]["token_fp"]),
        (&json!(fp(&stored)), &json!(fp(&stored)))
    );
    let out = Command::new(gprxy_tests::proxy::gprxy_bin())
        .arg("token")
        .env("GPRXY_CONFIG_DIR", config_dir(home.path()))
        .output()
        .unwrap();
    assert!(out.status.success(), "the grant is intact: {}", String::from_utf8_lossy(&out.stderr));
}

/// The `svc` client's tokens live `secs` seconds.
fn svc_tokens_live(secs: u64) -> Value {
    let mut config = provider_config(&[]);
    config["access_token_ttl_by_client"][SVC_CLIENT] = json!(secs);
    config
}

const JTI: &str = "SELECT gprxy.claim('jti')";

#[test]
fn a_token_near_its_end_is_refreshed_in_the_background_before_any_connection_asks() {
    // 6 s tokens, the default margin (60 s): each is replaced half way through its life.
    let w = World::start(svc_tokens_live(6));
    let (profile, _) = w.svc_profile();
    let c = Connector::start(&profile, false);
    assert_eq!(w.idp.token_requests(), 0, "nothing is fetched before a connection asks");
    let jti1 = psql(&c.conninfo("svc"), JTI).unwrap();
    let first = Instant::now();
    assert_eq!(w.idp.token_requests(), 1);
    let t2 =
        wait_until(Duration::from_secs(10), "the first background refresh", || w.idp.token_requests() == 2);
    let after = t2 - first;
    assert!(after >= Duration::from_secs(2) && after < Duration::from_secs(5), "refreshed after {after:?}");
    let refreshed = c.wait_events("token_refreshed", 1);
    assert_eq!(c.events("connect_login").len(), 1, "no connection asked for it");
    // The next connection finds the new token waiting: no fetch, no token request.
    let jti2 = psql(&c.conninfo("svc"), JTI).unwrap();
    assert_ne!(jti2, jti1);
    let logins = c.wait_events("connect_login", 2);
    assert_eq!(
        (logins[1]["fetched"].as_bool(), &logins[1]["token_fp"]),
        (Some(false), &refreshed[0]["token_fp"])
    );
    assert_eq!(w.idp.token_requests(), 2);
    // And so on, one request each half life, not more.
    let t3 =
        wait_until(Duration::from_secs(10), "the second background refresh", || w.idp.token_requests() >= 3);
    let between = t3 - t2;
    assert!(
        between >= Duration::from_secs(2) && between < Duration::from_secs(5),
        "refreshed after {between:?}"
    );
    assert_eq!(w.idp.token_requests(), 3);
    let audits = w.audits();
    assert_eq!(audits.len(), 2, "{audits:?}");
    assert!(
        audits.iter().all(|a| a.contains("authorized reason=ok role=\"svc\" authn_id=\"svc\"")),
        "{audits:?}"
    );
}

#[test]
fn connections_during_a_slow_background_refresh_use_the_current_token_without_waiting() {
    // 20 s tokens: refreshed 10 s after they were fetched, with 10 s of life left.
    let w = World::start(svc_tokens_live(20));
    let (profile, _) = w.svc_profile();
    let c = Connector::start(&profile, false);
    let jti1 = psql(&c.conninfo("svc"), JTI).unwrap();
    // The provider now takes 5 s to answer a token request.
    w.idp.delay_token_endpoint(5000);
    wait_until(Duration::from_secs(20), "the background refresh to start", || w.idp.token_requests() == 2);
    // The refresh is in flight: a connection now logs in at once with the current token.
    let started = Instant::now();
    assert_eq!(psql(&c.conninfo("svc"), JTI).unwrap(), jti1);
    let took = started.elapsed();
    let logins = c.wait_events("connect_login", 2);
    assert_eq!(logins[1]["fetched"].as_bool(), Some(false));
    assert!(logins[1]["ms"].as_f64().unwrap() < 2500.0, "the connection waited: {}", logins[1]);
    assert!(took < Duration::from_millis(4000), "the connection took {took:?}");
    assert!(c.events("token_refreshed").is_empty(), "the refresh was still in flight");
    // When the refresh ends, the next connection uses its token.
    let refreshed = c.wait_events("token_refreshed", 1);
    assert_eq!(refreshed.len(), 1, "the refresh did not end");
    let jti2 = psql(&c.conninfo("svc"), JTI).unwrap();
    assert_ne!(jti2, jti1);
    let logins = c.wait_events("connect_login", 3);
    assert_eq!(
        (logins[2]["fetched"].as_bool(), &logins[2]["token_fp"]),
        (Some(false), &refreshed[0]["token_fp"])
    );
    assert_eq!(w.idp.token_requests(), 2, "one fetch in flight, no other");
}

#[test]
fn a_refused_background_refresh_is_retried_after_ten_seconds_not_every_second() {
    // 30 s tokens: refreshed 15 s after they were fetched.
    let w = World::start(svc_tokens_live(30));
    let (profile, file) = w.svc_profile();
    let c = Connector::start(&profile, false);
    let jti1 = psql(&c.conninfo("svc"), JTI).unwrap();
    // The secret is rotated at the provider's side before the refresh: the refresh is refused.
    let wrong = "svc-rotated-away-3c81e5d2";
    std::fs::write(&file, wrong).unwrap();
    let failed_at =
        wait_until(Duration::from_secs(25), "the background refresh", || w.idp.token_requests() == 2);
    let failed = c.wait_events("token_refresh_failed", 1);
    assert_eq!(failed[0]["error"], REFUSED_CLIENT);
    // Not asked again within the next seconds (it used to be asked every second while the
    // current token was still valid), neither by the background refresh nor by a connection,
    // which meanwhile logs in with the token that is still valid.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(w.idp.token_requests(), 2, "the refused refresh was retried at once");
    assert_eq!(psql(&c.conninfo("svc"), JTI).unwrap(), jti1);
    let logins = c.wait_events("connect_login", 2);
    assert_eq!(
        (logins[1]["fetched"].as_bool(), &logins[1]["token_fp"]),
        (Some(false), &logins[0]["token_fp"])
    );
    assert_eq!(w.idp.token_requests(), 2, "the connection asked again");
    // The right secret back: the next retry, ten seconds after the refused one, succeeds.
    std::fs::write(&file, SVC_SECRET).unwrap();
    let retried = wait_until(Duration::from_secs(15), "the retry", || w.idp.token_requests() == 3);
    let after = retried - failed_at;
    assert!(after >= Duration::from_secs(9) && after < Duration::from_secs(13), "retried after {after:?}");
    let refreshed = c.wait_events("token_refreshed", 1);
    let jti2 = psql(&c.conninfo("svc"), JTI).unwrap();
    assert_ne!(jti2, jti1);
    assert_eq!(c.wait_events("connect_login", 3)[2]["token_fp"], refreshed[0]["token_fp"]);
    no_secret_in(&c.log(), &[wrong, SVC_SECRET], "connector log");
}
