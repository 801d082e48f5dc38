//! The JWT Authorization Grant against a wiremock Keycloak: the request the
//! service sends (a fresh assertion per exchange, signed with the identity key,
//! never the client-assertion key) and how each of Keycloak's refusals reaches
//! the caller. The real-Keycloak counterpart is `identity_real.rs`.

use base64::Engine;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;
use keycloak_ci_sts::domain::identity::RepositoryIdentity;
use keycloak_ci_sts::domain::BbUuid;

fn web() -> RepositoryIdentity {
    RepositoryIdentity {
        workspace: BbUuid::parse_lenient(WS).unwrap(),
        repository: BbUuid::parse_lenient(OTHER_REPO).unwrap(),
        environment: None,
    }
}

fn decode(jwt: &str, part: usize) -> Value {
    let seg = jwt.split('.').nth(part).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(seg)
            .unwrap(),
    )
    .unwrap()
}

/// A Keycloak-shaped user token of the web repository's user (or `username`).
fn user_token(realm: &str, lifetime: u64, username: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2ln",
        enc(json!({"alg": "RS256", "typ": "JWT"})),
        enc(json!({
            "iss": realm, "exp": now + lifetime, "iat": now, "azp": "sts-repo", "typ": "Bearer",
            "scope": "release:read", "sub": web().user_id("ci"), "preferred_username": username,
            "jti": format!("trrtag:{}", uuid::Uuid::new_v4()),
        }))
    )
}

async fn web_step(issuer: &Issuer, app: &TestApp) -> reqwest::Response {
    let mut step = issuer.step();
    step.repository_uuid = OTHER_REPO.into();
    step.branch_name = Some("main".into());
    app.exchange(&issuer.mint(&step), "release-api", None).await
}

#[tokio::test]
async fn each_exchange_sends_a_fresh_assertion_signed_by_the_identity_key() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    let realm = format!("{}/realms/ci", kc.uri());
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": user_token(&realm, 180, &web().username()),
            "expires_in": 180, "token_type": "Bearer", "scope": "release:read",
        })))
        .expect(2)
        .mount(&kc.server)
        .await;
    let mut opts = Options::new(&kc.uri());
    opts.public_url = "https://sts.example.test".into();
    let app = TestApp::start(&issuer, opts).await;
    for _ in 0..2 {
        assert_eq!(web_step(&issuer, &app).await.status().as_u16(), 200);
    }
    let jwks = |p: &'static str| {
        let app = &app;
        async move {
            let v: Value = app
                .http
                .get(format!("{}{p}", app.address))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let identity_kids = jwks("/.well-known/identity-jwks.json").await;
    let client_kids = jwks("/.well-known/jwks.json").await;
    assert!(
        identity_kids.iter().all(|k| !client_kids.contains(k)),
        "separate keys"
    );
    let mut jtis = Vec::new();
    for req in kc
        .server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == TOKEN_PATH)
    {
        let form: std::collections::HashMap<String, String> =
            url::form_urlencoded::parse(&req.body)
                .into_owned()
                .collect();
        assert_eq!(
            form["grant_type"],
            "urn:ietf:params:oauth:grant-type:jwt-bearer"
        );
        assert_eq!(form["client_id"], "sts-repo");
        assert_eq!(form["scope"], "release:read");
        let header = decode(&form["assertion"], 0);
        assert_eq!(header["alg"], "ES256");
        assert!(identity_kids.contains(&header["kid"].as_str().unwrap().to_string()));
        let claims = decode(&form["assertion"], 1);
        assert_eq!(claims["iss"], "https://sts.example.test");
        assert_eq!(claims["sub"], web().subject());
        assert_eq!(claims["aud"], realm);
        // The policy's 180 s less the 5 s clock margin.
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            175
        );
        // The client authenticates with its own key, not the identity key.
        let client_header = decode(&form["client_assertion"], 0);
        assert!(client_kids.contains(&client_header["kid"].as_str().unwrap().to_string()));
        jtis.push(claims["jti"].as_str().unwrap().to_string());
    }
    assert_eq!(jtis.len(), 2);
    assert_ne!(jtis[0], jtis[1], "a fresh jti per exchange");
    let audit = app.audit_lines();
    assert_eq!(audit.last().unwrap()["identity"], web().subject());
    assert_eq!(
        audit.last().unwrap()["keycloak_user_id"],
        web().user_id("ci")
    );
}

