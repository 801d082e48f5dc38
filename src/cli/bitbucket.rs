//! `bitbucket inventory`: a workspace's repositories, projects and deployment
//! environments from Bitbucket's REST API, written to a reviewed file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::out;
use super::token::Interrupt;
use crate::client::OutputFile;
use crate::domain::regular_file::read_small_file;
use crate::domain::SecretToken;
use crate::inventory::fetch::{Client, Fetched, Limits};
use crate::inventory::state::State;
use crate::inventory::MAX_INVENTORY_FILE_BYTES;

/// Arguments of `bitbucket inventory`.
pub struct InventoryArgs {
    /// Workspace ID (slug).
    pub workspace: String,
    /// Output file.
    pub out: PathBuf,
    /// File holding the token.
    pub token_file: Option<PathBuf>,
    /// Variable holding the token.
    pub token_env: String,
    /// API base URL.
    pub api: String,
    /// Longest single wait for the rate limit (`--max-wait`).
    pub max_wait: std::time::Duration,
    /// Read every repository's environments, ignoring the state (`--full`).
    pub full: bool,
    /// Whose protections to read (`--protections`).
    pub protections: ProtectionsMode,
    /// The policies directory (`--policies`).
    pub policies: Option<PathBuf>,
    /// The service configuration (`--config`).
    pub config: Option<PathBuf>,
    /// `--protections-reuse-hours`.
    pub protections_reuse: std::time::Duration,
}

/// `--protections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtectionsMode {
    /// The repositories some policy's requirement or branch / environment condition concerns.
    Concerned,
    /// Every repository.
    All,
    /// None (the inventory records no protections).
    None,
}

/// The policies directory deciding which repositories are concerned:
/// `--policies`, or the directory holding `--out`'s `inventory/`; checked
/// before any request. `None` (with a warning) when neither names one.
fn policies_dir(a: &InventoryArgs) -> anyhow::Result<Option<PathBuf>> {
    if a.protections != ProtectionsMode::Concerned {
        return Ok(None);
    }
    let dir = match &a.policies {
        Some(d) => d.clone(),
        None => {
            let beside = a
                .out
                .parent()
                .filter(|d| {
                    d.file_name()
                        .is_some_and(|n| n == crate::inventory::INVENTORY_DIR)
                })
                .and_then(Path::parent)
                .filter(|d| d.is_dir());
            let Some(d) = beside else {
                eprintln!(
                    "warning: no policies directory (--policies, or --out under <policies>/inventory/): \
                     no protections are read, and grants requiring them will be refused"
                );
                return Ok(None);
            };
            d.to_path_buf()
        }
    };
    if !dir.is_dir() {
        anyhow::bail!("--policies {}: not a directory", dir.display());
    }
    Ok(Some(dir))
}

