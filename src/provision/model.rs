//! The realm model: `<policies_dir>/keycloak/realm.yaml`, the reviewed file that
//! says what the policies cannot — which resource servers (APIs) exist with which
//! roles, and which roles each scope carries. Read strictly (unknown fields,
//! anchors and aliases refused), like the policies.
//!
//! ```yaml
//! resource_servers:
//!   deploy-api:
//!     description: Deploy API
//!     roles: [deploy]
//! scopes:
//!   deploy:production:
//!     resource_server: deploy-api
//!     roles: [deploy]
//! clients:                      # optional, per client the service acts as
//!   sts-deploy:
//!     access_token_lifespan_seconds: 120
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::SourceError;

/// The model file, relative to the policies directory.
pub const MODEL_FILE: &str = "keycloak/realm.yaml";

/// Largest model file read, in bytes.
pub const MAX_MODEL_BYTES: u64 = 256 * 1024;

/// The default ownership marker value (`owner`).
pub const DEFAULT_OWNER: &str = "keycloak-ci-sts";

/// The realm model (`policies/keycloak/realm.yaml`): what `keycloak plan` and
/// `keycloak apply` keep in the realm beside what the policies imply.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RealmModel {
    /// Value of the ownership attribute (`keycloak-ci-sts.owner`) on every object
    /// `apply` creates; only objects carrying it are changed or removed. Lower-case
    /// letters, digits and `-`, 1 to 64 characters. Defaults to `keycloak-ci-sts`;
    /// set another one when two deployments share a realm.
    #[serde(default = "default_owner")]
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,64}$"))]
    pub owner: String,
    /// Resource servers by `clientId` (a token's `aud`): bearer-only clients whose
    /// client roles the scopes carry.
    #[serde(default, deserialize_with = "unique")]
    #[schemars(schema_with = "crate::domain::json_schema::nullable_map::<ResourceServerSpec>")]
    pub resource_servers: BTreeMap<String, ResourceServerSpec>,
    /// Client scopes by name: every scope a policy grant names must be here.
    #[serde(default, deserialize_with = "unique")]
    #[schemars(schema_with = "crate::domain::json_schema::nullable_map::<ScopeSpec>")]
    pub scopes: BTreeMap<String, ScopeSpec>,
    /// Optional settings per client the service acts as (`[keycloak.clients.*]`).
    #[serde(default, deserialize_with = "unique")]
    #[schemars(schema_with = "crate::domain::json_schema::nullable_map::<ClientSpec>")]
    pub clients: BTreeMap<String, ClientSpec>,
    /// Keycloak groups that grants of JWT Authorization Grant clients may name
    /// (the allow-list), by top-level group name: `apply` creates them with exactly
    /// these client roles of resource servers.
    #[serde(default, deserialize_with = "unique")]
    #[schemars(schema_with = "crate::domain::json_schema::nullable_map::<GroupSpec>")]
    pub groups: BTreeMap<String, GroupSpec>,
}

/// A group of repository identities.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Shown in the admin console.
    pub description: Option<String>,
    /// Client roles its members hold, by resource server (only servers declared
    /// under `resource_servers`; Keycloak's own clients are refused).
    #[serde(deserialize_with = "unique")]
    #[schemars(schema_with = "crate::domain::json_schema::nullable_map::<BTreeSet<String>>")]
    pub roles: BTreeMap<String, BTreeSet<String>>,
}

/// A mapping whose keys must be unique: YAML parsers keep the last of two equal
/// keys, so a reviewer could read one entry while another is applied.
fn unique<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Visitor<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a mapping")
        }
        /// `key: null` means none, as `key:` (which YAML reads as an empty
        /// mapping here) and a missing key do.
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = m.next_entry::<String, V>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!("`{k}` is listed twice")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Visitor(std::marker::PhantomData))
}

fn default_owner() -> String {
    DEFAULT_OWNER.to_string()
}

/// A resource server.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceServerSpec {
    /// Shown in the admin console.
    pub description: Option<String>,
    /// Its client roles.
    pub roles: BTreeSet<String>,
}

/// A client scope.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScopeSpec {
    /// Shown in the admin console.
    pub description: Option<String>,
    /// The resource server it is for: its audience mapper puts this `clientId`
    /// into `aud`, and the roles below are this client's roles.
    pub resource_server: String,
    /// Roles of the resource server the scope carries (scope role mapping).
    pub roles: BTreeSet<String>,
}

