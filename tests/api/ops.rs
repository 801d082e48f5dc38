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
