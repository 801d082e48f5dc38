//! Wiring: builds the application state from validated [`Settings`], binds the
//! listener (port 0 allowed; the bound port is reported) and runs the server.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use arc_swap::ArcSwap;
use tracing_actix_web::TracingLogger;

use crate::configuration::Settings;
use crate::keycloak::KeycloakClient;
use crate::policy::PolicySet;
use crate::signing::SigningKeys;
use crate::telemetry::AuditSink;
use crate::verify::jwks::KeyCache;
use crate::verify::Verifier;

/// Shared state of all workers.
pub struct AppState {
    /// Bitbucket token verifier.
    pub verifier: Verifier,
    /// Compiled policies (swappable as a whole).
    pub policies: ArcSwap<PolicySet>,
    /// Keycloak client.
    pub keycloak: KeycloakClient,
    /// Our signing keys (published at `/.well-known/jwks.json`).
    pub signing: Option<Arc<SigningKeys>>,
    /// Audit sink.
    pub audit: AuditSink,
    /// Metrics registry.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Per-identity limiter.
    pub limiter: Arc<dyn crate::limits::ExchangeLimiter>,
    /// Default limits.
    pub limits: crate::configuration::Limits,
    /// Policies directory (for reloads).
    pub policies_dir: std::path::PathBuf,
    /// Configured Keycloak client ids (policies are checked against them).
    pub known_clients: std::collections::BTreeSet<String>,
    /// Largest `/token` body, bytes (`max_token_bytes` + 4096).
    pub max_body_bytes: usize,
}

/// Startup failures (configuration is validated before this).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Policies did not compile; every problem is listed.
    #[error("policies did not compile:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Policies(Vec<crate::policy::PolicyError>),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("HTTP client")]
    Http(#[from] reqwest::Error),
    /// Metrics registration failed.
    #[error("metrics")]
    Metrics(#[from] prometheus::Error),
    /// The audit file could not be opened.
    #[error("cannot open audit file {path} (`audit.path`)")]
    Audit {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A built, not yet running, application.
pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
    watch: bool,
}

impl Application {
    /// Builds state, compiles policies, binds `settings.listen`.
    ///
    /// # Errors
    /// [`StartupError`].
    pub fn build(settings: Settings) -> Result<Self, StartupError> {
        let listen = settings.listen.clone();
        let grace = settings.shutdown_grace;
        let watch = settings.watch_policies;
        let state = build_state(settings)?;
        let bind_err = |source| StartupError::Bind {
            addr: listen.clone(),
            source,
        };
        let listener = TcpListener::bind(&listen).map_err(bind_err)?;
        let port = listener.local_addr().map_err(bind_err)?.port();
        let state = web::Data::new(state);
        let reload_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .wrap_fn(crate::api::add_request_id_header)
                .wrap(TracingLogger::<crate::api::StsRootSpan>::new())
                .app_data(state.clone())
                .configure(crate::api::configure)
        })
        .shutdown_timeout(grace.as_secs())
        .listen(listener)
        .map_err(bind_err)?
        .run();
        tracing::info!(port, "listening");
        Ok(Self {
            port,
            server,
            state: reload_state,
            watch,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs until stopped: on SIGTERM or SIGINT the server stops accepting, lets
    /// in-flight exchanges finish within `shutdown_grace_seconds`, then returns.
    /// Policies reload on SIGHUP and on changes meanwhile.
    ///
    /// # Errors
    /// I/O errors of the server.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let reloader = tokio::spawn(crate::reload::run(self.state.clone(), self.watch));
        let result = self.server.await;
        reloader.abort();
        tracing::info!("stopped");
        result
    }
}

/// Builds the shared state: compiles policies (against the configured clients),
/// creates HTTP clients, caches and the audit sink.
///
/// # Errors
/// [`StartupError`].
pub fn build_state(settings: Settings) -> Result<AppState, StartupError> {
    let known: std::collections::BTreeSet<String> =
        settings.keycloak.clients.keys().cloned().collect();
    let policies = PolicySet::load_dir(&settings.policies_dir, Some(&known))
        .map_err(StartupError::Policies)?;
    for w in policies.warnings() {
        tracing::warn!(warning = %w, "policy warning");
    }
    if policies.policies().is_empty() {
        tracing::warn!(dir = %settings.policies_dir.display(), "no policies: every exchange will be denied");
    }
    let metrics = Arc::new(crate::metrics::Metrics::new()?);
    let jwks_http = crate::http::client(settings.jwks.timeout, settings.jwks.timeout)?;
    let keys = Arc::new(KeyCache::new(
        jwks_http,
        settings.jwks.clone(),
        metrics.clone(),
    ));
    let verifier = Verifier::new(
        settings.workspaces,
        keys,
        crate::verify::TokenRules {
            leeway: settings.clock_leeway,
            max_token_bytes: settings.max_token_bytes,
            max_lifetime: settings.max_subject_token_lifetime,
        },
    );
    let kc_http =
        crate::http::client(settings.keycloak.connect_timeout, settings.keycloak.timeout)?;
    let signing = settings.signing.map(Arc::new);
    let keycloak =
        KeycloakClient::new(kc_http, settings.keycloak, signing.clone(), metrics.clone());
    let audit = match &settings.audit_path {
        Some(p) => AuditSink::file(p, settings.audit_queue_capacity).map_err(|source| {
            StartupError::Audit {
                path: p.display().to_string(),
                source,
            }
        })?,
        None => AuditSink::stdout(settings.audit_queue_capacity).map_err(|source| {
            StartupError::Audit {
                path: "standard output".into(),
                source,
            }
        })?,
    };
    Ok(AppState {
        verifier,
        policies: ArcSwap::from_pointee(policies),
        keycloak,
        signing,
        audit,
        metrics,
        limiter: Arc::new(crate::limits::InMemoryLimiter::default()),
        limits: settings.limits,
        policies_dir: settings.policies_dir,
        known_clients: known,
        max_body_bytes: settings.max_token_bytes + 4096,
    })
}
