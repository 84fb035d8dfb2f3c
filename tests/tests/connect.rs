//! `gprxy connect` end to end: applications connect to its socket with no password; it logs
//! in upstream with a token from the profile's source. Upstream is PostgreSQL 18 with
//! gprxy_validator and no proxy in front (OAUTHBEARER), or PostgreSQL 15 through gprxy's
//! fallback mode (the token as a password). The real drivers' sessions, their end at the
//! token's end and their reconnects are in connect_drivers.rs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gprxy_core::testkit::{TestKey, TestServer};
use gprxy_tests::connect_upstream::{fallback, output, pg18, psql, AUD};
use gprxy_tests::connector::{run_gprxy, write_config, write_token_file, Connector};
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{self, Auth};
use gprxy_tests::{
    command_as_test_user, running_as_root, test_user, validator_cluster, Cluster, PgVersion, TestCerts,
};
use serde_json::json;

const WHO: &str = "SELECT current_user, system_user, gprxy.subject(), gprxy.claim('jti')";

/// A private folder for token and secret files.
fn private_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn assert_no_secret(text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "a token or secret leaked: {text}");
    }
}

#[test]
fn psql_logs_in_to_postgres_18_through_the_socket_and_a_rotated_token_file_is_picked_up() {
    let s = pg18(&[]);
    let dir = private_dir();
    let file = dir.path().join("token");
    let (t1, t2) = (s.token("j1", 300), s.token("j2", 300));
    write_token_file(&file, &t1);
    let metrics_port = gprxy_tests::free_port();
    let c = Connector::start(
        &format!(
            "{}token.source = \"file\"\ntoken.path = \"{}\"\nlisten.metrics = \"127.0.0.1:{metrics_port}\"\n",
            s.upstream(),
            file.display()
        ),
        false,
    );
    // The socket is in a private folder, and only this user may use it.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&c.socket_dir), 0o700);
    assert_eq!(mode(&c.socket_dir.join(".s.PGSQL.5432")), 0o600);
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|j1");
    // A second connection reuses the token; the file unchanged, it is not read again.
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|j1");
    write_token_file(&file, &t2);
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|j2");
    let logins = c.wait_events("connect_login", 3);
    let fetched: Vec<bool> = logins.iter().map(|e| e["fetched"].as_bool().unwrap()).collect();
    assert_eq!(fetched, [true, false, true]);
    let fps: Vec<&str> = logins.iter().map(|e| e["token_fp"].as_str().unwrap()).collect();
    assert_eq!(
        fps,
        [
            gprxy_core::fingerprint(t1.as_bytes()),
            gprxy_core::fingerprint(t1.as_bytes()),
            gprxy_core::fingerprint(t2.as_bytes())
        ]
    );
    assert_eq!(
        (logins[2]["sub"].as_str(), logins[2]["mechanism"].as_str(), logins[2]["tls"].as_bool()),
        (Some("alice"), Some("OAUTHBEARER"), Some(true))
    );
    assert_no_secret(&c.log(), &[&t1, &t2]);
    // The last session ends just after psql exits.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut m = gprxy_tests::connector::get_metrics(metrics_port);
    while !m.contains("gprxy_connect_sessions_active 0\n") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        m = gprxy_tests::connector::get_metrics(metrics_port);
    }
    for line in [
        "gprxy_connect_logins_total{mechanism=\"OAUTHBEARER\",outcome=\"success\"} 3\n",
        "gprxy_connect_token_fetches_total{source=\"file\",outcome=\"success\"} 2\n",
        "gprxy_connect_sessions_active 0\n",
    ] {
        assert!(m.contains(line), "{line} not in:\n{m}");
    }
    assert_no_secret(&m, &[&t1, &t2]);
    // --check fetches and logs in once, printing what it did and no token.
    let config = write_config(
        dir.path(),
        &format!("{}token.source = \"file\"\ntoken.path = \"{}\"\n", s.upstream(), file.display()),
        &dir.path().join("s"),
        None,
    );
    let (ok, out, err) = run_gprxy(&["connect", "--check", "--config", config.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let head = format!(
        "token (file): fingerprint {}, sub alice, iss {}, expires in ",
        gprxy_core::fingerprint(t2.as_bytes()),
        s.idp.issuer()
    );
    let left: i64 = lines[1]
        .strip_prefix(&head)
        .and_then(|r| r.strip_suffix(" s"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!((290..=300).contains(&left), "{out}");
    assert!(
        lines[2].starts_with(&format!(
            "logged in as alice to postgres on 127.0.0.1:{} (TLS verified for localhost, OAUTHBEARER); server version 18.",
            s.pg.port()
        )),
        "{out}"
    );
    assert_no_secret(&(out + &err), &[&t2]);
}

/// The README's `gprxy connect` example, with its names swapped for the test's server, issuer
/// and files: `--check` prints what the README shows, and psql logs in through the socket.
#[test]
fn the_readme_example_runs() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/applications.md"))
            .unwrap();
    let section =
        &readme[readme.find("### `gprxy connect`").expect("docs/applications.md's connect section")..];
    let start = section.find("```toml\n").unwrap() + "```toml\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let key = TestKey::rsa("k1");
    let idp = TestIssuer::start(&[&key]);
    let certs = TestCerts::for_server();
    let pg = validator_cluster(AUD)
        .tls(&certs)
        .hba(format!(
            "hostssl all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
            idp.issuer()
        ))
        .ident("m billing-batch alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN");
    pg.sql("CREATE DATABASE app");
    pg.try_sql_in("app", "CREATE EXTENSION gprxy_validator").unwrap();
    let dir = private_dir();
    let secret = dir.path().join("billing-batch.secret");
    std::fs::write(&secret, "readme-secret-1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut claims = idp.claims("billing-batch", AUD);
    claims["jti"] = json!("readme");
    let t = key.token(json!({"typ": "at+jwt"}), &claims);
    idp.client_credentials("billing-batch", "readme-secret-1", &t, 300);
    let socket_dir = dir.path().join("sock");
    let text = example
        .replace("db.example.com:5432", &format!("localhost:{}", pg.port()))
        .replace("/etc/ssl/certs/db-ca.pem", certs.ca_path.to_str().unwrap())
        .replace("/run/user/1000/gprxy/app", socket_dir.to_str().unwrap())
        .replace("https://sso.example.com/realms/corp", &idp.issuer())
        .replace("/etc/gprxy/billing-batch.secret", secret.to_str().unwrap())
        + "token.insecure_allow_http_loopback = true\n";
    let config = dir.path().join("readme.toml");
    std::fs::write(&config, &text).unwrap();
    let (ok, out, err) =
        run_gprxy(&["connect", "--profile", "app", "--check", "--config", config.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "profile app: upstream localhost:{}, unix socket {}/.s.PGSQL.5432",
            pg.port(),
            socket_dir.display()
        )
    );
    assert!(
        lines[1].starts_with(&format!(
            "token (client_credentials): fingerprint {}, sub billing-batch, iss {}, expires in ",
            gprxy_core::fingerprint(t.as_bytes()),
            idp.issuer()
        )),
        "{out}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "logged in as alice to app on localhost:{} (TLS verified for localhost, OAUTHBEARER); server version 18.",
            pg.port()
        )),
        "{out}"
    );
    let c = Connector::start_file(dir, &text, "app", socket_dir.clone());
    let out = psql(&format!("host={} port=5432 user=alice dbname=app", socket_dir.display()), WHO).unwrap();
    assert_eq!(out, "alice|oauth:billing-batch|billing-batch|readme");
    assert_no_secret(&c.log(), &[&t, "readme-secret-1"]);
}

#[test]
fn several_upstreams_are_tried_in_order() {
    let s = pg18(&[]);
    let dir = private_dir();
    let file = dir.path().join("token");
    write_token_file(&file, &s.token("j1", 300));
    let dead = gprxy_tests::free_port();
    let profile = format!(
        "upstream = [\"127.0.0.1:{dead}\", \"127.0.0.1:{}\"]\ntls.ca_file = \"{}\"\ntls.server_name = \"localhost\"\ntoken.source = \"file\"\ntoken.path = \"{}\"\n",
        s.pg.port(),
        s.certs.ca_path.display(),
        file.display()
    );
    let c = Connector::start(&profile, false);
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|j1");
    let login = &c.wait_events("connect_login", 1)[0];
    assert_eq!(login["upstream"], format!("127.0.0.1:{}", s.pg.port()));
    assert!(
        c.log().contains(&format!("\"upstream\":\"127.0.0.1:{dead}\"")),
        "the first upstream was tried: {}",
        c.log()
    );
}

#[test]
fn a_five_kilobyte_token_logs_in() {
    let s = pg18(&[]);
    let dir = private_dir();
    let file = dir.path().join("token");
    let mut c = s.idp.claims("alice", AUD);
    c["jti"] = json!("big");
    c["groups"] = json!((0..120).map(|i| format!("group-with-a-long-name-{i:04}")).collect::<Vec<_>>());
    let t = s.key.token(json!({"typ": "at+jwt"}), &c);
    assert!((5000..8000).contains(&t.len()), "{}", t.len());
    write_token_file(&file, &t);
    let conn = Connector::start(
        &format!("{}token.source = \"file\"\ntoken.path = \"{}\"\n", s.upstream(), file.display()),
        false,
    );
    assert_eq!(psql(&conn.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|big");
}

#[test]
fn a_server_certificate_that_does_not_verify_is_refused() {
    let s = pg18(&[]);
    let other = TestCerts::new();
    let dir = private_dir();
    let file = dir.path().join("token");
    let t = s.token("j1", 300);
    write_token_file(&file, &t);
    let profile = format!("{}token.source = \"file\"\ntoken.path = \"{}\"\n", s.upstream(), file.display())
        .replace(&s.certs.ca_path.display().to_string(), &other.ca_path.display().to_string());
    let c = Connector::start(&profile, false);
    let e = psql(&c.conninfo("alice"), "SELECT 1").unwrap_err();
    assert!(e.ends_with("FATAL:  gprxy connect: cannot reach the database server"), "{e}");
    let warn = c.log();
    assert!(
        warn.contains("cannot reach the server")
            && warn.contains("TLS: invalid peer certificate: UnknownIssuer"),
        "{warn}"
    );
    assert_eq!(s.pg.log().matches("connection authorized: user=alice").count(), 0);
}

#[test]
fn the_session_ends_at_the_tokens_end_and_the_next_connection_gets_a_new_token() {
    let s = pg18(&["gprxy.session_policy = 'strict'"]);
    let dir = private_dir();
    let file = dir.path().join("token");
    write_token_file(&file, &s.token("short", 4));
    let c = Connector::start(
        &format!("{}token.source = \"file\"\ntoken.path = \"{}\"\n", s.upstream(), file.display()),
        true,
    );
    let addr = ([127, 0, 0, 1], c.tcp_port.unwrap()).into();
    let mut conn = pgwire::connect(addr, "alice", "postgres", Auth::None).unwrap();
    assert_eq!(conn.scalar("SELECT gprxy.claim('jti')").unwrap().as_deref(), Some("short"));
    // The agent writes the next token before the first one ends.
    write_token_file(&file, &s.token("next", 300));
    let e = conn.next_error().unwrap();
    assert_eq!((e.severity.as_str(), e.code.as_deref()), ("FATAL", Some("28000")), "{e:?}");
    assert!(e.message.starts_with("gprxy: the access token expired at "), "{e:?}");
    // The connection is gone.
    assert!(conn.query("SELECT 1").is_err());
    let mut again = pgwire::connect(addr, "alice", "postgres", Auth::None).unwrap();
    assert_eq!(again.scalar("SELECT gprxy.claim('jti')").unwrap().as_deref(), Some("next"));
}

#[test]
fn sighup_reads_the_profile_again_and_refuses_a_change_of_listener() {
    let s = pg18(&[]);
    let dir = private_dir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    write_token_file(&a, &s.token("from-a", 300));
    write_token_file(&b, &s.token("from-b", 300));
    let c = Connector::start(
        &format!("{}token.source = \"file\"\ntoken.path = \"{}\"\n", s.upstream(), a.display()),
        false,
    );
    // A session open across the reload keeps working.
    let mut open = psql_session(&c);
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|from-a");
    let config = c.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace(a.to_str().unwrap(), b.to_str().unwrap())).unwrap();
    c.signal("HUP");
    assert_eq!(c.wait_events("reload", 1)[0]["outcome"], "ok");
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|from-b");
    // A broken file or a new listener is refused; the profile in force stays.
    std::fs::write(&config, text.replace("[profile.p]", "[profile.p]\nlisten.tcp = \"127.0.0.1:1\""))
        .unwrap();
    c.signal("HUP");
    let reloads = c.wait_events("reload", 2);
    assert_eq!(reloads[1]["outcome"], "refused");
    assert_eq!(
        reloads[1]["error"],
        "listen.unix_dir, listen.port, listen.tcp and listen.metrics cannot change while running: restart gprxy connect"
    );
    std::fs::write(&config, text.replace("token.source", "token.sauce")).unwrap();
    c.signal("HUP");
    let reloads = c.wait_events("reload", 3);
    assert_eq!(reloads[2]["outcome"], "refused");
    assert!(reloads[2]["error"].as_str().unwrap().contains("(key token.sauce)"), "{}", reloads[2]);
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|from-b");
    use std::io::Write;
    writeln!(open.0, "SELECT gprxy.claim('jti');").unwrap();
    drop(open.0);
    let out = open.1.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "from-a",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A psql 15 session reading its SQL from stdin, logged in before this returns.
fn psql_session(c: &Connector) -> (std::process::ChildStdin, std::process::Child) {
    let before = c.events("connect_login").len();
    let mut child = Command::new(PgVersion::V15.bin("psql"))
        .args(["-X", "-A", "-t", "-q", "-f", "-", &c.conninfo("alice")])
        .env_remove("PGPASSWORD")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    assert_eq!(c.wait_events("connect_login", before + 1).len(), before + 1, "psql did not log in");
    (stdin, child)
}

#[test]
fn a_cancel_request_reaches_the_server_through_the_connector() {
    let s = pg18(&[]);
    let (c, _dir) = s.connector("", true);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], c.tcp_port.unwrap()).into();
    let mut conn = pgwire::connect(addr, "alice", "postgres", Auth::None).unwrap();
    let key = conn.key.unwrap();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        pgwire::cancel(addr, key).unwrap();
    });
    let e = conn.query("SELECT pg_sleep(20)").unwrap_err();
    canceller.join().unwrap();
    assert_eq!(e.code.as_deref(), Some("57014"), "{e:?}");
    assert_eq!(c.wait_events("cancel", 1)[0]["outcome"], "forwarded");
    // An unknown key is dropped, not forwarded.
    pgwire::cancel(addr, (key.0, key.1.wrapping_add(1))).unwrap();
    let cancels = c.wait_events("cancel", 2);
    assert_eq!(cancels[1]["outcome"], "dropped");
}

