//! `keycloak plan/apply` against the real Keycloak started by
//! `scripts/keycloak.sh`, in realm `prov` (`tests/keycloak/realm-prov.json`: the
//! realm and two admin clients, nothing else; re-imported at the start). `scripts/test.sh` runs this on
//! every Keycloak version of the support matrix. `#[ignore]`d in a plain
//! `cargo test`; without a reachable Keycloak it fails, never skips.
//!
//! Blank realm → `plan` lists everything → `apply` with view-only credentials is
//! refused → `apply` → real exchanges with both authentication methods → `plan`
//! in sync → drift injected through the Admin API → `plan` shows exactly that →
//! `apply` repairs it, keeping fields it does not manage → conflict and prune.

use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::keycloak_real::{aud_set, lifetime, real_keycloak, scope_set, RealKeycloak};

pub const VIEW: (&str, &str) = ("kcs-admin-view", "kcs-admin-view-test-secret");
pub const MANAGE: (&str, &str) = ("kcs-admin-manage", "kcs-admin-manage-test-secret");

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `keycloak-ci-sts keycloak <args> --config <config>` with admin credentials
/// from the environment, off the async runtime.
pub async fn kc_cli(config: &std::path::Path, args: &[&str], admin: (&str, &str)) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"));
    cmd.arg("keycloak")
        .args(args)
        .arg("--config")
        .arg(config)
        .env("KCS_ADMIN_CLIENT_ID", admin.0)
        .env("KCS_ADMIN_CLIENT_SECRET", admin.1)
        .env_remove("RUST_LOG");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    for secret in [ARTIFACTS_SECRET, VIEW.1, MANAGE.1] {
        assert!(
            !run.stdout.contains(secret) && !run.stderr.contains(secret),
            "a secret in the output of {args:?}"
        );
    }
    run
}

/// The indented field lines of a plan (`    field: old -> new`).
fn field_lines(plan: &str) -> Vec<String> {
    plan.lines()
        .filter(|l| l.starts_with("    "))
        .map(|l| l.trim().to_string())
        .collect()
}

async fn deploy_exchange(kc: &RealKeycloak, issuer: &Issuer, app: &TestApp) -> Value {
    let mut step = issuer.step();
    step.deployment_environment_uuid = Some(PROD_ENV.into());
    let r = app
        .exchange(
            &issuer.mint(&step),
            "deploy-api",
            Some("deploy:production artifacts:read"),
        )
        .await;
    assert_eq!(r.status().as_u16(), 200, "private_key_jwt exchange");
    let body: Value = r.json().await.unwrap();
    kc.verify(&app.http, body["access_token"].as_str().unwrap())
        .await
}

