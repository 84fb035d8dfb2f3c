//! The cluster-wide introspection answers: with the library preloaded, each answer an issuer's
//! introspection endpoint gave lives in shared memory, keyed by a hash of issuer and token
//! (never the token), so a client that reconnects a hundred times (each connection a new
//! backend) costs one request per cache lifetime, not a hundred. Bounded: when full, the entry
//! whose freshness ends first gives way. Without preloading, a backend keeps its answers to
//! itself (one request per connection).

use gprxy_core::introspect::{AnswerStore, StoredAnswer};
use gprxy_core::MemoryAnswers;

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

#[derive(Clone, Copy)]
#[repr(C)]
pub struct SharedAnswers {
    entries: [Entry; ENTRIES],
}

impl Default for SharedAnswers {
    fn default() -> Self {
        Self { entries: [Entry::EMPTY; ENTRIES] }
    }
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
}

impl ShmAnswers {
    pub fn new() -> Self {
        Self { local: MemoryAnswers::new(64, 86_400) }
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
}
