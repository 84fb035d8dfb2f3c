//! The issuer's signing keys, fetched and cached.
//!
//! - Keys come from `jwks_uri`, found through OpenID Connect discovery (or RFC 8414) from the
//!   issuer, or configured explicitly. The discovery document must name the same issuer.
//! - Keys are fresh for a TTL: the server's `Cache-Control: max-age` clamped to [min, max], or the
//!   default. [`JwksCache::refresh_if_due`], called by a background worker, refreshes at 80 % of it.
//! - Only one fetch runs at a time (single flight): callers that wait for it use its result.
//! - An unknown `kid` causes a refetch at most once per cooldown. Within the cooldown every `kid`
//!   missing from the keys is refused from memory (the cooldown is the negative cache), so a flood
//!   of made-up `kid`s costs at most one fetch per cooldown, while a newly rotated key is found at
//!   most one cooldown after it is first seen.
//! - When the issuer is down, the last good keys serve until they are `max_staleness` past
//!   expiry, with exponential backoff between attempts; then validation fails closed.
//! - The state can be exported to bytes and imported elsewhere (the extension keeps one copy in
//!   shared memory for all backends).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::claims::parse_object;
use crate::error::{ConfigError, KeyError, Quoted, ValidationError};
use crate::fetch::{check_url, Fetcher};
use crate::jose::KeySource;
use crate::jwk::{KeySet, VerifyKey};
use crate::policy::Algorithm;

/// Milliseconds since the Unix epoch. Replaceable in tests.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now_ms(&self) -> u64;
}

/// Seconds since the Unix epoch, by the system clock.
pub fn unix_time() -> i64 {
    (SystemClock.now_ms() / 1000) as i64
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// Where the key set is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// Discovery from the issuer: `<issuer>/.well-known/openid-configuration`, then RFC 8414's
    /// `/.well-known/oauth-authorization-server<path>`.
    Discovery {
        /// The issuer, exactly as in tokens.
        issuer: String,
    },
    /// A configured `jwks_uri`.
    Explicit {
        /// The key set URL.
        jwks_uri: String,
    },
}

/// Cache timing.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// TTL when the server sends no `max-age`.
    pub default_ttl: Duration,
    /// Lower bound on the TTL.
    pub min_ttl: Duration,
    /// Upper bound on the TTL.
    pub max_ttl: Duration,
    /// Least time between two fetches caused by unknown `kid`s.
    pub unknown_kid_cooldown: Duration,
    /// How long past expiry the last good keys may still be used while the issuer is unreachable.
    pub max_staleness: Duration,
    /// First wait after a failed fetch; doubles per failure.
    pub backoff_initial: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(3600),
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(86400),
            unknown_kid_cooldown: Duration::from_secs(30),
            max_staleness: Duration::from_secs(3600),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

impl CacheSettings {
    /// Checks the bounds against each other.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.min_ttl.is_zero() {
            return Err(ConfigError::new("jwks_cache_ttl_min", "must be at least 1 second"));
        }
        if self.min_ttl > self.max_ttl {
            return Err(ConfigError::new("jwks_cache_ttl_min", "must not exceed jwks_cache_ttl_max"));
        }
        if self.default_ttl < self.min_ttl || self.default_ttl > self.max_ttl {
            return Err(ConfigError::new(
                "jwks_cache_ttl",
                "must lie between jwks_cache_ttl_min and jwks_cache_ttl_max",
            ));
        }
        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            return Err(ConfigError::new("jwks_backoff", "initial must be > 0 and <= max"));
        }
        Ok(())
    }
}

/// The exportable part of the cache: the last good key set and when it was fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The key set URL it came from.
    pub jwks_uri: String,
    /// The key set document as served.
    pub jwks: String,
    /// When it was fetched (ms since the epoch).
    pub fetched_at_ms: u64,
    /// When it stops being fresh (ms since the epoch).
    pub expires_at_ms: u64,
}

#[derive(Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    snapshot: Option<Snapshot>,
    jwks_uri: Option<String>,
    /// Any fetch attempt, successful or not.
    last_attempt_ms: u64,
    failures: u32,
    retry_at_ms: u64,
    last_error: Option<KeyError>,
    /// Bumped whenever the keys change.
    generation: u64,
}

