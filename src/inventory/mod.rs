//! The repository inventory: which repositories, projects and deployment
//! environments a Bitbucket workspace has, by UUID and by name, read from
//! Bitbucket's REST API by `keycloak-ci-sts bitbucket inventory` ([`fetch`]) and
//! committed beside the policies (`policies/inventory/<workspace>.yaml`), so that
//! policies can name `acme/deploy-service`, project `OPS` or environment
//! `Production` while tokens carry only braced UUIDs. The service never calls
//! Bitbucket while answering a pipeline: it reads these files with the policies.
//!
//! The file is deterministic and diff-friendly: repositories sorted by UUID (the
//! identity, so a rename is a one-line diff of `full_name`), environments by
//! UUID, one field per line.

pub mod fetch;
mod memory;
pub mod protections;
pub mod state;

pub use memory::{EnvironmentRef, Inventory, RepositoryRef, Workspace};
pub use protections::{BranchRestriction, EnvironmentRestrictions, Principal, Protections};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::deceptive;
use crate::domain::{BbUuid, SourceError};

/// Longest accepted inventory file, in bytes.
pub const MAX_INVENTORY_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The directory below the policies directory that holds inventories.
pub const INVENTORY_DIR: &str = "inventory";

/// One workspace's inventory (the file format, `policies/inventory/<workspace>.yaml`,
/// written by `keycloak-ci-sts bitbucket inventory`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceInventory {
    /// Workspace ID (slug).
    #[schemars(regex(pattern = r"^[a-z0-9_-]+$"))]
    pub workspace: String,
    /// Workspace UUID.
    pub workspace_uuid: BbUuid,
    /// Repositories, sorted by UUID.
    #[schemars(length(max = 50000))]
    pub repositories: Vec<Repository>,
}

/// One repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    /// `uuid`: what tokens carry as `repositoryUuid`.
    pub uuid: BbUuid,
    /// `full_name`: `<workspace>/<slug>`.
    #[schemars(regex(pattern = r"^[^/\s]+/[^/\s]+$"))]
    pub full_name: String,
    /// The project it belongs to, when any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<Project>,
    /// Its deployment environments, sorted by UUID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub environments: Vec<Environment>,
    /// Its branch protections, when `bitbucket inventory` read them (only for
    /// repositories some policy's requirement or branch / environment
    /// condition concerns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protections: Option<Protections>,
}

/// A Bitbucket project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Project {
    /// `key`, e.g. `OPS`.
    pub key: String,
    /// `uuid`.
    pub uuid: BbUuid,
}

/// A deployment environment: what tokens carry as `deploymentEnvironmentUuid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// `uuid`.
    pub uuid: BbUuid,
    /// `name`, e.g. `Production`.
    pub name: String,
    /// Its restrictions, read with the repository's protections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restrictions: Option<EnvironmentRestrictions>,
}

/// Most repositories one workspace inventory may hold.
pub const MAX_REPOSITORIES: usize = 50_000;
/// Most deployment environments one repository may hold.
pub const MAX_ENVIRONMENTS: usize = 1_000;

