//! Throwaway PostgreSQL clusters on free loopback ports in temporary folders, run as an
//! unprivileged OS user when the tests run as root, and the helpers around them.

use std::fmt;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The OS user servers run as when the tests run as root (created by scripts/bootstrap.sh).
pub fn test_user() -> String {
    std::env::var("GPRXY_TEST_USER").unwrap_or_else(|_| "gprxytest".to_owned())
}

/// Whether this process runs as root (PostgreSQL refuses to).
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Where the heavy builds live (scripts/bootstrap.sh).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("GPRXY_CACHE").map_or_else(|| PathBuf::from("/var/cache/gprxy"), PathBuf::from)
}

/// A PostgreSQL major version the harness can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgVersion {
    /// Debian's PostgreSQL 15.
    V15,
    /// PostgreSQL 17 built by scripts/bootstrap.sh.
    V17,
    /// PostgreSQL 18 built by scripts/bootstrap.sh.
    V18,
    /// PostgreSQL 19 built by scripts/bootstrap.sh.
    V19,
}

impl PgVersion {
    /// The server fallback mode's tests run against: `GPRXY_FALLBACK_PG` (15, the default, or
    /// 17; `make test` runs them on both).
    pub fn fallback_upstream() -> Self {
        match std::env::var("GPRXY_FALLBACK_PG").as_deref() {
            Ok("17") => Self::V17,
            Ok("15") | Err(_) => Self::V15,
            Ok(other) => panic!("GPRXY_FALLBACK_PG={other}: use 15 or 17"),
        }
    }

    /// The server the validator's tests run against: `GPRXY_VALIDATOR_PG` (18, the default, or
    /// 19; `make test` runs them on both).
    pub fn validator() -> Self {
        match std::env::var("GPRXY_VALIDATOR_PG").as_deref() {
            Ok("19") => Self::V19,
            Ok("18") | Err(_) => Self::V18,
            Ok(other) => panic!("GPRXY_VALIDATOR_PG={other}: use 18 or 19"),
        }
    }

    /// The server's bin directory. Panics with how to get it when it is missing.
    pub fn bin_dir(self) -> PathBuf {
        let dir = match self {
            Self::V15 => PathBuf::from("/usr/lib/postgresql/15/bin"),
            Self::V17 => cache_dir().join("pg17").join("bin"),
            Self::V19 => cache_dir().join("pg19").join("bin"),
            Self::V18 => std::env::var_os("GPRXY_PG18_PREFIX")
                .map_or_else(|| cache_dir().join("pg18"), PathBuf::from)
                .join("bin"),
        };
        assert!(
            dir.join("postgres").exists(),
            "PostgreSQL {self} is not installed at {}: run `make test` (scripts/bootstrap.sh installs it)",
            dir.display()
        );
        dir
    }

    /// A client binary of this version (psql, pg_ctl, ...).
    pub fn bin(self, name: &str) -> PathBuf {
        self.bin_dir().join(name)
    }
}

impl fmt::Display for PgVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V15 => "15",
            Self::V17 => "17",
            Self::V18 => "18",
            Self::V19 => "19",
        })
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; callers retry on the rare collision).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A command that runs as the test user when we are root.
pub fn command_as_test_user(program: impl AsRef<Path>) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg(test_user()).arg("--").arg(program.as_ref());
        c
    } else {
        Command::new(program.as_ref())
    }
}

fn run_checked(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How to set up a cluster.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    version: PgVersion,
    conf: Vec<String>,
    hba: Vec<String>,
    ident: Vec<String>,
    /// `prlimit` options the server starts under (resource limits lowered for a test).
    rlimits: Vec<String>,
}

impl ClusterBuilder {
    /// Starts the server under a lowered resource limit (a `prlimit` option, for example
    /// `--sigpending=0:0`): no privilege is needed to lower one's own limits.
    pub fn rlimit(mut self, option: impl Into<String>) -> Self {
        self.rlimits.push(option.into());
        self
    }

