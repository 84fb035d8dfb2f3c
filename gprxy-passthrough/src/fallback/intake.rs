//! Fallback mode's token intake: the client's token, as a cleartext password or through SASL
//! OAUTHBEARER, and its validation.

use std::sync::Arc;

use bytes::BytesMut;

use super::{refused, Fallback};
use crate::conn::{read_message, send, BoxStream, LoginInfo, SessionError};
use crate::proto::{self, BackendMessage, ProtoError};

/// The refusal of a token. What the token itself got wrong is told as it is; why keys could not
/// be had (URLs, resolver and transport errors) only reaches the log.
pub(super) fn token_refused(info: &mut LoginInfo, e: &gprxy_core::ValidationError) -> SessionError {
    match e {
        gprxy_core::ValidationError::Keys(_) => {
            info.detail = Some(e.to_string());
            refused(format!("gprxy: token refused ({}): the issuer's signing keys are unavailable", e.code()))
        }
        _ => refused(format!("gprxy: token refused ({}): {e}", e.code())),
    }
}

/// The token as a cleartext password (TLS only).
pub(super) async fn password_token(
    client: &mut BoxStream,
    cbuf: &mut BytesMut,
    info: &mut LoginInfo,
) -> Result<String, SessionError> {
    info.mechanism = Some("token-password".into());
    if !info.tls {
        return Err(refused("gprxy: token login requires TLS (sslmode=require or stronger)"));
    }
    send(client, &BackendMessage::AuthenticationCleartextPassword.to_bytes()).await?;
    let m = read_message(client, cbuf, proto::MAX_SASL_MESSAGE, "password message").await?;
    if m.tag != b'p' {
        return Err(SessionError::Proto(ProtoError::BadMessage("password")));
    }
    Ok(proto::password(&m)?.trim().to_owned())
}

/// The token through SASL OAUTHBEARER (RFC 7628), as PostgreSQL 18 does it: an empty `auth=`
/// (libpq's discovery round) gets an error challenge naming the issuer and scope.
pub(super) async fn bearer_token(
    client: &mut BoxStream,
    cbuf: &mut BytesMut,
    info: &mut LoginInfo,
    issuer: &str,
    scope: &str,
) -> Result<String, SessionError> {
    info.mechanism = Some("OAUTHBEARER".into());
    if !info.tls {
        return Err(refused("gprxy: token login requires TLS (sslmode=require or stronger)"));
    }
    send(client, &BackendMessage::AuthenticationSasl(&["OAUTHBEARER".to_owned()]).to_bytes()).await?;
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
            // A well-known metadata URL is sent as configured (libpq 18 takes either form).
            let discovery = match gprxy_core::jwks::issuer_from_well_known(issuer) {
                Ok(Some(_)) => issuer.to_owned(),
                _ => format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/')),
            };
            let challenge = serde_json::json!({
                "status": "invalid_token",
                "openid-configuration": discovery,
                "scope": scope,
            })
            .to_string();
            send(client, &BackendMessage::AuthenticationSaslContinue(challenge.as_bytes()).to_bytes())
                .await?;
            // The client acknowledges with a lone kvsep; then the attempt ends (RFC 7628 3.2.3).
            let _ = read_message(client, cbuf, proto::MAX_SASL_MESSAGE, "SASL message").await?;
            Err(refused("gprxy: OAuth bearer authentication failed (token required)"))
        }
    }
}

