//! Who may set a signed context (issue 14, item 2): a role that logs in by password and falls
//! under the claim policies (`analyst IN ROLE app_reader`) must not be able to give itself
//! another tenant's claims, on PostgreSQL 15 and 18, directly and through pass-through mode.

use std::net::SocketAddr;

use gprxy_core::context::{ContextSigner, KEY_PARAMETER};
use gprxy_tests::pgwire::{connect_params, Auth, PgError};
use gprxy_tests::proxy::Proxy;
use gprxy_tests::{apply_sql_file, require_validator, validator_cluster, Cluster, PgVersion, TestCerts};
use serde_json::json;

const GLOBEX: &str = "22222222-2222-2222-2222-222222222222";
const GLOBEX_USERS: &str = "SELECT count(*) FROM users WHERE tenant_id = '22222222-2222-2222-2222-222222222222'";

/// A cluster with sql/'s schema, claim policies and demo rows, and `analyst` (password login,
/// member of app_reader).
fn cluster(version: PgVersion) -> Cluster {
    require_validator(version);
    let hba = "host all analyst,app_admin,app_writer,app_reader 127.0.0.1/32 scram-sha-256";
    let pg = match version {
        PgVersion::V18 => validator_cluster("db").hba(hba).start(),
        PgVersion::V15 => Cluster::builder(PgVersion::V15).hba(hba).start(),
    };
    pg.sql("CREATE EXTENSION gprxy_validator");
    for f in ["01_roles.sql", "02_schema.sql", "03_rls_gprxy_claims.sql", "04_demo_data.sql"] {
        apply_sql_file(&pg, "postgres", f);
    }
    pg.sql("SET password_encryption = 'scram-sha-256'; CREATE ROLE analyst LOGIN PASSWORD 'analyst-pw-1' IN ROLE app_reader");
    pg
}

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// The attack: `analyst` starts a connection with its own context key, signs another tenant's
/// claims with it and calls set_context. Returns set_context's outcome and how many of the
/// other tenant's users the session then reads.
fn forge(at: SocketAddr) -> (Result<(), PgError>, String) {
    let mut mine = ContextSigner::generate().unwrap();
    let key = mine.public_key().to_owned();
    let mut c =
        connect_params(at, "analyst", "postgres", Auth::Password("analyst-pw-1"), &[(KEY_PARAMETER, &key)])
            .unwrap();
    let forged = mine.sign(None, vec![], json!({"tenant_id": GLOBEX}).as_object().cloned().unwrap());
    let outcome = c.query(&format!("SELECT gprxy.set_context('{forged}')")).map(|_| ());
    let rows = c.scalar(GLOBEX_USERS).unwrap().unwrap_or_default();
    (outcome, rows)
}

fn assert_refused(outcome: Result<(), PgError>, rows: &str) {
    let e = outcome.expect_err("a forged context was accepted");
    assert_eq!(e.code.as_deref(), Some("28000"), "{e}");
    assert!(e.message.starts_with("gprxy: context refused: "), "{e}");
    assert_eq!(rows, "0", "rows of the other tenant");
}

#[test]
fn a_password_role_cannot_forge_a_context_on_15() {
    let pg = cluster(PgVersion::V15);
    let (outcome, rows) = forge(addr(pg.port()));
    assert_refused(outcome, &rows);
}

#[test]
fn a_password_role_cannot_forge_a_context_on_18_directly_or_through_pass_through() {
    let pg = cluster(PgVersion::V18);
    let (outcome, rows) = forge(addr(pg.port()));
    assert_refused(outcome, &rows);
    let certs = TestCerts::new();
    let proxy = Proxy::start(&format!(
        "upstream = \"127.0.0.1:{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        pg.port(),
        certs.cert_path.display(),
        certs.key_path.display()
    ));
    let (outcome, rows) = forge(proxy.addr());
    assert_refused(outcome, &rows);
}
