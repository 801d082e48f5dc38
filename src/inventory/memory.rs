//! The inventory as the service keeps it: compact, for organisations of tens of
//! thousands of repositories (issue #20).
//!
//! The file format ([`WorkspaceInventory`]) owns a `String` per name and a `Vec`
//! per repository; at 20,000 repositories that, with hash maps by UUID, name and
//! project, was about 15 MiB of a running service. Here every repository is one
//! fixed-size row ([`Row`], 40 bytes: its 16-byte UUID, where its name is in one
//! shared text, its workspace, project and environments by index), environment
//! and project names are interned once, and the lookups are sorted index arrays
//! searched by bisection:
//!
//! - by repository UUID: the rows themselves are sorted by UUID;
//! - by `full_name`, ignoring ASCII case: row numbers sorted by lower-case name;
//! - by project key: row numbers sorted by (key, row).
//!
//! Branch and deployment protections (recorded for the few repositories some
//! policy's requirement or branch / environment condition concerns) are a side
//! table sorted by repository UUID, compiled once ([`Compiled`]).

use super::protections::Compiled;
use super::{Repository, WorkspaceInventory};
use crate::domain::BbUuid;
use std::cmp::Ordering;
use std::collections::HashMap;

/// A workspace of the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    /// Workspace ID (slug).
    pub workspace: String,
    /// Workspace UUID.
    pub workspace_uuid: BbUuid,
    /// Whether it lists any repository.
    has_repositories: bool,
}

/// A span of [`Inventory::text`].
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: u32,
    len: u32,
}

/// One repository: 40 bytes.
#[derive(Debug, Clone, Copy)]
struct Row {
    uuid: BbUuid,
    name: Span,
    workspace: u32,
    /// Index into `projects`, or `NONE`.
    project: u32,
    /// Its environments: `environments[envs_start .. envs_start + envs_len]`.
    envs_start: u32,
    envs_len: u32,
}

/// One deployment environment: its UUID and its interned name.
#[derive(Debug, Clone, Copy)]
struct EnvRow {
    uuid: BbUuid,
    name: u32,
}

/// A project: its interned key and its UUID.
#[derive(Debug, Clone, Copy)]
struct ProjectRow {
    key: Span,
    uuid: BbUuid,
}

const NONE: u32 = u32::MAX;

/// Every inventory the policies may use, compact and indexed (see the module
/// documentation).
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    workspaces: Vec<Workspace>,
    /// Sorted by UUID.
    rows: Vec<Row>,
    /// Every repository `full_name`, then every project key and environment name
    /// once.
    text: String,
    environments: Vec<EnvRow>,
    /// Interned environment names.
    environment_names: Vec<Span>,
    projects: Vec<ProjectRow>,
    /// Row numbers sorted by lower-case `full_name`.
    by_name: Vec<u32>,
    /// Row numbers sorted by (project key, row).
    by_project: Vec<u32>,
    /// Protections by repository UUID, sorted.
    protections: Vec<(BbUuid, Compiled)>,
}

/// A repository of the [`Inventory`].
#[derive(Debug, Clone, Copy)]
pub struct RepositoryRef<'a> {
    inv: &'a Inventory,
    row: &'a Row,
    workspace: &'a Workspace,
}

/// A deployment environment of a [`RepositoryRef`].
#[derive(Debug, Clone, Copy)]
pub struct EnvironmentRef<'a> {
    /// `uuid`: what tokens carry as `deploymentEnvironmentUuid`.
    pub uuid: BbUuid,
    /// `name`, e.g. `Production`.
    pub name: &'a str,
}

impl<'a> RepositoryRef<'a> {
    /// `uuid`: what tokens carry as `repositoryUuid`.
    pub fn uuid(&self) -> BbUuid {
        self.row.uuid
    }

    /// `full_name`: `<workspace>/<slug>`.
    pub fn full_name(&self) -> &'a str {
        self.inv.str(self.row.name)
    }

    /// Its workspace.
    pub fn workspace(&self) -> &'a Workspace {
        self.workspace
    }

    /// Its project's key and UUID, when it has one.
    pub fn project(&self) -> Option<(&'a str, BbUuid)> {
        self.inv
            .projects
            .get(self.row.project as usize)
            .map(|p| (self.inv.str(p.key), p.uuid))
    }

    /// Its protections, when the inventory records them.
    pub fn protections(&self) -> Option<&'a Compiled> {
        self.inv.protections_of(&self.row.uuid)
    }

    /// Its deployment environments, sorted by UUID.
    pub fn environments(&self) -> impl Iterator<Item = EnvironmentRef<'a>> + 'a {
        let inv = self.inv;
        let start = self.row.envs_start as usize;
        let end = start + self.row.envs_len as usize;
        inv.environments
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .map(move |e| EnvironmentRef {
                uuid: e.uuid,
                name: inv
                    .environment_names
                    .get(e.name as usize)
                    .map(|s| inv.str(*s))
                    .unwrap_or_default(),
            })
    }
}

