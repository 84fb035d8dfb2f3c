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
//!   shared memory for all backends). A key set names the source it came from ([`JwksSource::id`]);
//!   one from another source (the `jwks_uri` or issuer changed) is never imported.
//! - The fetch bookkeeping (last attempt, failures, backoff, a fetch in progress) lives in a
//!   [`KeyShare`]: per cache by default ([`MemoryShare`]), or shared by all processes that share
//!   the keys, so the unknown-`kid` cooldown, the backoff and the single flight hold across them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::algorithm::Algorithm;
use crate::claims::parse_object;
use crate::error::{ConfigError, KeyError, Quoted, Setting, ValidationError};
use crate::fetch::{check_url, Fetcher};
use crate::jose::KeySource;
use crate::jwk::{KeySet, VerifyKey};

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
    /// A key set file on this host (an air-gapped cluster: no network at all). Read when the
    /// cache is made and again when its keys expire.
    File {
        /// The JWKS document's path.
        path: std::path::PathBuf,
    },
}

/// A key set file's path must be absolute (a relative one would depend on the process's
/// working directory).
pub(crate) fn check_key_file_path(path: &std::path::Path) -> Result<(), ConfigError> {
    if path.is_absolute() {
        return Ok(());
    }
    Err(ConfigError::new(Setting::JwksFile, format!("{} is not an absolute path", path.display())))
}

impl JwksSource {
    /// An issuer's keys from its configured `jwks_uri`, else by discovery from the issuer.
    pub fn for_issuer(issuer: &str, jwks_uri: Option<String>) -> Self {
        match jwks_uri {
            Some(jwks_uri) => Self::Explicit { jwks_uri },
            None => Self::Discovery { issuer: issuer.to_owned() },
        }
    }

    /// What a key set from this source is tagged with: `discovery <issuer>` or `jwks_uri <url>`.
    pub fn id(&self) -> String {
        match self {
            Self::Discovery { issuer } => format!("discovery {issuer}"),
            Self::Explicit { jwks_uri } => format!("jwks_uri {jwks_uri}"),
            Self::File { path } => format!("file {}", path.display()),
        }
    }
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
            return Err(ConfigError::new(Setting::CacheTtlMin, "must be at least 1 second"));
        }
        if self.min_ttl > self.max_ttl {
            return Err(ConfigError::new(Setting::CacheTtlMin, "must not exceed the upper bound"));
        }
        if self.default_ttl < self.min_ttl || self.default_ttl > self.max_ttl {
            return Err(ConfigError::new(Setting::CacheTtl, "must lie between the lower and upper bounds"));
        }
        if self.unknown_kid_cooldown.is_zero() {
            return Err(ConfigError::new(Setting::UnknownKidCooldown, "must be at least 1 second"));
        }
        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            return Err(ConfigError::new(Setting::Backoff, "initial must be > 0 and <= max"));
        }
        Ok(())
    }
}

/// The exportable part of the cache: the last good key set and when it was fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The configured source it was fetched for ([`JwksSource::id`]).
    pub source: String,
    /// The key set URL it came from.
    pub jwks_uri: String,
    /// The key set document as served.
    pub jwks: String,
    /// When it was fetched (ms since the epoch).
    pub fetched_at_ms: u64,
    /// When it stops being fresh (ms since the epoch).
    pub expires_at_ms: u64,
}

/// The fetch bookkeeping of one source. Processes that share a key set share this too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchState {
    /// Start of the last attempt, successful or not (ms since the epoch).
    pub last_attempt_ms: u64,
    /// Failed attempts in a row.
    pub failures: u32,
    /// No attempt before this time (backoff after a failure).
    pub retry_at_ms: u64,
    /// An attempt is running until at most this time; nobody else starts one meanwhile.
    pub busy_until_ms: u64,
}

