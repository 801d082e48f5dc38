//! Per-repository Keycloak identities for the JWT Authorization Grant: the
//! identity provider that trusts the service's assertions, the user-profile
//! attributes, the groups of the realm model, and one user per repository (or
//! repository and deployment environment) that a policy of a
//! `jwt_authorization_grant` client can admit. The running service holds no
//! admin rights; these objects exist because `keycloak apply` created them.
//!
//! A user is created with `partialImport` so that its id, and with it the `sub`
//! of its tokens, is [`RepositoryIdentity::user_id`] (UUIDv5 of the identity):
//! the `sub` stays the same if the user is ever deleted and provisioned again.
//! `POST /users` would ignore the id. Its username is derived from the identity
//! alone, so Keycloak's unique usernames keep two racing `apply` runs from making
//! two users; its readable name (`repositoryFullName`) is an attribute, never the
//! key. `enabled` belongs to the operator: a user is created enabled and never
//! re-enabled.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ::keycloak::types::{
    ClientRepresentation, ClientScopeRepresentation, FederatedIdentityRepresentation,
    GroupRepresentation, IdentityProviderRepresentation, ProtocolMapperRepresentation,
    UserRepresentation,
};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::admin::{Admin, AdminError};
use super::bulk;
use super::diff::{value_text, Action, ApplyError, Change, Entry, Journal, Kind, Op, Plan};
use super::model::{join, RealmModel};
use super::realm::{mapping_roles, reconcile_roles, Holder, Leave, OWNER_ATTRIBUTE, REALM_KEY};
use crate::domain::identity::{IdentityKind, RepositoryIdentity};
use crate::inventory::Inventory;
use crate::policy::{always_denied, Policy};

/// The client scope that puts the identity into the token (a default scope of
/// every `jwt_authorization_grant` client; not listed in `scope`).
pub const IDENTITY_SCOPE: &str = "repository-identity";

/// The user-profile attributes `apply` declares (admin-only), and the claims the
/// identity scope maps them to. Keycloak drops undeclared attributes silently.
pub const PROFILE_ATTRIBUTES: [(&str, &str); 4] = [
    ("repositoryUuid", "repository_uuid"),
    ("workspaceUuid", "workspace_uuid"),
    ("repositoryFullName", "repository"),
    ("deploymentEnvironmentUuid", "deployment_environment_uuid"),
];

/// The lowest Keycloak version `plan` and `apply` accept for the grant: the
/// JWT Authorization Grant is supported (not preview) from 26.6; 26.7.0 fixes
/// CVE-2026-11800 (26.6.4 on the 26.6 line, which is not testable here).
pub const MIN_VERSION: (u32, u32, u32) = (26, 7, 0);

/// The service as an issuer, from `[identity]` and `public_url`.
#[derive(Debug, Clone)]
pub struct IdentityInputs {
    /// The assertions' `iss`.
    pub issuer: String,
    /// The identity provider's alias.
    pub alias: String,
    /// The assertions' algorithm.
    pub algorithm: String,
    /// The realm (part of every user id).
    pub realm: String,
}

/// One repository user.
#[derive(Debug, Clone)]
pub struct User {
    /// The identity.
    pub identity: RepositoryIdentity,
    /// Its Keycloak username.
    pub username: String,
    /// Its Keycloak id (the tokens' `sub`).
    pub id: String,
    /// Its attributes (declared in the user profile).
    pub attributes: BTreeMap<String, Vec<String>>,
    /// The groups its grants name.
    pub groups: BTreeSet<String>,
}

/// A group of the realm model.
#[derive(Debug, Clone)]
pub struct Group {
    /// Top-level name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Client roles by resource server.
    pub roles: BTreeMap<String, BTreeSet<String>>,
}

/// Everything the grant needs in the realm.
#[derive(Debug, Clone)]
pub struct Identities {
    /// The identity provider.
    pub provider: IdentityProviderRepresentation,
    /// Groups, by name.
    pub groups: Vec<Group>,
    /// Users, by username.
    pub users: Vec<User>,
}

