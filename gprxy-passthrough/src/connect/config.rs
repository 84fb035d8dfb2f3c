//! `gprxy connect`'s configuration: named profiles in one TOML file, read once into typed
//! values. Errors name the file, line and key, never a value (a secret pasted in the wrong place
//! must not reach a terminal or a log).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::config::LogFormat;

/// This process's effective uid, as the kernel reports it for `/proc/self`: the user whose
/// files (and root's) the connector trusts, and who may connect.
pub fn own_uid() -> anyhow::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self").context("cannot read /proc/self")?.uid())
}

/// The default configuration file: `$GPRXY_CONFIG_DIR/connect.toml` (see
/// [`crate::user_login::config_dir`]).
pub fn default_path() -> PathBuf {
    crate::user_login::config_dir().join("connect.toml")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    profile: BTreeMap<String, FileProfile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    #[serde(default)]
    format: Option<LogFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProfile {
    upstream: OneOrMany,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    database: Option<String>,
    #[serde(default)]
    login: LoginMethod,
    #[serde(default = "default_margin")]
    refresh_margin_secs: u64,
    #[serde(default = "default_connect_timeout")]
    connect_timeout_secs: u64,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    listen: FileListen,
    token: TokenSpec,
}

/// One `host:port` or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn default_margin() -> u64 {
    60
}

fn default_connect_timeout() -> u64 {
    10
}

/// Each application connection is a server backend: PostgreSQL's own default `max_connections`.
fn default_max_connections() -> usize {
    100
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    #[serde(default)]
    mode: TlsMode,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    server_name: Option<String>,
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListen {
    #[serde(default)]
    unix_dir: Option<PathBuf>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    tcp: Option<String>,
    #[serde(default)]
    metrics: Option<String>,
    #[serde(default)]
    allow_uids: Vec<u32>,
}

/// How the connector logs in upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginMethod {
    /// SASL OAUTHBEARER when the server offers it, the token as a cleartext password when the
    /// server asks for a password (fallback mode, the bridge).
    #[default]
    Auto,
    /// OAUTHBEARER only.
    Oauthbearer,
    /// The token as a password only.
    Password,
}

/// TLS to the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// The server's certificate chains to the CA file and names the server (libpq's
    /// `sslmode=verify-full`).
    #[default]
    VerifyFull,
    /// INSECURE, for tests only: plain TCP, the token in the clear.
    InsecurePlainForTests,
}

/// Where a profile's token comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
// Read once per profile at start: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum TokenSpec {
    /// The stored device-flow login of `gprxy login`, refreshed with its refresh token.
    Device {
        /// The credentials file (default: `gprxy login`'s).
        #[serde(default)]
        credentials_file: Option<PathBuf>,
    },
    /// The client-credentials grant (RFC 6749 section 4.4).
    ClientCredentials {
        /// Issuer URL (its metadata names the token endpoint).
        issuer: String,
        /// The token endpoint, if not the one the issuer's metadata names.
        #[serde(default)]
        token_endpoint: Option<String>,
        /// OAuth client id.
        client_id: String,
        /// How the client authenticates.
        #[serde(default)]
        client_auth: ClientAuth,
        /// File holding the client secret (`client_secret_basic`/`_post`).
        #[serde(default)]
        client_secret_file: Option<PathBuf>,
        /// Environment variable holding the client secret.
        #[serde(default)]
        client_secret_env: Option<String>,
        /// PEM private key (`private_key_jwt`).
        #[serde(default)]
        private_key_file: Option<PathBuf>,
        /// The assertion's algorithm (`private_key_jwt`): RS256 (default), ES256 or EdDSA.
        #[serde(default)]
        private_key_alg: Option<String>,
        /// Scopes to ask for.
        #[serde(default)]
        scope: Option<String>,
        /// `audience` parameter (Auth0 and others).
        #[serde(default)]
        audience: Option<String>,
        /// `resource` parameter (RFC 8707).
        #[serde(default)]
        resource: Option<String>,
        /// PEM CA file for a private issuer.
        #[serde(default)]
        ca_file: Option<PathBuf>,
        /// INSECURE, tests only: plain HTTP to a loopback issuer.
        #[serde(default)]
        insecure_allow_http_loopback: bool,
    },
    /// A file another program keeps current (Kubernetes projected tokens, Vault Agent).
    File {
        /// The file.
        path: PathBuf,
    },
    /// A command that prints a token on stdout (as kubectl's exec credential plugins do).
    Exec {
        /// Program and arguments (no shell).
        command: Vec<String>,
        /// Seconds the command may take.
        #[serde(default = "default_exec_timeout")]
        timeout_secs: u64,
    },
    /// GitHub Actions' OIDC token request (`ACTIONS_ID_TOKEN_REQUEST_URL`/`_TOKEN`).
    GithubActions {
        /// The audience to ask for.
        audience: String,
        /// INSECURE, tests only: a plain-HTTP request URL on loopback.
        #[serde(default)]
        insecure_allow_http_loopback: bool,
    },
}

