//! Roles from the token's groups (issue #29): a person's own database role, created at their
//! first login and, under `sync`, kept in step with the groups their token names.
//!
//! This module is the decision only: the role's name from the identity, and what to do given what
//! the catalog holds. The validator's provisioner (a background worker with `CREATEROLE`) reads
//! the catalog, asks [`plan`] and carries the actions out.

use serde::Deserialize;

/// How an issuer's logins provision roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisionMode {
    /// Roles must exist (the default).
    #[default]
    Off,
    /// A person's role is created at their first login, with the mapped groups their token names
    /// then; later logins change nothing.
    Create,
    /// As `create`, and every login grants the mapped groups the token names and revokes the
    /// mapped groups it no longer names.
    Sync,
}

impl ProvisionMode {
    /// `off`, `create` or `sync`.
    pub fn parse(v: &str) -> Option<Self> {
        match v.trim().to_ascii_lowercase().as_str() {
            "off" | "" => Some(Self::Off),
            "create" => Some(Self::Create),
            "sync" => Some(Self::Sync),
            _ => None,
        }
    }

    /// As the settings spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Create => "create",
            Self::Sync => "sync",
        }
    }
}

/// An issuer's provisioning policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProvisionPolicy {
    /// Off, create or sync.
    pub mode: ProvisionMode,
    /// Put before the identity in the role's name.
    pub prefix: String,
    /// Put after it.
    pub suffix: String,
}

/// PostgreSQL's longest role name, in bytes (NAMEDATALEN - 1).
pub const MAX_ROLE_BYTES: usize = 63;

/// The role a person's identity is provisioned as: `prefix + identity + suffix`, exactly (no case
/// folding: the name is always quoted). Refused when longer than PostgreSQL keeps (it would cut
/// the name, and two people could land on one role), empty, holding a control or invisible formatting character, or
/// starting with `pg_` (reserved by PostgreSQL).
pub fn role_name(policy: &ProvisionPolicy, identity: &str) -> Result<String, String> {
    if identity.is_empty() {
        return Err("the identity is empty".into());
    }
    let name = format!("{}{identity}{}", policy.prefix, policy.suffix);
    if name.len() > MAX_ROLE_BYTES {
        return Err(format!(
            "the role name would be {} bytes, above PostgreSQL's {MAX_ROLE_BYTES}: use a shorter identity claim or prefix",
            name.len()
        ));
    }
    if name.chars().any(|c| c.is_control() || invisible(c)) {
        return Err("the role name would hold a control or invisible formatting character".into());
    }
    if name.starts_with("pg_") {
        return Err("role names starting with pg_ are reserved by PostgreSQL: set a provision prefix".into());
    }
    Ok(name)
}

/// Unicode formatting characters that render as nothing or reorder text (a name could display as
/// another one in `\du` or a log).
fn invisible(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// What the catalog and gprxy's own record say about a person's role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    /// A role of that name exists.
    pub exists: bool,
    /// gprxy's record of who the role was created for (issuer, identity), when the record is of
    /// this very role (its OID): None when gprxy did not create it, or created another role of
    /// the same name that was dropped since.
    pub created_for: Option<(String, String)>,
    /// The managed group roles it is a member of now.
    pub member_of: Vec<String>,
}

/// One change to the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `CREATE ROLE <role> LOGIN` and gprxy's record of it.
    Create,
    /// `GRANT <group> TO <role>`.
    Grant(String),
    /// `REVOKE <group> FROM <role>`.
    Revoke(String),
}

/// Why a person's role cannot be provisioned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A role of that name exists that gprxy did not create: never adopted.
    #[error("role {0:?} exists and was not created by gprxy: it is never adopted")]
    Collision(String),
    /// gprxy created the role for another issuer's identity.
    #[error("role {role:?} was created for issuer {issuer:?}: identities of two issuers never share a role unless gprxy.shared_subject_namespace says so")]
    OtherIssuer {
        /// The role.
        role: String,
        /// The issuer it was created for.
        issuer: String,
    },
    /// gprxy created the role for another identity (a prefix or suffix changed).
    #[error("role {0:?} was created for another identity")]
    OtherIdentity(String),
}

