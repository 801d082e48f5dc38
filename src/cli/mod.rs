//! Command line: `serve`, `bitbucket inventory`, `config check`, `policy check`,
//! `policy explain`, `keys generate`, `keycloak plan|apply|export`. Exit codes: 0
//! success (or "allowed" for `explain`, "in sync" for `keycloak plan`), 1 the
//! checked thing is refused (problems found, or "denied"), 2 usage, configuration
//! or I/O error, 3 changes pending (`keycloak plan`).

mod bitbucket;
mod config;
mod docs;
mod keycloak;
mod keys;
mod policy;
mod report;
mod serve;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// keycloak-ci-sts: exchange Bitbucket Pipelines OIDC tokens for Keycloak access tokens.
#[derive(Debug, Parser)]
#[command(
    name = "keycloak-ci-sts",
    version,
    about,
    after_help = "Example:\n  keycloak-ci-sts serve --config /etc/keycloak-ci-sts/sts.toml"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    #[command(
        after_help = "Example:\n  keycloak-ci-sts serve --config /etc/keycloak-ci-sts/sts.toml"
    )]
    Serve {
        /// TOML configuration file (environment overrides: `KEYCLOAK_CI_STS_<KEY>`, `__` between levels).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Reports for security teams (never used by the service).
    #[command(
        after_help = "Example:\n  keycloak-ci-sts report access --config sts.toml --audit audit.jsonl* --format html --out review.html"
    )]
    Report {
        /// Report subcommand.
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// Bitbucket tools (read Bitbucket's REST API; never used by the service).
    #[command(
        after_help = "Example:\n  keycloak-ci-sts bitbucket inventory --workspace acme --out policies/inventory/acme.yaml"
    )]
    Bitbucket {
        /// Bitbucket subcommand.
        #[command(subcommand)]
        command: BitbucketCommand,
    },
    /// Configuration tools (offline).
    #[command(
        after_help = "Example:\n  keycloak-ci-sts config check --config sts.toml --no-secrets"
    )]
    Config {
        /// Config subcommand.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Policy tools (offline).
    #[command(
        after_help = "Example:\n  keycloak-ci-sts policy check --dir policies --config sts.toml"
    )]
    Policy {
        /// Policy subcommand.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Keycloak provisioning from the policies (Admin REST API; never used by the service).
    #[command(after_help = "Example:\n  keycloak-ci-sts keycloak plan --config sts.toml")]
    Keycloak {
        /// Keycloak subcommand.
        #[command(subcommand)]
        command: KeycloakCommand,
    },
    /// Exchange this pipeline step's OIDC token for an access token (the client
    /// a step or an agent runs instead of curl), or list what it may obtain
    /// (--list). Exit 0 issued, 1 refused (the message names error_code and
    /// request_id), 2 usage, 75 still unavailable after the wait budget.
    #[command(
        after_help = "Example:\n  keycloak-ci-sts token --url https://sts.example.com --audience deploy-api --scope deploy:production --output /tmp/deploy.token",
        subcommand_negates_reqs = true,
        args_conflicts_with_subcommands = true
    )]
    Token {
        /// `token inspect`: what an access token grants and why an API refuses it.
        #[command(subcommand)]
        command: Option<TokenCommand>,
        /// The service's base URL.
        #[arg(long, env = "KCS_STS_URL", required = true)]
        url: Option<String>,
        /// RFC 8693 `audience`.
        #[arg(long, required_unless_present = "list")]
        audience: Option<String>,
        /// A scope to request (repeatable).
        #[arg(long = "scope", conflicts_with = "list")]
        scopes: Vec<String>,
        /// List the audiences, scopes, default scopes and lifetimes this step
        /// may obtain (POST /grants) instead of exchanging; with --json, as JSON.
        #[arg(long, conflicts_with_all = ["output", "stdout", "audience"])]
        list: bool,
        /// File holding the subject token (default: `$BITBUCKET_STEP_OIDC_TOKEN`).
        #[arg(long)]
        subject_token_file: Option<PathBuf>,
        /// Write the access token to this file (mode 0600, created atomically).
        #[arg(long, group = "dest")]
        output: Option<PathBuf>,
        /// Print the access token to standard output (in a pipeline: the build log).
        #[arg(long, group = "dest")]
        stdout: bool,
        /// Print `{access_token, expires_in, scope, issued_token_type}` as JSON.
        #[arg(long, group = "dest")]
        json: bool,
        /// Longest total wait for `Retry-After` on 429/503, seconds.
        #[arg(long, default_value_t = 60)]
        max_wait_seconds: u64,
    },
    /// Model Context Protocol server over stdio for an AI agent in this step:
    /// tools list_grants and get_token (tokens go to 0600 files, not into the
    /// model's context). A convenience, not a security boundary (the boundary
    /// is the policies and the step's audience marker).
    #[command(after_help = "Example:\n  keycloak-ci-sts mcp --url https://sts.example.com")]
    Mcp {
        /// The service's base URL.
        #[arg(long, env = "KCS_STS_URL")]
        url: String,
        /// File holding the subject token (default: `$BITBUCKET_STEP_OIDC_TOKEN`).
        #[arg(long)]
        subject_token_file: Option<PathBuf>,
        /// Directory for token files (created 0700; an existing one must not be
        /// open to others). Default: a new private directory under $TMPDIR,
        /// removed when the server exits.
        #[arg(long)]
        token_dir: Option<PathBuf>,
        /// Return access tokens in get_token's result instead of writing files
        /// (they then enter the model's context).
        #[arg(long)]
        return_tokens_inline: bool,
        /// Longest total wait for `Retry-After` on 429/503 per call, seconds.
        #[arg(long, default_value_t = 30)]
        max_wait_seconds: u64,
    },
    /// Print a completion script for a shell to standard output.
    #[command(
        after_help = "Example:\n  keycloak-ci-sts completions bash > /etc/bash_completion.d/keycloak-ci-sts"
    )]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write a man page for every command (roff, section 1) into a directory.
    #[command(after_help = "Example:\n  keycloak-ci-sts man --out /usr/local/share/man/man1")]
    Man {
        /// Directory to write `keycloak-ci-sts.1`, `keycloak-ci-sts-serve.1`, ... into (created).
        #[arg(long)]
        out: PathBuf,
    },
    /// Signing key tools.
    #[command(after_help = "Example:\n  keycloak-ci-sts keys generate --out signing-2026-12.pem")]
    Keys {
        /// Keys subcommand.
        #[command(subcommand)]
        command: KeysCommand,
    },
}

