//! The decision index: which policies of a set can decide a request, so that a
//! decision costs what the policies that may apply cost, not what the whole set
//! costs (issue #20: 5,000 policies, one per repository).
//!
//! Built once per set (startup and each reload, off the request threads), by
//! audience and then by `repositoryUuid`:
//!
//! - an allow policy is filed under its grant's audience; a deny policy under each
//!   audience it covers, or under "every audience" when it names none;
//! - within that, a policy with a repository condition (UUIDs, names, projects or
//!   globs, all resolved to UUIDs at compile time) is filed under each repository
//!   it names; one without goes to the short residual list, which every request of
//!   the audience considers.
//!
//! A policy is never dropped: each one lands in a residual list or under every
//! UUID its condition lists. The policies the index leaves out for a request are
//! exactly the ones whose repository condition does not list the token's
//! `repositoryUuid`, so they cannot match; the only thing they still decide is
//! which failed allow a refusal names ([`Index::excluded_failures`]).

use std::collections::HashMap;

use super::{Effect, Policy, Subject};
use crate::domain::BbUuid;

/// Positions (into the set's policies) filed under one key.
#[derive(Debug, Clone, Default)]
struct Bucket {
    by_repository: HashMap<BbUuid, Vec<usize>>,
    residual: Vec<usize>,
}

impl Bucket {
    fn add(&mut self, pos: usize, p: &Policy) {
        match &p.when.repository_uuid {
            Some(repos) => {
                for r in repos {
                    let list = self.by_repository.entry(*r).or_default();
                    // a UUID listed twice files the policy once
                    if list.last() != Some(&pos) {
                        list.push(pos);
                    }
                }
            }
            None => self.residual.push(pos),
        }
    }

    fn candidates(&self, repo: &BbUuid, out: &mut Vec<usize>) {
        out.extend_from_slice(&self.residual);
        if let Some(list) = self.by_repository.get(repo) {
            out.extend_from_slice(list);
        }
    }
}

/// Everything filed under one audience.
#[derive(Debug, Clone, Default)]
struct AudienceIndex {
    bucket: Bucket,
    /// Some allow policy grants the audience (else the request is
    /// `policy.unknown_audience`).
    has_allow: bool,
    /// The allow policies with a repository condition, in order: what the index
    /// may leave out of a request.
    keyed_allows: Vec<usize>,
    /// The same, under each workspace their `workspaceUuid` condition lists.
    keyed_allows_by_workspace: HashMap<BbUuid, Vec<usize>>,
}

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub(crate) struct Index {
    audiences: HashMap<String, AudienceIndex>,
    /// Deny policies without `audiences`.
    every_audience: Bucket,
}

/// The policies of a set that can decide one request.
#[derive(Debug)]
pub(crate) struct Candidates {
    /// Positions, ascending (evaluation order).
    pub positions: Vec<usize>,
    /// Some allow policy grants the audience.
    pub audience_known: bool,
}

impl Index {
    /// Files every policy of `policies` (in evaluation order). It cannot fail:
    /// every policy lands somewhere.
    pub(crate) fn build(policies: &[std::sync::Arc<Policy>]) -> Self {
        let mut index = Self::default();
        for (pos, p) in policies.iter().enumerate() {
            match (p.effect, &p.grant, &p.deny_audiences) {
                (Effect::Allow, Some(g), _) => {
                    let a = index.audiences.entry(g.audience.clone()).or_default();
                    a.has_allow = true;
                    a.bucket.add(pos, p);
                    if p.when.repository_uuid.is_some() {
                        a.keyed_allows.push(pos);
                        for w in p.when.workspace_uuid.iter().flatten() {
                            let list = a.keyed_allows_by_workspace.entry(*w).or_default();
                            if list.last() != Some(&pos) {
                                list.push(pos);
                            }
                        }
                    }
                }
                // An allow without a grant never applies (the plain scan skips it).
                (Effect::Allow, None, _) => {}
                (Effect::Deny, _, Some(auds)) => {
                    for aud in auds {
                        index
                            .audiences
                            .entry(aud.clone())
                            .or_default()
                            .bucket
                            .add(pos, p);
                    }
                }
                (Effect::Deny, _, None) => index.every_audience.add(pos, p),
            }
        }
        index
    }

    /// The policies that can decide a request for `audience` by `subject`.
    pub(crate) fn candidates(&self, audience: &str, subject: &Subject) -> Candidates {
        let mut positions = Vec::new();
        self.every_audience
            .candidates(&subject.repository_uuid, &mut positions);
        let aud = self.audiences.get(audience);
        if let Some(a) = aud {
            a.bucket
                .candidates(&subject.repository_uuid, &mut positions);
        }
        positions.sort_unstable();
        positions.dedup();
        Candidates {
            positions,
            audience_known: aud.is_some_and(|a| a.has_allow),
        }
    }

    /// Of the allow policies for `audience` that [`Index::candidates`] left out,
    /// the ones that can be the "closest allow" a refusal names: the first whose
    /// `workspaceUuid` condition lists the token's workspace (it fails at the
    /// repository, one condition passed), and the first of all (it fails at the
    /// workspace or the repository, none passed). Any other left-out allow fails
    /// at the same depth as one of these, later. Each lookup skips at most as
    /// many policies as there are candidates.
    pub(crate) fn excluded_failures(
        &self,
        audience: &str,
        subject: &Subject,
        candidates: &[usize],
    ) -> [Option<usize>; 2] {
        let Some(a) = self.audiences.get(audience) else {
            return [None, None];
        };
        let first_left_out = |list: &[usize]| {
            list.iter()
                .copied()
                .find(|p| candidates.binary_search(p).is_err())
        };
        let in_workspace = a
            .keyed_allows_by_workspace
            .get(&subject.workspace_uuid)
            .and_then(|l| first_left_out(l));
        [in_workspace, first_left_out(&a.keyed_allows)]
    }

    /// The audiences some allow policy grants, sorted.
    pub(crate) fn granted_audiences(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .audiences
            .iter()
            .filter(|(_, a)| a.has_allow)
            .map(|(k, _)| k.as_str())
            .collect();
        out.sort_unstable();
        out
    }
}
