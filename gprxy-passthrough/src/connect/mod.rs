//! `gprxy connect`: a connector beside the application. The application connects to a local
//! socket with no password; the connector opens the real connection to the server, logs in with
//! a token from the profile's source, and relays bytes from then on.
//!
//! Its modules, each importing only those below it:
//! - [`session`]: one application connection: startup packet, token, server login, relay
//!   (reusing [`crate::proto`], [`crate::relay`], [`crate::upstream`], [`crate::tls`]);
//! - [`listen`]: who may connect (peer credentials on the Unix socket, the kernel's socket
//!   table on loopback TCP);
//! - [`token_source`]: the token sources and the per-profile cache;
//! - [`config`]: the profiles file; [`metrics`]: what `/metrics` shows (served by
//!   [`crate::admin`]).

pub mod config;
pub mod listen;
pub mod metrics;
pub mod session;
pub mod token_source;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::proto::{BackendMessage, SqlState};
use config::Profile;
use session::Ctx;

/// What the accept loops read for each new connection; replaced on SIGHUP.
struct Current {
    ctx: Arc<Ctx>,
    allowed: listen::Allowed,
    keeper: tokio::task::JoinHandle<()>,
}

impl Current {
    fn new(ctx: Ctx) -> anyhow::Result<Self> {
        let allowed = listen::Allowed::new(&ctx.profile.listen)?;
        let ctx = Arc::new(ctx);
        let keeper = tokio::spawn(ctx.tokens.clone().keep_fresh());
        Ok(Self { ctx, allowed, keeper })
    }
}

/// Reads the profile again for SIGHUP. Listener settings cannot change while running (the
/// sockets are bound): a file that changes them is refused, as is one that does not load.
fn reload(path: &std::path::Path, name: &str, old: &Ctx) -> anyhow::Result<Ctx> {
    let cfg = config::ConnectConfig::load(path)?;
    let profile = cfg.profile(Some(name))?.clone();
    let (a, b) = (&profile.listen, &old.profile.listen);
    if (&a.unix_dir, a.port, a.tcp, a.metrics) != (&b.unix_dir, b.port, b.tcp, b.metrics) {
        anyhow::bail!(
            "listen.unix_dir, listen.port, listen.tcp and listen.metrics cannot change while running: restart gprxy connect"
        );
    }
    Ctx::new_sharing(profile, old)
}

