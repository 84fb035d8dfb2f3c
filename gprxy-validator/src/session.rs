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
    /// The authenticated identity as the issuer's policy forms it (issuer-qualified when the
    /// entry says so): what RLS policies should compare, since two issuers' `sub` may collide.
    pub identity: Option<String>,
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
#[cfg_attr(not(oauth_validator), allow(dead_code))]
pub fn set(identity: SessionIdentity) {
    let mut s = SESSION.lock();
    s.identity = Some(identity);
    s.from_token_login = true;
}

/// `gprxy.context_keys`: the proxy's context public keys the DBA pinned (PGC_SIGHUP).
pub static CONTEXT_KEYS: Str = Str::new(None);
/// `gprxy.context_roles`: the session users that may set a context (PGC_SIGHUP).
pub static CONTEXT_ROLES: Str = Str::new(None);
/// `gprxy.context_nonce` as the startup packet set it (informational: set_context reads the
/// packet itself; defining it keeps PostgreSQL 18's reserved prefix from refusing it).
pub static CONTEXT_NONCE: Str = Str::new(None);

type Str = pgrx::GucSetting<Option<std::ffi::CString>>;

fn setting(s: &Str) -> String {
    s.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

fn role_names(v: &str) -> impl Iterator<Item = &str> {
    v.split([',', ' ', '\t', '\n']).filter(|r| !r.is_empty())
}

/// `gprxy.context_keys` check hook.
pub fn check_context_keys(v: &str) -> Result<(), String> {
    gprxy_core::context::parse_pinned_keys(v).map(|_| ())
}

/// `gprxy.context_roles` check hook: role names (as stored, case-sensitive), comma-separated.
pub fn check_context_roles(v: &str) -> Result<(), String> {
    match role_names(v).find(|r| r.len() > 63) {
        Some(r) => Err(format!("{r:?} is longer than a role name can be (63 bytes)")),
        None => Ok(()),
    }
}

/// Why `gprxy.set_context` refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SetContextError {
    /// The session logged in with a token (PostgreSQL 18 validator).
    TokenLogin,
    /// The session user is not in `gprxy.context_roles`.
    RoleNotAllowed(String),
    /// The signed context did not verify.
    Context(ContextError),
}

impl std::fmt::Display for SetContextError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TokenLogin => {
                f.write_str("the session logged in with a token; its identity cannot be replaced")
            }
            Self::RoleNotAllowed(user) => write!(f, "session user {user:?} is not in gprxy.context_roles"),
            Self::Context(e) => e.fmt(f),
        }
    }
}

/// Who calls `gprxy.set_context`, on which connection.
#[derive(Debug)]
pub struct Caller {
    /// `session_user` (never changed by SET ROLE or SECURITY DEFINER).
    pub session_user: String,
    /// The `gprxy.context_nonce` of the startup packet.
    pub nonce: Option<String>,
    /// How many times the startup packet named the nonce.
    pub nonce_count: usize,
    /// This backend's process id.
    pub pid: i32,
}

/// Accepts a context signed by the proxy when the session user is in `gprxy.context_roles`,
/// the signature verifies against a key pinned in `gprxy.context_keys`, it was signed for this
/// connection (nonce, process id) and its counter is above the last one.
pub fn set_signed(
    caller: &Caller,
    context: &str,
) -> Result<Option<gprxy_core::context::ContextEnd>, SetContextError> {
    let mut s = SESSION.lock();
    if s.from_token_login {
        return Err(SetContextError::TokenLogin);
    }
    if !role_names(&setting(&CONTEXT_ROLES)).any(|r| r == caller.session_user) {
        return Err(SetContextError::RoleNotAllowed(caller.session_user.clone()));
    }
    let nonce = match (caller.nonce.as_deref(), caller.nonce_count) {
        (_, n) if n > 1 => return Err(SetContextError::Context(ContextError::DuplicateNonce)),
        (Some(k), 1) => k,
        _ => "",
    };
    let binding = gprxy_core::context::Binding { nonce, pid: caller.pid };
    let ctx = gprxy_core::context::verify(&setting(&CONTEXT_KEYS), binding, context, s.last_counter)
        .map_err(SetContextError::Context)?;
    s.last_counter = ctx.n;
    s.identity = Some(SessionIdentity {
        claims: ctx.claims,
        roles: ctx.roles,
        subject: ctx.sub,
        identity: ctx.identity,
    });
    Ok(ctx.end)
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
