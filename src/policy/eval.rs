//! Policy evaluation: a pure function of the policy set, the [`Subject`] and the
//! request. It never fails; every decision carries a trace.

use serde::Serialize;

use super::{BranchPattern, Conditions, Effect, PolicySet, Subject};
use crate::domain::error_code::error_codes;
use crate::domain::{BbUuid, Scopes};

error_codes! {
    /// The codes of [`DenyKind`] (an explicit deny and denied scopes share one).
    pub enum DenyCode {
        /// [`DenyKind::UnknownAudience`].
        UnknownAudience = "policy.unknown_audience",
        /// [`DenyKind::ExplicitDeny`] and [`DenyKind::ScopesDenied`].
        Denied = "policy.denied",
        /// [`DenyKind::WorkspaceNotAllowed`].
        WorkspaceNotAllowed = "policy.workspace_not_allowed",
        /// [`DenyKind::RepositoryNotAllowed`].
        RepositoryNotAllowed = "policy.repository_not_allowed",
        /// [`DenyKind::EnvironmentMissing`].
        EnvironmentMissing = "policy.environment_missing",
        /// [`DenyKind::EnvironmentNotAllowed`].
        EnvironmentNotAllowed = "policy.environment_not_allowed",
        /// [`DenyKind::BranchMissing`].
        BranchMissing = "policy.branch_missing",
        /// [`DenyKind::BranchNotAllowed`].
        BranchNotAllowed = "policy.branch_not_allowed",
        /// [`DenyKind::AudNotAllowed`].
        AudNotAllowed = "policy.aud_not_allowed",
        /// [`DenyKind::ScopeNotAllowed`].
        ScopeNotAllowed = "policy.scope_not_allowed",
        /// [`DenyKind::ProtectionRequired`].
        ProtectionRequired = "policy.protection_required",
    }
}

/// What the caller asks for.
#[derive(Debug, Clone)]
pub struct EvalRequest<'a> {
    /// Who asks: the claims conditions test.
    pub subject: &'a Subject,
    /// RFC 8693 `audience`: selects the grant.
    pub audience: &'a str,
    /// RFC 8693 `scope`; empty means "the policy's default scopes".
    pub scopes: &'a Scopes,
    /// When: how old the inventory's protections are (`[protections] max_age_hours`).
    pub now: std::time::SystemTime,
}

/// An allowed exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// Policy that granted it.
    pub policy: String,
    /// Keycloak client to act as.
    pub client: String,
    /// Audience name the caller asked for.
    pub audience: String,
    /// Scopes to request from Keycloak (ordered, de-duplicated).
    pub scopes: Scopes,
    /// Longest lifetime accepted for the issued token, seconds.
    pub max_lifetime_seconds: u64,
    /// Policy override of the per-step limit (per minute).
    pub per_step_per_minute: Option<std::num::NonZeroU32>,
    /// Policy override of the per-repository limit (per minute).
    pub per_repository_per_minute: Option<std::num::NonZeroU32>,
    /// The grant's `identity`, when it names one (JWT Authorization Grant clients).
    pub identity: Option<crate::domain::identity::IdentityKind>,
}

/// Why a request is denied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DenyKind {
    /// No allow policy grants this audience (RFC 8693 `invalid_target`).
    UnknownAudience,
    /// A deny policy matched.
    ExplicitDeny,
    /// A deny policy refuses these scopes (requested, or the grant's defaults);
    /// the rest of the grant stays obtainable. Same code as [`DenyKind::ExplicitDeny`].
    ScopesDenied {
        /// The refused scopes among those the request would obtain.
        scopes: Vec<String>,
    },
    /// `workspaceUuid` not admitted.
    WorkspaceNotAllowed,
    /// `repositoryUuid` not admitted.
    RepositoryNotAllowed,
    /// A deployment environment is required and the token has none.
    EnvironmentMissing,
    /// `deploymentEnvironmentUuid` not admitted.
    EnvironmentNotAllowed,
    /// A branch is required and the token has none (tag builds).
    BranchMissing,
    /// `branchName` not admitted.
    BranchNotAllowed,
    /// The token's `aud` holds none of the audience markers the policy requires.
    AudNotAllowed,
    /// Requested scopes exceed the grant (RFC 6749 `invalid_scope`).
    ScopeNotAllowed {
        /// The requested scopes not allowed.
        scopes: Vec<String>,
    },
    /// Every allow that would grant the request requires protections the
    /// inventory does not show (those of the first such allow).
    ProtectionRequired {
        /// What is missing.
        missing: Vec<super::require::Missing>,
    },
}

