//! Every `gprxy.*` setting in one place, and their parsing into typed values.
//!
//! All settings are `PGC_SIGHUP`: only postgresql.conf (or ALTER SYSTEM) sets them, never a
//! client. String settings are checked when the file is loaded or reloaded; a bad value is
//! refused with a message naming the setting and the old value stays.

use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gprxy_core::{
    parse_algorithms, Algorithm, CacheSettings, ConfigError, HttpSettings, IdentityForm, Policy,
    RequiredClaims, Setting,
};
use gprxy_core::{IssuerPolicy, IssuerSet, JwksSource, SessionMode, SessionPolicy};
use parking_lot::Mutex;
use pgrx::GucSetting;

type Str = GucSetting<Option<CString>>;

pub static AUDIENCE: Str = Str::new(None);
pub static JWKS_URI: Str = Str::new(None);
pub static AUTHN_CLAIM: Str = Str::new(Some(c"sub"));
pub static AUTHN_ISSUER_QUALIFIED: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static SHARED_SUBJECT_NAMESPACE: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static ROLE_CLAIM: Str = Str::new(None);
pub static ROLE_MAP: Str = Str::new(None);
pub static ALLOWED_ALGORITHMS: Str = Str::new(Some(c"RS256,RS384,RS512,PS256,PS384,PS512,ES256,ES384,EdDSA"));
pub static REQUIRED_SCOPES: Str = Str::new(None);
pub static REQUIRED_CLAIMS: Str = Str::new(None);
pub static ISSUERS_FILE: Str = Str::new(None);
pub static REQUIRE_HBA_SCOPES: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static TOKEN_TYPES: Str = Str::new(Some(c"at+jwt"));
pub static LEEWAY: GucSetting<i32> = GucSetting::<i32>::new(30);
pub static JWKS_CACHE_TTL: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static JWKS_CACHE_TTL_MIN: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static JWKS_CACHE_TTL_MAX: GucSetting<i32> = GucSetting::<i32>::new(86400);
pub static JWKS_MAX_STALENESS: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static JWKS_UNKNOWN_KID_COOLDOWN: GucSetting<i32> = GucSetting::<i32>::new(30);
pub static JWKS_REFRESH_CHECK_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static HTTP_CONNECT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(2000);
pub static HTTP_READ_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(3000);
pub static HTTP_MAX_BODY: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
pub static CA_FILE: Str = Str::new(None);
pub static INSECURE_ALLOW_HTTP_LOOPBACK: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static INSECURE_SKIP_AUDIENCE: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static SESSION_POLICY: Str = Str::new(Some(c"idle"));
pub static PROVISION: Str = Str::new(Some(c"off"));
pub static PROVISION_PREFIX: Str = Str::new(None);
pub static PROVISION_SUFFIX: Str = Str::new(None);
pub static PROVISION_ROLE: Str = Str::new(None);
pub static PROVISION_DATABASE: Str = Str::new(Some(c"postgres"));
pub static PROVISION_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static PROVISION_RECHECK: GucSetting<i32> = GucSetting::<i32>::new(300);
pub static SESSION_GRACE: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static SESSION_IDLE_HARD_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static MAX_SESSION_AGE: GucSetting<i32> = GucSetting::<i32>::new(0);

fn string(s: &Str) -> String {
    s.get().map(|c| c.to_string_lossy().trim().to_owned()).unwrap_or_default()
}

fn list(s: &str) -> Vec<String> {
    s.split([',', ' ', '\t', '\n']).filter(|x| !x.is_empty()).map(str::to_owned).collect()
}

fn secs(v: i32) -> Duration {
    Duration::from_secs(u64::try_from(v).unwrap_or(0))
}

// ---- checks used by the GUC check hooks (pure, so they can be unit-tested) ----

/// `gprxy.allowed_algorithms`.
pub fn check_algorithms(v: &str) -> Result<(), String> {
    match parse_algorithms(v) {
        Ok(a) if a.is_empty() => Err("at least one algorithm is required".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.reason),
    }
}

