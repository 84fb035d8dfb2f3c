//! Reaching the database server: a new server connection (TCP, TLS or a Unix socket) and
//! forwarding a client's cancel request to the server process it names.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::config::Config;
use crate::conn::{BoxStream, CancelKey, SessionError, Shared};
use crate::proto::{self, SqlState};

/// A new connection to the server, TLS when configured.
pub async fn connect(shared: &Shared, config: &Config) -> Result<BoxStream, SessionError> {
    let unreachable = |e: String| {
        shared.metrics.upstream_errors.inc();
        warn!(upstream = %config.upstream, error = %e, "cannot reach the server");
        SessionError::refused(SqlState::CONNECTION_FAILURE, "gprxy: cannot reach the database server")
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
    start_tls(tcp, tls, &up_cfg.server_name).await.map_err(unreachable)
}

/// Asks the server for TLS (SSLRequest) and makes the handshake, verifying the server's
/// certificate for `server_name`. The error says what failed, for the log.
pub async fn start_tls(
    mut tcp: TcpStream,
    tls: std::sync::Arc<rustls::ClientConfig>,
    server_name: &str,
) -> Result<BoxStream, String> {
    let mut ssl_request = bytes::BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut ssl_request);
    tcp.write_all(&ssl_request).await.map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
    if answer[0] != b'S' {
        return Err("server refused TLS".into());
    }
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|_| format!("bad server name {server_name:?}"))?;
    let s =
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    Ok(Box::new(s))
}

/// Forwards a cancel request whose key belongs to a live session to that session's server
/// process; one with an unknown key is dropped (logged).
pub async fn forward_cancel(shared: &Shared, config: &Config, pid: i32, key: Vec<u8>) {
    let Some(server_key) = shared.cancel_keys.get(&(pid, key)) else {
        info!(event = "cancel", pid, outcome = "dropped", "cancel request with an unknown key dropped");
        return;
    };
    match cancel(shared, config, &server_key).await {
        Ok(()) => info!(event = "cancel", pid, outcome = "forwarded", "cancel request forwarded"),
        Err(e) => warn!(event = "cancel", pid, error = %e, "cancel request not forwarded"),
    }
}

/// Sends a CancelRequest for the server process `key` names, and waits (5 s at most) until
/// the server closes that connection: by then the process has been signalled.
pub async fn cancel(shared: &Shared, config: &Config, key: &CancelKey) -> Result<(), SessionError> {
    let mut up = connect(shared, config).await?;
    up.write_all(&proto::encode_cancel(key.0, &key.1)).await?;
    up.flush().await?;
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), up.read(&mut sink)).await;
    Ok(())
}
