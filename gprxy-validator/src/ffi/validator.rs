//! The OAuth validator ABI of PostgreSQL 18 and 19 (`libpq/oauth.h`, which pgrx does not bind;
//! checked against the server's header when the library loads: [`check_abi`]), GUC registration with check hooks, shared memory, and the background
//! worker's entry point. Everything here converts between C and Rust and calls safe modules.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, GucContext, GucFlags, GucRegistry, PgLwLock};

use crate::answers::SharedAnswers;
use crate::login::{self, LoginRequest};
use crate::settings::{self as s};
use crate::shared::SharedKeys;

use super::{check_detail, opt_str};

// ---------------------------------------------------------------- libpq/oauth.h

/// `PG_OAUTH_VALIDATOR_MAGIC`.
const PG_OAUTH_VALIDATOR_MAGIC: u32 = 0x2025_0220;

#[repr(C)]
pub struct ValidatorModuleState {
    sversion: c_int,
    private_data: *mut c_void,
}

#[repr(C)]
pub struct ValidatorModuleResult {
    authorized: bool,
    authn_id: *mut c_char,
    /// PostgreSQL 19: a refusal's explanation, which the server logs as the DETAIL of its own
    /// authentication failure (server log only).
    #[cfg(oauth_hba_options)]
    error_detail: *mut c_char,
}

type StartupCb = unsafe extern "C-unwind" fn(*mut ValidatorModuleState);
type ShutdownCb = unsafe extern "C-unwind" fn(*mut ValidatorModuleState);
type ValidateCb = unsafe extern "C-unwind" fn(
    *const ValidatorModuleState,
    *const c_char,
    *const c_char,
    *mut ValidatorModuleResult,
) -> bool;

#[repr(C)]
pub struct OAuthValidatorCallbacks {
    magic: u32,
    startup_cb: Option<StartupCb>,
    shutdown_cb: Option<ShutdownCb>,
    validate_cb: Option<ValidateCb>,
}

static CALLBACKS: OAuthValidatorCallbacks = OAuthValidatorCallbacks {
    magic: PG_OAUTH_VALIDATOR_MAGIC,
    startup_cb: Some(startup_cb),
    shutdown_cb: Some(shutdown_cb),
    validate_cb: Some(validate_cb),
};

/// Called by PostgreSQL when it loads an `oauth_validator_libraries` entry.
#[no_mangle]
pub extern "C-unwind" fn _PG_oauth_validator_module_init() -> *const OAuthValidatorCallbacks {
    &CALLBACKS
}

/// What [`check_abi`] compares, in the order of `gprxy_oauth_abi` (src/shim.c).
const ABI_FIELDS: [&str; 14] = [
    "PG_OAUTH_VALIDATOR_MAGIC",
    "sizeof(ValidatorModuleState)",
    "ValidatorModuleState.sversion",
    "ValidatorModuleState.private_data",
    "sizeof(ValidatorModuleResult)",
    "ValidatorModuleResult.authorized",
    "ValidatorModuleResult.authn_id",
    "ValidatorModuleResult.error_detail",
    "sizeof(OAuthValidatorCallbacks)",
    "OAuthValidatorCallbacks.magic",
    "OAuthValidatorCallbacks.startup_cb",
    "OAuthValidatorCallbacks.shutdown_cb",
    "OAuthValidatorCallbacks.validate_cb",
    "PG_VERSION_NUM",
];

/// The same values as this library's Rust declarations have them.
fn rust_abi() -> [usize; 14] {
    use std::mem::{offset_of, size_of};
    #[cfg(oauth_hba_options)]
    let error_detail = offset_of!(ValidatorModuleResult, error_detail);
    #[cfg(not(oauth_hba_options))]
    let error_detail = usize::MAX;
    [
        PG_OAUTH_VALIDATOR_MAGIC as usize,
        size_of::<ValidatorModuleState>(),
        offset_of!(ValidatorModuleState, sversion),
        offset_of!(ValidatorModuleState, private_data),
        size_of::<ValidatorModuleResult>(),
        offset_of!(ValidatorModuleResult, authorized),
        offset_of!(ValidatorModuleResult, authn_id),
        error_detail,
        size_of::<OAuthValidatorCallbacks>(),
        offset_of!(OAuthValidatorCallbacks, magic),
        offset_of!(OAuthValidatorCallbacks, startup_cb),
        offset_of!(OAuthValidatorCallbacks, shutdown_cb),
        offset_of!(OAuthValidatorCallbacks, validate_cb),
        pg_sys::PG_VERSION_NUM as usize,
    ]
}

