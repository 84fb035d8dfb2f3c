//! The cluster-wide key store: with the library in `shared_preload_libraries`, each issuer's last
//! good key set lives in shared memory, tagged with the source it came from (the configured
//! `jwks_uri`, or discovery from the issuer), together with the fetch bookkeeping (last attempt,
//! failures, backoff, an attempt in progress). Every backend's cache uses it through
//! [`ShmShare`]: it imports keys from it (no network call when they are fresh), publishes what it
//! fetched, and keeps the unknown-`kid` cooldown and the backoff with all the others, so a flood
//! of connections cannot make more fetches than one backend would. The background worker keeps
//! every registered issuer fresh and retries a failing one. Without preloading (or with more
//! issuers than slots) a backend keeps all of this to itself.

use gprxy_core::{FetchState, KeyShare, MemoryShare, Snapshot};

use crate::ffi::{shmem_ready, SHARED};

/// Issuers shared at once; a further issuer still works, with per-backend caching only.
pub const SLOTS: usize = 4;
const ISSUER_MAX: usize = 512;
const URI_MAX: usize = 1024;
/// A source id is `discovery <issuer>` or `jwks_uri <url>`.
const SOURCE_MAX: usize = URI_MAX + 16;
/// Largest key set document shared (also the upper bound of `gprxy.http_max_body`).
pub const JWKS_MAX: usize = 96 * 1024;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Slot {
    issuer_len: u16,
    issuer: [u8; ISSUER_MAX],
    source_len: u16,
    source: [u8; SOURCE_MAX],
    uri_len: u16,
    uri: [u8; URI_MAX],
    fetched_at_ms: u64,
    expires_at_ms: u64,
    jwks_len: u32,
    jwks: [u8; JWKS_MAX],
    last_attempt_ms: u64,
    failures: u32,
    retry_at_ms: u64,
    busy_until_ms: u64,
}

impl Slot {
    const EMPTY: Slot = Slot {
        issuer_len: 0,
        issuer: [0; ISSUER_MAX],
        source_len: 0,
        source: [0; SOURCE_MAX],
        uri_len: 0,
        uri: [0; URI_MAX],
        fetched_at_ms: 0,
        expires_at_ms: 0,
        jwks_len: 0,
        jwks: [0; JWKS_MAX],
        last_attempt_ms: 0,
        failures: 0,
        retry_at_ms: 0,
        busy_until_ms: 0,
    };

    fn issuer(&self) -> &[u8] {
        &self.issuer[..usize::from(self.issuer_len).min(ISSUER_MAX)]
    }

    fn source(&self) -> &[u8] {
        &self.source[..usize::from(self.source_len).min(SOURCE_MAX)]
    }

    /// Takes the slot for `issuer` and `source`; anything kept for another source is forgotten.
    /// Callers check the lengths against ISSUER_MAX and SOURCE_MAX.
    fn bind(&mut self, issuer: &str, source: &str) {
        if self.issuer() != issuer.as_bytes() {
            self.issuer[..issuer.len()].copy_from_slice(issuer.as_bytes());
            self.issuer_len = issuer.len() as u16;
            self.source_len = 0;
        }
        if self.source() != source.as_bytes() || self.source_len == 0 {
            self.source[..source.len()].copy_from_slice(source.as_bytes());
            self.source_len = source.len() as u16;
            // Keys and bookkeeping of the old source are not this source's (the lengths say
            // what is valid; the bytes need no clearing).
            self.uri_len = 0;
            self.jwks_len = 0;
            self.fetched_at_ms = 0;
            self.expires_at_ms = 0;
            self.set_state(FetchState::default());
        }
    }

    fn state(&self) -> FetchState {
        FetchState {
            last_attempt_ms: self.last_attempt_ms,
            failures: self.failures,
            retry_at_ms: self.retry_at_ms,
            busy_until_ms: self.busy_until_ms,
        }
    }

    fn set_state(&mut self, s: FetchState) {
        self.last_attempt_ms = s.last_attempt_ms;
        self.failures = s.failures;
        self.retry_at_ms = s.retry_at_ms;
        self.busy_until_ms = s.busy_until_ms;
    }

