//! `keycloak-ci-sts token inspect`: what a Keycloak access token grants and
//! whether a resource server would accept it, for the person whose API
//! answered 401. It decodes the token (never printing it or its signature),
//! lists roles per client and the lifetime left, and, given the realm URL,
//! verifies it against the realm's JWKS with the checks of the resource-server
//! kit (docs/src/resource-servers.md) in the same order, naming the first that
//! fails. Given audit files, it finds the line of the exchange that issued the
//! token (by the token's SHA-256) and shows the policy and identity.
//!
//! The keys are fetched only from the realm URL given on the command line,
//! never from the token's `iss`; the algorithm is the realm key's, never the
//! token header's.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};
use url::Url;

use crate::domain::SecretToken;

/// Largest token read, bytes (Keycloak's are 1 to 4 KiB).
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Largest JWKS document read, bytes.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Timeout of the JWKS fetch (connect and total).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a token cannot be inspected at all (not a refusal: the input is wrong).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Not three base64url segments with JSON header and claims.
    #[error("not a signed JWT (compact JWS): {0}")]
    Malformed(&'static str),
    /// The realm's keys could not be had.
    #[error("cannot read the realm's keys at {url}: {reason}")]
    Keys {
        /// The JWKS URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// An audit file could not be read.
    #[error("{0}")]
    Audit(String),
}

/// A decoded token.
#[derive(Debug, Clone, Serialize)]
pub struct Decoded {
    /// The token's SHA-256 (hex), as audit lines record it.
    pub token_sha256: String,
    /// The protected header.
    pub header: Map<String, Value>,
    /// The claims.
    pub claims: Map<String, Value>,
}

/// One check of [`Verification`], in the kit's order.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The kit's reason word: `alg`, `signature`, `iss`, `exp`, `typ`, `aud`.
    pub name: &'static str,
    /// Whether it passed.
    pub passed: bool,
    /// What was compared.
    pub detail: String,
}

/// The result of verifying against the realm.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// The realm URL (the expected issuer).
    pub realm: String,
    /// Every check made, in order; after a failed signature no claim is trusted
    /// and none is checked.
    pub checks: Vec<Check>,
    /// The first failed check's name: why a resource server would refuse it.
    pub refused: Option<&'static str>,
}

/// The audit line of the exchange that issued the token.
#[derive(Debug, Clone, Serialize)]
pub struct AuditMatch {
    /// The line, as written (it holds no secret: the token appears only as its hash).
    pub line: Value,
}

/// Decodes `token` without verifying it.
///
/// # Errors
/// [`InspectError::Malformed`].
pub fn decode(token: &SecretToken) -> Result<Decoded, InspectError> {
    let raw = token.expose();
    if raw.len() > MAX_TOKEN_BYTES {
        return Err(InspectError::Malformed("longer than 64 KiB"));
    }
    let mut parts = raw.split('.');
    let (Some(h), Some(c), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(InspectError::Malformed("not three segments"));
    };
    Ok(Decoded {
        token_sha256: token.sha256_hex(),
        header: json_segment(h).ok_or(InspectError::Malformed("header is not base64url JSON"))?,
        claims: json_segment(c).ok_or(InspectError::Malformed("claims are not base64url JSON"))?,
    })
}

fn json_segment(s: &str) -> Option<Map<String, Value>> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// Fetches the realm's JWKS (`<realm>/protocol/openid-connect/certs`), bounded.
///
/// # Errors
/// [`InspectError::Keys`].
pub async fn fetch_keys(realm: &Url) -> Result<jsonwebtoken::jwk::JwkSet, InspectError> {
    let url = format!(
        "{}/protocol/openid-connect/certs",
        realm.as_str().trim_end_matches('/')
    );
    let keys_error = |reason: String| InspectError::Keys {
        url: url.clone(),
        reason,
    };
    let client =
        crate::http::client(FETCH_TIMEOUT, FETCH_TIMEOUT).map_err(|e| keys_error(e.to_string()))?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| keys_error(crate::telemetry::chain(&e)))?;
    if !resp.status().is_success() {
        return Err(keys_error(format!("HTTP {}", resp.status().as_u16())));
    }
    let body = crate::http::read_capped(resp, MAX_JWKS_BYTES)
        .await
        .map_err(|e| keys_error(e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| keys_error(format!("not a JWKS: {e}")))
}

/// Verifies `token` against `keys` as a resource server for `audience` would
/// (each check of the kit that needs no allow-list), at time `now`.
pub fn verify(
    token: &SecretToken,
    decoded: &Decoded,
    keys: &jsonwebtoken::jwk::JwkSet,
    realm: &Url,
    audience: Option<&str>,
    now: u64,
) -> Verification {
    let realm_str = realm.as_str().to_string();
    let mut checks = Vec::new();
    if signature(token, decoded, keys, &mut checks) {
        claims_checks(&decoded.claims, &realm_str, audience, now, &mut checks);
    }
    let refused = checks.iter().find(|c| !c.passed).map(|c| c.name);
    Verification {
        realm: realm_str,
        checks,
        refused,
    }
}

