//! Operating the service: metrics, policy reload, graceful shutdown, limits.

use std::collections::HashMap;

use crate::helpers::*;

/// Scrapes `/metrics` and parses it with a Prometheus text-format parser.
pub async fn scrape(app_address: &str) -> prometheus_parse::Scrape {
    let text = reqwest::get(format!("{app_address}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text format")
}

/// Value of the sample `name` whose labels include `labels`.
pub fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => h.last().map_or(0.0, |b| b.count),
            _ => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn metrics_are_scraped_and_parsed() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    assert_eq!(
        app.exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200
    );
    let mut feature = issuer.step();
    feature.branch_name = Some("feature/x".into());
    assert_eq!(
        app.exchange(&issuer.mint(&feature), "artifact-api", None)
            .await
            .status()
            .as_u16(),
        400
    );
    assert_eq!(
        app.exchange("garbage", "artifact-api", None)
            .await
            .status()
            .as_u16(),
        400
    );

    let s = scrape(&app.address).await;
    let types: HashMap<&str, &str> = s.docs.keys().map(|k| (k.as_str(), "doc")).collect();
    for name in [
        "sts_exchanges_total",
        "sts_exchange_phase_duration_seconds",
        "sts_jwks_fetches_total",
        "sts_jwks_cache_lookups_total",
        "sts_keycloak_responses_total",
    ] {
        assert!(types.contains_key(name), "{name} has no HELP line");
    }
    assert_eq!(
        value(
            &s,
            "sts_exchanges_total",
            &[("outcome", "allowed"), ("policy", "artifacts-publish")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "sts_exchanges_total",
            &[
                ("outcome", "denied"),
                ("error_code", "policy.branch_not_allowed")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "sts_exchanges_total",
            &[("outcome", "denied"), ("error_code", "token.malformed")]
        ),
        1.0
    );
    assert_eq!(
        value(&s, "sts_keycloak_responses_total", &[("status", "200")]),
        1.0
    );
    assert_eq!(
        value(&s, "sts_jwks_fetches_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        value(&s, "sts_jwks_cache_lookups_total", &[("result", "miss")]),
        1.0
    );
    assert_eq!(
        value(&s, "sts_jwks_cache_lookups_total", &[("result", "hit")]),
        1.0
    );
    let total = s
        .samples
        .iter()
        .find(|x| {
            x.metric == "sts_exchange_phase_duration_seconds_count"
                && x.labels.get("phase") == Some("total")
        })
        .map(|x| match x.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
            _ => -1.0,
        });
    assert_eq!(total, Some(3.0), "three exchanges timed");
}

#[tokio::test]
async fn per_step_and_per_repository_limits_answer_429_with_retry_after_and_are_counted() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 6).await; // 2 (step) + 3 (repository) + 1 (other repository)
    let mut opts = Options::new(&kc.uri());
    opts.per_step_per_minute = 2;
    opts.per_repository_per_minute = 5;
    let app = TestApp::start(&issuer, opts).await;
    let mut step = issuer.step();
    step.step_uuid = Some(uuid::Uuid::new_v4().to_string());
    let token = issuer.mint(&step);
    for _ in 0..2 {
        assert_eq!(
            app.exchange(&token, "artifact-api", None)
                .await
                .status()
                .as_u16(),
            200
        );
    }
    let r = app.exchange(&token, "artifact-api", None).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    assert_error(r, 429, "temporarily_unavailable", "limit.step_exceeded").await;
    // Other steps of the same repository until the repository limit (5 per minute).
    for _ in 0..3 {
        let r = app
            .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
            .await;
        assert_eq!(r.status().as_u16(), 200);
    }
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_error(
        r,
        429,
        "temporarily_unavailable",
        "limit.repository_exceeded",
    )
    .await;
    // Another repository is not affected.
    let mut other = issuer.step();
    other.repository_uuid = OTHER_REPO.into();
    let r = app
        .exchange(&issuer.mint(&other), "artifact-api", None)
        .await;
    assert_ne!(r.status().as_u16(), 429);
    let s = scrape(&app.address).await;
    assert_eq!(
        value(&s, "sts_rate_limited_total", &[("limit", "step")]),
        1.0
    );
    assert_eq!(
        value(&s, "sts_rate_limited_total", &[("limit", "repository")]),
        1.0
    );
    assert_eq!(
        kc.token_calls().await,
        6,
        "limited exchanges never reach Keycloak"
    );
}

