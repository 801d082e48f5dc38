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
//! Sources: `shared/reference/bitbucket-oidc.md` §2–3; RFC 7519 §7.2; RFC 8725 §3.1, §3.8–3.10.
//!
//! Order of checks (cheap and offline first): size → shape → header (`crit`) →
//! unverified `iss` against the allow-list → header `alg` → key by `kid` → signature
//! → registered claims → Bitbucket claims.

pub mod error;
pub mod jwks;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use serde::{Deserialize, Serialize};

use crate::configuration::WorkspaceSettings;
use crate::domain::{BbUuid, SecretToken};
pub use error::VerifyError;
use jwks::{KeyCache, Lookup};

/// Longest `kid` accepted, in bytes.
pub const MAX_KID_BYTES: usize = 256;

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
    /// `exp`, seconds since the epoch.
    pub exp: u64,
    /// `iat`, seconds since the epoch.
    pub iat: u64,
}

/// `aud`: a string or an array of strings (RFC 7519 §4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Claims as deserialised after the signature check. Types are strict (numbers
/// are numbers); presence and shape are checked afterwards so errors can name the claim.
#[derive(Deserialize)]
struct RawClaims {
    iss: Option<String>,
    sub: Option<String>,
    exp: Option<u64>,
    iat: Option<u64>,
    nbf: Option<u64>,
    aud: Option<Audience>,
    #[serde(rename = "workspaceUuid")]
    workspace_uuid: Option<String>,
    #[serde(rename = "repositoryUuid")]
    repository_uuid: Option<String>,
    #[serde(rename = "pipelineUuid")]
    pipeline_uuid: Option<String>,
    #[serde(rename = "stepUuid")]
    step_uuid: Option<String>,
    #[serde(rename = "branchName")]
    branch_name: Option<String>,
    #[serde(rename = "deploymentEnvironmentUuid")]
    deployment_environment_uuid: Option<String>,
    #[serde(rename = "pipelineRunUuid")]
    pipeline_run_uuid: Option<String>,
}

/// A JSON object whose top-level member names are unique (RFC 7515 §5.2 step 4,
/// RFC 7519 §4: duplicate names are rejected rather than "last one wins").
pub struct StrictObject(pub serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StrictObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<StrictObject, A::Error> {
                let mut m = serde_json::Map::new();
                while let Some((k, v)) = a.next_entry::<String, serde_json::Value>()? {
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom("duplicate member"));
                    }
                    m.insert(k, v);
                }
                Ok(StrictObject(m))
            }
        }
        d.deserialize_map(V)
    }
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
    leeway: Duration,
    max_token_bytes: usize,
    max_lifetime: Duration,
}

impl Verifier {
    /// Creates a verifier over the trusted workspaces.
    pub fn new(workspaces: Vec<WorkspaceSettings>, keys: Arc<KeyCache>, rules: TokenRules) -> Self {
        Self {
            workspaces,
            keys,
            leeway: rules.leeway,
            max_token_bytes: rules.max_token_bytes,
            max_lifetime: rules.max_lifetime,
        }
    }

    /// The trusted workspaces.
    pub fn workspaces(&self) -> &[WorkspaceSettings] {
        &self.workspaces
    }

