//! Issue #22: Bitbucket's branch and deployment protections in the inventory
//! (against a fake API serving Atlassian's documented shapes: pagination, a
//! branching-model restriction, a 403 for a missing scope), `policy check`'s
//! table, and the running service refusing and allowing by requirement.

use std::process::Command;

use serde_json::{json, Value};
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;
use crate::inventory::{fake_bitbucket, TOKEN};

fn repo_path(uuid: &str, rest: &str) -> String {
    format!("/2.0/repositories/acme/%7B{uuid}%7D/{rest}")
}

/// The fake of `inventory.rs` plus: deploy-service's `main` protected (push
/// with one exempt user, force by branching model `production`, 2 approvals
/// with merge checks enforced, on a second page) and an admin-only
/// Production; web's branch restrictions refused (403: the token's user is
/// not an admin of it); sandbox's never asked for (no policy concerns it).
pub(crate) async fn protected_bitbucket() -> MockServer {
    let bb = fake_bitbucket("acme/deploy-service").await;
    let uri = bb.uri();
    Mock::given(method("GET"))
        .and(path(repo_path(REPO, "environments")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"values": [
            {"type": "deployment_environment", "uuid": format!("{{{PROD_ENV}}}"), "name": "Production",
             "restrictions": {"type": "deployment_restrictions_configuration", "admin_only": true},
             "environment_lock_enabled": true, "deployment_gate_enabled": false,
             "lock": {"type": "deployment_environment_lock_open", "name": "OPEN"}},
            {"type": "deployment_environment", "uuid": format!("{{{STAGING_ENV}}}"), "name": "Staging",
             "restrictions": {"type": "deployment_restrictions_configuration", "admin_only": false}},
        ]})))
        .with_priority(1)
        .mount(&bb)
        .await;
    let restriction =
        |id: u64, kind: &str, by_model: bool, pattern: &str, value: Value, users: Value| {
            json!({
                "type": "branchrestriction", "id": id, "kind": kind,
                "branch_match_kind": if by_model { "branching_model" } else { "glob" },
                "branch_type": if by_model { json!("production") } else { Value::Null },
                "pattern": pattern, "value": value, "users": users, "groups": [],
                "links": {"self": {"href": "https://example.invalid/ignored"}},
            })
        };
    Mock::given(method("GET"))
        .and(path(repo_path(REPO, "branch-restrictions")))
        .and(query_param("page", "2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"pagelen": 2, "page": 2, "size": 4, "values": [
                restriction(3, "require_approvals_to_merge", false, "main", json!(2), json!([])),
                restriction(4, "enforce_merge_checks", false, "main", Value::Null, json!([])),
            ]}),
        ))
        .with_priority(1)
        .mount(&bb)
        .await;
    Mock::given(method("GET"))
        .and(path(repo_path(REPO, "branch-restrictions")))
        .and(query_param("pagelen", "100"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "pagelen": 2, "page": 1, "size": 4,
            "next": format!("{uri}{}?pagelen=100&page=2", repo_path(REPO, "branch-restrictions")),
            "values": [
                restriction(1, "push", false, "main", Value::Null,
                    json!([{"type": "user", "uuid": "{7c0d0e1f-0000-4000-8000-000000000001}", "display_name": "Release Bot", "account_id": "x"}])),
                restriction(2, "force", true, "", Value::Null, json!([])),
            ],
        })))
        .with_priority(2)
        .mount(&bb)
        .await;
    Mock::given(method("GET"))
        .and(path(repo_path(REPO, "branching-model")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "type": "branching_model",
            "development": {"name": "develop", "use_mainbranch": false},
            "production": {"name": "main", "use_mainbranch": true, "branch": {"type": "branch", "name": "main"}},
            "branch_types": [{"kind": "release", "prefix": "release/"}],
        })))
        .mount(&bb)
        .await;
    Mock::given(method("GET"))
        .and(path(repo_path(OTHER_REPO, "branch-restrictions")))
        .respond_with(
            ResponseTemplate::new(403).set_body_json(json!({"type": "error", "error": {
            "message": "You do not have admin access to this repository."}})),
        )
        .mount(&bb)
        .await;
    Mock::given(method("GET"))
        .and(path(repo_path(SANDBOX_REPO, "branch-restrictions")))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&bb)
        .await;
    bb
}

