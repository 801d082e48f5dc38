//! The difference between the desired and the live realm, field by field.

use std::collections::{BTreeMap, BTreeSet};

use ::keycloak::types::ProtocolMapperRepresentation;
use serde::Serialize;
use serde_json::Value;

use super::desired::{Desired, BASIC_SCOPE, OWNER_ATTRIBUTE};
use super::live::{owned_by, Live};
use super::model::join;

/// The kind of a managed object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A bearer-only client with roles.
    ResourceServer,
    /// A client scope.
    Scope,
    /// A client the service acts as.
    Client,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ResourceServer => "resource server",
            Self::Scope => "client scope",
            Self::Client => "client",
        })
    }
}

/// One field that differs: `old` is the live value (`(unset)` when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `attributes.access.token.lifespan`, `optionalClientScopes`, ...
    pub field: String,
    /// Live value.
    pub old: String,
    /// Desired value.
    pub new: String,
}

/// What happens to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Absent: created with these fields.
    Create(Vec<Change>),
    /// Present and owned: these fields change.
    Update(Vec<Change>),
    /// Present, owned, equal.
    InSync,
    /// Present but not owned (no or another marker): never touched.
    Conflict(String),
    /// Owned but no longer desired: removed by `apply --prune`.
    Remove,
    /// Owned but no longer desired, kept (no `--prune`).
    Unneeded,
}

/// One object's line in the plan.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its kind.
    pub kind: Kind,
    /// `clientId` or scope name.
    pub name: String,
    /// What happens to it.
    pub action: Action,
}

/// The whole plan.
#[derive(Debug, Default)]
pub struct Plan {
    /// One entry per desired or owned object, in apply order.
    pub entries: Vec<Entry>,
    /// Problems that stop `apply` (conflicts, a missing `basic` scope).
    pub problems: Vec<String>,
}

impl Plan {
    /// Whether `apply` would change anything.
    pub fn pending(&self) -> bool {
        self.entries.iter().any(|e| {
            matches!(
                e.action,
                Action::Create(_) | Action::Update(_) | Action::Remove
            )
        })
    }

    /// Renders the plan, one object per line and one indented line per field.
    pub fn render(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.entries {
            let head = |sign: &str, what: &str| format!("{sign} {} {}{what}", e.kind, e.name);
            match &e.action {
                Action::Create(ch) => {
                    out.push(head("+", ": create"));
                    out.extend(ch.iter().map(|c| format!("    {}: {}", c.field, c.new)));
                }
                Action::Update(ch) => {
                    out.push(head("~", ": change"));
                    out.extend(
                        ch.iter()
                            .map(|c| format!("    {}: {} -> {}", c.field, c.old, c.new)),
                    );
                }
                Action::InSync => out.push(head("=", ": in sync")),
                Action::Conflict(why) => out.push(head("!", &format!(": {why}"))),
                Action::Remove => out.push(head("-", ": remove (owned, no longer needed)")),
                Action::Unneeded => out.push(head(
                    " ",
                    ": owned but no longer needed; kept (`--prune` removes it)",
                )),
            }
        }
        out.extend(self.problems.iter().map(|p| format!("! {p}")));
        out
    }
}

const UNSET: &str = "(unset)";

fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => UNSET.to_string(),
        other => other.to_string(),
    }
}

