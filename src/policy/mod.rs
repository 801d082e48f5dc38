//! Policies: reviewed YAML files that decide which Bitbucket identities may get
//! which Keycloak client, audience and scopes.
//!
//! One policy per file (`policies/<id>.yaml`, the id is the file stem). Files are
//! parsed strictly (unknown fields refused) and compiled at startup: the service
//! refuses to start on any error, naming the file and field. See the README's
//! policy reference for the format. Evaluation ([`PolicySet::evaluate`]) never
//! fails: deny by default, any matching `deny` policy beats every `allow`.

mod eval;
#[cfg(test)]
mod props;
mod store;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::domain::BbUuid;
pub use eval::{Decision, DenyKind, EvalRequest, Grant, Outcome, TraceEntry};
pub use store::PolicyStore;

/// What policies decide on: the claims a condition can name, with Bitbucket's
/// claim names (Atlassian, "Integrate Pipelines with resource servers using
/// OIDC"). The exchange builds it from a verified token; `policy explain` builds it
/// from claims it has not verified ([`Subject::from_claims`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Subject {
    /// `workspaceUuid`.
    #[serde(rename = "workspaceUuid")]
    pub workspace_uuid: BbUuid,
    /// `repositoryUuid`.
    #[serde(rename = "repositoryUuid")]
    pub repository_uuid: BbUuid,
    /// `deploymentEnvironmentUuid`: deployment steps only.
    #[serde(rename = "deploymentEnvironmentUuid")]
    pub deployment_environment_uuid: Option<BbUuid>,
    /// `branchName`; `None` when absent or empty (tag builds).
    #[serde(rename = "branchName")]
    pub branch_name: Option<String>,
}

/// The claims [`Subject::from_claims`] reads, as Bitbucket names them; any other
/// claim is ignored.
#[derive(Debug, Deserialize)]
pub struct SubjectClaims {
    /// `workspaceUuid`, braces optional.
    #[serde(rename = "workspaceUuid")]
    pub workspace_uuid: String,
    /// `repositoryUuid`, braces optional.
    #[serde(rename = "repositoryUuid")]
    pub repository_uuid: String,
    /// `deploymentEnvironmentUuid`, braces optional.
    #[serde(rename = "deploymentEnvironmentUuid", default)]
    pub deployment_environment_uuid: Option<String>,
    /// `branchName`.
    #[serde(rename = "branchName", default)]
    pub branch_name: Option<String>,
}

impl Subject {
    /// A subject from claims nobody verified (for `policy explain`): UUIDs with or
    /// without braces; an empty `branchName` reads as absent, as in tokens.
    ///
    /// # Errors
    /// The claim that is not a UUID.
    pub fn from_claims(c: SubjectClaims) -> Result<Self, String> {
        let uuid =
            |claim: &str, v: &str| BbUuid::parse_lenient(v).map_err(|e| format!("`{claim}`: {e}"));
        Ok(Self {
            workspace_uuid: uuid("workspaceUuid", &c.workspace_uuid)?,
            repository_uuid: uuid("repositoryUuid", &c.repository_uuid)?,
            deployment_environment_uuid: c
                .deployment_environment_uuid
                .map(|e| uuid("deploymentEnvironmentUuid", &e))
                .transpose()?,
            branch_name: c.branch_name.filter(|b| !b.is_empty()),
        })
    }
}

/// Longest accepted policy file, in bytes.
pub const MAX_POLICY_FILE_BYTES: u64 = 256 * 1024;

/// A policy that could not be loaded or compiled.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {}{reason}", if field.is_empty() { String::new() } else { format!("`{field}`: ") })]
pub struct PolicyError {
    /// The policy file.
    pub file: String,
    /// Field path inside the file (`when.branchName[1]`), or empty for the whole file.
    pub field: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}

/// `allow` grants when every condition matches; `deny` refuses when every condition matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Grants the policy's `grant`.
    Allow,
    /// Refuses, whatever any allow policy says.
    Deny,
}

