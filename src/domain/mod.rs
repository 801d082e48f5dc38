//! Small domain types shared by every module, below all of them: redacting
//! secret wrappers ([`secret`]), Bitbucket's braced UUIDs ([`bitbucket`]) and the
//! OAuth protocol words ([`oauth`]: error codes, token-type URNs, scopes).

pub mod bitbucket;
pub mod error_code;
pub mod identity;
pub mod json;
pub mod json_schema;
pub mod oauth;
pub mod regular_file;
pub mod secret;
pub mod source;
pub mod yaml;

pub use bitbucket::{BbUuid, BbUuidError};
pub use oauth::{OAuthError, Scopes};
pub use secret::SecretToken;
pub use source::SourceError;

/// Cuts `s` to at most `max` characters for messages (never used on secrets).
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}
