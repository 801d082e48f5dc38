//! `keycloak-ci-sts token`: the client a pipeline step or an agent runs instead of
//! the curl line ([`crate::client::StsClient`]). It sends the step's OIDC token
//! to the service (RFC 8693 token exchange), retries 429 and 503 as the
//! service's `Retry-After` says within a bounded total time, and writes the
//! access token to a 0600 file (created before the request, renamed into place
//! after it), or to standard output only when asked: in a pipeline, standard
//! output is the build log. `--list` prints
//! what the step may obtain (`POST /grants`) instead.
//!
//! Exit codes: 0 issued (or listed); 1 refused (the message names `error_code`
//! and `request_id`); 2 usage (no subject token, no URL, bad output path:
//! all checked before any request); 75
//! (`EX_TEMPFAIL`) still unavailable when the wait budget ran out; 130 / 143
//! interrupted by SIGINT / SIGTERM while waiting (the temporary file removed).

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::client::{ClientError, Grants, IssuedToken, OutputFile, StsClient};

/// Exit code when the service stayed unavailable (sysexits `EX_TEMPFAIL`).
pub const EXIT_TEMPORARY: u8 = 75;
/// Exit code after SIGINT (128 + 2, as a shell reports it).
pub const EXIT_SIGINT: u8 = 130;
/// Exit code after SIGTERM (128 + 15).
pub const EXIT_SIGTERM: u8 = 143;

