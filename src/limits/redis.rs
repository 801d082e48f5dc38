//! Limits shared by several replicas, in Redis: GCRA (the algorithm of the
//! in-memory limiter) run by one Lua script in one round trip, on Redis' own
//! clock (`TIME`, so Redis 5 or newer), so the replicas' clocks do not matter.
//! Each key expires by itself when its bucket is full again. One Redis node (or
//! a primary with failover in front); keys carry a hash tag (`{…}`) so that a
//! cluster client could keep each script's single key in one slot, but the
//! client here is not a Redis Cluster client.
//!
//! When Redis does not answer within the timeout, `on_store_error` decides:
//! `deny` (refuse: 503 `limit.store_unavailable`), or `local` (this replica's
//! in-memory limiter: the limit then holds per replica, not across them). Never
//! "no limit": the per-step limit bounds replay of a captured token.
//!
//! The connection is a value that can only be replaced, never repaired: any
//! answer other than a well-formed script answer (a server error such as
//! WRONGPASS, NOAUTH, READONLY, MASTERDOWN or LOADING, a protocol error, a
//! dropped connection, a timeout) drops it, and the next request after a
//! bounded, jittered backoff builds a new one in a task of its own: the URL
//! re-read from `url_file` (never logged), checked as at startup, connected.
//! Requests never wait longer than `timeout_ms`; during the backoff they fail
//! at once, per `on_store_error`.

use std::future::Future;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use super::{ExchangeLimiter, InMemoryLimiter, Refusal};
use crate::domain::SecretToken;

/// GCRA: `KEYS[1]` the bucket, `ARGV[1]` the emission interval and `ARGV[2]`
/// the burst tolerance (both microseconds). Returns 0 when admitted, else the
/// microseconds until the next admission. The key holds the theoretical
/// arrival time and expires when it is in the past.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return allow_at - now
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return 0
";

/// What to do when Redis does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Refuse the request (503 `limit.store_unavailable`, `Retry-After`).
    Deny,
    /// Use this replica's in-memory limiter until Redis answers again.
    Local,
}

/// Settings of the Redis store (`[limits.redis]`).
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL, with an ACL user and password if any
    /// (redacted in `Debug`; never logged), as read at startup.
    pub url: SecretToken,
    /// `url_file` (resolved): re-read at every reconnection. `None` with
    /// `url_env`, whose value cannot change in a running process.
    pub url_file: Option<PathBuf>,
    /// Longest wait for one answer (and for connecting), milliseconds.
    pub timeout: Duration,
    /// First wait before reconnecting; it doubles up to `reconnect_max`, each
    /// wait plus a random jitter of up to as much again.
    pub reconnect_min: Duration,
    /// Longest wait before reconnecting (before jitter).
    pub reconnect_max: Duration,
    /// What to do when Redis does not answer.
    pub on_store_error: OnStoreError,
    /// Prefix of every key (default `kcs`): several services can share a Redis.
    pub key_prefix: String,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &"[redacted]")
            .field("url_file", &self.url_file)
            .field("timeout", &self.timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("on_store_error", &self.on_store_error)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// What a Redis URL is, by the checks of startup and of every reconnection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlKind {
    /// `rediss://`, or `redis://` to a loopback host.
    Protected,
    /// A plain `redis://` URL to a host other than loopback: the password and
    /// the counts travel in clear (a warning at startup).
    ClearTextRemote,
}

/// Checks a Redis URL (startup and every reconnection).
///
/// # Errors
/// Neither `redis://` nor `rediss://` (the message does not repeat the URL).
pub fn check_url(url: &str) -> Result<UrlKind, &'static str> {
    match url::Url::parse(url) {
        Ok(u) if u.scheme() == "rediss" => Ok(UrlKind::Protected),
        Ok(u) if u.scheme() == "redis" => {
            // redis: is not a special scheme: its host is an opaque string.
            let host = u.host_str().unwrap_or_default();
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            Ok(if loopback {
                UrlKind::Protected
            } else {
                UrlKind::ClearTextRemote
            })
        }
        _ => Err("the URL must be redis:// or rediss:// (not repeated here)"),
    }
}

/// What the limiter reports, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreEvent {
    /// A request Redis could not count, and what happened instead
    /// (`sts_limit_store_errors_total`).
    Error(OnStoreError),
    /// A connection attempt and its result (`sts_limit_store_reconnects_total`).
    Reconnect(ReconnectResult),
}

