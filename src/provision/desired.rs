//! The desired Keycloak state, derived from the configuration's clients, the
//! policies' grants and the realm model. Every setting and why it has its value is
//! in the book (docs/src/keycloak.md).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ::keycloak::types::{
    ClientRepresentation, ClientScopeRepresentation, ProtocolMapperRepresentation,
};
use secrecy::{ExposeSecret, SecretString};

use super::model::{join, RealmModel};
use super::realm::{BASIC_SCOPE, OWNER_ATTRIBUTE};
use crate::policy::Policy;

/// Shortest client secret `apply` sets, in characters.
pub const MIN_SECRET_LEN: usize = 16;

/// How the service authenticates as a client (from `[keycloak.clients.*]`).
#[derive(Debug)]
pub enum Auth {
    /// `private_key_jwt`: Keycloak's "Signed JWT" (`client-jwt`) with our JWKS URL.
    PrivateKeyJwt,
    /// `client_secret_basic`: "Client Id and Secret" (`client-secret`); the
    /// configured secret when it was read (`apply`), `None` otherwise (`plan`).
    ClientSecret(Option<SecretString>),
}

/// What the derivation reads besides the policies and the model.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// The service's base URL (`public_url`): the JWKS URL is derived from it.
    pub public_url: Option<&'a url::Url>,
    /// `[signing] algorithm` (`ES256` or `RS256`).
    pub signing_alg: &'a str,
    /// The clients of `[keycloak.clients.*]`, by `clientId`.
    pub clients: BTreeMap<String, Auth>,
    /// Those of them that use the JWT Authorization Grant.
    pub jwt_clients: BTreeSet<String>,
    /// `[identity]` and `public_url`, when configured.
    pub identity: Option<super::identities::IdentityInputs>,
}

/// A resource server: a bearer-only client with its roles.
#[derive(Debug, Clone)]
pub struct ResourceServer {
    /// `clientId`.
    pub client_id: String,
    /// The managed fields (POST / partial PUT body).
    pub rep: ClientRepresentation,
    /// Its client roles.
    pub roles: BTreeSet<String>,
}

/// A client scope with its mappers and role scope mappings.
#[derive(Debug, Clone)]
pub struct Scope {
    /// Name (what `scope` requests).
    pub name: String,
    /// The managed fields, without mappers.
    pub rep: ClientScopeRepresentation,
    /// Its protocol mappers, by name.
    pub mappers: Vec<ProtocolMapperRepresentation>,
    /// Role scope mappings: resource server → roles.
    pub scope_mappings: BTreeMap<String, BTreeSet<String>>,
}

/// A client the service acts as.
#[derive(Debug)]
pub struct Client {
    /// `clientId`.
    pub client_id: String,
    /// The managed fields (never the secret).
    pub rep: ClientRepresentation,
    /// Default client scopes (only `basic`).
    pub default_scopes: BTreeSet<String>,
    /// Optional client scopes: the scopes its grants name.
    pub optional_scopes: BTreeSet<String>,
    /// Service-account client roles: resource server → roles its scopes carry.
    pub roles: BTreeMap<String, BTreeSet<String>>,
    /// The secret to set (`client_secret_basic`, `apply` only).
    pub secret: Option<SecretString>,
}

/// The whole desired state.
#[derive(Debug)]
pub struct Desired {
    /// The ownership marker's value.
    pub owner: String,
    /// Resource servers, by `clientId` order.
    pub resource_servers: Vec<ResourceServer>,
    /// Client scopes, by name order.
    pub scopes: Vec<Scope>,
    /// Clients the service acts as, by `clientId` order.
    pub clients: Vec<Client>,
    /// Probably-mistakes that do not stop `plan`.
    pub warnings: Vec<String>,
    /// Repository identities, when a client uses the JWT Authorization Grant.
    pub identities: Option<super::identities::Identities>,
}

/// What the grants of one client add up to.
#[derive(Default)]
struct Granted {
    scopes: BTreeSet<String>,
    min_lifetime: Option<u64>,
    max_lifetime: Option<u64>,
    policies: Vec<String>,
}

