//! What the inventory records of a repository's branch and deployment
//! protections (issue #22), and what they prove about one branch or
//! deployment environment.
//!
//! Read by `bitbucket inventory` from Bitbucket Cloud's REST API 2.0
//! (Atlassian's OpenAPI description; shapes checked against recorded answers):
//!
//! - `GET /2.0/repositories/{workspace}/{repo}/branch-restrictions`: each
//!   value has `kind` (`push`, `force`, `delete`, `restrict_merges`,
//!   `require_approvals_to_merge`, `enforce_merge_checks`, … — kept verbatim,
//!   an unknown kind included), `branch_match_kind` (`glob` with `pattern`, or
//!   `branching_model` with `branch_type`), `value` (a number, for the approval
//!   and build kinds), and `users` / `groups`: who is exempt from a `push` or
//!   `restrict_merges` restriction (empty: nobody). A `force` or `delete`
//!   restriction forbids history rewrites or deletion. It needs
//!   `repository:admin` (API tokens: `admin:repository:bitbucket`); without it
//!   the protections are **unknown**, never protected and never unprotected.
//! - `GET …/branching-model`: resolves `branching_model` restrictions
//!   (`development` / `production`: the branch named, when it exists; a branch
//!   type: its `prefix` followed by `*`); one that cannot be resolved matches no
//!   branch (it proves nothing).
//! - `GET …/environments`: `restrictions.admin_only`, `deployment_gate_enabled`,
//!   `environment_lock_enabled`. Which branches may deploy to an environment
//!   is not in the public API (a Premium setting of the web interface only): it
//!   is recorded as unknown.
//!
//! Restrictions a workspace sets at the project level are not documented as
//! returned by the repository's endpoint: a repository protected only by them
//! reads as unprotected here, which fails closed (its grants with requirements
//! are refused until the repository carries its own restrictions).
//!
//! **Protected** (what `require: {branch: protected}` asks): the restrictions
//! were read, are younger than `[protections] max_age_hours`, and both a `push`
//! restriction (only its listed users and groups may push; none when empty) and
//! a `force` restriction (no history rewrite) match the branch. **Approvals N**:
//! a `require_approvals_to_merge` restriction with `value` ≥ N *and* an
//! `enforce_merge_checks` restriction match the branch (without the latter,
//! approvals only warn). Bitbucket's `*` matches any run of characters; here it
//! does not cross `/` (the documentation does not say), so a branch is shown
//! protected by fewer patterns than Bitbucket may apply: a doubt refuses.

use std::time::{Duration, SystemTime};

use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};

use crate::domain::BbUuid;

/// Most branch restrictions one repository may record.
pub const MAX_RESTRICTIONS: usize = 1_000;
/// Most users or groups one restriction may list.
pub const MAX_PRINCIPALS: usize = 1_000;

/// A repository's protections as the inventory file records them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Protections {
    /// When they were read, RFC 3339 (UTC).
    pub read_at: String,
    /// The branch restrictions; absent when they could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_restrictions: Option<Vec<BranchRestriction>>,
    /// Why `branch_restrictions` is absent (e.g. the token lacks a scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

/// One branch restriction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BranchRestriction {
    /// Bitbucket's `kind`, verbatim.
    pub kind: String,
    /// The branch pattern: `pattern` of a `glob` restriction, or the branching
    /// model's resolution of `branch_type`; absent when it could not be resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `branch_type`, for a restriction matching by branching model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_type: Option<String>,
    /// `value` (approvals, builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
    /// Users exempt (`push`, `restrict_merges`): display name and UUID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<Principal>,
    /// Groups exempt: name and `slug`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Principal>,
}

/// A user (`id` = UUID) or group (`id` = slug) a restriction names.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    /// UUID of a user, slug of a group.
    pub id: String,
    /// Display name.
    pub name: String,
}

