//! Rules that keep the sources a house a newcomer can walk into, checked on the text of the
//! sources (no parser: comments, strings and character literals are blanked out first, the
//! rest is read by its braces):
//!
//! - no function outside a `#[cfg(test)]` module is longer than [`MAX_FN_LINES`] lines
//!   (from its `fn` line to its closing brace), in core/src and src/;
//! - the top-level modules of core/src (`error`, `config`, `metrics`, ...) import each other
//!   without a circle (an edge is any `crate::<module>` in a module's files), and `error`,
//!   the bottom, imports none of them. docs/ARCHITECTURE.md lists the edges.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_FN_LINES: usize = 100;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The source with comments, string literals and character literals replaced by spaces
/// (newlines kept, so line numbers and columns stay), leaving the code's own braces.
fn blank_non_code(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let prev_ident = i > 0 && ident(b[i - 1]);
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = src[i..].find('\n').map_or(b.len(), |n| i + n);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // Block comments nest in Rust.
                let (mut depth, mut j) = (1, i + 2);
                while j < b.len() && depth > 0 {
                    if b[j..].starts_with(b"/*") {
                        depth += 1;
                        j += 2;
                    } else if b[j..].starts_with(b"*/") {
                        depth -= 1;
                        j += 2;
                    } else {
                        j += 1;
                    }
                }
                blank(&mut out, i, j);
                i = j;
            }
            // Raw strings: r"..", r#".."#, br#".."#.
            b'r' | b'b' if !prev_ident && raw_string_start(&b[i..]).is_some() => {
                let (hashes, open) = raw_string_start(&b[i..]).unwrap();
                let close = format!("\"{}", "#".repeat(hashes)).into_bytes();
                let body = i + open;
                let end = b[body..]
                    .windows(close.len())
                    .position(|w| w == close.as_slice())
                    .map_or(b.len(), |n| body + n + close.len());
                blank(&mut out, i, end);
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            }
            b'\'' => {
                // A character literal ('x', '\n', '\u{7f}', '{'), or a lifetime ('a).
                let end = if b.get(i + 1) == Some(&b'\\') {
                    b[i + 2..]
                        .iter()
                        .position(|&c| c == b'\'')
                        .map(|n| i + 2 + n)
                } else {
                    let c = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                    (b.get(i + 1 + c) == Some(&b'\'')).then_some(i + 1 + c)
                };
                match end {
                    Some(end) => {
                        blank(&mut out, i, end + 1);
                        i = end + 1;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).expect("only ASCII was written over")
}

/// `Some((number of #, length of the opening))` when `s` starts a raw (byte) string.
fn raw_string_start(s: &[u8]) -> Option<(usize, usize)> {
    let after_prefix = match s {
        [b'b', b'r', ..] => 2,
        [b'r', ..] => 1,
        _ => return None,
    };
    let hashes = s[after_prefix..].iter().take_while(|&&c| c == b'#').count();
    (s.get(after_prefix + hashes) == Some(&b'"')).then_some((hashes, after_prefix + hashes + 1))
}

/// The index of the brace closing the one at `open`.
fn matching_brace(code: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    for (j, &c) in code.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return j;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces")
}

/// The items that follow a `#[cfg(test)]` that are modules: (where the attribute is, the
/// module's name, where its item starts).
fn test_module_items(code: &str) -> Vec<(usize, String, usize)> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("#[cfg(test)]") {
        let rest = code[at + "#[cfg(test)]".len()..].trim_start();
        // Other attributes may follow before the item.
        let mut rest = rest;
        while rest.starts_with("#[") {
            rest = rest[rest.find(']').map_or(rest.len(), |n| n + 1)..].trim_start();
        }
        let rest = rest.strip_prefix("pub(crate) ").unwrap_or(rest);
        let rest = rest.strip_prefix("pub ").unwrap_or(rest);
        let Some(name) = rest.strip_prefix("mod ") else {
            continue;
        };
        let name = name
            .trim_start()
            .chars()
            .take_while(|&c| c.is_alphanumeric() || c == '_')
            .collect();
        out.push((at, name, code.len() - rest.len()));
    }
    out
}

/// Byte ranges of the inline `#[cfg(test)]` modules (attribute to closing brace).
fn test_modules(code: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (at, _, item) in test_module_items(code) {
        match code[item..].find(['{', ';']) {
            Some(n) if code.as_bytes()[item + n] == b'{' => {
                out.push((at, matching_brace(code.as_bytes(), item + n)));
            }
            _ => {}
        }
    }
    out
}

/// The files of the `#[cfg(test)] mod name;` declarations of `file`: test code too.
fn test_module_files(file: &Path, code: &str) -> Vec<PathBuf> {
    let stem = file.file_stem().unwrap();
    let dir = if ["mod", "lib", "main"].iter().any(|s| stem == *s) {
        file.parent().unwrap().to_path_buf()
    } else {
        file.with_extension("")
    };
    let mut out = Vec::new();
    for (_, name, item) in test_module_items(code) {
        if code[item..]
            .find(['{', ';'])
            .map(|n| code.as_bytes()[item + n])
            == Some(b';')
        {
            out.push(dir.join(format!("{name}.rs")));
            out.push(dir.join(name).join("mod.rs"));
        }
    }
    out
}

