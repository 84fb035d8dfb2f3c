//! One client connection: TLS negotiation, startup, the authentication exchange relayed (and
//! logged), then a plain byte relay in both directions.
//!
//! Until ReadyForQuery every message is framed and bounded ([`crate::proto`]); afterwards bytes are
//! copied without parsing. Any protocol violation ends that connection with an ErrorResponse.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use parking_lot::{Mutex, RwLock};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{field::Empty, info, warn, Instrument};

use crate::config::Config;
use crate::metrics::{DirectionLabels, Metrics};
use crate::proto::{self, auth, FirstPacket, ProtoError};

/// A byte stream, plain or TLS.
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
    /// Live sessions' cancel keys (as the client holds them) → the server's key. Pass-through
    /// sessions hold the server's own key; pooled sessions a key of their own, so that a client
    /// cannot cancel later sessions on the same server connection.
    pub cancel_keys: Mutex<HashMap<CancelKey, CancelKey>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Fallback mode, when configured.
    pub fallback: RwLock<Option<Arc<crate::fallback::FallbackRuntime>>>,
    /// Set at SIGTERM: no new connections; `/healthz` answers 503 so that load balancers move on.
    pub draining: AtomicBool,
}

/// Why a connection ended before the relay.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("client closed the connection")]
    ClientGone,
    #[error("{message}")]
    Refused { sqlstate: &'static str, message: String },
    /// The server refused; its ErrorResponse was already relayed to the client.
    #[error("server: {sqlstate} {message}")]
    Server { sqlstate: String, message: String },
}

impl SessionError {
    fn refused(sqlstate: &'static str, message: impl Into<String>) -> Self {
        Self::Refused { sqlstate, message: message.into() }
    }

    /// What the client is told: protocol details, never internal ones.
    fn client_message(&self) -> Option<(&'static str, String)> {
        match self {
            Self::Proto(e) => Some(("08P01", format!("gprxy: {e}"))),
            Self::Refused { sqlstate, message } => Some((sqlstate, message.clone())),
            Self::Io(_) | Self::ClientGone | Self::Server { .. } => None,
        }
    }
}

/// What is known about a login, for its one log event.
#[derive(Default)]
pub struct LoginInfo {
    user: String,
    database: String,
    pub(crate) mechanism: Option<String>,
    pub(crate) discovery: bool,
    token: Option<gprxy_core::Unverified>,
    token_fp: Option<String>,
    pub(crate) tls: bool,
    /// Why the login failed, for the log only (the client gets a stable short reason).
    pub(crate) detail: Option<String>,
}

/// Handles one accepted connection to its end.
pub async fn handle(shared: Arc<Shared>, sock: TcpStream, peer: SocketAddr) {
    let span = tracing::info_span!("conn", client = %peer, user = Empty, database = Empty);
    async move {
        let started = Instant::now();
        let config = shared.config.read().clone();
        let deadline = tokio::time::Instant::now() + config.login_timeout;
        // Direct TLS (sslnegotiation=direct) starts with a TLS handshake record; peek before the
        // socket is boxed, so nothing has to be pushed back.
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout_at(deadline, sock.peek(&mut first)).await;
        let mut client: BoxStream = Box::new(sock);
        let mut info = LoginInfo::default();
        let result = match peeked {
            Err(_) => Err(SessionError::refused("08006", "gprxy: login timed out")),
            Ok(Err(e)) => Err(SessionError::Io(e)),
            Ok(Ok(0)) => Err(SessionError::ClientGone),
            Ok(Ok(_)) => {
                let direct = first[0] == 0x16;
                // Boxed: the login's state is freed when it ends instead of staying in the
                // session's future (and in memory) for as long as the session runs.
                let login = Box::pin(login(&shared, &config, &mut client, &mut info, direct));
                match tokio::time::timeout_at(deadline, login).await {
                    Ok(r) => r,
                    Err(_) => Err(SessionError::refused("08006", "gprxy: login timed out")),
                }
            }
        };
        shared.metrics.login_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Some(mut up)) => {
                log_login(&shared, &info, "success", None, started);
                match up.pooled.take() {
                    None => {
                        relay(&shared, &mut client, &mut up).await;
                        remove_cancel_key(&shared, &up);
                    }
                    Some(p) => {
                        let to_server = std::mem::take(&mut up.leftover_client);
                        let to_client = std::mem::take(&mut up.leftover_server);
                        let counters = relayed_bytes(&shared);
                        let relay =
                            crate::pool::relay(&mut client, &mut up.stream, to_server, to_client, counters);
                        let clean = Box::pin(relay).await;
                        remove_cancel_key(&shared, &up);
                        let conn = crate::pool::ServerConn::returning(
                            up.stream,
                            p.startup_reply,
                            up.key,
                            p.signer,
                            p.created,
                        );
                        // Back to the pool it came from, even if a reload replaced the pools.
                        Box::pin(p.lease.give_back(conn, clean)).await;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                let outcome = match &e {
                    SessionError::ClientGone | SessionError::Io(_) => "aborted",
                    _ if info.discovery => "discovery",
                    _ => "failure",
                };
                if let Some((code, msg)) = e.client_message() {
                    let _ = client.write_all(&proto::error_response(code, &msg)).await;
                    let _ = client.flush().await;
                }
                if !info.user.is_empty() || !matches!(e, SessionError::ClientGone) {
                    log_login(&shared, &info, outcome, Some(&e), started);
                }
            }
        }
        let _ = client.shutdown().await;
    }
    .instrument(span)
    .await
}

