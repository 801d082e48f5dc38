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

/// How the path of a URL taken from an upstream's answer must relate to the
/// path of the URL it is checked against ([`check_followed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRule {
    /// Any path on the same origin (the issuer's `jwks_uri`).
    AnyPath,
    /// The base's path or one under it (Keycloak's `token_endpoint` under
    /// `<base>/realms/<realm>`).
    Under,
    /// The base's path itself: another page of the same list (Bitbucket's
    /// `next`); only the query may differ.
    Same,
}

/// The one rule for a URL an upstream names (in a discovery document or a
/// page) before this service sends anything to it: the same origin as `base`
/// (scheme, host and port; so plain http only where `base` already is plain
/// http on loopback), no user name or password, and a path as `rule` says,
/// compared **by segments** after the URL parser resolved `.` and `..` (so
/// `/2.0-other` is not under `/2.0`; a trailing slash does not make another
/// path). Redirects are never followed at all ([`client`]).
///
/// # Errors
/// What is wrong, without the URL (it came from outside; callers name their own).
pub fn check_followed(url: &Url, base: &Url, rule: PathRule) -> Result<(), &'static str> {
    if !url.origin().is_tuple() || url.origin() != base.origin() {
        return Err("another origin (scheme, host or port)");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("it carries credentials");
    }
    let (path, under) = (segments(url), segments(base));
    let ok = match rule {
        PathRule::AnyPath => true,
        PathRule::Under => path.starts_with(&under),
        PathRule::Same => path == under,
    };
    if !ok {
        return Err(match rule {
            PathRule::Same => "another path",
            _ => "a path outside the expected one",
        });
    }
    Ok(())
}

/// The path's segments, without the empty one a trailing slash leaves.
fn segments(url: &Url) -> Vec<&str> {
    let mut v: Vec<&str> = url
        .path_segments()
        .map(Iterator::collect)
        .unwrap_or_default();
    if v.last() == Some(&"") {
        v.pop();
    }
    v
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

/// An outbound client per thread, for the hot path (the Keycloak token request).
///
/// A `reqwest::Client` runs each pooled connection as a task on the runtime that
/// opened it. actix-web runs one single-threaded runtime per worker thread, so a
/// client shared by all workers hands most requests to another thread's
/// connection task: a wake-up and two context switches per request, measured at
/// about a fifth of the service's CPU per exchange (`scripts/bench-cpu.sh`). One
/// client (and so one connection pool) per thread keeps each request and its
/// connection on the thread that serves it. Built lazily with the same settings;
/// when building fails (it did not at startup), the shared client is used.
pub struct PerThreadClient {
    connect_timeout: Duration,
    timeout: Duration,
    shared: reqwest::Client,
    clients: thread_local::ThreadLocal<reqwest::Client>,
}

impl PerThreadClient {
    /// Builds the shared client now (so a TLS backend failure surfaces at
    /// startup) and the per-thread ones on first use; settings as [`client`].
    ///
    /// # Errors
    /// `reqwest::Error` when the client cannot be built.
    pub fn new(connect_timeout: Duration, timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(Self {
            connect_timeout,
            timeout,
            shared: client(connect_timeout, timeout)?,
            clients: thread_local::ThreadLocal::new(),
        })
    }

    /// The calling thread's client.
    pub fn get(&self) -> &reqwest::Client {
        self.clients.get_or(|| {
            client(self.connect_timeout, self.timeout).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot build a per-thread HTTP client; sharing one");
                self.shared.clone()
            })
        })
    }
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

/// What an upstream's answer means for our caller, whatever the upstream (issuer
/// discovery and JWKS, Keycloak discovery and token endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// Worth retrying later: transport failure or timeout, 408, 429, 5xx.
    /// Answered 503 `temporarily_unavailable` with `Retry-After`.
    Transient,
    /// Our configuration is wrong (the URL is not the upstream's: 3xx, 401, 403,
    /// 404, 410 and other 4xx). Answered 502 with an operator code.
    Configuration,
    /// The upstream answered, but not with what the protocol says. Answered 502.
    Malformed,
}

/// Classifies a status that is not the expected 200 by meaning (RFC 9110 §15):
/// 408, 425, 429 and 5xx are transient; 3xx and the other 4xx say the request
/// went somewhere it should not (configuration); anything else (1xx, another 2xx,
/// a status outside 100-599) is not what the protocol answers (malformed).
pub fn status_meaning(status: u16) -> Meaning {
    match status {
        408 | 425 | 429 | 500..=599 => Meaning::Transient,
        300..=499 => Meaning::Configuration,
        _ => Meaning::Malformed,
    }
}

