//! One OAuth login: validate the bearer token for the pg_hba line that matched, decide, audit.
//!
//! Keys come from a per-backend [`JwksCache`] per issuer, which shares its keys and fetch
//! bookkeeping with every other backend through shared memory when the library is preloaded
//! ([`crate::shared`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gprxy_core::{
    peek_claim, peek_unverified, ConfigError, Introspector, JwksCache, JwksSource, KeySource, LazyFetcher,
    SessionMode, SessionPlan, SystemClock, TokenMode, ValidatedToken, Validator,
};
use parking_lot::Mutex;

use crate::role_powers::{privileged_role, RolePowers};
use crate::settings::Settings;

/// What PostgreSQL tells us about the login.
pub struct LoginRequest<'a> {
    pub token: &'a str,
    pub role: &'a str,
    pub hba_issuer: Option<&'a str>,
    pub hba_scope: Option<&'a str>,
    /// The pg_hba line's `validator.entry` (PostgreSQL 19; None on 18).
    pub hba_entry: Option<&'a str>,
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
    /// When the session this login opens ends (`gprxy.session_policy`), if it does.
    pub session_end: Option<SessionEnd>,
}

/// A session's planned end, with what the client reads and the audit line's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    pub plan: SessionPlan,
    pub message: String,
    pub audit: String,
}

impl SessionEnd {
    fn new(plan: SessionPlan, mode: SessionMode, role: &str, token: &ValidatedToken) -> Self {
        let q = |v: &str| gprxy_core::Quoted::new(v).to_string();
        let audit = format!(
            "gprxy: event={} policy={} role={} authn_id={} sub={} iss={} token_fp={}",
            plan.reason.event(),
            mode.name(),
            q(role),
            q(&token.identity),
            q(token.subject.as_deref().unwrap_or("-")),
            q(&token.issuer),
            token.fingerprint,
        );
        Self { plan, message: plan.reason.client_message(), audit }
    }
}

/// A pg_hba line's `validator.entry` and scope.
type EntryScope = (Option<String>, Option<String>);

/// What one issuer needs per login, built on its first login in this backend and kept while
/// the settings are the same parse.
struct IssuerState {
    settings: Arc<Settings>,
    cache: Arc<JwksCache>,
    /// By the pg_hba line's entry (`validator.entry`) and scope.
    validators: Vec<(EntryScope, Arc<Validator>)>,
    mode: TokenMode,
    introspector: Option<Arc<Introspector>>,
}

/// How one login's token is checked: the issuer's keys, its validator for the pg_hba line's
/// scope, its token mode and, for introspection, its introspector.
pub struct IssuerCheck {
    pub keys: Arc<dyn KeySource>,
    pub validator: Arc<Validator>,
    pub mode: TokenMode,
    pub introspector: Option<Arc<Introspector>>,
}

/// Per-backend state by issuer (a handful: a list needs no hashing). A backend is
/// single-threaded; the mutex only satisfies `static`.
static ISSUERS: Mutex<Vec<(String, IssuerState)>> = Mutex::new(Vec::new());

impl IssuerState {
    fn new(settings: &Arc<Settings>, issuer: &str) -> Result<Self, ConfigError> {
        // One attempt is at most a discovery request and a key set request.
        let (source, cache_settings, ca_file) = settings.key_source(issuer)?;
        let http = gprxy_core::HttpSettings { ca_file, ..settings.http.clone() };
        let attempt_budget = (http.connect_timeout + http.read_timeout) * 2 + Duration::from_secs(1);
        // A key set file is each backend's to read (after a reload, again): nothing to share.
        let local = matches!(source, JwksSource::File { .. });
        let fetcher = Arc::new(LazyFetcher::new(http.clone()));
        let cache = JwksCache::new(
            source,
            fetcher.clone(),
            Arc::new(SystemClock),
            cache_settings,
            http.insecure_allow_http_loopback,
        )?;
        let cache = if local {
            cache
        } else {
            cache.with_share(Arc::new(crate::shared::ShmShare::new(issuer)), attempt_budget)
        };
        let entry = settings.entry(issuer)?;
        let mode = entry.map_or(TokenMode::Jwt, |e| e.mode);
        let introspector = entry.and_then(|e| e.introspection.clone()).map(|i| {
            Arc::new(Introspector::new(issuer, i, fetcher, Arc::new(crate::answers::ShmAnswers::new())))
        });
        Ok(Self {
            settings: settings.clone(),
            cache: Arc::new(cache),
            validators: Vec::new(),
            mode,
            introspector,
        })
    }
}

/// Runs `f` on the backend's state for `issuer` under `settings`, rebuilt when the settings were
/// parsed anew (the keys carry over, except a key set file's: see `JwksCache::import`).
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

