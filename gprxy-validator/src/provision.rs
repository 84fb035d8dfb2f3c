//! Roles from groups (issue #29), the validator's side. Authentication runs before a backend can
//! write the catalog, so a login hands the work to the provisioner: a background worker connected
//! to `gprxy.provision_database` as `gprxy.provision_role` (a role with `CREATEROLE` and ADMIN on
//! the managed group roles, never a superuser unless the DBA makes it one). The login writes its
//! request into a slot in shared memory, wakes the worker, and waits for its answer under
//! `gprxy.provision_timeout`; no answer refuses the login (`provision_unavailable`). The worker
//! does each request in one transaction, so a failed one leaves nothing half-made. A login that
//! asked for the same thing within `gprxy.provision_recheck` is answered from shared memory.

use std::time::{Duration, Instant};

use gprxy_core::provision::{plan, quote_ident, Action, Existing, Login, ProvisionMode};
use pgrx::spi::Spi;

use crate::ffi::PROVISION;
use crate::role_powers::privileged_role;
use crate::settings::Settings;

/// Requests in flight at once (logins beyond wait for a free slot, inside their bound).
pub const SLOTS: usize = 8;
const NAME: usize = 64;
const TEXT: usize = 512;
/// Groups one request can name.
pub const GROUPS: usize = 16;
const CODE: usize = 48;
const DETAIL: usize = 256;
/// Logins remembered as provisioned.
pub const REMEMBERED: usize = 512;

/// A string of at most `N` bytes in shared memory.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Fixed<const N: usize> {
    len: u16,
    bytes: [u8; N],
}

impl<const N: usize> Fixed<N> {
    const EMPTY: Self = Self { len: 0, bytes: [0; N] };

    /// None when `s` does not fit.
    fn new(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() > N {
            return None;
        }
        let mut bytes = [0; N];
        bytes[..b.len()].copy_from_slice(b);
        Some(Self { len: u16::try_from(b.len()).ok()?, bytes })
    }

    /// Cut at `N` bytes (on a character boundary).
    fn cut(s: &str) -> Self {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Self::new(&s[..end]).unwrap_or(Self::EMPTY)
    }

    fn get(&self) -> String {
        String::from_utf8_lossy(&self.bytes[..usize::from(self.len).min(N)]).into_owned()
    }
}

const FREE: u8 = 0;
const PENDING: u8 = 1;
const WORKING: u8 = 2;
const DONE: u8 = 3;
/// The login gave up waiting; the worker frees the slot when it is done.
const ABANDONED: u8 = 4;

/// One login's request and the worker's answer.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Slot {
    state: u8,
    id: u64,
    sync: bool,
    role: Fixed<NAME>,
    issuer: Fixed<TEXT>,
    identity: Fixed<TEXT>,
    entry: Option<Fixed<NAME>>,
    wanted: [Fixed<NAME>; GROUPS],
    wanted_n: u8,
    ok: bool,
    oid: u32,
    code: Fixed<CODE>,
    detail: Fixed<DETAIL>,
    taken_at_ms: u64,
}

impl Slot {
    const EMPTY: Slot = Slot {
        state: FREE,
        id: 0,
        sync: false,
        role: Fixed::EMPTY,
        issuer: Fixed::EMPTY,
        identity: Fixed::EMPTY,
        entry: None,
        wanted: [Fixed::EMPTY; GROUPS],
        wanted_n: 0,
        ok: false,
        oid: 0,
        code: Fixed::EMPTY,
        detail: Fixed::EMPTY,
        taken_at_ms: 0,
    };
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Remembered {
    key: [u8; 32],
    at_ms: u64,
    /// The role's OID when it was provisioned: a role of the same name made since is another.
    oid: u32,
}

/// The provisioner's shared memory: the worker's process id (0: not running), the request
/// slots, and what was provisioned lately.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct SharedProvision {
    worker_pid: i32,
    next_id: u64,
    slots: [Slot; SLOTS],
    remembered: [Remembered; REMEMBERED],
}

impl Default for SharedProvision {
    fn default() -> Self {
        Self {
            worker_pid: 0,
            next_id: 1,
            slots: [Slot::EMPTY; SLOTS],
            remembered: [Remembered { key: [0; 32], at_ms: 0, oid: 0 }; REMEMBERED],
        }
    }
}

