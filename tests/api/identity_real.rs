//! Per-repository identities (JWT Authorization Grant) against the real Keycloak
//! started by `scripts/keycloak.sh`, in realm `ident` (`tests/keycloak/realm-ident.json`:
//! the realm and two admin clients; re-imported at the start). The service runs
//! with its usual configuration, which holds no admin credentials: only the
//! `keycloak apply` runs of the test use the manage client.
//!
//! On a Keycloak older than 26.7.0 `plan` must refuse the mode; from 26.7.0: apply
//! → two repositories get tokens with their own `sub`, `preferred_username`,
//! `repository_uuid` and group roles, narrowed by the requested scopes, with the
//! policy's lifetime → kill switch → not provisioned → duplicate link → replay.

use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::keycloak_real::{lifetime, real_keycloak, scope_set, RealKeycloak};
use crate::provision_real::{kc_cli, MANAGE, VIEW};
use keycloak_ci_sts::domain::identity::RepositoryIdentity;
use keycloak_ci_sts::domain::BbUuid;

fn identity(repo: &str) -> RepositoryIdentity {
    RepositoryIdentity {
        workspace: BbUuid::parse_lenient(WS).unwrap(),
        repository: BbUuid::parse_lenient(repo).unwrap(),
        environment: None,
    }
}

/// A `main` build step of `repo` exchanges for `release-api` with `scope`.
async fn release_token(
    kc: &RealKeycloak,
    issuer: &Issuer,
    app: &TestApp,
    repo: &str,
    scope: Option<&str>,
) -> Result<Value, (u16, Value)> {
    let mut step = issuer.step();
    step.repository_uuid = repo.into();
    step.branch_name = Some("main".into());
    let r = app
        .exchange(&issuer.mint(&step), "release-api", scope)
        .await;
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    if status != 200 {
        return Err((status, body));
    }
    Ok(kc
        .verify(&app.http, body["access_token"].as_str().unwrap())
        .await)
}

