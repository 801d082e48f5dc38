//! `keycloak-ci-sts` binary: see [`keycloak_ci_sts::cli`] for the commands and
//! their exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = keycloak_ci_sts::cli::Cli::parse();
    match keycloak_ci_sts::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
