//! The inputs that broke real integrations (`tests/api/cases.md`, collected from
//! public reports against systems that consume Bitbucket tokens), one test each,
//! numbered as in that file.

use serde_json::json;

use crate::helpers::*;

async fn denied_no_keycloak(
    app: &TestApp,
    kc: &FakeKeycloak,
    token: &str,
    audience: &str,
    code: &str,
) -> serde_json::Value {
    let r = app.exchange(token, audience, None).await;
    let body = assert_error(
        r,
        400,
        if code == "policy.unknown_audience" {
            "invalid_target"
        } else {
            "invalid_request"
        },
        code,
    )
    .await;
    assert_eq!(
        kc.token_calls().await,
        0,
        "a refused request reached Keycloak"
    );
    body
}

#[tokio::test]
async fn case_01_default_aud_when_service_expects_another_is_rejected() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_never_called().await;
    let app = TestApp::start(&issuer, Options::new(&kc.uri())).await;
    // The other workspace accepts only its default ARI; a token with acme's ARI cannot pass.
    let mut step = issuer.step();
    step.audiences = vec![];
    let mut c = issuer.claims(&step);
    c["iss"] = json!(issuer.issuer_url(OTHER_WS_SLUG));
    c["workspaceUuid"] = json!(format!("{{{OTHER_WS}}}"));
    let body = denied_no_keycloak(
        &app,
        &kc,
        &issuer.sign(&c),
        "artifact-api",
        "token.audience_not_accepted",
    )
    .await;
    assert!(body["error_description"].as_str().unwrap().contains("aud"));
}

#[tokio::test]
async fn case_02_missing_or_empty_subject_token() {
    let (_issuer, kc, app) = standard().await;
    kc.token_never_called().await;
    for form in [
        vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token_type", ID_TOKEN_TYPE),
            ("audience", "artifact-api"),
        ],
        vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", ""),
            ("subject_token_type", ID_TOKEN_TYPE),
            ("audience", "artifact-api"),
        ],
        vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", "  \n"),
            ("subject_token_type", ID_TOKEN_TYPE),
            ("audience", "artifact-api"),
        ],
    ] {
        let r = app.post_token(&form).await;
        let body = assert_error(r, 400, "invalid_request", "request.missing_subject_token").await;
        assert!(body["error_description"]
            .as_str()
            .unwrap()
            .contains("subject_token is missing"));
    }
}

#[test]
fn case_03_unquoted_braced_uuid_in_policy_yaml_names_file_key_and_says_quote() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        format!("effect: allow\nwhen:\n  repositoryUuid: {{{REPO}}}\ngrant:\n  client: c\n  audience: a\n  scopes: [s]\n  default_scopes: [s]\n  max_lifetime_seconds: 60\n"),
    )
    .unwrap();
    let errs = keycloak_ci_sts::policy::PolicySet::load_dir(dir.path(), None).unwrap_err();
    let msg = errs[0].to_string();
    assert!(msg.contains("bad.yaml"), "{msg}");
    assert!(msg.contains("when.repositoryUuid"), "{msg}");
    assert!(msg.contains("quote"), "{msg}");
}

#[test]
fn case_03_unquoted_braced_uuid_in_config_says_quote() {
    let text = format!("[[workspaces]]\nslug = \"acme\"\nuuid = {{{WS}}}\n");
    // TOML rejects the bare braces outright; the loader reports file and reason.
    let e =
        keycloak_ci_sts::configuration::Settings::from_toml_str(&text, std::path::Path::new("."))
            .unwrap_err();
    assert!(!e.reason.is_empty());
}

#[tokio::test]
async fn case_04_aud_array_with_accepted_element_is_accepted() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let c = issuer.claims(&issuer.step());
    assert!(c["aud"].is_array());
    let r = app.exchange(&issuer.sign(&c), "artifact-api", None).await;
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn case_05_aud_string_equal_to_accepted_audience_is_accepted() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 2).await;
    let mut c = issuer.claims(&issuer.step());
    c["aud"] = json!(STS_AUDIENCE);
    let r = app.exchange(&issuer.sign(&c), "artifact-api", None).await;
    assert_eq!(
        r.status().as_u16(),
        200,
        "aud = the service's audience, as a string"
    );
    // Bitbucket's default workspace audience alone: accepted only where the operator
    // opted in (`accept_default_audience = true`, the second test workspace)...
    let mut c = issuer.claims(&issuer.step());
    c["iss"] = json!(issuer.issuer_url(OTHER_WS_SLUG));
    c["workspaceUuid"] = json!(format!("{{{OTHER_WS}}}"));
    c["aud"] = json!(format!("ari:cloud:bitbucket::workspace/{OTHER_WS}"));
    let r = app.exchange(&issuer.sign(&c), "artifact-api", None).await;
    // (the policy does not cover that workspace: refused by policy, i.e. past the audience check)
    let body = assert_error(r, 400, "invalid_request", "policy.workspace_not_allowed").await;
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains(OTHER_WS));
    // ...and refused by default, since every step token of the workspace carries it.
    let mut c = issuer.claims(&issuer.step());
    c["aud"] = json!(format!("ari:cloud:bitbucket::workspace/{WS}"));
    let r = app.exchange(&issuer.sign(&c), "artifact-api", None).await;
    assert_error(r, 400, "invalid_request", "token.audience_not_accepted").await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn case_06_braced_and_bare_uuids_in_policies_mean_the_same_repository() {
    let issuer = Issuer::start().await;
    for written in [REPO.to_string(), format!("{{{REPO}}}"), REPO.to_uppercase()] {
        let kc = FakeKeycloak::start().await;
        kc.token_ok(60, "artifacts:read", 1).await;
        let mut opts = Options::new(&kc.uri());
        opts.policies = vec![(
            "p.yaml".into(),
            allow_policy(
                &format!("  repositoryUuid: \"{written}\"\n"),
                "sts-artifacts",
                "artifact-api",
                "artifacts:read",
                "artifacts:read",
                300,
            ),
        )];
        let app = TestApp::start(&issuer, opts).await;
        let r = app
            .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
            .await;
        assert_eq!(r.status().as_u16(), 200, "policy written as {written}");
    }
}

