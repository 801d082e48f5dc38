//! `POST /token`: RFC 8693 token exchange of a Bitbucket OIDC ID token for a
//! Keycloak access token.
//!
//! Request (form-encoded, RFC 8693 §2.1): `grant_type` =
//! `urn:ietf:params:oauth:grant-type:token-exchange`; `subject_token`;
//! `subject_token_type` = `urn:ietf:params:oauth:token-type:id_token` or
//! `urn:ietf:params:oauth:token-type:jwt`; `audience` (selects the grant);
//! optional `scope` (space-separated); optional `requested_token_type`
//! (`urn:ietf:params:oauth:token-type:access_token` only). Each parameter at most once.
//!
//! Success (RFC 8693 §2.2.1): 200 `{access_token, issued_token_type, token_type:
//! "Bearer", expires_in, scope}` with `Cache-Control: no-store`.
//! Errors (RFC 6749 §5.2, RFC 8693 §2.2.2): see [`super::ApiError`] and the README table.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Serialize;

use super::{request_id, ApiError};
use crate::domain::SecretToken;
use crate::http::Meaning;
use crate::keycloak::KeycloakError;
use crate::policy::{EvalRequest, Outcome};
use crate::startup::AppState;
use crate::telemetry::AuditRecord;
use crate::verify::VerifyError;

/// RFC 8693 grant type.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Accepted subject token types.
pub const SUBJECT_TOKEN_TYPES: [&str; 2] = [
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:jwt",
];
/// The only issued token type.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

#[derive(Serialize)]
struct Success<'a> {
    access_token: &'a str,
    issued_token_type: &'static str,
    token_type: &'static str,
    expires_in: u64,
    scope: &'a str,
}

/// Parsed request parameters.
#[derive(Default)]
struct Params {
    grant_type: Option<String>,
    subject_token: Option<SecretToken>,
    subject_token_type: Option<String>,
    requested_token_type: Option<String>,
    audience: Option<String>,
    scope: Option<String>,
}

fn parse_form(body: &[u8]) -> Result<Params, ApiError> {
    let mut p = Params::default();
    let mut seen = std::collections::BTreeSet::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        let key = k.into_owned();
        if matches!(
            key.as_str(),
            "grant_type"
                | "subject_token"
                | "subject_token_type"
                | "requested_token_type"
                | "audience"
                | "scope"
        ) && !seen.insert(key.clone())
        {
            return Err(ApiError::invalid_request(
                "request.repeated_parameter",
                format!("parameter `{key}` is repeated; send it once"),
            ));
        }
        match key.as_str() {
            "grant_type" => p.grant_type = Some(v.into_owned()),
            "subject_token" => p.subject_token = Some(SecretToken::new(v.into_owned())),
            "subject_token_type" => p.subject_token_type = Some(v.into_owned()),
            "requested_token_type" => p.requested_token_type = Some(v.into_owned()),
            "audience" => p.audience = Some(v.into_owned()),
            "scope" => p.scope = Some(v.into_owned()),
            "actor_token" | "actor_token_type" | "resource" => {
                return Err(ApiError::invalid_request(
                    "request.unsupported_parameter",
                    format!(
                        "parameter `{key}` is not supported (no delegation or resource indicators)"
                    ),
                ))
            }
            // RFC 6749 §3.2: unrecognised parameters are ignored.
            _ => {}
        }
    }
    Ok(p)
}

/// Longest time a client may take to send the request body once its headers arrived.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the body within [`BODY_READ_TIMEOUT`], refusing more than `max` bytes
/// before reading it whole.
async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    max: usize,
) -> Result<Vec<u8>, ApiError> {
    tokio::time::timeout(BODY_READ_TIMEOUT, read_body_unbounded(req, payload, max))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request",
                "request.body_timeout",
                format!(
                    "request body not received within {} s",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            ))
        })
}

