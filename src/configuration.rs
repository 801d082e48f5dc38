//! Configuration: one TOML file (`serve --config FILE`) layered under environment
//! variables with the prefix [`ENV_PREFIX`] and `__` between nested keys, e.g.
//! `KEYCLOAK_CI_STS_KEYCLOAK__BASE_URL=http://127.0.0.1:8080`.
//!
//! The raw (serde) form rejects unknown keys; [`Settings::load`] then validates every
//! value and reads every secret, so the service refuses to start with a message that
//! names the file, the key and the reason. Relative paths are resolved against the
//! directory of the configuration file. Secrets (client secrets, private keys) are
//! accepted only as a file path or as the name of an environment variable.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use crate::domain::BbUuid;
use crate::keys::{SigningAlgorithm, SigningKey, SigningKeys};

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "KEYCLOAK_CI_STS";

/// Bitbucket's default audience prefix; the workspace UUID follows, without braces
/// (`shared/reference/bitbucket-oidc.md` §3).
pub const ARI_WORKSPACE_PREFIX: &str = "ari:cloud:bitbucket::workspace/";

/// A configuration problem, naming where it is: `FILE: `key`: reason`, or
/// `FILE: reason` when the problem is the whole file.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {}{reason}", if key.is_empty() { String::new() } else { format!("`{key}`: ") })]
pub struct ConfigError {
    /// The configuration file, or `environment variable NAME` when an override caused it.
    pub file: String,
    /// The dotted key path, e.g. `workspaces[0].uuid`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}

// ---------------------------------------------------------------- raw form

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_policies_dir")]
    policies_dir: PathBuf,
    #[serde(default = "default_leeway")]
    clock_leeway_seconds: u64,
    #[serde(default = "default_max_token_bytes")]
    max_token_bytes: usize,
    #[serde(default)]
    workspaces: Vec<RawWorkspace>,
    #[serde(default)]
    jwks: RawJwks,
    keycloak: RawKeycloak,
    signing: Option<RawSigning>,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default = "default_shutdown_grace")]
    shutdown_grace_seconds: u64,
    #[serde(default = "yes")]
    watch_policies: bool,
}

