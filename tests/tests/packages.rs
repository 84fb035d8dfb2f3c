//! The Debian packages (`make package`, scripts/package.sh): installed with `dpkg -i` on this
//! machine, a login through the installed files only (the validator PostgreSQL 18 loads, the
//! proxy binary, its unit's command line and user, its configuration file), then purged, leaving
//! nothing behind. Needs root (dpkg), as `make test` and CI run.
//!
//! The validator packages install into the same directories `scripts/install-extension.sh` does
//! on this machine (the cache's PostgreSQL 18 and 17, Debian's 15), and other tests need those
//! files: the test holds `$GPRXY_CACHE/e2e.lock` while the packages are in place, keeps a copy of
//! every file a package replaces and puts it back after the purge, also when it fails.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::{cache_dir, free_port, oauth_psql_with, validator_cluster, Cluster, PgVersion, TestCerts};
use serde_json::json;

/// The packages `make package` builds, in install order.
const PACKAGES: [&str; 4] = [
    "postgresql-18-gprxy-validator",
    "postgresql-17-gprxy-validator",
    "postgresql-15-gprxy-validator",
    "gprxy",
];
const UNIT: &str = "/lib/systemd/system/gprxy.service";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The .deb files: `GPRXY_DEB_DIR`, else the workspace's target/debian (`make package`).
fn debs() -> Vec<PathBuf> {
    let dir = std::env::var_os("GPRXY_DEB_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debian"), PathBuf::from);
    PACKAGES
        .iter()
        .map(|pkg| {
            let found: Vec<PathBuf> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().and_then(OsStr::to_str).is_some_and(|n| {
                        n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb")
                    })
                })
                .collect();
            assert_eq!(
                found.len(),
                1,
                "{pkg}: expected one .deb in {} (run `make package`, which `make test` does), found {found:?}",
                dir.display()
            );
            found.into_iter().next().unwrap()
        })
        .collect()
}

/// Regular files and symlinks a .deb holds, as absolute paths.
fn deb_files(deb: &Path) -> Vec<PathBuf> {
    run_ok("dpkg-deb", &["--contents", deb.to_str().unwrap()])
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| PathBuf::from(p.trim_start_matches('.')))
        .collect()
}

fn status(pkg: &str) -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f=${Status} ${Version}", pkg]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        .filter(|s| !s.starts_with("unknown ok not-installed"))
}

fn user_exists(name: &str) -> bool {
    run("getent", &["passwd", name]).status.success()
}

/// `$GPRXY_CACHE/e2e.lock`, an flock held by this process until dropped (std's `File::lock`:
/// `flock -w` needs a POSIX timer, which machines with `RLIMIT_SIGPENDING` 0 do not give). When a
/// process this one descends from holds it already (`flock e2e.lock cargo test ...`), that is
/// enough.
struct E2eLock(#[allow(dead_code)] Option<std::fs::File>);

impl E2eLock {
    fn acquire() -> Self {
        let path = cache_dir().join("e2e.lock");
        if !path.exists() {
            std::fs::write(&path, "").expect("create e2e.lock");
        }
        if Self::held_by_an_ancestor(&path) {
            eprintln!("packages: {} is held by a process this test runs under", path.display());
            return Self(None);
        }
        let file = std::fs::File::open(&path).expect("open e2e.lock");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1800);
        loop {
            match file.try_lock() {
                Ok(()) => return Self(Some(file)),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err(e) => panic!("could not take {} within 30 minutes: {e}", path.display()),
            }
        }
    }

    /// Whether a flock on `path` belongs to one of this process's ancestors (/proc/locks).
    fn held_by_an_ancestor(path: &Path) -> bool {
        let inode = std::fs::metadata(path).expect("e2e.lock").ino();
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        let holders: Vec<u32> = locks
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| {
                f.len() > 5 && f[1] == "FLOCK" && f[5].rsplit(':').next() == Some(inode.to_string().as_str())
            })
            .filter_map(|f| f[4].parse().ok())
            .collect();
        let mut pid = std::process::id();
        while pid > 1 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            pid = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.split(' ').nth(1))
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if holders.contains(&pid) {
                return true;
            }
        }
        false
    }
}

/// The machine as the test found it: files the packages replace (copied aside), whether the
/// gprxy user existed. Dropping it purges the packages and puts everything back.
struct Machine {
    saved: BTreeMap<PathBuf, (PathBuf, std::time::SystemTime)>,
    _backup: tempfile::TempDir,
    user_existed: bool,
    restored: bool,
    _lock: E2eLock,
}

