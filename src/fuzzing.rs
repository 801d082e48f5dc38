//! Entry points of the coverage-guided fuzz targets (`fuzz/`, cargo-fuzz),
//! compiled only under `--cfg fuzzing` (cargo-fuzz sets it): one function per
//! parser of outside input, each asserting a named invariant, not only "no
//! panic". A failed invariant panics with its name, which libFuzzer reports as
//! a crash and saves the input under `fuzz/artifacts/<target>/`.
//!
//! Inputs that hold JSON inside base64url (tokens) may be given as parts
//! separated by the byte `0xFF` (never in UTF-8 text): the target encodes them,
//! so the fuzzer mutates the JSON itself. See docs/src/fuzzing.md.

#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a fuzz target reports a broken invariant by panicking"
)]

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;

use crate::domain::json::StrictObject;
use crate::domain::{BbUuid, Scopes, SecretToken};
use crate::exchange::{GrantsRequest, RequestError, TokenRequest};
use crate::policy::{EvalRequest, Outcome, PolicySet, Subject};
use crate::verify::claims::{self, Payload};
use crate::verify::{jws, TokenRules, WorkspaceSettings};

/// The clock every target reads (seconds since the epoch).
pub const NOW: u64 = 1_800_000_000;
const WS: &str = "{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}";
const ISSUER: &str = "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc";
const SEPARATOR: u8 = 0xFF;

/// The `error_code`s of the book's error-code table (docs/src/error-codes.md).
pub fn documented_codes() -> &'static BTreeSet<String> {
    static CODES: OnceLock<BTreeSet<String>> = OnceLock::new();
    CODES.get_or_init(|| {
        let readme = include_str!("../docs/src/error-codes.md");
        let table = readme
            .split("# Error codes")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .unwrap_or_default();
        table
            .lines()
            .filter(|l| l.starts_with('|'))
            .flat_map(|l| l.split('`').skip(1).step_by(2))
            .filter(|c| {
                c.split_once('.').is_some_and(|(a, b)| {
                    !a.is_empty()
                        && !b.is_empty()
                        && c.chars()
                            .all(|ch| ch.is_ascii_lowercase() || ch == '_' || ch == '.')
                })
            })
            .map(str::to_string)
            .collect()
    })
}

