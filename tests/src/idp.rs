//! A test issuer on loopback: OpenID discovery, a JWKS, and a device flow that approves itself
//! and hands the client whatever token the test registered for its `client_id`.

use std::collections::HashMap;
use std::sync::Arc;

use gprxy_core::testkit::{jwks, now, Request, Response, TestKey, TestServer};
use parking_lot::Mutex;
use serde_json::{json, Value};

#[derive(Default)]
struct State {
    jwks: Value,
    tokens: HashMap<String, Grant>,
    /// Client ids whose access token is made at each grant, with its lifetime in seconds.
    minted: HashMap<String, (Arc<Mint>, i64)>,
    refreshes: HashMap<String, Grant>,
    pending: HashMap<String, u32>,
    jwks_status: Option<u16>,
    jwks_black_hole: bool,
    /// The token endpoint answers with this status and body instead.
    token_failure: Option<(u16, &'static str)>,
    /// The `resource` values of each POST, by path, in order.
    resources: Vec<(String, Vec<String>)>,
    introspection: Introspection,
    /// Client-credentials clients: id -> (secret, token handed out).
    clients: HashMap<String, (String, Grant)>,
    /// `private_key_jwt` clients: id -> (PKCS#1 DER RSA public key, token handed out).
    key_clients: HashMap<String, (Vec<u8>, Grant)>,
    /// Assertion ids seen (a replayed assertion is refused).
    jtis: std::collections::HashSet<String>,
}

/// The introspection endpoint's state (RFC 7662).
#[derive(Default)]
struct Introspection {
    /// The client id and secret it accepts (None: every request is refused).
    client: Option<(String, String)>,
    /// Opaque tokens that are active, with their claims.
    opaque: HashMap<String, Value>,
    /// Tokens revoked (opaque or JWT).
    revoked: std::collections::HashSet<String>,
    /// Answer with this status instead (down).
    status: Option<u16>,
    /// Answer after this long (slow).
    delay: std::time::Duration,
    requests: usize,
}

/// Makes a new access token (for a client id handed tokens that live seconds).
type Mint = dyn Fn() -> String + Send + Sync;

/// What the token endpoint answers for a device code or a refresh token.
#[derive(Clone)]
struct Grant {
    access: String,
    refresh: Option<String>,
    expires_in: i64,
}

impl Grant {
    fn answer(&self) -> Response {
        let mut body =
            json!({"access_token": self.access, "token_type": "Bearer", "expires_in": self.expires_in});
        if let Some(r) = &self.refresh {
            body["refresh_token"] = json!(r);
        }
        Response::json(&body)
    }
}

/// A running test issuer.
pub struct TestIssuer {
    server: TestServer,
    state: Arc<Mutex<State>>,
}

impl TestIssuer {
    /// Starts an issuer publishing `keys`.
    pub fn start(keys: &[&TestKey]) -> Self {
        let state = Arc::new(Mutex::new(State { jwks: jwks(keys), ..State::default() }));
        let base = Arc::new(Mutex::new(String::new()));
        let (st, b) = (state.clone(), base.clone());
        let server = TestServer::start(move |req| handle(req, &b.lock(), &st));
        *base.lock() = server.url();
        Self { server, state }
    }

    /// The issuer identifier (`http://127.0.0.1:PORT`).
    pub fn issuer(&self) -> String {
        self.server.url()
    }

    /// Publishes a new key set.
    pub fn publish(&self, keys: &[&TestKey]) {
        self.state.lock().jwks = jwks(keys);
    }

    /// Makes the JWKS endpoint answer with this status (None: normal).
    pub fn fail_jwks(&self, status: Option<u16>) {
        self.state.lock().jwks_status = status;
    }

    /// Black-holes the JWKS endpoint (true) or heals it: the connection is accepted and the
    /// request read, but no answer comes (for ten minutes).
    pub fn black_hole_jwks(&self, on: bool) {
        self.state.lock().jwks_black_hole = on;
    }

    /// The token the device flow hands to `client_id`.
    pub fn hand_out(&self, client_id: &str, token: &str) {
        let grant = Grant { access: token.to_owned(), refresh: None, expires_in: 300 };
        self.state.lock().tokens.insert(client_id.to_owned(), grant);
    }

