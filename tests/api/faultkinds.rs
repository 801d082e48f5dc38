//! Issue #7: the five kinds of fault found by trying the service as users and
//! attackers would. Each input of the issue is a test here (or beside the unit it
//! concerns), with the right answer asserted.

use serde_json::json;

use crate::helpers::*;

// ------------------------------------------------ §5 subject-token lifetime

#[tokio::test]
async fn exp_of_u64_max_is_refused_as_too_long_lived() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    c["exp"] = json!(u64::MAX);
    refused(&app, &kc, &issuer.sign(&c), "token.lifetime_too_long").await;
}

#[tokio::test]
async fn exp_written_in_milliseconds_is_refused_as_too_long_lived() {
    let (issuer, kc, app) = standard().await;
    let mut c = issuer.claims(&issuer.step());
    let iat = c["iat"].as_u64().unwrap();
    c["exp"] = json!((iat + 3600) * 1000);
    refused(&app, &kc, &issuer.sign(&c), "token.lifetime_too_long").await;
}

/// The default must never refuse a deploy late in the longest step Bitbucket runs
/// (`max-time` up to 720 minutes), whatever lifetime Bitbucket gives its tokens.
#[tokio::test]
async fn a_token_issued_at_the_start_of_a_twelve_hour_step_is_still_accepted() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let mut c = issuer.claims(&issuer.step());
    let now = c["iat"].as_u64().unwrap();
    c["iat"] = json!(now - 11 * 3600 - 3000);
    c["exp"] = json!(now + 600);
    let r = app.exchange(&issuer.sign(&c), "artifact-api", None).await;
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
}

// ------------------------------------------------ §4 key lookup

use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, Header};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, ResponseTemplate};

use crate::faults::{app_for, FakeIssuer};

/// A token signed by the issuer's active key with the given header `kid`.
fn with_kid(fi: &FakeIssuer, kid: Option<String>) -> String {
    let mut c = fi.dev.claims(&fi_step());
    c["iss"] = json!(fi.issuer_url());
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid;
    fi.dev.sign_with_header(&h, &c).unwrap()
}

fn fi_step() -> keycloak_ci_sts::devissuer::StepClaims {
    keycloak_ci_sts::devissuer::StepClaims {
        workspace: WS_SLUG.into(),
        workspace_uuid: WS.into(),
        repository_uuid: REPO.into(),
        step_uuid: None,
        pipeline_uuid: None,
        branch_name: Some("main".into()),
        deployment_environment_uuid: None,
        audiences: vec![STS_AUDIENCE.into()],
        lifetime_seconds: None,
    }
}

/// The issue's input: a token without `kid` spent the unknown-kid refetch
/// allowance, and a genuine token of a freshly rotated key then got 503
/// `token.key_refetch_deferred`. Now kid-less tokens never refetch and the
/// genuine token is served.
#[tokio::test]
async fn a_kidless_forgery_never_refetches_and_never_delays_a_rotated_key() {
    let fi = FakeIssuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 2).await;
    let app = app_for(&fi, &kc, 600, 2, 2).await;
    // Warm the cache.
    assert_eq!(
        app.exchange(&with_kid(&fi, None), "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200,
        "a genuine kid-less token of an issuer with one key verifies"
    );
    let attacker = keycloak_ci_sts::devissuer::DevIssuer::new("http://127.0.0.1:9").unwrap();
    let mut forged = attacker.claims(&fi_step());
    forged["iss"] = json!(fi.issuer_url());
    let kidless_forgery = attacker
        .sign_with_header(&Header::new(Algorithm::RS256), &forged)
        .unwrap();
    let before = fi.requests().await;
    for _ in 0..10 {
        let r = app.exchange(&kidless_forgery, "artifact-api", None).await;
        assert_error(r, 400, "invalid_request", "token.bad_signature").await;
    }
    assert_eq!(
        fi.requests().await,
        before,
        "a kid-less token refetched keys"
    );
    // The issuer rotates; the genuine token of the new key is served at once.
    fi.dev.rotate().unwrap();
    fi.healthy().await;
    let r = app
        .exchange(
            &with_kid(&fi, Some(fi.dev.active_kid())),
            "artifact-api",
            None,
        )
        .await;
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
}

