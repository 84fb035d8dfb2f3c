//! The claims of the token that authenticated this session, readable by SQL (for row-level
//! security) and settable only by the validator: they live in backend memory that no SET,
//! set_config or RESET can reach.

use parking_lot::Mutex;
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
pub struct SessionIdentity {
    pub claims: Map<String, Value>,
    pub roles: Vec<String>,
    pub subject: Option<String>,
}

static SESSION: Mutex<Option<SessionIdentity>> = Mutex::new(None);

/// Called by the validator when a token authorized this login. (Before PostgreSQL 18 nothing
/// sets it yet: fallback mode's proxy-signed context is issue 6.)
#[cfg_attr(not(feature = "pg18"), allow(dead_code))]
pub fn set(identity: SessionIdentity) {
    *SESSION.lock() = Some(identity);
}

/// The session's identity, if it logged in with a token.
pub fn get() -> Option<SessionIdentity> {
    SESSION.lock().clone()
}

/// A claim by exact name or dotted path; strings as they are, other JSON as JSON text.
pub fn claim_text(name: &str) -> Option<String> {
    let session = SESSION.lock();
    let claims = &session.as_ref()?.claims;
    let path = gprxy_core::claims::ClaimPath::parse(name).ok()?;
    match path.lookup(claims)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}
