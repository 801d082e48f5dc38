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

use crate::configuration::{ClientAuth, KeycloakSettings};
use crate::domain::SecretToken;
use crate::http::{read_capped, BodyError};
use crate::keys::SigningKeys;

/// Errors from Keycloak. None holds a token, assertion or secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeycloakError {
    /// Connection refused, DNS, TLS, or the timeout elapsed.
    #[error("Keycloak unreachable ({url})")]
    Unavailable {
        /// URL called.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// Keycloak answered 5xx.
    #[error("Keycloak answered HTTP {status}")]
    ServerError {
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
    /// Another 4xx OAuth error.
    #[error("Keycloak answered HTTP {status} `{error}`")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// OAuth error code.
        error: String,
    },
    /// Not the expected JSON, or too large.
    #[error("unexpected answer from Keycloak: {0}")]
    BadResponse(String),
    /// Body over the size cap or unreadable.
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
    /// The realm's discovery document could not be fetched or used.
    #[error("Keycloak discovery failed: {reason}")]
    Discovery {
        /// True for outages (unreachable, 5xx).
        transient: bool,
        /// Cause chain as text (no secrets: discovery carries none).
        reason: String,
    },
    /// The policy names a client with no configured authentication.
    #[error("client `{0}` has no authentication configured")]
    UnknownClient(String),
    /// Signing the client assertion failed.
    #[error("signing the client assertion failed")]
    Signing(#[source] jsonwebtoken::errors::Error),
}

impl KeycloakError {
    /// Stable error code for callers, audit and alerts.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "keycloak.unavailable",
            Self::ServerError { .. } => "keycloak.server_error",
            Self::ClientRejected { .. } => "keycloak.client_rejected",
            Self::ScopeRejected { .. } => "keycloak.scope_rejected",
            Self::Rejected { .. } => "keycloak.request_rejected",
            Self::BadResponse(_) | Self::Body(_) => "keycloak.bad_response",
            Self::LifetimeTooLong { .. } => "keycloak.lifetime_exceeds_policy",
            Self::Discovery {
                transient: true, ..
            } => "keycloak.unavailable",
            Self::Discovery {
                transient: false, ..
            } => "keycloak.bad_response",
            Self::UnknownClient(_) => "keycloak.client_not_configured",
            Self::Signing(_) => "keycloak.assertion_signing_failed",
        }
    }

    /// True for outages the caller should retry (503 + Retry-After).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. }
                | Self::ServerError { .. }
                | Self::Discovery {
                    transient: true,
                    ..
                }
        )
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
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    token_endpoint: String,
}

/// Endpoints from the realm's discovery document.
#[derive(Debug, Clone)]
pub struct RealmEndpoints {
    /// Realm issuer (`iss` of Keycloak tokens; `aud` of our assertions).
    pub issuer: String,
    /// Token endpoint.
    pub token_endpoint: String,
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
    http: reqwest::Client,
    metrics: Arc<crate::metrics::Metrics>,
    settings: KeycloakSettings,
    signing: Option<Arc<SigningKeys>>,
    endpoints: moka::future::Cache<(), Arc<RealmEndpoints>>,
    probe: moka::future::Cache<(), Arc<RealmEndpoints>>,
}

impl KeycloakClient {
    /// Creates a client; nothing is fetched until first use.
    pub fn new(
        http: reqwest::Client,
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
            .map_err(|e| KeycloakError::Discovery {
                transient: e.is_transient(),
                reason: crate::telemetry::chain(&*e),
            })
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
            .map_err(|e| KeycloakError::Discovery {
                transient: e.is_transient(),
                reason: crate::telemetry::chain(&*e),
            })?;
        self.endpoints.insert((), ep).await;
        Ok(())
    }

