//! Micro-benchmark: the whole decision for one token (verification with a warm key
//! cache, then policy evaluation) next to the bare RS256 signature check of the
//! same token: the floor set by the cryptography. Target: decision ≤ 1.3 × bare.
//!
//! `cargo bench --bench verify`
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "benchmark setup fails by panicking"
)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};

/// The service's allocator (src/main.rs), so the benchmark measures what runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use keycloak_ci_sts::configuration::{JwksSettings, WorkspaceSettings};
use keycloak_ci_sts::domain::{BbUuid, SecretToken};
use keycloak_ci_sts::policy::{EvalRequest, PolicySet};
use keycloak_ci_sts::verify::jwks::KeyCache;
use keycloak_ci_sts::verify::Verifier;
use keycloak_ci_sts_testkit::{DevIssuer, StepClaims};

const WS: &str = "03b741e3-cf4a-41f9-9a59-cec52e21bdc3";
const REPO: &str = "d4e45493-4a33-477d-917b-a24e7e4bd39b";

fn bench(c: &mut Criterion) {
    // A current-thread runtime: `block_on` adds the least overhead around the async
    // key lookup (the local issuer runs on actix's own worker thread).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let issuer = Arc::new(DevIssuer::new(&base).expect("issuer"));
    let server = {
        let _in_runtime = rt.enter();
        keycloak_ci_sts_testkit::serve(issuer.clone(), listener).expect("serve")
    };
    rt.spawn(server);

    let ws = WorkspaceSettings {
        slug: "acme".into(),
        uuid: BbUuid::parse_lenient(WS).expect("uuid"),
        issuer: issuer.issuer_for("acme"),
        audiences: vec![
            format!("ari:cloud:bitbucket::workspace/{WS}"),
            "https://sts.example.test".into(),
        ],
        algorithm: jsonwebtoken::Algorithm::RS256,
    };
    let metrics = Arc::new(keycloak_ci_sts::metrics::Metrics::new().expect("metrics"));
    let http = keycloak_ci_sts::http::client(Duration::from_secs(2), Duration::from_secs(5))
        .expect("http");
    let settings = JwksSettings {
        cache_ttl: Duration::from_secs(3600),
        refetch_interval: Duration::from_secs(30),
        timeout: Duration::from_secs(5),
        max_body_bytes: 256 * 1024,
    };
    let verifier = Verifier::new(
        vec![ws],
        Arc::new(KeyCache::new(http, settings, metrics)),
        keycloak_ci_sts::verify::TokenRules {
            leeway: Duration::from_secs(60),
            max_token_bytes: 16 * 1024,
            max_lifetime: Duration::from_secs(86_400),
        },
    );
    let policies = PolicySet::load_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
        None,
    )
    .expect("policies");

    let token = issuer
        .mint(&StepClaims {
            workspace: "acme".into(),
            workspace_uuid: WS.into(),
            repository_uuid: REPO.into(),
            step_uuid: None,
            pipeline_uuid: None,
            branch_name: Some("main".into()),
            deployment_environment_uuid: None,
            audiences: vec!["https://sts.example.test".into()],
            lifetime_seconds: Some(86_400),
        })
        .expect("mint");
    let secret = SecretToken::new(token.clone());
    // Warm the key cache; check the decision is an allow.
    let id = rt.block_on(verifier.verify(&secret)).expect("verifies");
    let scopes = keycloak_ci_sts::domain::Scopes::default();
    let d = policies.evaluate(&EvalRequest {
        subject: &keycloak_ci_sts::exchange::subject_of(&id),
        audience: "artifact-api",
        scopes: &scopes,
        now: std::time::SystemTime::now(),
    });
    assert!(matches!(
        d.outcome,
        keycloak_ci_sts::policy::Outcome::Allow(_)
    ));

    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(issuer.jwks()).expect("jwks");
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).expect("key");
    let (message, signature) = token.rsplit_once('.').expect("jws");

    let mut group = c.benchmark_group("one_token");
    group.bench_function("bare_rs256_signature_check", |b| {
        b.iter(|| {
            let ok = jsonwebtoken::crypto::verify(
                signature,
                message.as_bytes(),
                &key,
                jsonwebtoken::Algorithm::RS256,
            )
            .expect("verify");
            assert!(ok);
        })
    });
    group.bench_function("verify_and_decide", |b| {
        b.iter(|| {
            let id = rt.block_on(verifier.verify(&secret)).expect("verifies");
            let d = policies.evaluate(&EvalRequest {
                subject: &keycloak_ci_sts::exchange::subject_of(&id),
                audience: "artifact-api",
                scopes: &scopes,
                now: std::time::SystemTime::now(),
            });
            std::hint::black_box(d);
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