/// Where a cache keeps its [`FetchState`] and publishes what it fetched: for the cache alone
/// ([`MemoryShare`]), or shared between processes (the extension's shared memory).
pub trait KeyShare: Send + Sync {
    /// Runs `f` on the fetch state of `source` under a lock that every sharer takes. A share
    /// that holds another source forgets its state (and keys) first.
    fn update_state(&self, source: &str, f: &mut dyn FnMut(&mut FetchState));
    /// A key set of `source` fetched after `after_ms` (by another process), if there is one.
    fn newer(&self, source: &str, after_ms: u64) -> Option<Snapshot>;
    /// Publishes a key set this cache fetched.
    fn publish(&self, snap: &Snapshot);
    /// Whether a background refresher retries a failing issuer, so that a login holding usable
    /// stale keys never waits for an attempt itself.
    fn refreshed_in_background(&self) -> bool {
        false
    }
}

/// A [`KeyShare`] in this process's memory: the default, one per cache. Two caches given the
/// same one behave like two processes sharing memory.
#[derive(Debug, Default)]
pub struct MemoryShare {
    background: bool,
    inner: Mutex<(String, FetchState, Option<Snapshot>)>,
}

impl MemoryShare {
    /// A share whose sharers have a background refresher (see [`KeyShare::refreshed_in_background`]).
    pub fn with_background_refresher() -> Self {
        Self { background: true, ..Self::default() }
    }

    fn for_source<'a>(
        inner: &'a mut (String, FetchState, Option<Snapshot>),
        source: &str,
    ) -> (&'a mut FetchState, &'a mut Option<Snapshot>) {
        if inner.0 != source {
            *inner = (source.to_owned(), FetchState::default(), None);
        }
        (&mut inner.1, &mut inner.2)
    }
}

impl KeyShare for MemoryShare {
    fn update_state(&self, source: &str, f: &mut dyn FnMut(&mut FetchState)) {
        let mut inner = self.inner.lock();
        f(Self::for_source(&mut inner, source).0);
    }

    fn newer(&self, source: &str, after_ms: u64) -> Option<Snapshot> {
        let inner = self.inner.lock();
        inner.2.as_ref().filter(|s| s.source == source && s.fetched_at_ms > after_ms).cloned()
    }

    fn publish(&self, snap: &Snapshot) {
        let mut inner = self.inner.lock();
        let (_, slot) = Self::for_source(&mut inner, &snap.source);
        if slot.as_ref().is_none_or(|s| s.fetched_at_ms < snap.fetched_at_ms) {
            *slot = Some(snap.clone());
        }
    }

    fn refreshed_in_background(&self) -> bool {
        self.background
    }
}

#[derive(Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    snapshot: Option<Snapshot>,
    jwks_uri: Option<String>,
    last_error: Option<KeyError>,
    /// Bumped whenever the keys change.
    generation: u64,
}

/// Why a fetch is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// No fresh keys.
    Expired {
        /// Stale keys within the staleness allowance are at hand.
        stale_usable: bool,
    },
    /// A `kid` (or algorithm) missing from fresh keys.
    UnknownKid,
    /// The background refresher's refresh ahead of expiry.
    Refresh,
}

/// The answer of [`JwksCache::begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Begin {
    /// This cache holds the attempt now.
    Go,
    /// Someone else's attempt runs until at most this time.
    Busy(u64),
    /// Not now (backoff, cooldown, or the background refresher retries).
    No,
}