    fn snapshot(&self) -> Option<Snapshot> {
        if self.jwks_len == 0 {
            return None;
        }
        let source = std::str::from_utf8(self.source()).ok()?;
        let uri = std::str::from_utf8(&self.uri[..usize::from(self.uri_len).min(URI_MAX)]).ok()?;
        let jwks = std::str::from_utf8(&self.jwks[..(self.jwks_len as usize).min(JWKS_MAX)]).ok()?;
        Some(Snapshot {
            source: source.to_owned(),
            jwks_uri: uri.to_owned(),
            jwks: jwks.to_owned(),
            fetched_at_ms: self.fetched_at_ms,
            expires_at_ms: self.expires_at_ms,
        })
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct SharedKeys {
    slots: [Slot; SLOTS],
}

impl Default for SharedKeys {
    fn default() -> Self {
        Self { slots: [Slot::EMPTY; SLOTS] }
    }
}

impl SharedKeys {
    /// The slot of `issuer`, else a free one.
    fn slot_for(&self, issuer: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.issuer() == issuer.as_bytes())
            .or_else(|| self.slots.iter().position(|s| s.issuer_len == 0))
    }
}

/// One issuer's share of the cluster-wide store, for its backend's [`gprxy_core::JwksCache`].
pub struct ShmShare {
    issuer: String,
    /// Without preloading, or when every slot holds another issuer.
    local: MemoryShare,
}

impl ShmShare {
    pub fn new(issuer: &str) -> Self {
        Self { issuer: issuer.to_owned(), local: MemoryShare::default() }
    }

    fn fits(&self, source: &str) -> bool {
        shmem_ready() && self.issuer.len() <= ISSUER_MAX && source.len() <= SOURCE_MAX
    }
}

impl KeyShare for ShmShare {
    fn update_state(&self, source: &str, f: &mut dyn FnMut(&mut FetchState)) {
        if self.fits(source) {
            let mut guard = SHARED.exclusive();
            if let Some(i) = guard.slot_for(&self.issuer) {
                let slot = &mut guard.slots[i];
                slot.bind(&self.issuer, source);
                let mut state = slot.state();
                f(&mut state);
                slot.set_state(state);
                return;
            }
        }
        self.local.update_state(source, f);
    }

    fn newer(&self, source: &str, after_ms: u64) -> Option<Snapshot> {
        if !self.fits(source) {
            return self.local.newer(source, after_ms);
        }
        let guard = SHARED.share();
        match guard.slots.iter().find(|s| s.issuer() == self.issuer.as_bytes()) {
            Some(s) if s.source() == source.as_bytes() && s.fetched_at_ms > after_ms => s.snapshot(),
            Some(_) => None,
            None => self.local.newer(source, after_ms),
        }
    }

    fn publish(&self, snap: &Snapshot) {
        if !self.fits(&snap.source) || snap.jwks.len() > JWKS_MAX || snap.jwks_uri.len() > URI_MAX {
            return self.local.publish(snap);
        }
        let mut guard = SHARED.exclusive();
        let Some(i) = guard.slot_for(&self.issuer) else {
            drop(guard);
            return self.local.publish(snap);
        };
        let slot = &mut guard.slots[i];
        slot.bind(&self.issuer, &snap.source);
        if slot.fetched_at_ms >= snap.fetched_at_ms {
            return;
        }
        slot.uri[..snap.jwks_uri.len()].copy_from_slice(snap.jwks_uri.as_bytes());
        slot.uri_len = snap.jwks_uri.len() as u16;
        slot.jwks[..snap.jwks.len()].copy_from_slice(snap.jwks.as_bytes());
        slot.jwks_len = snap.jwks.len() as u32;
        slot.fetched_at_ms = snap.fetched_at_ms;
        slot.expires_at_ms = snap.expires_at_ms;
    }

    /// The background worker refreshes (and retries) every issuer that has a slot.
    fn refreshed_in_background(&self) -> bool {
        shmem_ready() && SHARED.share().slots.iter().any(|s| s.issuer() == self.issuer.as_bytes())
    }
}

/// Issuers with a slot.
pub fn issuers() -> Vec<String> {
    if !shmem_ready() {
        return Vec::new();
    }
    let guard = SHARED.share();
    guard
        .slots
        .iter()
        .filter(|s| s.issuer_len > 0)
        .map(|s| String::from_utf8_lossy(s.issuer()).into_owned())
        .collect()
}
