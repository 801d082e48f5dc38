//! Policy reload without restart: on SIGHUP, when the file watch sees a change
//! in the policies directory (or its link being swapped), and when the poll
//! fallback sees the directory's content digest change. A set is applied only
//! once it settled: two reads `settle` apart agree ([`PolicyStore::reload_settled`]);
//! otherwise the reload is retried. The new set is compiled first and swapped
//! atomically; an invalid set is refused (logged, counted) and the old one stays
//! active. Requests already running keep the set they started with (they hold an
//! `Arc`). Reads and compiles run on background threads of lower priority
//! ([`Background`]: `SCHED_IDLE` for the watch's and the poll's reloads, nice
//! +5 for SIGHUP's), never on the async workers: a reload under full load
//! takes longer instead of delaying requests.
//!
//! [`PolicyStore::reload_settled`]: crate::policy::PolicyStore::reload_settled

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::policy::{PolicyError, Reloaded};
use crate::state::AppState;

/// How the policies directory is followed (`watch_policies`, `[policies]`).
#[derive(Debug, Clone, Copy)]
pub struct ReloadSettings {
    /// Watch the directory, its resolved target and its parent (for a swapped link).
    pub watch: bool,
    /// Compare the directory's content digest this often (`None`: no polling).
    pub poll: Option<Duration>,
    /// Two reads this far apart must agree before a set is applied.
    pub settle: Duration,
}

/// Retries of an unsettled reload after one trigger; later changes (watch,
/// poll, SIGHUP) start again.
const MAX_UNSETTLED_RETRIES: u32 = 40;

/// The nice value the reload thread adds to the service's when `SCHED_IDLE`
/// cannot be set: under the kernel's fair scheduler a thread at +5 gets about a
/// third of a request worker's share of a busy CPU (weights 335 against 1024)
/// and all of an idle one.
const RELOAD_NICE: i32 = 5;

/// One thread for the reload's blocking work (reading the directory,
/// compiling, the poll's stamps), under Linux's `SCHED_IDLE` policy: it runs
/// on CPU time the request workers leave, and a worker that wakes up (a
/// request arrived, an upstream answered) takes the CPU from it at once,
/// where a lower nice value alone let it finish its time slice first (p99
/// while reloading every second at 20,000 / 5,000: nice +5 1.24x, nice +19
/// 1.27x, `SCHED_IDLE` 1.03x of the quiet p99). Under full load a reload takes
/// longer (about a second at that size) instead of delaying requests. Where
/// the policy cannot be set, [`RELOAD_NICE`]. Jobs run one at a time, in order.
#[derive(Clone)]
struct Background {
    jobs: std::sync::mpsc::SyncSender<Box<dyn FnOnce() + Send>>,
}

/// How far below the request workers a [`Background`] thread runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Priority {
    /// `SCHED_IDLE` (else [`RELOAD_NICE`]): the watch's and the poll's reloads.
    Idle,
    /// [`RELOAD_NICE`] under the fair scheduler: SIGHUP's reloads, which an
    /// operator sends when a change must apply now, so they get a share of a
    /// saturated CPU where an idle-policy thread would wait.
    Nice,
}

impl Background {
    /// Starts the thread (startup).
    ///
    /// # Errors
    /// The thread cannot be started.
    fn start(priority: Priority) -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Box<dyn FnOnce() + Send>>(4);
        let name = match priority {
            Priority::Idle => "policy-reload",
            Priority::Nice => "policy-sighup",
        };
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                match priority {
                    Priority::Idle => lower_this_threads_priority(),
                    Priority::Nice => nice_this_thread(),
                }
                while let Ok(job) = rx.recv() {
                    // A job that panics loses its answer (the caller logs a
                    // failed task), not the thread.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the thread and waits for its result without blocking the
    /// caller's executor; `None` when the thread is gone or busy.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.try_send(job).ok()?;
        rx.await.ok()
    }
}

/// Puts the calling thread (only: Linux's policy and nice value are per
/// thread) under `SCHED_IDLE`, or else [`RELOAD_NICE`] lower.
fn lower_this_threads_priority() {
    use thread_priority::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadPriority, ThreadSchedulePolicy,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle)
    else {
        return;
    };
    // The crate sets the policy, then the nice value: in a niced process the
    // second step can fail (lowering nice needs a privilege) with the policy set.
    if thread_priority::thread_schedule_policy().is_ok_and(|p| p == idle) {
        return;
    }
    tracing::info!(error = ?e, "SCHED_IDLE refused for the reload thread; lowering its nice value instead");
    nice_this_thread();
}

