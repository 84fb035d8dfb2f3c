//! Three gprxy replicas (fallback mode, PostgreSQL 15) behind HAProxy (Debian's package, run as a
//! child process: TCP mode, `/healthz` on each replica's admin port as the health check). Clients
//! write through HAProxy in a loop that reconnects on failure (and every few writes anyway, as
//! an application pool recycles connections) while one replica is killed with SIGKILL and
//! another is stopped with SIGTERM (it drains) and started again. Every write a client saw
//! committed must be in the table, none twice; writes whose connection broke before their answer
//! are counted apart (in doubt: committed or not) and may be there at most once.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{connect_tls, Auth, PgConn};
use gprxy_tests::proxy::{FallbackSetup, Proxy};
use gprxy_tests::{apply_sql_file, free_port, Cluster, PgVersion, TestCerts};
use serde_json::json;

const HAPROXY: &str = "/usr/sbin/haproxy";
const CLIENTS: usize = 3;
/// Writes on one connection before the client opens a new one.
const WRITES_PER_CONNECTION: usize = 10;

/// HAProxy in the foreground with a config in a temporary folder; killed on drop.
struct Haproxy {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

/// The HAProxy configuration the README shows, with the test's ports and faster checks.
fn haproxy_config(dir: &Path, port: u16, replicas: &[(u16, u16)]) -> String {
    let mut cfg = format!(
        "global\n    maxconn 256\n    stats socket {}/admin.sock mode 600 level admin\n\
         \n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1h\n    timeout server 1h\n\
         \x20   retries 3\n    option redispatch 1\n\
         \n\
         frontend postgres\n    bind 127.0.0.1:{port}\n    default_backend gprxy\n\
         \n\
         backend gprxy\n    balance roundrobin\n    option httpchk\n\
         \x20   http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host gprxy\n\
         \x20   http-check expect status 200\n    default-server inter 200ms fall 1 rise 1\n",
        dir.display()
    );
    for (i, (client, admin)) in replicas.iter().enumerate() {
        cfg.push_str(&format!("    server g{} 127.0.0.1:{client} check port {admin}\n", i + 1));
    }
    cfg
}

impl Haproxy {
    fn start(replicas: &[(u16, u16)]) -> Self {
        assert!(
            Path::new(HAPROXY).exists(),
            "{HAPROXY} is missing: scripts/bootstrap.sh installs Debian's haproxy (make test runs it)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(dir.path(), port, replicas)).unwrap();
        let check = Command::new(HAPROXY).arg("-c").arg("-f").arg(&cfg).output().expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy refuses the config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start haproxy");
        let h = Self { child, dir, port };
        h.wait(
            || h.dir.path().join("admin.sock").exists() && h.try_stat().is_some(),
            "HAProxy's stats socket",
        );
        h
    }

    fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    /// The stats socket (`show stat`, `show sess`).
    fn socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// `show stat` on the stats socket: server name -> (status, sessions so far).
    fn try_stat(&self) -> Option<BTreeMap<String, (String, u64)>> {
        let mut s = std::os::unix::net::UnixStream::connect(self.dir.path().join("admin.sock")).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (sv, st, stot) = (col("svname")?, col("status")?, col("stot")?);
        Some(
            lines
                .map(|l| l.split(',').collect::<Vec<_>>())
                .filter(|f| f.len() > stot && f[0] == "gprxy" && f[sv].starts_with('g'))
                .map(|f| (f[sv].to_owned(), (f[st].to_owned(), f[stot].parse().unwrap_or(0))))
                .collect(),
        )
    }

    fn status(&self, server: &str) -> String {
        self.try_stat().and_then(|s| s.get(server).map(|v| v.0.clone())).unwrap_or_default()
    }

    fn wait_status(&self, server: &str, want: &str) {
        self.wait(|| self.status(server) == want, &format!("HAProxy to see {server} {want}"));
    }

    fn wait(&self, cond: impl Fn() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < deadline, "no {what} within 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- haproxy log -----\n{}\n----- end -----", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Writes answered with CommandComplete and ReadyForQuery.
    committed: Vec<String>,
    /// Writes whose connection broke before the answer: committed or not.
    in_doubt: Vec<String>,
    /// Writes refused with an error (none expected).
    failed: Vec<String>,
    connections: usize,
    failed_connects: usize,
}

/// A client loop. `pin`: first get a connection that HAProxy sent to this replica (reconnecting
/// until it does) and keep it, writing, until it breaks; from then on, or without `pin`, open a
/// new connection every [`WRITES_PER_CONNECTION`] writes.
struct Client {
    id: usize,
    addr: SocketAddr,
    lb_socket: PathBuf,
    ca: String,
    token: String,
    pin: Option<&'static str>,
    stop: Arc<AtomicBool>,
    /// Writes seen committed, by all clients.
    committed: Arc<AtomicUsize>,
    /// Writes seen committed, by this one.
    mine: Arc<AtomicUsize>,
}

impl Client {
    fn run(self) -> Seen {
        let mut seen = Seen::default();
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut pin = self.pin;
        let mut conn: Option<PgConn> = None;
        let mut on_this_connection = 0;
        let mut seq = 0;
        while !self.stop.load(Ordering::Relaxed) && Instant::now() < deadline && seq < 20_000 {
            if conn.is_none() {
                match connect_tls(self.addr, "alice", "postgres", Auth::Password(&self.token), &self.ca) {
                    Ok(c) => {
                        seen.connections += 1;
                        on_this_connection = 0;
                        if let Some(want) = pin {
                            let port = c.local_addr().expect("local address").port();
                            if server_of(&self.lb_socket, port).as_deref() != Some(want) {
                                assert!(seen.connections < 500, "HAProxy sent no connection to {want}");
                                c.close();
                                continue;
                            }
                        }
                        conn = Some(c);
                    }
                    Err(_) => {
                        seen.failed_connects += 1;
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
            }
            let key = format!("c{}-{seq}", self.id);
            seq += 1;
            let Some(c) = conn.as_mut() else { continue };
            match c.query(&format!("INSERT INTO writes (k) VALUES ('{key}')")) {
                Ok(_) => {
                    seen.committed.push(key);
                    self.committed.fetch_add(1, Ordering::Relaxed);
                    self.mine.fetch_add(1, Ordering::Relaxed);
                }
                // An ERROR leaves the session usable and the write undone.
                Err(e) if e.severity == "ERROR" => seen.failed.push(format!("{key}: {e}")),
                // The connection broke (or the session was ended): the answer never came.
                Err(_) => {
                    seen.in_doubt.push(key);
                    conn = None;
                    pin = None;
                    continue;
                }
            }
            on_this_connection += 1;
            if pin.is_none() && on_this_connection >= WRITES_PER_CONNECTION {
                if let Some(c) = conn.take() {
                    c.close();
                }
            }
        }
        if let Some(c) = conn.take() {
            c.close();
        }
        seen
    }
}

/// The server HAProxy sent the session from this client port to (`show sess`).
fn server_of(socket: &Path, client_port: u16) -> Option<String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.write_all(b"show sess\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let src = format!(" src=127.0.0.1:{client_port} ");
    let line = text.lines().find(|l| l.contains(&src))?;
    line.split_whitespace().find_map(|f| f.strip_prefix("srv=")).map(str::to_owned)
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "no {what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn logins(p: &Proxy) -> usize {
    p.events("login").iter().filter(|e| e["outcome"] == "success").count()
}

#[test]
fn writes_through_haproxy_survive_a_killed_and_a_restarted_replica() {
    let started = Instant::now();
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let certs = TestCerts::new();
    let pg = Cluster::builder(PgVersion::V15).hba("host all app_writer 127.0.0.1/32 scram-sha-256").start();
    apply_sql_file(&pg, "postgres", "01_roles.sql");
    pg.sql(
        "SET password_encryption = 'scram-sha-256'; ALTER ROLE app_writer PASSWORD 'writer-secret-1'; \
         CREATE TABLE writes (k text NOT NULL, at timestamptz NOT NULL DEFAULT now()); \
         GRANT INSERT, SELECT ON writes TO app_writer",
    );
    let pw = certs.dir().join("writer.pw");
    std::fs::write(&pw, "writer-secret-1\n").unwrap();
    let toml = format!(
        "{}\n[limits]\nshutdown_grace_ms = 5000\n",
        FallbackSetup {
            upstream_port: pg.port(),
            cert: &certs.cert_path,
            key: &certs.key_path,
            issuer: &idp.issuer(),
            audience: "db",
            rules: &[("writer", "app_writer", &pw)],
            context_key: None,
            extra: "signed_context = false\n",
        }
        .toml()
    );
    let mut replicas: Vec<Proxy> = (0..3).map(|_| Proxy::start(&toml)).collect();
    let ports: Vec<(u16, u16)> = replicas.iter().map(|p| (p.port, p.admin_port)).collect();
    let lb = Haproxy::start(&ports);
    for g in ["g1", "g2", "g3"] {
        lb.wait_status(g, "UP");
    }

    let mut claims = idp.claims("alice", "db");
    claims["roles"] = json!(["writer"]);
    claims["exp"] = json!(gprxy_core::unix_time() + 600);
    let token = key.token(json!({"typ": "at+jwt"}), &claims);
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicUsize::new(0));
    // Three clients that reconnect every few writes, and two that hold on to a session on g1
    // and on g2 (so that the kill and the stop each find a session to end).
    let victims: [Arc<AtomicUsize>; 2] = Default::default();
    let clients: Vec<_> = (0..CLIENTS + 2)
        .map(|id| {
            let client = Client {
                id,
                addr: lb.addr(),
                lb_socket: lb.socket(),
                ca: certs.ca.clone(),
                token: token.clone(),
                pin: [None, None, None, Some("g1"), Some("g2")][id],
                stop: stop.clone(),
                committed: committed.clone(),
                mine: victims.get(id.wrapping_sub(CLIENTS)).cloned().unwrap_or_default(),
            };
            std::thread::spawn(move || client.run())
        })
        .collect();
    let progress = |more: usize| {
        let target = committed.load(Ordering::Relaxed) + more;
        wait_for(&format!("{more} more committed writes"), Duration::from_secs(60), || {
            committed.load(Ordering::Relaxed) >= target
        });
    };

    // Load on every replica, and a session held on g1 and one on g2.
    wait_for("logins on every replica", Duration::from_secs(60), || replicas.iter().all(|p| logins(p) >= 2));
    wait_for("the held sessions' first writes", Duration::from_secs(60), || {
        victims.iter().all(|v| v.load(Ordering::Relaxed) > 0)
    });
    progress(30);

    // g1 dies at once: its sessions break, HAProxy's check finds it down, and new connections
    // go to the others (a connection HAProxy tried on g1 is dispatched again).
    replicas[0].signal("KILL");
    lb.wait_status("g1", "DOWN");
    progress(60);

    // g2 is stopped as systemd stops it (SIGTERM): /healthz answers 503 (HAProxy marks it down),
    // it accepts nothing new, and its sessions go on for shutdown_grace_ms; then they are cut,
    // it exits, and it starts again on the same ports.
    replicas[1].signal("TERM");
    lb.wait_status("g2", "DOWN");
    let before = victims[1].load(Ordering::Relaxed);
    wait_for("a write on g2's held session while g2 drains", Duration::from_secs(4), || {
        victims[1].load(Ordering::Relaxed) > before
    });
    assert!(replicas[1].running(), "g2 exited before its grace period ended");
    wait_for("g2 to exit", Duration::from_secs(30), || !replicas[1].running());
    progress(30);
    let (port, admin) = ports[1];
    let restarted = Proxy::spawn_at(port, admin, &toml);
    lb.wait_status("g2", "UP");
    wait_for("logins on the restarted g2", Duration::from_secs(60), || logins(&restarted) >= 2);
    progress(60);

    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = clients.into_iter().map(|c| c.join().expect("client thread")).collect();

    // ---------------------------------------------------------------- the table against the clients
    let rows = pg.sql("SELECT k FROM writes");
    let mut in_table: HashMap<&str, usize> = HashMap::new();
    for k in rows.lines() {
        *in_table.entry(k).or_default() += 1;
    }
    let twice: Vec<_> = in_table.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "written more than once: {twice:?}");
    let committed: Vec<&String> = seen.iter().flat_map(|s| &s.committed).collect();
    let missing: Vec<_> = committed.iter().filter(|k| !in_table.contains_key(k.as_str())).collect();
    assert!(missing.is_empty(), "seen committed but not in the table: {missing:?}");
    let in_doubt: Vec<&String> = seen.iter().flat_map(|s| &s.in_doubt).collect();
    let doubt_landed = in_doubt.iter().filter(|k| in_table.contains_key(k.as_str())).count();
    let failed: Vec<&String> = seen.iter().flat_map(|s| &s.failed).collect();
    assert!(failed.is_empty(), "writes refused: {failed:?}");
    let attempted: std::collections::HashSet<&str> =
        committed.iter().chain(in_doubt.iter()).map(|k| k.as_str()).collect();
    let unknown: Vec<_> = in_table.keys().filter(|k| !attempted.contains(*k)).collect();
    assert!(unknown.is_empty(), "rows no client wrote: {unknown:?}");
    assert_eq!(in_table.len(), committed.len() + doubt_landed);
    // The sessions held on g1 and g2 broke (the kill, the end of the grace period).
    for (victim, replica) in seen[CLIENTS..].iter().zip(["g1", "g2"]) {
        assert!(!victim.in_doubt.is_empty(), "the session held on {replica} did not break");
    }

    let per_replica: Vec<(&str, usize)> = vec![
        ("g1 (killed)", logins(&replicas[0])),
        ("g2 (stopped)", logins(&replicas[1])),
        ("g2 (restarted)", logins(&restarted)),
        ("g3", logins(&replicas[2])),
    ];
    let serving = per_replica.iter().filter(|(_, n)| *n > 0).count();
    assert_eq!(serving, 4, "{per_replica:?}");
    // Each replica that served a login asked the issuer twice, on its own: discovery, then the
    // key set (cached from then on).
    assert_eq!(idp.jwks_requests(), serving, "one key fetch per replica process");
    assert_eq!(idp.request_count(), 2 * serving as u64, "discovery and keys, per replica process");

    let stat = lb.try_stat().unwrap_or_default();
    // Straight to stderr, past the test harness's capture: `make test` shows the counts.
    use std::io::Write as _;
    let mut out = std::io::stderr().lock();
    let _ = writeln!(
        out,
        "scale-out: {} writes seen committed, all in the table once; {} in doubt (connection lost \
         before the answer), {} of them committed; {} rows in the table",
        committed.len(),
        in_doubt.len(),
        doubt_landed,
        in_table.len()
    );
    let _ = writeln!(
        out,
        "scale-out: {} connections through HAProxy, {} connection attempts failed; logins per \
         replica: {per_replica:?}; HAProxy sessions per server: {stat:?}; IdP requests: {} ({} key fetches); {:.1} s",
        seen.iter().map(|s| s.connections).sum::<usize>(),
        seen.iter().map(|s| s.failed_connects).sum::<usize>(),
        idp.request_count(),
        idp.jwks_requests(),
        started.elapsed().as_secs_f64()
    );
    drop(restarted);
    replicas.clear();
}
