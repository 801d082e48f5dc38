//! Where a configuration or policy problem is.

/// A problem in a configuration or policy file, or in an environment variable
/// that overrides a configuration key: rendered `FILE: \`key\`: reason`, or
/// `FILE: reason` when it concerns the whole file. The configuration loader and
/// the policy loader both report with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {}{reason}", if key.is_empty() { String::new() } else { format!("`{key}`: ") })]
pub struct SourceError {
    /// The file, or `environment variable NAME` when an override caused it.
    pub file: String,
    /// The key path inside it (`workspaces[0].uuid`, `when.branchName[1]`), or
    /// empty for the whole file.
    pub key: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}
