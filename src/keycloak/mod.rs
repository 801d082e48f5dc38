//! Keycloak: the `client_credentials` grant (RFC 6749 §4.4) as the policy's
//! client, authenticated by `private_key_jwt` (RFC 7523 §2.2; Keycloak "Signed JWT",
//! `client-jwt`) or `client_secret_basic` (RFC 6749 §2.3.1; Keycloak "Client Id and
//! Secret"). The token endpoint and realm issuer come from the realm's discovery
//! document (`<base>/realms/<realm>/.well-known/openid-configuration`), cached.
//!
//! No extension or preview feature is used. Every call has a timeout, redirects
//! are off and bodies are size-capped. Keycloak's answers are reduced to
//! [`KeycloakError`] variants; their bodies are logged only as an error code.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::domain::error_code::error_codes;
use crate::domain::{Scopes, SecretToken};
use crate::http::{check_followed, read_capped, BodyError, Meaning, PathRule};
use crate::signing::SigningKeys;

mod identity;
pub use identity::{
    AssertionClaims as IdentityAssertionClaims, GrantMode, IdentityRefusal, IdentitySettings,
    IdentitySigner, LocalSigner, SignError, IDENTITY_JWKS_PATH,
};

/// `grant_type` of the JWT Authorization Grant (RFC 7523 §2.1).
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Keycloak connection settings.
#[derive(Debug)]
pub struct KeycloakSettings {
    /// Base URL, e.g. `https://sso.example.com` (no `/realms/...`).
    pub base_url: url::Url,
    /// Realm name.
    pub realm: String,
    /// TCP connect timeout. Defaults to 2 s.
    pub connect_timeout: Duration,
    /// Whole-request timeout for discovery and token calls. Defaults to 10 s.
    pub timeout: Duration,
    /// Largest Keycloak response body accepted, in bytes. Defaults to 65536.
    pub max_response_bytes: usize,
    /// Lifetime of `private_key_jwt` assertions; at most 60 s (Keycloak's default
    /// `token.endpoint.auth.signing.max.exp`). Defaults to 60 s.
    pub assertion_lifetime: Duration,
    /// Upper bound on a `Retry-After` passed on from Keycloak (429/503), 1 to 3600 s.
    /// Defaults to 60 s.
    pub max_retry_after: Duration,
    /// How the service authenticates as each Keycloak client, by `clientId`.
    pub clients: std::collections::BTreeMap<String, ClientAuth>,
    /// The grant used with each client (`client_credentials` when absent).
    pub grant_modes: std::collections::BTreeMap<String, GrantMode>,
    /// `[identity]`: needed when a client uses the JWT Authorization Grant.
    pub identity: Option<IdentitySettings>,
}

impl KeycloakSettings {
    /// The grant used with `client`.
    pub fn grant_mode(&self, client: &str) -> GrantMode {
        self.grant_modes.get(client).copied().unwrap_or_default()
    }

    /// The clients that use the JWT Authorization Grant.
    pub fn jwt_clients(&self) -> std::collections::BTreeSet<String> {
        self.grant_modes
            .iter()
            .filter(|(_, m)| **m == GrantMode::JwtAuthorizationGrant)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// `<base>/realms/<realm>`: the realm issuer, also the assertion `aud`.
    pub fn realm_url(&self) -> String {
        format!(
            "{}/realms/{}",
            self.base_url.as_str().trim_end_matches('/'),
            self.realm
        )
    }
}

/// Client authentication method (Keycloak "Client Authenticator").
pub enum ClientAuth {
    /// "Signed JWT" (`client-jwt`): assertion signed with the service's key, RFC 7523.
    PrivateKeyJwt,
    /// "Client Id and Secret" (`client-secret`), sent as HTTP Basic (RFC 6749 §2.3.1).
    ClientSecretBasic(secrecy::SecretString),
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PrivateKeyJwt => f.write_str("PrivateKeyJwt"),
            Self::ClientSecretBasic(_) => f.write_str("ClientSecretBasic([redacted])"),
        }
    }
}

error_codes! {
    /// The codes of [`KeycloakError`]; [`KeycloakError::IdentityRefused`] has one
    /// per [`IdentityRefusal`].
    pub enum KeycloakCode {
        /// Unreachable, too slow, or the body could not be read.
        Unavailable = "keycloak.unavailable",
        /// [`KeycloakError::RateLimited`].
        RateLimited = "keycloak.rate_limited",
        /// [`KeycloakError::ServerError`].
        ServerError = "keycloak.server_error",
        /// [`KeycloakError::NotFound`].
        EndpointNotFound = "keycloak.endpoint_not_found",
        /// [`KeycloakError::Redirected`].
        Redirected = "keycloak.redirected",
        /// [`KeycloakError::ClientRejected`].
        ClientRejected = "keycloak.client_rejected",
        /// [`KeycloakError::ScopeRejected`].
        ScopeRejected = "keycloak.scope_rejected",
        /// [`KeycloakError::ScopeExceedsGrant`].
        ScopeExceedsGrant = "keycloak.scope_exceeds_grant",
        /// [`KeycloakError::Rejected`].
        RequestRejected = "keycloak.request_rejected",
        /// [`KeycloakError::BadResponse`] and bodies over the cap.
        BadResponse = "keycloak.bad_response",
        /// [`KeycloakError::DiscoveryMismatch`].
        DiscoveryMismatch = "keycloak.discovery_mismatch",
        /// [`KeycloakError::LifetimeTooLong`].
        LifetimeExceedsPolicy = "keycloak.lifetime_exceeds_policy",
        /// [`KeycloakError::UnknownClient`].
        ClientNotConfigured = "keycloak.client_not_configured",
        /// [`KeycloakError::Signing`] and [`KeycloakError::IdentitySigning`].
        AssertionSigningFailed = "keycloak.assertion_signing_failed",
        /// [`IdentityRefusal::NotProvisioned`].
        NotProvisioned = "identity.not_provisioned",
        /// [`IdentityRefusal::Disabled`].
        Disabled = "identity.disabled",
        /// [`IdentityRefusal::NotReady`].
        NotReady = "identity.not_ready",
        /// [`IdentityRefusal::Misconfigured`].
        IdentityMisconfigured = "keycloak.identity_misconfigured",
        /// [`IdentityRefusal::Other`].
        Refused = "identity.refused",
        /// [`KeycloakError::IdentityMismatch`].
        IdentityMismatch = "identity.mismatch",
        /// [`KeycloakError::IdentityNotConfigured`].
        IdentityNotConfigured = "keycloak.identity_not_configured",
        /// [`KeycloakError::JwtGrantUnsupported`].
        JwtGrantUnsupported = "keycloak.jwt_grant_unsupported",
    }
}

