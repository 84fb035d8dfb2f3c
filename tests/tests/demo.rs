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

#[test]
fn demo_keeps_running_until_ctrl_c_then_stops_and_deletes_everything() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    /// Interrupts the demo if the test fails half-way, so that it cleans up anyway.
    struct Interrupt(std::process::Child, bool);
    impl Drop for Interrupt {
        fn drop(&mut self) {
            if !self.1 {
                let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
                let _ = self.0.wait();
            }
        }
    }
    let mut demo = Interrupt(
        Command::new(env!("CARGO_BIN_EXE_gprxy-demo"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run gprxy-demo"),
        false,
    );
    let child = &mut demo.0;
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut shown = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("demo output");
        let done = line.starts_with("Press Ctrl-C");
        shown.push(line);
        if done {
            break;
        }
    }
    let text = shown.join("\n");
    let after = |prefix: &str| -> Vec<String> {
        text.lines().filter_map(|l| l.split_once(prefix).map(|(_, rest)| rest.to_owned())).collect()
    };
    // The folders: the demo's own and each server's (the parent of its log).
    let demo_dir = after("and delete ").pop().expect("demo folder").trim_end_matches('.').to_owned();
    let logs = after("logs:").pop().expect("log paths");
    let mut folders: Vec<std::path::PathBuf> = logs
        .split(" and ")
        .map(|p| std::path::Path::new(p.trim()).parent().expect("server root").to_path_buf())
        .collect();
    folders.push(demo_dir.into());
    // The listeners: both proxies' admin ports.
    let admin: Vec<u16> = text
        .lines()
        .filter(|l| l.ends_with("/metrics (and /healthz)"))
        .filter_map(|l| l.split("http://127.0.0.1:").nth(1)?.split('/').next()?.parse().ok())
        .collect();
    assert_eq!(admin.len(), 2, "{text}");
    assert!(folders.iter().all(|f| f.exists()), "{folders:?}");
    assert!(admin.iter().all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok()));

    let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill");
    assert!(sent.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("demo exits");
    demo.1 = true;
    assert!(status.success(), "{rest:?}");
    assert!(rest.iter().any(|l| l.starts_with("Stopping the proxies")), "{rest:?}");
    for f in &folders {
        assert!(!f.exists(), "{} is left behind", f.display());
    }
    for p in &admin {
        assert!(std::net::TcpStream::connect(("127.0.0.1", *p)).is_err(), "a proxy still listens on {p}");
    }
}
