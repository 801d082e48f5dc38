//! Reading a workspace's inventory from Bitbucket Cloud's REST API 2.0 (for
//! `keycloak-ci-sts bitbucket inventory`; never on the request path):
//!
//! - `GET /2.0/workspaces/{workspace}`: the workspace UUID;
//! - `GET /2.0/repositories/{workspace}?pagelen=100`: repositories (`uuid`,
//!   `full_name`, `project.key`, `project.uuid`, `updated_on`), following `next`;
//! - `GET /2.0/repositories/{workspace}/{repository uuid}/environments`:
//!   deployment environments (`uuid`, `name`), following `next`;
//! - for the repositories policies concern, their protections ([`protections`]:
//!   branch restrictions, branching model, environment restrictions).
//!
//! Scopes (Atlassian's API reference, "Scopes" per endpoint): `repository`
//! (Repositories: Read) for the repository list and `pipeline` (Pipelines: Read)
//! for environments; a Workspace Access Token (or a Repository Access Token for a
//! single repository) sent as `Authorization: Bearer`. Every request has a
//! timeout; a `next` link is followed only when it continues the same list
//! (same origin, same path by segments, another query: [`check_followed`]), at
//! most [`Limits::max_pages`] pages; anything else fails the run, nothing written.
//!
//! Rate limits (Atlassian, "API request limits" and "scaled rate limits": a
//! rolling hour of 1,000 to 10,000 requests to `/2.0/repositories/*`): 429 and
//! 5xx are retried after `Retry-After` (seconds or an HTTP date; 1, 2, 4 … s
//! without one) at most [`Limits::max_retries`] times, and a wait longer than
//! [`Limits::max_wait`] stops the run ([`FetchError::RateLimited`]) instead;
//! once an answer says `X-RateLimit-NearLimit: true` (less than a fifth of the
//! hour's `X-RateLimit-Limit` left), requests are spaced by an hour divided by
//! that limit (bounded by `max_wait`) until an answer no longer says so.
//!
//! Environments are read only for repositories whose `updated_on` differs from
//! the [`State`]'s (incremental, resumable); the state is updated as they are.

mod protections;
#[cfg(fuzzing)]
pub(crate) use protections::restrictions_page;
pub use protections::{ProtectionsRead, ADMIN_SCOPE};

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;
use url::Url;

use super::state::{Entry, State};
use super::{Environment, Project, Repository, WorkspaceInventory};
use crate::domain::{BbUuid, SecretToken};
use crate::http::{check_followed, read_capped, status_meaning, Meaning, PathRule};

/// Most values one page may hold (Bitbucket's `pagelen` is at most 100).
pub const MAX_PAGE_VALUES: usize = 1_000;
/// Most values one list may hold (repositories of a workspace, environments of a repository).
pub const MAX_LIST_VALUES: usize = super::MAX_REPOSITORIES;

/// Bitbucket Cloud's API base.
pub const DEFAULT_API: &str = "https://api.bitbucket.org/2.0";

/// Default of [`Limits::max_wait`], seconds: the rate limit's rolling hour.
pub const DEFAULT_MAX_WAIT_SECS: u64 = 3600;