/// `gprxy.token_types`: a list of `at+jwt` and `JWT`.
pub fn check_token_types(v: &str) -> Result<(), String> {
    let types = list(v);
    if types.is_empty() {
        return Err("at least one token type is required (at+jwt)".into());
    }
    for t in types {
        if !["at+jwt", "application/at+jwt", "jwt"].contains(&t.to_ascii_lowercase().as_str()) {
            return Err(format!("unknown token type {t:?}: use at+jwt and/or JWT"));
        }
    }
    Ok(())
}

/// `gprxy.role_map`: `token_role:db_role` pairs.
pub fn check_role_map(v: &str) -> Result<(), String> {
    parse_role_map(v).map(|_| ())
}

fn parse_role_map(v: &str) -> Result<Vec<(String, String)>, String> {
    list(v)
        .into_iter()
        .map(|pair| match pair.split_once(':') {
            Some((from, to)) if !from.is_empty() && !to.is_empty() => Ok((from.to_owned(), to.to_owned())),
            _ => Err(format!("{pair:?} is not token_role:db_role")),
        })
        .collect()
}

/// `gprxy.required_claims`: `claim = value, claim = true, claim in (a | b)`.
pub fn check_required_claims(v: &str) -> Result<(), String> {
    RequiredClaims::parse(v).map(|_| ())
}

/// A claim name setting (`gprxy.authn_claim`, `gprxy.role_claim`).
pub fn check_claim(v: &str) -> Result<(), String> {
    if v.len() > 256 {
        return Err("claim name longer than 256 bytes".into());
    }
    Ok(())
}

/// `gprxy.jwks_uri`: empty, or an https URL.
pub fn check_url(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    gprxy_core::fetch::check_url(v, true).map_err(|e| e.to_string())
}

/// Largest issuers file read.
const ISSUERS_FILE_MAX: u64 = 1 << 20;

/// The parse of `gprxy.issuers_file` that its check hook made, for its assign hook; and the one
/// in force. A file that does not parse at a reload is refused by the check hook (PostgreSQL
/// logs why and keeps the old value), so the policy in force stays the last good one.
static ISSUERS_PENDING: Mutex<Option<(String, Option<Arc<IssuerSet>>)>> = Mutex::new(None);
static ISSUERS_IN_FORCE: Mutex<Option<Arc<IssuerSet>>> = Mutex::new(None);

/// Why the last non-empty `gprxy.issuers_file` was refused, while no file is in force: a file
/// that is broken when the server starts leaves the setting empty, and then every login is
/// refused with this reason instead of falling back to the one-issuer settings.
static ISSUERS_REFUSED: Mutex<Option<String>> = Mutex::new(None);

/// `gprxy.issuers_file` check hook: empty, or a file of `[[issuer]]` entries that parses and
/// checks (the message names the line or the entry).
pub fn check_issuers_file(v: &str) -> Result<(), String> {
    let parsed = if v.is_empty() {
        None
    } else {
        let text = gprxy_core::fetch::read_policy_file(std::path::Path::new(v), ISSUERS_FILE_MAX)
            .and_then(|text| IssuerSet::from_toml_named(&text, false).map_err(|e| e.to_string()))
            .map_err(|e| format!("{v}: {e}"));
        match text {
            Ok(set) => Some(Arc::new(set)),
            Err(e) => {
                *ISSUERS_REFUSED.lock() = Some(e.clone());
                return Err(e);
            }
        }
    };
    *ISSUERS_PENDING.lock() = Some((v.to_owned(), parsed));
    Ok(())
}

/// `gprxy.issuers_file` assign hook: the checked parse is now in force.
pub fn issuers_file_assigned(v: &str) {
    let mut pending = ISSUERS_PENDING.lock();
    if let Some((path, parsed)) = pending.take() {
        if path == v {
            *ISSUERS_IN_FORCE.lock() = parsed;
            *ISSUERS_REFUSED.lock() = None;
        }
    }
    changed();
}

/// `gprxy.provision`: `off`, `create` or `sync`.
pub fn check_provision(v: &str) -> Result<(), String> {
    gprxy_core::provision::ProvisionMode::parse(v)
        .map(|_| ())
        .ok_or_else(|| "not off, create or sync".to_owned())
}

