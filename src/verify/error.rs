//! Errors of Bitbucket token verification.

use crate::domain::error_code::error_codes;
use crate::http::Meaning;

error_codes! {
    /// The codes of [`VerifyError`]. [`VerifyError::KeysUnavailable`] has three,
    /// by what the fetch failure means.
    pub enum VerifyCode {
        /// [`VerifyError::TooLarge`].
        TooLarge = "token.too_large",
        /// [`VerifyError::Malformed`].
        Malformed = "token.malformed",
        /// [`VerifyError::CriticalHeader`].
        UnsupportedHeader = "token.unsupported_header",
        /// [`VerifyError::UntrustedIssuer`].
        UntrustedIssuer = "token.untrusted_issuer",
        /// [`VerifyError::DisallowedAlgorithm`].
        AlgorithmNotAllowed = "token.algorithm_not_allowed",
        /// [`VerifyError::UnknownKey`].
        UnknownKey = "token.unknown_key",
        /// [`VerifyError::KeysUnavailable`], [`Meaning::Transient`].
        IssuerKeysUnavailable = "token.issuer_keys_unavailable",
        /// [`VerifyError::KeysUnavailable`], [`Meaning::Configuration`].
        KeysMisconfigured = "issuer.keys_misconfigured",
        /// [`VerifyError::KeysUnavailable`], [`Meaning::Malformed`].
        KeysMalformed = "issuer.keys_malformed",
        /// [`VerifyError::BadSignature`].
        BadSignature = "token.bad_signature",
        /// [`VerifyError::Expired`].
        Expired = "token.expired",
        /// [`VerifyError::IssuedInFuture`].
        IssuedInFuture = "token.issued_in_future",
        /// [`VerifyError::NotYetValid`].
        NotYetValid = "token.not_yet_valid",
        /// [`VerifyError::LifetimeTooLong`].
        LifetimeTooLong = "token.lifetime_too_long",
        /// [`VerifyError::AudienceNotAccepted`].
        AudienceNotAccepted = "token.audience_not_accepted",
        /// [`VerifyError::MissingClaim`].
        MissingClaim = "token.missing_claim",
        /// [`VerifyError::InvalidClaim`].
        InvalidClaim = "token.invalid_claim",
        /// [`VerifyError::WorkspaceMismatch`].
        WorkspaceMismatch = "token.workspace_mismatch",
        /// [`VerifyError::SubjectMismatch`].
        SubjectMismatch = "token.subject_mismatch",
    }
}

