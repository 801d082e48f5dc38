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
    let mut c = fi.dev.claims(&crate::faults::step());
    c["iss"] = json!(fi.issuer_url());
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid;
    fi.dev.sign_with_header(&h, &c).unwrap()
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
    let attacker = keycloak_ci_sts_testkit::DevIssuer::new("http://127.0.0.1:9").unwrap();
    let mut forged = attacker.claims(&crate::faults::step());
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
    // One refetch (discovery + keys) for the whole spray on an idle machine; at
    // most one per interval (2 s) on a loaded one.
    let refetches = (fi.requests().await - before) / 2;
    let allowed = started.elapsed().as_secs() as usize / 2 + 1;
    assert!(
        (1..=allowed).contains(&refetches),
        "{refetches} refetches in {:?}",
        started.elapsed()
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

/// A genuine token issued before the cached key set was fetched, whose key the
/// issuer published late (a lagging key endpoint or CDN): its unknown `kid`
/// still refetches (its `iat` is not a reason to skip), after at most one interval.
#[tokio::test]
async fn a_late_published_key_of_an_older_token_is_fetched() {
    let fi = FakeIssuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 2).await;
    let app = app_for(&fi, &kc, 600, 1, 2).await;
    assert_eq!(
        app.exchange(&fi.mint(), "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200
    );
    // The issuer signs with a new key (iat two minutes ago) that its endpoint
    // did not publish when we fetched; it publishes it now.
    fi.dev.rotate().unwrap();
    let mut c = fi.dev.claims(&crate::faults::step());
    c["iss"] = json!(fi.issuer_url());
    let iat = c["iat"].as_u64().unwrap() - 120;
    c["iat"] = json!(iat);
    c["exp"] = json!(iat + 3600);
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(fi.dev.active_kid());
    let token = fi.dev.sign_with_header(&h, &c).unwrap();
    fi.healthy().await;
    let started = Instant::now();
    let r = app.exchange(&token, "artifact-api", None).await;
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    assert!(started.elapsed() < Duration::from_secs(3));
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
    fi.serve_jwks(jwks).await;
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

// ------------------------------------------------ §3 upstream answers by meaning

use wiremock::matchers::path;

/// The exchange's answer when Keycloak's token endpoint answers `template`.
async fn keycloak_says(
    template: impl FnOnce(&str) -> ResponseTemplate,
) -> (reqwest::Response, TestApp) {
    let (issuer, kc, app) = standard().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(template(&format!("{}/realms/ci", kc.uri())))
        .mount(&kc.server)
        .await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    (r, app)
}

/// The issue's input: Keycloak (or a proxy before it) answers 429 with
/// `Retry-After: 7`. The caller gets 503 with that Retry-After, not a 502 that
/// sends the operator to the configuration.
#[tokio::test]
async fn keycloak_429_with_retry_after_is_503_with_the_same_retry_after() {
    let (r, _) =
        keycloak_says(|_| ResponseTemplate::new(429).insert_header("Retry-After", "7")).await;
    assert_eq!(r.headers().get("retry-after").unwrap(), "7");
    assert_error(r, 503, "temporarily_unavailable", "keycloak.rate_limited").await;
}

#[tokio::test]
async fn an_upstream_retry_after_is_bounded_and_read_as_a_date_too() {
    let (r, _) =
        keycloak_says(|_| ResponseTemplate::new(429).insert_header("Retry-After", "86400")).await;
    assert_eq!(r.headers().get("retry-after").unwrap(), "60");
    let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(40));
    let (r, _) =
        keycloak_says(|_| ResponseTemplate::new(503).insert_header("Retry-After", later.as_str()))
            .await;
    let secs: u64 = r
        .headers()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // 40 s ahead when written; a loaded machine may take a few seconds to answer.
    assert!((20..=40).contains(&secs), "{secs}");
    assert_error(r, 503, "temporarily_unavailable", "keycloak.server_error").await;
}

/// The kind: every status Keycloak's token endpoint can answer maps by meaning:
/// transient → 503 with Retry-After; our configuration → 502 with an operator
/// code; and no token is ever passed on.
#[tokio::test]
async fn every_keycloak_status_is_classified_by_meaning() {
    let cases: &[(u16, Option<serde_json::Value>, u16, &str)] = &[
        (301, None, 502, "keycloak.redirected"),
        (302, None, 502, "keycloak.redirected"),
        (307, None, 502, "keycloak.redirected"),
        (
            400,
            Some(json!({"error": "invalid_request"})),
            502,
            "keycloak.request_rejected",
        ),
        (
            400,
            Some(json!({"error": "invalid_scope"})),
            502,
            "keycloak.scope_rejected",
        ),
        (
            400,
            Some(json!({"error": "temporarily_unavailable"})),
            503,
            "keycloak.server_error",
        ),
        (
            401,
            Some(json!({"error": "invalid_client"})),
            502,
            "keycloak.client_rejected",
        ),
        (
            401,
            Some(json!({"error": "unauthorized_client"})),
            502,
            "keycloak.client_rejected",
        ),
        (403, None, 502, "keycloak.request_rejected"),
        (404, None, 502, "keycloak.endpoint_not_found"),
        (
            404,
            Some(json!({"error": "Realm does not exist"})),
            502,
            "keycloak.endpoint_not_found",
        ),
        (
            404,
            Some(json!({"error": "HTTP 404 Not Found"})),
            502,
            "keycloak.endpoint_not_found",
        ),
        (201, None, 502, "keycloak.bad_response"),
        (204, None, 502, "keycloak.bad_response"),
        (408, None, 503, "keycloak.server_error"),
        (410, None, 502, "keycloak.endpoint_not_found"),
        (418, None, 502, "keycloak.request_rejected"),
        (429, None, 503, "keycloak.rate_limited"),
        (
            500,
            Some(json!({"error": "unknown_error"})),
            503,
            "keycloak.server_error",
        ),
        (502, None, 503, "keycloak.server_error"),
        (503, None, 503, "keycloak.server_error"),
        (504, None, 503, "keycloak.server_error"),
    ];
    for (status, body, want, code) in cases {
        let body = body.clone();
        let (r, _) = keycloak_says(|_| {
            let t = ResponseTemplate::new(*status);
            match body {
                Some(b) => t.set_body_json(b),
                None => t.set_body_string("<html>proxy</html>"),
            }
        })
        .await;
        assert_eq!(r.status().as_u16(), *want, "{status} {code}");
        assert_eq!(
            r.headers().get("retry-after").is_some(),
            *want == 503,
            "{status}"
        );
        let error = if *want == 503 {
            "temporarily_unavailable"
        } else {
            "server_error"
        };
        let body = assert_error(r, *want, error, code).await;
        assert!(body.get("access_token").is_none());
    }
}

fn token_body(access_token: &str) -> serde_json::Value {
    json!({"access_token": access_token, "expires_in": 60, "token_type": "Bearer", "scope": "artifacts:read"})
}

fn jws(header: serde_json::Value, payload: &str) -> String {
    use base64::Engine;
    let e = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!(
        "{}.{}.c2ln",
        e(header.to_string().as_bytes()),
        e(payload.as_bytes())
    )
}

/// The kind, second half: the token Keycloak returns is validated as strictly as
/// Bitbucket's before it is passed on; anything malformed is 502 bad_response.
#[tokio::test]
async fn a_malformed_keycloak_token_is_never_passed_on() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    type Case = Box<dyn Fn(&str) -> serde_json::Value>;
    let rs = json!({"alg": "RS256", "typ": "JWT"});
    let claims = move |realm: &str, extra: serde_json::Value| {
        let mut c = json!({
            "iss": realm, "iat": now, "exp": now + 60, "jti": "j",
            "azp": "sts-artifacts", "typ": "Bearer", "scope": "artifacts:read",
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c.to_string()
    };
    let with_claims = move |header: &serde_json::Value, extra: serde_json::Value| -> Case {
        let header = header.clone();
        Box::new(move |r: &str| token_body(&jws(header.clone(), &claims(r, extra.clone()))))
    };
    let cases: Vec<(&str, Case)> = vec![
        ("opaque", Box::new(|_| token_body("opaque-token"))),
        ("unsigned", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                token_body(&jws(rs.clone(), &claims(r, json!({}))).replace(".c2ln", "."))
            })
        }),
        (
            "alg none",
            Box::new(move |r: &str| {
                token_body(&jws(json!({"alg": "none"}), &claims(r, json!({}))))
            }),
        ),
        ("other issuer", {
            let rs = rs.clone();
            Box::new(move |_| {
                token_body(&jws(
                    rs.clone(),
                    &claims("https://evil.example/realms/ci", json!({})),
                ))
            })
        }),
        ("no exp", {
            let rs = rs.clone();
            Box::new(move |r: &str| token_body(&jws(rs.clone(), &claims(r, json!({"exp": null})))))
        }),
        ("exp as string", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                token_body(&jws(rs.clone(), &claims(r, json!({"exp": "soon"}))))
            })
        }),
        ("expired", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                token_body(&jws(
                    rs.clone(),
                    &claims(r, json!({"iat": now - 3600, "exp": now - 3000})),
                ))
            })
        }),
        ("issued in the future", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                token_body(&jws(
                    rs.clone(),
                    &claims(r, json!({"iat": now + 3600, "exp": now + 3660})),
                ))
            })
        }),
        ("another client", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                token_body(&jws(rs.clone(), &claims(r, json!({"azp": "sts-deploy"}))))
            })
        }),
        ("duplicate member", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                let c = claims(r, json!({}));
                let dup = format!("{{\"iss\":\"https://evil.example\",{}", &c[1..]);
                token_body(&jws(rs.clone(), &dup))
            })
        }),
        ("payload not an object", {
            let rs = rs.clone();
            Box::new(move |_| token_body(&jws(rs.clone(), "[1,2]")))
        }),
        ("typ Refresh", with_claims(&rs, json!({"typ": "Refresh"}))),
        ("no scope claim", with_claims(&rs, json!({"scope": null}))),
        ("no scope in the answer", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                let mut b = token_body(&jws(rs.clone(), &claims(r, json!({}))));
                b.as_object_mut().unwrap().remove("scope");
                b
            })
        }),
        ("no typ", with_claims(&rs, json!({"typ": null}))),
        (
            "alg none with a space",
            with_claims(&json!({"alg": "none "}), json!({})),
        ),
        (
            "alg HS256",
            with_claims(&json!({"alg": "HS256"}), json!({})),
        ),
        ("no azp", with_claims(&rs, json!({"azp": null}))),
        (
            "just expired",
            with_claims(&rs, json!({"iat": now - 120, "exp": now - 59})),
        ),
        (
            "nbf in the future",
            with_claims(&rs, json!({"nbf": now + 3600})),
        ),
        (
            "iat equals exp",
            with_claims(&rs, json!({"iat": now + 5, "exp": now + 5})),
        ),
        ("signature not base64url", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                token_body(&jws(rs.clone(), &claims(r, json!({}))).replace(".c2ln", ".!!!@@@"))
            })
        }),
        ("expires_in beyond exp - iat", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                let mut b = token_body(&jws(rs.clone(), &claims(r, json!({}))));
                b["expires_in"] = json!(600);
                b
            })
        }),
        ("token_type mac", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                let mut b = token_body(&jws(rs.clone(), &claims(r, json!({}))));
                b["token_type"] = json!("mac");
                b
            })
        }),
        ("expires_in 0", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                let mut b = token_body(&jws(rs.clone(), &claims(r, json!({}))));
                b["expires_in"] = json!(0);
                b
            })
        }),
        ("scope with a quote", {
            let rs = rs.clone();
            Box::new(move |r: &str| {
                let mut b = token_body(&jws(rs.clone(), &claims(r, json!({}))));
                b["scope"] = json!("artifacts:read \"x\"");
                b
            })
        }),
    ];
    for (name, body) in cases {
        let (r, app) =
            keycloak_says(|realm| ResponseTemplate::new(200).set_body_json(body(realm))).await;
        let b = assert_error(r, 502, "server_error", "keycloak.bad_response").await;
        assert!(b.get("access_token").is_none(), "{name}");
        assert_eq!(
            app.audit_lines().last().unwrap()["error_code"],
            "keycloak.bad_response",
            "{name}"
        );
    }
    // and the well-formed one passes
    let (r, _) = keycloak_says(|realm| {
        ResponseTemplate::new(200).set_body_json(token_body(&jws(
            json!({"alg": "RS256"}),
            &claims(realm, json!({})),
        )))
    })
    .await;
    assert_eq!(r.status().as_u16(), 200);
}

