//! What a database role may do beyond its grants, from pg_authid (PostgreSQL 18, during login).

use std::ffi::CString;

use pgrx::pg_sys;

use crate::role_powers::RolePowers;

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
    let (oid, mut powers) = unsafe {
        let form = pg_sys::GETSTRUCT(tuple).cast::<pg_sys::FormData_pg_authid>();
        (
            (*form).oid,
            RolePowers {
                superuser: (*form).rolsuper,
                replication: (*form).rolreplication,
                bypass_rls: (*form).rolbypassrls,
                create_role: (*form).rolcreaterole,
                server_role: false,
                member_of: None,
            },
        )
    };
    // SAFETY: `tuple` came from SearchSysCache1 above and is released once.
    unsafe { pg_sys::ReleaseSysCache(tuple) };
    powers.server_role = SERVER_ROLES.contains(&oid.to_u32());
    powers.member_of = powerful_role_reached(oid);
    Some(powers)
}

/// PostgreSQL's roles that read or write the server's files or run programs on it: a superuser's
/// powers in all but name.
const SERVER_ROLES: [u32; 3] = [
    pg_sys::ROLE_PG_EXECUTE_SERVER_PROGRAM,
    pg_sys::ROLE_PG_READ_SERVER_FILES,
    pg_sys::ROLE_PG_WRITE_SERVER_FILES,
];

/// The first role other than `member` that has powers beyond its grants (SUPERUSER, REPLICATION,
/// BYPASSRLS, CREATEROLE, or the server-file and server-program roles) and that `member` belongs
/// to, directly or through other roles, whatever their INHERIT setting (SET ROLE reaches it).
fn powerful_role_reached(member: pg_sys::Oid) -> Option<String> {
    let mut found = None;
    // SAFETY: a heap scan of pg_authid (a shared catalog, readable during authentication as the
    // syscache lookup above is) with no keys and the catalog snapshot; every tuple starts with
    // FormData_pg_authid (fixed fields never NULL) and is read before the next getnext; the scan
    // and the relation are closed once, in reverse order. pgrx turns an ERROR into a panic.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::AuthIdRelationId, pg_sys::AccessShareLock as _);
        let scan = pg_sys::systable_beginscan(
            rel,
            pg_sys::InvalidOid,
            false,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        );
        loop {
            let tuple = pg_sys::systable_getnext(scan);
            if tuple.is_null() {
                break;
            }
            let form = pg_sys::GETSTRUCT(tuple).cast::<pg_sys::FormData_pg_authid>();
            let oid = (*form).oid;
            let powerful = (*form).rolsuper
                || (*form).rolreplication
                || (*form).rolbypassrls
                || (*form).rolcreaterole
                || SERVER_ROLES.contains(&oid.to_u32());
            if oid != member && powerful && pg_sys::is_member_of_role_nosuper(member, oid) {
                let name = std::ffi::CStr::from_ptr((*form).rolname.data.as_ptr());
                found = Some(name.to_string_lossy().into_owned());
                break;
            }
        }
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as _);
    }
    found
}
