//! Configuration: a TOML file (unknown keys refused) plus CLI flags and environment variables,
//! checked once into typed values. A missing or bad file stops start-up with the line at fault.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    #[serde(default)]
    reuse_port: bool,
    upstream: Option<String>,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    upstream_tls: FileUpstreamTls,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    bridge: FileBridge,
    #[serde(default)]
    session: FileSession,
    fallback: Option<FileFallback>,
}

/// `[session]`: when a session ends after login (gprxy_core::session).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileSession {
    policy: Option<SessionModeName>,
    grace_secs: Option<u64>,
    idle_hard_limit_secs: Option<u64>,
    /// Absent or 0: no limit.
    max_session_age_secs: Option<u64>,
    /// Pass-through: the role gprxy logs in as to end a server process whose statement
    /// survived the cancel (a member of `pg_signal_backend`).
    terminate_user: Option<String>,
    terminate_password_file: Option<PathBuf>,
    terminate_database: Option<String>,
}

/// `session.policy` by its word (`off`, `idle`, `strict`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
struct SessionModeName(gprxy_core::SessionMode);

impl TryFrom<String> for SessionModeName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        // Exact spelling, as the other enumerated settings.
        match gprxy_core::SessionMode::parse(&s) {
            Some(mode) if mode.name() == s => Ok(Self(mode)),
            _ => Err("session.policy: must be off, idle or strict".to_owned()),
        }
    }
}

/// Pass-through: who ends a server process that outlived its session's cancel.
#[derive(Clone)]
pub struct Terminator {
    /// The role (a member of `pg_signal_backend`).
    pub user: String,
    /// Its password (SCRAM-SHA-256), from `terminate_password_file`.
    pub password: String,
    /// The database it connects to (default `postgres`).
    pub database: String,
}

impl std::fmt::Debug for Terminator {
    /// Never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl FileSession {
    fn terminator(&self) -> anyhow::Result<Option<Terminator>> {
        match (&self.terminate_user, &self.terminate_password_file) {
            (None, None) if self.terminate_database.is_none() => Ok(None),
            (Some(user), Some(path)) => {
                let password = std::fs::read_to_string(path)
                    .context("session.terminate_password_file: cannot read the file")?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned();
                let database = self.terminate_database.clone().unwrap_or_else(|| "postgres".to_owned());
                Ok(Some(Terminator { user: user.clone(), password, database }))
            }
            _ => bail!("session: give terminate_user and terminate_password_file together"),
        }
    }

    fn policy(self) -> gprxy_core::SessionPolicy {
        let d = gprxy_core::SessionPolicy::default();
        gprxy_core::SessionPolicy {
            mode: self.policy.map_or(d.mode, |p| p.0),
            grace_secs: self.grace_secs.unwrap_or(d.grace_secs),
            idle_hard_limit_secs: self.idle_hard_limit_secs.unwrap_or(d.idle_hard_limit_secs),
            max_session_age_secs: self.max_session_age_secs.filter(|&s| s > 0),
        }
    }
}

/// `[fallback]`: the proxy validates tokens itself and logs in upstream as a service account.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFallback {
    /// Several issuers, each with its own policy (the same keys as the validator's issuers file).
    #[serde(default)]
    issuers: Vec<gprxy_core::IssuerEntry>,
    // One issuer, the shorthand: these keys, or `issuers`.
    issuer: Option<String>,
    audience: Option<Vec<String>>,
    jwks_uri: Option<String>,
    identity_claim: Option<String>,
    role_claim: Option<String>,
    accept_jwt_typ: Option<bool>,
    /// Accept tokens bound to a key (`cnf`) as bearer tokens (default false).
    accept_bound_tokens: Option<bool>,
    /// The DBA says two issuers that reach one account issue identities from one namespace (a
    /// `sub` of one is the same person at the other).
    #[serde(default)]
    shared_subject_namespace: bool,
    #[serde(default)]
    insecure_allow_http_loopback: bool,
    #[serde(default)]
    user_must_match: UserMatch,
    #[serde(default)]
    client_auth: ClientAuth,
    #[serde(default = "default_scope")]
    scope: String,
    #[serde(default)]
    map: Vec<FileRule>,
    #[serde(default)]
    accounts: std::collections::BTreeMap<String, FileAccount>,
    context: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default = "default_true")]
    signed_context: bool,
    context_key_file: Option<PathBuf>,
    #[serde(default)]
    pool: FilePool,
    /// `[fallback.keys]`: the one issuer's key cache (same meaning as the extension's
    /// gprxy.jwks_*).
    #[serde(default)]
    keys: gprxy_core::issuers::KeyCacheEntry,
    /// Claim = a string, a list of strings (one of them), or true.
    #[serde(default)]
    required_claims: std::collections::BTreeMap<String, toml::Value>,
}

/// `[fallback.required_claims]` as gprxy-core's constraints (the same as the extension's
/// `gprxy.required_claims`).
fn required_claims(
    table: std::collections::BTreeMap<String, toml::Value>,
) -> anyhow::Result<gprxy_core::RequiredClaims> {
    let list = gprxy_core::required::from_toml_table(table)
        .map_err(|(claim, reason)| anyhow::anyhow!("fallback.required_claims.{claim}: {reason}"))?;
    gprxy_core::RequiredClaims::new(list).map_err(|e| anyhow::anyhow!("fallback.required_claims: {e}"))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FilePool {
    default_size: Option<usize>,
    #[serde(default)]
    sizes: std::collections::BTreeMap<String, usize>,
    wait_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_lifetime_ms: Option<u64>,
}

/// An upstream given as a path is the server's Unix socket; anything else is host:port.
fn is_unix_socket(upstream: &str) -> bool {
    upstream.starts_with('/')
}

fn default_true() -> bool {
    true
}

fn default_scope() -> String {
    "openid".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    role: String,
    account: String,
    /// Only tokens of this issuer (with several issuers, whose role names may collide).
    issuer: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAccount {
    password_env: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default)]
    require: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileUpstreamTls {
    #[serde(default)]
    enabled: bool,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_client_connections: Option<usize>,
    login_timeout_ms: Option<u64>,
    upstream_connect_timeout_ms: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    worker_threads: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLog {
    format: Option<LogFormat>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileBridge {
    #[serde(default)]
    token_as_password: bool,
}

/// Pool limits.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Size per service account (others get `default_size`).
    pub sizes: BTreeMap<String, usize>,
    /// Size when an account has none.
    pub default_size: usize,
    /// How long a client waits for a free connection.
    pub wait_timeout: Duration,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// Connections older than this are closed when returned or checked out.
    pub max_lifetime: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            sizes: BTreeMap::new(),
            default_size: 10,
            wait_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
        }
    }
}

