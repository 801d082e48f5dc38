//! The live realm as `plan` needs it, read with view-only roles (`view-clients`,
//! `view-users`). Every list that grows with the realm is read to its end in
//! pages ([`Admin::list`]) or, where Keycloak does not page it, whole with the
//! size cap ([`Admin::get_capped`]).

use std::collections::{BTreeMap, BTreeSet};

use ::keycloak::types::{ClientRepresentation, ClientScopeRepresentation};

use super::admin::{Admin, AdminError};
use super::desired::Desired;
use super::realm::{direct_roles, mapping_roles, owned_by};

/// Details of one client that `plan` compares beyond its representation.
#[derive(Debug, Default, Clone)]
pub struct ClientDetails {
    /// Names of its default client scopes.
    pub default_scopes: BTreeSet<String>,
    /// Names of its optional client scopes.
    pub optional_scopes: BTreeSet<String>,
    /// Its service-account user's id, when service accounts are on.
    pub service_account: Option<String>,
    /// The service account's roles, by `clientId` (realm roles under
    /// [`super::realm::REALM_KEY`], without the realm's `default-roles-<realm>`).
    pub roles: BTreeMap<String, BTreeSet<String>>,
    /// The service account's group paths.
    pub groups: BTreeSet<String>,
    /// The client's own role scope mappings, by `clientId` (realm under [`super::realm::REALM_KEY`]).
    pub scope_mappings: BTreeMap<String, BTreeSet<String>>,
}

/// The live state of the realm.
#[derive(Debug, Default)]
pub struct Live {
    /// Every client, by `clientId`.
    pub clients: BTreeMap<String, ClientRepresentation>,
    /// Every client scope (with its mappers), by name.
    pub scopes: BTreeMap<String, ClientScopeRepresentation>,
    /// Details of the clients the service acts as (desired or owned), by `clientId`.
    pub details: BTreeMap<String, ClientDetails>,
    /// Role scope mappings of desired or owned scopes: scope → `clientId` (or
    /// `(realm)`) → roles.
    pub scope_mappings: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    /// Client roles of desired or owned resource servers, by `clientId`.
    pub roles: BTreeMap<String, BTreeSet<String>>,
    /// Composite roles among those (they grant other roles), as `clientId/role`.
    pub composite_roles: BTreeSet<String>,
    /// The identity objects, when the desired state has identities.
    pub identities: Option<super::identities::LiveIdentities>,
}

fn names(v: Vec<ClientScopeRepresentation>) -> BTreeSet<String> {
    v.into_iter().filter_map(|s| s.name).collect()
}

impl Live {
    /// Reads every client and client scope, then the details of the objects the
    /// desired state names or `owner` owns, then the identity objects when the
    /// desired state has identities.
    ///
    /// # Errors
    /// The first refused or failed call.
    pub async fn read(admin: &Admin, desired: &Desired) -> Result<Self, AdminError> {
        let mut live = Self::read_realm(admin, desired).await?;
        if let Some(want) = &desired.identities {
            let alias = want.provider.alias.clone().unwrap_or_default();
            live.identities = Some(
                super::identities::LiveIdentities::read(admin, want, &alias, &live.clients).await?,
            );
        }
        Ok(live)
    }

    /// As [`Live::read`] without the identity objects: what the first pass
    /// (clients, scopes, resource servers) compares.
    ///
    /// # Errors
    /// The first refused or failed call.
    pub async fn read_realm(admin: &Admin, desired: &Desired) -> Result<Self, AdminError> {
        let mut live = Live::default();
        let clients: Vec<ClientRepresentation> =
            admin.list("/clients", &[], "read clients").await?;
        for c in clients {
            if let Some(id) = c.client_id.clone() {
                live.clients.insert(id, c);
            }
        }
        // Not paged by Keycloak: read whole, with the size cap.
        let scopes: Vec<ClientScopeRepresentation> = admin
            .get_capped("/client-scopes", &[], "read client scopes")
            .await?;
        for s in scopes {
            if let Some(n) = s.name.clone() {
                live.scopes.insert(n, s);
            }
        }
        live.read_clients(admin, desired).await?;
        live.read_scope_mappings(admin, desired).await?;
        Ok(live)
    }

