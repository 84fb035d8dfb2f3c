//! `make bench` (connect): what a new PostgreSQL 18 connection costs per login method, on one server
//! with a warm shared key cache. Every method makes a few connections per round, in an order
//! shuffled anew each round (so the machine's drift, and the backends of the method before still
//! exiting, hit every method alike); medians over all connections:
//!
//! - `trust` and `scram_sha256`: PostgreSQL's own methods;
//! - `floor`: OAUTHBEARER through PostgreSQL's test validator (src/test/modules/oauth_validator,
//!   built by scripts/install-extension.sh), which accepts any token: no validator can be cheaper;
//! - `gprxy_rs256`, `gprxy_es256`, `gprxy_eddsa`: OAUTHBEARER through gprxy_validator.
//!
//! Also the validator's own time per login (median `elapsed_ms` of its audit lines) against the bare
//! signature check of the same token measured in this run, the machine's CPU per connection
//! (sampled at the kernel's tick: noisy to about 0.2 ms here) and a backend's minor page faults up to
//! ready-for-query.
//!
//! Goals (exit status 1 when one is missed): gprxy within 0.20 ms of the floor for RS256 and EdDSA
//! and 0.25 ms for ES256; the validator's own time at most the signature check + 0.1 ms; gprxy at
//! most 0.6 of SCRAM-SHA-256.
//!
//! Then, on a second server with an issuers file: a login whose opaque token's introspection
//! answer is in shared memory (`introspect_cached`) against a JWT login of the same file
//! (`jwt_rs256`); goal: at most 1.10 times the JWT login. `BENCH_ROUNDS` (default 200) and
//! `BENCH_CONNECTS` (per method and round, default 3) set the size; `BENCH_ONLY=gprxy_rs256`
//! measures one method (no goals checked), `BENCH_ONLY=introspection` the second server only;
//! `BENCH_RESIDENT_CODE=off` runs the first server with `gprxy.resident_code = off`.

use std::net::SocketAddr;
use std::time::Instant;

use gprxy_core::testkit::TestKey;
use gprxy_tests::idp::TestIssuer;
use gprxy_tests::pgwire::{connect, Auth, PgConn};
use gprxy_tests::{validator_cluster, PgVersion};
use serde_json::json;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "median of nothing");
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Method {
    name: &'static str,
    user: &'static str,
    auth: Auth<'static>,
    /// Wall time per connection, one value per round.
    wall_ms: Vec<f64>,
    /// The machine's busy CPU seconds over all rounds (summed: /proc/stat counts in 10 ms ticks).
    cpu_s: f64,
}

fn open(addr: SocketAddr, m: &Method) -> PgConn {
    connect(addr, m.user, "postgres", m.auth).unwrap_or_else(|e| panic!("{} login: {e}", m.name))
}

fn login(addr: SocketAddr, m: &Method) {
    open(addr, m).close();
}

/// Every method's login works (and the caches it uses are warm).
fn warm_up(addr: SocketAddr, methods: &[Method]) {
    for m in methods {
        for _ in 0..3 {
            login(addr, m);
        }
    }
}

