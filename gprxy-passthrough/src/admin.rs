//! The admin listener: `GET /metrics` (Prometheus text format) and `GET /healthz`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::conn::accept_failed;
use crate::session::Proxy;

/// Admin connections served at once; more are closed at accept, so that a flood of them cannot
/// use up the file descriptors that client sessions need.
const MAX_ADMIN_CONNECTIONS: usize = 16;

/// Serves until the process ends. Requests are read up to 4 KiB; anything else is 404.
/// `/healthz` answers 503 `draining` once SIGTERM has stopped new connections.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                accept_failed(&e).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else { continue };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while n < buf.len() {
                    let m = sock.read(&mut buf[n..]).await?;
                    if m == 0 {
                        break;
                    }
                    n += m;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line = String::from_utf8_lossy(&buf[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = match (line.starts_with("GET "), path) {
                (true, "/metrics") => ("200 OK", "text/plain; version=0.0.4", proxy.shared.metrics.render()),
                (true, "/healthz") if proxy.shared.draining.load(Ordering::Relaxed) => {
                    ("503 Service Unavailable", "text/plain", "draining\n".to_owned())
                }
                (true, "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
