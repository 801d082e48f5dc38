//! Requirements a grant puts on what stops people from reaching it (issue
//! #22): a protected branch, enforced approvals, an admin-only deployment
//! environment, as the inventory records Bitbucket's protections
//! ([`crate::inventory::protections`] defines each).
//!
//! A policy writes `require: {branch: protected, approvals: 2, environment:
//! admin_only}` in its grant; the configuration may add a requirement to every
//! grant of a client or audience (`[protections.require.clients.<id>]`,
//! `[protections.require.audiences.<audience>]`), so that a new policy cannot
//! quietly leave it out: a grant's requirement is the union. An unmet
//! requirement makes that allow not apply; unknown, unread or stale
//! (older than `[protections] max_age_hours`) protections count as not met.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::Subject;
use crate::inventory::protections::{BranchFacts, Why};
use crate::inventory::Inventory;

/// Default of `[protections] max_age_hours`.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(72 * 3600);

/// What a grant requires (each part optional).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Requirement {
    /// The token's `branchName` is a protected branch.
    pub branch_protected: bool,
    /// At least this many approvals, enforced, to merge into it (0: none).
    pub approvals: u32,
    /// The token's deployment environment is admin-only.
    pub environment_admin_only: bool,
}

/// The file form, in a policy's grant or the configuration.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("minProperties" = 1, "dependencies" = {"approvals": ["branch"]}))]
pub struct RawRequirement {
    /// `protected`.
    #[serde(default)]
    pub branch: Option<BranchRequirement>,
    /// 1 to 10.
    #[serde(default)]
    #[schemars(range(min = 1, max = 10))]
    pub approvals: Option<u32>,
    /// `admin_only`.
    #[serde(default)]
    pub environment: Option<EnvironmentRequirement>,
}

/// `require.branch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BranchRequirement {
    /// A `push` and a `force` restriction match the branch.
    Protected,
}

/// `require.environment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentRequirement {
    /// `restrictions.admin_only` is set on the environment.
    AdminOnly,
}

/// Most approvals a requirement may ask (Bitbucket's own setting stops at 10).
pub const MAX_APPROVALS: u32 = 10;

impl RawRequirement {
    /// The compiled requirement.
    ///
    /// # Errors
    /// `approvals` out of 1..=[`MAX_APPROVALS`], or without `branch: protected`
    /// (a branch anyone may push to needs no approval).
    pub fn compile(&self) -> Result<Requirement, String> {
        if self.branch.is_none() && self.approvals.is_none() && self.environment.is_none() {
            return Err(
                "empty: it would require nothing (a key commented out?); name `branch: protected`, \
                 `approvals` or `environment: admin_only`"
                    .into(),
            );
        }
        let approvals = self.approvals.unwrap_or(0);
        if self.approvals.is_some() && !(1..=MAX_APPROVALS).contains(&approvals) {
            return Err(format!("`approvals`: 1 to {MAX_APPROVALS}"));
        }
        if approvals > 0 && self.branch.is_none() {
            return Err(
                "`approvals` needs `branch: protected`: where people may push directly, merge approvals protect nothing"
                    .into(),
            );
        }
        Ok(Requirement {
            branch_protected: self.branch.is_some(),
            approvals,
            environment_admin_only: self.environment.is_some(),
        })
    }
}

/// A protection a request's grant requires and the inventory does not show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Missing {
    /// Which: `protected_branch`, `approvals`, `admin_only_environment`.
    pub protection: Protection,
    /// Why it is not met.
    pub reason: Reason,
}

/// A protection a requirement names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Protection {
    /// `branch: protected`.
    ProtectedBranch,
    /// `approvals: N`.
    Approvals {
        /// N.
        required: u32,
    },
    /// `environment: admin_only`.
    AdminOnlyEnvironment,
}

/// Why a protection is not met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The inventory shows it absent.
    Absent,
    /// Unknown, unread or stale ([`Why`]).
    Unknown(Why),
    /// The token has no `branchName` (tag builds).
    NoBranch,
    /// The token has no deployment environment.
    NoEnvironment,
}

impl Missing {
    /// A phrase for callers and reviewers (no policy detail).
    pub fn phrase(&self) -> String {
        let what = match self.protection {
            Protection::ProtectedBranch => {
                "a protected branch (push and history-rewrite restrictions)".to_string()
            }
            Protection::Approvals { required } => {
                format!("{required} approvals enforced by merge checks")
            }
            Protection::AdminOnlyEnvironment => "an admin-only deployment environment".to_string(),
        };
        let why = match self.reason {
            Reason::Absent => "absent",
            Reason::Unknown(w) => w.phrase(),
            Reason::NoBranch => "the token has no branchName",
            Reason::NoEnvironment => "the token has no deployment environment",
        };
        format!("{what}: {why}")
    }
}

