//! `POST /grants` (capability discovery) and agent-marked steps, through the
//! running service with a wiremock Keycloak: what it lists, that it never calls
//! Keycloak, leaks nothing about the policies, is audited, has its own budget;
//! that `/token` then allows exactly what it listed (property test over
//! generated policy sets); and the shipped agent deny (`deny-agent-deploy`).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

use crate::helpers::*;

/// The audience marker of the shipped `deny-agent-deploy` policy.
pub const AGENT_MARKER: &str = "https://sts.example.test/agent";

/// A step of REPO on main; `production`: a Production deployment step;
/// `agent`: the step declares the agent marker among its OIDC audiences.
pub fn step(issuer: &Issuer, production: bool, agent: bool) -> String {
    let mut c = issuer.step();
    if production {
        c.deployment_environment_uuid = Some(format!("{{{PROD_ENV}}}"));
    }
    if agent {
        c.audiences.push(AGENT_MARKER.into());
    }
    issuer.mint(&c)
}

async fn listed(app: &TestApp, token: &str) -> Value {
    let r = app.grants(token).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    r.json().await.unwrap()
}

fn audiences(body: &Value) -> Vec<&str> {
    body["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["audience"].as_str().unwrap())
        .collect()
}

fn grant<'a>(body: &'a Value, audience: &str) -> &'a Value {
    body["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["audience"] == audience)
        .unwrap_or_else(|| panic!("no grant for {audience} in {body}"))
}

#[tokio::test]
async fn grants_list_what_the_step_may_obtain_and_never_call_keycloak() {
    let (issuer, kc, app) = standard().await;
    kc.token_never_called().await;

    // main, no deployment: artifacts and its own release identity; no deploy-api.
    let build = listed(&app, &step(&issuer, false, false)).await;
    assert_eq!(audiences(&build), ["artifact-api", "release-api"]);
    assert_eq!(
        grant(&build, "artifact-api"),
        &json!({"audience": "artifact-api", "scopes": ["artifacts:read", "artifacts:write"],
                "default_scopes": ["artifacts:read"], "max_lifetime_seconds": 300})
    );
    assert_eq!(build["repository"], "acme/deploy-service");
    assert_eq!(build["identity"]["repositoryUuid"], format!("{{{REPO}}}"));
    assert_eq!(build["identity"]["branchName"], "main");

    // The Production deployment step of main: deploy-api with deploy:production.
    let deploy = listed(&app, &step(&issuer, true, false)).await;
    assert_eq!(
        grant(&deploy, "deploy-api"),
        &json!({"audience": "deploy-api", "scopes": ["artifacts:read", "deploy:production"],
                "default_scopes": ["deploy:production"], "max_lifetime_seconds": 300})
    );

    // The same step marked as an agent's: deploy:production is gone, and with it
    // the default (it named the refused scope): the agent must name what it reads.
    let agent = listed(&app, &step(&issuer, true, true)).await;
    assert_eq!(
        grant(&agent, "deploy-api"),
        &json!({"audience": "deploy-api", "scopes": ["artifacts:read"],
                "default_scopes": null, "max_lifetime_seconds": 300})
    );
    assert!(agent["identity"]["aud"]
        .as_array()
        .unwrap()
        .contains(&json!(AGENT_MARKER)));

    // A repository a deny policy refuses entirely: nothing.
    let mut c = issuer.step();
    c.repository_uuid = format!("{{{SANDBOX_REPO}}}");
    let sandbox = listed(&app, &issuer.mint(&c)).await;
    assert_eq!(sandbox["grants"], json!([]));

    // Nothing about the policies themselves: no ids, clients, patterns or deny rules.
    for body in [&build, &deploy, &agent, &sandbox] {
        let text = body.to_string();
        for secret in [
            "deploy-production",
            "deny-agent-deploy",
            "deny-sandbox",
            "artifacts-publish",
            "sts-deploy",
            "sts-artifacts",
            "sts-repo",
            "release/**",
            "policy",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }

    // One audit line each, event grants, with the listed audiences and the markers.
    let lines = app.audit_lines();
    assert_eq!(lines.len(), 4);
    assert!(lines.iter().all(|l| l["event"] == "grants"
        && l["outcome"] == "allowed"
        && l["token_sha256"].is_null()));
    assert_eq!(
        lines[0]["listed_audiences"],
        json!(["artifact-api", "release-api"])
    );
    assert!(lines[2]["aud"]
        .as_array()
        .unwrap()
        .contains(&json!(AGENT_MARKER)));
    assert_eq!(lines[3]["listed_audiences"], json!([]));
    assert_eq!(kc.token_calls().await, 0);
}

#[tokio::test]
async fn bad_subject_tokens_get_the_same_codes_as_on_token() {
    let (issuer, kc, app) = standard().await;
    kc.token_never_called().await;
    let mut expired = issuer.claims(&issuer.step());
    expired["exp"] = json!(1_000_000);
    expired["iat"] = json!(999_000);
    let mut wrong_aud = issuer.claims(&issuer.step());
    wrong_aud["aud"] = json!("https://elsewhere.example");
    let genuine = issuer.mint(&issuer.step());
    let tampered = format!("{}x", genuine);
    for token in [
        "not-a-jwt".to_string(),
        issuer.sign(&expired),
        issuer.sign(&wrong_aud),
        tampered,
    ] {
        let t = app.exchange(&token, "artifact-api", None).await;
        let g = app.grants(&token).await;
        assert_eq!(g.status(), t.status());
        let (t, g): (Value, Value) = (t.json().await.unwrap(), g.json().await.unwrap());
        assert_eq!(g["error_code"], t["error_code"], "{g}");
        assert!(g["error_code"].as_str().unwrap().starts_with("token."));
        assert!(g["request_id"].is_string());
    }
    // The form: a missing subject_token, an unsupported type.
    let r = app
        .http
        .post(format!("{}/grants", app.address))
        .form(&[("subject_token_type", ID_TOKEN_TYPE)])
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request", "request.missing_subject_token").await;
    let r = app
        .http
        .post(format!("{}/grants", app.address))
        .form(&[
            ("subject_token", genuine.as_str()),
            ("subject_token_type", "urn:x"),
        ])
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        400,
        "invalid_request",
        "request.unsupported_subject_token_type",
    )
    .await;
    let r = app.get("/grants").await;
    assert_eq!(r.status().as_u16(), 405);
    let lines = app.audit_lines();
    assert!(lines
        .iter()
        .filter(|l| l["event"] == "grants")
        .all(|l| l["outcome"] == "denied"));
}

