//! Logs (JSON lines on standard error, filtered by `RUST_LOG`, default `info`)
//! and the audit trail (JSON lines on standard output or a file).
//!
//! Nothing here ever receives a token, assertion or secret: types holding them
//! redact themselves in `Debug`, and the audit line records only the SHA-256 and
//! `jti` of the issued token.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global JSON log subscriber (call once, at startup).
///
/// # Errors
/// When a subscriber is already installed.
pub fn init_logging() -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(true)
        .with_span_list(false)
        .try_init()
        .map_err(|e| e.to_string())
}

/// Renders an error and its `source()` chain as `outer: inner: root`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// One audit line: a decision, allowed or denied. Field names of Bitbucket claims
/// are Bitbucket's.
#[derive(Debug, Default, Serialize)]
pub struct AuditRecord {
    /// Seconds since the epoch.
    pub time: u64,
    /// Request id (also in the response and the logs).
    pub request_id: String,
    /// `allowed`, `denied` or `failed` (upstream error after an allow decision).
    pub outcome: &'static str,
    /// Stable error code, when not allowed.
    pub error_code: Option<&'static str>,
    /// Token issuer (only once verified, or the untrusted `iss` when refused for it).
    pub issuer: Option<String>,
    /// `sub`.
    pub sub: Option<String>,
    /// `workspaceUuid`.
    #[serde(rename = "workspaceUuid")]
    pub workspace_uuid: Option<String>,
    /// `repositoryUuid`.
    #[serde(rename = "repositoryUuid")]
    pub repository_uuid: Option<String>,
    /// `pipelineUuid`.
    #[serde(rename = "pipelineUuid")]
    pub pipeline_uuid: Option<String>,
    /// `pipelineRunUuid`.
    #[serde(rename = "pipelineRunUuid")]
    pub pipeline_run_uuid: Option<String>,
    /// `stepUuid`.
    #[serde(rename = "stepUuid")]
    pub step_uuid: Option<String>,
    /// `deploymentEnvironmentUuid`.
    #[serde(rename = "deploymentEnvironmentUuid")]
    pub deployment_environment_uuid: Option<String>,
    /// `branchName`.
    #[serde(rename = "branchName")]
    pub branch_name: Option<String>,
    /// Deciding policy.
    pub policy: Option<String>,
    /// Keycloak client acted as.
    pub keycloak_client: Option<String>,
    /// Requested audience.
    pub audience: Option<String>,
    /// Requested scopes.
    pub requested_scopes: Vec<String>,
    /// Scopes granted by Keycloak.
    pub granted_scopes: Vec<String>,
    /// `expires_in` of the issued token, seconds.
    pub expires_in: Option<u64>,
    /// Hex SHA-256 of the issued access token.
    pub token_sha256: Option<String>,
    /// `jti` of the issued access token.
    pub token_jti: Option<String>,
}

impl AuditRecord {
    /// A record stamped with the current time.
    pub fn new(request_id: String) -> Self {
        Self {
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            request_id,
            ..Self::default()
        }
    }
}

/// Where audit lines go.
pub struct AuditSink {
    out: Mutex<Box<dyn Write + Send>>,
}

impl AuditSink {
    /// Standard output.
    pub fn stdout() -> Self {
        Self {
            out: Mutex::new(Box::new(std::io::stdout())),
        }
    }

    /// Appends to `path` (created if missing).
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn file(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            out: Mutex::new(Box::new(f)),
        })
    }

    /// Writes one line. A failure is logged, never fatal for the request.
    pub fn write(&self, rec: &AuditRecord) {
        let line = match serde_json::to_string(rec) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "audit record serialisation failed");
                return;
            }
        };
        match self.out.lock() {
            Ok(mut out) => {
                if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                    tracing::error!(error = %e, "audit write failed");
                }
            }
            Err(_) => tracing::error!("audit sink lock poisoned"),
        }
    }
}
