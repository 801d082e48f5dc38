//! One read of a policies directory: every policy and inventory file's content
//! and [`FileStamp`], read once (compiling uses these bytes, never a second read)
//! and without blocking ([`read_regular_file`]). Two snapshots compare equal
//! ([`Snapshot::same_as`]) when the directory resolved to the same place and no
//! file changed: how a reload knows that no writer was busy.
//!
//! A reload after a watch event or a poll tick reads only what changed: a file
//! whose stat (device, inode, size, mtime, ctime) is the one the active set
//! recorded ([`Seen`], only for files whose change time was already old when
//! read: [`FileStamp::settled_before`]) keeps that stamp and is neither opened
//! nor hashed again, and its compiled policy is reused. SIGHUP reads every file.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{Mode, OFlags};
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
    /// The content; `None` when the file was not read: an inventory file of a
    /// known inventory, or a policy file whose [`Seen`] stamp still stands.
    pub text: Option<String>,
}

/// The stamps of a compiled set's files that may stand for them while their
/// stat does not change (those [`FileStamp::settled_before`] their read), by
/// path relative to the policies directory.
#[derive(Debug, Clone, Default)]
pub struct Seen(HashMap<String, FileStamp>);

impl Seen {
    /// The stamps of `snapshot`'s files whose change time was at least
    /// `margin` ([`TIMESTAMP_GRANULARITY`]) older than the read.
    ///
    /// [`TIMESTAMP_GRANULARITY`]: crate::domain::regular_file::TIMESTAMP_GRANULARITY
    pub(super) fn of(snapshot: &Snapshot, margin: Duration) -> Self {
        Self(
            snapshot
                .policies
                .iter()
                .chain(&snapshot.inventory)
                .filter(|f| f.stamp.settled_before(snapshot.read_at, margin))
                .map(|f| (f.rel.clone(), f.stamp))
                .collect(),
        )
    }

    /// The same of what [`Stamps`] saw.
    pub(super) fn of_stamps(stamps: &Stamps, margin: Duration) -> Self {
        Self(
            stamps
                .files
                .iter()
                .filter(|(_, s)| s.settled_before(stamps.read_at, margin))
                .map(|(rel, s)| (rel.clone(), *s))
                .collect(),
        )
    }

    /// How many files it holds a stamp for.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The stamp recorded for `rel` when the file at `path` (`rel` under the
    /// listing's open directory `at`, when it could be opened) still has its stat.
    fn still(&self, rel: &str, path: &Path, at: Option<&OwnedFd>) -> Option<FileStamp> {
        self.0
            .get(rel)
            .filter(|s| match at {
                Some(dir) => s.still_in(dir.as_fd(), rel),
                None => s.still_at(path),
            })
            .copied()
    }

    /// The file's stamp: the recorded one while it still stands, else hashed.
    fn stamp(
        &self,
        rel: &str,
        path: &Path,
        at: Option<&OwnedFd>,
        max: u64,
    ) -> Result<FileStamp, String> {
        match self.still(rel, path, at) {
            Some(s) => Ok(s),
            None => stamp_regular_file(path, max),
        }
    }
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
    /// Inventory files, sorted. Their `text` is `None` when `inventory_known`.
    pub(super) inventory: Vec<SourceFile>,
    /// The inventory files were only stamped: their digest is the one
    /// [`Snapshot::read_after`] was given, so the parsed inventory is reused.
    pub(super) inventory_known: bool,
    /// Other files of the directory (warned about, not read).
    pub(super) ignored: Vec<String>,
    /// When the read started (before any file was looked at).
    read_at: SystemTime,
}

/// The policies directory as a settle check or the poll sees it: each file's
/// [`FileStamp`] without its content (no second copy of every file in memory).
#[derive(Debug)]
pub struct Stamps {
    root: PathBuf,
    files: Vec<(String, FileStamp)>,
    ignored: Vec<String>,
    /// When the look started.
    read_at: SystemTime,
}

/// What one listing of the directory found.
struct Listing {
    root: PathBuf,
    /// The directory, open (`O_PATH`) when listed: a [`Seen`] stamp is checked
    /// relative to it.
    at: Option<OwnedFd>,
    /// (path relative to the directory, path) of each policy file.
    policies: Vec<(String, PathBuf)>,
    /// The same of each inventory file.
    inventory: Vec<(String, PathBuf)>,
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
    // Not opened: each file is stat'ed by its whole path instead.
    let at = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok();
    Ok(Listing {
        root,
        at,
        policies: named(policies, ""),
        inventory: named(inventory, &format!("{INVENTORY_DIR}/")),
        ignored,
    })
}

