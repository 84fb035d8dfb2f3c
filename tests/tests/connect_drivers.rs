//! Real drivers through `gprxy connect` (issue #32): psycopg 3, asyncpg, node-postgres (each on
//! the Unix socket), pgJDBC (the loopback TCP listener) and psql 15, each against two worlds:
//! PostgreSQL 18 with gprxy_validator and no proxy in front (OAUTHBEARER), and gprxy's fallback
//! mode in front of PostgreSQL 15 (the token as a password over TLS); both with their default
//! session policy, `idle` (the session ends at its first idle point after the token's `exp`).
//!
//! Each driver's script is written once: it logs in, reads what row-level security lets the
//! token's identity see, runs a probe (an INSERT) every 200 ms until the session ends at the
//! token's end, prints what it saw and waits; the test judges the end from the server's side
//! (no backend left for the first session on 18, its pooled backend reset on 15; no probe sent
//! after the end ran) and lets it go on; the driver reconnects and gets the next token, which a
//! token agent wrote once the first login was made.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gprxy_core::session::UtcTime;
use gprxy_tests::connect_upstream::{fallback, pg18, Fallback, Pg18};
use gprxy_tests::connector::{write_token_file, Connector};
use gprxy_tests::{Cluster, PgVersion};

/// One text column: the backend's pid, the token's `jti`, and the notes row-level security lets
/// the token's identity read.
const WHO: &str = "SELECT concat_ws(' ', pg_backend_pid(), gprxy.claim('jti'), \
                   (SELECT string_agg(note, ',' ORDER BY note) FROM notes))";
/// A statement that leaves a row on the server, with the token's `jti`.
const PROBE: &str = "INSERT INTO probes (jti) VALUES (gprxy.claim('jti'))";

/// Where the drivers log in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Upstream {
    /// PostgreSQL 18 with gprxy_validator, no proxy.
    Pg18,
    /// gprxy's fallback mode in front of PostgreSQL 15.
    Fallback,
}

enum Server {
    Pg18(Pg18),
    Fallback(Fallback),
}

/// A world: the server (and proxy), the connector, and the token agent that writes the second
/// token once the first login was made.
struct World {
    server: Server,
    connector: Connector,
    agent: Option<std::thread::JoinHandle<()>>,
    /// The first token's `exp`.
    exp: u64,
    _dir: tempfile::TempDir,
}

/// The first token lives `life` seconds (subject alice, `jti` "first"); the second (`jti`
/// "second", 300 s) is bob's on 18 (whose tokens log in as role alice) and alice's in fallback
/// mode (where the user name must be the token's subject).
fn world(upstream: Upstream, life: i64) -> World {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("token");
    let (server, role, first, second) = match upstream {
        Upstream::Pg18 => {
            let s = pg18(&[]);
            let (first, second) = (s.token("first", life), s.token_for("bob", "second", 300));
            (Server::Pg18(s), "alice", first, second)
        }
        Upstream::Fallback => {
            let f = fallback("");
            let (first, second) = (f.token("alice", "first", life), f.token("alice", "second", 300));
            (Server::Fallback(f), "app_writer", first, second)
        }
    };
    let profile = match &server {
        Server::Pg18(s) => s.upstream(),
        Server::Fallback(f) => f.upstream(),
    } + &format!("token.source = \"file\"\ntoken.path = \"{}\"\n", file.display());
    let w = World {
        connector: Connector::start(&profile, true),
        server,
        agent: None,
        exp: gprxy_core::peek_unverified(&first).exp.expect("exp") as u64,
        _dir: dir,
    };
    w.pg().sql(&format!(
        "CREATE TABLE notes (owner text, note text); \
         INSERT INTO notes VALUES ('alice', 'alice-1'), ('alice', 'alice-2'), ('bob', 'bob-1'); \
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY own_notes ON notes USING (owner = gprxy.identity()); \
         CREATE TABLE probes (n int GENERATED ALWAYS AS IDENTITY, jti text); \
         GRANT SELECT ON notes TO {role}; GRANT SELECT, INSERT ON probes TO {role}"
    ));
    write_token_file(&file, &first);
    let log = w.connector.dir().join("connect.log");
    let agent = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("\"event\":\"connect_login\"") {
            assert!(Instant::now() < deadline, "the driver never logged in");
            std::thread::sleep(Duration::from_millis(20));
        }
        write_token_file(&file, &second);
    });
    World { agent: Some(agent), ..w }
}