/// (name, first line, length in lines) of every function with a body, outside test modules.
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let b = code.as_bytes();
    let skip = test_modules(code);
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    for (at, _) in code.match_indices("fn") {
        if (at > 0 && is_ident(b[at - 1])) || skip.iter().any(|&(s, e)| (s..=e).contains(&at)) {
            continue;
        }
        let rest = &code[at + 2..];
        let name_start = rest.len() - rest.trim_start().len();
        if name_start == 0 {
            continue; // `fn(` is a function pointer type; `fnord` an identifier
        }
        let name: String = rest[name_start..]
            .chars()
            .take_while(|&c| c.is_alphanumeric() || c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        // The body opens at the first `{` outside parentheses and brackets (`[u8; 4]` in a
        // signature has a `;` of its own); a `;` there first means no body.
        let mut depth = 0i32;
        let mut open = None;
        for (j, &c) in b.iter().enumerate().skip(at) {
            match c {
                b'(' | b'[' => depth += 1,
                b')' | b']' => depth -= 1,
                b'{' if depth == 0 => {
                    open = Some(j);
                    break;
                }
                b';' if depth == 0 => break,
                _ => {}
            }
        }
        if let Some(open) = open {
            let close = matching_brace(b, open);
            let first = line_of(at);
            out.push((name, first, line_of(close) - first + 1));
        }
    }
    out
}

#[test]
fn no_function_outside_tests_is_longer_than_100_lines() {
    let mut too_long = Vec::new();
    for dir in ["core/src", "src"] {
        let files = rust_files(&root().join(dir));
        let mut test_files = BTreeSet::new();
        let code: Vec<String> = files
            .iter()
            .map(|file| {
                let code = blank_non_code(&fs::read_to_string(file).unwrap());
                test_files.extend(test_module_files(file, &code));
                code
            })
            .collect();
        for (file, code) in files.iter().zip(&code) {
            if test_files.contains(file) {
                continue;
            }
            for (name, line, lines) in functions(code) {
                if lines > MAX_FN_LINES {
                    let shown = file.strip_prefix(root()).unwrap().display();
                    too_long.push(format!("{shown}:{line}: fn {name}: {lines} lines"));
                }
            }
        }
    }
    assert!(
        too_long.is_empty(),
        "functions longer than {MAX_FN_LINES} lines (split them along their logic):\n{}",
        too_long.join("\n")
    );
}

/// `module -> the other top-level modules it names`, for every top-level module of core/src.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join("core/src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src) {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap();
        let module = Path::new(first.as_os_str())
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if module == "lib" {
            continue;
        }
        let code = blank_non_code(&fs::read_to_string(&file).unwrap());
        let edges = graph.entry(module.clone()).or_default();
        for name in crate_paths(&code) {
            if name != module {
                edges.insert(name);
            }
        }
    }
    graph
}

/// The first segment of every `crate::` path, `use crate::{a::x, b}` included.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|&c| c.is_alphanumeric() || c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `$crate::` or `other_crate::`
        }
        let rest = code[at + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: split at commas outside nested braces.
            let (mut depth, mut start) = (0, 0);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(group[start..j].trim_start()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(group[start..j].trim_start()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

/// A circle of the graph, as `a -> b -> ... -> a`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn listing(graph: &BTreeMap<String, BTreeSet<String>>) -> String {
    graph
        .iter()
        .map(|(m, edges)| {
            let edges: Vec<_> = edges.iter().map(String::as_str).collect();
            format!("{m} -> {}", edges.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn top_level_modules_import_each_other_without_a_circle() {
    let graph = import_graph();
    assert!(graph.contains_key("error") && graph.contains_key("plugin"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "the modules of core/src import each other in a circle: {}\nthe edges:\n{}",
            cycle.join(" -> "),
            listing(&graph)
        );
    }
    assert!(
        graph["error"].is_empty(),
        "error is the bottom: it imports no other module of the crate, but names {:?}",
        graph["error"]
    );
}

#[test]
fn the_scanner_reads_braces_of_code_only() {
    let src = r###"
        fn a() { let s = "}"; let c = '}'; let r = r#"}"#; // }
            /* } /* } */ */ let l: &'static str = "{"; let e = '\''; }
        fn b(x: [u8; 2]) -> [(u8, &'static str); 1] {
            let t = crate::{error::Error, config};
        }
        fn pointer(f: fn(u8)) {}
        trait T { fn declared(&self); }
        #[cfg(test)]
        mod tests {
            fn hidden() {}
        }
    "###;
    let code = blank_non_code(src);
    let found: Vec<_> = functions(&code)
        .into_iter()
        .map(|(name, _, lines)| (name, lines))
        .collect();
    assert_eq!(
        found,
        [("a".into(), 2), ("b".into(), 3), ("pointer".into(), 1)]
    );
    assert_eq!(
        crate_paths(&code),
        ["config".to_string(), "error".to_string()].into()
    );
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "a"]);
}