/// Runs the connector for one profile of the file at `path` until SIGINT or SIGTERM; SIGHUP
/// reads the profile again (new connections use it; sessions keep theirs).
pub async fn run(path: std::path::PathBuf, profile: Profile) -> anyhow::Result<()> {
    let name = profile.name.clone();
    let listen = profile.listen.clone();
    let current = Arc::new(parking_lot::RwLock::new(Current::new(Ctx::new(profile)?)?));
    let own = config::own_uid()?;
    let unix = listen::bind_unix(&listen, own)?;
    let socket_path = listen.socket_path();
    let tcp = match listen.tcp {
        Some(addr) => Some(listen::bind_tcp(addr).await?),
        None => None,
    };
    if let Some(addr) = listen.metrics {
        let l = listen::bind_tcp(addr).await?;
        tokio::spawn(crate::admin::serve(l, current.read().ctx.metrics.clone()));
    }
    {
        let c = current.read();
        info!(event = "listening", profile = %name, socket = %socket_path.display(),
              tcp = %listen.tcp.map(|a| a.to_string()).unwrap_or_default(), upstream = %c.ctx.profile.upstream,
              source = c.ctx.tokens.kind(), "gprxy connect is ready");
    }
    let open = Open::default();
    let unix_loop = {
        let current = current.clone();
        let open = open.clone();
        async move {
            loop {
                let (s, _) = match unix.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        crate::conn::accept_failed(&e).await;
                        continue;
                    }
                };
                let uid = listen::unix_peer_uid(&s).ok();
                let (ctx, allowed) = {
                    let c = current.read();
                    (c.ctx.clone(), c.allowed.clone())
                };
                tokio::spawn(admit(ctx, allowed, open.clone(), Box::new(s), uid, "unix", "unix".to_owned()));
            }
        }
    };
    let tcp_loop = {
        let current = current.clone();
        async move {
            let Some(tcp) = tcp else { return std::future::pending::<()>().await };
            loop {
                let (s, peer) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        crate::conn::accept_failed(&e).await;
                        continue;
                    }
                };
                let ours = s.local_addr().ok();
                let _ = s.set_nodelay(true);
                let (ctx, allowed) = {
                    let c = current.read();
                    (c.ctx.clone(), c.allowed.clone())
                };
                let open = open.clone();
                tokio::spawn(async move {
                    // Read while the peer's socket is surely in the table: it has just connected.
                    let uid = ours.and_then(|o| listen::tcp_peer_uid(peer, o));
                    admit(ctx, allowed, open, Box::new(s), uid, "tcp", format!("tcp {peer}")).await;
                });
            }
        }
    };
    let reloads = {
        let current = current.clone();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        async move {
            while hup.recv().await.is_some() {
                let old = current.read().ctx.clone();
                match reload(&path, &name, &old).and_then(Current::new) {
                    Ok(new) => {
                        info!(event = "reload", outcome = "ok", upstream = %new.ctx.profile.upstream,
                              source = new.ctx.tokens.kind(), "profile reloaded");
                        let old = std::mem::replace(&mut *current.write(), new);
                        old.keeper.abort();
                    }
                    Err(e) => {
                        warn!(event = "reload", outcome = "refused", error = %e, "reload refused; the profile in force stays")
                    }
                }
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = unix_loop => {}
        () = tcp_loop => {}
        () = reloads => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    current.read().keeper.abort();
    let _ = std::fs::remove_file(&socket_path);
    info!(event = "stopped", "gprxy connect stopped");
    Ok(())
}

/// The application connections open now, over both listeners: each is a server backend.
#[derive(Clone, Default)]
struct Open(Arc<AtomicUsize>);

/// One of them; given back when dropped (the session ended, however it ended).
struct Slot(Arc<AtomicUsize>);

impl Open {
    /// A slot, unless `max` are taken.
    fn take(&self, max: usize) -> Option<Slot> {
        self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(self.0.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One accepted connection: another OS user's is refused; one beyond `max_connections` is
/// refused with `too_many_connections` after its startup packet, unless it is a cancel request,
/// which is forwarded (only allowed users' connections count: another user cannot fill the
/// connector); else the session, holding its slot while it may have a server backend.
async fn admit(
    ctx: Arc<Ctx>,
    allowed: listen::Allowed,
    open: Open,
    mut s: crate::conn::BoxStream,
    uid: Option<u32>,
    listener: &'static str,
    peer: String,
) {
    match uid {
        Some(u) if allowed.permits(u) => {
            let Some(slot) = open.take(ctx.profile.max_connections) else {
                if session::cancel_at_limit(&ctx, &mut s).await {
                    return;
                }
                ctx.metrics.refused_at_limit.inc();
                warn!(
                    event = "connect_refused",
                    listener,
                    uid = i64::from(u),
                    reason = "max_connections",
                    "connection refused: max_connections are open"
                );
                let message =
                    "gprxy connect: too many connections: this connector's max_connections are open";
                send_error(&mut s, SqlState::TOO_MANY_CONNECTIONS, message).await;
                return;
            };
            session::handle(ctx, s, format!("{peer} uid {u}"), slot).await;
        }
        _ => {
            ctx.metrics.refused_peers.get_or_create(&metrics::ListenerLabels { listener }).inc();
            refuse(&mut s, uid, listener).await;
        }
    }
}

/// Refuses a connection from another OS user with an ErrorResponse.
async fn refuse(s: &mut crate::conn::BoxStream, uid: Option<u32>, listener: &str) {
    let who = uid.map_or_else(|| "an unknown user".to_owned(), |u| format!("OS user {u}"));
    warn!(
        event = "connect_refused",
        listener,
        uid = uid.map(i64::from).unwrap_or(-1),
        "connection from another OS user refused"
    );
    let message = format!("gprxy connect: connections from {who} are not allowed on this connector");
    send_error(s, SqlState::INVALID_AUTHORIZATION, &message).await;
}

/// Refuses a connection before its session: one ErrorResponse, then the end.
async fn send_error(s: &mut crate::conn::BoxStream, sqlstate: SqlState, message: &str) {
    let _ = s.write_all(&BackendMessage::ErrorResponse { sqlstate, message }.to_bytes()).await;
    let _ = s.shutdown().await;
}

/// `gprxy connect --check`: fetches a token and logs in once as the profile's user, printing
/// each step (never the token) to `out`.
pub async fn check(profile: Profile, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let ctx = Ctx::new(profile)?;
    let p = &ctx.profile;
    let _ = writeln!(out, "profile {}: upstream {}, {}", p.name, p.upstream, listen::describe(&p.listen));
    let (fetched, _) =
        ctx.tokens.get().await.map_err(|e| anyhow::anyhow!("token ({}): {e}", ctx.tokens.kind()))?;
    let who = gprxy_core::peek_unverified(fetched.token.expose());
    let left = fetched.expires_at.map_or_else(
        || "unknown expiry".to_owned(),
        |e| format!("expires in {} s", e - gprxy_core::unix_time()),
    );
    let _ = writeln!(
        out,
        "token ({}): fingerprint {}, sub {}, iss {}, {left}",
        ctx.tokens.kind(),
        fetched.token.fingerprint(),
        who.sub.as_deref().unwrap_or("(none)"),
        who.iss.as_deref().unwrap_or("(none)")
    );
    let (Some(user), database) = (p.user.clone(), p.database.clone()) else {
        anyhow::bail!("--check needs the profile's user (user = \"...\") to log in as");
    };
    let mut params = vec![("user".to_owned(), user.clone())];
    if let Some(d) = &database {
        params.push(("database".to_owned(), d.clone()));
    }
    let (up, i) = session::open(&ctx).await.map_err(|e| anyhow::anyhow!("{}", e.describe()))?;
    let upstream = &p.upstreams[i];
    let tls = match &p.tls {
        Some(t) => format!(
            "TLS verified for {}",
            t.server_name.as_deref().or_else(|| config::host_of(upstream)).unwrap_or_default()
        ),
        None => "INSECURE plain TCP (tests only)".to_owned(),
    };
    let mut logged =
        session::log_in(up, ctx.tls.is_some(), p.login, &params, &fetched.token).await.map_err(|e| {
            if let session::LoginError::Server { .. } = e {
                warn!("the server refused the token");
            }
            anyhow::anyhow!("login refused: {}", e.describe())
        })?;
    let _ = writeln!(
        out,
        "logged in as {user} to {} on {upstream} ({tls}, {}); server version {}",
        database.as_deref().unwrap_or(&user),
        logged.mechanism,
        logged.server_version.as_deref().unwrap_or("unknown")
    );
    let mut bye = bytes::BytesMut::new();
    postgres_protocol::message::frontend::terminate(&mut bye);
    let _ = logged.stream.write_all(&bye).await;
    let _ = logged.stream.shutdown().await;
    Ok(())
}

/// `gprxy token --profile P`: a token from the profile's source.
pub async fn token(profile: Profile) -> anyhow::Result<String> {
    let source = token_source::from_spec(&profile.token, profile.refresh_margin_secs);
    let kind = source.kind();
    let fetched = tokio::task::spawn_blocking(move || source.fetch())
        .await?
        .map_err(|e| anyhow::anyhow!("profile {}: token ({kind}): {e}", profile.name))?;
    if let Some(exp) = fetched.expires_at {
        if exp <= gprxy_core::unix_time() {
            warn!("the token has expired");
        }
    }
    Ok(fetched.token.expose().to_owned())
}
