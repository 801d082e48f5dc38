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
    let run = rt.block_on(interrupt.race_named(client.inventory(
        &a.workspace,
        &mut state,
        &mut checkpoint,
    )));
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
                    eprintln!("error: {}\n{saved}", crate::telemetry::chain(&e));
                    ExitCode::from(1)
                }
                Ok(Ok(_)) => ExitCode::from(1),
            });
        }
    };
    let code = write_inventory(&a.out, file, &fetched)?;
    save_state(&state_path, &state);
    Ok(code)
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
    let reads = format!(
        "environments read for {} repositories, unchanged for {}",
        f.read, f.reused
    );
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