/// `gprxy.session_policy`: `off`, `idle` or `strict`.
pub fn check_session_policy(v: &str) -> Result<(), String> {
    SessionMode::parse(v)
        .map(|_| ())
        .ok_or_else(|| format!("{v:?} is not a session policy: use {}", SessionMode::NAMES.join(", ")))
}

/// `gprxy.ca_file`: empty, or a readable file.
pub fn check_file(v: &str) -> Result<(), String> {
    if v.is_empty() || std::path::Path::new(v).is_file() {
        Ok(())
    } else {
        Err(format!("{v} is not a readable file"))
    }
}

/// A group role a provisioning policy grants and revokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedGroup<'a> {
    /// Where it is mapped: `entry NAME`, `issuer "URL"` or `gprxy.role_map`.
    pub place: String,
    /// The token's group.
    pub from: &'a str,
    /// The database role.
    pub group: &'a str,
}

/// The settings in force, typed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub audiences: Vec<String>,
    pub skip_audience: bool,
    pub jwks_uri: Option<String>,
    pub authn_claim: String,
    pub issuer_qualified: bool,
    /// The DBA says every issuer of pg_hba.conf issues identities from one namespace (a `sub` of
    /// one is the same person at another): two issuers with plain identities may reach one role.
    pub shared_subject_namespace: bool,
    pub role_claim: Option<String>,
    pub role_map: Vec<(String, String)>,
    pub algorithms: Vec<Algorithm>,
    pub required_scopes: Vec<String>,
    pub required_claims: RequiredClaims,
    pub require_hba_scopes: bool,
    pub accept_generic_typ: bool,
    pub leeway: u64,
    pub cache: CacheSettings,
    pub http: HttpSettings,
    pub refresh_check_interval: Duration,
    /// `gprxy.issuers_file`'s entries: when set, the pg_hba line's issuer selects one, and the
    /// per-issuer settings above are not used (setting them too is refused).
    pub issuers: Option<Arc<IssuerSet>>,
    /// When a session ends after its login (`gprxy.session_policy` and its limits).
    pub session: SessionPolicy,
    /// Roles from groups without an issuers file (`gprxy.provision` and its prefix and suffix).
    pub provision: gprxy_core::provision::ProvisionPolicy,
    /// How long a login waits for the provisioner.
    pub provision_timeout: Duration,
    /// How long a login that changed nothing is not asked again.
    pub provision_recheck: Duration,
}

/// Bumped by every `gprxy.*` setting's assign hook (at definition, and whenever a reload
/// changes one), so that a login parses the settings only when one changed since the last parse.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Called by the settings' assign hooks.
pub fn changed() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// The last parse and the generation it was made at. Filled in the postmaster at preload, so
/// that every backend forked from it starts with the settings parsed.
static PARSED: Mutex<Option<(u64, Parsed)>> = Mutex::new(None);

type Parsed = Result<Arc<Settings>, ConfigError>;

impl Settings {
    /// The settings in force: the last parse while the values are unchanged, else a new one
    /// (after a reload, each backend parses once).
    pub fn current() -> Result<Arc<Self>, ConfigError> {
        let generation = GENERATION.load(Ordering::Relaxed);
        let mut parsed = PARSED.lock();
        if let Some((seen, result)) = parsed.as_ref() {
            if *seen == generation {
                return result.clone();
            }
        }
        let result = Self::parse().map(Arc::new);
        *parsed = Some((generation, result.clone()));
        result
    }

    /// Parses the settings now (the postmaster does at preload; its children inherit the parse).
    pub fn prepare() {
        let _ = Self::current();
    }