/// Errors from Keycloak. None holds a token, assertion or secret. Each has a
/// stable [`code`](KeycloakError::code) and a [`meaning`](KeycloakError::meaning):
/// transient failures are answered 503 with `Retry-After`, our configuration and
/// malformed answers 502.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeycloakError {
    /// Connection refused, DNS, TLS, the timeout elapsed, or the body broke off.
    #[error("Keycloak unreachable ({url})")]
    Unavailable {
        /// URL called.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// Keycloak (or a proxy in front of it) answered 429.
    #[error("Keycloak answered HTTP 429 (rate limited)")]
    RateLimited {
        /// Its `Retry-After`, seconds, bounded by `keycloak.max_retry_after_seconds`.
        retry_after: Option<u64>,
    },
    /// Keycloak answered 5xx or 408, or an OAuth `server_error` /
    /// `temporarily_unavailable` (RFC 6749 §4.1.2.1).
    #[error("Keycloak answered HTTP {status}")]
    ServerError {
        /// HTTP status.
        status: u16,
        /// Its `Retry-After`, seconds, bounded.
        retry_after: Option<u64>,
    },
    /// 404 or 410: the realm or the URL does not exist (`keycloak.base_url`, `realm`).
    #[error("Keycloak answered HTTP {status} for {url}")]
    NotFound {
        /// URL called.
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// 3xx: redirects are not followed; `keycloak.base_url` is not the server's
    /// address (plain http to an https server, or another hostname).
    #[error("Keycloak answered HTTP {status} (redirect) for {url}")]
    Redirected {
        /// URL called.
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// Keycloak refused our client authentication (`invalid_client`, `unauthorized_client`).
    #[error("Keycloak rejected client `{client}`: {error}")]
    ClientRejected {
        /// clientId.
        client: String,
        /// OAuth error code from Keycloak.
        error: String,
    },
    /// Keycloak refused the scopes (`invalid_scope`): the policy grants a scope the
    /// Keycloak client does not have as optional client scope.
    #[error("Keycloak refused scopes for client `{client}`")]
    ScopeRejected {
        /// clientId.
        client: String,
    },
    /// Keycloak granted scopes that were not requested (beyond its identity
    /// scopes): the client's default client scopes give more than the policy.
    #[error("Keycloak granted client `{client}` unrequested scopes {extra:?}")]
    ScopeExceedsGrant {
        /// clientId.
        client: String,
        /// The scopes beyond the request.
        extra: Vec<String>,
    },
    /// Another 4xx answer (an OAuth error, or a proxy refusing us).
    #[error("Keycloak answered HTTP {status} `{error}`")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// OAuth error code, or `<non-JSON>`.
        error: String,
    },
    /// Not the expected JSON, or a token that fails our checks.
    #[error("unexpected answer from Keycloak: {0}")]
    BadResponse(String),
    /// Body over the size cap.
    #[error("Keycloak body")]
    Body(#[source] BodyError),
    /// The issued token would live longer than the policy allows.
    #[error("Keycloak token lives {lifetime} s, policy allows {max} s")]
    LifetimeTooLong {
        /// Token lifetime, seconds.
        lifetime: u64,
        /// Policy maximum, seconds.
        max: u64,
    },
    /// A discovery failure shared between the requests that waited for it.
    #[error("Keycloak discovery failed: {chain}")]
    Discovery {
        /// Code of the original failure.
        code: KeycloakCode,
        /// Meaning of the original failure.
        meaning: Meaning,
        /// Retry-After of the original failure.
        retry_after: Option<u64>,
        /// Cause chain as text (no secrets: discovery carries none).
        chain: String,
    },
    /// Discovery names another issuer than `<keycloak.base_url>/realms/<realm>`,
    /// or a `token_endpoint` off that origin or outside the realm's path: nothing
    /// is sent there (Keycloak's frontend URL differs from `keycloak.base_url`).
    #[error("Keycloak discovery does not match keycloak.base_url: {0}")]
    DiscoveryMismatch(String),
    /// The policy names a client with no configured authentication.
    #[error("client `{0}` has no authentication configured")]
    UnknownClient(String),
    /// Signing the client assertion failed.
    #[error("signing the client assertion failed")]
    Signing(#[source] jsonwebtoken::errors::Error),
    /// Keycloak refused the repository assertion (`invalid_grant`).
    #[error("Keycloak refused the identity assertion for client `{client}`: {description}")]
    IdentityRefused {
        /// clientId.
        client: String,
        /// The cause, from Keycloak's `error_description`.
        refusal: IdentityRefusal,
        /// Keycloak's `error_description`, truncated to 120 characters.
        description: String,
    },
    /// The token is not the repository user's (`preferred_username` or `sub`
    /// differs or is missing): a second user linked to the identity, a user
    /// re-created by hand, or the identity scope missing.
    #[error("the token's preferred_username {found:?} is not the identity's username {expected}")]
    IdentityMismatch {
        /// The username derived from the identity.
        expected: String,
        /// The token's `preferred_username`.
        found: Option<String>,
    },
    /// The realm's discovery does not list the JWT Authorization Grant (Keycloak
    /// older than 26.6, or the feature disabled).
    #[error(
        "Keycloak does not support the JWT Authorization Grant (not in grant_types_supported)"
    )]
    JwtGrantUnsupported,
    /// A client uses the JWT Authorization Grant but `[identity]` has no signer.
    #[error("[identity] is not configured (or its keys were not read)")]
    IdentityNotConfigured,
    /// Signing the repository assertion failed.
    #[error(transparent)]
    IdentitySigning(#[from] SignError),
}

impl KeycloakError {
    /// This error's code (exhaustive: a new variant needs one). A shared
    /// discovery failure keeps the code of the failure it stands for.
    pub fn kind(&self) -> KeycloakCode {
        match self {
            Self::Unavailable { .. } | Self::Body(BodyError::Read(_)) => KeycloakCode::Unavailable,
            Self::RateLimited { .. } => KeycloakCode::RateLimited,
            Self::ServerError { .. } => KeycloakCode::ServerError,
            Self::NotFound { .. } => KeycloakCode::EndpointNotFound,
            Self::Redirected { .. } => KeycloakCode::Redirected,
            Self::ClientRejected { .. } => KeycloakCode::ClientRejected,
            Self::ScopeRejected { .. } => KeycloakCode::ScopeRejected,
            Self::ScopeExceedsGrant { .. } => KeycloakCode::ScopeExceedsGrant,
            Self::Rejected { .. } => KeycloakCode::RequestRejected,
            Self::BadResponse(_) | Self::Body(_) => KeycloakCode::BadResponse,
            Self::DiscoveryMismatch(_) => KeycloakCode::DiscoveryMismatch,
            Self::LifetimeTooLong { .. } => KeycloakCode::LifetimeExceedsPolicy,
            Self::Discovery { code, .. } => *code,
            Self::UnknownClient(_) => KeycloakCode::ClientNotConfigured,
            Self::Signing(_) | Self::IdentitySigning(_) => KeycloakCode::AssertionSigningFailed,
            Self::IdentityRefused { refusal, .. } => match refusal {
                IdentityRefusal::NotProvisioned => KeycloakCode::NotProvisioned,
                IdentityRefusal::Disabled => KeycloakCode::Disabled,
                IdentityRefusal::NotReady => KeycloakCode::NotReady,
                IdentityRefusal::Misconfigured => KeycloakCode::IdentityMisconfigured,
                IdentityRefusal::Other => KeycloakCode::Refused,
            },
            Self::IdentityMismatch { .. } => KeycloakCode::IdentityMismatch,
            Self::IdentityNotConfigured => KeycloakCode::IdentityNotConfigured,
            Self::JwtGrantUnsupported => KeycloakCode::JwtGrantUnsupported,
        }
    }

    /// Stable error code for callers, audit and alerts (docs/src/error-codes.md).
    pub fn code(&self) -> &'static str {
        self.kind().as_str()
    }

    /// What the failure means for the caller (see [`Meaning`]).
    pub fn meaning(&self) -> Meaning {
        match self {
            Self::Unavailable { .. }
            | Self::RateLimited { .. }
            | Self::ServerError { .. }
            | Self::Body(BodyError::Read(_)) => Meaning::Transient,
            Self::BadResponse(_) | Self::Body(_) | Self::LifetimeTooLong { .. } => {
                Meaning::Malformed
            }
            Self::Discovery { meaning, .. } => *meaning,
            Self::NotFound { .. }
            | Self::DiscoveryMismatch(_)
            | Self::Redirected { .. }
            | Self::ClientRejected { .. }
            | Self::ScopeRejected { .. }
            | Self::ScopeExceedsGrant { .. }
            | Self::Rejected { .. }
            | Self::UnknownClient(_)
            | Self::Signing(_)
            | Self::IdentitySigning(_)
            | Self::IdentityRefused { .. }
            | Self::IdentityMismatch { .. }
            | Self::IdentityNotConfigured
            | Self::JwtGrantUnsupported => Meaning::Configuration,
        }
    }

    /// True for outages the caller should retry (503 + Retry-After).
    pub fn is_transient(&self) -> bool {
        self.meaning() == Meaning::Transient
    }

    /// Keycloak's own `Retry-After` (bounded), when it sent one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after }
            | Self::ServerError { retry_after, .. }
            | Self::Discovery { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Classifies a non-200 answer of Keycloak (discovery or token endpoint) by
/// meaning: 429 → rate limited, 408/5xx → server error (both transient, with the
/// bounded `Retry-After`), 3xx → redirected, 404/410 → not found (our
/// configuration), OAuth `invalid_client` / `unauthorized_client` → client
/// rejected, `invalid_scope` → scope rejected, `server_error` /
/// `temporarily_unavailable` → server error, any other 4xx → rejected.
/// Keycloak's error strings per cause are listed in docs/src/error-codes.md.
fn classify_status(
    url: &str,
    status: u16,
    retry_after: Option<u64>,
    body: &[u8],
    client: Option<&str>,
) -> KeycloakError {
    #[derive(Deserialize)]
    struct OAuthError {
        error: String,
    }
    let error = serde_json::from_slice::<OAuthError>(body)
        .ok()
        .map(|e| crate::domain::truncate(&e.error, 64));
    let oauth = error.as_deref().filter(|e| OAUTH_ERRORS.contains(e));
    match (status, oauth, client) {
        (429, ..) => KeycloakError::RateLimited { retry_after },
        (300..=399, ..) => KeycloakError::Redirected {
            url: url.to_string(),
            status,
        },
        (_, Some("server_error" | "temporarily_unavailable"), _) => KeycloakError::ServerError {
            status,
            retry_after,
        },
        _ => match crate::http::status_meaning(status) {
            Meaning::Transient => KeycloakError::ServerError {
                status,
                retry_after,
            },
            Meaning::Malformed => {
                KeycloakError::BadResponse(format!("unexpected HTTP status {status}"))
            }
            // Keycloak answers 404 with a JSON `error` that is no OAuth code
            // ("Realm does not exist", "HTTP 404 Not Found"): a wrong base URL or realm.
            Meaning::Configuration if matches!(status, 404 | 410) && oauth.is_none() => {
                KeycloakError::NotFound {
                    url: url.to_string(),
                    status,
                }
            }
            Meaning::Configuration => classify_oauth(status, error.as_deref(), oauth, client),
        },
    }
}

/// Error codes of RFC 6749 §5.2 and §4.1.2.1 and RFC 8693 §2.2.2.
const OAUTH_ERRORS: [&str; 10] = [
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_target",
    "access_denied",
    "server_error",
    "temporarily_unavailable",
];

fn classify_oauth(
    status: u16,
    error: Option<&str>,
    oauth: Option<&str>,
    client: Option<&str>,
) -> KeycloakError {
    match (oauth, client) {
        (Some(e @ ("invalid_client" | "unauthorized_client")), Some(c)) => {
            KeycloakError::ClientRejected {
                client: c.to_string(),
                error: e.to_string(),
            }
        }
        (Some("invalid_scope"), Some(c)) => KeycloakError::ScopeRejected {
            client: c.to_string(),
        },
        _ => KeycloakError::Rejected {
            status,
            error: error.unwrap_or("<non-JSON>").to_string(),
        },
    }
}

/// A token obtained from Keycloak.
#[derive(Debug)]
pub struct IssuedToken {
    /// The access token (redacted in `Debug`).
    pub access_token: SecretToken,
    /// `expires_in`, seconds.
    pub expires_in: u64,
    /// `scope` as Keycloak reports it (space-separated).
    pub scope: String,
    /// `jti` of the access token, when it is a JWT.
    pub jti: Option<String>,
    /// `sub` of the access token: the Keycloak user id (the service account's for
    /// client_credentials, the repository user's for the JWT Authorization Grant).
    pub subject: Option<String>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    token_endpoint: String,
    grant_types_supported: Option<Vec<String>>,
}

/// Endpoints from the realm's discovery document.
#[derive(Debug, Clone)]
pub struct RealmEndpoints {
    /// Realm issuer (`iss` of Keycloak tokens; `aud` of our assertions).
    pub issuer: String,
    /// Token endpoint.
    pub token_endpoint: String,
    /// The token endpoint, parsed once (not on every request).
    pub token_url: url::Url,
    /// Whether discovery lists the JWT Authorization Grant (`None`: no list).
    pub jwt_bearer_supported: Option<bool>,
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
}

/// Keycloak client. Cheap to share behind an `Arc`.
pub struct KeycloakClient {
    http: crate::http::PerThreadClient,
    metrics: Arc<crate::metrics::Metrics>,
    settings: KeycloakSettings,
    signing: Option<Arc<SigningKeys>>,
    endpoints: moka::future::Cache<(), Arc<RealmEndpoints>>,
    probe: moka::future::Cache<(), Arc<RealmEndpoints>>,
}

impl KeycloakClient {
    /// Creates a client; nothing is fetched until first use.
    pub fn new(
        http: crate::http::PerThreadClient,
        settings: KeycloakSettings,
        signing: Option<Arc<SigningKeys>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            metrics,
            http,
            settings,
            signing,
            probe: moka::future::Cache::builder()
                .max_capacity(1)
                .time_to_live(Duration::from_secs(1))
                .build(),
            endpoints: moka::future::Cache::builder()
                .max_capacity(1)
                .time_to_live(Duration::from_secs(300))
                .build(),
        }
    }

    /// The grant used with `client`.
    pub fn grant_mode(&self, client: &str) -> GrantMode {
        self.settings.grant_mode(client)
    }

    /// The identity signer's public keys (`None` without `[identity]`).
    pub fn identity_jwks(&self) -> Option<jsonwebtoken::jwk::JwkSet> {
        self.settings
            .identity
            .as_ref()
            .and_then(|i| i.signer.as_ref())
            .map(|s| s.jwks())
    }

    /// At startup, when a client uses the JWT Authorization Grant: refuses to
    /// run against a realm whose discovery does not list it. An unreachable
    /// Keycloak is not a reason to refuse (readiness reports it; the check runs
    /// again on every discovery refresh).
    ///
    /// # Errors
    /// [`KeycloakError::JwtGrantUnsupported`].
    pub async fn check_grant_support(&self) -> Result<(), KeycloakError> {
        if self.settings.jwt_clients().is_empty() {
            return Ok(());
        }
        match self.endpoints().await {
            Ok(ep) if ep.jwt_bearer_supported == Some(false) => {
                Err(KeycloakError::JwtGrantUnsupported)
            }
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %crate::telemetry::chain(&e), "Keycloak discovery failed at startup; the JWT Authorization Grant support is checked when it answers");
                Ok(())
            }
        }
    }

    /// The configured client ids.
    pub fn client_ids(&self) -> std::collections::BTreeSet<String> {
        self.settings.clients.keys().cloned().collect()
    }

    /// Discovery document (cached 300 s; concurrent misses share one fetch).
    ///
    /// # Errors
    /// [`KeycloakError`] when discovery cannot be fetched or parsed.
    pub async fn endpoints(&self) -> Result<Arc<RealmEndpoints>, KeycloakError> {
        self.endpoints
            .try_get_with((), self.fetch_endpoints())
            .await
            .map_err(|e| shared(&e))
    }

    /// Fetches the discovery document now (not from the cache) and refreshes the
    /// cache: the readiness probe.
    ///
    /// # Errors
    /// [`KeycloakError`] when Keycloak is unreachable or answers badly.
    pub async fn check_discovery(&self) -> Result<(), KeycloakError> {
        // Concurrent probes share one fetch, and a success answers probes for 1 s, so
        // probing /readyz cannot turn into a flood of requests to Keycloak.
        let ep = self
            .probe
            .try_get_with((), self.fetch_endpoints())
            .await
            .map_err(|e| shared(&e))?;
        self.endpoints.insert((), ep).await;
        Ok(())
    }

    async fn fetch_endpoints(&self) -> Result<Arc<RealmEndpoints>, KeycloakError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.settings.realm_url()
        );
        let resp = self.http.get().get(&url).send().await.map_err(|source| {
            KeycloakError::Unavailable {
                url: url.clone(),
                source,
            }
        })?;
        let status = resp.status().as_u16();
        let retry_after =
            crate::http::retry_after_seconds(resp.headers(), self.settings.max_retry_after);
        let body = read_capped(resp, self.settings.max_response_bytes)
            .await
            .map_err(KeycloakError::Body)?;
        if status != 200 {
            return Err(classify_status(&url, status, retry_after, &body, None));
        }
        read_discovery(&body, &self.settings).map(Arc::new)
    }
}

