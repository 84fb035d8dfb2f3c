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
    assert!(stdout.contains("demo check: all 13 steps passed"), "{stdout}");
    for shown in [
        "app_writer|oauth:alice|alice@acme.example|",
        "acme public, alice private",
        "bob private, globex public",
        "reason=expired",
        // #31: a session ended at its token's expiry, judged from the server's side (no backend
        // with its pid in pg_stat_activity), the client's FATAL and the audit line.
        "before the next statement: SELECT count(*) FROM pg_stat_activity WHERE pid = ",
        "-> FATAL:  28000: gprxy: the access token expired at ",
        "gprxy: event=session_expired policy=idle role=\"app_writer\" authn_id=\"alice\"",
        // An opaque token introspected (one request for two logins), revoked, refused.
        "-> app_auditor|oauth:carol|carol@acme.example",
        "oauth login refused reason=token_inactive role=\"app_auditor\"",
        // Two issuers: each alice on her issuer's line; Partner's token refused on Acme's.
        "(issuers_share_role)",
        "-> app_partner|oauth:alice|http://127.0.0.1:",
        "oauth login refused reason=iss_mismatch role=\"app_writer\"",
        "To log in, open",
        // Roles from groups: dana's own role, made at her first login and following her group.
        "-> dana|oauth:dana|t|f\n",
        "-> app_writer granted by gprxy_provisioner\n",
        "-> dana|oauth:dana|f|t\n",
        "-> gprxy: provision action=revoke role=\"dana\" group=\"app_writer\"",
        // gprxy connect: psql 15 with no password, the identity from the token file's token.
        "logged in as app_writer to postgres on 127.0.0.1:",
        "sock port=5432 user=app_writer dbname=postgres\" -c \"SELECT current_user, system_user, gprxy.claims()->>'email'\"\n    -> app_writer|oauth:alice|alice@acme.example\n",
        "gprxy_logins_total",
    ] {
        assert!(stdout.contains(shown), "the tour did not show {shown:?}:\n{stdout}");
    }
    // Each step prints the command to copy, and never a token or the introspection secret in
    // full: tokens appear as fingerprints only.
    assert!(stdout.matches("\n    $ ").count() >= 7, "{stdout}");
    for secret in ["eyJ", "demo-opaque-", "demo-secret-"] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "{secret:?} printed:\n{stdout}");
    }
}

use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

/// A demo started and past its tour, waiting for a signal.
struct Running {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Its own folder and each server's.
    folders: Vec<PathBuf>,
    /// Both proxies' admin ports.
    admin: Vec<u16>,
    /// The process that gets the signal (the demo, or the parent that dies).
    pid: u32,
    ended: bool,
}

