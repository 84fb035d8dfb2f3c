//! gprxy in pass-through mode in front of PostgreSQL 18 with gprxy_validator.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use gprxy_core::testkit::{test_ca, TestKey};
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{self, Auth};
use gprxy_tests::proxy::Proxy;
use gprxy_tests::{oauth_psql_with, validator_cluster, Cluster, PgVersion, TestCerts};
use serde_json::json;

struct World {
    idp: TestIssuer,
    key: TestKey,
    pg: Cluster,
    certs: TestCerts,
}

impl World {
    fn start() -> Self {
        let key = TestKey::rsa("k");
        let idp = TestIssuer::start(&[&key]);
        let pg = validator_cluster("db")
            .hba("host all plain_user 127.0.0.1/32 trust")
            .hba(format!(
                "host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
                idp.issuer()
            ))
            .ident("m alice alice")
            .start();
        pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE plain_user LOGIN; CREATE EXTENSION gprxy_validator");
        Self { idp, key, pg, certs: TestCerts::new() }
    }

    fn proxy(&self, extra: &str) -> Proxy {
        Proxy::start(&format!(
            "upstream = \"127.0.0.1:{}\"\n{extra}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            self.pg.port(),
            self.certs.cert_path.display(),
            self.certs.key_path.display()
        ))
    }

    fn token(&self, sub: &str) -> String {
        self.key.token(json!({"typ": "at+jwt"}), &self.idp.claims(sub, "db"))
    }

    fn oauth_through(&self, proxy: &Proxy, tls: &str, token: &str, sql: &str) -> Result<String, String> {
        let client = format!("c-{}", gprxy_core::fingerprint(token.as_bytes()));
        self.idp.hand_out(&client, token);
        let conn = format!(
            "host=localhost hostaddr=127.0.0.1 port={} user=alice dbname=postgres sslrootcert={} {tls}",
            proxy.port,
            self.certs.ca_path.display()
        );
        oauth_psql_with(&conn, &self.idp.issuer(), &client, sql)
    }
}

#[test]
fn device_flow_through_the_proxy_with_verify_full_and_direct_tls() {
    let w = World::start();
    let p = w.proxy("");
    let t = w.token("alice");
    let sql = "SELECT current_user, system_user, gprxy.subject(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    // Upstream is plain: the proxy terminated TLS.
    assert_eq!(w.oauth_through(&p, "sslmode=verify-full", &t, sql).unwrap(), "alice|oauth:alice|alice|f");
    assert_eq!(
        w.oauth_through(&p, "sslmode=verify-full sslnegotiation=direct", &t, "SELECT gprxy.subject()")
            .unwrap(),
        "alice"
    );
    let events = p.wait_events("login", 4);
    let ok: Vec<_> = events.iter().filter(|e| e["outcome"] == "success").collect();
    assert_eq!(ok.len(), 2, "{events:#?}");
    let e = ok[0];
    assert_eq!(e["user"], "alice");
    assert_eq!(e["database"], "postgres");
    assert_eq!(e["mechanism"], "OAUTHBEARER");
    assert_eq!(e["tls"], true);
    assert_eq!(e["token_sub"], "alice");
    assert_eq!(e["token_iss"], w.idp.issuer().as_str());
    assert_eq!(e["token_kid"], "k");
    assert_eq!(e["token_fp"], gprxy_core::fingerprint(t.as_bytes()).as_str());
    assert!(e["token_exp"].as_i64().unwrap() > 0);
    assert!(
        e["client"].as_str().unwrap_or_default().starts_with("127.0.0.1:")
            || e["span"]["client"].as_str().is_some()
    );
    // libpq's discovery round is logged as discovery, not as a failure.
    assert_eq!(events.iter().filter(|e| e["outcome"] == "discovery").count(), 2, "{events:#?}");
    assert!(!p.log().contains(&t), "the token reached the log");
    let metrics = p.admin_get("/metrics");
    assert!(
        metrics.contains("gprxy_logins_total{mechanism=\"OAUTHBEARER\",outcome=\"success\"} 2"),
        "{metrics}"
    );
    assert_eq!(p.admin_get("/healthz"), "ok\n");
}

