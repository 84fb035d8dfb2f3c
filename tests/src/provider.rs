//! A real OpenID Provider for end-to-end tests: panva's `oidc-provider` (OpenID Certified), run
//! by Node from `tests/provider/provider.mjs`, with the module `npm ci`'d by scripts/bootstrap.sh
//! into `$GPRXY_CACHE/node/oidc-provider-<lockfile hash>/node_modules`. A test that needs it
//! fails loudly when Node or the module is missing; it never skips.
//!
//! [`Provider`] starts it on free loopback ports (as the test user when the tests run as root)
//! and stops it on drop, printing its stderr when a test panics. [`Provider::approve_device`] is
//! the user: it completes a device-flow login through the provider's own pages over HTTP, so
//! psql 18 and `gprxy login` run unattended.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{cache_dir, command_as_test_user, PgVersion};

/// The resource whose access tokens are RFC 9068 JWTs (every client's default resource).
pub const JWT_RESOURCE: &str = "urn:gprxy:jwt";
/// The resource whose access tokens are opaque (asked for with `resource=`).
pub const OPAQUE_RESOURCE: &str = "urn:gprxy:opaque";
/// The `aud` of every access token.
pub const AUDIENCE: &str = "db";
/// Tenant of the accounts' `tenant_id` claim.
pub const ACME: &str = "11111111-1111-1111-1111-111111111111";
/// The public device-flow client psql 18 uses.
pub const PSQL_CLIENT: &str = "psql";
/// The public device-flow client `gprxy login` uses: its access tokens live 30 s, so
/// `gprxy token` (which refreshes below a minute left) refreshes every time.
pub const CLI_CLIENT: &str = "cli";
/// A confidential client-credentials client (roles `reader`).
pub const SVC_CLIENT: &str = "svc";
/// Its secret.
pub const SVC_SECRET: &str = "svc-secret-5d1c0e7a93b24f68";
/// The confidential client gprxy introspects with.
pub const INTROSPECTION_CLIENT: &str = "gprxy";
/// Its secret.
pub const INTROSPECTION_SECRET: &str = "gprxy-introspection-8c2f41d7e9";

fn provider_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("provider")
}

/// The `node_modules` folder scripts/bootstrap.sh installs tests/provider's lockfile into.
/// Panics with how to get it when it is missing.
pub fn node_modules() -> PathBuf {
    let lock =
        std::fs::read(provider_dir().join("package-lock.json")).expect("tests/provider/package-lock.json");
    let dir = cache_dir().join("node").join(format!("oidc-provider-{}", gprxy_core::fingerprint(&lock)));
    assert!(
        dir.join(".installed").exists() && dir.join("node_modules/oidc-provider/package.json").exists(),
        "oidc-provider (tests/provider/package-lock.json) is not installed at {}: run scripts/bootstrap.sh \
         (make test does; it installs Node and npm from Debian if absent)",
        dir.display()
    );
    dir.join("node_modules")
}

/// The configuration [`Provider::start`] uses: accounts alice (roles `writer`) and bob
/// (`reader`), the clients above.
pub fn default_config() -> Value {
    let device = json!(["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"]);
    json!({
        "audience": AUDIENCE,
        "signing_alg": "RS256",
        "access_token_ttl": 300,
        "access_token_ttl_by_client": { CLI_CLIENT: 30 },
        "accounts": {
            "alice": { "roles": ["writer"], "tenant_id": ACME, "email": "alice@example.com" },
            "bob": { "roles": ["reader"], "tenant_id": ACME },
        },
        "client_claims": { SVC_CLIENT: { "roles": ["reader"], "tenant_id": ACME } },
        "clients": [
            { "client_id": PSQL_CLIENT, "token_endpoint_auth_method": "none", "grant_types": device,
              "response_types": [], "redirect_uris": [] },
            { "client_id": CLI_CLIENT, "token_endpoint_auth_method": "none", "grant_types": device,
              "response_types": [], "redirect_uris": [] },
            { "client_id": SVC_CLIENT, "client_secret": SVC_SECRET, "grant_types": ["client_credentials"],
              "response_types": [], "redirect_uris": [] },
            { "client_id": INTROSPECTION_CLIENT, "client_secret": INTROSPECTION_SECRET,
              "grant_types": ["client_credentials"], "response_types": [], "redirect_uris": [] },
        ],
    })
}

