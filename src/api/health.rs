//! Health and key publication endpoints.

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::state::AppState;

/// `GET /healthz`: 200 `{"status":"ok"}` while the process serves.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when policies are loaded and Keycloak's realm discovery
/// document answers now (fetched on every probe, within Keycloak's timeouts);
/// otherwise 503 with the failing check.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let policies = state.exchange.policies.current().policies().len();
    match state.exchange.keycloak.check_discovery().await {
        Ok(_) => HttpResponse::Ok()
            .json(json!({"status": "ready", "policies": policies, "keycloak": "ok"})),
        Err(e) => {
            tracing::warn!(error = %crate::telemetry::chain(&e), "readiness: Keycloak discovery failed");
            HttpResponse::ServiceUnavailable()
                .insert_header(("Retry-After", "5"))
                .json(json!({"status": "not_ready", "policies": policies, "keycloak": e.code()}))
        }
    }
}

/// `GET /.well-known/jwks.json`: public keys that sign our client assertions;
/// the Keycloak clients' "JWKS URL" points here.
pub async fn jwks(state: web::Data<AppState>) -> HttpResponse {
    let body = state.signing.as_ref().map(|k| k.jwks()).unwrap_or_default();
    HttpResponse::Ok()
        .insert_header(("Cache-Control", "public, max-age=60"))
        .json(body)
}

/// `GET /.well-known/identity-jwks.json`: public keys that sign repository
/// assertions (JWT Authorization Grant); the Keycloak identity provider's
/// `jwksUrl` points here. 404 without `[identity]`. Separate from the client
/// assertion keys, so that neither key is accepted in the other's place.
pub async fn identity_jwks(state: web::Data<AppState>) -> HttpResponse {
    match state.exchange.keycloak.identity_jwks() {
        Some(body) => HttpResponse::Ok()
            .insert_header(("Cache-Control", "public, max-age=60"))
            .json(body),
        None => HttpResponse::NotFound()
            .json(json!({"error": "not_found", "error_description": "no [identity] configured"})),
    }
}

/// `GET /metrics`: Prometheus text exposition format (version 0.0.4).
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
