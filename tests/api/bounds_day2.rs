//! Issue 19 §4 and §5: outside data stays inside its bounds, and local
//! preconditions are checked before anything is asked remotely.
//!
//! §4: every URL the project takes from an upstream's answer (the inventory's
//! `next` link, the issuer's `jwks_uri`, Keycloak's `token_endpoint`) must keep
//! to the origin, and the path by segments, of the URL it was configured with;
//! a trap server on another origin or a sibling path must see no request.
//!
//! §5: `keycloak-ci-sts token` and the MCP server create the 0600 output file
//! (and check the subject token) before any request: a stub standing in for the
//! service must see zero calls when a local precondition fails.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::faults::{app_for, FakeIssuer};
use crate::helpers::*;
use crate::inventory::{inventory_cmd, TOKEN as BB_TOKEN, WS_BRACED};

async fn requests(server: &MockServer) -> usize {
    server.received_requests().await.unwrap_or_default().len()
}

fn repo_value(uuid: &str, full_name: &str) -> Value {
    json!({"uuid": format!("{{{uuid}}}"), "full_name": full_name,
        "project": {"key": "OPS", "uuid": "{6a1f3c2e-8b4d-4e5f-9a0b-1c2d3e4f5a6b}"}})
}

/// A Bitbucket API whose repository list's `next` link is `next` (relative to
/// the server's URI); whatever that link names answers a page of repositories.
async fn bitbucket_with_next(next: &str) -> MockServer {
    let server = MockServer::start().await;
    let uri = server.uri();
    Mock::given(method("GET"))
        .and(path("/2.0/workspaces/acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"uuid": WS_BRACED})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/2.0/repositories/acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "values": [repo_value(REPO, "acme/deploy-service")],
            "next": next.replace("{uri}", &uri).replace("{host}", uri.trim_start_matches("http://")),
        })))
        .with_priority(1)
        .mount(&server)
        .await;
    // Anything else: a page with a repository that must never reach the inventory.
    Mock::given(method("GET"))
        .and(path_regex(r"/environments$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"values": []})))
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "values": [repo_value(OTHER_REPO, "acme/stolen")]})))
        .with_priority(10)
        .mount(&server)
        .await;
    server
}

/// A `next` link must continue the same list: same origin, same path (by
/// segments), another page. A sibling path that only string-starts with the
/// API's base path, another list under it, a path escaping it, or credentials in
/// the link are refused: exit 1, a clear message, nothing written, and the link
/// is never requested (with the Bearer token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_link_that_does_not_continue_the_same_list_is_refused_and_nothing_is_written() {
    let cases = [
        ("sibling path", "{uri}/2.0-other/repositories/acme?page=2"),
        (
            "sibling segment",
            "{uri}/2.0/repositories/acme-other?page=2",
        ),
        ("another list", "{uri}/2.0/repositories/globex?page=2"),
        ("deeper path", "{uri}/2.0/repositories/acme/x?page=2"),
        (
            "escaping path",
            "{uri}/2.0/repositories/acme/../../../x?page=2",
        ),
        (
            "credentials",
            "http://user:pw@{host}/2.0/repositories/acme?page=2",
        ),
    ];
    for (name, next) in cases {
        let bb = bitbucket_with_next(next).await;
        let dir = tempfile::tempdir().unwrap();
        let out_file = dir.path().join("acme.yaml");
        let out = inventory_cmd(&bb.uri(), &out_file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("does not continue the same list"),
            "{name}: {stderr}"
        );
        assert!(!stderr.contains(BB_TOKEN), "{name}");
        assert!(!out_file.exists(), "{name}: an inventory was written");
        let followed: Vec<String> = bb
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| r.url.path().to_string())
            .filter(|p| !p.ends_with("/environments"))
            .collect();
        assert_eq!(
            followed,
            ["/2.0/workspaces/acme", "/2.0/repositories/acme"],
            "{name}: the next link was requested with the token"
        );
    }
}

