//! Issue #9: the repository inventory read from Bitbucket's API (against a local
//! fake serving Atlassian's documented shapes), and policies written by names
//! deciding exactly as their UUID form, through the running service.

use std::process::Command;

use serde_json::{json, Value};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

pub const TOKEN: &str = "bb-access-token-do-not-print";
pub const WS_BRACED: &str = "{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}";

fn repo(uuid: &str, full_name: &str, project: &str) -> Value {
    json!({
        "type": "repository", "uuid": format!("{{{uuid}}}"), "full_name": full_name,
        "slug": full_name.split('/').nth(1), "name": full_name,
        "project": {"type": "project", "key": project, "uuid": "{6a1f3c2e-8b4d-4e5f-9a0b-1c2d3e4f5a6b}"},
        "links": {"self": {"href": "https://example.invalid/ignored"}},
    })
}

/// A fake Bitbucket API: two pages of repositories (the second answered 429 with
/// `Retry-After` once), environments per repository, Bearer auth required.
pub(crate) async fn fake_bitbucket(deploy_name: &str) -> MockServer {
    let server = MockServer::start().await;
    let uri = server.uri();
    let bearer = format!("Bearer {TOKEN}");
    Mock::given(method("GET"))
        .and(path("/2.0/workspaces/acme"))
        .and(header("authorization", bearer.as_str()))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"uuid": WS_BRACED, "slug": "acme", "name": "Acme"})),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/2.0/repositories/acme"))
        .and(query_param("page", "2"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/2.0/repositories/acme"))
        .and(query_param("page", "2"))
        .and(header("authorization", bearer.as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "pagelen": 2, "page": 2, "size": 3,
            "values": [repo(SANDBOX_REPO, "acme/sandbox", "LAB")],
        })))
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/2.0/repositories/acme"))
        .and(query_param("pagelen", "100"))
        .and(header("authorization", bearer.as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "pagelen": 2, "page": 1, "size": 3,
            "next": format!("{uri}/2.0/repositories/acme?pagelen=100&page=2"),
            "values": [repo(REPO, deploy_name, "OPS"), repo(OTHER_REPO, "acme/web", "WEB")],
        })))
        .with_priority(3)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        // the braced UUID, percent-encoded as a path segment
        .and(path(format!("/2.0/repositories/acme/%7B{REPO}%7D/environments")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"values": [
            {"type": "deployment_environment", "uuid": format!("{{{PROD_ENV}}}"), "name": "Production"},
            {"type": "deployment_environment", "uuid": format!("{{{STAGING_ENV}}}"), "name": "Staging"},
        ]})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(wiremock::matchers::path_regex(
            r"^/2\.0/repositories/acme/[^/]+/environments$",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"values": []})))
        .with_priority(5)
        .mount(&server)
        .await;
    server
}