    /// The details of the clients the service acts as (desired, or owned
    /// with a service account), and the roles of resource servers (desired,
    /// or owned and bearer-only).
    async fn read_clients(&mut self, admin: &Admin, desired: &Desired) -> Result<(), AdminError> {
        let live = self;
        let owner = desired.owner.as_str();
        let acting: BTreeSet<&str> = desired
            .clients
            .iter()
            .map(|c| c.client_id.as_str())
            .collect();
        let servers: BTreeSet<&str> = desired
            .resource_servers
            .iter()
            .map(|r| r.client_id.as_str())
            .collect();
        let mut detail_ids = Vec::new();
        let mut role_ids = Vec::new();
        for (id, c) in &live.clients {
            let mine = owned_by(c.attributes.as_ref(), owner);
            let Some(uuid) = c.id.clone() else { continue };
            if acting.contains(id.as_str()) || (mine && c.service_accounts_enabled == Some(true)) {
                detail_ids.push((id.clone(), uuid.clone()));
            }
            if servers.contains(id.as_str()) || (mine && c.bearer_only == Some(true)) {
                role_ids.push((id.clone(), uuid));
            }
        }
        for (id, uuid) in detail_ids {
            let d = live.client_details(admin, &id, &uuid).await?;
            live.details.insert(id, d);
        }
        for (id, uuid) in role_ids {
            let roles: Vec<::keycloak::types::RoleRepresentation> = admin
                .list(
                    &format!("/clients/{}/roles", Admin::seg(&uuid)),
                    &[("briefRepresentation", "true".into())],
                    &format!("read roles of client {id}"),
                )
                .await?;
            live.roles
                .insert(id, roles.into_iter().filter_map(|r| r.name).collect());
        }
        Ok(())
    }

    /// The role scope mappings of the desired, owned and built-in default scopes.
    async fn read_scope_mappings(
        &mut self,
        admin: &Admin,
        desired: &Desired,
    ) -> Result<(), AdminError> {
        let (live, realm, owner) = (self, admin.realm.as_str(), desired.owner.as_str());
        let wanted: BTreeSet<&str> = desired.scopes.iter().map(|s| s.name.as_str()).collect();
        let scope_ids: Vec<(String, String)> = live
            .scopes
            .iter()
            .filter(|(n, s)| {
                wanted.contains(n.as_str())
                    || owned_by(s.attributes.as_ref(), owner)
                    || super::realm::BUILT_IN_DEFAULTS.iter().any(|(b, _)| b == n)
            })
            .filter_map(|(n, s)| Some((n.clone(), s.id.clone()?)))
            .collect();
        for (name, id) in scope_ids {
            // Deprecated in the OpenAPI document, still served by 26.4-26.7 (tested):
            // the one call that shows every role a scope maps, realm and client.
            #[allow(deprecated)]
            let m = admin
                .run(
                    format!("read scope mappings of client scope {name}"),
                    || {
                        admin
                            .api
                            .realm_client_scopes_with_client_scope_id_scope_mappings_get(realm, &id)
                    },
                )
                .await?;
            live.scope_mappings.insert(name, mapping_roles(m));
        }
        Ok(())
    }

    /// The live `enabled` of the object `plan` calls `kind` `name` (`None` for
    /// kinds without one, and for objects that do not exist).
    pub fn enabled(&self, kind: super::diff::Kind, name: &str) -> Option<bool> {
        use super::diff::Kind;
        match kind {
            Kind::ResourceServer | Kind::Client => self.clients.get(name)?.enabled,
            Kind::Scope | Kind::IdentityProvider | Kind::UserProfile | Kind::Group | Kind::User => {
                self.identities.as_ref()?.enabled(kind, name)
            }
        }
    }

    async fn client_details(
        &self,
        admin: &Admin,
        id: &str,
        uuid: &str,
    ) -> Result<ClientDetails, AdminError> {
        let realm = admin.realm.as_str();
        let api = &admin.api;
        let default_scopes = admin
            .run(format!("read default client scopes of {id}"), || {
                api.realm_clients_with_client_uuid_default_client_scopes_get(realm, uuid)
            })
            .await?;
        let optional_scopes = admin
            .run(format!("read optional client scopes of {id}"), || {
                api.realm_clients_with_client_uuid_optional_client_scopes_get(realm, uuid)
            })
            .await?;
        // Deprecated in the OpenAPI document, still served by 26.4-26.7 (tested).
        #[allow(deprecated)]
        let own = admin
            .run(format!("read the scope mappings of {id}"), || {
                api.realm_clients_with_client_uuid_scope_mappings_get(realm, uuid)
            })
            .await?;
        let mut d = ClientDetails {
            default_scopes: names(default_scopes),
            optional_scopes: names(optional_scopes),
            scope_mappings: mapping_roles(own),
            ..Default::default()
        };
        let has_sa = self
            .clients
            .get(id)
            .and_then(|c| c.service_accounts_enabled)
            == Some(true);
        if has_sa {
            let user = admin
                .run(format!("read the service-account user of {id}"), || {
                    api.realm_clients_with_client_uuid_service_account_user_get(realm, uuid)
                })
                .await?;
            if let Some(uid) = user.id {
                let m = admin
                    .run(format!("read the service-account roles of {id}"), || {
                        api.realm_users_with_user_id_role_mappings_get(realm, &uid)
                    })
                    .await?;
                d.roles = direct_roles(m, &admin.realm);
                let groups: Vec<::keycloak::types::GroupRepresentation> = admin
                    .list(
                        &format!("/users/{}/groups", Admin::seg(&uid)),
                        &[("briefRepresentation", "true".into())],
                        &format!("read the service account's groups of {id}"),
                    )
                    .await?;
                d.groups = groups.into_iter().filter_map(|g| g.path).collect();
                d.service_account = Some(uid);
            }
        }
        Ok(d)
    }
}