/// Bounds of one inventory run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Timeout of each request.
    pub timeout: Duration,
    /// Most pages followed per list (100 entries each).
    pub max_pages: usize,
    /// Most retries of one request after 429 or 5xx.
    pub max_retries: u32,
    /// Longest single wait: a `Retry-After` beyond it stops the run; the
    /// backoff without one and the spacing near the limit are cut to it.
    pub max_wait: Duration,
    /// Environments read between two saves of the state.
    pub checkpoint_every: usize,
    /// Largest response body, bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(20),
            max_pages: 500,
            max_retries: 5,
            max_wait: Duration::from_secs(DEFAULT_MAX_WAIT_SECS),
            checkpoint_every: 100,
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
        /// Bitbucket's error says the token lacks a scope ("Your credentials
        /// lack one or more required privilege scopes"), which holds for
        /// every repository, not this one alone.
        missing_scope: bool,
    },
    /// Another unexpected status (after the retries, for transient ones).
    #[error("{url} answered HTTP {status}")]
    Status {
        /// URL.
        url: String,
        /// Status.
        status: u16,
    },
    /// Not the documented JSON shape, a `next` link that does not continue the
    /// same list, or too large.
    #[error("{url}: {reason}")]
    Malformed {
        /// URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Bitbucket asked to wait longer than [`Limits::max_wait`].
    #[error("{url}: rate limited, Bitbucket asks to wait {wait_secs} s, more than --max-wait ({max_secs} s)")]
    RateLimited {
        /// URL.
        url: String,
        /// `Retry-After`, seconds.
        wait_secs: u64,
        /// [`Limits::max_wait`], seconds.
        max_secs: f64,
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
    #[serde(default)]
    updated_on: Option<String>,
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
    #[serde(default)]
    restrictions: Option<RawEnvRestrictions>,
    #[serde(default)]
    deployment_gate_enabled: Option<bool>,
    #[serde(default)]
    environment_lock_enabled: Option<bool>,
}

#[derive(Deserialize)]
struct RawEnvRestrictions {
    admin_only: Option<bool>,
}

#[derive(Deserialize)]
struct RawRestriction {
    kind: String,
    #[serde(default)]
    branch_match_kind: Option<String>,
    #[serde(default)]
    branch_type: Option<String>,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    value: Option<u64>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    groups: Vec<RawGroup>,
}

#[derive(Deserialize)]
struct RawUser {
    uuid: String,
    #[serde(default)]
    display_name: String,
}

#[derive(Deserialize)]
struct RawGroup {
    slug: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize, Default)]
struct RawBranchingModel {
    #[serde(default)]
    development: Option<RawModelBranch>,
    #[serde(default)]
    production: Option<RawModelBranch>,
    #[serde(default)]
    branch_types: Vec<RawBranchType>,
}

#[derive(Deserialize)]
struct RawModelBranch {
    /// Present only when the branch exists.
    #[serde(default)]
    branch: Option<RawBranchName>,
}

#[derive(Deserialize)]
struct RawBranchName {
    name: String,
}

#[derive(Deserialize)]
struct RawBranchType {
    kind: String,
    prefix: String,
}

/// A Bitbucket API client for one run.
pub struct Client {
    http: reqwest::Client,
    api: Url,
    token: SecretToken,
    limits: Limits,
    pace: Mutex<Pace>,
}

/// Spacing of requests while Bitbucket says the limit is near.
#[derive(Default)]
struct Pace {
    /// Time between two requests, when near the limit.
    interval: Option<Duration>,
    /// When the last request was sent.
    last: Option<Instant>,
}

