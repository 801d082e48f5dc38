//! The RFC 8693 token exchange, independent of HTTP: a typed [`TokenRequest`] in,
//! an [`Issued`] token or a typed [`ExchangeError`] out. Every caller (the HTTP
//! handler today; a client command, an agent interface or a second grant mode
//! tomorrow) goes through [`Exchange::exchange`], so each step of the book's
//! sequence diagram (docs/src/pipelines.md) happens in one place and in one order:
//!
//! 1. verify the Bitbucket token ([`crate::verify`]);
//! 2. decide with the policies ([`crate::policy`]); a denied request never reaches Keycloak;
//! 3. apply the per-step and per-repository limits ([`crate::limits`]);
//! 4. obtain the token from Keycloak ([`crate::keycloak`]);
//! 5. write the audit line ([`crate::audit`]): no token leaves without it.
//!
//! How an [`ExchangeError`] is answered over HTTP (status, OAuth `error`,
//! `error_code`) is decided in one table, in the `api` module's `error.rs`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use crate::audit::{AuditEvent, AuditOutcome, AuditRecord, AuditSink};
use crate::domain::error_code::error_codes;
use crate::domain::oauth::{
    is_scope_token, GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_ID_TOKEN,
    TOKEN_TYPE_JWT,
};
use crate::domain::{Scopes, SecretToken};
use crate::keycloak::{GrantMode, KeycloakClient, KeycloakError};
use crate::limits::Limits;
use crate::limits::{ExchangeLimiter, Refusal};
use crate::metrics::Metrics;
use crate::policy::{DenyKind, EvalRequest, Grant, Outcome, PolicyStore, Subject};
use crate::verify::{BitbucketIdentity, Verifier, VerifyError};

/// Most scopes one request may name.
pub const MAX_REQUEST_SCOPES: usize = 32;

/// A validated RFC 8693 §2.1 request.
#[derive(Debug)]
pub struct TokenRequest {
    /// `subject_token`: the Bitbucket step's OIDC ID token (redacted in `Debug`).
    pub subject_token: SecretToken,
    /// `audience`: selects the policy grant.
    pub audience: String,
    /// `scope`: empty means the grant's default scopes.
    pub scopes: Scopes,
}

/// Who sent the request, for the audit line.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The request id (also in the answer and the logs).
    pub request_id: String,
    /// The TCP peer (a proxy's address when behind one).
    pub client_address: Option<String>,
}

/// A token obtained for the caller.
#[derive(Debug)]
pub struct Issued {
    /// The Keycloak access token (redacted in `Debug`).
    pub access_token: SecretToken,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// Scopes as Keycloak reports them.
    pub scope: String,
}