/// One value or a list of values, as written in a policy.
#[derive(Debug, Clone)]
pub struct OneOrMany(pub Vec<String>);

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

/// The file format of a policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    description: Option<String>,
    effect: Effect,
    #[serde(default)]
    when: RawWhen,
    /// Deny policies only: the audiences they cover (default: all).
    #[serde(default)]
    audiences: Option<Vec<String>>,
    grant: Option<RawGrant>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    #[serde(rename = "workspaceUuid")]
    workspace_uuid: Option<OneOrMany>,
    #[serde(rename = "repositoryUuid")]
    repository_uuid: Option<OneOrMany>,
    #[serde(rename = "deploymentEnvironmentUuid")]
    deployment_environment_uuid: Option<OneOrMany>,
    #[serde(rename = "branchName")]
    branch_name: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    client: String,
    audience: String,
    scopes: Vec<StringOnly>,
    default_scopes: Vec<StringOnly>,
    max_lifetime_seconds: u64,
    #[serde(default)]
    limits: Option<RawGrantLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrantLimits {
    per_step_per_minute: Option<u32>,
    per_repository_per_minute: Option<u32>,
}

impl fmt::Debug for StringOnly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A compiled branch pattern: `*` (any run of characters) never crosses `/`; `**`
/// does, and stands only as a whole path segment (`**`, `**/x`, `x/**`,
/// `x/**/y`). `\` escapes the next character. Nothing else is pattern syntax,
/// and what could never match a branch is refused: see [`check_branch_pattern`].
#[derive(Debug, Clone)]
pub struct BranchPattern {
    source: String,
    matcher: GlobMatcher,
}

impl BranchPattern {
    /// Compiles a pattern (globset syntax, `literal_separator` on).
    ///
    /// # Errors
    /// The glob parser's message.
    pub fn new(p: &str) -> Result<Self, String> {
        if p.is_empty() {
            return Err("empty branch pattern".into());
        }
        check_branch_pattern(p)?;
        let glob = GlobBuilder::new(p)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            source: p.to_string(),
            matcher: glob.compile_matcher(),
        })
    }

    /// True when `branch` matches.
    pub fn is_match(&self, branch: &str) -> bool {
        self.matcher.is_match(branch)
    }

    /// The pattern as written.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The pattern rules, so that no pattern matches more, or denies less, than its
/// text says:
/// - `[`, `]`, `{`, `}` are refused unless escaped: globset would read classes
///   and alternations, and a class can match `/`, which `*` never does;
/// - `?` is refused: globset's `?` matches one byte, not one character, so a
///   deny with `?` would not match a branch with a non-ASCII character there;
/// - `**` is refused except as a whole segment: elsewhere globset quietly reads
///   it as `*`, which does not cross `/`;
/// - white space, control characters, `~`, `^` and `:` are refused: git branch
///   names cannot contain them (git-check-ref-format), so such a pattern could
///   never match (a common mistake is `main, develop` for a list).
///
/// # Errors
/// What is wrong, with the way to write it instead.
pub fn check_branch_pattern(p: &str) -> Result<(), String> {
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.next().is_none() => {
                return Err("pattern ends with a lone `\\`".into());
            }
            '[' | ']' | '{' | '}' => {
                return Err(format!(
                    "`{c}` is not supported in branch patterns: only `*` and `**` are; \
                     list alternatives instead (branchName: [main, master]) and escape a \
                     literal brace as `\\{{`"
                ))
            }
            '?' => {
                return Err(
                    "`?` is not supported in branch patterns (it would match one byte, \
                            not one character); use `*` or list the names"
                        .into(),
                )
            }
            c if c.is_whitespace() || c.is_control() || matches!(c, '~' | '^' | ':') => {
                return Err(format!(
                    "`{}` cannot occur in a git branch name, so this pattern never matches; \
                     to name several branches write a list: branchName: [main, develop]",
                    c.escape_debug()
                ))
            }
            _ => {}
        }
    }
    for (i, _) in p.match_indices("**") {
        let before_ok = i == 0 || p[..i].ends_with('/');
        let after = &p[i + 2..];
        let after_ok = after.is_empty() || after.starts_with('/');
        if !(before_ok && after_ok) || after.starts_with('*') {
            return Err(
                "`**` must be a whole path segment (`**`, `**/x`, `x/**` or `x/**/y`); \
                 elsewhere it would mean `*`, which does not cross `/`"
                    .into(),
            );
        }
    }
    Ok(())
}

