//! `keycloak-ci-sts mcp` driven by an MCP client (rmcp's client side) as a child
//! process over stdio, as an agent in a pipeline step runs it: tools listed with
//! their descriptions, `list_grants`, `get_token` writing a 0600 file (the token
//! never in the result), refusals carrying `error_code` and `request_id`.
//! The real-Keycloak variant is in `keycloak_real_agents`.

use std::os::unix::fs::PermissionsExt;

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::ServiceExt;
use serde_json::{json, Value};

use crate::grants::step;
use crate::helpers::*;

/// An MCP client connected to `keycloak-ci-sts mcp` for the step whose OIDC
/// token is `subject`; `extra`: more arguments.
pub async fn agent(sts_url: &str, subject: &str, extra: &[&str]) -> RunningService<RoleClient, ()> {
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts")).configure(|c| {
        c.arg("mcp")
            .args(["--url", sts_url])
            .args(extra)
            .env_remove("KCS_STS_URL")
            .env("BITBUCKET_STEP_OIDC_TOKEN", subject);
    });
    ().serve(TokioChildProcess::new(cmd).unwrap())
        .await
        .unwrap()
}

/// Calls `tool` with `args`.
pub async fn call(
    client: &RunningService<RoleClient, ()>,
    tool: &'static str,
    args: Value,
) -> CallToolResult {
    let mut p = CallToolRequestParams::new(tool);
    if let Value::Object(m) = args {
        p = p.with_arguments(m);
    }
    client.call_tool(p).await.unwrap()
}

