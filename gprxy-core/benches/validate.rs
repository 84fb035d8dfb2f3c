//! Warm-cache validation against bare signature verification of the same token, per algorithm.
//! `make bench` prints the ratios (goal: validation at most 1.3x the bare verification).

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gprxy_core::testkit::{jwks, now, TestKey};
use gprxy_core::{
    CacheSettings, HttpSettings, JwksCache, JwksSource, Policy, Snapshot, SystemClock, UreqFetcher, Validator,
};
use serde_json::json;

fn bench(c: &mut Criterion) {
    let iss = "https://idp.example.com/";
    let keys = [
        ("RS256", TestKey::rsa("k")),
        ("PS256", TestKey::rsa("k")),
        ("ES256", TestKey::p256("k")),
        ("EdDSA", TestKey::ed25519("k")),
    ];
    for (alg, key) in &keys {
        let doc = jwks(&[key]).to_string();
        let source = JwksSource::Explicit { jwks_uri: "https://idp.example.com/jwks".into() };
        let cache = JwksCache::new(
            source.clone(),
            Arc::new(UreqFetcher::new(HttpSettings::default()).unwrap()),
            Arc::new(SystemClock),
            CacheSettings::default(),
            false,
        )
        .unwrap();
        let t = (now() as u64) * 1000;
        cache
            .import(&Snapshot {
                source: source.id(),
                jwks_uri: "https://idp.example.com/jwks".into(),
                jwks: doc,
                fetched_at_ms: t,
                expires_at_ms: t + 3_600_000,
            })
            .unwrap();
        let validator = Validator::new(
            Policy::builder(iss)
                .audiences(["https://gprxy.io"])
                .role_claim(Some("https://gprxy.io/roles".into()))
                .required_scopes(["db:read"])
                .build()
                .unwrap(),
        );
        let token = key.token(
            json!({"typ": "at+jwt", "alg": alg}),
            &json!({"iss": iss, "sub": "auth0|65a1b2c3d4e5f6a7b8c9d0e1", "aud": ["https://gprxy.io", "x"],
                    "exp": now() + 86400, "iat": now(), "scope": "openid db:read",
                    "https://gprxy.io/roles": ["app_writer"], "email": "alice@example.com"}),
        );
        let jwk = key.jwk();
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&serde_json::from_value(jwk).unwrap()).unwrap();
        let jalg: jsonwebtoken::Algorithm = alg.parse().unwrap();
        let (input, sig) = token.rsplit_once('.').unwrap();
        assert!(jsonwebtoken::crypto::verify(sig, input.as_bytes(), &decoding, jalg).unwrap());
        assert!(validator.validate(&token, &cache, now()).is_ok());

        let mut g = c.benchmark_group(format!("validate/{alg}"));
        g.bench_function("bare_verify", |b| {
            b.iter(|| {
                jsonwebtoken::crypto::verify(black_box(sig), black_box(input.as_bytes()), &decoding, jalg)
            })
        });
        g.bench_function("validate_warm_cache", |b| {
            b.iter(|| validator.validate(black_box(&token), &cache, now()).map(|v| v.identity.len()))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