/// A deployment environment's restrictions, read with the repository's
/// [`Protections`] (same `read_at`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentRestrictions {
    /// `restrictions.admin_only`: only workspace or repository admins may deploy.
    pub admin_only: bool,
    /// `deployment_gate_enabled`.
    #[serde(default)]
    pub deployment_gate_enabled: bool,
    /// `environment_lock_enabled`.
    #[serde(default)]
    pub environment_lock_enabled: bool,
    /// Which branches may deploy: not in Bitbucket's public API, so always
    /// `unknown`.
    #[serde(default)]
    pub deploy_branches: Unknown,
}

/// A fact Bitbucket's public API does not expose.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Unknown {
    /// Not known.
    #[default]
    Unknown,
}

/// The RFC 3339 text of `t` (UTC, seconds).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Parses an RFC 3339 time.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let d = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let secs = u64::try_from(d.unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

impl Protections {
    /// What a well-formed record keeps: a parseable `read_at`; `unknown`
    /// exactly when `branch_restrictions` is absent; bounded lists; names
    /// without control, invisible or bidi characters (`deceptive`).
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self, deceptive: fn(char) -> bool) -> Result<(), String> {
        if parse_rfc3339(&self.read_at).is_none() {
            return Err(format!(
                "protections.read_at `{}` is not an RFC 3339 time",
                self.read_at.escape_debug()
            ));
        }
        match (&self.branch_restrictions, &self.unknown) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(
                    "protections: exactly one of branch_restrictions and unknown".to_string(),
                )
            }
            _ => {}
        }
        let list = self.branch_restrictions.as_deref().unwrap_or_default();
        if list.len() > MAX_RESTRICTIONS {
            return Err(format!("more than {MAX_RESTRICTIONS} branch restrictions"));
        }
        for r in list {
            let texts = std::iter::once(&r.kind)
                .chain(&r.pattern)
                .chain(&r.branch_type)
                .chain(
                    r.users
                        .iter()
                        .chain(&r.groups)
                        .flat_map(|p| [&p.id, &p.name]),
                );
            if texts.clone().any(|t| t.chars().any(deceptive)) {
                return Err(format!(
                    "branch restriction `{}`: control, invisible or bidi characters",
                    r.kind.escape_debug()
                ));
            }
            if r.users.len() > MAX_PRINCIPALS || r.groups.len() > MAX_PRINCIPALS {
                return Err(format!(
                    "a restriction lists more than {MAX_PRINCIPALS} users or groups"
                ));
            }
        }
        Ok(())
    }
}

/// A Bitbucket branch pattern compiled: `*` is any run of characters but `/`,
/// everything else matches itself.
#[derive(Debug, Clone)]
pub struct BitbucketPattern(GlobMatcher);

impl BitbucketPattern {
    /// Compiles `p`; `None` for an empty pattern.
    pub fn new(p: &str) -> Option<Self> {
        if p.is_empty() {
            return None;
        }
        let mut glob = String::with_capacity(p.len() + 8);
        for c in p.chars() {
            match c {
                // A run of `*` is one `*` (each matches any run): globset
                // would read a whole-segment `**` as any number of segments,
                // none included (`**/main` matching `main`).
                '*' if glob.ends_with('*') => {}
                '*' => glob.push('*'),
                '?' | '[' | ']' | '{' | '}' | '\\' => {
                    glob.push('\\');
                    glob.push(c);
                }
                c => glob.push(c),
            }
        }
        let g = GlobBuilder::new(&glob)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .ok()?;
        Some(Self(g.compile_matcher()))
    }

    /// Whether `branch` matches.
    pub fn is_match(&self, branch: &str) -> bool {
        self.0.is_match(branch)
    }
}

/// How far ahead of the service's clock a `read_at` may be (clock skew).
pub const FUTURE_SKEW: Duration = Duration::from_secs(300);

/// A restriction as the service checks it.
#[derive(Debug, Clone)]
struct Rule {
    kind: Kind,
    /// `None`: unresolved; matches no branch.
    pattern: Option<BitbucketPattern>,
    value: u64,
    /// `push` and `restrict_merges`: the users and groups exempt, as
    /// `name (id)`.
    who: Vec<String>,
}

