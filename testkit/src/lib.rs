//! Test kit of keycloak-ci-sts: a local Bitbucket-compatible OIDC issuer, for
//! tests, the demo and the benchmark only (a workspace crate of its own, so it is
//! never compiled into the service). It serves, per workspace slug, exactly the
//! paths Bitbucket serves (Bitbucket Cloud REST API, "Get OpenID configuration for
//! OIDC in Pipelines" and "Get keys for OIDC in Pipelines"):
//!
//! - `GET /2.0/workspaces/<slug>/pipelines-config/identity/oidc/.well-known/openid-configuration`
//! - `GET /2.0/workspaces/<slug>/pipelines-config/identity/oidc/keys.json`
//!
//! and mints RS256 tokens with Bitbucket's claim shapes (braced UUIDs, `aud` string
//! or array, `sub` = `{repo}:{step}` or `{repo}:{env}:{step}`, no `jti`/`nbf`).
//! `POST /mint` (JSON [`StepClaims`]) returns a token, for shell demos.
//! Keys can be rotated to exercise the service's key cache.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{web, App, HttpResponse, HttpServer};
use josekit::jwk::KeyPair;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// One issuer key.
struct DevKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
    /// Public key encodings, for key-confusion tests: (name, bytes).
    public_forms: Vec<(&'static str, Vec<u8>)>,
}

/// The issuer state. Share it behind an `Arc`.
pub struct DevIssuer {
    base: String,
    keys: RwLock<Vec<Arc<DevKey>>>,
    /// Every `kid` this issuer has had: a rotation never brings one back.
    had: Mutex<HashSet<String>>,
    /// Number of discovery documents served.
    pub discovery_hits: AtomicUsize,
    /// Number of JWKS documents served.
    pub jwks_hits: AtomicUsize,
}

/// What a pipeline step looks like, to mint its token. UUIDs are given bare or
/// braced and always emitted braced, lower case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepClaims {
    /// Workspace slug (selects the issuer path).
    pub workspace: String,
    /// `workspaceUuid`.
    pub workspace_uuid: String,
    /// `repositoryUuid`.
    pub repository_uuid: String,
    /// `stepUuid` (random when absent).
    #[serde(default)]
    pub step_uuid: Option<String>,
    /// `pipelineUuid` (random when absent).
    #[serde(default)]
    pub pipeline_uuid: Option<String>,
    /// `branchName`, absent for tag builds.
    #[serde(default)]
    pub branch_name: Option<String>,
    /// `deploymentEnvironmentUuid` for deployment steps.
    #[serde(default)]
    pub deployment_environment_uuid: Option<String>,
    /// Custom audiences (`oidc: audiences:`); with any, `aud` becomes an array
    /// holding the workspace ARI first.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Lifetime in seconds (default 3600).
    #[serde(default)]
    pub lifetime_seconds: Option<u64>,
}

fn braced(s: &str) -> String {
    let inner = s
        .trim_start_matches('{')
        .trim_end_matches('}')
        .to_ascii_lowercase();
    format!("{{{inner}}}")
}

