//! Pass-through mode (PostgreSQL 18): the server authenticates. gprxy relays the
//! authentication exchange (SASL OAUTHBEARER unchanged, any other method as it is), records the
//! login, and bridges token-as-password for drivers without OAUTHBEARER: the client's cleartext
//! password goes upstream as an OAUTHBEARER token.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::conn::{send, send_ready, BoxStream, LoginInfo, SessionError, Shared, Upstream};
use crate::fallback::reap;
use crate::lifetime::{relay_watched, RelayEnd, SessionEnd};
use crate::proto::{self, auth, BackendMessage, ProtoError, SqlState, Startup};
use crate::track::Tracker;

/// Logs the client in through the server: the startup packet (less the proxy's own
/// parameters) goes upstream, then the authentication exchange is relayed.
pub async fn log_in(
    shared: &Shared,
    config: &Config,
    client: &mut BoxStream,
    startup: &Startup,
    buf: BytesMut,
    info: &mut LoginInfo,
) -> Result<Upstream, SessionError> {
    let (packet, dropped) = without_proxy_params(&startup.raw);
    if !dropped.is_empty() {
        tracing::warn!(event = "startup", dropped = ?dropped, "the client's gprxy.* startup parameters were dropped");
    }
    let mut up = crate::upstream::connect(shared, config).await?;
    send(&mut up, &packet).await?;
    authenticate(shared, config, client, up, buf, info).await
}

/// Relays until either side closes or the session's end comes, then forgets the session's
/// cancel key. Without an end, bytes are copied both ways as they are (no framing).
pub async fn run(shared: &Shared, client: &mut BoxStream, mut up: Upstream, end: Option<SessionEnd>) {
    // Taken, so that the login's buffers are not held for the rest of the session.
    let (to_server, to_client) =
        (std::mem::take(&mut up.leftover_client), std::mem::take(&mut up.leftover_server));
    match end {
        None => copy(shared, client, &mut up.stream, to_server, to_client).await,
        Some(end) => Box::pin(watch(shared, client, &mut up, to_server, to_client, &end)).await,
    }
    if let Some(k) = &up.key {
        shared.cancel_keys.remove(k);
    }
}

