//! The access report as Markdown (a pull request or a ticket), one
//! self-contained HTML file (inline style, no script, nothing fetched), or
//! JSON. Every value from the inventory, the policies or the audit is escaped
//! for its format: repository and branch names are chosen by whoever can
//! create them.

use std::fmt::Write as _;

use super::{Path, Report};

/// JSON, pretty-printed.
///
/// # Errors
/// Serialisation failure (not expected).
pub fn json(r: &Report) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(r).map(|s| s + "\n")
}

/// What a path is marked as: `unprotected` (no requirement met), `unused` (no
/// token in the period), both, or neither.
pub fn marks(p: &Path) -> Vec<&'static str> {
    let mut m = Vec::new();
    if !p.protected {
        m.push("unprotected");
    }
    if p.unused {
        m.push("unused");
    }
    m
}

fn list(v: &Option<Vec<String>>) -> String {
    match v {
        None => "anyone with write access".to_string(),
        Some(v) if v.is_empty() => "nobody".to_string(),
        Some(v) => v.join(", "),
    }
}

fn usage(p: &Path) -> String {
    match (&p.issued, &p.last_issued) {
        (None, _) => "not read".to_string(),
        (Some(n), Some(last)) => format!("{n} (last {last})"),
        (Some(n), None) => n.to_string(),
    }
}

/// Markdown text of a cell: every ASCII punctuation character escaped (no
/// table cell, emphasis, link, autolink such as `https://` or `www.`, or
/// strike-through can start), `<`, `>`, `&` as entities, line breaks as spaces.
fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' | '<' | '>' => {}
            c if c.is_ascii_punctuation() => {
                out.push('\\');
                out.push(c);
                continue;
            }
            _ => {}
        }
        match c {
            // Entities, not escapes: no `<` in the text at all (a renderer
            // that passes HTML through sees none).
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The columns of the matrix, in order.
const COLUMNS: [&str; 11] = [
    "client",
    "audience",
    "policy",
    "repository",
    "branch",
    "environment",
    "identity",
    "requires",
    "inventory shows",
    "who may push / merge",
    "issued",
];

fn cells(p: &Path) -> [String; 11] {
    let identity = if p.groups.is_empty() {
        p.identity.clone()
    } else {
        format!("{} (groups: {})", p.identity, p.groups.join(", "))
    };
    let shown = if p.missing.is_empty() {
        p.shown.clone()
    } else {
        format!("{}; NOT MET: {}", p.shown, p.missing.join("; "))
    };
    [
        p.client.clone(),
        format!("{} [{}]", p.audience, p.scopes.join(" ")),
        p.policy.clone(),
        p.repository.clone(),
        p.branch.clone().unwrap_or_else(|| "any".into()),
        p.environment.clone().unwrap_or_else(|| "any".into()),
        identity,
        if p.requires.is_empty() {
            "nothing".into()
        } else {
            p.requires.clone()
        },
        shown,
        if p.restrictions_known {
            format!("push: {}; merge: {}", list(&p.may_push), list(&p.may_merge))
        } else if p.branch.is_none() {
            "any branch".to_string()
        } else {
            "unknown".to_string()
        },
        usage(p),
    ]
}

/// Markdown.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Access review\n");
    let _ = writeln!(
        s,
        "Generated {} from policy set `{}`; protections older than {} h count as unknown.\n",
        r.generated_at, r.policies_digest, r.protections_max_age_hours
    );
    if let Some(p) = &r.period {
        let _ = writeln!(s, "Audit period: {} to {}.\n", p.from, p.to);
    }
    let unprotected = r.paths.iter().filter(|p| !p.protected).count();
    let unused = match r.audit {
        Some(_) => format!(
            "**{}** unused in the period",
            r.paths.iter().filter(|p| p.unused).count()
        ),
        None => "usage not read (no audit files)".to_string(),
    };
    let _ = writeln!(
        s,
        "{} paths; **{unprotected} unprotected** (no requirement the inventory shows met); {unused}.\n",
        r.paths.len()
    );
    let _ = writeln!(s, "| mark | {} |", COLUMNS.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(COLUMNS.len()));
    for p in &r.paths {
        let mark = marks(p).join(", ");
        let row: Vec<String> = cells(p).iter().map(|c| md(c)).collect();
        let _ = writeln!(
            s,
            "| {} | {} |",
            if mark.is_empty() {
                "-".into()
            } else {
                format!("**{mark}**")
            },
            row.join(" | ")
        );
    }
    audit_md(&mut s, r);
    let _ = writeln!(s, "\nKeycloak: {}", md(&r.keycloak_plan));
    let _ = writeln!(s, "\n## Not checked\n");
    for n in &r.not_checked {
        let _ = writeln!(s, "- {}", md(n));
    }
    s
}

