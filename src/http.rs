//! Outbound HTTP: one way to build clients (no redirects, timeouts, no proxy
//! from the environment) and to read bodies with a size cap.

use std::time::Duration;

use futures_util::StreamExt;

/// Builds an outbound client: redirects off (SSRF, see openidconnect-rs "Security
/// Warning"), connect and total timeouts, rustls.
///
/// # Errors
/// `reqwest::Error` when the TLS backend cannot be initialised (startup only).
pub fn client(
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .no_proxy()
        .user_agent(concat!("keycloak-ci-sts/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is larger than the cap (bytes).
    #[error("response body exceeds {0} bytes")]
    TooLarge(usize),
    /// Transport failure while reading.
    #[error("reading response body failed")]
    Read(#[source] reqwest::Error),
}

/// Reads the whole body, refusing more than `max` bytes (checks `Content-Length`
/// first, then counts while streaming).
///
/// # Errors
/// [`BodyError`].
pub async fn read_capped(resp: reqwest::Response, max: usize) -> Result<Vec<u8>, BodyError> {
    if let Some(len) = resp.content_length() {
        if len > max as u64 {
            return Err(BodyError::TooLarge(max));
        }
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(BodyError::Read)?;
        if out.len() + chunk.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
