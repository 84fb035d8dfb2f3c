//! The cluster-wide introspection answers: with the library preloaded, each answer an issuer's
//! introspection endpoint gave lives in shared memory, keyed by a hash of issuer and token
//! (never the token), so a client that reconnects a hundred times (each connection a new
//! backend) costs one request per cache lifetime, not a hundred. Bounded: when full, the entry
//! whose freshness ends first gives way. Without preloading, a backend keeps its answers to
//! itself (one request per connection).

use gprxy_core::introspect::{AnswerStore, Budget, RequestLimits, StoredAnswer};
use gprxy_core::MemoryAnswers;
use parking_lot::Mutex;

use crate::ffi::{shmem_ready, ANSWERS};

/// Answers kept at once.
pub const ENTRIES: usize = 256;
/// The largest answer kept (its JSON); a larger one is asked again at each login.
pub const ANSWER_MAX: usize = gprxy_core::introspect::ANSWER_MAX_BYTES;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct Entry {
    used: bool,
    active: bool,
    key: [u8; 32],
    fresh_until: i64,
    len: u16,
    json: [u8; ANSWER_MAX],
}

impl Entry {
    const EMPTY: Entry =
        Entry { used: false, active: false, key: [0; 32], fresh_until: 0, len: 0, json: [0; ANSWER_MAX] };
}

/// Issuers whose request budget and discovered endpoint are kept cluster-wide; a further one
/// keeps them per backend.
pub const ISSUER_SLOTS: usize = 8;
/// Requests in flight one issuer may have (the setting's upper bound).
const MAX_FLIGHTS: usize = 64;
/// A request in flight counts this long at most (a backend that died mid-request frees its
/// place then): above every HTTP timeout.
const FLIGHT_MAX_MS: u64 = 30_000;
const ENDPOINT_MAX: usize = 1024;

/// One issuer's requests, for the whole cluster: a token bucket, the deadlines of the requests
/// in flight, and the introspection endpoint discovery named.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct IssuerState {
    used: bool,
    key: [u8; 32],
    milli_tokens: u64,
    filled_at_ms: u64,
    flights: [u64; MAX_FLIGHTS],
    endpoint_len: u16,
    endpoint: [u8; ENDPOINT_MAX],
}

impl IssuerState {
    const EMPTY: IssuerState = IssuerState {
        used: false,
        key: [0; 32],
        milli_tokens: 0,
        filled_at_ms: 0,
        flights: [0; MAX_FLIGHTS],
        endpoint_len: 0,
        endpoint: [0; ENDPOINT_MAX],
    };
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct SharedAnswers {
    entries: [Entry; ENTRIES],
    issuers: [IssuerState; ISSUER_SLOTS],
}

impl Default for SharedAnswers {
    fn default() -> Self {
        Self { entries: [Entry::EMPTY; ENTRIES], issuers: [IssuerState::EMPTY; ISSUER_SLOTS] }
    }
}

fn issuer_key(issuer: &str) -> [u8; 32] {
    gprxy_core::introspect::cache_key(issuer, "")
}

impl SharedAnswers {
    fn get(&self, key: &[u8; 32]) -> Option<StoredAnswer> {
        self.entries.iter().find(|e| e.used && &e.key == key).map(|e| StoredAnswer {
            active: e.active,
            claims_json: e.json[..usize::from(e.len).min(ANSWER_MAX)].to_vec(),
            fresh_until: e.fresh_until,
        })
    }

    /// The entry for `key`, else a free one, else the one whose freshness ends first.
    fn slot_for(&self, key: &[u8; 32]) -> usize {
        self.entries
            .iter()
            .position(|e| e.used && &e.key == key)
            .or_else(|| self.entries.iter().position(|e| !e.used))
            .unwrap_or_else(|| (0..ENTRIES).min_by_key(|&i| self.entries[i].fresh_until).unwrap_or(0))
    }

    /// The issuer's state, taking a free slot for it when `claim`.
    fn issuer(&mut self, issuer: &str, claim: bool) -> Option<&mut IssuerState> {
        let key = issuer_key(issuer);
        let i = self.issuers.iter().position(|x| x.used && x.key == key).or_else(|| {
            let free = self.issuers.iter().position(|x| !x.used).filter(|_| claim)?;
            self.issuers[free] = IssuerState { used: true, key, ..IssuerState::EMPTY };
            Some(free)
        })?;
        Some(&mut self.issuers[i])
    }

