//! `gprxy login` and `gprxy token` against the test issuer, and a non-Rust driver (psycopg)
//! logging in to PostgreSQL 18 through the proxy's bridge with a token from `gprxy token`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gprxy_core::testkit::{test_ca, TestKey};
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::proxy::{gprxy_bin, Proxy};
use gprxy_tests::validator_cluster;
use serde_json::json;

struct Helper {
    dir: tempfile::TempDir,
}

impl Helper {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config").join("gprxy")
    }

    fn credentials(&self) -> PathBuf {
        self.config_dir().join("credentials.json")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(gprxy_bin()).args(args).env("GPRXY_CONFIG_DIR", self.config_dir()).output().unwrap()
    }

    fn login(&self, issuer: &str, client_id: &str) -> Output {
        self.run(&["login", "--issuer", issuer, "--client-id", client_id, "--insecure-allow-http-loopback"])
    }

    /// `gprxy token`: Ok(stdout) or Err(stderr).
    fn token(&self) -> Result<String, String> {
        let out = self.run(&["token"]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim_end().to_owned())
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn token(key: &TestKey, idp: &TestIssuer, sub: &str, lifetime: i64) -> String {
    let mut c = idp.claims(sub, "db");
    c["exp"] = json!(gprxy_core::unix_time() + lifetime);
    key.token(json!({"typ": "at+jwt"}), &c)
}

#[test]
fn login_runs_the_device_flow_and_stores_tokens_privately() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let t = token(&key, &idp, "alice", 300);
    idp.hand_out_with_refresh("cli", &t, "refresh-1", 300);
    idp.pending_polls("cli", 1);
    let h = Helper::new();
    let out = h.login(&idp.issuer(), "cli");
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("To log in, open {}/device and enter the code GPRXY-TEST", idp.issuer())),
        "{err}"
    );
    assert!(err.contains("WARNING: plain-HTTP issuer allowed"), "{err}");
    assert!(!err.contains(&t), "the token reached the terminal");
    assert_eq!(mode(&h.credentials()), 0o600);
    assert_eq!(mode(&h.config_dir()), 0o700);
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(h.credentials()).unwrap()).unwrap();
    assert_eq!(stored["refresh_token"], "refresh-1");
    assert_eq!(stored["token_endpoint"], format!("{}/token", idp.issuer()));

    // Plenty of time left: printed as stored, no request to the issuer.
    let before = idp.token_requests();
    assert_eq!(h.token().unwrap(), t);
    assert_eq!(idp.token_requests(), before);
}

#[test]
fn token_refreshes_when_less_than_a_minute_is_left() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let old = token(&key, &idp, "alice", 30);
    let new = token(&key, &idp, "alice", 600);
    idp.hand_out_with_refresh("cli", &old, "refresh-1", 30);
    idp.on_refresh("refresh-1", &new, Some("refresh-2"), 600);
    let h = Helper::new();
    assert!(h.login(&idp.issuer(), "cli").status.success());
    assert_eq!(h.token().unwrap(), new);
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(h.credentials()).unwrap()).unwrap();
    assert_eq!(stored["refresh_token"], "refresh-2", "the rotated refresh token is kept");
    assert_eq!(mode(&h.credentials()), 0o600);
    let before = idp.token_requests();
    assert_eq!(h.token().unwrap(), new);
    assert_eq!(idp.token_requests(), before, "a fresh token is not refreshed again");
}

#[test]
fn clear_errors_for_expired_refresh_token_unreachable_issuer_and_corrupt_file() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let short = token(&key, &idp, "alice", 10);
    idp.hand_out_with_refresh("cli", &short, "refresh-1", 10);
    let h = Helper::new();
    assert!(h.login(&idp.issuer(), "cli").status.success());
    // The issuer no longer honours the refresh token.
    assert_eq!(
        h.token().unwrap_err(),
        "gprxy: the refresh token was refused by the issuer (invalid_grant): run gprxy login again"
    );
    // The issuer is gone.
    let issuer = idp.issuer();
    drop(idp);
    let e = h.token().unwrap_err();
    assert!(e.starts_with(&format!("gprxy: cannot reach the issuer {issuer}: ")), "{e}");
    // The file is damaged.
    std::fs::write(h.credentials(), b"{\"issuer\": ").unwrap();
    let e = h.token().unwrap_err();
    assert!(
        e.starts_with(&format!("gprxy: the credentials file {} is corrupt (", h.credentials().display())),
        "{e}"
    );
    assert!(e.ends_with("); run gprxy login again"), "{e}");
    // No login yet.
    let fresh = Helper::new();
    assert_eq!(
        fresh.token().unwrap_err(),
        format!("gprxy: no credentials at {}: run gprxy login first", fresh.credentials().display())
    );
    // A device login the user never approves.
    let idp = TestIssuer::start(&[&key]);
    let out = fresh.login(&idp.issuer(), "nobody");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("gprxy: the issuer refused: access_denied"), "{}", stderr(&out));
}