/// A cached, self-refreshing key set for one issuer. Cheap to share behind an `Arc`.
pub struct JwksCache {
    source: JwksSource,
    fetcher: Arc<dyn Fetcher>,
    clock: Arc<dyn Clock>,
    settings: CacheSettings,
    allow_http_loopback: bool,
    state: RwLock<State>,
    fetch_lock: Mutex<()>,
    fetches: AtomicU64,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl JwksCache {
    /// A cache with no keys yet. `allow_http_loopback` must match the fetcher's setting: it
    /// governs the `jwks_uri` a discovery document may name.
    pub fn new(
        source: JwksSource,
        fetcher: Arc<dyn Fetcher>,
        clock: Arc<dyn Clock>,
        settings: CacheSettings,
        allow_http_loopback: bool,
    ) -> Result<Self, ConfigError> {
        settings.check()?;
        let url = match &source {
            JwksSource::Discovery { issuer } => issuer,
            JwksSource::Explicit { jwks_uri } => jwks_uri,
        };
        check_url(url, allow_http_loopback).map_err(|e| ConfigError::new("issuer", e.to_string()))?;
        Ok(Self {
            source,
            fetcher,
            clock,
            settings,
            allow_http_loopback,
            state: RwLock::new(State::default()),
            fetch_lock: Mutex::new(()),
            fetches: AtomicU64::new(0),
        })
    }

    /// How many key-set fetches were attempted (for tests and metrics).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Bumped whenever the keys change.
    pub fn generation(&self) -> u64 {
        self.state.read().generation
    }

    /// The current snapshot, to publish elsewhere.
    pub fn export(&self) -> Option<Snapshot> {
        self.state.read().snapshot.clone()
    }

    /// Takes keys fetched elsewhere, if they are newer than ours. Returns whether they were taken.
    pub fn import(&self, snap: &Snapshot) -> Result<bool, KeyError> {
        let keys = parse_keys(&snap.jwks_uri, snap.jwks.as_bytes())?;
        let mut st = self.state.write();
        if st.snapshot.as_ref().is_some_and(|s| s.fetched_at_ms >= snap.fetched_at_ms) {
            return Ok(false);
        }
        install(&mut st, keys, snap.clone());
        Ok(true)
    }

    /// The cached keys while they are fresh, without fetching or waiting (None: expired or
    /// never fetched; use [`JwksCache::keys`], which may block on the network).
    pub fn fresh_keys(&self) -> Option<Arc<KeySet>> {
        let now = self.clock.now_ms();
        let st = self.state.read();
        match (&st.keys, &st.snapshot) {
            (Some(keys), Some(s)) if now < s.expires_at_ms => Some(keys.clone()),
            _ => None,
        }
    }

    /// Fresh keys, or the last good ones during an outage, fetching when needed.
    pub fn keys(&self) -> Result<Arc<KeySet>, KeyError> {
        self.keys_and_generation().map(|(k, _)| k)
    }

    fn keys_and_generation(&self) -> Result<(Arc<KeySet>, u64), KeyError> {
        let now = self.clock.now_ms();
        let seen = {
            let st = self.state.read();
            if let (Some(keys), Some(s)) = (&st.keys, &st.snapshot) {
                if now < s.expires_at_ms {
                    return Ok((keys.clone(), st.generation));
                }
            }
            st.generation
        };
        let _flight = self.fetch_lock.lock();
        let now = self.clock.now_ms();
        let run = {
            let st = self.state.read();
            if st.generation != seen {
                // Someone else fetched while we waited.
                None
            } else {
                Some(now >= st.retry_at_ms)
            }
        };
        if run == Some(true) {
            let _ = self.fetch_locked(now);
        }
        self.usable_keys(self.clock.now_ms())
    }

    /// Keys that are fresh or within the staleness allowance; else the reason there are none.
    fn usable_keys(&self, now: u64) -> Result<(Arc<KeySet>, u64), KeyError> {
        let st = self.state.read();
        match (&st.keys, &st.snapshot) {
            (Some(keys), Some(s))
                if now < s.expires_at_ms.saturating_add(ms(self.settings.max_staleness)) =>
            {
                Ok((keys.clone(), st.generation))
            }
            (Some(_), Some(_)) => Err(KeyError::Unavailable(format!(
                "last good keys are older than the maximum staleness; last error: {}",
                st.last_error.as_ref().map_or("none".to_owned(), ToString::to_string)
            ))),
            _ => Err(st.last_error.clone().unwrap_or_else(|| KeyError::Unavailable("never fetched".into()))),
        }
    }

    /// For an unknown `kid`: refetch once, unless keys were fetched less than a cooldown ago
    /// (then the `kid` was just checked against fresh keys: the cooldown is the negative cache).
    /// Returns the new keys if a fetch (ours or a concurrent one) changed them.
    fn refetch_for_unknown(&self, seen_generation: u64) -> Option<Arc<KeySet>> {
        let may_fetch = |st: &State, now: u64| {
            now >= st.last_attempt_ms.saturating_add(ms(self.settings.unknown_kid_cooldown))
                && now >= st.retry_at_ms
        };
        {
            let st = self.state.read();
            if st.generation != seen_generation {
                return st.keys.clone();
            }
            if !may_fetch(&st, self.clock.now_ms()) {
                return None;
            }
        }
        let _flight = self.fetch_lock.lock();
        let now = self.clock.now_ms();
        {
            let st = self.state.read();
            if st.generation != seen_generation {
                return st.keys.clone();
            }
            if !may_fetch(&st, now) {
                return None;
            }
        }
        self.fetch_locked(now).ok()?;
        self.state.read().keys.clone()
    }

    /// For a background worker: refresh when 80 % of the TTL has passed (or there are no keys),
    /// unless a fetch is running or the backoff says wait. Returns whether a fetch ran and succeeded.
    pub fn refresh_if_due(&self) -> bool {
        let now = self.clock.now_ms();
        {
            let st = self.state.read();
            if now < st.retry_at_ms {
                return false;
            }
            if let Some(s) = &st.snapshot {
                let ttl = s.expires_at_ms.saturating_sub(s.fetched_at_ms);
                if now < s.fetched_at_ms + ttl * 4 / 5 {
                    return false;
                }
            }
        }
        let Some(_flight) = self.fetch_lock.try_lock() else { return false };
        self.fetch_locked(self.clock.now_ms()).is_ok()
    }

    /// Fetches and installs the key set. Caller holds `fetch_lock`.
    fn fetch_locked(&self, now: u64) -> Result<(), KeyError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = self.fetch_snapshot(now);
        let mut st = self.state.write();
        st.last_attempt_ms = now;
        match result {
            Ok((keys, snap)) => {
                install(&mut st, keys, snap);
                Ok(())
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                let backoff = self
                    .settings
                    .backoff_initial
                    .saturating_mul(1u32 << (st.failures - 1).min(16))
                    .min(self.settings.backoff_max);
                st.retry_at_ms = now + ms(backoff);
                if matches!(e, KeyError::Status { status: 404, .. }) {
                    st.jwks_uri = None; // rediscover next time
                }
                st.last_error = Some(e.clone());
                tracing::warn!(error = %e, code = e.code(), failures = st.failures, "JWKS fetch failed");
                Err(e)
            }
        }
    }