/// Reads and checks the realm's discovery document (the answer of a 200).
///
/// # Errors
/// [`KeycloakError::BadResponse`] or [`KeycloakError::DiscoveryMismatch`]
/// naming what is wrong.
pub(crate) fn read_discovery(
    body: &[u8],
    settings: &KeycloakSettings,
) -> Result<RealmEndpoints, KeycloakError> {
    let d: Discovery = serde_json::from_slice(body)
        .map_err(|e| KeycloakError::BadResponse(format!("discovery JSON: {e}")))?;
    let endpoint = check_discovery_document(&d, settings)?;
    Ok(RealmEndpoints {
        jwt_bearer_supported: d
            .grant_types_supported
            .map(|g| g.iter().any(|t| t == JWT_BEARER_GRANT)),
        issuer: d.issuer,
        token_endpoint: d.token_endpoint,
        token_url: endpoint,
    })
}

/// Client secrets and assertions are POSTed where discovery says: its
/// `token_endpoint` must share `keycloak.base_url`'s origin and lie under
/// `<base>/realms/<realm>` by path segments, and its `issuer` must be that
/// realm URL (RFC 8414 §3.3). Returns the parsed token endpoint.
fn check_discovery_document(
    d: &Discovery,
    settings: &KeycloakSettings,
) -> Result<url::Url, KeycloakError> {
    let realm_url = settings.realm_url();
    if d.issuer != realm_url {
        return Err(KeycloakError::DiscoveryMismatch(format!(
            "discovery names issuer `{}`, not `{realm_url}`",
            crate::domain::truncate(&d.issuer, 200)
        )));
    }
    let endpoint = url::Url::parse(&d.token_endpoint)
        .map_err(|e| KeycloakError::BadResponse(format!("token_endpoint: {e}")))?;
    let realm = url::Url::parse(&realm_url)
        .map_err(|e| KeycloakError::DiscoveryMismatch(format!("realm URL: {e}")))?;
    check_followed(&endpoint, &realm, PathRule::Under).map_err(|why| {
        KeycloakError::DiscoveryMismatch(format!(
            "token_endpoint is not under `{realm_url}`: {why}"
        ))
    })?;
    Ok(endpoint)
}

