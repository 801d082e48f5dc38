//! `keycloak plan/apply` against a wiremock Admin API: lists read to their end,
//! the admin token renewed and a 401 retried once, `partialImport`'s skipped
//! results reported as such (issue 19 §6). The real Keycloak runs in
//! `provision_real.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keycloak_ci_sts::domain::identity::RepositoryIdentity;
use keycloak_ci_sts::domain::BbUuid;
use keycloak_ci_sts::provision::admin::{Admin, Credentials};
use keycloak_ci_sts::provision::identities::{Identities, LiveIdentities};
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const REALM: &str = "ci";

/// An admin client of realm `ci` on `server`.
fn admin(server: &MockServer) -> Admin {
    let http =
        keycloak_ci_sts::http::client(Duration::from_secs(2), Duration::from_secs(5)).unwrap();
    let creds = Credentials {
        realm: REALM.into(),
        client_id: "kcs-admin".into(),
        secret: "admin-secret-0123456789".to_string().into(),
    };
    Admin::new(&url::Url::parse(&server.uri()).unwrap(), REALM, creds, http)
}

/// The token endpoint: the n-th token fetched is `token-n`, living `expires_in`.
async fn token_endpoint(server: &MockServer, expires_in: u64) -> Arc<AtomicUsize> {
    let fetched = Arc::new(AtomicUsize::new(0));
    let counter = fetched.clone();
    Mock::given(method("POST"))
        .and(path(format!(
            "/realms/{REALM}/protocol/openid-connect/token"
        )))
        .respond_with(move |_: &Request| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            ResponseTemplate::new(200).set_body_json(json!({
                "access_token": format!("token-{n}"),
                "expires_in": expires_in,
                "token_type": "Bearer"
            }))
        })
        .mount(server)
        .await;
    fetched
}