#[tokio::test]
async fn grants_have_a_budget_of_their_own() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let mut opts = Options::new(&kc.uri());
    opts.grants_per_step_per_minute = 2;
    opts.per_step_per_minute = 1;
    let app = TestApp::start(&issuer, opts).await;
    let token = step(&issuer, false, false);
    for _ in 0..2 {
        assert_eq!(app.grants(&token).await.status().as_u16(), 200);
    }
    let r = app.grants(&token).await;
    assert!(r.headers().get("retry-after").is_some());
    assert_error(r, 429, "temporarily_unavailable", "limit.grants_exceeded").await;
    // Listing used none of the exchange budget (1 per step), nor the reverse.
    assert_eq!(
        app.exchange(&token, "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200
    );
}

#[tokio::test]
async fn agent_marked_steps_read_but_never_deploy() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read deploy:production", 2).await;
    let agent = step(&issuer, true, true);
    // Asking for the refused scope, or for the default that holds it: denied,
    // by the deny policy, and Keycloak is not asked.
    for scope in [
        Some("deploy:production"),
        None,
        Some("artifacts:read deploy:production"),
    ] {
        let body = assert_error(
            app.exchange(&agent, "deploy-api", scope).await,
            400,
            "invalid_request",
            "policy.denied",
        )
        .await;
        assert!(!body.to_string().contains("deny-agent-deploy"));
    }
    assert_eq!(kc.token_calls().await, 0);
    // Reading is left: the agent names the scope it needs.
    let r = app
        .exchange(&agent, "deploy-api", Some("artifacts:read"))
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["scope"], "artifacts:read");
    // The deployment step of the same repository, unmarked, deploys.
    let r = app
        .exchange(&step(&issuer, true, false), "deploy-api", None)
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["scope"], "deploy:production");
    // The audit shows the marker on the refused lines and who decided.
    let lines = app.audit_lines();
    let denied = &lines[0];
    assert_eq!(denied["policy"], "deny-agent-deploy");
    assert!(denied["aud"]
        .as_array()
        .unwrap()
        .contains(&json!(AGENT_MARKER)));
}