    async fn fetch_endpoints(&self) -> Result<Arc<RealmEndpoints>, KeycloakError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.settings.realm_url()
        );
        let resp =
            self.http
                .get(&url)
                .send()
                .await
                .map_err(|source| KeycloakError::Unavailable {
                    url: url.clone(),
                    source,
                })?;
        let status = resp.status().as_u16();
        if status >= 500 {
            return Err(KeycloakError::ServerError { status });
        }
        if status != 200 {
            return Err(KeycloakError::BadResponse(format!(
                "discovery answered HTTP {status}"
            )));
        }
        let body = read_capped(resp, self.settings.max_response_bytes)
            .await
            .map_err(KeycloakError::Body)?;
        let d: Discovery = serde_json::from_slice(&body)
            .map_err(|e| KeycloakError::BadResponse(format!("discovery JSON: {e}")))?;
        if d.issuer != self.settings.realm_url() {
            tracing::warn!(expected = %self.settings.realm_url(), found = %d.issuer, "Keycloak discovery names another issuer (frontend URL?)");
        }
        let endpoint = url::Url::parse(&d.token_endpoint)
            .map_err(|e| KeycloakError::BadResponse(format!("token_endpoint: {e}")))?;
        if !crate::http::is_https_or_loopback_http(&endpoint) {
            return Err(KeycloakError::BadResponse(
                "token_endpoint must be https".into(),
            ));
        }
        Ok(Arc::new(RealmEndpoints {
            issuer: d.issuer,
            token_endpoint: d.token_endpoint,
        }))
    }

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

    /// Obtains an access token for `client` with `scopes` (client_credentials).
    /// Refuses a token living longer than `max_lifetime_seconds`.
    ///
    /// # Errors
    /// [`KeycloakError`]; [`KeycloakError::is_transient`] tells outages apart.
    pub async fn client_credentials(
        &self,
        client: &str,
        scopes: &[String],
        max_lifetime_seconds: u64,
    ) -> Result<IssuedToken, KeycloakError> {
        let auth = self
            .settings
            .clients
            .get(client)
            .ok_or_else(|| KeycloakError::UnknownClient(client.to_string()))?;
        let ep = self.endpoints().await?;
        let scope = scopes.join(" ");
        let mut form: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
        if !scope.is_empty() {
            form.push(("scope", scope.clone()));
        }
        let mut req = self.http.post(&ep.token_endpoint);
        let mut assertion_jti = None;
        match auth {
            ClientAuth::PrivateKeyJwt => {
                let (assertion, jti) = self.assertion(client, &ep.issuer)?;
                assertion_jti = Some(jti);
                form.push(("client_id", client.to_string()));
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", assertion.expose().to_string()));
            }
            ClientAuth::ClientSecretBasic(secret) => {
                use secrecy::ExposeSecret;
                // RFC 6749 §2.3.1: form-urlencode id and secret before Basic encoding.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let creds = format!("{}:{}", enc(client), enc(secret.expose_secret()));
                let b64 = base64::engine::general_purpose::STANDARD.encode(creds);
                req = req.header(reqwest::header::AUTHORIZATION, format!("Basic {b64}"));
            }
        }
        tracing::debug!(client, scope = %scope, assertion_jti = ?assertion_jti, "requesting Keycloak token");
        let resp = req.form(&form).send().await.map_err(|source| {
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
        self.metrics
            .keycloak_responses
            .with_label_values(&[status.to_string().as_str()])
            .inc();
        let body = read_capped(resp, self.settings.max_response_bytes)
            .await
            .map_err(KeycloakError::Body)?;
        if status >= 500 {
            return Err(KeycloakError::ServerError { status });
        }
        if status != 200 {
            #[derive(Deserialize)]
            struct OAuthError {
                error: String,
            }
            let error = serde_json::from_slice::<OAuthError>(&body)
                .map(|e| crate::domain::truncate(&e.error, 64))
                .unwrap_or_else(|_| "<non-JSON>".into());
            return Err(match error.as_str() {
                "invalid_client" | "unauthorized_client" => KeycloakError::ClientRejected {
                    client: client.to_string(),
                    error,
                },
                "invalid_scope" => KeycloakError::ScopeRejected {
                    client: client.to_string(),
                },
                _ => KeycloakError::Rejected { status, error },
            });
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            access_token: String,
            expires_in: u64,
            token_type: String,
            #[serde(default)]
            scope: String,
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            KeycloakError::BadResponse(format!("token response: {}", e.classify_name()))
        })?;
        if !t.token_type.eq_ignore_ascii_case("bearer") {
            return Err(KeycloakError::BadResponse(format!(
                "token_type `{}`",
                crate::domain::truncate(&t.token_type, 20)
            )));
        }
        let access_token = SecretToken::new(t.access_token);
        let (jti, lifetime) = jwt_facts(&access_token);
        let lifetime = lifetime.unwrap_or(0).max(t.expires_in);
        // Keycloak derives `iat` and `exp` from one clock reading in milliseconds and
        // truncates each to seconds, so `exp - iat` can exceed the configured lifespan
        // by one second; that second is tolerated, nothing more.
        if lifetime > max_lifetime_seconds.saturating_add(1) {
            return Err(KeycloakError::LifetimeTooLong {
                lifetime,
                max: max_lifetime_seconds,
            });
        }
        Ok(IssuedToken {
            access_token,
            expires_in: t.expires_in,
            scope: t.scope,
            jti,
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

/// `jti` and `exp - iat` of a Keycloak JWT access token, read without
/// verification (the token comes straight from Keycloak over our own connection;
/// these facts are for the audit line and the lifetime check only).
fn jwt_facts(token: &SecretToken) -> (Option<String>, Option<u64>) {
    #[derive(Deserialize)]
    struct Facts {
        jti: Option<String>,
        exp: Option<u64>,
        iat: Option<u64>,
    }
    let Some(payload) = token.expose().split('.').nth(1) else {
        return (None, None);
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
        return (None, None);
    };
    let Ok(f) = serde_json::from_slice::<Facts>(&bytes) else {
        return (None, None);
    };
    let lifetime = match (f.exp, f.iat) {
        (Some(e), Some(i)) if e >= i => Some(e - i),
        _ => None,
    };
    (f.jti.map(|j| crate::domain::truncate(&j, 128)), lifetime)
}
