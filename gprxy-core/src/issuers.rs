//! Issuer policies: which issuers are trusted and what each one's tokens must satisfy, in one
//! format both front ends read: the validator's `gprxy.issuers_file` (`[[issuer]]` tables) and
//! gprxy.toml's `[[fallback.issuers]]`, with the same keys.
//!
//! An entry is chosen by exact issuer (the pg_hba line's `issuer=`, or fallback mode's token's
//! unverified `iss`) and the token is then validated against that entry alone: another issuer's
//! keys, audience or claims never apply, also when two issuers publish the same `kid`.
//!
//! A `profile` fills in a provider's defaults (token types, scope claim, role claim, identity
//! claim) and refuses an entry that lacks what the provider needs to be safe: a GitHub Actions
//! issuer serves every repository on GitHub, so its entry must pin `repository_owner`; Google
//! signs tokens for every Google account, so its entry must pin a Workspace domain (`hd`) or the
//! addresses allowed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::algorithm::Algorithm;
use crate::error::{ConfigError, Setting};
use crate::introspect::{IntrospectionEntry, IntrospectionSettings, TokenMode};
use crate::jwks::{CacheSettings, JwksSource};
use crate::policy::{parse_algorithms, IdentityForm, Policy};
use crate::required::{Constraint, RequiredClaim, RequiredClaims};

const GITHUB_ACTIONS: &str = "https://token.actions.githubusercontent.com";
const GOOGLE: &str = "https://accounts.google.com";
/// Entra ID's tenant of personal Microsoft accounts.
const ENTRA_CONSUMERS_TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";

/// A provider whose defaults and requirements an entry takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Microsoft Entra ID (v2.0 tokens of one tenant).
    Entra,
    /// Okta (a custom authorization server).
    Okta,
    /// Auth0.
    Auth0,
    /// Keycloak (one realm).
    Keycloak,
    /// Google ID tokens.
    Google,
    /// Kubernetes service-account tokens.
    Kubernetes,
    /// GitHub Actions OIDC tokens.
    GithubActions,
}