/// The result of one connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconnectResult {
    /// Connected (and authenticated).
    Ok,
    /// Redis refused or did not answer in time.
    Error,
    /// The URL from `url_file` was unreadable or failed the checks: not tried.
    Refused,
}

impl ReconnectResult {
    /// The metric label: `ok`, `error`, `refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Refused => "refused",
        }
    }
}

/// Receives the limiter's [`StoreEvent`]s (the metrics).
pub type StoreEventHook = Arc<dyn Fn(StoreEvent) + Send + Sync>;

/// Longest `url_file` read (a URL, with user and password).
const MAX_URL_BYTES: u64 = 4096;

/// The shared limiter.
pub struct RedisLimiter {
    link: Arc<Link>,
    script: redis::Script,
    local: InMemoryLimiter,
}

/// The connection and what rebuilds it (shared with the task that connects).
struct Link {
    state: Mutex<LinkState>,
    /// Woken when a connection attempt ends.
    settled: tokio::sync::Notify,
    /// True once a backoff delay was taken since the last good answer.
    backed_off: AtomicBool,
    /// The startup URL was a plain `redis://` to a remote host (accepted
    /// with a warning then): a rotated URL may be one too, else not.
    clear_text_accepted: bool,
    settings: RedisSettings,
    hook: StoreEventHook,
}

struct LinkState {
    /// The connection and its generation (an error drops only the one it
    /// happened on).
    conn: Option<(u64, MultiplexedConnection)>,
    generation: u64,
    connecting: bool,
    /// No connection attempt before this instant.
    not_before: Option<Instant>,
    backoff: ExponentialBackoff,
}

/// What a request finds.
enum Found {
    Connection(u64, MultiplexedConnection),
    /// An attempt is under way: wait for it.
    Connecting,
    /// This request starts the attempt.
    Connect,
    /// In the backoff after an error: fail now.
    BackingOff,
}

/// Why a connection attempt failed (short, never the URL).
struct Failure(ReconnectResult, String);

impl RedisLimiter {
    /// A limiter on the Redis at `settings.url`; it connects on first use (a
    /// Redis that is down at startup is a store error, not a startup failure).
    ///
    /// # Errors
    /// The URL is not a Redis URL (the message does not repeat it).
    pub fn new(settings: RedisSettings, hook: StoreEventHook) -> Result<Self, String> {
        let kind = check_url(settings.url.expose()).map_err(|e| format!("limits.redis: {e}"))?;
        redis::Client::open(settings.url.expose()).map_err(|e| {
            format!(
                "limits.redis url: not a redis:// or rediss:// URL ({:?})",
                e.kind()
            )
        })?;
        let backoff = backoff(&settings);
        Ok(Self {
            link: Arc::new(Link {
                state: Mutex::new(LinkState {
                    conn: None,
                    generation: 0,
                    connecting: false,
                    not_before: None,
                    backoff,
                }),
                settled: tokio::sync::Notify::new(),
                backed_off: AtomicBool::new(false),
                clear_text_accepted: kind == UrlKind::ClearTextRemote,
                settings,
                hook,
            }),
            script: redis::Script::new(GCRA),
            local: InMemoryLimiter::default(),
        })
    }

    /// Runs `op` on the connection, within `timeout_ms` in all (waiting for a
    /// connection included). Any error drops the connection it ran on.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, String>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.link.settings.timeout;
        let (generation, conn) = tokio::time::timeout_at(deadline, self.link.connection())
            .await
            .map_err(|_| "timed out connecting".to_string())??;
        let reason = match tokio::time::timeout_at(deadline, op(conn)).await {
            Ok(Ok(value)) => {
                self.link.answered();
                return Ok(value);
            }
            Ok(Err(e)) => format!("{:?}", e.kind()),
            Err(_) => "timed out".to_string(),
        };
        self.link.drop_connection(generation, &reason);
        Err(reason)
    }

    async fn gcra(&self, key: &str, per_minute: NonZeroU32) -> Result<u64, String> {
        let interval = 60_000_000 / u64::from(per_minute.get());
        let tolerance = interval * u64::from(per_minute.get());
        let mut invocation = self.script.key(format!(
            "{}:{{{key}}}:{per_minute}",
            self.link.settings.key_prefix
        ));
        invocation.arg(interval).arg(tolerance);
        self.run(|mut conn| async move { invocation.invoke_async::<u64>(&mut conn).await })
            .await
    }
}

