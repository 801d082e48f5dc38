//! Test harness: a local Bitbucket-compatible issuer, a Keycloak stand-in
//! (wiremock) or the real Keycloak, and the service on port 0.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use keycloak_ci_sts::configuration::Settings;
use keycloak_ci_sts::startup::Application;
use keycloak_ci_sts_testkit::{DevIssuer, StepClaims};
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

pub const WS_SLUG: &str = "acme";
pub const WS: &str = "03b741e3-cf4a-41f9-9a59-cec52e21bdc3";
pub const OTHER_WS_SLUG: &str = "globex";
pub const OTHER_WS: &str = "7d3f8c1a-0b6e-4f2d-9a8c-5e1b2c3d4e5f";
pub const REPO: &str = "d4e45493-4a33-477d-917b-a24e7e4bd39b";
pub const OTHER_REPO: &str = "9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d";
pub const SANDBOX_REPO: &str = "5b0b3a50-2f0e-4c3a-9d1e-6f8a7b9c0d1e";
pub const PROD_ENV: &str = "bd715740-c970-486b-b68a-b421ec2a1f8b";
pub const STAGING_ENV: &str = "1de489be-ce6a-42a0-a8c8-eadbf1174ac7";
pub const STS_AUDIENCE: &str = "https://sts.example.test";
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const ARTIFACTS_SECRET: &str = "sts-artifacts-test-secret";

/// YAML of an allow policy: `when` lines (already indented by two spaces) and a grant.
pub fn allow_policy(
    when: &str,
    client: &str,
    audience: &str,
    scopes: &str,
    default_scopes: &str,
    max: u64,
) -> String {
    format!(
        "effect: allow\nwhen:\n{when}grant:\n  client: {client}\n  audience: {audience}\n  scopes: [{scopes}]\n  default_scopes: [{default_scopes}]\n  max_lifetime_seconds: {max}\n"
    )
}

/// `when` line admitting repository REPO (quoted, braced).
pub fn when_repo() -> String {
    format!("  repositoryUuid: \"{{{REPO}}}\"\n")
}

/// The repository's own example policies (the ones the demo uses).
pub fn repo_policies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// A running local issuer.
pub struct Issuer {
    pub issuer: Arc<DevIssuer>,
    handle: actix_web::dev::ServerHandle,
}

impl Issuer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let issuer = Arc::new(DevIssuer::new(&base).unwrap());
        let server = keycloak_ci_sts_testkit::serve(issuer.clone(), listener).unwrap();
        let handle = server.handle();
        tokio::spawn(server);
        Self { issuer, handle }
    }

    /// Stops serving (connections are refused from now on).
    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }

    /// A step of REPO on `main`, with the service's audience added (aud array).
    pub fn step(&self) -> StepClaims {
        StepClaims {
            workspace: WS_SLUG.into(),
            workspace_uuid: format!("{{{WS}}}"),
            repository_uuid: format!("{{{REPO}}}"),
            step_uuid: None,
            pipeline_uuid: None,
            branch_name: Some("main".into()),
            deployment_environment_uuid: None,
            audiences: vec![STS_AUDIENCE.into()],
            lifetime_seconds: None,
        }
    }

    pub fn mint(&self, c: &StepClaims) -> String {
        self.issuer.mint(c).unwrap()
    }

    /// Signs arbitrary claims with the issuer's active key.
    pub fn sign(&self, claims: &Value) -> String {
        self.issuer.sign(claims).unwrap()
    }

    pub fn claims(&self, c: &StepClaims) -> Value {
        self.issuer.claims(c)
    }

    pub fn issuer_url(&self, slug: &str) -> String {
        self.issuer.issuer_for(slug)
    }
}