impl Machine {
    fn take(debs: &[PathBuf]) -> Self {
        let lock = E2eLock::acquire();
        for pkg in PACKAGES {
            assert_eq!(
                status(pkg),
                None,
                "{pkg} is installed on this machine already; the test would remove it (dpkg --purge {pkg} first)"
            );
        }
        let backup = tempfile::tempdir().expect("temp dir");
        let mut saved = BTreeMap::new();
        for (i, path) in debs.iter().flat_map(|d| deb_files(d)).enumerate() {
            if path.symlink_metadata().is_ok() {
                let copy = backup.path().join(i.to_string());
                std::fs::copy(&path, &copy).unwrap_or_else(|e| panic!("save {}: {e}", path.display()));
                let mtime = path.metadata().and_then(|m| m.modified()).expect("mtime");
                saved.insert(path, (copy, mtime));
            }
        }
        Self { saved, _backup: backup, user_existed: user_exists("gprxy"), restored: false, _lock: lock }
    }

    /// Puts back what the packages replaced and removes the gprxy user if the test made it.
    fn restore(&mut self) {
        if self.restored {
            return;
        }
        self.restored = true;
        for (path, (copy, mtime)) in &self.saved {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let restored = std::fs::copy(copy, path)
                .and_then(|_| std::fs::File::options().write(true).open(path)?.set_modified(*mtime));
            if let Err(e) = restored {
                eprintln!("packages: could not restore {}: {e}", path.display());
            }
        }
        if !self.user_existed && user_exists("gprxy") {
            let _ = run("userdel", &["gprxy"]);
            let _ = run("groupdel", &["gprxy"]);
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if !self.restored {
            let mut args = vec!["--purge"];
            args.extend(PACKAGES);
            let _ = run("dpkg", &args);
            self.restore();
        }
    }
}

/// An abstract notification socket standing in for systemd's.
struct NotifySocket {
    sock: UnixDatagram,
    name: String,
}

impl NotifySocket {
    fn new() -> Self {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("gprxy-packages-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).expect("bind the notification socket");
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Self { sock, name: format!("@{name}") }
    }

    fn next(&self) -> String {
        let mut buf = [0u8; 512];
        let n = self.sock.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// `Key=value` lines of the installed unit's [Service] section.
fn unit_setting(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{UNIT} has no {key}="))
        .to_owned()
}

#[test]
fn packages_install_log_in_through_the_installed_files_and_purge_clean() {
    let started = Instant::now();
    assert!(
        gprxy_tests::running_as_root(),
        "the packages test installs with dpkg: run it as root (make test and CI do)"
    );
    let debs = debs();
    let mut machine = Machine::take(&debs);

    // ---------------------------------------------------------------- install
    let mut args = vec!["-i"];
    args.extend(debs.iter().map(|d| d.to_str().unwrap()));
    run_ok("dpkg", &args);
    let mut installed_files = Vec::new();
    for pkg in PACKAGES {
        assert_eq!(status(pkg).as_deref(), Some("install ok installed 0.1.0-1"), "{pkg}");
        // Every installed file is the package's, byte for byte.
        assert_eq!(run_ok("dpkg", &["--verify", pkg]), "", "{pkg}");
        installed_files.extend(
            run_ok("dpkg", &["-L", pkg])
                .lines()
                .map(PathBuf::from)
                .filter(|p| p.symlink_metadata().is_ok_and(|m| m.file_type().is_file())),
        );
    }
    // The extension where each server looks for it.
    for (version, pkg) in [
        (PgVersion::V18, "postgresql-18-gprxy-validator"),
        (PgVersion::V17, "postgresql-17-gprxy-validator"),
        (PgVersion::V15, "postgresql-15-gprxy-validator"),
    ] {
        let pg_config = version.bin("pg_config");
        let pg_config = pg_config.to_str().unwrap();
        let lib = format!("{}/gprxy_validator.so", run_ok(pg_config, &["--pkglibdir"]).trim());
        let control =
            format!("{}/extension/gprxy_validator.control", run_ok(pg_config, &["--sharedir"]).trim());
        for f in [&lib, &control] {
            assert_eq!(run_ok("dpkg", &["-S", f]), format!("{pkg}: {f}\n"));
        }
    }
    assert!(
        run_ok("dpkg", &["-s", "postgresql-15-gprxy-validator"]).contains("\nDepends: postgresql-15, libc6")
    );

    // The proxy: its user, its configuration's owners, the unit.
    let passwd = run_ok("getent", &["passwd", "gprxy"]);
    let f: Vec<&str> = passwd.trim().split(':').collect();
    let uid: u32 = f[2].parse().unwrap();
    assert!(uid < 1000, "gprxy is not a system user: {passwd}");
    assert_eq!((f[5], f[6]), ("/nonexistent", "/usr/sbin/nologin"), "{passwd}");
    let gid: u32 = run_ok("getent", &["group", "gprxy"]).split(':').nth(2).unwrap().parse().unwrap();
    for (path, mode) in [("/etc/gprxy", 0o750), ("/etc/gprxy/gprxy.toml", 0o640)] {
        let m = std::fs::metadata(path).unwrap();
        assert_eq!((m.uid(), m.gid(), m.permissions().mode() & 0o7777), (0, gid, mode), "{path}");
    }
    assert!(run_ok("dpkg-query", &["-W", "-f=${Conffiles}", "gprxy"]).contains("/etc/gprxy/gprxy.toml "));
    let unit = std::fs::read_to_string(UNIT).expect("the unit");
    run_ok("systemd-analyze", &["verify", UNIT]);
    let security = run_ok("systemd-analyze", &["security", "--offline=true", UNIT]);
    let exposure = security.lines().find(|l| l.contains("Overall exposure level")).expect("exposure line");
    let score: f64 =
        exposure.split(": ").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().parse().unwrap();
    eprintln!(
        "packages: systemd-analyze security --offline=true {UNIT}: exposure {score} (of 10; lower is safer)"
    );
    assert!(score <= 2.0, "{security}");
    assert_eq!(unit_setting(&unit, "Type"), "notify");
    assert_eq!(unit_setting(&unit, "User"), "gprxy");
    assert_eq!(unit_setting(&unit, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(unit_setting(&unit, "TimeoutStopSec"), "40s");
    let exec_start = unit_setting(&unit, "ExecStart");
    assert_eq!(exec_start, "/usr/bin/gprxy serve --config /etc/gprxy/gprxy.toml");

    // The shipped example is checked as the unit's ExecStartPre does, and refused: its TLS files
    // are the site's to provide.
    let check = run("/usr/bin/gprxy", &["check-config", "--config", "/etc/gprxy/gprxy.toml"]);
    assert!(!check.status.success());
    assert_eq!(
        String::from_utf8_lossy(&check.stderr),
        "Error: tls\n\nCaused by:\n    0: cannot read /etc/gprxy/server.crt\n    1: No such file or directory (os error 2)\n"
    );

    // ---------------------------------------------------------------- a login, installed files only
    let key = TestKey::rsa("k");
    let idp = TestIssuer::start(&[&key]);
    let pg = validator_cluster("db")
        .hba(format!(
            "host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid db:read\" map=m",
            idp.issuer()
        ))
        .ident("m alice alice")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE EXTENSION gprxy_validator");
    assert_eq!(pg.sql("SELECT extversion FROM pg_extension WHERE extname = 'gprxy_validator'"), "0.1.0");
    // The server runs the package's library (preloaded: mapped by the postmaster).
    let lib18 = format!(
        "{}/gprxy_validator.so",
        run_ok(PgVersion::V18.bin("pg_config").to_str().unwrap(), &["--pkglibdir"]).trim()
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", pg.pid())).unwrap();
    assert!(maps.contains(&lib18), "the postmaster has not mapped {lib18}");

    // TLS files the gprxy user can read, as a site would provide them.
    let certs = TestCerts::new();
    run_ok("chgrp", &["-R", "gprxy", certs.dir().to_str().unwrap()]);
    std::fs::set_permissions(certs.dir(), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::set_permissions(&certs.key_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (port, admin_port) = (free_port(), free_port());
    // The site's configuration in the installed conffile (the unit's --config).
    std::fs::write(
        "/etc/gprxy/gprxy.toml",
        format!(
            "listen = \"127.0.0.1:{port}\"\nupstream = \"127.0.0.1:{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nrequire = true\n\
             [limits]\nshutdown_grace_ms = 5000\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[log]\nformat = \"json\"\n",
            pg.port(),
            certs.cert_path.display(),
            certs.key_path.display()
        ),
    )
    .unwrap();
    assert_eq!(
        run_ok(
            "setpriv",
            &[
                "--reuid=gprxy",
                "--regid=gprxy",
                "--init-groups",
                "/usr/bin/gprxy",
                "check-config",
                "--config",
                "/etc/gprxy/gprxy.toml"
            ]
        ),
        "/etc/gprxy/gprxy.toml: ok\n"
    );

    // The unit's command line as its user, without privileges (NoNewPrivileges=, an empty
    // CapabilityBoundingSet=), with a notification socket as systemd gives a Type=notify service.
    let notify = NotifySocket::new();
    let log_dir = tempfile::tempdir().unwrap();
    let log_path = log_dir.path().join("gprxy.log");
    let mut argv = exec_start.split_whitespace();
    let program = argv.next().unwrap();
    let mut proxy = Command::new("setpriv")
        .args([
            "--reuid=gprxy",
            "--regid=gprxy",
            "--init-groups",
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--",
            program,
        ])
        .args(argv)
        .env("NOTIFY_SOCKET", &notify.name)
        .env("GPRXY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("start /usr/bin/gprxy");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let guard = KillOnDrop(proxy.id());
    assert_eq!(notify.next(), "READY=1", "{}", log());
    // Ready means listening: both ports accept at once.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the client port accepts once READY=1 is sent");
    assert_eq!(admin_get(admin_port, "/healthz"), "ok\n");
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", proxy.id())).unwrap();
    assert!(proc_status.contains(&format!("\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")), "{proc_status}");
    assert!(
        proc_status.contains("\nCapBnd:\t0000000000000000\n") && proc_status.contains("\nNoNewPrivs:\t1\n"),
        "{proc_status}"
    );

    let token = key.token(json!({"typ": "at+jwt"}), &idp.claims("alice", "db"));
    idp.hand_out("pkg-client", &token);
    let conn = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user=alice dbname=postgres sslmode=verify-full sslrootcert={}",
        certs.ca_path.display()
    );
    assert_eq!(
        oauth_psql_with(
            &conn,
            &idp.issuer(),
            "pkg-client",
            "SELECT current_user, system_user, gprxy.subject()"
        )
        .unwrap_or_else(|e| panic!("{e}\n--- gprxy log ---\n{}", log())),
        "alice|oauth:alice|alice"
    );
    let logged = log();
    assert!(logged.contains("\"event\":\"login\"") && logged.contains("\"outcome\":\"success\""), "{logged}");
    assert!(!logged.contains(&token), "the token reached the log");

    // ExecReload (SIGHUP) reloads; SIGTERM (systemctl stop) tells STOPPING=1 and exits.
    run_ok("kill", &["-HUP", &proxy.id().to_string()]);
    wait_until(|| log().contains("configuration and certificates reloaded"), "the reload", &log);
    run_ok("kill", &["-TERM", &proxy.id().to_string()]);
    assert_eq!(notify.next(), "STOPPING=1", "{}", log());
    let exit = proxy.wait().unwrap();
    assert!(exit.success(), "gprxy exited with {exit}:\n{}", log());
    std::mem::forget(guard);

    // The SQL side on 17 and 15, from their packages.
    for version in [PgVersion::V17, PgVersion::V15] {
        let pg = Cluster::start(version);
        pg.sql("CREATE EXTENSION gprxy_validator");
        assert_eq!(pg.sql("SELECT extversion, gprxy.subject() IS NULL FROM pg_extension WHERE extname = 'gprxy_validator'"), "0.1.0|t");
    }
    drop(pg);

    // ---------------------------------------------------------------- purge
    let mut args = vec!["--purge"];
    args.extend(PACKAGES);
    run_ok("dpkg", &args);
    for pkg in PACKAGES {
        assert_eq!(status(pkg), None, "{pkg} is still known to dpkg");
        let out = run("dpkg", &["-L", pkg]);
        assert!(!out.status.success(), "dpkg -L {pkg} still lists files");
        assert!(!Path::new(&format!("/usr/share/doc/{pkg}")).exists());
    }
    let left: Vec<&PathBuf> = installed_files.iter().filter(|p| p.symlink_metadata().is_ok()).collect();
    assert!(left.is_empty(), "left after the purge: {left:?}");
    for gone in [
        "/etc/gprxy",
        UNIT,
        "/etc/systemd/system/gprxy.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/gprxy.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-masked/gprxy.service",
    ] {
        assert!(Path::new(gone).symlink_metadata().is_err(), "{gone} is left after the purge");
    }
    // Debian's convention: the system user stays (files it owned elsewhere keep their owner's
    // name); the test removes it if it made it.
    assert!(user_exists("gprxy"), "the gprxy user is kept on purge");

    machine.restore();
    for version in [PgVersion::V18, PgVersion::V17, PgVersion::V15] {
        assert!(
            gprxy_tests::extension_installed(version, "gprxy_validator"),
            "gprxy_validator was not put back into PostgreSQL {version}"
        );
    }
    eprintln!(
        "packages: installed, logged in, purged and restored in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
    }
}

fn admin_get(port: u16, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("admin listener");
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

fn wait_until(cond: impl Fn() -> bool, what: &str, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "{what} did not happen within 30 s:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}
