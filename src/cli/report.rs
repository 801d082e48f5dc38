//! `report access`: the access review (issue #23).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use crate::client::OutputFile;
use crate::policy::PolicySet;
use crate::report::{audit, render};

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Markdown (a pull request or a ticket).
    Markdown,
    /// One self-contained HTML file.
    Html,
    /// JSON (for tooling).
    Json,
    /// The JSON Schema of the JSON form (nothing else is read).
    JsonSchema,
}

/// Arguments of `report access`.
#[derive(Debug, clap::Args)]
pub struct AccessArgs {
    /// Policies directory (with its inventory); default: the configuration's
    /// `policies_dir`, else `policies`.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The service configuration (its `[protections]`).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Audit files (plain or gzip-compressed, as rotation leaves them; any
    /// order, overlaps dropped by `request_id`): one or more after the
    /// option (a shell glob), or the option repeated.
    #[arg(long, num_args = 1..)]
    pub audit: Vec<PathBuf>,
    /// First day of the period (`YYYY-MM-DD` or RFC 3339; default: 90 days
    /// before `--until`).
    #[arg(long)]
    pub since: Option<String>,
    /// End of the period, exclusive (`YYYY-MM-DD` or RFC 3339; default: now).
    #[arg(long)]
    pub until: Option<String>,
    /// `markdown`, `html` (one self-contained file), `json`, or
    /// `json-schema` (the schema of the JSON form).
    #[arg(long, value_enum, default_value_t = Format::Markdown)]
    pub format: Format,
    /// Write here (atomically) instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also say whether `keycloak plan` is clean (needs `--config` and
    /// view-only admin credentials, as `keycloak plan` takes them).
    #[arg(long, requires = "config")]
    pub keycloak_plan: bool,
    /// `clientId` of the admin client (with `--keycloak-plan`).
    #[arg(long, env = "KCS_ADMIN_CLIENT_ID")]
    pub admin_client_id: Option<String>,
    /// File holding the admin client's secret (else `KCS_ADMIN_CLIENT_SECRET`).
    #[arg(long)]
    pub admin_secret_file: Option<PathBuf>,
}

/// A day (`YYYY-MM-DD`, midnight UTC) or an RFC 3339 time, in seconds.
fn when(s: &str, flag: &str) -> anyhow::Result<u64> {
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    let t = crate::inventory::protections::parse_rfc3339(&full)
        .ok_or_else(|| anyhow::anyhow!("{flag} `{s}`: not YYYY-MM-DD or an RFC 3339 time"))?;
    Ok(t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0))
}

/// Builds and writes the report.
///
/// # Errors
/// Unusable arguments, an unreadable configuration.
pub fn access(a: AccessArgs) -> anyhow::Result<ExitCode> {
    if a.format == Format::JsonSchema {
        let schema = crate::report::schema()?;
        match &a.out {
            Some(o) => OutputFile::create(o, 0o644)
                .and_then(|f| f.write(&schema))
                .map_err(|e| anyhow::anyhow!("--out: {e}"))?,
            None => super::out(schema.trim_end())?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let now = SystemTime::now();
    let settings = a
        .config
        .as_deref()
        .map(crate::configuration::Settings::load_without_secrets)
        .transpose()?;
    let rules = settings
        .as_ref()
        .map(|s| s.protections.clone())
        .unwrap_or_default();
    let dir = match (&a.dir, &settings) {
        (Some(d), _) => d.clone(),
        (None, Some(s)) => s.policies_dir.clone(),
        (None, None) => PathBuf::from("policies"),
    };
    let until = match &a.until {
        Some(s) => when(s, "--until")?,
        None => now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let since = match &a.since {
        Some(s) => when(s, "--since")?,
        None => until.saturating_sub(Duration::from_secs(90 * 86_400).as_secs()),
    };
    if since >= until {
        anyhow::bail!("--since must be before --until");
    }
    let file = a
        .out
        .as_ref()
        .map(|o| OutputFile::create(o, 0o644).map_err(|e| anyhow::anyhow!("--out: {e}")))
        .transpose()?;
    let set = match PolicySet::load_dir(&dir, None) {
        Ok(s) => s.with_rules(rules),
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            return Ok(ExitCode::from(1));
        }
    };
    let period = audit::Period {
        from: since,
        to: until,
    };
    let usage = if a.audit.is_empty() {
        None
    } else {
        match audit::read(&a.audit, period) {
            Ok(u) => Some(u),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(1));
            }
        }
    };
    let plan = match (a.keycloak_plan, &a.config, &a.admin_client_id) {
        (false, ..) => None,
        (true, Some(config), Some(id)) => Some(super::keycloak::plan_summary(
            config,
            super::keycloak::AdminArgs {
                admin_client_id: id.clone(),
                admin_secret_file: a.admin_secret_file.clone(),
                admin_secret_env: "KCS_ADMIN_CLIENT_SECRET".into(),
                admin_realm: None,
                concurrency: crate::provision::admin::DEFAULT_CONCURRENCY as u16,
            },
        )),
        (true, ..) => {
            Some("not checked: no admin client (--admin-client-id or KCS_ADMIN_CLIENT_ID)".into())
        }
    };
    let report = crate::report::build(
        &set,
        now,
        usage.as_ref().map(|u| (u, period, a.audit.len())),
        plan,
    );
    let text = match a.format {
        Format::Markdown => render::markdown(&report),
        Format::Html => render::html(&report),
        Format::Json | Format::JsonSchema => render::json(&report)?,
    };
    if let Some(a) = &report.audit {
        eprintln!(
            "audit: {} lines read, {} skipped, {} not parseable, {} duplicates",
            a.lines_read, a.lines_skipped, a.lines_unparseable, a.duplicates
        );
    }
    match file {
        Some(f) => f.write(&text).map_err(anyhow::Error::msg)?,
        None => super::out(text.trim_end())?,
    }
    Ok(ExitCode::SUCCESS)
}
