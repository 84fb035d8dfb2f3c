//! `make bench`: pgbench against PostgreSQL 18 direct, through gprxy and through PgBouncer
//! (session mode) in one run, then the cost of a new connection (`pgbench -C`) direct and through
//! gprxy with and without TLS. Prints TPS, latency and ratios; exits non-zero if a goal is missed.
//!
//! Goals: gprxy >= 0.80 of direct and >= 1.2 of PgBouncer (select-only TPS); TLS through gprxy
//! adds at most 1 ms per new connection.

use std::process::Command;

use gprxy_tests::pgwire::{self, Auth};
use gprxy_tests::proxy::Proxy;
use gprxy_tests::{
    command_as_test_user, free_port, running_as_root, test_user, Cluster, PgVersion, TestCerts,
};

/// Seconds per pgbench run (`BENCH_SECONDS`).
fn seconds() -> String {
    std::env::var("BENCH_SECONDS").unwrap_or_else(|_| "10".into())
}

/// Rounds (`BENCH_ROUNDS`): every target runs once per round, in turn, so that the machine's
/// drift over a minute hits all of them alike; the median round counts.
fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A pgbench target: port, extra arguments, environment.
type Target<'a> = (u16, &'a [&'a str], &'a [(&'a str, &'a str)]);

/// Runs each target once per round, interleaved; returns the per-target median run.
fn interleaved(targets: &[Target<'_>]) -> Vec<Run> {
    let mut all: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds() {
        for (i, (port, extra, env)) in targets.iter().enumerate() {
            all[i].push(pgbench(*port, extra, env));
        }
    }
    all.into_iter()
        .map(|runs| Run {
            tps: median(runs.iter().map(|r| r.tps).collect()),
            latency_ms: median(runs.iter().map(|r| r.latency_ms).collect()),
            busy_us: median(runs.iter().map(|r| r.busy_us).collect()),
            switches: median(runs.iter().map(|r| r.switches).collect()),
        })
        .collect()
}

struct Run {
    tps: f64,
    latency_ms: f64,
    /// CPU time of the whole machine (every process and the kernel) per transaction, in µs:
    /// what the work costs, whatever the scheduler did with it.
    busy_us: f64,
    /// Context switches of the whole machine per transaction: each is a process put to sleep and
    /// another woken, which costs more CPU than the work a proxy does per message.
    switches: f64,
}

fn pgbench(port: u16, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(PgVersion::V18.bin("pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-n", "-S", "-T", &seconds()])
        .args(extra)
        .arg("postgres");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (busy_before, ctxt_before) = gprxy_tests::machine::counters();
    let out = cmd.output().expect("run pgbench");
    let (busy_after, ctxt_after) = gprxy_tests::machine::counters();
    let busy = (busy_after - busy_before) as f64 / gprxy_tests::machine::ticks_per_second();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output:\n{text}"))
    };
    let transactions = field("number of transactions actually processed: ");
    Run {
        tps: field("tps = "),
        latency_ms: field("latency average = "),
        busy_us: busy * 1e6 / transactions,
        switches: (ctxt_after - ctxt_before) as f64 / transactions,
    }
}

