//! The connection layer every mode stands on: the state shared by all connections, the stream
//! type, the session error (what the client is told apart from what is logged), the login's
//! facts for its log event, cancel keys, and reading one message.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::BytesMut;
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::warn;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proto::{self, BackendMessage, ProtoError, SqlState};

/// A byte stream to a client or a server: TCP, TLS, a Unix socket, or (in tests) a duplex pipe.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
/// A boxed byte stream.
pub type BoxStream = Box<dyn Stream>;

/// State shared by all connections; replaced in part on SIGHUP.
pub struct Shared {
    /// Current settings.
    pub config: RwLock<Arc<Config>>,
    /// Client TLS (None: no TLS offered).
    pub tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
    /// Upstream TLS (None: plain upstream).
    pub upstream_tls: RwLock<Option<Arc<rustls::ClientConfig>>>,
    /// Live sessions' cancel keys.
    pub cancel_keys: CancelKeys,
    /// Metrics.
    pub metrics: Metrics,
    /// Set at SIGTERM: no new connections; `/healthz` answers 503 so that load balancers move on.
    pub draining: AtomicBool,
}

/// Why a connection ended before the relay.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client or server broke the protocol.
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
    /// A socket failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client went away.
    #[error("client closed the connection")]
    ClientGone,
    /// gprxy refused; the message is what the client is told.
    #[error("{message}")]
    Refused {
        /// SQLSTATE for the client.
        sqlstate: SqlState,
        /// Message for the client.
        message: String,
    },
    /// A pooled server connection was not in step for a new session (dead, or not idle).
    #[error("gprxy: the server connection was not ready for a new session")]
    NotReady,
    /// The server refused; its ErrorResponse was already relayed to the client.
    #[error("server: {sqlstate} {message}")]
    Server {
        /// The server's SQLSTATE.
        sqlstate: String,
        /// The server's message.
        message: String,
    },
}

impl SessionError {
    /// A refusal with this SQLSTATE and message.
    pub fn refused(sqlstate: SqlState, message: impl Into<String>) -> Self {
        Self::Refused { sqlstate, message: message.into() }
    }

    /// What the client is told: protocol details, never internal ones.
    pub fn client_message(&self) -> Option<(SqlState, String)> {
        match self {
            Self::Proto(e) => Some((SqlState::PROTOCOL_VIOLATION, format!("gprxy: {e}"))),
            Self::Refused { sqlstate, message } => Some((*sqlstate, message.clone())),
            Self::NotReady => Some((SqlState::CONNECTION_FAILURE, self.to_string())),
            Self::Io(_) | Self::ClientGone | Self::Server { .. } => None,
        }
    }

    /// The SQLSTATE and message for the log's `sqlstate` and `error` fields.
    pub fn log_fields(&self) -> (String, String) {
        match self {
            Self::Server { sqlstate, message } => (sqlstate.clone(), message.clone()),
            Self::Refused { sqlstate, message } => (sqlstate.to_string(), message.clone()),
            Self::NotReady => (SqlState::CONNECTION_FAILURE.to_string(), self.to_string()),
            other => (String::new(), other.to_string()),
        }
    }

    /// The ErrorResponse for the client, if the client is told anything.
    pub fn to_client(&self) -> Option<BytesMut> {
        self.client_message().map(|(sqlstate, message)| {
            BackendMessage::ErrorResponse { sqlstate, message: &message }.to_bytes()
        })
    }
}

/// What is known about a login, for its one log event.
#[derive(Default)]
pub struct LoginInfo {
    /// The startup packet's user.
    pub user: String,
    /// The startup packet's database.
    pub database: String,
    /// How the client authenticated (`OAUTHBEARER`, `password`, ...).
    pub mechanism: Option<String>,
    /// The attempt was libpq's OAuth discovery round.
    pub discovery: bool,
    /// The token's unverified claims (never used for a decision).
    pub token: Option<gprxy_core::Unverified>,
    /// The token's fingerprint.
    pub token_fp: Option<String>,
    /// The client connection is TLS.
    pub tls: bool,
    /// Why the login failed, for the log only (the client gets a stable short reason).
    pub detail: Option<String>,
}