fn grant(audience: &str, require: &str) -> String {
    format!(
        "grant:\n  client: sts-artifacts\n  audience: {audience}\n  scopes: [artifacts:read]\n  default_scopes: [artifacts:read]\n  max_lifetime_seconds: 300\n{require}"
    )
}

/// Policies by name: deploy-service's `main` with a protected branch and 2
/// approvals; its Production admin-only; web's `main` protected.
pub(crate) fn write_policies(dir: &std::path::Path) {
    let files = [
        ("deploy.yaml", format!("effect: allow\nwhen:\n  repository: acme/deploy-service\n  branchName: main\n{}", grant("deploy-api", "  require: {branch: protected, approvals: 2}\n"))),
        ("prod.yaml", format!("effect: allow\nwhen:\n  repository: acme/deploy-service\n  deploymentEnvironment: Production\n{}", grant("prod-api", "  require:\n    environment: admin_only\n"))),
        ("web.yaml", format!("effect: allow\nwhen:\n  repository: acme/web\n  branchName: main\n{}", grant("web-api", "  require: {branch: protected}\n"))),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// A temporary directory holding `policies/` ([`write_policies`]) and the
/// inventory path under it.
pub(crate) fn written_policies() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    write_policies(&policies);
    let out_file = policies.join("inventory").join("acme.yaml");
    (dir, policies, out_file)
}

pub(crate) fn inventory(api: &str, out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
        .env("BITBUCKET_TOKEN", TOKEN)
        .args(["bitbucket", "inventory", "--workspace", "acme", "--api"])
        .arg(format!("{api}/2.0"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn policy_check(dir: &std::path::Path, strict: bool) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"));
    c.args(["policy", "check", "--dir"]).arg(dir);
    if strict {
        c.arg("--fail-on-unprotected-production");
    }
    c.output().unwrap()
}

#[tokio::test]
async fn protections_are_read_for_concerned_repositories_and_decide_exchanges() {
    let bb = protected_bitbucket().await;
    let (_dir, policies, out_file) = written_policies();
    let out = inventory(&bb.uri(), &out_file);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "written, some unknown: {stdout}{stderr}"
    );
    assert!(
        stdout.contains("protections read for 2, reused for 0, unknown for 1"),
        "{stdout}"
    );
    assert!(
        stderr.contains("branch restrictions of 1 repositories are unknown"),
        "{stderr}"
    );
    assert!(!stdout.contains(TOKEN) && !stderr.contains(TOKEN));
    let text = std::fs::read_to_string(&out_file).unwrap();
    for want in [
        "read_at:",
        "kind: push",
        "name: Release Bot",
        "kind: force",
        "pattern: main",
        "branch_type: production",
        "kind: require_approvals_to_merge",
        "value: 2",
        "admin_only: true",
        "deploy_branches: unknown",
        "HTTP 403: the user of the token is not an admin",
    ] {
        assert!(text.contains(want), "{want}:\n{text}");
    }
    assert_eq!(
        text.matches("read_at:").count(),
        2,
        "only the concerned repositories: {text}"
    );
    bb.verify().await;

    // A second run reuses what the state holds, except an unknown record
    // (the token may have the scope now).
    let before = bb.received_requests().await.unwrap().len();
    let again = inventory(&bb.uri(), &out_file);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("protections read for 1, reused for 1"),
        "{again:?}"
    );
    let after = bb.received_requests().await.unwrap();
    let reread: Vec<String> = after[before..]
        .iter()
        .filter(|r| r.url.path().ends_with("branch-restrictions"))
        .map(|r| r.url.path().to_string())
        .collect();
    assert!(
        reread.len() == 1 && reread[0].contains(OTHER_REPO),
        "{reread:?}"
    );

    // `policy check`: the table, and the strict option for production grants.
    let check = policy_check(&policies, true);
    let table = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        table.contains("deploy | deploy-api | acme/deploy-service | branch main")
            && table.contains("shows: protected, 2 approvals enforced | met"),
        "{table}"
    );
    assert!(
        table.contains("web | web-api | acme/web | branch main"),
        "{table}"
    );
    assert!(table.contains("NOT MET: a protected branch"), "{table}");
    std::fs::write(
        policies.join("prod-open.yaml"),
        format!("effect: allow\nwhen:\n  repository: acme/deploy-service\n  deploymentEnvironment: Staging\n{}", grant("staging-api", "")),
    )
    .unwrap();
    let lax = policy_check(&policies, false);
    assert!(lax.status.success());
    assert!(String::from_utf8_lossy(&lax.stdout).contains("UNPROTECTED production grant"));
    let strict = policy_check(&policies, true);
    assert_eq!(strict.status.code(), Some(1), "{strict:?}");
    assert!(String::from_utf8_lossy(&strict.stderr).contains("--fail-on-unprotected-production"));
    std::fs::remove_file(policies.join("prod-open.yaml")).unwrap();

    // The running service decides by requirement.
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(300, "artifacts:read", 2).await;
    let mut opts = Options::new(&kc.uri());
    opts.policies_dir = Some(policies.clone());
    let app = TestApp::start(&issuer, opts).await;
    let main = issuer.mint(&issuer.step());
    assert_eq!(app.exchange(&main, "deploy-api", None).await.status(), 200);
    let mut prod = issuer.step();
    prod.deployment_environment_uuid = Some(format!("{{{PROD_ENV}}}"));
    assert_eq!(
        app.exchange(&issuer.mint(&prod), "prod-api", None)
            .await
            .status(),
        200
    );
    let mut web = issuer.step();
    web.repository_uuid = format!("{{{OTHER_REPO}}}");
    let web = issuer.mint(&web);
    let body = assert_error(
        app.exchange(&web, "web-api", None).await,
        400,
        "invalid_request",
        "policy.protection_required",
    )
    .await;
    let description = body["error_description"].as_str().unwrap_or_default();
    assert!(
        description.contains("a protected branch") && description.contains("unknown"),
        "{body}"
    );
    let listed: Value = app.grants(&web).await.json().await.unwrap();
    let offer = &listed["grants"][0];
    assert_eq!(offer["audience"], "web-api", "{listed}");
    assert!(
        offer["missing_protections"][0]
            .as_str()
            .unwrap_or_default()
            .contains("protected branch"),
        "{listed}"
    );
    let audit = app.audit_lines();
    let refused: Vec<&Value> = audit
        .iter()
        .filter(|l| l["error_code"] == "policy.protection_required")
        .collect();
    assert_eq!(refused.len(), 1, "{audit:?}");
    assert_eq!(refused[0]["policy"], "web");
}