impl DenyKind {
    /// This denial's code (exhaustive: a new variant needs one).
    pub fn kind(&self) -> DenyCode {
        match self {
            Self::UnknownAudience => DenyCode::UnknownAudience,
            Self::ExplicitDeny | Self::ScopesDenied { .. } => DenyCode::Denied,
            Self::WorkspaceNotAllowed => DenyCode::WorkspaceNotAllowed,
            Self::RepositoryNotAllowed => DenyCode::RepositoryNotAllowed,
            Self::EnvironmentMissing => DenyCode::EnvironmentMissing,
            Self::EnvironmentNotAllowed => DenyCode::EnvironmentNotAllowed,
            Self::BranchMissing => DenyCode::BranchMissing,
            Self::BranchNotAllowed => DenyCode::BranchNotAllowed,
            Self::AudNotAllowed => DenyCode::AudNotAllowed,
            Self::ScopeNotAllowed { .. } => DenyCode::ScopeNotAllowed,
            Self::ProtectionRequired { .. } => DenyCode::ProtectionRequired,
        }
    }

    /// Stable error code (error-code table, docs/src/error-codes.md).
    pub fn code(&self) -> &'static str {
        self.kind().as_str()
    }

    /// Message for the caller, in terms of the caller's own claims (never the
    /// policy's patterns).
    pub fn public_message(&self, id: &Subject, audience: &str) -> String {
        match self {
            Self::UnknownAudience => format!("no policy grants audience `{audience}`"),
            Self::ExplicitDeny => format!("a deny policy refuses this identity for audience `{audience}`"),
            Self::ScopesDenied { scopes } => format!(
                "a deny policy refuses scope {} of `{audience}` for this identity (ask for the others, by name)",
                scopes.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            ),
            Self::WorkspaceNotAllowed => format!("workspaceUuid {} may not obtain `{audience}`", id.workspace_uuid),
            Self::RepositoryNotAllowed => format!("repositoryUuid {} may not obtain `{audience}`", id.repository_uuid),
            Self::EnvironmentMissing => format!("`{audience}` requires a deployment step; the token has no deploymentEnvironmentUuid"),
            Self::EnvironmentNotAllowed => format!(
                "deploymentEnvironmentUuid {} may not obtain `{audience}`",
                id.deployment_environment_uuid.map(|u| u.braced()).unwrap_or_default()
            ),
            Self::BranchMissing => format!("`{audience}` requires a branch build; the token has no branchName"),
            Self::BranchNotAllowed => format!(
                "branchName `{}` may not obtain `{audience}`",
                id.branch_name.as_deref().unwrap_or_default()
            ),
            Self::AudNotAllowed => format!("this step's OIDC audiences (aud) may not obtain `{audience}`"),
            Self::ScopeNotAllowed { scopes } => format!("scope not allowed for `{audience}`: {}", scopes.join(" ")),
            Self::ProtectionRequired { missing } => format!(
                "`{audience}` requires protections the inventory does not show for this repository's branch or environment: {}",
                missing.iter().map(super::require::Missing::phrase).collect::<Vec<_>>().join("; ")
            ),
        }
    }
}

/// Decision result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Outcome {
    /// Exchange allowed.
    Allow(Grant),
    /// Exchange refused.
    Deny {
        /// Why.
        reason: DenyKind,
        /// The deciding policy, when one decided (deny rule or closest allow).
        policy: Option<String>,
    },
}

