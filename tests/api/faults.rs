//! Upstream faults: the issuer's discovery/JWKS endpoints and Keycloak failing in
//! every way we could produce. The service must keep verifying with cached keys,
//! report outages as 503 (never as a bad token), not storm its upstreams, and
//! serve again as soon as they are back, without a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keycloak_ci_sts_testkit::DevIssuer;
use serde_json::json;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

/// An issuer whose HTTP answers the test controls (wiremock), with real keys.
pub struct FakeIssuer {
    pub server: MockServer,
    pub dev: Arc<DevIssuer>,
}

impl FakeIssuer {
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        let dev = Arc::new(DevIssuer::new(&server.uri()).unwrap());
        let me = Self { server, dev };
        me.healthy().await;
        me
    }

    pub fn issuer_url(&self) -> String {
        self.dev.issuer_for(WS_SLUG)
    }

    /// Serves discovery and the current keys.
    pub async fn healthy(&self) {
        self.serve_jwks(self.dev.jwks()).await;
    }

    /// Serves discovery and `jwks` as the key set.
    pub async fn serve_jwks(&self, jwks: serde_json::Value) {
        self.server.reset().await;
        let iss = self.issuer_url();
        Mock::given(method("GET"))
            .and(path_regex(r"/\.well-known/openid-configuration$"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"issuer": iss, "jwks_uri": format!("{iss}/keys.json")})),
            )
            .mount(&self.server)
            .await;
        Mock::given(method("GET"))
            .and(path_regex(r"/keys\.json$"))
            .respond_with(ResponseTemplate::new(200).set_body_json(jwks))
            .mount(&self.server)
            .await;
    }

    /// Every request gets `template`.
    pub async fn failing(&self, template: ResponseTemplate) {
        self.server.reset().await;
        Mock::given(wiremock::matchers::any())
            .respond_with(template)
            .mount(&self.server)
            .await;
    }

    pub async fn requests(&self) -> usize {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .len()
    }

    pub fn mint(&self) -> String {
        let issuer_like = self.dev.claims(&step());
        let mut c = issuer_like;
        c["iss"] = json!(self.issuer_url());
        self.dev.sign(&c).unwrap()
    }
}

/// A step of REPO on `main` with the service's audience.
pub fn step() -> keycloak_ci_sts_testkit::StepClaims {
    keycloak_ci_sts_testkit::StepClaims {
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

pub async fn app_for(
    fi: &FakeIssuer,
    kc: &FakeKeycloak,
    ttl: u64,
    refetch: u64,
    timeout: u64,
) -> TestApp {
    // `Issuer` is only used for the other workspace here.
    let other = Issuer::start().await;
    let mut opts = Options::new(&kc.uri());
    opts.issuer_override = Some(fi.issuer_url());
    opts.jwks_cache_ttl = ttl;
    opts.jwks_refetch_interval = refetch;
    opts.jwks_timeout = timeout;
    TestApp::start(&other, opts).await
}

fn bad_answers() -> Vec<(&'static str, ResponseTemplate)> {
    vec![
        ("404", ResponseTemplate::new(404)),
        ("500", ResponseTemplate::new(500)),
        (
            "non-JSON",
            ResponseTemplate::new(200).set_body_string("<html>maintenance</html>"),
        ),
        (
            "huge",
            ResponseTemplate::new(200).set_body_string("x".repeat(600 * 1024)),
        ),
        (
            "slow",
            ResponseTemplate::new(200).set_delay(Duration::from_secs(5)),
        ),
        (
            "redirect",
            ResponseTemplate::new(302).insert_header("Location", "http://127.0.0.1:9/keys.json"),
        ),
    ]
}

#[tokio::test]
async fn cached_keys_keep_working_through_every_kind_of_issuer_failure() {
    for (name, answer) in bad_answers() {
        let fi = FakeIssuer::start().await;
        let kc = FakeKeycloak::start().await;
        kc.token_ok(60, "artifacts:read", 2).await;
        let app = app_for(&fi, &kc, 1, 1, 1).await;
        let r = app.exchange(&fi.mint(), "artifact-api", None).await;
        assert_eq!(r.status().as_u16(), 200, "{name}: first exchange");
        fi.failing(answer).await;
        tokio::time::sleep(Duration::from_millis(1200)).await; // the key set is stale now
        let r = app.exchange(&fi.mint(), "artifact-api", None).await;
        assert_eq!(
            r.status().as_u16(),
            200,
            "{name}: cached keys must keep working"
        );
    }
}

#[tokio::test]
async fn cached_keys_keep_working_while_the_issuer_is_unreachable() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 2).await;
    let mut opts = Options::new(&kc.uri());
    opts.jwks_cache_ttl = 1;
    opts.jwks_refetch_interval = 1;
    let app = TestApp::start(&issuer, opts).await;
    let token = issuer.mint(&issuer.step());
    assert_eq!(
        app.exchange(&token, "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200
    );
    issuer.stop().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_eq!(
        r.status().as_u16(),
        200,
        "connection refused at the issuer, cached keys used"
    );
}

/// Without cached keys, an issuer failure is never a bad token: transient
/// failures are 503 with `Retry-After`, a URL that is not the issuer's (404,
/// redirect) is 502 for the operator, a malformed answer 502 as well.
#[tokio::test]
async fn without_cached_keys_an_issuer_failure_is_classified_by_meaning_not_a_bad_token() {
    for (name, answer) in bad_answers() {
        let (status, error, code) = match name {
            "500" | "slow" => (
                503,
                "temporarily_unavailable",
                "token.issuer_keys_unavailable",
            ),
            "404" | "redirect" => (502, "server_error", "issuer.keys_misconfigured"),
            _ => (502, "server_error", "issuer.keys_malformed"),
        };
        let fi = FakeIssuer::start().await;
        fi.failing(answer).await;
        let kc = FakeKeycloak::start().await;
        kc.token_never_called().await;
        let app = app_for(&fi, &kc, 600, 30, 1).await;
        let start = Instant::now();
        let r = app.exchange(&fi.mint(), "artifact-api", None).await;
        assert_eq!(
            r.headers().get("retry-after").is_some(),
            status == 503,
            "{name}"
        );
        assert_error(r, status, error, code).await;
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{name}: answered after {:?}",
            start.elapsed()
        );
        assert_eq!(app.audit_lines()[0]["outcome"], "failed", "{name}");
    }
}

