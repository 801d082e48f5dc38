//! The crate's layering (README "Layout"): imports run one way,
//! `cli` → `startup` → `api` / `reload` → `state` → `exchange` →
//! {`verify`, `policy` (→ `inventory`), `keycloak`, `limits`, `audit`} → `domain`, with
//! `cli` → `provision` (→ `policy`) for `keycloak plan/apply`, and
//! `configuration` building the lower modules' settings and never imported by
//! them. This test reads `src/` and fails on any import outside that order.

use std::collections::{BTreeMap, BTreeSet};

/// Which top-level modules each module may import (`crate::<name>`).
const ALLOWED: &[(&str, &[&str])] = &[
    ("domain", &[]),
    ("http", &[]),
    ("metrics", &[]),
    ("telemetry", &[]),
    ("limits", &["domain"]),
    ("audit", &["domain"]),
    ("signing", &["domain"]),
    ("inventory", &["domain", "http"]),
    ("policy", &["domain", "inventory"]),
    ("verify", &["domain", "http", "metrics", "telemetry"]),
    (
        "keycloak",
        &["domain", "http", "metrics", "signing", "telemetry"],
    ),
    (
        "exchange",
        &[
            "audit",
            "domain",
            "keycloak",
            "limits",
            "metrics",
            "policy",
            "telemetry",
            "verify",
        ],
    ),
    (
        "configuration",
        &["domain", "http", "keycloak", "limits", "signing", "verify"],
    ),
    ("state", &["exchange", "metrics", "signing"]),
    // The client side (a step's `token` command and MCP server): never the service's modules.
    ("client", &["domain", "http", "telemetry"]),
    ("mcp", &["client"]),
    // `keycloak plan/apply/export`: never used by the service.
    (
        "provision",
        &["domain", "http", "inventory", "policy", "telemetry"],
    ),
    (
        "api",
        &[
            "domain",
            "exchange",
            "http",
            "keycloak",
            "metrics",
            "policy",
            "state",
            "telemetry",
            "verify",
        ],
    ),
    ("reload", &["policy", "state", "telemetry"]),
    (
        "startup",
        &[
            "api",
            "audit",
            "configuration",
            "exchange",
            "http",
            "keycloak",
            "limits",
            "metrics",
            "policy",
            "reload",
            "signing",
            "state",
            "telemetry",
            "verify",
        ],
    ),
    (
        "cli",
        &[
            "client",
            "configuration",
            "http",
            "keycloak",
            "mcp",
            "provision",
            "domain",
            "inventory",
            "policy",
            "signing",
            "startup",
            "telemetry",
        ],
    ),
    // The fuzz targets' entry points (`--cfg fuzzing` only): a test harness
    // over the parsers, above everything it reaches.
    (
        "fuzzing",
        &[
            "client",
            "configuration",
            "domain",
            "exchange",
            "http",
            "inventory",
            "keycloak",
            "mcp",
            "policy",
            "provision",
            "verify",
        ],
    ),
];

/// `crate::x` imports of each top-level module, outside comments and test modules.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let top = rel
                .split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string();
            if top == "main" || top == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top {
                        out.entry(top.clone()).or_default().insert(name);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn imports_run_one_way() {
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, a)| (*m, a.iter().copied().collect()))
        .collect();
    let mut wrong = Vec::new();
    for (module, imported) in imports() {
        let Some(ok) = allowed.get(module.as_str()) else {
            wrong.push(format!("module `{module}` is not in the layering table"));
            continue;
        };
        for i in imported {
            if !ok.contains(i.as_str()) {
                wrong.push(format!("`{module}` imports `{i}`"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering: {wrong:#?}");
}

#[test]
fn the_layering_table_has_no_cycle() {
    let edges: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    fn visit<'a>(n: &'a str, edges: &BTreeMap<&'a str, &'a [&'a str]>, path: &mut Vec<&'a str>) {
        assert!(!path.contains(&n), "cycle: {path:?} -> {n}");
        path.push(n);
        for m in edges.get(n).copied().unwrap_or_default() {
            visit(m, edges, path);
        }
        path.pop();
    }
    for n in edges.keys() {
        visit(n, &edges, &mut Vec::new());
    }
}
