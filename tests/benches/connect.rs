//! Time per new connection with a warm key cache: OAUTHBEARER through gprxy_validator against
//! SCRAM-SHA-256 on the same PostgreSQL 18 server, in one run. Goal: OAuth no slower than SCRAM.

use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{connect, Auth};
use gprxy_tests::validator_cluster;
use serde_json::json;

fn bench(c: &mut Criterion) {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let pg = validator_cluster("db")
        .conf("log_connections = off")
        .hba("host all scram_user 127.0.0.1/32 scram-sha-256")
        .hba(format!("host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m", idp.issuer()))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE scram_user LOGIN PASSWORD 'a-long-enough-password'; CREATE ROLE alice LOGIN");
    let addr: SocketAddr = ([127, 0, 0, 1], pg.port()).into();
    let mut claims = idp.claims("alice", "db");
    claims["exp"] = json!(gprxy_core::unix_time() + 3600);
    let token = key.token(json!({"typ": "at+jwt"}), &claims);
    // Warm the shared key cache, and check both logins work.
    connect(addr, "alice", "postgres", Auth::Bearer(&token)).expect("oauth login").close();
    connect(addr, "scram_user", "postgres", Auth::Password("a-long-enough-password"))
        .expect("scram login")
        .close();

    let mut g = c.benchmark_group("connect");
    g.sample_size(40).measurement_time(Duration::from_secs(8));
    g.bench_function("scram_sha256", |b| {
        b.iter(|| {
            connect(addr, "scram_user", "postgres", Auth::Password("a-long-enough-password"))
                .map(|c| c.close())
        })
    });
    g.bench_function("oauthbearer", |b| {
        b.iter(|| connect(addr, "alice", "postgres", Auth::Bearer(&token)).map(|c| c.close()))
    });
    g.finish();
    assert!(idp.jwks_requests() <= 2, "{} JWKS fetches during the benchmark", idp.jwks_requests());
}

criterion_group!(benches, bench);
criterion_main!(benches);
