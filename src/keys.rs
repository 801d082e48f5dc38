//! The service's own signing keys: the keys that sign `private_key_jwt` client
//! assertions for Keycloak (RFC 7523 §2.2, OIDC Core §9) and whose public halves
//! are served at `GET /.well-known/jwks.json` for the Keycloak client's "JWKS URL".
//!
//! Role of `josekit` (the one place it is used): generating key pairs and
//! exporting public keys as JWKs. Signing on the hot path and every verification
//! use `jsonwebtoken` (aws-lc-rs backend) only, so there is one JOSE stack on the
//! verification path.
//!
//! Rotation: configuration lists key files newest first. The first key signs; all
//! keys are published. To rotate, add the new key *second* (published, not yet used),
//! wait for Keycloak's JWKS cache (it refetches on an unknown `kid`, at most every
//! 10 s), then move it first; drop the old key once its assertions (≤ 60 s) expired.

use josekit::jwk::KeyPair;
use jsonwebtoken::{Algorithm, EncodingKey};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Signing algorithm for client assertions. Defaults to ES256 (cheap signatures on
/// the hot path). Keycloak's client attribute `token.endpoint.auth.signing.alg`
/// should name the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum SigningAlgorithm {
    /// ECDSA P-256 with SHA-256 (RFC 7518 §3.4).
    #[default]
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 3072-bit keys when generated (RFC 7518 §3.3).
    RS256,
}

impl SigningAlgorithm {
    /// The `jsonwebtoken` algorithm.
    pub fn jwt_alg(self) -> Algorithm {
        match self {
            Self::ES256 => Algorithm::ES256,
            Self::RS256 => Algorithm::RS256,
        }
    }

    /// The JOSE name (`"ES256"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::ES256 => "ES256",
            Self::RS256 => "RS256",
        }
    }
}

/// Errors from key generation and loading.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The PEM is not a private key of the configured algorithm.
    #[error("not a PKCS#8 PEM {alg} private key: {reason}")]
    Parse {
        /// Algorithm expected.
        alg: &'static str,
        /// Parser message (never contains key material).
        reason: String,
    },
    /// Key generation failed.
    #[error("key generation failed: {0}")]
    Generate(String),
}

/// One loaded signing key. `Debug` shows only the `kid`.
pub struct SigningKey {
    kid: String,
    alg: SigningAlgorithm,
    encoding: EncodingKey,
    public_jwk: Map<String, Value>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads a PKCS#8 PEM private key.
    ///
    /// The `kid` is the RFC 7638 JWK thumbprint (SHA-256, base64url) of the public
    /// key, so a new key always gets a new `kid` (Keycloak does not pick up a changed
    /// key under an old `kid`, keycloak#14263).
    ///
    /// # Errors
    /// [`KeyError::Parse`] when the PEM is not a key for `alg`.
    pub fn from_pem(pem: &SecretString, alg: SigningAlgorithm) -> Result<Self, KeyError> {
        let bytes = pem.expose_secret().as_bytes();
        let parse = |reason: String| KeyError::Parse {
            alg: alg.name(),
            reason,
        };
        let (jwk, encoding) = match alg {
            SigningAlgorithm::ES256 => {
                let pair = josekit::jws::ES256
                    .key_pair_from_pem(bytes)
                    .map_err(|e| parse(e.to_string()))?;
                let enc = EncodingKey::from_ec_pem(bytes).map_err(|e| parse(e.to_string()))?;
                (pair.to_jwk_public_key(), enc)
            }
            SigningAlgorithm::RS256 => {
                let pair = josekit::jws::RS256
                    .key_pair_from_pem(bytes)
                    .map_err(|e| parse(e.to_string()))?;
                let enc = EncodingKey::from_rsa_pem(bytes).map_err(|e| parse(e.to_string()))?;
                (pair.to_jwk_public_key(), enc)
            }
        };
        let mut public_jwk: Map<String, Value> = jwk.as_ref().clone();
        let kid = thumbprint(&public_jwk);
        public_jwk.insert("kid".into(), Value::String(kid.clone()));
        public_jwk.insert("use".into(), Value::String("sig".into()));
        public_jwk.insert("alg".into(), Value::String(alg.name().into()));
        Ok(Self {
            kid,
            alg,
            encoding,
            public_jwk,
        })
    }

