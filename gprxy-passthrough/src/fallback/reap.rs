//! Ending a pooled backend for certain. A server connection given up with work possibly in
//! flight ([`Doomed`]: the client left mid-request, a forced end whose settling failed, a
//! statement that caught the cancel) may still be running and committing after its socket is
//! closed, and would still take one of the server's connections. So gprxy logs in as the same
//! service account (a role may signal its own backends, PostgreSQL 13 and later), runs
//! `pg_terminate_backend(pid)` (PostgreSQL's SIGTERM, which no PL/pgSQL handler catches), and
//! waits until the doomed connection's server side closes: PostgreSQL closes it only after the
//! process has left the shared state, so the backend no longer exists for the server. The pool
//! slot is held until then; a failed attempt (each bounded in time) is retried with a growing
//! pause, and after about two minutes gprxy gives up with an error in the log and frees the
//! slot: a server it cannot reach or log in to must not wedge the pool for good.

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

use super::account_login;
use super::pool::{server_closed, Doomed};
use crate::conn::{read_message, BoxStream, Shared};
use crate::proto;

/// How long one attempt waits for the terminated backend to close its side.
const TERMINATE_WAIT: Duration = Duration::from_secs(10);
/// How long one whole attempt (log in, signal, wait) may take.
const ATTEMPT_BUDGET: Duration = Duration::from_secs(20);
/// The longest pause between attempts.
const MAX_PAUSE: Duration = Duration::from_secs(10);
/// Attempts before gprxy gives up (about two minutes): the slot is then freed with an error in
/// the log, rather than a pool wedged for good by a server it cannot reach or log in to.
const MAX_ATTEMPTS: u32 = 10;

/// Who logs in to end a backend: a role that may signal it (the same role, or a member of
/// `pg_signal_backend` for another non-superuser role).
#[derive(Debug, Clone, Copy)]
pub struct Killer<'a> {
    /// The role.
    pub user: &'a str,
    /// A database it may connect to.
    pub database: &'a str,
    /// Its password (SCRAM-SHA-256).
    pub password: &'a str,
}

/// Ends the doomed connection's backend, then frees its slot. `account`, `database` and
/// `password` log the terminating connection in (the same account's own).
pub async fn end_backend(shared: &Shared, account: &str, database: &str, password: &str, mut doomed: Doomed) {
    let _turn = doomed.turn().lock_owned().await;
    let Some(pid) = doomed.conn.key.as_ref().map(|k| k.0) else {
        // No process id to name (the server sent no BackendKeyData): only its own close tells.
        if !server_closed(&mut doomed.conn.stream, TERMINATE_WAIT * 6).await {
            tracing::error!(
                event = "end_backend",
                role = account,
                "gave up: a backend with no key is still open; its pool slot is freed"
            );
        }
        return;
    };
    let killer = Killer { user: account, database, password };
    end_process(shared, killer, pid, &mut doomed.conn.stream).await;
}

/// Ends server process `pid`, whose connection is `stream`, logged in as `killer`: returns once
/// the server has closed `stream` (the process has left the shared state), retrying with a
/// growing pause; after [`MAX_ATTEMPTS`] (about two minutes) it gives up with an error in the
/// log.
pub async fn end_process(shared: &Shared, killer: Killer<'_>, pid: i32, stream: &mut BoxStream) {
    let mut pause = Duration::from_millis(100);
    let mut attempt = 1u32;
    loop {
        // Already gone (the server ended it, or it ended by itself): nothing to signal, and its
        // process id may be another backend's by now.
        if server_closed(stream, Duration::from_millis(20)).await {
            tracing::info!(
                event = "end_backend",
                role = killer.user,
                pid,
                signalled = false,
                attempt,
                "server process of a connection given up has ended"
            );
            return;
        }
        let config = shared.config.read().clone();
        let outcome = async {
            let mut conn =
                account_login::log_in(shared, &config, killer.user, killer.database, killer.password, None)
                    .await
                    .map_err(|e| format!("cannot log in to end it: {e}"))?;
            let signalled = terminate_backend(&mut conn.stream, pid).await;
            // Told goodbye either way: its own backend ends at once.
            let mut bye = BytesMut::new();
            frontend::terminate(&mut bye);
            let _ = conn.stream.write_all(&bye).await;
            let _ = conn.stream.flush().await;
            let signalled = signalled?;
            let gone = server_closed(stream, TERMINATE_WAIT).await;
            server_closed(&mut conn.stream, TERMINATE_WAIT).await;
            if gone {
                Ok(signalled)
            } else {
                Err("its process did not end in time".to_owned())
            }
        };
        let outcome = tokio::time::timeout(ATTEMPT_BUDGET, outcome)
            .await
            .unwrap_or_else(|_| Err("the attempt timed out".to_owned()));
        match outcome {
            Ok(signalled) => {
                tracing::info!(
                    event = "end_backend",
                    role = killer.user,
                    pid,
                    signalled,
                    attempt,
                    "server process of a connection given up has ended"
                );
                return;
            }
            Err(reason) if attempt >= MAX_ATTEMPTS => {
                shared.metrics.upstream_errors.inc();
                tracing::error!(
                    event = "end_backend",
                    role = killer.user,
                    pid,
                    attempt,
                    reason = reason.as_str(),
                    "gave up ending the server process of a connection given up: it may still run; its pool slot is freed"
                );
                return;
            }
            Err(reason) => {
                shared.metrics.upstream_errors.inc();
                tracing::warn!(
                    event = "end_backend",
                    role = killer.user,
                    pid,
                    attempt,
                    reason = reason.as_str(),
                    "server process of a connection given up not ended yet"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// `SELECT pg_terminate_backend(pid)` on `stream`: whether the process was signalled (false:
/// it was already gone).
async fn terminate_backend(stream: &mut BoxStream, pid: i32) -> Result<bool, String> {
    let mut out = BytesMut::new();
    frontend::query(&format!("SELECT pg_catalog.pg_terminate_backend({pid})"), &mut out)
        .map_err(|e| e.to_string())?;
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    let mut signalled = None;
    let mut error = None;
    loop {
        let m = read_message(stream, &mut buf, proto::MAX_SERVER_AUTH_MESSAGE, "server message")
            .await
            .map_err(|e| e.to_string())?;
        match m.tag {
            // One row, one column: 't' or 'f'.
            b'D' => signalled = Some(m.body().ends_with(b"t")),
            b'E' => error = Some(proto::error_fields(&m)),
            b'Z' => break,
            _ => {}
        }
    }
    match (error, signalled) {
        (Some((code, message)), _) => Err(format!("pg_terminate_backend failed: {code} {message}")),
        (None, Some(s)) => Ok(s),
        (None, None) => Err("pg_terminate_backend returned no row".to_owned()),
    }
}
