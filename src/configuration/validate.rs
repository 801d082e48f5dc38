//! Validation, one function per section of the file. Every function records each
//! problem it finds in [`Problems`] and goes on, so `config check` can print all of
//! them at once; a section with an error yields `None`.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::raw::{
    RawClient, RawIdentity, RawJwks, RawKeycloak, RawLimits, RawSettings, RawWorkspace,
};
use super::secrets::{load_keys, load_signing_keys, read_secret};
use super::LimitStore;
use super::{
    resolve, ClientAuth, ConfigError, JwksSettings, KeycloakSettings, Limits, Secrets, Settings,
    WorkspaceSettings, ARI_WORKSPACE_PREFIX, BITBUCKET_API_HOST,
};
use crate::domain::deceptive;
use crate::domain::BbUuid;
use crate::http::{check_upstream_url, is_loopback_host};
use crate::keycloak::{GrantMode, IdentitySettings};

/// Signature algorithms a workspace may be configured with (RFC 7518 §3.1 names).
/// Bitbucket advertises RS256 only; the others exist for tests and future issuers.
const TOKEN_ALGORITHMS: [jsonwebtoken::Algorithm; 5] = [
    jsonwebtoken::Algorithm::RS256,
    jsonwebtoken::Algorithm::RS384,
    jsonwebtoken::Algorithm::RS512,
    jsonwebtoken::Algorithm::PS256,
    jsonwebtoken::Algorithm::ES256,
];

/// Bitbucket's limit on one custom OIDC audience, in characters (Atlassian,
/// "Bitbucket Pipelines OIDC now supports multiple audiences").
pub const MAX_AUDIENCE_CHARS: usize = 150;
/// Bitbucket's limit on the custom audiences of one step (same source).
pub const MAX_STEP_AUDIENCES: usize = 10;

/// Problems found so far: errors refuse the configuration, warnings are printed by
/// `config check` and logged at startup.
pub(super) struct Problems {
    pub file: String,
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigError>,
}

impl Problems {
    pub fn new(file: &str) -> Self {
        Self {
            file: file.to_string(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn entry(&self, key: &str, reason: String) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            key: key.to_string(),
            reason,
        }
    }

    pub fn error(&mut self, key: &str, reason: impl Into<String>) {
        let e = self.entry(key, reason.into());
        self.errors.push(e);
    }

    pub fn warn(&mut self, key: &str, reason: impl Into<String>) {
        let e = self.entry(key, reason.into());
        self.warnings.push(e);
    }

    /// `Some(v)` when `r` is Ok, else records the error under `key`.
    fn take<T>(&mut self, key: &str, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(reason) => {
                self.error(key, reason);
                None
            }
        }
    }
}

/// A number within `range`, or an error naming `key`.
fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    p: &mut Problems,
    key: &str,
    v: T,
    range: std::ops::RangeInclusive<T>,
) -> Option<T> {
    if range.contains(&v) {
        Some(v)
    } else {
        p.error(
            key,
            format!("must be {}..={} (is {v})", range.start(), range.end()),
        );
        None
    }
}

