//! `policy check` and `policy explain`: offline policy tools.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::out;
use crate::configuration::Settings;
use crate::domain::Scopes;
use crate::policy::{EvalRequest, Outcome, PolicySet, Subject, SubjectClaims};

type Clients = std::collections::BTreeSet<String>;
type Rules = std::sync::Arc<crate::policy::require::Rules>;

/// Client ids of a configuration (read without secrets), those of them using
/// the JWT Authorization Grant, and its `[protections]`, when one is given.
fn known_clients(config: Option<&Path>) -> anyhow::Result<Option<(Clients, Clients, Rules)>> {
    Ok(match config {
        None => None,
        Some(c) => {
            let s = Settings::load_without_secrets(c)?;
            let k = s.keycloak;
            Some((
                k.clients.keys().cloned().collect(),
                k.jwt_clients(),
                s.protections,
            ))
        }
    })
}

/// Compiles every policy of `dir`: one line per policy on standard output, one
/// per problem on standard error (exit 1), warnings on standard error (exit 0);
/// then the protections table ([`protections_table`]). With
/// `strict_production`, a production grant that does not rest on protections
/// the inventory shows is a problem (exit 1).
///
/// # Errors
/// An unreadable `config`.
pub fn check(
    dir: &Path,
    config: Option<&Path>,
    strict_production: bool,
) -> anyhow::Result<ExitCode> {
    let known = known_clients(config)?;
    let loaded = PolicySet::load_dir(dir, known.as_ref().map(|k| &k.0)).and_then(|set| {
        let problems = known
            .as_ref()
            .map(|k| set.client_problems(&k.1))
            .unwrap_or_default();
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        }
    });
    let set = match loaded {
        Ok(set) => set.with_rules(known.as_ref().map(|k| k.2.clone()).unwrap_or_default()),
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} problem(s)", errors.len());
            return Ok(ExitCode::from(1));
        }
    };
    // With the configuration and a realm model beside the policies: the same
    // derivation `config check` and `keycloak plan` make (scopes and groups the
    // model must declare), without calling Keycloak.
    let mut model_warnings = Vec::new();
    if let Some(c) = config.filter(|_| dir.join(crate::provision::model::MODEL_FILE).exists()) {
        let mut s = Settings::load_without_secrets(c)?;
        s.policies_dir = dir.to_path_buf();
        match super::keycloak::derive_for(&s, crate::configuration::Secrets::Skip) {
            Ok(d) => model_warnings = d.warnings,
            Err(e) => {
                eprintln!("{e}");
                eprintln!("problem(s) with {}", crate::provision::model::MODEL_FILE);
                return Ok(ExitCode::from(1));
            }
        }
    }
    out(&format!(
        "ok: {} policies in {}",
        set.policies().len(),
        dir.display()
    ))?;
    for p in set.policies() {
        let what = match &p.grant {
            Some(g) => {
                let mut line = format!("allow audience `{}` as client `{}`", g.audience, g.client);
                if let Some(identity) = g.identity {
                    let kind = match identity {
                        crate::domain::identity::IdentityKind::Repository => "repository",
                        crate::domain::identity::IdentityKind::RepositoryEnvironment => {
                            "repository_environment"
                        }
                    };
                    line.push_str(&format!(", identity {kind}"));
                }
                if !g.groups.is_empty() {
                    let groups: Vec<&str> = g.groups.iter().map(String::as_str).collect();
                    line.push_str(&format!(", groups {}", groups.join(", ")));
                }
                line
            }
            None => "deny".to_string(),
        };
        out(&format!("  {}: {what}", p.id))?;
        for r in &p.resolutions {
            out(&format!("    {r}"))?;
        }
    }
    for w in set.warnings() {
        eprintln!("warning: {w}");
    }
    for w in set.requirement_warnings().into_iter().chain(model_warnings) {
        eprintln!("warning: {w}");
    }
    let unprotected = protections_table(&set)?;
    if strict_production && unprotected > 0 {
        eprintln!(
            "{unprotected} [production] line(s) above do not rest on protections the inventory shows \
             (--fail-on-unprotected-production): give the grant a `require:` (or configure one) where it \
             has none, set the protections in Bitbucket and refresh the inventory where they are not met"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints, for every allow that names a branch or an environment (or requires
/// a protection), whether the inventory shows the protections it needs
/// ([`PolicySet::coverage`]); returns how many production lines do not rest on
/// shown protections (no requirement, or one not met).
fn protections_table(set: &PolicySet) -> anyhow::Result<usize> {
    let rows = set.coverage(std::time::SystemTime::now(), false);
    if rows.is_empty() {
        return Ok(0);
    }
    out(&format!(
        "protections (from the inventory; older than {} h count as unknown):",
        set.rules().max_age.as_secs() / 3600
    ))?;
    let cell = |s: &str| s.escape_debug().to_string();
    let mut unprotected = 0;
    let (mut shown_of, mut left_out) = (std::collections::HashMap::<&str, usize>::new(), 0);
    for r in &rows {
        let requires = if r.requires.is_empty() {
            "requires nothing".to_string()
        } else {
            format!("requires {}", r.requires.describe())
        };
        let verdict = if r.requires.is_empty() {
            if r.production {
                unprotected += 1;
                "UNPROTECTED production grant".to_string()
            } else {
                "-".to_string()
            }
        } else if r.missing.is_empty() {
            "met".to_string()
        } else {
            if r.production {
                unprotected += 1;
            }
            let m: Vec<String> = r
                .missing
                .iter()
                .map(crate::policy::require::Missing::phrase)
                .collect();
            format!("NOT MET: {}", m.join("; "))
        };
        let shown = shown_of.entry(r.policy.as_str()).or_default();
        *shown += 1;
        if *shown > crate::policy::require::MAX_COVERAGE_PER_POLICY {
            left_out += 1;
            continue;
        }
        out(&format!(
            "  {}{} | {} | {} | branch {} | environment {} | {requires} | shows: {} | {verdict}",
            if r.production { "[production] " } else { "" },
            r.policy,
            cell(&r.audience),
            cell(&r.repository),
            cell(r.branch.as_deref().unwrap_or("(any)")),
            cell(r.environment.as_deref().unwrap_or("(any)")),
            r.shown,
        ))?;
    }
    if left_out > 0 {
        out(&format!(
            "  … {left_out} more lines not shown (over {} per policy)",
            crate::policy::require::MAX_COVERAGE_PER_POLICY
        ))?;
    }
    Ok(unprotected)
}

/// Arguments of `policy explain`.
pub struct ExplainArgs {
    /// Policies directory.
    pub dir: PathBuf,
    /// File holding a token (`-`: standard input).
    pub token: Option<PathBuf>,
    /// JSON file of claims.
    pub claims: Option<PathBuf>,
    /// Requested audience.
    pub audience: String,
    /// Requested scope (space-separated).
    pub scope: String,
    /// Configuration (grant clients are checked against it).
    pub config: Option<PathBuf>,
}

/// Prints the decision and full trace for a token's or a claims file's subject;
/// exit 0 when allowed, 1 when denied. Nothing is verified: the token is decoded
/// with jsonwebtoken's `dangerous` API, and the output says so on standard error.
///
/// # Errors
/// Unreadable files, a token or claims file without the claims policies read,
/// an invalid scope, policies that do not compile.
pub fn explain(a: ExplainArgs) -> anyhow::Result<ExitCode> {
    let known = known_clients(a.config.as_deref())?;
    let set = PolicySet::load_dir(&a.dir, known.as_ref().map(|k| &k.0))
        .map_err(|errs| {
            anyhow::anyhow!(errs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"))
        })?
        .with_rules(known.as_ref().map(|k| k.2.clone()).unwrap_or_default());
    let claims: SubjectClaims = match (a.token, a.claims) {
        (Some(t), _) => {
            // A token is at most a few KiB: read at most 1 MiB.
            let mut text = String::new();
            let limit = 1024 * 1024;
            if t.as_os_str() == "-" {
                std::io::stdin().take(limit).read_to_string(&mut text)?;
            } else {
                std::fs::File::open(&t)?
                    .take(limit)
                    .read_to_string(&mut text)?;
            }
            jsonwebtoken::dangerous::insecure_decode_claims(text.trim())
                .map_err(|e| anyhow::anyhow!("not a JWT with the claims policies read: {e}"))?
        }
        (None, Some(c)) => serde_json::from_str(&std::fs::read_to_string(&c)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", c.display()))?,
        (None, None) => anyhow::bail!("give --token or --claims"),
    };
    let subject = Subject::from_claims(claims).map_err(anyhow::Error::msg)?;
    let scopes = Scopes::parse(&a.scope)?;
    let decision = set.evaluate(&EvalRequest {
        subject: &subject,
        audience: &a.audience,
        scopes: &scopes,
        now: std::time::SystemTime::now(),
    });
    eprintln!("note: signature, issuer, audience and expiry are NOT verified by explain");
    out(&serde_json::to_string_pretty(&serde_json::json!({
        "identity": subject,
        "audience": a.audience,
        "scopes": scopes,
        "outcome": decision.outcome,
        "error_code": match &decision.outcome {
            Outcome::Deny { reason, .. } => Some(reason.code()),
            Outcome::Allow(_) => None,
        },
        "trace": decision.trace,
        "trace_omitted": decision.omitted,
        "excluded_by_index": decision.excluded,
        "resolutions": set
            .policies()
            .iter()
            .filter(|p| !p.resolutions.is_empty())
            .map(|p| (p.id.clone(), p.resolutions.clone()))
            .collect::<std::collections::BTreeMap<_, _>>(),
    }))?)?;
    Ok(match decision.outcome {
        Outcome::Allow(_) => ExitCode::SUCCESS,
        Outcome::Deny { .. } => ExitCode::from(1),
    })
}
