//! The Admin REST API client `keycloak plan/apply` use: the `keycloak` crate's
//! typed calls, authenticated by our own token supplier (client_credentials as a
//! dedicated admin client, secret in a redacting type, token cached until shortly
//! before `expires_in`). The running service never builds one.
//!
//! Caveats of the crate handled here: its representations derive `Debug`, which
//! would print a client's `secret`, so none is ever logged or formatted; its own
//! token helpers keep the secret in a plain `String` and fetch a token per call.

use std::sync::Arc;
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
        // Renew 30 s before expiry (Keycloak's default admin token lives 60 s);
        // never trust a huge expires_in.
        let life = t
            .expires_in
            .unwrap_or(60)
            .min(3600)
            .saturating_sub(30)
            .max(5);
        Ok((t.access_token, Instant::now() + Duration::from_secs(life)))
    }
}

impl Supplier {
    async fn token(&self) -> Result<String, KeycloakError> {
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

/// The supplier shared between the crate's client and our capped reads.
#[derive(Clone)]
pub struct SharedSupplier(Arc<Supplier>);

#[async_trait::async_trait]
impl KeycloakTokenSupplier for SharedSupplier {
    async fn get(&self, _url: &str) -> Result<String, KeycloakError> {
        self.0.token().await
    }
}

/// Largest Admin API list answer read by [`Admin::get_capped`], in bytes.
pub const MAX_LIST_BYTES: usize = 16 * 1024 * 1024;

/// The typed Admin API of one realm.
pub struct Admin {
    /// The crate's client.
    pub api: KeycloakAdmin<SharedSupplier>,
    /// The target realm.
    pub realm: String,
    supplier: SharedSupplier,
    http: reqwest::Client,
    base: String,
    client_id: String,
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
        let client_id = creds.client_id.clone();
        let supplier = SharedSupplier(Arc::new(Supplier {
            http: http.clone(),
            token_url,
            creds,
            cached: tokio::sync::Mutex::new(None),
        }));
        Self {
            api: KeycloakAdmin::new(&base, supplier.clone(), http.clone()),
            realm: realm.to_string(),
            supplier,
            http,
            base,
            client_id,
        }
    }

    /// The admin client's `clientId` (never owned, changed or removed).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// `GET <base><path>` (outside the realm, e.g. `/admin/serverinfo`) with the
    /// size cap of [`Admin::get_capped`].
    ///
    /// # Errors
    /// As [`Admin::get_capped`].
    pub async fn get_root_capped<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        action: &str,
    ) -> Result<T, AdminError> {
        self.call(
            reqwest::Method::GET,
            &format!("{}{path}", self.base),
            &[],
            None,
            action,
        )
        .await
    }

    /// A JSON request on `/admin/realms/<realm><path>` the crate does not model
    /// whole (`partialImport` with `ifResourceExists`, the user profile, kept as
    /// raw JSON so a PUT keeps every field); the answer is read with the cap.
    ///
    /// # Errors
    /// As [`Admin::get_capped`].
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
        action: &str,
    ) -> Result<serde_json::Value, AdminError> {
        let realm = url::form_urlencoded::byte_serialize(self.realm.as_bytes()).collect::<String>();
        let url = format!("{}/admin/realms/{realm}{path}", self.base);
        self.call::<Option<serde_json::Value>>(method, &url, &[], Some(body), action)
            .await
            .map(Option::unwrap_or_default)
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
        action: &str,
    ) -> Result<T, AdminError> {
        let fail = |source: KeycloakError| AdminError {
            action: action.to_string(),
            source: Box::new(source),
        };
        let token = self.supplier.0.token().await.map_err(fail)?;
        let mut req = self
            .http
            .request(method, url)
            .query(query)
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| fail(e.into()))?;
        let status = resp.status().as_u16();
        let bytes = crate::http::read_capped(resp, MAX_LIST_BYTES)
            .await
            .map_err(|e| fail(failure(status, e.to_string())))?;
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let parsed = serde_json::from_slice(&bytes).ok();
            return Err(fail(KeycloakError::HttpFailure {
                status,
                body: parsed,
                text,
            }));
        }
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes)
            .map_err(|e| fail(failure(status, format!("unexpected JSON: {e}"))))
    }

    /// `GET /admin/realms/<realm><path>` with a size cap ([`MAX_LIST_BYTES`]):
    /// the lists whose size grows with the realm (clients, client scopes) are
    /// read here rather than through the crate, which reads bodies whole.
    ///
    /// # Errors
    /// The call's failure, a body over the cap, or JSON of another shape.
    pub async fn get_capped<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        action: &str,
    ) -> Result<T, AdminError> {
        let realm = url::form_urlencoded::byte_serialize(self.realm.as_bytes()).collect::<String>();
        let url = format!("{}/admin/realms/{realm}{path}", self.base);
        self.call(reqwest::Method::GET, &url, query, None, action)
            .await
    }
}

/// A failed Admin API call: what was attempted and Keycloak's answer (status and
/// Keycloak's message; never a token or secret), with a hint for 401/403.
#[derive(Debug, thiserror::Error)]
#[error("{action}: {}{}", render(source), hint(source))]
pub struct AdminError {
    /// What was attempted (`read clients`, `create client scope deploy:production`).
    pub action: String,
    /// The crate's error (boxed: it is large).
    pub source: Box<KeycloakError>,
}

/// The failure as one safe line: the status and Keycloak's message, printable
/// ASCII only (no terminal control sequences), at most 200 characters, with
/// anything shaped like a bearer token or a JWT replaced by `[redacted]` (a proxy
/// page may echo the request's headers).
fn render(e: &KeycloakError) -> String {
    match e {
        KeycloakError::HttpFailure { status, body, text } => {
            let message = body
                .as_ref()
                .and_then(|b| {
                    b.error_message
                        .clone()
                        .or_else(|| match (&b.error, &b.error_description) {
                            (Some(e), Some(d)) => Some(format!("{e}: {d}")),
                            (Some(e), None) => Some(e.clone()),
                            _ => None,
                        })
                })
                .unwrap_or_else(|| text.clone());
            format!("HTTP {status}: {}", sanitize(&message))
        }
        KeycloakError::ReqwestFailure(r) => format!(
            "cannot reach Keycloak ({})",
            sanitize(&crate::telemetry::chain(r))
        ),
    }
}

/// See [`render`].
pub fn sanitize(s: &str) -> String {
    let printable: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .collect();
    let mut out = Vec::new();
    let mut after_bearer = false;
    for word in printable.split_whitespace() {
        let jwt_like = word.matches('.').count() >= 2 && word.len() > 30;
        let long_secret = word.len() > 40
            && word
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=".contains(&b));
        if after_bearer || jwt_like || long_secret {
            out.push("[redacted]");
        } else {
            out.push(word);
        }
        after_bearer = word.eq_ignore_ascii_case("bearer") || word.eq_ignore_ascii_case("basic");
    }
    crate::domain::truncate(&out.join(" "), 200)
}

fn hint(e: &KeycloakError) -> &'static str {
    match e {
        KeycloakError::HttpFailure { status: 401, .. } => {
            " (the admin token was refused: check the admin client's id, secret and realm)"
        }
        KeycloakError::HttpFailure { status: 404, .. } => {
            " (no such realm or object: check keycloak.base_url, keycloak.realm and --admin-realm)"
        }
        KeycloakError::HttpFailure { status: 403, .. } => {
            " (the admin client lacks a realm-management role; README \"Admin credentials\" lists \
             the roles plan and apply need)"
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
