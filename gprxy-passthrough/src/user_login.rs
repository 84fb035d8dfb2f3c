//! The user's side: `gprxy login` runs the OAuth 2.0 device flow (RFC 8628) against the issuer
//! and stores the tokens; `gprxy token` prints a valid access token, refreshing it with the
//! refresh token when less than a minute is left, so that any PostgreSQL client can use
//! `PGPASSWORD=$(gprxy token)`.
//!
//! Credentials live in `$GPRXY_CONFIG_DIR`, else `$XDG_CONFIG_HOME/gprxy`, else
//! `~/.config/gprxy`, as `credentials.json`, mode 0600 in a 0700 folder; a file others can read
//! is refused.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gprxy_core::{HttpSettings, KeyError, UreqFetcher};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Refresh when fewer seconds than this are left.
pub const REFRESH_MARGIN_SECS: i64 = 60;
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Why a client command failed. The messages are what the user reads.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The issuer could not be reached or answered nonsense.
    #[error("cannot reach the issuer {issuer}: {source}")]
    Unreachable {
        /// Issuer URL.
        issuer: String,
        /// What failed.
        source: KeyError,
    },
    /// The issuer's metadata lacks an endpoint.
    #[error("the issuer {issuer} does not offer {what} (no {field} in its metadata)")]
    NotOffered {
        /// Issuer URL.
        issuer: String,
        /// What the user wanted.
        what: &'static str,
        /// Metadata field.
        field: &'static str,
    },
    /// The issuer refused a request with an OAuth error.
    #[error("the issuer refused: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        /// OAuth `error`.
        error: String,
        /// OAuth `error_description`.
        description: Option<String>,
    },
    /// The device code expired before the user approved.
    #[error("the login was not approved in time; run gprxy login again")]
    DeviceExpired,
    /// The refresh token was refused (expired or revoked).
    #[error("the refresh token was refused by the issuer ({error}): run gprxy login again")]
    RefreshRefused {
        /// OAuth `error`, usually invalid_grant.
        error: String,
    },
    /// The access token expired and there is nothing to refresh it with.
    #[error("the access token has expired and there is no refresh token: run gprxy login again")]
    NoRefreshToken,
    /// No credentials yet.
    #[error("no credentials at {0}: run gprxy login first")]
    Missing(PathBuf),
    /// The credentials file cannot be parsed.
    #[error("the credentials file {path} is corrupt ({reason}); run gprxy login again")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Parse error.
        reason: String,
    },
    /// Others may read the credentials file.
    #[error("the credentials file {path} is readable by others (mode {mode:o}); run chmod 600 on it")]
    TooOpen {
        /// File.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The token response is not what RFC 6749 describes.
    #[error("the issuer's token response is invalid: {0}")]
    BadResponse(String),
    /// File-system error.
    #[error("{path}: {source}")]
    Io {
        /// File or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What `gprxy login` stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Issuer URL.
    pub issuer: String,
    /// OAuth client id.
    pub client_id: String,
    /// Where tokens are refreshed.
    pub token_endpoint: String,
    /// The access token.
    pub access_token: String,
    /// The refresh token, if the issuer gave one (ask for `offline_access`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// Unix time the access token expires.
    pub expires_at: i64,
    /// RFC 8707 resource indicators asked for at login, asked for again at each refresh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource: Vec<String>,
    /// PEM CA file for a private issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// INSECURE, tests only: plain HTTP to a loopback issuer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_allow_http_loopback: bool,
}

/// What `gprxy login` needs.
#[derive(Debug, Clone)]
pub struct LoginRequest {
    /// Issuer URL (exactly as in its metadata).
    pub issuer: String,
    /// OAuth client id (a public client with the device grant enabled).
    pub client_id: String,
    /// Scopes to ask for.
    pub scope: String,
    /// `audience` parameter (Auth0 needs one to issue a JWT access token).
    pub audience: Option<String>,
    /// RFC 8707 `resource` parameters (absolute URIs): providers that issue RFC 9068 JWT access
    /// tokens only for a resource (panva's oidc-provider) need one.
    pub resource: Vec<String>,
    /// PEM CA file for a private issuer.
    pub ca_file: Option<PathBuf>,
    /// INSECURE, tests only: plain HTTP to a loopback issuer.
    pub insecure_allow_http_loopback: bool,
}

/// RFC 8707 section 2: a resource indicator is an absolute URI without a fragment.
pub fn check_resource(uri: &str) -> Result<(), String> {
    let scheme_ok = uri.split_once(':').is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            && !rest.is_empty()
    });
    if !scheme_ok {
        return Err("a resource is an absolute URI (RFC 8707), such as https://db.example.com".into());
    }
    if uri.contains('#') {
        return Err("a resource has no fragment (RFC 8707)".into());
    }
    Ok(())
}

