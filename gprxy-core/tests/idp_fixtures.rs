//! Claim shapes of real identity providers: identity and roles come out right for each.
//! Shapes follow each provider's documented access-token format.

use gprxy_core::testkit::{jwks, now, TestKey};
use gprxy_core::{KeySet, Policy, PolicyBuilder, ValidatedToken, Validator};
use serde_json::{json, Value};

fn run(key: &TestKey, header: Value, claims: Value, policy: PolicyBuilder) -> ValidatedToken {
    let keys = KeySet::from_json(jwks(&[key]).to_string().as_bytes()).unwrap();
    let token = key.token(header, &claims);
    Validator::new(policy.build().unwrap()).validate(&token, &keys, now()).unwrap()
}

fn times() -> (i64, i64) {
    let t = now();
    (t, t + 600)
}

#[test]
fn auth0_namespaced_roles_and_audience_array() {
    let k = TestKey::rsa("auth0-key");
    let (iat, exp) = times();
    let iss = "https://test-org-flow.us.auth0.com/";
    let claims = json!({
        "iss": iss, "sub": "auth0|65a1b2c3d4e5f6a7b8c9d0e1",
        "aud": ["https://gprxy.io", "https://test-org-flow.us.auth0.com/userinfo"],
        "iat": iat, "exp": exp, "azp": "client123", "scope": "openid profile email",
        "https://gprxy.io/roles": ["app_writer"], "https://gprxy.io/email": "alice@example.com"
    });
    let p = Policy::builder(iss)
        .audiences(["https://gprxy.io"])
        .accept_generic_typ(true)
        .role_claim(Some("https://gprxy.io/roles".into()));
    let v = run(&k, json!({"typ": "JWT"}), claims, p);
    assert_eq!(v.identity, "auth0|65a1b2c3d4e5f6a7b8c9d0e1");
    assert_eq!(v.roles, vec!["app_writer"]);
}

#[test]
fn entra_id_v2_scp_and_app_roles() {
    let k = TestKey::rsa("entra-key");
    let (iat, exp) = times();
    let tid = "11111111-2222-4333-8444-555555555555";
    let iss = format!("https://login.microsoftonline.com/{tid}/v2.0");
    let claims = json!({
        "iss": iss, "aud": "6e74172b-be56-4843-9ff4-e66a39bb12e3", "iat": iat, "nbf": iat, "exp": exp,
        "oid": "00000000-0000-0000-66f3-3332eca7ea81", "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
        "tid": tid, "ver": "2.0", "scp": "db.read db.write", "roles": ["App.Admin"],
        "preferred_username": "alice@contoso.com"
    });
    let p = Policy::builder(iss.clone())
        .audiences(["6e74172b-be56-4843-9ff4-e66a39bb12e3"])
        .accept_generic_typ(true)
        .identity_claim("oid")
        .role_claim(Some("roles".into()))
        .required_scopes(["db.read"]);
    let v = run(&k, json!({"typ": "JWT"}), claims, p);
    assert_eq!(v.identity, "00000000-0000-0000-66f3-3332eca7ea81");
    assert_eq!(v.roles, vec!["App.Admin"]);
    assert_eq!(v.scopes, vec!["db.read", "db.write"]);
}

#[test]
fn keycloak_realm_roles() {
    let k = TestKey::rsa("kc-key");
    let (iat, exp) = times();
    let iss = "https://kc.example.com/realms/acme";
    let claims = json!({
        "iss": iss, "aud": ["gprxy", "account"], "sub": "f:8c6:alice", "typ": "Bearer", "azp": "psql",
        "iat": iat, "exp": exp, "scope": "openid email profile",
        "realm_access": {"roles": ["app_reader", "offline_access", "uma_authorization"]},
        "resource_access": {"gprxy": {"roles": ["app_writer"]}},
        "preferred_username": "alice", "email": "alice@acme.example"
    });
    let p = Policy::builder(iss)
        .audiences(["gprxy"])
        .accept_generic_typ(true)
        .identity_claim("preferred_username")
        .role_claim(Some("realm_access.roles".into()));
    let v = run(&k, json!({"typ": "JWT"}), claims.clone(), p);
    assert_eq!(v.identity, "alice");
    assert_eq!(v.roles, vec!["app_reader", "offline_access", "uma_authorization"]);
    let p = Policy::builder(iss)
        .audiences(["gprxy"])
        .accept_generic_typ(true)
        .role_claim(Some("resource_access.gprxy.roles".into()));
    assert_eq!(run(&k, json!({"typ": "JWT"}), claims, p).roles, vec!["app_writer"]);
}