/// `report ...`
#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// The access review: for each client, audience and scope, which
    /// repositories, branches and environments may obtain it, under which
    /// policy and identity, on what protections, and (with audit files) what
    /// was issued in the period and which grants went unused. Exit 0 when
    /// written, 1 when the policies or an audit file cannot be read.
    #[command(
        after_help = "Example:\n  keycloak-ci-sts report access --config sts.toml --audit audit.jsonl audit.jsonl.1.gz --since 2026-10-01T00:00:00Z --format markdown --out access-review.md"
    )]
    Access(report::AccessArgs),
}

/// `bitbucket ...`
#[derive(Debug, Subcommand)]
pub enum BitbucketCommand {
    /// Read a workspace's repositories, projects and deployment environments into an
    /// inventory file to commit beside the policies (`policies/inventory/<workspace>.yaml`).
    /// Needs a workspace access token with the `repository` and `pipeline` read scopes,
    /// and `repository:admin` (API tokens: `admin:repository:bitbucket`) for the
    /// branch restrictions of `--protections`.
    /// Exit 0 when written (or unchanged), 3 when written but some concerned
    /// repositories' branch restrictions are unknown (a 403), 1 when the API
    /// refused or answered badly, 2 for a missing token or an unusable argument.
    #[command(
        after_help = "Example:\n  keycloak-ci-sts bitbucket inventory --workspace acme --out policies/inventory/acme.yaml --token-file bitbucket-token --config sts.toml"
    )]
    Inventory {
        /// Workspace ID (slug).
        #[arg(long)]
        workspace: String,
        /// Where to write the inventory (written atomically; printed: changed or not).
        #[arg(long)]
        out: PathBuf,
        /// File holding the access token.
        #[arg(long, conflicts_with = "token_env")]
        token_file: Option<PathBuf>,
        /// Environment variable holding the access token.
        #[arg(long, default_value = "BITBUCKET_TOKEN")]
        token_env: String,
        /// API base URL (https; http only on loopback, for tests).
        #[arg(long, default_value = crate::inventory::fetch::DEFAULT_API)]
        api: String,
        /// Longest single wait for Bitbucket's rate limit, in seconds (fractions
        /// allowed): a `Retry-After` beyond it stops the run, its progress saved
        /// in `<out>.state` for the next run.
        #[arg(long, value_name = "SECONDS", default_value_t = crate::inventory::fetch::DEFAULT_MAX_WAIT_SECS as f64, value_parser = max_wait)]
        max_wait: f64,
        /// Read every repository's environments, not only those of repositories
        /// new or updated since the state file (`<out>.state`) recorded them.
        #[arg(long)]
        full: bool,
        /// Whose branch restrictions, branching model and environment
        /// restrictions to read: `concerned` (the repositories an allow of
        /// `--policies` admits when it names a branch or an environment or
        /// requires a protection), `all`, or `none`. Branch restrictions need
        /// `repository:admin` (API tokens: `admin:repository:bitbucket`).
        #[arg(long, value_enum, default_value_t = bitbucket::ProtectionsMode::Concerned)]
        protections: bitbucket::ProtectionsMode,
        /// The policies directory deciding which repositories are concerned
        /// (default: the directory holding `--out`'s `inventory/` directory).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// The service configuration, whose `[protections.require]` also makes
        /// repositories concerned.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Reuse protections `<out>.state` read less than this many hours ago
        /// (0: read them all again).
        #[arg(long, default_value_t = 12)]
        protections_reuse_hours: u64,
    },
}