impl Profile {
    /// The name as written in a file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Entra => "entra",
            Self::Okta => "okta",
            Self::Auth0 => "auth0",
            Self::Keycloak => "keycloak",
            Self::Google => "google",
            Self::Kubernetes => "kubernetes",
            Self::GithubActions => "github-actions",
        }
    }

    /// Defaults: (token types, scope claim, identity claim, role claim, issuer-qualified).
    fn defaults(
        self,
    ) -> (&'static [&'static str], Option<&'static str>, &'static str, Option<&'static str>, bool) {
        const GENERIC: &[&str] = &["at+jwt", "JWT"];
        match self {
            Self::Entra => (GENERIC, Some("scp"), "oid", Some("roles"), false),
            Self::Okta => (GENERIC, Some("scp"), "sub", Some("groups"), false),
            Self::Auth0 => (GENERIC, Some("scope"), "sub", None, false),
            Self::Keycloak => (GENERIC, Some("scope"), "sub", Some("realm_access.roles"), false),
            Self::Google => (GENERIC, None, "email", None, false),
            Self::Kubernetes => (GENERIC, None, "sub", None, false),
            // One issuer for every repository on GitHub: identities are issuer-qualified.
            Self::GithubActions => (GENERIC, None, "sub", None, true),
        }
    }

    /// The profile whose requirements an issuer URL implies whatever the entry says: issuers
    /// that serve everyone (GitHub Actions, Google) are never trusted unpinned.
    fn implied_by(issuer: &str) -> Option<Self> {
        match issuer {
            GITHUB_ACTIONS => Some(Self::GithubActions),
            GOOGLE => Some(Self::Google),
            _ if issuer.starts_with("https://login.microsoftonline.com/") => Some(Self::Entra),
            _ => None,
        }
    }

    /// Refuses an issuer URL of the wrong form, and an entry without what the provider needs.
    fn check(self, issuer: &str, required: &[RequiredClaim]) -> Result<(), String> {
        let pinned = |claim: &str| required.iter().any(|r| r.claim() == claim);
        let host_path = issuer.strip_prefix("https://").unwrap_or("");
        match self {
            Self::Entra => {
                let tenant = host_path
                    .strip_prefix("login.microsoftonline.com/")
                    .and_then(|rest| rest.strip_suffix("/v2.0"))
                    .ok_or("an Entra ID issuer is https://login.microsoftonline.com/<tenant id>/v2.0")?;
                if ["common", "organizations", "consumers"].contains(&tenant) || tenant.contains('/') {
                    return Err(format!(
                        "{tenant:?} is not one tenant: tokens of every tenant would match (use the tenant id)"
                    ));
                }
                // The tenant of every personal Microsoft account: anyone can have a token there.
                if tenant.eq_ignore_ascii_case(ENTRA_CONSUMERS_TENANT) {
                    return Err(format!(
                        "{tenant:?} is the personal-accounts tenant: every Microsoft account holder has tokens there (use your organisation's tenant id)"
                    ));
                }
            }
            Self::Okta if !host_path.contains("/oauth2/") => {
                return Err("an Okta issuer is a custom authorization server, https://<org>/oauth2/<id> (the org server's tokens are for Okta's own APIs)".into());
            }
            Self::Auth0 if !issuer.ends_with('/') => {
                return Err("an Auth0 issuer ends with / (https://<tenant>.auth0.com/)".into());
            }
            Self::Keycloak if !host_path.contains("/realms/") => {
                return Err("a Keycloak issuer is https://<host>/realms/<realm>".into());
            }
            Self::Google => {
                if issuer != GOOGLE {
                    return Err("Google's issuer is https://accounts.google.com".into());
                }
                if !pinned("hd") && !pinned("email") {
                    return Err("required_claims must pin hd (the Workspace domain) or list the allowed email addresses: Google signs tokens for every Google account".into());
                }
            }
            Self::Kubernetes if !pinned("kubernetes.io.namespace") => {
                return Err("required_claims must pin kubernetes.io.namespace: any pod of the cluster can ask for a token with your audience".into());
            }
            Self::GithubActions => {
                if issuer != GITHUB_ACTIONS && !issuer.ends_with("/_services/token") {
                    return Err("GitHub Actions' issuer is https://token.actions.githubusercontent.com (GitHub Enterprise Server: https://<host>/_services/token)".into());
                }
                if !pinned("repository_owner") && !pinned("repository_owner_id") {
                    return Err("required_claims must pin repository_owner (or repository_owner_id): the issuer serves every repository on GitHub".into());
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Key cache bounds of one issuer, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCacheEntry {
    /// Freshness without `max-age`.
    pub cache_ttl_secs: Option<u64>,
    /// Lower bound on freshness.
    pub cache_ttl_min_secs: Option<u64>,
    /// Upper bound on freshness.
    pub cache_ttl_max_secs: Option<u64>,
    /// Least time between refetches caused by unknown `kid`s.
    pub unknown_kid_cooldown_secs: Option<u64>,
    /// How long past expiry the last good keys serve during an outage.
    pub max_staleness_secs: Option<u64>,
}

impl KeyCacheEntry {
    /// The bounds, with the defaults for what is not written (unchecked: see
    /// [`CacheSettings::check`]).
    pub fn settings(&self) -> CacheSettings {
        let d = CacheSettings::default();
        let secs = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_secs);
        CacheSettings {
            default_ttl: secs(self.cache_ttl_secs, d.default_ttl),
            min_ttl: secs(self.cache_ttl_min_secs, d.min_ttl),
            max_ttl: secs(self.cache_ttl_max_secs, d.max_ttl),
            unknown_kid_cooldown: secs(self.unknown_kid_cooldown_secs, d.unknown_kid_cooldown),
            max_staleness: secs(self.max_staleness_secs, d.max_staleness),
            ..d
        }
    }
}

/// One issuer's entry as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerEntry {
    /// The issuer, exactly as tokens name it.
    pub issuer: String,
    /// A name a PostgreSQL 19 pg_hba line picks the entry by (`validator.entry=NAME`): letters,
    /// digits, `.`, `_` and `-`, unique in the file. Several entries of one issuer are allowed
    /// when all are named (the validator only; see [`IssuerSet::from_toml_named`]).
    pub name: Option<String>,
    /// A provider's defaults and requirements.
    pub profile: Option<Profile>,
    /// Accepted audiences (one must be in `aud`).
    #[serde(default)]
    pub audience: Vec<String>,
    /// Signature algorithms (default: every asymmetric one).
    pub allowed_algorithms: Option<Vec<String>>,
    /// Accepted `typ` headers: `at+jwt`, and `JWT` (which also admits no `typ`).
    pub token_types: Option<Vec<String>>,
    /// Accept tokens bound to a key (`cnf`) as bearer tokens (default false: refused as
    /// `token_bound`).
    pub accept_bound_tokens: Option<bool>,
    /// The claim that is the identity (default `sub`, or the profile's).
    pub identity_claim: Option<String>,
    /// The claim that is the identity when that one is absent (`client_id` for
    /// client-credentials tokens whose introspection answer has no `sub`).
    pub identity_fallback_claim: Option<String>,
    /// The identity is `<iss>#<claim>`.
    pub issuer_qualified: Option<bool>,
    /// The claim that lists roles.
    pub role_claim: Option<String>,
    /// Token role → database role (the validator's delegated mode; fallback mode's map then
    /// sees the mapped names).
    #[serde(default)]
    pub role_map: BTreeMap<String, String>,
    /// The one claim that grants scopes (`scp` or `scope`; default: both).
    pub scope_claim: Option<String>,
    /// Scopes every token must grant.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Claims every token must carry: `claim = "value"`, `claim = ["a", "b"]`, `claim = true`.
    #[serde(default)]
    pub required_claims: BTreeMap<String, toml::Value>,
    /// The longest token lifetime (`exp` - `iat`).
    pub max_token_age_secs: Option<u64>,
    /// Allowed clock skew (default 30, at most 300).
    pub leeway_secs: Option<u64>,
    /// The key set URL (default: discovery from the issuer).
    pub jwks_uri: Option<String>,
    /// A key set file on this host instead of any network (air-gapped).
    pub jwks_file: Option<PathBuf>,
    /// A CA bundle for a private issuer.
    pub ca_file: Option<PathBuf>,
    /// Key cache bounds.
    #[serde(default)]
    pub keys: KeyCacheEntry,
    /// How tokens are checked: `jwt` (default), `introspect` or `jwt+introspect`.
    pub tokens: Option<TokenMode>,
    /// The introspection endpoint and gprxy's client there (RFC 7662).
    pub introspection: Option<IntrospectionEntry>,
    /// Roles from groups (the validator, delegated mode): `off` (default), `create`, `sync`.
    pub provision: Option<crate::provision::ProvisionMode>,
    /// Put before the identity in a provisioned role's name.
    pub provision_prefix: Option<String>,
    /// Put after it.
    pub provision_suffix: Option<String>,
}

/// One issuer's checked policy.
#[derive(Debug, Clone)]
pub struct IssuerPolicy {
    /// The entry's name, if it has one.
    pub name: Option<String>,
    /// The profile it took, if any.
    pub profile: Option<Profile>,
    /// The well-known metadata URL the entry was configured with, if it was (its keys and
    /// introspection endpoint are found there; [`IssuerPolicy::issuer`] is the issuer it names).
    pub metadata_url: Option<String>,
    /// What its tokens must satisfy.
    pub policy: Policy,
    /// Where its keys come from.
    pub source: JwksSource,
    /// Token role → database role.
    pub role_map: Vec<(String, String)>,
    /// A CA bundle for a private issuer.
    pub ca_file: Option<PathBuf>,
    /// Key cache bounds.
    pub cache: CacheSettings,
    /// How tokens are checked.
    pub mode: TokenMode,
    /// Introspection, for `introspect` and `jwt+introspect`.
    pub introspection: Option<IntrospectionSettings>,
    /// Roles from groups.
    pub provision: crate::provision::ProvisionPolicy,
}

impl IssuerPolicy {
    /// The issuer.
    pub fn issuer(&self) -> &str {
        self.policy.issuer()
    }

    /// The database roles a token's roles grant: through `role_map` when it has entries, else
    /// as they are.
    pub fn mapped_roles(&self, token_roles: &[String]) -> Vec<String> {
        map_roles(&self.role_map, token_roles)
    }
}

/// A token's roles through a role map (`token role` → `database role`): the mapped names of the
/// roles the map names; with an empty map, the roles as they are.
pub fn map_roles(map: &[(String, String)], token_roles: &[String]) -> Vec<String> {
    if map.is_empty() {
        return token_roles.to_vec();
    }
    map.iter().filter(|(from, _)| token_roles.iter().any(|r| r == from)).map(|(_, to)| to.clone()).collect()
}

/// An entry's name: 1 to 64 letters, digits, `.`, `_` or `-` (a pg_hba option value that needs
/// no quoting).
fn check_entry_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(Setting::EntryName, "use 1 to 64 letters, digits, '.', '_' or '-'".to_owned()))
    }
}

