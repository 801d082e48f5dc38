//! The exchange end to end against a Keycloak stand-in: what Keycloak receives,
//! what the caller gets, what the audit log says, and Keycloak's error answers.

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

fn form_of(req: &wiremock::Request) -> Vec<(String, String)> {
    url::form_urlencoded::parse(&req.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn get<'a>(form: &'a [(String, String)], k: &str) -> Option<&'a str> {
    form.iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn secret_client_exchange_returns_token_and_writes_audit_line() {
    let (issuer, kc, app) = standard().await;
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("sts-artifacts:{ARTIFACTS_SECRET}"));
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .and(header("authorization", format!("Basic {basic}").as_str()))
        .and(body_string_contains("grant_type=client_credentials"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": FakeKeycloak::token_for(&format!("{}/realms/ci", kc.uri()), "sts-artifacts", 60, "artifacts:write"),
            "expires_in": 60, "token_type": "Bearer", "scope": "artifacts:write",
        })))
        .expect(1)
        .mount(&kc.server)
        .await;

    let token = issuer.mint(&issuer.step());
    let resp = app
        .exchange(&token, "artifact-api", Some("artifacts:write"))
        .await;

    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(body["expires_in"], 60);
    assert_eq!(body["scope"], "artifacts:write");
    let access = body["access_token"].as_str().unwrap();

    let requests = kc.server.received_requests().await.unwrap();
    let tok = requests
        .iter()
        .find(|r| r.url.path() == TOKEN_PATH)
        .unwrap();
    let form = form_of(tok);
    assert_eq!(get(&form, "scope"), Some("artifacts:write"));
    assert_eq!(
        get(&form, "client_assertion"),
        None,
        "secret clients send no assertion"
    );

    let audit = app.audit_lines();
    assert_eq!(audit.len(), 1);
    let a = &audit[0];
    assert_eq!(a["outcome"], "allowed");
    assert_eq!(a["policy"], "artifacts-publish");
    assert_eq!(a["keycloak_client"], "sts-artifacts");
    assert_eq!(a["audience"], "artifact-api");
    assert_eq!(a["repositoryUuid"], format!("{{{REPO}}}"));
    assert_eq!(a["workspaceUuid"], format!("{{{WS}}}"));
    assert_eq!(a["branchName"], "main");
    assert_eq!(a["granted_scopes"], json!(["artifacts:write"]));
    assert_eq!(a["expires_in"], 60);
    assert_eq!(
        a["token_sha256"],
        hex::encode(sha2::Sha256::digest(access.as_bytes()))
    );
    assert!(a["token_jti"].as_str().unwrap().starts_with("trrtcc:"));
    assert!(a["stepUuid"].as_str().unwrap().starts_with('{'));
    assert!(a["pipelineUuid"].as_str().unwrap().starts_with('{'));
    let line = std::fs::read_to_string(&app.audit_path).unwrap();
    assert!(
        !line.contains(access),
        "audit line must not hold the access token"
    );
    assert!(
        !line.contains(&token),
        "audit line must not hold the subject token"
    );
}

