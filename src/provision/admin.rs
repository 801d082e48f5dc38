//! The Admin REST API client `keycloak plan/apply` use: the `keycloak` crate's
//! typed calls, authenticated by our own token supplier (client_credentials as a
//! dedicated admin client, secret in a redacting type, token cached until shortly
//! before `expires_in`). The running service never builds one.
//!
//! Caveats of the crate handled here: its representations derive `Debug`, which
//! would print a client's `secret`, so none is ever logged or formatted; its own
//! token helpers keep the secret in a plain `String` and fetch a token per call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::keycloak::{KeycloakAdmin, KeycloakError, KeycloakTokenSupplier};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Largest token response read, in bytes.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// Credentials of the admin client (`keycloak plan` needs view roles only,
/// `apply` manage roles; docs/src/keycloak.md).
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

/// When a token of `expires_in` seconds is renewed: after three quarters of its
/// own lifetime (a 5 s token after 3.75 s, Keycloak's default 60 s after 45 s),
/// so a token is never used in its last quarter whatever the realm's admin
/// lifespan. A missing `expires_in` counts as 60 s; more than an hour as an hour.
pub fn renew_after(expires_in: Option<u64>) -> Duration {
    let life = Duration::from_secs(expires_in.unwrap_or(60).min(3600));
    life.mul_f64(0.75)
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
        Ok((t.access_token, Instant::now() + renew_after(t.expires_in)))
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
        let (token, until) = self.fetch().await.map_err(|e| {
            // Marks the failure as the token endpoint's (see [`hint`]).
            match e {
                KeycloakError::HttpFailure { status, body, text } => KeycloakError::HttpFailure {
                    status,
                    body,
                    text: format!("{TOKEN_ENDPOINT_MARK}{text}"),
                },
                other => other,
            }
        })?;
        let out = token.expose_secret().to_string();
        *cached = Some((token, until));
        Ok(out)
    }

    /// Forgets the cached token: the next call fetches a fresh one.
    async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }
}

/// Prefix of the text of a failure at the token endpoint (not the Admin API).
const TOKEN_ENDPOINT_MARK: &str = "token endpoint: ";

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

/// How [`Admin::list`] reads a list: `page` elements per request, at most
/// `max_items` in all (the command fails beyond that, naming the bound).
#[derive(Debug, Clone, Copy)]
pub struct ListBounds {
    /// Elements per page (`max`).
    pub page: usize,
    /// Most elements one list may hold.
    pub max_items: usize,
}

impl Default for ListBounds {
    fn default() -> Self {
        Self {
            page: 500,
            max_items: 1_000_000,
        }
    }
}

fn bound(action: &str, text: String) -> AdminError {
    AdminError::new(action.to_string(), Cause::Bound(text))
}

/// A 401 from the Admin API itself (not from the token endpoint).
fn is_admin_401(e: &KeycloakError) -> bool {
    matches!(e, KeycloakError::HttpFailure { status: 401, text, .. } if !text.starts_with(TOKEN_ENDPOINT_MARK))
}

/// `--concurrency` when not given: independent reads (a repository user's
/// links, a group's members, a role's holders) in flight at once. Four keeps a
/// 2-core Keycloak busy without queueing on its worker pool, and is a small
/// share of a shared production server's; measured in docs/src/benchmarks.md.
pub const DEFAULT_CONCURRENCY: usize = 4;

/// Most independent calls `--concurrency` may put in flight.
pub const MAX_CONCURRENCY: usize = 32;

/// How often a call Keycloak answered 429 or 503 (busy: not processed) is
/// tried again, waiting [`Admin::with_backoff`]'s base, doubled each time.
pub const BUSY_RETRIES: u32 = 5;

/// Admin API requests made, by object kind ([`kind_of`]); every attempt counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Calls {
    /// Requests per kind.
    pub by_kind: BTreeMap<&'static str, u64>,
}

impl Calls {
    /// All requests.
    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }
}

impl std::fmt::Display for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        write!(f, "{} ({})", self.total(), parts.join(", "))
    }
}

/// The object kind an Admin call is counted under, from the action it was
/// made for (every call names its action; see [`Admin::run`]).
pub fn kind_of(action: &str) -> &'static str {
    const KINDS: [(&str, &str); 18] = [
        ("features", "server info"),
        ("user profile", "user profile"),
        ("link", "users"),
        ("identity provider", "identity provider"),
        ("service account", "clients"),
        ("service-account", "clients"),
        ("user", "users"),
        ("bitbucket.", "users"),
        ("group", "groups"),
        ("default scope", "clients"),
        ("optional scope", "clients"),
        ("client scope", "client scopes"),
        ("role", "roles"),
        ("secret", "clients"),
        ("resource server", "clients"),
        ("client", "clients"),
        ("scope", "client scopes"),
        ("mapper", "client scopes"),
    ];
    let a = action.to_ascii_lowercase();
    KINDS
        .iter()
        .find(|(word, _)| a.contains(word))
        .map_or("realm", |(_, kind)| kind)
}

