//! Token validation on arbitrary bytes, as a hostile client or identity provider would send them:
//! a JWK Set document, a whole token, and a header or claims set behind a good signature (so
//! that the fuzzer reaches the claim checks). Never a panic, whatever the bytes; and a claims set
//! that is accepted must satisfy the policy, checked here again without gprxy's code.
#![no_main]

use std::sync::OnceLock;

use gprxy_core::testkit::{jwks, TestKey};
use gprxy_core::{KeySet, Policy, Validator};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    key: TestKey,
    keys: KeySet,
    validator: Validator,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let key = TestKey::ed25519("k1");
        let keys = KeySet::from_json(jwks(&[&key]).to_string().as_bytes()).expect("test JWKS");
        let policy = Policy::builder("https://issuer.example")
            .audiences(["db"])
            .required_scopes(["pg"])
            .role_claim(Some("realm_access.roles".into()))
            .build()
            .expect("policy");
        Fixture { key, keys, validator: Validator::new(policy) }
    })
}

/// A fixed instant, so that a crash reproduces.
const NOW: i64 = 1_800_000_000;

/// An accepted claims set, read with plain serde_json: the right issuer, audience and scope,
/// not expired, and the identity is its `sub`.
fn assert_satisfies_policy(claims: &[u8], identity: &str) {
    let c: serde_json::Value = serde_json::from_slice(claims).expect("accepted claims are JSON");
    assert_eq!(c["iss"], "https://issuer.example");
    let aud_ok = match &c["aud"] {
        serde_json::Value::String(a) => a == "db",
        serde_json::Value::Array(list) => list.iter().any(|a| a == "db"),
        _ => false,
    };
    assert!(aud_ok, "accepted without audience db: {c}");
    let exp = c["exp"].as_f64().expect("accepted without a numeric exp");
    assert!(exp + 30.0 > NOW as f64, "accepted expired: {c}");
    let mut scopes: Vec<&str> = c["scope"].as_str().map(|s| s.split(' ').collect()).unwrap_or_default();
    match &c["scp"] {
        serde_json::Value::String(s) => scopes.extend(s.split(' ')),
        serde_json::Value::Array(list) => scopes.extend(list.iter().filter_map(|v| v.as_str())),
        _ => {}
    }
    assert!(scopes.contains(&"pg"), "accepted without scope pg: {c}");
    let sub = match &c["sub"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => panic!("accepted with sub {other}"),
    };
    assert_eq!(identity, sub);
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            let _ = KeySet::from_json(rest);
        }
        1 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                let _ = f.validator.validate(token, &f.keys, NOW);
            }
        }
        2 => {
            let header = br#"{"alg":"EdDSA","kid":"k1","typ":"at+jwt"}"#;
            let token = f.key.token_raw("EdDSA", header, rest);
            if let Ok(v) = f.validator.validate(&token, &f.keys, NOW) {
                assert_satisfies_policy(rest, &v.identity);
            }
        }
        _ => {
            let claims = br#"{"iss":"https://issuer.example","aud":"db","sub":"u","exp":1800000100,"scope":"pg"}"#;
            let token = f.key.token_raw("EdDSA", rest, claims);
            let _ = f.validator.validate(&token, &f.keys, NOW);
        }
    }
});
