//! `keycloak-ci-sts report access` (issue #23): who may obtain which
//! credentials, on what protections, and what the audit shows was used.
//!
//! Built from the compiled policies (with the inventory and the protections
//! it records, [`crate::policy::PolicySet::coverage`]) and, optionally, the
//! audit files of a period ([`audit`]). One [`Path`] per allow policy,
//! admitted repository, branch pattern and environment; sorted by client,
//! audience, repository, policy, branch and environment; rendered as
//! Markdown, one self-contained HTML file, or JSON ([`render`]).

pub mod audit;
pub mod render;

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;

use crate::domain::BbUuid;
use crate::policy::PolicySet;

/// The report.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Report {
    /// When it was made (RFC 3339).
    pub generated_at: String,
    /// The policy set's digest (which files it read).
    pub policies_digest: String,
    /// `[protections] max_age_hours`.
    pub protections_max_age_hours: u64,
    /// The audit period, when audit files were read.
    pub period: Option<PeriodText>,
    /// Who may obtain what, sorted.
    pub paths: Vec<Path>,
    /// Refused exchanges of the period by error code.
    pub refusals: BTreeMap<String, u64>,
    /// What reading the audit files did.
    pub audit: Option<AuditSummary>,
    /// What `keycloak plan` said (`clean: …`, `not clean: …`, `not checked: …`).
    pub keycloak_plan: String,
    /// What the report did not check.
    pub not_checked: Vec<String>,
}

/// The period, as text.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct PeriodText {
    /// First second (RFC 3339).
    pub from: String,
    /// First second after (RFC 3339).
    pub to: String,
}

/// Counts of the audit input.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct AuditSummary {
    /// Files read.
    pub files: usize,
    /// Lines read.
    pub lines_read: u64,
    /// Outside the period, or not about an exchange.
    pub lines_skipped: u64,
    /// Not audit lines.
    pub lines_unparseable: u64,
    /// Copies of lines already counted (same `request_id` and content).
    pub duplicates: u64,
    /// Lines sharing a `request_id` with a different line (each counted).
    pub conflicts: u64,
    /// Tokens issued whose policy, repository or audience no path has now
    /// (a policy changed or removed during the period).
    pub issued_outside_paths: u64,
}

/// One way to obtain a credential.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Path {
    /// Keycloak client.
    pub client: String,
    /// RFC 8693 audience.
    pub audience: String,
    /// Scopes that may be requested.
    pub scopes: Vec<String>,
    /// The allow policy.
    pub policy: String,
    /// `shared client` (its service account), or the repository's own user
    /// (`repository user`, `repository+environment user`).
    pub identity: String,
    /// Keycloak groups of that user.
    pub groups: Vec<String>,
    /// `full_name`.
    pub repository: String,
    /// `repositoryUuid`.
    pub repository_uuid: String,
    /// Branch pattern (`None`: any branch, tag builds included).
    pub branch: Option<String>,
    /// Deployment environment (`None`: any step).
    pub environment: Option<String>,
    /// What the grant requires (`branch: protected, …`), empty for nothing.
    pub requires: String,
    /// What the inventory shows of the branch.
    pub shown: String,
    /// What of the requirement is not shown (empty when met).
    pub missing: Vec<String>,
    /// Whether the path rests on protections the inventory shows: a
    /// requirement that is met.
    pub protected: bool,
    /// Whether the inventory shows the branch restrictions now (recorded,
    /// readable, younger than the maximum age): otherwise who may push or
    /// merge is unknown.
    pub restrictions_known: bool,
    /// Who may push to the branch: those every matching `push` restriction
    /// exempts (`None`: no `push` restriction matches: anyone with write access).
    pub may_push: Option<Vec<String>>,
    /// Who may merge into it (`None`: no `restrict_merges` restriction matches).
    pub may_merge: Option<Vec<String>>,
    /// Tokens issued on this path in the period (`None`: no audit read).
    pub issued: Option<u64>,
    /// When the last was issued (RFC 3339).
    pub last_issued: Option<String>,
    /// Read audit files show no token in the period: a candidate for removal.
    pub unused: bool,
}

