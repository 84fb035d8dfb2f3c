//! RFC 7662 token introspection: opaque access tokens, and revocation of JWTs.
//!
//! Per issuer, a [`TokenMode`]: `jwt` (signature and claims checked here), `introspect` (the
//! issuer says whether the token is active and what its claims are) or `jwt+introspect` (a JWT
//! checked here whose revocation the issuer is asked about). An [`Introspector`] asks the
//! issuer's endpoint with its client credentials and keeps each answer in an [`AnswerStore`]
//! keyed by a hash of issuer and token (never the token), so that a client logging in again and
//! again costs one request per [`IntrospectionSettings::active_ttl_max_secs`]. An answer is
//! checked like a JWT's claims ([`crate::Validator::check_claims`]).
//!
//! When the endpoint fails the login is refused, unless the issuer is `jwt+introspect` with a
//! `stale_ok_secs` window and an active answer younger than that is at hand.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::claims::parse_object;
use crate::error::{ConfigError, Quoted, Setting, ValidationError};
use crate::fetch::FormPoster;
use crate::jose::KeySource;
use crate::jwks::Clock as _;
use crate::validate::{ValidatedToken, Validator};

/// How an issuer's tokens are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TokenMode {
    /// JWTs, checked here (signature, claims).
    #[default]
    #[serde(rename = "jwt")]
    Jwt,
    /// Opaque tokens: the introspection endpoint's answer is the token's claims.
    #[serde(rename = "introspect")]
    Introspect,
    /// JWTs checked here, then asked about at the endpoint (revocation).
    #[serde(rename = "jwt+introspect")]
    JwtIntrospect,
}

impl TokenMode {
    /// The word the settings use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::Introspect => "introspect",
            Self::JwtIntrospect => "jwt+introspect",
        }
    }
}

/// How gprxy authenticates to the endpoint (RFC 6749 section 2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with the form-encoded client id and secret.
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form.
    ClientSecretPost,
}

/// An issuer's `[introspection]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionEntry {
    /// The endpoint (default: discovery's `introspection_endpoint`).
    pub endpoint: Option<String>,
    /// gprxy's client id at the issuer.
    pub client_id: String,
    /// The environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// The file holding the client secret (one line).
    pub client_secret_file: Option<PathBuf>,
    /// `client_secret_basic` (default) or `client_secret_post`.
    pub client_auth: Option<ClientAuth>,
    /// The longest an active answer is kept (default 60; never past the token's `exp`).
    pub cache_ttl_max_secs: Option<u64>,
    /// How long an inactive answer is kept (default 10).
    pub inactive_ttl_secs: Option<u64>,
    /// `jwt+introspect` only: while the endpoint fails, an active answer this much past its
    /// time still admits the token (default 0: refuse).
    pub stale_ok_secs: Option<u64>,
    /// Requests (introspection and discovery) per second to this issuer at most, with as many
    /// at once as a burst (default 20): cluster-wide in the validator, per process in the proxy.
    pub max_requests_per_sec: Option<u32>,
    /// Requests to this issuer in flight at once at most (default 4).
    pub max_concurrent_requests: Option<u32>,
}

/// Where the client secret is read from: never from a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable of the process.
    Env(String),
    /// A file (its first line).
    File(PathBuf),
}

impl SecretSource {
    /// Reads the secret. Errors name the variable or file, never what it holds.
    pub fn read(&self) -> Result<String, String> {
        let secret = match self {
            Self::Env(name) => std::env::var(name)
                .map_err(|_| format!("the client secret variable {name} is not set (or not UTF-8)"))?,
            Self::File(path) => crate::fetch::read_policy_file(path, 4096)
                .map_err(|e| format!("the client secret file: {e}"))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        };
        let secret = secret.trim().to_owned();
        if secret.is_empty() {
            return Err(match self {
                Self::Env(name) => format!("the client secret variable {name} is empty"),
                Self::File(path) => format!("the client secret file {} is empty", path.display()),
            });
        }
        Ok(secret)
    }
}

fn is_variable_name(v: &str) -> bool {
    let mut chars = v.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The largest answer kept (its claims' JSON); a larger one is asked again at each login.
pub const ANSWER_MAX_BYTES: usize = 4096;

/// An issuer's checked introspection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntrospectionSettings {
    /// The endpoint, or `None` for discovery's.
    pub endpoint: Option<String>,
    /// gprxy's client id.
    pub client_id: String,
    /// Where the secret comes from.
    pub secret: SecretSource,
    /// How it is sent.
    pub client_auth: ClientAuth,
    /// The longest an active answer is kept.
    pub active_ttl_max_secs: u64,
    /// How long an inactive answer is kept.
    pub inactive_ttl_secs: u64,
    /// `jwt+introspect`: how long past its time an active answer serves while the endpoint fails.
    pub stale_ok_secs: u64,
    /// How many requests the issuer gets from gprxy.
    pub limits: RequestLimits,
}

/// What one issuer's endpoints may cost: a token bucket (`per_sec`, bursts of as many) and a cap
/// on requests in flight. A login past either is refused as `introspection_throttled`, without
/// a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Requests per second (and the burst).
    pub per_sec: u32,
    /// Requests in flight at once.
    pub concurrent: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self { per_sec: 20, concurrent: 4 }
    }
}

/// A token bucket with a cap on requests in flight, as both stores keep it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Budget {
    /// Thousandths of a request available.
    pub milli_tokens: u64,
    /// When the bucket was last filled (unix milliseconds).
    pub filled_at_ms: u64,
    /// Requests in flight.
    pub in_flight: u32,
}

