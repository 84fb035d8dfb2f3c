//! Test support (feature `testkit`): real signing keys, tokens with any header or claims, and a
//! small HTTP(S) server on loopback that counts its requests. Never compiled into a release
//! build of the extension or the proxy.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use parking_lot::Mutex;
use serde_json::{json, Value};

/// Base64url without padding.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

enum Private {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, &'static str),
    Ed(Ed25519KeyPair),
}

/// A private signing key with its public JWK.
pub struct TestKey {
    private: Private,
    /// The key id.
    pub kid: String,
}

impl TestKey {
    /// A new RSA-2048 key.
    pub fn rsa(kid: &str) -> Self {
        let k = RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa keygen");
        Self { private: Private::Rsa(k), kid: kid.into() }
    }
    /// A new P-256 key.
    pub fn p256(kid: &str) -> Self {
        let k = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).expect("ec keygen");
        Self { private: Private::Ec(k, "P-256"), kid: kid.into() }
    }
    /// A new P-384 key.
    pub fn p384(kid: &str) -> Self {
        let k = EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING).expect("ec keygen");
        Self { private: Private::Ec(k, "P-384"), kid: kid.into() }
    }
    /// A new Ed25519 key.
    pub fn ed25519(kid: &str) -> Self {
        Self { private: Private::Ed(Ed25519KeyPair::generate().expect("ed keygen")), kid: kid.into() }
    }

    /// The algorithm this key signs with by default.
    pub fn default_alg(&self) -> &'static str {
        match &self.private {
            Private::Rsa(_) => "RS256",
            Private::Ec(_, "P-256") => "ES256",
            Private::Ec(..) => "ES384",
            Private::Ed(_) => "EdDSA",
        }
    }

    /// The public JWK (with `kid`, `use: sig`, no `alg`).
    pub fn jwk(&self) -> Value {
        match &self.private {
            Private::Rsa(k) => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public_key());
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "n": b64(&c.n), "e": b64(&c.e)})
            }
            Private::Ec(k, crv) => {
                let p = k.public_key().as_ref();
                let n = (p.len() - 1) / 2;
                json!({"kty": "EC", "kid": self.kid, "use": "sig", "crv": crv,
                       "x": b64(&p[1..1 + n]), "y": b64(&p[1 + n..])})
            }
            Private::Ed(k) => {
                json!({"kty": "OKP", "kid": self.kid, "use": "sig", "crv": "Ed25519",
                       "x": b64(k.public_key().as_ref())})
            }
        }
    }

    /// Raw RSA modulus (for "HS256 signed with the public key" attacks).
    pub fn rsa_public_der(&self) -> Vec<u8> {
        match &self.private {
            Private::Rsa(k) => k.public_key().as_ref().to_vec(),
            _ => panic!("not an RSA key"),
        }
    }

    /// Signs `msg` with `alg` (any RSA/PSS hash for RSA keys).
    pub fn sign(&self, alg: &str, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.private {
            Private::Rsa(k) => {
                let enc: &'static dyn signature::RsaEncoding = match alg {
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(enc, &rng, msg, &mut sig).expect("rsa sign");
                sig
            }
            Private::Ec(k, _) => k.sign(&rng, msg).expect("ec sign").as_ref().to_vec(),
            Private::Ed(k) => k.sign(msg).as_ref().to_vec(),
        }
    }

    /// A signed token with this header and claims; `kid` and `alg` are added unless present.
    pub fn token(&self, header: Value, claims: &Value) -> String {
        let mut h = header;
        let obj = h.as_object_mut().expect("header object");
        obj.entry("alg").or_insert_with(|| json!(self.default_alg()));
        obj.entry("kid").or_insert_with(|| json!(self.kid));
        let alg = obj["alg"].as_str().unwrap_or("RS256").to_owned();
        let signing_input =
            format!("{}.{}", b64(h.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let sig = self.sign(&alg, signing_input.as_bytes());
        format!("{signing_input}.{}", b64(&sig))
    }

    /// A token with raw header and payload bytes (for malformed-JSON cases), signed properly.
    pub fn token_raw(&self, alg: &str, header: &[u8], payload: &[u8]) -> String {
        let signing_input = format!("{}.{}", b64(header), b64(payload));
        let sig = self.sign(alg, signing_input.as_bytes());
        format!("{signing_input}.{}", b64(&sig))
    }
}

/// A JWK Set document of these keys.
pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A request as the test server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path with query.
    pub path: String,
    /// Headers, names lower-cased.
    pub headers: HashMap<String, String>,
    /// Body.
    pub body: Vec<u8>,
}