/// The upstream side of a logged-in session.
pub struct Upstream {
    /// Set when the server connection came from a pool and goes back to it.
    pub(crate) pooled: Option<Pooled>,
    pub(crate) stream: BoxStream,
    /// The server's cancel key.
    pub(crate) key: Option<CancelKey>,
    /// The cancel key the client holds (registered in `Shared::cancel_keys`).
    pub(crate) client_key: Option<CancelKey>,
    pub(crate) leftover_client: BytesMut,
    pub(crate) leftover_server: BytesMut,
}

/// A BackendKeyData: process id and (variable-length) secret.
pub type CancelKey = (i32, Vec<u8>);

/// Reads one whole message from `s` (at most `max` bytes), buffering in `buf`. The peer closing
/// the stream reads as `ClientGone`.
pub(crate) async fn read_message(
    s: &mut BoxStream,
    buf: &mut BytesMut,
    max: usize,
    kind: &'static str,
) -> Result<proto::Message, SessionError> {
    loop {
        if let Some(m) = proto::parse_message(buf, max, kind)? {
            return Ok(m);
        }
        if s.read_buf(buf).await? == 0 {
            return Err(SessionError::ClientGone);
        }
    }
}

/// Sends the end of a login (through ReadyForQuery) with the session's cancel key registered
/// first, so that a cancel right after it finds the session; unregistered if the send fails.
pub(crate) async fn send_ready(
    shared: &Shared,
    client: &mut BoxStream,
    bytes: &[u8],
    client_key: Option<&CancelKey>,
    server_key: Option<&CancelKey>,
) -> Result<(), SessionError> {
    if let (Some(c), Some(s)) = (client_key, server_key) {
        shared.cancel_keys.lock().insert(c.clone(), s.clone());
    }
    let sent = async {
        client.write_all(bytes).await?;
        client.flush().await
    };
    if let Err(e) = sent.await {
        if let Some(c) = client_key {
            shared.cancel_keys.lock().remove(c);
        }
        return Err(e.into());
    }
    Ok(())
}

fn remove_cancel_key(shared: &Shared, up: &Upstream) {
    if let Some(k) = &up.client_key {
        shared.cancel_keys.lock().remove(k);
    }
}

/// The login event. Strings a client chose are recorded as `&str`: the text format writes them
/// quoted with newlines and control characters escaped (a Display value would be written as it
/// is), JSON as strings. `error` is what the client was told, `detail` what only the log gets.
fn log_login(
    shared: &Shared,
    info: &LoginInfo,
    outcome: &'static str,
    err: Option<&SessionError>,
    started: Instant,
) {
    let mechanism = crate::metrics::mechanism_label(info.mechanism.as_deref().unwrap_or("none"));
    shared.metrics.login(mechanism, outcome);
    let (sqlstate, error) = match err {
        Some(SessionError::Refused { sqlstate, message }) => (sqlstate.to_string(), message.clone()),
        Some(SessionError::Server { sqlstate, message }) => (sqlstate.clone(), message.clone()),
        Some(e) => (String::new(), e.to_string()),
        None => (String::new(), String::new()),
    };
    let t = info.token.clone().unwrap_or_default();
    info!(
        event = "login",
        user = info.user.as_str(),
        database = info.database.as_str(),
        mechanism,
        outcome,
        sqlstate = sqlstate.as_str(),
        error = error.as_str(),
        detail = info.detail.as_deref().unwrap_or(""),
        tls = info.tls,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        token_sub = t.sub.as_deref().unwrap_or(""),
        token_iss = t.iss.as_deref().unwrap_or(""),
        token_kid = t.kid.as_deref().unwrap_or(""),
        token_exp = t.exp.unwrap_or(0),
        token_fp = info.token_fp.as_deref().unwrap_or(""),
        "login"
    );
}

