//! Redacting wrappers for credentials.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// A bearer credential (a Bitbucket ID token, a Keycloak access token or a
/// client assertion). `Debug` and `Display` print `[redacted]`, so the value
/// can never reach a log line, an error message or a panic by accident.
#[derive(Clone)]
pub struct SecretToken(SecretString);

impl SecretToken {
    /// Wraps a token value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The raw value, for the one place that must send or parse it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Length of the value in bytes.
    pub fn len(&self) -> usize {
        self.expose().len()
    }

    /// True when the value is empty.
    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }

    /// Lower-case hex SHA-256 of the value: what the audit log records
    /// instead of the token itself.
    pub fn sha256_hex(&self) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(self.expose().as_bytes()))
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretToken([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_token_debug_is_redacted() {
        let t = SecretToken::new("eyJhbGciOi.secret.value");
        assert_eq!(format!("{t:?}"), "SecretToken([redacted])");
    }
}