/// The `alg` and `signature` checks; true when both passed.
fn signature(
    token: &SecretToken,
    decoded: &Decoded,
    keys: &jsonwebtoken::jwk::JwkSet,
    checks: &mut Vec<Check>,
) -> bool {
    let alg = decoded
        .header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or("");
    // First, as the kit does: an algorithm that is not an asymmetric signature
    // (none, HS256 with the realm's public key as secret) is refused before any
    // key is looked up.
    if !matches!(alg.get(..2), Some("RS" | "PS" | "ES")) && alg != "EdDSA" {
        checks.push(Check {
            name: "alg",
            passed: false,
            detail: format!(
                "header alg {} is not an asymmetric signature algorithm",
                printable(alg)
            ),
        });
        return false;
    }
    let kid = decoded.header.get("kid").and_then(Value::as_str);
    // Signing keys only: an encryption key of the realm never verifies a token.
    let key = kid.and_then(|k| keys.find(k)).filter(|k| {
        !matches!(
            k.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        )
    });
    let key_alg = key
        .and_then(|k| k.common.key_algorithm)
        .and_then(|a| a.to_string().parse::<jsonwebtoken::Algorithm>().ok());
    let Some((key, key_alg)) = key.zip(key_alg) else {
        checks.push(Check {
            name: "signature",
            passed: false,
            detail: format!(
                "the realm publishes no signing key with kid {} (another realm's token, or rotated out)",
                printable(kid.unwrap_or("(none)"))
            ),
        });
        return false;
    };
    let alg_ok = format!("{key_alg:?}") == alg;
    checks.push(Check {
        name: "alg",
        passed: alg_ok,
        detail: format!("header alg {}, the realm key's {key_alg:?}", printable(alg)),
    });
    if !alg_ok {
        return false;
    }
    let mut validation = jsonwebtoken::Validation::new(key_alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let verified = jsonwebtoken::DecodingKey::from_jwk(key)
        .and_then(|k| jsonwebtoken::decode::<Value>(token.expose(), &k, &validation));
    checks.push(Check {
        name: "signature",
        passed: verified.is_ok(),
        detail: match &verified {
            Ok(_) => format!("valid ({key_alg:?}, kid {})", printable(kid.unwrap_or(""))),
            Err(e) => format!("invalid: {e}"),
        },
    });
    verified.is_ok()
}

/// The `iss`, `exp`, `typ` and `aud` checks on verified claims.
fn claims_checks(
    claims: &Map<String, Value>,
    realm: &str,
    audience: Option<&str>,
    now: u64,
    checks: &mut Vec<Check>,
) {
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    checks.push(Check {
        name: "iss",
        passed: iss == realm,
        detail: format!("{} (expected exactly {realm})", printable(iss)),
    });
    let time = |k: &str| claims.get(k).and_then(Value::as_f64);
    #[allow(
        clippy::cast_precision_loss,
        reason = "seconds since the epoch fit an f64"
    )]
    let now_f = now as f64;
    let exp = time("exp");
    checks.push(Check {
        name: "exp",
        passed: exp.is_some_and(|e| e > now_f),
        detail: match exp {
            Some(e) if e > now_f => format!("{:.0} s left", e - now_f),
            Some(e) => format!("expired {:.0} s ago", now_f - e),
            None => "no exp".into(),
        },
    });
    let (iat, nbf) = (time("iat"), time("nbf"));
    checks.push(Check {
        name: "iat",
        passed: iat.is_some_and(|i| i <= now_f) && nbf.is_none_or(|n| n <= now_f),
        detail: match (iat, nbf) {
            (None, _) => "no iat".into(),
            (Some(i), _) if i > now_f => format!("iat {:.0} s in the future", i - now_f),
            (_, Some(n)) if n > now_f => format!("nbf {:.0} s in the future", n - now_f),
            _ => "iat (and nbf, if any) not in the future".into(),
        },
    });
    let typ = claims.get("typ").and_then(Value::as_str).unwrap_or("");
    checks.push(Check {
        name: "typ",
        passed: typ == "Bearer",
        detail: format!(
            "{} (an access token's is Bearer; an ID token's is ID)",
            printable(typ)
        ),
    });
    if let Some(want) = audience {
        let aud = audiences(claims);
        let all_strings = match claims.get("aud") {
            Some(Value::Array(a)) => a.iter().all(Value::is_string),
            Some(Value::String(_)) => true,
            _ => false,
        };
        checks.push(Check {
            name: "aud",
            passed: all_strings && aud == [want],
            detail: format!(
                "{} (expected exactly {})",
                printable(&aud.join(", ")),
                printable(want)
            ),
        });
    }
}

