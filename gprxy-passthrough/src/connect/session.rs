//! One application connection through the connector: its startup packet (no password is
//! ever asked of it), a token from the profile's cache, a new server connection with TLS, the
//! login upstream (SASL OAUTHBEARER, or the token as a cleartext password when the server asks
//! for one), then the bytes relayed both ways. The application sees the server's own
//! AuthenticationOk, ParameterStatus, BackendKeyData and ReadyForQuery, and later the server's
//! own errors, the FATAL of a session's end included.

use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::config::{LoginMethod, Profile};
use super::token_source::{Token, TokenCache};
use crate::conn::{self, BoxStream, CancelKey};
use crate::proto::{self, auth, BackendMessage, FirstPacket, SqlState, Startup};

/// Live sessions' cancel keys → the index of their upstream.
pub type CancelKeys = parking_lot::Mutex<std::collections::HashMap<CancelKey, usize>>;

/// What every connection of one profile shares.
pub struct Ctx {
    /// The profile.
    pub profile: Profile,
    /// Its token.
    pub tokens: Arc<TokenCache>,
    /// TLS to the server (None: the insecure test mode).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Cancel keys of live sessions and the upstream each is on (a cancel request with any
    /// other key is dropped); kept across reloads.
    pub cancel_keys: Arc<CancelKeys>,
    /// Metrics; kept across reloads.
    pub metrics: Arc<super::metrics::Metrics>,
}

impl Ctx {
    /// The shared state of `profile`.
    pub fn new(profile: Profile) -> anyhow::Result<Self> {
        Self::build(profile, Arc::default(), Arc::default())
    }

    /// The state of a reloaded `profile`: a new token cache (its source may have changed), the
    /// live sessions' cancel keys kept.
    pub fn new_sharing(profile: Profile, old: &Ctx) -> anyhow::Result<Self> {
        Self::build(profile, old.cancel_keys.clone(), old.metrics.clone())
    }

    fn build(
        profile: Profile,
        cancel_keys: Arc<CancelKeys>,
        metrics: Arc<super::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        if let Some((_, key)) = profile.tls.as_ref().and_then(|t| t.client_cert.as_ref()) {
            // As libpq refuses an sslkey that group or others can read.
            super::token_source::check_private_file(key).map_err(|e| anyhow::anyhow!("tls.key: {e}"))?;
        }
        let tls = match &profile.tls {
            Some(t) => Some(crate::tls::client_config(
                &t.ca_file,
                t.client_cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            )?),
            None => None,
        };
        let source = super::token_source::from_spec(&profile.token, profile.refresh_margin_secs);
        let tokens = Arc::new(TokenCache::new(source, profile.refresh_margin_secs).counted(metrics.clone()));
        Ok(Self { profile, tokens, tls, cancel_keys, metrics })
    }
}

/// Why a login upstream failed.
#[derive(Debug)]
pub enum LoginError {
    /// The connector refused or failed; the message is what the application is told.
    Refused(SqlState, String),
    /// The server refused; its ErrorResponse (as it came) is relayed.
    Server {
        /// The ErrorResponse.
        raw: BytesMut,
        /// Its SQLSTATE.
        sqlstate: String,
        /// Its message.
        message: String,
    },
}

impl LoginError {
    fn refused(message: impl Into<String>) -> Self {
        Self::Refused(SqlState::INVALID_AUTHORIZATION, message.into())
    }

    /// What the application receives.
    pub fn to_client(&self) -> BytesMut {
        match self {
            Self::Refused(sqlstate, message) => {
                BackendMessage::ErrorResponse { sqlstate: *sqlstate, message }.to_bytes()
            }
            Self::Server { raw, .. } => raw.clone(),
        }
    }

    /// For the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Refused(s, m) => format!("{} {m}", s.code()),
            Self::Server { sqlstate, message, .. } => format!("server: {sqlstate} {message}"),
        }
    }
}

/// A logged-in server connection.
pub struct LoggedIn {
    /// The connection.
    pub stream: BoxStream,
    /// Everything from AuthenticationOk through ReadyForQuery, for the application.
    pub to_client: BytesMut,
    /// The server's cancel key.
    pub key: Option<CancelKey>,
    /// `OAUTHBEARER` or `password`.
    pub mechanism: &'static str,
    /// Server bytes read past ReadyForQuery.
    pub leftover: BytesMut,
    /// The server's `server_version`.
    pub server_version: Option<String>,
}