/// Protections older than `[protections] max_age_hours` are unknown, and a
/// requirement configured for an audience applies to a policy that names none.
#[tokio::test]
async fn stale_protections_and_configured_requirements_refuse() {
    let bb = protected_bitbucket().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    write_policies(&policies);
    // Names no requirement itself; the configuration requires admin-only.
    std::fs::write(
        policies.join("staging.yaml"),
        format!("effect: allow\nwhen:\n  repository: acme/deploy-service\n  deploymentEnvironment: Staging\n{}", grant("staging-api", "")),
    )
    .unwrap();
    let out_file = policies.join("inventory").join("acme.yaml");
    assert_eq!(inventory(&bb.uri(), &out_file).status.code(), Some(3));
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(300, "artifacts:read", 0).await;
    let mut opts = Options::new(&kc.uri());
    opts.policies_dir = Some(policies.clone());
    opts.top_extra = "[protections]\nmax_age_hours = 1\n[protections.require.audiences.staging-api]\nenvironment = \"admin_only\"\n".into();
    // Read two hours ago.
    let text = std::fs::read_to_string(&out_file).unwrap();
    let two_hours_ago = keycloak_ci_sts::inventory::protections::rfc3339(
        std::time::SystemTime::now() - std::time::Duration::from_secs(7200),
    );
    let stale: String = text
        .lines()
        .map(|l| match l.find("read_at: ") {
            Some(i) => format!("{}read_at: '{two_hours_ago}'\n", &l[..i]),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&out_file, stale).unwrap();
    let app = TestApp::start(&issuer, opts).await;
    let mut staging = issuer.step();
    staging.deployment_environment_uuid = Some(format!("{{{STAGING_ENV}}}"));
    for (step, audience, says) in [
        (
            issuer.step(),
            "deploy-api",
            "older than [protections] max_age_hours",
        ),
        (staging, "staging-api", "admin-only deployment environment"),
    ] {
        let resp = app.exchange(&issuer.mint(&step), audience, None).await;
        let body = assert_error(resp, 400, "invalid_request", "policy.protection_required").await;
        let description = body["error_description"].as_str().unwrap_or_default();
        assert!(description.contains(says), "{body}");
    }
}

/// A token without `repository:admin`: the first refusal names the scope, and
/// no other repository is asked (each would spend the hour's budget on the
/// same 403); every concerned repository's protections are unknown.
#[tokio::test]
async fn a_missing_admin_scope_is_named_and_asked_once() {
    let bb = fake_bitbucket("acme/deploy-service").await;
    Mock::given(method("GET"))
        .and(wiremock::matchers::path_regex(r"/branch-restrictions$"))
        .respond_with(
            ResponseTemplate::new(403).set_body_json(json!({"type": "error", "error": {
            "message": "Your credentials lack one or more required privilege scopes.",
            "detail": {"required": ["repository:admin"], "granted": ["repository", "pipeline"]}}})),
        )
        .expect(1)
        .mount(&bb)
        .await;
    let (_dir, _, out_file) = written_policies();
    let out = inventory(&bb.uri(), &out_file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("refused the branch restrictions of acme/web")
            && stderr.contains("admin:repository:bitbucket")
            && stderr.contains("2 repositories' protections are recorded as unknown"),
        "{stderr}"
    );
    let text = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(text.matches("unknown: ").count(), 2, "{text}");
    assert!(!text.contains("branch_restrictions:"), "{text}");
    bb.verify().await;
}

/// One repository's excess (more restrictions than the inventory records,
/// over two pages) makes that repository's protections unknown; the others
/// are still read and the file is written.
#[tokio::test]
async fn one_repository_s_excess_is_its_own_unknown() {
    let bb = fake_bitbucket("acme/deploy-service").await;
    let uri = bb.uri();
    let rule = |i: usize| json!({"kind": "push", "branch_match_kind": "glob", "pattern": format!("b{i}"), "users": [], "groups": []});
    Mock::given(method("GET"))
        .and(path(repo_path(REPO, "branch-restrictions")))
        .and(query_param("page", "2"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"values": (600..1001).map(rule).collect::<Vec<_>>()})),
        )
        .with_priority(1)
        .mount(&bb)
        .await;
    Mock::given(method("GET"))
        .and(path(repo_path(REPO, "branch-restrictions")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "values": (0..600).map(rule).collect::<Vec<_>>(),
            "next": format!("{uri}{}?pagelen=100&page=2", repo_path(REPO, "branch-restrictions")),
        })))
        .with_priority(2)
        .mount(&bb)
        .await;
    Mock::given(method("GET"))
        .and(wiremock::matchers::path_regex(r"/branch-restrictions$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"values": [rule(0)]})))
        .with_priority(3)
        .mount(&bb)
        .await;
    let (_dir, _, out_file) = written_policies();
    let out = inventory(&bb.uri(), &out_file);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let text = std::fs::read_to_string(&out_file).unwrap();
    assert!(
        text.contains("unknown: 'more than 1000 branch restrictions"),
        "{text}"
    );
    assert_eq!(
        text.matches("branch_restrictions:").count(),
        1,
        "web still read: {text}"
    );
}
