//! `keycloak-ci-sts mcp`: a Model Context Protocol server over stdio (the
//! official Rust SDK, `rmcp`) for an AI agent running inside a pipeline step.
//!
//! Tools:
//! - `list_grants` {}: `POST /grants` — the audiences this step may obtain, with
//!   scopes, default scopes and the longest lifetime;
//! - `get_token` {audience, scopes}: `POST /token` — by default the access token
//!   is written to a new 0600 file in a private (0700) directory (created before
//!   the request, so a call that cannot store its token sends none) and only its
//!   path, expiry and scopes are returned, so the token never enters the model's
//!   context (where prompt injection or provider logs could take it). With
//!   `--return-tokens-inline` (the operator's choice, not the model's) the token
//!   is returned in the result instead.
//!
//! The server uses the step's OIDC token from `$BITBUCKET_STEP_OIDC_TOKEN` (or
//! `--subject-token-file`: a regular file of at most 64 KiB, opened without
//! blocking), read at each call; it never takes a token from the
//! model and never returns the OIDC token. A refusal is a tool error whose
//! structured content holds the service's `error`, `error_code`,
//! `error_description`, `request_id` and HTTP `status`.
//!
//! Not a security boundary: the agent can read the step's environment. The
//! boundary is the service's policies and the step's audience marker (docs/src/agents.md). Standard output is the protocol channel: everything
//! else goes to standard error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ServerCapabilities, ServerConfig};
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use serde::Deserialize;
use serde_json::json;

use crate::client::{ClientError, OutputFile, StsClient};

/// Instructions sent to the agent when it connects.
const INSTRUCTIONS: &str = "Obtains short-lived access tokens for internal APIs on behalf of this \
Bitbucket pipeline step. Call list_grants first to see which audiences and scopes this step may \
obtain; then call get_token for one audience with the narrowest scopes your task needs. Tokens \
are short-lived; request a new one when it expires instead of asking for a longer lifetime. Every \
request is audited with this step's repository, branch and environment. A refusal names an \
error_code and request_id: report them, do not retry with broader scopes.";

/// Settings of the MCP server.
#[derive(Debug, Clone)]
pub struct McpSettings {
    /// The service's base URL.
    pub url: String,
    /// File holding the step's OIDC token; `None`: `$BITBUCKET_STEP_OIDC_TOKEN`.
    pub subject_token_file: Option<PathBuf>,
    /// Directory for token files (created 0700 if missing; must not be
    /// readable by others if it exists).
    pub token_dir: PathBuf,
    /// Return tokens in the tool result instead of writing files.
    pub inline_tokens: bool,
    /// Longest total wait for `Retry-After` per call, seconds.
    pub max_wait_seconds: u64,
}

/// The `get_token` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct GetTokenArgs {
    /// The audience to obtain a token for, exactly as list_grants names it.
    pub audience: String,
    /// The scopes to request: the fewest your task needs, each one list_grants
    /// shows for the audience. Empty or omitted: the audience's default scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// The MCP server.
#[derive(Clone)]
pub struct StsMcp {
    settings: Arc<McpSettings>,
    client: StsClient,
    tool_router: ToolRouter<Self>,
}

fn refusal(e: &ClientError) -> CallToolResult {
    let mut v = match e {
        ClientError::Refused(r) | ClientError::Unavailable(r) => json!({
            "status": r.status,
            "error": r.error,
            "error_code": r.error_code,
            "error_description": r.error_description,
            "request_id": r.request_id,
        }),
        _ => json!({ "error_description": e.to_string() }),
    };
    v["temporary"] = json!(e.is_temporary());
    CallToolResult::structured_error(v)
}

fn usage_error(message: String) -> CallToolResult {
    CallToolResult::structured_error(json!({ "error_description": message, "temporary": false }))
}

/// A file name for a token of `audience`: its safe characters, then a random part.
pub(crate) fn token_file_name(audience: &str) -> String {
    let safe: String = audience
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.{}.token", uuid::Uuid::new_v4().simple())
}

/// Creates `dir` (not its parents) with mode 0700 unless it exists, then checks
/// what is there now: a directory, not a symbolic link, owned by this user, that
/// no one else can read or write. Checking after creating closes the window in
/// which another user could put a directory or link of their own in its place.
/// (The default directory has a random name under `$TMPDIR`, so nobody can
/// create it first; in a sticky `/tmp`, nobody else can rename it afterwards.)
///
/// # Errors
/// The reason, naming the directory.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let m = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let me = rustix::process::geteuid().as_raw();
    if !m.is_dir() {
        Err(format!(
            "{} is not a directory (or is a symbolic link)",
            dir.display()
        ))
    } else if m.uid() != me {
        Err(format!(
            "{} belongs to user {}, not to this one ({me})",
            dir.display(),
            m.uid()
        ))
    } else if m.mode() & 0o077 != 0 {
        Err(format!(
            "{} is readable or writable by others (mode {:o}); use a 0700 directory",
            dir.display(),
            m.mode() & 0o777
        ))
    } else {
        Ok(())
    }
}

