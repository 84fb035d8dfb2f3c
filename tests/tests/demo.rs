//! `make demo`'s tour, non-interactive: every step's result asserted by the demo itself.

#[test]
fn demo_tour_passes_every_step() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gprxy-demo"))
        .arg("--check")
        .output()
        .expect("run gprxy-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("demo check: all 8 steps passed"), "{stdout}");
    for shown in [
        "app_writer|oauth:alice|alice@acme.example|",
        "acme public, alice private",
        "bob private, globex public",
        "reason=expired",
        "To log in, open",
        "gprxy_logins_total",
    ] {
        assert!(stdout.contains(shown), "the tour did not show {shown:?}:\n{stdout}");
    }
}
