//! The ground floor of provisioning, shared by every phase and both passes:
//! the owner marker and how it is read, the names Keycloak gives role
//! mappings, and the one reconciler of role mappings ([`reconcile_roles`]).

use std::collections::{BTreeMap, BTreeSet};

use ::keycloak::types::{MappingsRepresentation, RoleRepresentation};

use super::admin::{Admin, AdminError};

/// The attribute that marks an object as created and owned by `keycloak apply`;
/// its value is the model's `owner`. Only objects carrying it are changed or removed.
pub const OWNER_ATTRIBUTE: &str = "keycloak-ci-sts.owner";

/// The built-in scope every client gets as its only default scope: it carries
/// `sub` (Keycloak 25+; without it tokens lack `sub`, keycloak#31082).
pub const BASIC_SCOPE: &str = "basic";

/// Keycloak's `service_account` scope (26.x: the `client_id`, `clientHost` and
/// `clientAddress` claims), which Keycloak attaches to every service-account
/// client it creates or updates through the Admin API.
pub const SERVICE_ACCOUNT_SCOPE: &str = "service_account";

/// The built-in scopes every client gets as default scopes, with the mapper types
/// Keycloak itself puts there; anything else in them would reach every token.
pub const BUILT_IN_DEFAULTS: [(&str, &[&str]); 2] = [
    (
        BASIC_SCOPE,
        &["oidc-sub-mapper", "oidc-usersessionmodel-note-mapper"],
    ),
    (
        SERVICE_ACCOUNT_SCOPE,
        &["oidc-usersessionmodel-note-mapper"],
    ),
];

/// Whether a representation's attributes carry the ownership marker `owner`.
pub fn owned_by(
    attributes: Option<&std::collections::HashMap<String, String>>,
    owner: &str,
) -> bool {
    attributes
        .and_then(|a| a.get(OWNER_ATTRIBUTE))
        .is_some_and(|v| v == owner)
}

/// `clientId` → role names of a mappings representation; realm roles under `(realm)`.
pub fn mapping_roles(m: MappingsRepresentation) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (client, c) in m.client_mappings.unwrap_or_default() {
        let roles: BTreeSet<String> = c
            .mappings
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| r.name)
            .collect();
        if !roles.is_empty() {
            out.insert(client, roles);
        }
    }
    let realm: BTreeSet<String> = m
        .realm_mappings
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.name)
        .collect();
    if !realm.is_empty() {
        out.insert(REALM_KEY.to_string(), realm);
    }
    out
}

/// Whether a realm role is the one Keycloak gives every user of `realm`:
/// `default-roles-` and the realm's name in lower case, exactly (any other
/// role of that prefix is an ordinary role, and may be a composite of admin
/// roles).
pub fn is_default_role(name: &str, realm: &str) -> bool {
    name.strip_prefix("default-roles-")
        .is_some_and(|r| r == realm.to_lowercase())
}

/// A user's directly mapped roles ([`mapping_roles`]) without `realm`'s
/// default role.
pub fn direct_roles(m: MappingsRepresentation, realm: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut roles = mapping_roles(m);
    if let Some(r) = roles.get_mut(REALM_KEY) {
        r.retain(|n| !is_default_role(n, realm));
        if r.is_empty() {
            roles.remove(REALM_KEY);
        }
    }
    roles
}

/// The key of realm-role mappings in [`mapping_roles`].
pub const REALM_KEY: &str = "(realm)";

