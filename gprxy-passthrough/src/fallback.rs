//! Fallback mode, for servers older than 18: gprxy validates the token itself (gprxy-core),
//! maps the token's roles to a service account (first rule wins, default deny), logs in upstream
//! with SCRAM-SHA-256 and sets the user's context before the client's first query: plain
//! `app.*` settings and, recommended, a context signed for that server connection which only
//! gprxy_validator's `gprxy.set_context` accepts (see `gprxy_core::context`).

use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::config::{ClientAuth, Config, Fallback, UserMatch};
use crate::pool::{Pools, ServerConn};
use crate::proto::{self, auth, ProtoError, Startup};
use crate::session::{read_message, BoxStream, LoginInfo, Pooled, SessionError, Shared, Upstream};
use gprxy_core::context::{ContextKey, ContextSigner};

/// Fallback settings with the key cache that outlives connections.
pub struct FallbackRuntime {
    /// Settings.
    pub cfg: Fallback,
    /// The issuer's keys.
    pub cache: Arc<gprxy_core::JwksCache>,
    /// The token validator.
    pub validator: gprxy_core::Validator,
    /// Server connections by (database, account).
    pub pools: Pools,
}

impl FallbackRuntime {
    /// Builds the runtime (no network yet: keys are fetched on first use).
    pub fn new(cfg: Fallback) -> anyhow::Result<Self> {
        let http = gprxy_core::HttpSettings {
            insecure_allow_http_loopback: cfg.insecure_allow_http_loopback,
            ..Default::default()
        };
        let fetcher = Arc::new(gprxy_core::UreqFetcher::new(http)?);
        let cache = Arc::new(gprxy_core::JwksCache::new(
            cfg.source.clone(),
            fetcher,
            Arc::new(gprxy_core::SystemClock),
            cfg.keys.clone(),
            cfg.insecure_allow_http_loopback,
        )?);
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
        Ok(Self {
            validator: gprxy_core::Validator::new(cfg.policy.clone()),
            pools: Pools::new(cfg.pool.clone()),
            cfg,
            cache,
        })
    }
}

fn refused(message: impl Into<String>) -> SessionError {
    SessionError::Refused { sqlstate: "28000", message: message.into() }
}

