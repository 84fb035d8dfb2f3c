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
    /// It is itself one of PostgreSQL's server-file or server-program roles
    /// (`pg_execute_server_program`, `pg_read_server_files`, `pg_write_server_files`).
    pub server_role: bool,
    /// A role with such powers that this one is a member of (and so can SET ROLE to).
    pub member_of: Option<String>,
}

#[cfg(test)]
impl RolePowers {
    /// A role with no power beyond its grants (for tests).
    pub fn ordinary() -> Self {
        Self {
            superuser: false,
            replication: false,
            bypass_rls: false,
            create_role: false,
            server_role: false,
            member_of: None,
        }
    }
}

/// Why delegated mode refuses to log a token in as `role` (None: it may). A role that is a
/// superuser, or has REPLICATION, BYPASSRLS or CREATEROLE, or is (or is a member of) a role that
/// reads or writes the server's files or runs programs on it, is never reached through a token's
/// claims, whatever they say; a role that cannot be looked up is refused too.
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
    if p.server_role {
        return Some(format!(
            "role {role:?} reads or writes the server's files or runs programs on it: delegated mode never maps a token to such a role"
        ));
    }
    p.member_of.map(|other| {
        format!(
            "role {role:?} is a member of {other:?}, which has powers beyond its grants: delegated mode never maps a token to such a role"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ordinary() -> RolePowers {
        RolePowers::ordinary()
    }

    #[test]
    fn a_server_file_or_program_role_itself_is_privileged_as_its_members_are() {
        assert_eq!(privileged_role("app_reader", Some(ordinary())), None);
        assert_eq!(
            privileged_role("pg_execute_server_program", Some(RolePowers { server_role: true, ..ordinary() }))
                .as_deref(),
            Some(
                "role \"pg_execute_server_program\" reads or writes the server's files or runs programs on it: \
                 delegated mode never maps a token to such a role"
            )
        );
        let member = RolePowers { member_of: Some("pg_read_server_files".into()), ..ordinary() };
        assert!(privileged_role("app_reader", Some(member))
            .unwrap()
            .contains("is a member of \"pg_read_server_files\""));
        assert_eq!(
            privileged_role("app_admin", Some(RolePowers { create_role: true, ..ordinary() })).as_deref(),
            Some("role \"app_admin\" has CREATEROLE: delegated mode never maps a token to such a role")
        );
    }
}