/// A cached, self-refreshing key set for one issuer. Cheap to share behind an `Arc`.
pub struct JwksCache {
    source: JwksSource,
    source_id: String,
    share: Arc<dyn KeyShare>,
    attempt_budget: Duration,
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
        match &source {
            JwksSource::Discovery { issuer } => check_url(issuer, allow_http_loopback)
                .map_err(|e| ConfigError::new(Setting::Issuer, e.to_string()))?,
            JwksSource::Explicit { jwks_uri } => check_url(jwks_uri, allow_http_loopback)
                .map_err(|e| ConfigError::new(Setting::JwksUri, e.to_string()))?,
            JwksSource::File { path } => check_key_file_path(path)?,
        }
        // Keys fetched under another CA file (or another content of it) are another source's.
        let trust = fetcher.trust_id();
        let source_id = if trust.is_empty() { source.id() } else { format!("{} via {trust}", source.id()) };
        Ok(Self {
            source_id,
            source,
            share: Arc::new(MemoryShare::default()),
            attempt_budget: Duration::from_secs(20),
            fetcher,
            clock,
            settings,
            allow_http_loopback,
            state: RwLock::new(State::default()),
            fetch_lock: Mutex::new(()),
            fetches: AtomicU64::new(0),
        })
    }

    /// Keeps the fetch bookkeeping in `share` and publishes fetched keys there. `attempt_budget`
    /// bounds one attempt (discovery and key set, with every timeout): a sharer that died
    /// mid-fetch holds the attempt no longer than that.
    #[must_use]
    pub fn with_share(mut self, share: Arc<dyn KeyShare>, attempt_budget: Duration) -> Self {
        self.share = share;
        self.attempt_budget = attempt_budget;
        self
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

    /// Takes keys fetched elsewhere, if they are newer than ours and come from our source (a key
    /// set of another `jwks_uri` or issuer is not taken). Returns whether they were taken.
    /// A key set file is never imported: it is read (a copy made before the file changed would
    /// hide the change, and replacing the file is how its keys rotate).
    pub fn import(&self, snap: &Snapshot) -> Result<bool, KeyError> {
        if matches!(self.source, JwksSource::File { .. }) {
            return Ok(false);
        }
        if snap.source != self.source_id {
            tracing::debug!(source = %snap.source, ours = %self.source_id, "key set of another source not imported");
            return Ok(false);
        }
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

    fn fresh_with_generation(&self, now: u64) -> Option<(Arc<KeySet>, u64)> {
        let st = self.state.read();
        match (&st.keys, &st.snapshot) {
            (Some(keys), Some(s)) if now < s.expires_at_ms => Some((keys.clone(), st.generation)),
            _ => None,
        }
    }

    /// Imports a newer key set of our source from the share. Returns whether one was taken.
    fn adopt_shared(&self) -> bool {
        let ours = self.state.read().snapshot.as_ref().map_or(0, |s| s.fetched_at_ms);
        match self.share.newer(&self.source_id, ours) {
            Some(snap) => self.import(&snap).unwrap_or_else(|e| {
                tracing::warn!(error = %e, code = e.code(), "shared key set unusable");
                false
            }),
            None => false,
        }
    }

    fn keys_and_generation(&self) -> Result<(Arc<KeySet>, u64), KeyError> {
        if let Some(fresh) = self.fresh_with_generation(self.clock.now_ms()) {
            return Ok(fresh);
        }
        self.adopt_shared();
        if let Some(fresh) = self.fresh_with_generation(self.clock.now_ms()) {
            return Ok(fresh);
        }
        let seen = self.generation();
        let _flight = self.fetch_lock.lock();
        let now = self.clock.now_ms();
        if self.generation() == seen {
            let stale_usable = self.usable_keys(now).is_ok();
            match self.begin(now, Want::Expired { stale_usable }) {
                Begin::Go => {
                    let _ = self.fetch_begun(now);
                }
                Begin::Busy(until) if !stale_usable => self.wait_for_other(now, until),
                Begin::Busy(_) | Begin::No => {}
            }
        } // else someone else fetched while we waited.
        self.usable_keys(self.clock.now_ms())
    }

    /// Another sharer's attempt is running and we have nothing usable: wait (in real time, at
    /// most until its end) for the keys it publishes.
    fn wait_for_other(&self, now: u64, until: u64) {
        let deadline = std::time::Instant::now()
            + Duration::from_millis(until.saturating_sub(now)).min(self.attempt_budget);
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            if self.adopt_shared() {
                return;
            }
            let mut busy = false;
            let now = self.clock.now_ms();
            self.share.update_state(&self.source_id, &mut |s| busy = now < s.busy_until_ms);
            if !busy {
                self.adopt_shared();
                return;
            }
        }
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
                st.last_error
                    .as_ref()
                    .map_or("none here (fetched elsewhere)".to_owned(), ToString::to_string)
            ))),
            _ => Err(st.last_error.clone().unwrap_or_else(|| {
                KeyError::Unavailable("never fetched (a fetch elsewhere failed or is running)".into())
            })),
        }
    }

    /// Decides, atomically with every sharer, whether this cache makes an attempt now, and if so
    /// records it (so that the others see it running and the cooldown counts from it).
    fn begin(&self, now: u64, want: Want) -> Begin {
        let cooldown = ms(self.settings.unknown_kid_cooldown);
        let budget = ms(self.attempt_budget);
        let background = self.share.refreshed_in_background();
        let mut answer = Begin::No;
        self.share.update_state(&self.source_id, &mut |s| {
            answer = if now < s.busy_until_ms {
                Begin::Busy(s.busy_until_ms)
            } else if now < s.retry_at_ms
                || (want == Want::UnknownKid && now < s.last_attempt_ms.saturating_add(cooldown))
                || (want == Want::Expired { stale_usable: true } && background && s.failures > 0)
            {
                Begin::No
            } else {
                s.last_attempt_ms = now;
                s.busy_until_ms = now.saturating_add(budget);
                Begin::Go
            };
        });
        answer
    }

    /// For an unknown `kid`: refetch once, unless any sharer attempted a fetch less than a
    /// cooldown ago (then the `kid` was just checked against fresh keys: the cooldown is the
    /// negative cache). Returns the new keys if a fetch (ours or another's) changed them.
    fn refetch_for_unknown(&self, seen_generation: u64) -> Option<Arc<KeySet>> {
        self.adopt_shared();
        {
            let st = self.state.read();
            if st.generation != seen_generation {
                return st.keys.clone();
            }
        }
        let _flight = self.fetch_lock.lock();
        let now = self.clock.now_ms();
        {
            let st = self.state.read();
            if st.generation != seen_generation {
                return st.keys.clone();
            }
        }
        if self.begin(now, Want::UnknownKid) != Begin::Go {
            return None;
        }
        self.fetch_begun(now).ok()?;
        self.state.read().keys.clone()
    }

    /// For a background worker: refresh when 80 % of the TTL has passed (or there are no keys),
    /// unless a fetch is running or the backoff says wait. Returns whether a fetch ran and succeeded.
    pub fn refresh_if_due(&self) -> bool {
        self.adopt_shared();
        let now = self.clock.now_ms();
        {
            let st = self.state.read();
            if let Some(s) = &st.snapshot {
                let ttl = s.expires_at_ms.saturating_sub(s.fetched_at_ms);
                if now < s.fetched_at_ms + ttl * 4 / 5 {
                    return false;
                }
            }
        }
        let Some(_flight) = self.fetch_lock.try_lock() else { return false };
        let now = self.clock.now_ms();
        if self.begin(now, Want::Refresh) != Begin::Go {
            return false;
        }
        self.fetch_begun(now).is_ok()
    }

    /// Fetches, installs and publishes the key set, then ends the attempt [`JwksCache::begin`]
    /// granted. Caller holds `fetch_lock`.
    fn fetch_begun(&self, now: u64) -> Result<(), KeyError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let outcome = match self.fetch_snapshot(now) {
            Ok((keys, snap)) => {
                self.share.publish(&snap);
                install(&mut self.state.write(), keys, snap);
                Ok(())
            }
            Err(e) => {
                let mut st = self.state.write();
                if matches!(e, KeyError::Status { status: 404, .. }) {
                    st.jwks_uri = None; // rediscover next time
                }
                st.last_error = Some(e.clone());
                Err(e)
            }
        };
        let (initial, max) = (self.settings.backoff_initial, self.settings.backoff_max);
        let ended = self.clock.now_ms();
        let mut failures = 0;
        self.share.update_state(&self.source_id, &mut |s| {
            s.busy_until_ms = 0;
            if outcome.is_ok() {
                s.failures = 0;
                s.retry_at_ms = 0;
            } else {
                s.failures = s.failures.saturating_add(1);
                let backoff = initial.saturating_mul(1u32 << (s.failures - 1).min(16)).min(max);
                s.retry_at_ms = ended.saturating_add(ms(backoff));
            }
            failures = s.failures;
        });
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, code = e.code(), failures, "JWKS fetch failed");
        }
        outcome
    }

    fn fetch_snapshot(&self, now: u64) -> Result<(KeySet, Snapshot), KeyError> {
        let jwks_uri = match (&self.source, self.state.read().jwks_uri.clone()) {
            (JwksSource::Explicit { jwks_uri }, _) => jwks_uri.clone(),
            (JwksSource::Discovery { .. }, Some(uri)) => uri,
            (JwksSource::Discovery { issuer }, None) => self.discover(issuer)?,
            (JwksSource::File { path }, _) => format!("file://{}", path.display()),
        };
        let resp = match &self.source {
            JwksSource::File { path } => read_key_file(path)?,
            _ => self.fetcher.get(&jwks_uri)?,
        };
        let keys = parse_keys(&jwks_uri, &resp.body)?;
        let ttl = resp
            .max_age
            .map_or(self.settings.default_ttl, Duration::from_secs)
            .clamp(self.settings.min_ttl, self.settings.max_ttl);
        let jwks = String::from_utf8(resp.body)
            .map_err(|_| KeyError::Invalid { url: Quoted::new(&jwks_uri), reason: "not UTF-8".into() })?;
        let snap = Snapshot {
            source: self.source_id.clone(),
            jwks_uri,
            jwks,
            fetched_at_ms: now,
            expires_at_ms: now + ms(ttl),
        };
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
    st.last_error = None;
    st.generation += 1;
}

