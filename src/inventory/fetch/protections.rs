//! Reading the branch and deployment protections of the repositories some
//! policy concerns (issue #22; shapes in [`crate::inventory::protections`]).
//!
//! Per repository: its environments again (their restrictions, read at the
//! same time as the branch restrictions), `…/branch-restrictions` (all pages),
//! and `…/branching-model` when a restriction matches by branching model. The
//! same pagination, bounds, retries and rate-limit spacing as the repository
//! list. A 403 on the branch restrictions (the token lacks
//! `repository:admin`; API tokens `admin:repository:bitbucket`) records them
//! as unknown, and the following repositories are not asked again in that
//! run (each would spend a request of the hour's budget on the same refusal).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use super::{uuid, Client, FetchError, RawBranchingModel, RawEnvironment, RawRestriction};
use crate::domain::BbUuid;
use crate::inventory::protections::{rfc3339, MAX_PRINCIPALS, MAX_RESTRICTIONS};

/// Longest branch pattern recorded (longer: recorded without, matching nothing).
const MAX_PATTERN_BYTES: usize = 1024;
use crate::inventory::state::{ProtectionsEntry, State};
use crate::inventory::{
    BranchRestriction, Environment, EnvironmentRestrictions, Principal, Protections,
    WorkspaceInventory,
};

/// The scope branch restrictions need, as the command names it.
pub const ADMIN_SCOPE: &str = "`repository:admin` (API tokens: `admin:repository:bitbucket`)";

/// What a protections run did.
#[derive(Debug, Default)]
pub struct ProtectionsRead {
    /// Repositories whose protections were read now.
    pub read: usize,
    /// Repositories whose protections were reused from the state.
    pub reused: usize,
    /// Repositories whose branch restrictions are unknown.
    pub unknown: usize,
    /// The first refusal of the branch restrictions (the scope is missing),
    /// naming the repository.
    pub refused: Option<String>,
}

impl Client {
    /// Reads the protections of the repositories of `inv` in `concerned`
    /// into it, reusing those `state` holds younger than `reuse_within` for
    /// the same environments; `state` keeps what was read (pruned to
    /// `concerned`), handed to `checkpoint` as the run goes.
    ///
    /// # Errors
    /// [`FetchError`] (a 403 on branch restrictions is not one: they are
    /// recorded as unknown); `state` then holds what was read so far.
    pub async fn protections(
        &self,
        workspace: &str,
        inv: &mut WorkspaceInventory,
        concerned: &BTreeSet<BbUuid>,
        state: &mut State,
        reuse_within: Duration,
        checkpoint: &mut dyn FnMut(&State),
    ) -> Result<ProtectionsRead, FetchError> {
        let now = SystemTime::now();
        let mut out = ProtectionsRead::default();
        state.protections.retain(|u, _| concerned.contains(u));
        for repo in inv
            .repositories
            .iter_mut()
            .filter(|r| concerned.contains(&r.uuid))
        {
            let envs: BTreeSet<BbUuid> = repo.environments.iter().map(|e| e.uuid).collect();
            let kept = state
                .protections
                .get(&repo.uuid)
                .filter(|k| k.reusable(now, reuse_within, &envs));
            let entry = match kept {
                Some(k) => {
                    out.reused += 1;
                    k.clone()
                }
                None => {
                    let e = self
                        .read_one(workspace, &repo.uuid, &repo.full_name, &mut out.refused)
                        .await?;
                    state.protections.insert(repo.uuid, e.clone());
                    out.read += 1;
                    if out.read % self.limits.checkpoint_every.max(1) == 0 {
                        checkpoint(state);
                    }
                    e
                }
            };
            if entry.protections.branch_restrictions.is_none() {
                out.unknown += 1;
            }
            repo.protections = Some(entry.protections);
            repo.environments = entry.environments;
        }
        inv.normalise();
        crate::inventory::Inventory::new(vec![inv.clone()]).map_err(|reason| {
            FetchError::Malformed {
                url: self.api.to_string(),
                reason,
            }
        })?;
        Ok(out)
    }