async fn read_more(s: &mut BoxStream, buf: &mut BytesMut) -> Result<(), SessionError> {
    if s.read_buf(buf).await? == 0 {
        return Err(SessionError::ClientGone);
    }
    Ok(())
}

async fn first_packet(client: &mut BoxStream, buf: &mut BytesMut) -> Result<FirstPacket, SessionError> {
    loop {
        if let Some(p) = proto::parse_first_packet(buf)? {
            return Ok(p);
        }
        read_more(client, buf).await?;
    }
}

async fn tls_accept(
    shared: &Shared,
    client: &mut BoxStream,
    cfg: Arc<rustls::ServerConfig>,
    direct: bool,
) -> Result<(), SessionError> {
    let plain = std::mem::replace(client, Box::new(tokio::io::duplex(1).0));
    match tokio_rustls::TlsAcceptor::from(cfg).accept(plain).await {
        Ok(tls) => {
            let alpn_ok = tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_POSTGRESQL);
            *client = Box::new(tls);
            if direct && !alpn_ok {
                // libpq 17+ always sends ALPN on direct TLS; anything else is not PostgreSQL.
                return Err(SessionError::refused("08P01", "gprxy: direct TLS requires ALPN \"postgresql\""));
            }
            Ok(())
        }
        Err(e) => {
            shared.metrics.tls_failures.inc();
            let error = e.to_string();
            warn!(error = error.as_str(), "TLS handshake failed");
            Err(SessionError::ClientGone)
        }
    }
}

async fn login(
    shared: &Shared,
    config: &Config,
    client: &mut BoxStream,
    info: &mut LoginInfo,
    direct: bool,
) -> Result<Option<Upstream>, SessionError> {
    let mut buf = BytesMut::with_capacity(1024);
    let tls_cfg = shared.tls.read().clone();

    if direct {
        let Some(cfg) = tls_cfg.clone() else {
            return Err(SessionError::ClientGone); // no TLS configured: nothing sensible to answer
        };
        tls_accept(shared, client, cfg, true).await?;
        info.tls = true;
    }

    let startup = loop {
        match first_packet(client, &mut buf).await? {
            FirstPacket::SslRequest if !info.tls => {
                match &tls_cfg {
                    Some(cfg) => {
                        client.write_all(b"S").await?;
                        client.flush().await?;
                        // Bytes sent before the handshake would be read as if encrypted
                        // (CVE-2021-23214): refuse them.
                        if !buf.is_empty() {
                            return Err(SessionError::refused(
                                "08P01",
                                "gprxy: unexpected data after SSLRequest",
                            ));
                        }
                        tls_accept(shared, client, cfg.clone(), false).await?;
                        info.tls = true;
                    }
                    None => client.write_all(b"N").await?,
                }
            }
            FirstPacket::GssEncRequest if !info.tls => client.write_all(b"N").await?,
            FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
                return Err(SessionError::Proto(ProtoError::BadStartup("encryption requested twice")));
            }
            FirstPacket::Cancel { pid, key } => {
                forward_cancel(shared, config, pid, key).await;
                return Ok(None);
            }
            FirstPacket::Startup(s) => break s,
        }
    };
    info.user = startup.param("user").unwrap_or_default().to_owned();
    info.database = startup.param("database").unwrap_or(&info.user).to_owned();
    let span = tracing::Span::current();
    span.record("user", info.user.as_str());
    span.record("database", info.database.as_str());
    if config.require_tls && !info.tls {
        return Err(SessionError::refused(
            "28000",
            "gprxy: TLS is required (use sslmode=require or stronger)",
        ));
    }

    let fallback = shared.fallback.read().clone();
    if let Some(rt) = fallback {
        return crate::fallback::authenticate(shared, config, rt, client, &startup, buf, info)
            .await
            .map(Some);
    }
    let (packet, dropped) = without_proxy_params(&startup.raw);
    if !dropped.is_empty() {
        tracing::warn!(event = "startup", dropped = ?dropped, "the client's gprxy.* startup parameters were dropped");
    }
    let mut up = connect_upstream(shared, config).await?;
    up.write_all(&packet).await?;
    up.flush().await?;
    authenticate(shared, config, client, up, buf, info).await.map(Some)
}

