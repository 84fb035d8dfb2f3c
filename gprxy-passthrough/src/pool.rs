//! Session pooling for fallback mode: one pool per (database, service account) with a size, a
//! wait queue with a timeout, idle timeout, maximum lifetime and a health check. A client keeps
//! its server connection until it leaves; then the connection is reset (`DISCARD ALL`, which
//! also clears the plain context, and `gprxy.reset_context()` for a signed one) before anyone
//! else gets it. A connection whose reset fails, that was
//! left inside a transaction or mid-message, is closed instead.

use std::collections::{BTreeMap, HashMap};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{Metrics, PoolGauges};
use crate::proto::{self, Framer};
use crate::relay::{End, Pipe, Verdict};
use crate::session::{read_message, BoxStream, CancelKey, SessionError};

/// Pool limits.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Size per service account (others get `default_size`).
    pub sizes: BTreeMap<String, usize>,
    /// Size when an account has none.
    pub default_size: usize,
    /// How long a client waits for a free connection.
    pub wait_timeout: Duration,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// Connections older than this are closed when returned or checked out.
    pub max_lifetime: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            sizes: BTreeMap::new(),
            default_size: 10,
            wait_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
        }
    }
}

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

    /// A connection coming back from a session.
    pub fn returning(
        stream: BoxStream,
        startup_reply: BytesMut,
        key: Option<CancelKey>,
        signer: Option<gprxy_core::context::ContextSigner>,
        created: Instant,
    ) -> Self {
        Self { stream, startup_reply, key, signer, created }
    }

    /// When it logged in.
    pub fn created(&self) -> Instant {
        self.created
    }
}

struct Pool {
    idle: Mutex<Vec<(ServerConn, Instant)>>,
    permits: Arc<Semaphore>,
    /// The pool's gauges (exported once it has logged in).
    gauges: Arc<PoolGauges>,
}

/// A checked-out slot: a connection from the pool, or the right to open one.
pub struct Lease {
    /// An idle connection that passed the health check, if there was one.
    pub conn: Option<ServerConn>,
    pool: Arc<Pool>,
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
    retired: AtomicBool,
}

/// Ends a server connection politely: Terminate, then close (PostgreSQL logs no EOF error).
async fn terminate(conn: &mut ServerConn) {
    let _ = conn.stream.write_all(&proto::frame(b'X', b"")).await;
    let _ = conn.stream.shutdown().await;
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
        Self { pools: Mutex::new(HashMap::new()), settings, retired: AtomicBool::new(false) }
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
                terminate(&mut conn).await;
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
            .map_err(|_| SessionError::Refused {
                sqlstate: "53300",
                message: format!(
                    "gprxy: no free server connection for {account} within {} ms",
                    self.settings.wait_timeout.as_millis()
                ),
            })?
            .map_err(|_| SessionError::ClientGone)?;
        in_use.inc();
        let mut lease = Lease { conn: None, pool, _permit: permit, in_use, idle };
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

    /// Resets `conn` and returns it to the lease's pool, or closes it.
    pub async fn give_back(&self, lease: Lease, mut conn: ServerConn, clean: bool) {
        let retired = self.retired.load(Ordering::SeqCst);
        let reusable = clean
            && !retired
            && conn.created.elapsed() < self.settings.max_lifetime
            && reset(&mut conn).await;
        if reusable {
            lease.pool.idle.lock().push((conn, Instant::now()));
            lease.idle.inc();
        } else {
            tracing::info!(event = "pool", action = "close", retired, "server connection not reused");
            if clean {
                // Between messages: the server can be told goodbye.
                terminate(&mut conn).await;
            } else {
                let _ = conn.stream.shutdown().await;
            }
        }
    }
}

/// `DISCARD ALL` (session state, prepared statements, settings and so the plain context) and,
/// for a signed context, `gprxy.reset_context()`: true when the server answers every statement
/// with no error and is idle.
async fn reset(conn: &mut ServerConn) -> bool {
    let run = async {
        let mut out = proto::frame(b'Q', b"DISCARD ALL\0");
        let mut pending = 1;
        if conn.signer.is_some() {
            out.extend_from_slice(&proto::frame(b'Q', b"SELECT gprxy.reset_context()\0"));
            pending += 1;
        }
        conn.stream.write_all(&out).await.ok()?;
        conn.stream.flush().await.ok()?;
        let mut buf = BytesMut::new();
        let mut ok = true;
        loop {
            let m =
                read_message(&mut conn.stream, &mut buf, proto::MAX_SERVER_AUTH_MESSAGE, "server message")
                    .await
                    .ok()?;
            match m.tag {
                b'E' => ok = false,
                b'Z' => {
                    pending -= 1;
                    if pending == 0 {
                        return Some(ok && m.body() == b"I");
                    }
                }
                _ => {}
            }
        }
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), run).await, Ok(Some(true)))
}

/// Relays a pooled session until the client leaves. Returns whether the server connection is
/// clean: the client sent Terminate (or closed) between messages and the server was idle.
/// `counters` count the bytes relayed after `to_server` and `to_client`, to the server and to
/// the client.
pub async fn relay(
    client: &mut BoxStream,
    server: &mut BoxStream,
    to_server: BytesMut,
    to_client: BytesMut,
    counters: (Counter, Counter),
) -> bool {
    let (to_server_bytes, to_client_bytes) = counters;
    let (mut cf, mut sf) = (Framer::default(), Framer::default());
    sf.last_ready = Some(b'I');
    if !to_client.is_empty() && client.write_all(&to_client).await.is_err() {
        return false;
    }
    let idle = |cf: &Framer, sf: &Framer| cf.at_boundary() && sf.at_boundary() && sf.last_ready == Some(b'I');
    // Client bytes go to the server as they are, up to a Terminate, which ends the session:
    // first what came with the login, then the relay.
    match cf.feed(&to_server) {
        Ok(Some(end)) => return server.write_all(&to_server[..end]).await.is_ok() && idle(&cf, &sf),
        Ok(None) if server.write_all(&to_server).await.is_err() => return false,
        Ok(None) => {}
        Err(_) => return false,
    }
    let (mut forward, mut back) = (Pipe::new(to_server_bytes, false), Pipe::new(to_client_bytes, false));
    poll_fn(|cx| {
        let watch_client = |data: &[u8]| match cf.feed(data) {
            Ok(Some(end)) => Verdict::PassUpTo(end),
            Ok(None) => Verdict::Pass,
            Err(_) => Verdict::Refuse,
        };
        match forward.poll_copy(cx, &mut **client, &mut **server, watch_client) {
            // The client left, or sent Terminate (not forwarded): clean if both sides are idle.
            Poll::Ready(End::Eof | End::ReadFailed(_) | End::Stopped) => return Poll::Ready(idle(&cf, &sf)),
            Poll::Ready(End::WriteFailed(_) | End::Refused) => return Poll::Ready(false),
            Poll::Pending => {}
        }
        let watch_server = |data: &[u8]| if sf.feed(data).is_ok() { Verdict::Pass } else { Verdict::Refuse };
        match back.poll_copy(cx, &mut **server, &mut **client, watch_server) {
            Poll::Ready(_) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
