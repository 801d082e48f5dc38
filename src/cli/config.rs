//! `config check --config FILE [--no-secrets]`: every startup check, offline.

use std::path::Path;
use std::process::ExitCode;

use super::out;
use crate::configuration::{Secrets, Settings};
use crate::policy::PolicySet;

/// Validates the configuration (environment overrides included) and compiles the
/// policies it points at; prints every problem and warning. Exit 0 when valid
/// (warnings allowed), 1 when not.
///
/// # Errors
/// Only when standard output cannot be written.
pub fn check(file: &Path, no_secrets: bool) -> anyhow::Result<ExitCode> {
    let secrets = if no_secrets {
        Secrets::Skip
    } else {
        Secrets::Read
    };
    let (settings, report) = Settings::check(file, secrets);
    let mut errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    let mut warnings: Vec<String> = report.warnings.iter().map(ToString::to_string).collect();
    if let Some(s) = &settings {
        let known = s.keycloak.clients.keys().cloned().collect();
        match PolicySet::load_dir(&s.policies_dir, Some(&known)) {
            Ok(set) => {
                warnings.extend(set.warnings());
                let accepted: Vec<String> = s
                    .workspaces
                    .iter()
                    .flat_map(|w| w.audiences.iter().cloned())
                    .collect();
                warnings.extend(set.marker_audience_warnings(&accepted));
                warnings.extend(
                    set.clone()
                        .with_rules(s.protections.clone())
                        .requirement_warnings(),
                );
                errors.extend(
                    set.client_problems(&s.keycloak.jwt_clients())
                        .iter()
                        .map(ToString::to_string),
                );
                // The realm model, when the policies come with one: the same
                // derivation `keycloak plan` makes, without calling Keycloak.
                let model = s.policies_dir.join(crate::provision::model::MODEL_FILE);
                if errors.is_empty() && model.exists() {
                    match super::keycloak::derive_for(s, Secrets::Skip) {
                        Ok(d) => warnings.extend(d.warnings),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
            }
            Err(e) => errors.extend(e.iter().map(ToString::to_string)),
        }
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    for e in &errors {
        eprintln!("{e}");
    }
    if errors.is_empty() {
        out(&format!(
            "ok: {} ({} warning(s))",
            file.display(),
            warnings.len()
        ))?;
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} problem(s)", errors.len());
        Ok(ExitCode::from(1))
    }
}