/// Field-by-field comparison of a desired partial representation with the live
/// one: every top-level field the desired one sets, and each of its `attributes`
/// (or `config`) entries.
fn compare_rep<T: Serialize>(desired: &T, live: Option<&T>, prefix: &str) -> Vec<Change> {
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
                            field: format!("{prefix}{k}.{ak}"),
                            old: render(&old),
                            new: render(av),
                        });
                    }
                }
            }
            Value::Array(_) => {}
            v => {
                let old = l.get(k).cloned().unwrap_or(Value::Null);
                if &old != v {
                    out.push(Change {
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

fn set_change(field: &str, live: &BTreeSet<String>, desired: &BTreeSet<String>) -> Option<Change> {
    (live != desired).then(|| Change {
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
    if let Some(c) = set_change("protocolMappers", &names(live), &names(desired)) {
        out.push(c);
    }
    for m in desired {
        let name = m.name.clone().unwrap_or_default();
        let l = live.iter().find(|x| x.name == m.name);
        if l.is_some() {
            out.extend(compare_rep(m, l, &format!("protocolMappers[{name}].")));
        }
    }
    out
}

/// Where the marker is wrong on an existing object, the conflict text.
fn conflict(
    attrs: Option<&std::collections::HashMap<String, String>>,
    owner: &str,
) -> Option<String> {
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

/// Keycloak's `service_account` scope (26.x: `client_id` and client address
/// claims), which Keycloak attaches to every client created with service
/// accounts through the Admin API.
pub const SERVICE_ACCOUNT_SCOPE: &str = "service_account";

/// A client's default scopes: `basic`, and `service_account` where the realm has
/// it (Keycloak attaches it to service-account clients it creates, so leaving it
/// out would be drift on every run).
pub fn default_scopes(c: &super::desired::Client, live: &Live) -> BTreeSet<String> {
    let mut s = c.default_scopes.clone();
    if live.scopes.contains_key(SERVICE_ACCOUNT_SCOPE) {
        s.insert(SERVICE_ACCOUNT_SCOPE.to_string());
    }
    s
}

/// Compares `desired` with `live`. With `prune`, owned objects no longer desired
/// are removed and extra roles of owned resource servers count as changes.
pub fn plan(desired: &Desired, live: &Live, prune: bool) -> Plan {
    let owner = desired.owner.as_str();
    let mut plan = Plan::default();
    if !live.scopes.contains_key(BASIC_SCOPE) {
        plan.problems.push(format!(
            "the realm has no `{BASIC_SCOPE}` client scope (Keycloak 25+ creates it with every realm; \
             it carries `sub`): create it before apply"
        ));
    }
    let none = BTreeSet::new();
    for rs in &desired.resource_servers {
        let l = live.clients.get(&rs.client_id);
        if let Some(why) = l.and_then(|l| conflict(l.attributes.as_ref(), owner)) {
            plan.entries.push(Entry {
                kind: Kind::ResourceServer,
                name: rs.client_id.clone(),
                action: Action::Conflict(why),
            });
            continue;
        }
        let mut ch = compare_rep(&rs.rep, l, "");
        let live_roles = live.roles.get(&rs.client_id).unwrap_or(&none);
        let wanted_missing = !rs.roles.is_subset(live_roles);
        if wanted_missing || (prune && live_roles != &rs.roles) {
            ch.extend(set_change("roles", live_roles, &rs.roles));
        }
        plan.entries.push(Entry {
            kind: Kind::ResourceServer,
            name: rs.client_id.clone(),
            action: action(l.is_some(), ch),
        });
    }
    for s in &desired.scopes {
        let l = live.scopes.get(&s.name);
        if let Some(why) = l.and_then(|l| conflict(l.attributes.as_ref(), owner)) {
            plan.entries.push(Entry {
                kind: Kind::Scope,
                name: s.name.clone(),
                action: Action::Conflict(why),
            });
            continue;
        }
        let mut ch = compare_rep(&s.rep, l, "");
        let live_mappers = l
            .and_then(|l| l.protocol_mappers.clone())
            .unwrap_or_default();
        ch.extend(mapper_changes(&s.mappers, &live_mappers));
        let empty = BTreeMap::new();
        let lm = live.scope_mappings.get(&s.name).unwrap_or(&empty);
        if lm != &s.scope_mappings {
            ch.push(Change {
                field: "scopeMappings".into(),
                old: mappings_text(lm),
                new: mappings_text(&s.scope_mappings),
            });
        }
        plan.entries.push(Entry {
            kind: Kind::Scope,
            name: s.name.clone(),
            action: action(l.is_some(), ch),
        });
    }
    let servers: BTreeSet<&String> = desired
        .resource_servers
        .iter()
        .map(|r| &r.client_id)
        .collect();
    for c in &desired.clients {
        let l = live.clients.get(&c.client_id);
        if let Some(why) = l.and_then(|l| conflict(l.attributes.as_ref(), owner)) {
            plan.entries.push(Entry {
                kind: Kind::Client,
                name: c.client_id.clone(),
                action: Action::Conflict(why),
            });
            continue;
        }
        let mut ch = compare_rep(&c.rep, l, "");
        let d = live.details.get(&c.client_id).cloned().unwrap_or_default();
        ch.extend(set_change(
            "defaultClientScopes",
            &d.default_scopes,
            &default_scopes(c, live),
        ));
        ch.extend(set_change(
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
            "protocolMappers",
            &live_mappers,
            &BTreeSet::new(),
        ));
        for rs in servers
            .iter()
            .copied()
            .chain(c.roles.keys())
            .collect::<BTreeSet<_>>()
        {
            let want = c.roles.get(rs).unwrap_or(&none);
            let have = d.roles.get(rs).unwrap_or(&none);
            ch.extend(set_change(
                &format!("serviceAccountRoles[{rs}]"),
                have,
                want,
            ));
        }
        plan.entries.push(Entry {
            kind: Kind::Client,
            name: c.client_id.clone(),
            action: action(l.is_some(), ch),
        });
    }
    let gone = if prune {
        Action::Remove
    } else {
        Action::Unneeded
    };
    let acting: BTreeSet<&String> = desired.clients.iter().map(|c| &c.client_id).collect();
    let wanted_scopes: BTreeSet<&String> = desired.scopes.iter().map(|s| &s.name).collect();
    for (id, c) in &live.clients {
        if owned_by(c.attributes.as_ref(), owner) && !acting.contains(id) && !servers.contains(id) {
            let kind = if c.bearer_only == Some(true) {
                Kind::ResourceServer
            } else {
                Kind::Client
            };
            plan.entries.push(Entry {
                kind,
                name: id.clone(),
                action: gone.clone(),
            });
        }
    }
    for (name, s) in &live.scopes {
        if owned_by(s.attributes.as_ref(), owner) && !wanted_scopes.contains(name) {
            plan.entries.push(Entry {
                kind: Kind::Scope,
                name: name.clone(),
                action: gone.clone(),
            });
        }
    }
    for e in &plan.entries {
        if let Action::Conflict(why) = &e.action {
            plan.problems.push(format!("{} {} {why}", e.kind, e.name));
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::policy::compile_str;
    use crate::provision::desired::{derive, Auth, Inputs};
    use crate::provision::live::ClientDetails;
    use crate::provision::model::RealmModel;

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
        };
        derive(inputs, &[policy], &model).unwrap()
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
        let p = plan(&d, &blank, false);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.entries.len(), 3);
        assert!(p
            .entries
            .iter()
            .all(|e| matches!(e.action, Action::Create(_))));
        assert!(p.pending());
        let p = plan(&d, &in_sync(&d), false);
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
                crate::provision::live::REALM_KEY.into(),
                BTreeSet::from(["admin".to_string()]),
            );
        let p = plan(&d, &live, false);
        let changes: Vec<String> = p
            .entries
            .iter()
            .flat_map(|e| match &e.action {
                Action::Update(ch) => ch
                    .iter()
                    .map(|c| format!("{}: {} -> {}", c.field, c.old, c.new))
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            changes,
            [
                "scopeMappings: (realm): admin; deploy-api: deploy -> deploy-api: deploy",
                "attributes.access.token.lifespan: 3600 -> 300",
                "fullScopeAllowed: true -> false",
                "optionalClientScopes: (none) -> deploy:production",
                "protocolMappers: hardcoded -> (none)",
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
        let p = plan(&d, &live, false);
        assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
        assert!(p.problems[0].contains("resource server deploy-api exists and was not created"));
        assert!(p
            .entries
            .iter()
            .any(|e| e.name == "old:scope" && e.action == Action::Unneeded));
        let p = plan(&d, &live, true);
        assert!(p
            .entries
            .iter()
            .any(|e| e.name == "old:scope" && e.action == Action::Remove));
        let e = p.entries.iter().find(|e| e.name == "deploy-api").unwrap();
        assert!(matches!(e.action, Action::Conflict(_)));
    }

    #[test]
    fn a_realm_without_basic_is_a_problem() {
        let d = desired();
        let mut live = in_sync(&d);
        live.scopes.remove(BASIC_SCOPE);
        assert!(plan(&d, &live, false).problems[0].contains("no `basic` client scope"));
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
