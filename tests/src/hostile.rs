//! Hostile sessions from a seed, with the server as the judge (#26).
//!
//! Each client runs a random sequence of steps: simple queries, extended-protocol batches with
//! and without Sync and Flush, fast-path calls, COPY in and out left half way, transactions
//! with savepoints and errors, DO blocks that catch `query_canceled` (one that commits in a
//! loop), `pg_sleep`, cursors WITH HOLD, LISTEN, temporary tables and settings, cancel
//! requests, pipelined queries, and disconnects at random points; its token expires at a random
//! moment of the run. What the client is told counts for nothing: the invariants are read from
//! the server (rows stamped with their transaction's start and, with `track_commit_timestamp`,
//! their commit; `pg_stat_activity`), and from the proxy's metrics:
//!
//! 1. no row commits after its session's end, except (`idle`) one whose transaction began
//!    before the end and commits before the hard limit (pass-through with only gprxy's policy:
//!    one of a request sent before the end, which gprxy cannot look inside);
//! 2. at every sample a service account has at most its pool's size of server processes
//!    serving clients, plus one gprxy opens to end a backend (through `gprxy connect`, at most
//!    its `max_connections`, below the clients' number); and no server process of a
//!    session that ended is still there (running its statements, for a pooled one) 2 s later;
//!    without a pool, none is there 2 s after its application left with nothing in flight
//!    (closed its socket with no statement running and no COPY open), whenever its token ends;
//! 3. every session starts as its own identity in a clean session: no earlier user's
//!    prepared statements, cursors, LISTEN, temporary tables, settings or open transaction;
//! 4. at the end the proxy (or `gprxy connect`) has no session open, its pools nothing in use,
//!    and its memory is back near where it was.
//!
//! A failure names the seed, the target and the session's steps up to where it broke.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde_json::json;

use crate::connector::{get_metrics, write_token_file, Connector};
use crate::idp::TestIssuer;
use crate::pgwire::{self, msg, Auth, PgConn, PgError};
use crate::proxy::{context_conf, ContextKeyFile, FallbackSetup, Proxy};
use crate::{require_validator, validator_cluster, Cluster, PgVersion, TestCerts};
use gprxy_core::testkit::TestKey;

/// The `idle` policy's hard limit in these runs, seconds after the end.
pub const HARD_LIMIT: u64 = 3;
/// How long after its end a session's server process may still be there.
pub const GONE_WITHIN: f64 = 2.0;
/// Slack for the server's commit stamps against the end (whole seconds, the proxy's timer).
pub const COMMIT_SLACK: f64 = 1.0;

/// splitmix64: small, seedable, the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent` in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One step of a hostile client.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `INSERT` of a row, simple protocol.
    Insert,
    /// `BEGIN`.
    Begin,
    /// `COMMIT`.
    Commit,
    /// `ROLLBACK`.
    Rollback,
    /// `SAVEPOINT`, an error, `ROLLBACK TO`, an insert.
    SavepointError,
    /// `pg_sleep` of so many milliseconds.
    Sleep(u64),
    /// A DO block that sleeps, catches the cancel, then inserts (one transaction).
    Stubborn(u64),
    /// A DO block that inserts and commits every round, catching cancels, forever.
    CommittingLoop,
    /// Parse, Bind, Execute of an insert; then Sync, Flush or nothing.
    Extended { sync: bool, flush: bool },
    /// A lone Sync.
    Sync,
    /// A fast-path call of `gen_tick`.
    FastPath,
    /// `COPY ... FROM STDIN` with a row, finished or left open.
    CopyIn { finish: bool },
    /// `COPY (...) TO STDOUT`.
    CopyOut,
    /// Session state a next user must not see: a setting, a prepared statement, a cursor WITH
    /// HOLD, LISTEN, a temporary table.
    Pollute,
    /// A sleep cancelled by a CancelRequest.
    Cancelled,
    /// So many inserts in one write.
    Pipeline(u8),
    /// Wait (client side) until past the token's end.
    WaitPastEnd,
    /// Close the socket now, whatever is in flight.
    Disconnect,
    /// Send a `pg_sleep` of so many milliseconds and leave at once.
    Abandon(u64),
    /// Send the committing loop and leave at once.
    AbandonLoop,
}

impl Step {
    fn random(rng: &mut Rng) -> Self {
        match rng.below(100) {
            0..=14 => Self::Insert,
            15..=22 => Self::Begin,
            23..=29 => Self::Commit,
            30..=32 => Self::Rollback,
            33..=36 => Self::SavepointError,
            37..=43 => Self::Sleep(100 + rng.below(2400)),
            44..=48 => Self::Stubborn(100 + rng.below(1400)),
            49..=50 => Self::CommittingLoop,
            51..=58 => Self::Extended { sync: rng.chance(60), flush: rng.chance(50) },
            59..=61 => Self::Sync,
            62..=67 => Self::FastPath,
            68..=71 => Self::CopyIn { finish: rng.chance(70) },
            72..=74 => Self::CopyOut,
            75..=80 => Self::Pollute,
            81..=84 => Self::Cancelled,
            85..=90 => Self::Pipeline(2 + rng.below(5) as u8),
            91..=93 => Self::WaitPastEnd,
            94..=95 => Self::Abandon(500 + rng.below(4500)),
            96..=97 => Self::AbandonLoop,
            _ => Self::Disconnect,
        }
    }
}

