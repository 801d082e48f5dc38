//! Bitbucket's identifiers: braced UUIDs.

use std::fmt;

use serde::{Deserialize, Deserializer};

use super::truncate;

/// A Bitbucket UUID such as a `repositoryUuid`.
///
/// Bitbucket sends UUIDs in braces and lower case (`{d4e45493-4a33-477d-917b-a24e7e4bd39b}`,
/// as in Atlassian's OIDC token examples); the ARI audience carries the same
/// workspace UUID without braces. Policies and configuration may use either form:
/// both are parsed into the same value, so `{R}` and `R` never silently differ.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BbUuid(uuid::Uuid);

/// Why a string is not a Bitbucket UUID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a UUID (expected 8-4-4-4-12 hex digits, with or without braces)")]
pub struct BbUuidError(pub String);

impl BbUuid {
    /// Parses `{8-4-4-4-12}` or `8-4-4-4-12` (hex, any case).
    ///
    /// # Errors
    /// [`BbUuidError`] when the text is neither form (simple or URN forms are refused too).
    pub fn parse_lenient(s: &str) -> Result<Self, BbUuidError> {
        let inner = s
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .unwrap_or(s);
        Self::parse_hyphenated(inner).ok_or_else(|| BbUuidError(truncate(s, 80)))
    }

    /// Parses exactly Bitbucket's claim shape: `{8-4-4-4-12}` with braces.
    ///
    /// # Errors
    /// [`BbUuidError`] when braces are missing or the inside is not a hyphenated UUID.
    pub fn parse_braced(s: &str) -> Result<Self, BbUuidError> {
        s.strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .and_then(Self::parse_hyphenated)
            .ok_or_else(|| BbUuidError(truncate(s, 80)))
    }

    fn parse_hyphenated(s: &str) -> Option<Self> {
        if s.len() != 36 {
            return None;
        }
        uuid::Uuid::try_parse(s).ok().map(Self)
    }

    /// The braced lower-case form Bitbucket uses in claims.
    pub fn braced(&self) -> String {
        format!("{{{}}}", self.0.hyphenated())
    }

    /// The bare lower-case form used in the `ari:cloud:bitbucket::workspace/<uuid>` audience.
    pub fn bare(&self) -> String {
        self.0.hyphenated().to_string()
    }
}

impl fmt::Display for BbUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.0.hyphenated())
    }
}

impl fmt::Debug for BbUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for BbUuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.braced())
    }
}

impl schemars::JsonSchema for BbUuid {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "BitbucketUuid".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A Bitbucket UUID, `{8-4-4-4-12}` (braces optional; quote it in YAML).",
            "type": "string",
            "pattern": "^\\{?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\\}?$"
        })
    }
}

impl<'de> Deserialize<'de> for BbUuid {
    /// Lenient (braces optional): used for configuration and policy files.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_lenient(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braced_and_bare_forms_are_the_same_uuid() {
        let a = BbUuid::parse_lenient("{D4E45493-4a33-477d-917b-a24e7e4bd39b}").unwrap();
        let b = BbUuid::parse_lenient("d4e45493-4a33-477d-917b-a24e7e4bd39b").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.braced(), "{d4e45493-4a33-477d-917b-a24e7e4bd39b}");
        assert_eq!(a.bare(), "d4e45493-4a33-477d-917b-a24e7e4bd39b");
    }

    #[test]
    fn claim_form_requires_braces() {
        assert!(BbUuid::parse_braced("d4e45493-4a33-477d-917b-a24e7e4bd39b").is_err());
        assert!(BbUuid::parse_braced("{d4e45493-4a33-477d-917b-a24e7e4bd39b}").is_ok());
        assert!(BbUuid::parse_lenient("{d4e45493-4a33-477d-917b-a24e7e4bd39b").is_err());
        assert!(BbUuid::parse_lenient("d4e454934a33477d917ba24e7e4bd39b").is_err());
        assert!(BbUuid::parse_lenient("urn:uuid:d4e45493-4a33-477d-917b-a24e7e4bd39b").is_err());
    }
}
