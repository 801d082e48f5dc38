//! `keycloak plan`, `apply` and `export`: the Keycloak side of the policies,
//! provisioned through the Admin REST API with admin credentials that only these
//! commands hold (the running service has none).
//!
//! The desired state ([`desired::derive`]) comes from the configuration's clients,
//! the policies' grants and the realm model (`<policies_dir>/keycloak/realm.yaml`,
//! [`model`]); [`live::Live::read`] reads the realm with view-only roles;
//! [`plan::plan`] compares them field by field; [`apply::apply`] makes exactly
//! those changes; [`export::realm_json`] writes the desired state as realm-import
//! JSON. Objects created carry the attribute [`realm::OWNER_ATTRIBUTE`]; only
//! those are ever changed or removed.

// `apply` matches every operation of a plan (`diff::Op`) and every kind and
// action without a catch-all arm: what `plan` can propose, `apply` implements.
#![deny(clippy::wildcard_enum_match_arm)]

pub mod admin;
pub mod apply;
pub mod bulk;
pub mod desired;
pub mod diff;
pub mod export;
pub mod identities;
pub mod live;
pub mod model;
pub mod plan;
pub mod realm;