/// Options for one service instance.
pub struct Options {
    /// Keycloak base URL (wiremock or real).
    pub keycloak_url: String,
    /// Keycloak realm (default `ci`).
    pub realm: String,
    /// Configure the JWT Authorization Grant client `sts-repo` and `[identity]`
    /// (default true; the repository's policies name it).
    pub identity: bool,
    /// `listen` (default `127.0.0.1:0`).
    pub listen: String,
    /// `public_url` (default: an unreachable placeholder).
    pub public_url: String,
    /// Policies directory; default: the repository's `policies/`.
    pub policies_dir: Option<PathBuf>,
    /// Extra policy files written into a fresh directory (name, YAML); replaces policies_dir.
    pub policies: Vec<(String, String)>,
    /// Secret for sts-artifacts.
    pub artifacts_secret: String,
    /// Extra TOML appended to the [keycloak] table.
    pub keycloak_extra: String,
    /// Extra top-level TOML (before any table).
    pub top_extra: String,
    /// Issuer URL of the second trusted workspace (default: the same local issuer).
    pub other_issuer: Option<String>,
    /// Issuer URL of the first workspace (default: the local issuer's).
    pub issuer_override: Option<String>,
    /// `[jwks] refetch_interval_seconds`.
    pub jwks_refetch_interval: u64,
    /// `[jwks] cache_ttl_seconds`.
    pub jwks_cache_ttl: u64,
    /// `[jwks] timeout_seconds`.
    pub jwks_timeout: u64,
    /// `[limits] per_step_per_minute` (tests default to no practical limit).
    pub per_step_per_minute: u32,
    /// `[limits] per_repository_per_minute`.
    pub per_repository_per_minute: u32,
    /// `[limits] grants_per_step_per_minute`.
    pub grants_per_step_per_minute: u32,
    /// `[audit] fsync` (with the default audit file).
    pub audit_fsync: bool,
    /// More lines of the `[limits]` table (e.g. `store = "redis"`), which may end
    /// with a `[limits.redis]` table.
    pub limits_extra: String,
    /// The `[audit]` table (default: a file in the test directory).
    pub audit_toml: Option<String>,
}

impl Options {
    pub fn new(keycloak_url: &str) -> Self {
        Self {
            keycloak_url: keycloak_url.into(),
            realm: "ci".into(),
            identity: true,
            listen: "127.0.0.1:0".into(),
            public_url: "http://127.0.0.1:1".into(),
            policies_dir: None,
            policies: Vec::new(),
            artifacts_secret: ARTIFACTS_SECRET.into(),
            keycloak_extra: String::new(),
            top_extra: String::new(),
            other_issuer: None,
            issuer_override: None,
            jwks_refetch_interval: 1,
            jwks_cache_ttl: 600,
            jwks_timeout: 5,
            per_step_per_minute: 1_000_000,
            per_repository_per_minute: 1_000_000,
            grants_per_step_per_minute: 1_000_000,
            limits_extra: String::new(),
            audit_fsync: false,
            audit_toml: None,
        }
    }
}

/// A running service.
pub struct TestApp {
    pub address: String,
    /// `http://127.0.0.1:<port>` of `admin_listen`, when configured.
    pub admin_address: Option<String>,
    pub http: reqwest::Client,
    pub audit_path: PathBuf,
    /// The temporary directory (config `sts.toml`, keys, `policies/`, audit), kept alive.
    pub dir: tempfile::TempDir,
    /// `/token` requests sent through `post_token` (each writes one audit line).
    token_requests: std::sync::atomic::AtomicUsize,
}