/// Largest key set file read.
pub const MAX_KEY_FILE_BYTES: u64 = 1 << 20;

/// A local key set file, as if served without `max-age` (checked as
/// [`crate::fetch::read_policy_file`] checks: whoever can write it can admit any token).
fn read_key_file(path: &std::path::Path) -> Result<crate::fetch::HttpResponse, KeyError> {
    let text = crate::fetch::read_policy_file(path, MAX_KEY_FILE_BYTES)
        .map_err(|e| KeyError::Unavailable(format!("key set file {}: {e}", path.display())))?;
    Ok(crate::fetch::HttpResponse { body: text.into_bytes(), max_age: None })
}

fn parse_keys(url: &str, body: &[u8]) -> Result<KeySet, KeyError> {
    let keys =
        KeySet::from_json(body).map_err(|reason| KeyError::Invalid { url: Quoted::new(url), reason })?;
    if keys.is_empty() {
        return Err(KeyError::Invalid { url: Quoted::new(url), reason: "key set is empty".into() });
    }
    Ok(keys)
}

/// The issuer a well-known metadata URL stands for, when `configured` is one (PostgreSQL 18 lets
/// pg_hba.conf's `issuer` be "a well-known URI that points directly to" the discovery document):
/// `https://host/path/.well-known/openid-configuration` (OpenID Connect Discovery's suffix form)
/// or `https://host/.well-known/oauth-authorization-server/path` (RFC 8414's infix form, either
/// suffix allowed in either place where the other rule allows it, as libpq 18 reads them) gives
/// `https://host/path`. `Ok(None)`: not a well-known URL (`configured` is the issuer itself).
/// Refused: a query or fragment, another well-known suffix, or the well-known part in the middle
/// of a path (`https://host/a/.well-known/openid-configuration/b` does not stand for
/// `https://host/a/b`).
pub fn issuer_from_well_known(configured: &str) -> Result<Option<String>, String> {
    const PREFIX: &str = "/.well-known/";
    let Some(scheme_end) = configured.find("://").map(|i| i + 3) else {
        return Ok(None);
    };
    let rest = &configured[scheme_end..];
    let Some(wk_at) = rest.find(PREFIX) else {
        return Ok(None);
    };
    if rest.contains(['?', '#']) {
        return Err("a well-known metadata URL has no query or fragment".into());
    }
    let after = &rest[wk_at + PREFIX.len()..];
    let suffix = ["openid-configuration", "oauth-authorization-server"]
        .into_iter()
        .find(|s| after.strip_prefix(s).is_some_and(|tail| tail.is_empty() || tail.starts_with('/')))
        .ok_or("a well-known metadata URL ends in openid-configuration or oauth-authorization-server")?;
    let tail = &after[suffix.len()..];
    let path_at = rest.find('/').unwrap_or(rest.len());
    if !tail.is_empty() && wk_at != path_at {
        return Err("the well-known part is either the whole path's start or its end".into());
    }
    let issuer = format!("{}{}{}", &configured[..scheme_end], &rest[..wk_at], tail);
    Ok(Some(issuer))
}

