//! The cluster-wide key store: with the library in `shared_preload_libraries`, each issuer's last
//! good key set lives in shared memory. A backend imports it before validating (no network call
//! when it is fresh) and publishes what it fetched itself; the background worker keeps every
//! registered issuer fresh. Without preloading these functions do nothing.

use gprxy_core::{JwksCache, Snapshot};

use crate::ffi::{shmem_ready, SHARED};

/// Issuers shared at once; a further issuer still works, with per-backend caching only.
pub const SLOTS: usize = 4;
const ISSUER_MAX: usize = 512;
const URI_MAX: usize = 1024;
/// Largest key set document shared (also the upper bound of `gprxy.http_max_body`).
pub const JWKS_MAX: usize = 96 * 1024;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Slot {
    issuer_len: u16,
    issuer: [u8; ISSUER_MAX],
    uri_len: u16,
    uri: [u8; URI_MAX],
    fetched_at_ms: u64,
    expires_at_ms: u64,
    jwks_len: u32,
    jwks: [u8; JWKS_MAX],
}

impl Slot {
    const EMPTY: Slot = Slot {
        issuer_len: 0,
        issuer: [0; ISSUER_MAX],
        uri_len: 0,
        uri: [0; URI_MAX],
        fetched_at_ms: 0,
        expires_at_ms: 0,
        jwks_len: 0,
        jwks: [0; JWKS_MAX],
    };

    fn issuer(&self) -> &[u8] {
        &self.issuer[..usize::from(self.issuer_len).min(ISSUER_MAX)]
    }

    fn snapshot(&self) -> Option<Snapshot> {
        if self.jwks_len == 0 {
            return None;
        }
        let uri = std::str::from_utf8(&self.uri[..usize::from(self.uri_len).min(URI_MAX)]).ok()?;
        let jwks = std::str::from_utf8(&self.jwks[..(self.jwks_len as usize).min(JWKS_MAX)]).ok()?;
        Some(Snapshot {
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

/// Imports the shared key set for `issuer` into `cache` if it is newer.
pub fn pull(issuer: &str, cache: &JwksCache) {
    if !shmem_ready() {
        return;
    }
    let ours = cache.export().map_or(0, |s| s.fetched_at_ms);
    let snap = {
        let guard = SHARED.share();
        guard
            .slots
            .iter()
            .find(|s| s.issuer() == issuer.as_bytes() && s.fetched_at_ms > ours)
            .and_then(Slot::snapshot)
    };
    if let Some(snap) = snap {
        let _ = cache.import(&snap);
    }
}

/// Publishes `cache`'s key set for `issuer` if it is newer than the shared one.
pub fn push(issuer: &str, cache: &JwksCache) {
    if !shmem_ready() || issuer.len() > ISSUER_MAX {
        return;
    }
    let Some(snap) = cache.export() else { return };
    if snap.jwks.len() > JWKS_MAX || snap.jwks_uri.len() > URI_MAX {
        return;
    }
    let mut guard = SHARED.exclusive();
    let idx = guard
        .slots
        .iter()
        .position(|s| s.issuer() == issuer.as_bytes())
        .or_else(|| guard.slots.iter().position(|s| s.issuer_len == 0));
    let Some(idx) = idx else { return };
    let slot = &mut guard.slots[idx];
    if slot.fetched_at_ms >= snap.fetched_at_ms {
        return;
    }
    slot.issuer[..issuer.len()].copy_from_slice(issuer.as_bytes());
    slot.issuer_len = issuer.len() as u16;
    slot.uri[..snap.jwks_uri.len()].copy_from_slice(snap.jwks_uri.as_bytes());
    slot.uri_len = snap.jwks_uri.len() as u16;
    slot.jwks[..snap.jwks.len()].copy_from_slice(snap.jwks.as_bytes());
    slot.jwks_len = snap.jwks.len() as u32;
    slot.fetched_at_ms = snap.fetched_at_ms;
    slot.expires_at_ms = snap.expires_at_ms;
}

/// Issuers with a shared key set.
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
