//! What PostgreSQL 19 adds for gprxy_validator: a pg_hba line picks its issuers-file entry by
//! name (`validator.entry=NAME`, registered with `RegisterOAuthHBAOptions`), and a refusal's reason
//! and detail reach the server's own authentication failure line (`error_detail`).
//!
//! These need a 19 server: they are `#[ignore]`d in the default (18) run and `make test` runs them
//! with `GPRXY_VALIDATOR_PG=19 ... -- --include-ignored`.

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::{oauth_psql, validator_cluster, Cluster, PgVersion};
use serde_json::json;
use std::time::Duration;

const REFUSED: &str = "OAuth bearer authentication failed for user";

fn require_19() {
    assert_eq!(PgVersion::validator(), PgVersion::V19, "run with GPRXY_VALIDATOR_PG=19");
}

/// Two entries of one issuer (audiences `reporting` and `billing`), told apart by name.
fn issuers_file(pg: &Cluster, idp: &TestIssuer) {
    let file = pg.data_dir().join("issuers.toml");
    let text = format!(
        "[[issuer]]\nissuer = \"{0}\"\nname = \"reporting\"\naudience = [\"reporting\"]\n\n\
         [[issuer]]\nissuer = \"{0}\"\nname = \"billing\"\naudience = [\"billing\"]\n",
        idp.issuer()
    );
    std::fs::write(&file, text).unwrap();
    pg.sql(&format!("ALTER SYSTEM SET gprxy.issuers_file = '{}'", file.display()));
    pg.sql("SELECT pg_reload_conf()");
    assert!(
        pg.wait_for_log("parameter \"gprxy.issuers_file\" changed", Duration::from_secs(5)),
        "{}",
        pg.log()
    );
}

fn last_audit(pg: &Cluster) -> String {
    pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned()
}

fn login(pg: &Cluster, idp: &TestIssuer, user: &str, token: &str) -> Result<String, String> {
    let client = format!("c{}", gprxy_core::fingerprint(token.as_bytes()));
    idp.hand_out(&client, token);
    oauth_psql(pg.port(), user, &idp.issuer(), &client, "SELECT system_user")
}

#[test]
#[ignore = "PostgreSQL 19 only: GPRXY_VALIDATOR_PG=19 ... -- --include-ignored"]
fn pg19_a_pg_hba_line_picks_its_issuers_file_entry_with_validator_entry() {
    require_19();
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let line = |user: &str, entry: &str| {
        format!(
            "host all {user} 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m validator.entry={entry}",
            idp.issuer()
        )
    };
    let pg = validator_cluster("")
        .hba(line("alice", "reporting"))
        .hba(line("bob", "billing"))
        .hba(line("carol", "payroll"))
        .ident("m alice alice")
        .ident("m bob bob")
        .ident("m carol carol")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN; CREATE ROLE carol LOGIN");
    issuers_file(&pg, &idp);
    let token = |sub: &str, aud: &str| key.token(json!({"typ": "at+jwt"}), &idp.claims(sub, aud));

    // Same issuer, same key: each line's entry decides the audience.
    assert_eq!(login(&pg, &idp, "alice", &token("alice", "reporting")).unwrap(), "oauth:alice");
    assert!(last_audit(&pg).contains("authorized reason=ok role=\"alice\""), "{}", last_audit(&pg));
    assert!(last_audit(&pg).contains(" entry=\"reporting\""), "{}", last_audit(&pg));
    assert_eq!(login(&pg, &idp, "bob", &token("bob", "billing")).unwrap(), "oauth:bob");
    assert!(last_audit(&pg).contains(" entry=\"billing\""), "{}", last_audit(&pg));

    let err =
        login(&pg, &idp, "alice", &token("alice", "billing")).expect_err("reporting's line, billing's token");
    assert!(err.contains(&format!("{REFUSED} \"alice\"")), "{err}");
    assert!(last_audit(&pg).contains("refused reason=aud_mismatch role=\"alice\""), "{}", last_audit(&pg));

    // A name that is not in the file: refused as configuration, with the name.
    assert!(login(&pg, &idp, "carol", &token("carol", "reporting")).is_err());
    let audit = last_audit(&pg);
    assert!(audit.contains("refused reason=config role=\"carol\""), "{audit}");
    assert!(
        audit.contains(r#"detail="pg_hba.conf validator.entry: names no entry of the issuers file""#),
        "{audit}"
    );
}

#[test]
#[ignore = "PostgreSQL 19 only: GPRXY_VALIDATOR_PG=19 ... -- --include-ignored"]
fn pg19_a_refusals_reason_is_the_detail_of_the_servers_failure_line_and_never_the_clients() {
    require_19();
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let pg = validator_cluster("db")
        .hba(format!("host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m", idp.issuer()))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN");
    let token = key.token(json!({"typ": "at+jwt"}), &idp.claims("alice", "elsewhere"));
    let err = login(&pg, &idp, "alice", &token).expect_err("wrong audience");
    assert!(err.contains(&format!("{REFUSED} \"alice\"")), "{err}");
    assert!(!err.contains("aud_mismatch") && !err.contains("gprxy"), "the client was told why: {err}");
    // gprxy's own audit line stays.
    assert!(last_audit(&pg).contains("refused reason=aud_mismatch role=\"alice\""), "{}", last_audit(&pg));
    // The server's FATAL line, then its DETAIL from error_detail.
    let log = pg.log();
    let lines: Vec<&str> = log.lines().collect();
    let fatal = lines
        .iter()
        .rposition(|l| l.contains(&format!("FATAL:  {REFUSED} \"alice\"")))
        .unwrap_or_else(|| panic!("no failure line:\n{log}"));
    let detail = lines.get(fatal + 1).copied().unwrap_or_default();
    assert!(detail.contains("DETAIL:  gprxy: aud_mismatch: "), "{detail}\n{log}");
}

/// On 18 and 19 alike: with two entries of the line's issuer and no `validator.entry` to pick
/// one, the login is refused as configuration, saying so.
#[test]
fn two_entries_of_one_issuer_without_validator_entry_refuse_the_login() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let pg = validator_cluster("")
        .hba(format!("host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m", idp.issuer()))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN");
    issuers_file(&pg, &idp);
    let token = key.token(json!({"typ": "at+jwt"}), &idp.claims("alice", "reporting"));
    assert!(login(&pg, &idp, "alice", &token).is_err());
    let audit = last_audit(&pg);
    assert!(audit.contains("refused reason=config role=\"alice\""), "{audit}");
    // The audit line's detail is cut at 128 characters: up to the issuer.
    let want = format!(
        r#"detail="gprxy.issuers_file: several entries of the pg_hba.conf line's issuer \"{}\""#,
        idp.issuer()
    );
    assert!(audit.contains(&want), "{audit}\nwanted {want}");
}
