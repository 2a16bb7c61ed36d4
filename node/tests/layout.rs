//! The layout of `node/src`, kept as a test: no import circle between its files, none between
//! its subsystem folders, the `Cluster` handle below every subsystem, and nothing but the
//! binaries and the demos importing the composition root (`node/`). See "Code layout" in
//! docs/architecture.md.
//!
//! Imports are read from the source text (a `use` item, or a `crate::`/`super::` path written
//! out), outside `#[cfg(test)]` modules and comments. A path names the file of the longest
//! module prefix that exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Source files under `dir`, relative to `root`, with `/` separators.
fn rust_files(dir: &Path, root: &Path, out: &mut Vec<String>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, root, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            let rel = path.strip_prefix(root).expect("under the root");
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// `admin/server.rs` → `[admin, server]`; `admin/mod.rs` → `[admin]`; `lib.rs` → `[]`.
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The code of `src` that the build sees outside tests, without comments.
fn code_of(src: &str) -> String {
    let src = match src.find("#[cfg(test)]") {
        Some(i) => &src[..i],
        None => src,
    };
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split_whitespace().collect::<Vec<_>>().join(" ")];
    };
    let Some(close) = tree.rfind('}').filter(|c| *c > open) else {
        return vec![tree.to_string()];
    };
    let (prefix, body) = (&tree[..open], &tree[open + 1..close]);
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, ch) in body.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .flat_map(|p| {
            expand(p)
                .into_iter()
                .map(move |x| format!("{}{x}", prefix.trim()))
        })
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every module path the code names: the trees of its `use` items and the `crate::`/`super::`
/// paths written out.
fn named_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let starts_word = |i: usize| i == 0 || !code[..i].chars().next_back().is_some_and(is_ident);
    let mut from = 0;
    while let Some(k) = code[from..].find("use ") {
        let i = from + k;
        from = i + 4;
        if !starts_word(i) {
            continue;
        }
        if let Some(end) = code[i..].find(';') {
            out.extend(expand(&code[i + 4..i + end]));
        }
    }
    for anchor in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(k) = code[from..].find(anchor) {
            let i = from + k;
            from = i + anchor.len();
            if !starts_word(i) {
                continue;
            }
            let len = code[i..]
                .find(|c: char| !(is_ident(c) || c == ':'))
                .unwrap_or(code.len() - i);
            if code[i + len..].starts_with('{') {
                continue; // a `use` tree, read above
            }
            out.push(code[i..i + len].trim_end_matches(':').to_string());
        }
    }
    out
}

/// The files each file imports (itself excluded).
fn import_graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(root, root, &mut files);
    files.retain(|f| !f.starts_with("bin/"));
    let by_module: BTreeMap<Vec<String>, String> =
        files.iter().map(|f| (module_of(f), f.clone())).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let me = module_of(file);
        let src = std::fs::read_to_string(root.join(file)).expect("read a source file");
        let mut targets = BTreeSet::new();
        for path in named_paths(&code_of(&src)) {
            let path = path.split(" as ").next().unwrap_or_default();
            let mut parts: Vec<String> = path.split("::").map(str::to_string).collect();
            let absolute: Vec<String> = match parts.first().map(String::as_str) {
                Some("crate") => parts.split_off(1),
                Some("super") => {
                    let ups = parts.iter().take_while(|p| *p == "super").count();
                    let base = &me[..me.len().saturating_sub(ups)];
                    base.iter().cloned().chain(parts.split_off(ups)).collect()
                }
                Some("self") => me.iter().cloned().chain(parts.split_off(1)).collect(),
                Some(first) => {
                    // A path relative to this module names a child module, or an outside crate.
                    let mut child = me.clone();
                    child.push(first.to_string());
                    if !by_module.contains_key(&child) {
                        continue;
                    }
                    me.iter().cloned().chain(parts).collect()
                }
                None => continue,
            };
            let target = (1..=absolute.len())
                .rev()
                .find_map(|n| by_module.get(&absolute[..n]));
            if let Some(t) = target.filter(|t| *t != file) {
                targets.insert(t.clone());
            }
        }
        graph.insert(file.clone(), targets);
    }
    graph
}

/// One cycle of `graph`, as the path that closes it, if there is any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, done, stack) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut done, &mut Vec::new()))
}

/// A file's subsystem: its top folder, or its own name for a file at the top.
fn subsystem(file: &str) -> String {
    match file.split_once('/') {
        Some((dir, _)) => dir.to_string(),
        None => file.trim_end_matches(".rs").to_string(),
    }
}

fn src_graph() -> BTreeMap<String, BTreeSet<String>> {
    import_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

fn subsystem_graph(
    files: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, targets) in files {
        let from = subsystem(file);
        let entry = graph.entry(from.clone()).or_default();
        // lib.rs holds the crate's small helpers (lock, now_millis) that every layer uses.
        entry.extend(
            targets
                .iter()
                .map(|t| subsystem(t))
                .filter(|t| *t != from && t != "lib"),
        );
    }
    graph
}

#[test]
fn no_import_circle_between_files() {
    let graph = src_graph();
    assert!(graph.len() > 40, "found only {} files", graph.len());
    if let Some(cycle) = find_cycle(&graph) {
        panic!("node/src has an import circle: {}", cycle.join(" → "));
    }
}

#[test]
fn no_import_circle_between_subsystems() {
    let graph = subsystem_graph(&src_graph());
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "node/src's subsystems import each other in a circle: {}",
            cycle.join(" → ")
        );
    }
}

#[test]
fn only_the_binaries_and_demos_import_the_composition_root() {
    let graph = subsystem_graph(&src_graph());
    let importers: Vec<&String> = graph
        .iter()
        .filter(|(from, targets)| targets.contains("node") && *from != "node")
        .map(|(from, _)| from)
        .collect();
    assert!(
        importers
            .iter()
            .all(|f| f.as_str() == "demo" || f.as_str() == "demo_dr"),
        "only the demos may import node/ (the composition root); also: {importers:?}"
    );
}

#[test]
fn the_cluster_handle_imports_no_subsystem() {
    let graph = subsystem_graph(&src_graph());
    let below: Vec<&String> = graph.get("cluster").into_iter().flatten().collect();
    assert!(
        below.is_empty(),
        "cluster.rs sits below every subsystem but imports {below:?}"
    );
}

#[test]
fn the_reader_finds_imports_and_cycles() {
    let code = code_of(
        "use crate::a::{b, c::{d as e, f}};\nuse super::g; // crate::commented::out\nfn x() { crate::h::i(); notcrate::j(); }\n#[cfg(test)]\nmod tests { use crate::k; }",
    );
    let paths: BTreeSet<String> = named_paths(&code).into_iter().collect();
    assert_eq!(
        paths.iter().map(String::as_str).collect::<Vec<_>>(),
        [
            "crate::a::b",
            "crate::a::c::d as e",
            "crate::a::c::f",
            "crate::h::i",
            "super::g"
        ]
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let mut acyclic = graph.clone();
    acyclic.insert("c".into(), BTreeSet::new());
    assert_eq!(find_cycle(&acyclic), None);
    assert_eq!(subsystem("placement/lease.rs"), "placement");
    assert_eq!(subsystem("cluster.rs"), "cluster");
}