/// The first difference between the Rust declarations of `libpq/oauth.h` and the header the C
/// shim was built with (the server's), as "field: Rust R, header H"; None when they agree.
pub fn abi_mismatch() -> Option<String> {
    let mut header = [0usize; 14];
    // SAFETY: the shim writes at most the given count of values into the array and returns how
    // many it has.
    let count = unsafe { gprxy_oauth_abi(header.as_mut_ptr(), header.len() as c_int) };
    if usize::try_from(count).ok() != Some(header.len()) {
        return Some(format!("the header has {count} values, the library expects {}", header.len()));
    }
    let rust = rust_abi();
    (0..header.len())
        .find(|&i| rust[i] != header[i])
        .map(|i| format!("{}: library {:#x}, header {:#x}", ABI_FIELDS[i], rust[i], header[i]))
}

/// Refuses to load (ERROR in `_PG_init`) a library whose `libpq/oauth.h` declarations differ
/// from the server headers it was built with: the server would read and write the structs
/// through the other layout.
fn check_abi() {
    if let Some(diff) = abi_mismatch() {
        pgrx::error!("gprxy_validator: built with an OAuth validator ABI other than this server's ({diff}); rebuild it for this server");
    }
}

// The C shim (src/shim.c): MyProcPort is opaque to pgrx.
extern "C" {
    fn gprxy_oauth_abi(out: *mut usize, n: c_int) -> c_int;
    #[cfg(oauth_hba_options)]
    fn gprxy_register_hba_options(state: *mut ValidatorModuleState);
    #[cfg(oauth_hba_options)]
    fn gprxy_hba_option(state: *const ValidatorModuleState, name: *const c_char) -> *const c_char;
    fn gprxy_hba_oauth_issuer() -> *const c_char;
    fn gprxy_hba_oauth_scope() -> *const c_char;
    fn gprxy_hba_oauth_skip_usermap() -> c_int;
    fn gprxy_port_remote_host() -> *const c_char;
    fn gprxy_port_database() -> *const c_char;
    fn gprxy_hba_oauth_issuers_for_role(role: *const c_char) -> *mut c_char;
    fn gprxy_audit(authorized: c_int, line: *const c_char);
    fn gprxy_keep_code_resident(bytes: *mut usize) -> *const c_char;
    fn gprxy_session_timer_probe();
    fn gprxy_session_plan(
        strict: c_int,
        end_at: i64,
        hard_at: i64,
        message: *const c_char,
        audit: *const c_char,
    );
}

/// Hands the session's planned end to the C timer (src/session_end.c), which arms it once the
/// login has succeeded.
fn plan_session_end(end: &login::SessionEnd) {
    let text = |s: &str| CString::new(s.replace('\0', " ")).unwrap_or_default();
    let (message, audit) = (text(&end.message), text(&end.audit));
    // Far-future times are clamped to a year PostgreSQL's timestamps hold.
    let clamp = |t: u64| i64::try_from(t.min(1 << 40)).unwrap_or(1 << 40);
    let strict = c_int::from(end.plan.how == gprxy_core::EndHow::Now);
    let hard_at = match end.plan.how {
        gprxy_core::EndHow::AtIdle { hard_at } => hard_at,
        gprxy_core::EndHow::Now => end.plan.end_at,
    };
    // SAFETY: the strings are NUL-terminated and outlive the call (the shim copies them into
    // TopMemoryContext); the guard turns an ERROR inside (out of memory) into a Rust panic
    // instead of a longjmp across Rust frames.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            gprxy_session_plan(
                strict,
                clamp(end.plan.end_at),
                clamp(hard_at),
                message.as_ptr(),
                audit.as_ptr(),
            )
        })
    }
}

