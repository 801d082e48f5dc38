//! Claim checks (RFC 7519 §4.1, Bitbucket's claim shapes), synchronous and given
//! the clock reading `now` (seconds since the epoch) as an argument, so every
//! rule is unit-testable with a fixed clock. Each check happens once.

use std::borrow::Cow;

use serde::de::{Error as _, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::{BitbucketIdentity, TokenRules, VerifyError};
use crate::domain::deceptive;
#[cfg(any(test, fuzzing))]
use crate::domain::json::StrictObject;
use crate::domain::BbUuid;
use crate::verify::WorkspaceSettings;

/// The payload of a token, read before any key is chosen.
///
/// `Typed` is the common case: the payload bytes read in one pass straight into
/// [`RawClaims`] (every claim of the right type, no member name twice). Any
/// payload that does not read that way is read again as a generic object with
/// unique member names (`Object`), which yields the same answers with the exact
/// error of the slower, claim-by-claim path: `precheck` reports `iss` and the
/// NumericDates before the signature is checked, `check` names any other
/// mistyped claim after it.
pub enum Payload {
    /// Read in one typed pass.
    Typed(Box<RawClaims>),
    /// A JSON object with unique member names, checked claim by claim.
    Object(serde_json::Map<String, serde_json::Value>),
}

impl Payload {
    /// Reads the decoded payload bytes as `jws::parse` does: typed, else as an
    /// object with unique member names.
    ///
    /// # Errors
    /// [`VerifyError::Malformed`]: not a JSON object, or a member name twice.
    #[cfg(any(test, fuzzing))]
    pub fn read(bytes: &[u8]) -> Result<Self, VerifyError> {
        if let Ok(OnePass(c)) = serde_json::from_slice::<OnePass>(bytes) {
            return Ok(Self::Typed(Box::new(c)));
        }
        serde_json::from_slice::<StrictObject>(bytes)
            .map(|o| Self::Object(o.0))
            .map_err(|e| {
                VerifyError::Malformed(format!("payload is not a JSON object: {}", classify(&e)))
            })
    }
}

/// A short, fixed description of a JSON error (no input echoed).
pub(super) fn classify(e: &serde_json::Error) -> &'static str {
    if e.to_string().contains("duplicate") {
        return "duplicate member";
    }
    match e.classify() {
        serde_json::error::Category::Io => "io",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "wrong shape",
        serde_json::error::Category::Eof => "truncated",
    }
}