/// The startup packet (already parsed, so well formed) without its `gprxy.*` parameters: those
/// names are the proxy's (a client must not pick a signed-context nonce), and with the names
/// dropped.
fn without_proxy_params(raw: &[u8]) -> (Vec<u8>, Vec<String>) {
    let Some((head, mut rest)) = raw.split_at_checked(8) else { return (raw.to_vec(), Vec::new()) };
    let mut out = head.to_vec();
    let mut dropped = Vec::new();
    while let Some(name_end) = rest.iter().position(|&b| b == 0).filter(|&n| n > 0) {
        let Some(value_end) = rest[name_end + 1..].iter().position(|&b| b == 0) else { break };
        let (pair, tail) = rest.split_at(name_end + 1 + value_end + 1);
        let name = &pair[..name_end];
        if name.len() >= 6 && name[..6].eq_ignore_ascii_case(b"gprxy.") {
            dropped.push(String::from_utf8_lossy(name).into_owned());
        } else {
            out.extend_from_slice(pair);
        }
        rest = tail;
    }
    out.push(0);
    let len = u32::try_from(out.len()).unwrap_or(u32::MAX).to_be_bytes();
    out[..4].copy_from_slice(&len);
    (out, dropped)
}

pub(crate) async fn connect_upstream(shared: &Shared, config: &Config) -> Result<BoxStream, SessionError> {
    let unreachable = |e: String| {
        shared.metrics.upstream_errors.inc();
        warn!(upstream = %config.upstream, error = %e, "cannot reach the server");
        SessionError::refused("08006", "gprxy: cannot reach the database server")
    };
    if let Some(socket) = config.upstream_socket() {
        // A Unix socket on this host: no TLS (refused at configuration), less kernel work than TCP.
        let unix =
            tokio::time::timeout(config.upstream_connect_timeout, tokio::net::UnixStream::connect(socket))
                .await
                .map_err(|_| unreachable("connect timed out".into()))?
                .map_err(|e| unreachable(e.to_string()))?;
        return Ok(Box::new(unix));
    }
    let tcp = tokio::time::timeout(config.upstream_connect_timeout, TcpStream::connect(&config.upstream))
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let (Some(tls), Some(up_cfg)) = (shared.upstream_tls.read().clone(), config.upstream_tls.clone()) else {
        return Ok(Box::new(tcp));
    };
    let mut tcp = tcp;
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(unreachable("server refused TLS".into()));
    }
    let name = rustls::pki_types::ServerName::try_from(up_cfg.server_name.clone())
        .map_err(|_| unreachable(format!("bad server name {:?}", up_cfg.server_name)))?;
    let s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| unreachable(format!("TLS: {e}")))?;
    Ok(Box::new(s))
}

async fn forward_cancel(shared: &Shared, config: &Config, pid: i32, key: Vec<u8>) {
    let target = shared.cancel_keys.lock().get(&(pid, key)).cloned();
    let Some(target) = target else {
        info!(event = "cancel", pid, outcome = "dropped", "cancel request with an unknown key dropped");
        return;
    };
    match connect_upstream(shared, config).await {
        Ok(mut up) => {
            let (server_pid, server_secret) = &target;
            let _ = up.write_all(&proto::encode_cancel(*server_pid, server_secret)).await;
            let _ = up.flush().await;
            let mut sink = [0u8; 1];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), up.read(&mut sink)).await;
            info!(event = "cancel", pid, outcome = "forwarded", "cancel request forwarded");
        }
        Err(e) => warn!(event = "cancel", pid, error = %e, "cancel request not forwarded"),
    }
}