fn now_ms() -> u64 {
    u64::try_from(gprxy_core::unix_time()).unwrap_or(0).saturating_mul(1000)
}

/// What one login asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub mode: ProvisionMode,
    pub role: String,
    pub issuer: String,
    pub identity: String,
    /// The issuers-file entry the pg_hba line named (PostgreSQL 19's `validator.entry`).
    pub entry: Option<String>,
    /// The managed groups the token names (after the role map).
    pub wanted: Vec<String>,
}

impl Request {
    fn key(&self) -> [u8; 32] {
        let mut wanted = self.wanted.clone();
        wanted.sort();
        let text = format!(
            "{}\0{}\0{}\0{}\0{}",
            self.mode.name(),
            self.role,
            self.issuer,
            self.identity,
            wanted.join("\0")
        );
        gprxy_core::introspect::cache_key("provision", &text)
    }
}

/// Why a login's provisioning failed: the audit reason and its detail.
pub type Refused = (&'static str, String);

/// Whether `req` was provisioned within `recheck` (a shared-memory lookup).
pub fn remembered(req: &Request, recheck: Duration) -> bool {
    if !crate::ffi::shmem_ready() {
        return false;
    }
    let key = req.key();
    let recheck_ms = u64::try_from(recheck.as_millis()).unwrap_or(u64::MAX);
    let now = now_ms();
    let oid = PROVISION
        .share()
        .remembered
        .iter()
        .find(|r| r.key == key && r.at_ms.saturating_add(recheck_ms) > now)
        .map(|r| r.oid);
    let Some(oid) = oid else { return false };
    // Another backend's request may have made the role moments ago, and this one may have looked
    // the name up (pg_hba.conf matching) and cached it as missing.
    crate::ffi::accept_invalidations();
    // The very role provisioned then: one dropped and made again by hand since is not gprxy's.
    crate::ffi::role_oid(&req.role) == Some(oid)
}

/// Asks the provisioner for `req` and waits for its answer (backends, during authentication,
/// after [`remembered`] said no).
pub fn request(req: &Request, timeout: Duration) -> Result<(), Refused> {
    let unavailable = |d: &str| ("provision_unavailable", d.to_owned());
    if !crate::ffi::shmem_ready() {
        return Err(unavailable("gprxy_validator is not in shared_preload_libraries: no provisioner"));
    }
    // The caller asked `remembered` first: this is a login that changes something.
    let key = req.key();
    let too_long = |what: &str| ("provision_refused", format!("the {what} is too long to provision"));
    let role = Fixed::new(&req.role).ok_or_else(|| too_long("role name"))?;
    let issuer = Fixed::new(&req.issuer).ok_or_else(|| too_long("issuer"))?;
    let identity = Fixed::new(&req.identity).ok_or_else(|| too_long("identity"))?;
    let entry = match &req.entry {
        Some(e) => Some(Fixed::new(e).ok_or_else(|| too_long("entry name"))?),
        None => None,
    };
    if req.wanted.len() > GROUPS {
        return Err(too_long("list of groups"));
    }
    let mut wanted = [Fixed::EMPTY; GROUPS];
    for (w, g) in wanted.iter_mut().zip(&req.wanted) {
        *w = Fixed::new(g).ok_or_else(|| too_long("group name"))?;
    }
    let deadline = Instant::now() + timeout;
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    // A slot, waiting for one inside the bound.
    let (index, id, pid) = loop {
        {
            let mut shared = PROVISION.exclusive();
            let pid = shared.worker_pid;
            if pid == 0 {
                return Err(unavailable("the provisioner is not running (gprxy.provision_role, server log)"));
            }
            let now = now_ms();
            let free = shared.slots.iter().position(|s| {
                s.state == FREE
                    || (s.state == PENDING
                        && s.taken_at_ms.saturating_add(timeout_ms.saturating_mul(2)) < now)
            });
            if let Some(i) = free {
                let id = shared.next_id;
                shared.next_id += 1;
                shared.slots[i] = Slot {
                    state: PENDING,
                    id,
                    sync: req.mode == ProvisionMode::Sync,
                    role,
                    issuer,
                    identity,
                    entry,
                    wanted,
                    wanted_n: u8::try_from(req.wanted.len()).unwrap_or(0),
                    taken_at_ms: now,
                    ..Slot::EMPTY
                };
                break (i, id, pid);
            }
        }
        if Instant::now() >= deadline {
            return Err(unavailable("every provisioner slot stayed busy"));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if !crate::ffi::wake(pid) {
        let mut shared = PROVISION.exclusive();
        if shared.slots[index].id == id {
            shared.slots[index].state = FREE;
        }
        shared.worker_pid = 0;
        return Err(unavailable("the provisioner is not running (gprxy.provision_role, server log)"));
    }
    let mut pause = Duration::from_micros(500);
    loop {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
        let answer = {
            let mut shared = PROVISION.exclusive();
            let slot = &mut shared.slots[index];
            if slot.id != id {
                return Err(unavailable("the request was lost"));
            }
            if slot.state == DONE {
                let answer = (slot.ok, slot.code.get(), slot.detail.get(), slot.oid);
                slot.state = FREE;
                Some(answer)
            } else if Instant::now() >= deadline {
                slot.state = if slot.state == WORKING { ABANDONED } else { FREE };
                return Err(unavailable(&format!(
                    "no answer from the provisioner within gprxy.provision_timeout ({} ms)",
                    timeout.as_millis()
                )));
            } else {
                None
            }
        };
        if let Some((ok, code, detail, oid)) = answer {
            if !ok {
                return Err((static_code(&code), detail));
            }
            remember(key, oid);
            crate::ffi::accept_invalidations();
            return Ok(());
        }
    }
}

fn static_code(code: &str) -> &'static str {
    match code {
        "provision_collision" => "provision_collision",
        "provision_other_identity" => "provision_other_identity",
        "provision_privileged_group" => "provision_privileged_group",
        _ => "provision_failed",
    }
}

fn remember(key: [u8; 32], oid: u32) {
    let mut shared = PROVISION.exclusive();
    let now = now_ms();
    let i = shared
        .remembered
        .iter()
        .position(|r| r.key == key)
        .unwrap_or_else(|| (0..REMEMBERED).min_by_key(|&i| shared.remembered[i].at_ms).unwrap_or(0));
    shared.remembered[i] = Remembered { key, at_ms: now, oid };
}

/// Forgets what was provisioned lately (the worker, after a reload: the policy may differ).
fn forget_all() {
    PROVISION.exclusive().remembered.iter_mut().for_each(|r| r.at_ms = 0);
}

// ------------------------------------------------------------------------------ the worker

/// The provisioner's main loop (after it connected): takes pending requests, one transaction
/// each, answers them, and sleeps until a login wakes it.
pub fn serve() {
    use pgrx::bgworkers::BackgroundWorker;
    PROVISION.exclusive().worker_pid = crate::ffi::own_pid();
    let mut refused = refuse_privileged_groups();
    pgrx::log!("gprxy: provisioner ready");
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(10))) {
        if BackgroundWorker::sighup_received() {
            crate::ffi::reload_config();
            forget_all();
            refused = refuse_privileged_groups();
        }
        while let Some((index, id, req)) = take_pending() {
            let outcome = crate::ffi::in_transaction(|| provision(&req, &refused));
            let (ok, oid, code, detail) = match outcome {
                Ok(Ok(oid)) => (true, oid, "ok".to_owned(), String::new()),
                Ok(Err((code, detail))) => (false, 0, code.to_owned(), detail),
                Err(error) => (false, 0, "provision_failed".to_owned(), error),
            };
            if !ok {
                pgrx::log!(
                    "gprxy: provision refused reason={code} role={} issuer={} identity={} detail={}",
                    q(&req.role),
                    q(&req.issuer),
                    q(&req.identity),
                    q(&detail)
                );
            }
            let mut shared = PROVISION.exclusive();
            let slot = &mut shared.slots[index];
            if slot.id == id {
                if slot.state == ABANDONED {
                    slot.state = FREE;
                } else {
                    slot.ok = ok;
                    slot.oid = oid;
                    slot.code = Fixed::cut(&code);
                    slot.detail = Fixed::cut(&detail);
                    slot.state = DONE;
                }
            }
        }
    }
    PROVISION.exclusive().worker_pid = 0;
    pgrx::log!("gprxy: provisioner stopped");
}