    /// Verifies `token` (surrounding whitespace ignored). See the module docs for the rules.
    ///
    /// # Errors
    /// A [`VerifyError`]; only [`VerifyError::KeysUnavailable`] is an outage rather than a bad token.
    pub async fn verify(&self, token: &SecretToken) -> Result<BitbucketIdentity, VerifyError> {
        let raw = token.expose().trim();
        if raw.len() > self.max_token_bytes {
            return Err(VerifyError::TooLarge {
                len: raw.len(),
                max: self.max_token_bytes,
            });
        }
        let segments: Vec<&str> = raw.split('.').collect();
        let [h, p, s] = segments.as_slice() else {
            return Err(VerifyError::Malformed(format!(
                "{} segments, expected 3",
                segments.len()
            )));
        };
        let header = decode_segment(h, "header")?;
        if header.contains_key("crit") {
            return Err(VerifyError::CriticalHeader);
        }
        for member in ["typ", "cty"] {
            if header.get(member).is_some_and(|v| !v.is_string()) {
                return Err(VerifyError::Malformed(format!(
                    "header `{member}` is not a string"
                )));
            }
        }
        let payload = decode_segment(p, "payload")?;
        let iss = match payload.get("iss") {
            None => return Err(VerifyError::MissingClaim("iss")),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(VerifyError::InvalidClaim {
                    claim: "iss",
                    reason: "not a string".into(),
                })
            }
        };
        // Time claims must be NumericDate (RFC 7519 §2): reject strings early.
        for claim in ["exp", "iat", "nbf"] {
            if let Some(v) = payload.get(claim) {
                if !v.is_u64() {
                    return Err(VerifyError::InvalidClaim {
                        claim,
                        reason: "not a non-negative integer NumericDate".into(),
                    });
                }
            }
        }
        let header_alg = header
            .get("alg")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let header_kid = match header.get("kid") {
            None => None,
            Some(serde_json::Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(VerifyError::Malformed("kid is not a string".into())),
        };
        let ws = self
            .workspaces
            .iter()
            .find(|w| w.issuer == iss)
            .ok_or_else(|| VerifyError::UntrustedIssuer(crate::domain::truncate(&iss, 200)))?;
        let alg = header_alg.unwrap_or_default();
        if jsonwebtoken::Algorithm::from_str(&alg).ok() != Some(ws.algorithm) {
            return Err(VerifyError::DisallowedAlgorithm {
                found: crate::domain::truncate(&alg, 20),
                expected: format!("{:?}", ws.algorithm),
            });
        }
        if s.is_empty() {
            return Err(VerifyError::BadSignature);
        }
        if let Some(kid) = &header_kid {
            if kid.len() > MAX_KID_BYTES || kid.chars().any(char::is_control) {
                return Err(VerifyError::Malformed(
                    "kid is too long or has control characters".into(),
                ));
            }
        }
        // The (unverified) `iat` only decides whether an unknown `kid` may refetch.
        let unverified_iat = payload.get("iat").and_then(serde_json::Value::as_u64);
        let candidates = match self
            .keys
            .lookup(
                ws,
                header_kid.as_deref(),
                unverified_iat,
                self.leeway.as_secs(),
            )
            .await
            .map_err(VerifyError::KeysUnavailable)?
        {
            Lookup::Found(k) => k,
            Lookup::Unknown => {
                return Err(VerifyError::UnknownKey(crate::domain::truncate(
                    header_kid.as_deref().unwrap_or("<none>"),
                    64,
                )))
            }
        };

        // Signature over the exact received bytes `header.payload`, with each
        // candidate key (one, unless the issuer publishes duplicate or no `kid`s)
        // and the configured algorithm (jsonwebtoken's crypto, aws-lc-rs).
        let signing_input = raw
            .get(..h.len() + 1 + p.len())
            .ok_or(VerifyError::BadSignature)?;
        let mut verified = false;
        for key in &candidates {
            match jsonwebtoken::crypto::verify(s, signing_input.as_bytes(), key, ws.algorithm) {
                Ok(true) => {
                    verified = true;
                    break;
                }
                Ok(false) => {}
                Err(e) => return Err(map_jwt_error(e)),
            }
        }
        if !verified {
            return Err(VerifyError::BadSignature);
        }

        // Claims: the payload parsed once above (no duplicate names), now typed.
        let claims: RawClaims =
            serde_path_to_error::deserialize(serde_json::Value::Object(payload)).map_err(|e| {
                let path = e.path().to_string();
                VerifyError::InvalidClaim {
                    claim: claim_name(&path),
                    reason: "wrong type".into(),
                }
            })?;
        let now = now_secs();
        let leeway = self.leeway.as_secs();
        // RFC 7519 §4.1.4 exp, §4.1.5 nbf (with leeway); §4.1.3 aud (any element).
        let exp = claims.exp.ok_or(VerifyError::MissingClaim("exp"))?;
        if exp.saturating_add(leeway) < now {
            return Err(VerifyError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(leeway))
        {
            return Err(VerifyError::NotYetValid);
        }
        let accepted = match &claims.aud {
            None => return Err(VerifyError::MissingClaim("aud")),
            Some(Audience::One(a)) => ws.audiences.iter().any(|x| x == a),
            Some(Audience::Many(v)) => v.iter().any(|a| ws.audiences.iter().any(|x| x == a)),
        };
        if !accepted {
            return Err(VerifyError::AudienceNotAccepted);
        }
        if claims.sub.is_none() {
            return Err(VerifyError::MissingClaim("sub"));
        }
        check_claims(claims, ws, self.leeway, self.max_lifetime, now_secs())
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn decode_segment(
    seg: &str,
    what: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, VerifyError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seg)
        .map_err(|_| VerifyError::Malformed(format!("{what} is not base64url")))?;
    serde_json::from_slice::<StrictObject>(&bytes)
        .map(|o| o.0)
        .map_err(|e| {
            VerifyError::Malformed(format!("{what} is not a JSON object: {}", e.classify_str()))
        })
}

/// Maps a serde path back to the static claim name for messages.
fn claim_name(path: &str) -> &'static str {
    const NAMES: [&str; 13] = [
        "iss",
        "sub",
        "exp",
        "iat",
        "nbf",
        "workspaceUuid",
        "repositoryUuid",
        "pipelineUuid",
        "stepUuid",
        "branchName",
        "deploymentEnvironmentUuid",
        "pipelineRunUuid",
        "aud",
    ];
    NAMES.into_iter().find(|n| *n == path).unwrap_or("payload")
}

trait Classify {
    fn classify_str(&self) -> &'static str;
}
impl Classify for serde_json::Error {
    fn classify_str(&self) -> &'static str {
        if self.to_string().contains("duplicate") {
            "duplicate member"
        } else {
            match self.classify() {
                serde_json::error::Category::Io => "io",
                serde_json::error::Category::Syntax => "syntax error",
                serde_json::error::Category::Data => "wrong shape",
                serde_json::error::Category::Eof => "truncated",
            }
        }
    }
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> VerifyError {
    match e.kind() {
        ErrorKind::InvalidSignature => VerifyError::BadSignature,
        ErrorKind::ExpiredSignature => VerifyError::Expired,
        ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
        ErrorKind::InvalidAudience => VerifyError::AudienceNotAccepted,
        ErrorKind::InvalidIssuer => VerifyError::UntrustedIssuer("(mismatch)".into()),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            VerifyError::DisallowedAlgorithm {
                found: "?".into(),
                expected: "configured".into(),
            }
        }
        ErrorKind::MissingRequiredClaim(c) => VerifyError::MissingClaim(match c.as_str() {
            "exp" => "exp",
            "iss" => "iss",
            "aud" => "aud",
            "sub" => "sub",
            _ => "nbf",
        }),
        ErrorKind::InvalidClaimFormat(c) => VerifyError::InvalidClaim {
            claim: if c == "exp" { "exp" } else { "nbf" },
            reason: "not a number".into(),
        },
        // The payload was already parsed as a JSON object; what jsonwebtoken fails
        // to parse here is the header (a standard member of the wrong type).
        ErrorKind::Json(err) => VerifyError::Malformed(format!(
            "header member of the wrong type: {}",
            err.classify_str()
        )),
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidToken => {
            VerifyError::Malformed("not a compact JWS".into())
        }
        _ => VerifyError::Malformed(format!("{:?}", e.kind()).chars().take(60).collect()),
    }
}