#[test]
fn refused_token_reaches_the_client_with_postgres_error() {
    let w = World::start();
    let p = w.proxy("");
    let mut c = w.idp.claims("alice", "db");
    c["exp"] = json!(gprxy_core::unix_time() - 600);
    let expired = w.key.token(json!({"typ": "at+jwt"}), &c);
    let err = w.oauth_through(&p, "sslmode=verify-full", &expired, "SELECT 1").unwrap_err();
    assert!(err.contains("FATAL:  OAuth bearer authentication failed for user \"alice\""), "{err}");
    let events = p.wait_events("login", 2);
    let failed = events.iter().find(|e| e["outcome"] == "failure").expect("a failure event");
    assert_eq!(failed["sqlstate"], "28000");
    assert_eq!(failed["error"], "OAuth bearer authentication failed for user \"alice\"");
    assert_eq!(failed["message"], "login");
    assert_eq!(failed["token_sub"], "alice");
    assert!(w.pg.log().contains("reason=expired"));
}

#[test]
fn cancel_through_the_proxy() {
    let w = World::start();
    let p = w.proxy("");
    let mut conn = pgwire::connect(p.addr(), "plain_user", "postgres", Auth::None).unwrap();
    let key = conn.key.expect("BackendKeyData");
    let addr = p.addr();
    let started = Instant::now();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        pgwire::cancel(addr, key).unwrap();
    });
    let err = conn.query("SELECT pg_sleep(30)").unwrap_err();
    canceller.join().unwrap();
    assert_eq!(err.code.as_deref(), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_millis(1300), "took {:?}", started.elapsed());
    // The session is still usable after the cancel.
    assert_eq!(conn.scalar("SELECT 7").unwrap().as_deref(), Some("7"));
    // A cancel with an unknown key is dropped, not forwarded.
    pgwire::cancel(addr, (key.0, key.1.wrapping_add(1))).unwrap();
    let cancels = p.wait_events("cancel", 2);
    assert_eq!(cancels.iter().filter(|e| e["outcome"] == "forwarded").count(), 1);
    assert_eq!(cancels.iter().filter(|e| e["outcome"] == "dropped").count(), 1);
}