/// Invariant `documented-code`: every refusal carries a code of the book's table.
fn assert_documented(code: &str, context: &str) {
    assert!(
        documented_codes().contains(code),
        "documented-code: `{code}` ({context}) is not in the book's error-code table"
    );
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The input's parts split at [`SEPARATOR`]; `None` when it has none.
fn parts(data: &[u8]) -> Option<Vec<&[u8]>> {
    data.contains(&SEPARATOR)
        .then(|| data.split(|b| *b == SEPARATOR).collect())
}

/// A compact JWS from a raw input, or from `header 0xFF payload` parts.
fn token_from(data: &[u8]) -> Option<String> {
    match parts(data) {
        Some(p) => Some(format!(
            "{}.{}.c2lnbmF0dXJlLWJ5dGVz",
            b64(p.first().copied().unwrap_or_default()),
            b64(p.get(1).copied().unwrap_or_default())
        )),
        None => std::str::from_utf8(data).ok().map(str::to_string),
    }
}

fn workspace() -> WorkspaceSettings {
    WorkspaceSettings {
        slug: "acme".into(),
        uuid: BbUuid::parse_braced(WS).expect("workspace UUID"),
        issuer: ISSUER.into(),
        audiences: vec!["https://sts.example.test".into()],
        algorithm: jsonwebtoken::Algorithm::RS256,
    }
}

/// The claim rules on one payload reading: identity (as `Debug`) or `(code, message)`.
fn claim_answer(p: Payload) -> Result<String, (&'static str, String)> {
    let rules = TokenRules {
        leeway: Duration::from_secs(60),
        max_token_bytes: 16 * 1024,
        max_lifetime: Duration::from_secs(86_400),
    };
    let err = |e: crate::verify::VerifyError| (e.code(), e.to_string());
    claims::precheck(&p).map(|_| ()).map_err(err)?;
    claims::check(p, &workspace(), &rules, NOW)
        .map(|id| format!("{id:?}"))
        .map_err(err)
}

/// Target `subject_token`. Invariants: `one-pass-equals-member-by-member` (a
/// token the one-pass read accepts gives the member-by-member path the same
/// header, and the claim rules the same identity or the same error);
/// `documented-code`; `no-token-echo` (no error repeats the signature).
pub fn subject_token(data: &[u8]) {
    let Some(raw) = token_from(data) else { return };
    let parsed = match jws::parse(raw.trim(), 16 * 1024) {
        Ok(j) => j,
        Err(e) => return assert_documented(e.code(), "jws::parse"),
    };
    if let Err(e) = jws::check_kid(parsed.kid.as_deref()) {
        assert_documented(e.code(), "check_kid");
    }
    let signature = parsed.signature.to_string();
    let segments: Vec<&str> = raw.trim().split('.').collect();
    let fast = match parsed.payload {
        Payload::Typed(_) => {
            let decode = |s: &str| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(s)
                    .expect("one-pass-equals-member-by-member: base64 read by one path only")
            };
            let header: StrictObject = serde_json::from_slice(&decode(segments[0]))
                .expect("one-pass-equals-member-by-member: header read by one path only");
            let h = header.0;
            assert!(
                !h.contains_key("crit"),
                "one-pass-equals-member-by-member: crit"
            );
            assert_eq!(
                h.get("alg").and_then(|v| v.as_str()),
                Some(parsed.alg.as_str()),
                "one-pass-equals-member-by-member: alg"
            );
            assert_eq!(
                h.get("kid").map(|v| v.as_str().expect("kid string")),
                parsed.kid.as_deref(),
                "one-pass-equals-member-by-member: kid"
            );
            let object: StrictObject = serde_json::from_slice(&decode(segments[1]))
                .expect("one-pass-equals-member-by-member: payload read by one path only");
            let slow = claim_answer(Payload::Object(object.0));
            let fast = claim_answer(parsed.payload);
            assert_eq!(fast, slow, "one-pass-equals-member-by-member: claims");
            fast
        }
        Payload::Object(_) => claim_answer(parsed.payload),
    };
    if let Err((code, message)) = fast {
        assert_documented(code, "claims");
        assert!(
            signature.len() < 16 || !message.contains(&signature),
            "no-token-echo: an error repeats the signature"
        );
    }
}

/// Invariant `form-round-trip`: an accepted request, encoded again as a form,
/// reads back the same; plus `documented-code` for refusals.
pub fn token_form(data: &[u8]) {
    match TokenRequest::from_form(data) {
        Ok(r) => {
            assert!(
                crate::domain::oauth::is_scope_token(&r.audience),
                "form: audience syntax"
            );
            assert!(
                r.scopes.len() <= crate::exchange::MAX_REQUEST_SCOPES
                    && r.scopes
                        .as_slice()
                        .iter()
                        .all(|s| crate::domain::oauth::is_scope_token(s)),
                "form: scope syntax or count"
            );
            let scope = r.scopes.to_string();
            let body = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(crate::client::token_form(
                    &r.subject_token,
                    &r.audience,
                    &scope,
                ))
                .finish();
            let again = TokenRequest::from_form(body.as_bytes())
                .unwrap_or_else(|e| panic!("form-round-trip: refused as {}", e.code()));
            assert_eq!(again.audience, r.audience, "form-round-trip: audience");
            assert_eq!(again.scopes, r.scopes, "form-round-trip: scopes");
            assert_eq!(
                again.subject_token.expose(),
                r.subject_token.expose(),
                "form-round-trip: subject_token"
            );
        }
        Err(e) => assert_documented(e.code(), "TokenRequest::from_form"),
    }
}

/// Invariants `form-round-trip` and `documented-code` for `POST /grants`; and
/// `grants-accepts-what-token-accepts`: a `/token` form's subject token is
/// accepted by `/grants` too.
pub fn grants_form(data: &[u8]) {
    match GrantsRequest::from_form(data) {
        Ok(r) => {
            let body = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("subject_token", r.subject_token.expose())
                .finish();
            let again = GrantsRequest::from_form(body.as_bytes())
                .unwrap_or_else(|e| panic!("form-round-trip: refused as {}", e.code()));
            assert_eq!(again.subject_token.expose(), r.subject_token.expose());
        }
        Err(e) => {
            assert_documented(e.code(), "GrantsRequest::from_form");
            if let Ok(t) = TokenRequest::from_form(data) {
                panic!(
                    "grants-accepts-what-token-accepts: /grants refused ({}) a /token form with subject_token of {} bytes",
                    e.code(),
                    t.subject_token.expose().len()
                );
            }
        }
    }
}

