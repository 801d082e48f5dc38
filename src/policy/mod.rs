//! Policies: reviewed YAML files that decide which Bitbucket identities may get
//! which Keycloak client, audience and scopes.
//!
//! One policy per file (`policies/<id>.yaml`, the id is the file stem). Files are
//! parsed strictly (unknown fields refused) and compiled at startup: the service
//! refuses to start on any error, naming the file and field. See the book's
//! policy reference (docs/src/policies.md) for the format. Evaluation ([`PolicySet::evaluate`]) never
//! fails: deny by default, any matching `deny` policy beats every `allow`.

mod compile;
mod eval;
mod index;
#[cfg(test)]
mod index_props;
mod pattern;
#[cfg(test)]
mod props;
pub mod require;
mod snapshot;
mod store;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::domain::oauth::is_scope_token;
use crate::domain::BbUuid;
use crate::inventory::Inventory;
pub use compile::{compile_str, compile_with, schema};
pub use eval::{
    Decision, DenyCode, DenyKind, EvalRequest, Grant, Offer, Outcome, TraceEntry, MAX_TRACE_ENTRIES,
};
pub use pattern::{check_branch_pattern, BranchPattern};
pub use snapshot::{Seen, Snapshot, Stamps};
pub use store::{PolicyStore, Reloaded};

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
    /// `aud`, as a list (Bitbucket sends a string, or an array when the step
    /// declares `oidc: audiences:`): what a `when.aud` condition tests.
    pub aud: Vec<String>,
}

/// `aud` as a token carries it: one string or an array (RFC 7519 §4.1.3).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AudClaim {
    /// One audience.
    One(String),
    /// Several (Bitbucket, when the step declares `oidc: audiences:`).
    Many(Vec<String>),
}

impl AudClaim {
    /// The audiences as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(a) => vec![a],
            Self::Many(v) => v,
        }
    }
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
    /// `aud`: a string or an array.
    #[serde(default)]
    pub aud: Option<AudClaim>,
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
            aud: c.aud.map(AudClaim::into_vec).unwrap_or_default(),
        })
    }
}
/// Longest accepted policy file, in bytes.
pub const MAX_POLICY_FILE_BYTES: u64 = 256 * 1024;

/// A policy that could not be loaded or compiled: the file, the field path inside
/// it (`when.branchName[1]`, as `key`) and the reason.
pub type PolicyError = crate::domain::SourceError;

/// `allow` grants when every condition matches; `deny` refuses when every condition matches.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Grants the policy's `grant`.
    Allow,
    /// Refuses, whatever any allow policy says.
    Deny,
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
    /// `aud` contains one of these values (exact): an audience marker a step
    /// declares with `oidc: audiences:`. Anyone who can push a branch can add or
    /// drop it, so it may only narrow (docs/src/agents.md).
    pub aud: Option<Vec<String>>,
}

impl Conditions {
    fn is_empty(&self) -> bool {
        self.workspace_uuid.is_none()
            && self.repository_uuid.is_none()
            && self.deployment_environment_uuid.is_none()
            && self.branch_name.is_none()
            && self.aud.is_none()
    }

    /// Whether a branch or deployment-environment condition gates the policy:
    /// what a repository's pipeline file cannot choose on its own (protected
    /// branches, environment permissions in Bitbucket).
    pub fn has_branch_or_environment(&self) -> bool {
        self.branch_name.is_some() || self.deployment_environment_uuid.is_some()
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
    /// Which per-repository identity the token belongs to; only for a client with
    /// `grant = "jwt_authorization_grant"` (default there: `repository`).
    pub identity: Option<crate::domain::identity::IdentityKind>,
    /// Keycloak groups (declared in the realm model) the identity's user is a
    /// member of; only for a `jwt_authorization_grant` client.
    pub groups: BTreeSet<String>,
    /// The protections it requires itself (`grant.require`); the
    /// configuration may add to them ([`require::Rules`]).
    pub require: require::Requirement,
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
    /// Deny only: the scopes refused (`None` = the whole audience). A request
    /// whose scopes (requested, or the grant's defaults) include one is refused;
    /// the rest of the grant stays obtainable.
    pub deny_scopes: Option<BTreeSet<String>>,
    /// Allow only: the grant.
    pub grant: Option<GrantSpec>,
    /// How each name in the policy resolved (`when.repository[0] `acme/x` -> {uuid} acme/x`).
    pub resolutions: Vec<String>,
}

/// All compiled policies, in file-name order.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    /// Shared with the next set when their files did not change (a reload holds
    /// only what changed twice).
    policies: Vec<std::sync::Arc<Policy>>,
    inventory: std::sync::Arc<Inventory>,
    /// Files of the directory that are not policies (warned about).
    ignored: Vec<String>,
    /// [`Snapshot::digest`] of the files it was compiled from (empty when built
    /// from compiled policies).
    digest: String,
    /// Which policies can decide a request ([`index`]).
    index: index::Index,
    /// [`Snapshot::inventory_digest`] of the inventory it was compiled with.
    inventory_digest: String,
    /// What each policy was compiled from (path relative to the directory,
    /// content SHA-256), for the next reload to reuse the policies of files
    /// that did not change.
    sources: std::collections::HashMap<String, ([u8; 32], usize)>,
    /// The configuration's protection rules ([`require::Rules`]).
    rules: std::sync::Arc<require::Rules>,
}

/// Above this many repository and environment UUIDs one policy lists, the set
/// warns about its memory ([`PolicySet::warnings`]).
pub const LARGE_EXPANSION: usize = 5_000;

/// Shortest `max_lifetime_seconds` of a JWT Authorization Grant client's grant.
pub const MIN_IDENTITY_LIFETIME_SECONDS: u64 = 30;

