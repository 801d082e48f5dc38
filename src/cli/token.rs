//! `keycloak-ci-sts token`: the client a pipeline step or an agent runs instead of
//! the curl line. It sends the step's OIDC token to the service (RFC 8693 token
//! exchange), retries 429 and 503 as the service's `Retry-After` says within a
//! bounded total time, and writes the access token to a 0600 file (created
//! atomically), or to standard output only when asked: in a pipeline, standard
//! output is the build log.
//!
//! Exit codes: 0 issued; 1 refused (the message names `error_code` and
//! `request_id`); 2 usage (no subject token, no URL, bad output path); 75
//! (`EX_TEMPFAIL`) still unavailable when the wait budget ran out.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::domain::SecretToken;

/// Exit code when the service stayed unavailable (sysexits `EX_TEMPFAIL`).
pub const EXIT_TEMPORARY: u8 = 75;

/// Largest answer read from the service, in bytes.
const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// Where the access token goes.
#[derive(Debug)]
pub enum Output {
    /// A file, mode 0600, written atomically (temporary file + rename).
    File(PathBuf),
    /// Standard output, the token alone.
    Stdout,
    /// Standard output, `{access_token, expires_in, scope, issued_token_type}`.
    Json,
}

/// Arguments of `token`.
#[derive(Debug)]
pub struct TokenArgs {
    /// The service's base URL (`--url` or `KCS_STS_URL`).
    pub url: String,
    /// The file holding the subject token; `None`: `$BITBUCKET_STEP_OIDC_TOKEN`.
    pub subject_token_file: Option<PathBuf>,
    /// RFC 8693 `audience`.
    pub audience: String,
    /// RFC 8693 `scope` values (sent space-separated).
    pub scopes: Vec<String>,
    /// Where the token goes.
    pub output: Output,
    /// Longest total time spent waiting for `Retry-After`, seconds.
    pub max_wait_seconds: u64,
}

#[derive(Deserialize)]
struct Issued {
    #[serde(deserialize_with = "secret")]
    access_token: SecretToken,
    expires_in: u64,
    scope: Option<String>,
    issued_token_type: Option<String>,
}

#[derive(Deserialize, Default)]
struct Refusal {
    error: Option<String>,
    error_code: Option<String>,
    error_description: Option<String>,
    request_id: Option<String>,
}

fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretToken, D::Error> {
    String::deserialize(d).map(SecretToken::new)
}

fn subject_token(file: Option<&Path>) -> anyhow::Result<SecretToken> {
    let value = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("cannot read --subject-token-file {}: {e}", f.display()))?,
        None => std::env::var("BITBUCKET_STEP_OIDC_TOKEN").map_err(|_| {
            anyhow::anyhow!(
                "BITBUCKET_STEP_OIDC_TOKEN is not set: add `oidc: true` to the step, or use --subject-token-file"
            )
        })?,
    };
    let value = value.trim().to_string();
    if value.is_empty() {
        anyhow::bail!("the subject token is empty");
    }
    Ok(SecretToken::new(value))
}

/// Writes `text` to `path` with mode 0600, atomically (a temporary file in the
/// same directory, renamed over `path`).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(".keycloak-ci-sts-token.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write {}: {e}", path.display())
    })
}

/// The one-line message of a refusal (never the token).
fn refusal_line(status: u16, r: &Refusal) -> String {
    let clean = |s: &Option<String>| {
        s.as_deref()
            .map(|v| crate::domain::truncate(&v.replace(|c: char| c.is_control(), " "), 300))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "HTTP {status} {} {} (request_id {}): {}",
        clean(&r.error),
        clean(&r.error_code),
        clean(&r.request_id),
        clean(&r.error_description)
    )
}

/// Runs `token`.
///
/// # Errors
/// Usage errors (exit 2): no subject token, an unusable URL or output path.
pub fn token(a: TokenArgs) -> anyhow::Result<ExitCode> {
    let subject = subject_token(a.subject_token_file.as_deref())?;
    let base = crate::http::check_upstream_url(&a.url).map_err(anyhow::Error::msg)?;
    let endpoint = base.join("token")?;
    if let Output::File(p) = &a.output {
        if p.is_dir() {
            anyhow::bail!("--output {} is a directory", p.display());
        }
    }
    let http = crate::http::client(Duration::from_secs(5), Duration::from_secs(30))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let scope = a.scopes.join(" ");
    let mut form: Vec<(&str, &str)> = vec![
        (
            "grant_type",
            crate::domain::oauth::GRANT_TYPE_TOKEN_EXCHANGE,
        ),
        (
            "subject_token_type",
            crate::domain::oauth::TOKEN_TYPE_ID_TOKEN,
        ),
        ("subject_token", subject.expose()),
        ("audience", &a.audience),
    ];
    if !scope.is_empty() {
        form.push(("scope", &scope));
    }
    let deadline = Instant::now() + Duration::from_secs(a.max_wait_seconds);
    let mut backoff = 1u64;
    let answer = rt.block_on(async {
        loop {
            let sent = http.post(endpoint.clone()).form(&form).send().await;
            let (status, retry_after, body) = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry =
                        crate::http::retry_after_seconds(resp.headers(), Duration::from_secs(3600));
                    let body = crate::http::read_capped(resp, MAX_ANSWER_BYTES)
                        .await
                        .unwrap_or_default();
                    (Some(status), retry, body)
                }
                Err(e) => {
                    eprintln!(
                        "keycloak-ci-sts token: {} unreachable ({})",
                        endpoint,
                        crate::telemetry::chain(&e)
                    );
                    (None, None, Vec::new())
                }
            };
            let transient = matches!(status, None | Some(429 | 503));
            if !transient {
                return (status, body);
            }
            let wait = retry_after.unwrap_or(backoff).max(1);
            backoff = (backoff * 2).min(30);
            if Instant::now() + Duration::from_secs(wait) > deadline {
                return (status, body);
            }
            eprintln!("keycloak-ci-sts token: temporarily unavailable; retrying in {wait} s");
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    });
    match answer {
        (Some(200), body) => {
            let issued: Issued = serde_json::from_slice(&body).map_err(|_| {
                anyhow::anyhow!("the service answered 200 without a token response")
            })?;
            let scope = issued.scope.unwrap_or_default();
            match &a.output {
                Output::File(p) => {
                    write_private(p, issued.access_token.expose())?;
                    println!(
                        "wrote {} (expires in {} s, scope `{scope}`)",
                        p.display(),
                        issued.expires_in
                    );
                }
                Output::Stdout => println!("{}", issued.access_token.expose()),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "access_token": issued.access_token.expose(),
                        "expires_in": issued.expires_in,
                        "scope": scope,
                        "issued_token_type": issued.issued_token_type,
                    })
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        (Some(status), body) => {
            let r: Refusal = serde_json::from_slice(&body).unwrap_or_default();
            eprintln!(
                "keycloak-ci-sts token: refused: {}",
                refusal_line(status, &r)
            );
            Ok(ExitCode::from(if matches!(status, 429 | 503) {
                EXIT_TEMPORARY
            } else {
                1
            }))
        }
        (None, _) => {
            eprintln!(
                "keycloak-ci-sts token: the service stayed unreachable for {} s",
                a.max_wait_seconds
            );
            Ok(ExitCode::from(EXIT_TEMPORARY))
        }
    }
}