/// Validates the whole raw form; `None` when any error was recorded.
pub(super) fn settings(
    raw: RawSettings,
    base: &Path,
    secrets: Secrets,
    p: &mut Problems,
) -> Option<Settings> {
    if raw.listen.parse::<std::net::SocketAddr>().is_err() {
        p.error(
            "listen",
            format!(
                "`{}` is not an address:port such as 127.0.0.1:8080",
                raw.listen
            ),
        );
    }
    use super::raw::bounds;
    let leeway = in_range(
        p,
        "clock_leeway_seconds",
        raw.clock_leeway_seconds,
        bounds::CLOCK_LEEWAY_SECONDS,
    );
    let max_token_bytes = in_range(
        p,
        "max_token_bytes",
        raw.max_token_bytes,
        bounds::MAX_TOKEN_BYTES,
    );
    let max_lifetime = in_range(
        p,
        "max_subject_token_lifetime_seconds",
        raw.max_subject_token_lifetime_seconds,
        bounds::MAX_SUBJECT_TOKEN_LIFETIME_SECONDS,
    );
    let body_timeout_ms = in_range(
        p,
        "body_timeout_ms",
        raw.body_timeout_ms,
        bounds::BODY_TIMEOUT_MS,
    );
    let audit_reopen_ms = in_range(
        p,
        "audit.reopen_interval_ms",
        raw.audit.reopen_interval_ms,
        10..=60_000,
    );
    let workspaces = workspaces(raw.workspaces, p);
    let jwks = jwks(&raw.jwks, p);
    let keycloak_timeout = raw.keycloak.timeout_seconds;
    let (keycloak, needs_signing) = keycloak(raw.keycloak, base, secrets, p);
    let signing = match (secrets, &raw.signing) {
        (_, None) if !needs_signing => None,
        (Secrets::Skip | Secrets::ClientSecrets, Some(_)) => None,
        (_, None) => {
            p.error(
                "signing",
                "a client uses private_key_jwt, so [signing] key_files or key_env is required",
            );
            None
        }
        (Secrets::Read, Some(s)) => match load_signing_keys(s, base) {
            Ok(k) => Some(k),
            Err(errors) => {
                for (key, reason) in errors {
                    p.error(&key, reason);
                }
                None
            }
        },
    };
    let limits = limits(&raw.limits, p);
    let policy_settle = in_range(p, "policies.settle_ms", raw.policies.settle_ms, 1..=10_000);
    let policy_poll = match raw.policies.poll_ms {
        0 => Some(None),
        ms => in_range(p, "policies.poll_ms", ms, 10..=3_600_000)
            .map(|ms| Some(Duration::from_millis(ms))),
    };
    let limit_store = limit_store(&raw.limits, base, secrets, p);
    let protections = protections(&raw.protections, keycloak.as_ref(), p);
    if raw.audit.fsync && raw.audit.path.is_none() {
        p.warn(
            "audit.fsync",
            "has no effect without audit.path: standard output is not synced",
        );
    }
    let public_url = raw
        .public_url
        .as_deref()
        .and_then(|u| p.take("public_url", public_url(u)));
    let signing_algorithm = raw
        .signing
        .as_ref()
        .map(|s| s.algorithm)
        .unwrap_or_default();
    let mut keycloak = keycloak;
    let jwt_clients: Vec<String> = keycloak
        .as_ref()
        .map(|k| {
            k.grant_modes
                .iter()
                .filter(|(_, m)| **m == GrantMode::JwtAuthorizationGrant)
                .map(|(c, _)| c.clone())
                .collect()
        })
        .unwrap_or_default();
    let identity = identity(
        raw.identity.as_ref(),
        public_url.as_ref(),
        &jwt_clients,
        signing.as_ref(),
        base,
        secrets,
        p,
    );
    if let Some(k) = keycloak.as_mut() {
        k.identity = identity;
    }
    grace(
        raw.shutdown_grace_seconds,
        keycloak_timeout.saturating_add(raw.jwks.timeout_seconds),
        p,
    );
    if !p.errors.is_empty() {
        return None;
    }
    Some(Settings {
        admin_listen: raw.admin_listen,
        listen: raw.listen,
        policies_dir: resolve(base, &raw.policies_dir),
        clock_leeway: Duration::from_secs(leeway?),
        max_token_bytes: max_token_bytes?,
        max_subject_token_lifetime: Duration::from_secs(max_lifetime?),
        body_timeout: Duration::from_millis(body_timeout_ms?),
        workspaces: workspaces?,
        jwks: jwks?,
        keycloak: keycloak?,
        signing,
        audit_queue_capacity: raw.audit.queue_capacity.clamp(1, 1_000_000),
        audit_fsync: raw.audit.fsync,
        audit_reopen_interval: Duration::from_millis(audit_reopen_ms?),
        audit_path: raw.audit.path.map(|a| resolve(base, &a)),
        limits: limits?,
        limit_store: limit_store?,
        shutdown_grace: Duration::from_secs(raw.shutdown_grace_seconds.min(3600)),
        watch_policies: raw.watch_policies,
        policy_poll: policy_poll?,
        policy_settle: Duration::from_millis(policy_settle?),
        public_url,
        signing_algorithm,
        protections: std::sync::Arc::new(protections?),
    })
}

