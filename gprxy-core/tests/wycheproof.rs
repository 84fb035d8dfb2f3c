//! Wycheproof's JSON Web Signature vectors (tests/data/wycheproof, vendored with their licence).
//!
//! No vector labelled invalid may verify. A vector labelled valid may be refused only by policy
//! (HMAC, or an algorithm outside gprxy's allowlist such as ES512); each such disagreement is
//! printed with its reason. Any other disagreement fails the test.

use std::path::PathBuf;

use gprxy_core::jose::verify_compact;
use gprxy_core::{Algorithm, KeySet, ValidationError};
use serde_json::Value;

fn vectors_path() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/wycheproof");
    root.join("json_web_signature_test.json")
}

/// Why gprxy refuses a vector Wycheproof calls valid, if that refusal is by policy.
fn policy_reason(e: &ValidationError, comment: &str) -> Option<&'static str> {
    use gprxy_core::error::KeyMismatch;
    use gprxy_core::Malformed;
    match e {
        ValidationError::KeyMismatch { reason: KeyMismatch::DeclaredAlg(_), .. } => Some(
            "the JWK declares another \"alg\"; a key is used with that one algorithm only (RFC 8725 3.1)",
        ),
        ValidationError::Malformed(Malformed::Base64) if comment.starts_with("InvalidCharacter") => Some(
            "a character outside base64url inside a part; strict decoding refuses what lenient decoders skip",
        ),
        ValidationError::AlgNotAllowed(a) if a.as_str().starts_with("HS") => {
            Some("HMAC is never accepted for access tokens (symmetric keys can mint tokens)")
        }
        ValidationError::AlgNotAllowed(a) if a.as_str() == "ES512" => {
            Some("ES512 (P-521) is outside the allowlist of RFC 9068 issuers gprxy supports")
        }
        _ => None,
    }
}

#[test]
fn wycheproof_json_web_signature() {
    let path = vectors_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("Wycheproof vectors missing at {}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).expect("vectors are JSON");
    let (mut matched, mut policy_refusals, mut total) = (0, Vec::new(), 0);
    let mut failures = Vec::new();
    for group in doc["testGroups"].as_array().expect("groups") {
        let key = group.get("public").or_else(|| group.get("private")).expect("a key");
        let keys = KeySet::from_object(key.as_object().expect("key object").clone()).expect("key set parses");
        for case in group["tests"].as_array().expect("tests") {
            total += 1;
            let id = case["tcId"].as_u64().unwrap_or(0);
            let jws = case["jws"].as_str().expect("compact jws");
            let expected_valid = case["result"] == "valid";
            let got = verify_compact(jws, &Algorithm::ALL, &keys);
            match (expected_valid, &got) {
                (true, Ok(_)) | (false, Err(_)) => matched += 1,
                (true, Err(e)) => match policy_reason(e, case["comment"].as_str().unwrap_or("")) {
                    Some(why) => policy_refusals.push(format!("tcId {id}: refused ({}) — {why}", e.code())),
                    None => failures.push(format!("tcId {id} ({}): valid but refused: {e}", case["comment"])),
                },
                (false, Ok(_)) => {
                    failures.push(format!("tcId {id} ({}): INVALID BUT ACCEPTED", case["comment"]))
                }
            }
        }
    }
    println!(
        "wycheproof JWS: {total} vectors, {matched} matched, {} refused by policy, {} disagreements",
        policy_refusals.len(),
        failures.len()
    );
    for r in &policy_refusals {
        println!("  policy: {r}");
    }
    assert!(total >= 400, "expected the full vector file, read {total}");
    assert!(failures.is_empty(), "disagreements:\n{}", failures.join("\n"));
    assert_eq!(matched + policy_refusals.len(), total);
}