async fn read_body_unbounded(
    req: &HttpRequest,
    mut payload: web::Payload,
    max: usize,
) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "request.too_large",
            format!("request body is larger than {max} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > max {
            return Err(too_large());
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| {
            ApiError::invalid_request("request.body_unreadable", "request body could not be read")
        })?;
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn check_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    let ct = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(())
    } else {
        Err(ApiError::invalid_request(
            "request.content_type",
            "Content-Type must be application/x-www-form-urlencoded (RFC 8693 §2.1)",
        ))
    }
}

struct Checked {
    subject_token: SecretToken,
    audience: String,
    scopes: Vec<String>,
}

fn check_params(p: Params) -> Result<Checked, ApiError> {
    let grant_type = p.grant_type.filter(|g| !g.is_empty()).ok_or_else(|| {
        ApiError::invalid_request("request.missing_grant_type", "grant_type is missing")
    })?;
    if grant_type != GRANT_TYPE {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "request.unsupported_grant_type",
            format!("only grant_type={GRANT_TYPE} is supported"),
        ));
    }
    let subject_token = p.subject_token.filter(|t| !t.expose().trim().is_empty()).ok_or_else(|| {
        ApiError::invalid_request(
            "request.missing_subject_token",
            "subject_token is missing or empty: set `oidc: true` on the step and send $BITBUCKET_STEP_OIDC_TOKEN",
        )
    })?;
    match p.subject_token_type.as_deref() {
        Some(t) if SUBJECT_TOKEN_TYPES.contains(&t) => {}
        None | Some("") => {
            return Err(ApiError::invalid_request(
                "request.missing_subject_token_type",
                "subject_token_type is missing; use urn:ietf:params:oauth:token-type:id_token",
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid_request(
                "request.unsupported_subject_token_type",
                "subject_token_type must be urn:ietf:params:oauth:token-type:id_token or urn:ietf:params:oauth:token-type:jwt",
            ))
        }
    }
    if let Some(t) = p.requested_token_type.as_deref() {
        if t != ACCESS_TOKEN_TYPE {
            return Err(ApiError::invalid_request(
                "request.unsupported_requested_token_type",
                format!("requested_token_type must be {ACCESS_TOKEN_TYPE}"),
            ));
        }
    }
    let audience = p.audience.filter(|a| !a.is_empty()).ok_or_else(|| {
        ApiError::invalid_request(
            "request.missing_audience",
            "audience is missing: name the target the policy grants",
        )
    })?;
    if !crate::policy::is_scope_token(&audience) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            "request.invalid_audience",
            "audience must be 1 to 256 characters of RFC 6749 §3.3's set",
        ));
    }
    let mut scopes = Vec::new();
    if let Some(s) = p.scope {
        for item in s.split(' ').filter(|x| !x.is_empty()) {
            if !crate::policy::is_scope_token(item) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    "request.invalid_scope_syntax",
                    "scope must be space-separated tokens of 1 to 256 characters of RFC 6749 §3.3's set",
                ));
            }
            if scopes.len() >= 32 {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    "request.too_many_scopes",
                    "at most 32 scopes",
                ));
            }
            scopes.push(item.to_string());
        }
    }
    Ok(Checked {
        subject_token,
        audience,
        scopes,
    })
}

fn verify_error(e: &VerifyError) -> ApiError {
    match e {
        VerifyError::KeysUnavailable(f) if f.meaning() == Meaning::Transient => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            e.code(),
            e.public_message(),
        )
        .retry_after(f.retry_after().unwrap_or(5)),
        VerifyError::KeysUnavailable(_) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            e.code(),
            e.public_message(),
        ),
        _ => ApiError::invalid_request(e.code(), e.public_message()),
    }
}