#[tool_router]
impl StsMcp {
    /// A server with `settings`.
    ///
    /// # Errors
    /// An unusable URL or token directory.
    pub fn new(settings: McpSettings) -> Result<Self, String> {
        let client = StsClient::new(&settings.url, settings.max_wait_seconds)?;
        if !settings.inline_tokens {
            private_dir(&settings.token_dir)?;
        }
        Ok(Self {
            settings: Arc::new(settings),
            client,
            tool_router: Self::tool_router(),
        })
    }

    #[tool(
        description = "Lists what this pipeline step may obtain: for each audience (an internal API), \
        the scopes you may request, the default scopes granted when you name none (null: you must \
        name scopes), and the longest token lifetime in seconds. Decided by reviewed policies for \
        this repository, branch and deployment environment. Call it before get_token and pick the \
        narrowest scopes that do the task."
    )]
    async fn list_grants(&self) -> Result<CallToolResult, ErrorData> {
        let subject =
            match crate::client::subject_token(self.settings.subject_token_file.as_deref()) {
                Ok(s) => s,
                Err(e) => return Ok(usage_error(e)),
            };
        Ok(match self.client.grants(&subject).await {
            Ok(g) => CallToolResult::structured(json!({
                "repository": g.repository,
                "identity": g.identity,
                "grants": g.grants,
            })),
            Err(e) => refusal(&e),
        })
    }

    #[tool(
        description = "Obtains a short-lived access token for one audience with the narrowest scopes \
        your task needs (name them; none means the audience's default scopes). The token is written \
        to a private file (mode 0600) and the result gives its path, expiry and granted scopes: use \
        it where you make the request, e.g. curl -H \"Authorization: Bearer $(cat PATH)\", and never \
        print it. Tokens expire within minutes; ask again rather than for more. Every request is \
        audited with this step's identity. A refusal returns error_code and request_id: report \
        them; do not retry with broader scopes."
    )]
    async fn get_token(
        &self,
        Parameters(args): Parameters<GetTokenArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let subject =
            match crate::client::subject_token(self.settings.subject_token_file.as_deref()) {
                Ok(s) => s,
                Err(e) => return Ok(usage_error(e)),
            };
        // The token file exists before the request (see `OutputFile`).
        let file = if self.settings.inline_tokens {
            None
        } else {
            let path = self
                .settings
                .token_dir
                .join(token_file_name(&args.audience));
            match OutputFile::create(&path, 0o600) {
                Ok(f) => Some(f),
                Err(e) => return Ok(usage_error(e)),
            }
        };
        let issued = match self
            .client
            .token(&subject, &args.audience, &args.scopes)
            .await
        {
            Ok(i) => i,
            Err(e) => return Ok(refusal(&e)),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut answer = json!({
            "audience": args.audience,
            "scope": issued.scope.clone().unwrap_or_default(),
            "expires_in": issued.expires_in,
            "expires_at": now + issued.expires_in,
            "token_type": "Bearer",
        });
        match file {
            None => answer["access_token"] = json!(issued.access_token.expose()),
            Some(f) => {
                let path = f.path().display().to_string();
                if let Err(e) = f.write(issued.access_token.expose()) {
                    return Ok(usage_error(e));
                }
                answer["token_file"] = json!(path);
            }
        }
        Ok(CallToolResult::structured(answer))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for StsMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(rmcp::model::Implementation::new(
                "keycloak-ci-sts",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(INSTRUCTIONS)
    }
}

/// Serves MCP on standard input and output until the client disconnects, or
/// SIGTERM or SIGINT arrives (then it stops serving and returns, so the caller
/// can remove the token directory).
///
/// # Errors
/// Unusable settings, or the transport failing.
pub async fn serve(settings: McpSettings) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let server = StsMcp::new(settings).map_err(anyhow::Error::msg)?;
    let running = tokio::select! {
        r = server.serve(rmcp::transport::stdio()) => {
            r.map_err(|e| anyhow::anyhow!("MCP initialisation failed: {e}"))?
        }
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    let token = running.cancellation_token();
    tokio::select! {
        r = running.waiting() => {
            r.map_err(|e| anyhow::anyhow!("MCP server stopped: {e}"))?;
        }
        _ = term.recv() => token.cancel(),
        _ = int.recv() => token.cancel(),
    }
    Ok(())
}
