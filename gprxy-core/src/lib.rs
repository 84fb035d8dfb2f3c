//! gprxy-core: the one implementation of "is this bearer token good, and who is it", shared by
//! the PostgreSQL extension and the proxy.
//!
//! - [`Validator`] checks a JWT access token against a [`Policy`] (RFC 9068, RFC 8725).
//! - [`JwksCache`] fetches and caches the issuer's keys ([`KeySource`]).
//! - [`jose`] verifies compact JWS signatures strictly.
//! - [`context`] signs and verifies fallback mode's per-connection session context.
//!
//! Pure Rust: no pgrx, no async runtime.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod algorithm;
pub mod claims;
pub mod context;
pub mod error;
pub mod fetch;
pub mod introspect;
pub mod issuers;
pub mod jose;
pub mod jwk;
pub mod jwks;
pub mod policy;
pub mod prepare;
pub mod provision;
pub mod required;
pub mod session;
#[cfg(feature = "testkit")]
#[allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
pub mod testkit;
pub mod validate;

pub use algorithm::Algorithm;
pub use error::{ConfigError, KeyError, Malformed, Quoted, Setting, ValidationError};
pub use fetch::{Fetcher, FormPoster, HttpResponse, HttpSettings, LazyFetcher, UreqFetcher};
pub use introspect::{validate_token, AnswerStore, Introspector, MemoryAnswers, TokenMode};
pub use issuers::{IssuerEntry, IssuerPolicy, IssuerSet, IssuersError, Profile};
pub use jose::{fingerprint, peek_claim, peek_unverified, KeySource, Unverified};
pub use jwk::{KeySet, VerifyKey};
pub use jwks::{
    issuer_metadata, unix_time, CacheSettings, Clock, FetchState, JwksCache, JwksSource, KeyShare,
    MemoryShare, Snapshot, SystemClock,
};
pub use policy::{parse_algorithms, IdentityForm, Policy, PolicyBuilder, MAX_TOKEN_BYTES};
pub use prepare::prepare_process;
pub use required::{Constraint, RequiredClaim, RequiredClaims};
pub use session::{EndHow, EndReason, SessionMode, SessionPlan, SessionPolicy};
pub use validate::{ValidatedToken, Validator};