impl KeycloakClient {
    /// Signs a client assertion for `client`: `iss` = `sub` = clientId, `aud` = realm
    /// issuer (a single value, as Keycloak requires), fresh `jti`, lifetime
    /// `assertion_lifetime` (≤ 60 s).
    fn assertion(
        &self,
        client: &str,
        audience: &str,
    ) -> Result<(SecretToken, String), KeycloakError> {
        let keys = self
            .signing
            .as_ref()
            .ok_or_else(|| KeycloakError::UnknownClient(client.to_string()))?;
        let key = keys.active();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let jti = uuid::Uuid::new_v4().to_string();
        let claims = AssertionClaims {
            iss: client,
            sub: client,
            aud: audience,
            jti: jti.clone(),
            iat: now,
            exp: now + self.settings.assertion_lifetime.as_secs(),
        };
        let mut header = jsonwebtoken::Header::new(key.alg().jwt_alg());
        header.kid = Some(key.kid().to_string());
        let jwt = jsonwebtoken::encode(&header, &claims, key.encoding_key())
            .map_err(KeycloakError::Signing)?;
        Ok((SecretToken::new(jwt), jti))
    }

    /// The token request (RFC 6749 §4.4.2) authenticated as `client`: a fresh
    /// `private_key_jwt` assertion (RFC 7523 §2.2), or HTTP Basic with the
    /// form-urlencoded id and secret (RFC 6749 §2.3.1). Returns the request and
    /// the assertion's `jti` (for the debug log).
    fn token_request(
        &self,
        ep: &RealmEndpoints,
        client: &str,
        auth: &ClientAuth,
        grant: Vec<(&'static str, String)>,
        scope: &str,
    ) -> Result<(reqwest::RequestBuilder, Option<String>), KeycloakError> {
        let mut form: Vec<(&str, String)> = grant;
        if !scope.is_empty() {
            form.push(("scope", scope.to_string()));
        }
        let mut req = self.http.get().post(ep.token_url.clone());
        let mut assertion_jti = None;
        match auth {
            ClientAuth::PrivateKeyJwt => {
                let (assertion, jti) = self.assertion(client, &ep.issuer)?;
                assertion_jti = Some(jti);
                form.push(("client_id", client.to_string()));
                form.push((
                    "client_assertion_type",
                    crate::domain::oauth::CLIENT_ASSERTION_TYPE_JWT_BEARER.into(),
                ));
                form.push(("client_assertion", assertion.expose().to_string()));
            }
            ClientAuth::ClientSecretBasic(secret) => {
                use secrecy::ExposeSecret;
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let creds = format!("{}:{}", enc(client), enc(secret.expose_secret()));
                let b64 = base64::engine::general_purpose::STANDARD.encode(creds);
                req = req.header(reqwest::header::AUTHORIZATION, format!("Basic {b64}"));
            }
        }
        Ok((req.form(&form), assertion_jti))
    }

    /// Obtains an access token for `client` with `scopes` (client_credentials).
    /// Refuses a token living longer than `max_lifetime_seconds`.
    ///
    /// # Errors
    /// [`KeycloakError`]; [`KeycloakError::is_transient`] tells outages apart.
    pub async fn client_credentials(
        &self,
        client: &str,
        scopes: &Scopes,
        max_lifetime_seconds: u64,
    ) -> Result<IssuedToken, KeycloakError> {
        let grant = vec![("grant_type", "client_credentials".to_string())];
        self.request_token(client, grant, scopes, max_lifetime_seconds, None)
            .await
    }

    /// Obtains a token of the repository user linked to `identity` (RFC 7523 §2.1):
    /// signs a fresh assertion (`iss` = our issuer, `sub` = the identity, `aud` =
    /// the realm issuer, new `jti`, `exp` = now + `max_lifetime_seconds`) with the
    /// `[identity]` key and sends it as `client`. The token must be the identity's
    /// user (`preferred_username` = its username). Returns the token and the
    /// assertion's `jti`.
    ///
    /// # Errors
    /// [`KeycloakError`]: [`KeycloakError::IdentityRefused`] names Keycloak's
    /// reason (not provisioned, disabled, ...).
    pub async fn jwt_authorization_grant(
        &self,
        client: &str,
        identity: &crate::domain::identity::RepositoryIdentity,
        scopes: &Scopes,
        max_lifetime_seconds: u64,
    ) -> Result<(IssuedToken, String), KeycloakError> {
        let settings = self
            .settings
            .identity
            .as_ref()
            .ok_or(KeycloakError::IdentityNotConfigured)?;
        let signer = settings
            .signer
            .as_ref()
            .ok_or(KeycloakError::IdentityNotConfigured)?;
        let ep = self.endpoints().await?;
        if ep.jwt_bearer_supported == Some(false) {
            return Err(KeycloakError::JwtGrantUnsupported);
        }
        let iat = now_secs();
        let claims = identity::AssertionClaims {
            iss: settings.issuer.clone(),
            sub: identity.subject(),
            aud: ep.issuer.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat,
            // Keycloak ends the token at this exp while taking its iat from its own
            // clock: the margin keeps a service clock up to that much ahead from
            // making the token outlive the policy.
            exp: iat.saturating_add(
                max_lifetime_seconds
                    .saturating_sub(identity::CLOCK_MARGIN_SECONDS)
                    .max(1),
            ),
        };
        let assertion = signer.sign(&claims).await?;
        tracing::debug!(client, identity_jti = %claims.jti, identity = %claims.sub, "requesting a token by JWT Authorization Grant");
        let grant = vec![
            ("grant_type", JWT_BEARER_GRANT.to_string()),
            ("assertion", assertion.expose().to_string()),
        ];
        let username = identity.username();
        let user_id = identity.user_id(&self.settings.realm);
        let issued = self
            .request_token(
                client,
                grant,
                scopes,
                max_lifetime_seconds,
                Some((&username, &user_id)),
            )
            .await?;
        Ok((issued, claims.jti))
    }

    /// The token request and the checks of its answer, for either grant.
    async fn request_token(
        &self,
        client: &str,
        grant: Vec<(&'static str, String)>,
        scopes: &Scopes,
        max_lifetime_seconds: u64,
        user: Option<(&str, &str)>,
    ) -> Result<IssuedToken, KeycloakError> {
        let auth = self
            .settings
            .clients
            .get(client)
            .ok_or_else(|| KeycloakError::UnknownClient(client.to_string()))?;
        let ep = self.endpoints().await?;
        let scope = scopes.to_string();
        let (req, assertion_jti) = self.token_request(&ep, client, auth, grant, &scope)?;
        tracing::debug!(client, scope = %scope, assertion_jti = ?assertion_jti, "requesting Keycloak token");
        let resp = req.send().await.map_err(|source| {
            self.metrics
                .keycloak_responses
                .with_label_values(&["error"])
                .inc();
            KeycloakError::Unavailable {
                url: ep.token_endpoint.clone(),
                source,
            }
        })?;
        let status = resp.status().as_u16();
        self.metrics.keycloak_response(status);
        let retry_after =
            crate::http::retry_after_seconds(resp.headers(), self.settings.max_retry_after);
        let body = read_capped(resp, self.settings.max_response_bytes)
            .await
            .map_err(KeycloakError::Body)?;
        if status != 200 {
            if user.is_some() {
                if let Some(e) = identity_refusal(status, &body, client) {
                    return Err(e);
                }
            }
            return Err(classify_status(
                &ep.token_endpoint,
                status,
                retry_after,
                &body,
                Some(client),
            ));
        }
        let expect = Expected {
            realm_issuer: &ep.issuer,
            client,
            requested: scopes,
            max_lifetime_seconds,
            user,
        };
        check_issued(&body, &expect, now_secs())
    }
}

/// Keycloak's 400 `invalid_grant` to a repository assertion, classified by its
/// `error_description` ([`IdentityRefusal`]).
fn identity_refusal(status: u16, body: &[u8], client: &str) -> Option<KeycloakError> {
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
        error_description: Option<String>,
    }
    let r: Refusal = serde_json::from_slice(body).ok()?;
    if status != 400 || r.error != "invalid_grant" {
        return None;
    }
    let description = r.error_description.unwrap_or_default();
    Some(KeycloakError::IdentityRefused {
        client: client.to_string(),
        refusal: IdentityRefusal::from_description(&description),
        description: crate::domain::truncate(&description, 120),
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Rebuilds an owned error from one shared between waiters of one discovery fetch.
fn shared(e: &Arc<KeycloakError>) -> KeycloakError {
    KeycloakError::Discovery {
        code: e.kind(),
        meaning: e.meaning(),
        retry_after: e.retry_after(),
        chain: crate::telemetry::chain(&**e),
    }
}

/// Clock leeway for the `iat` and `nbf` of the token Keycloak returns, seconds.
pub const ISSUED_LEEWAY_SECONDS: u64 = 60;

/// Keycloak's built-in OIDC client scopes, which describe the token's subject
/// rather than grant access: Keycloak may add them (as a client's default
/// scopes) to any token without their being requested.
pub const IDENTITY_SCOPES: [&str; 11] = [
    "openid",
    "profile",
    "email",
    "address",
    "phone",
    "roles",
    "web-origins",
    "acr",
    "basic",
    "microprofile-jwt",
    "organization",
];

/// Signature algorithms a Keycloak access token may carry (asymmetric only,
/// RFC 7518 §3.1 names): realm keys are RSA, EC or EdDSA key pairs.
const TOKEN_ALGORITHMS: [&str; 10] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
];

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
    token_type: String,
    scope: Option<String>,
}

/// The access token's claims we check.
#[derive(Deserialize)]
struct IssuedClaims {
    iss: Option<String>,
    exp: Option<u64>,
    iat: Option<u64>,
    nbf: Option<u64>,
    azp: Option<String>,
    typ: Option<String>,
    scope: Option<String>,
    jti: Option<String>,
    sub: Option<String>,
    preferred_username: Option<String>,
}

/// Checks Keycloak's token response (RFC 6749 §5.1) as strictly as we check
/// Bitbucket's tokens, before anything is passed on:
/// - a JSON object with `token_type` Bearer, `expires_in` in 1..=`exp - iat + 1`;
/// - `access_token` a compact JWS (RFC 7515 §7.1): header `alg` an asymmetric
///   JOSE algorithm, base64url signature, payload a JSON object without duplicate
///   members;
/// - claims: `iss` = the realm issuer, `typ` Bearer (Keycloak's access-token
///   type), `azp` = our client, `exp` in the future, `iat` ≤ `exp` and not in the
///   future, `nbf` (if any) not in the future (leeway [`ISSUED_LEEWAY_SECONDS`]);
///   `exp - iat` ≤ `max + 1` (Keycloak truncates each to seconds);
/// - scopes: the response's `scope` and the token's `scope` claim (both
///   required, as Keycloak always sends them) hold only
///   RFC 6749 §3.3 tokens that were `requested` or are Keycloak identity scopes
///   ([`IDENTITY_SCOPES`]): a client whose default scopes grant more than the
///   policy is refused, not passed on.
///
/// The signature is not checked: the token comes straight from the configured
/// token endpoint over our own connection, and its resource servers verify it.
///
/// # Errors
/// [`KeycloakError::BadResponse`] naming what is wrong (never the token),
/// [`KeycloakError::LifetimeTooLong`], [`KeycloakError::ScopeExceedsGrant`].
pub fn check_issued(
    body: &[u8],
    expect: &Expected<'_>,
    now: u64,
) -> Result<IssuedToken, KeycloakError> {
    let bad = |what: &str| KeycloakError::BadResponse(what.to_string());
    let t: TokenResponse = serde_json::from_slice(body)
        .map_err(|e| bad(&format!("token response: {}", e.classify_name())))?;
    if !t.token_type.eq_ignore_ascii_case("bearer") {
        return Err(KeycloakError::BadResponse(format!(
            "token_type `{}`",
            crate::domain::truncate(&t.token_type, 20)
        )));
    }
    let c = issued_claims(&t.access_token)?;
    let (exp, iat) = check_issued_claims(&c, expect, now)?;
    if t.expires_in == 0 || t.expires_in > (exp - iat).saturating_add(1) {
        return Err(bad("expires_in does not agree with exp - iat"));
    }
    // Both must be there: without them the scope check could not be made.
    let (Some(scope), Some(claim)) = (t.scope, c.scope.as_deref()) else {
        return Err(bad(
            "the answer's `scope` or the token's `scope` claim is missing",
        ));
    };
    check_scopes(&scope, expect)?;
    check_scopes(claim, expect)?;
    if let Some((username, user_id)) = expect.user {
        if c.preferred_username.as_deref() != Some(username) || c.sub.as_deref() != Some(user_id) {
            return Err(KeycloakError::IdentityMismatch {
                expected: username.to_string(),
                found: c
                    .preferred_username
                    .as_deref()
                    .map(|u| crate::domain::truncate(u, 128)),
            });
        }
    }
    Ok(IssuedToken {
        access_token: SecretToken::new(t.access_token),
        expires_in: t.expires_in,
        scope,
        jti: c.jti.map(|j| crate::domain::truncate(&j, 128)),
        subject: c.sub.map(|j| crate::domain::truncate(&j, 128)),
    })
}

/// What the token must say: our realm, our client, at most these scopes and lifetime.
pub struct Expected<'a> {
    /// The realm issuer (discovery `issuer`).
    pub realm_issuer: &'a str,
    /// The client we authenticated as.
    pub client: &'a str,
    /// The scopes we requested.
    pub requested: &'a Scopes,
    /// The grant's `max_lifetime_seconds`.
    pub max_lifetime_seconds: u64,
    /// JWT Authorization Grant: the identity's username and Keycloak user id,
    /// which the token's `preferred_username` and `sub` must equal.
    pub user: Option<(&'a str, &'a str)>,
}

fn issued_claims(token: &str) -> Result<IssuedClaims, KeycloakError> {
    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    let bad = |what: &str| KeycloakError::BadResponse(what.to_string());
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, sig] = parts.as_slice() else {
        return Err(bad("access_token is not a compact JWS"));
    };
    let decode = |seg: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(seg)
            .map_err(|_| bad("access_token is not base64url"))
    };
    let header: Header = serde_json::from_slice(&decode(h)?)
        .map_err(|_| bad("access_token header is not a JWS header"))?;
    if !TOKEN_ALGORITHMS.contains(&header.alg.as_str()) {
        return Err(bad("access_token alg is not an asymmetric JOSE algorithm"));
    }
    if decode(sig)?.is_empty() {
        return Err(bad("access_token is unsigned"));
    }
    let object: crate::domain::json::StrictObject = serde_json::from_slice(&decode(p)?)
        .map_err(|_| bad("access_token payload is not a JSON object (or has duplicate members)"))?;
    serde_json::from_value(serde_json::Value::Object(object.0))
        .map_err(|_| bad("access_token claims have the wrong types"))
}

