//! Where a profile's access token comes from: one [`TokenSource`] per kind of source, and the
//! [`TokenCache`] in front of it (one fetch in flight per profile, a token reused until shortly
//! before it expires, a token file read again when it changes).
//!
//! A token is never logged or put in an error: what is logged is its fingerprint
//! ([`gprxy_core::fingerprint`]), `sub` and `iss`.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use gprxy_core::{HttpSettings, KeyError, UreqFetcher};
use parking_lot::Mutex;
use serde_json::{Map, Value};

use super::config::{ClientAuth, TokenSpec};
use crate::user_login;

/// A token this close to its `exp` is no longer offered when a refresh fails.
const STILL_VALID_SECS: i64 = 5;

/// Longest token accepted from any source (PostgreSQL's own limit on a bearer token).
pub const MAX_TOKEN: usize = 65_535;

/// An access token. Its `Debug` shows the fingerprint only.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The token itself, to send upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its fingerprint, for logs.
    pub fn fingerprint(&self) -> String {
        gprxy_core::fingerprint(self.0.as_bytes())
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", self.fingerprint())
    }
}

/// A fetched token and when it expires (Unix time), if known.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The token.
    pub token: Token,
    /// `exp`, or the response's `expires_in` from when it was fetched.
    pub expires_at: Option<i64>,
}

/// Why no token could be had. The messages are what the user reads; they never hold a token
/// or a secret.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The stored device-flow login failed (missing, expired and not refreshable, ...).
    #[error("{0}")]
    Device(#[from] user_login::LoginError),
    /// The issuer could not be reached.
    #[error("cannot reach the issuer: {0}")]
    Unreachable(KeyError),
    /// The issuer answered with an OAuth error.
    #[error("the issuer refused the token request: {error} (HTTP {status})")]
    Refused {
        /// OAuth `error` code.
        error: String,
        /// HTTP status.
        status: u16,
    },
    /// The answer was not a token.
    #[error("the answer is not a token: {0}")]
    BadAnswer(String),
    /// A file could not be read or is unsafe.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The command failed.
    #[error("the command {program} {outcome}")]
    Exec {
        /// The program.
        program: String,
        /// What happened.
        outcome: String,
    },
    /// A needed environment variable is not set.
    #[error("{0}")]
    Environment(String),
    /// Signing a client assertion failed.
    #[error("cannot sign the client assertion: {0}")]
    Assertion(String),
    /// The fetch this caller waited for failed: its error, shared by every caller that waited.
    #[error("{0}")]
    Shared(Arc<TokenError>),
}

/// One way of getting a token. Blocking: called on a blocking thread by [`TokenCache`].
pub trait TokenSource: Send + Sync {
    /// Gets a new token.
    fn fetch(&self) -> Result<Fetched, TokenError>;

    /// Whether what the last fetch read has changed since (a token file rewritten).
    fn changed(&self) -> bool {
        false
    }

    /// A short name for logs and `--check`.
    fn kind(&self) -> &'static str;
}

/// The source a profile's `[token]` describes; `margin_secs` is the profile's refresh margin
/// (the stored device login is refreshed when no more time than that is left).
pub fn from_spec(spec: &TokenSpec, margin_secs: u64) -> Arc<dyn TokenSource> {
    match spec.clone() {
        TokenSpec::Device { credentials_file } => Arc::new(Device {
            path: credentials_file.unwrap_or_else(user_login::credentials_path),
            margin: i64::try_from(margin_secs).unwrap_or(i64::MAX),
            handed_out: Mutex::new(None),
        }),
        TokenSpec::ClientCredentials {
            issuer,
            token_endpoint,
            client_id,
            client_auth,
            client_secret_file,
            client_secret_env,
            private_key_file,
            private_key_alg,
            scope,
            audience,
            resource,
            ca_file,
            insecure_allow_http_loopback,
        } => Arc::new(ClientCredentials {
            issuer,
            endpoint: OnceLock::new(),
            configured_endpoint: token_endpoint,
            client_id,
            auth: match client_auth {
                ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost => Credential::Secret {
                    basic: client_auth == ClientAuth::ClientSecretBasic,
                    file: client_secret_file,
                    env: client_secret_env,
                },
                ClientAuth::PrivateKeyJwt => Credential::Key {
                    file: private_key_file.unwrap_or_default(),
                    alg: private_key_alg.unwrap_or_else(|| "RS256".into()),
                },
            },
            scope,
            audience,
            resource,
            http: http_settings(ca_file, insecure_allow_http_loopback),
        }),
        TokenSpec::File { path } => Arc::new(TokenFile { path, seen: Mutex::new(None) }),
        TokenSpec::Exec { command, timeout_secs } => {
            Arc::new(Exec { command, timeout: Duration::from_secs(timeout_secs) })
        }
        TokenSpec::GithubActions { audience, insecure_allow_http_loopback } => {
            Arc::new(GithubActions { audience, http: http_settings(None, insecure_allow_http_loopback) })
        }
    }
}