fn default_shutdown_grace() -> u64 {
    30
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    per_step_per_minute: u32,
    per_repository_per_minute: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            per_step_per_minute: 20,
            per_repository_per_minute: 300,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_policies_dir() -> PathBuf {
    PathBuf::from("policies")
}
fn default_leeway() -> u64 {
    60
}
fn default_max_token_bytes() -> usize {
    16 * 1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkspace {
    slug: String,
    uuid: String,
    issuer: Option<String>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    accept_default_audience: bool,
    #[serde(default = "default_token_alg")]
    algorithm: String,
}

fn yes() -> bool {
    true
}
fn default_token_alg() -> String {
    "RS256".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawJwks {
    cache_ttl_seconds: u64,
    refetch_interval_seconds: u64,
    timeout_seconds: u64,
    max_body_bytes: usize,
}

impl Default for RawJwks {
    fn default() -> Self {
        Self {
            cache_ttl_seconds: 600,
            refetch_interval_seconds: 30,
            timeout_seconds: 5,
            max_body_bytes: 256 * 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeycloak {
    base_url: String,
    realm: String,
    #[serde(default = "default_kc_connect_timeout")]
    connect_timeout_seconds: u64,
    #[serde(default = "default_kc_timeout")]
    timeout_seconds: u64,
    #[serde(default = "default_kc_max_body")]
    max_response_bytes: usize,
    #[serde(default = "default_assertion_lifetime")]
    assertion_lifetime_seconds: u64,
    #[serde(default)]
    clients: BTreeMap<String, RawClient>,
}

fn default_kc_connect_timeout() -> u64 {
    2
}
fn default_kc_timeout() -> u64 {
    10
}
fn default_kc_max_body() -> usize {
    64 * 1024
}
fn default_assertion_lifetime() -> u64 {
    60
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "method", rename_all = "snake_case")]
enum RawClient {
    PrivateKeyJwt,
    ClientSecretBasic {
        secret_file: Option<PathBuf>,
        secret_env: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    #[serde(default)]
    algorithm: SigningAlgorithm,
    #[serde(default)]
    key_files: Vec<PathBuf>,
    key_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAudit {
    path: Option<PathBuf>,
    queue_capacity: usize,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            path: None,
            queue_capacity: 8192,
        }
    }
}

// ---------------------------------------------------------------- validated form

/// Validated settings. Built only by [`Settings::load`] / [`Settings::from_toml_str`].
#[derive(Debug)]
pub struct Settings {
    /// Listen address (`host:port`; port 0 picks a free port). Defaults to `127.0.0.1:8080`.
    pub listen: String,
    /// Directory of policy YAML files. Defaults to `policies` (relative to the config file).
    pub policies_dir: PathBuf,
    /// Clock leeway for `exp`, `iat`, `nbf`. Defaults to 60 s.
    pub clock_leeway: Duration,
    /// Largest accepted `subject_token`, in bytes (checked before parsing). Defaults to 16384.
    pub max_token_bytes: usize,
    /// Trusted Bitbucket workspaces; their issuers form the issuer allow-list.
    pub workspaces: Vec<WorkspaceSettings>,
    /// Issuer key fetching and caching.
    pub jwks: JwksSettings,
    /// Keycloak.
    pub keycloak: KeycloakSettings,
    /// The service's signing keys (`None` when no client uses `private_key_jwt`).
    pub signing: Option<SigningKeys>,
    /// Audit log file; `None` writes audit lines to standard output.
    pub audit_path: Option<PathBuf>,
    /// Audit lines that may wait for the writer. Defaults to 8192.
    pub audit_queue_capacity: usize,
    /// Default per-identity limits (a policy's `grant.limits` overrides them).
    pub limits: Limits,
    /// On SIGTERM, how long in-flight exchanges may take before the process exits.
    /// Defaults to 30 s.
    pub shutdown_grace: Duration,
    /// Reload policies when a file in `policies_dir` changes (SIGHUP always reloads).
    /// Defaults to true.
    pub watch_policies: bool,
}

/// Per-identity exchange limits, per minute (GCRA: bursts up to the limit, then
/// one more every 60/limit seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Exchanges per `stepUuid` per minute. Defaults to 20.
    pub per_step_per_minute: std::num::NonZeroU32,
    /// Exchanges per `repositoryUuid` per minute. Defaults to 300.
    pub per_repository_per_minute: std::num::NonZeroU32,
}

/// One trusted Bitbucket workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceSettings {
    /// Workspace slug (the path segment of the issuer).
    pub slug: String,
    /// Workspace UUID; tokens must carry it as `workspaceUuid`.
    pub uuid: BbUuid,
    /// Exact issuer (`iss`) accepted for this workspace, no trailing slash.
    pub issuer: String,
    /// Audiences accepted in `aud` (any one element must match).
    pub audiences: Vec<String>,
    /// Signature algorithm required for this issuer's tokens. Defaults to RS256.
    pub algorithm: jsonwebtoken::Algorithm,
}

/// Issuer key (JWKS) fetching and caching.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// How long a fetched key set is fresh. Defaults to 600 s.
    pub cache_ttl: Duration,
    /// Minimum time between refetches triggered by an unknown `kid`. Defaults to 30 s.
    pub refetch_interval: Duration,
    /// Timeout of each discovery / JWKS request. Defaults to 5 s.
    pub timeout: Duration,
    /// Largest discovery or JWKS body accepted, in bytes. Defaults to 262144.
    pub max_body_bytes: usize,
}

/// Keycloak connection settings.
#[derive(Debug)]
pub struct KeycloakSettings {
    /// Base URL, e.g. `https://sso.example.com` (no `/realms/...`).
    pub base_url: Url,
    /// Realm name.
    pub realm: String,
    /// TCP connect timeout. Defaults to 2 s.
    pub connect_timeout: Duration,
    /// Whole-request timeout for discovery and token calls. Defaults to 10 s.
    pub timeout: Duration,
    /// Largest Keycloak response body accepted, in bytes. Defaults to 65536.
    pub max_response_bytes: usize,
    /// Lifetime of `private_key_jwt` assertions; at most 60 s (Keycloak's default
    /// `token.endpoint.auth.signing.max.exp`). Defaults to 60 s.
    pub assertion_lifetime: Duration,
    /// How the service authenticates as each Keycloak client, by `clientId`.
    pub clients: BTreeMap<String, ClientAuth>,
}

impl KeycloakSettings {
    /// `<base>/realms/<realm>`: the realm issuer, also the assertion `aud`.
    pub fn realm_url(&self) -> String {
        format!(
            "{}/realms/{}",
            self.base_url.as_str().trim_end_matches('/'),
            self.realm
        )
    }
}

/// Client authentication method (Keycloak "Client Authenticator").
pub enum ClientAuth {
    /// "Signed JWT" (`client-jwt`): assertion signed with the service's key, RFC 7523.
    PrivateKeyJwt,
    /// "Client Id and Secret" (`client-secret`), sent as HTTP Basic (RFC 6749 §2.3.1).
    ClientSecretBasic(SecretString),
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PrivateKeyJwt => f.write_str("PrivateKeyJwt"),
            Self::ClientSecretBasic(_) => f.write_str("ClientSecretBasic([redacted])"),
        }
    }
}

