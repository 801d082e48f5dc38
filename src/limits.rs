//! Per-identity exchange limits: at most N exchanges per `stepUuid` and per
//! `repositoryUuid` per minute, so one runaway pipeline cannot flood Keycloak.
//! Checked after the policy allowed the exchange and before Keycloak is called.
//!
//! [`ExchangeLimiter`] is the seam for a shared store (e.g. Redis) when several
//! instances run; [`InMemoryLimiter`] (governor's GCRA, keyed) is the default.

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

/// A rate limiter keyed by identity.
pub trait ExchangeLimiter: Send + Sync {
    /// Counts one exchange for `key` under a limit of `per_minute`.
    ///
    /// # Errors
    /// The time after which the caller may retry, when the limit is reached.
    fn check(&self, key: &str, per_minute: NonZeroU32) -> Result<(), Duration>;

    /// Drops state of keys that are idle (bounded memory); called periodically.
    fn housekeeping(&self) {}
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

impl ExchangeLimiter for InMemoryLimiter {
    fn check(&self, key: &str, per_minute: NonZeroU32) -> Result<(), Duration> {
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

    fn housekeeping(&self) {
        if let Ok(map) = self.by_quota.lock() {
            for l in map.values() {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
    }
}