/// The managed groups refused when the provisioner read the settings (at its start and at each
/// reload): a role map target with powers beyond its grants (SUPERUSER, REPLICATION, BYPASSRLS,
/// CREATEROLE, a server-program or server-file role, or a member of such a role) is never granted, whatever its powers later, until
/// the DBA changes it and reloads. One line each in the server log; a target that does not exist
/// yet is named too (a login whose groups map to it is refused until it is made).
/// When the catalog cannot be read, every managed group is refused (`provision_failed`) until
/// the next reload: fail closed.
fn refuse_privileged_groups() -> Vec<RefusedGroup> {
    let Ok(settings) = Settings::current() else {
        // Every request is refused with the settings' error; nothing to check.
        return Vec::new();
    };
    let groups = settings.provisioned_groups();
    if groups.is_empty() {
        return Vec::new();
    }
    let checked = crate::ffi::in_transaction(|| {
        let mut refused = Vec::new();
        for g in &groups {
            match crate::ffi::role_powers(g.group) {
                None => pgrx::log!(
                    "gprxy: provision group={} (mapped from {} by {}) does not exist yet: logins whose groups map to it are refused until it is made",
                    q(g.group),
                    q(g.from),
                    g.place
                ),
                Some(powers) => {
                    if let Some(why) = privileged_role(g.group, Some(powers)) {
                        pgrx::log!(
                            "gprxy: provision refused at load group={} (mapped from {} by {}): {why}; it is never granted until it is changed and the settings reloaded",
                            q(g.group),
                            q(g.from),
                            g.place
                        );
                        refused.push(RefusedGroup {
                            group: g.group.to_owned(),
                            code: "provision_privileged_group",
                            why,
                        });
                    }
                }
            }
        }
        Ok::<_, ()>(refused)
    });
    match checked {
        Ok(Ok(refused)) => refused,
        Ok(Err(())) => Vec::new(),
        Err(error) => {
            // The catalog could not be read: refuse every managed group (fail closed).
            pgrx::log!("gprxy: provision could not check the managed groups at load: {error}; all are refused until the next reload");
            groups
                .iter()
                .map(|g| RefusedGroup {
                    group: g.group.to_owned(),
                    code: "provision_failed",
                    why: format!("the check at load failed: {error}"),
                })
                .collect()
        }
    }
}