#[tokio::test]
async fn private_key_jwt_assertion_is_well_formed_and_verifies_with_published_jwks() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(120, "deploy:production", 1).await;
    let mut step = issuer.step();
    step.deployment_environment_uuid = Some(PROD_ENV.into());
    let resp = app.exchange(&issuer.mint(&step), "deploy-api", None).await;
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );

    let requests = kc.server.received_requests().await.unwrap();
    let tok = requests
        .iter()
        .find(|r| r.url.path() == TOKEN_PATH)
        .unwrap();
    assert!(tok.headers.get("authorization").is_none());
    let form = form_of(tok);
    assert_eq!(get(&form, "grant_type"), Some("client_credentials"));
    assert_eq!(get(&form, "client_id"), Some("sts-deploy"));
    assert_eq!(
        get(&form, "scope"),
        Some("deploy:production"),
        "default scopes"
    );
    assert_eq!(
        get(&form, "client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    let assertion = get(&form, "client_assertion").unwrap();

    // Verify with the JWKS the service publishes (what Keycloak's "JWKS URL" reads).
    let jwks: jsonwebtoken::jwk::JwkSet = app
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(assertion).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    let realm = format!("{}/realms/ci", kc.uri());
    v.set_audience(&[realm.as_str()]);
    v.set_issuer(&["sts-deploy"]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<Value>(assertion, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "sts-deploy");
    assert_eq!(claims["aud"], realm, "single audience = realm issuer");
    let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert!(lifetime <= 60, "assertion lifetime {lifetime}");
    assert!(claims["jti"].as_str().unwrap().len() >= 32);
}

#[tokio::test]
async fn each_assertion_has_a_fresh_jti() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(120, "deploy:production", 2).await;
    let mut step = issuer.step();
    step.deployment_environment_uuid = Some(PROD_ENV.into());
    for _ in 0..2 {
        let r = app.exchange(&issuer.mint(&step), "deploy-api", None).await;
        assert_eq!(r.status().as_u16(), 200);
    }
    let jtis: Vec<String> = kc
        .server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == TOKEN_PATH)
        .map(|r| {
            let form = form_of(r);
            let a = get(&form, "client_assertion").unwrap().to_string();
            let c: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(&a)
                .unwrap()
                .claims;
            c["jti"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(jtis.len(), 2);
    assert_ne!(jtis[0], jtis[1]);
}

#[tokio::test]
async fn scope_beyond_policy_is_invalid_scope_and_never_reaches_keycloak() {
    let (issuer, kc, app) = standard().await;
    kc.token_never_called().await;
    let r = app
        .exchange(
            &issuer.mint(&issuer.step()),
            "artifact-api",
            Some("artifacts:read admin:all"),
        )
        .await;
    let body = assert_error(r, 400, "invalid_scope", "policy.scope_not_allowed").await;
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("admin:all"));
    assert_eq!(app.audit_lines()[0]["outcome"], "denied");
}

#[tokio::test]
async fn unknown_audience_is_invalid_target() {
    let (issuer, kc, app) = standard().await;
    kc.token_never_called().await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "payroll-api", None)
        .await;
    assert_error(r, 400, "invalid_target", "policy.unknown_audience").await;
}

#[tokio::test]
async fn denied_branch_is_named_in_callers_terms_not_the_policys() {
    let (issuer, kc, app) = standard().await;
    kc.token_never_called().await;
    let mut step = issuer.step();
    step.branch_name = Some("feature/x".into());
    let r = app
        .exchange(&issuer.mint(&step), "artifact-api", None)
        .await;
    let body = assert_error(r, 400, "invalid_request", "policy.branch_not_allowed").await;
    let d = body["error_description"].as_str().unwrap();
    assert!(d.contains("feature/x"), "{d}");
    assert!(
        !d.contains("release/**") && !d.contains("main"),
        "policy patterns leaked: {d}"
    );
    let audit = app.audit_lines();
    assert_eq!(audit[0]["error_code"], "policy.branch_not_allowed");
    assert_eq!(audit[0]["policy"], "artifacts-publish");
}

#[tokio::test]
async fn release_glob_crosses_slashes_with_double_star() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let mut step = issuer.step();
    step.branch_name = Some("release/2026/q4".into());
    let r = app
        .exchange(&issuer.mint(&step), "artifact-api", None)
        .await;
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn deny_policy_beats_allow() {
    let (issuer, kc, app) = standard().await;
    kc.token_never_called().await;
    let mut step = issuer.step();
    step.repository_uuid = format!("{{{SANDBOX_REPO}}}");
    let r = app
        .exchange(&issuer.mint(&step), "artifact-api", None)
        .await;
    assert_error(r, 400, "invalid_request", "policy.denied").await;
    assert_eq!(app.audit_lines()[0]["policy"], "deny-sandbox");
}

#[tokio::test]
async fn production_deploy_without_environment_is_denied() {
    let (issuer, kc, app) = standard().await;
    kc.token_never_called().await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "deploy-api", None)
        .await;
    assert_error(r, 400, "invalid_request", "policy.environment_missing").await;
}

async fn keycloak_answers(template: ResponseTemplate) -> (reqwest::Response, Duration) {
    keycloak_answers_with(|_| template).await
}

/// Like `keycloak_answers`, with a template built from the fake realm's issuer.
async fn keycloak_answers_with(
    template: impl FnOnce(&str) -> ResponseTemplate,
) -> (reqwest::Response, Duration) {
    let (issuer, kc, app) = standard().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(template(&format!("{}/realms/ci", kc.uri())))
        .expect(1)
        .mount(&kc.server)
        .await;
    let start = Instant::now();
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    (r, start.elapsed())
}

#[tokio::test]
async fn keycloak_invalid_scope_is_502_for_the_operator() {
    let (r, _) = keycloak_answers(ResponseTemplate::new(400).set_body_json(
        json!({"error":"invalid_scope","error_description":"Invalid scopes: artifacts:read"}),
    ))
    .await;
    let body = assert_error(r, 502, "server_error", "keycloak.scope_rejected").await;
    assert!(
        !body.to_string().contains("Invalid scopes"),
        "Keycloak's text is not relayed"
    );
}

#[tokio::test]
async fn keycloak_invalid_client_is_502_client_rejected() {
    let (r, _) = keycloak_answers(
        ResponseTemplate::new(401).set_body_json(json!({"error":"unauthorized_client","error_description":"Invalid client or Invalid client credentials"})),
    )
    .await;
    assert_error(r, 502, "server_error", "keycloak.client_rejected").await;
}