/// A running oidc-provider.
pub struct Provider {
    child: Child,
    stdin: Option<ChildStdin>,
    dir: tempfile::TempDir,
    /// The issuer's port.
    pub port: u16,
    control_port: u16,
}

impl Provider {
    /// Starts the provider with [`default_config`].
    pub fn start() -> Self {
        Self::start_with(default_config())
    }

    /// Starts the provider with this configuration (see tests/provider/provider.mjs).
    pub fn start_with(config: Value) -> Self {
        let modules = node_modules();
        let dir = tempfile::Builder::new().prefix("gprxy-idp").tempdir().expect("temp dir");
        {
            use std::os::unix::fs::PermissionsExt;
            // The test user reads the program and its configuration (test secrets only).
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let program = dir.path().join("provider.mjs");
        std::fs::copy(provider_dir().join("provider.mjs"), &program).expect("copy provider.mjs");
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, config.to_string()).expect("write provider config");
        let stderr = std::fs::File::create(dir.path().join("provider.log")).expect("provider log");
        let mut child = command_as_test_user("node")
            .arg(&program)
            .arg(&config_path)
            .env("GPRXY_NODE_MODULES", &modules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run node ({e}): run scripts/bootstrap.sh (it installs Node)"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let later = dir.path().join("provider.stdout");
        std::thread::spawn(move || {
            // The first line names the ports; what follows (oidc-provider's notices) is kept
            // for the failure message, and the pipe stays open (a closed one kills node).
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            if let Ok(mut f) = std::fs::File::create(later) {
                let _ = std::io::copy(&mut reader, &mut f);
            }
        });
        let mut p = Self { child, stdin, dir, port: 0, control_port: 0 };
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Ok(ports) = serde_json::from_str::<Value>(&line) else {
            panic!("oidc-provider did not start (stdout {line:?}):\n{}", p.log());
        };
        p.port = ports["port"].as_u64().and_then(|v| u16::try_from(v).ok()).expect("port");
        p.control_port =
            ports["control_port"].as_u64().and_then(|v| u16::try_from(v).ok()).expect("control port");
        assert_eq!(ports["issuer"], p.issuer(), "the provider names another issuer");
        p
    }

    /// The issuer identifier, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The provider's stderr so far.
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}{}", read("provider.log"), read("provider.stdout"))
    }

    /// Requests per path the provider got so far.
    pub fn counts(&self) -> Value {
        let r = http("GET", &format!("http://127.0.0.1:{}/counts", self.control_port), &[], None);
        serde_json::from_str(&r.body).expect("counts")
    }

    /// Requests to the JWKS endpoint so far.
    pub fn jwks_requests(&self) -> u64 {
        self.counts()["/jwks"].as_u64().unwrap_or(0)
    }

    /// Requests to the token endpoint so far (counted as they arrive, before any answer).
    pub fn token_requests(&self) -> u64 {
        self.counts()["/token"].as_u64().unwrap_or(0)
    }

    /// Token requests that authenticated the client with HTTP Basic (client_secret_basic).
    pub fn basic_token_requests(&self) -> u64 {
        self.counts()["/token:basic"].as_u64().unwrap_or(0)
    }

    /// The token endpoint answers `ms` milliseconds late from now on (0: at once).
    pub fn delay_token_endpoint(&self, ms: u64) {
        let r = http("POST", &format!("http://127.0.0.1:{}/delay?ms={ms}", self.control_port), &[], Some(""));
        assert_eq!(r.status, 200, "delay: {}", r.body);
    }

    /// Requests to the introspection endpoint so far.
    pub fn introspection_requests(&self) -> u64 {
        self.counts()["/token/introspection"].as_u64().unwrap_or(0)
    }

    /// A new signing key of `alg` (RS256, ES256, EdDSA), first in the published key set; the
    /// older keys stay published. Returns its `kid`.
    pub fn rotate(&self, alg: &str) -> String {
        let r =
            http("POST", &format!("http://127.0.0.1:{}/rotate?alg={alg}", self.control_port), &[], Some(""));
        assert_eq!(r.status, 200, "rotate: {}", r.body);
        let v: Value = serde_json::from_str(&r.body).expect("rotate answer");
        v["kid"].as_str().expect("kid").to_owned()
    }

    /// Only the newest signing key stays published (and an RS256 one for ID tokens).
    pub fn retire_old_keys(&self) {
        let r = http("POST", &format!("http://127.0.0.1:{}/retire", self.control_port), &[], Some(""));
        assert_eq!(r.status, 200, "retire: {}", r.body);
    }

    /// A form POST to an endpoint of the issuer (with HTTP Basic client authentication when
    /// `basic` is given); returns the status and the JSON answer.
    pub fn post(&self, path: &str, basic: Option<(&str, &str)>, form: &[(&str, &str)]) -> (u16, Value) {
        use base64::Engine as _;
        let auth = basic.map(|(id, secret)| {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
        });
        let mut headers = vec![("content-type", "application/x-www-form-urlencoded".to_owned())];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let r = http("POST", &format!("{}{path}", self.issuer()), &headers, Some(&form_encode(form)));
        let body = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&r.body).unwrap_or(json!(r.body))
        };
        (r.status, body)
    }

    /// A client-credentials access token for the `svc` client (a JWT, or opaque with
    /// `Some(OPAQUE_RESOURCE)`).
    pub fn client_credentials(&self, resource: Option<&str>) -> String {
        let mut form = vec![("grant_type", "client_credentials"), ("scope", "db:read")];
        if let Some(r) = resource {
            form.push(("resource", r));
        }
        let (status, body) = self.post("/token", Some((SVC_CLIENT, SVC_SECRET)), &form);
        assert_eq!(status, 200, "client credentials: {body}");
        body["access_token"].as_str().expect("access_token").to_owned()
    }

    /// Revokes a token of the `svc` client (RFC 7009).
    pub fn revoke_svc_token(&self, token: &str) {
        let (status, body) =
            self.post("/token/revocation", Some((SVC_CLIENT, SVC_SECRET)), &[("token", token)]);
        assert_eq!(status, 200, "revocation: {body}");
    }

    /// A whole device flow driven from here: the device authorization request for `client`
    /// (with `extra` parameters), the user `account` approving it, the token request. Returns
    /// the token endpoint's answer.
    pub fn device_tokens(&self, client: &str, account: &str, extra: &[(&str, &str)]) -> Value {
        let mut form = vec![("client_id", client), ("scope", "openid offline_access db:read")];
        form.extend_from_slice(extra);
        let (status, dev) = self.post("/device/auth", None, &form);
        assert_eq!(status, 200, "device authorization: {dev}");
        self.approve_device(dev["user_code"].as_str().expect("user_code"), account);
        let code = dev["device_code"].as_str().expect("device_code");
        let grant = "urn:ietf:params:oauth:grant-type:device_code";
        let (status, tokens) =
            self.post("/token", None, &[("grant_type", grant), ("device_code", code), ("client_id", client)]);
        assert_eq!(status, 200, "device token: {tokens}");
        tokens
    }

    /// The refresh grant for a public client; returns the status and answer.
    pub fn refresh(&self, client: &str, refresh_token: &str) -> (u16, Value) {
        self.post(
            "/token",
            None,
            &[("grant_type", "refresh_token"), ("refresh_token", refresh_token), ("client_id", client)],
        )
    }

    /// The user: signs in as `account` and approves the device login with `user_code` through
    /// the provider's own pages (the code's page, its confirmation, the login form, the consent
    /// form), as a browser would, cookies included. Panics with the page when a step fails.
    pub fn approve_device(&self, user_code: &str, account: &str) {
        let mut jar = BTreeMap::new();
        let mut url =
            format!("{}/device?user_code={}", self.issuer(), form_encode(&[("", user_code)])[1..].to_owned());
        let mut body: Option<String> = None;
        let mut trail = Vec::new();
        for _ in 0..20 {
            let method = if body.is_some() { "POST" } else { "GET" };
            trail.push(format!("{method} {}", url.split('?').next().unwrap_or_default()));
            let mut headers = vec![("cookie", cookie_header(&jar))];
            if body.is_some() {
                headers.push(("content-type", "application/x-www-form-urlencoded".to_owned()));
            }
            let r = http(method, &url, &headers, body.as_deref());
            for (k, v) in &r.headers {
                if k == "set-cookie" {
                    set_cookie(&mut jar, v);
                }
            }
            if (300..400).contains(&r.status) {
                let loc = r.header("location").unwrap_or_else(|| panic!("redirect without location"));
                url = if loc.starts_with('/') { format!("{}{loc}", self.issuer()) } else { loc.to_owned() };
                body = None;
                continue;
            }
            assert_eq!(r.status, 200, "device approval: {method} {url} answered {}:\n{}", r.status, r.body);
            if r.body.contains("Sign-in Success") {
                return;
            }
            let Some(form) = first_post_form(&r.body) else {
                panic!("device approval: no form and no success after {trail:?}:\n{}", r.body);
            };
            let fields: Vec<(String, String)> = form
                .inputs
                .into_iter()
                .map(|(name, value)| match name.as_str() {
                    "login" => (name, account.to_owned()),
                    "password" => (name, "any password".to_owned()),
                    _ => (name, value),
                })
                .collect();
            let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            body = Some(form_encode(&pairs));
            url = if form.action.starts_with('/') {
                format!("{}{}", self.issuer(), form.action)
            } else {
                form.action
            };
        }
        panic!("device approval did not finish: {trail:?}");
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- oidc-provider log -----\n{}\n----- end -----", self.log());
        }
        // Closing stdin ends it (runuser passes it through); SIGTERM, then SIGKILL, if not.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
                std::thread::sleep(Duration::from_millis(500));
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
    }
}

