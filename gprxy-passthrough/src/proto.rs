//! PostgreSQL wire protocol framing, without I/O.
//!
//! <https://www.postgresql.org/docs/18/protocol-message-formats.html>. Every length read from the
//! wire is checked against a hard maximum before any memory is reserved; a parser returns
//! `Ok(None)` when it needs more bytes.

use bytes::{Buf, BufMut, BytesMut};

/// PostgreSQL's own limit on a startup packet (src/include/libpq/pqcomm.h, MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// SSLRequest code.
pub const SSL_REQUEST: u32 = 80_877_103;
/// GSSENCRequest code.
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// CancelRequest code.
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// Longest cancel key (protocol 3.2 allows up to 256 bytes).
pub const MAX_CANCEL_KEY: usize = 256;
/// A bearer token is at most 65535 bytes; the SASL message around it adds a little.
pub const MAX_SASL_MESSAGE: usize = 65_535 + 1024;
/// Largest authentication-phase message from a server we accept.
pub const MAX_SERVER_AUTH_MESSAGE: usize = 1 << 20;

/// A protocol violation; the connection is ended with an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A length field is below its own size.
    #[error("invalid length {0} in message header")]
    BadLength(u32),
    /// A message is longer than allowed for its kind.
    #[error("{kind} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Which message.
        kind: &'static str,
        /// Announced length.
        len: usize,
        /// Its limit.
        max: usize,
    },
    /// The startup packet's protocol version is not 3.x.
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol {
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// The startup packet's parameters are malformed.
    #[error("invalid startup packet: {0}")]
    BadStartup(&'static str),
    /// A message body is malformed.
    #[error("invalid {0} message")]
    BadMessage(&'static str),
    /// The startup packet names a parameter twice (PostgreSQL would use the last, a log or a
    /// check the first): refused. Holds the name, cut to 64 characters.
    #[error("invalid startup packet: parameter {0:?} is given more than once")]
    DuplicateParameter(String),
}

/// The first packet a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    /// SSLRequest.
    SslRequest,
    /// GSSENCRequest.
    GssEncRequest,
    /// CancelRequest with the process id and (variable-length) secret key.
    Cancel {
        /// Backend process id.
        pid: i32,
        /// Secret key (4 bytes before protocol 3.2).
        key: Vec<u8>,
    },
    /// StartupMessage.
    Startup(Startup),
}

/// A StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    /// Protocol version (major << 16 | minor).
    pub version: u32,
    /// Parameters in order.
    pub params: Vec<(String, String)>,
    /// The packet as received, to forward unchanged.
    pub raw: Vec<u8>,
}

impl Startup {
    /// A parameter's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Parses the first packet (untyped: length then code). `Ok(None)`: need more bytes.
pub fn parse_first_packet(buf: &mut BytesMut) -> Result<Option<FirstPacket>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(ProtoError::BadLength(len));
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(ProtoError::TooLong { kind: "startup packet", len, max: MAX_STARTUP_PACKET });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let packet = buf.split_to(len);
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let body = &packet[8..];
    match code {
        SSL_REQUEST if len == 8 => Ok(Some(FirstPacket::SslRequest)),
        GSSENC_REQUEST if len == 8 => Ok(Some(FirstPacket::GssEncRequest)),
        SSL_REQUEST | GSSENC_REQUEST => Err(ProtoError::BadStartup("request with a body")),
        CANCEL_REQUEST => {
            if body.len() < 8 || body.len() - 4 > MAX_CANCEL_KEY {
                return Err(ProtoError::BadStartup("cancel request length"));
            }
            let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            Ok(Some(FirstPacket::Cancel { pid, key: body[4..].to_vec() }))
        }
        version => {
            let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
            if major != 3 {
                return Err(ProtoError::UnsupportedProtocol { major, minor });
            }
            let params = parse_params(body)?;
            Ok(Some(FirstPacket::Startup(Startup { version, params, raw: packet.to_vec() })))
        }
    }
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, ProtoError> {
    let mut params = Vec::new();
    loop {
        let (key, rest) = take_cstr(body).ok_or(ProtoError::BadStartup("unterminated parameter name"))?;
        if key.is_empty() {
            if !rest.is_empty() {
                return Err(ProtoError::BadStartup("bytes after the terminator"));
            }
            break;
        }
        let (value, rest) = take_cstr(rest).ok_or(ProtoError::BadStartup("unterminated parameter value"))?;
        params.push((key, value));
        body = rest;
    }
    let mut names: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(ProtoError::DuplicateParameter(twice[0].chars().take(64).collect()));
    }
    if !params.iter().any(|(k, _)| k == "user") {
        return Err(ProtoError::BadStartup("no user name"));
    }
    Ok(params)
}