/// A session's steps from its seed.
pub fn steps(rng: &mut Rng) -> Vec<Step> {
    let n = 3 + rng.below(12);
    (0..n).map(|_| Step::random(rng)).collect()
}

/// What a target ends sessions with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// At the next idle point after the end, or at the hard limit.
    Idle,
    /// At the end.
    Strict,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Strict => "strict",
        }
    }
}

/// Where the hostile sessions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// PostgreSQL 18 with gprxy_validator, no proxy.
    Validator,
    /// gprxy pass-through in front of it, the server's own policy on.
    PassthroughServerPolicy,
    /// gprxy pass-through, the server's policy off: gprxy alone ends sessions.
    PassthroughProxyPolicy,
    /// `gprxy connect` in front of PostgreSQL 18 with gprxy_validator (TLS, OAUTHBEARER, a token
    /// file written for each session just before it connects), the server's policy on, with
    /// `max_connections` = [`CONNECTOR_MAX_CONNECTIONS`].
    Connector,
    /// gprxy fallback mode in front of 15 or 17, one account with a pool of `pool`.
    Fallback {
        /// The pool's size.
        pool: u32,
    },
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Validator => write!(f, "validator"),
            Self::PassthroughServerPolicy => write!(f, "passthrough-server-policy"),
            Self::PassthroughProxyPolicy => write!(f, "passthrough-proxy-policy"),
            Self::Connector => write!(f, "connector"),
            Self::Fallback { pool } => write!(f, "fallback-pool-{pool}"),
        }
    }
}

/// The role (validator, pass-through) or service account (fallback) every session is.
const ROLE: &str = "gen";

/// A running target: servers, issuer and maybe a proxy.
pub struct Target {
    kind: Kind,
    policy: Policy,
    idp: TestIssuer,
    key: TestKey,
    /// The server.
    pub pg: Cluster,
    /// The proxy, if the target has one.
    pub proxy: Option<Proxy>,
    /// The connector, if the target is one.
    connector: Option<ConnectorEnd>,
    certs: TestCerts,
    _context_key: Option<ContextKeyFile>,
    tick_oid: u32,
}

const SCHEMA: &str = "CREATE TABLE gen_rows (session text, kind text, who text DEFAULT gprxy.subject(), \
     at timestamptz DEFAULT clock_timestamp(), xact_start timestamptz DEFAULT now()); \
     CREATE FUNCTION gen_tick(text) RETURNS int LANGUAGE sql AS $$ INSERT INTO gen_rows (session, kind) VALUES ($1, 'fastpath'); SELECT 1 $$; \
     GRANT ALL ON gen_rows TO gen";

/// The connector target's `max_connections`: fewer than the four clients a run has, so that the
/// limit is reached while sessions are cancelled, abandoned and cut; at every sample the server
/// has at most this many of the connector's backends.
pub const CONNECTOR_MAX_CONNECTIONS: u32 = 3;

/// `gprxy connect` with a token file: each session writes its token and connects while it holds
/// `turn`, so that the connector's login uses that session's token.
struct ConnectorEnd {
    connector: Connector,
    token_file: std::path::PathBuf,
    turn: Mutex<()>,
    metrics_port: u16,
    _dir: tempfile::TempDir,
}

