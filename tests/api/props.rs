//! Property tests through the real endpoint: arbitrary subject tokens, arbitrary
//! form bodies and mutated genuine tokens never panic the service, always get a
//! documented error, and never reach Keycloak.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::helpers::*;

fn percent(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    issuer: Issuer,
    kc: FakeKeycloak,
    app: TestApp,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (issuer, kc, app) = rt.block_on(async {
        let (issuer, kc, app) = standard().await;
        kc.token_never_called().await;
        (issuer, kc, app)
    });
    Fixture {
        rt,
        issuer,
        kc,
        app,
    }
}

impl Fixture {
    /// POSTs a raw form body; returns status and body JSON (if any).
    fn post(&self, body: String) -> (u16, serde_json::Value) {
        self.rt.block_on(async {
            let r = self
                .app
                .http
                .post(format!("{}/token", self.app.address))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(serde_json::Value::Null))
        })
    }

    fn keycloak_calls(&self) -> usize {
        self.rt.block_on(self.kc.token_calls())
    }
}

fn documented(status: u16, body: &serde_json::Value) -> bool {
    matches!(status, 400 | 413)
        && body["error"].is_string()
        && body["error_code"].as_str().is_some_and(|c| c.contains('.'))
        && body["request_id"].is_string()
}

#[test]
fn arbitrary_bytes_as_subject_token_get_documented_errors_and_never_reach_keycloak() {
    let f = fixture();
    let mut runner = TestRunner::new(Config::with_cases(300));
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..3000), |bytes| {
            let body = format!(
                "grant_type={}&subject_token={}&subject_token_type={}&audience=artifact-api",
                percent(TOKEN_EXCHANGE.as_bytes()),
                percent(&bytes),
                percent(ID_TOKEN_TYPE.as_bytes())
            );
            let (status, json) = f.post(body);
            prop_assert!(documented(status, &json), "{status} {json}");
            Ok(())
        })
        .unwrap();
    assert_eq!(f.keycloak_calls(), 0);
}

#[test]
fn arbitrary_form_bodies_get_documented_errors_and_never_reach_keycloak() {
    let f = fixture();
    let mut runner = TestRunner::new(Config::with_cases(300));
    let token = f.issuer.mint(&f.issuer.step());
    let keys = prop_oneof![
        Just("grant_type".to_string()),
        Just("subject_token".to_string()),
        Just("subject_token_type".to_string()),
        Just("audience".to_string()),
        Just("scope".to_string()),
        Just("requested_token_type".to_string()),
        Just("resource".to_string()),
        "[a-z_%=&+]{0,12}",
    ];
    let values = prop_oneof![
        Just(TOKEN_EXCHANGE.to_string()),
        Just(ID_TOKEN_TYPE.to_string()),
        Just(token.clone()),
        Just("artifact-api".to_string()),
        Just("artifacts:read admin".to_string()),
        ".{0,40}",
    ];
    runner
        .run(&proptest::collection::vec((keys, values), 0..8), |pairs| {
            let body = pairs
                .iter()
                .map(|(k, v)| format!("{k}={}", percent(v.as_bytes())))
                .collect::<Vec<_>>()
                .join("&");
            let (status, json) = f.post(body);
            prop_assert!(documented(status, &json), "{status} {json}");
            Ok(())
        })
        .unwrap();
    let raw = proptest::collection::vec(any::<u8>(), 0..2000);
    runner
        .run(&raw, |bytes| {
            let (status, json) = f.post(String::from_utf8_lossy(&bytes).into_owned());
            prop_assert!(documented(status, &json), "{status} {json}");
            Ok(())
        })
        .unwrap();
    assert_eq!(f.keycloak_calls(), 0);
}

#[test]
fn a_genuine_token_with_any_one_character_changed_is_refused() {
    let f = fixture();
    let token = f.issuer.mint(&f.issuer.step());
    let alphabet: Vec<char> =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "
            .chars()
            .collect();
    let mut runner = TestRunner::new(Config::with_cases(300));
    runner
        .run(&(0..token.len(), 0..alphabet.len()), |(pos, c)| {
            let mut chars: Vec<char> = token.chars().collect();
            if chars[pos] == alphabet[c] {
                return Ok(());
            }
            chars[pos] = alphabet[c];
            let mutated: String = chars.into_iter().collect();
            let body = format!(
                "grant_type={}&subject_token={}&subject_token_type={}&audience=artifact-api",
                percent(TOKEN_EXCHANGE.as_bytes()),
                percent(mutated.as_bytes()),
                percent(ID_TOKEN_TYPE.as_bytes())
            );
            let (status, json) = f.post(body);
            prop_assert!(documented(status, &json), "position {pos}: {status} {json}");
            Ok(())
        })
        .unwrap();
    assert_eq!(f.keycloak_calls(), 0);
}