/// `[protections]`: the maximum age (1 h to a year) and the configured
/// requirements, each client one of `[keycloak.clients]`.
fn protections(
    raw: &super::raw::RawProtections,
    keycloak: Option<&KeycloakSettings>,
    p: &mut Problems,
) -> Option<crate::policy::require::Rules> {
    let hours = in_range(
        p,
        "protections.max_age_hours",
        raw.max_age_hours,
        super::raw::bounds::MAX_AGE_HOURS,
    );
    let mut rules = crate::policy::require::Rules::default();
    let mut ok = true;
    let compile =
        |kind: &str, name: &str, r: &crate::policy::require::RawRequirement, p: &mut Problems| {
            let key = format!("protections.require.{kind}.{name}");
            match r.compile() {
                Ok(req) => Some(req),
                Err(e) => {
                    p.error(&key, e);
                    None
                }
            }
        };
    for (client, r) in &raw.require.clients {
        if keycloak.is_some_and(|k| !k.clients.contains_key(client)) {
            p.error(
                &format!("protections.require.clients.{client}"),
                "not a client of [keycloak.clients]",
            );
            ok = false;
        }
        match compile("clients", client, r, p) {
            Some(req) => {
                rules.clients.insert(client.clone(), req);
            }
            None => ok = false,
        }
    }
    for (audience, r) in &raw.require.audiences {
        match compile("audiences", audience, r, p) {
            Some(req) => {
                rules.audiences.insert(audience.clone(), req);
            }
            None => ok = false,
        }
    }
    rules.max_age = std::time::Duration::from_secs(hours? * 3600);
    ok.then_some(rules)
}

/// `public_url`: where Keycloak and callers reach the service (https, or http on
/// loopback), without path, query or credentials.
fn public_url(s: &str) -> Result<url::Url, String> {
    let url = crate::http::check_upstream_url(s)?;
    if url.path() != "/" {
        return Err(format!(
            "`{s}` must be the service's base URL without a path (the JWKS is served at /.well-known/jwks.json)"
        ));
    }
    Ok(url)
}

/// On SIGTERM an exchange gets the grace period to finish; shorter than its
/// upstream timeouts (`needed`, seconds), a token could be minted and never
/// answered nor audited.
fn grace(grace: u64, needed: u64, p: &mut Problems) {
    if grace < needed {
        p.error(
            "shutdown_grace_seconds",
            format!(
                "must be at least keycloak.timeout_seconds + jwks.timeout_seconds ({needed} s), \
                 so that an exchange in flight at SIGTERM can finish"
            ),
        );
    }
}

/// `[limits] store` and `[limits.redis]`: the Redis URL from exactly one of
/// `url_file` / `url_env` (read only when secrets are read; never echoed),
/// `redis://` or `rediss://`; a plain `redis://` to a host other than loopback
/// is a warning (credentials and counts in clear).
fn limit_store(
    raw: &RawLimits,
    base: &Path,
    secrets: Secrets,
    p: &mut Problems,
) -> Option<LimitStore> {
    match (raw.store.as_str(), &raw.redis) {
        ("memory", None) => Some(LimitStore::Memory),
        ("memory", Some(_)) => {
            p.error(
                "limits.redis",
                "set `store = \"redis\"` to use it, or remove it",
            );
            None
        }
        ("redis", None) => {
            p.error(
                "limits.redis",
                "`store = \"redis\"` needs a [limits.redis] table with url_file or url_env",
            );
            None
        }
        ("redis", Some(r)) => {
            if !(1..=10_000).contains(&r.timeout_ms) {
                p.error("limits.redis.timeout_ms", "must be 1..=10000");
            }
            if !(1..=60_000).contains(&r.reconnect_max_ms) {
                p.error("limits.redis.reconnect_max_ms", "must be 1..=60000");
            } else if !(1..=r.reconnect_max_ms).contains(&r.reconnect_min_ms) {
                p.error(
                    "limits.redis.reconnect_min_ms",
                    "must be 1..=reconnect_max_ms",
                );
            }
            if r.key_prefix.is_empty() || r.key_prefix.contains(['{', '}', ' ']) {
                p.error(
                    "limits.redis.key_prefix",
                    "non-empty, without braces or spaces",
                );
            }
            let url = match secrets {
                Secrets::Read => {
                    match read_secret(r.url_file.as_deref(), r.url_env.as_deref(), base) {
                        Ok(u) => secrecy::ExposeSecret::expose_secret(&u).to_string(),
                        Err(e) => {
                            p.error(
                                "limits.redis",
                                e.replace("secret_file", "url_file")
                                    .replace("secret_env", "url_env")
                                    .replace("client secret", "Redis URL"),
                            );
                            return None;
                        }
                    }
                }
                Secrets::Skip | Secrets::ClientSecrets => {
                    if r.url_file.is_some() == r.url_env.is_some() {
                        p.error("limits.redis", "set exactly one of url_file or url_env");
                    }
                    String::new()
                }
            };
            if !url.is_empty() {
                match crate::limits::check_url(&url) {
                    Ok(crate::limits::UrlKind::Protected) => {}
                    Ok(crate::limits::UrlKind::ClearTextRemote) => p.warn(
                        "limits.redis",
                        "a plain redis:// URL to a host other than loopback: the password and the \
                         counts travel in clear; use rediss://",
                    ),
                    Err(e) => {
                        p.error("limits.redis", e);
                        return None;
                    }
                }
            }
            Some(LimitStore::Redis(crate::limits::RedisSettings {
                url: crate::domain::SecretToken::new(url),
                url_file: r.url_file.as_deref().map(|f| resolve(base, f)),
                timeout: Duration::from_millis(r.timeout_ms),
                reconnect_min: Duration::from_millis(r.reconnect_min_ms),
                reconnect_max: Duration::from_millis(r.reconnect_max_ms),
                on_store_error: r.on_store_error,
                key_prefix: r.key_prefix.clone(),
            }))
        }
        (other, _) => {
            p.error(
                "limits.store",
                format!("`{other}`: use \"memory\" or \"redis\""),
            );
            None
        }
    }
}

