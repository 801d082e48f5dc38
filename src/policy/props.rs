//! Property tests of the policy engine's invariants.

use proptest::prelude::*;

use super::*;
use crate::domain::Scopes;

const UUIDS: [&str; 4] = [
    "03b741e3-cf4a-41f9-9a59-cec52e21bdc3",
    "d4e45493-4a33-477d-917b-a24e7e4bd39b",
    "bd715740-c970-486b-b68a-b421ec2a1f8b",
    "5b0b3a50-2f0e-4c3a-9d1e-6f8a7b9c0d1e",
];
const BRANCHES: [&str; 7] = [
    "main",
    "release/1.2",
    "release/2026/q4",
    "feature/x",
    "*",
    "release/*",
    "release/**",
];
const AUDIENCES: [&str; 2] = ["artifact-api", "deploy-api"];
const SCOPES: [&str; 3] = ["a:read", "a:write", "d:prod"];
/// Audience markers a step may declare (`oidc: audiences:`).
const MARKERS: [&str; 2] = [
    "https://sts.example.test/agent",
    "https://sts.example.test/deploy",
];
const BASE_AUD: &str = "https://sts.example.test";

fn uuid(i: usize) -> BbUuid {
    BbUuid::parse_lenient(UUIDS[i % UUIDS.len()]).unwrap()
}

fn identity() -> impl Strategy<Value = Subject> {
    (
        0usize..4,
        0usize..4,
        proptest::option::of(0usize..4),
        proptest::option::of(0usize..4),
        proptest::sample::subsequence(MARKERS.to_vec(), 0..=2),
    )
        .prop_map(|(w, r, e, b, markers)| Subject {
            workspace_uuid: uuid(w),
            repository_uuid: uuid(r),
            // only concrete branch names (indices 0..4) appear in tokens
            branch_name: b.map(|i| BRANCHES[i].to_string()),
            deployment_environment_uuid: e.map(uuid),
            aud: std::iter::once(BASE_AUD)
                .chain(markers)
                .map(str::to_string)
                .collect(),
        })
}