#[tokio::test]
async fn a_policy_can_set_its_own_limits() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let mut opts = Options::new(&kc.uri());
    opts.policies = vec![(
        "strict.yaml".into(),
        allow_policy(
            &when_repo(),
            "sts-artifacts",
            "artifact-api",
            "artifacts:read",
            "artifacts:read",
            300,
        ) + "  limits:\n    per_step_per_minute: 1\n",
    )];
    let app = TestApp::start(&issuer, opts).await;
    let token = issuer.mint(&issuer.step());
    assert_eq!(
        app.exchange(&token, "artifact-api", None)
            .await
            .status()
            .as_u16(),
        200
    );
    let r = app.exchange(&token, "artifact-api", None).await;
    assert_error(r, 429, "temporarily_unavailable", "limit.step_exceeded").await;
}

fn artifact_policy(audience: &str) -> String {
    allow_policy(
        &when_repo(),
        "sts-artifacts",
        audience,
        "artifacts:read",
        "artifacts:read",
        300,
    )
}

async fn eventually_status(app: &TestApp, token: &str, audience: &str, want: u16) -> bool {
    for _ in 0..40 {
        if app.exchange(token, audience, None).await.status().as_u16() == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

use std::time::Duration;

/// True once the service counts a refused policy reload (polled for 5 s).
pub async fn eventually_reload_refused(address: &str) -> bool {
    for _ in 0..50 {
        let s = scrape(address).await;
        if value(&s, "sts_policy_reloads_total", &[("result", "error")]) >= 1.0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn policies_reload_when_a_file_changes_and_an_invalid_set_is_refused() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1..).await;
    let mut opts = Options::new(&kc.uri());
    opts.policies = vec![("a.yaml".into(), artifact_policy("artifact-api"))];
    let app = TestApp::start(&issuer, opts).await;
    let dir = app.dir.path().join("policies");
    let token = issuer.mint(&issuer.step());
    assert_eq!(
        app.exchange(&token, "new-api", None)
            .await
            .status()
            .as_u16(),
        400
    );

    // A new valid file: picked up without restart.
    std::fs::write(dir.join("b.yaml"), artifact_policy("new-api")).unwrap();
    assert!(
        eventually_status(&app, &token, "new-api", 200).await,
        "new policy not loaded"
    );

    // A broken file: the whole new set is refused, the previous set stays active.
    std::fs::write(
        dir.join("c.yaml"),
        "effect: allow\nwhen: {repositoryUuid: nope}\n",
    )
    .unwrap();
    assert!(
        eventually_reload_refused(&app.address).await,
        "the invalid set was not reported"
    );
    assert_eq!(
        app.exchange(&token, "new-api", None)
            .await
            .status()
            .as_u16(),
        200,
        "old set still active"
    );
    let s = scrape(&app.address).await;
    assert!(value(&s, "sts_policy_reloads_total", &[("result", "ok")]) >= 1.0);
}

#[tokio::test]
async fn an_in_flight_exchange_finishes_with_the_policies_it_started_with() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_slow("artifacts:read", Duration::from_millis(1500))
        .await;
    let mut opts = Options::new(&kc.uri());
    opts.policies = vec![("a.yaml".into(), artifact_policy("artifact-api"))];
    let app = TestApp::start(&issuer, opts).await;
    let token = issuer.mint(&issuer.step());
    let in_flight = app.exchange(&token, "artifact-api", None);
    let swap = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // While the exchange waits for Keycloak, the policy is withdrawn.
        std::fs::remove_file(app.dir.path().join("policies/a.yaml")).unwrap();
    };
    let (r, ()) = tokio::join!(in_flight, swap);
    assert_eq!(
        r.status().as_u16(),
        200,
        "the running exchange kept its policy set"
    );
    assert!(
        eventually_status(&app, &token, "artifact-api", 400).await,
        "later exchanges see the new set"
    );
}

