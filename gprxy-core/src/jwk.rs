//! JSON Web Keys (RFC 7517) for signature verification, parsed once into ready-to-use keys.
//!
//! A key set keeps every key the issuer publishes, also the ones gprxy cannot use (encryption
//! keys, HMAC secrets, unknown curves): a token that names such a key by `kid` gets an error that
//! says why, instead of "unknown kid".

use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::DecodingKey;
use serde_json::{Map, Value};

use crate::algorithm::Algorithm;
use crate::error::{KeyMismatch, Quoted, ValidationError};

/// Most keys kept from one key set; the rest are ignored (real issuers publish a handful).
pub const MAX_KEYS: usize = 64;

/// Smallest RSA modulus accepted (RFC 8725 section 3.5, NIST SP 800-131A).
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

#[derive(Clone)]
enum Material {
    Rsa {
        bits: usize,
    },
    Ec(Curve),
    Ed25519,
    /// A key gprxy cannot verify with; the reason says why.
    Unusable(KeyMismatch),
}

/// One public key. Its material is parsed and checked on first use, once: a login needs only the
/// key its token names.
pub struct VerifyKey {
    kid: Option<String>,
    declared_alg: Option<String>,
    for_signatures: bool,
    jwk: Map<String, Value>,
    parsed: OnceLock<(Material, Option<DecodingKey>)>,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.declared_alg)
            .finish_non_exhaustive()
    }
}

fn b64(v: Option<&Value>, what: &'static str) -> Result<Vec<u8>, KeyMismatch> {
    let s = v.and_then(Value::as_str).ok_or(KeyMismatch::Invalid(what))?;
    URL_SAFE_NO_PAD.decode(s).map_err(|_| KeyMismatch::Invalid(what))
}

impl VerifyKey {
    /// Parses one JWK object. Never fails: a key that cannot be used is kept as unusable.
    pub fn from_jwk(jwk: Map<String, Value>) -> Self {
        let str_field = |k: &str| jwk.get(k).and_then(Value::as_str).map(str::to_owned);
        let for_signatures = match (jwk.get("use"), jwk.get("key_ops")) {
            (Some(u), _) if u.as_str() != Some("sig") => false,
            (_, Some(Value::Array(ops))) => ops.iter().any(|o| o.as_str() == Some("verify")),
            (_, Some(_)) => false,
            _ => true,
        };
        let (kid, declared_alg) = (str_field("kid"), str_field("alg"));
        Self { kid, declared_alg, for_signatures, jwk, parsed: OnceLock::new() }
    }

    fn material(&self) -> &(Material, Option<DecodingKey>) {
        self.parsed.get_or_init(|| match Self::parse_material(&self.jwk) {
            Ok((m, d)) => (m, Some(d)),
            Err(reason) => (Material::Unusable(reason), None),
        })
    }