/// `aud`: a string or an array of strings (RFC 7519 §4.1.3).
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Read by the JSON type it meets (not `#[serde(untagged)]`, which buffers the
/// value and builds an error for each variant it tries first).
impl<'de> Deserialize<'de> for Audience {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Audience;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Audience, E> {
                Ok(Audience::One(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Audience, E> {
                Ok(Audience::One(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Audience, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(2).min(16));
                while let Some(s) = a.next_element::<String>()? {
                    v.push(s);
                }
                Ok(Audience::Many(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Claims with strict types (numbers are numbers); presence and shape are
/// checked afterwards so errors can name the claim. Names are Bitbucket's.
/// serde's derive is the member-by-member path (`null` reads as absent, a
/// mistyped claim is named by `serde_path_to_error`); [`OnePass`] is the
/// one-pass read of the same struct.
#[derive(Default, Deserialize)]
pub struct RawClaims {
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

/// [`RawClaims`] read from the payload bytes in one pass: a name that appears
/// twice (a claim we read or any other) is an error, as in `StrictObject`; so
/// is a `null` claim or more than [`MAX_TRACKED_NAMES`] other members (the
/// member-by-member path then decides).
pub(super) struct OnePass(pub(super) RawClaims);

/// Most names of members we do not read that the one-pass read tracks (for
/// duplicates, by a linear scan); a payload or header with more is read by the
/// member-by-member path instead (a sorted map), so the scan never grows
/// quadratic on a hostile token.
pub(super) const MAX_TRACKED_NAMES: usize = 16;

/// A member name, borrowed from the input unless it has escapes.
pub(super) struct Name<'de>(pub(super) Cow<'de, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for OnePass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OnePass;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of claims")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<OnePass, A::Error> {
                // A claim we read, of its type: `null` is an error here too
                // (the claim-by-claim path decides what a null means).
                fn put<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
                    slot: &mut Option<T>,
                    a: &mut A,
                ) -> Result<(), A::Error> {
                    if slot.is_some() {
                        return Err(A::Error::custom("duplicate member"));
                    }
                    *slot = Some(a.next_value::<T>()?);
                    Ok(())
                }
                let mut c = RawClaims::default();
                let mut others: Vec<Cow<'de, str>> = Vec::new();
                while let Some(Name(name)) = a.next_key::<Name<'de>>()? {
                    match name.as_ref() {
                        "iss" => put(&mut c.iss, &mut a)?,
                        "sub" => put(&mut c.sub, &mut a)?,
                        "exp" => put(&mut c.exp, &mut a)?,
                        "iat" => put(&mut c.iat, &mut a)?,
                        "nbf" => put(&mut c.nbf, &mut a)?,
                        "aud" => put(&mut c.aud, &mut a)?,
                        "workspaceUuid" => put(&mut c.workspace_uuid, &mut a)?,
                        "repositoryUuid" => put(&mut c.repository_uuid, &mut a)?,
                        "pipelineUuid" => put(&mut c.pipeline_uuid, &mut a)?,
                        "stepUuid" => put(&mut c.step_uuid, &mut a)?,
                        "branchName" => put(&mut c.branch_name, &mut a)?,
                        "deploymentEnvironmentUuid" => {
                            put(&mut c.deployment_environment_uuid, &mut a)?;
                        }
                        "pipelineRunUuid" => put(&mut c.pipeline_run_uuid, &mut a)?,
                        _ => {
                            if others.contains(&name) || others.len() >= MAX_TRACKED_NAMES {
                                return Err(A::Error::custom("duplicate member or too many"));
                            }
                            others.push(name);
                            // Parsed (and dropped) as the member-by-member path
                            // parses it: UTF-8, surrogates, number range, depth.
                            a.next_value::<serde_json::Value>()?;
                        }
                    }
                }
                Ok(OnePass(c))
            }
        }
        d.deserialize_map(V)
    }
}

/// Claim names [`RawClaims`] reads, for naming a mistyped one.
const CLAIMS: [&str; 13] = [
    "iss",
    "sub",
    "exp",
    "iat",
    "nbf",
    "aud",
    "workspaceUuid",
    "repositoryUuid",
    "pipelineUuid",
    "stepUuid",
    "branchName",
    "deploymentEnvironmentUuid",
    "pipelineRunUuid",
];

/// The unverified `iss`, and the NumericDate type of `exp`, `iat`, `nbf`
/// (RFC 7519 §2): the checks made before any key is chosen.
///
/// # Errors
/// [`VerifyError::MissingClaim`] (`iss`), [`VerifyError::InvalidClaim`].
pub fn precheck(payload: &Payload) -> Result<&str, VerifyError> {
    let payload = match payload {
        Payload::Typed(c) => return c.iss.as_deref().ok_or(VerifyError::MissingClaim("iss")),
        Payload::Object(m) => m,
    };
    let iss = match payload.get("iss") {
        None => return Err(VerifyError::MissingClaim("iss")),
        Some(serde_json::Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(VerifyError::InvalidClaim {
                claim: "iss",
                reason: "not a string".into(),
            })
        }
    };
    for claim in ["exp", "iat", "nbf"] {
        if payload.get(claim).is_some_and(|v| !v.is_u64()) {
            return Err(VerifyError::InvalidClaim {
                claim,
                reason: "not a non-negative integer NumericDate".into(),
            });
        }
    }
    Ok(iss)
}

/// Every claim rule, in order: types; `exp` (RFC 7519 §4.1.4) and `nbf` (§4.1.5)
/// within the leeway; `aud` (§4.1.3, any element accepted for the workspace);
/// `sub` present; `iat` present, not in the future, not after `exp`; `exp - iat`
/// at most the maximum lifetime; Bitbucket's braced UUIDs; `workspaceUuid` of the
/// issuer's workspace; `sub` = `{repositoryUuid}:{stepUuid}` or
/// `{repositoryUuid}:{deploymentEnvironmentUuid}:{stepUuid}`; `branchName`
/// without control, invisible or bidi characters (empty reads as absent).
///
/// # Errors
/// The first [`VerifyError`] found.
pub fn check(
    payload: Payload,
    ws: &WorkspaceSettings,
    rules: &TokenRules,
    now: u64,
) -> Result<BitbucketIdentity, VerifyError> {
    let c: RawClaims = match payload {
        Payload::Typed(c) => *c,
        Payload::Object(m) => serde_path_to_error::deserialize::<_, RawClaims>(
            serde_json::Value::Object(m),
        )
        .map_err(|e| {
            let path = e.path().to_string();
            VerifyError::InvalidClaim {
                claim: CLAIMS.into_iter().find(|n| *n == path).unwrap_or("payload"),
                reason: "wrong type".into(),
            }
        })?,
    };
    let (exp, iat) = registered(&c, ws, rules, now)?;
    let sub = c.sub.clone().ok_or(VerifyError::MissingClaim("sub"))?;
    let issuer = c.iss.clone().ok_or(VerifyError::MissingClaim("iss"))?;
    let workspace_uuid = braced("workspaceUuid", c.workspace_uuid)?;
    let repository_uuid = braced("repositoryUuid", c.repository_uuid)?;
    let pipeline_uuid = braced("pipelineUuid", c.pipeline_uuid)?;
    let step_uuid = braced("stepUuid", c.step_uuid)?;
    let deployment_environment_uuid = c
        .deployment_environment_uuid
        .map(|e| braced("deploymentEnvironmentUuid", Some(e)))
        .transpose()?;
    let pipeline_run_uuid = c
        .pipeline_run_uuid
        .map(|e| braced("pipelineRunUuid", Some(e)))
        .transpose()?;
    if workspace_uuid != ws.uuid {
        return Err(VerifyError::WorkspaceMismatch);
    }
    check_sub(
        &sub,
        repository_uuid,
        deployment_environment_uuid,
        step_uuid,
    )?;
    Ok(BitbucketIdentity {
        issuer,
        workspace_slug: ws.slug.clone(),
        sub,
        workspace_uuid,
        repository_uuid,
        pipeline_uuid,
        step_uuid,
        branch_name: branch(c.branch_name)?,
        deployment_environment_uuid,
        pipeline_run_uuid,
        aud: audiences(c.aud)?,
        exp,
        iat,
    })
}

/// The registered claims: `exp`, `nbf`, `aud`, `sub` presence, `iat` and the
/// lifetime; returns `(exp, iat)`.
fn registered(
    c: &RawClaims,
    ws: &WorkspaceSettings,
    rules: &TokenRules,
    now: u64,
) -> Result<(u64, u64), VerifyError> {
    let leeway = rules.leeway.as_secs();
    let exp = c.exp.ok_or(VerifyError::MissingClaim("exp"))?;
    if exp.saturating_add(leeway) < now {
        return Err(VerifyError::Expired);
    }
    if c.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Err(VerifyError::NotYetValid);
    }
    if c.aud.is_none() {
        return Err(VerifyError::MissingClaim("aud"));
    }
    if !audience_accepted(c, ws) {
        return Err(VerifyError::AudienceNotAccepted);
    }
    if c.sub.is_none() {
        return Err(VerifyError::MissingClaim("sub"));
    }
    let iat = c.iat.ok_or(VerifyError::MissingClaim("iat"))?;
    if iat > now.saturating_add(leeway) {
        return Err(VerifyError::IssuedInFuture);
    }
    if iat > exp {
        return Err(VerifyError::InvalidClaim {
            claim: "iat",
            reason: "after exp".into(),
        });
    }
    let max = rules.max_lifetime.as_secs();
    if exp - iat > max {
        return Err(VerifyError::LifetimeTooLong {
            lifetime: exp - iat,
            max,
        });
    }
    Ok((exp, iat))
}

/// True when one element of `aud` is an audience accepted for the workspace.
fn audience_accepted(c: &RawClaims, ws: &WorkspaceSettings) -> bool {
    match &c.aud {
        None => false,
        Some(Audience::One(a)) => ws.audiences.iter().any(|x| x == a),
        Some(Audience::Many(v)) => v.iter().any(|a| ws.audiences.iter().any(|x| x == a)),
    }
}

fn braced(claim: &'static str, v: Option<String>) -> Result<BbUuid, VerifyError> {
    let v = v.ok_or(VerifyError::MissingClaim(claim))?;
    BbUuid::parse_braced(&v).map_err(|_| VerifyError::InvalidClaim {
        claim,
        reason: "not a braced UUID".into(),
    })
}

fn check_sub(
    sub: &str,
    repository: BbUuid,
    environment: Option<BbUuid>,
    step: BbUuid,
) -> Result<(), VerifyError> {
    let parts: Vec<Option<BbUuid>> = sub
        .split(':')
        .map(|p| BbUuid::parse_braced(p).ok())
        .collect();
    let consistent = match (parts.as_slice(), environment) {
        ([Some(r), Some(s)], None) => *r == repository && *s == step,
        ([Some(r), Some(e), Some(s)], Some(env)) => *r == repository && *e == env && *s == step,
        _ => false,
    };
    if consistent {
        Ok(())
    } else {
        Err(VerifyError::SubjectMismatch)
    }
}

/// Most `aud` elements accepted (Bitbucket: at most 10 custom audiences plus
/// the workspace's; Atlassian, "Bitbucket Pipelines OIDC now supports multiple
/// audiences").
pub const MAX_AUD_ELEMENTS: usize = 16;

/// Longest `aud` element accepted, in bytes (Bitbucket: 150 characters).
pub const MAX_AUD_ELEMENT_BYTES: usize = 256;

/// `aud` as a list, each element at most [`MAX_AUD_ELEMENT_BYTES`] without
/// control, invisible or bidi characters, at most [`MAX_AUD_ELEMENTS`]: the
/// values reach policies (`when.aud`), the audit line and `/grants`.
fn audiences(aud: Option<Audience>) -> Result<Vec<String>, VerifyError> {
    let v = match aud {
        Some(Audience::One(a)) => vec![a],
        Some(Audience::Many(v)) => v,
        None => Vec::new(),
    };
    let bad = v.len() > MAX_AUD_ELEMENTS
        || v.iter()
            .any(|a| a.len() > MAX_AUD_ELEMENT_BYTES || a.chars().any(deceptive));
    if bad {
        return Err(VerifyError::InvalidClaim {
            claim: "aud",
            reason: format!(
                "more than {MAX_AUD_ELEMENTS} values, or a value longer than \
                 {MAX_AUD_ELEMENT_BYTES} bytes or with control, invisible or bidi characters"
            ),
        });
    }
    Ok(v)
}

/// `branchName`: empty reads as absent; at most 1024 bytes; no control
/// characters, nor invisible or direction-changing ones
/// ([`deceptive`]) that would make an audit line read differently from what
/// it records.
fn branch(b: Option<String>) -> Result<Option<String>, VerifyError> {
    let Some(b) = b.filter(|b| !b.is_empty()) else {
        return Ok(None);
    };
    if b.len() > 1024 || b.chars().any(deceptive) {
        return Err(VerifyError::InvalidClaim {
            claim: "branchName",
            reason: "too long, or has control, invisible or bidi characters".into(),
        });
    }
    Ok(Some(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    const NOW: u64 = 1_800_000_000;
    const WS: &str = "{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}";
    const REPO: &str = "{d4e45493-4a33-477d-917b-a24e7e4bd39b}";
    const STEP: &str = "{759de0c6-eaee-4eaa-b7a6-c507eec759a7}";
    const ENV: &str = "{bd715740-c970-486b-b68a-b421ec2a1f8b}";
    const ISS: &str =
        "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc";

    fn ws() -> WorkspaceSettings {
        WorkspaceSettings {
            slug: "acme".into(),
            uuid: BbUuid::parse_braced(WS).unwrap(),
            issuer: ISS.into(),
            audiences: vec!["https://sts.example.test".into()],
            algorithm: jsonwebtoken::Algorithm::RS256,
        }
    }

    fn rules() -> TokenRules {
        TokenRules {
            leeway: Duration::from_secs(60),
            max_token_bytes: 16 * 1024,
            max_lifetime: Duration::from_secs(86_400),
        }
    }

    /// A Bitbucket-shaped payload (Atlassian's sample, with this test's UUIDs).
    fn payload() -> serde_json::Value {
        json!({
            "iss": ISS, "aud": ["ari:cloud:bitbucket::workspace/03b741e3-cf4a-41f9-9a59-cec52e21bdc3", "https://sts.example.test"],
            "sub": format!("{REPO}:{STEP}"), "iat": NOW - 10, "exp": NOW + 3590,
            "workspaceUuid": WS, "repositoryUuid": REPO, "stepUuid": STEP,
            "pipelineUuid": "{1de489be-ce6a-42a0-a8c8-eadbf1174ac7}", "branchName": "main",
        })
    }

    /// The claim-by-claim path, and the one-pass typed path of the same bytes:
    /// both must give the same answer (the typed one falls back to the other
    /// whenever it cannot read the payload).
    fn run(v: serde_json::Value) -> Result<BitbucketIdentity, VerifyError> {
        let bytes = serde_json::to_vec(&v).unwrap();
        let serde_json::Value::Object(m) = v else {
            panic!("object")
        };
        let slow = (|| {
            let p = Payload::Object(m);
            precheck(&p)?;
            check(p, &ws(), &rules(), NOW)
        })();
        let fast = (|| {
            let p = Payload::read(&bytes)?;
            precheck(&p)?;
            check(p, &ws(), &rules(), NOW)
        })();
        match (&slow, &fast) {
            (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            _ => panic!("paths disagree: {slow:?} vs {fast:?}"),
        }
        slow
    }

    fn with(changes: serde_json::Value) -> serde_json::Value {
        let mut p = payload();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                p.as_object_mut().unwrap().remove(k);
            } else {
                p[k] = v.clone();
            }
        }
        p
    }

    /// `null` reads as an absent claim (serde's derive on the member-by-member
    /// path), whichever path the payload takes; a null NumericDate is refused
    /// before any key (precheck).
    #[test]
    fn null_claims_read_as_absent() {
        for claim in ["branchName", "deploymentEnvironmentUuid", "pipelineRunUuid"] {
            let mut p = payload();
            p[claim] = serde_json::Value::Null;
            let got = run(p).map_or_else(|e| e.code(), |_| "ok");
            assert_eq!(got, "ok", "{claim}: null");
        }
        for claim in ["sub", "aud", "workspaceUuid"] {
            let mut p = payload();
            p[claim] = serde_json::Value::Null;
            assert_eq!(run(p).unwrap_err().code(), "token.missing_claim", "{claim}");
        }
        let mut p = payload();
        p["exp"] = serde_json::Value::Null;
        assert_eq!(run(p).unwrap_err().code(), "token.invalid_claim");
    }

    #[test]
    fn a_bitbucket_token_yields_its_identity() {
        let id = run(payload()).unwrap();
        assert_eq!(id.repository_uuid.braced(), REPO);
        assert_eq!(id.branch_name.as_deref(), Some("main"));
        assert_eq!(id.workspace_slug, "acme");
        let id = run(with(
            json!({"aud": "https://sts.example.test", "branchName": ""}),
        ))
        .unwrap();
        assert_eq!(id.branch_name, None, "empty branchName reads as absent");
        let deploy =
            with(json!({"sub": format!("{REPO}:{ENV}:{STEP}"), "deploymentEnvironmentUuid": ENV}));
        assert!(run(deploy).unwrap().deployment_environment_uuid.is_some());
    }

    #[test]
    fn each_rule_has_its_code_at_a_fixed_clock() {
        let cases = [
            (json!({"iss": null}), "token.missing_claim"),
            (json!({"iss": 7}), "token.invalid_claim"),
            (json!({"exp": "soon"}), "token.invalid_claim"),
            (json!({"exp": -1}), "token.invalid_claim"),
            (json!({"exp": null}), "token.missing_claim"),
            (json!({"exp": NOW - 61, "iat": NOW - 3700}), "token.expired"),
            (json!({"nbf": NOW + 61}), "token.not_yet_valid"),
            (json!({"aud": null}), "token.missing_claim"),
            (
                json!({"aud": "ari:cloud:bitbucket::workspace/03b741e3-cf4a-41f9-9a59-cec52e21bdc3"}),
                "token.audience_not_accepted",
            ),
            (json!({"aud": 5}), "token.invalid_claim"),
            (
                json!({"aud": ["https://sts.example.test", "https://sts.example.test/agent\u{200B}"]}),
                "token.invalid_claim",
            ),
            (
                json!({"aud": ["https://sts.example.test", "x\u{202E}y"]}),
                "token.invalid_claim",
            ),
            (
                json!({"aud": ["https://sts.example.test", "a\nb"]}),
                "token.invalid_claim",
            ),
            (
                json!({"aud": std::iter::once("https://sts.example.test".to_string())
                    .chain((0..16).map(|i| format!("m{i}")))
                    .collect::<Vec<_>>()}),
                "token.invalid_claim",
            ),
            (
                json!({"aud": ["https://sts.example.test", "x".repeat(257)]}),
                "token.invalid_claim",
            ),
            (json!({"sub": null}), "token.missing_claim"),
            (json!({"iat": null}), "token.missing_claim"),
            (
                json!({"iat": NOW + 61, "exp": NOW + 3661}),
                "token.issued_in_future",
            ),
            (
                json!({"iat": NOW + 30, "exp": NOW + 20}),
                "token.invalid_claim",
            ),
            (json!({"exp": NOW + 90_000}), "token.lifetime_too_long"),
            (
                json!({"repositoryUuid": REPO.trim_matches(['{', '}'])}),
                "token.invalid_claim",
            ),
            (
                json!({"workspaceUuid": "{7d3f8c1a-0b6e-4f2d-9a8c-5e1b2c3d4e5f}"}),
                "token.workspace_mismatch",
            ),
            (
                json!({"sub": format!("{REPO}:{ENV}:{STEP}")}),
                "token.subject_mismatch",
            ),
            (
                json!({"deploymentEnvironmentUuid": ENV}),
                "token.subject_mismatch",
            ),
            (json!({"branchName": "main\u{202E}"}), "token.invalid_claim"),
            (
                json!({"branchName": "x".repeat(1025)}),
                "token.invalid_claim",
            ),
        ];
        for (change, code) in cases {
            let got = run(with(change.clone()))
                .map(|_| "ok")
                .unwrap_or_else(|e| e.code());
            assert_eq!(got, code, "{change}");
        }
    }

    #[test]
    fn the_leeway_applies_at_both_ends() {
        assert!(run(with(json!({"exp": NOW - 59, "iat": NOW - 3600}))).is_ok());
        assert!(run(with(json!({"iat": NOW + 59, "exp": NOW + 3659}))).is_ok());
        assert!(run(with(json!({"nbf": NOW + 59}))).is_ok());
    }
}