    /// Reads the GUCs into typed values.
    fn parse() -> Result<Self, ConfigError> {
        let algorithms = parse_algorithms(&string(&ALLOWED_ALGORITHMS))?;
        let role_map =
            parse_role_map(&string(&ROLE_MAP)).map_err(|r| ConfigError::new(Setting::RoleMap, r))?;
        let required_claims = RequiredClaims::parse(&string(&REQUIRED_CLAIMS))
            .map_err(|r| ConfigError::new(Setting::RequiredClaims, r))?;
        let ca = string(&CA_FILE);
        let jwks_uri = string(&JWKS_URI);
        let s = Self {
            audiences: list(&string(&AUDIENCE)),
            skip_audience: INSECURE_SKIP_AUDIENCE.get(),
            jwks_uri: (!jwks_uri.is_empty()).then_some(jwks_uri),
            authn_claim: string(&AUTHN_CLAIM),
            issuer_qualified: AUTHN_ISSUER_QUALIFIED.get(),
            shared_subject_namespace: SHARED_SUBJECT_NAMESPACE.get(),
            role_claim: Some(string(&ROLE_CLAIM)).filter(|c| !c.is_empty()),
            role_map,
            algorithms,
            required_scopes: list(&string(&REQUIRED_SCOPES)),
            required_claims,
            require_hba_scopes: REQUIRE_HBA_SCOPES.get(),
            accept_generic_typ: list(&string(&TOKEN_TYPES)).iter().any(|t| t.eq_ignore_ascii_case("jwt")),
            leeway: u64::try_from(LEEWAY.get()).unwrap_or(0),
            cache: CacheSettings {
                default_ttl: secs(JWKS_CACHE_TTL.get()),
                min_ttl: secs(JWKS_CACHE_TTL_MIN.get()),
                max_ttl: secs(JWKS_CACHE_TTL_MAX.get()),
                unknown_kid_cooldown: secs(JWKS_UNKNOWN_KID_COOLDOWN.get()),
                max_staleness: secs(JWKS_MAX_STALENESS.get()),
                ..CacheSettings::default()
            },
            http: HttpSettings {
                connect_timeout: Duration::from_millis(
                    u64::try_from(HTTP_CONNECT_TIMEOUT.get()).unwrap_or(0),
                ),
                read_timeout: Duration::from_millis(u64::try_from(HTTP_READ_TIMEOUT.get()).unwrap_or(0)),
                max_body_bytes: usize::try_from(HTTP_MAX_BODY.get()).unwrap_or(0),
                insecure_allow_http_loopback: INSECURE_ALLOW_HTTP_LOOPBACK.get(),
                ca_file: (!ca.is_empty()).then(|| ca.into()),
                // A PostgreSQL process must not start threads (ureq's default resolver would).
                resolve_in_caller_thread: true,
            },
            refresh_check_interval: secs(JWKS_REFRESH_CHECK_INTERVAL.get()),
            issuers: ISSUERS_IN_FORCE.lock().clone(),
            session: SessionPolicy {
                mode: SessionMode::parse(&string(&SESSION_POLICY)).ok_or_else(|| {
                    ConfigError::new(Setting::SessionPolicy, "not off, idle or strict".to_owned())
                })?,
                grace_secs: secs(SESSION_GRACE.get()).as_secs(),
                idle_hard_limit_secs: secs(SESSION_IDLE_HARD_LIMIT.get()).as_secs(),
                max_session_age_secs: Some(secs(MAX_SESSION_AGE.get()).as_secs()).filter(|&a| a > 0),
            },
            provision: gprxy_core::provision::ProvisionPolicy {
                // The check hook refused anything else.
                mode: gprxy_core::provision::ProvisionMode::parse(&string(&PROVISION)).unwrap_or_default(),
                prefix: string(&PROVISION_PREFIX),
                suffix: string(&PROVISION_SUFFIX),
            },
            provision_timeout: Duration::from_millis(u64::try_from(PROVISION_TIMEOUT.get()).unwrap_or(0)),
            provision_recheck: secs(PROVISION_RECHECK.get()),
        };
        if s.issuers.is_none() {
            if let Some(why) = ISSUERS_REFUSED.lock().clone() {
                return Err(ConfigError::new(
                    Setting::Issuers,
                    format!("refused, so no issuer is trusted: {why}"),
                ));
            }
        }
        s.cache.check()?;
        if s.provision.mode != gprxy_core::provision::ProvisionMode::Off && s.role_map.is_empty() {
            return Err(ConfigError::new(
                Setting::RoleMap,
                "gprxy.provision needs it: its targets are the only group roles gprxy grants or revokes",
            ));
        }
        if s.issuers.is_some() {
            s.refuse_global_issuer_settings()?;
        }
        Ok(s)
    }