impl TestApp {
    /// Writes keys, secret, policies into a fresh directory; returns it, the
    /// configuration TOML (also written to `sts.toml`) and the audit path.
    pub fn write_config(issuer: &Issuer, opts: Options) -> (tempfile::TempDir, String, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("signing.pem");
        let pem = keycloak_ci_sts::signing::generate_pem(
            keycloak_ci_sts::signing::SigningAlgorithm::ES256,
        )
        .unwrap();
        std::fs::write(&key, secrecy::ExposeSecret::expose_secret(&pem)).unwrap();
        let secret = dir.path().join("artifacts.secret");
        std::fs::write(&secret, format!("{}\n", opts.artifacts_secret)).unwrap();
        let identity_key = dir.path().join("identity.pem");
        let pem = keycloak_ci_sts::signing::generate_pem(
            keycloak_ci_sts::signing::SigningAlgorithm::ES256,
        )
        .unwrap();
        std::fs::write(&identity_key, secrecy::ExposeSecret::expose_secret(&pem)).unwrap();
        let identity_toml = if opts.identity {
            format!(
                "[keycloak.clients.sts-repo]\nmethod = \"private_key_jwt\"\ngrant = \"jwt_authorization_grant\"\n\n[identity]\nkey_files = [\"{}\"]\n",
                identity_key.display()
            )
        } else {
            String::new()
        };
        let policies_dir = if opts.policies.is_empty() {
            opts.policies_dir.unwrap_or_else(repo_policies_dir)
        } else {
            let p = dir.path().join("policies");
            std::fs::create_dir(&p).unwrap();
            for (name, yaml) in &opts.policies {
                std::fs::write(p.join(name), yaml).unwrap();
            }
            p
        };
        let audit_path = dir.path().join("audit.jsonl");
        let toml = format!(
            r#"
listen = "{listen}"
public_url = "{public_url}"
policies_dir = "{policies}"
{top_extra}

[[workspaces]]
slug = "{WS_SLUG}"
uuid = "{{{WS}}}"
issuer = "{iss}"
audiences = ["{STS_AUDIENCE}"]

[[workspaces]]
slug = "{OTHER_WS_SLUG}"
uuid = "{OTHER_WS}"
issuer = "{other_iss}"
# opted in: this workspace accepts Bitbucket's default audience
accept_default_audience = true

[limits]
per_step_per_minute = {per_step}
per_repository_per_minute = {per_repo}
grants_per_step_per_minute = {grants_limit}
{limits_extra}

[jwks]
refetch_interval_seconds = {refetch}
cache_ttl_seconds = {ttl}
timeout_seconds = {jwks_timeout}

[keycloak]
base_url = "{kc}"
realm = "{realm}"
timeout_seconds = 3
{keycloak_extra}

[keycloak.clients.sts-deploy]
method = "private_key_jwt"

[keycloak.clients.sts-artifacts]
method = "client_secret_basic"
secret_file = "{secret}"

{identity_toml}
[signing]
key_files = ["{key}"]

{audit_table}
"#,
            policies = policies_dir.display(),
            listen = opts.listen,
            public_url = opts.public_url,
            identity_toml = identity_toml,
            top_extra = opts.top_extra,
            iss = opts
                .issuer_override
                .clone()
                .unwrap_or_else(|| issuer.issuer_url(WS_SLUG)),
            other_iss = opts
                .other_issuer
                .clone()
                .unwrap_or_else(|| issuer.issuer_url(OTHER_WS_SLUG)),
            refetch = opts.jwks_refetch_interval,
            per_step = opts.per_step_per_minute,
            per_repo = opts.per_repository_per_minute,
            grants_limit = opts.grants_per_step_per_minute,
            limits_extra = opts.limits_extra,
            ttl = opts.jwks_cache_ttl,
            jwks_timeout = opts.jwks_timeout,
            kc = opts.keycloak_url,
            realm = opts.realm,
            keycloak_extra = opts.keycloak_extra,
            secret = secret.display(),
            key = key.display(),
            audit_table = opts.audit_toml.clone().unwrap_or_else(|| {
                format!(
                    "[audit]\npath = \"{}\"\nfsync = {}",
                    audit_path.display(),
                    opts.audit_fsync
                )
            }),
        );
        std::fs::write(dir.path().join("sts.toml"), &toml).unwrap();
        (dir, toml, audit_path)
    }

