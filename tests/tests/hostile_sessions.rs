//! Hostile sessions from a seed against every target, judged from the server's side (#26; the
//! generator and its invariants are in `gprxy_tests::hostile`).
//!
//! `make test` runs one bounded round (about a minute); `make soak SEED=n DURATION=secs` runs
//! rounds with seeds n, n+1, ... until the duration has passed. `GPRXY_GEN_TARGET` and
//! `GPRXY_GEN_POLICY` narrow a run to one target and policy (to replay a failure).

use std::io::Write;

use gprxy_tests::hostile::{run, Kind, Policy, Target};

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

const TARGETS: [Kind; 5] = [
    Kind::Validator,
    Kind::Connector,
    Kind::PassthroughServerPolicy,
    Kind::PassthroughProxyPolicy,
    Kind::Fallback { pool: 2 },
];

#[test]
fn hostile_sessions_hold_every_invariant() {
    let seed: u64 = env("GPRXY_GEN_SEED").unwrap_or(26);
    let secs: f64 = env("GPRXY_GEN_SECS").unwrap_or(10.0);
    let duration: f64 = env("GPRXY_GEN_DURATION").unwrap_or(0.0);
    let only_target = std::env::var("GPRXY_GEN_TARGET").ok();
    let only_policy = std::env::var("GPRXY_GEN_POLICY").ok();
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut round = 0u64;
    loop {
        let seed = seed + round;
        for (i, kind) in TARGETS.iter().enumerate() {
            let kind = match kind {
                // A pool of one or two, by seed.
                Kind::Fallback { .. } => Kind::Fallback { pool: 1 + (seed % 2) as u32 },
                k => *k,
            };
            let policy = if (seed + i as u64).is_multiple_of(2) { Policy::Idle } else { Policy::Strict };
            let name = format!("{kind}");
            if only_target.as_ref().is_some_and(|t| !name.starts_with(t.trim_end_matches(char::is_numeric))) {
                continue;
            }
            let policy = match only_policy.as_deref() {
                Some("idle") => Policy::Idle,
                Some("strict") => Policy::Strict,
                _ => policy,
            };
            let target = Target::start(kind, policy);
            let report = run(&target, seed, 4, secs);
            // Straight to stderr, past the harness's capture: make test shows the counts.
            let _ = writeln!(
                std::io::stderr().lock(),
                "hostile sessions: seed {seed}, {kind}, {policy:?}: {}",
                report.summary()
            );
            assert!(report.sessions.len() >= 4, "too few sessions ran: {}", report.summary());
            if !report.violations.is_empty() {
                failures.push(report.failure(seed, kind, policy));
            }
        }
        round += 1;
        if started.elapsed().as_secs_f64() >= duration {
            break;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