    fn parse_material(jwk: &Map<String, Value>) -> Result<(Material, DecodingKey), KeyMismatch> {
        let kty = jwk.get("kty").and_then(Value::as_str).ok_or(KeyMismatch::Invalid("kty"))?;
        match kty {
            "RSA" => {
                let n = b64(jwk.get("n"), "n")?;
                let e = b64(jwk.get("e"), "e")?;
                let n_trimmed = match n.iter().position(|&b| b != 0) {
                    Some(i) => &n[i..],
                    None => return Err(KeyMismatch::Invalid("n")),
                };
                let bits = n_trimmed.len() * 8 - n_trimmed[0].leading_zeros() as usize;
                if e.is_empty() || e.len() > 8 {
                    return Err(KeyMismatch::Invalid("e"));
                }
                Ok((Material::Rsa { bits }, DecodingKey::from_rsa_raw_components(n_trimmed, &e)))
            }
            "EC" => {
                let crv = jwk.get("crv").and_then(Value::as_str).unwrap_or("");
                let (curve, len) = match crv {
                    "P-256" => (Curve::P256, 32),
                    "P-384" => (Curve::P384, 48),
                    other => return Err(KeyMismatch::Curve(other.to_owned())),
                };
                let x = b64(jwk.get("x"), "x")?;
                let y = b64(jwk.get("y"), "y")?;
                if x.len() != len || y.len() != len {
                    return Err(KeyMismatch::Invalid("coordinate length"));
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Ok((Material::Ec(curve), DecodingKey::from_ec_der(&point)))
            }
            "OKP" => {
                let crv = jwk.get("crv").and_then(Value::as_str).unwrap_or("");
                if crv != "Ed25519" {
                    return Err(KeyMismatch::Curve(crv.to_owned()));
                }
                let x = b64(jwk.get("x"), "x")?;
                if x.len() != 32 {
                    return Err(KeyMismatch::Invalid("x"));
                }
                Ok((Material::Ed25519, DecodingKey::from_ed_der(&x)))
            }
            other => Err(KeyMismatch::KeyType(other.to_owned())),
        }
    }

    /// The key's `kid`, if it has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// Checks that this key may verify a signature made with `alg`.
    pub fn check_fits(&self, alg: Algorithm) -> Result<&DecodingKey, ValidationError> {
        let kid = || Quoted::new(self.kid.as_deref().unwrap_or("-"));
        if !self.for_signatures {
            return Err(ValidationError::KeyUsage(kid()));
        }
        let mismatch = |reason| ValidationError::KeyMismatch { kid: kid(), alg, reason };
        let (material, decoding) = self.material();
        use Algorithm::*;
        match (material, alg) {
            (Material::Unusable(reason), _) => return Err(mismatch(reason.clone())),
            (Material::Rsa { bits }, RS256 | RS384 | RS512 | PS256 | PS384 | PS512) => {
                if *bits < MIN_RSA_BITS {
                    return Err(mismatch(KeyMismatch::RsaTooSmall(*bits)));
                }
            }
            (Material::Ec(Curve::P256), ES256) | (Material::Ec(Curve::P384), ES384) => {}
            (Material::Ec(c), ES256 | ES384) => {
                let name = if *c == Curve::P256 { "P-256" } else { "P-384" };
                return Err(mismatch(KeyMismatch::Curve(name.to_owned())));
            }
            (Material::Ed25519, EdDSA) => {}
            (m, _) => {
                let kty = match m {
                    Material::Rsa { .. } => "RSA",
                    Material::Ec(_) => "EC",
                    _ => "OKP",
                };
                return Err(mismatch(KeyMismatch::KeyType(kty.to_owned())));
            }
        }
        if let Some(declared) = &self.declared_alg {
            if declared != alg.name() {
                return Err(mismatch(KeyMismatch::DeclaredAlg(declared.clone())));
            }
        }
        decoding.as_ref().ok_or_else(|| mismatch(KeyMismatch::Invalid("key")))
    }
}

/// A set of verification keys, as published at an issuer's `jwks_uri`.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
}

impl KeySet {
    /// Parses a JWK Set document (`{"keys": [...]}`), or a single JWK.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let doc = crate::claims::parse_object(bytes).map_err(|e| format!("key set: {e}"))?;
        Self::from_object(doc)
    }

    /// As [`KeySet::from_json`], from a parsed object.
    pub fn from_object(mut doc: Map<String, Value>) -> Result<Self, String> {
        let keys = match doc.remove("keys") {
            Some(Value::Array(keys)) => keys
                .into_iter()
                .filter_map(|k| match k {
                    Value::Object(k) => Some(k),
                    _ => None,
                })
                .take(MAX_KEYS)
                .map(|k| Arc::new(VerifyKey::from_jwk(k)))
                .collect(),
            Some(_) => return Err("\"keys\" is not an array".to_owned()),
            None if doc.contains_key("kty") => vec![Arc::new(VerifyKey::from_jwk(doc))],
            None => return Err("no \"keys\" array".to_owned()),
        };
        Ok(Self { keys })
    }

    /// Number of keys (usable or not).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set has no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a key with this `kid` exists.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Finds the key for a token's `kid` and `alg`. With a `kid`, the key with that id (preferring
    /// one that fits `alg` when ids repeat); without, the only key that fits `alg`.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<VerifyKey>, ValidationError> {
        match kid {
            Some(kid) => {
                let mut named = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid));
                let first = named.next().ok_or_else(|| ValidationError::KidUnknown(kid.into()))?;
                if first.check_fits(alg).is_ok() {
                    return Ok(first.clone());
                }
                Ok(named.find(|k| k.check_fits(alg).is_ok()).unwrap_or(first).clone())
            }
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.check_fits(alg).is_ok());
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Ok(k.clone()),
                    (Some(_), Some(_)) => Err(ValidationError::KidMissing(alg)),
                    (None, _) => Err(ValidationError::NoKeyForAlg(alg)),
                }
            }
        }
    }
}