// ------------------------------------------------------- /grants predicts /token

const SCOPES: [&str; 3] = ["artifacts:read", "artifacts:write", "deploy:production"];
const MARKERS: [&str; 2] = [AGENT_MARKER, "https://sts.example.test/release"];

/// One generated policy file: allow (repository or workspace, optional branch,
/// environment and marker conditions, a grant of 1-3 scopes) or deny (conditions,
/// optional audiences and scopes).
/// `when:` lines: the repository or the workspace, then a branch, the
/// Production environment and a marker, each present with its probability.
fn when(branch: f64, env: f64, marker: f64) -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        proptest::option::weighted(branch, prop_oneof![Just("main"), Just("release/*")]),
        proptest::bool::weighted(env),
        proptest::option::weighted(marker, 0usize..2),
    )
        .prop_map(|(by_repo, branch, env, marker)| {
            let mut w = if by_repo {
                format!("  repositoryUuid: \"{{{REPO}}}\"\n")
            } else {
                format!("  workspaceUuid: \"{{{WS}}}\"\n")
            };
            if let Some(b) = branch {
                w += &format!("  branchName: \"{b}\"\n");
            }
            if env {
                w += &format!("  deploymentEnvironmentUuid: \"{{{PROD_ENV}}}\"\n");
            }
            if let Some(m) = marker {
                w += &format!("  aud: \"{}\"\n", MARKERS[m]);
            }
            w
        })
}

fn policy() -> impl Strategy<Value = String> {
    let allow = (
        when(0.5, 0.5, 0.3),
        0usize..2,
        proptest::sample::subsequence(SCOPES.to_vec(), 1..=3),
        1usize..3,
        prop_oneof![Just(60u64), Just(120), Just(300)],
    )
        .prop_map(|(when, aud, scopes, defaults, max)| {
            let (client, audience) = [
                ("sts-artifacts", "artifact-api"),
                ("sts-deploy", "deploy-api"),
            ][aud];
            allow_policy(
                &when,
                client,
                audience,
                &scopes.join(", "),
                &scopes[..defaults.min(scopes.len())].join(", "),
                max,
            )
        });
    // Denies match often (few conditions) and mostly refuse scopes, so that
    // scope-narrowed offers are common.
    let deny = (
        when(0.2, 0.2, 0.5),
        proptest::option::of(0usize..2),
        proptest::option::weighted(0.8, proptest::sample::subsequence(SCOPES.to_vec(), 1..=2)),
    )
        .prop_map(|(when, aud, scopes)| {
            let mut y = format!("effect: deny\nwhen:\n{when}");
            if let Some(a) = aud {
                y += &format!("audiences: [{}]\n", ["artifact-api", "deploy-api"][a]);
            }
            if let Some(s) = scopes {
                y += &format!("scopes: [{}]\n", s.join(", "));
            }
            y
        });
    prop_oneof![2 => allow, 1 => deny]
}

