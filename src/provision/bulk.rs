//! The reads that grow with the realm's users, made in pages rather than per
//! repository user: the repository users with their attributes, the users
//! linked to the identity provider, every group's members and every role's
//! holders. Keycloak has one read that has no bulk form: a user's federated
//! identity links ([`links`], one call per user linked to the identity
//! provider, `--concurrency` at a time). The calls of the others grow with
//! the realm's groups and roles, not with its users.

use std::collections::{BTreeMap, BTreeSet};

use ::keycloak::types::{
    ClientRepresentation, FederatedIdentityRepresentation, GroupRepresentation, RoleRepresentation,
    UserRepresentation,
};
use futures_util::stream::{self, StreamExt, TryStreamExt};

use super::admin::{Admin, AdminError};
use super::realm::{is_default_role, REALM_KEY};

/// What every repository username starts with
/// ([`crate::domain::identity::RepositoryIdentity::username`]).
pub const USERNAME_PREFIX: &str = "bitbucket.";

/// Deepest group nesting read (Keycloak allows any; a deeper tree fails the
/// command rather than being read partly).
pub const MAX_GROUP_DEPTH: usize = 16;

/// The users whose username starts with [`USERNAME_PREFIX`], by username,
/// with their attributes (Keycloak's prefix search, read to its end in
/// pages; it matches e-mail and names too, which are dropped here).
///
/// # Errors
/// A failed call or a list bound.
pub async fn repository_users(
    admin: &Admin,
) -> Result<BTreeMap<String, UserRepresentation>, AdminError> {
    let found: Vec<UserRepresentation> = admin
        .list(
            "/users",
            &[
                ("search", USERNAME_PREFIX.to_string()),
                ("briefRepresentation", "false".into()),
            ],
            "read the repository users",
        )
        .await?;
    Ok(found
        .into_iter()
        .filter_map(|u| {
            let name = u.username.clone()?;
            name.starts_with(USERNAME_PREFIX).then_some((name, u))
        })
        .collect())
}

/// Every user linked to the identity provider `alias` (brief representations).
///
/// # Errors
/// A failed call or a list bound.
pub async fn linked_users(
    admin: &Admin,
    alias: &str,
) -> Result<Vec<UserRepresentation>, AdminError> {
    admin
        .list(
            "/users",
            &[
                ("idpAlias", alias.to_string()),
                ("briefRepresentation", "true".into()),
            ],
            "list users linked to the identity provider",
        )
        .await
}

/// The federated identity links of each user id in `ids`, `--concurrency`
/// at a time: the one per-user read Keycloak forces (no list answer carries
/// a user's links).
///
/// # Errors
/// The first failed call.
pub async fn links(
    admin: &Admin,
    ids: Vec<String>,
) -> Result<BTreeMap<String, Vec<FederatedIdentityRepresentation>>, AdminError> {
    let realm = admin.realm.as_str();
    stream::iter(ids)
        .map(|id| async move {
            let l = admin
                .run(format!("read the links of user {id}"), || {
                    admin
                        .api
                        .realm_users_with_user_id_federated_identity_get(realm, &id)
                })
                .await?;
            Ok::<_, AdminError>((id, l))
        })
        .buffer_unordered(admin.concurrency())
        .try_collect()
        .await
}

/// Every group of the realm (top level and subgroups, to
/// [`MAX_GROUP_DEPTH`]), as (id, path).
async fn all_groups(admin: &Admin) -> Result<Vec<(String, String)>, AdminError> {
    let brief = [("briefRepresentation", "true".to_string())];
    let mut level: Vec<GroupRepresentation> = admin.list("/groups", &brief, "read groups").await?;
    let mut out = Vec::new();
    for _ in 0..MAX_GROUP_DEPTH {
        let parents: Vec<String> = level
            .iter()
            .filter(|g| g.sub_group_count.unwrap_or(0) > 0)
            .filter_map(|g| g.id.clone())
            .collect();
        out.extend(level.into_iter().filter_map(|g| Some((g.id?, g.path?))));
        if parents.is_empty() {
            return Ok(out);
        }
        let brief = &brief;
        let children: Vec<Vec<GroupRepresentation>> = stream::iter(parents)
            .map(|id| async move {
                admin
                    .list(
                        &format!("/groups/{}/children", Admin::seg(&id)),
                        brief,
                        "read subgroups",
                    )
                    .await
            })
            .buffer_unordered(admin.concurrency())
            .try_collect()
            .await?;
        level = children.into_iter().flatten().collect();
    }
    let deepest = level
        .iter()
        .find_map(|g| g.path.clone())
        .unwrap_or_default();
    Err(too_deep(&deepest))
}

fn too_deep(path: &str) -> AdminError {
    let text = format!(
        "group {} is nested deeper than {MAX_GROUP_DEPTH} levels: the groups are not read partly (a repository user's membership could hide there); flatten it",
        super::admin::sanitize(path)
    );
    AdminError::new("read groups".into(), super::admin::Cause::Bound(text))
}

/// The group paths of each user in `of`, by user id, from every group's
/// members (a group's direct members; one call per group and page).
///
/// # Errors
/// The first failed call.
pub async fn group_paths(
    admin: &Admin,
    of: &BTreeSet<String>,
) -> Result<BTreeMap<String, BTreeSet<String>>, AdminError> {
    let groups = all_groups(admin).await?;
    let members: Vec<(String, Vec<UserRepresentation>)> = stream::iter(groups)
        .map(|(id, path)| async move {
            let m = admin
                .list(
                    &format!("/groups/{}/members", Admin::seg(&id)),
                    &[("briefRepresentation", "true".into())],
                    &format!("read members of group {path}"),
                )
                .await?;
            Ok::<_, AdminError>((path, m))
        })
        .buffer_unordered(admin.concurrency())
        .try_collect()
        .await?;
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, users) in members {
        for id in users.into_iter().filter_map(|u| u.id) {
            if of.contains(&id) {
                out.entry(id).or_default().insert(path.clone());
            }
        }
    }
    Ok(out)
}