/// The issuers of pg_hba.conf's oauth lines (the file as it reads now, includes followed) whose
/// user column can match `role`; None when the file cannot be read.
pub fn hba_issuers_for_role(role: &str) -> Option<Vec<String>> {
    let role = CString::new(role).ok()?;
    // SAFETY: `role` is NUL-terminated and outlives the call; the shim returns NULL or a string
    // palloc'd in the current memory context, which is copied and freed here once. The guard
    // turns an ERROR inside (out of memory, a catalog error) into a Rust panic instead of a
    // longjmp across Rust frames.
    unsafe {
        let joined = pg_sys::ffi::pg_guard_ffi_boundary(|| gprxy_hba_oauth_issuers_for_role(role.as_ptr()));
        if joined.is_null() {
            return None;
        }
        let text = CStr::from_ptr(joined).to_string_lossy().into_owned();
        pg_sys::pfree(joined.cast());
        Some(text.split('\n').filter(|i| !i.is_empty()).map(str::to_owned).collect())
    }
}

/// Writes the audit line of one login (through the C shim: a plain ereport, which a new backend
/// runs with less code than the ErrorReport machinery).
pub fn audit(line: &str, authorized: bool) {
    // The line quotes what it took from the token and the client; a NUL cannot be in it, but
    // would end the C string early: it becomes a space rather than a lost line.
    let Ok(line) = CString::new(line).or_else(|_| CString::new(line.replace('\0', " "))) else { return };
    // SAFETY: `line` is NUL-terminated and outlives the call; the guard turns an ERROR inside
    // (out of memory while formatting) into a Rust panic instead of a longjmp across Rust frames.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| gprxy_audit(c_int::from(authorized), line.as_ptr())) }
}

#[pg_guard]
unsafe extern "C-unwind" fn startup_cb(state: *mut ValidatorModuleState) {
    // SAFETY: PostgreSQL passes its module state, valid for this call.
    if let Some(state) = unsafe { state.as_mut() } {
        state.private_data = std::ptr::null_mut();
        let built = pg_sys::PG_VERSION_NUM / 10000;
        if u32::try_from(state.sversion / 10000).ok() != Some(built) {
            // PG_MODULE_MAGIC already keeps another major from loading the library.
            pgrx::error!("gprxy_validator was built for PostgreSQL {built}, server is {}", state.sversion);
        }
    }
    #[cfg(oauth_hba_options)]
    if !state.is_null() {
        // SAFETY: called from the startup callback, the only place PostgreSQL allows it, with
        // the server's state; the option names are static. A WARNING inside (an invalid name)
        // returns; an ERROR (out of memory) becomes a Rust panic through the guard.
        unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| gprxy_register_hba_options(state)) };
    }
}