fn audit_md(s: &mut String, r: &Report) {
    let Some(a) = &r.audit else { return };
    let _ = writeln!(
        s,
        "\n## Audit input\n\n{} files, {} lines read, {} skipped (outside the period or not an exchange), {} not parseable, {} duplicates dropped, {} conflicting lines counted; {} tokens issued on paths that no longer exist.",
        a.files, a.lines_read, a.lines_skipped, a.lines_unparseable, a.duplicates, a.conflicts, a.issued_outside_paths
    );
    if !r.refusals.is_empty() {
        let _ = writeln!(s, "\n| refusals and failures by code | count |\n|---|---|");
        for (code, n) in &r.refusals {
            let _ = writeln!(s, "| {} | {n} |", md(code));
        }
    }
}

/// HTML text: `&`, `<`, `>`, quotes escaped.
fn h(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The style of the HTML report (inline: the file is self-contained).
const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:24px;color:#111}\
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #bbb;padding:4px 6px;vertical-align:top;text-align:left}\
th{background:#eee}tr.unprotected td{background:#ffd6d6}tr.unused td{background:#fff1b8}\
tr.unprotected.unused td{background:#ffb3b3}.legend span{padding:2px 8px;margin-right:8px}";

/// One self-contained HTML file (no script, no external asset).
pub fn html(r: &Report) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>Access review</title><style>{STYLE}</style></head><body>\n<h1>Access review</h1>\n"
    );
    let _ = writeln!(
        s,
        "<p>Generated {} from policy set <code>{}</code>; protections older than {} h count as unknown.{}</p>",
        h(&r.generated_at),
        h(&r.policies_digest),
        r.protections_max_age_hours,
        r.period
            .as_ref()
            .map(|p| format!(" Audit period: {} to {}.", h(&p.from), h(&p.to)))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "<p class=\"legend\"><span style=\"background:#ffd6d6\">unprotected</span><span style=\"background:#fff1b8\">unused in the period</span><span style=\"background:#ffb3b3\">both</span></p>"
    );
    let _ = write!(s, "<table>\n<tr><th>mark</th>");
    for c in COLUMNS {
        let _ = write!(s, "<th>{c}</th>");
    }
    let _ = writeln!(s, "</tr>");
    for p in &r.paths {
        let m = marks(p);
        let _ = write!(
            s,
            "<tr class=\"path {}\"><td>{}</td>",
            m.join(" "),
            if m.is_empty() {
                "-".to_string()
            } else {
                m.join(", ")
            }
        );
        for c in cells(p) {
            let _ = write!(s, "<td>{}</td>", h(&c));
        }
        let _ = writeln!(s, "</tr>");
    }
    let _ = writeln!(s, "</table>");
    if let Some(a) = &r.audit {
        let _ = writeln!(
            s,
            "<h2>Audit input</h2><p>{} files, {} lines read, {} skipped, {} not parseable, {} duplicates dropped, {} conflicting lines counted; {} tokens issued on paths that no longer exist.</p>",
            a.files, a.lines_read, a.lines_skipped, a.lines_unparseable, a.duplicates, a.conflicts, a.issued_outside_paths
        );
        if !r.refusals.is_empty() {
            let _ = writeln!(
                s,
                "<table><tr><th>refusals and failures by code</th><th>count</th></tr>"
            );
            for (code, n) in &r.refusals {
                let _ = writeln!(s, "<tr><td>{}</td><td>{n}</td></tr>", h(code));
            }
            let _ = writeln!(s, "</table>");
        }
    }
    let _ = writeln!(s, "<p>Keycloak: {}</p>", h(&r.keycloak_plan));
    let _ = writeln!(s, "<h2>Not checked</h2><ul>");
    for n in &r.not_checked {
        let _ = writeln!(s, "<li>{}</li>", h(n));
    }
    let _ = writeln!(s, "</ul></body></html>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_text_in_every_format() {
        let evil = "x</td><script>alert(1)</script>|`*[a](javascript:1)";
        assert_eq!(
            h(evil),
            "x&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;|`*[a](javascript:1)"
        );
        let m = md(evil);
        assert!(
            !m.contains("<script") && !m.contains(" | ") && m.contains("\\|"),
            "{m}"
        );
        // No autolink or strike-through can start.
        for evil in [
            "https://evil.example/approve",
            "Prod www.evil.example",
            "~~Production~~",
        ] {
            let m = md(evil);
            assert!(
                !m.contains("s://") && !m.contains("www.") && !m.contains("~~"),
                "{m}"
            );
        }
    }
}
