//! One OAuth login: validate the bearer token for the pg_hba line that matched, decide, audit.
//!
//! Keys come from a per-backend [`JwksCache`] per issuer, which shares its keys and fetch
//! bookkeeping with every other backend through shared memory when the library is preloaded
//! ([`crate::shared`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gprxy_core::{
    peek_claim, peek_unverified, ConfigError, JwksCache, JwksSource, LazyFetcher, SystemClock,
    ValidatedToken, Validator,
};
use parking_lot::Mutex;

use crate::settings::Settings;

/// What PostgreSQL tells us about the login.
pub struct LoginRequest<'a> {
    pub token: &'a str,
    pub role: &'a str,
    pub hba_issuer: Option<&'a str>,
    pub hba_scope: Option<&'a str>,
    pub delegated: bool,
    pub client: Option<&'a str>,
    pub database: Option<&'a str>,
}

/// What we tell PostgreSQL, and what the audit line says.
pub struct LoginOutcome {
    pub authorized: bool,
    pub authn_id: Option<String>,
    pub reason: &'static str,
    pub detail: String,
    pub token: Option<ValidatedToken>,
}

/// What one issuer needs per login, built on its first login in this backend and kept while
/// the settings are the same parse.
struct IssuerState {
    settings: Arc<Settings>,
    cache: Arc<JwksCache>,
    /// By the pg_hba line's scope.
    validators: Vec<(Option<String>, Arc<Validator>)>,
}

/// Per-backend state by issuer (a handful: a list needs no hashing). A backend is
/// single-threaded; the mutex only satisfies `static`.
static ISSUERS: Mutex<Vec<(String, IssuerState)>> = Mutex::new(Vec::new());

/// The JWKS source for an issuer under these settings.
pub fn source_for(settings: &Settings, issuer: &str) -> JwksSource {
    match &settings.jwks_uri {
        Some(uri) => JwksSource::Explicit { jwks_uri: uri.clone() },
        None => JwksSource::Discovery { issuer: issuer.to_owned() },
    }
}

impl IssuerState {
    fn new(settings: &Arc<Settings>, issuer: &str) -> Result<Self, ConfigError> {
        // One attempt is at most a discovery request and a key set request.
        let http = &settings.http;
        let attempt_budget = (http.connect_timeout + http.read_timeout) * 2 + Duration::from_secs(1);
        let cache = JwksCache::new(
            source_for(settings, issuer),
            Arc::new(LazyFetcher::new(http.clone())),
            Arc::new(SystemClock),
            settings.cache.clone(),
            http.insecure_allow_http_loopback,
        )?
        .with_share(Arc::new(crate::shared::ShmShare::new(issuer)), attempt_budget);
        Ok(Self { settings: settings.clone(), cache: Arc::new(cache), validators: Vec::new() })
    }
}

/// Runs `f` on the backend's state for `issuer` under `settings`, rebuilt when the settings were
/// parsed anew (the keys carry over).
fn with_issuer<T>(
    settings: &Arc<Settings>,
    issuer: &str,
    f: impl FnOnce(&mut IssuerState) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let mut issuers = ISSUERS.lock();
    let i = match issuers.iter().position(|(name, _)| name == issuer) {
        Some(i) => i,
        None => {
            issuers.push((issuer.to_owned(), IssuerState::new(settings, issuer)?));
            issuers.len() - 1
        }
    };
    let state = &mut issuers[i].1;
    if !Arc::ptr_eq(&state.settings, settings) {
        let renewed = IssuerState::new(settings, issuer)?;
        if let Some(snap) = state.cache.export() {
            let _ = renewed.cache.import(&snap);
        }
        *state = renewed;
    }
    f(state)
}

/// The backend's key cache for `issuer` (the refresher's).
pub fn cache_for(settings: &Arc<Settings>, issuer: &str) -> Result<Arc<JwksCache>, ConfigError> {
    with_issuer(settings, issuer, |state| Ok(state.cache.clone()))
}

/// The backend's key cache for `issuer` and its validator for the pg_hba line's scope.
fn issuer_state(
    settings: &Arc<Settings>,
    issuer: &str,
    hba_scope: Option<&str>,
) -> Result<(Arc<JwksCache>, Arc<Validator>), ConfigError> {
    with_issuer(settings, issuer, |state| {
        let validator = match state.validators.iter().find(|(scope, _)| scope.as_deref() == hba_scope) {
            Some((_, v)) => v.clone(),
            None => {
                let v = Arc::new(Validator::new(settings.policy(issuer, hba_scope)?));
                state.validators.push((hba_scope.map(str::to_owned), v.clone()));
                v
            }
        };
        Ok((state.cache.clone(), validator))
    })
}

/// The attributes of a role that no grant can narrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolePowers {
    pub superuser: bool,
    pub replication: bool,
    pub bypass_rls: bool,
    pub create_role: bool,
    /// A role with such powers that this one is a member of (and so can SET ROLE to).
    pub member_of: Option<String>,
}

