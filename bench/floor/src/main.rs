//! The floor of the stack: the least any implementation of the token exchange
//! does on this service's crates, and nothing else. Per request:
//!
//! 1. an actix-web form POST (`subject_token`, `audience`);
//! 2. one RS256 verification with jsonwebtoken against a key fetched once at
//!    startup, checking `iss`, `aud`, `exp` and the algorithm;
//! 3. one POST of `grant_type=client_credentials` (HTTP Basic) to the token
//!    endpoint through a pooled reqwest client — one client per worker thread,
//!    as the service keeps them, so a request and its connection stay on one
//!    thread;
//! 4. one `write()` of a JSON line to an append-only file;
//! 5. a JSON answer.
//!
//! No policy, no limits, no metrics, no request id, no logging: the ratio of
//! the service's CPU per allowed exchange to this program's, measured in the
//! same run under the same load (`scripts/bench-cpu.sh`,
//! `scripts/bench-scale.sh`), is what the service's own work costs.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use clap::Parser;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// The issuer's JWKS (its first RS256 key is used for every token).
    #[arg(long)]
    jwks_url: String,
    /// Expected `iss`.
    #[arg(long)]
    issuer: String,
    /// Expected `aud`.
    #[arg(long)]
    audience: String,
    /// The Keycloak token endpoint.
    #[arg(long)]
    token_url: String,
    /// Client id (HTTP Basic).
    #[arg(long)]
    client_id: String,
    /// Client secret (HTTP Basic).
    #[arg(long, env = "FLOOR_CLIENT_SECRET", hide_env_values = true)]
    client_secret: String,
    /// The append-only file of JSON lines.
    #[arg(long)]
    audit: std::path::PathBuf,
}

struct Floor {
    key: DecodingKey,
    validation: Validation,
    token_url: String,
    client_id: String,
    client_secret: String,
    audit: File,
}

#[derive(Deserialize)]
struct Form {
    subject_token: String,
    audience: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

#[derive(Deserialize)]
struct Issued {
    access_token: String,
    expires_in: u64,
}

fn refuse(error: &'static str) -> HttpResponse {
    HttpResponse::BadRequest().json(serde_json::json!({ "error": error }))
}

async fn token(
    floor: web::Data<Arc<Floor>>,
    client: web::Data<reqwest::Client>,
    form: web::Form<Form>,
) -> HttpResponse {
    let Ok(step) =
        jsonwebtoken::decode::<Claims>(&form.subject_token, &floor.key, &floor.validation)
    else {
        return refuse("invalid_request");
    };
    let issued = client
        .post(&floor.token_url)
        .basic_auth(&floor.client_id, Some(&floor.client_secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await;
    let issued = match issued {
        Ok(r) if r.status().is_success() => r.json::<Issued>().await,
        _ => return HttpResponse::BadGateway().finish(),
    };
    let Ok(issued) = issued else {
        return HttpResponse::BadGateway().finish();
    };
    let mut line = serde_json::to_vec(&serde_json::json!({
        "sub": step.claims.sub,
        "audience": form.audience,
        "client": floor.client_id,
    }))
    .unwrap_or_default();
    line.push(b'\n');
    if (&floor.audit).write_all(&line).is_err() {
        return HttpResponse::InternalServerError().finish();
    }
    HttpResponse::Ok().json(serde_json::json!({
        "access_token": issued.access_token,
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
    }))
}

fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let jwks: jsonwebtoken::jwk::JwkSet = client()?
        .get(&args.jwks_url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let jwk = jwks
        .keys
        .iter()
        .find(|k| matches!(k.algorithm, jsonwebtoken::jwk::AlgorithmParameters::RSA(_)))
        .ok_or_else(|| anyhow::anyhow!("no RSA key at {}", args.jwks_url))?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[&args.issuer]);
    validation.set_audience(&[&args.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let floor = Arc::new(Floor {
        key: DecodingKey::from_jwk(jwk)?,
        validation,
        token_url: args.token_url,
        client_id: args.client_id,
        client_secret: args.client_secret,
        audit: File::options()
            .create(true)
            .append(true)
            .open(&args.audit)?,
    });
    // Built before the factory so a TLS backend failure ends startup.
    client()?;
    HttpServer::new(move || {
        // The factory runs once per worker thread: one pool per thread.
        let client = client().map(web::Data::new);
        let app = App::new().app_data(web::Data::new(floor.clone()));
        match client {
            Ok(c) => app.app_data(c).route("/token", web::post().to(token)),
            Err(_) => app,
        }
    })
    .bind(&args.listen)?
    .run()
    .await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}