/// Flags that override the file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Address clients connect to.
    #[arg(long, env = "GPRXY_LISTEN")]
    pub listen: Option<String>,
    /// PostgreSQL server address (host:port).
    #[arg(long, env = "GPRXY_UPSTREAM")]
    pub upstream: Option<String>,
    /// Admin listener for /metrics and /healthz.
    #[arg(long, env = "GPRXY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Log format.
    #[arg(long, env = "GPRXY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Client-side TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// Upstream TLS: always with certificate and host-name verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// CA bundle (PEM) the server's certificate must chain to.
    pub ca_file: PathBuf,
    /// Name the certificate must carry (default: the upstream host).
    pub server_name: String,
}

/// Which name the startup packet's user must carry in fallback mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum UserMatch {
    /// The token's identity.
    #[default]
    Identity,
    /// The service account the token's roles map to.
    Account,
}

/// How clients present their token in fallback mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum ClientAuth {
    /// As a cleartext password, over TLS only (any driver).
    #[default]
    Password,
    /// SASL OAUTHBEARER as PostgreSQL 18 does it (psql 18's device flow).
    OAuthBearer,
}

/// Parses an enumerated setting by its file spelling: the error names the setting and the
/// choices, and the TOML parser adds the line.
macro_rules! named_choices {
    ($ty:ty, $setting:literal, $($name:literal => $value:expr),+) => {
        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.as_str() {
                    $($name => Ok($value),)+
                    // The value is not repeated: it may be a secret written under the wrong key.
                    _ => Err(concat!($setting, ": must be ", named_choices!(@list $($name),+)).to_owned()),
                }
            }
        }
    };
    (@list $first:literal, $second:literal) => { concat!($first, " or ", $second) };
}

named_choices!(UserMatch, "fallback.user_must_match", "identity" => UserMatch::Identity, "account" => UserMatch::Account);
named_choices!(ClientAuth, "fallback.client_auth", "password" => ClientAuth::Password, "oauthbearer" => ClientAuth::OAuthBearer);
named_choices!(LogFormat, "log.format", "text" => LogFormat::Text, "json" => LogFormat::Json);

/// One `[[fallback.map]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRule {
    /// A role the token (after its issuer's role map) must carry.
    pub role: String,
    /// The service account it maps to.
    pub account: String,
    /// Only tokens of this issuer; None: any trusted issuer.
    pub issuer: Option<String>,
}

/// Fallback mode, checked.
#[derive(Clone)]
pub struct Fallback {
    /// How clients present tokens.
    pub client_auth: ClientAuth,
    /// Scope named in the OAUTHBEARER discovery answer.
    pub scope: String,
    /// The trusted issuers, each with its policy, key source and key cache bounds. A token is
    /// validated against the entry of its own `iss` only.
    pub issuers: gprxy_core::IssuerSet,
    /// Plain-HTTP issuers on loopback (tests only).
    pub insecure_allow_http_loopback: bool,
    /// Which user name the client must send.
    pub user_must_match: UserMatch,
    /// First match wins: token role → service account.
    pub map: Vec<MapRule>,
    /// Service account → password (read at start-up; never logged).
    pub passwords: std::collections::BTreeMap<String, String>,
    /// Session setting → claim it is set from.
    pub context: Vec<(String, String)>,
    /// The long-lived key that signs each session's context for its connection
    /// (`gprxy.set_context`, needs gprxy_validator upstream with its public half pinned in
    /// `gprxy.context_keys`); None when `signed_context = false`.
    pub context_key: Option<std::sync::Arc<gprxy_core::context::ContextKey>>,
    /// Pool limits.
    pub pool: PoolSettings,
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback")
            .field("issuers", &self.issuers.iter().map(|i| i.issuer()).collect::<Vec<_>>())
            .field("map", &self.map)
            .field("accounts", &self.passwords.keys().collect::<Vec<_>>())
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

/// A gprxy-core setting as gprxy.toml spells it.
pub fn toml_name(setting: gprxy_core::Setting) -> &'static str {
    use gprxy_core::Setting::*;
    match setting {
        Issuer => "fallback.issuer",
        Audience => "fallback.audience",
        Algorithms => "fallback.allowed_algorithms",
        Leeway => "fallback.leeway_secs",
        MaxTokenBytes => "fallback.max_token_bytes",
        IdentityClaim => "fallback.identity_claim",
        RoleClaim => "fallback.role_claim",
        RequiredClaims => "fallback.required_claims",
        RoleMap => "fallback.map",
        JwksUri => "fallback.jwks_uri",
        CaFile => "fallback.ca_file",
        CacheTtl => "fallback.keys.cache_ttl_secs",
        CacheTtlMin => "fallback.keys.cache_ttl_min_secs",
        CacheTtlMax => "fallback.keys.cache_ttl_max_secs",
        UnknownKidCooldown => "fallback.keys.unknown_kid_cooldown_secs",
        Backoff => "fallback.keys.backoff",
        ScopeClaim => "fallback.scope_claim",
        MaxTokenAge => "fallback.max_token_age_secs",
        TokenTypes => "fallback.token_types",
        JwksFile => "fallback.jwks_file",
        Profile => "fallback.profile",
        Issuers => "fallback.issuers",
        EntryName => "fallback.issuers.name",
        SessionPolicy => "session.policy",
        Introspection => "fallback.issuers.introspection",
    }
}

