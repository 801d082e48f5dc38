//! The audit trail: one JSON line per decision (allowed, denied or failed), on
//! standard output or appended to a file (see [`AuditSink`] for who writes it).
//!
//! The line ties the Bitbucket identity (claim names as Bitbucket sends them) to
//! the issued token by its SHA-256 and `jti`, never the token itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
/// closed pipe), the destination cannot be opened (a FIFO without a reader), or
/// the write did not finish within [`WRITE_TIMEOUT`].
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
    /// The destination is not open (a FIFO without a reader, a path that
    /// cannot be reopened after a rotation); opening is retried.
    #[error("audit destination unavailable")]
    Unavailable,
}

/// Longest wait for a line to be written before the request gives up on it.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the audit file was (re)opened: the `reason` of `sts_audit_reopens_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReopenReason {
    /// SIGHUP (logrotate's `postrotate kill -HUP`).
    Signal,
    /// The path names another file than the one open (renamed, removed).
    Rotated,
    /// The reader of a FIFO went away (`EPIPE`).
    ReaderGone,
    /// Opened after a time of unavailability (a FIFO's reader appeared).
    Retry,
}

impl ReopenReason {
    /// Every reason (metrics are exported at 0 from the start).
    pub const ALL: [Self; 4] = [Self::Signal, Self::Rotated, Self::ReaderGone, Self::Retry];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "signal",
            Self::Rotated => "rotated",
            Self::ReaderGone => "reader_gone",
            Self::Retry => "retry",
        }
    }
}

/// What the sink reports (metrics live outside this module).
#[derive(Clone)]
pub struct AuditHooks {
    /// A reopen succeeded.
    pub reopened: std::sync::Arc<dyn Fn(ReopenReason) + Send + Sync>,
    /// The destination became available (`true`) or unavailable (`false`);
    /// also called once with the initial state.
    pub availability: std::sync::Arc<dyn Fn(bool) + Send + Sync>,
    /// A queued line nobody waits for (a denial's) could not be written, by
    /// its outcome (a waiting caller counts its own).
    pub lost: std::sync::Arc<dyn Fn(&'static str) + Send + Sync>,
}

impl Default for AuditHooks {
    fn default() -> Self {
        Self {
            reopened: std::sync::Arc::new(|_| {}),
            availability: std::sync::Arc::new(|_| {}),
            lost: std::sync::Arc::new(|_| {}),
        }
    }
}

/// How a file destination behaves.
#[derive(Clone, Default)]
pub struct FileOptions {
    /// Most lines waiting for the writer thread.
    pub queue: usize,
    /// Sync each batch to disk (writer thread).
    pub fsync: bool,
    /// While unavailable, how often opening is retried; also how often an
    /// idle writer checks the path for a rotation.
    pub retry: Duration,
    /// Metrics callbacks.
    pub hooks: AuditHooks,
}

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
/// A path is opened without blocking (`O_NONBLOCK`, cleared once open: a FIFO
/// without a reader fails at once with `ENXIO` instead of blocking `open(2)`)
/// and reopened: on SIGHUP ([`AuditSink::reopen`]), when the path names
/// another file than the open one (device and inode checked before every write,
/// one `stat(2)`), when a FIFO's reader went away (`EPIPE`), and, while it is
/// unavailable, at most every [`FileOptions::retry`].
///
/// Either way, when the line cannot be written (the queue is full, the
/// destination refuses the write or is unavailable, or the writer thread takes
/// too long), the caller refuses to hand out a token (no token without its
/// audit line). After a failed write the next line starts on a new line, so a
/// partly written line never corrupts the next record.
pub struct AuditSink {
    dest: Destination,
    shared: Arc<Shared>,
}

enum Destination {
    /// A regular file, written by the caller's thread.
    Inline(Mutex<PathFile>),
    /// The writer thread.
    Thread {
        tx: Option<std::sync::mpsc::SyncSender<(String, Waiter)>>,
        writer: Option<std::thread::JoinHandle<()>>,
        /// Disconnected when the writer thread ends (in a mutex: `Sync`).
        done: Mutex<std::sync::mpsc::Receiver<()>>,
    },
}

/// State shared by the sink, its writer thread and the signal task.
struct Shared {
    available: AtomicBool,
    /// SIGHUP asked for a reopen (the writer thread takes it before its next batch).
    reopen: AtomicBool,
    hooks: AuditHooks,
}

impl Shared {
    fn new(hooks: AuditHooks, available: bool) -> Arc<Self> {
        (hooks.availability)(available);
        Arc::new(Self {
            available: AtomicBool::new(available),
            reopen: AtomicBool::new(false),
            hooks,
        })
    }