/// Why a `subject_token` was not accepted. Each variant has a stable
/// [`code`](VerifyError::code) that callers, audit lines and alerts use.
/// Variants never carry the token, only facts about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Longer than `max_token_bytes` (checked before any parsing).
    #[error("token is {len} bytes, the limit is {max}")]
    TooLarge {
        /// Length in bytes.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// Not a compact JWS: segment count, base64url or JSON is wrong (a JWE has 5 segments).
    #[error("token is not a compact JWS: {0}")]
    Malformed(String),
    /// The header carries `crit` (RFC 7515 §4.1.11): we understand no extension, so we must reject.
    #[error("token header has a `crit` parameter")]
    CriticalHeader,
    /// `iss` is not one of the configured workspace issuers; no key was fetched.
    #[error("issuer `{0}` is not trusted")]
    UntrustedIssuer(String),
    /// Header `alg` is not the algorithm configured for this issuer.
    #[error("algorithm `{found}` is not allowed; this issuer signs with {expected}")]
    DisallowedAlgorithm {
        /// `alg` from the header (untrusted).
        found: String,
        /// The configured algorithm.
        expected: String,
    },
    /// No published key has this `kid` (in a key set fetched after the request
    /// arrived), or the token has no `kid` and the issuer publishes too many keys.
    #[error("no key `{0}` in the issuer's JWKS")]
    UnknownKey(String),
    /// The issuer's keys could not be fetched and none are cached (or a refetch an
    /// unknown `kid` needed failed): an upstream problem, not a bad token. Its code
    /// follows what the failure means (see [`super::jwks::FetchError::meaning`]).
    #[error("issuer keys unavailable")]
    KeysUnavailable(#[source] super::jwks::FetchError),
    /// The signature does not verify with the issuer's key.
    #[error("signature is invalid")]
    BadSignature,
    /// `exp` is in the past, beyond the leeway.
    #[error("token expired")]
    Expired,
    /// `iat` is in the future, beyond the leeway.
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `exp - iat` is longer than `max_subject_token_lifetime_seconds` (an absurd
    /// `exp`, or one written in milliseconds).
    #[error("token lifetime {lifetime} s exceeds the maximum {max} s")]
    LifetimeTooLong {
        /// `exp - iat`, seconds.
        lifetime: u64,
        /// Configured maximum, seconds.
        max: u64,
    },
    /// `nbf` is in the future, beyond the leeway.
    #[error("token not yet valid")]
    NotYetValid,
    /// No `aud` value is accepted for this workspace.
    #[error("audience not accepted")]
    AudienceNotAccepted,
    /// A required claim is missing.
    #[error("claim `{0}` is missing")]
    MissingClaim(&'static str),
    /// A claim has the wrong type or shape (e.g. `exp` as a string, an unbraced UUID).
    #[error("claim `{claim}` is invalid: {reason}")]
    InvalidClaim {
        /// Claim name as Bitbucket sends it.
        claim: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// `workspaceUuid` is not the workspace the issuer belongs to.
    #[error("workspaceUuid does not belong to issuer's workspace")]
    WorkspaceMismatch,
    /// `sub` is not `{repositoryUuid}:{stepUuid}` or `{repositoryUuid}:{deploymentEnvironmentUuid}:{stepUuid}`.
    #[error("sub does not agree with repositoryUuid / deploymentEnvironmentUuid / stepUuid")]
    SubjectMismatch,
}

impl VerifyError {
    /// This error's code (exhaustive: a new variant needs one).
    pub fn kind(&self) -> VerifyCode {
        match self {
            Self::TooLarge { .. } => VerifyCode::TooLarge,
            Self::Malformed(_) => VerifyCode::Malformed,
            Self::CriticalHeader => VerifyCode::UnsupportedHeader,
            Self::UntrustedIssuer(_) => VerifyCode::UntrustedIssuer,
            Self::DisallowedAlgorithm { .. } => VerifyCode::AlgorithmNotAllowed,
            Self::UnknownKey(_) => VerifyCode::UnknownKey,
            Self::KeysUnavailable(f) => match f.meaning() {
                Meaning::Transient => VerifyCode::IssuerKeysUnavailable,
                Meaning::Configuration => VerifyCode::KeysMisconfigured,
                Meaning::Malformed => VerifyCode::KeysMalformed,
            },
            Self::BadSignature => VerifyCode::BadSignature,
            Self::Expired => VerifyCode::Expired,
            Self::IssuedInFuture => VerifyCode::IssuedInFuture,
            Self::NotYetValid => VerifyCode::NotYetValid,
            Self::LifetimeTooLong { .. } => VerifyCode::LifetimeTooLong,
            Self::AudienceNotAccepted => VerifyCode::AudienceNotAccepted,
            Self::MissingClaim(_) => VerifyCode::MissingClaim,
            Self::InvalidClaim { .. } => VerifyCode::InvalidClaim,
            Self::WorkspaceMismatch => VerifyCode::WorkspaceMismatch,
            Self::SubjectMismatch => VerifyCode::SubjectMismatch,
        }
    }

    /// Stable error code, documented in the error-code table (docs/src/error-codes.md).
    pub fn code(&self) -> &'static str {
        self.kind().as_str()
    }

    /// The message the caller sees: fixed text plus, where useful, the claim
    /// name. Never contains token content, keys or configuration values.
    pub fn public_message(&self) -> String {
        match self {
            Self::TooLarge { max, .. } => format!("subject_token is larger than {max} bytes"),
            Self::Malformed(_) => "subject_token is not a signed JWT (compact JWS)".into(),
            Self::CriticalHeader => "subject_token header has an unsupported crit parameter".into(),
            Self::UntrustedIssuer(_) => "subject_token issuer is not a trusted Bitbucket workspace".into(),
            Self::DisallowedAlgorithm { .. } => "subject_token signature algorithm is not allowed".into(),
            Self::UnknownKey(_) => "subject_token is signed with a key the issuer does not publish".into(),
            Self::KeysUnavailable(f) => match f.meaning() {
                Meaning::Transient => "the issuer's signing keys cannot be fetched right now; retry after the Retry-After delay".into(),
                Meaning::Configuration => "the issuer's signing keys cannot be fetched: the operator must check this workspace's issuer setting".into(),
                Meaning::Malformed => "the issuer's signing keys cannot be read: the issuer answered with an invalid document".into(),
            },
            Self::BadSignature => "subject_token signature is invalid".into(),
            Self::Expired => "subject_token has expired".into(),
            Self::IssuedInFuture => "subject_token iat is in the future".into(),
            Self::NotYetValid => "subject_token is not valid yet (nbf)".into(),
            Self::LifetimeTooLong { max, .. } => format!("subject_token lifetime (exp - iat) is longer than {max} s"),
            Self::AudienceNotAccepted => "subject_token aud does not include an audience this service accepts; set the step's oidc audiences".into(),
            Self::MissingClaim(c) => format!("subject_token lacks the `{c}` claim"),
            Self::InvalidClaim { claim, .. } => format!("subject_token claim `{claim}` has the wrong type or shape"),
            Self::WorkspaceMismatch => "subject_token workspaceUuid does not match its issuer".into(),
            Self::SubjectMismatch => "subject_token sub does not agree with repositoryUuid, deploymentEnvironmentUuid and stepUuid".into(),
        }
    }
}