/// One line of the decision trace.
#[derive(Debug, Clone, Serialize)]
pub struct TraceEntry {
    /// Policy id.
    pub policy: String,
    /// Its effect.
    pub effect: Effect,
    /// What happened: `matched`, `skipped: ...`, `failed: ...`.
    pub result: String,
}

/// A decision with its trace.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// Allow or deny.
    pub outcome: Outcome,
    /// The policies considered, in order (at most [`MAX_TRACE_ENTRIES`]).
    pub trace: Vec<TraceEntry>,
    /// Trace entries left out over [`MAX_TRACE_ENTRIES`].
    pub omitted: usize,
    /// Policies the index did not consider: their repository condition does not
    /// list the token's `repositoryUuid` (or they cover other audiences).
    pub excluded: usize,
}

/// A failed condition with how many conditions passed before it (for choosing the
/// most specific reason to report). Its text ([`detail`]) is built only for a trace.
struct Failure {
    kind: DenyKind,
    passed: usize,
}

fn list(v: &[BbUuid]) -> String {
    v.iter().map(|u| u.braced()).collect::<Vec<_>>().join(", ")
}

fn branch_list(v: &[BranchPattern]) -> String {
    v.iter()
        .map(|p| p.source().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks conditions in a fixed order; the first failure is returned.
fn check(c: &Conditions, id: &Subject) -> Result<(), Failure> {
    let mut passed = 0;
    let fail = |kind, passed| Err(Failure { kind, passed });
    if let Some(want) = &c.workspace_uuid {
        if !want.contains(&id.workspace_uuid) {
            return fail(DenyKind::WorkspaceNotAllowed, passed);
        }
        passed += 1;
    }
    if let Some(want) = &c.repository_uuid {
        if !want.contains(&id.repository_uuid) {
            return fail(DenyKind::RepositoryNotAllowed, passed);
        }
        passed += 1;
    }
    if let Some(want) = &c.deployment_environment_uuid {
        match id.deployment_environment_uuid {
            None => return fail(DenyKind::EnvironmentMissing, passed),
            Some(e) if !want.contains(&e) => return fail(DenyKind::EnvironmentNotAllowed, passed),
            Some(_) => passed += 1,
        }
    }
    if let Some(pats) = &c.branch_name {
        match &id.branch_name {
            None => return fail(DenyKind::BranchMissing, passed),
            Some(b) if !pats.iter().any(|p| p.is_match(b)) => {
                return fail(DenyKind::BranchNotAllowed, passed)
            }
            Some(_) => passed += 1,
        }
    }
    if let Some(want) = &c.aud {
        if !id.aud.iter().any(|a| want.contains(a)) {
            return fail(DenyKind::AudNotAllowed, passed);
        }
    }
    Ok(())
}

/// The trace text of a failed condition (what [`check`] returned as `kind`).
fn detail(c: &Conditions, id: &Subject, kind: &DenyKind) -> String {
    let uuids = |v: &Option<Vec<BbUuid>>| list(v.as_deref().unwrap_or_default());
    let branches = || branch_list(c.branch_name.as_deref().unwrap_or_default());
    match kind {
        DenyKind::WorkspaceNotAllowed => format!(
            "workspaceUuid {} not in [{}]",
            id.workspace_uuid,
            uuids(&c.workspace_uuid)
        ),
        DenyKind::RepositoryNotAllowed => format!(
            "repositoryUuid {} not in [{}]",
            id.repository_uuid,
            uuids(&c.repository_uuid)
        ),
        DenyKind::EnvironmentMissing => format!(
            "token has no deploymentEnvironmentUuid; required one of [{}]",
            uuids(&c.deployment_environment_uuid)
        ),
        DenyKind::EnvironmentNotAllowed => format!(
            "deploymentEnvironmentUuid {} not in [{}]",
            id.deployment_environment_uuid
                .map(|e| e.to_string())
                .unwrap_or_default(),
            uuids(&c.deployment_environment_uuid)
        ),
        DenyKind::BranchMissing => {
            format!("token has no branchName; required one of [{}]", branches())
        }
        DenyKind::BranchNotAllowed => format!(
            "branchName `{}` matches none of [{}]",
            id.branch_name.as_deref().unwrap_or_default(),
            branches()
        ),
        DenyKind::AudNotAllowed => format!(
            "aud [{}] holds none of [{}]",
            id.aud.join(", "),
            c.aud.as_deref().unwrap_or_default().join(", ")
        ),
        other => other.code().to_string(),
    }
}

/// Longest trace a decision carries: the rest is counted in
/// [`Decision::omitted`] (a residual list of thousands of glob policies must not
/// make one refusal's log line megabytes long).
pub const MAX_TRACE_ENTRIES: usize = 256;

/// What the scan over the policies that can apply found.
#[derive(Default)]
struct Scan<'p> {
    /// `None` when no trace is wanted (the exchange's hot path).
    trace: Option<Vec<TraceEntry>>,
    /// Trace entries not kept (over [`MAX_TRACE_ENTRIES`]).
    omitted: usize,
    /// The first matching deny policy that refuses the whole audience.
    deny_hit: Option<String>,
    /// Scopes refused by matching deny policies with `scopes`, each with the
    /// first policy refusing it.
    denied_scopes: std::collections::BTreeMap<String, String>,
    /// Allow policies for the audience whose conditions match, in order.
    allows: Vec<&'p super::Policy>,
    /// The most specific failed allow condition (most conditions passed, then
    /// earliest position), its position and policy.
    best_failure: Option<(Failure, usize, &'p super::Policy)>,
    /// Some allow policy grants the audience.
    audience_known: bool,
}

impl<'p> Scan<'p> {
    fn note(&mut self, p: &super::Policy, result: impl FnOnce() -> String) {
        let Some(trace) = &mut self.trace else { return };
        if trace.len() >= MAX_TRACE_ENTRIES {
            self.omitted += 1;
            return;
        }
        trace.push(TraceEntry {
            policy: p.id.clone(),
            effect: p.effect,
            result: result(),
        });
    }

    /// Records a failed allow; the scan keeps the one with the most conditions
    /// passed, and among those the earliest.
    fn fail(&mut self, f: Failure, pos: usize, p: &'p super::Policy) {
        let better = self.best_failure.as_ref().is_none_or(|(b, bpos, _)| {
            f.passed > b.passed || (f.passed == b.passed && pos < *bpos)
        });
        if better {
            self.best_failure = Some((f, pos, p));
        }
    }
}

/// Which policies a decision considers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The index's candidates (see [`super::index`]).
    Indexed,
    /// Every policy, in order: the reference the index is tested against.
    Plain,
}

impl PolicySet {
    /// Decides a request. Deny by default; a matching deny policy beats every allow;
    /// among matching allow policies for the audience the first (by id) whose scopes
    /// admit the request wins. Requested scopes must be a subset of the grant's
    /// `scopes`; none requested means the grant's `default_scopes`.
    ///
    /// Only the policies the index finds for the audience and `repositoryUuid` are
    /// considered ([`Decision::excluded`] counts the others: their repository
    /// condition cannot match); the trace lists those, at most
    /// [`MAX_TRACE_ENTRIES`] of them. The exchange calls [`PolicySet::decide`],
    /// which builds no trace.
    pub fn evaluate(&self, req: &EvalRequest<'_>) -> Decision {
        self.run(req, Reach::Indexed, true)
    }

    /// [`PolicySet::evaluate`]'s outcome without building a trace: what the
    /// exchange pays per request.
    pub fn decide(&self, req: &EvalRequest<'_>) -> Outcome {
        self.run(req, Reach::Indexed, false).outcome
    }

    /// The same decision by a plain scan of every policy, with every policy in the
    /// trace: the reference the index is tested against (and `policy explain
    /// --all`).
    pub fn evaluate_unindexed(&self, req: &EvalRequest<'_>) -> Decision {
        self.run(req, Reach::Plain, true)
    }

    fn run(&self, req: &EvalRequest<'_>, reach: Reach, traced: bool) -> Decision {
        let mut scan = self.scan(req, reach, traced);
        let excluded = match reach {
            Reach::Indexed => self.policies().len().saturating_sub(scan.considered),
            Reach::Plain => 0,
        };
        let mut decision = self.conclude(req, &mut scan.scan);
        decision.excluded = excluded;
        decision
    }

    fn conclude<'p>(&'p self, req: &EvalRequest<'_>, scan: &mut Scan<'p>) -> Decision {
        let trace = |scan: &mut Scan<'p>| scan.trace.take().unwrap_or_default();
        let deny = |reason, policy, scan: &mut Scan<'p>| Decision {
            outcome: Outcome::Deny { reason, policy },
            trace: trace(scan),
            omitted: scan.omitted,
            excluded: 0,
        };
        if let Some(policy) = scan.deny_hit.take() {
            return deny(DenyKind::ExplicitDeny, Some(policy), scan);
        }
        if !scan.audience_known {
            return deny(DenyKind::UnknownAudience, None, scan);
        }
        let mut scope_failure: Option<(Vec<String>, String)> = None;
        let mut refused_by: Option<(String, Vec<String>)> = None;
        let mut unprotected: Option<(Vec<super::require::Missing>, String)> = None;
        for p in std::mem::take(&mut scan.allows) {
            let Some(g) = &p.grant else { continue };
            let requested: Scopes = if req.scopes.is_empty() {
                g.default_scopes.iter().map(String::as_str).collect()
            } else {
                req.scopes.clone()
            };
            let excess: Vec<String> = requested
                .as_slice()
                .iter()
                .filter(|s| !g.scopes.contains(*s))
                .cloned()
                .collect();
            // The grant would serve the scopes, but a deny policy refuses one of
            // them (named, or among the grant's defaults: then a later grant may
            // serve a request without `scope`). Checked after the grant's own
            // scopes, so a scope no grant offers is `scope_not_allowed` whether
            // or not a deny names it: the answer does not reveal deny rules.
            if excess.is_empty() {
                if let Some((by, scopes)) = first_denied(&scan.denied_scopes, &requested) {
                    scan.note(p, || format!("scopes {} refused by {by}", scopes.join(" ")));
                    refused_by.get_or_insert((by, scopes));
                    continue;
                }
                let missing = self.requirement_of(g).unmet(
                    &self.inventory,
                    req.subject,
                    req.now,
                    self.rules.max_age,
                );
                if !missing.is_empty() {
                    scan.note(p, || {
                        let m: Vec<String> = missing
                            .iter()
                            .map(super::require::Missing::phrase)
                            .collect();
                        format!("requirement not met: {}", m.join("; "))
                    });
                    unprotected.get_or_insert((missing, p.id.clone()));
                    continue;
                }
                return Decision {
                    outcome: Outcome::Allow(Grant::of(p, g, requested)),
                    trace: trace(scan),
                    omitted: scan.omitted,
                    excluded: 0,
                };
            }
            scan.note(p, || format!("scopes not granted: {}", excess.join(" ")));
            scope_failure.get_or_insert((excess, p.id.clone()));
        }
        if let Some((by, scopes)) = refused_by {
            return deny(DenyKind::ScopesDenied { scopes }, Some(by), scan);
        }
        if let Some((missing, by)) = unprotected {
            return deny(DenyKind::ProtectionRequired { missing }, Some(by), scan);
        }
        let (reason, policy) = match (scope_failure, scan.best_failure.take()) {
            (Some((scopes, pid)), _) => (DenyKind::ScopeNotAllowed { scopes }, Some(pid)),
            (None, Some((f, _, p))) => (f.kind, Some(p.id.clone())),
            (None, None) => (DenyKind::UnknownAudience, None),
        };
        deny(reason, policy, scan)
    }

    /// Checks the conditions of every policy `reach` considers, once, in order.
    fn scan(&self, req: &EvalRequest<'_>, reach: Reach, traced: bool) -> Counted<'_> {
        let mut scan = Scan {
            trace: traced.then(Vec::new),
            ..Scan::default()
        };
        let policies = self.policies();
        let considered = match reach {
            Reach::Plain => {
                for (pos, p) in policies.iter().enumerate() {
                    scan_one(&mut scan, req, pos, p);
                }
                policies.len()
            }
            Reach::Indexed => {
                let c = self.index.candidates(req.audience, req.subject);
                for &pos in &c.positions {
                    if let Some(p) = policies.get(pos) {
                        scan_one(&mut scan, req, pos, p);
                    }
                }
                scan.audience_known = c.audience_known;
                // The allows left out fail at the workspace or the repository;
                // they still compete for the refusal's "closest allow".
                for pos in self
                    .index
                    .excluded_failures(req.audience, req.subject, &c.positions)
                    .into_iter()
                    .flatten()
                {
                    if let Some(p) = policies.get(pos) {
                        if let Err(f) = check(&p.when, req.subject) {
                            scan.fail(f, pos, p);
                        }
                    }
                }
                c.positions.len()
            }
        };
        Counted { scan, considered }
    }
}

