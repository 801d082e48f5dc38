//! From a policy file's YAML text to a compiled [`Policy`]: strict parsing (no
//! unknown fields, no null, empty or blank values, no tags), then one function
//! per part of the policy.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::{is_scope_token, BranchPattern, Conditions, Effect, GrantSpec, Policy, PolicyError};
use crate::domain::BbUuid;
use crate::inventory::Inventory;

/// One value or a list of values, as written in a policy.
#[derive(Debug, Clone)]
pub struct OneOrMany(pub Vec<String>);

/// The JSON Schema of a policy file, draft-07 (what editors' YAML support
/// reads: yaml-language-server validates draft-07), committed as
/// `docs/src/schemas/policy.schema.json`. It states what a schema can: field
/// names and types, no null or blank values, allow needs `grant`; the loader
/// checks more (names against the inventory, patterns, scope grammar).
pub fn schema() -> serde_json::Value {
    crate::domain::json_schema::draft07::<RawPolicy>()
}

/// A string with something other than whitespace in it (the loader refuses
/// empty and blank values).
fn non_blank_string() -> schemars::Schema {
    schemars::json_schema!({"type": "string", "pattern": "\\S"})
}

impl schemars::JsonSchema for OneOrMany {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "OneOrMany".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "One value, or a non-empty list of values (any one matches).",
            "oneOf": [non_blank_string(), {"type": "array", "minItems": 1, "items": non_blank_string()}]
        })
    }
}

impl schemars::JsonSchema for StringOnly {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "NonBlankString".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        non_blank_string()
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = a.next_element::<StringOnly>()? {
                    out.push(v.0);
                }
                Ok(OneOrMany(out))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, _a: A) -> Result<OneOrMany, A::Error> {
                Err(de::Error::custom(QUOTE_HINT))
            }
        }
        d.deserialize_any(V)
    }
}

const QUOTE_HINT: &str =
    "is a YAML mapping, not a string: an unquoted {uuid} is read as a mapping; quote it: \"{...}\"";

struct StringOnly(String);
impl<'de> Deserialize<'de> for StringOnly {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringOnly;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOnly, E> {
                Ok(StringOnly(v.to_string()))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, _a: A) -> Result<StringOnly, A::Error> {
                Err(de::Error::custom(QUOTE_HINT))
            }
        }
        d.deserialize_any(V)
    }
}

/// One policy (`policies/<id>.yaml`; the file name is its id). An allow policy
/// grants its `grant` when every condition in `when` matches; a deny policy
/// refuses (its `audiences` and `scopes`, by default everything) whatever any
/// allow says.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "keycloak-ci-sts policy",
    extend("if" = {"properties": {"effect": {"const": "allow"}}}, "then" = {"required": ["grant"], "not": {"anyOf": [{"required": ["audiences"]}, {"required": ["scopes"]}]}}, "else" = {"not": {"required": ["grant"]}})
)]
pub(super) struct RawPolicy {
    /// What the policy is for, for reviewers.
    #[serde(default)]
    #[schemars(regex(pattern = r"\S"))]
    description: Option<String>,
    /// `allow` or `deny`.
    effect: Effect,
    /// The conditions on the Bitbucket token's claims.
    #[serde(default)]
    when: RawWhen,
    /// Deny policies only: the audiences they cover (default: all).
    #[serde(default)]
    #[schemars(length(min = 1), inner(regex(pattern = r"\S")))]
    audiences: Option<Vec<String>>,
    /// Deny policies only: the scopes they refuse (default: the whole audience).
    #[serde(default)]
    #[schemars(length(min = 1))]
    scopes: Option<Vec<StringOnly>>,
    /// Allow policies only: what they grant.
    grant: Option<RawGrant>,
}