/// A managed group the provisioner refused when it read the settings.
struct RefusedGroup {
    group: String,
    /// The login's reason.
    code: &'static str,
    why: String,
}

fn take_pending() -> Option<(usize, u64, Request)> {
    let mut shared = PROVISION.exclusive();
    let i = shared.slots.iter().position(|s| s.state == PENDING)?;
    let slot = &mut shared.slots[i];
    slot.state = WORKING;
    let req = Request {
        mode: if slot.sync { ProvisionMode::Sync } else { ProvisionMode::Create },
        role: slot.role.get(),
        issuer: slot.issuer.get(),
        identity: slot.identity.get(),
        entry: slot.entry.as_ref().map(Fixed::get),
        wanted: slot.wanted[..usize::from(slot.wanted_n).min(GROUPS)].iter().map(Fixed::get).collect(),
    };
    Some((i, slot.id, req))
}

fn q(v: &str) -> gprxy_core::Quoted {
    gprxy_core::Quoted::new(v)
}

/// One request, inside the worker's transaction: reads what the catalog and gprxy's record say,
/// plans with gprxy-core and carries the plan out, one audit line per change. Returns the role's
/// OID. Every query names pg_catalog's objects, under a search_path of pg_catalog and pg_temp
/// only: a function a user planted in a schema of the default path never runs as the provisioner.
fn provision(req: &Request, refused_at_load: &[RefusedGroup]) -> Result<u32, Refused> {
    let failed = |e: pgrx::spi::Error| ("provision_failed", format!("catalog: {e}"));
    Spi::run("SET LOCAL search_path = pg_catalog, pg_temp").map_err(failed)?;
    let settings = Settings::current().map_err(|e| ("provision_failed", crate::settings::describe(&e)))?;
    // The worker's own view of the policy decides what is managed, not the request's.
    let managed: Vec<String> = {
        let mut m: Vec<String> =
            settings.role_map(&req.issuer, req.entry.as_deref()).iter().map(|(_, to)| to.clone()).collect();
        m.sort();
        m.dedup();
        m
    };
    if let Some(r) = refused_at_load.iter().find(|r| req.wanted.contains(&r.group)) {
        return Err((
            r.code,
            format!("group {:?} was refused when the provisioner read the settings: {}", r.group, r.why),
        ));
    }
    let role_oid = |name: &str| {
        Spi::get_one_with_args::<i64>(
            "SELECT oid::pg_catalog.int8 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) $1",
            &[name.into()],
        )
        .or_else(|e| match e {
            pgrx::spi::Error::InvalidPosition => Ok(None),
            e => Err(e),
        })
        .map_err(failed)
    };
    let current = role_oid(&req.role)?;
    let (issuer, identity, recorded) = Spi::get_three_with_args::<String, String, i64>(
        "SELECT issuer, identity, role_oid::pg_catalog.int8 FROM gprxy.provisioned_roles \
         WHERE role OPERATOR(pg_catalog.=) $1",
        &[req.role.as_str().into()],
    )
    .or_else(|e| match e {
        pgrx::spi::Error::InvalidPosition => Ok((None, None, None)),
        e => Err(e),
    })
    .map_err(failed)?;
    let member_of = Spi::get_one_with_args::<Vec<String>>(
        "SELECT pg_catalog.array_agg(g.rolname::pg_catalog.text) FROM pg_catalog.pg_auth_members m \
         JOIN pg_catalog.pg_roles g ON g.oid OPERATOR(pg_catalog.=) m.roleid \
         JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) m.member \
         WHERE r.rolname OPERATOR(pg_catalog.=) $1 AND m.grantor OPERATOR(pg_catalog.=) \
         (SELECT oid FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) CURRENT_USER)",
        &[req.role.as_str().into()],
    )
    .map_err(failed)?
    .unwrap_or_default();
    // gprxy's record counts only for the very role it made (its OID): a role dropped and made
    // again by hand under the same name is not gprxy's.
    let ours = current.is_some() && recorded == current;
    let existing = Existing {
        exists: current.is_some(),
        created_for: if ours { issuer.zip(identity) } else { None },
        member_of,
    };
    let login = Login {
        mode: req.mode,
        role: &req.role,
        issuer: &req.issuer,
        identity: &req.identity,
        wanted: &req.wanted,
    };
    let actions = plan(&login, &managed, &existing, settings.shared_subject_namespace)
        .map_err(|r| (r.code(), r.to_string()))?;
    // Each group's powers now, in this transaction, right before it is granted: the login's
    // check was made in its backend before the request was queued, and the verdict at load
    // covers only what was privileged then; a group given powers since is not granted.
    crate::ffi::accept_invalidations();
    for action in &actions {
        if let Action::Grant(g) = action {
            if let Some(why) = privileged_role(g, crate::ffi::role_powers(g)) {
                return Err(("provision_privileged_group", why));
            }
        }
    }
    let role = quote_ident(&req.role);
    for action in &actions {
        let (sql, what, group) = match action {
            Action::Create => (format!("CREATE ROLE {role} LOGIN"), "create", None),
            Action::Grant(g) => (format!("GRANT {} TO {role}", quote_ident(g)), "grant", Some(g)),
            Action::Revoke(g) => (format!("REVOKE {} FROM {role}", quote_ident(g)), "revoke", Some(g)),
        };
        Spi::run(&sql).map_err(failed)?;
        if *action == Action::Create {
            Spi::run_with_args(
                "INSERT INTO gprxy.provisioned_roles (role, role_oid, issuer, identity) \
                 SELECT $1, oid, $2, $3 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) $1 \
                 ON CONFLICT (role) DO UPDATE SET role_oid = excluded.role_oid, issuer = $2, identity = $3, \
                 created_at = pg_catalog.now(), last_login = pg_catalog.now()",
                &[req.role.as_str().into(), req.issuer.as_str().into(), req.identity.as_str().into()],
            )
            .map_err(failed)?;
        }
        pgrx::log!(
            "gprxy: provision action={what} role={}{} issuer={} identity={} mode={}",
            q(&req.role),
            group.map(|g| format!(" group={}", q(g))).unwrap_or_default(),
            q(&req.issuer),
            q(&req.identity),
            req.mode.name()
        );
    }
    Spi::run_with_args(
        "UPDATE gprxy.provisioned_roles SET last_login = pg_catalog.now() WHERE role OPERATOR(pg_catalog.=) $1",
        &[req.role.as_str().into()],
    )
    .map_err(failed)?;
    let oid = role_oid(&req.role)?.ok_or(("provision_failed", "the role vanished".to_owned()))?;
    u32::try_from(oid).map_err(|_| ("provision_failed", "an OID out of range".to_owned()))
}
