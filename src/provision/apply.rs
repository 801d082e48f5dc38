//! `keycloak apply`: makes exactly the plan's changes, then sets the configured
//! client secrets. Refuses to start while the plan has problems (an object of the
//! same name that is not ours), so it never half-applies around a conflict.
//! Idempotent: a second run finds nothing to do.

use std::collections::{BTreeMap, BTreeSet};

use ::keycloak::types::{ClientRepresentation, RoleRepresentation};
use secrecy::ExposeSecret;

use super::admin::Admin;
use super::desired::Desired;
pub use super::diff::ApplyError;
use super::diff::{Action, Change, Entry, Journal, Kind, Op, Plan};
use super::live::Live;
use super::plan::{default_scopes, plan};
use super::realm::{reconcile_roles, Holder, Leave};

/// `--max-removals` when not given: a few objects a policy change may retire
/// at once, far fewer than an empty or wrongly mounted policy directory would.
pub const DEFAULT_MAX_REMOVALS: usize = 10;

/// The objects a checked plan removes, as (kind, name).
pub(super) type Approved = BTreeSet<(Kind, String)>;

/// Checks the plan read before any change: no problem, every operation on
/// an object it applies to, at most `max` removals. Returns the removals
/// it approves.
pub(super) fn check_first(plan: &Plan, max: usize) -> Result<Approved, ApplyError> {
    if !plan.problems.is_empty() {
        return Err(ApplyError::Refused(plan.problems.clone()));
    }
    well_formed(plan)?;
    match plan.removals() {
        count if count > max => Err(ApplyError::TooManyRemovals { count, max }),
        _ => Ok(plan
            .removed()
            .map(|(kind, name)| (kind, name.to_string()))
            .collect()),
    }
}

/// Checks a plan read again after changes were made: as [`check_first`], and
/// it removes nothing the first plan did not (another apply or an
/// administrator changed the realm meanwhile).
fn check_again(plan: &Plan, approved: &Approved, max: usize) -> Result<(), ApplyError> {
    if !plan.problems.is_empty() {
        return Err(ApplyError::ChangedMeanwhile(plan.problems.clone()));
    }
    well_formed(plan)?;
    let mut new: Vec<String> = plan
        .removed()
        .filter(|(kind, name)| !approved.contains(&(*kind, (*name).to_string())))
        .map(|(kind, name)| format!("{kind} {name} became a removal after the plan was checked"))
        .collect();
    if plan.removals() > max {
        new.push(format!(
            "{} removals, more than --max-removals {max}",
            plan.removals()
        ));
    }
    match new.is_empty() {
        true => Ok(()),
        false => Err(ApplyError::ChangedMeanwhile(new)),
    }
}

/// Refuses a plan with an operation on an object it does not apply to.
fn well_formed(plan: &Plan) -> Result<(), ApplyError> {
    match plan.misplaced() {
        Some((kind, name, op)) => Err(not_for(kind, name, op)),
        None => Ok(()),
    }
}

/// The first pass of `apply` ([`super::apply`]): creates the clients, scopes
/// and resource servers `first` (the checked plan) creates, reads them again,
/// makes the changes of that plan's second reading (which must remove
/// nothing `approved` does not), removes, and sets client secrets.
///
/// # Errors
/// [`ApplyError`].
pub(super) async fn first_pass(
    admin: &Admin,
    desired: &Desired,
    first: &Plan,
    approved: &Approved,
    (prune, max_removals): (bool, usize),
    journal: &mut Journal<'_>,
) -> Result<(), ApplyError> {
    create(admin, desired, first, journal).await?;
    // The first pass read again (without the identities: it changes none).
    let live = Live::read_realm(admin, desired).await?;
    let second = plan(desired, &live, prune, admin.client_id());
    check_again(&second, approved, max_removals)?;
    for e in &second.entries {
        match &e.action {
            Action::Update(changes) | Action::Create(changes) => {
                if let Err(err) = update(admin, desired, &live, e, changes, prune, journal).await {
                    let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
                    journal.push(format!(
                        "! {} {}: stopped part-way; some of these may have changed: {}",
                        e.kind,
                        e.name,
                        fields.join(", ")
                    ));
                    return Err(err);
                }
            }
            Action::InSync | Action::Conflict(_) | Action::Remove | Action::Unneeded => {}
        }
    }
    remove(admin, &live, &second, journal).await?;
    secrets(admin, desired, &live, journal).await
}

