//! What `plan` finds and `apply` makes: one [`Entry`] per object with its
//! [`Action`] and typed [`Change`]s, gathered in a [`Plan`] with its problems
//! and notes; and why `apply` stops ([`ApplyError`]).

use super::admin::AdminError;

/// The kind of a managed object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A bearer-only client with roles.
    ResourceServer,
    /// A client scope.
    Scope,
    /// A client the service acts as.
    Client,
    /// The identity provider of the JWT Authorization Grant.
    IdentityProvider,
    /// The realm's user profile (declared attributes).
    UserProfile,
    /// A group of repository identities.
    Group,
    /// A repository user.
    User,
}

impl Kind {
    /// Clients and client scopes (the identity objects are applied by the
    /// identities' own apply).
    pub fn is_client_side(self) -> bool {
        matches!(self, Self::ResourceServer | Self::Scope | Self::Client)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ResourceServer => "resource server",
            Self::Scope => "client scope",
            Self::Client => "client",
            Self::IdentityProvider => "identity provider",
            Self::UserProfile => "user profile",
            Self::Group => "group",
            Self::User => "user",
        })
    }
}

/// What `apply` does to make a change: one variant per kind of Admin API
/// operation. `apply` matches on it exhaustively (no wildcard arm: the
/// provision module denies `clippy::wildcard_enum_match_arm`), so an operation
/// that `plan` can propose and `apply` cannot make does not compile; the
/// change's `field` is only its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// A field of the object's own representation: the desired one is PUT.
    Representation,
    /// A resource server's client roles: missing ones created, extra removed.
    ClientRoles,
    /// A client scope's protocol mappers: added, updated, extra removed.
    ScopeMappers,
    /// A client's own protocol mappers: removed (its claims come from scopes).
    ClientMappers,
    /// A client scope's role scope mappings: made exactly the desired ones.
    ScopeRoleMappings,
    /// A client's own role scope mappings: removed.
    ClientRoleMappings,
    /// A client's default and optional client scopes: detached, then attached.
    ClientScopes,
    /// The roles mapped to a client's service account: made exactly the desired ones.
    ServiceAccountRoles,
    /// The groups of a client's service account: it leaves them (`plan` also
    /// reports such a membership as a problem, so `apply` stops before it).
    ServiceAccountGroups,
    /// The identity provider's representation (PUT whole).
    IdentityProvider,
    /// Attributes the user profile declares: the missing ones added.
    ProfileAttributes,
    /// A group's role mappings: made exactly the desired ones.
    GroupRoles,
    /// A repository user that does not exist yet, with its fixed id.
    UserCreate,
    /// A repository user's attributes.
    UserAttributes,
    /// A repository user's link to the identity provider.
    UserLink,
    /// Roles mapped directly to a repository user: removed (roles come from groups).
    UserRoles,
    /// A repository user's groups.
    UserGroups,
}

impl Op {
    /// Whether `apply` makes this operation on an object of `kind`.
    pub fn applies_to(self, kind: Kind) -> bool {
        match self {
            Self::Representation => {
                kind == Kind::ResourceServer || kind == Kind::Scope || kind == Kind::Client
            }
            Self::ClientRoles => kind == Kind::ResourceServer,
            Self::ScopeMappers | Self::ScopeRoleMappings => kind == Kind::Scope,
            Self::ClientMappers
            | Self::ClientRoleMappings
            | Self::ClientScopes
            | Self::ServiceAccountRoles
            | Self::ServiceAccountGroups => kind == Kind::Client,
            Self::IdentityProvider => kind == Kind::IdentityProvider,
            Self::ProfileAttributes => kind == Kind::UserProfile,
            Self::GroupRoles => kind == Kind::Group,
            Self::UserCreate
            | Self::UserAttributes
            | Self::UserLink
            | Self::UserRoles
            | Self::UserGroups => kind == Kind::User,
        }
    }
}

/// One field that differs: `old` is the live value (`(unset)` when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What `apply` does to make it.
    pub op: Op,
    /// `attributes.access.token.lifespan`, `optionalClientScopes`, ...
    pub field: String,
    /// Live value.
    pub old: String,
    /// Desired value.
    pub new: String,
}

/// What happens to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Absent: created with these fields.
    Create(Vec<Change>),
    /// Present and owned: these fields change.
    Update(Vec<Change>),
    /// Present, owned, equal.
    InSync,
    /// Present but not owned (no or another marker): never touched.
    Conflict(String),
    /// Owned but no longer desired: removed by `apply --prune`.
    Remove,
    /// Owned but no longer desired, kept (no `--prune`, or disabled by an operator).
    Unneeded,
}

