//! `make bench` (connector): what `gprxy connect` adds, against PostgreSQL 18 with
//! gprxy_validator on loopback, with the release binary (`GPRXY_BIN`).
//!
//! 1. Connect latency: a direct TLS + OAUTHBEARER login with the token in hand, against the same
//!    login made by the connector for a client on its loopback TCP listener (client leg plain,
//!    the connector's token cached). Interleaved, `BENCH_ROUNDS` (default 300) each; medians.
//!    Goal: at most 0.5 ms added.
//! 2. Relay CPU: `pgbench -S -c 4 -j 2` for `BENCH_SECONDS` (default 8) through the connector
//!    (its Unix socket, and its loopback TCP listener) and through gprxy pass-through, both with
//!    a plain upstream; the relay process's own CPU time (utime + stime) per transaction, median
//!    of three interleaved rounds. Goal: the connector at most 1.10 times the proxy (the same
//!    within this machine's noise).
//!
//! Exit status 1 when a goal is missed.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Instant;

use gprxy_core::testkit::TestKey;
use gprxy_tests::connector::{write_token_file, Connector};
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{connect, connect_tls, Auth};
use gprxy_tests::proxy::Proxy;
use gprxy_tests::{validator_cluster, PgVersion, TestCerts};
use serde_json::json;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A process's CPU time so far (utime + stime), in seconds.
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process's /proc stat");
    let after_name = stat.rsplit_once(')').expect("stat line").1;
    let f: Vec<u64> = after_name.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    (f[11] + f[12]) as f64 / gprxy_tests::machine::ticks_per_second()
}

/// pgbench -S through `host`/`port`; the relay process `pid`'s CPU per transaction, in µs.
fn relay_cpu_per_tx(host: &str, port: u16, pid: u32) -> (f64, f64) {
    let seconds = env_usize("BENCH_SECONDS", 8).to_string();
    let before = process_cpu(pid);
    let out = Command::new(PgVersion::V18.bin("pgbench"))
        .args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-n",
            "-S",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            &seconds,
        ])
        .arg("postgres")
        .env_remove("PGPASSWORD")
        .output()
        .expect("run pgbench");
    let cpu = process_cpu(pid) - before;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output:\n{text}"))
    };
    let tx = field("number of transactions actually processed: ");
    (cpu * 1e6 / tx, field("tps = "))
}

fn main() {
    assert!(
        std::env::var_os("GPRXY_BIN").is_some(),
        "set GPRXY_BIN to the release binary (make bench does): a debug build measures the wrong thing"
    );
    let key = TestKey::rsa("bench");
    let idp = TestIssuer::start(&[&key]);
    let certs = TestCerts::for_server();
    let pg = validator_cluster("db")
        .conf("log_connections = off")
        .conf("log_min_messages = warning")
        .tls(&certs)
        .hba("host all postgres 127.0.0.1/32 trust")
        .hba(format!(
            "hostssl all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
            idp.issuer()
        ))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN");
    let init = Command::new(PgVersion::V18.bin("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
            "-i",
            "-s",
            "1",
            "-q",
            "postgres",
        ])
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mut claims = idp.claims("alice", "db");
    claims["exp"] = json!(gprxy_core::unix_time() + 3600);
    let token = key.token(json!({"typ": "at+jwt"}), &claims);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("token");
    write_token_file(&file, &token);
    let pg_addr: SocketAddr = ([127, 0, 0, 1], pg.port()).into();
    let mut missed = Vec::new();

    // 1. Connect latency.
    let tls = Connector::start(
        &format!(
            "upstream = \"127.0.0.1:{}\"\ntls.ca_file = \"{}\"\ntls.server_name = \"localhost\"\ntoken.source = \"file\"\ntoken.path = \"{}\"\n",
            pg.port(),
            certs.ca_path.display(),
            file.display()
        ),
        true,
    );
    let via: SocketAddr = ([127, 0, 0, 1], tls.tcp_port.expect("tcp")).into();
    let direct_login = || {
        connect_tls(pg_addr, "alice", "postgres", Auth::Bearer(&token), &certs.ca).expect("direct").close()
    };
    let connector_login =
        || connect(via, "alice", "postgres", Auth::None).expect("through the connector").close();
    for _ in 0..10 {
        direct_login();
        connector_login();
    }
    let rounds = env_usize("BENCH_ROUNDS", 300);
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let time = |f: &dyn Fn(), into: &mut Vec<f64>| {
            let t = Instant::now();
            f();
            into.push(t.elapsed().as_secs_f64() * 1e3);
        };
        if i % 2 == 0 {
            time(&direct_login, &mut direct);
            time(&connector_login, &mut through);
        } else {
            time(&connector_login, &mut through);
            time(&direct_login, &mut direct);
        }
    }
    let (d, t) = (median(direct), median(through));
    let added = t - d;
    let ok = added <= 0.5;
    println!(
        "connect (TLS + OAUTHBEARER, cached token), median of {rounds}: direct {d:.2} ms, through gprxy connect {t:.2} ms, added {added:.2} ms (goal <= 0.5) {}",
        if ok { "ok" } else { "MISSED" }
    );
    if !ok {
        missed.push("connect latency");
    }
    drop(tls);

    // 2. Relay CPU per transaction, plain upstream for both.
    let plain = Connector::start(
        &format!(
            "upstream = \"127.0.0.1:{}\"\ntls.mode = \"insecure-plain-for-tests\"\ntoken.source = \"file\"\ntoken.path = \"{}\"\n",
            pg.port(),
            file.display()
        ),
        true,
    );
    let proxy = Proxy::start(&format!("upstream = \"127.0.0.1:{}\"\n", pg.port()));
    let socket_dir = plain.socket_dir.to_string_lossy().into_owned();
    let (mut unix, mut tcp, mut prox) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        unix.push(relay_cpu_per_tx(&socket_dir, 5432, plain.pid()));
        tcp.push(relay_cpu_per_tx("127.0.0.1", plain.tcp_port.expect("tcp"), plain.pid()));
        prox.push(relay_cpu_per_tx("127.0.0.1", proxy.port, proxy.pid()));
    }
    let cpu = |v: &[(f64, f64)]| median(v.iter().map(|r| r.0).collect());
    let tps = |v: &[(f64, f64)]| median(v.iter().map(|r| r.1).collect());
    let (u, c, p) = (cpu(&unix), cpu(&tcp), cpu(&prox));
    println!("relay CPU per transaction (pgbench -S -c 4 -j 2, median of 3 interleaved rounds):");
    println!("  gprxy connect, Unix socket   {u:6.1} µs  ({:.0} tps)", tps(&unix));
    println!("  gprxy connect, loopback TCP  {c:6.1} µs  ({:.0} tps)", tps(&tcp));
    println!("  gprxy pass-through           {p:6.1} µs  ({:.0} tps)", tps(&prox));
    for (name, v) in [("unix", u), ("tcp", c)] {
        let ratio = v / p;
        let ok = ratio <= 1.10;
        println!(
            "  connector ({name}) / proxy: {ratio:.2} (goal <= 1.10) {}",
            if ok { "ok" } else { "MISSED" }
        );
        if !ok {
            missed.push("relay CPU");
        }
    }
    if !missed.is_empty() {
        eprintln!("missed: {}", missed.join(", "));
        std::process::exit(1);
    }
}