/// `max_connections` is a promise about server backends: with two sessions open a third
/// connection is refused with `too_many_connections` before anything reaches the server, and a
/// slot is given back when a session ends.
#[test]
fn max_connections_bounds_the_server_backends_and_a_slot_is_given_back_at_a_sessions_end() {
    let s = pg18(&[]);
    let (c, _dir) = s.connector("max_connections = 2\n", true);
    let backends = || {
        s.pg.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice' AND backend_type = 'client backend'")
    };
    let (first, mut first_child) = psql_session(&c);
    let (_second, _second_child) = psql_session(&c);
    assert_eq!(backends(), "2");
    let connections_before = s.pg.log().matches("connection received: host=127.0.0.1").count();
    let e = psql(&c.conninfo("alice"), "SELECT 1").unwrap_err();
    assert!(
        e.ends_with("FATAL:  gprxy connect: too many connections: this connector's max_connections are open"),
        "{e}"
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], c.tcp_port.unwrap()).into();
    let Err(e) = pgwire::connect(addr, "alice", "postgres", Auth::None) else { panic!("a third session") };
    assert_eq!(e.code.as_deref(), Some("53300"), "{e:?}");
    assert_eq!(backends(), "2");
    assert_eq!(
        s.pg.log().matches("connection received: host=127.0.0.1").count(),
        connections_before,
        "a refused connection never reached the server"
    );
    assert_eq!(c.events("connect_refused").iter().filter(|e| e["reason"] == "max_connections").count(), 2);
    // The first session ends: its slot is free again.
    drop(first);
    first_child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let third = loop {
        match psql(&c.conninfo("alice"), "SELECT gprxy.claim('jti')") {
            Ok(out) => break out,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "the slot was never given back: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(third, "j1");
}

/// `e`, what psql run as OS user `uid` said, is the connector's refusal, and the connector logged
/// it with the uid and `listener`.
fn assert_refused_as(c: &Connector, e: &str, uid: u32, listener: &str) {
    assert!(
        e.ends_with(&format!(
            "FATAL:  gprxy connect: connections from OS user {uid} are not allowed on this connector"
        )),
        "{e}"
    );
    let refused = c.wait_events("connect_refused", 1);
    assert_eq!(
        (refused[0]["uid"].as_i64(), refused[0]["listener"].as_str()),
        (Some(i64::from(uid)), Some(listener))
    );
}

#[test]
fn another_os_user_is_refused_on_the_socket_and_on_loopback_tcp() {
    assert!(running_as_root(), "this test runs clients as the test user: run it as root (make test does)");
    let s = pg18(&[]);
    let dir = private_dir();
    let file = dir.path().join("token");
    let t = s.token("j1", 300);
    write_token_file(&file, &t);
    let profile = format!("{}token.source = \"file\"\ntoken.path = \"{}\"\n", s.upstream(), file.display());
    let as_test_user = |conninfo: &str| {
        output(command_as_test_user(PgVersion::V15.bin("psql")).args(["-X", "-A", "-t", "-c", WHO, conninfo]))
    };
    let test_uid: u32 =
        String::from_utf8(Command::new("id").args(["-u", &test_user()]).output().unwrap().stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    // By default the folder is private: the other user cannot even reach the socket.
    let c = Connector::start(&profile, true);
    let open_up = |c: &Connector| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(c.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    };
    open_up(&c);
    let e = as_test_user(&c.conninfo("alice")).unwrap_err();
    assert!(e.contains(".s.PGSQL.5432\" failed: Permission denied"), "{e}");
    // On loopback TCP anyone can connect(): the kernel's socket table names the user, refused.
    let tcp =
        format!("host=127.0.0.1 port={} user=alice dbname=postgres sslmode=disable", c.tcp_port.unwrap());
    let e = as_test_user(&tcp).unwrap_err();
    assert!(
        e.ends_with(&format!(
            "FATAL:  gprxy connect: connections from OS user {test_uid} are not allowed on this connector"
        )),
        "{e}"
    );
    // The connector's own user gets in on both.
    assert_eq!(psql(&tcp, WHO).unwrap(), "alice|oauth:alice|alice|j1");
    drop(c);
    // With another user allowed the socket is reachable, and the peer's credentials decide.
    let c = Connector::start(&format!("{profile}listen.allow_uids = [{}]\n", test_uid + 1), false);
    open_up(&c);
    let e = as_test_user(&c.conninfo("alice")).unwrap_err();
    assert_refused_as(&c, &e, test_uid, "unix");
    assert_eq!(c.events("connect_login").len(), 0, "no token was used for the refused user");
    drop(c);
    let c = Connector::start(&format!("{profile}listen.allow_uids = [{test_uid}]\n"), false);
    open_up(&c);
    assert_eq!(as_test_user(&c.conninfo("alice")).unwrap(), "alice|oauth:alice|alice|j1");
}

/// `listen.tcp` on the IPv6 loopback: the kernel's socket table is asked for an IPv6 peer
/// (sock_diag with AF_INET6), which names this user (admitted) and the test user (refused).
#[test]
fn an_ipv6_loopback_listener_admits_this_user_and_refuses_another() {
    assert!(running_as_root(), "this test runs clients as the test user: run it as root (make test does)");
    assert!(
        std::net::TcpListener::bind("[::1]:0").is_ok(),
        "no IPv6 loopback on this machine (ip -6 addr show lo): this test needs ::1"
    );
    let s = pg18(&[]);
    let dir = private_dir();
    let file = dir.path().join("token");
    write_token_file(&file, &s.token("v6", 300));
    let port = gprxy_tests::free_port();
    let c = Connector::start(
        &format!(
            "{}token.source = \"file\"\ntoken.path = \"{}\"\nlisten.tcp = \"[::1]:{port}\"\n",
            s.upstream(),
            file.display()
        ),
        false,
    );
    let tcp = format!("host=::1 port={port} user=alice dbname=postgres sslmode=disable");
    assert_eq!(psql(&tcp, WHO).unwrap(), "alice|oauth:alice|alice|v6");
    let login = &c.wait_events("connect_login", 1)[0];
    let peer = login["span"]["peer"].as_str().unwrap_or_else(|| panic!("{login}"));
    assert!(peer.starts_with("tcp [::1]:") && peer.ends_with(" uid 0"), "{peer}");
    // Another OS user on ::1 is found in the table too, and refused.
    let test_uid: u32 =
        String::from_utf8(Command::new("id").args(["-u", &test_user()]).output().unwrap().stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let e =
        output(command_as_test_user(PgVersion::V15.bin("psql")).args(["-X", "-A", "-t", "-c", WHO, &tcp]))
            .unwrap_err();
    assert_refused_as(&c, &e, test_uid, "tcp");
    // The server saw one login, this user's.
    assert_eq!(s.pg.log().matches("connection authorized: user=alice").count(), 1, "{}", s.pg.log());
}

#[test]
fn a_tcp_listener_beyond_loopback_is_refused_at_start() {
    let dir = private_dir();
    for addr in ["0.0.0.0:6543", "[::]:6543", "10.1.2.3:6543"] {
        let profile = format!(
            "upstream = \"127.0.0.1:5432\"\ntls.ca_file = \"/nonexistent\"\ntoken.source = \"file\"\ntoken.path = \"/nonexistent\"\nlisten.tcp = \"{addr}\""
        );
        let config = write_config(dir.path(), &profile, &dir.path().join("s"), None);
        let (ok, _, err) = run_gprxy(&["connect", "--config", config.to_str().unwrap()], &[]);
        assert!(!ok);
        let shown = addr.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(
            err.trim(),
            format!(
                "Error: config file {}: profile \"p\": listen.tcp: {shown} is not a loopback address; gprxy connect listens only on 127.0.0.1 or ::1",
                config.display()
            )
        );
        assert!(!dir.path().join("s").exists(), "nothing was made before the refusal");
    }
}

#[test]
fn client_credentials_log_in_and_a_refused_secret_is_reported_without_the_secret() {
    let s = pg18(&[]);
    let dir = private_dir();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "right-secret-9f3k\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let t = s.token("cc", 300);
    s.idp.client_credentials("svc", "right-secret-9f3k", &t, 300);
    for auth in ["client_secret_basic", "client_secret_post"] {
        let profile = format!(
            "{}token.source = \"client_credentials\"\ntoken.issuer = \"{}\"\ntoken.client_id = \"svc\"\ntoken.client_auth = \"{auth}\"\ntoken.client_secret_file = \"{}\"\ntoken.scope = \"openid db:read\"\ntoken.insecure_allow_http_loopback = true\n",
            s.upstream(),
            s.idp.issuer(),
            secret.display()
        );
        // Logged at the most verbose level, with every library's events: still no secret.
        let c = Connector::start_env(&profile, false, &[("GPRXY_LOG", "trace")]);
        assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|cc", "{auth}");
        assert!(c.log().contains("TRACE"), "the log is not at trace level");
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode("svc:right-secret-9f3k");
        assert_no_secret(&c.log(), &[&t, "right-secret-9f3k", &basic]);
    }
    // The issuer refuses a wrong secret: the application and `gprxy token` are told why.
    std::fs::write(&secret, "wrong-secret-7a1b\n").unwrap();
    let profile = format!(
        "{}token.source = \"client_credentials\"\ntoken.issuer = \"{}\"\ntoken.client_id = \"svc\"\ntoken.client_secret_file = \"{}\"\ntoken.insecure_allow_http_loopback = true\n",
        s.upstream(),
        s.idp.issuer(),
        secret.display()
    );
    let c = Connector::start(&profile, false);
    let e = psql(&c.conninfo("alice"), WHO).unwrap_err();
    assert!(
        e.ends_with("FATAL:  gprxy connect: no token for profile p: the issuer refused the token request: invalid_client (HTTP 401)"),
        "{e}"
    );
    assert_no_secret(&(e + &c.log()), &["wrong-secret-7a1b", "right-secret-9f3k"]);
    let config = write_config(dir.path(), &profile, &dir.path().join("s"), None);
    let (ok, out, err) = run_gprxy(&["token", "--profile", "p", "--config", config.to_str().unwrap()], &[]);
    assert!(!ok);
    assert_eq!(out, "");
    assert_eq!(
        err.trim(),
        "gprxy: profile p: token (client_credentials): the issuer refused the token request: invalid_client (HTTP 401)"
    );
    // A secret file others may read is refused before anything is sent.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = s.idp.token_requests();
    let (ok, _, err) = run_gprxy(&["token", "--profile", "p", "--config", config.to_str().unwrap()], &[]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        format!("gprxy: profile p: token (client_credentials): {}: readable by others (mode 644); run chmod 600 on it", secret.display())
    );
    assert_eq!(s.idp.token_requests(), before);
}

#[test]
fn private_key_jwt_signs_a_fresh_assertion_for_each_token_request() {
    let s = pg18(&[]);
    let dir = private_dir();
    let key = dir.path().join("client.key");
    let public = dir.path().join("client.pub.der");
    let openssl = |args: &[&str]| {
        let out =
            Command::new("openssl").args(args).output().expect("openssl (scripts/bootstrap.sh installs it)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key.to_str().unwrap(),
    ]);
    openssl(&[
        "rsa",
        "-in",
        key.to_str().unwrap(),
        "-RSAPublicKey_out",
        "-outform",
        "DER",
        "-out",
        public.to_str().unwrap(),
    ]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let t = s.token("pkj", 300);
    s.idp.client_key("svc-key", std::fs::read(&public).unwrap(), &t, 300);
    let profile = format!(
        "{}token.source = \"client_credentials\"\ntoken.issuer = \"{}\"\ntoken.client_id = \"svc-key\"\ntoken.client_auth = \"private_key_jwt\"\ntoken.private_key_file = \"{}\"\ntoken.insecure_allow_http_loopback = true\n",
        s.upstream(),
        s.idp.issuer(),
        key.display()
    );
    let config = write_config(dir.path(), &profile, &dir.path().join("s"), None);
    let args = ["token", "--profile", "p", "--config", config.to_str().unwrap()];
    // Two requests, two assertions: the issuer refuses a replayed `jti`, so both succeeding
    // shows each was new.
    for _ in 0..2 {
        let (ok, out, err) = run_gprxy(&args, &[]);
        assert!(ok, "{err}");
        assert_eq!(out.trim(), t);
    }
    let c = Connector::start(&profile, false);
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|pkj");
    // Another key is refused by the issuer.
    let other = dir.path().join("other.key");
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        other.to_str().unwrap(),
    ]);
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = write_config(
        dir.path(),
        &profile.replace(key.to_str().unwrap(), other.to_str().unwrap()),
        &dir.path().join("s"),
        None,
    );
    let (ok, _, err) = run_gprxy(&["token", "--profile", "p", "--config", config.to_str().unwrap()], &[]);
    assert!(!ok);
    assert_eq!(err.trim(), "gprxy: profile p: token (client_credentials): the issuer refused the token request: invalid_client (HTTP 401)");
}

#[test]
fn the_stored_device_login_is_a_source_and_is_refreshed_when_near_its_end() {
    let s = pg18(&[]);
    let dir = private_dir();
    let (t1, t2) = (s.token("dev1", 30), s.token("dev2", 300));
    // `gprxy login` against the test issuer (its device flow approves itself).
    s.idp.hand_out_with_refresh("laptop", &t1, "refresh-1", 30);
    s.idp.on_refresh("refresh-1", &t2, Some("refresh-2"), 300);
    let env = [("GPRXY_CONFIG_DIR", dir.path().to_str().unwrap())];
    let (ok, _, err) = run_gprxy(
        &["login", "--issuer", &s.idp.issuer(), "--client-id", "laptop", "--insecure-allow-http-loopback"],
        &env,
    );
    assert!(ok, "{err}");
    let profile = format!("{}token.source = \"device\"\n", s.upstream());
    let config = write_config(dir.path(), &profile, &dir.path().join("s"), None);
    // 30 s left is inside the minute's margin: refreshed with the refresh token, and stored.
    let (ok, out, err) = run_gprxy(&["token", "--profile", "p", "--config", config.to_str().unwrap()], &env);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), t2);
    use std::os::unix::fs::PermissionsExt;
    let creds = dir.path().join("credentials.json");
    assert_eq!(std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&creds).unwrap().contains("refresh-2"));
    let c = Connector::start_env(&profile, false, &env);
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|dev2");
}