fn bare(s: &str) -> String {
    s.trim_start_matches('{')
        .trim_end_matches('}')
        .to_ascii_lowercase()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How many RSA keys one process generates at most. Generating an RSA-2048 key
/// was about 70 % of the CPU of starting a service in a test (hundreds of issuers
/// per test run), so a process generates at most this many and hands them out in
/// turn. Issuers of different tests may share a key (each service trusts only its
/// own issuer's URL); two issuers created one after the other get different keys
/// unless `KEY_POOL` others were handed out in between, and one issuer never gets
/// a key it had before ([`pooled_key`]).
const KEY_POOL: usize = 64;
static KEYS: [OnceLock<Arc<DevKey>>; KEY_POOL] = [const { OnceLock::new() }; KEY_POOL];
static NEXT_KEY: AtomicUsize = AtomicUsize::new(0);

/// The next pooled key that is not in `had` (a fresh key when this issuer has
/// had them all).
fn pooled_key(had: &HashSet<String>) -> Result<Arc<DevKey>, String> {
    for _ in 0..KEY_POOL {
        let slot = &KEYS[NEXT_KEY.fetch_add(1, Ordering::Relaxed) % KEY_POOL];
        let key = match slot.get() {
            Some(k) => k.clone(),
            None => {
                let k = Arc::new(new_key()?);
                slot.get_or_init(|| k).clone()
            }
        };
        if !had.contains(&key.kid) {
            return Ok(key);
        }
    }
    Ok(Arc::new(new_key()?))
}

fn new_key() -> Result<DevKey, String> {
    let pair = josekit::jws::RS256
        .generate_key_pair(2048)
        .map_err(|e| e.to_string())?;
    let pem = pair.to_pem_private_key();
    let encoding = EncodingKey::from_rsa_pem(&pem).map_err(|e| e.to_string())?;
    let mut jwk: Map<String, Value> = pair.to_jwk_public_key().as_ref().clone();
    let kid = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::RS256)
        .and_then(|j| j.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256))
        .map_err(|e| e.to_string())?;
    jwk.insert("kid".into(), Value::String(kid.clone()));
    jwk.insert("use".into(), Value::String("sig".into()));
    jwk.insert("alg".into(), Value::String("RS256".into()));
    let n = jwk
        .get("n")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .as_bytes()
        .to_vec();
    let public_forms = vec![
        ("spki-pem", pair.to_pem_public_key()),
        ("pkcs1-pem", pair.to_traditional_pem_public_key()),
        ("spki-der", pair.to_der_public_key()),
        ("pkcs1-der", pair.to_raw_public_key()),
        ("jwk-n-base64url", n),
    ];
    let jwk = Value::Object(jwk);
    let mut public_forms = public_forms;
    public_forms.push(("jwk-json", jwk.to_string().into_bytes()));
    Ok(DevKey {
        kid,
        encoding,
        jwk,
        public_forms,
    })
}