fn token_types(types: &[String]) -> Result<bool, ConfigError> {
    let mut generic = false;
    if types.is_empty() {
        return Err(ConfigError::new(Setting::TokenTypes, "at least one (at+jwt)"));
    }
    for t in types {
        match t.to_ascii_lowercase().as_str() {
            "at+jwt" | "application/at+jwt" => {}
            "jwt" => generic = true,
            _ => {
                return Err(ConfigError::new(
                    Setting::TokenTypes,
                    format!("unknown token type {t:?}: use at+jwt and/or JWT"),
                ))
            }
        }
    }
    Ok(generic)
}

impl IssuerEntry {
    /// Checks the entry (with its profile's defaults and requirements) into a policy.
    /// `skip_audience` is the front end's insecure test switch.
    pub fn check(self, skip_audience: bool) -> Result<IssuerPolicy, ConfigError> {
        let (types, scope_claim, identity_claim, role_claim, qualified) = match self.profile {
            Some(p) => p.defaults(),
            None => (&["at+jwt"][..], None, "sub", None, false),
        };
        let accept_generic = match &self.token_types {
            Some(t) => token_types(t)?,
            None => types.contains(&"JWT"),
        };
        let algorithms: Vec<Algorithm> = match &self.allowed_algorithms {
            Some(list) => parse_algorithms(&list.join(","))?,
            None => Algorithm::ALL.to_vec(),
        };
        let mut required =
            crate::required::from_toml_table(self.required_claims).map_err(|(claim, reason)| {
                ConfigError::new(Setting::RequiredClaims, format!("{claim}: {reason}"))
            })?;
        let identity_claim = self.identity_claim.unwrap_or_else(|| identity_claim.to_owned());
        // A well-known metadata URL stands for its issuer: tokens name that one.
        let issuer =
            crate::jwks::issuer_id(&self.issuer).map_err(|e| ConfigError::new(Setting::Issuer, e))?;
        let metadata_url = (issuer != self.issuer).then(|| self.issuer.clone());
        // A profile's requirements hold for its provider's issuer even when the entry names no
        // profile (or another one).
        let mut checks: Vec<Profile> = self.profile.into_iter().chain(Profile::implied_by(&issuer)).collect();
        checks.dedup();
        for profile in &checks {
            profile.check(&issuer, &required).map_err(|reason| {
                ConfigError::new(Setting::Profile, format!("{}: {reason}", profile.name()))
            })?;
        }
        // An e-mail is only an identity, or a pin, when the address is verified.
        let email_used = identity_claim.trim() == "email" || required.iter().any(|r| r.claim() == "email");
        let verified_pinned = required.iter().any(|r| r.claim() == "email_verified");
        if checks.contains(&Profile::Google) && email_used && !verified_pinned {
            required.push(
                RequiredClaim::new("email_verified", Constraint::IsTrue)
                    .map_err(|e| ConfigError::new(Setting::RequiredClaims, e))?,
            );
        }
        let required =
            RequiredClaims::new(required).map_err(|e| ConfigError::new(Setting::RequiredClaims, e))?;
        let policy = Policy::builder(issuer)
            .audiences(self.audience)
            .insecure_skip_audience(skip_audience)
            .algorithms(algorithms)
            .leeway_secs(self.leeway_secs.unwrap_or(30))
            .required_scopes(self.required_scopes)
            .accept_generic_typ(accept_generic)
            .accept_bound_tokens(self.accept_bound_tokens.unwrap_or(false))
            .identity_claim(identity_claim)
            .identity_fallback_claim(self.identity_fallback_claim)
            .identity_form(if self.issuer_qualified.unwrap_or(qualified) {
                IdentityForm::IssuerQualified
            } else {
                IdentityForm::Plain
            })
            .role_claim(self.role_claim.or(role_claim.map(str::to_owned)))
            .scope_claim(self.scope_claim.or(scope_claim.map(str::to_owned)))
            .required_claims(required)
            .max_token_age_secs(self.max_token_age_secs)
            .build()?;
        let source = match (self.jwks_uri, self.jwks_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(Setting::JwksFile, "give jwks_uri or jwks_file, not both"))
            }
            (None, Some(path)) => {
                crate::jwks::check_key_file_path(&path)?;
                JwksSource::File { path }
            }
            (jwks_uri, None) => JwksSource::for_issuer(&self.issuer, jwks_uri),
        };
        let cache = self.keys.settings();
        cache.check()?;
        let role_map: Vec<(String, String)> = self.role_map.into_iter().collect();
        let mode = self.tokens.unwrap_or_default();
        // http:// is checked again, with the front end's setting, at each request.
        let introspection = match self.introspection {
            Some(entry) => Some(entry.check(mode, true)?),
            None if mode == TokenMode::Jwt => None,
            None => {
                return Err(ConfigError::new(
                    Setting::Introspection,
                    format!("tokens = \"{}\" needs an [introspection] table", mode.name()),
                ))
            }
        };
        let provision = crate::provision::ProvisionPolicy {
            mode: self.provision.unwrap_or_default(),
            prefix: self.provision_prefix.unwrap_or_default(),
            suffix: self.provision_suffix.unwrap_or_default(),
        };
        if provision.mode != crate::provision::ProvisionMode::Off && role_map.is_empty() {
            return Err(ConfigError::new(
                Setting::RoleMap,
                "provision needs a role_map: its targets are the only group roles gprxy grants or revokes",
            ));
        }
        Ok(IssuerPolicy {
            name: self.name,
            profile: self.profile,
            provision,
            metadata_url,
            policy,
            source,
            role_map,
            ca_file: self.ca_file,
            cache,
            mode,
            introspection,
        })
    }
}

