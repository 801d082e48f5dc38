//! Wiring: builds the application state from validated [`Settings`], binds the
//! listener (port 0 allowed; the bound port is reported) and runs the server.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use tracing_actix_web::TracingLogger;

use crate::audit::AuditSink;
use crate::configuration::Settings;
use crate::exchange::Exchange;
use crate::keycloak::KeycloakClient;
use crate::policy::PolicyStore;
pub use crate::state::AppState;
use crate::verify::jwks::KeyCache;
use crate::verify::Verifier;

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
    /// The limit store could not be set up (`[limits.redis]`).
    #[error("limit store: {0}")]
    LimitStore(String),
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
    admin_port: Option<u16>,
    server: Server,
    admin: Option<Server>,
    state: web::Data<AppState>,
    reload: crate::reload::ReloadSettings,
    audit_every: std::time::Duration,
    /// SIGHUP, listened to from before the `listening` line: a SIGHUP (logrotate)
    /// during startup must not end the process (its default action).
    hup: Option<tokio::signal::unix::Signal>,
    /// SIGHUP for the policy reload, listened to from before the startup read:
    /// one received while the policies are compiled reloads them once running.
    policy_hup: Option<tokio::signal::unix::Signal>,
}

impl Application {
    /// Builds state, compiles policies, binds `settings.listen`.
    ///
    /// # Errors
    /// [`StartupError`].
    pub fn build(settings: Settings) -> Result<Self, StartupError> {
        let listen = settings.listen.clone();
        let admin_listen = settings.admin_listen.clone();
        let grace = settings.shutdown_grace;
        let reload = crate::reload::ReloadSettings {
            watch: settings.watch_policies,
            poll: settings.policy_poll,
            settle: settings.policy_settle,
        };
        let audit_every = settings.audit_reopen_interval;
        let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the audit file is still reopened when renamed");
                None
            }
        };
        let policy_hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; policies still reload on changes");
                None
            }
        };
        let state = build_state(settings)?;
        let bind_err = |source| StartupError::Bind {
            addr: listen.clone(),
            source,
        };
        let listener = TcpListener::bind(&listen).map_err(bind_err)?;
        let port = listener.local_addr().map_err(bind_err)?.port();
        let state = web::Data::new(state);
        let reload_state = state.clone();
        let split = admin_listen.is_some();
        let public_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .wrap_fn(crate::api::add_request_id_header)
                .wrap(TracingLogger::<crate::api::StsRootSpan>::new())
                .app_data(public_state.clone())
                .configure(if split {
                    crate::api::configure_public
                } else {
                    crate::api::configure
                })
        })
        .shutdown_timeout(grace.as_secs())
        .listen(listener)
        .map_err(bind_err)?
        .run();
        let (admin, admin_port) = match admin_listen {
            None => (None, None),
            Some(addr) => {
                let bind_err = |source| StartupError::Bind {
                    addr: addr.clone(),
                    source,
                };
                let l = TcpListener::bind(&addr).map_err(bind_err)?;
                let admin_port = l.local_addr().map_err(bind_err)?.port();
                let admin_state = state.clone();
                let s = HttpServer::new(move || {
                    App::new()
                        .wrap_fn(crate::api::add_request_id_header)
                        .app_data(admin_state.clone())
                        .configure(crate::api::configure_admin)
                })
                .workers(1)
                .shutdown_timeout(grace.as_secs())
                .listen(l)
                .map_err(bind_err)?
                .run();
                (Some(s), Some(admin_port))
            }
        };
        match admin_port {
            Some(admin_port) => tracing::info!(port, admin_port, "listening"),
            None => tracing::info!(port, "listening"),
        }
        Ok(Self {
            port,
            admin_port,
            server,
            admin,
            state: reload_state,
            reload,
            audit_every,
            hup,
            policy_hup,
        })
    }

    /// Startup checks against Keycloak: a client using the JWT Authorization
    /// Grant needs a realm that supports it.
    ///
    /// # Errors
    /// [`crate::keycloak::KeycloakError::JwtGrantUnsupported`].
    pub async fn check_upstream(&self) -> Result<(), crate::keycloak::KeycloakError> {
        self.state.exchange.keycloak.check_grant_support().await
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of `admin_listen`, when set.
    pub fn admin_port(&self) -> Option<u16> {
        self.admin_port
    }

    /// Runs until stopped: on SIGTERM or SIGINT the server stops accepting, lets
    /// in-flight exchanges finish within `shutdown_grace_seconds`, then returns.
    /// Policies reload on SIGHUP and on changes meanwhile; SIGHUP also reopens
    /// the audit file (its own listener, see `audit_upkeep`).
    ///
    /// # Errors
    /// I/O errors of the server.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let reloader = tokio::spawn(crate::reload::run(
            self.state.clone(),
            self.reload,
            self.policy_hup,
        ));
        let audit = tokio::spawn(audit_upkeep(self.state.clone(), self.audit_every, self.hup));
        let result = match self.admin {
            None => self.server.await,
            // Both stop on SIGTERM/SIGINT (each server handles the signals).
            Some(admin) => futures_util::future::try_join(self.server, admin)
                .await
                .map(|((), ())| ()),
        };
        reloader.abort();
        audit.abort();
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
    let known = settings.keycloak.clients.keys().cloned().collect();
    let policies = PolicyStore::load(
        &settings.policies_dir,
        known,
        settings.keycloak.jwt_clients(),
        settings.protections.clone(),
    )
    .map_err(StartupError::Policies)?;
    let current = policies.current();
    let accepted: Vec<String> = settings
        .workspaces
        .iter()
        .flat_map(|w| w.audiences.iter().cloned())
        .collect();
    for w in current
        .warnings()
        .into_iter()
        .chain(current.marker_audience_warnings(&accepted))
    {
        tracing::warn!(warning = %w, "policy warning");
    }
    if current.policies().is_empty() {
        tracing::warn!(dir = %settings.policies_dir.display(), "no policies: every exchange will be denied");
    }
    let metrics = Arc::new(crate::metrics::Metrics::new()?);
    tracing::info!(policies = current.policies().len(), digest = %current.digest(), "policies loaded");
    metrics.set_policy_digest(current.digest());
    let audit = audit_sink(&settings, &metrics)?;
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
    let kc_http = crate::http::PerThreadClient::new(
        settings.keycloak.connect_timeout,
        settings.keycloak.timeout,
    )?;
    let signing = settings.signing.map(Arc::new);
    let keycloak =
        KeycloakClient::new(kc_http, settings.keycloak, signing.clone(), metrics.clone());
    Ok(AppState {
        exchange: Exchange {
            verifier,
            policies: Arc::new(policies),
            keycloak,
            limiter: limiter(settings.limit_store, &metrics)?,
            limits: settings.limits,
            audit,
            metrics: metrics.clone(),
        },
        signing,
        metrics,
        max_body_bytes: settings.max_token_bytes + 4096,
        body_timeout: settings.body_timeout,
    })
}