impl Settings {
    /// Loads `file`, applies `KEYCLOAK_CI_STS_*` environment overrides, validates.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key and reason for the first problem found.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        Self::load_with(file, Secrets::Read)
    }

    /// Loads `file` like [`Settings::load`] but reads no secret and no private key
    /// (client secrets become empty, `signing` is `None`): for offline tools such as
    /// `policy check --config`, which need only client ids and workspaces.
    ///
    /// # Errors
    /// [`ConfigError`] for everything but unreadable secrets and keys.
    pub fn load_without_secrets(file: &Path) -> Result<Self, ConfigError> {
        Self::load_with(file, Secrets::Skip)
    }

    fn load_with(file: &Path, secrets: Secrets) -> Result<Self, ConfigError> {
        let fname = file.display().to_string();
        let builder = config::Config::builder()
            .add_source(config::File::from(file).format(config::FileFormat::Toml))
            .add_source(env_source());
        Self::from_builder(builder, &fname, base_dir(file), secrets).map_err(|mut e| {
            if let Some(var) = overriding_env_var(&e.key) {
                e.file = format!("environment variable {var}");
            }
            e
        })
    }

    /// Same as [`Settings::load`] from TOML text, without environment overrides
    /// (for tests and tools). Relative paths resolve against `base`.
    ///
    /// # Errors
    /// [`ConfigError`] as for `load`.
    pub fn from_toml_str(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml));
        Self::from_builder(builder, "<inline>", base.to_path_buf(), Secrets::Read)
    }

    fn from_builder(
        builder: config::ConfigBuilder<config::builder::DefaultState>,
        fname: &str,
        base: PathBuf,
        secrets: Secrets,
    ) -> Result<Self, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: fname.to_string(),
            key: key.to_string(),
            reason,
        };
        let cfg = builder.build().map_err(|e| err("", e.to_string()))?;
        let raw: RawSettings = serde_path_to_error::deserialize(cfg).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            err(&path, yaml_like_hint(&inner))
        })?;
        validate(raw, fname, &base, secrets)
    }
}

/// Whether validation reads secrets and private keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrets {
    Read,
    Skip,
}

/// The environment variable that overrides `key` (`workspaces[0].uuid` style paths
/// have none), when it is set.
fn overriding_env_var(key: &str) -> Option<String> {
    if key.is_empty() || key.contains('[') {
        return None;
    }
    let var = format!("{ENV_PREFIX}_{}", key.replace('.', "__").to_uppercase());
    std::env::var_os(&var).map(|_| var)
}

fn env_source() -> config::Environment {
    config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
}

fn base_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn yaml_like_hint(msg: &str) -> String {
    if msg.contains("invalid type: map") && msg.contains("expected a string") {
        format!("{msg} (a value in braces such as {{uuid}} must be quoted: \"{{...}}\")")
    } else {
        msg.to_string()
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// True when `host` is a loopback name or address (plain http is allowed only there).
pub fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        url::Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

/// Checks an upstream URL: absolute, https (http only on loopback), no
/// credentials, query or fragment.
fn check_upstream_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    let host = url.host().ok_or_else(|| format!("`{s}` has no host"))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback_host(&host) => {}
        "http" => {
            return Err(format!(
                "`{s}` uses plain http; only loopback addresses may"
            ))
        }
        other => return Err(format!("`{s}`: scheme `{other}` is not http(s)")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("`{s}` must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{s}` must not have a query or fragment"));
    }
    Ok(url)
}