/// The kinds that protection rests on; others are kept in the file only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Push,
    Force,
    Approvals,
    EnforceMergeChecks,
    RestrictMerges,
    Other,
}

/// Who may push to or merge into a branch, as the inventory shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Who {
    /// Exempt from every matching `push` restriction (`None`: no `push`
    /// restriction matches: whoever has write access).
    pub push: Option<Vec<String>>,
    /// Exempt from every matching `restrict_merges` restriction (`None`:
    /// whoever has write access).
    pub merge: Option<Vec<String>>,
}

/// A repository's protections, compiled for checks.
#[derive(Debug, Clone)]
pub struct Compiled {
    read_at: SystemTime,
    /// `None`: the restrictions are unknown.
    rules: Option<Vec<Rule>>,
    /// Environment UUID and its restrictions, sorted.
    environments: Vec<(BbUuid, bool)>,
}

/// What the inventory shows of one branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchFacts {
    /// Nothing usable: no record, unreadable restrictions, or older than the
    /// maximum age.
    Unknown(Why),
    /// Read and fresh.
    Known {
        /// A `push` and a `force` restriction match.
        protected: bool,
        /// The highest `require_approvals_to_merge` that matches, when an
        /// `enforce_merge_checks` restriction also matches; 0 otherwise.
        approvals: u64,
    },
}

/// Why a protection is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// The inventory records no protections for the repository.
    NotRead,
    /// Bitbucket refused them (a missing scope, most often).
    Unreadable,
    /// Read longer ago than `[protections] max_age_hours`.
    Stale,
}

impl Why {
    /// A phrase for messages.
    pub fn phrase(self) -> &'static str {
        match self {
            Self::NotRead => "not recorded in the inventory",
            Self::Unreadable => "unknown (Bitbucket did not show them to the inventory)",
            Self::Stale => "older than [protections] max_age_hours",
        }
    }
}

impl Compiled {
    /// Compiles a record and the restrictions of its repository's environments.
    pub fn new(p: &Protections, environments: &[(BbUuid, bool)]) -> Self {
        let rules = p.branch_restrictions.as_ref().map(|list| {
            list.iter()
                .map(|r| Rule {
                    kind: match r.kind.as_str() {
                        "push" => Kind::Push,
                        "force" => Kind::Force,
                        "require_approvals_to_merge" => Kind::Approvals,
                        "enforce_merge_checks" => Kind::EnforceMergeChecks,
                        "restrict_merges" => Kind::RestrictMerges,
                        _ => Kind::Other,
                    },
                    pattern: r.pattern.as_deref().and_then(BitbucketPattern::new),
                    value: r.value.unwrap_or_default(),
                    who: r
                        .users
                        .iter()
                        .chain(&r.groups)
                        .map(|p| format!("{} ({})", p.name, p.id))
                        .collect(),
                })
                .filter(|r| r.kind != Kind::Other)
                .collect()
        });
        let mut environments = environments.to_vec();
        environments.sort();
        Self {
            // Validated before: an unparseable time counts as never read.
            read_at: parse_rfc3339(&p.read_at).unwrap_or(SystemTime::UNIX_EPOCH),
            rules,
            environments,
        }
    }

    fn fresh(&self, now: SystemTime, max_age: Duration) -> bool {
        // A record from the future (beyond clock skew) would stay fresh for
        // as long as it is ahead: it counts as stale.
        let ahead = self.read_at.duration_since(now).unwrap_or_default();
        self.read_at > SystemTime::UNIX_EPOCH
            && ahead <= FUTURE_SKEW
            && now.duration_since(self.read_at).unwrap_or_default() <= max_age
    }

    /// What the record shows of `branch` at `now`.
    pub fn branch(&self, branch: &str, now: SystemTime, max_age: Duration) -> BranchFacts {
        if !self.fresh(now, max_age) {
            return BranchFacts::Unknown(Why::Stale);
        }
        let Some(rules) = &self.rules else {
            return BranchFacts::Unknown(Why::Unreadable);
        };
        let matching = |k: Kind| {
            rules.iter().filter(move |r| {
                r.kind == k && r.pattern.as_ref().is_some_and(|p| p.is_match(branch))
            })
        };
        let protected =
            matching(Kind::Push).next().is_some() && matching(Kind::Force).next().is_some();
        let enforced = matching(Kind::EnforceMergeChecks).next().is_some();
        let approvals = if enforced {
            matching(Kind::Approvals)
                .map(|r| r.value)
                .max()
                .unwrap_or(0)
        } else {
            0
        };
        BranchFacts::Known {
            protected,
            approvals,
        }
    }