fn braced(claim: &'static str, v: Option<String>) -> Result<BbUuid, VerifyError> {
    let v = v.ok_or(VerifyError::MissingClaim(claim))?;
    BbUuid::parse_braced(&v).map_err(|_| VerifyError::InvalidClaim {
        claim,
        reason: "not a braced UUID".into(),
    })
}

fn opt_braced(claim: &'static str, v: Option<String>) -> Result<Option<BbUuid>, VerifyError> {
    v.map(|s| braced(claim, Some(s))).transpose()
}

fn check_claims(
    c: RawClaims,
    ws: &WorkspaceSettings,
    leeway: Duration,
    max_lifetime: Duration,
    now: u64,
) -> Result<BitbucketIdentity, VerifyError> {
    let exp = c.exp.ok_or(VerifyError::MissingClaim("exp"))?;
    let iat = c.iat.ok_or(VerifyError::MissingClaim("iat"))?;
    if iat > now.saturating_add(leeway.as_secs()) {
        return Err(VerifyError::IssuedInFuture);
    }
    if iat > exp {
        return Err(VerifyError::InvalidClaim {
            claim: "iat",
            reason: "after exp".into(),
        });
    }
    if exp - iat > max_lifetime.as_secs() {
        return Err(VerifyError::LifetimeTooLong {
            lifetime: exp - iat,
            max: max_lifetime.as_secs(),
        });
    }
    let sub = c.sub.ok_or(VerifyError::MissingClaim("sub"))?;
    let issuer = c.iss.ok_or(VerifyError::MissingClaim("iss"))?;
    let workspace_uuid = braced("workspaceUuid", c.workspace_uuid)?;
    let repository_uuid = braced("repositoryUuid", c.repository_uuid)?;
    let pipeline_uuid = braced("pipelineUuid", c.pipeline_uuid)?;
    let step_uuid = braced("stepUuid", c.step_uuid)?;
    let deployment_environment_uuid =
        opt_braced("deploymentEnvironmentUuid", c.deployment_environment_uuid)?;
    let pipeline_run_uuid = opt_braced("pipelineRunUuid", c.pipeline_run_uuid)?;
    if workspace_uuid != ws.uuid {
        return Err(VerifyError::WorkspaceMismatch);
    }
    let parts: Vec<Option<BbUuid>> = sub
        .split(':')
        .map(|p| BbUuid::parse_braced(p).ok())
        .collect();
    let consistent = match (parts.as_slice(), deployment_environment_uuid) {
        ([Some(r), Some(s)], None) => *r == repository_uuid && *s == step_uuid,
        ([Some(r), Some(e), Some(s)], Some(env)) => {
            *r == repository_uuid && *e == env && *s == step_uuid
        }
        _ => false,
    };
    if !consistent {
        return Err(VerifyError::SubjectMismatch);
    }
    let branch_name = c.branch_name.filter(|b| !b.is_empty());
    if let Some(b) = &branch_name {
        // Control characters, and invisible or direction-changing ones (zero-width,
        // bidi overrides, line/paragraph separators) that would make an audit line
        // read differently from what it records.
        let deceptive = |c: char| {
            c.is_control()
                || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
        };
        if b.len() > 1024 || b.chars().any(deceptive) {
            return Err(VerifyError::InvalidClaim {
                claim: "branchName",
                reason: "too long, or has control, invisible or bidi characters".into(),
            });
        }
    }
    Ok(BitbucketIdentity {
        issuer,
        workspace_slug: ws.slug.clone(),
        sub,
        workspace_uuid,
        repository_uuid,
        pipeline_uuid,
        step_uuid,
        branch_name,
        deployment_environment_uuid,
        pipeline_run_uuid,
        exp,
        iat,
    })
}

