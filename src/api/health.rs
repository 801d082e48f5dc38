//! Health and key publication endpoints.

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::state::AppState;

/// `GET /healthz`: 200 `{"status":"ok"}` while the process serves.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 `{"status":"ready","policies":N}` once the process can
/// answer: its policies are compiled and loaded (it does not start otherwise)
/// and its audit destination is open. While the audit is unavailable (a FIFO
/// without a reader: every token would be withheld) 503
/// `{"status":"unavailable","reason":"audit.unavailable"}` with `Retry-After`.
/// Deliberately independent of the shared upstreams (Keycloak, Redis): a blip
/// of theirs must not take every replica out of the load balancer at once,
/// which would turn our documented 503 + `Retry-After` into the ingress's own
/// errors and stop a restarting Keycloak from fetching our JWKS. Upstream
/// health is `GET /upstreamz` and the `sts_upstream_up` gauge.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let policies = state.exchange.policies.current().policies().len();
    if !state.exchange.audit.available() {
        return HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "5"))
            .json(json!({"status": "unavailable", "reason": "audit.unavailable", "policies": policies}));
    }
    HttpResponse::Ok().json(json!({"status": "ready", "policies": policies}))
}

/// `GET /upstreamz`: the shared upstreams now: Keycloak's realm discovery
/// (fetched, at most once a second) and the limit store (`memory`, or a Redis
/// `PING`); 200 when all answer, else 503 with `Retry-After` and the failing
/// codes. For dashboards and alerts, never for readiness. Also sets
/// `sts_upstream_up{upstream}` (1 up, 0 down).
pub async fn upstreamz(state: web::Data<AppState>) -> HttpResponse {
    let (kc, store) = state.exchange.probe_upstreams().await;
    let body = json!({
        "keycloak": kc.as_ref().map_or_else(|c| *c, |()| "ok"),
        "limit_store": store.as_ref().map_or_else(|c| c.as_str(), |s| *s),
    });
    if kc.is_ok() && store.is_ok() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "5"))
            .json(body)
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
