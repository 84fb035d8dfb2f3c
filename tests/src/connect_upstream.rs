//! The servers `gprxy connect` logs in to in end-to-end tests: PostgreSQL 18 with
//! gprxy_validator and no proxy in front (OAUTHBEARER), and PostgreSQL 15 (or 17,
//! `GPRXY_FALLBACK_PG`) behind gprxy's fallback mode (the token as a password over TLS).

use std::process::Command;

use gprxy_core::testkit::TestKey;
use serde_json::json;

use crate::idp::TestIssuer;
use crate::proxy::{start_signed_context_upstream, ContextKeyFile, FallbackSetup, Proxy};
use crate::{require_validator, validator_cluster, Cluster, PgVersion, TestCerts};

/// The audience both servers accept.
pub const AUD: &str = "db";

/// PostgreSQL 18 with TLS and gprxy_validator; every loopback login is OAuth (hostssl), and the
/// tokens of subjects `alice` and `bob` log in as role `alice`.
pub struct Pg18 {
    /// The issuer.
    pub idp: TestIssuer,
    /// Its signing key.
    pub key: TestKey,
    /// The server.
    pub pg: Cluster,
    /// The server's certificate and its CA.
    pub certs: TestCerts,
}

/// [`Pg18`] with more postgresql.conf lines.
pub fn pg18(conf: &[&str]) -> Pg18 {
    let key = TestKey::rsa("k1");
    let idp = TestIssuer::start(&[&key]);
    let certs = TestCerts::for_server();
    let mut b = validator_cluster(AUD)
        .tls(&certs)
        .hba(format!(
            "hostssl all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
            idp.issuer()
        ))
        .ident("m alice alice")
        .ident("m bob alice");
    for c in conf {
        b = b.conf(*c);
    }
    let pg = b.start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE EXTENSION gprxy_validator");
    Pg18 { idp, key, pg, certs }
}

impl Pg18 {
    /// A token for alice with this `jti`, expiring `exp_in` seconds from now.
    pub fn token(&self, jti: &str, exp_in: i64) -> String {
        self.token_for("alice", jti, exp_in)
    }

    /// A token for `sub` with this `jti`, expiring `exp_in` seconds from now.
    pub fn token_for(&self, sub: &str, jti: &str, exp_in: i64) -> String {
        let mut c = self.idp.claims(sub, AUD);
        c["jti"] = json!(jti);
        c["exp"] = json!(gprxy_core::unix_time() + exp_in);
        self.key.token(json!({"typ": "at+jwt"}), &c)
    }

    /// A connector in front of this server, its token source a file holding alice's token with
    /// `jti` "j1" (five minutes), `extra` profile lines, its TCP listener on when `tcp`. The
    /// folder holds the token file: keep it with the connector.
    pub fn connector(&self, extra: &str, tcp: bool) -> (crate::connector::Connector, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("token");
        crate::connector::write_token_file(&file, &self.token("j1", 300));
        let profile = format!(
            "{}{extra}token.source = \"file\"\ntoken.path = \"{}\"\n",
            self.upstream(),
            file.display()
        );
        (crate::connector::Connector::start(&profile, tcp), dir)
    }

    /// The profile's upstream and TLS lines (user alice, database postgres).
    pub fn upstream(&self) -> String {
        format!(
            "upstream = \"127.0.0.1:{}\"\nuser = \"alice\"\ndatabase = \"postgres\"\ntls.ca_file = \"{}\"\ntls.server_name = \"localhost\"\n",
            self.pg.port(),
            self.certs.ca_path.display()
        )
    }
}

/// gprxy in fallback mode (signed context) in front of [`PgVersion::fallback_upstream`] with
/// gprxy_validator's SQL side, sql/01_roles.sql and sql/05_signed_context.sql: a token with
/// role `writer` logs in as service account `app_writer`, the user name being its subject.
pub struct Fallback {
    /// The issuer.
    pub idp: TestIssuer,
    /// Its signing key.
    pub key: TestKey,
    /// The server behind the proxy.
    pub pg: Cluster,
    /// The proxy.
    pub proxy: Proxy,
    /// The proxy's certificate and its CA.
    pub certs: TestCerts,
    _context_key: ContextKeyFile,
}

/// [`Fallback`], with `extra` lines for the proxy's `[fallback]` section.
pub fn fallback(extra: &str) -> Fallback {
    let version = PgVersion::fallback_upstream();
    require_validator(version);
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let certs = TestCerts::new();
    let context_key = ContextKeyFile::create(certs.dir().join("context.key"));
    let pg = start_signed_context_upstream(
        Cluster::builder(version).hba("host all app_writer 127.0.0.1/32 scram-sha-256"),
        &[&context_key.public],
    );
    pg.sql("SET password_encryption = 'scram-sha-256'; ALTER ROLE app_writer PASSWORD 'writer-secret-1'");
    let pw = certs.dir().join("writer.pw");
    std::fs::write(&pw, "writer-secret-1\n").unwrap();
    let proxy = Proxy::start(
        &FallbackSetup {
            upstream_port: pg.port(),
            cert: &certs.cert_path,
            key: &certs.key_path,
            issuer: &idp.issuer(),
            audience: AUD,
            rules: &[("writer", "app_writer", &pw)],
            context_key: Some(&context_key.path),
            extra,
        }
        .toml(),
    );
    Fallback { idp, key, pg, proxy, certs, _context_key: context_key }
}

impl Fallback {
    /// A token for `sub` with role `writer` and this `jti`, expiring `exp_in` seconds from now.
    pub fn token(&self, sub: &str, jti: &str, exp_in: i64) -> String {
        let mut c = self.idp.claims(sub, AUD);
        c["roles"] = json!(["writer"]);
        c["jti"] = json!(jti);
        c["exp"] = json!(gprxy_core::unix_time() + exp_in);
        self.key.token(json!({"typ": "at+jwt"}), &c)
    }

    /// The profile's upstream (the proxy) and TLS lines (database postgres, no user).
    pub fn upstream(&self) -> String {
        format!(
            "upstream = \"127.0.0.1:{}\"\ndatabase = \"postgres\"\ntls.ca_file = \"{}\"\ntls.server_name = \"localhost\"\n",
            self.proxy.port,
            self.certs.ca_path.display()
        )
    }
}

/// Runs a client with no password in its environment: its trimmed stdout, or its stderr when
/// it failed.
pub fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.env_remove("PGPASSWORD").env_remove("PGHOST").output().expect("run client");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// psql 15 with `conninfo` and no password anywhere; stdout or stderr.
pub fn psql(conninfo: &str, sql: &str) -> Result<String, String> {
    output(Command::new(PgVersion::V15.bin("psql")).args(["-X", "-A", "-t", "-c", sql, conninfo]))
}