/// Relays the authentication exchange until the server's first ReadyForQuery.
async fn authenticate(
    shared: &Shared,
    config: &Config,
    client: &mut BoxStream,
    mut up: BoxStream,
    mut cbuf: BytesMut,
    info: &mut LoginInfo,
) -> Result<Upstream, SessionError> {
    let mut sbuf = BytesMut::with_capacity(4096);
    let mut key = None;
    let mut authenticated = false;
    // Bridge: the client sends a cleartext password that is really a bearer token.
    let mut bridge = Bridge::Off;
    // Messages relayed in one round are written with one call per direction.
    let mut to_client = BytesMut::with_capacity(4096);
    let mut to_server = BytesMut::new();
    loop {
        // Server messages first: the exchange is server-driven.
        while let Some(m) = proto::parse_message(&mut sbuf, proto::MAX_SERVER_AUTH_MESSAGE, "server message")?
        {
            match (m.tag, proto::auth_code(&m)) {
                (b'R', Some(auth::OK)) => {
                    authenticated = true;
                    to_client.extend_from_slice(&m.raw);
                }
                (b'R', Some(auth::SASL)) => {
                    let mut mechs = proto::sasl_mechanisms(&m)?;
                    // Channel binding cannot cross gprxy: the client's channel (TLS to gprxy, or
                    // none) is never the server's.
                    mechs.retain(|x| x != "SCRAM-SHA-256-PLUS");
                    if config.token_as_password && mechs.iter().any(|x| x == "OAUTHBEARER") {
                        if !info.tls {
                            let _ = up.shutdown().await;
                            return Err(SessionError::refused(
                                "28000",
                                "gprxy: the token-as-password bridge requires TLS (sslmode=require or stronger)",
                            ));
                        }
                        bridge = Bridge::AwaitPassword;
                        info.mechanism = Some("OAUTHBEARER".into());
                        to_client.extend_from_slice(&proto::frame(b'R', &auth::CLEARTEXT.to_be_bytes()));
                    } else {
                        to_client.extend_from_slice(&proto::encode_sasl_mechanisms(&mechs));
                    }
                }
                (b'R', Some(auth::SASL_CONTINUE)) if bridge == Bridge::Sent => {
                    // The server's OAUTHBEARER error challenge: finish the exchange (RFC 7628).
                    to_server.extend_from_slice(&proto::frame(b'p', b"\x01"));
                }
                (b'R', Some(code)) => {
                    if info.mechanism.is_none() {
                        info.mechanism = Some(match code {
                            auth::CLEARTEXT => "password".into(),
                            5 => "md5".into(),
                            7 => "gss".into(),
                            9 => "sspi".into(),
                            _ => "other".into(),
                        });
                    }
                    to_client.extend_from_slice(&m.raw);
                }
                (b'K', _) => {
                    key = proto::backend_key(&m);
                    to_client.extend_from_slice(&m.raw);
                }
                (b'E', _) => {
                    to_client.extend_from_slice(&m.raw);
                    client.write_all(&to_client).await?;
                    client.flush().await?;
                    let (sqlstate, message) = proto::error_fields(&m);
                    let _ = up.shutdown().await;
                    return Err(SessionError::Server { sqlstate, message });
                }
                (b'Z', _) if authenticated => {
                    to_client.extend_from_slice(&m.raw);
                    send_ready(shared, client, &to_client, key.as_ref(), key.as_ref()).await?;
                    if info.mechanism.is_none() {
                        info.mechanism = Some("trust".into());
                    }
                    return Ok(Upstream {
                        pooled: None,
                        stream: up,
                        client_key: key.clone(),
                        key,
                        leftover_client: cbuf,
                        leftover_server: sbuf,
                    });
                }
                _ => to_client.extend_from_slice(&m.raw),
            }
        }
        if !to_client.is_empty() {
            client.write_all(&to_client).await?;
            client.flush().await?;
            to_client.clear();
        }
        // Client messages during authentication: password and SASL messages only.
        while let Some(m) =
            proto::parse_message(&mut cbuf, proto::MAX_SASL_MESSAGE, "authentication message")?
        {
            match m.tag {
                b'p' if bridge == Bridge::AwaitPassword => {
                    let token = proto::password(&m)?;
                    note_token(info, token);
                    let sasl = format!("n,,\x01auth=Bearer {token}\x01\x01");
                    to_server.extend_from_slice(&proto::encode_sasl_initial("OAUTHBEARER", sasl.as_bytes()));
                    bridge = Bridge::Sent;
                }
                b'p' => {
                    if info.mechanism.is_none() {
                        if let Ok((mech, data)) = proto::parse_sasl_initial(&m) {
                            if mech == "OAUTHBEARER" {
                                match data.as_deref().map(proto::oauthbearer_token) {
                                    Some(Ok(Some(t))) => note_token(info, t),
                                    Some(Ok(None)) => info.discovery = true,
                                    _ => {}
                                }
                            }
                            info.mechanism = Some(mech);
                        }
                    }
                    to_server.extend_from_slice(&m.raw);
                }
                b'X' => return Err(SessionError::ClientGone),
                _ => {
                    return Err(SessionError::Proto(ProtoError::BadMessage(
                        "unexpected message during authentication",
                    )))
                }
            }
        }
        if !to_server.is_empty() {
            up.write_all(&to_server).await?;
            up.flush().await?;
            to_server.clear();
        }
        tokio::select! {
            r = client.read_buf(&mut cbuf) => { if r? == 0 { return Err(SessionError::ClientGone); } }
            r = up.read_buf(&mut sbuf) => {
                if r? == 0 {
                    return Err(SessionError::refused("08006", "gprxy: the database server closed the connection"));
                }
            }
        }
    }
}