impl Drop for Running {
    /// A test that fails half-way still stops the demo, so that it cleans up anyway.
    fn drop(&mut self) {
        if !self.ended {
            let _ = Command::new("kill").args(["-INT", &self.pid.to_string()]).status();
            let _ = self.child.wait();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `cmd` (the demo, or a shell that runs it) and reads until the demo waits.
fn start(mut cmd: Command) -> Running {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("run gprxy-demo");
    let pid = child.id();
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
    let demo_dir = after("and delete ").pop().expect("demo folder").trim_end_matches('.').to_owned();
    let logs = after("logs:").pop().expect("log paths");
    let mut folders: Vec<PathBuf> = logs
        .split(" and ")
        .flat_map(|p| p.split(", "))
        .map(|p| std::path::Path::new(p.trim()).parent().expect("server root").to_path_buf())
        .collect();
    folders.push(demo_dir.into());
    let admin: Vec<u16> = text
        .lines()
        .filter(|l| l.ends_with("/metrics (and /healthz)"))
        .filter_map(|l| l.split("http://127.0.0.1:").nth(1)?.split('/').next()?.parse().ok())
        .collect();
    assert_eq!(admin.len(), 2, "{text}");
    // The three servers' folders and the demo's own.
    assert_eq!(folders.len(), 4, "{folders:?}");
    assert!(folders.iter().all(|f| f.exists()), "{folders:?}");
    assert!(admin.iter().all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok()));
    Running { child, lines, folders, admin, pid, ended: false }
}

/// Processes whose command line names one of `folders` (the servers run from them).
fn processes_in(folders: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if folders.iter().any(|f| cmdline.contains(&*f.to_string_lossy())) {
            found.push(cmdline);
        }
    }
    found
}

impl Running {
    /// Sends `signal` to the process that gets it, reads the demo's output to its end, and
    /// checks that nothing is left: no folder, no listener, no server process.
    fn stop_with(mut self, signal: &str) -> Vec<String> {
        let sent = Command::new("kill").args([signal, &self.pid.to_string()]).status().expect("kill");
        assert!(sent.success());
        let rest: Vec<String> = self.lines.by_ref().map_while(Result::ok).collect();
        let _ = self.child.wait();
        self.ended = true;
        // The demo's last step (deleting) happens before its output closes; give an orphan's
        // exit a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline
            && (self.folders.iter().any(|f| f.exists()) || !processes_in(&self.folders).is_empty())
        {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        for f in &self.folders {
            assert!(!f.exists(), "{} is left behind ({signal})", f.display());
        }
        assert_eq!(processes_in(&self.folders), Vec::<String>::new(), "processes left ({signal})");
        for p in &self.admin {
            assert!(std::net::TcpStream::connect(("127.0.0.1", *p)).is_err(), "a proxy still listens on {p}");
        }
        rest
    }
}

#[test]
fn demo_keeps_running_until_ctrl_c_then_stops_and_deletes_everything() {
    let rest = start(Command::new(env!("CARGO_BIN_EXE_gprxy-demo"))).stop_with("-INT");
    assert!(rest.iter().any(|l| l.starts_with("Stopping the proxies")), "{rest:?}");
}

/// #31: stopped by SIGTERM (a process manager, `timeout`) or SIGHUP (a closed terminal), the
/// demo leaves nothing behind either.
#[test]
fn demo_stopped_by_sigterm_or_sighup_leaves_nothing_behind() {
    for signal in ["-TERM", "-HUP"] {
        let rest = start(Command::new(env!("CARGO_BIN_EXE_gprxy-demo"))).stop_with(signal);
        assert!(rest.iter().any(|l| l.starts_with("Stopping the proxies")), "{signal}: {rest:?}");
    }
}

/// #31: when the demo's parent dies without passing a signal on (make killed with SIGKILL), the
/// orphaned demo notices and stops, leaving nothing behind.
#[test]
fn demo_whose_parent_dies_stops_by_itself() {
    let mut parent = Command::new("sh");
    parent.arg("-c").arg("\"$0\" & wait").arg(env!("CARGO_BIN_EXE_gprxy-demo"));
    let rest = start(parent).stop_with("-KILL");
    assert!(rest.iter().any(|l| l.starts_with("Stopping the proxies")), "{rest:?}");
}

/// #31: the tour's longest waits (a token's expiry, a kept introspection answer going stale)
/// stop within moments of Ctrl-C, mid-tour, and leave nothing behind either.
#[test]
fn demo_stopped_while_a_session_waits_for_its_token_to_expire_stops_at_once() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gprxy-demo"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run gprxy-demo");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut shown = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("demo output");
        let waiting = line.contains("the session idles...");
        shown.push(line);
        if waiting {
            break;
        }
    }
    let text = shown.join("\n");
    assert!(text.contains("the session idles..."), "{text}");
    // PostgreSQL 18's folder (the issuers file is in its data folder) and the demo's own (the
    // CA file of the psql commands).
    let between = |start: &str, end: char| -> PathBuf {
        let from = text.find(start).unwrap_or_else(|| panic!("{start}: {text}")) + start.len();
        let rest = &text[from..];
        PathBuf::from(&rest[..rest.find(end).expect("end")])
    };
    let pg18 = between("gprxy.issuers_file = '", '\'');
    let pg18 = pg18.parent().and_then(|p| p.parent()).expect("server root").to_path_buf();
    let demo_dir = between("sslrootcert=", ' ').parent().expect("demo folder").to_path_buf();
    let folders = vec![pg18, demo_dir];
    assert!(folders.iter().all(|f| f.exists()), "{folders:?}");
    let sent = std::time::Instant::now();
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let _ = child.wait();
    let took = sent.elapsed();
    assert!(rest.iter().any(|l| l.starts_with("Stopped early")), "{rest:?}");
    assert!(!rest.iter().any(|l| l.starts_with("[8]")), "the tour went on: {rest:?}");
    // The wait is seconds long; stopping takes the servers' shutdown, not the wait.
    assert!(took < std::time::Duration::from_secs(5), "stopped {took:?} after SIGINT");
    for f in &folders {
        assert!(!f.exists(), "{} is left behind", f.display());
    }
    assert_eq!(processes_in(&folders), Vec::<String>::new(), "processes left");
}