    /// The device flow hands `client_id` a token `mint` makes at each grant (a short-lived token
    /// that is fresh whenever the client logs in), said to be valid `expires_in` seconds.
    pub fn hand_out_minted(
        &self,
        client_id: &str,
        expires_in: i64,
        mint: impl Fn() -> String + Send + Sync + 'static,
    ) {
        self.state.lock().minted.insert(client_id.to_owned(), (Arc::new(mint), expires_in));
    }

    /// The device flow hands `client_id` this access token (valid `expires_in` seconds, as the
    /// response says) and refresh token.
    pub fn hand_out_with_refresh(&self, client_id: &str, access: &str, refresh: &str, expires_in: i64) {
        let grant = Grant { access: access.to_owned(), refresh: Some(refresh.to_owned()), expires_in };
        self.state.lock().tokens.insert(client_id.to_owned(), grant);
    }

    /// The refresh grant with `refresh` answers `access` (and a rotated refresh token if given).
    pub fn on_refresh(&self, refresh: &str, access: &str, rotated: Option<&str>, expires_in: i64) {
        let grant = Grant { access: access.to_owned(), refresh: rotated.map(str::to_owned), expires_in };
        self.state.lock().refreshes.insert(refresh.to_owned(), grant);
    }

    /// The client-credentials grant gives `token` (valid `expires_in` seconds) to `id`
    /// authenticated with `secret`, by HTTP Basic or in the form.
    pub fn client_credentials(&self, id: &str, secret: &str, token: &str, expires_in: i64) {
        let grant = Grant { access: token.to_owned(), refresh: None, expires_in };
        self.state.lock().clients.insert(id.to_owned(), (secret.to_owned(), grant));
    }

    /// The client-credentials grant gives `token` to `id` authenticated by a `private_key_jwt`
    /// assertion (RFC 7523) signed RS256 by the key whose public half is `rsa_public_pkcs1_der`.
    pub fn client_key(&self, id: &str, rsa_public_pkcs1_der: Vec<u8>, token: &str, expires_in: i64) {
        let grant = Grant { access: token.to_owned(), refresh: None, expires_in };
        self.state.lock().key_clients.insert(id.to_owned(), (rsa_public_pkcs1_der, grant));
    }

    /// Revokes (expires) a refresh token: the grant answers invalid_grant.
    pub fn revoke(&self, refresh: &str) {
        self.state.lock().refreshes.remove(refresh);
    }

