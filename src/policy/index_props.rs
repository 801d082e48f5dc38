//! The guard of the decision index (issue #20 §1): for generated policy sets
//! and generated tokens, the indexed evaluation decides exactly as a plain scan
//! of every policy: the same outcome (deny kind and details, the policy a
//! refusal names, or the granted policy, client, scopes and lifetime), with or
//! without a trace, and the same `/grants` offers.

use proptest::prelude::*;

use super::*;
use crate::domain::Scopes;
use crate::inventory::{Environment, Inventory, Project, Repository, WorkspaceInventory};

const WORKSPACES: [&str; 2] = ["acme", "globex"];
const REPOS_PER_WORKSPACE: usize = 4;
const AUDIENCES: [&str; 3] = ["artifact-api", "deploy-api", "payroll-api"];
const SCOPES: [&str; 3] = ["a:read", "a:write", "d:prod"];
const MARKERS: [&str; 2] = [
    "https://sts.example.test/agent",
    "https://sts.example.test/deploy",
];
const BRANCHES: [&str; 5] = ["main", "release/*", "release/**", "feature/x", "*"];
const TOKEN_BRANCHES: [&str; 4] = ["main", "release/1.2", "release/2026/q4", "feature/x"];
const ENVIRONMENTS: [&str; 2] = ["Production", "Staging"];

/// UUID number `n` of kind `k` (0 workspace, 1 repository, 2 project, 3 environment).
fn id(k: u8, n: usize) -> BbUuid {
    BbUuid::parse_lenient(&format!("0000000{k}-0000-4000-8000-{n:012x}")).unwrap()
}

fn ws_uuid(w: usize) -> BbUuid {
    id(0, w)
}
fn repo_uuid(w: usize, r: usize) -> BbUuid {
    id(1, w * 16 + r)
}
fn env_uuid(w: usize, r: usize, e: usize) -> BbUuid {
    id(3, (w * 16 + r) * 4 + e)
}