fn limits(raw: &RawLimits, p: &mut Problems) -> Option<Limits> {
    let per_step = std::num::NonZeroU32::new(raw.per_step_per_minute);
    if per_step.is_none() {
        p.error("limits.per_step_per_minute", "must be at least 1");
    }
    let per_repo = std::num::NonZeroU32::new(raw.per_repository_per_minute);
    if per_repo.is_none() {
        p.error("limits.per_repository_per_minute", "must be at least 1");
    }
    let grants = std::num::NonZeroU32::new(raw.grants_per_step_per_minute);
    if grants.is_none() {
        p.error("limits.grants_per_step_per_minute", "must be at least 1");
    }
    Some(Limits {
        per_step_per_minute: per_step?,
        per_repository_per_minute: per_repo?,
        grants_per_step_per_minute: grants?,
    })
}

fn workspaces(raw: Vec<RawWorkspace>, p: &mut Problems) -> Option<Vec<WorkspaceSettings>> {
    if raw.is_empty() {
        p.error("workspaces", "at least one trusted workspace is required");
        return None;
    }
    let mut out: Vec<WorkspaceSettings> = Vec::new();
    let mut ok = true;
    for (i, w) in raw.into_iter().enumerate() {
        let Some(ws) = workspace(i, w, p) else {
            ok = false;
            continue;
        };
        if out.iter().any(|o| o.issuer == ws.issuer) {
            p.error(
                &format!("workspaces[{i}].issuer"),
                format!("issuer `{}` is configured twice", ws.issuer),
            );
            ok = false;
        }
        if out.iter().any(|o| o.uuid == ws.uuid) {
            p.error(
                &format!("workspaces[{i}].uuid"),
                format!("workspace {} is configured twice", ws.uuid),
            );
            ok = false;
        }
        out.push(ws);
    }
    ok.then_some(out)
}

/// True for a string that reads as a UUID, braced or not, percent-encoded braces
/// included (`{…}`, `%7B…%7D`, bare).
fn looks_like_uuid(s: &str) -> bool {
    let inner = s
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .or_else(|| {
            s.get(..3)
                .filter(|p| p.eq_ignore_ascii_case("%7b"))
                .and_then(|_| s.get(3..s.len().saturating_sub(3)))
        })
        .unwrap_or(s);
    BbUuid::parse_lenient(inner).is_ok()
        || (inner.len() == 32 && inner.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Workspace ID ("slug") as Bitbucket allows it: lowercase letters, digits, `-`
/// and `_` (Atlassian, "Fix workspace creation errors in Bitbucket Cloud").
fn slug(key: &str, s: &str) -> Result<(), String> {
    if looks_like_uuid(s) {
        return Err(format!(
            "`{s}` is a UUID; the slug is the workspace ID from the workspace's URL \
             (bitbucket.org/<slug>/), and the UUID goes in `uuid`"
        ));
    }
    let ok = !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a Bitbucket workspace ID ({key}: lowercase letters, digits, - and _)"
        ))
    }
}

