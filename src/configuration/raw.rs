//! The file format: what serde reads from TOML and environment overrides before
//! validation. Unknown keys are refused. Defaults live here, one function each.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::keycloak::GrantMode;
use crate::signing::SigningAlgorithm;

/// The ranges `validate` enforces that the JSON Schema states too (one source).
pub(super) mod bounds {
    use std::ops::RangeInclusive;
    /// `clock_leeway_seconds`.
    pub const CLOCK_LEEWAY_SECONDS: RangeInclusive<u64> = 0..=300;
    /// `max_token_bytes`.
    pub const MAX_TOKEN_BYTES: RangeInclusive<usize> = 1024..=1024 * 1024;
    /// `max_subject_token_lifetime_seconds`.
    pub const MAX_SUBJECT_TOKEN_LIFETIME_SECONDS: RangeInclusive<u64> = 300..=7 * 86_400;
    /// `body_timeout_ms`.
    pub const BODY_TIMEOUT_MS: RangeInclusive<u64> = 10..=120_000;
    /// `[protections] max_age_hours`.
    pub const MAX_AGE_HOURS: RangeInclusive<u64> = 1..=8_760;
}

/// The service's configuration file (`sts.toml`).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "keycloak-ci-sts configuration")]
pub(super) struct RawSettings {
    /// Address of the public listener (`POST /token`, `POST /grants`, the JWKS).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of the admin listener (probes, metrics); never expose it to pipelines.
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// The policies directory (relative to this file).
    #[serde(default = "default_policies_dir")]
    pub policies_dir: PathBuf,
    /// Clock skew allowed on the subject token's `exp`, `nbf` and `iat`, seconds.
    #[serde(default = "default_leeway")]
    #[schemars(range(min = *bounds::CLOCK_LEEWAY_SECONDS.start(), max = *bounds::CLOCK_LEEWAY_SECONDS.end()))]
    pub clock_leeway_seconds: u64,
    /// Longest subject token accepted, bytes.
    #[serde(default = "default_max_token_bytes")]
    #[schemars(range(min = *bounds::MAX_TOKEN_BYTES.start(), max = *bounds::MAX_TOKEN_BYTES.end()))]
    pub max_token_bytes: usize,
    /// Longest `exp - iat` a subject token may have, seconds.
    #[serde(default = "default_max_subject_token_lifetime")]
    #[schemars(range(min = *bounds::MAX_SUBJECT_TOKEN_LIFETIME_SECONDS.start(), max = *bounds::MAX_SUBJECT_TOKEN_LIFETIME_SECONDS.end()))]
    pub max_subject_token_lifetime_seconds: u64,
    /// Time to receive a request's body, milliseconds.
    #[serde(default = "default_body_timeout_ms")]
    #[schemars(range(min = *bounds::BODY_TIMEOUT_MS.start(), max = *bounds::BODY_TIMEOUT_MS.end()))]
    pub body_timeout_ms: u64,
    /// The trusted Bitbucket workspaces (`[[workspaces]]`).
    #[serde(default)]
    pub workspaces: Vec<RawWorkspace>,
    #[serde(default)]
    pub jwks: RawJwks,
    /// The Keycloak realm and the clients the service acts as.
    pub keycloak: RawKeycloak,
    /// Keys signing client assertions (`private_key_jwt`), published as the JWKS.
    pub signing: Option<RawSigning>,
    /// The issuer of per-repository identities (JWT Authorization Grant clients).
    pub identity: Option<RawIdentity>,
    /// Where audit lines go.
    #[serde(default)]
    pub audit: RawAudit,
    /// Rate limits and their store.
    #[serde(default)]
    pub limits: RawLimits,
    /// Time in-flight exchanges get to finish after SIGTERM, seconds.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_seconds: u64,
    /// Reload policies when their files change.
    #[serde(default = "yes")]
    pub watch_policies: bool,
    /// Where Keycloak reaches this service (its JWKS URL is `<public_url>/.well-known/jwks.json`).
    pub public_url: Option<String>,
    /// How a changed policies directory is noticed and applied.
    #[serde(default)]
    pub policies: RawPolicies,
    /// Protections the inventory records, and requirements per client or audience.
    #[serde(default)]
    pub protections: RawProtections,
}

/// `[protections]`: how old the inventory's protections may be, and the
/// requirements every grant of a client or audience carries (issue #22).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawProtections {
    /// `[protections] max_age_hours`, hours.
    #[schemars(range(min = *bounds::MAX_AGE_HOURS.start(), max = *bounds::MAX_AGE_HOURS.end()))]
    pub max_age_hours: u64,
    /// `[protections.require]`.
    pub require: RawRequire,
}

impl Default for RawProtections {
    fn default() -> Self {
        Self {
            max_age_hours: crate::policy::require::DEFAULT_MAX_AGE.as_secs() / 3600,
            require: RawRequire::default(),
        }
    }
}

/// `[protections.require.clients.<id>]` and `[protections.require.audiences.<audience>]`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRequire {
    pub clients: BTreeMap<String, crate::policy::require::RawRequirement>,
    pub audiences: BTreeMap<String, crate::policy::require::RawRequirement>,
}