/// Returns `(exp, iat)` once every claim rule of [`check_issued`] holds.
fn check_issued_claims(
    c: &IssuedClaims,
    expect: &Expected<'_>,
    now: u64,
) -> Result<(u64, u64), KeycloakError> {
    let bad = |what: &str| Err(KeycloakError::BadResponse(what.to_string()));
    if c.iss.as_deref() != Some(expect.realm_issuer) {
        return bad("access_token iss is not the realm issuer");
    }
    if !c
        .typ
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
    {
        return bad("access_token typ is not Bearer");
    }
    if c.azp.as_deref() != Some(expect.client) {
        return bad("access_token azp is not the client");
    }
    let (Some(exp), Some(iat)) = (c.exp, c.iat) else {
        return bad("access_token lacks exp or iat");
    };
    let future = now.saturating_add(ISSUED_LEEWAY_SECONDS);
    if exp <= now || exp <= iat || iat > future || c.nbf.is_some_and(|n| n > future) {
        return bad("access_token exp/iat/nbf are not current");
    }
    // Keycloak derives `iat` and `exp` from one clock reading in milliseconds and
    // truncates each to seconds, so `exp - iat` can exceed the configured lifespan
    // by one second; that second is tolerated, nothing more.
    if exp - iat > expect.max_lifetime_seconds.saturating_add(1) {
        return Err(KeycloakError::LifetimeTooLong {
            lifetime: exp - iat,
            max: expect.max_lifetime_seconds,
        });
    }
    Ok((exp, iat))
}

fn check_scopes(scope: &str, expect: &Expected<'_>) -> Result<(), KeycloakError> {
    let granted = Scopes::parse(scope)
        .map_err(|_| KeycloakError::BadResponse("scope is not RFC 6749 scope tokens".into()))?;
    let extra: Vec<String> = granted
        .as_slice()
        .iter()
        .filter(|s| !expect.requested.contains(s) && !IDENTITY_SCOPES.contains(&s.as_str()))
        .cloned()
        .collect();
    if extra.is_empty() {
        Ok(())
    } else {
        Err(KeycloakError::ScopeExceedsGrant {
            client: expect.client.to_string(),
            extra,
        })
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}
impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "missing or mistyped fields",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}