/// Builds the report of `set` at `now`, with the audit's `usage` when read.
pub fn build(
    set: &PolicySet,
    now: SystemTime,
    usage: Option<(&audit::Usage, audit::Period, usize)>,
    keycloak_plan: Option<String>,
) -> Report {
    let mut index = usage.map(|(u, _, _)| UsageIndex::new(u));
    let policies: std::collections::HashMap<&str, &crate::policy::Policy> = set
        .policies()
        .iter()
        .map(|p| (p.id.as_str(), &**p))
        .collect();
    let mut paths: Vec<Path> = Vec::new();
    for c in set.coverage(now, true) {
        let Some(p) = policies.get(c.policy.as_str()) else {
            continue;
        };
        let used = index.as_mut().map(|i| i.on(&c, p));
        paths.extend(path(&c, p, used));
    }
    paths.sort_by(|a, b| {
        (
            &a.client,
            &a.audience,
            &a.repository,
            &a.policy,
            &a.branch,
            &a.environment,
        )
            .cmp(&(
                &b.client,
                &b.audience,
                &b.repository,
                &b.policy,
                &b.branch,
                &b.environment,
            ))
    });
    let audit = usage
        .zip(index.as_ref())
        .map(|((u, _, files), i)| AuditSummary {
            files,
            lines_read: u.lines_read,
            lines_skipped: u.lines_skipped,
            lines_unparseable: u.lines_unparseable,
            duplicates: u.duplicates,
            conflicts: u.conflicts,
            issued_outside_paths: i.outside_paths(),
        });
    Report {
        generated_at: crate::inventory::protections::rfc3339(now),
        policies_digest: set.digest().to_string(),
        protections_max_age_hours: set.rules().max_age.as_secs() / 3600,
        period: usage.map(|(_, p, _)| PeriodText {
            from: rfc3339(p.from),
            to: rfc3339(p.to),
        }),
        paths,
        refusals: usage
            .map(|(u, _, _)| u.refusals.clone())
            .unwrap_or_default(),
        audit,
        keycloak_plan: keycloak_plan.unwrap_or_else(|| {
            "not checked: give --keycloak-plan with view-only admin credentials".into()
        }),
        not_checked: not_checked(set, usage.is_some()),
    }
}

/// (policy, audience, repository).
type PathKey<'a> = (&'a str, &'a str, BbUuid);

/// The audit's counts by (policy, audience, repository), so that a path looks
/// up its own, and which counts some path took.
struct UsageIndex<'a> {
    by_path: BTreeMap<PathKey<'a>, Vec<(&'a audit::UsageKey, Option<BbUuid>)>>,
    usage: &'a audit::Usage,
    taken: std::collections::BTreeSet<&'a audit::UsageKey>,
}

impl<'a> UsageIndex<'a> {
    fn new(usage: &'a audit::Usage) -> Self {
        let mut by_path: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for k in usage.issued.keys() {
            let Ok(repo) = BbUuid::parse_lenient(&k.repository_uuid) else {
                continue;
            };
            let env = k
                .environment_uuid
                .as_deref()
                .and_then(|e| BbUuid::parse_lenient(e).ok());
            by_path
                .entry((k.policy.as_str(), k.audience.as_str(), repo))
                .or_default()
                .push((k, env));
        }
        Self {
            by_path,
            usage,
            taken: std::collections::BTreeSet::new(),
        }
    }

    /// Tokens issued on row `c` of policy `p` and when the last was: a token
    /// counts when its branch matches the row's pattern and its environment
    /// the row's.
    fn on(&mut self, c: &crate::policy::require::Coverage, p: &crate::policy::Policy) -> Issued {
        let pattern = c.branch.as_ref().and_then(|b| {
            p.when
                .branch_name
                .as_ref()?
                .iter()
                .find(|x| x.source() == b)
        });
        let (mut n, mut last) = (0, 0);
        let key = (c.policy.as_str(), c.audience.as_str(), c.repository_uuid);
        for (k, env) in self.by_path.get(&key).into_iter().flatten() {
            let on_branch = match (&c.branch, pattern) {
                (None, _) => true,
                (Some(_), Some(pat)) => k.branch.as_deref().is_some_and(|b| pat.is_match(b)),
                (Some(_), None) => false,
            };
            let Some(v) = self.usage.issued.get(*k) else {
                continue;
            };
            if on_branch && c.environment_uuid.is_none_or(|e| *env == Some(e)) {
                n += v.count;
                last = last.max(v.last);
                self.taken.insert(k);
            }
        }
        Issued {
            count: n,
            last: (last > 0).then(|| rfc3339(last)),
        }
    }