impl Target {
    /// Starts the servers (and proxy) of `kind` with `policy`.
    pub fn start(kind: Kind, policy: Policy) -> Self {
        let key = TestKey::rsa("k");
        let idp = TestIssuer::start(&[&key]);
        let certs = if kind == Kind::Connector { TestCerts::for_server() } else { TestCerts::new() };
        let hard = format!("{HARD_LIMIT}s");
        let proxy_session =
            format!("[session]\npolicy = \"{}\"\nidle_hard_limit_secs = {HARD_LIMIT}\n", policy.name());
        let (pg, proxy, context_key) = match kind {
            Kind::Validator
            | Kind::Connector
            | Kind::PassthroughServerPolicy
            | Kind::PassthroughProxyPolicy => {
                let server_policy = if kind == Kind::PassthroughProxyPolicy { "off" } else { policy.name() };
                let mut builder = validator_cluster("db");
                if kind == Kind::Connector {
                    builder = builder.tls(&certs);
                }
                let pg = builder
                    .conf("track_commit_timestamp = on")
                    .conf(format!("gprxy.session_policy = '{server_policy}'"))
                    .conf(format!("gprxy.session_idle_hard_limit = '{hard}'"))
                    .hba("host all postgres 127.0.0.1/32 trust")
                    .hba("host all gen_terminator 127.0.0.1/32 scram-sha-256")
                    .hba(format!(
                        "host all {ROLE} 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
                        idp.issuer()
                    ))
                    .ident(format!("m /^s[0-9]+-[0-9]+$ {ROLE}"))
                    .start();
                pg.sql(&format!(
                    "CREATE ROLE {ROLE} LOGIN; CREATE EXTENSION gprxy_validator; {SCHEMA}; \
                     SET password_encryption = 'scram-sha-256'; \
                     CREATE ROLE gen_terminator LOGIN PASSWORD 'terminator-secret-1' IN ROLE pg_signal_backend"
                ));
                let pw = certs.dir().join("terminator.pw");
                std::fs::write(&pw, "terminator-secret-1\n").unwrap();
                let proxy = (!matches!(kind, Kind::Validator | Kind::Connector)).then(|| {
                    let session = if kind == Kind::PassthroughServerPolicy {
                        "[session]\npolicy = \"off\"\n".to_owned()
                    } else {
                        format!(
                            "{proxy_session}terminate_user = \"gen_terminator\"\nterminate_password_file = \"{}\"\n",
                            pw.display()
                        )
                    };
                    Proxy::start(&format!("upstream = \"127.0.0.1:{}\"\n{session}", pg.port()))
                });
                (pg, proxy, None)
            }
            Kind::Fallback { pool } => {
                let version = PgVersion::fallback_upstream();
                require_validator(version);
                let context_key = ContextKeyFile::create(certs.dir().join("context.key"));
                let mut builder = Cluster::builder(version)
                    .conf("track_commit_timestamp = on")
                    .hba("host all postgres 127.0.0.1/32 trust")
                    .hba(format!("host all {ROLE} 127.0.0.1/32 scram-sha-256"));
                for line in context_conf(&[&context_key.public]) {
                    builder = builder.conf(line.replace("'app_admin, app_writer, app_reader'", "'gen'"));
                }
                let pg = builder.start();
                pg.sql("CREATE EXTENSION gprxy_validator");
                pg.sql(&format!(
                    "SET password_encryption = 'scram-sha-256'; CREATE ROLE {ROLE} LOGIN PASSWORD 'gen-secret-1'; \
                     GRANT USAGE ON SCHEMA gprxy TO {ROLE}; GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA gprxy TO {ROLE}; {SCHEMA}"
                ));
                let pw = certs.dir().join("gen.pw");
                std::fs::write(&pw, "gen-secret-1\n").unwrap();
                let setup = FallbackSetup {
                    upstream_port: pg.port(),
                    cert: &certs.cert_path,
                    key: &certs.key_path,
                    issuer: &idp.issuer(),
                    audience: "db",
                    rules: &[("writer", ROLE, &pw)],
                    context_key: Some(&context_key.path),
                    extra: &format!("[fallback.pool]\ndefault_size = {pool}\nwait_timeout_ms = 20000"),
                };
                let proxy = Proxy::start(&format!("{}\n{proxy_session}", setup.toml()));
                (pg, Some(proxy), Some(context_key))
            }
        };
        let tick_oid = pg.sql("SELECT 'gen_tick'::regproc::oid").parse().expect("gen_tick's oid");
        let connector = (kind == Kind::Connector).then(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let token_file = dir.path().join("token");
            let metrics_port = crate::free_port();
            let connector = Connector::start(
                &format!(
                    "upstream = \"127.0.0.1:{}\"\ndatabase = \"postgres\"\ntls.ca_file = \"{}\"\n\
                     tls.server_name = \"localhost\"\ntoken.source = \"file\"\ntoken.path = \"{}\"\n\
                     listen.metrics = \"127.0.0.1:{metrics_port}\"\nmax_connections = {CONNECTOR_MAX_CONNECTIONS}\n",
                    pg.port(),
                    certs.ca_path.display(),
                    token_file.display()
                ),
                true,
            );
            ConnectorEnd { connector, token_file, turn: Mutex::new(()), metrics_port, _dir: dir }
        });
        Self { kind, policy, idp, key, pg, proxy, connector, certs, _context_key: context_key, tick_oid }
    }

    fn addr(&self) -> SocketAddr {
        match (&self.proxy, &self.connector) {
            (Some(p), _) => p.addr(),
            (None, Some(c)) => {
                SocketAddr::from(([127, 0, 0, 1], c.connector.tcp_port.expect("its TCP port")))
            }
            (None, None) => SocketAddr::from(([127, 0, 0, 1], self.pg.port())),
        }
    }

    fn connect(&self, sid: &str, exp: u64) -> Result<PgConn, PgError> {
        let mut claims = self.idp.claims(sid, "db");
        claims["exp"] = json!(exp);
        claims["roles"] = json!(["writer"]);
        let token = self.key.token(json!({"typ": "at+jwt"}), &claims);
        match self.kind {
            Kind::Fallback { .. } => {
                pgwire::connect_tls(self.addr(), sid, "postgres", Auth::Password(&token), &self.certs.ca)
            }
            Kind::Connector => {
                let c = self.connector.as_ref().expect("the connector");
                // The application sends no password: the connector's login uses the file's token.
                let _turn = c.turn.lock();
                write_token_file(&c.token_file, &token);
                pgwire::connect(self.addr(), ROLE, "postgres", Auth::None)
            }
            _ => pgwire::connect(self.addr(), ROLE, "postgres", Auth::Bearer(&token)),
        }
    }

    /// The process relaying the sessions, if gprxy runs one (proxy or connector).
    fn relay_pid(&self) -> Option<u32> {
        self.proxy.as_ref().map(Proxy::pid).or_else(|| self.connector.as_ref().map(|c| c.connector.pid()))
    }

    /// The judge's own connection (the superuser, over loopback).
    fn judge(&self) -> PgConn {
        pgwire::connect(
            SocketAddr::from(([127, 0, 0, 1], self.pg.port())),
            "postgres",
            "postgres",
            Auth::None,
        )
        .expect("the judge connects")
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// One session as it ran.
#[derive(Debug, Clone)]
pub struct SessionRun {
    /// Its identity (`sub`), which its rows carry.
    pub sid: String,
    /// Its token's `exp`.
    pub exp: u64,
    /// Its server process (for a pooled one, the one it was given).
    pub pid: Option<i32>,
    /// Its steps.
    pub steps: Vec<Step>,
    /// How many steps ran.
    pub ran: usize,
    /// Why it stopped early, if it did (what the client saw: for the report only).
    pub stopped: Option<String>,
    /// When the client closed its socket with nothing in flight (no statement running, no COPY
    /// open): its server process, if it has one of its own, is to end then, whenever its token
    /// ends. None: it left something running, or its first query failed.
    pub left_idle_at: Option<f64>,
}

impl SessionRun {
    /// Seconds (unix) after which nothing of it may commit.
    fn last_commit(&self, policy: Policy) -> f64 {
        match policy {
            Policy::Strict => self.exp as f64,
            Policy::Idle => (self.exp + HARD_LIMIT) as f64,
        }
    }
}

/// A broken invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Which invariant (1 to 4).
    pub invariant: u8,
    /// The session, if one.
    pub sid: Option<String>,
    /// What was seen.
    pub what: String,
}

