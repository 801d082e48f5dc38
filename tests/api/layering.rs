//! The crate's layering (docs/src/architecture.md): imports run one way,
//! `cli` → `startup` → `api` / `reload` → `state` → `exchange` →
//! {`verify`, `policy` (→ `inventory`), `keycloak`, `limits`, `audit`} → `domain`, with
//! `cli` → `provision` (→ `policy`) for `keycloak plan/apply`, `cli` → `report`
//! (→ `policy`, `inventory`) for `report access`, and
//! `configuration` building the lower modules' settings and never imported by
//! them. This test reads `src/` and fails on any import outside that order,
//! and on any import cycle between modules, submodules included (`crate::`
//! and `super::` paths, brace groups).

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
        &[
            "domain", "http", "keycloak", "limits", "policy", "signing", "verify",
        ],
    ),
    ("state", &["exchange", "metrics", "signing"]),
    // The client side (a step's `token` command and MCP server): never the service's modules.
    ("client", &["domain", "http", "telemetry"]),
    ("mcp", &["client"]),
    // `token inspect`: the resource server's view of a Keycloak token; it shares
    // no code with the service's verification of Bitbucket tokens (`verify`).
    ("inspect", &["domain", "http", "report", "telemetry"]),
    // `report access`: never used by the service.
    ("report", &["domain", "inventory", "policy"]),
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
            "inspect",
            "keycloak",
            "mcp",
            "provision",
            "domain",
            "inventory",
            "policy",
            "report",
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

/// A module as the import graph names it: the top-level module, or `top::sub`
/// for a file of a directory module (`provision/apply.rs` is `provision::apply`,
/// `provision/mod.rs` is `provision`).
fn module_of(rel: &str) -> String {
    let rel = rel.trim_end_matches(".rs");
    match rel.split_once('/') {
        Some((top, "mod")) => top.to_string(),
        Some((top, sub)) => format!("{top}::{sub}"),
        None => rel.to_string(),
    }
}

/// The paths of one `use`-tree or path expression starting at `s` (just after
/// `crate::` or `super::`): `a::b`, `{a, b::{c, d}}`, `a::{self, b}`; each as
/// its segments (at most the first two matter here).
fn paths(s: &str) -> (Vec<Vec<String>>, usize) {
    let b = s.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    if i < b.len() && b[i] == b'{' {
        i += 1;
        let mut out = Vec::new();
        loop {
            skip_ws(&mut i);
            if i >= b.len() || b[i] == b'}' {
                return (out, i + 1);
            }
            let (sub, used) = paths(&s[i..]);
            out.extend(sub);
            i += used.max(1);
            skip_ws(&mut i);
            if i < b.len() && b[i] == b',' {
                i += 1;
            }
        }
    }
    let start = i;
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
        i += 1;
    }
    let ident = &s[start..i];
    if ident.is_empty() {
        return (vec![], i);
    }
    if ident == "self" {
        // `a::{self, …}`: `a` itself
        return (vec![vec![]], i);
    }
    if s[i..].starts_with("::") {
        let (subs, used) = paths(&s[i + 2..]);
        let subs = if subs.is_empty() { vec![vec![]] } else { subs };
        let out = subs
            .into_iter()
            .map(|mut p| {
                p.insert(0, ident.to_string());
                p
            })
            .collect();
        return (out, i + 2 + used);
    }
    (vec![vec![ident.to_string()]], i)
}

