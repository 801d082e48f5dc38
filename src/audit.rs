//! The audit trail: one JSON line per decision (allowed, denied or failed), on
//! standard output or appended to a file (see [`AuditSink`] for who writes it).
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

/// Where audit lines go.
///
/// A regular file (`[audit] path`, without `fsync`) is written by the request's
/// own thread: one `write(2)` of the whole line under a lock, appended (handed to
/// the operating system, so a crash of the process cannot lose it) before the
/// request goes on. Measured with `scripts/bench-cpu.sh`, this costs a few µs,
/// where handing each line to a writer thread and waiting for its
/// acknowledgement cost two thread wake-ups per request.
///
/// Anything else (standard output or another pipe, a device, or a file with
/// `fsync`) goes to a dedicated writer thread fed through a bounded queue, since
/// a pipe whose reader stalls blocks its writer and a sync takes milliseconds:
/// [`AuditSink::write`] (for issued tokens) waits until its line was written and
/// flushed, at most [`WRITE_TIMEOUT`]; [`AuditSink::queue`] (for denials) does
/// not wait. Lines queued together are written in one batch (group commit,
/// one sync per batch with `fsync`).
///
/// Either way, when the line cannot be written (the queue is full, the
/// destination refuses the write, or the writer thread takes too long), the
/// caller refuses to hand out a token (no token without its audit line). After a
/// failed write the next line starts on a new line, so a partly written line
/// never corrupts the next record.
pub struct AuditSink {
    dest: Destination,
}

enum Destination {
    /// A regular file, written by the caller's thread.
    Inline(std::sync::Mutex<Inline>),
    /// The writer thread.
    Thread {
        tx: Option<std::sync::mpsc::SyncSender<(String, Option<Ack>)>>,
        writer: Option<std::thread::JoinHandle<()>>,
    },
}

/// The inline file and whether its last write failed (partly written line).
struct Inline {
    file: std::fs::File,
    broken: bool,
}

/// One record as a JSON line (with its newline).
fn line(rec: &AuditRecord) -> Result<Vec<u8>, AuditError> {
    let mut buf = Vec::with_capacity(1024);
    serde_json::to_writer(&mut buf, rec).map_err(|e| AuditError::Write(e.to_string()))?;
    buf.push(b'\n');
    Ok(buf)
}

impl Inline {
    /// Appends one line (from [`line`]), after a newline when the last write failed.
    fn append(&mut self, line: &[u8]) -> Result<(), AuditError> {
        let result = if self.broken {
            self.file
                .write_all(b"\n")
                .and_then(|()| self.file.write_all(line))
        } else {
            self.file.write_all(line)
        };
        self.broken = result.is_err();
        result.map_err(|e| {
            tracing::error!(error = %e, "audit write failed");
            AuditError::Write(e.to_string())
        })
    }
}

impl AuditSink {
    /// Standard output.
    ///
    /// # Errors
    /// The writer thread cannot be started.
    pub fn stdout(queue: usize) -> std::io::Result<Self> {
        Self::spawn(Box::new(std::io::stdout()), queue)
    }