/// Settings of a client the service acts as that the policies do not imply.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientSpec {
    /// Shown in the admin console.
    pub description: Option<String>,
    /// Keycloak's `access.token.lifespan`, seconds; at most the smallest
    /// `max_lifetime_seconds` of the client's grants (the default).
    pub access_token_lifespan_seconds: Option<u64>,
}

impl RealmModel {
    /// The JSON Schema of the realm model file, draft-07 (see
    /// [`crate::domain::json_schema::draft07`]), committed as
    /// `docs/src/schemas/realm-model.schema.json`.
    pub fn schema() -> serde_json::Value {
        crate::domain::json_schema::draft07::<Self>()
    }

    /// Reads `<policies_dir>/keycloak/realm.yaml`.
    ///
    /// # Errors
    /// Every problem, naming the file and key.
    pub fn load(policies_dir: &Path) -> Result<Self, Vec<SourceError>> {
        let path: PathBuf = policies_dir.join(MODEL_FILE);
        let file = path.display().to_string();
        let err = |key: &str, reason: String| SourceError {
            file: file.clone(),
            key: key.to_string(),
            reason,
        };
        let meta = std::fs::metadata(&path).map_err(|e| {
            vec![err(
                "",
                format!(
                    "cannot read the realm model ({e}); `keycloak plan` needs it, see docs/src/keycloak.md"
                ),
            )]
        })?;
        if !meta.is_file() || meta.len() > MAX_MODEL_BYTES {
            return Err(vec![err(
                "",
                format!("must be a regular file of at most {MAX_MODEL_BYTES} bytes"),
            )]);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| vec![err("", e.to_string())])?;
        Self::from_str(&text, &file)
    }

    /// Parses and checks a model text; `file` names it in errors.
    ///
    /// # Errors
    /// Every problem, naming the file and key.
    pub fn from_str(text: &str, file: &str) -> Result<Self, Vec<SourceError>> {
        let err = |key: &str, reason: String| SourceError {
            file: file.to_string(),
            key: key.to_string(),
            reason,
        };
        crate::domain::yaml::refuse_anchors_and_aliases(text).map_err(|r| vec![err("", r)])?;
        // Read as written (errors with line and column, a key listed twice),
        // then as the document's values written again, where an empty value is
        // `null`: the text reader alone takes `x:` as an empty mapping or list
        // and refuses `x: null`; now both are refused the same way.
        let de = serde_norway::Deserializer::from_str(text);
        let _: RealmModel = serde_path_to_error::deserialize(de)
            .map_err(|e| vec![err(&e.path().to_string(), e.inner().to_string())])?;
        let canonical = serde_norway::from_str::<serde_norway::Value>(text)
            .and_then(|v| serde_norway::to_string(&v))
            .map_err(|e| vec![err("", e.to_string())])?;
        let de = serde_norway::Deserializer::from_str(&canonical);
        let model: RealmModel = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.inner().to_string();
            let what = inner.split(" at line ").next().unwrap_or_default();
            vec![err(
                &key,
                format!("{what} (an empty value is null: write `{{}}` or `[]` for none)"),
            )]
        })?;
        let problems = model.problems();
        if problems.is_empty() {
            Ok(model)
        } else {
            Err(problems.into_iter().map(|(k, r)| err(&k, r)).collect())
        }
    }

    /// `(key, reason)` for every inconsistency inside the file.
    fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let owner_ok = (1..=64).contains(&self.owner.len())
            && self
                .owner
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !owner_ok {
            out.push((
                "owner".into(),
                "use 1 to 64 lower-case letters, digits and `-`".into(),
            ));
        }
        self.resource_server_problems(&mut out);
        self.scope_problems(&mut out);
        self.group_problems(&mut out);
        for (id, c) in &self.clients {
            if c.access_token_lifespan_seconds == Some(0) {
                out.push((
                    format!("clients.{id}.access_token_lifespan_seconds"),
                    "must be at least 1 (0 means the realm default in Keycloak)".into(),
                ));
            }
        }
        out
    }

    /// Resource servers: client ids and role names Keycloak and apply accept.
    fn resource_server_problems(&self, out: &mut Vec<(String, String)>) {
        for (id, rs) in &self.resource_servers {
            if let Err(r) = client_id(id) {
                out.push((format!("resource_servers.{id}"), r));
            }
            if is_reserved_client(id) {
                out.push((
                    format!("resource_servers.{id}"),
                    format!("`{id}` is one of Keycloak's built-in clients; its roles are not for pipelines"),
                ));
            }
            for role in &rs.roles {
                if let Err(r) = name(role) {
                    out.push((format!("resource_servers.{id}.roles"), r));
                }
            }
        }
    }

    /// Scopes: RFC 6749 scope tokens, not built-in, naming roles of a declared
    /// resource server.
    fn scope_problems(&self, out: &mut Vec<(String, String)>) {
        for (scope, spec) in &self.scopes {
            let key = format!("scopes.{scope}");
            if !crate::domain::oauth::is_scope_token(scope) || scope.len() > 128 {
                out.push((
                    key.clone(),
                    "not an RFC 6749 §3.3 scope token of at most 128 characters".into(),
                ));
            }
            if RESERVED_SCOPES.contains(&scope.as_str()) {
                out.push((
                    key.clone(),
                    format!("`{scope}` is one of Keycloak's built-in scopes; the clients get it as a default scope"),
                ));
            }
            match self.resource_servers.get(&spec.resource_server) {
                None => out.push((
                    format!("{key}.resource_server"),
                    format!("`{}` is not under resource_servers", spec.resource_server),
                )),
                Some(rs) => {
                    for role in spec.roles.difference(&rs.roles) {
                        out.push((
                            format!("{key}.roles"),
                            format!(
                                "`{role}` is not a role of resource server `{}` (its roles: {})",
                                spec.resource_server,
                                join(&rs.roles)
                            ),
                        ));
                    }
                }
            }
            if spec.roles.is_empty() {
                out.push((
                    format!("{key}.roles"),
                    "name at least one role: a scope without roles authorizes nothing".into(),
                ));
            }
        }
    }

    /// Groups: top-level names carrying roles of declared resource servers.
    fn group_problems(&self, out: &mut Vec<(String, String)>) {
        for (g, spec) in &self.groups {
            let key = format!("groups.{g}");
            if !role_name_ok(g) {
                out.push((
                    key.clone(),
                    "a top-level group name: 1 to 255 characters, no `/`, not `.` or `..`".into(),
                ));
            }
            for (rs, roles) in &spec.roles {
                match self.resource_servers.get(rs) {
                    None => out.push((
                        format!("{key}.roles.{rs}"),
                        format!("`{rs}` is not under resource_servers (groups carry roles of resource servers only)"),
                    )),
                    Some(server) => {
                        for r in roles.difference(&server.roles) {
                            out.push((format!("{key}.roles.{rs}"), format!("`{r}` is not a role of `{rs}`")));
                        }
                    }
                }
            }
        }
    }
}

