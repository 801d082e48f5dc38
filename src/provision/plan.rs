//! The difference between the desired and the live realm, field by field.

use std::collections::{BTreeMap, BTreeSet};

use ::keycloak::types::{ClientRepresentation, ProtocolMapperRepresentation};
use serde::Serialize;
use serde_json::Value;

use super::desired::{Client, Desired};
use super::diff::{value_text as render, Action, Change, Entry, Kind, Op, Plan};
use super::live::{ClientDetails, Live};
use super::model::join;
use super::realm::{
    owned_by, BASIC_SCOPE, BUILT_IN_DEFAULTS, OWNER_ATTRIBUTE, REALM_KEY, SERVICE_ACCOUNT_SCOPE,
};

const UNSET: &str = "(unset)";

/// Field-by-field comparison of a desired partial representation with the live
/// one: every top-level field the desired one sets, and each of its `attributes`
/// (or `config`) entries.
fn compare_rep<T: Serialize>(desired: &T, live: Option<&T>, prefix: &str, op: Op) -> Vec<Change> {
    let d = serde_json::to_value(desired).unwrap_or(Value::Null);
    let l = live
        .and_then(|l| serde_json::to_value(l).ok())
        .unwrap_or(Value::Null);
    let mut out = Vec::new();
    let Value::Object(d) = d else { return out };
    for (k, v) in &d {
        match v {
            Value::Object(map) => {
                for (ak, av) in map {
                    let old = l
                        .get(k)
                        .and_then(|m| m.get(ak))
                        .cloned()
                        .unwrap_or(Value::Null);
                    if &old != av {
                        out.push(Change {
                            op,
                            field: format!("{prefix}{k}.{ak}"),
                            old: render(&old),
                            new: render(av),
                        });
                    }
                }
            }
            Value::Array(_) => {}
            v @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_)) => {
                let old = l.get(k).cloned().unwrap_or(Value::Null);
                if &old != v {
                    out.push(Change {
                        op,
                        field: format!("{prefix}{k}"),
                        old: render(&old),
                        new: render(v),
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.field.cmp(&b.field));
    out
}

fn set_change(
    op: Op,
    field: &str,
    live: &BTreeSet<String>,
    desired: &BTreeSet<String>,
) -> Option<Change> {
    (live != desired).then(|| Change {
        op,
        field: field.to_string(),
        old: join(live),
        new: join(desired),
    })
}

fn mappings_text(m: &BTreeMap<String, BTreeSet<String>>) -> String {
    if m.is_empty() {
        return "(none)".into();
    }
    m.iter()
        .map(|(c, r)| format!("{c}: {}", join(r)))
        .collect::<Vec<_>>()
        .join("; ")
}

fn mapper_changes(
    desired: &[ProtocolMapperRepresentation],
    live: &[ProtocolMapperRepresentation],
) -> Vec<Change> {
    let mut out = Vec::new();
    let names = |v: &[ProtocolMapperRepresentation]| -> BTreeSet<String> {
        v.iter().filter_map(|m| m.name.clone()).collect()
    };
    if let Some(c) = set_change(
        Op::ScopeMappers,
        "protocolMappers",
        &names(live),
        &names(desired),
    ) {
        out.push(c);
    }
    for m in desired {
        let name = m.name.clone().unwrap_or_default();
        let l = live.iter().find(|x| x.name == m.name);
        if let Some(l) = l {
            out.extend(compare_rep(
                m,
                Some(l),
                &format!("protocolMappers[{name}]."),
                Op::ScopeMappers,
            ));
            // Keys the desired mapper does not set change its output too
            // (a `rolePrefix`, a `lightweight` flag): any of them is drift,
            // except a claim switched off (`userinfo.token.claim: false`, which
            // Keycloak adds to mappers of a realm it imports): it can only
            // leave a claim out of a token, never add one.
            let want = m.config.clone().unwrap_or_default();
            let mut extra: Vec<(&String, &String)> = l
                .config
                .iter()
                .flatten()
                .filter(|(k, v)| {
                    let off = k.ends_with(".claim") && *v == "false";
                    !want.contains_key(*k) && !off
                })
                .collect();
            extra.sort();
            out.extend(extra.into_iter().map(|(k, v)| Change {
                op: Op::ScopeMappers,
                field: format!("protocolMappers[{name}].config.{k}"),
                old: v.clone(),
                new: UNSET.into(),
            }));
        }
    }
    out
}

/// Where the marker is wrong on an existing object, the conflict text.
fn conflict(
    attrs: Option<&std::collections::HashMap<String, String>>,
    owner: &str,
    name: &str,
) -> Option<String> {
    if super::model::is_reserved_client(name) {
        return Some("is one of Keycloak's built-in clients: never changed".into());
    }
    if owned_by(attrs, owner) {
        return None;
    }
    Some(match attrs.and_then(|a| a.get(OWNER_ATTRIBUTE)) {
        Some(other) => format!(
            "exists and is owned by `{other}` (attribute {OWNER_ATTRIBUTE}), not `{owner}`: left alone"
        ),
        None => format!(
            "exists and was not created by keycloak apply (no attribute {OWNER_ATTRIBUTE}): left \
             alone; rename it, or add the attribute with value `{owner}` to hand it over"
        ),
    })
}

fn action(exists: bool, changes: Vec<Change>) -> Action {
    match (exists, changes.is_empty()) {
        (false, _) => Action::Create(changes),
        (true, true) => Action::InSync,
        (true, false) => Action::Update(changes),
    }
}

/// A client's default scopes: `basic`, and `service_account` where the realm has
/// it (Keycloak re-attaches it on every update of a service-account client, so
/// leaving it out would be drift after every apply).
pub fn default_scopes(c: &super::desired::Client, live: &Live) -> BTreeSet<String> {
    let mut s = c.default_scopes.clone();
    if c.rep.service_accounts_enabled == Some(true)
        && live.scopes.contains_key(SERVICE_ACCOUNT_SCOPE)
    {
        s.insert(SERVICE_ACCOUNT_SCOPE.to_string());
    }
    s
}

/// Whether `id` is a client `plan` and `apply` never own, change or remove,
/// whatever its attributes say: Keycloak's built-in clients and the admin client
/// in use.
fn untouchable(id: &str, admin_client: &str) -> bool {
    super::model::is_reserved_client(id) || id == admin_client
}

/// Compares `desired` with `live`. With `prune`, owned objects no longer desired
/// are removed and extra roles of owned resource servers count as changes.
/// `admin_client` is the `clientId` of the admin client in use: never touched.
pub fn plan(desired: &Desired, live: &Live, prune: bool, admin_client: &str) -> Plan {
    let mut plan = Plan::default();
    check_basic(live, &mut plan);
    resource_servers(desired, live, prune, &mut plan);
    scopes(desired, live, &mut plan);
    clients(desired, live, &mut plan);
    leftovers(desired, live, prune, admin_client, &mut plan);
    let owner = desired.owner.as_str();
    if let (Some(want), Some(l)) = (&desired.identities, &live.identities) {
        super::identities::plan(want, l, owner, prune, &mut plan);
    }
    keep_operator_switches(&mut plan, |kind, name| live.enabled(kind, name));
    for e in &plan.entries {
        if let Action::Conflict(why) = &e.action {
            plan.problems.push(format!("{} {} {why}", e.kind, e.name));
        }
    }
    plan
}

/// The resource servers' entries: representation and roles (with `prune`,
/// the roles no longer in the model are removals); composite roles are problems.
fn resource_servers(desired: &Desired, live: &Live, prune: bool, plan: &mut Plan) {
    let owner = desired.owner.as_str();
    let none = BTreeSet::new();
    for rs in &desired.resource_servers {
        let l = live.clients.get(&rs.client_id);
        if let Some(why) = l.and_then(|l| conflict(l.attributes.as_ref(), owner, &rs.client_id)) {
            plan.entries.push(Entry {
                kind: Kind::ResourceServer,
                name: rs.client_id.clone(),
                action: Action::Conflict(why),
                operator_disabled: false,
            });
            continue;
        }
        let mut ch = compare_rep(&rs.rep, l, "", Op::Representation);
        let live_roles = live.roles.get(&rs.client_id).unwrap_or(&none);
        for odd in live_roles.iter().filter(|r| !super::model::role_name_ok(r)) {
            plan.problems.push(format!(
                "resource server {} has a role named `{odd}`, which apply cannot address safely: remove it by hand",
                rs.client_id
            ));
        }
        let extra: BTreeSet<String> = live_roles.difference(&rs.roles).cloned().collect();
        if !prune && !extra.is_empty() {
            plan.notes.push(format!(
                "resource server {}: role(s) {} are no longer in the model; kept (`--prune` removes them)",
                rs.client_id,
                join(&extra)
            ));
        }
        // Without --prune the roles no longer in the model stay (the note
        // above); with it each is a removal `--max-removals` counts.
        let want: BTreeSet<String> = if prune {
            rs.roles.clone()
        } else {
            live_roles.union(&rs.roles).cloned().collect()
        };
        if prune {
            plan.role_removals += extra.len();
        }
        ch.extend(set_change(Op::ClientRoles, "roles", live_roles, &want));
        plan.entries.push(Entry {
            kind: Kind::ResourceServer,
            name: rs.client_id.clone(),
            action: action(l.is_some(), ch),
            operator_disabled: false,
        });
    }
    for c in &live.composite_roles {
        plan.problems.push(format!(
            "role {c} of an owned resource server is composite (it grants other roles to every token that carries it): remove its associated roles by hand"
        ));
    }
}

/// The client scopes' entries: representation, mappers, role scope mappings.
fn scopes(desired: &Desired, live: &Live, plan: &mut Plan) {
    let owner = desired.owner.as_str();
    for s in &desired.scopes {
        let l = live.scopes.get(&s.name);
        if let Some(why) = l.and_then(|l| conflict(l.attributes.as_ref(), owner, &s.name)) {
            plan.entries.push(Entry {
                kind: Kind::Scope,
                name: s.name.clone(),
                action: Action::Conflict(why),
                operator_disabled: false,
            });
            continue;
        }
        let mut ch = compare_rep(&s.rep, l, "", Op::Representation);
        let live_mappers = l
            .and_then(|l| l.protocol_mappers.clone())
            .unwrap_or_default();
        ch.extend(mapper_changes(&s.mappers, &live_mappers));
        let empty = BTreeMap::new();
        let lm = live.scope_mappings.get(&s.name).unwrap_or(&empty);
        if let Some(realm_roles) = lm.get(REALM_KEY) {
            plan.problems.push(format!(
                "client scope {} maps realm roles ({}): remove them by hand (Client scopes -> {} -> Scope)",
                s.name,
                join(realm_roles),
                s.name
            ));
        }
        let client_maps: BTreeMap<String, BTreeSet<String>> = lm
            .iter()
            .filter(|(k, _)| k.as_str() != REALM_KEY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if client_maps != s.scope_mappings {
            ch.push(Change {
                op: Op::ScopeRoleMappings,
                field: "scopeMappings".into(),
                old: mappings_text(&client_maps),
                new: mappings_text(&s.scope_mappings),
            });
        }
        plan.entries.push(Entry {
            kind: Kind::Scope,
            name: s.name.clone(),
            action: action(l.is_some(), ch),
            operator_disabled: false,
        });
    }
}

/// The clients' entries: representation, scopes, own mappers and scope
/// mappings, the service account's roles and groups.
fn clients(desired: &Desired, live: &Live, plan: &mut Plan) {
    let owner = desired.owner.as_str();
    let servers: BTreeSet<&String> = desired
        .resource_servers
        .iter()
        .map(|r| &r.client_id)
        .collect();
    let secret_clients: Vec<&str> = desired
        .clients
        .iter()
        .filter(|c| c.rep.client_authenticator_type.as_deref() == Some("client-secret"))
        .map(|c| c.client_id.as_str())
        .collect();
    if !secret_clients.is_empty() {
        plan.notes.push(format!(
            "client secrets are not compared by plan (it reads no secret); apply sets the secret of {} to the configured one when it differs",
            secret_clients.join(", ")
        ));
    }
    for c in &desired.clients {
        let l = live.clients.get(&c.client_id);
        if let Some(why) = l.and_then(|l| conflict(l.attributes.as_ref(), owner, &c.client_id)) {
            plan.entries.push(Entry {
                kind: Kind::Client,
                name: c.client_id.clone(),
                action: Action::Conflict(why),
                operator_disabled: false,
            });
            continue;
        }
        let d = live.details.get(&c.client_id).cloned().unwrap_or_default();
        admin_rights(&c.client_id, &d, plan);
        let mut ch = compare_rep(&c.rep, l, "", Op::Representation);
        ch.extend(client_scope_changes(c, l, &d, live));
        ch.extend(service_account_changes(c, &d, &servers));
        plan.entries.push(Entry {
            kind: Kind::Client,
            name: c.client_id.clone(),
            action: action(l.is_some(), ch),
            operator_disabled: false,
        });
    }
}

/// A client's default and optional scopes, mappers (none: the scopes carry
/// them) and role scope mappings (none).
fn client_scope_changes(
    c: &Client,
    l: Option<&ClientRepresentation>,
    d: &ClientDetails,
    live: &Live,
) -> Vec<Change> {
    let mut ch = Vec::new();
    ch.extend(set_change(
        Op::ClientScopes,
        "defaultClientScopes",
        &d.default_scopes,
        &default_scopes(c, live),
    ));
    ch.extend(set_change(
        Op::ClientScopes,
        "optionalClientScopes",
        &d.optional_scopes,
        &c.optional_scopes,
    ));
    let live_mappers: BTreeSet<String> = l
        .and_then(|l| l.protocol_mappers.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.name)
        .collect();
    ch.extend(set_change(
        Op::ClientMappers,
        "protocolMappers",
        &live_mappers,
        &BTreeSet::new(),
    ));
    if !d.scope_mappings.is_empty() {
        ch.push(Change {
            op: Op::ClientRoleMappings,
            field: "scopeMappings".into(),
            old: mappings_text(&d.scope_mappings),
            new: "(none)".into(),
        });
    }
    ch
}

/// A client's service-account roles (those its scopes carry, per resource
/// server) and groups (none).
fn service_account_changes(
    c: &Client,
    d: &ClientDetails,
    servers: &BTreeSet<&String>,
) -> Vec<Change> {
    let none = BTreeSet::new();
    let mut ch = Vec::new();
    let holders: BTreeSet<&String> = servers
        .iter()
        .copied()
        .chain(c.roles.keys())
        .chain(d.roles.keys())
        .collect();
    for rs in holders {
        let want = c.roles.get(rs).unwrap_or(&none);
        let have = d.roles.get(rs).unwrap_or(&none);
        ch.extend(set_change(
            Op::ServiceAccountRoles,
            &format!("serviceAccountRoles[{rs}]"),
            have,
            want,
        ));
    }
    ch.extend(set_change(
        Op::ServiceAccountGroups,
        "serviceAccountGroups",
        &d.groups,
        &none,
    ));
    ch
}

/// Owned clients, resource servers and scopes no longer desired: removed
/// with `prune`, else kept; built-in, admin and admin-holding ones are problems.
fn leftovers(desired: &Desired, live: &Live, prune: bool, admin_client: &str, plan: &mut Plan) {
    let owner = desired.owner.as_str();
    let servers: BTreeSet<&String> = desired
        .resource_servers
        .iter()
        .map(|r| &r.client_id)
        .collect();
    let gone = if prune {
        Action::Remove
    } else {
        Action::Unneeded
    };
    let acting: BTreeSet<&String> = desired.clients.iter().map(|c| &c.client_id).collect();
    let wanted_scopes: BTreeSet<&String> = desired.scopes.iter().map(|s| &s.name).collect();
    for (id, c) in &live.clients {
        if !owned_by(c.attributes.as_ref(), owner) || acting.contains(id) || servers.contains(id) {
            continue;
        }
        let holds_admin = live.details.get(id).is_some_and(|d| {
            d.roles
                .keys()
                .chain(d.scope_mappings.keys())
                .any(|k| super::model::is_reserved_client(k))
        });
        if untouchable(id, admin_client) || holds_admin {
            plan.problems.push(format!(
                "client {id} carries the ownership attribute but is {}: never removed; remove the attribute by hand",
                if holds_admin { "holding admin roles" } else { "a built-in or the admin client" }
            ));
            continue;
        }
        let kind = if c.bearer_only == Some(true) {
            Kind::ResourceServer
        } else {
            Kind::Client
        };
        plan.entries.push(Entry {
            kind,
            name: id.clone(),
            action: gone.clone(),
            operator_disabled: false,
        });
    }
    for (name, s) in &live.scopes {
        if owned_by(s.attributes.as_ref(), owner) && !wanted_scopes.contains(name) {
            if super::model::RESERVED_SCOPES.contains(&name.as_str()) {
                plan.problems.push(format!("client scope {name} is built in but carries the ownership attribute: never removed"));
                continue;
            }
            plan.entries.push(Entry {
                kind: Kind::Scope,
                name: name.clone(),
                action: gone.clone(),
                operator_disabled: false,
            });
        }
    }
}

/// The operator's off switch, one rule for every kind of object that has one
/// (clients, resource servers, the identity provider, repository users):
/// `enabled(kind, name)` is the live object's `enabled`, and where it is
/// `false` the entry is marked, any `enabled` change is dropped (`plan` never
/// proposes `false -> true`), and a removal becomes "kept" (`--prune` would
/// delete the switch, and a later policy would bring the object back enabled).
/// `apply` makes only the plan's changes and never sends `enabled: true` to an
/// existing object (docs/src/identities.md).
pub fn keep_operator_switches(plan: &mut Plan, enabled: impl Fn(Kind, &str) -> Option<bool>) {
    for e in &mut plan.entries {
        if enabled(e.kind, &e.name) != Some(false) {
            continue;
        }
        e.operator_disabled = true;
        e.action = match std::mem::replace(&mut e.action, Action::InSync) {
            Action::Update(ch) => {
                let ch: Vec<Change> = ch.into_iter().filter(|c| c.field != ENABLED).collect();
                if ch.is_empty() {
                    Action::InSync
                } else {
                    Action::Update(ch)
                }
            }
            Action::Remove => Action::Unneeded,
            other @ (Action::Create(_)
            | Action::InSync
            | Action::Conflict(_)
            | Action::Unneeded) => other,
        };
    }
}

/// The field of every kind's off switch.
pub const ENABLED: &str = "enabled";

/// The realm's `basic` scope must exist, and the built-in default scopes
/// (`basic`, `service_account`) must hold only Keycloak's own mappers and no role
/// mappings: anything added there would reach every token of every client.
fn check_basic(live: &Live, plan: &mut Plan) {
    if !live.scopes.contains_key(BASIC_SCOPE) {
        plan.problems.push(format!(
            "the realm has no `{BASIC_SCOPE}` client scope (Keycloak 25+ creates it with every realm; \
             it carries `sub`): create it before apply"
        ));
    }
    for (name, allowed) in BUILT_IN_DEFAULTS {
        let Some(scope) = live.scopes.get(name) else {
            continue;
        };
        for m in scope.protocol_mappers.iter().flatten() {
            let kind = m.protocol_mapper.as_deref().unwrap_or_default();
            if !allowed.contains(&kind) {
                plan.problems.push(format!(
                    "client scope {name} holds mapper `{}` ({kind}), which Keycloak does not put there; it would reach every token: remove it by hand",
                    m.name.as_deref().unwrap_or_default()
                ));
            }
        }
        if live.scope_mappings.get(name).is_some_and(|m| !m.is_empty()) {
            plan.problems.push(format!(
                "client scope {name} maps roles; they would reach every token: remove them by hand"
            ));
        }
    }
}

/// A client's service account or scope mappings holding roles of Keycloak's
/// built-in clients (`realm-management`, `broker`, ...) is a problem, not drift:
/// such a client could administer the realm with its tokens.
fn admin_rights(id: &str, d: &super::live::ClientDetails, plan: &mut Plan) {
    for (client, roles) in d.roles.iter().chain(d.scope_mappings.iter()) {
        if super::model::is_reserved_client(client) {
            plan.problems.push(format!(
                "client {id} holds roles of Keycloak's built-in client {client} ({}): its tokens could administer Keycloak; remove them by hand and find out who added them",
                join(roles)
            ));
        }
    }
    for g in &d.groups {
        plan.problems.push(format!(
            "the service account of client {id} is a member of group {g} (its roles reach the tokens): remove the membership by hand"
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::policy::compile_str;
    use crate::provision::desired::{derive, Auth, Inputs};
    use crate::provision::live::ClientDetails;
    use crate::provision::model::RealmModel;

    /// Every change of the plan's updates.
    fn updates(p: &Plan) -> impl Iterator<Item = &Change> {
        p.entries.iter().flat_map(|e| match &e.action {
            Action::Update(ch) => ch.as_slice(),
            Action::Create(_)
            | Action::InSync
            | Action::Conflict(_)
            | Action::Remove
            | Action::Unneeded => &[],
        })
    }

    fn desired() -> Desired {
        let model = RealmModel::from_str(
            "resource_servers:\n  deploy-api: {roles: [deploy]}\nscopes:\n  deploy:production: {resource_server: deploy-api, roles: [deploy]}\n",
            "m",
        )
        .unwrap();
        let policy = compile_str(
            "p",
            "effect: allow\nwhen:\n  workspaceUuid: \"{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}\"\ngrant:\n  client: sts-deploy\n  audience: deploy-api\n  scopes: [\"deploy:production\"]\n  default_scopes: [\"deploy:production\"]\n  max_lifetime_seconds: 300\n",
            None,
        )
        .unwrap();
        let url = url::Url::parse("https://sts.example.com").unwrap();
        let inputs = Inputs {
            public_url: Some(&url),
            signing_alg: "ES256",
            clients: BTreeMap::from([("sts-deploy".to_string(), Auth::PrivateKeyJwt)]),
            jwt_clients: BTreeSet::new(),
            identity: None,
        };
        derive(
            inputs,
            &[policy.into()],
            &crate::inventory::Inventory::default(),
            &model,
        )
        .unwrap()
    }

    /// The live realm exactly as `apply` leaves it for `desired()`.
    fn in_sync(d: &Desired) -> Live {
        let mut live = Live::default();
        for name in [BASIC_SCOPE, SERVICE_ACCOUNT_SCOPE] {
            live.scopes.insert(
                name.into(),
                ::keycloak::types::ClientScopeRepresentation {
                    id: Some(format!("id-{name}")),
                    name: Some(name.into()),
                    ..Default::default()
                },
            );
        }
        for rs in &d.resource_servers {
            let mut rep = rs.rep.clone();
            rep.id = Some(format!("id-{}", rs.client_id));
            live.clients.insert(rs.client_id.clone(), rep);
            live.roles.insert(rs.client_id.clone(), rs.roles.clone());
        }
        for s in &d.scopes {
            let mut rep = s.rep.clone();
            rep.protocol_mappers = Some(s.mappers.clone());
            live.scopes.insert(s.name.clone(), rep);
            live.scope_mappings
                .insert(s.name.clone(), s.scope_mappings.clone());
        }
        for c in &d.clients {
            let mut rep = c.rep.clone();
            rep.id = Some(format!("id-{}", c.client_id));
            live.clients.insert(c.client_id.clone(), rep);
            let mut defaults = c.default_scopes.clone();
            defaults.insert(SERVICE_ACCOUNT_SCOPE.into());
            live.details.insert(
                c.client_id.clone(),
                ClientDetails {
                    default_scopes: defaults,
                    optional_scopes: c.optional_scopes.clone(),
                    service_account: Some("sa".into()),
                    roles: c.roles.clone(),
                    ..Default::default()
                },
            );
        }
        live
    }

    #[test]
    fn a_blank_realm_creates_everything_and_a_matching_one_is_in_sync() {
        let d = desired();
        let blank = Live {
            scopes: in_sync(&d)
                .scopes
                .into_iter()
                .filter(|(n, _)| n == BASIC_SCOPE)
                .collect(),
            ..Default::default()
        };
        let p = plan(&d, &blank, false, "kcs-admin");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.entries.len(), 3);
        assert!(p
            .entries
            .iter()
            .all(|e| matches!(e.action, Action::Create(_))));
        assert!(p.pending());
        let p = plan(&d, &in_sync(&d), false, "kcs-admin");
        assert!(!p.pending(), "{:#?}", p.entries);
        assert!(p.entries.iter().all(|e| e.action == Action::InSync));
    }

    #[test]
    fn drift_is_reported_field_by_field() {
        let d = desired();
        let mut live = in_sync(&d);
        let c = live.clients.get_mut("sts-deploy").unwrap();
        c.attributes
            .as_mut()
            .unwrap()
            .insert("access.token.lifespan".into(), "3600".into());
        c.full_scope_allowed = Some(true);
        c.protocol_mappers = Some(vec![::keycloak::types::ProtocolMapperRepresentation {
            name: Some("hardcoded".into()),
            ..Default::default()
        }]);
        live.details
            .get_mut("sts-deploy")
            .unwrap()
            .optional_scopes
            .clear();
        live.scope_mappings
            .get_mut("deploy:production")
            .unwrap()
            .insert(
                crate::provision::realm::REALM_KEY.into(),
                BTreeSet::from(["admin".to_string()]),
            );
        let p = plan(&d, &live, false, "kcs-admin");
        let changes: Vec<String> = updates(&p)
            .map(|c| format!("{:?} {}: {} -> {}", c.op, c.field, c.old, c.new))
            .collect();
        assert!(
            p.problems[0].contains("maps realm roles (admin)"),
            "{:?}",
            p.problems
        );
        assert_eq!(
            changes,
            // Each change carries the operation apply makes for it.
            [
                "Representation attributes.access.token.lifespan: 3600 -> 300",
                "Representation fullScopeAllowed: true -> false",
                "ClientScopes optionalClientScopes: (none) -> deploy:production",
                "ClientMappers protocolMappers: hardcoded -> (none)",
            ]
        );
    }

    #[test]
    fn objects_without_our_marker_are_conflicts_and_owned_leftovers_are_pruned_only_on_request() {
        let d = desired();
        let mut live = in_sync(&d);
        live.clients.get_mut("deploy-api").unwrap().attributes = None;
        let mut old = live.scopes["deploy:production"].clone();
        old.name = Some("old:scope".into());
        live.scopes.insert("old:scope".into(), old);
        let p = plan(&d, &live, false, "kcs-admin");
        assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
        assert!(p.problems[0].contains("resource server deploy-api exists and was not created"));
        assert!(p
            .entries
            .iter()
            .any(|e| e.name == "old:scope" && e.action == Action::Unneeded));
        let p = plan(&d, &live, true, "kcs-admin");
        assert!(p
            .entries
            .iter()
            .any(|e| e.name == "old:scope" && e.action == Action::Remove));
        let e = p.entries.iter().find(|e| e.name == "deploy-api").unwrap();
        assert!(matches!(e.action, Action::Conflict(_)));
    }

    #[test]
    fn privileges_outside_the_managed_roles_are_drift_or_problems() {
        let d = desired();
        let mut live = in_sync(&d);
        let det = live.details.get_mut("sts-deploy").unwrap();
        det.scope_mappings
            .insert("deploy-api".into(), BTreeSet::from(["deploy".to_string()]));
        det.roles
            .insert("other-app".into(), BTreeSet::from(["x".to_string()]));
        let mut m = live.scopes["deploy:production"].clone();
        m.protocol_mappers.as_mut().unwrap()[1]
            .config
            .as_mut()
            .unwrap()
            .insert(
                "usermodel.clientRoleMapping.rolePrefix".into(),
                "write-and-".into(),
            );
        live.scopes.insert("deploy:production".into(), m);
        let p = plan(&d, &live, false, "kcs-admin");
        let fields: Vec<String> = updates(&p)
            .map(|c| format!("{:?} {}", c.op, c.field))
            .collect();
        assert!(
            fields.contains(&"ClientRoleMappings scopeMappings".to_string()),
            "{fields:?}"
        );
        assert!(
            fields.contains(&"ServiceAccountRoles serviceAccountRoles[other-app]".to_string()),
            "{fields:?}"
        );
        assert!(
            fields.iter().any(|f| f.starts_with("ScopeMappers ")
                && f.ends_with("config.usermodel.clientRoleMapping.rolePrefix")),
            "{fields:?}"
        );
        assert!(p.problems.is_empty(), "{:?}", p.problems);

        let det = live.details.get_mut("sts-deploy").unwrap();
        det.roles.insert(
            "realm-management".into(),
            BTreeSet::from(["manage-users".to_string()]),
        );
        det.groups.insert("/sneaky".into());
        live.composite_roles.insert("deploy-api/deploy".into());
        // A service account's group is a typed change (apply could make it)
        // and a problem (apply stops before any change).
        let sneaky = plan(&d, &live, false, "kcs-admin");
        assert!(sneaky.entries.iter().any(|e| matches!(&e.action,
            Action::Update(ch) if ch.iter().any(|c| c.op == Op::ServiceAccountGroups
                && c.field == "serviceAccountGroups"))));
        let mut basic = live.scopes[BASIC_SCOPE].clone();
        basic.protocol_mappers = Some(vec![::keycloak::types::ProtocolMapperRepresentation {
            name: Some("aud".into()),
            protocol_mapper: Some("oidc-audience-mapper".into()),
            ..Default::default()
        }]);
        live.scopes.insert(BASIC_SCOPE.into(), basic);
        let all = plan(&d, &live, false, "kcs-admin").problems.join("\n");
        for needle in [
            "built-in client realm-management",
            "member of group /sneaky",
            "deploy-api/deploy of an owned resource server is composite",
            "client scope basic holds mapper `aud`",
        ] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
    }

    #[test]
    fn a_claim_switched_off_by_an_import_is_not_drift_and_one_switched_on_is() {
        let d = desired();
        for (value, drift) in [("false", false), ("true", true)] {
            let mut live = in_sync(&d);
            let mut s = live.scopes["deploy:production"].clone();
            for m in s.protocol_mappers.as_mut().unwrap() {
                m.config
                    .as_mut()
                    .unwrap()
                    .insert("userinfo.token.claim".into(), value.into());
            }
            live.scopes.insert("deploy:production".into(), s);
            let p = plan(&d, &live, false, "kcs-admin");
            assert_eq!(
                updates(&p).any(|c| c.field.ends_with("config.userinfo.token.claim")),
                drift,
                "{value}"
            );
        }
    }

    #[test]
    fn prune_never_removes_built_in_or_admin_clients_with_a_forged_marker() {
        let d = desired();
        let mut live = in_sync(&d);
        for id in ["kcs-admin", "admin-cli"] {
            let mut c = live.clients["deploy-api"].clone();
            c.client_id = Some(id.into());
            live.clients.insert(id.into(), c);
        }
        let p = plan(&d, &live, true, "kcs-admin");
        assert!(
            !p.entries.iter().any(|e| e.action == Action::Remove),
            "{:?}",
            p.entries
        );
        assert_eq!(p.problems.len(), 2, "{:?}", p.problems);
    }

    #[test]
    fn a_realm_without_basic_is_a_problem() {
        let d = desired();
        let mut live = in_sync(&d);
        live.scopes.remove(BASIC_SCOPE);
        assert!(plan(&d, &live, false, "kcs-admin").problems[0].contains("no `basic` client scope"));
    }

    #[test]
    fn export_is_stable_sorted_and_secret_free() {
        let d = desired();
        let a = serde_json::to_string(&crate::provision::export::realm_json("ci", &d)).unwrap();
        let b = serde_json::to_string(&crate::provision::export::realm_json("ci", &d)).unwrap();
        assert_eq!(a, b);
        assert!(!a.contains("\"secret\""));
        let v: Value = serde_json::from_str(&a).unwrap();
        assert_eq!(
            v["clients"][1]["optionalClientScopes"],
            serde_json::json!(["deploy:production"])
        );
        assert_eq!(
            v["users"][0]["clientRoles"]["deploy-api"],
            serde_json::json!(["deploy"])
        );
        let keys: Vec<&String> = v["clients"][1]["attributes"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }
}