fn id_of(live: &Live, client_id: &str) -> Result<String, ApplyError> {
    live.clients
        .get(client_id)
        .and_then(|c| c.id.clone())
        .ok_or_else(|| missing(&format!("client {client_id}")))
}

fn missing(what: &str) -> ApplyError {
    ApplyError::Missing(what.to_string())
}

fn not_for(kind: Kind, name: &str, op: Op) -> ApplyError {
    ApplyError::NotApplicable {
        object: format!("{kind} {name}"),
        op,
    }
}

async fn create(
    admin: &Admin,
    desired: &Desired,
    plan: &Plan,
    journal: &mut Journal<'_>,
) -> Result<(), ApplyError> {
    let realm = admin.realm.as_str();
    for e in plan
        .entries
        .iter()
        .filter(|e| matches!(e.action, Action::Create(_)) && e.kind.is_client_side())
    {
        match e.kind {
            Kind::ResourceServer | Kind::Client => {
                let mut rep: ClientRepresentation = match e.kind {
                    Kind::ResourceServer => desired
                        .resource_servers
                        .iter()
                        .find(|r| r.client_id == e.name)
                        .map(|r| r.rep.clone()),
                    Kind::Client
                    | Kind::Scope
                    | Kind::IdentityProvider
                    | Kind::UserProfile
                    | Kind::Group
                    | Kind::User => {
                        desired
                            .clients
                            .iter()
                            .find(|c| c.client_id == e.name)
                            .map(|c| {
                                let mut rep = c.rep.clone();
                                rep.secret =
                                    c.secret.as_ref().map(|s| s.expose_secret().to_string());
                                rep
                            })
                    }
                }
                .ok_or_else(|| missing(&e.name))?;
                rep.enabled = Some(true);
                admin
                    .run(format!("create {} {}", e.kind, e.name), || {
                        admin.api.realm_clients_post(realm, rep.clone())
                    })
                    .await?;
            }
            Kind::Scope => {
                let s = desired
                    .scopes
                    .iter()
                    .find(|s| s.name == e.name)
                    .ok_or_else(|| missing(&e.name))?;
                admin
                    .run(format!("create client scope {}", e.name), || {
                        admin.api.realm_client_scopes_post(realm, s.rep.clone())
                    })
                    .await?;
            }
            // The identities' own apply creates them.
            Kind::IdentityProvider | Kind::UserProfile | Kind::Group | Kind::User => continue,
        }
        journal.push(format!("+ created {} {}", e.kind, e.name));
    }
    Ok(())
}

/// Makes one object's changes, each kind of operation once, in [`Op`]'s order
/// (the representation first: a service account switched on there exists
/// for the roles after it).
async fn update(
    admin: &Admin,
    desired: &Desired,
    live: &Live,
    e: &Entry,
    changes: &[Change],
    prune: bool,
    journal: &mut Journal<'_>,
) -> Result<(), ApplyError> {
    let (kind, name) = (e.kind, e.name.as_str());
    let ops: BTreeSet<Op> = changes.iter().map(|c| c.op).collect();
    match kind {
        Kind::ResourceServer => {
            resource_server(admin, desired, live, name, &ops, prune).await?;
        }
        Kind::Scope => scope(admin, desired, live, name, &ops).await?,
        Kind::Client => client(admin, desired, live, name, &ops).await?,
        // Applied by the identities' own apply, after this pass.
        Kind::IdentityProvider | Kind::UserProfile | Kind::Group | Kind::User => return Ok(()),
    }
    for ch in changes {
        journal.push(format!(
            "~ {kind} {name}: {}: {} -> {}",
            ch.field, ch.old, ch.new
        ));
    }
    Ok(())
}

