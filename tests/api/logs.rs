//! The real binary at `RUST_LOG=trace` (exchanges, denials, bad requests): no subject token, access token, client
//! assertion, private key or client secret reaches the logs, whole or as a JWT segment.

use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

fn secret_fragments(token: &str) -> Vec<String> {
    let mut v = vec![token.to_string()];
    v.extend(
        token
            .split('.')
            .filter(|s| s.len() >= 16)
            .map(str::to_string),
    );
    v
}

#[tokio::test]
async fn trace_logs_of_exchanges_denials_and_faults_hold_no_secret() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "deploy:production", 2).await;
    let (dir, _toml, audit) = TestApp::write_config(&issuer, Options::new(&kc.uri()));
    let mut svc = ServiceProcess::start(&dir.path().join("sts.toml"), "trace");
    let port = svc.port;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/token");
    let post = |form: Vec<(&'static str, String)>| {
        let http = http.clone();
        let url = url.clone();
        async move { http.post(url).form(&form).send().await.unwrap() }
    };
    let form = |token: &str, audience: &str| {
        vec![
            ("grant_type", TOKEN_EXCHANGE.to_string()),
            ("subject_token", token.to_string()),
            ("subject_token_type", ID_TOKEN_TYPE.to_string()),
            ("audience", audience.to_string()),
        ]
    };

    let mut secrets: Vec<String> = vec![ARTIFACTS_SECRET.to_string()];
    // Allowed (private_key_jwt) and allowed (client secret).
    let mut step = issuer.step();
    step.deployment_environment_uuid = Some(PROD_ENV.into());
    let t1 = issuer.mint(&step);
    let r = post(form(&t1, "deploy-api")).await;
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    secrets.extend(secret_fragments(body["access_token"].as_str().unwrap()));
    secrets.extend(secret_fragments(&t1));
    // Denied by policy, refused by verification (expired), bad requests.
    let mut feature = issuer.step();
    feature.branch_name = Some("feature/x".into());
    let t2 = issuer.mint(&feature);
    assert_eq!(post(form(&t2, "artifact-api")).await.status().as_u16(), 400);
    secrets.extend(secret_fragments(&t2));
    let mut c = issuer.claims(&issuer.step());
    c["exp"] = serde_json::json!(1);
    c["iat"] = serde_json::json!(0);
    let t3 = issuer.sign(&c);
    assert_eq!(post(form(&t3, "artifact-api")).await.status().as_u16(), 400);
    secrets.extend(secret_fragments(&t3));
    let t4 = issuer.mint(&issuer.step());
    let mut bad = form(&t4, "artifact-api");
    bad.push(("grant_type", "x".into()));
    assert_eq!(post(bad).await.status().as_u16(), 400);
    secrets.extend(secret_fragments(&t4));
    // A token in the query string is never logged either.
    let t5 = issuer.mint(&issuer.step());
    let _ = http
        .get(format!("{url}?subject_token={t5}"))
        .send()
        .await
        .unwrap();
    secrets.extend(secret_fragments(&t5));
    // A second allowed exchange (a fresh assertion).
    let mut step = issuer.step();
    step.deployment_environment_uuid = Some(PROD_ENV.into());
    let t6 = issuer.mint(&step);
    let _ = post(form(&t6, "deploy-api")).await;
    secrets.extend(secret_fragments(&t6));

    // Keycloak faults (each answered once, ahead of the success mock): our client
    // rejected, a scope refused, a 500, a body echoing the assertion back.
    for template in [
        ResponseTemplate::new(401).set_body_json(serde_json::json!({"error": "invalid_client", "error_description": "Invalid client or Invalid client credentials"})),
        ResponseTemplate::new(400).set_body_json(serde_json::json!({"error": "invalid_scope", "error_description": "Invalid scopes: deploy:production"})),
        ResponseTemplate::new(500).set_body_string("java.lang.NullPointerException"),
        ResponseTemplate::new(200).set_body_string("not json"),
    ] {
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(template)
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&kc.server)
            .await;
        let t = issuer.mint(&step);
        let r = post(form(&t, "deploy-api")).await;
        assert!(r.status().as_u16() >= 500);
        secrets.extend(secret_fragments(&t));
    }
    // Issuer side: an unknown kid (refetch) and a forged signature.
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("rotated-away".into());
    let t7 = issuer
        .issuer
        .sign_with_header(&h, &issuer.claims(&issuer.step()))
        .unwrap();
    assert_eq!(post(form(&t7, "artifact-api")).await.status().as_u16(), 400);
    secrets.extend(secret_fragments(&t7));

    // Client assertions Keycloak received.
    for req in kc.server.received_requests().await.unwrap() {
        for (k, v) in url::form_urlencoded::parse(&req.body) {
            if k == "client_assertion" {
                secrets.extend(secret_fragments(&v));
            }
        }
    }
    // The service's private key (its base64 body lines).
    let pem = std::fs::read_to_string(dir.path().join("signing.pem")).unwrap();
    secrets.extend(
        pem.lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(str::to_string),
    );

    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = svc.stop_and_collect_logs().join("\n");
    assert!(
        log.contains("\"level\":\"TRACE\"") || log.contains("TRACE"),
        "trace level was not active"
    );
    let audit_text = std::fs::read_to_string(audit).unwrap();
    for s in &secrets {
        assert!(
            !log.contains(s.as_str()),
            "secret fragment found in logs: {}…",
            &s[..8.min(s.len())]
        );
        assert!(
            !audit_text.contains(s.as_str()),
            "secret fragment found in audit: {}…",
            &s[..8.min(s.len())]
        );
    }
}
