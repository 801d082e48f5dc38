//! `bitbucket-dev-issuer`: a local Bitbucket-compatible OIDC issuer for the demo
//! and manual testing. Never point a production service at it.
//!
//! `bitbucket-dev-issuer --listen 127.0.0.1:18082` serves discovery and keys for
//! any workspace slug, and `POST /mint` with a JSON body such as
//! `{"workspace":"acme","workspace_uuid":"…","repository_uuid":"…","branch_name":"main"}`
//! returns a signed token.

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

/// Local Bitbucket-compatible OIDC issuer (development only).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Listen address (loopback).
    #[arg(long, default_value = "127.0.0.1:18082")]
    listen: String,
    /// Also serve a stub Keycloak realm whose token endpoint answers instantly
    /// (for the load benchmark's "service ceiling" scenario).
    #[arg(long)]
    keycloak_stub: bool,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> Result<(), String> {
        let listener =
            TcpListener::bind(&args.listen).map_err(|e| format!("bind {}: {e}", args.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        if !addr.ip().is_loopback() {
            return Err("refusing to listen on a non-loopback address".into());
        }
        let issuer = Arc::new(keycloak_ci_sts_testkit::DevIssuer::new(&format!(
            "http://{addr}"
        ))?);
        eprintln!(
            "bitbucket-dev-issuer on http://{addr} (issuer: {})",
            issuer.issuer_for("<slug>")
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            keycloak_ci_sts_testkit::serve_with(issuer, listener, args.keycloak_stub, args.workers)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        })
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
