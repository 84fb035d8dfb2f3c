//! Roles from groups (#29): gprxy_validator's provisioner on PostgreSQL 18, judged from the
//! catalog: which roles exist, what they are members of, and who granted it.

use std::time::Duration;

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::{oauth_psql, validator_cluster, Cluster};
use serde_json::json;

struct Setup {
    idp: TestIssuer,
    key: TestKey,
    pg: Cluster,
}

/// A cluster with `gprxy.provision = mode`, the provisioner role of sql/06_provisioning.sql, and
/// groups eng → app_reader, ops → app_writer, root → app_admin (which has CREATEROLE).
fn setup(mode: &str) -> Setup {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let pg = validator_cluster("db")
        .conf(format!("gprxy.provision = '{mode}'"))
        .conf("gprxy.provision_role = 'gprxy_provisioner'")
        .conf("gprxy.role_claim = 'groups'")
        .conf("gprxy.role_map = 'eng:app_reader,ops:app_writer,root:app_admin'")
        .hba(format!(
            "host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" delegate_ident_mapping=1",
            idp.issuer()
        ))
        .start();
    pg.sql(
        "CREATE EXTENSION gprxy_validator; \
         CREATE ROLE app_reader NOLOGIN; CREATE ROLE app_writer NOLOGIN; CREATE ROLE app_admin NOLOGIN CREATEROLE",
    );
    let setup = std::fs::read_to_string(gprxy_tests::sql_dir().join("06_provisioning.sql")).unwrap();
    pg.sql(&setup);
    // The provisioner restarts every 5 s until its role exists.
    assert!(pg.wait_for_log("gprxy: provisioner ready", Duration::from_secs(20)), "{}", pg.log());
    Setup { idp, key, pg }
}

impl Setup {
    fn login(&self, user: &str, sub: &str, groups: &[&str]) -> Result<String, String> {
        let mut claims = self.idp.claims(sub, "db");
        claims["groups"] = json!(groups);
        let token = self.key.token(json!({"typ": "at+jwt"}), &claims);
        let client = format!("c{}", gprxy_core::fingerprint(token.as_bytes()));
        self.idp.hand_out(&client, &token);
        oauth_psql(self.pg.port(), user, &self.idp.issuer(), &client, "SELECT current_user, system_user")
    }

    /// The groups `role` is a member of, and by whose grant, as the catalog says.
    fn members(&self, role: &str) -> String {
        self.pg.sql(&format!(
            "SELECT coalesce(string_agg(g.rolname || ' by ' || gr.rolname, ',' ORDER BY g.rolname), '') \
             FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member \
             JOIN pg_roles gr ON gr.oid = m.grantor WHERE r.rolname = '{role}'"
        ))
    }

    fn last_audit(&self) -> String {
        self.pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned()
    }
}