/// The matched pg_hba line's `validator.NAME` (PostgreSQL 19).
#[cfg(oauth_hba_options)]
fn hba_option(state: *const ValidatorModuleState, name: &CStr) -> Option<String> {
    if state.is_null() {
        return None;
    }
    // SAFETY: called during validation with the server's state; the result is NULL or a string
    // in the server's validator memory context, valid for the call, copied before return.
    unsafe { opt_str(pg_sys::ffi::pg_guard_ffi_boundary(|| gprxy_hba_option(state, name.as_ptr()))) }
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown_cb(_state: *mut ValidatorModuleState) {}

/// Validates one bearer token. Returns false only for an internal fault (bad arguments); a
/// refused token is `authorized = false`.
#[pg_guard]
unsafe extern "C-unwind" fn validate_cb(
    state: *const ValidatorModuleState,
    token: *const c_char,
    role: *const c_char,
    result: *mut ValidatorModuleResult,
) -> bool {
    let started = Instant::now();
    if token.is_null() || role.is_null() || result.is_null() {
        return false;
    }
    // SAFETY: PostgreSQL passes NUL-terminated token and role strings valid for this call.
    let (token, role) = unsafe { (CStr::from_ptr(token), CStr::from_ptr(role)) };
    // SAFETY: the shim only reads MyProcPort, which is set for the whole authentication.
    let (issuer, scope, delegated, client, database) = unsafe {
        (
            opt_str(gprxy_hba_oauth_issuer()),
            opt_str(gprxy_hba_oauth_scope()),
            gprxy_hba_oauth_skip_usermap() != 0,
            opt_str(gprxy_port_remote_host()),
            opt_str(gprxy_port_database()),
        )
    };
    #[cfg(oauth_hba_options)]
    let entry = hba_option(state, c"entry");
    #[cfg(not(oauth_hba_options))]
    let entry: Option<String> = {
        let _ = state;
        None
    };
    let token = token.to_str().unwrap_or("");
    let role = std::str::from_utf8(role.to_bytes()).map_or_else(|_| role.to_string_lossy(), Into::into);
    let req = LoginRequest {
        token,
        role: &role,
        hba_issuer: issuer.as_deref(),
        hba_scope: scope.as_deref(),
        hba_entry: entry.as_deref(),
        delegated,
        client: client.as_deref(),
        database: database.as_deref(),
    };
    let outcome = login::decide(&req);
    audit(&login::audit_line(&req, &outcome, started), outcome.authorized);
    if outcome.authorized {
        if let Some(end) = &outcome.session_end {
            plan_session_end(end);
        }
        if let Some(t) = &outcome.token {
            crate::session::set(crate::session::SessionIdentity {
                claims: t.claims.clone(),
                roles: t.roles.clone(),
                subject: t.subject.clone(),
                identity: Some(t.identity.clone()),
            });
        }
    }
    #[cfg(oauth_hba_options)]
    let error_detail = login::error_detail(&outcome).and_then(|d| CString::new(d.replace('\0', " ")).ok());
    let authn_id = outcome.authn_id.and_then(|id| CString::new(id).ok());
    // SAFETY: `result` is PostgreSQL's result struct for this call; pstrdup copies into the
    // current memory context as oauth.h requires ("a palloc'd string").
    unsafe {
        (*result).authorized = outcome.authorized;
        (*result).authn_id = match authn_id {
            Some(id) => pg_sys::pstrdup(id.as_ptr()),
            None => std::ptr::null_mut(),
        };
        #[cfg(oauth_hba_options)]
        {
            // SAFETY: as above; on PostgreSQL 19 the struct has this field (checked at load),
            // and oauth.h allows a palloc'd string.
            (*result).error_detail = match error_detail {
                Some(d) => pg_sys::pstrdup(d.as_ptr()),
                None => std::ptr::null_mut(),
            };
        }
    }
    true
}

// ---------------------------------------------------------------- shared memory

/// Cluster-wide key sets, one slot per issuer.
pub static SHARED: PgLwLock<SharedKeys> =
    // SAFETY: the lock name is unique to this extension.
    unsafe { PgLwLock::new(c"gprxy_jwks") };

// SAFETY: SharedKeys is plain bytes and integers (no pointers), so it may live in shared memory.
unsafe impl pgrx::shmem::PGRXSharedMemory for SharedKeys {}

/// Cluster-wide introspection answers, keyed by a hash of issuer and token.
pub static ANSWERS: PgLwLock<SharedAnswers> =
    // SAFETY: the lock name is unique to this extension.
    unsafe { PgLwLock::new(c"gprxy_introspection") };

// SAFETY: SharedAnswers is plain bytes, booleans and integers (no pointers).
unsafe impl pgrx::shmem::PGRXSharedMemory for SharedAnswers {}

static SHMEM_READY: AtomicBool = AtomicBool::new(false);

/// Whether the shared key store exists (the library was preloaded).
pub fn shmem_ready() -> bool {
    SHMEM_READY.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------- settings

string_check_hook!(check_algorithms, s::check_algorithms);
string_check_hook!(check_token_types, s::check_token_types);
string_check_hook!(check_role_map, s::check_role_map);
string_check_hook!(check_claim, s::check_claim);
string_check_hook!(check_required_claims, s::check_required_claims);
string_check_hook!(check_url, s::check_url);
string_check_hook!(check_file, s::check_file);
string_check_hook!(check_issuers_file, s::check_issuers_file);
string_check_hook!(check_session_policy, s::check_session_policy);
string_check_hook!(check_provision, s::check_provision);

// `gprxy.issuers_file`'s assign hook: its check hook's parse comes into force.
#[pg_guard]
unsafe extern "C-unwind" fn issuers_file_assigned(new: *const c_char, _extra: *mut c_void) {
    // SAFETY: PostgreSQL passes the value being assigned, NULL or NUL-terminated, valid for the
    // call.
    let value = unsafe { opt_str(new) }.unwrap_or_default();
    s::issuers_file_assigned(value.trim());
}

fn no_check(_: &str) -> Result<(), String> {
    Ok(())
}
string_check_hook!(check_none, no_check);

// Every setting's assign hook: the parsed settings are stale.
#[pg_guard]
unsafe extern "C-unwind" fn string_changed(_new: *const c_char, _extra: *mut c_void) {
    s::changed();
}
#[pg_guard]
unsafe extern "C-unwind" fn int_changed(_new: c_int, _extra: *mut c_void) {
    s::changed();
}
#[pg_guard]
unsafe extern "C-unwind" fn bool_changed(_new: bool, _extra: *mut c_void) {
    s::changed();
}

fn define_string(
    name: &'static CStr,
    desc: &'static CStr,
    setting: &'static pgrx::GucSetting<Option<CString>>,
    hook: pg_sys::GucStringCheckHook,
) {
    define_string_in(name, desc, setting, hook, GucContext::Sighup);
}

fn define_string_in(
    name: &'static CStr,
    desc: &'static CStr,
    setting: &'static pgrx::GucSetting<Option<CString>>,
    hook: pg_sys::GucStringCheckHook,
    context: GucContext,
) {
    // SAFETY: the hooks are #[pg_guard]ed; name, description and setting are 'static.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            name,
            desc,
            c"",
            setting,
            context,
            GucFlags::default(),
            hook,
            Some(string_changed),
            None,
        )
    }
}