fn backoff(settings: &RedisSettings) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(settings.reconnect_min)
        .with_max_delay(settings.reconnect_max)
        .with_jitter()
        .without_max_times()
        .build()
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Nothing panics while holding it; if it ever did, the state is still
        // one of the documented ones.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection, or an attempt to build one (waited for: the caller
    /// bounds the wait), or an error during the backoff.
    async fn connection(self: &Arc<Self>) -> Result<(u64, MultiplexedConnection), String> {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            match self.find() {
                Found::Connection(generation, conn) => return Ok((generation, conn)),
                Found::BackingOff => return Err("waiting to reconnect".into()),
                Found::Connecting => {}
                Found::Connect => {
                    // A task of its own: a request that gives up does not
                    // abandon the attempt.
                    let link = self.clone();
                    tokio::spawn(async move { link.connect().await });
                }
            }
            settled.await;
        }
    }

    fn find(&self) -> Found {
        let mut state = self.lock();
        if let Some((generation, conn)) = &state.conn {
            return Found::Connection(*generation, conn.clone());
        }
        if state.connecting {
            return Found::Connecting;
        }
        if state.not_before.is_some_and(|t| Instant::now() < t) {
            return Found::BackingOff;
        }
        state.connecting = true;
        Found::Connect
    }

    /// One connection attempt, bounded by `timeout_ms`; its result settles
    /// the state and wakes the waiting requests.
    async fn connect(&self) {
        let attempt = tokio::time::timeout(self.settings.timeout, self.open()).await;
        let result = attempt.unwrap_or_else(|_| {
            Err(Failure(
                ReconnectResult::Error,
                "timed out connecting".into(),
            ))
        });
        let outcome = match &result {
            Ok(_) => ReconnectResult::Ok,
            Err(Failure(r, _)) => *r,
        };
        {
            let mut state = self.lock();
            state.connecting = false;
            match result {
                Ok(conn) => {
                    state.generation += 1;
                    state.conn = Some((state.generation, conn));
                    state.not_before = None;
                    tracing::info!("limit store (Redis) connected");
                }
                Err(Failure(_, reason)) => {
                    let wait = self.next_wait(&mut state);
                    tracing::warn!(error = %reason, retry_in_ms = wait.as_millis(), "limit store (Redis): cannot connect");
                }
            }
        }
        (self.hook)(StoreEvent::Reconnect(outcome));
        self.settled.notify_waiters();
    }

    /// The URL (re-read from `url_file`), checked as at startup, connected.
    async fn open(&self) -> Result<MultiplexedConnection, Failure> {
        let refused = |reason: String| Failure(ReconnectResult::Refused, reason);
        let url = match &self.settings.url_file {
            Some(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_url_file(&path))
                    .await
                    .map_err(|_| refused("url_file: the read did not finish".into()))?
                    .map_err(refused)?
            }
            None => self.settings.url.clone(),
        };
        match check_url(url.expose()).map_err(|e| refused(e.into()))? {
            UrlKind::ClearTextRemote if !self.clear_text_accepted => {
                return Err(refused(
                    "a plain redis:// URL to a host other than loopback, where the URL at \
                     startup was not one: use rediss://"
                        .into(),
                ));
            }
            _ => {}
        }
        let client = redis::Client::open(url.expose())
            .map_err(|e| refused(format!("not a Redis URL ({:?})", e.kind())))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.timeout))
            .set_response_timeout(Some(self.settings.timeout));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Failure(ReconnectResult::Error, format!("{:?}", e.kind())))
    }

    /// Drops connection `generation` (if still the current one) after an
    /// error on it; the next attempt waits for the backoff.
    fn drop_connection(&self, generation: u64, reason: &str) {
        let mut state = self.lock();
        if state.conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            state.conn = None;
            let wait = self.next_wait(&mut state);
            tracing::warn!(error = %reason, retry_in_ms = wait.as_millis(), "limit store (Redis): connection dropped after an error; reconnecting");
        }
    }

    fn next_wait(&self, state: &mut LinkState) -> Duration {
        let wait = state.backoff.next().unwrap_or(self.settings.reconnect_max);
        state.not_before = Some(Instant::now() + wait);
        self.backed_off.store(true, Ordering::Relaxed);
        wait
    }

    /// A well-formed answer: the backoff starts from its minimum again.
    fn answered(&self) {
        if self.backed_off.swap(false, Ordering::Relaxed) {
            self.lock().backoff = backoff(&self.settings);
        }
    }
}