#[test]
fn what_grants_lists_is_exactly_what_token_then_allows() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let issuer = rt.block_on(Issuer::start());
    let mut runner = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(policy(), 1..5),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(0usize..2),
    );
    runner
        .run(&strategy, |(files, on_main, production, marker)| {
            rt.block_on(async {
                let kc = FakeKeycloak::start().await;
                kc.token_ok(60, &SCOPES.join(" "), ..).await;
                let mut opts = Options::new(&kc.uri());
                opts.identity = false;
                opts.policies = files
                    .iter()
                    .enumerate()
                    .map(|(i, y)| (format!("p{i}.yaml"), y.clone()))
                    .collect();
                let app = TestApp::start(&issuer, opts).await;
                let mut c = issuer.step();
                c.branch_name = Some(if on_main { "main" } else { "release/2" }.into());
                if production {
                    c.deployment_environment_uuid = Some(format!("{{{PROD_ENV}}}"));
                }
                if let Some(m) = marker {
                    c.audiences.push(MARKERS[m].into());
                }
                let token = issuer.mint(&c);
                let listed = listed(&app, &token).await;
                let offers = listed["grants"].as_array().unwrap().clone();
                for audience in ["artifact-api", "deploy-api"] {
                    let mine: Vec<&Value> = offers
                        .iter()
                        .filter(|o| o["audience"] == audience)
                        .collect();
                    for mask in 0u8..8 {
                        let scopes: Vec<&str> = (0..3)
                            .filter(|i| mask & (1 << i) != 0)
                            .map(|i| SCOPES[i])
                            .collect();
                        let has = |o: &Value, s: &str| {
                            o["scopes"].as_array().unwrap().iter().any(|x| x == s)
                        };
                        let predicted: Option<Vec<String>> = if scopes.is_empty() {
                            mine.iter().find_map(|o| {
                                o["default_scopes"].as_array().map(|d| {
                                    d.iter().map(|x| x.as_str().unwrap().to_string()).collect()
                                })
                            })
                        } else {
                            mine.iter()
                                .find(|o| scopes.iter().all(|s| has(o, s)))
                                .map(|_| scopes.iter().map(|s| s.to_string()).collect())
                        };
                        let scope = scopes.join(" ");
                        let r = app
                            .exchange(
                                &token,
                                audience,
                                (!scope.is_empty()).then_some(scope.as_str()),
                            )
                            .await;
                        let status = r.status().as_u16();
                        let body: Value = r.json().await.unwrap();
                        match predicted {
                            Some(want) => {
                                prop_assert_eq!(
                                    status,
                                    200,
                                    "{} {:?}: {} (listed {})",
                                    audience,
                                    scopes,
                                    body,
                                    listed
                                );
                                let got: Vec<&str> =
                                    body["scope"].as_str().unwrap().split(' ').collect();
                                let mut want_sorted = want.clone();
                                want_sorted.sort();
                                let mut got_sorted: Vec<String> =
                                    got.iter().map(|s| s.to_string()).collect();
                                got_sorted.sort();
                                prop_assert_eq!(got_sorted, want_sorted);
                            }
                            None => {
                                prop_assert!(
                                    (400..500).contains(&status)
                                        && body["error_code"]
                                            .as_str()
                                            .unwrap()
                                            .starts_with("policy."),
                                    "{} {:?}: {} {} (listed {})",
                                    audience,
                                    scopes,
                                    status,
                                    body,
                                    listed
                                );
                            }
                        }
                    }
                }
                Ok(())
            })
        })
        .unwrap();
}

/// A marker equal to an audience every ordinary step carries marks nothing:
/// `config check` says so (the service logs the same warning at startup).
#[tokio::test]
async fn config_check_warns_about_markers_that_mark_nothing() {
    let issuer = Issuer::start().await;
    let mut opts = Options::new("http://127.0.0.1:9");
    opts.identity = false;
    opts.policies = vec![(
        "marked.yaml".into(),
        allow_policy(
            &format!(
                "{}  branchName: main\n  aud: [\"{STS_AUDIENCE}\", \"{AGENT_MARKER}\"]\n",
                when_repo()
            ),
            "sts-artifacts",
            "artifact-api",
            "artifacts:read",
            "artifacts:read",
            60,
        ),
    )];
    let (dir, _, _) = TestApp::write_config(&issuer, opts);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
        .args(["config", "check", "--no-secrets", "--config"])
        .arg(dir.path().join("sts.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].contains(&format!("`when.aud` value `{STS_AUDIENCE}`"))
            && warnings[0].contains("marks nothing"),
        "{err}"
    );
}