    fn set_available(&self, up: bool) {
        if self.available.swap(up, Ordering::AcqRel) != up {
            (self.hooks.availability)(up);
            if up {
                tracing::info!("audit destination available again");
            } else {
                tracing::error!(
                    "audit destination unavailable: tokens are withheld until it is back"
                );
            }
        }
    }
}

/// `(st_dev, st_ino)`: which file a path or descriptor names.
type FileId = (u64, u64);

#[allow(
    clippy::useless_conversion,
    reason = "not the same type on every target"
)]
fn file_id(st: &rustix::fs::Stat) -> FileId {
    (u64::from(st.st_dev), u64::from(st.st_ino))
}

/// Opens `path` for appending (created if missing, `O_APPEND`) without
/// blocking in `open(2)`, then makes the descriptor blocking again.
///
/// # Errors
/// The `open(2)` error: `ENXIO` for a FIFO without a reader.
fn open_append(path: &Path) -> std::io::Result<(std::fs::File, FileId)> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::from_bits_truncate(0o666),
    )?;
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)?;
    let id = file_id(&rustix::fs::fstat(&fd)?);
    Ok((std::fs::File::from(fd), id))
}

/// True when `f` may be written by request threads: a regular file on a local
/// filesystem.
fn inline_capable(f: &std::fs::File) -> bool {
    f.metadata().is_ok_and(|m| m.file_type().is_file()) && !on_remote_filesystem(f)
}

/// An audit path and its open descriptor (`None` while unavailable).
struct PathFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    id: FileId,
    /// The last write failed (partly written line).
    broken: bool,
    fsync: bool,
    /// Written by request threads: only a local regular file is accepted.
    inline: bool,
    retry: Duration,
    next_attempt: Instant,
    shared: Arc<Shared>,
}

impl PathFile {
    /// Opens the new file first, then closes the old one (a FIFO's reader never
    /// sees the end of the stream in between).
    fn reopen(&mut self, reason: ReopenReason) -> Result<(), AuditError> {
        let opened = open_append(&self.path).and_then(|(f, id)| {
            if self.inline && !inline_capable(&f) {
                return Err(std::io::Error::other(
                    "the audit path no longer names a regular file on a local filesystem \
                     (restart the service to write to it)",
                ));
            }
            Ok((f, id))
        });
        match opened {
            Ok((f, id)) => {
                self.file = Some(f);
                self.id = id;
                self.broken = false;
                (self.shared.hooks.reopened)(reason);
                self.shared.set_available(true);
                tracing::info!(reason = reason.as_str(), path = %self.path.display(), "audit file reopened");
                Ok(())
            }
            Err(e) => {
                self.file = None;
                self.next_attempt = Instant::now() + self.retry;
                if self.shared.available.load(Ordering::Acquire) {
                    tracing::error!(error = %e, reason = reason.as_str(), path = %self.path.display(), "cannot reopen the audit file");
                }
                self.shared.set_available(false);
                Err(AuditError::Unavailable)
            }
        }
    }

    /// Before a write: a reopen asked for by SIGHUP, a rotation (the path names
    /// another file, or none), or a retry while unavailable and due.
    fn prepare(&mut self) -> Result<(), AuditError> {
        if self.shared.reopen.swap(false, Ordering::AcqRel) {
            return self.reopen(ReopenReason::Signal);
        }
        if self.file.is_none() {
            if Instant::now() < self.next_attempt {
                return Err(AuditError::Unavailable);
            }
            return self.reopen(ReopenReason::Retry);
        }
        match rustix::fs::stat(&self.path) {
            Ok(st) if file_id(&st) == self.id => Ok(()),
            // Another file, none, or a path that cannot be examined (ENOTDIR: the
            // directory was replaced; ELOOP; EACCES): the open file may be renamed
            // or deleted, so never write to it unseen. Reopen, or be unavailable
            // (tokens withheld) until the path names a file again.
            Ok(_) | Err(_) => self.reopen(ReopenReason::Rotated),
        }
    }

    /// Appends `buf` (whole lines), after a newline when the last write failed.
    fn append(&mut self, buf: &[u8]) -> Result<(), AuditError> {
        self.prepare()?;
        let mut result = self.write_once(buf);
        if matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe) {
            tracing::warn!(path = %self.path.display(), "the audit reader went away; reopening");
            self.reopen(ReopenReason::ReaderGone)?;
            result = self.write_once(buf);
        }
        self.broken = result.is_err();
        result.map_err(|e| {
            tracing::error!(error = %e, "audit write failed");
            AuditError::Write(e.to_string())
        })
    }

    fn write_once(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))?;
        if self.broken {
            f.write_all(b"\n")?;
        }
        f.write_all(buf)?;
        if self.fsync {
            f.sync_data()?;
        }
        Ok(())
    }
}

/// What the writer thread writes to.
enum Output {
    Stdout { out: std::io::Stdout, broken: bool },
    Path(PathFile),
}

