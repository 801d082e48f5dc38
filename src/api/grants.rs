//! `POST /grants`: capability discovery. Which audiences the caller's Bitbucket
//! identity may obtain now, and for each the scopes, default scopes and maximum
//! lifetime, decided by the same policy engine as `/token` (deny rules applied).
//! No Keycloak call; one audit line (`event: grants`); its own rate budget
//! (`[limits] grants_per_step_per_minute`).
//!
//! Request (form-encoded, as for `/token`): `subject_token`, optionally
//! `subject_token_type` (`…:id_token` or `…:jwt`).
//! Success: 200 with `Cache-Control: no-store`:
//! `{"identity": {workspaceUuid, repositoryUuid, deploymentEnvironmentUuid,
//! branchName, aud}, "repository": full_name|null, "grants": [{audience, scopes,
//! default_scopes|null, max_lifetime_seconds}]}`. Nothing about the policies
//! themselves (no ids, patterns or deny rules). How to read `grants`:
//! [`crate::policy::Offer`].
//! Errors: the `/token` table (`token.*`, `request.*`, `limit.grants_exceeded`,
//! `audit.unavailable`).

use actix_web::{web, HttpRequest, HttpResponse};

use super::token::read_form;
use super::ApiError;
use crate::exchange::GrantsRequest;
use crate::state::AppState;

/// Handler for `POST /grants`.
pub async fn list(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let ctx = super::context(&req);
    let exchange = &state.exchange;
    let form = read_form(&req, payload, state.max_body_bytes, state.body_timeout).await;
    let result = match form.and_then(|body| GrantsRequest::from_form(&body)) {
        Ok(request) => exchange.grants(&ctx, request).await,
        Err(e) => Err(exchange.refuse_grants(&ctx, e).await),
    };
    match result {
        Ok(list) => HttpResponse::Ok()
            .insert_header(("Cache-Control", "no-store"))
            .insert_header(("Pragma", "no-cache"))
            .json(list),
        Err(e) => ApiError::from_exchange(&e).to_response(&ctx.request_id),
    }
}