/// Appends `s` to `text`, returning its span.
fn push(text: &mut String, s: &str) -> Result<Span, String> {
    let too_big = || "the inventory is larger than 4 GiB".to_string();
    let start = u32::try_from(text.len()).map_err(|_| too_big())?;
    let len = u32::try_from(s.len()).map_err(|_| too_big())?;
    text.push_str(s);
    start.checked_add(len).ok_or_else(too_big)?;
    Ok(Span { start, len })
}

fn index(n: usize) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|&i| i != NONE)
        .ok_or_else(|| "the inventory has too many entries".to_string())
}

/// `a` and `b` compared as their ASCII lower-case forms, without allocating.
fn cmp_ignore_ascii_case(a: &str, b: &str) -> Ordering {
    a.bytes()
        .map(|c| c.to_ascii_lowercase())
        .cmp(b.bytes().map(|c| c.to_ascii_lowercase()))
}

/// Interns strings into the shared text while the inventory is built.
struct Builder {
    text: String,
    interned: HashMap<String, u32>,
    environment_names: Vec<Span>,
    projects: Vec<ProjectRow>,
    project_ids: HashMap<(String, BbUuid), u32>,
    environments: Vec<EnvRow>,
    rows: Vec<Row>,
    protections: Vec<(BbUuid, Compiled)>,
}

impl Builder {
    fn environment_name(&mut self, name: &str) -> Result<u32, String> {
        if let Some(&i) = self.interned.get(name) {
            return Ok(i);
        }
        let i = index(self.environment_names.len())?;
        let span = push(&mut self.text, name)?;
        self.environment_names.push(span);
        self.interned.insert(name.to_string(), i);
        Ok(i)
    }

    fn project(&mut self, key: &str, uuid: BbUuid) -> Result<u32, String> {
        if let Some(&i) = self.project_ids.get(&(key.to_string(), uuid)) {
            return Ok(i);
        }
        let i = index(self.projects.len())?;
        let span = push(&mut self.text, key)?;
        self.projects.push(ProjectRow { key: span, uuid });
        self.project_ids.insert((key.to_string(), uuid), i);
        Ok(i)
    }

    fn repository(&mut self, workspace: u32, r: &Repository) -> Result<(), String> {
        let name = push(&mut self.text, &r.full_name)?;
        let project = match &r.project {
            Some(p) => self.project(&p.key, p.uuid)?,
            None => NONE,
        };
        let envs_start = index(self.environments.len())?;
        for e in &r.environments {
            let name = self.environment_name(&e.name)?;
            self.environments.push(EnvRow { uuid: e.uuid, name });
        }
        if let Some(p) = &r.protections {
            let envs: Vec<(BbUuid, bool)> = r
                .environments
                .iter()
                .filter_map(|e| Some((e.uuid, e.restrictions.as_ref()?.admin_only)))
                .collect();
            self.protections.push((r.uuid, Compiled::new(p, &envs)));
        }
        self.rows.push(Row {
            uuid: r.uuid,
            name,
            workspace,
            project,
            envs_start,
            envs_len: index(r.environments.len())?,
        });
        Ok(())
    }
}

impl Inventory {
    /// Builds the compact, indexed inventory of `workspaces` (each validated).
    ///
    /// # Errors
    /// A reason when a workspace is malformed or two entries name the same
    /// repository UUID or `full_name` (ignoring ASCII case).
    pub fn new(workspaces: Vec<WorkspaceInventory>) -> Result<Self, String> {
        for ws in &workspaces {
            ws.validate()?;
        }
        let mut b = Builder {
            text: String::new(),
            interned: HashMap::new(),
            environment_names: Vec::new(),
            projects: Vec::new(),
            project_ids: HashMap::new(),
            environments: Vec::new(),
            rows: Vec::new(),
            protections: Vec::new(),
        };
        let mut kept = Vec::with_capacity(workspaces.len());
        for (w, ws) in workspaces.into_iter().enumerate() {
            let w = index(w)?;
            for r in &ws.repositories {
                b.repository(w, r)?;
            }
            kept.push(Workspace {
                has_repositories: !ws.repositories.is_empty(),
                workspace: ws.workspace,
                workspace_uuid: ws.workspace_uuid,
            });
            // `ws.repositories` is dropped here: one workspace's file form at a time.
        }
        Self::indexed(kept, b)
    }

