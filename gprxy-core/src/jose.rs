//! Compact JWS (RFC 7515) parsing and signature verification, strict.
//!
//! Order of checks: size, characters, shape, header, algorithm, key, signature. The payload is
//! parsed only after the signature verifies. Header fields `jku`, `x5u`, `jwk` and `x5c` are never
//! used to find a key: keys come only from the issuer's configured key set.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

use crate::algorithm::Algorithm;
use crate::claims::parse_object;
use crate::error::{Malformed, ValidationError};
use crate::jwk::{KeySet, VerifyKey};

/// JOSE algorithm names that are registered but never accepted by gprxy.
const FORBIDDEN_ALGS: [&str; 7] = ["HS256", "HS384", "HS512", "ES512", "ES256K", "Ed448", "RS1"];

/// Where keys come from: a fixed [`KeySet`], or the caching [`crate::JwksCache`].
pub trait KeySource {
    /// The key for a token's `kid` and `alg`, or why there is none.
    fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<VerifyKey>, ValidationError>;
}

impl KeySource for KeySet {
    fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<VerifyKey>, ValidationError> {
        self.find(kid, alg)
    }
}

/// The protected header fields gprxy reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The signature algorithm.
    pub alg: Algorithm,
    /// The key id, if any.
    pub kid: Option<String>,
    /// The token type, if any.
    pub typ: Option<String>,
}

/// A JWS whose signature verified.
#[derive(Debug)]
pub struct Verified {
    /// Its header.
    pub header: Header,
    /// Its decoded payload.
    pub payload: Vec<u8>,
}

/// The three parts of a compact JWS, checked for shape only.
struct Parts<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
}

fn split(token: &str) -> Result<Parts<'_>, Malformed> {
    if token.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(Malformed::Whitespace);
    }
    if token.contains('=') {
        return Err(Malformed::Padding);
    }
    let mut it = token.split('.');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(header), Some(payload), Some(signature), None) => Ok(Parts { header, payload, signature }),
        _ if token.split('.').count() == 5 => Err(Malformed::Encrypted),
        _ => Err(Malformed::PartCount),
    }
}

fn decode_part(part: &str) -> Result<Vec<u8>, Malformed> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| Malformed::Base64)
}

fn decode_header_object(part: &str) -> Result<Map<String, Value>, Malformed> {
    if part.is_empty() {
        return Err(Malformed::Empty);
    }
    parse_object(&decode_part(part)?)
}

fn opt_string(h: &Map<String, Value>, key: &str) -> Result<Option<String>, ValidationError> {
    match h.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ValidationError::Malformed(Malformed::HeaderType)),
    }
}

fn parse_header(h: &Map<String, Value>, allowed: &[Algorithm]) -> Result<Header, ValidationError> {
    let alg = match h.get("alg") {
        None => return Err(ValidationError::AlgMissing),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(ValidationError::Malformed(Malformed::HeaderType)),
    };
    if alg.eq_ignore_ascii_case("none") {
        return Err(ValidationError::AlgNone);
    }
    let alg = match Algorithm::from_name(alg) {
        Some(a) if allowed.contains(&a) => a,
        Some(_) => return Err(ValidationError::AlgNotAllowed(alg.into())),
        None if FORBIDDEN_ALGS.contains(&alg) => return Err(ValidationError::AlgNotAllowed(alg.into())),
        None => return Err(ValidationError::AlgUnknown(alg.into())),
    };
    // RFC 7515 4.1.11: a recipient must refuse critical extensions it does not understand;
    // gprxy understands none. An empty or ill-typed `crit` is refused too.
    match h.get("crit") {
        None => {}
        Some(Value::Array(names)) => {
            let first = names.first().and_then(Value::as_str).unwrap_or("");
            return Err(ValidationError::CritUnsupported(first.into()));
        }
        Some(_) => return Err(ValidationError::Malformed(Malformed::HeaderType)),
    }
    // RFC 7797 unencoded payloads change what is signed; refuse rather than misread.
    if h.get("b64").is_some_and(|v| v != &Value::Bool(true)) {
        return Err(ValidationError::CritUnsupported("b64".into()));
    }
    Ok(Header { alg, kid: opt_string(h, "kid")?, typ: opt_string(h, "typ")? })
}

/// Verifies a compact JWS against keys from `keys`, with algorithms limited to `allowed`.
pub fn verify_compact(
    token: &str,
    allowed: &[Algorithm],
    keys: &dyn KeySource,
) -> Result<Verified, ValidationError> {
    let parts = split(token).map_err(ValidationError::Malformed)?;
    let header_obj = decode_header_object(parts.header).map_err(ValidationError::Malformed)?;
    let header = parse_header(&header_obj, allowed)?;
    let key = keys.key(header.kid.as_deref(), header.alg)?;
    let decoding = key.check_fits(header.alg)?;
    if parts.signature.is_empty() {
        return Err(ValidationError::BadSignature);
    }
    let signed = &token[..parts.header.len() + 1 + parts.payload.len()];
    match jsonwebtoken::crypto::verify(parts.signature, signed.as_bytes(), decoding, header.alg.to_jwt()) {
        Ok(true) => {}
        Ok(false) => return Err(ValidationError::BadSignature),
        Err(e) => {
            return Err(match e.kind() {
                jsonwebtoken::errors::ErrorKind::Base64(_) => ValidationError::Malformed(Malformed::Base64),
                _ => ValidationError::BadSignature,
            })
        }
    }
    let payload = decode_part(parts.payload).map_err(ValidationError::Malformed)?;
    Ok(Verified { header, payload })
}

/// Fields read from a token without verifying it, for logs only (the proxy logs who tried).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unverified {
    /// Header `alg`.
    pub alg: Option<String>,
    /// Header `kid`.
    pub kid: Option<String>,
    /// Claim `sub`.
    pub sub: Option<String>,
    /// Claim `iss`.
    pub iss: Option<String>,
    /// Claim `exp`.
    pub exp: Option<i64>,
}

/// Reads `alg`, `kid`, `sub`, `iss` and `exp` without any check. Never use for a decision.
pub fn peek_unverified(token: &str) -> Unverified {
    let mut out = Unverified::default();
    let Ok(parts) = split(token) else { return out };
    let s = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    if let Ok(h) = decode_header_object(parts.header) {
        out.alg = s(&h, "alg");
        out.kid = s(&h, "kid");
    }
    if let Some(c) = unverified_claims(token) {
        out.sub = s(&c, "sub");
        out.iss = s(&c, "iss");
        out.exp = c.get("exp").and_then(Value::as_i64);
    }
    out
}

/// The payload as a JSON object, without any check.
fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    let parts = split(token).ok()?;
    decode_part(parts.payload).ok().and_then(|p| parse_object(&p).ok())
}

/// One claim (exact name or dotted path) read without any check, as text. For logs only: the
/// identity a refused token claimed.
pub fn peek_claim(token: &str, claim: &str) -> Option<String> {
    let claims = unverified_claims(token)?;
    match crate::claims::ClaimPath::parse(claim).ok()?.lookup(&claims)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A short fingerprint of a token for logs: the first 12 hex digits of its SHA-256.
pub fn fingerprint(token: &[u8]) -> String {
    // aws-lc's SHA-256: the signature check runs the same code, so a new process faults in no
    // other hash implementation for this.
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    digest.as_ref()[..6]
        .iter()
        .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn fingerprint_is_the_first_six_bytes_of_sha256_in_hex() {
        // SHA-256("abc") = ba7816bf 8f01cfea ... (FIPS 180-2, appendix B.1).
        assert_eq!(super::fingerprint(b"abc"), "ba7816bf8f01");
    }
}
