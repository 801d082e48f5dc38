//! Logs: JSON lines on standard error, filtered by `RUST_LOG` (default `info`).
//! Nothing here ever receives a token, assertion or secret: types holding them
//! redact themselves in `Debug`. The audit trail is the `audit` module.

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global JSON log subscriber (call once, at startup). Lines are
/// written by a background thread (tracing-appender), so a slow or blocked
/// standard error never stalls request handling; when its buffer is full, lines
/// are dropped. Keep the returned guard alive until exit (it flushes on drop).
///
/// # Errors
/// When a subscriber is already installed.
pub fn init_logging() -> Result<tracing_appender::non_blocking::WorkerGuard, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_current_span(true)
        .with_span_list(false)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(guard)
}

/// Renders an error and its `source()` chain as `outer: inner: root`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