impl WorkspaceInventory {
    /// What a well-formed inventory keeps: a workspace ID of lowercase letters,
    /// digits, `-` and `_`; every `full_name` `<workspace>/<slug>`; names without
    /// control, invisible or bidi characters; environment UUIDs unique; at most
    /// [`MAX_REPOSITORIES`] repositories of at most [`MAX_ENVIRONMENTS`] environments.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), String> {
        let ok_slug = !self.workspace.is_empty()
            && self
                .workspace
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !ok_slug {
            return Err(format!(
                "`{}` is not a workspace ID",
                self.workspace.escape_debug()
            ));
        }
        if self.repositories.len() > MAX_REPOSITORIES {
            return Err(format!("more than {MAX_REPOSITORIES} repositories"));
        }
        let prefix = format!("{}/", self.workspace);
        let mut envs = std::collections::BTreeSet::new();
        for r in &self.repositories {
            let slug = r.full_name.strip_prefix(&prefix).unwrap_or_default();
            if slug.is_empty() || slug.contains('/') || r.full_name.chars().any(deceptive) {
                return Err(format!(
                    "`{}` is not a repository of workspace `{}`",
                    r.full_name.escape_debug(),
                    self.workspace
                ));
            }
            if r.environments.len() > MAX_ENVIRONMENTS {
                return Err(format!(
                    "{}: more than {MAX_ENVIRONMENTS} environments",
                    r.full_name
                ));
            }
            for e in &r.environments {
                if e.name.trim().is_empty() || e.name.chars().any(deceptive) {
                    return Err(format!(
                        "{}: environment name `{}` is empty or has control, invisible or bidi characters",
                        r.full_name,
                        e.name.escape_debug()
                    ));
                }
                if !envs.insert(e.uuid) {
                    return Err(format!("environment {} is listed twice", e.uuid));
                }
                if e.restrictions.is_some() && r.protections.is_none() {
                    return Err(format!(
                        "{}: environment `{}` has restrictions but the repository no protections (their read_at)",
                        r.full_name, e.name
                    ));
                }
            }
            if let Some(p) = &r.protections {
                p.validate(deceptive)
                    .map_err(|e| format!("{}: {e}", r.full_name))?;
            }
        }
        Ok(())
    }

    /// Sorts repositories and environments by UUID (the file's order).
    pub fn normalise(&mut self) {
        self.repositories.sort_by_key(|r| r.uuid);
        for r in &mut self.repositories {
            r.environments.sort_by_key(|e| e.uuid);
        }
    }

    /// The YAML text of the file, with a header saying how it was made.
    ///
    /// # Errors
    /// Serialisation failure (not expected for these types).
    pub fn to_yaml(&self) -> Result<String, serde_norway::Error> {
        let mut copy = self.clone();
        copy.normalise();
        Ok(format!(
            "# Bitbucket inventory of workspace `{}`, written by `keycloak-ci-sts bitbucket inventory`.\n\
             # Review the diff; refresh it rather than editing it. Repositories are sorted by UUID.\n{}",
            self.workspace,
            serde_norway::to_string(&copy)?
        ))
    }
}