fn keycloak_error(e: &KeycloakError) -> ApiError {
    if e.is_transient() {
        let description = match e {
            KeycloakError::RateLimited { .. } => {
                "Keycloak is rate limiting this service; retry after the Retry-After delay"
            }
            _ => "Keycloak is unavailable; retry after the Retry-After delay",
        };
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            e.code(),
            description,
        )
        .retry_after(e.retry_after().unwrap_or(5));
    }
    let description = match e {
        KeycloakError::ClientRejected { .. } => "Keycloak rejected this service's client authentication; the operator must check the Keycloak client's credentials",
        KeycloakError::ScopeRejected { .. } => "Keycloak refused the granted scopes; the operator must add them as optional client scopes",
        KeycloakError::LifetimeTooLong { .. } => "Keycloak issued a token living longer than the policy allows; it was not passed on",
        KeycloakError::UnknownClient(_) => "the policy's Keycloak client is not configured",
        KeycloakError::NotFound { .. } => "Keycloak has no such realm or endpoint; the operator must check keycloak.base_url and keycloak.realm",
        KeycloakError::Redirected { .. } => "Keycloak redirected the request; the operator must set keycloak.base_url to the server's own address",
        _ if e.meaning() == crate::http::Meaning::Malformed => "Keycloak answered with something that is not a valid token response; nothing was passed on",
        _ => "Keycloak refused the request; the operator must check the Keycloak client's configuration",
    };
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "server_error",
        e.code(),
        description,
    )
}

/// Handler for `POST /token`.
pub async fn exchange(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let rid = request_id(&req);
    let started = std::time::Instant::now();
    let mut audit = AuditRecord::new(rid.clone());
    audit.client_address = req.peer_addr().map(|a| a.to_string());
    let result = run(&req, payload, &state, &mut audit).await;
    let response = match result {
        Ok(resp) => {
            audit.outcome = "allowed";
            resp
        }
        Err(e) => {
            if audit.outcome.is_empty() {
                audit.outcome = "denied";
            }
            audit.error_code = Some(e.error_code);
            e.to_response(&rid)
        }
    };
    // No token leaves without its audit line: if the line cannot be queued, the
    // token is withheld and the caller gets 503.
    let response = match state.audit.write(&audit) {
        Ok(()) => response,
        Err(e) => {
            state
                .metrics
                .audit_failures
                .with_label_values(&[audit.outcome])
                .inc();
            tracing::error!(error = %e, outcome = audit.outcome, "audit line lost");
            if audit.outcome == "allowed" {
                audit.outcome = "failed";
                audit.error_code = Some("audit.unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "audit.unavailable",
                    "the audit log is not accepting records; no token was issued",
                )
                .retry_after(5)
                .to_response(&rid)
            } else {
                response
            }
        }
    };
    state.metrics.observe("total", started);
    state
        .metrics
        .exchanges
        .with_label_values(&[
            audit.outcome,
            audit.error_code.unwrap_or(""),
            audit.policy.as_deref().unwrap_or(""),
        ])
        .inc();
    response
}

