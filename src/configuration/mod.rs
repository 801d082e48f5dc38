//! Configuration: one TOML file (`serve --config FILE`) layered under environment
//! variables with the prefix [`ENV_PREFIX`] and `__` between nested keys, e.g.
//! `KEYCLOAK_CI_STS_KEYCLOAK__BASE_URL=http://127.0.0.1:8080`.
//!
//! The raw (serde) form rejects unknown keys; [`Settings::load`] then validates every
//! value and reads every secret, so the service refuses to start with a message that
//! names the file, the key and the reason. Relative paths are resolved against the
//! directory of the configuration file. Secrets (client secrets, private keys) are
//! accepted only as a file path or as the name of an environment variable.

mod raw;
pub use raw::schema;
mod secrets;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::keycloak::{ClientAuth, KeycloakSettings};
pub use crate::limits::Limits;
use crate::signing::SigningKeys;
pub use crate::verify::jwks::JwksSettings;
pub use crate::verify::WorkspaceSettings;
pub use validate::{MAX_AUDIENCE_CHARS, MAX_STEP_AUDIENCES};

/// Largest configuration file accepted, in bytes.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "KEYCLOAK_CI_STS";

/// Bitbucket's default audience prefix; the workspace UUID follows, without braces
/// (Atlassian, "Integrate Pipelines with resource servers using OIDC").
pub const ARI_WORKSPACE_PREFIX: &str = "ari:cloud:bitbucket::workspace/";

/// The host of every Bitbucket Cloud Pipelines OIDC issuer
/// (`https://api.bitbucket.org/2.0/workspaces/<slug>/pipelines-config/identity/oidc`).
pub const BITBUCKET_API_HOST: &str = "api.bitbucket.org";

/// A configuration problem, naming where it is: `FILE: \`key\`: reason`, or
/// `FILE: reason` when the problem is the whole file (the same type the policy
/// loader reports with).
pub type ConfigError = crate::domain::SourceError;

// ---------------------------------------------------------------- validated form

/// Where the per-identity limits are counted (`[limits] store`).
#[derive(Debug, Clone)]
pub enum LimitStore {
    /// In this process (default; one instance).
    Memory,
    /// In Redis, shared by every replica (`[limits.redis]`).
    Redis(crate::limits::RedisSettings),
}

/// Validated settings. Built only by [`Settings::load`] / [`Settings::from_toml_str`].
#[derive(Debug)]
pub struct Settings {
    /// Listen address (`host:port`; port 0 picks a free port). Defaults to `127.0.0.1:8080`.
    pub listen: String,
    /// Optional second listener (`host:port`) for `/metrics`, `/healthz`,
    /// `/readyz`, `/upstreamz`; when set, `listen` serves only `/token`,
    /// `/grants` and the JWKS (a NetworkPolicy works on ports, not paths).
    pub admin_listen: Option<String>,
    /// Directory of policy YAML files. Defaults to `policies` (relative to the config file).
    pub policies_dir: PathBuf,
    /// Clock leeway for `exp`, `iat`, `nbf`. Defaults to 60 s.
    pub clock_leeway: Duration,
    /// Largest accepted `subject_token`, in bytes (checked before parsing). Defaults to 16384.
    pub max_token_bytes: usize,
    /// Longest accepted subject-token lifetime (`exp - iat`), 300 s to 7 days.
    /// Bitbucket does not document its tokens' lifetime and a step may run up to 720
    /// minutes, so the default is generous: 86400 s (24 h). It refuses absurd
    /// values (`exp` of 2^64-1, `exp` in milliseconds), not Bitbucket's own.
    pub max_subject_token_lifetime: Duration,
    /// Longest time a client may take to send the `/token` or `/grants` body once
    /// its headers arrived (`body_timeout_ms`, 10 ms to 120 s). Defaults to 10 s.
    pub body_timeout: Duration,
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
    /// `[audit] fsync`: after each batch, wait until the audit file is on disk
    /// (`fdatasync`), not only handed to the operating system. Defaults to false.
    pub audit_fsync: bool,
    /// `[audit] reopen_interval_ms`: while the audit destination is unavailable
    /// (a FIFO without a reader), how often opening it is retried; also how
    /// often an idle writer checks the path for a rotation. Defaults to 1 s.
    pub audit_reopen_interval: Duration,
    /// Default per-identity limits (a policy's `grant.limits` overrides them).
    pub limits: Limits,
    /// Where the limits are counted: this process, or Redis shared by replicas.
    pub limit_store: LimitStore,
    /// On SIGTERM, how long in-flight exchanges may take before the process exits.
    /// Defaults to 30 s.
    pub shutdown_grace: Duration,
    /// Reload policies when a file in `policies_dir` changes (SIGHUP always reloads).
    /// Defaults to true.
    pub watch_policies: bool,
    /// `[policies] poll_ms`: how often the policies directory's content digest is
    /// compared with the last one seen (the fallback for changes a watch cannot
    /// see); `None` when 0. Defaults to 5000 ms.
    pub policy_poll: Option<Duration>,
    /// `[policies] settle_ms`: a changed set is applied only when two reads this
    /// far apart agree (no writer busy). Defaults to 250 ms.
    pub policy_settle: Duration,
    /// The service's base URL as Keycloak and callers reach it (https, or http on
    /// loopback), e.g. `https://sts.example.com`. `keycloak plan/apply` derive each
    /// `private_key_jwt` client's `jwks.url` from it (`<public_url>/.well-known/jwks.json`).
    /// Optional for `serve`.
    pub public_url: Option<url::Url>,
    /// `[signing] algorithm` (ES256 when `[signing]` is absent), known even when the
    /// keys were not read ([`Secrets::Skip`]).
    pub signing_algorithm: crate::signing::SigningAlgorithm,
    /// `[protections]`: `max_age_hours` (default 72) and the requirements
    /// every grant of a client or audience carries.
    pub protections: std::sync::Arc<crate::policy::require::Rules>,
}

