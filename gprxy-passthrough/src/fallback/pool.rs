//! Session pooling for fallback mode: one pool per (database, service account) with a size, a
//! wait queue with a timeout, idle timeout, maximum lifetime and a health check. A client keeps
//! its server connection until it leaves; then the connection is reset (`DISCARD ALL`, which
//! also clears the plain context, and `gprxy.reset_context()` for a signed one) before anyone
//! else gets it. The relay tracks what the client asked for ([`Tracker`]): a connection goes
//! back only when every query, Sync and function call was answered, no COPY is open and the
//! server is idle; the reset ends with a query carrying a random marker, whose answer must be
//! the last one. Anything in doubt (unanswered requests, COPY, an error or a timeout in the
//! reset, a reload) closes the connection instead.
//!
//! A pool's size is a promise about server backends, not sockets: a connection is counted
//! until its backend is gone. One closed politely (Terminate) is counted until the server
//! closes its side, which PostgreSQL does only after its process left the shared state
//! (`pg_stat_activity` no longer lists it). One given up with work possibly in flight comes
//! back from [`Lease::give_back`] as a [`Doomed`] connection, still holding its slot, for the
//! caller to end its backend for certain (`super::reap`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use prometheus_client::metrics::gauge::Gauge;

use crate::config::PoolSettings;
use crate::conn::{read_message, BoxStream, CancelKey, SessionError, Shared};
use crate::metrics::{Metrics, PoolGauges};
use crate::proto::{self, SqlState};
use crate::track::Tracker;

/// A logged-in server connection.
pub struct ServerConn {
    /// The stream.
    pub stream: BoxStream,
    /// ParameterStatus messages from its login, replayed to each client (each session gets a
    /// BackendKeyData of its own).
    pub startup_reply: BytesMut,
    /// Its cancel key.
    pub key: Option<CancelKey>,
    /// Signs this connection's session contexts (its nonce went in the startup packet).
    pub signer: Option<gprxy_core::context::ContextSigner>,
    created: Instant,
}

impl ServerConn {
    /// A connection that just logged in.
    pub fn new(
        stream: BoxStream,
        startup_reply: BytesMut,
        key: Option<CancelKey>,
        signer: Option<gprxy_core::context::ContextSigner>,
    ) -> Self {
        Self { stream, startup_reply, key, signer, created: Instant::now() }
    }

    /// When it logged in.
    pub fn created(&self) -> Instant {
        self.created
    }
}

struct Pool {
    idle: Mutex<Vec<(ServerConn, Instant)>>,
    permits: Arc<Semaphore>,
    /// One backend of this pool is ended at a time (each end opens one connection of its own).
    reaping: Arc<tokio::sync::Mutex<()>>,
    /// The pool's gauges (exported once it has logged in).
    gauges: Arc<PoolGauges>,
}

/// A checked-out slot: a connection from the pool, or the right to open one. The connection
/// goes back through it ([`Lease::give_back`]) to the pool it came from, even after a reload.
pub struct Lease {
    /// An idle connection that passed the health check, if there was one.
    pub conn: Option<ServerConn>,
    pool: Arc<Pool>,
    /// The retired flag of the [`Pools`] this lease came from.
    retired: Arc<AtomicBool>,
    max_lifetime: Duration,
    _permit: OwnedSemaphorePermit,
    in_use: Gauge,
    idle: Gauge,
}

impl Lease {
    /// The pool has logged in (its database exists): its gauges are exported from now on.
    pub fn admit(&self, metrics: &Metrics, database: &str, account: &str) {
        metrics.admit_pool(&self.pool.gauges, database, account);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.in_use.dec();
    }
}

/// All pools.
pub struct Pools {
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
    settings: PoolSettings,
    /// Set when a reload replaced these pools: connections are closed, not kept.
    retired: Arc<AtomicBool>,
}

/// How long a backend told goodbye (Terminate) may take to close its side before it is ended
/// by other means.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// Ends a server connection politely: Terminate, then waits (`within` at most) until the
/// server closes its side, which it does once its process has left the shared state. Returns
/// whether it did.
async fn terminate(conn: &mut ServerConn, within: Duration) -> bool {
    let mut out = BytesMut::new();
    frontend::terminate(&mut out);
    // A write that fails (the server closed first) still leaves the EOF to be read.
    let _ = conn.stream.write_all(&out).await;
    let _ = conn.stream.flush().await;
    server_closed(&mut conn.stream, within).await
}