#[test]
fn case_07_config_ari_audience_with_braces_is_rejected() {
    let text = format!(
        "[[workspaces]]\nslug = \"acme\"\nuuid = \"{WS}\"\naudiences = [\"ari:cloud:bitbucket::workspace/{{{WS}}}\"]\n[keycloak]\nbase_url = \"http://127.0.0.1:1\"\nrealm = \"ci\"\n[keycloak.clients.c]\nmethod = \"client_secret_basic\"\nsecret_env = \"PATH\"\n"
    );
    let e =
        keycloak_ci_sts::configuration::Settings::from_toml_str(&text, std::path::Path::new("."))
            .unwrap_err();
    assert!(e.reason.contains("no braces"), "{e}");
}

#[tokio::test]
async fn case_08_repository_rule_admits_every_step_of_the_repository() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 3).await;
    for _ in 0..3 {
        // Each mint has a new stepUuid, so a new sub.
        let r = app
            .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
            .await;
        assert_eq!(r.status().as_u16(), 200);
    }
}

#[tokio::test]
async fn case_09_missing_environment_never_counts_as_wildcard() {
    let (issuer, kc, app) = standard().await;
    let body = denied_no_keycloak(
        &app,
        &kc,
        &issuer.mint(&issuer.step()),
        "deploy-api",
        "policy.environment_missing",
    )
    .await;
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("deploymentEnvironmentUuid"));
}

#[tokio::test]
async fn case_10_missing_or_empty_branch_is_denied_where_required_and_admitted_where_not() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let mut opts = Options::new(&kc.uri());
    opts.policies = vec![
        (
            "needs-main.yaml".into(),
            allow_policy(
                &format!("{}  branchName: main\n", when_repo()),
                "sts-artifacts",
                "with-branch",
                "artifacts:read",
                "artifacts:read",
                300,
            ),
        ),
        (
            "any-branch.yaml".into(),
            allow_policy(
                &when_repo(),
                "sts-artifacts",
                "artifact-api",
                "artifacts:read",
                "artifacts:read",
                300,
            ),
        ),
    ];
    let app = TestApp::start(&issuer, opts).await;
    let mut tag = issuer.step();
    tag.branch_name = None;
    let mut empty = issuer.step();
    empty.branch_name = Some(String::new());
    for step in [&tag, &empty] {
        let r = app.exchange(&issuer.mint(step), "with-branch", None).await;
        assert_error(r, 400, "invalid_request", "policy.branch_missing").await;
    }
    assert_eq!(kc.token_calls().await, 0);
    let r = app.exchange(&issuer.mint(&tag), "artifact-api", None).await;
    assert_eq!(
        r.status().as_u16(),
        200,
        "no branch condition admits a tag build"
    );
}

#[tokio::test]
async fn case_11_token_meant_for_another_service_is_rejected_by_audience() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    c["aud"] = json!(["https://vault.example.test"]);
    denied_no_keycloak(
        &app,
        &kc,
        &issuer.sign(&c),
        "artifact-api",
        "token.audience_not_accepted",
    )
    .await;
}

#[tokio::test]
async fn case_12_token_without_jti_and_nbf_is_accepted() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let c = issuer.claims(&issuer.step());
    assert!(c.get("jti").is_none() && c.get("nbf").is_none());
    let r = app.exchange(&issuer.sign(&c), "artifact-api", None).await;
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn case_13_future_iat_and_past_exp_have_distinct_codes() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    let now = c["iat"].as_u64().unwrap();
    c["iat"] = json!(now + 600);
    c["exp"] = json!(now + 4200);
    denied_no_keycloak(
        &app,
        &kc,
        &issuer.sign(&c),
        "artifact-api",
        "token.issued_in_future",
    )
    .await;
    let mut c = issuer.claims(&issuer.step());
    c["iat"] = json!(now - 3900);
    c["exp"] = json!(now - 300);
    denied_no_keycloak(&app, &kc, &issuer.sign(&c), "artifact-api", "token.expired").await;
}