/// A query parameter of `req` parsed as a number.
fn query_num(req: &Request, name: &str) -> Option<usize> {
    req.url
        .query_pairs()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// Serves `items` as Keycloak does: `first` (default 0) and `max` (default 100).
fn paged(items: Vec<Value>) -> impl Fn(&Request) -> ResponseTemplate + Send + Sync {
    move |req: &Request| {
        let first = query_num(req, "first").unwrap_or(0).min(items.len());
        let max = query_num(req, "max").unwrap_or(100);
        let end = first.saturating_add(max).min(items.len());
        ResponseTemplate::new(200).set_body_json(Value::Array(items[first..end].to_vec()))
    }
}

/// `n` repository users `apply` created (ids its own), linked to the provider.
fn stale_users(n: usize) -> Vec<Value> {
    let ws = BbUuid::parse_lenient("03b741e3-cf4a-41f9-9a59-cec52e21bdc3").unwrap();
    (0..n)
        .map(|i| {
            let repo = BbUuid::parse_lenient(&format!("00000000-0000-4000-8000-{i:012x}")).unwrap();
            let id = RepositoryIdentity {
                workspace: ws,
                repository: repo,
                environment: None,
            };
            json!({"id": id.user_id(REALM), "username": id.username(), "enabled": true})
        })
        .collect()
}

/// The identity objects of an empty desired state: provider, profile, serverinfo.
async fn identity_basics(server: &MockServer) {
    Mock::given(method("GET"))
        .and(path("/admin/serverinfo"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!(
            "/admin/realms/{REALM}/identity-provider/instances/keycloak-ci-sts"
        )))
        .respond_with(ResponseTemplate::new(404))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/admin/realms/{REALM}/users/profile")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"attributes": []})))
        .mount(server)
        .await;
    // Each linked user's links (the one read Keycloak has per user).
    Mock::given(method("GET"))
        .and(path_regex(format!(
            "^/admin/realms/{REALM}/users/[^/]+/federated-identity$"
        )))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .mount(server)
        .await;
}

fn no_identities() -> Identities {
    Identities {
        provider: Default::default(),
        groups: Vec::new(),
        users: Vec::new(),
    }
}

/// 10,050 stale repository users: every one is seen (and proposed for removal by
/// `--prune`), not the first 10,000 of a single capped read.
#[tokio::test]
async fn provision_reads_every_user_linked_to_the_identity_provider() {
    let server = MockServer::start().await;
    token_endpoint(&server, 300).await;
    identity_basics(&server).await;
    let users = stale_users(10_050);
    Mock::given(method("GET"))
        .and(path(format!("/admin/realms/{REALM}/users")))
        .respond_with(paged(users))
        .mount(&server)
        .await;
    let live = LiveIdentities::read(
        &admin(&server),
        &no_identities(),
        "keycloak-ci-sts",
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        live.unneeded.len(),
        10_050,
        "stale users seen by one read of the list"
    );
}

/// A list longer than the bound fails the command, naming the bound; a server
/// that ignores `max` cannot make a partial list look complete.
#[tokio::test]
async fn provision_list_reads_fail_at_their_bound_naming_it() {
    use keycloak_ci_sts::provision::admin::ListBounds;
    let server = MockServer::start().await;
    token_endpoint(&server, 300).await;
    identity_basics(&server).await;
    Mock::given(method("GET"))
        .and(path(format!("/admin/realms/{REALM}/users")))
        .respond_with(paged(stale_users(250)))
        .mount(&server)
        .await;
    let small = admin(&server).with_list_bounds(ListBounds {
        page: 100,
        max_items: 200,
    });
    let err = LiveIdentities::read(
        &small,
        &no_identities(),
        "keycloak-ci-sts",
        &Default::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("more than 200 elements"), "{err}");
    assert!(err.contains("list users linked"), "{err}");

    let paged_ok = admin(&server).with_list_bounds(ListBounds {
        page: 100,
        max_items: 1000,
    });
    let live = LiveIdentities::read(
        &paged_ok,
        &no_identities(),
        "keycloak-ci-sts",
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(live.unneeded.len(), 250, "three pages of 100, 100, 50");

    let deaf = MockServer::start().await;
    token_endpoint(&deaf, 300).await;
    identity_basics(&deaf).await;
    let all = stale_users(150);
    Mock::given(method("GET"))
        .and(path(format!("/admin/realms/{REALM}/users")))
        .respond_with(ResponseTemplate::new(200).set_body_json(Value::Array(all)))
        .mount(&deaf)
        .await;
    let err = LiveIdentities::read(
        &admin(&deaf).with_list_bounds(ListBounds {
            page: 100,
            max_items: 1000,
        }),
        &no_identities(),
        "keycloak-ci-sts",
        &Default::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("ignores paging"), "{err}");
}

/// A 401 from the Admin API (the cached token expired or was invalidated) is
/// retried once with a fresh token, which succeeds.
#[tokio::test]
async fn provision_admin_api_401_is_retried_once_with_a_fresh_token() {
    let server = MockServer::start().await;
    let fetched = token_endpoint(&server, 300).await;
    let clients = format!("/admin/realms/{REALM}/clients");
    Mock::given(method("GET"))
        .and(path(clients.clone()))
        .and(header("authorization", "Bearer token-1"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"error": "HTTP 401 Unauthorized"})),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(clients))
        .and(header("authorization", "Bearer token-2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([{"clientId": "x"}])))
        .mount(&server)
        .await;
    let got: Vec<Value> = admin(&server)
        .get_capped("/clients", &[], "read clients")
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(fetched.load(Ordering::SeqCst), 2, "one fresh token");
}

/// When the fresh token is refused too, the error says so (not "check the secret":
/// the token endpoint accepted it), and nothing is retried a third time.
#[tokio::test]
async fn provision_admin_api_401_twice_says_what_happened() {
    let server = MockServer::start().await;
    let fetched = token_endpoint(&server, 300).await;
    Mock::given(method("GET"))
        .and(path(format!("/admin/realms/{REALM}/clients")))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    let err = admin(&server)
        .get_capped::<Vec<Value>>("/clients", &[], "read clients")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("again a token fetched just now"), "{err}");
    assert!(!err.contains("secret"), "{err}");
    assert_eq!(fetched.load(Ordering::SeqCst), 2, "one retry only");
}

/// Another `apply` created the user between this run's read and its
/// `partialImport`: Keycloak answers SKIPPED, and the journal says so instead of
/// "+ created".
#[tokio::test]
async fn provision_racing_apply_reports_skipped_users_as_already_present() {
    use keycloak_ci_sts::provision::diff::Plan;
    use keycloak_ci_sts::provision::identities::User;
    let server = MockServer::start().await;
    token_endpoint(&server, 300).await;
    let raced = stale_users(1).remove(0);
    let username = raced["username"].as_str().unwrap().to_string();
    Mock::given(method("POST"))
        .and(path(format!("/admin/realms/{REALM}/partialImport")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "overwritten": 0, "added": 0, "skipped": 1,
            "results": [{"action": "SKIPPED", "resourceType": "USER",
                         "resourceName": username, "id": raced["id"]}]
        })))
        .expect(1)
        .mount(&server)
        .await;
    let identity = RepositoryIdentity::from_username(&username).unwrap();
    let want = Identities {
        users: vec![User {
            identity,
            username: username.clone(),
            id: identity.user_id(REALM),
            attributes: Default::default(),
            groups: Default::default(),
        }],
        ..no_identities()
    };
    let live = LiveIdentities::default();
    let mut plan = Plan::default();
    keycloak_ci_sts::provision::identities::plan(&want, &live, "keycloak-ci-sts", false, &mut plan);
    Mock::given(method("POST"))
        .and(path(format!(
            "/admin/realms/{REALM}/identity-provider/instances"
        )))
        .respond_with(ResponseTemplate::new(201))
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path(format!("/admin/realms/{REALM}/users/profile")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .mount(&server)
        .await;
    let journal = apply_identities(&server, &want, &live, &plan).await;
    let text = journal.join("\n");
    assert!(!text.contains("+ created user"), "{text}");
    assert!(text.contains("already present"), "{text}");
}