impl Refusal {
    /// The audit line's reason.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Collision(_) => "provision_collision",
            Self::OtherIssuer { .. } | Self::OtherIdentity(_) => "provision_other_identity",
        }
    }
}

/// One login's ask: the person's role, their issuer and identity, and the managed groups the token
/// names (after the role map).
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    /// Create or sync.
    pub mode: ProvisionMode,
    /// The person's own role.
    pub role: &'a str,
    /// The token's issuer.
    pub issuer: &'a str,
    /// The token's identity.
    pub identity: &'a str,
    /// The groups the token names, after the role map.
    pub wanted: &'a [String],
}

/// What to do for `login`, given `managed` (every group the issuer's role map can grant; nothing
/// outside it is ever granted or revoked) and what the catalog holds.
pub fn plan(
    login: &Login<'_>,
    managed: &[String],
    existing: &Existing,
    shared_namespace: bool,
) -> Result<Vec<Action>, Refusal> {
    let Login { mode, role, issuer, identity, wanted } = *login;
    let wanted: Vec<&String> = wanted.iter().filter(|g| managed.contains(g)).collect();
    if mode == ProvisionMode::Off {
        return Ok(Vec::new());
    }
    if !existing.exists {
        let mut actions = vec![Action::Create];
        actions.extend(wanted.iter().map(|g| Action::Grant((*g).clone())));
        return Ok(actions);
    }
    match &existing.created_for {
        None => return Err(Refusal::Collision(role.to_owned())),
        Some((iss, id)) if iss != issuer && !(shared_namespace && id == identity) => {
            return Err(Refusal::OtherIssuer { role: role.to_owned(), issuer: iss.clone() })
        }
        Some((_, id)) if id != identity => return Err(Refusal::OtherIdentity(role.to_owned())),
        Some(_) => {}
    }
    if mode == ProvisionMode::Create {
        return Ok(Vec::new());
    }
    let mut actions: Vec<Action> = wanted
        .iter()
        .filter(|g| !existing.member_of.contains(g))
        .map(|g| Action::Grant((*g).clone()))
        .collect();
    actions.extend(
        existing
            .member_of
            .iter()
            .filter(|g| managed.contains(g) && !wanted.contains(g))
            .map(|g| Action::Revoke(g.clone())),
    );
    Ok(actions)
}