/// `$GPRXY_CONFIG_DIR`, else `$XDG_CONFIG_HOME/gprxy`, else `~/.config/gprxy`.
pub fn config_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("GPRXY_CONFIG_DIR")
        .or_else(|| env("XDG_CONFIG_HOME").map(|d| d.join("gprxy")))
        .or_else(|| env("HOME").map(|h| h.join(".config").join("gprxy")))
        .unwrap_or_else(|| PathBuf::from(".gprxy"))
}

/// The credentials file.
pub fn credentials_path() -> PathBuf {
    config_dir().join("credentials.json")
}

fn http(ca_file: Option<&Path>, insecure: bool) -> Result<UreqFetcher, LoginError> {
    let settings = HttpSettings {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(10),
        insecure_allow_http_loopback: insecure,
        ca_file: ca_file.map(Path::to_path_buf),
        ..HttpSettings::default()
    };
    UreqFetcher::new(settings).map_err(|e| LoginError::BadResponse(e.to_string()))
}

/// An OAuth endpoint's answer as a JSON object. Anything else (an HTML error page from a proxy,
/// an empty body) is named by its HTTP status and what it likely means, never quoted (it may
/// echo what was sent).
fn json_object(status: u16, body: &[u8]) -> Result<Map<String, Value>, LoginError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => {
            let what = if body.iter().all(u8::is_ascii_whitespace) {
                "an empty body"
            } else {
                "a body that is not a JSON object"
            };
            let hint = match status {
                200..=299 => "the URL may not be this issuer's OAuth endpoint",
                401 | 403 => "the client id (or its secret) is not accepted at this endpoint",
                404 => "the endpoint is not there: check the issuer URL",
                429 => "the issuer is limiting requests: try again later",
                500..=599 => "the issuer (or a proxy in front of it) failed: try again later",
                _ => "check the issuer URL and the client's settings at the issuer",
            };
            Err(LoginError::BadResponse(format!("HTTP {status} with {what}: {hint}")))
        }
    }
}

fn str_field(m: &Map<String, Value>, k: &str) -> Option<String> {
    m.get(k).and_then(Value::as_str).map(str::to_owned)
}

fn oauth_error(m: &Map<String, Value>) -> Option<(String, Option<String>)> {
    str_field(m, "error").map(|e| (e, str_field(m, "error_description")))
}

/// How long a token is taken to last when neither the answer (`expires_in`, RECOMMENDED by
/// RFC 6749 section 5.1) nor the token (an opaque one has no `exp`) says.
pub const UNKNOWN_LIFETIME_SECS: i64 = 300;

/// When the token expires: the earlier of `expires_in` and the token's own `exp` (read
/// unverified: only to decide when to refresh), else [`UNKNOWN_LIFETIME_SECS`] from now.
fn expiry(m: &Map<String, Value>, access_token: &str, now: i64) -> i64 {
    let from_response = m.get("expires_in").and_then(Value::as_i64).map(|s| now + s);
    let from_token = gprxy_core::peek_claim(access_token, "exp").and_then(|v| v.parse::<i64>().ok());
    match (from_response, from_token) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(now + UNKNOWN_LIFETIME_SECS),
    }
}

