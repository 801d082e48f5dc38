//! A guard for the YAML files the service reads (policies, inventories).

/// Refuses YAML anchors (`&name`) and aliases (`*name`): a policy or inventory
/// never needs them, and the YAML parser expands aliases while it parses, so a
/// small file of nested aliases could make it build a huge document (a memory
/// bomb) before any check runs. Quoted strings and comments are skipped; a plain
/// value that starts with `*` (a glob such as `**/x`) must be quoted.
///
/// # Errors
/// The 1-based line of the first anchor or alias.
pub fn refuse_anchors_and_aliases(text: &str) -> Result<(), String> {
    // Open flow collections (`[`, `{` at a node's start), across lines: only
    // inside one does `,` start a node; in block context it is plain text
    // (`release/*,*` is one plain scalar, as a YAML emitter writes it).
    let mut flow = 0usize;
    for (n, line) in text.lines().enumerate() {
        // `node_start`: only indentation so far, or the last significant
        // character opens a node (`:`, `-`, `[`, `{`, `,`).
        let mut node_start = true;
        let mut quote: Option<char> = None;
        let chars: Vec<char> = line.chars().collect();
        for (i, &c) in chars.iter().enumerate() {
            let spaced = chars.get(i + 1).is_none_or(|n| n.is_whitespace());
            if let Some(q) = quote {
                if c == q {
                    quote = None;
                    node_start = false;
                }
                continue;
            }
            match c {
                ' ' | '\t' => {}
                '"' | '\'' if node_start => quote = Some(c),
                '#' => break,
                '&' | '*' if node_start => {
                    return Err(format!(
                        "line {}: YAML anchors and aliases (`&name`, `*name`) are not \
                         supported; quote a value that starts with `*`",
                        n + 1
                    ))
                }
                // `key: value` and `- item` open a node only when a space follows
                // (`artifacts:read`, `deploy-*` are plain text).
                ':' if spaced => node_start = true,
                '-' if spaced && node_start => node_start = true,
                '[' | '{' if node_start => flow += 1,
                ']' | '}' if flow > 0 => {
                    flow -= 1;
                    node_start = false;
                }
                ',' if flow > 0 => node_start = true,
                _ => node_start = false,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_and_aliases_are_found_quoted_text_and_globs_are_not() {
        for bad in [
            "a: &x [1]\nb: *x\n",
            "- *e\n",
            "k: [*a]\n",
            "branchName: **/x\n",
            "  environments: *e\n",
            "k: [a, *x]\n",
            "k: {a: 1, b: *x}\n",
            "k: [a,\n  *x]\n",
            "k: [[a], *x]\n",
        ] {
            assert!(refuse_anchors_and_aliases(bad).is_err(), "{bad}");
        }
        for ok in [
            "branchName: [\"main\", \"release/**\"]\n",
            "repository: acme/*-api\n",
            "repository: acme/deploy-*\n",
            "scopes: [a:*]\n",
            "branchName: 'release/*'\n",
            "description: a & b * c # not an *alias\n",
            "branchName: \"**\"\n",
            "# *comment\n",
            // In block context `,` and `[` inside a plain scalar are text: this
            // is how a YAML emitter writes the string `release/*,*` (found by
            // the `policy` fuzz target's round trip).
            "branchName:\n- main\n- release/*,*\n",
            "description: a,*b\n",
            "description: a[*b]\n",
        ] {
            assert!(refuse_anchors_and_aliases(ok).is_ok(), "{ok}");
        }
    }
}