/// The same classification for Keycloak's discovery document.
#[tokio::test]
async fn keycloak_discovery_answers_are_classified_by_meaning() {
    for (status, want, code) in [
        (429, 503, "keycloak.rate_limited"),
        (503, 503, "keycloak.server_error"),
        (404, 502, "keycloak.endpoint_not_found"),
        (302, 502, "keycloak.redirected"),
        (403, 502, "keycloak.request_rejected"),
    ] {
        let issuer = Issuer::start().await;
        let kc = wiremock::MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(status).insert_header("Retry-After", "3"))
            .mount(&kc)
            .await;
        let app = TestApp::start(&issuer, Options::new(&kc.uri())).await;
        let r = app
            .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
            .await;
        if want == 503 {
            assert_eq!(r.headers().get("retry-after").unwrap(), "3", "{status}");
        }
        let error = if want == 503 {
            "temporarily_unavailable"
        } else {
            "server_error"
        };
        assert_error(r, want, error, code).await;
    }
}

/// And for the issuer's discovery and JWKS: 429 with Retry-After passes it on;
/// a discovery naming another issuer is the operator's to fix.
#[tokio::test]
async fn issuer_key_answers_are_classified_by_meaning() {
    let fi = FakeIssuer::start().await;
    fi.failing(ResponseTemplate::new(429).insert_header("Retry-After", "9"))
        .await;
    let kc = FakeKeycloak::start().await;
    let app = app_for(&fi, &kc, 600, 1, 2).await;
    let r = app.exchange(&fi.mint(), "artifact-api", None).await;
    assert_eq!(r.headers().get("retry-after").unwrap(), "9");
    assert_error(
        r,
        503,
        "temporarily_unavailable",
        "token.issuer_keys_unavailable",
    )
    .await;

    let fi = FakeIssuer::start().await;
    fi.server.reset().await;
    Mock::given(method("GET"))
        .and(path_regex(r"/\.well-known/openid-configuration$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": "https://api.bitbucket.org/2.0/workspaces/other/pipelines-config/identity/oidc",
            "jwks_uri": format!("{}/keys.json", fi.issuer_url())
        })))
        .mount(&fi.server)
        .await;
    let app = app_for(&fi, &kc, 600, 1, 2).await;
    let r = app.exchange(&fi.mint(), "artifact-api", None).await;
    assert_error(r, 502, "server_error", "issuer.keys_misconfigured").await;
}

