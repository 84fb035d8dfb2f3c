//! Attacks on `gprxy connect` by another local OS user (review of #32). Each test plays the
//! attacker as the unprivileged test user (`gprxytest`) against a connector run by this
//! process's user (root, as `make test` runs: a sidecar container's default user too), and
//! asserts that the attack fails. A test whose doc comment says DEFECT fails on the code it was
//! written against: the attack succeeds.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gprxy_tests::connect_upstream::Pg18;
use gprxy_tests::connector::Connector;
use gprxy_tests::pgwire::{self, Auth};
use gprxy_tests::proxy::gprxy_bin;
use gprxy_tests::{command_as_test_user, running_as_root, PgVersion};

/// PostgreSQL 18 as in connect.rs, with a table `loot` alice may write to: what an attacker's
/// blind statements leave behind.
fn pg18() -> Pg18 {
    let s = gprxy_tests::connect_upstream::pg18(&[]);
    s.pg.sql("CREATE TABLE loot (who text); GRANT INSERT ON loot TO alice");
    s
}

fn loot(s: &Pg18) -> String {
    s.pg.sql("SELECT count(*) || ' ' || coalesce(string_agg(DISTINCT who, ','), '') FROM loot")
}

fn attacker_uid() -> u32 {
    let out = Command::new("id").args(["-u", &gprxy_tests::test_user()]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

fn as_attacker(program: &str, args: &[&str]) -> std::process::Output {
    command_as_test_user(program).args(args).output().expect("run as the test user")
}

/// A folder the test user may enter (a temp dir is 0700 root's).
fn traversable_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// The attacker's client: `n` times, connect to 127.0.0.1:PORT, send a startup packet for
/// alice and one INSERT (padded past one MSS, with TCP_CORK so that data and FIN leave in one
/// segment, which the connector's kernel acknowledges at once), then close without reading.
const BLIND_CLIENT: &str = r#"
import socket, struct, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
b = struct.pack('!I', 196608) + b'user\0alice\0database\0postgres\0\0'
startup = struct.pack('!I', len(b) + 4) + b
q = b'INSERT INTO loot VALUES (current_user) --' + b' ' * 2000 + b'\0'
query = b'Q' + struct.pack('!I', len(q) + 4) + q
for _ in range(n):
    s = socket.socket()
    s.connect(('127.0.0.1', port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    s.send(startup + query)
    s.close()
"#;

/// Was a DEFECT (failed on 0cbb358; mended since): on loopback TCP another OS user gets in as root. The attacker
/// sends its startup packet and a statement and closes at once; by the time the connector asks
/// the kernel's socket table who owns the peer's socket, that socket is a TIME_WAIT entry, which
/// sock_diag (and /proc/net/tcp) report with uid 0. A connector running as root (a container's
/// default, or `allow_uids = [0]`) takes it for itself, logs in upstream with the profile's
/// token, and forwards the statement the attacker pipelined: alice's session runs it.
/// Fix: accept a table entry only in state ESTABLISHED with a socket inode (not TIME_WAIT or
/// an orphan), else refuse.
#[test]
fn a_peer_that_closed_before_the_lookup_is_not_taken_for_root() {
    assert!(running_as_root(), "the attacker is the test user: run as root (make test does)");
    let s = pg18();
    let (c, _dir) = s.connector("", true);
    let port = c.tcp_port.unwrap().to_string();
    let out = as_attacker("/usr/bin/python3", &["-c", BLIND_CLIENT, &port, "10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(3));
    let logins = c.events("connect_login");
    let refused = c.events("connect_refused");
    assert_eq!(
        loot(&s),
        "0",
        "OS user {} ran statements as alice; {} logins, {} refusals (uids {:?})",
        attacker_uid(),
        logins.len(),
        refused.len(),
        refused.iter().map(|e| e["uid"].clone()).collect::<Vec<_>>()
    );
    assert_eq!(logins.len(), 0);
    assert_eq!(refused.len(), 10);
}

/// Starts `gprxy connect` on `config`; Ok(child) once it listens, Err(log) if it exits first.
fn try_start(config: &Path, log: &Path) -> Result<Child, String> {
    let child = Command::new(gprxy_bin())
        .args(["connect", "--profile", "p", "--config"])
        .arg(config)
        .env("GPRXY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("\"event\":\"listening\"") {
            return Ok(child);
        }
        if let Ok(Some(_)) = child.try_wait() {
            return Err(text);
        }
        assert!(Instant::now() < deadline, "neither listening nor exited:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let _ = child.wait();
}

/// A fake server on a Unix socket, run as the attacker: answers every startup packet with
/// FATAL "served by the attacker", once (it could as well play the server and collect what the
/// application sends).
const FAKE_SERVER: &str = r#"
import os, socket, struct, sys
path = sys.argv[1]
l = socket.socket(socket.AF_UNIX)
l.bind(path)
os.chmod(path, 0o777)
l.listen(5)
l.settimeout(20)
open(sys.argv[2], 'w').write('ready')
c, _ = l.accept()
c.recv(65536)
body = b'SFATAL\0C28000\0Mserved by the attacker\0\0'
c.sendall(b'E' + struct.pack('!I', len(body) + 4) + body)
c.close()
"#;

/// Was a DEFECT (failed on 0cbb358; mended since): a socket folder under a folder another user owns. The connector
/// checks only the last component of `listen.unix_dir` (its own, 0700); a parent the attacker
/// owns (here `shared/`, made by the attacker before the connector first ran, as in /tmp) lets
/// the attacker rename the connector's folder away at any time and put its own folder and
/// socket at the same path: the application, which trusts that path, now talks to the
/// attacker's server (fake results, and whatever it sends). Fix: refuse a unix_dir any of
/// whose ancestors is owned by another user than root or this one, or is writable by group or
/// others without the sticky bit.
#[test]
fn a_socket_folder_inside_a_folder_another_user_owns_is_refused() {
    assert!(running_as_root(), "the attacker is the test user: run as root (make test does)");
    // Like /tmp: anyone may make a folder in it.
    let base = traversable_dir();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let shared = base.path().join("shared");
    let shared_s = shared.to_str().unwrap();
    // The attacker made the folder first (as anyone can in /tmp) and left it open to all.
    let out = as_attacker("/bin/sh", &["-c", &format!("mkdir -m 0777 {shared_s} && chmod 0777 {shared_s}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let unix_dir = shared.join("app");
    let config = base.path().join("connect.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\nformat = \"json\"\n[profile.p]\nupstream = \"127.0.0.1:1\"\ntls.mode = \"insecure-plain-for-tests\"\n\
             listen.unix_dir = \"{}\"\ntoken.source = \"file\"\ntoken.path = \"/nonexistent\"\n",
            unix_dir.display()
        ),
    )
    .unwrap();
    let log = base.path().join("connect.log");
    let child = match try_start(&config, &log) {
        // Refused at start: the attack has nothing to work on.
        Err(text) => {
            assert!(text.contains(shared_s), "the refusal names the folder: {text}");
            return;
        }
        Ok(child) => child,
    };
    // The attacker swaps the folder and serves on the same path.
    let app = unix_dir.to_str().unwrap();
    let ready = base.path().join("ready");
    let out = as_attacker("/bin/sh", &["-c", &format!("mv {app} {shared_s}/old && mkdir -m 0755 {app}")]);
    let swapped = out.status.success();
    let mut fake = command_as_test_user("/usr/bin/python3")
        .args(["-c", FAKE_SERVER])
        .arg(unix_dir.join(".s.PGSQL.5432"))
        .arg(&ready)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ready.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The application connects as it always did.
    let out = Command::new(PgVersion::V15.bin("psql"))
        .args(["-X", "-A", "-t", "-c", "SELECT 1"])
        .arg(format!("host={app} port=5432 user=alice dbname=postgres"))
        .output()
        .unwrap();
    // It serves one connection and exits (killing runuser would leave it running).
    let _ = fake.wait();
    stop(child);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !said.contains("served by the attacker"),
        "the connector started in {shared_s} (owned by OS user {}); swapped: {swapped}; the application reached the attacker's server: {said}",
        attacker_uid()
    );
}

/// Was a DEFECT (failed on 0cbb358; mended since): a token file another user owns is used. The file check refuses
/// mode bits that let group or others write, but not an owner who is someone else: whoever owns
/// the file may write it whatever its mode. Here the file's folder is world-writable and sticky
/// like /tmp, and the attacker wrote the file (mode 0644) before the agent that normally writes
/// it (which, sticky bit, now cannot replace it): the connector logs the application in with
/// the attacker's token, the attacker's identity then deciding what the application's session
/// is. Fix: refuse a token file owned by anyone but this user or root.
#[test]
fn a_token_file_another_user_owns_is_refused() {
    assert!(running_as_root(), "the attacker is the test user: run as root (make test does)");
    let s = pg18();
    let dir = traversable_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let file = dir.path().join("token");
    let planted = s.token_for("mallory", "planted", 300);
    let out =
        as_attacker("/bin/sh", &["-c", &format!("umask 022; printf %s '{planted}' > {}", file.display())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c = Connector::start(
        &format!("{}token.source = \"file\"\ntoken.path = \"{}\"\n", s.upstream(), file.display()),
        false,
    );
    let out = Command::new(PgVersion::V15.bin("psql"))
        .args(["-X", "-A", "-t", "-c", "SELECT 1"])
        .arg(c.conninfo("alice"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let fp = gprxy_core::fingerprint(planted.as_bytes());
    let used: Vec<_> =
        c.events("connect_login").into_iter().filter(|e| e["token_fp"] == fp.as_str()).collect();
    assert!(
        used.is_empty(),
        "the attacker's token (owned by OS user {}) was sent upstream: {used:?}; psql: {said}",
        attacker_uid()
    );
    assert!(said.contains(file.to_str().unwrap()), "the application is told which file: {said}");
    // From the server's side: no login of the planted token's identity was ever attempted.
    assert!(!s.pg.log().contains("authn_id=\"mallory\""), "{}", s.pg.log());
}

/// Was a DEFECT (failed on 0cbb358; mended since): with `GPRXY_LOG=trace` the HTTP library dumps every byte it sends
/// and receives, 16 to a log line (`ureq_proto::util`): the `Authorization: Basic` header
/// holding the client secret, and the issuer's answer holding the access token. Whoever reads
/// the log (a log shipper, a support bundle) can put the rows together; connect.rs's trace-level
/// check looks for each secret whole in one line, which the 16-byte rows never hold. The proxy
/// shares the fetcher (introspection's client secret, every introspected token). Fix: cap the
/// HTTP library's targets (`ureq_proto=debug`) in the log filter whatever GPRXY_LOG says.
#[test]
fn a_trace_level_log_does_not_hold_the_client_secret_or_the_token_in_pieces() {
    let s = pg18();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "right-secret-9f3k\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let t = s.token("cc", 300);
    s.idp.client_credentials("svc", "right-secret-9f3k", &t, 300);
    let profile = format!(
        "{}token.source = \"client_credentials\"\ntoken.issuer = \"{}\"\ntoken.client_id = \"svc\"\n\
         token.client_auth = \"client_secret_basic\"\ntoken.client_secret_file = \"{}\"\n\
         token.scope = \"openid db:read\"\ntoken.insecure_allow_http_loopback = true\n",
        s.upstream(),
        s.idp.issuer(),
        secret.display()
    );
    let c = Connector::start_env(&profile, false, &[("GPRXY_LOG", "trace")]);
    let out = Command::new(PgVersion::V15.bin("psql"))
        .args(["-X", "-A", "-t", "-c", "SELECT current_user"])
        .arg(c.conninfo("alice"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "alice",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The rows of the byte dump, their text columns joined.
    let mut dump = String::new();
    for line in c.log().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if let Some(m) = v["message"].as_str().or_else(|| v["fields"]["message"].as_str()) {
            if line.contains("ureq_proto") {
                if let Some((_, text)) = m.rsplit_once("  ") {
                    dump.push_str(text);
                }
            }
        }
    }
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("svc:right-secret-9f3k");
    let (secret_logged, token_logged) = (dump.contains(&basic), dump.contains(&t));
    assert!(
        !secret_logged && !token_logged,
        "in the log, 16 bytes a line: the client secret ({basic}) {secret_logged}, the access token {token_logged}"
    );
}

/// Was a DEFECT (failed on 0cbb358; mended since): a configuration file others may write is loaded (at start and on
/// each SIGHUP). Whoever can write it runs any program as the connector's user (`token.source =
/// "exec"`), or points `upstream` and `tls.ca_file` at a server of theirs, which then receives
/// the token. The proxy refuses policy files group or others may write (`read_policy_file`);
/// the connector's file is not checked at all. Fix: refuse a connect.toml that group or others
/// may write or that another user than this one or root owns.
#[test]
fn a_configuration_file_others_may_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let config = dir.path().join("connect.toml");
    std::fs::write(
        &config,
        format!(
            "[profile.p]\nupstream = \"127.0.0.1:1\"\ntls.mode = \"insecure-plain-for-tests\"\n\
             listen.unix_dir = \"{}\"\ntoken.source = \"exec\"\n\
             token.command = [\"/bin/sh\", \"-c\", \"touch {}; echo a.b.c\"]\n",
            dir.path().join("s").display(),
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (_, _, err) = gprxy_tests::connector::run_gprxy(
        &["connect", "--check", "--profile", "p", "--config", config.to_str().unwrap()],
        &[],
    );
    assert!(!marker.exists(), "a command from a file anyone may write ran: {err}");
}

// ---- Review of `max_connections` (ebd3f31) as an attacker, main at 37be449: not another OS
// user here, but the application itself and the server, judged from pg_stat_activity and the
// server log. A test whose doc comment says DEFECT failed on 37be449.

/// A connector in front of `s` with `max_connections = max`, its TCP listener on, and a token
/// file for alice.
fn capped(s: &Pg18, max: usize) -> (Connector, tempfile::TempDir, std::net::SocketAddr) {
    let (c, dir) = s.connector(&format!("max_connections = {max}\n"), true);
    let addr = ([127, 0, 0, 1], c.tcp_port.unwrap()).into();
    (c, dir, addr)
}

fn alice_backends(s: &Pg18) -> String {
    s.pg.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice' AND backend_type = 'client backend'",
    )
}

/// DEFECT (fails on 37be449). A cancel request is a connection of its own, and it was counted
/// against `max_connections` like a session: with the connector full, every cancel is refused
/// with 53300 and never reaches the server, so a runaway query cannot be cancelled exactly when
/// the application has used all its connections. PostgreSQL's own limit lets cancel requests
/// through (they open no session). Judged from the server: the statement is still running.
#[test]
fn attack_a_cancel_request_at_max_connections_never_reaches_the_server() {
    let s = pg18();
    let (c, _dir, addr) = capped(&s, 1);
    let mut conn = pgwire::connect(addr, "alice", "postgres", Auth::None).unwrap();
    let key = conn.key.unwrap();
    let running = std::thread::spawn(move || {
        let e = conn.query("SELECT pg_sleep(20)").unwrap_err();
        (conn, e)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let sleeping = || {
        s.pg.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice' AND state = 'active' AND query = 'SELECT pg_sleep(20)'")
    };
    while sleeping() != "1" {
        assert!(Instant::now() < deadline, "the statement never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    pgwire::cancel(addr, key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sleeping() != "0" {
        assert!(
            Instant::now() < deadline,
            "the cancel request never reached the server: its statement still runs; connector: {:?}",
            c.events("connect_refused")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.pg.log().contains("ERROR:  canceling statement due to user request"), "{}", s.pg.log());
    let (mut conn, e) = running.join().unwrap();
    assert_eq!(e.code.as_deref(), Some("57014"), "{e:?}");
    assert_eq!(c.wait_events("cancel", 1)[0]["outcome"], "forwarded");
    assert!(c.events("connect_refused").is_empty(), "{:?}", c.events("connect_refused"));
    // Full, a startup is still refused with 53300, and no backend appears for it.
    let Err(e) = pgwire::connect(addr, "alice", "postgres", Auth::None) else { panic!("a second session") };
    assert_eq!(e.code.as_deref(), Some("53300"), "{e:?}");
    assert_eq!(alice_backends(&s), "1");
    // The session goes on.
    assert_eq!(conn.scalar("SELECT gprxy.claim('jti')").unwrap().as_deref(), Some("j1"));
}

/// DEFECT (fails on 37be449). A session's slot was given back only when both sides had ended:
/// when the server ends a session (pg_terminate_backend here; the token's end, an idle timeout)
/// and the application does not close its socket (an idle connection in a pool, not read from),
/// the relay waits for the application forever. The server has no backend for it, yet the slot
/// stays taken: with `max_connections = 1` the next connection is refused with 53300 while the
/// server serves none of the connector's.
#[test]
fn attack_a_session_the_server_ended_keeps_its_slot_while_the_application_holds_the_socket() {
    let s = pg18();
    let (_c, _dir, addr) = capped(&s, 1);
    let idle = pgwire::connect(addr, "alice", "postgres", Auth::None).unwrap();
    assert_eq!(alice_backends(&s), "1");
    s.pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'alice'");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alice_backends(&s) != "0" {
        assert!(Instant::now() < deadline, "the backend never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    // `idle` is open still, unread: the FATAL waits in its socket.
    let mut next = Err(None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match pgwire::connect(addr, "alice", "postgres", Auth::None) {
            Ok(c) => {
                next = Ok(c);
                break;
            }
            Err(e) => next = Err(Some(e)),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut next = next.unwrap_or_else(|e| {
        panic!("no backend on the server, yet the connector is full: {e:?}; backends: {}", alice_backends(&s))
    });
    assert_eq!(next.scalar("SELECT gprxy.claim('jti')").unwrap().as_deref(), Some("j1"));
    assert_eq!(alice_backends(&s), "1");
    drop(idle);
}

/// DEFECT (fails on 37be449, and after the two mends above). A slot was given back as soon as
/// the relay failed on the application's side, though the server's backend may live on: an
/// application that sends a long statement and then resets its connection (it closes with
/// unread answers in its socket: the kernel sends RST) frees its slot at once, while its backend
/// runs the statement to its end (PostgreSQL notices a gone client only when it next writes). A
/// next connection then gets a slot, and the server has two of the connector's backends with
/// `max_connections = 1`; in a loop, any number. Judged from pg_stat_activity.
#[test]
fn attack_a_client_reset_mid_statement_frees_its_slot_while_its_backend_runs() {
    let s = pg18();
    let (c, _dir, addr) = capped(&s, 1);
    let mut first = pgwire::connect(addr, "alice", "postgres", Auth::None).unwrap();
    // An answer left unread, then a long statement.
    first.send_raw(&pgwire::msg::query("SELECT 1")).unwrap();
    first.send_raw(&pgwire::msg::query("SELECT pg_sleep(30)")).unwrap();
    let sleeping = || {
        s.pg.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice' AND state = 'active' AND query = 'SELECT pg_sleep(30)'")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeping() != "1" {
        assert!(Instant::now() < deadline, "the statement never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Closed with unread bytes: a reset.
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    let second = pgwire::connect(addr, "alice", "postgres", Auth::None);
    let backends = alice_backends(&s);
    assert!(
        second.as_ref().is_err_and(|e| e.code.as_deref() == Some("53300")) && backends == "1",
        "with max_connections = 1 the server has {backends} backends of the connector's (the reset one \
         still sleeping); the next connection: {:?}",
        second.as_ref().map(|_| "logged in")
    );
    // Its statement cancelled, the server answers: the slot is free, and the backend, reading the
    // connector's end, is gone before the next login is through.
    s.pg.sql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE usename = 'alice'");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut next = loop {
        match pgwire::connect(addr, "alice", "postgres", Auth::None) {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "the slot was never given back: {e:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(next.scalar("SELECT gprxy.claim('jti')").unwrap().as_deref(), Some("j1"));
    assert_eq!(alice_backends(&s), "1");
    // The reset session's end is logged with what failed.
    let ends = c.events("connect_end");
    assert!(ends.iter().any(|e| e["error"].as_str().is_some_and(|x| x.contains("reset"))), "{ends:?}");
}

/// HELD (and the limit of the mend above). While a reset application's session holds its slot
/// until its backend is gone, the connector does not read the server's answers to their end for
/// it: a statement whose answers were streaming when the application reset its connection (a
/// SELECT calling a function that writes a row for each answer) fails at the server's next write,
/// as it would without the connector, and nothing of it commits; its backend is gone and its
/// slot free. (Read to its end, the statement would have run to its end and committed.)
#[test]
fn held_a_client_reset_while_answers_stream_commits_nothing() {
    let s = pg18();
    s.pg.sql(
        "CREATE TABLE seen (n int); GRANT INSERT ON seen TO alice; \
         CREATE FUNCTION note_row(int) RETURNS text LANGUAGE sql VOLATILE \
           AS $$ INSERT INTO seen VALUES ($1); SELECT repeat('x', 2000) $$",
    );
    let (_c, _dir, addr) = capped(&s, 1);
    let mut first = pgwire::connect(addr, "alice", "postgres", Auth::None).unwrap();
    // About 200 MB of answers: far more than the sockets on the way hold.
    first.send_raw(&pgwire::msg::query("SELECT note_row(g) FROM generate_series(1, 100000) g")).unwrap();
    // The server blocks writing answers nobody reads.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s
        .pg
        .sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice' AND wait_event = 'ClientWrite'")
        != "1"
    {
        assert!(Instant::now() < deadline, "the answers never backed up");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alice_backends(&s) != "0" {
        assert!(Instant::now() < deadline, "the backend of the reset session lives on");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        s.pg.sql("SELECT count(*) FROM seen"),
        "0",
        "rows of a statement whose client was gone committed"
    );
    assert!(s.pg.log().contains("FATAL:  connection to client lost"), "{}", s.pg.log());
    let mut next = pgwire::connect(addr, "alice", "postgres", Auth::None).unwrap();
    assert_eq!(next.scalar("SELECT gprxy.claim('jti')").unwrap().as_deref(), Some("j1"));
}
