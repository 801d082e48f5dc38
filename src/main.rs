//! `keycloak-ci-sts` binary: see [`keycloak_ci_sts::cli`] for the commands and
//! their exit codes.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: an exchange allocates a few hundred
/// small, short-lived objects (form, claims, JSON, HTTP); measured with
/// `scripts/bench-cpu.sh`, glibc's malloc and free took about a tenth of the
/// service's CPU per exchange.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