/// The kind: a flood of forged unknown `kid`s (no valid signature) cannot make a
/// genuine token of a new key wait longer than one refetch interval, is answered
/// `token.unknown_key` (never 503), and fetches at most once per interval.
#[tokio::test]
async fn forged_unknown_kids_spend_no_allowance_a_genuine_rotation_needs() {
    let fi = FakeIssuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 2).await;
    let app = app_for(&fi, &kc, 600, 2, 2).await;
    assert_eq!(
        app.exchange(&fi.mint(), "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200
    );
    // Spray: the first forged kid refetches (after the interval), the rest of the
    // concurrent spray shares that fetch.
    let spray: Vec<String> = (0..20)
        .map(|i| with_kid(&fi, Some(format!("spray-{i}"))))
        .collect();
    let before = fi.requests().await;
    let started = Instant::now();
    let results =
        futures_util::future::join_all(spray.iter().map(|t| app.exchange(t, "artifact-api", None)))
            .await;
    for r in results {
        assert_error(r, 400, "invalid_request", "token.unknown_key").await;
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        fi.requests().await - before,
        2,
        "one refetch (discovery + keys) for the whole spray"
    );
    // Rotation right after the spray's refetch, with the spray going on: the
    // genuine token waits at most one interval (2 s here) and is served.
    fi.dev.rotate().unwrap();
    fi.healthy().await;
    let genuine = with_kid(&fi, Some(fi.dev.active_kid()));
    let started = Instant::now();
    let (g, forged) = tokio::join!(
        app.exchange(&genuine, "artifact-api", None),
        futures_util::future::join_all(spray.iter().map(|t| app.exchange(t, "artifact-api", None)))
    );
    assert_eq!(g.status().as_u16(), 200, "{}", g.text().await.unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    for r in forged {
        assert_error(r, 400, "invalid_request", "token.unknown_key").await;
    }
}

/// A token issued before the cached key set was fetched never refetches: its key
/// would already be in the set.
#[tokio::test]
async fn an_unknown_kid_in_a_token_older_than_the_key_set_refetches_nothing() {
    let fi = FakeIssuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let app = app_for(&fi, &kc, 600, 1, 2).await;
    assert_eq!(
        app.exchange(&fi.mint(), "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200
    );
    let mut c = fi.dev.claims(&fi_step());
    c["iss"] = json!(fi.issuer_url());
    let iat = c["iat"].as_u64().unwrap() - 600;
    c["iat"] = json!(iat);
    c["exp"] = json!(iat + 3600);
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("older-than-the-set".into());
    let token = fi.dev.sign_with_header(&h, &c).unwrap();
    let before = fi.requests().await;
    let started = Instant::now();
    for _ in 0..5 {
        let r = app.exchange(&token, "artifact-api", None).await;
        assert_error(r, 400, "invalid_request", "token.unknown_key").await;
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(fi.requests().await, before);
}

/// The issue's second input: two published keys with the same `kid` and
/// algorithm. Genuine tokens of either key verify.
#[tokio::test]
async fn two_keys_with_the_same_kid_are_both_tried() {
    let fi = FakeIssuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 2).await;
    let first_kid = fi.dev.active_kid();
    let token_of_first = fi.mint();
    fi.dev.rotate().unwrap();
    let token_of_second = with_kid(&fi, Some(first_kid.clone()));
    let mut jwks = fi.dev.jwks();
    jwks["keys"][1]["kid"] = json!(first_kid);
    fi.server.reset().await;
    let iss = fi.issuer_url();
    Mock::given(method("GET"))
        .and(path_regex(r"/\.well-known/openid-configuration$"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"issuer": iss, "jwks_uri": format!("{iss}/keys.json")})),
        )
        .mount(&fi.server)
        .await;
    Mock::given(method("GET"))
        .and(path_regex(r"/keys\.json$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(jwks))
        .mount(&fi.server)
        .await;
    let app = app_for(&fi, &kc, 600, 1, 2).await;
    for (name, t) in [("first", token_of_first), ("second", token_of_second)] {
        let r = app.exchange(&t, "artifact-api", None).await;
        assert_eq!(
            r.status().as_u16(),
            200,
            "{name}: {}",
            r.text().await.unwrap()
        );
    }
}

/// A kid-less token is not tried against an unbounded number of keys.
#[tokio::test]
async fn a_kidless_token_is_refused_when_the_issuer_publishes_many_keys() {
    let fi = FakeIssuer::start().await;
    let kc = FakeKeycloak::start().await;
    for _ in 0..keycloak_ci_sts::verify::jwks::MAX_KIDLESS_CANDIDATES {
        fi.dev.rotate().unwrap();
    }
    fi.healthy().await;
    let app = app_for(&fi, &kc, 600, 1, 2).await;
    refused_for(&app, &kc, &with_kid(&fi, None), "token.unknown_key").await;
}

async fn refused_for(app: &TestApp, kc: &FakeKeycloak, token: &str, code: &str) {
    let r = app.exchange(token, "artifact-api", None).await;
    assert_error(r, 400, "invalid_request", code).await;
    assert_eq!(kc.token_calls().await, 0);
}
