//! Review of #29 (roles from groups) and #27 (two issuers, one role) as an attacker, judged from
//! the catalog. A test named `attack_*` is an attack that found a defect: it failed on the code it
//! was written against (main at 407154c) and passes since the mends that followed. A test named
//! `held_*` is an attack the code withstood from the start.

use std::time::{Duration, Instant};

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::{oauth_psql, validator_cluster, Cluster};
use serde_json::json;

struct Setup {
    idp: TestIssuer,
    key: TestKey,
    pg: Cluster,
}

/// As tests/tests/provision.rs: `gprxy.provision = mode`, the provisioner of
/// sql/06_provisioning.sql, groups eng → app_reader, ops → app_writer, plus `extra` conf lines.
fn setup(mode: &str, role_map: &str, extra: &[&str]) -> Setup {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let mut b = validator_cluster("db")
        .conf(format!("gprxy.provision = '{mode}'"))
        .conf("gprxy.provision_role = 'gprxy_provisioner'")
        .conf("gprxy.role_claim = 'groups'")
        .conf(format!("gprxy.role_map = '{role_map}'"))
        .hba(format!(
            "host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" delegate_ident_mapping=1",
            idp.issuer()
        ));
    for e in extra {
        b = b.conf(*e);
    }
    let pg = b.start();
    pg.sql(
        "CREATE EXTENSION gprxy_validator; CREATE ROLE app_reader NOLOGIN; CREATE ROLE app_writer NOLOGIN",
    );
    let setup = std::fs::read_to_string(gprxy_tests::sql_dir().join("06_provisioning.sql")).unwrap();
    pg.sql(&setup);
    assert!(pg.wait_for_log("gprxy: provisioner ready", Duration::from_secs(20)), "{}", pg.log());
    Setup { idp, key, pg }
}

impl Setup {
    fn login_sql(&self, user: &str, sub: &str, groups: &[&str], sql: &str) -> Result<String, String> {
        let mut claims = self.idp.claims(sub, "db");
        claims["groups"] = json!(groups);
        let token = self.key.token(json!({"typ": "at+jwt"}), &claims);
        let client = format!("c{}", gprxy_core::fingerprint(token.as_bytes()));
        self.idp.hand_out(&client, &token);
        oauth_psql(self.pg.port(), user, &self.idp.issuer(), &client, sql)
    }