/// A request refused before the exchange: its form is not an RFC 8693 request
/// this service takes. Each variant's [`code`](RequestError::code) is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The body is not `application/x-www-form-urlencoded` (RFC 8693 §2.1).
    #[error("wrong content type")]
    ContentType,
    /// The body is larger than the limit (bytes).
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// The body did not arrive in time (milliseconds).
    #[error("body not received within {0} ms")]
    BodyTimeout(u128),
    /// The body broke off.
    #[error("body unreadable")]
    BodyUnreadable,
    /// A parameter appears more than once (RFC 6749 §3.2).
    #[error("parameter `{0}` repeated")]
    RepeatedParameter(&'static str),
    /// `actor_token`, `actor_token_type` or `resource`.
    #[error("parameter `{0}` not supported")]
    UnsupportedParameter(&'static str),
    /// No `grant_type`.
    #[error("grant_type missing")]
    MissingGrantType,
    /// `grant_type` is not token exchange.
    #[error("grant_type not supported")]
    UnsupportedGrantType,
    /// No or an empty `subject_token`.
    #[error("subject_token missing")]
    MissingSubjectToken,
    /// No `subject_token_type`.
    #[error("subject_token_type missing")]
    MissingSubjectTokenType,
    /// `subject_token_type` is not `id_token` or `jwt`.
    #[error("subject_token_type not supported")]
    UnsupportedSubjectTokenType,
    /// `requested_token_type` is not `access_token`.
    #[error("requested_token_type not supported")]
    UnsupportedRequestedTokenType,
    /// No `audience`.
    #[error("audience missing")]
    MissingAudience,
    /// `audience` is not an RFC 6749 §3.3 token of at most 256 bytes.
    #[error("audience invalid")]
    InvalidAudience,
    /// A scope is not an RFC 6749 §3.3 token of at most 256 bytes.
    #[error("scope syntax")]
    InvalidScopeSyntax,
    /// More than [`MAX_REQUEST_SCOPES`] scopes.
    #[error("too many scopes")]
    TooManyScopes,
}

error_codes! {
    /// The codes of [`RequestError`].
    pub enum RequestCode {
        /// [`RequestError::ContentType`].
        ContentType = "request.content_type",
        /// [`RequestError::TooLarge`].
        TooLarge = "request.too_large",
        /// [`RequestError::BodyTimeout`].
        BodyTimeout = "request.body_timeout",
        /// [`RequestError::BodyUnreadable`].
        BodyUnreadable = "request.body_unreadable",
        /// [`RequestError::RepeatedParameter`].
        RepeatedParameter = "request.repeated_parameter",
        /// [`RequestError::UnsupportedParameter`].
        UnsupportedParameter = "request.unsupported_parameter",
        /// [`RequestError::MissingGrantType`].
        MissingGrantType = "request.missing_grant_type",
        /// [`RequestError::UnsupportedGrantType`].
        UnsupportedGrantType = "request.unsupported_grant_type",
        /// [`RequestError::MissingSubjectToken`].
        MissingSubjectToken = "request.missing_subject_token",
        /// [`RequestError::MissingSubjectTokenType`].
        MissingSubjectTokenType = "request.missing_subject_token_type",
        /// [`RequestError::UnsupportedSubjectTokenType`].
        UnsupportedSubjectTokenType = "request.unsupported_subject_token_type",
        /// [`RequestError::UnsupportedRequestedTokenType`].
        UnsupportedRequestedTokenType = "request.unsupported_requested_token_type",
        /// [`RequestError::MissingAudience`].
        MissingAudience = "request.missing_audience",
        /// [`RequestError::InvalidAudience`].
        InvalidAudience = "request.invalid_audience",
        /// [`RequestError::InvalidScopeSyntax`].
        InvalidScopeSyntax = "request.invalid_scope_syntax",
        /// [`RequestError::TooManyScopes`].
        TooManyScopes = "request.too_many_scopes",
    }
}

impl RequestError {
    /// This error's code (exhaustive: a new variant needs one).
    pub fn kind(&self) -> RequestCode {
        match self {
            Self::ContentType => RequestCode::ContentType,
            Self::TooLarge(_) => RequestCode::TooLarge,
            Self::BodyTimeout(_) => RequestCode::BodyTimeout,
            Self::BodyUnreadable => RequestCode::BodyUnreadable,
            Self::RepeatedParameter(_) => RequestCode::RepeatedParameter,
            Self::UnsupportedParameter(_) => RequestCode::UnsupportedParameter,
            Self::MissingGrantType => RequestCode::MissingGrantType,
            Self::UnsupportedGrantType => RequestCode::UnsupportedGrantType,
            Self::MissingSubjectToken => RequestCode::MissingSubjectToken,
            Self::MissingSubjectTokenType => RequestCode::MissingSubjectTokenType,
            Self::UnsupportedSubjectTokenType => RequestCode::UnsupportedSubjectTokenType,
            Self::UnsupportedRequestedTokenType => RequestCode::UnsupportedRequestedTokenType,
            Self::MissingAudience => RequestCode::MissingAudience,
            Self::InvalidAudience => RequestCode::InvalidAudience,
            Self::InvalidScopeSyntax => RequestCode::InvalidScopeSyntax,
            Self::TooManyScopes => RequestCode::TooManyScopes,
        }
    }

    /// Stable error code (error-code table, docs/src/error-codes.md).
    pub fn code(&self) -> &'static str {
        self.kind().as_str()
    }

    /// The fixed text the caller sees.
    pub fn public_message(&self) -> String {
        match self {
            Self::ContentType => "Content-Type must be application/x-www-form-urlencoded (RFC 8693 §2.1)".into(),
            Self::TooLarge(max) => format!("request body is larger than {max} bytes"),
            Self::BodyTimeout(ms) => format!("request body not received within {ms} ms"),
            Self::BodyUnreadable => "request body could not be read".into(),
            Self::RepeatedParameter(k) => format!("parameter `{k}` is repeated; send it once"),
            Self::UnsupportedParameter(k) => format!("parameter `{k}` is not supported (no delegation or resource indicators)"),
            Self::MissingGrantType => "grant_type is missing".into(),
            Self::UnsupportedGrantType => format!("only grant_type={GRANT_TYPE_TOKEN_EXCHANGE} is supported"),
            Self::MissingSubjectToken => "subject_token is missing or empty: set `oidc: true` on the step and send $BITBUCKET_STEP_OIDC_TOKEN".into(),
            Self::MissingSubjectTokenType => format!("subject_token_type is missing; use {TOKEN_TYPE_ID_TOKEN}"),
            Self::UnsupportedSubjectTokenType => format!("subject_token_type must be {TOKEN_TYPE_ID_TOKEN} or {TOKEN_TYPE_JWT}"),
            Self::UnsupportedRequestedTokenType => format!("requested_token_type must be {TOKEN_TYPE_ACCESS_TOKEN}"),
            Self::MissingAudience => "audience is missing: name the target the policy grants".into(),
            Self::InvalidAudience => "audience must be 1 to 256 characters of RFC 6749 §3.3's set".into(),
            Self::InvalidScopeSyntax => "scope must be space-separated tokens of 1 to 256 characters of RFC 6749 §3.3's set".into(),
            Self::TooManyScopes => format!("at most {MAX_REQUEST_SCOPES} scopes"),
        }
    }
}

