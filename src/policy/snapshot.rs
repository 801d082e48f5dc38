//! One read of a policies directory: every policy and inventory file's content
//! and [`FileStamp`], read once (compiling uses these bytes, never a second read)
//! and without blocking ([`read_regular_file`]). Two snapshots compare equal
//! ([`Snapshot::same_as`]) when the directory resolved to the same place and no
//! file changed: how a reload knows that no writer was busy.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{policy_files, PolicyError, MAX_POLICY_FILE_BYTES};
use crate::domain::regular_file::{read_regular_file, stamp_regular_file, FileStamp};
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
    /// Inventory files, sorted. Their `text` is empty when `inventory_known`.
    pub(super) inventory: Vec<SourceFile>,
    /// The inventory files were only stamped: their digest is the one
    /// [`Snapshot::read_after`] was given, so the parsed inventory is reused.
    pub(super) inventory_known: bool,
    /// Other files of the directory (warned about, not read).
    pub(super) ignored: Vec<String>,
}

/// The policies directory as a settle check or the poll sees it: each file's
/// [`FileStamp`] without its content (no second copy of every file in memory).
#[derive(Debug)]
pub struct Stamps {
    root: PathBuf,
    files: Vec<(String, FileStamp)>,
    ignored: Vec<String>,
}

/// What one listing of the directory found.
struct Listing {
    root: PathBuf,
    policies: Vec<PathBuf>,
    inventory: Vec<PathBuf>,
    ignored: Vec<String>,
}

fn list(dir: &Path) -> Result<Listing, Vec<PolicyError>> {
    let root = std::fs::canonicalize(dir).map_err(|e| {
        vec![PolicyError {
            file: dir.display().to_string(),
            key: String::new(),
            reason: format!("cannot read policies directory: {e}"),
        }]
    })?;
    let (policies, ignored) = policy_files(dir)?;
    let inventory = Inventory::files(dir)?;
    Ok(Listing {
        root,
        policies,
        inventory,
        ignored,
    })
}