/// What a run read.
pub struct Fetched {
    /// The inventory.
    pub inventory: WorkspaceInventory,
    /// Repositories whose environments were read.
    pub read: usize,
    /// Repositories whose environments were reused from the state.
    pub reused: usize,
    /// What reading protections did, when they were read.
    pub protections: Option<ProtectionsRead>,
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
            pace: Mutex::new(Pace::default()),
        })
    }

    /// Reads the whole inventory of `workspace` (its slug), reusing the
    /// environments `state` holds for repositories whose `updated_on` is
    /// unchanged; `state` is updated as environments are read (and pruned to the
    /// listed repositories), and handed to `checkpoint` every
    /// [`Limits::checkpoint_every`] repositories read.
    ///
    /// # Errors
    /// [`FetchError`]; `state` then holds what was read so far.
    pub async fn inventory(
        &self,
        workspace: &str,
        state: &mut State,
        checkpoint: &mut dyn FnMut(&State),
    ) -> Result<Fetched, FetchError> {
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
        let url = self.url(&["repositories", workspace])?;
        let mut listed = Vec::new();
        for r in self.list::<RawRepository>(url.clone(), true).await? {
            listed.push((uuid(&url, &r.uuid)?, r));
        }
        state.retain(&listed.iter().map(|(u, _)| *u).collect());
        let (mut read, mut reused) = (0, 0);
        let mut repositories = Vec::new();
        for (repo_uuid, r) in listed {
            let environments = match state.reusable(&repo_uuid, r.updated_on.as_deref()) {
                Some(envs) => {
                    reused += 1;
                    envs.to_vec()
                }
                None => {
                    let envs = self.environments(workspace, &repo_uuid).await?;
                    if let Some(updated_on) = &r.updated_on {
                        let entry = Entry {
                            updated_on: updated_on.clone(),
                            environments: envs.clone(),
                        };
                        state.repositories.insert(repo_uuid, entry);
                    }
                    read += 1;
                    if read % self.limits.checkpoint_every.max(1) == 0 {
                        checkpoint(state);
                    }
                    envs
                }
            };
            repositories.push(repository(&url, repo_uuid, r, environments)?);
        }
        let mut inventory = WorkspaceInventory {
            workspace: workspace.to_string(),
            workspace_uuid,
            repositories,
        };
        inventory.normalise();
        // What the loader would refuse is never written.
        super::Inventory::new(vec![inventory.clone()]).map_err(|reason| FetchError::Malformed {
            url: self.api.to_string(),
            reason,
        })?;
        Ok(Fetched {
            inventory,
            read,
            reused,
            protections: None,
        })
    }

    /// The deployment environments of one repository.
    async fn environments(
        &self,
        workspace: &str,
        repo: &BbUuid,
    ) -> Result<Vec<Environment>, FetchError> {
        let env_url = self.url(&["repositories", workspace, &repo.braced(), "environments"])?;
        let mut environments = Vec::new();
        for e in self.list::<RawEnvironment>(env_url.clone(), false).await? {
            environments.push(Environment {
                uuid: uuid(&env_url, &e.uuid)?,
                name: e.name,
                restrictions: None,
            });
        }
        Ok(environments)
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

    /// Every value of a paginated list, following `next` while it continues the same list.
    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        mut url: Url,
        pagelen: bool,
    ) -> Result<Vec<T>, FetchError> {
        if pagelen {
            url.query_pairs_mut().append_pair("pagelen", "100");
        }
        let first = url.to_string();
        let list = url.clone();
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
            // The link is not printed: it came from outside and may carry anything.
            check_followed(&next, &list, PathRule::Same).map_err(|why| FetchError::Malformed {
                url: url.to_string(),
                reason: format!(
                    "its `next` link does not continue the same list ({why}); not followed"
                ),
            })?;
            url = next;
        }
        Err(FetchError::TooManyPages {
            url: first,
            max: self.limits.max_pages,
        })
    }

    /// GET with the token, spaced while near the rate limit, retrying 429 and
    /// transient statuses after their `Retry-After` (or 2^n seconds), bounded.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &Url) -> Result<T, FetchError> {
        let mut attempt = 0;
        loop {
            self.wait_for_pace().await;
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
            self.note_rate_limit(resp.headers());
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
                // The error body (bounded) tells a missing scope from a
                // repository the token's user may not administer.
                let body = read_capped(resp, 16 * 1024).await.unwrap_or_default();
                let missing_scope = String::from_utf8_lossy(&body)
                    .to_ascii_lowercase()
                    .contains("scope");
                return Err(FetchError::Unauthorized {
                    url: url.to_string(),
                    status,
                    missing_scope,
                });
            }
            if status_meaning(status) != Meaning::Transient || attempt >= self.limits.max_retries {
                return Err(FetchError::Status {
                    url: url.to_string(),
                    status,
                });
            }
            let max = self.limits.max_wait;
            let wait = match retry_after(resp.headers()) {
                Some(w) if w > max => {
                    return Err(FetchError::RateLimited {
                        url: url.to_string(),
                        wait_secs: w.as_secs(),
                        max_secs: max.as_secs_f64(),
                    })
                }
                Some(w) => w,
                None => Duration::from_secs(1 << attempt.min(12)).min(max),
            };
            tracing::info!(url = %url, status, wait_ms = wait.as_millis(), "Bitbucket asked to slow down; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Sleeps until the next request may be sent, when near the limit.
    async fn wait_for_pace(&self) {
        let until = {
            let Ok(mut p) = self.pace.lock() else { return };
            let now = Instant::now();
            let until = match (p.interval, p.last) {
                (Some(i), Some(last)) => (last + i).max(now),
                _ => now,
            };
            p.last = Some(until);
            until
        };
        tokio::time::sleep_until(until).await;
    }

    /// Reads Bitbucket's `X-RateLimit-NearLimit` and `X-RateLimit-Limit`.
    fn note_rate_limit(&self, headers: &reqwest::header::HeaderMap) {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let near = text("x-ratelimit-nearlimit").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let interval = near.then(|| {
            let per_hour = text("x-ratelimit-limit")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(1_000);
            (Duration::from_secs(3600) / u32::try_from(per_hour).unwrap_or(u32::MAX))
                .min(self.limits.max_wait)
        });
        if let Ok(mut p) = self.pace.lock() {
            if interval.is_some() && p.interval.is_none() {
                tracing::info!(
                    resource = text("x-ratelimit-resource").unwrap_or_default(),
                    "near Bitbucket's rate limit; spacing requests"
                );
            }
            p.interval = interval;
        }
    }
}