/// The modules `code` (the text of module `me`) imports through `crate::` and
/// `super::` paths, brace groups included, named as [`module_of`] names them
/// (`crate::provision::plan::Plan` is `provision::plan` when `submodules` has
/// it, else `provision`).
fn imports_in(code: &str, me: &str, submodules: &BTreeSet<String>) -> BTreeSet<String> {
    let parent = me.split_once("::").map(|(top, _)| top);
    let name = |segments: &[String]| -> Option<String> {
        let top = segments.first()?;
        match segments.get(1) {
            Some(sub) if submodules.contains(&format!("{top}::{sub}")) => {
                Some(format!("{top}::{sub}"))
            }
            _ => Some(top.clone()),
        }
    };
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    // `super::` in a top-level module is the crate.
    for (prefix, within) in [("crate::", None), ("super::", parent)] {
        for (i, _) in code.match_indices(prefix) {
            // `crate::` inside a longer name (`keycloak_ci_sts::…`) is not one.
            let before = code[..i].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            for p in paths(&code[i + prefix.len()..]).0 {
                let full: Vec<String> = within.map(str::to_string).into_iter().chain(p).collect();
                if let Some(m) = name(&full).filter(|m| m != me) {
                    out.insert(m);
                }
            }
        }
    }
    out
}

/// The import graph of the crate under `src`: each module's imports, outside
/// comments and test modules (`main.rs` and `lib.rs` are the roots).
fn import_graph(src: &std::path::Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(src)
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                files.push((rel, path));
            }
        }
    }
    let submodules: BTreeSet<String> = files
        .iter()
        .map(|(rel, _)| module_of(rel))
        .filter(|m| m.contains("::"))
        .collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, path) in files {
        let me = module_of(&rel);
        if me == "main" || me == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        out.entry(me.clone())
            .or_default()
            .extend(imports_in(code, &me, &submodules));
    }
    out
}

/// Each top-level module's imports of other top-level modules (what the
/// layering table rules).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, imported) in import_graph(&src) {
        let me = top(&module);
        let others = imported.iter().map(|i| top(i)).filter(|i| *i != me);
        out.entry(me.clone()).or_default().extend(others);
    }
    out.retain(|_, v| !v.is_empty());
    out
}

/// The cycles of an import graph, each as the modules on it (first found from
/// each module, in order).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(at) = path.iter().position(|p| p == n) {
            found.push(path[at..].to_vec());
            return;
        }
        if done.contains(n) {
            return;
        }
        path.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            visit(m, graph, path, done, found);
        }
        path.pop();
        done.insert(n.to_string());
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        visit(n, graph, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

#[test]
fn the_import_graph_has_no_cycle() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = import_graph(&src);
    assert!(
        graph.contains_key("provision::apply") && graph.contains_key("policy::snapshot"),
        "submodules are nodes of the graph"
    );
    let all = cycles(&graph);
    assert!(all.is_empty(), "import cycles: {all:#?}");
}

/// The reader sees what the cycle test needs: `super::` from a submodule,
/// `crate::top::sub` paths, brace groups (nested, with `self`) and path
/// expressions in code; a deliberate cycle in a fixture crate is found.
#[test]
fn a_deliberate_cycle_in_a_fixture_crate_is_found() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("b")).unwrap();
    let files = [
        ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
        ("a.rs", "use crate::{c, b::{self, y::Y}};\n"),
        ("b/mod.rs", "mod x;\nmod y;\n"),
        ("b/x.rs", "// use super::z; (a comment)\nuse super::y::Y;\n"),
        (
            "b/y.rs",
            "pub struct Y;\nfn f() { let _ = crate::b::x::g(); }\n",
        ),
        ("c.rs", "pub fn c() {}\n"),
    ];
    for (name, text) in files {
        std::fs::write(src.join(name), text).unwrap();
    }
    let graph = import_graph(&src);
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(graph["a"], set(&["b", "b::y", "c"]));
    assert_eq!(graph["b::x"], set(&["b::y"]));
    assert_eq!(graph["b::y"], set(&["b::x"]));
    let found: Vec<BTreeSet<String>> = cycles(&graph)
        .into_iter()
        .map(|c| c.into_iter().collect())
        .collect();
    assert_eq!(found, vec![set(&["b::x", "b::y"])]);
    std::fs::write(src.join("b/y.rs"), "pub struct Y;\n").unwrap();
    assert!(cycles(&import_graph(&src)).is_empty());
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