/// Where the access token goes.
#[derive(Debug)]
pub enum Output {
    /// A file, mode 0600: a temporary file created before the request, renamed
    /// over it after.
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

/// Runs `token`. Every local precondition is checked before any request (so a
/// token is never issued, audited and counted only to be lost): the subject
/// token, the URL, and for `--output FILE` the 0600 file itself, created in the
/// target directory ([`OutputFile`]) and renamed into place after the answer.
///
/// # Errors
/// Usage errors (exit 2): no subject token, an unusable URL or output path.
pub fn token(a: TokenArgs) -> anyhow::Result<ExitCode> {
    let subject = crate::client::subject_token(a.subject_token_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    let client = StsClient::new(&a.url, a.max_wait_seconds).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Listening before the temporary file exists: from then on, SIGTERM and
    // SIGINT end the wait and the file is removed (its `Drop`).
    let mut interrupt = {
        let _entered = rt.enter();
        Interrupt::listen()?
    };
    let file = match &a.action {
        Action::Exchange {
            output: Output::File(p),
            ..
        } => Some(OutputFile::create(p, 0o600).map_err(|e| anyhow::anyhow!("--output: {e}"))?),
        _ => None,
    };
    match a.action {
        Action::List { json } => match rt.block_on(interrupt.race(client.grants(&subject))) {
            Err(code) => Ok(code),
            Ok(Ok(g)) => {
                print_grants(&g, json)?;
                Ok(ExitCode::SUCCESS)
            }
            Ok(Err(e)) => Ok(failed(&e)),
        },
        Action::Exchange {
            audience,
            scopes,
            output,
        } => match rt.block_on(interrupt.race(client.token(&subject, &audience, &scopes))) {
            Err(code) => {
                drop(file);
                Ok(code)
            }
            Ok(Ok(issued)) => {
                deliver(&issued, &output, file)?;
                Ok(ExitCode::SUCCESS)
            }
            Ok(Err(e)) => Ok(failed(&e)),
        },
    }
}

/// SIGTERM and SIGINT, caught for the time of the request and its retries.
pub(super) struct Interrupt {
    term: Signal,
    int: Signal,
}

impl Interrupt {
    /// Installs the handlers (inside the runtime's context).
    pub(super) fn listen() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// `work`'s result, or the exit code of the signal that came first.
    async fn race<T>(&mut self, work: impl Future<Output = T>) -> Result<T, ExitCode> {
        self.race_named(work).await.map_err(|(name, code)| {
            eprintln!("keycloak-ci-sts token: interrupted by {name}, nothing written");
            code
        })
    }

    /// `work`'s result, or the name and exit code of the signal that came first.
    pub(super) async fn race_named<T>(
        &mut self,
        work: impl Future<Output = T>,
    ) -> Result<T, (&'static str, ExitCode)> {
        let (name, code) = tokio::select! {
            r = work => return Ok(r),
            _ = self.term.recv() => ("SIGTERM", EXIT_SIGTERM),
            _ = self.int.recv() => ("SIGINT", EXIT_SIGINT),
        };
        Err((name, ExitCode::from(code)))
    }
}

/// Puts the issued token where `output` says (`file`: the one prepared for
/// [`Output::File`]).
fn deliver(issued: &IssuedToken, output: &Output, file: Option<OutputFile>) -> anyhow::Result<()> {
    let scope = issued.scope.as_deref().unwrap_or_default();
    match (output, file) {
        (Output::File(_), Some(f)) => {
            let shown = f.path().display().to_string();
            f.write(issued.access_token.expose())
                .map_err(anyhow::Error::msg)?;
            println!(
                "wrote {shown} (expires in {} s, scope `{scope}`)",
                issued.expires_in
            );
        }
        (Output::File(p), None) => anyhow::bail!("--output {}: not prepared", p.display()),
        (Output::Stdout, _) => println!("{}", issued.access_token.expose()),
        (Output::Json, _) => println!(
            "{}",
            serde_json::json!({
                "access_token": issued.access_token.expose(),
                "expires_in": issued.expires_in,
                "scope": scope,
                "issued_token_type": issued.issued_token_type,
            })
        ),
    }
    Ok(())
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

/// `token inspect`: decodes the token, verifies it against `--realm` when
/// given, looks it up in `--audit`, and prints the result (never the token).
///
/// # Errors
/// Unreadable input, a token that is not a JWS, the realm's keys unavailable,
/// an unreadable audit file (exit 2).
pub fn inspect(a: &super::InspectArgs) -> anyhow::Result<ExitCode> {
    use crate::inspect;
    let raw = match a.token_file.as_deref().filter(|p| p.as_os_str() != "-") {
        Some(p) => crate::domain::regular_file::read_small_file(p, inspect::MAX_TOKEN_BYTES as u64)
            .map_err(|e| anyhow::anyhow!("cannot read --token-file {}: {e}", p.display()))?,
        None => {
            use std::io::Read;
            let mut s = String::new();
            std::io::stdin()
                .take(inspect::MAX_TOKEN_BYTES as u64 + 1)
                .read_to_string(&mut s)?;
            s
        }
    };
    let token = crate::domain::SecretToken::new(raw.trim().to_string());
    let decoded = inspect::decode(&token)?;
    let verification = match &a.realm {
        None => None,
        Some(realm) => {
            let realm = url::Url::parse(realm).map_err(|e| anyhow::anyhow!("--realm: {e}"))?;
            if realm.path().ends_with('/') {
                anyhow::bail!(
                    "--realm must not end in `/`: the issuer is compared exactly, and so do the examples (RS_ISSUER)"
                );
            }
            if !realm.username().is_empty() || realm.password().is_some() {
                anyhow::bail!(
                    "--realm: no user or password in the URL (the realm's keys are public)"
                );
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let keys = rt.block_on(inspect::fetch_keys(&realm))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Some(inspect::verify(
                &token,
                &decoded,
                &keys,
                &realm,
                a.audience.as_deref(),
                now,
            ))
        }
    };
    let audit = if a.audit.is_empty() {
        None
    } else {
        Some(inspect::find_in_audit(&a.audit, &decoded.token_sha256)?)
    };
    let refused = verification.as_ref().and_then(|v| v.refused).is_some();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "token_sha256": decoded.token_sha256,
                "header": decoded.header,
                "claims": decoded.claims,
                "roles": inspect::roles(&decoded.claims).into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                "verification": verification,
                "audit": audit.as_ref().map(|m| m.as_ref().map(|m| &m.line)),
            }))?
        );
    } else {
        print!(
            "{}",
            inspect_text(&decoded, verification.as_ref(), audit.as_ref())
        );
    }
    Ok(if refused {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The text form of `token inspect`: the token's claims, then the checks,
/// then the audit line.
fn inspect_text(
    d: &crate::inspect::Decoded,
    verification: Option<&crate::inspect::Verification>,
    audit: Option<&Option<crate::inspect::AuditMatch>>,
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_secs())
        .unwrap_or(0);
    let mut out = claims_text(d, now);
    out.push_str(&verification_text(verification));
    if let Some(audit) = audit {
        out.push_str(&audit_text(audit.as_ref()));
    }
    out
}

/// A string member of `map`, escaped for the terminal, or `-`.
fn text_field(map: &serde_json::Map<String, serde_json::Value>, k: &str) -> String {
    map.get(k)
        .and_then(serde_json::Value::as_str)
        .map(crate::inspect::printable)
        .unwrap_or_else(|| "-".into())
}

/// Header, claims, roles per client and the lifetime left at `now`.
fn claims_text(d: &crate::inspect::Decoded, now: u64) -> String {
    use crate::inspect::{audiences, printable, roles};
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "token: not printed; sha256 {}", d.token_sha256);
    let h = |k: &str| text_field(&d.header, k);
    let _ = writeln!(
        out,
        "header: alg {}, kid {}, typ {}",
        h("alg"),
        h("kid"),
        h("typ")
    );
    for (label, key) in [
        ("issuer", "iss"),
        ("subject", "sub"),
        ("typ", "typ"),
        ("azp (client)", "azp"),
        ("scope", "scope"),
        ("preferred_username", "preferred_username"),
        ("repository_uuid", "repository_uuid"),
    ] {
        if d.claims.get(key).is_some_and(serde_json::Value::is_string) {
            let _ = writeln!(out, "{label}: {}", text_field(&d.claims, key));
        }
    }
    let _ = writeln!(out, "aud: {}", printable(&audiences(&d.claims).join(", ")));
    let _ = writeln!(out, "roles:");
    for (client, r) in roles(&d.claims) {
        let _ = writeln!(
            out,
            "  {}: {}",
            printable(&client),
            printable(&r.join(", "))
        );
    }
    let n = |k: &str| d.claims.get(k).and_then(serde_json::Value::as_u64);
    let _ = match (n("iat"), n("exp")) {
        (Some(iat), Some(exp)) if exp > now => writeln!(
            out,
            "lifetime: {} s, {} s left",
            exp.saturating_sub(iat),
            exp - now
        ),
        (_, Some(exp)) => writeln!(out, "lifetime: expired {} s ago", now.saturating_sub(exp)),
        _ => writeln!(out, "lifetime: no exp"),
    };
    out
}