/// What one run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Sessions run.
    pub sessions: Vec<SessionRun>,
    /// Logins refused (a pool's wait, for one).
    pub refused_logins: u32,
    /// Steps run in all.
    pub steps: usize,
    /// Rows judged.
    pub rows: u64,
    /// Samples taken.
    pub samples: u64,
    /// What broke.
    pub violations: Vec<Violation>,
}

/// The session is over for the client (FATAL, closed, stuck, left): why.
struct Over(String);

struct Client<'a> {
    t: &'a Target,
    c: PgConn,
    sid: String,
    /// ReadyForQuery messages owed.
    owed: u32,
    in_copy: bool,
}

impl Client<'_> {
    fn send(&mut self, bytes: &[u8]) -> Result<(), Over> {
        self.c.send_raw(bytes).map_err(|e| Over(format!("write: {e}")))
    }

    /// Reads until every ReadyForQuery owed came (answering a COPY IN request with CopyFail
    /// unless `copy` is given the data to send).
    fn settle(&mut self, mut copy: Option<(bool, Vec<u8>)>) -> Result<(), Over> {
        while self.owed > 0 {
            match self.c.next_raw() {
                Ok((b'Z', _)) => {
                    self.owed -= 1;
                    self.in_copy = false;
                }
                Ok((b'G', _)) => match copy.take() {
                    Some((finish, data)) => {
                        self.in_copy = true;
                        self.send(&msg::copy_data(&data))?;
                        if !finish {
                            return Ok(());
                        }
                        self.send(&msg::copy_done())?;
                    }
                    None => self.send(&msg::copy_done())?,
                },
                Ok(_) => {}
                Err(e) if e.severity == "FATAL" || e.code.is_none() => return Err(Over(e.to_string())),
                Err(_) => {}
            }
        }
        Ok(())
    }

    fn query(&mut self, sql: &str) -> Result<(), Over> {
        self.send(&msg::query(sql))?;
        self.owed += 1;
        self.settle(None)
    }

    fn insert_sql(&self, kind: &str) -> String {
        format!("INSERT INTO gen_rows (session, kind) VALUES ('{}', '{kind}')", self.sid)
    }

    fn step(&mut self, step: &Step, exp: u64, rng: &mut Rng) -> Result<(), Over> {
        let sid = self.sid.clone();
        if self.in_copy {
            // A COPY left open: finished late now, or the client leaves.
            if rng.chance(50) {
                return Err(Over("left inside COPY".into()));
            }
            self.send(&msg::copy_done())?;
            self.settle(None)?;
        }
        match step {
            Step::Insert => self.query(&self.insert_sql("simple")),
            Step::Begin => self.query("BEGIN"),
            Step::Commit => self.query("COMMIT"),
            Step::Rollback => self.query("ROLLBACK"),
            Step::SavepointError => {
                self.query("SAVEPOINT gen_sp")?;
                self.query("SELECT 1/0")?;
                self.query("ROLLBACK TO gen_sp")?;
                self.query(&self.insert_sql("savepoint"))
            }
            Step::Sleep(ms) => self.query(&format!("SELECT pg_sleep({}) /* {sid} */", *ms as f64 / 1000.0)),
            Step::Stubborn(ms) => self.query(&format!(
                "DO $$BEGIN BEGIN PERFORM pg_sleep({}); EXCEPTION WHEN query_canceled THEN NULL; END; \
                 INSERT INTO gen_rows (session, kind) VALUES ('{sid}', 'stubborn'); END$$ /* {sid} */",
                *ms as f64 / 1000.0
            )),
            Step::CommittingLoop => self.query(&format!(
                "DO $$BEGIN LOOP BEGIN PERFORM pg_sleep(0.05); EXCEPTION WHEN query_canceled THEN NULL; END; \
                 INSERT INTO gen_rows (session, kind) VALUES ('{sid}', 'loop'); COMMIT; END LOOP; END$$ /* {sid} */"
            )),
            Step::Extended { sync, flush } => {
                let mut out = msg::extended(&self.insert_sql("extended"));
                if *sync {
                    out.extend_from_slice(&msg::sync());
                    self.owed += 1;
                } else if *flush {
                    out.extend_from_slice(&msg::flush());
                }
                self.send(&out)?;
                self.settle(None)
            }
            Step::Sync => {
                self.send(&msg::sync())?;
                self.owed += 1;
                self.settle(None)
            }
            Step::FastPath => {
                self.send(&msg::function_call_text(self.t.tick_oid, &sid))?;
                self.owed += 1;
                self.settle(None)
            }
            Step::CopyIn { finish } => {
                self.send(&msg::query("COPY gen_rows (session, kind) FROM STDIN"))?;
                self.owed += 1;
                self.settle(Some((*finish, format!("{sid}\tcopy\n").into_bytes())))
            }
            Step::CopyOut => self.query("COPY (SELECT generate_series(1, 2000)) TO STDOUT"),
            Step::Pollute => {
                self.query(&format!("SET gen.owner = '{sid}'"))?;
                self.query("PREPARE gen_p AS SELECT 1")?;
                self.query("BEGIN")?;
                self.query("DECLARE gen_c CURSOR WITH HOLD FOR SELECT 1")?;
                self.query("COMMIT")?;
                self.query("LISTEN gen_ch")?;
                self.query("CREATE TEMP TABLE IF NOT EXISTS gen_tmp (x int)")
            }
            Step::Cancelled => {
                self.send(&msg::query(&format!("SELECT pg_sleep(2) /* {sid} */")))?;
                self.owed += 1;
                std::thread::sleep(Duration::from_millis(100));
                if let Some(key) = self.c.key {
                    let _ = pgwire::cancel(self.t.addr(), key);
                }
                self.settle(None)
            }
            Step::Pipeline(n) => {
                let mut out = Vec::new();
                for _ in 0..*n {
                    out.extend_from_slice(&msg::query(&self.insert_sql("pipelined")));
                }
                self.send(&out)?;
                self.owed += u32::from(*n);
                self.settle(None)
            }
            Step::WaitPastEnd => {
                let left = exp as f64 + 0.2 + rng.below(1500) as f64 / 1000.0 - unix_now();
                if left > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(left));
                }
                Ok(())
            }
            Step::Disconnect => Err(Over("disconnected".into())),
            Step::Abandon(ms) => {
                self.send(&msg::query(&format!("SELECT pg_sleep({}) /* {sid} */", *ms as f64 / 1000.0)))?;
                self.owed += 1;
                Err(Over("left with a statement running".into()))
            }
            Step::AbandonLoop => {
                self.send(&msg::query(&format!(
                    "DO $$BEGIN LOOP BEGIN PERFORM pg_sleep(0.05); EXCEPTION WHEN query_canceled THEN NULL; END; \
                     INSERT INTO gen_rows (session, kind) VALUES ('{sid}', 'abandoned'); COMMIT; END LOOP; END$$ /* {sid} */"
                )))?;
                self.owed += 1;
                Err(Over("left with a loop running".into()))
            }
        }
    }
}

