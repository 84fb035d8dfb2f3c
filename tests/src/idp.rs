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
    tokens: HashMap<String, String>,
    jwks_status: Option<u16>,
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

    /// The token the device flow hands to `client_id`.
    pub fn hand_out(&self, client_id: &str, token: &str) {
        self.state.lock().tokens.insert(client_id.to_owned(), token.to_owned());
    }

    /// Requests to the JWKS endpoint so far.
    pub fn jwks_requests(&self) -> usize {
        self.server.count_path("/jwks")
    }

    /// All requests so far.
    pub fn request_count(&self) -> u64 {
        self.server.request_count()
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
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/.well-known/openid-configuration") => Response::json(&json!({
            "issuer": base,
            "jwks_uri": format!("{base}/jwks"),
            "token_endpoint": format!("{base}/token"),
            "device_authorization_endpoint": format!("{base}/authorize"),
            "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })),
        ("GET", "/jwks") => {
            let st = state.lock();
            match st.jwks_status {
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
        ("POST", "/token") => {
            let device = req.form("device_code").or_else(|| client_id(req)).unwrap_or_default();
            match state.lock().tokens.get(&device) {
                Some(t) => {
                    Response::json(&json!({"access_token": t, "token_type": "Bearer", "expires_in": 300}))
                }
                None => Response::json(&json!({"error": "access_denied"})).with_status(400),
            }
        }
        _ => Response::status(404),
    }
}