fn take_cstr(b: &[u8]) -> Option<(String, &[u8])> {
    let nul = b.iter().position(|&c| c == 0)?;
    let s = std::str::from_utf8(&b[..nul]).ok()?.to_owned();
    Some((s, &b[nul + 1..]))
}

/// A typed message (tag, then a length that counts itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The tag byte.
    pub tag: u8,
    /// The whole message, tag included, to forward unchanged.
    pub raw: BytesMut,
}

impl Message {
    /// The body after tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Parses one typed message of at most `max` bytes. `Ok(None)`: need more bytes.
pub fn parse_message(
    buf: &mut BytesMut,
    max: usize,
    kind: &'static str,
) -> Result<Option<Message>, ProtoError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let body_len = (len as usize).checked_sub(4).ok_or(ProtoError::BadLength(len))?;
    if body_len > max {
        return Err(ProtoError::TooLong { kind, len: len as usize, max });
    }
    if buf.len() < 5 + body_len {
        buf.reserve(5 + body_len - buf.len());
        return Ok(None);
    }
    let raw = buf.split_to(5 + body_len);
    Ok(Some(Message { tag: raw[0], raw }))
}

/// The authentication request codes of an `R` message.
pub mod auth {
    /// AuthenticationOk.
    pub const OK: u32 = 0;
    /// AuthenticationCleartextPassword.
    pub const CLEARTEXT: u32 = 3;
    /// AuthenticationMD5Password.
    pub const MD5: u32 = 5;
    /// AuthenticationGSS.
    pub const GSS: u32 = 7;
    /// AuthenticationSSPI.
    pub const SSPI: u32 = 9;
    /// AuthenticationSASL.
    pub const SASL: u32 = 10;
    /// AuthenticationSASLContinue.
    pub const SASL_CONTINUE: u32 = 11;
    /// AuthenticationSASLFinal.
    pub const SASL_FINAL: u32 = 12;
}

/// A SQLSTATE error code (PostgreSQL's Appendix A): the ones gprxy itself sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(&'static str);

impl SqlState {
    /// `connection_failure`: the server side of the session failed.
    pub const CONNECTION_FAILURE: Self = Self("08006");
    /// `protocol_violation`.
    pub const PROTOCOL_VIOLATION: Self = Self("08P01");
    /// `invalid_parameter_value`.
    pub const INVALID_PARAMETER_VALUE: Self = Self("22023");
    /// `invalid_authorization_specification`: the login is refused.
    pub const INVALID_AUTHORIZATION: Self = Self("28000");
    /// `insufficient_privilege`.
    pub const INSUFFICIENT_PRIVILEGE: Self = Self("42501");
    /// `undefined_object`.
    pub const UNDEFINED_OBJECT: Self = Self("42704");
    /// `too_many_connections`.
    pub const TOO_MANY_CONNECTIONS: Self = Self("53300");

