//! Against the real Keycloak started by `scripts/keycloak.sh` (realm
//! `tests/keycloak/realm-ci.json`). These tests are `#[ignore]`d in a plain
//! `cargo test` (shown as "ignored", never as passed); `scripts/test.sh` starts
//! Keycloak, exports `KCS_KEYCLOAK_URL` and runs them with `--include-ignored`.
//! Run without a reachable Keycloak they fail; they never skip.
//!
//! The realm's `sts-deploy` client authenticates with "Signed JWT" against a
//! "JWKS URL"; each test points that URL at its own service instance through the
//! admin API, so the tests hold a lock and run one at a time.

use serde_json::{json, Value};

use crate::helpers::*;

pub static KEYCLOAK_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct RealKeycloak {
    pub url: String,
    admin_user: String,
    admin_password: String,
    /// The realm the tests use (`ci`; the provisioning test uses `prov`).
    pub realm: String,
}

pub fn real_keycloak() -> RealKeycloak {
    let url = std::env::var("KCS_KEYCLOAK_URL").unwrap_or_default();
    assert!(
        !url.is_empty(),
        "KCS_KEYCLOAK_URL is not set: run the tests with scripts/test.sh, which starts Keycloak"
    );
    RealKeycloak {
        url,
        admin_user: std::env::var("KCS_KEYCLOAK_ADMIN_USER").unwrap_or_else(|_| "admin".into()),
        admin_password: std::env::var("KCS_KEYCLOAK_ADMIN_PASSWORD")
            .unwrap_or_else(|_| "admin".into()),
        realm: "ci".into(),
    }
}