/// The realm as `apply` leaves it for `desired`'s identity objects, with the
/// identity provider and an owned client no longer needed disabled by an operator.
fn operator_switched_off() -> (
    keycloak_ci_sts::provision::desired::Desired,
    keycloak_ci_sts::provision::live::Live,
) {
    use keycloak::types::{ClientRepresentation, IdentityProviderRepresentation};
    use keycloak_ci_sts::provision::desired::Desired;
    use keycloak_ci_sts::provision::identities::PROFILE_ATTRIBUTES;
    use keycloak_ci_sts::provision::live::Live;
    use keycloak_ci_sts::provision::realm::OWNER_ATTRIBUTE;
    let owner = "keycloak-ci-sts";
    let marker =
        std::collections::HashMap::from([(OWNER_ATTRIBUTE.to_string(), owner.to_string())]);
    let provider = IdentityProviderRepresentation {
        alias: Some("keycloak-ci-sts".into()),
        provider_id: Some("jwt-authorization-grant".into()),
        enabled: Some(true),
        config: Some(marker.clone()),
        ..Default::default()
    };
    let client = ClientRepresentation {
        id: Some("6c3e1d2a-0000-4000-8000-000000000001".into()),
        client_id: Some("sts-retired".into()),
        enabled: Some(false),
        attributes: Some(marker),
        ..Default::default()
    };
    let desired = Desired {
        owner: owner.into(),
        resource_servers: Vec::new(),
        scopes: Vec::new(),
        clients: Vec::new(),
        warnings: Vec::new(),
        identities: Some(Identities {
            provider: provider.clone(),
            ..no_identities()
        }),
    };
    let profile: Vec<Value> = PROFILE_ATTRIBUTES
        .iter()
        .map(|(a, _)| json!({"name": a}))
        .collect();
    let live = Live {
        clients: [("sts-retired".to_string(), client)].into(),
        identities: Some(LiveIdentities {
            provider: Some(IdentityProviderRepresentation {
                enabled: Some(false),
                ..provider
            }),
            profile: json!({ "attributes": profile }),
            ..Default::default()
        }),
        ..Default::default()
    };
    (desired, live)
}

/// An operator's `enabled: false` is kept on every kind that has one: the
/// identity provider is not switched back on, an owned client no longer needed
/// is not pruned (which would delete the switch), and the plan says so.
#[test]
fn provision_plan_keeps_every_operator_off_switch() {
    let (desired, live) = operator_switched_off();
    let p = keycloak_ci_sts::provision::plan::plan(&desired, &live, true, "kcs-admin");
    let text = p.render().join("\n");
    assert!(!text.contains("enabled: false -> true"), "{text}");
    assert!(!text.contains("sts-retired: remove"), "{text}");
    assert!(
        text.contains(
            "= identity provider keycloak-ci-sts: in sync [disabled by an operator: left disabled"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "client sts-retired: owned but no longer needed; kept [disabled by an operator"
        ),
        "{text}"
    );
    assert!(!p.pending(), "{text}");
}

