//! The client side, run inside a pipeline step: `keycloak-ci-sts token` and the
//! MCP server (`keycloak-ci-sts mcp`) both talk to the service through
//! [`StsClient`], so both send the same requests, retry the same way and report
//! refusals the same way.
//!
//! - `POST /token` (RFC 8693 §2.1) with the step's OIDC token, and
//! - `POST /grants` (what this step may obtain),
//!
//! retrying 429 and 503 as the service's `Retry-After` says (exponential backoff
//! from 1 s, at most 30 s, when the service is unreachable or sends none),
//! within a bounded total wait. Tokens are held in [`SecretToken`] (redacted
//! `Debug`); a refusal carries only the service's error fields.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use url::Url;

use crate::domain::oauth::{GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_ID_TOKEN};
use crate::domain::SecretToken;

/// Largest answer read from the service, in bytes.
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// Longest `max_wait` a caller may configure, in seconds.
pub const MAX_WAIT_SECONDS: u64 = 3600;

/// The environment variable Bitbucket sets on a step with `oidc: true`.
pub const SUBJECT_TOKEN_ENV: &str = "BITBUCKET_STEP_OIDC_TOKEN";

/// An access token the service issued (RFC 8693 §2.2.1).
#[derive(Debug, Deserialize)]
pub struct IssuedToken {
    /// The access token (redacted in `Debug`).
    #[serde(deserialize_with = "secret")]
    pub access_token: SecretToken,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// Granted scopes, space-separated.
    #[serde(default)]
    pub scope: Option<String>,
    /// `urn:ietf:params:oauth:token-type:access_token`.
    #[serde(default)]
    pub issued_token_type: Option<String>,
}

/// One entry of a `POST /grants` answer (the service's `policy::Offer`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct GrantOffer {
    /// The RFC 8693 `audience` to request.
    pub audience: String,
    /// Scopes that may be requested (any subset).
    pub scopes: Vec<String>,
    /// What a request without scopes obtains; `null` when it must name scopes.
    pub default_scopes: Option<Vec<String>>,
    /// Longest lifetime of the issued token, seconds.
    pub max_lifetime_seconds: u64,
}

/// A `POST /grants` answer.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Grants {
    /// The caller's verified claims, as Bitbucket names them.
    pub identity: serde_json::Map<String, serde_json::Value>,
    /// The repository's `full_name`, where the service's inventory knows it.
    #[serde(default)]
    pub repository: Option<String>,
    /// What the caller may obtain, by audience.
    pub grants: Vec<GrantOffer>,
}

/// The error fields of a refusal (RFC 6749 §5.2 plus the service's own).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Refusal {
    /// HTTP status.
    #[serde(skip_deserializing)]
    pub status: u16,
    /// RFC 6749 `error`.
    pub error: Option<String>,
    /// The service's stable `error_code` (README error table).
    pub error_code: Option<String>,
    /// `error_description`.
    pub error_description: Option<String>,
    /// The request id, for the operator's logs and audit trail.
    pub request_id: Option<String>,
}

impl Refusal {
    /// One line: `HTTP <status> <error> <error_code> (request_id …): <description>`,
    /// control characters replaced, each field at most 300 bytes.
    pub fn line(&self) -> String {
        let clean = |s: &Option<String>| {
            s.as_deref()
                .map(|v| crate::domain::truncate(&v.replace(|c: char| c.is_control(), " "), 300))
                .unwrap_or_else(|| "-".into())
        };
        format!(
            "HTTP {} {} {} (request_id {}): {}",
            self.status,
            clean(&self.error),
            clean(&self.error_code),
            clean(&self.request_id),
            clean(&self.error_description)
        )
    }
}

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service refused (4xx, 5xx other than 503; or 429/503 past the wait budget).
    #[error("refused: {}", .0.line())]
    Refused(Refusal),
    /// Still 429/503 when the wait budget ran out.
    #[error("temporarily unavailable: {}", .0.line())]
    Unavailable(Refusal),
    /// The service stayed unreachable; the seconds waited before giving up
    /// (the next retry would have passed the wait budget).
    #[error("the service stayed unreachable (gave up after {0} s)")]
    Unreachable(u64),
    /// A 200 answer that is not what the endpoint answers.
    #[error("the service answered 200 without a {0}")]
    Malformed(&'static str),
}

impl ClientError {
    /// True for the errors worth trying again later (exit 75 in the CLI).
    pub fn is_temporary(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Unreachable(_))
    }

    /// The service's `error_code`, when it answered with one.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            Self::Refused(r) | Self::Unavailable(r) => r.error_code.as_deref(),
            _ => None,
        }
    }
}

fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretToken, D::Error> {
    String::deserialize(d).map(SecretToken::new)
}

