//! `keycloak-ci-sts token` (the client a pipeline step runs) against the running
//! service and a wiremock Keycloak: the token goes to a 0600 file and never to
//! the terminal unless asked, refusals name `error_code` and `request_id`,
//! 503 + `Retry-After` is retried.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub async fn run(app: &TestApp, subject: Option<String>, args: &[&str]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"));
    cmd.arg("token")
        .args(["--url", &app.address])
        .args(args)
        .env_remove("BITBUCKET_STEP_OIDC_TOKEN")
        .env_remove("KCS_STS_URL");
    if let Some(s) = subject {
        cmd.env("BITBUCKET_STEP_OIDC_TOKEN", s);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn service() -> (Issuer, FakeKeycloak, TestApp) {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    let app = TestApp::start(&issuer, Options::new(&kc.uri())).await;
    (issuer, kc, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_to_a_private_file_and_never_to_the_terminal() {
    let (issuer, kc, app) = service().await;
    kc.token_ok(60, "artifacts:read", 2).await;
    let subject = issuer.mint(&issuer.step());
    let file = app.dir.path().join("artifact.token");
    let out = run(
        &app,
        Some(subject.clone()),
        &[
            "--audience",
            "artifact-api",
            "--output",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let token = std::fs::read_to_string(&file).unwrap();
    assert_eq!(token.split('.').count(), 3, "a JWT in the file");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        out.stdout
            .contains("expires in 60 s, scope `artifacts:read`"),
        "{}",
        out.stdout
    );
    for text in [&out.stdout, &out.stderr] {
        assert!(
            !text.contains(&token) && !text.contains(&subject),
            "a token on the terminal"
        );
    }
    let json = run(
        &app,
        Some(subject),
        &["--audience", "artifact-api", "--json"],
    )
    .await;
    assert_eq!(json.code, 0, "{}", json.stderr);
    let v: Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(v["expires_in"], 60);
    assert!(v["access_token"]
        .as_str()
        .is_some_and(|t| t.split('.').count() == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_error_code_and_request_id_and_usage_errors_exit_2() {
    let (issuer, _kc, app) = service().await;
    let mut step = issuer.step();
    step.branch_name = Some("feature/x".into());
    let out = run(
        &app,
        Some(issuer.mint(&step)),
        &["--audience", "artifact-api", "--stdout"],
    )
    .await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("policy.branch_not_allowed"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("request_id "), "{}", out.stderr);
    assert!(out.stdout.is_empty());
    let missing = run(&app, None, &["--audience", "artifact-api", "--stdout"]).await;
    assert_eq!(missing.code, 2);
    assert!(
        missing
            .stderr
            .contains("BITBUCKET_STEP_OIDC_TOKEN is not set"),
        "{}",
        missing.stderr
    );
    let nowhere = run(
        &app,
        Some(issuer.mint(&issuer.step())),
        &["--audience", "artifact-api"],
    )
    .await;
    assert_eq!(nowhere.code, 2);
    assert!(
        nowhere.stderr.contains("--output FILE"),
        "{}",
        nowhere.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_with_retry_after_is_retried() {
    let (issuer, kc, app) = service().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&kc.server)
        .await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let file = app.dir.path().join("t");
    let out = run(
        &app,
        Some(issuer.mint(&issuer.step())),
        &[
            "--audience",
            "artifact-api",
            "--output",
            file.to_str().unwrap(),
            "--max-wait-seconds",
            "10",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("retrying in 1 s"), "{}", out.stderr);
    assert!(file.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prints_what_the_step_may_obtain_and_never_calls_keycloak() {
    let (issuer, kc, app) = service().await;
    kc.token_never_called().await;
    let subject = issuer.mint(&issuer.step());
    let out = run(&app, Some(subject.clone()), &["--list"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "artifact-api\tscopes: artifacts:read artifacts:write\tdefault: artifacts:read\tmax 300 s",
            "release-api\tscopes: release:publish release:read\tdefault: release:read\tmax 120 s",
        ]
    );
    let out = run(&app, Some(subject.clone()), &["--list", "--json"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["grants"][0]["audience"], "artifact-api");
    assert_eq!(v["repository"], "acme/deploy-service");
    assert!(!out.stdout.contains(&subject));
    // --list with an audience or an output is a usage error.
    let out = run(&app, Some(subject.clone()), &["--list", "--audience", "x"]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    // A refused listing names the code and the request id, exit 1.
    let out = run(&app, Some("not-a-token".into()), &["--list"]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("token.malformed") && out.stderr.contains("request_id"),
        "{}",
        out.stderr
    );
}

/// SIGTERM or SIGINT while `token` waits for an answer (here from a listener
/// that never accepts): the command removes its temporary file and exits
/// promptly with the conventional code, 128 + the signal (143, 130).
#[test]
fn an_interrupted_token_removes_its_temporary_file_and_exits_128_plus_the_signal() {
    use rustix::process::{kill_process, Pid, Signal};
    use std::time::{Duration, Instant};
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    for (signal, code) in [(Signal::TERM, 143), (Signal::INT, 130)] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let mut child = Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
            .arg("token")
            .args(["--url", &url, "--audience", "artifact-api", "--output"])
            .arg(&file)
            .env("BITBUCKET_STEP_OIDC_TOKEN", "x.y.z")
            .env_remove("KCS_STS_URL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let entries = || std::fs::read_dir(dir.path()).unwrap().count();
        let deadline = Instant::now() + Duration::from_secs(10);
        while entries() == 0 {
            assert!(
                child.try_wait().unwrap().is_none(),
                "{signal:?}: exited early"
            );
            assert!(Instant::now() < deadline, "no temporary file appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        kill_process(Pid::from_child(&child), signal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{signal:?}: still running 5 s after the signal");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(code), "{signal:?}: {status:?}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{signal:?}: left behind {left:?}");
    }
}
