//! OAuth protocol words, typed: the error codes callers see (RFC 6749 §5.2,
//! RFC 8693 §2.2.2), the token-type URNs of RFC 8693 §3, and scopes (RFC 6749
//! §3.3), split and joined in one place.

use std::fmt;

/// RFC 8693 §2.1 `grant_type` of a token exchange.
pub const GRANT_TYPE_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 §3 token type of an OIDC ID token (what Bitbucket issues).
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
/// RFC 8693 §3 token type of a JWT.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// RFC 8693 §3 token type of an OAuth access token (the only one issued).
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// RFC 7523 §2.2 client assertion type.
pub const CLIENT_ASSERTION_TYPE_JWT_BEARER: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The `error` member of an error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthError {
    /// RFC 6749 §5.2; RFC 8693 §2.2.2 also for an invalid or unacceptable subject token.
    InvalidRequest,
    /// RFC 8693 §2.2.2: the requested audience is not acceptable.
    InvalidTarget,
    /// RFC 6749 §5.2.
    InvalidScope,
    /// RFC 6749 §5.2: the grant is invalid, expired or revoked (here: the
    /// repository's Keycloak identity was disabled).
    InvalidGrant,
    /// RFC 6749 §5.2.
    UnsupportedGrantType,
    /// RFC 6749 §4.1.2.1: a temporary condition; retry later.
    TemporarilyUnavailable,
    /// RFC 6749 §4.1.2.1: an unexpected condition (here: upstream or configuration).
    ServerError,
}

impl OAuthError {
    /// The registered string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidTarget => "invalid_target",
            Self::InvalidScope => "invalid_scope",
            Self::InvalidGrant => "invalid_grant",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
            Self::ServerError => "server_error",
        }
    }
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for OAuthError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Longest scope token (and `audience`) accepted, in bytes.
pub const MAX_SCOPE_TOKEN_BYTES: usize = 256;

/// True for an RFC 6749 §3.3 scope token (`%x21 / %x23-5B / %x5D-7E`, non-empty),
/// at most [`MAX_SCOPE_TOKEN_BYTES`].
pub fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SCOPE_TOKEN_BYTES
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

/// A scope (RFC 6749 §3.3): scope tokens in the order first given, each once.
/// Parsed from and rendered as the space-separated form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(Vec<String>);

/// A scope string that is not RFC 6749 §3.3 scope tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an RFC 6749 scope token")]
pub struct ScopeError(pub String);

impl Scopes {
    /// Parses a space-separated scope; runs of spaces and surrounding spaces are
    /// tolerated, duplicates dropped.
    ///
    /// # Errors
    /// [`ScopeError`] naming the first bad token (truncated).
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        let mut out = Self::default();
        for item in s.split(' ').filter(|x| !x.is_empty()) {
            if !is_scope_token(item) {
                return Err(ScopeError(super::truncate(item, 64)));
            }
            out.push(item);
        }
        Ok(out)
    }

    /// Adds a token unless present (no syntax check: for values already checked).
    pub fn push(&mut self, token: &str) {
        if !self.contains(token) {
            self.0.push(token.to_string());
        }
    }

    /// True when `token` is one of the scopes.
    pub fn contains(&self, token: &str) -> bool {
        self.0.iter().any(|t| t == token)
    }

    /// The tokens, in order.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is no token.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> FromIterator<&'a str> for Scopes {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        let mut s = Self::default();
        for t in iter {
            s.push(t);
        }
        s
    }
}

impl fmt::Display for Scopes {
    /// The space-separated form (RFC 6749 §3.3).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" "))
    }
}

impl serde::Serialize for Scopes {
    /// A JSON array of the tokens (audit lines).
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_tokens_follow_rfc6749() {
        assert!(is_scope_token("artifacts:write"));
        assert!(is_scope_token("a!#[]~"));
        assert!(!is_scope_token(""));
        assert!(!is_scope_token("a b"));
        assert!(!is_scope_token("a\"b"));
        assert!(!is_scope_token("a\\b"));
        assert!(!is_scope_token("é"));
        assert!(!is_scope_token(&"a".repeat(257)));
    }

    #[test]
    fn scopes_split_dedupe_and_join_in_one_place() {
        let s = Scopes::parse("  b a  b ").unwrap();
        assert_eq!(s.as_slice(), ["b", "a"]);
        assert_eq!(s.to_string(), "b a");
        assert!(Scopes::parse("").unwrap().is_empty());
        assert_eq!(Scopes::parse("ok bad\"").unwrap_err().0, "bad\"");
        let collected: Scopes = ["x", "y", "x"].into_iter().collect();
        assert_eq!(collected.to_string(), "x y");
        assert_eq!(serde_json::to_string(&collected).unwrap(), "[\"x\",\"y\"]");
    }

    #[test]
    fn oauth_errors_render_their_registered_names() {
        assert_eq!(OAuthError::InvalidTarget.as_str(), "invalid_target");
        assert_eq!(
            serde_json::to_string(&OAuthError::TemporarilyUnavailable).unwrap(),
            "\"temporarily_unavailable\""
        );
    }
}