/// `[policies]`: how a changed policies directory is noticed and applied.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPolicies {
    /// Poll fallback: compare the directory's content digest this often; 0 = off.
    pub poll_ms: u64,
    /// A set is applied only when two reads this far apart agree.
    pub settle_ms: u64,
}

impl Default for RawPolicies {
    fn default() -> Self {
        Self {
            poll_ms: 5_000,
            settle_ms: 250,
        }
    }
}

fn default_shutdown_grace() -> u64 {
    30
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
fn default_body_timeout_ms() -> u64 {
    10_000
}
fn default_max_token_bytes() -> usize {
    16 * 1024
}
/// 24 h: twice the longest Bitbucket step (`max-time` up to 720 minutes).
fn default_max_subject_token_lifetime() -> u64 {
    86_400
}
fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    #[schemars(range(min = 1))]
    pub per_step_per_minute: u32,
    pub per_repository_per_minute: u32,
    #[schemars(range(min = 1))]
    pub grants_per_step_per_minute: u32,
    /// `memory` (default) or `redis`.
    pub store: String,
    pub redis: Option<RawRedis>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub url_file: Option<PathBuf>,
    pub url_env: Option<String>,
    #[serde(default = "redis_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "redis_on_store_error")]
    pub on_store_error: crate::limits::OnStoreError,
    #[serde(default = "redis_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "redis_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "redis_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

fn redis_timeout_ms() -> u64 {
    250
}
fn redis_on_store_error() -> crate::limits::OnStoreError {
    crate::limits::OnStoreError::Deny
}
fn redis_key_prefix() -> String {
    "kcs".into()
}
fn redis_reconnect_min_ms() -> u64 {
    100
}
fn redis_reconnect_max_ms() -> u64 {
    2000
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            per_step_per_minute: 20,
            per_repository_per_minute: 300,
            grants_per_step_per_minute: 30,
            store: "memory".into(),
            redis: None,
        }
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkspace {
    pub slug: String,
    pub uuid: String,
    pub issuer: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub accept_default_audience: bool,
    #[serde(default = "default_token_alg")]
    pub algorithm: String,
}

fn default_token_alg() -> String {
    "RS256".into()
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawJwks {
    pub cache_ttl_seconds: u64,
    pub refetch_interval_seconds: u64,
    pub timeout_seconds: u64,
    pub max_body_bytes: usize,
}

impl Default for RawJwks {
    fn default() -> Self {
        Self {
            cache_ttl_seconds: 600,
            refetch_interval_seconds: 5,
            timeout_seconds: 5,
            max_body_bytes: 256 * 1024,
        }
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeycloak {
    pub base_url: String,
    pub realm: String,
    #[serde(default = "default_kc_connect_timeout")]
    pub connect_timeout_seconds: u64,
    #[serde(default = "default_kc_timeout")]
    pub timeout_seconds: u64,
    #[serde(default = "default_kc_max_body")]
    pub max_response_bytes: usize,
    #[serde(default = "default_assertion_lifetime")]
    pub assertion_lifetime_seconds: u64,
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after_seconds: u64,
    #[serde(default)]
    pub clients: BTreeMap<String, RawClient>,
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
fn default_max_retry_after() -> u64 {
    60
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, tag = "method", rename_all = "snake_case")]
pub(super) enum RawClient {
    PrivateKeyJwt {
        #[serde(default)]
        grant: GrantMode,
    },
    ClientSecretBasic {
        secret_file: Option<PathBuf>,
        secret_env: Option<String>,
        #[serde(default)]
        grant: GrantMode,
    },
}

/// `[identity]`: the service as the issuer of per-repository identities (JWT
/// Authorization Grant). Its key is separate from `[signing]`'s.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    #[serde(default)]
    pub algorithm: SigningAlgorithm,
    #[serde(default)]
    pub key_files: Vec<PathBuf>,
    pub key_env: Option<String>,
    #[serde(default = "default_identity_provider")]
    pub identity_provider: String,
}

fn default_identity_provider() -> String {
    "keycloak-ci-sts".into()
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSigning {
    #[serde(default)]
    pub algorithm: SigningAlgorithm,
    #[serde(default)]
    pub key_files: Vec<PathBuf>,
    pub key_env: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAudit {
    pub path: Option<PathBuf>,
    pub queue_capacity: usize,
    pub fsync: bool,
    pub reopen_interval_ms: u64,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            path: None,
            queue_capacity: 8192,
            fsync: false,
            reopen_interval_ms: 1000,
        }
    }
}

/// The JSON Schema of the configuration file, draft-07 (taplo and other TOML
/// tools read it; see [`crate::domain::json_schema::draft07`]), committed as
/// `docs/src/schemas/configuration.schema.json`. Environment overrides are not
/// part of the file and not of the schema.
pub fn schema() -> serde_json::Value {
    crate::domain::json_schema::draft07::<RawSettings>()
}