impl RealKeycloak {
    /// An Admin API call on this realm as the master-realm admin (the tests' way
    /// to inject drift); `path` follows `/admin/realms/<realm>`. Returns the status
    /// and the JSON body (`null` when empty).
    pub async fn admin(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let at = self.admin_token(http).await;
        let mut req = http
            .request(
                method,
                format!("{}/admin/realms/{}{path}", self.url, self.realm),
            )
            .bearer_auth(&at);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Deletes this realm (if present) and imports `realm_json` afresh.
    pub async fn recreate_realm(&self, http: &reqwest::Client, realm_json: &str) {
        let at = self.admin_token(http).await;
        let r = http
            .delete(format!("{}/admin/realms/{}", self.url, self.realm))
            .bearer_auth(&at)
            .send()
            .await
            .unwrap();
        assert!(
            matches!(r.status().as_u16(), 204 | 404),
            "delete realm: {}",
            r.status()
        );
        let r = http
            .post(format!("{}/admin/realms", self.url))
            .bearer_auth(&at)
            .header("content-type", "application/json")
            .body(realm_json.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "import realm");
    }

    /// The internal id of client `client_id`.
    pub async fn client_uuid(&self, http: &reqwest::Client, client_id: &str) -> String {
        let (s, v) = self
            .admin(
                http,
                reqwest::Method::GET,
                &format!("/clients?clientId={client_id}"),
                None,
            )
            .await;
        assert_eq!(s, 200);
        v[0]["id"].as_str().expect("client exists").to_string()
    }

    async fn admin_token(&self, http: &reqwest::Client) -> String {
        let r: Value = http
            .post(format!(
                "{}/realms/master/protocol/openid-connect/token",
                self.url
            ))
            .form(&[
                ("client_id", "admin-cli"),
                ("grant_type", "password"),
                ("username", self.admin_user.as_str()),
                ("password", self.admin_password.as_str()),
            ])
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        r["access_token"].as_str().unwrap().to_string()
    }

    /// Points client `sts-deploy`'s "JWKS URL" at `jwks_url` (Keycloak drops its cached keys on update).
    async fn set_jwks_url(&self, http: &reqwest::Client, jwks_url: &str) {
        let at = self.admin_token(http).await;
        let clients: Value = http
            .get(format!(
                "{}/admin/realms/ci/clients?clientId=sts-deploy",
                self.url
            ))
            .bearer_auth(&at)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = clients[0]["id"].as_str().unwrap();
        let r = http
            .put(format!("{}/admin/realms/ci/clients/{id}", self.url))
            .bearer_auth(&at)
            .json(&json!({"attributes": {"jwks.url": jwks_url}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204, "admin update of jwks.url");
    }

    /// Verifies a Keycloak access token against the realm's JWKS; returns its claims.
    pub async fn verify(&self, http: &reqwest::Client, token: &str) -> Value {
        let jwks: jsonwebtoken::jwk::JwkSet = http
            .get(format!(
                "{}/realms/{}/protocol/openid-connect/certs",
                self.url, self.realm
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        let jwk = jwks
            .find(header.kid.as_deref().unwrap())
            .expect("realm key");
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut v = jsonwebtoken::Validation::new(header.alg);
        v.set_issuer(&[format!("{}/realms/{}", self.url, self.realm)]);
        v.validate_aud = false;
        jsonwebtoken::decode::<Value>(token, &key, &v)
            .expect("signature valid against the realm JWKS")
            .claims
    }
}

pub fn aud_set(claims: &Value) -> Vec<String> {
    let mut v: Vec<String> = match &claims["aud"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    };
    v.sort();
    v
}

pub fn scope_set(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .split(' ')
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

pub fn lifetime(claims: &Value) -> u64 {
    claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap()
}

pub async fn setup(kc: &RealKeycloak, opts: Option<Options>) -> (Issuer, TestApp) {
    let issuer = Issuer::start().await;
    let app = TestApp::start(&issuer, opts.unwrap_or_else(|| Options::new(&kc.url))).await;
    kc.set_jwks_url(&app.http, &format!("{}/.well-known/jwks.json", app.address))
        .await;
    (issuer, app)
}

#[tokio::test]
#[ignore = "needs the real Keycloak: scripts/test.sh runs it"]
async fn real_keycloak_private_key_jwt_exchange_issues_scoped_token() {
    let kc = real_keycloak();
    let _guard = KEYCLOAK_LOCK.lock().await;
    let (issuer, app) = setup(&kc, None).await;
    let mut step = issuer.step();
    step.deployment_environment_uuid = Some(PROD_ENV.into());

    let r = app
        .exchange(
            &issuer.mint(&step),
            "deploy-api",
            Some("deploy:production artifacts:read"),
        )
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    let token = body["access_token"].as_str().unwrap();
    let claims = kc.verify(&app.http, token).await;
    assert_eq!(claims["azp"], "sts-deploy");
    assert_eq!(
        aud_set(&claims),
        vec!["artifact-api".to_string(), "deploy-api".to_string()]
    );
    assert_eq!(
        scope_set(claims["scope"].as_str().unwrap()),
        scope_set("deploy:production artifacts:read")
    );
    assert_eq!(
        scope_set(body["scope"].as_str().unwrap()),
        scope_set("deploy:production artifacts:read")
    );
    // access.token.lifespan of sts-deploy is 120 s (Keycloak may round one second up).
    assert!(
        (120..=121).contains(&lifetime(&claims)),
        "exp-iat = {}",
        lifetime(&claims)
    );
    assert!((119..=121).contains(&body["expires_in"].as_u64().unwrap()));
    assert_eq!(
        claims["resource_access"]["deploy-api"]["roles"],
        json!(["deploy"])
    );

    let audit = app.audit_lines();
    let a = audit.last().unwrap();
    assert_eq!(a["outcome"], "allowed");
    assert_eq!(
        a["token_jti"], claims["jti"],
        "audit ties the Bitbucket identity to the Keycloak token"
    );
    assert_eq!(a["deploymentEnvironmentUuid"], format!("{{{PROD_ENV}}}"));
}

#[tokio::test]
#[ignore = "needs the real Keycloak: scripts/test.sh runs it"]
async fn real_keycloak_client_secret_exchange_uses_default_scopes_and_client_lifespan() {
    let kc = real_keycloak();
    let _guard = KEYCLOAK_LOCK.lock().await;
    let (issuer, app) = setup(&kc, None).await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    let claims = kc
        .verify(&app.http, body["access_token"].as_str().unwrap())
        .await;
    assert_eq!(claims["azp"], "sts-artifacts");
    assert_eq!(aud_set(&claims), vec!["artifact-api".to_string()]);
    assert_eq!(
        scope_set(claims["scope"].as_str().unwrap()),
        vec!["artifacts:read".to_string()]
    );
    assert_eq!(
        claims["resource_access"]["artifact-api"]["roles"],
        json!(["read"])
    );
    assert!(
        (60..=61).contains(&lifetime(&claims)),
        "exp-iat = {}",
        lifetime(&claims)
    );
}

#[tokio::test]
#[ignore = "needs the real Keycloak: scripts/test.sh runs it"]
async fn real_keycloak_refusing_a_scope_is_502_scope_rejected() {
    let kc = real_keycloak();
    let _guard = KEYCLOAK_LOCK.lock().await;
    // A policy granting a scope the Keycloak client does not have.
    let mut opts = Options::new(&kc.url);
    opts.policies = vec![(
        "misconfigured.yaml".into(),
        allow_policy(
            &when_repo(),
            "sts-artifacts",
            "deploy-api",
            "deploy:production",
            "deploy:production",
            300,
        ),
    )];
    let (issuer, app) = setup(&kc, Some(opts)).await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "deploy-api", None)
        .await;
    assert_error(r, 502, "server_error", "keycloak.scope_rejected").await;
}

#[tokio::test]
#[ignore = "needs the real Keycloak: scripts/test.sh runs it"]
async fn real_keycloak_wrong_client_secret_is_502_client_rejected() {
    let kc = real_keycloak();
    let _guard = KEYCLOAK_LOCK.lock().await;
    let mut opts = Options::new(&kc.url);
    opts.artifacts_secret = "not-the-secret".into();
    let (issuer, app) = setup(&kc, Some(opts)).await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "artifact-api", None)
        .await;
    assert_error(r, 502, "server_error", "keycloak.client_rejected").await;
}

#[tokio::test]
#[ignore = "needs the real Keycloak: scripts/test.sh runs it"]
async fn real_keycloak_token_longer_than_policy_maximum_is_not_passed_on() {
    let kc = real_keycloak();
    let _guard = KEYCLOAK_LOCK.lock().await;
    let mut opts = Options::new(&kc.url);
    opts.policies = vec![(
        "short.yaml".into(),
        allow_policy(
            &when_repo(),
            "sts-deploy",
            "deploy-api",
            "deploy:production",
            "deploy:production",
            60,
        ),
    )];
    let (issuer, app) = setup(&kc, Some(opts)).await;
    let r = app
        .exchange(&issuer.mint(&issuer.step()), "deploy-api", None)
        .await;
    let body = assert_error(r, 502, "server_error", "keycloak.lifetime_exceeds_policy").await;
    assert!(body.get("access_token").is_none());
}

#[tokio::test]
#[ignore = "needs the real Keycloak: scripts/test.sh runs it"]
async fn real_keycloak_readiness() {
    let kc = real_keycloak();
    let issuer = Issuer::start().await;
    let app = TestApp::start(&issuer, Options::new(&kc.url)).await;
    let r = app.get("/readyz").await;
    assert_eq!(r.status().as_u16(), 200);
}