/// A person with no role logs in as their own name: the role is made (LOGIN, nothing more) with
/// the memberships their groups map to, by the provisioner, recorded, audited; the next login
/// without `ops` loses app_writer under `sync`.
#[test]
fn first_login_creates_the_role_and_sync_revokes_a_removed_group() {
    let s = setup("sync");
    assert_eq!(s.pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'alice'"), "0");
    assert_eq!(s.login("alice", "alice", &["eng", "ops", "intern"]).unwrap(), "alice|oauth:alice");
    assert_eq!(
        s.pg.sql(
            "SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication \
             FROM pg_roles WHERE rolname = 'alice'"
        ),
        "t|f|f|f|f|f"
    );
    assert_eq!(s.members("alice"), "app_reader by gprxy_provisioner,app_writer by gprxy_provisioner");
    assert_eq!(
        s.pg.sql("SELECT role, issuer, identity FROM gprxy.provisioned_roles"),
        format!("alice|{}|alice", s.idp.issuer())
    );
    let log = s.pg.log();
    for line in [
        "action=create role=\"alice\"",
        "action=grant role=\"alice\" group=\"app_reader\"",
        "action=grant role=\"alice\" group=\"app_writer\"",
    ] {
        assert!(log.contains(&format!("gprxy: provision {line}")), "{line}\n{log}");
    }
    // The IdP removed alice from ops.
    assert_eq!(s.login("alice", "alice", &["eng"]).unwrap(), "alice|oauth:alice");
    assert_eq!(s.members("alice"), "app_reader by gprxy_provisioner");
    assert!(s.pg.log().contains("gprxy: provision action=revoke role=\"alice\" group=\"app_writer\""));
    // An unchanged login is answered from shared memory: no new audit line from the provisioner.
    let provisions = s.pg.log().matches("gprxy: provision action=").count();
    assert_eq!(s.login("alice", "alice", &["eng"]).unwrap(), "alice|oauth:alice");
    assert_eq!(s.pg.log().matches("gprxy: provision action=").count(), provisions);
}

/// Under `create` a later login changes nothing; a role the DBA made by hand is never adopted;
/// a group mapped to a role with CREATEROLE is refused before anything is made.
#[test]
fn create_keeps_memberships_a_hand_made_role_is_refused_and_a_privileged_group_too() {
    let s = setup("create");
    assert!(s.login("alice", "alice", &["eng", "ops"]).is_ok());
    assert!(s.login("alice", "alice", &["eng"]).is_ok());
    assert_eq!(s.members("alice"), "app_reader by gprxy_provisioner,app_writer by gprxy_provisioner");

    s.pg.sql("CREATE ROLE bob LOGIN");
    assert!(s.login("bob", "bob", &["eng"]).is_err());
    let audit = s.last_audit();
    assert!(audit.contains("refused reason=provision_collision role=\"bob\""), "{audit}");
    assert!(audit.contains("exists and was not created by gprxy: it is never adopted"), "{audit}");
    assert_eq!(s.members("bob"), "");

    assert!(s.login("carol", "carol", &["root"]).is_err());
    let audit = s.last_audit();
    assert!(audit.contains("refused reason=provision_privileged_group role=\"carol\""), "{audit}");
    assert_eq!(s.pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'carol'"), "0");
}

/// A group mapped to a role with powers beyond its grants is refused when the provisioner reads
/// the settings (its start, each reload), named in the server log; the verdict holds until the
/// DBA changes the role and reloads: a role that loses CREATEROLE without a reload is still not
/// granted (the login's own check alone would let it through), one after the reload is.
#[test]
fn a_group_mapped_to_a_privileged_role_is_refused_at_load_until_changed_and_reloaded() {
    let s = setup("sync");
    // setup() made app_admin (root's target) with CREATEROLE before the provisioner could start.
    let log = s.pg.log();
    assert!(
        log.contains(
            "gprxy: provision refused at load group=\"app_admin\" (mapped from \"root\" by gprxy.role_map): \
             role \"app_admin\" has CREATEROLE: delegated mode never maps a token to such a role; \
             it is never granted until it is changed and the settings reloaded"
        ),
        "{log}"
    );
    assert!(!log.contains("refused at load group=\"app_reader\""), "{log}");
    // The other groups are provisioned as before.
    assert_eq!(s.login("gina", "gina", &["eng"]).unwrap(), "gina|oauth:gina");

    // The DBA takes the power away and lets the provisioner grant it, but does not reload.
    s.pg.sql(
        "ALTER ROLE app_admin NOCREATEROLE; \
         GRANT app_admin TO gprxy_provisioner WITH ADMIN OPTION, INHERIT FALSE, SET FALSE",
    );
    assert!(s.login("gina", "gina", &["eng", "root"]).is_err());
    let audit = s.last_audit();
    assert!(audit.contains("refused reason=provision_privileged_group role=\"gina\""), "{audit}");
    assert!(
        audit.contains(
            "detail=\"group \\\"app_admin\\\" was refused when the provisioner read the settings: role"
        ),
        "{audit}"
    );
    assert_eq!(s.members("gina"), "app_reader by gprxy_provisioner");

    let checks = s.pg.log().matches("gprxy: provisioner ready").count();
    s.pg.sql("SELECT pg_reload_conf()");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s.login("gina", "gina", &["eng", "root"]).is_err() {
        assert!(std::time::Instant::now() < deadline, "{}", s.last_audit());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(s.members("gina"), "app_admin by gprxy_provisioner,app_reader by gprxy_provisioner");
    assert_eq!(s.pg.log().matches("gprxy: provisioner ready").count(), checks, "a reload, not a restart");
}

/// Eight first logins of one person at once make one role and one record, and all log in.
#[test]
fn concurrent_first_logins_make_one_role() {
    let s = setup("sync");
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8).map(|_| scope.spawn(|| s.login("dave", "dave", &["eng"]))).collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), "dave|oauth:dave");
        }
    });
    assert_eq!(s.pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'dave'"), "1");
    assert_eq!(s.pg.sql("SELECT count(*) FROM gprxy.provisioned_roles WHERE role = 'dave'"), "1");
    assert_eq!(s.pg.log().matches("gprxy: provision action=create role=\"dave\"").count(), 1);
}