/// Target `keycloak_token_response`: the body, or `response 0xFF header 0xFF
/// payload` (the access token built from the parts). Invariants:
/// `passed-on-within-grant` (an accepted token's scopes are requested or
/// identity scopes, `expires_in` ≥ 1), `documented-code`, `no-token-echo`.
pub fn keycloak_token_response(data: &[u8]) {
    let body = match parts(data) {
        Some(p) => {
            let Ok(serde_json::Value::Object(mut m)) =
                serde_json::from_slice::<serde_json::Value>(p[0])
            else {
                return;
            };
            let token = token_from(&data[p[0].len() + 1..]).unwrap_or_default();
            m.insert("access_token".into(), token.into());
            serde_json::to_vec(&m).expect("JSON")
        }
        None => data.to_vec(),
    };
    let token = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("access_token")?.as_str().map(str::to_string));
    let requested = Scopes::parse("deploy:api artifacts:read").expect("scopes");
    for user in [
        None,
        Some(("bitbucket-repo", "3f9a2c1e-0000-4000-8000-000000000001")),
    ] {
        let expect = crate::keycloak::Expected {
            realm_issuer: "https://kc.example.test/realms/ci",
            client: "sts-deployer",
            requested: &requested,
            max_lifetime_seconds: 600,
            user,
        };
        match crate::keycloak::check_issued(&body, &expect, NOW) {
            Ok(t) => {
                assert!(t.expires_in >= 1, "passed-on-within-grant: expires_in 0");
                for s in t.scope.split(' ').filter(|s| !s.is_empty()) {
                    assert!(
                        requested.contains(s) || crate::keycloak::IDENTITY_SCOPES.contains(&s),
                        "passed-on-within-grant: scope `{s}` was not requested"
                    );
                }
                assert_eq!(t.access_token.expose().split('.').count(), 3);
            }
            Err(e) => {
                assert_documented(e.code(), "check_issued");
                if let Some(t) = token.as_deref().filter(|t| t.len() >= 16) {
                    let text = format!("{e} {e:?}");
                    assert!(
                        !text.contains(t),
                        "no-token-echo: an error repeats the token"
                    );
                }
            }
        }
    }
}

/// Target `jwks`. Invariant `only-usable-keys`: an accepted set holds between 1
/// and `MAX_KEYS` keys, no more than the document's signing-use keys, and
/// reading is deterministic.
pub fn jwks(data: &[u8]) {
    let signing_keys = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("keys")?.as_array().cloned())
        .map(|keys| {
            keys.iter()
                .filter(|k| k.get("use").is_none_or(|u| u == "sig"))
                .count()
        })
        .unwrap_or(0);
    for alg in [
        jsonwebtoken::Algorithm::RS256,
        jsonwebtoken::Algorithm::ES256,
    ] {
        let first = crate::verify::jwks::parse_jwks(data, alg);
        let second = crate::verify::jwks::parse_jwks(data, alg);
        match (&first, &second) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.len(), b.len(), "only-usable-keys: not deterministic");
                assert!(
                    !a.is_empty() && a.len() <= crate::verify::jwks::MAX_KEYS,
                    "only-usable-keys: count"
                );
                assert!(
                    a.len() <= signing_keys,
                    "only-usable-keys: a key not for signing"
                );
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "only-usable-keys: not deterministic"),
            _ => panic!("only-usable-keys: not deterministic"),
        }
    }
}

fn keycloak_settings() -> crate::keycloak::KeycloakSettings {
    crate::keycloak::KeycloakSettings {
        base_url: url::Url::parse("https://kc.example.test").expect("URL"),
        realm: "ci".into(),
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(10),
        max_response_bytes: 65_536,
        assertion_lifetime: Duration::from_secs(60),
        max_retry_after: Duration::from_secs(60),
        clients: Default::default(),
        grant_modes: Default::default(),
        identity: None,
    }
}