fn define_int(
    name: &'static CStr,
    desc: &'static CStr,
    setting: &'static pgrx::GucSetting<i32>,
    min: i32,
    max: i32,
    unit: GucFlags,
) {
    // SAFETY: the hook is #[pg_guard]ed; name, description and setting are 'static.
    unsafe {
        GucRegistry::define_int_guc_with_hooks(
            name,
            desc,
            c"",
            setting,
            min,
            max,
            GucContext::Sighup,
            unit,
            None,
            Some(int_changed),
            None,
        )
    }
}

fn define_bool(name: &'static CStr, desc: &'static CStr, setting: &'static pgrx::GucSetting<bool>) {
    // SAFETY: the hook is #[pg_guard]ed; name, description and setting are 'static.
    unsafe {
        GucRegistry::define_bool_guc_with_hooks(
            name,
            desc,
            c"",
            setting,
            GucContext::Sighup,
            GucFlags::default(),
            None,
            Some(bool_changed),
            None,
        )
    }
}

/// `gprxy.resident_code`: at preload, copy the library's code into memory that every backend
/// inherits (src/resident_code.c). Off by default: a DBA does not expect an extension to
/// rewrite the postmaster's code mappings unasked (perf, uprobes and eBPF agents look for the
/// code in the library's file).
static RESIDENT_CODE: pgrx::GucSetting<bool> = pgrx::GucSetting::<bool>::new(false);

/// Defines `gprxy.resident_code`. A postmaster setting can only be defined at preload; loaded
/// later (no preloading) the setting does nothing, and is defined so that a postgresql.conf that
/// names it draws no "invalid configuration parameter" warning at every login.
fn define_resident_code(preloading: bool) {
    GucRegistry::define_bool_guc(
        c"gprxy.resident_code",
        c"At preload, copy the library's code into memory every backend inherits (no page faults per login).",
        c"Needs shared_preload_libraries and transparent huge pages. Off leaves it a file mapping, which perf and uprobes see.",
        &RESIDENT_CODE,
        if preloading { GucContext::Postmaster } else { GucContext::Sighup },
        GucFlags::default(),
    );
}