async fn artifacts_exchange(kc: &RealKeycloak, issuer: &Issuer, app: &TestApp) -> Value {
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_eq!(r.status().as_u16(), 200, "client secret exchange");
    let body: Value = r.json().await.unwrap();
    kc.verify(&app.http, body["access_token"].as_str().unwrap())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real Keycloak: scripts/test.sh runs it"]
async fn keycloak_provision_blank_realm_plan_apply_exchange_drift_repair() {
    let mut kc = real_keycloak();
    kc.realm = "prov".into();
    let issuer = Issuer::start().await;
    let mut opts = Options::new(&kc.url);
    opts.realm = kc.realm.clone();
    // client_credentials only: this test runs on every Keycloak of the matrix.
    opts.identity = false;
    let (_policies, dir) = policies_without_identities();
    opts.policies_dir = Some(dir);
    let app = TestApp::start(&issuer, opts).await;
    // Blank even when run twice against one Keycloak.
    kc.recreate_realm(&app.http, include_str!("../keycloak/realm-prov.json"))
        .await;
    // The provisioning configuration: the service's own, plus where Keycloak reaches it.
    let toml = std::fs::read_to_string(app.dir.path().join("sts.toml")).unwrap();
    let config = app.dir.path().join("provision.toml");
    let toml = toml.replace(
        "public_url = \"http://127.0.0.1:1\"",
        &format!("public_url = \"{}\"", app.address),
    );
    std::fs::write(&config, toml).unwrap();
    let http = &app.http;

    // 1. A blank realm: plan lists everything and exits 3 (changes pending).
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 3, "{}{}", plan.stdout, plan.stderr);
    for line in [
        "+ resource server artifact-api: create",
        "+ resource server deploy-api: create",
        "+ client scope artifacts:read: create",
        "+ client scope artifacts:write: create",
        "+ client scope deploy:production: create",
        "+ client sts-artifacts: create",
        "+ client sts-deploy: create",
        "    attributes.access.token.lifespan: 120",
        "    clientAuthenticatorType: client-jwt",
        "    fullScopeAllowed: false",
        "    optionalClientScopes: artifacts:read, deploy:production",
        "    serviceAccountRoles[deploy-api]: deploy",
    ] {
        assert!(
            plan.stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{}",
            plan.stdout
        );
    }

    // 2. View-only credentials cannot apply; nothing changes.
    let refused = kc_cli(&config, &["apply"], VIEW).await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(refused.stderr.contains("403"), "{}", refused.stderr);
    assert_eq!(kc_cli(&config, &["plan"], VIEW).await.code, 3);

    // 3. apply creates everything; a second apply changes nothing; plan is in sync.
    let applied = kc_cli(&config, &["apply"], MANAGE).await;
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert!(
        applied.stdout.contains("+ created client sts-deploy"),
        "{}",
        applied.stdout
    );
    let again = kc_cli(&config, &["apply"], MANAGE).await;
    assert_eq!(again.code, 0);
    assert!(
        again.stdout.contains("already in sync; nothing changed"),
        "{}",
        again.stdout
    );
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 0, "{}", plan.stdout);

    // 4. Real exchanges through the provisioned clients, tokens as the policies say.
    let claims = deploy_exchange(&kc, &issuer, &app).await;
    assert_eq!(claims["azp"], "sts-deploy");
    assert_eq!(aud_set(&claims), ["artifact-api", "deploy-api"]);
    assert_eq!(
        scope_set(claims["scope"].as_str().unwrap()),
        scope_set("deploy:production artifacts:read")
    );
    assert_eq!(
        claims["resource_access"]["deploy-api"]["roles"],
        json!(["deploy"])
    );
    assert_eq!(
        claims["resource_access"]["artifact-api"]["roles"],
        json!(["read"])
    );
    assert!(
        (120..=121).contains(&lifetime(&claims)),
        "exp-iat {}",
        lifetime(&claims)
    );
    let claims = artifacts_exchange(&kc, &issuer, &app).await;
    assert_eq!(claims["azp"], "sts-artifacts");
    assert_eq!(aud_set(&claims), ["artifact-api"]);
    assert_eq!(
        scope_set(claims["scope"].as_str().unwrap()),
        ["artifacts:read"]
    );
    assert_eq!(
        claims["resource_access"]["artifact-api"]["roles"],
        json!(["read"])
    );
    assert!(
        (60..=61).contains(&lifetime(&claims)),
        "exp-iat {}",
        lifetime(&claims)
    );

    // 5. Drift: a longer lifespan, a removed optional scope, a regenerated secret;
    //    plus fields apply does not manage, which it must keep.
    let deploy = kc.client_uuid(http, "sts-deploy").await;
    let artifacts = kc.client_uuid(http, "sts-artifacts").await;
    let (s, _) = kc
        .admin(
            http,
            Method::PUT,
            &format!("/clients/{deploy}"),
            Some(
                json!({"clientId": "sts-deploy", "rootUrl": "https://kept.example",
                "attributes": {"access.token.lifespan": "3600", "custom.kept": "yes"}}),
            ),
        )
        .await;
    assert_eq!(s, 204);
    let (_, scopes) = kc.admin(http, Method::GET, "/client-scopes", None).await;
    let read_id = scopes
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "artifacts:read")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _) = kc
        .admin(
            http,
            Method::DELETE,
            &format!("/clients/{deploy}/optional-client-scopes/{read_id}"),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = kc
        .admin(
            http,
            Method::POST,
            &format!("/clients/{artifacts}/client-secret"),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_error(r, 502, "server_error", "keycloak.client_rejected").await;

    // plan shows exactly the two field changes (the secret is apply's business).
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 3, "{}", plan.stdout);
    assert_eq!(
        field_lines(&plan.stdout),
        [
            "attributes.access.token.lifespan: 3600 -> 120",
            "optionalClientScopes: deploy:production -> artifacts:read, deploy:production",
        ],
        "{}",
        plan.stdout
    );
    assert!(plan.stdout.contains("~ client sts-deploy: change"));
    assert_eq!(
        plan.stdout.matches(": in sync").count(),
        9,
        "{}",
        plan.stdout
    );

    // 6. apply repairs it, keeps what it does not manage, restores the secret.
    let applied = kc_cli(&config, &["apply"], MANAGE).await;
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert!(applied
        .stdout
        .contains("attributes.access.token.lifespan: 3600 -> 120"));
    assert!(applied
        .stdout
        .contains("client sts-artifacts: secret set to the configured one (value not shown)"));
    let after = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(after.code, 0, "{}\n{}", applied.stdout, after.stdout);
    let (_, c) = kc
        .admin(http, Method::GET, &format!("/clients/{deploy}"), None)
        .await;
    assert_eq!(
        c["attributes"]["custom.kept"], "yes",
        "unmanaged attribute kept"
    );
    assert_eq!(c["rootUrl"], "https://kept.example", "unmanaged field kept");
    let claims = deploy_exchange(&kc, &issuer, &app).await;
    assert!((120..=121).contains(&lifetime(&claims)));
    artifacts_exchange(&kc, &issuer, &app).await;

    // 6b. Privileges outside the managed roles: a client-level scope mapping and
    //     an extra service-account role are drift that apply removes; a
    //     realm-management role is a problem that stops apply.
    let role = |client: String, name: &'static str| {
        let kc = &kc;
        async move {
            let (s, r) = kc
                .admin(
                    http,
                    Method::GET,
                    &format!("/clients/{client}/roles/{name}"),
                    None,
                )
                .await;
            assert_eq!(s, 200, "role {name}");
            r
        }
    };
    let deploy_api = kc.client_uuid(http, "deploy-api").await;
    let artifact_api = kc.client_uuid(http, "artifact-api").await;
    let deploy_role = role(deploy_api.clone(), "deploy").await;
    let write_role = role(artifact_api.clone(), "write").await;
    let (s, _) = kc
        .admin(
            http,
            Method::POST,
            &format!("/clients/{artifacts}/scope-mappings/clients/{deploy_api}"),
            Some(json!([deploy_role])),
        )
        .await;
    assert_eq!(s, 204);
    let (_, sa) = kc
        .admin(
            http,
            Method::GET,
            &format!("/clients/{deploy}/service-account-user"),
            None,
        )
        .await;
    let sa = sa["id"].as_str().unwrap().to_string();
    let (s, _) = kc
        .admin(
            http,
            Method::POST,
            &format!("/users/{sa}/role-mappings/clients/{artifact_api}"),
            Some(json!([write_role])),
        )
        .await;
    assert_eq!(s, 204);
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 3, "{}", plan.stdout);
    assert_eq!(
        field_lines(&plan.stdout),
        [
            "scopeMappings: deploy-api: deploy -> (none)",
            "serviceAccountRoles[artifact-api]: read, write -> read",
        ],
        "{}",
        plan.stdout
    );
    let applied = kc_cli(&config, &["apply"], MANAGE).await;
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let after = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(after.code, 0, "{}\n{}", applied.stdout, after.stdout);
    let rm = kc.client_uuid(http, "realm-management").await;
    let manage_users = role(rm.clone(), "manage-users").await;
    let (_, sa) = kc
        .admin(
            http,
            Method::GET,
            &format!("/clients/{artifacts}/service-account-user"),
            None,
        )
        .await;
    let sa_path = format!(
        "/users/{}/role-mappings/clients/{rm}",
        sa["id"].as_str().unwrap()
    );
    let (s, _) = kc
        .admin(
            http,
            Method::POST,
            &sa_path,
            Some(json!([manage_users.clone()])),
        )
        .await;
    assert_eq!(s, 204);
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 1, "{}", plan.stdout);
    assert!(
        plan.stdout
            .contains("holds roles of Keycloak's built-in client realm-management (manage-users)"),
        "{}",
        plan.stdout
    );
    let refused = kc_cli(&config, &["apply"], MANAGE).await;
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains("nothing was changed"),
        "{}",
        refused.stderr
    );
    let (s, _) = kc
        .admin(http, Method::DELETE, &sa_path, Some(json!([manage_users])))
        .await;
    assert_eq!(s, 204);
    assert_eq!(kc_cli(&config, &["plan"], VIEW).await.code, 0);

    // 7. An object that is not ours (no marker) is reported, and apply changes nothing.
    let api = kc.client_uuid(http, "artifact-api").await;
    let unmark =
        |v: &str| json!({"clientId": "artifact-api", "attributes": {"keycloak-ci-sts.owner": v}});
    let (s, _) = kc
        .admin(
            http,
            Method::PUT,
            &format!("/clients/{api}"),
            Some(unmark("")),
        )
        .await;
    assert_eq!(s, 204);
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 1, "{}", plan.stdout);
    assert!(
        plan.stdout.contains(
            "! resource server artifact-api: exists and was not created by keycloak apply"
        ),
        "{}",
        plan.stdout
    );
    let refused = kc_cli(&config, &["apply"], MANAGE).await;
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains("nothing was changed"),
        "{}",
        refused.stderr
    );
    let (s, _) = kc
        .admin(
            http,
            Method::PUT,
            &format!("/clients/{api}"),
            Some(unmark("keycloak-ci-sts")),
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(kc_cli(&config, &["plan"], VIEW).await.code, 0);

    // 8. Owned objects no policy needs: kept and listed; --prune removes them,
    // at most --max-removals of them (the count comes first in the plan).
    for name in ["old:scope", "old:scope-2"] {
        let (s, _) = kc
            .admin(
                http,
                Method::POST,
                "/client-scopes",
                Some(json!({"name": name, "protocol": "openid-connect",
                    "attributes": {"keycloak-ci-sts.owner": "keycloak-ci-sts"}})),
            )
            .await;
        assert_eq!(s, 201);
    }
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 0, "{}", plan.stdout);
    assert!(plan
        .stdout
        .contains("client scope old:scope: owned but no longer needed; kept"));
    let plan = kc_cli(&config, &["plan", "--prune"], VIEW).await;
    assert_eq!(plan.code, 3);
    assert_eq!(
        plan.stdout.lines().next(),
        Some("2 object(s) to remove"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("- client scope old:scope: remove"),
        "{}",
        plan.stdout
    );
    let refused = kc_cli(
        &config,
        &["apply", "--prune", "--max-removals", "1"],
        MANAGE,
    )
    .await;
    assert_eq!(refused.code, 1, "{}", refused.stdout);
    assert!(
        refused
            .stderr
            .contains("removes 2 object(s), more than --max-removals 1; nothing was changed"),
        "{}",
        refused.stderr
    );
    let plan = kc_cli(&config, &["plan", "--prune"], VIEW).await;
    assert!(
        plan.stdout.starts_with("2 object(s) to remove"),
        "{}",
        plan.stdout
    );
    let pruned = kc_cli(&config, &["apply", "--prune"], MANAGE).await;
    assert_eq!(pruned.code, 0, "{}", pruned.stderr);
    assert!(pruned.stdout.contains("- removed client scope old:scope"));
    assert!(pruned.stdout.contains("- removed client scope old:scope-2"));
    assert_eq!(kc_cli(&config, &["plan", "--prune"], VIEW).await.code, 0);
}