fn upstream_failed(what: &str) -> SessionError {
    tracing::warn!(error = what, "fallback: upstream login failed");
    SessionError::Refused { sqlstate: "08006", message: "gprxy: the service account could not log in".into() }
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
pub async fn authenticate(
    shared: &Shared,
    config: &Config,
    rt: Arc<FallbackRuntime>,
    client: &mut BoxStream,
    startup: &Startup,
    mut cbuf: BytesMut,
    info: &mut LoginInfo,
) -> Result<Upstream, SessionError> {
    // Pooled sessions speak protocol 3.0 (the server connections do).
    if let Some(npv) = proto::negotiate_protocol_version(startup) {
        client.write_all(&npv).await?;
    }
    let token = match rt.cfg.client_auth {
        ClientAuth::Password => password_token(client, &mut cbuf, info).await?,
        ClientAuth::OAuthBearer => bearer_token(client, &mut cbuf, info, &rt.cfg).await?,
    };
    crate::session::note_token(info, &token);

    let t = validate(&rt, token).await.map_err(|e| token_refused(info, &e))?;

    let account = rt
        .cfg
        .map
        .iter()
        .find(|(role, _)| t.roles.iter().any(|r| r == role))
        .map(|(_, account)| account.clone())
        .ok_or_else(|| refused("gprxy: no role in the token maps to a service account"))?;
    let user = startup.param("user").unwrap_or_default();
    let expected = match rt.cfg.user_must_match {
        UserMatch::Identity => t.identity.as_str(),
        UserMatch::Account => account.as_str(),
    };
    if user != expected {
        return Err(refused(format!("gprxy: user name {user:?} does not match the token")));
    }

    let database = startup.param("database").unwrap_or(user).to_owned();
    let client_settings = client_settings(startup, &rt.cfg.context).map_err(refused)?;
    let mut lease = rt.pools.checkout(&shared.metrics, &database, &account).await?;
    let mut settings = client_settings;
    settings.extend(rt.cfg.context.iter().map(|(k, c)| (k.clone(), setting_value(&t.claims, c))));
    let login = async || {
        let password = rt.cfg.passwords.get(&account).map(String::as_str).unwrap_or_default();
        login_upstream(shared, config, &account, &database, password, rt.cfg.context_key.clone()).await
    };
    let (mut conn, reused) = match lease.conn.take() {
        Some(c) => (c, true),
        None => match login().await {
            Ok(c) => (c, false),
            Err(e) => {
                // A pool that never logged in (a database that does not exist) is not kept.
                drop(lease);
                rt.pools.forget_unused(&database, &account);
                return Err(e);
            }
        },
    };
    // It logged in (the database exists): its gauges are exported.
    lease.admit(&shared.metrics, &database, &account);
    let mut sbuf = BytesMut::new();
    let reports = match prepare(&mut conn, &mut sbuf, &settings, &t).await {
        // An idle connection that died unnoticed, or was not in step: one fresh login, once.
        Err(e) if reused && connection_failed(&e) => {
            tracing::info!(event = "pool", action = "replace", "pooled server connection failed at set-up");
            conn = login().await?;
            sbuf.clear();
            prepare(&mut conn, &mut sbuf, &settings, &t).await?
        }
        r => r?,
    };
    // The client gets a cancel key of its own for this session, never the server connection's.
    let client_key = conn.key.as_ref().map(|k| session_cancel_key(k.0)).transpose()?;
    let mut to_client = proto::frame(b'R', &auth::OK.to_be_bytes());
    to_client.extend_from_slice(&conn.startup_reply);
    if let Some((pid, secret)) = &client_key {
        let mut body = pid.to_be_bytes().to_vec();
        body.extend_from_slice(secret);
        to_client.extend_from_slice(&proto::frame(b'K', &body));
    }
    to_client.extend_from_slice(&reports);
    to_client.extend_from_slice(&proto::frame(b'Z', b"I"));
    crate::session::send_ready(shared, client, &to_client, client_key.as_ref(), conn.key.as_ref()).await?;
    tracing::info!(
        event = "fallback_mapped",
        account = account.as_str(),
        identity = t.identity.as_str(),
        "token mapped to service account"
    );
    let created = conn.created();
    Ok(Upstream {
        pooled: Some(Pooled { lease, startup_reply: conn.startup_reply, signer: conn.signer, created }),
        stream: conn.stream,
        key: conn.key,
        client_key,
        leftover_client: cbuf,
        leftover_server: sbuf,
    })
}

/// The refusal of a token. What the token itself got wrong is told as it is; why keys could not
/// be had (URLs, resolver and transport errors) only reaches the log.
fn token_refused(info: &mut LoginInfo, e: &gprxy_core::ValidationError) -> SessionError {
    match e {
        gprxy_core::ValidationError::Keys(_) => {
            info.detail = Some(e.to_string());
            refused(format!("gprxy: token refused ({}): the issuer's signing keys are unavailable", e.code()))
        }
        _ => refused(format!("gprxy: token refused ({}): {e}", e.code())),
    }
}

/// Logs in upstream as `account` with SCRAM-SHA-256. The startup packet holds only what the
/// proxy chose (the client's parameters are set per session, so that a pooled connection
/// carries nothing of an earlier client) and, for a signed context, the connection's nonce.
async fn login_upstream(
    shared: &Shared,
    config: &Config,
    account: &str,
    database: &str,
    password: &str,
    context_key: Option<Arc<ContextKey>>,
) -> Result<ServerConn, SessionError> {
    let mut signer = match context_key {
        Some(key) => Some(ContextSigner::new(key).map_err(|e| upstream_failed(&e.to_string()))?),
        None => None,
    };
    let mut up = crate::session::connect_upstream(shared, config).await?;
    let mut params: Vec<(&str, &str)> =
        vec![("user", account), ("database", database), ("application_name", "gprxy")];
    if let Some(s) = &signer {
        params.push((gprxy_core::context::NONCE_PARAMETER, s.nonce()));
    }
    let mut out = BytesMut::new();
    frontend::startup_message(params, &mut out).map_err(SessionError::Io)?;
    up.write_all(&out).await?;
    up.flush().await?;

    let mut sbuf = BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    let mut startup_reply = BytesMut::new();
    let mut key = None;
    let mut authenticated = false;
    loop {
        let m = read_message(&mut up, &mut sbuf, proto::MAX_SERVER_AUTH_MESSAGE, "server message").await?;
        let mut reply = BytesMut::new();
        match (m.tag, proto::auth_code(&m)) {
            (b'R', Some(auth::OK)) => authenticated = true,
            (b'R', Some(auth::SASL)) => {
                if !proto::sasl_mechanisms(&m)?.iter().any(|x| x == "SCRAM-SHA-256") {
                    return Err(upstream_failed("server does not offer SCRAM-SHA-256"));
                }
                let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut reply)
                    .map_err(SessionError::Io)?;
                scram = Some(s);
            }
            (b'R', Some(auth::SASL_CONTINUE)) => {
                let s = scram.as_mut().ok_or_else(|| upstream_failed("SASL continue before start"))?;
                s.update(&m.body()[4..]).map_err(|e| upstream_failed(&e.to_string()))?;
                frontend::sasl_response(s.message(), &mut reply).map_err(SessionError::Io)?;
            }
            (b'R', Some(12)) => {
                let s = scram.as_mut().ok_or_else(|| upstream_failed("SASL final before start"))?;
                s.finish(&m.body()[4..]).map_err(|e| upstream_failed(&format!("server proof: {e}")))?;
            }
            (b'R', Some(code)) => {
                return Err(upstream_failed(&format!("unsupported authentication request {code}")))
            }
            (b'E', _) => {
                let (code, msg) = proto::error_fields(&m);
                return Err(upstream_failed(&format!("{code}: {msg}")));
            }
            (b'K', _) => key = proto::backend_key(&m),
            (b'Z', _) if authenticated && m.body() == b"I" => break,
            (b'Z', _) => return Err(upstream_failed("server not idle after login")),
            _ => startup_reply.extend_from_slice(&m.raw),
        }
        if !reply.is_empty() {
            up.write_all(&reply).await?;
            up.flush().await?;
        }
    }
    refuse_privileged_account(&mut up, &mut sbuf, account).await?;
    // Contexts name the server process, so that one cannot serve another connection.
    if let (Some(s), Some(k)) = (signer.as_mut(), key.as_ref()) {
        s.bind_backend(k.0);
    }
    Ok(ServerConn::new(up, startup_reply, key, signer))
}

