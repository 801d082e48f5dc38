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

/// Which endpoint the line is about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditEvent {
    /// `POST /token`: a token exchange.
    #[default]
    Exchange,
    /// `POST /grants`: capability discovery (no token issued, Keycloak not called).
    Grants,
}

/// The outcome of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutcome {
    /// A token was issued (`exchange`), or the grants were listed (`grants`).
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
    /// Which endpoint: `exchange` or `grants`.
    pub event: AuditEvent,
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
    /// `aud` of the verified token, as a list: shows the audience markers the
    /// step declared (`oidc: audiences:`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aud: Vec<String>,
    /// `grants` only: the audiences the answer listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listed_audiences: Option<Vec<String>>,
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
    /// JWT Authorization Grant: the repository identity the assertion named (its
    /// `sub`, the Keycloak user's federated `userId`); Keycloak's
    /// `JWT_AUTHORIZATION_GRANT` event carries the same value as
    /// `identity_provider_user_id`.
    pub identity: Option<String>,
    /// JWT Authorization Grant: the assertion's `jti`.
    pub identity_assertion_jti: Option<String>,
    /// `sub` of the issued token: the Keycloak user id (the repository user's, or
    /// the client's service account's).
    pub keycloak_user_id: Option<String>,
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

/// An audit line that was not written: the queue is full (the writer is stuck on
/// a blocked pipe or disk), the destination refused the write (a full disk, a
/// closed pipe), or the write did not finish within [`WRITE_TIMEOUT`].
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The queue is full.
    #[error("audit queue full")]
    Full,
    /// Writing or flushing failed.
    #[error("audit write failed: {0}")]
    Write(String),
    /// The write did not finish in time.
    #[error("audit write did not finish within the timeout")]
    Timeout,
}

/// Longest wait for a line to be written before the request gives up on it.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Where audit lines go: a dedicated writer thread fed through a bounded queue.
/// [`AuditSink::write`] (for issued tokens) waits until its line was written and
/// flushed (handed to the operating system), so a token is answered only after
/// its audit line is written; [`AuditSink::queue`] (for denials) does not wait: lines queued together are written in one batch (group commit), so
/// waiting costs little throughput. When the queue is full, the write fails, or
/// it takes longer than [`WRITE_TIMEOUT`], the caller refuses to hand out a token
/// (no token without its audit line). After a failed write the next batch starts
/// on a new line, so a partly written line never corrupts the next record.
pub struct AuditSink {
    tx: Option<std::sync::mpsc::SyncSender<(String, Option<Ack>)>>,
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

    /// Appends to `path` (created if missing). With `fsync`, each batch is
    /// also synced to disk (`fdatasync`) before its lines are acknowledged, so
    /// an issued token's line survives a power loss too, not only a crash of
    /// the process; one sync per batch (group commit) keeps the cost per line low.
    ///
    /// # Errors
    /// The file cannot be opened or the writer thread cannot be started.
    pub fn file(path: &Path, queue: usize, fsync: bool) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if fsync {
            Self::spawn(Box::new(Synced(f)), queue)
        } else {
            Self::spawn(Box::new(f), queue)
        }
    }

    /// `queue`: most lines waiting for the writer thread.
    fn spawn(out: Box<dyn Write + Send>, queue: usize) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Option<Ack>)>(queue);
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_batches(out, &rx))?;
        Ok(Self {
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// Writes one line and waits (at most [`WRITE_TIMEOUT`]) until it is written
    /// and flushed.
    ///
    /// # Errors
    /// [`AuditError`] when the line is not known to be written.
    pub async fn write(&self, rec: &AuditRecord) -> Result<(), AuditError> {
        let line = serde_json::to_string(rec).map_err(|e| AuditError::Write(e.to_string()))?;
        let (ack, done) = tokio::sync::oneshot::channel();
        match &self.tx {
            Some(tx) => tx
                .try_send((line, Some(ack)))
                .map_err(|_| AuditError::Full)?,
            None => return Err(AuditError::Full),
        }
        match tokio::time::timeout(WRITE_TIMEOUT, done).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(AuditError::Write(e)),
            Ok(Err(_)) => Err(AuditError::Write("the audit writer stopped".into())),
            Err(_) => Err(AuditError::Timeout),
        }
    }

    /// Queues one line without waiting for it to be written: for decisions that
    /// hand out nothing (a denial must not wait behind a stuck audit log).
    ///
    /// # Errors
    /// [`AuditError::Full`] when the queue is full.
    pub fn queue(&self, rec: &AuditRecord) -> Result<(), AuditError> {
        let line = serde_json::to_string(rec).map_err(|e| AuditError::Write(e.to_string()))?;
        match &self.tx {
            Some(tx) => tx.try_send((line, None)).map_err(|_| AuditError::Full),
            None => Err(AuditError::Full),
        }
    }

    /// [`AuditSink::queue`] for records of requests that were abandoned, where
    /// nobody waits for an answer; a lost line is logged.
    pub fn write_detached(&self, rec: &AuditRecord) {
        if self.queue(rec).is_err() {
            tracing::error!("audit queue full: the line of an abandoned request was lost");
        }
    }
}

/// A file whose `flush` also syncs its data to disk.
struct Synced(std::fs::File);

impl Write for Synced {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.0.sync_data()
    }
}

/// The writer thread: takes every line queued, writes them in one batch,
/// flushes, then acknowledges each with the batch's result.
fn write_batches(
    mut out: Box<dyn Write + Send>,
    rx: &std::sync::mpsc::Receiver<(String, Option<Ack>)>,
) {
    let mut broken = false;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 1024 {
                break;
            }
        }
        let mut buf = String::new();
        if broken {
            buf.push('\n');
        }
        for (line, _) in &batch {
            buf.push_str(line);
            buf.push('\n');
        }
        let result = out
            .write_all(buf.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string());
        broken = result.is_err();
        if let Err(e) = &result {
            tracing::error!(error = %e, lines = batch.len(), "audit write failed");
        }
        for (_, ack) in batch {
            if let Some(ack) = ack {
                let _ = ack.send(result.clone());
            }
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
