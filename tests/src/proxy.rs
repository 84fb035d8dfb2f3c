//! Runs the `gprxy` binary for end-to-end tests: a config file in a temporary folder, JSON logs
//! captured to a file, SIGTERM on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// The gprxy binary: `GPRXY_BIN`, else the one `cargo build` made (the Makefile builds it).
pub fn gprxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GPRXY_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from);
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("gprxy");
        if p.exists() {
            return p;
        }
    }
    panic!("the gprxy binary is not built: run `cargo build -p gprxy-passthrough` (make test does)");
}

/// A running proxy.
pub struct Proxy {
    child: Child,
    dir: tempfile::TempDir,
    /// Client port.
    pub port: u16,
    /// Admin port.
    pub admin_port: u16,
}

impl Proxy {
    /// Starts gprxy with this TOML (without `listen` and `[admin]`, which the harness sets).
    pub fn start(toml: &str) -> Self {
        let p = Self::spawn_at(free_port(), free_port(), toml);
        p.wait_listening();
        p
    }

    /// Starts gprxy on these ports without waiting for it to listen (another process may
    /// already listen there).
    pub fn spawn_at(port: u16, admin_port: u16, toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\n{toml}\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[log]\nformat = \"json\"\n"
        );
        let path = dir.path().join("gprxy.toml");
        std::fs::write(&path, &config).expect("write config");
        let log = std::fs::File::create(dir.path().join("gprxy.log")).expect("log file");
        let child = Command::new(gprxy_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .env("GPRXY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start gprxy");
        Self { child, dir, port, admin_port }
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Both listeners: the admin one is bound after the client one.
            if std::net::TcpStream::connect(self.addr()).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gprxy did not start:\n{}", self.log());
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// A folder for test files (certificates).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gprxy.log")).unwrap_or_default()
    }

    /// Log events (JSON lines) whose `event` field is `event`. Every JSON line is read strictly
    /// ([`strict_json`]): one that a strict parser refuses fails the test.
    pub fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| strict_json(l).unwrap_or_else(|e| panic!("log line refused ({e}): {l}")))
            .filter(|v| v.get("event").and_then(|e| e.as_str()) == Some(event))
            .collect()
    }

    /// Waits until `n` events of this kind were logged.
    pub fn wait_events(&self, event: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ev = self.events(event);
            if ev.len() >= n || Instant::now() > deadline {
                return ev;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the admin listener; returns the body.
    pub fn admin_get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).expect("admin listener");
        let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
    }

    /// One series' value from `/metrics` (`name{labels}` exactly as printed), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.admin_get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().expect("a number"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Rewrites the config file through `edit` (for a reload with SIGHUP).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let path = self.dir.path().join("gprxy.toml");
        let text = std::fs::read_to_string(&path).expect("read config");
        std::fs::write(&path, edit(text)).expect("write config");
    }

    /// Names of the process's threads (Linux).
    pub fn thread_names(&self) -> Vec<String> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("/proc/<pid>/task");
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .collect()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status();
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- gprxy log -----\n{}\n----- end -----", self.log());
        }
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Every JSON line the proxy wrote must parse with a strict parser (an audit record).
        if !std::thread::panicking() {
            let log = self.log();
            if let Some((line, e)) =
                log.lines().filter(|l| l.starts_with('{')).find_map(|l| strict_json(l).err().map(|e| (l, e)))
            {
                panic!("gprxy wrote a log line a strict JSON parser refuses ({e}): {line}");
            }
        }
    }
}

/// One sample of a metrics exposition: name, labels, value.
pub type Sample = (String, std::collections::BTreeMap<String, String>, f64);

/// Parses a `/metrics` text with the Prometheus project's own parsers (Debian's
/// `python3-prometheus-client`): the Prometheus text parser for the samples, and the stricter
/// OpenMetrics parser, which must accept the text too. Panics with the parser's error.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    use std::io::Write;
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
text = sys.stdin.read()
samples = [[s.name, s.labels, s.value] for f in text_string_to_metric_families(text) for s in f.samples]
for _ in openmetrics(text):
    pass
print(json.dumps(samples))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (apt-get install python3-prometheus-client)");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = text.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("python3");
    let _ = writer.join();
    assert!(
        out.status.success(),
        "the Prometheus parsers refuse /metrics: {}\n--- first 2000 bytes ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        text.chars().take(2000).collect::<String>()
    );
    serde_json::from_slice(&out.stdout).expect("parsed samples")
}

/// Parses one JSON text like serde_json, but refuses an object that names a key twice (at any
/// depth): lenient parsers keep one of the values, strict ones refuse the line.
pub fn strict_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str::<Strict>(text).map(|s| s.0).map_err(|e| e.to_string())
}