/// Opens a server connection (TLS unless the insecure test mode): the profile's upstreams in
/// order until one answers, each failure logged. Returns the stream and which upstream it is.
pub async fn open(ctx: &Ctx) -> Result<(BoxStream, usize), LoginError> {
    let p = &ctx.profile;
    for (i, upstream) in p.upstreams.iter().enumerate() {
        match open_one(ctx, i).await {
            Ok(s) => return Ok((s, i)),
            Err(e) => warn!(profile = %p.name, upstream = %upstream, error = %e, "cannot reach the server"),
        }
    }
    Err(LoginError::Refused(
        SqlState::CONNECTION_FAILURE,
        "gprxy connect: cannot reach the database server".into(),
    ))
}

/// Opens a connection to upstream `i`; the error says what failed, for the log.
pub async fn open_one(ctx: &Ctx, i: usize) -> Result<BoxStream, String> {
    let p = &ctx.profile;
    let upstream = &p.upstreams[i];
    let tcp = match tokio::time::timeout(p.connect_timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("connect timed out".into()),
    };
    let _ = tcp.set_nodelay(true);
    match (&ctx.tls, &p.tls) {
        (Some(cfg), Some(t)) => {
            let name =
                t.server_name.as_deref().or_else(|| super::config::host_of(upstream)).unwrap_or_default();
            match tokio::time::timeout(p.connect_timeout, crate::upstream::start_tls(tcp, cfg.clone(), name))
                .await
            {
                Ok(r) => r,
                Err(_) => Err("TLS handshake timed out".into()),
            }
        }
        _ => Ok(Box::new(tcp)),
    }
}