fn default_exec_timeout() -> u64 {
    30
}

/// How a client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic (RFC 6749 section 2.3.1).
    #[default]
    ClientSecretBasic,
    /// Id and secret in the form.
    ClientSecretPost,
    /// A JWT signed with the client's key (RFC 7523, OpenID Connect Core section 9).
    PrivateKeyJwt,
}

/// TLS to the server, checked.
#[derive(Debug, Clone)]
pub struct Tls {
    /// CA file the server's certificate must chain to.
    pub ca_file: PathBuf,
    /// The name the certificate must carry (default: the host of the upstream being reached).
    pub server_name: Option<String>,
    /// Client certificate and key (libpq's sslcert/sslkey).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Where the connector listens for one profile.
#[derive(Debug, Clone)]
pub struct Listen {
    /// The private folder holding the socket `.s.PGSQL.<port>`.
    pub unix_dir: PathBuf,
    /// The port in the socket's name (libpq's `port`).
    pub port: u16,
    /// A TCP listener on loopback, when asked for.
    pub tcp: Option<SocketAddr>,
    /// `/metrics` and `/healthz` on loopback, when asked for.
    pub metrics: Option<SocketAddr>,
    /// Other OS users that may connect (the connector's own user always may).
    pub allow_uids: Vec<u32>,
}

impl Listen {
    /// The socket file.
    pub fn socket_path(&self) -> PathBuf {
        self.unix_dir.join(format!(".s.PGSQL.{}", self.port))
    }
}

/// One profile, checked.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Its name.
    pub name: String,
    /// The servers, `host:port`, tried in order for each connection until one answers.
    pub upstreams: Vec<String>,
    /// The servers as one line, for logs.
    pub upstream: String,
    /// Default user when the application names none.
    pub user: Option<String>,
    /// Default database when the application names none.
    pub database: Option<String>,
    /// How to log in.
    pub login: LoginMethod,
    /// TLS to the server; None only for the insecure test mode.
    pub tls: Option<Tls>,
    /// Refresh a token this long before it expires.
    pub refresh_margin_secs: u64,
    /// Time to reach the server.
    pub connect_timeout: std::time::Duration,
    /// Application connections at once (each is a server backend); more are refused.
    pub max_connections: usize,
    /// Listeners.
    pub listen: Listen,
    /// The token source.
    pub token: TokenSpec,
}

/// The whole file, checked.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Log format.
    pub log_format: LogFormat,
    /// Profiles by name.
    pub profiles: BTreeMap<String, Profile>,
}