/// How this backend checks `issuer`'s tokens for the pg_hba line's entry and scope.
fn issuer_check(
    settings: &Arc<Settings>,
    issuer: &str,
    hba_entry: Option<&str>,
    hba_scope: Option<&str>,
) -> Result<IssuerCheck, ConfigError> {
    with_issuer(settings, issuer, |state| {
        let found = state
            .validators
            .iter()
            .find(|((entry, scope), _)| entry.as_deref() == hba_entry && scope.as_deref() == hba_scope);
        let validator = match found {
            Some((_, v)) => v.clone(),
            None => {
                let v = Arc::new(Validator::new(settings.policy(issuer, hba_entry, hba_scope)?));
                state
                    .validators
                    .push(((hba_entry.map(str::to_owned), hba_scope.map(str::to_owned)), v.clone()));
                v
            }
        };
        Ok(IssuerCheck {
            keys: state.cache.clone(),
            validator,
            mode: state.mode,
            introspector: state.introspector.clone(),
        })
    })
}

/// What a login looks up in the server beside the token.
pub trait Server {
    /// A role's powers (None: no such role).
    fn role_powers(&self, role: &str) -> Option<RolePowers>;
    /// The issuers of pg_hba.conf's oauth lines that can reach `role` (None: unreadable).
    fn hba_issuers_for_role(&self, role: &str) -> Option<Vec<String>>;
    /// Has the provisioner make or update a person's role (refused: the reason and detail).
    fn provision(
        &self,
        req: &crate::provision::Request,
        settings: &Settings,
    ) -> Result<(), (&'static str, String)>;
    /// Whether the same request was provisioned within `gprxy.provision_recheck`.
    fn provisioned_lately(&self, req: &crate::provision::Request, settings: &Settings) -> bool;
}

/// The running server: the catalog and pg_hba.conf.
struct Live;

impl Server for Live {
    fn role_powers(&self, role: &str) -> Option<RolePowers> {
        crate::ffi::role_powers(role)
    }
    fn hba_issuers_for_role(&self, role: &str) -> Option<Vec<String>> {
        crate::ffi::hba_issuers_for_role(role)
    }
    fn provision(
        &self,
        req: &crate::provision::Request,
        settings: &Settings,
    ) -> Result<(), (&'static str, String)> {
        crate::provision::request(req, settings.provision_timeout)
    }
    fn provisioned_lately(&self, req: &crate::provision::Request, settings: &Settings) -> bool {
        crate::provision::remembered(req, settings.provision_recheck)
    }
}

/// A person's own role in delegated mode with provisioning on (None: this login is not one).
/// The token's mapped groups that the role map manages are what the role should be a member of;
/// a group with powers beyond its grants is never granted.
fn provision_own_role(
    req: &LoginRequest<'_>,
    settings: &Settings,
    issuer: &str,
    token: &ValidatedToken,
    granted: &[String],
    server: &impl Server,
) -> Option<Result<(), (&'static str, String)>> {
    use gprxy_core::provision::{role_name, ProvisionMode};
    let policy = settings.provision(issuer, req.hba_entry);
    if policy.mode == ProvisionMode::Off {
        return None;
    }
    let own = match role_name(&policy, &token.identity) {
        Ok(own) => own,
        // Not a person's own role: the group roles stay reachable as before.
        Err(_) if granted.iter().any(|g| g == req.role) => return None,
        Err(why) => return Some(Err(("provision_refused", why))),
    };
    if own != req.role {
        return None;
    }
    // A person never takes a group's name, even one the DBA has not made yet (the group's later
    // grants would be theirs): such a login is a group-role login, as without provisioning.
    if settings.all_role_map_targets().contains(&own.as_str()) {
        return None;
    }
    let managed: Vec<&String> = settings.role_map(issuer, req.hba_entry).iter().map(|(_, to)| to).collect();
    let wanted: Vec<String> = granted.iter().filter(|g| managed.contains(g)).cloned().collect();
    let request = crate::provision::Request {
        mode: policy.mode,
        role: own,
        issuer: token.issuer.clone(),
        identity: token.identity.clone(),
        entry: req.hba_entry.map(str::to_owned),
        wanted,
    };
    // Nothing changes: a shared-memory lookup, no catalog scan. (A group that gained powers since
    // is still caught: the login's own role is then a member of it, which the check of the role
    // itself refuses.)
    if server.provisioned_lately(&request, settings) {
        return Some(Ok(()));
    }
    for group in &request.wanted {
        if let Some(why) = privileged_role(group, server.role_powers(group)) {
            return Some(Err(("provision_privileged_group", why)));
        }
    }
    Some(server.provision(&request, settings))
}

/// Why logging `issuer`'s token in as `role` would make one person of two (None: it would not).
/// Two issuers whose pg_hba lines can reach one role, either with plain identities, are one
/// namespace to pg_ident, to `gprxy.identity()` and to the RLS policies written on it: one's
/// `alice` is the other's. Refused unless `gprxy.shared_subject_namespace` says they are one
/// namespace; pg_hba.conf that cannot be read is refused too (fail closed).
fn shared_role(settings: &Settings, issuer: &str, role: &str, server: &impl Server) -> Option<String> {
    if settings.shared_subject_namespace {
        return None;
    }
    // With an issuers file of one entry (or only qualified ones), no second plain issuer can
    // log in at all: pg_hba.conf need not be read.
    let can_differ = match &settings.issuers {
        Some(set) => set.len() > 1 && set.iter().any(|e| settings.plain_identities(e.issuer())),
        None => !settings.issuer_qualified,
    };
    if !can_differ {
        return None;
    }
    let Some(reaching) = server.hba_issuers_for_role(role) else {
        return Some(
            "pg_hba.conf could not be read to check which other issuers can reach the role".to_owned(),
        );
    };
    // One issuer on two lines, once as a well-known metadata URL, is one issuer.
    let id = |i: &str| gprxy_core::jwks::issuer_id(i).unwrap_or_else(|_| i.to_owned());
    let mut issuers: Vec<String> = vec![id(issuer)];
    for other in reaching.iter().map(|i| id(i)) {
        if !issuers.contains(&other) {
            issuers.push(other);
        }
    }
    if issuers.len() < 2 || !issuers.iter().any(|i| settings.plain_identities(i)) {
        return None;
    }
    // The audit line shows the first 128 characters of a detail: the other issuers first, the
    // remedies in README ("Two issuers, one role").
    let others: Vec<String> = issuers.iter().skip(1).map(|i| format!("{i:?}")).collect();
    Some(format!(
        "role {role:?} is also reached with plain identities by issuer {} (see gprxy.shared_subject_namespace)",
        others.join(", ")
    ))
}

fn deny(reason: &'static str, detail: String, authn_id: Option<String>) -> LoginOutcome {
    LoginOutcome { authorized: false, authn_id, reason, detail, token: None, session_end: None }
}

/// Validates and decides with the settings in force, this backend's keys, and the catalog.
pub fn decide(req: &LoginRequest<'_>) -> LoginOutcome {
    let settings = match Settings::current() {
        Ok(s) => s,
        Err(e) => return deny("config", crate::settings::describe(&e), None),
    };
    let check_for = |issuer: &str, entry: Option<&str>, scope: Option<&str>| {
        issuer_check(&settings, issuer, entry, scope)
    };
    decide_with(req, &settings, check_for, &Live, gprxy_core::unix_time())
}

/// The decision itself, given the settings, where an issuer's keys and validator come from,
/// how a role's powers are looked up, and the time. Never panics on bad input; every refusal
/// has a reason code.
pub fn decide_with(
    req: &LoginRequest<'_>,
    settings: &Settings,
    check_for: impl FnOnce(&str, Option<&str>, Option<&str>) -> Result<IssuerCheck, ConfigError>,
    server: &impl Server,
    now: i64,
) -> LoginOutcome {
    // Who tried, for the log, even when the token is refused (never used for a decision).
    let unverified_id = || peek_claim(req.token, &settings.authn_claim);
    let Some(issuer) = req.hba_issuer.filter(|i| !i.is_empty()) else {
        return deny("config", "the pg_hba.conf line has no issuer".into(), unverified_id());
    };
    let check = match check_for(issuer, req.hba_entry, req.hba_scope) {
        Ok(found) => found,
        Err(e) => return deny("config", crate::settings::describe(&e), unverified_id()),
    };
    let result = gprxy_core::validate_token(
        check.mode,
        &check.validator,
        &*check.keys,
        check.introspector.as_deref(),
        req.token,
        now,
    );
    let token = match result {
        Ok(t) => t,
        Err(e) => return deny(e.code(), e.to_string(), unverified_id()),
    };
    // Before anything is provisioned: a refused login makes nothing.
    if let Some(detail) = shared_role(settings, issuer, req.role, server) {
        return LoginOutcome {
            authorized: false,
            authn_id: Some(token.identity.clone()),
            reason: "issuers_share_role",
            detail,
            token: Some(token),
            session_end: None,
        };
    }
    if req.delegated {
        let granted = settings.granted_db_roles(issuer, req.hba_entry, &token.roles);
        let provisioned = provision_own_role(req, settings, issuer, &token, &granted, server);
        if let Some(Err((reason, detail))) = provisioned {
            return LoginOutcome {
                authorized: false,
                authn_id: Some(token.identity.clone()),
                reason,
                detail,
                token: Some(token),
                session_end: None,
            };
        }
        if provisioned.is_none() && !granted.iter().any(|r| r == req.role) {
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
                session_end: None,
            };
        }
        if let Some(detail) = privileged_role(req.role, server.role_powers(req.role)) {
            return LoginOutcome {
                authorized: false,
                authn_id: Some(token.identity.clone()),
                reason: "role_privileged",
                detail,
                token: Some(token),
                session_end: None,
            };
        }
    }
    // Whole seconds, rounded up: a session never ends before max_session_age has passed.
    let login_at = u64::try_from(now).unwrap_or(0).saturating_add(1);
    let session_end = settings
        .session
        .plan(login_at, u64::try_from(token.expires_at).ok())
        .map(|plan| SessionEnd::new(plan, settings.session.mode, req.role, &token));
    // A token inside the leeway past its exp would be let in only to be ended at once.
    if let Some(end) = session_end.as_ref().filter(|e| e.plan.end_at <= u64::try_from(now).unwrap_or(0)) {
        let detail = format!(
            "the token expired at {} and gprxy.session_policy = {} ends its session then",
            gprxy_core::session::UtcTime(u64::try_from(token.expires_at).unwrap_or(0)),
            settings.session.mode.name()
        );
        debug_assert!(matches!(end.plan.reason, gprxy_core::EndReason::TokenExpired { .. }));
        return LoginOutcome {
            authorized: false,
            authn_id: Some(token.identity.clone()),
            reason: "expired",
            detail,
            token: Some(token),
            session_end: None,
        };
    }
    // gprxy.roles() means the same in both modes: the roles after the issuer's role map.
    let mut token = token;
    token.roles = settings.granted_db_roles(issuer, req.hba_entry, &token.roles);
    LoginOutcome {
        authorized: true,
        authn_id: Some(token.identity.clone()),
        reason: "ok",
        detail: String::new(),
        token: Some(token),
        session_end,
    }
}