/// Everything `config check` found: errors refuse the configuration, warnings do
/// not (the service logs them at startup).
#[derive(Debug, Default)]
pub struct Report {
    /// Problems that refuse the configuration.
    pub errors: Vec<ConfigError>,
    /// Settings that are accepted but probably wrong.
    pub warnings: Vec<ConfigError>,
}

/// Every problem of a refused configuration (at least one), one per line.
#[derive(Debug, thiserror::Error)]
#[error("{first}{}", .rest.iter().map(|e| format!("\n{e}")).collect::<String>())]
pub struct ConfigErrors {
    first: ConfigError,
    rest: Vec<ConfigError>,
}

impl ConfigErrors {
    /// Every problem, in the order found.
    pub fn all(&self) -> impl Iterator<Item = &ConfigError> {
        std::iter::once(&self.first).chain(&self.rest)
    }

    fn from_report(report: Report, file: &str) -> Self {
        let mut errors = report.errors.into_iter();
        let first = errors.next().unwrap_or_else(|| ConfigError {
            file: file.to_string(),
            key: String::new(),
            reason: "configuration refused".into(),
        });
        Self {
            first,
            rest: errors.collect(),
        }
    }
}

/// The first problem: what short messages and most tests name.
impl std::ops::Deref for ConfigErrors {
    type Target = ConfigError;
    fn deref(&self) -> &ConfigError {
        &self.first
    }
}

impl Settings {
    /// Loads `file`, applies `KEYCLOAK_CI_STS_*` environment overrides, validates
    /// every value and reads every secret and key. Warnings are logged.
    ///
    /// # Errors
    /// [`ConfigErrors`]: every problem found, each naming file (or variable), key and reason.
    pub fn load(file: &Path) -> Result<Self, ConfigErrors> {
        let (settings, report) = Self::check(file, Secrets::Read);
        for w in &report.warnings {
            tracing::warn!(warning = %w, "configuration warning");
        }
        match settings {
            Some(s) => Ok(s),
            None => Err(ConfigErrors::from_report(
                report,
                &file.display().to_string(),
            )),
        }
    }

    /// Loads `file` like [`Settings::load`] but reads no secret and no private key
    /// (client secrets become empty, `signing` is `None`): for offline tools such as
    /// `policy check --config`, which need only client ids and workspaces.
    ///
    /// # Errors
    /// [`ConfigErrors`] for everything but unreadable secrets and keys.
    pub fn load_without_secrets(file: &Path) -> Result<Self, ConfigErrors> {
        let (settings, report) = Self::check(file, Secrets::Skip);
        match settings {
            Some(s) => Ok(s),
            None => Err(ConfigErrors::from_report(
                report,
                &file.display().to_string(),
            )),
        }
    }

