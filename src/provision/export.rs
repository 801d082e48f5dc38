//! `keycloak export`: the desired state as realm-import JSON (the format of
//! `kc.sh import`, the admin console's partial import and keycloak-config-cli),
//! for teams that manage Keycloak with other tools. Client secrets are never
//! written; set them with your tool's secret handling. With per-repository
//! identities it also holds the identity provider, the groups and the repository
//! users (with their ids, links and groups); the user-profile attributes they need
//! are not part of it (declare them as docs/src/identities.md says).

use serde_json::{json, Value};

use super::desired::Desired;

/// The realm-import document for `realm`: `roles.client`, `clientScopes` (with
/// their mappers), `clientScopeMappings`, `clients` (with default and optional
/// scopes) and the service-account `users` with their client roles. The realm's
/// built-in `basic` scope is referenced, not defined.
pub fn realm_json(realm: &str, desired: &Desired) -> Value {
    let mut roles = serde_json::Map::new();
    let mut scope_mappings = serde_json::Map::new();
    for rs in &desired.resource_servers {
        roles.insert(
            rs.client_id.clone(),
            Value::Array(rs.roles.iter().map(|r| json!({ "name": r })).collect()),
        );
    }
    let mut scopes = Vec::new();
    for s in &desired.scopes {
        let mut rep = s.rep.clone();
        rep.protocol_mappers = Some(s.mappers.clone());
        scopes.push(serde_json::to_value(rep).unwrap_or(Value::Null));
        for (rs, r) in &s.scope_mappings {
            let entry = scope_mappings
                .entry(rs.clone())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(list) = entry {
                list.push(json!({ "clientScope": s.name, "roles": r }));
            }
        }
    }
    let mut clients = Vec::new();
    let mut users = Vec::new();
    for rs in &desired.resource_servers {
        let mut rep = rs.rep.clone();
        rep.enabled = Some(true);
        clients.push(serde_json::to_value(rep).unwrap_or(Value::Null));
    }
    for c in &desired.clients {
        let mut rep = c.rep.clone();
        rep.enabled = Some(true);
        rep.secret = None;
        rep.default_client_scopes = Some(c.default_scopes.iter().cloned().collect());
        rep.optional_client_scopes = Some(c.optional_scopes.iter().cloned().collect());
        clients.push(serde_json::to_value(rep).unwrap_or(Value::Null));
        if c.rep.service_accounts_enabled != Some(true) {
            continue;
        }
        users.push(json!({
            "username": format!("service-account-{}", c.client_id.to_lowercase()),
            "enabled": true,
            "serviceAccountClientId": c.client_id,
            "clientRoles": c.roles,
        }));
    }
    let mut doc = json!({
        "realm": realm,
        "enabled": true,
        "roles": { "client": roles },
        "clientScopes": scopes,
        "clientScopeMappings": scope_mappings,
        "clients": clients,
        "users": users,
    });
    if let Some(ids) = &desired.identities {
        add_identities(&mut doc, ids, &desired.owner);
    }
    sorted(doc)
}

/// The identity provider, the groups and the repository users (as
/// `partialImport` creates them).
fn add_identities(doc: &mut Value, ids: &super::identities::Identities, owner: &str) {
    doc["identityProviders"] = json!([ids.provider]);
    doc["groups"] = Value::Array(
        ids.groups
            .iter()
            .map(|g| {
                json!({
                    "name": g.name,
                    "path": format!("/{}", g.name),
                    "description": g.description,
                    "attributes": { super::realm::OWNER_ATTRIBUTE: [owner] },
                    "clientRoles": g.roles,
                })
            })
            .collect(),
    );
    let alias = ids.provider.alias.as_deref().unwrap_or_default();
    if let Some(Value::Array(list)) = doc.get_mut("users") {
        list.extend(
            ids.users
                .iter()
                .map(|u| super::identities::import_rep(u, alias)),
        );
    }
}

/// The same document with every object's keys in order (stable output to commit).
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        leaf @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_)) => leaf,
    }
}
