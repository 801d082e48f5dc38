//! Prometheus metrics, served at `GET /metrics` in the text exposition format.
//! One registry per application (no global state). Names follow Prometheus
//! conventions: base units (`_seconds`), counters end in `_total`. Label values
//! are bounded: outcomes, stable error codes, policy ids, configured issuers,
//! HTTP status codes.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: 100 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// `sts_policy_set_info{digest}`, read at each scrape from the digest last
/// stored: a scrape sees exactly one series, never none or two, however a
/// reload interleaves with it (a reset-then-set gauge showed none in between),
/// and the reload thread, which runs at idle priority, holds no lock a scrape
/// could wait on.
#[derive(Clone)]
pub struct PolicySetInfo {
    desc: prometheus::core::Desc,
    digest: Arc<ArcSwap<String>>,
}

impl PolicySetInfo {
    const NAME: &'static str = "sts_policy_set_info";
    const HELP: &'static str = "The digest of the active policy set (sha256 over the sorted relative paths, sizes and content sha256s).";

    fn new() -> prometheus::Result<Self> {
        let desc = prometheus::core::Desc::new(
            Self::NAME.into(),
            Self::HELP.into(),
            vec!["digest".into()],
            Default::default(),
        )?;
        Ok(Self {
            desc,
            digest: Arc::new(ArcSwap::from_pointee(String::new())),
        })
    }
}

impl prometheus::core::Collector for PolicySetInfo {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let digest = self.digest.load_full();
        if digest.is_empty() {
            return Vec::new();
        }
        // A gauge built for this scrape alone, from the one stored value.
        let Ok(gauge) =
            prometheus::IntGaugeVec::new(Opts::new(Self::NAME, Self::HELP), &["digest"])
        else {
            return Vec::new();
        };
        gauge.with_label_values(&[digest.as_str()]).set(1);
        prometheus::core::Collector::collect(&gauge)
    }
}

/// All metrics of the service.
pub struct Metrics {
    registry: Registry,
    /// `sts_exchanges_total{outcome, error_code, policy}`: decisions on `POST /token`.
    pub exchanges: IntCounterVec,
    /// `sts_grants_requests_total{outcome, error_code}`: answers of `POST /grants`.
    pub grants: IntCounterVec,
    /// `sts_exchanges_by_repository_total{repository, outcome}`: decisions per
    /// verified repository, by `full_name` where the inventory knows it, else its UUID.
    pub exchanges_by_repository: IntCounterVec,
    /// `sts_exchange_phase_duration_seconds{phase}`: `verify`, `policy`, `keycloak`, `total`.
    pub phase_seconds: HistogramVec,
    /// `sts_jwks_fetches_total{issuer, result}`: key set fetches (`ok`, `error`).
    pub jwks_fetches: IntCounterVec,
    /// `sts_jwks_cache_lookups_total{result}`: `hit`, `miss` (fetched), `stale` (outage), `unknown_kid`.
    pub jwks_cache: IntCounterVec,
    /// `sts_keycloak_responses_total{status}`: HTTP status of token requests (`error` for transport failures).
    pub keycloak_responses: IntCounterVec,
    /// `sts_policy_reloads_total{result}`: `ok`, `error`, `unsettled` (a file or
    /// the directory's target changed between the two reads; retried).
    pub policy_reloads: IntCounterVec,
    /// `sts_policy_reload_duration_seconds`: an applied reload's read, compile
    /// (index included) and swap, without the settle delay between the reads.
    pub policy_reload_seconds: prometheus::Histogram,
    /// `sts_rate_limited_total{limit}`: refusals by `step` or `repository` limit.
    pub rate_limited: IntCounterVec,
    /// `sts_upstream_up{upstream}`: 1 when `keycloak` / `limit_store` answered
    /// the last probe (`/upstreamz`, and every 10 s), else 0.
    pub upstream_up: prometheus::IntGaugeVec,
    /// `sts_limit_store_errors_total{on_store_error}`: requests the shared limit
    /// store (Redis) could not count, by what happened instead (`deny`, `local`).
    pub limit_store_errors: IntCounterVec,
    /// `sts_audit_failures_total{outcome}`: audit lines that could not be queued
    /// (for `allowed`, the token was withheld instead).
    pub audit_failures: IntCounterVec,
    /// `sts_policy_set_info{digest}`: 1 for the digest of the active policy set
    /// (one series; replaced at each applied reload).
    pub policy_set: PolicySetInfo,
    /// `sts_limit_store_reconnects_total{result}`: connection attempts to the
    /// shared limit store (Redis): `ok`, `error` (refused or no answer in
    /// time), `refused` (the URL from `url_file` unreadable or failing the checks).
    pub limit_store_reconnects: IntCounterVec,
    /// `sts_audit_reopens_total{reason}`: audit file reopens (`signal`,
    /// `rotated`, `reader_gone`, `retry`).
    pub audit_reopens: IntCounterVec,
    /// `sts_audit_available`: 1 while the audit destination is open, else 0
    /// (tokens are withheld).
    pub audit_available: prometheus::IntGauge,
    /// The series every exchange touches, resolved once (a label lookup hashes
    /// the label values on each call).
    hot: HotSeries,
}

