//! Fallback mode's session set-up: a checked-out server connection gets the client's settings
//! and the user's context in one statement, and is handed out only when its answer shows it idle
//! and in step.

use bytes::BytesMut;
use postgres_protocol::message::frontend;

use super::pool::{random_marker, ServerConn};
use super::upstream_failed;
use crate::conn::{read_message, send, BoxStream, SessionError};
use crate::proto::{self, SqlState, Startup};

/// Hands a checked-out connection to its session: settings and, when signed, the next context.
pub(super) async fn prepare(
    conn: &mut ServerConn,
    sbuf: &mut BytesMut,
    settings: &[(String, String)],
    t: &gprxy_core::ValidatedToken,
    roles: &[String],
    end: Option<gprxy_core::context::ContextEnd>,
) -> Result<BytesMut, SessionError> {
    // The roles after the issuer's role map: what the account map saw, and what gprxy.roles()
    // says; the session's end, which the server checks too.
    let signed = conn.signer.as_mut().map(|s| {
        s.sign_ending(gprxy_core::context::Signed {
            sub: t.subject.clone(),
            identity: Some(t.identity.clone()),
            roles: roles.to_vec(),
            claims: t.claims.clone(),
            end,
        })
    });
    set_up_session(&mut conn.stream, sbuf, settings, signed.as_deref()).await
}

/// The client's startup parameters as session settings: set with `set_config` for each session
/// (and undone by `DISCARD ALL`), never in a pooled connection's startup packet. `options` may
/// hold `-c name=value` and `--name=value`; the proxy's own names are refused.
pub(super) fn client_settings(
    startup: &Startup,
    context: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
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

/// Whether a set-up failed because of its server connection (dead, or not in step) rather
/// than because of what it set.
pub(super) fn connection_failed(e: &SessionError) -> bool {
    matches!(e, SessionError::Io(_) | SessionError::ClientGone | SessionError::NotReady)
}

fn not_ready(what: &str) -> SessionError {
    tracing::warn!(event = "pool", problem = what, "fallback: server connection not ready at set-up");
    SessionError::NotReady
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
    let marker = random_marker("gprxy-setup-").ok_or_else(|| not_ready("no randomness"))?;
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
    frontend::parse("", &sql, std::iter::empty(), &mut out)?;
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
    frontend::execute("", 0, &mut out)?;
    frontend::sync(&mut out);
    send(up, &out).await?;
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
            // A setting the server refused keeps its code (unknown, bad value, not allowed).
            let sqlstate = SqlState::known(&code)
                .filter(|s| {
                    [
                        SqlState::UNDEFINED_OBJECT,
                        SqlState::INVALID_PARAMETER_VALUE,
                        SqlState::INSUFFICIENT_PRIVILEGE,
                    ]
                    .contains(s)
                })
                .unwrap_or(SqlState::CONNECTION_FAILURE);
            Err(SessionError::refused(sqlstate, format!("gprxy: session set-up failed: {msg}")))
        }
    }
}

/// Whether a DataRow body has `columns` columns, the first being `marker` as text.
fn data_row_starts_with(body: &[u8], columns: usize, marker: &str) -> bool {
    proto::data_row_first(body)
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
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
        r.is_err_and(|e| {
            e.client_message()
                == Some((
                    SqlState::CONNECTION_FAILURE,
                    "gprxy: the server connection was not ready for a new session".to_owned(),
                ))
        })
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
            Err(SessionError::Refused { sqlstate: SqlState::UNDEFINED_OBJECT, message }) => {
                assert_eq!(message, "gprxy: session set-up failed: unrecognized configuration parameter");
            }
            other => panic!("{other:?}"),
        }
    }
}
