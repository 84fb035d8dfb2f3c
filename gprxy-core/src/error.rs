//! Errors of token validation and key fetching.
//!
//! Every variant has a stable short [`ValidationError::code`] for metrics labels and audit logs,
//! and a `Display` message fit for a log line. No message ever contains the token; strings taken
//! from the token (an issuer, a `kid`) are shortened and stripped of control characters first.

use std::fmt;

use crate::algorithm::Algorithm;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The token is longer than the policy's maximum (PostgreSQL's own limit is 65535 bytes).
    #[error("token is {size} bytes, more than the maximum of {max}")]
    TooLarge {
        /// Size of the presented token.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The token is not a well-formed compact JWS.
    #[error("malformed token: {0}")]
    Malformed(Malformed),
    /// The header has no `alg`.
    #[error("header has no \"alg\"")]
    AlgMissing,
    /// `alg` is `none` (in any letter case).
    #[error("unsigned token (alg \"none\") refused")]
    AlgNone,
    /// `alg` names no algorithm gprxy knows.
    #[error("unknown algorithm {0}")]
    AlgUnknown(Quoted),
    /// `alg` is known but not allowed by the policy (HMAC never is).
    #[error("algorithm {0} is not allowed")]
    AlgNotAllowed(Quoted),
    /// The header lists a critical extension gprxy does not understand.
    #[error("unsupported critical header parameter {0}")]
    CritUnsupported(Quoted),
    /// The header has no `kid` and the key set has more than one key that fits the algorithm.
    #[error("header has no \"kid\" and the key set has several keys for {0}")]
    KidMissing(Algorithm),
    /// The header has no `kid` and no key in the set fits the algorithm.
    #[error("header has no \"kid\" and no key in the key set fits {0}")]
    NoKeyForAlg(Algorithm),
    /// No key with this `kid` (after the one refetch allowed).
    #[error("no key with kid {0} in the issuer's key set")]
    KidUnknown(Quoted),
    /// The key cannot verify this algorithm (key type, curve, declared `alg` or size).
    #[error("key {kid} does not fit algorithm {alg}: {reason}")]
    KeyMismatch {
        /// The key's id (or `-`).
        kid: Quoted,
        /// The token's algorithm.
        alg: Algorithm,
        /// What does not fit.
        reason: KeyMismatch,
    },
    /// The key's `use` or `key_ops` forbids signature verification.
    #[error("key {0} is not meant for signature verification (use/key_ops)")]
    KeyUsage(Quoted),
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The payload is not a JSON object (or not JSON, or has duplicate keys).
    #[error("claims are not a valid JSON object: {0}")]
    ClaimsMalformed(Malformed),
    /// `exp` is missing.
    #[error("token has no \"exp\" claim")]
    ExpMissing,
    /// A time claim (`exp`, `nbf`, `iat`) is not a number.
    #[error("claim \"{0}\" is not a number")]
    TimeClaimInvalid(&'static str),
    /// `exp` is in the past (beyond leeway).
    #[error("token expired at {exp} (now {now}, leeway {leeway}s)")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The validator's clock.
        now: i64,
        /// Allowed clock skew.
        leeway: u64,
    },
    /// `nbf` is in the future (beyond leeway).
    #[error("token not valid before {nbf} (now {now})")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
        /// The validator's clock.
        now: i64,
    },
    /// `iat` is in the future (beyond leeway).
    #[error("token issued in the future at {iat} (now {now})")]
    IssuedInFuture {
        /// The token's `iat`.
        iat: i64,
        /// The validator's clock.
        now: i64,
    },
    /// The token is bound to a key (`cnf`), whose proof gprxy cannot see.
    #[error("token is bound to a key (cnf) and the issuer's entry does not accept bound tokens")]
    TokenBound,
    /// `iss` is missing.
    #[error("token has no \"iss\" claim")]
    IssuerMissing,
    /// `iss` is not a string.
    #[error("claim \"iss\" is not a string")]
    IssuerInvalid,
    /// `iss` names an issuer that is not trusted here (refused before any key is fetched).
    #[error("issuer {0} is not trusted")]
    IssuerNotTrusted(Quoted),
    /// `iss` differs from the expected issuer (exact comparison).
    #[error("issuer {got} does not match the expected {expected}")]
    IssuerMismatch {
        /// The token's issuer.
        got: Quoted,
        /// The configured issuer.
        expected: Quoted,
    },
    /// `aud` is missing.
    #[error("token has no \"aud\" claim")]
    AudienceMissing,
    /// `aud` is not a string or an array of strings.
    #[error("claim \"aud\" is not a string or an array of strings")]
    AudienceInvalid,
    /// None of the token's audiences is accepted.
    #[error("no accepted audience in the token's \"aud\"")]
    AudienceMismatch,
    /// A required scope is not granted.
    #[error("required scope {0} not granted")]
    ScopeMissing(Quoted),
    /// The policy limits token lifetime and the token has no `iat` to measure it by.
    #[error("token has no \"iat\" and the issuer's policy limits token lifetime")]
    IatMissing,
    /// The token lives longer (`exp` - `iat`) than the policy allows.
    #[error("token lifetime of {lifetime} s is longer than the maximum of {max} s")]
    LifetimeTooLong {
        /// `exp` - `iat`.
        lifetime: i64,
        /// The policy's maximum.
        max: u64,
    },
    /// The `typ` header is not an accepted token type.
    #[error("token type {0} is not accepted")]
    TypeNotAccepted(Quoted),
    /// The identity claim is missing, empty or not a string.
    #[error("identity claim {0} missing or not a non-empty string")]
    IdentityMissing(Quoted),
    /// A required claim is missing or does not meet its constraint (see [`crate::required`]).
    #[error("required claim {claim} {constraint} (token: {found})")]
    RequiredClaim {
        /// The claim's name or path.
        claim: Quoted,
        /// What it must be (`must equal "acme"`).
        constraint: String,
        /// What the token has (`missing`, `"evil"`, `a number`).
        found: String,
    },
    /// Keys could not be had from the issuer.
    #[error("signing keys unavailable: {0}")]
    Keys(#[from] KeyError),
    /// The issuer's introspection endpoint says the token is not active (RFC 7662).
    #[error("the issuer says the token is not active (revoked, expired or unknown)")]
    TokenInactive,
    /// The issuer had its share of requests from gprxy (rate or requests in flight).
    #[error("introspection not asked: the issuer's limit of {per_sec} requests a second, {concurrent} at once, is reached")]
    IntrospectionThrottled {
        /// The issuer's rate limit.
        per_sec: u32,
        /// Its cap on requests in flight.
        concurrent: u32,
    },
    /// The introspection endpoint could not be asked (down, slow, not configured, no secret).
    #[error("introspection failed: {0}")]
    IntrospectionUnavailable(String),
    /// The endpoint answered `unsupported_token_type`: it does not introspect this kind of token
    /// (some providers introspect opaque tokens only, not JWTs).
    #[error("the introspection endpoint does not introspect this kind of token (unsupported_token_type): use tokens = \"jwt\" for this issuer, or have it issue opaque tokens")]
    IntrospectionUnsupportedToken,
    /// The introspection endpoint refused gprxy's client credentials.
    #[error("the introspection endpoint refused gprxy's client credentials (HTTP {status}): check client_id and the client secret")]
    IntrospectionClientRefused {
        /// 401 or 403.
        status: u16,
    },
    /// The introspection answer is not an RFC 7662 answer.
    #[error("the introspection answer is malformed: {0}")]
    IntrospectionMalformed(String),
}