#[tokio::test]
async fn keycloak_500_is_503_with_retry_after() {
    let (r, _) = keycloak_answers(ResponseTemplate::new(500).set_body_string("boom")).await;
    assert!(r.headers().get("retry-after").is_some());
    assert_error(r, 503, "temporarily_unavailable", "keycloak.server_error").await;
}

#[tokio::test]
async fn keycloak_slower_than_timeout_is_503_within_timeout() {
    let (r, elapsed) = keycloak_answers(
        ResponseTemplate::new(200)
            .set_body_json(json!({"access_token":"x","expires_in":60,"token_type":"Bearer"}))
            .set_delay(Duration::from_secs(8)),
    )
    .await;
    assert_error(r, 503, "temporarily_unavailable", "keycloak.unavailable").await;
    assert!(
        elapsed < Duration::from_millis(5000),
        "answered after {elapsed:?} (timeout is 3 s)"
    );
}

#[tokio::test]
async fn keycloak_non_json_is_502_bad_response() {
    let (r, _) =
        keycloak_answers(ResponseTemplate::new(200).set_body_string("<html>login</html>")).await;
    assert_error(r, 502, "server_error", "keycloak.bad_response").await;
}

#[tokio::test]
async fn keycloak_huge_answer_is_502_bad_response() {
    let (r, _) =
        keycloak_answers(ResponseTemplate::new(200).set_body_string("x".repeat(200_000))).await;
    assert_error(r, 502, "server_error", "keycloak.bad_response").await;
}

#[tokio::test]
async fn token_living_longer_than_policy_allows_is_refused() {
    let (r, _) = keycloak_answers_with(|realm| {
        ResponseTemplate::new(200).set_body_json(json!({
            "access_token": FakeKeycloak::access_token_of(realm, 3600), "expires_in": 3600, "token_type": "Bearer", "scope": "artifacts:read"
        }))
    })
    .await;
    let body = assert_error(r, 502, "server_error", "keycloak.lifetime_exceeds_policy").await;
    assert!(body.get("access_token").is_none());
}

#[tokio::test]
async fn keycloak_unreachable_is_503() {
    let issuer = Issuer::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let app = TestApp::start(&issuer, Options::new(&url)).await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_error(r, 503, "temporarily_unavailable", "keycloak.unavailable").await;
    // Still ready (callers get our documented 503), but the upstream probe says why.
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status().as_u16(), 200);
    let up = app.get("/upstreamz").await;
    assert_eq!(up.status().as_u16(), 503);
    let body: Value = up.json().await.unwrap();
    assert_eq!(body["keycloak"], "keycloak.unavailable");
    assert_eq!(body["limit_store"], "memory");
}

#[tokio::test]
async fn health_ready_and_jwks_endpoints() {
    let (_issuer, _kc, app) = standard().await;
    let h = app.get("/healthz").await;
    assert_eq!(h.status().as_u16(), 200);
    let r = app.get("/readyz").await;
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["policies"], 6);
    let jwks: Value = app
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert_eq!(key["alg"], "ES256");
    assert!(key.get("d").is_none(), "private key published");
}

#[tokio::test]
async fn bad_requests_get_documented_errors_and_never_reach_keycloak() {
    let (issuer, kc, app) = standard().await;
    kc.token_never_called().await;
    let token = issuer.mint(&issuer.step());

    let r = app.get("/token").await;
    assert_eq!(r.headers().get("allow").unwrap(), "POST");
    assert_error(r, 405, "invalid_request", "request.method_not_allowed").await;

    let r = app
        .http
        .post(format!("{}/token", app.address))
        .json(&json!({"grant_type": TOKEN_EXCHANGE, "subject_token": token}))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_request", "request.content_type").await;

    let r = app
        .post_token(&[
            ("grant_type", "client_credentials"),
            ("subject_token", &token),
        ])
        .await;
    assert_error(
        r,
        400,
        "unsupported_grant_type",
        "request.unsupported_grant_type",
    )
    .await;

    let r = app
        .post_token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &token),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:saml2",
            ),
            ("audience", "artifact-api"),
        ])
        .await;
    assert_error(
        r,
        400,
        "invalid_request",
        "request.unsupported_subject_token_type",
    )
    .await;

    let r = app
        .post_token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &token),
            ("subject_token_type", ID_TOKEN_TYPE),
            ("audience", "artifact-api"),
            (
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:refresh_token",
            ),
        ])
        .await;
    assert_error(
        r,
        400,
        "invalid_request",
        "request.unsupported_requested_token_type",
    )
    .await;

    let r = app
        .post_token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &token),
            ("subject_token", &token),
            ("subject_token_type", ID_TOKEN_TYPE),
            ("audience", "artifact-api"),
        ])
        .await;
    assert_error(r, 400, "invalid_request", "request.repeated_parameter").await;

    let r = app
        .post_token(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &token),
            ("subject_token_type", ID_TOKEN_TYPE),
        ])
        .await;
    assert_error(r, 400, "invalid_request", "request.missing_audience").await;

    let r = app
        .exchange(&token, "artifact-api", Some("artifacts:read \"quoted\""))
        .await;
    assert_error(r, 400, "invalid_scope", "request.invalid_scope_syntax").await;

    let big = "a".repeat(64 * 1024);
    let r = app.exchange(&big, "artifact-api", None).await;
    assert_error(r, 413, "invalid_request", "request.too_large").await;

    let r = app.get("/nope").await;
    assert_error(r, 404, "invalid_request", "request.not_found").await;
    assert_eq!(kc.token_calls().await, 0);
}