/// A `next` link on the same list with another query (and a trailing slash) is
/// followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_link_continuing_the_same_list_is_followed() {
    let bb = MockServer::start().await;
    let uri = bb.uri();
    Mock::given(method("GET"))
        .and(path("/2.0/workspaces/acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"uuid": WS_BRACED})))
        .mount(&bb)
        .await;
    Mock::given(method("GET"))
        .and(path("/2.0/repositories/acme/"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "values": [repo_value(OTHER_REPO, "acme/web")]})))
        .mount(&bb)
        .await;
    Mock::given(method("GET"))
        .and(path("/2.0/repositories/acme"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "values": [repo_value(REPO, "acme/deploy-service")],
            "next": format!("{uri}/2.0/repositories/acme/?pagelen=100&page=2")})))
        .mount(&bb)
        .await;
    Mock::given(method("GET"))
        .and(path_regex(r"/environments$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"values": []})))
        .mount(&bb)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("acme.yaml");
    let out = inventory_cmd(&uri, &out_file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let text = std::fs::read_to_string(&out_file).unwrap();
    assert!(
        text.contains("acme/web") && text.contains("acme/deploy-service"),
        "{text}"
    );
}

/// The issuer's `jwks_uri` must share the issuer's origin (scheme, host, port):
/// a key set on another origin (here another loopback port) is never fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_uri_off_the_issuers_origin_is_not_fetched() {
    let fi = FakeIssuer::start().await;
    let trap = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(fi.dev.jwks()))
        .mount(&trap)
        .await;
    fi.server.reset().await;
    let iss = fi.issuer_url();
    Mock::given(method("GET"))
        .and(path_regex(r"/\.well-known/openid-configuration$"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(
                json!({"issuer": iss, "jwks_uri": format!("{}/keys.json", trap.uri())}),
            ),
        )
        .mount(&fi.server)
        .await;
    let kc = FakeKeycloak::start().await;
    kc.token_ok(60, "artifacts:read", 0..).await;
    let app = app_for(&fi, &kc, 600, 1, 5).await;
    let r = app.exchange(&fi.mint(), "artifact-api", None).await;
    let body = assert_error(r, 502, "server_error", "issuer.keys_malformed").await;
    assert_eq!(
        requests(&trap).await,
        0,
        "the key set was fetched elsewhere"
    );
    assert!(body.to_string().len() < 2000);
}

/// A discovery document for realm `ci` on `kc`, naming `issuer` and `token_endpoint`.
async fn keycloak_discovery(kc: &MockServer, issuer: &str, token_endpoint: &str) {
    Mock::given(method("GET"))
        .and(path("/realms/ci/.well-known/openid-configuration"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"issuer": issuer, "token_endpoint": token_endpoint})),
        )
        .mount(kc)
        .await;
}