/// Reads and drops what the server sends until it closes its side (true) or `within` passes.
pub(crate) async fn server_closed(stream: &mut BoxStream, within: Duration) -> bool {
    let mut sink = vec![0u8; 8192];
    let closed = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Any other error: the connection is gone (reset; over TLS, a close without
                // close_notify, as after a server crash, is UnexpectedEof).
                Err(_) => return true,
            }
        }
    };
    matches!(tokio::time::timeout(within, closed).await, Ok(true))
}

/// Whether an idle connection is still usable: nothing to read (a closed socket reads 0, a
/// server message means trouble), checked with one poll and no waiting (a zero timeout would
/// wait for the timer's next millisecond tick).
async fn healthy(conn: &mut ServerConn) -> bool {
    let mut b = [0u8; 1];
    tokio::select! {
        biased;
        _ = conn.stream.read(&mut b) => false,
        () = std::future::ready(()) => true,
    }
}

impl Pools {
    /// Empty pools with these limits.
    pub fn new(settings: PoolSettings) -> Self {
        Self { pools: Mutex::new(HashMap::new()), settings, retired: Arc::new(AtomicBool::new(false)) }
    }

    /// After a reload: closes the idle connections now, and each one in use when its session
    /// ends. Sessions in progress keep theirs.
    pub async fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        let pools: Vec<Arc<Pool>> = self.pools.lock().values().cloned().collect();
        for pool in pools {
            let idle = std::mem::take(&mut *pool.idle.lock());
            pool.gauges.idle.dec_by(idle.len() as i64);
            for (mut conn, _) in idle {
                terminate(&mut conn, GOODBYE_TIMEOUT).await;
            }
        }
        tracing::info!(event = "pool", action = "retire", "configuration reloaded: old pools closed");
    }

    /// Waits for a slot in the (database, account) pool.
    pub async fn checkout(
        &self,
        metrics: &Metrics,
        database: &str,
        account: &str,
    ) -> Result<Lease, SessionError> {
        let pool = {
            let mut map = self.pools.lock();
            map.entry((database.to_owned(), account.to_owned()))
                .or_insert_with(|| {
                    let size =
                        self.settings.sizes.get(account).copied().unwrap_or(self.settings.default_size);
                    Arc::new(Pool {
                        idle: Mutex::new(Vec::new()),
                        permits: Arc::new(Semaphore::new(size.max(1))),
                        reaping: Arc::new(tokio::sync::Mutex::new(())),
                        gauges: metrics.pool_gauges(),
                    })
                })
                .clone()
        };
        let g = &pool.gauges;
        let (in_use, idle, waiting) = (g.in_use.clone(), g.idle.clone(), g.waiting.clone());
        let started = Instant::now();
        waiting.inc();
        let acquired =
            tokio::time::timeout(self.settings.wait_timeout, pool.permits.clone().acquire_owned()).await;
        waiting.dec();
        metrics.pool_wait.observe(started.elapsed().as_secs_f64());
        let permit = acquired
            .map_err(|_| {
                SessionError::refused(
                    SqlState::TOO_MANY_CONNECTIONS,
                    format!(
                        "gprxy: no free server connection for {account} within {} ms",
                        self.settings.wait_timeout.as_millis()
                    ),
                )
            })?
            .map_err(|_| SessionError::ClientGone)?;
        in_use.inc();
        let mut lease = Lease {
            conn: None,
            pool,
            retired: self.retired.clone(),
            max_lifetime: self.settings.max_lifetime,
            _permit: permit,
            in_use,
            idle,
        };
        loop {
            let candidate = lease.pool.idle.lock().pop();
            let Some((mut conn, since)) = candidate else { break };
            lease.idle.dec();
            let fresh = since.elapsed() < self.settings.idle_timeout
                && conn.created.elapsed() < self.settings.max_lifetime;
            if fresh && healthy(&mut conn).await {
                lease.conn = Some(conn);
                break;
            }
            tracing::info!(
                event = "pool",
                action = "discard",
                account,
                "idle server connection closed or expired"
            );
            // An idle backend reads the Terminate at once; the slot is this lease's meanwhile.
            terminate(&mut conn, GOODBYE_TIMEOUT).await;
        }
        Ok(lease)
    }

    /// Drops the (database, account) pool if it never logged in and no one holds it: a client
    /// naming databases that do not exist leaves nothing behind.
    pub fn forget_unused(&self, database: &str, account: &str) {
        let mut map = self.pools.lock();
        let key = (database.to_owned(), account.to_owned());
        // Checkouts clone the pool under this lock: a count of one is the map's own.
        if map.get(&key).is_some_and(|p| !p.gauges.admitted() && Arc::strong_count(p) == 1) {
            map.remove(&key);
        }
    }
}

