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

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
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
    /// (redacted in `Debug`; never logged).
    pub url: SecretToken,
    /// Longest wait for one answer (and for connecting), milliseconds.
    pub timeout: Duration,
    /// What to do when Redis does not answer.
    pub on_store_error: OnStoreError,
    /// Prefix of every key (default `kcs`): several services can share a Redis.
    pub key_prefix: String,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &"[redacted]")
            .field("timeout", &self.timeout)
            .field("on_store_error", &self.on_store_error)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// Counts of store errors, for the metrics (`sts_limit_store_errors_total`).
pub type StoreErrorHook = Arc<dyn Fn(OnStoreError) + Send + Sync>;

/// The shared limiter.
pub struct RedisLimiter {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    script: redis::Script,
    settings: RedisSettings,
    local: InMemoryLimiter,
    on_error: StoreErrorHook,
}

impl RedisLimiter {
    /// A limiter on the Redis at `settings.url`; it connects on first use (a
    /// Redis that is down at startup is a store error, not a startup failure).
    ///
    /// # Errors
    /// The URL is not a Redis URL (the message does not repeat it).
    pub fn new(settings: RedisSettings, on_error: StoreErrorHook) -> Result<Self, String> {
        let client = redis::Client::open(settings.url.expose()).map_err(|e| {
            format!(
                "limits.redis url: not a redis:// or rediss:// URL ({:?})",
                e.kind()
            )
        })?;
        Ok(Self {
            client,
            conn: tokio::sync::Mutex::new(None),
            script: redis::Script::new(GCRA),
            settings,
            local: InMemoryLimiter::default(),
            on_error,
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.timeout))
            .set_response_timeout(Some(self.settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let c = self
            .client
            .get_connection_manager_with_config(config)
            .await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn gcra(&self, key: &str, per_minute: NonZeroU32) -> Result<u64, String> {
        let interval = 60_000_000 / u64::from(per_minute.get());
        let tolerance = interval * u64::from(per_minute.get());
        let run = async {
            let mut conn = self.connection().await?;
            self.script
                .key(format!(
                    "{}:{{{key}}}:{per_minute}",
                    self.settings.key_prefix
                ))
                .arg(interval)
                .arg(tolerance)
                .invoke_async::<u64>(&mut conn)
                .await
        };
        match tokio::time::timeout(self.settings.timeout, run).await {
            Ok(Ok(wait)) => Ok(wait),
            Ok(Err(e)) => Err(format!("{:?}", e.kind())),
            Err(_) => Err("timed out".into()),
        }
    }
}

#[async_trait::async_trait]
impl ExchangeLimiter for RedisLimiter {
    async fn check(&self, key: &str, per_minute: NonZeroU32) -> Result<(), Refusal> {
        match self.gcra(key, per_minute).await {
            Ok(0) => Ok(()),
            Ok(wait_us) => Err(Refusal::Exceeded(Duration::from_micros(wait_us))),
            Err(reason) => {
                (self.on_error)(self.settings.on_store_error);
                tracing::warn!(error = %reason, on_store_error = ?self.settings.on_store_error, "limit store (Redis) unavailable");
                match self.settings.on_store_error {
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
        let ping = async {
            let mut conn = self.connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match tokio::time::timeout(self.settings.timeout, ping).await {
            Ok(Ok(_)) => Ok("redis"),
            Ok(Err(e)) => Err(format!("redis: {:?}", e.kind())),
            Err(_) => Err("redis: timed out".into()),
        }
    }
}
