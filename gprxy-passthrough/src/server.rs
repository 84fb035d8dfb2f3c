//! The accept loop: a connection cap, SIGHUP reload and SIGTERM drain.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::{Mutex, RwLock};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket};
use tracing::{info, warn};

use crate::config::{Config, Overrides};
use crate::metrics::Metrics;
use crate::session::{self, Shared};

/// What a configuration needs loaded from disk: TLS material and the fallback runtime.
struct Loaded {
    tls: Option<Arc<rustls::ServerConfig>>,
    upstream_tls: Option<Arc<rustls::ClientConfig>>,
    fallback: Option<crate::fallback::FallbackRuntime>,
}

impl Loaded {
    fn from(config: &Config) -> anyhow::Result<Self> {
        let tls = config
            .tls
            .as_ref()
            .map(|t| crate::tls::server_config(&t.cert, &t.key))
            .transpose()
            .context("tls")?;
        let upstream_tls = config
            .upstream_tls
            .as_ref()
            .map(|u| crate::tls::upstream_config(&u.ca_file))
            .transpose()
            .context("upstream_tls")?;
        let fallback = config
            .fallback
            .clone()
            .map(crate::fallback::FallbackRuntime::new)
            .transpose()
            .context("fallback")?;
        Ok(Self { tls, upstream_tls, fallback })
    }
}

/// Builds the shared state (TLS material loaded and checked) from a configuration.
pub fn shared_state(config: Config) -> anyhow::Result<Arc<Shared>> {
    let loaded = Loaded::from(&config)?;
    Ok(Arc::new(Shared {
        config: RwLock::new(Arc::new(config)),
        tls: RwLock::new(loaded.tls),
        upstream_tls: RwLock::new(loaded.upstream_tls),
        cancel_keys: Mutex::new(Default::default()),
        metrics: Metrics::new(),
        fallback: RwLock::new(loaded.fallback.map(Arc::new)),
        draining: AtomicBool::new(false),
    }))
}

/// Re-reads the file and certificates; keeps the old state if anything is wrong.
fn reload(shared: &Shared, path: Option<&PathBuf>, overrides: &Overrides) {
    let result = (|| -> anyhow::Result<()> {
        let config = Config::load(path.map(PathBuf::as_path), overrides)?;
        let loaded = Loaded::from(&config)?;
        let running = shared.config.read().clone();
        if config.listen != running.listen || config.reuse_port != running.reuse_port {
            warn!("listen and reuse_port changes need a restart; keeping the running listener");
        }
        if config.worker_threads != running.worker_threads {
            warn!("limits.worker_threads changes need a restart; keeping the running threads");
        }
        if let (Some(new), Some(old)) = (&loaded.fallback, shared.fallback.read().as_ref()) {
            if let Some(snap) = old.cache.export() {
                let _ = new.cache.import(&snap);
            }
        }
        let old = std::mem::replace(&mut *shared.fallback.write(), loaded.fallback.map(Arc::new));
        if let Some(old) = old {
            tokio::spawn(async move { old.pools.retire().await });
        }
        *shared.tls.write() = loaded.tls;
        *shared.upstream_tls.write() = loaded.upstream_tls;
        *shared.config.write() = Arc::new(config);
        Ok(())
    })();
    match result {
        Ok(()) => info!(event = "reload", "configuration and certificates reloaded"),
        Err(e) => {
            warn!(event = "reload", error = %format!("{e:#}"), "reload failed; keeping the running configuration")
        }
    }
}

/// A listening socket; with `reuse_port`, other processes of the same user may listen on the
/// same address (the kernel spreads new connections over them).
fn bind(addr: std::net::SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A failed accept. Running out of file descriptors or memory makes every accept fail at once
/// until a session ends: wait a little instead of spinning and flooding the log. A connection
/// that died in the backlog is just skipped.
pub(crate) async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted) {
        return;
    }
    warn!(error = %e, "accept failed; pausing 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Runs until SIGTERM or SIGINT, then drains sessions for the grace period.
pub async fn run(
    shared: Arc<Shared>,
    config_path: Option<PathBuf>,
    overrides: Overrides,
) -> anyhow::Result<()> {
    let config = shared.config.read().clone();
    let listener = bind(config.listen, config.reuse_port)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    info!(
        event = "listening",
        listen = %listener.local_addr()?,
        upstream = %config.upstream,
        tls = config.tls.is_some(),
        reuse_port = config.reuse_port,
        "gprxy listening"
    );
    if let Some(admin) = config.admin_listen {
        let l =
            bind(admin, config.reuse_port).with_context(|| format!("cannot listen on {admin} (admin)"))?;
        tokio::spawn(crate::admin::serve(l, shared.clone()));
    }
    // Each session holds a clone: the count tells how many are still running.
    let tracker = Arc::new(());
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (mut sock, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => { accept_failed(&e).await; continue; }
                };
                let _ = sock.set_nodelay(true);
                shared.metrics.connections.inc();
                // Read at each accept, so that a reload applies to the next connection.
                let running = Arc::strong_count(&tracker) - 1;
                if running >= shared.config.read().max_client_connections {
                    shared.metrics.rejected.inc();
                    let msg = crate::proto::error_response("53300", "gprxy: too many client connections");
                    tokio::spawn(async move { let _ = sock.write_all(&msg).await; });
                    continue;
                }
                let shared = shared.clone();
                let guard = tracker.clone();
                tokio::spawn(async move {
                    shared.metrics.active.inc();
                    session::handle(shared.clone(), sock, peer).await;
                    shared.metrics.active.dec();
                    drop(guard);
                });
            }
            _ = hup.recv() => reload(&shared, config_path.as_ref(), &overrides),
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(listener);
    shared.draining.store(true, Ordering::Relaxed);
    let grace = shared.config.read().shutdown_grace;
    info!(
        sessions = Arc::strong_count(&tracker) - 1,
        grace_ms = grace.as_millis() as u64,
        "shutting down: no new connections"
    );
    let deadline = tokio::time::Instant::now() + grace;
    while Arc::strong_count(&tracker) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    info!(left = Arc::strong_count(&tracker) - 1, "stopped");
    Ok(())
}
