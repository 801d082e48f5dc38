//! Verification of the Bitbucket token through the real endpoint. Every refusal
//! is checked to be the documented error with no Keycloak call.

use base64::Engine;
use serde_json::{json, Value};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn expired_token_is_refused() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    let now = c["iat"].as_u64().unwrap();
    c["iat"] = json!(now - 3600);
    c["exp"] = json!(now - 300);
    refused(&app, &kc, &issuer.sign(&c), "token.expired").await;
}

#[tokio::test]
async fn untrusted_issuer_is_refused_without_fetching_its_keys() {
    let (issuer, kc, app) = standard().await;
    let evil = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&evil)
        .await;
    let mut c = issuer.claims(&issuer.step());
    c["iss"] = json!(format!(
        "{}/2.0/workspaces/acme/pipelines-config/identity/oidc",
        evil.uri()
    ));
    refused(&app, &kc, &issuer.sign(&c), "token.untrusted_issuer").await;
    assert_eq!(
        app.audit_lines()[0]["issuer"],
        c["iss"],
        "the refused issuer is audited"
    );
}

#[tokio::test]
async fn workspace_uuid_of_another_trusted_workspace_is_refused() {
    let (issuer, kc, app) = standard().await;
    let mut step = issuer.step();
    step.workspace_uuid = OTHER_WS.into();
    let mut c = issuer.claims(&step);
    c["aud"] = json!(STS_AUDIENCE);
    refused(&app, &kc, &issuer.sign(&c), "token.workspace_mismatch").await;
}

#[tokio::test]
async fn sub_inconsistent_with_repository_is_refused() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    c["sub"] = json!(format!(
        "{{{OTHER_REPO}}}:{}",
        c["stepUuid"].as_str().unwrap()
    ));
    refused(&app, &kc, &issuer.sign(&c), "token.subject_mismatch").await;
}

#[tokio::test]
async fn sub_without_environment_on_a_deployment_step_is_refused() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    c["deploymentEnvironmentUuid"] = json!(format!("{{{PROD_ENV}}}"));
    refused(&app, &kc, &issuer.sign(&c), "token.subject_mismatch").await;
}

#[tokio::test]
async fn each_required_claim_missing_is_refused() {
    let (issuer, kc, app) = standard().await;
    for (claim, code) in [
        ("exp", "token.missing_claim"),
        ("iat", "token.missing_claim"),
        ("aud", "token.missing_claim"),
        ("sub", "token.missing_claim"),
        ("iss", "token.missing_claim"),
        ("workspaceUuid", "token.missing_claim"),
        ("repositoryUuid", "token.missing_claim"),
        ("pipelineUuid", "token.missing_claim"),
        ("stepUuid", "token.missing_claim"),
    ] {
        let mut c = issuer.claims(&issuer.step());
        c.as_object_mut().unwrap().remove(claim);
        let body = refused(&app, &kc, &issuer.sign(&c), code).await;
        assert!(
            body["error_description"].as_str().unwrap().contains(claim),
            "{claim}: {body}"
        );
    }
}

#[tokio::test]
async fn exp_as_string_is_refused() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    c["exp"] = json!(c["exp"].to_string());
    refused(&app, &kc, &issuer.sign(&c), "token.invalid_claim").await;
}

#[tokio::test]
async fn unbraced_repository_uuid_is_refused() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    c["repositoryUuid"] = json!(REPO);
    refused(&app, &kc, &issuer.sign(&c), "token.invalid_claim").await;
}

#[tokio::test]
async fn bad_signature_is_refused() {
    let (issuer, kc, app) = standard().await;
    let token = issuer.mint(&issuer.step());
    let (head, sig) = token.rsplit_once('.').unwrap();
    let mut sig = sig.as_bytes().to_vec();
    sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
    let forged = format!("{head}.{}", String::from_utf8(sig).unwrap());
    refused(&app, &kc, &forged, "token.bad_signature").await;
}

#[tokio::test]
async fn oversized_and_malformed_tokens_are_refused() {
    let (_issuer, kc, app) = standard().await;
    refused(&app, &kc, &"a".repeat(20_000), "token.too_large").await;
    refused(&app, &kc, "a.b.c.d.e", "token.malformed").await;
    refused(&app, &kc, "not-a-jwt", "token.malformed").await;
    refused(&app, &kc, "%%%.###.$$$", "token.malformed").await;
}

#[tokio::test]
async fn unknown_kid_refetches_once_then_accepts_rotated_key() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 2).await;
    let hits = || {
        issuer
            .issuer
            .jwks_hits
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(hits(), 1);
    issuer.issuer.rotate().unwrap();
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_eq!(
        r.status().as_u16(),
        200,
        "rotated key accepted after one refetch"
    );
    assert_eq!(hits(), 2);
    // A kid nobody publishes, sent concurrently: one shared refetch (after the
    // interval), then `token.unknown_key` for all; never 503.
    let c = issuer.claims(&issuer.step());
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("no-such-kid".into());
    let token = issuer.issuer.sign_with_header(&h, &c).unwrap();
    let started = std::time::Instant::now();
    let results =
        futures_util::future::join_all((0..5).map(|_| app.exchange(&token, "artifact-api", None)))
            .await;
    for r in results {
        assert_error(r, 400, "invalid_request", "token.unknown_key").await;
    }
    // At most one refetch per interval (1 s here) while the requests last; on an
    // idle machine exactly one.
    let refetches = hits() - 2;
    let allowed = started.elapsed().as_secs() as usize + 1;
    assert!(
        (1..=allowed).contains(&refetches),
        "{refetches} refetches in {:?}: a refetch storm",
        started.elapsed()
    );
}

#[tokio::test]
async fn whitespace_around_the_token_is_ignored() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let token = format!("  {}\n", issuer.mint(&issuer.step()));
    let r = app.exchange(&token, "artifact-api", None).await;
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn header_member_of_the_wrong_type_is_malformed() {
    let (issuer, kc, app) = standard().await;
    let token = issuer.mint(&issuer.step());
    let (_, rest) = token.split_once('.').unwrap();
    let header = json!({"alg": "RS256", "kid": issuer.issuer.active_kid(), "typ": 5});
    refused(
        &app,
        &kc,
        &format!("{}.{rest}", b64(&header)),
        "token.malformed",
    )
    .await;
}

#[tokio::test]
async fn invisible_and_bidi_characters_in_branch_names_are_refused() {
    let (issuer, kc, app) = standard().await;
    for branch in [
        "release/\u{2028}x",
        "main\u{202E}",
        "ma\u{200B}in",
        "\u{FEFF}main",
    ] {
        let mut step = issuer.step();
        step.branch_name = Some(branch.into());
        refused(&app, &kc, &issuer.mint(&step), "token.invalid_claim").await;
    }
}