/// Target `keycloak_discovery`. Invariant `endpoint-is-checked`: an accepted
/// document's token endpoint is the parsed `token_endpoint`, https (or http on
/// loopback), on the realm URL's origin and under its path by segments, and
/// its issuer is the realm URL; `documented-code`.
pub fn keycloak_discovery(data: &[u8]) {
    match crate::keycloak::read_discovery(data, &keycloak_settings()) {
        Ok(ep) => {
            let again = url::Url::parse(&ep.token_endpoint).expect("endpoint-is-checked: parse");
            assert_eq!(
                again, ep.token_url,
                "endpoint-is-checked: parsed twice differently"
            );
            assert!(
                crate::http::is_https_or_loopback_http(&ep.token_url),
                "endpoint-is-checked: scheme"
            );
            // Secrets are POSTed there: the realm's origin, under its path by segments.
            let settings = keycloak_settings();
            let realm = url::Url::parse(&settings.realm_url()).expect("realm URL");
            assert_eq!(
                ep.token_url.origin(),
                realm.origin(),
                "endpoint-is-checked: origin"
            );
            let under: Vec<&str> = realm.path_segments().into_iter().flatten().collect();
            let path: Vec<&str> = ep.token_url.path_segments().into_iter().flatten().collect();
            assert!(
                path.len() >= under.len() && path[..under.len()] == under[..],
                "endpoint-is-checked: under the realm's path"
            );
            assert_eq!(
                ep.issuer,
                settings.realm_url(),
                "endpoint-is-checked: issuer"
            );
        }
        Err(e) => assert_documented(e.code(), "read_discovery"),
    }
}

/// YAML text re-serialised through a generic value (formatting, quoting and
/// order of a mapping's keys as the serialiser writes them).
fn yaml_again(text: &str) -> Option<String> {
    let v: serde_norway::Value = serde_norway::from_str(text).ok()?;
    if v.is_null() {
        return None; // an empty document: nothing to re-serialise
    }
    serde_norway::to_string(&v).ok()
}

/// A subject that meets each condition of `p` where it can.
fn subject_for(p: &crate::policy::Policy) -> Subject {
    let first = |l: &Option<Vec<BbUuid>>| l.as_ref().and_then(|v| v.first().copied());
    let ws = BbUuid::parse_braced(WS).expect("UUID");
    Subject {
        workspace_uuid: first(&p.when.workspace_uuid).unwrap_or(ws),
        repository_uuid: first(&p.when.repository_uuid).unwrap_or(ws),
        deployment_environment_uuid: first(&p.when.deployment_environment_uuid),
        branch_name: p
            .when
            .branch_name
            .as_ref()
            .and_then(|b| b.first())
            .map(|b| b.source().replace(['*', '?', '[', ']', '{', '}'], "x"))
            .or_else(|| Some("main".into())),
        aud: p
            .when
            .aud
            .clone()
            .unwrap_or_default()
            .into_iter()
            .chain(["https://sts.example.test".to_string()])
            .collect(),
    }
}

/// Target `policy`. Invariants: `compiles-deterministically`; `round-trips` (the
/// same YAML re-serialised compiles to the same policy); `offers-are-honoured`
/// (each offer `/grants` lists is allowed by `/token` with its scopes, and
/// without scopes exactly when it has default scopes); `documented-code`.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = crate::policy::compile_str("fuzz", text, None) else {
        return;
    };
    let again = crate::policy::compile_str("fuzz", text, None).expect("compiles-deterministically");
    assert_eq!(
        format!("{p:?}"),
        format!("{again:?}"),
        "compiles-deterministically"
    );
    if let Some(rt) = yaml_again(text) {
        let q = crate::policy::compile_str("fuzz", &rt, None)
            .unwrap_or_else(|e| panic!("round-trips: refused after a YAML round trip: {e}"));
        assert_eq!(format!("{p:?}"), format!("{q:?}"), "round-trips");
    }
    let subject = subject_for(&p);
    let audiences: Vec<String> = p.grant.iter().map(|g| g.audience.clone()).collect();
    let set = PolicySet::from_policies(vec![p]);
    let now = std::time::SystemTime::now();
    let decide = |audience: &str, scopes: &Scopes| {
        let req = EvalRequest {
            subject: &subject,
            audience,
            scopes,
            now,
        };
        let outcome = set.decide(&req);
        assert_eq!(
            outcome,
            set.evaluate_unindexed(&req).outcome,
            "index-decides-as-a-scan"
        );
        outcome
    };
    let offers = set.offers(&subject, now);
    assert_eq!(
        offers,
        set.offers_unindexed(&subject, now),
        "index-decides-as-a-scan"
    );
    // An offer with missing protections is listed but not obtainable now.
    for o in offers.iter().filter(|o| o.missing_protections.is_empty()) {
        let scopes: Scopes = o.scopes.iter().map(String::as_str).collect();
        match decide(&o.audience, &scopes) {
            Outcome::Allow(g) => assert!(
                g.scopes.as_slice().iter().all(|s| o.scopes.contains(s)),
                "offers-are-honoured: granted more than offered"
            ),
            Outcome::Deny { reason, .. } => {
                panic!("offers-are-honoured: offer refused as {}", reason.code())
            }
        }
        let defaults = offers.iter().any(|x| {
            x.audience == o.audience
                && x.default_scopes.is_some()
                && x.missing_protections.is_empty()
        });
        let allowed = matches!(decide(&o.audience, &Scopes::default()), Outcome::Allow(_));
        assert_eq!(allowed, defaults, "offers-are-honoured: default scopes");
    }
    for a in audiences
        .iter()
        .chain(["unknown-audience".to_string()].iter())
    {
        if let Outcome::Deny { reason, .. } = decide(a, &Scopes::default()) {
            assert_documented(reason.code(), "policy evaluation");
            assert!(
                !offers.iter().any(|o| &o.audience == a
                    && o.default_scopes.is_some()
                    && o.missing_protections.is_empty()),
                "offers-are-honoured: refused an offered audience"
            );
        }
    }
}