impl TokenRequest {
    /// Parses an `application/x-www-form-urlencoded` body (RFC 8693 §2.1): each
    /// parameter at most once; unknown parameters ignored (RFC 6749 §3.2).
    ///
    /// # Errors
    /// The first [`RequestError`] found.
    pub fn from_form(body: &[u8]) -> Result<Self, RequestError> {
        const KNOWN: [&str; 6] = [
            "grant_type",
            "subject_token",
            "subject_token_type",
            "requested_token_type",
            "audience",
            "scope",
        ];
        let mut values: [Option<String>; 6] = Default::default();
        for (k, v) in url::form_urlencoded::parse(body) {
            if let Some(i) = KNOWN.iter().position(|n| *n == k) {
                if values[i].is_some() {
                    return Err(RequestError::RepeatedParameter(KNOWN[i]));
                }
                values[i] = Some(v.into_owned());
            } else if let Some(p) = ["actor_token", "actor_token_type", "resource"]
                .into_iter()
                .find(|n| *n == k)
            {
                return Err(RequestError::UnsupportedParameter(p));
            }
        }
        let [grant_type, subject_token, subject_token_type, requested_token_type, audience, scope] =
            values;
        Self::check(
            grant_type,
            subject_token.map(SecretToken::new),
            subject_token_type,
            requested_token_type,
            audience,
            scope,
        )
    }

    fn check(
        grant_type: Option<String>,
        subject_token: Option<SecretToken>,
        subject_token_type: Option<String>,
        requested_token_type: Option<String>,
        audience: Option<String>,
        scope: Option<String>,
    ) -> Result<Self, RequestError> {
        match grant_type.as_deref() {
            None | Some("") => return Err(RequestError::MissingGrantType),
            Some(GRANT_TYPE_TOKEN_EXCHANGE) => {}
            Some(_) => return Err(RequestError::UnsupportedGrantType),
        }
        let subject_token = subject_token
            .filter(|t| !t.expose().trim().is_empty())
            .ok_or(RequestError::MissingSubjectToken)?;
        match subject_token_type.as_deref() {
            None | Some("") => return Err(RequestError::MissingSubjectTokenType),
            Some(TOKEN_TYPE_ID_TOKEN | TOKEN_TYPE_JWT) => {}
            Some(_) => return Err(RequestError::UnsupportedSubjectTokenType),
        }
        if requested_token_type.is_some_and(|t| t != TOKEN_TYPE_ACCESS_TOKEN) {
            return Err(RequestError::UnsupportedRequestedTokenType);
        }
        let audience = audience
            .filter(|a| !a.is_empty())
            .ok_or(RequestError::MissingAudience)?;
        if !is_scope_token(&audience) {
            return Err(RequestError::InvalidAudience);
        }
        let scope = scope.unwrap_or_default();
        let scopes = Scopes::parse(&scope).map_err(|_| RequestError::InvalidScopeSyntax)?;
        if scope.split(' ').filter(|s| !s.is_empty()).count() > MAX_REQUEST_SCOPES {
            return Err(RequestError::TooManyScopes);
        }
        Ok(Self {
            subject_token,
            audience,
            scopes,
        })
    }
}

/// A validated `POST /grants` request: the same `subject_token` as for
/// `/token` (form-encoded); `subject_token_type`, when sent, must be `id_token`
/// or `jwt`. Other parameters are ignored (RFC 6749 §3.2); each at most once.
#[derive(Debug)]
pub struct GrantsRequest {
    /// `subject_token` (redacted in `Debug`).
    pub subject_token: SecretToken,
}

impl GrantsRequest {
    /// Parses an `application/x-www-form-urlencoded` body.
    ///
    /// # Errors
    /// [`RequestError::RepeatedParameter`], [`RequestError::MissingSubjectToken`],
    /// [`RequestError::UnsupportedSubjectTokenType`].
    pub fn from_form(body: &[u8]) -> Result<Self, RequestError> {
        let mut token: Option<String> = None;
        let mut token_type: Option<String> = None;
        for (k, v) in url::form_urlencoded::parse(body) {
            let (slot, name) = match k.as_ref() {
                "subject_token" => (&mut token, "subject_token"),
                "subject_token_type" => (&mut token_type, "subject_token_type"),
                _ => continue,
            };
            if slot.is_some() {
                return Err(RequestError::RepeatedParameter(name));
            }
            *slot = Some(v.into_owned());
        }
        if token_type
            .as_deref()
            .is_some_and(|t| t != TOKEN_TYPE_ID_TOKEN && t != TOKEN_TYPE_JWT)
        {
            return Err(RequestError::UnsupportedSubjectTokenType);
        }
        let subject_token = token
            .map(SecretToken::new)
            .filter(|t| !t.expose().trim().is_empty())
            .ok_or(RequestError::MissingSubjectToken)?;
        Ok(Self { subject_token })
    }
}