impl ValidationError {
    /// A stable short code for metrics labels and audit logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "token_too_large",
            Self::Malformed(_) => "malformed",
            Self::AlgMissing => "alg_missing",
            Self::AlgNone => "alg_none",
            Self::AlgUnknown(_) => "alg_unknown",
            Self::AlgNotAllowed(_) => "alg_not_allowed",
            Self::CritUnsupported(_) => "crit_unsupported",
            Self::KidMissing(_) => "kid_missing",
            Self::NoKeyForAlg(_) => "no_key_for_alg",
            Self::KidUnknown(_) => "kid_unknown",
            Self::KeyMismatch { .. } => "key_mismatch",
            Self::KeyUsage(_) => "key_usage",
            Self::BadSignature => "bad_signature",
            Self::ClaimsMalformed(_) => "claims_malformed",
            Self::ExpMissing => "exp_missing",
            Self::TimeClaimInvalid(_) => "time_claim_invalid",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::IssuedInFuture { .. } => "issued_in_future",
            Self::IssuerMissing => "iss_missing",
            Self::IssuerInvalid => "iss_invalid",
            Self::TokenBound => "token_bound",
            Self::IssuerMismatch { .. } => "iss_mismatch",
            Self::IssuerNotTrusted(_) => "iss_not_trusted",
            Self::AudienceMissing => "aud_missing",
            Self::AudienceInvalid => "aud_invalid",
            Self::AudienceMismatch => "aud_mismatch",
            Self::ScopeMissing(_) => "scope_missing",
            Self::IatMissing => "iat_missing",
            Self::LifetimeTooLong { .. } => "lifetime_too_long",
            Self::TypeNotAccepted(_) => "typ_not_accepted",
            Self::IdentityMissing(_) => "identity_missing",
            Self::RequiredClaim { .. } => "required_claim",
            Self::Keys(_) => "keys_unavailable",
            Self::TokenInactive => "token_inactive",
            Self::IntrospectionUnavailable(_) => "introspection_unavailable",
            Self::IntrospectionThrottled { .. } => "introspection_throttled",
            Self::IntrospectionUnsupportedToken => "introspection_unsupported_token",
            Self::IntrospectionClientRefused { .. } => "introspection_client_refused",
            Self::IntrospectionMalformed(_) => "introspection_malformed",
        }
    }
}