fn http_settings(ca_file: Option<PathBuf>, insecure: bool) -> HttpSettings {
    HttpSettings {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(10),
        insecure_allow_http_loopback: insecure,
        ca_file,
        ..HttpSettings::default()
    }
}

fn fetcher(settings: &HttpSettings) -> Result<UreqFetcher, TokenError> {
    UreqFetcher::new(settings.clone()).map_err(|e| TokenError::BadAnswer(e.to_string()))
}

/// A token checked for what any source must give: not empty, one line of printable ASCII, at
/// most [`MAX_TOKEN`] bytes. The expiry is the token's `exp` (read unverified: only to decide
/// when to fetch again) or `expires_in`, whichever is earlier.
fn checked(token: &str, expires_in: Option<i64>) -> Result<Fetched, TokenError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::BadAnswer("empty".into()));
    }
    if token.len() > MAX_TOKEN {
        return Err(TokenError::BadAnswer(format!("{} bytes, more than {MAX_TOKEN}", token.len())));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::BadAnswer("not one line of printable characters".into()));
    }
    let now = gprxy_core::unix_time();
    let from_token = gprxy_core::peek_claim(token, "exp").and_then(|v| v.parse::<i64>().ok());
    let from_answer = expires_in.map(|s| now + s);
    let expires_at = match (from_token, from_answer) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Fetched { token: Token(token.to_owned()), expires_at })
}

/// Reads a secret or key file: a regular file that neither group nor others can read.
fn read_private_file(path: &Path) -> Result<Vec<u8>, TokenError> {
    read_file_checked(path, 0o077, "readable by others")
}

/// Checks a private key that is not a token source's (the TLS client key, libpq's sslkey): as
/// a secret or key file.
pub fn check_private_file(path: &Path) -> Result<(), TokenError> {
    read_private_file(path).map(drop)
}

/// Reads a regular file none of whose `mask` mode bits are set.
fn read_file_checked(path: &Path, mask: u32, what: &str) -> Result<Vec<u8>, TokenError> {
    let err = |reason: String| TokenError::File { path: path.to_path_buf(), reason };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    // Its owner may always write it, whatever its mode: this user or root only, and so for a
    // symbolic link at the path (Kubernetes' projected tokens are root's links to root's files).
    let own = super::config::own_uid().map_err(|e| err(e.to_string()))?;
    let link = std::fs::symlink_metadata(path).map_err(|e| err(e.to_string()))?;
    for uid in [meta.uid(), link.uid()] {
        if uid != own && uid != 0 {
            return Err(err(format!("belongs to uid {uid}, not to this user ({own}) or root")));
        }
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & mask != 0 {
        return Err(err(format!("{what} (mode {mode:o}); run chmod 600 on it")));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| err(e.to_string()))?;
    Ok(bytes)
}

/// `gprxy login`'s stored login: the stored token while more than the profile's margin is
/// left, else refreshed (see [`user_login::token_within`]: one refresh at a time among the
/// processes sharing the file).
struct Device {
    path: PathBuf,
    margin: i64,
    /// The fingerprint of the token this source last gave: another one stored was refreshed
    /// by another process since, and is taken as it is.
    handed_out: Mutex<Option<String>>,
}

impl TokenSource for Device {
    fn fetch(&self) -> Result<Fetched, TokenError> {
        let now = gprxy_core::unix_time();
        let handed_out = self.handed_out.lock().clone();
        let (token, expires_at) =
            user_login::token_within(&self.path, now, self.margin, handed_out.as_deref())?;
        let fetched = checked(&token, Some(expires_at - now))?;
        *self.handed_out.lock() = Some(fetched.token.fingerprint());
        Ok(fetched)
    }

    fn kind(&self) -> &'static str {
        "device"
    }
}

enum Credential {
    Secret { basic: bool, file: Option<PathBuf>, env: Option<String> },
    Key { file: PathBuf, alg: String },
}

/// The client-credentials grant.
struct ClientCredentials {
    issuer: String,
    configured_endpoint: Option<String>,
    endpoint: OnceLock<String>,
    client_id: String,
    auth: Credential,
    scope: Option<String>,
    audience: Option<String>,
    resource: Option<String>,
    http: HttpSettings,
}

