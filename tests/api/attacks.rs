//! Hostile tokens: one named test per attack, each proving rejection with the
//! documented `error_code` and no call to Keycloak. Each test names the section
//! of RFC 8725 (JWT Best Current Practices) or RFC 7515/7519 it guards.

use std::sync::atomic::Ordering;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn b64j(v: &Value) -> String {
    b64(v.to_string().as_bytes())
}

/// An unknown `kid`: 400 `token.unknown_key` (after at most one refetch per
/// interval); never a Keycloak call.
async fn unknown_kid_refused(app: &TestApp, kc: &FakeKeycloak, token: &str) -> Value {
    let r = app.exchange(token, "artifact-api", None).await;
    let body = assert_error(r, 400, "invalid_request", "token.unknown_key").await;
    assert_eq!(kc.token_calls().await, 0);
    body
}

/// A server that must receive nothing (for URLs named in token headers).
async fn tripwire() -> MockServer {
    let s = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .named("URL named in a token header (must never be fetched)")
        .mount(&s)
        .await;
    s
}

// ---- RFC 8725 §3.1 Perform Algorithm Verification / §3.2 Use Appropriate Algorithms

#[tokio::test]
async fn rfc8725_3_1_alg_none_with_empty_signature() {
    let (issuer, kc, app) = standard().await;
    let claims = issuer.claims(&issuer.step());
    for alg in ["none", "None", "NONE", ""] {
        let token = format!(
            "{}.{}.",
            b64j(&json!({"alg": alg, "typ": "JWT"})),
            b64j(&claims)
        );
        refused(&app, &kc, &token, "token.algorithm_not_allowed").await;
    }
    let token = format!("{}.{}.", b64j(&json!({"typ": "JWT"})), b64j(&claims));
    refused(&app, &kc, &token, "token.algorithm_not_allowed").await;
    assert_eq!(
        issuer.issuer.jwks_hits.load(Ordering::SeqCst),
        0,
        "no key lookup for alg none"
    );
}

#[tokio::test]
async fn rfc8725_3_1_rs256_token_with_empty_signature() {
    let (issuer, kc, app) = standard().await;
    let token = issuer.mint(&issuer.step());
    let (head, _) = token.rsplit_once('.').unwrap();
    refused(&app, &kc, &format!("{head}."), "token.bad_signature").await;
}

#[tokio::test]
async fn rfc8725_2_1_hs256_key_confusion_with_every_public_key_encoding() {
    let (issuer, kc, app) = standard().await;
    let claims = issuer.claims(&issuer.step());
    let forms = issuer.issuer.public_key_forms();
    assert!(forms.len() >= 6);
    for (name, secret) in forms {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let mut h = Header::new(alg);
            h.kid = Some(issuer.issuer.active_kid());
            let token =
                jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(&secret).unwrap())
                    .unwrap();
            let body = refused(&app, &kc, &token, "token.algorithm_not_allowed").await;
            assert!(!body.to_string().contains(name));
        }
    }
}

#[tokio::test]
async fn rfc8725_3_1_header_alg_that_does_not_fit_the_key_type() {
    let (issuer, kc, app) = standard().await;
    let token = issuer.mint(&issuer.step());
    let (_, rest) = token.split_once('.').unwrap();
    for alg in [
        "ES256", "PS256", "RS384", "RS512", "EdDSA", "rs256", "RS256 ",
    ] {
        let header = json!({"alg": alg, "kid": issuer.issuer.active_kid(), "typ": "JWT"});
        refused(
            &app,
            &kc,
            &format!("{}.{rest}", b64j(&header)),
            "token.algorithm_not_allowed",
        )
        .await;
    }
}

// ---- RFC 8725 §2.9 Indirect Attacks on the Server / §3.10 Do Not Trust Received Claims

