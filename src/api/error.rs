//! The one error type that reaches callers: RFC 6749 §5.2 JSON with a stable
//! `error_code` and the `request_id`. Its text is fixed per code; causes go to
//! logs. [`ApiError::from_exchange`] is the single table from [`ExchangeError`] to
//! (HTTP status, OAuth `error`, `error_code`): the error-code table (docs/src/error-codes.md) has this
//! one source in code.

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use serde::Serialize;

use crate::domain::error_code::error_codes;
use crate::domain::OAuthError;
use crate::exchange::{ExchangeCode, ExchangeError, RequestCode, RequestError};
use crate::http::Meaning;
use crate::keycloak::{KeycloakCode, KeycloakError};
use crate::policy::{DenyCode, DenyKind};
use crate::verify::{VerifyCode, VerifyError};

error_codes! {
    /// The codes the HTTP layer answers with before any exchange starts.
    pub enum ApiCode {
        /// A method other than POST on an exchange route.
        MethodNotAllowed = "request.method_not_allowed",
        /// An unknown path.
        NotFound = "request.not_found",
    }
}

/// Every `error_code` a caller can receive: the union of each error enum's
/// `ALL`, the list the error-code table (docs/src/error-codes.md) must match.
pub fn all_codes() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = RequestCode::ALL.iter().map(|c| c.as_str()).collect();
    all.extend(VerifyCode::ALL.iter().map(|c| c.as_str()));
    all.extend(DenyCode::ALL.iter().map(|c| c.as_str()));
    all.extend(ExchangeCode::ALL.iter().map(|c| c.as_str()));
    all.extend(KeycloakCode::ALL.iter().map(|c| c.as_str()));
    all.extend(ApiCode::ALL.iter().map(|c| c.as_str()));
    all
}

/// `Retry-After` when an upstream gave none, seconds.
const DEFAULT_RETRY_AFTER: u64 = 5;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// RFC 6749 / RFC 8693 `error` value.
    pub error: OAuthError,
    /// Stable code (error-code table, docs/src/error-codes.md).
    pub error_code: &'static str,
    /// `error_description`: fixed text, possibly naming the caller's own claim values.
    pub description: String,
    /// `Retry-After` seconds, for 503 / 429.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: OAuthError,
    error_description: &'a str,
    error_code: &'a str,
    request_id: &'a str,
}

impl ApiError {
    /// Any status / error.
    pub fn new(
        status: StatusCode,
        error: OAuthError,
        error_code: &'static str,
        description: impl Into<String>,
    ) -> Self {
        Self {
            status,
            error,
            error_code,
            description: description.into(),
            retry_after: None,
        }
    }

    /// Adds `Retry-After`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The answer for an exchange that did not issue a token.
    pub fn from_exchange(e: &ExchangeError) -> Self {
        use OAuthError::{InvalidRequest, InvalidScope, InvalidTarget, TemporarilyUnavailable};
        let code = e.code();
        match e {
            ExchangeError::Request(r) => {
                let (status, error) = request_status(r);
                Self::new(status, error, code, r.public_message())
            }
            ExchangeError::Token(v) => token(v),
            ExchangeError::Denied {
                reason,
                description,
            } => {
                let error = match reason {
                    DenyKind::UnknownAudience => InvalidTarget,
                    DenyKind::ScopeNotAllowed { .. } => InvalidScope,
                    _ => InvalidRequest,
                };
                Self::new(StatusCode::BAD_REQUEST, error, code, description.clone())
            }
            ExchangeError::Limited {
                limit,
                per_minute,
                retry_after_seconds,
            } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                TemporarilyUnavailable,
                code,
                match limit {
                    crate::exchange::LimitKind::Grants => format!(
                        "more than {per_minute} grant listings per minute for this step; retry later"
                    ),
                    _ => format!(
                        "more than {per_minute} exchanges per minute for this {}; retry later",
                        limit.as_str()
                    ),
                },
            )
            .retry_after(*retry_after_seconds),
            ExchangeError::Keycloak(k) => keycloak(k),
            ExchangeError::LimitStoreUnavailable => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                TemporarilyUnavailable,
                code,
                "the shared limit store is unavailable; retry after the Retry-After delay",
            )
            .retry_after(DEFAULT_RETRY_AFTER),
            ExchangeError::AuditUnavailable => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                TemporarilyUnavailable,
                code,
                "the audit log is not accepting records; no token was issued",
            )
            .retry_after(DEFAULT_RETRY_AFTER),
        }
    }

    /// Renders the JSON answer (with `Cache-Control: no-store`, RFC 6749 §5.2).
    pub fn to_response(&self, request_id: &str) -> HttpResponse {
        let mut b = HttpResponse::build(self.status);
        b.insert_header(("Cache-Control", "no-store"));
        b.insert_header(("Pragma", "no-cache"));
        if let Some(s) = self.retry_after {
            b.insert_header(("Retry-After", s.to_string()));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            b.insert_header(("Allow", "POST"));
        }
        b.json(Body {
            error: self.error,
            error_description: &self.description,
            error_code: self.error_code,
            request_id,
        })
    }
}