#[test]
fn okta_scp_array_and_groups() {
    let k = TestKey::rsa("okta-key");
    let (iat, exp) = times();
    let iss = "https://acme.okta.com/oauth2/default";
    let claims = json!({
        "ver": 1, "jti": "AT.abc", "iss": iss, "aud": "api://default", "iat": iat, "exp": exp,
        "cid": "0oa1", "uid": "00u1", "scp": ["openid", "db.read"], "auth_time": iat,
        "sub": "alice@acme.example", "groups": ["Everyone", "app_writer"]
    });
    let p = Policy::builder(iss)
        .audiences(["api://default"])
        .accept_generic_typ(true)
        .role_claim(Some("groups".into()))
        .required_scopes(["db.read"]);
    let v = run(&k, json!({}), claims, p);
    assert_eq!(v.identity, "alice@acme.example");
    assert_eq!(v.roles, vec!["Everyone", "app_writer"]);
}

#[test]
fn kubernetes_service_account_token() {
    let k = TestKey::rsa("k8s-key");
    let (iat, exp) = times();
    let iss = "https://kubernetes.default.svc.cluster.local";
    let claims = json!({
        "aud": ["https://kubernetes.default.svc.cluster.local"], "exp": exp, "iat": iat, "nbf": iat, "iss": iss,
        "kubernetes.io": {"namespace": "payments",
                          "pod": {"name": "api-7d9f", "uid": "1b2c"},
                          "serviceaccount": {"name": "api", "uid": "9a8b"}},
        "sub": "system:serviceaccount:payments:api"
    });
    let p = Policy::builder(iss)
        .audiences(["https://kubernetes.default.svc.cluster.local"])
        .accept_generic_typ(true)
        .role_claim(Some("kubernetes.io.namespace".into()));
    let v = run(&k, json!({}), claims.clone(), p);
    assert_eq!(v.identity, "system:serviceaccount:payments:api");
    assert_eq!(v.roles, vec!["payments"]);
    let p = Policy::builder(iss)
        .audiences(["https://kubernetes.default.svc.cluster.local"])
        .accept_generic_typ(true)
        .identity_claim("kubernetes.io.serviceaccount.name");
    assert_eq!(run(&k, json!({}), claims, p).identity, "api");
}

#[test]
fn github_actions_oidc_token() {
    let k = TestKey::rsa("gha-key");
    let (iat, exp) = times();
    let iss = "https://token.actions.githubusercontent.com";
    let claims = json!({
        "jti": "example-id", "sub": "repo:octo-org/octo-repo:environment:prod",
        "environment": "prod", "aud": "https://github.com/octo-org", "ref": "refs/heads/main",
        "sha": "example-sha", "repository": "octo-org/octo-repo", "repository_owner": "octo-org",
        "actor_id": "12", "repository_visibility": "private", "repository_id": "74",
        "repository_owner_id": "65", "run_id": "example-run-id", "run_number": "10",
        "run_attempt": "2", "actor": "octocat", "workflow": "example-workflow", "head_ref": "",
        "base_ref": "", "event_name": "workflow_dispatch", "ref_type": "branch",
        "job_workflow_ref": "octo-org/octo-automation/.github/workflows/oidc.yml@refs/heads/main",
        "iss": iss, "nbf": iat, "exp": exp, "iat": iat
    });
    let p = Policy::builder(iss)
        .audiences(["https://github.com/octo-org"])
        .accept_generic_typ(true)
        .identity_form(gprxy_core::IdentityForm::IssuerQualified)
        .role_claim(Some("environment".into()))
        // GitHub's issuer serves every repository: the owner must be pinned.
        .required_claims(gprxy_core::RequiredClaims::parse("repository_owner = octo-org").unwrap());
    let header = json!({"typ": "JWT", "x5t": "example-thumbprint"});
    let v = run(&k, header.clone(), claims.clone(), p.clone());
    assert_eq!(v.identity, format!("{iss}#repo:octo-org/octo-repo:environment:prod"));
    assert_eq!(v.roles, vec!["prod"]);
    // Another owner's workflow with an environment named prod and our audience.
    let mut evil = claims;
    evil["repository"] = json!("evil/x");
    evil["repository_owner"] = json!("evil");
    evil["sub"] = json!("repo:evil/x:environment:prod");
    let keys = KeySet::from_json(jwks(&[&k]).to_string().as_bytes()).unwrap();
    let e = Validator::new(p.build().unwrap()).validate(&k.token(header, &evil), &keys, now()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "required claim \"repository_owner\" must equal \"octo-org\" (token: \"evil\")"
    );
}

