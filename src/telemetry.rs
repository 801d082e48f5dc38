//! Logs (JSON lines on standard error, filtered by `RUST_LOG`, default `info`)
//! and the audit trail (JSON lines on standard output or a file).
//!
//! Nothing here ever receives a token, assertion or secret: types holding them
//! redact themselves in `Debug`, and the audit line records only the SHA-256 and
//! `jti` of the issued token.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global JSON log subscriber (call once, at startup). Lines are
/// written by a background thread (tracing-appender), so a slow or blocked
/// standard error never stalls request handling; when its buffer is full, lines
/// are dropped. Keep the returned guard alive until exit (it flushes on drop).
///
/// # Errors
/// When a subscriber is already installed.
pub fn init_logging() -> Result<tracing_appender::non_blocking::WorkerGuard, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_current_span(true)
        .with_span_list(false)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(guard)
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
    /// The TCP peer (the proxy's address when behind one).
    pub client_address: Option<String>,
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

/// The audit queue is full: the writer is stuck (a blocked pipe or disk).
#[derive(Debug, thiserror::Error)]
#[error("audit queue full")]
pub struct AuditFull;

/// Where audit lines go: a dedicated writer thread fed through a bounded queue,
/// so a slow or blocked destination never stalls request handling. When the queue
/// is full, [`AuditSink::write`] fails: the caller then refuses to hand out a
/// token (no token without its audit line) and counts the lost denial line.
pub struct AuditSink {
    tx: Option<std::sync::mpsc::SyncSender<String>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl AuditSink {
    /// Standard output.
    ///
    /// # Errors
    /// The writer thread cannot be started.
    pub fn stdout(queue: usize) -> std::io::Result<Self> {
        Self::spawn(Box::new(std::io::stdout()), queue)
    }

    /// Appends to `path` (created if missing).
    ///
    /// # Errors
    /// The file cannot be opened or the writer thread cannot be started.
    pub fn file(path: &Path, queue: usize) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Self::spawn(Box::new(f), queue)
    }

    /// `queue`: most lines waiting for the writer thread.
    fn spawn(mut out: Box<dyn Write + Send>, queue: usize) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(queue);
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                for line in rx {
                    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                        tracing::error!(error = %e, "audit write failed");
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// Queues one line.
    ///
    /// # Errors
    /// [`AuditFull`] when the writer is not keeping up.
    pub fn write(&self, rec: &AuditRecord) -> Result<(), AuditFull> {
        let line = serde_json::to_string(rec).map_err(|e| {
            tracing::error!(error = %e, "audit record serialisation failed");
            AuditFull
        })?;
        match &self.tx {
            Some(tx) => tx.try_send(line).map_err(|_| AuditFull),
            None => Err(AuditFull),
        }
    }
}

impl Drop for AuditSink {
    /// Closes the queue and waits for the writer to write what is queued.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}
