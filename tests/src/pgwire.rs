//! A small blocking PostgreSQL client for tests and benchmarks: trust, cleartext password,
//! SCRAM-SHA-256 and SASL OAUTHBEARER (RFC 7628) logins, simple queries, cancel requests.
//! Messages are encoded and parsed by postgres-protocol.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend::Message, frontend};

/// How to authenticate.
#[derive(Debug, Clone, Copy)]
pub enum Auth<'a> {
    /// Whatever the server asks, answer with nothing (trust).
    None,
    /// Cleartext or SCRAM-SHA-256 with this password.
    Password(&'a str),
    /// OAUTHBEARER with this token.
    Bearer(&'a str),
}

/// An ErrorResponse (or a transport failure, with no SQLSTATE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// SQLSTATE.
    pub code: Option<String>,
    /// Message.
    pub message: String,
    /// Severity (`ERROR`, `FATAL`, ...; empty for a transport failure).
    pub severity: String,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_deref().unwrap_or("-"))
    }
}

fn io_err(e: impl std::fmt::Display) -> PgError {
    PgError { code: None, message: e.to_string(), severity: String::new() }
}

/// Plain TCP or TLS (rustls) to the server.
enum Transport {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// A row as text (None: NULL).
pub type Row = Vec<Option<String>>;

/// An open session.
pub struct PgConn {
    stream: Transport,
    buf: BytesMut,
    /// Backend process id and secret key from BackendKeyData.
    pub key: Option<(i32, i32)>,
}

/// Connects over TCP and authenticates.
pub fn connect(addr: SocketAddr, user: &str, db: &str, auth: Auth<'_>) -> Result<PgConn, PgError> {
    connect_with(addr, user, db, auth, None, &[])
}

/// Connects over TCP with extra startup parameters (in order, duplicates allowed).
pub fn connect_params(
    addr: SocketAddr,
    user: &str,
    db: &str,
    auth: Auth<'_>,
    extra: &[(&str, &str)],
) -> Result<PgConn, PgError> {
    connect_with(addr, user, db, auth, None, extra)
}

/// Connects with TLS (SSLRequest), trusting the CA in `ca_pem` for the name `localhost`.
pub fn connect_tls(
    addr: SocketAddr,
    user: &str,
    db: &str,
    auth: Auth<'_>,
    ca_pem: &str,
) -> Result<PgConn, PgError> {
    connect_with(addr, user, db, auth, Some(ca_pem), &[])
}

fn connect_with(
    addr: SocketAddr,
    user: &str,
    db: &str,
    auth: Auth<'_>,
    ca_pem: Option<&str>,
    extra: &[(&str, &str)],
) -> Result<PgConn, PgError> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(io_err)?;
    tcp.set_read_timeout(Some(Duration::from_secs(60))).map_err(io_err)?;
    tcp.set_nodelay(true).map_err(io_err)?;
    let stream = match ca_pem {
        None => Transport::Plain(tcp),
        Some(pem) => {
            let mut out = BytesMut::new();
            frontend::ssl_request(&mut out);
            tcp.write_all(&out).map_err(io_err)?;
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer).map_err(io_err)?;
            if answer[0] != b'S' {
                return Err(io_err("server refused TLS"));
            }
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
                roots.add(cert.map_err(io_err)?).map_err(io_err)?;
            }
            let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(io_err)?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from("localhost").map_err(io_err)?;
            let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).map_err(io_err)?;
            Transport::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
        }
    };
    let mut c = PgConn { stream, buf: BytesMut::with_capacity(8192), key: None };
    let mut out = BytesMut::new();
    let mut params = vec![("user", user), ("database", db), ("application_name", "gprxy-tests")];
    params.extend_from_slice(extra);
    frontend::startup_message(params, &mut out).map_err(io_err)?;
    c.send(&out)?;
    c.authenticate(auth)?;
    Ok(c)
}

fn error_of(body: &postgres_protocol::message::backend::ErrorResponseBody) -> PgError {
    let mut e = PgError { code: None, message: String::new(), severity: String::new() };
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => e.code = Some(v),
            b'M' => e.message = v,
            b'V' => e.severity = v,
            _ => {}
        }
    }
    e
}

impl PgConn {
    fn send(&mut self, bytes: &[u8]) -> Result<(), PgError> {
        self.stream.write_all(bytes).map_err(io_err)
    }