    /// Tokens no path took: issued on paths that no longer exist.
    fn outside_paths(&self) -> u64 {
        self.usage
            .issued
            .iter()
            .filter(|(k, _)| !self.taken.contains(k))
            .map(|(_, v)| v.count)
            .sum()
    }
}

/// What one path issued in the period.
struct Issued {
    count: u64,
    last: Option<String>,
}

/// The row of coverage line `c` of policy `p` (`None` for a deny).
fn path(
    c: &crate::policy::require::Coverage,
    p: &crate::policy::Policy,
    used: Option<Issued>,
) -> Option<Path> {
    let g = p.grant.as_ref()?;
    let identity = match g.identity {
        None => "shared client",
        Some(crate::domain::identity::IdentityKind::Repository) => "repository user",
        Some(crate::domain::identity::IdentityKind::RepositoryEnvironment) => {
            "repository+environment user"
        }
    };
    let (issued, last_issued) = match used {
        Some(u) => (Some(u.count), u.last),
        None => (None, None),
    };
    Some(Path {
        client: g.client.clone(),
        audience: c.audience.clone(),
        scopes: g.scopes.iter().cloned().collect(),
        policy: c.policy.clone(),
        identity: identity.to_string(),
        groups: g.groups.iter().cloned().collect(),
        repository: c.repository.clone(),
        repository_uuid: c.repository_uuid.braced(),
        branch: c.branch.clone(),
        environment: c.environment.clone(),
        requires: c.requires.describe(),
        shown: c.shown.clone(),
        missing: c
            .missing
            .iter()
            .map(crate::policy::require::Missing::phrase)
            .collect(),
        protected: !c.requires.is_empty() && c.missing.is_empty(),
        restrictions_known: c.who.is_some(),
        may_push: c.who.as_ref().and_then(|w| w.push.clone()),
        may_merge: c.who.as_ref().and_then(|w| w.merge.clone()),
        unused: issued == Some(0),
        issued,
        last_issued,
    })
}

/// What the report did not check (`read`: audit files were given).
fn not_checked(set: &PolicySet, read: bool) -> Vec<String> {
    let mut out = vec![
        "which branches may deploy to an environment (not in Bitbucket's public API)".to_string(),
        "restrictions set at the project level (not returned by the repository's endpoint)".to_string(),
        "pipelines importing their definition from another repository (shared pipeline configurations)".to_string(),
    ];
    if !read {
        out.push("what was used: no audit files were given".to_string());
    }
    out.push(
        "deny policies: each row is what an allow admits; a deny policy may refuse some of it (policy explain shows one request)"
            .to_string(),
    );
    out.extend(outside_inventory(set));
    out
}

/// The JSON Schema of the report's JSON form (`docs/src/schemas/access-report.schema.json`).
///
/// # Errors
/// Serialisation failure (not expected).
pub fn schema() -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(&schemars::schema_for!(Report)).map(|s| s + "\n")
}

/// One line per allow that admits repositories, environments or workspaces
/// the inventory does not list: those paths have no row.
fn outside_inventory(set: &PolicySet) -> Vec<String> {
    let inv = set.inventory();
    let mut out = Vec::new();
    for p in set.policies() {
        if p.grant.is_none() {
            continue;
        }
        let w = &p.when;
        let repos = w
            .repository_uuid
            .iter()
            .flatten()
            .filter(|u| inv.repository(u).is_none())
            .count();
        let envs = w
            .deployment_environment_uuid
            .iter()
            .flatten()
            .filter(|e| {
                !inv.repositories()
                    .any(|r| r.environments().any(|x| x.uuid == **e))
            })
            .count();
        let workspaces = match (&w.repository_uuid, &w.workspace_uuid) {
            (None, Some(list)) => list
                .iter()
                .filter(|ws| {
                    !inv.repositories()
                        .any(|r| r.workspace().workspace_uuid == **ws)
                })
                .count(),
            _ => 0,
        };
        if repos + envs + workspaces > 0 {
            out.push(format!(
                "policy {} admits {repos} repositories, {envs} environments and {workspaces} workspaces the inventory does not list: those paths have no row",
                p.id
            ));
        }
    }
    out
}

fn rfc3339(secs: u64) -> String {
    crate::inventory::protections::rfc3339(
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
    )
}