#[test]
fn psycopg_logs_in_through_the_bridge_with_a_token_from_gprxy_token() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let pg = validator_cluster("db")
        .hba(format!(
            "host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
            idp.issuer()
        ))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE EXTENSION gprxy_validator");
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, tls_key) = test_ca();
    let p = |n: &str| certs.path().join(n);
    std::fs::write(p("ca.pem"), ca).unwrap();
    std::fs::write(p("c.pem"), cert).unwrap();
    std::fs::write(p("k.pem"), tls_key).unwrap();
    let proxy = Proxy::start(&format!(
        "upstream = \"127.0.0.1:{}\"\n[bridge]\ntoken_as_password = true\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        pg.port(),
        p("c.pem").display(),
        p("k.pem").display()
    ));
    let t = token(&key, &idp, "alice", 300);
    idp.hand_out_with_refresh("cli", &t, "refresh-1", 300);
    let h = Helper::new();
    assert!(h.login(&idp.issuer(), "cli").status.success());
    let password = h.token().unwrap();

    let script = r#"
import os, psycopg
with psycopg.connect(os.environ["DSN"], password=os.environ["TOKEN"]) as conn:
    row = conn.execute("SELECT current_user, gprxy.subject(), gprxy.claim('aud')").fetchone()
    print("|".join(row))
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .env(
            "DSN",
            format!(
                "host=localhost hostaddr=127.0.0.1 port={} user=alice dbname=postgres sslmode=verify-full sslrootcert={}",
                proxy.port,
                p("ca.pem").display()
            ),
        )
        .env("TOKEN", &password)
        .output()
        .expect("python3 (apt python3-psycopg, installed by scripts/bootstrap.sh)");
    assert!(out.status.success(), "psycopg failed: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alice|alice|db");
    let events = proxy.wait_events("login", 1);
    assert_eq!(events[0]["outcome"], "success", "{events:#?}");
}

/// #30 item 4: `gprxy login --resource` sends RFC 8707's `resource` (repeatable) in the device
/// authorization request and every token request, keeps it, and `gprxy token` asks for it again
/// at each refresh; a value that is not an absolute URI is refused before any request.
#[test]
fn login_sends_resource_indicators_and_refresh_asks_for_them_again() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let old = token(&key, &idp, "alice", 30);
    let new = token(&key, &idp, "alice", 600);
    idp.hand_out_with_refresh("cli", &old, "refresh-1", 30);
    idp.on_refresh("refresh-1", &new, None, 600);
    let h = Helper::new();
    let resources = ["https://db.example.com", "urn:gprxy:reports"];
    let out = h.run(&[
        "login",
        "--issuer",
        &idp.issuer(),
        "--client-id",
        "cli",
        "--insecure-allow-http-loopback",
        "--resource",
        resources[0],
        "--resource",
        resources[1],
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let want: Vec<String> = resources.iter().map(|r| (*r).to_owned()).collect();
    assert_eq!(idp.resources_sent("/authorize"), vec![want.clone()]);
    assert_eq!(idp.resources_sent("/token"), vec![want.clone()]);
    assert_eq!(h.token().unwrap(), new);
    assert_eq!(idp.resources_sent("/token"), vec![want.clone(), want]);

    let before = idp.request_count();
    let out =
        h.run(&["login", "--issuer", &idp.issuer(), "--client-id", "cli", "--resource", "db.example.com"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a resource is an absolute URI (RFC 8707), such as https://db.example.com"),
        "{}",
        stderr(&out)
    );
    assert_eq!(idp.request_count(), before);
}

/// #30 item 5: an issuer's answer that is not JSON (a proxy's HTML page) or is empty is named by
/// its HTTP status with what to do, never quoted.
#[test]
fn an_answer_that_is_not_json_is_named_by_its_status() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let short = token(&key, &idp, "alice", 10);
    idp.hand_out_with_refresh("cli", &short, "refresh-1", 10);
    let h = Helper::new();
    assert!(h.login(&idp.issuer(), "cli").status.success());
    idp.fail_token_endpoint(Some((502, "<html>Bad gateway SECRET-MARKER</html>")));
    let e = h.token().unwrap_err();
    assert_eq!(
        e,
        "gprxy: the issuer's token response is invalid: HTTP 502 with a body that is not a JSON object: the issuer \
         (or a proxy in front of it) failed: try again later"
    );
    idp.fail_token_endpoint(Some((200, "")));
    assert_eq!(
        h.token().unwrap_err(),
        "gprxy: the issuer's token response is invalid: HTTP 200 with an empty body: the URL may not be this \
         issuer's OAuth endpoint"
    );
}