/// The checks of a session's first query: its identity, and nothing of another's.
const CLEAN_CHECK: &str = "SELECT gprxy.subject(), coalesce(current_setting('gen.owner', true), ''), \
     (SELECT count(*) FROM pg_prepared_statements), (SELECT count(*) FROM pg_cursors), \
     (SELECT count(*) FROM pg_listening_channels()), \
     (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), \
     now() = statement_timestamp(), pg_backend_pid()";

/// Runs one session; returns it and any violation of invariant 3 it saw.
fn run_session(t: &Target, rng: &mut Rng, sid: String) -> (Option<SessionRun>, Option<Violation>) {
    let exp = (unix_now() + 1.0 + rng.below(4000) as f64 / 1000.0).ceil() as u64;
    let steps = steps(rng);
    let Ok(mut c) = t.connect(&sid, exp) else { return (None, None) };
    let _ = c.set_read_timeout(Duration::from_secs(HARD_LIMIT + 8));
    let mut run =
        SessionRun { sid: sid.clone(), exp, pid: None, steps, ran: 0, stopped: None, left_idle_at: None };
    let mut violation = None;
    match c.query(CLEAN_CHECK) {
        Ok(rows) => {
            let row: Vec<String> = rows
                .first()
                .map(|r| r.iter().map(|v| v.clone().unwrap_or_default()).collect())
                .unwrap_or_default();
            run.pid = row.get(7).and_then(|p| p.parse().ok());
            let want = [sid.as_str(), "", "0", "0", "0", "0", "t"];
            if row.len() < 7 || row[..7] != want {
                violation = Some(Violation {
                    invariant: 3,
                    sid: Some(sid.clone()),
                    what: format!("first look at the session: {row:?}, want {want:?}"),
                });
            }
        }
        Err(e) => {
            run.stopped = Some(format!("first query: {e}"));
            return (Some(run), None);
        }
    }
    let mut client = Client { t, c, sid, owed: 0, in_copy: false };
    for step in run.steps.clone() {
        run.ran += 1;
        if let Err(Over(why)) = client.step(&step, exp, rng) {
            run.stopped = Some(why);
            break;
        }
    }
    let idle = client.owed == 0 && !client.in_copy;
    drop(client);
    run.left_idle_at = idle.then(unix_now);
    (Some(run), violation)
}