pub fn inventory_cmd(api: &str, out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
        .env("BITBUCKET_TOKEN", TOKEN)
        .args(["bitbucket", "inventory", "--workspace", "acme", "--api"])
        .arg(format!("{api}/2.0"))
        // Protections have their own tests (protections.rs).
        .args(["--protections", "none", "--out"])
        .arg(out)
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_inventory_is_read_across_pages_and_429s_written_sorted_and_reread() {
    let bb = fake_bitbucket("acme/deploy-service").await;
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("inventory").join("acme.yaml");
    let out = inventory_cmd(&bb.uri(), &out_file);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("3 repositories, 2 deployment environments"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(TOKEN) && !stderr.contains(TOKEN),
        "the token was printed"
    );
    let text = std::fs::read_to_string(&out_file).unwrap();
    // sorted by UUID: 5b0b… (sandbox), 9a1b… (web), d4e4… (deploy-service)
    let pos = |s: &str| text.find(s).unwrap();
    assert!(
        pos("acme/sandbox") < pos("acme/web") && pos("acme/web") < pos("acme/deploy-service"),
        "{text}"
    );
    assert!(
        text.contains("name: Production") && text.contains("key: OPS"),
        "{text}"
    );
    // Re-read by the policy compiler: a name-based policy resolves through it.
    std::fs::write(
        dir.path().join("p.yaml"),
        allow_policy(
            "  repository: acme/deploy-service\n  deploymentEnvironment: Production\n",
            "c",
            "a",
            "s",
            "s",
            60,
        ),
    )
    .unwrap();
    let set = keycloak_ci_sts::policy::PolicySet::load_dir(dir.path(), None).unwrap();
    let p = &set.policies()[0];
    assert_eq!(p.when.repository_uuid.as_ref().unwrap()[0].bare(), REPO);
    assert_eq!(
        p.when.deployment_environment_uuid.as_ref().unwrap()[0].bare(),
        PROD_ENV
    );
    // Unchanged on a second run; a rename is a one-line diff.
    let again = inventory_cmd(&bb.uri(), &out_file);
    assert!(
        String::from_utf8_lossy(&again.stdout).starts_with("unchanged"),
        "{again:?}"
    );
    let renamed = fake_bitbucket("acme/deployer").await;
    let out = inventory_cmd(&renamed.uri(), &out_file);
    assert!(String::from_utf8_lossy(&out.stdout).contains("changed: review the diff"));
    let new_text = std::fs::read_to_string(&out_file).unwrap();
    let differing: Vec<_> = text
        .lines()
        .zip(new_text.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(differing.len(), 1, "{differing:?}");
    assert_eq!(text.lines().count(), new_text.lines().count());
}

#[tokio::test]
async fn api_refusals_and_malformed_pages_fail_with_a_message_and_write_nothing() {
    let cases: Vec<(&str, ResponseTemplate, &str)> = vec![
        (
            "401",
            ResponseTemplate::new(401),
            "lacks the `repository` / `pipeline` read scopes",
        ),
        ("403", ResponseTemplate::new(403), "read scopes"),
        (
            "malformed",
            ResponseTemplate::new(200).set_body_json(json!({"values": "nope"})),
            "not the documented JSON",
        ),
        (
            "html",
            ResponseTemplate::new(200).set_body_string("<html>"),
            "not the documented JSON",
        ),
        ("404", ResponseTemplate::new(404), "HTTP 404"),
    ];
    for (name, answer, says) in cases {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/2.0/workspaces/acme"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"uuid": WS_BRACED})))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/2.0/repositories/acme"))
            .respond_with(answer)
            .mount(&server)
            .await;
        let dir = tempfile::tempdir().unwrap();
        let out_file = dir.path().join("acme.yaml");
        let out = inventory_cmd(&server.uri(), &out_file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(says), "{name}: {stderr}");
        assert!(!stderr.contains(TOKEN));
        assert!(!out_file.exists(), "{name}: a file was written");
    }
}