    /// Runs every startup check of `file` (with environment overrides) without
    /// starting anything: the settings when valid, and every error and warning.
    /// With [`Secrets::Skip`] no secret or key is read.
    pub fn check(file: &Path, secrets: Secrets) -> (Option<Self>, Report) {
        let fname = file.display().to_string();
        // Read here, not by the config crate: never blocks on a FIFO, a regular
        // file of at most MAX_CONFIG_FILE_BYTES.
        let text = match crate::domain::regular_file::read_small_file(file, MAX_CONFIG_FILE_BYTES) {
            Ok(text) => text,
            Err(reason) => {
                let report = Report {
                    errors: vec![ConfigError {
                        file: fname,
                        key: String::new(),
                        reason: format!("cannot read the configuration file: {reason}"),
                    }],
                    warnings: Vec::new(),
                };
                return (None, report);
            }
        };
        let builder = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .add_source(env_source());
        let (settings, mut report) = Self::from_builder(builder, &fname, base_dir(file), secrets);
        for e in report.errors.iter_mut().chain(report.warnings.iter_mut()) {
            if let Some(var) = overriding_env_var(&e.key) {
                e.file = format!("environment variable {var}");
            }
        }
        (settings, report)
    }

    /// Same as [`Settings::load`] from TOML text, without environment overrides
    /// (for tests and tools). Relative paths resolve against `base`.
    ///
    /// # Errors
    /// [`ConfigErrors`] as for `load`.
    pub fn from_toml_str(text: &str, base: &Path) -> Result<Self, ConfigErrors> {
        let builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml));
        let (settings, report) =
            Self::from_builder(builder, "<inline>", base.to_path_buf(), Secrets::Read);
        match settings {
            Some(s) => Ok(s),
            None => Err(ConfigErrors::from_report(report, "<inline>")),
        }
    }

    pub(crate) fn from_builder(
        builder: config::ConfigBuilder<config::builder::DefaultState>,
        fname: &str,
        base: PathBuf,
        secrets: Secrets,
    ) -> (Option<Self>, Report) {
        let mut problems = validate::Problems::new(fname);
        let raw: Option<raw::RawSettings> = match builder.build() {
            Err(e) => {
                problems.error("", e.to_string());
                None
            }
            Ok(cfg) => match serde_path_to_error::deserialize(cfg) {
                Ok(raw) => Some(raw),
                Err(e) => {
                    let path = e.path().to_string();
                    let inner = e.into_inner().to_string();
                    problems.error(&path, yaml_like_hint(&inner));
                    None
                }
            },
        };
        let settings = raw.and_then(|raw| validate::settings(raw, &base, secrets, &mut problems));
        let report = Report {
            errors: problems.errors,
            warnings: problems.warnings,
        };
        (settings.filter(|_| report.errors.is_empty()), report)
    }
}

/// Whether loading reads secrets and private keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Read every client secret and signing key (the service, `config check`).
    Read,
    /// Read none (offline tools run where the secrets are not available).
    Skip,
    /// Read the client secrets but not the signing keys (`keycloak apply` sets each
    /// `client_secret_basic` client's secret in Keycloak to the configured one).
    ClientSecrets,
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

