//! `keys generate --out FILE [--alg ES256|RS256]`: a new signing key.

use std::path::Path;
use std::process::ExitCode;

use secrecy::{ExposeSecret, SecretString};

use super::out;
use crate::signing::{generate_pem, SigningAlgorithm, SigningKey};

/// Writes a new PKCS#8 PEM private key (mode 0600, never overwriting) and prints
/// its `kid` and public JWK.
///
/// # Errors
/// Unknown algorithm, existing or unwritable file, key generation failure.
pub fn generate(out_path: &Path, alg: &str) -> anyhow::Result<ExitCode> {
    let alg = match alg {
        "ES256" => SigningAlgorithm::ES256,
        "RS256" => SigningAlgorithm::RS256,
        other => anyhow::bail!("unsupported algorithm `{other}` (ES256 or RS256)"),
    };
    let pem = generate_pem(alg)?;
    let key = SigningKey::from_pem(&pem, alg)?;
    write_private(out_path, &pem)?;
    out(&format!("wrote {} (kid {})", out_path.display(), key.kid()))?;
    out(&serde_json::to_string_pretty(key.public_jwk())?)?;
    Ok(ExitCode::SUCCESS)
}

fn write_private(out: &Path, pem: &SecretString) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    f.write_all(pem.expose_secret().as_bytes())?;
    Ok(())
}