    /// The token endpoint answers `status` with `body` (not JSON, or empty), or normally (None).
    pub fn fail_token_endpoint(&self, failure: Option<(u16, &'static str)>) {
        self.state.lock().token_failure = failure;
    }

    /// The `resource` form values each POST to `path` carried, in order.
    pub fn resources_sent(&self, path: &str) -> Vec<Vec<String>> {
        self.state.lock().resources.iter().filter(|(p, _)| p == path).map(|(_, r)| r.clone()).collect()
    }

    /// The first `n` polls for `client_id` answer authorization_pending.
    pub fn pending_polls(&self, client_id: &str, n: u32) {
        self.state.lock().pending.insert(client_id.to_owned(), n);
    }

    /// Requests to the token endpoint so far.
    pub fn token_requests(&self) -> usize {
        self.server.count_path("/token")
    }

    /// Requests to the JWKS endpoint so far.
    pub fn jwks_requests(&self) -> usize {
        self.server.count_path("/jwks")
    }

    /// All requests so far.
    pub fn request_count(&self) -> u64 {
        self.server.request_count()
    }

    /// The introspection endpoint accepts this client (HTTP Basic or form credentials).
    pub fn introspection_client(&self, id: &str, secret: &str) {
        self.state.lock().introspection.client = Some((id.into(), secret.into()));
    }

    /// An opaque token the introspection endpoint calls active, with these claims.
    pub fn opaque_token(&self, token: &str, claims: Value) {
        self.state.lock().introspection.opaque.insert(token.into(), claims);
    }

    /// From now on the introspection endpoint calls `token` inactive.
    pub fn revoke_token(&self, token: &str) {
        self.state.lock().introspection.revoked.insert(token.into());
    }

    /// The introspection endpoint answers with this status (`Some(503)`: down), or normally.
    pub fn introspection_status(&self, status: Option<u16>) {
        self.state.lock().introspection.status = status;
    }

    /// The introspection endpoint answers after `delay`.
    pub fn introspection_delay(&self, delay: std::time::Duration) {
        self.state.lock().introspection.delay = delay;
    }

    /// Requests the introspection endpoint got.
    pub fn introspection_requests(&self) -> usize {
        self.state.lock().introspection.requests
    }

    /// Standard claims for `sub` from this issuer, valid for five minutes.
    pub fn claims(&self, sub: &str, aud: &str) -> Value {
        let t = now();
        json!({"iss": self.issuer(), "sub": sub, "aud": aud, "iat": t, "nbf": t - 5, "exp": t + 300,
               "scope": "openid db:read"})
    }
}

fn client_id(req: &Request) -> Option<String> {
    req.form("client_id")
}

fn handle(req: &Request, base: &str, state: &Mutex<State>) -> Response {
    if req.method == "POST" {
        let mut st = state.lock();
        st.resources.push((req.path.clone(), req.form_all("resource")));
        if let (Some((status, body)), "/token") = (st.token_failure, req.path.as_str()) {
            let mut r = Response::status(status).header("Content-Type", "text/html");
            r.body = body.as_bytes().to_vec();
            return r;
        }
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/.well-known/openid-configuration") => Response::json(&json!({
            "issuer": base,
            "jwks_uri": format!("{base}/jwks"),
            "token_endpoint": format!("{base}/token"),
            "device_authorization_endpoint": format!("{base}/authorize"),
            "introspection_endpoint": format!("{base}/introspect"),
            "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })),
        ("GET", "/jwks") => {
            let st = state.lock();
            match st.jwks_status {
                _ if st.jwks_black_hole => {
                    Response::json(&st.jwks).delayed(std::time::Duration::from_secs(600))
                }
                Some(code) => Response::status(code),
                None => Response::json(&st.jwks),
            }
        }
        ("POST", "/authorize") => Response::json(&json!({
            "device_code": client_id(req).unwrap_or_default(),
            "user_code": "GPRXY-TEST",
            "verification_uri": format!("{base}/device"),
            "expires_in": 60,
            "interval": 0,
        })),
        ("POST", "/token") if req.form("grant_type").as_deref() == Some("refresh_token") => {
            let refresh = req.form("refresh_token").unwrap_or_default();
            match state.lock().refreshes.get(&refresh) {
                Some(g) => g.answer(),
                None => Response::json(
                    &json!({"error": "invalid_grant", "error_description": "refresh token expired"}),
                )
                .with_status(400),
            }
        }
        ("POST", "/token") if req.form("grant_type").as_deref() == Some("client_credentials") => {
            if req.form("client_assertion_type").is_some() {
                return assertion_grant(req, base, &mut state.lock());
            }
            client_grant(req, &state.lock())
        }
        ("POST", "/token") => {
            let device = req.form("device_code").or_else(|| client_id(req)).unwrap_or_default();
            let mut st = state.lock();
            if let Some(n) = st.pending.get_mut(&device).filter(|n| **n > 0) {
                *n -= 1;
                return Response::json(&json!({"error": "authorization_pending"})).with_status(400);
            }
            if let Some((mint, expires_in)) = st.minted.get(&device) {
                return Grant { access: mint(), refresh: None, expires_in: *expires_in }.answer();
            }
            match st.tokens.get(&device) {
                Some(g) => g.answer(),
                None => Response::json(&json!({"error": "access_denied"})).with_status(400),
            }
        }
        ("POST", "/introspect") => introspect(req, &mut state.lock().introspection),
        _ => Response::status(404),
    }
}

/// The client-credentials grant: the client authenticated by HTTP Basic (RFC 6749 section
/// 2.3.1) or by `client_id` and `client_secret` in the form; anything else is `invalid_client`.
fn client_grant(req: &Request, st: &State) -> Response {
    use base64::Engine as _;
    let basic = req.headers.get("authorization").and_then(|h| h.strip_prefix("Basic ")).and_then(|b| {
        let pair = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
        let pair = String::from_utf8(pair).ok()?;
        let (id, secret) = pair.split_once(':')?;
        Some((id.to_owned(), secret.to_owned()))
    });
    let posted = req.form("client_id").zip(req.form("client_secret"));
    let Some((id, secret)) = basic.or(posted) else {
        return Response::json(&json!({"error": "invalid_client"})).with_status(401);
    };
    match st.clients.get(&id) {
        Some((s, grant)) if *s == secret => grant.answer(),
        _ => Response::json(
            &json!({"error": "invalid_client", "error_description": "client authentication failed"}),
        )
        .with_status(401),
    }
}

/// The client-credentials grant with a client assertion (RFC 7523 section 2.2, OpenID Connect
/// Core section 9): type jwt-bearer, RS256 signature by the client's key, `iss` and `sub` the
/// client id, `aud` the token endpoint, not expired, its `jti` not seen before.
fn assertion_grant(req: &Request, base: &str, st: &mut State) -> Response {
    use base64::Engine as _;
    let refuse = |why: &str| {
        Response::json(&json!({"error": "invalid_client", "error_description": why})).with_status(401)
    };
    if req.form("client_assertion_type").as_deref()
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return refuse("assertion type");
    }
    let (Some(id), Some(assertion)) = (req.form("client_id"), req.form("client_assertion")) else {
        return refuse("no client_id or assertion");
    };
    let Some((key, grant)) = st.key_clients.get(&id).cloned() else { return refuse("unknown client") };
    let Some((input, sig)) = assertion.rsplit_once('.') else { return refuse("not a JWT") };
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok();
    let Some(sig) = b64(sig) else { return refuse("signature encoding") };
    let public =
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256, key);
    if public.verify(input.as_bytes(), &sig).is_err() {
        return refuse("bad signature");
    }
    let mut parts = input.split('.');
    let header: Option<Value> = parts.next().and_then(b64).and_then(|h| serde_json::from_slice(&h).ok());
    let claims: Option<Value> = parts.next().and_then(b64).and_then(|c| serde_json::from_slice(&c).ok());
    let (Some(header), Some(c)) = (header, claims) else { return refuse("not JSON") };
    let now = gprxy_core::testkit::now();
    let token_endpoint = format!("{base}/token");
    if header["alg"] != "RS256"
        || c["iss"] != id.as_str()
        || c["sub"] != id.as_str()
        || c["aud"] != token_endpoint.as_str()
        || !c["exp"].as_i64().is_some_and(|e| e > now && e <= now + 300)
    {
        return refuse("claims");
    }
    let Some(jti) = c["jti"].as_str() else { return refuse("no jti") };
    if !st.jtis.insert(jti.to_owned()) {
        return refuse("replayed");
    }
    grant.answer()
}