/// Reads (or stamps) every listed file with `read`, collecting the errors.
fn read_each<T>(
    paths: Vec<(String, PathBuf)>,
    max: u64,
    errors: &mut Vec<PolicyError>,
    read: impl Fn(&str, &Path, u64) -> Result<T, String>,
) -> Vec<(String, PathBuf, T)> {
    paths
        .into_iter()
        .enumerate()
        .filter_map(|(i, (rel, path))| {
            if i % 32 == 31 {
                std::thread::yield_now();
            }
            match read(&rel, &path, max) {
                Ok(v) => Some((rel, path, v)),
                Err(reason) => {
                    errors.push(PolicyError {
                        file: path.display().to_string(),
                        key: String::new(),
                        reason,
                    });
                    None
                }
            }
        })
        .collect()
}

/// Reads a file in full: its stamp and its text.
fn read_full(_: &str, path: &Path, max: u64) -> Result<(FileStamp, Option<String>), String> {
    read_regular_file(path, max).map(|(stamp, text)| (stamp, Some(text)))
}

fn source_file(
    (rel, path, (stamp, text)): (String, PathBuf, (FileStamp, Option<String>)),
) -> SourceFile {
    SourceFile {
        rel,
        path,
        stamp,
        text,
    }
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
        Self::read_after(dir, None, &Seen::default())
    }

    /// [`Snapshot::read`] for a reload. When the inventory files' digest is
    /// `known_inventory` (the active set's), they are only stamped, not kept in
    /// memory (megabytes at organisation size), and `inventory_known` is set;
    /// then a policy file whose `seen` stamp still stands is not read either
    /// (its compiled policy is reused). Inventory files are stamped through
    /// `seen` too.
    ///
    /// # Errors
    /// As [`Snapshot::read`].
    pub fn read_after(
        dir: &Path,
        known_inventory: Option<&str>,
        seen: &Seen,
    ) -> Result<Self, Vec<PolicyError>> {
        let read_at = SystemTime::now();
        let l = list(dir)?;
        let mut errors = Vec::new();
        let stamped = known_inventory.map(|known| {
            let files = read_each(
                l.inventory.clone(),
                MAX_INVENTORY_FILE_BYTES,
                &mut Vec::new(),
                |rel, path, max| seen.stamp(rel, path, l.at.as_ref(), max),
            );
            let digest = digest_of(files.iter().map(|(rel, _, s)| (rel.as_str(), s)));
            (files, digest == known)
        });
        let (inventory, inventory_known) = match stamped {
            Some((files, true)) if files.len() == l.inventory.len() => (
                files
                    .into_iter()
                    .map(|(rel, path, stamp)| source_file((rel, path, (stamp, None))))
                    .collect(),
                true,
            ),
            _ => (
                read_each(
                    l.inventory,
                    MAX_INVENTORY_FILE_BYTES,
                    &mut errors,
                    read_full,
                )
                .into_iter()
                .map(source_file)
                .collect(),
                false,
            ),
        };
        // Compiling reuses a policy only against the same inventory.
        let policies = read_each(
            l.policies,
            MAX_POLICY_FILE_BYTES,
            &mut errors,
            |rel, path, max| match seen
                .still(rel, path, l.at.as_ref())
                .filter(|_| inventory_known)
            {
                Some(stamp) => Ok((stamp, None)),
                None => read_full(rel, path, max),
            },
        );
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            root: l.root,
            policies: policies.into_iter().map(source_file).collect(),
            inventory,
            inventory_known,
            ignored: l.ignored,
            read_at,
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
    /// the same files, each with equal device, inode, size, times and content.
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
        Self::read_seen(dir, &Seen::default())
    }

    /// [`Stamps::read`] where a file whose `seen` stamp still stands keeps it
    /// without being opened.
    ///
    /// # Errors
    /// As [`Stamps::read`].
    pub fn read_seen(dir: &Path, seen: &Seen) -> Result<Self, Vec<PolicyError>> {
        let read_at = SystemTime::now();
        let l = list(dir)?;
        let mut errors = Vec::new();
        let stamp = |rel: &str, path: &Path, max| seen.stamp(rel, path, l.at.as_ref(), max);
        let mut files: Vec<(String, FileStamp)> =
            read_each(l.policies, MAX_POLICY_FILE_BYTES, &mut errors, stamp)
                .into_iter()
                .chain(read_each(
                    l.inventory,
                    MAX_INVENTORY_FILE_BYTES,
                    &mut errors,
                    stamp,
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
            read_at,
        })
    }

    /// [`Snapshot::digest`] of what was stamped.
    pub fn digest(&self) -> String {
        digest_of(self.files.iter().map(|(r, s)| (r.as_str(), s)))
    }
}