impl Policy {
    /// Whether the policy's conditions admit a repository (and environment),
    /// whatever the branch: which repository identities it can ever issue.
    pub fn admits(&self, ws: &BbUuid, repo: &BbUuid, env: Option<&BbUuid>) -> bool {
        let w = &self.when;
        w.workspace_uuid.as_ref().is_none_or(|v| v.contains(ws))
            && w.repository_uuid.as_ref().is_none_or(|v| v.contains(repo))
            && match (&w.deployment_environment_uuid, env) {
                (None, _) => true,
                (Some(v), Some(e)) => v.contains(e),
                (Some(_), None) => false,
            }
    }
}

/// Whether `policies` refuse repository `repo` of workspace `ws` every token
/// for `audience`, whatever the branch, environment, audience markers and
/// scopes: a deny without branch, environment or marker conditions and
/// without a scope list admits the repository and covers the audience.
/// `keycloak apply` makes no user for such a repository. A sufficient
/// condition (property-tested against [`PolicySet::evaluate`]): `false` does
/// not mean some request is allowed.
pub fn always_denied(
    policies: &[std::sync::Arc<Policy>],
    ws: &BbUuid,
    repo: &BbUuid,
    audience: &str,
) -> bool {
    policies.iter().any(|p| {
        p.effect == Effect::Deny
            && p.when.branch_name.is_none()
            && p.when.deployment_environment_uuid.is_none()
            && p.when.aud.is_none()
            && p.deny_scopes.is_none()
            && p.deny_audiences
                .as_ref()
                .is_none_or(|a| a.contains(audience))
            && p.admits(ws, repo, None)
    })
}

impl PolicySet {
    /// Every problem of the set that depends on which clients use the JWT
    /// Authorization Grant: [`PolicySet::grant_mode_problems`] and
    /// [`PolicySet::identity_problems`]. The service (load and reload),
    /// `policy check --config` and `config check` all refuse on them.
    pub fn client_problems(&self, jwt_clients: &BTreeSet<String>) -> Vec<PolicyError> {
        let mut out = self.grant_mode_problems(jwt_clients);
        out.extend(self.identity_problems(jwt_clients));
        out
    }

    /// Grants that name `identity` or `groups` for a client that does not use the
    /// JWT Authorization Grant (`jwt_clients`): those settings would be silently
    /// ignored, so they are refused.
    pub fn grant_mode_problems(&self, jwt_clients: &BTreeSet<String>) -> Vec<PolicyError> {
        self.policies
            .iter()
            .filter_map(|p| {
                let g = p.grant.as_ref()?;
                let names_identity = g.identity.is_some() || !g.groups.is_empty();
                (names_identity && !jwt_clients.contains(&g.client)).then(|| PolicyError {
                    file: p.id.clone(),
                    key: if g.identity.is_some() {
                        "grant.identity"
                    } else {
                        "grant.groups"
                    }
                    .into(),
                    reason: format!(
                        "client `{}` uses client_credentials; `identity` and `groups` need \
                         grant = \"jwt_authorization_grant\" in [keycloak.clients.{}]",
                        g.client, g.client
                    ),
                })
            })
            .collect()
    }

    /// For the JWT Authorization Grant clients `jwt_clients`: every pair of
    /// policies that admits one repository identity of the inventory (branch
    /// ignored) but names different `groups`. The identity's Keycloak user is in
    /// every group either names, so each policy's tokens could carry the roles
    /// the other meant to reserve (e.g. any branch getting main's roles). Also a
    /// grant shorter than [`MIN_IDENTITY_LIFETIME_SECONDS`].
    pub fn identity_problems(&self, jwt_clients: &BTreeSet<String>) -> Vec<PolicyError> {
        use crate::domain::identity::IdentityKind;
        let jwt: Vec<(&Policy, &GrantSpec)> = self
            .policies
            .iter()
            .filter_map(|p| {
                Some((
                    &**p,
                    p.grant
                        .as_ref()
                        .filter(|g| jwt_clients.contains(&g.client))?,
                ))
            })
            .collect();
        let mut out = Vec::new();
        for (p, g) in &jwt {
            if g.max_lifetime_seconds < MIN_IDENTITY_LIFETIME_SECONDS {
                out.push(PolicyError {
                    file: p.id.clone(),
                    key: "grant.max_lifetime_seconds".into(),
                    reason: format!(
                        "at least {MIN_IDENTITY_LIFETIME_SECONDS} s for a JWT Authorization Grant client (the assertion ends 5 s early for clock skew)"
                    ),
                });
            }
        }
        for (i, (a, ga)) in jwt.iter().enumerate() {
            for (b, gb) in jwt.iter().skip(i + 1) {
                if ga.groups == gb.groups {
                    continue;
                }
                let shared = self.inventory.repositories().find_map(|repo| {
                    let ws = repo.workspace();
                    let envs: Vec<Option<BbUuid>> = std::iter::once(None)
                        .chain(repo.environments().map(|e| Some(e.uuid)))
                        .collect();
                    envs.into_iter()
                        .find(|env| {
                            let kind = |g: &GrantSpec| g.identity.unwrap_or_default();
                            let per_env =
                                |g: &GrantSpec| kind(g) == IdentityKind::RepositoryEnvironment;
                            // One identity: both per repository (env ignored), or both
                            // per repository and the same environment.
                            per_env(ga) == per_env(gb)
                                && (per_env(ga) == env.is_some())
                                && a.admits(&ws.workspace_uuid, &repo.uuid(), env.as_ref())
                                && b.admits(&ws.workspace_uuid, &repo.uuid(), env.as_ref())
                        })
                        .map(|_| repo.full_name().to_string())
                });
                if let Some(repo) = shared {
                    let names =
                        |g: &GrantSpec| g.groups.iter().cloned().collect::<Vec<_>>().join(", ");
                    out.push(PolicyError {
                        file: b.id.clone(),
                        key: "grant.groups".into(),
                        reason: format!(
                            "admits {repo}'s identity like policy `{}` but names other groups ({} here, {} there): the \
                             identity's user is in every group either names, so each policy's tokens could carry the \
                             other's roles; name the same groups, or use identity: repository_environment",
                            a.id,
                            names(gb),
                            names(ga)
                        ),
                    });
                }
            }
        }
        out
    }

