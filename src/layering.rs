//! The crate's layering, checked: no import cycle between files of `src/`,
//! and nothing imports the composition root.
//!
//! A file depends on another when it names a module of it through
//! `crate::`, `super::` or `self::` paths (in `use` lines or inline), or a
//! child module by its bare name (`direct::on_connect`). `mod` lines are
//! not dependencies; `#[cfg(test)] mod tests` blocks are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Every `.rs` file under `dir`, by module path (`["socket", "rooms"]`).
fn modules(dir: &Path, prefix: &Module, out: &mut BTreeMap<Module, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut m = prefix.clone();
            m.push(name);
            modules(&path, &m, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let mut m = prefix.clone();
            if name != "mod" && name != "lib" {
                m.push(name.clone());
            }
            if name == "main" {
                continue; // the binary, outside the library
            }
            let text = std::fs::read_to_string(&path).unwrap();
            out.insert(m, strip(&text));
        }
    }
}

/// The source without comments and without its test module.
fn strip(text: &str) -> String {
    let code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    match code.find("#[cfg(test)]\nmod ") {
        Some(at) => code[..at].to_owned(),
        None => code,
    }
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths `root::a::b` and `root::{a, b::c}` that follow each `root::`.
fn paths_after(code: &str, root: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let needle = format!("{root}::");
    let mut from = 0;
    while let Some(at) = code[from..].find(&needle) {
        let start = from + at;
        from = start + needle.len();
        if code[..start].chars().next_back().is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let first: String = item.trim().chars().take_while(|c| is_ident(*c)).collect();
                if !first.is_empty() {
                    out.push(vec![first]);
                }
            }
        } else {
            let path: Vec<String> =
                rest.split("::").map(|seg| seg.chars().take_while(|c| is_ident(*c)).collect::<String>()).take_while(|s| !s.is_empty()).collect();
            out.push(path);
        }
    }
    out
}

/// The files `module` depends on.
fn dependencies(module: &Module, code: &str, all: &BTreeMap<Module, String>) -> BTreeSet<Module> {
    let resolve = |path: Vec<String>| -> Option<Module> {
        (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|m| all.contains_key(m))
    };
    let parent: Module = module[..module.len().saturating_sub(1)].to_vec();
    let mut deps = BTreeSet::new();
    for (root, base) in [("crate", Vec::new()), ("super", parent), ("self", module.clone())] {
        for path in paths_after(code, root) {
            if let Some(m) = resolve([base.clone(), path].concat()) {
                deps.insert(m);
            }
        }
    }
    for child in all.keys().filter(|c| c.len() == module.len() + 1 && c.starts_with(module)) {
        if !paths_after(code, child.last().unwrap()).is_empty() {
            deps.insert(child.clone());
        }
    }
    deps.remove(module);
    deps.remove(&Vec::new()); // lib.rs: the crate root, not a layer
    deps
}

/// Some cycle of the graph, if any.
fn cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        m: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        done: &mut BTreeSet<Module>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(at) = stack.iter().position(|s| s == m) {
            return Some(stack[at..].to_vec());
        }
        if !done.insert(m.clone()) {
            return None;
        }
        stack.push(m.clone());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, done, stack) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| visit(m, graph, &mut done, &mut Vec::new()))
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let mut all = BTreeMap::new();
    modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &Vec::new(), &mut all);
    all.iter().map(|(m, code)| (m.clone(), dependencies(m, code, &all))).collect()
}

#[test]
fn no_import_cycle_between_files() {
    let g = graph();
    assert!(g.len() > 30, "the walk found the source files");
    if let Some(c) = cycle(&g) {
        let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
        panic!("import cycle: {} -> back to the first", names.join(" -> "));
    }
}

#[test]
fn nothing_imports_the_composition_root() {
    let root = vec!["startup".to_owned()];
    let importers: Vec<String> = graph().into_iter().filter(|(_, deps)| deps.contains(&root)).map(|(m, _)| m.join("::")).collect();
    assert!(importers.is_empty(), "{importers:?} import the composition root");
}

#[test]
fn the_checker_sees_a_cycle() {
    let m = |s: &str| vec![s.to_owned()];
    let mut all = BTreeMap::new();
    all.insert(m("a"), "use crate::b::Thing;".to_owned());
    all.insert(m("b"), "fn f() { crate::a::g() }".to_owned());
    all.insert(vec!["a".to_owned(), "x".to_owned()], "use super::{y, z};".to_owned());
    let g: BTreeMap<_, _> = all.iter().map(|(k, code)| (k.clone(), dependencies(k, code, &all))).collect();
    assert_eq!(g[&m("a")], BTreeSet::from([m("b")]));
    assert_eq!(g[&vec!["a".to_owned(), "x".to_owned()]], BTreeSet::from([m("a")]), "items of the parent file");
    assert!(cycle(&g).is_some());
}
