//! The signed session context of fallback mode: how the proxy hands a pooled server connection
//! the identity of its current user so that only the proxy can set it.
//!
//! Who holds which key: the proxy holds one long-lived Ed25519 private key (a PEM file, never
//! gprxy.toml); the DBA pins its public half in postgresql.conf (`gprxy.context_keys`, at most
//! two so that a rotation runs with the old and the new pinned), with the roles whose sessions
//! may set a context (`gprxy.context_roles`, checked against `session_user`). Nothing a client
//! sends can add a trusted key.
//!
//! Each server connection gets a random nonce in its startup packet (`gprxy.context_nonce`),
//! which nothing after connection start can change. For each client session the proxy signs
//! `{"n": counter, "nonce", "pid", "sub", "roles", "claims"}`; gprxy_validator's
//! `gprxy.set_context(text)` accepts a context only if the signature verifies against a pinned
//! key, the nonce and backend process id are this connection's, and the counter is above every
//! counter it accepted before on that connection. A context read elsewhere (a server log) is
//! refused on another connection (nonce, pid) and on the same one again (counter).
//!
//! Wire form: `v2.<base64url(payload JSON)>.<base64url(signature)>`, the signature over
//! `gprxy-context-v2.` followed by the base64url payload.

use std::sync::Arc;

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Name of the startup parameter that carries the connection's nonce.
pub const NONCE_PARAMETER: &str = "gprxy.context_nonce";
/// Most keys `gprxy.context_keys` may pin (the current one and, during a rotation, the next).
pub const MAX_PINNED_KEYS: usize = 2;
/// Largest context accepted (the claims of a large token plus framing).
pub const MAX_CONTEXT_BYTES: usize = 96 * 1024;
/// Shortest nonce accepted (the proxy sends 32 characters: 24 random bytes).
pub const MIN_NONCE_CHARS: usize = 16;
const DOMAIN: &[u8] = b"gprxy-context-v2.";
const PREFIX: &str = "v2.";

/// Why a context was refused. Each is a distinct, stable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// `gprxy.context_keys` is empty: nothing can be trusted.
    #[error("no context key is pinned (set gprxy.context_keys in postgresql.conf)")]
    NotPinned,
    /// A pinned key or the private key is unusable.
    #[error("{0}")]
    BadKey(String),
    /// The connection was not started with a nonce (or with one too short).
    #[error("no gprxy.context_nonce was given at connection start")]
    NoNonce,
    /// The startup packet named the nonce more than once.
    #[error("gprxy.context_nonce was given more than once at connection start")]
    DuplicateNonce,
    /// Not of the form `v2.<payload>.<signature>`, or larger than the limit.
    #[error("the context is malformed")]
    Malformed,
    /// The signature does not verify against any pinned key.
    #[error("the context signature does not verify against any key in gprxy.context_keys")]
    BadSignature,
    /// Signed for another connection (nonce or backend process id).
    #[error("the context was signed for another connection")]
    OtherConnection,
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

/// The identity a context carries, bound to one server connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Counter, above every earlier one on the connection.
    pub n: u64,
    /// The connection's startup nonce.
    pub nonce: String,
    /// The server process id of the connection (BackendKeyData).
    pub pid: i32,
    /// The token's subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The authenticated identity as the issuer's policy forms it (`gprxy.identity()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Roles from the configured role claim.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The validated claims.
    pub claims: Map<String, Value>,
    /// When the session ends by the proxy's session policy: the server checks it too, at every
    /// statement's start, fast-path call and commit (absent: nothing ends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<ContextEnd>,
}

/// What one context says of its session.
#[derive(Debug, Clone, Default)]
pub struct Signed {
    /// The token's subject.
    pub sub: Option<String>,
    /// The authenticated identity.
    pub identity: Option<String>,
    /// The roles after the issuer's role map.
    pub roles: Vec<String>,
    /// The validated claims.
    pub claims: Map<String, Value>,
    /// The session's end.
    pub end: Option<ContextEnd>,
}

/// A pooled session's end, as the proxy planned it (gprxy_core::session).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextEnd {
    /// Unix seconds at which the end is due.
    pub at: u64,
    /// Unix seconds after which the session ends whatever it is doing (`at` under strict).
    pub hard_at: u64,
    /// Strict: at `at`, mid-transaction if need be.
    pub strict: bool,
    /// What the client reads (the FATAL's message).
    pub message: String,
}