/// The conditions: every one present must match (AND); a list matches when
/// any of its values does (OR).
#[derive(Debug, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("minProperties" = 1))]
struct RawWhen {
    /// `workspaceUuid` values (`{uuid}`, quoted in YAML).
    #[serde(rename = "workspaceUuid")]
    workspace_uuid: Option<OneOrMany>,
    /// Workspace IDs (slugs), resolved through the inventory.
    workspace: Option<OneOrMany>,
    /// Repository `full_name`s or globs over them, resolved through the inventory.
    repository: Option<OneOrMany>,
    /// Project keys, resolved through the inventory.
    project: Option<OneOrMany>,
    /// Deployment environment names, resolved through the inventory.
    #[serde(rename = "deploymentEnvironment")]
    deployment_environment: Option<OneOrMany>,
    /// `repositoryUuid` values (`{uuid}`, quoted in YAML).
    #[serde(rename = "repositoryUuid")]
    repository_uuid: Option<OneOrMany>,
    /// `deploymentEnvironmentUuid` values (`{uuid}`, quoted in YAML).
    #[serde(rename = "deploymentEnvironmentUuid")]
    deployment_environment_uuid: Option<OneOrMany>,
    /// `branchName` values or patterns (`*` within a segment, `**` as a whole segment, across `/`; no `?`, classes or alternations).
    #[serde(rename = "branchName")]
    branch_name: Option<OneOrMany>,
    /// Values one of which the token's `aud` must contain (audience markers).
    aud: Option<OneOrMany>,
}

/// What an allow policy grants.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    /// The Keycloak client the service acts as (one of `[keycloak.clients]`).
    #[schemars(regex(pattern = r"\S"))]
    client: String,
    /// The RFC 8693 `audience` a caller asks for.
    #[schemars(regex(pattern = r"\S"))]
    audience: String,
    /// The scopes a caller may obtain.
    #[schemars(length(min = 1))]
    scopes: Vec<StringOnly>,
    /// The scopes issued when the caller names none.
    #[schemars(length(min = 1))]
    default_scopes: Vec<StringOnly>,
    /// Longest token lifetime, in seconds.
    #[schemars(range(min = 1, max = 86400))]
    max_lifetime_seconds: u64,
    /// Per-minute limits for this grant.
    #[serde(default)]
    limits: Option<RawGrantLimits>,
    /// Per-repository identities (clients in JWT Authorization Grant mode).
    identity: Option<crate::domain::identity::IdentityKind>,
    /// Keycloak groups of the repository's user (identity grants).
    #[schemars(length(min = 1))]
    groups: Option<Vec<StringOnly>>,
    /// Protections the grant rests on: a protected branch, approvals, an admin-only environment.
    #[serde(default)]
    require: Option<super::require::RawRequirement>,
}

/// Per-grant rate limits (per minute).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("minProperties" = 1))]
struct RawGrantLimits {
    /// Exchanges per pipeline step and minute.
    #[schemars(range(min = 1))]
    per_step_per_minute: Option<u32>,
    /// Exchanges per repository and minute.
    #[schemars(range(min = 1))]
    per_repository_per_minute: Option<u32>,
}