#[tokio::test]
async fn a_next_link_off_the_api_origin_is_not_followed() {
    let server = MockServer::start().await;
    let trap = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/2.0/workspaces/acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"uuid": WS_BRACED})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/2.0/repositories/acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "values": [], "next": format!("{}/steal", trap.uri())})))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let out = inventory_cmd(&server.uri(), &dir.path().join("acme.yaml"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not continue the same list"));
    assert!(
        trap.received_requests()
            .await
            .unwrap_or_default()
            .is_empty(),
        "the token was sent elsewhere"
    );
}

/// Issue #9's "done when": the shipped policies, written by names and resolved
/// through the committed inventory, decide every request exactly as their UUID
/// form, through the running service.
#[tokio::test]
async fn the_shipped_name_based_policies_decide_like_their_uuid_form() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read artifacts:write deploy:production", 0..)
        .await;
    let by_name = TestApp::start(&issuer, Options::new(&kc.uri())).await;
    let mut opts = Options::new(&kc.uri());
    opts.policies_dir = Some(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/policies-by-uuid"),
    );
    let by_uuid = TestApp::start(&issuer, opts).await;
    let unknown_repo = "0f0f0f0f-1111-4222-8333-444455556666";
    let mut allowed = 0;
    for repo in [REPO, SANDBOX_REPO, OTHER_REPO, unknown_repo] {
        for env in [None, Some(PROD_ENV), Some(STAGING_ENV)] {
            for branch in [Some("main"), Some("release/1.2"), Some("feature/x"), None] {
                for audience in ["artifact-api", "deploy-api"] {
                    let mut step = issuer.step();
                    step.repository_uuid = format!("{{{repo}}}");
                    step.deployment_environment_uuid = env.map(|e| format!("{{{e}}}"));
                    step.branch_name = branch.map(str::to_string);
                    let token = issuer.mint(&step);
                    let a = by_name.exchange(&token, audience, None).await;
                    let b = by_uuid.exchange(&token, audience, None).await;
                    let (sa, sb) = (a.status().as_u16(), b.status().as_u16());
                    let (ja, jb): (Value, Value) =
                        (a.json().await.unwrap(), b.json().await.unwrap());
                    assert_eq!(
                        (sa, &ja["error_code"]),
                        (sb, &jb["error_code"]),
                        "{repo} {env:?} {branch:?} {audience}"
                    );
                    allowed += usize::from(sa == 200);
                }
            }
        }
    }
    assert!(
        allowed >= 10,
        "the grid should contain allowed exchanges too ({allowed})"
    );
    // The deploy service's Production step on main gets a deploy-api token; the
    // audit line names the repository.
    let mut step = issuer.step();
    step.deployment_environment_uuid = Some(format!("{{{PROD_ENV}}}"));
    let r = by_name
        .exchange(&issuer.mint(&step), "deploy-api", None)
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let line = by_name.audit_lines().last().unwrap().clone();
    assert_eq!(line["repository_full_name"], "acme/deploy-service");
    assert_eq!(line["repositoryUuid"], format!("{{{REPO}}}"));
    let metrics = reqwest::get(format!("{}/metrics", by_name.address))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("sts_exchanges_by_repository_total{outcome=\"allowed\",repository=\"acme/deploy-service\"}"), "{metrics}");
}

/// The inventory reloads with the policies (file watch, recursive): a refreshed
/// inventory that no longer has a repository a policy names is refused like any
/// invalid set, and the previous set stays active.
#[tokio::test]
async fn the_inventory_reloads_with_the_policies_and_an_unresolvable_set_is_refused() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1..).await;
    let mut opts = Options::new(&kc.uri());
    opts.policies = vec![(
        "by-name.yaml".into(),
        allow_policy(
            "  repository: acme/deploy-service\n",
            "sts-artifacts",
            "artifact-api",
            "artifacts:read",
            "artifacts:read",
            300,
        ),
    )];
    let inventory = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/inventory/acme.yaml"),
    )
    .unwrap();
    // The app's policies directory is written by TestApp; add the inventory before it loads.
    let app_dir = tempfile::tempdir().unwrap();
    let pol = app_dir.path().join("policies");
    std::fs::create_dir_all(pol.join("inventory")).unwrap();
    std::fs::write(pol.join("inventory/acme.yaml"), &inventory).unwrap();
    for (name, yaml) in &opts.policies {
        std::fs::write(pol.join(name), yaml).unwrap();
    }
    opts.policies = Vec::new();
    opts.policies_dir = Some(pol.clone());
    let app = TestApp::start(&issuer, opts).await;
    let token = issuer.mint(&issuer.step());
    assert_eq!(
        app.exchange(&token, "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200
    );
    // The repository is renamed in a refreshed inventory: the name no longer resolves.
    std::fs::write(
        pol.join("inventory/acme.yaml"),
        inventory.replace("acme/deploy-service", "acme/deployer"),
    )
    .unwrap();
    assert!(
        crate::ops::eventually_reload_refused(&app.address).await,
        "the unresolvable set was not refused"
    );
    assert_eq!(
        app.exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200,
        "the previous set stays active"
    );
}