/// The step's OIDC token: read from `file`, or from `$BITBUCKET_STEP_OIDC_TOKEN`;
/// surrounding whitespace removed.
///
/// # Errors
/// The file is unreadable, the variable unset, or the token empty (the message
/// never contains the token).
pub fn subject_token(file: Option<&Path>) -> Result<SecretToken, String> {
    let value = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read --subject-token-file {}: {e}", f.display()))?,
        None => std::env::var(SUBJECT_TOKEN_ENV).map_err(|_| {
            format!(
                "{SUBJECT_TOKEN_ENV} is not set: add `oidc: true` to the step, or use --subject-token-file"
            )
        })?,
    };
    let value = value.trim().to_string();
    if value.is_empty() {
        return Err("the subject token is empty".into());
    }
    Ok(SecretToken::new(value))
}

/// Writes `text` to `path` with mode 0600, atomically: a new temporary file in
/// the same directory (never an existing one, so no symlink is followed), then
/// renamed over `path`.
///
/// # Errors
/// The I/O error, naming the path.
pub fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".keycloak-ci-sts-token.{}.{}.tmp",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", tmp.display()));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

/// A client of one service.
#[derive(Debug, Clone)]
pub struct StsClient {
    http: reqwest::Client,
    base: Url,
    max_wait: Duration,
}

impl StsClient {
    /// A client of the service at `url` (its base URL: https, or http to a
    /// loopback address) that waits at most `max_wait_seconds` in total for
    /// retries (capped at [`MAX_WAIT_SECONDS`]).
    ///
    /// # Errors
    /// An unusable URL, or the TLS backend failing to start.
    pub fn new(url: &str, max_wait_seconds: u64) -> Result<Self, String> {
        let mut base = crate::http::check_upstream_url(url)?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let http = crate::http::client(Duration::from_secs(5), Duration::from_secs(30))
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            http,
            base,
            max_wait: Duration::from_secs(max_wait_seconds.min(MAX_WAIT_SECONDS)),
        })
    }

    /// RFC 8693 token exchange: `audience`, `scopes` (none: the grant's
    /// defaults).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn token(
        &self,
        subject: &SecretToken,
        audience: &str,
        scopes: &[String],
    ) -> Result<IssuedToken, ClientError> {
        let scope = scopes.join(" ");
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
            ("subject_token_type", TOKEN_TYPE_ID_TOKEN),
            ("subject_token", subject.expose()),
            ("audience", audience),
        ];
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        let body = self.post("token", &form).await?;
        serde_json::from_slice(&body).map_err(|_| ClientError::Malformed("token response"))
    }

    /// `POST /grants`: what this step may obtain.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn grants(&self, subject: &SecretToken) -> Result<Grants, ClientError> {
        let form = [
            ("subject_token_type", TOKEN_TYPE_ID_TOKEN),
            ("subject_token", subject.expose()),
        ];
        let body = self.post("grants", &form).await?;
        serde_json::from_slice(&body).map_err(|_| ClientError::Malformed("grants answer"))
    }

    /// POSTs the form to `path`, retrying 429/503 and transport failures
    /// within the wait budget; returns the 200 body.
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Result<Vec<u8>, ClientError> {
        let endpoint = self
            .base
            .join(path)
            .map_err(|_| ClientError::Malformed("URL"))?;
        let started = Instant::now();
        let deadline = started + self.max_wait;
        let mut backoff = 1u64;
        loop {
            let (retry_after, last) = match self.http.post(endpoint.clone()).form(form).send().await
            {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry =
                        crate::http::retry_after_seconds(resp.headers(), Duration::from_secs(3600));
                    let body = crate::http::read_capped(resp, MAX_ANSWER_BYTES)
                        .await
                        .unwrap_or_default();
                    if status == 200 {
                        return Ok(body);
                    }
                    let mut refusal: Refusal = serde_json::from_slice(&body).unwrap_or_default();
                    refusal.status = status;
                    if !matches!(status, 429 | 503) {
                        return Err(ClientError::Refused(refusal));
                    }
                    (retry, ClientError::Unavailable(refusal))
                }
                Err(e) => {
                    eprintln!(
                        "keycloak-ci-sts: {endpoint} unreachable ({})",
                        crate::telemetry::chain(&e)
                    );
                    (None, ClientError::Unreachable(started.elapsed().as_secs()))
                }
            };
            let wait = retry_after.unwrap_or(backoff).max(1);
            backoff = (backoff * 2).min(30);
            if Instant::now() + Duration::from_secs(wait) > deadline {
                return Err(last);
            }
            eprintln!("keycloak-ci-sts: temporarily unavailable; retrying in {wait} s");
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    }
}