    fn fetch_snapshot(&self, now: u64) -> Result<(KeySet, Snapshot), KeyError> {
        let jwks_uri = match (&self.source, self.state.read().jwks_uri.clone()) {
            (JwksSource::Explicit { jwks_uri }, _) => jwks_uri.clone(),
            (JwksSource::Discovery { .. }, Some(uri)) => uri,
            (JwksSource::Discovery { issuer }, None) => self.discover(issuer)?,
        };
        let resp = self.fetcher.get(&jwks_uri)?;
        let keys = parse_keys(&jwks_uri, &resp.body)?;
        let ttl = resp
            .max_age
            .map_or(self.settings.default_ttl, Duration::from_secs)
            .clamp(self.settings.min_ttl, self.settings.max_ttl);
        let jwks = String::from_utf8(resp.body)
            .map_err(|_| KeyError::Invalid { url: Quoted::new(&jwks_uri), reason: "not UTF-8".into() })?;
        let snap = Snapshot { jwks_uri, jwks, fetched_at_ms: now, expires_at_ms: now + ms(ttl) };
        Ok((keys, snap))
    }

    /// Finds `jwks_uri` from the issuer's metadata.
    fn discover(&self, issuer: &str) -> Result<String, KeyError> {
        let (url, meta) = issuer_metadata(&*self.fetcher, issuer)?;
        let jwks_uri = meta.get("jwks_uri").and_then(Value::as_str).ok_or_else(|| KeyError::Invalid {
            url: Quoted::new(&url),
            reason: "metadata has no jwks_uri".into(),
        })?;
        check_url(jwks_uri, self.allow_http_loopback)?;
        Ok(jwks_uri.to_owned())
    }