/// Target `inventory`. Invariant `written-reads-back`: an inventory the loader
/// accepts, written as `bitbucket inventory` writes it, reads back equal.
pub fn inventory(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(w) = crate::inventory::parse(text) else {
        return;
    };
    written_reads_back(w);
}

fn written_reads_back(mut w: crate::inventory::WorkspaceInventory) {
    if crate::inventory::Inventory::new(vec![w.clone()]).is_err() {
        return;
    }
    let yaml = w.to_yaml().expect("written-reads-back: serialise");
    let back = crate::inventory::parse(&yaml)
        .unwrap_or_else(|e| panic!("written-reads-back: the written file is refused: {e}"));
    w.normalise();
    assert_eq!(back, w, "written-reads-back");
    crate::inventory::Inventory::new(vec![back]).expect("written-reads-back: index");
}

/// Target `realm_model`. Invariants: `round-trips` (an accepted model reads the
/// same after a YAML round trip); `problems-name-the-file`.
pub fn realm_model(data: &[u8]) {
    use crate::provision::model::RealmModel;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match RealmModel::from_str(text, "realm.yaml") {
        Ok(m) => {
            if let Some(rt) = yaml_again(text) {
                let again = RealmModel::from_str(&rt, "realm.yaml").unwrap_or_else(|e| {
                    panic!("round-trips: refused after a YAML round trip: {e:?}")
                });
                assert_eq!(format!("{m:?}"), format!("{again:?}"), "round-trips");
            }
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "problems-name-the-file: none");
            for p in problems {
                assert!(
                    p.file == "realm.yaml" && !p.reason.is_empty(),
                    "problems-name-the-file"
                );
            }
        }
    }
}

/// Target `configuration` (no secret or key is read). Invariants:
/// `checked-deterministically`; `accepted-iff-no-error` (settings exactly when
/// the report holds no error, each error with a reason).
pub fn configuration(data: &[u8]) {
    use crate::configuration::{Secrets, Settings};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let run = || {
        let builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml));
        Settings::from_builder(
            builder,
            "<fuzz>",
            std::path::PathBuf::from("/nonexistent/keycloak-ci-sts-fuzz"),
            Secrets::Skip,
        )
    };
    // The same problems in the same order each time (the `config` crate keeps
    // the file's order: feature `preserve_order`).
    let all = |r: &crate::configuration::Report| {
        r.errors
            .iter()
            .chain(&r.warnings)
            .map(|e| format!("{e:?}"))
            .collect::<Vec<String>>()
    };
    let (settings, report) = run();
    let (_, again) = run();
    assert_eq!(all(&report), all(&again), "checked-deterministically");
    assert_eq!(
        settings.is_some(),
        report.errors.is_empty(),
        "accepted-iff-no-error"
    );
    for e in &report.errors {
        assert!(
            !e.reason.is_empty(),
            "accepted-iff-no-error: an error without a reason"
        );
    }
}

