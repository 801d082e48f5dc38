//! The one error type that reaches callers: RFC 6749 §5.2 JSON with a stable
//! `error_code` and the `request_id`. Its text is fixed per code; causes go to logs.

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use serde::Serialize;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// RFC 6749 / RFC 8693 `error` value.
    pub error: &'static str,
    /// Stable code (README error table).
    pub error_code: &'static str,
    /// `error_description`: fixed text, possibly naming the caller's own claim values.
    pub description: String,
    /// `Retry-After` seconds, for 503 / 429.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    error_description: &'a str,
    error_code: &'a str,
    request_id: &'a str,
}

impl ApiError {
    /// 400 `invalid_request`.
    pub fn invalid_request(code: &'static str, description: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            code,
            description,
        )
    }

    /// Any status / error.
    pub fn new(
        status: StatusCode,
        error: &'static str,
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
