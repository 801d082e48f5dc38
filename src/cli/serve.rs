//! `serve --config FILE`: run the service until SIGTERM or SIGINT.

use std::path::Path;
use std::process::ExitCode;

use crate::configuration::Settings;
use crate::startup::Application;

/// Loads and validates the configuration, then serves.
///
/// # Errors
/// Configuration, startup and server errors.
pub fn serve(config: &Path) -> anyhow::Result<ExitCode> {
    let _log_guard = crate::telemetry::init_logging().map_err(anyhow::Error::msg)?;
    let settings = Settings::load(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = Application::build(settings)?;
        app.check_upstream().await?;
        app.run_until_stopped().await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}