impl Budget {
    /// Takes one request at `now_ms` under `limits`: false (nothing taken) when the bucket is
    /// empty or too many are in flight.
    pub fn take(&mut self, now_ms: u64, limits: RequestLimits) -> bool {
        let cap = u64::from(limits.per_sec.max(1)) * 1000;
        if self.filled_at_ms == 0 {
            self.milli_tokens = cap;
        } else {
            let elapsed = now_ms.saturating_sub(self.filled_at_ms);
            self.milli_tokens = (self.milli_tokens + elapsed * u64::from(limits.per_sec)).min(cap);
        }
        self.filled_at_ms = now_ms;
        if self.in_flight >= limits.concurrent.max(1) || self.milli_tokens < 1000 {
            return false;
        }
        self.milli_tokens -= 1000;
        self.in_flight += 1;
        true
    }

    /// A request taken with [`Self::take`] ended.
    pub fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }
}

impl IntrospectionEntry {
    /// Checks the table for an issuer in `mode`.
    pub fn check(
        self,
        mode: TokenMode,
        allow_http_loopback: bool,
    ) -> Result<IntrospectionSettings, ConfigError> {
        let err = |r: String| ConfigError::new(Setting::Introspection, r);
        if mode == TokenMode::Jwt {
            return Err(err(
                "an [introspection] table needs tokens = \"introspect\" or \"jwt+introspect\"".into()
            ));
        }
        if self.client_id.trim().is_empty() {
            return Err(err("client_id is required".into()));
        }
        let secret = match (self.client_secret_env, self.client_secret_file) {
            // A value that is not a variable name or a path may be the secret itself, pasted in
            // the wrong place: refused without being repeated.
            (Some(name), None) if is_variable_name(name.trim()) => SecretSource::Env(name.trim().to_owned()),
            (Some(_), None) => {
                return Err(err("client_secret_env must name an environment variable ([A-Za-z_][A-Za-z0-9_]*), not hold the secret".into()))
            }
            (None, Some(path)) if path.is_absolute() => SecretSource::File(path),
            (None, Some(_)) => return Err(err("client_secret_file must be an absolute path".into())),
            _ => return Err(err("give the client secret as client_secret_env or client_secret_file (one of them; never the secret itself)".into())),
        };
        if let Some(url) = &self.endpoint {
            crate::fetch::check_url(url, allow_http_loopback).map_err(|e| err(format!("endpoint: {e}")))?;
        }
        let stale_ok_secs = self.stale_ok_secs.unwrap_or(0);
        if stale_ok_secs > 0 && mode != TokenMode::JwtIntrospect {
            return Err(err("stale_ok_secs is allowed only with tokens = \"jwt+introspect\": an opaque token has nothing else to vouch for it".into()));
        }
        let active_ttl_max_secs = self.cache_ttl_max_secs.unwrap_or(60);
        let inactive_ttl_secs = self.inactive_ttl_secs.unwrap_or(10);
        if active_ttl_max_secs > 3600 || inactive_ttl_secs > 3600 || stale_ok_secs > 86_400 {
            return Err(err(
                "cache_ttl_max_secs and inactive_ttl_secs are at most 3600, stale_ok_secs at most 86400"
                    .into(),
            ));
        }
        let limits = RequestLimits {
            per_sec: self.max_requests_per_sec.unwrap_or(RequestLimits::default().per_sec),
            concurrent: self.max_concurrent_requests.unwrap_or(RequestLimits::default().concurrent),
        };
        if limits.per_sec == 0 || limits.concurrent == 0 || limits.per_sec > 10_000 || limits.concurrent > 64
        {
            return Err(err("max_requests_per_sec is 1 to 10000, max_concurrent_requests 1 to 64".into()));
        }
        Ok(IntrospectionSettings {
            limits,
            endpoint: self.endpoint,
            client_id: self.client_id.trim().to_owned(),
            secret,
            client_auth: self.client_auth.unwrap_or_default(),
            active_ttl_max_secs,
            inactive_ttl_secs,
            stale_ok_secs,
        })
    }
}

/// One answer as stored: whether the token was active, the answer's claims (JSON, active
/// answers only), until when it is fresh and when it was stored (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    /// `active` was true.
    pub active: bool,
    /// The answer's JSON object (empty for inactive answers).
    pub claims_json: Vec<u8>,
    /// Fresh until then.
    pub fresh_until: i64,
}

/// Where answers are kept: in memory for the proxy, in shared memory for the validator.
pub trait AnswerStore: Send + Sync {
    /// The entry for `key`, fresh or not.
    fn get(&self, key: &[u8; 32]) -> Option<StoredAnswer>;
    /// Keeps `answer` (an implementation may drop it when full or too large).
    fn put(&self, key: [u8; 32], answer: StoredAnswer, now: i64);
    /// Takes one request to `issuer`'s endpoints under `limits` ([`Budget::take`]): false when
    /// the issuer has had its share.
    fn take_request(&self, issuer: &str, now_ms: u64, limits: RequestLimits) -> bool;
    /// A request taken with [`Self::take_request`] ended.
    fn release_request(&self, issuer: &str);
    /// `issuer`'s introspection endpoint as discovery found it, if it is kept.
    fn endpoint(&self, issuer: &str) -> Option<String>;
    /// Keeps `issuer`'s discovered introspection endpoint.
    fn set_endpoint(&self, issuer: &str, url: &str);
}