/// The audit line for one attempt: outcome, reason code, role, identity, issuer, key, algorithm,
/// fingerprint and time taken. Never the token.
pub fn audit_line(req: &LoginRequest<'_>, out: &LoginOutcome, started: Instant) -> String {
    let (iss, kid, alg, fp) = match &out.token {
        Some(t) => {
            (Some(t.issuer.clone()), t.kid.clone(), t.alg.map(|a| a.name().to_owned()), t.fingerprint.clone())
        }
        None => {
            let peek = peek_unverified(req.token);
            (peek.iss, peek.kid, peek.alg, gprxy_core::fingerprint(req.token.as_bytes()))
        }
    };
    let q = |v: Option<&str>| gprxy_core::Quoted::new(v.unwrap_or("-")).to_string();
    // Integer arithmetic: float formatting is code a new backend would fault in for this alone.
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
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
    if let Some(entry) = req.hba_entry {
        line.push_str(&format!(" entry={}", gprxy_core::Quoted::new(entry)));
    }
    if !out.detail.is_empty() {
        line.push_str(&format!(" detail={}", gprxy_core::Quoted::new(&out.detail)));
    }
    line
}

/// A refusal's reason and detail for PostgreSQL 19's `ValidatorModuleResult.error_detail`,
/// which the server puts as the DETAIL of its own authentication failure line (server log
/// only, never to the client). None for a login that succeeded.
#[cfg_attr(not(oauth_hba_options), allow(dead_code))]
pub fn error_detail(out: &LoginOutcome) -> Option<String> {
    if out.authorized {
        return None;
    }
    Some(if out.detail.is_empty() {
        format!("gprxy: {}", out.reason)
    } else {
        format!("gprxy: {}: {}", out.reason, out.detail)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gprxy_core::testkit::{jwks, now, TestKey};
    use gprxy_core::KeySet;
    use serde_json::json;

    const ISSUER: &str = "https://idp.example/";

    fn settings() -> Settings {
        let mut s = Settings::for_tests("db");
        s.role_claim = Some("roles".into());
        s
    }

    fn token(key: &TestKey, claims: serde_json::Value) -> String {
        let mut c = json!({"iss": ISSUER, "aud": "db", "sub": "alice", "exp": now() + 300, "scope": "openid db", "roles": ["app_reader"]});
        c.as_object_mut().unwrap().extend(claims.as_object().unwrap().clone());
        key.token(json!({"alg": key.default_alg(), "kid": key.kid, "typ": "at+jwt"}), &c)
    }

    fn request<'a>(token: &'a str, role: &'a str, delegated: bool) -> LoginRequest<'a> {
        LoginRequest {
            token,
            role,
            hba_issuer: Some(ISSUER),
            hba_scope: Some("openid db"),
            hba_entry: None,
            delegated,
            client: Some("127.0.0.1"),
            database: Some("app"),
        }
    }

    /// A server whose roles have `powers` and whose pg_hba.conf has oauth lines of `hba`'s
    /// issuers reaching every role (None: unreadable).
    struct FakeServer {
        powers: Option<RolePowers>,
        hba: Option<Vec<String>>,
    }

    impl Server for FakeServer {
        fn role_powers(&self, _role: &str) -> Option<RolePowers> {
            self.powers.clone()
        }
        fn hba_issuers_for_role(&self, _role: &str) -> Option<Vec<String>> {
            self.hba.clone()
        }
        fn provision(
            &self,
            _req: &crate::provision::Request,
            _s: &Settings,
        ) -> Result<(), (&'static str, String)> {
            Err(("provision_unavailable", "no provisioner in unit tests".into()))
        }
        fn provisioned_lately(&self, _req: &crate::provision::Request, _s: &Settings) -> bool {
            false
        }
    }

    /// A server whose provisioner records each request and answers `answer`; `powerful` roles
    /// have CREATEROLE.
    struct Provisioner {
        asked: parking_lot::Mutex<Vec<crate::provision::Request>>,
        answer: Result<(), (&'static str, String)>,
        powerful: Vec<&'static str>,
    }

    impl Server for Provisioner {
        fn role_powers(&self, role: &str) -> Option<RolePowers> {
            let mut p = ordinary()?;
            p.create_role = self.powerful.contains(&role);
            Some(p)
        }
        fn hba_issuers_for_role(&self, _role: &str) -> Option<Vec<String>> {
            Some(vec![ISSUER.to_owned()])
        }
        fn provision(
            &self,
            req: &crate::provision::Request,
            _s: &Settings,
        ) -> Result<(), (&'static str, String)> {
            self.asked.lock().push(req.clone());
            self.answer.clone()
        }
        fn provisioned_lately(&self, req: &crate::provision::Request, _s: &Settings) -> bool {
            self.answer.is_ok() && self.asked.lock().contains(req)
        }
    }

    /// #29: delegated mode with `sync`: a login as the person's own role (prefix + identity) asks
    /// the provisioner for the managed groups the token names (never an unmapped role), a login as
    /// a group role does not; a managed group with powers is refused before asking; the
    /// provisioner's refusal is the login's.
    #[test]
    fn a_persons_own_role_is_provisioned_with_the_managed_groups_named() {
        use gprxy_core::provision::{ProvisionMode, ProvisionPolicy};
        let key = TestKey::p256("k1");
        let t = token(&key, json!({"roles": ["eng", "ops", "intern"]}));
        let mut s = settings();
        s.role_map = vec![("eng".into(), "app_reader".into()), ("ops".into(), "app_writer".into())];
        s.provision =
            ProvisionPolicy { mode: ProvisionMode::Sync, prefix: "u_".into(), suffix: String::new() };
        let server =
            |answer, powerful| Provisioner { asked: parking_lot::Mutex::new(Vec::new()), answer, powerful };
        let ok = server(Ok(()), vec![]);
        let out = decide_on_server(&request(&t, "u_alice", true), &s, &key, &ok);
        assert_eq!((out.authorized, out.reason), (true, "ok"));
        assert_eq!(
            ok.asked.lock().clone(),
            vec![crate::provision::Request {
                mode: ProvisionMode::Sync,
                role: "u_alice".into(),
                issuer: ISSUER.into(),
                identity: "alice".into(),
                entry: None,
                wanted: vec!["app_reader".into(), "app_writer".into()],
            }]
        );
        // A group role, as before: no provisioning.
        let group = server(Ok(()), vec![]);
        assert!(decide_on_server(&request(&t, "app_reader", true), &s, &key, &group).authorized);
        assert!(group.asked.lock().is_empty());
        // Someone else's role: neither provisioned nor granted.
        let other = server(Ok(()), vec![]);
        assert_eq!(
            decide_on_server(&request(&t, "u_bob", true), &s, &key, &other).reason,
            "role_not_granted"
        );
        assert!(other.asked.lock().is_empty());
        // A managed group with CREATEROLE is never granted.
        let powerful = server(Ok(()), vec!["app_writer"]);
        let out = decide_on_server(&request(&t, "u_alice", true), &s, &key, &powerful);
        assert_eq!(out.reason, "provision_privileged_group");
        assert!(powerful.asked.lock().is_empty());
        // The provisioner's refusal.
        let refused = server(Err(("provision_collision", "role \"u_alice\" exists".into())), vec![]);
        let out = decide_on_server(&request(&t, "u_alice", true), &s, &key, &refused);
        assert_eq!(
            (out.authorized, out.reason, out.detail.as_str()),
            (false, "provision_collision", "role \"u_alice\" exists")
        );
    }

    /// Decides with `key`'s key set and the policy `settings` give for the request's issuer.
    fn decide_for(
        req: &LoginRequest<'_>,
        settings: &Settings,
        key: &TestKey,
        powers: Option<RolePowers>,
    ) -> LoginOutcome {
        decide_on(req, settings, key, &FakeServer { powers, hba: Some(vec![ISSUER.to_owned()]) })
    }

    fn decide_on(
        req: &LoginRequest<'_>,
        settings: &Settings,
        key: &TestKey,
        server: &FakeServer,
    ) -> LoginOutcome {
        decide_on_server(req, settings, key, server)
    }

    fn decide_on_server(
        req: &LoginRequest<'_>,
        settings: &Settings,
        key: &TestKey,
        server: &impl Server,
    ) -> LoginOutcome {
        let keys = KeySet::from_json(jwks(&[key]).to_string().as_bytes()).unwrap();
        let check_for = |issuer: &str, entry: Option<&str>, scope: Option<&str>| {
            Ok(IssuerCheck {
                keys: Arc::new(keys),
                validator: Arc::new(Validator::new(settings.policy(issuer, entry, scope)?)),
                mode: TokenMode::Jwt,
                introspector: None,
            })
        };
        decide_with(req, settings, check_for, server, now())
    }

    fn ordinary() -> Option<RolePowers> {
        Some(RolePowers::ordinary())
    }

    /// Two issuers' pg_hba lines reaching the requested role, with plain identities: refused
    /// with its own reason, naming both; qualified identities, the DBA's shared namespace, or
    /// lines that do not reach the role let it in; an unreadable pg_hba.conf is refused.
    #[test]
    fn two_plain_issuers_reaching_one_role_are_refused() {
        let key = TestKey::p256("k1");
        let t = token(&key, json!({}));
        let req = request(&t, "alice", false);
        let other = "https://other.example".to_owned();
        let both = || FakeServer { powers: ordinary(), hba: Some(vec![ISSUER.to_owned(), other.clone()]) };
        let out = decide_on(&req, &settings(), &key, &both());
        assert_eq!((out.authorized, out.reason), (false, "issuers_share_role"));
        assert!(
            out.detail
                == "role \"alice\" is also reached with plain identities by issuer \"https://other.example\" \
                    (see gprxy.shared_subject_namespace)",
            "{}",
            out.detail
        );

        let mut shared = settings();
        shared.shared_subject_namespace = true;
        assert!(decide_on(&req, &shared, &key, &both()).authorized);

        let mut qualified = settings();
        qualified.issuer_qualified = true;
        let out = decide_on(&req, &qualified, &key, &both());
        assert_eq!((out.authorized, out.authn_id.as_deref()), (true, Some("https://idp.example/#alice")));

        let alone = FakeServer { powers: ordinary(), hba: Some(vec![ISSUER.to_owned(), ISSUER.to_owned()]) };
        assert!(decide_on(&req, &settings(), &key, &alone).authorized);

        let unreadable = FakeServer { powers: ordinary(), hba: None };
        let out = decide_on(&req, &settings(), &key, &unreadable);
        assert_eq!(
            (out.authorized, out.reason, out.detail.as_str()),
            (
                false,
                "issuers_share_role",
                "pg_hba.conf could not be read to check which other issuers can reach the role"
            )
        );
    }

    /// With an issuers file, one plain entry beside a qualified one still makes one namespace
    /// (a plain `sub` may be spelled like a qualified identity); a file of one entry needs no
    /// look at pg_hba.conf at all (no other issuer can log in).
    #[test]
    fn the_issuers_file_decides_which_identities_are_plain() {
        let key = TestKey::p256("k1");
        let t = token(&key, json!({}));
        let req = request(&t, "alice", false);
        let file = |second_qualified: bool| {
            let mut s = settings();
            s.role_claim = None;
            s.audiences.clear();
            s.issuers = Some(Arc::new(
                gprxy_core::IssuerSet::from_toml(
                    &format!(
                        "[[issuer]]\nissuer = \"{ISSUER}\"\naudience = [\"db\"]\nissuer_qualified = true\n\
                         [[issuer]]\nissuer = \"https://other.example\"\naudience = [\"db\"]\nissuer_qualified = {second_qualified}\n"
                    ),
                    false,
                )
                .unwrap(),
            ));
            s
        };
        let both = FakeServer {
            powers: ordinary(),
            hba: Some(vec![ISSUER.to_owned(), "https://other.example".to_owned()]),
        };
        let out = decide_on(&req, &file(false), &key, &both);
        assert_eq!((out.authorized, out.reason), (false, "issuers_share_role"));
        let out = decide_on(&req, &file(true), &key, &both);
        assert_eq!((out.authorized, out.reason), (true, "ok"));

        let mut one = settings();
        one.role_claim = None;
        one.audiences.clear();
        one.issuers = Some(Arc::new(
            gprxy_core::IssuerSet::from_toml(
                &format!("[[issuer]]\nissuer = \"{ISSUER}\"\naudience = [\"db\"]\n"),
                false,
            )
            .unwrap(),
        ));
        let unreadable = FakeServer { powers: ordinary(), hba: None };
        assert_eq!(decide_on(&req, &one, &key, &unreadable).reason, "ok");
    }

    #[test]
    fn a_good_token_is_authorized_with_its_identity() {
        let key = TestKey::p256("k1");
        let t = token(&key, json!({}));
        let out = decide_for(&request(&t, "alice", false), &settings(), &key, None);
        assert_eq!((out.authorized, out.reason, out.authn_id.as_deref()), (true, "ok", Some("alice")));
    }

    #[test]
    fn an_authorized_login_carries_its_sessions_end() {
        use gprxy_core::{EndHow, EndReason, SessionPolicy};
        let key = TestKey::rsa("k1");
        let exp = now() + 300;
        let t = token(&key, json!({"exp": exp}));
        let mut s = settings();
        s.session = SessionPolicy { mode: SessionMode::Strict, grace_secs: 5, ..SessionPolicy::default() };
        let out = decide_for(&request(&t, "alice", false), &s, &key, None);
        let end = out.session_end.expect("strict plans an end");
        assert_eq!(end.plan.end_at, u64::try_from(exp).unwrap() + 5);
        assert_eq!(
            (end.plan.how, end.plan.reason),
            (EndHow::Now, EndReason::TokenExpired { exp: exp as u64 })
        );
        assert!(end.message.starts_with("gprxy: the access token expired at "), "{}", end.message);
        assert!(
            end.audit.starts_with(&format!(
                "gprxy: event=session_expired policy=strict role=\"alice\" authn_id=\"alice\" sub=\"alice\" iss=\"{ISSUER}\" token_fp="
            )),
            "{}",
            end.audit
        );
        assert!(!end.audit.contains(&t) && !end.audit.contains(t.split('.').nth(1).unwrap()));

        s.session.mode = SessionMode::Off;
        assert_eq!(decide_for(&request(&t, "alice", false), &s, &key, None).session_end, None);
        s.session.max_session_age_secs = Some(60);
        let end = decide_for(&request(&t, "alice", false), &s, &key, None).session_end.unwrap();
        assert_eq!(end.plan.reason, EndReason::MaxAge { limit_secs: 60 });
        assert!(end.audit.starts_with("gprxy: event=session_max_age policy=off "), "{}", end.audit);
    }

    #[test]
    fn a_token_inside_the_leeway_is_refused_when_its_session_would_end_at_once() {
        let key = TestKey::rsa("k1");
        let t = token(&key, json!({"exp": now() - 5}));
        let out = decide_for(&request(&t, "alice", false), &settings(), &key, None);
        assert_eq!((out.authorized, out.reason), (false, "expired"));
        assert!(
            out.detail.ends_with("and gprxy.session_policy = idle ends its session then"),
            "{}",
            out.detail
        );
        let mut off = settings();
        off.session.mode = SessionMode::Off;
        let out = decide_for(&request(&t, "alice", false), &off, &key, None);
        assert!(out.authorized, "with the policy off the leeway admits it, as before");
    }

    #[test]
    fn a_refused_login_plans_no_end() {
        let key = TestKey::rsa("k1");
        let t = token(&key, json!({"roles": []}));
        let out = decide_for(&request(&t, "app_reader", true), &settings(), &key, ordinary());
        assert_eq!((out.authorized, out.reason), (false, "role_not_granted"));
        assert_eq!(out.session_end, None);
    }

    #[test]
    fn refusals_carry_the_validation_reason() {
        let key = TestKey::ed25519("k1");
        let expired = token(&key, json!({"exp": now() - 3600}));
        let out = decide_for(&request(&expired, "alice", false), &settings(), &key, None);
        assert_eq!((out.authorized, out.reason), (false, "expired"));
        assert_eq!(out.authn_id.as_deref(), Some("alice"), "the log names who tried");
        let other_issuer = token(&key, json!({"iss": "https://evil.example/"}));
        let out = decide_for(&request(&other_issuer, "alice", false), &settings(), &key, None);
        assert_eq!(out.reason, "iss_mismatch");
        let forged = token(&TestKey::ed25519("k1"), json!({}));
        let out = decide_for(&request(&forged, "alice", false), &settings(), &key, None);
        assert_eq!((out.authorized, out.reason), (false, "bad_signature"));
        let no_scope = token(&key, json!({"scope": "openid"}));
        let out = decide_for(&request(&no_scope, "alice", false), &settings(), &key, None);
        assert_eq!(out.reason, "scope_missing");
    }

    #[test]
    fn a_pg_hba_line_without_issuer_is_a_configuration_refusal() {
        let key = TestKey::p256("k1");
        let t = token(&key, json!({}));
        let mut req = request(&t, "alice", false);
        req.hba_issuer = None;
        let out = decide_for(&req, &settings(), &key, None);
        assert_eq!(
            (out.authorized, out.reason, out.detail.as_str()),
            (false, "config", "the pg_hba.conf line has no issuer")
        );
    }

    #[test]
    fn delegated_mode_grants_only_the_roles_the_token_names() {
        let key = TestKey::rsa("k1");
        let t = token(&key, json!({"roles": ["app_reader"]}));
        let out = decide_for(&request(&t, "app_reader", true), &settings(), &key, ordinary());
        assert_eq!((out.authorized, out.reason), (true, "ok"));
        let out = decide_for(&request(&t, "app_admin", true), &settings(), &key, ordinary());
        assert_eq!((out.authorized, out.reason), (false, "role_not_granted"));
        assert_eq!(out.detail, "role \"app_admin\" is not among the roles the token grants (app_reader)");
        let mut mapped = settings();
        mapped.role_map = vec![("reader".into(), "app_reader".into())];
        let out = decide_for(&request(&t, "app_reader", true), &mapped, &key, ordinary());
        assert_eq!(out.reason, "role_not_granted", "with a role map only mapped roles are granted");
    }

    /// #27 item 1: the session's roles (`gprxy.roles()`) are the mapped ones, as in fallback
    /// mode: with `admin:app_admin` a token naming `admin` and `intern` has `app_admin` only.
    #[test]
    fn the_sessions_roles_are_the_mapped_roles() {
        let key = TestKey::rsa("k1");
        let t = token(&key, json!({"roles": ["admin", "intern"]}));
        let mut mapped = settings();
        mapped.role_map = vec![("admin".into(), "app_admin".into())];
        let out = decide_for(&request(&t, "alice", false), &mapped, &key, ordinary());
        assert_eq!((out.authorized, out.reason), (true, "ok"));
        assert_eq!(out.token.unwrap().roles, vec!["app_admin".to_owned()]);
        let out = decide_for(&request(&t, "alice", false), &settings(), &key, ordinary());
        assert_eq!(
            out.token.unwrap().roles,
            vec!["admin".to_owned(), "intern".to_owned()],
            "no map: as they are"
        );
    }

    #[test]
    fn delegated_mode_never_reaches_a_privileged_role() {
        let key = TestKey::p256("k1");
        let t = token(&key, json!({"roles": ["app_reader"]}));
        let req = request(&t, "app_reader", true);
        let superuser = ordinary().map(|p| RolePowers { superuser: true, bypass_rls: true, ..p });
        let out = decide_for(&req, &settings(), &key, superuser);
        assert_eq!((out.authorized, out.reason), (false, "role_privileged"));
        assert_eq!(
            out.detail,
            "role \"app_reader\" has SUPERUSER, BYPASSRLS: delegated mode never maps a token to such a role"
        );
        let member = ordinary().map(|p| RolePowers { member_of: Some("app_admin".into()), ..p });
        assert_eq!(decide_for(&req, &settings(), &key, member).reason, "role_privileged");
        let out = decide_for(&req, &settings(), &key, None);
        assert_eq!(out.detail, "role \"app_reader\" was not found in pg_authid");
    }

    #[test]
    fn the_audit_line_never_holds_the_token() {
        let key = TestKey::p256("k1");
        let t = token(&key, json!({}));
        let req = request(&t, "alice", false);
        let out = decide_for(&req, &settings(), &key, None);
        let line = audit_line(&req, &out, std::time::Instant::now());
        assert!(
            line.starts_with("gprxy: oauth login authorized reason=ok role=\"alice\" authn_id=\"alice\""),
            "{line}"
        );
        assert!(!line.contains(&t) && !line.contains(t.rsplit('.').next().unwrap()), "{line}");
        assert!(line.contains(&format!("token_fp={}", gprxy_core::fingerprint(t.as_bytes()))));
    }

    #[test]
    fn a_refusals_error_detail_is_its_reason_and_detail_and_a_success_has_none() {
        let out = deny("aud_mismatch", "token audience is not accepted".into(), Some("alice".into()));
        assert_eq!(
            error_detail(&out).as_deref(),
            Some("gprxy: aud_mismatch: token audience is not accepted")
        );
        assert_eq!(error_detail(&deny("config", String::new(), None)).as_deref(), Some("gprxy: config"));
        let ok = LoginOutcome { authorized: true, reason: "ok", ..deny("ok", String::new(), None) };
        assert_eq!(error_detail(&ok), None);
    }
}