impl DevIssuer {
    /// An issuer whose URLs start with `base` (e.g. `http://127.0.0.1:18082`), with one key.
    ///
    /// # Errors
    /// Key generation failure.
    pub fn new(base: &str) -> Result<Self, String> {
        let first = pooled_key(&HashSet::new())?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            keys: RwLock::new(vec![first.clone()]),
            had: Mutex::new(HashSet::from([first.kid.clone()])),
            discovery_hits: AtomicUsize::new(0),
            jwks_hits: AtomicUsize::new(0),
        })
    }

    /// The issuer (`iss`) for a workspace slug, Bitbucket's path shape.
    pub fn issuer_for(&self, workspace: &str) -> String {
        format!(
            "{}/2.0/workspaces/{workspace}/pipelines-config/identity/oidc",
            self.base
        )
    }

    /// The published JWKS.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .read()
            .map(|k| k.iter().map(|k| k.jwk.clone()).collect())
            .unwrap_or_default();
        json!({ "keys": keys })
    }

    /// `kid` of the signing key.
    pub fn active_kid(&self) -> String {
        self.keys
            .read()
            .ok()
            .and_then(|k| k.last().map(|k| k.kid.clone()))
            .unwrap_or_default()
    }

    /// Encodings of the active public key (PEM, DER, JWK, modulus), to try as HMAC
    /// secrets in key-confusion tests.
    pub fn public_key_forms(&self) -> Vec<(&'static str, Vec<u8>)> {
        self.keys
            .read()
            .ok()
            .and_then(|k| k.last().map(|k| k.public_forms.clone()))
            .unwrap_or_default()
    }

    /// Adds a new key and signs with it from now on; returns its `kid`.
    ///
    /// # Errors
    /// Key generation failure.
    pub fn rotate(&self) -> Result<String, String> {
        let mut had = self.had.lock().map_err(|_| "lock".to_string())?;
        let k = pooled_key(&had)?;
        let kid = k.kid.clone();
        had.insert(kid.clone());
        if let Ok(mut keys) = self.keys.write() {
            keys.push(k);
        }
        Ok(kid)
    }

    /// Stops publishing (and signing with) `kid`.
    pub fn remove_key(&self, kid: &str) {
        if let Ok(mut keys) = self.keys.write() {
            keys.retain(|k| k.kid != kid);
        }
    }

    /// Claims of a step token, exactly in Bitbucket's shapes.
    pub fn claims(&self, c: &StepClaims) -> Value {
        let iat = now();
        let step = c
            .step_uuid
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let pipeline = c
            .pipeline_uuid
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let repo = braced(&c.repository_uuid);
        let ari = format!("ari:cloud:bitbucket::workspace/{}", bare(&c.workspace_uuid));
        let aud = if c.audiences.is_empty() {
            Value::String(ari)
        } else {
            let mut v = vec![Value::String(ari)];
            v.extend(c.audiences.iter().cloned().map(Value::String));
            Value::Array(v)
        };
        let sub = match &c.deployment_environment_uuid {
            Some(e) => format!("{repo}:{}:{}", braced(e), braced(&step)),
            None => format!("{repo}:{}", braced(&step)),
        };
        let mut m = Map::new();
        m.insert("sub".into(), Value::String(sub));
        m.insert("aud".into(), aud);
        m.insert("stepUuid".into(), Value::String(braced(&step)));
        m.insert("iss".into(), Value::String(self.issuer_for(&c.workspace)));
        m.insert("repositoryUuid".into(), Value::String(repo));
        if let Some(b) = &c.branch_name {
            m.insert("branchName".into(), Value::String(b.clone()));
        }
        if let Some(e) = &c.deployment_environment_uuid {
            m.insert("deploymentEnvironmentUuid".into(), Value::String(braced(e)));
        }
        m.insert(
            "exp".into(),
            json!(iat + c.lifetime_seconds.unwrap_or(3600)),
        );
        m.insert("iat".into(), json!(iat));
        m.insert("pipelineUuid".into(), Value::String(braced(&pipeline)));
        m.insert(
            "workspaceUuid".into(),
            Value::String(braced(&c.workspace_uuid)),
        );
        Value::Object(m)
    }

    /// Signs `claims` with the active key (RS256, `kid` set, `typ` JWT).
    ///
    /// # Errors
    /// Signing failure.
    pub fn sign(&self, claims: &Value) -> Result<String, String> {
        let keys = self.keys.read().map_err(|_| "lock".to_string())?;
        let key = keys.last().ok_or("no key")?;
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding).map_err(|e| e.to_string())
    }

    /// Signs `claims` with the active key under a caller-built header (for attack tests).
    ///
    /// # Errors
    /// Signing failure.
    pub fn sign_with_header(&self, header: &Header, claims: &Value) -> Result<String, String> {
        let keys = self.keys.read().map_err(|_| "lock".to_string())?;
        let key = keys.last().ok_or("no key")?;
        jsonwebtoken::encode(header, claims, &key.encoding).map_err(|e| e.to_string())
    }

    /// Mints a step token.
    ///
    /// # Errors
    /// Signing failure.
    pub fn mint(&self, c: &StepClaims) -> Result<String, String> {
        self.sign(&self.claims(c))
    }
}

async fn discovery(state: web::Data<Arc<DevIssuer>>, path: web::Path<String>) -> HttpResponse {
    state.discovery_hits.fetch_add(1, Ordering::SeqCst);
    let iss = state.issuer_for(&path);
    HttpResponse::Ok().json(json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/keys.json"),
        "claims_supported": ["sub","iss","aud","exp","iat","branchName","compliant","deploymentEnvironmentUuid","pipelineUuid","repositoryUuid","stepUuid","workspaceUuid"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["id_token"],
        "scopes_supported": ["openid"],
        "subject_types_supported": ["public"],
    }))
}

async fn keys(state: web::Data<Arc<DevIssuer>>) -> HttpResponse {
    state.jwks_hits.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Ok().json(state.jwks())
}

async fn mint(state: web::Data<Arc<DevIssuer>>, body: web::Json<StepClaims>) -> HttpResponse {
    match state.mint(&body) {
        Ok(t) => HttpResponse::Ok().content_type("text/plain").body(t),
        Err(e) => HttpResponse::InternalServerError().body(e),
    }
}

/// A Keycloak token endpoint stand-in that answers instantly with a token of the
/// realm it is asked for (re-signed every 10 s, so answers stay current without a
/// signature per request): the service's own ceiling in the load benchmark
/// (`scripts/bench.sh`).
struct StubKeycloak {
    issuer: Arc<DevIssuer>,
    bodies: std::sync::Mutex<std::collections::HashMap<String, (u64, String)>>,
}