/// Fallback mode never logs in as an account with powers beyond its grants, whatever the map
/// says: a superuser, REPLICATION, BYPASSRLS or CREATEROLE, the server-file and server-program
/// roles, or membership (any chain, SET ROLE reaches it) in a role with any of these; nor as an
/// account with settings stored by `ALTER ROLE ... SET`, which one pooled user could plant (a
/// search_path, say) for every later session. One query on each new server connection (a pooled
/// one was checked when made). No answer, or an error, refuses too.
async fn refuse_privileged_account(
    up: &mut BoxStream,
    sbuf: &mut BytesMut,
    account: &str,
) -> Result<(), SessionError> {
    const SQL: &str = "SELECT pg_catalog.concat_ws(', ', \
        (SELECT pg_catalog.string_agg(pg_catalog.concat_ws(' ', \
            CASE WHEN r.rolname OPERATOR(pg_catalog.<>) CURRENT_USER THEN 'member of ' OPERATOR(pg_catalog.||) r.rolname END, \
            CASE WHEN r.rolsuper THEN 'SUPERUSER' END, CASE WHEN r.rolreplication THEN 'REPLICATION' END, \
            CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END, CASE WHEN r.rolcreaterole THEN 'CREATEROLE' END), ', ') \
         FROM pg_catalog.pg_roles r \
         WHERE pg_catalog.pg_has_role(CURRENT_USER, r.oid, 'MEMBER') AND (r.rolsuper OR r.rolreplication \
            OR r.rolbypassrls OR r.rolcreaterole OR r.rolname OPERATOR(pg_catalog.=) ANY \
            (ARRAY['pg_execute_server_program', 'pg_read_server_files', 'pg_write_server_files']::pg_catalog.name[]))), \
        (SELECT 'settings stored by ALTER ROLE' FROM pg_catalog.pg_db_role_setting s \
         JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) s.setrole \
         WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER LIMIT 1))";
    let mut out = BytesMut::new();
    frontend::query(SQL, &mut out).map_err(SessionError::Io)?;
    up.write_all(&out).await?;
    up.flush().await?;
    let mut powers = None;
    let mut failed = None;
    loop {
        let m = read_message(up, sbuf, proto::MAX_SERVER_AUTH_MESSAGE, "server message").await?;
        match m.tag {
            b'D' => powers = first_column(m.body()),
            b'E' => failed = Some(proto::error_fields(&m)),
            b'Z' => break,
            _ => {}
        }
    }
    match (failed, powers.as_deref()) {
        (None, Some("")) => Ok(()),
        (Some((code, msg)), _) => Err(upstream_failed(&format!("role check: {code}: {msg}"))),
        (None, None) => Err(upstream_failed("role check: the service account is not in pg_roles")),
        (None, Some(powers)) => {
            tracing::warn!(account = %account, powers = %powers, "fallback: service account refused: powers beyond its grants, or stored settings");
            Err(SessionError::Refused {
                sqlstate: "28000",
                message: "gprxy: the service account is refused (powers beyond its grants, or settings stored by ALTER ROLE)"
                    .into(),
            })
        }
    }
}