impl Output {
    fn append(&mut self, buf: &[u8]) -> Result<(), AuditError> {
        match self {
            Self::Path(p) => p.append(buf),
            Self::Stdout { out, broken } => {
                let mut lock = out.lock();
                let result = if *broken {
                    lock.write_all(b"\n")
                } else {
                    Ok(())
                }
                .and_then(|()| lock.write_all(buf))
                .and_then(|()| lock.flush());
                *broken = result.is_err();
                result.map_err(|e| {
                    tracing::error!(error = %e, "audit write failed");
                    AuditError::Write(e.to_string())
                })
            }
        }
    }

    /// While idle: a reopen asked for, a rotation, or a due retry.
    fn maintain(&mut self) {
        if let Self::Path(p) = self {
            let _ = p.prepare();
        }
    }
}

/// One record as a JSON line (with its newline).
fn line(rec: &AuditRecord) -> Result<Vec<u8>, AuditError> {
    let mut buf = Vec::with_capacity(1024);
    serde_json::to_writer(&mut buf, rec).map_err(|e| AuditError::Write(e.to_string()))?;
    buf.push(b'\n');
    Ok(buf)
}

impl AuditSink {
    /// Standard output (never reopened: its owner, the journal or the
    /// container runtime, handles rotation).
    ///
    /// # Errors
    /// The writer thread cannot be started.
    pub fn stdout(queue: usize, hooks: AuditHooks) -> std::io::Result<Self> {
        let shared = Shared::new(hooks, true);
        let out = Output::Stdout {
            out: std::io::stdout(),
            broken: false,
        };
        Self::spawn(out, queue, Duration::from_secs(1), shared)
    }

    /// Appends to `path` (created if missing): inline when it is a regular file
    /// on a local filesystem and `fsync` is off, else by the writer thread. With
    /// `fsync`, each batch is also synced to disk (`fdatasync`) before its lines
    /// are acknowledged, so an issued token's line survives a power loss too,
    /// not only a crash of the process; one sync per batch (group commit) keeps
    /// the cost per line low. A FIFO without a reader is not an error: the sink
    /// starts unavailable and retries.
    ///
    /// # Errors
    /// The file cannot be opened (other than a FIFO without a reader) or the
    /// writer thread cannot be started.
    pub fn file(path: &Path, opts: &FileOptions) -> std::io::Result<Self> {
        let (file, id) = match open_append(path) {
            Ok((f, id)) => (Some(f), id),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => {
                tracing::error!(path = %path.display(), "the audit FIFO has no reader yet: tokens are withheld until one opens it");
                (None, (0, 0))
            }
            Err(e) => return Err(e),
        };
        let inline = !opts.fsync && file.as_ref().is_some_and(inline_capable);
        let shared = Shared::new(opts.hooks.clone(), file.is_some());
        let p = PathFile {
            path: path.to_path_buf(),
            file,
            id,
            broken: false,
            fsync: opts.fsync,
            inline,
            retry: opts.retry,
            next_attempt: Instant::now() + opts.retry,
            shared: shared.clone(),
        };
        if inline {
            Ok(Self {
                dest: Destination::Inline(Mutex::new(p)),
                shared,
            })
        } else {
            Self::spawn(Output::Path(p), opts.queue, opts.retry, shared)
        }
    }