    /// With an issuers file, the per-issuer settings live in the file: one also set in
    /// postgresql.conf would be ignored, and ignoring a required claim or audience weakens
    /// validation, so it is refused.
    fn refuse_global_issuer_settings(&self) -> Result<(), ConfigError> {
        let d = CacheSettings::default();
        let set: Vec<&str> = [
            (!self.audiences.is_empty(), "gprxy.audience"),
            (self.skip_audience, "gprxy.insecure_skip_audience"),
            (self.jwks_uri.is_some(), "gprxy.jwks_uri"),
            (self.authn_claim != "sub", "gprxy.authn_claim"),
            (self.issuer_qualified, "gprxy.authn_issuer_qualified"),
            (
                self.provision != gprxy_core::provision::ProvisionPolicy::default(),
                "gprxy.provision (and its prefix and suffix)",
            ),
            (self.role_claim.is_some(), "gprxy.role_claim"),
            (self.algorithms != Algorithm::ALL.to_vec(), "gprxy.allowed_algorithms"),
            (!self.required_scopes.is_empty(), "gprxy.required_scopes"),
            (!self.required_claims.is_empty(), "gprxy.required_claims"),
            (self.accept_generic_typ, "gprxy.token_types"),
            (self.leeway != 30, "gprxy.leeway"),
            (!self.role_map.is_empty(), "gprxy.role_map"),
            (self.cache.default_ttl != d.default_ttl, "gprxy.jwks_cache_ttl"),
            (self.cache.min_ttl != d.min_ttl, "gprxy.jwks_cache_ttl_min"),
            (self.cache.max_ttl != d.max_ttl, "gprxy.jwks_cache_ttl_max"),
            (self.cache.max_staleness != d.max_staleness, "gprxy.jwks_max_staleness"),
            (self.cache.unknown_kid_cooldown != d.unknown_kid_cooldown, "gprxy.jwks_unknown_kid_cooldown"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if set.is_empty() {
            return Ok(());
        }
        Err(ConfigError::new(
            Setting::Issuers,
            format!("{} also set: with an issuers file, set them per issuer in the file", set.join(", ")),
        ))
    }

    /// The entry a login's pg_hba line selects: by its `validator.entry` (PostgreSQL 19), which
    /// must be an entry of the line's issuer, else by the issuer alone, which must then have one
    /// entry. None without a file (the gprxy.* settings).
    pub fn select(&self, issuer: &str, entry: Option<&str>) -> Result<Option<&IssuerPolicy>, ConfigError> {
        let Some(set) = &self.issuers else {
            return match entry {
                Some(_) => Err(ConfigError::new(
                    Setting::EntryName,
                    "names an entry, but gprxy.issuers_file is not set".to_owned(),
                )),
                None => Ok(None),
            };
        };
        let Some(name) = entry else {
            if set.entries_of(issuer) > 1 {
                return Err(ConfigError::new(
                    Setting::Issuers,
                    format!("several entries of the pg_hba.conf line's issuer {issuer:?}: pick one with validator.entry"),
                ));
            }
            return self.entry(issuer);
        };
        let Some(found) = set.named(name) else {
            return Err(ConfigError::new(
                Setting::EntryName,
                "names no entry of the issuers file".to_owned(),
            ));
        };
        if found.issuer() != gprxy_core::jwks::issuer_id(issuer).unwrap_or_else(|_| issuer.to_owned()) {
            return Err(ConfigError::new(
                Setting::EntryName,
                format!(
                    "names an entry of issuer {:?}, not of the pg_hba.conf line's issuer {issuer:?}",
                    found.issuer()
                ),
            ));
        }
        Ok(Some(found))
    }

    /// The issuers file's first entry for `issuer`, which says where its keys come from (None
    /// without a file; an error when the file does not name it).
    pub fn entry(&self, issuer: &str) -> Result<Option<&IssuerPolicy>, ConfigError> {
        let Some(set) = &self.issuers else { return Ok(None) };
        set.get(issuer).map(Some).ok_or_else(|| {
            ConfigError::new(
                Setting::Issuers,
                format!("the pg_hba.conf line's issuer {issuer:?} is not in the issuers file"),
            )
        })
    }

    /// Where `issuer`'s keys come from and its cache bounds.
    pub fn key_source(
        &self,
        issuer: &str,
    ) -> Result<(JwksSource, CacheSettings, Option<std::path::PathBuf>), ConfigError> {
        Ok(match self.entry(issuer)? {
            Some(e) => {
                (e.source.clone(), e.cache.clone(), e.ca_file.clone().or_else(|| self.http.ca_file.clone()))
            }
            None => (
                JwksSource::for_issuer(issuer, self.jwks_uri.clone()),
                self.cache.clone(),
                self.http.ca_file.clone(),
            ),
        })
    }

    /// The policy for a login that matched a pg_hba line with this issuer, entry (PostgreSQL
    /// 19's `validator.entry`) and scope.
    pub fn policy(
        &self,
        issuer: &str,
        entry: Option<&str>,
        hba_scope: Option<&str>,
    ) -> Result<Policy, ConfigError> {
        // `openid` asks for an ID token; access tokens need not repeat it.
        let hba_scopes: Vec<String> = match (self.require_hba_scopes, hba_scope) {
            (true, Some(scope)) => list(scope).into_iter().filter(|s| s != "openid").collect(),
            _ => Vec::new(),
        };
        if let Some(entry) = self.select(issuer, entry)? {
            return Ok(entry.policy.with_required_scopes(hba_scopes));
        }
        let mut scopes = self.required_scopes.clone();
        scopes.extend(hba_scopes);
        // pg_hba.conf's well-known form stands for its issuer: tokens name that one.
        let issuer = gprxy_core::jwks::issuer_id(issuer).map_err(|e| ConfigError::new(Setting::Issuer, e))?;
        Policy::builder(issuer)
            .audiences(self.audiences.clone())
            .insecure_skip_audience(self.skip_audience)
            .algorithms(self.algorithms.clone())
            .leeway_secs(self.leeway)
            .required_scopes(scopes)
            .accept_generic_typ(self.accept_generic_typ)
            .identity_claim(self.authn_claim.clone())
            .identity_form(if self.issuer_qualified {
                IdentityForm::IssuerQualified
            } else {
                IdentityForm::Plain
            })
            .role_claim(self.role_claim.clone())
            .required_claims(self.required_claims.clone())
            .build()
    }

    /// Whether `issuer`'s identities are plain (its entry's form, else `gprxy.authn_issuer_qualified`):
    /// an issuer the issuers file does not name is plain here (its logins are refused anyway).
    pub fn plain_identities(&self, issuer: &str) -> bool {
        match &self.issuers {
            Some(set) => set.get(issuer).is_none_or(|e| e.policy.identity_form() == IdentityForm::Plain),
            None => !self.issuer_qualified,
        }
    }

    /// How `issuer`'s logins provision roles: its entry's policy, else `gprxy.provision`.
    pub fn provision(&self, issuer: &str, entry: Option<&str>) -> gprxy_core::provision::ProvisionPolicy {
        match &self.issuers {
            Some(_) => {
                self.select(issuer, entry).ok().flatten().map(|e| e.provision.clone()).unwrap_or_default()
            }
            None => self.provision.clone(),
        }
    }

    /// Every group role a provisioning policy manages, with where it is mapped (an issuers-file
    /// entry's name, else its issuer, or `gprxy.role_map`) and the token group mapped to it.
    pub fn provisioned_groups(&self) -> Vec<ManagedGroup<'_>> {
        use gprxy_core::provision::ProvisionMode;
        match &self.issuers {
            Some(set) => set
                .iter()
                .filter(|e| e.provision.mode != ProvisionMode::Off)
                .flat_map(|e| {
                    let place = e
                        .name
                        .clone()
                        .map_or_else(|| format!("issuer {:?}", e.issuer()), |n| format!("entry {n}"));
                    e.role_map.iter().map(move |(from, to)| ManagedGroup {
                        place: place.clone(),
                        from,
                        group: to,
                    })
                })
                .collect(),
            None if self.provision.mode != ProvisionMode::Off => self
                .role_map
                .iter()
                .map(|(from, to)| ManagedGroup { place: "gprxy.role_map".to_owned(), from, group: to })
                .collect(),
            None => Vec::new(),
        }
    }

    /// Every group role any role map can grant (every entry's, or `gprxy.role_map`).
    pub fn all_role_map_targets(&self) -> Vec<&str> {
        match &self.issuers {
            Some(set) => set.iter().flat_map(|e| e.role_map.iter().map(|(_, to)| to.as_str())).collect(),
            None => self.role_map.iter().map(|(_, to)| to.as_str()).collect(),
        }
    }

    /// The token-role to database-role pairs for `issuer`: its entry's `role_map` with an
    /// issuers file (another issuer's never applies), else `gprxy.role_map`.
    pub fn role_map(&self, issuer: &str, entry: Option<&str>) -> &[(String, String)] {
        match &self.issuers {
            Some(_) => self.select(issuer, entry).ok().flatten().map_or(&[][..], |e| &e.role_map),
            None => &self.role_map,
        }
    }

    /// The database roles a token's roles grant in delegated mode: mapped through the
    /// issuer's role map when there is one, else taken as they are.
    pub fn granted_db_roles(&self, issuer: &str, entry: Option<&str>, token_roles: &[String]) -> Vec<String> {
        gprxy_core::issuers::map_roles(self.role_map(issuer, entry), token_roles)
    }
}

/// A setting as postgresql.conf (or pg_hba.conf) spells it.
pub fn guc_name(setting: Setting) -> &'static str {
    match setting {
        Setting::Issuer => "pg_hba.conf issuer",
        Setting::EntryName => "pg_hba.conf validator.entry",
        Setting::Audience => "gprxy.audience",
        Setting::Algorithms => "gprxy.allowed_algorithms",
        Setting::Leeway => "gprxy.leeway",
        Setting::MaxTokenBytes => "gprxy.max_token_bytes",
        Setting::IdentityClaim => "gprxy.authn_claim",
        Setting::RoleClaim => "gprxy.role_claim",
        Setting::RequiredClaims => "gprxy.required_claims",
        Setting::RoleMap => "gprxy.role_map",
        Setting::JwksUri => "gprxy.jwks_uri",
        Setting::CaFile => "gprxy.ca_file",
        Setting::CacheTtl => "gprxy.jwks_cache_ttl",
        Setting::CacheTtlMin => "gprxy.jwks_cache_ttl_min",
        Setting::CacheTtlMax => "gprxy.jwks_cache_ttl_max",
        Setting::UnknownKidCooldown => "gprxy.jwks_unknown_kid_cooldown",
        Setting::Backoff => "gprxy.jwks_backoff",
        Setting::ScopeClaim => "scope_claim",
        Setting::MaxTokenAge => "max_token_age_secs",
        Setting::TokenTypes => "gprxy.token_types",
        Setting::JwksFile => "jwks_file",
        Setting::Profile => "profile",
        Setting::Issuers => "gprxy.issuers_file",
        Setting::SessionPolicy => "gprxy.session_policy",
        Setting::Introspection => "introspection",
    }
}

