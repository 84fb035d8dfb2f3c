//! The only unsafe code of gprxy: what the extension reads from PostgreSQL's C structures, and
//! (PostgreSQL 18) the OAuth validator ABI, GUCs, shared memory and the background worker.

use std::ffi::{c_char, c_int, CStr, CString};

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

/// Copies a C string that may be NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn opt_str(p: *const c_char) -> Option<String> {
    // SAFETY: guaranteed by the caller.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
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