    pub async fn start(issuer: &Issuer, opts: Options) -> Self {
        let (dir, toml, audit_path) = Self::write_config(issuer, opts);
        let settings = Settings::from_toml_str(&toml, dir.path()).unwrap();
        let app = Application::build(settings).unwrap();
        let port = app.port();
        let admin_address = app.admin_port().map(|p| format!("http://127.0.0.1:{p}"));
        tokio::spawn(app.run_until_stopped());
        Self {
            address: format!("http://127.0.0.1:{port}"),
            admin_address,
            http: reqwest::Client::new(),
            audit_path,
            dir,
            token_requests: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// POSTs a form to /token.
    pub async fn post_token(&self, form: &[(&str, &str)]) -> reqwest::Response {
        self.token_requests
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.http
            .post(format!("{}/token", self.address))
            .form(form)
            .send()
            .await
            .unwrap()
    }

    /// POSTs `subject_token` to /grants (counted like `/token` requests for
    /// [`TestApp::audit_lines`]).
    pub async fn grants(&self, token: &str) -> reqwest::Response {
        self.token_requests
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.http
            .post(format!("{}/grants", self.address))
            .form(&[
                ("subject_token", token),
                ("subject_token_type", ID_TOKEN_TYPE),
            ])
            .send()
            .await
            .unwrap()
    }

    /// A standard exchange of `token` for `audience` with optional `scope`.
    pub async fn exchange(
        &self,
        token: &str,
        audience: &str,
        scope: Option<&str>,
    ) -> reqwest::Response {
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", token),
            ("subject_token_type", ID_TOKEN_TYPE),
            ("audience", audience),
        ];
        if let Some(s) = scope {
            form.push(("scope", s));
        }
        self.post_token(&form).await
    }

    /// Audit lines written so far.
    /// Audit lines written so far; waits (up to 5 s) for the background writer to
    /// catch up with the `/token` requests sent through `post_token`.
    pub fn audit_lines(&self) -> Vec<Value> {
        let want = self
            .token_requests
            .load(std::sync::atomic::Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let lines: Vec<Value> = std::fs::read_to_string(&self.audit_path)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= want || std::time::Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Asserts an error answer: status, `error`, `error_code`, and a request id.
pub async fn assert_error(resp: reqwest::Response, status: u16, error: &str, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert_eq!(
        resp.headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let header_rid = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], error, "{body}");
    assert_eq!(
        header_rid.as_deref(),
        body["request_id"].as_str(),
        "x-request-id header = body request_id"
    );
    assert_eq!(body["error_code"], code, "{body}");
    assert!(
        body["request_id"].as_str().is_some_and(|r| r.len() >= 32),
        "request_id missing: {body}"
    );
    body
}

/// A Keycloak stand-in: discovery plus (optionally) a token endpoint.
pub struct FakeKeycloak {
    pub server: MockServer,
}

pub const TOKEN_PATH: &str = "/realms/ci/protocol/openid-connect/token";

impl FakeKeycloak {
    pub async fn start() -> Self {
        let server = MockServer::start().await;
        let uri = server.uri();
        Mock::given(method("GET"))
            .and(path("/realms/ci/.well-known/openid-configuration"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "issuer": format!("{uri}/realms/ci"),
                "token_endpoint": format!("{uri}{TOKEN_PATH}"),
            })))
            .mount(&server)
            .await;
        Self { server }
    }

    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// A Keycloak-shaped access token with `iss` = `realm_issuer`, for client
    /// `sts-artifacts`.
    pub fn access_token_of(realm_issuer: &str, lifetime: u64) -> String {
        Self::token_for(realm_issuer, "sts-artifacts", lifetime, "artifacts:read")
    }

    /// A Keycloak-shaped access token (not signed for real) of `client`.
    pub fn token_for(realm_issuer: &str, client: &str, lifetime: u64, scope: &str) -> String {
        use base64::Engine;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2ln",
            enc(json!({"alg":"RS256","typ":"JWT"})),
            enc(json!({
                "iss": realm_issuer, "exp": now + lifetime, "iat": now, "azp": client,
                "jti": format!("trrtcc:{}", uuid::Uuid::new_v4()), "typ": "Bearer", "scope": scope,
            }))
        )
    }

    /// Mounts a token endpoint that behaves like Keycloak's for a client whose
    /// optional client scopes are `scopes` (space-separated): it answers the
    /// requested scopes with a token of the requesting client (`azp`), or 400
    /// `invalid_scope` for a scope the client lacks. Expects `calls` calls.
    pub async fn token_ok(&self, lifetime: u64, scopes: &str, calls: impl Into<wiremock::Times>) {
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(TokenEndpoint {
                realm: format!("{}/realms/ci", self.uri()),
                lifetime,
                scopes: scopes.split(' ').map(str::to_string).collect(),
                delay: None,
            })
            .expect(calls)
            .mount(&self.server)
            .await;
    }

    /// Like [`FakeKeycloak::token_ok`], answering after `delay`.
    pub async fn token_slow(&self, scopes: &str, delay: std::time::Duration) {
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(TokenEndpoint {
                realm: format!("{}/realms/ci", self.uri()),
                lifetime: 60,
                scopes: scopes.split(' ').map(str::to_string).collect(),
                delay: Some(delay),
            })
            .mount(&self.server)
            .await;
    }

    /// Mounts a token endpoint that must never be called.
    pub async fn token_never_called(&self) {
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .respond_with(ResponseTemplate::new(500))
            .expect(0)
            .named("Keycloak token endpoint (must not be called)")
            .mount(&self.server)
            .await;
    }

    /// Number of token requests received.
    pub async fn token_calls(&self) -> usize {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.url.path() == TOKEN_PATH)
            .count()
    }
}

/// Keycloak's token endpoint, as far as the service can tell: client from
/// `client_id` or HTTP Basic, requested `scope` echoed when allowed.
struct TokenEndpoint {
    realm: String,
    lifetime: u64,
    scopes: Vec<String>,
    delay: Option<std::time::Duration>,
}