/// Compiled conditions; every present condition must match (AND); a list matches
/// when any element does (OR). A condition never matches a token lacking the claim.
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    /// `workspaceUuid` in this set.
    pub workspace_uuid: Option<Vec<BbUuid>>,
    /// `repositoryUuid` in this set.
    pub repository_uuid: Option<Vec<BbUuid>>,
    /// `deploymentEnvironmentUuid` in this set.
    pub deployment_environment_uuid: Option<Vec<BbUuid>>,
    /// `branchName` matches one of these patterns.
    pub branch_name: Option<Vec<BranchPattern>>,
}

impl Conditions {
    fn is_empty(&self) -> bool {
        self.workspace_uuid.is_none()
            && self.repository_uuid.is_none()
            && self.deployment_environment_uuid.is_none()
            && self.branch_name.is_none()
    }
}

/// What an allow policy grants.
#[derive(Debug, Clone)]
pub struct GrantSpec {
    /// Keycloak `clientId` the service authenticates as.
    pub client: String,
    /// The `audience` value a caller sends to select this grant.
    pub audience: String,
    /// Scopes a caller may request (Keycloak optional client scopes).
    pub scopes: BTreeSet<String>,
    /// Scopes granted when the caller requests none.
    pub default_scopes: Vec<String>,
    /// Longest token lifetime accepted from Keycloak, in seconds.
    pub max_lifetime_seconds: u64,
    /// Per-policy overrides of the service's per-minute limits.
    pub per_step_per_minute: Option<std::num::NonZeroU32>,
    /// Per-policy override of the per-repository limit.
    pub per_repository_per_minute: Option<std::num::NonZeroU32>,
}

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// File stem.
    pub id: String,
    /// Free text.
    pub description: Option<String>,
    /// allow or deny.
    pub effect: Effect,
    /// Conditions on the token's claims.
    pub when: Conditions,
    /// Deny only: audiences covered (`None` = all).
    pub deny_audiences: Option<BTreeSet<String>>,
    /// Allow only: the grant.
    pub grant: Option<GrantSpec>,
}

/// All compiled policies, in file-name order.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

pub use crate::domain::oauth::is_scope_token;

impl PolicySet {
    /// The compiled policies, in evaluation order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Problems that do not make the set invalid but probably are mistakes, one line
    /// each (`policy check` prints them, `serve` logs them): a deny policy naming an
    /// audience that no allow policy grants (a typo would leave the audience it meant
    /// uncovered).
    pub fn warnings(&self) -> Vec<String> {
        let granted: BTreeSet<&str> = self
            .policies
            .iter()
            .filter_map(|p| p.grant.as_ref().map(|g| g.audience.as_str()))
            .collect();
        let mut out = Vec::new();
        for p in &self.policies {
            let Some(auds) = &p.deny_audiences else {
                continue;
            };
            for a in auds {
                if !granted.contains(a.as_str()) {
                    out.push(format!(
                        "{}: `audiences`: no allow policy grants audience `{a}`; this deny rule covers nothing for it (a typo?)",
                        p.id
                    ));
                }
            }
        }
        out
    }

    /// Builds a set from compiled policies (sorted by id).
    pub fn from_policies(mut policies: Vec<Policy>) -> Self {
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        Self { policies }
    }