/// `config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Run every startup check of a configuration file (environment overrides
    /// included) and of its policies, without starting anything or calling any
    /// upstream; print each problem and warning. Exit 0 when valid (warnings
    /// allowed), 1 when not.
    #[command(
        after_help = "Example:\n  keycloak-ci-sts config check --config sts.toml --no-secrets"
    )]
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
    #[command(
        after_help = "Example:\n  keycloak-ci-sts policy check --dir policies --config sts.toml --fail-on-unprotected-production"
    )]
    Check {
        /// Policies directory.
        #[arg(long, default_value = "policies")]
        dir: PathBuf,
        /// Also check that each grant's client is configured in this service
        /// configuration (and apply its `[protections]` requirements).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Exit 1 when a production grant (an environment condition, a
        /// per-repository identity, or a client or audience with a configured
        /// requirement) does not rest on protections the inventory shows: for
        /// the policy repository's pipeline.
        #[arg(long)]
        fail_on_unprotected_production: bool,
    },
    /// Print the decision and trace for a token or claims file (signature NOT verified).
    #[command(
        after_help = "Example:\n  keycloak-ci-sts policy explain --dir policies --token token.txt --audience deploy-api --scope deploy:production"
    )]
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

/// `token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Show what a Keycloak access token grants (claims, roles per client,
    /// lifetime left) and, with --realm, whether a resource server would accept
    /// it and why not (alg, signature, iss, exp, iat/nbf, typ, and aud when
    /// --audience is given; azp and roles are shown, not judged); with --audit,
    /// the exchange that issued it. Never prints the token. Exit 0 accepted by
    /// the checks made (or nothing verified, without --realm), 1 a resource
    /// server would refuse it, 2 usage, an unreadable token or audit file, or
    /// the realm's keys unavailable.
    #[command(
        after_help = "Example:\n  keycloak-ci-sts token inspect --token-file /tmp/deploy.token --realm https://keycloak.example.com/realms/ci --audience deploy-api --audit /var/log/keycloak-ci-sts/audit.jsonl"
    )]
    Inspect(InspectArgs),
}

