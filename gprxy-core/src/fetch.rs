//! HTTP GET of discovery documents and key sets, with every limit a hostile or broken server
//! could abuse bounded: connect and read timeouts, no redirects, a body cap, HTTPS only.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{ConfigError, KeyError, Quoted, Setting};

/// A successful response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The body (at most the configured cap).
    pub body: Vec<u8>,
    /// `Cache-Control: max-age`, in seconds, if the server sent one (and no `no-store`/`no-cache`,
    /// which read as 0).
    pub max_age: Option<u64>,
}

/// Fetches a URL. Replaceable in tests.
pub trait Fetcher: Send + Sync {
    /// GETs `url`.
    fn get(&self, url: &str) -> Result<HttpResponse, KeyError>;

    /// What the fetched documents are trusted through, beyond the system's roots: empty for
    /// those, else the CA file's path and a hash of its content. Key sets fetched under one
    /// trust are never served under another (a CA file a reload removed or replaced).
    fn trust_id(&self) -> String {
        String::new()
    }
}

/// [`Fetcher::trust_id`] of `settings`: the CA file's path and the SHA-256 of what it holds now
/// (`unreadable` when it cannot be read).
pub fn trust_id_of(settings: &HttpSettings) -> String {
    match &settings.ca_file {
        None => String::new(),
        Some(path) => {
            let content = std::fs::read(path)
                .map_or_else(|_| "unreadable".to_owned(), |pem| crate::jose::fingerprint(&pem));
            format!("ca_file {} {content}", path.display())
        }
    }
}

/// POSTs forms (OAuth endpoints: introspection), besides GETs.
pub trait FormPoster: Fetcher {
    /// POSTs `form` to `url`, with HTTP Basic credentials when given; returns status and body.
    fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> Result<(u16, Vec<u8>), KeyError>;
}

/// Limits of the HTTP client.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Time to open the connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Time for the whole request after connecting.
    pub read_timeout: Duration,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// INSECURE, for loopback tests only: allow `http://` URLs whose host is a loopback address.
    pub insecure_allow_http_loopback: bool,
    /// PEM file of CA certificates to trust instead of the public web roots (private IdPs).
    pub ca_file: Option<PathBuf>,
    /// Resolve host names on the calling thread. ureq's default resolver starts a thread per
    /// lookup to time it out; PostgreSQL processes must stay single-threaded, so the extension
    /// sets this. IP literals need no lookup; a name's lookup is then bounded by the system
    /// resolver's own limits (resolv.conf `timeout` and `attempts`), not by `connect_timeout`.
    pub resolve_in_caller_thread: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(3),
            max_body_bytes: 64 * 1024,
            insecure_allow_http_loopback: false,
            ca_file: None,
            resolve_in_caller_thread: false,
        }
    }
}

/// Splits `url` into (is_https, host), refusing user info and anything that is not http(s).
fn scheme_and_host(url: &str) -> Result<(bool, &str), KeyError> {
    let bad = || KeyError::BadUrl(Quoted::new(url));
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(KeyError::InsecureUrl(Quoted::new(url)));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') || url.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().ok_or_else(bad)?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    Ok((https, host))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks that `url` may be fetched under `settings`.
pub fn check_url(url: &str, allow_http_loopback: bool) -> Result<(), KeyError> {
    let (https, host) = scheme_and_host(url)?;
    let allowed = https || (allow_http_loopback && is_loopback(host));
    if !allowed {
        return Err(KeyError::InsecureUrl(Quoted::new(url)));
    }
    Ok(())
}

/// Reads `Cache-Control` for a max-age. `no-store` and `no-cache` count as 0.
pub fn parse_max_age(cache_control: &str) -> Option<u64> {
    let mut max_age = None;
    for directive in cache_control.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(0);
        }
        if let Some(v) = lower.strip_prefix("max-age=") {
            max_age = v.trim_matches('"').parse().ok();
        }
    }
    max_age
}

/// The real fetcher, on ureq with rustls (aws-lc-rs).
pub struct UreqFetcher {
    agent: ureq::Agent,
    settings: HttpSettings,
}