    /// The key id placed in assertion headers and in the published JWK.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> SigningAlgorithm {
        self.alg
    }

    /// The `jsonwebtoken` encoding key.
    pub fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }

    /// The public JWK (with `kid`, `use`, `alg`).
    pub fn public_jwk(&self) -> &Map<String, Value> {
        &self.public_jwk
    }
}

/// Generates a new private key and returns it as PKCS#8 PEM.
///
/// # Errors
/// [`KeyError::Generate`] when the crypto library fails.
pub fn generate_pem(alg: SigningAlgorithm) -> Result<SecretString, KeyError> {
    let pem = match alg {
        SigningAlgorithm::ES256 => josekit::jws::ES256
            .generate_key_pair()
            .map_err(|e| KeyError::Generate(e.to_string()))?
            .to_pem_private_key(),
        SigningAlgorithm::RS256 => josekit::jws::RS256
            .generate_key_pair(3072)
            .map_err(|e| KeyError::Generate(e.to_string()))?
            .to_pem_private_key(),
    };
    String::from_utf8(pem)
        .map(SecretString::from)
        .map_err(|_| KeyError::Generate("PEM is not UTF-8".into()))
}

/// RFC 7638 thumbprint of a public JWK: SHA-256 over the required members in
/// lexicographic order, base64url without padding.
pub fn thumbprint(jwk: &Map<String, Value>) -> String {
    use base64::Engine;
    let members: &[&str] = match jwk.get("kty").and_then(Value::as_str) {
        Some("EC") => &["crv", "kty", "x", "y"],
        Some("RSA") => &["e", "kty", "n"],
        _ => &["kty"],
    };
    let mut canonical = Map::new();
    for m in members {
        if let Some(v) = jwk.get(*m) {
            canonical.insert((*m).to_string(), v.clone());
        }
    }
    // serde_json::Map is a BTreeMap here (no preserve_order): keys come out sorted.
    let json = Value::Object(canonical).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(json.as_bytes()))
}

/// The service's key ring: the first key signs, every key is published.
#[derive(Debug)]
pub struct SigningKeys {
    keys: Vec<SigningKey>,
}

impl SigningKeys {
    /// Builds the ring; `keys` must be non-empty and newest first.
    ///
    /// # Errors
    /// Returns `None` when `keys` is empty.
    pub fn new(keys: Vec<SigningKey>) -> Option<Self> {
        if keys.is_empty() {
            None
        } else {
            Some(Self { keys })
        }
    }

    /// The key that signs new assertions.
    pub fn active(&self) -> &SigningKey {
        // `new` guarantees at least one key.
        &self.keys[0]
    }

    /// The JWKS document served at `/.well-known/jwks.json` (RFC 7517 §5).
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|k| Value::Object(k.public_jwk.clone()))
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_es256_key_loads_and_has_thumbprint_kid() {
        let pem = generate_pem(SigningAlgorithm::ES256).unwrap();
        let key = SigningKey::from_pem(&pem, SigningAlgorithm::ES256).unwrap();
        assert_eq!(key.kid().len(), 43);
        assert_eq!(key.public_jwk()["kty"], "EC");
        assert!(
            key.public_jwk().get("d").is_none(),
            "private part must not be published"
        );
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn rfc7638_example_thumbprint() {
        // RFC 7638 §3.1 example key and its published thumbprint.
        let jwk: Map<String, Value> = serde_json::from_str(r#"{"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB","alg":"RS256","kid":"2011-04-29"}"#).unwrap();
        assert_eq!(
            thumbprint(&jwk),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn wrong_algorithm_pem_is_refused() {
        let pem = generate_pem(SigningAlgorithm::ES256).unwrap();
        assert!(SigningKey::from_pem(&pem, SigningAlgorithm::RS256).is_err());
    }
}