/// Lowers the calling thread's priority by [`RELOAD_NICE`] (Linux: per thread).
fn nice_this_thread() {
    let this = rustix::process::Pid::from_raw(rustix::thread::gettid().as_raw_nonzero().get());
    let now = rustix::process::getpriority_process(this).unwrap_or(0);
    if let Err(e) = rustix::process::setpriority_process(this, now + RELOAD_NICE) {
        tracing::warn!(error = %e, "cannot lower the reload thread's priority");
    }
}

/// Reads the policies directory twice, `settle` apart, and applies the set when
/// it settled and compiles (blocking). `force` applies (and counts) even an
/// unchanged set: SIGHUP.
///
/// # Errors
/// Every problem of the new set; the active set is unchanged then.
pub fn reload(
    state: &AppState,
    settle: Duration,
    force: bool,
) -> Result<Reloaded, Vec<PolicyError>> {
    let before = state.exchange.policies.current();
    let started = std::time::Instant::now();
    let outcome = state.exchange.policies.reload_settled(settle, force);
    let took = started.elapsed().saturating_sub(settle);
    let count = |result: &str| {
        state
            .metrics
            .policy_reloads
            .with_label_values(&[result])
            .inc()
    };
    match &outcome {
        Ok(Reloaded::Applied(set)) => {
            let kept: std::collections::BTreeSet<&str> =
                set.policies().iter().map(|p| p.id.as_str()).collect();
            for gone in before
                .policies()
                .iter()
                .filter(|p| !kept.contains(p.id.as_str()))
            {
                tracing::warn!(policy = %gone.id, effect = ?gone.effect, "policy removed by this reload");
            }
            for w in set.warnings() {
                tracing::warn!(warning = %w, "policy warning");
            }
            count("ok");
            // Logged before the metric shows it: whoever sees the new digest
            // can find its log line.
            state
                .metrics
                .policy_reload_seconds
                .observe(took.as_secs_f64());
            tracing::info!(policies = set.policies().len(), digest = %set.digest(), duration_ms = took.as_millis(), "policies reloaded");
            state.metrics.set_policy_digest(set.digest());
        }
        Ok(Reloaded::Unchanged) => tracing::debug!("policies unchanged"),
        Ok(Reloaded::Unsettled) => {
            count("unsettled");
            tracing::warn!(
                settle_ms = settle.as_millis(),
                "policy files changed while being read; not applied, retrying"
            );
        }
        Err(errors) => {
            count("error");
            for e in errors {
                tracing::error!(error = %e, "policy reload refused; the previous policies stay active");
            }
        }
    }
    outcome
}

/// Runs until aborted: reloads on SIGHUP (`hup`, listened to since before the
/// startup read), on watched changes (debounced by `settle`) and when the poll
/// sees another digest; retries unsettled reloads; starts [`maintain`] (limiter
/// housekeeping, upstream probes) as a task of its own. SIGHUP's reloads run
/// on a second thread ([`Priority::Nice`]) beside the others. Once the watch is in place it looks at the
/// directory once: a change made while the service started is applied
/// without waiting for another event.
pub async fn run(
    state: actix_web::web::Data<AppState>,
    cfg: ReloadSettings,
    hup: Option<tokio::signal::unix::Signal>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let (background, forced) = match (
        Background::start(Priority::Idle),
        Background::start(Priority::Nice),
    ) {
        (Ok(b), Ok(f)) => (b, f),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot start the reload threads; policies are not reloaded");
            return;
        }
    };
    // Not behind a reload waiting for CPU.
    tokio::spawn(maintain(state.clone()));
    let mut r = Reloader {
        background,
        forced,
        watch: cfg
            .watch
            .then(|| DirWatch::new(state.exchange.policies.dir(), tx.clone())),
        last_seen: state.exchange.policies.current().digest().to_string(),
        retry_at: None,
        retries: 0,
        state,
        cfg,
    };
    let mut hup = hup;
    let mut poll = cfg.poll.map(|p| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    // What changed since the startup read, before the watch existed (the poll
    // compares with the startup digest anyway); a SIGHUP received meanwhile is
    // waiting in `hup`.
    if r.watch.is_some() {
        r.attempt(false, true).await;
    }
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                tokio::time::sleep(cfg.settle).await;
                while rx.try_recv().is_ok() {}
                r.attempt(false, true).await;
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading policies");
                tokio::spawn(forced_reload(r.forced.clone(), r.state.clone(), cfg.settle));
            }
            () = async { match poll.as_mut() { Some(p) => { p.tick().await; } None => std::future::pending().await } } => r.poll().await,
            () = async { match r.retry_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                r.attempt(false, false).await;
            }
        }
    }
}

