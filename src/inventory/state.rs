//! The state file of `bitbucket inventory` (`<out>.state`, JSON, beside the
//! reviewed inventory and never loaded by the service): for each repository,
//! the `updated_on` Bitbucket listed and the environments read at that time.
//! A run reuses the environments of a repository whose `updated_on` is
//! unchanged (incremental), and saves the state as it goes and when it stops
//! early (resumable); the inventory format itself stays as reviewed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Environment;
use crate::domain::BbUuid;

/// Largest state file read, bytes.
pub const MAX_STATE_FILE_BYTES: u64 = 32 * 1024 * 1024;

/// Version of the state format; another version is ignored (a full run).
const VERSION: u32 = 1;

/// What a run knows of each repository's environments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    version: u32,
    /// Workspace ID the entries belong to.
    pub workspace: String,
    /// By repository UUID.
    pub repositories: BTreeMap<BbUuid, Entry>,
    /// The protections read, by repository UUID (reused while younger than
    /// `--protections-reuse-hours`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub protections: BTreeMap<BbUuid, ProtectionsEntry>,
}

/// One repository's protections and the environments read with them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectionsEntry {
    /// The protections.
    pub protections: super::Protections,
    /// Its environments with their restrictions, read at the same time.
    pub environments: Vec<Environment>,
}

impl ProtectionsEntry {
    /// Whether this entry may stand for a new read at `now`: younger than
    /// `within` (and not from the future), for the same environments, and
    /// with the branch restrictions read (an unknown record is read again: the
    /// token may have been given the scope since).
    pub fn reusable(
        &self,
        now: std::time::SystemTime,
        within: std::time::Duration,
        environments: &std::collections::BTreeSet<BbUuid>,
    ) -> bool {
        let same = self.environments.len() == environments.len()
            && self
                .environments
                .iter()
                .all(|e| environments.contains(&e.uuid));
        let young = super::protections::parse_rfc3339(&self.protections.read_at)
            .is_some_and(|t| now.duration_since(t).is_ok_and(|age| age < within));
        same && young && self.protections.branch_restrictions.is_some()
    }
}

/// One repository's environments as read when it had `updated_on`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// `updated_on` from the repository list.
    pub updated_on: String,
    /// Its environments, as read.
    pub environments: Vec<Environment>,
}

impl State {
    /// An empty state for `workspace`.
    pub fn new(workspace: &str) -> Self {
        Self {
            version: VERSION,
            workspace: workspace.to_string(),
            repositories: BTreeMap::new(),
            protections: BTreeMap::new(),
        }
    }

    /// The state path of an inventory written to `out`: `<out>.state`.
    pub fn path_for(out: &Path) -> PathBuf {
        let mut p = out.as_os_str().to_owned();
        p.push(".state");
        PathBuf::from(p)
    }

    /// The state at `path` for `workspace`; empty when there is none, or it is
    /// of another workspace or version, or unreadable (with a warning: the run
    /// then reads everything).
    pub fn load(path: &Path, workspace: &str) -> Self {
        let text = match crate::domain::regular_file::read_small_file(path, MAX_STATE_FILE_BYTES) {
            Ok(t) => t,
            Err(e) => {
                if path.exists() {
                    eprintln!("warning: {} not used: {e}", path.display());
                }
                return Self::new(workspace);
            }
        };
        match serde_json::from_str::<Self>(&text) {
            Ok(s)
                if s.version == VERSION
                    && s.workspace == workspace
                    && s.repositories.len() <= super::MAX_REPOSITORIES =>
            {
                s
            }
            Ok(_) => Self::new(workspace),
            Err(e) => {
                eprintln!("warning: {} not used: {e}", path.display());
                Self::new(workspace)
            }
        }
    }

    /// The environments of `repo` when they were read at `updated_on`.
    pub fn reusable(&self, repo: &BbUuid, updated_on: Option<&str>) -> Option<&[Environment]> {
        let e = self.repositories.get(repo)?;
        (Some(e.updated_on.as_str()) == updated_on).then_some(e.environments.as_slice())
    }

    /// Keeps only the repositories `listed` holds.
    pub fn retain(&mut self, listed: &std::collections::BTreeSet<BbUuid>) {
        self.repositories.retain(|k, _| listed.contains(k));
    }

    /// The file's text (deterministic: entries sorted by UUID).
    ///
    /// # Errors
    /// A serialisation failure.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }
}