/// One object's line in the plan.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its kind.
    pub kind: Kind,
    /// `clientId` or scope name.
    pub name: String,
    /// What happens to it.
    pub action: Action,
    /// An operator disabled it (`enabled: false`): it stays disabled and is never
    /// removed (`plan::keep_operator_switches`).
    pub operator_disabled: bool,
}

/// The whole plan.
#[derive(Debug, Default)]
pub struct Plan {
    /// One entry per desired or owned object, in apply order.
    pub entries: Vec<Entry>,
    /// Problems that stop `apply` (conflicts, a missing `basic` scope).
    pub problems: Vec<String>,
    /// What `plan` does not show as a change but an operator should know.
    pub notes: Vec<String>,
    /// Client roles of owned resource servers that `--prune` deletes (each
    /// also drops every mapping to it); counted by [`Plan::removals`].
    pub role_removals: usize,
}

impl Plan {
    /// Whether `apply` would change anything.
    pub fn pending(&self) -> bool {
        self.entries.iter().any(|e| {
            matches!(
                e.action,
                Action::Create(_) | Action::Update(_) | Action::Remove
            )
        })
    }

    /// How many objects `apply` would remove (only `--prune` proposes
    /// removals): removed entries and deleted client roles.
    pub fn removals(&self) -> usize {
        self.removed().count() + self.role_removals
    }

    /// The entries `apply` would remove, as (kind, name).
    pub fn removed(&self) -> impl Iterator<Item = (Kind, &str)> {
        self.entries
            .iter()
            .filter(|e| matches!(e.action, Action::Remove))
            .map(|e| (e.kind, e.name.as_str()))
    }

    /// The first change whose operation does not apply to its object's kind
    /// (a `plan` bug), as (kind, name, op).
    pub fn misplaced(&self) -> Option<(Kind, &str, Op)> {
        self.entries.iter().find_map(|e| match &e.action {
            Action::Create(ch) | Action::Update(ch) => ch
                .iter()
                .find(|c| !c.op.applies_to(e.kind))
                .map(|c| (e.kind, e.name.as_str(), c.op)),
            Action::InSync | Action::Conflict(_) | Action::Remove | Action::Unneeded => None,
        })
    }

    /// Renders the plan, one object per line and one indented line per field.
    pub fn render(&self) -> Vec<String> {
        self.render_lines(true)
    }

    /// Renders the plan as [`Plan::render`] does, except that more than
    /// [`SUMMARY_AT`] objects of one kind created, in sync, removed or kept
    /// unneeded are one line each (at the first of them): how many, and the
    /// first and last names. Changes of existing objects are always listed.
    pub fn render_summary(&self) -> Vec<String> {
        self.render_lines(false)
    }

    fn render_lines(&self, verbose: bool) -> Vec<String> {
        let mut groups: std::collections::BTreeMap<(Kind, &str), Vec<&str>> = Default::default();
        for e in self.entries.iter().filter(|e| !e.operator_disabled) {
            if let Some(class) = e.action.summary_class() {
                groups.entry((e.kind, class)).or_default().push(&e.name);
            }
        }
        groups.retain(|_, names| !verbose && names.len() > SUMMARY_AT);
        let mut out = Vec::new();
        for e in &self.entries {
            let class = e.action.summary_class().filter(|_| !e.operator_disabled);
            if let Some(names) = class.and_then(|c| groups.get(&(e.kind, c))) {
                if names.first() == Some(&e.name.as_str()) {
                    out.push(summary_line(e, names));
                }
                continue;
            }
            let off = if e.operator_disabled {
                " [disabled by an operator: left disabled, never removed]"
            } else {
                ""
            };
            let head = |sign: &str, what: &str| format!("{sign} {} {}{what}{off}", e.kind, e.name);
            match &e.action {
                Action::Create(ch) => {
                    out.push(head("+", ": create"));
                    out.extend(ch.iter().map(|c| format!("    {}: {}", c.field, c.new)));
                }
                Action::Update(ch) => {
                    out.push(head("~", ": change"));
                    out.extend(
                        ch.iter()
                            .map(|c| format!("    {}: {} -> {}", c.field, c.old, c.new)),
                    );
                }
                Action::InSync => out.push(head("=", ": in sync")),
                Action::Conflict(why) => out.push(head("!", &format!(": {why}"))),
                Action::Remove => out.push(head("-", ": remove (owned, no longer needed)")),
                Action::Unneeded if e.operator_disabled => {
                    out.push(head(" ", ": owned but no longer needed; kept"));
                }
                Action::Unneeded => out.push(head(
                    " ",
                    ": owned but no longer needed; kept (`--prune` removes it)",
                )),
            }
        }
        out.extend(self.notes.iter().map(|n| format!("  note: {n}")));
        out.extend(self.problems.iter().map(|p| format!("! {p}")));
        out
    }
}