/// Each file's path with its path relative to the policies directory: its
/// name after `prefix` (every listed file is directly in the directory or in
/// `inventory/`).
fn named(paths: Vec<PathBuf>, prefix: &str) -> Vec<(String, PathBuf)> {
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            (format!("{prefix}{name}"), p)
        })
        .collect()
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

    /// `snapshot` as if it had been read once its files' change times were
    /// old (a test cannot wait for the file system's clock).
    fn aged(mut snapshot: Snapshot) -> Snapshot {
        snapshot.read_at += MARGIN + Duration::from_secs(1);
        snapshot
    }

    const MARGIN: Duration = crate::domain::regular_file::TIMESTAMP_GRANULARITY;

    fn read_again(s: &Snapshot) -> Vec<&str> {
        s.policies
            .iter()
            .filter(|f| f.text.is_some())
            .map(|f| f.rel.as_str())
            .collect()
    }

    #[test]
    fn a_reload_reads_again_only_the_files_whose_stat_changed() {
        let d = tempfile::tempdir().unwrap();
        for name in ["a.yaml", "b.yaml", "c.yaml"] {
            std::fs::write(d.path().join(name), POLICY).unwrap();
        }
        // Read in the tick the files were written: nothing may stand for them.
        assert!(Seen::of(&Snapshot::read(d.path()).unwrap(), MARGIN)
            .0
            .is_empty());
        let first = aged(Snapshot::read(d.path()).unwrap());
        let seen = Seen::of(&first, MARGIN);
        assert_eq!(seen.0.len(), 3);
        let inventory = first.inventory_digest();
        let unchanged = Snapshot::read_after(d.path(), Some(&inventory), &seen).unwrap();
        assert!(read_again(&unchanged).is_empty());
        assert_eq!(unchanged.digest(), first.digest());
        // b rewritten with the same bytes (another inode), c appended to
        std::fs::write(d.path().join("tmp"), POLICY).unwrap();
        std::fs::rename(d.path().join("tmp"), d.path().join("b.yaml")).unwrap();
        let mut c = std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join("c.yaml"))
            .unwrap();
        std::io::Write::write_all(&mut c, b"# changed\n").unwrap();
        let again = Snapshot::read_after(d.path(), Some(&inventory), &seen).unwrap();
        assert_eq!(read_again(&again), ["b.yaml", "c.yaml"]);
        assert_eq!(again.digest(), Snapshot::read(d.path()).unwrap().digest());
        // The settle check's second look agrees without reading a.yaml.
        assert!(again.same_as(&Stamps::read_seen(d.path(), &seen).unwrap()));
        assert_eq!(
            Stamps::read_seen(d.path(), &seen).unwrap().digest(),
            again.digest()
        );
        // The set compiled from the first read reuses a.yaml's policy as it
        // was; without that set, a file not read cannot be compiled.
        let set = super::super::PolicySet::from_snapshot_after(&first, None, None).unwrap();
        let next = super::super::PolicySet::from_snapshot_after(&again, None, Some(&set)).unwrap();
        assert!(std::sync::Arc::ptr_eq(&set.policies[0], &next.policies[0]));
        assert_eq!(next.digest(), again.digest());
        assert!(super::super::PolicySet::from_snapshot_after(&unchanged, None, None).is_err());
        // Another inventory: every policy is compiled again, so read again.
        let other = Snapshot::read_after(d.path(), Some("another"), &seen).unwrap();
        assert_eq!(read_again(&other), ["a.yaml", "b.yaml", "c.yaml"]);
    }

    #[test]
    fn a_seen_file_replaced_by_a_fifo_or_removed_is_noticed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.yaml"), POLICY).unwrap();
        std::fs::write(d.path().join("b.yaml"), POLICY).unwrap();
        let first = aged(Snapshot::read(d.path()).unwrap());
        let seen = Seen::of(&first, MARGIN);
        let inventory = first.inventory_digest();
        std::fs::remove_file(d.path().join("b.yaml")).unwrap();
        let fewer = Snapshot::read_after(d.path(), Some(&inventory), &seen).unwrap();
        assert_eq!(fewer.policies.len(), 1);
        assert_ne!(fewer.digest(), first.digest());
        std::fs::remove_file(d.path().join("a.yaml")).unwrap();
        crate::domain::regular_file::make_fifo(&d.path().join("a.yaml"));
        assert!(Snapshot::read_after(d.path(), Some(&inventory), &seen).is_err());
        assert!(Stamps::read_seen(d.path(), &seen).is_err());
    }
}