/// `aud` as a list (a string is one).
pub fn audiences(claims: &Map<String, Value>) -> Vec<String> {
    match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    }
}

/// Client roles per client (`resource_access.<client>.roles`), then the realm's
/// (`realm_access.roles`, under the name `(realm)`).
pub fn roles(claims: &Map<String, Value>) -> Vec<(String, Vec<String>)> {
    let list = |v: &Value| -> Vec<String> {
        v.get("roles")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out: Vec<(String, Vec<String>)> = claims
        .get("resource_access")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), list(v))).collect())
        .unwrap_or_default();
    if let Some(realm) = claims.get("realm_access") {
        out.push(("(realm)".into(), list(realm)));
    }
    out
}

/// Finds the audit line whose `token_sha256` is `sha256` in `files`.
///
/// # Errors
/// [`InspectError::Audit`] when a file cannot be read.
pub fn find_in_audit(files: &[PathBuf], sha256: &str) -> Result<Option<AuditMatch>, InspectError> {
    let needle = format!("\"token_sha256\":\"{sha256}\"");
    let mut found = None;
    crate::report::audit::scan(files, |line| {
        let hit = line.windows(needle.len()).any(|w| w == needle.as_bytes());
        if hit {
            found = serde_json::from_slice::<Value>(line)
                .ok()
                .filter(|v| v.get("token_sha256").and_then(Value::as_str) == Some(sha256))
                .map(|line| AuditMatch { line });
        }
        found.is_none()
    })
    .map_err(InspectError::Audit)?;
    Ok(found)
}

/// `s` with control, invisible and direction-changing characters
/// ([`crate::domain::deceptive`]) escaped, for a terminal: a token's claims are
/// chosen by whoever made it, and an `azp` must not look like an allowed one.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if crate::domain::deceptive(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(header: &Value, claims: &Value) -> SecretToken {
        let b = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        SecretToken::new(format!("{}.{}.c2ln", b(header), b(claims)))
    }

    #[test]
    fn decodes_claims_roles_and_audiences() {
        let t = token(
            &serde_json::json!({"alg": "RS256", "kid": "k"}),
            &serde_json::json!({"aud": ["a", "b"], "resource_access": {"api": {"roles": ["read"]}}, "realm_access": {"roles": ["x"]}}),
        );
        let d = decode(&t).unwrap();
        assert_eq!(audiences(&d.claims), ["a", "b"]);
        assert_eq!(
            roles(&d.claims),
            [
                ("api".to_string(), vec!["read".to_string()]),
                ("(realm)".to_string(), vec!["x".to_string()])
            ]
        );
        assert_eq!(d.token_sha256, t.sha256_hex());
    }

    #[test]
    fn refuses_what_is_not_a_jws() {
        for bad in ["", "a.b", "a.b.c.d", "!!.e30.c2ln", "e30.W10.c2ln"] {
            assert!(decode(&SecretToken::new(bad.to_string())).is_err(), "{bad}");
        }
        let long = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(decode(&SecretToken::new(long)).is_err());
    }

    #[test]
    fn none_and_hmac_are_refused_as_alg_before_any_key_is_looked_up() {
        let keys: jsonwebtoken::jwk::JwkSet = serde_json::from_str(r#"{"keys": []}"#).unwrap();
        let realm = Url::parse("http://127.0.0.1:1/realms/ci").unwrap();
        for alg in ["none", "HS256", "rs256", ""] {
            let t = token(&serde_json::json!({"alg": alg}), &serde_json::json!({}));
            let v = verify(&t, &decode(&t).unwrap(), &keys, &realm, None, 0);
            assert_eq!(v.refused, Some("alg"), "{alg}");
        }
    }

    #[test]
    fn an_unknown_kid_fails_the_signature_check_and_no_claim_is_judged() {
        let t = token(
            &serde_json::json!({"alg": "RS256", "kid": "nope"}),
            &serde_json::json!({"iss": "x"}),
        );
        let d = decode(&t).unwrap();
        let keys: jsonwebtoken::jwk::JwkSet = serde_json::from_str(r#"{"keys": []}"#).unwrap();
        let realm = Url::parse("http://127.0.0.1:1/realms/ci").unwrap();
        let v = verify(&t, &d, &keys, &realm, Some("api"), 0);
        assert_eq!(v.refused, Some("signature"));
        assert_eq!(v.checks.len(), 1);
    }

    #[test]
    fn printable_escapes_terminal_controls() {
        assert_eq!(printable("a\u{1b}[2Jb\u{202e}"), "a\\u{1b}[2Jb\\u{202e}");
        assert_eq!(printable("ci\u{200b}"), "ci\\u{200b}");
    }
}
