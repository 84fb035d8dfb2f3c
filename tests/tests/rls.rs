//! sql/'s row-level security on gprxy's claim functions, through real OAuth logins (PostgreSQL 18,
//! delegated mode: the token's roles choose app_admin, app_writer or app_reader).

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::{apply_sql_file, oauth_psql, validator_cluster, Cluster};
use serde_json::json;

const ACME: &str = "11111111-1111-1111-1111-111111111111";
const GLOBEX: &str = "22222222-2222-2222-2222-222222222222";

struct World {
    idp: TestIssuer,
    key: TestKey,
    pg: Cluster,
}

impl World {
    fn start() -> Self {
        let key = TestKey::rsa("k");
        let idp = TestIssuer::start(&[&key]);
        let pg = validator_cluster("db")
            .conf("gprxy.role_claim = 'roles'")
            .conf("gprxy.role_map = 'admin:app_admin, writer:app_writer, reader:app_reader'")
            .hba(format!(
                "host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" delegate_ident_mapping=1",
                idp.issuer()
            ))
            .start();
        pg.sql("CREATE EXTENSION gprxy_validator");
        for f in ["01_roles.sql", "02_schema.sql", "03_rls_gprxy_claims.sql", "04_demo_data.sql"] {
            apply_sql_file(&pg, "postgres", f);
        }
        Self { idp, key, pg }
    }

    fn run(&self, sub: &str, tenant: &str, role: &str, db_role: &str, sql: &str) -> Result<String, String> {
        let mut c = self.idp.claims(sub, "db");
        c["tenant_id"] = json!(tenant);
        c["roles"] = json!([role]);
        let token = self.key.token(json!({"typ": "at+jwt"}), &c);
        let client = format!("{sub}-{role}-{}", gprxy_core::fingerprint(token.as_bytes()));
        self.idp.hand_out(&client, &token);
        oauth_psql(self.pg.port(), db_role, &self.idp.issuer(), &client, sql)
    }
}

const TITLES: &str = "SELECT string_agg(title, ',' ORDER BY title) FROM posts";

#[test]
fn each_tenant_sees_only_its_rows_and_roles_limit_writes() {
    let w = World::start();
    // alice, writer at Acme: her own post and Acme's public one; Acme's users only.
    let out = w
        .run("alice", ACME, "writer", "app_writer", &format!("{TITLES}; SELECT count(*) FROM users"))
        .unwrap();
    assert_eq!(out, "acme public,alice private\n2");
    // bob, reader at Globex: the same query shows only Globex.
    assert_eq!(w.run("bob", GLOBEX, "reader", "app_reader", TITLES).unwrap(), "bob private,globex public");

    // A writer inserts as herself, not as someone else, and never into another tenant.
    let insert = |owner: &str, tenant: &str| {
        format!(
            "INSERT INTO posts (tenant_id, owner_id, title) VALUES ('{tenant}', '{owner}', 'new by {owner}')"
        )
    };
    w.run("alice", ACME, "writer", "app_writer", &insert("alice", ACME)).unwrap();
    let e = w.run("alice", ACME, "writer", "app_writer", &insert("dave", ACME)).unwrap_err();
    assert!(e.contains("new row violates row-level security policy for table \"posts\""), "{e}");
    let e = w.run("alice", ACME, "writer", "app_writer", &insert("alice", GLOBEX)).unwrap_err();
    assert!(e.contains("new row violates row-level security policy"), "{e}");
    // A reader cannot write at all.
    let e = w.run("bob", GLOBEX, "reader", "app_reader", &insert("bob", GLOBEX)).unwrap_err();
    assert!(e.contains("permission denied for table posts"), "{e}");
    // Setting a plain session variable widens nothing: the policies read the token's claims.
    let spoof =
        format!("SET app.tenant_id = '{GLOBEX}'; SELECT set_config('app.user_id', 'bob', false); {TITLES}");
    assert_eq!(
        w.run("alice", ACME, "writer", "app_writer", &spoof).unwrap(),
        "bob\nacme public,alice private,new by alice"
    );
    // The admin sees every tenant.
    let all = w.run("root", ACME, "admin", "app_admin", "SELECT count(*) FROM posts").unwrap();
    assert_eq!(all, "6");
    // A role the token does not grant is refused.
    let e = w.run("bob", GLOBEX, "reader", "app_admin", "SELECT 1").unwrap_err();
    assert!(e.contains("OAuth bearer authentication failed for user \"app_admin\""), "{e}");
}
