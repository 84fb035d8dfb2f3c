//! gprxy_validator: PostgreSQL 18 OAuth validator module and SQL claim functions.
//!
//! Built for PostgreSQL 18 it validates bearer tokens (`oauth_validator_libraries`) through
//! gprxy-core; built for older servers it provides the SQL side only. All unsafe code lives in
//! [`ffi`]; validation logic lives in gprxy-core where plain unit tests reach it.
#![deny(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use pgrx::prelude::*;

#[cfg(oauth_validator)]
mod answers;
mod ffi;
#[cfg(oauth_validator)]
mod login;
#[cfg(oauth_validator)]
mod provision;
#[cfg(oauth_validator)]
mod role_powers;
mod session;
#[cfg(oauth_validator)]
mod settings;
#[cfg(oauth_validator)]
mod shared;
#[cfg(oauth_validator)]
mod worker;

::pgrx::pg_module_magic!();

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    ffi::define_context_settings();
    ffi::install_session_hooks();
    #[cfg(oauth_validator)]
    ffi::init();
    // Loaded by the postmaster (shared_preload_libraries): every backend forked from it inherits
    // the crypto library's initialisation instead of redoing it on each login.
    #[cfg(oauth_validator)]
    if !gprxy_core::prepare_process() {
        pgrx::warning!("gprxy_validator: the crypto library failed its start-up self-check");
    }
}

/// The claims of the token that authenticated this session (NULL without one).
#[pg_extern(stable, parallel_restricted)]
fn claims() -> Option<pgrx::JsonB> {
    session::get().map(|s| pgrx::JsonB(serde_json::Value::Object(s.claims)))
}

/// One claim, by name or dotted path: a string claim as text, any other as JSON text.
#[pg_extern(stable, parallel_restricted)]
fn claim(name: &str) -> Option<String> {
    session::claim_text(name)
}

/// The roles from the configured role claim (NULL without a token).
#[pg_extern(stable, parallel_restricted)]
fn roles() -> Option<Vec<String>> {
    session::get().map(|s| s.roles)
}

/// The token's `sub` (NULL without a token).
#[pg_extern(stable, parallel_restricted)]
fn subject() -> Option<String> {
    session::get().and_then(|s| s.subject)
}

/// The authenticated identity (NULL without a token): the configured identity claim, prefixed
/// with the issuer (`<iss>#<value>`) when the issuer's entry is `issuer_qualified`. Write RLS
/// policies on this rather than `gprxy.subject()`: two issuers' `sub` values may be the same.
#[pg_extern(stable, parallel_restricted)]
fn identity() -> Option<String> {
    session::get().and_then(|s| s.identity)
}

/// Sets the session's identity from a context signed by gprxy (fallback mode). Refused unless
/// the session user is in `gprxy.context_roles`, the signature verifies against a key pinned in
/// `gprxy.context_keys`, the context names this connection (the startup packet's
/// `gprxy.context_nonce` and this backend's process id) and its counter is above every one
/// accepted before on this connection. EXECUTE is not granted to PUBLIC.
#[pg_extern(volatile, parallel_unsafe)]
fn set_context(context: &str) {
    let (nonce, nonce_count) = ffi::startup_parameter(gprxy_core::context::NONCE_PARAMETER);
    let caller = session::Caller {
        session_user: ffi::session_user().unwrap_or_default(),
        nonce,
        nonce_count,
        pid: ffi::backend_pid(),
    };
    match session::set_signed(&caller, context) {
        // The proxy's session end is checked here too, at every statement, call and commit.
        Ok(Some(end)) => ffi::bind_session_end(&end),
        Ok(None) => ffi::unbind_session_end(),
        Err(e) => {
            pgrx::ereport!(
                ERROR,
                pgrx::PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
                format!("gprxy: context refused: {e}")
            );
        }
    }
}

/// Forgets a signed context: the claim functions return NULL until the next one.
#[pg_extern(volatile, parallel_unsafe)]
fn reset_context() {
    // The session's end stays bound: the service account that may call this is the client's
    // too, and only a signed context (the next session's) replaces or clears it.
    session::reset_signed();
}

pgrx::extension_sql!(
    r#"
-- Every role may read its own session's identity; only the validator, or a context signed by
-- gprxy for a role in gprxy.context_roles, can set it. The DBA grants EXECUTE on these two to
-- fallback mode's service accounts (sql/05_signed_context.sql).
GRANT USAGE ON SCHEMA gprxy TO PUBLIC;
REVOKE EXECUTE ON FUNCTION gprxy.set_context(text), gprxy.reset_context() FROM PUBLIC;
"#,
    name = "grant_schema_usage",
    finalize,
);

#[cfg(oauth_validator)]
pgrx::extension_sql!(
    r#"
-- Roles from groups (gprxy.provision): what gprxy's provisioner created (the role's OID: a role
-- dropped and made again by hand under the name is not gprxy's), for whom, and when the
-- person last logged in through it. The provisioner (gprxy.provision_role) reads and writes it in
-- gprxy.provision_database; nothing else needs it (sql/06_provisioning.sql).
CREATE TABLE gprxy.provisioned_roles (
    role name PRIMARY KEY,
    role_oid oid NOT NULL,
    issuer text NOT NULL,
    identity text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_login timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON gprxy.provisioned_roles FROM PUBLIC;

-- The roles gprxy made that nobody logged in as for `days` days (it never drops them itself).
CREATE FUNCTION gprxy.unused_provisioned_roles(days integer)
RETURNS TABLE (role name, issuer text, identity text, last_login timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.role, p.issuer, p.identity, p.last_login FROM gprxy.provisioned_roles p
    WHERE p.last_login < now() - make_interval(days => days) ORDER BY p.last_login
$$;

-- Drops one role gprxy made, after giving what it owns in this database to `reassign_to`
-- (REASSIGN OWNED, then DROP OWNED for its grants). Objects it owns in other databases must be
-- reassigned there first, or DROP ROLE fails and nothing changes.
CREATE FUNCTION gprxy.drop_provisioned_role(role name, reassign_to name)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM gprxy.provisioned_roles p JOIN pg_roles r ON r.oid = p.role_oid
                   WHERE p.role = drop_provisioned_role.role AND r.rolname = p.role) THEN
        RAISE EXCEPTION 'gprxy: role % was not made by gprxy''s provisioner', drop_provisioned_role.role;
    END IF;
    EXECUTE format('REASSIGN OWNED BY %I TO %I', drop_provisioned_role.role, reassign_to);
    EXECUTE format('DROP OWNED BY %I', drop_provisioned_role.role);
    EXECUTE format('DROP ROLE %I', drop_provisioned_role.role);
    DELETE FROM gprxy.provisioned_roles p WHERE p.role = drop_provisioned_role.role;
    RAISE LOG 'gprxy: provision action=drop role=% reassigned_to=%',
        quote_ident(drop_provisioned_role.role), quote_ident(reassign_to);
END
$$;
REVOKE EXECUTE ON FUNCTION gprxy.unused_provisioned_roles(integer), gprxy.drop_provisioned_role(name, name) FROM PUBLIC;
"#,
    name = "provisioned_roles",
);