/// Series resolved at startup: `phase_seconds` by phase, the key cache hit
/// counter and Keycloak's 200 answers.
struct HotSeries {
    verify: prometheus::Histogram,
    policy: prometheus::Histogram,
    keycloak: prometheus::Histogram,
    total: prometheus::Histogram,
    jwks_hit: prometheus::IntCounter,
    keycloak_200: prometheus::IntCounter,
}

impl Metrics {
    /// Creates and registers every metric (plus process metrics on Linux).
    ///
    /// # Errors
    /// A registration conflict (a programming error, caught at startup).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let exchanges = counter(
            "sts_exchanges_total",
            "Token exchange decisions by outcome, error code and policy.",
            &["outcome", "error_code", "policy"],
        )?;
        let upstream_up = prometheus::IntGaugeVec::new(
            Opts::new(
                "sts_upstream_up",
                "1 when the upstream (keycloak, limit_store) answered the last probe, else 0.",
            ),
            &["upstream"],
        )?;
        registry.register(Box::new(upstream_up.clone()))?;
        let limit_store_errors = counter(
            "sts_limit_store_errors_total",
            "Requests the shared limit store (Redis) could not count, by on_store_error (deny, local).",
            &["on_store_error"],
        )?;
        let grants = counter(
            "sts_grants_requests_total",
            "Grant listings (POST /grants) by outcome and error code.",
            &["outcome", "error_code"],
        )?;
        let exchanges_by_repository = counter(
            "sts_exchanges_by_repository_total",
            "Token exchange decisions per verified repository (full_name from the inventory, else UUID) and outcome.",
            &["repository", "outcome"],
        )?;
        let jwks_fetches = counter(
            "sts_jwks_fetches_total",
            "Issuer key set fetches by issuer and result.",
            &["issuer", "result"],
        )?;
        let jwks_cache = counter(
            "sts_jwks_cache_lookups_total",
            "Issuer key lookups by cache result.",
            &["result"],
        )?;
        let keycloak_responses = counter(
            "sts_keycloak_responses_total",
            "Keycloak token endpoint answers by HTTP status.",
            &["status"],
        )?;
        let policy_reloads = counter(
            "sts_policy_reloads_total",
            "Policy reloads by result.",
            &["result"],
        )?;
        let rate_limited = counter(
            "sts_rate_limited_total",
            "Exchanges refused by a per-identity limit.",
            &["limit"],
        )?;
        let audit_failures = counter(
            "sts_audit_failures_total",
            "Audit lines that could not be queued, by the outcome they recorded.",
            &["outcome"],
        )?;
        let policy_set = PolicySetInfo::new()?;
        registry.register(Box::new(policy_set.clone()))?;
        let limit_store_reconnects = counter(
            "sts_limit_store_reconnects_total",
            "Connection attempts to the shared limit store (Redis) by result (ok, error, refused).",
            &["result"],
        )?;
        let phase_seconds = HistogramVec::new(
            HistogramOpts::new(
                "sts_exchange_phase_duration_seconds",
                "Time spent per exchange phase, in seconds.",
            )
            .buckets(BUCKETS.to_vec()),
            &["phase"],
        )?;
        registry.register(Box::new(phase_seconds.clone()))?;
        let policy_reload_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "sts_policy_reload_duration_seconds",
                "Applied policy reloads: read, compile and swap, in seconds (the settle delay excluded).",
            )
            .buckets(BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(policy_reload_seconds.clone()))?;
        let audit_reopens = counter(
            "sts_audit_reopens_total",
            "Audit file reopens by reason (signal, rotated, reader_gone, retry).",
            &["reason"],
        )?;
        let audit_available = prometheus::IntGauge::new(
            "sts_audit_available",
            "1 while the audit destination is open, else 0 (tokens are withheld).",
        )?;
        registry.register(Box::new(audit_available.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let hot = HotSeries {
            verify: phase_seconds.with_label_values(&["verify"]),
            policy: phase_seconds.with_label_values(&["policy"]),
            keycloak: phase_seconds.with_label_values(&["keycloak"]),
            total: phase_seconds.with_label_values(&["total"]),
            jwks_hit: jwks_cache.with_label_values(&["hit"]),
            keycloak_200: keycloak_responses.with_label_values(&["200"]),
        };
        let metrics = Self {
            registry,
            exchanges,
            grants,
            limit_store_errors,
            upstream_up,
            exchanges_by_repository,
            phase_seconds,
            jwks_fetches,
            jwks_cache,
            keycloak_responses,
            policy_reloads,
            policy_reload_seconds,
            rate_limited,
            audit_failures,
            policy_set,
            limit_store_reconnects,
            audit_reopens,
            audit_available,
            hot,
        };
        metrics.export_known_series();
        Ok(metrics)
    }

    /// Exports every known series from the start (at 0), so that alerts on
    /// `increase()` see the first event.
    fn export_known_series(&self) {
        for r in ["ok", "error", "unsettled"] {
            self.policy_reloads.with_label_values(&[r]);
        }
        for l in ["step", "repository", "grants"] {
            self.rate_limited.with_label_values(&[l]);
        }
        for l in ["deny", "local"] {
            self.limit_store_errors.with_label_values(&[l]);
        }
        for o in ["allowed", "denied", "failed"] {
            self.audit_failures.with_label_values(&[o]);
        }
        for r in ["signal", "rotated", "reader_gone", "retry"] {
            self.audit_reopens.with_label_values(&[r]);
        }
        for r in ["hit", "miss", "stale", "unknown_kid"] {
            self.jwks_cache.with_label_values(&[r]);
        }
        for r in ["ok", "error", "refused"] {
            self.limit_store_reconnects.with_label_values(&[r]);
        }
    }

    /// Shows `digest` as the active policy set's, replacing the previous series.
    pub fn set_policy_digest(&self, digest: &str) {
        self.policy_set.digest.store(Arc::new(digest.to_string()));
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Records one phase duration.
    pub fn observe(&self, phase: &str, started: std::time::Instant) {
        let seconds = started.elapsed().as_secs_f64();
        match phase {
            "verify" => self.hot.verify.observe(seconds),
            "policy" => self.hot.policy.observe(seconds),
            "keycloak" => self.hot.keycloak.observe(seconds),
            "total" => self.hot.total.observe(seconds),
            other => self
                .phase_seconds
                .with_label_values(&[other])
                .observe(seconds),
        }
    }

    /// Counts a key lookup answered from the cache (`jwks_cache{result="hit"}`).
    pub fn jwks_cache_hit(&self) {
        self.hot.jwks_hit.inc();
    }

    /// Counts a token request answered with `status` (`keycloak_responses`).
    pub fn keycloak_response(&self, status: u16) {
        if status == 200 {
            self.hot.keycloak_200.inc();
        } else {
            self.keycloak_responses
                .with_label_values(&[status.to_string().as_str()])
                .inc();
        }
    }
}