#[tokio::test]
async fn keycloaks_refusals_of_an_identity_have_their_own_codes() {
    let cases: [(Value, u16, &str, &str); 4] = [
        (
            json!({"error": "invalid_grant", "error_description": "User not found"}),
            502,
            "server_error",
            "identity.not_provisioned",
        ),
        (
            json!({"error": "invalid_grant", "error_description": "User is not enabled"}),
            400,
            "invalid_grant",
            "identity.disabled",
        ),
        (
            json!({"error": "invalid_grant", "error_description": "Invalid signature"}),
            502,
            "server_error",
            "keycloak.identity_misconfigured",
        ),
        (
            json!({"error": "invalid_grant", "error_description": "Something new"}),
            502,
            "server_error",
            "identity.refused",
        ),
    ];
    for (answer, status, error, code) in cases {
        let issuer = Issuer::start().await;
        let kc = FakeKeycloak::start().await;
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(ResponseTemplate::new(400).set_body_json(answer))
            .mount(&kc.server)
            .await;
        let app = TestApp::start(&issuer, Options::new(&kc.uri())).await;
        let body = assert_error(web_step(&issuer, &app).await, status, error, code).await;
        assert!(body.get("access_token").is_none());
        assert_eq!(app.audit_lines().last().unwrap()["error_code"], code);
    }
}

#[tokio::test]
async fn a_token_of_another_user_is_not_passed_on() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    let realm = format!("{}/realms/ci", kc.uri());
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": user_token(&realm, 180, "planted"),
            "expires_in": 180, "token_type": "Bearer", "scope": "release:read",
        })))
        .mount(&kc.server)
        .await;
    let app = TestApp::start(&issuer, Options::new(&kc.uri())).await;
    let body = assert_error(
        web_step(&issuer, &app).await,
        502,
        "server_error",
        "identity.mismatch",
    )
    .await;
    assert!(body.get("access_token").is_none());
}

#[tokio::test]
async fn the_service_refuses_the_mode_when_keycloak_does_not_offer_the_grant() {
    let issuer = Issuer::start().await;
    let server = wiremock::MockServer::start().await;
    let uri = server.uri();
    Mock::given(method("GET"))
        .and(path("/realms/ci/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": format!("{uri}/realms/ci"),
            "token_endpoint": format!("{uri}{TOKEN_PATH}"),
            "grant_types_supported": ["client_credentials", "urn:ietf:params:oauth:grant-type:token-exchange"],
        })))
        .mount(&server)
        .await;
    let (dir, toml, _) = TestApp::write_config(&issuer, Options::new(&uri));
    let settings =
        keycloak_ci_sts::configuration::Settings::from_toml_str(&toml, dir.path()).unwrap();
    let app = keycloak_ci_sts::startup::Application::build(settings).unwrap();
    let e = app.check_upstream().await.unwrap_err();
    assert_eq!(e.code(), "keycloak.jwt_grant_unsupported");

    // Without the JWT Authorization Grant client the same Keycloak is fine.
    let mut opts = Options::new(&uri);
    opts.identity = false;
    let (_p, policies) = policies_without_identities();
    opts.policies_dir = Some(policies);
    let (dir, toml, _) = TestApp::write_config(&issuer, opts);
    let settings =
        keycloak_ci_sts::configuration::Settings::from_toml_str(&toml, dir.path()).unwrap();
    let app = keycloak_ci_sts::startup::Application::build(settings).unwrap();
    assert!(app.check_upstream().await.is_ok());
}