/// Reads the URL from `url_file`: without blocking on a FIFO, a regular file
/// only, at most [`MAX_URL_BYTES`], one line (a final newline is dropped).
///
/// # Errors
/// A short reason (the path, never the content).
fn read_url_file(path: &Path) -> Result<SecretToken, String> {
    let text = crate::domain::regular_file::read_small_file(path, MAX_URL_BYTES)
        .map_err(|e| format!("url_file {}: {e}", path.display()))?;
    let url = text.trim_end_matches(['\r', '\n']);
    if url.is_empty() {
        return Err(format!("url_file {}: empty", path.display()));
    }
    Ok(SecretToken::new(url))
}

#[async_trait::async_trait]
impl ExchangeLimiter for RedisLimiter {
    async fn check(&self, key: &str, per_minute: NonZeroU32) -> Result<(), Refusal> {
        match self.gcra(key, per_minute).await {
            Ok(0) => Ok(()),
            Ok(wait_us) => Err(Refusal::Exceeded(Duration::from_micros(wait_us))),
            Err(reason) => {
                let on_store_error = self.link.settings.on_store_error;
                (self.link.hook)(StoreEvent::Error(on_store_error));
                tracing::warn!(error = %reason, ?on_store_error, "limit store (Redis) unavailable");
                match on_store_error {
                    OnStoreError::Deny => Err(Refusal::StoreUnavailable),
                    OnStoreError::Local => self
                        .local
                        .check_now(key, per_minute)
                        .map_err(Refusal::Exceeded),
                }
            }
        }
    }

    fn housekeeping(&self) {
        self.local.housekeeping();
    }

    async fn health(&self) -> Result<&'static str, String> {
        self.run(
            |mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await },
        )
        .await
        .map(|_| "redis")
        .map_err(|reason| format!("redis: {reason}"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    fn settings(url: &str, url_file: Option<PathBuf>) -> RedisSettings {
        RedisSettings {
            url: SecretToken::new(url),
            url_file,
            timeout: Duration::from_millis(200),
            // Long: the test's second probe must fall into the backoff.
            reconnect_min: Duration::from_secs(30),
            reconnect_max: Duration::from_secs(60),
            on_store_error: OnStoreError::Deny,
            key_prefix: "kcs".into(),
        }
    }

    #[test]
    fn urls_are_checked_as_at_startup() {
        assert_eq!(
            check_url("rediss://u:p@redis.example:6380/0"),
            Ok(UrlKind::Protected)
        );
        assert_eq!(
            check_url("redis://127.0.0.1:6379/0"),
            Ok(UrlKind::Protected)
        );
        assert_eq!(check_url("redis://[::1]:6379/0"), Ok(UrlKind::Protected));
        assert_eq!(
            check_url("redis://:p@redis.example:6379/0"),
            Ok(UrlKind::ClearTextRemote)
        );
        let refused = check_url("http://:secret-pw@redis.example/").unwrap_err();
        assert!(!refused.contains("secret-pw"));
    }

    #[test]
    fn the_url_file_is_read_bounded_and_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "redis://:pw@127.0.0.1:6379/0\n").unwrap();
        assert_eq!(
            read_url_file(&file).unwrap().expose(),
            "redis://:pw@127.0.0.1:6379/0"
        );
        std::fs::write(&file, "x".repeat(5000)).unwrap();
        assert!(read_url_file(&file).unwrap_err().contains("larger than"));
        std::fs::write(&file, "\n").unwrap();
        assert!(read_url_file(&file).unwrap_err().contains("empty"));
        // A FIFO without a writer: refused at once, never a blocked open.
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(read_url_file(&fifo)
            .unwrap_err()
            .contains("not a regular file"));
    }

    #[tokio::test]
    async fn a_rotated_url_never_downgrades_to_clear_text() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "redis://:new-pw@redis.example:6379/0\n").unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let hook: StoreEventHook = Arc::new(move |e| seen.lock().unwrap().push(e));
        let limiter =
            RedisLimiter::new(settings("redis://:old-pw@127.0.0.1:1/0", Some(file)), hook).unwrap();
        let reason = limiter.health().await.unwrap_err();
        assert!(!reason.contains("pw"), "{reason}");
        assert_eq!(
            events.lock().unwrap().as_slice(),
            [StoreEvent::Reconnect(ReconnectResult::Refused)]
        );
        // In the backoff now: no new attempt, an answer at once.
        assert_eq!(
            limiter.health().await.unwrap_err(),
            "redis: waiting to reconnect"
        );
        assert_eq!(events.lock().unwrap().len(), 1);
    }
}
