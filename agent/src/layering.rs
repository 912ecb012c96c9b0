//! The import graph of `agent/src`, read from the source, and the rule it must keep: no cycle
//! between rooms (top-level modules), and none between the modules of one room.
//!
//! Separate crates would make cargo enforce this; until the rooms become crates, these tests do.
//! A reference is any `crate::…` or `super::…` path outside comments and strings (`use` lines,
//! expressions, types), so test code counts too. Run with `cargo test -p sluice --lib layering`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
};

/// A module path, e.g. `["proxy", "hbone", "pool"]`; the crate root is empty.
type ModPath = Vec<String>;

/// Where an edge was seen: `file:line`.
type Seen = String;

/// Edges between modules, each with the first place it was seen.
#[derive(Default)]
struct Graph {
    edges: BTreeMap<String, BTreeMap<String, Seen>>,
}

impl Graph {
    fn add(&mut self, from: &str, to: &str, seen: Seen) {
        if from != to {
            self.edges
                .entry(from.to_owned())
                .or_default()
                .entry(to.to_owned())
                .or_insert(seen);
        }
    }

    /// Strongly connected components with more than one node, each with its inner edges.
    fn cycles(&self) -> Vec<String> {
        let nodes: BTreeSet<&str> = self
            .edges
            .iter()
            .flat_map(|(a, to)| std::iter::once(a.as_str()).chain(to.keys().map(String::as_str)))
            .collect();
        let reach = |start: &str| {
            let mut seen = BTreeSet::from([start.to_owned()]);
            let mut todo = vec![start.to_owned()];
            while let Some(n) = todo.pop() {
                for m in self.edges.get(&n).into_iter().flat_map(|t| t.keys()) {
                    if seen.insert(m.clone()) {
                        todo.push(m.clone());
                    }
                }
            }
            seen
        };
        let reaches: BTreeMap<&str, BTreeSet<String>> =
            nodes.iter().map(|n| (*n, reach(n))).collect();
        let mut done = BTreeSet::new();
        let mut out = Vec::new();
        for n in &nodes {
            if done.contains(*n) {
                continue;
            }
            let component: BTreeSet<&str> = nodes
                .iter()
                .copied()
                .filter(|m| reaches[n].contains(*m) && reaches[m].contains(*n))
                .collect();
            done.extend(component.iter().copied());
            if component.len() < 2 {
                continue;
            }
            let mut text = format!(
                "cycle among {{{}}}:",
                Vec::from_iter(component.iter().copied()).join(", ")
            );
            for a in &component {
                for (b, seen) in self.edges.get(*a).into_iter().flatten() {
                    if component.contains(b.as_str()) {
                        let _ = write!(text, "\n  {a} -> {b}  ({seen})");
                    }
                }
            }
            out.push(text);
        }
        out
    }
}

/// The module a source file defines: `proxy/hbone/pool.rs` → `proxy::hbone::pool`,
/// `proxy/mod.rs` → `proxy`, `lib.rs` → the root.
fn module_of(rel: &str) -> ModPath {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    parts
}