/// A 429 or 503: Keycloak (or a proxy before it) did not process the request.
fn is_busy(e: &KeycloakError) -> bool {
    matches!(
        e,
        KeycloakError::HttpFailure {
            status: 429 | 503,
            ..
        }
    )
}

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
    bounds: ListBounds,
    concurrency: usize,
    backoff: Duration,
    calls: Mutex<Calls>,
    stop_after: Option<u64>,
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
            bounds: ListBounds::default(),
            concurrency: DEFAULT_CONCURRENCY,
            backoff: Duration::from_millis(250),
            calls: Mutex::new(Calls::default()),
            stop_after: None,
        }
    }

    /// The same client refusing every call after the first `n` (a test hook:
    /// what a command killed between two calls leaves behind).
    #[must_use]
    pub fn interrupted_after(mut self, n: Option<u64>) -> Self {
        self.stop_after = n;
        self
    }

    /// The same client with `n` independent calls in flight at once (1 to
    /// [`MAX_CONCURRENCY`]).
    #[must_use]
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.clamp(1, MAX_CONCURRENCY);
        self
    }

    /// Independent calls in flight at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// The same client waiting `base` (doubled per attempt) before trying a
    /// busy answer again (tests use a millisecond).
    #[must_use]
    pub fn with_backoff(mut self, base: Duration) -> Self {
        self.backoff = base;
        self
    }

    /// The Admin API requests made so far, by kind.
    pub fn calls(&self) -> Calls {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Counts a call under `kind`; `false` when the call must not be made
    /// ([`Admin::interrupted_after`]).
    fn count(&self, kind: &'static str) -> bool {
        let Ok(mut c) = self.calls.lock() else {
            return true;
        };
        if self.stop_after.is_some_and(|n| c.total() >= n) {
            return false;
        }
        *c.by_kind.entry(kind).or_default() += 1;
        true
    }

    /// The same client with other list bounds (tests use small pages).
    #[must_use]
    pub fn with_list_bounds(mut self, bounds: ListBounds) -> Self {
        self.bounds = bounds;
        self
    }

    /// A path segment, percent-encoded (ids and names in URLs): everything
    /// but RFC 3986's unreserved characters, so a space is `%20`, never `+`.
    pub fn seg(s: &str) -> String {
        const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
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

    /// One request with the size cap, retried once with a fresh token on 401.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
        action: &str,
    ) -> Result<T, AdminError> {
        self.run(action, || self.call_once(method.clone(), url, query, body))
            .await
    }

    async fn call_once<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
    ) -> Result<T, KeycloakError> {
        let token = self.supplier.0.token().await?;
        let mut req = self
            .http
            .request(method, url)
            .query(query)
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = crate::http::read_capped(resp, MAX_LIST_BYTES)
            .await
            .map_err(|e| failure(status, e.to_string()))?;
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let parsed = serde_json::from_slice(&bytes).ok();
            return Err(KeycloakError::HttpFailure {
                status,
                body: parsed,
                text,
            });
        }
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| failure(status, format!("unexpected JSON: {e}")))
    }

    /// Runs one Admin API call (`call` makes the request; the crate's calls fetch
    /// the token from the shared supplier), counted under [`kind_of`] its
    /// action. A 401 from the Admin API is retried once with a freshly fetched
    /// token (the cached one may have expired or been invalidated, e.g. by a
    /// Keycloak restart); a second 401 is reported as such. A 429 or 503 (busy)
    /// is tried again up to [`BUSY_RETRIES`] times, waiting the backoff doubled
    /// each time, so a loaded shared Keycloak is not stormed. Safe for every
    /// method: a 401, 429 or 503 means the request was not processed.
    ///
    /// # Errors
    /// The call's failure, with `action`.
    pub async fn run<T, F, Fut>(
        &self,
        action: impl Into<String>,
        mut call: F,
    ) -> Result<T, AdminError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, KeycloakError>>,
    {
        let action = action.into();
        let kind = kind_of(&action);
        let mut retried = false;
        let mut busy = 0;
        loop {
            if !self.count(kind) {
                let n = self.calls().total();
                return Err(AdminError::new(action, Cause::Interrupted(n)));
            }
            let source = match call().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if is_admin_401(&source) && !retried {
                tracing::info!(
                    "the Admin API refused the admin token (401); retrying once with a fresh token"
                );
                self.supplier.0.invalidate().await;
                retried = true;
            } else if is_busy(&source) && busy < BUSY_RETRIES {
                let wait = self.backoff.saturating_mul(1 << busy);
                tracing::info!(
                    wait_ms = wait.as_millis() as u64,
                    "Keycloak answered busy (429/503); trying again"
                );
                tokio::time::sleep(wait).await;
                busy += 1;
            } else {
                return Err(AdminError {
                    action,
                    cause: Box::new(Cause::Keycloak(source)),
                    retried,
                });
            }
        }
    }

    /// Every element of the list at `/admin/realms/<realm><path>`, read in pages
    /// of [`ListBounds::page`] (`first`/`max`) until a short page.
    ///
    /// # Errors
    /// A failed call, or a bound hit: more than [`ListBounds::max_items`]
    /// elements, or a page longer than asked for (a server that ignores paging).
    pub async fn list<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        action: &str,
    ) -> Result<Vec<T>, AdminError> {
        let ListBounds { page, max_items } = self.bounds;
        let mut out: Vec<T> = Vec::new();
        loop {
            let mut q = query.to_vec();
            q.push(("first", out.len().to_string()));
            q.push(("max", page.to_string()));
            let got: Vec<T> = self.get_capped(path, &q, action).await?;
            let n = got.len();
            if n > page {
                return Err(bound(action, format!("a page of {n} elements was answered for max={page}: the server ignores paging, so the list cannot be read completely")));
            }
            out.extend(got);
            if out.len() > max_items {
                return Err(bound(action, format!("more than {max_items} elements (the bound of one list read): nothing was decided on a partial list")));
            }
            if n < page {
                return Ok(out);
            }
        }
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
#[error("{action}: {}{}", cause.render(), cause.hint(*retried))]
pub struct AdminError {
    /// What was attempted (`read clients`, `create client scope deploy:production`).
    pub action: String,
    /// Why it failed (boxed: Keycloak's error is large).
    pub cause: Box<Cause>,
    /// Whether this is the answer to the retry with a freshly fetched token.
    pub retried: bool,
}

/// Why an Admin API action failed.
#[derive(Debug)]
pub enum Cause {
    /// Keycloak's answer (status and message) or a transport failure.
    Keycloak(KeycloakError),
    /// A bound of a list read was hit (the text names it): nothing is decided
    /// on a partial list.
    Bound(String),
    /// What the action needs does not exist (found by reading, not by a 404).
    Missing(String),
    /// Objects of the realm block the action (the text names them).
    Conflict(String),
    /// The `--interrupt-after-calls` test hook stopped the command after this
    /// many calls.
    Interrupted(u64),
}

impl AdminError {
    /// `action` failed for `cause`.
    pub fn new(action: String, cause: Cause) -> Self {
        AdminError {
            action,
            cause: Box::new(cause),
            retried: false,
        }
    }

    /// What `action` needs does not exist (`text` says what).
    pub fn missing(action: String, text: String) -> Self {
        Self::new(action, Cause::Missing(text))
    }

    /// The HTTP status Keycloak answered, when it answered.
    pub fn status(&self) -> Option<u16> {
        match &*self.cause {
            Cause::Keycloak(KeycloakError::HttpFailure { status, .. }) => Some(*status),
            Cause::Keycloak(KeycloakError::ReqwestFailure(_))
            | Cause::Bound(_)
            | Cause::Missing(_)
            | Cause::Conflict(_)
            | Cause::Interrupted(_) => None,
        }
    }
}

impl Cause {
    fn render(&self) -> String {
        match self {
            Cause::Keycloak(e) => render(e),
            Cause::Bound(text) => text.clone(),
            Cause::Missing(text) => format!("not found: {}", sanitize(text)),
            Cause::Conflict(text) => text.clone(),
            Cause::Interrupted(n) => {
                format!("interrupted after {n} Admin API calls (--interrupt-after-calls)")
            }
        }
    }

    fn hint(&self, retried: bool) -> &'static str {
        match self {
            Cause::Keycloak(e) => hint(e, retried),
            Cause::Bound(_) | Cause::Missing(_) | Cause::Conflict(_) | Cause::Interrupted(_) => "",
        }
    }
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
        // A URL (`scheme://`, never base64url) without a query value is an
        // address the reader needs (the token endpoint, Keycloak's base URL).
        let url = word.contains("://") && !word.contains('=');
        let jwt_like = !url && word.matches('.').count() >= 2 && word.len() > 30;
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

fn hint(e: &KeycloakError, retried: bool) -> &'static str {
    match e {
        KeycloakError::HttpFailure { status: 401, text, .. }
            if text.starts_with(TOKEN_ENDPOINT_MARK) =>
        {
            " (the token endpoint refused the admin client: check the admin client's id, secret and --admin-realm)"
        }
        KeycloakError::HttpFailure { status: 401, .. } if retried => {
            " (the Admin API refused the admin token, and again a token fetched just now: the admin \
             client's credentials are accepted but its tokens are not; check that keycloak.base_url is \
             the address Keycloak issues tokens for (its hostname setting) and that the clocks agree)"
        }
        KeycloakError::HttpFailure { status: 401, .. } => {
            " (the Admin API refused the admin token)"
        }
        KeycloakError::HttpFailure { status: 404, .. } => {
            " (no such realm or object: check keycloak.base_url, keycloak.realm and --admin-realm)"
        }
        KeycloakError::HttpFailure { status: 403, .. } => {
            " (the admin client lacks a realm-management role; docs/src/keycloak.md lists \
             the roles plan and apply need)"
        }
        KeycloakError::HttpFailure { .. } | KeycloakError::ReqwestFailure(_) => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Error text keeps the addresses a reader needs and hides anything shaped
    /// like a token, also inside a URL's query.
    #[test]
    fn sanitized_errors_keep_urls_and_hide_tokens() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZG1pbiIsImV4cCI6MX0.c2lnbmF0dXJlLXZhbHVl";
        let url = "http://127.0.0.1:18080/realms/ci/protocol/openid-connect/token";
        let out = sanitize(&format!(
            "could not obtain a token from {url} (error sending request for url ({url}/x))"
        ));
        assert!(out.contains(url), "{out}");
        for hidden in [
            format!("got {jwt} back"),
            format!("Authorization: Bearer {}", "opaque-token-value"),
            format!("see {url}?access_token={jwt}"),
        ] {
            let out = sanitize(&hidden);
            assert!(
                !out.contains(jwt) && !out.contains("opaque-token-value"),
                "{out}"
            );
        }
    }

    /// Every action the provisioning code names is counted under the kind of
    /// object it reads or changes.
    #[test]
    fn admin_calls_are_counted_by_object_kind() {
        for (action, kind) in [
            ("read the server's features", "server info"),
            ("read the user profile", "user profile"),
            (
                "declare the identity attributes in the user profile",
                "user profile",
            ),
            ("update the identity provider", "identity provider"),
            ("list users linked to the identity provider", "users"),
            ("read the links of user 1f0c", "users"),
            ("read the repository users", "users"),
            ("create 100 users", "users"),
            ("update user bitbucket.a.b", "users"),
            ("read the role mappings of bitbucket.a.b", "users"),
            ("read the service-account user of sts-deploy", "clients"),
            (
                "add release-api roles to the service account of sts-deploy",
                "clients",
            ),
            ("read members of group /release-readers", "groups"),
            ("add release-api roles to group release-readers", "groups"),
            ("attach default scope deploy to sts-deploy", "clients"),
            ("read default client scopes of 1f0c", "client scopes"),
            ("update client scope deploy:production", "client scopes"),
            ("read holders of role deploy-api/deploy", "roles"),
            ("create role deploy-api/deploy", "roles"),
            ("set the secret of client sts-artifacts", "clients"),
            ("update resource server deploy-api", "clients"),
            ("read clients", "clients"),
            ("remove mapper from client sts-deploy", "clients"),
            ("add mapper to client scope deploy", "client scopes"),
            ("read realm roles", "roles"),
        ] {
            assert_eq!(kind_of(action), kind, "{action}");
        }
    }

    /// A token is renewed before it expires whatever its lifespan, including
    /// admin tokens of a few seconds (issue 19 §6c).
    #[test]
    fn admin_tokens_are_renewed_within_their_own_lifetime() {
        for life in [1, 2, 4, 5, 10, 30, 60, 300, 3600] {
            let renew = renew_after(Some(life));
            assert!(
                renew < Duration::from_secs(life),
                "a {life} s token is used until {renew:?}"
            );
            assert!(
                renew >= Duration::from_secs(life) / 2,
                "{life} s: {renew:?}"
            );
        }
        assert!(renew_after(Some(86_400)) < Duration::from_secs(3600));
    }
}