    /// Loads and compiles every `*.yaml` / `*.yml` file of `dir` (not recursive).
    /// `known_clients`, when given, are the Keycloak clients of the configuration;
    /// a grant naming another client is an error.
    ///
    /// # Errors
    /// Every [`PolicyError`] found (all files are checked, not just the first).
    pub fn load_dir(
        dir: &Path,
        known_clients: Option<&BTreeSet<String>>,
    ) -> Result<Self, Vec<PolicyError>> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            vec![PolicyError {
                file: dir.display().to_string(),
                field: String::new(),
                reason: format!("cannot read policies directory: {e}"),
            }]
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                    && !p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        files.sort();
        let mut policies = Vec::new();
        let mut errors = Vec::new();
        for f in files {
            match load_file(&f, known_clients) {
                Ok(p) => policies.push(p),
                Err(e) => errors.push(e),
            }
        }
        let mut ids = BTreeSet::new();
        for p in &policies {
            if !ids.insert(p.id.clone()) {
                errors.push(PolicyError {
                    file: dir.display().to_string(),
                    field: String::new(),
                    reason: format!("two files define policy id `{}` (.yaml and .yml)", p.id),
                });
            }
        }
        if errors.is_empty() {
            Ok(Self::from_policies(policies))
        } else {
            Err(errors)
        }
    }
}

