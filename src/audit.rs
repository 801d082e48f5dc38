//! The audit trail: one JSON line per decision (allowed, denied or failed), on
//! standard output or appended to a file, written by a dedicated thread.
//!
//! The line ties the Bitbucket identity (claim names as Bitbucket sends them) to
//! the issued token by its SHA-256 and `jti`, never the token itself.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::domain::Scopes;

/// The outcome of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutcome {
    /// A token was issued.
    Allowed,
    /// Refused: a bad request, token or policy, or a limit.
    #[default]
    Denied,
    /// Allowed or unanswerable, but an upstream or the audit log failed.
    Failed,
}

impl AuditOutcome {
    /// The lowercase name (metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Failed => "failed",
        }
    }
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
    /// What happened.
    pub outcome: AuditOutcome,
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
    /// The repository's `full_name`, where the inventory knows it.
    pub repository_full_name: Option<String>,
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
    pub requested_scopes: Scopes,
    /// Scopes granted by Keycloak.
    pub granted_scopes: Scopes,
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