/// The issuer Bitbucket uses for workspace `slug` (one issuer per workspace).
pub(super) fn bitbucket_issuer(slug: &str) -> String {
    format!("https://{BITBUCKET_API_HOST}/2.0/workspaces/{slug}/pipelines-config/identity/oidc")
}

/// Checks an explicit issuer against Bitbucket's format
/// `https://api.bitbucket.org/2.0/workspaces/<slug>/pipelines-config/identity/oidc`
/// (exact string, no trailing slash). Only loopback issuers (local test issuers)
/// may differ, and then a warning is recorded.
fn issuer(key: &str, s: &str, ws_slug: &str, p: &mut Problems) -> Option<String> {
    if s.ends_with('/') {
        p.error(
            key,
            format!("`{s}` ends with `/`; Bitbucket issuers have no trailing slash and `iss` is compared exactly"),
        );
        return None;
    }
    let url = p.take(key, check_upstream_url(s))?;
    let segments: Vec<&str> = url
        .path_segments()
        .map(Iterator::collect)
        .unwrap_or_default();
    let segment = match segments.as_slice() {
        ["2.0", "workspaces", seg, "pipelines-config", "identity", "oidc"] => Some(*seg),
        _ => None,
    };
    let loopback = url.host().is_some_and(|h| is_loopback_host(&h));
    let problem = match segment {
        None => Some(format!(
            "`{s}` is not a Bitbucket issuer: Bitbucket's is `{}`",
            bitbucket_issuer(ws_slug)
        )),
        Some(seg) if looks_like_uuid(seg) => Some(format!(
            "`{s}` has the workspace UUID where Bitbucket puts the workspace slug: tokens carry \
             `iss` = `{}`, so every token would be refused as token.untrusted_issuer",
            bitbucket_issuer(ws_slug)
        )),
        Some(seg) if seg != ws_slug => Some(format!(
            "`{s}` names workspace `{seg}`, but this workspace's slug is `{ws_slug}`"
        )),
        Some(_) if url.as_str() != s => Some(format!(
            "`{s}` is not in normal form; `iss` is compared exactly and the issuer writes `{}`",
            url.as_str()
        )),
        Some(_) => None,
    };
    let bitbucket_host = url.host_str() == Some(BITBUCKET_API_HOST) && url.scheme() == "https";
    match (problem, loopback) {
        (Some(reason), false) => {
            p.error(key, reason);
            None
        }
        (Some(reason), true) => {
            p.warn(
                key,
                format!("{reason} (accepted only because the issuer is on loopback, for tests)"),
            );
            Some(s.to_string())
        }
        (None, false) if !bitbucket_host => {
            p.error(
                key,
                format!(
                    "`{s}` is not on {BITBUCKET_API_HOST}: real Bitbucket tokens carry `iss` = `{}`",
                    bitbucket_issuer(ws_slug)
                ),
            );
            None
        }
        (None, _) => Some(s.to_string()),
    }
}

/// Validates one configured audience. Bitbucket custom audiences are at most
/// [`MAX_AUDIENCE_CHARS`] characters; an `ari:cloud:bitbucket::workspace/` audience
/// must carry this workspace's UUID, lower case, without braces (tokens never
/// have braces there).
pub(super) fn audience(a: &str, ws: &BbUuid) -> Result<(), String> {
    if a.is_empty() || a.chars().count() > MAX_AUDIENCE_CHARS {
        return Err(format!(
            "audiences are 1 to {MAX_AUDIENCE_CHARS} characters (Bitbucket's limit)"
        ));
    }
    if a.trim() != a || a.chars().any(deceptive) {
        return Err(format!(
            "`{}` has surrounding white space, or control, invisible or bidi characters; `aud` is compared exactly",
            a.escape_debug()
        ));
    }
    if a.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("ari:")) && !a.starts_with("ari:") {
        return Err(format!(
            "`{a}`: Bitbucket's ARI audiences are lower case (`{ARI_WORKSPACE_PREFIX}…`)"
        ));
    }
    if let Some(rest) = a.strip_prefix(ARI_WORKSPACE_PREFIX) {
        if rest.starts_with('{') || rest.ends_with('}') {
            return Err(format!(
                "`{a}`: the ARI audience has no braces; Bitbucket sends `{ARI_WORKSPACE_PREFIX}{}`",
                ws.bare()
            ));
        }
        match BbUuid::parse_lenient(rest) {
            Err(_) => {
                return Err(format!(
                "`{a}`: the ARI audience carries the workspace UUID, not a slug: `{ARI_WORKSPACE_PREFIX}{}`",
                ws.bare()
            ))
            }
            Ok(u) if u != *ws || rest != ws.bare() => {
                return Err(format!(
                    "`{a}` does not name this workspace; expected `{ARI_WORKSPACE_PREFIX}{}`",
                    ws.bare()
                ))
            }
            Ok(_) => {}
        }
    } else if a.starts_with("ari:") {
        return Err(format!("`{a}` is not a Bitbucket workspace ARI"));
    }
    Ok(())
}