    /// `queue`: most lines waiting for the writer thread; `tick`: how often an
    /// idle writer looks after its destination.
    fn spawn(
        out: Output,
        queue: usize,
        tick: Duration,
        shared: Arc<Shared>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Waiter)>(queue);
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let lost = shared.hooks.lost.clone();
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                write_batches(out, &rx, tick, &*lost);
                drop(done_tx);
            })?;
        Ok(Self {
            dest: Destination::Thread {
                tx: Some(tx),
                writer: Some(writer),
                done: Mutex::new(done),
            },
            shared,
        })
    }

    /// Whether the destination is open (`/readyz`).
    pub fn available(&self) -> bool {
        self.shared.available.load(Ordering::Acquire)
    }

    /// SIGHUP: reopens the file (the inline file at once; the writer thread
    /// before its next batch, or within its retry interval when idle).
    /// Standard output is not reopened.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        self.maintain();
    }

    /// Periodic upkeep of the inline file: a reopen asked for, a rotation, a
    /// due retry while unavailable (the writer thread does its own).
    pub fn maintain(&self) {
        if let Destination::Inline(m) = &self.dest {
            let _ = m
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .prepare();
        }
    }

    /// Serialises outside the lock; the lock covers the check and the write.
    fn inline(m: &Mutex<PathFile>, rec: &AuditRecord) -> Result<(), AuditError> {
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
                .try_send((line, Waiter::Ack(ack)))
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
            Some(tx) => tx
                .try_send((line, Waiter::Nobody(rec.outcome.as_str())))
                .map_err(|_| AuditError::Full),
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

/// Who waits for a queued line: a caller (told the batch's result), or nobody
/// (a denial's line: a failure is reported through [`AuditHooks::lost`]).
enum Waiter {
    Ack(Ack),
    Nobody(&'static str),
}

/// The writer thread: takes every line queued, writes them in one batch,
/// then acknowledges each with the batch's result. Idle, it looks after its
/// destination every `tick` (a reopen asked for, a rotation, a due retry).
fn write_batches(
    mut out: Output,
    rx: &std::sync::mpsc::Receiver<(String, Waiter)>,
    tick: Duration,
    lost: &(dyn Fn(&'static str) + Send + Sync),
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let first = match rx.recv_timeout(tick) {
            Ok(first) => first,
            Err(RecvTimeoutError::Timeout) => {
                out.maintain();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 1024 {
                break;
            }
        }
        let mut buf = String::new();
        for (line, _) in &batch {
            buf.push_str(line);
            buf.push('\n');
        }
        let result = out.append(buf.as_bytes()).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, lines = batch.len(), "audit lines not written");
        }
        for (_, waiter) in batch {
            match waiter {
                Waiter::Ack(ack) => {
                    let _ = ack.send(result.clone());
                }
                Waiter::Nobody(outcome) if result.is_err() => lost(outcome),
                Waiter::Nobody(_) => {}
            }
        }
    }
}

/// Longest wait, when the sink is dropped (shutdown), for the writer thread to
/// write what is queued: a FIFO whose reader stalls must not hold the process.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl Drop for AuditSink {
    /// Closes the queue and waits (at most [`DRAIN_TIMEOUT`]) for the writer
    /// to write what is queued.
    fn drop(&mut self) {
        if let Destination::Thread { tx, writer, done } = &mut self.dest {
            drop(tx.take());
            let done = done
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match done.recv_timeout(DRAIN_TIMEOUT) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    tracing::error!(
                        "the audit writer did not finish within 5 s; queued lines may be lost"
                    );
                }
                _ => {
                    if let Some(w) = writer.take() {
                        let _ = w.join();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    fn options(queue: usize, fsync: bool) -> FileOptions {
        FileOptions {
            queue,
            fsync,
            retry: Duration::from_millis(50),
            hooks: AuditHooks::default(),
        }
    }

    fn record(i: usize) -> AuditRecord {
        let mut r = AuditRecord::new(format!("request-{i}"));
        r.branch_name = Some("x".repeat(i % 300));
        r
    }

    #[tokio::test]
    async fn a_regular_file_is_written_inline_one_whole_line_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = std::sync::Arc::new(AuditSink::file(&path, &options(4, false)).unwrap());
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
        let sink = AuditSink::file(&path, &options(4, false)).unwrap();
        let Destination::Inline(m) = &sink.dest else {
            unreachable!()
        };
        // The same file, but a descriptor the sink cannot write to (read-only).
        m.lock().unwrap().file = Some(std::fs::File::open(&path).unwrap());
        assert!(matches!(
            sink.write(&record(1)).await,
            Err(AuditError::Write(_))
        ));
        assert!(sink.queue(&record(2)).is_err());
        let mut inline = m.lock().unwrap();
        assert!(inline.broken);
        // Writable again (the disk has room): the line after a failure begins
        // with a newline, so a partly written line cannot swallow it.
        inline.file = Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap(),
        );
        inline.append(&line(&record(3)).unwrap()).unwrap();
        assert!(!inline.broken);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with('\n') && text.ends_with("}\n"), "{text:?}");
    }

    #[tokio::test]
    async fn a_renamed_file_is_followed_by_the_next_inline_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = AuditSink::file(&path, &options(4, false)).unwrap();
        sink.write(&record(1)).await.unwrap();
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        sink.write(&record(2)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        std::fs::remove_file(&path).unwrap();
        sink.write(&record(3)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    /// The cost of the rotation check, one `stat(2)` per inline write:
    /// `cargo test --release --lib stat_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn stat_cost_per_inline_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "").unwrap();
        let n = 200_000;
        let started = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(rustix::fs::stat(&path).unwrap());
        }
        let per = started.elapsed() / n;
        println!("stat(2) of the audit path: {per:?} per call");
    }

    #[test]
    fn a_local_file_is_not_remote() {
        let f = tempfile::tempfile().unwrap();
        assert!(!on_remote_filesystem(&f));
    }

    #[tokio::test]
    async fn standard_output_devices_and_fsync_use_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let synced = AuditSink::file(&dir.path().join("a.jsonl"), &options(4, true)).unwrap();
        assert!(matches!(synced.dest, Destination::Thread { .. }));
        let device = AuditSink::file(Path::new("/dev/null"), &options(4, false)).unwrap();
        assert!(matches!(device.dest, Destination::Thread { .. }));
        device.write(&record(1)).await.unwrap();
    }
}