/// An object that holds role mappings: a user's or group's role mappings, a
/// client scope's or client's role scope mappings. Keycloak serves all four
/// the same way under [`Holder::path`]: `GET` every mapping, then per realm
/// or client `DELETE` and `POST` with a list of roles.
#[derive(Debug, Clone, Copy)]
pub enum Holder<'a> {
    /// A user (its id).
    User(&'a str),
    /// A group (its id).
    Group(&'a str),
    /// A client scope (its id).
    ClientScope(&'a str),
    /// A client (its internal id).
    Client(&'a str),
}

impl Holder<'_> {
    fn path(self) -> String {
        match self {
            Holder::User(id) => format!("/users/{}/role-mappings", Admin::seg(id)),
            Holder::Group(id) => format!("/groups/{}/role-mappings", Admin::seg(id)),
            Holder::ClientScope(id) => format!("/client-scopes/{}/scope-mappings", Admin::seg(id)),
            Holder::Client(id) => format!("/clients/{}/scope-mappings", Admin::seg(id)),
        }
    }
}

/// What [`reconcile_roles`] leaves alone.
#[derive(Debug, Clone, Copy)]
pub struct Leave {
    /// Realm roles (a group's: `plan` reports them as problems for a human).
    pub realm_roles: bool,
    /// Roles of Keycloak's own clients (a user's or group's: reported the same way).
    pub reserved_clients: bool,
}

impl Leave {
    /// Every mapping is ours to reconcile (a client scope's or client's scope mappings).
    pub const NOTHING: Leave = Leave {
        realm_roles: false,
        reserved_clients: false,
    };
    /// Roles of Keycloak's own clients are left to a human (a user's).
    pub const BUILT_IN: Leave = Leave {
        realm_roles: false,
        reserved_clients: true,
    };
    /// Realm roles and roles of Keycloak's own clients are left to a human (a group's).
    pub const REALM_AND_BUILT_IN: Leave = Leave {
        realm_roles: true,
        reserved_clients: true,
    };
}

/// Makes `holder`'s role mappings exactly `want` (`clientId` → role names):
/// realm roles other than `default-roles-<realm>` and client roles outside
/// `want` removed, the missing ones added, except what `leave` names. The one
/// reconciler of role mappings: a service account's roles, a group's roles, a
/// repository user's (none: groups give them), a client scope's or client's
/// scope mappings.
///
/// # Errors
/// The first failed call; a wanted role or client that does not exist.
pub async fn reconcile_roles(
    admin: &Admin,
    holder: Holder<'_>,
    name: &str,
    want: &BTreeMap<String, BTreeSet<String>>,
    leave: Leave,
) -> Result<(), AdminError> {
    let base = holder.path();
    let m: MappingsRepresentation = admin
        .get_capped(&base, &[], &format!("read the role mappings of {name}"))
        .await?;
    let extra_realm: Vec<RoleRepresentation> = m
        .realm_mappings
        .unwrap_or_default()
        .into_iter()
        .filter(|r| !is_default_role(r.name.as_deref().unwrap_or_default(), &admin.realm))
        .collect();
    if !extra_realm.is_empty() && !leave.realm_roles {
        let path = format!("{base}/realm");
        send_roles(
            admin,
            reqwest::Method::DELETE,
            &path,
            &extra_realm,
            &format!("remove the realm roles of {name}"),
        )
        .await?;
    }
    let have = m.client_mappings.unwrap_or_default();
    let none = BTreeSet::new();
    let mut had: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (client, mapped) in &have {
        if leave.reserved_clients && super::model::is_reserved_client(client) {
            continue;
        }
        let wanted = want.get(client).unwrap_or(&none);
        let mappings = mapped.mappings.as_deref().unwrap_or_default();
        had.insert(
            client,
            mappings.iter().filter_map(|r| r.name.as_deref()).collect(),
        );
        let extra: Vec<RoleRepresentation> = mappings
            .iter()
            .filter(|r| r.name.as_ref().is_some_and(|n| !wanted.contains(n)))
            .cloned()
            .collect();
        if !extra.is_empty() {
            let path = format!(
                "{base}/clients/{}",
                Admin::seg(mapped.id.as_deref().unwrap_or_default())
            );
            send_roles(
                admin,
                reqwest::Method::DELETE,
                &path,
                &extra,
                &format!("remove {client} roles of {name}"),
            )
            .await?;
        }
    }
    add_roles(admin, &base, name, want, &had).await
}

/// Adds to the holder at `base` the roles of `want` it does not hold (`had`).
async fn add_roles(
    admin: &Admin,
    base: &str,
    name: &str,
    want: &BTreeMap<String, BTreeSet<String>>,
    had: &BTreeMap<&str, BTreeSet<&str>>,
) -> Result<(), AdminError> {
    for (client, roles) in want.iter().filter(|(c, _)| c.as_str() != REALM_KEY) {
        let had = had.get(client.as_str());
        let missing: BTreeSet<&str> = roles
            .iter()
            .map(String::as_str)
            .filter(|r| !had.is_some_and(|h| h.contains(r)))
            .collect();
        if missing.is_empty() {
            continue;
        }
        let uuid = client_uuid(admin, client).await?;
        let all: Vec<RoleRepresentation> = admin
            .list(
                &format!("/clients/{}/roles", Admin::seg(&uuid)),
                &[("briefRepresentation", "true".into())],
                &format!("read roles of client {client}"),
            )
            .await?;
        let add: Vec<RoleRepresentation> = all
            .into_iter()
            .filter(|r| r.name.as_deref().is_some_and(|n| missing.contains(n)))
            .collect();
        if add.len() != missing.len() {
            return Err(absent(name, client, &missing));
        }
        let path = format!("{base}/clients/{}", Admin::seg(&uuid));
        send_roles(
            admin,
            reqwest::Method::POST,
            &path,
            &add,
            &format!("add {client} roles to {name}"),
        )
        .await?;
    }
    Ok(())
}

async fn send_roles(
    admin: &Admin,
    method: reqwest::Method,
    path: &str,
    roles: &[RoleRepresentation],
    action: &str,
) -> Result<(), AdminError> {
    let body = serde_json::to_value(roles).unwrap_or_default();
    admin.send_json(method, path, &body, action).await.map(drop)
}

/// The internal id of client `client_id` (an exact search).
///
/// # Errors
/// A failed call; no such client.
pub async fn client_uuid(admin: &Admin, client_id: &str) -> Result<String, AdminError> {
    let found: Vec<::keycloak::types::ClientRepresentation> = admin
        .get_capped(
            "/clients",
            &[("clientId", client_id.to_string())],
            &format!("find client {client_id}"),
        )
        .await?;
    found
        .into_iter()
        .find(|c| c.client_id.as_deref() == Some(client_id))
        .and_then(|c| c.id)
        .ok_or_else(|| {
            AdminError::missing(
                format!("find client {client_id}"),
                format!("no client {client_id}"),
            )
        })
}

fn absent(name: &str, client: &str, roles: &BTreeSet<&str>) -> AdminError {
    let roles: Vec<&str> = roles.iter().copied().collect();
    AdminError::missing(
        format!("add {client} roles to {name}"),
        format!(
            "client {client} has not all of the roles {}",
            roles.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the realm's own default role is left out of a user's direct
    /// roles; another role of that prefix is an ordinary (reported) role.
    #[test]
    fn only_the_realms_own_default_role_is_the_default_role() {
        assert!(is_default_role("default-roles-ci", "ci"));
        assert!(is_default_role("default-roles-acme", "Acme"));
        assert!(!is_default_role("default-roles-evil", "ci"));
        assert!(!is_default_role("default-roles-ci-admin", "ci"));
        assert!(!is_default_role("offline_access", "ci"));
    }
}
