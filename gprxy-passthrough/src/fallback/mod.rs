//! Fallback mode, for servers older than 18: gprxy validates the token itself (gprxy-core),
//! maps the token's roles to a service account (first rule wins, default deny), logs in upstream
//! with SCRAM-SHA-256 and sets the user's context before the client's first query: plain
//! `app.*` settings and, recommended, a context signed for that server connection which only
//! gprxy_validator's `gprxy.set_context` accepts (see `gprxy_core::context`).

mod account_login;
mod intake;
pub mod pool;
pub(crate) mod reap;
mod setup;

use std::sync::Arc;

use bytes::BytesMut;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::config::{toml_name, ClientAuth, Config, Fallback as Settings, UserMatch};
use crate::conn::{send_ready, BoxStream, CancelKey, LoginInfo, SessionError, Shared};
use crate::lifetime::{relay_watched, ProxyMode, RelayEnd, SessionEnd, TokenOwner};
use crate::proto::{self, BackendMessage, SqlState, Startup};
use crate::track::Tracker;
use pool::{Lease, Pools, ServerConn};

/// One trusted issuer at run time: its policy, its key cache and its validator.
pub struct Issuer {
    /// Its checked policy.
    pub entry: gprxy_core::IssuerPolicy,
    /// Its keys (never another issuer's).
    pub cache: Arc<gprxy_core::JwksCache>,
    /// Its token validator.
    pub validator: gprxy_core::Validator,
    /// Its introspection endpoint and answers (`introspect`, `jwt+introspect`).
    pub introspector: Option<Arc<gprxy_core::Introspector>>,
}

/// Introspection answers kept per issuer (each at most 4 KB of claims).
const ANSWERS_KEPT: usize = 10_000;

/// Fallback mode's settings with what outlives connections: each issuer's key cache and
/// validator, and the pools.
pub struct Fallback {
    /// Settings.
    pub cfg: Settings,
    /// The trusted issuers, in configuration order.
    pub issuers: Vec<Issuer>,
    /// Server connections by (database, account).
    pub pools: Pools,
}

impl Fallback {
    /// Builds it (no network yet: keys are fetched on first use).
    pub fn new(cfg: Settings) -> anyhow::Result<Self> {
        let spelled = |e: gprxy_core::ConfigError| anyhow::anyhow!(e.spelled(toml_name));
        let mut issuers = Vec::new();
        for entry in cfg.issuers.iter() {
            let http = gprxy_core::HttpSettings {
                insecure_allow_http_loopback: cfg.insecure_allow_http_loopback,
                ca_file: entry.ca_file.clone(),
                ..Default::default()
            };
            let fetcher = Arc::new(gprxy_core::UreqFetcher::new(http).map_err(spelled)?);
            let introspector = entry.introspection.clone().map(|settings| {
                let answers = gprxy_core::MemoryAnswers::new(ANSWERS_KEPT, settings.stale_ok_secs);
                Arc::new(gprxy_core::Introspector::new(
                    entry.issuer(),
                    settings,
                    fetcher.clone(),
                    Arc::new(answers),
                ))
            });
            let cache = gprxy_core::JwksCache::new(
                entry.source.clone(),
                fetcher,
                Arc::new(gprxy_core::SystemClock),
                entry.cache.clone(),
                cfg.insecure_allow_http_loopback,
            )
            .map_err(spelled)?;
            issuers.push(Issuer {
                validator: gprxy_core::Validator::new(entry.policy.clone()),
                cache: Arc::new(cache),
                entry: entry.clone(),
                introspector,
            });
        }
        if let Some(key) = &cfg.context_key {
            tracing::info!(
                event = "context_key",
                public_key = key.public_key(),
                "signed context: pin this public key in gprxy.context_keys"
            );
        }
        if cfg.insecure_allow_http_loopback {
            tracing::warn!("fallback.insecure_allow_http_loopback is on: plain-HTTP issuers on loopback are trusted (tests only)");
        }
        Ok(Self { issuers, pools: Pools::new(cfg.pool.clone()), cfg })
    }

    /// The issuer of exactly this name.
    pub fn issuer(&self, name: &str) -> Option<&Issuer> {
        self.issuers.iter().find(|i| i.entry.issuer() == name)
    }
}

/// A refused login (28000) with this message for the client.
fn refused(message: impl Into<String>) -> SessionError {
    SessionError::refused(SqlState::INVALID_AUTHORIZATION, message)
}

/// The service account's login failed; `what` only reaches the log.
fn upstream_failed(what: &str) -> SessionError {
    tracing::warn!(error = what, "fallback: upstream login failed");
    SessionError::refused(SqlState::CONNECTION_FAILURE, "gprxy: the service account could not log in")
}

