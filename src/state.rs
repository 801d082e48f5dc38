//! Application state shared by every worker, below `api` and `reload` (both
//! import it; it imports neither).

use std::sync::Arc;

use crate::exchange::Exchange;
use crate::metrics::Metrics;
use crate::signing::SigningKeys;

/// Shared state of all workers.
pub struct AppState {
    /// The token exchange (verifier, policies, Keycloak, limits, audit).
    pub exchange: Exchange,
    /// Our signing keys (published at `/.well-known/jwks.json`).
    pub signing: Option<Arc<SigningKeys>>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Largest `/token` body, bytes (`max_token_bytes` + 4096).
    pub max_body_bytes: usize,
    /// Longest wait for a request body once its headers arrived (`body_timeout_ms`).
    pub body_timeout: std::time::Duration,
}