/// Each check made against the realm, and the result.
fn verification_text(verification: Option<&crate::inspect::Verification>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some(v) = verification else {
        let _ = writeln!(
            out,
            "verification: not done (give --realm; nothing above is verified)"
        );
        return out;
    };
    let _ = writeln!(out, "verification against {}:", v.realm);
    for c in &v.checks {
        let _ = writeln!(
            out,
            "  {:<9} {}  {}",
            c.name,
            if c.passed { "ok     " } else { "REFUSED" },
            c.detail
        );
    }
    if !v.checks.iter().any(|c| c.name == "aud") {
        let _ = writeln!(
            out,
            "  aud       -        not checked (give --audience with the API's client id)"
        );
    }
    let _ = match v.refused {
        Some(r) => writeln!(out, "result: a resource server would refuse it ({r}: the first check that failed)"),
        None => writeln!(out, "result: accepted by the checks made (azp and roles are shown above, not judged: only the API knows its allow-list and role)"),
    };
    out
}

/// The audit line that issued the token, or that none did.
fn audit_text(audit: Option<&crate::inspect::AuditMatch>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some(m) = audit else {
        let _ = writeln!(out, "audit: no line with this token's sha256 (not issued by this service, or another audit file)");
        return out;
    };
    let Some(line) = m.line.as_object() else {
        return out;
    };
    let _ = writeln!(
        out,
        "audit: issued by request {} at {}",
        text_field(line, "request_id"),
        line.get("time")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    );
    for k in [
        "policy",
        "keycloak_client",
        "audience",
        "repository_full_name",
        "repositoryUuid",
        "branchName",
        "deploymentEnvironmentUuid",
        "stepUuid",
        "identity",
        "keycloak_user_id",
    ] {
        let _ = writeln!(out, "  {k}: {}", text_field(line, k));
    }
    out
}
