//! `make demo`: a self-contained gprxy on this machine, no account anywhere.
//!
//! Starts a development issuer on loopback (NOT for production: it approves every device login),
//! PostgreSQL 18 with gprxy_validator preloaded, logs in with psql 18's OAuth device flow, prints
//! how to connect, and waits for Ctrl-C, then stops and deletes everything.
//! `--check` runs the same steps, asserts their results and exits (used by `make test`).

use std::sync::mpsc;

use gprxy_core::testkit::{now, TestKey};
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::{oauth_psql, require_validator, validator_cluster, PgVersion};
use serde_json::json;

fn step(n: usize, what: &str) {
    println!("\n[{n}] {what}");
}

fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let (stop_tx, stop_rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .expect("install Ctrl-C handler");

    require_validator(PgVersion::V18);
    step(1, "Development issuer on loopback (approves every device login: a test tool, never production)");
    let key = TestKey::rsa("demo-key-1");
    let idp = TestIssuer::start(&[&key]);
    let t = now();
    let alice = key.token(
        json!({"typ": "at+jwt"}),
        &json!({"iss": idp.issuer(), "sub": "alice", "aud": "gprxy-demo", "iat": t, "exp": t + 3600,
                "scope": "openid db:read", "email": "alice@example.com", "roles": ["app_reader"]}),
    );
    idp.hand_out("demo-alice", &alice);
    println!("    issuer: {}", idp.issuer());

    step(2, "PostgreSQL 18 with gprxy_validator preloaded");
    // The dev issuer is plain HTTP on loopback: validator_cluster allows that (tests only).
    let pg = validator_cluster("gprxy-demo")
        .conf("gprxy.role_claim = 'roles'")
        .hba(format!(
            "host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=demo",
            idp.issuer()
        ))
        .ident("demo alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE EXTENSION gprxy_validator");
    let libs = pg.sql("SHOW oauth_validator_libraries");
    println!("    SHOW oauth_validator_libraries -> {libs}");
    assert_eq!(libs, "gprxy_validator");

    step(3, "psql 18 logs in as alice through the OAuth device flow");
    let sql = "SELECT current_user, system_user, gprxy.subject(), gprxy.claim('email')";
    let out = oauth_psql(pg.port(), "alice", &idp.issuer(), "demo-alice", sql)
        .unwrap_or_else(|e| panic!("login failed:\n{e}"));
    println!("    {sql}\n    -> {out}");
    assert_eq!(out, "alice|oauth:alice|alice|alice@example.com");

    let psql18 = PgVersion::V18.bin("psql");
    println!("\nTry it yourself:");
    println!(
        "  superuser:  {} -h {} -p {} -U postgres -c 'SHOW oauth_validator_libraries'",
        psql18.display(),
        pg.root().display(),
        pg.port()
    );
    println!(
        "  OAuth:      PGOAUTHDEBUG=UNSAFE {} \"host=127.0.0.1 port={} user=alice dbname=postgres oauth_issuer={} oauth_client_id=demo-alice\" -c \"SELECT gprxy.claims()\"",
        psql18.display(),
        pg.port(),
        idp.issuer()
    );
    println!("  server log: {}", pg.log_path().display());
    if check {
        println!("\ndemo check: all steps passed");
        return;
    }
    println!("\nPress Ctrl-C to stop and clean up.");
    let _ = stop_rx.recv();
    println!("Stopping PostgreSQL and the issuer, deleting {}", pg.root().display());
}