/// Validates against the issuer the token names (its unverified `iss` only chooses the entry;
/// that entry's policy then checks `iss` like every other claim). A token of an issuer that is
/// not trusted is refused here, with no network request. Validates on this thread against fresh
/// cached keys (microseconds); only when the keys are stale or the token names a key they lack
/// does it go to a blocking thread, which may fetch. Returns the token and its issuer's index.
/// `iss` is the token's unverified `iss` (the login's [`LoginInfo`] has it already).
pub(super) async fn validate(
    fallback: &Arc<Fallback>,
    token: String,
    iss: Option<&str>,
) -> Result<(gprxy_core::ValidatedToken, usize), gprxy_core::ValidationError> {
    use gprxy_core::TokenMode;
    use gprxy_core::ValidationError::{IssuerMissing, IssuerNotTrusted, KidUnknown, NoKeyForAlg};
    let index = match iss {
        Some(iss) => fallback
            .issuers
            .iter()
            .position(|i| i.entry.issuer() == iss)
            .ok_or_else(|| IssuerNotTrusted(gprxy_core::Quoted::new(iss)))?,
        // An opaque token names no issuer: it goes to the one issuer whose tokens are opaque
        // (the configuration allows at most one), never to another.
        None => fallback
            .issuers
            .iter()
            .position(|i| i.entry.mode == TokenMode::Introspect)
            .ok_or(IssuerMissing)?,
    };
    let issuer = &fallback.issuers[index];
    if issuer.entry.mode != TokenMode::Jwt {
        // The endpoint may have to be asked: on a blocking thread.
        let check = fallback.clone();
        return tokio::task::spawn_blocking(move || {
            let issuer = &check.issuers[index];
            gprxy_core::validate_token(
                issuer.entry.mode,
                &issuer.validator,
                &*issuer.cache,
                issuer.introspector.as_deref(),
                &token,
                gprxy_core::unix_time(),
            )
            .map(|t| (t, index))
        })
        .await
        .unwrap_or_else(|_| {
            Err(gprxy_core::ValidationError::IntrospectionUnavailable("validation task failed".into()))
        });
    }
    if let Some(keys) = issuer.cache.fresh_keys() {
        match issuer.validator.validate(&token, &*keys, gprxy_core::unix_time()) {
            Err(KidUnknown(_) | NoKeyForAlg(_)) => {}
            done => return done.map(|t| (t, index)),
        }
    }
    let check = fallback.clone();
    tokio::task::spawn_blocking(move || {
        let issuer = &check.issuers[index];
        issuer.validator.validate(&token, &*issuer.cache, gprxy_core::unix_time()).map(|t| (t, index))
    })
    .await
    .unwrap_or_else(|_| Err(gprxy_core::KeyError::Unavailable("validation task failed".into()).into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;
    use tokio::io::AsyncWriteExt;

    use crate::conn::duplex::{next, pair as client_pair};

    fn tls_info() -> LoginInfo {
        LoginInfo { tls: true, ..LoginInfo::default() }
    }

    #[tokio::test]
    async fn password_intake_asks_for_a_password_and_takes_the_token() {
        let (mut proxy, mut client) = client_pair();
        let (mut info, mut cbuf) = (tls_info(), BytesMut::new());
        let user = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let ask = next(&mut client, &mut buf).await;
            assert_eq!(proto::auth_code(&ask), Some(proto::auth::CLEARTEXT));
            let mut out = BytesMut::new();
            frontend::password_message(b" header.payload.sig\n", &mut out).unwrap();
            client.write_all(&out).await.unwrap();
        });
        let token = password_token(&mut proxy, &mut cbuf, &mut info).await.unwrap();
        user.await.unwrap();
        assert_eq!(token, "header.payload.sig");
        assert_eq!(info.mechanism.as_deref(), Some("token-password"));
    }

    #[tokio::test]
    async fn token_intake_without_tls_is_refused_before_asking() {
        let (mut proxy, _client) = client_pair();
        let mut info = LoginInfo::default();
        let e = password_token(&mut proxy, &mut BytesMut::new(), &mut info).await.unwrap_err();
        assert_eq!(e.to_string(), "gprxy: token login requires TLS (sslmode=require or stronger)");
        let e = bearer_token(&mut proxy, &mut BytesMut::new(), &mut info, "https://idp", "openid")
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "gprxy: token login requires TLS (sslmode=require or stronger)");
    }

    #[tokio::test]
    async fn bearer_intake_offers_oauthbearer_and_takes_the_token() {
        let (mut proxy, mut client) = client_pair();
        let (mut info, mut cbuf) = (tls_info(), BytesMut::new());
        let user = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let offer = next(&mut client, &mut buf).await;
            assert_eq!(proto::sasl_mechanisms(&offer).unwrap(), ["OAUTHBEARER"]);
            let mut out = BytesMut::new();
            frontend::sasl_initial_response("OAUTHBEARER", b"n,,\x01auth=Bearer h.p.s\x01\x01", &mut out)
                .unwrap();
            client.write_all(&out).await.unwrap();
        });
        let token = bearer_token(&mut proxy, &mut cbuf, &mut info, "https://idp", "openid").await.unwrap();
        user.await.unwrap();
        assert_eq!(token, "h.p.s");
        assert!(!info.discovery);
    }

    #[tokio::test]
    async fn bearer_intake_refuses_another_mechanism() {
        let (mut proxy, mut client) = client_pair();
        let (mut info, mut cbuf) = (tls_info(), BytesMut::new());
        let user = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let _offer = next(&mut client, &mut buf).await;
            let mut out = BytesMut::new();
            frontend::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc", &mut out).unwrap();
            client.write_all(&out).await.unwrap();
        });
        let e = bearer_token(&mut proxy, &mut cbuf, &mut info, "https://idp", "openid").await.unwrap_err();
        user.await.unwrap();
        assert_eq!(e.to_string(), "gprxy: SASL mechanism \"SCRAM-SHA-256\" is not offered");
    }

    /// libpq's first OAUTHBEARER attempt carries no token: it is told where the issuer is and
    /// which scope to ask for, acknowledges, and the attempt ends refused.
    #[tokio::test]
    async fn discovery_round_names_the_issuer_and_scope_then_refuses() {
        for (issuer, discovery) in [
            ("https://idp/tenant/", "https://idp/tenant/.well-known/openid-configuration"),
            // #30 item 1: a configured well-known metadata URL is sent as it is.
            (
                "https://idp/.well-known/oauth-authorization-server/tenant",
                "https://idp/.well-known/oauth-authorization-server/tenant",
            ),
        ] {
            discovery_round(issuer, discovery).await;
        }
    }

    async fn discovery_round(issuer: &str, discovery: &str) {
        let (mut proxy, mut client) = client_pair();
        let (mut info, mut cbuf) = (tls_info(), BytesMut::new());
        let user = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let _offer = next(&mut client, &mut buf).await;
            let mut out = BytesMut::new();
            frontend::sasl_initial_response("OAUTHBEARER", b"n,,\x01auth=\x01\x01", &mut out).unwrap();
            client.write_all(&out).await.unwrap();
            let challenge = next(&mut client, &mut buf).await;
            assert_eq!(proto::auth_code(&challenge), Some(proto::auth::SASL_CONTINUE));
            let json: serde_json::Value = serde_json::from_slice(&challenge.body()[4..]).unwrap();
            let mut out = BytesMut::new();
            frontend::sasl_response(b"\x01", &mut out).unwrap();
            client.write_all(&out).await.unwrap();
            json
        });
        let e = bearer_token(&mut proxy, &mut cbuf, &mut info, issuer, "openid db").await.unwrap_err();
        let json = user.await.unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "status": "invalid_token",
                "openid-configuration": discovery,
                "scope": "openid db",
            })
        );
        assert_eq!(e.to_string(), "gprxy: OAuth bearer authentication failed (token required)");
        assert!(info.discovery);
    }
}
