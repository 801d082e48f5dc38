//! `keycloak-ci-sts token`: the client a pipeline step or an agent runs instead of
//! the curl line ([`crate::client::StsClient`]). It sends the step's OIDC token
//! to the service (RFC 8693 token exchange), retries 429 and 503 as the
//! service's `Retry-After` says within a bounded total time, and writes the
//! access token to a 0600 file (created atomically), or to standard output only
//! when asked: in a pipeline, standard output is the build log. `--list` prints
//! what the step may obtain (`POST /grants`) instead.
//!
//! Exit codes: 0 issued (or listed); 1 refused (the message names `error_code`
//! and `request_id`); 2 usage (no subject token, no URL, bad output path); 75
//! (`EX_TEMPFAIL`) still unavailable when the wait budget ran out.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::client::{write_private, ClientError, Grants, StsClient};

/// Exit code when the service stayed unavailable (sysexits `EX_TEMPFAIL`).
pub const EXIT_TEMPORARY: u8 = 75;

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

/// What `token` does.
#[derive(Debug)]
pub enum Action {
    /// Exchange for `audience` and `scopes`, writing the token to `output`.
    Exchange {
        /// RFC 8693 `audience`.
        audience: String,
        /// RFC 8693 `scope` values (sent space-separated).
        scopes: Vec<String>,
        /// Where the token goes.
        output: Output,
    },
    /// List what the step may obtain; `json`: the service's answer as JSON.
    List {
        /// Print JSON instead of lines.
        json: bool,
    },
}

/// Arguments of `token`.
#[derive(Debug)]
pub struct TokenArgs {
    /// The service's base URL (`--url` or `KCS_STS_URL`).
    pub url: String,
    /// The file holding the subject token; `None`: `$BITBUCKET_STEP_OIDC_TOKEN`.
    pub subject_token_file: Option<PathBuf>,
    /// What to do.
    pub action: Action,
    /// Longest total time spent waiting for `Retry-After`, seconds.
    pub max_wait_seconds: u64,
}

/// Runs `token`.
///
/// # Errors
/// Usage errors (exit 2): no subject token, an unusable URL or output path.
pub fn token(a: TokenArgs) -> anyhow::Result<ExitCode> {
    let subject = crate::client::subject_token(a.subject_token_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    let client = StsClient::new(&a.url, a.max_wait_seconds).map_err(anyhow::Error::msg)?;
    if let Action::Exchange {
        output: Output::File(p),
        ..
    } = &a.action
    {
        if p.is_dir() {
            anyhow::bail!("--output {} is a directory", p.display());
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match a.action {
        Action::List { json } => match rt.block_on(client.grants(&subject)) {
            Ok(g) => {
                print_grants(&g, json)?;
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Ok(failed(&e)),
        },
        Action::Exchange {
            audience,
            scopes,
            output,
        } => match rt.block_on(client.token(&subject, &audience, &scopes)) {
            Ok(issued) => {
                let scope = issued.scope.unwrap_or_default();
                match &output {
                    Output::File(p) => {
                        write_private(p, issued.access_token.expose())
                            .map_err(anyhow::Error::msg)?;
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
            Err(e) => Ok(failed(&e)),
        },
    }
}

/// Reports `e` on standard error; exit 75 when temporary, else 1.
fn failed(e: &ClientError) -> ExitCode {
    eprintln!("keycloak-ci-sts token: {e}");
    ExitCode::from(if e.is_temporary() { EXIT_TEMPORARY } else { 1 })
}

/// One line per grant: `audience  scopes  default: …  max N s`.
fn print_grants(g: &Grants, json: bool) -> anyhow::Result<()> {
    if json {
        return super::out(&serde_json::to_string_pretty(g)?);
    }
    if g.grants.is_empty() {
        eprintln!("keycloak-ci-sts token: this step may obtain nothing");
    }
    // What the service sent, without control characters (a build log is a
    // terminal: no escape sequences, no forged lines).
    let clean = |s: &str| s.replace(|c: char| c.is_control(), "?");
    for o in &g.grants {
        let defaults = match &o.default_scopes {
            Some(d) => clean(&d.join(" ")),
            None => "(none: name the scopes)".into(),
        };
        super::out(&format!(
            "{}\tscopes: {}\tdefault: {}\tmax {} s",
            clean(&o.audience),
            clean(&o.scopes.join(" ")),
            defaults,
            o.max_lifetime_seconds
        ))?;
    }
    Ok(())
}