impl ContextEnd {
    /// The end of a session planned by `plan`.
    pub fn of(plan: &crate::SessionPlan) -> Self {
        let (hard_at, strict) = match plan.how {
            crate::EndHow::AtIdle { hard_at } => (hard_at, false),
            crate::EndHow::Now => (plan.end_at, true),
        };
        Self { at: plan.end_at, hard_at, strict, message: plan.reason.client_message() }
    }
}

/// The proxy's long-lived signing key.
pub struct ContextKey {
    pair: Ed25519KeyPair,
    public: String,
}

impl std::fmt::Debug for ContextKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextKey").field("public", &self.public).finish_non_exhaustive()
    }
}

impl ContextKey {
    /// A new key as a PKCS#8 PEM document (what `openssl genpkey -algorithm ed25519` writes).
    pub fn generate_pem() -> Result<String, ContextError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8v1(&rng)
            .map_err(|_| ContextError::BadKey("cannot generate an Ed25519 key".into()))?;
        let b64 = STANDARD.encode(doc.as_ref());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        Ok(pem)
    }

    /// Reads a PKCS#8 PEM Ed25519 private key.
    pub fn from_pem(pem: &[u8]) -> Result<Self, ContextError> {
        let bad =
            |why: &str| ContextError::BadKey(format!("not an Ed25519 private key in PKCS#8 PEM: {why}"));
        let der = match rustls_pemfile::private_key(&mut &pem[..]) {
            Ok(Some(rustls::pki_types::PrivateKeyDer::Pkcs8(d))) => d,
            Ok(Some(_)) => return Err(bad("not PKCS#8")),
            Ok(None) => return Err(bad("no PRIVATE KEY block")),
            Err(_) => return Err(bad("bad PEM")),
        };
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
            .map_err(|_| bad("not an Ed25519 key"))?;
        let public = B64.encode(pair.public_key().as_ref());
        Ok(Self { pair, public })
    }

    /// The public key as `gprxy.context_keys` pins it (base64url, 32 bytes).
    pub fn public_key(&self) -> &str {
        &self.public
    }
}

/// The proxy's half for one server connection: the long-lived key, the connection's nonce and
/// process id, and the counter.
pub struct ContextSigner {
    key: Arc<ContextKey>,
    nonce: String,
    pid: i32,
    counter: u64,
}

impl std::fmt::Debug for ContextSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextSigner")
            .field("public", &self.key.public)
            .field("pid", &self.pid)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl ContextSigner {
    /// A signer for a new server connection, with a fresh random nonce.
    pub fn new(key: Arc<ContextKey>) -> Result<Self, ContextError> {
        let mut raw = [0u8; 24];
        aws_lc_rs::rand::fill(&mut raw)
            .map_err(|_| ContextError::BadKey("no randomness for a nonce".into()))?;
        Ok(Self { key, nonce: B64.encode(raw), pid: 0, counter: 0 })
    }

    /// The value of the `gprxy.context_nonce` startup parameter.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// The public half of the signing key.
    pub fn public_key(&self) -> &str {
        &self.key.public
    }

    /// The server process id of the connection, from its BackendKeyData.
    pub fn bind_backend(&mut self, pid: i32) {
        self.pid = pid;
    }

    /// Signs the next context for this connection.
    pub fn sign(&mut self, sub: Option<String>, roles: Vec<String>, claims: Map<String, Value>) -> String {
        self.sign_ending(Signed { sub, identity: None, roles, claims, end: None })
    }

    /// Signs the next context for this connection, with the identity and the session's end for
    /// the server.
    pub fn sign_ending(&mut self, what: Signed) -> String {
        let Signed { sub, identity, roles, claims, end } = what;
        self.counter += 1;
        let payload = Context {
            n: self.counter,
            nonce: self.nonce.clone(),
            pid: self.pid,
            sub,
            identity,
            roles,
            claims,
            end,
        };
        let json = serde_json::to_vec(&payload).unwrap_or_default();
        let body = B64.encode(json);
        let mut message = DOMAIN.to_vec();
        message.extend_from_slice(body.as_bytes());
        let sig = self.key.pair.sign(&message);
        format!("{PREFIX}{body}.{}", B64.encode(sig.as_ref()))
    }
}