/// A resource server's operations: its representation and its roles.
async fn resource_server(
    admin: &Admin,
    desired: &Desired,
    live: &Live,
    name: &str,
    ops: &BTreeSet<Op>,
    prune: bool,
) -> Result<(), ApplyError> {
    let realm = admin.realm.as_str();
    let rs = desired
        .resource_servers
        .iter()
        .find(|r| r.client_id == name)
        .ok_or_else(|| missing(name))?;
    let uuid = id_of(live, name)?;
    for &op in ops {
        match op {
            Op::Representation => {
                let mut rep = rs.rep.clone();
                rep.id = Some(uuid.clone());
                admin
                    .run(format!("update resource server {name}"), || {
                        admin
                            .api
                            .realm_clients_with_client_uuid_put(realm, &uuid, rep.clone())
                    })
                    .await?;
            }
            Op::ClientRoles => client_roles(admin, live, &uuid, name, &rs.roles, prune).await?,
            Op::ScopeMappers
            | Op::ClientMappers
            | Op::ScopeRoleMappings
            | Op::ClientRoleMappings
            | Op::ClientScopes
            | Op::ServiceAccountRoles
            | Op::ServiceAccountGroups
            | Op::IdentityProvider
            | Op::ProfileAttributes
            | Op::GroupRoles
            | Op::UserCreate
            | Op::UserAttributes
            | Op::UserLink
            | Op::UserRoles
            | Op::UserGroups => return Err(not_for(Kind::ResourceServer, name, op)),
        }
    }
    Ok(())
}

/// Creates the roles of `want` that `name` lacks and, with `prune`, removes
/// the others (the plan counted them as removals).
async fn client_roles(
    admin: &Admin,
    live: &Live,
    uuid: &str,
    name: &str,
    want: &BTreeSet<String>,
    prune: bool,
) -> Result<(), ApplyError> {
    let realm = admin.realm.as_str();
    let have = live.roles.get(name).cloned().unwrap_or_default();
    for r in want.difference(&have) {
        let role = RoleRepresentation {
            name: Some(r.clone()),
            ..Default::default()
        };
        admin
            .run(format!("create role {name}/{r}"), || {
                admin
                    .api
                    .realm_clients_with_client_uuid_roles_post(realm, uuid, role.clone())
            })
            .await?;
    }
    for r in have.difference(want).filter(|_| prune) {
        admin
            .run(format!("remove role {name}/{r}"), || {
                admin
                    .api
                    .realm_clients_with_client_uuid_roles_with_role_name_delete(realm, uuid, r)
            })
            .await?;
    }
    Ok(())
}

/// A client scope's operations: its representation, mappers and role scope mappings.
async fn scope(
    admin: &Admin,
    desired: &Desired,
    live: &Live,
    name: &str,
    ops: &BTreeSet<Op>,
) -> Result<(), ApplyError> {
    let realm = admin.realm.as_str();
    let s = desired
        .scopes
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| missing(name))?;
    let l = live
        .scopes
        .get(name)
        .ok_or_else(|| missing(&format!("client scope {name}")))?;
    let id = l.id.clone().ok_or_else(|| missing(name))?;
    for &op in ops {
        match op {
            Op::Representation => {
                let mut rep = s.rep.clone();
                rep.id = Some(id.clone());
                admin
                    .run(format!("update client scope {name}"), || {
                        admin.api.realm_client_scopes_with_client_scope_id_put(
                            realm,
                            &id,
                            rep.clone(),
                        )
                    })
                    .await?;
            }
            Op::ScopeMappers => scope_mappers(admin, l, &id, name, &s.mappers).await?,
            Op::ScopeRoleMappings => {
                let holder = Holder::ClientScope(&id);
                let what = format!("client scope {name}");
                reconcile_roles(admin, holder, &what, &s.scope_mappings, Leave::NOTHING).await?;
            }
            Op::ClientRoles
            | Op::ClientMappers
            | Op::ClientRoleMappings
            | Op::ClientScopes
            | Op::ServiceAccountRoles
            | Op::ServiceAccountGroups
            | Op::IdentityProvider
            | Op::ProfileAttributes
            | Op::GroupRoles
            | Op::UserCreate
            | Op::UserAttributes
            | Op::UserLink
            | Op::UserRoles
            | Op::UserGroups => return Err(not_for(Kind::Scope, name, op)),
        }
    }
    Ok(())
}