/// Sends a signal to a process with the `kill` command.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn sighup_reloads_policies_in_the_running_binary() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 1..).await;
    let mut opts = Options::new(&kc.uri());
    opts.policies = vec![("a.yaml".into(), artifact_policy("artifact-api"))];
    opts.top_extra = "watch_policies = false\n[policies]\npoll_ms = 0".into();
    let (dir, _toml, _audit) = TestApp::write_config(&issuer, opts);
    let svc = ServiceProcess::start(&dir.path().join("sts.toml"), "info");
    let address = format!("http://127.0.0.1:{}", svc.port);
    let token = issuer.mint(&issuer.step());
    let post = |aud: &'static str| {
        let token = token.clone();
        let url = format!("{address}/token");
        async move {
            post_exchange(&reqwest::Client::new(), &url, &token, aud)
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    std::fs::write(
        dir.path().join("policies/b.yaml"),
        artifact_policy("new-api"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        post("new-api").await,
        400,
        "not watched: no reload without SIGHUP"
    );
    signal(svc.child.id(), "-HUP");
    let mut reloaded = false;
    for _ in 0..40 {
        if post("new-api").await == 200 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "SIGHUP did not reload");
    let s = scrape(&address).await;
    assert_eq!(
        value(&s, "sts_policy_reloads_total", &[("result", "ok")]),
        1.0
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_exchanges_finish_then_exits_0() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_slow("artifacts:read", Duration::from_millis(2000))
        .await;
    let mut opts = Options::new(&kc.uri());
    opts.top_extra = "shutdown_grace_seconds = 10".into();
    let (dir, _toml, _audit) = TestApp::write_config(&issuer, opts);
    let mut svc = ServiceProcess::start(&dir.path().join("sts.toml"), "info");
    let url = format!("http://127.0.0.1:{}/token", svc.port);
    let token = issuer.mint(&issuer.step());
    let in_flight = {
        let url = url.clone();
        let token = token.clone();
        tokio::spawn(async move {
            post_exchange(&reqwest::Client::new(), &url, &token, "artifact-api")
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(svc.child.id(), "-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new connections once stopping.
    let late = reqwest::Client::new()
        .get(url.replace("/token", "/healthz"))
        .send()
        .await;
    assert!(late.is_err(), "accepted a new connection after SIGTERM");
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "in-flight exchange finished"
    );
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = svc.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "did not exit within the grace period"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_blocked_audit_destination_never_freezes_the_service_and_no_token_leaves_unaudited() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 0..=1).await;
    let mut opts = Options::new(&kc.uri());
    // Audit lines to standard output, which the test never reads: the pipe fills up.
    opts.audit_toml = Some("[audit]\nqueue_capacity = 16".into());
    let (dir, _toml, _audit) = TestApp::write_config(&issuer, opts);
    let svc = ServiceProcess::start_with_stdout(
        &dir.path().join("sts.toml"),
        "warn,keycloak_ci_sts::startup=info",
        std::process::Stdio::piped(),
    );
    let base = format!("http://127.0.0.1:{}", svc.port);
    let http = reqwest::Client::new();
    let garbage = [
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", "not-a-token"),
        ("subject_token_type", ID_TOKEN_TYPE),
        ("audience", "artifact-api"),
    ];
    for _ in 0..600 {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            http.post(format!("{base}/token")).form(&garbage).send(),
        )
        .await
        .expect("the service stalled behind its audit log")
        .unwrap();
        assert_eq!(r.status().as_u16(), 400);
    }
    let r = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // An allowed exchange cannot be audited now: the token is withheld.
    let r = post_exchange(
        &http,
        &format!("{base}/token"),
        &issuer.mint(&issuer.step()),
        "artifact-api",
    )
    .await
    .unwrap();
    let body = assert_error(r, 503, "temporarily_unavailable", "audit.unavailable").await;
    assert!(body.get("access_token").is_none());
    let s = scrape(&base).await;
    assert!(value(&s, "sts_audit_failures_total", &[("outcome", "denied")]) > 0.0);
    assert_eq!(
        value(&s, "sts_audit_failures_total", &[("outcome", "allowed")]),
        1.0
    );
}