    /// Adds a postgresql.conf line.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.conf.push(line.into());
        self
    }

    /// TLS on, with `certs`' certificate and key (made for the server's OS user:
    /// [`crate::TestCerts::for_server`]).
    pub fn tls(self, certs: &crate::TestCerts) -> Self {
        self.conf("ssl = on")
            .conf(format!("ssl_cert_file = '{}'", certs.cert_path.display()))
            .conf(format!("ssl_key_file = '{}'", certs.key_path.display()))
    }

    /// Adds a pg_hba.conf line (before the harness's own superuser lines).
    pub fn hba(mut self, line: impl Into<String>) -> Self {
        self.hba.push(line.into());
        self
    }

    /// Adds a pg_ident.conf line.
    pub fn ident(mut self, line: impl Into<String>) -> Self {
        self.ident.push(line.into());
        self
    }

    /// initdb, configure and start the cluster.
    pub fn start(self) -> Cluster {
        let root = tempfile::Builder::new().prefix("gprxy-pg").tempdir().expect("temp dir");
        let root_path = root.path().to_path_buf();
        let data = root_path.join("data");
        if running_as_root() {
            run_checked(Command::new("chown").arg(test_user()).arg(&root_path), "chown cluster folder");
        }
        run_checked(
            command_as_test_user(self.version.bin("initdb")).args(["-D"]).arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]),
            "initdb",
        );
        let mut cluster = Cluster {
            version: self.version,
            root: Some(root),
            root_path,
            data,
            port: 0,
            started: false,
            rlimits: self.rlimits.clone(),
        };
        cluster.write_config(&self);
        cluster.start_server();
        cluster
    }
}

/// A running throwaway cluster.
pub struct Cluster {
    version: PgVersion,
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    data: PathBuf,
    port: u16,
    started: bool,
    rlimits: Vec<String>,
}

impl Cluster {
    /// Starts describing a cluster of `version`.
    pub fn builder(version: PgVersion) -> ClusterBuilder {
        ClusterBuilder { version, conf: Vec::new(), hba: Vec::new(), ident: Vec::new(), rlimits: Vec::new() }
    }

    /// A cluster with default settings.
    pub fn start(version: PgVersion) -> Self {
        Self::builder(version).start()
    }