/// Keycloak's discovery decides where client secrets and assertions are POSTed:
/// its `token_endpoint` must share `keycloak.base_url`'s origin and lie under
/// `/realms/<realm>/` by segments, and its `issuer` must be the realm's. Otherwise
/// 502 `keycloak.discovery_mismatch`, and nothing is POSTed anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_outside_the_realm_or_another_issuer_is_refused_before_any_post() {
    let trap = MockServer::start().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(500))
        .mount(&trap)
        .await;
    let cases = [
        (
            "another origin",
            None,
            format!("{}{TOKEN_PATH}", trap.uri()),
        ),
        (
            "sibling realm",
            None,
            "{uri}/realms/ci-other/protocol/openid-connect/token".into(),
        ),
        (
            "outside the realm",
            None,
            "{uri}/admin/realms/ci/token".into(),
        ),
        (
            "escaping the realm",
            None,
            "{uri}/realms/ci/../x/token".into(),
        ),
        (
            "another issuer",
            Some("https://sso.example.com/realms/ci"),
            format!("{{uri}}{TOKEN_PATH}"),
        ),
    ];
    for (name, issuer_override, endpoint) in cases {
        let issuer = Issuer::start().await;
        let kc = MockServer::start().await;
        let uri = kc.uri();
        let realm_issuer = issuer_override.map_or(format!("{uri}/realms/ci"), str::to_string);
        keycloak_discovery(&kc, &realm_issuer, &endpoint.replace("{uri}", &uri)).await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500))
            .mount(&kc)
            .await;
        let app = TestApp::start(&issuer, Options::new(&uri)).await;
        let r = app
            .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
            .await;
        let body = assert_error(r, 502, "server_error", "keycloak.discovery_mismatch").await;
        assert!(
            body["error_description"]
                .as_str()
                .is_some_and(|d| d.contains("keycloak.base_url")),
            "{name}: {body}"
        );
        let posts = kc
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.method == wiremock::http::Method::POST)
            .count();
        assert_eq!(posts, 0, "{name}: a token request was sent");
    }
    assert_eq!(
        requests(&trap).await,
        0,
        "a token request went to another origin"
    );
}

/// The stand-in for the service of §5: answers `/token` and `/grants` 200 and
/// counts what it receives.
async fn sts_stub() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "a.b.c", "expires_in": 60, "scope": "artifacts:read",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer"})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/grants"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"identity": {}, "repository": null, "grants": []})),
        )
        .mount(&server)
        .await;
    server
}

fn token_cmd(url: &str, subject: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"));
    cmd.arg("token")
        .args(["--url", url])
        .args(args)
        .env_remove("BITBUCKET_STEP_OIDC_TOKEN")
        .env_remove("KCS_STS_URL");
    if let Some(s) = subject {
        cmd.env("BITBUCKET_STEP_OIDC_TOKEN", s);
    }
    cmd.output().unwrap()
}

/// `token --audience artifact-api --output OUTPUT` from a multi-threaded test.
fn token_output(
    url: &str,
    subject: Option<&str>,
    output: &std::path::Path,
) -> std::process::Output {
    let output = output.to_str().unwrap();
    let args = ["--audience", "artifact-api", "--output", output];
    tokio::task::block_in_place(|| token_cmd(url, subject, &args))
}

/// `token --output` into a missing directory, onto a directory, or without the
/// OIDC token variable: exit 2 with the reason, and no request reaches the
/// service (nothing issued, audited or counted). Nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_checks_every_local_precondition_before_any_request() {
    let stub = sts_stub().await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-dir").join("token");
    let a_dir = dir.path().join("a-dir");
    std::fs::create_dir(&a_dir).unwrap();
    let cases: [(&str, Option<&str>, &std::path::Path, &str); 3] = [
        ("missing directory", Some("x.y.z"), &missing, "missing-dir"),
        ("a directory", Some("x.y.z"), &a_dir, "is a directory"),
        (
            "no token variable",
            None,
            &dir.path().join("t"),
            "BITBUCKET_STEP_OIDC_TOKEN is not set",
        ),
    ];
    for (name, subject, output, says) in cases {
        let out = token_output(&stub.uri(), subject, output);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(says), "{name}: {stderr}");
        assert_eq!(requests(&stub).await, 0, "{name}: a request was sent");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["a-dir"], "temporary files left behind");
    assert_eq!(std::fs::read_dir(&a_dir).unwrap().count(), 0);
    // And the ordinary case still works: one request, the file in place, 0600.
    let file = dir.path().join("token");
    let out = token_output(&stub.uri(), Some("x.y.z"), &file);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "a.b.c");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(requests(&stub).await, 1);
}

