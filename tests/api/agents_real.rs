//! Issue 12 against the real Keycloak (`scripts/test.sh` starts it; `#[ignore]`d
//! in a plain `cargo test`, failing, never skipping, without it): an agent in an
//! agent-marked Production deployment step, connected over MCP, lists its grants
//! and obtains a real read-only Keycloak token, and is refused deploy; the
//! unmarked deployment step of the same repository obtains the deploy token
//! with `keycloak-ci-sts token`.

use serde_json::{json, Value};

use crate::grants::step;
use crate::keycloak_real::{aud_set, real_keycloak, scope_set, setup, KEYCLOAK_LOCK};
use crate::mcp::{agent, call, outcome};
use crate::token_cli::run;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real Keycloak: scripts/test.sh runs it"]
async fn real_keycloak_an_agent_over_mcp_reads_and_the_deploy_step_deploys() {
    let kc = real_keycloak();
    let _guard = KEYCLOAK_LOCK.lock().await;
    let (issuer, app) = setup(&kc, None).await;

    // The agent: lists, then obtains the narrowest scope; the token is real.
    let dir = app.dir.path().join("agent-tokens");
    let client = agent(
        &app.address,
        &step(&issuer, true, true),
        &["--token-dir", dir.to_str().unwrap()],
    )
    .await;
    let (err, listed) = outcome(&call(&client, "list_grants", json!({})).await);
    assert!(!err, "{listed}");
    let deploy = listed["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["audience"] == "deploy-api")
        .unwrap()
        .clone();
    assert_eq!(deploy["scopes"], json!(["artifacts:read"]));
    let (err, got) = outcome(
        &call(
            &client,
            "get_token",
            json!({"audience": "deploy-api", "scopes": ["artifacts:read"]}),
        )
        .await,
    );
    assert!(!err, "{got}");
    let token = std::fs::read_to_string(got["token_file"].as_str().unwrap()).unwrap();
    let claims = kc.verify(&app.http, &token).await;
    assert_eq!(claims["azp"], "sts-deploy");
    assert_eq!(
        scope_set(claims["scope"].as_str().unwrap()),
        ["artifacts:read"]
    );
    assert_eq!(aud_set(&claims), ["artifact-api"]);
    assert_eq!(
        claims["resource_access"]["artifact-api"]["roles"],
        json!(["read"])
    );
    assert!(claims["resource_access"]["deploy-api"].is_null());
    // Deploy is refused, whether named or through the defaults; the code surfaces.
    for args in [
        json!({"audience": "deploy-api", "scopes": ["deploy:production"]}),
        json!({"audience": "deploy-api"}),
    ] {
        let (err, refused) = outcome(&call(&client, "get_token", args).await);
        assert!(err);
        assert_eq!(refused["error_code"], "policy.denied", "{refused}");
        assert!(refused["request_id"].is_string());
    }
    client.cancel().await.unwrap();

    // The deployment step itself (no marker), with the client command: deploys.
    let file = app.dir.path().join("deploy.token");
    let out = run(
        &app,
        Some(step(&issuer, true, false)),
        &[
            "--audience",
            "deploy-api",
            "--output",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let claims = kc
        .verify(&app.http, &std::fs::read_to_string(&file).unwrap())
        .await;
    assert_eq!(
        scope_set(claims["scope"].as_str().unwrap()),
        ["deploy:production"]
    );
    assert_eq!(
        claims["resource_access"]["deploy-api"]["roles"],
        json!(["deploy"])
    );
    // The client command's refusals name the code: the agent-marked step again.
    let out = run(
        &app,
        Some(step(&issuer, true, true)),
        &["--audience", "deploy-api", "--stdout"],
    )
    .await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("policy.denied"), "{}", out.stderr);
    assert!(out.stdout.is_empty());

    // The audit trail ties each line to the step and shows the marker.
    let lines: Vec<Value> = app.audit_lines();
    let issued: Vec<&Value> = lines
        .iter()
        .filter(|l| l["outcome"] == "allowed" && l["event"] == "exchange")
        .collect();
    assert_eq!(issued.len(), 2);
    assert!(issued.iter().all(|l| l["token_sha256"].is_string()));
}