/// The trusted issuers, each with its own policy; chosen by exact issuer.
#[derive(Debug, Clone, Default)]
pub struct IssuerSet {
    issuers: Vec<IssuerPolicy>,
}

/// An issuers file: `[[issuer]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuersFile {
    #[serde(default)]
    issuer: Vec<IssuerEntry>,
}

impl IssuerSet {
    /// Checks entries. Refuses a set with no entry, or with one issuer twice.
    pub fn new(entries: Vec<IssuerEntry>, skip_audience: bool) -> Result<Self, IssuersError> {
        Self::build(entries, skip_audience, false)
    }

    /// Checks entries that a pg_hba line may pick by name (the validator on PostgreSQL 19): as
    /// [`IssuerSet::new`], except that one issuer may have several entries when every one of
    /// them is named. The issuer's first entry says where its keys come from and how its tokens
    /// are checked; a later one may not say it again (its keys are the same keys).
    pub fn new_named(entries: Vec<IssuerEntry>, skip_audience: bool) -> Result<Self, IssuersError> {
        Self::build(entries, skip_audience, true)
    }

    fn build(entries: Vec<IssuerEntry>, skip_audience: bool, shared: bool) -> Result<Self, IssuersError> {
        if entries.is_empty() {
            return Err(IssuersError::Empty);
        }
        let mut issuers: Vec<IssuerPolicy> = Vec::with_capacity(entries.len());
        for (i, entry) in entries.into_iter().enumerate() {
            let name = entry.issuer.clone();
            let at = |error| IssuersError::Entry { number: i + 1, issuer: name.clone(), error };
            if let Some(n) = &entry.name {
                check_entry_name(n).map_err(at)?;
                if issuers.iter().any(|p| p.name.as_deref() == Some(n)) {
                    return Err(at(ConfigError::new(
                        Setting::EntryName,
                        "named twice: each entry's name is its own",
                    )));
                }
            }
            let id = crate::jwks::issuer_id(&name).unwrap_or_else(|_| name.clone());
            if let Some(first) = issuers.iter().find(|p| p.issuer() == id) {
                if !shared {
                    return Err(at(ConfigError::new(Setting::Issuer, "named twice")));
                }
                if first.name.is_none() || entry.name.is_none() {
                    return Err(at(ConfigError::new(
                        Setting::Issuer,
                        "named twice: several entries of one issuer must each have a name (pg_hba's validator.entry picks one)",
                    )));
                }
                let keys = [
                    (entry.jwks_uri.is_some(), "jwks_uri"),
                    (entry.jwks_file.is_some(), "jwks_file"),
                    (entry.ca_file.is_some(), "ca_file"),
                    (entry.keys != KeyCacheEntry::default(), "keys"),
                    (entry.tokens.is_some(), "tokens"),
                    (entry.introspection.is_some(), "introspection"),
                ];
                if let Some((_, key)) = keys.iter().find(|(set, _)| *set) {
                    return Err(at(ConfigError::new(
                        Setting::Issuer,
                        format!("{key}: only the issuer's first entry says where its keys come from and how its tokens are checked"),
                    )));
                }
                let first = first.clone();
                let mut policy = entry.check(skip_audience).map_err(at)?;
                policy.source = first.source;
                policy.ca_file = first.ca_file;
                policy.cache = first.cache;
                policy.mode = first.mode;
                policy.introspection = first.introspection;
                issuers.push(policy);
                continue;
            }
            issuers.push(entry.check(skip_audience).map_err(at)?);
        }
        Ok(Self { issuers })
    }