fn load_file(path: &Path, known_clients: Option<&BTreeSet<String>>) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    let err = |field: &str, reason: String| PolicyError {
        file: file.clone(),
        field: field.to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err("", e.to_string()))?;
    if meta.len() > MAX_POLICY_FILE_BYTES {
        return Err(err(
            "",
            format!("file is larger than {MAX_POLICY_FILE_BYTES} bytes"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err("", e.to_string()))?;
    let id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    compile_str(&id, &text, known_clients).map_err(|mut e| {
        e.file = file.clone();
        e
    })
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

/// Parses and compiles one policy from YAML text.
///
/// # Errors
/// [`PolicyError`] with `file` set to `id`.
pub fn compile_str(
    id: &str,
    text: &str,
    known_clients: Option<&BTreeSet<String>>,
) -> Result<Policy, PolicyError> {
    let err = |field: &str, reason: String| PolicyError {
        file: id.to_string(),
        field: field.to_string(),
        reason,
    };
    let id_ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !id_ok {
        return Err(err(
            "",
            "file name must be letters, digits, - _ . (it is the policy id)".into(),
        ));
    }
    // A UTF-8 byte order mark, as some editors write, is not part of the policy.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let tree: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| err("", e.to_string()))?;
    let mut empties = Vec::new();
    find_empty_values(&tree, "", &mut empties);
    if let Some((first, reason)) = empties.first() {
        let mut reason = (*reason).to_string();
        if empties.len() > 1 {
            let all: Vec<&str> = empties.iter().map(|(p, _)| p.as_str()).collect();
            reason = format!("{reason} (also refused: `{}`)", all[1..].join("`, `"));
        }
        return Err(err(first, reason));
    }
    let raw: RawPolicy = serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        // serde_norway prefixes its own message with the path; keep one copy.
        let msg = msg
            .strip_prefix(&format!("{path}: "))
            .map(str::to_string)
            .unwrap_or(msg);
        err(if path == "." { "" } else { &path }, msg)
    })?;

    let uuids = |field: &str, v: Option<OneOrMany>| -> Result<Option<Vec<BbUuid>>, PolicyError> {
        let Some(v) = v else { return Ok(None) };
        if v.0.is_empty() {
            return Err(err(
                field,
                "an empty list matches nothing; remove the condition or add values".into(),
            ));
        }
        v.0.iter()
            .enumerate()
            .map(|(i, s)| {
                BbUuid::parse_lenient(s).map_err(|e| err(&format!("{field}[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };
    let when = Conditions {
        workspace_uuid: uuids("when.workspaceUuid", raw.when.workspace_uuid)?,
        repository_uuid: uuids("when.repositoryUuid", raw.when.repository_uuid)?,
        deployment_environment_uuid: uuids(
            "when.deploymentEnvironmentUuid",
            raw.when.deployment_environment_uuid,
        )?,
        branch_name: match raw.when.branch_name {
            None => None,
            Some(v) if v.0.is_empty() => {
                return Err(err(
                    "when.branchName",
                    "an empty list matches nothing".into(),
                ))
            }
            Some(v) => Some(
                v.0.iter()
                    .enumerate()
                    .map(|(i, p)| {
                        BranchPattern::new(p).map_err(|e| err(&format!("when.branchName[{i}]"), e))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        },
    };

    let (grant, deny_audiences) = match raw.effect {
        Effect::Allow => {
            if raw.audiences.is_some() {
                return Err(err("audiences", "only deny policies take `audiences`; an allow policy names its audience in grant.audience".into()));
            }
            if when.workspace_uuid.is_none() && when.repository_uuid.is_none() {
                return Err(err(
                    "when",
                    "an allow policy must name workspaceUuid or repositoryUuid".into(),
                ));
            }
            let g = raw
                .grant
                .ok_or_else(|| err("grant", "an allow policy needs a grant".into()))?;
            if g.client.is_empty() || g.client.len() > 255 {
                return Err(err("grant.client", "must be a Keycloak clientId".into()));
            }
            if let Some(known) = known_clients {
                if !known.contains(&g.client) {
                    return Err(err(
                        "grant.client",
                        format!("`{}` is not configured under [keycloak.clients]", g.client),
                    ));
                }
            }
            if !is_scope_token(&g.audience) {
                return Err(err(
                    "grant.audience",
                    "must be a non-empty token without spaces or quotes".into(),
                ));
            }
            let mut scopes = BTreeSet::new();
            for (i, s) in g.scopes.iter().enumerate() {
                if !is_scope_token(&s.0) {
                    return Err(err(
                        &format!("grant.scopes[{i}]"),
                        format!("`{}` is not an RFC 6749 scope token", s.0),
                    ));
                }
                scopes.insert(s.0.clone());
            }
            let mut default_scopes = Vec::new();
            for (i, s) in g.default_scopes.iter().enumerate() {
                if !scopes.contains(&s.0) {
                    return Err(err(
                        &format!("grant.default_scopes[{i}]"),
                        format!("`{}` is not in grant.scopes", s.0),
                    ));
                }
                if !default_scopes.contains(&s.0) {
                    default_scopes.push(s.0.clone());
                }
            }
            if !(1..=86_400).contains(&g.max_lifetime_seconds) {
                return Err(err(
                    "grant.max_lifetime_seconds",
                    "must be 1..=86400".into(),
                ));
            }
            let limit = |field: &str,
                         v: Option<u32>|
             -> Result<Option<std::num::NonZeroU32>, PolicyError> {
                v.map(|n| {
                    std::num::NonZeroU32::new(n)
                        .ok_or_else(|| err(field, "must be at least 1".into()))
                })
                .transpose()
            };
            let (per_step_per_minute, per_repository_per_minute) = match &g.limits {
                None => (None, None),
                Some(l) => (
                    limit("grant.limits.per_step_per_minute", l.per_step_per_minute)?,
                    limit(
                        "grant.limits.per_repository_per_minute",
                        l.per_repository_per_minute,
                    )?,
                ),
            };
            (
                Some(GrantSpec {
                    client: g.client,
                    audience: g.audience,
                    scopes,
                    default_scopes,
                    max_lifetime_seconds: g.max_lifetime_seconds,
                    per_step_per_minute,
                    per_repository_per_minute,
                }),
                None,
            )
        }
        Effect::Deny => {
            if raw.grant.is_some() {
                return Err(err(
                    "grant",
                    "a deny policy grants nothing; remove `grant`".into(),
                ));
            }
            if when.is_empty() {
                return Err(err("when", "a deny policy without conditions would deny everything; name at least one claim".into()));
            }
            if let Some(a) = &raw.audiences {
                for (i, aud) in a.iter().enumerate() {
                    if !is_scope_token(aud) {
                        return Err(err(
                            &format!("audiences[{i}]"),
                            "must be a non-empty token without spaces or quotes".into(),
                        ));
                    }
                }
            }
            let auds = raw
                .audiences
                .map(|a| a.into_iter().collect::<BTreeSet<_>>());
            (None, auds)
        }
    };
    Ok(Policy {
        id: id.to_string(),
        description: raw.description,
        effect: raw.effect,
        when,
        deny_audiences,
        grant,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_star_never_crosses_a_slash_double_star_does() {
        let p = BranchPattern::new("release/*").unwrap();
        assert!(p.is_match("release/1.2"));
        assert!(!p.is_match("release/2026/q4"));
        assert!(!p.is_match("release"));
        let pp = BranchPattern::new("release/**").unwrap();
        assert!(pp.is_match("release/2026/q4"));
        let star = BranchPattern::new("*").unwrap();
        assert!(star.is_match("main"));
        assert!(!star.is_match("feature/x"));
        assert!(BranchPattern::new("main").unwrap().is_match("main"));
        assert!(!BranchPattern::new("main").unwrap().is_match("main2"));
    }

    fn compile(yaml: &str) -> Result<Policy, PolicyError> {
        compile_str("p", yaml, None)
    }

    #[test]
    fn compile_errors_name_the_field() {
        let cases = [
            ("effect: allow\nwhen:\n  branchName: main\ngrant:\n  client: c\n  audience: a\n  scopes: [s]\n  default_scopes: [s]\n  max_lifetime_seconds: 60\n", "when"),
            ("effect: deny\nwhen: {}\n", "when"),
            ("effect: allow\nwhen:\n  repositoryUuid: nope\n", "when.repositoryUuid[0]"),
            ("effect: allow\nwhen:\n  repositoryUuid: []\n", "when.repositoryUuid"),
            ("effect: maybe\n", "effect"),
            ("effect: deny\nwhen:\n  branchName: main\ngrant:\n  client: c\n  audience: a\n  scopes: [s]\n  default_scopes: [s]\n  max_lifetime_seconds: 60\n", "grant"),
            ("effect: allow\nwhen:\n  workspaceUuid: \"03b741e3-cf4a-41f9-9a59-cec52e21bdc3\"\ngrant:\n  client: c\n  audience: a\n  scopes: [\"bad scope\"]\n  default_scopes: [s]\n  max_lifetime_seconds: 60\n", "grant.scopes[0]"),
            ("effect: allow\nwhen:\n  workspaceUuid: \"03b741e3-cf4a-41f9-9a59-cec52e21bdc3\"\ngrant:\n  client: c\n  audience: a\n  scopes: [s]\n  default_scopes: [s]\n  max_lifetime_seconds: 0\n", "grant.max_lifetime_seconds"),
        ];
        for (yaml, field) in cases {
            let e = compile(yaml).unwrap_err();
            assert_eq!(e.field, field, "{yaml}\n=> {e}");
        }
    }

    #[test]
    fn unknown_client_is_refused_when_clients_are_known() {
        let known: BTreeSet<String> = ["sts-deploy".to_string()].into();
        let e = compile_str(
            "p",
            "effect: allow\nwhen:\n  workspaceUuid: \"03b741e3-cf4a-41f9-9a59-cec52e21bdc3\"\ngrant:\n  client: other\n  audience: a\n  scopes: [s]\n  default_scopes: [s]\n  max_lifetime_seconds: 60\n",
            Some(&known),
        )
        .unwrap_err();
        assert_eq!(e.field, "grant.client");
    }

    const W: &str = "03b741e3-cf4a-41f9-9a59-cec52e21bdc3";
    const GRANT: &str = "grant: {client: c, audience: a, scopes: [s], default_scopes: [s], max_lifetime_seconds: 300}\n";

    /// Issue #7 §1, first input: conditions whose values are empty, null or all
    /// commented out are refused at load, naming each field.
    #[test]
    fn empty_null_and_commented_out_conditions_are_refused_naming_each_field() {
        let yaml = format!(
            "effect: allow\nwhen:\n  workspaceUuid: \"{{{W}}}\"\n  repositoryUuid:\n  deploymentEnvironmentUuid:\n    # - \"{{bd715740-c970-486b-b68a-b421ec2a1f8b}}\"\n  branchName: ~\n{GRANT}"
        );
        let e = compile(&yaml).unwrap_err();
        assert_eq!(e.field, "when.repositoryUuid", "{e}");
        assert!(e.reason.contains("empty value"), "{e}");
        assert!(e.reason.contains("when.deploymentEnvironmentUuid"), "{e}");
        assert!(e.reason.contains("when.branchName"), "{e}");
    }

    /// The kind: any null or empty value anywhere is refused, whatever the field.
    #[test]
    fn every_null_or_empty_value_anywhere_is_refused() {
        let allow = |when: &str, grant: &str| {
            format!("effect: allow\nwhen:\n  workspaceUuid: \"{{{W}}}\"\n{when}{grant}")
        };
        let cases = [
            (allow("  repositoryUuid: []\n", GRANT), "when.repositoryUuid"),
            (allow("  branchName: [\"\"]\n", GRANT), "when.branchName[0]"),
            (allow("  branchName: [main, ~]\n", GRANT), "when.branchName[1]"),
            (allow("  branchName: \"\"\n", GRANT), "when.branchName"),
            (allow("", "grant: {client: c, audience: a, scopes: [], default_scopes: [s], max_lifetime_seconds: 300}\n"), "grant.scopes"),
            (allow("", "grant: {client: c, audience: a, scopes: [s], default_scopes: [], max_lifetime_seconds: 300}\n"), "grant.default_scopes"),
            (allow("", "grant: {client: c, audience: a, scopes: [s], default_scopes: [s], max_lifetime_seconds: 300, limits: {}}\n"), "grant.limits"),
            (allow("", "grant: {client: c, audience: a, scopes: [s], default_scopes: [s], max_lifetime_seconds: 300, limits: {per_step_per_minute: ~}}\n"), "grant.limits.per_step_per_minute"),
            (allow("", "grant:\n"), "grant"),
            (format!("description:\n{}", allow("", GRANT)), "description"),
            (format!("effect: allow\nwhen:\n{GRANT}"), "when"),
            (format!("effect: allow\nwhen: {{}}\n{GRANT}"), "when"),
            ("effect: deny\nwhen:\n  repositoryUuid: \"{d4e45493-4a33-477d-917b-a24e7e4bd39b}\"\naudiences: []\n".to_string(), "audiences"),
            ("effect: deny\nwhen:\n  repositoryUuid: \"{d4e45493-4a33-477d-917b-a24e7e4bd39b}\"\naudiences:\n  # - deploy-api\n".to_string(), "audiences"),
            ("effect: deny\nwhen:\n  repositoryUuid: \"{d4e45493-4a33-477d-917b-a24e7e4bd39b}\"\n  branchName:\n".to_string(), "when.branchName"),
            ("effect:\n".to_string(), "effect"),
            (String::new(), "."),
            ("# everything commented out\n".to_string(), "."),
        ];
        for (yaml, field) in cases {
            let e = compile(&yaml).unwrap_err();
            assert_eq!(e.field, field, "{yaml}\n=> {e}");
        }
    }

    /// Issue #7 §1, second input: a deny with `audiences: []` never applied.
    #[test]
    fn deny_with_empty_audiences_is_refused_and_unknown_audience_is_warned() {
        let e = compile("effect: deny\nwhen:\n  repositoryUuid: \"{5b0b3a50-2f0e-4c3a-9d1e-6f8a7b9c0d1e}\"\naudiences: []\n").unwrap_err();
        assert_eq!(e.field, "audiences");
        let allow = compile_str("a", &format!("effect: allow\nwhen:\n  workspaceUuid: \"{{{W}}}\"\ngrant: {{client: c, audience: deploy-api, scopes: [s], default_scopes: [s], max_lifetime_seconds: 300}}\n"), None).unwrap();
        let deny = compile_str("d", "effect: deny\nwhen:\n  repositoryUuid: \"{5b0b3a50-2f0e-4c3a-9d1e-6f8a7b9c0d1e}\"\naudiences: [deploy-apj, deploy-api]\n", None).unwrap();
        let set = PolicySet::from_policies(vec![allow, deny]);
        let w = set.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("deploy-apj") && w[0].starts_with("d:"),
            "{w:?}"
        );
        let e = compile("effect: deny\nwhen:\n  branchName: main\naudiences: [\"bad aud\"]\n")
            .unwrap_err();
        assert_eq!(e.field, "audiences[0]");
    }

    /// Issue #7 §1, third input: glob syntax beyond `*`, `?`, `**` is refused.
    #[test]
    fn classes_and_alternations_are_refused_escapes_are_literal() {
        for p in [
            "{main,master}",
            "release/[0-9]*",
            "[!a]",
            "a]",
            "x}",
            "trailing\\",
        ] {
            assert!(BranchPattern::new(p).is_err(), "{p}");
        }
        let lit = BranchPattern::new("odd\\{name\\}").unwrap();
        assert!(lit.is_match("odd{name}"));
        assert!(!lit.is_match("oddname"));
        // `?` would match one byte, not one character: refused.
        assert!(BranchPattern::new("v?").is_err());
        // `**` only as a whole segment; elsewhere globset would read `*`.
        for bad in ["experiment**", "a/**b", "**x", "a/***", "a**/b"] {
            assert!(BranchPattern::new(bad).is_err(), "{bad}");
        }
        for good in ["**", "**/hotfix", "release/**", "a/**/b"] {
            assert!(BranchPattern::new(good).is_ok(), "{good}");
        }
        assert!(BranchPattern::new("a/**/b").unwrap().is_match("a/x/y/b"));
        // What a git branch name cannot contain can never match: refused.
        for bad in ["main, develop", "main ", "a~1", "a^", "a:b", "tab\there"] {
            assert!(BranchPattern::new(bad).is_err(), "{bad:?}");
        }
        let e = compile(&format!("effect: allow\nwhen:\n  workspaceUuid: \"{{{W}}}\"\n  branchName: \"{{main,master}}\"\n{GRANT}")).unwrap_err();
        assert_eq!(e.field, "when.branchName[0]", "{e}");
    }

    #[test]
    fn tags_blank_strings_and_a_byte_order_mark() {
        let e = compile(&format!(
            "effect: allow\nwhen: !foo\n  workspaceUuid: \"{{{W}}}\"\n{GRANT}"
        ))
        .unwrap_err();
        assert_eq!(e.field, "when", "{e}");
        assert!(e.reason.contains("tags"), "{e}");
        let e = compile(&format!(
            "description: \" \"\neffect: allow\nwhen:\n  workspaceUuid: \"{{{W}}}\"\n{GRANT}"
        ))
        .unwrap_err();
        assert_eq!(e.field, "description", "{e}");
        let bom = format!(
            "{}effect: allow\nwhen:\n  workspaceUuid: \"{{{W}}}\"\n{GRANT}",
            '\u{feff}'
        );
        if let Err(e) = compile(&bom) {
            panic!("{e}");
        }
    }

    #[test]
    fn unquoted_braced_uuid_still_gets_the_quote_hint() {
        let e = compile(&format!(
            "effect: allow\nwhen:\n  workspaceUuid: {{{W}}}\n{GRANT}"
        ))
        .unwrap_err();
        assert_eq!(e.field, "when.workspaceUuid", "{e}");
        assert!(e.reason.contains("quote"), "{e}");
    }
}