/// The access token of a successful token answer (RFC 6749 section 5.1): `access_token` is
/// required; `token_type`, required too, is taken as `Bearer` when absent (some issuers leave it
/// out) and refused when it names another kind (a DPoP-bound token is useless without its key,
/// which gprxy does not hold).
fn access_token(m: &Map<String, Value>) -> Result<String, LoginError> {
    let token =
        str_field(m, "access_token").ok_or_else(|| LoginError::BadResponse("no access_token".into()))?;
    match m.get("token_type") {
        None => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(t)) if t.len() <= 32 && t.bytes().all(|b| b.is_ascii_graphic()) => {
            return Err(LoginError::BadResponse(format!(
                "token_type {t:?} is not Bearer: ask the issuer for a plain bearer token for this client"
            )))
        }
        Some(_) => return Err(LoginError::BadResponse("token_type is not a short string".into())),
    }
    Ok(token)
}

/// Runs the device flow: asks the issuer for a code, tells the user (`prompt`) where to enter
/// it, polls until approved, and returns the credentials (not yet saved).
pub fn login(req: &LoginRequest, prompt: &mut dyn Write) -> Result<Credentials, LoginError> {
    let fetcher = http(req.ca_file.as_deref(), req.insecure_allow_http_loopback)?;
    let unreachable = |source| LoginError::Unreachable { issuer: req.issuer.clone(), source };
    let (_, meta) = gprxy_core::issuer_metadata(&fetcher, &req.issuer).map_err(unreachable)?;
    let endpoint = |field: &'static str, what: &'static str| {
        str_field(&meta, field).ok_or(LoginError::NotOffered { issuer: req.issuer.clone(), what, field })
    };
    let device_endpoint = endpoint("device_authorization_endpoint", "the device flow")?;
    let token_endpoint = endpoint("token_endpoint", "tokens")?;

    let mut form = vec![("client_id", req.client_id.as_str()), ("scope", req.scope.as_str())];
    if let Some(a) = &req.audience {
        form.push(("audience", a));
    }
    for r in &req.resource {
        form.push(("resource", r));
    }
    let (status, body) = fetcher.post_form(&device_endpoint, &form).map_err(unreachable)?;
    let device = json_object(status, &body)?;
    if let Some((error, description)) = oauth_error(&device) {
        return Err(LoginError::Refused { error, description });
    }
    let field = |k: &str| str_field(&device, k).ok_or_else(|| LoginError::BadResponse(format!("no {k}")));
    let device_code = field("device_code")?;
    let user_code = field("user_code")?;
    let uri = str_field(&device, "verification_uri")
        .or_else(|| str_field(&device, "verification_url")) // Google's name
        .ok_or_else(|| LoginError::BadResponse("no verification_uri".into()))?;
    let mut interval = device.get("interval").and_then(Value::as_u64).unwrap_or(5).max(1);
    let lifetime = device.get("expires_in").and_then(Value::as_u64).unwrap_or(600);
    let _ = writeln!(prompt, "To log in, open {uri} and enter the code {user_code}");
    if let Some(complete) = str_field(&device, "verification_uri_complete") {
        let _ = writeln!(prompt, "(or open {complete})");
    }
    let _ = prompt.flush();

    let deadline = std::time::Instant::now() + Duration::from_secs(lifetime);
    let mut poll =
        vec![("grant_type", DEVICE_GRANT), ("device_code", &device_code), ("client_id", &req.client_id)];
    for r in &req.resource {
        poll.push(("resource", r));
    }
    loop {
        let (status, body) = fetcher.post_form(&token_endpoint, &poll).map_err(unreachable)?;
        let answer = json_object(status, &body)?;
        match oauth_error(&answer) {
            None => {
                let now = gprxy_core::unix_time();
                let access_token = access_token(&answer)?;
                return Ok(Credentials {
                    issuer: req.issuer.clone(),
                    client_id: req.client_id.clone(),
                    token_endpoint,
                    expires_at: expiry(&answer, &access_token, now),
                    access_token,
                    refresh_token: str_field(&answer, "refresh_token"),
                    resource: req.resource.clone(),
                    ca_file: req.ca_file.clone(),
                    insecure_allow_http_loopback: req.insecure_allow_http_loopback,
                });
            }
            Some((e, _)) if e == "authorization_pending" => {}
            Some((e, _)) if e == "slow_down" => interval += 5,
            Some((e, _)) if e == "expired_token" => return Err(LoginError::DeviceExpired),
            Some((error, description)) => return Err(LoginError::Refused { error, description }),
        }
        if std::time::Instant::now() + Duration::from_secs(interval) > deadline {
            return Err(LoginError::DeviceExpired);
        }
        std::thread::sleep(Duration::from_secs(interval));
    }
}

