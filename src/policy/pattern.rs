//! Branch patterns: globs over `branchName` with only `*` and `**`, compiled
//! with globset (`literal_separator` on).

use globset::{GlobBuilder, GlobMatcher};

/// A compiled branch pattern: `*` (any run of characters) never crosses `/`; `**`
/// does, and stands only as a whole path segment (`**`, `**/x`, `x/**`,
/// `x/**/y`). `\` escapes the next character. Nothing else is pattern syntax,
/// and what could never match a branch is refused: see [`check_branch_pattern`].
#[derive(Debug, Clone)]
pub struct BranchPattern {
    source: String,
    matcher: Matcher,
}

/// How a pattern matches: most name one branch (`main`), and an equality test
/// does what a compiled glob would at a fraction of its memory (a glob is a
/// regular expression automaton: thousands of `branchName: main` policies
/// would hold thousands of them).
#[derive(Debug, Clone)]
enum Matcher {
    /// No `*` and no `\`: the pattern matches itself only.
    Exact,
    /// A glob; `prefix` is its text before the first `*` or `\`, which every
    /// match starts with (tested first: cheap).
    Glob { prefix: String, glob: GlobMatcher },
}

impl BranchPattern {
    /// Compiles a pattern (globset syntax, `literal_separator` on).
    ///
    /// # Errors
    /// The glob parser's message.
    pub fn new(p: &str) -> Result<Self, String> {
        if p.is_empty() {
            return Err("empty branch pattern".into());
        }
        check_branch_pattern(p)?;
        let glob = GlobBuilder::new(p)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| e.to_string())?;
        let matcher = match p.find(['*', '\\']) {
            None => Matcher::Exact,
            Some(i) => Matcher::Glob {
                prefix: p[..i].to_string(),
                glob: glob.compile_matcher(),
            },
        };
        Ok(Self {
            source: p.to_string(),
            matcher,
        })
    }

    /// True when `branch` matches.
    pub fn is_match(&self, branch: &str) -> bool {
        match &self.matcher {
            Matcher::Exact => branch == self.source,
            Matcher::Glob { prefix, glob } => {
                branch.starts_with(prefix.as_str()) && glob.is_match(branch)
            }
        }
    }

    /// The pattern as written.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The pattern rules, so that no pattern matches more, or denies less, than its
/// text says:
/// - `[`, `]`, `{`, `}` are refused unless escaped: globset would read classes
///   and alternations, and a class can match `/`, which `*` never does;
/// - `?` is refused: globset's `?` matches one byte, not one character, so a
///   deny with `?` would not match a branch with a non-ASCII character there;
/// - `**` is refused except as a whole segment: elsewhere globset quietly reads
///   it as `*`, which does not cross `/`;
/// - white space, control characters, `~`, `^` and `:` are refused: git branch
///   names cannot contain them (git-check-ref-format), so such a pattern could
///   never match (a common mistake is `main, develop` for a list).
///
/// # Errors
/// What is wrong, with the way to write it instead.
pub fn check_branch_pattern(p: &str) -> Result<(), String> {
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.next().is_none() => {
                return Err("pattern ends with a lone `\\`".into());
            }
            '[' | ']' | '{' | '}' => {
                return Err(format!(
                    "`{c}` is not supported in branch patterns (no classes or alternations): \
                     only `*` and `**` are; list alternatives instead (branchName: [main, master]); \
                     a literal `{c}` is written `\\{c}`"
                ))
            }
            '?' => {
                return Err(
                    "`?` is not supported in branch patterns (it would match one byte, \
                            not one character); use `*` or list the names"
                        .into(),
                )
            }
            c if crate::domain::deceptive(c) => {
                return Err(format!(
                    "`{}` is an invisible, control or direction-changing character: the pattern \
                     would read as another name and match no branch Bitbucket reports",
                    c.escape_unicode()
                ))
            }
            c if c.is_whitespace() || matches!(c, '~' | '^' | ':') => {
                return Err(format!(
                    "`{}` cannot occur in a git branch name, so this pattern never matches; \
                     to name several branches write a list: branchName: [main, develop]",
                    c.escape_debug()
                ))
            }
            _ => {}
        }
    }
    for (i, _) in p.match_indices("**") {
        let before_ok = i == 0 || p[..i].ends_with('/');
        let after = &p[i + 2..];
        let after_ok = after.is_empty() || after.starts_with('/');
        if !(before_ok && after_ok) || after.starts_with('*') {
            return Err(
                "`**` must be a whole path segment (`**`, `**/x`, `x/**` or `x/**/y`); \
                 elsewhere it would mean `*`, which does not cross `/`"
                    .into(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn invisible_and_direction_changing_characters_are_refused() {
        // A deny on "main" + U+200B would read as a deny on main and match nothing.
        for p in [
            "main\u{200B}",
            "ma\u{00AD}in",
            "\u{202E}niam",
            "main\u{2060}",
            "release/\u{E0041}*",
        ] {
            let e = check_branch_pattern(p).unwrap_err();
            assert!(e.contains("invisible"), "{p:?}: {e}");
        }
        check_branch_pattern("release/2026-q4/*").unwrap();
    }

    proptest! {
        /// The equality and prefix shortcuts match exactly what the compiled
        /// glob matches.
        #[test]
        fn shortcuts_match_as_the_glob_does(
            pattern in "[ab/.*\\\\-]{1,8}",
            branch in "[ab/.\\\\*-]{0,8}",
        ) {
            let Ok(p) = BranchPattern::new(&pattern) else { return Ok(()) };
            let glob = GlobBuilder::new(&pattern)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .unwrap()
                .compile_matcher();
            prop_assert_eq!(p.is_match(&branch), glob.is_match(&branch), "{} {}", pattern, branch);
            prop_assert_eq!(p.is_match(&pattern), glob.is_match(&pattern));
        }
    }
}