/// Keycloak's built-in client scopes, which the model may not redefine.
pub const RESERVED_SCOPES: &[&str] = &[
    "basic",
    "openid",
    "profile",
    "email",
    "roles",
    "web-origins",
    "acr",
    "address",
    "phone",
    "offline_access",
    "microprofile-jwt",
    "organization",
    "service_account",
];

/// Keycloak's built-in clients (and the `<realm>-realm` clients of the master
/// realm): never a resource server nor a client the service acts as, since their
/// roles administer Keycloak itself.
pub fn is_reserved_client(id: &str) -> bool {
    const BUILT_IN: &[&str] = &[
        "realm-management",
        "broker",
        "account",
        "account-console",
        "admin-cli",
        "security-admin-console",
    ];
    BUILT_IN.contains(&id) || id.ends_with("-realm")
}

/// A `clientId` the model may name: printable ASCII without spaces or `/`,
/// 1 to 255 characters.
fn client_id(s: &str) -> Result<(), String> {
    let ok = (1..=255).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if ok {
        Ok(())
    } else {
        Err("a clientId is 1 to 255 printable ASCII characters without spaces or `/`".into())
    }
}

/// Whether a role name is one `apply` can address in an Admin API path: 1 to
/// 255 characters, no control characters, no surrounding spaces, no `/`, and not
/// `.` or `..` (a URL path would resolve those to the client itself).
pub fn role_name_ok(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.trim() == s
        && !s.chars().any(char::is_control)
        && !s.contains('/')
        && s != "."
        && s != ".."
}

fn name(s: &str) -> Result<(), String> {
    if role_name_ok(s) {
        Ok(())
    } else {
        Err(format!(
            "`{s}`: 1 to 255 characters, no control characters, surrounding spaces or `/`, not `.` or `..`"
        ))
    }
}

/// `a, b, c`, or `(none)`.
pub fn join<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let v: Vec<&str> = items.into_iter().map(String::as_str).collect();
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
resource_servers:
  deploy-api:
    roles: [deploy]