/// Readiness does not follow a shared upstream (every replica would leave the
/// load balancer at once); `/upstreamz` and `sts_upstream_up` do.
#[tokio::test]
async fn upstreams_follow_keycloak_going_down_and_readiness_does_not() {
    let (_issuer, kc, app) = standard().await;
    let ready = format!("{}/readyz", app.address);
    let up = format!("{}/upstreamz", app.address);
    assert_eq!(
        app.http.get(&up).send().await.unwrap().status().as_u16(),
        200
    );
    // Keycloak's realm disappears (discovery now answers 404).
    kc.server.reset().await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // a success answers probes for 1 s
    let r = app.http.get(&up).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(
        app.http.get(&ready).send().await.unwrap().status().as_u16(),
        200
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("sts_upstream_up{upstream=\"keycloak\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("sts_upstream_up{upstream=\"limit_store\"} 1"));
}

/// With `admin_listen`, the public listener serves only what pipelines and
/// Keycloak need; metrics and probes are on the other port.
#[tokio::test]
async fn admin_listen_splits_metrics_and_probes_from_the_public_port() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let mut opts = Options::new(&kc.uri());
    opts.top_extra = "admin_listen = \"127.0.0.1:0\"".into();
    let app = TestApp::start(&issuer, opts).await;
    let admin = app.admin_address.clone().expect("admin port");
    let get = |url: String| {
        let http = app.http.clone();
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    for path in ["/metrics", "/healthz", "/readyz", "/upstreamz"] {
        assert_eq!(
            get(format!("{}{path}", app.address)).await,
            404,
            "{path} public"
        );
        assert_eq!(get(format!("{admin}{path}")).await, 200, "{path} admin");
    }
    assert_eq!(
        get(format!("{}/.well-known/jwks.json", app.address)).await,
        200
    );
    assert_eq!(get(format!("{admin}/.well-known/jwks.json")).await, 404);
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let r = app
        .http
        .post(format!("{admin}/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_off_with_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The 10 s default is injected short: the test waits for the rule, not the clock.
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    let mut opts = Options::new(&kc.uri());
    opts.top_extra = "body_timeout_ms = 300".into();
    let app = TestApp::start(&issuer, opts).await;
    kc.token_never_called().await;
    let addr = app.address.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ngrant_type")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&buf).contains("request.body_timeout") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the stalled request open");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request.body_timeout"), "{text}");
}

#[tokio::test]
async fn an_oversized_chunked_body_is_refused_before_it_is_read_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_issuer, kc, app) = standard().await;
    kc.token_never_called().await;
    let addr = app.address.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    // 24 KiB in chunks (over the 20 KiB limit), and the body is never finished.
    let chunk = format!("{:x}\r\n{}\r\n", 4096, "a".repeat(4096));
    for _ in 0..6 {
        s.write_all(chunk.as_bytes()).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answered without waiting for the end of the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("request.too_large"), "{text}");
}

#[tokio::test]
async fn empty_parameters_are_missing_parameters() {
    let (issuer, kc, app) = standard().await;
    kc.token_never_called().await;
    let token = issuer.mint(&issuer.step());
    for (form, code) in [
        (
            vec![
                ("grant_type", ""),
                ("subject_token", token.as_str()),
                ("subject_token_type", ID_TOKEN_TYPE),
                ("audience", "artifact-api"),
            ],
            "request.missing_grant_type",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", token.as_str()),
                ("subject_token_type", ""),
                ("audience", "artifact-api"),
            ],
            "request.missing_subject_token_type",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", token.as_str()),
                ("subject_token_type", ID_TOKEN_TYPE),
                ("audience", ""),
            ],
            "request.missing_audience",
        ),
        (
            vec![
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", token.as_str()),
                ("subject_token_type", ID_TOKEN_TYPE),
                ("audience", "artifact-api"),
                ("actor_token", "x"),
            ],
            "request.unsupported_parameter",
        ),
    ] {
        let r = app.post_token(&form).await;
        assert_error(r, 400, "invalid_request", code).await;
    }
}