/// Refreshes the access token with the refresh token (RFC 6749 section 6).
pub fn refresh(creds: &mut Credentials, now: i64) -> Result<(), LoginError> {
    let refresh_token = creds.refresh_token.clone().ok_or(LoginError::NoRefreshToken)?;
    let fetcher = http(creds.ca_file.as_deref(), creds.insecure_allow_http_loopback)?;
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token.as_str()),
        ("client_id", creds.client_id.as_str()),
    ];
    for r in &creds.resource {
        form.push(("resource", r));
    }
    let (status, body) = fetcher
        .post_form(&creds.token_endpoint, &form)
        .map_err(|source| LoginError::Unreachable { issuer: creds.issuer.clone(), source })?;
    let answer = json_object(status, &body)?;
    if let Some((error, _)) = oauth_error(&answer) {
        return Err(LoginError::RefreshRefused { error });
    }
    let access_token = access_token(&answer)?;
    creds.expires_at = expiry(&answer, &access_token, now);
    creds.access_token = access_token;
    // Rotating issuers send a new refresh token; others keep the old one valid.
    if let Some(r) = str_field(&answer, "refresh_token") {
        creds.refresh_token = Some(r);
    }
    Ok(())
}

/// A valid access token from the stored credentials, refreshed (and saved) unless more than
/// [`REFRESH_MARGIN_SECS`] are left.
pub fn token(path: &Path, now: i64) -> Result<String, LoginError> {
    token_within(path, now, REFRESH_MARGIN_SECS, None).map(|(token, _)| token)
}

/// A token another process stored is taken as it is only with more than this left.
const TAKEN_AS_IS_SECS: i64 = 5;

/// The stored access token and when it expires: as stored while more than `margin` seconds
/// are left, or when it is not the token whose fingerprint is `handed_out` (one the caller had
/// and now finds due: another process refreshed it since), else refreshed with the refresh
/// token and saved.
///
/// Processes sharing the credentials (`gprxy token`, connectors of several profiles) take
/// turns: a refresh runs under an exclusive lock on `<file>.lock`, and one that waited for
/// another's refresh takes the token that one stored. Two refreshes with the same refresh token
/// would be a replay, for which a provider rotating refresh tokens ends the whole grant
/// (RFC 9700 section 4.14.2).
pub fn token_within(
    path: &Path,
    now: i64,
    margin: i64,
    handed_out: Option<&str>,
) -> Result<(String, i64), LoginError> {
    let left = |c: &Credentials| c.expires_at - now;
    let replaced = |c: &Credentials| {
        handed_out.is_some_and(|fp| gprxy_core::fingerprint(c.access_token.as_bytes()) != fp)
            && left(c) > TAKEN_AS_IS_SECS
    };
    let seen = load(path)?;
    if left(&seen) > margin || replaced(&seen) {
        return Ok((seen.access_token, seen.expires_at));
    }
    let _turn = lock(path)?;
    let mut creds = load(path)?;
    let refreshed_meanwhile = creds.access_token != seen.access_token && left(&creds) > TAKEN_AS_IS_SECS;
    if left(&creds) > margin || refreshed_meanwhile {
        return Ok((creds.access_token, creds.expires_at));
    }
    refresh(&mut creds, now)?;
    save(path, &creds)?;
    Ok((creds.access_token, creds.expires_at))
}

