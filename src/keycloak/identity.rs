//! The JWT Authorization Grant (RFC 7523 §2.1; Keycloak 26.6+ "JWT Authorization
//! Grant", supported without preview flags from 26.7.0 here): the service signs an
//! assertion naming a repository identity and Keycloak answers with a token of the
//! Keycloak user linked to it. The assertion key is separate from the
//! client-assertion key (`[signing]`) and published at its own JWKS URL, so
//! neither key can stand in for the other; [`IdentitySigner`] is the seam a KMS
//! could implement.

use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;
use serde::{Deserialize, Serialize};

use crate::domain::SecretToken;
use crate::signing::SigningKeys;

/// The grant the service uses with a Keycloak client (`[keycloak.clients.*] grant`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum GrantMode {
    /// RFC 6749 §4.4: the client's own service-account token (default).
    #[default]
    ClientCredentials,
    /// RFC 7523 §2.1: a token of the repository's Keycloak user.
    JwtAuthorizationGrant,
}

/// The path of the identity JWKS (the Keycloak identity provider's `jwksUrl`).
pub use crate::domain::identity::IDENTITY_JWKS_PATH;

/// `[identity]` settings.
pub struct IdentitySettings {
    /// The assertions' `iss`: `public_url` (the identity provider's `issuer`,
    /// compared as a string by Keycloak).
    pub issuer: String,
    /// The Keycloak identity provider's alias (`keycloak apply` creates it).
    pub provider_alias: String,
    /// The signer; `None` when the keys were not read (offline tools).
    pub signer: Option<Arc<dyn IdentitySigner>>,
    /// The signing algorithm (the identity provider pins it).
    pub algorithm: crate::signing::SigningAlgorithm,
}

impl std::fmt::Debug for IdentitySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentitySettings")
            .field("issuer", &self.issuer)
            .field("provider_alias", &self.provider_alias)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// How much earlier than `iat` + `max_lifetime_seconds` an assertion expires,
/// seconds: Keycloak's `jwtAuthorizationGrantAllowedClockSkew` as `apply` sets it.
pub const CLOCK_MARGIN_SECONDS: u64 = 5;

/// The claims of a repository assertion (RFC 7523 §3).
#[derive(Debug, Serialize)]
pub struct AssertionClaims {
    /// Our issuer URL.
    pub iss: String,
    /// The identity ([`crate::domain::identity::RepositoryIdentity::subject`]).
    pub sub: String,
    /// The realm issuer (one value: Keycloak refuses several).
    pub aud: String,
    /// Fresh per request (UUIDv4): Keycloak spends it even when it refuses the
    /// request, so a retry needs a new assertion.
    pub jti: String,
    /// Now, seconds.
    pub iat: u64,
    /// `iat` + the grant's `max_lifetime_seconds` − [`CLOCK_MARGIN_SECONDS`]:
    /// with the identity provider's `jwtAuthorizationGrantLimitAccessTokenExp`,
    /// the token ends here.
    pub exp: u64,
}

/// Why an assertion could not be signed.
#[derive(Debug, thiserror::Error)]
#[error("signing the identity assertion failed: {0}")]
pub struct SignError(pub String);

/// Signs repository assertions. The local implementation holds PEM keys; a KMS
/// implementation would call its signing API and publish its public keys.
#[async_trait::async_trait]
pub trait IdentitySigner: Send + Sync {
    /// The compact JWS of `claims` with header `alg`, `kid`, `typ: JWT`.
    ///
    /// # Errors
    /// [`SignError`], never holding key material.
    async fn sign(&self, claims: &AssertionClaims) -> Result<SecretToken, SignError>;
    /// The public keys to publish at [`IDENTITY_JWKS_PATH`].
    fn jwks(&self) -> JwkSet;
    /// The `kid` that signs now.
    fn kid(&self) -> String;
}

/// [`IdentitySigner`] over local keys (`[identity] key_files` / `key_env`): the
/// first key signs, all are published (rotation as for `[signing]`).
pub struct LocalSigner(pub SigningKeys);

#[async_trait::async_trait]
impl IdentitySigner for LocalSigner {
    async fn sign(&self, claims: &AssertionClaims) -> Result<SecretToken, SignError> {
        let key = self.0.active();
        let mut header = jsonwebtoken::Header::new(key.alg().jwt_alg());
        header.kid = Some(key.kid().to_string());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, key.encoding_key())
            .map(SecretToken::new)
            .map_err(|e| SignError(e.to_string()))
    }

    fn jwks(&self) -> JwkSet {
        self.0.jwks()
    }

    fn kid(&self) -> String {
        self.0.active().kid().to_string()
    }
}

/// How Keycloak refused a repository assertion: `invalid_grant` with an
/// `error_description` that names the cause. Matched on the descriptions of
/// Keycloak 26.7.0 and 26.7.3 (docs/src/error-codes.md); anything else is
/// [`IdentityRefusal::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityRefusal {
    /// "User not found": no user is linked to the identity (not provisioned, or
    /// the link was removed).
    NotProvisioned,
    /// "User is not enabled": an operator disabled the repository's user.
    Disabled,
    /// "Account is not fully set up": the user has required actions.
    NotReady,
    /// Signature, issuer, identity-provider or client settings refused: our
    /// configuration or Keycloak's disagree.
    Misconfigured,
    /// Any other description.
    Other,
}

impl IdentityRefusal {
    /// Classifies Keycloak's `error_description` for `invalid_grant`.
    pub fn from_description(d: &str) -> Self {
        match d {
            "User not found" => Self::NotProvisioned,
            "User is not enabled" => Self::Disabled,
            "Account is not fully set up" => Self::NotReady,
            "Invalid signature"
            | "Invalid signature algorithm"
            | "No Identity Provider for provided issuer"
            | "Identity Provider is not allowed for the client"
            | "JWT Authorization Grant is not supported for the requested client"
            | "Public client not allowed to use authorization grant"
            | "Invalid token audience"
            | "Multiple audiences not allowed"
            | "Token reuse detected"
            | "Token was issued too far in the past to be used now"
            | "Token was issued in the future"
            | "Token is not active" => Self::Misconfigured,
            _ => Self::Other,
        }
    }
}