fn validate(
    raw: RawSettings,
    fname: &str,
    base: &Path,
    secrets: Secrets,
) -> Result<Settings, ConfigError> {
    let err = |key: String, reason: String| ConfigError {
        file: fname.to_string(),
        key,
        reason,
    };

    if raw.listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(err(
            "listen".into(),
            format!(
                "`{}` is not an address:port such as 127.0.0.1:8080",
                raw.listen
            ),
        ));
    }
    if raw.clock_leeway_seconds > 300 {
        return Err(err(
            "clock_leeway_seconds".into(),
            "must be at most 300".into(),
        ));
    }
    if !(1024..=1024 * 1024).contains(&raw.max_token_bytes) {
        return Err(err(
            "max_token_bytes".into(),
            "must be between 1024 and 1048576".into(),
        ));
    }

    // Workspaces.
    if raw.workspaces.is_empty() {
        return Err(err(
            "workspaces".into(),
            "at least one trusted workspace is required".into(),
        ));
    }
    let mut workspaces: Vec<WorkspaceSettings> = Vec::new();
    for (i, w) in raw.workspaces.into_iter().enumerate() {
        let k = |f: &str| format!("workspaces[{i}].{f}");
        let slug_ok = !w.slug.is_empty()
            && w.slug.len() <= 100
            && w.slug
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !slug_ok {
            return Err(err(
                k("slug"),
                format!(
                    "`{}` is not a workspace slug (letters, digits, - and _)",
                    w.slug
                ),
            ));
        }
        let uuid = BbUuid::parse_lenient(&w.uuid).map_err(|e| err(k("uuid"), e.to_string()))?;
        let issuer = match &w.issuer {
            None => format!(
                "https://api.bitbucket.org/2.0/workspaces/{}/pipelines-config/identity/oidc",
                w.slug
            ),
            Some(s) => {
                if s.ends_with('/') {
                    return Err(err(
                        k("issuer"),
                        format!("`{s}` ends with `/`; Bitbucket issuers have no trailing slash and `iss` is compared exactly"),
                    ));
                }
                check_upstream_url(s).map_err(|r| err(k("issuer"), r))?;
                s.clone()
            }
        };
        let mut audiences = Vec::new();
        if w.accept_default_audience {
            audiences.push(format!("{ARI_WORKSPACE_PREFIX}{}", uuid.bare()));
        }
        for (j, a) in w.audiences.iter().enumerate() {
            let key = k(&format!("audiences[{j}]"));
            check_audience(a, &uuid).map_err(|r| err(key, r))?;
            if !audiences.contains(a) {
                audiences.push(a.clone());
            }
        }
        if audiences.is_empty() {
            return Err(err(
                k("audiences"),
                "no audience accepted: add this service's own audience (the step's `oidc: audiences:`); \
                 accept_default_audience = true also accepts tokens meant for any other service of the workspace"
                    .into(),
            ));
        }
        let algorithm = match w.algorithm.as_str() {
            "RS256" => jsonwebtoken::Algorithm::RS256,
            "RS384" => jsonwebtoken::Algorithm::RS384,
            "RS512" => jsonwebtoken::Algorithm::RS512,
            "PS256" => jsonwebtoken::Algorithm::PS256,
            "ES256" => jsonwebtoken::Algorithm::ES256,
            other => {
                return Err(err(
                    k("algorithm"),
                    format!("`{other}` is not allowed (RS256, RS384, RS512, PS256, ES256)"),
                ))
            }
        };
        if workspaces.iter().any(|o| o.issuer == issuer) {
            return Err(err(
                k("issuer"),
                format!("issuer `{issuer}` is configured twice"),
            ));
        }
        if workspaces.iter().any(|o| o.uuid == uuid) {
            return Err(err(
                k("uuid"),
                format!("workspace {uuid} is configured twice"),
            ));
        }
        workspaces.push(WorkspaceSettings {
            slug: w.slug,
            uuid,
            issuer,
            audiences,
            algorithm,
        });
    }

    // JWKS.
    let j = raw.jwks;
    if j.timeout_seconds == 0 || j.timeout_seconds > 60 {
        return Err(err("jwks.timeout_seconds".into(), "must be 1..=60".into()));
    }
    if j.cache_ttl_seconds == 0 {
        return Err(err(
            "jwks.cache_ttl_seconds".into(),
            "must be at least 1".into(),
        ));
    }
    if j.refetch_interval_seconds == 0 {
        return Err(err(
            "jwks.refetch_interval_seconds".into(),
            "must be at least 1".into(),
        ));
    }
    if !(1024..=8 * 1024 * 1024).contains(&j.max_body_bytes) {
        return Err(err(
            "jwks.max_body_bytes".into(),
            "must be 1024..=8388608".into(),
        ));
    }
    let jwks = JwksSettings {
        cache_ttl: Duration::from_secs(j.cache_ttl_seconds),
        refetch_interval: Duration::from_secs(j.refetch_interval_seconds),
        timeout: Duration::from_secs(j.timeout_seconds),
        max_body_bytes: j.max_body_bytes,
    };

    // Keycloak.
    let kc = raw.keycloak;
    let base_url =
        check_upstream_url(&kc.base_url).map_err(|r| err("keycloak.base_url".into(), r))?;
    let realm_ok = !kc.realm.is_empty()
        && kc
            .realm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !realm_ok {
        return Err(err(
            "keycloak.realm".into(),
            format!(
                "`{}` is not a realm name (letters, digits, - _ .)",
                kc.realm
            ),
        ));
    }
    if kc.timeout_seconds == 0 || kc.timeout_seconds > 120 {
        return Err(err(
            "keycloak.timeout_seconds".into(),
            "must be 1..=120".into(),
        ));
    }
    if kc.connect_timeout_seconds == 0 || kc.connect_timeout_seconds > kc.timeout_seconds {
        return Err(err(
            "keycloak.connect_timeout_seconds".into(),
            "must be 1..=timeout_seconds".into(),
        ));
    }
    if !(5..=60).contains(&kc.assertion_lifetime_seconds) {
        return Err(err(
            "keycloak.assertion_lifetime_seconds".into(),
            "must be 5..=60 (Keycloak refuses assertions living longer than 60 s by default)"
                .into(),
        ));
    }
    if !(1024..=8 * 1024 * 1024).contains(&kc.max_response_bytes) {
        return Err(err(
            "keycloak.max_response_bytes".into(),
            "must be 1024..=8388608".into(),
        ));
    }
    let mut clients = BTreeMap::new();
    let mut needs_signing = false;
    for (id, c) in kc.clients {
        let key = format!("keycloak.clients.{id}");
        let auth = match c {
            RawClient::PrivateKeyJwt => {
                needs_signing = true;
                ClientAuth::PrivateKeyJwt
            }
            RawClient::ClientSecretBasic {
                secret_file,
                secret_env,
            } => {
                let secret = match secrets {
                    Secrets::Read => {
                        read_secret(secret_file.as_deref(), secret_env.as_deref(), base)
                            .map_err(|r| err(key.clone(), r))?
                    }
                    Secrets::Skip => SecretString::from(String::new()),
                };
                ClientAuth::ClientSecretBasic(secret)
            }
        };
        clients.insert(id, auth);
    }
    if clients.is_empty() {
        return Err(err(
            "keycloak.clients".into(),
            "no Keycloak client configured".into(),
        ));
    }

    // Signing keys.
    let signing = match raw.signing {
        _ if secrets == Secrets::Skip => None,
        None if needs_signing => {
            return Err(err(
                "signing".into(),
                "a client uses private_key_jwt, so [signing] key_files or key_env is required"
                    .into(),
            ))
        }
        None => None,
        Some(s) => {
            let mut keys = Vec::new();
            if let Some(var) = &s.key_env {
                let pem = std::env::var(var).map_err(|_| {
                    err(
                        "signing.key_env".into(),
                        format!("environment variable `{var}` is not set"),
                    )
                })?;
                let key = SigningKey::from_pem(&SecretString::from(pem), s.algorithm)
                    .map_err(|e| err("signing.key_env".into(), e.to_string()))?;
                keys.push(key);
            }
            for (i, p) in s.key_files.iter().enumerate() {
                let k = format!("signing.key_files[{i}]");
                let path = resolve(base, p);
                let pem = std::fs::read_to_string(&path)
                    .map_err(|e| err(k.clone(), format!("cannot read {}: {e}", path.display())))?;
                let key = SigningKey::from_pem(&SecretString::from(pem), s.algorithm)
                    .map_err(|e| err(k.clone(), format!("{}: {e}", path.display())))?;
                keys.push(key);
            }
            match SigningKeys::new(keys) {
                Some(k) => Some(k),
                None => {
                    return Err(err(
                        "signing".into(),
                        "set key_files (newest first) or key_env".into(),
                    ))
                }
            }
        }
    };

    Ok(Settings {
        listen: raw.listen,
        policies_dir: resolve(base, &raw.policies_dir),
        clock_leeway: Duration::from_secs(raw.clock_leeway_seconds),
        max_token_bytes: raw.max_token_bytes,
        workspaces,
        jwks,
        keycloak: KeycloakSettings {
            base_url,
            realm: kc.realm,
            connect_timeout: Duration::from_secs(kc.connect_timeout_seconds),
            timeout: Duration::from_secs(kc.timeout_seconds),
            max_response_bytes: kc.max_response_bytes,
            assertion_lifetime: Duration::from_secs(kc.assertion_lifetime_seconds),
            clients,
        },
        signing,
        audit_queue_capacity: raw.audit.queue_capacity.clamp(1, 1_000_000),
        audit_path: raw.audit.path.map(|p| resolve(base, &p)),
        limits: Limits {
            per_step_per_minute: std::num::NonZeroU32::new(raw.limits.per_step_per_minute)
                .ok_or_else(|| {
                    err(
                        "limits.per_step_per_minute".into(),
                        "must be at least 1".into(),
                    )
                })?,
            per_repository_per_minute: std::num::NonZeroU32::new(
                raw.limits.per_repository_per_minute,
            )
            .ok_or_else(|| {
                err(
                    "limits.per_repository_per_minute".into(),
                    "must be at least 1".into(),
                )
            })?,
        },
        shutdown_grace: Duration::from_secs(raw.shutdown_grace_seconds.min(3600)),
        watch_policies: raw.watch_policies,
    })
}