    /// The next backend message.
    pub fn next_message(&mut self) -> Result<Message, PgError> {
        loop {
            if let Some(m) = Message::parse(&mut self.buf).map_err(io_err)? {
                return Ok(m);
            }
            let mut chunk = [0u8; 16384];
            let n = match self.stream.read(&mut chunk) {
                // A signal that interrupted the wait is not the server's doing: read again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.map_err(io_err)?,
            };
            if n == 0 {
                return Err(io_err("server closed the connection"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next backend message as its tag and body, whatever its type (postgres-protocol
    /// parses not every one, FunctionCallResponse for one). An ErrorResponse is returned as
    /// `Err` with its fields; the server's close as `Err` with no code.
    pub fn next_raw(&mut self) -> Result<(u8, Vec<u8>), PgError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() > len {
                    let m = self.buf.split_to(1 + len);
                    if m[0] == b'E' {
                        let mut again = BytesMut::from(&m[..]);
                        if let Ok(Some(Message::ErrorResponse(body))) = Message::parse(&mut again) {
                            return Err(error_of(&body));
                        }
                    }
                    return Ok((m[0], m[5..].to_vec()));
                }
            }
            let mut chunk = [0u8; 16384];
            let n = match self.stream.read(&mut chunk) {
                // A signal that interrupted the wait is not the server's doing: read again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.map_err(io_err)?,
            };
            if n == 0 {
                return Err(io_err("server closed the connection"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn authenticate(&mut self, auth: Auth<'_>) -> Result<(), PgError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let mut out = BytesMut::new();
            match self.next_message()? {
                Message::AuthenticationOk => break,
                Message::AuthenticationCleartextPassword => match auth {
                    Auth::Password(p) | Auth::Bearer(p) => {
                        frontend::password_message(p.as_bytes(), &mut out).map_err(io_err)?
                    }
                    Auth::None => return Err(io_err("server asked for a password")),
                },
                Message::AuthenticationSasl(body) => {
                    let mechs: Vec<String> =
                        body.mechanisms().map(|m| Ok(m.to_owned())).collect().map_err(io_err)?;
                    match auth {
                        Auth::Bearer(token) if mechs.iter().any(|m| m == "OAUTHBEARER") => {
                            let msg = format!("n,,\x01auth=Bearer {token}\x01\x01");
                            frontend::sasl_initial_response("OAUTHBEARER", msg.as_bytes(), &mut out)
                                .map_err(io_err)?;
                        }
                        Auth::Password(p) if mechs.iter().any(|m| m == "SCRAM-SHA-256") => {
                            let s = ScramSha256::new(p.as_bytes(), ChannelBinding::unsupported());
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                .map_err(io_err)?;
                            scram = Some(s);
                        }
                        _ => return Err(io_err(format!("no usable SASL mechanism in {mechs:?}"))),
                    }
                }
                Message::AuthenticationSaslContinue(body) => match scram.as_mut() {
                    Some(s) => {
                        s.update(body.data()).map_err(io_err)?;
                        frontend::sasl_response(s.message(), &mut out).map_err(io_err)?;
                    }
                    // OAUTHBEARER error challenge: acknowledge with a lone kvsep (RFC 7628 3.2.3).
                    None => frontend::sasl_response(b"\x01", &mut out).map_err(io_err)?,
                },
                Message::AuthenticationSaslFinal(body) => {
                    if let Some(s) = scram.as_mut() {
                        s.finish(body.data()).map_err(io_err)?;
                    }
                }
                Message::ErrorResponse(body) => return Err(error_of(&body)),
                _ => return Err(io_err("unexpected message during authentication")),
            }
            if !out.is_empty() {
                self.send(&out)?;
            }
        }
        loop {
            match self.next_message()? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::BackendKeyData(k) => self.key = Some((k.process_id(), k.secret_key())),
                Message::ErrorResponse(body) => return Err(error_of(&body)),
                _ => {}
            }
        }
    }

    /// Runs a simple query; returns the rows of the last result as text. An error after which
    /// the server closes the connection (FATAL) is returned as it came.
    pub fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(io_err)?;
        self.send(&out)?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let message = match self.next_message() {
                Ok(m) => m,
                // A FATAL is followed by the close: the error is what the client was told.
                Err(closed) => return Err(error.unwrap_or(closed)),
            };
            match message {
                Message::DataRow(row) => {
                    let buf = row.buffer();
                    let vals: Vec<Option<String>> = row
                        .ranges()
                        .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
                        .collect()
                        .map_err(io_err)?;
                    rows.push(vals);
                }
                Message::RowDescription(_) => rows.clear(),
                Message::ErrorResponse(body) => error = Some(error_of(&body)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        error.map_or(Ok(rows), Err)
    }

    /// The first column of the first row.
    pub fn scalar(&mut self, sql: &str) -> Result<Option<String>, PgError> {
        Ok(self.query(sql)?.into_iter().next().and_then(|r| r.into_iter().next()).flatten())
    }

    /// Waits for the server to end the session: the ErrorResponse it sends, then the close.
    pub fn wait_for_end(&mut self) -> Result<PgError, PgError> {
        let e = match self.next_message()? {
            Message::ErrorResponse(body) => error_of(&body),
            _ => return Err(io_err("a message other than an ErrorResponse")),
        };
        match self.next_message() {
            Err(closed) if closed.code.is_none() => Ok(e),
            Err(other) => Err(other),
            Ok(_) => Err(io_err(format!("a message after the error ({e})"))),
        }
    }

    /// Writes `bytes` as they are, in one write (a burst of messages).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), PgError> {
        self.send(bytes)?;
        self.stream.flush().map_err(io_err)
    }

    /// Reads until a DataRow whose first column is `marker`, whatever comes before it (other
    /// answers, errors, ReadyForQuery). Returns the rows before it and that row, as text.
    pub fn rows_until(&mut self, marker: &str) -> Result<(Vec<Row>, Row), PgError> {
        let mut before = Vec::new();
        loop {
            if let Message::DataRow(row) = self.next_message()? {
                let buf = row.buffer();
                let vals: Row = row
                    .ranges()
                    .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
                    .collect()
                    .map_err(io_err)?;
                if vals.first().and_then(Option::as_deref) == Some(marker) {
                    return Ok((before, vals));
                }
                before.push(vals);
            }
        }
    }

    /// Waits (up to the read timeout) for the next ErrorResponse, whatever comes before it: a
    /// session's end as the server announces it.
    pub fn next_error(&mut self) -> Result<PgError, PgError> {
        loop {
            if let Message::ErrorResponse(body) = self.next_message()? {
                return Ok(error_of(&body));
            }
        }
    }

    /// The client's end of the TCP connection (to tell it apart in a load balancer's sessions).
    pub fn local_addr(&self) -> Result<SocketAddr, PgError> {
        match &self.stream {
            Transport::Plain(s) => s.local_addr(),
            Transport::Tls(s) => s.sock.local_addr(),
        }
        .map_err(io_err)
    }

    /// How long a read may wait for the server (60 s from the connect on).
    pub fn set_read_timeout(&self, timeout: Duration) -> Result<(), PgError> {
        match &self.stream {
            Transport::Plain(s) => s.set_read_timeout(Some(timeout)),
            Transport::Tls(s) => s.sock.set_read_timeout(Some(timeout)),
        }
        .map_err(io_err)
    }

    /// Sends Terminate and closes.
    pub fn close(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = self.send(&out);
    }
}

/// Sends a CancelRequest for `key` to `addr`.
pub fn cancel(addr: SocketAddr, key: (i32, i32)) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    frontend::cancel_request(key.0, key.1, &mut out);
    let mut s = TcpStream::connect(addr)?;
    s.write_all(&out)?;
    let mut sink = [0u8; 1];
    let _ = s.read(&mut sink);
    Ok(())
}

/// Frontend messages as bytes, for tests that write the protocol by hand (pipelined, cut,
/// without Sync).
pub mod msg {
    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Query (simple protocol).
    pub fn query(sql: &str) -> Vec<u8> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        frame(b'Q', &body)
    }

    /// Parse, Bind and Execute of `sql` (unnamed statement and portal, no parameters), no Sync.
    pub fn extended(sql: &str) -> Vec<u8> {
        let mut parse = vec![0];
        parse.extend_from_slice(sql.as_bytes());
        parse.extend_from_slice(&[0, 0, 0]);
        let mut out = frame(b'P', &parse);
        out.extend_from_slice(&frame(b'B', &[0; 8]));
        out.extend_from_slice(&frame(b'E', &[0; 5]));
        out
    }

    /// Sync.
    pub fn sync() -> Vec<u8> {
        frame(b'S', &[])
    }

    /// Flush.
    pub fn flush() -> Vec<u8> {
        frame(b'H', &[])
    }

    /// FunctionCall of the function `oid` with no arguments, result as text.
    pub fn function_call(oid: u32) -> Vec<u8> {
        let mut body = oid.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        frame(b'F', &body)
    }

    /// FunctionCall of the function `oid` with one text argument, result as text.
    pub fn function_call_text(oid: u32, arg: &str) -> Vec<u8> {
        let mut body = oid.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 1, 0, 0, 0, 1]);
        body.extend_from_slice(&(arg.len() as u32).to_be_bytes());
        body.extend_from_slice(arg.as_bytes());
        body.extend_from_slice(&[0, 0]);
        frame(b'F', &body)
    }

    /// CopyData.
    pub fn copy_data(data: &[u8]) -> Vec<u8> {
        frame(b'd', data)
    }

    /// CopyDone.
    pub fn copy_done() -> Vec<u8> {
        frame(b'c', &[])
    }
}