    /// The five characters.
    pub fn code(self) -> &'static str {
        self.0
    }

    /// One of ours with this code, if there is one.
    pub fn known(code: &str) -> Option<Self> {
        [
            Self::CONNECTION_FAILURE,
            Self::PROTOCOL_VIOLATION,
            Self::INVALID_PARAMETER_VALUE,
            Self::INVALID_AUTHORIZATION,
            Self::INSUFFICIENT_PRIVILEGE,
            Self::UNDEFINED_OBJECT,
            Self::TOO_MANY_CONNECTIONS,
        ]
        .into_iter()
        .find(|s| s.0 == code)
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Every message gprxy itself writes to a client (what it relays is written as it came).
/// Messages to a server are written with `postgres_protocol::message::frontend`.
#[derive(Debug, Clone, Copy)]
pub enum BackendMessage<'a> {
    /// AuthenticationOk.
    AuthenticationOk,
    /// AuthenticationCleartextPassword.
    AuthenticationCleartextPassword,
    /// AuthenticationSASL with these mechanisms.
    AuthenticationSasl(&'a [String]),
    /// AuthenticationSASLContinue with this server data.
    AuthenticationSaslContinue(&'a [u8]),
    /// BackendKeyData.
    BackendKeyData {
        /// Process id.
        pid: i32,
        /// Secret key (4 bytes in protocol 3.0, up to 256 in 3.2).
        secret: &'a [u8],
    },
    /// ReadyForQuery with this transaction status (`I`, `T` or `E`).
    ReadyForQuery(u8),
    /// ErrorResponse, severity FATAL.
    ErrorResponse {
        /// SQLSTATE.
        sqlstate: SqlState,
        /// Message text (NUL bytes become spaces).
        message: &'a str,
    },
}

impl BackendMessage<'_> {
    /// Appends the message to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut u32_body = |tag: u8, code: u32, rest: &[u8]| {
            out.put_u8(tag);
            out.put_u32((8 + rest.len()) as u32);
            out.put_u32(code);
            out.put_slice(rest);
        };
        match *self {
            Self::AuthenticationOk => u32_body(b'R', auth::OK, b""),
            Self::AuthenticationCleartextPassword => u32_body(b'R', auth::CLEARTEXT, b""),
            Self::AuthenticationSaslContinue(data) => u32_body(b'R', auth::SASL_CONTINUE, data),
            Self::AuthenticationSasl(mechanisms) => {
                let mut body = BytesMut::new();
                for m in mechanisms {
                    body.put_slice(m.as_bytes());
                    body.put_u8(0);
                }
                body.put_u8(0);
                u32_body(b'R', auth::SASL, &body);
            }
            Self::BackendKeyData { pid, secret } => {
                out.put_u8(b'K');
                out.put_u32((8 + secret.len()) as u32);
                out.put_i32(pid);
                out.put_slice(secret);
            }
            Self::ReadyForQuery(status) => {
                out.put_u8(b'Z');
                out.put_u32(5);
                out.put_u8(status);
            }
            Self::ErrorResponse { sqlstate, message } => {
                let mut body = BytesMut::new();
                for (k, v) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', sqlstate.code()), (b'M', message)] {
                    body.put_u8(k);
                    body.put_slice(v.replace('\0', " ").as_bytes());
                    body.put_u8(0);
                }
                body.put_u8(0);
                out.put_slice(&frame(b'E', &body));
            }
        }
    }

    /// The message alone.
    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out
    }
}