/// Arguments of `token inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// File holding the access token (`-` or absent: standard input).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The realm URL (`<keycloak>/realms/<realm>`), the exact issuer: its JWKS
    /// verifies the token. Without it nothing is verified.
    #[arg(long)]
    pub realm: Option<String>,
    /// The API's client id the token must be for (`aud`, exactly).
    #[arg(long, requires = "realm")]
    pub audience: Option<String>,
    /// Audit files (rotated or gzip-compressed; repeatable) to find the exchange
    /// that issued the token.
    #[arg(long)]
    pub audit: Vec<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `keycloak ...`
#[derive(Debug, Subcommand)]
pub enum KeycloakCommand {
    /// Print what `apply` would create, change (field by field) or remove in the
    /// realm, without changing anything; works with view-only admin credentials.
    /// Exit 0 in sync, 3 changes pending, 1 conflicts or a failed call, 2 usage or
    /// configuration error.
    #[command(
        after_help = "Example:\n  keycloak-ci-sts keycloak plan --config sts.toml --admin-client-id kcs-admin-view --admin-secret-file view.secret"
    )]
    Plan {
        /// TOML configuration file of the service.
        #[arg(long, short)]
        config: PathBuf,
        /// Also list owned objects no policy needs any more as removals.
        #[arg(long)]
        prune: bool,
        /// List every object, also when more than 20 of one kind are created,
        /// in sync or removed (by default one line says how many).
        #[arg(long)]
        verbose: bool,
        /// Admin credentials.
        #[command(flatten)]
        admin: keycloak::AdminArgs,
    },
    /// Make the plan's changes (idempotent) and set client secrets to the
    /// configured ones; print each change. Needs manage admin credentials.
    #[command(
        after_help = "Example:\n  keycloak-ci-sts keycloak apply --config sts.toml --admin-client-id kcs-admin-manage --admin-secret-file manage.secret"
    )]
    Apply {
        /// TOML configuration file of the service.
        #[arg(long, short)]
        config: PathBuf,
        /// Also remove owned objects no policy needs any more.
        #[arg(long)]
        prune: bool,
        /// Refuse, before changing anything, a plan that removes more objects
        /// than this (a policy directory mounted empty by mistake must not
        /// prune a realm); a larger number is the explicit consent.
        #[arg(long, default_value_t = crate::provision::apply::DEFAULT_MAX_REMOVALS)]
        max_removals: usize,
        /// Test hook: stop before the Admin API call after this many, as a
        /// kill between two calls would (the interrupted-apply test).
        #[arg(long, hide = true)]
        interrupt_after_calls: Option<u64>,
        /// Admin credentials.
        #[command(flatten)]
        admin: keycloak::AdminArgs,
    },
    /// Write the desired state as realm-import JSON (no secrets, no server call).
    #[command(
        after_help = "Example:\n  keycloak-ci-sts keycloak export --config sts.toml --out realm-ci.json"
    )]
    Export {
        /// TOML configuration file of the service.
        #[arg(long, short)]
        config: PathBuf,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new PKCS#8 PEM private key (mode 0600) and print its kid and public JWK.
    #[command(
        after_help = "Example:\n  keycloak-ci-sts keys generate --out signing-2026-12.pem --alg ES256"
    )]
    Generate {
        /// Output file (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
        /// ES256 (default) or RS256.
        #[arg(long, default_value = "ES256")]
        alg: String,
    },
}

/// `bitbucket inventory`'s arguments as the command takes them.
fn inventory_args(command: BitbucketCommand) -> bitbucket::InventoryArgs {
    let BitbucketCommand::Inventory {
        workspace,
        out,
        token_file,
        token_env,
        api,
        max_wait,
        full,
        protections,
        policies,
        config,
        protections_reuse_hours,
    } = command;
    bitbucket::InventoryArgs {
        workspace,
        out,
        token_file,
        token_env,
        api,
        max_wait: std::time::Duration::from_secs_f64(max_wait),
        full,
        protections,
        policies,
        config,
        protections_reuse: std::time::Duration::from_secs(
            protections_reuse_hours.min(24 * 365) * 3600,
        ),
    }
}