fn roles(claims: &Value) -> Vec<String> {
    let mut v: Vec<String> = claims["resource_access"]["release-api"]["roles"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The real Keycloak in `realm`, an issuer, and the service configured for
/// both with its own public URL (the assertions' issuer).
async fn identity_app(realm: &str) -> (RealKeycloak, Issuer, TestApp) {
    let mut kc = real_keycloak();
    kc.realm = realm.into();
    let issuer = Issuer::start().await;
    let port = free_port();
    let mut opts = Options::new(&kc.url);
    opts.realm = kc.realm.clone();
    opts.listen = format!("127.0.0.1:{port}");
    opts.public_url = format!("http://127.0.0.1:{port}");
    let app = TestApp::start(&issuer, opts).await;
    (kc, issuer, app)
}

fn older_than_26_7() -> bool {
    let v = std::env::var("KCS_KEYCLOAK_VERSION").unwrap_or_default();
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    !v.is_empty() && (a, b) < (26, 7)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real Keycloak: scripts/test.sh runs it"]
async fn keycloak_provision_repository_identities_by_jwt_authorization_grant() {
    let (kc, issuer, app) = identity_app("ident").await;
    let http = &app.http;
    kc.recreate_realm(http, include_str!("../keycloak/realm-ident.json"))
        .await;
    let config = app.dir.path().join("sts.toml");
    let service_config = std::fs::read_to_string(&config).unwrap();
    assert!(
        !service_config.contains("kcs-admin"),
        "the service holds no admin credentials"
    );

    // Below the floor, plan refuses the mode and apply changes nothing.
    if older_than_26_7() {
        let plan = kc_cli(&config, &["plan"], VIEW).await;
        assert_eq!(plan.code, 1, "{}{}", plan.stdout, plan.stderr);
        assert!(
            plan.stdout
                .contains("does not support the JWT Authorization Grant"),
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
        return;
    }

    let (web, deploy) = (identity(OTHER_REPO), identity(REPO));
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 3, "{}{}", plan.stdout, plan.stderr);
    for line in [
        "+ identity provider keycloak-ci-sts: create".to_string(),
        "~ user profile attributes: change".to_string(),
        "+ group release-readers: create".to_string(),
        "+ group release-publishers: create".to_string(),
        format!("+ user {}: create", web.username()),
        format!("+ user {}: create", deploy.username()),
        "+ client scope repository-identity: create".to_string(),
        "    attributes.oauth2.jwt.authorization.grant.enabled: true".to_string(),
        format!("    id (the tokens' sub): {}", web.user_id(&kc.realm)),
    ] {
        assert!(
            plan.stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{}",
            plan.stdout
        );
    }
    let applied = kc_cli(&config, &["apply"], MANAGE).await;
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 0, "{}{}", plan.stdout, plan.stderr);

    // Two repositories: their own sub, preferred_username, repository_uuid; the
    // group's roles narrowed by the requested scopes; the policy's lifetime.
    let w = release_token(&kc, &issuer, &app, OTHER_REPO, None)
        .await
        .unwrap();
    assert_eq!(w["sub"], web.user_id(&kc.realm));
    assert_eq!(w["preferred_username"], web.username());
    assert_eq!(w["repository_uuid"], format!("{{{OTHER_REPO}}}"));
    assert_eq!(w["workspace_uuid"], format!("{{{WS}}}"));
    assert_eq!(w["repository"], "acme/web");
    assert_eq!(w["azp"], "sts-repo");
    assert_eq!(scope_set(w["scope"].as_str().unwrap()), ["release:read"]);
    assert_eq!(roles(&w), ["read"]);
    assert_cut_at_assertion_exp(&w, 180);
    let again = release_token(&kc, &issuer, &app, OTHER_REPO, None)
        .await
        .unwrap();
    assert_eq!(
        again["sub"], w["sub"],
        "the same repository twice: the same sub"
    );
    // release-readers has no publish role: requesting the scope does not add it.
    let w_pub = release_token(&kc, &issuer, &app, OTHER_REPO, Some("release:publish"))
        .await
        .unwrap();
    assert_eq!(roles(&w_pub), Vec::<String>::new());

    let d = release_token(&kc, &issuer, &app, REPO, None).await.unwrap();
    assert_eq!(d["sub"], deploy.user_id(&kc.realm));
    assert_ne!(d["sub"], w["sub"]);
    assert_eq!(d["preferred_username"], deploy.username());
    assert_eq!(roles(&d), ["read"], "publish narrowed away: not requested");
    // Client lifespan 180 s; the identity provider cuts the token at the
    // assertion's exp = the policy's 120 s less the 5 s clock margin.
    assert_cut_at_assertion_exp(&d, 120);
    let d_both = release_token(
        &kc,
        &issuer,
        &app,
        REPO,
        Some("release:read release:publish"),
    )
    .await
    .unwrap();
    assert_eq!(roles(&d_both), ["publish", "read"]);

    let audit = app.audit_lines();
    let a = audit.last().unwrap();
    assert_eq!(a["identity"], deploy.subject());
    assert_eq!(a["keycloak_user_id"], deploy.user_id(&kc.realm));
    assert!(a["identity_assertion_jti"].is_string());

    // A role given to a repository user directly (not through a group) is drift
    // that apply removes.
    let release_api = kc.client_uuid(http, "release-api").await;
    let (_, publish) = kc
        .admin(
            http,
            Method::GET,
            &format!("/clients/{release_api}/roles/publish"),
            None,
        )
        .await;
    let (s, _) = kc
        .admin(
            http,
            Method::POST,
            &format!(
                "/users/{}/role-mappings/clients/{release_api}",
                web.user_id(&kc.realm)
            ),
            Some(json!([publish])),
        )
        .await;
    assert_eq!(s, 204);
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 3, "{}", plan.stdout);
    assert!(
        plan.stdout
            .contains("roles[release-api]: publish -> (none: roles come from groups)"),
        "{}",
        plan.stdout
    );
    assert_eq!(kc_cli(&config, &["apply"], MANAGE).await.code, 0);
    assert_eq!(kc_cli(&config, &["plan"], VIEW).await.code, 0);
    // The access review says so with view-only credentials (issue #23).
    let review = {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"));
        cmd.args([
            "report",
            "access",
            "--keycloak-plan",
            "--format",
            "json",
            "--config",
        ])
        .arg(&config)
        .env("KCS_ADMIN_CLIENT_ID", VIEW.0)
        .env("KCS_ADMIN_CLIENT_SECRET", VIEW.1);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    };
    let text = String::from_utf8_lossy(&review.stdout);
    assert!(
        review.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&review.stderr)
    );
    let parsed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        parsed["keycloak_plan"], "clean: realm ident is in sync with the policies",
        "{text}"
    );
    assert!(!text.contains(VIEW.1));

    // Both grant modes side by side in one realm.
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_eq!(
        r.status().as_u16(),
        200,
        "client_credentials beside the grant"
    );

    // Kill switch: the operator disables the web user; apply leaves it disabled.
    let (s, _) = kc
        .admin(
            http,
            Method::PUT,
            &format!("/users/{}", web.user_id(&kc.realm)),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(s, 204);
    let (status, body) = release_token(&kc, &issuer, &app, OTHER_REPO, None)
        .await
        .unwrap_err();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    assert_eq!(body["error_code"], "identity.disabled");
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 0, "{}", plan.stdout);
    assert!(
        plan.stdout
            .contains("in sync [disabled by an operator: left disabled"),
        "{}",
        plan.stdout
    );
    assert_eq!(kc_cli(&config, &["apply"], MANAGE).await.code, 0);
    let (_, u) = kc
        .admin(
            http,
            Method::GET,
            &format!("/users/{}", web.user_id(&kc.realm)),
            None,
        )
        .await;
    assert_eq!(u["enabled"], false, "apply never re-enables a user");

    // Not provisioned: the deploy-service user is deleted; apply brings it back
    // with the same id, so the same sub.
    let (s, _) = kc
        .admin(
            http,
            Method::DELETE,
            &format!("/users/{}", deploy.user_id(&kc.realm)),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (status, body) = release_token(&kc, &issuer, &app, REPO, None)
        .await
        .unwrap_err();
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error_code"], "identity.not_provisioned");
    assert_eq!(kc_cli(&config, &["apply"], MANAGE).await.code, 0);
    let d2 = release_token(&kc, &issuer, &app, REPO, None).await.unwrap();
    assert_eq!(d2["sub"], d["sub"]);

    // A second user linked to the same identity by hand: plan reports it.
    let (s, _) = kc
        .admin(
            http,
            Method::POST,
            "/users",
            Some(json!({"username": "planted", "enabled": true,
                "federatedIdentities": [{"identityProvider": "keycloak-ci-sts",
                    "userId": deploy.subject(), "userName": "planted"}]})),
        )
        .await;
    assert_eq!(s, 201);
    let plan = kc_cli(&config, &["plan"], VIEW).await;
    assert_eq!(plan.code, 1, "{}", plan.stdout);
    assert!(
        plan.stdout.contains("is also linked to user(s) planted"),
        "{}",
        plan.stdout
    );

    // Keycloak refuses a replayed assertion (the service mints a fresh one per
    // request; this one is replayed by hand).
    replayed_assertion_is_refused(&kc, &app, &web).await;
}