    fn write_config(&mut self, b: &ClusterBuilder) {
        let sockets = self.root_path.display();
        let mut conf = format!(
            "\n# gprxy test harness\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{sockets}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 600\n\
             shared_buffers = 32MB\nlog_connections = on\nlog_line_prefix = '%m [%p] %q%u@%d '\n"
        );
        for l in &b.conf {
            conf.push_str(l);
            conf.push('\n');
        }
        append(&self.data.join("postgresql.conf"), &conf);
        let mut hba = String::new();
        for l in &b.hba {
            hba.push_str(l);
            hba.push('\n');
        }
        hba.push_str("local all postgres trust\nlocal all all trust\n");
        std::fs::write(self.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        let ident: String = b.ident.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(self.data.join("pg_ident.conf"), ident).expect("write pg_ident.conf");
        if running_as_root() {
            run_checked(
                Command::new("chown").arg("-R").arg(test_user()).arg(&self.data),
                "chown data folder",
            );
        }
    }

    fn start_server(&mut self) {
        let mut last = String::new();
        for _ in 0..5 {
            self.port = free_port();
            let mut cmd = if self.rlimits.is_empty() {
                command_as_test_user(self.version.bin("pg_ctl"))
            } else {
                let mut c = Command::new("prlimit");
                c.args(&self.rlimits).arg("--");
                if running_as_root() {
                    c.arg("runuser").arg("-u").arg(test_user()).arg("--");
                }
                c.arg(self.version.bin("pg_ctl"));
                c
            };
            let out = cmd
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {}", self.port))
                .arg("start")
                .stdin(Stdio::null())
                .output()
                .expect("run pg_ctl");
            if out.status.success() {
                self.started = true;
                return;
            }
            last = format!(
                "{}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
            if !last.contains("Address already in use") {
                break;
            }
        }
        panic!("PostgreSQL {} did not start:\n{last}", self.version);
    }

    /// The loopback TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The version.
    pub fn version(&self) -> PgVersion {
        self.version
    }

    /// The cluster's folder (data folder, sockets, log).
    pub fn root(&self) -> &Path {
        &self.root_path
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log path.
    pub fn log_path(&self) -> PathBuf {
        self.root_path.join("server.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        let s = std::fs::read_to_string(self.data.join("postmaster.pid")).expect("postmaster.pid");
        s.lines().next().and_then(|l| l.trim().parse().ok()).expect("pid in postmaster.pid")
    }

    /// A libpq connection string over TCP for `user` to `dbname`.
    pub fn conninfo(&self, user: &str, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname={dbname}", self.port)
    }

    /// Runs SQL as superuser over the Unix socket; returns unaligned, tuples-only output.
    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql).unwrap_or_else(|e| panic!("SQL failed: {sql}\n{e}"))
    }

    /// Like [`Cluster::sql`], returning psql's error output on failure.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        self.try_sql_in("postgres", sql)
    }

    /// Runs SQL as superuser in database `db`.
    pub fn try_sql_in(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.version.bin("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.root_path)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db, "-c", sql])
            .env_remove("PGPASSWORD")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Waits until the log contains `needle` (up to `timeout`); returns whether it did.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Restarts the server (for settings that need it).
    pub fn restart(&mut self) {
        self.stop_server();
        self.start_server();
    }

    fn stop_server(&mut self) {
        if !self.started {
            return;
        }
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        let _ = command_as_test_user(self.version.bin("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-m", "fast", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.started = false;
        // pg_ctl returns once the pid file is gone; wait for the process itself.
        if let Some(pid) = pid {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while process_alive(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- PostgreSQL {} log ({}) -----\n{}\n----- end of log -----",
                self.version,
                self.log_path().display(),
                self.log()
            );
        }
        self.stop_server();
        if let Some(root) = self.root.take() {
            let _ = root.close();
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).expect("open postgresql.conf");
    f.write_all(text.as_bytes()).expect("append postgresql.conf");
}

/// Whether a process with this id exists and has not exited (a zombie counts as exited).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Path of an extension library installed into a server's prefix.
pub fn extension_installed(version: PgVersion, lib: &str) -> bool {
    let out = Command::new(version.bin("pg_config")).arg("--pkglibdir").output();
    out.ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join(format!("{lib}.so")))
        .is_some_and(|p| p.exists())
}

/// Panics with how to install gprxy_validator when it is missing.
pub fn require_validator(version: PgVersion) {
    assert!(
        extension_installed(version, "gprxy_validator"),
        "gprxy_validator is not installed into PostgreSQL {version}: run `make test` (it runs cargo pgrx install)"
    );
}

/// A cluster of [`PgVersion::validator`] (18 or 19) with gprxy_validator preloaded as the OAuth
/// validator, accepting tokens for `audience`, and allowing the test issuer's plain HTTP on
/// loopback (tests only).
pub fn validator_cluster(audience: &str) -> ClusterBuilder {
    require_validator(PgVersion::validator());
    Cluster::builder(PgVersion::validator())
        .conf("shared_preload_libraries = 'gprxy_validator'")
        .conf("oauth_validator_libraries = 'gprxy_validator'")
        .conf(format!("gprxy.audience = '{audience}'"))
        .conf("gprxy.insecure_allow_http_loopback = on")
}

/// [`validator_cluster`] whose every loopback login is OAuth from `issuer` (scope
/// `openid db:read`), the token's `sub` mapped to the same role for `alice`, with `conf` lines.
pub fn alice_oauth_cluster(audience: &str, issuer: &str, conf: &[&str]) -> ClusterBuilder {
    let mut b = validator_cluster(audience)
        .hba(format!("host all all 127.0.0.1/32 oauth issuer=\"{issuer}\" scope=\"openid db:read\" map=m"))
        .ident("m alice alice");
    for c in conf {
        b = b.conf(*c);
    }
    b
}

/// Runs psql of [`PgVersion::validator`] (18 or 19) through libpq's OAuth device flow against `host:port`, as `user`, with the
/// test issuer's `client_id` choosing the token. Returns stdout, or stderr on failure.
pub fn oauth_psql(port: u16, user: &str, issuer: &str, client_id: &str, sql: &str) -> Result<String, String> {
    oauth_psql_with(
        &format!("host=127.0.0.1 port={port} user={user} dbname=postgres"),
        issuer,
        client_id,
        sql,
    )
}

/// [`oauth_psql`] with a full connection string (TLS options, ...). The SQL is read from stdin,
/// so each statement runs on its own (autocommit).
pub fn oauth_psql_with(conninfo: &str, issuer: &str, client_id: &str, sql: &str) -> Result<String, String> {
    use std::io::Write;
    let conn = format!("{conninfo} oauth_issuer={issuer} oauth_client_id={client_id} connect_timeout=20");
    let mut child = Command::new(PgVersion::validator().bin("psql"))
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", &conn, "-f", "-"])
        .env("PGOAUTHDEBUG", "UNSAFE")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(sql.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The repository's sql/ folder.
pub fn sql_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sql")
}

/// Runs a file from sql/ as superuser in `db`.
pub fn apply_sql_file(cluster: &Cluster, db: &str, file: &str) {
    let text = std::fs::read_to_string(sql_dir().join(file)).unwrap_or_else(|e| panic!("sql/{file}: {e}"));
    cluster.try_sql_in(db, &text).unwrap_or_else(|e| panic!("sql/{file} failed:\n{e}"));
}