/// A SQL identifier, always quoted (`"` doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    const ISS: &str = "https://idp.example";

    #[test]
    fn the_role_is_named_from_the_identity_with_prefix_and_suffix() {
        let p = ProvisionPolicy { mode: ProvisionMode::Sync, prefix: "u_".into(), suffix: "@acme".into() };
        assert_eq!(role_name(&p, "alice").unwrap(), "u_alice@acme");
        assert_eq!(role_name(&ProvisionPolicy::default(), "Alice@Acme.com").unwrap(), "Alice@Acme.com");
        let long = "a".repeat(64);
        assert_eq!(
            role_name(&ProvisionPolicy::default(), &long).unwrap_err(),
            "the role name would be 64 bytes, above PostgreSQL's 63: use a shorter identity claim or prefix"
        );
        let hidden = "the role name would hold a control or invisible formatting character";
        assert_eq!(role_name(&ProvisionPolicy::default(), "a\nb").unwrap_err(), hidden);
        assert_eq!(role_name(&ProvisionPolicy::default(), "adm\u{202E}nimda").unwrap_err(), hidden);
        assert_eq!(role_name(&ProvisionPolicy::default(), "al\u{200B}ice").unwrap_err(), hidden);
        assert!(role_name(&ProvisionPolicy::default(), "pg_monitor").unwrap_err().contains("reserved"));
        assert_eq!(role_name(&ProvisionPolicy::default(), "").unwrap_err(), "the identity is empty");
    }

    #[test]
    fn a_first_login_creates_the_role_with_the_mapped_groups_only() {
        let managed = s(&["app_reader", "app_writer"]);
        let wanted = s(&["app_reader", "postgres"]);
        let login = Login {
            mode: ProvisionMode::Create,
            role: "alice",
            issuer: ISS,
            identity: "alice",
            wanted: &wanted,
        };
        let a = plan(&login, &managed, &Existing::default(), false).unwrap();
        assert_eq!(a, vec![Action::Create, Action::Grant("app_reader".into())]);
    }

    #[test]
    fn sync_grants_and_revokes_managed_groups_create_changes_nothing() {
        let managed = s(&["app_reader", "app_writer"]);
        let existing = Existing {
            exists: true,
            created_for: Some((ISS.into(), "alice".into())),
            member_of: s(&["app_writer"]),
        };
        let sync = plan(
            &Login {
                mode: ProvisionMode::Sync,
                role: "alice",
                issuer: ISS,
                identity: "alice",
                wanted: &s(&["app_reader"]),
            },
            &managed,
            &existing,
            false,
        )
        .unwrap();
        assert_eq!(sync, vec![Action::Grant("app_reader".into()), Action::Revoke("app_writer".into())]);
        let create = plan(
            &Login {
                mode: ProvisionMode::Create,
                role: "alice",
                issuer: ISS,
                identity: "alice",
                wanted: &s(&["app_reader"]),
            },
            &managed,
            &existing,
            false,
        )
        .unwrap();
        assert_eq!(create, Vec::new());
        let same = plan(
            &Login {
                mode: ProvisionMode::Sync,
                role: "alice",
                issuer: ISS,
                identity: "alice",
                wanted: &s(&["app_writer"]),
            },
            &managed,
            &existing,
            false,
        )
        .unwrap();
        assert_eq!(same, Vec::new());
    }

    #[test]
    fn a_role_gprxy_did_not_create_or_made_for_another_is_refused() {
        let managed = s(&["app_reader"]);
        let by_hand = Existing { exists: true, created_for: None, member_of: Vec::new() };
        let e = plan(
            &Login { mode: ProvisionMode::Sync, role: "bob", issuer: ISS, identity: "bob", wanted: &[] },
            &managed,
            &by_hand,
            false,
        )
        .unwrap_err();
        assert_eq!(
            (e.code(), e.to_string().as_str()),
            ("provision_collision", "role \"bob\" exists and was not created by gprxy: it is never adopted")
        );
        let other = Existing {
            exists: true,
            created_for: Some(("https://other.example".into(), "bob".into())),
            member_of: Vec::new(),
        };
        let e = plan(
            &Login { mode: ProvisionMode::Sync, role: "bob", issuer: ISS, identity: "bob", wanted: &[] },
            &managed,
            &other,
            false,
        )
        .unwrap_err();
        assert_eq!(e.code(), "provision_other_identity");
        assert!(plan(
            &Login { mode: ProvisionMode::Sync, role: "bob", issuer: ISS, identity: "bob", wanted: &[] },
            &managed,
            &other,
            true
        )
        .is_ok());
        let renamed = Existing {
            exists: true,
            created_for: Some((ISS.into(), "robert".into())),
            member_of: Vec::new(),
        };
        assert_eq!(
            plan(
                &Login { mode: ProvisionMode::Sync, role: "bob", issuer: ISS, identity: "bob", wanted: &[] },
                &managed,
                &renamed,
                true
            )
            .unwrap_err(),
            Refusal::OtherIdentity("bob".into())
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("al\"ice@x"), "\"al\"\"ice@x\"");
        assert_eq!(ProvisionMode::parse("SYNC"), Some(ProvisionMode::Sync));
        assert_eq!(ProvisionMode::parse("maybe"), None);
    }
}