/// Runs `clients` hostile clients against `t` for `secs` seconds from `seed`, samples the
/// server while they run, then judges.
pub fn run(t: &Target, seed: u64, clients: u64, secs: f64) -> Report {
    let report = Mutex::new(Report::default());
    let done = AtomicBool::new(false);
    let sessions: Mutex<Vec<SessionRun>> = Mutex::new(Vec::new());
    let baseline_rss = t.relay_pid().map(rss_kib);
    let started = Instant::now();
    std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(t, &done, &sessions));
        let mut handles = Vec::new();
        for client in 0..clients {
            let (report, sessions) = (&report, &sessions);
            handles.push(s.spawn(move || {
                let mut rng = Rng::new(seed ^ (client + 1).wrapping_mul(0x517c_c1b7_2722_0a95));
                let mut n = 0;
                while started.elapsed().as_secs_f64() < secs {
                    let sid = format!("s{client}-{n}");
                    n += 1;
                    let (ran, violation) = run_session(t, &mut rng, sid);
                    let refused = ran.is_none();
                    let mut r = report.lock();
                    match ran {
                        Some(ran) => {
                            r.steps += ran.ran;
                            sessions.lock().push(ran);
                        }
                        None => r.refused_logins += 1,
                    }
                    r.violations.extend(violation);
                    drop(r);
                    if refused {
                        // As a client would, not in a tight loop (a connector full, a pool busy).
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }));
        }
        for h in handles {
            h.join().expect("a client thread panicked");
        }
        // Every session's end plus the hard limit and the slack have passed.
        let last = sessions.lock().iter().map(|r| r.exp).max().unwrap_or(0);
        let quiet = (last + HARD_LIMIT) as f64 + GONE_WITHIN + 1.0 - unix_now();
        if quiet > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(quiet));
        }
        done.store(true, Ordering::SeqCst);
        let (samples, seen) = sampler.join().expect("the sampler panicked");
        let mut r = report.lock();
        r.samples = samples;
        r.violations.extend(seen);
    });
    let mut report = report.into_inner();
    report.sessions = sessions.into_inner();
    judge_rows(t, &mut report);
    judge_end_state(t, &mut report, baseline_rss);
    report
}

