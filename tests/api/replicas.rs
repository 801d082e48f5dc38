//! Several replicas, as platform teams run the service (issue 13): a real
//! Redis (Debian's `redis-server`), three service processes and a load
//! balancer (Debian's `haproxy`) in front of them, all on 127.0.0.1, with a
//! wiremock Keycloak. `scripts/bootstrap.sh` installs both programs;
//! `scripts/test.sh` runs these `#[ignore]`d tests (without the programs they
//! fail, they never skip).
//!
//! - the per-step limit is shared: N exchanges over three replicas, not 3N;
//! - Redis stopped: `on_store_error = "deny"` answers 503
//!   `limit.store_unavailable`, `"local"` falls back to each replica's own
//!   limiter; Redis back: shared counting resumes without restarts;
//! - under steady load, one replica killed (SIGKILL) and one stopped (SIGTERM):
//!   every 200 has its audit line, every other answer is a documented error.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keycloak_ci_sts::domain::SecretToken;
use serde_json::Value;

use crate::helpers::*;

/// `haproxy` in front of `backends`: round robin, health checks on `/healthz`
/// every 200 ms, a failed connection or an empty answer retried on another
/// replica.
pub struct Haproxy {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    pub fn start(backends: &[u16]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            // A server is marked down after two failed checks, each allowed 2 s
            // (`timeout check`): one slow /healthz of the last replica left
            // under load on a busy 2-core runner once marked every server down,
            // and haproxy answered its own 503 (no JSON body) until it rose
            // again. A killed replica's refused connections are retried on
            // another server meanwhile (`retry-on conn-failure`, `redispatch`).
            .map(|(i, p)| format!("  server r{i} 127.0.0.1:{p} check inter 200ms fall 2 rise 2\n"))
            .collect();
        let cfg = format!(
            "global\n  maxconn 2000\n\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  timeout check 2s\n  retries 3\n  option redispatch 1\n  retry-on conn-failure empty-response response-timeout\n\nfrontend sts\n  bind 127.0.0.1:{port}\n  default_backend replicas\n\nbackend replicas\n  balance roundrobin\n  option httpchk GET /healthz\n{servers}"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (scripts/bootstrap.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One replica: its configuration directory (kept alive) and its process.
pub struct Replica {
    pub process: ServiceProcess,
    pub audit: PathBuf,
    _dir: tempfile::TempDir,
    _policies: std::sync::Arc<tempfile::TempDir>,
}

/// `n` service processes with the same policies, Keycloak and limits.
pub fn replicas(
    issuer: &Issuer,
    kc: &FakeKeycloak,
    n: usize,
    per_step: u32,
    limits_extra: &str,
) -> Vec<Replica> {
    let (policies_dir, policies) = policies_without_identities();
    let policies_dir = std::sync::Arc::new(policies_dir);
    (0..n)
        .map(|_| {
            let mut opts = Options::new(&kc.uri());
            opts.identity = false;
            opts.policies_dir = Some(policies.clone());
            opts.per_step_per_minute = per_step;
            opts.limits_extra = limits_extra.to_string();
            // Lines on disk before each 200, as a cautious operator configures it.
            opts.audit_fsync = true;
            let (dir, _, audit) = TestApp::write_config(issuer, opts);
            let process = ServiceProcess::start(&dir.path().join("sts.toml"), "info");
            Replica {
                process,
                audit,
                _dir: dir,
                _policies: policies_dir.clone(),
            }
        })
        .collect()
}

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The `[limits]` lines for `redis`: the URL from a file (`url_file`), as a
/// secret should come.
/// `timeout_ms`: generous where a slow answer on a loaded CI machine must not
/// turn into a store error the test does not expect.
fn redis_limits(redis: &Redis, on_error: &str, timeout_ms: u64) -> String {
    let file = redis.dir().join("redis-url");
    std::fs::write(&file, format!("{}\n", redis.url())).unwrap();
    format!(
        "store = \"redis\"\n\n[limits.redis]\nurl_file = \"{}\"\ntimeout_ms = {timeout_ms}\non_store_error = \"{on_error}\"\n",
        file.display()
    )
}

async fn exchange(http: &reqwest::Client, url: &str, token: &str) -> (u16, Value) {
    let r = post_exchange(http, url, token, "artifact-api")
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and haproxy: scripts/test.sh runs it"]
async fn replicas_share_the_per_step_limit_and_survive_a_redis_outage() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", ..).await;
    let mut redis = Redis::start();
    let reps = replicas(&issuer, &kc, 3, 5, &redis_limits(&redis, "deny", 2000));
    let lb = Haproxy::start(&reps.iter().map(|r| r.process.port).collect::<Vec<_>>());
    let http = reqwest::Client::new();

    // One step, twelve exchanges, round robin over three replicas: five pass.
    let token = issuer.mint(&issuer.step());
    let mut codes = Vec::new();
    for _ in 0..12 {
        let (status, body) = exchange(&http, &lb.url(), &token).await;
        codes.push((
            status,
            body["error_code"].as_str().unwrap_or("").to_string(),
        ));
    }
    let ok = codes.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 5, "{codes:?}");
    assert!(codes
        .iter()
        .filter(|(s, _)| *s != 200)
        .all(|(s, c)| *s == 429 && c == "limit.step_exceeded"));
    let allowed_per_replica: Vec<usize> = reps
        .iter()
        .map(|r| {
            audit_lines(&r.audit)
                .iter()
                .filter(|l| l["outcome"] == "allowed")
                .count()
        })
        .collect();
    assert_eq!(allowed_per_replica.iter().sum::<usize>(), 5);
    assert!(
        allowed_per_replica.iter().filter(|n| **n > 0).count() >= 2,
        "spread over replicas: {allowed_per_replica:?}"
    );

    // Redis down, on_store_error = deny: 503 limit.store_unavailable, Retry-After.
    redis.stop();
    let other = issuer.mint(&issuer.step());
    let r = post_exchange(&http, &lb.url(), &other, "artifact-api")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error_code"], "limit.store_unavailable");
    // Back: counting resumes on every replica without a restart.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut passed = 0;
    while passed < 3 {
        let (status, body) = exchange(&http, &lb.url(), &issuer.mint(&issuer.step())).await;
        if status == 200 {
            passed += 1;
        } else {
            assert_eq!(body["error_code"], "limit.store_unavailable", "{body}");
            assert!(
                Instant::now() < deadline,
                "Redis came back but replicas did not recover"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The limit is shared again (the fresh Redis starts counting from zero).
    let token = issuer.mint(&issuer.step());
    let ok = {
        let mut n = 0;
        for _ in 0..9 {
            n += usize::from(exchange(&http, &lb.url(), &token).await.0 == 200);
        }
        n
    };
    assert_eq!(ok, 5);
    let metrics = http
        .get(format!("http://127.0.0.1:{}/metrics", reps[0].process.port))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("sts_limit_store_errors_total{on_store_error=\"deny\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and haproxy: scripts/test.sh runs it"]
async fn with_on_store_error_local_each_replica_limits_on_its_own_while_redis_is_down() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", ..).await;
    let mut redis = Redis::start();
    let reps = replicas(&issuer, &kc, 1, 2, &redis_limits(&redis, "local", 2000));
    let url = format!("http://127.0.0.1:{}/token", reps[0].process.port);
    let http = reqwest::Client::new();
    redis.stop();
    let token = issuer.mint(&issuer.step());
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(exchange(&http, &url, &token).await.0);
    }
    // Never "no limit": the replica's own limiter still holds the step to 2.
    assert_eq!(statuses, [200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and haproxy: scripts/test.sh runs it"]
async fn a_killed_and_a_stopped_replica_lose_no_answered_exchange() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", ..).await;
    let redis = Redis::start();
    let mut reps = replicas(&issuer, &kc, 3, 1000, &redis_limits(&redis, "deny", 250));
    let lb = Haproxy::start(&reps.iter().map(|r| r.process.port).collect::<Vec<_>>());
    let url = lb.url();
    let issuer = std::sync::Arc::new(issuer);

    // Eight clients, each a fresh step per request, for four seconds.
    let stop_at = Instant::now() + Duration::from_secs(4);
    let mut workers = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        let issuer = issuer.clone();
        workers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut out = Vec::new();
            while Instant::now() < stop_at {
                let token = issuer.mint(&issuer.step());
                match post_exchange(&http, &url, &token, "artifact-api").await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        out.push((status, body));
                    }
                    Err(e) => out.push((0, Value::String(e.to_string()))),
                }
            }
            out
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // SIGKILL one replica, SIGTERM another.
    let _ = reps[0].process.child.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &reps[1].process.child.id().to_string()])
        .status();
    let mut answers = Vec::new();
    for w in workers {
        answers.extend(w.await.unwrap());
    }
    let _ = reps[1].process.child.wait();

    let audited: std::collections::HashSet<String> = reps
        .iter()
        .flat_map(|r| audit_lines(&r.audit))
        .filter(|l| l["outcome"] == "allowed")
        .filter_map(|l| l["token_sha256"].as_str().map(str::to_string))
        .collect();
    let documented = |body: &Value| {
        body["error_code"]
            .as_str()
            .is_some_and(|c| c.contains('.') && body["request_id"].is_string())
    };
    let mut ok = 0;
    let mut other: Vec<String> = Vec::new();
    for (status, body) in &answers {
        if *status == 200 {
            ok += 1;
            let sha =
                SecretToken::new(body["access_token"].as_str().unwrap().to_string()).sha256_hex();
            assert!(audited.contains(&sha), "a 200 without its audit line");
        } else if !documented(body) {
            other.push(format!("{status} {body}"));
        }
    }
    let mut refused: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for (status, body) in answers.iter().filter(|(s, _)| *s != 200) {
        *refused
            .entry(format!(
                "{status} {}",
                body["error_code"].as_str().unwrap_or("-")
            ))
            .or_default() += 1;
    }
    eprintln!(
        "replicas under load, one SIGKILLed and one SIGTERMed: {} answers, {ok} issued (each with its audit line), others {refused:?}",
        answers.len()
    );
    assert!(ok > 100, "too little load to mean anything: {ok}");
    assert!(other.is_empty(), "undocumented answers: {other:?}");
    reps.clear();
}

/// A policy change reaches every replica through its file watch (the chart's
/// ConfigMap updates the mounted files the same way), without restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and haproxy: scripts/test.sh runs it"]
async fn a_policy_change_reaches_every_replica() {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", ..).await;
    let redis = Redis::start();
    let reps = replicas(&issuer, &kc, 3, 1000, &redis_limits(&redis, "deny", 2000));
    let http = reqwest::Client::new();
    // A feature branch: artifacts-publish admits main and release/** only.
    let mut step = issuer.step();
    step.branch_name = Some("feature/x".into());
    let token = issuer.mint(&step);
    for r in &reps {
        let url = format!("http://127.0.0.1:{}/token", r.process.port);
        let (status, body) = exchange(&http, &url, &token).await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (400, Some("policy.branch_not_allowed"))
        );
    }
    let dir = reps[0]._policies.path().join("policies");
    std::fs::write(
        dir.join("feature-builds.yaml"),
        allow_policy(
            &format!("{}  branchName: \"feature/*\"\n", when_repo()),
            "sts-artifacts",
            "artifact-api",
            "artifacts:read",
            "artifacts:read",
            300,
        ),
    )
    .unwrap();
    for r in &reps {
        let url = format!("http://127.0.0.1:{}/token", r.process.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, _) = exchange(&http, &url, &token).await;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica on port {} did not reload",
                r.process.port
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
