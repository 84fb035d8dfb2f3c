//! The claims of the token that authenticated this session, readable by SQL (for row-level
//! security) and settable only by the validator or, in fallback mode, by a context the proxy
//! signed (`gprxy_core::context`): they live in backend memory that no SET, set_config or RESET
//! can reach.

use gprxy_core::context::ContextError;
use parking_lot::Mutex;
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
pub struct SessionIdentity {
    pub claims: Map<String, Value>,
    pub roles: Vec<String>,
    pub subject: Option<String>,
}

/// Where the identity came from; a token login's identity is fixed for the session.
#[derive(Debug, Default)]
struct State {
    identity: Option<SessionIdentity>,
    from_token_login: bool,
    /// Highest signed-context counter accepted on this connection.
    last_counter: u64,
}

static SESSION: Mutex<State> = Mutex::new(State { identity: None, from_token_login: false, last_counter: 0 });

/// Called by the validator when a token authorized this login.
#[cfg_attr(not(feature = "pg18"), allow(dead_code))]
pub fn set(identity: SessionIdentity) {
    let mut s = SESSION.lock();
    s.identity = Some(identity);
    s.from_token_login = true;
}

/// Why `gprxy.set_context` refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SetContextError {
    /// The session logged in with a token (PostgreSQL 18 validator).
    TokenLogin,
    /// The signed context did not verify.
    Context(ContextError),
}

impl std::fmt::Display for SetContextError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TokenLogin => {
                f.write_str("the session logged in with a token; its identity cannot be replaced")
            }
            Self::Context(e) => e.fmt(f),
        }
    }
}

/// Accepts a context signed by the proxy with the private half of the startup key (`key`,
/// with how many times the startup packet named it) if its counter is above the last one.
pub fn set_signed(key: Option<&str>, key_count: usize, context: &str) -> Result<(), SetContextError> {
    let mut s = SESSION.lock();
    if s.from_token_login {
        return Err(SetContextError::TokenLogin);
    }
    let key = match (key, key_count) {
        (_, n) if n > 1 => return Err(SetContextError::Context(ContextError::DuplicateKey)),
        (Some(k), 1) => k,
        _ => return Err(SetContextError::Context(ContextError::NoKey)),
    };
    let ctx = gprxy_core::context::verify(key, context, s.last_counter).map_err(SetContextError::Context)?;
    s.last_counter = ctx.n;
    s.identity = Some(SessionIdentity { claims: ctx.claims, roles: ctx.roles, subject: ctx.sub });
    Ok(())
}

/// Forgets a signed context (the counter stays). A token login's identity stays too.
pub fn reset_signed() {
    let mut s = SESSION.lock();
    if !s.from_token_login {
        s.identity = None;
    }
}

/// The session's identity, if it logged in with a token.
pub fn get() -> Option<SessionIdentity> {
    SESSION.lock().identity.clone()
}

/// A claim by exact name or dotted path; strings as they are, other JSON as JSON text.
pub fn claim_text(name: &str) -> Option<String> {
    let session = SESSION.lock();
    let claims = &session.identity.as_ref()?.claims;
    let path = gprxy_core::claims::ClaimPath::parse(name).ok()?;
    match path.lookup(claims)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}