impl Requirement {
    /// Whether it requires nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// What both require.
    pub fn union(self, o: Self) -> Self {
        Self {
            branch_protected: self.branch_protected || o.branch_protected,
            approvals: self.approvals.max(o.approvals),
            environment_admin_only: self.environment_admin_only || o.environment_admin_only,
        }
    }

    /// The text of its file form, for `policy explain` and `policy check`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.branch_protected {
            parts.push("branch: protected".to_string());
        }
        if self.approvals > 0 {
            parts.push(format!("approvals: {}", self.approvals));
        }
        if self.environment_admin_only {
            parts.push("environment: admin_only".to_string());
        }
        parts.join(", ")
    }

    /// What of it the inventory does not show for `s` at `now`.
    pub fn unmet(
        &self,
        inv: &Inventory,
        s: &Subject,
        now: SystemTime,
        max_age: Duration,
    ) -> Vec<Missing> {
        let mut out = Vec::new();
        if self.is_empty() {
            return out;
        }
        let repo = inv.repository(&s.repository_uuid);
        let record = repo.as_ref().and_then(|r| r.protections());
        let miss = |protection, reason| Missing { protection, reason };
        if self.branch_protected || self.approvals > 0 {
            let facts = match (&s.branch_name, record) {
                (None, _) => Err(Reason::NoBranch),
                (Some(_), None) => Err(Reason::Unknown(Why::NotRead)),
                (Some(b), Some(c)) => match c.branch(b, now, max_age) {
                    BranchFacts::Unknown(w) => Err(Reason::Unknown(w)),
                    BranchFacts::Known {
                        protected,
                        approvals,
                    } => Ok((protected, approvals)),
                },
            };
            if self.branch_protected {
                match facts {
                    Ok((true, _)) => {}
                    Ok((false, _)) => out.push(miss(Protection::ProtectedBranch, Reason::Absent)),
                    Err(r) => out.push(miss(Protection::ProtectedBranch, r)),
                }
            }
            if self.approvals > 0 {
                let p = Protection::Approvals {
                    required: self.approvals,
                };
                match facts {
                    Ok((_, n)) if n >= u64::from(self.approvals) => {}
                    Ok(_) => out.push(miss(p, Reason::Absent)),
                    Err(r) => out.push(miss(p, r)),
                }
            }
        }
        if self.environment_admin_only {
            let r = match (&s.deployment_environment_uuid, record) {
                (None, _) => Some(Reason::NoEnvironment),
                (Some(_), None) => Some(Reason::Unknown(Why::NotRead)),
                (Some(e), Some(c)) => match c.admin_only(e, now, max_age) {
                    Ok(true) => None,
                    Ok(false) => Some(Reason::Absent),
                    Err(w) => Some(Reason::Unknown(w)),
                },
            };
            out.extend(r.map(|r| miss(Protection::AdminOnlyEnvironment, r)));
        }
        out
    }
}

/// The configuration's part: how old protections may be, and the
/// requirements every grant of a client or audience carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// `[protections] max_age_hours`.
    pub max_age: Duration,
    /// `[protections.require.clients.<id>]`.
    pub clients: BTreeMap<String, Requirement>,
    /// `[protections.require.audiences.<audience>]`.
    pub audiences: BTreeMap<String, Requirement>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            max_age: DEFAULT_MAX_AGE,
            clients: BTreeMap::new(),
            audiences: BTreeMap::new(),
        }
    }
}

impl Rules {
    /// A grant's requirement: its own and the configuration's for its client
    /// and audience.
    pub fn of(&self, own: Requirement, client: &str, audience: &str) -> Requirement {
        let by = |m: &BTreeMap<String, Requirement>, k: &str| m.get(k).copied().unwrap_or_default();
        own.union(by(&self.clients, client))
            .union(by(&self.audiences, audience))
    }
}

/// The repositories of `inv` whose protections the policies of `dir`
/// concern: those an allow admits (by its own repository or workspace list)
/// when it names a branch or an environment or requires a protection (its
/// own or `rules`'). Each policy file is compiled against `inv` alone; one
/// that does not compile is skipped and returned (the service would refuse
/// it anyway).
///
/// # Errors
/// The directory cannot be read.
pub fn concerned(
    dir: &std::path::Path,
    inv: &Inventory,
    rules: &Rules,
) -> Result<
    (
        std::collections::BTreeSet<crate::domain::BbUuid>,
        Vec<super::PolicyError>,
    ),
    Vec<super::PolicyError>,