impl wiremock::Respond for TokenEndpoint {
    fn respond(&self, req: &wiremock::Request) -> ResponseTemplate {
        use base64::Engine;
        let form: std::collections::HashMap<String, String> =
            url::form_urlencoded::parse(&req.body)
                .into_owned()
                .collect();
        let basic_client = req
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.split(':').next().map(str::to_string));
        let client = form
            .get("client_id")
            .cloned()
            .or(basic_client)
            .unwrap_or_default();
        let requested = form.get("scope").cloned().unwrap_or_default();
        let t = if requested
            .split(' ')
            .filter(|s| !s.is_empty())
            .all(|s| self.scopes.iter().any(|a| a == s))
        {
            ResponseTemplate::new(200).set_body_json(json!({
                "access_token": FakeKeycloak::token_for(&self.realm, &client, self.lifetime, &requested),
                "expires_in": self.lifetime,
                "refresh_expires_in": 0,
                "token_type": "Bearer",
                "not-before-policy": 0,
                "scope": requested,
            }))
        } else {
            ResponseTemplate::new(400).set_body_json(
                json!({"error": "invalid_scope", "error_description": "Invalid scopes"}),
            )
        };
        match self.delay {
            Some(d) => t.set_delay(d),
            None => t,
        }
    }
}

/// Issuer + fake Keycloak + app with the repository's policies.
pub async fn standard() -> (Issuer, FakeKeycloak, TestApp) {
    let issuer = Issuer::start().await;
    let kc = FakeKeycloak::start().await;
    let app = TestApp::start(&issuer, Options::new(&kc.uri())).await;
    (issuer, kc, app)
}

/// The service binary running as its own process (for logs and memory).
pub struct ServiceProcess {
    pub child: std::process::Child,
    pub port: u16,
    lines: Vec<String>,
    rx: std::sync::mpsc::Receiver<String>,
}

impl ServiceProcess {
    /// Starts `keycloak-ci-sts serve --config <config>` with `RUST_LOG=<log_level>`
    /// and waits for its `listening` log line.
    pub fn start(config: &std::path::Path, log_level: &str) -> Self {
        Self::start_with_stdout(config, log_level, std::process::Stdio::null())
    }

    /// Like `start`, with standard output (where audit lines go when `[audit] path`
    /// is unset) connected to `stdout`.
    pub fn start_with_stdout(
        config: &std::path::Path,
        log_level: &str,
        stdout: std::process::Stdio,
    ) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keycloak-ci-sts"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", log_level)
            .stderr(std::process::Stdio::piped())
            .stdout(stdout)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let port = loop {
            let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(30)) else {
                // never leave the process behind when the test gives up on it
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "service did not start (no `listening` log line within 30 s):\n{}",
                    lines.join("\n")
                );
            };
            lines.push(line.clone());
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "listening" {
                break u16::try_from(v["fields"]["port"].as_u64().unwrap()).unwrap();
            }
        };
        Self {
            child,
            port,
            lines,
            rx,
        }
    }

    /// Resident set size in bytes (Linux `/proc`).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap();
        kb * 1024
    }

    /// Kills the process and returns every log line it wrote.
    /// Waits (at most `within`) until a log line satisfying `pred` arrived;
    /// the lines read stay collected for [`Self::stop_and_collect_logs`].
    pub fn wait_for_line(
        &mut self,
        within: std::time::Duration,
        pred: impl Fn(&str) -> bool,
    ) -> bool {
        let deadline = std::time::Instant::now() + within;
        if self.lines.iter().any(|l| pred(l)) {
            return true;
        }
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    let hit = pred(&l);
                    self.lines.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    pub fn stop_and_collect_logs(&mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(l) = self.rx.recv_timeout(std::time::Duration::from_millis(500)) {
            self.lines.push(l);
        }
        std::mem::take(&mut self.lines)
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs the standard token-exchange form for `token` and `audience` to `url`.
pub async fn post_exchange(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    audience: &str,
) -> reqwest::Result<reqwest::Response> {
    http.post(url)
        .form(&[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", token),
            ("subject_token_type", ID_TOKEN_TYPE),
            ("audience", audience),
        ])
        .send()
        .await
}

/// Sends `token` for `artifact-api` and asserts the refusal: status 400
/// `invalid_request` with `code`, no Keycloak call, a `denied` audit line.
pub async fn refused(app: &TestApp, kc: &FakeKeycloak, token: &str, code: &str) -> Value {
    let r = app.exchange(token, "artifact-api", None).await;
    let body = assert_error(r, 400, "invalid_request", code).await;
    assert_eq!(
        kc.token_calls().await,
        0,
        "a refused token reached Keycloak"
    );
    let audit = app.audit_lines();
    let last = audit.last().expect("an audit line per decision");
    assert_eq!(last["outcome"], "denied");
    assert_eq!(last["error_code"], code);
    body
}

/// A copy of the repository's `policies/` (with `inventory/` and `keycloak/`)
/// without the policies of the JWT Authorization Grant client `sts-repo`, for a
/// service configured without `[identity]`. Keep the directory alive.
pub fn policies_without_identities() -> (tempfile::TempDir, PathBuf) {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &target);
            } else {
                let text = std::fs::read_to_string(e.path()).unwrap();
                if !text.contains("client: sts-repo") {
                    std::fs::write(target, text).unwrap();
                }
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("policies");
    copy(&repo_policies_dir(), &p);
    (dir, p)
}

/// A free loopback port (bound, then released): for a service whose
/// `public_url` must be known before it starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestApp {
    /// `GET <path>` on the service's listener.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap()
    }

    /// The value of one series of `GET /metrics` (e.g.
    /// `sts_limit_store_errors_total{on_store_error="deny"}`), 0 when absent.
    pub async fn metric(&self, series: &str) -> u64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A `redis-server` on a loopback port, without persistence, optionally with a