/// The issuer `configured` names: the issuer of a well-known metadata URL, else `configured`.
pub fn issuer_id(configured: &str) -> Result<String, String> {
    Ok(issuer_from_well_known(configured)?.unwrap_or_else(|| configured.to_owned()))
}

/// The issuer's metadata (`<issuer>/.well-known/openid-configuration`, else RFC 8414's
/// `/.well-known/oauth-authorization-server<path>`; a configured well-known URL is fetched as
/// it is), with where it came from. The document must name exactly the issuer.
pub fn issuer_metadata(
    fetcher: &dyn Fetcher,
    configured: &str,
) -> Result<(String, serde_json::Map<String, Value>), KeyError> {
    let well_known =
        issuer_from_well_known(configured).map_err(|_| KeyError::BadUrl(Quoted::new(configured)))?;
    let (issuer, url, body) = match well_known {
        Some(issuer) => (issuer, configured.to_owned(), fetcher.get(configured)?.body),
        None => {
            let issuer = configured.to_owned();
            let base = issuer.trim_end_matches('/');
            let oidc = format!("{base}/.well-known/openid-configuration");
            match fetcher.get(&oidc) {
                Ok(r) => (issuer, oidc, r.body),
                Err(KeyError::Status { status: 404, .. }) => {
                    let rfc8414 =
                        rfc8414_url(&issuer).ok_or_else(|| KeyError::BadUrl(Quoted::new(&issuer)))?;
                    let r = fetcher.get(&rfc8414)?;
                    (issuer, rfc8414, r.body)
                }
                Err(e) => return Err(e),
            }
        }
    };
    let invalid = |reason: &str| KeyError::Invalid { url: Quoted::new(&url), reason: reason.into() };
    let meta = parse_object(&body).map_err(|e| invalid(&format!("metadata: {e}")))?;
    match meta.get("issuer").and_then(Value::as_str) {
        Some(i) if i == issuer => {}
        Some(i) => {
            return Err(KeyError::IssuerMismatch { got: Quoted::new(i), expected: Quoted::new(&issuer) })
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
    use serde_json::json;

    /// Serves fixed documents; anything else is a 404.
    struct StaticFetcher(Vec<(String, Value)>);

    impl StaticFetcher {
        fn new<const N: usize>(docs: [(&str, Value); N]) -> Self {
            Self(docs.into_iter().map(|(u, v)| (u.to_owned(), v)).collect())
        }
    }

    impl Fetcher for StaticFetcher {
        fn get(&self, url: &str) -> Result<crate::fetch::HttpResponse, KeyError> {
            match self.0.iter().find(|(u, _)| u == url) {
                Some((_, v)) => {
                    Ok(crate::fetch::HttpResponse { body: v.to_string().into_bytes(), max_age: None })
                }
                None => Err(KeyError::Status { url: Quoted::new(url), status: 404 }),
            }
        }
    }

    /// pg_hba.conf's well-known form: both suffixes, both places, and what is refused.
    #[test]
    fn a_well_known_url_stands_for_its_issuer() {
        let id = |u: &str| issuer_from_well_known(u);
        assert_eq!(
            id("https://idp.example/.well-known/openid-configuration"),
            Ok(Some("https://idp.example".into()))
        );
        assert_eq!(
            id("https://idp.example/tenant/v2/.well-known/openid-configuration"),
            Ok(Some("https://idp.example/tenant/v2".into()))
        );
        assert_eq!(
            id("https://idp.example/.well-known/oauth-authorization-server/tenant"),
            Ok(Some("https://idp.example/tenant".into()))
        );
        assert_eq!(
            id("https://idp.example/.well-known/oauth-authorization-server"),
            Ok(Some("https://idp.example".into()))
        );
        assert_eq!(
            id("http://127.0.0.1:8080/.well-known/openid-configuration"),
            Ok(Some("http://127.0.0.1:8080".into()))
        );
        assert_eq!(id("https://idp.example/tenant"), Ok(None));
        assert_eq!(id("https://idp.example/tenant/"), Ok(None));
        assert_eq!(
            id("https://idp.example/a/.well-known/openid-configuration/b"),
            Err("the well-known part is either the whole path's start or its end".into())
        );
        let suffix = Err(
            "a well-known metadata URL ends in openid-configuration or oauth-authorization-server".into(),
        );
        assert_eq!(id("https://idp.example/.well-known/openid-configuration-bad"), suffix);
        assert_eq!(id("https://idp.example/.well-known/jwks.json"), suffix);
        assert_eq!(
            id("https://idp.example/.well-known/openid-configuration?x=1"),
            Err("a well-known metadata URL has no query or fragment".into())
        );
        assert_eq!(issuer_id("https://idp.example/x"), Ok("https://idp.example/x".into()));
    }

    /// A configured well-known URL is fetched as it is, and its document must name the issuer
    /// the URL stands for.
    #[test]
    fn a_well_known_url_is_fetched_as_configured() {
        let wk = "https://idp.example/.well-known/oauth-authorization-server/t";
        let good = StaticFetcher::new([(
            wk,
            json!({"issuer": "https://idp.example/t", "jwks_uri": "https://idp.example/k"}),
        )]);
        let (url, meta) = issuer_metadata(&good, wk).unwrap();
        assert_eq!((url.as_str(), meta["jwks_uri"].as_str()), (wk, Some("https://idp.example/k")));
        let other = StaticFetcher::new([(
            wk,
            json!({"issuer": "https://idp.example", "jwks_uri": "https://idp.example/k"}),
        )]);
        assert_eq!(
            issuer_metadata(&other, wk).unwrap_err().to_string(),
            KeyError::IssuerMismatch {
                got: Quoted::new("https://idp.example"),
                expected: Quoted::new("https://idp.example/t")
            }
            .to_string()
        );
    }

    /// #30 item 5, RFC 8414: `issuer` is required (its absence is refused, naming the document);
    /// `jwks_uri` is optional there but gprxy needs it for discovery: its absence is a key error
    /// naming the document and the member, and no key set is guessed.
    #[test]
    fn metadata_without_issuer_or_jwks_uri_is_refused_with_the_member_named() {
        let oidc = "https://idp.example/.well-known/openid-configuration";
        let no_issuer = StaticFetcher::new([(oidc, json!({"jwks_uri": "https://idp.example/k"}))]);
        assert_eq!(
            issuer_metadata(&no_issuer, "https://idp.example").unwrap_err().to_string(),
            KeyError::Invalid { url: Quoted::new(oidc), reason: "metadata has no issuer".into() }.to_string()
        );
        let no_keys = Arc::new(StaticFetcher::new([(oidc, json!({"issuer": "https://idp.example"}))]));
        let cache = JwksCache::new(
            JwksSource::Discovery { issuer: "https://idp.example".into() },
            no_keys,
            Arc::new(SystemClock),
            CacheSettings::default(),
            false,
        )
        .unwrap();
        let e = cache.find_key(Some("k"), crate::Algorithm::RS256).unwrap_err();
        assert!(e.to_string().contains("metadata has no jwks_uri"), "{e}");
    }

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
        assert_eq!(s.check().unwrap_err().setting, Setting::CacheTtlMin);
        let s = CacheSettings { default_ttl: Duration::from_secs(10), ..Default::default() };
        assert_eq!(s.check().unwrap_err().setting, Setting::CacheTtl);
    }
}