/// Makes the scope's protocol mappers the desired ones: added, updated in
/// place (same id), extra ones removed.
async fn scope_mappers(
    admin: &Admin,
    live: &::keycloak::types::ClientScopeRepresentation,
    id: &str,
    name: &str,
    want: &[::keycloak::types::ProtocolMapperRepresentation],
) -> Result<(), ApplyError> {
    let realm = admin.realm.as_str();
    let live_mappers = live.protocol_mappers.clone().unwrap_or_default();
    for m in want {
        match live_mappers.iter().find(|x| x.name == m.name) {
            None => {
                admin
                    .run(format!("add mapper to client scope {name}"), || {
                        admin
                            .api
                            .realm_client_scopes_with_client_scope_id_protocol_mappers_models_post(
                                realm,
                                id,
                                m.clone(),
                            )
                    })
                    .await?;
            }
            Some(x) => {
                let mut body = m.clone();
                body.id = x.id.clone();
                let mid = x.id.clone().unwrap_or_default();
                admin.run(format!("update mapper of client scope {name}"), || admin.api.realm_client_scopes_with_client_scope_id_protocol_mappers_models_with_id_put(realm, id, &mid, body.clone())).await?;
            }
        }
    }
    for x in live_mappers
        .iter()
        .filter(|x| !want.iter().any(|m| m.name == x.name))
    {
        let mid = x.id.clone().unwrap_or_default();
        admin.run(format!("remove mapper from client scope {name}"), || admin.api.realm_client_scopes_with_client_scope_id_protocol_mappers_models_with_id_delete(realm, id, &mid)).await?;
    }
    Ok(())
}

/// A client's operations: its representation, scopes, own mappers and scope
/// mappings (removed), and its service account's roles and groups.
async fn client(
    admin: &Admin,
    desired: &Desired,
    live: &Live,
    name: &str,
    ops: &BTreeSet<Op>,
) -> Result<(), ApplyError> {
    let realm = admin.realm.as_str();
    let c = desired
        .clients
        .iter()
        .find(|c| c.client_id == name)
        .ok_or_else(|| missing(name))?;
    let uuid = id_of(live, name)?;
    for &op in ops {
        match op {
            Op::Representation => {
                let mut rep = c.rep.clone();
                rep.id = Some(uuid.clone());
                admin
                    .run(format!("update client {name}"), || {
                        admin
                            .api
                            .realm_clients_with_client_uuid_put(realm, &uuid, rep.clone())
                    })
                    .await?;
            }
            Op::ClientScopes => client_scopes(admin, live, c, &uuid).await?,
            Op::ClientMappers => {
                for m in live
                    .clients
                    .get(name)
                    .and_then(|l| l.protocol_mappers.clone())
                    .unwrap_or_default()
                {
                    let mid = m.id.unwrap_or_default();
                    admin.run(format!("remove mapper from client {name}"), || admin.api.realm_clients_with_client_uuid_protocol_mappers_models_with_id_delete(
                            realm, &uuid, &mid,
                        )).await?;
                }
            }
            // None: `fullScopeAllowed` is off and the scopes carry the roles.
            Op::ClientRoleMappings => {
                let holder = Holder::Client(&uuid);
                reconcile_roles(admin, holder, name, &BTreeMap::new(), Leave::NOTHING).await?;
            }
            // A service account switched off by the representation's update is
            // gone with its roles and groups (Keycloak deletes its user).
            Op::ServiceAccountRoles | Op::ServiceAccountGroups
                if c.rep.service_accounts_enabled != Some(true) => {}
            // Exactly the roles its scopes carry.
            Op::ServiceAccountRoles => {
                let user = service_account(admin, &uuid, name).await?;
                let what = format!("the service account of {name}");
                let holder = Holder::User(&user);
                reconcile_roles(admin, holder, &what, &c.roles, Leave::BUILT_IN).await?;
            }
            Op::ServiceAccountGroups => {
                let user = service_account(admin, &uuid, name).await?;
                leave_groups(admin, &user, name).await?;
            }
            Op::ClientRoles
            | Op::ScopeMappers
            | Op::ScopeRoleMappings
            | Op::IdentityProvider
            | Op::ProfileAttributes
            | Op::GroupRoles
            | Op::UserCreate
            | Op::UserAttributes
            | Op::UserLink
            | Op::UserRoles
            | Op::UserGroups => return Err(not_for(Kind::Client, name, op)),
        }
    }
    Ok(())
}