    /// [`IssuerSet::from_toml`] for the validator: entries a pg_hba line may pick by name
    /// ([`IssuerSet::new_named`]).
    pub fn from_toml_named(text: &str, skip_audience: bool) -> Result<Self, IssuersError> {
        let file: IssuersFile =
            toml::from_str(text).map_err(|e| IssuersError::Syntax(toml_error(text, &e)))?;
        Self::new_named(file.issuer, skip_audience)
    }

    /// The entry named `name`.
    pub fn named(&self, name: &str) -> Option<&IssuerPolicy> {
        self.issuers.iter().find(|p| p.name.as_deref() == Some(name))
    }

    /// How many entries `issuer` has (more than one only in a set from [`IssuerSet::new_named`]).
    pub fn entries_of(&self, issuer: &str) -> usize {
        self.issuers.iter().filter(|p| p.issuer() == issuer).count()
    }

    /// A set of policies checked elsewhere (a front end's one-issuer shorthand).
    pub fn from_policies(issuers: Vec<IssuerPolicy>) -> Self {
        Self { issuers }
    }

    /// Parses and checks an issuers file (TOML, `[[issuer]]` tables). A syntax error names its
    /// line; a bad entry names its number and issuer.
    pub fn from_toml(text: &str, skip_audience: bool) -> Result<Self, IssuersError> {
        let file: IssuersFile =
            toml::from_str(text).map_err(|e| IssuersError::Syntax(toml_error(text, &e)))?;
        Self::new(file.issuer, skip_audience)
    }

    /// The policy for tokens of exactly this issuer (its first entry). A well-known metadata URL
    /// (pg_hba.conf's other form of `issuer`) finds the entry of the issuer it stands for,
    /// configured either way.
    pub fn get(&self, issuer: &str) -> Option<&IssuerPolicy> {
        let id = match crate::jwks::issuer_from_well_known(issuer) {
            Ok(Some(id)) => id,
            _ => issuer.to_owned(),
        };
        self.issuers.iter().find(|p| p.issuer() == id || p.metadata_url.as_deref() == Some(issuer))
    }

    /// Every policy, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &IssuerPolicy> {
        self.issuers.iter()
    }

    /// How many issuers.
    pub fn len(&self) -> usize {
        self.issuers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }
}

/// A TOML error as a log line may show it: where it is and what is wrong, without the
/// offending line itself (which may hold a secret written where it does not belong).
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            // The key of a `key = value` line helps and holds no secret; the value is not shown.
            // Named only when it looks like one of gprxy's keys (lower case, a value after `=`):
            // a bare secret such as `AbC...xyz=` pasted on a line of its own is not a key.
            let key = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split_once('='))
                .filter(|(_, v)| !v.trim().is_empty())
                .map(|(k, _)| k.trim())
                .filter(|k| {
                    !k.is_empty()
                        && k.len() <= 48
                        && k.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b))
                })
                .map(|k| format!(" (key {k})"))
                .unwrap_or_default();
            format!("TOML error at line {line}, column {column}{key}: {}", value_free(e.message()))
        }
        None => format!("TOML error: {}", value_free(e.message())),
    }
}