/// The limiter of `[limits] store`: in memory, or Redis with its store errors
/// counted in `sts_limit_store_errors_total` and its connection attempts in
/// `sts_limit_store_reconnects_total`.
fn limiter(
    store: crate::configuration::LimitStore,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<Arc<dyn crate::limits::ExchangeLimiter>, StartupError> {
    Ok(match store {
        crate::configuration::LimitStore::Memory => {
            Arc::new(crate::limits::InMemoryLimiter::default())
        }
        crate::configuration::LimitStore::Redis(r) => {
            let m = metrics.clone();
            let hook: crate::limits::StoreEventHook = Arc::new(move |event| match event {
                crate::limits::StoreEvent::Error(on) => {
                    let label = match on {
                        crate::limits::OnStoreError::Deny => "deny",
                        crate::limits::OnStoreError::Local => "local",
                    };
                    m.limit_store_errors.with_label_values(&[label]).inc();
                }
                crate::limits::StoreEvent::Reconnect(result) => m
                    .limit_store_reconnects
                    .with_label_values(&[result.as_str()])
                    .inc(),
            });
            Arc::new(crate::limits::RedisLimiter::new(r, hook).map_err(StartupError::LimitStore)?)
        }
    })
}

/// The audit sink of `[audit]`, reporting reopens, availability and lost
/// denial lines to the metrics (`sts_audit_reopens_total`,
/// `sts_audit_available`, `sts_audit_failures_total`).
fn audit_sink(
    settings: &Settings,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<AuditSink, StartupError> {
    let (reopens, available, lost) = (
        metrics.audit_reopens.clone(),
        metrics.audit_available.clone(),
        metrics.audit_failures.clone(),
    );
    let hooks = crate::audit::AuditHooks {
        reopened: Arc::new(move |r: crate::audit::ReopenReason| {
            reopens.with_label_values(&[r.as_str()]).inc();
        }),
        availability: Arc::new(move |up| available.set(i64::from(up))),
        lost: Arc::new(move |outcome| lost.with_label_values(&[outcome]).inc()),
    };
    let path = settings.audit_path.as_deref();
    let opened = match path {
        Some(p) => AuditSink::file(
            p,
            &crate::audit::FileOptions {
                queue: settings.audit_queue_capacity,
                fsync: settings.audit_fsync,
                retry: settings.audit_reopen_interval,
                hooks,
            },
        ),
        None => AuditSink::stdout(settings.audit_queue_capacity, hooks),
    };
    opened.map_err(|source| StartupError::Audit {
        path: path.map_or_else(|| "standard output".into(), |p| p.display().to_string()),
        source,
    })
}

/// The audit file's upkeep, independent of the policy reload (a failed or
/// slow reload never delays a reopen): SIGHUP reopens the audit file
/// (logrotate's `postrotate kill -HUP`), and every `every` the inline file is
/// checked for a rotation and, while unavailable, opened again.
async fn audit_upkeep(
    state: web::Data<AppState>,
    every: std::time::Duration,
    mut hup: Option<tokio::signal::unix::Signal>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reopening the audit file");
                state.exchange.audit.reopen();
            }
            _ = tick.tick() => state.exchange.audit.maintain(),
        }
    }
}
