//! Reading a workspace's inventory from Bitbucket Cloud's REST API 2.0 (for
//! `keycloak-ci-sts bitbucket inventory`; never on the request path):
//!
//! - `GET /2.0/workspaces/{workspace}`: the workspace UUID;
//! - `GET /2.0/repositories/{workspace}?pagelen=100`: repositories (`uuid`,
//!   `full_name`, `project.key`, `project.uuid`), following `next`;
//! - `GET /2.0/repositories/{workspace}/{repository uuid}/environments`:
//!   deployment environments (`uuid`, `name`), following `next`.
//!
//! Scopes (Atlassian's API reference, "Scopes" per endpoint): `repository`
//! (Repositories: Read) for the repository list and `pipeline` (Pipelines: Read)
//! for environments; a Workspace Access Token (or a Repository Access Token for a
//! single repository) sent as `Authorization: Bearer`. Every request has a
//! timeout; `next` links are followed only on the API's own origin, at most
//! [`Limits::max_pages`] pages; 429 and 5xx are retried after `Retry-After`
//! (bounded) at most [`Limits::max_retries`] times.

use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::{Environment, Project, Repository, WorkspaceInventory};
use crate::domain::{BbUuid, SecretToken};
use crate::http::{read_capped, retry_after_seconds, status_meaning, Meaning};

/// Most values one page may hold (Bitbucket's `pagelen` is at most 100).
pub const MAX_PAGE_VALUES: usize = 1_000;
/// Most values one list may hold (repositories of a workspace, environments of a repository).
pub const MAX_LIST_VALUES: usize = super::MAX_REPOSITORIES;

/// Bitbucket Cloud's API base.
pub const DEFAULT_API: &str = "https://api.bitbucket.org/2.0";

/// Bounds of one inventory run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Timeout of each request.
    pub timeout: Duration,
    /// Most pages followed per list (100 entries each).
    pub max_pages: usize,
    /// Most retries of one request after 429 or 5xx.
    pub max_retries: u32,
    /// Longest wait before a retry, whatever `Retry-After` says.
    pub max_retry_after: Duration,
    /// Largest response body, bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(20),
            max_pages: 200,
            max_retries: 5,
            max_retry_after: Duration::from_secs(60),
            max_body_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Why the inventory could not be read. Never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Transport failure or timeout.
    #[error("request to {url} failed")]
    Transport {
        /// URL.
        url: String,
        /// Cause.
        #[source]
        source: reqwest::Error,
    },
    /// 401 or 403: the token is wrong, expired or lacks a scope.
    #[error("{url} answered HTTP {status}: the token is invalid or lacks the `repository` / `pipeline` read scopes")]
    Unauthorized {
        /// URL.
        url: String,
        /// Status.
        status: u16,
    },
    /// Another unexpected status (after the retries, for transient ones).
    #[error("{url} answered HTTP {status}")]
    Status {
        /// URL.
        url: String,
        /// Status.
        status: u16,
    },
    /// Not the documented JSON shape, a `next` link off the API's origin, or too large.
    #[error("{url}: {reason}")]
    Malformed {
        /// URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// More pages than [`Limits::max_pages`].
    #[error("{url}: more than {max} pages")]
    TooManyPages {
        /// The list's first URL.
        url: String,
        /// The limit.
        max: usize,
    },
}

