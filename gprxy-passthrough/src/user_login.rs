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
    /// PEM CA file for a private issuer.
    pub ca_file: Option<PathBuf>,
    /// INSECURE, tests only: plain HTTP to a loopback issuer.
    pub insecure_allow_http_loopback: bool,
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

fn json_object(body: &[u8]) -> Result<Map<String, Value>, LoginError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(LoginError::BadResponse("not a JSON object".into())),
    }
}

fn str_field(m: &Map<String, Value>, k: &str) -> Option<String> {
    m.get(k).and_then(Value::as_str).map(str::to_owned)
}

fn oauth_error(m: &Map<String, Value>) -> Option<(String, Option<String>)> {
    str_field(m, "error").map(|e| (e, str_field(m, "error_description")))
}

/// When the token expires: `expires_in` if given, else the token's own `exp` (read unverified:
/// only to decide when to refresh), else now (refresh next time).
fn expiry(m: &Map<String, Value>, access_token: &str, now: i64) -> i64 {
    let from_response = m.get("expires_in").and_then(Value::as_i64).map(|s| now + s);
    let from_token = gprxy_core::peek_claim(access_token, "exp").and_then(|v| v.parse::<i64>().ok());
    match (from_response, from_token) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(now),
    }
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
    let (_, body) = fetcher.post_form(&device_endpoint, &form).map_err(unreachable)?;
    let device = json_object(&body)?;
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
    let poll = [("grant_type", DEVICE_GRANT), ("device_code", &device_code), ("client_id", &req.client_id)];
    loop {
        let (_, body) = fetcher.post_form(&token_endpoint, &poll).map_err(unreachable)?;
        let answer = json_object(&body)?;
        match oauth_error(&answer) {
            None => {
                let now = gprxy_core::unix_time();
                let access_token = str_field(&answer, "access_token")
                    .ok_or_else(|| LoginError::BadResponse("no access_token".into()))?;
                return Ok(Credentials {
                    issuer: req.issuer.clone(),
                    client_id: req.client_id.clone(),
                    token_endpoint,
                    expires_at: expiry(&answer, &access_token, now),
                    access_token,
                    refresh_token: str_field(&answer, "refresh_token"),
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
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token.as_str()),
        ("client_id", creds.client_id.as_str()),
    ];
    let (_, body) = fetcher
        .post_form(&creds.token_endpoint, &form)
        .map_err(|source| LoginError::Unreachable { issuer: creds.issuer.clone(), source })?;
    let answer = json_object(&body)?;
    if let Some((error, _)) = oauth_error(&answer) {
        return Err(LoginError::RefreshRefused { error });
    }
    let access_token = str_field(&answer, "access_token")
        .ok_or_else(|| LoginError::BadResponse("no access_token".into()))?;
    creds.expires_at = expiry(&answer, &access_token, now);
    creds.access_token = access_token;
    // Rotating issuers send a new refresh token; others keep the old one valid.
    if let Some(r) = str_field(&answer, "refresh_token") {
        creds.refresh_token = Some(r);
    }
    Ok(())
}

/// A valid access token from the stored credentials, refreshed (and saved) when less than
/// [`REFRESH_MARGIN_SECS`] are left.
pub fn token(path: &Path, now: i64) -> Result<String, LoginError> {
    let mut creds = load(path)?;
    if creds.expires_at - now >= REFRESH_MARGIN_SECS {
        return Ok(creds.access_token);
    }
    refresh(&mut creds, now)?;
    save(path, &creds)?;
    Ok(creds.access_token)
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

    fn creds() -> Credentials {
        Credentials {
            issuer: "https://127.0.0.1:1/".into(),
            client_id: "cli".into(),
            token_endpoint: "https://127.0.0.1:1/token".into(),
            access_token: "a.b.c".into(),
            refresh_token: Some("r1".into()),
            expires_at: 1000,
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
        assert_eq!(token(&path, 1000 - REFRESH_MARGIN_SECS).unwrap(), "a.b.c");
        // Inside the margin it must refresh; the issuer here does not exist.
        assert!(matches!(token(&path, 1000 - REFRESH_MARGIN_SECS + 1), Err(LoginError::Unreachable { .. })));
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

    #[test]
    fn expiry_takes_the_earlier_of_response_and_token() {
        let m = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(expiry(&m(serde_json::json!({"expires_in": 300})), "opaque", 100), 400);
        assert_eq!(expiry(&m(serde_json::json!({})), "opaque", 100), 100);
    }
}