/// The plain relay.
async fn copy(
    shared: &Shared,
    client: &mut BoxStream,
    up: &mut BoxStream,
    to_server: BytesMut,
    to_client: BytesMut,
) {
    let written = async {
        if !to_server.is_empty() {
            up.write_all(&to_server).await?;
        }
        if !to_client.is_empty() {
            client.write_all(&to_client).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    if written.await.is_ok() {
        drop((to_server, to_client));
        let (sent, received) = shared.metrics.relayed_bytes();
        let _ = crate::relay::copy_both_ways(client, up, sent, received).await;
    }
}

/// The relay of a session that ends: at its end the client gets the FATAL, a running request
/// is cancelled when the end was forced, and the server is told goodbye.
async fn watch(
    shared: &Shared,
    client: &mut BoxStream,
    up: &mut Upstream,
    to_server: BytesMut,
    to_client: BytesMut,
    end: &SessionEnd,
) {
    let mut track = Tracker::default();
    let relay_end =
        relay_watched(&shared.metrics, client, &mut up.stream, to_server, to_client, &mut track, Some(end))
            .await;
    // Terminate is sent only between the client's messages (the client's own was not relayed).
    let mut goodbye = track.client_between_messages();
    // Requests left running: a client that left with requests unanswered, or a forced end.
    let running = track.in_flight() > 0 || track.unsynced();
    let mut forced = false;
    match relay_end {
        RelayEnd::ClientLeft => {}
        RelayEnd::Broken => goodbye = false,
        RelayEnd::Ended { ending, server_in_step, .. } => {
            end.record(&shared.metrics, ending);
            goodbye = server_in_step;
            forced = ending.forced();
        }
    }
    let config = shared.config.read().clone();
    // A forced end with a request running: with a terminator the process is ended at once (a
    // cancel could be caught and the statement commit after the end); otherwise cancelled.
    if forced && running {
        if let (Some(t), Some(key)) = (&config.terminator, &up.key) {
            let killer = reap::Killer { user: &t.user, database: &t.database, password: &t.password };
            Box::pin(reap::end_process(shared, killer, key.0, &mut up.stream)).await;
            // Gone, or gprxy gave up: a goodbye it will read if it ever goes idle.
            let mut out = BytesMut::new();
            frontend::terminate(&mut out);
            let _ = up.stream.write_all(&out).await;
            let _ = up.stream.shutdown().await;
            return;
        }
    }
    let cancel = running;
    if cancel {
        if let Some(key) = &up.key {
            let _ = crate::upstream::cancel(shared, &config, key).await;
        }
    }
    if goodbye {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = up.stream.write_all(&out).await;
        let _ = up.stream.flush().await;
    }
    // Requests were running: the server process must be gone, not only the socket. A statement
    // that caught the cancel is ended by `[session] terminate_user`, when configured.
    if cancel && !crate::fallback::pool::server_closed(&mut up.stream, STATEMENT_END_WAIT).await {
        match (&config.terminator, &up.key) {
            (Some(t), Some(key)) => {
                let killer = reap::Killer { user: &t.user, database: &t.database, password: &t.password };
                Box::pin(reap::end_process(shared, killer, key.0, &mut up.stream)).await;
            }
            _ => tracing::warn!(
                event = "end_backend",
                pid = up.key.as_ref().map_or(0, |k| k.0),
                "the session's server process still runs after the cancel; set [session] terminate_user \
                 (or keep gprxy_validator's own gprxy.session_policy on) so that it is ended"
            ),
        }
    }
    let _ = up.stream.shutdown().await;
}

/// How long a cancelled session's server process may take to close after Terminate before
/// it is ended by `[session] terminate_user`.
const STATEMENT_END_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

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
                                SqlState::INVALID_AUTHORIZATION,
                                "gprxy: the token-as-password bridge requires TLS (sslmode=require or stronger)",
                            ));
                        }
                        bridge = Bridge::AwaitPassword;
                        info.mechanism = Some("OAUTHBEARER".into());
                        BackendMessage::AuthenticationCleartextPassword.encode(&mut to_client);
                    } else {
                        BackendMessage::AuthenticationSasl(&mechs).encode(&mut to_client);
                    }
                }
                (b'R', Some(auth::SASL_CONTINUE)) if bridge == Bridge::Sent => {
                    // The server's OAUTHBEARER error challenge: finish the exchange (RFC 7628).
                    frontend::sasl_response(b"\x01", &mut to_server)?;
                }
                (b'R', Some(code)) => {
                    if info.mechanism.is_none() {
                        info.mechanism = Some(match code {
                            auth::CLEARTEXT => "password".into(),
                            auth::MD5 => "md5".into(),
                            auth::GSS => "gss".into(),
                            auth::SSPI => "sspi".into(),
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
                    send(client, &to_client).await?;
                    let (sqlstate, message) = proto::error_fields(&m);
                    let _ = up.shutdown().await;
                    return Err(SessionError::Server { sqlstate, message });
                }
                (b'Z', _) if authenticated => {
                    to_client.extend_from_slice(&m.raw);
                    send_ready(&shared.cancel_keys, client, &to_client, key.as_ref(), key.as_ref()).await?;
                    if info.mechanism.is_none() {
                        info.mechanism = Some("trust".into());
                    }
                    return Ok(Upstream { stream: up, key, leftover_client: cbuf, leftover_server: sbuf });
                }
                _ => to_client.extend_from_slice(&m.raw),
            }
        }
        if !to_client.is_empty() {
            send(client, &to_client).await?;
            to_client.clear();
        }
        // Client messages during authentication: password and SASL messages only.
        while let Some(m) =
            proto::parse_message(&mut cbuf, proto::MAX_SASL_MESSAGE, "authentication message")?
        {
            match m.tag {
                b'p' if bridge == Bridge::AwaitPassword => {
                    let token = proto::password(&m)?;
                    info.note_token(token);
                    let sasl = format!("n,,\x01auth=Bearer {token}\x01\x01");
                    frontend::sasl_initial_response("OAUTHBEARER", sasl.as_bytes(), &mut to_server)?;
                    bridge = Bridge::Sent;
                }
                b'p' => {
                    if info.mechanism.is_none() {
                        if let Ok((mech, data)) = proto::parse_sasl_initial(&m) {
                            if mech == "OAUTHBEARER" {
                                match data.as_deref().map(proto::oauthbearer_token) {
                                    Some(Ok(Some(t))) => info.note_token(t),
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
            send(&mut up, &to_server).await?;
            to_server.clear();
        }
        tokio::select! {
            r = client.read_buf(&mut cbuf) => { if r? == 0 { return Err(SessionError::ClientGone); } }
            r = up.read_buf(&mut sbuf) => {
                if r? == 0 {
                    return Err(SessionError::refused(SqlState::CONNECTION_FAILURE, "gprxy: the database server closed the connection"));
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::duplex::{next, pair};

    fn proxy(token_as_password: bool) -> std::sync::Arc<crate::session::Proxy> {
        let overrides =
            crate::config::Overrides { upstream: Some("127.0.0.1:5432".into()), ..Default::default() };
        let mut config = Config::load(None, &overrides).unwrap();
        config.token_as_password = token_as_password;
        crate::server::proxy(config).unwrap()
    }

    fn sasl_offer(mechanisms: &[&str]) -> BytesMut {
        let m: Vec<String> = mechanisms.iter().map(|m| (*m).to_owned()).collect();
        BackendMessage::AuthenticationSasl(&m).to_bytes()
    }

    /// A driver without OAUTHBEARER is asked for a password; its token goes upstream as an
    /// OAUTHBEARER initial response, and the server's answer comes back as it is.
    #[tokio::test]
    async fn bridge_sends_the_password_upstream_as_a_bearer_token() {
        let proxy = proxy(true);
        let config = proxy.shared.config.read().clone();
        let (mut client_end, mut client) = pair();
        let (up_end, mut server) = pair();
        let fake_server = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            send(&mut server, &sasl_offer(&["OAUTHBEARER", "SCRAM-SHA-256-PLUS"])).await.unwrap();
            let initial = next(&mut server, &mut buf).await;
            let mut done = BackendMessage::AuthenticationOk.to_bytes();
            BackendMessage::BackendKeyData { pid: 42, secret: b"k3y!" }.encode(&mut done);
            BackendMessage::ReadyForQuery(b'I').encode(&mut done);
            send(&mut server, &done).await.unwrap();
            initial
        });
        let user = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let ask = next(&mut client, &mut buf).await;
            let mut out = BytesMut::new();
            frontend::password_message(b"h.p.s", &mut out).unwrap();
            send(&mut client, &out).await.unwrap();
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(next(&mut client, &mut buf).await.tag);
            }
            (proto::auth_code(&ask), got)
        });
        let mut info = LoginInfo { tls: true, ..LoginInfo::default() };
        let up = authenticate(&proxy.shared, &config, &mut client_end, up_end, BytesMut::new(), &mut info)
            .await
            .unwrap();
        let initial = fake_server.await.unwrap();
        let (asked, got) = user.await.unwrap();
        assert_eq!(asked, Some(auth::CLEARTEXT));
        assert_eq!(got, [b'R', b'K', b'Z']);
        let (mechanism, data) = proto::parse_sasl_initial(&initial).unwrap();
        assert_eq!(mechanism, "OAUTHBEARER");
        assert_eq!(data.as_deref(), Some(&b"n,,\x01auth=Bearer h.p.s\x01\x01"[..]));
        assert_eq!(info.mechanism.as_deref(), Some("OAUTHBEARER"));
        assert_eq!(up.key, Some((42, b"k3y!".to_vec())));
        assert_eq!(proxy.shared.cancel_keys.get(&(42, b"k3y!".to_vec())), Some((42, b"k3y!".to_vec())));
    }

    /// A token the server refuses: its error challenge is answered by gprxy (the client asked
    /// for a password, not SASL) and the server's ErrorResponse reaches the client.
    #[tokio::test]
    async fn bridge_answers_the_error_challenge_and_relays_the_refusal() {
        let proxy = proxy(true);
        let config = proxy.shared.config.read().clone();
        let (mut client_end, mut client) = pair();
        let (up_end, mut server) = pair();
        let fake_server = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            send(&mut server, &sasl_offer(&["OAUTHBEARER"])).await.unwrap();
            let _initial = next(&mut server, &mut buf).await;
            send(
                &mut server,
                &BackendMessage::AuthenticationSaslContinue(br#"{"status":"invalid_token"}"#).to_bytes(),
            )
            .await
            .unwrap();
            let ack = next(&mut server, &mut buf).await;
            let refusal = BackendMessage::ErrorResponse {
                sqlstate: SqlState::INVALID_AUTHORIZATION,
                message: "OAuth bearer authentication failed for user \"alice\"",
            };
            send(&mut server, &refusal.to_bytes()).await.unwrap();
            ack
        });
        let user = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let _ask = next(&mut client, &mut buf).await;
            let mut out = BytesMut::new();
            frontend::password_message(b"expired.token.sig", &mut out).unwrap();
            send(&mut client, &out).await.unwrap();
            proto::error_fields(&next(&mut client, &mut buf).await)
        });
        let mut info = LoginInfo { tls: true, ..LoginInfo::default() };
        let e = authenticate(&proxy.shared, &config, &mut client_end, up_end, BytesMut::new(), &mut info)
            .await
            .err()
            .unwrap();
        let ack = fake_server.await.unwrap();
        assert_eq!((ack.tag, ack.body()), (b'p', &b"\x01"[..]));
        let told = user.await.unwrap();
        assert_eq!(
            told,
            ("28000".to_owned(), "OAuth bearer authentication failed for user \"alice\"".to_owned())
        );
        assert!(matches!(e, SessionError::Server { ref sqlstate, .. } if sqlstate == "28000"), "{e}");
    }

    #[tokio::test]
    async fn bridge_refuses_a_client_without_tls() {
        let proxy = proxy(true);
        let config = proxy.shared.config.read().clone();
        let (mut client_end, _client) = pair();
        let (up_end, mut server) = pair();
        send(&mut server, &sasl_offer(&["OAUTHBEARER"])).await.unwrap();
        let mut info = LoginInfo::default();
        // Refused at once: without the check the bridge would wait for a password.
        let login = authenticate(&proxy.shared, &config, &mut client_end, up_end, BytesMut::new(), &mut info);
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), login)
            .await
            .expect("refused without waiting for the client")
            .err()
            .unwrap();
        assert_eq!(
            e.client_message(),
            Some((
                SqlState::INVALID_AUTHORIZATION,
                "gprxy: the token-as-password bridge requires TLS (sslmode=require or stronger)".to_owned()
            ))
        );
    }

    /// Without the bridge, the offer reaches the client as the server made it, less the
    /// channel-binding mechanism that cannot cross gprxy.
    #[tokio::test]
    async fn without_the_bridge_the_sasl_offer_is_relayed_less_channel_binding() {
        let proxy = proxy(false);
        let config = proxy.shared.config.read().clone();
        let (mut client_end, mut client) = pair();
        let (up_end, mut server) = pair();
        send(&mut server, &sasl_offer(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "OAUTHBEARER"]))
            .await
            .unwrap();
        let user = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let offer = next(&mut client, &mut buf).await;
            // The client stays connected: the login waits for its answer.
            (proto::sasl_mechanisms(&offer).unwrap(), client)
        });
        let mut info = LoginInfo::default();
        let login = authenticate(&proxy.shared, &config, &mut client_end, up_end, BytesMut::new(), &mut info);
        let offered = tokio::select! {
            offered = user => offered.unwrap().0,
            _ = login => panic!("the login ended before the client saw the offer"),
        };
        assert_eq!(offered, ["SCRAM-SHA-256", "OAUTHBEARER"]);
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