/// `text` with comments, string and character literals blanked out (newlines kept).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, s: &[u8]| {
        out.extend(s.iter().map(|c| if *c == b'\n' { '\n' } else { ' ' }));
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|c| *c == b'\n').unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = 0;
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &rest[..j.min(rest.len())]);
            i += j.min(rest.len());
        } else if (rest[0] == b'r' || rest.starts_with(b"br"))
            && !(i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
            && {
                let s = if rest[0] == b'b' { 2 } else { 1 };
                let hashes = rest[s..].iter().take_while(|c| **c == b'#').count();
                rest.get(s + hashes) == Some(&b'"')
            }
        {
            let s = if rest[0] == b'b' { 2 } else { 1 };
            let hashes = rest[s..].iter().take_while(|c| **c == b'#').count();
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let body = s + hashes + 1;
            let end = rest[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(rest.len(), |p| body + p + close.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'\'' && (rest.get(1) == Some(&b'\\') || rest.get(2) == Some(&b'\'')) {
            // A character literal (a lifetime has no closing quote right after one char).
            let mut j = 1;
            while j < rest.len() && rest[j] != b'\'' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Other(char),
}

fn tokens(code: &str) -> Vec<(Tok, usize)> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut chars = code.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            c if c.is_alphanumeric() || c == '_' || c == '$' => {
                let mut id = String::from(c);
                while let Some((_, n)) = chars.peek().copied() {
                    if n.is_alphanumeric() || n == '_' {
                        id.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push((Tok::Ident(id.trim_start_matches('$').to_owned()), line));
            }
            ':' if chars.peek().is_some_and(|(_, n)| *n == ':') => {
                chars.next();
                out.push((Tok::PathSep, line));
            }
            '{' => out.push((Tok::Open, line)),
            '}' => out.push((Tok::Close, line)),
            ',' => out.push((Tok::Comma, line)),
            c => out.push((Tok::Other(c), line)),
        }
    }
    out
}

/// Every absolute path a file's code names through `crate::` or `super::`, with its line and
/// whether it was named inside an inline `mod tests`.
fn references(text: &str, module: &[String]) -> Vec<(ModPath, usize, bool)> {
    let toks = tokens(&code_only(text));
    let mut out = Vec::new();
    // Inline modules (`mod tests { … }`) entered, with the brace depth they opened at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let ident = |k: usize| match toks.get(k) {
            Some((Tok::Ident(s), _)) => Some(s.as_str()),
            _ => None,
        };
        match &toks[i].0 {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let (Some(name), Some((Tok::Open, _))) = (ident(i + 1), toks.get(i + 2)) {
                    inline.push((name.to_owned(), depth));
                }
            }
            Tok::Ident(start)
                if (start == "crate" || start == "super")
                    && toks.get(i + 1).is_some_and(|t| t.0 == Tok::PathSep)
                    && !(i > 0 && toks[i - 1].0 == Tok::PathSep) =>
            {
                let line = toks[i].1;
                let mut base: ModPath = if start == "crate" {
                    Vec::new()
                } else {
                    module
                        .iter()
                        .cloned()
                        .chain(inline.iter().map(|(n, _)| n.clone()))
                        .collect()
                };
                let mut j = i;
                if start == "super" {
                    while ident(j) == Some("super")
                        && toks.get(j + 1).is_some_and(|t| t.0 == Tok::PathSep)
                    {
                        base.pop();
                        j += 2;
                    }
                } else {
                    j += 2;
                }
                let mut found = Vec::new();
                j = path_tree(&toks, j, base, &mut found);
                let in_tests = inline.iter().any(|(n, _)| n == "tests");
                out.extend(found.into_iter().map(|(p, _)| (p, line, in_tests)));
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// A path named in the code, and the name it is known by there (its last segment, or the
/// alias of a `use … as`).
type Named = (ModPath, String);

/// Reads a path or `use` tree starting at `toks[at]` below `prefix`; returns where it ended.
fn path_tree(
    toks: &[(Tok, usize)],
    mut at: usize,
    mut prefix: ModPath,
    out: &mut Vec<Named>,
) -> usize {
    let ident = |k: usize| match toks.get(k) {
        Some((Tok::Ident(s), _)) => Some(s.as_str()),
        _ => None,
    };
    loop {
        match toks.get(at).map(|t| &t.0) {
            Some(Tok::Ident(s)) if s == "self" => {
                at += 1;
            }
            Some(Tok::Ident(s)) => {
                prefix.push(s.clone());
                at += 1;
                if toks.get(at).is_some_and(|t| t.0 == Tok::PathSep) {
                    at += 1;
                    continue;
                }
                let mut name = s.clone();
                if ident(at) == Some("as") {
                    if let Some(alias) = ident(at + 1) {
                        name = alias.to_owned();
                    }
                    at += 2;
                }
                out.push((prefix, name));
                return at;
            }
            Some(Tok::Open) => {
                at += 1;
                loop {
                    match toks.get(at).map(|t| &t.0) {
                        None => return at,
                        Some(Tok::Close) => return at + 1,
                        Some(Tok::Comma) => at += 1,
                        Some(Tok::Ident(_) | Tok::Open) => {
                            at = path_tree(toks, at, prefix.clone(), out);
                        }
                        Some(_) => {
                            let name = prefix.last().cloned().unwrap_or_default();
                            out.push((prefix.clone(), name));
                            at += 1;
                        }
                    }
                }
            }
            _ => {
                let name = prefix.last().cloned().unwrap_or_default();
                out.push((prefix, name));
                return at;
            }
        }
    }
}

/// What a file re-exports (`pub use`, `pub(crate) use`, …): each name with the path it stands
/// for. Globs are left out.
fn reexports(text: &str, module: &[String]) -> Vec<Named> {
    let toks = tokens(&code_only(text));
    let mut out = Vec::new();
    for i in 0..toks.len() {
        if toks[i].0 != Tok::Ident("use".into()) {
            continue;
        }
        let public = match i.checked_sub(1).map(|k| &toks[k].0) {
            Some(Tok::Ident(p)) => p == "pub",
            // `pub(crate) use`, `pub(super) use`
            Some(Tok::Other(')')) => {
                i >= 4
                    && toks[i - 4].0 == Tok::Ident("pub".into())
                    && toks[i - 3].0 == Tok::Other('(')
            }
            _ => false,
        };
        if !public {
            continue;
        }
        let (mut base, mut at): (ModPath, usize) = (module.to_vec(), i + 1);
        match toks.get(at).map(|t| &t.0) {
            Some(Tok::Ident(s)) if s == "crate" => {
                base.clear();
                at += 2;
            }
            Some(Tok::Ident(s)) if s == "super" => {
                while toks
                    .get(at)
                    .is_some_and(|t| t.0 == Tok::Ident("super".into()))
                {
                    base.pop();
                    at += 2;
                }
            }
            _ => {}
        }
        path_tree(&toks, at, base, &mut out);
    }
    out
}

/// Module and room graphs of a source tree given as (path below `src/`, text).
fn graphs<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> (Graph, BTreeMap<String, Graph>) {
    let files: Vec<(&str, &str)> = files.into_iter().collect();
    let modules: BTreeSet<ModPath> = files.iter().map(|(p, _)| module_of(p)).collect();
    let module_part = |mut path: ModPath| {
        while !path.is_empty() && !modules.contains(&path) {
            path.pop();
        }
        path
    };
    // (module, name) → the module the name really comes from.
    let mut origin: BTreeMap<(ModPath, String), ModPath> = BTreeMap::new();
    for (path, text) in &files {
        let from = module_of(path);
        for (target, name) in reexports(text, &from) {
            let target = module_part(target);
            if target != from {
                origin.insert((from.clone(), name), target);
            }
        }
    }
    // The module a path's item is defined in, seen through re-exports.
    let resolve = |mut path: ModPath| {
        for _ in 0..8 {
            let module = module_part(path.clone());
            let Some(name) = path.get(module.len()) else {
                return module;
            };
            match origin.get(&(module.clone(), name.clone())) {
                Some(target) => path = target.iter().cloned().chain([name.clone()]).collect(),
                None => return module,
            }
        }
        module_part(path)
    };
    let mut rooms = Graph::default();
    let mut inner: BTreeMap<String, Graph> = BTreeMap::new();
    for (path, text) in &files {
        let from = module_of(path);
        let Some(room) = from.first() else { continue };
        // Test code sits above what it tests: it may build a room's state from its builder,
        // which would otherwise read as a cycle inside the room. Between rooms it still counts.
        let test_file = path.ends_with("/tests.rs") || path.contains("/tests/");
        for (to, line, in_tests) in references(text, &from) {
            let to = resolve(to);
            let Some(to_room) = to.first() else { continue };
            let seen = format!("{path}:{line}");
            if to_room != room {
                rooms.add(room, to_room, seen);
            } else if test_file || in_tests {
                continue;
            } else if let (Some(a), Some(b)) = (from.get(1), to.get(1)) {
                inner.entry(room.clone()).or_default().add(
                    &format!("{room}::{a}"),
                    &format!("{room}::{b}"),
                    seen,
                );
            }
        }
    }
    (rooms, inner)
}

fn read_tree(dir: &Path, rel: &str, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 file name");
        let rel = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        if path.is_dir() {
            read_tree(&path, &rel, out);
        } else if rel.ends_with(".rs") && rel != "main.rs" {
            // main.rs is the binary's own crate; it reaches the library as `sluice::`.
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
            out.push((rel, text));
        }
    }
}

fn agent_sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    read_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut files,
    );
    assert!(files.len() > 20, "found only {} source files", files.len());
    files
}

#[test]
fn no_cycle_between_rooms() {
    let files = agent_sources();
    let (rooms, _) = graphs(files.iter().map(|(p, t)| (p.as_str(), t.as_str())));
    let cycles = rooms.cycles();
    assert!(
        cycles.is_empty(),
        "rooms of agent/src import each other:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn no_cycle_inside_a_room() {
    let files = agent_sources();
    let (_, inner) = graphs(files.iter().map(|(p, t)| (p.as_str(), t.as_str())));
    let cycles: Vec<String> = inner.values().flat_map(|g| g.cycles()).collect();
    assert!(
        cycles.is_empty(),
        "modules of one room import each other:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_checker_sees_cycles_through_every_kind_of_path() {
    let (rooms, inner) = graphs([
        ("lib.rs", "pub mod a; pub mod b; pub mod c;"),
        // A grouped `use` with a nested group and an alias.
        (
            "a/mod.rs",
            "use crate::{x::Y, b::{self, inner::Z as W}};\nmod sub;",
        ),
        // `super::super` from a file two levels down climbs to the root.
        ("a/sub/deep.rs", "fn f() { super::super::super::c::go(); }"),
        ("a/sub/mod.rs", "pub mod deep;"),
        // An expression path in a file of room b; comments and strings do not count.
        (
            "b/mod.rs",
            "// crate::c::no\nfn g() { let _ = \"crate::c::no\"; crate::c::go(); }",
        ),
        ("b/inner.rs", ""),
        // An inline test module: its `super` is c itself, so `super::super::a` is the room a.
        (
            "c.rs",
            "pub fn go() {}\n#[cfg(test)] mod tests { use super::super::a::T; }",
        ),
        // Inside a room: sibling modules through `super::`, and through the room's re-export.
        (
            "d/mod.rs",
            "mod p; mod q; pub use p::P; pub(crate) use q::Q as Renamed;",
        ),
        ("d/p.rs", "use super::{Renamed, D};"),
        ("d/q.rs", "fn f() -> super::P { todo!() }"),
    ]);
    let cycles = rooms.cycles();
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(
        cycles[0].starts_with("cycle among {a, b, c}:"),
        "{}",
        cycles[0]
    );
    for edge in [
        "a -> b  (a/mod.rs:1)",
        "b -> c  (b/mod.rs:2)",
        "c -> a  (c.rs:2)",
    ] {
        assert!(
            cycles[0].contains(edge),
            "{edge} missing from {}",
            cycles[0]
        );
    }
    assert!(!rooms.edges["a"].contains_key("x"), "x is no module");
    assert_eq!(rooms.edges["a"]["c"], "a/sub/deep.rs:1");
    let d = inner["d"].cycles();
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].contains("d::p -> d::q") && d[0].contains("d::q -> d::p"),
        "{}",
        d[0]
    );
    // Test code that builds a room's state from its builder is no cycle inside the room.
    let (_, inner) = graphs([
        ("e/mod.rs", "mod build; mod part;"),
        ("e/build.rs", "use super::part::Part;"),
        (
            "e/part.rs",
            "pub struct Part;\n#[cfg(test)] mod tests { use super::super::build::b; }",
        ),
        ("e/part/tests.rs", "use crate::e::build::b;"),
    ]);
    assert!(inner["e"].cycles().is_empty(), "{:?}", inner["e"].cycles());
    // Without the back-edge there is no cycle.
    let (acyclic, _) = graphs([("a.rs", "use crate::b::X;"), ("b.rs", "pub struct X;")]);
    assert!(acyclic.cycles().is_empty());
}

/// Prints the room graph: `cargo test -p sluice --lib layering -- --ignored --nocapture`.
#[test]
#[ignore = "prints the graph for reading; checks nothing"]
fn print_room_graph() {
    let files = agent_sources();
    let (rooms, _) = graphs(files.iter().map(|(p, t)| (p.as_str(), t.as_str())));
    for (from, to) in &rooms.edges {
        let to: Vec<&str> = to.keys().map(String::as_str).collect();
        println!("{from} -> {}", to.join(", "));
    }
}
