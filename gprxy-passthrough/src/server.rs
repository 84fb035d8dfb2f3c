//! The accept loop: a cap on sessions (a semaphore), SIGHUP reload and SIGTERM drain.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use parking_lot::RwLock;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::{Config, Overrides};
use crate::conn::{accept_failed, CancelKeys, Shared};
use crate::fallback::Fallback;
use crate::metrics::Metrics;
use crate::proto::{BackendMessage, SqlState};
use crate::session::{self, Proxy};

/// What a configuration needs loaded from disk: TLS material and the fallback runtime.
struct Loaded {
    tls: Option<Arc<rustls::ServerConfig>>,
    upstream_tls: Option<Arc<rustls::ClientConfig>>,
    fallback: Option<Fallback>,
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
        let fallback = config.fallback.clone().map(Fallback::new).transpose().context("fallback")?;
        Ok(Self { tls, upstream_tls, fallback })
    }
}

/// Checks what `serve` loads from disk for a configuration, with no network: TLS files, the
/// fallback key cache's bounds and the issuer URL's scheme (`gprxy check-config`).
pub fn check(config: &Config) -> anyhow::Result<()> {
    Loaded::from(config).map(|_| ())
}

/// Builds the proxy's state (TLS material loaded and checked) from a configuration.
pub fn proxy(config: Config) -> anyhow::Result<Arc<Proxy>> {
    let loaded = Loaded::from(&config)?;
    Ok(Arc::new(Proxy {
        shared: Shared {
            config: RwLock::new(Arc::new(config)),
            tls: RwLock::new(loaded.tls),
            upstream_tls: RwLock::new(loaded.upstream_tls),
            cancel_keys: CancelKeys::default(),
            metrics: Metrics::new(),
            draining: AtomicBool::new(false),
        },
        fallback: RwLock::new(loaded.fallback.map(Arc::new)),
    }))
}

/// Re-reads the file and certificates; keeps the old state if anything is wrong.
fn reload(proxy: &Proxy, path: Option<&PathBuf>, overrides: &Overrides) {
    let shared = &proxy.shared;
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
        if let (Some(new), Some(old)) = (&loaded.fallback, proxy.fallback.read().as_ref()) {
            // Each issuer keeps its keys across the reload (an issuer's only; a key set file is
            // read again, see JwksCache::import).
            for issuer in &new.issuers {
                if let Some(snap) = old.issuer(issuer.entry.issuer()).and_then(|o| o.cache.export()) {
                    let _ = issuer.cache.import(&snap);
                }
            }
        }
        let old = std::mem::replace(&mut *proxy.fallback.write(), loaded.fallback.map(Arc::new));
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

/// The cap on running sessions: `limits.max_client_connections` permits. A reload that raises
/// the cap adds permits at once; one that lowers it takes permits back as sessions end.
struct SessionLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl SessionLimit {
    fn new(max: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(max)), max }
    }

    fn resize(&mut self, max: usize) {
        if max > self.max {
            self.permits.add_permits(max - self.max);
        } else if max < self.max {
            let (permits, fewer) = (self.permits.clone(), u32::try_from(self.max - max).unwrap_or(u32::MAX));
            tokio::spawn(async move {
                if let Ok(taken) = permits.acquire_many_owned(fewer).await {
                    taken.forget();
                }
            });
        }
        self.max = max;
    }

    /// Waits until every session has ended, or `deadline`.
    async fn drain(&self, deadline: tokio::time::Instant) {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout_at(deadline, self.permits.acquire_many(all)).await;
    }
}

/// Runs until SIGTERM or SIGINT, then drains sessions for the grace period.
pub async fn run(
    proxy: Arc<Proxy>,
    config_path: Option<PathBuf>,
    overrides: Overrides,
) -> anyhow::Result<()> {
    let shared = &proxy.shared;
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
        tokio::spawn(crate::admin::serve(l, proxy.clone()));
    }
    // Both listeners are bound: systemd (Type=notify) may start what depends on gprxy.
    crate::notify::notify("READY=1");
    let mut limit = SessionLimit::new(config.max_client_connections);
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
                let Ok(permit) = limit.permits.clone().try_acquire_owned() else {
                    shared.metrics.rejected.inc();
                    let msg = BackendMessage::ErrorResponse {
                        sqlstate: SqlState::TOO_MANY_CONNECTIONS,
                        message: "gprxy: too many client connections",
                    }
                    .to_bytes();
                    tokio::spawn(async move { let _ = sock.write_all(&msg).await; });
                    continue;
                };
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    proxy.shared.metrics.active.inc();
                    session::handle(proxy.clone(), sock, peer).await;
                    proxy.shared.metrics.active.dec();
                    drop(permit);
                });
            }
            _ = hup.recv() => {
                reload(&proxy, config_path.as_ref(), &overrides);
                limit.resize(shared.config.read().max_client_connections);
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(listener);
    shared.draining.store(true, Ordering::Relaxed);
    crate::notify::notify("STOPPING=1");
    let grace = shared.config.read().shutdown_grace;
    info!(
        sessions = shared.metrics.active.get(),
        grace_ms = grace.as_millis() as u64,
        "shutting down: no new connections"
    );
    let deadline = tokio::time::Instant::now() + grace;
    limit.drain(deadline).await;
    info!(left = shared.metrics.active.get(), "stopped");
    Ok(())
}