/// The number of columns of a DataRow and its first column's bytes (None when NULL or malformed).
fn data_row_first(body: &[u8]) -> Option<(i16, &[u8])> {
    let columns = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if columns < 1 {
        return None;
    }
    let len = usize::try_from(i32::from_be_bytes(body.get(2..6)?.try_into().ok()?)).ok()?;
    Some((columns, body.get(6..6 + len)?))
}

/// The first column of a DataRow as text (None when NULL or malformed).
fn first_column(body: &[u8]) -> Option<String> {
    String::from_utf8(data_row_first(body)?.1.to_vec()).ok()
}

/// The token as a cleartext password (TLS only).
async fn password_token(
    client: &mut BoxStream,
    cbuf: &mut BytesMut,
    info: &mut LoginInfo,
) -> Result<String, SessionError> {
    info.mechanism = Some("token-password".into());
    if !info.tls {
        return Err(refused("gprxy: token login requires TLS (sslmode=require or stronger)"));
    }
    client.write_all(&proto::frame(b'R', &auth::CLEARTEXT.to_be_bytes())).await?;
    client.flush().await?;
    let m = read_message(client, cbuf, proto::MAX_SASL_MESSAGE, "password message").await?;
    if m.tag != b'p' {
        return Err(SessionError::Proto(ProtoError::BadMessage("password")));
    }
    Ok(proto::password(&m)?.trim().to_owned())
}