/// A deserializer's message without the value it quotes: serde writes `invalid type: string
/// "<value>", expected u64` and ``unknown variant `<value>`, expected ...``, and a value written
/// under the wrong key may be a secret. What is expected stays (it is the program's, not the
/// file's).
pub fn value_free(message: &str) -> String {
    let message = message.trim_end();
    for head in ["invalid type", "invalid value", "unknown variant", "invalid length"] {
        if let Some(rest) = message.strip_prefix(head) {
            let expected = rest.find(", expected ").map_or("", |i| &rest[i..]);
            return format!("{head}{expected}");
        }
    }
    message.to_owned()
}

/// Why an issuer set cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssuersError {
    /// Not TOML, or a key or value of the wrong kind (the message names the line).
    #[error("{0}")]
    Syntax(String),
    /// No issuer at all.
    #[error("no issuer: every login would be refused")]
    Empty,
    /// One entry is wrong.
    #[error("issuer {number} ({issuer:?}): {error}")]
    Entry {
        /// 1-based position in the file.
        number: usize,
        /// Its issuer.
        issuer: String,
        /// What is wrong.
        error: ConfigError,
    },
}

#[cfg(test)]
mod tests {

    /// #27 item 2: a value under the wrong key is never repeated in the error (it may be a
    /// secret); the line, the key and what was expected are.
    #[test]
    fn an_issuers_file_error_never_repeats_the_value() {
        const MARKER: &str = "MARKER-s3cr3t-41c7";
        let head = "[[issuer]]\nissuer = \"https://idp.example\"\naudience = [\"db\"]\n";
        for (line, key) in [
            (
                format!("[issuer.introspection]\nclient_id = \"c\"\nclient_auth = \"{MARKER}\"\n"),
                "client_auth",
            ),
            (
                format!("[issuer.introspection]\nclient_id = \"c\"\ncache_ttl_max_secs = \"{MARKER}\"\n"),
                "cache_ttl_max_secs",
            ),
            (format!("leeway_secs = \"{MARKER}\"\n"), "leeway_secs"),
            (format!("tokens = \"{MARKER}\"\n"), "tokens"),
            (format!("allowed_algorithms = \"{MARKER}\"\n"), "allowed_algorithms"),
        ] {
            let text = format!("{head}{line}");
            let err = IssuerSet::from_toml(&text, false).map(|_| ()).unwrap_err().to_string();
            assert!(!err.contains(MARKER), "{key}: {err}");
            assert!(err.contains(key) && err.contains("line"), "{key}: {err}");
        }
        // A bare secret on a line of its own (base64 ending in `=`) is not taken for a key.
        let err = IssuerSet::from_toml(&format!("{head}MaRkEr7s3cr3tBase64xyz=\n"), false)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(!err.contains("MaRkEr7s3cr3tBase64xyz"), "{err}");
        assert_eq!(
            value_free("unknown variant `hunter2`, expected `client_secret_basic` or `client_secret_post`"),
            "unknown variant, expected `client_secret_basic` or `client_secret_post`"
        );
        assert_eq!(
            value_free("invalid type: string \"hunter2\", expected u64"),
            "invalid type, expected u64"
        );
    }

    use super::*;

    fn set(text: &str) -> Result<IssuerSet, String> {
        IssuerSet::from_toml(text, false).map_err(|e| e.to_string())
    }

    fn named(text: &str) -> Result<IssuerSet, String> {
        IssuerSet::from_toml_named(text, false).map_err(|e| e.to_string())
    }

    const TWO_OF_A: &str = r#"
[[issuer]]
issuer = "https://a.example"
name = "a-reporting"
audience = ["reporting"]
jwks_uri = "https://a.example/keys"
[issuer.keys]
cache_ttl_secs = 600

[[issuer]]
issuer = "https://a.example"
name = "a-billing"
audience = ["billing"]
role_map = { admin = "billing_admin" }
"#;

    #[test]
    fn named_entries_of_one_issuer_are_picked_by_name_and_share_the_first_ones_keys() {
        let s = named(TWO_OF_A).unwrap();
        assert_eq!(s.entries_of("https://a.example"), 2);
        let (r, b) = (s.named("a-reporting").unwrap(), s.named("a-billing").unwrap());
        assert_eq!((r.issuer(), b.issuer()), ("https://a.example", "https://a.example"));
        assert_eq!(r.policy.audiences, ["reporting"]);
        assert_eq!(b.policy.audiences, ["billing"]);
        assert_eq!(b.role_map, vec![("admin".to_owned(), "billing_admin".to_owned())]);
        assert!(r.role_map.is_empty());
        // The second entry's keys are the first's: one key cache per issuer.
        assert_eq!(format!("{:?}", b.source), format!("{:?}", r.source));
        assert_eq!(b.cache.default_ttl, Duration::from_secs(600));
        assert!(s.named("a-other").is_none());
        // By issuer alone: the first entry.
        assert_eq!(s.get("https://a.example").unwrap().name.as_deref(), Some("a-reporting"));
    }

