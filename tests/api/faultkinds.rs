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