impl ClientCredentials {
    fn endpoint(&self, fetcher: &UreqFetcher) -> Result<String, TokenError> {
        if let Some(e) = self.configured_endpoint.as_ref().or(self.endpoint.get()) {
            return Ok(e.clone());
        }
        let (_, meta) =
            gprxy_core::issuer_metadata(fetcher, &self.issuer).map_err(TokenError::Unreachable)?;
        let endpoint = meta
            .get("token_endpoint")
            .and_then(Value::as_str)
            .ok_or_else(|| TokenError::BadAnswer("the issuer's metadata has no token_endpoint".into()))?
            .to_owned();
        Ok(self.endpoint.get_or_init(|| endpoint).clone())
    }

    fn secret(file: Option<&Path>, env: Option<&str>) -> Result<String, TokenError> {
        let secret = match (file, env) {
            (Some(path), _) => {
                let bytes = read_private_file(path)?;
                String::from_utf8(bytes)
                    .map_err(|_| TokenError::File { path: path.to_path_buf(), reason: "not UTF-8".into() })?
            }
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| TokenError::Environment(format!("the environment variable {var} is not set")))?,
            (None, None) => return Err(TokenError::Environment("no client secret configured".into())),
        };
        let secret = secret.trim_end_matches(['\r', '\n']).to_owned();
        if secret.is_empty() {
            return Err(TokenError::Environment("the client secret is empty".into()));
        }
        Ok(secret)
    }

    /// A client assertion (RFC 7523 section 2.2): `iss` and `sub` the client id, `aud` the
    /// token endpoint, valid for a minute, a fresh `jti`.
    fn assertion(&self, key_file: &Path, alg: &str, endpoint: &str) -> Result<String, TokenError> {
        use aws_lc_rs::signature;
        use base64::Engine as _;
        let pem = read_private_file(key_file)?;
        let bad = |what: &str| TokenError::File {
            path: key_file.to_path_buf(),
            reason: format!("not a {alg} private key in PEM ({what})"),
        };
        let der = rustls_pemfile::private_key(&mut pem.as_slice())
            .map_err(|_| bad("bad PEM"))?
            .ok_or_else(|| bad("no private key"))?;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti).map_err(|_| TokenError::Assertion("no randomness".into()))?;
        let now = gprxy_core::unix_time();
        let header = serde_json::json!({"alg": alg, "typ": "JWT"});
        let claims = serde_json::json!({
            "iss": self.client_id, "sub": self.client_id, "aud": endpoint,
            "iat": now, "nbf": now, "exp": now + 60,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        });
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = match (alg, &der) {
            ("ES256", rustls::pki_types::PrivateKeyDer::Pkcs8(k)) => {
                let pair = signature::EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    k.secret_pkcs8_der(),
                )
                .map_err(|_| bad("not a P-256 PKCS#8 key"))?;
                pair.sign(&rng, input.as_bytes())
                    .map_err(|_| TokenError::Assertion("signing failed".into()))?
                    .as_ref()
                    .to_vec()
            }
            ("EdDSA", rustls::pki_types::PrivateKeyDer::Pkcs8(k)) => {
                let pair = signature::Ed25519KeyPair::from_pkcs8(k.secret_pkcs8_der())
                    .map_err(|_| bad("not an Ed25519 PKCS#8 key"))?;
                pair.sign(input.as_bytes()).as_ref().to_vec()
            }
            ("RS256", key) => {
                let pair = match key {
                    rustls::pki_types::PrivateKeyDer::Pkcs8(k) => {
                        signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der())
                    }
                    rustls::pki_types::PrivateKeyDer::Pkcs1(k) => {
                        signature::RsaKeyPair::from_der(k.secret_pkcs1_der())
                    }
                    _ => return Err(bad("not an RSA key")),
                }
                .map_err(|_| bad("not a usable RSA key"))?;
                let mut out = vec![0u8; pair.public_modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut out)
                    .map_err(|_| TokenError::Assertion("signing failed".into()))?;
                out
            }
            _ => return Err(bad("PKCS#8 expected")),
        };
        Ok(format!("{input}.{}", b64(&sig)))
    }
}

impl TokenSource for ClientCredentials {
    fn fetch(&self) -> Result<Fetched, TokenError> {
        let fetcher = fetcher(&self.http)?;
        let endpoint = self.endpoint(&fetcher)?;
        let mut form: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
        for (k, v) in [("scope", &self.scope), ("audience", &self.audience), ("resource", &self.resource)] {
            if let Some(v) = v {
                form.push((k, v.clone()));
            }
        }
        let mut basic = None;
        match &self.auth {
            Credential::Secret { basic: true, file, env } => {
                basic = Some(Self::secret(file.as_deref(), env.as_deref())?);
            }
            Credential::Secret { basic: false, file, env } => {
                form.push(("client_id", self.client_id.clone()));
                form.push(("client_secret", Self::secret(file.as_deref(), env.as_deref())?));
            }
            Credential::Key { file, alg } => {
                form.push(("client_id", self.client_id.clone()));
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", self.assertion(file, alg, &endpoint)?));
            }
        }
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = fetcher
            .post_form_as(&endpoint, &pairs, basic.as_deref().map(|s| (self.client_id.as_str(), s)))
            .map_err(TokenError::Unreachable)?;
        token_answer(status, &body, "access_token")
    }

