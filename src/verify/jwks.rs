//! Issuer keys: discovery (`<issuer>/.well-known/openid-configuration`) then
//! `jwks_uri`, cached per configured issuer.
//!
//! | cache | key → value | lifetime | purpose |
//! |---|---|---|---|
//! | `fresh` (moka) | issuer → key set | `jwks.cache_ttl_seconds` | normal path; concurrent misses share one fetch |
//! | `last_good` | issuer → key set | until replaced | keeps verifying while the issuer is unreachable |
//! | `failure_gate` (moka) | issuer → failure meaning | `jwks.refetch_interval_seconds` | after a failed fetch, no new attempt until it expires |
//! | `refetch_locks` | issuer → mutex | process | concurrent unknown-`kid` refetches share one fetch |
//!
//! Keys are only ever fetched for issuers from configuration: callers pass a
//! [`WorkspaceSettings`], never a URL taken from a token; discovery's
//! `jwks_uri` is followed only on the issuer's own origin (scheme, host, port:
//! [`crate::http::check_followed`]), else `issuer.keys_malformed`.
//!
//! **Unknown `kid`** (RFC 8725 §3.10; Bitbucket does not document rotation). A
//! token's `kid` that the cached set lacks refetches the set, never more often
//! than once per `jwks.refetch_interval_seconds` per issuer. A request that
//! arrives inside that interval **waits** for the next refetch instead of being
//! refused, so nothing a caller sends (no signature has been checked yet) spends
//! an allowance that a genuine token signed with a new key would need: the worst a
//! flood of forged `kid`s does is one fetch per interval, and a genuine token
//! waits at most one interval. (The token's `iat` is not used to skip refetches:
//! it is unverified, so it would only hold back genuine tokens whose key was
//! published late.)
//!
//! **No `kid`**: Bitbucket's `kid` format is not publicly documented. A token
//! without `kid` is checked against every published key of the configured
//! algorithm when the issuer publishes at most [`MAX_KIDLESS_CANDIDATES`] (what
//! go-oidc, which Teleport uses against real Bitbucket tokens, does); it never
//! triggers a refetch. **Duplicate `kid`s** (two keys, same `kid` and algorithm):
//! each is tried, and a warning is logged when the set is fetched.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use super::WorkspaceSettings;
use crate::http::{check_followed, read_capped, BodyError, Meaning, PathRule};

/// Issuer key (JWKS) fetching and caching.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// How long a fetched key set is fresh. Defaults to 600 s.
    pub cache_ttl: std::time::Duration,
    /// Minimum time between refetches triggered by an unknown `kid` (a request
    /// inside it waits for the next refetch), and the back-off after a failed
    /// fetch; 1 to 60 s. Defaults to 5 s.
    pub refetch_interval: std::time::Duration,
    /// Timeout of each discovery / JWKS request. Defaults to 5 s.
    pub timeout: std::time::Duration,
    /// Largest discovery or JWKS body accepted, in bytes. Defaults to 262144.
    pub max_body_bytes: usize,
}

/// Most keys kept from one JWKS document.
pub const MAX_KEYS: usize = 32;

/// Why the issuer's keys could not be fetched. [`FetchError::meaning`] says what
/// the caller is told: transient (503 with `Retry-After`), our configuration
/// (502 `issuer.keys_misconfigured`) or a malformed answer (502
/// `issuer.keys_malformed`).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Transport error or timeout.
    #[error("request to {url} failed")]
    Transport {
        /// The URL requested.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// Non-200 answer.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The URL requested.
        url: String,
        /// HTTP status.
        status: u16,
        /// The upstream's `Retry-After`, seconds (bounded).
        retry_after: Option<u64>,
    },
    /// Body over the cap or unreadable.
    #[error("{url}: body")]
    Body {
        /// The URL requested.
        url: String,
        /// Cause.
        #[source]
        source: BodyError,
    },
    /// Not the expected JSON document.
    #[error("{url}: invalid document: {reason}")]
    Document {
        /// The URL requested.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Discovery names another issuer: the configured issuer is not this
    /// upstream's (RFC 8414 §3.3 requires them to be identical).
    #[error("{url}: discovery names issuer `{found}`")]
    WrongIssuer {
        /// The URL requested.
        url: String,
        /// The issuer the document names (truncated).
        found: String,
    },
    /// The fetch was skipped: the previous attempt failed less than one interval
    /// ago (`last` is what that failure meant).
    #[error("previous fetch failed recently; not retrying yet")]
    Backoff {
        /// Meaning of the failure that started the back-off.
        last: Meaning,
        /// Seconds until the next attempt is allowed.
        retry_after: u64,
    },
    /// A failure shared between concurrent waiters of one fetch.
    #[error("{chain}")]
    Shared {
        /// Meaning of the failure.
        meaning: Meaning,
        /// The upstream's `Retry-After`, seconds, if any.
        retry_after: Option<u64>,
        /// The original cause chain, as text.
        chain: String,
    },
}