impl UreqFetcher {
    /// Builds the client; fails if the CA file cannot be read.
    pub fn new(settings: HttpSettings) -> Result<Self, ConfigError> {
        use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
        let roots = match &settings.ca_file {
            None => RootCerts::WebPki,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    ConfigError::new(Setting::CaFile, format!("cannot read {}: {e}", path.display()))
                })?;
                let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                        _ => None,
                    })
                    .collect();
                if certs.is_empty() {
                    return Err(ConfigError::new(
                        Setting::CaFile,
                        format!("{} holds no PEM certificate", path.display()),
                    ));
                }
                RootCerts::Specific(Arc::new(certs))
            }
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(roots)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .build();
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .proxy(None)
            .max_redirects(0)
            .http_status_as_error(false)
            .https_only(!settings.insecure_allow_http_loopback)
            .timeout_connect(Some(settings.connect_timeout))
            .timeout_resolve(Some(settings.connect_timeout))
            .timeout_recv_response(Some(settings.read_timeout))
            .timeout_recv_body(Some(settings.read_timeout))
            .timeout_global(Some(settings.connect_timeout + settings.read_timeout))
            .user_agent(concat!("gprxy/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = if settings.resolve_in_caller_thread {
            ureq::Agent::with_parts(
                config,
                ureq::unversioned::transport::DefaultConnector::new(),
                CallerThreadResolver,
            )
        } else {
            config.into()
        };
        Ok(Self { agent, settings })
    }
}

/// Resolves on the calling thread with the system resolver, never starting a thread.
#[derive(Debug)]
pub struct CallerThreadResolver;

impl ureq::unversioned::resolver::Resolver for CallerThreadResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        use std::net::ToSocketAddrs;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(ureq::Error::BadUri(uri.to_string()));
        };
        let host_port = ureq::unversioned::resolver::DefaultResolver::host_and_port(scheme, authority)
            .ok_or_else(|| ureq::Error::BadUri(uri.to_string()))?;
        let mut found = self.empty();
        for addr in config.ip_family().keep_wanted(host_port.to_socket_addrs()?).take(16) {
            found.push(addr);
        }
        if found.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(found)
    }
}

impl UreqFetcher {
    fn transport_error(&self, url: &str, e: ureq::Error) -> KeyError {
        match e {
            ureq::Error::Timeout(_) => KeyError::Timeout(Quoted::new(url)),
            ureq::Error::BodyExceedsLimit(_) => {
                KeyError::TooLarge { url: Quoted::new(url), limit: self.settings.max_body_bytes }
            }
            other => KeyError::Transport { url: Quoted::new(url), reason: other.to_string() },
        }
    }

    /// POSTs an `application/x-www-form-urlencoded` form (OAuth endpoints) and returns the
    /// status with the body (OAuth errors come as 400 with a JSON body), under the same limits.
    pub fn post_form(&self, url: &str, form: &[(&str, &str)]) -> Result<(u16, Vec<u8>), KeyError> {
        self.post_form_as(url, form, None)
    }

    /// [`Self::post_form`] with HTTP Basic client credentials (RFC 6749 section 2.3.1: id and
    /// secret form-encoded, then joined by `:`).
    pub fn post_form_as(
        &self,
        url: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> Result<(u16, Vec<u8>), KeyError> {
        check_url(url, self.settings.insecure_allow_http_loopback)?;
        let mut request = self.agent.post(url).header("Accept", "application/json");
        if let Some((id, secret)) = basic {
            use base64::Engine as _;
            let pair = format!("{}:{}", form_encode(id), form_encode(secret));
            let value = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair));
            request = request.header("Authorization", value);
        }
        let sent = request.send_form(form.iter().copied());
        let (status, _, body) = self.finish(url, sent, false)?;
        Ok((status, body))
    }

    /// GETs `url` with `Authorization: Bearer <bearer>` (a token-request endpoint such as
    /// GitHub Actions' OIDC one); returns the status and body under the same limits.
    pub fn get_with_bearer(&self, url: &str, bearer: &str) -> Result<(u16, Vec<u8>), KeyError> {
        check_url(url, self.settings.insecure_allow_http_loopback)?;
        let sent = self
            .agent
            .get(url)
            .header("Accept", "application/json")
            .header("Authorization", format!("Bearer {bearer}"))
            .call();
        let (status, _, body) = self.finish(url, sent, false)?;
        Ok((status, body))
    }

    /// Status, `Cache-Control` max-age and body of a response: transport errors mapped,
    /// redirects refused, any status but 200 refused before the body when `require_200`, the
    /// body capped.
    fn finish(
        &self,
        url: &str,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        require_200: bool,
    ) -> Result<(u16, Option<u64>, Vec<u8>), KeyError> {
        let transport = |e| self.transport_error(url, e);
        let mut resp = sent.map_err(transport)?;
        let status = resp.status().as_u16();
        if (300..400).contains(&status) {
            return Err(KeyError::Redirect(Quoted::new(url)));
        }
        if require_200 && status != 200 {
            return Err(KeyError::Status { url: Quoted::new(url), status });
        }
        let max_age =
            resp.headers().get("cache-control").and_then(|v| v.to_str().ok()).and_then(parse_max_age);
        let body = resp
            .body_mut()
            .with_config()
            .limit(self.settings.max_body_bytes as u64)
            .read_to_vec()
            .map_err(transport)?;
        Ok((status, max_age, body))
    }
}