/// The provisioner gone: a first login is refused with its reason, and nothing is made; once it
/// is back (PostgreSQL restarts it), the login works. Roles unused for a while are listed, and
/// dropped only when the DBA asks.
#[test]
fn without_the_provisioner_a_first_login_is_refused_and_nothing_is_made() {
    let s = setup("sync");
    s.pg.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'gprxy provisioner'",
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.login("erin", "erin", &["eng"]).is_err());
    let audit = s.last_audit();
    assert!(audit.contains("refused reason=provision_unavailable role=\"erin\""), "{audit}");
    assert_eq!(s.pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'erin'"), "0");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s.login("erin", "erin", &["eng"]).is_err() {
        assert!(std::time::Instant::now() < deadline, "{}", s.last_audit());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(s.members("erin"), "app_reader by gprxy_provisioner");

    // A slow provisioner (its record locked by a long transaction): the login is refused at
    // gprxy.provision_timeout and, while the lock holds, nothing of frank exists.
    s.pg.sql("ALTER SYSTEM SET gprxy.provision_timeout = 1000");
    s.pg.sql("SELECT pg_reload_conf()");
    assert!(s.pg.wait_for_log("parameter \"gprxy.provision_timeout\" changed", Duration::from_secs(5)));
    std::thread::scope(|scope| {
        let locker = scope.spawn(|| {
            s.pg.sql("BEGIN; LOCK TABLE gprxy.provisioned_roles; SELECT pg_sleep(5); COMMIT;");
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while s.pg.sql(
            "SELECT count(*) FROM pg_locks WHERE relation = 'gprxy.provisioned_roles'::regclass \
             AND mode = 'AccessExclusiveLock' AND granted",
        ) != "1"
        {
            assert!(std::time::Instant::now() < deadline, "the lock was never taken");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(s.login("frank", "frank", &["eng", "ops"]).is_err());
        let audit = s.last_audit();
        assert!(
            audit.contains("refused reason=provision_unavailable role=\"frank\"")
                && audit.contains("no answer from the provisioner within gprxy.provision_timeout (1000 ms)"),
            "{audit}"
        );
        assert_eq!(s.pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'frank'"), "0");
        locker.join().unwrap();
    });
    // The provisioner's transaction then completes whole: the role with both memberships.
    assert!(s.pg.wait_for_log(
        "gprxy: provision action=grant role=\"frank\" group=\"app_writer\"",
        Duration::from_secs(10)
    ));
    assert_eq!(s.members("frank"), "app_reader by gprxy_provisioner,app_writer by gprxy_provisioner");

    s.pg.sql(
        "UPDATE gprxy.provisioned_roles SET last_login = now() - interval '40 days' WHERE role = 'erin'",
    );
    assert_eq!(s.pg.sql("SELECT role FROM gprxy.unused_provisioned_roles(30)"), "erin");
    s.pg.sql("CREATE TABLE erin_notes (x int); ALTER TABLE erin_notes OWNER TO erin");
    s.pg.sql("SELECT gprxy.drop_provisioned_role('erin', 'postgres')");
    assert_eq!(s.pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'erin'"), "0");
    assert_eq!(s.pg.sql("SELECT tableowner FROM pg_tables WHERE tablename = 'erin_notes'"), "postgres");
    let e = s.pg.try_sql("SELECT gprxy.drop_provisioned_role('app_reader', 'postgres')").unwrap_err();
    assert!(e.contains("gprxy: role app_reader was not made by gprxy's provisioner"), "{e}");
}