/// Runs a parsed command line.
///
/// # Errors
/// Usage, configuration and I/O errors (the binary exits 2 with them).
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => serve::serve(&config),
        Command::Bitbucket { command } => bitbucket::inventory(inventory_args(command)),
        Command::Config {
            command: ConfigCommand::Check { config, no_secrets },
        } => config::check(&config, no_secrets),
        Command::Policy {
            command:
                PolicyCommand::Check {
                    dir,
                    config,
                    fail_on_unprotected_production,
                },
        } => policy::check(&dir, config.as_deref(), fail_on_unprotected_production),
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    dir,
                    token,
                    claims,
                    audience,
                    scope,
                    config,
                },
        } => policy::explain(policy::ExplainArgs {
            dir,
            token,
            claims,
            audience,
            scope,
            config,
        }),
        Command::Keycloak { command } => match command {
            KeycloakCommand::Plan {
                config,
                prune,
                verbose,
                admin,
            } => keycloak::plan(&config, prune, verbose, admin),
            KeycloakCommand::Apply {
                config,
                prune,
                max_removals,
                interrupt_after_calls,
                admin,
            } => keycloak::apply(&config, prune, max_removals, interrupt_after_calls, admin),
            KeycloakCommand::Export { config, out } => keycloak::export(&config, out.as_deref()),
        },
        Command::Token {
            command: Some(TokenCommand::Inspect(args)),
            ..
        } => token::inspect(&args),
        Command::Token {
            command: None,
            url,
            audience,
            scopes,
            list,
            subject_token_file,
            output,
            stdout,
            json,
            max_wait_seconds,
        } => {
            let action = match (list, audience) {
                (true, _) => token::Action::List { json },
                (false, None) => anyhow::bail!("--audience is required (or --list)"),
                (false, Some(audience)) => token::Action::Exchange {
                    audience,
                    scopes,
                    output: match (output, stdout, json) {
                        (Some(p), _, _) => token::Output::File(p),
                        (None, true, _) => token::Output::Stdout,
                        (None, _, true) => token::Output::Json,
                        (None, false, false) => anyhow::bail!(
                            "say where the token goes: --output FILE (recommended), --stdout or --json"
                        ),
                    },
                },
            };
            token::token(token::TokenArgs {
                url: url.ok_or_else(|| anyhow::anyhow!("--url is required"))?,
                subject_token_file,
                action,
                max_wait_seconds,
            })
        }
        Command::Mcp {
            url,
            subject_token_file,
            token_dir,
            return_tokens_inline,
            max_wait_seconds,
        } => {
            // A directory of our own unless one is named; removed on exit.
            let (dir, owned) = match token_dir {
                Some(d) => (d, false),
                None => (
                    std::env::temp_dir().join(format!(
                        "keycloak-ci-sts-mcp.{}",
                        uuid::Uuid::new_v4().simple()
                    )),
                    true,
                ),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let served = rt.block_on(crate::mcp::serve(crate::mcp::McpSettings {
                url,
                subject_token_file,
                token_dir: dir.clone(),
                inline_tokens: return_tokens_inline,
                max_wait_seconds,
            }));
            // Standard input may still be open (a signal ended the server): the
            // runtime's blocking stdin reader would keep a plain drop waiting.
            rt.shutdown_timeout(std::time::Duration::from_millis(500));
            if owned {
                let _ = std::fs::remove_dir_all(&dir);
            }
            served.map(|()| ExitCode::SUCCESS)
        }
        Command::Keys {
            command: KeysCommand::Generate { out, alg },
        } => keys::generate(&out, &alg),
        Command::Report {
            command: ReportCommand::Access(args),
        } => report::access(args),
        Command::Completions { shell } => {
            docs::completions(shell, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => {
            docs::man_pages(&out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes a line to standard output; a closed pipe (`| head`) is not an error.
fn out(line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `--max-wait`: seconds, 0 to a day.
fn max_wait(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(s) if (0.0..=86_400.0).contains(&s) => Ok(s),
        _ => Err("expected seconds from 0 to 86400".into()),
    }
}
