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

/// Characters that make two strings look alike while comparing different, or an
/// audit line or a policy read other than it means: control characters,
/// zero-width and other invisible formatting characters, direction-changing
/// ones, the byte order mark and Unicode tags. One list for tokens' claims,
/// policy patterns, inventory names and the configuration.
pub fn deceptive(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{061C}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

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