#[test]
fn an_exec_command_gives_the_token_and_a_failing_one_is_reported() {
    let s = pg18(&[]);
    let dir = private_dir();
    let file = dir.path().join("t");
    write_token_file(&file, &s.token("ex", 300));
    let good = format!(
        "{}token.source = \"exec\"\ntoken.command = [\"/bin/cat\", \"{}\"]\n",
        s.upstream(),
        file.display()
    );
    let c = Connector::start(&good, false);
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|ex");
    drop(c);
    let bad = format!(
        "{}token.source = \"exec\"\ntoken.command = [\"/bin/sh\", \"-c\", \"echo partial-output; echo 'vault: permission denied' >&2; exit 2\"]\n",
        s.upstream()
    );
    let c = Connector::start(&bad, false);
    let e = psql(&c.conninfo("alice"), WHO).unwrap_err();
    assert!(
        e.ends_with("FATAL:  gprxy connect: no token for profile p: the command /bin/sh exited with status 2: vault: permission denied"),
        "{e}"
    );
    assert!(!c.log().contains("partial-output"), "the failing command's stdout is never shown");
}

#[test]
fn a_github_actions_token_request_is_answered_by_a_local_stand_in() {
    let s = pg18(&[]);
    let t = s.token("gha", 300);
    let (token, seen) = (t.clone(), std::sync::Arc::new(parking_lot::Mutex::new(Vec::new())));
    let log = seen.clone();
    let stand_in = TestServer::start(move |req| {
        log.lock().push((req.path.clone(), req.headers.get("authorization").cloned()));
        if req.headers.get("authorization").map(String::as_str) == Some("Bearer request-token-1") {
            gprxy_core::testkit::Response::json(&json!({"count": 1, "value": token}))
        } else {
            gprxy_core::testkit::Response::json(&json!({"message": "Bad credentials"})).with_status(401)
        }
    });
    let url = format!("{}/_apis/token?api-version=2.0", stand_in.url());
    let profile = format!(
        "{}token.source = \"github_actions\"\ntoken.audience = \"https://github.com/acme\"\ntoken.insecure_allow_http_loopback = true\n",
        s.upstream()
    );
    let env = [
        ("ACTIONS_ID_TOKEN_REQUEST_URL", url.as_str()),
        ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "request-token-1"),
    ];
    let c = Connector::start_env(&profile, false, &env);
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|gha");
    assert_eq!(
        seen.lock()[0],
        (
            "/_apis/token?api-version=2.0&audience=https%3A%2F%2Fgithub.com%2Facme".to_owned(),
            Some("Bearer request-token-1".to_owned())
        )
    );
    assert_no_secret(&c.log(), &[&t, "request-token-1"]);
    drop(c);
    let dir = private_dir();
    let config = write_config(dir.path(), &profile, &dir.path().join("s"), None);
    let (ok, out, _) = run_gprxy(&["token", "--profile", "p", "--config", config.to_str().unwrap()], &env);
    assert!(ok);
    assert_eq!(out.trim(), t);
    let wrong = [("ACTIONS_ID_TOKEN_REQUEST_URL", url.as_str()), ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "stale")];
    let (ok, _, err) = run_gprxy(&["token", "--profile", "p", "--config", config.to_str().unwrap()], &wrong);
    assert!(!ok);
    assert_eq!(err.trim(), "gprxy: profile p: token (github_actions): the issuer refused the token request: (no OAuth error) (HTTP 401)");
    let (ok, _, err) = run_gprxy(&["token", "--profile", "p", "--config", config.to_str().unwrap()], &[]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "gprxy: profile p: token (github_actions): ACTIONS_ID_TOKEN_REQUEST_URL is not set: run inside a GitHub Actions job with `permissions: id-token: write`"
    );
}