    /// One repository's environments and branch restrictions, read now.
    async fn read_one(
        &self,
        workspace: &str,
        repo: &BbUuid,
        full_name: &str,
        refused: &mut Option<String>,
    ) -> Result<ProtectionsEntry, FetchError> {
        let read_at = rfc3339(SystemTime::now());
        let environments = self.restricted_environments(workspace, repo).await?;
        if let Some(first) = refused.as_deref() {
            let why = format!(
                "not read: Bitbucket refused the branch restrictions of {first} in this run (the token needs {ADMIN_SCOPE})"
            );
            return Ok(unknown(read_at, why, environments));
        }
        let url = self.url(&[
            "repositories",
            workspace,
            &repo.braced(),
            "branch-restrictions",
        ])?;
        let raw = match self.list::<RawRestriction>(url, true).await {
            Ok(r) => r,
            Err(FetchError::Unauthorized {
                status: 403,
                missing_scope,
                ..
            }) => {
                let why = if missing_scope {
                    // Every repository would be refused alike.
                    *refused = Some(full_name.to_string());
                    format!("HTTP 403: the token lacks {ADMIN_SCOPE}")
                } else {
                    "HTTP 403: the user of the token is not an admin of this repository".to_string()
                };
                return Ok(unknown(read_at, why, environments));
            }
            // Deleted since the listing, or hidden: nothing is proven.
            Err(FetchError::Status { status: 404, .. }) => {
                let why = "HTTP 404: Bitbucket does not show the branch restrictions".to_string();
                return Ok(unknown(read_at, why, environments));
            }
            // This repository's answer is unusable (too large, not the
            // documented shape, a `next` link elsewhere, never followed): its
            // protections are unknown; the other repositories are still read.
            Err(e @ (FetchError::Malformed { .. } | FetchError::TooManyPages { .. })) => {
                let why = match e {
                    FetchError::TooManyPages { max, .. } => {
                        format!("more than {max} pages of branch restrictions")
                    }
                    FetchError::Malformed { reason, .. } => {
                        shown(&format!("not recorded: {reason}"))
                    }
                    _ => String::new(),
                };
                return Ok(unknown(read_at, why, environments));
            }
            Err(e) => return Err(e),
        };
        // One repository's excess is that repository's unknown, not the
        // whole workspace's failed refresh.
        if raw.len() > MAX_RESTRICTIONS {
            let why = format!("more than {MAX_RESTRICTIONS} branch restrictions: not recorded");
            return Ok(unknown(read_at, why, environments));
        }
        let model = if raw
            .iter()
            .any(|r| r.branch_match_kind.as_deref() == Some("branching_model"))
        {
            self.branching_model(workspace, repo).await?
        } else {
            None
        };
        let restrictions = recorded(raw, model.as_ref());
        Ok(ProtectionsEntry {
            protections: Protections {
                read_at,
                branch_restrictions: Some(restrictions),
                unknown: None,
            },
            environments,
        })
    }

    /// The environments with their restrictions.
    async fn restricted_environments(
        &self,
        workspace: &str,
        repo: &BbUuid,
    ) -> Result<Vec<Environment>, FetchError> {
        let url = self.url(&["repositories", workspace, &repo.braced(), "environments"])?;
        let mut out = Vec::new();
        for e in self.list::<RawEnvironment>(url.clone(), false).await? {
            out.push(Environment {
                uuid: uuid(&url, &e.uuid)?,
                name: e.name,
                restrictions: Some(EnvironmentRestrictions {
                    // Absent reads as not admin-only: a doubt never protects.
                    admin_only: e.restrictions.and_then(|r| r.admin_only).unwrap_or(false),
                    deployment_gate_enabled: e.deployment_gate_enabled.unwrap_or(false),
                    environment_lock_enabled: e.environment_lock_enabled.unwrap_or(false),
                    deploy_branches: Default::default(),
                }),
            });
        }
        out.sort_by_key(|e| e.uuid);
        Ok(out)
    }