impl ConnectConfig {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        // Whoever may write it runs programs as this user (an `exec` source) and picks where the
        // token goes: this user's or root's, written by nobody else.
        let own = own_uid()?;
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        let link = std::fs::symlink_metadata(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        for uid in [meta.uid(), link.uid()] {
            if uid != own && uid != 0 {
                bail!(
                    "config file {}: belongs to uid {uid}, not to this user ({own}) or root",
                    path.display()
                );
            }
        }
        if meta.mode() & 0o022 != 0 {
            bail!(
                "config file {}: others may write it (mode {:o}); run chmod go-w on it",
                path.display(),
                meta.mode() & 0o777
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// Checks the text of a file.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: FileConfig = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}", gprxy_core::issuers::toml_error(text, &e)))?;
        if file.profile.is_empty() {
            bail!("no profile: add a [profile.NAME] table");
        }
        let mut profiles = BTreeMap::new();
        for (name, p) in file.profile {
            let profile = check_profile(&name, p).map_err(|e| anyhow::anyhow!("profile {name:?}: {e}"))?;
            profiles.insert(name, profile);
        }
        Ok(Self { log_format: file.log.format.unwrap_or(LogFormat::Text), profiles })
    }

    /// The profile named, or the only one.
    pub fn profile(&self, name: Option<&str>) -> anyhow::Result<&Profile> {
        match name {
            Some(n) => self.profiles.get(n).with_context(|| {
                format!(
                    "no profile {n:?} in the config file (it has: {})",
                    self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }),
            None if self.profiles.len() == 1 => Ok(self.profiles.values().next().expect("one profile")),
            None => bail!(
                "the config file has several profiles ({}): choose one with --profile",
                self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn check_profile(name: &str, p: FileProfile) -> anyhow::Result<Profile> {
    if !valid_name(name) {
        bail!("a profile name is letters, digits, '-' and '_' (at most 64)");
    }
    let upstreams = match p.upstream {
        OneOrMany::One(u) => vec![u],
        OneOrMany::Many(v) => v,
    };
    if upstreams.is_empty() || upstreams.len() > 16 {
        bail!("upstream: one to 16 servers, each \"host:port\"");
    }
    for u in &upstreams {
        if host_of(u).is_none() {
            bail!("upstream: not host:port");
        }
    }
    // Every file is named by an absolute path: a secret or token pasted under a file key (a
    // client secret as `client_secret_file`, a PEM as `tls.key`) is refused here, by the key's
    // name, instead of reaching an error message as a file that cannot be read.
    let token_files: Vec<(&str, Option<&PathBuf>)> = match &p.token {
        TokenSpec::Device { credentials_file } => vec![("token.credentials_file", credentials_file.as_ref())],
        TokenSpec::ClientCredentials { client_secret_file, private_key_file, ca_file, .. } => vec![
            ("token.client_secret_file", client_secret_file.as_ref()),
            ("token.private_key_file", private_key_file.as_ref()),
            ("token.ca_file", ca_file.as_ref()),
        ],
        TokenSpec::File { path } => vec![("token.path", Some(path))],
        TokenSpec::Exec { .. } | TokenSpec::GithubActions { .. } => Vec::new(),
    };
    for (key, path) in [
        ("tls.ca_file", p.tls.ca_file.as_ref()),
        ("tls.cert", p.tls.cert.as_ref()),
        ("tls.key", p.tls.key.as_ref()),
        ("listen.unix_dir", p.listen.unix_dir.as_ref()),
    ]
    .into_iter()
    .chain(token_files)
    {
        if let Some(path) = path {
            let printable = path.to_str().is_some_and(|t| !t.chars().any(char::is_control));
            if !path.is_absolute() || !printable {
                bail!("{key}: must be an absolute path (the file's path, never its contents)");
            }
        }
    }
    let tls = match p.tls.mode {
        TlsMode::VerifyFull => {
            let ca_file = p.tls.ca_file.context(
                "tls.ca_file: required (the CA the server's certificate chains to, libpq's sslrootcert)",
            )?;
            let client_cert = match (p.tls.cert, p.tls.key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => bail!("tls.cert and tls.key: give both or neither"),
            };
            Some(Tls { ca_file, server_name: p.tls.server_name, client_cert })
        }
        TlsMode::InsecurePlainForTests => {
            if p.tls.ca_file.is_some() || p.tls.cert.is_some() || p.tls.key.is_some() {
                bail!("tls: mode insecure-plain-for-tests takes no CA or client certificate");
            }
            None
        }
    };
    let loopback = |key: &str, value: Option<String>| -> anyhow::Result<Option<SocketAddr>> {
        let Some(t) = value else { return Ok(None) };
        let addr: SocketAddr =
            t.parse().map_err(|_| anyhow::anyhow!("{key}: not an address like 127.0.0.1:6432"))?;
        if !addr.ip().is_loopback() {
            bail!("{key}: {addr} is not a loopback address; gprxy connect listens only on 127.0.0.1 or ::1");
        }
        Ok(Some(addr))
    };
    if p.max_connections == 0 || p.max_connections > 10_000 {
        bail!("max_connections: 1 to 10000");
    }
    let tcp = loopback("listen.tcp", p.listen.tcp)?;
    let metrics = loopback("listen.metrics", p.listen.metrics)?;
    let unix_dir = p.listen.unix_dir.unwrap_or_else(|| default_socket_dir(name));
    match &p.token {
        TokenSpec::ClientCredentials {
            client_auth,
            client_secret_file,
            client_secret_env,
            private_key_file,
            private_key_alg,
            ..
        } => match client_auth {
            ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost => {
                if client_secret_file.is_some() == client_secret_env.is_some() {
                    bail!("token: give one of client_secret_file and client_secret_env (never the secret itself)");
                }
                if private_key_file.is_some() {
                    bail!("token.private_key_file: only with client_auth = \"private_key_jwt\"");
                }
            }
            ClientAuth::PrivateKeyJwt => {
                if private_key_file.is_none() {
                    bail!("token.private_key_file: required with client_auth = \"private_key_jwt\"");
                }
                if client_secret_file.is_some() || client_secret_env.is_some() {
                    bail!("token: no client secret with client_auth = \"private_key_jwt\"");
                }
                if let Some(alg) = private_key_alg {
                    if !matches!(alg.as_str(), "RS256" | "ES256" | "EdDSA") {
                        bail!("token.private_key_alg: RS256, ES256 or EdDSA");
                    }
                }
            }
        },
        TokenSpec::Exec { command, timeout_secs } => {
            if command.is_empty() || command[0].is_empty() {
                bail!("token.command: a program and its arguments, e.g. [\"/usr/bin/get-token\", \"--db\"]");
            }
            if *timeout_secs == 0 || *timeout_secs > 600 {
                bail!("token.timeout_secs: 1 to 600");
            }
        }
        TokenSpec::GithubActions { audience, .. } if audience.is_empty() => {
            bail!("token.audience: required for GitHub Actions");
        }
        _ => {}
    }
    Ok(Profile {
        name: name.to_owned(),
        upstream: upstreams.join(", "),
        upstreams,
        user: p.user,
        database: p.database,
        login: p.login,
        tls,
        refresh_margin_secs: p.refresh_margin_secs,
        connect_timeout: std::time::Duration::from_secs(p.connect_timeout_secs.max(1)),
        max_connections: p.max_connections,
        listen: Listen {
            unix_dir,
            port: p.listen.port.unwrap_or(5432),
            tcp,
            metrics,
            allow_uids: p.listen.allow_uids,
        },
        token: p.token,
    })
}

/// The host of `host:port` (brackets of an IPv6 literal removed); None when it is not that.
pub fn host_of(upstream: &str) -> Option<&str> {
    let (host, port) = upstream.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty() && port.parse::<u16>().is_ok()).then_some(host)
}

/// `$XDG_RUNTIME_DIR/gprxy/<profile>`, else `<config dir>/run/<profile>`.
fn default_socket_dir(profile: &str) -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(|d| PathBuf::from(d).join("gprxy"))
        .unwrap_or_else(|| crate::user_login::config_dir().join("run"))
        .join(profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[profile.app]
upstream = "db.example.com:5432"
user = "alice"
tls.ca_file = "/etc/ssl/db-ca.pem"
listen.unix_dir = "/run/user/1000/gprxy/app"
listen.tcp = "127.0.0.1:6543"
token.source = "client_credentials"
token.issuer = "https://sso.example.com"
token.client_id = "app"
token.client_secret_file = "/etc/gprxy/app.secret"
"#;

    #[test]
    fn a_profile_is_read_into_typed_values() {
        let c = ConnectConfig::parse(GOOD).unwrap();
        let p = c.profile(None).unwrap();
        assert_eq!(p.user.as_deref(), Some("alice"));
        assert!(p.tls.as_ref().unwrap().server_name.is_none());
        assert_eq!(p.upstreams, ["db.example.com:5432"]);
        assert_eq!(p.listen.tcp, Some("127.0.0.1:6543".parse().unwrap()));
        assert_eq!(p.listen.socket_path(), PathBuf::from("/run/user/1000/gprxy/app/.s.PGSQL.5432"));
        assert!(matches!(
            p.token,
            TokenSpec::ClientCredentials { client_auth: ClientAuth::ClientSecretBasic, .. }
        ));
    }

    #[test]
    fn a_tcp_listener_beyond_loopback_is_refused() {
        let text = GOOD.replace("127.0.0.1:6543", "0.0.0.0:6543");
        assert_eq!(
            ConnectConfig::parse(&text).unwrap_err().to_string(),
            "profile \"app\": listen.tcp: 0.0.0.0:6543 is not a loopback address; gprxy connect listens only on 127.0.0.1 or ::1"
        );
    }

    #[test]
    fn the_metrics_listener_is_loopback_only_too() {
        let text = GOOD.replace("listen.tcp = \"127.0.0.1:6543\"", "listen.metrics = \"0.0.0.0:9187\"");
        assert_eq!(
            ConnectConfig::parse(&text).unwrap_err().to_string(),
            "profile \"app\": listen.metrics: 0.0.0.0:9187 is not a loopback address; gprxy connect listens only on 127.0.0.1 or ::1"
        );
    }

    #[test]
    fn max_connections_defaults_to_postgres_own_and_zero_is_refused() {
        assert_eq!(ConnectConfig::parse(GOOD).unwrap().profile(None).unwrap().max_connections, 100);
        let text = GOOD.replace("user = \"alice\"", "max_connections = 0");
        assert_eq!(
            ConnectConfig::parse(&text).unwrap_err().to_string(),
            "profile \"app\": max_connections: 1 to 10000"
        );
    }

    #[test]
    fn errors_never_quote_a_value() {
        // A secret pasted under a key that takes a number, and as an unknown source.
        let text = GOOD.replace("user = \"alice\"", "refresh_margin_secs = \"s3cr3t-value\"");
        let e = ConnectConfig::parse(&text).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(e.contains("line 4") && e.contains("refresh_margin_secs"), "{e}");
        let text = GOOD.replace("\"client_credentials\"", "\"s3cr3t-value\"");
        let e = ConnectConfig::parse(&text).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        let text = GOOD.replace(
            "token.client_secret_file = \"/etc/gprxy/app.secret\"",
            "token.client_secret = \"s3cr3t-value\"",
        );
        let e = ConnectConfig::parse(&text).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        // The secret itself, or a key's PEM, pasted where a file's path goes.
        for (key, pasted) in [
            ("token.client_secret_file", "s3cr3t-value"),
            ("tls.ca_file", "-----BEGIN CERTIFICATE-----\\nMIIs3cr3t"),
            ("tls.key", "/etc/x\\n-----BEGIN PRIVATE KEY-----\\ns3cr3t"),
        ] {
            let text = GOOD.replace("user = \"alice\"", &format!("{key} = \"{pasted}\""));
            let text = if key == "token.client_secret_file" {
                text.replace("token.client_secret_file = \"/etc/gprxy/app.secret\"\n", "")
            } else if key == "tls.ca_file" {
                text.replace("tls.ca_file = \"/etc/ssl/db-ca.pem\"\n", "")
            } else {
                text.replace("user = \"alice\"", "").replace("tls.key", "tls.cert = \"/etc/c.pem\"\ntls.key")
            };
            assert_eq!(
                ConnectConfig::parse(&text).unwrap_err().to_string(),
                format!(
                    "profile \"app\": {key}: must be an absolute path (the file's path, never its contents)"
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn verify_full_needs_a_ca_and_the_secret_comes_from_a_file_or_the_environment() {
        let text = GOOD.replace("tls.ca_file = \"/etc/ssl/db-ca.pem\"\n", "");
        assert_eq!(
            ConnectConfig::parse(&text).unwrap_err().to_string(),
            "profile \"app\": tls.ca_file: required (the CA the server's certificate chains to, libpq's sslrootcert)"
        );
        let text = GOOD.replace("token.client_secret_file = \"/etc/gprxy/app.secret\"\n", "");
        assert_eq!(
            ConnectConfig::parse(&text).unwrap_err().to_string(),
            "profile \"app\": token: give one of client_secret_file and client_secret_env (never the secret itself)"
        );
    }
}