fn workspace(i: usize, w: RawWorkspace, p: &mut Problems) -> Option<WorkspaceSettings> {
    let k = |f: &str| format!("workspaces[{i}].{f}");
    let errors_before = p.errors.len();
    p.take(&k("slug"), slug("slug", &w.slug));
    let uuid = p.take(&k("uuid"), workspace_uuid(&w.uuid));
    let issuer = match &w.issuer {
        None => Some(bitbucket_issuer(&w.slug)),
        Some(s) => issuer(&k("issuer"), s, &w.slug, p),
    };
    let audiences = uuid
        .as_ref()
        .map(|u| workspace_audiences(&k, &w, u, p))
        .unwrap_or_default();
    if uuid.is_some() && audiences.is_empty() && p.errors.len() == errors_before {
        p.error(
            &k("audiences"),
            "no audience accepted: add this service's own audience (the step's `oidc: audiences:`); \
             accept_default_audience = true also accepts tokens meant for any other service of the workspace",
        );
    }
    let on_bitbucket = issuer
        .as_deref()
        .is_some_and(|i| i.starts_with(&format!("https://{BITBUCKET_API_HOST}/")));
    let algorithm = p.take(&k("algorithm"), token_algorithm(&w.algorithm, on_bitbucket));
    if p.errors.len() != errors_before {
        return None;
    }
    Some(WorkspaceSettings {
        slug: w.slug,
        uuid: uuid?,
        issuer: issuer?,
        audiences,
        algorithm: algorithm?,
    })
}

/// The workspace UUID, braces optional; never the nil UUID.
fn workspace_uuid(s: &str) -> Result<BbUuid, String> {
    let u = BbUuid::parse_lenient(s).map_err(|e| e.to_string())?;
    if u.bare() == "00000000-0000-0000-0000-000000000000" {
        return Err("the nil UUID is no workspace's UUID".into());
    }
    Ok(u)
}

/// The accepted audiences: Bitbucket's default ARI audience when opted in, then
/// each configured one (checked by [`audience`]); warns about an ARI audience
/// listed without the opt-in and about more than a step can carry.
fn workspace_audiences(
    k: &dyn Fn(&str) -> String,
    w: &RawWorkspace,
    uuid: &BbUuid,
    p: &mut Problems,
) -> Vec<String> {
    let mut audiences = Vec::new();
    if w.accept_default_audience {
        audiences.push(format!("{ARI_WORKSPACE_PREFIX}{}", uuid.bare()));
    }
    for (j, a) in w.audiences.iter().enumerate() {
        let key = k(&format!("audiences[{j}]"));
        if p.take(&key, audience(a, uuid)).is_none() || audiences.contains(a) {
            continue;
        }
        if a.starts_with(ARI_WORKSPACE_PREFIX) && !w.accept_default_audience {
            p.warn(
                &key,
                "this is Bitbucket's default workspace audience, on every step token of \
                 the workspace: listing it accepts tokens meant for any other service, \
                 as accept_default_audience = true does (set that instead, to say so)",
            );
        }
        audiences.push(a.clone());
    }
    if w.audiences.len() > MAX_STEP_AUDIENCES {
        p.warn(
            &k("audiences"),
            format!(
                "{} audiences listed; one Bitbucket step carries at most {MAX_STEP_AUDIENCES}",
                w.audiences.len()
            ),
        );
    }
    audiences
}