/// A server that asks for a client certificate (`clientcert=verify-ca` on the OAuth line): a
/// profile without `tls.cert`/`tls.key` is refused by the server, one with them logs in; a key
/// that others can read is refused at start, as libpq refuses such an sslkey.
#[test]
fn a_client_certificate_is_presented_when_the_server_asks_for_one() {
    let key = TestKey::rsa("k1");
    let idp = TestIssuer::start(&[&key]);
    let certs = TestCerts::for_server();
    let pg = validator_cluster(AUD)
        .tls(&certs)
        .conf(format!("ssl_ca_file = '{}'", certs.ca_path.display()))
        .hba(format!(
            "hostssl all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m clientcert=verify-ca",
            idp.issuer()
        ))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE EXTENSION gprxy_validator");
    let dir = private_dir();
    let file = dir.path().join("token");
    let mut claims = idp.claims("alice", AUD);
    claims["jti"] = json!("with-cert");
    write_token_file(&file, &key.token(json!({"typ": "at+jwt"}), &claims));
    // The test CA's certificate for localhost, as this user's client certificate and key.
    let (cert, client_key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    std::fs::copy(&certs.cert_path, &cert).unwrap();
    std::fs::copy(&certs.key_path, &client_key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&client_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let base = format!(
        "upstream = \"127.0.0.1:{}\"\nuser = \"alice\"\ndatabase = \"postgres\"\ntls.ca_file = \"{}\"\n\
         tls.server_name = \"localhost\"\ntoken.source = \"file\"\ntoken.path = \"{}\"\n",
        pg.port(),
        certs.ca_path.display(),
        file.display()
    );
    let without = Connector::start(&base, false);
    let e = psql(&without.conninfo("alice"), WHO).unwrap_err();
    assert!(e.ends_with("FATAL:  connection requires a valid client certificate"), "{e}");
    drop(without);
    let with = format!("{base}tls.cert = \"{}\"\ntls.key = \"{}\"\n", cert.display(), client_key.display());
    let c = Connector::start(&with, false);
    assert_eq!(psql(&c.conninfo("alice"), WHO).unwrap(), "alice|oauth:alice|alice|with-cert");
    drop(c);
    std::fs::set_permissions(&client_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = write_config(dir.path(), &with, &dir.path().join("s"), None);
    let (ok, _, err) = run_gprxy(&["connect", "--check", "--config", config.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "tls.key: {}: readable by others (mode 644); run chmod 600 on it",
            client_key.display()
        )),
        "{err}"
    );
}

// ---- gprxy pass-through in front of PostgreSQL 18: OAUTHBEARER relayed, or the bridge. ----

/// The connector in front of gprxy pass-through (TLS to gprxy, TLS from gprxy to PostgreSQL 18):
/// OAUTHBEARER relayed to the server; with the token-as-password bridge the proxy asks for a
/// password, the connector sends the token as one over TLS and the proxy logs in with it. The
/// server logs each login with the token's identity, and the session is the token's.
#[test]
fn through_gprxy_pass_through_oauthbearer_is_relayed_and_the_bridge_takes_the_token_as_a_password() {
    let s = pg18(&[]);
    let dir = private_dir();
    let file = dir.path().join("token");
    let token = s.token("via-proxy", 300);
    write_token_file(&file, &token);
    for (bridge, mechanism) in [(false, "OAUTHBEARER"), (true, "password")] {
        let proxy = gprxy_tests::proxy::Proxy::start(&format!(
            "upstream = \"127.0.0.1:{}\"\n{}[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [upstream_tls]\nenabled = true\nca_file = \"{}\"\nserver_name = \"localhost\"\n",
            s.pg.port(),
            if bridge { "[bridge]\ntoken_as_password = true\n" } else { "" },
            s.certs.cert_path.display(),
            s.certs.key_path.display(),
            s.certs.ca_path.display()
        ));
        let profile = format!(
            "upstream = \"127.0.0.1:{}\"\nuser = \"alice\"\ndatabase = \"postgres\"\ntls.ca_file = \"{}\"\n\
             tls.server_name = \"localhost\"\ntoken.source = \"file\"\ntoken.path = \"{}\"\n",
            proxy.port,
            s.certs.ca_path.display(),
            file.display()
        );
        let c = Connector::start(&profile, false);
        let logins_before = s.pg.log().matches("gprxy: oauth login authorized").count();
        assert_eq!(
            psql(&c.conninfo("alice"), WHO).unwrap(),
            "alice|oauth:alice|alice|via-proxy",
            "bridge {bridge}"
        );
        let login = &c.wait_events("connect_login", 1)[0];
        assert_eq!(login["mechanism"].as_str(), Some(mechanism), "bridge {bridge}");
        // The server validated the token itself: one more authorized login, as alice.
        let log = s.pg.log();
        assert_eq!(log.matches("gprxy: oauth login authorized").count(), logins_before + 1, "{log}");
        assert!(log
            .lines()
            .rfind(|l| l.contains("gprxy: oauth login authorized"))
            .unwrap()
            .contains("authn_id=\"alice\""));
        assert_no_secret(&(c.log() + &proxy.log()), &[&token]);
    }
}

// ---- Fallback mode on PostgreSQL 15: the token goes upstream as a password over TLS. ----

#[test]
fn fallback_mode_on_15_logs_in_with_the_token_as_a_password_over_tls() {
    let f = fallback("");
    let dir = private_dir();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "svc-secret-1").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let t = f.token("svc-batch", "cc", 300);
    f.idp.client_credentials("batch", "svc-secret-1", &t, 300);
    let profile = format!(
        "{}user = \"svc-batch\"\ntoken.source = \"client_credentials\"\ntoken.issuer = \"{}\"\ntoken.client_id = \"batch\"\ntoken.client_auth = \"client_secret_post\"\ntoken.client_secret_file = \"{}\"\ntoken.insecure_allow_http_loopback = true\n",
        f.upstream(),
        f.idp.issuer(),
        secret.display()
    );
    let c = Connector::start(&profile, false);
    let who = "SELECT current_user, gprxy.subject(), current_setting('app.user_id')";
    // Fallback mode takes the token's subject as the user name and maps its role to a service account.
    assert_eq!(psql(&c.conninfo("svc-batch"), who).unwrap(), "app_writer|svc-batch|svc-batch");
    let login = &c.wait_events("connect_login", 1)[0];
    assert_eq!((login["mechanism"].as_str(), login["sub"].as_str()), (Some("password"), Some("svc-batch")));
    assert_no_secret(&c.log(), &[&t, "svc-secret-1"]);
    // The proxy logged the same login.
    assert_eq!(f.proxy.wait_events("login", 1)[0]["outcome"], "success");
    let config = write_config(dir.path(), &profile, &dir.path().join("s"), None);
    let (ok, out, err) = run_gprxy(&["connect", "--check", "--config", config.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "logged in as svc-batch to postgres on 127.0.0.1:{} (TLS verified for localhost, password); server version 15.",
            f.proxy.port
        )),
        "{out}"
    );
}