/// A repository user with pending required actions cannot obtain tokens
/// (`identity.not_ready`): `plan` says so before a pipeline fails.
#[test]
fn provision_plan_reports_users_with_pending_required_actions() {
    use keycloak::types::UserRepresentation;
    use keycloak_ci_sts::provision::identities::{LiveUser, User};
    let (mut desired, mut live) = operator_switched_off();
    let raced = stale_users(1).remove(0);
    let username = raced["username"].as_str().unwrap().to_string();
    let identity = RepositoryIdentity::from_username(&username).unwrap();
    desired.identities.as_mut().unwrap().users.push(User {
        identity,
        username: username.clone(),
        id: identity.user_id(REALM),
        attributes: Default::default(),
        groups: Default::default(),
    });
    live.identities.as_mut().unwrap().users.insert(
        username.clone(),
        LiveUser {
            rep: UserRepresentation {
                id: Some(identity.user_id(REALM)),
                username: Some(username.clone()),
                enabled: Some(true),
                required_actions: Some(vec!["CONFIGURE_TOTP".into()]),
                ..Default::default()
            },
            links: vec![keycloak::types::FederatedIdentityRepresentation {
                identity_provider: Some("keycloak-ci-sts".into()),
                user_id: Some(identity.subject()),
                user_name: Some(username.clone()),
            }],
            groups: Default::default(),
            roles: Default::default(),
        },
    );
    let p = keycloak_ci_sts::provision::plan::plan(&desired, &live, false, "kcs-admin");
    let text = p.render().join("\n");
    assert!(
        text.contains(&format!(
            "user {username} has pending required actions (CONFIGURE_TOTP)"
        )),
        "{text}"
    );
    assert!(text.contains("identity.not_ready"), "{text}");
}

/// `n` repository users to create (the identities of [`stale_users`]).
fn want_users(n: usize) -> Vec<keycloak_ci_sts::provision::identities::User> {
    stale_users(n)
        .into_iter()
        .map(|u| {
            let identity =
                RepositoryIdentity::from_username(u["username"].as_str().unwrap()).unwrap();
            keycloak_ci_sts::provision::identities::User {
                identity,
                username: identity.username(),
                id: identity.user_id(REALM),
                attributes: Default::default(),
                groups: Default::default(),
            }
        })
        .collect()
}

/// Runs the identities' apply of `plan` against `server`; its journal.
async fn apply_identities(
    server: &MockServer,
    want: &Identities,
    live: &LiveIdentities,
    plan: &keycloak_ci_sts::provision::diff::Plan,
) -> Vec<String> {
    let mut journal = keycloak_ci_sts::provision::diff::Journal::default();
    keycloak_ci_sts::provision::identities::apply(
        &admin(server),
        want,
        live,
        plan,
        "keycloak-ci-sts",
        &mut journal,
    )
    .await
    .unwrap();
    journal.lines().to_vec()
}

/// Busy answers (503 from a proxy or a loaded Keycloak, 429) are asked again
/// with backoff; each attempt is counted under its object kind.
#[tokio::test]
async fn provision_busy_answers_are_retried_with_backoff_and_counted() {
    use keycloak_ci_sts::provision::admin::BUSY_RETRIES;
    let server = MockServer::start().await;
    token_endpoint(&server, 300).await;
    let clients = format!("/admin/realms/{REALM}/clients");
    for (status, times) in [(503, 2), (429, 1)] {
        Mock::given(method("GET"))
            .and(path(clients.clone()))
            .respond_with(ResponseTemplate::new(status))
            .up_to_n_times(times)
            .mount(&server)
            .await;
    }
    Mock::given(method("GET"))
        .and(path(clients))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([{"clientId": "x"}])))
        .mount(&server)
        .await;
    let admin = admin(&server).with_backoff(Duration::from_millis(1));
    let got: Vec<Value> = admin
        .get_capped("/clients", &[], "read clients")
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        admin.calls().by_kind.get("clients"),
        Some(&4),
        "{}",
        admin.calls()
    );

    let busy = MockServer::start().await;
    token_endpoint(&busy, 300).await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&busy)
        .await;
    let admin = self::admin(&busy).with_backoff(Duration::from_millis(1));
    let err = admin
        .get_capped::<Vec<Value>>("/groups", &[], "read groups")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("503"), "{err}");
    assert_eq!(admin.calls().total(), u64::from(BUSY_RETRIES) + 1);
}