/// What `POST /grants` answers: the caller's own identity (its claims, as
/// Bitbucket names them) and what it may obtain ([`crate::policy::Offer`]).
#[derive(Debug, serde::Serialize)]
pub struct GrantList {
    /// The verified claims policies decided on.
    pub identity: Subject,
    /// The repository's `full_name`, where the inventory knows it.
    pub repository: Option<String>,
    /// Offers by audience; see [`crate::policy::Offer`] for how a request is decided.
    pub grants: Vec<crate::policy::Offer>,
}

/// Which per-identity limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Per `stepUuid`.
    Step,
    /// Per `repositoryUuid`.
    Repository,
    /// `POST /grants` per `stepUuid` (a budget of its own).
    Grants,
}

impl LimitKind {
    /// `step` or `repository` (metrics label, messages).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::Repository => "repository",
            Self::Grants => "grants",
        }
    }
}

/// Why an exchange did not issue a token. Never holds a token or secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// The request is not one this service takes.
    #[error("request refused: {0}")]
    Request(#[from] RequestError),
    /// The subject token was not accepted (or its issuer's keys are unavailable).
    #[error("subject token refused")]
    Token(#[source] VerifyError),
    /// The policies refuse; `description` speaks of the caller's own claims only.
    #[error("denied by policy ({})", .reason.code())]
    Denied {
        /// Why.
        reason: DenyKind,
        /// The message for the caller.
        description: String,
    },
    /// More exchanges per minute than the step's or repository's limit.
    #[error("{} limit of {per_minute}/min exceeded", .limit.as_str())]
    Limited {
        /// Which limit.
        limit: LimitKind,
        /// The limit, per minute.
        per_minute: NonZeroU32,
        /// Seconds until the next exchange is allowed.
        retry_after_seconds: u64,
    },
    /// The shared limit store (Redis) did not answer and `on_store_error =
    /// "deny"`: the request cannot be counted, so it is refused.
    #[error("limit store unavailable")]
    LimitStoreUnavailable,
    /// Keycloak did not issue a usable token.
    #[error("Keycloak exchange failed")]
    Keycloak(#[source] KeycloakError),
    /// The audit line could not be written, so the token was withheld.
    #[error("audit log not accepting records")]
    AuditUnavailable,
}

error_codes! {
    /// The codes [`ExchangeError`] has of its own (the others are its sources').
    pub enum ExchangeCode {
        /// [`ExchangeError::Limited`], [`LimitKind::Step`].
        StepExceeded = "limit.step_exceeded",
        /// [`ExchangeError::Limited`], [`LimitKind::Repository`].
        RepositoryExceeded = "limit.repository_exceeded",
        /// [`ExchangeError::Limited`], [`LimitKind::Grants`].
        GrantsExceeded = "limit.grants_exceeded",
        /// [`ExchangeError::LimitStoreUnavailable`].
        LimitStoreUnavailable = "limit.store_unavailable",
        /// [`ExchangeError::AuditUnavailable`].
        AuditUnavailable = "audit.unavailable",
    }
}

error_codes! {
    /// Codes written only to audit lines, never in an answer.
    pub enum AuditOnlyCode {
        /// The exchange was dropped before it finished (the caller went away).
        Abandoned = "request.abandoned",
    }
}

impl ExchangeError {
    /// Stable error code (error-code table, docs/src/error-codes.md).
    pub fn code(&self) -> &'static str {
        let own = match self {
            Self::Request(e) => return e.code(),
            Self::Token(e) => return e.code(),
            Self::Denied { reason, .. } => return reason.code(),
            Self::Keycloak(e) => return e.code(),
            Self::Limited { limit, .. } => match limit {
                LimitKind::Step => ExchangeCode::StepExceeded,
                LimitKind::Repository => ExchangeCode::RepositoryExceeded,
                LimitKind::Grants => ExchangeCode::GrantsExceeded,
            },
            Self::LimitStoreUnavailable => ExchangeCode::LimitStoreUnavailable,
            Self::AuditUnavailable => ExchangeCode::AuditUnavailable,
        };
        own.as_str()
    }

    /// The audit outcome: `failed` for outages (issuer keys, Keycloak, audit),
    /// `denied` for everything the caller can fix.
    pub fn outcome(&self) -> AuditOutcome {
        match self {
            Self::Token(VerifyError::KeysUnavailable(_))
            | Self::Keycloak(_)
            | Self::LimitStoreUnavailable
            | Self::AuditUnavailable => AuditOutcome::Failed,
            _ => AuditOutcome::Denied,
        }
    }
}

/// The subject policies decide on, taken from a verified token.
pub fn subject_of(id: &BitbucketIdentity) -> Subject {
    Subject {
        workspace_uuid: id.workspace_uuid,
        repository_uuid: id.repository_uuid,
        deployment_environment_uuid: id.deployment_environment_uuid,
        branch_name: id.branch_name.clone(),
        aud: id.aud.clone(),
    }
}

/// The audit record of an exchange in progress: if the exchange is dropped
/// before it finishes, the record is written as `failed` / `request.abandoned`.
struct Pending<'a> {
    sink: &'a AuditSink,
    record: Option<AuditRecord>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.outcome = AuditOutcome::Failed;
            r.error_code = Some(AuditOnlyCode::Abandoned.as_str());
            self.sink.write_detached(&r);
        }
    }
}