impl Inventory {
    /// The inventory files of `<policies_dir>/inventory/`, sorted (none when the
    /// directory is absent: an empty inventory, and policies then use UUIDs only).
    ///
    /// # Errors
    /// Every entry that is not a regular `.yaml` file within the policies
    /// directory, naming it.
    pub fn files(policies_dir: &Path) -> Result<Vec<PathBuf>, Vec<SourceError>> {
        let dir = policies_dir.join(INVENTORY_DIR);
        let err = |file: &Path, reason: String| SourceError {
            file: file.display().to_string(),
            key: String::new(),
            reason,
        };
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let root = std::fs::canonicalize(policies_dir)
            .map_err(|e| vec![err(policies_dir, format!("cannot read: {e}"))])?;
        let mut files = Vec::new();
        let mut problems = Vec::new();
        for entry in
            std::fs::read_dir(&dir).map_err(|e| vec![err(&dir, format!("cannot read: {e}"))])?
        {
            let path = match entry {
                Ok(e) => e.path(),
                Err(e) => {
                    problems.push(err(&dir, format!("an entry cannot be read: {e}")));
                    continue;
                }
            };
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let yaml_like = path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| x.eq_ignore_ascii_case("yaml") || x.eq_ignore_ascii_case("yml"));
            if name.starts_with('.') || !yaml_like {
                continue;
            }
            // Only regular files within the policies directory (links included):
            // an inventory decides what names mean.
            match std::fs::canonicalize(&path) {
                Ok(t) if t.starts_with(&root) && t.is_file() && path.extension().is_some_and(|x| x == "yaml") => {
                    files.push(path)
                }
                _ => problems.push(err(
                    &path,
                    "not a regular .yaml file within the policies directory (a dangling or outside link, or a .yml or upper-case extension)".into(),
                )),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        files.sort();
        Ok(files)
    }

    /// The inventory of files already read (path for messages, content), as
    /// [`Inventory::files`] listed them.
    ///
    /// # Errors
    /// Every file that cannot be parsed, naming it.
    pub fn from_texts<'a>(
        policies_dir: &Path,
        files: impl IntoIterator<Item = (&'a Path, &'a str)>,
    ) -> Result<Self, Vec<SourceError>> {
        let err = |file: &Path, reason: String| SourceError {
            file: file.display().to_string(),
            key: String::new(),
            reason,
        };
        let mut workspaces = Vec::new();
        let mut errors = Vec::new();
        for (f, text) in files {
            match parse(text) {
                Ok(w) => workspaces.push(w),
                Err(reason) => errors.push(err(f, reason)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Self::new(workspaces).map_err(|reason| vec![err(&policies_dir.join(INVENTORY_DIR), reason)])
    }
}

/// One inventory file's text as the service reads it: parsed ([`parse`]) and
/// checked ([`WorkspaceInventory::validate`]).
///
/// # Errors
/// The first problem, without quoting the file's values.
pub fn read_text(text: &str) -> Result<WorkspaceInventory, String> {
    let w = parse(text)?;
    w.validate()?;
    Ok(w)
}

/// Reads an inventory file's text (anchors and aliases refused), streaming:
/// memory stays near the size of the result, not of the document's events
/// (serde-saphyr; every budget bounded, duplicate keys refused).
pub(crate) fn parse(text: &str) -> Result<WorkspaceInventory, String> {
    crate::domain::yaml::refuse_anchors_and_aliases(text)?;
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    let mut budget = serde_saphyr::Budget::default();
    // The file is at most MAX_INVENTORY_FILE_BYTES: no more nodes or scalar
    // bytes than it has bytes; no anchors, aliases or further documents.
    let max = usize::try_from(MAX_INVENTORY_FILE_BYTES).unwrap_or(usize::MAX);
    budget.max_nodes = max;
    budget.max_events = 2 * max;
    budget.max_total_scalar_bytes = max;
    budget.max_depth = 16;
    budget.max_documents = 1;
    budget.max_anchors = 0;
    budget.max_aliases = 0;
    options.budget = Some(budget);
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| {
        // No quoted values: a wrong file must not end up in logs.
        let msg = e.without_snippet().to_string();
        let msg: String = msg.split('"').step_by(2).collect::<Vec<_>>().join("\"…\"");
        format!("`{path}`: {msg}")
    })
}

/// The JSON Schema of an inventory file, draft-07 (see
/// [`crate::domain::json_schema::draft07`]), committed as
/// `docs/src/schemas/inventory.schema.json`. `bitbucket inventory` writes these
/// files; the schema is for reviewers' editors and for tools reading them.
pub fn schema() -> serde_json::Value {
    crate::domain::json_schema::draft07::<WorkspaceInventory>()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn uuid(n: u8) -> BbUuid {
        BbUuid::parse_lenient(&format!("00000000-0000-4000-8000-0000000000{n:02x}")).unwrap()
    }

    pub(crate) fn sample() -> WorkspaceInventory {
        WorkspaceInventory {
            workspace: "acme".into(),
            workspace_uuid: uuid(1),
            repositories: vec![
                Repository {
                    uuid: uuid(20),
                    full_name: "acme/web".into(),
                    project: None,
                    environments: vec![],
                    protections: None,
                },
                Repository {
                    uuid: uuid(10),
                    full_name: "acme/deploy-service".into(),
                    protections: None,
                    project: Some(Project {
                        key: "OPS".into(),
                        uuid: uuid(2),
                    }),
                    environments: vec![
                        Environment {
                            uuid: uuid(31),
                            name: "Staging".into(),
                            restrictions: None,
                        },
                        Environment {
                            uuid: uuid(30),
                            name: "Production".into(),
                            restrictions: None,
                        },
                    ],
                },
            ],
        }
    }

    #[test]
    fn the_file_is_deterministic_sorted_by_uuid_and_reads_back() {
        let inv = sample();
        let text = inv.to_yaml().unwrap();
        let mut reversed = inv.clone();
        reversed.repositories.reverse();
        assert_eq!(
            text,
            reversed.to_yaml().unwrap(),
            "order of input does not matter"
        );
        let deploy = text.find("acme/deploy-service").unwrap();
        let web = text.find("acme/web").unwrap();
        assert!(deploy < web, "sorted by uuid:\n{text}");
        let back: WorkspaceInventory = parse(&text).unwrap();
        let mut normalised = inv.clone();
        normalised.normalise();
        assert_eq!(back, normalised);
    }

    #[test]
    fn duplicates_are_refused() {
        let mut a = sample();
        let b = sample();
        a.workspace = "other".into();
        assert!(Inventory::new(vec![a, b]).is_err());
    }
}