/// Signs one repository assertion with the service's identity key and sends it
/// twice as client `sts-repo` (authenticated by private_key_jwt with the
/// service's client-assertion key): the second answer is `invalid_grant`.
async fn replayed_assertion_is_refused(kc: &RealKeycloak, app: &TestApp, who: &RepositoryIdentity) {
    use keycloak_ci_sts::signing::{SigningAlgorithm, SigningKey};
    let key = |file: &str| {
        let pem = std::fs::read_to_string(app.dir.path().join(file)).unwrap();
        SigningKey::from_pem(&secrecy::SecretString::from(pem), SigningAlgorithm::ES256).unwrap()
    };
    let (identity_key, client_key) = (key("identity.pem"), key("signing.pem"));
    let realm = format!("{}/realms/{}", kc.url, kc.realm);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |k: &SigningKey, claims: Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(k.kid().to_string());
        jsonwebtoken::encode(&h, &claims, k.encoding_key()).unwrap()
    };
    let public = app.address.clone();
    let assertion = sign(
        &identity_key,
        json!({"iss": public, "sub": who.subject(), "aud": realm, "iat": now, "exp": now + 60,
               "jti": uuid::Uuid::new_v4().to_string()}),
    );
    let mut answers = Vec::new();
    for _ in 0..2 {
        let client_assertion = sign(
            &client_key,
            json!({"iss": "sts-repo", "sub": "sts-repo", "aud": realm, "iat": now, "exp": now + 60,
                   "jti": uuid::Uuid::new_v4().to_string()}),
        );
        let r = app
            .http
            .post(format!("{realm}/protocol/openid-connect/token"))
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
                ("client_id", "sts-repo"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", client_assertion.as_str()),
            ])
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        answers.push((status, r.json::<Value>().await.unwrap()));
    }
    // The web user is disabled at this point: the first use is refused as
    // disabled, and the jti is spent all the same (Keycloak checks it first).
    assert_eq!(answers[0].0, 400, "{:?}", answers[0].1);
    assert_eq!(answers[1].0, 400);
    assert_eq!(answers[1].1["error"], "invalid_grant");
    assert_eq!(
        answers[1].1["error_description"], "Token reuse detected",
        "{:?}",
        answers[1].1
    );
}