/// The cache key of a token at an issuer: SHA-256 over both, never the token itself.
pub fn cache_key(issuer: &str, token: &str) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(&(issuer.len() as u64).to_be_bytes());
    ctx.update(issuer.as_bytes());
    ctx.update(token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// A bounded in-memory [`AnswerStore`] (the proxy's): when full, expired entries go first,
/// then the entry that expires soonest.
pub struct MemoryAnswers {
    entries: Mutex<HashMap<[u8; 32], StoredAnswer>>,
    capacity: usize,
    stale_keep_secs: i64,
    budgets: Mutex<HashMap<String, Budget>>,
    endpoints: Mutex<HashMap<String, String>>,
}

impl MemoryAnswers {
    /// Room for `capacity` answers, each kept `stale_keep_secs` past its freshness (for
    /// `stale_ok_secs`).
    pub fn new(capacity: usize, stale_keep_secs: u64) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            stale_keep_secs: i64::try_from(stale_keep_secs).unwrap_or(i64::MAX),
            budgets: Mutex::new(HashMap::new()),
            endpoints: Mutex::new(HashMap::new()),
        }
    }

    /// How many answers are kept.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl AnswerStore for MemoryAnswers {
    fn get(&self, key: &[u8; 32]) -> Option<StoredAnswer> {
        self.entries.lock().get(key).cloned()
    }

    fn put(&self, key: [u8; 32], answer: StoredAnswer, now: i64) {
        if answer.claims_json.len() > ANSWER_MAX_BYTES {
            return;
        }
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            let keep = self.stale_keep_secs;
            entries.retain(|_, a| a.fresh_until.saturating_add(keep) > now);
            if entries.len() >= self.capacity {
                if let Some(soonest) = entries.iter().min_by_key(|(_, a)| a.fresh_until).map(|(k, _)| *k) {
                    entries.remove(&soonest);
                }
            }
        }
        entries.insert(key, answer);
    }

    fn take_request(&self, issuer: &str, now_ms: u64, limits: RequestLimits) -> bool {
        self.budgets.lock().entry(issuer.to_owned()).or_default().take(now_ms, limits)
    }

    fn release_request(&self, issuer: &str) {
        if let Some(b) = self.budgets.lock().get_mut(issuer) {
            b.release();
        }
    }

    fn endpoint(&self, issuer: &str) -> Option<String> {
        self.endpoints.lock().get(issuer).cloned()
    }

    fn set_endpoint(&self, issuer: &str, url: &str) {
        self.endpoints.lock().insert(issuer.to_owned(), url.to_owned());
    }
}

/// What the endpoint said of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Active, with the answer's claims.
    Active(Map<String, Value>),
    /// Not active (revoked, expired, unknown, or not for this client).
    Inactive,
}

/// Asks one issuer's introspection endpoint, through its answer store.
pub struct Introspector {
    issuer: String,
    settings: IntrospectionSettings,
    http: Arc<dyn FormPoster>,
    store: Arc<dyn AnswerStore>,
    endpoint: OnceLock<String>,
}

impl Introspector {
    /// An introspector for `issuer`; nothing is fetched or read yet.
    pub fn new(
        issuer: &str,
        settings: IntrospectionSettings,
        http: Arc<dyn FormPoster>,
        store: Arc<dyn AnswerStore>,
    ) -> Self {
        Self { issuer: issuer.to_owned(), settings, http, store, endpoint: OnceLock::new() }
    }

    /// The settings.
    pub fn settings(&self) -> &IntrospectionSettings {
        &self.settings
    }

