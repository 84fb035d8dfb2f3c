//! The signed session context of fallback mode: how the proxy hands a pooled server connection
//! the identity of its current user so that only the proxy can set it.
//!
//! The proxy makes one Ed25519 key pair per server connection and sends the public half in the
//! startup packet (`gprxy.context_key`), which nothing after connection start can change. For
//! each client session it signs `{"n": counter, "sub", "roles", "claims"}` with the private half;
//! gprxy_validator's `gprxy.set_context(text)` accepts a context only if the signature verifies
//! against the startup key and the counter is above every counter it accepted before on that
//! connection. A client that reads a context (pg_stat_activity shows queries) cannot use it on
//! another connection (other key) nor on the same one again (counter).
//!
//! Wire form: `v1.<base64url(payload JSON)>.<base64url(signature)>`, the signature over
//! `gprxy-context-v1.` followed by the base64url payload.

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Name of the startup parameter that carries the connection's public key.
pub const KEY_PARAMETER: &str = "gprxy.context_key";
/// Largest context accepted (the claims of a large token plus framing).
pub const MAX_CONTEXT_BYTES: usize = 96 * 1024;
const DOMAIN: &[u8] = b"gprxy-context-v1.";
const PREFIX: &str = "v1.";

/// Why a context was refused. Each is a distinct, stable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// The connection was not started with a context key.
    #[error("no gprxy.context_key was given at connection start")]
    NoKey,
    /// The startup packet named the key more than once.
    #[error("gprxy.context_key was given more than once at connection start")]
    DuplicateKey,
    /// The key is not 32 bytes of base64url.
    #[error("gprxy.context_key is not a base64url Ed25519 public key")]
    BadKey,
    /// Not of the form `v1.<payload>.<signature>`, or larger than the limit.
    #[error("the context is malformed")]
    Malformed,
    /// The signature does not verify against this connection's key.
    #[error("the context signature does not verify against this connection's key")]
    BadSignature,
    /// The counter is not above the last accepted one.
    #[error("the context counter {got} is not above {last} (replayed context)")]
    Replayed {
        /// Counter in the refused context.
        got: u64,
        /// Highest counter accepted before on this connection.
        last: u64,
    },
    /// The payload is not the expected JSON.
    #[error("the context payload is not valid: {0}")]
    Payload(String),
}

/// The identity a context carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Counter, above every earlier one on the connection.
    pub n: u64,
    /// The token's subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Roles from the configured role claim.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The validated claims.
    pub claims: Map<String, Value>,
}

/// The proxy's half: one per server connection.
pub struct ContextSigner {
    key: Ed25519KeyPair,
    public: String,
    counter: u64,
}

impl std::fmt::Debug for ContextSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextSigner").field("public", &self.public).field("counter", &self.counter).finish()
    }
}

impl ContextSigner {
    /// A fresh key pair.
    pub fn generate() -> Result<Self, ContextError> {
        let key = Ed25519KeyPair::generate().map_err(|_| ContextError::BadKey)?;
        let public = B64.encode(key.public_key().as_ref());
        Ok(Self { key, public, counter: 0 })
    }

    /// The value of the `gprxy.context_key` startup parameter.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// Signs the next context for this connection.
    pub fn sign(&mut self, sub: Option<String>, roles: Vec<String>, claims: Map<String, Value>) -> String {
        self.counter += 1;
        let payload = Context { n: self.counter, sub, roles, claims };
        let json = serde_json::to_vec(&payload).unwrap_or_default();
        let body = B64.encode(json);
        let mut message = DOMAIN.to_vec();
        message.extend_from_slice(body.as_bytes());
        let sig = self.key.sign(&message);
        format!("{PREFIX}{body}.{}", B64.encode(sig.as_ref()))
    }
}