/// Runs `program` (psql 18, `gprxy login`), reading its stderr as it comes: when it prints the
/// device flow's user code (after `marker`), `provider`'s user approves it as `account`.
/// Returns (success, stdout, stderr).
pub fn run_device_client(
    mut cmd: Command,
    stdin: &str,
    marker: &str,
    provider: &Provider,
    account: &str,
) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(stdin.as_bytes());
    }
    let stderr = child.stderr.take().expect("stderr");
    let mut stdout = child.stdout.take().expect("stdout");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut err = String::new();
    std::thread::scope(|scope| {
        let mut approvals = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split_once(marker).map(|(_, r)| r.trim().to_owned()) {
                let code = rest.split_whitespace().next().unwrap_or_default().to_owned();
                approvals.push(scope.spawn(move || provider.approve_device(&code, account)));
            }
            err.push_str(&line);
            err.push('\n');
        }
        for a in approvals {
            if let Err(e) = a.join() {
                std::panic::resume_unwind(e);
            }
        }
    });
    let status = child.wait().expect("wait");
    (status.success(), out_thread.join().unwrap_or_default().trim_end().to_owned(), err)
}

/// psql 18's own OAuth device flow (libpq, `PGOAUTHDEBUG=UNSAFE` for the plain-HTTP loopback
/// issuer) with client `psql` against `conninfo`, the user signing in as `account`; SQL from
/// stdin. Returns stdout, or stderr on failure.
pub fn psql18_device_login(
    provider: &Provider,
    account: &str,
    conninfo: &str,
    sql: &str,
) -> Result<String, String> {
    psql18_device_login_at(provider, &provider.issuer(), account, conninfo, sql)
}