/// Reads (or stamps) every listed file with `read`, collecting the errors.
fn read_each<T>(
    dir: &Path,
    paths: Vec<PathBuf>,
    max: u64,
    errors: &mut Vec<PolicyError>,
    read: impl Fn(&Path, u64) -> Result<T, String>,
) -> Vec<(String, PathBuf, T)> {
    paths
        .into_iter()
        .filter_map(|path| match read(&path, max) {
            Ok(v) => Some((relative(dir, &path), path, v)),
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
}

/// SHA-256 (hex) over sorted (relative path, size, content SHA-256) triples.
fn digest_of<'a>(files: impl Iterator<Item = (&'a str, &'a FileStamp)>) -> String {
    let mut all: Vec<(&str, &FileStamp)> = files.collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (rel, stamp) in all {
        h.update(rel.as_bytes());
        h.update([0]);
        h.update(stamp.size.to_be_bytes());
        h.update(stamp.sha256);
    }
    hex::encode(h.finalize())
}

impl Snapshot {
    /// Resolves `dir` again (a swapped link is followed) and reads every policy
    /// and inventory file.
    ///
    /// # Errors
    /// Every entry that cannot be read: not a regular file, too large, not UTF-8,
    /// a dangling or outside link.
    pub fn read(dir: &Path) -> Result<Self, Vec<PolicyError>> {
        Self::read_after(dir, None)
    }

    /// [`Snapshot::read`] for a reload: when the inventory files' digest is
    /// `known_inventory` (the active set's), they are only stamped, not kept in
    /// memory (megabytes at organisation size), and `inventory_known` is set.
    ///
    /// # Errors
    /// As [`Snapshot::read`].
    pub fn read_after(dir: &Path, known_inventory: Option<&str>) -> Result<Self, Vec<PolicyError>> {
        let l = list(dir)?;
        let mut errors = Vec::new();
        let file = |(rel, path, (stamp, text))| SourceFile {
            rel,
            path,
            stamp,
            text,
        };
        let policies = read_each(
            dir,
            l.policies,
            MAX_POLICY_FILE_BYTES,
            &mut errors,
            read_regular_file,
        );
        let stamped = known_inventory.map(|known| {
            let files = read_each(
                dir,
                l.inventory.clone(),
                MAX_INVENTORY_FILE_BYTES,
                &mut Vec::new(),
                stamp_regular_file,
            );
            let digest = digest_of(files.iter().map(|(rel, _, s)| (rel.as_str(), s)));
            (files, digest == known)
        });
        let (inventory, inventory_known) = match stamped {
            Some((files, true)) if files.len() == l.inventory.len() => (
                files
                    .into_iter()
                    .map(|(rel, path, stamp)| SourceFile {
                        rel,
                        path,
                        stamp,
                        text: String::new(),
                    })
                    .collect(),
                true,
            ),
            _ => (
                read_each(
                    dir,
                    l.inventory,
                    MAX_INVENTORY_FILE_BYTES,
                    &mut errors,
                    read_regular_file,
                )
                .into_iter()
                .map(file)
                .collect(),
                false,
            ),
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            root: l.root,
            policies: policies.into_iter().map(file).collect(),
            inventory,
            inventory_known,
            ignored: l.ignored,
        })
    }

    /// SHA-256 (hex) over the sorted (relative path, size, content SHA-256) of
    /// every file: the same files with the same bytes give the same digest on
    /// every replica, wherever the directory is mounted.
    pub fn digest(&self) -> String {
        digest_of(
            self.policies
                .iter()
                .chain(&self.inventory)
                .map(|f| (f.rel.as_str(), &f.stamp)),
        )
    }

    /// The same digest over the inventory files alone: a reload whose
    /// inventory did not change keeps the parsed one.
    pub fn inventory_digest(&self) -> String {
        digest_of(self.inventory.iter().map(|f| (f.rel.as_str(), &f.stamp)))
    }

    /// Whether `stamps` saw the same directory (resolved to the same place) with
    /// the same files, each with equal device, inode, size, mtime and content.
    pub fn same_as(&self, stamps: &Stamps) -> bool {
        let mut mine: Vec<(&str, &FileStamp)> = self
            .policies
            .iter()
            .chain(&self.inventory)
            .map(|f| (f.rel.as_str(), &f.stamp))
            .collect();
        mine.sort_by(|a, b| a.0.cmp(b.0));
        let theirs: Vec<(&str, &FileStamp)> =
            stamps.files.iter().map(|(r, s)| (r.as_str(), s)).collect();
        self.root == stamps.root && self.ignored == stamps.ignored && mine == theirs
    }
}

impl Stamps {
    /// Lists `dir` as [`Snapshot::read`] does and stamps every file, hashing
    /// its content in chunks without keeping it.
    ///
    /// # Errors
    /// As [`Snapshot::read`] (a file that is not UTF-8 is not noticed here).
    pub fn read(dir: &Path) -> Result<Self, Vec<PolicyError>> {
        let l = list(dir)?;
        let mut errors = Vec::new();
        let mut files: Vec<(String, FileStamp)> = read_each(
            dir,
            l.policies,
            MAX_POLICY_FILE_BYTES,
            &mut errors,
            stamp_regular_file,
        )
        .into_iter()
        .chain(read_each(
            dir,
            l.inventory,
            MAX_INVENTORY_FILE_BYTES,
            &mut errors,
            stamp_regular_file,
        ))
        .map(|(rel, _, stamp)| (rel, stamp))
        .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            root: l.root,
            files,
            ignored: l.ignored,
        })
    }

    /// [`Snapshot::digest`] of what was stamped.
    pub fn digest(&self) -> String {
        digest_of(self.files.iter().map(|(r, s)| (r.as_str(), s)))
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
        assert!(
            !sa.same_as(&Stamps::read(b.path()).unwrap()),
            "another directory"
        );
        assert!(sa.same_as(&Stamps::read(a.path()).unwrap()));
        assert_eq!(Stamps::read(a.path()).unwrap().digest(), sa.digest());
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
        let second = Stamps::read(d.path()).unwrap();
        assert_eq!(first.digest(), second.digest());
        assert!(!first.same_as(&second), "another inode");
    }
}
