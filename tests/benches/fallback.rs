//! Connect-and-first-query through gprxy's pooled fallback path (TLS, token as password, context
//! set) against a direct SCRAM-SHA-256 connection to the same PostgreSQL 15, in one run.
//! Goal: pooled at most 0.3 of direct.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{connect, connect_tls, Auth};
use gprxy_tests::proxy::{start_signed_context_upstream, ContextKeyFile, FallbackSetup, Proxy};
use gprxy_tests::{Cluster, PgVersion, TestCerts};
use serde_json::json;

fn bench(c: &mut Criterion) {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let certs = TestCerts::new();
    let context_key = ContextKeyFile::create(certs.dir().join("context.key"));
    let pg = start_signed_context_upstream(
        Cluster::builder(PgVersion::V15)
            .conf("log_connections = off")
            .hba("host all app_admin,app_writer,app_reader 127.0.0.1/32 scram-sha-256"),
        &[&context_key.public],
    );
    pg.sql("SET password_encryption = 'scram-sha-256'; ALTER ROLE app_writer PASSWORD 'writer-secret-1'");
    let writer_pw = certs.dir().join("w.pw");
    std::fs::write(&writer_pw, "writer-secret-1").expect("pw");
    let proxy = Proxy::start(
        &FallbackSetup {
            upstream_port: pg.port(),
            cert: &certs.cert_path,
            key: &certs.key_path,
            issuer: &idp.issuer(),
            audience: "db",
            rules: &[("writer", "app_writer", &writer_pw)],
            context_key: Some(&context_key.path),
            extra: "",
        }
        .toml(),
    );
    let mut claims = idp.claims("alice", "db");
    claims["roles"] = json!(["writer"]);
    claims["exp"] = json!(gprxy_core::unix_time() + 3600);
    let token = key.token(json!({"typ": "at+jwt"}), &claims);
    let direct = ([127, 0, 0, 1], pg.port()).into();
    let first = |c: &mut gprxy_tests::pgwire::PgConn| c.scalar("SELECT 1").expect("first query");
    // Warm the key cache and the pool.
    let mut w = connect_tls(proxy.addr(), "alice", "postgres", Auth::Password(&token), &certs.ca)
        .expect("pooled login");
    first(&mut w);
    w.close();

    let mut g = c.benchmark_group("fallback_connect");
    g.sample_size(40).measurement_time(Duration::from_secs(8));
    g.bench_function("direct_scram", |b| {
        b.iter(|| {
            let mut c =
                connect(direct, "app_writer", "postgres", Auth::Password("writer-secret-1")).expect("direct");
            first(&mut c);
            c.close();
        })
    });
    g.bench_function("pooled_fallback", |b| {
        b.iter(|| {
            let mut c = connect_tls(proxy.addr(), "alice", "postgres", Auth::Password(&token), &certs.ca)
                .expect("pooled");
            first(&mut c);
            c.close();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
