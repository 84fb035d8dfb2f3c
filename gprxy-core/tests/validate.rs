//! One test per validation rule, each asserting the exact error.

use std::sync::OnceLock;

use gprxy_core::error::KeyMismatch;
use gprxy_core::testkit::{b64, jwks, now, TestKey};
use gprxy_core::{
    Algorithm, IdentityForm, KeySet, Malformed, Policy, PolicyBuilder, Quoted, ValidationError, Validator,
};
use serde_json::{json, Value};

const ISS: &str = "https://idp.example.com/";
const AUD: &str = "https://gprxy.io";

struct Keys {
    rsa: TestKey,
    rsa2: TestKey,
    p256: TestKey,
    p384: TestKey,
    ed: TestKey,
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| Keys {
        rsa: TestKey::rsa("rsa-1"),
        rsa2: TestKey::rsa("rsa-2"),
        p256: TestKey::p256("ec-256"),
        p384: TestKey::p384("ec-384"),
        ed: TestKey::ed25519("ed-1"),
    })
}

fn key_set() -> KeySet {
    let k = keys();
    KeySet::from_json(jwks(&[&k.rsa, &k.rsa2, &k.p256, &k.p384, &k.ed]).to_string().as_bytes()).unwrap()
}

fn policy() -> PolicyBuilder {
    Policy::builder(ISS).audiences([AUD])
}

fn claims() -> Value {
    let t = now();
    json!({"iss": ISS, "sub": "alice", "aud": AUD, "exp": t + 300, "iat": t, "nbf": t - 1,
           "scope": "openid db:read"})
}

fn with(mut c: Value, k: &str, v: Value) -> Value {
    c[k] = v;
    c
}

fn without(mut c: Value, k: &str) -> Value {
    c.as_object_mut().unwrap().remove(k);
    c
}

fn at() -> Value {
    json!({"typ": "at+jwt"})
}

fn check_with(p: PolicyBuilder, token: &str) -> Result<gprxy_core::ValidatedToken, ValidationError> {
    Validator::new(p.build().unwrap()).validate(token, &key_set(), now())
}

fn check(token: &str) -> Result<gprxy_core::ValidatedToken, ValidationError> {
    check_with(policy(), token)
}

fn err(token: &str) -> ValidationError {
    check(token).expect_err("token must be refused")
}

#[test]
fn every_algorithm_validates() {
    let k = keys();
    for (key, alg) in [
        (&k.rsa, "RS256"),
        (&k.rsa, "RS384"),
        (&k.rsa, "RS512"),
        (&k.rsa, "PS256"),
        (&k.rsa, "PS384"),
        (&k.rsa, "PS512"),
        (&k.p256, "ES256"),
        (&k.p384, "ES384"),
        (&k.ed, "EdDSA"),
    ] {
        let t = key.token(json!({"typ": "at+jwt", "alg": alg}), &claims());
        let v = check(&t).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(v.identity, "alice");
        assert_eq!(v.alg.map(|a| a.name()), Some(alg));
        assert_eq!(v.kid.as_deref(), Some(key.kid.as_str()));
        assert_eq!(v.fingerprint.len(), 12);
        assert!(!v.fingerprint.is_empty() && !t.contains(&v.fingerprint));
    }
}

#[test]
fn oversized_token() {
    let big = claims();
    let t = keys().rsa.token(at(), &with(big, "pad", json!("x".repeat(70_000))));
    assert_eq!(err(&t), ValidationError::TooLarge { size: t.len(), max: 65535 });
}