impl Lease {
    /// Ends a session: resets `conn` and returns it to the pool it came from, or closes it when
    /// it is not `clean`, too old, its reset fails, or that pool was retired by a reload. A
    /// connection closed politely is counted until the server has closed its side. Returns the
    /// connection, with this lease's slot, when its backend may still be running (not `clean`,
    /// or the goodbye was not answered): the caller must end that backend ([`Doomed`]).
    #[must_use = "a doomed connection's backend must be ended"]
    pub async fn give_back(self, mut conn: ServerConn, clean: bool) -> Option<Doomed> {
        let reusable = clean
            && !self.retired.load(Ordering::SeqCst)
            && conn.created.elapsed() < self.max_lifetime
            && reset(&mut conn).await;
        if reusable {
            // Checked under the lock that `Pools::retire` takes the idle connections with.
            let mut idle = self.pool.idle.lock();
            if !self.retired.load(Ordering::SeqCst) {
                idle.push((conn, Instant::now()));
                self.idle.inc();
                return None;
            }
        }
        let retired = self.retired.load(Ordering::SeqCst);
        tracing::info!(event = "pool", action = "close", clean, retired, "server connection not reused");
        // Between messages the server can be told goodbye; it then ends by itself.
        if clean && terminate(&mut conn, GOODBYE_TIMEOUT).await {
            return None;
        }
        Some(Doomed { conn, lease: self })
    }
}

/// A server connection given up with its backend possibly still running (a request in flight,
/// a statement that caught the cancel, a message cut): it keeps its pool slot until the backend
/// is gone.
pub struct Doomed {
    /// The connection (its socket still open: the server closing it tells the backend is gone).
    pub conn: ServerConn,
    lease: Lease,
}

impl Doomed {
    /// The pool's lock for ending backends: one at a time per pool.
    pub fn turn(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.lease.pool.reaping.clone()
    }
}

/// The answer that ends a reset: the marker query's row (one text column).
fn marker_row(marker: &str) -> Vec<u8> {
    let mut row = 1i16.to_be_bytes().to_vec();
    row.extend_from_slice(&(marker.len() as i32).to_be_bytes());
    row.extend_from_slice(marker.as_bytes());
    row
}

/// A fresh random marker.
pub(crate) fn random_marker(prefix: &str) -> Option<String> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).ok()?;
    Some(bytes.iter().fold(prefix.to_owned(), |mut s, b| {
        s.push_str(&format!("{b:02x}"));
        s
    }))
}

/// Checks a reset's answers, message by message: `statements` queries, each answered with no
/// error and ReadyForQuery `I`, the last one a row with the marker. Says `Some(true)` at the
/// marker's ReadyForQuery, `Some(false)` at the first thing out of place.
struct ResetCheck {
    marker_row: Vec<u8>,
    statements: usize,
    readies: usize,
    marked: bool,
}

impl ResetCheck {
    fn new(marker: &str, statements: usize) -> Self {
        Self { marker_row: marker_row(marker), statements, readies: 0, marked: false }
    }

    fn step(&mut self, tag: u8, body: &[u8]) -> Option<bool> {
        match tag {
            // An error, or COPY: the server is not where the reset left it.
            b'E' | b'G' | b'H' | b'W' | b'd' | b'c' => Some(false),
            b'D' if body == self.marker_row.as_slice() => {
                // Only the last statement may answer with the marker, and only once.
                if self.marked || self.readies + 1 != self.statements {
                    return Some(false);
                }
                self.marked = true;
                None
            }
            b'Z' => {
                if body != b"I" {
                    return Some(false);
                }
                self.readies += 1;
                if self.marked {
                    return Some(true);
                }
                // The last ReadyForQuery without the marker before it: answers are out of step.
                (self.readies >= self.statements).then_some(false)
            }
            _ => None,
        }
    }
}