> {
    let snapshot = super::Snapshot::read(dir)?;
    let mut repos = std::collections::BTreeSet::new();
    let mut skipped = Vec::new();
    for f in &snapshot.policies {
        let text = f.text.as_deref().unwrap_or_default();
        let p = match super::compile_file(&f.path, text, None, inv) {
            Ok(p) => p,
            Err(e) => {
                skipped.push(e);
                continue;
            }
        };
        let Some(g) = &p.grant else { continue };
        if !p.when.has_branch_or_environment()
            && rules.of(g.require, &g.client, &g.audience).is_empty()
        {
            continue;
        }
        match &p.when.repository_uuid {
            Some(list) => repos.extend(list.iter().filter(|u| inv.repository(u).is_some())),
            None => repos.extend(
                inv.repositories()
                    .filter(|r| {
                        p.when
                            .workspace_uuid
                            .as_ref()
                            .is_none_or(|w| w.contains(&r.workspace().workspace_uuid))
                    })
                    .map(|r| r.uuid()),
            ),
        }
    }
    Ok((repos, skipped))
}

/// What a record shows of a branch (as written) and an environment, in words.
fn shown(
    record: Option<&crate::inventory::protections::Compiled>,
    branch: Option<&str>,
    env: Option<&crate::domain::BbUuid>,
    now: SystemTime,
    max_age: Duration,
) -> String {
    let branch_text = match (branch, record) {
        (None, _) => "any branch: checked per branch at each exchange".to_string(),
        (Some(_), None) => Why::NotRead.phrase().to_string(),
        (Some(b), Some(c)) => {
            let facts = match c.branch(b, now, max_age) {
                BranchFacts::Unknown(w) => w.phrase().to_string(),
                BranchFacts::Known {
                    protected,
                    approvals,
                } => format!(
                    "{}{}",
                    if protected {
                        "protected"
                    } else {
                        "not protected"
                    },
                    match approvals {
                        0 => String::new(),
                        1 => ", 1 approval enforced".to_string(),
                        n => format!(", {n} approvals enforced"),
                    }
                ),
            };
            if b.contains('*') {
                format!("{facts} (for the pattern as written; each branch is checked at exchange)")
            } else {
                facts
            }
        }
    };
    let Some(e) = env else { return branch_text };
    let env_text = match record.map(|c| c.admin_only(e, now, max_age)) {
        None => Why::NotRead.phrase(),
        Some(Ok(true)) => "admin-only",
        Some(Ok(false)) => "not admin-only",
        Some(Err(w)) => w.phrase(),
    };
    format!("{branch_text}; environment {env_text}")
}

/// One line of `policy check`'s protections table: an allow, one
/// repository it admits, and the branch pattern or environment it names.
#[derive(Debug, Clone, Serialize)]
pub struct Coverage {
    /// The allow policy.
    pub policy: String,
    /// The grant's audience.
    pub audience: String,
    /// `full_name`.
    pub repository: String,
    /// Its UUID.
    pub repository_uuid: crate::domain::BbUuid,
    /// The environment's UUID, when the policy names environments.
    pub environment_uuid: Option<crate::domain::BbUuid>,
    /// Who may push to and merge into the branch (as written), when the
    /// inventory shows it.
    #[serde(skip)]
    pub who: Option<crate::inventory::protections::Who>,
    /// The branch pattern the policy names (`None`: any branch).
    pub branch: Option<String>,
    /// The environment the policy names (`None`: any, or none).
    pub environment: Option<String>,
    /// What the grant requires (its own and the configuration's).
    pub requires: Requirement,
    /// What the inventory shows of the branch, in words.
    pub shown: String,
    /// What of the requirement it does not show.
    pub missing: Vec<Missing>,
    /// A production grant: an environment condition, a per-repository
    /// identity, or a requirement from the configuration.
    pub production: bool,
}

/// Most table lines `policy check` prints for one policy (the rest are counted).
pub const MAX_COVERAGE_PER_POLICY: usize = 200;

impl super::PolicySet {
    /// A configured requirement for an audience no allow grants covers
    /// nothing (a typo would leave the audience it meant uncovered).
    pub fn requirement_warnings(&self) -> Vec<String> {
        let granted: std::collections::BTreeSet<&str> = self
            .policies()
            .iter()
            .filter_map(|p| p.grant.as_ref().map(|g| g.audience.as_str()))
            .collect();
        self.rules()
            .audiences
            .keys()
            .filter(|a| !granted.contains(a.as_str()))
            .map(|a| {
                format!(
                    "`protections.require.audiences.{a}`: no allow policy grants audience `{a}`; \
                     the requirement covers nothing (a typo?)"
                )
            })
            .collect()
    }