/// The token through SASL OAUTHBEARER (RFC 7628), as PostgreSQL 18 does it: an empty `auth=`
/// (libpq's discovery round) gets an error challenge naming the issuer and scope.
async fn bearer_token(
    client: &mut BoxStream,
    cbuf: &mut BytesMut,
    info: &mut LoginInfo,
    cfg: &Fallback,
) -> Result<String, SessionError> {
    info.mechanism = Some("OAUTHBEARER".into());
    if !info.tls {
        return Err(refused("gprxy: token login requires TLS (sslmode=require or stronger)"));
    }
    client.write_all(&proto::encode_sasl_mechanisms(&["OAUTHBEARER".to_owned()])).await?;
    client.flush().await?;
    let m = read_message(client, cbuf, proto::MAX_SASL_MESSAGE, "SASL message").await?;
    if m.tag != b'p' {
        return Err(SessionError::Proto(ProtoError::BadMessage("SASLInitialResponse")));
    }
    let (mech, data) = proto::parse_sasl_initial(&m)?;
    if mech != "OAUTHBEARER" {
        return Err(refused(format!("gprxy: SASL mechanism {mech:?} is not offered")));
    }
    match proto::oauthbearer_token(&data.unwrap_or_default())? {
        Some(token) => Ok(token.to_owned()),
        None => {
            info.discovery = true;
            let issuer = cfg.policy.issuer().trim_end_matches('/');
            let challenge = serde_json::json!({
                "status": "invalid_token",
                "openid-configuration": format!("{issuer}/.well-known/openid-configuration"),
                "scope": cfg.scope,
            })
            .to_string();
            let mut body = auth::SASL_CONTINUE.to_be_bytes().to_vec();
            body.extend_from_slice(challenge.as_bytes());
            client.write_all(&proto::frame(b'R', &body)).await?;
            client.flush().await?;
            // The client acknowledges with a lone kvsep; then the attempt ends (RFC 7628 3.2.3).
            let _ = read_message(client, cbuf, proto::MAX_SASL_MESSAGE, "SASL message").await?;
            Err(refused("gprxy: OAuth bearer authentication failed (token required)"))
        }
    }
}

/// Validates on this thread against fresh cached keys (microseconds); only when the keys are
/// stale or the token names a key they lack does it go to a blocking thread, which may fetch.
async fn validate(
    rt: &Arc<FallbackRuntime>,
    token: String,
) -> Result<gprxy_core::ValidatedToken, gprxy_core::ValidationError> {
    use gprxy_core::ValidationError::{KidUnknown, NoKeyForAlg};
    if let Some(keys) = rt.cache.fresh_keys() {
        match rt.validator.validate(&token, &*keys, gprxy_core::unix_time()) {
            Err(KidUnknown(_) | NoKeyForAlg(_)) => {}
            done => return done,
        }
    }
    let check = rt.clone();
    tokio::task::spawn_blocking(move || {
        check.validator.validate(&token, &*check.cache, gprxy_core::unix_time())
    })
    .await
    .unwrap_or_else(|_| Err(gprxy_core::KeyError::Unavailable("validation task failed".into()).into()))
}

/// A fresh cancel key for one pooled session: the server's process id (as PostgreSQL shows
/// it) and a random 4-byte secret (protocol 3.0).
fn session_cancel_key(pid: i32) -> Result<(i32, Vec<u8>), SessionError> {
    let mut secret = vec![0u8; 4];
    aws_lc_rs::rand::fill(&mut secret).map_err(|_| upstream_failed("no randomness for a cancel key"))?;
    Ok((pid, secret))
}

/// Hands a checked-out connection to its session: settings and, when signed, the next context.
async fn prepare(
    conn: &mut ServerConn,
    sbuf: &mut BytesMut,
    settings: &[(String, String)],
    t: &gprxy_core::ValidatedToken,
) -> Result<BytesMut, SessionError> {
    let signed = conn.signer.as_mut().map(|s| s.sign(t.subject.clone(), t.roles.clone(), t.claims.clone()));
    set_up_session(&mut conn.stream, sbuf, settings, signed.as_deref()).await
}

/// The client's startup parameters as session settings: set with `set_config` for each session
/// (and undone by `DISCARD ALL`), never in a pooled connection's startup packet. `options` may
/// hold `-c name=value` and `--name=value`; the proxy's own names are refused.
fn client_settings(startup: &Startup, context: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (name, value) in &startup.params {
        match name.as_str() {
            "user" | "database" => {}
            "replication" => return Err("gprxy: replication connections are not pooled".into()),
            "options" => {
                let words = split_options(value);
                let mut words = words.iter();
                while let Some(w) = words.next() {
                    let pair = match w.as_str() {
                        "-c" => words.next().map(String::as_str),
                        w => w.strip_prefix("-c").or_else(|| w.strip_prefix("--")).filter(|p| !p.is_empty()),
                    };
                    let Some((k, v)) = pair.and_then(|p| p.split_once('=')) else {
                        return Err(format!(
                            "gprxy: startup option {w:?} is not supported (only -c name=value)"
                        ));
                    };
                    out.push((k.replace('-', "_"), v.to_owned()));
                }
            }
            _ if name.starts_with("_pq_.") => {}
            _ => out.push((name.clone(), value.clone())),
        }
    }
    for (name, _) in &out {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("gprxy.") || context.iter().any(|(k, _)| k.eq_ignore_ascii_case(&lower)) {
            return Err(format!("gprxy: startup parameter {name:?} is set by the proxy"));
        }
    }
    Ok(out)
}