/// `DISCARD ALL` (session state, prepared statements, settings and so the plain context), for
/// a signed context `gprxy.reset_context()`, then a query with a random marker: true when
/// every statement succeeds, the server is idle after each, and the marker's answer is the
/// last thing the server sent.
async fn reset(conn: &mut ServerConn) -> bool {
    let Some(marker) = random_marker("gprxy-reset-") else { return false };
    let run = async {
        let mut out = BytesMut::new();
        frontend::query("DISCARD ALL", &mut out).ok()?;
        let mut statements = 2;
        if conn.signer.is_some() {
            frontend::query("SELECT gprxy.reset_context()", &mut out).ok()?;
            statements += 1;
        }
        frontend::query(&format!("SELECT '{marker}'"), &mut out).ok()?;
        conn.stream.write_all(&out).await.ok()?;
        conn.stream.flush().await.ok()?;
        let mut buf = BytesMut::new();
        let mut check = ResetCheck::new(&marker, statements);
        loop {
            let m =
                read_message(&mut conn.stream, &mut buf, proto::MAX_SERVER_AUTH_MESSAGE, "server message")
                    .await
                    .ok()?;
            if let Some(done) = check.step(m.tag, m.body()) {
                // Nothing may follow the marker's answer.
                return Some(done && buf.is_empty());
            }
        }
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), run).await, Ok(Some(true)))
}

/// Brings a server connection whose client was ended or left mid-request back to an idle
/// point, so that it can be reset and reused: what the server was sent past its last message is
/// fed to `track` first (`server_leftover`); a running request is cancelled (its process
/// signalled before anything else is sent), an open COPY failed, unsynced extended-protocol
/// work aborted (a statement that raises an error, then Sync: a Sync alone would commit what
/// the client never synced), the answers read and dropped, then an open transaction rolled back. Returns
/// whether the connection is clean ([`Tracker::clean`]); false after [`SETTLE_TIMEOUT`] (a
/// statement that caught the cancel keeps running: its backend is then ended, `super::reap`).
pub async fn settle(
    shared: &Shared,
    conn: &mut ServerConn,
    track: &mut Tracker,
    server_leftover: BytesMut,
) -> bool {
    let run = async {
        track.server_bytes(&server_leftover).ok()?;
        if (track.in_flight() > 0 && !track.copy_in()) || track.unsynced() {
            let config = shared.config.read().clone();
            crate::upstream::cancel(shared, &config, conn.key.as_ref()?).await.ok()?;
        }
        let mut out = BytesMut::new();
        if track.copy_in() {
            frontend::copy_fail("gprxy: the session ended", &mut out).ok()?;
        }
        if track.unsynced() {
            out.extend_from_slice(&abort_unsynced());
        }
        send_tracked(conn, track, &out).await?;
        drain(conn, track).await?;
        if track.last_ready() != Some(b'I') {
            let mut rollback = BytesMut::new();
            frontend::query("ROLLBACK", &mut rollback).ok()?;
            send_tracked(conn, track, &rollback).await?;
            drain(conn, track).await?;
        }
        Some(track.clean())
    };
    matches!(tokio::time::timeout(SETTLE_TIMEOUT, run).await, Ok(Some(true)))
}

/// How long settling may take before the connection is given up: a cancelled statement answers
/// within milliseconds; one that caught the cancel must not run on for long.
pub const SETTLE_TIMEOUT: Duration = Duration::from_millis(500);

/// The error raised to abort a client's unsynced extended-protocol work.
const ABORT_UNSYNCED: &str =
    "DO $gprxy$BEGIN RAISE EXCEPTION 'gprxy: the session ended; its unsynced work is rolled back'; END$gprxy$";