/// Builds an identity from a claims object **without** verifying anything: for
/// `policy explain` only, never on the request path. Only the claims policies use
/// matter: `workspaceUuid` and `repositoryUuid` are required (braces optional),
/// `branchName` and `deploymentEnvironmentUuid` optional; any other claim may be
/// absent (UUIDs then read as the nil UUID, `sub` as empty, times as 0).
///
/// # Errors
/// [`VerifyError`] when a claim policies use is missing or not a UUID.
pub fn unverified_identity_for_explain(
    claims: serde_json::Value,
    workspaces: &[WorkspaceSettings],
) -> Result<BitbucketIdentity, VerifyError> {
    let raw: RawClaims =
        serde_path_to_error::deserialize(claims).map_err(|e| VerifyError::InvalidClaim {
            claim: claim_name(&e.path().to_string()),
            reason: "wrong type".into(),
        })?;
    let uuid = |claim: &'static str, v: Option<String>| -> Result<Option<BbUuid>, VerifyError> {
        v.map(|s| {
            BbUuid::parse_lenient(&s).map_err(|_| VerifyError::InvalidClaim {
                claim,
                reason: "not a UUID".into(),
            })
        })
        .transpose()
    };
    let nil = BbUuid::parse_lenient("00000000-0000-0000-0000-000000000000")
        .map_err(|_| VerifyError::Malformed("nil uuid".into()))?;
    let workspace_uuid = uuid("workspaceUuid", raw.workspace_uuid)?
        .ok_or(VerifyError::MissingClaim("workspaceUuid"))?;
    let repository_uuid = uuid("repositoryUuid", raw.repository_uuid)?
        .ok_or(VerifyError::MissingClaim("repositoryUuid"))?;
    let slug = workspaces
        .iter()
        .find(|w| w.uuid == workspace_uuid)
        .map_or_else(|| "(not configured)".to_string(), |w| w.slug.clone());
    Ok(BitbucketIdentity {
        issuer: raw.iss.unwrap_or_default(),
        workspace_slug: slug,
        sub: raw.sub.unwrap_or_default(),
        workspace_uuid,
        repository_uuid,
        pipeline_uuid: uuid("pipelineUuid", raw.pipeline_uuid)?.unwrap_or(nil),
        step_uuid: uuid("stepUuid", raw.step_uuid)?.unwrap_or(nil),
        branch_name: raw.branch_name.filter(|b| !b.is_empty()),
        deployment_environment_uuid: uuid(
            "deploymentEnvironmentUuid",
            raw.deployment_environment_uuid,
        )?,
        pipeline_run_uuid: uuid("pipelineRunUuid", raw.pipeline_run_uuid)?,
        exp: raw.exp.unwrap_or(0),
        iat: raw.iat.unwrap_or(0),
    })
}

/// Decodes a compact JWS payload without verifying it (for `policy explain`).
///
/// # Errors
/// [`VerifyError::Malformed`].
pub fn unverified_payload(token: &SecretToken) -> Result<serde_json::Value, VerifyError> {
    let raw = token.expose().trim();
    let mut parts = raw.split('.');
    let payload = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(p), Some(_), None) => p,
        _ => return Err(VerifyError::Malformed("expected 3 segments".into())),
    };
    decode_segment(payload, "payload").map(serde_json::Value::Object)
}