/// The code of an Authentication (`R`) message.
pub fn auth_code(m: &Message) -> Option<u32> {
    let b = m.body();
    (m.tag == b'R' && b.len() >= 4).then(|| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The mechanisms of an AuthenticationSASL message.
pub fn sasl_mechanisms(m: &Message) -> Result<Vec<String>, ProtoError> {
    let mut rest = m.body().get(4..).ok_or(ProtoError::BadMessage("AuthenticationSASL"))?;
    let mut out = Vec::new();
    loop {
        let (mech, r) = take_cstr(rest).ok_or(ProtoError::BadMessage("AuthenticationSASL"))?;
        if mech.is_empty() {
            return Ok(out);
        }
        out.push(mech);
        rest = r;
    }
}

/// A typed message with this tag and body.
pub fn frame(tag: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(tag);
    out.put_u32((body.len() + 4) as u32);
    out.put_slice(body);
    out
}

/// The SASLInitialResponse fields: mechanism and client-first data (None: no data).
pub fn parse_sasl_initial(m: &Message) -> Result<(String, Option<Vec<u8>>), ProtoError> {
    let err = ProtoError::BadMessage("SASLInitialResponse");
    let (mech, rest) = take_cstr(m.body()).ok_or(err.clone())?;
    if rest.len() < 4 {
        return Err(err);
    }
    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = &rest[4..];
    match len {
        -1 if data.is_empty() => Ok((mech, None)),
        n if n >= 0 && n as usize == data.len() => Ok((mech, Some(data.to_vec()))),
        _ => Err(err),
    }
}

/// The bearer token of an OAUTHBEARER client-initial-response (RFC 7628 3.1):
/// `Ok(None)` for libpq's discovery round (empty `auth=`).
pub fn oauthbearer_token(data: &[u8]) -> Result<Option<&str>, ProtoError> {
    let err = ProtoError::BadMessage("OAUTHBEARER initial response");
    let text = std::str::from_utf8(data).map_err(|_| err.clone())?;
    let mut parts = text.split('\x01');
    let gs2 = parts.next().ok_or(err.clone())?;
    if !gs2.starts_with("n,") && !gs2.starts_with("y,") {
        return Err(err);
    }
    for kv in parts {
        if let Some(auth) = kv.strip_prefix("auth=") {
            if auth.is_empty() {
                return Ok(None);
            }
            let token =
                auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer ")).ok_or(err.clone())?;
            return Ok(Some(token.trim()));
        }
    }
    Err(err)
}

/// The password of a PasswordMessage (`p`): the text up to its terminator.
pub fn password(m: &Message) -> Result<&str, ProtoError> {
    let raw = m.body().split(|&b| b == 0).next().unwrap_or_default();
    std::str::from_utf8(raw).map_err(|_| ProtoError::BadMessage("password"))
}

/// The fields of an ErrorResponse: (SQLSTATE, message).
pub fn error_fields(m: &Message) -> (String, String) {
    let (mut code, mut msg) = (String::new(), String::new());
    let mut rest = m.body();
    while let Some((&kind, r)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let Some((value, r)) = take_cstr(r) else { break };
        match kind {
            b'C' => code = value,
            b'M' => msg = value,
            _ => {}
        }
        rest = r;
    }
    (code, msg)
}

/// The number of columns of a DataRow and its first column's bytes (None when NULL or malformed).
pub fn data_row_first(body: &[u8]) -> Option<(i16, &[u8])> {
    let columns = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if columns < 1 {
        return None;
    }
    let len = usize::try_from(i32::from_be_bytes(body.get(2..6)?.try_into().ok()?)).ok()?;
    Some((columns, body.get(6..6 + len)?))
}

/// NegotiateProtocolVersion for a client that asked for more than protocol 3.0 (a newer minor
/// version or `_pq_.` options), as a server speaking only 3.0 answers; None when it asked for 3.0.
pub fn negotiate_protocol_version(startup: &Startup) -> Option<BytesMut> {
    let options: Vec<&str> =
        startup.params.iter().map(|(k, _)| k.as_str()).filter(|k| k.starts_with("_pq_.")).collect();
    if startup.version & 0xffff == 0 && options.is_empty() {
        return None;
    }
    let mut body = BytesMut::new();
    body.put_u32(0x0003_0000); // the version offered, as PostgreSQL sends it (3.0)
    body.put_i32(options.len() as i32);
    for o in options {
        body.put_slice(o.as_bytes());
        body.put_u8(0);
    }
    Some(frame(b'v', &body))
}

/// A CancelRequest packet.
pub fn encode_cancel(pid: i32, key: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(12 + key.len());
    out.put_u32((12 + key.len()) as u32);
    out.put_u32(CANCEL_REQUEST);
    out.put_i32(pid);
    out.put_slice(key);
    out
}

/// BackendKeyData: (pid, key).
pub fn backend_key(m: &Message) -> Option<(i32, Vec<u8>)> {
    let mut b = m.body();
    (m.tag == b'K' && b.len() >= 8 && b.len() - 4 <= MAX_CANCEL_KEY).then(|| {
        let pid = b.get_i32();
        (pid, b.to_vec())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> BytesMut {
        let mut body = BytesMut::new();
        body.put_u32(196_608);
        for (k, v) in params {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut out = BytesMut::new();
        out.put_u32(body.len() as u32 + 4);
        out.put_slice(&body);
        out
    }

    #[test]
    fn startup_roundtrip_and_partial_reads() {
        let full = startup(&[("user", "alice"), ("database", "db")]);
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert_eq!(parse_first_packet(&mut b), Ok(None), "cut at {cut}");
        }
        let mut b = full.clone();
        match parse_first_packet(&mut b).unwrap().unwrap() {
            FirstPacket::Startup(s) => {
                assert_eq!(s.param("user"), Some("alice"));
                assert_eq!(s.param("database"), Some("db"));
                assert_eq!(s.raw, full.to_vec());
            }
            other => panic!("{other:?}"),
        }
        assert!(b.is_empty());
    }

    #[test]
    fn startup_limits_and_garbage() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 3, 0, 0, 0, 0][..]);
        assert_eq!(parse_first_packet(&mut b), Err(ProtoError::BadLength(3)));
        let mut b = BytesMut::from(&[0u8, 0, 0x27, 0x11][..]);
        assert_eq!(
            parse_first_packet(&mut b),
            Err(ProtoError::TooLong { kind: "startup packet", len: 10_001, max: 10_000 })
        );
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(parse_first_packet(&mut b).is_err());
        let mut b = startup(&[("database", "db")]);
        assert_eq!(parse_first_packet(&mut b), Err(ProtoError::BadStartup("no user name")));
        let mut b = BytesMut::from(&[0u8, 0, 0, 8, 0, 2, 0, 0][..]);
        assert_eq!(parse_first_packet(&mut b), Err(ProtoError::UnsupportedProtocol { major: 2, minor: 0 }));
    }

    #[test]
    fn a_parameter_named_twice_is_refused() {
        let mut b = startup(&[("user", "alice"), ("database", "db"), ("user", "postgres")]);
        assert_eq!(parse_first_packet(&mut b), Err(ProtoError::DuplicateParameter("user".into())));
        let mut b = startup(&[("user", "a"), ("options", "-c x=1"), ("options", "-c y=2")]);
        assert_eq!(
            parse_first_packet(&mut b).unwrap_err().to_string(),
            "invalid startup packet: parameter \"options\" is given more than once"
        );
        let long = "n".repeat(4000);
        let mut b = startup(&[("user", "a"), (long.as_str(), "1"), (long.as_str(), "2")]);
        let Err(ProtoError::DuplicateParameter(name)) = parse_first_packet(&mut b) else { panic!() };
        assert_eq!(name.len(), 64, "the name is cut for the message");
    }

    #[test]
    fn ssl_gss_cancel() {
        let mut b = BytesMut::new();
        b.put_u32(8);
        b.put_u32(SSL_REQUEST);
        b.put_u32(8);
        b.put_u32(GSSENC_REQUEST);
        assert_eq!(parse_first_packet(&mut b), Ok(Some(FirstPacket::SslRequest)));
        assert_eq!(parse_first_packet(&mut b), Ok(Some(FirstPacket::GssEncRequest)));
        let mut b = encode_cancel(42, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(
            parse_first_packet(&mut b),
            Ok(Some(FirstPacket::Cancel { pid: 42, key: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] }))
        );
    }

    #[test]
    fn typed_messages_bounded() {
        let mut b = frame(b'p', b"hello");
        assert_eq!(parse_message(&mut b, 100, "x").unwrap().unwrap().body(), b"hello");
        let mut b = BytesMut::from(&[b'p', 0, 0, 0, 2][..]);
        assert_eq!(parse_message(&mut b, 100, "x"), Err(ProtoError::BadLength(2)));
        let mut b = BytesMut::from(&[b'p', 0x7f, 0, 0, 0][..]);
        assert!(matches!(parse_message(&mut b, 100, "x"), Err(ProtoError::TooLong { .. })));
    }

    #[test]
    fn sasl_helpers() {
        let m = Message {
            tag: b'R',
            raw: BackendMessage::AuthenticationSasl(&["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()])
                .to_bytes(),
        };
        assert_eq!(auth_code(&m), Some(auth::SASL));
        assert_eq!(sasl_mechanisms(&m).unwrap(), vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let mut raw = BytesMut::new();
        postgres_protocol::message::frontend::sasl_initial_response(
            "OAUTHBEARER",
            b"n,,\x01auth=Bearer abc.def.ghi\x01\x01",
            &mut raw,
        )
        .unwrap();
        let init = Message { tag: b'p', raw };
        let (mech, data) = parse_sasl_initial(&init).unwrap();
        assert_eq!(mech, "OAUTHBEARER");
        assert_eq!(oauthbearer_token(&data.unwrap()).unwrap(), Some("abc.def.ghi"));
        assert_eq!(oauthbearer_token(b"n,,\x01auth=\x01\x01").unwrap(), None);
        assert!(oauthbearer_token(b"garbage").is_err());
        let e = Message {
            tag: b'E',
            raw: BackendMessage::ErrorResponse {
                sqlstate: SqlState::INVALID_AUTHORIZATION,
                message: "no\0pe",
            }
            .to_bytes(),
        };
        assert_eq!(error_fields(&e), ("28000".into(), "no pe".into()));
    }

    #[test]
    fn backend_messages_encode_as_postgresql_sends_them() {
        assert_eq!(&BackendMessage::AuthenticationOk.to_bytes()[..], b"R\0\0\0\x08\0\0\0\0");
        assert_eq!(&BackendMessage::AuthenticationCleartextPassword.to_bytes()[..], b"R\0\0\0\x08\0\0\0\x03");
        assert_eq!(
            &BackendMessage::AuthenticationSaslContinue(b"{}").to_bytes()[..],
            b"R\0\0\0\x0a\0\0\0\x0b{}"
        );
        assert_eq!(
            &BackendMessage::BackendKeyData { pid: 7, secret: b"abcd" }.to_bytes()[..],
            b"K\0\0\0\x0c\0\0\0\x07abcd"
        );
        assert_eq!(&BackendMessage::ReadyForQuery(b'I').to_bytes()[..], b"Z\0\0\0\x05I");
        let key = Message {
            tag: b'K',
            raw: BackendMessage::BackendKeyData { pid: -3, secret: &[9; 32] }.to_bytes(),
        };
        assert_eq!(backend_key(&key), Some((-3, vec![9; 32])));
        assert_eq!(SqlState::known("53300"), Some(SqlState::TOO_MANY_CONNECTIONS));
        assert_eq!(SqlState::known("XX000"), None);
    }

    #[test]
    fn random_bytes_never_panic() {
        // A short deterministic fuzz run; cargo-fuzz runs the same parsers longer (fuzz/).
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            let mut b = BytesMut::from(&bytes[..]);
            let _ = parse_first_packet(&mut b);
            let mut b = BytesMut::from(&bytes[..]);
            if let Ok(Some(m)) = parse_message(&mut b, 1 << 16, "x") {
                let _ = sasl_mechanisms(&m);
                let _ = parse_sasl_initial(&m);
                let _ = error_fields(&m);
                let _ = backend_key(&m);
            }
            let _ = oauthbearer_token(&bytes);
        }
    }
}

/// Where a [`Framer`] walk stopped.
enum Walk {
    /// At this offset a Terminate starts.
    Terminate(usize),
    /// A message ended at this offset.
    Boundary(usize),
    /// It walked all the bytes.
    All,
}

/// Follows message boundaries in a byte stream without buffering messages (which may be up to
/// 1 GB): enough to stop before a Terminate and to know the last ReadyForQuery status.
#[derive(Debug, Default, Clone)]
pub struct Framer {
    header: [u8; 5],
    have: usize,
    remaining: u64,
    tag: u8,
    first_body_byte: bool,
    /// Status byte of the last ReadyForQuery seen (`I`, `T` or `E`).
    pub last_ready: Option<u8>,
}

impl Framer {
    /// Walks `data`. Returns the offset at which a Terminate (`X`) message starts, if one does;
    /// bytes from there on must not be forwarded.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, ProtoError> {
        self.feed_each(data, |_| {})
    }

    /// [`Self::feed`], calling `on_message` with the tag of each message whose header is
    /// complete (a Terminate's excepted).
    pub fn feed_each(
        &mut self,
        data: &[u8],
        on_message: impl FnMut(u8),
    ) -> Result<Option<usize>, ProtoError> {
        match self.walk(data, on_message, false)? {
            Walk::Terminate(at) => Ok(Some(at)),
            Walk::Boundary(_) | Walk::All => Ok(None),
        }
    }

    /// Walks `data` only as far as the end of the message the stream is in (nothing when it is
    /// between messages), calling `on_message` as [`Self::feed_each`] does. Returns how many
    /// bytes that took: all of `data` when the message goes on past it.
    pub fn feed_to_boundary(&mut self, data: &[u8], on_message: impl FnMut(u8)) -> Result<usize, ProtoError> {
        if self.at_boundary() {
            return Ok(0);
        }
        match self.walk(data, on_message, true)? {
            Walk::Boundary(n) => Ok(n),
            // A Terminate starts only between messages, where the walk already stopped.
            Walk::Terminate(n) => Ok(n),
            Walk::All => Ok(data.len()),
        }
    }

    fn walk(
        &mut self,
        data: &[u8],
        mut on_message: impl FnMut(u8),
        stop_at_boundary: bool,
    ) -> Result<Walk, ProtoError> {
        let mut i = 0;
        while i < data.len() {
            if self.remaining > 0 {
                if self.first_body_byte && self.tag == b'Z' {
                    self.last_ready = Some(data[i]);
                }
                self.first_body_byte = false;
                let take = (self.remaining as usize).min(data.len() - i);
                self.remaining -= take as u64;
                i += take;
                if stop_at_boundary && self.remaining == 0 {
                    return Ok(Walk::Boundary(i));
                }
                continue;
            }
            if self.have == 0 && data[i] == b'X' {
                return Ok(Walk::Terminate(i));
            }
            self.header[self.have] = data[i];
            self.have += 1;
            i += 1;
            if self.have == 5 {
                let len =
                    u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                let body = u64::from(len).checked_sub(4).ok_or(ProtoError::BadLength(len))?;
                self.tag = self.header[0];
                on_message(self.tag);
                self.remaining = body;
                self.first_body_byte = true;
                self.have = 0;
                if stop_at_boundary && body == 0 {
                    return Ok(Walk::Boundary(i));
                }
            }
        }
        Ok(Walk::All)
    }

    /// Whether the stream stopped between two messages.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }
}

#[cfg(test)]
mod framer_tests {
    use super::*;

    #[test]
    fn finds_terminate_and_ready_status_across_chunks() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&frame(b'Q', b"SELECT 1\0"));
        stream.extend_from_slice(&frame(b'Z', b"T"));
        stream.extend_from_slice(&frame(b'd', &[7u8; 300]));
        stream.extend_from_slice(&frame(b'Z', b"I"));
        let stop = stream.len();
        stream.extend_from_slice(&frame(b'X', b""));
        for chunk in [1, 2, 3, 7, 64, 1000] {
            let mut f = Framer::default();
            let mut found = None;
            for (n, c) in stream.chunks(chunk).enumerate() {
                if let Some(off) = f.feed(c).unwrap() {
                    found = Some(n * chunk + off);
                    break;
                }
            }
            assert_eq!(found, Some(stop), "chunk {chunk}");
            assert_eq!(f.last_ready, Some(b'I'));
            assert!(f.at_boundary());
        }
        let mut f = Framer::default();
        assert_eq!(f.feed(&[b'Q', 0, 0, 0, 3]), Err(ProtoError::BadLength(3)));
        let mut f = Framer::default();
        f.feed(&frame(b'Q', b"abc")[..6]).unwrap();
        assert!(!f.at_boundary());
    }

    #[test]
    fn walks_to_the_end_of_the_message_it_is_in_and_no_further() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&frame(b'D', &[7u8; 20]));
        stream.extend_from_slice(&frame(b'C', b"SELECT 1\0"));
        stream.extend_from_slice(&frame(b'Z', b"I"));
        let first = 5 + 20;
        for cut in 1..first {
            // Stopped `cut` bytes into the DataRow: the walk takes the rest of it, whatever the
            // chunks, and nothing of the CommandComplete.
            let mut f = Framer::default();
            f.feed(&stream[..cut]).unwrap();
            let mut tags = Vec::new();
            let mut taken = 0;
            for chunk in stream[cut..].chunks(3) {
                let n = f.feed_to_boundary(chunk, |t| tags.push(t)).unwrap();
                taken += n;
                if n < chunk.len() || f.at_boundary() {
                    break;
                }
            }
            assert_eq!((cut + taken, f.at_boundary()), (first, true), "cut {cut}");
            assert_eq!(tags, if cut < 5 { vec![b'D'] } else { vec![] }, "cut {cut}");
            assert_eq!(f.feed_to_boundary(&stream[first..], |_| {}).unwrap(), 0);
        }
        // A message without a body ends with its header.
        let mut f = Framer::default();
        f.feed(&[b'I', 0]).unwrap();
        assert_eq!(f.feed_to_boundary(&[0, 0, 4, b'Z'], |_| {}).unwrap(), 3);
        // The status of a ReadyForQuery walked this way is kept.
        let mut f = Framer::default();
        f.feed(&stream[..first + 14 + 2]).unwrap();
        assert_eq!(f.feed_to_boundary(&stream[first + 14 + 2..], |_| {}).unwrap(), 4);
        assert_eq!(f.last_ready, Some(b'I'));
    }

    #[test]
    fn newer_minor_versions_and_protocol_options_are_negotiated_down() {
        let st = |version: u32, params: &[(&str, &str)]| Startup {
            version,
            params: params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            raw: Vec::new(),
        };
        assert_eq!(negotiate_protocol_version(&st(0x0003_0000, &[("user", "a")])), None);
        let v = negotiate_protocol_version(&st(0x0003_0002, &[("user", "a"), ("_pq_.x", "1")])).unwrap();
        let mut want = BytesMut::new();
        want.put_u32(0x0003_0000);
        want.put_i32(1);
        want.put_slice(b"_pq_.x\0");
        assert_eq!(v, frame(b'v', &want));
    }
}