/// The identity provider ends the token at the assertion's `exp`, which the
/// service set to its own clock's `iat` + the policy's `max_lifetime_seconds`
/// − the 5 s clock margin. Keycloak's `iat` is taken later, when it handles the
/// request, so `exp − iat` is that figure less the request's latency (whole
/// seconds; one more when the two clocks round differently). A loaded CI
/// machine has been measured a second short; ten seconds of slack keep the
/// test about the cap, not about the machine's speed.
fn assert_cut_at_assertion_exp(claims: &Value, policy_max_seconds: u64) {
    let cap = policy_max_seconds - 5;
    let got = lifetime(claims);
    assert!(
        (cap - 10..=cap + 1).contains(&got),
        "exp-iat {got}, expected at most {cap} (+1 for rounding)"
    );
}

/// An `apply` cut off after any number of Admin API calls (what a kill between
/// two calls leaves; a call Keycloak had begun is committed whole or not at
/// all), then run again, converges: the next `plan` reports no change
/// (issue #21 §5). Realm `interrupt`, re-imported before each cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real Keycloak: scripts/test.sh runs it"]
async fn keycloak_apply_interrupted_anywhere_then_rerun_converges() {
    if older_than_26_7() {
        return;
    }
    let (kc, _issuer, app) = identity_app("interrupt").await;
    let realm_json = include_str!("../keycloak/realm-ident.json").replacen(
        "\"realm\": \"ident\"",
        "\"realm\": \"interrupt\"",
        1,
    );
    assert!(realm_json.contains("\"realm\": \"interrupt\""));
    let config = app.dir.path().join("sts.toml");

    // How many calls a whole apply makes on the blank realm.
    kc.recreate_realm(&app.http, &realm_json).await;
    let whole = kc_cli(&config, &["apply"], MANAGE).await;
    assert_eq!(whole.code, 0, "{}{}", whole.stdout, whole.stderr);
    let total: u64 = whole
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("Admin API calls: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no call count in {}", whole.stderr));
    assert!(total > 20, "{total} calls");

    for cut in [1, 3, total / 4, total / 2, total - 10, total - 2] {
        kc.recreate_realm(&app.http, &realm_json).await;
        let cut_s = cut.to_string();
        let stopped = kc_cli(
            &config,
            &["apply", "--interrupt-after-calls", &cut_s],
            MANAGE,
        )
        .await;
        assert_eq!(
            stopped.code, 1,
            "cut at {cut}: {}{}",
            stopped.stdout, stopped.stderr
        );
        assert!(stopped.stderr.contains("interrupted"), "{}", stopped.stderr);
        let again = kc_cli(&config, &["apply"], MANAGE).await;
        assert_eq!(
            again.code, 0,
            "cut at {cut}: {}{}",
            again.stdout, again.stderr
        );
        let plan = kc_cli(&config, &["plan"], VIEW).await;
        assert_eq!(plan.code, 0, "cut at {cut}: {}{}", plan.stdout, plan.stderr);
    }
}