/// `Retry-After` of an upstream answer (RFC 9110 §10.2.3: delta-seconds or an
/// HTTP-date), in seconds from now, at most `max`; `None` when absent or unreadable.
pub fn retry_after_seconds(headers: &reqwest::header::HeaderMap, max: Duration) -> Option<u64> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let secs = match v.parse::<u64>() {
        Ok(s) => s,
        // All digits but past u64: as long as can be (then bounded by `max`).
        Err(_) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => u64::MAX,
        Err(_) => {
            let at = httpdate::parse_http_date(v).ok()?;
            at.duration_since(std::time::SystemTime::now())
                .map(|d| d.as_secs())
                .unwrap_or(0)
        }
    };
    Some(secs.clamp(1, max.as_secs().max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> reqwest::header::HeaderMap {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::RETRY_AFTER,
            reqwest::header::HeaderValue::from_str(v).unwrap(),
        );
        h
    }

    #[test]
    fn retry_after_is_read_in_both_forms_and_bounded() {
        let max = Duration::from_secs(60);
        assert_eq!(retry_after_seconds(&headers("7"), max), Some(7));
        assert_eq!(retry_after_seconds(&headers("0"), max), Some(1));
        assert_eq!(retry_after_seconds(&headers("86400"), max), Some(60));
        assert_eq!(
            retry_after_seconds(&headers("99999999999999999999"), max),
            Some(60)
        );
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let got = retry_after_seconds(&headers(&later), max).unwrap();
        assert!((20..=30).contains(&got), "{got}");
        assert_eq!(
            retry_after_seconds(&headers("Wed, 21 Oct 2015 07:28:00 GMT"), max),
            Some(1)
        );
        assert_eq!(retry_after_seconds(&headers("soon"), max), None);
        assert_eq!(
            retry_after_seconds(&reqwest::header::HeaderMap::new(), max),
            None
        );
    }

    #[test]
    fn followed_urls_keep_the_origin_and_compare_paths_by_segments() {
        let u = |s: &str| Url::parse(s).unwrap();
        let api = u("https://api.example.com/2.0/repositories/acme");
        let ok = |s: &str, r| check_followed(&u(s), &api, r).is_ok();
        assert!(ok(
            "https://api.example.com/2.0/repositories/acme?page=2",
            PathRule::Same
        ));
        assert!(ok(
            "https://API.example.com:443/2.0/repositories/acme/?page=2",
            PathRule::Same
        ));
        assert!(!ok(
            "https://api.example.com/2.0/repositories/acme-other",
            PathRule::Same
        ));
        assert!(!ok(
            "https://api.example.com/2.0/repositories/acme/x",
            PathRule::Same
        ));
        assert!(ok(
            "https://api.example.com/2.0/repositories/acme/x",
            PathRule::Under
        ));
        assert!(!ok(
            "https://api.example.com/2.0/repositories/acme%2Fx",
            PathRule::Under
        ));
        assert!(!ok(
            "https://api.example.com/2.0/repositories/acmex",
            PathRule::Under
        ));
        assert!(!ok(
            "https://api.example.com/2.0/repositories/acme/../x",
            PathRule::Under
        ));
        assert!(!ok(
            "https://api.example.com/2.0/repositories/acme/%2e%2e/x",
            PathRule::Under
        ));
        assert!(ok("https://api.example.com/elsewhere", PathRule::AnyPath));
        for other in [
            "http://api.example.com/2.0/repositories/acme",
            "https://api.example.com:8443/2.0/repositories/acme",
            "https://api.example.com.evil/2.0/repositories/acme",
            "https://u:p@api.example.com/2.0/repositories/acme",
            "data:text/plain,x",
        ] {
            assert!(!ok(other, PathRule::AnyPath), "{other}");
        }
        let root = u("https://api.example.com");
        assert!(check_followed(&u("https://api.example.com/x"), &root, PathRule::Under).is_ok());
    }

    #[test]
    fn statuses_are_classified_by_meaning() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert_eq!(status_meaning(s), Meaning::Transient, "{s}");
        }
        for s in [301, 302, 400, 401, 403, 404, 410] {
            assert_eq!(status_meaning(s), Meaning::Configuration, "{s}");
        }
        for s in [100, 201, 204, 600, 999] {
            assert_eq!(status_meaning(s), Meaning::Malformed, "{s}");
        }
    }
}