#[tokio::test]
async fn rfc8725_3_10_jku_x5u_jwk_x5c_headers_are_never_fetched_or_trusted() {
    let (issuer, kc, app) = standard().await;
    let attacker = Issuer::start().await; // its own key, its own JWKS
    let wire = tripwire().await;
    let claims = issuer.claims(&issuer.step());
    let attacker_jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(attacker.issuer.jwks()["keys"][0].clone()).unwrap();

    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(attacker.issuer.active_kid());
    h.jku = Some(format!("{}/jwks.json", wire.uri()));
    h.x5u = Some(format!("{}/cert.pem", wire.uri()));
    h.jwk = Some(attacker_jwk);
    h.x5c = Some(vec!["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA".into()]);
    let forged = attacker.issuer.sign_with_header(&h, &claims).unwrap();
    refused(&app, &kc, &forged, "token.unknown_key").await;

    // Same headers on a token signed with the real key: ignored, and the token is judged on its own.
    let mut h2 = h.clone();
    h2.kid = Some(issuer.issuer.active_kid());
    let genuine = issuer.issuer.sign_with_header(&h2, &claims).unwrap();
    kc.token_ok(60, "artifacts:read", 1).await;
    let r = app.exchange(&genuine, "artifact-api", None).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        attacker.issuer.jwks_hits.load(Ordering::SeqCst),
        0,
        "attacker JWKS fetched"
    );
    assert_eq!(
        wire.received_requests().await.unwrap().len(),
        0,
        "header URL fetched"
    );
}

#[tokio::test]
async fn rfc8725_3_10_hostile_kid_values() {
    let (issuer, kc, app) = standard().await;
    let claims = issuer.claims(&issuer.step());
    let unknown = [
        "../../../../etc/passwd".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "file:///etc/shadow".to_string(),
        "' OR '1'='1".to_string(),
        "\" ; DROP TABLE keys; --".to_string(),
        "k".repeat(256),
    ];
    for kid in unknown {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.clone());
        let token = issuer.issuer.sign_with_header(&h, &claims).unwrap();
        let body = unknown_kid_refused(&app, &kc, &token).await;
        assert!(!body["error_description"].as_str().unwrap().contains(&kid));
    }
    for kid in [
        "k".repeat(10 * 1024),
        "a\nb".to_string(),
        "\u{0}".to_string(),
    ] {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid);
        let token = issuer.issuer.sign_with_header(&h, &claims).unwrap();
        refused(&app, &kc, &token, "token.malformed").await;
    }
    let token = issuer.mint(&issuer.step());
    let (_, rest) = token.split_once('.').unwrap();
    let header = json!({"alg": "RS256", "kid": {"$ne": null}});
    refused(
        &app,
        &kc,
        &format!("{}.{rest}", b64j(&header)),
        "token.malformed",
    )
    .await;
}

#[tokio::test]
async fn rfc8725_3_10_unknown_kid_spray_shares_one_refetch() {
    let (issuer, kc, app) = standard().await;
    let hits = || issuer.issuer.jwks_hits.load(Ordering::SeqCst);
    let claims = issuer.claims(&issuer.step());
    let mut tokens = Vec::new();
    for i in 0..20 {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(format!("spray-{i}"));
        tokens.push(issuer.issuer.sign_with_header(&h, &claims).unwrap());
    }
    // The first lookup fetches the key set; the concurrent spray of unknown kids
    // shares one refetch, and every forged kid is refused, none deferred.
    let results = futures_util::future::join_all(
        tokens.iter().map(|t| app.exchange(t, "artifact-api", None)),
    )
    .await;
    for r in results {
        assert_error(r, 400, "invalid_request", "token.unknown_key").await;
    }
    // Initial fetch + one refetch on an idle machine; at most one per interval (1 s).
    assert!(
        (2..=3).contains(&hits()),
        "{} fetches: a refetch storm",
        hits()
    );
    assert_eq!(kc.token_calls().await, 0);
}

// ---- RFC 7515 §4.1.11 (crit), RFC 7516 (JWE), RFC 7515 §7.1 (compact serialization)

#[tokio::test]
async fn rfc7515_4_1_11_unsupported_crit_header() {
    let (issuer, kc, app) = standard().await;
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(issuer.issuer.active_kid());
    h.crit = Some(vec!["b64".into()]);
    let token = issuer
        .issuer
        .sign_with_header(&h, &issuer.claims(&issuer.step()))
        .unwrap();
    refused(&app, &kc, &token, "token.unsupported_header").await;
}