/// Logs in on `up` as `user` to `database` with `token`, sending `params` besides.
pub async fn log_in(
    mut up: BoxStream,
    tls: bool,
    method: LoginMethod,
    params: &[(String, String)],
    token: &Token,
) -> Result<LoggedIn, LoginError> {
    let mut out = BytesMut::new();
    let pairs = params.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    frontend::startup_message(pairs, &mut out)
        .map_err(|e| LoginError::refused(format!("gprxy connect: {e}")))?;
    let io = |e: std::io::Error| {
        LoginError::Refused(
            SqlState::CONNECTION_FAILURE,
            format!("gprxy connect: the server connection failed: {e}"),
        )
    };
    up.write_all(&out).await.map_err(io)?;
    up.flush().await.map_err(io)?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut to_client = BytesMut::new();
    let mut authenticated = false;
    let mut mechanism = "";
    let mut key = None;
    let mut server_version = None;
    let bad = |e: proto::ProtoError| {
        LoginError::Refused(
            SqlState::PROTOCOL_VIOLATION,
            format!("gprxy connect: the server broke the protocol: {e}"),
        )
    };
    loop {
        let m = loop {
            if let Some(m) = proto::parse_message(&mut buf, proto::MAX_SERVER_AUTH_MESSAGE, "server message")
                .map_err(bad)?
            {
                break m;
            }
            if up.read_buf(&mut buf).await.map_err(io)? == 0 {
                return Err(LoginError::Refused(
                    SqlState::CONNECTION_FAILURE,
                    "gprxy connect: the database server closed the connection".into(),
                ));
            }
        };
        let mut reply = BytesMut::new();
        match (m.tag, proto::auth_code(&m)) {
            (b'R', Some(auth::OK)) => {
                authenticated = true;
                to_client.extend_from_slice(&m.raw);
            }
            (b'R', Some(auth::SASL)) if !authenticated && method != LoginMethod::Password => {
                let mechs = proto::sasl_mechanisms(&m).map_err(bad)?;
                if !mechs.iter().any(|x| x == "OAUTHBEARER") {
                    return Err(LoginError::refused(format!(
                        "gprxy connect: the server offers {} for this user, not OAUTHBEARER",
                        mechs.join(", ")
                    )));
                }
                let sasl = format!("n,,\x01auth=Bearer {}\x01\x01", token.expose());
                frontend::sasl_initial_response("OAUTHBEARER", sasl.as_bytes(), &mut reply).map_err(io)?;
                mechanism = "OAUTHBEARER";
            }
            (b'R', Some(auth::SASL_CONTINUE)) if mechanism == "OAUTHBEARER" => {
                // The server's error challenge (RFC 7628 3.2.2): acknowledge; its ErrorResponse follows.
                frontend::sasl_response(b"\x01", &mut reply).map_err(io)?;
            }
            (b'R', Some(auth::CLEARTEXT)) if !authenticated && method != LoginMethod::Oauthbearer => {
                if !tls {
                    return Err(LoginError::refused(
                        "gprxy connect: the server asks for the token as a password over a connection without TLS; refused",
                    ));
                }
                frontend::password_message(token.expose().as_bytes(), &mut reply).map_err(io)?;
                mechanism = "password";
            }
            (b'R', Some(code)) => {
                let what = match code {
                    auth::MD5 => "an MD5 password".to_owned(),
                    auth::SASL => "SASL".to_owned(),
                    auth::CLEARTEXT => "a password".to_owned(),
                    auth::GSS | auth::SSPI => "Kerberos".to_owned(),
                    c => format!("authentication method {c}"),
                };
                return Err(LoginError::refused(format!(
                    "gprxy connect: the server asks for {what}; this profile logs in only with a token ({})",
                    match method {
                        LoginMethod::Auto => "OAUTHBEARER or the token as a password",
                        LoginMethod::Oauthbearer => "OAUTHBEARER",
                        LoginMethod::Password => "the token as a password",
                    }
                )));
            }
            (b'E', _) => {
                let (sqlstate, message) = proto::error_fields(&m);
                let _ = up.shutdown().await;
                return Err(LoginError::Server { raw: m.raw, sqlstate, message });
            }
            (b'K', _) => {
                key = proto::backend_key(&m);
                to_client.extend_from_slice(&m.raw);
            }
            (b'S', _) => {
                if let Some(v) = parameter(&m, "server_version") {
                    server_version = Some(v);
                }
                to_client.extend_from_slice(&m.raw);
            }
            (b'Z', _) if authenticated => {
                to_client.extend_from_slice(&m.raw);
                return Ok(LoggedIn { stream: up, to_client, key, mechanism, leftover: buf, server_version });
            }
            _ if authenticated => to_client.extend_from_slice(&m.raw),
            // Notices before the login's end are not the application's business yet.
            (b'N', _) => {}
            _ => {
                return Err(bad(proto::ProtoError::BadMessage("unexpected message during authentication")));
            }
        }
        if !reply.is_empty() {
            up.write_all(&reply).await.map_err(io)?;
            up.flush().await.map_err(io)?;
        }
    }
}

/// A ParameterStatus's value if it is `name`.
fn parameter(m: &proto::Message, name: &str) -> Option<String> {
    let body = m.body();
    let nul = body.iter().position(|&b| b == 0)?;
    if &body[..nul] != name.as_bytes() {
        return None;
    }
    let rest = &body[nul + 1..];
    let end = rest.iter().position(|&b| b == 0)?;
    String::from_utf8(rest[..end].to_vec()).ok()
}

/// The parameters sent upstream: the application's, less protocol options (`_pq_.`), with the
/// profile's user and database where the application named none.
pub fn upstream_params(profile: &Profile, startup: &Startup) -> Vec<(String, String)> {
    let mut params: Vec<(String, String)> =
        startup.params.iter().filter(|(k, _)| !k.starts_with("_pq_.")).cloned().collect();
    let mut default = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            match params.iter_mut().find(|(n, _)| n == k) {
                Some((_, val)) if val.is_empty() => *val = v.clone(),
                Some(_) => {}
                None => params.push((k.to_owned(), v.clone())),
            }
        }
    };
    default("user", &profile.user);
    default("database", &profile.database);
    params
}

/// Serves one application connection, holding `slot` (one of the connector's
/// `max_connections`) for as long as it may have a server backend: a cancel request gives it
/// back before it is forwarded (it opens no session), a session when the server has closed its
/// connection.
pub async fn handle<S: Send>(ctx: Arc<Ctx>, mut client: BoxStream, peer: String, slot: S) {
    let span = tracing::info_span!("connect_session", profile = %ctx.profile.name, peer = %peer);
    let _ = tracing::Instrument::instrument(serve(ctx, &mut client, slot), span).await;
    let _ = client.shutdown().await;
}

