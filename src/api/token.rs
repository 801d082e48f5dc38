//! `POST /token`: RFC 8693 token exchange of a Bitbucket OIDC ID token for a
//! Keycloak access token. The handler only reads the form (content type, size,
//! time), calls [`crate::exchange::Exchange`] and renders the answer.
//!
//! Request (form-encoded, RFC 8693 §2.1): see [`TokenRequest::from_form`].
//! Success (RFC 8693 §2.2.1): 200 `{access_token, issued_token_type, token_type:
//! "Bearer", expires_in, scope}` with `Cache-Control: no-store`.
//! Errors (RFC 6749 §5.2, RFC 8693 §2.2.2): [`ApiError::from_exchange`] and the
//! error-code table (docs/src/error-codes.md).

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Serialize;

use super::ApiError;
use crate::domain::oauth::TOKEN_TYPE_ACCESS_TOKEN;
use crate::exchange::{Issued, RequestError, TokenRequest};
use crate::state::AppState;

#[derive(Serialize)]
struct Success<'a> {
    access_token: &'a str,
    issued_token_type: &'static str,
    token_type: &'static str,
    expires_in: u64,
    scope: &'a str,
}

/// Handler for `POST /token`.
pub async fn exchange(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let ctx = super::context(&req);
    let exchange = &state.exchange;
    let form = read_form(&req, payload, state.max_body_bytes, state.body_timeout).await;
    let result = match form.and_then(|body| TokenRequest::from_form(&body)) {
        Ok(request) => exchange.exchange(&ctx, request).await,
        Err(e) => Err(exchange.refuse(&ctx, e).await),
    };
    match result {
        Ok(issued) => success(&issued),
        Err(e) => ApiError::from_exchange(&e).to_response(&ctx.request_id),
    }
}

fn success(issued: &Issued) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .insert_header(("Pragma", "no-cache"))
        .json(Success {
            access_token: issued.access_token.expose(),
            issued_token_type: TOKEN_TYPE_ACCESS_TOKEN,
            token_type: "Bearer",
            expires_in: issued.expires_in,
            scope: &issued.scope,
        })
}

/// The form body: `application/x-www-form-urlencoded`, at most `max` bytes
/// (refused from `Content-Length` before reading, or while streaming), within
/// `timeout` (`body_timeout_ms`).
pub(super) async fn read_form(
    req: &HttpRequest,
    payload: web::Payload,
    max: usize,
    timeout: Duration,
) -> Result<Vec<u8>, RequestError> {
    let ct = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(RequestError::ContentType);
    }
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(RequestError::TooLarge(max));
    }
    tokio::time::timeout(timeout, read_capped(payload, max))
        .await
        .unwrap_or(Err(RequestError::BodyTimeout(timeout.as_millis())))
}

async fn read_capped(mut payload: web::Payload, max: usize) -> Result<Vec<u8>, RequestError> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| RequestError::BodyUnreadable)?;
        if body.len() + chunk.len() > max {
            return Err(RequestError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