/// Outsider round on names: a project key of another workspace, a deny that
/// expands through the inventory, an alias bomb, and inventory files that would
/// be skipped are all refused.
#[test]
fn names_that_could_admit_more_or_deny_less_are_refused() {
    let acme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/inventory/acme.yaml"),
    )
    .unwrap();
    let beta = "workspace: beta\nworkspace_uuid: '{7d3f8c1a-0b6e-4f2d-9a8c-5e1b2c3d4e5f}'\nrepositories:\n- uuid: '{0e0e0e0e-1111-4222-8333-444455556666}'\n  full_name: beta/evil\n  project:\n    key: OPS\n    uuid: '{0e0e0e0e-1111-4222-8333-444455556667}'\n  environments:\n  - uuid: '{0e0e0e0e-1111-4222-8333-444455556668}'\n    name: Production\n";
    let check = |files: &[(&str, &str)]| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("inventory")).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        keycloak_ci_sts::policy::PolicySet::load_dir(dir.path(), None)
            .map(|_| ())
            .map_err(|e| {
                e.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
    };
    let allow = |when: &str| allow_policy(when, "c", "a", "s", "s", 60);
    let deny = |when: &str| format!("effect: deny\nwhen:\n{when}");
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![("inventory/acme.yaml", acme.clone()), ("inventory/beta.yaml", beta.into()), ("p.yaml", allow("  project: OPS\n"))], "several workspaces"),
        (vec![("inventory/acme.yaml", acme.clone()), ("inventory/beta.yaml", beta.into()), ("p.yaml", allow("  workspace: acme\n  repository: beta/evil\n"))], "names no repository"),
        (vec![("inventory/acme.yaml", acme.clone()), ("p.yaml", deny("  project: LAB\n"))], "a deny policy cannot name"),
        (vec![("inventory/acme.yaml", acme.clone()), ("p.yaml", deny("  repository: \"*/sandbox\"\n"))], "a deny policy cannot name"),
        (vec![("inventory/acme.yaml", acme.clone()), ("p.yaml", deny("  repository: acme/deploy-service\n  deploymentEnvironment: Production\n"))], "a deny policy cannot name"),
        (vec![("inventory/acme.yml", acme.clone())], "not a regular .yaml file"),
        (vec![("inventory/acme.YAML", acme.clone())], "not a regular .yaml file"),
        (vec![("inventory/bomb.yaml", "workspace: acme\nworkspace_uuid: '{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}'\nx: &e [1, 2]\nrepositories: *e\n".into())], "anchors and aliases"),
        (vec![("p.yaml", "effect: deny\nwhen: &w\n  branchName: x\n".into())], "anchors and aliases"),
    ];
    for (files, says) in cases {
        let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
        let e = check(&files).unwrap_err();
        assert!(e.contains(says), "{files:?}\n=> {e}");
    }
    // A deny by exact repository name is fine.
    assert!(check(&[
        ("inventory/acme.yaml", &acme),
        ("p.yaml", &deny("  repository: acme/sandbox\n"))
    ])
    .is_ok());
}