/// What a driver saw: the first session's [`WHO`], the error that ended it, and the second
/// session's [`WHO`].
#[derive(Debug)]
struct Seen {
    first: String,
    error: String,
    second: String,
}

impl World {
    fn upstream(&self) -> Upstream {
        match self.server {
            Server::Pg18(_) => Upstream::Pg18,
            Server::Fallback(_) => Upstream::Fallback,
        }
    }

    /// The server the sessions run on (behind the proxy in fallback mode).
    fn pg(&self) -> &Cluster {
        match &self.server {
            Server::Pg18(s) => &s.pg,
            Server::Fallback(f) => &f.pg,
        }
    }

    /// What the server ends the first session with.
    fn expired(&self) -> String {
        format!("gprxy: the access token expired at {}; log in again", UtcTime(self.exp))
    }

    /// Runs a driver script that prints `<first>|<probes>|<error>`, waits for a line on stdin,
    /// reconnects and prints `<second>`; judges the end from the server's side in between.
    fn run(&mut self, cmd: &mut Command) -> Seen {
        let mut child = cmd
            .env("WHO_SQL", WHO)
            .env("PROBE_SQL", PROBE)
            .env_remove("PGPASSWORD")
            .env_remove("PGHOST")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the driver");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let mut parts = line.trim_end().splitn(3, '|');
        let (Some(first), Some(probes), Some(error)) = (parts.next(), parts.next(), parts.next()) else {
            let out = child.wait_with_output().unwrap();
            panic!("the driver failed: {line}\n{}", String::from_utf8_lossy(&out.stderr));
        };
        let (first, error) = (first.to_owned(), error.to_owned());
        let probes: usize = probes.parse().unwrap_or_else(|_| panic!("{line}"));
        assert!(probes > 0, "no probe ran before the end: {line}");
        // The end came at the token's end: not before `exp`, and soon after (the driver saw it
        // at its next probe at the latest).
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let late = now.as_secs_f64() - self.exp as f64;
        assert!((0.0..3.0).contains(&late), "the driver saw the end {late:.3} s after exp: {line}");
        self.judge_the_end(&first, probes);
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut second = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut second).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the driver failed:\n{second}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.agent.take().unwrap().join().unwrap();
        Seen { first, error, second: second.trim().to_owned() }
    }

    /// Judged from the server once the driver saw the end of the session whose [`WHO`] was
    /// `first`: every probe the driver saw succeed left its row (under the first token), none
    /// other did (so none sent after the end ran); on 18 the session has no backend left, in
    /// fallback mode its pooled backend is idle, reset by the proxy.
    fn judge_the_end(&self, first: &str, probes: usize) {
        assert_eq!(
            self.pg().sql("SELECT count(*) || ' ' || count(*) FILTER (WHERE jti = 'first') FROM probes"),
            format!("{probes} {probes}"),
            "the server ran other probes than the driver saw succeed"
        );
        let pid = first.split(' ').next().unwrap();
        let (activity, want) = match self.upstream() {
            Upstream::Pg18 => (
                format!("SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice' OR pid = {pid}"),
                "0".to_owned(),
            ),
            // The account's one backend is the first session's, back in the pool: idle, its
            // last statement the proxy's reset (DISCARD ALL, gprxy.reset_context(), a marker).
            Upstream::Fallback => (
                "SELECT string_agg(pid || ' ' || state || ' ' || left(query, 20), ',') \
                 FROM pg_stat_activity WHERE usename = 'app_writer'"
                    .to_owned(),
                format!("{pid} idle SELECT 'gprxy-reset-"),
            ),
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut now = self.pg().sql(&activity);
        while now != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            now = self.pg().sql(&activity);
        }
        assert_eq!(now, want, "the first session's backend after the end");
        // Who ended it says so: the validator in the server log, the proxy in its own.
        match &self.server {
            Server::Pg18(s) => {
                let line = "gprxy: event=session_expired policy=idle role=\"alice\" authn_id=\"alice\" sub=\"alice\"";
                assert!(s.pg.wait_for_log(line, Duration::from_secs(3)), "{}", s.pg.log());
                assert_eq!(s.pg.log().matches("event=session_expired").count(), 1);
            }
            Server::Fallback(f) => {
                let ended = f.proxy.wait_events("session_expired", 1);
                assert_eq!(
                    (ended.len(), ended[0]["sub"].as_str(), ended[0]["ended_at"].as_str()),
                    (1, Some("alice"), Some("idle_point")),
                    "{ended:?}"
                );
            }
        }
    }

    /// What the driver saw: in the first session alice's notes only, the session ended with
    /// `error`; in the second the new token.
    fn assert_seen(&self, seen: &Seen, error: &str) {
        let (pid, rest) = seen.first.split_once(' ').unwrap_or_else(|| panic!("{seen:?}"));
        assert_eq!(rest, "first alice-1,alice-2", "{seen:?}");
        assert_eq!(seen.error, error);
        let (pid2, rest2) = seen.second.split_once(' ').unwrap_or_else(|| panic!("{seen:?}"));
        match self.upstream() {
            // Bob's token: role alice still, bob's notes.
            Upstream::Pg18 => {
                assert_eq!(rest2, "second bob-1", "{seen:?}");
                assert_ne!(pid2, pid);
            }
            // The same backend, reset, serves the next session with the new token's context.
            Upstream::Fallback => assert_eq!((pid2, rest2), (pid, "second alice-1,alice-2"), "{seen:?}"),
        }
    }
}

