//! What `plan` finds and `apply` makes: one [`Entry`] per object with its
//! [`Action`], gathered in a [`Plan`] with its problems and notes.

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

/// One field that differs: `old` is the live value (`(unset)` when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
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

    /// Renders the plan, one object per line and one indented line per field.
    pub fn render(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.entries {
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
