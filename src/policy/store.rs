//! The active policy set and how it is replaced: compiled from a directory at
//! startup, recompiled on reload and swapped atomically when valid.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{PolicyError, PolicySet, Seen, Snapshot, Stamps};

/// What a settled reload ([`PolicyStore::reload_settled`]) did.
#[derive(Debug)]
pub enum Reloaded {
    /// The new set is active.
    Applied(Arc<PolicySet>),
    /// The files hold the active set (same digest): nothing swapped.
    Unchanged,
    /// A file or the directory's target changed between the two reads: nothing
    /// applied; try again later.
    Unsettled,
}

/// Holds the active [`PolicySet`]. Readers take an `Arc` of the set they started
/// with, so a reload never changes a decision in flight.
pub struct PolicyStore {
    dir: PathBuf,
    known_clients: BTreeSet<String>,
    jwt_clients: BTreeSet<String>,
    rules: Arc<super::require::Rules>,
    current: ArcSwap<PolicySet>,
    /// The digest of the last set refused: a watch event or poll tick for the
    /// same files does not refuse (log and count) it again; SIGHUP does.
    refused: std::sync::Mutex<Option<String>>,
    /// The stamps that stand for the active set's files until their stat
    /// changes ([`Seen`]): from the read that compiled it, refreshed by every
    /// later look that found the same digest (files deployed a moment before
    /// a reload are not trusted by it, but by the next look).
    seen: std::sync::Mutex<Arc<Seen>>,
    /// How much older than a read a file's change time must be for its stamp
    /// to be kept ([`TIMESTAMP_GRANULARITY`]; tests set 0).
    ///
    /// [`TIMESTAMP_GRANULARITY`]: crate::domain::regular_file::TIMESTAMP_GRANULARITY
    margin: std::time::Duration,
}

impl PolicyStore {
    /// Compiles every policy of `dir`; each grant's client must be in
    /// `known_clients`, and only grants of `jwt_clients` may name `identity` or
    /// `groups` ([`PolicySet::client_problems`]); every set carries `rules`
    /// (the configuration's `[protections]`).
    ///
    /// # Errors
    /// Every [`PolicyError`] of the directory.
    pub fn load(
        dir: &Path,
        known_clients: BTreeSet<String>,
        jwt_clients: BTreeSet<String>,
        rules: Arc<super::require::Rules>,
    ) -> Result<Self, Vec<PolicyError>> {
        let margin = crate::domain::regular_file::TIMESTAMP_GRANULARITY;
        let snapshot = Snapshot::read(dir)?;
        let set = Self::compile_snapshot(&snapshot, &known_clients, &jwt_clients, None)?
            .with_rules(rules.clone());
        Ok(Self {
            dir: dir.to_path_buf(),
            known_clients,
            jwt_clients,
            rules,
            current: ArcSwap::from_pointee(set),
            refused: std::sync::Mutex::new(None),
            seen: std::sync::Mutex::new(Arc::new(Seen::of(&snapshot, margin))),
            margin,
        })
    }

    /// The stamps a look at the directory may keep without reading the files.
    pub fn seen(&self) -> Arc<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn remember(&self, seen: Seen) {
        if let Ok(mut s) = self.seen.lock() {
            *s = Arc::new(seen);
        }
    }