/// Sends raw bytes, returns what the proxy answered before closing (bounded wait).
fn raw_exchange(p: &Proxy, bytes: &[u8], then_wait: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(then_wait)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn error_message(bytes: &[u8]) -> String {
    // ErrorResponse: 'E', length, fields; pick the M field.
    let text = String::from_utf8_lossy(bytes);
    assert_eq!(bytes.first(), Some(&b'E'), "not an ErrorResponse: {text:?}");
    text.split('\0').find_map(|f| f.strip_prefix('M')).unwrap_or_default().to_owned()
}

#[test]
fn bad_input_ends_only_that_connection() {
    let w = World::start();
    let p = w.proxy("[limits]\nlogin_timeout_ms = 1000\n");
    let wait = Duration::from_secs(3);
    let mut big = vec![0u8, 0, 0x27, 0x11];
    big.extend_from_slice(&[0u8; 64]);
    assert_eq!(
        error_message(&raw_exchange(&p, &big, wait)),
        "gprxy: startup packet of 10001 bytes exceeds the limit of 10000"
    );
    assert_eq!(
        error_message(&raw_exchange(&p, &[0, 0, 0, 3, 1, 2, 3, 4], wait)),
        "gprxy: invalid length 3 in message header"
    );
    let garbage = raw_exchange(&p, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", wait);
    assert!(error_message(&garbage).starts_with("gprxy: "), "{garbage:?}");
    // Bytes after SSLRequest, before the handshake: refused (CVE-2021-23214 class).
    let mut ssl = vec![0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    ssl.extend_from_slice(b"\0\0\0\x08\0\x03\0\0");
    let answer = raw_exchange(&p, &ssl, wait);
    assert_eq!(answer[0], b'S');
    assert_eq!(error_message(&answer[1..]), "gprxy: unexpected data after SSLRequest");
    // A client that stops mid-handshake, and a slow one past the login timeout.
    let _half = {
        let mut s = TcpStream::connect(p.addr()).unwrap();
        s.write_all(&[0, 0, 0, 40, 0, 3]).unwrap();
        s
    };
    let started = Instant::now();
    let slow = raw_exchange(&p, &[0, 0, 0, 40], Duration::from_secs(5));
    assert_eq!(error_message(&slow), "gprxy: login timed out");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Meanwhile a normal client is served, and the proxy is alive.
    let mut ok = pgwire::connect(p.addr(), "plain_user", "postgres", Auth::None).unwrap();
    assert_eq!(ok.scalar("SELECT 'fine'").unwrap().as_deref(), Some("fine"));
}

#[test]
fn tls_required_refuses_plain_clients() {
    let w = World::start();
    let p = w.proxy("");
    drop(p);
    let p = Proxy::start(&format!(
        "upstream = \"127.0.0.1:{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nrequire = true\n",
        w.pg.port(),
        w.certs.cert_path.display(),
        w.certs.key_path.display()
    ));
    let e = pgwire::connect(p.addr(), "plain_user", "postgres", Auth::None).err().expect("refused");
    assert_eq!(e.message, "gprxy: TLS is required (use sslmode=require or stronger)");
    assert_eq!(e.code.as_deref(), Some("28000"));
}

#[test]
fn bridge_lets_psql_15_log_in_with_a_token_as_password() {
    let w = World::start();
    let p = w.proxy("[bridge]\ntoken_as_password = true\n");
    let t = w.token("alice");
    let psql15 = PgVersion::V15.bin("psql");
    let run = |sslmode: &str| {
        std::process::Command::new(&psql15)
            .args(["-X", "-A", "-t", "-c", "SELECT current_user, gprxy.subject()"])
            .arg(format!(
                "host=localhost hostaddr=127.0.0.1 port={} user=alice dbname=postgres sslmode={sslmode} sslrootcert={}",
                p.port,
                w.certs.ca_path.display()
            ))
            .env("PGPASSWORD", &t)
            .output()
            .unwrap()
    };
    let out = run("verify-full");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alice|alice");
    let out = run("disable");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gprxy: the token-as-password bridge requires TLS"), "{err}");
}

#[test]
fn five_hundred_concurrent_sessions() {
    let w = World::start();
    let p = w.proxy("");
    let addr = p.addr();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(500));
    let handles: Vec<_> = (0..500)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = pgwire::connect(addr, "plain_user", "postgres", Auth::None)
                    .map_err(|e| format!("{i}: {e}"))?;
                barrier.wait();
                let v = c.scalar(&format!("SELECT {i} * 2")).map_err(|e| format!("{i}: {e}"))?;
                if v.as_deref() != Some(&(i * 2).to_string()) {
                    return Err(format!("{i}: got {v:?}"));
                }
                c.close();
                Ok(())
            })
        })
        .collect();
    let failures: Vec<String> = handles.into_iter().filter_map(|h| h.join().unwrap().err()).collect();
    assert!(failures.is_empty(), "{} failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
}

#[test]
fn worker_threads_setting_sets_the_session_threads() {
    let w = World::start();
    let workers = |p: &Proxy| p.thread_names().iter().filter(|n| *n == "gprxy-worker").count();
    let one = w.proxy("[limits]\nworker_threads = 1\n");
    assert_eq!(workers(&one), 1, "{:?}", one.thread_names());
    let three = w.proxy("[limits]\nworker_threads = 3\n");
    assert_eq!(workers(&three), 3, "{:?}", three.thread_names());
    // One thread carries many sessions at once.
    let addr = one.addr();
    let mut conns: Vec<_> = (0..50)
        .map(|i| {
            pgwire::connect(addr, "plain_user", "postgres", Auth::None).unwrap_or_else(|e| panic!("{i}: {e}"))
        })
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(
            c.scalar(&format!("SELECT {i} + 1")).unwrap().as_deref(),
            Some((i + 1).to_string().as_str())
        );
    }
}

