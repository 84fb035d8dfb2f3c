//! The provisioner's unsafe parts (issue #29): its shared memory, waking it, making a backend see
//! the roles it made, its transactions, and its connection as `gprxy.provision_role`.

use std::ffi::CString;

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;

use crate::provision::SharedProvision;
use crate::settings as s;

/// The provisioner's requests, answers and memory of recent logins.
pub static PROVISION: PgLwLock<SharedProvision> =
    // SAFETY: the lock name is unique to this extension.
    unsafe { PgLwLock::new(c"gprxy_provision") };

// SAFETY: SharedProvision is plain bytes, booleans and integers (no pointers).
unsafe impl pgrx::shmem::PGRXSharedMemory for SharedProvision {}

/// Sets up the shared memory (postmaster, at preload).
pub fn init_shmem() {
    pgrx::pg_shmem_init!(PROVISION = SharedProvision::default());
}

/// Registers the provisioner when `gprxy.provision_role` names a role (postmaster, at preload).
pub fn register_worker() {
    if s::PROVISION_ROLE.get().is_none_or(|r| r.as_bytes().is_empty()) {
        return;
    }
    BackgroundWorkerBuilder::new("gprxy provisioner")
        .set_type("gprxy provisioner")
        .set_library("gprxy_validator")
        .set_function("gprxy_provision_worker")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(std::time::Duration::from_secs(5)))
        .load();
}

/// Wakes the worker (its SIGUSR1 handler, PostgreSQL's, sets its latch). False: no such process.
pub fn wake(pid: i32) -> bool {
    // SAFETY: kill(2) sends a signal; no memory is passed. A pid that was reused by another
    // PostgreSQL process of the same server gets a SIGUSR1, which PostgreSQL's handler treats as
    // "check your flags" (harmless).
    unsafe { libc::kill(pid, libc::SIGUSR1) == 0 }
}

/// The OID of role `name` as this backend's catalog cache sees it (None: no such role).
pub fn role_oid(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name alive for the call; missing_ok, so no ERROR for a missing
    // role; the guard turns any other ERROR into a Rust panic. Runs during authentication, where
    // hba.c itself looks roles up.
    let oid = unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| pg_sys::get_role_oid(name.as_ptr(), true)) };
    (oid != pg_sys::InvalidOid).then(|| oid.to_u32())
}

/// This process's id.
pub fn own_pid() -> i32 {
    // SAFETY: a plain integer PostgreSQL sets at process start.
    unsafe { pg_sys::MyProcPid }
}

/// Makes this process see catalog changes other processes committed (a role the provisioner just
/// made, which an earlier lookup here may have cached as missing; a group's powers changed while
/// the provisioner worked).
pub fn accept_invalidations() {
    // SAFETY: both run inside a transaction (during authentication, the one InitPostgres opened;
    // in the provisioner, its own), as any catalog access there does; the guard turns an ERROR
    // into a Rust panic.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            pg_sys::AcceptInvalidationMessages();
            pg_sys::InvalidateCatalogSnapshot();
        })
    }
}

/// Runs `f` in a transaction of its own (the worker): committed when it returns `Ok(Ok(_))`,
/// rolled back otherwise. An ERROR inside comes back as `Err` with its message, the transaction
/// rolled back.
pub fn in_transaction<T, E>(
    f: impl FnOnce() -> Result<T, E> + std::panic::UnwindSafe,
) -> Result<Result<T, E>, String> {
    // SAFETY: the worker calls this from its main loop, outside any transaction, as PostgreSQL's
    // own background workers do (worker_spi); a snapshot is pushed for the SPI queries.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let outcome = PgTryBuilder::new(|| Ok(f()))
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::PostgresError(r)
            | pg_sys::panic::CaughtError::ErrorReport(r)
            | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => Err(r.message().to_owned()),
        })
        .execute();
    match outcome {
        Ok(Ok(v)) => {
            // SAFETY: the transaction and snapshot started above, ended once.
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Ok(Ok(v))
        }
        other => {
            // SAFETY: aborting the transaction started above (also after a caught ERROR, whose
            // state the abort cleans up, the active snapshot included).
            unsafe { pg_sys::AbortCurrentTransaction() };
            other
        }
    }
}

/// The provisioner's entry point: connects to `gprxy.provision_database` as
/// `gprxy.provision_role` (which needs no LOGIN), then serves.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn gprxy_provision_worker(_arg: pg_sys::Datum) {
    use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let text = |v: Option<CString>| v.unwrap_or_default();
    let (db, role) = (text(s::PROVISION_DATABASE.get()), text(s::PROVISION_ROLE.get()));
    // SAFETY: NUL-terminated names alive for the call; the flag lets a NOLOGIN role connect (no
    // one can log in as the provisioner). PostgreSQL reports a missing database or role as FATAL
    // and restarts the worker after its restart time.
    unsafe {
        pg_sys::BackgroundWorkerInitializeConnection(
            db.as_ptr(),
            role.as_ptr(),
            pg_sys::BGWORKER_BYPASS_ROLELOGINCHECK,
        );
    }
    crate::provision::serve();
    // Exit code 1: PostgreSQL starts it again after its restart time (0 would retire it), so a
    // provisioner ended by pg_terminate_backend comes back; at shutdown nothing restarts.
    // SAFETY: ends this worker process, as PostgreSQL's own workers do.
    unsafe { pg_sys::proc_exit(1) };
}