/// Rounds in which every method makes `per_round` connections, in an order shuffled anew each
/// round: a fixed order would have each method always follow the same one, whose backends are
/// still exiting (about 1 ms each) while it logs in. Each connection's wall time is recorded,
/// and the machine's busy CPU per method.
fn measure(addr: SocketAddr, methods: &mut [Method], rounds: usize, per_round: usize) {
    let mut order: Vec<usize> = (0..methods.len()).collect();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..rounds {
        // Fisher-Yates with xorshift64: reproducible, and order is all that needs varying.
        for i in (1..order.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        for &i in &order {
            let m = &mut methods[i];
            let cpu = gprxy_tests::machine::busy_seconds();
            for _ in 0..per_round {
                let t = Instant::now();
                login(addr, m);
                m.wall_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            m.cpu_s += gprxy_tests::machine::busy_seconds() - cpu;
        }
    }
}

/// Median minor page faults of a backend from its start to ready-for-query after `m`'s login
/// (its /proc/<pid>/stat, read before the connection closes).
fn faults_per_backend(addr: SocketAddr, m: &Method, n: usize) -> u64 {
    let mut counts: Vec<u64> = (0..n)
        .map(|_| {
            let conn = open(addr, m);
            let faults = gprxy_tests::machine::minor_faults(conn.key.expect("BackendKeyData").0);
            conn.close();
            faults
        })
        .collect();
    counts.sort_unstable();
    counts[n / 2]
}

/// Bare signature check of `token` with `key` (no parsing of claims, no policy), in ms.
fn bare_verify_ms(key: &TestKey, token: &str) -> f64 {
    let jwk = key.jwk();
    let alg: jsonwebtoken::Algorithm = key.default_alg().parse().expect("algorithm");
    let decoding =
        jsonwebtoken::DecodingKey::from_jwk(&serde_json::from_value(jwk).expect("jwk")).expect("key");
    let (input, sig) = token.rsplit_once('.').expect("compact JWS");
    let n = 2000;
    let mut samples = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..n {
            assert!(jsonwebtoken::crypto::verify(sig, input.as_bytes(), &decoding, alg).expect("verify"));
        }
        samples.push(t.elapsed().as_secs_f64() * 1000.0 / n as f64);
    }
    median(samples)
}

/// Median `elapsed_ms` of the validator's audit lines whose key id is `kid`, from `log`.
fn audit_elapsed_ms(log: &str, kid: &str) -> f64 {
    let needle = format!(" kid=\"{kid}\" ");
    let values: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("gprxy: oauth login authorized") && l.contains(&needle))
        .filter_map(|l| l.split(" elapsed_ms=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(!values.is_empty(), "no audit line for kid {kid} in the server log");
    median(values)
}

fn main() {
    let floor_lib = PgVersion::V18.bin_dir().join("../lib/postgresql/oauth_test_validator.so");
    assert!(
        floor_lib.exists(),
        "PostgreSQL's test validator is not installed at {}: run `make install-extension`",
        floor_lib.display()
    );
    let rounds = env_usize("BENCH_ROUNDS", 200);
    let per_round = env_usize("BENCH_CONNECTS", 3);
    if std::env::var("BENCH_ONLY").as_deref() == Ok("introspection") {
        let missed = introspection(rounds, per_round);
        std::process::exit(i32::from(!missed.is_empty()));
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("provision") {
        let missed = provisioning(rounds, per_round);
        std::process::exit(i32::from(!missed.is_empty()));
    }

    let rsa = TestKey::rsa("bench-rs256");
    let p256 = TestKey::p256("bench-es256");
    let ed = TestKey::ed25519("bench-eddsa");
    let idp = TestIssuer::start(&[&rsa, &p256, &ed]);
    let iss = idp.issuer();
    let resident = std::env::var("BENCH_RESIDENT_CODE").unwrap_or_else(|_| "on".into());
    let pg = validator_cluster("db")
        .conf(format!("gprxy.resident_code = {resident}"))
        .conf("shared_preload_libraries = 'gprxy_validator, oauth_test_validator'")
        .conf("oauth_validator_libraries = 'gprxy_validator, oauth_test_validator'")
        .conf("log_connections = off")
        .conf("log_min_messages = log")
        .hba("host all trust_user 127.0.0.1/32 trust")
        .hba("host all scram_user 127.0.0.1/32 scram-sha-256")
        .hba(format!(
            "host all floor_user 127.0.0.1/32 oauth issuer=\"{iss}\" scope=\"openid\" map=m validator=oauth_test_validator"
        ))
        .hba(format!(
            "host all alice 127.0.0.1/32 oauth issuer=\"{iss}\" scope=\"openid\" map=m validator=gprxy_validator"
        ))
        .ident("m alice alice")
        .ident("m floor_user floor_user")
        .start();
    pg.sql(
        "CREATE ROLE trust_user LOGIN; CREATE ROLE scram_user LOGIN PASSWORD 'a-long-enough-password'; \
         CREATE ROLE floor_user LOGIN; CREATE ROLE alice LOGIN",
    );
    let addr: SocketAddr = ([127, 0, 0, 1], pg.port()).into();

    let mut claims = idp.claims("alice", "db");
    claims["exp"] = json!(gprxy_core::unix_time() + 3600);
    let token = |key: &TestKey| -> &'static str {
        Box::leak(key.token(json!({"typ": "at+jwt"}), &claims).into_boxed_str())
    };
    let (t_rs, t_es, t_ed) = (token(&rsa), token(&p256), token(&ed));
    // The floor accepts any token; give it one of the same size.
    let mut methods = vec![
        Method { name: "trust", user: "trust_user", auth: Auth::None, wall_ms: vec![], cpu_s: 0.0 },
        Method {
            name: "scram_sha256",
            user: "scram_user",
            auth: Auth::Password("a-long-enough-password"),
            wall_ms: vec![],
            cpu_s: 0.0,
        },
        Method { name: "floor", user: "floor_user", auth: Auth::Bearer(t_rs), wall_ms: vec![], cpu_s: 0.0 },
        Method { name: "gprxy_rs256", user: "alice", auth: Auth::Bearer(t_rs), wall_ms: vec![], cpu_s: 0.0 },
        Method { name: "gprxy_es256", user: "alice", auth: Auth::Bearer(t_es), wall_ms: vec![], cpu_s: 0.0 },
        Method { name: "gprxy_eddsa", user: "alice", auth: Auth::Bearer(t_ed), wall_ms: vec![], cpu_s: 0.0 },
    ];
    // `BENCH_ONLY=name,name`: only these methods (for profiling one of them).
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        methods.retain(|m| only.split(',').any(|o| o == m.name));
    }
    // Every login works, and the shared key cache is warm.
    warm_up(addr, &methods);
    let fetches_after_warmup = idp.jwks_requests();

    measure(addr, &mut methods, rounds, per_round);
    assert_eq!(idp.jwks_requests(), fetches_after_warmup, "JWKS fetched during the measurement");

    println!("connect: {rounds} interleaved rounds x {per_round} connections per method; medians");
    let med = |name: &str| -> (f64, f64) {
        let m = methods.iter().find(|m| m.name == name).expect("method");
        (median(m.wall_ms.clone()), m.cpu_s * 1000.0 / (rounds * per_round) as f64)
    };
    println!(
        "  {:<14} {:>12} {:>22} {:>18}",
        "", "per connect", "machine CPU per connect", "faults per backend"
    );
    for m in &methods {
        let (w, c) = med(m.name);
        let faults = faults_per_backend(addr, m, 21);
        println!("  {:<14} {:>9.3} ms {:>19.3} ms {:>18}", m.name, w, c, faults);
    }

    let mut missed = Vec::new();
    let mut goal = |ok: bool, line: String| {
        println!("  {line} {}", if ok { "ok" } else { "MISSED" });
        if !ok {
            missed.push(line);
        }
    };
    if methods.len() < 6 {
        return;
    }
    let (floor, floor_cpu) = med("floor");
    let (scram, _) = med("scram_sha256");
    let (trust, _) = med("trust");
    // Context for the SCRAM goal: no OAuth login can cost less than trust (no authentication at
    // all) or than the floor (the same OAUTHBEARER exchange with a validator that checks nothing).
    println!(
        "  trust / scram_sha256: {:.3}, floor / scram_sha256: {:.3} (bounds for any OAuth login)",
        trust / scram,
        floor / scram
    );
    for (name, budget) in [("gprxy_rs256", 0.20), ("gprxy_eddsa", 0.20), ("gprxy_es256", 0.25)] {
        let (w, c) = med(name);
        goal(
            w - floor <= budget,
            format!(
                "{name} - floor: {:+.3} ms wall, {:+.3} ms machine CPU (goal <= {budget} ms)",
                w - floor,
                c - floor_cpu
            ),
        );
        goal(w / scram <= 0.6, format!("{name} / scram_sha256: {:.3} (goal <= 0.6)", w / scram));
    }
    let log = pg.log();
    for (key, tok, name) in [(&rsa, t_rs, "RS256"), (&p256, t_es, "ES256"), (&ed, t_ed, "EdDSA")] {
        let own = audit_elapsed_ms(&log, &key.kid);
        let sig = bare_verify_ms(key, tok);
        goal(
            own <= sig + 0.1,
            format!(
                "validator's own time {name}: {own:.3} ms, signature check {sig:.3} ms, extra {:.3} ms (goal <= 0.1)",
                own - sig
            ),
        );
    }
    // Stop the server and the issuer before exiting (process::exit runs no destructors).
    drop(pg);
    drop(idp);
    missed.extend(introspection(rounds, per_round));
    missed.extend(provisioning(rounds, per_round));
    if !missed.is_empty() {
        eprintln!("connect: {} goal(s) missed", missed.len());
        std::process::exit(1);
    }
}

/// A login with a cached introspection answer against a JWT login, interleaved on one server
/// whose issuers file trusts two issuers: A's JWTs (RS256), B's opaque tokens. Returns the goals
/// missed.
fn introspection(rounds: usize, per_round: usize) -> Vec<String> {
    let rsa = TestKey::rsa("bench-jwt");
    let (a, b) = (TestIssuer::start(&[&rsa]), TestIssuer::start(&[]));
    b.introspection_client("gprxy", "bench-secret");
    let pg = validator_cluster("")
        .conf("log_connections = off")
        .hba(format!("host all alice 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m", a.issuer()))
        .hba(format!("host all bob 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" map=m", b.issuer()))
        .ident("m alice alice")
        .ident("m bob bob")
        .start();
    pg.sql("CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN");
    let secret = pg.data_dir().join("secret");
    std::fs::write(&secret, "bench-secret\n").expect("secret file");
    let file = pg.data_dir().join("issuers.toml");
    std::fs::write(
        &file,
        format!(
            "[[issuer]]\nissuer = \"{}\"\naudience = [\"db\"]\n\n[[issuer]]\nissuer = \"{}\"\naudience = [\"db\"]\n\
             tokens = \"introspect\"\n[issuer.introspection]\nclient_id = \"gprxy\"\nclient_secret_file = \"{}\"\n\
             cache_ttl_max_secs = 3600\n",
            a.issuer(),
            b.issuer(),
            secret.display()
        ),
    )
    .expect("issuers file");
    pg.sql(&format!("ALTER SYSTEM SET gprxy.issuers_file = '{}'", file.display()));
    pg.sql("SELECT pg_reload_conf()");
    assert!(
        pg.wait_for_log("parameter \"gprxy.issuers_file\" changed", std::time::Duration::from_secs(5)),
        "{}",
        pg.log()
    );
    let addr: SocketAddr = ([127, 0, 0, 1], pg.port()).into();
    let mut claims = a.claims("alice", "db");
    claims["exp"] = json!(gprxy_core::unix_time() + 3600);
    let jwt: &'static str = Box::leak(rsa.token(json!({"typ": "at+jwt"}), &claims).into_boxed_str());
    let mut opaque_claims = b.claims("bob", "db");
    opaque_claims["exp"] = json!(gprxy_core::unix_time() + 3600);
    // As long as the JWT: the same bytes on the wire.
    let opaque: &'static str = Box::leak(format!("opq-{}", "x".repeat(jwt.len() - 4)).into_boxed_str());
    b.opaque_token(opaque, opaque_claims);
    let mut methods = [
        Method { name: "jwt_rs256", user: "alice", auth: Auth::Bearer(jwt), wall_ms: vec![], cpu_s: 0.0 },
        Method {
            name: "introspect_cached",
            user: "bob",
            auth: Auth::Bearer(opaque),
            wall_ms: vec![],
            cpu_s: 0.0,
        },
    ];
    warm_up(addr, &methods);
    measure(addr, &mut methods, rounds, per_round);
    assert_eq!(b.introspection_requests(), 1, "the answer came from shared memory after the first login");
    println!("introspection: {rounds} interleaved rounds x {per_round} connections per method; medians");
    let mut out = Vec::new();
    for m in &methods {
        println!(
            "  {:<18} {:>9.3} ms {:>19.3} ms machine CPU",
            m.name,
            median(m.wall_ms.clone()),
            m.cpu_s * 1000.0 / (rounds * per_round) as f64
        );
    }
    let ratio = median(methods[1].wall_ms.clone()) / median(methods[0].wall_ms.clone());
    let line = format!("introspect_cached / jwt_rs256: {ratio:.3} (goal <= 1.10)");
    println!("  {line} {}", if ratio <= 1.10 { "ok" } else { "MISSED" });
    if ratio > 1.10 {
        out.push(line);
    }
    out
}

/// A provisioned role's unchanged login against a delegated group-role login on one server with
/// `gprxy.provision = sync` (#29). Returns the goals missed.
fn provisioning(rounds: usize, per_round: usize) -> Vec<String> {
    let rsa = TestKey::rsa("bench-provision");
    let idp = TestIssuer::start(&[&rsa]);
    let pg = validator_cluster("db")
        .conf("log_connections = off")
        .conf("gprxy.provision = 'sync'")
        .conf("gprxy.provision_role = 'gprxy_provisioner'")
        .conf("gprxy.provision_recheck = 86400")
        .conf("gprxy.role_claim = 'groups'")
        .conf("gprxy.role_map = 'eng:app_reader'")
        .hba(format!(
            "host all all 127.0.0.1/32 oauth issuer=\"{}\" scope=\"openid\" delegate_ident_mapping=1",
            idp.issuer()
        ))
        .start();
    pg.sql("CREATE EXTENSION gprxy_validator; CREATE ROLE app_reader NOLOGIN");
    let setup = std::fs::read_to_string(gprxy_tests::sql_dir().join("06_provisioning.sql")).expect("sql/06");
    pg.sql(&setup.replace("app_reader, app_writer", "app_reader"));
    assert!(pg.wait_for_log("gprxy: provisioner ready", std::time::Duration::from_secs(20)), "{}", pg.log());
    let addr: SocketAddr = ([127, 0, 0, 1], pg.port()).into();
    let mut claims = idp.claims("alice", "db");
    claims["exp"] = json!(gprxy_core::unix_time() + 3600);
    claims["groups"] = json!(["eng"]);
    let token: &'static str = Box::leak(rsa.token(json!({"typ": "at+jwt"}), &claims).into_boxed_str());
    let mut methods = [
        Method {
            name: "delegated_group",
            user: "app_reader",
            auth: Auth::Bearer(token),
            wall_ms: vec![],
            cpu_s: 0.0,
        },
        Method {
            name: "provisioned_unchanged",
            user: "alice",
            auth: Auth::Bearer(token),
            wall_ms: vec![],
            cpu_s: 0.0,
        },
    ];
    // app_reader is NOLOGIN: a group role one logs in as needs LOGIN.
    pg.sql("ALTER ROLE app_reader LOGIN");
    warm_up(addr, &methods);
    let provisioned = pg.log().matches("gprxy: provision action=").count();
    measure(addr, &mut methods, rounds, per_round);
    assert_eq!(
        pg.log().matches("gprxy: provision action=").count(),
        provisioned,
        "the unchanged logins were answered from shared memory"
    );
    println!("provisioning: {rounds} interleaved rounds x {per_round} connections per method; medians");
    for m in &methods {
        println!(
            "  {:<22} {:>9.3} ms {:>19.3} ms machine CPU",
            m.name,
            median(m.wall_ms.clone()),
            m.cpu_s * 1000.0 / (rounds * per_round) as f64
        );
    }
    let extra = median(methods[1].wall_ms.clone()) - median(methods[0].wall_ms.clone());
    let line = format!("provisioned_unchanged - delegated_group: {extra:+.3} ms (goal <= 0.05 ms)");
    println!("  {line} {}", if extra <= 0.05 { "ok" } else { "MISSED" });
    if extra > 0.05 {
        return vec![line];
    }
    Vec::new()
}