/// Where bootstrap put node-postgres (`$GPRXY_CACHE/node/node_modules`).
fn node_modules() -> PathBuf {
    let p = gprxy_tests::cache_dir().join("node").join("node_modules");
    assert!(
        p.join("pg").join("package.json").exists(),
        "node-postgres is not installed at {}: run scripts/bootstrap.sh (make test does)",
        p.display()
    );
    p
}

/// Where bootstrap put asyncpg.
fn asyncpg_site() -> PathBuf {
    let site = gprxy_tests::cache_dir().join("python").join("asyncpg-0.32.0");
    assert!(
        site.join("asyncpg").join("__init__.py").exists(),
        "asyncpg is not installed at {}: run scripts/bootstrap.sh (make test does)",
        site.display()
    );
    site
}

/// Writes a driver's script into the world's folder.
fn script(w: &World, name: &str, text: &str) -> PathBuf {
    let path = w.connector.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const PSYCOPG: &str = r#"
import os, sys, time, psycopg
conninfo, WHO, PROBE = sys.argv[1], os.environ["WHO_SQL"], os.environ["PROBE_SQL"]
with psycopg.connect(conninfo, autocommit=True) as conn:
    first = conn.execute(WHO).fetchone()[0]
    probes, err = 0, "no error"
    for _ in range(150):
        try:
            conn.execute(PROBE)
        except psycopg.Error as e:
            err = f"{type(e).__name__} {e.sqlstate} {str(e).strip().splitlines()[0]}"
            break
        probes += 1
        time.sleep(0.2)
print(f"{first}|{probes}|{err}", flush=True)
sys.stdin.readline()
with psycopg.connect(conninfo, autocommit=True) as conn:
    print(conn.execute(WHO).fetchone()[0])
"#;

fn psycopg(upstream: Upstream) {
    let mut w = world(upstream, 6);
    let path = script(&w, "driver.py", PSYCOPG);
    let seen = w.run(Command::new("/usr/bin/python3").arg(path).arg(w.connector.conninfo("alice")));
    // psycopg 3.1 (Debian's) shows the server's FATAL as the error's text, without its SQLSTATE.
    w.assert_seen(&seen, &format!("OperationalError None consuming input failed: {}", w.expired()));
}

#[test]
fn psycopg_3_on_18_reads_its_identitys_rows_is_ended_at_the_tokens_end_and_reconnects() {
    psycopg(Upstream::Pg18);
}

#[test]
fn psycopg_3_through_fallback_on_15_reads_its_identitys_rows_is_ended_at_the_tokens_end_and_reconnects() {
    psycopg(Upstream::Fallback);
}

const ASYNCPG: &str = r#"
import asyncio, os, sys
import asyncpg
WHO, PROBE = os.environ["WHO_SQL"], os.environ["PROBE_SQL"]
async def main(host):
    conn = await asyncpg.connect(host=host, port=5432, user="alice", database="postgres")
    first = await conn.fetchval(WHO)
    probes, err = 0, "no error"
    for _ in range(150):
        try:
            await conn.execute(PROBE)
        except Exception as e:
            err = f"{type(e).__name__} {getattr(e, 'sqlstate', None)} {str(e).strip()}"
            break
        probes += 1
        await asyncio.sleep(0.2)
    print(f"{first}|{probes}|{err}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    conn2 = await asyncpg.connect(host=host, port=5432, user="alice", database="postgres")
    print(await conn2.fetchval(WHO))
    await conn2.close()
asyncio.run(main(sys.argv[1]))
"#;

fn asyncpg(upstream: Upstream) {
    let site = asyncpg_site();
    let mut w = world(upstream, 6);
    let path = script(&w, "driver_asyncpg.py", ASYNCPG);
    let seen = w.run(
        Command::new("/usr/bin/python3").arg(path).arg(&w.connector.socket_dir).env("PYTHONPATH", &site),
    );
    // asyncpg reads the server's FATAL as soon as it arrives: while the driver idles it keeps
    // only that the connection is closed; when the end crosses the next probe on the wire (the
    // proxy ends the session at an idle point as the driver sends), it names the FATAL's text.
    // Either way the probe did not run (judged above from the server's rows).
    let mid_operation = format!(
        "ConnectionDoesNotExistError 08003 connection was closed in the middle of operation: {}",
        w.expired()
    );
    let error = if seen.error.starts_with("ConnectionDoesNotExistError") {
        mid_operation.as_str()
    } else {
        "InterfaceError None connection is closed"
    };
    w.assert_seen(&seen, error);
}

#[test]
fn asyncpg_on_18_reads_its_identitys_rows_is_ended_at_the_tokens_end_and_reconnects() {
    asyncpg(Upstream::Pg18);
}

#[test]
fn asyncpg_through_fallback_on_15_reads_its_identitys_rows_is_ended_at_the_tokens_end_and_reconnects() {
    asyncpg(Upstream::Fallback);
}

const NODE_PG: &str = r#"
const { Client } = require('pg');
const readline = require('readline');
const [host, port] = process.argv.slice(2);
const { WHO_SQL, PROBE_SQL } = process.env;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function open() {
  const c = new Client({ host, port: Number(port), user: 'alice', database: 'postgres' });
  // Without an error listener the end of an idle client's session crashes the process.
  const ended = new Promise((resolve) => c.on('error', (e) => resolve(`error event ${e.code} ${e.message}`)));
  await c.connect();
  const who = (await c.query({ text: WHO_SQL, rowMode: 'array' })).rows[0][0];
  return { c, who, ended };
}
(async () => {
  const a = await open();
  let probes = 0, err = 'no error';
  for (let i = 0; i < 150; i++) {
    try { await a.c.query(PROBE_SQL); } catch (e) { err = `query ${e.code} ${e.message}`; break; }
    probes++;
    await sleep(200);
  }
  const event = await Promise.race([a.ended, sleep(2000).then(() => 'no error event')]);
  console.log(`${a.who}|${probes}|${event}; ${err}`);
  const rl = readline.createInterface({ input: process.stdin });
  await new Promise((r) => rl.once('line', r));
  rl.close();
  const b = await open();
  console.log(b.who);
  await b.c.end();
})().catch((e) => { console.error(e); process.exit(1); });
"#;

fn node_postgres(upstream: Upstream) {
    let modules = node_modules();
    let mut w = world(upstream, 6);
    let path = script(&w, "driver.js", NODE_PG);
    let seen = w.run(
        Command::new("node").arg(path).arg(&w.connector.socket_dir).arg("5432").env("NODE_PATH", &modules),
    );
    // While the client idles: the FATAL comes as its error event and the next query is refused
    // by the driver, never sent. When the end crosses a probe on the wire (the proxy ends the
    // session at an idle point as the driver sends): the probe gets the FATAL and the error
    // event says the connection ended. Either way the probe did not run (judged above).
    let error = if seen.error.starts_with("error event 28000") {
        format!(
            "error event 28000 {}; query undefined Client has encountered a connection error and is not queryable",
            w.expired()
        )
    } else {
        format!("error event undefined Connection terminated unexpectedly; query 28000 {}", w.expired())
    };
    w.assert_seen(&seen, &error);
}

#[test]
fn node_postgres_on_18_reads_its_identitys_rows_is_ended_at_the_tokens_end_and_reconnects() {
    node_postgres(Upstream::Pg18);
}

#[test]
fn node_postgres_through_fallback_on_15_reads_its_identitys_rows_is_ended_at_the_tokens_end_and_reconnects() {
    node_postgres(Upstream::Fallback);
}

const JDBC: &str = r#"
import java.io.*;
import java.sql.*;
public class ConnectDriver {
  static String who(Connection c) throws SQLException {
    try (ResultSet r = c.createStatement().executeQuery(System.getenv("WHO_SQL"))) { r.next(); return r.getString(1); }
  }
  public static void main(String[] a) throws Exception {
    String url = "jdbc:postgresql://127.0.0.1:" + a[0] + "/postgres?user=alice&sslmode=disable";
    Connection c = DriverManager.getConnection(url);
    String first = who(c);
    int probes = 0;
    String err = "no error";
    for (int i = 0; i < 150; i++) {
      try (Statement s = c.createStatement()) { s.execute(System.getenv("PROBE_SQL")); }
      catch (SQLException e) { err = "SQLException " + e.getSQLState() + " " + e.getMessage(); break; }
      probes++;
      Thread.sleep(200);
    }
    System.out.println(first + "|" + probes + "|" + err);
    System.out.flush();
    new BufferedReader(new InputStreamReader(System.in)).readLine();
    try (Connection d = DriverManager.getConnection(url)) { System.out.println(who(d)); }
  }
}
"#;

fn pgjdbc(upstream: Upstream) {
    let jar = Path::new("/usr/share/java/postgresql.jar");
    assert!(jar.exists(), "pgJDBC is not installed: run scripts/bootstrap.sh (libpostgresql-jdbc-java)");
    // The JVM compiles the source first: a longer first token.
    let mut w = world(upstream, 12);
    let path = script(&w, "ConnectDriver.java", JDBC);
    let port = w.connector.tcp_port.unwrap().to_string();
    let seen = w.run(Command::new("java").arg("-cp").arg(jar).arg(path).arg(port));
    w.assert_seen(&seen, &format!("SQLException 28000 FATAL: {}", w.expired()));
}

#[test]
fn pgjdbc_on_18_over_loopback_tcp_reads_its_identitys_rows_is_ended_at_the_tokens_end_and_reconnects() {
    pgjdbc(Upstream::Pg18);
}

#[test]
fn pgjdbc_through_fallback_on_15_over_loopback_tcp_reads_its_identitys_rows_is_ended_at_the_tokens_end_and_reconnects(
) {
    pgjdbc(Upstream::Fallback);
}

/// psql 15 as a script runs it: one run reads the identity's rows and probes with `\watch`
/// until the session ends (psql then exits: a script's psql does not reconnect); the next run
/// is the reconnect. `$1` psql, `$2` the connection string.
const PSQL: &str = r#"
out=$(printf '%s;\n%s RETURNING n \\watch 0.2\n' "$WHO_SQL" "$PROBE_SQL" | "$1" -X -A -t -q -f - "$2" 2>"$0.err")
status=$?
first=$(printf '%s\n' "$out" | head -n 1)
probes=$(printf '%s\n' "$out" | tail -n +2 | grep -c .)
printf '%s|%s|exit %s: %s\n' "$first" "$probes" "$status" "$(sed -e ':a' -e 'N' -e '$!ba' -e 's/\n/\\n/g' "$0.err")"
read -r go
"$1" -X -A -t -c "$WHO_SQL" "$2"
"#;

fn psql(upstream: Upstream) {
    let mut w = world(upstream, 6);
    let path = script(&w, "driver.sh", PSQL);
    let seen = w.run(
        Command::new("/bin/sh").arg(path).arg(PgVersion::V15.bin("psql")).arg(w.connector.conninfo("alice")),
    );
    // psql's stderr, its lines joined with `\n`: the FATAL, then the lost connection; psql
    // exits with 2.
    w.assert_seen(
        &seen,
        &format!(
            "exit 2: psql:<stdin>:2: FATAL:  {}\\npsql:<stdin>:2: server closed the connection unexpectedly\\n\tThis probably means the server terminated abnormally\\n\tbefore or while processing the request.\\npsql:<stdin>:2: error: connection to server was lost",
            w.expired()
        ),
    );
}

#[test]
fn psql_15_on_18_reads_its_identitys_rows_is_ended_at_the_tokens_end_and_runs_again() {
    psql(Upstream::Pg18);
}

#[test]
fn psql_15_through_fallback_on_15_reads_its_identitys_rows_is_ended_at_the_tokens_end_and_runs_again() {
    psql(Upstream::Fallback);
}