/// The structured content of a result, and whether it is an error.
pub fn outcome(r: &CallToolResult) -> (bool, Value) {
    (
        r.is_error.unwrap_or(false),
        r.structured_content.clone().unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_lists_its_grants_and_gets_tokens_in_private_files() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read artifacts:write", 1).await;
    let subject = issuer.mint(&issuer.step());
    let dir = app.dir.path().join("tokens");
    let client = agent(
        &app.address,
        &subject,
        &["--token-dir", dir.to_str().unwrap()],
    )
    .await;

    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort_unstable();
    assert_eq!(names, ["get_token", "list_grants"]);
    let get = tools.iter().find(|t| t.name == "get_token").unwrap();
    let description = get.description.as_deref().unwrap_or_default();
    for words in ["narrowest", "audited", "0600", "expire"] {
        assert!(description.contains(words), "{words}: {description}");
    }
    let schema = serde_json::to_value(&get.input_schema).unwrap();
    assert_eq!(schema["required"], json!(["audience"]), "{schema}");
    let info = client.peer_info().unwrap();
    assert!(info
        .instructions
        .as_deref()
        .unwrap_or_default()
        .contains("list_grants"));

    let (err, listed) = outcome(&call(&client, "list_grants", json!({})).await);
    assert!(!err, "{listed}");
    let audiences: Vec<&str> = listed["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["audience"].as_str().unwrap())
        .collect();
    assert_eq!(audiences, ["artifact-api", "release-api"]);

    let r = call(
        &client,
        "get_token",
        json!({"audience": "artifact-api", "scopes": ["artifacts:write"]}),
    )
    .await;
    let (err, got) = outcome(&r);
    assert!(!err, "{got}");
    assert_eq!(got["scope"], "artifacts:write");
    assert_eq!(got["expires_in"], 60);
    assert!(got["access_token"].is_null());
    let file = std::path::PathBuf::from(got["token_file"].as_str().unwrap());
    assert!(file.starts_with(&dir));
    let token = std::fs::read_to_string(&file).unwrap();
    assert_eq!(token.split('.').count(), 3);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let whole = serde_json::to_string(&r).unwrap();
    assert!(
        !whole.contains(&token),
        "the access token entered the result"
    );
    assert!(
        !whole.contains(&subject),
        "the OIDC token entered the result"
    );

    // Refused: a deployment audience from a step without an environment.
    let (err, refused) =
        outcome(&call(&client, "get_token", json!({"audience": "deploy-api"})).await);
    assert!(err);
    assert_eq!(refused["error_code"], "policy.environment_missing");
    assert!(refused["request_id"]
        .as_str()
        .is_some_and(|s| s.len() == 36));
    assert_eq!(refused["temporary"], false);

    // A call without the required argument is refused (as a protocol error or
    // a tool error, as the SDK decides), and no token is requested.
    let p = CallToolRequestParams::new("get_token").with_arguments(serde_json::Map::new());
    match client.call_tool(p).await {
        Err(_) => {}
        Ok(r) => assert!(r.is_error.unwrap_or(false), "{r:?}"),
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_returned_inline_only_when_the_operator_says_so_and_the_oidc_token_comes_from_the_step(
) {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let client = agent(
        &app.address,
        &issuer.mint(&issuer.step()),
        &["--return-tokens-inline"],
    )
    .await;
    let (err, got) =
        outcome(&call(&client, "get_token", json!({"audience": "artifact-api"})).await);
    assert!(!err, "{got}");
    assert_eq!(got["access_token"].as_str().unwrap().split('.').count(), 3);
    assert!(got["token_file"].is_null());
    // A subject token offered by the model is not a parameter: ignored, never used.
    let schema = client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.name == "get_token")
        .unwrap()
        .input_schema;
    assert!(!serde_json::to_string(&schema).unwrap().contains("subject"));
    client.cancel().await.unwrap();

    // Without the step's token the tools say so; nothing is sent.
    let dir = app.dir.path().join("tokens");
    let client = agent(&app.address, "", &["--token-dir", dir.to_str().unwrap()]).await;
    let (err, got) = outcome(&call(&client, "list_grants", json!({})).await);
    assert!(err);
    assert!(got["error_description"]
        .as_str()
        .unwrap()
        .contains("the subject token is empty"));
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_marked_step_is_told_it_may_read_and_refused_deploy() {
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read deploy:production", 1).await;
    let dir = app.dir.path().join("tokens");
    let client = agent(
        &app.address,
        &step(&issuer, true, true),
        &["--token-dir", dir.to_str().unwrap()],
    )
    .await;
    let (_, listed) = outcome(&call(&client, "list_grants", json!({})).await);
    let deploy = listed["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["audience"] == "deploy-api")
        .unwrap()
        .clone();
    assert_eq!(deploy["scopes"], json!(["artifacts:read"]));
    assert_eq!(deploy["default_scopes"], Value::Null);
    let (err, refused) = outcome(
        &call(
            &client,
            "get_token",
            json!({"audience": "deploy-api", "scopes": ["deploy:production"]}),
        )
        .await,
    );
    assert!(err);
    assert_eq!(refused["error_code"], "policy.denied");
    let (err, got) = outcome(
        &call(
            &client,
            "get_token",
            json!({"audience": "deploy-api", "scopes": ["artifacts:read"]}),
        )
        .await,
    );
    assert!(!err, "{got}");
    assert_eq!(got["scope"], "artifacts:read");
    client.cancel().await.unwrap();
}

/// The default token directory is the server's own: created fresh, 0700, and
/// removed when it stops on SIGTERM (not only when standard input closes); a
/// named directory open to others, or a symbolic link, is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_directory_is_private_and_removed_on_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    let (issuer, kc, app) = standard().await;
    kc.token_ok(60, "artifacts:read", 1).await;
    let tmp = app.dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
        .args(["mcp", "--url", &app.address])
        .env("TMPDIR", &tmp)
        .env("BITBUCKET_STEP_OIDC_TOKEN", issuer.mint(&issuer.step()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::{BufRead, Write};
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut send = |v: Value| {
            writeln!(stdin, "{v}").unwrap();
            stdin.flush().unwrap();
        };
        let mut line = String::new();
        send(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"}}}),
        );
        stdout.read_line(&mut line).unwrap();
        let init: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(init["result"]["serverInfo"]["name"], "keycloak-ci-sts");
        send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        send(
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "get_token", "arguments": {"audience": "artifact-api"}}}),
        );
        line.clear();
        stdout.read_line(&mut line).unwrap();
        let got: Value = serde_json::from_str(&line).unwrap();
        let file = got["result"]["structuredContent"]["token_file"]
            .as_str()
            .unwrap_or_else(|| panic!("{got}"))
            .to_string();
        let dir = std::path::Path::new(&file).parent().unwrap().to_path_buf();
        assert!(dir.starts_with(&tmp));
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // SIGTERM while standard input stays open.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().unwrap();
        assert!(status.success(), "{status:?}");
        assert!(!dir.exists(), "token directory left behind");
        drop(stdin);
    }

    // A named directory open to others, and a symbolic link, are refused.
    let open = app.dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = app.dir.path().join("link");
    std::os::unix::fs::symlink(&tmp, &link).unwrap();
    for dir in [&open, &link] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
            .args(["mcp", "--url", &app.address, "--token-dir"])
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("readable or writable by others") || err.contains("symbolic link"),
            "{err}"
        );
    }
}