/// The workspace's token algorithm: one of [`TOKEN_ALGORITHMS`], and RS256 for
/// Bitbucket's own issuer (its discovery document lists only RS256 in
/// `id_token_signing_alg_values_supported`).
fn token_algorithm(name: &str, on_bitbucket: bool) -> Result<jsonwebtoken::Algorithm, String> {
    match jsonwebtoken::Algorithm::from_str(name) {
        Ok(a) if on_bitbucket && a != jsonwebtoken::Algorithm::RS256 => Err(format!(
            "`{name}`: Bitbucket signs with RS256 only (its discovery document's \
             id_token_signing_alg_values_supported), so every token would be refused"
        )),
        Ok(a) if TOKEN_ALGORITHMS.contains(&a) => Ok(a),
        _ => Err(format!(
            "`{name}` is not allowed (RS256, RS384, RS512, PS256, ES256)"
        )),
    }
}

fn jwks(j: &RawJwks, p: &mut Problems) -> Option<JwksSettings> {
    let timeout = in_range(p, "jwks.timeout_seconds", j.timeout_seconds, 1..=60);
    let ttl = in_range(p, "jwks.cache_ttl_seconds", j.cache_ttl_seconds, 1..=86_400);
    let refetch = in_range(
        p,
        "jwks.refetch_interval_seconds",
        j.refetch_interval_seconds,
        1..=60,
    );
    let max_body = in_range(
        p,
        "jwks.max_body_bytes",
        j.max_body_bytes,
        1024..=8 * 1024 * 1024,
    );
    Some(JwksSettings {
        cache_ttl: Duration::from_secs(ttl?),
        refetch_interval: Duration::from_secs(refetch?),
        timeout: Duration::from_secs(timeout?),
        max_body_bytes: max_body?,
    })
}

/// `[keycloak.clients.<clientId>]`: how we authenticate as each client; also
/// says whether any client needs signing keys. Secrets are read unless `Skip`.
fn clients(
    raw: BTreeMap<String, RawClient>,
    base: &Path,
    secrets: Secrets,
    p: &mut Problems,
) -> (
    BTreeMap<String, ClientAuth>,
    bool,
    BTreeMap<String, GrantMode>,
) {
    let mut clients = BTreeMap::new();
    let mut modes = BTreeMap::new();
    let mut needs_signing = false;
    for (id, c) in raw {
        let key = format!("keycloak.clients.{id}");
        let auth = match c {
            RawClient::PrivateKeyJwt { grant } => {
                needs_signing = true;
                modes.insert(id.clone(), grant);
                ClientAuth::PrivateKeyJwt
            }
            RawClient::ClientSecretBasic {
                secret_file,
                secret_env,
                grant,
            } => {
                modes.insert(id.clone(), grant);
                let secret = match secrets {
                    Secrets::Read | Secrets::ClientSecrets => {
                        match read_secret(secret_file.as_deref(), secret_env.as_deref(), base) {
                            Ok(s) => s,
                            Err(reason) => {
                                p.error(&key, reason);
                                continue;
                            }
                        }
                    }
                    Secrets::Skip => {
                        if secret_file.is_some() == secret_env.is_some() {
                            p.error(&key, "set exactly one of secret_file or secret_env");
                        }
                        SecretString::from(String::new())
                    }
                };
                ClientAuth::ClientSecretBasic(secret)
            }
        };
        clients.insert(id, auth);
    }
    if clients.is_empty()
        && !p
            .errors
            .iter()
            .any(|e| e.key.starts_with("keycloak.clients"))
    {
        p.error("keycloak.clients", "no Keycloak client configured");
    }
    (clients, needs_signing, modes)
}