/// A claim as a session setting value: strings as they are, arrays comma-joined, missing empty.
fn setting_value(claims: &serde_json::Map<String, Value>, claim: &str) -> String {
    let path = gprxy_core::claims::ClaimPath::parse(claim).ok();
    match path.and_then(|p| p.lookup(claims).cloned()) {
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Authenticates the client with its token and logs in upstream as the mapped account.
pub async fn log_in(
    shared: &Shared,
    config: &Config,
    fallback: Arc<Fallback>,
    client: &mut BoxStream,
    startup: &Startup,
    mut cbuf: BytesMut,
    info: &mut LoginInfo,
) -> Result<PooledSession, SessionError> {
    // Pooled sessions speak protocol 3.0 (the server connections do).
    if let Some(npv) = proto::negotiate_protocol_version(startup) {
        client.write_all(&npv).await?; // flushed with the first authentication request
    }
    let token = match fallback.cfg.client_auth {
        ClientAuth::Password => intake::password_token(client, &mut cbuf, info).await?,
        ClientAuth::OAuthBearer => {
            // libpq's device flow is sent to the first issuer.
            // (its metadata URL when it was configured as one).
            let issuer = fallback
                .issuers
                .first()
                .map_or("", |i| i.entry.metadata_url.as_deref().unwrap_or(i.entry.issuer()));
            let scope = fallback.cfg.scope.as_str();
            intake::bearer_token(client, &mut cbuf, info, issuer, scope).await?
        }
    };
    info.note_token(&token);

    let iss = info.token.as_ref().and_then(|t| t.iss.clone());
    let (t, issuer) = intake::validate(&fallback, token, iss.as_deref())
        .await
        .map_err(|e| intake::token_refused(info, &e))?;
    // The issuer's role map (if any) names the roles the account map sees.
    let entry = &fallback.issuers[issuer].entry;
    let roles = entry.mapped_roles(&t.roles);
    let account = fallback
        .cfg
        .map
        .iter()
        .find(|rule| rule.issuer.as_deref().is_none_or(|i| i == entry.issuer()) && roles.contains(&rule.role))
        .map(|rule| rule.account.clone())
        .ok_or_else(|| refused("gprxy: no role in the token maps to a service account"))?;
    let user = startup.param("user").unwrap_or_default();
    let expected = match fallback.cfg.user_must_match {
        UserMatch::Identity => t.identity.as_str(),
        UserMatch::Account => account.as_str(),
    };
    if user != expected {
        return Err(refused(format!("gprxy: user name {user:?} does not match the token")));
    }

    let end = SessionEnd::plan(
        &config.session,
        ProxyMode::Fallback,
        u64::try_from(t.expires_at).ok(),
        TokenOwner {
            sub: t.subject.clone(),
            iss: Some(t.issuer.clone()),
            token_fp: Some(t.fingerprint.clone()),
        },
    );
    // A token inside the leeway past its exp would be let in only to be ended at once: refused
    // at login, as the validator does.
    if let Some(message) = end.as_ref().and_then(SessionEnd::refusal_at_login) {
        info.detail = Some("the session's end is already due (token inside the leeway)".into());
        return Err(refused(message));
    }
    let context_end = end.as_ref().map(SessionEnd::context_end);
    let database = startup.param("database").unwrap_or(user).to_owned();
    let client_settings = setup::client_settings(startup, &fallback.cfg.context).map_err(refused)?;
    let mut lease = fallback.pools.checkout(&shared.metrics, &database, &account).await?;
    let mut settings = client_settings;
    // The role claim's setting holds the roles after the issuer's role map, as gprxy.roles() does.
    let role_claim = entry.policy.role_claim();
    settings.extend(fallback.cfg.context.iter().map(|(k, c)| {
        let value =
            if Some(c.as_str()) == role_claim { roles.join(",") } else { setting_value(&t.claims, c) };
        (k.clone(), value)
    }));
    let login = async || {
        let password = fallback.cfg.passwords.get(&account).map(String::as_str).unwrap_or_default();
        account_login::log_in(shared, config, &account, &database, password, fallback.cfg.context_key.clone())
            .await
    };
    let (mut conn, reused) = match lease.conn.take() {
        Some(c) => (c, true),
        None => match login().await {
            Ok(c) => (c, false),
            Err(e) => {
                // A pool that never logged in (a database that does not exist) is not kept.
                drop(lease);
                fallback.pools.forget_unused(&database, &account);
                return Err(e);
            }
        },
    };
    // It logged in (the database exists): its gauges are exported.
    lease.admit(&shared.metrics, &database, &account);
    let mut sbuf = BytesMut::new();
    let reports = match setup::prepare(&mut conn, &mut sbuf, &settings, &t, &roles, context_end.clone()).await
    {
        // An idle connection that died unnoticed, or was not in step: one fresh login, once.
        Err(e) if reused && setup::connection_failed(&e) => {
            tracing::info!(event = "pool", action = "replace", "pooled server connection failed at set-up");
            conn = login().await?;
            sbuf.clear();
            setup::prepare(&mut conn, &mut sbuf, &settings, &t, &roles, context_end).await?
        }
        r => r?,
    };
    // The end may have come while the login waited for a server connection: refused now, as a
    // token inside the leeway is, rather than let in to be ended at once.
    if let Some(message) = end.as_ref().and_then(SessionEnd::refusal_at_login) {
        info.detail = Some("the session's end came while it waited for a server connection".into());
        if let Some(doomed) = lease.give_back(conn, true).await {
            let password = fallback.cfg.passwords.get(&account).map(String::as_str).unwrap_or_default();
            Box::pin(reap::end_backend(shared, &account, &database, password, doomed)).await;
        }
        return Err(refused(message));
    }
    // The client gets a cancel key of its own for this session, never the server connection's.
    let client_key = conn.key.as_ref().map(|k| session_cancel_key(k.0)).transpose()?;
    let mut to_client = BackendMessage::AuthenticationOk.to_bytes();
    to_client.extend_from_slice(&conn.startup_reply);
    if let Some((pid, secret)) = &client_key {
        BackendMessage::BackendKeyData { pid: *pid, secret }.encode(&mut to_client);
    }
    to_client.extend_from_slice(&reports);
    BackendMessage::ReadyForQuery(b'I').encode(&mut to_client);
    send_ready(&shared.cancel_keys, client, &to_client, client_key.as_ref(), conn.key.as_ref()).await?;
    tracing::info!(
        event = "fallback_mapped",
        account = account.as_str(),
        identity = t.identity.as_str(),
        "token mapped to service account"
    );
    Ok(PooledSession {
        lease,
        conn,
        client_key,
        end,
        leftover_client: cbuf,
        leftover_server: sbuf,
        account,
        database,
        fallback: fallback.clone(),
    })
}

/// A logged-in pooled session: its server connection, whole, and the lease it goes back
/// through.
pub struct PooledSession {
    lease: Lease,
    conn: ServerConn,
    /// The cancel key the client holds (registered in `Shared::cancel_keys`).
    client_key: Option<CancelKey>,
    /// When the session ends by the session policy, if it does.
    end: Option<SessionEnd>,
    leftover_client: BytesMut,
    leftover_server: BytesMut,
    /// The service account and database (a backend given up is ended as that account).
    account: String,
    database: String,
    /// Where the account's password is.
    fallback: Arc<Fallback>,
}

impl PooledSession {
    /// Relays until the client leaves or the session's end comes, then returns the server
    /// connection to the pool it came from (reset, or closed when not clean), even if a reload
    /// replaced the pools. A session ended while busy is first brought back to idle.
    pub async fn run(mut self, shared: &Shared, client: &mut BoxStream) {
        let to_server = std::mem::take(&mut self.leftover_client);
        let to_client = std::mem::take(&mut self.leftover_server);
        let mut track = Tracker::default();
        let relay = relay_watched(
            &shared.metrics,
            client,
            &mut self.conn.stream,
            to_server,
            to_client,
            &mut track,
            self.end.as_ref(),
        );
        let relay_end = Box::pin(relay).await;
        if let Some(k) = &self.client_key {
            shared.cancel_keys.remove(k);
        }
        let clean = match relay_end {
            // A client that left with requests unanswered: they are cancelled and the connection
            // settled as after a forced end (a message cut in half cannot be settled).
            RelayEnd::ClientLeft => {
                track.clean()
                    || (track.client_between_messages()
                        && Box::pin(pool::settle(shared, &mut self.conn, &mut track, BytesMut::new())).await)
            }
            RelayEnd::Broken => false,
            RelayEnd::Ended { ending, server_in_step, server_leftover } => {
                if let Some(end) = &self.end {
                    end.record(&shared.metrics, ending);
                }
                // A forced end with a request running ends that server process (a cancel could
                // be caught, and the statement then commit after the end); otherwise the
                // connection is settled and reused.
                let running = track.in_flight() > 0 || track.unsynced();
                server_in_step
                    && !(ending.forced() && running)
                    && Box::pin(pool::settle(shared, &mut self.conn, &mut track, server_leftover)).await
            }
        };
        if let Some(doomed) = Box::pin(self.lease.give_back(self.conn, clean)).await {
            let password =
                self.fallback.cfg.passwords.get(&self.account).map(String::as_str).unwrap_or_default();
            Box::pin(reap::end_backend(shared, &self.account, &self.database, password, doomed)).await;
        }
    }
}

/// A fresh cancel key for one pooled session: the server's process id (as PostgreSQL shows
/// it) and a random 4-byte secret (protocol 3.0).
fn session_cancel_key(pid: i32) -> Result<(i32, Vec<u8>), SessionError> {
    let mut secret = vec![0u8; 4];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| upstream_failed("no randomness for a cancel key"))?;
    Ok((pid, secret))
}