/// YAML `when:` lines: each condition present or not, each a list of 1-2 values.
fn when_yaml() -> impl Strategy<Value = String> {
    (
        proptest::option::of(proptest::collection::vec(0usize..4, 1..3)),
        proptest::option::of(proptest::collection::vec(0usize..4, 1..3)),
        proptest::option::of(proptest::collection::vec(0usize..4, 1..3)),
        proptest::option::of(proptest::collection::vec(0usize..7, 1..3)),
        proptest::option::of(proptest::collection::vec(0usize..2, 1..3)),
    )
        .prop_map(|(w, r, e, b, m)| {
            let mut s = String::new();
            let list = |v: &[usize], f: &dyn Fn(usize) -> String| {
                v.iter()
                    .map(|i| format!("\"{}\"", f(*i)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if let Some(v) = w {
                s += &format!(
                    "  workspaceUuid: [{}]\n",
                    list(&v, &|i| UUIDS[i].to_string())
                );
            }
            if let Some(v) = r {
                s += &format!(
                    "  repositoryUuid: [{}]\n",
                    list(&v, &|i| format!("{{{}}}", UUIDS[i]))
                );
            }
            if let Some(v) = e {
                s += &format!(
                    "  deploymentEnvironmentUuid: [{}]\n",
                    list(&v, &|i| UUIDS[i].to_string())
                );
            }
            if let Some(v) = b {
                s += &format!(
                    "  branchName: [{}]\n",
                    list(&v, &|i| BRANCHES[i].to_string())
                );
            }
            if let Some(v) = m {
                s += &format!("  aud: [{}]\n", list(&v, &|i| MARKERS[i].to_string()));
            }
            s
        })
}

fn allow_policy() -> impl Strategy<Value = Option<Policy>> {
    (
        when_yaml(),
        0usize..2,
        proptest::collection::vec(0usize..3, 1..3),
        1usize..3,
        0usize..3,
        0usize..4,
    )
        .prop_map(|(when, aud, scopes, defaults, lifetime, require)| {
        let scopes: Vec<&str> = scopes.iter().map(|i| SCOPES[*i]).collect();
        // A requirement (never met here: these sets have no inventory).
        let require = ["", "", "", "  require: {branch: protected}\n"][require];
        let yaml = format!(
            "effect: allow\nwhen:\n{when}grant:\n  client: c\n  audience: {}\n  scopes: [{}]\n  default_scopes: [{}]\n  max_lifetime_seconds: {}\n{require}",
            AUDIENCES[aud],
            scopes.join(", "),
            scopes[..defaults.min(scopes.len())].join(", "),
            [60, 120, 300][lifetime],
        );
        // Some generated `when`s are invalid for allow (no workspace/repository): skipped.
        compile_str("allow", &yaml, None).ok()
    })
}

fn deny_policy() -> impl Strategy<Value = Option<Policy>> {
    (
        when_yaml(),
        proptest::option::of(0usize..2),
        proptest::option::of(proptest::collection::vec(0usize..3, 1..3)),
    )
        .prop_map(|(when, aud, scopes)| {
            let auds = aud
                .map(|a| format!("audiences: [{}]\n", AUDIENCES[a]))
                .unwrap_or_default();
            let scopes = scopes
                .map(|v| {
                    let v: Vec<&str> = v.iter().map(|i| SCOPES[*i]).collect();
                    format!("scopes: [{}]\n", v.join(", "))
                })
                .unwrap_or_default();
            compile_str(
                "zz-deny",
                &format!("effect: deny\nwhen:\n{when}{auds}{scopes}"),
                None,
            )
            .ok()
        })
}

fn request() -> impl Strategy<Value = (usize, Scopes)> {
    (0usize..3, proptest::collection::vec(0usize..3, 0..3))
        .prop_map(|(a, s)| (a, s.into_iter().map(|i| SCOPES[i]).collect()))
}

fn audience(i: usize) -> &'static str {
    // index 2 is an audience no policy grants
    ["artifact-api", "deploy-api", "payroll-api"][i]
}

fn is_allow(d: &Decision) -> bool {
    matches!(d.outcome, Outcome::Allow(_))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn an_empty_policy_set_denies_everything(id in identity(), (aud, scopes) in request()) {
        let set = PolicySet::default();
        let d = set.evaluate(&EvalRequest { subject: &id, audience: audience(aud), scopes: &scopes, now: std::time::SystemTime::now() });
        prop_assert!(!is_allow(&d));
    }

    #[test]
    fn adding_a_deny_policy_never_turns_a_deny_into_an_allow(
        allows in proptest::collection::vec(allow_policy(), 0..4),
        deny in deny_policy(),
        id in identity(),
        (aud, scopes) in request(),
    ) {
        let mut policies: Vec<Policy> = allows.into_iter().flatten().enumerate().map(|(i, mut p)| { p.id = format!("allow-{i}"); p }).collect();
        let before = PolicySet::from_policies(policies.clone());
        let req = EvalRequest { subject: &id, audience: audience(aud), scopes: &scopes, now: std::time::SystemTime::now() };
        let d1 = before.evaluate(&req);
        if let Some(deny) = deny {
            policies.push(deny);
            let after = PolicySet::from_policies(policies);
            let d2 = after.evaluate(&req);
            prop_assert!(is_allow(&d1) || !is_allow(&d2), "a deny policy turned deny into allow");
            // and an allow can only stay the same allow or become a deny
            if let (Outcome::Allow(g1), Outcome::Allow(g2)) = (&d1.outcome, &d2.outcome) {
                prop_assert_eq!(&g1.policy, &g2.policy);
            }
        }
    }

    #[test]
    fn evaluation_is_total_and_every_policy_is_traced_or_excluded(
        allows in proptest::collection::vec(allow_policy(), 0..4),
        id in identity(),
        (aud, scopes) in request(),
    ) {
        let policies: Vec<Policy> = allows.into_iter().flatten().enumerate().map(|(i, mut p)| { p.id = format!("p{i}"); p }).collect();
        let n = policies.len();
        let set = PolicySet::from_policies(policies);
        let d = set.evaluate(&EvalRequest { subject: &id, audience: audience(aud), scopes: &scopes, now: std::time::SystemTime::now() });
        let mut seen: Vec<&str> = d.trace.iter().map(|t| t.policy.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        // the policies the index leaves out are counted instead
        prop_assert_eq!(seen.len() + d.excluded, n);
        if let Outcome::Allow(g) = &d.outcome {
            // what is granted was requested (or is the default), and is within the grant
            prop_assert!(scopes.is_empty() || g.scopes.as_slice().iter().all(|s| scopes.contains(s)));
        }
    }

    /// `POST /grants` is [`PolicySet::offers`]: what it lists is exactly what
    /// [`PolicySet::evaluate`] then allows, for every audience and every set of
    /// scopes (none included), with the lifetime and scopes of the offer that
    /// [`Offer`]'s rule picks; and it never lists an audience a deny refuses.
    #[test]
    fn offers_predict_every_decision(
        allows in proptest::collection::vec(allow_policy(), 0..5),
        denies in proptest::collection::vec(deny_policy(), 0..3),
        id in identity(),
    ) {
        let mut policies: Vec<Policy> = allows.into_iter().flatten().enumerate().map(|(i, mut p)| { p.id = format!("allow-{i}"); p }).collect();
        policies.extend(denies.into_iter().flatten().enumerate().map(|(i, mut p)| { p.id = format!("deny-{i}"); p }));
        let set = PolicySet::from_policies(policies);
        let offers = set.offers(&id, std::time::SystemTime::now());
        for aud in 0..3 {
            let audience = audience(aud);
            // An offer listing missing protections is not obtainable now.
            let mine: Vec<&Offer> = offers
                .iter()
                .filter(|o| o.audience == audience && o.missing_protections.is_empty())
                .collect();
            for mask in 0u8..8 {
                let scopes: Scopes = (0..3).filter(|i| mask & (1 << i) != 0).map(|i| SCOPES[i]).collect();
                let predicted = if scopes.is_empty() {
                    mine.iter().find_map(|o| o.default_scopes.clone().map(|d| (d, o.max_lifetime_seconds)))
                } else {
                    mine.iter()
                        .find(|o| scopes.as_slice().iter().all(|s| o.scopes.contains(s)))
                        .map(|o| (scopes.as_slice().to_vec(), o.max_lifetime_seconds))
                };
                let d = set.evaluate(&EvalRequest { subject: &id, audience, scopes: &scopes, now: std::time::SystemTime::now() });
                match (&d.outcome, predicted) {
                    (Outcome::Allow(g), Some((want_scopes, want_lifetime))) => {
                        prop_assert_eq!(g.scopes.as_slice(), want_scopes.as_slice());
                        prop_assert_eq!(g.max_lifetime_seconds, want_lifetime);
                    }
                    (Outcome::Deny { .. }, None) => {}
                    (outcome, predicted) => prop_assert!(false, "{audience} {scopes:?}: evaluate {outcome:?}, offers predict {predicted:?}; offers {offers:?}"),
                }
            }
        }
    }

    /// [`always_denied`] (which repositories `keycloak apply` makes no user
    /// for) predicts only refusals: every request of such a repository for
    /// that audience, on any branch and environment, with any markers and
    /// scopes, is denied by [`PolicySet::evaluate`].
    #[test]
    fn always_denied_predicts_only_refusals(
        allows in proptest::collection::vec(allow_policy(), 0..4),
        denies in proptest::collection::vec(deny_policy(), 0..3),
        id in identity(),
        (aud, scopes) in request(),
    ) {
        let mut policies: Vec<Policy> = allows.into_iter().flatten().enumerate().map(|(i, mut p)| { p.id = format!("allow-{i}"); p }).collect();
        policies.extend(denies.into_iter().flatten().enumerate().map(|(i, mut p)| { p.id = format!("deny-{i}"); p }));
        let set = PolicySet::from_policies(policies);
        let audience = audience(aud);
        if always_denied(set.policies(), &id.workspace_uuid, &id.repository_uuid, audience) {
            let d = set.evaluate(&EvalRequest { subject: &id, audience, scopes: &scopes, now: std::time::SystemTime::now() });
            prop_assert!(!is_allow(&d), "{audience} {scopes:?} for {id:?}: {:?}", d.outcome);
        }
    }

    #[test]
    fn a_single_star_never_matches_across_a_slash(
        prefix in "[a-z0-9._-]{0,8}",
        a in "[a-zA-Z0-9._-]{1,12}",
        b in "[a-zA-Z0-9._/-]{1,12}",
        c in "[a-zA-Z0-9._-]{1,12}",
    ) {
        let star = BranchPattern::new(&format!("{prefix}*")).unwrap();
        let across = format!("{prefix}{a}/{b}");
        let within = format!("{prefix}{a}");
        prop_assert!(!star.is_match(&across));
        prop_assert!(star.is_match(&within));
        let mid = BranchPattern::new(&format!("{prefix}/*/x")).unwrap();
        let two_segments = format!("{prefix}/{a}/{c}/x");
        let one_segment = format!("{prefix}/{a}/x");
        prop_assert!(!mid.is_match(&two_segments));
        prop_assert!(mid.is_match(&one_segment));
        let deep = BranchPattern::new(&format!("{prefix}/**")).unwrap();
        let nested = format!("{prefix}/{a}/{b}");
        prop_assert!(deep.is_match(&nested));
    }
}

// ------------------------------------------------------------ line removal

/// One generated policy file in block style, line by line, with the kind of each
/// line: `Condition` for a condition's key line under `when:`, `Deny` for every line
/// of a deny policy, `Other` for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Condition,
    Deny,
    Other,
}

fn block_when(
    conds: &[(usize, Vec<usize>)],
    lines: &mut Vec<(String, LineKind)>,
    kind_of_values: LineKind,
) {
    const KEYS: [&str; 4] = [
        "workspaceUuid",
        "repositoryUuid",
        "deploymentEnvironmentUuid",
        "branchName",
    ];
    let key_kind = if kind_of_values == LineKind::Deny {
        LineKind::Deny
    } else {
        LineKind::Condition
    };
    lines.push(("when:".into(), kind_of_values));
    for (k, values) in conds {
        lines.push((format!("  {}:", KEYS[*k]), key_kind));
        for v in values {
            let value = if *k == 3 {
                BRANCHES[*v % BRANCHES.len()].to_string()
            } else {
                format!("{{{}}}", UUIDS[*v % UUIDS.len()])
            };
            lines.push((format!("    - \"{value}\""), kind_of_values));
        }
        // a commented-out value, as reviewers see in real files
        lines.push((
            "    # - \"{00000000-0000-0000-0000-000000000000}\"".into(),
            kind_of_values,
        ));
    }
}

fn conditions() -> impl Strategy<Value = Vec<(usize, Vec<usize>)>> {
    proptest::sample::subsequence(vec![0usize, 1, 2, 3], 1..=4).prop_flat_map(|keys| {
        keys.into_iter()
            .map(|k| (Just(k), proptest::collection::vec(0usize..7, 1..3)))
            .collect::<Vec<_>>()
    })
}

fn allow_lines() -> impl Strategy<Value = Vec<(String, LineKind)>> {
    (
        conditions(),
        0usize..2,
        proptest::collection::vec(0usize..3, 1..3),
    )
        .prop_map(|(conds, aud, scopes)| {
            let mut lines = vec![("effect: allow".to_string(), LineKind::Other)];
            block_when(&conds, &mut lines, LineKind::Other);
            lines.push(("grant:".into(), LineKind::Other));
            lines.push(("  client: c".into(), LineKind::Other));
            lines.push((format!("  audience: {}", AUDIENCES[aud]), LineKind::Other));
            lines.push(("  scopes:".into(), LineKind::Other));
            for i in &scopes {
                lines.push((format!("    - {}", SCOPES[*i]), LineKind::Other));
            }
            lines.push(("  default_scopes:".into(), LineKind::Other));
            lines.push((format!("    - {}", SCOPES[scopes[0]]), LineKind::Other));
            lines.push(("  max_lifetime_seconds: 60".into(), LineKind::Other));
            lines
        })
}

fn deny_lines() -> impl Strategy<Value = Vec<(String, LineKind)>> {
    (
        conditions(),
        proptest::option::of(proptest::collection::vec(0usize..2, 1..3)),
    )
        .prop_map(|(conds, auds)| {
            let mut lines = vec![("effect: deny".to_string(), LineKind::Deny)];
            block_when(&conds, &mut lines, LineKind::Deny);
            if let Some(a) = auds {
                lines.push(("audiences:".into(), LineKind::Deny));
                for i in a {
                    lines.push((format!("  - {}", AUDIENCES[i]), LineKind::Deny));
                }
            }
            lines
        })
}

fn compile_files(files: &[Vec<(String, LineKind)>]) -> Option<PolicySet> {
    let mut policies = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let text: String = f.iter().map(|(l, _)| format!("{l}\n")).collect();
        policies.push(compile_str(&format!("p{i}"), &text, None).ok()?);
    }
    Some(PolicySet::from_policies(policies))
}

/// Every (identity, audience, scopes) the set admits, over a fixed grid.
fn admitted(set: &PolicySet) -> BTreeSet<(usize, usize, usize, usize, usize, usize)> {
    let mut out = BTreeSet::new();
    for w in 0..2 {
        for r in 0..3 {
            for e in 0..3 {
                for b in 0..4 {
                    let id = Subject {
                        workspace_uuid: uuid(w),
                        repository_uuid: uuid(r),
                        branch_name: (b > 0).then(|| BRANCHES[b - 1].to_string()),
                        deployment_environment_uuid: (e > 0).then(|| uuid(e + 1)),
                        aud: vec![BASE_AUD.to_string()],
                    };
                    for (a, aud) in AUDIENCES.iter().enumerate() {
                        for sc in 0..4 {
                            let scopes: Scopes = if sc == 0 {
                                Scopes::default()
                            } else {
                                [SCOPES[sc - 1]].into_iter().collect()
                            };
                            let d = set.evaluate(&EvalRequest {
                                subject: &id,
                                audience: aud,
                                scopes: &scopes,
                                now: std::time::SystemTime::now(),
                            });
                            if is_allow(&d) {
                                out.insert((w, r, e, b, a, sc));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Issue #7 §1: removing one line of a policy file never makes the compiled set
    /// admit more, unless the line was part of a deny policy or a condition's key
    /// (removing a whole condition widens by design). Removing the last value of a
    /// condition, or everything but a comment, must be refused, not read as "any".
    #[test]
    fn removing_a_line_never_admits_more_unless_it_was_a_deny_or_a_condition(
        allows in proptest::collection::vec(allow_lines(), 1..3),
        denies in proptest::collection::vec(deny_lines(), 0..2),
    ) {
        let files: Vec<Vec<(String, LineKind)>> = allows.into_iter().chain(denies).collect();
        let Some(base) = compile_files(&files) else {
            // generated allow policies without workspace/repository are invalid; skip
            return Ok(());
        };
        let before = admitted(&base);
        for (fi, f) in files.iter().enumerate() {
            for (li, (line, kind)) in f.iter().enumerate() {
                if *kind != LineKind::Other {
                    continue;
                }
                let mut changed = files.clone();
                changed[fi].remove(li);
                if let Some(set) = compile_files(&changed) {
                    let after = admitted(&set);
                    let extra: Vec<_> = after.difference(&before).collect();
                    prop_assert!(
                        extra.is_empty(),
                        "removing line {li} `{line}` of file {fi} admitted more: {extra:?}"
                    );
                }
            }
        }
    }
}

// ------------------------------------------------ names resolve to the same decisions

mod names {
    use super::*;
    use crate::inventory::{Environment, Inventory, Project, Repository, WorkspaceInventory};

    /// An inventory over the UUIDs above: workspace 0 holds repositories 1, 2, 3
    /// (projects P1, P1, P2); every repository has environments named `Production`
    /// and `Staging` with distinct UUIDs.
    /// (full_name, uuid, project key, [(environment name, uuid)]).
    type Row = (String, BbUuid, &'static str, Vec<(&'static str, BbUuid)>);

    fn inventory() -> (Inventory, Vec<Row>) {
        let env = |r: u8, e: u8| {
            BbUuid::parse_lenient(&format!("00000000-0000-4000-8000-0000000{r:02x}0{e:02x}"))
                .unwrap()
        };
        let repos: Vec<Row> = (1..4u8)
            .map(|i| {
                (
                    format!("acme/repo-{i}"),
                    uuid(i as usize),
                    if i < 3 { "P1" } else { "P2" },
                    vec![("Production", env(i, 1)), ("Staging", env(i, 2))],
                )
            })
            .collect();
        let ws = WorkspaceInventory {
            workspace: "acme".into(),
            workspace_uuid: uuid(0),
            repositories: repos
                .iter()
                .map(|(name, u, project, envs)| Repository {
                    uuid: *u,
                    full_name: name.clone(),
                    protections: None,
                    project: Some(Project {
                        key: (*project).into(),
                        uuid: uuid(0),
                    }),
                    environments: envs
                        .iter()
                        .map(|(n, e)| Environment {
                            uuid: *e,
                            name: (*n).into(),
                            restrictions: None,
                        })
                        .collect(),
                })
                .collect(),
        };
        (Inventory::new(vec![ws]).unwrap(), repos)
    }

    fn quoted(v: &[String]) -> String {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Issue #9: a policy written by names and the same policy written by
        /// UUIDs decide every request alike.
        #[test]
        fn name_based_and_uuid_based_policies_decide_alike(
            repos in proptest::option::of(proptest::sample::subsequence(vec![0usize, 1, 2], 1..=3)),
            by_project in any::<bool>(),
            env in proptest::option::of(0usize..2),
            branch in proptest::option::of(0usize..4),
            deny in any::<bool>(),
        ) {
            let (inv, table) = inventory();
            let env_names = ["Production", "Staging"];
            let chosen: Vec<usize> = match (&repos, by_project) {
                (Some(r), false) => r.clone(),
                (Some(_), true) => vec![0, 1], // project P1
                (None, _) => vec![0, 1, 2],
            };
            let mut by_name = String::from("  workspace: acme\n");
            let mut by_uuid = format!("  workspaceUuid: \"{}\"\n", uuid(0));
            if repos.is_some() {
                if by_project {
                    by_name += "  project: P1\n";
                } else {
                    let names: Vec<String> = chosen.iter().map(|i| table[*i].0.clone()).collect();
                    by_name += &format!("  repository: [{}]\n", quoted(&names));
                }
                let uuids: Vec<String> = chosen.iter().map(|i| table[*i].1.braced()).collect();
                by_uuid += &format!("  repositoryUuid: [{}]\n", quoted(&uuids));
            }
            if let Some(e) = env {
                by_name += &format!("  deploymentEnvironment: {}\n", env_names[e]);
                let uuids: Vec<String> = chosen.iter().map(|i| table[*i].3[e].1.braced()).collect();
                by_uuid += &format!("  deploymentEnvironmentUuid: [{}]\n", quoted(&uuids));
            }
            if let Some(b) = branch {
                let line = format!("  branchName: \"{}\"\n", BRANCHES[b]);
                by_name += &line;
                by_uuid += &line;
            }
            let text = |when: &str| if deny {
                format!("effect: deny\nwhen:\n{when}")
            } else {
                format!("effect: allow\nwhen:\n{when}grant: {{client: c, audience: artifact-api, scopes: [a:read], default_scopes: [a:read], max_lifetime_seconds: 60}}\n")
            };
            let base = compile_str("base", &format!("effect: allow\nwhen:\n  workspaceUuid: \"{}\"\ngrant: {{client: c, audience: artifact-api, scopes: [a:read], default_scopes: [a:read], max_lifetime_seconds: 60}}\n", uuid(0)), None).unwrap();
            let expanding = (repos.is_some() && by_project) || env.is_some();
            let named = crate::policy::compile_with("p", &text(&by_name), None, &inv);
            if deny && expanding {
                // A deny may not depend on the inventory being complete.
                prop_assert!(named.is_err());
                return Ok(());
            }
            let named = named.unwrap();
            let plain = compile_str("p", &text(&by_uuid), None).unwrap();
            let a = PolicySet::from_policies(vec![base.clone(), named]);
            let b = PolicySet::from_policies(vec![base, plain]);
            for r in 0..4 {
                for e in 0..3 {
                    for br in 0..5 {
                        let subject = Subject {
                            workspace_uuid: uuid(0),
                            repository_uuid: if r < 3 { table[r].1 } else { uuid(3) },
                            deployment_environment_uuid: match (r, e) {
                                (r, 1 | 2) if r < 3 => Some(table[r].3[e - 1].1),
                                _ => None,
                            },
                            branch_name: (br > 0).then(|| BRANCHES[br - 1].to_string()),
                            aud: vec![BASE_AUD.to_string()],
                        };
                        let req = EvalRequest { subject: &subject, audience: "artifact-api", scopes: &Scopes::default(), now: std::time::SystemTime::now() };
                        let (da, db) = (a.evaluate(&req), b.evaluate(&req));
                        prop_assert_eq!(
                            format!("{:?}", da.outcome),
                            format!("{:?}", db.outcome),
                            "{}\nvs\n{}", by_name, by_uuid
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_ambiguous_and_mixed_names_are_errors_naming_the_field() {
        let (inv, _) = inventory();
        let allow = |when: &str| {
            format!("effect: allow\nwhen:\n{when}grant: {{client: c, audience: a, scopes: [s], default_scopes: [s], max_lifetime_seconds: 60}}\n")
        };
        let cases = [
            (allow("  repository: acme/nope\n"), "when.repository[0]"),
            (allow("  repository: acme/zz-*\n"), "when.repository[0]"),
            (allow("  workspace: globex\n"), "when.workspace[0]"),
            (allow("  project: NOPE\n"), "when.project[0]"),
            (
                allow("  repository: acme/repo-3\n  project: P1\n"),
                "when.repository",
            ),
            (
                allow("  repository: acme/repo-1\n  deploymentEnvironment: Production ring\n"),
                "when.deploymentEnvironment[0]",
            ),
            (
                allow(&format!(
                    "  repository: acme/repo-1\n  repositoryUuid: \"{}\"\n",
                    uuid(1)
                )),
                "when.repositoryUuid",
            ),
            (allow("  repository: acme/repo-?\n"), "when.repository[0]"),
        ];
        for (yaml, field) in cases {
            let e = crate::policy::compile_with("p", &yaml, None, &inv).unwrap_err();
            assert_eq!(e.key, field, "{yaml}\n=> {e}");
        }
        let e = compile_str("p", &allow("  repository: acme/repo-1\n"), None).unwrap_err();
        assert!(e.reason.contains("inventory"), "{e}");
        // Globs and case-insensitive names resolve, and say how.
        let p = crate::policy::compile_with("p", &allow("  repository: [ACME/Repo-1, \"acme/repo-*\"]\n  deploymentEnvironment: Production\n"), None, &inv).unwrap();
        assert_eq!(p.when.repository_uuid.as_ref().unwrap().len(), 3);
        assert_eq!(
            p.when.deployment_environment_uuid.as_ref().unwrap().len(),
            3
        );
        assert!(
            p.resolutions.iter().any(|r| r.contains("acme/repo-2")),
            "{:?}",
            p.resolutions
        );
    }
}