/// password (`requirepass`). `scripts/bootstrap.sh` installs the program;
/// without it the tests that need it fail, they never skip.
pub struct Redis {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
}

impl Redis {
    pub fn start() -> Self {
        let mut r = Self {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            password: None,
        };
        r.restart();
        r
    }

    /// Stops it (if running) and starts it again on the same port, now with
    /// `password` (`None`: no password), with an empty data set.
    pub fn restart_with_password(&mut self, password: Option<&str>) {
        self.stop();
        self.password = password.map(str::to_string);
        self.restart();
    }

    /// Starts it (again) on the same port and waits until it answers.
    pub fn restart(&mut self) {
        use std::io::{Read, Write};
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/bootstrap.sh installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // PONG, or NOAUTH when a password is set: it answers.
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let mut buf = [0u8; 5];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && (&buf == b"+PONG" || &buf == b"-NOAU")
                {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not answer"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`Signal::STOP`, `Signal::CONT`) to the server process.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let child = self.child.as_ref().expect("running");
        rustix::process::kill_process(rustix::process::Pid::from_child(child), signal).unwrap();
    }

    /// `redis://[:password@]127.0.0.1:port/0`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// A directory that lives as long as the server (for its URL file).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Runs one command (with the current password), bounded by 5 s.
    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client
            .get_connection_with_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut conn).unwrap()
    }

    /// How many replies with this error the server sent since it started
    /// (`INFO errorstats`: `WRONGPASS`, `NOAUTH`, `READONLY`, `MASTERDOWN`).
    pub fn errors_sent(&self, prefix: &str) -> u64 {
        let info: String = redis::from_redis_value(self.cmd(&["INFO", "errorstats"])).unwrap();
        let series = format!("errorstat_{prefix}:count=");
        info.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The keys matching `pattern` (`KEYS`; the data sets here are tiny).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        match self.cmd(&["KEYS", pattern]) {
            redis::Value::Array(v) => v
                .into_iter()
                .map(|k| redis::from_redis_value(k).unwrap())
                .collect(),
            other => panic!("KEYS answered {other:?}"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A scripted RESP listener on a loopback port: reads whole commands (RESP
/// arrays of bulk strings) and answers each with the same bytes (e.g.
/// `-LOADING …\r\n`, or protocol garbage). Counts the connections it accepted.
pub struct RespListener {
    pub port: u16,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RespListener {
    pub async fn start(answer: &'static [u8]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(Self::serve(socket, answer));
            }
        });
        Self {
            port,
            connections,
            task,
        }
    }

    async fn serve(socket: tokio::net::TcpStream, answer: &'static [u8]) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let (read, mut write) = socket.into_split();
        let mut read = tokio::io::BufReader::new(read);
        let mut line = String::new();
        loop {
            line.clear();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let n: usize = line.trim_start_matches('*').trim().parse().unwrap_or(0);
            for _ in 0..n {
                line.clear();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let len: usize = line.trim_start_matches('$').trim().parse().unwrap_or(0);
                let mut arg = vec![0u8; len + 2];
                if read.read_exact(&mut arg).await.is_err() {
                    return;
                }
            }
            if write.write_all(answer).await.is_err() {
                return;
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for RespListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
