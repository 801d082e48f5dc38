//! Per-identity exchange limits: at most N exchanges per `stepUuid` and per
//! `repositoryUuid` per minute, so one runaway pipeline cannot flood Keycloak.
//! Checked after the policy allowed the exchange and before Keycloak is called.
//!
//! [`ExchangeLimiter`] is the seam for the store: [`InMemoryLimiter`]
//! (governor's GCRA, keyed) for one instance, the default; [`RedisLimiter`]
//! (GCRA in one Lua script on Redis' clock) when several replicas must share
//! the limits.

mod redis;

pub use self::redis::{
    check_url, OnStoreError, ReconnectResult, RedisLimiter, RedisSettings, StoreEvent,
    StoreEventHook, UrlKind,
};

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Per-identity exchange limits, per minute (GCRA: bursts up to the limit, then
/// one more every 60/limit seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Exchanges per `stepUuid` per minute. Defaults to 20.
    pub per_step_per_minute: std::num::NonZeroU32,
    /// Exchanges per `repositoryUuid` per minute. Defaults to 300.
    pub per_repository_per_minute: std::num::NonZeroU32,
    /// `POST /grants` requests per `stepUuid` per minute, a budget of their own
    /// (listing never uses up exchanges, nor the reverse). Defaults to 30.
    pub grants_per_step_per_minute: std::num::NonZeroU32,
}

/// Why a limiter refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The limit is reached; retry after this long.
    Exceeded(Duration),
    /// The shared store did not answer and `on_store_error = "deny"`.
    StoreUnavailable,
}

/// A rate limiter keyed by identity.
#[async_trait::async_trait]
pub trait ExchangeLimiter: Send + Sync {
    /// Counts one exchange for `key` under a limit of `per_minute`.
    ///
    /// # Errors
    /// [`Refusal`]: the limit is reached, or the store is unavailable.
    async fn check(&self, key: &str, per_minute: NonZeroU32) -> Result<(), Refusal>;

    /// Drops state of keys that are idle (bounded memory); called periodically.
    fn housekeeping(&self) {}

    /// The store's name and whether it answers now (`memory` always does).
    ///
    /// # Errors
    /// A short reason (never the store's URL or password).
    async fn health(&self) -> Result<&'static str, String> {
        Ok("memory")
    }
}

/// In-process limiter: one keyed GCRA limiter per distinct quota.
#[derive(Default)]
pub struct InMemoryLimiter {
    by_quota: Mutex<HashMap<NonZeroU32, Arc<DefaultKeyedRateLimiter<String>>>>,
}

impl InMemoryLimiter {
    fn limiter(&self, per_minute: NonZeroU32) -> Option<Arc<DefaultKeyedRateLimiter<String>>> {
        let mut map = self.by_quota.lock().ok()?;
        Some(
            map.entry(per_minute)
                .or_insert_with(|| Arc::new(RateLimiter::keyed(Quota::per_minute(per_minute))))
                .clone(),
        )
    }
}

impl InMemoryLimiter {
    /// The synchronous check ([`ExchangeLimiter::check`]).
    ///
    /// # Errors
    /// The time after which the caller may retry.
    pub fn check_now(&self, key: &str, per_minute: NonZeroU32) -> Result<(), Duration> {
        // A poisoned lock fails open for the limiter only (limits protect Keycloak's
        // capacity, not access decisions); it is logged.
        let Some(limiter) = self.limiter(per_minute) else {
            // Fail closed: the per-step limit bounds replay of a captured token.
            tracing::error!("rate limiter lock poisoned; refusing");
            return Err(Duration::from_secs(1));
        };
        limiter
            .check_key(&key.to_string())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

#[async_trait::async_trait]
impl ExchangeLimiter for InMemoryLimiter {
    async fn check(&self, key: &str, per_minute: NonZeroU32) -> Result<(), Refusal> {
        self.check_now(key, per_minute).map_err(Refusal::Exceeded)
    }

    fn housekeeping(&self) {
        if let Ok(map) = self.by_quota.lock() {
            for l in map.values() {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
    }
}
