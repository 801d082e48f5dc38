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
use crate::domain::regular_file::read_small_file;
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
    /// The service's stable `error_code` (error-code table, docs/src/error-codes.md).
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
    /// A scope named is not an RFC 6749 §3.3 scope token: sent joined with the
    /// others, the service would read other scopes from it. Nothing was sent.
    #[error("scope `{0}` is not an RFC 6749 scope token (1 to 256 characters, no spaces, quotes or backslashes); nothing was sent")]
    InvalidScope(String),
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

/// Largest subject token file read, in bytes (a Bitbucket OIDC token is about
/// 1 KiB).
pub const MAX_SUBJECT_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// The step's OIDC token: read from `file` ([`read_small_file`](crate::domain::regular_file::read_small_file), at most
/// [`MAX_SUBJECT_TOKEN_FILE_BYTES`]), or from `$BITBUCKET_STEP_OIDC_TOKEN`;
/// surrounding whitespace removed.
///
/// # Errors
/// The file is unreadable, not a regular file or too large, the variable unset,
/// or the token empty (the message never contains the token).
pub fn subject_token(file: Option<&Path>) -> Result<SecretToken, String> {
    let value = match file {
        Some(f) => read_small_file(f, MAX_SUBJECT_TOKEN_FILE_BYTES)
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

/// The file a result goes to (a token, an inventory), prepared **before** the
/// request: a new temporary file with the given mode, created exclusively (`O_EXCL`: never an existing file, so
/// no symbolic link or FIFO is opened) in the target's directory. [`OutputFile::write`]
/// renames it over the target; dropped unwritten (a refusal, an error), it is
/// removed. So a missing directory, a directory as target or an unwritable
/// place is found before a token is issued, audited and counted.
///
/// Only a regular file is ever replaced: an existing target that is anything
/// else (`check_target`: a directory, a FIFO, a socket, a device such as
/// `/dev/null`, or a symbolic link) is refused before the request, and again
/// just before the rename.
pub struct OutputFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl OutputFile {
    /// Creates the temporary file for `path` with `mode` (0600 for tokens).
    ///
    /// # Errors
    /// `path` names no file or a directory, or the file cannot be created
    /// (the message names the path).
    pub fn create(path: &Path, mode: u32) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        if path.file_name().is_none() {
            return Err(format!("{} is a directory", path.display()));
        }
        check_target(path)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".keycloak-ci-sts.")
            .suffix(".tmp")
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(dir)
            .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// The target path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text`, syncs and renames the file over the target.
    ///
    /// # Errors
    /// The I/O error, naming the path (the temporary file is removed).
    pub fn write(self, text: &str) -> Result<(), String> {
        let Self { mut tmp, path } = self;
        let fail = |e: &dyn std::fmt::Display| format!("cannot write {}: {e}", path.display());
        tmp.write_all(text.as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| fail(&e))?;
        // The entry may have changed during the request: checked again.
        check_target(&path)?;
        tmp.persist(&path).map_err(|e| fail(&e.error))?;
        Ok(())
    }
}

/// What may be at an output path: nothing, or a regular file (replaced by the
/// rename). Anything else is refused, looked at with `lstat(2)` (never opened,
/// never followed): a rename would replace a device (`/dev/null` as root) or a
/// FIFO (its reader would never get the token) with a file. A symbolic link is
/// refused too, wherever it points: the rename would replace the link itself,
/// not its target, so whoever reads through the target would get a stale token
/// or none; naming the resolved path is the caller's simple, explicit choice.
///
/// # Errors
/// The target is a directory, a symbolic link or another non-regular file, or
/// cannot be inspected (the message names the path and what it is).
fn check_target(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    let kind = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {shown}: {e}")),
        Ok(m) => m.file_type(),
    };
    if kind.is_file() {
        return Ok(());
    }
    if kind.is_dir() {
        return Err(format!("{shown} is a directory"));
    }
    if kind.is_symlink() {
        return Err(format!(
            "{shown} is a symbolic link: it is never replaced, name the file itself"
        ));
    }
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "of another kind"
    };
    Err(format!(
        "{shown} exists and is not a regular file ({what}): it is never replaced"
    ))
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
        check_scopes(scopes)?;
        let scope = scopes.join(" ");
        let form = token_form(subject, audience, &scope);
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

/// Each scope must be one RFC 6749 §3.3 scope token, so that the joined
/// `scope` parameter says exactly the scopes named (`["a b"]` is not `a` and `b`).
///
/// # Errors
/// [`ClientError::InvalidScope`] naming the first other one (truncated).
pub(crate) fn check_scopes(scopes: &[String]) -> Result<(), ClientError> {
    match scopes
        .iter()
        .find(|s| !crate::domain::oauth::is_scope_token(s))
    {
        Some(s) => Err(ClientError::InvalidScope(crate::domain::truncate(
            &s.escape_debug().to_string(),
            64,
        ))),
        None => Ok(()),
    }
}

/// The `POST /token` form (RFC 8693 §2.1) for `audience` and the space-joined
/// `scope` (omitted when empty).
pub(crate) fn token_form<'a>(
    subject: &'a SecretToken,
    audience: &'a str,
    scope: &'a str,
) -> Vec<(&'static str, &'a str)> {
    let mut form = vec![
        ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
        ("subject_token_type", TOKEN_TYPE_ID_TOKEN),
        ("subject_token", subject.expose()),
        ("audience", audience),
    ];
    if !scope.is_empty() {
        form.push(("scope", scope));
    }
    form
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `mcp_args` fuzz target: `["deploy:api artifacts:write"]`
    /// was sent as `scope=deploy:api artifacts:write`, two scopes the caller
    /// did not name one by one. Refused before any request now.
    #[test]
    fn a_scope_that_is_not_one_scope_token_is_refused_before_sending() {
        let client = StsClient::new("http://127.0.0.1:9", 0).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let subject = SecretToken::new("a.b.c");
        for scopes in [
            vec!["deploy:api artifacts:write"],
            vec![""],
            vec!["ok", "a\"b"],
        ] {
            let scopes: Vec<String> = scopes.into_iter().map(String::from).collect();
            let got = rt.block_on(client.token(&subject, "deploy-api", &scopes));
            assert!(
                matches!(got, Err(ClientError::InvalidScope(_))),
                "{scopes:?}: expected InvalidScope, got {:?}",
                got.map(|_| "a token").map_err(|e| e.to_string())
            );
        }
    }
}