/// `p` relative to the configuration file's directory `base`, unless absolute.
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
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

    fn load(text: &str) -> Result<Settings, ConfigErrors> {
        Settings::from_toml_str(text, Path::new("."))
    }

    /// Found by the newcomer review of issue 19: an out-of-range
    /// `reopen_interval_ms` was clamped silently, and a too large
    /// `reconnect_max_ms` was reported under `reconnect_min_ms`.
    #[test]
    fn day2_intervals_out_of_range_are_refused_under_their_own_key() {
        for (extra, key) in [
            ("[audit]\nreopen_interval_ms = 5\n", "`audit.reopen_interval_ms`"),
            ("[audit]\nreopen_interval_ms = 60001\n", "`audit.reopen_interval_ms`"),
            (
                "[limits]\nstore = \"redis\"\n[limits.redis]\nurl_env = \"PATH\"\nreconnect_max_ms = 60001\n",
                "`limits.redis.reconnect_max_ms`",
            ),
            (
                "[limits]\nstore = \"redis\"\n[limits.redis]\nurl_env = \"PATH\"\nreconnect_min_ms = 300\nreconnect_max_ms = 200\n",
                "`limits.redis.reconnect_min_ms`",
            ),
        ] {
            let e = load(&format!("{}{extra}", toml(""))).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
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

    /// Issue #7 §2: the workspace UUID where Bitbucket puts the slug.
    #[test]
    fn issuer_with_the_workspace_uuid_instead_of_the_slug_is_refused() {
        for form in [format!("{{{W}}}"), W.to_string(), format!("%7B{W}%7D")] {
            let e = load(&toml(&format!(
                "issuer = \"https://api.bitbucket.org/2.0/workspaces/{form}/pipelines-config/identity/oidc\""
            )))
            .unwrap_err();
            assert_eq!(e.key, "workspaces[0].issuer", "{e}");
            assert!(
                e.reason
                    .contains("UUID where Bitbucket puts the workspace slug")
                    && e.reason.contains("/workspaces/acme/"),
                "{e}"
            );
        }
    }

    #[test]
    fn issuers_bitbucket_never_uses_are_refused() {
        for (issuer, says) in [
            (
                "https://api.bitbucket.org/2.0/workspaces/other/pipelines-config/identity/oidc",
                "names workspace `other`",
            ),
            (
                "https://bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc",
                "not on api.bitbucket.org",
            ),
            (
                "https://API.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc",
                "normal form",
            ),
            (
                "https://api.bitbucket.org:443/2.0/workspaces/acme/pipelines-config/identity/oidc",
                "normal form",
            ),
            (
                "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity",
                "not a Bitbucket issuer",
            ),
            ("https://issuer.example.test/oidc", "not a Bitbucket issuer"),
        ] {
            let e = load(&toml(&format!("issuer = \"{issuer}\""))).unwrap_err();
            assert_eq!(e.key, "workspaces[0].issuer", "{issuer}: {e}");
            assert!(e.reason.contains(says), "{issuer}: {e}");
        }
        let ok = load(&toml(
            "issuer = \"https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc\"",
        ));
        assert!(ok.is_ok());
    }

    #[test]
    fn loopback_test_issuers_of_another_shape_are_accepted_with_a_warning() {
        let (_, report) = check_text(&toml(&format!(
            "issuer = \"http://127.0.0.1:9/2.0/workspaces/{{{W}}}/pipelines-config/identity/oidc\""
        )));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(report.warnings[0].reason.contains("workspace UUID"));
        let (_, report) = check_text(&toml(
            "issuer = \"http://127.0.0.1:9/2.0/workspaces/acme/pipelines-config/identity/oidc\"",
        ));
        assert!(report.errors.is_empty() && report.warnings.is_empty());
    }

    #[test]
    fn slugs_follow_bitbucket_workspace_ids() {
        for (slug, says) in [
            (format!("{{{W}}}"), "is a UUID"),
            (W.to_string(), "is a UUID"),
            ("Acme".to_string(), "lowercase"),
            ("ac me".to_string(), "lowercase"),
        ] {
            let e = load(&toml("").replace("slug = \"acme\"", &format!("slug = \"{slug}\"")))
                .unwrap_err();
            assert_eq!(e.key, "workspaces[0].slug", "{slug}: {e}");
            assert!(e.reason.contains(says), "{slug}: {e}");
        }
    }

    #[test]
    fn audiences_keep_bitbucket_limits() {
        let long = "a".repeat(151);
        let e = load(&toml(&format!("audiences = [\"{long}\"]"))).unwrap_err();
        assert!(e.reason.contains("150"), "{e}");
        let e = load(&toml("audiences = [\" https://sts.example.test\"]")).unwrap_err();
        assert!(e.reason.contains("white space"), "{e}");
        let many: Vec<String> = (0..11)
            .map(|i| format!("\"https://a{i}.example\""))
            .collect();
        let (s, report) = check_text(&toml(&format!("audiences = [{}]", many.join(", "))));
        assert!(s.is_some());
        assert!(
            report.warnings[0].reason.contains("at most 10"),
            "{:?}",
            report.warnings
        );
    }

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        let text = toml("algorithm = \"HS256\"")
            .replace("slug = \"acme\"", "slug = \"ACME\"")
            .replace("realm = \"ci\"", "realm = \"c i\"")
            + "\nclock_leeway_seconds = 999\n";
        // top-level keys must come first in TOML; move the last line up
        let text = format!(
            "clock_leeway_seconds = 999\n{}",
            text.replace("\nclock_leeway_seconds = 999\n", "")
        );
        let (s, report) = check_text(&text);
        assert!(s.is_none());
        let keys: Vec<&str> = report.errors.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "clock_leeway_seconds",
            "workspaces[0].slug",
            "workspaces[0].algorithm",
            "keycloak.realm",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn subject_token_lifetime_defaults_to_a_day_and_is_bounded() {
        let s = load(&toml("")).unwrap();
        assert_eq!(s.max_subject_token_lifetime, Duration::from_secs(86_400));
        let e = load(&format!(
            "max_subject_token_lifetime_seconds = 10\n{}",
            toml("")
        ))
        .unwrap_err();
        assert_eq!(e.key, "max_subject_token_lifetime_seconds");
    }

    /// Values Bitbucket could never send, found by the outsider round.
    #[test]
    fn more_values_bitbucket_never_sends_are_refused_or_warned() {
        let e = load(&toml("algorithm = \"PS256\"")).unwrap_err();
        assert_eq!(e.key, "workspaces[0].algorithm");
        assert!(e.reason.contains("RS256 only"), "{e}");
        assert!(load(&toml("issuer = \"http://127.0.0.1:9/2.0/workspaces/acme/pipelines-config/identity/oidc\"\nalgorithm = \"ES256\"")).is_ok());
        let e = load(&toml("").replace(
            "slug = \"acme\"",
            "slug = \"03b741e3cf4a41f99a59cec52e21bdc3\"",
        ))
        .unwrap_err();
        assert!(e.reason.contains("is a UUID"), "{e}");
        let e = load(&toml("").replace(
            &format!("{{{W}}}"),
            "{00000000-0000-0000-0000-000000000000}",
        ))
        .unwrap_err();
        assert_eq!(e.key, "workspaces[0].uuid");
        let e = load(&toml("audiences = [\"\u{200B}https://sts.example.test\"]")).unwrap_err();
        assert!(e.reason.contains("invisible"), "{e}");
        let e = load(&toml(&format!(
            "audiences = [\"ARI:cloud:bitbucket::workspace/{W}\"]"
        )))
        .unwrap_err();
        assert!(e.reason.contains("lower case"), "{e}");
        let (s, report) = check_text(&toml(&format!(
            "audiences = [\"ari:cloud:bitbucket::workspace/{W}\"]"
        )));
        assert!(s.is_some());
        assert!(
            report.warnings[0]
                .reason
                .contains("accept_default_audience"),
            "{:?}",
            report.warnings
        );
    }

    fn check_text(text: &str) -> (Option<Settings>, Report) {
        let builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml));
        Settings::from_builder(builder, "<inline>", PathBuf::from("."), Secrets::Read)
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

    /// Found by the `configuration` fuzz target (`checked-deterministically`):
    /// with an unknown key in two tables, which one `config check` named
    /// depended on hash-map order, so two runs could report different problems.
    #[test]
    fn the_same_file_always_gets_the_same_report() {
        let text = "[keycloak]\nbase_url = \"http://127.0.0.1:8080\"\nrealm = \"ci\"\nnope = 1\n[keycloak.clients.a]\nmethod = \"client_secret_basic\"\nsecret_env = \"PATH\"\nlisten = 2\n[audit]\nzzz = 3\n[limits]\naaa = 4\n";
        let report = |_| {
            let builder = config::Config::builder()
                .add_source(config::File::from_str(text, config::FileFormat::Toml));
            let (_, r) = Settings::from_builder(builder, "t", PathBuf::from("/"), Secrets::Skip);
            format!("{:?}", r.errors)
        };
        let first = report(0);
        for i in 1..20 {
            assert_eq!(report(i), first);
        }
    }

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