/// Invariant 2, sampled every 100 ms while the clients run.
fn sample(t: &Target, done: &AtomicBool, sessions: &Mutex<Vec<SessionRun>>) -> (u64, Vec<Violation>) {
    let mut judge = t.judge();
    let mut seen = Vec::new();
    let mut samples = 0;
    let pool = match t.kind {
        Kind::Fallback { pool } => Some(pool),
        _ => None,
    };
    while !done.load(Ordering::SeqCst) {
        samples += 1;
        let rows = judge
            .query(&format!(
                "SELECT pid::text, coalesce(state, ''), query, (SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}')::text \
                 FROM pg_stat_activity WHERE usename = '{ROLE}'"
            ))
            .unwrap_or_default();
        let now = unix_now();
        if let (Kind::Connector, Some(row)) = (t.kind, rows.first()) {
            let n: u32 = row[3].as_deref().unwrap_or("0").parse().unwrap_or(0);
            let told = seen.iter().any(|v: &Violation| v.invariant == 2 && v.sid.is_none());
            if n > CONNECTOR_MAX_CONNECTIONS && !told {
                seen.push(Violation {
                    invariant: 2,
                    sid: None,
                    what: format!(
                        "{n} server processes of {ROLE} at once through a connector with max_connections = \
                         {CONNECTOR_MAX_CONNECTIONS}"
                    ),
                });
            }
        }
        if let (Some(size), Some(row)) = (pool, rows.first()) {
            let n: u32 = row[3].as_deref().unwrap_or("0").parse().unwrap_or(0);
            let told = seen.iter().any(|v: &Violation| v.invariant == 2 && v.sid.is_none());
            if n > size + 1 && !told {
                seen.push(Violation {
                    invariant: 2,
                    sid: None,
                    what: format!("{n} server processes of {ROLE} at once, pool of {size}"),
                });
            }
        }
        for s in sessions.lock().iter() {
            // Without a pool, an application that left with nothing in flight takes its server
            // process with it, whenever its token ends (the server's own policy ends it only then:
            // a relay that keeps it would go unseen until then).
            if let (None, Some(left), Some(pid)) = (pool, s.left_idle_at, s.pid) {
                let told =
                    seen.iter().any(|v: &Violation| v.invariant == 2 && v.sid.as_deref() == Some(&s.sid));
                let row = rows.iter().find(|r| r[0].as_deref() == Some(pid.to_string().as_str()));
                if let (true, Some(row), false) = (now > left + GONE_WITHIN, row, told) {
                    seen.push(Violation {
                        invariant: 2,
                        sid: Some(s.sid.clone()),
                        what: format!(
                            "{:.1} s after its application left with nothing in flight ({:.1} s before its token's end) \
                             its server process {pid} is still there ({}: {})",
                            now - left,
                            s.exp as f64 - left,
                            row[1].as_deref().unwrap_or(""),
                            row[2].as_deref().unwrap_or("")
                        ),
                    });
                }
            }
            if now < s.last_commit(t.policy) + GONE_WITHIN {
                continue;
            }
            for row in &rows {
                let (pid, state, query) = (
                    row[0].as_deref().unwrap_or(""),
                    row[1].as_deref().unwrap_or(""),
                    row[2].as_deref().unwrap_or(""),
                );
                let its_process = pool.is_none() && s.pid.map(|p| p.to_string()).as_deref() == Some(pid);
                let names_it =
                    query.contains(&format!("'{}'", s.sid)) || query.contains(&format!("/* {} */", s.sid));
                let its_statement = pool.is_some() && state != "idle" && names_it;
                let told =
                    seen.iter().any(|v: &Violation| v.invariant == 2 && v.sid.as_deref() == Some(&s.sid));
                if (its_process || its_statement) && !told {
                    seen.push(Violation {
                        invariant: 2,
                        sid: Some(s.sid.clone()),
                        what: format!(
                            "{:.1} s after its end its server process {pid} is still there ({state}: {query})",
                            now - s.exp as f64
                        ),
                    });
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    seen.truncate(20);
    (samples, seen)
}

/// Invariant 1 and the identity half of 3: every row, with its commit's time.
fn judge_rows(t: &Target, report: &mut Report) {
    let mut judge = t.judge();
    let rows = judge
        .query(
            "SELECT session, kind, coalesce(who, ''), extract(epoch FROM xact_start)::text, \
             extract(epoch FROM pg_xact_commit_timestamp(xmin))::text FROM gen_rows",
        )
        .expect("the rows");
    report.rows = rows.len() as u64;
    for row in rows {
        let v = |i: usize| row[i].clone().unwrap_or_default();
        let (sid, kind, who) = (v(0), v(1), v(2));
        let xact_start: f64 = v(3).parse().unwrap_or(0.0);
        let commit: f64 = v(4).parse().unwrap_or(f64::MAX);
        if who != sid {
            report.violations.push(Violation {
                invariant: 3,
                sid: Some(sid.clone()),
                what: format!("a {kind} row of {sid} was written as {who:?}"),
            });
        }
        let Some(s) = report.sessions.iter().find(|s| s.sid == sid) else { continue };
        let end = s.exp as f64;
        let broken = match t.policy {
            Policy::Strict => commit > end + COMMIT_SLACK,
            // Pass-through with only gprxy's policy: gprxy sees requests, not transactions, so a
            // request let in before the end (a loop that commits) runs to the hard limit.
            Policy::Idle if t.kind == Kind::PassthroughProxyPolicy => {
                commit > s.last_commit(t.policy) + COMMIT_SLACK
            }
            Policy::Idle => {
                (xact_start > end + COMMIT_SLACK && commit > end + COMMIT_SLACK)
                    || commit > s.last_commit(t.policy) + COMMIT_SLACK
            }
        };
        let told = report.violations.iter().any(|v| v.invariant == 1 && v.sid.as_deref() == Some(&sid));
        if broken && !told {
            report.violations.push(Violation {
                invariant: 1,
                sid: Some(sid.clone()),
                what: format!(
                    "a {kind} row committed {:.2} s after the end (its transaction began {:.2} s after it)",
                    commit - end,
                    xact_start - end
                ),
            });
        }
    }
}

/// Invariant 4 (and 2 once more): nothing open at the end.
fn judge_end_state(t: &Target, report: &mut Report, baseline_rss: Option<u64>) {
    let mut judge = t.judge();
    let busy: u32 = judge
        .scalar(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}' AND state <> 'idle'"
        ))
        .ok()
        .flatten()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if busy > 0 {
        report.violations.push(Violation {
            invariant: 2,
            sid: None,
            what: format!("{busy} server processes still busy"),
        });
    }
    if let Some(c) = &t.connector {
        let text = get_metrics(c.metrics_port);
        let active =
            text.lines().find_map(|l| l.strip_prefix("gprxy_connect_sessions_active ")).unwrap_or("?");
        if active.trim() != "0" {
            report.violations.push(Violation {
                invariant: 4,
                sid: None,
                what: format!("the connector has {active} sessions relaying"),
            });
        }
    }
    if let (Some(base), Some(pid)) = (baseline_rss, t.relay_pid()) {
        let now = rss_kib(pid);
        if now > base * 2 + 16 * 1024 {
            report.violations.push(Violation {
                invariant: 4,
                sid: None,
                what: format!("the proxy's or connector's memory {now} KiB after the run, {base} KiB before"),
            });
        }
    }
    let Some(p) = &t.proxy else { return };
    let active = p.metric("gprxy_connections_active");
    if active != 0.0 {
        report.violations.push(Violation {
            invariant: 4,
            sid: None,
            what: format!("{active} client connections open"),
        });
    }
    if let Kind::Fallback { pool } = t.kind {
        let in_use = p.metric(&format!("gprxy_pool_in_use{{database=\"postgres\",account=\"{ROLE}\"}}"));
        let idle = p.metric(&format!("gprxy_pool_idle{{database=\"postgres\",account=\"{ROLE}\"}}"));
        let backends: u32 = judge
            .scalar(&format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{ROLE}'"))
            .ok()
            .flatten()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if in_use != 0.0 || idle > f64::from(pool) || backends > pool {
            report.violations.push(Violation {
                invariant: 4,
                sid: None,
                what: format!(
                    "pool: {in_use} in use, {idle} idle, {backends} server processes (size {pool})"
                ),
            });
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

impl Report {
    /// The failure report: seed, target, each violation with its session's steps up to where
    /// it stopped (the shortened sequence to replay).
    pub fn failure(&self, seed: u64, kind: Kind, policy: Policy) -> String {
        let mut out = format!(
            "hostile sessions: {} violation(s); replay with GPRXY_GEN_SEED={seed} GPRXY_GEN_TARGET={kind} GPRXY_GEN_POLICY={}\n",
            self.violations.len(),
            policy.name()
        );
        for v in self.violations.iter().take(20) {
            out.push_str(&format!("  invariant {}: {}\n", v.invariant, v.what));
            if let Some(s) = v.sid.as_ref().and_then(|sid| self.sessions.iter().find(|s| &s.sid == sid)) {
                let upto = (s.ran + 1).min(s.steps.len());
                out.push_str(&format!(
                    "    session {} (exp {}, pid {:?}, stopped: {:?}): {:?}\n",
                    s.sid,
                    s.exp,
                    s.pid,
                    s.stopped,
                    &s.steps[..upto]
                ));
            }
        }
        out
    }

    /// One line of counts.
    pub fn summary(&self) -> String {
        format!(
            "{} sessions, {} steps, {} refused logins, {} rows judged, {} samples, {} violations",
            self.sessions.len(),
            self.steps,
            self.refused_logins,
            self.rows,
            self.samples,
            self.violations.len()
        )
    }
}