    fn login(&self, user: &str, sub: &str, groups: &[&str]) -> Result<String, String> {
        self.login_sql(user, sub, groups, "SELECT current_user, system_user")
    }

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

/// DEFECT (fails on 407154c). gprxy's record is keyed by role *name*, and nothing removes it when
/// the role is dropped outside `gprxy.drop_provisioned_role`. The DBA drops alice's role by hand
/// and later makes a different `alice` by hand (another person's password account, owning
/// `payroll`). The token with sub `alice` is let in as that hand-made role and the provisioner
/// grants it app_writer: the "never adopted" rule is bypassed, no timing needed. Fix: record
/// the role's OID (or compare pg_authid's OID / creation) and treat a name whose OID differs as a
/// collision; or delete the record when the role is gone.
#[test]
fn attack_a_hand_made_role_under_a_stale_record_is_adopted() {
    let s = setup("sync", "eng:app_reader,ops:app_writer", &[]);
    assert_eq!(s.login("alice", "alice", &["eng"]).unwrap(), "alice|oauth:alice");
    // Off-boarding by hand, then a new hand-made account of the same name.
    s.pg.sql("DROP ROLE alice");
    s.pg.sql(
        "CREATE ROLE alice LOGIN PASSWORD 'for-the-new-alice'; \
         CREATE TABLE payroll (who text, salary int); INSERT INTO payroll VALUES ('ceo', 1000000); \
         ALTER TABLE payroll OWNER TO alice",
    );
    // Another group set than the remembered one: the provisioner itself decides.
    let got = s.login_sql("alice", "alice", &["eng", "ops"], "SELECT current_user, sum(salary) FROM payroll");
    let members = s.members("alice");
    assert!(
        got.is_err() && members.is_empty(),
        "the token was let into the hand-made role: {got:?}; the provisioner granted it: {members:?}; \
         record: {}; audit: {}",
        s.pg.sql("SELECT role, identity FROM gprxy.provisioned_roles"),
        s.last_audit()
    );
}

/// DEFECT (fails on 407154c). A login that matches a remembered one (gprxy.provision_recheck,
/// default 300 s) is answered from shared memory without any look at the catalog. The DBA uses
/// the documented `gprxy.drop_provisioned_role('alice', ...)` (record deleted) and makes a
/// hand-made `alice`; within the recheck the old token logs in as the hand-made role. Fix: the
/// remembered entry should also carry the role's OID and be checked against the syscache
/// (one lookup), or drop_provisioned_role should clear the shared memory.
#[test]
fn attack_a_remembered_login_reaches_a_role_remade_by_hand() {
    let s = setup("sync", "eng:app_reader,ops:app_writer", &[]);
    assert_eq!(s.login("alice", "alice", &["eng"]).unwrap(), "alice|oauth:alice");
    s.pg.sql("SELECT gprxy.drop_provisioned_role('alice', 'postgres')");
    assert_eq!(s.pg.sql("SELECT count(*) FROM gprxy.provisioned_roles"), "0");
    s.pg.sql(
        "CREATE ROLE alice LOGIN PASSWORD 'for-the-new-alice'; \
         CREATE TABLE payroll (who text, salary int); INSERT INTO payroll VALUES ('ceo', 1000000); \
         ALTER TABLE payroll OWNER TO alice",
    );
    let got = s.login_sql("alice", "alice", &["eng"], "SELECT current_user, sum(salary) FROM payroll");
    assert!(
        got.is_err(),
        "a role gprxy did not make was reached from the remembered answer: {got:?}; audit: {}",
        s.last_audit()
    );
}

/// HELD. A provisioner ended (pg_terminate_backend) while it works on a request (here: blocked
/// on a lock) does not leak its slot: pgrx's SIGTERM handler only sets a flag, so the worker
/// finishes the request, answers or frees the slot, then exits and is restarted. Eight such ends,
/// then a first login still works.
#[test]
fn held_a_provisioner_ended_mid_request_does_not_leak_its_slot() {
    let s = setup("sync", "eng:app_reader,ops:app_writer", &["gprxy.provision_timeout = 1000"]);
    let s = &s;
    for round in 0..8 {
        std::thread::scope(|scope| {
            let locker = scope.spawn(move || {
                let _ =
                    s.pg.try_sql("BEGIN; LOCK TABLE gprxy.provisioned_roles; SELECT pg_sleep(2); COMMIT;");
            });
            let deadline = Instant::now() + Duration::from_secs(5);
            while s.pg.sql(
                "SELECT count(*) FROM pg_locks WHERE relation = 'gprxy.provisioned_roles'::regclass \
                 AND mode = 'AccessExclusiveLock' AND granted",
            ) != "1"
            {
                assert!(Instant::now() < deadline, "the lock was never taken");
                std::thread::sleep(Duration::from_millis(20));
            }
            let user = format!("victim{round}");
            let login = scope.spawn(move || s.login(&user, &user, &["eng"]));
            // The worker has taken the request (WORKING) and waits for the lock.
            let deadline = Instant::now() + Duration::from_secs(5);
            while s.pg.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'gprxy provisioner' \
                 AND wait_event_type = 'Lock'",
            ) != "1"
            {
                assert!(Instant::now() < deadline, "round {round}: the provisioner never waited");
                std::thread::sleep(Duration::from_millis(10));
            }
            s.pg.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'gprxy provisioner'",
            );
            assert!(login.join().unwrap().is_err());
            locker.join().unwrap();
        });
        // PostgreSQL restarts the worker after 5 s.
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.pg.log().matches("gprxy: provisioner ready").count() < round + 2 {
            assert!(Instant::now() < deadline, "round {round}: the provisioner did not come back");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The provisioner runs, nothing is locked: a first login should work.
    let got = s.login("zed", "zed", &["eng"]);
    assert!(
        got.as_deref() == Ok("zed|oauth:zed"),
        "the provisioner is running and idle, yet: {}",
        s.last_audit()
    );
}

/// DEFECT (fails on 407154c). A person's role name and the managed group names share one
/// namespace. When a role-map target does not exist yet (added to gprxy.role_map before the DBA
/// creates it), a token whose identity is that name logs in as it: the provisioner creates the
/// group *as the attacker's LOGIN role*, records it as theirs, and then grants it to every person
/// whose token names the group. The DBA's later `GRANT SELECT ... TO app_auditor` goes to the
/// attacker. Fix: refuse a provisioned name equal to a role-map target (any issuer's), and
/// recommend a prefix.
#[test]
fn attack_an_identity_named_like_an_absent_managed_group_becomes_that_group() {
    let s = setup("sync", "eng:app_reader,ops:app_writer,audit:app_auditor", &[]);
    let squat = s.login("app_auditor", "app_auditor", &[]);
    // A colleague in the IdP's audit group logs in: the provisioner grants them the attacker's role.
    let carol = s.login("carol", "carol", &["audit"]);
    // The DBA creates the group (it exists: the DBA assumes it is theirs) and grants it the log.
    let _ = s.pg.try_sql("CREATE ROLE app_auditor NOLOGIN");
    s.pg.sql("CREATE TABLE audit_log (line text); INSERT INTO audit_log VALUES ('secret'); GRANT SELECT ON audit_log TO app_auditor");
    let read = s.login_sql("app_auditor", "app_auditor", &[], "SELECT line FROM audit_log");
    assert!(
        squat.is_err(),
        "the attacker became the group: login {squat:?}, then read {read:?}; catalog: {} canlogin={}, \
         record {}, carol ({carol:?}) member of {}",
        "app_auditor",
        s.pg.sql("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'app_auditor'"),
        s.pg.sql(
            "SELECT role || ' for ' || identity FROM gprxy.provisioned_roles WHERE role = 'app_auditor'"
        ),
        s.members("carol")
    );
}

/// HELD. Identities that are dangerous as SQL or role names: a quote-and-semicolon payload is
/// created as that exact (quoted) name and nothing else runs; `postgres`, an existing group and
/// the provisioner itself are collisions; `pg_` is refused; the provisioner's grants stay inside
/// the role map; a group made powerful after a remembered login still refuses the next one.
#[test]
fn held_dangerous_identities_and_a_group_made_powerful_later() {
    let s = setup("sync", "eng:app_reader,ops:app_writer", &[]);
    let evil = "x\";CREATE/**/ROLE/**/evil/**/SUPERUSER/**/LOGIN;--";
    assert!(s.login(evil, evil, &["eng"]).is_ok(), "{}", s.last_audit());
    assert_eq!(s.pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'evil'"), "0");
    assert_eq!(
        s.pg.sql(&format!("SELECT rolsuper FROM pg_roles WHERE rolname = '{}'", evil.replace('\'', "''"))),
        "f"
    );
    for who in ["postgres", "app_reader", "gprxy_provisioner", "pg_monitor"] {
        assert!(s.login(who, who, &["eng", "ops"]).is_err(), "{who}");
    }
    assert_eq!(s.members("postgres"), "");
    assert_eq!(s.members("app_reader"), "");
    // Remembered login, then the DBA makes app_reader powerful: refused through the role's check.
    assert!(s.login("bob", "bob", &["eng"]).is_ok());
    s.pg.sql("GRANT pg_execute_server_program TO app_reader");
    let again = s.login("bob", "bob", &["eng"]);
    assert!(again.is_err(), "{again:?}");
    assert!(s.last_audit().contains("reason=role_privileged"), "{}", s.last_audit());
}

fn oauth_login(
    idp: &TestIssuer,
    key: &TestKey,
    port: u16,
    db: &str,
    user: &str,
    sub: &str,
) -> Result<String, String> {
    let token = key.token(json!({"typ": "at+jwt"}), &idp.claims(sub, "db"));
    let client = format!("c{}", gprxy_core::fingerprint(token.as_bytes()));
    idp.hand_out(&client, &token);
    gprxy_tests::oauth_psql_with(
        &format!("host=127.0.0.1 port={port} user={user} dbname={db}"),
        &idp.issuer(),
        &client,
        "SELECT current_user, system_user",
    )
}

/// DEFECT (fails on 407154c), with HELD parts first. The #27 check reads pg_hba.conf *from disk*
/// at each login, not the lines in force; a line that does not tokenize (an `include` whose file
/// cannot be read) is skipped. Held: issuer B's line for another database, reaching `alice` only
/// through a nested `+outer_g` membership, is counted, and A's `alice` is refused. Then the included
/// file holding both oauth lines becomes unreadable (chmod 000, no reload: PostgreSQL keeps the
/// lines in force): the check now sees no other issuer, and A's `alice` and B's `alice` both log in
/// as role `alice` — one role, two namespaces, the exact case the check exists to refuse. Fix:
/// fail closed when any line (an include) has a tokenizing error, and compare with the file's
/// load time (or read the postmaster's parsed lines) rather than the file as it reads now.
#[test]
fn attack_an_unreadable_include_lets_two_issuers_reach_one_role() {
    use std::os::unix::fs::PermissionsExt;
    let (ka, kb) = (TestKey::rsa("a"), TestKey::rsa("b"));
    let (a, b) = (TestIssuer::start(&[&ka]), TestIssuer::start(&[&kb]));
    let dir = tempfile::Builder::new().prefix("gprxy-review-hba").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let inc = dir.path().join("oauth.conf");
    std::fs::write(
        &inc,
        format!(
            "host postgres all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m\n\
             host other +outer_g 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m\n",
            a.issuer(),
            b.issuer()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&inc, std::fs::Permissions::from_mode(0o644)).unwrap();
    let pg = validator_cluster("db").hba(format!("include {}", inc.display())).ident("m alice alice").start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE inner_g; CREATE ROLE outer_g; GRANT outer_g TO inner_g; GRANT inner_g TO alice");
    pg.sql("CREATE DATABASE other");
    pg.sql("CREATE EXTENSION gprxy_validator");
    let port = pg.port();
    // Held: nested +group on a line for another database is counted.
    let first = oauth_login(&a, &ka, port, "postgres", "alice", "alice");
    assert!(first.is_err(), "{first:?}");
    let audit = pg.log().lines().rfind(|l| l.contains("gprxy: oauth login")).unwrap_or_default().to_owned();
    assert!(audit.contains("reason=issuers_share_role"), "{audit}");
    // The include becomes unreadable; nothing is reloaded, so both lines stay in force.
    std::fs::set_permissions(&inc, std::fs::Permissions::from_mode(0o000)).unwrap();
    let via_a = oauth_login(&a, &ka, port, "postgres", "alice", "alice");
    let via_b = oauth_login(&b, &kb, port, "other", "alice", "alice");
    std::fs::set_permissions(&inc, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        via_a.is_err() && via_b.is_err(),
        "two issuers' `alice` reached role alice: A {via_a:?}, B {via_b:?}; log: {}",
        pg.log().lines().filter(|l| l.contains("gprxy: oauth login")).collect::<Vec<_>>().join("\n")
    );
}

/// DEFECT (fails on 407154c). Neither the provisioner's session nor the extension's SQL
/// functions pin `search_path`. Where a token holder can CREATE in a schema on the path (here
/// `public`, as on clusters upgraded from PostgreSQL <= 14 or wherever the DBA granted it), the
/// provisioned user `alice` defines `public.array_agg(text)` and `public.format(text, name[, name])`:
/// an exact-type match beats pg_catalog's polymorphic ones (CVE-2018-1058's pattern). (1) The
/// provisioner's membership query calls alice's aggregate as `gprxy_provisioner` (CREATEROLE,
/// ADMIN on the managed groups): it grants alice `app_writer`, which her token never named, and
/// hides it from sync. (2) The DBA, as superuser, runs `gprxy.drop_provisioned_role` for some other
/// role: its `format()` is alice's, and alice becomes SUPERUSER. Fix: in the worker, `SET
/// search_path = pg_catalog, pg_temp` after connecting (and schema-qualify); declare the
/// extension's functions with `SET search_path = pg_catalog, pg_temp`.
#[test]
fn attack_a_writable_schema_on_the_path_hijacks_the_provisioner_and_the_drop_function() {
    let s = setup("sync", "eng:app_reader,ops:app_writer", &[]);
    s.pg.sql("GRANT CREATE ON SCHEMA public TO PUBLIC");
    assert_eq!(s.login("alice", "alice", &["eng"]).unwrap(), "alice|oauth:alice");
    assert_eq!(s.login("bob", "bob", &["eng"]).unwrap(), "bob|oauth:bob");
    // alice, in her token's session, plants the two functions.
    let planted = s.login_sql(
        "alice",
        "alice",
        &["eng"],
        "CREATE FUNCTION public.step(text[], text) RETURNS text[] LANGUAGE plpgsql AS $f$ BEGIN \
           IF current_user = 'gprxy_provisioner' AND NOT pg_has_role('alice', 'app_writer', 'MEMBER') THEN \
             EXECUTE 'GRANT app_writer TO alice'; END IF; \
           IF $2 = 'app_writer' THEN RETURN $1; END IF; RETURN $1 || $2; END $f$;\n\
         CREATE AGGREGATE public.array_agg(text) (sfunc = public.step, stype = text[]);\n\
         CREATE FUNCTION public.format(text, name, name) RETURNS text LANGUAGE plpgsql AS $f$ BEGIN \
           IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN EXECUTE 'ALTER ROLE alice SUPERUSER'; END IF; \
           RETURN pg_catalog.format($1, $2, $3); END $f$;\n\
         CREATE FUNCTION public.format(text, name) RETURNS text LANGUAGE sql AS $f$ SELECT pg_catalog.format($1, $2) $f$;\n\
         SELECT 'planted'",
    );
    assert_eq!(planted.as_deref(), Ok("planted"), "{planted:?}");
    // Any request that reaches the worker runs the membership query: bob's changed groups will do.
    assert!(s.login("bob", "bob", &["eng", "ops"]).is_ok(), "{}", s.last_audit());
    let alice_groups = s.members("alice");
    // The DBA tidies up bob's role with the documented function.
    let _ = s.pg.try_sql("SELECT gprxy.drop_provisioned_role('bob', 'postgres')");
    let alice_super = s.pg.sql("SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'");
    assert!(
        !alice_groups.contains("app_writer") && alice_super == "f",
        "alice's planted functions ran as the provisioner and as the DBA: alice is a member of \
         {alice_groups:?} (her token names only eng), rolsuper={alice_super}"
    );
}

// ---- Review of the refusal of privileged groups at load (9262379), as an attacker: main at
// 37be449. `attack_*` failed there; `held_*` held.

/// DEFECT (fails on 37be449). PostgreSQL's server-program and server-file roles are refused as
/// something a group *reaches*, but not as the group itself: `privileged_role` looks at the
/// role's attributes (none) and at the roles it is a member of (none). A role map whose target is
/// `pg_execute_server_program` (the DBA gave the provisioner ADMIN on it, as on any managed group)
/// passes the check at load and the login's own check; the provisioner grants it, and only the
/// check of the person's own role afterwards refuses the login — the membership stays in the
/// catalog, and once the mapping is removed sync never revokes it (no longer managed).
#[test]
fn attack_a_group_mapped_straight_to_a_server_program_role_is_granted() {
    let s = setup("sync", "eng:app_reader,ops:pg_execute_server_program", &[]);
    s.pg.sql(
        "GRANT pg_execute_server_program TO gprxy_provisioner WITH ADMIN OPTION, INHERIT FALSE, SET FALSE",
    );
    let got = s.login("mallory", "mallory", &["eng", "ops"]);
    let members = s.members("mallory");
    assert!(
        got.is_err() && !members.contains("pg_execute_server_program"),
        "the provisioner granted a server-program role: login {:?}, mallory is a member of {members:?}; \
         audit: {}",
        got.as_ref().map_err(|e| e.lines().last()),
        s.last_audit()
    );
    assert!(
        s.last_audit().contains("refused reason=provision_privileged_group role=\"mallory\""),
        "{}",
        s.last_audit()
    );
    assert!(
        s.pg.log().contains(
            "gprxy: provision refused at load group=\"pg_execute_server_program\" (mapped from \"ops\" by gprxy.role_map): \
             role \"pg_execute_server_program\" reads or writes the server's files or runs programs on it: \
             delegated mode never maps a token to such a role; it is never granted until it is changed and the settings reloaded"
        ),
        "{}",
        s.pg.log()
    );
}

/// DEFECT (fails on 37be449). The provisioner grants on the word of the login's check of the
/// group's powers, made in the login's backend before the request is queued; the worker itself
/// checks only what it refused at load. A group given CREATEROLE after that check and before the
/// worker's GRANT (here: the worker waits for a lock on gprxy.provisioned_roles meanwhile) is
/// granted: the person's own role is then a member of a CREATEROLE role, in the catalog, though
/// the login is refused afterwards by the check of the person's role.
#[test]
fn attack_a_group_made_powerful_while_the_provisioner_works_is_granted() {
    let s = setup("sync", "eng:app_reader,ops:app_writer", &["gprxy.provision_timeout = 20000"]);
    let s = &s;
    std::thread::scope(|scope| {
        let locker = scope.spawn(move || {
            s.pg.sql("BEGIN; LOCK TABLE gprxy.provisioned_roles; SELECT pg_sleep(2); COMMIT;");
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.pg.sql(
            "SELECT count(*) FROM pg_locks WHERE relation = 'gprxy.provisioned_roles'::regclass \
             AND mode = 'AccessExclusiveLock' AND granted",
        ) != "1"
        {
            assert!(Instant::now() < deadline, "the lock was never taken");
            std::thread::sleep(Duration::from_millis(20));
        }
        let login = scope.spawn(move || s.login("carol", "carol", &["eng"]));
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.pg.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'gprxy provisioner' \
             AND wait_event_type = 'Lock'",
        ) != "1"
        {
            assert!(Instant::now() < deadline, "the provisioner never waited");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The login's backend has checked app_reader; the worker has not granted it yet.
        s.pg.sql("ALTER ROLE app_reader CREATEROLE");
        let got = login.join().unwrap();
        locker.join().unwrap();
        let members = s.members("carol");
        assert!(
            got.is_err() && !members.contains("app_reader"),
            "a CREATEROLE group was granted: login {:?}, carol is a member of {members:?}; audit: {}",
            got.as_ref().map_err(|e| e.lines().last()),
            s.last_audit()
        );
        assert!(
            s.last_audit().contains("refused reason=provision_privileged_group role=\"carol\""),
            "{}",
            s.last_audit()
        );
        // One transaction: nothing of the refused request was made.
        assert_eq!(s.pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'carol'"), "0");
    });
}

/// HELD (since the mends above; the worker's check at grant time is the second line). Groups
/// that change after the load, with no reload: a role-map target absent at load (named in the log
/// as not existing yet) made later as a SUPERUSER; a harmless target dropped and a CREATEROLE
/// role renamed into its name. Neither is granted, and nothing of the login is made.
#[test]
fn held_a_group_made_or_renamed_into_place_after_the_load_is_not_granted() {
    let s = setup("sync", "eng:app_reader,ops:app_writer,audit:app_auditor", &[]);
    assert!(
        s.pg.log().contains(
            "gprxy: provision group=\"app_auditor\" (mapped from \"audit\" by gprxy.role_map) does not exist yet"
        ),
        "{}",
        s.pg.log()
    );
    s.pg.sql(
        "CREATE ROLE app_auditor NOLOGIN SUPERUSER; \
         GRANT app_auditor TO gprxy_provisioner WITH ADMIN OPTION, INHERIT FALSE, SET FALSE",
    );
    assert!(s.login("carol", "carol", &["eng", "audit"]).is_err());
    assert!(
        s.last_audit().contains("refused reason=provision_privileged_group role=\"carol\""),
        "{}",
        s.last_audit()
    );
    assert!(s.last_audit().contains("role \\\"app_auditor\\\" has SUPERUSER"), "{}", s.last_audit());
    assert_eq!(s.pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'carol'"), "0");

    s.pg.sql(
        "DROP ROLE app_writer; CREATE ROLE ops_boss NOLOGIN CREATEROLE; ALTER ROLE ops_boss RENAME TO app_writer; \
         GRANT app_writer TO gprxy_provisioner WITH ADMIN OPTION, INHERIT FALSE, SET FALSE",
    );
    assert!(s.login("dave", "dave", &["eng", "ops"]).is_err());
    assert!(s.last_audit().contains("role \\\"app_writer\\\" has CREATEROLE"), "{}", s.last_audit());
    assert_eq!(s.pg.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'dave'"), "0");
    // The other groups are provisioned as before.
    assert_eq!(s.login("erin", "erin", &["eng"]).unwrap(), "erin|oauth:erin");
    assert_eq!(s.members("erin"), "app_reader by gprxy_provisioner");
}