    /// A key for `kid`/`alg`, refetching once (within the cooldown rules) for an unknown `kid`.
    pub fn find_key(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<VerifyKey>, ValidationError> {
        let (keys, generation) = self.keys_and_generation()?;
        match keys.find(kid, alg) {
            Err(e @ (ValidationError::KidUnknown(_) | ValidationError::NoKeyForAlg(_))) => {
                match self.refetch_for_unknown(generation) {
                    Some(fresh) => fresh.find(kid, alg),
                    None => Err(e),
                }
            }
            other => other,
        }
    }
}

impl KeySource for JwksCache {
    fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<VerifyKey>, ValidationError> {
        self.find_key(kid, alg)
    }
}

fn install(st: &mut State, keys: KeySet, snap: Snapshot) {
    st.keys = Some(Arc::new(keys));
    st.jwks_uri = Some(snap.jwks_uri.clone());
    st.snapshot = Some(snap);
    st.failures = 0;
    st.retry_at_ms = 0;
    st.last_error = None;
    st.generation += 1;
}

fn parse_keys(url: &str, body: &[u8]) -> Result<KeySet, KeyError> {
    let keys =
        KeySet::from_json(body).map_err(|reason| KeyError::Invalid { url: Quoted::new(url), reason })?;
    if keys.is_empty() {
        return Err(KeyError::Invalid { url: Quoted::new(url), reason: "key set is empty".into() });
    }
    Ok(keys)
}

/// The issuer's metadata (`<issuer>/.well-known/openid-configuration`, else RFC 8414's
/// `/.well-known/oauth-authorization-server<path>`), with where it came from. The document
/// must name exactly `issuer`.
pub fn issuer_metadata(
    fetcher: &dyn Fetcher,
    issuer: &str,
) -> Result<(String, serde_json::Map<String, Value>), KeyError> {
    let base = issuer.trim_end_matches('/');
    let oidc = format!("{base}/.well-known/openid-configuration");
    let (url, body) = match fetcher.get(&oidc) {
        Ok(r) => (oidc, r.body),
        Err(KeyError::Status { status: 404, .. }) => {
            let rfc8414 = rfc8414_url(issuer).ok_or_else(|| KeyError::BadUrl(Quoted::new(issuer)))?;
            let r = fetcher.get(&rfc8414)?;
            (rfc8414, r.body)
        }
        Err(e) => return Err(e),
    };
    let invalid = |reason: &str| KeyError::Invalid { url: Quoted::new(&url), reason: reason.into() };
    let meta = parse_object(&body).map_err(|e| invalid(&format!("metadata: {e}")))?;
    match meta.get("issuer").and_then(Value::as_str) {
        Some(i) if i == issuer => {}
        Some(i) => {
            return Err(KeyError::IssuerMismatch { got: Quoted::new(i), expected: Quoted::new(issuer) })
        }
        None => return Err(invalid("metadata has no issuer")),
    }
    Ok((url, meta))
}

/// RFC 8414 section 3: `https://host/path` → `https://host/.well-known/oauth-authorization-server/path`.
fn rfc8414_url(issuer: &str) -> Option<String> {
    let scheme_end = issuer.find("://")? + 3;
    let path_start = issuer[scheme_end..].find('/').map_or(issuer.len(), |i| scheme_end + i);
    let (origin, path) = issuer.split_at(path_start);
    let path = path.trim_end_matches('/');
    Some(format!("{origin}/.well-known/oauth-authorization-server{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8414_inserts_well_known_before_path() {
        assert_eq!(
            rfc8414_url("https://idp.example/tenant/v2").as_deref(),
            Some("https://idp.example/.well-known/oauth-authorization-server/tenant/v2")
        );
        assert_eq!(
            rfc8414_url("https://idp.example").as_deref(),
            Some("https://idp.example/.well-known/oauth-authorization-server")
        );
    }

    #[test]
    fn settings_checked() {
        let s = CacheSettings {
            min_ttl: Duration::from_secs(100),
            max_ttl: Duration::from_secs(10),
            ..Default::default()
        };
        assert_eq!(s.check().unwrap_err().setting, "jwks_cache_ttl_min");
        let s = CacheSettings { default_ttl: Duration::from_secs(10), ..Default::default() };
        assert_eq!(s.check().unwrap_err().setting, "jwks_cache_ttl");
    }
}