/// Copies the library's read-only code and constants into memory backends inherit (see
/// src/resident_code.c) and says in the server log what came of it.
fn keep_code_resident() {
    if !RESIDENT_CODE.get() {
        // The default: nothing to say.
        return;
    }
    let mut bytes = 0usize;
    // SAFETY: called from _PG_init in the postmaster while it loads shared_preload_libraries:
    // one thread, no client yet. The shim replaces whole 2 MiB blocks of this library's
    // read-only mappings with byte-identical copies at the same addresses and writes the count.
    let failed = unsafe { gprxy_keep_code_resident(&mut bytes) };
    let kib = bytes / 1024;
    // SAFETY: the shim returns NULL or a static string.
    match unsafe { super::opt_str(failed) } {
        None => pgrx::log!("gprxy_validator: {kib} KiB of code and constants kept in memory backends inherit, in 2 MiB pages"),
        Some(why) if bytes > 0 => pgrx::log!(
            "gprxy_validator: {kib} KiB of code and constants kept in memory backends inherit, then stopped ({why}); backends fault in the rest"
        ),
        Some(why) => pgrx::log!(
            "gprxy_validator: code not kept resident ({why}); each backend faults in the code it runs"
        ),
    }
}

fn define_settings() {
    define_string(
        c"gprxy.audience",
        c"Accepted token audiences (comma-separated); one must be in aud.",
        &s::AUDIENCE,
        Some(check_none),
    );
    define_string(
        c"gprxy.jwks_uri",
        c"JWKS URL; empty: discovery from the pg_hba issuer.",
        &s::JWKS_URI,
        Some(check_url),
    );
    define_string(
        c"gprxy.authn_claim",
        c"Claim (name or dotted path) that is the authenticated identity.",
        &s::AUTHN_CLAIM,
        Some(check_claim),
    );
    define_bool(
        c"gprxy.authn_issuer_qualified",
        c"Identity is issuer#claim instead of the claim alone.",
        &s::AUTHN_ISSUER_QUALIFIED,
    );
    define_string(
        c"gprxy.provision",
        c"Roles from groups in delegated mode: off, create (a person's role at first login) or sync (and kept in step).",
        &s::PROVISION,
        Some(check_provision),
    );
    define_string(
        c"gprxy.provision_prefix",
        c"Put before the identity in a provisioned role's name.",
        &s::PROVISION_PREFIX,
        None,
    );
    define_string(
        c"gprxy.provision_suffix",
        c"Put after the identity in a provisioned role's name.",
        &s::PROVISION_SUFFIX,
        None,
    );
    // The provisioner exists only when the library is preloaded; its settings are read at server
    // start (PostgreSQL refuses to define such settings later).
    // SAFETY: reading a postmaster-set flag during library load.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        define_string_in(
            c"gprxy.provision_role",
            c"The role the provisioner connects as (CREATEROLE, ADMIN on the managed groups); empty: no provisioner.",
            &s::PROVISION_ROLE,
            None,
            GucContext::Postmaster,
        );
        define_string_in(
            c"gprxy.provision_database",
            c"The database the provisioner connects to (where gprxy.provisioned_roles is).",
            &s::PROVISION_DATABASE,
            None,
            GucContext::Postmaster,
        );
    }
    define_int(
        c"gprxy.provision_timeout",
        c"How long a login waits for the provisioner.",
        &s::PROVISION_TIMEOUT,
        100,
        60_000,
        GucFlags::UNIT_MS,
    );
    define_int(
        c"gprxy.provision_recheck",
        c"How long a login that asked for the same roles is answered from shared memory.",
        &s::PROVISION_RECHECK,
        0,
        86_400,
        GucFlags::UNIT_S,
    );
    define_bool(
        c"gprxy.shared_subject_namespace",
        c"Every pg_hba.conf issuer issues one namespace of identities: two with plain identities may reach one role.",
        &s::SHARED_SUBJECT_NAMESPACE,
    );
    define_string(
        c"gprxy.role_claim",
        c"Claim (name or dotted path) listing the user's roles.",
        &s::ROLE_CLAIM,
        Some(check_claim),
    );
    define_string(
        c"gprxy.role_map",
        c"token_role:db_role pairs for delegate_ident_mapping.",
        &s::ROLE_MAP,
        Some(check_role_map),
    );
    define_string(
        c"gprxy.allowed_algorithms",
        c"Signature algorithms accepted (never none or HMAC).",
        &s::ALLOWED_ALGORITHMS,
        Some(check_algorithms),
    );
    define_string(
        c"gprxy.required_scopes",
        c"Scopes every token must grant, besides the pg_hba scope.",
        &s::REQUIRED_SCOPES,
        Some(check_none),
    );
    define_string(
        c"gprxy.required_claims",
        c"Claims every token must carry: claim = value, claim = true, claim in (a | b).",
        &s::REQUIRED_CLAIMS,
        Some(check_required_claims),
    );
    define_bool(
        c"gprxy.require_hba_scopes",
        c"Tokens must grant the pg_hba line's scopes (less openid).",
        &s::REQUIRE_HBA_SCOPES,
    );
    define_string(
        c"gprxy.token_types",
        c"Accepted typ headers: at+jwt, and JWT (also no typ).",
        &s::TOKEN_TYPES,
        Some(check_token_types),
    );
    define_int(
        c"gprxy.leeway",
        c"Allowed clock skew for exp, nbf and iat.",
        &s::LEEWAY,
        0,
        300,
        GucFlags::UNIT_S,
    );
    define_int(
        c"gprxy.jwks_cache_ttl",
        c"JWKS freshness without Cache-Control max-age.",
        &s::JWKS_CACHE_TTL,
        1,
        604_800,
        GucFlags::UNIT_S,
    );
    define_int(
        c"gprxy.jwks_cache_ttl_min",
        c"Lower bound on the JWKS freshness.",
        &s::JWKS_CACHE_TTL_MIN,
        1,
        604_800,
        GucFlags::UNIT_S,
    );
    define_int(
        c"gprxy.jwks_cache_ttl_max",
        c"Upper bound on the JWKS freshness.",
        &s::JWKS_CACHE_TTL_MAX,
        1,
        604_800,
        GucFlags::UNIT_S,
    );
    define_int(
        c"gprxy.jwks_max_staleness",
        c"How long past expiry the last good keys serve during an issuer outage.",
        &s::JWKS_MAX_STALENESS,
        0,
        604_800,
        GucFlags::UNIT_S,
    );
    define_int(
        c"gprxy.jwks_unknown_kid_cooldown",
        c"Least time between refetches caused by unknown kids.",
        &s::JWKS_UNKNOWN_KID_COOLDOWN,
        1,
        3600,
        GucFlags::UNIT_S,
    );
    define_int(
        c"gprxy.jwks_refresh_check_interval",
        c"How often the background worker checks whether keys are due for refresh.",
        &s::JWKS_REFRESH_CHECK_INTERVAL,
        1,
        3600,
        GucFlags::UNIT_S,
    );
    define_int(
        c"gprxy.http_connect_timeout",
        c"Timeout to connect to the issuer.",
        &s::HTTP_CONNECT_TIMEOUT,
        100,
        10_000,
        GucFlags::UNIT_MS,
    );
    define_int(
        c"gprxy.http_read_timeout",
        c"Timeout for the issuer's answer.",
        &s::HTTP_READ_TIMEOUT,
        100,
        20_000,
        GucFlags::UNIT_MS,
    );
    define_int(
        c"gprxy.http_max_body",
        c"Largest discovery or JWKS document accepted.",
        &s::HTTP_MAX_BODY,
        1024,
        crate::shared::JWKS_MAX as i32,
        GucFlags::UNIT_BYTE,
    );
    define_string(
        c"gprxy.ca_file",
        c"PEM CA bundle for a private issuer; empty: public web roots.",
        &s::CA_FILE,
        Some(check_file),
    );
    // SAFETY: the hooks are #[pg_guard]ed; name, description and setting are 'static.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"gprxy.issuers_file",
            c"TOML file of [[issuer]] policies; the pg_hba line's issuer selects one. Empty: the gprxy.* settings.",
            c"",
            &s::ISSUERS_FILE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_issuers_file),
            Some(issuers_file_assigned),
            None,
        )
    };
    define_string(
        c"gprxy.session_policy",
        c"What a token's expiry does to its session: off, idle (ends at the next idle point) or strict (ends at once).",
        &s::SESSION_POLICY,
        Some(check_session_policy),
    );
    define_int(
        c"gprxy.session_grace",
        c"How long after the token's exp a session's end is due.",
        &s::SESSION_GRACE,
        0,
        86_400,
        GucFlags::UNIT_S,
    );
    define_int(
        c"gprxy.session_idle_hard_limit",
        c"With session_policy idle: how long after its end is due a session that never goes idle ends anyway.",
        &s::SESSION_IDLE_HARD_LIMIT,
        0,
        i32::MAX,
        GucFlags::UNIT_S,
    );
    define_int(
        c"gprxy.max_session_age",
        c"The longest a token's session lasts whatever its exp; 0: no limit.",
        &s::MAX_SESSION_AGE,
        0,
        i32::MAX,
        GucFlags::UNIT_S,
    );
    define_bool(
        c"gprxy.insecure_allow_http_loopback",
        c"INSECURE, tests only: allow http:// issuers on loopback.",
        &s::INSECURE_ALLOW_HTTP_LOOPBACK,
    );
    define_bool(
        c"gprxy.insecure_skip_audience",
        c"INSECURE, tests only: accept any audience.",
        &s::INSECURE_SKIP_AUDIENCE,
    );
    // SAFETY: reading a postmaster-set flag during library load.
    define_resident_code(unsafe { pg_sys::process_shared_preload_libraries_in_progress });
    // SAFETY: called once from _PG_init with a static prefix.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"gprxy".as_ptr()) };
}