impl FetchError {
    /// What the failure means for the caller.
    pub fn meaning(&self) -> Meaning {
        match self {
            Self::Transport { .. } => Meaning::Transient,
            Self::Status { status, .. } => crate::http::status_meaning(*status),
            Self::Body {
                source: BodyError::Read(_),
                ..
            } => Meaning::Transient,
            Self::Body { .. } | Self::Document { .. } => Meaning::Malformed,
            Self::WrongIssuer { .. } => Meaning::Configuration,
            Self::Backoff { last, .. } => *last,
            Self::Shared { meaning, .. } => *meaning,
        }
    }

    /// Seconds the caller should wait before retrying, for transient failures.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Status { retry_after, .. } | Self::Shared { retry_after, .. } => *retry_after,
            Self::Backoff { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// A token without `kid` is tried against at most this many keys; an issuer
/// publishing more is answered `token.unknown_key` for kid-less tokens.
pub const MAX_KIDLESS_CANDIDATES: usize = 4;

/// Usable keys of one issuer, with their `kid`s, and when they were fetched.
pub struct KeySet {
    keys: Vec<(Option<String>, Arc<DecodingKey>)>,
    /// Seconds since the epoch when this set was fetched.
    fetched_at: u64,
}

impl KeySet {
    /// The keys to try for `kid`: every key with that `kid` (duplicates included);
    /// with no `kid`, every key when there are at most [`MAX_KIDLESS_CANDIDATES`].
    pub fn candidates(&self, kid: Option<&str>) -> Vec<Arc<DecodingKey>> {
        match kid {
            Some(k) => self
                .keys
                .iter()
                .filter(|(kk, _)| kk.as_deref() == Some(k))
                .map(|(_, key)| key.clone())
                .collect(),
            None if self.keys.len() <= MAX_KIDLESS_CANDIDATES => {
                self.keys.iter().map(|(_, key)| key.clone()).collect()
            }
            None => Vec::new(),
        }
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is usable.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Outcome of a key lookup.
pub enum Lookup {
    /// The keys to try, in order (more than one only for duplicate or absent `kid`).
    Found(Vec<Arc<DecodingKey>>),
    /// No such key, even in a set fetched after the request arrived (or no `kid`).
    Unknown,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Per-issuer key cache. Cheap to share behind an `Arc`.
pub struct KeyCache {
    http: reqwest::Client,
    metrics: Arc<crate::metrics::Metrics>,
    settings: JwksSettings,
    fresh: moka::future::Cache<String, Arc<KeySet>>,
    last_good: RwLock<HashMap<String, Arc<KeySet>>>,
    refetch_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    failure_gate: moka::sync::Cache<String, Meaning>,
}

impl KeyCache {
    /// Creates an empty cache.
    pub fn new(
        http: reqwest::Client,
        settings: JwksSettings,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            metrics,
            fresh: moka::future::Cache::builder()
                .max_capacity(1024)
                .time_to_live(settings.cache_ttl)
                .build(),
            last_good: RwLock::new(HashMap::new()),
            refetch_locks: std::sync::Mutex::new(HashMap::new()),
            failure_gate: moka::sync::Cache::builder()
                .max_capacity(1024)
                .time_to_live(settings.refetch_interval)
                .build(),
            http,
            settings,
        }
    }

    /// The keys to try for `kid` of the workspace's issuer (see the module docs
    /// for when an unknown `kid` refetches).
    ///
    /// # Errors
    /// [`FetchError`] when no key set was ever fetched for this issuer (an
    /// outage), or when a refetch needed for an unknown `kid` failed.
    pub async fn lookup(
        &self,
        ws: &WorkspaceSettings,
        kid: Option<&str>,
    ) -> Result<Lookup, FetchError> {
        let set = self.current(ws).await?;
        let found = set.candidates(kid);
        if !found.is_empty() {
            return Ok(Lookup::Found(found));
        }
        self.metrics
            .jwks_cache
            .with_label_values(&["unknown_kid"])
            .inc();
        if kid.is_none() {
            return Ok(Lookup::Unknown);
        }
        let set = self.refetch_after(ws, set.fetched_at).await?;
        let found = set.candidates(kid);
        Ok(if found.is_empty() {
            Lookup::Unknown
        } else {
            Lookup::Found(found)
        })
    }

    /// A key set fetched after `seen_at`: waits until `seen_at + refetch_interval`
    /// when that is still ahead, then fetches once for all waiters (a waiter that
    /// finds a newer set than `seen_at` uses it).
    async fn refetch_after(
        &self,
        ws: &WorkspaceSettings,
        seen_at: u64,
    ) -> Result<Arc<KeySet>, FetchError> {
        let lock = match self.refetch_locks.lock() {
            Ok(mut m) => m.entry(ws.issuer.clone()).or_default().clone(),
            Err(_) => return Err(self.backoff(Meaning::Transient)),
        };
        let _guard = lock.lock().await;
        if let Some(newer) = self.stale(&ws.issuer).filter(|s| s.fetched_at > seen_at) {
            return Ok(newer);
        }
        let interval = self.settings.refetch_interval.as_secs();
        let allowed_at = seen_at.saturating_add(interval);
        let now = now_secs();
        if allowed_at > now {
            tokio::time::sleep(std::time::Duration::from_secs(
                (allowed_at - now).min(interval),
            ))
            .await;
        }
        if let Some(last) = self.failure_gate.get(&ws.issuer) {
            return Err(self.backoff(last));
        }
        tracing::info!(issuer = %ws.issuer, "unknown kid: refetching issuer keys");
        match self.fetch(ws).await {
            Ok(set) => {
                self.fresh.insert(ws.issuer.clone(), set.clone()).await;
                Ok(set)
            }
            Err(e) => {
                self.failure_gate.insert(ws.issuer.clone(), e.meaning());
                tracing::warn!(issuer = %ws.issuer, error = %crate::telemetry::chain(&e), "refetching issuer keys failed");
                Err(e)
            }
        }
    }

    async fn current(&self, ws: &WorkspaceSettings) -> Result<Arc<KeySet>, FetchError> {
        if let Some(last) = self.failure_gate.get(&ws.issuer) {
            return self.stale(&ws.issuer).ok_or_else(|| self.backoff(last));
        }
        if let Some(set) = self.fresh.get(&ws.issuer).await {
            self.metrics.jwks_cache_hit();
            return Ok(set);
        }
        let stale = self.stale(&ws.issuer);
        let result = self
            .fresh
            .try_get_with(ws.issuer.clone(), self.fetch(ws))
            .await;
        match result {
            Ok(set) => {
                self.metrics.jwks_cache.with_label_values(&["miss"]).inc();
                Ok(set)
            }
            Err(e) => {
                self.metrics.jwks_cache.with_label_values(&["stale"]).inc();
                self.failure_gate.insert(ws.issuer.clone(), e.meaning());
                tracing::warn!(issuer = %ws.issuer, error = %crate::telemetry::chain(&*e), stale_keys = stale.is_some(), "fetching issuer keys failed");
                stale.ok_or_else(|| unshare(&e))
            }
        }
    }

    fn backoff(&self, last: Meaning) -> FetchError {
        FetchError::Backoff {
            last,
            retry_after: self.settings.refetch_interval.as_secs().max(1),
        }
    }

    fn stale(&self, issuer: &str) -> Option<Arc<KeySet>> {
        self.last_good
            .read()
            .ok()
            .and_then(|m| m.get(issuer).cloned())
    }

    async fn fetch(&self, ws: &WorkspaceSettings) -> Result<Arc<KeySet>, FetchError> {
        let result = self.fetch_uncounted(ws).await;
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .jwks_fetches
            .with_label_values(&[ws.issuer.as_str(), label])
            .inc();
        result
    }

    async fn fetch_uncounted(&self, ws: &WorkspaceSettings) -> Result<Arc<KeySet>, FetchError> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let disc_url = format!("{}/.well-known/openid-configuration", ws.issuer);
        let body = self.get(&disc_url).await?;
        let disc: Discovery = serde_json::from_slice(&body).map_err(|e| FetchError::Document {
            url: disc_url.clone(),
            reason: e.to_string(),
        })?;
        if disc.issuer != ws.issuer {
            return Err(FetchError::WrongIssuer {
                url: disc_url,
                found: crate::domain::truncate(&disc.issuer, 200),
            });
        }
        let jwks_url = url::Url::parse(&disc.jwks_uri).map_err(|e| FetchError::Document {
            url: disc_url.clone(),
            reason: format!("jwks_uri: {e}"),
        })?;
        // jwks_uri must share the issuer's origin (so plain http only where the
        // issuer itself is plain http on loopback: a local test issuer).
        let same_origin = url::Url::parse(&ws.issuer)
            .map_err(|_| "the issuer is not a URL")
            .and_then(|iss| check_followed(&jwks_url, &iss, PathRule::AnyPath));
        if let Err(why) = same_origin {
            return Err(FetchError::Document {
                url: disc_url,
                reason: format!("jwks_uri is not on the issuer's origin: {why}"),
            });
        }
        let body = self.get(jwks_url.as_str()).await?;
        let set = parse_jwks(&body, ws.algorithm).map_err(|reason| FetchError::Document {
            url: jwks_url.to_string(),
            reason,
        })?;
        let set = Arc::new(set);
        tracing::info!(issuer = %ws.issuer, keys = set.len(), "fetched issuer keys");
        if let Ok(mut m) = self.last_good.write() {
            m.insert(ws.issuer.clone(), set.clone());
        }
        Ok(set)
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let resp = self
            .http
            .get(url)
            .timeout(self.settings.timeout)
            .send()
            .await
            .map_err(|source| FetchError::Transport {
                url: url.to_string(),
                source,
            })?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: resp.status().as_u16(),
                // The issuer's own Retry-After (at most 60 s), else our back-off.
                retry_after: crate::http::retry_after_seconds(
                    resp.headers(),
                    std::time::Duration::from_secs(60),
                )
                .or(Some(self.settings.refetch_interval.as_secs().max(1))),
            });
        }
        read_capped(resp, self.settings.max_body_bytes)
            .await
            .map_err(|source| FetchError::Body {
                url: url.to_string(),
                source,
            })
    }
}