impl fmt::Debug for StringOnly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Collects `(path, reason)` for every null, empty or blank string, empty sequence
/// or empty mapping, and every YAML tag, below `v` (paths such as `when.repositoryUuid`, `grant.scopes[0]`). A
/// policy may hold none: in YAML a key whose values were all commented out reads as
/// null, and an empty list would silently turn a condition or a deny rule into
/// "nothing", so the file would mean something other than what a reviewer reads.
/// A one-key mapping whose key is a UUID and whose value is null is reported as an
/// unquoted `{uuid}` (YAML reads `{d4e4...}` as a flow mapping with no value).
fn find_empty_values(v: &serde_norway::Value, path: &str, out: &mut Vec<(String, &'static str)>) {
    use serde_norway::Value;
    const EMPTY: &str = "empty value (null, `~`, `[]`, `{}`, \"\" or every value commented out); \
        remove the field or give it values";
    let here = if path.is_empty() {
        ".".to_string()
    } else {
        path.to_string()
    };
    match v {
        Value::Null => out.push((here, EMPTY)),
        Value::String(s) if s.trim().is_empty() => out.push((here, EMPTY)),
        Value::Sequence(items) if items.is_empty() => out.push((here, EMPTY)),
        Value::Mapping(m) if m.is_empty() => out.push((here, EMPTY)),
        Value::Mapping(m)
            if m.len() == 1
                && m.iter().all(|(k, v)| {
                    v.is_null()
                        && k.as_str().is_some_and(|k| {
                            (32..=36).contains(&k.len())
                                && k.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
                        })
                }) =>
        {
            out.push((here, QUOTE_HINT));
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                find_empty_values(item, &format!("{path}[{i}]"), out);
            }
        }
        Value::Mapping(m) => {
            for (k, item) in m {
                let key = match k {
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                let child = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                find_empty_values(item, &child, out);
            }
        }
        Value::Tagged(_) => out.push((here, "YAML tags (`!name`) are not supported in policies")),
        Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
    }
}

/// Parses and compiles one policy from YAML text; `id` is the policy id (the
/// file stem). `known_clients`, when given, are the configured Keycloak clients.
///
/// # Errors
/// [`PolicyError`] with `file` set to `id`.
pub fn compile_str(
    id: &str,
    text: &str,
    known_clients: Option<&BTreeSet<String>>,
) -> Result<Policy, PolicyError> {
    compile_with(id, text, known_clients, &Inventory::default())
}

/// [`compile_str`] resolving names (`workspace`, `repository`, `project`,
/// `deploymentEnvironment`) through `inventory`.
///
/// # Errors
/// [`PolicyError`] with `file` set to `id`; an unknown or ambiguous name is one.
pub fn compile_with(
    id: &str,
    text: &str,
    known_clients: Option<&BTreeSet<String>>,
    inventory: &Inventory,
) -> Result<Policy, PolicyError> {
    let err = Located::new(id);
    let id_ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !id_ok {
        return Err(err.at(
            "",
            "file name must be letters, digits, - _ . (it is the policy id)",
        ));
    }
    let raw = parse(text, &err)?;
    let mut resolutions = Vec::new();
    let when = compile_when(
        raw.when,
        raw.effect == Effect::Deny,
        inventory,
        &mut resolutions,
        &err,
    )?;
    let (grant, deny_audiences) = match raw.effect {
        Effect::Allow => {
            if raw.audiences.is_some() {
                return Err(err.at("audiences", "only deny policies take `audiences`; an allow policy names its audience in grant.audience"));
            }
            if raw.scopes.is_some() {
                return Err(err.at("scopes", "only deny policies take `scopes`; an allow policy names its scopes in grant.scopes"));
            }
            if when.workspace_uuid.is_none() && when.repository_uuid.is_none() {
                return Err(err.at(
                    "when",
                    "an allow policy must name workspaceUuid or repositoryUuid",
                ));
            }
            let g = raw
                .grant
                .ok_or_else(|| err.at("grant", "an allow policy needs a grant"))?;
            let grant = compile_grant(g, known_clients, &err)?;
            if grant.identity == Some(crate::domain::identity::IdentityKind::RepositoryEnvironment)
                && when.deployment_environment_uuid.is_none()
            {
                return Err(err.at(
                    "grant.identity",
                    "`repository_environment` needs `when.deploymentEnvironment` (or \
                     deploymentEnvironmentUuid): a step without an environment has no such identity",
                ));
            }
            (Some(grant), None)
        }
        Effect::Deny => {
            if raw.grant.is_some() {
                return Err(err.at("grant", "a deny policy grants nothing; remove `grant`"));
            }
            if when.is_empty() {
                return Err(err.at("when", "a deny policy without conditions would deny everything; name at least one claim"));
            }
            (None, compile_deny_audiences(raw.audiences, &err)?)
        }
    };
    let deny_scopes = raw
        .scopes
        .map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, s)| {
                    if is_scope_token(&s.0) {
                        Ok(s.0)
                    } else {
                        Err(err.at(
                            &format!("scopes[{i}]"),
                            "must be an RFC 6749 scope token (no spaces or quotes)",
                        ))
                    }
                })
                .collect::<Result<BTreeSet<_>, _>>()
        })
        .transpose()?;
    Ok(Policy {
        id: id.to_string(),
        description: raw.description,
        effect: raw.effect,
        when,
        deny_audiences,
        deny_scopes,
        grant,
        resolutions,
    })
}

/// Builds [`PolicyError`]s for one file.
struct Located {
    file: String,
}

impl Located {
    fn new(file: &str) -> Self {
        Self {
            file: file.to_string(),
        }
    }

