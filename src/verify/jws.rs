//! Compact JWS parsing and header rules (RFC 7515 §7.1), synchronous and
//! offline: everything about a token that can be checked before choosing a key.

use base64::Engine;

use super::VerifyError;
use crate::domain::json::StrictObject;

/// Longest `kid` accepted, in bytes.
pub const MAX_KID_BYTES: usize = 256;

/// A compact JWS, split and decoded but not verified.
pub struct Jws<'a> {
    /// Header `alg` (empty when absent or not a string: never matches a configured one).
    pub alg: String,
    /// Header `kid`.
    pub kid: Option<String>,
    /// The payload: a JSON object with unique member names.
    pub payload: super::claims::Payload,
    /// `BASE64URL(header) || '.' || BASE64URL(payload)`, exactly as received.
    pub signing_input: &'a str,
    /// The third segment (base64url signature), as received.
    pub signature: &'a str,
}

/// Splits and decodes `raw` (surrounding whitespace already trimmed): at most
/// `max_bytes`; three segments; header and payload base64url JSON objects with
/// unique members; no `crit` (RFC 7515 §4.1.11: we understand no extension);
/// `typ`, `cty` and `kid` strings; `kid` at most [`MAX_KID_BYTES`] without
/// control characters.
///
/// # Errors
/// [`VerifyError::TooLarge`], [`VerifyError::Malformed`], [`VerifyError::CriticalHeader`].
pub fn parse(raw: &str, max_bytes: usize) -> Result<Jws<'_>, VerifyError> {
    if raw.len() > max_bytes {
        return Err(VerifyError::TooLarge {
            len: raw.len(),
            max: max_bytes,
        });
    }
    let mut segments = raw.split('.');
    let (Some(h), Some(p), Some(s), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(VerifyError::Malformed(format!(
            "{} segments, expected 3",
            raw.split('.').count()
        )));
    };
    let signing_input = raw.get(..h.len() + 1 + p.len()).unwrap_or_default();
    if let Some(jws) = parse_typed(h, p, s, signing_input) {
        return Ok(jws);
    }
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
    let payload = super::claims::Payload::Object(decode_segment(p, "payload")?);
    let kid = match header.get("kid") {
        None => None,
        Some(serde_json::Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(VerifyError::Malformed("kid is not a string".into())),
    };
    let alg = header
        .get("alg")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(Jws {
        alg,
        kid,
        payload,
        signing_input,
        signature: s,
    })
}

/// The header members [`parse`] reads, read in one typed pass; a name twice
/// (one of these or any other) is an error, as in [`StrictObject`].
#[derive(Default)]
struct Header {
    alg: Option<String>,
    kid: Option<String>,
    crit: bool,
}

impl<'de> serde::Deserialize<'de> for Header {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Header;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JOSE header")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Header, A::Error> {
                let mut h = Header::default();
                let mut names: Vec<std::borrow::Cow<'de, str>> = Vec::new();
                while let Some(super::claims::Name(name)) = a.next_key()? {
                    if names.contains(&name) || names.len() >= super::claims::MAX_TRACKED_NAMES {
                        return Err(A::Error::custom("duplicate member or too many"));
                    }
                    match name.as_ref() {
                        "alg" => h.alg = Some(a.next_value()?),
                        "kid" => h.kid = Some(a.next_value()?),
                        // Strings, as the member-by-member path requires.
                        "typ" | "cty" => {
                            a.next_value::<super::claims::Name<'de>>()?;
                        }
                        "crit" => {
                            h.crit = true;
                            a.next_value::<serde::de::IgnoredAny>()?;
                        }
                        // Parsed (and dropped) as the member-by-member path
                        // parses it: UTF-8, surrogates, number range, depth.
                        _ => {
                            a.next_value::<serde_json::Value>()?;
                        }
                    }
                    names.push(name);
                }
                Ok(h)
            }
        }
        d.deserialize_map(V)
    }
}

/// The common case in one pass: header and payload decoded and read typed.
/// `None` for anything else (a header with `crit`, a member of another type, a
/// name twice, bad base64 or JSON), which [`parse`] then reads member by member
/// for its exact error.
fn parse_typed<'a>(h: &str, p: &str, s: &'a str, signing_input: &'a str) -> Option<Jws<'a>> {
    let header = serde_json::from_slice::<Header>(&decode(h, "header").ok()?).ok()?;
    if header.crit {
        return None;
    }
    let super::claims::OnePass(payload) =
        serde_json::from_slice(&decode(p, "payload").ok()?).ok()?;
    Some(Jws {
        alg: header.alg?,
        kid: header.kid,
        payload: super::claims::Payload::Typed(Box::new(payload)),
        signing_input,
        signature: s,
    })
}