/// Limiter housekeeping every 60 s and the upstream probes every 10 s (the
/// `sts_upstream_up` gauge), on a task of their own.
async fn maintain(state: actix_web::web::Data<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    let mut probe = tokio::time::interval(Duration::from_secs(10));
    for i in [&mut tick, &mut probe] {
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = tick.tick() => state.exchange.limiter.housekeeping(),
            _ = probe.tick() => {
                let s = state.clone();
                tokio::spawn(async move { s.exchange.probe_upstreams().await });
            }
        }
    }
}

/// A SIGHUP's reload (every file read and hashed, applied even when unchanged)
/// on its own thread, beside a watch or poll reload that may be waiting for
/// CPU; retried while unsettled (files still changing, or the other thread
/// applied a set meanwhile: the store never replaces a newer set).
async fn forced_reload(
    thread: Background,
    state: actix_web::web::Data<AppState>,
    settle: Duration,
) {
    for _ in 0..=MAX_UNSETTLED_RETRIES {
        let s = state.clone();
        match thread.run(move || reload(&s, settle, true)).await {
            Some(Ok(Reloaded::Unsettled)) => tokio::time::sleep(settle).await,
            Some(_) => return,
            None => {
                tracing::error!("SIGHUP reload task failed (another SIGHUP's still running?)");
                return;
            }
        }
    }
    tracing::error!(
        retries = MAX_UNSETTLED_RETRIES,
        "policy files kept changing; SIGHUP reload not applied"
    );
}

/// The reload loop's state.
struct Reloader {
    background: Background,
    /// SIGHUP's thread ([`Priority::Nice`]).
    forced: Background,
    state: actix_web::web::Data<AppState>,
    cfg: ReloadSettings,
    watch: Option<DirWatch>,
    /// The fingerprint the poll saw last (or the digest last applied).
    last_seen: String,
    /// When an unsettled reload is tried again.
    retry_at: Option<tokio::time::Instant>,
    retries: u32,
}

impl Reloader {
    /// One reload on the reload thread; `fresh` when a new trigger (not a
    /// retry) starts it, which resets the retry budget.
    async fn attempt(&mut self, force: bool, fresh: bool) {
        if fresh {
            self.retries = 0;
        }
        self.retry_at = None;
        // The watch on where the directory resolves now, before reading it.
        if let Some(w) = self.watch.as_mut() {
            w.follow();
        }
        let (state, settle) = (self.state.clone(), self.cfg.settle);
        let outcome = self
            .background
            .run(move || reload(&state, settle, force))
            .await;
        match outcome {
            Some(Ok(Reloaded::Applied(set))) => self.last_seen = set.digest().to_string(),
            Some(Ok(Reloaded::Unsettled)) if self.retries < MAX_UNSETTLED_RETRIES => {
                self.retries += 1;
                self.retry_at = Some(tokio::time::Instant::now() + settle);
            }
            Some(Ok(Reloaded::Unsettled)) => tracing::error!(
                retries = MAX_UNSETTLED_RETRIES,
                "policy files kept changing; not applied until the next change, poll or SIGHUP"
            ),
            Some(_) => {}
            None => tracing::error!("policy reload task failed"),
        }
        if let Some(w) = self.watch.as_mut() {
            w.follow();
        }
    }

    /// The poll fallback: reloads when the directory's fingerprint differs from
    /// the last one seen.
    async fn poll(&mut self) {
        let state = self.state.clone();
        let seen = self
            .background
            .run(move || state.exchange.policies.fingerprint())
            .await;
        match seen {
            Some(fp) if fp != self.last_seen => {
                self.last_seen = fp;
                self.attempt(false, true).await;
            }
            Some(_) => {}
            None => tracing::error!("policy poll task failed"),
        }
    }
}