    /// The compiled policies, in evaluation order.
    pub fn policies(&self) -> &[std::sync::Arc<Policy>] {
        &self.policies
    }

    /// One line per deny branch pattern with a letter outside ASCII: a letter
    /// that looks like an ASCII one (Cyrillic `а` in `mаin`) makes a deny that
    /// reads as "deny main" and matches only the branch spelt with it.
    fn look_alike_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in self.policies.iter().filter(|p| p.effect == Effect::Deny) {
            for b in p.when.branch_name.iter().flatten() {
                let odd: Vec<String> = b
                    .source()
                    .chars()
                    .filter(|c| !c.is_ascii())
                    .map(|c| format!("U+{:04X}", u32::from(c)))
                    .collect();
                if !odd.is_empty() {
                    out.push(format!(
                        "{}: `branchName` pattern `{}` has characters outside ASCII ({}): a look-alike \
                         letter makes this deny match only the branch spelt with it",
                        p.id,
                        b.source()
                            .chars()
                            .map(|c| if c.is_ascii() { c.to_string() } else { c.escape_unicode().to_string() })
                            .collect::<String>(),
                        odd.join(", ")
                    ));
                }
            }
        }
        out
    }

    /// Problems that do not make the set invalid but probably are mistakes, one line
    /// each (`policy check` prints them, `serve` logs them): a file of the
    /// directory that is not a policy file, and a deny policy naming an audience
    /// that no allow policy grants (a typo would leave the audience it meant
    /// uncovered).
    pub fn warnings(&self) -> Vec<String> {
        let granted: BTreeSet<&str> = self
            .policies
            .iter()
            .filter_map(|p| p.grant.as_ref().map(|g| g.audience.as_str()))
            .collect();
        let mut out: Vec<String> = self
            .ignored
            .iter()
            .map(|f| format!("{f}: not a policy file (only *.yaml and *.yml are read); ignored"))
            .collect();
        out.extend(self.marker_warnings());
        out.extend(self.expansion_warning());
        out.extend(self.look_alike_warnings());
        for p in &self.policies {
            for s in p.deny_scopes.iter().flatten() {
                let granted = self.policies.iter().any(|a| {
                    a.grant.as_ref().is_some_and(|g| {
                        g.scopes.contains(s)
                            && p.deny_audiences
                                .as_ref()
                                .is_none_or(|auds| auds.contains(&g.audience))
                    })
                });
                if !granted {
                    out.push(format!(
                        "{}: `scopes`: no allow policy grants scope `{s}` for the audiences this deny \
                         covers; it refuses nothing (a typo?)",
                        p.id
                    ));
                }
            }
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

    /// One line when some policies list more than [`LARGE_EXPANSION`]
    /// repository and environment UUIDs (names, projects and globs expand to
    /// them at load): memory grows with policies times what each matches, not
    /// with the files' size (docs/src/benchmarks.md).
    fn expansion_warning(&self) -> Option<String> {
        let sizes = self.policies.iter().map(|p| {
            let w = &p.when;
            let n = w.repository_uuid.as_ref().map_or(0, Vec::len)
                + w.deployment_environment_uuid.as_ref().map_or(0, Vec::len);
            (n, p.id.as_str())
        });
        let large: Vec<(usize, &str)> = sizes.filter(|(n, _)| *n > LARGE_EXPANSION).collect();
        let (most, id) = large.iter().max()?;
        let total: usize = large.iter().map(|(n, _)| n).sum();
        Some(format!(
            "{} policies list more than {LARGE_EXPANSION} repository and environment UUIDs \
             each once names, projects and globs are expanded ({total} in all; the most: \
             `{id}`, {most}); each costs about 100 bytes of memory per policy listing it \
             (about {} MiB), and a reload holds the old and new sets at once",
            large.len(),
            total * 100 / (1024 * 1024)
        ))
    }

    /// Policies whose only gate is an audience marker (`when.aud`), which the
    /// pipeline file of any branch sets: an allow policy gated by a marker but by
    /// no branch or deployment environment (anyone who can push a branch can add
    /// the marker), and a deny policy on a marker where an allow policy grants
    /// what it refuses without a branch or environment condition (a step that
    /// drops the marker obtains it). docs/src/agents.md.
    pub fn marker_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.policies {
            if p.when.aud.is_none() {
                continue;
            }
            // An allow gated by a branch or environment besides the marker is
            // fine; a deny's own branch or environment condition gates nothing:
            // what matters is whether the grants it covers are gated.
            if p.effect == Effect::Allow && p.when.has_branch_or_environment() {
                continue;
            }
            if p.effect == Effect::Allow {
                out.push(format!(
                    "{}: `when.aud` is this allow policy's only gate besides the workspace or repository: a \
                     pipeline file on any branch can declare that audience (an agent that can \
                     push included); add a branchName (protected branch) or \
                     deploymentEnvironment condition",
                    p.id
                ));
                continue;
            }
            for a in &self.policies {
                let Some(g) = &a.grant else { continue };
                let covered = p
                    .deny_audiences
                    .as_ref()
                    .is_none_or(|auds| auds.contains(&g.audience))
                    && p.deny_scopes
                        .as_ref()
                        .is_none_or(|d| d.iter().any(|s| g.scopes.contains(s)));
                let overlaps =
                    |deny: &Option<Vec<BbUuid>>, allow: &Option<Vec<BbUuid>>| match (deny, allow) {
                        (Some(d), Some(a)) => d.iter().any(|u| a.contains(u)),
                        _ => true,
                    };
                if covered
                    && overlaps(&p.when.workspace_uuid, &a.when.workspace_uuid)
                    && overlaps(&p.when.repository_uuid, &a.when.repository_uuid)
                    && !a.when.has_branch_or_environment()
                {
                    out.push(format!(
                        "{}: this deny on `when.aud` is evaded by a step that does not declare the \
                         audience, and {} grants `{}` without a branchName or deploymentEnvironment \
                         condition; gate {} on a protected branch or a deployment environment",
                        p.id, a.id, g.audience, a.id
                    ));
                }
            }
        }
        out
    }

    /// Markers that mark nothing: a `when.aud` value that is an audience the
    /// service accepts for verification (`accepted`: every workspace's
    /// `audiences`), or Bitbucket's workspace audience
    /// (`ari:cloud:bitbucket::workspace/…`, in every token). Such a value is in
    /// the `aud` of ordinary steps too, so the condition does not tell agent
    /// steps apart.
    pub fn marker_audience_warnings(&self, accepted: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.policies {
            for v in p.when.aud.iter().flatten() {
                if accepted.contains(v) || v.starts_with("ari:cloud:bitbucket::workspace/") {
                    out.push(format!(
                        "{}: `when.aud` value `{v}` is an audience ordinary steps carry (the \
                         service's own, or Bitbucket's workspace audience): it marks nothing; \
                         use an audience of its own, e.g. `<service URL>/agent`",
                        p.id
                    ));
                }
            }
        }
        out
    }

    /// Builds a set from compiled policies (sorted by id).
    pub fn from_policies(policies: Vec<Policy>) -> Self {
        Self::from_shared(policies.into_iter().map(std::sync::Arc::new).collect())
    }

    fn from_shared(mut policies: Vec<std::sync::Arc<Policy>>) -> Self {
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        let index = index::Index::build(&policies);
        Self {
            policies,
            inventory: std::sync::Arc::default(),
            ignored: Vec::new(),
            digest: String::new(),
            index,
            inventory_digest: String::new(),
            sources: std::collections::HashMap::new(),
            rules: std::sync::Arc::default(),
        }
    }

    /// The set deciding with `inventory` (tests build sets from compiled
    /// policies; a loaded set holds the inventory it compiled with).
    #[cfg(test)]
    pub(crate) fn with_inventory(mut self, inventory: std::sync::Arc<Inventory>) -> Self {
        self.inventory = inventory;
        self
    }

    /// The set with the configuration's protection rules (`[protections]`).
    pub fn with_rules(mut self, rules: std::sync::Arc<require::Rules>) -> Self {
        self.rules = rules;
        self
    }

    /// The configuration's protection rules.
    pub fn rules(&self) -> &require::Rules {
        &self.rules
    }

    /// What `g` requires: its own requirement and the configuration's for its
    /// client and audience.
    pub fn requirement_of(&self, g: &GrantSpec) -> require::Requirement {
        self.rules.of(g.require, &g.client, &g.audience)
    }

    /// The inventory the names of the policies were resolved through (empty when
    /// the policies directory has none).
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// The SHA-256 (hex) of the files the set was compiled from
    /// ([`Snapshot::digest`]): which set a replica serves.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// [`Snapshot::inventory_digest`] of the inventory files it was compiled
    /// with (what lets a reload keep the parsed inventory).
    pub fn inventory_digest(&self) -> &str {
        &self.inventory_digest
    }

    /// Loads and compiles every `*.yaml` / `*.yml` file of `dir` (not recursive),
    /// resolving names through the inventories in `dir/inventory/`
    /// ([`Inventory::files`]); files are read once, without blocking
    /// ([`Snapshot::read`]).
    /// `known_clients`, when given, are the Keycloak clients of the configuration;
    /// a grant naming another client is an error.
    ///
    /// # Errors
    /// Every [`PolicyError`] found (all files are checked, not just the first).
    pub fn load_dir(
        dir: &Path,
        known_clients: Option<&BTreeSet<String>>,
    ) -> Result<Self, Vec<PolicyError>> {
        Self::from_snapshot(&Snapshot::read(dir)?, known_clients)
    }

    /// Compiles the files of a [`Snapshot`] (as [`PolicySet::load_dir`]).
    ///
    /// # Errors
    /// Every [`PolicyError`] found.
    pub fn from_snapshot(
        snapshot: &Snapshot,
        known_clients: Option<&BTreeSet<String>>,
    ) -> Result<Self, Vec<PolicyError>> {
        Self::compile_snapshot(snapshot, known_clients, None, true)
    }

    /// [`PolicySet::from_snapshot`] for the service: when the inventory files
    /// are those `previous` was compiled with (same
    /// [`Snapshot::inventory_digest`]), their parsed inventory is shared instead
    /// of parsed again; and each policy's [`Policy::resolutions`] (text for
    /// `policy check` and `policy explain`) is not kept.
    ///
    /// # Errors
    /// Every [`PolicyError`] found.
    pub fn from_snapshot_after(
        snapshot: &Snapshot,
        known_clients: Option<&BTreeSet<String>>,
        previous: Option<&PolicySet>,
    ) -> Result<Self, Vec<PolicyError>> {
        Self::compile_snapshot(snapshot, known_clients, previous, false)
    }

    fn compile_snapshot(
        snapshot: &Snapshot,
        known_clients: Option<&BTreeSet<String>>,
        previous: Option<&PolicySet>,
        keep_resolutions: bool,
    ) -> Result<Self, Vec<PolicyError>> {
        let dir = &snapshot.dir;
        let inventory_digest = snapshot.inventory_digest();
        let known = previous.filter(|p| p.inventory_digest == inventory_digest);
        let inventory = match known {
            Some(p) => p.inventory.clone(),
            // Only stamped for a set it does not belong to: cannot happen (the
            // store passes the active set's digest and that set), refused.
            None if snapshot.inventory_known => {
                return Err(vec![PolicyError {
                    file: dir
                        .join(crate::inventory::INVENTORY_DIR)
                        .display()
                        .to_string(),
                    key: String::new(),
                    reason: "the inventory was not read; reload again".into(),
                }])
            }
            None => std::sync::Arc::new(Inventory::from_texts(
                dir,
                snapshot
                    .inventory
                    .iter()
                    .map(|f| (f.path.as_path(), f.text.as_deref().unwrap_or_default())),
            )?),
        };
        // A file unchanged since the previous set, compiled against the same
        // inventory (and, from the store, the same clients), compiles to the same
        // policy: reused, so a reload costs what changed (issue #20).
        let reusable = known.filter(|_| !keep_resolutions);
        let mut policies = Vec::new();
        let mut errors = Vec::new();
        let mut sources = Vec::with_capacity(snapshot.policies.len());
        for f in &snapshot.policies {
            let before = reusable.and_then(|p| {
                let (sha, i) = p.sources.get(&f.rel)?;
                p.policies.get(*i).filter(|_| *sha == f.stamp.sha256)
            });
            let compiled = match (before, &f.text) {
                (Some(p), _) => Ok(p.clone()),
                (None, Some(text)) => {
                    compile_file(&f.path, text, known_clients, &inventory).map(|mut p| {
                        if !keep_resolutions {
                            p.resolutions = Vec::new();
                        }
                        std::sync::Arc::new(p)
                    })
                }
                // Not read because the previous set had compiled it: not this set.
                (None, None) => Err(PolicyError {
                    file: f.path.display().to_string(),
                    key: String::new(),
                    reason: "the file was not read; reload again".into(),
                }),
            };
            match compiled {
                Ok(p) => {
                    sources.push((f.rel.clone(), f.stamp.sha256, p.id.clone()));
                    policies.push(p)
                }
                Err(e) => errors.push(e),
            }
        }
        let mut ids = std::collections::HashSet::with_capacity(policies.len());
        for p in &policies {
            if !ids.insert(p.id.as_str()) {
                errors.push(PolicyError {
                    file: dir.display().to_string(),
                    key: String::new(),
                    reason: format!("two files define policy id `{}` (.yaml and .yml)", p.id),
                });
            }
        }
        if errors.is_empty() {
            let mut set = Self::from_shared(policies);
            let at: std::collections::HashMap<&str, usize> = set
                .policies
                .iter()
                .enumerate()
                .map(|(i, p)| (p.id.as_str(), i))
                .collect();
            set.sources = sources
                .into_iter()
                .filter_map(|(path, sha, id)| Some((path, (sha, *at.get(id.as_str())?))))
                .collect();
            set.inventory = inventory;
            set.inventory_digest = inventory_digest;
            set.ignored = snapshot.ignored.clone();
            set.digest = snapshot.digest();
            Ok(set)
        } else {
            Err(errors)
        }
    }
}
/// The directory beside the policies that holds the realm model
/// (`keycloak/realm.yaml`, read by `keycloak plan/apply/export`); not policies.
pub const REALM_MODEL_DIR: &str = "keycloak";

