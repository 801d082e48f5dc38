//! The service's own signing keys: the keys that sign `private_key_jwt` client
//! assertions for Keycloak (RFC 7523 §2.2, OIDC Core §9) and whose public halves
//! are served at `GET /.well-known/jwks.json` for the Keycloak client's "JWKS URL".
//!
//! Role of `josekit` (the one place it is used): generating new key pairs as
//! PKCS#8 PEM (`keys generate`); jsonwebtoken has no key generation. Everything
//! else — loading keys, the public JWK (`Jwk::from_encoding_key`), the RFC 7638
//! `kid` (`Jwk::thumbprint`), the JWKS document (`JwkSet`), signing and every
//! verification — is `jsonwebtoken` with its aws-lc-rs backend, one JOSE stack.
//!
//! Rotation: configuration lists key files newest first. The first key signs; all
//! keys are published. To rotate, add the new key *second* (published, not yet used),
//! wait for Keycloak's JWKS cache (it refetches on an unknown `kid`, at most every
//! 10 s), then move it first; drop the old key once its assertions (≤ 60 s) expired.

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Signing algorithm for client assertions. Defaults to ES256 (cheap signatures on
/// the hot path). Keycloak's client attribute `token.endpoint.auth.signing.alg`
/// should name the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, schemars::JsonSchema)]
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
    public_jwk: Jwk,
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
        let encoding = match alg {
            SigningAlgorithm::ES256 => EncodingKey::from_ec_pem(bytes),
            SigningAlgorithm::RS256 => EncodingKey::from_rsa_pem(bytes),
        }
        .map_err(|e| parse(e.to_string()))?;
        let mut public_jwk =
            Jwk::from_encoding_key(&encoding, alg.jwt_alg()).map_err(|e| parse(e.to_string()))?;
        let kid = public_jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| parse(e.to_string()))?;
        public_jwk.common.key_id = Some(kid.clone());
        public_jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        public_jwk.common.key_algorithm = Some(KeyAlgorithm::from(alg.jwt_alg()));
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

    /// The public JWK (with `kid`, `use`, `alg`; never a private member).
    pub fn public_jwk(&self) -> &Jwk {
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
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.keys.iter().map(|k| k.public_jwk.clone()).collect(),
        }
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
        let jwk = serde_json::to_value(key.public_jwk()).unwrap();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["kid"], key.kid());
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], "ES256");
        assert!(jwk.get("d").is_none(), "private part must not be published");
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn rfc7638_example_thumbprint() {
        // RFC 7638 §3.1 example key and its published thumbprint.
        let jwk: Jwk = serde_json::from_str(r#"{"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB","alg":"RS256","kid":"2011-04-29"}"#).unwrap();
        assert_eq!(
            jwk.thumbprint(ThumbprintHash::SHA256).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn rsa_keys_load_too_and_the_jwks_lists_every_key() {
        let rsa = SigningKey::from_pem(
            &generate_pem(SigningAlgorithm::RS256).unwrap(),
            SigningAlgorithm::RS256,
        )
        .unwrap();
        let ec = SigningKey::from_pem(
            &generate_pem(SigningAlgorithm::ES256).unwrap(),
            SigningAlgorithm::ES256,
        )
        .unwrap();
        let ring = SigningKeys::new(vec![ec, rsa]).unwrap();
        let set = serde_json::to_value(ring.jwks()).unwrap();
        assert_eq!(set["keys"][0]["kty"], "EC");
        assert_eq!(set["keys"][1]["kty"], "RSA");
        assert!(set["keys"][1].get("d").is_none());
    }

    #[test]
    fn wrong_algorithm_pem_is_refused() {
        let pem = generate_pem(SigningAlgorithm::ES256).unwrap();
        assert!(SigningKey::from_pem(&pem, SigningAlgorithm::RS256).is_err());
    }
}