/// Copies the verified identity into the audit line (claim names as Bitbucket's).
fn record_identity(audit: &mut AuditRecord, id: &BitbucketIdentity) {
    audit.issuer = Some(id.issuer.clone());
    audit.sub = Some(id.sub.clone());
    audit.workspace_uuid = Some(id.workspace_uuid.braced());
    audit.repository_uuid = Some(id.repository_uuid.braced());
    audit.pipeline_uuid = Some(id.pipeline_uuid.braced());
    audit.pipeline_run_uuid = id.pipeline_run_uuid.map(|u| u.braced());
    audit.step_uuid = Some(id.step_uuid.braced());
    audit.deployment_environment_uuid = id.deployment_environment_uuid.map(|u| u.braced());
    audit.branch_name = id.branch_name.clone();
    audit.aud = id.aud.clone();
}

/// Everything an exchange needs. Cheap to share behind an `Arc`.
pub struct Exchange {
    /// Bitbucket token verification.
    pub verifier: Verifier,
    /// The active policies.
    pub policies: Arc<PolicyStore>,
    /// Keycloak.
    pub keycloak: KeycloakClient,
    /// Per-identity limiter.
    pub limiter: Arc<dyn ExchangeLimiter>,
    /// Default limits (a grant may override them).
    pub limits: Limits,
    /// Audit trail.
    pub audit: AuditSink,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Exchange {
    /// Runs the exchange and writes its audit line (module docs: the order of
    /// steps). A token is returned only after its audit line was written. If the
    /// exchange is dropped before it finishes (shutdown after the grace period),
    /// a `failed` line with `request.abandoned` is queued for it.
    ///
    /// # Errors
    /// [`ExchangeError`]; the audit line and metrics are written either way.
    pub async fn exchange(
        &self,
        ctx: &Context,
        req: TokenRequest,
    ) -> Result<Issued, ExchangeError> {
        let mut record = self.record(ctx);
        record.audience = Some(req.audience.clone());
        record.requested_scopes = req.scopes.clone();
        self.audited(record, async |audit| self.run(req, audit).await)
            .await
    }

    /// Runs `run` with the request's audit record, then writes the record
    /// ([`Exchange::finish`]); if dropped before finishing, the record is
    /// written as abandoned ([`Pending`]).
    async fn audited<T>(
        &self,
        record: AuditRecord,
        run: impl AsyncFnOnce(&mut AuditRecord) -> Result<T, ExchangeError>,
    ) -> Result<T, ExchangeError> {
        let started = Instant::now();
        let mut pending = Pending {
            sink: &self.audit,
            record: Some(record),
        };
        let result = match pending.record.as_mut() {
            Some(audit) => run(audit).await,
            None => Err(ExchangeError::AuditUnavailable),
        };
        let audit = pending.record.take().unwrap_or_default();
        self.finish(audit, result, started).await
    }

    /// Audits a request refused before the exchange (bad form, body, content
    /// type) and returns it as an [`ExchangeError`].
    pub async fn refuse(&self, ctx: &Context, e: RequestError) -> ExchangeError {
        self.refuse_as(ctx, AuditEvent::Exchange, e).await
    }

    /// [`Exchange::refuse`] for a `POST /grants` request.
    pub async fn refuse_grants(&self, ctx: &Context, e: RequestError) -> ExchangeError {
        self.refuse_as(ctx, AuditEvent::Grants, e).await
    }

    async fn refuse_as(&self, ctx: &Context, event: AuditEvent, e: RequestError) -> ExchangeError {
        let mut audit = self.record(ctx);
        audit.event = event;
        match self
            .finish(audit, Err::<(), _>(e.into()), Instant::now())
            .await
        {
            Ok(()) => ExchangeError::AuditUnavailable,
            Err(e) => e,
        }
    }

    /// `POST /grants`: what this identity may obtain now (module docs of
    /// [`crate::policy::Offer`]). Verifies the subject token exactly as an
    /// exchange does, counts against the step's own listing budget
    /// ([`Limits::grants_per_step_per_minute`]), evaluates the policies, never
    /// calls Keycloak, and writes an audit line (`event: grants`).
    ///
    /// # Errors
    /// [`ExchangeError::Token`], [`ExchangeError::Limited`] (`grants`),
    /// [`ExchangeError::AuditUnavailable`].
    pub async fn grants(
        &self,
        ctx: &Context,
        req: GrantsRequest,
    ) -> Result<GrantList, ExchangeError> {
        let mut record = self.record(ctx);
        record.event = AuditEvent::Grants;
        self.audited(record, async |audit| self.list(req, audit).await)
            .await
    }

    async fn list(
        &self,
        req: GrantsRequest,
        audit: &mut AuditRecord,
    ) -> Result<GrantList, ExchangeError> {
        let identity = self.verify(&req.subject_token, audit).await?;
        let per_minute = self.limits.grants_per_step_per_minute;
        let key = format!("grants:step:{}", identity.step_uuid.bare());
        self.count(LimitKind::Grants, &key, per_minute).await?;
        let subject = subject_of(&identity);
        let policies = self.policies.current();
        let repository = policies
            .inventory()
            .repository(&identity.repository_uuid)
            .map(|r| r.full_name().to_string());
        audit.repository_full_name = repository.clone();
        let phase = Instant::now();
        let grants = policies.offers(&subject, std::time::SystemTime::now());
        self.metrics.observe("policy", phase);
        let mut listed: Vec<String> = grants.iter().map(|o| o.audience.clone()).collect();
        listed.dedup();
        audit.listed_audiences = Some(listed);
        Ok(GrantList {
            identity: subject,
            repository,
            grants,
        })
    }

    fn record(&self, ctx: &Context) -> AuditRecord {
        let mut audit = AuditRecord::new(ctx.request_id.clone());
        audit.client_address = ctx.client_address.clone();
        audit
    }

    async fn run(
        &self,
        req: TokenRequest,
        audit: &mut AuditRecord,
    ) -> Result<Issued, ExchangeError> {
        let identity = self.verify(&req.subject_token, audit).await?;
        let subject = subject_of(&identity);
        let policies = self.policies.current();
        audit.repository_full_name = policies
            .inventory()
            .repository(&identity.repository_uuid)
            .map(|r| r.full_name().to_string());
        let grant = self.decide(&policies, &subject, &req, audit)?;
        self.limit(&identity, &grant).await?;
        let issued = self.obtain(&grant, &identity, audit).await?;
        audit.granted_scopes = Scopes::parse(&issued.scope).unwrap_or_default();
        audit.expires_in = Some(issued.expires_in);
        audit.token_sha256 = Some(issued.access_token.sha256_hex());
        audit.token_jti = issued.jti.clone();
        Ok(Issued {
            access_token: issued.access_token,
            expires_in: issued.expires_in,
            scope: issued.scope,
        })
    }

    /// Step 1: the Bitbucket token.
    async fn verify(
        &self,
        token: &SecretToken,
        audit: &mut AuditRecord,
    ) -> Result<BitbucketIdentity, ExchangeError> {
        let phase = Instant::now();
        let verified = self.verifier.verify(token).await;
        self.metrics.observe("verify", phase);
        match verified {
            Ok(id) => {
                record_identity(audit, &id);
                Ok(id)
            }
            Err(e) => {
                if let VerifyError::UntrustedIssuer(iss) = &e {
                    // The refused (untrusted, truncated) issuer, for the investigation.
                    audit.issuer = Some(iss.clone());
                }
                tracing::info!(error_code = e.code(), error = %crate::telemetry::chain(&e), "subject token refused");
                Err(ExchangeError::Token(e))
            }
        }
    }

    /// Step 2: the policies (this request keeps the set it started with, even
    /// across a reload).
    fn decide(
        &self,
        policies: &crate::policy::PolicySet,
        subject: &Subject,
        req: &TokenRequest,
        audit: &mut AuditRecord,
    ) -> Result<Grant, ExchangeError> {
        let phase = Instant::now();
        let eval = EvalRequest {
            subject,
            audience: &req.audience,
            scopes: &req.scopes,
            now: std::time::SystemTime::now(),
        };
        let outcome = policies.decide(&eval);
        self.metrics.observe("policy", phase);
        // The trace text is built only when it is logged.
        if tracing::enabled!(tracing::Level::DEBUG) {
            let d = policies.evaluate(&eval);
            tracing::debug!(trace = ?d.trace, omitted = d.omitted, excluded = d.excluded, "policy decision trace");
        }
        match outcome {
            Outcome::Allow(g) => {
                audit.policy = Some(g.policy.clone());
                audit.keycloak_client = Some(g.client.clone());
                Ok(g)
            }
            Outcome::Deny { reason, policy } => {
                tracing::info!(
                    error_code = reason.code(),
                    policy = policy.as_deref().unwrap_or("-"),
                    "exchange denied by policy"
                );
                audit.policy = policy;
                let description = reason.public_message(subject, &req.audience);
                Err(ExchangeError::Denied {
                    reason,
                    description,
                })
            }
        }
    }

    /// The shared upstreams now, for `/upstreamz` and the `sts_upstream_up`
    /// gauge: Keycloak's discovery (`Ok` or its error code) and the limit store
    /// (its name, or a short reason).
    pub async fn probe_upstreams(
        &self,
    ) -> (Result<(), &'static str>, Result<&'static str, String>) {
        let kc = self
            .keycloak
            .check_discovery()
            .await
            .map(|_| ())
            .map_err(|e| e.code());
        let store = self.limiter.health().await;
        if let Err(code) = &kc {
            tracing::warn!(
                error_code = code,
                "upstream probe: Keycloak discovery failed"
            );
        }
        if let Err(reason) = &store {
            tracing::warn!(reason = %reason, "upstream probe: limit store unavailable");
        }
        let up = |ok: bool| i64::from(ok);
        self.metrics
            .upstream_up
            .with_label_values(&["keycloak"])
            .set(up(kc.is_ok()));
        self.metrics
            .upstream_up
            .with_label_values(&["limit_store"])
            .set(up(store.is_ok()));
        (kc, store)
    }

    /// Counts one request against one limit.
    async fn count(
        &self,
        limit: LimitKind,
        key: &str,
        per_minute: NonZeroU32,
    ) -> Result<(), ExchangeError> {
        match self.limiter.check(key, per_minute).await {
            Ok(()) => Ok(()),
            Err(Refusal::Exceeded(wait)) => {
                self.metrics
                    .rate_limited
                    .with_label_values(&[limit.as_str()])
                    .inc();
                tracing::info!(limit = limit.as_str(), per_minute, "rate-limited");
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Err(ExchangeError::Limited {
                    limit,
                    per_minute,
                    retry_after_seconds: seconds.max(1),
                })
            }
            Err(Refusal::StoreUnavailable) => Err(ExchangeError::LimitStoreUnavailable),
        }
    }

    /// Step 3: per-identity limits (the grant's overrides, else the defaults).
    async fn limit(&self, id: &BitbucketIdentity, grant: &Grant) -> Result<(), ExchangeError> {
        let checks = [
            (
                LimitKind::Step,
                format!("step:{}", id.step_uuid.bare()),
                grant
                    .per_step_per_minute
                    .unwrap_or(self.limits.per_step_per_minute),
            ),
            (
                LimitKind::Repository,
                format!("repository:{}", id.repository_uuid.bare()),
                grant
                    .per_repository_per_minute
                    .unwrap_or(self.limits.per_repository_per_minute),
            ),
        ];
        for (limit, key, per_minute) in checks {
            self.count(limit, &key, per_minute).await?;
        }
        Ok(())
    }

    /// Step 4: Keycloak, with the grant the policy's client uses: its own
    /// service-account token (client_credentials), or a token of the repository's
    /// Keycloak user (JWT Authorization Grant) for the grant's `identity`.
    async fn obtain(
        &self,
        grant: &Grant,
        id: &BitbucketIdentity,
        audit: &mut AuditRecord,
    ) -> Result<crate::keycloak::IssuedToken, ExchangeError> {
        use crate::domain::identity::{IdentityKind, RepositoryIdentity};
        let phase = Instant::now();
        let issued = match self.keycloak.grant_mode(&grant.client) {
            GrantMode::ClientCredentials => {
                self.keycloak
                    .client_credentials(&grant.client, &grant.scopes, grant.max_lifetime_seconds)
                    .await
            }
            GrantMode::JwtAuthorizationGrant => {
                let environment = match grant.identity.unwrap_or_default() {
                    IdentityKind::Repository => None,
                    IdentityKind::RepositoryEnvironment => {
                        // The policy requires a deployment environment (checked at load).
                        let Some(e) = id.deployment_environment_uuid else {
                            return Err(ExchangeError::Denied {
                                reason: DenyKind::EnvironmentMissing,
                                description: format!(
                                    "`{}` requires a deployment step; the token has no deploymentEnvironmentUuid",
                                    grant.audience
                                ),
                            });
                        };
                        Some(e)
                    }
                };
                let identity = RepositoryIdentity {
                    workspace: id.workspace_uuid,
                    repository: id.repository_uuid,
                    environment,
                };
                audit.identity = Some(identity.subject());
                self.keycloak
                    .jwt_authorization_grant(
                        &grant.client,
                        &identity,
                        &grant.scopes,
                        grant.max_lifetime_seconds,
                    )
                    .await
                    .map(|(issued, jti)| {
                        audit.identity_assertion_jti = Some(jti);
                        issued
                    })
            }
        };
        self.metrics.observe("keycloak", phase);
        let issued = issued.map_err(|e| {
            tracing::warn!(error_code = e.code(), error = %crate::telemetry::chain(&e), client = %grant.client, "Keycloak exchange failed");
            ExchangeError::Keycloak(e)
        })?;
        audit.keycloak_user_id = issued.subject.clone();
        Ok(issued)
    }

    /// Step 5: the audit line, then metrics. A token whose line is not written
    /// is withheld (`audit.unavailable`).
    async fn finish<T>(
        &self,
        mut audit: AuditRecord,
        result: Result<T, ExchangeError>,
        started: Instant,
    ) -> Result<T, ExchangeError> {
        audit.outcome = match &result {
            Ok(_) => AuditOutcome::Allowed,
            Err(e) => e.outcome(),
        };
        audit.error_code = result.as_ref().err().map(ExchangeError::code);
        // A token waits until its line is written; a denial only queues its line.
        let written = if audit.outcome == AuditOutcome::Allowed {
            self.audit.write(&audit).await
        } else {
            self.audit.queue(&audit)
        };
        let result = match written {
            Ok(()) => result,
            Err(e) => {
                self.metrics
                    .audit_failures
                    .with_label_values(&[audit.outcome.as_str()])
                    .inc();
                tracing::error!(error = %e, outcome = audit.outcome.as_str(), "audit line lost");
                if audit.outcome == AuditOutcome::Allowed {
                    audit.outcome = AuditOutcome::Failed;
                    audit.error_code = Some(ExchangeError::AuditUnavailable.code());
                    Err(ExchangeError::AuditUnavailable)
                } else {
                    result
                }
            }
        };
        if audit.event == AuditEvent::Grants {
            self.metrics
                .grants
                .with_label_values(&[audit.outcome.as_str(), audit.error_code.unwrap_or("")])
                .inc();
            return result;
        }
        self.metrics.observe("total", started);
        self.metrics
            .exchanges
            .with_label_values(&[
                audit.outcome.as_str(),
                audit.error_code.unwrap_or(""),
                audit.policy.as_deref().unwrap_or(""),
            ])
            .inc();
        if let Some(repo) = audit
            .repository_full_name
            .as_deref()
            .or(audit.repository_uuid.as_deref())
        {
            self.metrics
                .exchanges_by_repository
                .with_label_values(&[repo, audit.outcome.as_str()])
                .inc();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
            .into_bytes()
    }

    const OK: [(&str, &str); 4] = [
        ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
        ("subject_token", "a.b.c"),
        ("subject_token_type", TOKEN_TYPE_ID_TOKEN),
        ("audience", "deploy-api"),
    ];

    #[test]
    fn a_complete_form_parses() {
        let mut pairs = OK.to_vec();
        pairs.push(("scope", " b a b "));
        pairs.push(("unknown", "ignored"));
        let r = TokenRequest::from_form(&form(&pairs)).unwrap();
        assert_eq!(r.audience, "deploy-api");
        assert_eq!(r.scopes.to_string(), "b a");
        assert!(!format!("{r:?}").contains("a.b.c"));
    }

    #[test]
    fn every_form_error_has_its_code() {
        let with = |k: &'static str, v: &'static str| {
            let mut p: Vec<(&str, &str)> = OK.iter().filter(|(n, _)| *n != k).copied().collect();
            p.push((k, v));
            p
        };
        let without = |k: &str| {
            OK.iter()
                .filter(|(n, _)| *n != k)
                .copied()
                .collect::<Vec<_>>()
        };
        let many_scopes = vec!["s"; 33]
            .iter()
            .enumerate()
            .map(|(i, _)| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut too_many = OK.to_vec();
        too_many.push(("scope", &many_scopes));
        let mut repeated = OK.to_vec();
        repeated.push(("audience", "x"));
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (without("grant_type"), "request.missing_grant_type"),
            (
                with("grant_type", "client_credentials"),
                "request.unsupported_grant_type",
            ),
            (without("subject_token"), "request.missing_subject_token"),
            (with("subject_token", "  "), "request.missing_subject_token"),
            (
                without("subject_token_type"),
                "request.missing_subject_token_type",
            ),
            (
                with("subject_token_type", "urn:x"),
                "request.unsupported_subject_token_type",
            ),
            (
                with("requested_token_type", "urn:x"),
                "request.unsupported_requested_token_type",
            ),
            (without("audience"), "request.missing_audience"),
            (with("audience", "a b"), "request.invalid_audience"),
            (with("scope", "ok \"bad\""), "request.invalid_scope_syntax"),
            (with("actor_token", "x"), "request.unsupported_parameter"),
            (with("resource", "x"), "request.unsupported_parameter"),
            (too_many, "request.too_many_scopes"),
            (repeated, "request.repeated_parameter"),
        ];
        for (pairs, code) in cases {
            let e = TokenRequest::from_form(&form(&pairs)).unwrap_err();
            assert_eq!(e.code(), code, "{pairs:?}");
            assert!(!e.public_message().is_empty());
        }
    }
}