    /// The branching model; `None` when Bitbucket does not show it (a 403 or
    /// 404): its restrictions then stay unresolved and prove nothing.
    async fn branching_model(
        &self,
        workspace: &str,
        repo: &BbUuid,
    ) -> Result<Option<RawBranchingModel>, FetchError> {
        let url = self.url(&["repositories", workspace, &repo.braced(), "branching-model"])?;
        match self.get_json::<RawBranchingModel>(&url).await {
            Ok(m) => Ok(Some(m)),
            Err(FetchError::Unauthorized { .. } | FetchError::Status { status: 404, .. }) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// The restrictions as recorded, sorted by kind, pattern, branch type, value.
fn recorded(raw: Vec<RawRestriction>, model: Option<&RawBranchingModel>) -> Vec<BranchRestriction> {
    let mut out: Vec<BranchRestriction> = raw.into_iter().map(|r| restriction(r, model)).collect();
    out.sort_by(|a, b| {
        (&a.kind, &a.pattern, &a.branch_type, a.value).cmp(&(
            &b.kind,
            &b.pattern,
            &b.branch_type,
            b.value,
        ))
    });
    out
}

/// For the fuzz target: one page of `…/branch-restrictions` read as
/// `get_json` reads it and recorded as [`Client::protections`] records it
/// (`None` where the run records the repository as unknown).
#[cfg(fuzzing)]
pub(crate) fn restrictions_page(body: &[u8]) -> Option<Vec<BranchRestriction>> {
    let page: super::Page<RawRestriction> = serde_json::from_slice(body).ok()?;
    if page.values.len() > MAX_RESTRICTIONS {
        return None;
    }
    Some(recorded(page.values, None))
}

fn unknown(read_at: String, why: String, environments: Vec<Environment>) -> ProtectionsEntry {
    ProtectionsEntry {
        protections: Protections {
            read_at,
            branch_restrictions: None,
            unknown: Some(why),
        },
        environments,
    }
}

/// Bitbucket's restriction as recorded: the branching model's branch type
/// resolved to a pattern (a branch name, or a prefix and `*`), names made safe
/// to show.
fn restriction(r: RawRestriction, model: Option<&RawBranchingModel>) -> BranchRestriction {
    let by_model = r.branch_match_kind.as_deref() == Some("branching_model");
    let pattern = if by_model {
        r.branch_type.as_deref().and_then(|t| resolve(t, model?))
    } else {
        r.pattern.filter(|p| !p.is_empty())
    };
    let users = principals(r.users.iter().map(|u| (&u.uuid, &u.display_name)));
    let groups = principals(r.groups.iter().map(|g| (&g.slug, &g.name)));
    BranchRestriction {
        kind: shown(&r.kind),
        // A pattern is recorded exactly or not at all (matching nothing):
        // cut or with a character replaced, it could match more.
        pattern: pattern
            .filter(|p| p.len() <= MAX_PATTERN_BYTES && !p.chars().any(crate::domain::deceptive)),
        branch_type: if by_model {
            r.branch_type.map(|t| shown(&t))
        } else {
            None
        },
        value: r.value,
        users,
        groups,
    }
}

/// Users (UUID, display name) or groups (slug, name), bounded, safe to show,
/// sorted; past [`MAX_PRINCIPALS`], one entry says how many more there are.
fn principals<'a>(v: impl ExactSizeIterator<Item = (&'a String, &'a String)>) -> Vec<Principal> {
    let total = v.len();
    let keep = if total > MAX_PRINCIPALS {
        MAX_PRINCIPALS - 1
    } else {
        total
    };
    let mut out: Vec<Principal> = v
        .take(keep)
        .map(|(id, name)| Principal {
            id: shown(id),
            name: shown(name),
        })
        .collect();
    out.sort();
    if total > out.len() {
        out.push(Principal {
            id: String::new(),
            name: format!("… and {} more, not recorded", total - out.len()),
        });
    }
    out
}

/// The pattern a branch type stands for in the model: the development or
/// production branch (when it exists), or a type's prefix followed by `*`.
fn resolve(branch_type: &str, m: &RawBranchingModel) -> Option<String> {
    // A branch name or prefix holding `*` would read as a pattern: not guessed at.
    let plain = |s: &str| !s.is_empty() && !s.contains('*');
    match branch_type {
        "development" | "production" => {
            let side = if branch_type == "development" {
                &m.development
            } else {
                &m.production
            };
            let name = &side.as_ref()?.branch.as_ref()?.name;
            plain(name).then(|| name.clone())
        }
        kind => {
            let t = m.branch_types.iter().find(|t| t.kind == kind)?;
            plain(&t.prefix).then(|| format!("{}*", t.prefix))
        }
    }
}

/// A name as the inventory may show it: control, invisible and bidi
/// characters replaced (people choose their display names).
fn shown(s: &str) -> String {
    s.chars()
        .take(256)
        .map(|c| {
            if crate::domain::deceptive(c) {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> RawBranchingModel {
        serde_json::from_value(serde_json::json!({
            "type": "branching_model",
            "development": {"name": "develop", "use_mainbranch": false, "branch": {"type": "branch", "name": "develop"}},
            "production": {"name": "main", "use_mainbranch": true},
            "branch_types": [{"kind": "release", "prefix": "release/"}, {"kind": "feature", "prefix": "feat*"}]
        }))
        .unwrap()
    }

    #[test]
    fn the_branching_model_resolves_what_exists_and_nothing_else() {
        let m = model();
        assert_eq!(resolve("development", &m).as_deref(), Some("develop"));
        assert_eq!(
            resolve("production", &m),
            None,
            "no branch object: the branch does not exist"
        );
        assert_eq!(resolve("release", &m).as_deref(), Some("release/*"));
        assert_eq!(
            resolve("feature", &m),
            None,
            "a prefix holding * is not guessed at"
        );
        assert_eq!(
            resolve("hotfix", &m),
            None,
            "a type the model does not enable"
        );
    }

    #[test]
    fn restrictions_are_recorded_with_safe_names() {
        let raw: RawRestriction = serde_json::from_value(serde_json::json!({
            "type": "branchrestriction", "id": 1, "kind": "push", "branch_match_kind": "glob",
            "pattern": "main", "value": null,
            "users": [{"type": "user", "uuid": "{u}", "display_name": "Ann\u{202E}evil", "account_id": "x"}],
            "groups": [{"slug": "release-managers", "name": "Release managers"}],
            "links": {}
        }))
        .unwrap();
        let r = restriction(raw, None);
        assert_eq!(r.pattern.as_deref(), Some("main"));
        assert_eq!(r.users[0].name, "Ann\u{FFFD}evil");
        assert_eq!(r.groups[0].id, "release-managers");
        let by_model: RawRestriction = serde_json::from_value(serde_json::json!({
            "kind": "force", "branch_match_kind": "branching_model", "branch_type": "release", "pattern": ""
        }))
        .unwrap();
        let r = restriction(by_model, Some(&model()));
        // A pattern is recorded exactly or not at all: cut or with a
        // character replaced, it could match more than Bitbucket's.
        for pattern in [
            format!("{}*-locked", "r".repeat(1100)),
            "rel\u{200B}*".to_string(),
        ] {
            let raw: RawRestriction = serde_json::from_value(serde_json::json!({
                "kind": "push", "branch_match_kind": "glob", "pattern": pattern
            }))
            .unwrap();
            assert_eq!(restriction(raw, None).pattern, None);
        }
        assert_eq!(
            (r.pattern.as_deref(), r.branch_type.as_deref()),
            (Some("release/*"), Some("release"))
        );
    }
}
