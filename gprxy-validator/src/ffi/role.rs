//! What a database role may do beyond its grants, from pg_authid (PostgreSQL 18, during login).

use std::ffi::CString;

use pgrx::pg_sys;

use crate::login::RolePowers;

/// Looks `role` up in pg_authid through the syscache. pg_authid is a shared catalog, readable
/// during authentication (InitPostgres has started a transaction by then, as hba.c's own role
/// lookups need). None: no such role (or a name PostgreSQL cannot hold).
pub fn role_powers(role: &str) -> Option<RolePowers> {
    let name = CString::new(role).ok()?;
    // SAFETY: AUTHNAME's key is a name; the catcache hashes and compares it as a C string, which
    // `name` is, alive for the call. pgrx turns an ERROR inside into a Rust panic.
    let tuple = unsafe {
        pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::AUTHNAME as _, pg_sys::Datum::from(name.as_ptr()))
    };
    if tuple.is_null() {
        return None;
    }
    // SAFETY: a pg_authid tuple from the syscache starts with FormData_pg_authid, whose fixed
    // fields (up to rolbypassrls) are never NULL; the tuple stays valid until it is released.
    let powers = unsafe {
        let form = pg_sys::GETSTRUCT(tuple).cast::<pg_sys::FormData_pg_authid>();
        RolePowers {
            superuser: (*form).rolsuper,
            replication: (*form).rolreplication,
            bypass_rls: (*form).rolbypassrls,
        }
    };
    // SAFETY: `tuple` came from SearchSysCache1 above and is released once.
    unsafe { pg_sys::ReleaseSysCache(tuple) };
    Some(powers)
}
