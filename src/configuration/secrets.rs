//! Secrets named by the configuration: client secrets and the service's private
//! signing keys, accepted only as a file path or the name of an environment
//! variable, never inline. Errors name the file or variable, never the value.

use std::path::Path;

use secrecy::SecretString;

use super::raw::RawSigning;
use super::resolve;
use crate::signing::{SigningKey, SigningKeys};

/// Longest secret or key file read: a PEM RSA key of 4096 bits is about 3 KB.
pub(super) const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Reads a secret or key file without ever blocking (a FIFO or device is
/// refused), at most [`MAX_SECRET_FILE_BYTES`].
fn read_small_file(path: &Path) -> Result<String, String> {
    crate::domain::regular_file::read_small_file(path, MAX_SECRET_FILE_BYTES)
}

/// Reads a client secret from exactly one of `file` (relative to `base`) or the
/// environment variable `env`; one trailing newline is dropped.
///
/// # Errors
/// A reason naming the file or variable (never the secret).
/// The message for an unset variable: its name, unless it is not a variable
/// name at all (a secret pasted where its variable's name belongs is never
/// printed back).
fn env_unset(key: &str, var: &str) -> String {
    let name = var
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && var.len() <= 128;
    if name {
        format!("{key}: environment variable `{var}` is not set")
    } else {
        format!(
            "{key}: not an environment variable name (letters, digits and `_`); \
             it is not shown, in case it is the secret itself"
        )
    }
}

pub(super) fn read_secret(
    file: Option<&Path>,
    env: Option<&str>,
    base: &Path,
) -> Result<SecretString, String> {
    let value = match (file, env) {
        (Some(f), None) => {
            let path = resolve(base, f);
            read_small_file(&path)
                .map_err(|e| format!("cannot read secret_file {}: {e}", path.display()))?
        }
        (None, Some(var)) => std::env::var(var).map_err(|_| env_unset("secret_env", var))?,
        _ => return Err("set exactly one of secret_file or secret_env".into()),
    };
    let trimmed = value.trim_end_matches(['\r', '\n']).to_string();
    if trimmed.is_empty() {
        return Err("the client secret is empty".into());
    }
    Ok(SecretString::from(trimmed))
}

/// Loads the `[signing]` keys: `key_env` first, then `key_files` in order (newest
/// first: the first key signs, all are published).
///
/// # Errors
/// `(key, reason)` pairs, one per unreadable or invalid key.
pub(super) fn load_signing_keys(
    s: &RawSigning,
    base: &Path,
) -> Result<SigningKeys, Vec<(String, String)>> {
    load_keys(
        "signing",
        s.algorithm,
        &s.key_files,
        s.key_env.as_deref(),
        base,
    )
}

/// Loads a key ring of section `section` (`signing`, `identity`): `key_env` first,
/// then `key_files` in order (newest first).
///
/// # Errors
/// `(key, reason)` pairs, one per unreadable or invalid key.
pub(super) fn load_keys(
    section: &str,
    algorithm: crate::signing::SigningAlgorithm,
    key_files: &[std::path::PathBuf],
    key_env: Option<&str>,
    base: &Path,
) -> Result<SigningKeys, Vec<(String, String)>> {
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    if let Some(var) = key_env {
        match std::env::var(var) {
            Err(_) => errors.push((format!("{section}.key_env"), env_unset("key_env", var))),
            Ok(pem) => match SigningKey::from_pem(&SecretString::from(pem), algorithm) {
                Ok(k) => keys.push(k),
                Err(e) => errors.push((format!("{section}.key_env"), e.to_string())),
            },
        }
    }
    for (i, p) in key_files.iter().enumerate() {
        let k = format!("{section}.key_files[{i}]");
        let path = resolve(base, p);
        match read_small_file(&path) {
            Err(e) => errors.push((k, format!("cannot read {}: {e}", path.display()))),
            Ok(pem) => match SigningKey::from_pem(&SecretString::from(pem), algorithm) {
                Ok(key) => keys.push(key),
                Err(e) => errors.push((k, format!("{}: {e}", path.display()))),
            },
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    SigningKeys::new(keys).ok_or_else(|| {
        vec![(
            section.to_string(),
            "set key_files (newest first) or key_env".to_string(),
        )]
    })
}

#[cfg(test)]
mod tests {
    use super::env_unset;

    #[test]
    fn a_secret_pasted_as_a_variable_name_is_not_printed_back() {
        assert!(env_unset("secret_env", "KCS_SECRET").contains("`KCS_SECRET`"));
        let m = env_unset("secret_env", "S3cr3t-Value+/==");
        assert!(!m.contains("S3cr3t"), "{m}");
    }
}