/// What each configured client's grants add up to, from the policies.
fn grants<'p>(
    policies: &'p [std::sync::Arc<Policy>],
    clients: &BTreeMap<String, Auth>,
    model: &RealmModel,
    errors: &mut Vec<String>,
) -> BTreeMap<&'p str, Granted> {
    let mut granted: BTreeMap<&str, Granted> = BTreeMap::new();
    for p in policies {
        let Some(g) = &p.grant else { continue };
        if !clients.contains_key(&g.client) {
            errors.push(format!(
                "policy `{}`: client `{}` is not configured under [keycloak.clients]",
                p.id, g.client
            ));
            continue;
        }
        let mut audiences = BTreeSet::new();
        for s in &g.scopes {
            match model.scopes.get(s) {
                None => errors.push(format!(
                    "policy `{}`: scope `{s}` is not declared under `scopes` in keycloak/realm.yaml \
                     (which resource server and roles does it carry?)",
                    p.id
                )),
                Some(spec) => {
                    audiences.insert(spec.resource_server.clone());
                }
            }
        }
        if !g.scopes.is_empty() && !audiences.is_empty() && !audiences.contains(&g.audience) {
            errors.push(format!(
                "policy `{}`: grant audience `{}` is not the resource server of any of its scopes \
                 ({}); the token's `aud` would not contain it",
                p.id,
                g.audience,
                join(&audiences)
            ));
        }
        let e = granted.entry(g.client.as_str()).or_default();
        e.scopes.extend(g.scopes.iter().cloned());
        e.min_lifetime = Some(
            e.min_lifetime
                .map_or(g.max_lifetime_seconds, |m| m.min(g.max_lifetime_seconds)),
        );
        e.max_lifetime = Some(
            e.max_lifetime
                .map_or(g.max_lifetime_seconds, |m| m.max(g.max_lifetime_seconds)),
        );
        e.policies.push(p.id.clone());
    }
    granted
}

/// The clients the service acts as may not be built-in ones, resource
/// servers, or model clients the configuration does not name.
fn check_client_names(
    clients: &BTreeMap<String, Auth>,
    model: &RealmModel,
    errors: &mut Vec<String>,
) {
    for id in clients
        .keys()
        .filter(|id| super::model::is_reserved_client(id))
    {
        errors.push(format!(
            "[keycloak.clients.{id}]: `{id}` is one of Keycloak's built-in clients; the service never acts as it"
        ));
    }
    for id in model
        .resource_servers
        .keys()
        .filter(|id| clients.contains_key(*id))
    {
        errors.push(format!(
            "keycloak/realm.yaml: resource server `{id}` is also a client the service acts as ([keycloak.clients.{id}]); use two clients"
        ));
    }
    for id in model.clients.keys() {
        if !clients.contains_key(id) {
            errors.push(format!(
                "keycloak/realm.yaml: `clients.{id}` is not configured under [keycloak.clients]"
            ));
        }
    }
}

/// The model's resource servers: bearer-only clients with their roles.
fn resource_servers(model: &RealmModel, owner: &str) -> Vec<ResourceServer> {
    model
        .resource_servers
        .iter()
        .map(|(id, spec)| ResourceServer {
            client_id: id.clone(),
            rep: ClientRepresentation {
                client_id: Some(id.clone()),
                name: Some(id.clone()),
                description: Some(spec.description.clone().unwrap_or_else(|| {
                    "resource server (audience of keycloak-ci-sts tokens)".into()
                })),
                protocol: Some("openid-connect".into()),
                public_client: Some(false),
                bearer_only: Some(true),
                consent_required: Some(false),
                standard_flow_enabled: Some(false),
                implicit_flow_enabled: Some(false),
                direct_access_grants_enabled: Some(false),
                service_accounts_enabled: Some(false),
                full_scope_allowed: Some(false),
                attributes: Some(to_map(base_attributes(owner))),
                ..Default::default()
            },
            roles: spec.roles.clone(),
        })
        .collect()
}