    /// For every allow that names a branch or an environment, or requires a
    /// protection: one line per repository it admits (by its own lists) and
    /// branch pattern or environment, with what the inventory shows at `now`.
    /// A pattern is checked as written (a `*` in it stands for itself: a
    /// restriction shown for it covers every branch the pattern admits only
    /// where Bitbucket's `*` also spans what the policy's does; the exchange
    /// checks each real branch).
    /// With `every_allow`, every allow is listed (the access review).
    pub fn coverage(&self, now: SystemTime, every_allow: bool) -> Vec<Coverage> {
        let mut out = Vec::new();
        let inv = self.inventory();
        for p in self.policies() {
            let Some(g) = &p.grant else { continue };
            let need = self.requirement_of(g);
            if !every_allow && !p.when.has_branch_or_environment() && need.is_empty() {
                continue;
            }
            let production = p.when.deployment_environment_uuid.is_some()
                || g.identity.is_some()
                || !self
                    .rules()
                    .of(Requirement::default(), &g.client, &g.audience)
                    .is_empty();
            let repos: Vec<_> = match &p.when.repository_uuid {
                Some(list) => list.iter().filter_map(|u| inv.repository(u)).collect(),
                None => inv
                    .repositories()
                    .filter(|r| {
                        p.when
                            .workspace_uuid
                            .as_ref()
                            .is_none_or(|w| w.contains(&r.workspace().workspace_uuid))
                    })
                    .collect(),
            };
            let branches: Vec<Option<String>> = match &p.when.branch_name {
                Some(pats) => pats.iter().map(|b| Some(b.source().to_string())).collect(),
                None => vec![None],
            };
            for repo in repos {
                let envs: Vec<(Option<crate::domain::BbUuid>, Option<String>)> =
                    match &p.when.deployment_environment_uuid {
                        Some(list) => repo
                            .environments()
                            .filter(|e| list.contains(&e.uuid))
                            .map(|e| (Some(e.uuid), Some(e.name.to_string())))
                            .collect(),
                        None => vec![(None, None)],
                    };
                for (env_uuid, env_name) in &envs {
                    for branch in &branches {
                        let subject = Subject {
                            workspace_uuid: repo.workspace().workspace_uuid,
                            repository_uuid: repo.uuid(),
                            deployment_environment_uuid: *env_uuid,
                            branch_name: branch.clone(),
                            aud: Vec::new(),
                        };
                        let max_age = self.rules().max_age;
                        let record = repo.protections();
                        let shown =
                            shown(record, branch.as_deref(), env_uuid.as_ref(), now, max_age);
                        let who = branch.as_ref().and_then(|b| record?.who(b, now, max_age));
                        // Without a branch condition, the exchange checks
                        // each real branch: no line can say more here.
                        let checked = match branch {
                            Some(_) => need,
                            None => Requirement {
                                branch_protected: false,
                                approvals: 0,
                                ..need
                            },
                        };
                        out.push(Coverage {
                            policy: p.id.clone(),
                            audience: g.audience.clone(),
                            repository: repo.full_name().to_string(),
                            repository_uuid: repo.uuid(),
                            environment_uuid: *env_uuid,
                            who,
                            branch: branch.clone(),
                            environment: env_name.clone(),
                            requires: need,
                            shown,
                            missing: checked.unmet(inv, &subject, now, max_age),
                            production,
                        });
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> Result<Requirement, String> {
        serde_norway::from_str::<RawRequirement>(yaml)
            .map_err(|e| e.to_string())?
            .compile()
    }

    #[test]
    fn the_language_is_small_and_checked() {
        assert_eq!(
            raw("branch: protected\napprovals: 2\nenvironment: admin_only\n").unwrap(),
            Requirement {
                branch_protected: true,
                approvals: 2,
                environment_admin_only: true
            }
        );
        assert!(raw("approvals: 2\n")
            .unwrap_err()
            .contains("branch: protected"));
        assert!(raw("branch: protected\napprovals: 0\n").is_err());
        assert!(raw("branch: protected\napprovals: 11\n").is_err());
        assert!(raw("branch: unprotected\n").is_err());
        assert!(raw("environment: admins\n").is_err());
        assert!(raw("branches: protected\n").is_err());
    }

    #[test]
    fn the_configuration_adds_to_a_grant_and_never_removes() {
        let mut rules = Rules::default();
        rules.clients.insert(
            "deploy".into(),
            Requirement {
                branch_protected: true,
                ..Requirement::default()
            },
        );
        rules.audiences.insert(
            "prod-api".into(),
            Requirement {
                approvals: 2,
                environment_admin_only: true,
                ..Requirement::default()
            },
        );
        let own = Requirement {
            approvals: 3,
            ..Requirement::default()
        };
        assert_eq!(
            rules.of(own, "deploy", "prod-api"),
            Requirement {
                branch_protected: true,
                approvals: 3,
                environment_admin_only: true
            }
        );
        assert_eq!(
            rules.of(Requirement::default(), "other", "x"),
            Requirement::default()
        );
    }
}