/// [`psql18_device_login`] with `oauth_issuer` as given (the issuer's well-known URL, say).
pub fn psql18_device_login_at(
    provider: &Provider,
    oauth_issuer: &str,
    account: &str,
    conninfo: &str,
    sql: &str,
) -> Result<String, String> {
    let mut cmd = Command::new(PgVersion::V18.bin("psql"));
    cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-", "-d"])
        .arg(format!(
            "{conninfo} oauth_issuer={oauth_issuer} oauth_client_id={PSQL_CLIENT} connect_timeout=30"
        ))
        .env("PGOAUTHDEBUG", "UNSAFE")
        .env_remove("PGPASSWORD");
    let (ok, out, err) = run_device_client(cmd, sql, "enter the code:", provider, account);
    if ok {
        Ok(out)
    } else {
        Err(err)
    }
}

/// A minimal HTTP/1.1 answer.
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (chunked encoding undone).
    pub body: String,
}

impl HttpResponse {
    /// The first header of this (lowercase) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request to a plain-HTTP loopback URL (`Connection: close`).
pub fn http(method: &str, url: &str, headers: &[(&str, String)], body: Option<&str>) -> HttpResponse {
    let rest = url.strip_prefix("http://").unwrap_or_else(|| panic!("not a plain-HTTP URL: {url}"));
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAccept: */*\r\n");
    for (k, v) in headers {
        if !v.is_empty() {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or_default());
    s.write_all(req.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {url}: no header end"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status =
        lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut data = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked")) {
        data = dechunk(&data);
    }
    HttpResponse { status, headers, body: String::from_utf8_lossy(&data).into_owned() }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
    out
}

/// `application/x-www-form-urlencoded`.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

fn cookie_header(jar: &BTreeMap<String, String>) -> String {
    jar.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
}

fn set_cookie(jar: &mut BTreeMap<String, String>, header: &str) {
    let first = header.split(';').next().unwrap_or_default();
    let Some((name, value)) = first.split_once('=') else { return };
    let gone = value.is_empty() || header.to_ascii_lowercase().contains("expires=thu, 01 jan 1970");
    if gone {
        jar.remove(name.trim());
    } else {
        jar.insert(name.trim().to_owned(), value.trim().to_owned());
    }
}

struct Form {
    action: String,
    inputs: Vec<(String, String)>,
}

/// The first `<form method="post">` of a page: its action and its inputs' names and values.
fn first_post_form(html: &str) -> Option<Form> {
    let mut rest = html;
    while let Some(start) = rest.find("<form") {
        let after = &rest[start..];
        let tag_end = after.find('>')?;
        let tag = &after[..tag_end];
        let end = after.find("</form>").unwrap_or(after.len());
        if attr(tag, "method").is_some_and(|m| m.eq_ignore_ascii_case("post")) {
            let inner = &after[tag_end..end];
            let mut inputs = Vec::new();
            let mut s = inner;
            while let Some(i) = s.find("<input") {
                let t = &s[i..];
                let close = t.find('>').unwrap_or(t.len());
                let input = &t[..close];
                if let Some(name) = attr(input, "name") {
                    inputs.push((name, attr(input, "value").unwrap_or_default()));
                }
                s = &t[close..];
            }
            return Some(Form { action: attr(tag, "action")?, inputs });
        }
        rest = &after[tag_end..];
    }
    None
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!("{name}=\"");
    let mut search = tag;
    loop {
        let i = search.find(&needle)?;
        let before = search[..i].chars().last();
        let value_start = &search[i + needle.len()..];
        if before.is_some_and(char::is_whitespace) {
            let v = &value_start[..value_start.find('"')?];
            return Some(
                v.replace("&quot;", "\"")
                    .replace("&#39;", "'")
                    .replace("&#x27;", "'")
                    .replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&amp;", "&"),
            );
        }
        search = value_start;
    }
}

/// The claims of a JWT, read without checking it (to assert what the provider issued).
pub fn jwt_claims(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap_or_else(|| panic!("not a JWT"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON payload")
}

/// The protected header of a JWT.
pub fn jwt_header(token: &str) -> Value {
    use base64::Engine as _;
    let head = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head).expect("base64url header");
    serde_json::from_slice(&bytes).expect("JSON header")
}

/// Whether `text` holds anything that looks like a JWT (a base64url JSON header).
pub fn holds_a_jwt(text: &str) -> bool {
    text.contains("eyJhbGciOi") || text.contains("eyJ0eXAiOi")
}

/// A path for the `gprxy login` credentials of a test.
pub fn config_dir(dir: &Path) -> PathBuf {
    dir.join("config").join("gprxy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_attributes_are_read_as_a_browser_would() {
        let page = r#"<form id="a" method="get" action="/x"></form>
<form id="op.deviceConfirmForm" method="post" action="http://127.0.0.1:1/device">
<input type="hidden" name="xsrf" value="a&amp;b"/>
<input required type="text" name="login" placeholder="Enter any login" >
</form>"#;
        let f = first_post_form(page).unwrap();
        assert_eq!(f.action, "http://127.0.0.1:1/device");
        assert_eq!(f.inputs, vec![("xsrf".into(), "a&b".into()), ("login".into(), String::new())]);
        assert_eq!(form_encode(&[("a b", "c&d=é")]), "a+b=c%26d%3D%C3%A9");
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
        let mut jar = BTreeMap::new();
        set_cookie(&mut jar, "_s=1; path=/; httponly");
        set_cookie(&mut jar, "_t=2; path=/");
        set_cookie(&mut jar, "_t=; path=/; expires=Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(cookie_header(&jar), "_s=1");
    }
}