    fn compile_snapshot(
        snapshot: &Snapshot,
        known: &BTreeSet<String>,
        jwt: &BTreeSet<String>,
        previous: Option<&PolicySet>,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        let set = PolicySet::from_snapshot_after(snapshot, Some(known), previous)?;
        let problems = set.client_problems(jwt);
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        }
    }

    /// The active set.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// The policies directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory twice, `settle` apart (blocking: call it off the
    /// async workers), and applies the first read only when both agree: the
    /// directory resolved to the same place and every file kept its device,
    /// inode, size, mtime and content ([`Snapshot::same_as`]). A writer busy in
    /// between (a file truncated and rewritten in chunks, a link flipped) gives
    /// [`Reloaded::Unsettled`]. With `force` false, files whose digest is the
    /// active set's are [`Reloaded::Unchanged`], and a file whose stat is the
    /// one the active set recorded is not read again ([`Seen`]);
    /// with `force` (SIGHUP) every file is read and hashed.
    ///
    /// # Errors
    /// Every problem of the new set (the first read); the active set is
    /// unchanged then.
    pub fn reload_settled(
        &self,
        settle: std::time::Duration,
        force: bool,
    ) -> Result<Reloaded, Vec<PolicyError>> {
        let active = self.current();
        let seen = if force { Arc::default() } else { self.seen() };
        let first = Snapshot::read_after(&self.dir, Some(active.inventory_digest()), &seen);
        std::thread::sleep(settle);
        // The second look stamps the files without keeping them.
        let second = Stamps::read_seen(&self.dir, &seen);
        let first = match (first, second) {
            (Ok(a), Ok(b)) if a.same_as(&b) => a,
            (Err(a), Err(_)) => return Err(a),
            _ => return Ok(Reloaded::Unsettled),
        };
        let digest = first.digest();
        let refused_before = self
            .refused
            .lock()
            .map(|r| r.as_deref() == Some(digest.as_str()))
            .unwrap_or(false);
        if digest == active.digest() {
            // The active set's files: their stamps may have settled since.
            self.remember(Seen::of(&first, self.margin));
        }
        if !force && (digest == active.digest() || refused_before) {
            return Ok(Reloaded::Unchanged);
        }
        let compiled = Self::compile_snapshot(
            &first,
            &self.known_clients,
            &self.jwt_clients,
            Some(&active),
        )
        .inspect_err(|_| {
            if let Ok(mut r) = self.refused.lock() {
                *r = Some(digest);
            }
        })?;
        let set = Arc::new(compiled.with_rules(self.rules.clone()));
        // Only over the set this reload started from: a reload that ran at
        // the same time (SIGHUP's thread beside the watch's) and applied a
        // set first is never replaced by an older read.
        let before = self.current.compare_and_swap(&active, set.clone());
        if !Arc::ptr_eq(&before, &active) {
            return Ok(Reloaded::Unsettled);
        }
        self.remember(Seen::of(&first, self.margin));
        Ok(Reloaded::Applied(set))
    }

    /// The digest of the directory as it is now, or of why it cannot be read
    /// (what the poll fallback compares between ticks); files whose stat is
    /// the one the active set recorded are not read.
    pub fn fingerprint(&self) -> String {
        match Stamps::read_seen(&self.dir, &self.seen()) {
            Ok(s) => {
                let digest = s.digest();
                if digest == self.current().digest() {
                    self.remember(Seen::of_stamps(&s, self.margin));
                }
                digest
            }
            Err(errors) => format!(
                "unreadable: {}",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const POLICY: &str = "effect: deny\nwhen:\n  branchName: main\n";

    #[test]
    fn each_look_at_the_active_sets_files_records_the_stamps_that_settled() {
        let d = tempfile::tempdir().unwrap();
        for name in ["a.yaml", "b.yaml"] {
            std::fs::write(d.path().join(name), POLICY).unwrap();
        }
        let mut store =
            PolicyStore::load(d.path(), BTreeSet::new(), BTreeSet::new(), Arc::default()).unwrap();
        // Read in the tick they were written: nothing recorded.
        assert!(store.seen().is_empty());
        // Time passes (the margin is 0 here instead): an unchanged reload
        // records them, as does the poll.
        store.margin = Duration::ZERO;
        assert!(matches!(
            store.reload_settled(Duration::ZERO, false),
            Ok(Reloaded::Unchanged)
        ));
        assert_eq!(store.seen().len(), 2);
        store.remember(Seen::default());
        assert_eq!(store.fingerprint(), store.current().digest());
        assert_eq!(store.seen().len(), 2);
        // An applied set: its files' stamps.
        std::fs::write(d.path().join("c.yaml"), POLICY).unwrap();
        assert!(matches!(
            store.reload_settled(Duration::ZERO, false),
            Ok(Reloaded::Applied(_))
        ));
        assert_eq!(store.seen().len(), 3);
        // A refused set or another digest seen by the poll leave them as
        // they are: they are the active set's.
        std::fs::write(d.path().join("d.yaml"), "effect: maybe\n").unwrap();
        assert!(store.reload_settled(Duration::ZERO, false).is_err());
        assert_ne!(store.fingerprint(), store.current().digest());
        assert_eq!(store.seen().len(), 3);
        // SIGHUP reads everything again and applies the same set.
        std::fs::remove_file(d.path().join("d.yaml")).unwrap();
        assert!(matches!(
            store.reload_settled(Duration::ZERO, true),
            Ok(Reloaded::Applied(_))
        ));
        assert_eq!(store.seen().len(), 3);
    }
}