#[tokio::test]
async fn rfc8725_3_12_jwe_shaped_and_wrong_segment_counts() {
    let (issuer, kc, app) = standard().await;
    let jwe = format!(
        "{}.{}.{}.{}.{}",
        b64j(&json!({"alg":"RSA-OAEP-256","enc":"A256GCM"})),
        b64(b"encryptedkey"),
        b64(b"iv"),
        b64(b"ciphertext"),
        b64(b"tag")
    );
    refused(&app, &kc, &jwe, "token.malformed").await;
    let token = issuer.mint(&issuer.step());
    let parts: Vec<&str> = token.split('.').collect();
    refused(
        &app,
        &kc,
        &format!("{}.{}", parts[0], parts[1]),
        "token.malformed",
    )
    .await;
    refused(
        &app,
        &kc,
        &format!("{token}.{}", parts[2]),
        "token.malformed",
    )
    .await;
    refused(&app, &kc, parts[1], "token.malformed").await;
}

#[tokio::test]
async fn rfc7515_invalid_base64url_and_non_json_parts() {
    let (issuer, kc, app) = standard().await;
    let token = issuer.mint(&issuer.step());
    let parts: Vec<&str> = token.split('.').collect();
    let cases = [
        // characters of standard base64 that base64url does not have
        format!("+/{}.{}.{}", &parts[0][2..], parts[1], parts[2]),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}!.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}", b64(b"not json"), parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], b64(b"[1,2,3]"), parts[2]),
        format!("{}.{}.{}", parts[0], b64(b"\"a string\""), parts[2]),
        format!("{}.{}.{}", parts[0], b64(&[0xff, 0xfe, 0x00]), parts[2]),
        format!("{}.{}.{}", b64(b"null"), parts[1], parts[2]),
        format!(
            "{}.{}.{}",
            parts[0],
            b64("[".repeat(5000).as_bytes()),
            parts[2]
        ),
    ];
    for t in cases {
        refused(&app, &kc, &t, "token.malformed").await;
    }
}

// ---- RFC 8725 §2.6 Multiplicity of JSON Encodings; RFC 7519 §4 (unique claim names)

#[tokio::test]
async fn rfc8725_2_6_duplicate_claim_and_header_names() {
    let (issuer, kc, app) = standard().await;
    let token = issuer.mint(&issuer.step());
    let parts: Vec<&str> = token.split('.').collect();
    let payload = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    // A second "iss" (also via a JSON escape) appended to the signed payload's JSON.
    for dup in [
        r#","iss":"https://evil.example.test"}"#,
        r#","\u0069ss":"https://evil.example.test"}"#,
    ] {
        let p = format!("{}{dup}", payload.trim_end_matches('}'));
        refused(
            &app,
            &kc,
            &format!("{}.{}.{}", parts[0], b64(p.as_bytes()), parts[2]),
            "token.malformed",
        )
        .await;
    }
    let header = format!(
        r#"{{"alg":"none","alg":"RS256","kid":"{}"}}"#,
        issuer.issuer.active_kid()
    );
    refused(
        &app,
        &kc,
        &format!("{}.{}.{}", b64(header.as_bytes()), parts[1], parts[2]),
        "token.malformed",
    )
    .await;
}

// ---- RFC 7519 §4.1.4-4.1.6 time claims; RFC 8725 §3.10

#[tokio::test]
async fn rfc7519_time_claims_of_the_wrong_type() {
    let (issuer, kc, app) = standard().await;
    let base = issuer.claims(&issuer.step());
    for (claim, value) in [
        ("exp", json!(base["exp"].to_string())),
        ("iat", json!(base["iat"].to_string())),
        ("exp", json!(1.5e9)),
        ("exp", json!(-1)),
        ("iat", json!(null)),
        ("nbf", json!("0")),
    ] {
        let mut c = base.clone();
        c[claim] = value;
        refused(&app, &kc, &issuer.sign(&c), "token.invalid_claim").await;
    }
}

#[tokio::test]
async fn rfc7519_4_1_5_nbf_in_the_future_beyond_leeway() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    c["nbf"] = json!(c["iat"].as_u64().unwrap() + 600);
    refused(&app, &kc, &issuer.sign(&c), "token.not_yet_valid").await;
}