struct Strict(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(serde_json::Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            let Strict(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(serde_json::Value::Object(object))
    }
}

/// What a fallback-mode test proxy needs.
pub struct FallbackSetup<'a> {
    /// PostgreSQL's port on loopback.
    pub upstream_port: u16,
    /// TLS certificate and key files.
    pub cert: &'a Path,
    /// TLS key file.
    pub key: &'a Path,
    /// The test issuer (plain HTTP on loopback, allowed for tests only).
    pub issuer: &'a str,
    /// Accepted audience.
    pub audience: &'a str,
    /// Rules in order: token role, service account, its password file.
    pub rules: &'a [(&'a str, &'a str, &'a Path)],
    /// The signed context's key file (`fallback.context_key_file`); None only with
    /// `signed_context = false` in `extra`.
    pub context_key: Option<&'a Path>,
    /// More lines for `[fallback]` (and its sub-tables).
    pub extra: &'a str,
}

/// A context key for a test proxy: a PEM file (mode 0600) and its public half.
pub struct ContextKeyFile {
    /// The file.
    pub path: PathBuf,
    /// The public key, as `gprxy.context_keys` pins it.
    pub public: String,
}

impl ContextKeyFile {
    /// Makes a new key in `path`.
    pub fn create(path: impl Into<PathBuf>) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let path = path.into();
        let pem = gprxy_core::context::ContextKey::generate_pem().expect("context key");
        std::fs::write(&path, &pem).expect("write context key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod context key");
        let public = Self::key_of(&path).public_key().to_owned();
        Self { path, public }
    }

    /// The key, to sign with as the proxy does.
    pub fn key(&self) -> std::sync::Arc<gprxy_core::context::ContextKey> {
        std::sync::Arc::new(Self::key_of(&self.path))
    }

    fn key_of(path: &Path) -> gprxy_core::context::ContextKey {
        gprxy_core::context::ContextKey::from_pem(&std::fs::read(path).expect("read context key"))
            .expect("a context key")
    }
}

/// The postgresql.conf lines of the signed context: the pinned public keys and the service
/// accounts (sql/01_roles.sql's) that may set a context.
pub fn context_conf(keys: &[&str]) -> [String; 2] {
    [
        format!("gprxy.context_keys = '{}'", keys.join(", ")),
        "gprxy.context_roles = 'app_admin, app_writer, app_reader'".to_owned(),
    ]
}

/// Starts `builder` as fallback mode's upstream: the signed context pinned to `keys` (its
/// postgresql.conf lines), gprxy_validator's SQL side, sql/01_roles.sql and
/// sql/05_signed_context.sql.
pub fn start_signed_context_upstream(mut builder: crate::ClusterBuilder, keys: &[&str]) -> crate::Cluster {
    for line in context_conf(keys) {
        builder = builder.conf(line);
    }
    let pg = builder.start();
    pg.sql("CREATE EXTENSION gprxy_validator");
    crate::apply_sql_file(&pg, "postgres", "01_roles.sql");
    crate::apply_sql_file(&pg, "postgres", "05_signed_context.sql");
    pg
}

impl FallbackSetup<'_> {
    /// The TOML for [`Proxy::start`].
    pub fn toml(&self) -> String {
        let mut t = format!(
            "upstream = \"127.0.0.1:{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[fallback]\nissuer = \"{}\"\n\
             audience = [\"{}\"]\nrole_claim = \"roles\"\ninsecure_allow_http_loopback = true\n{}{}\n",
            self.upstream_port,
            self.cert.display(),
            self.key.display(),
            self.issuer,
            self.audience,
            self.context_key.map(|k| format!("context_key_file = \"{}\"\n", k.display())).unwrap_or_default(),
            self.extra
        );
        for (role, account, _) in self.rules {
            t.push_str(&format!("[[fallback.map]]\nrole = \"{role}\"\naccount = \"{account}\"\n"));
        }
        for (_, account, file) in self.rules {
            t.push_str(&format!("[fallback.accounts.{account}]\npassword_file = \"{}\"\n", file.display()));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::strict_json;

    #[test]
    fn strict_json_refuses_a_key_named_twice_at_any_depth() {
        assert_eq!(
            strict_json(r#"{"a":[1,{"b":null}],"c":"d"}"#).unwrap()["a"][1]["b"],
            serde_json::Value::Null
        );
        assert!(strict_json(r#"{"message":"login","message":"refused"}"#)
            .unwrap_err()
            .starts_with("duplicate key \"message\""));
        assert!(strict_json(r#"{"span":{"user":"a","user":"b"}}"#)
            .unwrap_err()
            .starts_with("duplicate key \"user\""));
        assert!(strict_json("{\"a\":1").is_err());
    }
}