fn to_map(v: Vec<(&str, String)>) -> HashMap<String, String> {
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The identity client scope: the username mapper (`basic` does not carry
/// `preferred_username`) and one attribute mapper per profile attribute.
pub fn identity_scope(
    owner: &str,
) -> (ClientScopeRepresentation, Vec<ProtocolMapperRepresentation>) {
    let mapper = |name: &str, attribute: &str, claim: &str| ProtocolMapperRepresentation {
        name: Some(name.to_string()),
        protocol: Some("openid-connect".into()),
        protocol_mapper: Some("oidc-usermodel-attribute-mapper".into()),
        config: Some(to_map(vec![
            ("user.attribute", attribute.to_string()),
            ("claim.name", claim.to_string()),
            ("jsonType.label", "String".into()),
            ("access.token.claim", "true".into()),
            ("introspection.token.claim", "true".into()),
            ("id.token.claim", "false".into()),
            ("userinfo.token.claim", "false".into()),
        ])),
        ..Default::default()
    };
    let mut mappers = vec![mapper(
        "preferred_username",
        "username",
        "preferred_username",
    )];
    mappers.extend(PROFILE_ATTRIBUTES.iter().map(|(a, c)| mapper(c, a, c)));
    let rep = ClientScopeRepresentation {
        name: Some(IDENTITY_SCOPE.into()),
        description: Some(
            "the repository identity of keycloak-ci-sts tokens (JWT Authorization Grant)".into(),
        ),
        protocol: Some("openid-connect".into()),
        attributes: Some(to_map(vec![
            (OWNER_ATTRIBUTE, owner.to_string()),
            ("include.in.token.scope", "false".into()),
            ("display.on.consent.screen", "false".into()),
        ])),
        ..Default::default()
    };
    (rep, mappers)
}

/// The identities the policies of `jwt_clients` can admit among the inventory's
/// repositories, with the groups their grants name.
///
/// # Errors
/// A grant naming a group the realm model does not declare; a jwt client
/// without `[identity]`; two policies giving one identity different groups.
pub fn derive(
    inputs: Option<&IdentityInputs>,
    jwt_clients: &BTreeSet<String>,
    policies: &[std::sync::Arc<Policy>],
    inventory: &Inventory,
    model: &RealmModel,
) -> Result<Option<Identities>, Vec<String>> {
    if jwt_clients.is_empty() {
        return Ok(None);
    }
    let Some(inputs) = inputs else {
        return Err(vec![
            "a client uses the JWT Authorization Grant: configure [identity] and public_url".into(),
        ]);
    };
    let mut errors = Vec::new();
    let mut users: BTreeMap<String, User> = BTreeMap::new();
    // The groups each admitting policy names, per user: a token's roles come from
    // every group of the user, so policies that admit one identity must agree on
    // its groups, or one policy's tokens would carry another's roles.
    let mut named: BTreeMap<String, Vec<(String, BTreeSet<String>)>> = BTreeMap::new();
    for p in policies {
        let Some(g) = p.grant.as_ref().filter(|g| jwt_clients.contains(&g.client)) else {
            continue;
        };
        for group in g.groups.iter().filter(|n| !model.groups.contains_key(*n)) {
            errors.push(format!(
                "policy `{}`: group `{group}` is not declared under `groups` in keycloak/realm.yaml (the allow-list)",
                p.id
            ));
        }
        for (identity, full_name) in admitted(p, g, policies, inventory) {
            let user = users
                .entry(identity.username())
                .or_insert_with(|| new_identity_user(identity, full_name, &inputs.realm));
            user.groups.extend(g.groups.iter().cloned());
            named
                .entry(user.username.clone())
                .or_default()
                .push((p.id.clone(), g.groups.clone()));
        }
    }
    errors.extend(group_disagreements(&named, &users));
    if !errors.is_empty() {
        return Err(errors);
    }
    let groups = model
        .groups
        .iter()
        .map(|(name, spec)| Group {
            name: name.clone(),
            description: spec
                .description
                .clone()
                .unwrap_or_else(|| "repository identities (keycloak-ci-sts)".into()),
            roles: spec.roles.clone(),
        })
        .collect();
    Ok(Some(Identities {
        provider: provider_rep(inputs, &model.owner),
        groups,
        users: users.into_values().collect(),
    }))
}

/// The identities policy `p` (granting `g`) admits among the inventory's
/// repositories (and their environments), less those every policy denies;
/// each with its repository's full name.
fn admitted<'a>(
    p: &Policy,
    g: &crate::policy::GrantSpec,
    policies: &[std::sync::Arc<Policy>],
    inventory: &'a Inventory,
) -> Vec<(RepositoryIdentity, &'a str)> {
    let mut out = Vec::new();
    for repo in inventory.repositories() {
        let ws = repo.workspace().workspace_uuid;
        if always_denied(policies, &ws, &repo.uuid(), &g.audience) {
            continue;
        }
        let envs: Vec<Option<crate::domain::BbUuid>> = match g.identity.unwrap_or_default() {
            IdentityKind::Repository => vec![None],
            IdentityKind::RepositoryEnvironment => {
                repo.environments().map(|e| Some(e.uuid)).collect()
            }
        };
        out.extend(
            envs.into_iter()
                .filter(|env| p.admits(&ws, &repo.uuid(), env.as_ref()))
                .map(|environment| {
                    let identity = RepositoryIdentity {
                        workspace: ws,
                        repository: repo.uuid(),
                        environment,
                    };
                    (identity, repo.full_name())
                }),
        );
    }
    out
}

/// The user of `identity` (of repository `full_name`), without groups.
fn new_identity_user(identity: RepositoryIdentity, full_name: &str, realm: &str) -> User {
    let mut attributes = BTreeMap::from([
        (
            "repositoryUuid".to_string(),
            vec![identity.repository.braced()],
        ),
        (
            "workspaceUuid".to_string(),
            vec![identity.workspace.braced()],
        ),
        (
            "repositoryFullName".to_string(),
            vec![full_name.to_string()],
        ),
    ]);
    if let Some(e) = identity.environment {
        attributes.insert("deploymentEnvironmentUuid".into(), vec![e.braced()]);
    }
    User {
        identity,
        id: identity.user_id(realm),
        username: identity.username(),
        attributes,
        groups: BTreeSet::new(),
    }
}

/// Policies that admit one identity but name different groups.
fn group_disagreements(
    named: &BTreeMap<String, Vec<(String, BTreeSet<String>)>>,
    users: &BTreeMap<String, User>,
) -> Vec<String> {
    let mut errors = Vec::new();
    for (username, by_policy) in named {
        let first = &by_policy[0];
        if let Some(other) = by_policy.iter().find(|(_, g)| g != &first.1) {
            let repo = users
                .get(username)
                .map(|u| u.attributes["repositoryFullName"].join(""))
                .unwrap_or_default();
            errors.push(format!(
                "policies `{}` (groups {}) and `{}` (groups {}) both admit {repo}'s identity: its user is in every \
                 group either names, so each policy's tokens could carry the other's roles; give them the same \
                 groups, or use separate identities (identity: repository_environment)",
                first.0,
                join(&first.1),
                other.0,
                join(&other.1)
            ));
        }
    }
    errors
}

/// The identity provider that trusts the service's assertions.
fn provider_rep(inputs: &IdentityInputs, owner: &str) -> IdentityProviderRepresentation {
    IdentityProviderRepresentation {
        alias: Some(inputs.alias.clone()),
        display_name: Some("keycloak-ci-sts (repository identities)".into()),
        provider_id: Some("jwt-authorization-grant".into()),
        enabled: Some(true),
        config: Some(to_map(vec![
            (OWNER_ATTRIBUTE, owner.to_string()),
            ("issuer", inputs.issuer.clone()),
            ("useJwksUrl", "true".into()),
            (
                "jwksUrl",
                format!(
                    "{}{}",
                    inputs.issuer,
                    crate::domain::identity::IDENTITY_JWKS_PATH
                ),
            ),
            ("jwtAuthorizationGrantEnabled", "true".into()),
            (
                "jwtAuthorizationGrantAssertionSignatureAlg",
                inputs.algorithm.clone(),
            ),
            ("jwtAuthorizationGrantAssertionReuseAllowed", "false".into()),
            ("jwtAuthorizationGrantLimitAccessTokenExp", "true".into()),
            (
                "jwtAuthorizationGrantMaxAllowedAssertionExpiration",
                "60".into(),
            ),
            ("jwtAuthorizationGrantAllowedClockSkew", "5".into()),
        ])),
        ..Default::default()
    }
}

/// The live state of the identity objects.
#[derive(Debug, Default)]
pub struct LiveIdentities {
    /// The identity provider, when it exists.
    pub provider: Option<IdentityProviderRepresentation>,
    /// The user-profile configuration (raw JSON: every field kept on PUT).
    pub profile: Value,
    /// Groups by name: (representation, client roles by clientId).
    pub groups: BTreeMap<String, (GroupRepresentation, BTreeMap<String, BTreeSet<String>>)>,
    /// Desired users that exist, by username, with their links and group paths.
    pub users: BTreeMap<String, LiveUser>,
    /// Problems found while reading (duplicate links, a username taken by another user).
    pub problems: Vec<String>,
    /// Users linked to the identity provider that no policy needs, by username:
    /// (id, `enabled`).
    pub unneeded: BTreeMap<String, (String, Option<bool>)>,
    /// The server's JWT Authorization Grant support: problems when missing.
    pub version_problems: Vec<String>,
    /// What plan shows as notes.
    pub notes: Vec<String>,
}

/// A live user.
#[derive(Debug, Clone)]
pub struct LiveUser {
    /// Representation.
    pub rep: UserRepresentation,
    /// Federated identities.
    pub links: Vec<FederatedIdentityRepresentation>,
    /// Group paths.
    pub groups: BTreeSet<String>,
    /// Roles mapped to the user directly (not through groups), by `clientId`;
    /// realm roles under `(realm)` without `default-roles-<realm>`.
    pub roles: BTreeMap<String, BTreeSet<String>>,
}

fn not_found(e: &AdminError) -> bool {
    e.status() == Some(404)
}

/// Parses `26.7.3` (or `26.7.3-SNAPSHOT`).
fn version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// Whether the server supports the grant: `features` of `/admin/serverinfo`
/// (readable with any realm-management role) must list
/// `JWT_AUTHORIZATION_GRANT` enabled and not preview; `systemInfo.version`, when
/// the admin client may see it (manage-realm, 26.5+), must be at least
/// [`MIN_VERSION`].
async fn check_version(admin: &Admin) -> Result<Vec<String>, AdminError> {
    let info: Value = admin
        .get_root_capped("/admin/serverinfo", "read the server's features")
        .await?;
    let mut problems = Vec::new();
    let feature = info["features"]
        .as_array()
        .and_then(|f| f.iter().find(|x| x["name"] == "JWT_AUTHORIZATION_GRANT"));
    let usable = feature.is_some_and(|f| {
        f["enabled"] == true && f["type"] != "PREVIEW" && f["type"] != "EXPERIMENTAL"
    });
    if !usable {
        problems.push(format!(
            "this Keycloak does not support the JWT Authorization Grant without preview flags ({}); it needs Keycloak {}.{}.{} or newer",
            feature.map(|f| format!("feature {} enabled={}", f["type"], f["enabled"])).unwrap_or_else(|| "feature absent".into()),
            MIN_VERSION.0, MIN_VERSION.1, MIN_VERSION.2
        ));
    }
    if let Some(v) = info["systemInfo"]["version"].as_str().and_then(version) {
        if v < MIN_VERSION {
            problems.push(format!(
                "Keycloak {}.{}.{} is older than {}.{}.{}, the lowest version this mode accepts (CVE-2026-11800)",
                v.0, v.1, v.2, MIN_VERSION.0, MIN_VERSION.1, MIN_VERSION.2
            ));
        }
    }
    Ok(problems)
}

impl LiveIdentities {
    /// Reads the identity objects (view-users, view-identity-providers,
    /// view-clients): the provider, the profile and the declared groups one by
    /// one; the users, group members and role holders in pages
    /// ([`super::bulk`]); and the links of each user linked to the provider,
    /// the one read Keycloak has per user. `clients` is the realm's clients (by
    /// `clientId`), whose roles' holders are read.
    ///
    /// # Errors
    /// The first failed call.
    pub async fn read(
        admin: &Admin,
        want: &Identities,
        alias: &str,
        clients: &BTreeMap<String, ClientRepresentation>,
    ) -> Result<Self, AdminError> {
        let mut live = LiveIdentities {
            version_problems: check_version(admin).await?,
            provider: read_provider(admin, alias).await?,
            profile: admin
                .get_capped("/users/profile", &[], "read the user profile")
                .await?,
            groups: declared_groups(admin, want).await?,
            ..Default::default()
        };
        let linked = bulk::linked_users(admin, alias).await?;
        let links =
            bulk::links(admin, linked.iter().filter_map(|u| u.id.clone()).collect()).await?;
        let by_name = match want.users.is_empty() {
            true => BTreeMap::new(),
            false => bulk::repository_users(admin).await?,
        };
        let found = live.match_users(want, by_name, &linked);
        let ids: BTreeSet<String> = found.iter().filter_map(|r| r.id.clone()).collect();
        let (mut groups, (mut roles, per_user)) = match ids.is_empty() {
            true => Default::default(),
            false => (
                bulk::group_paths(admin, &ids).await?,
                bulk::direct_roles(admin, clients, &ids).await?,
            ),
        };
        if per_user {
            live.notes.push(format!(
                "the admin client may not list realm roles (no view-realm): the realm roles of the {} repository users were read one user at a time; give it view-realm to read them in pages",
                ids.len()
            ));
        }
        for rep in found {
            let (Some(name), Some(id)) = (rep.username.clone(), rep.id.clone()) else {
                continue;
            };
            let user = LiveUser {
                links: links.get(&id).cloned().unwrap_or_default(),
                groups: groups.remove(&id).unwrap_or_default(),
                roles: roles.remove(&id).unwrap_or_default(),
                rep,
            };
            live.users.insert(name, user);
        }
        live.shared_links(want, &linked, &links, alias);
        live.sort_linked(want, linked, &admin.realm);
        Ok(live)
    }

    /// The desired users that exist with the id `apply` gives them; the others
    /// of their usernames or ids are problems (renamed, or created by hand).
    fn match_users(
        &mut self,
        want: &Identities,
        mut by_name: BTreeMap<String, UserRepresentation>,
        linked: &[UserRepresentation],
    ) -> Vec<UserRepresentation> {
        let mut found = Vec::new();
        for u in &want.users {
            let subject = u.identity.subject();
            match by_name.remove(&u.username) {
                None => {
                    // Renamed? The id is ours but the username is not.
                    if let Some(other) = linked.iter().find(|x| x.id.as_deref() == Some(&u.id)) {
                        self.problems.push(format!(
                            "user {} (the id of {}'s identity) is named {}: a renamed repository user; rename it back to {} by hand",
                            u.id,
                            subject,
                            other.username.as_deref().unwrap_or("?"),
                            u.username
                        ));
                    }
                }
                Some(rep) if rep.id.as_deref() != Some(&u.id) => self.problems.push(format!(
                    "user {} exists with id {} instead of {} (created outside keycloak apply): its tokens would not carry the stable sub; delete it by hand",
                    u.username,
                    rep.id.as_deref().unwrap_or("?"),
                    u.id
                )),
                Some(rep) => found.push(rep),
            }
        }
        found
    }

    /// A desired identity whose subject other users are linked to as well:
    /// Keycloak would issue its tokens for any of them.
    fn shared_links(
        &mut self,
        want: &Identities,
        linked: &[UserRepresentation],
        links: &BTreeMap<String, Vec<FederatedIdentityRepresentation>>,
        alias: &str,
    ) {
        let mut by_subject: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for u in linked {
            let (Some(id), Some(name)) = (u.id.as_deref(), u.username.as_deref()) else {
                continue;
            };
            for l in links.get(id).into_iter().flatten() {
                if let (Some(a), Some(s)) = (l.identity_provider.as_deref(), l.user_id.as_deref()) {
                    if a == alias {
                        by_subject.entry(s).or_default().insert(name);
                    }
                }
            }
        }
        for u in &want.users {
            let subject = u.identity.subject();
            let others: Vec<&str> = by_subject
                .get(subject.as_str())
                .into_iter()
                .flatten()
                .filter(|n| **n != u.username)
                .copied()
                .collect();
            if !others.is_empty() {
                self.problems.push(format!(
                    "identity {subject} is also linked to user(s) {} besides {}: Keycloak would issue tokens for any of them; delete the extra link(s) by hand",
                    others.join(", "),
                    u.username
                ));
            }
        }
    }

    /// The users linked to the provider that no policy needs: ours (the id
    /// `apply` gives that username's identity) are unneeded, others noted.
    fn sort_linked(&mut self, want: &Identities, linked: Vec<UserRepresentation>, realm: &str) {
        let wanted: BTreeSet<&str> = want.users.iter().map(|u| u.username.as_str()).collect();
        for x in linked {
            let (Some(name), Some(id)) = (x.username, x.id) else {
                continue;
            };
            if wanted.contains(name.as_str()) {
                continue;
            }
            let ours =
                RepositoryIdentity::from_username(&name).is_some_and(|i| i.user_id(realm) == id);
            if ours {
                self.unneeded.insert(name, (id, x.enabled));
            } else {
                self.notes.push(format!("user {name} is linked to the identity provider but was not created by keycloak apply: left alone"));
            }
        }
    }
}

/// The identity provider `alias`, when it exists.
async fn read_provider(
    admin: &Admin,
    alias: &str,
) -> Result<Option<IdentityProviderRepresentation>, AdminError> {
    let realm = admin.realm.as_str();
    match admin
        .run("read the identity provider", || {
            admin
                .api
                .realm_identity_provider_instances_with_alias_get(realm, alias)
        })
        .await
    {
        Ok(p) => Ok(Some(p)),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The declared groups that exist (top level, exact name), with their role
/// mappings by `clientId`.
async fn declared_groups(
    admin: &Admin,
    want: &Identities,
) -> Result<BTreeMap<String, (GroupRepresentation, BTreeMap<String, BTreeSet<String>>)>, AdminError>
{
    let realm = admin.realm.as_str();
    let mut out = BTreeMap::new();
    for g in &want.groups {
        let found = find_groups(admin, &g.name, false).await?;
        let top = format!("/{}", g.name);
        let Some(rep) = found
            .into_iter()
            .find(|r| r.name.as_deref() == Some(&g.name) && r.path.as_deref() == Some(&top))
        else {
            continue;
        };
        let id = rep.id.clone().unwrap_or_default();
        let m = admin
            .run(format!("read roles of group {}", g.name), || {
                admin
                    .api
                    .realm_groups_with_group_id_role_mappings_get(realm, &id)
            })
            .await?;
        out.insert(g.name.clone(), (rep, mapping_roles(m)));
    }
    Ok(out)
}

impl LiveIdentities {
    /// The live `enabled` of the identity object `plan` calls `kind` `name`
    /// (`plan::keep_operator_switches`).
    pub fn enabled(&self, kind: Kind, name: &str) -> Option<bool> {
        match kind {
            Kind::IdentityProvider => self.provider.as_ref()?.enabled,
            Kind::User => self
                .users
                .get(name)
                .and_then(|u| u.rep.enabled)
                .or_else(|| self.unneeded.get(name)?.1),
            Kind::ResourceServer | Kind::Scope | Kind::Client | Kind::UserProfile | Kind::Group => {
                None
            }
        }
    }
}

/// Adds the identity entries to `plan`.
pub fn plan(want: &Identities, live: &LiveIdentities, owner: &str, prune: bool, plan: &mut Plan) {
    plan.problems.extend(live.version_problems.iter().cloned());
    plan.problems.extend(live.problems.iter().cloned());
    plan.notes.extend(live.notes.iter().cloned());
    let alias = want.provider.alias.clone().unwrap_or_default();
    provider_entry(want, live, owner, &alias, plan);
    profile_entry(live, plan);
    group_entries(want, live, owner, plan);
    user_entries(want, live, &alias, plan);
    let gone = if prune {
        Action::Remove
    } else {
        Action::Unneeded
    };
    for name in live.unneeded.keys() {
        plan.entries.push(entry(Kind::User, name, gone.clone()));
    }
}

fn entry(kind: Kind, name: &str, action: Action) -> Entry {
    Entry {
        kind,
        name: name.to_string(),
        action,
        operator_disabled: false,
    }
}

/// The identity provider's entry: its kind, `enabled` and every config key.
fn provider_entry(
    want: &Identities,
    live: &LiveIdentities,
    owner: &str,
    alias: &str,
    plan: &mut Plan,
) {
    match &live.provider {
        Some(p)
            if p.config
                .as_ref()
                .and_then(|c| c.get(OWNER_ATTRIBUTE))
                .map(String::as_str)
                != Some(owner) =>
        {
            plan.entries.push(entry(Kind::IdentityProvider, alias, Action::Conflict(format!(
                "exists and was not created by keycloak apply (no config key {OWNER_ATTRIBUTE} = `{owner}`): left alone"
            ))));
        }
        l => {
            let mut ch = Vec::new();
            let d = serde_json::to_value(&want.provider).unwrap_or(Value::Null);
            let lv = l
                .as_ref()
                .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
                .unwrap_or(Value::Null);
            for k in ["providerId", "enabled"] {
                if d[k] != lv[k] {
                    ch.push(Change {
                        op: Op::IdentityProvider,
                        field: k.into(),
                        old: value_text(&lv[k]),
                        new: value_text(&d[k]),
                    });
                }
            }
            // PUT replaces the whole config: every key is compared, extra ones too.
            let dc = want.provider.config.clone().unwrap_or_default();
            let lc = l
                .as_ref()
                .and_then(|p| p.config.clone())
                .unwrap_or_default();
            let keys: BTreeSet<&String> = dc.keys().chain(lc.keys()).collect();
            for k in keys {
                let (o, n) = (
                    lc.get(k).cloned().unwrap_or_else(|| "(unset)".into()),
                    dc.get(k).cloned().unwrap_or_else(|| "(unset)".into()),
                );
                if o != n {
                    ch.push(Change {
                        op: Op::IdentityProvider,
                        field: format!("config.{k}"),
                        old: o,
                        new: n,
                    });
                }
            }
            plan.entries.push(entry(
                Kind::IdentityProvider,
                alias,
                action(l.is_some(), ch),
            ));
        }
    }
}

/// The attribute names a user-profile configuration declares.
fn declared_attributes(profile: &Value) -> BTreeSet<String> {
    profile["attributes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The user profile's entry: the attributes it must declare.
fn profile_entry(live: &LiveIdentities, plan: &mut Plan) {
    let declared = declared_attributes(&live.profile);
    let needed: BTreeSet<String> = PROFILE_ATTRIBUTES
        .iter()
        .map(|(a, _)| a.to_string())
        .collect();
    let missing: BTreeSet<String> = needed.difference(&declared).cloned().collect();
    let profile = if missing.is_empty() {
        Action::InSync
    } else {
        Action::Update(vec![Change {
            op: Op::ProfileAttributes,
            field: "attributes".into(),
            old: "(missing) ".to_string() + &join(&missing),
            new: join(&needed),
        }])
    };
    plan.entries
        .push(entry(Kind::UserProfile, "attributes", profile));
}

/// The groups' entries: their role mappings (realm and built-in roles are problems).
fn group_entries(want: &Identities, live: &LiveIdentities, owner: &str, plan: &mut Plan) {
    for g in &want.groups {
        match live.groups.get(&g.name) {
            Some((rep, _))
                if !rep
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(OWNER_ATTRIBUTE))
                    .is_some_and(|v| v.iter().any(|x| x == owner)) =>
            {
                plan.entries.push(entry(Kind::Group, &g.name, Action::Conflict(format!(
                    "exists and was not created by keycloak apply (no attribute {OWNER_ATTRIBUTE}): left alone"
                ))));
            }
            l => {
                let mut ch = Vec::new();
                let have = l.map(|(_, r)| r.clone()).unwrap_or_default();
                for (client, roles) in &have {
                    if super::model::is_reserved_client(client) || client == REALM_KEY {
                        plan.problems.push(format!(
                            "group {} holds {} roles ({}): its members' tokens could carry them; remove them by hand",
                            g.name, client, join(roles)
                        ));
                    }
                }
                let servers: BTreeSet<&String> = g.roles.keys().chain(have.keys()).collect();
                let none = BTreeSet::new();
                for rs in servers {
                    let (o, n) = (
                        have.get(rs).unwrap_or(&none),
                        g.roles.get(rs).unwrap_or(&none),
                    );
                    if o != n {
                        ch.push(Change {
                            op: Op::GroupRoles,
                            field: format!("roles[{rs}]"),
                            old: join(o),
                            new: join(n),
                        });
                    }
                }
                plan.entries
                    .push(entry(Kind::Group, &g.name, action(l.is_some(), ch)));
            }
        }
    }
}

/// A repository user's fields when it is created.
fn new_user(u: &User, alias: &str) -> Vec<Change> {
    let mut ch = vec![
        Change {
            op: Op::UserCreate,
            field: "id (the tokens' sub)".into(),
            old: "(unset)".into(),
            new: u.id.clone(),
        },
        Change {
            op: Op::UserLink,
            field: "link".into(),
            old: "(unset)".into(),
            new: format!("{alias}: {}", u.identity.subject()),
        },
    ];
    ch.extend(u.attributes.iter().map(|(k, v)| Change {
        op: Op::UserAttributes,
        field: format!("attributes.{k}"),
        old: "(unset)".into(),
        new: v.join(", "),
    }));
    if !u.groups.is_empty() {
        ch.push(Change {
            op: Op::UserGroups,
            field: "groups".into(),
            old: "(none)".into(),
            new: join(&u.groups),
        });
    }
    ch
}

/// The repository users' entries: created with id, link, attributes and
/// groups, or compared field by field.
fn user_entries(want: &Identities, live: &LiveIdentities, alias: &str, plan: &mut Plan) {
    let owned_groups: BTreeSet<String> =
        want.groups.iter().map(|g| format!("/{}", g.name)).collect();
    for u in &want.users {
        let Some(l) = live.users.get(&u.username) else {
            let ch = new_user(u, alias);
            plan.entries
                .push(entry(Kind::User, &u.username, Action::Create(ch)));
            continue;
        };
        let mut ch = identity_changes(u, l, alias);
        ch.extend(membership_changes(u, l, &owned_groups, plan));
        if let Some(actions) = l.rep.required_actions.as_ref().filter(|a| !a.is_empty()) {
            plan.notes.push(format!(
                "user {} has pending required actions ({}): Keycloak refuses its tokens until they are \
                 done, so its pipelines get identity.not_ready; remove them (Users -> {} -> Required user actions) \
                 unless they were set on purpose",
                u.username,
                actions.iter().map(|a| crate::provision::admin::sanitize(a)).collect::<Vec<_>>().join(", "),
                u.username
            ));
        }
        plan.entries
            .push(entry(Kind::User, &u.username, action(true, ch)));
    }
}

/// An existing user's attribute and link changes.
fn identity_changes(u: &User, l: &LiveUser, alias: &str) -> Vec<Change> {
    let mut ch = Vec::new();
    let have_attrs = l.rep.attributes.clone().unwrap_or_default();
    for (k, v) in &u.attributes {
        let old = have_attrs.get(k).cloned().unwrap_or_default();
        if &old != v {
            ch.push(Change {
                op: Op::UserAttributes,
                field: format!("attributes.{k}"),
                old: if old.is_empty() {
                    "(unset)".into()
                } else {
                    old.join(", ")
                },
                new: v.join(", "),
            });
        }
    }
    let link = l
        .links
        .iter()
        .find(|f| f.identity_provider.as_deref() == Some(alias));
    let subject = u.identity.subject();
    if link.and_then(|f| f.user_id.as_deref()) != Some(subject.as_str()) {
        ch.push(Change {
            op: Op::UserLink,
            field: "link".into(),
            old: link
                .and_then(|f| f.user_id.clone())
                .unwrap_or_else(|| "(unset)".into()),
            new: format!("{alias}: {subject}"),
        });
    }
    ch
}

/// An existing user's direct roles (none wanted: groups give them) and group
/// memberships; roles of Keycloak's own clients and undeclared groups are
/// problems for a human.
fn membership_changes(
    u: &User,
    l: &LiveUser,
    owned_groups: &BTreeSet<String>,
    plan: &mut Plan,
) -> Vec<Change> {
    let mut ch = Vec::new();
    for (client, roles) in &l.roles {
        if super::model::is_reserved_client(client) {
            plan.problems.push(format!(
                "user {} holds roles of Keycloak's built-in client {client} ({}): remove them by hand and find out who added them",
                u.username,
                join(roles)
            ));
        } else {
            ch.push(Change {
                op: Op::UserRoles,
                field: format!("roles[{client}]"),
                old: join(roles),
                new: "(none: roles come from groups)".into(),
            });
        }
    }
    for g in l.groups.difference(owned_groups) {
        plan.problems.push(format!(
            "user {} is a member of group {g}, which keycloak/realm.yaml does not declare: its roles would reach the repository's tokens; remove the membership by hand",
            u.username
        ));
    }
    let have_groups: BTreeSet<String> = l
        .groups
        .intersection(owned_groups)
        .map(|p| p.trim_start_matches('/').to_string())
        .collect();
    if have_groups != u.groups {
        ch.push(Change {
            op: Op::UserGroups,
            field: "groups".into(),
            old: join(&have_groups),
            new: join(&u.groups),
        });
    }
    ch
}

fn action(exists: bool, changes: Vec<Change>) -> Action {
    match (exists, changes.is_empty()) {
        (false, _) => Action::Create(changes),
        (true, true) => Action::InSync,
        (true, false) => Action::Update(changes),
    }
}

/// Makes the identity entries of `plan` true; appends each change to `journal`.
///
/// # Errors
/// The first failed call.
pub async fn apply(
    admin: &Admin,
    want: &Identities,
    live: &LiveIdentities,
    plan: &Plan,
    owner: &str,
    journal: &mut Journal<'_>,
) -> Result<(), ApplyError> {
    let alias = want.provider.alias.clone().unwrap_or_default();
    let users: HashMap<&str, &User> = want
        .users
        .iter()
        .map(|u| (u.username.as_str(), u))
        .collect();
    let mut new_users = Vec::new();
    for e in &plan.entries {
        let changes = match &e.action {
            Action::Create(c) | Action::Update(c) => c,
            Action::Remove if e.kind == Kind::User => {
                remove_user(admin, live, &e.name, journal).await?;
                continue;
            }
            Action::Remove | Action::InSync | Action::Conflict(_) | Action::Unneeded => continue,
        };
        if let Some(c) = changes.iter().find(|c| !c.op.applies_to(e.kind)) {
            return Err(ApplyError::NotApplicable {
                object: format!("{} {}", e.kind, e.name),
                op: c.op,
            });
        }
        match e.kind {
            Kind::IdentityProvider => provider(admin, want, live, &alias).await?,
            Kind::UserProfile => profile(admin, live).await?,
            Kind::Group => group(admin, want, live, &e.name, owner).await?,
            Kind::User => match (live.users.get(&e.name), users.get(e.name.as_str())) {
                (Some(l), Some(u)) => update_user(admin, want, u, l, &alias).await?,
                // Created in batches below, after the groups they join.
                (None, Some(u)) => {
                    new_users.push(*u);
                    continue;
                }
                (_, None) => continue,
            },
            // Made by the first pass.
            Kind::ResourceServer | Kind::Scope | Kind::Client => continue,
        }
        journal.push(match &e.action {
            Action::Create(_) => format!("+ created {} {}", e.kind, e.name),
            Action::Update(_)
            | Action::InSync
            | Action::Conflict(_)
            | Action::Remove
            | Action::Unneeded => format!(
                "~ {} {}: {}",
                e.kind,
                e.name,
                changes
                    .iter()
                    .map(|c| format!("{}: {} -> {}", c.field, c.old, c.new))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        });
    }
    create_users(admin, &new_users, &alias, journal).await?;
    Ok(())
}

async fn remove_user(
    admin: &Admin,
    live: &LiveIdentities,
    name: &str,
    journal: &mut Journal<'_>,
) -> Result<(), AdminError> {
    let realm = admin.realm.as_str();
    if let Some((id, _)) = live.unneeded.get(name) {
        admin
            .run(format!("remove user {name}"), || {
                admin.api.realm_users_with_user_id_delete(realm, id)
            })
            .await?;
        journal.push(format!("- removed user {name}"));
    }
    Ok(())
}

/// Users created per `partialImport` request: one transaction each, so an
/// interrupted apply leaves whole batches, and the next run skips them.
pub const IMPORT_BATCH: usize = 100;

/// A new user as `partialImport` reads it: its id (the tokens' `sub`;
/// `POST /users` would ignore it), attributes, groups and link.
pub(super) fn import_rep(u: &User, alias: &str) -> Value {
    let attributes: HashMap<&String, &Vec<String>> = u.attributes.iter().collect();
    json!({
        "id": u.id,
        "username": u.username,
        "enabled": true,
        "attributes": attributes,
        "groups": u.groups.iter().map(|g| format!("/{g}")).collect::<Vec<_>>(),
        "federatedIdentities": [{
            "identityProvider": alias,
            "userId": u.identity.subject(),
            "userName": u.username,
        }],
    })
}

/// Creates `users` with `partialImport`, [`IMPORT_BATCH`] per request and
/// `--concurrency` requests at once, journaling each user. After a failed
/// request no further one starts, and those in flight are awaited and
/// journaled before the error is returned. A batch Keycloak refuses as a
/// duplicate (409: a user holds one of the ids or names, e.g. made by hand)
/// is tried again one user at a time, so one such user blocks only itself;
/// the blocked users are named in the error.
///
/// # Errors
/// The first failed request; the users that could not be created.
async fn create_users(
    admin: &Admin,
    users: &[&User],
    alias: &str,
    journal: &mut Journal<'_>,
) -> Result<(), AdminError> {
    let failed = std::sync::atomic::AtomicBool::new(false);
    let failed = &failed;
    let mut answers = stream::iter(users.chunks(IMPORT_BATCH))
        .map(|chunk| async move {
            if failed.load(std::sync::atomic::Ordering::Relaxed) {
                return (chunk, None);
            }
            let answer = import_users(admin, chunk, alias).await;
            if answer.as_ref().is_err_and(|e| e.status() != Some(409)) {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            (chunk, Some(answer))
        })
        .buffered(admin.concurrency());
    let (mut first_error, mut refused) = (None, Vec::new());
    while let Some((chunk, answer)) = answers.next().await {
        match answer {
            None => {}
            Some(Ok(answer)) => journal_created(journal, chunk, &answer),
            Some(Err(e)) if e.status() == Some(409) => refused.push(chunk),
            Some(Err(e)) => first_error = first_error.or(Some(e)),
        }
    }
    drop(answers);
    if let Some(e) = first_error {
        return Err(e);
    }
    let mut blocked = Vec::new();
    for u in refused.into_iter().flatten() {
        match import_users(admin, std::slice::from_ref(u), alias).await {
            Ok(answer) => journal_created(journal, std::slice::from_ref(u), &answer),
            Err(e) if e.status() == Some(409) => blocked.push(holder_of(admin, u).await?),
            Err(e) => return Err(e),
        }
    }
    let shown = 10;
    let more = match blocked.len().saturating_sub(shown) {
        0 => String::new(),
        n => format!("; and {n} more"),
    };
    blocked.truncate(shown);
    match blocked.is_empty() {
        true => Ok(()),
        false => Err(AdminError::new(
            "create repository users".into(),
            super::admin::Cause::Conflict(blocked.join("; ") + &more),
        )),
    }
}

/// One `partialImport` request creating `users`.
async fn import_users(admin: &Admin, users: &[&User], alias: &str) -> Result<Value, AdminError> {
    let body = json!({
        "ifResourceExists": "SKIP",
        "users": users.iter().map(|u| import_rep(u, alias)).collect::<Vec<_>>(),
    });
    let what = match users {
        [one] => format!("create user {}", one.username),
        _ => format!("create {} users", users.len()),
    };
    admin
        .send_json(reqwest::Method::POST, "/partialImport", &body, &what)
        .await
}

fn journal_created(journal: &mut Journal<'_>, users: &[&User], answer: &Value) {
    for u in users {
        journal.push(match import_outcome(answer, &u.username) {
            UserOutcome::Done => format!("+ created {} {}", Kind::User, u.username),
            UserOutcome::AlreadyPresent => format!(
                "= user {}: already present (created after this run read the realm, e.g. by another apply): skipped; run plan to compare it",
                u.username
            ),
        });
    }
}

/// Why Keycloak refused `u` as a duplicate: the user holding its id, when
/// one does.
async fn holder_of(admin: &Admin, u: &User) -> Result<String, AdminError> {
    let realm = admin.realm.as_str();
    let found = admin
        .run(format!("read user {}", u.id), || {
            admin.api.realm_users_with_user_id_get(realm, &u.id, None)
        })
        .await;
    Ok(match found {
        Ok(other) => format!(
            "user {} cannot be created: its id {} (the sub of {}'s tokens) is held by user {}, made outside keycloak apply; delete that user, or rename it back to {}, by hand",
            u.username,
            u.id,
            u.identity.subject(),
            other.username.as_deref().map(super::admin::sanitize).unwrap_or_default(),
            u.username
        ),
        Err(e) if not_found(&e) => format!(
            "user {} cannot be created: Keycloak refused it as a duplicate (HTTP 409) though no user has its id; look for a user of that username or e-mail",
            u.username
        ),
        Err(e) => return Err(e),
    })
}

/// Creates the identity provider, or updates it keeping the operator's
/// `enabled` (read again just before: a PUT replaces it).
async fn provider(
    admin: &Admin,
    want: &Identities,
    live: &LiveIdentities,
    alias: &str,
) -> Result<(), AdminError> {
    let realm = admin.realm.as_str();
    if live.provider.is_some() {
        // A PUT replaces `enabled` (absent counts as true): send the
        // operator's value, read again just before (the kill switch).
        let now = admin
            .run("read the identity provider", || {
                admin
                    .api
                    .realm_identity_provider_instances_with_alias_get(realm, alias)
            })
            .await?;
        let mut rep = want.provider.clone();
        rep.enabled = Some(now.enabled != Some(false));
        admin
            .run("update the identity provider", || {
                admin.api.realm_identity_provider_instances_with_alias_put(
                    realm,
                    alias,
                    rep.clone(),
                )
            })
            .await?;
    } else {
        admin
            .run("create the identity provider", || {
                admin
                    .api
                    .realm_identity_provider_instances_post(realm, want.provider.clone())
            })
            .await?;
    }
    Ok(())
}

/// Declares the identity attributes the user profile lacks (the profile is
/// PUT whole, every other field as read).
async fn profile(admin: &Admin, live: &LiveIdentities) -> Result<(), AdminError> {
    let mut profile = live.profile.clone();
    let declared = declared_attributes(&profile);
    if let Some(attrs) = profile["attributes"].as_array_mut() {
        for (name, _) in PROFILE_ATTRIBUTES
            .iter()
            .filter(|(n, _)| !declared.contains(*n))
        {
            attrs.push(json!({
                "name": name,
                "displayName": name,
                "validations": {"length": {"max": 255}},
                "permissions": {"view": ["admin"], "edit": ["admin"]},
                "multivalued": false
            }));
        }
    }
    admin
        .send_json(
            reqwest::Method::PUT,
            "/users/profile",
            &profile,
            "declare the identity attributes in the user profile",
        )
        .await?;
    Ok(())
}

async fn group(
    admin: &Admin,
    want: &Identities,
    live: &LiveIdentities,
    name: &str,
    owner: &str,
) -> Result<(), AdminError> {
    let realm = admin.realm.as_str();
    let Some(g) = want.groups.iter().find(|g| g.name == name) else {
        return Ok(());
    };
    let rep = GroupRepresentation {
        name: Some(g.name.clone()),
        description: Some(g.description.clone()),
        attributes: Some(HashMap::from([(
            OWNER_ATTRIBUTE.to_string(),
            vec![owner.to_string()],
        )])),
        ..Default::default()
    };
    let id = match live.groups.get(name) {
        Some((l, _)) => {
            let id = l.id.clone().unwrap_or_default();
            let mut put = rep.clone();
            put.id = Some(id.clone());
            admin
                .run(format!("update group {name}"), || {
                    admin
                        .api
                        .realm_groups_with_group_id_put(realm, &id, put.clone())
                })
                .await?;
            id
        }
        None => {
            let r = admin
                .run(format!("create group {name}"), || {
                    admin.api.realm_groups_post(realm, rep.clone())
                })
                .await?;
            r.to_id().unwrap_or_default().to_string()
        }
    };
    // Realm roles and Keycloak's own clients' roles are problems for a human.
    let what = format!("group {name}");
    reconcile_roles(
        admin,
        Holder::Group(&id),
        &what,
        &g.roles,
        Leave::REALM_AND_BUILT_IN,
    )
    .await
}

/// Top-level groups named exactly `name` (Keycloak's exact search, read to its
/// end: the answer may hold parents of matching subgroups too).
async fn find_groups(
    admin: &Admin,
    name: &str,
    brief: bool,
) -> Result<Vec<GroupRepresentation>, AdminError> {
    admin
        .list(
            "/groups",
            &[
                ("briefRepresentation", brief.to_string()),
                ("exact", "true".into()),
                ("search", name.to_string()),
            ],
            &format!("find group {name}"),
        )
        .await
}

async fn group_id(admin: &Admin, name: &str) -> Result<Option<String>, AdminError> {
    let found = find_groups(admin, name, true).await?;
    Ok(found
        .into_iter()
        .find(|g| g.path.as_deref() == Some(&format!("/{name}")))
        .and_then(|g| g.id))
}

/// What became of a user `apply` set out to create or update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserOutcome {
    /// Created (`partialImport` answered `ADDED`) or updated.
    Done,
    /// `partialImport` skipped it: a user of that username or id exists, made
    /// after this run read the realm (another `apply`, or by hand).
    AlreadyPresent,
}

/// Reads `partialImport`'s answer for `username`: `SKIPPED` (or no `ADDED`
/// result for it) means another run or a human created it meanwhile.
pub fn import_outcome(answer: &Value, username: &str) -> UserOutcome {
    let added = answer["results"].as_array().is_some_and(|r| {
        r.iter().any(|x| {
            x["resourceType"] == "USER" && x["resourceName"] == username && x["action"] == "ADDED"
        })
    });
    if added {
        UserOutcome::Done
    } else {
        UserOutcome::AlreadyPresent
    }
}

/// Updates an existing repository user: attributes, direct roles (none),
/// its link, its memberships of the declared groups.
async fn update_user(
    admin: &Admin,
    want: &Identities,
    u: &User,
    l: &LiveUser,
    alias: &str,
) -> Result<(), AdminError> {
    let realm = admin.realm.as_str();
    let username = u.username.as_str();
    let attributes: HashMap<String, Vec<String>> = u.attributes.clone().into_iter().collect();
    let mut rep = l.rep.clone();
    rep.attributes = Some(attributes);
    // `enabled` is the operator's: never sent back (it may have changed since it was read).
    rep.enabled = None;
    admin
        .run(format!("update user {username}"), || {
            admin
                .api
                .realm_users_with_user_id_put(realm, &u.id, rep.clone())
        })
        .await?;
    if !l.roles.is_empty() {
        // Roles come from groups only.
        let holder = Holder::User(&u.id);
        reconcile_roles(admin, holder, username, &BTreeMap::new(), Leave::BUILT_IN).await?;
    }
    relink(admin, u, l, alias).await?;
    regroup(admin, want, u, l).await
}

/// Links `u` to its subject at the identity provider, replacing a wrong link.
async fn relink(admin: &Admin, u: &User, l: &LiveUser, alias: &str) -> Result<(), AdminError> {
    let (realm, username) = (admin.realm.as_str(), u.username.as_str());
    let subject = u.identity.subject();
    let link = FederatedIdentityRepresentation {
        identity_provider: Some(alias.to_string()),
        user_id: Some(subject.clone()),
        user_name: Some(u.username.clone()),
    };
    let current = l
        .links
        .iter()
        .find(|f| f.identity_provider.as_deref() == Some(alias));
    if current.and_then(|f| f.user_id.as_deref()) != Some(subject.as_str()) {
        if current.is_some() {
            admin
                .run(format!("remove the wrong link of {username}"), || {
                    admin
                        .api
                        .realm_users_with_user_id_federated_identity_with_provider_delete(
                            realm, &u.id, alias,
                        )
                })
                .await?;
        }
        admin
            .run(format!("link {username}"), || {
                admin
                    .api
                    .realm_users_with_user_id_federated_identity_with_provider_post(
                        realm,
                        &u.id,
                        alias,
                        link.clone(),
                    )
            })
            .await?;
    }
    Ok(())
}

/// Makes `u`'s memberships of the declared groups its grants' groups.
async fn regroup(
    admin: &Admin,
    want: &Identities,
    u: &User,
    l: &LiveUser,
) -> Result<(), AdminError> {
    let (realm, username) = (admin.realm.as_str(), u.username.as_str());
    let owned: BTreeSet<String> = want.groups.iter().map(|g| g.name.clone()).collect();
    let have: BTreeSet<String> = l
        .groups
        .iter()
        .map(|p| p.trim_start_matches('/').to_string())
        .filter(|g| owned.contains(g))
        .collect();
    for g in have.difference(&u.groups) {
        if let Some(id) = group_id(admin, g).await? {
            admin
                .run(format!("remove {username} from group {g}"), || {
                    admin
                        .api
                        .realm_users_with_user_id_groups_with_group_id_delete(realm, &u.id, &id)
                })
                .await?;
        }
    }
    for g in u.groups.difference(&have) {
        if let Some(id) = group_id(admin, g).await? {
            admin
                .run(format!("add {username} to group {g}"), || {
                    admin
                        .api
                        .realm_users_with_user_id_groups_with_group_id_put(realm, &u.id, &id)
                })
                .await?;
        }
    }
    Ok(())
}