/// A configuration error as the server log should say it (settings by their GUC names).
pub fn describe(e: &ConfigError) -> String {
    e.spelled(guc_name)
}

#[cfg(test)]
impl Settings {
    /// The defaults of every GUC, with this audience (no GUC is read).
    pub fn for_tests(audience: &str) -> Self {
        Self {
            audiences: vec![audience.to_owned()],
            skip_audience: false,
            jwks_uri: None,
            authn_claim: "sub".into(),
            issuer_qualified: false,
            shared_subject_namespace: false,
            provision: gprxy_core::provision::ProvisionPolicy::default(),
            provision_timeout: Duration::from_secs(5),
            provision_recheck: Duration::from_secs(300),
            role_claim: None,
            role_map: Vec::new(),
            algorithms: Algorithm::ALL.to_vec(),
            required_scopes: Vec::new(),
            required_claims: RequiredClaims::default(),
            require_hba_scopes: true,
            accept_generic_typ: false,
            leeway: 30,
            cache: CacheSettings::default(),
            http: HttpSettings::default(),
            refresh_check_interval: Duration::from_secs(10),
            issuers: None,
            session: SessionPolicy::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pg_hba_lines_validator_entry_selects_an_entry_of_its_issuer() {
        let file = r#"
[[issuer]]
issuer = "https://a.example"
name = "reporting"
audience = ["reporting"]

[[issuer]]
issuer = "https://a.example"
name = "billing"
audience = ["billing"]
role_map = { admin = "billing_admin" }

[[issuer]]
issuer = "https://b.example"
name = "b"
audience = ["b"]
"#;
        let mut s = Settings::for_tests("");
        let err = |r: Result<Option<&IssuerPolicy>, ConfigError>| describe(&r.map(|_| ()).unwrap_err());
        assert_eq!(
            err(s.select("https://a.example", Some("billing"))),
            "pg_hba.conf validator.entry: names an entry, but gprxy.issuers_file is not set"
        );
        assert!(s.select("https://a.example", None).unwrap().is_none());
        s.issuers = Some(Arc::new(IssuerSet::from_toml_named(file, false).unwrap()));
        let pick = |issuer, entry| s.select(issuer, entry).unwrap().and_then(|p| p.name.clone());
        assert_eq!(pick("https://a.example", Some("billing")).as_deref(), Some("billing"));
        assert_eq!(pick("https://a.example", Some("reporting")).as_deref(), Some("reporting"));
        assert_eq!(pick("https://b.example", None).as_deref(), Some("b"));
        assert_eq!(
            err(s.select("https://a.example", None)),
            "gprxy.issuers_file: several entries of the pg_hba.conf line's issuer \"https://a.example\": pick one with validator.entry"
        );
        assert_eq!(
            err(s.select("https://a.example", Some("payroll"))),
            "pg_hba.conf validator.entry: names no entry of the issuers file"
        );
        assert_eq!(
            err(s.select("https://b.example", Some("billing"))),
            "pg_hba.conf validator.entry: names an entry of issuer \"https://a.example\", not of the pg_hba.conf line's issuer \"https://b.example\""
        );
        // The entry's role map is the one used; without a pick there is no policy.
        let roles = ["admin".to_owned()];
        assert_eq!(s.granted_db_roles("https://a.example", Some("billing"), &roles), ["billing_admin"]);
        assert_eq!(s.granted_db_roles("https://a.example", Some("reporting"), &roles), ["admin"]);
        assert!(s.policy("https://a.example", Some("billing"), None).is_ok());
        assert!(s.policy("https://a.example", None, None).is_err());
    }

    #[test]
    fn checks() {
        assert!(check_algorithms("RS256, ES256").is_ok());
        assert!(check_algorithms("HS256").unwrap_err().contains("never allowed"));
        assert!(check_algorithms("").unwrap_err().contains("at least one"));
        assert!(check_session_policy("strict").is_ok());
        assert_eq!(
            check_session_policy("always").unwrap_err(),
            "\"always\" is not a session policy: use off, idle, strict"
        );
        assert!(check_token_types("at+jwt, JWT").is_ok());
        assert!(check_token_types("id_token").unwrap_err().contains("unknown token type"));
        assert!(check_role_map("admin:app_admin, writer:app_writer").is_ok());
        assert!(check_role_map("admin").unwrap_err().contains("token_role:db_role"));
        assert!(check_url("https://idp/jwks").is_ok());
        assert!(check_url("ftp://idp/jwks").is_err());
        assert!(check_file("/nonexistent/ca.pem").is_err());
        assert!(check_required_claims(
            "repository_owner = acme, email_verified = true, env in (prod|staging)"
        )
        .is_ok());
        assert_eq!(check_required_claims("email_verified = false").unwrap_err(), "claim \"email_verified\": only true can be required of a boolean (write \"false\" for the string)");
    }
}