    #[test]
    fn named_entries_are_refused_where_they_would_be_ambiguous_or_disagree_on_keys() {
        // The proxy's issuers (IssuerSet::new, from_toml): one entry per issuer, names or not.
        assert_eq!(set(TWO_OF_A).unwrap_err(), "issuer 2 (\"https://a.example\"): issuer: named twice");
        let unnamed = TWO_OF_A.replace("name = \"a-billing\"\n", "");
        assert_eq!(
            named(&unnamed).unwrap_err(),
            "issuer 2 (\"https://a.example\"): issuer: named twice: several entries of one issuer must each have a name (pg_hba's validator.entry picks one)"
        );
        let own_keys = TWO_OF_A.replace(
            "audience = [\"billing\"]",
            "audience = [\"billing\"]\njwks_uri = \"https://a.example/other\"",
        );
        assert_eq!(
            named(&own_keys).unwrap_err(),
            "issuer 2 (\"https://a.example\"): issuer: jwks_uri: only the issuer's first entry says where its keys come from and how its tokens are checked"
        );
        let same_name = TWO_OF_A.replace("a-billing", "a-reporting");
        assert_eq!(
            named(&same_name).unwrap_err(),
            "issuer 2 (\"https://a.example\"): name: named twice: each entry's name is its own"
        );
        let bad_name = TWO_OF_A.replace("a-billing", "a billing");
        assert_eq!(
            named(&bad_name).unwrap_err(),
            "issuer 2 (\"https://a.example\"): name: use 1 to 64 letters, digits, '.', '_' or '-'"
        );
    }

    #[test]
    fn entries_are_chosen_by_exact_issuer_with_their_own_settings() {
        let s = set(r#"
[[issuer]]
issuer = "https://a.example/"
audience = ["db"]

[[issuer]]
issuer = "https://b.example"
audience = ["other"]
jwks_file = "/etc/gprxy/b.json"
max_token_age_secs = 3600
"#)
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("https://a.example/").unwrap().policy.audiences, ["db"]);
        assert_eq!(s.get("https://b.example").unwrap().policy.audiences, ["other"]);
        assert!(s.get("https://a.example").is_none(), "exact match only");
        assert!(matches!(s.get("https://b.example").unwrap().source, JwksSource::File { .. }));
    }

    #[test]
    fn errors_name_the_line_or_the_entry() {
        let e = set("[[issuer]]\nissuer = \"https://a\"\naudience = [\"db\"]\nscope = 3\n").unwrap_err();
        assert!(e.contains("line 4") && e.contains("unknown field `scope`"), "{e}");
        let e = set(
            "[[issuer]]\nissuer = \"https://a\"\naudience = [\"db\"]\n[[issuer]]\nissuer = \"https://b\"\n",
        )
        .unwrap_err();
        assert_eq!(e, "issuer 2 (\"https://b\"): audience: at least one accepted audience is required (RFC 9068 section 4)");
        let e = set("[[issuer]]\nissuer = \"https://a\"\naudience = [\"db\"]\n[[issuer]]\nissuer = \"https://a\"\naudience = [\"x\"]\n").unwrap_err();
        assert_eq!(e, "issuer 2 (\"https://a\"): issuer: named twice");
        assert_eq!(set("").unwrap_err(), "no issuer: every login would be refused");
        let e = set("[[issuer]]\nissuer = \"https://a\"\naudience = [\"db\"]\njwks_file = \"keys.json\"\n")
            .unwrap_err();
        assert!(e.ends_with("jwks_file: keys.json is not an absolute path"), "{e}");
        let e = set("[[issuer]]\nissuer = \"https://a\"\naudience = [\"db\"]\nrequired_claims = { verified = false }\n").unwrap_err();
        assert!(e.contains("required_claims: verified: only true can be required"), "{e}");
    }