#[derive(Deserialize)]
struct Page<T> {
    values: Vec<T>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct RawWorkspace {
    uuid: String,
}

#[derive(Deserialize)]
struct RawRepository {
    uuid: String,
    full_name: String,
    project: Option<RawProject>,
}

#[derive(Deserialize)]
struct RawProject {
    key: String,
    uuid: String,
}

#[derive(Deserialize)]
struct RawEnvironment {
    uuid: String,
    name: String,
}

/// A Bitbucket API client for one run.
pub struct Client {
    http: reqwest::Client,
    api: Url,
    token: SecretToken,
    limits: Limits,
}

impl Client {
    /// A client of the API at `api` (e.g. [`DEFAULT_API`]; https, or http on loopback).
    ///
    /// # Errors
    /// An API URL that is not https (or loopback http), or a TLS setup failure.
    pub fn new(api: &str, token: SecretToken, limits: Limits) -> Result<Self, String> {
        let api = crate::http::check_upstream_url(api.trim_end_matches('/'))?;
        let http =
            crate::http::client(limits.timeout, limits.timeout).map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            api,
            token,
            limits,
        })
    }

    /// Reads the whole inventory of `workspace` (its slug).
    ///
    /// # Errors
    /// [`FetchError`].
    pub async fn inventory(&self, workspace: &str) -> Result<WorkspaceInventory, FetchError> {
        let slug_ok = !workspace.is_empty()
            && workspace
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !slug_ok {
            return Err(FetchError::Malformed {
                url: self.api.to_string(),
                reason: format!(
                    "`{}` is not a workspace ID (lowercase letters, digits, - and _)",
                    workspace.escape_debug()
                ),
            });
        }
        let ws_url = self.url(&["workspaces", workspace])?;
        let ws: RawWorkspace = self.get_json(&ws_url).await?;
        let workspace_uuid = uuid(&ws_url, &ws.uuid)?;
        let repos_url = self.url(&["repositories", workspace])?;
        let mut repositories = Vec::new();
        for r in self.list::<RawRepository>(repos_url, true).await? {
            let url = self.url(&["repositories", workspace])?;
            let repo_uuid = uuid(&url, &r.uuid)?;
            let env_url = self.url(&[
                "repositories",
                workspace,
                &repo_uuid.braced(),
                "environments",
            ])?;
            let mut environments = Vec::new();
            for e in self.list::<RawEnvironment>(env_url.clone(), false).await? {
                environments.push(Environment {
                    uuid: uuid(&env_url, &e.uuid)?,
                    name: e.name,
                });
            }
            let project = match r.project {
                None => None,
                Some(p) => Some(Project {
                    uuid: uuid(&url, &p.uuid)?,
                    key: p.key,
                }),
            };
            repositories.push(Repository {
                uuid: repo_uuid,
                full_name: r.full_name,
                project,
                environments,
            });
        }
        let mut inv = WorkspaceInventory {
            workspace: workspace.to_string(),
            workspace_uuid,
            repositories,
        };
        inv.normalise();
        // What the loader would refuse is never written.
        super::Inventory::new(vec![inv.clone()]).map_err(|reason| FetchError::Malformed {
            url: self.api.to_string(),
            reason,
        })?;
        Ok(inv)
    }

    fn url(&self, segments: &[&str]) -> Result<Url, FetchError> {
        let mut url = self.api.clone();
        url.path_segments_mut()
            .map_err(|()| FetchError::Malformed {
                url: self.api.to_string(),
                reason: "the API URL cannot take a path".into(),
            })?
            .extend(segments);
        Ok(url)
    }

    /// Every value of a paginated list, following `next` on the API's origin.
    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        mut url: Url,
        pagelen: bool,
    ) -> Result<Vec<T>, FetchError> {
        if pagelen {
            url.query_pairs_mut().append_pair("pagelen", "100");
        }
        let first = url.to_string();
        let mut out = Vec::new();
        for _ in 0..self.limits.max_pages {
            let page: Page<T> = self.get_json(&url).await?;
            if page.values.len() > MAX_PAGE_VALUES
                || out.len() + page.values.len() > MAX_LIST_VALUES
            {
                return Err(FetchError::Malformed {
                    url: url.to_string(),
                    reason: format!(
                        "more than {MAX_PAGE_VALUES} values in a page or {MAX_LIST_VALUES} in a list"
                    ),
                });
            }
            out.extend(page.values);
            let Some(next) = page.next else {
                return Ok(out);
            };
            let next = Url::parse(&next).map_err(|e| FetchError::Malformed {
                url: url.to_string(),
                reason: format!("next: {e}"),
            })?;
            if next.origin() != self.api.origin()
                || !next.username().is_empty()
                || next.password().is_some()
                || !next.path().starts_with(self.api.path())
            {
                return Err(FetchError::Malformed {
                    url: url.to_string(),
                    reason:
                        "a `next` link leaves the API's origin or base path, or carries credentials"
                            .into(),
                });
            }
            url = next;
        }
        Err(FetchError::TooManyPages {
            url: first,
            max: self.limits.max_pages,
        })
    }

    /// GET with the token, retrying 429 and transient statuses after their
    /// `Retry-After` (or 2^n seconds), bounded.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &Url) -> Result<T, FetchError> {
        let mut attempt = 0;
        loop {
            let resp = self
                .http
                .get(url.clone())
                .bearer_auth(self.token.expose())
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|source| FetchError::Transport {
                    url: url.to_string(),
                    source,
                })?;
            let status = resp.status().as_u16();
            if status == 200 {
                let body = read_capped(resp, self.limits.max_body_bytes)
                    .await
                    .map_err(|e| FetchError::Malformed {
                        url: url.to_string(),
                        reason: e.to_string(),
                    })?;
                return serde_json::from_slice(&body).map_err(|e| FetchError::Malformed {
                    url: url.to_string(),
                    reason: format!("not the documented JSON: {e}"),
                });
            }
            if matches!(status, 401 | 403) {
                return Err(FetchError::Unauthorized {
                    url: url.to_string(),
                    status,
                });
            }
            if status_meaning(status) != Meaning::Transient || attempt >= self.limits.max_retries {
                return Err(FetchError::Status {
                    url: url.to_string(),
                    status,
                });
            }
            let wait = retry_after_seconds(resp.headers(), self.limits.max_retry_after)
                .unwrap_or_else(|| {
                    (1u64 << attempt.min(6)).min(self.limits.max_retry_after.as_secs())
                });
            tracing::info!(url = %url, status, wait, "Bitbucket asked to slow down; retrying");
            tokio::time::sleep(Duration::from_secs(wait)).await;
            attempt += 1;
        }
    }
}

fn uuid(url: &Url, v: &str) -> Result<BbUuid, FetchError> {
    BbUuid::parse_lenient(v).map_err(|e| FetchError::Malformed {
        url: url.to_string(),
        reason: e.to_string(),
    })
}
