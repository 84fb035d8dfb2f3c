//! One client connection from accept to end: TLS, the startup packet, the login through the
//! mode in force (pass-through or fallback), the relay, and the login's log event.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use parking_lot::RwLock;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{field::Empty, info, warn, Instrument};

use crate::config::Config;
use crate::conn::{read_more, send, BoxStream, LoginInfo, SessionError, Shared, Upstream};
use crate::fallback::{Fallback, PooledSession};
use crate::lifetime::{ProxyMode, SessionEnd, TokenOwner};
use crate::proto::{self, FirstPacket, ProtoError, SqlState};

/// Everything a connection runs with: the connection layer's shared state and fallback mode
/// when it is configured (both replaced in part on SIGHUP).
pub struct Proxy {
    /// State every connection shares.
    pub shared: Shared,
    /// Fallback mode, when configured.
    pub fallback: RwLock<Option<Arc<Fallback>>>,
}

/// A logged-in session, by mode.
enum LoggedIn {
    /// Pass-through: the server connection is this session's alone.
    Direct(Upstream),
    /// Fallback: a pooled server connection, going back to its pool at the end (boxed: it is
    /// several times the size of the other).
    Pooled(Box<PooledSession>),
}

/// Handles one accepted connection to its end.
pub async fn handle(proxy: Arc<Proxy>, sock: TcpStream, peer: SocketAddr) {
    let span = tracing::info_span!("conn", client = %peer, user = Empty, database = Empty);
    async move {
        let started = Instant::now();
        let shared = &proxy.shared;
        let config = shared.config.read().clone();
        let deadline = tokio::time::Instant::now() + config.login_timeout;
        // Direct TLS (sslnegotiation=direct) starts with a TLS handshake record; peek before the
        // socket is boxed, so nothing has to be pushed back.
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout_at(deadline, sock.peek(&mut first)).await;
        let mut client: BoxStream = Box::new(sock);
        let mut info = LoginInfo::default();
        let result = match peeked {
            Err(_) => Err(SessionError::refused(SqlState::CONNECTION_FAILURE, "gprxy: login timed out")),
            Ok(Err(e)) => Err(SessionError::Io(e)),
            Ok(Ok(0)) => Err(SessionError::ClientGone),
            Ok(Ok(_)) => {
                let direct = first[0] == 0x16;
                // Boxed: the login's state is freed when it ends instead of staying in the
                // session's future (and in memory) for as long as the session runs.
                let login = Box::pin(login(&proxy, &config, &mut client, &mut info, direct));
                match tokio::time::timeout_at(deadline, login).await {
                    Ok(r) => r,
                    Err(_) => {
                        Err(SessionError::refused(SqlState::CONNECTION_FAILURE, "gprxy: login timed out"))
                    }
                }
            }
        };
        shared.metrics.login_duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Some(session)) => {
                log_login(shared, &info, "success", None, started);
                match session {
                    LoggedIn::Direct(up) => {
                        let end = passthrough_end(&config.session, &info);
                        crate::passthrough::run(shared, &mut client, up, end).await
                    }
                    LoggedIn::Pooled(pooled) => pooled.run(shared, &mut client).await,
                }
            }
            Ok(None) => {}
            Err(e) => {
                let outcome = match &e {
                    SessionError::ClientGone | SessionError::Io(_) => "aborted",
                    _ if info.discovery => "discovery",
                    _ => "failure",
                };
                if let Some(response) = e.to_client() {
                    let _ = send(&mut client, &response).await;
                    Box::pin(close_after_refusal(&mut client)).await;
                }
                if !info.user.is_empty() || !matches!(e, SessionError::ClientGone) {
                    log_login(shared, &info, outcome, Some(&e), started);
                }
            }
        }
        let _ = client.shutdown().await;
    }
    .instrument(span)
    .await
}

/// Closes a refused client's connection without a reset: a socket closed with input not yet
/// read sends RST, which can destroy the error response before the client reads it. The input
/// is read and dropped for a moment (bounded: a client that keeps sending is cut then).
async fn close_after_refusal(client: &mut BoxStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = client.shutdown().await;
    let mut sink = vec![0u8; 4096];
    let drain = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(std::time::Duration::from_millis(250), drain).await;
}