fn stub_realm(req: &actix_web::HttpRequest, realm: &str) -> String {
    // Behind a TLS-terminating proxy (scripts/bench-cpu.sh) the scheme comes
    // from `X-Forwarded-Proto`.
    let info = req.connection_info();
    format!("{}://{}/realms/{realm}", info.scheme(), info.host())
}

async fn stub_discovery(req: actix_web::HttpRequest, path: web::Path<String>) -> HttpResponse {
    let realm = stub_realm(&req, &path);
    HttpResponse::Ok().json(json!({
        "issuer": realm,
        "token_endpoint": format!("{realm}/protocol/openid-connect/token"),
    }))
}

/// The client of a token request: `client_id` in the form, or HTTP Basic.
fn stub_client(req: &actix_web::HttpRequest, form: &[u8]) -> String {
    use base64::Engine;
    let from_form = url::form_urlencoded::parse(form)
        .find(|(k, _)| k == "client_id")
        .map(|(_, v)| v.into_owned());
    let from_basic = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split(':').next().map(str::to_string));
    from_form.or(from_basic).unwrap_or_default()
}

async fn stub_token(
    req: actix_web::HttpRequest,
    path: web::Path<String>,
    form: web::Bytes,
    stub: web::Data<StubKeycloak>,
) -> HttpResponse {
    let client = stub_client(&req, &form);
    let realm = format!("{}#{client}", stub_realm(&req, &path));
    let now = now();
    let Ok(mut bodies) = stub.bodies.lock() else {
        return HttpResponse::InternalServerError().finish();
    };
    let fresh = bodies
        .get(&realm)
        .filter(|(at, _)| now < at + 10)
        .map(|(_, b)| b.clone());
    let body = match fresh {
        Some(b) => b,
        None => {
            let iss = realm.split('#').next().unwrap_or_default();
            let token = stub
                .issuer
                .sign(&json!({"iss": iss, "azp": client, "scope": "artifacts:read", "iat": now, "exp": now + 60, "jti": "stub", "typ": "Bearer"}))
                .unwrap_or_default();
            let b = json!({"access_token": token, "expires_in": 60, "token_type": "Bearer", "scope": "artifacts:read"}).to_string();
            bodies.insert(realm, (now, b.clone()));
            b
        }
    };
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body)
}

/// Serves `issuer` on `listener` (spawn the returned server).
///
/// # Errors
/// Listener errors.
pub fn serve(
    issuer: Arc<DevIssuer>,
    listener: TcpListener,
) -> std::io::Result<actix_web::dev::Server> {
    serve_with(issuer, listener, false, 1)
}

/// Like [`serve`], optionally also serving a stub Keycloak realm
/// (`/realms/<realm>/.well-known/openid-configuration` and the token endpoint,
/// answering every token request at once with the same 60 s token), on `workers`
/// threads.
///
/// # Errors
/// Listener errors.
pub fn serve_with(
    issuer: Arc<DevIssuer>,
    listener: TcpListener,
    keycloak_stub: bool,
    workers: usize,
) -> std::io::Result<actix_web::dev::Server> {
    let stub = web::Data::new(StubKeycloak {
        issuer: issuer.clone(),
        bodies: std::sync::Mutex::new(std::collections::HashMap::new()),
    });
    let data = web::Data::new(issuer);
    Ok(HttpServer::new(move || {
        let app = App::new().app_data(data.clone()).app_data(stub.clone());
        let app = if keycloak_stub {
            app.route("/realms/{realm}/.well-known/openid-configuration", web::get().to(stub_discovery))
                .route("/realms/{realm}/protocol/openid-connect/token", web::post().to(stub_token))
        } else {
            app
        };
        app
            .route(
                "/2.0/workspaces/{slug}/pipelines-config/identity/oidc/.well-known/openid-configuration",
                web::get().to(discovery),
            )
            .route(
                "/2.0/workspaces/{slug}/pipelines-config/identity/oidc/keys.json",
                web::get().to(keys),
            )
            .route("/mint", web::post().to(mint))
    })
    .workers(workers.max(1))
    .listen(listener)?
    .run())
}