/// The `kid` rule, checked once the issuer is known to be trusted (so that an
/// untrusted token is answered `token.untrusted_issuer` first).
///
/// # Errors
/// [`VerifyError::Malformed`] for a `kid` over [`MAX_KID_BYTES`] or with control
/// characters.
pub fn check_kid(kid: Option<&str>) -> Result<(), VerifyError> {
    match kid {
        Some(k) if k.len() > MAX_KID_BYTES || k.chars().any(char::is_control) => Err(
            VerifyError::Malformed("kid is too long or has control characters".into()),
        ),
        _ => Ok(()),
    }
}

/// Checks the signature over the exact received bytes with each candidate key
/// (one, unless the issuer publishes duplicate or no `kid`s) under the
/// configured algorithm (jsonwebtoken's crypto, aws-lc-rs backend).
///
/// # Errors
/// [`VerifyError::BadSignature`] when no candidate verifies it.
pub fn verify_signature(
    jws: &Jws<'_>,
    candidates: &[std::sync::Arc<jsonwebtoken::DecodingKey>],
    alg: jsonwebtoken::Algorithm,
) -> Result<(), VerifyError> {
    if jws.signature.is_empty() || jws.signing_input.is_empty() {
        return Err(VerifyError::BadSignature);
    }
    for key in candidates {
        match jsonwebtoken::crypto::verify(jws.signature, jws.signing_input.as_bytes(), key, alg) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                return Err(match e.kind() {
                    jsonwebtoken::errors::ErrorKind::Base64(_) => {
                        VerifyError::Malformed("signature is not base64url".into())
                    }
                    _ => VerifyError::BadSignature,
                })
            }
        }
    }
    Err(VerifyError::BadSignature)
}

fn decode(seg: &str, what: &str) -> Result<Vec<u8>, VerifyError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seg)
        .map_err(|_| VerifyError::Malformed(format!("{what} is not base64url")))
}