    #[test]
    fn profiles_refuse_what_is_unsafe_for_their_provider() {
        let one = |profile: &str, issuer: &str, extra: &str| {
            set(&format!(
                "[[issuer]]\nprofile = \"{profile}\"\nissuer = \"{issuer}\"\naudience = [\"db\"]\n{extra}"
            ))
        };
        let e = one("github-actions", "https://token.actions.githubusercontent.com", "").unwrap_err();
        assert!(e.ends_with("profile: github-actions: required_claims must pin repository_owner (or repository_owner_id): the issuer serves every repository on GitHub"), "{e}");
        assert!(one(
            "github-actions",
            "https://token.actions.githubusercontent.com",
            "required_claims = { repository_owner = \"acme\" }"
        )
        .is_ok());
        let e = one("google", "https://accounts.google.com", "").unwrap_err();
        assert!(e.contains("profile: google: required_claims must pin hd"), "{e}");
        let e = one("entra", "https://login.microsoftonline.com/common/v2.0", "").unwrap_err();
        assert!(e.contains("\"common\" is not one tenant"), "{e}");
        let e = one("auth0", "https://acme.auth0.com", "").unwrap_err();
        assert!(e.contains("an Auth0 issuer ends with /"), "{e}");
        let e = one("okta", "https://acme.okta.com", "").unwrap_err();
        assert!(e.contains("custom authorization server"), "{e}");
        let e = one("keycloak", "https://kc.example.com/auth", "").unwrap_err();
        assert!(e.contains("/realms/<realm>"), "{e}");
        let e =
            set("[[issuer]]\nprofile = \"ping\"\nissuer = \"https://a\"\naudience = [\"db\"]\n").unwrap_err();
        assert!(
            e.contains("(key profile): unknown variant, expected one of `entra`") && !e.contains("ping"),
            "{e}"
        );
        let e = one("entra", &format!("https://login.microsoftonline.com/{ENTRA_CONSUMERS_TENANT}/v2.0"), "")
            .unwrap_err();
        assert!(e.contains("is the personal-accounts tenant"), "{e}");
        let e = one("kubernetes", "https://k8s.example", "").unwrap_err();
        assert!(e.ends_with("profile: kubernetes: required_claims must pin kubernetes.io.namespace: any pod of the cluster can ask for a token with your audience"), "{e}");
        assert!(one(
            "kubernetes",
            "https://k8s.example",
            "required_claims = { \"kubernetes.io.namespace\" = \"payments\" }"
        )
        .is_ok());
    }

    /// A file that decides who logs in is read only when it is a regular file nobody else can
    /// write.
    #[test]
    fn policy_files_must_be_regular_and_not_writable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("issuers.toml");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(crate::fetch::read_policy_file(&file, 10).unwrap(), "x");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(
            crate::fetch::read_policy_file(&file, 10).unwrap_err(),
            "writable by its group or others (mode 666): chmod go-w"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(crate::fetch::read_policy_file(&file, 0).unwrap_err(), "larger than 0 bytes");
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert_eq!(crate::fetch::read_policy_file(&fifo, 10).unwrap_err(), "not a regular file");
        assert_eq!(crate::fetch::read_policy_file(dir.path(), 10).unwrap_err(), "not a regular file");
    }

    /// GitHub's and Google's issuers serve everyone: their pins are required whatever the
    /// entry's profile, and a Google e-mail pin needs a verified address.
    #[test]
    fn an_everyone_issuer_needs_its_pins_without_a_profile() {
        let plain = |issuer: &str, extra: &str| {
            set(&format!("[[issuer]]\nissuer = \"{issuer}\"\naudience = [\"db\"]\n{extra}"))
        };
        let e = plain("https://token.actions.githubusercontent.com", "").unwrap_err();
        assert!(e.contains("profile: github-actions: required_claims must pin repository_owner"), "{e}");
        let e = set("[[issuer]]\nprofile = \"kubernetes\"\nissuer = \"https://accounts.google.com\"\naudience = [\"db\"]\nrequired_claims = { \"kubernetes.io.namespace\" = \"x\" }\n").unwrap_err();
        assert!(e.contains("profile: google: required_claims must pin hd"), "{e}");
        let e = plain("https://login.microsoftonline.com/common/v2.0", "").unwrap_err();
        assert!(e.contains("\"common\" is not one tenant"), "{e}");
        let s =
            plain("https://accounts.google.com", "required_claims = { email = [\"a@x.example\"] }").unwrap();
        let required = s.iter().next().unwrap().policy.required_claims().clone();
        assert!(required.iter().any(|r| r.claim() == "email_verified"), "{required:?}");
    }

    #[test]
    fn profile_defaults_can_be_overridden() {
        let s = set(r#"
[[issuer]]
profile = "entra"
issuer = "https://login.microsoftonline.com/11111111-2222-4333-8444-555555555555/v2.0"
audience = ["api://db"]
identity_claim = "preferred_username"
"#)
        .unwrap();
        let p = &s.iter().next().unwrap().policy;
        assert_eq!(p.identity_claim.as_str(), "preferred_username");
        assert_eq!(p.scope_claim.as_ref().map(|c| c.as_str()), Some("scp"));
        assert!(p.accept_generic_typ);
    }

    /// #29: an entry's provisioning, and its need of a role map (whose targets are the only
    /// groups gprxy grants or revokes).
    #[test]
    fn provisioning_is_per_entry_and_needs_a_role_map() {
        use crate::provision::{ProvisionMode, ProvisionPolicy};
        let s = set(r#"
[[issuer]]
issuer = "https://idp.example"
audience = ["db"]
provision = "sync"
provision_prefix = "u_"
role_map = { eng = "app_reader" }
"#)
        .unwrap();
        assert_eq!(
            s.get("https://idp.example").unwrap().provision,
            ProvisionPolicy { mode: ProvisionMode::Sync, prefix: "u_".into(), suffix: String::new() }
        );
        let e = set(
            "[[issuer]]\nissuer = \"https://idp.example\"\naudience = [\"db\"]\nprovision = \"create\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("provision needs a role_map"), "{e}");
        let e = set(
            "[[issuer]]\nissuer = \"https://idp.example\"\naudience = [\"db\"]\nprovision = \"always\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown variant") && !e.contains("always"), "{e}");
    }
}