/// What the loader would refuse is never written: a repository of another
/// workspace in the answer, or a workspace ID that is not one.
#[tokio::test]
async fn an_inventory_the_loader_would_refuse_is_not_written() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/2.0/workspaces/acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"uuid": WS_BRACED})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/2.0/repositories/acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "values": [repo(REPO, "beta/deploy-service", "OPS")]})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(wiremock::matchers::path_regex(r"/environments$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"values": []})))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("acme.yaml");
    let out = inventory_cmd(&server.uri(), &out_file);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a repository of workspace"));
    assert!(!out_file.exists());
    let out = Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
        .env("BITBUCKET_TOKEN", TOKEN)
        .args(["bitbucket", "inventory", "--workspace", "AC\nME", "--api"])
        .arg(format!("{}/2.0", server.uri()))
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a workspace ID"));
}

// ----- Issue 20 item 4: rate limits, incremental and resumable runs -----

const NEW_REPO: &str = "7c6d5e4f-3a2b-4c1d-8e9f-0a1b2c3d4e5f";

/// A fake workspace listing `repos` (UUID, `updated_on`) in one page, each
/// with one environment; `refuse` answers 403 to that repository's environments.
async fn fake_org(repos: &[(&str, &str)], refuse: Option<&str>) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/2.0/workspaces/acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"uuid": WS_BRACED})))
        .mount(&server)
        .await;
    let values: Vec<Value> = repos
        .iter()
        .map(|(u, at)| {
            let mut r = repo(u, &format!("acme/r-{}", &u[..8]), "OPS");
            r["updated_on"] = json!(at);
            r
        })
        .collect();
    Mock::given(method("GET"))
        .and(path("/2.0/repositories/acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"values": values})))
        .mount(&server)
        .await;
    for (u, _) in repos {
        let answer = if refuse == Some(*u) {
            ResponseTemplate::new(403)
        } else {
            // an environment UUID derived from the repository's
            let env = format!("{}-0000-4000-8000-000000000000", &u[..8]);
            ResponseTemplate::new(200).set_body_json(
                json!({"values": [{"uuid": format!("{{{env}}}"), "name": "Production"}]}),
            )
        };
        Mock::given(method("GET"))
            .and(path(format!(
                "/2.0/repositories/acme/%7B{u}%7D/environments"
            )))
            .respond_with(answer)
            .mount(&server)
            .await;
    }
    server
}

/// The repositories (first 8 hex digits) whose environments were requested.
async fn environment_calls(server: &MockServer) -> Vec<String> {
    let mut calls: Vec<String> = server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path().ends_with("/environments"))
        .map(|r| r.url.path().split("%7B").nth(1).unwrap_or_default()[..8].to_string())
        .collect();
    calls.sort();
    calls
}

fn short(u: &str) -> String {
    u[..8].to_string()
}

#[tokio::test]
async fn a_second_run_reads_environments_only_of_new_and_updated_repositories() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("acme.yaml");
    let (t1, t2) = ("2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00");
    let first = fake_org(&[(REPO, t1), (OTHER_REPO, t1), (SANDBOX_REPO, t1)], None).await;
    let out = inventory_cmd(&first.uri(), &out_file);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(environment_calls(&first).await.len(), 3);
    // REPO updated, OTHER_REPO unchanged, SANDBOX_REPO gone, NEW_REPO new.
    let second = fake_org(&[(REPO, t2), (OTHER_REPO, t1), (NEW_REPO, t1)], None).await;
    let out = inventory_cmd(&second.uri(), &out_file);
    assert!(out.status.success(), "{out:?}");
    let mut want = vec![short(REPO), short(NEW_REPO)];
    want.sort();
    assert_eq!(
        environment_calls(&second).await,
        want,
        "environments read again for an unchanged repository"
    );
    let text = std::fs::read_to_string(&out_file).unwrap();
    for u in [REPO, OTHER_REPO, NEW_REPO] {
        let env = format!("{}-0000-4000-8000-000000000000", &u[..8]);
        assert!(text.contains(&env), "{u}'s environment missing:\n{text}");
    }
    assert!(
        !text.contains(SANDBOX_REPO),
        "a deleted repository kept:\n{text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read for 2 repositories, unchanged for 1"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_run_stopped_midway_resumes_without_reading_again_what_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("acme.yaml");
    let t = "2026-01-01T00:00:00+00:00";
    let repos = [(REPO, t), (OTHER_REPO, t), (SANDBOX_REPO, t)];
    // Listed order: REPO read, then OTHER_REPO's environments refused.
    let failing = fake_org(&repos, Some(OTHER_REPO)).await;
    let out = inventory_cmd(&failing.uri(), &out_file);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!out_file.exists(), "an incomplete inventory was written");
    let stopped = String::from_utf8_lossy(&out.stderr).to_string();
    let healthy = fake_org(&repos, None).await;
    let out = inventory_cmd(&healthy.uri(), &out_file);
    assert!(out.status.success(), "{out:?}");
    let mut want = vec![short(OTHER_REPO), short(SANDBOX_REPO)];
    want.sort();
    assert_eq!(
        environment_calls(&healthy).await,
        want,
        "the resumed run read again what the stopped one had read"
    );
    let text = std::fs::read_to_string(&out_file).unwrap();
    assert!(
        text.contains("d4e45493-0000-4000-8000-000000000000"),
        "{text}"
    );
    assert!(stopped.contains("run again to continue"), "{stopped}");
}