    /// Takes a request (a flight slot's index), or None when over the limits; Err when the
    /// issuer has no slot here.
    fn take(&mut self, issuer: &str, now_ms: u64, limits: RequestLimits) -> Result<Option<usize>, ()> {
        let st = self.issuer(issuer, true).ok_or(())?;
        let in_flight = st.flights.iter().filter(|&&d| d > now_ms).count() as u32;
        let mut b = Budget { milli_tokens: st.milli_tokens, filled_at_ms: st.filled_at_ms, in_flight };
        if !b.take(now_ms, limits) {
            st.filled_at_ms = b.filled_at_ms;
            st.milli_tokens = b.milli_tokens;
            return Ok(None);
        }
        st.milli_tokens = b.milli_tokens;
        st.filled_at_ms = b.filled_at_ms;
        let slot = st.flights.iter().position(|&d| d <= now_ms).ok_or(())?;
        st.flights[slot] = now_ms + FLIGHT_MAX_MS;
        Ok(Some(slot))
    }

    fn put(&mut self, key: [u8; 32], answer: &StoredAnswer) {
        let i = self.slot_for(&key);
        let e = &mut self.entries[i];
        e.used = true;
        e.active = answer.active;
        e.key = key;
        e.fresh_until = answer.fresh_until;
        e.json[..answer.claims_json.len()].copy_from_slice(&answer.claims_json);
        e.len = answer.claims_json.len() as u16;
    }
}

/// The answer store of one backend: shared memory when preloaded, else its own.
pub struct ShmAnswers {
    local: MemoryAnswers,
    /// Flight slots this backend holds in shared memory, by issuer, with their deadlines.
    taken: Mutex<Vec<(String, usize, u64)>>,
}

impl ShmAnswers {
    pub fn new() -> Self {
        Self { local: MemoryAnswers::new(64, 86_400), taken: Mutex::new(Vec::new()) }
    }
}

impl AnswerStore for ShmAnswers {
    fn get(&self, key: &[u8; 32]) -> Option<StoredAnswer> {
        if shmem_ready() {
            return ANSWERS.share().get(key);
        }
        self.local.get(key)
    }

    fn put(&self, key: [u8; 32], answer: StoredAnswer, now: i64) {
        if !shmem_ready() {
            return self.local.put(key, answer, now);
        }
        if answer.claims_json.len() <= ANSWER_MAX {
            ANSWERS.exclusive().put(key, &answer);
        }
    }

    fn take_request(&self, issuer: &str, now_ms: u64, limits: RequestLimits) -> bool {
        if !shmem_ready() {
            return self.local.take_request(issuer, now_ms, limits);
        }
        match ANSWERS.exclusive().take(issuer, now_ms, limits) {
            Ok(Some(slot)) => {
                self.taken.lock().push((issuer.to_owned(), slot, now_ms + FLIGHT_MAX_MS));
                true
            }
            Ok(None) => false,
            // More issuers than slots: this backend's own budget.
            Err(()) => self.local.take_request(issuer, now_ms, limits),
        }
    }

    fn release_request(&self, issuer: &str) {
        let taken = {
            let mut t = self.taken.lock();
            t.iter().position(|(i, _, _)| i == issuer).map(|at| t.remove(at))
        };
        match taken {
            Some((_, slot, deadline)) if shmem_ready() => {
                // Only if still ours: a request past FLIGHT_MAX_MS lost its slot to another.
                if let Some(st) =
                    ANSWERS.exclusive().issuer(issuer, false).filter(|st| st.flights[slot] == deadline)
                {
                    st.flights[slot] = 0;
                }
            }
            _ => self.local.release_request(issuer),
        }
    }

    fn endpoint(&self, issuer: &str) -> Option<String> {
        if !shmem_ready() {
            return self.local.endpoint(issuer);
        }
        let mut shared = ANSWERS.exclusive();
        let st = shared.issuer(issuer, false)?;
        let url = &st.endpoint[..usize::from(st.endpoint_len).min(ENDPOINT_MAX)];
        (!url.is_empty()).then(|| String::from_utf8_lossy(url).into_owned())
    }

    fn set_endpoint(&self, issuer: &str, url: &str) {
        if !shmem_ready() || url.len() > ENDPOINT_MAX {
            return self.local.set_endpoint(issuer, url);
        }
        if let Some(st) = ANSWERS.exclusive().issuer(issuer, true) {
            st.endpoint[..url.len()].copy_from_slice(url.as_bytes());
            st.endpoint_len = url.len() as u16;
        }
    }
}