/// Verifies `context` against the connection's startup key and the last accepted counter.
pub fn verify(key_b64: &str, context: &str, last: u64) -> Result<Context, ContextError> {
    let key = B64.decode(key_b64.trim()).map_err(|_| ContextError::BadKey)?;
    if key.len() != 32 {
        return Err(ContextError::BadKey);
    }
    if context.len() > MAX_CONTEXT_BYTES {
        return Err(ContextError::Malformed);
    }
    let rest = context.strip_prefix(PREFIX).ok_or(ContextError::Malformed)?;
    let (body, sig) = rest.split_once('.').ok_or(ContextError::Malformed)?;
    let sig = B64.decode(sig).map_err(|_| ContextError::Malformed)?;
    let mut message = DOMAIN.to_vec();
    message.extend_from_slice(body.as_bytes());
    UnparsedPublicKey::new(&signature::ED25519, &key)
        .verify(&message, &sig)
        .map_err(|_| ContextError::BadSignature)?;
    let json = B64.decode(body).map_err(|_| ContextError::Malformed)?;
    let ctx: Context = serde_json::from_slice(&json).map_err(|e| ContextError::Payload(e.to_string()))?;
    if ctx.n <= last {
        return Err(ContextError::Replayed { got: ctx.n, last });
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(sub: &str) -> Map<String, Value> {
        json!({"sub": sub, "tenant_id": "t1"}).as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn signed_context_verifies_and_carries_the_identity() {
        let mut s = ContextSigner::generate().unwrap();
        let c = s.sign(Some("alice".into()), vec!["writer".into()], claims("alice"));
        let got = verify(s.public_key(), &c, 0).unwrap();
        assert_eq!(got.n, 1);
        assert_eq!(got.sub.as_deref(), Some("alice"));
        assert_eq!(got.roles, vec!["writer".to_owned()]);
        assert_eq!(got.claims["tenant_id"], "t1");
    }

    #[test]
    fn replayed_context_is_refused() {
        let mut s = ContextSigner::generate().unwrap();
        let first = s.sign(None, vec![], claims("a"));
        let second = s.sign(None, vec![], claims("b"));
        assert_eq!(verify(s.public_key(), &second, 1).unwrap().n, 2);
        assert_eq!(verify(s.public_key(), &first, 2), Err(ContextError::Replayed { got: 1, last: 2 }));
        assert_eq!(verify(s.public_key(), &second, 2), Err(ContextError::Replayed { got: 2, last: 2 }));
    }

    #[test]
    fn context_of_another_connection_is_refused() {
        let mut a = ContextSigner::generate().unwrap();
        let b = ContextSigner::generate().unwrap();
        let c = a.sign(None, vec![], claims("a"));
        assert_eq!(verify(b.public_key(), &c, 0), Err(ContextError::BadSignature));
    }

    #[test]
    fn edited_payload_is_refused() {
        let mut s = ContextSigner::generate().unwrap();
        let c = s.sign(Some("alice".into()), vec![], claims("alice"));
        let (head, sig) = c.rsplit_once('.').unwrap();
        let forged_body = B64.encode(br#"{"n":9,"sub":"admin","roles":["admin"],"claims":{}}"#);
        let forged = format!("v1.{forged_body}.{sig}");
        assert_eq!(verify(s.public_key(), &forged, 0), Err(ContextError::BadSignature));
        assert_eq!(verify(s.public_key(), &format!("{head}.AAAA"), 0), Err(ContextError::BadSignature));
    }

    #[test]
    fn malformed_inputs_are_refused() {
        let s = ContextSigner::generate().unwrap();
        assert_eq!(verify(s.public_key(), "", 0), Err(ContextError::Malformed));
        assert_eq!(verify(s.public_key(), "v2.a.b", 0), Err(ContextError::Malformed));
        assert_eq!(verify(s.public_key(), "v1.nodot", 0), Err(ContextError::Malformed));
        assert_eq!(verify(s.public_key(), "v1.a.!!", 0), Err(ContextError::Malformed));
        let huge = format!("v1.{}.x", "a".repeat(MAX_CONTEXT_BYTES));
        assert_eq!(verify(s.public_key(), &huge, 0), Err(ContextError::Malformed));
        assert_eq!(verify("short", "v1.a.b", 0), Err(ContextError::BadKey));
        assert_eq!(verify("", "v1.a.b", 0), Err(ContextError::BadKey));
    }
}
