//! `keycloak plan`, `apply` and `export`: the Keycloak side of the policies,
//! provisioned through the Admin REST API with admin credentials that only these
//! commands hold (the running service has none).
//!
//! The pipeline, in this file and nowhere else: the desired state
//! ([`desired::derive`], from the configuration's clients, the policies' grants
//! and the realm model `<policies_dir>/keycloak/realm.yaml`, [`model`]) is read
//! against the live realm once ([`live::Live::read`], the repository identities
//! in pages by [`bulk`]), compared field by field into a typed plan
//! ([`plan::plan`], [`diff`]), and applied in two passes of the same shape:
//! clients, scopes and resource servers ([`apply`]), then the identity
//! provider, profile, groups and repository users ([`identities`]).
//! [`export::realm_json`] writes the desired state as realm-import JSON.
//! Objects created carry the attribute [`realm::OWNER_ATTRIBUTE`]; only those
//! are ever changed or removed. Shared vocabulary lives on the ground floor
//! ([`realm`], [`diff`], [`admin`]); the passes' modules never import each
//! other.

// `apply` matches every operation of a plan (`diff::Op`) and every kind and
// action without a catch-all arm: what `plan` can propose, `apply` implements.
#![deny(clippy::wildcard_enum_match_arm)]

use admin::{Admin, AdminError};
use desired::Desired;
use diff::{ApplyError, Journal, Plan};

/// `keycloak plan`: reads the realm once and compares it with `desired`
/// (with `prune`, owned objects no longer desired are removals).
///
/// # Errors
/// The first failed Admin API call.
pub async fn plan(admin: &Admin, desired: &Desired, prune: bool) -> Result<Plan, AdminError> {
    let live = live::Live::read(admin, desired).await?;
    Ok(plan::plan(desired, &live, prune, admin.client_id()))
}

/// `keycloak apply`: reads the realm once, checks the whole plan (no problem,
/// at most `max_removals` removals) before any change, then runs the first
/// pass (clients, scopes, resource servers) and the second (the identity
/// objects, on the identities as read at the start: the first pass changes
/// none of them). Each change made is appended to `journal`.
///
/// # Errors
/// [`ApplyError`].
pub async fn apply(
    admin: &Admin,
    desired: &Desired,
    prune: bool,
    max_removals: usize,
    journal: &mut Journal<'_>,
) -> Result<(), ApplyError> {
    let mut live = live::Live::read(admin, desired).await?;
    let first = plan::plan(desired, &live, prune, admin.client_id());
    let approved = apply::check_first(&first, max_removals)?;
    let read_identities = live.identities.take();
    apply::first_pass(
        admin,
        desired,
        &first,
        &approved,
        (prune, max_removals),
        journal,
    )
    .await?;
    if let (Some(want), Some(live_ids)) = (&desired.identities, read_identities) {
        let second = Plan {
            entries: first
                .entries
                .into_iter()
                .filter(|e| !e.kind.is_client_side())
                .collect(),
            ..Plan::default()
        };
        identities::apply(admin, want, &live_ids, &second, &desired.owner, journal).await?;
    }
    Ok(())
}

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
