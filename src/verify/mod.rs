//! Verification of Bitbucket Pipelines OIDC ID tokens.
//!
//! Contract: [`Verifier::verify`] returns a [`BitbucketIdentity`] only for a
//! token that is a compact JWS no larger than `max_token_bytes`, from a configured
//! workspace issuer (exact `iss` match, checked before any network call), signed
//! with that issuer's published key under the algorithm configured for the issuer
//! (the header's `alg` must equal it; it never selects one), with `exp`, `iat`,
//! `iss`, `aud`, `sub` present, `exp`/`iat`/`nbf` within the clock leeway, an
//! accepted audience (`aud` string or array: any element), and Bitbucket's claim
//! shapes (braced UUIDs, `workspaceUuid` of the issuer's workspace, `sub` =
//! `{repositoryUuid}:{stepUuid}` or `{repositoryUuid}:{deploymentEnvironmentUuid}:{stepUuid}`).
//! Sources: Atlassian, "Integrate Pipelines with resource servers using OIDC"
//! (issuer, claims, `aud`); RFC 7519 §7.2; RFC 8725 §3.1, §3.8–3.10.
//!
//! Order of checks (cheap and offline first): size → shape → header (`crit`) →
//! unverified `iss` against the allow-list → header `alg` → key by `kid` → signature
//! → registered claims → Bitbucket claims. The synchronous steps live in
//! [`jws`] (compact JWS, header rules, signature) and [`claims`] (claim rules,
//! given `now`); [`Verifier`] drives them around the one async step, the key lookup.

pub mod claims;
pub mod error;
pub mod jwks;
pub mod jws;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::domain::{BbUuid, SecretToken};
pub use error::{VerifyCode, VerifyError};
use jwks::{KeyCache, Lookup};
pub use jws::MAX_KID_BYTES;

/// One trusted Bitbucket workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceSettings {
    /// Workspace slug (the path segment of the issuer).
    pub slug: String,
    /// Workspace UUID; tokens must carry it as `workspaceUuid`.
    pub uuid: BbUuid,
    /// Exact issuer (`iss`) accepted for this workspace, no trailing slash.
    pub issuer: String,
    /// Audiences accepted in `aud` (any one element must match).
    pub audiences: Vec<String>,
    /// Signature algorithm required for this issuer's tokens. Defaults to RS256.
    pub algorithm: jsonwebtoken::Algorithm,
}

/// The verified identity of one pipeline step, with claim names as Bitbucket sends them.
#[derive(Debug, Clone, Serialize)]
pub struct BitbucketIdentity {
    /// `iss`.
    pub issuer: String,
    /// Slug of the configured workspace this issuer belongs to.
    pub workspace_slug: String,
    /// `sub`: `{repositoryUuid}[:{deploymentEnvironmentUuid}]:{stepUuid}`.
    pub sub: String,
    /// `workspaceUuid`.
    #[serde(rename = "workspaceUuid")]
    pub workspace_uuid: BbUuid,
    /// `repositoryUuid`.
    #[serde(rename = "repositoryUuid")]
    pub repository_uuid: BbUuid,
    /// `pipelineUuid`.
    #[serde(rename = "pipelineUuid")]
    pub pipeline_uuid: BbUuid,
    /// `stepUuid`.
    #[serde(rename = "stepUuid")]
    pub step_uuid: BbUuid,
    /// `branchName`; `None` when absent or empty (tag builds).
    #[serde(rename = "branchName")]
    pub branch_name: Option<String>,
    /// `deploymentEnvironmentUuid`; present only on deployment steps.
    #[serde(rename = "deploymentEnvironmentUuid")]
    pub deployment_environment_uuid: Option<BbUuid>,
    /// `pipelineRunUuid` (newer tokens only).
    #[serde(rename = "pipelineRunUuid")]
    pub pipeline_run_uuid: Option<BbUuid>,
    /// `aud` as a list (a string claim becomes one element), in the token's order.
    pub aud: Vec<String>,
    /// `exp`, seconds since the epoch.
    pub exp: u64,
    /// `iat`, seconds since the epoch.
    pub iat: u64,
}

/// The limits a token must keep, from configuration.
#[derive(Debug, Clone, Copy)]
pub struct TokenRules {
    /// Clock leeway for `exp`, `iat`, `nbf` (RFC 7519 §4.1.4: "small leeway").
    pub leeway: Duration,
    /// Largest accepted token, in bytes (checked before parsing).
    pub max_token_bytes: usize,
    /// Longest accepted `exp - iat`.
    pub max_lifetime: Duration,
}

/// Verifies Bitbucket tokens against the configured workspaces.
pub struct Verifier {
    workspaces: Vec<WorkspaceSettings>,
    keys: Arc<KeyCache>,
    rules: TokenRules,
}

impl Verifier {
    /// Creates a verifier over the trusted workspaces.
    pub fn new(workspaces: Vec<WorkspaceSettings>, keys: Arc<KeyCache>, rules: TokenRules) -> Self {
        Self {
            workspaces,
            keys,
            rules,
        }
    }

    /// The trusted workspaces.
    pub fn workspaces(&self) -> &[WorkspaceSettings] {
        &self.workspaces
    }

    /// Verifies `token` (surrounding whitespace ignored). See the module docs for the rules.
    ///
    /// # Errors
    /// A [`VerifyError`]; only [`VerifyError::KeysUnavailable`] is an upstream
    /// problem rather than a bad token.
    pub async fn verify(&self, token: &SecretToken) -> Result<BitbucketIdentity, VerifyError> {
        let jws = jws::parse(token.expose().trim(), self.rules.max_token_bytes)?;
        let iss = claims::precheck(&jws.payload)?;
        let ws = self
            .workspaces
            .iter()
            .find(|w| w.issuer == iss)
            .ok_or_else(|| VerifyError::UntrustedIssuer(crate::domain::truncate(iss, 200)))?;
        if jsonwebtoken::Algorithm::from_str(&jws.alg).ok() != Some(ws.algorithm) {
            return Err(VerifyError::DisallowedAlgorithm {
                found: crate::domain::truncate(&jws.alg, 20),
                expected: format!("{:?}", ws.algorithm),
            });
        }
        if jws.signature.is_empty() {
            return Err(VerifyError::BadSignature);
        }
        jws::check_kid(jws.kid.as_deref())?;
        let lookup = self
            .keys
            .lookup(ws, jws.kid.as_deref())
            .await
            .map_err(VerifyError::KeysUnavailable)?;
        let candidates = match lookup {
            Lookup::Found(k) => k,
            Lookup::Unknown => {
                let kid = jws.kid.as_deref().unwrap_or("<none>");
                return Err(VerifyError::UnknownKey(crate::domain::truncate(kid, 64)));
            }
        };
        jws::verify_signature(&jws, &candidates, ws.algorithm)?;
        claims::check(jws.payload, ws, &self.rules, now_secs())
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