/// Re-reads postgresql.conf (background worker, after SIGHUP).
pub fn reload_config() {
    // SAFETY: called from the worker's main loop, outside any transaction, as PostgreSQL's own
    // background processes do.
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
}

/// The background worker's entry point.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn gprxy_jwks_worker(_arg: pg_sys::Datum) {
    crate::worker::run();
}

/// Everything `_PG_init` does on PostgreSQL 18 and 19.
pub fn init() {
    check_abi();
    define_settings();
    // SAFETY: reading a postmaster-set flag during library load.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if preloading {
        // SAFETY: a timer created and deleted at once; at worst one LOG line.
        unsafe { gprxy_session_timer_probe() };
        // Parsed once here; every backend forked from the postmaster inherits the parse.
        s::Settings::prepare();
        pg_shmem_init!(SHARED = SharedKeys::default());
        pg_shmem_init!(ANSWERS = SharedAnswers::default());
        super::provision::init_shmem();
        SHMEM_READY.store(true, Ordering::Relaxed);
        BackgroundWorkerBuilder::new("gprxy JWKS refresher")
            .set_type("gprxy JWKS refresher")
            .set_library("gprxy_validator")
            .set_function("gprxy_jwks_worker")
            .enable_shmem_access(None)
            .set_start_time(BgWorkerStartTime::PostmasterStart)
            .set_restart_time(Some(std::time::Duration::from_secs(10)))
            .load();
        super::provision::register_worker();
        keep_code_resident();
    }
}

#[cfg(test)]
mod tests {
    /// The Rust declarations of `libpq/oauth.h` agree with the header of the server the C shim
    /// was built against (what `_PG_init` checks before the server may call in).
    #[test]
    fn the_oauth_abi_declarations_match_the_servers_header() {
        assert_eq!(super::abi_mismatch(), None);
        assert_eq!(super::rust_abi()[0], 0x2025_0220, "PG_OAUTH_VALIDATOR_MAGIC");
    }
}