impl LoginInfo {
    /// Records who a token says it is, for the log.
    pub fn note_token(&mut self, token: &str) {
        self.token = Some(gprxy_core::peek_unverified(token));
        self.token_fp = Some(gprxy_core::fingerprint(token.as_bytes()));
    }
}

/// A BackendKeyData: process id and (variable-length) secret.
pub type CancelKey = (i32, Vec<u8>);

/// Live sessions' cancel keys (as the client holds them) → the server's key. Pass-through
/// sessions hold the server's own key; pooled sessions a key of their own, so that a client
/// cannot cancel later sessions on the same server connection.
#[derive(Default)]
pub struct CancelKeys(Mutex<HashMap<CancelKey, CancelKey>>);

impl CancelKeys {
    /// The server key for a key a client presents.
    pub fn get(&self, client_key: &CancelKey) -> Option<CancelKey> {
        self.0.lock().get(client_key).cloned()
    }

    /// Registers a session.
    pub fn insert(&self, client_key: CancelKey, server_key: CancelKey) {
        self.0.lock().insert(client_key, server_key);
    }

    /// Forgets a session.
    pub fn remove(&self, client_key: &CancelKey) {
        self.0.lock().remove(client_key);
    }
}

/// The upstream side of a logged-in pass-through session.
pub struct Upstream {
    /// The server connection.
    pub stream: BoxStream,
    /// The server's cancel key (the client holds the same).
    pub key: Option<CancelKey>,
    /// Client bytes read past the login.
    pub leftover_client: BytesMut,
    /// Server bytes read past the login.
    pub leftover_server: BytesMut,
}

/// Reads more bytes into `buf`; the peer closing the stream reads as `ClientGone`.
pub async fn read_more(s: &mut BoxStream, buf: &mut BytesMut) -> Result<(), SessionError> {
    if s.read_buf(buf).await? == 0 {
        return Err(SessionError::ClientGone);
    }
    Ok(())
}

/// Reads one whole message from `s` (at most `max` bytes), buffering in `buf`. The peer closing
/// the stream reads as `ClientGone`.
pub async fn read_message(
    s: &mut BoxStream,
    buf: &mut BytesMut,
    max: usize,
    kind: &'static str,
) -> Result<proto::Message, SessionError> {
    loop {
        if let Some(m) = proto::parse_message(buf, max, kind)? {
            return Ok(m);
        }
        read_more(s, buf).await?;
    }
}

/// A failed accept. Running out of file descriptors or memory makes every accept fail at once
/// until a session ends: wait a little instead of spinning and flooding the log. A connection
/// that died in the backlog is just skipped.
pub async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted) {
        return;
    }
    warn!(error = %e, "accept failed; pausing 100 ms");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// Writes `bytes` and flushes.
pub async fn send(s: &mut BoxStream, bytes: &[u8]) -> Result<(), SessionError> {
    s.write_all(bytes).await?;
    s.flush().await?;
    Ok(())
}

/// Sends the end of a login (through ReadyForQuery) with the session's cancel key registered
/// first, so that a cancel right after it finds the session; unregistered if the send fails.
pub async fn send_ready(
    keys: &CancelKeys,
    client: &mut BoxStream,
    bytes: &[u8],
    client_key: Option<&CancelKey>,
    server_key: Option<&CancelKey>,
) -> Result<(), SessionError> {
    if let (Some(c), Some(s)) = (client_key, server_key) {
        keys.insert(c.clone(), s.clone());
    }
    if let Err(e) = send(client, bytes).await {
        if let Some(c) = client_key {
            keys.remove(c);
        }
        return Err(e);
    }
    Ok(())
}

/// Streams for tests of the login state machine without a server or socket.
#[cfg(test)]
pub mod duplex {
    use super::{read_message, BoxStream};
    use crate::proto;
    use bytes::BytesMut;

    /// Two ends of one in-memory connection: (gprxy's end, the peer's end).
    pub fn pair() -> (BoxStream, BoxStream) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        (Box::new(ours), Box::new(theirs))
    }

    /// The next whole message on `s` (panics when the peer closed).
    pub async fn next(s: &mut BoxStream, buf: &mut BytesMut) -> proto::Message {
        read_message(s, buf, 1 << 20, "message").await.expect("a message")
    }
}