/// RFC 7662: an opaque token registered as active answers with its claims, a JWT with its own
/// payload (as an issuer that signed it would), a revoked or unknown one `active: false`.
fn introspect(req: &Request, st: &mut Introspection) -> Response {
    use base64::Engine as _;
    st.requests += 1;
    if let Some(code) = st.status {
        return Response::status(code).delayed(st.delay);
    }
    let Some((id, secret)) = st.client.clone() else { return Response::status(401) };
    let basic =
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")));
    let authed = req.headers.get("authorization") == Some(&basic)
        || (req.form("client_id").as_deref() == Some(id.as_str())
            && req.form("client_secret").as_deref() == Some(secret.as_str()));
    if !authed {
        return Response::json(&json!({"error": "invalid_client"})).with_status(401).delayed(st.delay);
    }
    let token = req.form("token").unwrap_or_default();
    let claims = if st.revoked.contains(&token) {
        None
    } else if let Some(c) = st.opaque.get(&token) {
        Some(c.clone())
    } else {
        jwt_payload(&token)
    };
    let body = match claims {
        Some(Value::Object(mut c)) => {
            c.insert("active".into(), json!(true));
            Value::Object(c)
        }
        _ => json!({"active": false}),
    };
    Response::json(&body).delayed(st.delay)
}

fn jwt_payload(token: &str) -> Option<Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&bytes).ok()
}