fn psql_tls(p: &Proxy, ca: &std::path::Path, sql: &str) -> Result<String, String> {
    let out = std::process::Command::new(PgVersion::validator().bin("psql"))
        .args(["-X", "-A", "-t", "-c", sql])
        .arg(format!(
            "host=localhost hostaddr=127.0.0.1 port={} user=plain_user dbname=postgres sslmode=verify-full sslrootcert={}",
            p.port,
            ca.display()
        ))
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn sighup_reloads_certificates_without_dropping_sessions() {
    let w = World::start();
    let p = w.proxy("");
    // A session that is open across the reload.
    let ca1 = w.certs.ca_path.clone();
    let long = {
        let ca = ca1.clone();
        let port = p.port;
        std::thread::spawn(move || {
            std::process::Command::new(PgVersion::validator().bin("psql"))
                .args(["-X", "-A", "-t", "-c", "SELECT pg_sleep(2), 'survived'"])
                .arg(format!(
                    "host=localhost hostaddr=127.0.0.1 port={port} user=plain_user dbname=postgres sslmode=verify-full sslrootcert={}",
                    ca.display()
                ))
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // A new CA and certificate under the same file names, then SIGHUP.
    let (ca2, cert2, key2) = test_ca();
    let ca2_path = p.dir().join("ca2.pem");
    std::fs::write(&ca2_path, ca2).unwrap();
    std::fs::write(&w.certs.cert_path, cert2).unwrap();
    std::fs::write(&w.certs.key_path, key2).unwrap();
    p.signal("HUP");
    assert_eq!(p.wait_events("reload", 1).len(), 1, "{}", p.log());
    let out = long.join().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), p.log());
    assert!(String::from_utf8_lossy(&out.stdout).contains("survived"));
    assert_eq!(psql_tls(&p, &ca2_path, "SELECT 1").unwrap(), "1");
    let err = psql_tls(&p, &ca1, "SELECT 1").unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");
}

#[test]
fn sigterm_stops_accepting_and_lets_sessions_finish() {
    let w = World::start();
    let mut p = w.proxy("[limits]\nshutdown_grace_ms = 5000\n");
    let mut open = pgwire::connect(p.addr(), "plain_user", "postgres", Auth::None).unwrap();
    assert_eq!(p.admin_get("/healthz"), "ok\n");
    p.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(TcpStream::connect(p.addr()).is_err(), "still accepting after SIGTERM");
    // Load balancers see the drain on the admin listener, which stays up.
    assert_eq!(p.admin_get("/healthz"), "draining\n");
    assert!(p.running());
    assert_eq!(open.scalar("SELECT 'still here'").unwrap().as_deref(), Some("still here"));
    open.close();
    let deadline = Instant::now() + Duration::from_secs(3);
    while p.running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!p.running(), "gprxy did not exit after its last session");
}

#[test]
fn upstream_tls_is_verified_and_channel_binding_never_crosses_the_proxy() {
    // PostgreSQL 18 with its own TLS; the key readable only by the server's user.
    let server = TestCerts::for_server();
    let pg = Cluster::builder(PgVersion::validator())
        .tls(&server)
        .hba("hostssl all scram_user 127.0.0.1/32 scram-sha-256")
        .hba("hostssl all plain_user 127.0.0.1/32 trust")
        .start();
    pg.sql("CREATE ROLE scram_user LOGIN PASSWORD 'a-long-enough-password'; CREATE ROLE plain_user LOGIN");
    let w = World::start();
    let proxy_with = |ca: &std::path::Path| {
        Proxy::start(&format!(
            "upstream = \"127.0.0.1:{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[upstream_tls]\nenabled = true\nca_file = \"{}\"\nserver_name = \"localhost\"\n",
            pg.port(),
            w.certs.cert_path.display(),
            w.certs.key_path.display(),
            ca.display()
        ))
    };
    let psql = |p: &Proxy, user: &str, extra: &str| {
        let out = std::process::Command::new(PgVersion::validator().bin("psql"))
            .args(["-X", "-A", "-t", "-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"])
            .arg(format!(
                "host=localhost hostaddr=127.0.0.1 port={} user={user} dbname=postgres sslrootcert={} {extra}",
                p.port,
                w.certs.ca_path.display()
            ))
            .env("PGPASSWORD", "a-long-enough-password")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let p = proxy_with(&server.ca_path);
    // The server sees TLS from gprxy; a client on TLS to gprxy reaches a hostssl line.
    assert_eq!(psql(&p, "plain_user", "sslmode=verify-full"), (true, "t".to_owned(), String::new()));
    // SCRAM from a plain client leg works over the TLS upstream.
    assert_eq!(psql(&p, "scram_user", "sslmode=disable"), (true, "t".to_owned(), String::new()));
    // SCRAM-SHA-256-PLUS is never offered through gprxy: requiring channel binding fails ...
    let (ok, _, err) = psql(&p, "scram_user", "sslmode=verify-full channel_binding=require");
    assert!(!ok);
    assert!(err.contains("channel binding is required, but server did not offer an authentication method that supports channel binding"), "{err}");
    // ... and with TLS on both legs PostgreSQL detects the man in the middle (by design).
    let (ok, _, err) = psql(&p, "scram_user", "sslmode=verify-full");
    assert!(!ok);
    assert!(err.contains("SCRAM channel binding negotiation error"), "{err}");
    // A server certificate that does not chain to the configured CA is refused.
    let other = p.dir().join("other-ca.pem");
    std::fs::write(&other, test_ca().0).unwrap();
    let bad = proxy_with(&other);
    let (ok, _, err) = psql(&bad, "plain_user", "sslmode=verify-full");
    assert!(!ok);
    assert!(err.contains("gprxy: cannot reach the database server"), "{err}");
    assert!(bad.log().contains("TLS:"), "{}", bad.log());
}

#[test]
fn unix_socket_upstream_relays_oauth_and_plain_logins() {
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let pg = validator_cluster("db")
        .hba(format!("local all alice oauth issuer=\"{}\" scope=\"openid db:read\" map=m", idp.issuer()))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE plain_user LOGIN; CREATE EXTENSION gprxy_validator");
    let socket = pg.root().join(format!(".s.PGSQL.{}", pg.port()));
    let p = Proxy::start(&format!("upstream = \"{}\"\n", socket.display()));
    let over_unix = "SELECT client_addr IS NULL FROM pg_stat_activity WHERE pid = pg_backend_pid()";
    let mut plain = pgwire::connect(p.addr(), "plain_user", "postgres", Auth::None).unwrap();
    assert_eq!(plain.scalar(over_unix).unwrap().as_deref(), Some("t"));
    let t = key.token(json!({"typ": "at+jwt"}), &idp.claims("alice", "db"));
    idp.hand_out("unix-alice", &t);
    let conn = format!("host=127.0.0.1 port={} user=alice dbname=postgres", p.port);
    let out =
        oauth_psql_with(&conn, &idp.issuer(), "unix-alice", &format!("SELECT system_user; {over_unix}"))
            .unwrap();
    assert_eq!(out, "oauth:alice\nt");
}

#[test]
fn text_logs_to_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("gprxy.log");
    let port = gprxy_tests::free_port();
    let mut child = std::process::Command::new(gprxy_tests::proxy::gprxy_bin())
        .args(["serve", "--upstream", "127.0.0.1:1", "--log-format", "text"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = String::new();
    while Instant::now() < deadline && !log.contains("gprxy listening") {
        std::thread::sleep(Duration::from_millis(20));
        log = std::fs::read_to_string(&log_path).unwrap();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("gprxy listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log file: {log:?}");
}

/// A gprxy whose upstream is never reached: for what happens before a startup packet.
fn proxy_without_upstream(extra: &str) -> Proxy {
    Proxy::start(&format!("upstream = \"127.0.0.1:{}\"\n{extra}\n", gprxy_tests::free_port()))
}

/// Whether gprxy runs a session for this connection: it answers SSLRequest (`N`, no TLS here).
fn answers_ssl_request(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(1) if b[0] == b'N')
}

/// Waits until gprxy counts `n` active connections.
fn wait_active(p: &Proxy, n: usize) {
    let line = format!("gprxy_connections_active {n}\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.admin_get("/metrics").contains(&line) {
        assert!(Instant::now() < deadline, "never {n} active:\n{}", p.admin_get("/metrics"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn client_connection_limit_refuses_with_53300_and_a_reload_changes_it() {
    let p = proxy_without_upstream("[limits]\nmax_client_connections = 2\n");
    wait_active(&p, 0);
    let mut a = TcpStream::connect(p.addr()).unwrap();
    let mut b = TcpStream::connect(p.addr()).unwrap();
    assert!(answers_ssl_request(&mut a) && answers_ssl_request(&mut b));
    let refused = raw_exchange(&p, &[], Duration::from_secs(3));
    assert_eq!(error_message(&refused), "gprxy: too many client connections");
    assert!(String::from_utf8_lossy(&refused).contains("\0C53300\0"), "{refused:?}");
    assert!(p.admin_get("/metrics").contains("gprxy_connections_rejected_total 1\n"));
    // A session that ends frees its place.
    drop(a);
    wait_active(&p, 1);
    let mut c = TcpStream::connect(p.addr()).unwrap();
    assert!(answers_ssl_request(&mut c), "refused after a session ended");
    // SIGHUP raises the limit for the next connection, and lowers it again.
    p.edit_config(|t| t.replace("max_client_connections = 2", "max_client_connections = 3"));
    p.signal("HUP");
    assert_eq!(p.wait_events("reload", 1).len(), 1);
    let mut d = TcpStream::connect(p.addr()).unwrap();
    assert!(answers_ssl_request(&mut d), "the reloaded limit of 3 was not applied");
    p.edit_config(|t| t.replace("max_client_connections = 3", "max_client_connections = 1"));
    p.signal("HUP");
    assert_eq!(p.wait_events("reload", 2).len(), 2);
    assert_eq!(
        error_message(&raw_exchange(&p, &[], Duration::from_secs(3))),
        "gprxy: too many client connections"
    );
    // The sessions already running are kept.
    for s in [&mut b, &mut c, &mut d] {
        s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    }
    assert!(p.admin_get("/metrics").contains("gprxy_connections_active 3\n"));
}

#[test]
fn out_of_file_descriptors_the_proxy_waits_instead_of_spinning_and_recovers() {
    let p = proxy_without_upstream("[limits]\nlogin_timeout_ms = 60000\n");
    wait_active(&p, 0);
    // Few descriptors: silent clients use them up, and accept then fails with EMFILE.
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &p.pid().to_string(), "--nofile=48:48"])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    let silent: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(p.addr()).unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.log().contains("accept failed") {
        assert!(Instant::now() < deadline, "accept never failed:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let failures = || p.log().matches("accept failed").count();
    let before = failures();
    std::thread::sleep(Duration::from_secs(1));
    let in_one_second = failures() - before;
    assert!((3..=20).contains(&in_one_second), "{in_one_second} failed accepts logged in one second");
    // The admin listener is still served, and once descriptors are free again clients are too.
    drop(silent);
    let mut s = TcpStream::connect(p.addr()).unwrap();
    assert!(answers_ssl_request(&mut s), "not served after descriptors were freed:\n{}", p.log());
}

/// What a silent client holds of the admin listener is bounded (#27): one address keeps at most
/// four connections (a fifth evicts its oldest one still waiting for a request), a connection that
/// sends no request within a second is closed, and health checks are answered throughout.
#[test]
fn admin_listener_serves_a_bounded_number_at_once() {
    let p = proxy_without_upstream("");
    // The harness's readiness probe of the admin port holds a place until its task has seen the
    // probe close: let that happen before counting.
    std::thread::sleep(Duration::from_millis(300));
    let opened = Instant::now();
    let mut silent: Vec<TcpStream> =
        (0..4).map(|_| TcpStream::connect(("127.0.0.1", p.admin_port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let _fifth = TcpStream::connect(("127.0.0.1", p.admin_port)).unwrap();
    silent[0].set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(silent[0].read(&mut [0u8; 16]).unwrap_or(usize::MAX), 0, "the oldest was not evicted");
    assert!(opened.elapsed() < Duration::from_millis(900), "evicted only by the timeout");
    // Clients are served meanwhile, and so are health checks from the same address.
    let mut c = TcpStream::connect(p.addr()).unwrap();
    assert!(answers_ssl_request(&mut c));
    assert_eq!(p.admin_get("/healthz"), "ok\n");
    // A connection that never sends its request is closed after a second.
    silent[3].set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(silent[3].read(&mut [0u8; 16]).unwrap_or(usize::MAX), 0, "a silent connection was kept");
    let held = opened.elapsed();
    assert!(held >= Duration::from_millis(900) && held < Duration::from_secs(2), "held {held:?}");
}

#[test]
fn relayed_bytes_are_counted_while_the_session_runs() {
    let w = World::start();
    let p = w.proxy("");
    let series = |d: &str| format!("gprxy_relayed_bytes_total{{direction=\"{d}\"}}");
    let mut c = pgwire::connect(p.addr(), "plain_user", "postgres", Auth::None).unwrap();
    let (up, down) = (p.metric(&series("client_to_server")), p.metric(&series("server_to_client")));
    let sql = "SELECT repeat('x', 100000)";
    assert_eq!(c.scalar(sql).unwrap().map(|v| v.len()), Some(100_000));
    // The query as sent, and at least the answer's value, before the session ends.
    assert_eq!(p.metric(&series("client_to_server")) - up, (1 + 4 + sql.len() + 1) as f64);
    assert!(p.metric(&series("server_to_client")) - down > 100_000.0);
    c.close();
}

#[test]
fn reuse_port_lets_a_new_gprxy_take_over_before_the_old_one_drains() {
    let mut old = proxy_without_upstream("reuse_port = true\n");
    let toml = format!("upstream = \"127.0.0.1:{}\"\nreuse_port = true\n", gprxy_tests::free_port());
    let mut new = Proxy::spawn_at(old.port, old.admin_port, &toml);
    assert_eq!(new.wait_events("listening", 1).len(), 1, "the new gprxy did not listen:\n{}", new.log());
    // Without reuse_port a third one cannot take the port.
    let plain = format!("upstream = \"127.0.0.1:{}\"\n", gprxy_tests::free_port());
    let mut refused = Proxy::spawn_at(old.port, gprxy_tests::free_port(), &plain);
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused.running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!refused.running());
    assert!(refused.log().contains(&format!("cannot listen on 127.0.0.1:{}", old.port)), "{}", refused.log());
    // The old one drains and exits; clients keep being served, by the new one.
    old.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while old.running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!old.running(), "the old gprxy did not exit");
    for _ in 0..20 {
        let mut c = TcpStream::connect(new.addr()).unwrap();
        assert!(answers_ssl_request(&mut c), "a client was not served during the handover");
    }
    assert!(new.running());
}

/// Reads one backend message: (tag, body).
fn read_backend_message(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// Logs in as alice (OAuth upstream) and answers AuthenticationSASL with `mechanism`; returns
/// the ErrorResponse's message.
fn sasl_attempt(addr: std::net::SocketAddr, mechanism: &str) -> String {
    use postgres_protocol::message::frontend;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = bytes::BytesMut::new();
    frontend::startup_message([("user", "alice"), ("database", "postgres")], &mut out).unwrap();
    s.write_all(&out).unwrap();
    let (tag, body) = read_backend_message(&mut s).unwrap();
    assert_eq!((tag, &body[..4]), (b'R', &10u32.to_be_bytes()[..]), "not AuthenticationSASL");
    out.clear();
    frontend::sasl_initial_response(mechanism, b"", &mut out).unwrap();
    s.write_all(&out).unwrap();
    loop {
        let (tag, body) = read_backend_message(&mut s).unwrap();
        if tag == b'E' {
            let mut e = vec![b'E'];
            e.extend_from_slice(&[0; 4]);
            e.extend_from_slice(&body);
            return error_message(&e);
        }
    }
}

/// The samples of one metric family.
fn series<'a>(samples: &'a [gprxy_tests::proxy::Sample], name: &str) -> Vec<&'a gprxy_tests::proxy::Sample> {
    samples.iter().filter(|s| s.0 == name).collect()
}

#[test]
fn hostile_sasl_mechanism_names_cannot_inject_metrics_or_grow_the_label_set() {
    use gprxy_tests::proxy::parse_metrics;
    let w = World::start();
    let p = w.proxy("");
    let hostile = |i: usize| format!("x\"}} 1\ngprxy_connections_active 9\n#{i}{}", "A".repeat(60_000));
    let e = sasl_attempt(p.addr(), &hostile(0));
    assert!(e.contains("SASL authentication mechanism"), "{e}");
    // The client has its error before the proxy counts the login: wait for the login's event,
    // which comes after the count.
    p.wait_events("login", 1);
    let samples = parse_metrics(&p.admin_get("/metrics"));
    let active = series(&samples, "gprxy_connections_active");
    assert_eq!(active.len(), 1, "{active:?}");
    assert!(active[0].2 < 2.0, "{active:?}");
    let logins = series(&samples, "gprxy_logins_total");
    assert_eq!(logins.len(), 1, "{logins:?}");
    assert_eq!(logins[0].1.get("mechanism").map(String::as_str), Some("other"), "{logins:?}");

    // A thousand more, each with a mechanism of its own: still one series, and a small text.
    let addr = p.addr();
    let workers: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..250 {
                    sasl_attempt(addr, &hostile(1 + t * 250 + i));
                }
            })
        })
        .collect();
    for h in workers {
        h.join().unwrap();
    }
    let text = p.admin_get("/metrics");
    assert!(text.len() < 16 * 1024, "/metrics grew to {} bytes", text.len());
    let samples = parse_metrics(&text);
    let logins = series(&samples, "gprxy_logins_total");
    assert_eq!(logins.len(), 1, "{logins:?}");
    assert_eq!(logins[0].1.get("outcome").map(String::as_str), Some("failure"));
    assert_eq!(logins[0].2, 1001.0);
    // The login events name the mechanism by its label too.
    let events = p.wait_events("login", 1001);
    assert!(events.iter().all(|e| e["mechanism"] == "other"), "{:?}", events[0]);
}

#[test]
fn a_startup_packet_naming_a_parameter_twice_is_refused() {
    use gprxy_tests::pgwire::connect_params;
    let w = World::start();
    let p = w.proxy("");
    // PostgreSQL would use the last `user` (plain_user, trust) while the proxy logged the first.
    let e = connect_params(p.addr(), "alice", "postgres", Auth::None, &[("user", "plain_user")])
        .err()
        .expect("refused");
    assert_eq!(e.code.as_deref(), Some("08P01"), "{e}");
    assert_eq!(e.message, "gprxy: invalid startup packet: parameter \"user\" is given more than once");
    let e = connect_params(p.addr(), "plain_user", "postgres", Auth::None, &[("application_name", "b")])
        .err()
        .expect("refused");
    assert_eq!(
        e.message,
        "gprxy: invalid startup packet: parameter \"application_name\" is given more than once"
    );
    let mut ok = pgwire::connect(p.addr(), "plain_user", "postgres", Auth::None).unwrap();
    assert_eq!(ok.scalar("SELECT 1").unwrap().as_deref(), Some("1"));
}

#[test]
fn text_logs_escape_newlines_and_control_characters_from_clients() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("gprxy.log");
    let port = gprxy_tests::free_port();
    let mut child = std::process::Command::new(gprxy_tests::proxy::gprxy_bin())
        .args(["serve", "--upstream", &format!("127.0.0.1:{}", gprxy_tests::free_port())])
        .args(["--log-format", "text", "--listen", &format!("127.0.0.1:{port}")])
        .env("GPRXY_LOG", "info")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !read_log().contains(needle) {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("gprxy listening");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let user = "mallory\n2026-01-01T00:00:00.000000Z  INFO forged: login outcome=success user=admin";
    let database = "db\r\u{1b}[2K\u{7}\u{0b}forged";
    let e = pgwire::connect(addr, user, database, Auth::None).err().expect("no upstream");
    assert_eq!(e.message, "gprxy: cannot reach the database server");
    wait_for("outcome=\"failure\"");
    let _ = child.kill();
    let _ = child.wait();
    let log = read_log();
    assert!(log.contains("outcome=\"failure\""), "{log}");
    assert!(
        !log.contains("\n2026-01-01T00:00:00.000000Z  INFO forged"),
        "a client forged a log line:\n{log}"
    );
    assert!(log.contains(r"mallory\n2026-01-01"), "{log}");
    for c in ['\r', '\u{1b}', '\u{7}', '\u{0b}'] {
        assert!(!log.contains(c), "control character {c:?} in the log:\n{log:?}");
    }
}
