//! What a token must satisfy: a typed policy, checked once when it is built.
//!
//! Defaults follow RFC 8725 (JWT best current practice) and RFC 9068 (JWT access tokens):
//! asymmetric algorithms only, `typ` `at+jwt`, issuer compared exactly, an audience required.

use std::str::FromStr;

use crate::algorithm::Algorithm;
use crate::claims::ClaimPath;
use crate::error::{ConfigError, Setting};
use crate::required::RequiredClaims;

impl FromStr for Algorithm {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_name(s.trim()).ok_or_else(|| {
            ConfigError::new(
                Setting::Algorithms,
                format!(
                    "unknown or forbidden algorithm {s:?} (allowed: {})",
                    Self::ALL.map(Self::name).join(", ")
                ),
            )
        })
    }
}

/// How the authenticated identity is formed from the configured claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdentityForm {
    /// The claim's value as it is (`auth0|123`).
    #[default]
    Plain,
    /// `<iss>#<value>`: unique across issuers (an issuer URL never contains `#`).
    IssuerQualified,
}

/// A complete, checked validation policy. Build it with [`PolicyBuilder`].
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) issuer: String,
    pub(crate) audiences: Vec<String>,
    pub(crate) skip_audience: bool,
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) leeway_secs: u64,
    pub(crate) required_scopes: Vec<String>,
    pub(crate) accept_generic_typ: bool,
    pub(crate) accept_bound_tokens: bool,
    pub(crate) max_token_bytes: usize,
    pub(crate) identity_claim: ClaimPath,
    pub(crate) identity_fallback: Option<ClaimPath>,
    pub(crate) identity_form: IdentityForm,
    pub(crate) role_claim: Option<ClaimPath>,
    pub(crate) required_claims: RequiredClaims,
    pub(crate) scope_claim: Option<ClaimPath>,
    pub(crate) max_token_age_secs: Option<u64>,
}

impl Policy {
    /// Starts a policy for tokens from `issuer` accepted by one of `audiences`.
    pub fn builder(issuer: impl Into<String>) -> PolicyBuilder {
        PolicyBuilder {
            issuer: issuer.into(),
            audiences: Vec::new(),
            skip_audience: false,
            algorithms: Algorithm::ALL.to_vec(),
            leeway_secs: 30,
            required_scopes: Vec::new(),
            accept_generic_typ: false,
            accept_bound_tokens: false,
            max_token_bytes: MAX_TOKEN_BYTES,
            identity_claim: "sub".to_owned(),
            identity_fallback: None,
            identity_form: IdentityForm::Plain,
            role_claim: None,
            required_claims: RequiredClaims::default(),
            scope_claim: None,
            max_token_age_secs: None,
        }
    }

    /// The expected issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// How the identity is formed (plain, or issuer-qualified).
    pub fn identity_form(&self) -> IdentityForm {
        self.identity_form
    }

    /// The claim the roles are read from, if any.
    pub fn role_claim(&self) -> Option<&str> {
        self.role_claim.as_ref().map(ClaimPath::as_str)
    }

    /// The allowed algorithms.
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    /// Claims every token must carry with the required values.
    pub fn required_claims(&self) -> &RequiredClaims {
        &self.required_claims
    }

    /// The same policy, with these scopes required too (a pg_hba line's).
    pub fn with_required_scopes(&self, more: impl IntoIterator<Item = String>) -> Self {
        let mut p = self.clone();
        for scope in more {
            if !p.required_scopes.contains(&scope) {
                p.required_scopes.push(scope);
            }
        }
        p
    }

    /// Whether audience checking is switched off (tests only).
    pub fn skips_audience(&self) -> bool {
        self.skip_audience
    }
}

/// PostgreSQL's own limit on a bearer token (src/backend/libpq/auth-oauth.c).
pub const MAX_TOKEN_BYTES: usize = 65535;

/// Builds a [`Policy`]; [`PolicyBuilder::build`] refuses unsafe or inconsistent settings.
#[derive(Debug, Clone)]
pub struct PolicyBuilder {
    issuer: String,
    audiences: Vec<String>,
    skip_audience: bool,
    algorithms: Vec<Algorithm>,
    leeway_secs: u64,
    required_scopes: Vec<String>,
    accept_generic_typ: bool,
    accept_bound_tokens: bool,
    max_token_bytes: usize,
    identity_claim: String,
    identity_fallback: Option<String>,
    identity_form: IdentityForm,
    role_claim: Option<String>,
    required_claims: RequiredClaims,
    scope_claim: Option<String>,
    max_token_age_secs: Option<u64>,
}