/// A file watch on the policies directory (recursive; inotify follows a link to
/// its target when the watch is added) and on its parent (not recursive: a
/// swapped `current` link is an event there). Re-added when the directory
/// resolves elsewhere, so that the new target is watched.
struct DirWatch {
    dir: PathBuf,
    /// Where the directory resolved when watched: path, device and inode (a
    /// directory replaced by rename, or deleted and made again, keeps its path).
    root: Option<(PathBuf, u64, u64)>,
    tx: tokio::sync::mpsc::Sender<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl DirWatch {
    fn new(dir: &Path, tx: tokio::sync::mpsc::Sender<()>) -> Self {
        let mut w = Self {
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            root: None,
            tx,
            _watcher: None,
        };
        w.follow();
        w
    }

    /// Watches again when the directory now resolves to another directory:
    /// another target of a link, or another directory at the same path. Then
    /// asks for one more reload: an edit made in the new target after a read
    /// of it and before its watch existed raised no event.
    fn follow(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let root = std::fs::canonicalize(&self.dir)
            .and_then(|p| std::fs::metadata(&p).map(|m| (p, m.dev(), m.ino())))
            .ok();
        if let Some((target, ..)) = root
            .as_ref()
            .filter(|r| Some(*r) != self.root.as_ref() || self._watcher.is_none())
        {
            self._watcher = None; // drop the old watches first
            self._watcher = watch_dir(&self.dir, target, self.tx.clone());
            if self.root.is_some() && self._watcher.is_some() {
                let _ = self.tx.try_send(());
            }
            self.root = root;
        }
    }
}

/// Watches `target` (where `dir` resolves) recursively, and `dir`'s parent when
/// `dir` is itself a link (its swap is an event there).
fn watch_dir(
    dir: &Path,
    target: &Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let (this, resolved) = (dir.to_path_buf(), target.to_path_buf());
    // Links below the directory are not followed by the recursive watch (a
    // `.cache -> /` would watch a whole tree). The directory itself is watched
    // where it resolves: a watch on a link's own path sees no edits made in
    // its target.
    let config = notify::Config::default().with_follow_symlinks(false);
    let mut watcher = match notify::RecommendedWatcher::new(
        move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                let relevant = ev.kind.is_create() || ev.kind.is_modify() || ev.kind.is_remove();
                // The parent's events only when they concern the link's own name.
                if relevant
                    && ev
                        .paths
                        .iter()
                        .any(|p| p.starts_with(&resolved) || p.starts_with(&this))
                {
                    let _ = tx.try_send(());
                }
            }
        },
        config,
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the policies directory; the poll and SIGHUP still reload");
            return None;
        }
    };
    if let Err(e) = watcher.watch(target, RecursiveMode::Recursive) {
        tracing::warn!(error = %e, dir = %target.display(), "cannot watch the policies directory; the poll and SIGHUP still reload");
        return None;
    }
    // Only for a link: every write next to a plain directory (an audit file in
    // the same parent) would otherwise wake the watch.
    let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    if let Some(parent) = dir
        .parent()
        .filter(|p| is_link && !p.as_os_str().is_empty())
    {
        if let Err(e) = watcher.watch(parent, RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, dir = %parent.display(), "cannot watch the parent of the policies directory; a swapped link is seen by the poll");
        }
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::{Background, Priority};

    /// The scheduling policy of the calling thread: field 41 of
    /// `/proc/thread-self/stat` (after the name in parentheses, field 3 on).
    fn this_threads_policy() -> u32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 1..];
        after_name
            .split_whitespace()
            .nth(41 - 3)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn reload_jobs_run_under_sched_idle_and_request_threads_do_not() {
        const SCHED_OTHER: u32 = 0;
        const SCHED_IDLE: u32 = 5;
        let background = Background::start(Priority::Idle).unwrap();
        assert_eq!(background.run(this_threads_policy).await, Some(SCHED_IDLE));
        assert_eq!(this_threads_policy(), SCHED_OTHER);
        // SIGHUP's thread: the fair scheduler, a lower nice value.
        let forced = Background::start(Priority::Nice).unwrap();
        assert_eq!(forced.run(this_threads_policy).await, Some(SCHED_OTHER));
        let nice = |t: &str| -> i64 {
            let after_name = &t[t.rfind(')').unwrap() + 1..];
            after_name
                .split_whitespace()
                .nth(19 - 3)
                .unwrap()
                .parse()
                .unwrap()
        };
        let read = || std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let mine = nice(&read());
        assert_eq!(forced.run(move || nice(&read())).await, Some(mine + 5));
    }
}