/// Parse, Bind and Execute of [`ABORT_UNSYNCED`] (unnamed statement and portal), then Sync: the
/// implicit transaction fails and is rolled back; an explicit one is left failed (`E`).
fn abort_unsynced() -> BytesMut {
    let mut parse = b"\0".to_vec();
    parse.extend_from_slice(ABORT_UNSYNCED.as_bytes());
    parse.extend_from_slice(b"\0\0\0");
    let mut out = proto::frame(b'P', &parse);
    out.extend_from_slice(&proto::frame(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend_from_slice(&proto::frame(b'E', b"\0\0\0\0\0"));
    frontend::sync(&mut out);
    out
}

/// Sends client messages of gprxy's own, counted like the client's.
async fn send_tracked(conn: &mut ServerConn, track: &mut Tracker, out: &[u8]) -> Option<()> {
    if out.is_empty() {
        return Some(());
    }
    track.client_bytes(out).ok()?;
    conn.stream.write_all(out).await.ok()?;
    conn.stream.flush().await.ok()
}

/// Reads and drops server messages until every request was answered.
async fn drain(conn: &mut ServerConn, track: &mut Tracker) -> Option<()> {
    let mut buf = BytesMut::new();
    while track.in_flight() > 0 || !track.server_between_messages() {
        buf.clear();
        if conn.stream.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
        track.server_bytes(&buf).ok()?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(sql: &str) -> BytesMut {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).unwrap();
        out
    }

    fn answer(tag: &str, status: u8) -> BytesMut {
        let mut out = proto::frame(b'C', format!("{tag}\0").as_bytes());
        out.extend_from_slice(&proto::frame(b'Z', &[status]));
        out
    }

    /// A server connection whose far end the test plays, and a tracker that saw `client` sent
    /// and `server` answered.
    fn session(client: &[u8], server: &[u8], key: Option<CancelKey>) -> (ServerConn, BoxStream, Tracker) {
        let (ours, theirs) = crate::conn::duplex::pair();
        let mut track = Tracker::default();
        track.client_bytes(client).unwrap();
        track.server_bytes(server).unwrap();
        (ServerConn::new(ours, BytesMut::new(), key, None), theirs, track)
    }

    fn shared() -> std::sync::Arc<crate::session::Proxy> {
        // Port 9: a cancel would not get through.
        let overrides =
            crate::config::Overrides { upstream: Some("127.0.0.1:9".into()), ..Default::default() };
        crate::server::proxy(crate::config::Config::load(None, &overrides).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn settling_rolls_back_an_open_transaction() {
        let proxy = shared();
        let (mut conn, mut server, mut track) = session(&q("BEGIN"), &answer("BEGIN", b'T'), None);
        let fake = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let m = crate::conn::duplex::next(&mut server, &mut buf).await;
            server.write_all(&answer("ROLLBACK", b'I')).await.unwrap();
            m
        });
        assert!(settle(&proxy.shared, &mut conn, &mut track, BytesMut::new()).await);
        assert_eq!(fake.await.unwrap().raw, q("ROLLBACK"));
        assert!(track.clean());
    }

    #[tokio::test]
    async fn settling_fails_an_open_copy_then_rolls_back() {
        let proxy = shared();
        let copy_in = proto::frame(b'G', b"\0\0\0");
        let (mut conn, mut server, mut track) = session(&q("COPY t FROM STDIN"), &copy_in, None);
        let fake = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let fail = crate::conn::duplex::next(&mut server, &mut buf).await;
            let mut refused = proto::frame(b'E', b"SERROR\0C57014\0Mgprxy: the session ended\0\0");
            refused.extend_from_slice(&proto::frame(b'Z', b"E"));
            server.write_all(&refused).await.unwrap();
            let rollback = crate::conn::duplex::next(&mut server, &mut buf).await;
            server.write_all(&answer("ROLLBACK", b'I')).await.unwrap();
            (fail.tag, rollback.raw)
        });
        assert!(settle(&proxy.shared, &mut conn, &mut track, BytesMut::new()).await);
        assert_eq!(fake.await.unwrap(), (b'f', q("ROLLBACK")));
    }

    #[tokio::test]
    async fn an_answer_read_before_the_end_settles_without_a_word_to_the_server() {
        let proxy = shared();
        let (mut conn, mut server, mut track) = session(&q("SELECT 1"), b"", None);
        assert!(settle(&proxy.shared, &mut conn, &mut track, answer("SELECT 1", b'I')).await);
        drop(conn);
        let mut sent = Vec::new();
        server.read_to_end(&mut sent).await.unwrap();
        assert!(sent.is_empty(), "{sent:?}");
    }

    #[tokio::test]
    async fn a_running_query_that_cannot_be_cancelled_is_not_settled() {
        let proxy = shared();
        // No cancel key, or a server the cancel cannot reach.
        let (mut conn, _server, mut track) = session(&q("SELECT pg_sleep(60)"), b"", None);
        assert!(!settle(&proxy.shared, &mut conn, &mut track, BytesMut::new()).await);
        let (mut conn, _server, mut track) = session(&q("SELECT pg_sleep(60)"), b"", Some((7, vec![1; 4])));
        assert!(!settle(&proxy.shared, &mut conn, &mut track, BytesMut::new()).await);
    }

    /// Aborting unsynced work is one extended-protocol batch ending in Sync: the tracker sees a
    /// synced stream waiting for one ReadyForQuery, and the statement raises gprxy's error.
    #[test]
    fn unsynced_work_is_aborted_by_an_error_then_synced() {
        let mut track = Tracker::default();
        track.client_bytes(&proto::frame(b'P', b"\0INSERT INTO t VALUES (1)\0\0\0")).unwrap();
        assert!(track.unsynced());
        let abort = abort_unsynced();
        track.client_bytes(&abort).unwrap();
        assert!(!track.unsynced() && track.in_flight() == 1 && track.client_between_messages());
        let mut buf = BytesMut::from(&abort[..]);
        let tags: Vec<u8> = std::iter::from_fn(|| proto::parse_message(&mut buf, 1 << 16, "x").unwrap())
            .map(|m| m.tag)
            .collect();
        assert_eq!(tags, b"PBES");
        assert!(String::from_utf8_lossy(&abort).contains("RAISE EXCEPTION 'gprxy: the session ended"));
    }

    #[tokio::test]
    async fn a_pool_that_never_logged_in_is_forgotten_and_not_exported() {
        let (pools, metrics) = (Pools::new(PoolSettings::default()), Metrics::new());
        let lease = pools.checkout(&metrics, "no\"such\ndb", "app").await.unwrap();
        drop(lease);
        pools.forget_unused("no\"such\ndb", "app");
        assert!(pools.pools.lock().is_empty());

        let lease = pools.checkout(&metrics, "app", "app").await.unwrap();
        lease.admit(&metrics, "app", "app");
        drop(lease);
        pools.forget_unused("app", "app");
        assert_eq!(pools.pools.lock().len(), 1, "a pool that logged in is kept");
        let text = metrics.render();
        assert!(text.contains("gprxy_pool_in_use{database=\"app\",account=\"app\"} 0\n"), "{text}");
        assert!(!text.contains("such"), "{text}");
    }

    fn reset_answers(check: &mut ResetCheck, list: &[(u8, &[u8])]) -> Option<bool> {
        list.iter().find_map(|(tag, body)| check.step(*tag, body))
    }

    #[test]
    fn a_reset_ends_only_at_its_own_marker() {
        let m = "gprxy-reset-0123";
        let row = marker_row(m);
        let good: [(u8, &[u8]); 9] = [
            (b'S', b"application_name\0gprxy\0"),
            (b'C', b"DISCARD ALL\0"),
            (b'Z', b"I"),
            (b'T', b"desc"),
            (b'D', b"\0\x01\0\0\0\0"),
            (b'C', b"SELECT 1\0"),
            (b'Z', b"I"),
            (b'D', &row),
            (b'Z', b"I"),
        ];
        assert_eq!(reset_answers(&mut ResetCheck::new(m, 3), &good), Some(true));
        // An earlier request's answer first: the counted ReadyForQuery comes without the marker.
        let mut late = vec![(b'C', &b"BEGIN\0"[..]), (b'Z', &b"I"[..])];
        late.extend_from_slice(&good);
        assert_eq!(reset_answers(&mut ResetCheck::new(m, 3), &late), Some(false));
        // A marker that is not where the last statement answers.
        let early: [(u8, &[u8]); 3] = [(b'D', &row), (b'C', b"SELECT 1\0"), (b'Z', b"I")];
        assert_eq!(reset_answers(&mut ResetCheck::new(m, 3), &early), Some(false));
        // Another marker.
        let other = marker_row("gprxy-reset-9999");
        let wrong: [(u8, &[u8]); 6] = [
            (b'C', b"DISCARD ALL\0"),
            (b'Z', b"I"),
            (b'C', b"x\0"),
            (b'Z', b"I"),
            (b'D', &other),
            (b'Z', b"I"),
        ];
        assert_eq!(reset_answers(&mut ResetCheck::new(m, 3), &wrong), Some(false));
        // Not idle, an error, COPY.
        assert_eq!(reset_answers(&mut ResetCheck::new(m, 2), &[(b'Z', b"T")]), Some(false));
        assert_eq!(reset_answers(&mut ResetCheck::new(m, 2), &[(b'E', b"SERROR\0\0")]), Some(false));
        assert_eq!(reset_answers(&mut ResetCheck::new(m, 2), &[(b'G', b"\0\0\0")]), Some(false));
        // Unfinished: more to read.
        assert_eq!(reset_answers(&mut ResetCheck::new(m, 2), &good[..3]), None);
        assert_eq!(random_marker("p-").unwrap().len(), 2 + 32);
        assert_ne!(random_marker("p-"), random_marker("p-"));
    }
}