/// What a pooled session must hand back to its pool.
pub struct Pooled {
    pub(crate) lease: crate::pool::Lease,
    pub(crate) startup_reply: BytesMut,
    pub(crate) signer: Option<gprxy_core::context::ContextSigner>,
    pub(crate) created: Instant,
}

/// Where the token-as-password bridge is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bridge {
    /// Not bridging: messages are relayed as they are.
    Off,
    /// The client was asked for a password (the token).
    AwaitPassword,
    /// The token went upstream as OAUTHBEARER; an error challenge is answered by gprxy.
    Sent,
}

pub(crate) fn note_token(info: &mut LoginInfo, token: &str) {
    info.token = Some(gprxy_core::peek_unverified(token));
    info.token_fp = Some(gprxy_core::fingerprint(token.as_bytes()));
}

/// Copies bytes both ways until either side closes.
async fn relay(shared: &Shared, client: &mut BoxStream, up: &mut Upstream) {
    // Taken, so that the login's buffers are not held for the rest of the session.
    let (to_server, to_client) =
        (std::mem::take(&mut up.leftover_client), std::mem::take(&mut up.leftover_server));
    if !to_server.is_empty() && up.stream.write_all(&to_server).await.is_err() {
        return;
    }
    if !to_client.is_empty() && client.write_all(&to_client).await.is_err() {
        return;
    }
    drop((to_server, to_client));
    let (sent, received) = relayed_bytes(shared);
    let _ = crate::relay::relay(client, &mut up.stream, sent, received).await;
}

/// The relayed-bytes counters: client to server, server to client.
fn relayed_bytes(shared: &Shared) -> (Counter, Counter) {
    let counter = |direction| shared.metrics.bytes.get_or_create(&DirectionLabels { direction }).clone();
    (counter("client_to_server"), counter("server_to_client"))
}

#[cfg(test)]
mod tests {
    /// A session's future is allocated once and held for as long as the session runs, so what
    /// only the login needs is boxed and freed when the login ends (it was 5.9 KiB unboxed).
    #[tokio::test]
    async fn a_running_session_holds_under_3_kib_of_future_state() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let overrides =
            crate::config::Overrides { upstream: Some("127.0.0.1:5432".into()), ..Default::default() };
        let shared =
            crate::server::shared_state(crate::config::Config::load(None, &overrides).unwrap()).unwrap();
        let session = super::handle(shared, sock, "127.0.0.1:1".parse().unwrap());
        assert!(std::mem::size_of_val(&session) < 3 * 1024, "{} bytes", std::mem::size_of_val(&session));
    }

    #[test]
    fn proxy_startup_parameters_are_dropped_and_the_rest_kept_in_order() {
        let packet = |pairs: &[(&str, &str)]| {
            let mut b = vec![0, 0, 0, 0, 0, 3, 0, 0];
            for (k, v) in pairs {
                b.extend_from_slice(k.as_bytes());
                b.push(0);
                b.extend_from_slice(v.as_bytes());
                b.push(0);
            }
            b.push(0);
            let len = (b.len() as u32).to_be_bytes();
            b[..4].copy_from_slice(&len);
            b
        };
        let sent = packet(&[
            ("user", "analyst"),
            ("gprxy.context_nonce", "n"),
            ("database", "app"),
            ("GPRXY.Context_Key", "k"),
            ("gprxy.anything", ""),
            ("options", "-c search_path=x"),
        ]);
        let (out, dropped) = super::without_proxy_params(&sent);
        assert_eq!(out, packet(&[("user", "analyst"), ("database", "app"), ("options", "-c search_path=x")]));
        assert_eq!(dropped, ["gprxy.context_nonce", "GPRXY.Context_Key", "gprxy.anything"]);
        let plain = packet(&[("user", "alice")]);
        assert_eq!(super::without_proxy_params(&plain), (plain.clone(), Vec::<String>::new()));
    }
}
