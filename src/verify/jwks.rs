//! Issuer keys: discovery (`<issuer>/.well-known/openid-configuration`) then
//! `jwks_uri`, cached per configured issuer.
//!
//! | cache | key → value | lifetime | purpose |
//! |---|---|---|---|
//! | `fresh` (moka) | issuer → key set | `jwks.cache_ttl_seconds` | normal path; concurrent misses share one fetch |
//! | `last_good` | issuer → key set | until replaced | keeps verifying while the issuer is unreachable |
//! | `refetch_gate` (moka) | issuer → () | `jwks.refetch_interval_seconds` | an unknown `kid` refetches at most once per interval |
//! | `failure_gate` (moka) | issuer → () | `jwks.refetch_interval_seconds` | after a failed fetch, no new attempt until it expires |
//!
//! Keys are only ever fetched for issuers from configuration: callers pass a
//! [`WorkspaceSettings`], never a URL taken from a token.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use crate::configuration::{JwksSettings, WorkspaceSettings};
use crate::http::{read_capped, BodyError};

/// Most keys kept from one JWKS document.
pub const MAX_KEYS: usize = 32;

/// Why the issuer's keys could not be fetched.
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
    /// The fetch was skipped: the previous attempt failed less than one interval ago.
    #[error("previous fetch failed recently; not retrying yet")]
    Backoff,
}

/// Usable keys of one issuer, by `kid`.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<DecodingKey>>,
    without_kid: Vec<Arc<DecodingKey>>,
}

impl KeySet {
    /// The key for `kid`; with no `kid`, the only key when exactly one has no `kid`
    /// and no key has one.
    fn find(&self, kid: Option<&str>) -> Option<Arc<DecodingKey>> {
        match kid {
            Some(k) => self.by_kid.get(k).cloned(),
            None if self.by_kid.is_empty() && self.without_kid.len() == 1 => {
                self.without_kid.first().cloned()
            }
            None => None,
        }
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.without_kid.len()
    }

    /// True when no key is usable.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Outcome of a key lookup.
pub enum Lookup {
    /// The key to verify with.
    Found(Arc<DecodingKey>),
    /// No such `kid`, even after refetching the key set just now.
    Unknown,
    /// No such `kid` in the cached set, and the refetch allowance of this interval
    /// is used up: the key may be newer than the cache; retry after `retry_after`.
    Deferred {
        /// When the next refetch is allowed (at most the refetch interval).
        retry_after: std::time::Duration,
    },
}

/// Per-issuer key cache. Cheap to share behind an `Arc`.
pub struct KeyCache {
    http: reqwest::Client,
    metrics: Arc<crate::metrics::Metrics>,
    settings: JwksSettings,
    fresh: moka::future::Cache<String, Arc<KeySet>>,
    last_good: RwLock<HashMap<String, Arc<KeySet>>>,
    refetch_gate: moka::sync::Cache<String, ()>,
    failure_gate: moka::sync::Cache<String, ()>,
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
            refetch_gate: moka::sync::Cache::builder()
                .max_capacity(1024)
                .time_to_live(settings.refetch_interval)
                .build(),
            failure_gate: moka::sync::Cache::builder()
                .max_capacity(1024)
                .time_to_live(settings.refetch_interval)
                .build(),
            http,
            settings,
        }
    }

    /// Finds the key for `kid` of the workspace's issuer, fetching at most once.
    ///
    /// # Errors
    /// [`FetchError`] only when no key set was ever fetched for this issuer (an
    /// outage); with cached keys the stale set is used.
    pub async fn lookup(
        &self,
        ws: &WorkspaceSettings,
        kid: Option<&str>,
    ) -> Result<Lookup, FetchError> {
        let set = self.current(ws).await?;
        if let Some(k) = set.find(kid) {
            return Ok(Lookup::Found(k));
        }
        self.metrics
            .jwks_cache
            .with_label_values(&["unknown_kid"])
            .inc();
        // Unknown kid: at most one refetch per interval per issuer.
        let first = self
            .refetch_gate
            .entry(ws.issuer.clone())
            .or_insert_with(|| ())
            .is_fresh();
        if first {
            tracing::info!(issuer = %ws.issuer, kid = ?kid.map(|k| crate::domain::truncate(k, 64)), "unknown kid: refetching issuer keys");
            self.fresh.invalidate(&ws.issuer).await;
        }
        let set = self.current(ws).await?;
        Ok(match set.find(kid) {
            Some(k) => Lookup::Found(k),
            None if first => Lookup::Unknown,
            None => Lookup::Deferred {
                retry_after: self.settings.refetch_interval,
            },
        })
    }

    async fn current(&self, ws: &WorkspaceSettings) -> Result<Arc<KeySet>, FetchError> {
        let stale = self.stale(&ws.issuer);
        if stale.is_some() && self.failure_gate.contains_key(&ws.issuer) {
            return stale.ok_or(FetchError::Backoff);
        }
        if stale.is_none() && self.failure_gate.contains_key(&ws.issuer) {
            return Err(FetchError::Backoff);
        }
        if let Some(set) = self.fresh.get(&ws.issuer).await {
            self.metrics.jwks_cache.with_label_values(&["hit"]).inc();
            return Ok(set);
        }
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
                self.failure_gate.insert(ws.issuer.clone(), ());
                tracing::warn!(issuer = %ws.issuer, error = %crate::telemetry::chain(&*e), stale_keys = stale.is_some(), "fetching issuer keys failed");
                stale.ok_or_else(|| unshare(&e))
            }
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
            return Err(FetchError::Document {
                url: disc_url,
                reason: format!(
                    "discovery names issuer `{}`",
                    crate::domain::truncate(&disc.issuer, 200)
                ),
            });
        }
        let jwks_url = url::Url::parse(&disc.jwks_uri).map_err(|e| FetchError::Document {
            url: disc_url.clone(),
            reason: format!("jwks_uri: {e}"),
        })?;
        // jwks_uri must be https, or http on loopback when the issuer itself is plain
        // http on loopback (a local test issuer).
        let ok_scheme = crate::http::is_https_or_loopback_http(&jwks_url)
            && (jwks_url.scheme() == "https" || ws.issuer.starts_with("http://"));
        if !ok_scheme {
            return Err(FetchError::Document {
                url: disc_url,
                reason: "jwks_uri must be https".into(),
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
    match &**e {
        FetchError::Status { url, status } => FetchError::Status {
            url: url.clone(),
            status: *status,
        },
        FetchError::Backoff => FetchError::Backoff,
        other => FetchError::Document {
            url: String::new(),
            reason: crate::telemetry::chain(other),
        },
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
    let mut set = KeySet::default();
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
        let key = Arc::new(key);
        match &jwk.common.key_id {
            Some(kid) => {
                set.by_kid.insert(kid.clone(), key);
            }
            None => set.without_kid.push(key),
        }
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
        if format!("{ka:?}") != format!("{alg:?}") {
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