/// A scan and how many policies it considered.
struct Counted<'p> {
    scan: Scan<'p>,
    considered: usize,
}

/// One policy of a scan.
fn scan_one<'p>(scan: &mut Scan<'p>, req: &EvalRequest<'_>, pos: usize, p: &'p super::Policy) {
    if let Some(skip) = skipped(p, req.audience) {
        scan.note(p, || skip);
        return;
    }
    match (p.effect, check(&p.when, req.subject)) {
        (Effect::Deny, Ok(())) => match &p.deny_scopes {
            None => {
                scan.note(p, || "matched: denies".into());
                scan.deny_hit.get_or_insert_with(|| p.id.clone());
            }
            Some(scopes) => {
                scan.note(p, || {
                    format!(
                        "matched: denies scopes {}",
                        scopes.iter().cloned().collect::<Vec<_>>().join(" ")
                    )
                });
                for s in scopes {
                    scan.denied_scopes
                        .entry(s.clone())
                        .or_insert_with(|| p.id.clone());
                }
            }
        },
        (Effect::Deny, Err(f)) => {
            scan.note(p, || {
                format!("not matched: {}", detail(&p.when, req.subject, &f.kind))
            });
        }
        (Effect::Allow, Ok(())) => {
            scan.audience_known = true;
            scan.note(p, || "matched".into());
            scan.allows.push(p);
        }
        (Effect::Allow, Err(f)) => {
            scan.audience_known = true;
            scan.note(p, || {
                format!("failed: {}", detail(&p.when, req.subject, &f.kind))
            });
            scan.fail(f, pos, p);
        }
    }
}