/// A client's access-token lifespan: the model's, which may not exceed its
/// grants' smallest `max_lifetime_seconds`; else (JWT Authorization Grant:
/// the identity provider cuts each token at its assertion's exp) the longest
/// grant's, or (client_credentials) the shortest's, or 60 s.
fn lifespan(
    id: &str,
    spec: Option<&super::model::ClientSpec>,
    g: &Granted,
    jwt: bool,
    errors: &mut Vec<String>,
) -> u64 {
    let smallest = if jwt { None } else { g.min_lifetime };
    match (spec.and_then(|s| s.access_token_lifespan_seconds), smallest) {
        (Some(l), Some(max)) if l > max => {
            errors.push(format!(
                "keycloak/realm.yaml: `clients.{id}.access_token_lifespan_seconds` = {l} exceeds \
                 the smallest max_lifetime_seconds of its grants ({max}, policies {}): \
                 the service would refuse its tokens (keycloak.lifetime_exceeds_policy)",
                g.policies.join(", ")
            ));
            l
        }
        (Some(l), _) => l,
        (None, _) => g
            .max_lifetime
            .filter(|_| jwt)
            .or(g.min_lifetime)
            .unwrap_or(60),
    }
}

/// How a client authenticates: Keycloak's authenticator, the secret to set
/// and the attributes; `None` (with an error) for `private_key_jwt` without
/// `public_url`.
#[allow(clippy::type_complexity)]
fn authentication(
    id: &str,
    auth: Auth,
    jwks_url: Option<&str>,
    signing_alg: &str,
    errors: &mut Vec<String>,
) -> Option<(
    &'static str,
    Option<SecretString>,
    Vec<(&'static str, String)>,
)> {
    Some(match auth {
        Auth::PrivateKeyJwt => {
            let Some(url) = jwks_url else {
                errors.push(format!(
                    "client `{id}` uses private_key_jwt: set `public_url` in the configuration \
                     (Keycloak fetches <public_url>/.well-known/jwks.json)"
                ));
                return None;
            };
            let attrs = vec![
                ("use.jwks.url", "true".to_string()),
                ("jwks.url", url.to_string()),
                ("token.endpoint.auth.signing.alg", signing_alg.to_string()),
            ];
            ("client-jwt", None, attrs)
        }
        Auth::ClientSecret(secret) => {
            if secret
                .as_ref()
                .is_some_and(|s| s.expose_secret().len() < MIN_SECRET_LEN)
            {
                errors.push(format!(
                    "client `{id}`: the configured secret is shorter than {MIN_SECRET_LEN} characters; apply will not set it"
                ));
            }
            ("client-secret", secret, Vec::new())
        }
    })
}

/// Derives the desired state.
///
/// # Errors
/// Every inconsistency between the configuration, the policies and the model, one
/// line each (a grant's scope the model does not declare, a grant whose audience
/// none of its scopes carries, a lifespan above a grant's `max_lifetime_seconds`,
/// a `private_key_jwt` client without `public_url`, ...).
pub fn derive(
    inputs: Inputs<'_>,
    policies: &[std::sync::Arc<Policy>],
    inventory: &crate::inventory::Inventory,
    model: &RealmModel,
) -> Result<Desired, Vec<String>> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut granted = grants(policies, &inputs.clients, model, &mut errors);
    check_client_names(&inputs.clients, model, &mut errors);
    let jwks_url = inputs
        .public_url
        .map(|u| format!("{}/.well-known/jwks.json", u.as_str().trim_end_matches('/')));
    let owner = model.owner.clone();
    let ctx = ClientContext {
        model,
        owner: &owner,
        jwks_url: jwks_url.as_deref(),
        signing_alg: inputs.signing_alg,
        idp_alias: inputs.identity.as_ref().map(|i| i.alias.as_str()),
    };
    let mut clients = Vec::new();
    for (id, auth) in inputs.clients {
        let g = granted.remove(id.as_str()).unwrap_or_default();
        if g.policies.is_empty() {
            warnings.push(format!(
                "client `{id}` is configured but no policy grants it: provisioned without optional scopes"
            ));
        }
        let jwt = inputs.jwt_clients.contains(&id);
        clients.extend(client(id, auth, g, jwt, &ctx, &mut errors));
    }
    let resource_servers = resource_servers(model, &owner);
    let used: BTreeSet<&String> = clients
        .iter()
        .flat_map(|c| c.optional_scopes.iter())
        .collect();
    let identities = match super::identities::derive(
        inputs.identity.as_ref(),
        &inputs.jwt_clients,
        policies,
        inventory,
        model,
    ) {
        Ok(i) => i,
        Err(e) => {
            errors.extend(e);
            None
        }
    };
    let scopes = scopes(model, &used, identities.is_some(), &mut warnings);
    if errors.is_empty() {
        Ok(Desired {
            owner,
            resource_servers,
            scopes,
            clients,
            warnings,
            identities,
        })
    } else {
        Err(errors)
    }
}