/// Parses `gprxy.context_keys`: at most [`MAX_PINNED_KEYS`] distinct base64 (url-safe or
/// standard) Ed25519 public keys, separated by commas or spaces. Empty pins nothing.
pub fn parse_pinned_keys(v: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    for word in v.split([',', ' ', '\t', '\n']).filter(|w| !w.is_empty()) {
        let normal: String = word
            .trim_end_matches('=')
            .chars()
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        let key = match B64.decode(normal.as_bytes()) {
            Ok(k) if k.len() == 32 => k,
            _ => return Err(format!("{word:?} is not a base64 Ed25519 public key (32 bytes)")),
        };
        if keys.contains(&key) {
            return Err(format!("{word:?} is pinned twice"));
        }
        keys.push(key);
    }
    if keys.len() > MAX_PINNED_KEYS {
        return Err(format!(
            "{} keys pinned; at most {MAX_PINNED_KEYS} (the current one and, during a rotation, the next)",
            keys.len()
        ));
    }
    Ok(keys)
}

/// What ties a context to one server connection.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// The `gprxy.context_nonce` of the connection's startup packet.
    pub nonce: &'a str,
    /// The connection's server process id.
    pub pid: i32,
}

/// Verifies `context` against the pinned keys (`gprxy.context_keys`), this connection's
/// binding and the last accepted counter.
pub fn verify(pinned: &str, binding: Binding<'_>, context: &str, last: u64) -> Result<Context, ContextError> {
    let keys =
        parse_pinned_keys(pinned).map_err(|e| ContextError::BadKey(format!("gprxy.context_keys: {e}")))?;
    if keys.is_empty() {
        return Err(ContextError::NotPinned);
    }
    if binding.nonce.chars().count() < MIN_NONCE_CHARS {
        return Err(ContextError::NoNonce);
    }
    if context.len() > MAX_CONTEXT_BYTES {
        return Err(ContextError::Malformed);
    }
    let rest = context.strip_prefix(PREFIX).ok_or(ContextError::Malformed)?;
    let (body, sig) = rest.split_once('.').ok_or(ContextError::Malformed)?;
    let sig = B64.decode(sig).map_err(|_| ContextError::Malformed)?;
    let mut message = DOMAIN.to_vec();
    message.extend_from_slice(body.as_bytes());
    if !keys.iter().any(|k| UnparsedPublicKey::new(&signature::ED25519, k).verify(&message, &sig).is_ok()) {
        return Err(ContextError::BadSignature);
    }
    let json = B64.decode(body).map_err(|_| ContextError::Malformed)?;
    let ctx: Context = serde_json::from_slice(&json).map_err(|e| ContextError::Payload(e.to_string()))?;
    if ctx.nonce != binding.nonce || ctx.pid != binding.pid {
        return Err(ContextError::OtherConnection);
    }
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

    fn key() -> Arc<ContextKey> {
        Arc::new(ContextKey::from_pem(ContextKey::generate_pem().unwrap().as_bytes()).unwrap())
    }

    fn signer(key: &Arc<ContextKey>, pid: i32) -> ContextSigner {
        let mut s = ContextSigner::new(key.clone()).unwrap();
        s.bind_backend(pid);
        s
    }

    fn on(s: &ContextSigner) -> Binding<'_> {
        Binding { nonce: s.nonce(), pid: s.pid }
    }

    #[test]
    fn signed_context_verifies_and_carries_the_identity() {
        let k = key();
        let mut s = signer(&k, 42);
        let c = s.sign(Some("alice".into()), vec!["writer".into()], claims("alice"));
        let got = verify(k.public_key(), on(&s), &c, 0).unwrap();
        assert_eq!((got.n, got.pid), (1, 42));
        assert_eq!(got.nonce, s.nonce());
        assert_eq!(got.sub.as_deref(), Some("alice"));
        assert_eq!(got.roles, vec!["writer".to_owned()]);
        assert_eq!(got.claims["tenant_id"], "t1");
    }

    #[test]
    fn only_pinned_keys_are_trusted_and_two_may_be_pinned() {
        let (a, b, mallory) = (key(), key(), key());
        let mut sa = signer(&a, 7);
        let mut sb = signer(&b, 7);
        let both = format!("{}, {}", a.public_key(), b.public_key());
        let ca = sa.sign(None, vec![], claims("a"));
        let cb = sb.sign(None, vec![], claims("b"));
        assert!(verify(&both, on(&sa), &ca, 0).is_ok());
        assert!(verify(&both, on(&sb), &cb, 0).is_ok());
        assert_eq!(verify(b.public_key(), on(&sa), &ca, 0), Err(ContextError::BadSignature));
        let mut sm = signer(&mallory, 7);
        let forged = sm.sign(None, vec![], claims("admin"));
        assert_eq!(verify(&both, on(&sm), &forged, 0), Err(ContextError::BadSignature));
        assert_eq!(verify("", on(&sa), &ca, 0), Err(ContextError::NotPinned));
        assert_eq!(verify("  ", on(&sa), &ca, 0), Err(ContextError::NotPinned));
    }

    #[test]
    fn pinned_key_list_is_checked() {
        let (a, b, c) = (key(), key(), key());
        assert_eq!(parse_pinned_keys("").unwrap().len(), 0);
        // Standard base64 with padding is the same key.
        let std_form = STANDARD.encode(B64.decode(a.public_key()).unwrap());
        assert_eq!(parse_pinned_keys(&std_form).unwrap(), parse_pinned_keys(a.public_key()).unwrap());
        let three = format!("{},{},{}", a.public_key(), b.public_key(), c.public_key());
        assert_eq!(
            parse_pinned_keys(&three).unwrap_err(),
            "3 keys pinned; at most 2 (the current one and, during a rotation, the next)"
        );
        let twice = format!("{} {}", a.public_key(), a.public_key());
        assert!(parse_pinned_keys(&twice).unwrap_err().ends_with("is pinned twice"));
        assert_eq!(
            parse_pinned_keys("AAAA").unwrap_err(),
            "\"AAAA\" is not a base64 Ed25519 public key (32 bytes)"
        );
    }

    #[test]
    fn context_of_another_connection_is_refused() {
        let k = key();
        let mut s1 = signer(&k, 100);
        let s2 = signer(&k, 200);
        let c = s1.sign(None, vec![], claims("a"));
        // Another connection's nonce, or its nonce copied into a connection of another process.
        assert_eq!(verify(k.public_key(), on(&s2), &c, 0), Err(ContextError::OtherConnection));
        let copied = Binding { nonce: s1.nonce(), pid: 200 };
        assert_eq!(verify(k.public_key(), copied, &c, 0), Err(ContextError::OtherConnection));
        let short = Binding { nonce: "abc", pid: 100 };
        assert_eq!(verify(k.public_key(), short, &c, 0), Err(ContextError::NoNonce));
    }

    #[test]
    fn replayed_context_is_refused() {
        let k = key();
        let mut s = signer(&k, 1);
        let first = s.sign(None, vec![], claims("a"));
        let second = s.sign(None, vec![], claims("b"));
        assert_eq!(verify(k.public_key(), on(&s), &second, 1).unwrap().n, 2);
        assert_eq!(
            verify(k.public_key(), on(&s), &first, 2),
            Err(ContextError::Replayed { got: 1, last: 2 })
        );
        assert_eq!(
            verify(k.public_key(), on(&s), &second, 2),
            Err(ContextError::Replayed { got: 2, last: 2 })
        );
    }

    #[test]
    fn edited_payload_is_refused() {
        let k = key();
        let mut s = signer(&k, 1);
        let c = s.sign(Some("alice".into()), vec![], claims("alice"));
        let (head, sig) = c.rsplit_once('.').unwrap();
        let forged_body = B64.encode(
            format!(
                r#"{{"n":9,"nonce":"{}","pid":1,"sub":"admin","roles":["admin"],"claims":{{}}}}"#,
                s.nonce()
            )
            .as_bytes(),
        );
        let forged = format!("v2.{forged_body}.{sig}");
        assert_eq!(verify(k.public_key(), on(&s), &forged, 0), Err(ContextError::BadSignature));
        assert_eq!(
            verify(k.public_key(), on(&s), &format!("{head}.AAAA"), 0),
            Err(ContextError::BadSignature)
        );
    }

    #[test]
    fn malformed_inputs_are_refused() {
        let k = key();
        let s = signer(&k, 1);
        let p = k.public_key();
        assert_eq!(verify(p, on(&s), "", 0), Err(ContextError::Malformed));
        assert_eq!(verify(p, on(&s), "v1.a.b", 0), Err(ContextError::Malformed));
        assert_eq!(verify(p, on(&s), "v2.nodot", 0), Err(ContextError::Malformed));
        assert_eq!(verify(p, on(&s), "v2.a.!!", 0), Err(ContextError::Malformed));
        let huge = format!("v2.{}.x", "a".repeat(MAX_CONTEXT_BYTES));
        assert_eq!(verify(p, on(&s), &huge, 0), Err(ContextError::Malformed));
        assert!(matches!(verify("short", on(&s), "v2.a.b", 0), Err(ContextError::BadKey(_))));
        assert!(
            ContextKey::from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err()
        );
        assert!(ContextKey::from_pem(b"").is_err());
    }
}