#[tokio::test]
async fn a_failing_issuer_is_not_stormed() {
    let fi = FakeIssuer::start().await;
    fi.failing(ResponseTemplate::new(503)).await;
    let kc = FakeKeycloak::start().await;
    kc.token_never_called().await;
    let app = app_for(&fi, &kc, 600, 30, 1).await;
    let results = futures_util::future::join_all((0..50).map(|_| {
        let t = fi.mint();
        let app = &app;
        async move {
            app.exchange(&t, "artifact-api", None)
                .await
                .status()
                .as_u16()
        }
    }))
    .await;
    assert!(results.iter().all(|s| *s == 503), "{results:?}");
    assert!(
        fi.requests().await <= 2,
        "{} requests to a failing issuer for 50 exchanges",
        fi.requests().await
    );
}

#[tokio::test]
async fn service_recovers_when_the_issuer_comes_back() {
    let fi = FakeIssuer::start().await;
    fi.failing(ResponseTemplate::new(503)).await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let app = app_for(&fi, &kc, 600, 1, 1).await;
    let r = app.exchange(&fi.mint(), "artifact-api", None).await;
    assert_eq!(r.status().as_u16(), 503);
    fi.healthy().await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // the failure back-off (1 s here)
    let r = app.exchange(&fi.mint(), "artifact-api", None).await;
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn rotation_new_key_after_one_refetch_removed_key_rejected_after_refresh() {
    let fi = FakeIssuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 2).await;
    let app = app_for(&fi, &kc, 1, 1, 1).await;
    let old_token = fi.mint();
    assert_eq!(
        app.exchange(&old_token, "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200
    );
    let old_kid = fi.dev.active_kid();
    fi.dev.rotate().unwrap();
    fi.healthy().await; // publish the new set
    let before = fi.requests().await;
    let r = app.exchange(&fi.mint(), "artifact-api", None).await;
    assert_eq!(r.status().as_u16(), 200, "new key accepted");
    assert_eq!(
        fi.requests().await - before,
        2,
        "one refetch: discovery + keys"
    );
    // The old key is withdrawn; once the cache refreshes, its tokens are refused.
    fi.dev.remove_key(&old_kid);
    fi.healthy().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = app.exchange(&old_token, "artifact-api", None).await;
    assert_error(r, 400, "invalid_request", "token.unknown_key").await;
}

#[tokio::test]
async fn keycloak_back_after_an_outage_serves_the_next_exchange() {
    let (issuer, kc, app) = standard().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&kc.server)
        .await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_error(r, 503, "temporarily_unavailable", "keycloak.server_error").await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_eq!(r.status().as_u16(), 200, "no restart needed");
}

#[tokio::test]
async fn keycloak_discovery_down_at_first_then_up() {
    let issuer = Issuer::start().await;
    let kc = MockServer::start().await;
    let app = TestApp::start(&issuer, Options::new(&kc.uri())).await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_error(r, 502, "server_error", "keycloak.endpoint_not_found").await; // discovery 404: a misconfigured realm
    let uri = kc.uri();
    Mock::given(method("GET"))
        .and(path("/realms/ci/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": format!("{uri}/realms/ci"), "token_endpoint": format!("{uri}{TOKEN_PATH}")})))
        .mount(&kc)
        .await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": FakeKeycloak::access_token_of(&format!("{uri}/realms/ci"), 60), "expires_in": 60, "token_type": "Bearer", "scope": "artifacts:read"})))
        .mount(&kc)
        .await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_eq!(
        r.status().as_u16(),
        200,
        "discovery failures are not cached"
    );
}
