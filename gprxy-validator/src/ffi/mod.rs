//! The only unsafe code of gprxy: what the extension reads from PostgreSQL's C structures, and
//! (PostgreSQL 18) the OAuth validator ABI, GUCs, shared memory and the background worker.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry};

/// A GUC check hook for a string setting: `$check` (a pure function, unit-tested) decides, and
/// its message becomes the refusal's detail.
macro_rules! string_check_hook {
    ($name:ident, $check:path) => {
        #[pg_guard]
        unsafe extern "C-unwind" fn $name(
            newval: *mut *mut c_char,
            _extra: *mut *mut c_void,
            _source: pg_sys::GucSource::Type,
        ) -> bool {
            // SAFETY: PostgreSQL passes a pointer to the candidate value, which may be NULL.
            let value = unsafe { opt_str((*newval).cast_const()) }.unwrap_or_default();
            match $check(value.trim()) {
                Ok(()) => true,
                Err(msg) => {
                    check_detail(&msg);
                    false
                }
            }
        }
    };
}

#[cfg(feature = "pg18")]
mod provision;
#[cfg(feature = "pg18")]
pub use provision::*;
#[cfg(feature = "pg18")]
mod role;
#[cfg(feature = "pg18")]
pub use role::role_powers;
#[cfg(feature = "pg18")]
mod validator;
#[cfg(feature = "pg18")]
pub use validator::*;

// The C shim (src/shim.c): MyProcPort is opaque to pgrx.
extern "C" {
    fn gprxy_startup_parameter(name: *const c_char, count: *mut c_int) -> *const c_char;
}

// A session's end (src/session_end.c).
extern "C" {
    fn gprxy_session_hooks_install();
    fn gprxy_session_bind(strict: c_int, end_at: i64, hard_at: i64, message: *const c_char);
    fn gprxy_session_unbind();
}

/// Installs the statement, function-call and commit checks of a session's end (they do nothing
/// for a session without one). Called once, from `_PG_init`.
pub fn install_session_hooks() {
    // SAFETY: called once from _PG_init; the hooks chain to the ones installed before.
    unsafe { gprxy_session_hooks_install() };
}

/// Fallback mode: the signed context's end is checked from now on in this backend.
pub fn bind_session_end(end: &gprxy_core::context::ContextEnd) {
    let message = CString::new(end.message.replace('\0', " ")).unwrap_or_default();
    // Far-future times are clamped to a year PostgreSQL's timestamps hold.
    let clamp = |t: u64| i64::try_from(t.min(1 << 40)).unwrap_or(1 << 40);
    // SAFETY: the string is NUL-terminated and outlives the call (the C side copies it into
    // TopMemoryContext); the guard turns an ERROR inside (out of memory) into a Rust panic
    // instead of a longjmp across Rust frames.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            gprxy_session_bind(c_int::from(end.strict), clamp(end.at), clamp(end.hard_at), message.as_ptr())
        })
    }
}

/// Fallback mode: the pooled session ended (its context was reset); nothing is checked.
pub fn unbind_session_end() {
    // SAFETY: only clears a flag in the C side's static state.
    unsafe { gprxy_session_unbind() };
}

/// Copies a C string that may be NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn opt_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    let c = unsafe { CStr::from_ptr(p) };
    Some(c.to_str().map_or_else(|_| c.to_string_lossy().into_owned(), str::to_owned))
}

/// A parameter exactly as the client's startup packet gave it (not the GUC, which a placeholder
/// SET could have changed), with how many times the packet named it.
pub fn startup_parameter(name: &str) -> (Option<String>, usize) {
    let Ok(name) = CString::new(name) else { return (None, 0) };
    let mut count: c_int = 0;
    // SAFETY: `name` is NUL-terminated and outlives the call; the shim writes `count` and
    // returns NULL or a string in MyProcPort->guc_options, which lives in TopMemoryContext for
    // the whole backend; it is copied before return.
    let value = unsafe { opt_str(gprxy_startup_parameter(name.as_ptr(), &mut count)) };
    (value, usize::try_from(count).unwrap_or(0))
}

/// The name of `session_user` (the role that logged in; SET ROLE and SECURITY DEFINER do not
/// change it).
pub fn session_user() -> Option<String> {
    // SAFETY: called from a SQL function, inside a transaction, so the syscache lookup is
    // allowed; with noerr the result is NULL or a palloc'd copy, read before return.
    unsafe { opt_str(pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), true)) }
}

/// This backend's process id.
pub fn backend_pid() -> i32 {
    // SAFETY: MyProcPid is set once at backend start and only read afterwards.
    unsafe { pg_sys::MyProcPid }
}

/// Sets the detail of a refused GUC value.
pub(crate) fn check_detail(msg: &str) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: GUC_check_errdetail_string is read by the GUC machinery after the hook returns;
    // pstrdup gives it a palloc'd copy.
    unsafe {
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(msg.as_ptr());
    }
}

string_check_hook!(check_context_keys, crate::session::check_context_keys);
string_check_hook!(check_context_roles, crate::session::check_context_roles);

/// The signed context's settings, on every server version: the trust anchor is
/// postgresql.conf's (PGC_SIGHUP: no client, SET or ALTER ROLE can change it).
pub fn define_context_settings() {
    use crate::session::{CONTEXT_KEYS, CONTEXT_NONCE, CONTEXT_ROLES};
    // SAFETY: the hooks are #[pg_guard]ed; names, descriptions and settings are 'static.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"gprxy.context_keys",
            c"Public keys (base64 Ed25519, at most two) of gprxy's signed session context.",
            c"",
            &CONTEXT_KEYS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_context_keys),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"gprxy.context_roles",
            c"Session users that may call gprxy.set_context (comma-separated).",
            c"",
            &CONTEXT_ROLES,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_context_roles),
            None,
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"gprxy.context_nonce",
        c"Nonce of gprxy's signed session context (startup packet only).",
        c"",
        &CONTEXT_NONCE,
        GucContext::Backend,
        GucFlags::default(),
    );
}