/// `[identity]`: required when a client uses the JWT Authorization Grant, with
/// `public_url` as the issuer; its key must not be one of `[signing]`'s.
fn identity(
    raw: Option<&RawIdentity>,
    public_url: Option<&url::Url>,
    jwt_clients: &[String],
    signing: Option<&crate::signing::SigningKeys>,
    base: &Path,
    secrets: Secrets,
    p: &mut Problems,
) -> Option<IdentitySettings> {
    let Some(raw) = raw else {
        if let Some(c) = jwt_clients.first() {
            p.error(
                "identity",
                format!("client `{c}` uses grant = \"jwt_authorization_grant\": configure [identity] (its own key_files or key_env)"),
            );
        }
        return None;
    };
    if jwt_clients.is_empty() {
        p.warn(
            "identity",
            "no client uses grant = \"jwt_authorization_grant\"; [identity] is unused",
        );
    }
    let alias = &raw.identity_provider;
    let alias_ok = (1..=64).contains(&alias.len())
        && alias
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if !alias_ok {
        p.error(
            "identity.identity_provider",
            "1 to 64 lower-case letters, digits, `-`, `_`, `.` (a Keycloak identity provider alias)",
        );
    }
    let Some(url) = public_url else {
        p.error(
            "public_url",
            "[identity] needs public_url: it is the assertions' issuer and where Keycloak fetches the identity keys",
        );
        return None;
    };
    let signer: Option<std::sync::Arc<dyn crate::keycloak::IdentitySigner>> = match secrets {
        Secrets::Read => match load_keys(
            "identity",
            raw.algorithm,
            &raw.key_files,
            raw.key_env.as_deref(),
            base,
        ) {
            Ok(keys) => {
                let shared = signing.is_some_and(|s| {
                    keys.jwks().keys.iter().any(|k| {
                        s.jwks()
                            .keys
                            .iter()
                            .any(|o| o.common.key_id == k.common.key_id)
                    })
                });
                if shared {
                    p.error(
                        "identity.key_files",
                        "the identity key must not be a [signing] key: a client-assertion key must not mint repository identities",
                    );
                }
                Some(std::sync::Arc::new(crate::keycloak::LocalSigner(keys)))
            }
            Err(errors) => {
                for (key, reason) in errors {
                    p.error(&key, reason);
                }
                None
            }
        },
        Secrets::Skip | Secrets::ClientSecrets => None,
    };
    alias_ok.then(|| IdentitySettings {
        issuer: url.as_str().trim_end_matches('/').to_string(),
        provider_alias: alias.clone(),
        signer,
        algorithm: raw.algorithm,
    })
}

/// The Keycloak section; also says whether any client needs signing keys.
fn keycloak(
    kc: RawKeycloak,
    base: &Path,
    secrets: Secrets,
    p: &mut Problems,
) -> (Option<KeycloakSettings>, bool) {
    let base_url: Option<Url> = p.take("keycloak.base_url", check_upstream_url(&kc.base_url));
    let realm_ok = !kc.realm.is_empty()
        && kc
            .realm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !realm_ok {
        p.error(
            "keycloak.realm",
            format!(
                "`{}` is not a realm name (letters, digits, - _ .)",
                kc.realm
            ),
        );
    }
    let timeout = in_range(p, "keycloak.timeout_seconds", kc.timeout_seconds, 1..=120);
    let connect = in_range(
        p,
        "keycloak.connect_timeout_seconds",
        kc.connect_timeout_seconds,
        1..=kc.timeout_seconds.max(1),
    );
    if !(5..=60).contains(&kc.assertion_lifetime_seconds) {
        p.error(
            "keycloak.assertion_lifetime_seconds",
            "must be 5..=60 (Keycloak refuses assertions living longer than 60 s by default)",
        );
    }
    let max_response = in_range(
        p,
        "keycloak.max_response_bytes",
        kc.max_response_bytes,
        1024..=8 * 1024 * 1024,
    );
    let max_retry_after = in_range(
        p,
        "keycloak.max_retry_after_seconds",
        kc.max_retry_after_seconds,
        1..=3600,
    );
    let (clients, needs_signing, grant_modes) = clients(kc.clients, base, secrets, p);
    let settings = (|| {
        if !realm_ok || !(5..=60).contains(&kc.assertion_lifetime_seconds) || clients.is_empty() {
            return None;
        }
        Some(KeycloakSettings {
            base_url: base_url?,
            realm: kc.realm,
            connect_timeout: Duration::from_secs(connect?),
            timeout: Duration::from_secs(timeout?),
            max_response_bytes: max_response?,
            assertion_lifetime: Duration::from_secs(kc.assertion_lifetime_seconds),
            max_retry_after: Duration::from_secs(max_retry_after?),
            clients,
            grant_modes,
            identity: None,
        })
    })();
    (settings, needs_signing)
}