/// What every client the service acts as shares.
struct ClientContext<'a> {
    model: &'a RealmModel,
    owner: &'a str,
    jwks_url: Option<&'a str>,
    signing_alg: &'a str,
    idp_alias: Option<&'a str>,
}

/// One client the service acts as (`jwt`: by the JWT Authorization Grant)
/// with what `g` grants it: representation, scopes, service-account roles.
/// `None` (with errors) when its authentication cannot be provisioned.
fn client(
    id: String,
    auth: Auth,
    g: Granted,
    jwt: bool,
    ctx: &ClientContext<'_>,
    errors: &mut Vec<String>,
) -> Option<Client> {
    let spec = ctx.model.clients.get(&id);
    let lifespan = lifespan(&id, spec, &g, jwt, errors);
    let mut roles: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &g.scopes {
        if let Some(spec) = ctx.model.scopes.get(s) {
            roles
                .entry(spec.resource_server.clone())
                .or_default()
                .extend(spec.roles.iter().cloned());
        }
    }
    let (authenticator, secret, auth_attrs) =
        authentication(&id, auth, ctx.jwks_url, ctx.signing_alg, errors)?;
    let mut attributes = base_attributes(ctx.owner);
    attributes.extend([
        ("access.token.lifespan", lifespan.to_string()),
        ("client_credentials.use_refresh_token", "false".into()),
        ("use.refresh.tokens", "false".into()),
        ("standard.token.exchange.enabled", "false".into()),
        ("oauth2.device.authorization.grant.enabled", "false".into()),
        ("oidc.ciba.grant.enabled", "false".into()),
    ]);
    attributes.extend(auth_attrs);
    attributes.push(("oauth2.jwt.authorization.grant.enabled", jwt.to_string()));
    if jwt {
        if let Some(alias) = ctx.idp_alias {
            attributes.push(("oauth2.jwt.authorization.grant.idp", alias.to_string()));
        }
        roles.clear();
    }
    let rep =
        ClientRepresentation {
            client_id: Some(id.clone()),
            name: Some(id.clone()),
            description: Some(spec.and_then(|s| s.description.clone()).unwrap_or_else(|| {
                format!("keycloak-ci-sts acts as this client ({})", authenticator)
            })),
            protocol: Some("openid-connect".into()),
            public_client: Some(false),
            bearer_only: Some(false),
            consent_required: Some(false),
            standard_flow_enabled: Some(false),
            implicit_flow_enabled: Some(false),
            direct_access_grants_enabled: Some(false),
            // A JWT Authorization Grant client gets user tokens only: no service account.
            service_accounts_enabled: Some(!jwt),
            // Always sent explicitly (CVE-2026-18570: an omitted value bypassed a policy).
            full_scope_allowed: Some(false),
            client_authenticator_type: Some(authenticator.into()),
            attributes: Some(to_map(attributes)),
            ..Default::default()
        };
    let mut default_scopes = BTreeSet::from([BASIC_SCOPE.to_string()]);
    if jwt {
        default_scopes.insert(super::identities::IDENTITY_SCOPE.to_string());
    }
    Some(Client {
        client_id: id,
        rep,
        default_scopes,
        optional_scopes: g.scopes,
        roles,
        secret,
    })
}