/// The end of a pass-through session: from the `exp` of the token the client logged in with,
/// read without checking (the server checked the token). A login without a token (SCRAM,
/// trust, ...) is not ended; a token without a readable `exp` (opaque) only by the maximum age.
fn passthrough_end(policy: &gprxy_core::SessionPolicy, info: &LoginInfo) -> Option<SessionEnd> {
    let t = info.token.as_ref()?;
    let exp = t.exp.and_then(|e| u64::try_from(e).ok());
    let owner = TokenOwner { sub: t.sub.clone(), iss: t.iss.clone(), token_fp: info.token_fp.clone() };
    SessionEnd::plan(policy, ProxyMode::Passthrough, exp, owner)
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
    let (sqlstate, error) = err.map(SessionError::log_fields).unwrap_or_default();
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
                return Err(SessionError::refused(
                    SqlState::PROTOCOL_VIOLATION,
                    "gprxy: direct TLS requires ALPN \"postgresql\"",
                ));
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

/// TLS and the startup packet, then the login through the mode in force. `Ok(None)`: the
/// connection was a cancel request.
async fn login(
    proxy: &Proxy,
    config: &Config,
    client: &mut BoxStream,
    info: &mut LoginInfo,
    direct: bool,
) -> Result<Option<LoggedIn>, SessionError> {
    let shared = &proxy.shared;
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
                        send(client, b"S").await?;
                        // Bytes sent before the handshake would be read as if encrypted
                        // (CVE-2021-23214): refuse them.
                        if !buf.is_empty() {
                            return Err(SessionError::refused(
                                SqlState::PROTOCOL_VIOLATION,
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
                crate::upstream::forward_cancel(shared, config, pid, key).await;
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
            SqlState::INVALID_AUTHORIZATION,
            "gprxy: TLS is required (use sslmode=require or stronger)",
        ));
    }

    let fallback = proxy.fallback.read().clone();
    let session = match fallback {
        Some(fallback) => LoggedIn::Pooled(Box::new(
            crate::fallback::log_in(shared, config, fallback, client, &startup, buf, info).await?,
        )),
        None => {
            LoggedIn::Direct(crate::passthrough::log_in(shared, config, client, &startup, buf, info).await?)
        }
    };
    Ok(Some(session))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::duplex::pair;

    /// A proxy in pass-through mode (its upstream is never reached by these tests).
    fn proxy(with_tls: bool, require_tls: bool) -> Arc<Proxy> {
        let overrides =
            crate::config::Overrides { upstream: Some("127.0.0.1:9".into()), ..Default::default() };
        let mut config = Config::load(None, &overrides).unwrap();
        config.require_tls = require_tls;
        let proxy = crate::server::proxy(config).unwrap();
        if with_tls {
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            let key = rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
            let tls = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(vec![cert.cert.der().clone()], key)
                .unwrap();
            *proxy.shared.tls.write() = Some(Arc::new(tls));
        }
        proxy
    }

    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

    async fn log_in(
        proxy: &Proxy,
        client_end: &mut BoxStream,
    ) -> (Result<Option<LoggedIn>, SessionError>, LoginInfo) {
        let config = proxy.shared.config.read().clone();
        let mut info = LoginInfo::default();
        // Every case here ends at once; one that waits (say, for a TLS handshake) is a failure.
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            login(proxy, &config, client_end, &mut info, false),
        )
        .await
        .expect("the login ended without waiting");
        (r, info)
    }

    /// Bytes sent behind an SSLRequest would be read as if they came through TLS
    /// (CVE-2021-23214): the client gets `S`, then the refusal, and no handshake starts.
    #[tokio::test]
    async fn bytes_after_an_ssl_request_are_refused() {
        let proxy = proxy(true, false);
        let (mut client_end, mut client) = pair();
        let mut early = SSL_REQUEST.to_vec();
        early.extend_from_slice(b"Q\0\0\0\x0dSELECT 1\0");
        send(&mut client, &early).await.unwrap();
        let (r, info) = log_in(&proxy, &mut client_end).await;
        let e = r.err().unwrap();
        assert_eq!(
            e.client_message(),
            Some((SqlState::PROTOCOL_VIOLATION, "gprxy: unexpected data after SSLRequest".to_owned()))
        );
        assert!(!info.tls);
        let mut answer = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut answer).await.unwrap();
        assert_eq!(&answer, b"S");
    }

    /// Without TLS configured, SSLRequest and GSSENCRequest are answered `N` and the startup
    /// packet follows in plain text; with `require_tls` that login is then refused.
    #[tokio::test]
    async fn encryption_requests_without_tls_get_n_and_require_tls_refuses() {
        let proxy = proxy(false, true);
        let (mut client_end, mut client) = pair();
        let mut startup = BytesMut::new();
        postgres_protocol::message::frontend::startup_message([("user", "alice")], &mut startup).unwrap();
        let mut packets = SSL_REQUEST.to_vec();
        packets.extend_from_slice(&GSSENC_REQUEST);
        packets.extend_from_slice(&startup);
        send(&mut client, &packets).await.unwrap();
        let (r, info) = log_in(&proxy, &mut client_end).await;
        let e = r.err().unwrap();
        assert_eq!(
            e.client_message(),
            Some((
                SqlState::INVALID_AUTHORIZATION,
                "gprxy: TLS is required (use sslmode=require or stronger)".to_owned()
            ))
        );
        assert_eq!(info.user, "alice");
        let mut answers = [0u8; 2];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut answers).await.unwrap();
        assert_eq!(&answers, b"NN");
    }

    /// A malformed first packet ends that connection with a protocol violation.
    #[tokio::test]
    async fn a_malformed_startup_packet_is_a_protocol_violation() {
        let proxy = proxy(false, false);
        let (mut client_end, mut client) = pair();
        send(&mut client, &[0, 0, 0, 3]).await.unwrap();
        let (r, _) = log_in(&proxy, &mut client_end).await;
        let response = r.err().unwrap().to_client().unwrap();
        let m = proto::parse_message(&mut BytesMut::from(&response[..]), 1 << 16, "error").unwrap().unwrap();
        let (code, message) = proto::error_fields(&m);
        assert_eq!(code, "08P01");
        assert!(message.starts_with("gprxy: "), "{message}");
    }

    /// A session's future is allocated once and held for as long as the session runs, so what
    /// only the login needs is boxed and freed when the login ends (it was 5.9 KiB unboxed).
    #[tokio::test]
    async fn a_running_session_holds_under_3_kib_of_future_state() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let overrides =
            crate::config::Overrides { upstream: Some("127.0.0.1:5432".into()), ..Default::default() };
        let proxy = crate::server::proxy(crate::config::Config::load(None, &overrides).unwrap()).unwrap();
        let session = super::handle(proxy, sock, "127.0.0.1:1".parse().unwrap());
        assert!(std::mem::size_of_val(&session) < 3 * 1024, "{} bytes", std::mem::size_of_val(&session));
    }
}