/// One role whose holders are read: (key of [`super::realm::mapping_roles`],
/// path of its `users` list, role name).
type RoleRef = (String, String, String);

/// The realm roles (without the default role every user holds), or `None`
/// when the admin client may not list them (no `view-realm`).
async fn realm_roles(admin: &Admin) -> Result<Option<Vec<RoleRef>>, AdminError> {
    let brief = [("briefRepresentation", "true".to_string())];
    let roles: Vec<RoleRepresentation> =
        match admin.list("/roles", &brief, "read realm roles").await {
            Ok(r) => r,
            Err(e) if e.status() == Some(403) => return Ok(None),
            Err(e) => return Err(e),
        };
    Ok(Some(
        roles
            .into_iter()
            .filter_map(|r| r.name)
            .filter(|n| !is_default_role(n, &admin.realm))
            .map(|n| {
                (
                    REALM_KEY.to_string(),
                    format!("/roles/{}", Admin::seg(&n)),
                    n,
                )
            })
            .collect(),
    ))
}

/// The roles of each client in `clients` (`clientId` → client).
async fn client_roles(
    admin: &Admin,
    clients: &BTreeMap<String, ClientRepresentation>,
) -> Result<Vec<RoleRef>, AdminError> {
    let mut out = Vec::new();
    let ids: Vec<(String, String)> = clients
        .iter()
        .filter_map(|(id, c)| Some((id.clone(), c.id.clone()?)))
        .collect();
    let per_client: Vec<Vec<RoleRef>> = stream::iter(ids)
        .map(|(client_id, uuid)| async move {
            let roles: Vec<RoleRepresentation> = admin
                .list(
                    &format!("/clients/{}/roles", Admin::seg(&uuid)),
                    &[("briefRepresentation", "true".into())],
                    &format!("read roles of client {client_id}"),
                )
                .await?;
            Ok::<_, AdminError>(
                roles
                    .into_iter()
                    .filter_map(|r| r.name)
                    .map(|n| {
                        let path =
                            format!("/clients/{}/roles/{}", Admin::seg(&uuid), Admin::seg(&n));
                        (client_id.clone(), path, n)
                    })
                    .collect(),
            )
        })
        .buffer_unordered(admin.concurrency())
        .try_collect()
        .await?;
    out.extend(per_client.into_iter().flatten());
    Ok(out)
}

/// Roles mapped directly to users: user id → `clientId` (realm roles under
/// [`REALM_KEY`]) → role names.
pub type DirectRoles = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// The roles mapped directly (not through a group) to each user in `of`,
/// from every role's holders (one call per role and page). Without
/// `view-realm` the realm roles cannot be listed: each user's realm-role
/// mappings are read instead (one call per user), and the answer's second
/// value is `true`.
///
/// # Errors
/// The first failed call.
pub async fn direct_roles(
    admin: &Admin,
    clients: &BTreeMap<String, ClientRepresentation>,
    of: &BTreeSet<String>,
) -> Result<(DirectRoles, bool), AdminError> {
    let mut roles = client_roles(admin, clients).await?;
    let mut out = DirectRoles::new();
    let per_user = match realm_roles(admin).await? {
        Some(r) => {
            roles.extend(r);
            false
        }
        None => {
            out = realm_roles_per_user(admin, of).await?;
            true
        }
    };
    holders(admin, roles, of, &mut out).await?;
    Ok((out, per_user))
}

/// Each user's realm-role mappings, one call per user.
async fn realm_roles_per_user(
    admin: &Admin,
    of: &BTreeSet<String>,
) -> Result<DirectRoles, AdminError> {
    let found: Vec<(String, Vec<RoleRepresentation>)> = stream::iter(of)
        .map(|id| async move {
            let r = admin
                .get_capped(
                    &format!("/users/{}/role-mappings/realm", Admin::seg(id)),
                    &[],
                    &format!("read the realm roles of user {id}"),
                )
                .await?;
            Ok::<_, AdminError>((id.clone(), r))
        })
        .buffer_unordered(admin.concurrency())
        .try_collect()
        .await?;
    let mut out = DirectRoles::new();
    for (id, roles) in found {
        let names: BTreeSet<String> = roles
            .into_iter()
            .filter_map(|r| r.name)
            .filter(|n| !is_default_role(n, &admin.realm))
            .collect();
        if !names.is_empty() {
            out.entry(id)
                .or_default()
                .insert(REALM_KEY.to_string(), names);
        }
    }
    Ok(out)
}

/// Adds the holders among `of` of each of `roles` to `out`.
async fn holders(
    admin: &Admin,
    roles: Vec<RoleRef>,
    of: &BTreeSet<String>,
    out: &mut DirectRoles,
) -> Result<(), AdminError> {
    let holders: Vec<(RoleRef, Vec<UserRepresentation>)> = stream::iter(roles)
        .map(|role| async move {
            let users = admin
                .list(
                    &format!("{}/users", role.1),
                    &[("briefRepresentation", "true".into())],
                    &format!("read holders of role {}/{}", role.0, role.2),
                )
                .await?;
            Ok::<_, AdminError>((role, users))
        })
        .buffer_unordered(admin.concurrency())
        .try_collect()
        .await?;
    for ((client, _, role), users) in holders {
        for id in users.into_iter().filter_map(|u| u.id) {
            if of.contains(&id) {
                out.entry(id)
                    .or_default()
                    .entry(client.clone())
                    .or_default()
                    .insert(role.clone());
            }
        }
    }
    Ok(())
}
