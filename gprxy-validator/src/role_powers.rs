//! What a role can do that no grant narrows, and why such a role is never reached through a
//! token's claims (delegated mode's role, a provisioned person's group). Pure: the catalog lookup
//! that fills [`RolePowers`] is `ffi::role`.

/// The attributes of a role that no grant can narrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolePowers {
    pub superuser: bool,
    pub replication: bool,
    pub bypass_rls: bool,
    pub create_role: bool,
    /// A role with such powers that this one is a member of (and so can SET ROLE to).
    pub member_of: Option<String>,
}

/// Why delegated mode refuses to log a token in as `role` (None: it may). A role that is a
/// superuser, or has REPLICATION or BYPASSRLS, is never reached through a token's claims,
/// whatever they say; a role that cannot be looked up is refused too.
pub fn privileged_role(role: &str, powers: Option<RolePowers>) -> Option<String> {
    let Some(p) = powers else {
        return Some(format!("role {role:?} was not found in pg_authid"));
    };
    let what: Vec<&str> = [
        (p.superuser, "SUPERUSER"),
        (p.replication, "REPLICATION"),
        (p.bypass_rls, "BYPASSRLS"),
        (p.create_role, "CREATEROLE"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if !what.is_empty() {
        return Some(format!(
            "role {role:?} has {}: delegated mode never maps a token to such a role",
            what.join(", ")
        ));
    }
    p.member_of.map(|other| {
        format!(
            "role {role:?} is a member of {other:?}, which has powers beyond its grants: delegated mode never maps a token to such a role"
        )
    })
}
