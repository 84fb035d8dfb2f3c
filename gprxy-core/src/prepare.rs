//! Work every process would otherwise repeat on its first validation, done once ahead of time.
//!
//! PostgreSQL forks one process per connection. Whatever a login builds on first use it builds on
//! every login, unless the postmaster built it before the fork: CPU feature detection for SHA-256
//! and the signature code (CPUID, which traps to the hypervisor on a virtual machine, tens of
//! microseconds each) and the crypto library's lazily built curve tables. The validator calls
//! [`prepare_process`] at preload; forked backends inherit the result.

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

const MESSAGE: &[u8] = b"gprxy: prepare the process";
/// A P-256 public key and its signature of [`MESSAGE`], made once for this purpose (no secret).
const P256_PUBLIC: &str = "048ceea3dfa58c6d50a1b710d3330c900d3e9e985d75f11255ffbbb633587d44d457c9d588d79216bd894af01b3c5f31afde5c25cc325c6b49588fc6c6bbd91495";
const P256_SIGNATURE: &str = "6d3283c171505d85163caada779d2d759a38ee347836af58179115b4d470e9dde31b38a9d9898067f775086da9f8ea2fc807987a8e9285e869e72acdcba6dc62";
/// The same for P-384.
const P384_PUBLIC: &str = "04b929ba2b18b33f67f627a01d7fbbe2dbdfc8c343a21c22b5047c5e82d09f7a4e8a247574c677ab1b356ffc1a60f6bb12a288d6c38235401332765ab58aa3aefd09ef2268aafb04e313c8168edbf4a4c5bd16957e45a77db88586f554daeb12b7";
const P384_SIGNATURE: &str = "1a306e0fec50b71ba739f9f5f61d7944a44adfbb0d238f78c9a5afc83291e03a2d096468484b8b4fceec7f8dd00185e2d9339027ad1f42c42bb971b09f623c56216269a9d47cac4b779f89e9b2275b38eeddeeaa7fac3b6ab95448c0fb51ae7c";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

/// Initialises the crypto library, detects CPU features and builds the curve tables, by verifying
/// one signature per curve. Uses no randomness (safe before a fork). Returns whether every check
/// verified, which only a broken crypto library would make false.
pub fn prepare_process() -> bool {
    aws_lc_rs::init();
    let _ = crate::jose::fingerprint(MESSAGE);
    let mut ok = true;
    for (alg, public, sig) in [
        (&signature::ECDSA_P256_SHA256_FIXED, P256_PUBLIC, P256_SIGNATURE),
        (&signature::ECDSA_P384_SHA384_FIXED, P384_PUBLIC, P384_SIGNATURE),
    ] {
        ok &= UnparsedPublicKey::new(alg, unhex(public)).verify(MESSAGE, &unhex(sig)).is_ok();
    }
    // Ed25519 signing is deterministic: a fixed seed needs no randomness.
    match Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]) {
        Ok(pair) => {
            let sig = pair.sign(MESSAGE);
            ok &= UnparsedPublicKey::new(&signature::ED25519, pair.public_key().as_ref())
                .verify(MESSAGE, sig.as_ref())
                .is_ok();
        }
        Err(_) => ok = false,
    }
    ok
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_check_verifies() {
        assert!(super::prepare_process());
    }

    #[test]
    fn a_changed_message_would_not_verify() {
        use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
        let key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, super::unhex(super::P256_PUBLIC));
        assert!(key.verify(b"another message", &super::unhex(super::P256_SIGNATURE)).is_err());
    }
}