/// The scopes of `scopes` that matching deny policies refuse, with the policy
/// refusing the first; `None` when none is refused.
fn first_denied(
    denied: &std::collections::BTreeMap<String, String>,
    scopes: &Scopes,
) -> Option<(String, Vec<String>)> {
    let refused: Vec<String> = scopes
        .as_slice()
        .iter()
        .filter(|s| denied.contains_key(*s))
        .cloned()
        .collect();
    let by = denied.get(refused.first()?)?.clone();
    Some((by, refused))
}

/// What one identity may obtain for one audience from one allow policy, as
/// `POST /grants` reports it: nothing about the policy itself.
///
/// A request for the audience with scopes `S` is allowed exactly when some offer
/// (of the list [`PolicySet::offers`] returns, in its order) has `S ⊆ scopes`
/// (the first such offer issues it), or, when `S` is empty, when some offer has
/// `default_scopes` (the first such one issues them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Offer {
    /// The RFC 8693 `audience` to send.
    pub audience: String,
    /// Scopes that may be requested (any subset), deny rules applied.
    pub scopes: Vec<String>,
    /// What a request without `scope` obtains; `None` when a deny rule refuses
    /// one of them (then name the scopes).
    pub default_scopes: Option<Vec<String>>,
    /// Longest lifetime of the issued token, seconds.
    pub max_lifetime_seconds: u64,
    /// Protections the grant requires that the inventory does not show now:
    /// while any is listed, a request for it is refused
    /// (`policy.protection_required`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_protections: Vec<String>,
}