/// How a token (or its claims) is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// Not exactly three dot-separated parts.
    #[error("expected 3 dot-separated parts")]
    PartCount,
    /// Five parts: a JWE, which gprxy does not decrypt.
    #[error("encrypted tokens (JWE) are not supported")]
    Encrypted,
    /// A part contains whitespace.
    #[error("whitespace inside the token")]
    Whitespace,
    /// A part carries `=` padding, which base64url in JWS forbids.
    #[error("base64 padding inside the token")]
    Padding,
    /// A part is not base64url (wrong alphabet, bad length or trailing bits).
    #[error("a part is not base64url")]
    Base64,
    /// A part is empty where content is required.
    #[error("empty part")]
    Empty,
    /// Not JSON (or not UTF-8).
    #[error("not valid JSON")]
    Json,
    /// JSON, but not an object.
    #[error("JSON is not an object")]
    NotObject,
    /// An object has the same key twice.
    #[error("duplicate JSON key")]
    DuplicateKey,
    /// A header parameter has the wrong JSON type.
    #[error("header parameter of the wrong type")]
    HeaderType,
}

/// What about a key does not fit the token's algorithm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyMismatch {
    /// Wrong key type for the algorithm family.
    #[error("key type {0} cannot verify this algorithm")]
    KeyType(String),
    /// Wrong curve.
    #[error("curve {0} does not fit")]
    Curve(String),
    /// The JWK declares a different `alg`.
    #[error("key is declared for {0}")]
    DeclaredAlg(String),
    /// RSA modulus shorter than 2048 bits.
    #[error("RSA key of {0} bits is too small (2048 at least)")]
    RsaTooSmall(usize),
    /// The JWK's parameters are missing or malformed.
    #[error("key parameters are invalid: {0}")]
    Invalid(&'static str),
}

/// Why keys could not be had from an issuer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A URL is plain HTTP (or another scheme) and plain HTTP is not allowed.
    #[error("{0} is not an https URL (plain http is allowed only for loopback tests)")]
    InsecureUrl(Quoted),
    /// A URL could not be parsed.
    #[error("invalid URL {0}")]
    BadUrl(Quoted),
    /// Connection, TLS or read failure.
    #[error("request to {url} failed: {reason}")]
    Transport {
        /// The URL requested.
        url: Quoted,
        /// What went wrong.
        reason: String,
    },
    /// The request took longer than the timeout.
    #[error("request to {0} timed out")]
    Timeout(Quoted),
    /// The server answered with a redirect, which gprxy never follows.
    #[error("{0} answered with a redirect, which is not followed")]
    Redirect(Quoted),
    /// The server answered with another non-success status.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The URL requested.
        url: Quoted,
        /// The HTTP status.
        status: u16,
    },
    /// The body was larger than the cap.
    #[error("{url} answered more than {limit} bytes")]
    TooLarge {
        /// The URL requested.
        url: Quoted,
        /// The configured cap.
        limit: usize,
    },
    /// The discovery document or key set is not what it should be.
    #[error("{url}: {reason}")]
    Invalid {
        /// The URL requested.
        url: Quoted,
        /// What is wrong with it.
        reason: String,
    },
    /// The discovery document names another issuer.
    #[error("discovery document names issuer {got}, expected {expected}")]
    IssuerMismatch {
        /// Issuer in the document.
        got: Quoted,
        /// Issuer expected.
        expected: Quoted,
    },
    /// No keys yet, and the last fetch failed; or the last good keys are older than allowed.
    #[error("no usable keys: {0}")]
    Unavailable(String),
}