/// The model's scopes (a warning for each no policy grants) and, with
/// identities, the identity scope.
fn scopes(
    model: &RealmModel,
    used: &BTreeSet<&String>,
    identities: bool,
    warnings: &mut Vec<String>,
) -> Vec<Scope> {
    let owner = model.owner.as_str();
    let mut scopes: Vec<Scope> = model
        .scopes
        .iter()
        .map(|(name, spec)| {
            if !used.contains(name) {
                warnings.push(format!(
                    "scope `{name}` is declared in keycloak/realm.yaml but no policy grants it"
                ));
            }
            scope(name, spec, owner)
        })
        .collect();
    if identities {
        let (rep, mappers) = super::identities::identity_scope(owner);
        scopes.push(Scope {
            name: super::identities::IDENTITY_SCOPE.to_string(),
            rep,
            mappers,
            scope_mappings: BTreeMap::new(),
        });
    }
    scopes
}

fn base_attributes(owner: &str) -> Vec<(&'static str, String)> {
    vec![(OWNER_ATTRIBUTE, owner.to_string())]
}

fn to_map(v: Vec<(&'static str, String)>) -> HashMap<String, String> {
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// A client scope: `include.in.token.scope` so the granted scope shows in
/// `scope`, an audience mapper naming its resource server, a client-role mapper so
/// the resource server's roles appear in `resource_access`, and the role scope
/// mapping.
fn scope(name: &str, spec: &super::model::ScopeSpec, owner: &str) -> Scope {
    let rs = &spec.resource_server;
    let mut attributes = base_attributes(owner);
    attributes.extend([
        ("include.in.token.scope", "true".to_string()),
        ("display.on.consent.screen", "false".to_string()),
    ]);
    let mapper =
        |n: &str, kind: &str, config: Vec<(&'static str, String)>| ProtocolMapperRepresentation {
            name: Some(n.to_string()),
            protocol: Some("openid-connect".into()),
            protocol_mapper: Some(kind.to_string()),
            config: Some(to_map(config)),
            ..Default::default()
        };
    let token_claims = || {
        vec![
            ("access.token.claim", "true".to_string()),
            ("introspection.token.claim", "true".to_string()),
            ("id.token.claim", "false".to_string()),
        ]
    };
    let mut aud = token_claims();
    aud.push(("included.client.audience", rs.clone()));
    let mut roles = token_claims();
    roles.extend([
        ("usermodel.clientRoleMapping.clientId", rs.clone()),
        // `${client_id}` is Keycloak's own form: it escapes dots in the clientId,
        // which a literal name would turn into nested claims.
        (
            "claim.name",
            "resource_access.${client_id}.roles".to_string(),
        ),
        ("jsonType.label", "String".to_string()),
        ("multivalued", "true".to_string()),
        ("userinfo.token.claim", "false".to_string()),
    ]);
    Scope {
        name: name.to_string(),
        rep: ClientScopeRepresentation {
            name: Some(name.to_string()),
            description: Some(
                spec.description
                    .clone()
                    .unwrap_or_else(|| format!("roles {} of {rs}", join(&spec.roles))),
            ),
            protocol: Some("openid-connect".into()),
            attributes: Some(to_map(attributes)),
            ..Default::default()
        },
        mappers: vec![
            mapper(&format!("audience {rs}"), "oidc-audience-mapper", aud),
            mapper(
                &format!("client roles {rs}"),
                "oidc-usermodel-client-role-mapper",
                roles,
            ),
        ],
        scope_mappings: BTreeMap::from([(rs.clone(), spec.roles.clone())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile_str;

    const MODEL: &str = "
resource_servers:
  deploy-api: {roles: [deploy]}
  artifact-api: {roles: [read, write]}
scopes:
  deploy:production: {resource_server: deploy-api, roles: [deploy]}
  artifacts:read: {resource_server: artifact-api, roles: [read]}
";

    fn policy(id: &str, client: &str, audience: &str, scopes: &str, max: u64) -> Policy {
        let text = format!(
            "effect: allow\nwhen:\n  workspaceUuid: \"{{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}}\"\n\
             grant:\n  client: {client}\n  audience: {audience}\n  scopes: [{scopes}]\n  default_scopes: [{first}]\n  max_lifetime_seconds: {max}\n",
            first = scopes.split(',').next().unwrap_or_default()
        );
        compile_str(id, &text, None).unwrap()
    }

    fn inputs<'a>(url: Option<&'a url::Url>) -> Inputs<'a> {
        Inputs {
            public_url: url,
            signing_alg: "ES256",
            clients: BTreeMap::from([
                ("sts-deploy".to_string(), Auth::PrivateKeyJwt),
                ("sts-artifacts".to_string(), Auth::ClientSecret(None)),
            ]),
            jwt_clients: BTreeSet::new(),
            identity: None,
        }
    }

    fn model(extra: &str) -> RealmModel {
        RealmModel::from_str(&format!("{MODEL}{extra}"), "realm.yaml").unwrap()
    }

    #[test]
    fn clients_get_their_grants_scopes_roles_and_the_smallest_lifetime() {
        let url = url::Url::parse("https://sts.example.com").unwrap();
        let policies = [
            policy(
                "a",
                "sts-deploy",
                "deploy-api",
                "\"deploy:production\", \"artifacts:read\"",
                300,
            ),
            policy("b", "sts-deploy", "artifact-api", "\"artifacts:read\"", 90),
            policy(
                "c",
                "sts-artifacts",
                "artifact-api",
                "\"artifacts:read\"",
                600,
            ),
        ];
        let d = derive(
            inputs(Some(&url)),
            &policies.map(std::sync::Arc::new),
            &crate::inventory::Inventory::default(),
            &model(""),
        )
        .unwrap();
        let deploy = d
            .clients
            .iter()
            .find(|c| c.client_id == "sts-deploy")
            .unwrap();
        let attrs = deploy.rep.attributes.as_ref().unwrap();
        assert_eq!(attrs["access.token.lifespan"], "90");
        assert_eq!(
            attrs["jwks.url"],
            "https://sts.example.com/.well-known/jwks.json"
        );
        assert_eq!(attrs["token.endpoint.auth.signing.alg"], "ES256");
        assert_eq!(attrs[OWNER_ATTRIBUTE], "keycloak-ci-sts");
        assert_eq!(deploy.rep.full_scope_allowed, Some(false));
        assert_eq!(deploy.rep.secret, None);
        assert_eq!(
            deploy.optional_scopes,
            BTreeSet::from([
                "artifacts:read".to_string(),
                "deploy:production".to_string()
            ])
        );
        assert_eq!(
            deploy.roles["deploy-api"],
            BTreeSet::from(["deploy".to_string()])
        );
        assert_eq!(
            deploy.roles["artifact-api"],
            BTreeSet::from(["read".to_string()])
        );
        let artifacts = d
            .clients
            .iter()
            .find(|c| c.client_id == "sts-artifacts")
            .unwrap();
        assert_eq!(
            artifacts.rep.client_authenticator_type.as_deref(),
            Some("client-secret")
        );
        assert!(!artifacts
            .rep
            .attributes
            .as_ref()
            .unwrap()
            .contains_key("jwks.url"));
        let scope = d
            .scopes
            .iter()
            .find(|s| s.name == "deploy:production")
            .unwrap();
        assert_eq!(scope.mappers.len(), 2);
        assert_eq!(
            scope.mappers[0].config.as_ref().unwrap()["included.client.audience"],
            "deploy-api"
        );
    }

    #[test]
    fn every_disagreement_is_one_error_line() {
        let policies = [
            policy(
                "undeclared",
                "sts-deploy",
                "deploy-api",
                "\"deploy:staging\"",
                300,
            ),
            policy(
                "wrong-aud",
                "sts-artifacts",
                "deploy-api",
                "\"artifacts:read\"",
                300,
            ),
            policy(
                "unknown-client",
                "sts-other",
                "deploy-api",
                "\"deploy:production\"",
                300,
            ),
        ];
        let m = model("clients:\n  sts-artifacts: {access_token_lifespan_seconds: 900}\n");
        let e = derive(
            inputs(None),
            &policies.map(std::sync::Arc::new),
            &crate::inventory::Inventory::default(),
            &m,
        )
        .unwrap_err();
        let all = e.join("\n");
        assert!(
            all.contains("scope `deploy:staging` is not declared"),
            "{all}"
        );
        assert!(
            all.contains("grant audience `deploy-api` is not the resource server"),
            "{all}"
        );
        assert!(
            all.contains("client `sts-other` is not configured"),
            "{all}"
        );
        assert!(
            all.contains("exceeds the smallest max_lifetime_seconds"),
            "{all}"
        );
        assert!(all.contains("set `public_url`"), "{all}");
        assert_eq!(e.len(), 5, "{all}");
    }

    #[test]
    fn policies_admitting_one_identity_must_name_the_same_groups() {
        let inventory =
            crate::inventory::Inventory::new(vec![crate::inventory::WorkspaceInventory {
                workspace: "acme".into(),
                workspace_uuid: crate::domain::BbUuid::parse_lenient(
                    "03b741e3-cf4a-41f9-9a59-cec52e21bdc3",
                )
                .unwrap(),
                repositories: vec![crate::inventory::Repository {
                    uuid: crate::domain::BbUuid::parse_lenient(
                        "d4e45493-4a33-477d-917b-a24e7e4bd39b",
                    )
                    .unwrap(),
                    full_name: "acme/deploy-service".into(),
                    protections: None,
                    project: None,
                    environments: Vec::new(),
                }],
            }])
            .unwrap();
        let jwt_policy = |id: &str, branch: &str, group: &str| {
            let text = [
                "effect: allow",
                "when:",
                "  workspaceUuid: \"{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}\"",
                &format!("  branchName: \"{branch}\""),
                "grant:",
                "  client: sts-deploy",
                "  audience: deploy-api",
                "  scopes: [\"deploy:production\"]",
                "  default_scopes: [\"deploy:production\"]",
                "  max_lifetime_seconds: 60",
                &format!("  groups: [{group}]"),
            ]
            .join("\n");
            compile_str(id, &text, None).unwrap()
        };
        let m = model(
            "groups:\n  a: {roles: {deploy-api: [deploy]}}\n  b: {roles: {deploy-api: [deploy]}}\n",
        );
        let url = url::Url::parse("https://sts.example.com").unwrap();
        let mut i = inputs(Some(&url));
        i.jwt_clients.insert("sts-deploy".into());
        i.identity = Some(crate::provision::identities::IdentityInputs {
            issuer: "https://sts.example.com".into(),
            alias: "keycloak-ci-sts".into(),
            algorithm: "ES256".into(),
            realm: "ci".into(),
        });
        let e = derive(
            i,
            &[
                jwt_policy("main", "main", "a").into(),
                jwt_policy("any", "**", "b").into(),
            ],
            &inventory,
            &m,
        )
        .unwrap_err()
        .join("\n");
        assert!(
            e.contains(
                "policies `main` (groups a) and `any` (groups b) both admit acme/deploy-service"
            ),
            "{e}"
        );
    }

    #[test]
    fn built_in_clients_are_refused_as_servers_and_as_acting_clients() {
        let e = RealmModel::from_str(
            "resource_servers:\n  realm-management: {roles: [manage-users]}\n",
            "m",
        )
        .unwrap_err();
        assert!(e[0].reason.contains("built-in"), "{e:?}");
        let mut i = inputs(None);
        i.clients
            .insert("admin-cli".into(), Auth::ClientSecret(None));
        let e = derive(i, &[], &crate::inventory::Inventory::default(), &model("")).unwrap_err();
        assert!(e
            .join("\n")
            .contains("`admin-cli` is one of Keycloak's built-in clients"));
    }
}