    fn kind(&self) -> &'static str {
        "client_credentials"
    }
}

/// A token endpoint's answer: `field` on success, the OAuth `error` code otherwise (never the
/// description, which an issuer may fill with what it was sent).
fn token_answer(status: u16, body: &[u8], field: &str) -> Result<Fetched, TokenError> {
    let answer: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => m,
        _ if status != 200 => return Err(TokenError::Refused { error: "(no OAuth error)".into(), status }),
        _ => return Err(TokenError::BadAnswer("not a JSON object".into())),
    };
    if status != 200 || answer.contains_key("error") {
        let error = answer
            .get("error")
            .and_then(Value::as_str)
            .filter(|e| e.len() <= 64 && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .unwrap_or("(no OAuth error)")
            .to_owned();
        return Err(TokenError::Refused { error, status });
    }
    let token = answer
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| TokenError::BadAnswer(format!("no {field}")))?;
    checked(token, answer.get("expires_in").and_then(Value::as_i64))
}

/// A token file, read again whenever it changes (inode, size or modification time).
struct TokenFile {
    path: PathBuf,
    seen: Mutex<Option<(u64, u64, i64, i64)>>,
}

impl TokenFile {
    fn stamp(&self) -> Option<(u64, u64, i64, i64)> {
        std::fs::metadata(&self.path).ok().map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
    }
}

impl TokenSource for TokenFile {
    fn fetch(&self) -> Result<Fetched, TokenError> {
        let before = self.stamp();
        // Another program writes it (a kubelet, Vault Agent): others may read it, as a
        // projected token often is, but whoever may write it could plant any token.
        let bytes = read_file_checked(&self.path, 0o022, "writable by others")?;
        let text = String::from_utf8(bytes)
            .map_err(|_| TokenError::File { path: self.path.clone(), reason: "not UTF-8".into() })?;
        let fetched = checked(&text, None)
            .map_err(|e| TokenError::File { path: self.path.clone(), reason: e.to_string() })?;
        *self.seen.lock() = before;
        Ok(fetched)
    }

    fn changed(&self) -> bool {
        *self.seen.lock() != self.stamp()
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}

/// A command printing a token (or a JSON object with `access_token`, `token` or kubectl's
/// `status.token`).
struct Exec {
    command: Vec<String>,
    timeout: Duration,
}

impl TokenSource for Exec {
    fn fetch(&self) -> Result<Fetched, TokenError> {
        let program = self.command[0].clone();
        let fail = |outcome: String| TokenError::Exec { program: program.clone(), outcome };
        let mut child = std::process::Command::new(&self.command[0])
            .args(&self.command[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot be started: {e}")))?;
        let capture = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                if let Some(r) = r {
                    let _ = r.take(2 * MAX_TOKEN as u64).read_to_end(&mut out);
                }
                out
            })
        };
        let stdout = capture(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
        let stderr = capture(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!(
                        "did not finish within {} s and was killed",
                        self.timeout.as_secs()
                    )));
                }
                Err(e) => return Err(fail(format!("cannot be waited for: {e}"))),
            }
        };
        let out = stdout.join().unwrap_or_default();
        let err = stderr.join().unwrap_or_default();
        if !status.success() {
            // The command's last line on stderr says why; cut, and never its stdout.
            let text = String::from_utf8_lossy(&err);
            let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            let last: String = last.chars().take(200).collect();
            let how = status
                .code()
                .map_or_else(|| "was killed by a signal".to_owned(), |c| format!("exited with status {c}"));
            return Err(fail(if last.is_empty() { how } else { format!("{how}: {last}") }));
        }
        let text = String::from_utf8(out).map_err(|_| fail("printed something that is not UTF-8".into()))?;
        let trimmed = text.trim();
        if trimmed.starts_with('{') {
            let v: Value =
                serde_json::from_str(trimmed).map_err(|_| fail("printed JSON that does not parse".into()))?;
            let token = v
                .get("access_token")
                .or_else(|| v.get("token"))
                .or_else(|| v.pointer("/status/token"))
                .and_then(Value::as_str)
                .ok_or_else(|| fail("printed JSON without access_token, token or status.token".into()))?;
            return checked(token, v.get("expires_in").and_then(Value::as_i64))
                .map_err(|e| fail(format!("printed {e}")));
        }
        checked(trimmed, None).map_err(|e| fail(format!("printed {e}")))
    }

    fn kind(&self) -> &'static str {
        "exec"
    }
}

