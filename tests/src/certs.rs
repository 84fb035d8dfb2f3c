//! Test certificates: a CA and a `localhost` certificate, in files a server or proxy can read.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::{running_as_root, test_user};

/// A test CA and a `localhost` certificate it signed, written to a temporary folder that is
/// deleted on drop.
pub struct TestCerts {
    /// The CA certificate (PEM), for clients that take it as text.
    pub ca: String,
    /// The CA certificate file.
    pub ca_path: PathBuf,
    /// The certificate chain file.
    pub cert_path: PathBuf,
    /// The private key file.
    pub key_path: PathBuf,
    dir: tempfile::TempDir,
}

impl TestCerts {
    /// New CA, certificate and key files.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca, cert, key) = gprxy_core::testkit::test_ca();
        let path = |n: &str| dir.path().join(n);
        let (ca_path, cert_path, key_path) = (path("ca.pem"), path("server.pem"), path("server.key"));
        std::fs::write(&ca_path, &ca).expect("write CA");
        std::fs::write(&cert_path, cert).expect("write certificate");
        std::fs::write(&key_path, key).expect("write key");
        Self { ca, ca_path, cert_path, key_path, dir }
    }

    /// The same, usable by PostgreSQL itself: the folder belongs to the server's OS user and
    /// the key is readable by it alone.
    pub fn for_server() -> Self {
        let certs = Self::new();
        if running_as_root() {
            let _ = Command::new("chown").arg("-R").arg(test_user()).arg(certs.dir()).status();
        }
        let _ = Command::new("chmod").arg("600").arg(&certs.key_path).status();
        certs
    }

    /// The folder, for more test files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestCerts {
    fn default() -> Self {
        Self::new()
    }
}