impl PolicyBuilder {
    /// Accepted audiences: the token's `aud` must contain at least one of them.
    pub fn audiences<I, S>(mut self, audiences: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.audiences = audiences.into_iter().map(Into::into).collect();
        self
    }

    /// INSECURE, for tests only: accept any audience. Tokens issued for other services then
    /// log in here. Logged loudly by every caller that sets it.
    pub fn insecure_skip_audience(mut self, skip: bool) -> Self {
        self.skip_audience = skip;
        self
    }

    /// The algorithm allowlist (default: every [`Algorithm`]).
    pub fn algorithms(mut self, algorithms: Vec<Algorithm>) -> Self {
        self.algorithms = algorithms;
        self
    }

    /// Allowed clock skew for `exp`, `nbf` and `iat`, in seconds (default 30, at most 300).
    pub fn leeway_secs(mut self, secs: u64) -> Self {
        self.leeway_secs = secs;
        self
    }

    /// Scopes the token must grant (through `scope` or `scp`).
    pub fn required_scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.required_scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Also accept `typ` `JWT` or no `typ` at all (Auth0, Entra ID, Keycloak, Kubernetes issue
    /// those). Without this only `at+jwt` (RFC 9068) is accepted.
    pub fn accept_generic_typ(mut self, accept: bool) -> Self {
        self.accept_generic_typ = accept;
        self
    }

    /// Also accept tokens bound to a key (`cnf`: DPoP `jkt`, mTLS `x5t#S256`) as plain bearer
    /// tokens. Off by default: gprxy sees no proof of the key, so a stolen bound token, which its
    /// issuer meant to be useless without the key, would work.
    pub fn accept_bound_tokens(mut self, accept: bool) -> Self {
        self.accept_bound_tokens = accept;
        self
    }

    /// Maximum token size in bytes (default and upper bound 65535).
    pub fn max_token_bytes(mut self, max: usize) -> Self {
        self.max_token_bytes = max;
        self
    }

    /// A claim that names the user when the identity claim is absent or empty (`client_id`
    /// for a client-credentials token whose introspection answer has no `sub`).
    pub fn identity_fallback_claim(mut self, claim: Option<String>) -> Self {
        self.identity_fallback = claim;
        self
    }

    /// The claim that names the user (default `sub`): an exact claim name, or a dotted path.
    pub fn identity_claim(mut self, claim: impl Into<String>) -> Self {
        self.identity_claim = claim.into();
        self
    }

    /// Whether the identity is issuer-qualified.
    pub fn identity_form(mut self, form: IdentityForm) -> Self {
        self.identity_form = form;
        self
    }

    /// The claim that lists the user's roles (none by default).
    pub fn role_claim(mut self, claim: Option<String>) -> Self {
        self.role_claim = claim.filter(|c| !c.is_empty());
        self
    }

    /// Claims every token must carry with the required values (none by default).
    pub fn required_claims(mut self, required: RequiredClaims) -> Self {
        self.required_claims = required;
        self
    }

    /// The one claim that grants scopes (`scp` for Entra ID and Okta, `scope` elsewhere): a
    /// space-separated string or an array. None (the default): both `scope` and `scp` count.
    pub fn scope_claim(mut self, claim: Option<String>) -> Self {
        self.scope_claim = claim.filter(|c| !c.is_empty());
        self
    }

    /// The longest lifetime (`exp` - `iat`) a token may have; tokens then need `iat`. None
    /// (the default): any.
    pub fn max_token_age_secs(mut self, secs: Option<u64>) -> Self {
        self.max_token_age_secs = secs;
        self
    }

    /// Checks the settings and returns the policy.
    pub fn build(self) -> Result<Policy, ConfigError> {
        if self.issuer.is_empty() {
            return Err(ConfigError::new(Setting::Issuer, "must not be empty"));
        }
        if self.issuer.contains('#') || self.issuer.contains('?') {
            return Err(ConfigError::new(Setting::Issuer, "must not contain a query or fragment"));
        }
        let audiences: Vec<String> = self.audiences.into_iter().filter(|a| !a.is_empty()).collect();
        if audiences.is_empty() && !self.skip_audience {
            return Err(ConfigError::new(
                Setting::Audience,
                "at least one accepted audience is required (RFC 9068 section 4)",
            ));
        }
        if self.algorithms.is_empty() {
            return Err(ConfigError::new(Setting::Algorithms, "must not be empty"));
        }
        if self.leeway_secs > 300 {
            return Err(ConfigError::new(Setting::Leeway, "at most 300 seconds"));
        }
        if self.max_token_bytes == 0 || self.max_token_bytes > MAX_TOKEN_BYTES {
            return Err(ConfigError::new(
                Setting::MaxTokenBytes,
                format!("must be between 1 and {MAX_TOKEN_BYTES}"),
            ));
        }
        let identity_claim = ClaimPath::parse(&self.identity_claim)
            .map_err(|reason| ConfigError::new(Setting::IdentityClaim, reason))?;
        let identity_fallback = self
            .identity_fallback
            .as_deref()
            .map(ClaimPath::parse)
            .transpose()
            .map_err(|reason| ConfigError::new(Setting::IdentityClaim, reason))?;
        let role_claim = self
            .role_claim
            .as_deref()
            .map(ClaimPath::parse)
            .transpose()
            .map_err(|reason| ConfigError::new(Setting::RoleClaim, reason))?;
        let scope_claim = self
            .scope_claim
            .as_deref()
            .map(ClaimPath::parse)
            .transpose()
            .map_err(|reason| ConfigError::new(Setting::ScopeClaim, reason))?;
        if self.max_token_age_secs == Some(0) {
            return Err(ConfigError::new(Setting::MaxTokenAge, "must be at least 1 second"));
        }
        let required_scopes = self
            .required_scopes
            .into_iter()
            .flat_map(|s| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        let mut algorithms = self.algorithms;
        algorithms.dedup();
        Ok(Policy {
            issuer: self.issuer,
            audiences,
            skip_audience: self.skip_audience,
            algorithms,
            leeway_secs: self.leeway_secs,
            required_scopes,
            accept_generic_typ: self.accept_generic_typ,
            accept_bound_tokens: self.accept_bound_tokens,
            max_token_bytes: self.max_token_bytes,
            identity_claim,
            identity_fallback,
            identity_form: self.identity_form,
            role_claim,
            required_claims: self.required_claims,
            scope_claim,
            max_token_age_secs: self.max_token_age_secs,
        })
    }
}

/// Parses a comma- or space-separated algorithm list (`"RS256, ES256"`).
pub fn parse_algorithms(list: &str) -> Result<Vec<Algorithm>, ConfigError> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.eq_ignore_ascii_case("none") || s.starts_with("HS") {
                Err(ConfigError::new(
                    Setting::Algorithms,
                    format!("{s} is never allowed (unsigned or symmetric)"),
                ))
            } else {
                s.parse()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_required_unless_insecure() {
        let err = Policy::builder("https://idp").build().unwrap_err();
        assert_eq!(err.setting, Setting::Audience);
        assert!(Policy::builder("https://idp").insecure_skip_audience(true).build().is_ok());
    }

    #[test]
    fn algorithm_list_refuses_none_and_hmac() {
        assert_eq!(parse_algorithms("RS256, ES256").unwrap(), vec![Algorithm::RS256, Algorithm::ES256]);
        assert!(parse_algorithms("none").unwrap_err().reason.contains("never allowed"));
        assert!(parse_algorithms("HS256").unwrap_err().reason.contains("never allowed"));
        assert!(parse_algorithms("RS257").unwrap_err().reason.contains("unknown"));
    }

    #[test]
    fn leeway_and_size_bounded() {
        let b = || Policy::builder("https://idp").audiences(["a"]);
        assert_eq!(b().leeway_secs(301).build().unwrap_err().setting, Setting::Leeway);
        assert_eq!(b().max_token_bytes(70000).build().unwrap_err().setting, Setting::MaxTokenBytes);
        assert_eq!(b().identity_claim("").build().unwrap_err().setting, Setting::IdentityClaim);
    }

    #[test]
    fn issuer_with_fragment_refused() {
        assert_eq!(
            Policy::builder("https://idp#x").audiences(["a"]).build().unwrap_err().setting,
            Setting::Issuer
        );
    }
}