/// What `apply` did, one line per change. Each line is also handed to the
/// echo as it is made (the CLI prints it at once), so a run stopped part-way,
/// by an error or a signal, has shown every change it made.
pub struct Journal<'a> {
    lines: Vec<String>,
    echo: Box<dyn FnMut(&str) + 'a>,
}

impl Default for Journal<'_> {
    fn default() -> Self {
        Self::new(|_| {})
    }
}

impl<'a> Journal<'a> {
    /// A journal handing each line to `echo` as it is added.
    pub fn new(echo: impl FnMut(&str) + 'a) -> Self {
        Self {
            lines: Vec::new(),
            echo: Box::new(echo),
        }
    }

    /// Adds a line.
    pub fn push(&mut self, line: String) {
        (self.echo)(&line);
        self.lines.push(line);
    }

    /// The lines so far.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }
}

/// More objects than this of one kind and action are summarised in one line
/// (`keycloak plan --verbose` lists each).
pub const SUMMARY_AT: usize = 20;

impl Action {
    /// The actions [`Plan::render_summary`] may summarise.
    fn summary_class(&self) -> Option<&'static str> {
        match self {
            Action::Create(_) => Some("create"),
            Action::InSync => Some("in sync"),
            Action::Remove => Some("remove"),
            Action::Unneeded => Some("unneeded"),
            Action::Update(_) | Action::Conflict(_) => None,
        }
    }
}

/// One line for `names` (all of `e`'s kind and action).
fn summary_line(e: &Entry, names: &[&str]) -> String {
    let (n, first, last) = (
        names.len(),
        names.first().copied().unwrap_or_default(),
        names.last().copied().unwrap_or_default(),
    );
    let what = match e.action {
        Action::Create(_) => ("+", "to create"),
        Action::InSync => ("=", "in sync"),
        Action::Remove => ("-", "to remove (owned, no longer needed)"),
        Action::Unneeded | Action::Update(_) | Action::Conflict(_) => (
            " ",
            "owned but no longer needed; kept (`--prune` removes them)",
        ),
    };
    format!(
        "{} {n} {}s {}: {first} ... {last} (--verbose lists each)",
        what.0, e.kind, what.1
    )
}

/// A live or desired JSON value as a plan line shows it: a string bare,
/// nothing as `(unset)`, anything else as JSON.
pub fn value_text(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "(unset)".to_string(),
        other @ (Value::Bool(_) | Value::Number(_) | Value::Array(_) | Value::Object(_)) => {
            other.to_string()
        }
    }
}

/// Why `apply` stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The plan has problems; nothing was changed.
    #[error("the plan has problems; nothing was changed:\n{}", .0.join("\n"))]
    Refused(Vec<String>),
    /// The plan removes more objects than `--max-removals`; nothing was changed.
    #[error(
        "the plan removes {count} object(s), more than --max-removals {max}; nothing was changed \
         (check the plan with `keycloak plan --prune`, then pass --max-removals {count} to consent)"
    )]
    TooManyRemovals {
        /// Removals the plan holds.
        count: usize,
        /// The limit in force.
        max: usize,
    },
    /// An Admin API call failed; the journal says what was done before it.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The realm changed while apply ran (another apply, an administrator):
    /// what the plan read again shows; some changes were made (the journal).
    #[error("the realm changed while apply ran; stopped:\n{}", .0.join("\n"))]
    ChangedMeanwhile(Vec<String>),
    /// An object the plan counts on was not found (created above, or read
    /// moments ago, and gone: another hand in the realm); run apply again.
    #[error("{0} was not found (changed by someone else meanwhile?); run apply again")]
    Missing(String),
    /// The plan holds an operation for an object it does not apply to: a bug
    /// in `plan`; every plan is checked before its first write.
    #[error("{object}: {op:?} does not apply to it (a plan bug); nothing more was changed")]
    NotApplicable {
        /// Kind and name.
        object: String,
        /// The operation.
        op: Op,
    },
}
