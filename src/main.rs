//! `keycloak-ci-sts` binary: see `keycloak_ci_sts::cli`.

use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use keycloak_ci_sts::cli::{Cli, Command, ConfigCommand, KeysCommand, PolicyCommand};
use keycloak_ci_sts::configuration::Settings;
use keycloak_ci_sts::domain::SecretToken;
use keycloak_ci_sts::policy::{EvalRequest, Outcome, PolicySet};
use keycloak_ci_sts::signing::{self, SigningAlgorithm, SigningKey};
use keycloak_ci_sts::startup::Application;
use keycloak_ci_sts::verify;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Config {
            command: ConfigCommand::Check { config, no_secrets },
        } => config_check(&config, no_secrets),
        Command::Policy { command } => policy(command),
        Command::Keys {
            command: KeysCommand::Generate { out, alg },
        } => keys_generate(&out, &alg),
    }
}

fn serve(config: std::path::PathBuf) -> anyhow::Result<ExitCode> {
    let _log_guard = keycloak_ci_sts::telemetry::init_logging().map_err(anyhow::Error::msg)?;
    let settings = Settings::load(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = Application::build(settings)?;
        app.run_until_stopped().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn config_check(file: &std::path::Path, no_secrets: bool) -> anyhow::Result<ExitCode> {
    use keycloak_ci_sts::configuration::Secrets;
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
            Ok(set) => warnings.extend(set.warnings()),
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

fn known_clients(
    config: Option<&std::path::Path>,
) -> anyhow::Result<Option<(Settings, std::collections::BTreeSet<String>)>> {
    Ok(match config {
        None => None,
        Some(c) => {
            let s = Settings::load_without_secrets(c)?;
            let ids = s.keycloak.clients.keys().cloned().collect();
            Some((s, ids))
        }
    })
}

fn policy(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { dir, config } => {
            let known = known_clients(config.as_deref())?;
            match PolicySet::load_dir(&dir, known.as_ref().map(|k| &k.1)) {
                Ok(set) => {
                    out(&format!(
                        "ok: {} policies in {}",
                        set.policies().len(),
                        dir.display()
                    ))?;
                    for p in set.policies() {
                        let what = match &p.grant {
                            Some(g) => {
                                format!("allow audience `{}` as client `{}`", g.audience, g.client)
                            }
                            None => "deny".to_string(),
                        };
                        out(&format!("  {}: {what}", p.id))?;
                    }
                    for w in set.warnings() {
                        eprintln!("warning: {w}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    eprintln!("{} problem(s)", errors.len());
                    Ok(ExitCode::from(1))
                }
            }
        }
        PolicyCommand::Explain {
            dir,
            token,
            claims,
            audience,
            scope,
            config,
        } => {
            let known = known_clients(config.as_deref())?;
            let set = PolicySet::load_dir(&dir, known.as_ref().map(|k| &k.1)).map_err(|errs| {
                anyhow::anyhow!(errs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"))
            })?;
            let claims_value = match (token, claims) {
                (Some(t), _) => {
                    let mut text = String::new();
                    if t.as_os_str() == "-" {
                        std::io::stdin().read_to_string(&mut text)?;
                    } else {
                        text = std::fs::read_to_string(&t)?;
                    }
                    verify::unverified_payload(&SecretToken::new(text))?
                }
                (None, Some(c)) => serde_json::from_str(&std::fs::read_to_string(&c)?)?,
                (None, None) => anyhow::bail!("give --token or --claims"),
            };
            let workspaces = known
                .as_ref()
                .map(|k| k.0.workspaces.clone())
                .unwrap_or_default();
            let identity = verify::unverified_identity_for_explain(claims_value, &workspaces)
                .map_err(|e| anyhow::anyhow!("{} ({})", e, e.code()))?;
            let scopes: Vec<String> = scope
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let decision = set.evaluate(&EvalRequest {
                identity: &identity,
                audience: &audience,
                scopes: &scopes,
            });
            eprintln!("note: signature, issuer, audience and expiry are NOT verified by explain");
            out(&serde_json::to_string_pretty(&serde_json::json!({
                    "identity": identity,
                    "audience": audience,
                    "scopes": scopes,
                    "outcome": decision.outcome,
                    "error_code": match &decision.outcome { Outcome::Deny { reason, .. } => Some(reason.code()), Outcome::Allow(_) => None },
                    "trace": decision.trace,
            }))?)?;
            Ok(match decision.outcome {
                Outcome::Allow(_) => ExitCode::SUCCESS,
                Outcome::Deny { .. } => ExitCode::from(1),
            })
        }
    }
}

fn keys_generate(out_path: &std::path::Path, alg: &str) -> anyhow::Result<ExitCode> {
    let alg = match alg {
        "ES256" => SigningAlgorithm::ES256,
        "RS256" => SigningAlgorithm::RS256,
        other => anyhow::bail!("unsupported algorithm `{other}` (ES256 or RS256)"),
    };
    let pem = signing::generate_pem(alg)?;
    let key = SigningKey::from_pem(&pem, alg)?;
    write_private(out_path, &pem)?;
    out(&format!("wrote {} (kid {})", out_path.display(), key.kid()))?;
    out(&serde_json::to_string_pretty(key.public_jwk())?)?;
    Ok(ExitCode::SUCCESS)
}

/// Writes a line to standard output; a closed pipe (`| head`) is not an error.
fn out(line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn write_private(out: &std::path::Path, pem: &secrecy::SecretString) -> anyhow::Result<()> {
    use secrecy::ExposeSecret;
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    f.write_all(pem.expose_secret().as_bytes())?;
    Ok(())
}