    fn at(&self, key: &str, reason: impl Into<String>) -> PolicyError {
        PolicyError {
            file: self.file.clone(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// YAML text to [`RawPolicy`]: a byte order mark is ignored; any null, empty or
/// blank value or tag is refused (every one named); then typed, strict parsing.
fn parse(text: &str, err: &Located) -> Result<RawPolicy, PolicyError> {
    // A UTF-8 byte order mark, as some editors write, is not part of the policy.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    crate::domain::yaml::refuse_anchors_and_aliases(text).map_err(|e| err.at("", e))?;
    let tree: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| err.at("", redact_values(&e.to_string())))?;
    let mut empties = Vec::new();
    find_empty_values(&tree, "", &mut empties);
    if let Some((first, reason)) = empties.first() {
        let mut reason = (*reason).to_string();
        if empties.len() > 1 {
            let all: Vec<&str> = empties.iter().map(|(p, _)| p.as_str()).collect();
            reason = format!("{reason} (also refused: `{}`)", all[1..].join("`, `"));
        }
        return Err(err.at(first, reason));
    }
    serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        // serde_norway prefixes its own message with the path; keep one copy.
        let msg = msg
            .strip_prefix(&format!("{path}: "))
            .map(str::to_string)
            .unwrap_or(msg);
        err.at(if path == "." { "" } else { &path }, redact_values(&msg))
    })
}

/// A parser message without the values it quotes (`invalid type: string "…"`):
/// a file that is not a policy (a secret behind a wrong name) must not end up in
/// logs or `policy check` output.
pub(crate) fn redact_values(msg: &str) -> String {
    // serde names an unknown variant in backticks: that is a value too.
    let msg = match msg.find("unknown variant `") {
        Some(i) => {
            let start = i + "unknown variant `".len();
            match msg[start..].find('`') {
                Some(len) => format!("{}…{}", &msg[..start], &msg[start + len..]),
                None => msg.to_string(),
            }
        }
        None => msg.to_string(),
    };
    let mut out = String::with_capacity(msg.len());
    let mut in_quote = false;
    for c in msg.chars() {
        match (c, in_quote) {
            ('"', false) => {
                in_quote = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                in_quote = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    if in_quote {
        out.push('"');
    }
    out
}

fn compile_uuids(
    field: &str,
    v: Option<OneOrMany>,
    err: &Located,
) -> Result<Option<Vec<BbUuid>>, PolicyError> {
    let Some(v) = v else { return Ok(None) };
    if v.0.is_empty() {
        return Err(err.at(
            field,
            "an empty list matches nothing; remove the condition or add values",
        ));
    }
    v.0.iter()
        .enumerate()
        .map(|(i, s)| {
            BbUuid::parse_lenient(s).map_err(|e| err.at(&format!("{field}[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn compile_when(
    w: RawWhen,
    deny: bool,
    inventory: &Inventory,
    resolutions: &mut Vec<String>,
    err: &Located,
) -> Result<Conditions, PolicyError> {
    if deny {
        deny_names_are_exact(&w, err)?;
    }
    let branch_name = match w.branch_name {
        None => None,
        Some(v) if v.0.is_empty() => {
            return Err(err.at("when.branchName", "an empty list matches nothing"))
        }
        Some(v) => Some(
            v.0.iter()
                .enumerate()
                .map(|(i, p)| {
                    BranchPattern::new(p).map_err(|e| err.at(&format!("when.branchName[{i}]"), e))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let mut names = Names {
        inventory,
        err,
        resolutions,
    };
    let workspace_uuid = one_way(
        err,
        "when.workspaceUuid",
        compile_uuids("when.workspaceUuid", w.workspace_uuid, err)?,
        names.workspaces(w.workspace)?,
    )?;
    let repository_uuid = one_way(
        err,
        "when.repositoryUuid",
        compile_uuids("when.repositoryUuid", w.repository_uuid, err)?,
        names.repositories(w.repository, w.project, workspace_uuid.as_deref())?,
    )?;
    let deployment_environment_uuid = one_way(
        err,
        "when.deploymentEnvironmentUuid",
        compile_uuids(
            "when.deploymentEnvironmentUuid",
            w.deployment_environment_uuid,
            err,
        )?,
        names.environments(
            w.deployment_environment,
            workspace_uuid.as_deref(),
            repository_uuid.as_deref(),
        )?,
    )?;
    Ok(Conditions {
        workspace_uuid,
        repository_uuid,
        deployment_environment_uuid,
        branch_name,
        aud: compile_aud(w.aud, err)?,
    })
}

/// Longest `when.aud` value: Bitbucket allows 150 characters per custom
/// audience (Atlassian, "Bitbucket Pipelines OIDC now supports multiple
/// audiences"), so a longer marker could never be declared.
pub const MAX_AUD_VALUE_BYTES: usize = 150;

/// `when.aud`: exact values (no patterns: a marker is one string the pipeline
/// file declares), each 1 to [`MAX_AUD_VALUE_BYTES`] visible ASCII characters
/// (no spaces): no lookalike letters or invisible characters that would make a
/// deny read as covering a marker it never matches.
fn compile_aud(v: Option<OneOrMany>, err: &Located) -> Result<Option<Vec<String>>, PolicyError> {
    let Some(v) = v else { return Ok(None) };
    for (i, a) in v.0.iter().enumerate() {
        let ok =
            (1..=MAX_AUD_VALUE_BYTES).contains(&a.len()) && a.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(err.at(
                &format!("when.aud[{i}]"),
                format!(
                    "an audience the step declares (`oidc: audiences:`): 1 to \
                     {MAX_AUD_VALUE_BYTES} visible ASCII characters, no spaces; matched exactly"
                ),
            ));
        }
    }
    let mut out = v.0;
    out.dedup();
    Ok(Some(out))
}

/// A deny policy may only use names that mean exactly one thing whatever the
/// inventory lists: `workspace` and exact `repository` names. A project, a glob or
/// an environment name expands to what the inventory lists *today*, so a
/// repository or environment created since would not be denied: the deny would
/// deny less than it reads.
fn deny_names_are_exact(w: &RawWhen, err: &Located) -> Result<(), PolicyError> {
    let msg = "a deny policy cannot name projects, repository globs or environment names \
               (they expand to what the inventory lists today, so what it does not list \
               yet would not be denied): name exact repositories, and environments by \
               `deploymentEnvironmentUuid`";
    if w.project.is_some() {
        return Err(err.at("when.project", msg));
    }
    if w.deployment_environment.is_some() {
        return Err(err.at("when.deploymentEnvironment", msg));
    }
    if let Some(names) = &w.repository {
        if let Some(i) = names.0.iter().position(|n| n.contains('*')) {
            return Err(err.at(&format!("when.repository[{i}]"), msg));
        }
    }
    Ok(())
}

/// A condition named by UUID or by name, not both.
fn one_way(
    err: &Located,
    field: &str,
    by_uuid: Option<Vec<BbUuid>>,
    by_name: Option<Vec<BbUuid>>,
) -> Result<Option<Vec<BbUuid>>, PolicyError> {
    match (by_uuid, by_name) {
        (Some(_), Some(_)) => Err(err.at(
            field,
            "name these by UUID or by name, not both in one policy",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// `name` in ASCII lower case, without a copy when it already is.
fn lower(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// Resolves names through the inventory, recording each resolution.
struct Names<'a> {
    inventory: &'a Inventory,
    err: &'a Located,
    resolutions: &'a mut Vec<String>,
}

impl Names<'_> {
    fn need_inventory(&self, field: &str) -> Result<(), PolicyError> {
        if self.inventory.is_empty() {
            return Err(self.err.at(
                field,
                "names need an inventory: write one with `keycloak-ci-sts bitbucket inventory` into the policies directory's `inventory/`",
            ));
        }
        Ok(())
    }

    fn workspaces(&mut self, names: Option<OneOrMany>) -> Result<Option<Vec<BbUuid>>, PolicyError> {
        let Some(names) = names else { return Ok(None) };
        self.need_inventory("when.workspace")?;
        let mut out = Vec::new();
        for (i, n) in names.0.iter().enumerate() {
            let found = self.inventory.workspace_uuids(n);
            let Some(u) = found.first().copied().filter(|_| found.len() == 1) else {
                return Err(self.err.at(
                    &format!("when.workspace[{i}]"),
                    format!("workspace `{n}` is not in the inventory (or has no repository)"),
                ));
            };
            self.resolutions
                .push(format!("when.workspace[{i}] `{n}` -> {u}"));
            out.push(u);
        }
        Ok(Some(out))
    }

    fn repositories(
        &mut self,
        names: Option<OneOrMany>,
        projects: Option<OneOrMany>,
        workspaces: Option<&[BbUuid]>,
    ) -> Result<Option<Vec<BbUuid>>, PolicyError> {
        let by_name = match names {
            None => None,
            Some(names) => {
                self.need_inventory("when.repository")?;
                let mut set = BTreeSet::new();
                for (i, n) in names.0.iter().enumerate() {
                    set.extend(self.repository(i, n, workspaces)?);
                }
                Some(set)
            }
        };
        let by_project = match projects {
            None => None,
            Some(keys) => {
                self.need_inventory("when.project")?;
                let mut set = BTreeSet::new();
                for (i, k) in keys.0.iter().enumerate() {
                    // Project keys are unique within a workspace only.
                    let repos: Vec<_> = self
                        .inventory
                        .in_project(k)
                        .filter(|r| {
                            workspaces.is_none_or(|ws| ws.contains(&r.workspace().workspace_uuid))
                        })
                        .collect();
                    let in_workspaces: BTreeSet<BbUuid> =
                        repos.iter().map(|r| r.workspace().workspace_uuid).collect();
                    if in_workspaces.len() > 1 {
                        return Err(self.err.at(
                            &format!("when.project[{i}]"),
                            format!("project `{k}` exists in several workspaces: name the workspace too (`workspace:`)"),
                        ));
                    }
                    if repos.is_empty() {
                        return Err(self.err.at(
                            &format!("when.project[{i}]"),
                            format!("no repository of the inventory (of the workspaces this policy names) is in project `{k}`"),
                        ));
                    }
                    for r in repos {
                        self.resolutions.push(format!(
                            "when.project[{i}] `{k}` -> {} {}",
                            r.uuid(),
                            r.full_name()
                        ));
                        set.insert(r.uuid());
                    }
                }
                Some(set)
            }
        };
        let set = match (by_name, by_project) {
            (Some(a), Some(b)) => {
                let both: BTreeSet<BbUuid> = a.intersection(&b).copied().collect();
                if both.is_empty() {
                    return Err(self.err.at(
                        "when.repository",
                        "no repository both matches `repository` and is in `project`",
                    ));
                }
                both
            }
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return Ok(None),
        };
        Ok(Some(set.into_iter().collect()))
    }

    /// One `repository` entry: a `full_name` (case-insensitive) or a glob over them,
    /// among the repositories of `workspaces` when the policy names any.
    fn repository(
        &mut self,
        i: usize,
        name: &str,
        workspaces: Option<&[BbUuid]>,
    ) -> Result<Vec<BbUuid>, PolicyError> {
        let field = format!("when.repository[{i}]");
        let matcher = if name.contains('*') {
            BranchPattern::new(&name.to_ascii_lowercase())
                .map_err(|e| self.err.at(&field, e))
                .map(Some)?
        } else {
            None
        };
        let in_scope = |r: &crate::inventory::RepositoryRef<'_>| {
            workspaces.is_none_or(|ws| ws.contains(&r.workspace().workspace_uuid))
        };
        let found: Vec<(BbUuid, String)> = match &matcher {
            // A glob is matched against every repository's name.
            Some(m) => self
                .inventory
                .repositories()
                .filter(|r| in_scope(r) && m.is_match(&lower(r.full_name())))
                .map(|r| (r.uuid(), r.full_name().to_string()))
                .collect(),
            None => self
                .inventory
                .repository_named(name)
                .filter(in_scope)
                .map(|r| (r.uuid(), r.full_name().to_string()))
                .into_iter()
                .collect(),
        };
        if found.is_empty() {
            return Err(self.err.at(
                &field,
                format!("`{name}` names no repository in the inventory (of the workspaces this policy names): check the spelling; if the inventory is fresh, the repository may have been renamed or deleted, so update the policy"),
            ));
        }
        for (u, n) in &found {
            self.resolutions
                .push(format!("{field} `{name}` -> {u} {n}"));
        }
        Ok(found.into_iter().map(|(u, _)| u).collect())
    }

    /// Environment names, among the policy's repositories (or, without a
    /// repository condition, every repository of its workspaces, or all).
    fn environments(
        &mut self,
        names: Option<OneOrMany>,
        workspaces: Option<&[BbUuid]>,
        repositories: Option<&[BbUuid]>,
    ) -> Result<Option<Vec<BbUuid>>, PolicyError> {
        let Some(names) = names else { return Ok(None) };
        self.need_inventory("when.deploymentEnvironment")?;
        let mut out = BTreeSet::new();
        // The policy's repositories (looked up), or every repository.
        let scope: Vec<crate::inventory::RepositoryRef<'_>> = match repositories {
            Some(rs) => rs
                .iter()
                .filter_map(|u| self.inventory.repository(u))
                .collect(),
            None => self.inventory.repositories().collect(),
        };
        let scope: Vec<_> = scope
            .into_iter()
            .filter(|r| workspaces.is_none_or(|ws| ws.contains(&r.workspace().workspace_uuid)))
            .collect();
        for (i, n) in names.0.iter().enumerate() {
            let mut found = Vec::new();
            for r in &scope {
                for e in r.environments().filter(|e| e.name == n.as_str()) {
                    found.push((e.uuid, r.full_name().to_string()));
                }
            }
            if found.is_empty() {
                let mut known: BTreeSet<&str> = BTreeSet::new();
                for r in &scope {
                    known.extend(r.environments().map(|e| e.name));
                }
                let known: Vec<&str> = known.into_iter().collect();
                return Err(self.err.at(
                    &format!("when.deploymentEnvironment[{i}]"),
                    format!(
                        "no repository this policy names has a deployment environment `{n}` (names are case-sensitive; known: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                ));
            }
            for (u, repo) in found {
                self.resolutions.push(format!(
                    "when.deploymentEnvironment[{i}] `{n}` -> {u} ({repo})"
                ));
                out.insert(u);
            }
        }
        Ok(Some(out.into_iter().collect()))
    }
}

fn compile_grant(
    g: RawGrant,
    known_clients: Option<&BTreeSet<String>>,
    err: &Located,
) -> Result<GrantSpec, PolicyError> {
    if g.client.is_empty() || g.client.len() > 255 {
        return Err(err.at("grant.client", "must be a Keycloak clientId"));
    }
    if known_clients.is_some_and(|known| !known.contains(&g.client)) {
        return Err(err.at(
            "grant.client",
            format!("`{}` is not configured under [keycloak.clients]", g.client),
        ));
    }
    if !is_scope_token(&g.audience) {
        return Err(err.at(
            "grant.audience",
            "must be a non-empty token without spaces or quotes",
        ));
    }
    let mut scopes = BTreeSet::new();
    for (i, s) in g.scopes.iter().enumerate() {
        if !is_scope_token(&s.0) {
            return Err(err.at(
                &format!("grant.scopes[{i}]"),
                format!("`{}` is not an RFC 6749 scope token", s.0),
            ));
        }
        scopes.insert(s.0.clone());
    }
    let mut default_scopes = Vec::new();
    for (i, s) in g.default_scopes.iter().enumerate() {
        if !scopes.contains(&s.0) {
            return Err(err.at(
                &format!("grant.default_scopes[{i}]"),
                format!("`{}` is not in grant.scopes", s.0),
            ));
        }
        if !default_scopes.contains(&s.0) {
            default_scopes.push(s.0.clone());
        }
    }
    if !(1..=86_400).contains(&g.max_lifetime_seconds) {
        return Err(err.at("grant.max_lifetime_seconds", "must be 1..=86400"));
    }
    let limit = |field: &str, v: Option<u32>| {
        v.map(|n| std::num::NonZeroU32::new(n).ok_or_else(|| err.at(field, "must be at least 1")))
            .transpose()
    };
    let limits = g.limits.unwrap_or_default();
    let mut groups = BTreeSet::new();
    for (i, name) in g.groups.iter().flatten().enumerate() {
        let ok = (1..=255).contains(&name.0.len())
            && name.0.trim() == name.0
            && !name.0.contains('/')
            && !name.0.chars().any(char::is_control);
        if !ok {
            return Err(err.at(
                &format!("grant.groups[{i}]"),
                "a Keycloak top-level group name: 1 to 255 characters, no `/`, no surrounding spaces",
            ));
        }
        groups.insert(name.0.clone());
    }
    let require = g
        .require
        .as_ref()
        .map(super::require::RawRequirement::compile)
        .transpose()
        .map_err(|e| err.at("grant.require", e))?
        .unwrap_or_default();
    Ok(GrantSpec {
        require,
        identity: g.identity,
        groups,
        per_step_per_minute: limit(
            "grant.limits.per_step_per_minute",
            limits.per_step_per_minute,
        )?,
        per_repository_per_minute: limit(
            "grant.limits.per_repository_per_minute",
            limits.per_repository_per_minute,
        )?,
        client: g.client,
        audience: g.audience,
        scopes,
        default_scopes,
        max_lifetime_seconds: g.max_lifetime_seconds,
    })
}

fn compile_deny_audiences(
    audiences: Option<Vec<String>>,
    err: &Located,
) -> Result<Option<BTreeSet<String>>, PolicyError> {
    let Some(a) = audiences else { return Ok(None) };
    for (i, aud) in a.iter().enumerate() {
        if !is_scope_token(aud) {
            return Err(err.at(
                &format!("audiences[{i}]"),
                "must be a non-empty token without spaces or quotes",
            ));
        }
    }
    Ok(Some(a.into_iter().collect()))
}
