//! HTTP surface: thin actix handlers over [`crate::exchange`].
//!
//! | route | answer |
//! |---|---|
//! | `POST /token` | RFC 8693 token exchange |
//! | `POST /grants` | what the caller's identity may obtain (no Keycloak call) |
//! | `GET /.well-known/jwks.json` | the service's public signing keys (RFC 7517) |
//! | `GET /.well-known/identity-jwks.json` | the keys of repository assertions (JWT Authorization Grant) |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 when policies are loaded (not tied to Keycloak or Redis) |
//! | `GET /upstreamz` | 200 when Keycloak's discovery and the limit store answer, else 503 |
//! | `GET /metrics` | Prometheus text exposition |

pub mod error;
mod grants;
mod health;
mod token;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use tracing::Span;
use tracing_actix_web::{RequestId, RootSpanBuilder};

pub use error::{all_codes, ApiCode, ApiError};

/// Registers every route (one listener serves all).
pub fn configure(cfg: &mut web::ServiceConfig) {
    routes_public(cfg);
    routes_admin(cfg);
    cfg.default_service(web::to(not_found));
}

/// The public listener when `admin_listen` is set: what pipelines and Keycloak
/// need (`/token`, `/grants`, the JWKS), nothing else.
pub fn configure_public(cfg: &mut web::ServiceConfig) {
    routes_public(cfg);
    cfg.default_service(web::to(not_found));
}

/// The `admin_listen` listener: metrics and probes, for the cluster only.
pub fn configure_admin(cfg: &mut web::ServiceConfig) {
    routes_admin(cfg);
    cfg.default_service(web::to(not_found));
}

fn routes_public(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/token")
            .route(web::post().to(token::exchange))
            .route(web::route().to(method_not_allowed)),
    )
    .service(
        web::resource("/grants")
            .route(web::post().to(grants::list))
            .route(web::route().to(method_not_allowed)),
    )
    .route("/.well-known/jwks.json", web::get().to(health::jwks))
    .route(
        crate::keycloak::IDENTITY_JWKS_PATH,
        web::get().to(health::identity_jwks),
    );
}

fn routes_admin(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/upstreamz", web::get().to(health::upstreamz))
        .route("/metrics", web::get().to(health::metrics));
}

/// The exchange context of a request: its id and TCP peer.
pub fn context(req: &HttpRequest) -> crate::exchange::Context {
    crate::exchange::Context {
        request_id: request_id(req),
        client_address: req.peer_addr().map(|a| a.to_string()),
    }
}

/// The request id assigned by the tracing middleware (a UUID v4).
pub fn request_id(req: &HttpRequest) -> String {
    req.extensions()
        .get::<RequestId>()
        .map(|r| r.to_string())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    ApiError::new(
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
        crate::domain::OAuthError::InvalidRequest,
        ApiCode::MethodNotAllowed.as_str(),
        "use POST with an application/x-www-form-urlencoded body",
    )
    .to_response(&request_id(&req))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::new(
        actix_web::http::StatusCode::NOT_FOUND,
        crate::domain::OAuthError::InvalidRequest,
        ApiCode::NotFound.as_str(),
        "no such endpoint",
    )
    .to_response(&request_id(&req))
}

/// Middleware body: copies the request id into an `x-request-id` response header.
pub fn add_request_id_header<S, B>(
    req: ServiceRequest,
    srv: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse<B>, actix_web::Error>>
where
    S: actix_web::dev::Service<
        ServiceRequest,
        Response = ServiceResponse<B>,
        Error = actix_web::Error,
    >,
{
    let rid = req.extensions().get::<RequestId>().map(|r| r.to_string());
    let fut = srv.call(req);
    async move {
        let mut res = fut.await?;
        if let Some(v) = rid.and_then(|r| actix_web::http::header::HeaderValue::from_str(&r).ok()) {
            res.headers_mut().insert(
                actix_web::http::header::HeaderName::from_static("x-request-id"),
                v,
            );
        }
        Ok(res)
    }
}

/// Root span per request: method, path (only the service's own paths; never the
/// query string or another path, which could carry a credential), request id,
/// status. Emits one `request completed` event.
pub struct StsRootSpan;

impl RootSpanBuilder for StsRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let rid = request
            .extensions()
            .get::<RequestId>()
            .map(|r| r.to_string())
            .unwrap_or_default();
        // Only the service's own paths are logged: a client could put a token in
        // any other path.
        let path = match request.path() {
            p @ ("/token"
            | "/grants"
            | "/.well-known/jwks.json"
            | "/.well-known/identity-jwks.json"
            | "/healthz"
            | "/readyz"
            | "/upstreamz"
            | "/metrics") => p,
            _ => "(another path, not logged)",
        };
        tracing::info_span!(
            "http_request",
            http.method = %request.method(),
            http.path = %path,
            request_id = %rid,
            http.status_code = tracing::field::Empty,
        )
    }

    fn on_request_end<B: MessageBody>(
        span: Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        let status = match outcome {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.as_response_error().status_code().as_u16(),
        };
        span.record("http.status_code", status);
        let _g = span.enter();
        if status >= 500 {
            tracing::warn!(status, "request completed");
        } else {
            tracing::info!(status, "request completed");
        }
    }
}