/// An exclusive lock on `<path>.lock` (mode 0600), held until the file is dropped.
fn lock(path: &Path) -> Result<std::fs::File, LoginError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let lock_path = path.with_file_name(name);
    let io = |source| LoginError::Io { path: lock_path.clone(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io)?;
    file.lock().map_err(io)?;
    Ok(file)
}

/// Reads the credentials, refusing a file others can read.
pub fn load(path: &Path) -> Result<Credentials, LoginError> {
    let io = |source| LoginError::Io { path: path.to_path_buf(), source };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LoginError::Missing(path.into())),
        Err(e) => return Err(io(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(LoginError::TooOpen { path: path.into(), mode });
    }
    let text = std::fs::read(path).map_err(io)?;
    serde_json::from_slice(&text)
        // Where and what kind of fault, never the error's text: it can quote a value (a token).
        .map_err(|e| LoginError::Corrupt {
            path: path.into(),
            reason: format!("{:?} error at line {}, column {}", e.classify(), e.line(), e.column()),
        })
}

/// Writes the credentials with mode 0600 (folder 0700), replacing the file atomically.
pub fn save(path: &Path, creds: &Credentials) -> Result<(), LoginError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| LoginError::Io { path: p, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let tmp = dir.join(format!(".credentials.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    let json = serde_json::to_vec_pretty(creds).map_err(|e| LoginError::BadResponse(e.to_string()))?;
    f.write_all(&json).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn creds() -> Credentials {
        Credentials {
            issuer: "https://127.0.0.1:1/".into(),
            client_id: "cli".into(),
            token_endpoint: "https://127.0.0.1:1/token".into(),
            access_token: "a.b.c".into(),
            refresh_token: Some("r1".into()),
            expires_at: 1000,
            resource: Vec::new(),
            ca_file: None,
            insecure_allow_http_loopback: false,
        }
    }

    #[test]
    fn saved_credentials_are_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("credentials.json");
        save(&path, &creds()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(load(&path).unwrap(), creds());
    }

    #[test]
    fn unsafe_or_broken_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        assert!(matches!(load(&path), Err(LoginError::Missing(_))));
        std::fs::write(&path, "{not json").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("the credentials file {} is corrupt (", path.display())), "{e}");
        assert!(e.ends_with("); run gprxy login again"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            load(&path).unwrap_err().to_string(),
            format!(
                "the credentials file {} is readable by others (mode 644); run chmod 600 on it",
                path.display()
            )
        );
    }

    #[test]
    fn a_token_with_time_left_is_returned_without_the_network() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        save(&path, &creds()).unwrap();
        assert_eq!(token(&path, 1000 - REFRESH_MARGIN_SECS - 1).unwrap(), "a.b.c");
        // With the margin or less left it must refresh; the issuer here does not exist.
        assert!(matches!(token(&path, 1000 - REFRESH_MARGIN_SECS), Err(LoginError::Unreachable { .. })));
        // A caller's own margin; and a token other than the one the caller had is taken as it
        // is (someone refreshed it), while it has a few seconds left.
        assert_eq!(token_within(&path, 900, 99, None).unwrap(), ("a.b.c".to_owned(), 1000));
        assert!(matches!(token_within(&path, 900, 100, None), Err(LoginError::Unreachable { .. })));
        let other = gprxy_core::fingerprint(b"x.y.z");
        assert_eq!(token_within(&path, 990, 100, Some(&other)).unwrap(), ("a.b.c".to_owned(), 1000));
        assert!(matches!(token_within(&path, 996, 100, Some(&other)), Err(LoginError::Unreachable { .. })));
        let same = gprxy_core::fingerprint(b"a.b.c");
        assert!(matches!(token_within(&path, 990, 100, Some(&same)), Err(LoginError::Unreachable { .. })));
    }

    #[test]
    fn a_refresh_waits_for_another_processs_and_takes_the_token_it_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        save(&path, &creds()).unwrap();
        // Another process is refreshing: it holds the lock.
        let turn = lock(&path).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("credentials.json.lock")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || token_within(&path, 990, 60, None))
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiter.is_finished(), "the second refresh did not wait for the first");
        // Refreshed within the same second: the same expiry, another token.
        save(
            &path,
            &Credentials { access_token: "d.e.f".into(), refresh_token: Some("r2".into()), ..creds() },
        )
        .unwrap();
        drop(turn);
        // It takes the new token: no refresh with r1, which the other's refresh used up (the
        // issuer here does not exist, so a refresh would fail).
        assert_eq!(waiter.join().unwrap().unwrap(), ("d.e.f".to_owned(), 1000));
    }

    #[test]
    fn an_expired_token_without_refresh_token_asks_for_a_new_login() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        save(&path, &Credentials { refresh_token: None, ..creds() }).unwrap();
        assert_eq!(
            token(&path, 2000).unwrap_err().to_string(),
            "the access token has expired and there is no refresh token: run gprxy login again"
        );
    }

    /// #30 item 5, RFC 6749 section 5.1: `token_type` absent is taken as Bearer, another kind is
    /// refused with the type named; `access_token` is required; `expires_in` absent with an
    /// opaque token is five minutes.
    #[test]
    fn each_member_of_a_token_answer_is_handled_as_rfc_6749_says() {
        let answer = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(access_token(&answer(json!({"access_token": "a"}))).unwrap(), "a");
        assert_eq!(access_token(&answer(json!({"access_token": "a", "token_type": "bearer"}))).unwrap(), "a");
        assert_eq!(
            access_token(&answer(json!({"access_token": "a", "token_type": "DPoP"}))).unwrap_err().to_string(),
            "the issuer's token response is invalid: token_type \"DPoP\" is not Bearer: ask the issuer for a \
             plain bearer token for this client"
        );
        assert_eq!(
            access_token(&answer(json!({"token_type": "Bearer"}))).unwrap_err().to_string(),
            "the issuer's token response is invalid: no access_token"
        );
        assert_eq!(expiry(&answer(json!({})), "opaque", 1000), 1000 + UNKNOWN_LIFETIME_SECS);
    }

    /// RFC 6749 section 5.2 and what is not JSON: the status and a hint, never the body.
    #[test]
    fn an_answer_that_is_not_json_names_its_status() {
        let e = |status, body: &[u8]| json_object(status, body).unwrap_err().to_string();
        assert_eq!(
            e(404, b"<html>nope</html>"),
            "the issuer's token response is invalid: HTTP 404 with a body that is not a JSON object: the endpoint \
             is not there: check the issuer URL"
        );
        assert_eq!(
            e(401, b"  "),
            "the issuer's token response is invalid: HTTP 401 with an empty body: the client id (or its secret) is \
             not accepted at this endpoint"
        );
        assert_eq!(
            e(429, b"[]"),
            "the issuer's token response is invalid: HTTP 429 with a body that is not a JSON object: the issuer is \
             limiting requests: try again later"
        );
        let refused = json_object(400, br#"{"error":"invalid_grant"}"#).unwrap();
        assert_eq!(oauth_error(&refused), Some(("invalid_grant".into(), None)));
    }

    #[test]
    fn expiry_takes_the_earlier_of_response_and_token() {
        let m = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(expiry(&m(serde_json::json!({"expires_in": 300})), "opaque", 100), 400);
        assert_eq!(expiry(&m(serde_json::json!({})), "opaque", 100), 100 + UNKNOWN_LIFETIME_SECS);
    }
}