#[test]
fn google_id_token_with_email_identity() {
    // Google's access tokens are opaque; its ID tokens are JWTs whose audience is the client id.
    let k = TestKey::rsa("google-key");
    let (iat, exp) = times();
    let iss = "https://accounts.google.com";
    let client = "1234567890-abc.apps.googleusercontent.com";
    let claims = json!({
        "iss": iss, "azp": client, "aud": client, "sub": "110169484474386276334",
        "hd": "acme.example", "email": "alice@acme.example", "email_verified": true,
        "iat": iat, "exp": exp
    });
    // An e-mail identity needs a verified address, and Google's accounts need the domain pinned.
    let required = gprxy_core::RequiredClaims::parse("email_verified = true, hd = acme.example").unwrap();
    let p = Policy::builder(iss)
        .audiences([client])
        .accept_generic_typ(true)
        .identity_claim("email")
        .required_claims(required);
    let v = run(&k, json!({"typ": "JWT"}), claims.clone(), p.clone());
    let keys = KeySet::from_json(jwks(&[&k]).to_string().as_bytes()).unwrap();
    for (claim, value, refusal) in [
        ("email_verified", json!("true"), "required claim \"email_verified\" must be true (token: \"true\")"),
        (
            "hd",
            json!("gmail.com"),
            "required claim \"hd\" must equal \"acme.example\" (token: \"gmail.com\")",
        ),
    ] {
        let mut c = claims.clone();
        c[claim] = value;
        let e = Validator::new(p.clone().build().unwrap())
            .validate(&k.token(json!({"typ": "JWT"}), &c), &keys, now())
            .unwrap_err();
        assert_eq!(e.to_string(), refusal);
    }
    assert_eq!(v.identity, "alice@acme.example");
    assert_eq!(v.subject.as_deref(), Some("110169484474386276334"));
    assert!(v.roles.is_empty());
}

/// Validates `claims` (signed by `k` with `header`) under the one entry of an issuers file that
/// takes `profile` and adds `extra` lines.
fn with_profile(
    profile: &str,
    iss: &str,
    aud: &str,
    extra: &str,
    k: &TestKey,
    header: Value,
    claims: &Value,
) -> Result<ValidatedToken, String> {
    let text =
        format!("[[issuer]]\nprofile = \"{profile}\"\nissuer = \"{iss}\"\naudience = [\"{aud}\"]\n{extra}");
    let set = gprxy_core::IssuerSet::from_toml(&text, false).map_err(|e| e.to_string())?;
    let entry = set.get(iss).expect("the entry");
    let keys = KeySet::from_json(jwks(&[k]).to_string().as_bytes()).unwrap();
    Validator::new(entry.policy.clone())
        .validate(&k.token(header, claims), &keys, now())
        .map_err(|e| e.to_string())
}