/// How long an application has to send its startup packet (or cancel request).
const FIRST_PACKET_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the application's first packet, answering encryption requests with `N`. None: none
/// came within [`FIRST_PACKET_WITHIN`].
async fn first_packet(
    client: &mut BoxStream,
    buf: &mut BytesMut,
) -> Option<Result<FirstPacket, proto::ProtoError>> {
    tokio::time::timeout(FIRST_PACKET_WITHIN, async {
        loop {
            match proto::parse_first_packet(buf) {
                Ok(Some(FirstPacket::SslRequest | FirstPacket::GssEncRequest)) => {
                    // The local socket carries no encryption; bytes sent before the answer are
                    // a protocol violation (CVE-2021-23214 class).
                    if !buf.is_empty() {
                        return Err(proto::ProtoError::BadStartup("bytes after an encryption request"));
                    }
                    client.write_all(b"N").await.map_err(|_| proto::ProtoError::BadStartup("closed"))?;
                }
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {
                    if client.read_buf(buf).await.unwrap_or(0) == 0 {
                        return Err(proto::ProtoError::BadStartup("closed before the startup packet"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .ok()
}

/// A connection that came while `max_connections` were open: its first packet is read all the
/// same, so that a cancel request is forwarded (PostgreSQL's own limit lets them through: they
/// open no session, and one is most needed when every connection is busy). Returns whether it
/// was one; the caller refuses anything else.
pub async fn cancel_at_limit(ctx: &Ctx, client: &mut BoxStream) -> bool {
    let mut buf = BytesMut::with_capacity(1024);
    match first_packet(client, &mut buf).await {
        Some(Ok(FirstPacket::Cancel { pid, key })) => {
            forward_cancel(ctx, (pid, key)).await;
            let _ = client.shutdown().await;
            true
        }
        _ => false,
    }
}

async fn serve<S: Send>(ctx: Arc<Ctx>, client: &mut BoxStream, slot: S) -> Result<(), ()> {
    // The server connection (TCP and TLS) needs nothing from the application: it is opened while
    // the startup packet arrives and the token is looked up (the peer was already allowed).
    let mut opening = Some({
        let ctx = ctx.clone();
        tokio::spawn(async move { open(&ctx).await })
    });
    let abort = |o: &mut Option<tokio::task::JoinHandle<_>>| {
        if let Some(h) = o.take() {
            h.abort();
        }
    };
    let mut buf = BytesMut::with_capacity(1024);
    let first = first_packet(client, &mut buf).await;
    let startup = match first {
        Some(Ok(FirstPacket::Startup(s))) => s,
        Some(Ok(FirstPacket::Cancel { pid, key })) => {
            abort(&mut opening);
            drop(slot);
            forward_cancel(&ctx, (pid, key)).await;
            return Ok(());
        }
        Some(Ok(_)) => {
            abort(&mut opening);
            return Err(());
        }
        Some(Err(e)) => {
            abort(&mut opening);
            let msg = format!("gprxy connect: {e}");
            let _ = conn::send(
                client,
                &BackendMessage::ErrorResponse { sqlstate: SqlState::PROTOCOL_VIOLATION, message: &msg }
                    .to_bytes(),
            )
            .await;
            warn!(event = "connect_login", outcome = "refused", error = %msg, "bad startup packet");
            return Err(());
        }
        None => {
            abort(&mut opening);
            return Err(());
        }
    };
    if let Some(nego) = proto::negotiate_protocol_version(&startup) {
        if conn::send(client, &nego).await.is_err() {
            abort(&mut opening);
            return Err(());
        }
    }
    let params = upstream_params(&ctx.profile, &startup);
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
    let (user, database) = (param("user"), param("database"));
    let started = std::time::Instant::now();
    let (fetched, fresh) = match ctx.tokens.get().await {
        Ok(t) => t,
        Err(e) => {
            abort(&mut opening);
            let msg = format!("gprxy connect: no token for profile {}: {e}", ctx.profile.name);
            ctx.metrics.login("none", "no_token");
            warn!(event = "connect_login", outcome = "no_token", source = ctx.tokens.kind(), %user, %database, error = %e, "no token");
            let _ = conn::send(
                client,
                &BackendMessage::ErrorResponse { sqlstate: SqlState::CONNECTION_FAILURE, message: &msg }
                    .to_bytes(),
            )
            .await;
            return Err(());
        }
    };
    let token = fetched.token;
    let who = gprxy_core::peek_unverified(token.expose());
    let mut upstream_index = 0;
    let opened = match opening.take() {
        Some(h) => h.await.unwrap_or_else(|_| {
            Err(LoginError::Refused(
                SqlState::CONNECTION_FAILURE,
                "gprxy connect: cannot reach the database server".into(),
            ))
        }),
        None => open(&ctx).await,
    };
    let result = match opened {
        Ok((up, i)) => {
            upstream_index = i;
            log_in(up, ctx.tls.is_some(), ctx.profile.login, &params, &token).await
        }
        Err(e) => Err(e),
    };
    let mut up = match result {
        Ok(up) => up,
        Err(e) => {
            let outcome = match &e {
                LoginError::Refused(s, _) if *s == SqlState::CONNECTION_FAILURE => "unreachable",
                _ => "refused",
            };
            ctx.metrics.login("none", outcome);
            if let LoginError::Server { sqlstate, .. } = &e {
                if sqlstate == SqlState::INVALID_AUTHORIZATION.code() {
                    // Refused (expired, revoked): the next connection fetches a new one.
                    ctx.tokens.forget(&token).await;
                }
            }
            warn!(event = "connect_login", outcome = "refused", source = ctx.tokens.kind(), %user, %database,
                  token_fp = %token.fingerprint(), sub = who.sub.as_deref().unwrap_or(""), iss = who.iss.as_deref().unwrap_or(""),
                  error = %e.describe(), "login refused");
            let _ = conn::send(client, &e.to_client()).await;
            return Err(());
        }
    };
    if let Some(k) = &up.key {
        ctx.cancel_keys.lock().insert(k.clone(), upstream_index);
    }
    ctx.metrics.login(up.mechanism, "success");
    ctx.metrics.login_duration.observe(started.elapsed().as_secs_f64());
    ctx.metrics.sessions.inc();
    info!(event = "connect_login", outcome = "ok", source = ctx.tokens.kind(), %user, %database,
          upstream = %ctx.profile.upstreams[upstream_index], mechanism = up.mechanism, token_fp = %token.fingerprint(), fetched = fresh,
          sub = who.sub.as_deref().unwrap_or(""), iss = who.iss.as_deref().unwrap_or(""),
          tls = ctx.tls.is_some(), ms = started.elapsed().as_secs_f64() * 1e3, "logged in");
    drop(token);
    let relayed = async {
        client.write_all(&up.to_client).await?;
        if !up.leftover.is_empty() {
            client.write_all(&up.leftover).await?;
        }
        client.flush().await?;
        if !buf.is_empty() {
            up.stream.write_all(&buf).await?;
        }
        let (a, b) = ctx.metrics.relayed_bytes();
        // Over when the server has closed (its backend is gone), whether or not the application
        // closes its socket: the slot is then free, as the server's backend is.
        crate::relay::copy_until_b_ends(client, &mut up.stream, a, b).await
    }
    .await;
    ctx.metrics.sessions.dec();
    if let Some(k) = &up.key {
        ctx.cancel_keys.lock().remove(k);
    }
    let failed = relayed.is_err();
    info!(event = "connect_end", %user, %database, error = relayed.err().map(|e| e.to_string()).unwrap_or_default(), "session ended");
    if failed {
        until_the_server_closes(&mut up.stream).await;
    }
    Ok(())
}

/// After a relay that failed (the application reset its connection mid-statement, say), the
/// server's backend may live on, running its statement (PostgreSQL notices a gone client only
/// when it next reads or writes): the connector's end is passed on, and the session's slot is
/// held until the server closes or next sends something. Then the connection is dropped, so the
/// backend finds its client gone at its next read or write, as it would have without the
/// connector (a statement whose answers are streaming fails, and nothing of it commits: it is
/// not read to its end).
async fn until_the_server_closes(up: &mut BoxStream) {
    let _ = up.shutdown().await;
    let _ = up.read(&mut [0u8; 1]).await;
}

/// Forwards a cancel request whose key belongs to a live session of this connector, to that
/// session's upstream.
async fn forward_cancel(ctx: &Ctx, key: CancelKey) {
    let Some(i) = ctx.cancel_keys.lock().get(&key).copied() else {
        info!(
            event = "cancel",
            pid = key.0,
            outcome = "dropped",
            "cancel request with an unknown key dropped"
        );
        return;
    };
    match open_one(ctx, i).await {
        Ok(mut up) => {
            let _ = up.write_all(&proto::encode_cancel(key.0, &key.1)).await;
            let _ = up.flush().await;
            let mut sink = [0u8; 1];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), up.read(&mut sink)).await;
            info!(event = "cancel", pid = key.0, outcome = "forwarded", "cancel request forwarded");
        }
        Err(e) => warn!(event = "cancel", pid = key.0, error = %e, "cancel request not forwarded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::duplex::{next, pair};

    fn params() -> Vec<(String, String)> {
        vec![("user".into(), "alice".into()), ("database".into(), "app".into())]
    }

    fn token() -> Token {
        super::super::token_source::tests_token("h.p.s")
    }

    /// The server under test: reads the startup packet, then plays `script` (what to send, and
    /// whether to read one message after it); returns the messages it read.
    async fn server(mut s: BoxStream, script: Vec<(BytesMut, bool)>) -> Vec<proto::Message> {
        let mut buf = BytesMut::new();
        // The startup packet has no tag: read its length, then the rest.
        while buf.len() < 4 {
            s.read_buf(&mut buf).await.unwrap();
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        while buf.len() < len {
            s.read_buf(&mut buf).await.unwrap();
        }
        let _ = buf.split_to(len);
        let mut got = Vec::new();
        for (send, read) in script {
            conn::send(&mut s, &send).await.unwrap();
            if read {
                got.push(next(&mut s, &mut buf).await);
            }
        }
        got
    }

    fn done() -> BytesMut {
        let mut b = BackendMessage::AuthenticationOk.to_bytes();
        BackendMessage::BackendKeyData { pid: 7, secret: b"k3y!" }.encode(&mut b);
        BackendMessage::ReadyForQuery(b'I').encode(&mut b);
        b
    }

    #[tokio::test]
    async fn oauthbearer_sends_the_token_and_hands_the_server_s_answer_to_the_application() {
        let (ours, theirs) = pair();
        let offer = BackendMessage::AuthenticationSasl(&["OAUTHBEARER".to_owned()]).to_bytes();
        let fake = tokio::spawn(server(theirs, vec![(offer, true), (done(), false)]));
        let up = log_in(ours, true, LoginMethod::Auto, &params(), &token()).await.unwrap();
        let got = fake.await.unwrap();
        let (mech, data) = proto::parse_sasl_initial(&got[0]).unwrap();
        assert_eq!(
            (mech.as_str(), data.as_deref()),
            ("OAUTHBEARER", Some(&b"n,,\x01auth=Bearer h.p.s\x01\x01"[..]))
        );
        assert_eq!((up.mechanism, up.key), ("OAUTHBEARER", Some((7, b"k3y!".to_vec()))));
        assert_eq!(up.to_client, done());
    }

    #[tokio::test]
    async fn a_refused_token_is_acknowledged_and_the_server_s_error_is_kept_for_the_application() {
        let (ours, theirs) = pair();
        let offer = BackendMessage::AuthenticationSasl(&["OAUTHBEARER".to_owned()]).to_bytes();
        let challenge =
            BackendMessage::AuthenticationSaslContinue(br#"{"status":"invalid_token"}"#).to_bytes();
        let refusal = BackendMessage::ErrorResponse {
            sqlstate: SqlState::INVALID_AUTHORIZATION,
            message: "OAuth bearer authentication failed",
        }
        .to_bytes();
        let fake =
            tokio::spawn(server(theirs, vec![(offer, true), (challenge, true), (refusal.clone(), false)]));
        let Err(LoginError::Server { raw, sqlstate, message }) =
            log_in(ours, true, LoginMethod::Auto, &params(), &token()).await
        else {
            panic!("not refused")
        };
        let got = fake.await.unwrap();
        assert_eq!(got[1].body(), b"\x01", "the error challenge is acknowledged (RFC 7628 3.2.3)");
        assert_eq!(
            (raw, sqlstate.as_str(), message.as_str()),
            (refusal, "28000", "OAuth bearer authentication failed")
        );
    }

    #[tokio::test]
    async fn other_methods_and_a_password_without_tls_are_refused_without_sending_the_token() {
        for (ask, tls, method, expected) in [
            (
                BackendMessage::AuthenticationSasl(&["SCRAM-SHA-256".to_owned()]).to_bytes(),
                true,
                LoginMethod::Auto,
                "gprxy connect: the server offers SCRAM-SHA-256 for this user, not OAUTHBEARER",
            ),
            (
                proto::frame(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]),
                true,
                LoginMethod::Auto,
                "gprxy connect: the server asks for an MD5 password; this profile logs in only with a token (OAUTHBEARER or the token as a password)",
            ),
            (
                BackendMessage::AuthenticationCleartextPassword.to_bytes(),
                false,
                LoginMethod::Auto,
                "gprxy connect: the server asks for the token as a password over a connection without TLS; refused",
            ),
            (
                BackendMessage::AuthenticationCleartextPassword.to_bytes(),
                true,
                LoginMethod::Oauthbearer,
                "gprxy connect: the server asks for a password; this profile logs in only with a token (OAUTHBEARER)",
            ),
        ] {
            let (ours, theirs) = pair();
            let fake = tokio::spawn(server(theirs, vec![(ask, false)]));
            match log_in(ours, tls, method, &params(), &token()).await {
                Err(LoginError::Refused(s, m)) => assert_eq!((s.code(), m.as_str()), ("28000", expected)),
                other => panic!("{expected}: {:?}", other.err()),
            }
            fake.await.unwrap();
        }
    }
}

#[cfg(test)]
mod hostile {
    use super::*;
    use crate::conn::duplex::{next, pair};

    fn ctx() -> Arc<Ctx> {
        let text = "[profile.p]\nupstream = \"127.0.0.1:1\"\ntls.mode = \"insecure-plain-for-tests\"\n\
                    listen.unix_dir = \"/nonexistent\"\ntoken.source = \"file\"\ntoken.path = \"/nonexistent\"\n";
        let cfg = super::super::config::ConnectConfig::parse(text).unwrap();
        Arc::new(Ctx::new(cfg.profile(None).unwrap().clone()).unwrap())
    }

    async fn error_for(bytes: Vec<u8>) -> (String, String) {
        let (ours, mut theirs) = pair();
        let task = tokio::spawn(handle(ctx(), ours, "test".into(), ()));
        theirs.write_all(&bytes).await.unwrap();
        let mut buf = BytesMut::new();
        // The refusal is the first thing sent (an SSLRequest with bytes after it gets no `N`).
        let m = next(&mut theirs, &mut buf).await;
        assert_eq!(m.tag, b'E');
        task.await.unwrap();
        proto::error_fields(&m)
    }

    #[tokio::test]
    async fn bytes_sent_with_an_encryption_request_are_refused() {
        let mut bytes = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let mut startup = BytesMut::new();
        frontend::startup_message([("user", "alice")], &mut startup).unwrap();
        bytes.extend_from_slice(&startup);
        assert_eq!(
            error_for(bytes).await,
            (
                "08P01".into(),
                "gprxy connect: invalid startup packet: bytes after an encryption request".into()
            )
        );
    }

    #[tokio::test]
    async fn an_oversized_startup_packet_is_refused_before_it_is_read() {
        let bytes = 20_000u32.to_be_bytes().to_vec();
        assert_eq!(
            error_for(bytes).await,
            (
                "08P01".into(),
                "gprxy connect: startup packet of 20000 bytes exceeds the limit of 10000".into()
            )
        );
    }

    #[tokio::test]
    async fn without_a_token_the_application_is_told_why() {
        let mut startup = BytesMut::new();
        frontend::startup_message([("user", "alice")], &mut startup).unwrap();
        let (code, message) = error_for(startup.to_vec()).await;
        assert_eq!(code, "08006");
        assert!(message.starts_with("gprxy connect: no token for profile p: /nonexistent: "), "{message}");
    }
}