fn print_table(rows: &[(&str, &Run)]) {
    println!(
        "  {:<22} {:>10} {:>9} {:>22} {:>13}",
        "", "tps", "latency", "machine CPU per tx", "switches/tx"
    );
    for (name, r) in rows {
        println!(
            "  {name:<22} {:>10.0} {:>6.3} ms {:>19.1} µs {:>13.2}",
            r.tps, r.latency_ms, r.busy_us, r.switches
        );
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// What an idle session costs a proxy: `IDLE_SESSIONS` clients connect through `port`, each
/// reads a 200 kB value (so that relay buffers grow), then all stay connected while the proxy's
/// resident memory is read. KiB per session.
fn idle_session_kib(port: u16, pid: u32) -> f64 {
    const IDLE_SESSIONS: usize = 100;
    let before = rss_kib(pid);
    let sessions: Vec<_> = (0..IDLE_SESSIONS)
        .map(|_| {
            let mut c = pgwire::connect(([127, 0, 0, 1], port).into(), "postgres", "postgres", Auth::None)
                .expect("connect");
            assert_eq!(
                c.scalar("SELECT repeat('x', 200000)").expect("query").map(|v| v.len()),
                Some(200_000)
            );
            c
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let per_session = (rss_kib(pid) - before) / IDLE_SESSIONS as f64;
    sessions.into_iter().for_each(pgwire::PgConn::close);
    per_session
}

/// PgBouncer in session mode in front of `pg_host` (an address, or a socket folder) and port.
fn start_pgbouncer(dir: &std::path::Path, pg_host: &str, pg_port: u16) -> (std::process::Child, u16) {
    let port = free_port();
    std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").expect("userlist");
    std::fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\npostgres = host={pg_host} port={pg_port} dbname=postgres\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\n\
             auth_file = {}/userlist.txt\npool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 110\n\
             logfile = {}/pgbouncer.log\npidfile = {}/pgbouncer.pid\n",
            dir.display(),
            dir.display(),
            dir.display()
        ),
    )
    .expect("pgbouncer.ini");
    if running_as_root() {
        let _ = Command::new("chown").arg("-R").arg(test_user()).arg(dir).status();
    }
    let mut child = command_as_test_user("/usr/sbin/pgbouncer")
        .arg(dir.join("pgbouncer.ini"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start pgbouncer");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (child, port);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "pgbouncer did not start: {}",
        std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
    );
}

fn main() {
    let ok = run();
    println!("{}", if ok { "all goals met" } else { "GOALS MISSED" });
    if !ok {
        std::process::exit(1);
    }
}

/// Runs everything; servers are stopped when it returns.
fn run() -> bool {
    // One certificate for PostgreSQL's own TLS and gprxy's, readable by the server's OS user.
    let certs = TestCerts::for_server();
    let (cert_path, key_path) = (&certs.cert_path, &certs.key_path);
    let pg = Cluster::builder(PgVersion::V18)
        .conf("log_connections = off")
        .conf("max_connections = 300")
        .conf("ssl = on")
        .conf(format!("ssl_cert_file = '{}'", cert_path.display()))
        .conf(format!("ssl_key_file = '{}'", key_path.display()))
        .hba("host all postgres 127.0.0.1/32 trust")
        .start();
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
            "10",
            "-q",
            "postgres",
        ])
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    let proxy = Proxy::start(&format!(
        "upstream = \"127.0.0.1:{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        pg.port(),
        cert_path.display(),
        key_path.display()
    ));
    // The same with one session thread, as on a host shared with PostgreSQL (informational).
    let proxy_one =
        Proxy::start(&format!("upstream = \"127.0.0.1:{}\"\n[limits]\nworker_threads = 1\n", pg.port()));
    let bouncer_dir = tempfile::tempdir().expect("dir");
    let (mut bouncer, bouncer_port) = start_pgbouncer(bouncer_dir.path(), "127.0.0.1", pg.port());
    // The same two over the server's Unix socket (both on the server's host).
    let socket = pg.root().join(format!(".s.PGSQL.{}", pg.port()));
    let proxy_unix = Proxy::start(&format!("upstream = \"{}\"\n", socket.display()));
    let bouncer_unix_dir = tempfile::tempdir().expect("dir");
    let (mut bouncer_unix, bouncer_unix_port) =
        start_pgbouncer(bouncer_unix_dir.path(), &pg.root().display().to_string(), pg.port());

    let load = ["-c", "8", "-j", "2"];
    let plain = [("PGSSLMODE", "disable")];
    println!(
        "pgbench -S -c 8 -j 2 -T {}, scale 10, PostgreSQL 18 on loopback; median of {} interleaved rounds",
        seconds(),
        rounds()
    );
    let r = interleaved(&[
        (pg.port(), &load, &plain),
        (proxy.port, &load, &plain),
        (bouncer_port, &load, &plain),
        (proxy_unix.port, &load, &plain),
        (bouncer_unix_port, &load, &plain),
        (proxy_one.port, &load, &plain),
    ]);
    let (direct, via_gprxy, via_bouncer) = (&r[0], &r[1], &r[2]);
    let (gprxy_unix, bouncer_unix_run, gprxy_one) = (&r[3], &r[4], &r[5]);
    print_table(&[
        ("direct", direct),
        ("gprxy", via_gprxy),
        ("pgbouncer (session)", via_bouncer),
        ("gprxy, unix upstream", gprxy_unix),
        ("pgbouncer, unix up.", bouncer_unix_run),
        ("gprxy, 1 worker thread", gprxy_one),
    ]);
    let vs_direct = via_gprxy.tps / direct.tps;
    let vs_bouncer = via_gprxy.tps / via_bouncer.tps;
    println!("  gprxy/direct    {vs_direct:.3} (goal >= 0.80)");
    println!("  gprxy/pgbouncer {vs_bouncer:.3} (goal >= 1.20)");
    // With every core busy, TPS follows CPU per transaction: 1.2 x PgBouncer's TPS leaves a proxy
    // PgBouncer's CPU per transaction / 1.2, minus what the same transaction costs direct.
    println!(
        "  CPU added per transaction: gprxy {:.1} µs, pgbouncer {:.1} µs; 1.2 x pgbouncer's TPS would allow {:.1} µs",
        via_gprxy.busy_us - direct.busy_us,
        via_bouncer.busy_us - direct.busy_us,
        via_bouncer.busy_us / 1.2 - direct.busy_us
    );
    println!(
        "  with Unix socket upstreams (informational): gprxy/direct {:.3}, gprxy/pgbouncer {:.3}",
        gprxy_unix.tps / direct.tps,
        gprxy_unix.tps / bouncer_unix_run.tps
    );

    let bouncer_pid = |dir: &tempfile::TempDir| -> u32 {
        let pid = std::fs::read_to_string(dir.path().join("pgbouncer.pid")).expect("pgbouncer.pid");
        pid.trim().parse().expect("a pid")
    };
    let (gprxy_kib, bouncer_kib) = (
        idle_session_kib(proxy.port, proxy.pid()),
        idle_session_kib(bouncer_port, bouncer_pid(&bouncer_dir)),
    );
    println!(
        "memory per idle session (100 sessions, each after a 200 kB result; informational): gprxy {gprxy_kib:.1} KiB, pgbouncer {bouncer_kib:.1} KiB"
    );

    println!(
        "pgbench -S -C -c 4 -j 2 -T {}: a new connection per transaction (median of {} rounds)",
        seconds(),
        rounds()
    );
    let conn = ["-C", "-c", "4", "-j", "2"];
    let tls = [("PGSSLMODE", "require")];
    let r = interleaved(&[
        (pg.port(), &conn, &plain),
        (proxy.port, &conn, &plain),
        (pg.port(), &conn, &tls),
        (proxy.port, &conn, &tls),
    ]);
    let (c_direct, c_plain, c_direct_tls, c_tls) = (&r[0], &r[1], &r[2], &r[3]);
    print_table(&[
        ("direct", c_direct),
        ("gprxy", c_plain),
        ("direct, TLS", c_direct_tls),
        ("gprxy, TLS", c_tls),
    ]);
    let added_plain = c_plain.latency_ms - c_direct.latency_ms;
    let added_tls = c_tls.latency_ms - c_direct_tls.latency_ms;
    println!(
        "  added per connection by gprxy: plain {added_plain:.3} ms, TLS (terminated by gprxy vs by PostgreSQL) {added_tls:.3} ms (goal <= 1.0 ms)"
    );

    // runuser is the child; pgbouncer itself is found by its pid file.
    for (dir, child) in [(&bouncer_dir, &mut bouncer), (&bouncer_unix_dir, &mut bouncer_unix)] {
        if let Ok(pid) = std::fs::read_to_string(dir.path().join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = child.wait();
    }
    vs_direct >= 0.80 && vs_bouncer >= 1.20 && added_tls <= 1.0
}