/// GitHub Actions' OIDC token request.
struct GithubActions {
    audience: String,
    http: HttpSettings,
}

impl TokenSource for GithubActions {
    fn fetch(&self) -> Result<Fetched, TokenError> {
        let var = |k: &str| {
            std::env::var(k).ok().filter(|v| !v.is_empty()).ok_or_else(|| {
                TokenError::Environment(format!(
                    "{k} is not set: run inside a GitHub Actions job with `permissions: id-token: write`"
                ))
            })
        };
        let url = var("ACTIONS_ID_TOKEN_REQUEST_URL")?;
        let bearer = var("ACTIONS_ID_TOKEN_REQUEST_TOKEN")?;
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{sep}audience={}", percent(&self.audience));
        let (status, body) =
            fetcher(&self.http)?.get_with_bearer(&url, &bearer).map_err(TokenError::Unreachable)?;
        token_answer(status, &body, "value")
    }

    fn kind(&self) -> &'static str {
        "github_actions"
    }
}

fn percent(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// After a refused or failed fetch, the current token (while still valid) is used for this
/// long before the issuer is asked again, by the refresh ahead of time or by a connection.
const RETRY_SECS: i64 = 10;

/// One profile's token: one fetch in flight, the token reused until `margin` before it
/// expires (at most half its remaining life at fetch time), a changed file read again, and,
/// while [`TokenCache::keep_fresh`] runs, refreshed ahead of that point without a connection
/// waiting for it.
pub struct TokenCache {
    source: Arc<dyn TokenSource>,
    margin: i64,
    state: Mutex<State>,
    /// Held for the length of a fetch: one in flight per profile.
    flight: tokio::sync::Mutex<()>,
    metrics: Option<Arc<super::metrics::Metrics>>,
}

#[derive(Default)]
struct State {
    /// The token and when it was fetched (Unix time).
    current: Option<(Fetched, i64)>,
    /// When the last fetch failed, if it did after the current token was fetched.
    failed_at: Option<i64>,
    /// Fetches done (succeeded or failed).
    fetches: u64,
    /// The last fetch's error, if it failed.
    last_error: Option<Arc<TokenError>>,
}

impl TokenCache {
    /// A cache in front of `source`.
    pub fn new(source: Arc<dyn TokenSource>, margin_secs: u64) -> Self {
        Self {
            source,
            margin: i64::try_from(margin_secs).unwrap_or(i64::MAX),
            state: Mutex::new(State::default()),
            flight: tokio::sync::Mutex::new(()),
            metrics: None,
        }
    }

    /// The same, counting its fetches in `metrics`.
    pub fn counted(mut self, metrics: Arc<super::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The source's kind.
    pub fn kind(&self) -> &'static str {
        self.source.kind()
    }

    /// A token good for a while yet, and whether it was fetched now. A connection never waits
    /// for a fetch while the current token is still valid (more than a few seconds left) and a
    /// fetch is in flight (the refresh ahead of time) or failed less than ten seconds ago; when
    /// its own fetch fails, such a token is used too.
    pub async fn get(&self) -> Result<(Fetched, bool), TokenError> {
        if let Some(f) = self.reusable(gprxy_core::unix_time()) {
            return Ok((f, false));
        }
        let before = self.state.lock().fetches;
        let flight = match self.flight.try_lock() {
            Ok(flight) => flight,
            Err(_) => match self.still_valid(gprxy_core::unix_time()) {
                Some(f) => return Ok((f, false)),
                // Callers meanwhile wait for the fetch in flight instead of fetching too.
                None => self.flight.lock().await,
            },
        };
        let now = gprxy_core::unix_time();
        // Fetched, or failed, while this caller waited.
        if let Some(f) = self.reusable(now) {
            return Ok((f, false));
        }
        // A fetch that failed while this caller waited for it is its answer too: with the
        // issuer down, connections that came together are refused together, each after one
        // fetch's time, not one after another (the last after all their timeouts).
        {
            let state = self.state.lock();
            if let (true, Some(e)) = (state.fetches != before, &state.last_error) {
                return Err(TokenError::Shared(e.clone()));
            }
        }
        let fetched = self.fetch(now).await;
        drop(flight);
        match fetched {
            Ok(f) => Ok((f, true)),
            Err(e) => match self.still_valid(gprxy_core::unix_time()) {
                Some(f) => {
                    tracing::warn!(event = "token_refresh_failed", source = self.source.kind(), error = %e,
                                   token_fp = %f.token.fingerprint(), "cannot refresh the token; the current one is still valid");
                    Ok((f, false))
                }
                None => Err(e),
            },
        }
    }

    /// Fetches from the source (the caller holds `flight`) and keeps the outcome.
    async fn fetch(&self, now: i64) -> Result<Fetched, TokenError> {
        let source = self.source.clone();
        let fetched = tokio::task::spawn_blocking(move || source.fetch())
            .await
            .map_err(|e| TokenError::BadAnswer(format!("the fetch failed: {e}")))
            .and_then(|r| r);
        if let Some(m) = &self.metrics {
            let outcome = if fetched.is_ok() { "success" } else { "failure" };
            m.token_fetches
                .get_or_create(&super::metrics::FetchLabels { source: self.source.kind(), outcome })
                .inc();
        }
        let mut state = self.state.lock();
        state.fetches += 1;
        match fetched {
            Ok(f) => {
                state.current = Some((f.clone(), now));
                state.failed_at = None;
                state.last_error = None;
                Ok(f)
            }
            Err(e) => {
                state.failed_at = Some(gprxy_core::unix_time());
                let e = Arc::new(e);
                state.last_error = Some(e.clone());
                Err(TokenError::Shared(e))
            }
        }
    }

    /// The current token if it is before its refresh point and its source has not changed.
    fn fresh(&self, now: i64) -> Option<Fetched> {
        let state = self.state.lock();
        let (f, at) = state.current.as_ref()?;
        (self.refresh_point(f, *at).is_some_and(|p| now < p) && !self.source.changed()).then(|| f.clone())
    }

    /// The fresh token, or the still valid one while the last fetch failed less than
    /// [`RETRY_SECS`] ago.
    fn reusable(&self, now: i64) -> Option<Fetched> {
        let retry_later = self.state.lock().failed_at.is_some_and(|t| now < t + RETRY_SECS);
        self.fresh(now).or_else(|| if retry_later { self.still_valid(now) } else { None })
    }

    /// The current token if more than [`STILL_VALID_SECS`] of it are left and its source has
    /// not changed.
    fn still_valid(&self, now: i64) -> Option<Fetched> {
        let state = self.state.lock();
        let (f, _) = state.current.as_ref()?;
        (f.expires_at.is_some_and(|exp| now + STILL_VALID_SECS < exp) && !self.source.changed())
            .then(|| f.clone())
    }

    /// When a token fetched at `fetched_at` is to be replaced: `margin` before it expires, at most
    /// half its remaining life then. None: no expiry known (used for one connection only).
    fn refresh_point(&self, f: &Fetched, fetched_at: i64) -> Option<i64> {
        f.expires_at.map(|exp| exp - self.margin.min((exp - fetched_at).max(0) / 2))
    }

    /// When the refresh ahead of time is due: the current token's refresh point, or, after a
    /// failed fetch, [`RETRY_SECS`] after it. None: nothing to refresh ahead of.
    fn due_at(&self) -> Option<i64> {
        let state = self.state.lock();
        let (f, at) = state.current.as_ref()?;
        let point = self.refresh_point(f, *at)?;
        Some(state.failed_at.map_or(point, |t| point.max(t + RETRY_SECS)))
    }

    /// Refreshes the token ahead of time, for as long as it runs: once a connection has fetched
    /// a token with a known expiry, a new one is fetched at its refresh point, so that
    /// connections find a fresh token waiting (and those that come during the fetch use the
    /// current one). A failed refresh is tried again ten seconds later.
    pub async fn keep_fresh(self: Arc<Self>) {
        loop {
            let now = gprxy_core::unix_time();
            match self.due_at() {
                Some(at) if at <= now => {}
                Some(at) => {
                    tokio::time::sleep(Duration::from_secs(u64::try_from(at - now).unwrap_or(1).min(60)))
                        .await;
                    continue;
                }
                None => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            let flight = self.flight.lock().await;
            let now = gprxy_core::unix_time();
            // A connection fetched while this waited.
            if self.fresh(now).is_some() {
                continue;
            }
            let before = self.state.lock().current.as_ref().map(|(f, _)| f.token.clone());
            let fetched = self.fetch(now).await;
            drop(flight);
            match fetched {
                Ok(f) if before.as_ref() == Some(&f.token) => {
                    tracing::debug!(event = "token_unchanged", source = self.source.kind(),
                                    token_fp = %f.token.fingerprint(), "the source gave the same token again");
                }
                Ok(f) => {
                    tracing::info!(event = "token_refreshed", source = self.source.kind(),
                                   token_fp = %f.token.fingerprint(), "token refreshed ahead of its end");
                }
                Err(e) => {
                    tracing::warn!(event = "token_refresh_failed", source = self.source.kind(), error = %e, "cannot refresh the token");
                    continue;
                }
            }
            // A source that gives a token already due (a stale file, a short-lived token) is
            // asked again after a pause, never in a loop.
            if self.due_at().is_some_and(|at| at <= gprxy_core::unix_time()) {
                tokio::time::sleep(Duration::from_secs(RETRY_SECS.unsigned_abs())).await;
            }
        }
    }

    /// Forgets `token` (the server refused it): the next connection fetches a new one.
    pub async fn forget(&self, token: &Token) {
        let mut state = self.state.lock();
        if state.current.as_ref().is_some_and(|(f, _)| &f.token == token) {
            *state = State::default();
        }
    }
}

/// A token for other modules' tests.
#[cfg(test)]
pub fn tests_token(t: &str) -> Token {
    Token(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        calls: AtomicUsize,
        lifetime: Option<i64>,
    }

    impl TokenSource for Counting {
        fn fetch(&self) -> Result<Fetched, TokenError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            Ok(Fetched {
                token: Token(format!("t{n}")),
                expires_at: self.lifetime.map(|l| gprxy_core::unix_time() + l),
            })
        }
        fn kind(&self) -> &'static str {
            "test"
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_and_the_token_is_reused() {
        let source = Arc::new(Counting { calls: AtomicUsize::new(0), lifetime: Some(3600) });
        let cache = Arc::new(TokenCache::new(source.clone(), 60));
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.get().await.unwrap().0.token })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().expose(), "t0");
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        cache.forget(&Token("t0".into())).await;
        assert_eq!(cache.get().await.unwrap().0.token.expose(), "t1");
    }

    #[tokio::test]
    async fn a_token_near_its_end_or_without_one_is_fetched_again() {
        // 10 s of life, margin 60 s: reused for the first half only.
        let source = Arc::new(Counting { calls: AtomicUsize::new(0), lifetime: Some(10) });
        let cache = TokenCache::new(source.clone(), 60);
        assert!(cache.get().await.unwrap().1);
        assert!(!cache.get().await.unwrap().1);
        let source = Arc::new(Counting { calls: AtomicUsize::new(0), lifetime: None });
        let cache = TokenCache::new(source.clone(), 60);
        cache.get().await.unwrap();
        cache.get().await.unwrap();
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_token_is_refreshed_ahead_of_its_end_without_a_connection_asking() {
        // 6 s of life: refreshed 3 s after it was fetched.
        let source = Arc::new(Counting { calls: AtomicUsize::new(0), lifetime: Some(6) });
        let cache = Arc::new(TokenCache::new(source.clone(), 60));
        let keeper = tokio::spawn(cache.clone().keep_fresh());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 0, "nothing is fetched before a connection asks");
        assert_eq!(cache.get().await.unwrap().0.token.expose(), "t0");
        tokio::time::sleep(Duration::from_millis(4000)).await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        let (f, fetched) = cache.get().await.unwrap();
        assert_eq!((f.token.expose(), fetched), ("t1", false));
        keeper.abort();
    }

    /// A source that takes `delay` and fails while `fail` is set.
    struct Scripted {
        calls: AtomicUsize,
        delay: Duration,
        fail: std::sync::atomic::AtomicBool,
    }

    impl TokenSource for Scripted {
        fn fetch(&self) -> Result<Fetched, TokenError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            if self.fail.load(Ordering::SeqCst) {
                return Err(TokenError::Refused { error: "invalid_client".into(), status: 401 });
            }
            Ok(Fetched { token: Token(format!("t{n}")), expires_at: Some(gprxy_core::unix_time() + 300) })
        }
        fn kind(&self) -> &'static str {
            "test"
        }
    }

    /// A cache whose current token `old` has `left` seconds of life and is due (fetched as
    /// long before as it has left).
    fn due_cache(source: Arc<Scripted>, left: i64) -> Arc<TokenCache> {
        let cache = TokenCache::new(source, 60);
        let now = gprxy_core::unix_time();
        cache.state.lock().current =
            Some((Fetched { token: Token("old".into()), expires_at: Some(now + left) }, now - left));
        assert!(cache.fresh(now).is_none() && cache.due_at().is_some_and(|at| at <= now));
        Arc::new(cache)
    }

    #[tokio::test]
    async fn connections_use_the_current_token_while_the_refresh_ahead_of_time_is_in_flight() {
        let source = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(1500),
            fail: false.into(),
        });
        let cache = due_cache(source.clone(), 30);
        let keeper = tokio::spawn(cache.clone().keep_fresh());
        while source.calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let asked = Instant::now();
        let (f, fetched) = cache.get().await.unwrap();
        assert_eq!((f.token.expose(), fetched), ("old", false));
        assert!(asked.elapsed() < Duration::from_millis(500), "waited {:?}", asked.elapsed());
        // Once the refresh is done its token is the one handed out; one fetch in all.
        tokio::time::sleep(Duration::from_millis(1700)).await;
        let (f, fetched) = cache.get().await.unwrap();
        assert_eq!((f.token.expose(), fetched, source.calls.load(Ordering::SeqCst)), ("t0", false, 1));
        // With the current token nearly at its end, a connection waits for the fetch in flight
        // (and shares it).
        let cache = due_cache(source.clone(), STILL_VALID_SECS);
        let other = cache.clone();
        let first = tokio::spawn(async move { other.get().await.unwrap() });
        while source.calls.load(Ordering::SeqCst) == 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (f, fetched) = cache.get().await.unwrap();
        assert_eq!((f.token.expose(), fetched), ("t1", false));
        assert_eq!(first.await.unwrap().0.token.expose(), "t1");
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        keeper.abort();
    }

    #[tokio::test]
    async fn connections_waiting_behind_a_failed_fetch_share_its_error_instead_of_fetching_in_turn() {
        // No token yet, the issuer refusing after a second: eight connections at once.
        let source = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(1000),
            fail: true.into(),
        });
        let cache = Arc::new(TokenCache::new(source.clone(), 60));
        let started = Instant::now();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get().await.map(|_| ()).unwrap_err().to_string() })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.await.unwrap(), "the issuer refused the token request: invalid_client (HTTP 401)");
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1, "one fetch for all eight");
        assert!(started.elapsed() < Duration::from_millis(1900), "took {:?}", started.elapsed());
        // The next connection, after that, asks again.
        source.fail.store(false, Ordering::SeqCst);
        assert_eq!(cache.get().await.unwrap().0.token.expose(), "t1");
    }

    #[tokio::test]
    async fn a_failed_fetch_is_not_tried_again_for_ten_seconds_while_the_token_is_still_valid() {
        let source =
            Arc::new(Scripted { calls: AtomicUsize::new(0), delay: Duration::ZERO, fail: true.into() });
        let cache = due_cache(source.clone(), 30);
        // A connection's fetch fails: the current token is used, and the next connections and
        // the refresh ahead of time do not ask again for ten seconds.
        assert_eq!(cache.get().await.unwrap().0.token.expose(), "old");
        assert_eq!(cache.get().await.unwrap().0.token.expose(), "old");
        let keeper = tokio::spawn(cache.clone().keep_fresh());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        keeper.abort();
        // Without a valid token each connection asks.
        let cache = due_cache(source.clone(), STILL_VALID_SECS);
        for _ in 0..2 {
            assert_eq!(
                cache.get().await.unwrap_err().to_string(),
                "the issuer refused the token request: invalid_client (HTTP 401)"
            );
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_token_debug_shows_only_its_fingerprint_and_answers_never_quote_a_description() {
        let t = Token("secret.token.value".into());
        assert!(!format!("{t:?}").contains("secret"));
        let e = token_answer(
            401,
            br#"{"error":"invalid_client","error_description":"bad secret hunter2"}"#,
            "access_token",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "the issuer refused the token request: invalid_client (HTTP 401)");
    }

    #[test]
    fn a_failing_command_is_reported_with_its_status_and_last_error_line() {
        let exec = Exec {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo not-a-token; echo 'vault: permission denied' >&2; exit 3".into(),
            ],
            timeout: Duration::from_secs(5),
        };
        assert_eq!(
            exec.fetch().unwrap_err().to_string(),
            "the command /bin/sh exited with status 3: vault: permission denied"
        );
        let exec = Exec { command: vec!["/bin/sleep".into(), "5".into()], timeout: Duration::from_secs(1) };
        assert_eq!(
            exec.fetch().unwrap_err().to_string(),
            "the command /bin/sleep did not finish within 1 s and was killed"
        );
    }

    #[test]
    fn a_token_file_is_read_again_when_it_changes_and_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first.token\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let f = TokenFile { path: path.clone(), seen: Mutex::new(None) };
        assert_eq!(f.fetch().unwrap().token.expose(), "first.token");
        assert!(!f.changed());
        std::fs::write(path.with_extension("new"), "second.token").unwrap();
        std::fs::set_permissions(path.with_extension("new"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(path.with_extension("new"), &path).unwrap();
        assert!(f.changed());
        assert_eq!(f.fetch().unwrap().token.expose(), "second.token");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert_eq!(
            f.fetch().unwrap_err().to_string(),
            format!("{}: writable by others (mode 664); run chmod 600 on it", path.display())
        );
    }
}
