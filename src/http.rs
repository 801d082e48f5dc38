//! Outbound HTTP: one way to build clients (no redirects, timeouts, no proxy
//! from the environment) and to read bodies with a size cap.

use std::net::IpAddr;
use std::time::Duration;

use futures_util::StreamExt;
use url::Url;

/// True when `host` is a loopback name or address (plain http is allowed only there).
pub fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        url::Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

/// The one transport rule for every upstream URL (issuer, discovery, JWKS,
/// Keycloak): `https`, or plain `http` only to a loopback host (local tests).
pub fn is_https_or_loopback_http(url: &Url) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => url.host().is_some_and(|h| is_loopback_host(&h)),
        _ => false,
    }
}

/// Checks a configured upstream URL: absolute, [`is_https_or_loopback_http`], no
/// credentials, query or fragment.
///
/// # Errors
/// The reason, naming the URL.
pub fn check_upstream_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    if url.host().is_none() {
        return Err(format!("`{s}` has no host"));
    }
    if !is_https_or_loopback_http(&url) {
        return Err(match url.scheme() {
            "http" => format!("`{s}` uses plain http; only loopback addresses may"),
            other => format!("`{s}`: scheme `{other}` is not http(s)"),
        });
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("`{s}` must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{s}` must not have a query or fragment"));
    }
    Ok(url)
}

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
