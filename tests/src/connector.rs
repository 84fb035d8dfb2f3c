//! Runs `gprxy connect` for end-to-end tests: a profiles file in a temporary folder, the socket
//! in a private folder inside it, JSON logs captured to a file, SIGTERM on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proxy::gprxy_bin;

/// A running connector.
pub struct Connector {
    child: Child,
    dir: tempfile::TempDir,
    /// The folder holding the socket (libpq's `host`).
    pub socket_dir: PathBuf,
    /// The TCP listener's port, if asked for.
    pub tcp_port: Option<u16>,
}

impl Connector {
    /// Starts `gprxy connect` for profile `p` whose TOML body is `profile` (without
    /// `listen.unix_dir`, which the harness sets; `listen.tcp` is added when `tcp`).
    pub fn start(profile: &str, tcp: bool) -> Self {
        Self::start_env(profile, tcp, &[])
    }

    /// [`Connector::start`] with more environment variables.
    pub fn start_env(profile: &str, tcp: bool, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket_dir = dir.path().join("sock");
        let tcp_port = tcp.then(crate::free_port);
        let path = write_config(dir.path(), profile, &socket_dir, tcp_port);
        Self::spawn(dir, &path, "p", socket_dir, tcp_port, env)
    }

    /// Starts `gprxy connect --profile NAME` with a whole configuration file's `text`, whose
    /// profile listens in `socket_dir`; `dir` (kept until drop) receives the log.
    pub fn start_file(dir: tempfile::TempDir, text: &str, profile: &str, socket_dir: PathBuf) -> Self {
        let path = dir.path().join("connect.toml");
        std::fs::write(&path, text).expect("write config");
        Self::spawn(dir, &path, profile, socket_dir, None, &[])
    }

    fn spawn(
        dir: tempfile::TempDir,
        config: &Path,
        profile: &str,
        socket_dir: PathBuf,
        tcp_port: Option<u16>,
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::File::create(dir.path().join("connect.log")).expect("log file");
        let mut cmd = Command::new(gprxy_bin());
        cmd.args(["connect", "--profile", profile, "--config"])
            .arg(config)
            .env("GPRXY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start gprxy connect");
        let c = Self { child, dir, socket_dir, tcp_port };
        c.wait_ready();
        c
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // JSON or text logs (a configuration file without `[log] format = "json"`).
            let log = self.log();
            if log.contains("\"event\":\"listening\"") || log.contains("event=\"listening\"") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gprxy connect did not start:\n{}", self.log());
    }

    /// The connector's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (`HUP`, `TERM`, ...) to the connector.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }

    /// The configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("connect.toml")
    }

    /// The folder of test files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("connect.log")).unwrap_or_default()
    }

    /// Log events whose `event` field is `event`.
    pub fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| crate::proxy::strict_json(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// Waits until there are `n` events `event`.
    pub fn wait_events(&self, event: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let e = self.events(event);
            if e.len() >= n || Instant::now() > deadline {
                return e;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// libpq's connection options for the socket.
    pub fn conninfo(&self, user: &str) -> String {
        format!("host={} port=5432 user={user} dbname=postgres", self.socket_dir.display())
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /metrics` from a connector's `listen.metrics` port.
pub fn get_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics listener");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("answer");
    out
}

/// Writes the profiles file for profile `p`; returns its path.
pub fn write_config(dir: &Path, profile: &str, socket_dir: &Path, tcp_port: Option<u16>) -> PathBuf {
    let mut text = format!(
        "[log]\nformat = \"json\"\n[profile.p]\n{profile}\nlisten.unix_dir = \"{}\"\n",
        socket_dir.display()
    );
    if let Some(port) = tcp_port {
        text.push_str(&format!("listen.tcp = \"127.0.0.1:{port}\"\n"));
    }
    let path = dir.join("connect.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs `gprxy ARGS` and returns (success, stdout, stderr).
pub fn run_gprxy(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(gprxy_bin());
    // Errors as a user sees them: no backtrace.
    cmd.args(args).env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run gprxy");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `token` to `path` as a token-writing agent would: a new file renamed over the old,
/// mode 0600.
pub fn write_token_file(path: &Path, token: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).expect("write token");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).expect("chmod token");
    std::fs::rename(&tmp, path).expect("rename token");
}