/// Which repositories' protections to read, with the policies that could not
/// be compiled against the new inventory (skipped, warned about).
fn concerned(
    a: &InventoryArgs,
    dir: Option<&Path>,
    rules: &crate::policy::require::Rules,
    inv: &crate::inventory::WorkspaceInventory,
) -> anyhow::Result<std::collections::BTreeSet<crate::domain::BbUuid>> {
    match a.protections {
        ProtectionsMode::None => return Ok(Default::default()),
        ProtectionsMode::All => return Ok(inv.repositories.iter().map(|r| r.uuid).collect()),
        ProtectionsMode::Concerned => {}
    }
    let Some(dir) = dir else {
        return Ok(Default::default());
    };
    let memory = crate::inventory::Inventory::new(vec![inv.clone()]).map_err(anyhow::Error::msg)?;
    let (repos, skipped) = crate::policy::require::concerned(dir, &memory, rules).map_err(|e| {
        anyhow::anyhow!(e
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"))
    })?;
    for e in skipped {
        eprintln!(
            "warning: not compiled against the new inventory, so it concerns no repository: {e}"
        );
    }
    Ok(repos)
}

/// Reads the inventory and writes it atomically (a temporary file, created in
/// the output's directory before any request, renamed over `out`); prints
/// whether it changed. Environments are read only for repositories that are
/// new or whose `updated_on` changed since the state file (`<out>.state`)
/// recorded them; the state is saved as the run goes and when it stops early
/// (an error, a rate limit past `--max-wait`, SIGTERM or SIGINT), so that the
/// next run continues from there. The token is never printed or logged. Files
/// are opened without blocking and read bounded ([`read_small_file`]).
///
/// # Errors
/// A missing token, an unusable API URL or output path (exit 2).
pub fn inventory(a: InventoryArgs) -> anyhow::Result<ExitCode> {
    let token = read_token(a.token_file.as_deref(), &a.token_env)?;
    let policies = policies_dir(&a)?;
    let rules = match &a.config {
        Some(c) => crate::configuration::Settings::load_without_secrets(c)?.protections,
        None => Default::default(),
    };
    let limits = Limits {
        max_wait: a.max_wait,
        ..Limits::default()
    };
    let client = Client::new(&a.api, token, limits).map_err(anyhow::Error::msg)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let file = OutputFile::create(&a.out, 0o644).map_err(|e| anyhow::anyhow!("--out: {e}"))?;
    let state_path = State::path_for(&a.out);
    let loaded = if a.full {
        State::new(&a.workspace)
    } else {
        State::load(&state_path, &a.workspace)
    };
    let mut state = loaded.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut interrupt = {
        let _entered = rt.enter();
        Interrupt::listen()?
    };
    let mut checkpoint = |s: &State| save_state(&state_path, s);
    let run = rt.block_on(interrupt.race_named(async {
        let mut f = client
            .inventory(&a.workspace, &mut state, &mut checkpoint)
            .await?;
        let concerned = concerned(&a, policies.as_deref(), &rules, &f.inventory)?;
        if !concerned.is_empty() {
            let read = client
                .protections(
                    &a.workspace,
                    &mut f.inventory,
                    &concerned,
                    &mut state,
                    a.protections_reuse,
                    &mut checkpoint,
                )
                .await?;
            f.protections = Some(read);
        }
        anyhow::Ok(f)
    }));
    let fetched = match run {
        Ok(Ok(f)) => f,
        stopped => {
            if state != loaded {
                save_state(&state_path, &state);
            }
            let saved = format!(
                "{} is not written; the environments read so far are in {} (run again to continue)",
                a.out.display(),
                state_path.display()
            );
            return Ok(match stopped {
                Err((signal, code)) => {
                    eprintln!(
                        "keycloak-ci-sts bitbucket inventory: interrupted by {signal}; {saved}"
                    );
                    code
                }
                Ok(Err(e)) => {
                    eprintln!("error: {e:#}\n{saved}");
                    ExitCode::from(1)
                }
                Ok(Ok(_)) => ExitCode::from(1),
            });
        }
    };
    let code = write_inventory(&a.out, file, &fetched)?;
    save_state(&state_path, &state);
    // Written, but grants requiring protections of some repositories will be
    // refused: a scheduled refresh must not stay green.
    let unknown = fetched.protections.as_ref().is_some_and(|p| p.unknown > 0);
    Ok(if code == ExitCode::SUCCESS && unknown {
        ExitCode::from(3)
    } else {
        code
    })
}

/// Writes the state file atomically; a failure is a warning (the next run
/// reads more).
fn save_state(path: &Path, state: &State) {
    let written = state
        .to_json()
        .map_err(|e| e.to_string())
        .and_then(|text| OutputFile::create(path, 0o644)?.write(&text));
    if let Err(e) = written {
        eprintln!("warning: state not saved: {e}");
    }
}

/// Writes `--out` unless unchanged, and says what was done.
fn write_inventory(path: &Path, file: OutputFile, f: &Fetched) -> anyhow::Result<ExitCode> {
    let inv = &f.inventory;
    let text = inv.to_yaml()?;
    let before = read_small_file(path, MAX_INVENTORY_FILE_BYTES).ok();
    let mut reads = format!(
        "environments read for {} repositories, unchanged for {}",
        f.read, f.reused
    );
    if let Some(p) = &f.protections {
        reads.push_str(&format!(
            "; protections read for {}, reused for {}, unknown for {}",
            p.read, p.reused, p.unknown
        ));
        if let Some(first) = &p.refused {
            eprintln!(
                "warning: Bitbucket refused the branch restrictions of {first} (HTTP 403): the token needs {}. \
                 {} repositories' protections are recorded as unknown, and grants requiring them are refused.",
                crate::inventory::fetch::ADMIN_SCOPE,
                p.unknown
            );
        } else if p.unknown > 0 {
            eprintln!(
                "warning: the branch restrictions of {} repositories are unknown (their `unknown:` \
                 line in the file says why); grants requiring them are refused.",
                p.unknown
            );
        }
    }
    if before.as_deref() == Some(text.as_str()) {
        out(&format!("unchanged: {} ({reads})", path.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    file.write(&text).map_err(anyhow::Error::msg)?;
    let environments: usize = inv.repositories.iter().map(|r| r.environments.len()).sum();
    out(&format!(
        "wrote {}: {} repositories, {} deployment environments{} ({reads})",
        path.display(),
        inv.repositories.len(),
        environments,
        if before.is_some() {
            " (changed: review the diff)"
        } else {
            ""
        }
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Largest token file read, in bytes.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

fn read_token(file: Option<&Path>, env: &str) -> anyhow::Result<SecretToken> {
    let value = match file {
        Some(f) => read_small_file(f, MAX_TOKEN_FILE_BYTES)
            .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", f.display()))?,
        None => std::env::var(env).map_err(|_| {
            anyhow::anyhow!("environment variable `{env}` is not set (or use --token-file)")
        })?,
    };
    let value = value.trim().to_string();
    if value.is_empty() {
        anyhow::bail!("the access token is empty");
    }
    Ok(SecretToken::new(value))
}