/// Target `bitbucket_page` (a page of `GET /repositories/{workspace}`).
/// Invariant `written-reads-back`: what the client would write reads back equal.
pub fn bitbucket_page(data: &[u8]) {
    let url = url::Url::parse("https://api.bitbucket.org/2.0/repositories/acme").expect("URL");
    let Ok((repositories, _next)) = crate::inventory::fetch::repositories_page(data, &url) else {
        return;
    };
    written_reads_back(crate::inventory::WorkspaceInventory {
        workspace: "acme".into(),
        workspace_uuid: BbUuid::parse_braced(WS).expect("UUID"),
        repositories,
    });
}

/// Target `branch_restrictions` (a page of `GET …/branch-restrictions` as
/// `bitbucket inventory` records it). Invariants: `recorded-is-accepted`
/// (what is recorded passes the loader's checks: one repository's answer
/// never stops a refresh); `patterns-exact` (a recorded glob pattern is one
/// Bitbucket sent, unchanged: never cut or rewritten into a wider one);
/// `written-reads-back`.
pub fn branch_restrictions(data: &[u8]) {
    let Some(list) = crate::inventory::fetch::restrictions_page(data) else {
        return;
    };
    // The patterns as sent, read the way the page was (other fields skipped alike).
    #[derive(serde::Deserialize)]
    struct Sent {
        values: Vec<SentValue>,
    }
    #[derive(serde::Deserialize)]
    struct SentValue {
        #[serde(default)]
        pattern: Option<String>,
    }
    let raw: Sent = serde_json::from_slice(data).expect("parsed once already");
    let sent: Vec<&str> = raw
        .values
        .iter()
        .filter_map(|v| v.pattern.as_deref())
        .collect();
    for r in &list {
        if let (None, Some(p)) = (&r.branch_type, &r.pattern) {
            assert!(sent.contains(&p.as_str()), "patterns-exact: {p:?}");
        }
    }
    let w = crate::inventory::WorkspaceInventory {
        workspace: "acme".into(),
        workspace_uuid: BbUuid::parse_braced(WS).expect("UUID"),
        repositories: vec![crate::inventory::Repository {
            uuid: BbUuid::parse_braced(WS).expect("UUID"),
            full_name: "acme/r".into(),
            project: None,
            environments: Vec::new(),
            protections: Some(crate::inventory::Protections {
                read_at: crate::inventory::protections::rfc3339(std::time::SystemTime::now()),
                branch_restrictions: Some(list),
                unknown: None,
            }),
        }],
    };
    if let Err(e) = crate::inventory::Inventory::new(vec![w.clone()]) {
        panic!("recorded-is-accepted: {e}");
    }
    written_reads_back(w);
}

/// Target `mcp_args` (`get_token`'s JSON arguments). Invariants:
/// `service-reads-what-the-agent-asked` (the form the client sends is refused,
/// or read by the service as exactly the audience and scopes the agent named);
/// `token-file-name-is-one-safe-component`; `documented-code`.
pub fn mcp_args(data: &[u8]) {
    let Ok(args) = serde_json::from_slice::<crate::mcp::GetTokenArgs>(data) else {
        return;
    };
    let name = crate::mcp::token_file_name(&args.audience);
    // An empty audience is refused by the service before any file is written.
    assert!(
        (args.audience.is_empty() || !name.starts_with('.'))
            && name.ends_with(".token")
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "token-file-name-is-one-safe-component"
    );
    if crate::client::check_scopes(&args.scopes).is_err() {
        return; // refused by the client before anything is sent
    }
    let subject = SecretToken::new("eyJhbGciOiJSUzI1NiJ9.e30.c2ln".to_string());
    let scope = args.scopes.join(" ");
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(crate::client::token_form(&subject, &args.audience, &scope))
        .finish();
    match TokenRequest::from_form(body.as_bytes()) {
        Ok(r) => {
            assert_eq!(
                r.audience, args.audience,
                "service-reads-what-the-agent-asked: audience"
            );
            let asked: Scopes = args.scopes.iter().map(String::as_str).collect();
            assert_eq!(
                r.scopes, asked,
                "service-reads-what-the-agent-asked: scopes"
            );
        }
        Err(e) => {
            let e: RequestError = e;
            assert_documented(e.code(), "mcp get_token form");
        }
    }
}