/// Two workspaces of four repositories each (`svc-0..3`), in projects `P1`
/// (svc-0, svc-1) and `P2`, each with a Production and a Staging environment.
/// Workspace 2 and repository 4 exist in tokens only.
fn inventory() -> Inventory {
    let mut ws: Vec<WorkspaceInventory> = (0..WORKSPACES.len())
        .map(|w| WorkspaceInventory {
            workspace: WORKSPACES[w].into(),
            workspace_uuid: ws_uuid(w),
            repositories: (0..REPOS_PER_WORKSPACE)
                .map(|r| Repository {
                    uuid: repo_uuid(w, r),
                    full_name: format!("{}/svc-{r}", WORKSPACES[w]),
                    protections: None,
                    project: Some(Project {
                        key: if r < 2 { "P1" } else { "P2" }.into(),
                        uuid: id(2, w * 2 + usize::from(r >= 2)),
                    }),
                    environments: (0..2)
                        .map(|e| Environment {
                            uuid: env_uuid(w, r, e),
                            name: ENVIRONMENTS[e].into(),
                            restrictions: None,
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    for w in &mut ws {
        for (r, repo) in w.repositories.iter_mut().enumerate() {
            protect(w.workspace == "globex", r, repo);
        }
    }
    Inventory::new(ws).unwrap()
}

/// When the generated requests are decided.
fn now() -> std::time::SystemTime {
    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000)
}

/// Protections: svc-0 `main` protected with 2 approvals enforced and an
/// admin-only Production; svc-1 `release/*` protected, Production not
/// admin-only; svc-2 unknown (a 403); svc-3 none recorded. In `globex` they
/// were read 100 days ago (stale), in `acme` an hour ago.
fn protect(stale: bool, r: usize, repo: &mut Repository) {
    use crate::inventory::protections::rfc3339;
    use crate::inventory::{BranchRestriction, EnvironmentRestrictions, Protections};
    let age = std::time::Duration::from_secs(if stale { 100 * 86_400 } else { 3_600 });
    let rule = |kind: &str, pattern: &str, value: Option<u64>| BranchRestriction {
        kind: kind.into(),
        pattern: Some(pattern.into()),
        branch_type: None,
        value,
        users: vec![],
        groups: vec![],
    };
    let restrictions = match r {
        0 => Some(vec![
            rule("push", "main", None),
            rule("force", "main", None),
            rule("require_approvals_to_merge", "main", Some(2)),
            rule("enforce_merge_checks", "main", None),
        ]),
        1 => Some(vec![
            rule("push", "release/*", None),
            rule("force", "release/*", None),
        ]),
        2 => None,
        _ => return,
    };
    repo.protections = Some(Protections {
        read_at: rfc3339(now() - age),
        unknown: restrictions.is_none().then(|| "HTTP 403".to_string()),
        branch_restrictions: restrictions,
    });
    for (e, env) in repo.environments.iter_mut().enumerate() {
        env.restrictions = Some(EnvironmentRestrictions {
            admin_only: r == 0 && e == 0,
            deployment_gate_enabled: false,
            environment_lock_enabled: false,
            deploy_branches: Default::default(),
        });
    }
}

/// A UUID written braced or bare, as policies may.
fn written(u: BbUuid, braced: bool) -> String {
    if braced {
        format!("\"{}\"", u.braced())
    } else {
        format!("\"{}\"", u.braced().trim_matches(['{', '}']))
    }
}

/// One `when:` condition line, by kind and a value chooser.
fn condition(kind: u8, v: &[usize], braced: bool) -> String {
    let pick = |i: usize, n: usize| i % n;
    let values =
        |f: &dyn Fn(usize) -> String| v.iter().map(|i| f(*i)).collect::<Vec<_>>().join(", ");
    match kind {
        0 => format!(
            "  workspace: [{}]\n",
            values(&|i| ["acme", "globex", "initech"][pick(i, 3)].to_string())
        ),
        1 => format!(
            "  workspaceUuid: [{}]\n",
            values(&|i| written(ws_uuid(pick(i, 3)), braced))
        ),
        2 => format!(
            "  repository: [{}]\n",
            values(&|i| {
                let w = WORKSPACES[pick(i / 5, 2)];
                match pick(i, 7) {
                    r @ 0..=3 => format!("\"{w}/svc-{r}\""),
                    4 => format!("\"{w}/svc-*\""),
                    5 => "\"*/svc-1\"".to_string(),
                    _ => format!("\"{w}/nope\""),
                }
            })
        ),
        3 => format!(
            "  repositoryUuid: [{}]\n",
            values(&|i| written(repo_uuid(pick(i / 5, 2), pick(i, 5)), braced))
        ),
        4 => format!(
            "  project: [{}]\n",
            values(&|i| ["P1", "P2", "P9"][pick(i, 3)].to_string())
        ),
        5 => format!(
            "  deploymentEnvironment: [{}]\n",
            values(&|i| ENVIRONMENTS[pick(i, 2)].to_string())
        ),
        6 => format!(
            "  deploymentEnvironmentUuid: [{}]\n",
            values(&|i| written(env_uuid(pick(i / 8, 2), pick(i / 2, 4), pick(i, 2)), braced))
        ),
        7 => format!(
            "  branchName: [{}]\n",
            values(&|i| format!("\"{}\"", BRANCHES[pick(i, BRANCHES.len())]))
        ),
        _ => format!(
            "  aud: [{}]\n",
            values(&|i| format!("\"{}\"", MARKERS[pick(i, 2)]))
        ),
    }
}

fn when() -> impl Strategy<Value = String> {
    (
        proptest::sample::subsequence((0u8..9).collect::<Vec<_>>(), 1..=4),
        proptest::collection::vec(proptest::collection::vec(0usize..40, 1..3), 4),
        any::<bool>(),
    )
        .prop_map(|(kinds, values, braced)| {
            kinds
                .iter()
                .enumerate()
                .map(|(i, k)| condition(*k, &values[i % values.len()], braced))
                .collect()
        })
}

/// A policy file's text: an allow (grant, sometimes an identity) or a deny
/// (sometimes for every audience, sometimes for scopes only).
fn policy_text() -> impl Strategy<Value = String> {
    (
        when(),
        any::<bool>(),
        0usize..2,
        proptest::collection::vec(0usize..3, 1..3),
        0usize..3,
        proptest::option::of(proptest::collection::vec(0usize..2, 1..3)),
        proptest::option::of(proptest::collection::vec(0usize..3, 1..3)),
        0usize..5,
    )
        .prop_map(|(when, allow, aud, scopes, extra, deny_auds, deny_scopes, require)| {
            if allow {
                let scopes: Vec<&str> = scopes.iter().map(|i| SCOPES[*i]).collect();
                let identity = match extra {
                    1 => "  identity: repository\n",
                    2 => "  identity: repository_environment\n",
                    _ => "",
                };
                let require = [
                    "",
                    "",
                    "  require: {branch: protected}\n",
                    "  require: {branch: protected, approvals: 2}\n",
                    "  require: {environment: admin_only}\n",
                ][require];
                format!(
                    "effect: allow\nwhen:\n{when}grant:\n  client: c\n  audience: {}\n  scopes: [{}]\n  default_scopes: [{}]\n  max_lifetime_seconds: {}\n{identity}{require}",
                    AUDIENCES[aud],
                    scopes.join(", "),
                    scopes[0],
                    [60, 120, 300][extra],
                )
            } else {
                let auds = deny_auds
                    .map(|v| {
                        let v: Vec<&str> = v.iter().map(|i| AUDIENCES[*i]).collect();
                        format!("audiences: [{}]\n", v.join(", "))
                    })
                    .unwrap_or_default();
                let scopes = deny_scopes
                    .map(|v| {
                        let v: Vec<&str> = v.iter().map(|i| SCOPES[*i]).collect();
                        format!("scopes: [{}]\n", v.join(", "))
                    })
                    .unwrap_or_default();
                format!("effect: deny\nwhen:\n{when}{auds}{scopes}")
            }
        })
}

/// Tokens of the inventory's repositories and of unknown ones (workspace 2,
/// repository 4), with or without an environment (sometimes another
/// repository's), branch and markers.
fn subject() -> impl Strategy<Value = Subject> {
    (
        0usize..3,
        0usize..5,
        proptest::option::of((0usize..4, 0usize..2)),
        any::<bool>(),
        proptest::option::of(0usize..TOKEN_BRANCHES.len()),
        proptest::sample::subsequence(MARKERS.to_vec(), 0..=2),
    )
        .prop_map(|(w, r, env, own_env, branch, markers)| Subject {
            workspace_uuid: ws_uuid(w),
            repository_uuid: repo_uuid(w % 2, r),
            deployment_environment_uuid: env
                .map(|(er, e)| env_uuid(w % 2, if own_env { r.min(3) } else { er }, e)),
            branch_name: branch.map(|b| TOKEN_BRANCHES[b].to_string()),
            aud: std::iter::once("https://sts.example.test")
                .chain(markers)
                .map(str::to_string)
                .collect(),
        })
}

fn set(texts: &[String], inv: &Inventory) -> PolicySet {
    PolicySet::from_policies(
        texts
            .iter()
            .enumerate()
            // names that do not resolve, and deny policies naming globs or
            // projects, do not compile: the set holds the others
            .filter_map(|(i, t)| compile_with(&format!("p{i:02}"), t, None, inv).ok())
            .collect(),
    )
    .with_inventory(std::sync::Arc::new(inv.clone()))
}

/// How many policies a trace names.
fn distinct(d: &Decision) -> usize {
    d.trace
        .iter()
        .map(|t| t.policy.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn the_index_decides_exactly_as_a_plain_scan(
        texts in proptest::collection::vec(policy_text(), 0..24),
        subjects in proptest::collection::vec(subject(), 1..6),
    ) {
        let inv = inventory();
        let set = set(&texts, &inv);
        for s in &subjects {
            for audience in AUDIENCES.iter().chain(["unknown-api"].iter()) {
                for mask in 0u8..8 {
                    let scopes: Scopes = (0..3).filter(|i| mask & (1 << i) != 0).map(|i| SCOPES[i]).collect();
                    let req = EvalRequest { subject: s, audience, scopes: &scopes, now: now() };
                    let plain = set.evaluate_unindexed(&req);
                    let indexed = set.evaluate(&req);
                    prop_assert_eq!(&indexed.outcome, &plain.outcome, "{:?} {} {:?}\n{:#?}", s, audience, scopes, texts);
                    prop_assert_eq!(&set.decide(&req), &plain.outcome);
                    prop_assert_eq!(plain.excluded, 0);
                    prop_assert_eq!(distinct(&plain), set.policies().len());
                    // Every policy is either in the indexed trace or excluded.
                    prop_assert_eq!(distinct(&indexed) + indexed.excluded, set.policies().len());
                }
            }
            prop_assert_eq!(set.offers(s, now()), set.offers_unindexed(s, now()));
        }
    }
}

/// Many policies of one repository each: a request considers its own
/// repository's policies and those without a repository condition only, and
/// the refusal still names the closest allow a plain scan names.
#[test]
fn a_request_considers_its_repository_and_the_residual_policies_only() {
    let inv = inventory();
    let mut texts = Vec::new();
    for w in WORKSPACES {
        for r in 0..REPOS_PER_WORKSPACE {
            texts.push(format!(
                "effect: allow\nwhen:\n  workspace: {w}\n  repository: {w}/svc-{r}\n  deploymentEnvironment: Production\n  branchName: main\ngrant: {{client: c, audience: deploy-api, scopes: [d:prod], default_scopes: [d:prod], max_lifetime_seconds: 60}}\n"
            ));
        }
    }
    texts.push("effect: deny\nwhen:\n  branchName: \"wip/*\"\n".into());
    let set = set(&texts, &inv);
    assert_eq!(set.policies().len(), 9);
    let s = Subject {
        workspace_uuid: ws_uuid(1),
        repository_uuid: repo_uuid(1, 2),
        deployment_environment_uuid: Some(env_uuid(1, 2, 0)),
        branch_name: Some("feature/x".into()),
        aud: vec![],
    };
    let req = EvalRequest {
        subject: &s,
        audience: "deploy-api",
        scopes: &Scopes::default(),
        now: std::time::SystemTime::now(),
    };
    let d = set.evaluate(&req);
    assert_eq!(d.excluded, 7, "{d:#?}");
    assert_eq!(d.trace.len(), 2, "{d:#?}");
    assert_eq!(
        d.outcome,
        Outcome::Deny {
            reason: DenyKind::BranchNotAllowed,
            policy: Some("p06".into())
        }
    );
    assert_eq!(set.evaluate_unindexed(&req).outcome, d.outcome);
    // Another workspace's token: every allow is left out; the refusal names
    // the first one, as the plain scan does.
    let other = Subject {
        workspace_uuid: ws_uuid(2),
        repository_uuid: id(1, 99),
        ..s.clone()
    };
    let req = EvalRequest {
        subject: &other,
        ..req
    };
    let d = set.evaluate(&req);
    assert_eq!(d.excluded, 8);
    assert_eq!(d.outcome, set.evaluate_unindexed(&req).outcome);
    assert_eq!(
        d.outcome,
        Outcome::Deny {
            reason: DenyKind::WorkspaceNotAllowed,
            policy: Some("p00".into())
        }
    );
}

/// The trace is bounded: a residual list of thousands of policies does not make
/// one decision's trace thousands of entries long.
#[test]
fn the_trace_is_bounded() {
    let texts: Vec<String> = (0..MAX_TRACE_ENTRIES + 10)
        .map(|_| format!("effect: allow\nwhen:\n  workspaceUuid: \"{}\"\n  branchName: main\ngrant: {{client: c, audience: a, scopes: [s], default_scopes: [s], max_lifetime_seconds: 60}}\n", ws_uuid(0)))
        .collect();
    let set = set(&texts, &Inventory::default());
    let s = Subject {
        workspace_uuid: ws_uuid(0),
        repository_uuid: repo_uuid(0, 0),
        deployment_environment_uuid: None,
        branch_name: Some("dev".into()),
        aud: vec![],
    };
    let d = set.evaluate(&EvalRequest {
        subject: &s,
        audience: "a",
        scopes: &Scopes::default(),
        now: std::time::SystemTime::now(),
    });
    assert_eq!(d.trace.len(), MAX_TRACE_ENTRIES);
    assert_eq!(d.omitted, 10);
    assert!(matches!(d.outcome, Outcome::Deny { .. }));
}

/// Requirements decide by what the inventory shows (issue #22): met, absent,
/// unknown, not read and stale, and an allow without a requirement still
/// granting what the one with an unmet requirement does not.
#[test]
fn requirements_decide_by_the_inventory() {
    use super::require::{Protection, Reason};
    use crate::inventory::protections::Why;
    let inv = inventory();
    let grant = |require: &str| {
        format!(
            "grant:\n  client: c\n  audience: deploy-api\n  scopes: [d:prod]\n  default_scopes: [d:prod]\n  max_lifetime_seconds: 60\n  require: {{{require}}}\n"
        )
    };
    let texts = vec![
        format!("effect: allow\nwhen:\n  workspace: [acme, globex]\n  branchName: [main, 'release/**']\n{}", grant("branch: protected, approvals: 2")),
        format!("effect: allow\nwhen:\n  workspace: [acme, globex]\n  branchName: 'release/**'\n{}", grant("branch: protected")),
        format!("effect: allow\nwhen:\n  workspace: acme\n  deploymentEnvironment: Production\n{}", grant("environment: admin_only")),
    ];
    let set = set(&texts, &inv);
    assert_eq!(set.policies().len(), 3, "{texts:#?}");
    let none = Scopes::default();
    let decide = |w: usize, r: usize, branch: Option<&str>, env: Option<usize>| {
        let s = Subject {
            workspace_uuid: ws_uuid(w),
            repository_uuid: repo_uuid(w, r),
            deployment_environment_uuid: env.map(|e| env_uuid(w, r, e)),
            branch_name: branch.map(str::to_string),
            aud: vec![],
        };
        set.decide(&EvalRequest {
            subject: &s,
            audience: "deploy-api",
            scopes: &none,
            now: now(),
        })
    };
    let missing = |o: Outcome| match o {
        Outcome::Deny {
            reason: DenyKind::ProtectionRequired { missing },
            ..
        } => missing
            .into_iter()
            .map(|m| (m.protection, m.reason))
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let allowed_by = |o: Outcome| match o {
        Outcome::Allow(g) => g.policy,
        other => panic!("{other:?}"),
    };
    assert_eq!(allowed_by(decide(0, 0, Some("main"), None)), "p00");
    assert_eq!(
        allowed_by(decide(0, 1, Some("release/1.2"), None)),
        "p01",
        "the second allow needs no approvals"
    );
    assert_eq!(
        missing(decide(0, 1, Some("release/a/b"), None)),
        vec![
            (Protection::ProtectedBranch, Reason::Absent),
            (Protection::Approvals { required: 2 }, Reason::Absent)
        ],
        "`*` of a restriction does not cross `/`"
    );
    assert_eq!(
        missing(decide(0, 1, Some("main"), None))[0],
        (Protection::ProtectedBranch, Reason::Absent)
    );
    assert_eq!(
        missing(decide(0, 2, Some("main"), None))[0],
        (
            Protection::ProtectedBranch,
            Reason::Unknown(Why::Unreadable)
        )
    );
    assert_eq!(
        missing(decide(0, 3, Some("main"), None))[0],
        (Protection::ProtectedBranch, Reason::Unknown(Why::NotRead))
    );
    assert_eq!(
        missing(decide(1, 0, Some("main"), None))[0],
        (Protection::ProtectedBranch, Reason::Unknown(Why::Stale))
    );
    assert_eq!(
        missing(decide(0, 1, None, Some(0)))[0],
        (Protection::AdminOnlyEnvironment, Reason::Absent)
    );
    assert_eq!(allowed_by(decide(0, 0, None, Some(0))), "p02");
    // Configured for every grant of the audience: the Production allow now
    // also needs a protected branch, which a tag build does not have.
    let mut rules = super::require::Rules::default();
    rules.audiences.insert(
        "deploy-api".into(),
        super::require::Requirement {
            branch_protected: true,
            ..Default::default()
        },
    );
    let set = set.with_rules(std::sync::Arc::new(rules));
    let s = Subject {
        workspace_uuid: ws_uuid(0),
        repository_uuid: repo_uuid(0, 0),
        deployment_environment_uuid: Some(env_uuid(0, 0, 0)),
        branch_name: None,
        aud: vec![],
    };
    let o = set.decide(&EvalRequest {
        subject: &s,
        audience: "deploy-api",
        scopes: &none,
        now: now(),
    });
    assert_eq!(
        missing(o)[0],
        (Protection::ProtectedBranch, Reason::NoBranch)
    );
    // `/grants` lists the grant with what is missing.
    let offers = set.offers(&s, now());
    assert!(
        offers.iter().all(|o| !o.missing_protections.is_empty()),
        "{offers:?}"
    );
}