/// The policy files of `dir` (sorted) and the other files it holds. Dot files
/// and the `inventory/` and `keycloak/` directories are skipped (a Kubernetes ConfigMap mount keeps
/// its `..data` links there). Refused, so that no policy is dropped silently and
/// no other file is read as one: an unreadable entry, a symbolic link that
/// dangles or leads outside `dir`, a `.YAML`-like extension in another case, a
/// `.yaml` that is not a regular file.
///
/// # Errors
/// Every such entry.
fn policy_files(dir: &Path) -> Result<(Vec<PathBuf>, Vec<String>), Vec<PolicyError>> {
    let err = |p: &Path, reason: &str| PolicyError {
        file: p.display().to_string(),
        key: String::new(),
        reason: reason.to_string(),
    };
    let root = std::fs::canonicalize(dir)
        .map_err(|e| vec![err(dir, &format!("cannot read policies directory: {e}"))])?;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| vec![err(dir, &format!("cannot read policies directory: {e}"))])?;
    let (mut files, mut ignored, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for entry in entries {
        let (path, kind) = match entry {
            Ok(e) => (e.path(), e.file_type().ok()),
            Err(e) => {
                errors.push(err(dir, &format!("an entry cannot be read: {e}")));
                continue;
            }
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with('.')
            || name == crate::inventory::INVENTORY_DIR
            || name == REALM_MODEL_DIR
        {
            continue;
        }
        // An entry that is itself a regular file is within the directory: only
        // links need resolving (a reload of thousands of files otherwise spends
        // most of its time in readlink(2); the file is opened as a regular file
        // without following anything else when read).
        let regular = kind.is_some_and(|k| k.is_file());
        let target = if regular {
            Ok(None)
        } else {
            std::fs::canonicalize(&path).map(Some)
        };
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        let is_policy_name = ext.eq_ignore_ascii_case("yaml") || ext.eq_ignore_ascii_case("yml");
        match target {
            Err(_) => errors.push(err(&path, "a dangling symbolic link")),
            Ok(Some(target)) if !target.starts_with(&root) => errors.push(err(
                &path,
                "a symbolic link leading outside the policies directory; not followed",
            )),
            Ok(_) if is_policy_name && ext != "yaml" && ext != "yml" => {
                errors.push(err(&path, "use a lower-case .yaml or .yml extension"))
            }
            Ok(Some(target)) if is_policy_name && !target.is_file() => {
                errors.push(err(&path, "not a regular file"))
            }
            Ok(_) if is_policy_name => files.push(path),
            Ok(_) => ignored.push(path.display().to_string()),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    // All of `dir`: the names decide the order (bytes, as `Path`'s order of
    // their last component).
    files.sort_unstable_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
    ignored.sort();
    Ok((files, ignored))
}

fn compile_file(
    path: &Path,
    text: &str,
    known_clients: Option<&BTreeSet<String>>,
    inventory: &Inventory,
) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    let id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    compile_with(&id, text, known_clients, inventory).map_err(|mut e| {
        e.file = file.clone();
        e
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_listing_many_uuids_are_warned_about_once() {
        let uuids = |n: usize, base: usize| -> String {
            (base..base + n)
                .map(|i| format!("\"00000000-0000-4000-8000-{i:012x}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let allow = |n, base| {
            format!(
                "effect: allow\nwhen:\n  repositoryUuid: [{}]\ngrant: {{client: c, audience: a, scopes: [s], default_scopes: [s], max_lifetime_seconds: 60}}\n",
                uuids(n, base)
            )
        };
        let set = |texts: &[String]| {
            PolicySet::from_shared(
                texts
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        std::sync::Arc::new(compile_str(&format!("p{i}"), t, None).unwrap())
                    })
                    .collect(),
            )
        };
        let large = |s: &PolicySet| -> Vec<String> {
            s.warnings()
                .into_iter()
                .filter(|w| w.contains("UUIDs"))
                .collect()
        };
        assert!(large(&set(&[allow(LARGE_EXPANSION, 0)])).is_empty());
        let warned = large(&set(&[
            allow(LARGE_EXPANSION + 1, 0),
            allow(LARGE_EXPANSION + 2, 10_000),
            allow(3, 30_000),
        ]));
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(
            warned[0].starts_with("2 policies")
                && warned[0].contains("`p1`, 5002")
                && warned[0].contains("10003 in all"),
            "{}",
            warned[0]
        );
    }

    /// A policies directory holding the sample inventory as `inventory/acme.yaml`.
    fn with_sample_inventory() -> (tempfile::TempDir, crate::inventory::WorkspaceInventory) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("inventory")).unwrap();
        let inv = crate::inventory::tests::sample();
        std::fs::write(d.path().join("inventory/acme.yaml"), inv.to_yaml().unwrap()).unwrap();
        (d, inv)
    }

    /// A reload whose inventory files did not change shares the parsed
    /// inventory; one whose inventory changed parses it again.
    #[test]
    fn an_unchanged_inventory_is_shared_by_the_next_set() {
        let (d, inv) = with_sample_inventory();
        let policy = "effect: allow\nwhen:\n  repository: acme/web\ngrant: {client: c, audience: a, scopes: [s], default_scopes: [s], max_lifetime_seconds: 60}\n";
        std::fs::write(d.path().join("p.yaml"), policy).unwrap();
        let first = PolicySet::from_snapshot(&Snapshot::read(d.path()).unwrap(), None).unwrap();
        std::fs::write(d.path().join("q.yaml"), policy).unwrap();
        let second =
            PolicySet::from_snapshot_after(&Snapshot::read(d.path()).unwrap(), None, Some(&first))
                .unwrap();
        assert_eq!(second.policies().len(), 2);
        assert!(std::sync::Arc::ptr_eq(&first.inventory, &second.inventory));
        // A reload's read only stamps inventory files the active set knows.
        let stamped =
            Snapshot::read_after(d.path(), Some(first.inventory_digest()), &Seen::default())
                .unwrap();
        assert!(stamped.inventory_known);
        assert_eq!(stamped.digest(), Snapshot::read(d.path()).unwrap().digest());
        let again = PolicySet::from_snapshot_after(&stamped, None, Some(&second)).unwrap();
        assert!(std::sync::Arc::ptr_eq(&first.inventory, &again.inventory));
        assert!(PolicySet::from_snapshot_after(&stamped, None, None).is_err());
        let mut renamed = inv.clone();
        renamed.repositories[0].full_name = "acme/web-2".into();
        std::fs::write(
            d.path().join("inventory/acme.yaml"),
            renamed.to_yaml().unwrap(),
        )
        .unwrap();
        std::fs::remove_file(d.path().join("q.yaml")).unwrap();
        let third =
            PolicySet::from_snapshot_after(&Snapshot::read(d.path()).unwrap(), None, Some(&second));
        // acme/web is gone from the new inventory: the policy naming it is refused
        assert!(third.is_err(), "the new inventory was used");
    }

    #[test]
    fn a_reload_shares_the_policies_of_unchanged_files_and_compiles_the_rest() {
        let (d, inv) = with_sample_inventory();
        let policy = |repo: &str, lifetime: u64| {
            format!("effect: allow\nwhen:\n  repository: {repo}\ngrant: {{client: c, audience: a, scopes: [s], default_scopes: [s], max_lifetime_seconds: {lifetime}}}\n")
        };
        std::fs::write(d.path().join("p.yaml"), policy("acme/web", 60)).unwrap();
        std::fs::write(d.path().join("q.yaml"), policy("acme/web", 60)).unwrap();
        let read = || Snapshot::read(d.path()).unwrap();
        let first = PolicySet::from_snapshot_after(&read(), None, None).unwrap();
        std::fs::write(d.path().join("q.yaml"), policy("acme/web", 90)).unwrap();
        let second = PolicySet::from_snapshot_after(&read(), None, Some(&first)).unwrap();
        let lifetime =
            |s: &PolicySet, i: usize| s.policies()[i].grant.as_ref().unwrap().max_lifetime_seconds;
        assert!(
            std::sync::Arc::ptr_eq(&first.policies()[0], &second.policies()[0]),
            "p.yaml shared"
        );
        assert!(!std::sync::Arc::ptr_eq(
            &first.policies()[1],
            &second.policies()[1]
        ));
        assert_eq!(
            (lifetime(&first, 1), lifetime(&second, 1)),
            (60, 90),
            "q.yaml compiled again"
        );
        // Compiled without a previous set: the same decisions.
        assert_eq!(
            format!("{:?}", second.policies()),
            format!(
                "{:?}",
                PolicySet::from_snapshot_after(&read(), None, None)
                    .unwrap()
                    .policies()
            )
        );
        // Another inventory: nothing is shared (names resolve anew).
        let mut moved = inv.clone();
        moved.repositories[1].full_name = "acme/web".into();
        moved.repositories[0].full_name = "acme/web-old".into();
        std::fs::write(
            d.path().join("inventory/acme.yaml"),
            moved.to_yaml().unwrap(),
        )
        .unwrap();
        let third = PolicySet::from_snapshot_after(&read(), None, Some(&second)).unwrap();
        assert!(!std::sync::Arc::ptr_eq(
            &second.policies()[0],
            &third.policies()[0]
        ));
        assert_ne!(
            second.policies()[0].when.repository_uuid,
            third.policies()[0].when.repository_uuid,
            "acme/web resolved through the new inventory"
        );
    }

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

    const MARKER: &str = "https://sts.example.test/agent";

    fn subject(env: bool, aud: &[&str]) -> Subject {
        Subject {
            workspace_uuid: BbUuid::parse_lenient("03b741e3-cf4a-41f9-9a59-cec52e21bdc3").unwrap(),
            repository_uuid: BbUuid::parse_lenient("d4e45493-4a33-477d-917b-a24e7e4bd39b").unwrap(),
            deployment_environment_uuid: env
                .then(|| BbUuid::parse_lenient("bd715740-c970-486b-b68a-b421ec2a1f8b").unwrap()),
            branch_name: Some("main".into()),
            aud: aud.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn decide(set: &PolicySet, s: &Subject, scopes: &str) -> Result<Vec<String>, String> {
        let scopes = crate::domain::Scopes::parse(scopes).unwrap();
        match set
            .evaluate(&EvalRequest {
                subject: s,
                audience: "deploy-api",
                scopes: &scopes,
                now: std::time::SystemTime::now(),
            })
            .outcome
        {
            Outcome::Allow(g) => Ok(g.scopes.as_slice().to_vec()),
            Outcome::Deny { reason, .. } => Err(reason.code().to_string()),
        }
    }

    /// The agent example: a deny on the marker for deploy:production, a deploy
    /// grant gated on an environment.
    #[test]
    fn an_audience_marker_narrows_allow_and_deny() {
        let deploy = compile_str(
            "deploy",
            "effect: allow\nwhen:\n  repositoryUuid: \"{d4e45493-4a33-477d-917b-a24e7e4bd39b}\"\n  deploymentEnvironmentUuid: \"{bd715740-c970-486b-b68a-b421ec2a1f8b}\"\ngrant:\n  client: c\n  audience: deploy-api\n  scopes: [deploy:production, deploy:read]\n  default_scopes: [deploy:production]\n  max_lifetime_seconds: 60\n",
            None,
        )
        .unwrap();
        let deny = compile_str(
            "no-agent-deploy",
            &format!("effect: deny\nwhen:\n  aud: \"{MARKER}\"\naudiences: [deploy-api]\nscopes: [deploy:production]\n"),
            None,
        )
        .unwrap();
        let set = PolicySet::from_policies(vec![deploy, deny]);
        assert!(
            set.marker_warnings().is_empty(),
            "{:?}",
            set.marker_warnings()
        );
        let plain = subject(true, &["https://sts.example.test"]);
        let agent = subject(true, &["https://sts.example.test", MARKER]);
        assert_eq!(
            decide(&set, &plain, ""),
            Ok(vec!["deploy:production".into()])
        );
        assert_eq!(decide(&set, &agent, ""), Err("policy.denied".into()));
        assert_eq!(
            decide(&set, &agent, "deploy:production"),
            Err("policy.denied".into())
        );
        assert_eq!(
            decide(&set, &agent, "deploy:read"),
            Ok(vec!["deploy:read".into()])
        );
        let offers = set.offers(&agent, std::time::SystemTime::now());
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].scopes, ["deploy:read"]);
        assert_eq!(offers[0].default_scopes, None);

        // An allow gated on the marker admits only marked steps (and is warned about).
        let marked = compile_str(
            "marked",
            &format!("effect: allow\nwhen:\n  repositoryUuid: \"{{d4e45493-4a33-477d-917b-a24e7e4bd39b}}\"\n  aud: [\"{MARKER}\"]\ngrant:\n  client: c\n  audience: deploy-api\n  scopes: [deploy:read]\n  default_scopes: [deploy:read]\n  max_lifetime_seconds: 60\n"),
            None,
        )
        .unwrap();
        let set = PolicySet::from_policies(vec![marked]);
        assert_eq!(decide(&set, &agent, ""), Ok(vec!["deploy:read".into()]));
        assert_eq!(
            decide(&set, &subject(false, &["https://sts.example.test"]), ""),
            Err("policy.aud_not_allowed".into())
        );
        let w = set.marker_warnings();
        assert!(
            w.len() == 1 && w[0].starts_with("marked: `when.aud`"),
            "{w:?}"
        );
    }

    #[test]
    fn a_deny_on_a_marker_warns_whatever_its_own_branch_and_a_misspelt_scope_warns() {
        let open_grant = compile_str(
            "open",
            "effect: allow\nwhen:\n  repositoryUuid: \"{d4e45493-4a33-477d-917b-a24e7e4bd39b}\"\ngrant:\n  client: c\n  audience: deploy-api\n  scopes: [deploy:production]\n  default_scopes: [deploy:production]\n  max_lifetime_seconds: 60\n",
            None,
        )
        .unwrap();
        let deny = |id: &str, scope: &str| {
            compile_str(
                id,
                &format!("effect: deny\nwhen:\n  aud: \"{MARKER}\"\n  branchName: \"**\"\naudiences: [deploy-api]\nscopes: [{scope}]\n"),
                None,
            )
            .unwrap()
        };
        let set = PolicySet::from_policies(vec![
            open_grant.clone(),
            deny("no-agent", "deploy:production"),
        ]);
        let w = set.warnings();
        assert!(
            w.len() == 1 && w[0].starts_with("no-agent: this deny on `when.aud` is evaded"),
            "{w:?}"
        );
        let set = PolicySet::from_policies(vec![open_grant, deny("typo", "deploy:prodution")]);
        let w = set.warnings();
        assert!(
            w.iter().any(|l| l
                .starts_with("typo: `scopes`: no allow policy grants scope `deploy:prodution`")),
            "{w:?}"
        );
    }

    /// A scope no grant offers is `scope_not_allowed` whether or not a deny names
    /// it: a caller cannot probe the deny rules.
    #[test]
    fn scopes_a_deny_names_are_not_revealed_to_callers() {
        let grant = compile_str(
            "g",
            "effect: allow\nwhen:\n  repositoryUuid: \"{d4e45493-4a33-477d-917b-a24e7e4bd39b}\"\ngrant:\n  client: c\n  audience: deploy-api\n  scopes: [deploy:read, deploy:production]\n  default_scopes: [deploy:read]\n  max_lifetime_seconds: 60\n",
            None,
        )
        .unwrap();
        let deny = compile_str(
            "d",
            "effect: deny\nwhen:\n  repositoryUuid: \"{d4e45493-4a33-477d-917b-a24e7e4bd39b}\"\nscopes: [secret:admin, deploy:production]\n",
            None,
        )
        .unwrap();
        let set = PolicySet::from_policies(vec![grant, deny]);
        let s = subject(false, &[]);
        assert_eq!(
            decide(&set, &s, "secret:admin"),
            Err("policy.scope_not_allowed".into())
        );
        assert_eq!(
            decide(&set, &s, "guess:scope"),
            Err("policy.scope_not_allowed".into())
        );
        assert_eq!(
            decide(&set, &s, "deploy:production"),
            Err("policy.denied".into())
        );
        assert_eq!(decide(&set, &s, ""), Ok(vec!["deploy:read".into()]));
    }

    #[test]
    fn markers_and_deny_scopes_are_checked_at_load() {
        let grant = "grant:\n  client: c\n  audience: a\n  scopes: [s]\n  default_scopes: [s]\n  max_lifetime_seconds: 60\n";
        let repo = "  repositoryUuid: \"{d4e45493-4a33-477d-917b-a24e7e4bd39b}\"\n";
        for (yaml, key) in [
            (
                format!("effect: allow\nwhen:\n{repo}  aud: \"a b\"\n{grant}"),
                "when.aud[0]",
            ),
            (
                format!(
                    "effect: allow\nwhen:\n{repo}  aud: \"{}\"\n{grant}",
                    "x".repeat(151)
                ),
                "when.aud[0]",
            ),
            (format!("effect: allow\nwhen:\n{repo}  aud: \"https://sts.example.test/agent\u{200B}\"\n{grant}"), "when.aud[0]"),
            (format!("effect: allow\nwhen:\n{repo}  aud: \"https://sts.exаmple.test/agent\"\n{grant}"), "when.aud[0]"),
            (
                format!("effect: allow\nwhen:\n{repo}scopes: [s]\n{grant}"),
                "scopes",
            ),
            (
                format!("effect: deny\nwhen:\n{repo}scopes: [\"a b\"]\n"),
                "scopes[0]",
            ),
            (format!("effect: deny\nwhen:\n{repo}scopes: []\n"), "scopes"),
        ] {
            let e = compile(&yaml).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e}");
        }
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
            assert_eq!(e.key, field, "{yaml}\n=> {e}");
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
        assert_eq!(e.key, "grant.client");
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
        assert_eq!(e.key, "when.repositoryUuid", "{e}");
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
            assert_eq!(e.key, field, "{yaml}\n=> {e}");
        }
    }

    /// Issue #7 §1, second input: a deny with `audiences: []` never applied.
    #[test]
    fn deny_with_empty_audiences_is_refused_and_unknown_audience_is_warned() {
        let e = compile("effect: deny\nwhen:\n  repositoryUuid: \"{5b0b3a50-2f0e-4c3a-9d1e-6f8a7b9c0d1e}\"\naudiences: []\n").unwrap_err();
        assert_eq!(e.key, "audiences");
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
        assert_eq!(e.key, "audiences[0]");
    }

    /// A deny on `mаin` (Cyrillic а) reads as a deny on main: warned; the same
    /// pattern in an allow, and ASCII patterns, are not.
    #[test]
    fn a_deny_branch_pattern_with_a_look_alike_letter_is_warned() {
        let deny = compile_str("d", "effect: deny\nwhen:\n  workspaceUuid: \"{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}\"\n  branchName: [\"m\u{430}in\", main]\n", None).unwrap();
        let w = PolicySet::from_policies(vec![deny]).look_alike_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("d:") && w[0].contains("U+0430") && w[0].contains("m\\u{430}in"),
            "{w:?}"
        );
        let ascii = compile_str("a", "effect: deny\nwhen:\n  workspaceUuid: \"{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}\"\n  branchName: main\n", None).unwrap();
        assert!(PolicySet::from_policies(vec![ascii])
            .look_alike_warnings()
            .is_empty());
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
        assert_eq!(e.key, "when.branchName[0]", "{e}");
    }

    #[test]
    fn tags_blank_strings_and_a_byte_order_mark() {
        let e = compile(&format!(
            "effect: allow\nwhen: !foo\n  workspaceUuid: \"{{{W}}}\"\n{GRANT}"
        ))
        .unwrap_err();
        assert_eq!(e.key, "when", "{e}");
        assert!(e.reason.contains("tags"), "{e}");
        let e = compile(&format!(
            "description: \" \"\neffect: allow\nwhen:\n  workspaceUuid: \"{{{W}}}\"\n{GRANT}"
        ))
        .unwrap_err();
        assert_eq!(e.key, "description", "{e}");
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
        assert_eq!(e.key, "when.workspaceUuid", "{e}");
        assert!(e.reason.contains("quote"), "{e}");
    }
}