/// New repository users are created in batches: 250 users are three
/// `partialImport` requests, each user journaled once, in order.
#[tokio::test]
async fn provision_new_users_are_created_in_batches() {
    use keycloak_ci_sts::provision::diff::Plan;
    use keycloak_ci_sts::provision::identities::IMPORT_BATCH;
    let server = MockServer::start().await;
    token_endpoint(&server, 300).await;
    Mock::given(method("POST"))
        .and(path(format!("/admin/realms/{REALM}/partialImport")))
        .respond_with(|req: &Request| {
            let body: Value = serde_json::from_slice(&req.body).unwrap();
            let results: Vec<Value> = body["users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| json!({"action": "ADDED", "resourceType": "USER", "resourceName": u["username"], "id": u["id"]}))
                .collect();
            ResponseTemplate::new(200).set_body_json(json!({"results": results}))
        })
        .expect(3)
        .mount(&server)
        .await;
    let users = want_users(250);
    assert!(users.len() > 2 * IMPORT_BATCH);
    let want = Identities {
        users,
        ..no_identities()
    };
    let live = LiveIdentities {
        profile: json!({"attributes": []}),
        ..Default::default()
    };
    let mut plan = Plan::default();
    keycloak_ci_sts::provision::identities::plan(&want, &live, "keycloak-ci-sts", false, &mut plan);
    plan.entries
        .retain(|e| e.kind == keycloak_ci_sts::provision::diff::Kind::User);
    let journal = apply_identities(&server, &want, &live, &plan).await;
    let expected: Vec<String> = want
        .users
        .iter()
        .map(|u| format!("+ created user {}", u.username))
        .collect();
    assert_eq!(journal, expected);
}

/// A user holding the id of a repository user to be created (made by hand:
/// ids are predictable) makes Keycloak refuse its whole batch (409): the
/// batch is tried again one user at a time, every other user is created, and
/// the error names the user that holds the id (issue #21 review).
#[tokio::test]
async fn provision_a_squatted_user_id_blocks_only_that_user_and_is_named() {
    use keycloak_ci_sts::provision::diff::{Journal, Kind, Plan};
    let server = MockServer::start().await;
    token_endpoint(&server, 300).await;
    let want = Identities {
        users: want_users(150),
        ..no_identities()
    };
    let squatted = want.users[120].clone();
    let blocked_name = squatted.username.clone();
    Mock::given(method("POST"))
        .and(path(format!("/admin/realms/{REALM}/partialImport")))
        .respond_with(move |req: &Request| {
            let body: Value = serde_json::from_slice(&req.body).unwrap();
            let users = body["users"].as_array().unwrap();
            if users.iter().any(|u| u["username"] == blocked_name.as_str()) {
                return ResponseTemplate::new(409)
                    .set_body_json(json!({"errorMessage": "Duplicate resource error"}));
            }
            let results: Vec<Value> = users
                .iter()
                .map(|u| json!({"action": "ADDED", "resourceType": "USER", "resourceName": u["username"], "id": u["id"]}))
                .collect();
            ResponseTemplate::new(200).set_body_json(json!({"results": results}))
        })
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/admin/realms/{REALM}/users/{}", squatted.id)))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": squatted.id, "username": "squatter"})),
        )
        .mount(&server)
        .await;
    let live = LiveIdentities {
        profile: json!({"attributes": []}),
        ..Default::default()
    };
    let mut plan = Plan::default();
    keycloak_ci_sts::provision::identities::plan(&want, &live, "keycloak-ci-sts", false, &mut plan);
    plan.entries.retain(|e| e.kind == Kind::User);
    let mut journal = Journal::default();
    let err = keycloak_ci_sts::provision::identities::apply(
        &admin(&server),
        &want,
        &live,
        &plan,
        "keycloak-ci-sts",
        &mut journal,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("held by user squatter"), "{err}");
    assert!(err.contains(&squatted.username), "{err}");
    assert_eq!(journal.lines().len(), 149, "every other user is created");
    assert!(!journal
        .lines()
        .iter()
        .any(|l| l.contains(&squatted.username)));
}