    /// Who may push to and merge into `branch` (Bitbucket: where rules
    /// overlap, deny wins, so only those every matching rule exempts); `None`
    /// when the restrictions are unknown or stale.
    pub fn who(&self, branch: &str, now: SystemTime, max_age: Duration) -> Option<Who> {
        if !self.fresh(now, max_age) {
            return None;
        }
        let rules = self.rules.as_ref()?;
        let exempt = |k: Kind| {
            let mut matching = rules
                .iter()
                .filter(|r| r.kind == k && r.pattern.as_ref().is_some_and(|p| p.is_match(branch)));
            let first = matching.next()?;
            let mut who: Vec<String> = first.who.clone();
            for r in matching {
                who.retain(|w| r.who.contains(w));
            }
            who.sort();
            Some(who)
        };
        Some(Who {
            push: exempt(Kind::Push),
            merge: exempt(Kind::RestrictMerges),
        })
    }

    /// Whether environment `env` is admin-only at `now`: `Err` when unknown.
    pub fn admin_only(
        &self,
        env: &BbUuid,
        now: SystemTime,
        max_age: Duration,
    ) -> Result<bool, Why> {
        if !self.fresh(now, max_age) {
            return Err(Why::Stale);
        }
        match self.environments.binary_search_by_key(env, |(u, _)| *u) {
            Ok(i) => Ok(self.environments.get(i).is_some_and(|(_, a)| *a)),
            Err(_) => Err(Why::NotRead),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(kind: &str, pattern: &str, value: Option<u64>) -> BranchRestriction {
        BranchRestriction {
            kind: kind.into(),
            pattern: (!pattern.is_empty()).then(|| pattern.to_string()),
            branch_type: None,
            value,
            users: vec![],
            groups: vec![],
        }
    }

    fn record(rules: Vec<BranchRestriction>, read_at: SystemTime) -> Protections {
        Protections {
            read_at: rfc3339(read_at),
            branch_restrictions: Some(rules),
            unknown: None,
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn protected_needs_push_and_force_matching_the_branch() {
        let now = SystemTime::now();
        let both = Compiled::new(
            &record(
                vec![rule("push", "main", None), rule("force", "ma*", None)],
                now,
            ),
            &[],
        );
        let known = |c: &Compiled, b: &str| c.branch(b, now, DAY);
        assert_eq!(
            known(&both, "main"),
            BranchFacts::Known {
                protected: true,
                approvals: 0
            }
        );
        assert_eq!(
            known(&both, "feature/x"),
            BranchFacts::Known {
                protected: false,
                approvals: 0
            }
        );
        let push_only = Compiled::new(&record(vec![rule("push", "main", None)], now), &[]);
        assert_eq!(
            known(&push_only, "main"),
            BranchFacts::Known {
                protected: false,
                approvals: 0
            }
        );
        let unresolved = Compiled::new(
            &record(
                vec![rule("push", "", None), rule("force", "main", None)],
                now,
            ),
            &[],
        );
        assert_eq!(
            known(&unresolved, "main"),
            BranchFacts::Known {
                protected: false,
                approvals: 0
            }
        );
    }

    #[test]
    fn approvals_count_only_with_enforced_merge_checks() {
        let now = SystemTime::now();
        let warn_only = Compiled::new(
            &record(
                vec![rule("require_approvals_to_merge", "main", Some(2))],
                now,
            ),
            &[],
        );
        assert_eq!(
            warn_only.branch("main", now, DAY),
            BranchFacts::Known {
                protected: false,
                approvals: 0
            }
        );
        let enforced = Compiled::new(
            &record(
                vec![
                    rule("require_approvals_to_merge", "main", Some(1)),
                    rule("require_approvals_to_merge", "*", Some(3)),
                    rule("enforce_merge_checks", "main", None),
                ],
                now,
            ),
            &[],
        );
        assert_eq!(
            enforced.branch("main", now, DAY),
            BranchFacts::Known {
                protected: false,
                approvals: 3
            }
        );
        assert_eq!(
            enforced.branch("dev", now, DAY),
            BranchFacts::Known {
                protected: false,
                approvals: 0
            }
        );
    }

    #[test]
    fn stale_unreadable_and_future_records() {
        let now = SystemTime::now();
        let old = Compiled::new(
            &record(
                vec![rule("push", "main", None), rule("force", "main", None)],
                now - 2 * DAY,
            ),
            &[],
        );
        assert_eq!(
            old.branch("main", now, DAY),
            BranchFacts::Unknown(Why::Stale)
        );
        let unreadable = Compiled::new(
            &Protections {
                read_at: rfc3339(now),
                branch_restrictions: None,
                unknown: Some("HTTP 403".into()),
            },
            &[],
        );
        assert_eq!(
            unreadable.branch("main", now, DAY),
            BranchFacts::Unknown(Why::Unreadable)
        );
        let rules = || vec![rule("push", "main", None), rule("force", "main", None)];
        let skewed = Compiled::new(&record(rules(), now + Duration::from_secs(60)), &[]);
        assert_eq!(
            skewed.branch("main", now, DAY),
            BranchFacts::Known {
                protected: true,
                approvals: 0
            }
        );
        let ahead = Compiled::new(&record(rules(), now + 9 * DAY), &[]);
        assert_eq!(
            ahead.branch("main", now, DAY),
            BranchFacts::Unknown(Why::Stale),
            "a future record never stays fresh"
        );
    }

    #[test]
    fn star_matches_a_run_without_slash_and_nothing_else_is_syntax() {
        let p = |s: &str| BitbucketPattern::new(s).unwrap();
        assert!(p("release/*").is_match("release/1.0"));
        assert!(!p("release/*").is_match("release/1.0/hotfix"));
        assert!(p("foo*").is_match("foo") && p("foo*").is_match("foobar"));
        assert!(!p("foo*").is_match("barfoo"));
        assert!(p("a?[b]{c}").is_match("a?[b]{c}"));
        // `**` is `*`: never zero segments, never across `/`.
        for (pattern, branch) in [
            ("**/main", "main"),
            ("a/**/b", "a/b"),
            ("**", "feature/x"),
            ("release/**", "release/1.0/hotfix"),
        ] {
            assert!(!p(pattern).is_match(branch), "{pattern} matched {branch}");
        }
        assert!(p("**/main").is_match("x/main") && p("release/**").is_match("release/1.0"));
        assert!(
            p("\\*").is_match("\\x"),
            "a backslash is itself, then a star"
        );
        assert!(p("\\**").is_match("\\x") && !p("\\**").is_match("\\x/y"));
        assert!(!p("a?").is_match("ab"));
        assert!(BitbucketPattern::new("").is_none());
    }

    #[test]
    fn environments_are_admin_only_or_unknown() {
        let now = SystemTime::now();
        let e = |n: u8| {
            BbUuid::parse_lenient(&format!("00000000-0000-4000-8000-0000000000{n:02x}")).unwrap()
        };
        let c = Compiled::new(&record(vec![], now), &[(e(2), false), (e(1), true)]);
        assert_eq!(c.admin_only(&e(1), now, DAY), Ok(true));
        assert_eq!(c.admin_only(&e(2), now, DAY), Ok(false));
        assert_eq!(c.admin_only(&e(3), now, DAY), Err(Why::NotRead));
        assert_eq!(c.admin_only(&e(1), now + 2 * DAY, DAY), Err(Why::Stale));
    }

    #[test]
    fn times_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(rfc3339(t), "2026-11-30T00:53:20Z");
        assert!(parse_rfc3339("yesterday").is_none());
    }
}