    fn indexed(workspaces: Vec<Workspace>, b: Builder) -> Result<Self, String> {
        let mut inv = Self {
            workspaces,
            rows: b.rows,
            text: b.text,
            environments: b.environments,
            environment_names: b.environment_names,
            projects: b.projects,
            by_name: Vec::new(),
            by_project: Vec::new(),
            protections: b.protections,
        };
        inv.protections.sort_unstable_by_key(|(u, _)| *u);
        inv.protections.shrink_to_fit();
        inv.rows.sort_unstable_by_key(|r| r.uuid);
        if let Some(w) = inv.rows.windows(2).find(|w| w[0].uuid == w[1].uuid) {
            return Err(format!("repository {} is listed twice", w[0].uuid));
        }
        let all = 0..index(inv.rows.len())?;
        let mut by_name: Vec<u32> = all.clone().collect();
        by_name.sort_unstable_by(|&a, &b| cmp_ignore_ascii_case(inv.name(a), inv.name(b)));
        if let Some(w) = by_name
            .windows(2)
            .find(|w| cmp_ignore_ascii_case(inv.name(w[0]), inv.name(w[1])).is_eq())
        {
            return Err(format!(
                "two repositories are named `{}` (a stale inventory?)",
                inv.name(w[1])
            ));
        }
        let mut by_project: Vec<u32> = all
            .filter(|&r| inv.row(r).is_some_and(|r| r.project != NONE))
            .collect();
        by_project.sort_unstable_by(|&a, &b| inv.key(a).cmp(&inv.key(b)).then(a.cmp(&b)));
        inv.by_name = by_name;
        inv.by_project = by_project;
        inv.text.shrink_to_fit();
        inv.rows.shrink_to_fit();
        inv.environments.shrink_to_fit();
        Ok(inv)
    }

    fn str(&self, s: Span) -> &str {
        let start = s.start as usize;
        self.text
            .get(start..start + s.len as usize)
            .unwrap_or_default()
    }

    fn row(&self, r: u32) -> Option<&Row> {
        self.rows.get(r as usize)
    }

    fn name(&self, r: u32) -> &str {
        self.row(r).map(|r| self.str(r.name)).unwrap_or_default()
    }

    fn key(&self, r: u32) -> Option<&str> {
        let p = self.projects.get(self.row(r)?.project as usize)?;
        Some(self.str(p.key))
    }

    /// The view of a row (`None` only for a row whose workspace index is out of
    /// range, which building the inventory never writes).
    fn view<'a>(&'a self, row: &'a Row) -> Option<RepositoryRef<'a>> {
        Some(RepositoryRef {
            inv: self,
            row,
            workspace: self.workspaces.get(row.workspace as usize)?,
        })
    }