fn read_secret(
    file: Option<&Path>,
    env: Option<&str>,
    base: &Path,
) -> Result<SecretString, String> {
    let value = match (file, env) {
        (Some(f), None) => {
            let path = resolve(base, f);
            std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read secret_file {}: {e}", path.display()))?
        }
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| format!("secret_env: environment variable `{var}` is not set"))?,
        _ => return Err("set exactly one of secret_file or secret_env".into()),
    };
    let trimmed = value.trim_end_matches(['\r', '\n']).to_string();
    if trimmed.is_empty() {
        return Err("the client secret is empty".into());
    }
    Ok(SecretString::from(trimmed))
}

/// Validates one configured audience. Bitbucket custom audiences are at most 150
/// characters; an `ari:cloud:bitbucket::workspace/` audience must carry this
/// workspace's UUID, lower case, without braces (tokens never have braces there).
fn check_audience(a: &str, ws: &BbUuid) -> Result<(), String> {
    if a.is_empty() || a.len() > 150 {
        return Err("audiences are 1 to 150 characters (Bitbucket's limit)".into());
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

#[cfg(test)]
mod tests {
    use super::*;

    const W: &str = "03b741e3-cf4a-41f9-9a59-cec52e21bdc3";

    fn toml(extra_ws: &str) -> String {
        let audiences =
            if extra_ws.contains("audiences") || extra_ws.contains("accept_default_audience") {
                ""
            } else {
                "audiences = [\"https://sts.example.test\"]"
            };
        format!(
            r#"
[[workspaces]]
slug = "acme"
uuid = "{{{W}}}"
{audiences}
{extra_ws}
[keycloak]
base_url = "http://127.0.0.1:8080"
realm = "ci"
[keycloak.clients.sts-artifacts]
method = "client_secret_basic"
secret_env = "PATH"
"#
        )
    }

    fn load(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml_str(text, Path::new("."))
    }

    #[test]
    fn defaults_apply() {
        let s = load(&toml("")).unwrap();
        let w = &s.workspaces[0];
        assert_eq!(
            w.issuer,
            "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc"
        );
        assert_eq!(w.audiences, vec!["https://sts.example.test".to_string()]);
        assert_eq!(s.clock_leeway, Duration::from_secs(60));
    }

    #[test]
    fn the_workspace_default_audience_is_opt_in() {
        let e = load(&toml("accept_default_audience = false")).unwrap_err();
        assert_eq!(e.key, "workspaces[0].audiences");
        let s = load(&toml("accept_default_audience = true")).unwrap();
        assert_eq!(
            s.workspaces[0].audiences,
            vec![format!("ari:cloud:bitbucket::workspace/{W}")]
        );
    }

    #[test]
    fn ari_audience_with_braces_is_refused() {
        let e = load(&toml(&format!(
            "audiences = [\"ari:cloud:bitbucket::workspace/{{{W}}}\"]"
        )))
        .unwrap_err();
        assert_eq!(e.key, "workspaces[0].audiences[0]");
        assert!(e.reason.contains("no braces"), "{e}");
    }

    #[test]
    fn ari_audience_with_slug_is_refused() {
        let e = load(&toml(
            "audiences = [\"ari:cloud:bitbucket::workspace/acme\"]",
        ))
        .unwrap_err();
        assert!(e.reason.contains("not a slug"), "{e}");
    }

    #[test]
    fn issuer_with_trailing_slash_is_refused() {
        let e = load(&toml("issuer = \"https://issuer.example.test/x/\"")).unwrap_err();
        assert_eq!(e.key, "workspaces[0].issuer");
        assert!(e.reason.contains("trailing slash"), "{e}");
    }

    #[test]
    fn plain_http_issuer_only_on_loopback() {
        assert!(load(&toml("issuer = \"http://127.0.0.1:9/oidc\"")).is_ok());
        let e = load(&toml("issuer = \"http://issuer.example.test/oidc\"")).unwrap_err();
        assert!(e.reason.contains("plain http"), "{e}");
    }

    #[test]
    fn workspace_uuid_must_be_a_uuid() {
        let text = toml("").replace(&format!("{{{W}}}"), "not-a-uuid");
        let e = load(&text).unwrap_err();
        assert_eq!(e.key, "workspaces[0].uuid");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = load(&format!("surprise = 1\n{}", toml(""))).unwrap_err();
        assert!(e.reason.contains("unknown field"), "{e}");
    }

    #[test]
    fn unreadable_key_file_is_named() {
        let text = toml("").replace(
            "method = \"client_secret_basic\"\nsecret_env = \"PATH\"",
            "method = \"private_key_jwt\"",
        ) + "\n[signing]\nkey_files = [\"/nonexistent/key.pem\"]\n";
        let e = load(&text).unwrap_err();
        assert_eq!(e.key, "signing.key_files[0]");
        assert!(e.reason.contains("/nonexistent/key.pem"), "{e}");
    }

    #[test]
    fn private_key_jwt_requires_signing_keys() {
        let text = toml("").replace(
            "method = \"client_secret_basic\"\nsecret_env = \"PATH\"",
            "method = \"private_key_jwt\"",
        );
        let e = load(&text).unwrap_err();
        assert_eq!(e.key, "signing");
    }

    #[test]
    fn client_secret_debug_is_redacted() {
        let s = load(&toml("")).unwrap();
        let dbg = format!("{:?}", s.keycloak.clients);
        assert!(dbg.contains("[redacted]"));
        assert!(!dbg.contains("/usr"), "secret (PATH value) leaked: {dbg}");
    }
}

#[cfg(test)]
mod env_tests {
    use super::*;

    #[test]
    fn client_ids_keep_their_case_and_env_overrides_apply() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sts.toml");
        std::fs::write(
            &file,
            "[[workspaces]]\nslug = \"acme\"\nuuid = \"03b741e3-cf4a-41f9-9a59-cec52e21bdc3\"\naudiences = [\"https://sts.example.test\"]\n[keycloak]\nbase_url = \"http://127.0.0.1:8080\"\nrealm = \"ci\"\n[keycloak.clients.CI-Deploy]\nmethod = \"client_secret_basic\"\nsecret_env = \"PATH\"\n",
        )
        .unwrap();
        std::env::set_var("KEYCLOAK_CI_STS_CLOCK_LEEWAY_SECONDS", "7");
        let s = Settings::load(&file).unwrap();
        std::env::remove_var("KEYCLOAK_CI_STS_CLOCK_LEEWAY_SECONDS");
        assert_eq!(s.clock_leeway, Duration::from_secs(7));
        assert!(
            s.keycloak.clients.contains_key("CI-Deploy"),
            "{:?}",
            s.keycloak.clients.keys()
        );
    }
}