/// The id of the client's service-account user, read now: a service account
/// switched on by the representation's update was just created.
async fn service_account(admin: &Admin, uuid: &str, name: &str) -> Result<String, ApplyError> {
    let realm = admin.realm.as_str();
    admin
        .run(format!("read the service-account user of {name}"), || {
            admin
                .api
                .realm_clients_with_client_uuid_service_account_user_get(realm, uuid)
        })
        .await?
        .id
        .ok_or_else(|| missing(&format!("service-account user of {name}")))
}

/// Takes the service account out of every group (a group's roles would reach
/// the client's tokens).
async fn leave_groups(admin: &Admin, user: &str, name: &str) -> Result<(), ApplyError> {
    let realm = admin.realm.as_str();
    let groups: Vec<::keycloak::types::GroupRepresentation> = admin
        .list(
            &format!("/users/{}/groups", Admin::seg(user)),
            &[],
            &format!("read the groups of the service account of {name}"),
        )
        .await?;
    for g in groups {
        let (Some(gid), path) = (g.id, g.path.unwrap_or_default()) else {
            continue;
        };
        admin
            .run(
                format!("remove the service account of {name} from group {path}"),
                || {
                    admin
                        .api
                        .realm_users_with_user_id_groups_with_group_id_delete(realm, user, &gid)
                },
            )
            .await?;
    }
    Ok(())
}

/// Makes the client's default and optional scopes the desired ones: every
/// detach before any attach (a scope moving between the two lists).
async fn client_scopes(
    admin: &Admin,
    live: &Live,
    c: &super::desired::Client,
    uuid: &str,
) -> Result<(), ApplyError> {
    let realm = admin.realm.as_str();
    let name = c.client_id.as_str();
    let d = live.details.get(name).cloned().unwrap_or_default();
    let scope_id = |n: &str| {
        live.scopes
            .get(n)
            .and_then(|s| s.id.clone())
            .ok_or_else(|| missing(&format!("client scope {n}")))
    };
    let want_default = &default_scopes(c, live);
    for n in d.default_scopes.difference(want_default) {
        let sid = scope_id(n)?;
        admin.run(format!("detach default scope {n} from {name}"), || admin.api.realm_clients_with_client_uuid_default_client_scopes_with_client_scope_id_delete(realm, uuid, &sid)).await?;
    }
    for n in d.optional_scopes.difference(&c.optional_scopes) {
        let sid = scope_id(n)?;
        admin.run(format!("detach optional scope {n} from {name}"), || admin.api.realm_clients_with_client_uuid_optional_client_scopes_with_client_scope_id_delete(realm, uuid, &sid)).await?;
    }
    for n in want_default.difference(&d.default_scopes) {
        let sid = scope_id(n)?;
        admin
            .run(format!("attach default scope {n} to {name}"), || {
                admin
                    .api
                    .realm_clients_with_client_uuid_default_client_scopes_with_client_scope_id_put(
                        realm, uuid, &sid,
                    )
            })
            .await?;
    }
    for n in c.optional_scopes.difference(&d.optional_scopes) {
        let sid = scope_id(n)?;
        admin
            .run(format!("attach optional scope {n} to {name}"), || {
                admin
                    .api
                    .realm_clients_with_client_uuid_optional_client_scopes_with_client_scope_id_put(
                        realm, uuid, &sid,
                    )
            })
            .await?;
    }
    Ok(())
}