#[test]
fn the_token_is_never_sent_as_a_password_without_tls() {
    // A server that asks for a cleartext password on plain TCP (the insecure test mode's only
    // use): the connector refuses before sending anything.
    let pg = Cluster::builder(PgVersion::V15).hba("host all pwuser 127.0.0.1/32 password").start();
    pg.sql("CREATE ROLE pwuser LOGIN PASSWORD 'not-the-token'");
    let dir = private_dir();
    let file = dir.path().join("t");
    let t = "header.payload-never-sent.signature";
    write_token_file(&file, t);
    let profile = format!(
        "upstream = \"127.0.0.1:{}\"\ndatabase = \"postgres\"\ntls.mode = \"insecure-plain-for-tests\"\ntoken.source = \"file\"\ntoken.path = \"{}\"\n",
        pg.port(),
        file.display()
    );
    let c = Connector::start(&profile, false);
    let e = psql(&c.conninfo("pwuser"), "SELECT 1").unwrap_err();
    assert!(
        e.ends_with("FATAL:  gprxy connect: the server asks for the token as a password over a connection without TLS; refused"),
        "{e}"
    );
    assert_no_secret(&(c.log() + &pg.log()), &[t]);
    assert!(!pg.log().contains("password authentication failed"), "no password reached the server");
}
