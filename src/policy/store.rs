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
    current: ArcSwap<PolicySet>,
    /// The digest of the last set refused: a watch event or poll tick for the
    /// same files does not refuse (log and count) it again; SIGHUP does.
    refused: std::sync::Mutex<Option<String>>,
}

impl PolicyStore {
    /// Compiles every policy of `dir`; each grant's client must be in
    /// `known_clients`, and only grants of `jwt_clients` may name `identity` or
    /// `groups` ([`PolicySet::client_problems`]).
    ///
    /// # Errors
    /// Every [`PolicyError`] of the directory.
    pub fn load(
        dir: &Path,
        known_clients: BTreeSet<String>,
        jwt_clients: BTreeSet<String>,
    ) -> Result<Self, Vec<PolicyError>> {
        let set = Self::compile(dir, &known_clients, &jwt_clients)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            known_clients,
            jwt_clients,
            current: ArcSwap::from_pointee(set),
            refused: std::sync::Mutex::new(None),
        })
    }

    fn compile(
        dir: &Path,
        known: &BTreeSet<String>,
        jwt: &BTreeSet<String>,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        Self::compile_snapshot(&Snapshot::read(dir)?, known, jwt, None)
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
    /// one the active set recorded is not read again ([`PolicySet::seen`]);
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
        let none = Seen::default();
        let seen = if force { &none } else { active.seen() };
        let first = Snapshot::read_after(&self.dir, Some(active.inventory_digest()), seen);
        std::thread::sleep(settle);
        // The second look stamps the files without keeping them.
        let second = Stamps::read_seen(&self.dir, seen);
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
        if !force && (digest == self.current().digest() || refused_before) {
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
        let set = Arc::new(compiled);
        self.current.store(set.clone());
        Ok(Reloaded::Applied(set))
    }

    /// The digest of the directory as it is now, or of why it cannot be read
    /// (what the poll fallback compares between ticks); files whose stat is
    /// the one the active set recorded are not read.
    pub fn fingerprint(&self) -> String {
        match Stamps::read_seen(&self.dir, self.current().seen()) {
            Ok(s) => s.digest(),
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