#[test]
fn malformed_shapes() {
    let good = keys().rsa.token(at(), &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let cases: Vec<(String, Malformed)> = vec![
        (format!("{}.{}", parts[0], parts[1]), Malformed::PartCount),
        (format!("{good}.x"), Malformed::PartCount),
        (format!("{good}.x.y"), Malformed::Encrypted),
        (format!("{} .{}.{}", parts[0], parts[1], parts[2]), Malformed::Whitespace),
        (format!("{}\n.{}.{}", parts[0], parts[1], parts[2]), Malformed::Whitespace),
        (format!("{}=.{}.{}", parts[0], parts[1], parts[2]), Malformed::Padding),
        (format!("{}*.{}.{}", parts[0], parts[1], parts[2]), Malformed::Base64),
        (format!("{}+/.{}.{}", parts[0], parts[1], parts[2]), Malformed::Base64),
        (format!(".{}.{}", parts[1], parts[2]), Malformed::Empty),
        (format!("{}.{}.{}", b64(b"[1]"), parts[1], parts[2]), Malformed::NotObject),
        (format!("{}.{}.{}", b64(b"{\"alg\":"), parts[1], parts[2]), Malformed::Json),
        (
            format!("{}.{}.{}", b64(br#"{"alg":"RS256","alg":"RS256"}"#), parts[1], parts[2]),
            Malformed::DuplicateKey,
        ),
        (format!("{}.{}.{}", b64(br#"{"alg":"RS256","kid":5}"#), parts[1], parts[2]), Malformed::HeaderType),
    ];
    for (token, want) in cases {
        assert_eq!(err(&token), ValidationError::Malformed(want), "{token}");
    }
}

#[test]
fn malformed_claims_after_valid_signature() {
    let k = &keys().rsa;
    let h = br#"{"alg":"RS256","typ":"at+jwt","kid":"rsa-1"}"#;
    let dup = k.token_raw("RS256", h, br#"{"sub":"alice","sub":"admin"}"#);
    assert_eq!(err(&dup), ValidationError::ClaimsMalformed(Malformed::DuplicateKey));
    let arr = k.token_raw("RS256", h, b"[]");
    assert_eq!(err(&arr), ValidationError::ClaimsMalformed(Malformed::NotObject));
    let bad = k.token_raw("RS256", h, b"not json");
    assert_eq!(err(&bad), ValidationError::ClaimsMalformed(Malformed::Json));
}

#[test]
fn algorithm_rules() {
    let k = keys();
    let c = claims();
    let no_alg = k.rsa.token_raw("RS256", br#"{"typ":"at+jwt","kid":"rsa-1"}"#, c.to_string().as_bytes());
    assert_eq!(err(&no_alg), ValidationError::AlgMissing);
    for none in ["none", "None", "NONE", "nOnE"] {
        let h = json!({"alg": none, "typ": "at+jwt"}).to_string();
        let t = format!("{}.{}.", b64(h.as_bytes()), b64(c.to_string().as_bytes()));
        assert_eq!(err(&t), ValidationError::AlgNone, "{none}");
    }
    let t = k.rsa.token(json!({"typ": "at+jwt", "alg": "XY256"}), &c);
    assert_eq!(err(&t), ValidationError::AlgUnknown(Quoted::new("XY256")));
    let t = k.p256.token(json!({"typ": "at+jwt"}), &c);
    let only_rsa = policy().algorithms(vec![Algorithm::RS256]);
    assert_eq!(check_with(only_rsa, &t).unwrap_err(), ValidationError::AlgNotAllowed(Quoted::new("ES256")));
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    use aws_lc_rs::hmac;
    let k = &keys().rsa;
    let h = json!({"alg": "HS256", "typ": "at+jwt", "kid": "rsa-1"}).to_string();
    let input = format!("{}.{}", b64(h.as_bytes()), b64(claims().to_string().as_bytes()));
    // Try both the DER and the JWK text as the "secret": either would be the attack.
    for secret in [k.rsa_public_der(), k.jwk().to_string().into_bytes()] {
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &secret), input.as_bytes());
        let t = format!("{input}.{}", b64(tag.as_ref()));
        assert_eq!(err(&t), ValidationError::AlgNotAllowed(Quoted::new("HS256")));
    }
}

fn single_key_set(jwk: Value) -> KeySet {
    KeySet::from_json(json!({"keys": [jwk]}).to_string().as_bytes()).unwrap()
}

fn err_with_keys(keys: &KeySet, token: &str) -> ValidationError {
    Validator::new(policy().build().unwrap()).validate(token, keys, now()).unwrap_err()
}

#[test]
fn key_must_fit_algorithm() {
    let k = keys();
    let c = claims();
    // ES256 token naming the RSA key.
    let t = k.p256.token(json!({"typ": "at+jwt", "kid": "rsa-1"}), &c);
    assert_eq!(
        err(&t),
        ValidationError::KeyMismatch {
            kid: Quoted::new("rsa-1"),
            alg: Algorithm::ES256,
            reason: KeyMismatch::KeyType("RSA".into())
        }
    );
    // ES384 token naming the P-256 key.
    let t = k.p384.token(json!({"typ": "at+jwt", "kid": "ec-256"}), &c);
    assert_eq!(
        err(&t),
        ValidationError::KeyMismatch {
            kid: Quoted::new("ec-256"),
            alg: Algorithm::ES384,
            reason: KeyMismatch::Curve("P-256".into())
        }
    );
    // The JWK declares RS512 but the token uses RS256.
    let mut jwk = k.rsa.jwk();
    jwk["alg"] = json!("RS512");
    let t = k.rsa.token(at(), &c);
    assert_eq!(
        err_with_keys(&single_key_set(jwk), &t),
        ValidationError::KeyMismatch {
            kid: Quoted::new("rsa-1"),
            alg: Algorithm::RS256,
            reason: KeyMismatch::DeclaredAlg("RS512".into())
        }
    );
    // A 1024-bit modulus is refused before any verification.
    let mut n = vec![0xC5u8; 128];
    n[127] |= 1;
    let weak = json!({"kty": "RSA", "kid": "rsa-1", "n": b64(&n), "e": "AQAB"});
    assert_eq!(
        err_with_keys(&single_key_set(weak), &t),
        ValidationError::KeyMismatch {
            kid: Quoted::new("rsa-1"),
            alg: Algorithm::RS256,
            reason: KeyMismatch::RsaTooSmall(1024)
        }
    );
}

#[test]
fn key_usage_must_allow_verification() {
    let k = &keys().rsa;
    let t = k.token(at(), &claims());
    for (field, value) in
        [("use", json!("enc")), ("key_ops", json!(["encrypt"])), ("key_ops", json!("verify"))]
    {
        let mut jwk = k.jwk();
        jwk.as_object_mut().unwrap().remove("use");
        jwk[field] = value;
        assert_eq!(err_with_keys(&single_key_set(jwk), &t), ValidationError::KeyUsage(Quoted::new("rsa-1")));
    }
    let mut jwk = k.jwk();
    jwk["key_ops"] = json!(["verify"]);
    assert!(Validator::new(policy().build().unwrap()).validate(&t, &single_key_set(jwk), now()).is_ok());
}

#[test]
fn kid_rules() {
    let k = keys();
    let c = claims();
    let t = k.rsa.token(json!({"typ": "at+jwt", "kid": "nope"}), &c);
    assert_eq!(err(&t), ValidationError::KidUnknown(Quoted::new("nope")));
    // No kid: two RSA keys fit, so the choice would be a guess.
    let h = br#"{"alg":"RS256","typ":"at+jwt"}"#;
    let t = k.rsa.token_raw("RS256", h, c.to_string().as_bytes());
    assert_eq!(err(&t), ValidationError::KidMissing(Algorithm::RS256));
    // No kid, one fitting key: used.
    let only = single_key_set(k.rsa.jwk());
    assert!(Validator::new(policy().build().unwrap()).validate(&t, &only, now()).is_ok());
    // No kid, no fitting key.
    let t = k.ed.token_raw("EdDSA", br#"{"alg":"EdDSA","typ":"at+jwt"}"#, c.to_string().as_bytes());
    assert_eq!(err_with_keys(&only, &t), ValidationError::NoKeyForAlg(Algorithm::EdDSA));
}

#[test]
fn embedded_key_headers_are_never_used() {
    // An attacker signs with their own key and points at it every way JOSE allows.
    let attacker = TestKey::rsa("rsa-1");
    let h = json!({"typ": "at+jwt", "jwk": attacker.jwk(), "jku": "https://evil.example/jwks",
                   "x5u": "https://evil.example/cert", "x5c": ["MIIB"]});
    let t = attacker.token(h, &claims());
    assert_eq!(err(&t), ValidationError::BadSignature);
    let t = attacker.token(json!({"typ": "at+jwt", "kid": "attacker", "jwk": attacker.jwk()}), &claims());
    assert_eq!(err(&t), ValidationError::KidUnknown(Quoted::new("attacker")));
}

#[test]
fn crit_and_b64_refused() {
    let k = &keys().rsa;
    let t = k.token(json!({"typ": "at+jwt", "crit": ["exp"], "exp": 1}), &claims());
    assert_eq!(err(&t), ValidationError::CritUnsupported(Quoted::new("exp")));
    let t = k.token(json!({"typ": "at+jwt", "crit": []}), &claims());
    assert_eq!(err(&t), ValidationError::CritUnsupported(Quoted::new("")));
    let t = k.token(json!({"typ": "at+jwt", "b64": false}), &claims());
    assert_eq!(err(&t), ValidationError::CritUnsupported(Quoted::new("b64")));
}

#[test]
fn bad_signatures() {
    let k = keys();
    let t = k.rsa.token(at(), &claims());
    let (input, sig) = t.rsplit_once('.').unwrap();
    let mut raw = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap();
    raw[10] ^= 1;
    assert_eq!(err(&format!("{input}.{}", b64(&raw))), ValidationError::BadSignature);
    assert_eq!(err(&format!("{input}.")), ValidationError::BadSignature);
    // Signed by another key under the same kid.
    let other = TestKey::rsa("rsa-1");
    assert_eq!(err(&other.token(at(), &claims())), ValidationError::BadSignature);
    // Payload changed after signing.
    let forged = format!(
        "{}.{}.{}",
        input.split('.').next().unwrap(),
        b64(with(claims(), "sub", json!("admin")).to_string().as_bytes()),
        sig
    );
    assert_eq!(err(&forged), ValidationError::BadSignature);
}

#[test]
fn ecdsa_zero_and_order_scalars_refused() {
    let k = &keys().p256;
    let t = k.token(at(), &claims());
    let input = t.rsplit_once('.').unwrap().0;
    // P-256 group order n.
    let n = hex("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551");
    let one = {
        let mut v = vec![0u8; 32];
        v[31] = 1;
        v
    };
    let zero = vec![0u8; 32];
    for (r, s) in [(&zero, &one), (&one, &zero), (&zero, &zero), (&n, &one), (&one, &n), (&n, &n)] {
        let sig = [r.as_slice(), s.as_slice()].concat();
        assert_eq!(err(&format!("{input}.{}", b64(&sig))), ValidationError::BadSignature);
    }
    // Wrong length (DER instead of fixed) is a bad signature too.
    assert_eq!(err(&format!("{input}.{}", b64(&[0x30u8; 70]))), ValidationError::BadSignature);
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn time_claims() {
    let k = &keys().rsa;
    let t0 = now();
    let tok = |c: Value| k.token(at(), &c);
    assert_eq!(err(&tok(without(claims(), "exp"))), ValidationError::ExpMissing);
    assert_eq!(
        err(&tok(with(claims(), "exp", json!("9999999999")))),
        ValidationError::TimeClaimInvalid("exp")
    );
    assert_eq!(err(&tok(with(claims(), "nbf", json!(true)))), ValidationError::TimeClaimInvalid("nbf"));
    assert_eq!(err(&tok(with(claims(), "iat", json!(null)))), ValidationError::TimeClaimInvalid("iat"));
    match err(&tok(with(claims(), "exp", json!(t0 - 31)))) {
        ValidationError::Expired { exp, leeway: 30, .. } => assert_eq!(exp, t0 - 31),
        e => panic!("{e:?}"),
    }
    // Within leeway: accepted. Fractional NumericDate: accepted.
    assert!(check(&tok(with(claims(), "exp", json!(t0 - 20)))).is_ok());
    assert!(check(&tok(with(claims(), "exp", json!(t0 as f64 + 100.5)))).is_ok());
    assert!(
        matches!(err(&tok(with(claims(), "nbf", json!(t0 + 60)))), ValidationError::NotYetValid { nbf, .. } if nbf == t0 + 60)
    );
    assert!(check(&tok(with(claims(), "nbf", json!(t0 + 20)))).is_ok());
    assert!(
        matches!(err(&tok(with(claims(), "iat", json!(t0 + 60)))), ValidationError::IssuedInFuture { iat, .. } if iat == t0 + 60)
    );
    let strict = policy().leeway_secs(0);
    assert!(matches!(
        check_with(strict, &tok(with(claims(), "exp", json!(t0 - 1)))).unwrap_err(),
        ValidationError::Expired { .. }
    ));
}

#[test]
fn issuer_rules() {
    let k = &keys().rsa;
    let tok = |c: Value| k.token(at(), &c);
    assert_eq!(err(&tok(without(claims(), "iss"))), ValidationError::IssuerMissing);
    assert_eq!(err(&tok(with(claims(), "iss", json!([ISS])))), ValidationError::IssuerInvalid);
    for other in [
        "https://idp.example.com",
        "https://idp.example.com//",
        "https://IDP.example.com/",
        "https://evil.example/",
    ] {
        assert_eq!(
            err(&tok(with(claims(), "iss", json!(other)))),
            ValidationError::IssuerMismatch { got: Quoted::new(other), expected: Quoted::new(ISS) }
        );
    }
}

#[test]
fn audience_rules() {
    let k = &keys().rsa;
    let tok = |c: Value| k.token(at(), &c);
    assert_eq!(err(&tok(without(claims(), "aud"))), ValidationError::AudienceMissing);
    assert_eq!(err(&tok(with(claims(), "aud", json!("https://other")))), ValidationError::AudienceMismatch);
    assert_eq!(err(&tok(with(claims(), "aud", json!(["a", "b"])))), ValidationError::AudienceMismatch);
    assert_eq!(err(&tok(with(claims(), "aud", json!(5)))), ValidationError::AudienceInvalid);
    assert_eq!(err(&tok(with(claims(), "aud", json!([AUD, 5])))), ValidationError::AudienceInvalid);
    assert!(check(&tok(with(claims(), "aud", json!(["other", AUD])))).is_ok());
    let two = policy().audiences(["x", "y"]);
    assert!(check_with(two, &tok(with(claims(), "aud", json!("y")))).is_ok());
    let skip = Policy::builder(ISS).insecure_skip_audience(true);
    assert!(check_with(skip, &tok(with(claims(), "aud", json!("anything")))).is_ok());
}

#[test]
fn scope_rules() {
    let k = &keys().rsa;
    let tok = |c: Value| k.token(at(), &c);
    let need = || policy().required_scopes(["db:read", "db:write"]);
    assert_eq!(
        check_with(need(), &tok(claims())).unwrap_err(),
        ValidationError::ScopeMissing(Quoted::new("db:write"))
    );
    let c = with(without(claims(), "scope"), "scp", json!(["db:read", "db:write"]));
    assert_eq!(check_with(need(), &tok(c)).unwrap().scopes, vec!["db:read", "db:write"]);
    let c = with(claims(), "scope", json!("db:read db:write"));
    assert!(check_with(need(), &tok(c)).is_ok());
    // A scope that is a prefix of a granted one is not granted.
    let c = with(claims(), "scope", json!("db:readonly db:write"));
    assert_eq!(
        check_with(need(), &tok(c)).unwrap_err(),
        ValidationError::ScopeMissing(Quoted::new("db:read"))
    );
}

#[test]
fn token_type_rules() {
    let k = &keys().rsa;
    let c = claims();
    let plain = k.token(json!({"typ": "JWT"}), &c);
    assert_eq!(err(&plain), ValidationError::TypeNotAccepted(Quoted::new("JWT")));
    let none = k.token(json!({}), &c);
    assert_eq!(err(&none), ValidationError::TypeNotAccepted(Quoted::new("(none)")));
    let other = k.token(json!({"typ": "id+jwt"}), &c);
    assert_eq!(err(&other), ValidationError::TypeNotAccepted(Quoted::new("id+jwt")));
    assert!(check(&k.token(json!({"typ": "application/at+jwt"}), &c)).is_ok());
    assert!(check(&k.token(json!({"typ": "AT+JWT"}), &c)).is_ok());
    let generic = || policy().accept_generic_typ(true);
    assert!(check_with(generic(), &plain).is_ok());
    assert!(check_with(generic(), &none).is_ok());
    assert_eq!(
        check_with(generic(), &other).unwrap_err(),
        ValidationError::TypeNotAccepted(Quoted::new("id+jwt"))
    );
}

#[test]
fn identity_rules() {
    let k = &keys().rsa;
    let tok = |c: Value| k.token(at(), &c);
    assert_eq!(err(&tok(without(claims(), "sub"))), ValidationError::IdentityMissing(Quoted::new("sub")));
    assert_eq!(
        err(&tok(with(claims(), "sub", json!("")))),
        ValidationError::IdentityMissing(Quoted::new("sub"))
    );
    assert_eq!(
        err(&tok(with(claims(), "sub", json!({"a": 1})))),
        ValidationError::IdentityMissing(Quoted::new("sub"))
    );
    let email = policy().identity_claim("email");
    let v = check_with(email, &tok(with(claims(), "email", json!("alice@example.com")))).unwrap();
    assert_eq!(v.identity, "alice@example.com");
    assert_eq!(v.subject.as_deref(), Some("alice"));
    let nested = policy().identity_claim("user.name");
    let v = check_with(nested, &tok(with(claims(), "user", json!({"name": "al"})))).unwrap();
    assert_eq!(v.identity, "al");
    let q = policy().identity_form(IdentityForm::IssuerQualified);
    assert_eq!(check_with(q, &tok(claims())).unwrap().identity, format!("{ISS}#alice"));
}

#[test]
fn roles_and_claims_returned() {
    let k = &keys().rsa;
    let c = with(claims(), "https://gprxy.io/roles", json!(["app_writer", "app_reader"]));
    let p = policy().role_claim(Some("https://gprxy.io/roles".into()));
    let v = check_with(p, &k.token(at(), &c)).unwrap();
    assert_eq!(v.roles, vec!["app_writer", "app_reader"]);
    assert_eq!(v.claims.get("sub"), Some(&json!("alice")));
    assert_eq!(v.issuer, ISS);
    assert_eq!(v.expires_at, c["exp"].as_i64().unwrap());
}

#[test]
fn error_messages_never_contain_the_token() {
    let k = &keys().rsa;
    let secretish = "s3cr3t-looking-claim-value";
    for c in [with(claims(), "iss", json!(secretish)), with(claims(), "exp", json!(1))] {
        let t = k.token(at(), &c);
        let e = err(&t);
        let msg = e.to_string();
        assert!(!msg.contains(&t) && !msg.contains(t.split('.').nth(1).unwrap()), "{msg}");
    }
    // Attacker strings are shortened and escaped.
    let long = format!("{}\n\u{7}", "x".repeat(500));
    let e = err(&k.token(at(), &with(claims(), "iss", json!(long))));
    let msg = e.to_string();
    assert!(msg.len() < 400 && !msg.contains('\n') && !msg.contains('\u{7}'), "{msg}");
}

#[test]
fn peek_claim_reads_without_checking() {
    let t = keys().rsa.token(at(), &with(claims(), "user", json!({"email": "a@x"})));
    assert_eq!(gprxy_core::peek_claim(&t, "user.email").as_deref(), Some("a@x"));
    assert_eq!(gprxy_core::peek_claim(&t, "sub").as_deref(), Some("alice"));
    assert_eq!(gprxy_core::peek_claim(&t, "missing"), None);
    assert_eq!(gprxy_core::peek_claim("not a token", "sub"), None);
}

#[test]
fn codes_are_stable() {
    assert_eq!(ValidationError::AlgNone.code(), "alg_none");
    assert_eq!(ValidationError::BadSignature.code(), "bad_signature");
    assert_eq!(ValidationError::Expired { exp: 0, now: 0, leeway: 0 }.code(), "expired");
    assert_eq!(ValidationError::Malformed(Malformed::Padding).code(), "malformed");
}

#[test]
fn required_claims_refuse_a_token_from_another_repository() {
    let required =
        gprxy_core::RequiredClaims::parse("repository in (acme/app | acme/infra), environment = prod")
            .unwrap();
    let p = || policy().required_claims(required.clone());
    let k = &keys().rsa;
    let evil =
        k.token(at(), &with(with(claims(), "repository", json!("evil/x")), "environment", json!("prod")));
    assert_eq!(
        check_with(p(), &evil).unwrap_err(),
        ValidationError::RequiredClaim {
            claim: Quoted::new("repository"),
            constraint: "must be one of \"acme/app\", \"acme/infra\"".into(),
            found: "\"evil/x\"".into(),
        }
    );
    assert_eq!(
        check_with(p(), &evil).unwrap_err().to_string(),
        "required claim \"repository\" must be one of \"acme/app\", \"acme/infra\" (token: \"evil/x\")"
    );
    // Without the constraint the same token is accepted: that is the hole it closes.
    assert!(check(&evil).is_ok());
    let good =
        k.token(at(), &with(with(claims(), "repository", json!("acme/app")), "environment", json!("prod")));
    assert_eq!(check_with(p(), &good).unwrap().identity, "alice");
    let dev =
        k.token(at(), &with(with(claims(), "repository", json!("acme/app")), "environment", json!("dev")));
    assert_eq!(
        check_with(p(), &dev).unwrap_err().to_string(),
        "required claim \"environment\" must equal \"prod\" (token: \"dev\")"
    );
    assert_eq!(check_with(p(), &dev).unwrap_err().code(), "required_claim");
    // Checked after the signature and the standard claims: an expired token says expired.
    let old = k.token(at(), &with(with(claims(), "repository", json!("evil/x")), "exp", json!(now() - 600)));
    assert_eq!(check_with(p(), &old).unwrap_err().code(), "expired");
}

/// #27 item 6: a token bound to a key (`cnf`: DPoP `jkt`, mTLS `x5t#S256`) is refused by
/// default, its own reason; an issuer that says it accepts bound tokens as bearer tokens gets
/// them through.
#[test]
fn a_token_bound_to_a_key_is_refused_unless_its_issuer_accepts_it() {
    let k = keys();
    for cnf in [
        json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}),
        json!({"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}),
    ] {
        let t = k.rsa.token(at(), &with(claims(), "cnf", cnf));
        let e = err(&t);
        assert_eq!(e, ValidationError::TokenBound);
        assert_eq!(e.code(), "token_bound");
        assert_eq!(check_with(policy().accept_bound_tokens(true), &t).unwrap().identity, "alice");
    }
    let issuers = gprxy_core::IssuerSet::from_toml(
        &format!("[[issuer]]\nissuer = \"{ISS}\"\naudience = [\"{AUD}\"]\naccept_bound_tokens = true\n"),
        false,
    );
    assert!(issuers.is_ok(), "{:?}", issuers.err());
}

/// #30 item 3: a client-credentials token (here an introspection-like claim set) has
/// `client_id` and no `sub`: with `identity_fallback_claim = "client_id"` it is that client;
/// without, `identity_missing`; a `sub` that is there always wins.
#[test]
fn the_identity_falls_back_to_a_second_claim_when_the_first_is_absent() {
    let k = keys();
    let machine = with(without(claims(), "sub"), "client_id", json!("reporting-job"));
    let t = k.rsa.token(at(), &machine);
    assert_eq!(err(&t), ValidationError::IdentityMissing("sub".into()));
    let fallback = || policy().identity_fallback_claim(Some("client_id".into()));
    assert_eq!(check_with(fallback(), &t).unwrap().identity, "reporting-job");
    let both = k.rsa.token(at(), &with(claims(), "client_id", json!("reporting-job")));
    assert_eq!(check_with(fallback(), &both).unwrap().identity, "alice");
}
