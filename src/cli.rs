//! Command line: `serve`, `config check`, `policy check`, `policy explain`, `keys generate`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// keycloak-ci-sts: exchange Bitbucket Pipelines OIDC tokens for Keycloak access tokens.
#[derive(Debug, Parser)]
#[command(name = "keycloak-ci-sts", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve {
        /// TOML configuration file (environment overrides: KEYCLOAK_CI_STS_<KEY>, `__` between levels).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Configuration tools (offline).
    Config {
        /// Config subcommand.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Policy tools (offline).
    Policy {
        /// Policy subcommand.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Signing key tools.
    Keys {
        /// Keys subcommand.
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// `config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Run every startup check of a configuration file (environment overrides
    /// included) and of its policies, without starting anything or calling any
    /// upstream; print each problem and warning. Exit 0 when valid (warnings
    /// allowed), 1 when not.
    Check {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Do not read client secrets and signing keys (for a pipeline that has
        /// the configuration but not the secrets).
        #[arg(long)]
        no_secrets: bool,
    },
}

/// `policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy file of a directory; exit 1 with one line per problem.
    Check {
        /// Policies directory.
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
        /// Also check that each grant's client is configured in this service configuration.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the decision and trace for a token or claims file (signature NOT verified).
    Explain {
        /// Policies directory.
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
        /// File holding a Bitbucket token (`-` for standard input).
        #[arg(long, conflicts_with = "claims", required_unless_present = "claims")]
        token: Option<PathBuf>,
        /// JSON file holding the token's claims.
        #[arg(long)]
        claims: Option<PathBuf>,
        /// Requested `audience`.
        #[arg(long)]
        audience: String,
        /// Requested `scope` (space-separated).
        #[arg(long, default_value = "")]
        scope: String,
        /// Configuration file (for workspace names and client checks).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new PKCS#8 PEM private key (mode 0600) and print its kid and public JWK.
    Generate {
        /// Output file (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
        /// ES256 (default) or RS256.
        #[arg(long, default_value = "ES256")]
        alg: String,
    },
}
