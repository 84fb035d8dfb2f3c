//! The JWKS cache against a real HTTP server on loopback, with a hand-driven clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gprxy_core::testkit::{jwks, test_ca, Response, TestKey, TestServer};
use gprxy_core::{
    CacheSettings, Clock, HttpSettings, JwksCache, JwksSource, KeyError, Policy, Quoted, UreqFetcher,
    ValidationError, Validator,
};
use parking_lot::Mutex;
use serde_json::{json, Value};

#[derive(Clone)]
struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    fn new() -> Self {
        Self(Arc::new(AtomicU64::new(gprxy_core::SystemClock.now_ms())))
    }
    fn advance(&self, secs: u64) {
        self.0.fetch_add(secs * 1000, Ordering::SeqCst);
    }
    fn now_s(&self) -> i64 {
        (self.0.load(Ordering::SeqCst) / 1000) as i64
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// An issuer on loopback: discovery at the issuer URL, keys at /jwks, both switchable.
struct Issuer {
    server: TestServer,
    jwks: Arc<Mutex<Value>>,
    jwks_response: Arc<Mutex<Option<Response>>>,
}

impl Issuer {
    fn start(keys: &[&TestKey]) -> Self {
        let jwks_doc = Arc::new(Mutex::new(jwks(keys)));
        let override_resp: Arc<Mutex<Option<Response>>> = Arc::new(Mutex::new(None));
        let base = Arc::new(Mutex::new(String::new()));
        let (j, o, b) = (jwks_doc.clone(), override_resp.clone(), base.clone());
        let server = TestServer::start(move |req| {
            let base = b.lock().clone();
            match req.path.as_str() {
                "/.well-known/openid-configuration" => {
                    Response::json(&json!({"issuer": base, "jwks_uri": format!("{base}/jwks")}))
                }
                "/jwks" => o.lock().clone().unwrap_or_else(|| Response::json(&j.lock())),
                _ => Response::status(404),
            }
        });
        *base.lock() = server.url();
        Self { server, jwks: jwks_doc, jwks_response: override_resp }
    }
    fn issuer(&self) -> String {
        self.server.url()
    }
    fn publish(&self, keys: &[&TestKey]) {
        *self.jwks.lock() = jwks(keys);
    }
    fn respond(&self, r: Option<Response>) {
        *self.jwks_response.lock() = r;
    }
    fn jwks_fetches(&self) -> usize {
        self.server.count_path("/jwks")
    }
}

fn http() -> HttpSettings {
    HttpSettings { insecure_allow_http_loopback: true, ..Default::default() }
}

fn cache_for(issuer: &str, clock: &ManualClock, settings: CacheSettings) -> Arc<JwksCache> {
    let fetcher = Arc::new(UreqFetcher::new(http()).unwrap());
    Arc::new(
        JwksCache::new(
            JwksSource::Discovery { issuer: issuer.to_owned() },
            fetcher,
            Arc::new(clock.clone()),
            settings,
            true,
        )
        .unwrap(),
    )
}

fn validator(issuer: &str) -> Validator {
    Validator::new(Policy::builder(issuer).audiences(["db"]).build().unwrap())
}

fn token(key: &TestKey, issuer: &str, clock: &ManualClock) -> String {
    let now = clock.now_s();
    key.token(json!({"typ": "at+jwt"}), &json!({"iss": issuer, "aud": "db", "sub": "u", "exp": now + 3600}))
}

#[test]
fn rotation_new_kid_found_after_one_refetch_and_removed_key_refused() {
    let (k1, k2) = (TestKey::rsa("k1"), TestKey::p256("k2"));
    let idp = Issuer::start(&[&k1]);
    let clock = ManualClock::new();
    let cache = cache_for(&idp.issuer(), &clock, CacheSettings::default());
    let v = validator(&idp.issuer());
    assert!(v.validate(&token(&k1, &idp.issuer(), &clock), &*cache, clock.now_s()).is_ok());
    assert_eq!(idp.jwks_fetches(), 1);

    // The issuer rotates in k2. Within the cooldown an unknown kid does not refetch...
    idp.publish(&[&k1, &k2]);
    let t2 = token(&k2, &idp.issuer(), &clock);
    assert_eq!(
        v.validate(&t2, &*cache, clock.now_s()).unwrap_err(),
        ValidationError::KidUnknown(Quoted::new("k2"))
    );
    assert_eq!(idp.jwks_fetches(), 1);
    // ...after it, exactly one refetch finds the new key.
    clock.advance(31);
    assert!(v.validate(&t2, &*cache, clock.now_s()).is_ok());
    assert_eq!(idp.jwks_fetches(), 2);

    // k1 is removed; once the keys are refreshed, k1 tokens are refused.
    idp.publish(&[&k2]);
    let t1 = token(&k1, &idp.issuer(), &clock);
    clock.advance(3601);
    assert_eq!(
        v.validate(&t1, &*cache, clock.now_s()).unwrap_err(),
        ValidationError::KidUnknown(Quoted::new("k1"))
    );
    assert!(v.validate(&token(&k2, &idp.issuer(), &clock), &*cache, clock.now_s()).is_ok());
    assert_eq!(idp.jwks_fetches(), 3);
}

#[test]
fn max_age_is_honoured_within_bounds() {
    let k = TestKey::ed25519("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let settings = || CacheSettings {
        min_ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(7200),
        default_ttl: Duration::from_secs(600),
        ..Default::default()
    };
    for (header, want_secs) in [
        (Some("max-age=300"), 300),
        (Some("max-age=5"), 60),
        (Some("public, max-age=999999"), 7200),
        (Some("no-store"), 60),
        (None, 600),
    ] {
        let mut r = Response::json(&jwks(&[&k]));
        if let Some(h) = header {
            r = r.header("Cache-Control", h);
        }
        idp.respond(Some(r));
        let cache = cache_for(&idp.issuer(), &clock, settings());
        cache.keys().unwrap();
        let s = cache.export().unwrap();
        assert_eq!(s.expires_at_ms - s.fetched_at_ms, want_secs * 1000, "{header:?}");
    }
}

#[test]
fn fresh_keys_never_fetch_and_end_at_expiry() {
    let k = TestKey::ed25519("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let cache = cache_for(
        &idp.issuer(),
        &clock,
        CacheSettings { default_ttl: Duration::from_secs(600), ..Default::default() },
    );
    assert!(cache.fresh_keys().is_none(), "nothing fetched yet");
    assert_eq!(idp.jwks_fetches(), 0);
    cache.keys().unwrap();
    assert!(cache.fresh_keys().is_some());
    clock.advance(599);
    assert!(cache.fresh_keys().is_some());
    clock.advance(1);
    assert!(cache.fresh_keys().is_none(), "expired keys are not fresh");
    assert_eq!(idp.jwks_fetches(), 1, "fresh_keys never fetches");
}

#[test]
fn refresh_ahead_at_80_percent() {
    let k = TestKey::rsa("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let cache = cache_for(&idp.issuer(), &clock, CacheSettings::default());
    assert!(cache.refresh_if_due(), "no keys yet: due");
    assert_eq!(idp.jwks_fetches(), 1);
    clock.advance(2879); // 79.97 % of 3600 s
    assert!(!cache.refresh_if_due());
    clock.advance(2);
    assert!(cache.refresh_if_due());
    assert_eq!(idp.jwks_fetches(), 2);
}

#[test]
fn storm_of_unknown_kids_costs_at_most_one_fetch() {
    let k = TestKey::rsa("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let cache = cache_for(&idp.issuer(), &clock, CacheSettings::default());
    let v = Arc::new(validator(&idp.issuer()));
    cache.keys().unwrap();
    clock.advance(31);
    let before = idp.jwks_fetches();
    let attacker = Arc::new(TestKey::rsa("x"));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let (cache, v, attacker, clock, iss) =
                (cache.clone(), v.clone(), attacker.clone(), clock.clone(), idp.issuer());
            std::thread::spawn(move || {
                for i in 0..125 {
                    let kid = format!("random-{t}-{i}");
                    let tok = attacker.token(
                        json!({"typ": "at+jwt", "kid": kid}),
                        &json!({"iss": iss, "aud": "db", "sub": "u", "exp": clock.now_s() + 60}),
                    );
                    let e = v.validate(&tok, &*cache, clock.now_s()).unwrap_err();
                    assert_eq!(e.code(), "kid_unknown");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        idp.jwks_fetches() - before <= 1,
        "1000 unknown kids caused {} fetches",
        idp.jwks_fetches() - before
    );
    // The next cooldown window allows one more fetch, however many kids arrive.
    clock.advance(31);
    let fetched = idp.jwks_fetches();
    for i in 0..50 {
        let tok = attacker.token(
            json!({"typ": "at+jwt", "kid": format!("again-{i}")}),
            &json!({"iss": idp.issuer(), "aud": "db", "sub": "u", "exp": clock.now_s() + 60}),
        );
        assert_eq!(v.validate(&tok, &*cache, clock.now_s()).unwrap_err().code(), "kid_unknown");
    }
    assert_eq!(idp.jwks_fetches(), fetched + 1);
}

#[test]
fn concurrent_first_fetch_is_single_flight() {
    let k = TestKey::rsa("k");
    let idp = Issuer::start(&[&k]);
    idp.respond(Some(Response::json(&jwks(&[&k])).delayed(Duration::from_millis(300))));
    let clock = ManualClock::new();
    let cache = cache_for(&idp.issuer(), &clock, CacheSettings::default());
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || cache.keys().map(|k| k.len()))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), 1);
    }
    assert_eq!(idp.jwks_fetches(), 1);
}

#[test]
fn outage_served_from_last_good_keys_until_max_staleness() {
    let k = TestKey::rsa("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let settings = CacheSettings { max_staleness: Duration::from_secs(1800), ..Default::default() };
    let cache = cache_for(&idp.issuer(), &clock, settings);
    let v = validator(&idp.issuer());
    let check = |clock: &ManualClock| v.validate(&token(&k, &idp.issuer(), clock), &*cache, clock.now_s());
    check(&clock).unwrap();
    idp.respond(Some(Response::status(503)));

    clock.advance(3600); // expired: one attempt fails, stale keys serve
    check(&clock).unwrap();
    assert_eq!(idp.jwks_fetches(), 2);
    check(&clock).unwrap(); // within backoff: no new attempt
    assert_eq!(idp.jwks_fetches(), 2);
    clock.advance(2); // backoff (1 s) passed: one more attempt
    check(&clock).unwrap();
    assert_eq!(idp.jwks_fetches(), 3);

    clock.advance(1800); // past max staleness: fail closed
    match check(&clock).unwrap_err() {
        ValidationError::Keys(KeyError::Unavailable(msg)) => {
            assert!(msg.contains("maximum staleness"), "{msg}")
        }
        e => panic!("{e:?}"),
    }

    // The issuer comes back: the next attempt (after backoff) recovers.
    idp.respond(None);
    clock.advance(120);
    check(&clock).unwrap();
}

fn fetch_err(settings: HttpSettings, url: &str) -> KeyError {
    use gprxy_core::Fetcher;
    UreqFetcher::new(settings).unwrap().get(url).unwrap_err()
}

#[test]
fn oversized_body_refused() {
    let server = TestServer::start(|_| Response::json(&json!({"keys": [], "pad": "x".repeat(70 * 1024)})));
    let url = format!("{}/jwks", server.url());
    assert_eq!(fetch_err(http(), &url), KeyError::TooLarge { url: Quoted::new(&url), limit: 65536 });
}

#[test]
fn slow_server_hits_the_timeout() {
    let server = TestServer::start(|_| Response::json(&json!({})).delayed(Duration::from_secs(3)));
    let url = format!("{}/jwks", server.url());
    let settings = HttpSettings { read_timeout: Duration::from_millis(300), ..http() };
    let started = std::time::Instant::now();
    assert_eq!(fetch_err(settings, &url), KeyError::Timeout(Quoted::new(&url)));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn redirects_are_not_followed() {
    let target = TestServer::start(|_| Response::json(&json!({"keys": []})));
    let loc = format!("{}/jwks", target.url());
    let server = TestServer::start(move |_| Response::status(302).header("Location", &loc));
    let url = format!("{}/jwks", server.url());
    assert_eq!(fetch_err(http(), &url), KeyError::Redirect(Quoted::new(&url)));
    assert_eq!(target.request_count(), 0);
}

#[test]
fn plain_http_refused_unless_allowed_for_loopback() {
    let server = TestServer::start(|_| Response::json(&json!({"keys": []})));
    let url = format!("{}/jwks", server.url());
    assert_eq!(fetch_err(HttpSettings::default(), &url), KeyError::InsecureUrl(Quoted::new(&url)));
    assert_eq!(server.request_count(), 0);
    let err = JwksCache::new(
        JwksSource::Discovery { issuer: server.url() },
        Arc::new(UreqFetcher::new(HttpSettings::default()).unwrap()),
        Arc::new(gprxy_core::SystemClock),
        CacheSettings::default(),
        false,
    )
    .err()
    .unwrap();
    assert_eq!(err.setting, gprxy_core::Setting::Issuer);
}

#[test]
fn private_ca_accepted_only_when_configured() {
    let (ca, cert, key) = test_ca();
    let server = TestServer::start_tls(&cert, &key, |_| Response::json(&json!({"keys": []})));
    let url = format!("{}/jwks", server.url());
    match fetch_err(HttpSettings::default(), &url) {
        KeyError::Transport { reason, .. } => {
            assert!(reason.to_lowercase().contains("certificate"), "{reason}")
        }
        e => panic!("{e:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca).unwrap();
    let settings = HttpSettings { ca_file: Some(ca_path), ..Default::default() };
    use gprxy_core::Fetcher;
    let body = UreqFetcher::new(settings).unwrap().get(&url).unwrap().body;
    assert_eq!(body, br#"{"keys":[]}"#);
    // A CA file without certificates is a configuration error.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "nothing").unwrap();
    let e = UreqFetcher::new(HttpSettings { ca_file: Some(empty), ..Default::default() }).err().unwrap();
    assert_eq!(e.setting, gprxy_core::Setting::CaFile);
}

#[test]
fn discovery_must_name_the_same_issuer() {
    let server = TestServer::start(|_| {
        Response::json(&json!({"issuer": "https://evil.example", "jwks_uri": "https://evil.example/jwks"}))
    });
    let clock = ManualClock::new();
    let cache = cache_for(&server.url(), &clock, CacheSettings::default());
    assert_eq!(
        cache.keys().unwrap_err(),
        KeyError::IssuerMismatch {
            got: Quoted::new("https://evil.example"),
            expected: Quoted::new(&server.url())
        }
    );
}

#[test]
fn discovery_falls_back_to_rfc8414() {
    let k = TestKey::rsa("k");
    let doc = jwks(&[&k]);
    let base = Arc::new(Mutex::new(String::new()));
    let b = base.clone();
    let server = TestServer::start(move |req| {
        let base = b.lock().clone();
        match req.path.as_str() {
            "/.well-known/oauth-authorization-server/tenant" => Response::json(
                &json!({"issuer": format!("{base}/tenant"), "jwks_uri": format!("{base}/keys")}),
            ),
            "/keys" => Response::json(&doc),
            _ => Response::status(404),
        }
    });
    *base.lock() = server.url();
    let clock = ManualClock::new();
    let cache = cache_for(&format!("{}/tenant", server.url()), &clock, CacheSettings::default());
    assert_eq!(cache.keys().unwrap().len(), 1);
}

#[test]
fn embedded_jku_is_never_fetched() {
    let (k, attacker) = (TestKey::rsa("k"), TestKey::rsa("evil"));
    let idp = Issuer::start(&[&k]);
    let evil = TestServer::start(|_| Response::status(200));
    let clock = ManualClock::new();
    let cache = cache_for(&idp.issuer(), &clock, CacheSettings::default());
    let jku = format!("{}/jwks", evil.url());
    let tok = attacker.token(
        json!({"typ": "at+jwt", "jku": jku, "x5u": jku}),
        &json!({"iss": idp.issuer(), "aud": "db", "sub": "u", "exp": clock.now_s() + 60}),
    );
    let e = validator(&idp.issuer()).validate(&tok, &*cache, clock.now_s()).unwrap_err();
    assert_eq!(e, ValidationError::KidUnknown(Quoted::new("evil")));
    assert_eq!(evil.request_count(), 0);
}

#[test]
fn snapshot_export_import_serves_without_fetching() {
    let k = TestKey::p384("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let a = cache_for(&idp.issuer(), &clock, CacheSettings::default());
    a.keys().unwrap();
    let snap = a.export().unwrap();
    let bytes = serde_json::to_vec(&snap).unwrap();

    let b = cache_for(&idp.issuer(), &clock, CacheSettings::default());
    assert!(b.import(&serde_json::from_slice(&bytes).unwrap()).unwrap());
    assert!(!b.import(&snap).unwrap(), "same snapshot again is not newer");
    let before = idp.jwks_fetches();
    assert!(validator(&idp.issuer()).validate(&token(&k, &idp.issuer(), &clock), &*b, clock.now_s()).is_ok());
    assert_eq!(idp.jwks_fetches(), before);
    assert_eq!(b.fetch_count(), 0);
}

fn shared_cache(source: JwksSource, clock: &ManualClock, share: &Arc<gprxy_core::MemoryShare>) -> JwksCache {
    let fetcher = Arc::new(UreqFetcher::new(http()).unwrap());
    JwksCache::new(source, fetcher, Arc::new(clock.clone()), CacheSettings::default(), true)
        .unwrap()
        .with_share(share.clone(), Duration::from_millis(400))
}

fn discovery(idp: &Issuer) -> JwksSource {
    JwksSource::Discovery { issuer: idp.issuer() }
}

#[test]
fn caches_sharing_fetch_state_keep_one_cooldown_between_them() {
    let k = TestKey::rsa("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let share = Arc::new(gprxy_core::MemoryShare::default());
    let v = validator(&idp.issuer());
    let attacker = TestKey::rsa("nope");
    let nope = |clock: &ManualClock| token(&attacker, &idp.issuer(), clock);
    let first = shared_cache(discovery(&idp), &clock, &share);
    first.keys().unwrap();
    assert_eq!(idp.jwks_fetches(), 1);
    // Fifty "backends", each a new cache: they take the published keys and, within the cooldown
    // of the first fetch, refuse the unknown kid without fetching.
    for _ in 0..50 {
        let c = shared_cache(discovery(&idp), &clock, &share);
        assert_eq!(v.validate(&nope(&clock), &c, clock.now_s()).unwrap_err().code(), "kid_unknown");
        assert_eq!(c.fetch_count(), 0);
    }
    assert_eq!(idp.jwks_fetches(), 1);
    clock.advance(31);
    for _ in 0..50 {
        let c = shared_cache(discovery(&idp), &clock, &share);
        assert_eq!(v.validate(&nope(&clock), &c, clock.now_s()).unwrap_err().code(), "kid_unknown");
    }
    assert_eq!(idp.jwks_fetches(), 2, "one refetch per cooldown for all of them");
}

#[test]
fn caches_sharing_fetch_state_share_the_backoff() {
    let k = TestKey::rsa("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let share = Arc::new(gprxy_core::MemoryShare::default());
    shared_cache(discovery(&idp), &clock, &share).keys().unwrap();
    idp.respond(Some(Response::status(503)));
    clock.advance(3600);
    // The first to find the keys expired tries once; the failure backs off every sharer.
    assert_eq!(shared_cache(discovery(&idp), &clock, &share).keys().unwrap().len(), 1);
    assert_eq!(idp.jwks_fetches(), 2);
    for _ in 0..20 {
        assert_eq!(shared_cache(discovery(&idp), &clock, &share).keys().unwrap().len(), 1);
    }
    assert_eq!(idp.jwks_fetches(), 2);
    clock.advance(2);
    shared_cache(discovery(&idp), &clock, &share).keys().unwrap();
    assert_eq!(idp.jwks_fetches(), 3, "after the backoff, one more attempt");
}

#[test]
fn with_a_background_refresher_stale_keys_serve_while_the_issuer_fails() {
    let k = TestKey::rsa("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let share = Arc::new(gprxy_core::MemoryShare::with_background_refresher());
    let worker = shared_cache(discovery(&idp), &clock, &share);
    assert!(worker.refresh_if_due());
    idp.respond(Some(Response::status(503)));
    clock.advance(3000);
    assert!(!worker.refresh_if_due(), "the refresh fails");
    assert_eq!(idp.jwks_fetches(), 2);
    clock.advance(700); // expired, and past the backoff
    for _ in 0..20 {
        assert_eq!(shared_cache(discovery(&idp), &clock, &share).keys().unwrap().len(), 1);
    }
    assert_eq!(idp.jwks_fetches(), 2, "logins leave the retries to the refresher");
    assert!(!worker.refresh_if_due());
    assert_eq!(idp.jwks_fetches(), 3);
    // Past the staleness allowance logins try themselves again (and fail closed).
    clock.advance(3601);
    let e = shared_cache(discovery(&idp), &clock, &share).keys().unwrap_err();
    assert!(matches!(&e, KeyError::Unavailable(m) if m.contains("maximum staleness")), "{e:?}");
    assert_eq!(idp.jwks_fetches(), 4);
}

#[test]
fn an_attempt_running_elsewhere_is_not_repeated() {
    let k = TestKey::rsa("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let share = Arc::new(gprxy_core::MemoryShare::default());
    let first = shared_cache(discovery(&idp), &clock, &share);
    first.keys().unwrap();
    let snap = first.export().unwrap();
    clock.advance(3600);
    // Another process is fetching (its attempt runs ten more seconds).
    let busy_elsewhere = |clock: &ManualClock| {
        let now = clock.now_ms();
        gprxy_core::KeyShare::update_state(&*share, &discovery(&idp).id(), &mut |s| {
            s.busy_until_ms = now + 10_000
        });
    };
    busy_elsewhere(&clock);
    // With stale keys at hand: served at once, no second attempt.
    let started = std::time::Instant::now();
    assert_eq!(shared_cache(discovery(&idp), &clock, &share).keys().unwrap().len(), 1);
    assert!(started.elapsed() < Duration::from_millis(200));
    // With nothing usable: wait (bounded) for what the other attempt publishes.
    clock.advance(3600);
    busy_elsewhere(&clock);
    let late = shared_cache(discovery(&idp), &clock, &share);
    let publisher = {
        let share = share.clone();
        let fresh = gprxy_core::Snapshot {
            fetched_at_ms: clock.now_ms(),
            expires_at_ms: clock.now_ms() + 60_000,
            ..snap
        };
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            gprxy_core::KeyShare::publish(&*share, &fresh);
        })
    };
    assert_eq!(late.keys().unwrap().len(), 1);
    publisher.join().unwrap();
    assert_eq!(idp.jwks_fetches(), 1, "nobody fetched a second time");
}

#[test]
fn a_key_set_of_another_source_is_never_taken() {
    let (k1, k2) = (TestKey::rsa("k1"), TestKey::rsa("k2"));
    let (a, b) = (Issuer::start(&[&k1]), Issuer::start(&[&k2]));
    let clock = ManualClock::new();
    let share = Arc::new(gprxy_core::MemoryShare::default());
    let old = shared_cache(discovery(&a), &clock, &share);
    old.keys().unwrap();
    // The configuration now names b's key set for the same issuer.
    let moved = JwksSource::Explicit { jwks_uri: format!("{}/jwks", b.issuer()) };
    let new = shared_cache(moved, &clock, &share);
    assert!(!new.import(&old.export().unwrap()).unwrap(), "kept across a reload");
    let v = validator(&a.issuer());
    let e = v.validate(&token(&k1, &a.issuer(), &clock), &new, clock.now_s()).unwrap_err();
    assert_eq!(e, ValidationError::KidUnknown(Quoted::new("k1")));
    assert!(v.validate(&token(&k2, &a.issuer(), &clock), &new, clock.now_s()).is_ok());
    assert_eq!((a.jwks_fetches(), b.jwks_fetches()), (1, 1));
}

#[test]
fn caller_thread_resolver_fetches_ip_literals_and_localhost() {
    use gprxy_core::Fetcher;
    let server = TestServer::start(|_| Response::json(&json!({"keys": []})));
    let fetcher = UreqFetcher::new(HttpSettings { resolve_in_caller_thread: true, ..http() }).unwrap();
    assert_eq!(fetcher.get(&format!("{}/jwks", server.url())).unwrap().body, br#"{"keys":[]}"#);
    let by_name = format!("http://localhost:{}/jwks", server.addr().port());
    assert_eq!(fetcher.get(&by_name).unwrap().body, br#"{"keys":[]}"#);
}

/// #27 item 4: a token that names another issuer (and a `kid` the cache does not know) is
/// refused as `iss_mismatch` before any key lookup: it costs the issuer no request, however many
/// come, and a good token still validates meanwhile.
#[test]
fn a_token_of_another_issuer_costs_no_key_request() {
    let k1 = TestKey::rsa("k1");
    let idp = Issuer::start(&[&k1]);
    let clock = ManualClock::new();
    let cache = cache_for(&idp.issuer(), &clock, CacheSettings::default());
    let v = validator(&idp.issuer());
    let stranger = TestKey::rsa("stranger-kid");
    for i in 0..50 {
        let forged = token(&stranger, &format!("https://elsewhere.example/{i}"), &clock);
        let e = v.validate(&forged, &*cache, clock.now_s()).unwrap_err();
        assert_eq!(e.code(), "iss_mismatch", "{e}");
    }
    assert_eq!(idp.jwks_fetches(), 0, "a token of another issuer fetched keys");
    assert!(v.validate(&token(&k1, &idp.issuer(), &clock), &*cache, clock.now_s()).is_ok());
    assert_eq!(idp.jwks_fetches(), 1);
}

/// #27 item 6: keys fetched under one CA file are not served under another, nor after the file's
/// content changed (a reload that removed or replaced a CA): the cache fetches anew; under the
/// same file and content they are shared.
#[test]
fn keys_fetched_under_another_ca_file_are_not_shared() {
    let k = TestKey::rsa("k");
    let idp = Issuer::start(&[&k]);
    let clock = ManualClock::new();
    let share = Arc::new(gprxy_core::MemoryShare::default());
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, test_ca().0).unwrap();
    let under = |ca: Option<&std::path::Path>| {
        let settings = HttpSettings { ca_file: ca.map(std::path::Path::to_path_buf), ..http() };
        let fetcher = Arc::new(UreqFetcher::new(settings).unwrap());
        JwksCache::new(discovery(&idp), fetcher, Arc::new(clock.clone()), CacheSettings::default(), true)
            .unwrap()
            .with_share(share.clone(), Duration::from_millis(400))
    };
    under(Some(&ca)).keys().unwrap();
    assert_eq!(idp.jwks_fetches(), 1);
    // Same file, same content: shared.
    let same = under(Some(&ca));
    same.keys().unwrap();
    assert_eq!((idp.jwks_fetches(), same.fetch_count()), (1, 0));
    // No CA file (the system's roots): not the same trust, fetched anew.
    let system = under(None);
    system.keys().unwrap();
    assert_eq!((idp.jwks_fetches(), system.fetch_count()), (2, 1));
    // The file replaced by another CA: fetched anew.
    std::fs::write(&ca, test_ca().0).unwrap();
    let replaced = under(Some(&ca));
    replaced.keys().unwrap();
    assert_eq!((idp.jwks_fetches(), replaced.fetch_count()), (3, 1));
}