/// A Keycloak client whose default client scopes give more than the policy
/// grants (a scope moved to "Default" by mistake): the token is not passed on.
#[tokio::test]
async fn a_keycloak_token_with_unrequested_scopes_is_refused() {
    for (name, response_scope, claim_scope) in [
        (
            "response",
            "artifacts:read artifacts:write",
            "artifacts:read",
        ),
        ("claim", "artifacts:read", "artifacts:write artifacts:read"),
    ] {
        let (r, app) = keycloak_says(|realm| {
            let token = FakeKeycloak::token_for(realm, "sts-artifacts", 60, claim_scope);
            let mut b = token_body(&token);
            b["scope"] = json!(response_scope);
            ResponseTemplate::new(200).set_body_json(b)
        })
        .await;
        let b = assert_error(r, 502, "server_error", "keycloak.scope_exceeds_grant").await;
        assert!(b.get("access_token").is_none(), "{name}");
        assert_eq!(
            app.audit_lines().last().unwrap()["outcome"],
            "failed",
            "{name}"
        );
    }
    // Keycloak's identity scopes (profile, email, ...) are not access: accepted.
    let (r, _) = keycloak_says(|realm| {
        let scope = "profile email artifacts:read";
        let mut b = token_body(&FakeKeycloak::token_for(realm, "sts-artifacts", 60, scope));
        b["scope"] = json!(scope);
        ResponseTemplate::new(200).set_body_json(b)
    })
    .await;
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
}

/// The outsider round's finding: a destination that refuses writes (a full disk)
/// must not let tokens out without their audit line.
#[tokio::test]
async fn a_failing_audit_destination_withholds_tokens() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 0..).await;
    let mut opts = Options::new(&kc.uri());
    opts.audit_toml = Some("[audit]\npath = \"/dev/full\"\n".into());
    let app = TestApp::start(&issuer, opts).await;
    for _ in 0..3 {
        let r = app
            .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
            .await;
        assert!(r.headers().get("retry-after").is_some());
        let b = assert_error(r, 503, "temporarily_unavailable", "audit.unavailable").await;
        assert!(b.get("access_token").is_none());
    }
    let s = crate::ops::scrape(&app.address).await;
    assert!(crate::ops::value(&s, "sts_audit_failures_total", &[("outcome", "allowed")]) >= 3.0);
}
