//! gprxy_validator inside a real PostgreSQL 18, logged into by a real psql 18 device flow.

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::{oauth_psql, require_validator, Cluster, PgVersion};
use serde_json::json;

const AUD: &str = "db";

struct Setup {
    idp: TestIssuer,
    key: TestKey,
    pg: Cluster,
}

fn setup_with(hba_options: &str, conf: &[&str], ident: &[&str]) -> Setup {
    require_validator(PgVersion::V18);
    let key = TestKey::rsa("key-1");
    let idp = TestIssuer::start(&[&key]);
    let mut b = Cluster::builder(PgVersion::V18)
        .conf("shared_preload_libraries = 'gprxy_validator'")
        .conf("oauth_validator_libraries = 'gprxy_validator'")
        .conf(format!("gprxy.audience = '{AUD}'"))
        .conf("gprxy.insecure_allow_http_loopback = on")
        .hba(format!("host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" {hba_options}", idp.issuer()));
    for c in conf {
        b = b.conf(*c);
    }
    for i in ident {
        b = b.ident(*i);
    }
    let pg = b.start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE app_writer LOGIN; CREATE EXTENSION gprxy_validator");
    Setup { idp, key, pg }
}

fn setup() -> Setup {
    setup_with("map=m", &[], &["m alice alice"])
}

impl Setup {
    fn login(&self, user: &str, token: &str, sql: &str) -> Result<String, String> {
        let client = format!("c{}", gprxy_core::fingerprint(token.as_bytes()));
        self.idp.hand_out(&client, token);
        oauth_psql(self.pg.port(), user, &self.idp.issuer(), &client, sql)
    }

    fn token(&self, claims: serde_json::Value) -> String {
        self.key.token(json!({"typ": "at+jwt"}), &claims)
    }
}

#[test]
fn device_flow_login_shows_identity_and_claims() {
    let s = setup();
    let t = s.token(s.idp.claims("alice", AUD));
    let out = s
        .login("alice", &t, "SELECT current_user, system_user, gprxy.subject(), gprxy.claim('aud'), gprxy.claims()->>'iss'")
        .unwrap();
    assert_eq!(out, format!("alice|oauth:alice|alice|db|{}", s.idp.issuer()));
    assert!(s.pg.log().contains("gprxy: oauth login authorized reason=ok role=\"alice\" authn_id=\"alice\""), "{}", s.pg.log());
}