fn check_fallback(mut f: FileFallback) -> anyhow::Result<Fallback> {
    let issuers = if f.issuers.is_empty() {
        one_issuer(&f)?
    } else {
        let shorthand = f.issuer.is_some()
            || f.audience.is_some()
            || f.jwks_uri.is_some()
            || f.identity_claim.is_some()
            || f.role_claim.is_some()
            || f.accept_jwt_typ.is_some()
            || f.accept_bound_tokens.is_some()
            || !f.required_claims.is_empty()
            || f.keys != Default::default();
        if shorthand {
            bail!(
                "fallback: give one issuer's keys (issuer, audience, ...) or [[fallback.issuers]], not both"
            );
        }
        gprxy_core::IssuerSet::new(std::mem::take(&mut f.issuers), false).map_err(|e| match e {
            gprxy_core::IssuersError::Entry { number, issuer, error } => {
                anyhow::anyhow!("fallback.issuers[{number}] ({issuer:?}): {error}")
            }
            other => anyhow::anyhow!("fallback.issuers: {other}"),
        })?
    };
    let opaque: Vec<&str> =
        issuers.iter().filter(|i| i.mode == gprxy_core::TokenMode::Introspect).map(|i| i.issuer()).collect();
    if opaque.len() > 1 {
        bail!(
            "fallback.issuers: {} all have tokens = \"introspect\"; at most one may (an opaque token does not name its issuer, and gprxy never sends a token to another issuer's endpoint)",
            opaque.join(", ")
        );
    }
    if f.map.is_empty() {
        bail!("fallback.map: no rules; every login would be refused");
    }
    if let Some(e) = issuers.iter().find(|e| e.provision.mode != gprxy_core::provision::ProvisionMode::Off) {
        bail!(
            "fallback.issuers: {:?} sets provision, which is gprxy_validator's on PostgreSQL 18 (fallback mode maps \
             tokens to service accounts)",
            e.issuer()
        );
    }
    // Two issuers that reach one account with plain identities: one's `alice` is the other's to
    // the RLS policies (gprxy.identity() and gprxy.subject() are the same string).
    if !f.shared_subject_namespace {
        let entries: Vec<&gprxy_core::IssuerPolicy> = issuers.iter().collect();
        for rule in &f.map {
            let reaching: Vec<usize> = f
                .map
                .iter()
                .filter(|r| r.account == rule.account)
                .flat_map(|r| {
                    entries
                        .iter()
                        .enumerate()
                        .filter(move |(_, e)| r.issuer.as_deref().is_none_or(|i| i == e.issuer()))
                        .map(|(n, _)| n)
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let plain = reaching
                .iter()
                .any(|&n| entries[n].policy.identity_form() == gprxy_core::IdentityForm::Plain);
            if reaching.len() > 1 && plain {
                let numbers: Vec<String> = reaching.iter().map(|n| (n + 1).to_string()).collect();
                bail!(
                    "fallback: issuers {} can reach one service account with plain identities, so a \
                     subject of one is the same user as that subject of the other to the RLS policies: \
                     set issuer_qualified = true on each, map them to different accounts, or set \
                     shared_subject_namespace = true if they issue one namespace",
                    numbers.join(" and ")
                );
            }
        }
    }
    let mut passwords = std::collections::BTreeMap::new();
    for rule in &f.map {
        if let Some(issuer) = rule.issuer.as_deref().filter(|i| issuers.get(i).is_none()) {
            bail!("fallback.map: issuer {issuer:?} is not among the trusted issuers");
        }
        if rule.account.starts_with("pg_") {
            bail!("fallback.map: {:?} starts with pg_, which PostgreSQL reserves", rule.account);
        }
        let Some(acct) = f.accounts.get(&rule.account) else {
            bail!("fallback.accounts.{}: missing (the map names it)", rule.account);
        };
        let password = match (&acct.password_env, &acct.password_file) {
            (Some(var), None) => std::env::var(var).with_context(|| {
                format!("fallback.accounts.{}: environment variable {var} is not set", rule.account)
            })?,
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| {
                    // The key, not the value: a password pasted here stays out of the message.
                    format!("fallback.accounts.{}.password_file: cannot read the file", rule.account)
                })?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            _ => bail!("fallback.accounts.{}: give exactly one of password_env, password_file", rule.account),
        };
        passwords.insert(rule.account.clone(), password);
    }
    let context: Vec<(String, String)> = match f.context {
        Some(c) => c.into_iter().collect(),
        None => [
            ("app.user_id", "sub"),
            ("app.tenant_id", "tenant_id"),
            ("app.roles", "roles"),
            ("app.email", "email"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    };
    for (setting, _) in &context {
        if !setting.contains('.')
            || !setting.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            bail!("fallback.context: {setting:?} is not a custom setting name like app.user_id");
        }
    }
    let context_key = match (f.signed_context, f.context_key_file) {
        (true, Some(path)) => Some(std::sync::Arc::new(load_context_key(&path)?)),
        (true, None) => bail!(
            "fallback.context_key_file: required with signed_context (a PEM Ed25519 key; `gprxy context-key --generate FILE` makes one)"
        ),
        (false, Some(_)) => bail!("fallback.context_key_file: set, but signed_context is false"),
        (false, None) => None,
    };
    let d = PoolSettings::default();
    let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
    let pool = PoolSettings {
        default_size: f.pool.default_size.unwrap_or(d.default_size),
        sizes: f.pool.sizes,
        wait_timeout: ms(f.pool.wait_timeout_ms, d.wait_timeout),
        idle_timeout: ms(f.pool.idle_timeout_ms, d.idle_timeout),
        max_lifetime: ms(f.pool.max_lifetime_ms, d.max_lifetime),
    };
    if pool.default_size == 0 || pool.sizes.values().any(|&n| n == 0) {
        bail!("fallback.pool: sizes must be at least 1");
    }
    Ok(Fallback {
        pool,
        client_auth: f.client_auth,
        scope: f.scope,
        issuers,
        insecure_allow_http_loopback: f.insecure_allow_http_loopback,
        user_must_match: f.user_must_match,
        map: f
            .map
            .into_iter()
            .map(|r| MapRule { role: r.role, account: r.account, issuer: r.issuer })
            .collect(),
        passwords,
        context,
        context_key,
    })
}

/// The one-issuer shorthand (`issuer`, `audience`, ... in `[fallback]`) as an issuer set.
fn one_issuer(f: &FileFallback) -> anyhow::Result<gprxy_core::IssuerSet> {
    let (Some(issuer), Some(audience), Some(role_claim)) = (&f.issuer, &f.audience, &f.role_claim) else {
        bail!("fallback: needs issuer, audience and role_claim (or [[fallback.issuers]])");
    };
    let required = required_claims(f.required_claims.clone())?;
    // A well-known metadata URL stands for its issuer: tokens name that one.
    let issuer_id =
        gprxy_core::jwks::issuer_id(issuer).map_err(|e| anyhow::anyhow!("fallback.issuer: {e}"))?;
    let metadata_url = (&issuer_id != issuer).then(|| issuer.clone());
    let policy = gprxy_core::Policy::builder(issuer_id)
        .audiences(audience.clone())
        .accept_generic_typ(f.accept_jwt_typ.unwrap_or(false))
        .accept_bound_tokens(f.accept_bound_tokens.unwrap_or(false))
        .identity_claim(f.identity_claim.clone().unwrap_or_else(|| "sub".into()))
        .role_claim(Some(role_claim.clone()))
        .required_claims(required)
        .build()
        .map_err(|e| anyhow::anyhow!(e.spelled(toml_name)))?;
    let source = gprxy_core::JwksSource::for_issuer(issuer, f.jwks_uri.clone());
    let keys = f.keys.settings();
    if keys.min_ttl.is_zero() || keys.unknown_kid_cooldown.is_zero() {
        bail!("fallback.keys: cache_ttl_min_secs and unknown_kid_cooldown_secs must be at least 1");
    }
    if keys.min_ttl > keys.max_ttl {
        bail!("fallback.keys: cache_ttl_min_secs is above cache_ttl_max_secs");
    }
    let entry = gprxy_core::IssuerPolicy {
        name: None,
        profile: None,
        metadata_url,
        policy,
        source,
        role_map: Vec::new(),
        ca_file: None,
        cache: keys,
        mode: gprxy_core::TokenMode::Jwt,
        introspection: None,
        provision: gprxy_core::provision::ProvisionPolicy::default(),
    };
    Ok(gprxy_core::IssuerSet::from_policies(vec![entry]))
}

/// Reads the context signing key, refusing a file that others can read (as the client's
/// credentials are).
pub fn load_context_key(path: &Path) -> anyhow::Result<gprxy_core::context::ContextKey> {
    use std::os::unix::fs::PermissionsExt;
    // The key, not the value: a key pasted here stays out of the message.
    let what = || "fallback.context_key_file".to_owned();
    let meta = std::fs::metadata(path).with_context(what)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!("{}: mode {mode:04o} lets others read the key; chmod 600 it", what());
    }
    let pem = std::fs::read(path).with_context(what)?;
    gprxy_core::context::ContextKey::from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", what()))
}

impl Config {
    /// The server's Unix socket, when `upstream` names one.
    pub fn upstream_socket(&self) -> Option<&std::path::Path> {
        is_unix_socket(&self.upstream).then(|| std::path::Path::new(&self.upstream))
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(try_from = "String")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client listener.
    pub listen: SocketAddr,
    /// Both listeners bind with SO_REUSEPORT, so that a new gprxy can start on the same ports
    /// before the old one drains (zero-downtime upgrades).
    pub reuse_port: bool,
    /// Upstream server.
    pub upstream: String,
    /// Client TLS, if configured.
    pub tls: Option<TlsFiles>,
    /// Refuse clients that do not use TLS.
    pub require_tls: bool,
    /// Upstream TLS, if enabled.
    pub upstream_tls: Option<UpstreamTls>,
    /// Concurrent client connections at most.
    pub max_client_connections: usize,
    /// Time from accept to AuthenticationOk.
    pub login_timeout: Duration,
    /// Time to connect upstream.
    pub upstream_connect_timeout: Duration,
    /// Time sessions get to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Threads that run sessions (None: one per CPU).
    pub worker_threads: Option<usize>,
    /// Admin listener.
    pub admin_listen: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Token-as-password bridge.
    pub token_as_password: bool,
    /// When a session ends after login (`[session]`); a reload applies to new sessions.
    pub session: gprxy_core::SessionPolicy,
    /// Pass-through: who ends a server process that outlived its session (`[session]
    /// terminate_user`).
    pub terminator: Option<Terminator>,
    /// Fallback mode (proxy-side validation), if configured.
    pub fallback: Option<Fallback>,
}

fn addr(what: &str, s: &str) -> anyhow::Result<SocketAddr> {
    s.parse().with_context(|| format!("{what}: {s:?} is not an address like 127.0.0.1:6432"))
}

impl Config {
    /// Reads and checks `path` (if any), then applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Self> {
        let file: FileConfig = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config file {}", p.display()))?;
                toml::from_str(&text).map_err(|e| {
                    anyhow::anyhow!(
                        "config file {}: {}",
                        p.display(),
                        gprxy_core::issuers::toml_error(&text, &e)
                    )
                })?
            }
            None => FileConfig::default(),
        };
        let listen = overrides.listen.clone().or(file.listen).unwrap_or_else(|| "127.0.0.1:6432".into());
        let Some(upstream) = overrides.upstream.clone().or(file.upstream) else {
            bail!("upstream: no PostgreSQL server configured (upstream = \"host:port\" or --upstream)");
        };
        let unix_socket = is_unix_socket(&upstream);
        if !unix_socket && upstream.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            bail!("upstream: {upstream:?} is not host:port or a Unix socket path (/run/postgresql/.s.PGSQL.5432)");
        }
        if unix_socket && file.upstream_tls.enabled {
            bail!("upstream_tls: not for a Unix socket upstream (the socket never leaves the host)");
        }
        let tls = match (file.tls.cert, file.tls.key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => bail!("tls: cert and key must be given together"),
        };
        if file.tls.require && tls.is_none() {
            bail!("tls.require: set tls.cert and tls.key too");
        }
        if file.fallback.is_some() && tls.is_none() {
            bail!("fallback: needs tls.cert and tls.key (tokens travel as passwords)");
        }
        if file.bridge.token_as_password && tls.is_none() {
            bail!("bridge.token_as_password: needs tls.cert and tls.key (the token travels as a password)");
        }
        let upstream_tls = if file.upstream_tls.enabled {
            let ca_file = file
                .upstream_tls
                .ca_file
                .context("upstream_tls.ca_file: required when upstream_tls.enabled")?;
            let host = upstream.rsplit_once(':').map_or(upstream.as_str(), |(h, _)| h);
            let server_name =
                file.upstream_tls.server_name.unwrap_or_else(|| host.trim_matches(['[', ']']).to_owned());
            Some(UpstreamTls { ca_file, server_name })
        } else {
            None
        };
        let log_format = overrides.log_format.or(file.log.format).unwrap_or_default();
        let max_client_connections = file.limits.max_client_connections.unwrap_or(1000);
        if max_client_connections == 0 {
            bail!("limits.max_client_connections: must be at least 1");
        }
        if file.limits.worker_threads == Some(0) {
            bail!("limits.worker_threads: must be at least 1");
        }
        Ok(Self {
            listen: addr("listen", &listen)?,
            reuse_port: file.reuse_port,
            upstream,
            tls,
            require_tls: file.tls.require,
            upstream_tls,
            max_client_connections,
            login_timeout: Duration::from_millis(file.limits.login_timeout_ms.unwrap_or(15_000)),
            upstream_connect_timeout: Duration::from_millis(
                file.limits.upstream_connect_timeout_ms.unwrap_or(5_000),
            ),
            shutdown_grace: Duration::from_millis(file.limits.shutdown_grace_ms.unwrap_or(30_000)),
            worker_threads: file.limits.worker_threads,
            admin_listen: overrides
                .admin_listen
                .clone()
                .or(file.admin.listen)
                .map(|a| addr("admin.listen", &a))
                .transpose()?,
            log_format,
            token_as_password: file.bridge.token_as_password,
            terminator: file.session.terminator()?,
            session: file.session.policy(),
            fallback: file.fallback.map(check_fallback).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("gprxy.toml");
        std::fs::write(&p, text)?;
        Config::load(Some(&p), &Overrides::default())
    }

    #[test]
    fn unknown_key_names_the_line() {
        let e = load("upstream = \"127.0.0.1:5432\"\n\n[limits]\nmax_clients = 5\n").unwrap_err().to_string();
        assert!(e.contains("line 4") && e.contains("unknown field `max_clients`"), "{e}");
    }

    #[test]
    fn missing_file_and_missing_upstream() {
        let e = Config::load(Some(Path::new("/nonexistent/gprxy.toml")), &Overrides::default()).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read config file /nonexistent/gprxy.toml"));
        assert!(load("").unwrap_err().to_string().contains("upstream: no PostgreSQL server configured"));
    }

    #[test]
    fn tls_rules() {
        assert!(load("upstream = \"h:1\"\n[tls]\ncert = \"c\"\n")
            .unwrap_err()
            .to_string()
            .contains("together"));
        assert!(load("upstream = \"h:1\"\n[tls]\nrequire = true\n")
            .unwrap_err()
            .to_string()
            .contains("tls.require"));
        assert!(load("upstream = \"h:1\"\n[bridge]\ntoken_as_password = true\n")
            .unwrap_err()
            .to_string()
            .contains("bridge"));
        let c =
            load("upstream = \"db.internal:5432\"\n[upstream_tls]\nenabled = true\nca_file = \"ca.pem\"\n")
                .unwrap();
        assert_eq!(c.upstream_tls.unwrap().server_name, "db.internal");
    }

    const TLS: &str = "[tls]\ncert = \"c\"\nkey = \"k\"\n";

    fn fallback(extra: &str) -> String {
        format!(
            "upstream = \"h:1\"\n{TLS}[fallback]\nissuer = \"https://idp\"\naudience = [\"db\"]\nrole_claim = \"roles\"\n{extra}"
        )
    }

    /// A password or a private key pasted where a file's path goes never reaches the error.
    #[test]
    fn a_secret_pasted_under_a_file_key_stays_out_of_the_error() {
        let pasted = "s3cr3t-pasted-value";
        let text = fallback(&format!(
            "[[fallback.map]]\nrole = \"w\"\naccount = \"app_writer\"\n[fallback.accounts.app_writer]\npassword_file = \"{pasted}\"\n"
        ));
        let e = format!("{:#}", load(&text).unwrap_err());
        assert!(e.starts_with("fallback.accounts.app_writer.password_file: cannot read the file: "), "{e}");
        assert!(!e.contains(pasted), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("server.pem");
        std::fs::write(&cert, gprxy_core::testkit::test_ca().1).unwrap();
        let e = format!("{:#}", crate::tls::server_config(&cert, Path::new(pasted)).unwrap_err());
        assert!(e.starts_with("cannot read the private key file: "), "{e}");
        assert!(!e.contains(pasted), "{e}");
    }

    #[test]
    fn fallback_rules_checked_at_start() {
        let err = |extra: &str| load(&fallback(extra)).unwrap_err().to_string();
        assert!(err("").contains("fallback.map: no rules"));
        let rule = "[[fallback.map]]\nrole = \"w\"\naccount = \"app_writer\"\n";
        assert!(err(rule).contains("fallback.accounts.app_writer: missing (the map names it)"));
        let env = format!(
            "{rule}[fallback.accounts.app_writer]\npassword_env = \"GPRXY_TEST_UNSET_PASSWORD_VAR\"\n"
        );
        assert!(err(&env).contains("environment variable GPRXY_TEST_UNSET_PASSWORD_VAR is not set"));
        let reserved = "[[fallback.map]]\nrole = \"w\"\naccount = \"pg_writer\"\n";
        assert!(err(reserved).contains("starts with pg_"));
        let both =
            format!("{rule}[fallback.accounts.app_writer]\npassword_env = \"A\"\npassword_file = \"b\"\n");
        assert!(err(&both).contains("exactly one of password_env, password_file"));
        let mode = format!("client_auth = \"kerberos\"\n{rule}");
        assert!(err(&mode).contains("fallback.client_auth"));
        let no_aud = "upstream = \"h:1\"\n[tls]\ncert = \"c\"\nkey = \"k\"\n[fallback]\nissuer = \"https://idp\"\naudience = []\nrole_claim = \"r\"\n";
        assert!(load(no_aud).unwrap_err().to_string().contains("fallback.audience"));
        let no_tls = "upstream = \"h:1\"\n[fallback]\nissuer = \"https://idp\"\naudience = [\"db\"]\nrole_claim = \"r\"\n";
        assert!(load(no_tls).unwrap_err().to_string().contains("fallback: needs tls.cert"));
    }

    #[test]
    fn unix_socket_upstream_without_tls() {
        let c = load("upstream = \"/run/postgresql/.s.PGSQL.5432\"\n").unwrap();
        assert_eq!(c.upstream, "/run/postgresql/.s.PGSQL.5432");
        let e = load("upstream = \"/run/postgresql/.s.PGSQL.5432\"\n[upstream_tls]\nenabled = true\nca_file = \"ca.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream_tls: not for a Unix socket upstream"), "{e}");
        let e = load("upstream = \"db.internal\"\n").unwrap_err().to_string();
        assert!(e.contains("is not host:port or a Unix socket path"), "{e}");
    }

    /// A temporary folder holding a password file, and the `[fallback]` lines after `head` that
    /// map role `w` to the account `app_writer` with that file.
    fn one_account(head: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        let lines = format!(
            "{head}[[fallback.map]]\nrole = \"w\"\naccount = \"app_writer\"\n[fallback.accounts.app_writer]\npassword_file = \"{}\"\n",
            pw.display()
        );
        (dir, lines)
    }

    /// #30 item 1: an issuer written as its well-known metadata URL, in the one-issuer shorthand
    /// and in `[[fallback.issuers]]`: tokens are checked against the issuer it stands for, the
    /// keys and the OAUTHBEARER discovery answer use the URL as written; a malformed one is refused
    /// at load.
    #[test]
    fn a_well_known_issuer_url_stands_for_its_issuer() {
        let wk = "https://idp.example/.well-known/oauth-authorization-server/t";
        for head in [
            format!(
                "signed_context = false\nissuer = \"{wk}\"\naudience = [\"db\"]\nrole_claim = \"roles\"\n"
            ),
            format!("signed_context = false\n[[fallback.issuers]]\nissuer = \"{wk}\"\naudience = [\"db\"]\n"),
        ] {
            let (_dir, lines) = one_account(&head);
            let cfg = load(&format!("upstream = \"h:1\"\n{TLS}[fallback]\n{lines}")).unwrap();
            let fallback = cfg.fallback.as_ref().unwrap();
            let entry =
                fallback.issuers.get("https://idp.example/t").expect("found by the issuer it stands for");
            assert_eq!(entry.metadata_url.as_deref(), Some(wk));
            assert_eq!(entry.source, gprxy_core::JwksSource::Discovery { issuer: wk.to_owned() });
        }
        let (_dir, lines) = one_account(
            "signed_context = false\nissuer = \"https://idp.example/a/.well-known/openid-configuration/b\"\naudience = [\"db\"]\nrole_claim = \"roles\"\n",
        );
        let e = load(&format!("upstream = \"h:1\"\n{TLS}[fallback]\n{lines}")).map(|_| ()).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "fallback.issuer: the well-known part is either the whole path's start or its end"
        );
    }

    /// #27 item 1: two issuers that reach one account with plain identities are refused at load,
    /// unless both are issuer-qualified, they reach different accounts, or the DBA says they share
    /// one namespace.
    #[test]
    fn two_issuers_reaching_one_account_need_qualified_identities() {
        let issuers = |a: &str, b: &str, rule_issuer: &str| {
            let (_dir, ok) = one_account(&format!(
                "{rule_issuer}signed_context = false\n[[fallback.issuers]]\nissuer = \"https://a\"\naudience = [\"db\"]\n{a}\
                 [[fallback.issuers]]\nissuer = \"https://b\"\naudience = [\"db\"]\n{b}"
            ));
            let text = format!("upstream = \"h:1\"\n{TLS}[fallback]\n{ok}");
            (load(&text).map(|_| ()).map_err(|e| format!("{e:#}")), _dir)
        };
        let (plain, _d) = issuers("", "", "");
        assert_eq!(
            plain.unwrap_err(),
            "fallback: issuers 1 and 2 can reach one service account with plain identities, so a subject of one \
             is the same user as that subject of the other to the RLS policies: set issuer_qualified = true on \
             each, map them to different accounts, or set shared_subject_namespace = true if they issue one namespace"
        );
        let (one_plain, _d) = issuers("issuer_qualified = true\n", "", "");
        assert!(one_plain.is_err());
        let (qualified, _d) = issuers("issuer_qualified = true\n", "issuer_qualified = true\n", "");
        qualified.unwrap();
        let (shared, _d) = issuers("", "", "shared_subject_namespace = true\n");
        shared.unwrap();
    }

    /// gprxy-core's checks name the setting as gprxy.toml spells it (not as postgresql.conf).
    #[test]
    fn core_checks_name_the_toml_setting() {
        let (_dir, ok) = one_account("signed_context = false\n");
        let err = load(&fallback(&format!("identity_claim = \"\"\n{ok}"))).unwrap_err().to_string();
        assert!(err.starts_with("fallback.identity_claim: "), "{err}");
        let no_audience = fallback(&ok).replace("audience = [\"db\"]", "audience = []");
        let err = load(&no_audience).unwrap_err().to_string();
        assert!(err.starts_with("fallback.audience: at least one accepted audience"), "{err}");
    }

    /// `[[fallback.issuers]]`: each entry checked at start-up, a profile's requirement named;
    /// the one-issuer keys and a list together are refused.
    #[test]
    fn several_issuers_are_checked_at_start() {
        let (_dir, ok) = one_account("signed_context = false\n");
        let base = format!("upstream = \"h:1\"\n{TLS}[fallback]\n{ok}");
        let entry = |extra: &str| {
            format!("[[fallback.issuers]]\nissuer = \"https://token.actions.githubusercontent.com\"\nprofile = \"github-actions\"\naudience = [\"db\"]\n{extra}")
        };
        let err = load(&format!("{base}{}", entry(""))).unwrap_err().to_string();
        assert_eq!(err, "fallback.issuers[1] (\"https://token.actions.githubusercontent.com\"): profile: github-actions: required_claims must pin repository_owner (or repository_owner_id): the issuer serves every repository on GitHub");
        let pinned = entry("required_claims = { repository_owner = \"acme\" }\n");
        let f = load(&format!("{base}{pinned}")).unwrap().fallback.unwrap();
        assert_eq!(f.issuers.len(), 1);
        let stray = "[[fallback.map]]\nrole = \"x\"\naccount = \"app_writer\"\nissuer = \"https://other\"\n";
        let err = load(&format!("{base}{pinned}{stray}")).unwrap_err().to_string();
        assert_eq!(err, "fallback.map: issuer \"https://other\" is not among the trusted issuers");
        let both = format!("upstream = \"h:1\"\n{TLS}[fallback]\nissuer = \"https://idp\"\n{ok}{pinned}");
        let err = load(&both).unwrap_err().to_string();
        assert_eq!(
            err,
            "fallback: give one issuer's keys (issuer, audience, ...) or [[fallback.issuers]], not both"
        );
    }

    /// #27 item 2: a value written under the wrong key (a secret, say) is never repeated in an
    /// error: every key that takes a number, a boolean, a list, a table or one of a few words is
    /// given the marker, and the error names the line and key but never the marker.
    #[test]
    fn no_error_repeats_a_configured_value() {
        const MARKER: &str = "MARKER-s3cr3t-9f2a";
        let (_dir, ok) = one_account("");
        let cases = [
            ("", "login_timeout_ms"),
            ("", "require_tls"),
            ("", "max_client_connections"),
            ("[log]\n", "format"),
            ("[session]\n", "policy"),
            ("[session]\n", "grace_secs"),
            ("[session]\n", "idle_hard_limit_secs"),
            ("[session]\n", "max_session_age_secs"),
            ("[bridge]\n", "token_as_password"),
        ];
        for (table, key) in cases {
            let text = format!("upstream = \"h:1\"\n{table}{key} = \"{MARKER}\"\n");
            let err = format!("{:#}", load(&text).unwrap_err());
            assert!(!err.contains(MARKER), "{key}: {err}");
            assert!(err.contains("line") && err.contains(key), "{key}: {err}");
        }
        for (key, value) in [
            ("client_auth", format!("\"{MARKER}\"")),
            ("user_must_match", format!("\"{MARKER}\"")),
            ("signed_context", format!("\"{MARKER}\"")),
            ("audience", format!("\"{MARKER}\"")),
            ("insecure_allow_http_loopback", format!("\"{MARKER}\"")),
            ("leeway_secs", format!("\"{MARKER}\"")),
            ("allowed_algorithms", format!("[\"{MARKER}\"]")),
            ("pool", format!("\"{MARKER}\"")),
        ] {
            let text = fallback(&ok).replacen("[fallback]\n", &format!("[fallback]\n{key} = {value}\n"), 1);
            let Err(e) = load(&text) else { continue };
            let err = format!("{e:#}");
            assert!(!err.contains(MARKER), "fallback.{key}: {err}");
        }
        // The issuers-file form of an entry: a secret pasted into client_auth or a number.
        let issuers = format!(
            "[[fallback.issuers]]\nissuer = \"https://idp\"\naudience = [\"db\"]\n\
             [fallback.issuers.introspection]\nclient_id = \"c\"\nclient_auth = \"{MARKER}\"\n"
        );
        let text = format!("upstream = \"h:1\"\n{TLS}[fallback]\n{issuers}");
        let err = format!("{:#}", load(&text).unwrap_err());
        assert!(!err.contains(MARKER) && err.contains("client_auth"), "{err}");
        let text = text
            .replace(&format!("client_auth = \"{MARKER}\""), &format!("cache_ttl_max_secs = \"{MARKER}\""));
        let err = format!("{:#}", load(&text).unwrap_err());
        assert!(!err.contains(MARKER) && err.contains("cache_ttl_max_secs"), "{err}");
    }

    /// Enumerated settings are parsed with the file, so a bad one names its line.
    #[test]
    fn a_bad_enumerated_value_names_its_line() {
        let (_dir, ok) = one_account("signed_context = false\nclient_auth = \"kerberos\"\n");
        let err = format!("{:#}", load(&fallback(&ok)).unwrap_err());
        assert!(err.contains("fallback.client_auth: must be password or oauthbearer"), "{err}");
        assert!(!err.contains("kerberos"), "the value is repeated: {err}");
        assert!(err.contains("at line 10, column 15"), "{err}");
        let err = format!("{:#}", load("upstream = \"h:1\"\n[log]\nformat = \"xml\"\n").unwrap_err());
        assert!(
            err.contains("log.format: must be text or json")
                && err.contains("at line 3")
                && !err.contains("xml"),
            "{err}"
        );
        let (_dir, ok) = one_account(
            "signed_context = false\nuser_must_match = \"account\"\nclient_auth = \"oauthbearer\"\n",
        );
        let f = load(&fallback(&ok)).unwrap().fallback.unwrap();
        assert_eq!((f.user_must_match, f.client_auth), (UserMatch::Account, ClientAuth::OAuthBearer));
    }

    /// `gprxy check-config` refuses what `serve` would refuse without going to the network:
    /// unreadable TLS files, a key cache TTL outside its bounds, a plain-HTTP issuer.
    #[test]
    fn check_config_refuses_what_serve_refuses() {
        let (_dir, ok) = one_account("signed_context = false\n");
        let loaded = load(&fallback(&ok)).unwrap();
        let err = format!("{:#}", crate::server::check(&loaded).unwrap_err());
        assert!(err.starts_with("tls: "), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
        let tls = format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\n", c.display(), k.display());
        let with = |text: String| load(&text.replace(TLS, &tls)).unwrap();
        assert!(crate::server::check(&with(fallback(&ok))).is_ok());

        let ttl =
            with(fallback(&format!("{ok}[fallback.keys]\ncache_ttl_secs = 30\ncache_ttl_min_secs = 60\n")));
        let err = format!("{:#}", crate::server::check(&ttl).unwrap_err());
        assert!(err.contains("fallback.keys.cache_ttl_secs: must lie between"), "{err}");

        let plain = with(fallback(&ok).replace("https://idp", "http://idp.example"));
        let err = format!("{:#}", crate::server::check(&plain).unwrap_err());
        assert!(err.contains("fallback.issuer: "), "{err}");
    }

    #[test]
    fn key_cache_settings_are_bounded() {
        let (_dir, ok) = one_account("signed_context = false\n");
        let with = |keys: &str| load(&fallback(&format!("{ok}[fallback.keys]\n{keys}")));
        let f = with("unknown_kid_cooldown_secs = 5\nmax_staleness_secs = 60\n").unwrap().fallback.unwrap();
        let keys = &f.issuers.iter().next().unwrap().cache;
        assert_eq!(keys.unknown_kid_cooldown, Duration::from_secs(5));
        assert_eq!(keys.max_staleness, Duration::from_secs(60));
        assert_eq!(f.passwords["app_writer"], "secret");
        assert!(with("unknown_kid_cooldown_secs = 0\n")
            .unwrap_err()
            .to_string()
            .contains("must be at least 1"));
        assert!(with("cache_ttl_min_secs = 100\ncache_ttl_max_secs = 10\n")
            .unwrap_err()
            .to_string()
            .contains("cache_ttl_min_secs is above cache_ttl_max_secs"));
        assert!(with("ttl = 1\n").unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn context_key_comes_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, rules) = one_account("");
        let with = |head: &str| load(&fallback(&format!("{head}{rules}")));
        let e = with("").unwrap_err().to_string();
        assert!(e.starts_with("fallback.context_key_file: required with signed_context"), "{e}");
        let key = dir.path().join("context.key");
        std::fs::write(&key, gprxy_core::context::ContextKey::generate_pem().unwrap()).unwrap();
        let line = format!("context_key_file = \"{}\"\n", key.display());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = with(&line).unwrap_err().to_string();
        assert_eq!(e, "fallback.context_key_file: mode 0644 lets others read the key; chmod 600 it");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let f = with(&line).unwrap().fallback.unwrap();
        assert_eq!(f.context_key.unwrap().public_key().len(), 43);
        let e = with(&format!("signed_context = false\n{line}")).unwrap_err().to_string();
        assert_eq!(e, "fallback.context_key_file: set, but signed_context is false");
        std::fs::write(&key, "not a key").unwrap();
        let e = with(&line).unwrap_err().to_string();
        assert!(e.ends_with("not an Ed25519 private key in PKCS#8 PEM: no PRIVATE KEY block"), "{e}");
    }

    #[test]
    fn required_claims_table() {
        let (_dir, ok) = one_account("signed_context = false\n");
        let with = |table: &str| load(&fallback(&format!("{ok}[fallback.required_claims]\n{table}")));
        let f = with(
            "repository_owner = \"acme\"\nenvironment = [\"prod\", \"staging\"]\nemail_verified = true\n\"kubernetes.io.namespace\" = \"ci\"\n",
        )
        .unwrap()
        .fallback
        .unwrap();
        assert_eq!(
            f.issuers.iter().next().unwrap().policy.required_claims(),
            &gprxy_core::RequiredClaims::parse(
                "email_verified = true, environment in (prod | staging), kubernetes.io.namespace = ci, repository_owner = acme"
            )
            .unwrap()
        );
        let err = |table: &str| with(table).unwrap_err().to_string();
        assert_eq!(
            err("email_verified = false\n"),
            "fallback.required_claims.email_verified: only true can be required of a boolean (write \"false\" for the string)"
        );
        assert_eq!(
            err("id = 5\n"),
            "fallback.required_claims.id: must be a string, a list of strings, or true"
        );
        assert_eq!(
            err("env = [\"prod\", true]\n"),
            "fallback.required_claims.env: a list holds strings only"
        );
        assert_eq!(
            err("env = []\n"),
            "fallback.required_claims.env: claim \"env\": the list of allowed values is empty"
        );
        assert_eq!(
            err("owner = \"\"\n"),
            "fallback.required_claims.owner: claim \"owner\": the required value is empty"
        );
        assert_eq!(
            err("kubernetes.io = \"x\"\n"),
            "fallback.required_claims.kubernetes: must be a string, a list of strings, or true (a dotted claim name is quoted: \"a.b\" = \"value\")"
        );
        let f = load(&fallback(&ok)).unwrap().fallback.unwrap();
        assert!(f.issuers.iter().next().unwrap().policy.required_claims().is_empty());
    }

    #[test]
    fn worker_threads() {
        assert_eq!(load("upstream = \"h:1\"\n").unwrap().worker_threads, None);
        assert_eq!(
            load("upstream = \"h:1\"\n[limits]\nworker_threads = 1\n").unwrap().worker_threads,
            Some(1)
        );
        let e = load("upstream = \"h:1\"\n[limits]\nworker_threads = 0\n").unwrap_err().to_string();
        assert!(e.contains("limits.worker_threads: must be at least 1"), "{e}");
    }

    #[test]
    fn the_example_file_loads() {
        let c = load(include_str!("../../gprxy.toml.example")).unwrap();
        assert!(c.require_tls && c.tls.is_some() && !c.token_as_password);
        assert_eq!(c.admin_listen, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(c.session, gprxy_core::SessionPolicy::default());
    }

    #[test]
    fn session_table_is_parsed_once_with_defaults() {
        use gprxy_core::{SessionMode, SessionPolicy};
        assert_eq!(load("upstream = \"h:1\"\n").unwrap().session, SessionPolicy::default());
        let c = load(
            "upstream = \"h:1\"\n[session]\npolicy = \"strict\"\ngrace_secs = 30\nidle_hard_limit_secs = 600\nmax_session_age_secs = 86400\n",
        )
        .unwrap();
        assert_eq!(
            c.session,
            SessionPolicy {
                mode: SessionMode::Strict,
                grace_secs: 30,
                idle_hard_limit_secs: 600,
                max_session_age_secs: Some(86400)
            }
        );
        let off =
            load("upstream = \"h:1\"\n[session]\npolicy = \"off\"\nmax_session_age_secs = 0\n").unwrap();
        assert_eq!(off.session, SessionPolicy { mode: SessionMode::Off, ..SessionPolicy::default() });
        let err = |text: &str| {
            format!("{:#}", load(&format!("upstream = \"h:1\"\n[session]\n{text}")).unwrap_err())
        };
        let e = err("policy = \"Strict\"\n");
        assert!(
            e.contains("session.policy: must be off, idle or strict")
                && e.contains("line 3")
                && !e.contains("Strict"),
            "{e}"
        );
        let e = err("grace = 5\n");
        assert!(e.contains("unknown field `grace`") && e.contains("line 3"), "{e}");
        let e = err("grace_secs = -1\n");
        assert!(e.contains("grace_secs") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn overrides_win() {
        let o = Overrides {
            upstream: Some("127.0.0.1:1".into()),
            listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        let c = Config::load(None, &o).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.upstream, "127.0.0.1:1");
    }
}