    /// Appends to `path` (created if missing): inline when it is a regular file
    /// and `fsync` is off, else by the writer thread. With `fsync`, each batch
    /// is also synced to disk (`fdatasync`) before its lines are acknowledged,
    /// so an issued token's line survives a power loss too, not only a crash of
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
        } else if f.metadata()?.file_type().is_file() && !on_remote_filesystem(&f) {
            Ok(Self {
                dest: Destination::Inline(std::sync::Mutex::new(Inline {
                    file: f,
                    broken: false,
                })),
            })
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
            dest: Destination::Thread {
                tx: Some(tx),
                writer: Some(writer),
            },
        })
    }

    /// Serialises outside the lock; the lock covers only the write.
    fn inline(m: &std::sync::Mutex<Inline>, rec: &AuditRecord) -> Result<(), AuditError> {
        let line = line(rec)?;
        let mut f = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.append(&line)
    }

    /// Writes one line and returns once it is written and flushed (through the
    /// writer thread: waits at most [`WRITE_TIMEOUT`]).
    ///
    /// # Errors
    /// [`AuditError`] when the line is not known to be written.
    pub async fn write(&self, rec: &AuditRecord) -> Result<(), AuditError> {
        let tx = match &self.dest {
            Destination::Inline(m) => return Self::inline(m, rec),
            Destination::Thread { tx, .. } => tx,
        };
        let line = serde_json::to_string(rec).map_err(|e| AuditError::Write(e.to_string()))?;
        let (ack, done) = tokio::sync::oneshot::channel();
        match tx {
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

    /// Writes one line without waiting for the writer thread: for decisions
    /// that hand out nothing (a denial must not wait behind a stuck audit
    /// pipe). A regular file is written inline, as by [`AuditSink::write`].
    ///
    /// # Errors
    /// [`AuditError::Full`] when the queue is full; [`AuditError::Write`] when
    /// the inline write failed.
    pub fn queue(&self, rec: &AuditRecord) -> Result<(), AuditError> {
        let tx = match &self.dest {
            Destination::Inline(m) => return Self::inline(m, rec),
            Destination::Thread { tx, .. } => tx,
        };
        let line = serde_json::to_string(rec).map_err(|e| AuditError::Write(e.to_string()))?;
        match tx {
            Some(tx) => tx.try_send((line, None)).map_err(|_| AuditError::Full),
            None => Err(AuditError::Full),
        }
    }

    /// [`AuditSink::queue`] for records of requests that were abandoned, where
    /// nobody waits for an answer; a lost line is logged.
    pub fn write_detached(&self, rec: &AuditRecord) {
        if self.queue(rec).is_err() {
            tracing::error!("audit line of an abandoned request lost (queue full or write failed)");
        }
    }
}

/// True when `f` lives on a network or userspace filesystem (NFS, SMB/CIFS,
/// FUSE, 9p, Ceph, AFS, Lustre, GlusterFS is FUSE), where a write can hang for
/// as long as the server is away: such a file goes to the writer thread, whose
/// timeout bounds the wait, rather than being written by request threads.
/// Magic numbers from Linux's `include/uapi/linux/magic.h` (`statfs(2)`); an
/// unreadable type counts as remote.
fn on_remote_filesystem(f: &std::fs::File) -> bool {
    const REMOTE: [i64; 9] = [
        0x6969,      // NFS_SUPER_MAGIC
        0x517B,      // SMB_SUPER_MAGIC
        0xFE53_4D42, // SMB2_MAGIC_NUMBER
        0xFF53_4D42, // CIFS_SUPER_MAGIC
        0x6573_5546, // FUSE_SUPER_MAGIC
        0x0102_1997, // V9FS_MAGIC
        0x00C3_6400, // CEPH_SUPER_MAGIC
        0x5346_414F, // AFS_FS_MAGIC
        0x0BD0_0BD0, // LL_SUPER_MAGIC (Lustre)
    ];
    match rustix::fs::fstatfs(f) {
        // `f_type` is i64 on 64-bit Linux and narrower elsewhere.
        #[allow(
            clippy::useless_conversion,
            reason = "not the same type on every target"
        )]
        Ok(st) => REMOTE.contains(&i64::from(st.f_type)),
        Err(_) => true,
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
        if let Destination::Thread { tx, writer } = &mut self.dest {
            drop(tx.take());
            if let Some(w) = writer.take() {
                let _ = w.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    fn record(i: usize) -> AuditRecord {
        let mut r = AuditRecord::new(format!("request-{i}"));
        r.branch_name = Some("x".repeat(i % 300));
        r
    }

    #[tokio::test]
    async fn a_regular_file_is_written_inline_one_whole_line_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = std::sync::Arc::new(AuditSink::file(&path, 4, false).unwrap());
        assert!(matches!(sink.dest, Destination::Inline(_)));
        // Written before write() returns: no writer thread, no queue to fill.
        sink.write(&record(0)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        sink.queue(&record(t * 1000 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2001);
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(v["request_id"].as_str().unwrap().starts_with("request-"));
        }
    }

    #[tokio::test]
    async fn a_failed_inline_write_is_an_error_and_the_next_line_starts_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "").unwrap();
        // A regular file the sink cannot write to (opened read-only).
        let sink = AuditSink {
            dest: Destination::Inline(std::sync::Mutex::new(Inline {
                file: std::fs::File::open(&path).unwrap(),
                broken: false,
            })),
        };
        assert!(matches!(
            sink.write(&record(1)).await,
            Err(AuditError::Write(_))
        ));
        assert!(sink.queue(&record(2)).is_err());
        let Destination::Inline(m) = &sink.dest else {
            unreachable!()
        };
        let mut inline = m.lock().unwrap();
        assert!(inline.broken);
        // Writable again (the disk has room): the line after a failure begins
        // with a newline, so a partly written line cannot swallow it.
        inline.file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        inline.append(&line(&record(3)).unwrap()).unwrap();
        assert!(!inline.broken);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with('\n') && text.ends_with("}\n"), "{text:?}");
    }

    #[test]
    fn a_local_file_is_not_remote() {
        let f = tempfile::tempfile().unwrap();
        assert!(!on_remote_filesystem(&f));
    }

    #[tokio::test]
    async fn standard_output_devices_and_fsync_use_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let synced = AuditSink::file(&dir.path().join("a.jsonl"), 4, true).unwrap();
        assert!(matches!(synced.dest, Destination::Thread { .. }));
        let device = AuditSink::file(Path::new("/dev/null"), 4, false).unwrap();
        assert!(matches!(device.dest, Destination::Thread { .. }));
        device.write(&record(1)).await.unwrap();
    }
}