/// 429 and 503 with `Retry-After` are waited out (a short `--max-wait`
/// injected: no real wait in the test); `X-RateLimit-NearLimit` spaces the
/// requests; a `Retry-After` past `--max-wait` stops the run at once, its
/// progress kept.
#[tokio::test]
async fn retry_after_is_honoured_up_to_max_wait_and_past_it_the_run_stops() {
    let t = "2026-01-01T00:00:00+00:00";
    let server = fake_org(&[(REPO, t), (OTHER_REPO, t)], None).await;
    let env_path = format!("/2.0/repositories/acme/%7B{OTHER_REPO}%7D/environments");
    for status in [429, 503] {
        Mock::given(method("GET"))
            .and(path(env_path.as_str()))
            .respond_with(
                ResponseTemplate::new(status)
                    .insert_header("Retry-After", "0")
                    .insert_header("X-RateLimit-NearLimit", "true")
                    .insert_header("X-RateLimit-Limit", "1000")
                    .insert_header("X-RateLimit-Resource", "api"),
            )
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&server)
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("acme.yaml");
    let run = |uri: String, out_file: std::path::PathBuf| {
        Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
            .env("BITBUCKET_TOKEN", TOKEN)
            .args([
                "bitbucket",
                "inventory",
                "--workspace",
                "acme",
                "--max-wait",
                "0.05",
                "--api",
            ])
            .arg(format!("{uri}/2.0"))
            .arg("--out")
            .arg(out_file)
            .output()
            .unwrap()
    };
    let out = run(server.uri(), out_file.clone());
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        environment_calls(&server).await,
        vec![
            short(OTHER_REPO),
            short(OTHER_REPO),
            short(OTHER_REPO),
            short(REPO)
        ]
    );
    // A wait of an hour asked, at most 0.05 s allowed: stopped, not waited.
    let limited = fake_org(&[(REPO, t), (NEW_REPO, t)], None).await;
    Mock::given(method("GET"))
        .and(path(format!(
            "/2.0/repositories/acme/%7B{NEW_REPO}%7D/environments"
        )))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "3600"))
        .with_priority(1)
        .mount(&limited)
        .await;
    let started = std::time::Instant::now();
    let out = run(limited.uri(), out_file.clone());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("asks to wait 3600 s") && stderr.contains("run again to continue"),
        "{stderr}"
    );
    assert_eq!(environment_calls(&limited).await, vec![short(NEW_REPO)]);
}

/// SIGTERM while a request is outstanding: exit 143, `--out` not written, the
/// environments read so far kept in the state, and the next run reads only
/// the rest.
#[tokio::test]
async fn a_run_ended_by_sigterm_keeps_its_progress_for_the_next_run() {
    let t = "2026-01-01T00:00:00+00:00";
    let repos = [(REPO, t), (OTHER_REPO, t), (SANDBOX_REPO, t)];
    let stalled = fake_org(&repos, None).await;
    Mock::given(method("GET"))
        .and(path(format!(
            "/2.0/repositories/acme/%7B{SANDBOX_REPO}%7D/environments"
        )))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"values": []}))
                .set_delay(std::time::Duration::from_secs(60)),
        )
        .with_priority(1)
        .mount(&stalled)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("acme.yaml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
        .env("BITBUCKET_TOKEN", TOKEN)
        .args(["bitbucket", "inventory", "--workspace", "acme", "--api"])
        .arg(format!("{}/2.0", stalled.uri()))
        .arg("--out")
        .arg(&out_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded waits on conditions: the stalled request arrived; the process ended.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while environment_calls(&stalled).await.len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(environment_calls(&stalled).await.len(), 3);
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGTERM did not end the run"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(143), "{status:?}");
    assert!(!out_file.exists(), "an incomplete inventory was written");
    let healthy = fake_org(&repos, None).await;
    let out = inventory_cmd(&healthy.uri(), &out_file);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(environment_calls(&healthy).await, vec![short(SANDBOX_REPO)]);
}