    /// The issuer's answer for `token` at `now`: a fresh stored one, else the endpoint's (then
    /// stored), else, for `jwt+introspect` with `stale_ok_secs`, an active one not older than
    /// that window.
    pub fn answer(&self, token: &str, now: i64) -> Result<Answer, ValidationError> {
        let key = cache_key(&self.issuer, token);
        let stored = self.store.get(&key);
        if let Some(s) = stored.as_ref().filter(|s| s.fresh_until > now) {
            return stored_answer(s);
        }
        match self.ask(token, now) {
            Ok(Asked::Answered(answer, fresh_until)) => {
                let claims_json = match &answer {
                    Answer::Active(claims) => serde_json::to_vec(claims).unwrap_or_default(),
                    Answer::Inactive => Vec::new(),
                };
                let active = matches!(answer, Answer::Active(_));
                self.store.put(key, StoredAnswer { active, claims_json, fresh_until }, now);
                Ok(answer)
            }
            // Only an outage (no answer, or a 5xx) lets a stale answer serve: a refusal of
            // gprxy's credentials or a malformed answer is not the endpoint being down.
            Ok(Asked::Outage(e)) => {
                let window = i64::try_from(self.settings.stale_ok_secs).unwrap_or(0);
                match stored {
                    Some(s) if window > 0 && s.active && s.fresh_until.saturating_add(window) > now => {
                        stored_answer(&s)
                    }
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The endpoint: the configured one, else discovery's `introspection_endpoint` (fetched
    /// once per introspector).
    fn endpoint(&self, now_ms: u64) -> Result<String, ValidationError> {
        if let Some(url) = self.settings.endpoint.as_ref().or(self.endpoint.get()) {
            return Ok(url.clone());
        }
        // Discovered once for the whole cluster (validator: shared memory) or process.
        if let Some(url) = self.store.endpoint(&self.issuer) {
            return Ok(self.endpoint.get_or_init(|| url).clone());
        }
        let unavailable = |reason: String| ValidationError::IntrospectionUnavailable(reason);
        let _request = self.request(now_ms)?;
        let (url, meta) = crate::jwks::issuer_metadata(&*self.http, &self.issuer)
            .map_err(|e| unavailable(format!("discovery: {e}")))?;
        let endpoint = meta
            .get("introspection_endpoint")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                unavailable(format!(
                    "{url} names no introspection_endpoint (RFC 8414: optional): set the entry's [introspection] endpoint"
                ))
            })?;
        self.store.set_endpoint(&self.issuer, endpoint);
        Ok(self.endpoint.get_or_init(|| endpoint.to_owned()).clone())
    }

    /// One request to the issuer, within its limits (given back when dropped).
    fn request(&self, now_ms: u64) -> Result<RequestTaken<'_>, ValidationError> {
        if self.store.take_request(&self.issuer, now_ms, self.settings.limits) {
            Ok(RequestTaken { store: &*self.store, issuer: &self.issuer })
        } else {
            Err(ValidationError::IntrospectionThrottled {
                per_sec: self.settings.limits.per_sec,
                concurrent: self.settings.limits.concurrent,
            })
        }
    }

    fn ask(&self, token: &str, now: i64) -> Result<Asked, ValidationError> {
        let outage = |e: ValidationError| Ok(Asked::Outage(e));
        let now_ms = crate::jwks::SystemClock.now_ms();
        // Throttled counts as an outage: a jwt+introspect issuer's stale_ok answers still serve.
        let endpoint = match self.endpoint(now_ms) {
            Ok(url) => url,
            Err(e) => return outage(e),
        };
        let _request = match self.request(now_ms) {
            Ok(taken) => taken,
            Err(e) => return outage(e),
        };
        let secret = self.settings.secret.read().map_err(ValidationError::IntrospectionUnavailable)?;
        let id = self.settings.client_id.as_str();
        let mut form = vec![("token", token), ("token_type_hint", "access_token")];
        let basic = match self.settings.client_auth {
            ClientAuth::ClientSecretBasic => Some((id, secret.as_str())),
            ClientAuth::ClientSecretPost => {
                form.extend([("client_id", id), ("client_secret", secret.as_str())]);
                None
            }
        };
        let (status, body) = match self.http.post_form(&endpoint, &form, basic) {
            Ok(answered) => answered,
            Err(e) => return outage(ValidationError::IntrospectionUnavailable(e.to_string())),
        };
        let unavailable = ValidationError::IntrospectionUnavailable(format!(
            "{} answered HTTP {status}",
            Quoted::new(&endpoint)
        ));
        match status {
            200 => {}
            401 | 403 => return Err(ValidationError::IntrospectionClientRefused { status }),
            500..=599 => return outage(unavailable),
            // RFC 7009 section 2.2.1's error, which providers also answer at introspection
            // (oidc-provider for a JWT): the endpoint works, it will not check this token.
            400 if oauth_error(&body).as_deref() == Some("unsupported_token_type") => {
                return Err(ValidationError::IntrospectionUnsupportedToken)
            }
            // The provider's error code (a short token, checked) goes to the log's detail.
            _ => match oauth_error(&body) {
                Some(code) => {
                    return Err(ValidationError::IntrospectionUnavailable(format!(
                        "{} answered HTTP {status} (error {code})",
                        Quoted::new(&endpoint)
                    )))
                }
                None => return Err(unavailable),
            },
        }
        let malformed = |r: String| ValidationError::IntrospectionMalformed(r);
        let claims = parse_object(&body).map_err(|e| malformed(e.to_string()))?;
        let ttl = |secs: u64| now.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX));
        match claims.get("active") {
            Some(Value::Bool(true)) => {
                not_an_access_token(&claims)?;
                let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(i64::MAX);
                Ok(Asked::Answered(Answer::Active(claims), ttl(self.settings.active_ttl_max_secs).min(exp)))
            }
            Some(Value::Bool(false)) => {
                Ok(Asked::Answered(Answer::Inactive, ttl(self.settings.inactive_ttl_secs)))
            }
            _ => Err(malformed("\"active\" is missing or not a boolean".into())),
        }
    }
}

/// The `error` member of an OAuth error answer (RFC 6749 section 5.2), if the body is one.
fn oauth_error(body: &[u8]) -> Option<String> {
    let answer = parse_object(body).ok()?;
    let code = answer.get("error")?.as_str()?;
    // An error code is a short token of printable ASCII (RFC 6749 section 5.2).
    (code.len() <= 64 && code.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'))
        .then(|| code.to_owned())
}

/// A request taken from an issuer's budget, given back when dropped.
struct RequestTaken<'a> {
    store: &'a dyn AnswerStore,
    issuer: &'a str,
}

impl Drop for RequestTaken<'_> {
    fn drop(&mut self) {
        self.store.release_request(self.issuer);
    }
}

/// What asking the endpoint came to: an answer (and until when it is fresh), or an outage.
enum Asked {
    Answered(Answer, i64),
    Outage(ValidationError),
}

/// An active answer for a refresh or ID token (RFC 7662 `token_type`, Keycloak's `typ`) is not
/// an access token's: refused whatever its audience.
fn not_an_access_token(claims: &Map<String, Value>) -> Result<(), ValidationError> {
    const OTHER: [&str; 8] = [
        "refresh",
        "refresh_token",
        "offline",
        "id",
        "id_token",
        "logout",
        "urn:ietf:params:oauth:token-type:refresh_token",
        "urn:ietf:params:oauth:token-type:id_token",
    ];
    for field in ["token_type", "typ"] {
        if let Some(t) = claims.get(field).and_then(Value::as_str) {
            if OTHER.iter().any(|o| t.eq_ignore_ascii_case(o)) {
                return Err(ValidationError::TypeNotAccepted(Quoted::new(t)));
            }
        }
    }
    Ok(())
}