#[tokio::test]
async fn rfc7519_iat_and_exp_within_leeway_are_accepted() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let mut c = issuer.claims(&issuer.step());
    let now = c["iat"].as_u64().unwrap();
    c["iat"] = json!(now + 30);
    c["exp"] = json!(now + 3600);
    let r = app.exchange(&issuer.sign(&c), "artifact-api", None).await;
    assert_eq!(
        r.status().as_u16(),
        200,
        "30 s of clock skew is within the 60 s leeway"
    );
}

// ---- RFC 8725 §3.8 Validate Issuer and Subject / §2.8 Cross-JWT Confusion

#[tokio::test]
async fn rfc8725_3_8_token_naming_one_trusted_workspace_signed_with_anothers_key() {
    // Two trusted workspaces on two issuers with different keys (as on Bitbucket).
    let issuer_a = Issuer::start().await;
    let issuer_b = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    let mut opts = Options::new(&kc.uri());
    opts.other_issuer = Some(issuer_b.issuer_url(OTHER_WS_SLUG));
    let app = TestApp::start(&issuer_a, opts).await;
    // Workspace B's key signs a token claiming workspace A's issuer and UUID.
    let mut c = issuer_b.claims(&issuer_a.step());
    c["iss"] = json!(issuer_a.issuer_url(WS_SLUG));
    refused(&app, &kc, &issuer_b.sign(&c), "token.unknown_key").await;
    // ...and with B's issuer but A's workspaceUuid.
    let mut c = issuer_b.claims(&issuer_a.step());
    c["iss"] = json!(issuer_b.issuer_url(OTHER_WS_SLUG));
    c["aud"] = json!(format!("ari:cloud:bitbucket::workspace/{OTHER_WS}"));
    refused(&app, &kc, &issuer_b.sign(&c), "token.workspace_mismatch").await;
}

#[tokio::test]
async fn rfc8725_3_8_issuer_variants_are_not_trusted() {
    let (issuer, kc, app) = standard().await;
    let iss = issuer.issuer_url(WS_SLUG);
    for variant in [
        format!("{iss}/"),
        iss.to_uppercase(),
        iss.replace("http://", "https://"),
        format!("{iss}?x=1"),
        format!(" {iss}"),
        "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc".to_string(),
    ] {
        let mut c = issuer.claims(&issuer.step());
        c["iss"] = json!(variant);
        refused(&app, &kc, &issuer.sign(&c), "token.untrusted_issuer").await;
    }
}

// ---- RFC 8725 §3.9 Use and Validate Audience

#[tokio::test]
async fn rfc8725_3_9_audiences_not_accepted_as_string_array_or_other_shapes() {
    let (issuer, kc, app) = standard().await;
    for aud in [
        json!("https://vault.example.test"),
        json!(["https://vault.example.test", "https://other.example.test"]),
        json!(format!("ari:cloud:bitbucket::workspace/{OTHER_WS}")),
        json!(format!("ari:cloud:bitbucket::workspace/{{{WS}}}")),
        json!([]),
        json!(""),
    ] {
        let mut c = issuer.claims(&issuer.step());
        c["aud"] = aud;
        refused(&app, &kc, &issuer.sign(&c), "token.audience_not_accepted").await;
    }
    for aud in [json!({"aud": STS_AUDIENCE}), json!(42)] {
        let mut c = issuer.claims(&issuer.step());
        c["aud"] = aud;
        let r = app.exchange(&issuer.sign(&c), "artifact-api", None).await;
        assert_eq!(r.status().as_u16(), 400);
    }
    assert_eq!(kc.token_calls().await, 0);
}

// ---- RFC 8725 §3.4 Validate Cryptographic Inputs (size before parsing)

#[tokio::test]
async fn rfc8725_3_4_oversized_token_is_refused_before_parsing() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    // Over max_token_bytes (16 KiB) but within the body limit: the token check answers.
    c["padding"] = json!("x".repeat(13_000));
    refused(&app, &kc, &issuer.sign(&c), "token.too_large").await;
    assert_eq!(issuer.issuer.jwks_hits.load(Ordering::SeqCst), 0);
}
