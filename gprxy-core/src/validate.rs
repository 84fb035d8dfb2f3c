//! JWT access-token validation (RFC 9068, RFC 8725) on top of [`crate::jose`].

use serde_json::{Map, Value};

use crate::algorithm::Algorithm;
use crate::claims::{granted_scopes, parse_object, scopes_of, string_list};
use crate::error::{Quoted, ValidationError};
use crate::jose::{fingerprint, verify_compact, KeySource};
use crate::policy::{IdentityForm, Policy};

/// A token that passed every check, with what callers need from it.
#[derive(Debug, Clone)]
pub struct ValidatedToken {
    /// The authenticated identity (the configured claim, perhaps issuer-qualified).
    pub identity: String,
    /// `sub`, if present.
    pub subject: Option<String>,
    /// `iss`.
    pub issuer: String,
    /// Roles from the configured role claim (empty without one).
    pub roles: Vec<String>,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// `exp`.
    pub expires_at: i64,
    /// The header's `kid`.
    pub kid: Option<String>,
    /// The header's `alg` (`None` for an opaque token checked by introspection).
    pub alg: Option<Algorithm>,
    /// A short fingerprint of the token for logs.
    pub fingerprint: String,
    /// Every claim, for callers that expose them to SQL.
    pub claims: Map<String, Value>,
}

/// Validates tokens against one [`Policy`].
#[derive(Debug, Clone)]
pub struct Validator {
    policy: Policy,
}

/// A NumericDate claim (RFC 7519 section 2): a JSON number, possibly fractional.
fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, ValidationError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f.floor() as i64))
            .map(Some)
            .ok_or(ValidationError::TimeClaimInvalid(name)),
        Some(_) => Err(ValidationError::TimeClaimInvalid(name)),
    }
}

fn typ_is_at_jwt(typ: &str) -> bool {
    let t = typ.strip_prefix("application/").unwrap_or(typ);
    t.eq_ignore_ascii_case("at+jwt")
}

impl Validator {
    /// A validator for `policy`.
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Validates `token` at time `now` (seconds since the epoch) with keys from `keys`.
    pub fn validate(
        &self,
        token: &str,
        keys: &dyn KeySource,
        now: i64,
    ) -> Result<ValidatedToken, ValidationError> {
        let p = &self.policy;
        if token.len() > p.max_token_bytes {
            return Err(ValidationError::TooLarge { size: token.len(), max: p.max_token_bytes });
        }
        // RFC 9068 section 4: the issuer first. A token that names another issuer is refused
        // before any key is looked up, so it costs the issuer no key-set request (the signature
        // is still what makes a token valid: a matching `iss` only lets it go on).
        if let Some(iss) = crate::jose::peek_unverified(token).iss.filter(|i| *i != p.issuer) {
            return Err(ValidationError::IssuerMismatch {
                got: Quoted::new(&iss),
                expected: Quoted::new(&p.issuer),
            });
        }
        let verified = verify_compact(token, &p.algorithms, keys)?;
        let header = verified.header;

        match header.typ.as_deref() {
            Some(t) if typ_is_at_jwt(t) => {}
            Some(t) if p.accept_generic_typ && t.eq_ignore_ascii_case("JWT") => {}
            None if p.accept_generic_typ => {}
            other => return Err(ValidationError::TypeNotAccepted(other.unwrap_or("(none)").into())),
        }

        let claims = parse_object(&verified.payload).map_err(ValidationError::ClaimsMalformed)?;
        self.check_claims(claims, now, token, header.kid, Some(header.alg))
    }

    /// Checks claims against the policy: a verified JWT's, or an introspection answer's (whose
    /// `token` is opaque: only its fingerprint is kept). Time claims, `iss`, `aud`, scopes,
    /// required claims and the identity, as for any token.
    pub fn check_claims(
        &self,
        claims: Map<String, Value>,
        now: i64,
        token: &str,
        kid: Option<String>,
        alg: Option<Algorithm>,
    ) -> Result<ValidatedToken, ValidationError> {
        let p = &self.policy;
        let leeway = p.leeway_secs as i64;

        // A token bound to a key (RFC 9449 DPoP, RFC 8705 mTLS) is only as good as the proof of
        // that key, which never reaches gprxy.
        if claims.contains_key("cnf") && !p.accept_bound_tokens {
            return Err(ValidationError::TokenBound);
        }
        let exp = time_claim(&claims, "exp")?.ok_or(ValidationError::ExpMissing)?;
        if now >= exp.saturating_add(leeway) {
            return Err(ValidationError::Expired { exp, now, leeway: p.leeway_secs });
        }
        if let Some(nbf) = time_claim(&claims, "nbf")? {
            if nbf > now.saturating_add(leeway) {
                return Err(ValidationError::NotYetValid { nbf, now });
            }
        }
        let iat = time_claim(&claims, "iat")?;
        if let Some(iat) = iat {
            if iat > now.saturating_add(leeway) {
                return Err(ValidationError::IssuedInFuture { iat, now });
            }
        }
        if let Some(max) = p.max_token_age_secs {
            let lifetime = exp.saturating_sub(iat.ok_or(ValidationError::IatMissing)?);
            if lifetime > i64::try_from(max).unwrap_or(i64::MAX) {
                return Err(ValidationError::LifetimeTooLong { lifetime, max });
            }
        }

        let issuer = match claims.get("iss") {
            None => return Err(ValidationError::IssuerMissing),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(ValidationError::IssuerInvalid),
        };
        if issuer != p.issuer {
            return Err(ValidationError::IssuerMismatch {
                got: Quoted::new(&issuer),
                expected: Quoted::new(&p.issuer),
            });
        }

        if !p.skip_audience {
            let accepted = |a: &str| p.audiences.iter().any(|x| x == a);
            let ok = match claims.get("aud") {
                None => return Err(ValidationError::AudienceMissing),
                Some(Value::String(a)) => accepted(a),
                Some(Value::Array(list)) => {
                    if !list.iter().all(Value::is_string) {
                        return Err(ValidationError::AudienceInvalid);
                    }
                    list.iter().filter_map(Value::as_str).any(accepted)
                }
                Some(_) => return Err(ValidationError::AudienceInvalid),
            };
            if !ok {
                return Err(ValidationError::AudienceMismatch);
            }
        }

        let scopes = match &p.scope_claim {
            None => granted_scopes(&claims),
            Some(path) => scopes_of(path.lookup(&claims)),
        };
        if let Some(missing) = p.required_scopes.iter().find(|r| !scopes.contains(r)) {
            return Err(ValidationError::ScopeMissing(Quoted::new(missing)));
        }
        p.required_claims.check(&claims)?;

        let named = |path: &crate::claims::ClaimPath| match path.lookup(&claims) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let value = named(&p.identity_claim)
            .or_else(|| p.identity_fallback.as_ref().and_then(named))
            .ok_or_else(|| ValidationError::IdentityMissing(p.identity_claim.as_str().into()))?;
        let identity = match p.identity_form {
            IdentityForm::Plain => value,
            IdentityForm::IssuerQualified => format!("{issuer}#{value}"),
        };
        let roles = p.role_claim.as_ref().map(|c| string_list(c.lookup(&claims))).unwrap_or_default();

        Ok(ValidatedToken {
            identity,
            subject: claims.get("sub").and_then(Value::as_str).map(str::to_owned),
            issuer,
            roles,
            scopes,
            expires_at: exp,
            kid,
            alg,
            fingerprint: fingerprint(token.as_bytes()),
            claims,
        })
    }
}