/// Splits an `options` string as PostgreSQL does: whitespace separates, a backslash keeps the
/// next character.
fn split_options(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// What a session set-up tells a client whose pooled connection was not in step.
const NOT_READY: &str = "gprxy: the server connection was not ready for a new session";

/// Whether a set-up failed because of its server connection (dead, or not in step) rather
/// than because of what it set.
fn connection_failed(e: &SessionError) -> bool {
    match e {
        SessionError::Io(_) | SessionError::ClientGone => true,
        SessionError::Refused { message, .. } => message == NOT_READY,
        _ => false,
    }
}

fn not_ready(what: &str) -> SessionError {
    tracing::warn!(event = "pool", problem = what, "fallback: server connection not ready at set-up");
    SessionError::Refused { sqlstate: "08006", message: NOT_READY.into() }
}

/// Prepares a checked-out connection for its client with one parameterised statement: a random
/// marker, the client's settings, the context settings, then the signed context. The answer
/// must be exactly this statement's (the marker's row) and end with ReadyForQuery `I`, with
/// nothing after it: so the connection is handed out only when it is idle and in step. Returns
/// the ParameterStatus messages it caused, for the client.
async fn set_up_session(
    up: &mut BoxStream,
    sbuf: &mut BytesMut,
    settings: &[(String, String)],
    signed: Option<&str>,
) -> Result<BytesMut, SessionError> {
    let marker = crate::pool::random_marker("gprxy-setup-").ok_or_else(|| not_ready("no randomness"))?;
    // Schema-qualified: a pooled user could have planted a search_path (ALTER ROLE ... SET) and
    // functions of these names for the next user's set-up to call.
    let mut calls = vec!["$1::pg_catalog.text".to_owned()];
    calls.extend(
        (0..settings.len()).map(|i| format!("pg_catalog.set_config(${}, ${}, false)", 2 * i + 2, 2 * i + 3)),
    );
    let mut values: Vec<&str> = vec![marker.as_str()];
    values.extend(settings.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]));
    if let Some(ctx) = signed {
        values.push(ctx);
        calls.push(format!("gprxy.set_context(${})", values.len()));
    }
    let sql = format!("SELECT {}", calls.join(", "));
    let mut out = BytesMut::new();
    let io = SessionError::Io;
    frontend::parse("", &sql, std::iter::empty(), &mut out).map_err(io)?;
    frontend::bind(
        "",
        "",
        std::iter::empty::<i16>(),
        values.iter(),
        |v, buf| {
            buf.extend_from_slice(v.as_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        Some(0),
        &mut out,
    )
    .map_err(|_| upstream_failed("cannot encode the session settings"))?;
    frontend::execute("", 0, &mut out).map_err(SessionError::Io)?;
    frontend::sync(&mut out);
    up.write_all(&out).await?;
    up.flush().await?;
    let mut reports = BytesMut::new();
    let mut failed = None;
    // The answers expected, in order: ParseComplete, BindComplete, the marker's row,
    // CommandComplete; an error ends them early. Then ReadyForQuery.
    let mut expected: &[u8] = b"12DC";
    loop {
        let m = read_message(up, sbuf, proto::MAX_SERVER_AUTH_MESSAGE, "server message").await?;
        match m.tag {
            b'S' => reports.extend_from_slice(&m.raw),
            b'N' | b'A' => {}
            b'E' if failed.is_none() => {
                failed = Some(proto::error_fields(&m));
                expected = b"";
            }
            b'Z' if expected.is_empty() => {
                if m.body() != b"I" {
                    return Err(not_ready("not idle after set-up"));
                }
                break;
            }
            tag if expected.first() == Some(&tag)
                && (tag != b'D' || data_row_starts_with(m.body(), calls.len(), &marker)) =>
            {
                expected = &expected[1..];
            }
            _ => return Err(not_ready("an answer that is not the set-up's")),
        }
    }
    if !sbuf.is_empty() {
        return Err(not_ready("more answers after the set-up's"));
    }
    match failed {
        None => Ok(reports),
        Some((code, msg)) => {
            tracing::warn!(sqlstate = code.as_str(), error = msg.as_str(), "fallback: session set-up failed");
            let sqlstate = match code.as_str() {
                "42704" => "42704",
                "22023" => "22023",
                "42501" => "42501",
                _ => "08006",
            };
            Err(SessionError::Refused { sqlstate, message: format!("gprxy: session set-up failed: {msg}") })
        }
    }
}

/// Whether a DataRow body has `columns` columns, the first being `marker` as text.
fn data_row_starts_with(body: &[u8], columns: usize, marker: &str) -> bool {
    data_row_first(body)
        .is_some_and(|(n, first)| usize::try_from(n) == Ok(columns) && first == marker.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Startup {
        Startup {
            version: 196_608,
            params: params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            raw: Vec::new(),
        }
    }

    fn ctx() -> Vec<(String, String)> {
        vec![("app.user_id".to_owned(), "sub".to_owned())]
    }

    #[test]
    fn data_row_first_column() {
        assert_eq!(first_column(b"\0\x01\0\0\0\x09BYPASSRLS").as_deref(), Some("BYPASSRLS"));
        assert_eq!(first_column(b"\0\x01\0\0\0\0").as_deref(), Some(""));
        assert_eq!(first_column(b"\0\x01\xff\xff\xff\xff"), None);
        assert_eq!(first_column(b"\0\x01\0\0\0\x09BYPASS"), None);
        assert_eq!(first_column(b"\0\0"), None);
        assert_eq!(first_column(b""), None);
    }

    #[test]
    fn client_parameters_become_session_settings() {
        let s = startup(&[
            ("user", "alice"),
            ("database", "app"),
            ("application_name", "psql"),
            ("options", r"-c search_path=a\ b --statement-timeout=5s -cwork_mem=8MB"),
        ]);
        let got = client_settings(&s, &ctx()).unwrap();
        let want: Vec<(String, String)> = [
            ("application_name", "psql"),
            ("search_path", "a b"),
            ("statement_timeout", "5s"),
            ("work_mem", "8MB"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn proxy_owned_parameters_are_refused() {
        let key = startup(&[("user", "a"), ("gprxy.context_nonce", "AAAA")]);
        assert_eq!(
            client_settings(&key, &ctx()).unwrap_err(),
            "gprxy: startup parameter \"gprxy.context_nonce\" is set by the proxy"
        );
        let in_options = startup(&[("options", "-c gprxy.context_nonce=AAAA")]);
        assert_eq!(
            client_settings(&in_options, &ctx()).unwrap_err(),
            "gprxy: startup parameter \"gprxy.context_nonce\" is set by the proxy"
        );
        let context = startup(&[("options", "-c App.User_Id=admin")]);
        assert_eq!(
            client_settings(&context, &ctx()).unwrap_err(),
            "gprxy: startup parameter \"App.User_Id\" is set by the proxy"
        );
        let replication = startup(&[("replication", "database")]);
        assert_eq!(
            client_settings(&replication, &ctx()).unwrap_err(),
            "gprxy: replication connections are not pooled"
        );
        let other = startup(&[("options", "-D /tmp")]);
        assert_eq!(
            client_settings(&other, &ctx()).unwrap_err(),
            "gprxy: startup option \"-D\" is not supported (only -c name=value)"
        );
    }

    /// A fake server for one set-up: reads Parse, Bind, Execute, Sync, takes the marker from
    /// Bind's first parameter, and answers with `answer(marker)` in one write.
    async fn set_up_against(answer: fn(&str) -> Vec<u8>) -> Result<BytesMut, SessionError> {
        use tokio::io::AsyncReadExt;
        let (proxy_side, mut server) = tokio::io::duplex(64 * 1024);
        let fake = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            // Up to and including Sync.
            while !got.ends_with(b"S\0\0\0\x04") {
                let n = server.read(&mut chunk).await.unwrap();
                assert_ne!(n, 0);
                got.extend_from_slice(&chunk[..n]);
            }
            let parse_len = u32::from_be_bytes(got[1..5].try_into().unwrap()) as usize;
            let bind = &got[1 + parse_len..];
            // Tag, length, portal, statement, no format codes, parameter count, first length.
            let first = 5 + 1 + 1 + 2 + 2;
            let len = u32::from_be_bytes(bind[first..first + 4].try_into().unwrap()) as usize;
            let marker = std::str::from_utf8(&bind[first + 4..first + 4 + len]).unwrap().to_owned();
            server.write_all(&answer(&marker)).await.unwrap();
            server
        });
        let mut up: BoxStream = Box::new(proxy_side);
        let settings = vec![("app.user_id".to_owned(), "bob".to_owned())];
        let r = set_up_session(&mut up, &mut BytesMut::new(), &settings, None).await;
        drop(fake.await.unwrap());
        r
    }

    fn answers(list: &[(u8, Vec<u8>)]) -> Vec<u8> {
        list.iter().flat_map(|(tag, body)| proto::frame(*tag, body).to_vec()).collect()
    }

    fn row(marker: &str) -> Vec<u8> {
        let mut body = 2i16.to_be_bytes().to_vec();
        body.extend_from_slice(&(marker.len() as i32).to_be_bytes());
        body.extend_from_slice(marker.as_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"bob");
        body
    }

    fn not_ready_error(r: Result<BytesMut, SessionError>) -> bool {
        matches!(r, Err(SessionError::Refused { sqlstate: "08006", message }) if message == NOT_READY)
    }

    #[tokio::test]
    async fn a_set_up_accepts_only_its_own_answer_ending_idle() {
        fn good(m: &str) -> Vec<u8> {
            answers(&[
                (b'1', vec![]),
                (b'2', vec![]),
                (b'S', b"application_name\0x\0".to_vec()),
                (b'D', row(m)),
                (b'C', b"SELECT 1\0".to_vec()),
                (b'Z', b"I".to_vec()),
            ])
        }
        let reports = set_up_against(good).await.unwrap();
        assert_eq!(reports, proto::frame(b'S', b"application_name\0x\0"));
        // Inside a transaction (ReadyForQuery T).
        let in_transaction = |m: &str| {
            let mut a = good(m);
            let n = a.len();
            a[n - 1] = b'T';
            a
        };
        assert!(not_ready_error(set_up_against(in_transaction).await));
        // An earlier request's answer first: its ReadyForQuery is not the set-up's.
        let stale = |m: &str| {
            let mut a = answers(&[(b'C', b"BEGIN\0".to_vec()), (b'Z', b"T".to_vec())]);
            a.extend_from_slice(&good(m));
            a
        };
        assert!(not_ready_error(set_up_against(stale).await));
        // A row without the marker.
        let other = |_: &str| good("gprxy-setup-00000000000000000000000000000000");
        assert!(not_ready_error(set_up_against(other).await));
        // More answers after the set-up's.
        let more = |m: &str| {
            let mut a = good(m);
            a.extend_from_slice(&answers(&[(b'Z', b"I".to_vec())]));
            a
        };
        assert!(not_ready_error(set_up_against(more).await));
        // The server refuses a setting: the error is the client's, the connection was in step.
        let refused = |_: &str| {
            answers(&[
                (b'1', vec![]),
                (b'2', vec![]),
                (b'E', b"SERROR\0C42704\0Munrecognized configuration parameter\0\0".to_vec()),
                (b'Z', b"I".to_vec()),
            ])
        };
        match set_up_against(refused).await {
            Err(SessionError::Refused { sqlstate: "42704", message }) => {
                assert_eq!(message, "gprxy: session set-up failed: unrecognized configuration parameter");
            }
            other => panic!("{other:?}"),
        }
    }
}