scopes:
  deploy:production:
    resource_server: deploy-api
    roles: [deploy]
";

    /// Found by the `realm_model` fuzz target (`round-trips`): `groups:` (an
    /// empty value) was accepted, `groups: null` (the same, written again)
    /// refused. Both mean none, as a missing key does.
    #[test]
    fn an_empty_or_null_section_means_none() {
        for text in ["groups:\n", "groups: null\n", "groups: ~\n", "owner: x\n"] {
            let m = RealmModel::from_str(text, "m.yaml").unwrap();
            assert!(m.groups.is_empty(), "{text}");
        }
    }

    /// The same fuzz finding one level down: `sts-deploy:` (empty) was taken
    /// as a client with default settings, `sts-deploy: null` refused.
    #[test]
    fn an_empty_entry_is_refused_as_null_is() {
        for text in [
            "clients:\n  sts-deploy:\n",
            "clients:\n  sts-deploy: null\n",
        ] {
            let e = RealmModel::from_str(text, "m.yaml").unwrap_err();
            assert_eq!(e[0].key, "clients.sts-deploy", "{text}: {e:?}");
        }
        assert!(RealmModel::from_str("clients:\n  sts-deploy: {}\n", "m.yaml").is_ok());
    }

    #[test]
    fn a_good_model_parses_with_the_default_owner() {
        let m = RealmModel::from_str(GOOD, "m.yaml").unwrap();
        assert_eq!(m.owner, DEFAULT_OWNER);
        assert_eq!(m.scopes["deploy:production"].resource_server, "deploy-api");
    }

    #[test]
    fn unknown_fields_undeclared_roles_and_servers_are_refused_with_keys() {
        let e = RealmModel::from_str(
            &GOOD.replace("roles: [deploy]\n", "roles: [deploy]\n    lifespan: 3\n"),
            "m.yaml",
        )
        .unwrap_err();
        assert!(e[0].to_string().contains("unknown field"), "{e:?}");
        let e = RealmModel::from_str(
            &format!("{GOOD}  x:\n    resource_server: nope\n    roles: [a]\n"),
            "m.yaml",
        )
        .unwrap_err();
        assert_eq!(e[0].key, "scopes.x.resource_server", "{e:?}");
        let e = RealmModel::from_str(&GOOD.replace("    roles: [deploy]\n\"", ""), "m.yaml")
            .map(|_| ());
        assert!(e.is_ok());
        let e = RealmModel::from_str(
            &format!("{GOOD}  y:\n    resource_server: deploy-api\n    roles: [admin]\n"),
            "m.yaml",
        )
        .unwrap_err();
        assert_eq!(e[0].key, "scopes.y.roles");
        assert!(e[0].reason.contains("`admin` is not a role"), "{e:?}");
    }

    #[test]
    fn built_in_scopes_owner_syntax_and_empty_roles_are_refused() {
        let e = RealmModel::from_str(
            &format!("{GOOD}  basic:\n    resource_server: deploy-api\n    roles: [deploy]\n"),
            "m",
        )
        .unwrap_err();
        assert!(e[0].reason.contains("built-in"), "{e:?}");
        let e = RealmModel::from_str(&format!("owner: Team A\n{GOOD}"), "m").unwrap_err();
        assert_eq!(e[0].key, "owner");
        let e = RealmModel::from_str(
            &format!("{GOOD}  z:\n    resource_server: deploy-api\n    roles: []\n"),
            "m",
        )
        .unwrap_err();
        assert!(e[0].reason.contains("at least one role"), "{e:?}");
    }

    #[test]
    fn duplicate_entries_and_unaddressable_role_names_are_refused() {
        let twice = format!(
            "{GOOD}  deploy:production:\n    resource_server: deploy-api\n    roles: [deploy]\n"
        );
        let e = RealmModel::from_str(&twice, "m").unwrap_err();
        assert!(e[0].to_string().contains("listed twice"), "{e:?}");
        for bad in ["..", ".", "a/b"] {
            let m = GOOD.replace(
                "roles: [deploy]\nscopes",
                &format!("roles: [deploy, \"{bad}\"]\nscopes"),
            );
            assert!(RealmModel::from_str(&m, "m").is_err(), "{bad}");
        }
    }

    #[test]
    fn anchors_are_refused() {
        let e = RealmModel::from_str("resource_servers: &a {}\nscopes: *a\n", "m").unwrap_err();
        assert!(
            e[0].reason.contains("anchor") || e[0].reason.contains("alias"),
            "{e:?}"
        );
    }
}