/// Each provider's real claim shape through its profile: the defaults find identity, roles and
/// scopes where that provider puts them, and what the profile requires is enforced.
#[test]
fn profiles_read_each_providers_claim_shape() {
    let (iat, exp) = times();
    let k = TestKey::rsa("k");

    let tid = "11111111-2222-4333-8444-555555555555";
    let iss = format!("https://login.microsoftonline.com/{tid}/v2.0");
    let entra = json!({"iss": iss, "aud": "api://db", "iat": iat, "exp": exp, "tid": tid, "ver": "2.0",
        "oid": "00000000-0000-0000-66f3-3332eca7ea81", "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
        "scp": "db.read db.write", "roles": ["App.Admin"]});
    let v = with_profile(
        "entra",
        &iss,
        "api://db",
        "required_scopes = [\"db.read\"]",
        &k,
        json!({"typ": "JWT"}),
        &entra,
    )
    .unwrap();
    assert_eq!(
        (v.identity.as_str(), v.roles.as_slice()),
        ("00000000-0000-0000-66f3-3332eca7ea81", &["App.Admin".to_owned()][..])
    );
    // Entra grants scopes in scp only: a scope claim naming the scope does not count.
    let mut wrong = entra.clone();
    wrong["scp"] = json!("other");
    wrong["scope"] = json!("db.read");
    let e = with_profile(
        "entra",
        &iss,
        "api://db",
        "required_scopes = [\"db.read\"]",
        &k,
        json!({"typ": "JWT"}),
        &wrong,
    );
    assert_eq!(e.unwrap_err(), "required scope \"db.read\" not granted");

    let iss = "https://acme.okta.com/oauth2/default";
    let okta = json!({"ver": 1, "iss": iss, "aud": "api://default", "iat": iat, "exp": exp, "cid": "0oa1",
        "uid": "00u1", "scp": ["openid", "db.read"], "sub": "alice@acme.example", "groups": ["Everyone", "app_writer"]});
    let v =
        with_profile("okta", iss, "api://default", "required_scopes = [\"db.read\"]", &k, json!({}), &okta)
            .unwrap();
    assert_eq!((v.identity.as_str(), v.roles.len()), ("alice@acme.example", 2));

    let iss = "https://test-org-flow.us.auth0.com/";
    let auth0 = json!({"iss": iss, "sub": "auth0|65a1b2c3", "aud": ["https://gprxy.io", format!("{iss}userinfo")],
        "iat": iat, "exp": exp, "scope": "openid db", "https://gprxy.io/roles": ["app_writer"]});
    let v = with_profile(
        "auth0",
        iss,
        "https://gprxy.io",
        "role_claim = \"https://gprxy.io/roles\"",
        &k,
        json!({"typ": "at+jwt"}),
        &auth0,
    )
    .unwrap();
    assert_eq!((v.identity.as_str(), v.roles.as_slice()), ("auth0|65a1b2c3", &["app_writer".to_owned()][..]));

    let iss = "https://kc.example.com/realms/acme";
    let kc = json!({"iss": iss, "aud": ["gprxy", "account"], "sub": "f:8c6:alice", "typ": "Bearer", "iat": iat, "exp": exp,
        "scope": "openid email", "realm_access": {"roles": ["app_reader"]}});
    let v = with_profile("keycloak", iss, "gprxy", "", &k, json!({"typ": "JWT"}), &kc).unwrap();
    assert_eq!((v.identity.as_str(), v.roles.as_slice()), ("f:8c6:alice", &["app_reader".to_owned()][..]));

    let iss = "https://kubernetes.default.svc.cluster.local";
    let k8s = json!({"aud": [iss], "exp": exp, "iat": iat, "iss": iss, "sub": "system:serviceaccount:payments:api",
        "kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "api", "uid": "9a8b"}}});
    let pin = "role_claim = \"kubernetes.io.namespace\"\nrequired_claims = { \"kubernetes.io.namespace\" = \"payments\" }";
    let v = with_profile("kubernetes", iss, iss, pin, &k, json!({}), &k8s).unwrap();
    assert_eq!(
        (v.identity.as_str(), v.roles.as_slice()),
        ("system:serviceaccount:payments:api", &["payments".to_owned()][..])
    );

    let iss = "https://token.actions.githubusercontent.com";
    let gha = json!({"sub": "repo:octo-org/octo-repo:environment:prod", "environment": "prod", "aud": "https://github.com/octo-org",
        "repository": "octo-org/octo-repo", "repository_owner": "octo-org", "iss": iss, "iat": iat, "exp": exp});
    let pin = "required_claims = { repository_owner = \"octo-org\" }";
    let v = with_profile(
        "github-actions",
        iss,
        "https://github.com/octo-org",
        pin,
        &k,
        json!({"typ": "JWT"}),
        &gha,
    )
    .unwrap();
    assert_eq!(
        v.identity,
        format!("{iss}#repo:octo-org/octo-repo:environment:prod"),
        "issuer-qualified by default"
    );
    let mut evil = gha.clone();
    evil["repository_owner"] = json!("evil");
    let e = with_profile(
        "github-actions",
        iss,
        "https://github.com/octo-org",
        pin,
        &k,
        json!({"typ": "JWT"}),
        &evil,
    );
    assert_eq!(
        e.unwrap_err(),
        "required claim \"repository_owner\" must equal \"octo-org\" (token: \"evil\")"
    );

    let iss = "https://accounts.google.com";
    let client = "1234567890-abc.apps.googleusercontent.com";
    let google = json!({"iss": iss, "azp": client, "aud": client, "sub": "110169484474386276334", "hd": "acme.example",
        "email": "alice@acme.example", "email_verified": true, "iat": iat, "exp": exp});
    let pin = "required_claims = { hd = \"acme.example\" }";
    let v = with_profile("google", iss, client, pin, &k, json!({"typ": "JWT"}), &google).unwrap();
    assert_eq!(v.identity, "alice@acme.example");
    // The profile adds email_verified = true to an e-mail identity.
    let mut unverified = google.clone();
    unverified["email_verified"] = json!(false);
    let e = with_profile("google", iss, client, pin, &k, json!({"typ": "JWT"}), &unverified);
    assert_eq!(e.unwrap_err(), "required claim \"email_verified\" must be true (token: false)");
}

/// A policy's maximum token lifetime refuses long-lived tokens, and tokens it cannot measure.
#[test]
fn maximum_token_lifetime() {
    let k = TestKey::p256("k");
    let t = now();
    let text =
        "[[issuer]]\nissuer = \"https://idp.example\"\naudience = [\"db\"]\nmax_token_age_secs = 600\n";
    let set = gprxy_core::IssuerSet::from_toml(text, false).unwrap();
    let v = Validator::new(set.get("https://idp.example").unwrap().policy.clone());
    let keys = KeySet::from_json(jwks(&[&k]).to_string().as_bytes()).unwrap();
    let token = |claims: Value| k.token(json!({"typ": "at+jwt", "kid": "k"}), &claims);
    let base = json!({"iss": "https://idp.example", "aud": "db", "sub": "a", "iat": t, "exp": t + 600});
    assert!(v.validate(&token(base.clone()), &keys, t).is_ok());
    let mut long = base.clone();
    long["exp"] = json!(t + 86_400);
    assert_eq!(
        v.validate(&token(long), &keys, t).unwrap_err().to_string(),
        "token lifetime of 86400 s is longer than the maximum of 600 s"
    );
    let mut no_iat = base;
    no_iat.as_object_mut().unwrap().remove("iat");
    assert_eq!(v.validate(&token(no_iat), &keys, t).unwrap_err().code(), "iat_missing");
}

/// The example issuers file (README's) loads, with each entry's profile.
#[test]
fn the_example_issuers_file_loads() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../issuers.toml.example")).unwrap();
    let set = gprxy_core::IssuerSet::from_toml(&text, false).unwrap();
    let profiles: Vec<_> = set.iter().map(|i| i.profile.map(|p| p.name())).collect();
    assert_eq!(profiles, [Some("entra"), Some("github-actions"), Some("kubernetes"), None]);
    let modes: Vec<_> = set.iter().map(|i| i.mode.name()).collect();
    assert_eq!(modes, ["jwt", "jwt", "jwt", "introspect"]);
}

/// An issuer's token mode and its introspection table go together.
#[test]
fn introspection_settings_are_checked_with_the_entry() {
    let entry = |extra: &str| {
        format!("[[issuer]]\nissuer = \"https://sso.example.com\"\naudience = [\"db\"]\n{extra}")
    };
    let err = |extra: &str| gprxy_core::IssuerSet::from_toml(&entry(extra), false).unwrap_err().to_string();
    assert!(err("tokens = \"introspect\"").contains("tokens = \"introspect\" needs an [introspection] table"));
    assert!(
        err("tokens = \"opaque\"").contains("(key tokens): unknown variant, expected"),
        "{}",
        err("tokens = \"opaque\"")
    );
    let table = "[issuer.introspection]\nclient_id = \"gprxy\"\nclient_secret_env = \"S\"\n";
    assert!(
        err(table).contains("an [introspection] table needs tokens = \"introspect\" or \"jwt+introspect\"")
    );
    // A secret written where it does not belong is refused, and the refusal does not quote it.
    let inline = err(&format!("{table}client_secret = \"hunter2-inline\"\n"));
    assert!(
        inline
            .starts_with("TOML error at line 7, column 1 (key client_secret): unknown field `client_secret`"),
        "{inline}"
    );
    assert!(!inline.contains("hunter2"), "{inline}");
    let ok =
        gprxy_core::IssuerSet::from_toml(&entry(&format!("tokens = \"jwt+introspect\"\n{table}")), false)
            .unwrap();
    let i = ok.iter().next().unwrap();
    assert_eq!(i.mode, gprxy_core::TokenMode::JwtIntrospect);
    assert_eq!(i.introspection.as_ref().unwrap().active_ttl_max_secs, 60);
}
