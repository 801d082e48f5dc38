//! One read of a policies directory: every policy and inventory file's content
//! and [`FileStamp`], read once (compiling uses these bytes, never a second read)
//! and without blocking ([`read_regular_file`]). Two snapshots compare equal
//! ([`Snapshot::same_as`]) when the directory resolved to the same place and no
//! file changed: how a reload knows that no writer was busy.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{policy_files, PolicyError, MAX_POLICY_FILE_BYTES};
use crate::domain::regular_file::{read_regular_file, FileStamp};
use crate::inventory::{Inventory, INVENTORY_DIR, MAX_INVENTORY_FILE_BYTES};

/// A file of the set as it was read.
#[derive(Debug)]
pub(super) struct SourceFile {
    /// The path under the configured directory (for messages).
    pub path: PathBuf,
    /// The path relative to the policies directory (`a.yaml`, `inventory/acme.yaml`).
    pub rel: String,
    /// What identifies this version of the file.
    pub stamp: FileStamp,
    /// The content.
    pub text: String,
}

/// The policies directory as one read saw it.
#[derive(Debug)]
pub struct Snapshot {
    /// The configured directory.
    pub(super) dir: PathBuf,
    /// Where it resolved (links followed) when read.
    root: PathBuf,
    /// Policy files, sorted.
    pub(super) policies: Vec<SourceFile>,
    /// Inventory files, sorted.
    pub(super) inventory: Vec<SourceFile>,
    /// Other files of the directory (warned about, not read).
    pub(super) ignored: Vec<String>,
}

impl Snapshot {
    /// Resolves `dir` again (a swapped link is followed) and reads every policy
    /// and inventory file.
    ///
    /// # Errors
    /// Every entry that cannot be read: not a regular file, too large, not UTF-8,
    /// a dangling or outside link.
    pub fn read(dir: &Path) -> Result<Self, Vec<PolicyError>> {
        let root = std::fs::canonicalize(dir).map_err(|e| {
            vec![PolicyError {
                file: dir.display().to_string(),
                key: String::new(),
                reason: format!("cannot read policies directory: {e}"),
            }]
        })?;
        let (policy_paths, ignored) = policy_files(dir)?;
        let inventory_paths = Inventory::files(dir)?;
        let mut errors = Vec::new();
        let mut read_all = |paths: Vec<PathBuf>, max: u64| -> Vec<SourceFile> {
            paths
                .into_iter()
                .filter_map(|path| match read_regular_file(&path, max) {
                    Ok((stamp, text)) => Some(SourceFile {
                        rel: relative(dir, &path),
                        path,
                        stamp,
                        text,
                    }),
                    Err(reason) => {
                        errors.push(PolicyError {
                            file: path.display().to_string(),
                            key: String::new(),
                            reason,
                        });
                        None
                    }
                })
                .collect()
        };
        let policies = read_all(policy_paths, MAX_POLICY_FILE_BYTES);
        let inventory = read_all(inventory_paths, MAX_INVENTORY_FILE_BYTES);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            root,
            policies,
            inventory,
            ignored,
        })
    }

    /// Every file read, sorted by relative path.
    fn files(&self) -> Vec<&SourceFile> {
        let mut all: Vec<&SourceFile> = self.policies.iter().chain(&self.inventory).collect();
        all.sort_by(|a, b| a.rel.cmp(&b.rel));
        all
    }

    /// SHA-256 (hex) over the sorted (relative path, content) pairs: the same
    /// files with the same bytes give the same digest on every replica, wherever
    /// the directory is mounted.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for f in self.files() {
            h.update(f.rel.as_bytes());
            h.update([0]);
            h.update((f.text.len() as u64).to_be_bytes());
            h.update(f.text.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// SHA-256 (hex) over the inventory files alone (as [`Snapshot::digest`]):
    /// a reload whose inventory did not change keeps the parsed one.
    pub fn inventory_digest(&self) -> String {
        let mut h = Sha256::new();
        for f in &self.inventory {
            h.update(f.rel.as_bytes());
            h.update([0]);
            h.update((f.text.len() as u64).to_be_bytes());
            h.update(f.text.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Whether `other` read the same directory (resolved to the same place) with
    /// the same files, each with equal device, inode, size, mtime and content.
    pub fn same_as(&self, other: &Self) -> bool {
        let stamps = |s: &Self| -> Vec<(String, FileStamp)> {
            s.files()
                .into_iter()
                .map(|f| (f.rel.clone(), f.stamp))
                .collect()
        };
        self.root == other.root && self.ignored == other.ignored && stamps(self) == stamps(other)
    }
}

fn relative(dir: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(dir).unwrap_or(path);
    match rel.parent() {
        Some(p) if p == Path::new(INVENTORY_DIR) => {
            format!(
                "{INVENTORY_DIR}/{}",
                rel.file_name().unwrap_or_default().to_string_lossy()
            )
        }
        _ => rel.to_string_lossy().into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "effect: deny\nwhen:\n  branchName: main\n";

    #[test]
    fn the_digest_covers_names_and_contents_not_the_location() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::write(d.join("x.yaml"), POLICY).unwrap();
            std::fs::write(d.join("y.yaml"), POLICY).unwrap();
        }
        let sa = Snapshot::read(a.path()).unwrap();
        let sb = Snapshot::read(b.path()).unwrap();
        assert_eq!(sa.digest(), sb.digest());
        assert!(!sa.same_as(&sb), "another directory");
        assert!(sa.same_as(&Snapshot::read(a.path()).unwrap()));
        std::fs::rename(b.path().join("y.yaml"), b.path().join("z.yaml")).unwrap();
        assert_ne!(sa.digest(), Snapshot::read(b.path()).unwrap().digest());
    }

    #[test]
    fn a_rewrite_with_equal_content_is_still_a_change() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x.yaml");
        std::fs::write(&f, POLICY).unwrap();
        let first = Snapshot::read(d.path()).unwrap();
        std::fs::write(d.path().join("tmp"), POLICY).unwrap();
        std::fs::rename(d.path().join("tmp"), &f).unwrap();
        let second = Snapshot::read(d.path()).unwrap();
        assert_eq!(first.digest(), second.digest());
        assert!(!first.same_as(&second), "another inode");
    }
}