fn decode_segment(
    seg: &str,
    what: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, VerifyError> {
    let bytes = decode(seg, what)?;
    serde_json::from_slice::<StrictObject>(&bytes)
        .map(|o| o.0)
        .map_err(|e| {
            VerifyError::Malformed(format!(
                "{what} is not a JSON object: {}",
                super::claims::classify(&e)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(v: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    fn token(header: &str, payload: &str) -> String {
        format!("{}.{}.c2ln", b64(header), b64(payload))
    }

    fn code(raw: &str) -> &'static str {
        code_max(raw, 4096)
    }

    fn code_max(raw: &str, max: usize) -> &'static str {
        match parse(raw, max) {
            Ok(_) => "ok",
            Err(e) => e.code(),
        }
    }

    #[test]
    fn a_well_formed_token_splits_into_its_parts() {
        let raw = token(
            &json!({"alg": "RS256", "kid": "k1"}).to_string(),
            r#"{"iss":"i"}"#,
        );
        let jws = parse(&raw, 4096).unwrap();
        assert_eq!(jws.alg, "RS256");
        assert_eq!(jws.kid.as_deref(), Some("k1"));
        assert_eq!(
            super::super::claims::precheck(&jws.payload).unwrap(),
            "i",
            "read in one typed pass"
        );
        assert!(matches!(
            jws.payload,
            super::super::claims::Payload::Typed(_)
        ));
        assert_eq!(jws.signature, "c2ln");
        assert_eq!(format!("{}.c2ln", jws.signing_input), raw);
    }

    #[test]
    fn shape_and_header_rules() {
        let ok_payload = r#"{"iss":"i"}"#;
        assert_eq!(code(&"a".repeat(5000)), "token.too_large");
        assert_eq!(code("a.b"), "token.malformed");
        assert_eq!(code("a.b.c.d.e"), "token.malformed");
        assert_eq!(
            code(&format!("!!.{}.x", b64(ok_payload))),
            "token.malformed"
        );
        assert_eq!(code(&token("[1]", ok_payload)), "token.malformed");
        assert_eq!(
            code(&token(r#"{"alg":"RS256","alg":"none"}"#, ok_payload)),
            "token.malformed"
        );
        assert_eq!(
            code(&token(r#"{"alg":"RS256","crit":["b64"]}"#, ok_payload)),
            "token.unsupported_header"
        );
        assert_eq!(
            code(&token(r#"{"alg":"RS256","typ":1}"#, ok_payload)),
            "token.malformed"
        );
        assert_eq!(
            code(&token(r#"{"alg":"RS256","kid":{"$ne":null}}"#, ok_payload)),
            "token.malformed"
        );
        assert_eq!(
            code(&token(r#"{"alg":"RS256"}"#, r#"{"iss":"a","iss":"b"}"#)),
            "token.malformed"
        );
        assert_eq!(
            code(&token(r#"{"alg":"RS256"}"#, "\"str\"")),
            "token.malformed"
        );
        // Names we do not read are unique too, in header and payload, escaped or not.
        assert_eq!(
            code(&token(
                r#"{"alg":"RS256"}"#,
                r#"{"iss":"i","x":1,"\u0078":2}"#
            )),
            "token.malformed"
        );
        assert_eq!(
            code(&token(r#"{"alg":"RS256","x":1,"x":2}"#, ok_payload)),
            "token.malformed"
        );
        // Values of members we do not read are parsed as strictly as before:
        // a lone surrogate, invalid UTF-8, a number out of range, deep nesting.
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        for extra in [
            &br#","x":"\ud800""#[..],
            br#","x":1e400"#,
            b",\"x\":\"\xff\xfe\"",
            format!(r#","x":{deep}"#).as_bytes(),
        ] {
            let p = [&br#"{"iss":"i""#[..], extra, b"}"].concat();
            let h = [&br#"{"alg":"RS256""#[..], extra, b"}"].concat();
            let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
            let raw = format!("{}.{}.c2ln", b(br#"{"alg":"RS256"}"#), b(&p));
            assert_eq!(code(&raw), "token.malformed", "payload {extra:?}");
            let raw = format!("{}.{}.c2ln", b(&h), b(br#"{"iss":"i"}"#));
            assert_eq!(code(&raw), "token.malformed", "header {extra:?}");
        }
        // Many members we do not read: the one-pass read stops tracking them
        // (its duplicate scan is linear per name) and the sorted-map path reads
        // the token; duplicates among them are still found.
        let many = |n: usize, dup: bool| {
            let mut p = String::from(r#"{"iss":"i""#);
            for i in 0..n {
                p.push_str(&format!(r#","_{i:05}":0"#));
            }
            if dup {
                p.push_str(r#","_00000":1"#);
            }
            p.push('}');
            token(r#"{"alg":"RS256"}"#, &p)
        };
        let few = many(super::super::claims::MAX_TRACKED_NAMES, false);
        let few = parse(&few, 1 << 20).unwrap();
        assert!(matches!(
            few.payload,
            super::super::claims::Payload::Typed(_)
        ));
        let lots = many(20_000, false);
        let lots = parse(&lots, 1 << 20).unwrap();
        assert!(matches!(
            lots.payload,
            super::super::claims::Payload::Object(_)
        ));
        assert_eq!(code_max(&many(20_000, true), 1 << 20), "token.malformed");
        // What the typed pass cannot read is read member by member, with the
        // same answer as before: a null NumericDate is refused before any key.
        let raw = token(r#"{"alg":"RS256"}"#, r#"{"iss":"i","exp":null}"#);
        let jws = parse(&raw, 4096).unwrap();
        assert!(matches!(
            jws.payload,
            super::super::claims::Payload::Object(_)
        ));
        assert_eq!(
            super::super::claims::precheck(&jws.payload)
                .unwrap_err()
                .code(),
            "token.invalid_claim"
        );
    }

    #[test]
    fn kid_rules() {
        assert!(check_kid(None).is_ok());
        assert!(check_kid(Some("k")).is_ok());
        assert!(check_kid(Some(&"k".repeat(MAX_KID_BYTES))).is_ok());
        assert!(check_kid(Some(&"k".repeat(MAX_KID_BYTES + 1))).is_err());
        assert!(check_kid(Some("a\nb")).is_err());
    }

    #[test]
    fn signatures_verify_with_any_candidate_and_only_over_the_received_bytes() {
        let pem = crate::signing::generate_pem(crate::signing::SigningAlgorithm::ES256).unwrap();
        let key =
            crate::signing::SigningKey::from_pem(&pem, crate::signing::SigningAlgorithm::ES256)
                .unwrap();
        let decoding =
            std::sync::Arc::new(jsonwebtoken::DecodingKey::from_jwk(key.public_jwk()).unwrap());
        let other_pem =
            crate::signing::generate_pem(crate::signing::SigningAlgorithm::ES256).unwrap();
        let other = crate::signing::SigningKey::from_pem(
            &other_pem,
            crate::signing::SigningAlgorithm::ES256,
        )
        .unwrap();
        let other_decoding =
            std::sync::Arc::new(jsonwebtoken::DecodingKey::from_jwk(other.public_jwk()).unwrap());
        let raw = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &json!({"iss": "i"}),
            key.encoding_key(),
        )
        .unwrap();
        let jws = parse(&raw, 4096).unwrap();
        let es = jsonwebtoken::Algorithm::ES256;
        assert!(verify_signature(&jws, std::slice::from_ref(&decoding), es).is_ok());
        assert!(verify_signature(&jws, &[other_decoding.clone(), decoding.clone()], es).is_ok());
        assert!(verify_signature(&jws, &[other_decoding], es).is_err());
        assert!(verify_signature(&jws, &[], es).is_err());
        let tampered = raw.replacen(".", ".e30", 1);
        let jws = parse(&tampered, 4096);
        assert!(jws.is_err() || verify_signature(&jws.unwrap(), &[decoding], es).is_err());
    }
}
