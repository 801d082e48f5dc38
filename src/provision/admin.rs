//! The Admin REST API client `keycloak plan/apply` use: the `keycloak` crate's
//! typed calls, authenticated by our own token supplier (client_credentials as a
//! dedicated admin client, secret in a redacting type, token cached until shortly
//! before `expires_in`). The running service never builds one.
//!
//! Caveats of the crate handled here: its representations derive `Debug`, which
//! would print a client's `secret`, so none is ever logged or formatted; its own
//! token helpers keep the secret in a plain `String` and fetch a token per call.

use std::time::{Duration, Instant};

use ::keycloak::{KeycloakAdmin, KeycloakError, KeycloakTokenSupplier};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Largest token response read, in bytes.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// Credentials of the admin client (`keycloak plan` needs view roles only,
/// `apply` manage roles; README "Admin credentials").
pub struct Credentials {
    /// Realm the admin client lives in (usually the target realm; `master` for a
    /// master-realm admin client).
    pub realm: String,
    /// Its `clientId`.
    pub client_id: String,
    /// Its secret.
    pub secret: SecretString,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("realm", &self.realm)
            .field("client_id", &self.client_id)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// Fetches and caches the admin access token.
pub struct Supplier {
    http: reqwest::Client,
    token_url: String,
    creds: Credentials,
    cached: tokio::sync::Mutex<Option<(SecretString, Instant)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    error: Option<String>,
}

fn failure(status: u16, text: String) -> KeycloakError {
    KeycloakError::HttpFailure {
        status,
        body: None,
        text,
    }
}

impl Supplier {
    async fn fetch(&self) -> Result<(SecretString, Instant), KeycloakError> {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            enc(&self.creds.client_id),
            enc(self.creds.secret.expose_secret())
        ));
        let resp = self
            .http
            .post(&self.token_url)
            .header(reqwest::header::AUTHORIZATION, format!("Basic {basic}"))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body = crate::http::read_capped(resp, MAX_TOKEN_RESPONSE_BYTES)
            .await
            .map_err(|e| failure(status, format!("admin token response: {e}")))?;
        if status != 200 {
            let code = serde_json::from_slice::<OAuthErrorBody>(&body)
                .ok()
                .and_then(|b| b.error)
                .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()))
                .unwrap_or_else(|| "no OAuth error code".into());
            return Err(failure(
                status,
                format!(
                    "the admin client `{}` could not obtain a token from {} ({code})",
                    self.creds.client_id, self.token_url
                ),
            ));
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            failure(
                status,
                "the admin token response is not a token response".into(),
            )
        })?;
        // Renew 30 s before expiry (Keycloak's default admin token lives 60 s).
        let life = t.expires_in.unwrap_or(60).saturating_sub(30).max(5);
        Ok((t.access_token, Instant::now() + Duration::from_secs(life)))
    }
}

#[async_trait::async_trait]
impl KeycloakTokenSupplier for Supplier {
    async fn get(&self, _url: &str) -> Result<String, KeycloakError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(token.expose_secret().to_string());
            }
        }
        let (token, until) = self.fetch().await?;
        let out = token.expose_secret().to_string();
        *cached = Some((token, until));
        Ok(out)
    }
}

/// The typed Admin API of one realm.
pub struct Admin {
    /// The crate's client.
    pub api: KeycloakAdmin<Supplier>,
    /// The target realm.
    pub realm: String,
}

impl Admin {
    /// An admin client for `realm` at `base_url` with `creds`, over `http` (the
    /// service's outbound client: no redirects, no proxy, timeouts).
    pub fn new(
        base_url: &url::Url,
        realm: &str,
        creds: Credentials,
        http: reqwest::Client,
    ) -> Self {
        let base = base_url.as_str().trim_end_matches('/').to_string();
        let token_url = format!(
            "{base}/realms/{}/protocol/openid-connect/token",
            url::form_urlencoded::byte_serialize(creds.realm.as_bytes()).collect::<String>()
        );
        let supplier = Supplier {
            http: http.clone(),
            token_url,
            creds,
            cached: tokio::sync::Mutex::new(None),
        };
        Self {
            api: KeycloakAdmin::new(&base, supplier, http),
            realm: realm.to_string(),
        }
    }
}

/// A failed Admin API call: what was attempted and Keycloak's answer (status and
/// Keycloak's message; never a token or secret), with a hint for 401/403.
#[derive(Debug, thiserror::Error)]
#[error("{action}: {source}{}", hint(source))]
pub struct AdminError {
    /// What was attempted (`read clients`, `create client scope deploy:production`).
    pub action: String,
    /// The crate's error (boxed: it is large).
    pub source: Box<KeycloakError>,
}

fn hint(e: &KeycloakError) -> &'static str {
    match e {
        KeycloakError::HttpFailure { status: 401, .. } => {
            " (the admin token was refused: check the admin client's id, secret and realm)"
        }
        KeycloakError::HttpFailure { status: 403, .. } => {
            " (the admin client lacks a realm-management role: plan needs view-clients and \
             view-users, apply needs manage-clients and manage-users; README \"Admin credentials\")"
        }
        _ => "",
    }
}

/// Adds the action to a crate error.
pub trait Context<T> {
    /// Wraps the error with `action`.
    fn ctx(self, action: impl Into<String>) -> Result<T, AdminError>;
}

impl<T> Context<T> for Result<T, KeycloakError> {
    fn ctx(self, action: impl Into<String>) -> Result<T, AdminError> {
        self.map_err(|source| AdminError {
            action: action.into(),
            source: Box::new(source),
        })
    }
}