fn stored_answer(s: &StoredAnswer) -> Result<Answer, ValidationError> {
    if !s.active {
        return Ok(Answer::Inactive);
    }
    parse_object(&s.claims_json)
        .map(Answer::Active)
        .map_err(|e| ValidationError::IntrospectionMalformed(format!("stored answer: {e}")))
}

/// Checks `token` the issuer's way: as a JWT, by introspection, or both.
pub fn validate_token(
    mode: TokenMode,
    validator: &Validator,
    keys: &dyn KeySource,
    introspector: Option<&Introspector>,
    token: &str,
    now: i64,
) -> Result<ValidatedToken, ValidationError> {
    let introspector =
        || introspector.ok_or(ValidationError::IntrospectionUnavailable("no introspection settings".into()));
    match mode {
        TokenMode::Jwt => validator.validate(token, keys, now),
        TokenMode::Introspect => {
            if token.len() > validator.policy().max_token_bytes {
                return Err(ValidationError::TooLarge {
                    size: token.len(),
                    max: validator.policy().max_token_bytes,
                });
            }
            match introspector()?.answer(token, now)? {
                Answer::Active(mut claims) => {
                    // RFC 7662 2.2: `iss` is OPTIONAL. The answer came from this issuer's own
                    // endpoint, asked with gprxy's credentials: an absent `iss` is this issuer
                    // (a present one is still compared). `aud`, `exp` and the identity are not
                    // taken from anywhere: without them the login is refused with its reason.
                    claims
                        .entry("iss")
                        .or_insert_with(|| Value::String(validator.policy().issuer().to_owned()));
                    validator.check_claims(claims, now, token, None, None)
                }
                Answer::Inactive => Err(ValidationError::TokenInactive),
            }
        }
        TokenMode::JwtIntrospect => {
            // Local checks first: a forged or expired token costs no request.
            let checked = validator.validate(token, keys, now)?;
            match introspector()?.answer(token, now)? {
                Answer::Active(_) => Ok(checked),
                Answer::Inactive => Err(ValidationError::TokenInactive),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::KeyError;
    use crate::fetch::HttpResponse;

    /// One request: URL, form, Basic credentials.
    type Seen = (String, Vec<(String, String)>, Option<(String, String)>);

    /// An endpoint that answers from a table and counts requests.
    struct Endpoint {
        answers: Mutex<HashMap<String, (u16, String)>>,
        requests: Mutex<Vec<Seen>>,
        down: std::sync::atomic::AtomicBool,
    }

    impl Endpoint {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                answers: Mutex::new(HashMap::new()),
                requests: Mutex::new(Vec::new()),
                down: false.into(),
            })
        }
        fn answer(&self, token: &str, status: u16, body: serde_json::Value) {
            self.answers.lock().insert(token.into(), (status, body.to_string()));
        }
        fn count(&self) -> usize {
            self.requests.lock().len()
        }
    }

    impl crate::Fetcher for Endpoint {
        fn get(&self, url: &str) -> Result<HttpResponse, KeyError> {
            let body = serde_json::json!({"issuer": ISS, "introspection_endpoint": format!("{ISS}/found")});
            assert_eq!(url, format!("{ISS}/.well-known/openid-configuration"));
            Ok(HttpResponse { body: body.to_string().into_bytes(), max_age: None })
        }
    }

    impl FormPoster for Endpoint {
        fn post_form(
            &self,
            url: &str,
            form: &[(&str, &str)],
            basic: Option<(&str, &str)>,
        ) -> Result<(u16, Vec<u8>), KeyError> {
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(KeyError::Timeout(Quoted::new(url)));
            }
            let form: Vec<(String, String)> = form.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
            let token = form.iter().find(|(k, _)| k == "token").map(|(_, v)| v.clone()).unwrap_or_default();
            self.requests.lock().push((url.into(), form, basic.map(|(a, b)| (a.into(), b.into()))));
            let (status, body) =
                self.answers.lock().get(&token).cloned().unwrap_or((200, r#"{"active":false}"#.into()));
            Ok((status, body.into_bytes()))
        }
    }

    const ISS: &str = "https://idp.example";
    const NOW: i64 = 1_000_000;

    fn settings(secret_var: &str) -> IntrospectionSettings {
        IntrospectionSettings {
            endpoint: Some(format!("{ISS}/introspect")),
            client_id: "gprxy".into(),
            secret: SecretSource::Env(secret_var.into()),
            client_auth: ClientAuth::ClientSecretBasic,
            active_ttl_max_secs: 60,
            inactive_ttl_secs: 10,
            stale_ok_secs: 0,
            limits: RequestLimits::default(),
        }
    }

    fn introspector(endpoint: &Arc<Endpoint>, s: IntrospectionSettings) -> Introspector {
        Introspector::new(ISS, s, endpoint.clone(), Arc::new(MemoryAnswers::new(16, s_keep())))
    }

    fn s_keep() -> u64 {
        300
    }

    fn active() -> serde_json::Value {
        serde_json::json!({"active": true, "iss": ISS, "aud": "db", "sub": "alice", "exp": NOW + 600, "scope": "db"})
    }

    /// #30 item 5: every member RFC 7662 section 2.2 calls OPTIONAL, left out of an active
    /// answer one at a time: `iss` is taken from the entry (the answer came from its endpoint);
    /// `aud`, `exp`, the identity and a required scope are refused with their reasons; a future
    /// `nbf` is refused; the others (`client_id`, `username`, `token_type`, `iat`, `nbf`, `jti`)
    /// change nothing when absent. `sub` absent with `identity_fallback_claim = client_id` takes
    /// the client id (client-credentials tokens).
    #[test]
    fn each_optional_member_of_an_answer_is_handled_as_rfc_7662_says() {
        std::env::set_var("GPRXY_TEST_SECRET_20", "s");
        let full = || {
            let mut a = active();
            let extra = serde_json::json!({"client_id": "app", "username": "alice@example", "token_type": "Bearer",
                "iat": NOW - 10, "nbf": NOW - 10, "jti": "j1"});
            a.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            a
        };
        let policy = |fallback: Option<&str>| {
            crate::Policy::builder(ISS)
                .audiences(["db"])
                .required_scopes(["db".to_owned()])
                .identity_fallback_claim(fallback.map(str::to_owned))
                .build()
                .unwrap()
        };
        let run = |answer: serde_json::Value, fallback: Option<&str>| {
            let e = Endpoint::new();
            e.answer("opaque", 200, answer);
            let i = introspector(&e, settings("GPRXY_TEST_SECRET_20"));
            let v = crate::Validator::new(policy(fallback));
            let keys = crate::KeySet::default();
            validate_token(TokenMode::Introspect, &v, &keys, Some(&i), "opaque", NOW)
        };
        let without = |member: &str| {
            let mut a = full();
            a.as_object_mut().unwrap().remove(member);
            a
        };
        let ok = run(full(), None).unwrap();
        assert_eq!((ok.identity.as_str(), ok.issuer.as_str()), ("alice", ISS));
        let t = run(without("iss"), None).unwrap();
        assert_eq!(t.issuer, ISS, "iss from the entry");
        let mut other = full();
        other["iss"] = serde_json::json!("https://other.example");
        assert_eq!(run(other, None).unwrap_err().code(), "iss_mismatch");
        assert_eq!(run(without("aud"), None).unwrap_err().code(), "aud_missing");
        assert_eq!(run(without("exp"), None).unwrap_err().code(), "exp_missing");
        assert_eq!(run(without("sub"), None).unwrap_err().code(), "identity_missing");
        assert_eq!(run(without("sub"), Some("client_id")).unwrap().identity, "app");
        assert_eq!(run(without("scope"), None).unwrap_err().code(), "scope_missing");
        for member in ["client_id", "username", "token_type", "iat", "nbf", "jti"] {
            assert_eq!(run(without(member), None).unwrap().identity, "alice", "{member} absent");
        }
        let mut future = full();
        future["nbf"] = serde_json::json!(NOW + 3600);
        assert_eq!(run(future, None).unwrap_err().code(), "not_yet_valid");
        assert_eq!(run(serde_json::json!({"iss": ISS}), None).unwrap_err().code(), "introspection_malformed");
    }

    #[test]
    fn an_active_answer_is_asked_once_and_kept_until_the_cache_ttl() {
        std::env::set_var("GPRXY_TEST_SECRET_1", "s3cret");
        let e = Endpoint::new();
        e.answer("opaque-1", 200, active());
        let i = introspector(&e, settings("GPRXY_TEST_SECRET_1"));
        for _ in 0..100 {
            assert!(matches!(i.answer("opaque-1", NOW).unwrap(), Answer::Active(c) if c["sub"] == "alice"));
        }
        assert_eq!(e.count(), 1);
        let (url, form, basic) = e.requests.lock()[0].clone();
        assert_eq!(url, format!("{ISS}/introspect"));
        assert!(form.contains(&("token".into(), "opaque-1".into())));
        assert_eq!(basic, Some(("gprxy".into(), "s3cret".into())));
        // 60 s later the answer is asked again, and the revocation shows.
        e.answer("opaque-1", 200, serde_json::json!({"active": false}));
        assert_eq!(i.answer("opaque-1", NOW + 60).unwrap(), Answer::Inactive);
        assert_eq!(e.count(), 2);
        // Inactive answers are kept for inactive_ttl_secs.
        assert_eq!(i.answer("opaque-1", NOW + 69).unwrap(), Answer::Inactive);
        assert_eq!(e.count(), 2);
    }

    /// #27 item 4: random tokens cost the issuer at most its budget (a burst of `per_sec`, then
    /// `per_sec` a second): beyond it they are refused as introspection_throttled without a
    /// request, and a token whose answer is kept still gets it; discovery is asked once.
    #[test]
    fn a_flood_of_random_tokens_costs_at_most_the_budget() {
        std::env::set_var("GPRXY_TEST_SECRET_9", "s");
        let e = Endpoint::new();
        e.answer("good", 200, active());
        let mut s = settings("GPRXY_TEST_SECRET_9");
        s.endpoint = None;
        s.limits = RequestLimits { per_sec: 5, concurrent: 2 };
        let i = introspector(&e, s);
        assert!(matches!(i.answer("good", NOW).unwrap(), Answer::Active(_)));
        let mut throttled = 0;
        for n in 0..200 {
            match i.answer(&format!("random-{n}"), NOW) {
                Err(ValidationError::IntrospectionThrottled { per_sec: 5, concurrent: 2 }) => throttled += 1,
                Ok(Answer::Inactive) => {}
                other => panic!("{other:?}"),
            }
            assert!(matches!(i.answer("good", NOW).unwrap(), Answer::Active(_)), "the kept answer");
        }
        // One discovery and the good token's request came from the burst of 5; the flood got the rest
        // of the burst plus what refilled while it ran (well under a second here).
        assert!(e.count() <= 5 + 5, "{} introspection requests", e.count());
        assert!(throttled >= 190, "{throttled} throttled");
        assert_eq!(
            ValidationError::IntrospectionThrottled { per_sec: 5, concurrent: 2 }.code(),
            "introspection_throttled"
        );
    }

    /// #30 item 2: an endpoint that will not introspect this kind of token (HTTP 400,
    /// `unsupported_token_type`) is its own reason, not the endpoint being down.
    #[test]
    fn an_unsupported_token_type_is_its_own_reason() {
        std::env::set_var("GPRXY_TEST_SECRET_10", "s");
        let e = Endpoint::new();
        e.answer("a.jwt.token", 400, serde_json::json!({"error": "unsupported_token_type"}));
        e.answer("other", 400, serde_json::json!({"error": "invalid_request"}));
        let i = introspector(&e, settings("GPRXY_TEST_SECRET_10"));
        let err = i.answer("a.jwt.token", NOW).unwrap_err();
        assert_eq!(err, ValidationError::IntrospectionUnsupportedToken);
        assert_eq!(err.code(), "introspection_unsupported_token");
        let other = i.answer("other", NOW).unwrap_err();
        assert_eq!(other.code(), "introspection_unavailable");
        assert!(other.to_string().ends_with("answered HTTP 400 (error invalid_request)"), "{other}");
    }

    #[test]
    fn a_budget_refills_and_caps_requests_in_flight() {
        let limits = RequestLimits { per_sec: 2, concurrent: 1 };
        let mut b = Budget::default();
        assert!(b.take(1_000, limits));
        assert!(!b.take(1_000, limits), "one in flight at most");
        b.release();
        assert!(b.take(1_000, limits));
        b.release();
        assert!(!b.take(1_000, limits), "a burst of 2, used up");
        assert!(b.take(1_500, limits), "one more after half a second at 2/s");
        b.release();
        assert!(!b.take(1_500, limits));
    }

    #[test]
    fn an_answer_is_never_kept_past_the_tokens_exp() {
        std::env::set_var("GPRXY_TEST_SECRET_2", "s");
        let e = Endpoint::new();
        let mut a = active();
        a["exp"] = serde_json::json!(NOW + 5);
        e.answer("t", 200, a);
        let i = introspector(&e, settings("GPRXY_TEST_SECRET_2"));
        i.answer("t", NOW).unwrap();
        i.answer("t", NOW + 5).unwrap();
        assert_eq!(e.count(), 2);
    }

    #[test]
    fn refusals_of_the_endpoint_are_refusals_of_the_login() {
        std::env::set_var("GPRXY_TEST_SECRET_3", "wrong");
        let e = Endpoint::new();
        e.answer("t", 401, serde_json::json!({"error": "invalid_client"}));
        e.answer("u", 500, serde_json::json!({}));
        e.answer("v", 200, serde_json::json!({"active": "yes"}));
        let i = introspector(&e, settings("GPRXY_TEST_SECRET_3"));
        assert_eq!(
            i.answer("t", NOW).unwrap_err(),
            ValidationError::IntrospectionClientRefused { status: 401 }
        );
        assert_eq!(
            i.answer("u", NOW).unwrap_err().to_string(),
            "introspection failed: \"https://idp.example/introspect\" answered HTTP 500"
        );
        assert_eq!(i.answer("v", NOW).unwrap_err().code(), "introspection_malformed");
        e.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let down = i.answer("w", NOW).unwrap_err();
        assert_eq!(down.code(), "introspection_unavailable");
        assert!(!down.to_string().contains("wrong"), "{down}");
        let missing = introspector(&e, settings("GPRXY_TEST_SECRET_UNSET")).answer("x", NOW).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "introspection failed: the client secret variable GPRXY_TEST_SECRET_UNSET is not set (or not UTF-8)"
        );
    }

    #[test]
    fn stale_answers_serve_only_inside_the_window_while_the_endpoint_is_down() {
        std::env::set_var("GPRXY_TEST_SECRET_4", "s");
        let e = Endpoint::new();
        e.answer("t", 200, active());
        let i =
            introspector(&e, IntrospectionSettings { stale_ok_secs: 30, ..settings("GPRXY_TEST_SECRET_4") });
        i.answer("t", NOW).unwrap();
        e.down.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(i.answer("t", NOW + 89).unwrap(), Answer::Active(_)));
        assert_eq!(i.answer("t", NOW + 90).unwrap_err().code(), "introspection_unavailable");
        // Without a window, refused as soon as the answer is stale.
        let strict = introspector(&e, settings("GPRXY_TEST_SECRET_4"));
        assert_eq!(strict.answer("t", NOW).unwrap_err().code(), "introspection_unavailable");
    }

    #[test]
    fn a_stale_answer_never_covers_a_refusal_of_gprxy_or_a_malformed_answer() {
        std::env::set_var("GPRXY_TEST_SECRET_6", "s");
        let e = Endpoint::new();
        e.answer("t", 200, active());
        let i =
            introspector(&e, IntrospectionSettings { stale_ok_secs: 30, ..settings("GPRXY_TEST_SECRET_6") });
        i.answer("t", NOW).unwrap();
        e.answer("t", 401, serde_json::json!({"error": "invalid_client"}));
        assert_eq!(i.answer("t", NOW + 61).unwrap_err().code(), "introspection_client_refused");
        e.answer("t", 200, serde_json::json!({"active": 1}));
        assert_eq!(i.answer("t", NOW + 61).unwrap_err().code(), "introspection_malformed");
        e.answer("t", 503, serde_json::json!({}));
        assert!(matches!(i.answer("t", NOW + 61).unwrap(), Answer::Active(_)), "a 5xx is an outage");
    }

    #[test]
    fn an_active_refresh_or_id_token_is_not_an_access_token() {
        std::env::set_var("GPRXY_TEST_SECRET_7", "s");
        let e = Endpoint::new();
        let mut refresh = active();
        refresh["token_type"] = serde_json::json!("refresh_token");
        e.answer("r", 200, refresh);
        let mut id = active();
        id["typ"] = serde_json::json!("ID");
        e.answer("i", 200, id);
        let mut bearer = active();
        bearer["typ"] = serde_json::json!("Bearer");
        e.answer("b", 200, bearer);
        let i = introspector(&e, settings("GPRXY_TEST_SECRET_7"));
        assert_eq!(
            i.answer("r", NOW).unwrap_err().to_string(),
            "token type \"refresh_token\" is not accepted"
        );
        assert_eq!(i.answer("i", NOW).unwrap_err().code(), "typ_not_accepted");
        assert!(matches!(i.answer("b", NOW).unwrap(), Answer::Active(_)));
    }

    #[test]
    fn discovery_names_the_endpoint_and_post_auth_sends_the_secret_in_the_form() {
        std::env::set_var("GPRXY_TEST_SECRET_5", "p0st");
        let e = Endpoint::new();
        let s = IntrospectionSettings {
            endpoint: None,
            client_auth: ClientAuth::ClientSecretPost,
            ..settings("GPRXY_TEST_SECRET_5")
        };
        let i = introspector(&e, s);
        assert_eq!(i.answer("t", NOW).unwrap(), Answer::Inactive);
        let (url, form, basic) = e.requests.lock()[0].clone();
        assert_eq!(url, format!("{ISS}/found"));
        assert!(form.contains(&("client_secret".into(), "p0st".into())));
        assert_eq!(basic, None);
    }

    #[test]
    fn the_cache_key_is_a_hash_of_issuer_and_token() {
        let k = cache_key(ISS, "opaque-1");
        assert_ne!(k, cache_key("https://other.example", "opaque-1"));
        assert_ne!(k, cache_key(ISS, "opaque-2"));
        assert!(!k.windows(8).any(|w| w == b"opaque-1"));
    }

    #[test]
    fn the_memory_store_is_bounded() {
        let store = MemoryAnswers::new(2, 0);
        let a = |fresh| StoredAnswer { active: true, claims_json: b"{}".to_vec(), fresh_until: fresh };
        store.put([1; 32], a(NOW + 10), NOW);
        store.put([2; 32], a(NOW + 20), NOW);
        store.put([3; 32], a(NOW + 30), NOW);
        assert_eq!(store.len(), 2);
        assert!(store.get(&[1; 32]).is_none(), "the soonest to expire went first");
        let big = StoredAnswer {
            active: true,
            claims_json: vec![b' '; ANSWER_MAX_BYTES + 1],
            fresh_until: NOW + 99,
        };
        store.put([4; 32], big, NOW);
        assert!(store.get(&[4; 32]).is_none(), "an answer over the size limit is not kept");
    }

    #[test]
    fn settings_are_checked() {
        let entry = |f: fn(&mut IntrospectionEntry)| {
            let mut e = IntrospectionEntry {
                client_id: "gprxy".into(),
                client_secret_env: Some("X".into()),
                ..IntrospectionEntry::default()
            };
            f(&mut e);
            e
        };
        let msg = |e: IntrospectionEntry, m| e.check(m, false).unwrap_err().reason;
        assert!(entry(|_| {}).check(TokenMode::Introspect, false).is_ok());
        assert!(msg(entry(|_| {}), TokenMode::Jwt).contains("needs tokens ="));
        assert!(msg(entry(|e| e.client_secret_file = Some("/s".into())), TokenMode::Introspect)
            .contains("one of them; never the secret itself"));
        assert!(
            msg(entry(|e| e.client_secret_env = None), TokenMode::Introspect).contains("client_secret_env")
        );
        let pasted =
            msg(entry(|e| e.client_secret_env = Some("hunter2:pasted".into())), TokenMode::Introspect);
        assert!(
            pasted.contains("must name an environment variable") && !pasted.contains("hunter2"),
            "{pasted}"
        );
        let relative = msg(
            entry(|e| {
                e.client_secret_env = None;
                e.client_secret_file = Some("hunter2".into());
            }),
            TokenMode::Introspect,
        );
        assert!(!relative.contains("hunter2"), "{relative}");
        assert!(msg(entry(|e| e.stale_ok_secs = Some(5)), TokenMode::Introspect)
            .contains("only with tokens = \"jwt+introspect\""));
        assert!(entry(|e| e.stale_ok_secs = Some(5)).check(TokenMode::JwtIntrospect, false).is_ok());
        assert!(msg(entry(|e| e.endpoint = Some("http://idp.example/i".into())), TokenMode::Introspect)
            .contains("is not an https URL"));
    }
}
