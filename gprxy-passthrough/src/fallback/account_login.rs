//! Fallback mode's login upstream: the service account logs in with SCRAM-SHA-256, and is
//! refused when it has powers beyond its grants.

use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;

use super::pool::ServerConn;
use super::upstream_failed;
use crate::config::Config;
use crate::conn::{read_message, send, BoxStream, SessionError, Shared};
use crate::proto::{self, auth, SqlState};
use gprxy_core::context::{ContextKey, ContextSigner};

/// Logs in upstream as `account` with SCRAM-SHA-256. The startup packet holds only what the
/// proxy chose (the client's parameters are set per session, so that a pooled connection
/// carries nothing of an earlier client) and, for a signed context, the connection's nonce.
pub(super) async fn log_in(
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
    let mut up = crate::upstream::connect(shared, config).await?;
    let mut params: Vec<(&str, &str)> =
        vec![("user", account), ("database", database), ("application_name", "gprxy")];
    if let Some(s) = &signer {
        params.push((gprxy_core::context::NONCE_PARAMETER, s.nonce()));
    }
    let mut out = BytesMut::new();
    frontend::startup_message(params, &mut out)?;
    send(&mut up, &out).await?;

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
                frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut reply)?;
                scram = Some(s);
            }
            (b'R', Some(auth::SASL_CONTINUE)) => {
                let s = scram.as_mut().ok_or_else(|| upstream_failed("SASL continue before start"))?;
                s.update(&m.body()[4..]).map_err(|e| upstream_failed(&e.to_string()))?;
                frontend::sasl_response(s.message(), &mut reply)?;
            }
            (b'R', Some(auth::SASL_FINAL)) => {
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
            send(&mut up, &reply).await?;
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
    frontend::query(SQL, &mut out)?;
    send(up, &out).await?;
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
            Err(SessionError::refused(
                SqlState::INVALID_AUTHORIZATION,
                "gprxy: the service account is refused (powers beyond its grants, or settings stored by ALTER ROLE)",
            ))
        }
    }
}

/// The first column of a DataRow as text (None when NULL or malformed).
fn first_column(body: &[u8]) -> Option<String> {
    String::from_utf8(proto::data_row_first(body)?.1.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_row_first_column() {
        assert_eq!(first_column(b"\0\x01\0\0\0\x09BYPASSRLS").as_deref(), Some("BYPASSRLS"));
        assert_eq!(first_column(b"\0\x01\0\0\0\0").as_deref(), Some(""));
        assert_eq!(first_column(b"\0\x01\xff\xff\xff\xff"), None);
        assert_eq!(first_column(b"\0\x01\0\0\0\x09BYPASS"), None);
        assert_eq!(first_column(b"\0\0"), None);
        assert_eq!(first_column(b""), None);
    }
}
