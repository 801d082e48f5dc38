//! The ground floor of provisioning, shared by every phase and both passes:
//! the owner marker and how it is read, the names Keycloak gives role
//! mappings, and the one reconciler of a user's direct role mappings.

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

/// Whether a realm role is the one Keycloak gives every user (`default-roles-<realm>`).
pub fn is_default_role(name: &str) -> bool {
    name.starts_with("default-roles-")
}

/// A user's directly mapped roles ([`mapping_roles`]) without the realm's
/// default role.
pub fn direct_roles(m: MappingsRepresentation) -> BTreeMap<String, BTreeSet<String>> {
    let mut roles = mapping_roles(m);
    if let Some(r) = roles.get_mut(REALM_KEY) {
        r.retain(|n| !is_default_role(n));
        if r.is_empty() {
            roles.remove(REALM_KEY);
        }
    }
    roles
}

/// The key of realm-role mappings in [`mapping_roles`].
pub const REALM_KEY: &str = "(realm)";

/// Removes the roles mapped directly to `user` that `keep` (clientId → roles)
/// does not list: every realm role but `default-roles-<realm>`, and every client
/// role outside `keep`. Roles of Keycloak's own clients are left to a human
/// (`plan` reports them as problems). Returns the client mappings read.
pub async fn remove_direct_roles(
    admin: &Admin,
    user: &str,
    name: &str,
    keep: &BTreeMap<String, BTreeSet<String>>,
) -> Result<
    std::collections::HashMap<String, ::keycloak::types::ClientMappingsRepresentation>,
    AdminError,
> {
    let realm = admin.realm.as_str();
    let m = admin
        .run(format!("read the roles of {name}"), || {
            admin
                .api
                .realm_users_with_user_id_role_mappings_get(realm, user)
        })
        .await?;
    let extra_realm: Vec<RoleRepresentation> = m
        .realm_mappings
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| !is_default_role(r.name.as_deref().unwrap_or_default()))
        .collect();
    if !extra_realm.is_empty() {
        admin
            .run(format!("remove the realm roles of {name}"), || {
                admin
                    .api
                    .realm_users_with_user_id_role_mappings_realm_delete(
                        realm,
                        user,
                        extra_realm.clone(),
                    )
            })
            .await?;
    }
    let have = m.client_mappings.unwrap_or_default();
    let none = BTreeSet::new();
    for (client, mapped) in have
        .iter()
        .filter(|(c, _)| !super::model::is_reserved_client(c))
    {
        let wanted = keep.get(client).unwrap_or(&none);
        let extra: Vec<RoleRepresentation> = mapped
            .mappings
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.name.as_ref().is_some_and(|n| !wanted.contains(n)))
            .collect();
        if !extra.is_empty() {
            let other = mapped.id.clone().unwrap_or_default();
            admin
                .run(format!("remove {client} roles of {name}"), || {
                    admin
                        .api
                        .realm_users_with_user_id_role_mappings_clients_with_client_id_delete(
                            realm,
                            user,
                            &other,
                            extra.clone(),
                        )
                })
                .await?;
        }
    }
    Ok(have)
}