/// MCP `get_token` creates its token file before the request: with the token
/// directory gone, the call is a tool error naming the directory and no request
/// reaches the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_get_token_creates_its_file_before_any_request() {
    let stub = sts_stub().await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let agent = crate::mcp::agent(
        &stub.uri(),
        "x.y.z",
        &["--token-dir", tokens.to_str().unwrap()],
    )
    .await;
    std::fs::remove_dir(&tokens).unwrap();
    let r = crate::mcp::call(&agent, "get_token", json!({"audience": "artifact-api"})).await;
    let (is_error, v) = crate::mcp::outcome(&r);
    assert!(is_error, "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("tokens")),
        "{v}"
    );
    assert_eq!(requests(&stub).await, 0, "a request was sent");
    agent.cancel().await.unwrap();
}

/// The MCP server reads the subject token file at every call: a FIFO there (no
/// writer) or an oversized file is refused at once, never waited on or read
/// whole, and no request is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_never_blocks_on_a_fifo_or_reads_a_huge_subject_token_file() {
    let stub = sts_stub().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("oidc-fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let huge = dir.path().join("oidc-huge");
    std::fs::write(&huge, "x".repeat(2 * 1024 * 1024)).unwrap();
    for (file, says) in [(&fifo, "not a regular file"), (&huge, "larger than")] {
        let agent = crate::mcp::agent(
            &stub.uri(),
            "x.y.z",
            &["--subject-token-file", file.to_str().unwrap()],
        )
        .await;
        for (tool, args) in [
            ("list_grants", json!({})),
            ("get_token", json!({"audience": "artifact-api"})),
        ] {
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                crate::mcp::call(&agent, tool, args.clone()),
            )
            .await
            .unwrap_or_else(|_| panic!("{tool} blocked on {}", file.display()));
            let (is_error, v) = crate::mcp::outcome(&r);
            assert!(is_error, "{v}");
            assert!(
                v["error_description"]
                    .as_str()
                    .is_some_and(|d| d.contains(says)),
                "{tool}: {v}"
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), agent.cancel()).await;
    }
    assert_eq!(requests(&stub).await, 0, "a request was sent");
}

/// `token --output` onto an existing entry that is not a regular file (a FIFO,
/// a socket; the same rule covers a device such as `/dev/null`) or onto a
/// symbolic link (to a file, or dangling): exit 2 naming the reason, no request
/// sent, the entry left exactly as it was, no temporary file left. An existing
/// regular file is still replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refuses_an_output_that_is_not_a_regular_file_before_any_request() {
    use std::os::unix::fs::FileTypeExt;
    let stub = sts_stub().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let _socket = std::os::unix::net::UnixListener::bind(d.join("socket")).unwrap();
    std::fs::write(d.join("real"), "old").unwrap();
    std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
    std::os::unix::fs::symlink(d.join("gone"), d.join("dangling")).unwrap();
    std::os::unix::fs::symlink(&fifo, d.join("link-to-fifo")).unwrap();
    let cases = [
        ("fifo", "not a regular file"),
        ("socket", "not a regular file"),
        ("link", "symbolic link"),
        ("dangling", "symbolic link"),
        ("link-to-fifo", "symbolic link"),
    ];
    for (name, says) in cases {
        let target = d.join(name);
        let before = std::fs::symlink_metadata(&target).unwrap().file_type();
        let out = token_output(&stub.uri(), Some("x.y.z"), &target);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(says), "{name}: {stderr}");
        assert_eq!(requests(&stub).await, 0, "{name}: a request was sent");
        let after = std::fs::symlink_metadata(&target).unwrap().file_type();
        assert_eq!(before, after, "{name} was replaced");
    }
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(std::fs::read_link(d.join("link")).unwrap(), d.join("real"));
    assert_eq!(std::fs::read_to_string(d.join("real")).unwrap(), "old");
    let mut left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["dangling", "fifo", "link", "link-to-fifo", "real", "socket"],
        "temporary files left behind"
    );
    // An existing regular file is replaced, as before.
    let out = token_output(&stub.uri(), Some("x.y.z"), &d.join("real"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(d.join("real")).unwrap(), "a.b.c");
}
