//! The active policy set and how it is replaced: compiled from a directory at
//! startup, recompiled on reload and swapped atomically when valid.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{PolicyError, PolicySet};

/// Holds the active [`PolicySet`]. Readers take an `Arc` of the set they started
/// with, so a reload never changes a decision in flight.
pub struct PolicyStore {
    dir: PathBuf,
    known_clients: BTreeSet<String>,
    jwt_clients: BTreeSet<String>,
    current: ArcSwap<PolicySet>,
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
        })
    }

    fn compile(
        dir: &Path,
        known: &BTreeSet<String>,
        jwt: &BTreeSet<String>,
    ) -> Result<PolicySet, Vec<PolicyError>> {
        let set = PolicySet::load_dir(dir, Some(known))?;
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

    /// Recompiles the directory and, when valid, makes it the active set and returns
    /// the new set.
    ///
    /// # Errors
    /// Every problem of the new set; the active set is unchanged then.
    pub fn reload(&self) -> Result<Arc<PolicySet>, Vec<PolicyError>> {
        let set = Arc::new(Self::compile(
            &self.dir,
            &self.known_clients,
            &self.jwt_clients,
        )?);
        self.current.store(set.clone());
        Ok(set)
    }
}