impl Request {
    /// A form field from an `application/x-www-form-urlencoded` body.
    pub fn form(&self, name: &str) -> Option<String> {
        let body = String::from_utf8_lossy(&self.body);
        body.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| percent_decode(v))
        })
    }

    /// Every value of a repeated form field, in order.
    pub fn form_all(&self, name: &str) -> Vec<String> {
        let body = String::from_utf8_lossy(&self.body);
        body.split('&')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name).then(|| percent_decode(v))
            })
            .collect()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(v)) => {
                out.push(v);
                i += 2;
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response from the test server.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Wait this long before answering.
    pub delay: Duration,
}

impl Response {
    /// 200 with a JSON body.
    pub fn json(v: &Value) -> Self {
        Self {
            status: 200,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: v.to_string().into_bytes(),
            delay: Duration::ZERO,
        }
    }
    /// A bare status.
    pub fn status(status: u16) -> Self {
        Self { status, headers: Vec::new(), body: Vec::new(), delay: Duration::ZERO }
    }
    /// Adds a header.
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    /// Sets the status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
    /// Delays the answer.
    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// An HTTP/1.1 server on 127.0.0.1, one thread per connection, `Connection: close`.
pub struct TestServer {
    addr: SocketAddr,
    tls: bool,
    handler: Arc<Mutex<Arc<Handler>>>,
    requests: Arc<Mutex<Vec<Request>>>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a plain-HTTP server.
    pub fn start(handler: impl Fn(&Request) -> Response + Send + Sync + 'static) -> Self {
        Self::start_inner(handler, None)
    }

    /// Starts an HTTPS server with this certificate chain and key (PEM).
    pub fn start_tls(
        cert_pem: &str,
        key_pem: &str,
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> Self {
        let certs =
            rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().expect("certs");
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes()).expect("key").expect("a key");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server cert");
        Self::start_inner(handler, Some(Arc::new(config)))
    }

    fn start_inner(
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let handler: Arc<Mutex<Arc<Handler>>> = Arc::new(Mutex::new(Arc::new(handler)));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let is_tls = tls.is_some();
        let thread = {
            let (handler, requests, count, stop) =
                (handler.clone(), requests.clone(), count.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let h = handler.lock().clone();
                            let (requests, count, tls) = (requests.clone(), count.clone(), tls.clone());
                            std::thread::spawn(move || {
                                let _ = stream.set_nonblocking(false);
                                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                                let _ = serve(stream, tls, &*h, &requests, &count);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self { addr, tls: is_tls, handler, requests, count, stop, thread: Some(thread) }
    }

    /// `http://127.0.0.1:PORT` (or https).
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", if self.tls { "https" } else { "http" }, self.addr.port())
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the handler (for key rotation, outages).
    pub fn set_handler(&self, handler: impl Fn(&Request) -> Response + Send + Sync + 'static) {
        *self.handler.lock() = Arc::new(handler);
    }

    /// Requests answered so far.
    pub fn request_count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Requests seen so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().clone()
    }

    /// How many requests went to `path`.
    pub fn count_path(&self, path: &str) -> usize {
        self.requests.lock().iter().filter(|r| r.path == path).count()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: &Handler,
    requests: &Mutex<Vec<Request>>,
    count: &AtomicU64,
) -> std::io::Result<()> {
    match tls {
        None => serve_io(stream, handler, requests, count),
        Some(cfg) => {
            let conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
            serve_io(rustls::StreamOwned::new(conn, stream), handler, requests, count)
        }
    }
}

fn serve_io<S: Read + Write>(
    stream: S,
    handler: &Handler,
    requests: &Mutex<Vec<Request>>,
    count: &AtomicU64,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let req = Request { method, path, headers, body };
    requests.lock().push(req.clone());
    count.fetch_add(1, Ordering::SeqCst);
    let resp = handler(&req);
    if !resp.delay.is_zero() {
        std::thread::sleep(resp.delay);
    }
    let mut stream = reader.into_inner();
    let mut head =
        format!("HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n", resp.status, resp.body.len());
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(&resp.body)?;
    stream.flush()
}

/// A self-signed CA and a server certificate for 127.0.0.1 and localhost, as PEM:
/// (ca_cert, server_cert_chain, server_key).
pub fn test_ca() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair as RcKey};
    let ca_key = RcKey::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A unique name per CA, so that clients holding another test CA report an unknown issuer.
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let name = format!("gprxy test CA {} {}", std::process::id(), SERIAL.fetch_add(1, Ordering::Relaxed));
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let key = RcKey::generate().expect("server key");
    let params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}