impl PolicySet {
    /// Everything `subject` may obtain now, by audience (sorted) and then in
    /// evaluation order: for each audience the allow policies whose conditions
    /// match, unless a matching deny policy refuses the audience, with the scopes
    /// deny policies refuse removed. Consistent with [`PolicySet::evaluate`] by
    /// construction and by a property test; see [`Offer`] for how to read it.
    pub fn offers(&self, subject: &Subject, now: std::time::SystemTime) -> Vec<Offer> {
        self.offers_by(subject, now, Reach::Indexed)
    }

    /// [`PolicySet::offers`] by a plain scan of every policy (the reference).
    pub fn offers_unindexed(&self, subject: &Subject, now: std::time::SystemTime) -> Vec<Offer> {
        self.offers_by(subject, now, Reach::Plain)
    }

    fn offers_by(&self, subject: &Subject, now: std::time::SystemTime, reach: Reach) -> Vec<Offer> {
        let mut out: Vec<Offer> = Vec::new();
        let none = Scopes::default();
        for audience in self.index.granted_audiences() {
            let req = EvalRequest {
                subject,
                audience,
                scopes: &none,
                now,
            };
            let scan = self.scan(&req, reach, false).scan;
            if scan.deny_hit.is_some() {
                continue;
            }
            for p in scan.allows {
                let Some(g) = &p.grant else { continue };
                let scopes: Vec<String> = g
                    .scopes
                    .iter()
                    .filter(|s| !scan.denied_scopes.contains_key(*s))
                    .cloned()
                    .collect();
                let default_scopes = g
                    .default_scopes
                    .iter()
                    .all(|s| !scan.denied_scopes.contains_key(s))
                    .then(|| g.default_scopes.clone());
                if scopes.is_empty() {
                    continue;
                }
                let offer = Offer {
                    audience: audience.to_string(),
                    scopes,
                    default_scopes,
                    max_lifetime_seconds: g.max_lifetime_seconds,
                    missing_protections: self
                        .requirement_of(g)
                        .unmet(&self.inventory, subject, now, self.rules.max_age)
                        .iter()
                        .map(super::require::Missing::phrase)
                        .collect(),
                };
                if !out.contains(&offer) {
                    out.push(offer);
                }
            }
        }
        out
    }
}

/// Why a policy does not apply to `audience` at all, if it does not.
fn skipped(p: &super::Policy, audience: &str) -> Option<String> {
    match (&p.effect, &p.deny_audiences, &p.grant) {
        (Effect::Deny, Some(auds), _) if !auds.contains(audience) => {
            Some(format!("skipped: covers audiences {auds:?}"))
        }
        (Effect::Allow, _, Some(g)) if g.audience != audience => {
            Some(format!("skipped: grants audience `{}`", g.audience))
        }
        (Effect::Allow, _, None) => Some("skipped: no grant".into()),
        _ => None,
    }
}

impl Grant {
    fn of(p: &super::Policy, g: &super::GrantSpec, scopes: Scopes) -> Self {
        Self {
            policy: p.id.clone(),
            client: g.client.clone(),
            audience: g.audience.clone(),
            scopes,
            max_lifetime_seconds: g.max_lifetime_seconds,
            per_step_per_minute: g.per_step_per_minute,
            per_repository_per_minute: g.per_repository_per_minute,
            identity: g.identity,
        }
    }
}