    fn at(&self, r: u32) -> Option<RepositoryRef<'_>> {
        self.view(self.row(r)?)
    }

    fn protections_of(&self, repo: &BbUuid) -> Option<&Compiled> {
        let i = self
            .protections
            .binary_search_by_key(repo, |(u, _)| *u)
            .ok()?;
        self.protections.get(i).map(|(_, c)| c)
    }

    /// How many repositories have protections recorded.
    pub fn protected_count(&self) -> usize {
        self.protections.len()
    }

    /// The repository whose `full_name` is `name`, ignoring ASCII case.
    pub fn repository_named(&self, name: &str) -> Option<RepositoryRef<'_>> {
        let i = self
            .by_name
            .binary_search_by(|&r| cmp_ignore_ascii_case(self.name(r), name))
            .ok()?;
        self.at(*self.by_name.get(i)?)
    }

    /// The repositories of project `key` (keys are unique within a workspace only).
    pub fn in_project<'a>(&'a self, key: &'a str) -> impl Iterator<Item = RepositoryRef<'a>> + 'a {
        let from = self
            .by_project
            .partition_point(|&r| self.key(r) < Some(key));
        self.by_project
            .get(from..)
            .unwrap_or_default()
            .iter()
            .take_while(move |&&r| self.key(r) == Some(key))
            .filter_map(|&r| self.at(r))
    }

    /// The UUIDs of the workspaces with ID `slug` that list a repository.
    pub fn workspace_uuids(&self, slug: &str) -> std::collections::BTreeSet<BbUuid> {
        self.workspaces
            .iter()
            .filter(|w| w.workspace == slug && w.has_repositories)
            .map(|w| w.workspace_uuid)
            .collect()
    }

    /// The repository with this UUID.
    pub fn repository(&self, uuid: &BbUuid) -> Option<RepositoryRef<'_>> {
        let i = self.rows.binary_search_by_key(uuid, |r| r.uuid).ok()?;
        self.view(self.rows.get(i)?)
    }

    /// True when no repository is known.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// How many repositories are known.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Every repository, sorted by UUID.
    pub fn repositories(&self) -> impl Iterator<Item = RepositoryRef<'_>> {
        self.rows.iter().filter_map(move |row| self.view(row))
    }

    /// Bytes this inventory holds on the heap (its tables and text): what the
    /// memory test holds to a bound.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.workspaces.capacity() * size_of::<Workspace>()
            + self
                .workspaces
                .iter()
                .map(|w| w.workspace.capacity())
                .sum::<usize>()
            + self.rows.capacity() * size_of::<Row>()
            + self.text.capacity()
            + self.environments.capacity() * size_of::<EnvRow>()
            + self.environment_names.capacity() * size_of::<Span>()
            + self.projects.capacity() * size_of::<ProjectRow>()
            + (self.by_name.capacity() + self.by_project.capacity()) * size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Environment, Project};

    fn uuid(n: u32) -> BbUuid {
        BbUuid::parse_lenient(&format!("00000000-0000-4000-8000-{n:012x}")).unwrap()
    }

    /// `n` repositories in 7 projects, each with Production and Staging.
    fn workspace(slug: &str, base: u32, n: u32) -> WorkspaceInventory {
        WorkspaceInventory {
            workspace: slug.into(),
            workspace_uuid: uuid(base),
            repositories: (1..=n)
                .map(|i| Repository {
                    uuid: uuid(base + 7919 * i % 100_003 + 1),
                    full_name: format!("{slug}/Repo-{i:05}"),
                    protections: None,
                    project: (i % 8 != 0).then(|| Project {
                        key: format!("P{}", i % 7),
                        uuid: uuid(base + 200_000 + i % 7),
                    }),
                    environments: vec![
                        Environment {
                            uuid: uuid(base + 300_000 + 2 * i),
                            name: "Production".into(),
                            restrictions: None,
                        },
                        Environment {
                            uuid: uuid(base + 300_001 + 2 * i),
                            name: "Staging".into(),
                            restrictions: None,
                        },
                    ],
                })
                .collect(),
        }
    }

    #[test]
    fn every_lookup_agrees_with_the_file_form() {
        let a = workspace("acme", 0, 500);
        let b = workspace("beta", 1_000_000, 300);
        let inv = Inventory::new(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(inv.len(), 800);
        for (ws, file) in [(&a, "acme"), (&b, "beta")] {
            for r in &ws.repositories {
                let found = inv.repository(&r.uuid).unwrap();
                assert_eq!(found.full_name(), r.full_name);
                assert_eq!(found.workspace().workspace, file);
                assert_eq!(
                    found.project(),
                    r.project.as_ref().map(|p| (p.key.as_str(), p.uuid))
                );
                let envs: Vec<(BbUuid, &str)> =
                    found.environments().map(|e| (e.uuid, e.name)).collect();
                let want: Vec<(BbUuid, &str)> = r
                    .environments
                    .iter()
                    .map(|e| (e.uuid, e.name.as_str()))
                    .collect();
                assert_eq!(envs, want);
                let upper = r.full_name.to_ascii_uppercase();
                assert_eq!(inv.repository_named(&upper).unwrap().uuid(), r.uuid);
            }
            assert_eq!(inv.workspace_uuids(file).len(), 1);
        }
        assert!(inv.repository_named("acme/Repo-99999").is_none());
        assert!(inv.repository(&uuid(999_999_999)).is_none());
        // Projects: the key's repositories of both workspaces, none other.
        for k in 0..7 {
            let key = format!("P{k}");
            let mut got: Vec<BbUuid> = inv.in_project(&key).map(|r| r.uuid()).collect();
            let mut want: Vec<BbUuid> = a
                .repositories
                .iter()
                .chain(&b.repositories)
                .filter(|r| r.project.as_ref().is_some_and(|p| p.key == key))
                .map(|r| r.uuid)
                .collect();
            got.sort();
            want.sort();
            assert_eq!(got, want, "{key}");
        }
        assert_eq!(inv.in_project("P9").count(), 0);
        let sorted: Vec<BbUuid> = inv.repositories().map(|r| r.uuid()).collect();
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn names_equal_but_for_case_are_one_repository_twice() {
        let mut a = workspace("acme", 0, 3);
        a.repositories[1].full_name = "acme/REPO-00001".into();
        let e = Inventory::new(vec![a]).unwrap_err();
        assert!(e.contains("two repositories are named"), "{e}");
    }

    #[test]
    fn twenty_thousand_repositories_fit_in_three_mebibytes() {
        let inv = Inventory::new(vec![workspace("acme", 0, 20_000)]).unwrap();
        let bytes = inv.heap_bytes();
        assert!(bytes < 3 * 1024 * 1024, "{bytes} bytes");
        // 40 bytes a row, 20 an environment, the name, two index entries
        assert!(
            bytes / 20_000 < 128,
            "{} bytes a repository",
            bytes / 20_000
        );
    }
}
