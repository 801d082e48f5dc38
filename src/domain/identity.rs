//! Per-repository identities (JWT Authorization Grant, RFC 7523 §2.1): the
//! stable names under which a repository (or a repository in one deployment
//! environment) exists in Keycloak. Both the service (the assertion's `sub`) and
//! `keycloak apply` (the user, its link, its id) derive them from here, so the two
//! can never disagree.

use serde::{Deserialize, Serialize};

use super::BbUuid;

/// Where the service publishes the keys of its repository assertions (the
/// Keycloak identity provider's `jwksUrl` is `<public_url>` + this path).
pub const IDENTITY_JWKS_PATH: &str = "/.well-known/identity-jwks.json";

/// Namespace of [`RepositoryIdentity::user_id`] (UUIDv5, RFC 9562 §5.5): a fixed
/// random UUID of this project. Anyone can recompute a user id from the subject.
pub const USER_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("6f0e7c1a-3b9d-4c55-9a41-2d8b5e0f7a13");

/// What one Keycloak user stands for (a grant's `identity`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Deserialize,
    Serialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// One user per repository (default).
    #[default]
    Repository,
    /// One user per repository and deployment environment: a production
    /// deployment and a test run of the same repository are different users.
    RepositoryEnvironment,
}

/// A repository's (or repository-environment's) identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepositoryIdentity {
    /// `workspaceUuid`.
    pub workspace: BbUuid,
    /// `repositoryUuid`.
    pub repository: BbUuid,
    /// `deploymentEnvironmentUuid`, for [`IdentityKind::RepositoryEnvironment`].
    pub environment: Option<BbUuid>,
}

impl RepositoryIdentity {
    /// The assertion's `sub` and the federated link's `userId`:
    /// `bitbucket:{workspace}:{repository}` or
    /// `bitbucket:{workspace}:{repository}:{environment}` (braced, lower case, as
    /// Bitbucket writes UUIDs). Stable: renaming or moving a repository keeps it.
    pub fn subject(&self) -> String {
        match self.environment {
            None => format!("bitbucket:{}:{}", self.workspace, self.repository),
            Some(e) => format!("bitbucket:{}:{}:{}", self.workspace, self.repository, e),
        }
    }

    /// The Keycloak username: `bitbucket.<workspace>.<repository>[.<environment>]`
    /// (bare UUIDs: Keycloak refuses `:`, `{`, `}` in usernames). Derived from the
    /// identity alone, so Keycloak's unique usernames prevent two users for one
    /// identity even when two `apply` runs race.
    pub fn username(&self) -> String {
        match self.environment {
            None => format!(
                "bitbucket.{}.{}",
                self.workspace.bare(),
                self.repository.bare()
            ),
            Some(e) => format!(
                "bitbucket.{}.{}.{}",
                self.workspace.bare(),
                self.repository.bare(),
                e.bare()
            ),
        }
    }

    /// The Keycloak user id in `realm`, and so the `sub` of its tokens: UUIDv5
    /// of `<realm>` + newline + [`subject`](Self::subject) in
    /// [`USER_ID_NAMESPACE`]. Deterministic, so a user deleted and provisioned
    /// again keeps its `sub`; the realm is part of it because Keycloak's user ids
    /// are unique across all realms of a server.
    pub fn user_id(&self, realm: &str) -> String {
        uuid::Uuid::new_v5(
            &USER_ID_NAMESPACE,
            format!("{realm}\n{}", self.subject()).as_bytes(),
        )
        .hyphenated()
        .to_string()
    }

    /// Parses a username made by [`username`](Self::username).
    pub fn from_username(username: &str) -> Option<Self> {
        let mut parts = username.strip_prefix("bitbucket.")?.split('.');
        let workspace = BbUuid::parse_lenient(parts.next()?).ok()?;
        let repository = BbUuid::parse_lenient(parts.next()?).ok()?;
        let environment = match parts.next() {
            Some(e) => Some(BbUuid::parse_lenient(e).ok()?),
            None => None,
        };
        if parts.next().is_some() {
            return None;
        }
        let me = Self {
            workspace,
            repository,
            environment,
        };
        (me.username() == username).then_some(me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_keycloak_safe() {
        let ws = BbUuid::parse_lenient("03b741e3-cf4a-41f9-9a59-cec52e21bdc3").unwrap();
        let repo = BbUuid::parse_lenient("D4E45493-4a33-477d-917b-a24e7e4bd39b").unwrap();
        let env = BbUuid::parse_lenient("bd715740-c970-486b-b68a-b421ec2a1f8b").unwrap();
        let r = RepositoryIdentity {
            workspace: ws,
            repository: repo,
            environment: None,
        };
        assert_eq!(
            r.subject(),
            "bitbucket:{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}:{d4e45493-4a33-477d-917b-a24e7e4bd39b}"
        );
        assert_eq!(
            r.username(),
            "bitbucket.03b741e3-cf4a-41f9-9a59-cec52e21bdc3.d4e45493-4a33-477d-917b-a24e7e4bd39b"
        );
        assert_eq!(r.user_id("ci"), r.user_id("ci"));
        assert_ne!(
            r.user_id("ci"),
            r.user_id("staging"),
            "ids are unique across realms"
        );
        assert_eq!(RepositoryIdentity::from_username(&r.username()), Some(r));
        let e = RepositoryIdentity {
            environment: Some(env),
            ..r
        };
        assert!(e
            .subject()
            .ends_with(":{bd715740-c970-486b-b68a-b421ec2a1f8b}"));
        assert_ne!(e.user_id("ci"), r.user_id("ci"));
        assert_eq!(RepositoryIdentity::from_username(&e.username()), Some(e));
        assert_eq!(
            RepositoryIdentity::from_username("bitbucket.ops-admin"),
            None
        );
        assert!(!e.username().contains([':', '{', '}']));
    }
}