/// `Retry-After` (delay-seconds or an HTTP date), unbounded.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// One repository of the list, with its environments.
fn repository(
    url: &Url,
    uuid_: BbUuid,
    r: RawRepository,
    environments: Vec<Environment>,
) -> Result<Repository, FetchError> {
    let project = match r.project {
        None => None,
        Some(p) => Some(Project {
            uuid: uuid(url, &p.uuid)?,
            key: p.key,
        }),
    };
    Ok(Repository {
        uuid: uuid_,
        full_name: r.full_name,
        project,
        environments,
        protections: None,
    })
}

/// For the fuzz target: one page of the repository list read as `get_json`
/// reads it, its values turned into inventory entries as `inventory` does.
#[cfg(fuzzing)]
pub(crate) fn repositories_page(
    body: &[u8],
    url: &Url,
) -> Result<(Vec<Repository>, Option<String>), FetchError> {
    let page: Page<RawRepository> =
        serde_json::from_slice(body).map_err(|e| FetchError::Malformed {
            url: url.to_string(),
            reason: format!("not the documented JSON: {e}"),
        })?;
    let mut out = Vec::new();
    for r in page.values.into_iter().take(MAX_PAGE_VALUES) {
        let u = uuid(url, &r.uuid)?;
        out.push(repository(url, u, r, Vec::new())?);
    }
    Ok((out, page.next))
}

fn uuid(url: &Url, v: &str) -> Result<BbUuid, FetchError> {
    BbUuid::parse_lenient(v).map_err(|e| FetchError::Malformed {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn near_the_limit_requests_are_spaced_by_the_hour_over_the_limit_bounded() {
        let limits = Limits {
            max_wait: Duration::from_secs(2),
            ..Limits::default()
        };
        let c = Client::new(
            "http://127.0.0.1:1/2.0",
            SecretToken::new("t".to_string()),
            limits,
        )
        .unwrap();
        let interval = |c: &Client| c.pace.lock().unwrap().interval;
        c.note_rate_limit(&headers(&[("x-ratelimit-limit", "3600")]));
        assert_eq!(interval(&c), None, "not near the limit: not spaced");
        c.note_rate_limit(&headers(&[
            ("x-ratelimit-limit", "3600"),
            ("x-ratelimit-nearlimit", "true"),
        ]));
        assert_eq!(interval(&c), Some(Duration::from_secs(1)));
        // 1,000 an hour (also the default without a limit): 3.6 s, cut to max_wait.
        c.note_rate_limit(&headers(&[("x-ratelimit-nearlimit", "true")]));
        assert_eq!(interval(&c), Some(Duration::from_secs(2)));
        c.note_rate_limit(&headers(&[("x-ratelimit-nearlimit", "false")]));
        assert_eq!(interval(&c), None);
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_an_http_date_unbounded() {
        let h = |v: &str| headers(&[("retry-after", v)]);
        assert_eq!(retry_after(&h("0")), Some(Duration::ZERO));
        assert_eq!(retry_after(&h("3600")), Some(Duration::from_secs(3600)));
        assert_eq!(
            retry_after(&h("99999999999999999999")),
            Some(Duration::from_secs(u64::MAX))
        );
        let later = std::time::SystemTime::now() + Duration::from_secs(7200);
        let w = retry_after(&h(&httpdate::fmt_http_date(later))).unwrap();
        assert!(
            w > Duration::from_secs(7000) && w <= Duration::from_secs(7200),
            "{w:?}"
        );
        assert_eq!(
            retry_after(&h("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&h("soon")), None);
    }
}
