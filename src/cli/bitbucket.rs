//! `bitbucket inventory`: a workspace's repositories, projects and deployment
//! environments from Bitbucket's REST API, written to a reviewed file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::out;
use crate::domain::SecretToken;
use crate::inventory::fetch::{Client, Limits};

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
}

/// Reads the inventory and writes it atomically (a temporary file renamed over
/// `out`); prints whether it changed. The token is never printed or logged.
///
/// # Errors
/// A missing token, an unusable API URL or output path (exit 2).
pub fn inventory(a: InventoryArgs) -> anyhow::Result<ExitCode> {
    let token = read_token(a.token_file.as_deref(), &a.token_env)?;
    let client = Client::new(&a.api, token, Limits::default()).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let inv = match rt.block_on(client.inventory(&a.workspace)) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("error: {}", crate::telemetry::chain(&e));
            return Ok(ExitCode::from(1));
        }
    };
    let text = inv.to_yaml()?;
    let before = std::fs::read_to_string(&a.out).ok();
    if before.as_deref() == Some(text.as_str()) {
        out(&format!("unchanged: {}", a.out.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    write_atomically(&a.out, &text)?;
    let environments: usize = inv.repositories.iter().map(|r| r.environments.len()).sum();
    out(&format!(
        "wrote {}: {} repositories, {} deployment environments{}",
        a.out.display(),
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

fn read_token(file: Option<&Path>, env: &str) -> anyhow::Result<SecretToken> {
    let value = match file {
        Some(f) => std::fs::read_to_string(f)
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

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("inventory"),
        std::process::id()
    ));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write {}: {e}", path.display())
    })
}