impl Fetcher for UreqFetcher {
    fn get(&self, url: &str) -> Result<HttpResponse, KeyError> {
        check_url(url, self.settings.insecure_allow_http_loopback)?;
        let sent = self.agent.get(url).header("Accept", "application/json").call();
        let (_, max_age, body) = self.finish(url, sent, true)?;
        Ok(HttpResponse { body, max_age })
    }

    fn trust_id(&self) -> String {
        trust_id_of(&self.settings)
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(char::from(b)),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl FormPoster for UreqFetcher {
    fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> Result<(u16, Vec<u8>), KeyError> {
        self.post_form_as(url, form, basic)
    }
}

/// A [`UreqFetcher`] built on the first request instead of up front: a PostgreSQL backend serves
/// one login, and most logins find their keys in the shared cache and never fetch, so they need
/// not pay for an HTTP agent (TLS configuration, root store, CA file read).
pub struct LazyFetcher {
    settings: HttpSettings,
    /// Only a successful build is kept: a CA file unreadable for a moment (during its rotation)
    /// is tried again on the next request.
    built: std::sync::OnceLock<UreqFetcher>,
}

impl LazyFetcher {
    /// Keeps the settings; builds nothing yet.
    pub fn new(settings: HttpSettings) -> Self {
        Self { settings, built: std::sync::OnceLock::new() }
    }

    /// Whether the HTTP agent has been built (a request was made).
    pub fn is_built(&self) -> bool {
        self.built.get().is_some()
    }
}

impl LazyFetcher {
    fn fetcher(&self, url: &str) -> Result<&UreqFetcher, KeyError> {
        if let Some(fetcher) = self.built.get() {
            return Ok(fetcher);
        }
        match UreqFetcher::new(self.settings.clone()) {
            Ok(fetcher) => Ok(self.built.get_or_init(|| fetcher)),
            Err(e) => Err(KeyError::Transport {
                url: Quoted::new(url),
                reason: format!("the HTTP client could not be built: {e}"),
            }),
        }
    }
}

impl Fetcher for LazyFetcher {
    fn get(&self, url: &str) -> Result<HttpResponse, KeyError> {
        self.fetcher(url)?.get(url)
    }

    fn trust_id(&self) -> String {
        trust_id_of(&self.settings)
    }
}

impl FormPoster for LazyFetcher {
    fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> Result<(u16, Vec<u8>), KeyError> {
        self.fetcher(url)?.post_form_as(url, form, basic)
    }
}

/// Reads a policy or key file that decides who may log in: a regular file (a FIFO would block
/// the reader), at most `max` bytes, that neither its group nor others may write (whoever can
/// write it can admit any token).
pub fn read_policy_file(path: &std::path::Path, max: u64) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!("writable by its group or others (mode {:o}): chmod go-w", meta.mode() & 0o777));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_rules() {
        assert!(check_url("https://idp.example/jwks", false).is_ok());
        assert!(matches!(check_url("http://idp.example/jwks", false), Err(KeyError::InsecureUrl(_))));
        assert!(matches!(check_url("http://idp.example/jwks", true), Err(KeyError::InsecureUrl(_))));
        assert!(check_url("http://127.0.0.1:8080/jwks", true).is_ok());
        assert!(check_url("http://[::1]:8080/jwks", true).is_ok());
        assert!(check_url("http://localhost/jwks", true).is_ok());
        assert!(matches!(check_url("http://127.0.0.1/x", false), Err(KeyError::InsecureUrl(_))));
        assert!(matches!(check_url("file:///etc/passwd", true), Err(KeyError::InsecureUrl(_))));
        assert!(matches!(check_url("https://user@idp/x", false), Err(KeyError::BadUrl(_))));
        assert!(matches!(check_url("http://127.0.0.1.evil.com/x", true), Err(KeyError::InsecureUrl(_))));
    }

    #[test]
    fn cache_control() {
        assert_eq!(parse_max_age("public, max-age=600"), Some(600));
        assert_eq!(parse_max_age("no-store"), Some(0));
        assert_eq!(parse_max_age("public"), None);
        assert_eq!(parse_max_age("max-age=abc"), None);
    }

    #[test]
    fn lazy_fetcher_builds_nothing_until_asked() {
        let missing = HttpSettings { ca_file: Some("/nonexistent/ca.pem".into()), ..HttpSettings::default() };
        let f = super::LazyFetcher::new(missing);
        assert!(!f.is_built());
        let err = f.get("https://idp.example.com/jwks").unwrap_err().to_string();
        assert!(
            err.contains("the HTTP client could not be built: ") && err.contains("/nonexistent/ca.pem"),
            "{err}"
        );
        // A failed build is not kept: the next request tries again (the CA file may be back).
        assert!(!f.is_built());
    }
}