fn request_status(r: &RequestError) -> (StatusCode, OAuthError) {
    match r {
        RequestError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, OAuthError::InvalidRequest),
        RequestError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, OAuthError::InvalidRequest),
        RequestError::UnsupportedGrantType => {
            (StatusCode::BAD_REQUEST, OAuthError::UnsupportedGrantType)
        }
        RequestError::InvalidAudience => (StatusCode::BAD_REQUEST, OAuthError::InvalidTarget),
        RequestError::InvalidScopeSyntax | RequestError::TooManyScopes => {
            (StatusCode::BAD_REQUEST, OAuthError::InvalidScope)
        }
        _ => (StatusCode::BAD_REQUEST, OAuthError::InvalidRequest),
    }
}

/// Subject-token refusals are 400 `invalid_request` (RFC 8693 §2.2.2); an issuer
/// whose keys cannot be had is 503 when transient, else 502.
fn token(v: &VerifyError) -> ApiError {
    let code = v.code();
    match v {
        VerifyError::KeysUnavailable(f) if f.meaning() == Meaning::Transient => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            OAuthError::TemporarilyUnavailable,
            code,
            v.public_message(),
        )
        .retry_after(f.retry_after().unwrap_or(DEFAULT_RETRY_AFTER)),
        VerifyError::KeysUnavailable(_) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            OAuthError::ServerError,
            code,
            v.public_message(),
        ),
        _ => ApiError::new(
            StatusCode::BAD_REQUEST,
            OAuthError::InvalidRequest,
            code,
            v.public_message(),
        ),
    }
}

/// Keycloak failures: transient → 503 with Keycloak's bounded `Retry-After`;
/// our configuration or a malformed answer → 502 with an operator code.
fn keycloak(e: &KeycloakError) -> ApiError {
    if e.is_transient() {
        let description = match e {
            KeycloakError::RateLimited { .. } => {
                "Keycloak is rate limiting this service; retry after the Retry-After delay"
            }
            _ => "Keycloak is unavailable; retry after the Retry-After delay",
        };
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            OAuthError::TemporarilyUnavailable,
            e.code(),
            description,
        )
        .retry_after(e.retry_after().unwrap_or(DEFAULT_RETRY_AFTER));
    }
    if let KeycloakError::IdentityRefused {
        refusal: crate::keycloak::IdentityRefusal::Disabled,
        ..
    } = e
    {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            OAuthError::InvalidGrant,
            e.code(),
            "this repository's Keycloak identity is disabled; an operator cut it off",
        );
    }
    let description = match e {
        KeycloakError::IdentityRefused { refusal, .. } => match refusal {
            crate::keycloak::IdentityRefusal::NotProvisioned => "this repository has no Keycloak identity yet; the operator must run `keycloak apply`",
            crate::keycloak::IdentityRefusal::NotReady => "this repository's Keycloak user has pending required actions; the operator must clear them",
            crate::keycloak::IdentityRefusal::Misconfigured => "Keycloak refused this service's identity assertion; the operator must check the identity provider (run `keycloak plan`)",
            _ => "Keycloak refused this repository's identity; the operator must check Keycloak's events",
        },
        KeycloakError::IdentityMismatch { .. } => "the token Keycloak issued does not belong to this repository's user (a second user is linked to the identity, or the identity scope is missing); nothing was passed on",
        KeycloakError::IdentityNotConfigured => "the policy's client uses the JWT Authorization Grant but [identity] is not configured",
        KeycloakError::ClientRejected { .. } => "Keycloak rejected this service's client authentication; the operator must check the Keycloak client's credentials",
        KeycloakError::ScopeRejected { .. } => "Keycloak refused the granted scopes; the operator must add them as optional client scopes",
        KeycloakError::ScopeExceedsGrant { .. } => "Keycloak granted more scopes than the policy allows; the token was not passed on: the operator must remove them from the client's default client scopes",
        KeycloakError::LifetimeTooLong { .. } => "Keycloak issued a token living longer than the policy allows; it was not passed on",
        KeycloakError::UnknownClient(_) => "the policy's Keycloak client is not configured",
        KeycloakError::NotFound { .. } => "Keycloak has no such realm or endpoint; the operator must check keycloak.base_url and keycloak.realm",
        KeycloakError::Redirected { .. } => "Keycloak redirected the request; the operator must set keycloak.base_url to the server's own address",
        KeycloakError::DiscoveryMismatch(_)
        | KeycloakError::Discovery {
            code: KeycloakCode::DiscoveryMismatch,
            ..
        } => "Keycloak's discovery names another issuer or a token endpoint outside keycloak.base_url's realm; nothing was sent there: the operator must set keycloak.base_url to Keycloak's frontend URL",
        _ if e.meaning() == Meaning::Malformed => "Keycloak answered with something that is not a valid token response; nothing was passed on",
        _ => "Keycloak refused the request; the operator must check the Keycloak client's configuration",
    };
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        OAuthError::ServerError,
        e.code(),
        description,
    )
}