async fn run(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    audit: &mut AuditRecord,
) -> Result<HttpResponse, ApiError> {
    check_content_type(req)?;
    let body = read_body(req, payload, state.max_body_bytes).await?;
    let checked = check_params(parse_form(&body)?)?;
    audit.audience = Some(checked.audience.clone());
    audit.requested_scopes = checked.scopes.clone();

    // 1. Verify the Bitbucket token.
    let phase = std::time::Instant::now();
    let verified = state.verifier.verify(&checked.subject_token).await;
    state.metrics.observe("verify", phase);
    let identity = match verified {
        Ok(id) => id,
        Err(e) => {
            if matches!(e, VerifyError::KeysUnavailable(_)) {
                audit.outcome = "failed";
            }
            if let VerifyError::UntrustedIssuer(iss) = &e {
                // The refused (untrusted, truncated) issuer, for the investigation.
                audit.issuer = Some(iss.clone());
            }
            tracing::info!(error_code = e.code(), error = %crate::telemetry::chain(&e), "subject token refused");
            return Err(verify_error(&e));
        }
    };
    audit.issuer = Some(identity.issuer.clone());
    audit.sub = Some(identity.sub.clone());
    audit.workspace_uuid = Some(identity.workspace_uuid.braced());
    audit.repository_uuid = Some(identity.repository_uuid.braced());
    audit.pipeline_uuid = Some(identity.pipeline_uuid.braced());
    audit.pipeline_run_uuid = identity.pipeline_run_uuid.map(|u| u.braced());
    audit.step_uuid = Some(identity.step_uuid.braced());
    audit.deployment_environment_uuid = identity.deployment_environment_uuid.map(|u| u.braced());
    audit.branch_name = identity.branch_name.clone();

    // 2. Policy (this request keeps the set it started with, even across a reload).
    let phase = std::time::Instant::now();
    let policies = state.policies.load_full();
    let decision = policies.evaluate(&EvalRequest {
        identity: &identity,
        audience: &checked.audience,
        scopes: &checked.scopes,
    });
    state.metrics.observe("policy", phase);
    tracing::debug!(trace = ?decision.trace, "policy decision trace");
    let grant = match decision.outcome {
        Outcome::Allow(g) => g,
        Outcome::Deny { reason, policy } => {
            audit.policy = policy;
            tracing::info!(
                error_code = reason.code(),
                policy = audit.policy.as_deref().unwrap_or("-"),
                "exchange denied by policy"
            );
            let (status, error) = match reason {
                crate::policy::DenyKind::UnknownAudience => {
                    (StatusCode::BAD_REQUEST, "invalid_target")
                }
                crate::policy::DenyKind::ScopeNotAllowed { .. } => {
                    (StatusCode::BAD_REQUEST, "invalid_scope")
                }
                _ => (StatusCode::BAD_REQUEST, "invalid_request"),
            };
            return Err(ApiError::new(
                status,
                error,
                reason.code(),
                reason.public_message(&identity, &checked.audience),
            ));
        }
    };
    audit.policy = Some(grant.policy.clone());
    audit.keycloak_client = Some(grant.client.clone());

    // Per-identity limits (policy overrides, else the service defaults).
    let checks = [
        (
            "step",
            format!("step:{}", identity.step_uuid.bare()),
            grant
                .per_step_per_minute
                .unwrap_or(state.limits.per_step_per_minute),
            "limit.step_exceeded",
        ),
        (
            "repository",
            format!("repository:{}", identity.repository_uuid.bare()),
            grant
                .per_repository_per_minute
                .unwrap_or(state.limits.per_repository_per_minute),
            "limit.repository_exceeded",
        ),
    ];
    for (limit, key, per_minute, code) in checks {
        if let Err(wait) = state.limiter.check(&key, per_minute) {
            state.metrics.rate_limited.with_label_values(&[limit]).inc();
            tracing::info!(
                error_code = code,
                limit,
                per_minute,
                "exchange rate-limited"
            );
            let retry = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                code,
                format!(
                    "more than {per_minute} exchanges per minute for this {limit}; retry later"
                ),
            )
            .retry_after(retry.max(1)));
        }
    }

    // 3. Keycloak.
    let phase = std::time::Instant::now();
    let issued = state
        .keycloak
        .client_credentials(&grant.client, &grant.scopes, grant.max_lifetime_seconds)
        .await;
    state.metrics.observe("keycloak", phase);
    let issued = match issued {
        Ok(t) => t,
        Err(e) => {
            audit.outcome = "failed";
            tracing::warn!(error_code = e.code(), error = %crate::telemetry::chain(&e), client = %grant.client, "Keycloak exchange failed");
            return Err(keycloak_error(&e));
        }
    };
    audit.granted_scopes = issued
        .scope
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    audit.expires_in = Some(issued.expires_in);
    audit.token_sha256 = Some(issued.access_token.sha256_hex());
    audit.token_jti = issued.jti.clone();

    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .insert_header(("Pragma", "no-cache"))
        .json(Success {
            access_token: issued.access_token.expose(),
            issued_token_type: ACCESS_TOKEN_TYPE,
            token_type: "Bearer",
            expires_in: issued.expires_in,
            scope: &issued.scope,
        }))
}