/// moka shares one error between waiters; rebuild an owned one for the caller.
fn unshare(e: &Arc<FetchError>) -> FetchError {
    FetchError::Shared {
        meaning: e.meaning(),
        retry_after: e.retry_after(),
        chain: crate::telemetry::chain(&**e),
    }
}

/// Parses a JWKS document, keeping only keys usable for `alg`: `use` absent or
/// `sig`, `alg` absent or equal, key type matching the algorithm family.
///
/// # Errors
/// A reason when the document is not a JWKS or holds no usable key.
pub fn parse_jwks(body: &[u8], alg: Algorithm) -> Result<KeySet, String> {
    #[derive(Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut set = KeySet {
        keys: Vec::new(),
        fetched_at: now_secs(),
    };
    for raw in doc.keys.into_iter().take(MAX_KEYS) {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
            continue;
        };
        if !key_fits(&jwk, alg) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let kid = jwk.common.key_id.clone();
        if let Some(k) = &kid {
            if set
                .keys
                .iter()
                .any(|(other, _)| other.as_deref() == Some(k))
            {
                tracing::warn!(kid = %crate::domain::truncate(k, 64), "the issuer publishes several keys with this kid; each is tried");
            }
        }
        set.keys.push((kid, Arc::new(key)));
    }
    if set.is_empty() {
        return Err(format!("no usable {alg:?} key"));
    }
    Ok(set)
}

fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return false;
    }
    if let Some(ka) = &jwk.common.key_algorithm {
        if jsonwebtoken::jwk::KeyAlgorithm::from(alg) != *ka {
            return false;
        }
    }
    match (&jwk.algorithm, alg) {
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256,
        ) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => {
            p.curve == jsonwebtoken::jwk::EllipticCurve::P256
        }
        _ => false,
    }
}