/// Why delegated mode refuses to log a token in as `role` (None: it may). A role that is a
/// superuser, or has REPLICATION or BYPASSRLS, is never reached through a token's claims,
/// whatever they say; a role that cannot be looked up is refused too.
fn privileged_role(role: &str, powers: Option<RolePowers>) -> Option<String> {
    let Some(p) = powers else {
        return Some(format!("role {role:?} was not found in pg_authid"));
    };
    let what: Vec<&str> = [
        (p.superuser, "SUPERUSER"),
        (p.replication, "REPLICATION"),
        (p.bypass_rls, "BYPASSRLS"),
        (p.create_role, "CREATEROLE"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if !what.is_empty() {
        return Some(format!(
            "role {role:?} has {}: delegated mode never maps a token to such a role",
            what.join(", ")
        ));
    }
    p.member_of.map(|other| {
        format!(
            "role {role:?} is a member of {other:?}, which has powers beyond its grants: delegated mode never maps a token to such a role"
        )
    })
}

fn deny(reason: &'static str, detail: String, authn_id: Option<String>) -> LoginOutcome {
    LoginOutcome { authorized: false, authn_id, reason, detail, token: None }
}

/// Validates and decides. Never panics on bad input; every refusal has a reason code.
pub fn decide(req: &LoginRequest<'_>) -> LoginOutcome {
    let settings = match Settings::current() {
        Ok(s) => s,
        Err(e) => return deny("config", e.to_string(), None),
    };
    // Who tried, for the log, even when the token is refused (never used for a decision).
    let unverified_id = || peek_claim(req.token, &settings.authn_claim);
    let Some(issuer) = req.hba_issuer.filter(|i| !i.is_empty()) else {
        return deny("config", "the pg_hba.conf line has no issuer".into(), unverified_id());
    };
    let (cache, validator) = match issuer_state(&settings, issuer, req.hba_scope) {
        Ok(found) => found,
        Err(e) => return deny("config", e.to_string(), unverified_id()),
    };
    let result = validator.validate(req.token, &*cache, gprxy_core::unix_time());
    let token = match result {
        Ok(t) => t,
        Err(e) => return deny(e.code(), e.to_string(), unverified_id()),
    };
    if req.delegated {
        let granted = settings.granted_db_roles(&token.roles);
        if !granted.iter().any(|r| r == req.role) {
            let detail = format!(
                "role {:?} is not among the roles the token grants ({})",
                req.role,
                if granted.is_empty() { "none".to_owned() } else { granted.join(", ") }
            );
            return LoginOutcome {
                authorized: false,
                authn_id: Some(token.identity.clone()),
                reason: "role_not_granted",
                detail,
                token: Some(token),
            };
        }
        if let Some(detail) = privileged_role(req.role, crate::ffi::role_powers(req.role)) {
            return LoginOutcome {
                authorized: false,
                authn_id: Some(token.identity.clone()),
                reason: "role_privileged",
                detail,
                token: Some(token),
            };
        }
    }
    LoginOutcome {
        authorized: true,
        authn_id: Some(token.identity.clone()),
        reason: "ok",
        detail: String::new(),
        token: Some(token),
    }
}

/// The audit line for one attempt: outcome, reason code, role, identity, issuer, key, algorithm,
/// fingerprint and time taken. Never the token.
pub fn audit_line(req: &LoginRequest<'_>, out: &LoginOutcome, started: Instant) -> String {
    let (iss, kid, alg, fp) = match &out.token {
        Some(t) => {
            (Some(t.issuer.clone()), t.kid.clone(), Some(t.alg.name().to_owned()), t.fingerprint.clone())
        }
        None => {
            let peek = peek_unverified(req.token);
            (peek.iss, peek.kid, peek.alg, gprxy_core::fingerprint(req.token.as_bytes()))
        }
    };
    let q = |v: Option<&str>| gprxy_core::Quoted::new(v.unwrap_or("-")).to_string();
    // Integer arithmetic: float formatting is code a new backend would fault in for this alone.
    let micros = started.elapsed().as_micros();
    let mut line = format!(
        "gprxy: oauth login {} reason={} role={} authn_id={} iss={} kid={} alg={} token_fp={} client={} database={} elapsed_ms={}.{:03}",
        if out.authorized { "authorized" } else { "refused" },
        out.reason,
        q(Some(req.role)),
        q(out.authn_id.as_deref()),
        q(iss.as_deref()),
        q(kid.as_deref()),
        q(alg.as_deref()),
        fp,
        q(req.client),
        q(req.database),
        micros / 1000,
        micros % 1000,
    );
    if !out.detail.is_empty() {
        line.push_str(&format!(" detail={}", gprxy_core::Quoted::new(&out.detail)));
    }
    line
}