impl KeyError {
    /// A stable short code for metrics labels and audit logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InsecureUrl(_) => "insecure_url",
            Self::BadUrl(_) => "bad_url",
            Self::Transport { .. } => "transport",
            Self::Timeout(_) => "timeout",
            Self::Redirect(_) => "redirect",
            Self::Status { .. } => "http_status",
            Self::TooLarge { .. } => "too_large",
            Self::Invalid { .. } => "invalid",
            Self::IssuerMismatch { .. } => "issuer_mismatch",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

/// A string from an untrusted source, made safe for a log line: at most 128 characters, control
/// characters escaped, shown in double quotes.
#[derive(Clone, PartialEq, Eq)]
pub struct Quoted(String);

impl Quoted {
    const MAX_CHARS: usize = 128;

    /// Wraps `s`, shortening it if needed.
    pub fn new(s: &str) -> Self {
        let mut out = String::with_capacity(s.len().min(Self::MAX_CHARS + 3));
        for (i, c) in s.chars().enumerate() {
            if i == Self::MAX_CHARS {
                out.push('…');
                break;
            }
            if c.is_control() || c == '"' || c == '\\' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        Self(out)
    }

    /// The (shortened, escaped) text without quotes.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

impl fmt::Debug for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<&str> for Quoted {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

/// A setting gprxy-core checks, by what it means. Each front end spells it its own way
/// (`gprxy.authn_claim` in postgresql.conf, `fallback.identity_claim` in gprxy.toml); the
/// [`Display`](fmt::Display) form is the neutral name, which is also the key of an issuers file
/// entry ([`crate::issuers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Setting {
    /// The issuer (pg_hba.conf's `issuer`, fallback's `issuer`).
    Issuer,
    /// Accepted audiences.
    Audience,
    /// The signature algorithm allowlist.
    Algorithms,
    /// Allowed clock skew.
    Leeway,
    /// Largest token accepted.
    MaxTokenBytes,
    /// The claim that is the identity.
    IdentityClaim,
    /// The claim that lists roles.
    RoleClaim,
    /// Claims every token must carry.
    RequiredClaims,
    /// Token role to database role pairs.
    RoleMap,
    /// A configured key set URL.
    JwksUri,
    /// The CA bundle for a private issuer.
    CaFile,
    /// Key set freshness without `max-age`.
    CacheTtl,
    /// Lower bound on key set freshness.
    CacheTtlMin,
    /// Upper bound on key set freshness.
    CacheTtlMax,
    /// Least time between fetches caused by unknown `kid`s.
    UnknownKidCooldown,
    /// Waits between failed fetches.
    Backoff,
    /// The claim that grants scopes.
    ScopeClaim,
    /// The longest token lifetime.
    MaxTokenAge,
    /// Accepted token types.
    TokenTypes,
    /// A local key set file.
    JwksFile,
    /// A provider profile and what it requires.
    Profile,
    /// The issuer set as a whole (the validator's issuers file).
    Issuers,
    /// An issuers file entry's name (a PostgreSQL 19 pg_hba line's `validator.entry`).
    EntryName,
    /// When a session ends after its login (`off`, `idle`, `strict`).
    SessionPolicy,
    /// An issuer's token introspection (RFC 7662).
    Introspection,
}

impl Setting {
    /// The neutral name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Issuer => "issuer",
            Self::EntryName => "name",
            Self::Audience => "audience",
            Self::Algorithms => "allowed_algorithms",
            Self::Leeway => "leeway_secs",
            Self::MaxTokenBytes => "max_token_bytes",
            Self::IdentityClaim => "identity_claim",
            Self::RoleClaim => "role_claim",
            Self::RequiredClaims => "required_claims",
            Self::RoleMap => "role_map",
            Self::JwksUri => "jwks_uri",
            Self::CaFile => "ca_file",
            Self::CacheTtl => "keys.cache_ttl_secs",
            Self::CacheTtlMin => "keys.cache_ttl_min_secs",
            Self::CacheTtlMax => "keys.cache_ttl_max_secs",
            Self::UnknownKidCooldown => "keys.unknown_kid_cooldown_secs",
            Self::Backoff => "keys.backoff",
            Self::ScopeClaim => "scope_claim",
            Self::MaxTokenAge => "max_token_age_secs",
            Self::TokenTypes => "token_types",
            Self::JwksFile => "jwks_file",
            Self::Profile => "profile",
            Self::Issuers => "issuers",
            Self::SessionPolicy => "session.policy",
            Self::Introspection => "introspection",
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct ConfigError {
    /// The setting at fault.
    pub setting: Setting,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// `setting` cannot be used, because of `reason`.
    pub fn new(setting: Setting, reason: impl Into<String>) -> Self {
        Self { setting, reason: reason.into() }
    }

    /// The error with the setting spelled by a front end.
    pub fn spelled(&self, name: impl Fn(Setting) -> &'static str) -> String {
        format!("{}: {}", name(self.setting), self.reason)
    }
}