async fn remove(
    admin: &Admin,
    live: &Live,
    plan: &Plan,
    journal: &mut Journal<'_>,
) -> Result<(), ApplyError> {
    let realm = admin.realm.as_str();
    let mut order: Vec<_> = plan
        .entries
        .iter()
        .filter(|e| e.action == Action::Remove && e.kind.is_client_side())
        .collect();
    // Clients first, then scopes, then resource servers (nothing refers to them after).
    order.sort_by_key(|e| match e.kind {
        Kind::Client => 0,
        Kind::Scope => 1,
        Kind::ResourceServer
        | Kind::IdentityProvider
        | Kind::UserProfile
        | Kind::Group
        | Kind::User => 2,
    });
    for e in order {
        match e.kind {
            Kind::Scope => {
                let id = live
                    .scopes
                    .get(&e.name)
                    .and_then(|s| s.id.clone())
                    .ok_or_else(|| missing(&e.name))?;
                admin
                    .run(format!("remove client scope {}", e.name), || {
                        admin
                            .api
                            .realm_client_scopes_with_client_scope_id_delete(realm, &id)
                    })
                    .await?;
            }
            // The identities' own apply removes users; other identity objects are kept.
            Kind::IdentityProvider | Kind::UserProfile | Kind::Group | Kind::User => {
                return Err(ApplyError::NotApplicable {
                    object: format!("{} {}", e.kind, e.name),
                    op: Op::Representation,
                });
            }
            Kind::Client | Kind::ResourceServer => {
                let id = id_of(live, &e.name)?;
                admin
                    .run(format!("remove {} {}", e.kind, e.name), || {
                        admin.api.realm_clients_with_client_uuid_delete(realm, &id)
                    })
                    .await?;
            }
        }
        journal.push(format!("- removed {} {}", e.kind, e.name));
    }
    Ok(())
}

/// Sets each `client_secret_basic` client's secret to the configured one when it
/// differs. Needs `manage-clients` (view roles see no secret). Never prints it.
async fn secrets(
    admin: &Admin,
    desired: &Desired,
    live: &Live,
    journal: &mut Journal<'_>,
) -> Result<(), ApplyError> {
    let realm = admin.realm.as_str();
    for c in &desired.clients {
        let Some(secret) = &c.secret else { continue };
        let uuid = id_of(live, &c.client_id)?;
        let current = admin
            .run(format!("read the secret of client {}", c.client_id), || {
                admin
                    .api
                    .realm_clients_with_client_uuid_client_secret_get(realm, &uuid)
            })
            .await?;
        if current.value.as_deref() == Some(secret.expose_secret()) {
            continue;
        }
        let rep = ClientRepresentation {
            id: Some(uuid.clone()),
            client_id: Some(c.client_id.clone()),
            secret: Some(secret.expose_secret().to_string()),
            ..Default::default()
        };
        admin
            .run(format!("set the secret of client {}", c.client_id), || {
                admin
                    .api
                    .realm_clients_with_client_uuid_put(realm, &uuid, rep.clone())
            })
            .await?;
        journal.push(format!(
            "~ client {}: secret set to the configured one (value not shown)",
            c.client_id
        ));
    }
    Ok(())
}
