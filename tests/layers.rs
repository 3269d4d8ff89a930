//! Imports run one way: a top-level module of `src/` may use only the modules before it in
//! [`ORDER`], so the crate reads bottom-up and no two modules need each other.
//!
//! Every `src/**/*.rs` is read, test modules included (a test that reaches up a layer couples the
//! layers just the same). A reference is any path that names a top-level module: `crate::x`
//! (in `use` lines, groups over several lines such as `use crate::{a::B, c::D}`, and inline
//! paths), `super::` that climbs out of its top-level module, and, in `main.rs` (the binary, on
//! top of everything), `weft::x`. Comments and string literals are skipped, so a doc link is no
//! import. Run it with `cargo test --test layers`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first: a module may use only the modules to its left.
const ORDER: &[&str] = &[
    "escape",
    "pages",
    "network",
    "model",
    "config",
    "sources",
    "slots",
    "render",
    "haproxy",
    "bridge",
    "metrics",
    "status",
    "controller",
    "demo",
];

/// One path from one file to a top-level module.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    line: usize,
    /// The top-level module named, as written after `crate::` (or reached by `super::`).
    target: String,
}

#[test]
fn every_import_goes_down_the_layers() {
    let mut problems = Vec::new();
    for (file, from) in source_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let shown = file
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(&file);
        let Some(at) = ORDER.iter().position(|m| *m == from) else {
            if from != "lib" && from != "main" {
                problems.push(format!(
                    "{}: top-level module {from} is not in ORDER (tests/layers.rs): add it where \
                     its imports put it",
                    shown.display()
                ));
            }
            // The crate root declares the modules; the binary sits on top of them all.
            continue;
        };
        for reference in references(&text, &module_path(&file)) {
            let target = reference.target.as_str();
            match ORDER.iter().position(|m| *m == target) {
                Some(to) if to < at => {}
                Some(_) if target == from => {}
                Some(_) => problems.push(format!(
                    "{}:{}: {from} -> {target}: {target} is not below {from} in the layer order \
                     ({})",
                    shown.display(),
                    reference.line,
                    ORDER.join(" <- "),
                )),
                None => problems.push(format!(
                    "{}:{}: {from} -> crate::{target}: not a top-level module (a path through \
                     a re-export at the crate root hides the edge)",
                    shown.display(),
                    reference.line,
                )),
            }
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

#[test]
fn the_binary_uses_only_known_modules() {
    let main = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/main.rs");
    let text = std::fs::read_to_string(&main).unwrap();
    let unknown: Vec<String> = crate_references(&strip(&text), "weft")
        .into_iter()
        .filter(|r| !ORDER.contains(&r.target.as_str()))
        .map(|r| format!("src/main.rs:{}: weft::{}", r.line, r.target))
        .collect();
    assert!(unknown.is_empty(), "not a module in ORDER: {unknown:?}");
}

/// Whatever ORDER says, the modules' graph itself must have no cycle: otherwise no order could
/// ever be right, and the message says which modules to pull apart.
#[test]
fn the_modules_import_one_another_without_a_cycle() {
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (file, from) in source_files() {
        if from == "lib" || from == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let shown = file
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(&file);
        for reference in references(&text, &module_path(&file)) {
            if reference.target != from {
                graph
                    .entry(from.clone())
                    .or_default()
                    .entry(reference.target)
                    .or_insert_with(|| format!("{}:{}", shown.display(), reference.line));
            }
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        let edges: Vec<String> = cycle
            .windows(2)
            .map(|pair| {
                format!(
                    "  {} -> {} ({})",
                    pair[0], pair[1], graph[&pair[0]][&pair[1]]
                )
            })
            .collect();
        panic!(
            "the modules import each other in a cycle:\n{}",
            edges.join("\n")
        );
    }
}

#[test]
fn order_names_every_module_once() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeSet::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() || path.extension().is_some_and(|e| e == "rs") {
            modules.insert(name);
        }
    }
    modules.remove("lib");
    modules.remove("main");
    let listed: BTreeSet<String> = ORDER.iter().map(|m| m.to_string()).collect();
    assert_eq!(listed.len(), ORDER.len(), "a module appears twice in ORDER");
    assert_eq!(modules, listed, "src/ and ORDER disagree");
}

/// The order is written down where readers look for it: the crate docs and the README.
#[test]
fn the_docs_state_the_order() {
    let chain = ORDER.join(" <- ");
    for doc in ["src/lib.rs", "README.md"] {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(doc))
            .unwrap()
            .replace("//!", " ");
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            flat.contains(&chain),
            "{doc} does not state the layer order `{chain}`"
        );
    }
}

/// Every `.rs` file under `src/`, with its top-level module (`lib` and `main` for the roots).
fn source_files() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let top = module_path(&file)
                .first()
                .cloned()
                .unwrap_or_else(|| file.file_stem().unwrap().to_string_lossy().into_owned());
            (file, top)
        })
        .collect()
}

/// The module a file is, from the crate root: `src/sources/marathon/api.rs` is
/// `[sources, marathon, api]`, `src/sources/mod.rs` is `[sources]`, the roots `[]`.
fn module_path(file: &Path) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let relative = file.strip_prefix(&src).unwrap_or(file).with_extension("");
    let mut path: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if path.last().is_some_and(|last| last == "mod") {
        path.pop();
    }
    if path.len() == 1 && (path[0] == "lib" || path[0] == "main") {
        path.clear();
    }
    path
}

/// The top-level modules a library file at `module` names, each with its line.
fn references(text: &str, module: &[String]) -> Vec<Reference> {
    let tokens = tokens(&strip(text));
    let mut found = crate_references_in(&tokens, "crate");
    found.extend(super_references(&tokens, module));
    found.sort_by_key(|r| r.line);
    found
}

fn crate_references(stripped: &str, root: &str) -> Vec<Reference> {
    crate_references_in(&tokens(stripped), root)
}

/// `root::x` and `root::{x, y::z}`: the first segment after `root::` is the top-level module.
fn crate_references_in(tokens: &[Token], root: &str) -> Vec<Reference> {
    let mut found = Vec::new();
    for i in 0..tokens.len() {
        if tokens[i].text == root && tokens.get(i + 1).is_some_and(|t| t.text == "::") {
            // `$crate` is a macro's own crate, not a path written here.
            if i > 0 && tokens[i - 1].text == "$" {
                continue;
            }
            found.extend(first_segments(tokens, i + 2));
        }
    }
    found
}

/// `super::` climbing out of the file's top-level module (through the file's inline modules,
/// such as `mod tests`) reaches the crate root: what follows names a top-level module.
fn super_references(tokens: &[Token], module: &[String]) -> Vec<Reference> {
    let mut found = Vec::new();
    // The inline modules open at this point, each with the brace depth its body starts at.
    let mut inline: Vec<usize> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        match tokens[i].text.as_str() {
            "mod"
                if tokens.get(i + 2).is_some_and(|t| t.text == "{")
                    && tokens.get(i + 1).is_some_and(|t| t.is_ident()) =>
            {
                depth += 1;
                inline.push(depth);
                i += 3;
                continue;
            }
            "{" => depth += 1,
            "}" => {
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            "super" if i == 0 || tokens[i - 1].text != "::" => {
                let mut climbs = 0;
                let mut j = i;
                while tokens.get(j).is_some_and(|t| t.text == "super")
                    && tokens.get(j + 1).is_some_and(|t| t.text == "::")
                {
                    climbs += 1;
                    j += 2;
                }
                if climbs > 0 && climbs >= module.len() + inline.len() {
                    found.extend(first_segments(tokens, j));
                }
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// The first segments of the path that starts at `tokens[at]`: one ident, or each entry of a
/// `{...}` group (`self` and globs at the crate root included, so that nothing hides).
fn first_segments(tokens: &[Token], at: usize) -> Vec<Reference> {
    let Some(first) = tokens.get(at) else {
        return Vec::new();
    };
    if first.text != "{" {
        return vec![Reference {
            line: first.line,
            target: first.text.clone(),
        }];
    }
    let mut found = Vec::new();
    let mut depth = 0;
    let mut entry_start = true;
    for token in &tokens[at..] {
        match token.text.as_str() {
            "{" => {
                depth += 1;
                if depth == 1 {
                    entry_start = true;
                    continue;
                }
            }
            "}" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "," if depth == 1 => {
                entry_start = true;
                continue;
            }
            _ => {}
        }
        if entry_start && depth == 1 {
            found.push(Reference {
                line: token.line,
                target: token.text.clone(),
            });
        }
        entry_start = false;
    }
    found
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: String,
    line: usize,
}

impl Token {
    fn is_ident(&self) -> bool {
        self.text
            .chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
    }
}

/// Identifiers, `::`, and every other character as its own token; whitespace dropped.
fn tokens(stripped: &str) -> Vec<Token> {
    let chars: Vec<char> = stripped.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            // `r#ident` is the ident.
            let text = text.strip_prefix("r#").map(str::to_string).unwrap_or(text);
            tokens.push(Token { text, line });
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push(Token {
                text: "::".into(),
                line,
            });
            i += 2;
        } else {
            tokens.push(Token {
                text: c.to_string(),
                line,
            });
            i += 1;
        }
    }
    tokens
}

/// The text with comments, string and char literals blanked out (newlines kept, so that line
/// numbers stay right).
fn strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let ident_before = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if !ident_before && raw_string_start(&chars, i).is_some() {
            let (hashes, quote) = raw_string_start(&chars, i).unwrap_or_default();
            let closing: Vec<char> = format!("\"{}", "#".repeat(hashes)).chars().collect();
            out.extend(chars[i..=quote].iter().map(|c| blank(*c)));
            i = quote + 1;
            while i < chars.len() && !chars[i..].starts_with(&closing) {
                out.push(blank(chars[i]));
                i += 1;
            }
            for _ in 0..closing.len().min(chars.len().saturating_sub(i)) {
                out.push(' ');
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                let skip = if chars[i] == '\\' { 2 } else { 1 };
                let end = (i + skip).min(chars.len());
                out.extend(chars[i..end].iter().map(|c| blank(*c)));
                i += skip;
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}'), or else a lifetime or label: left as is.
            let end = if next == Some('\\') {
                (i + 2..chars.len()).find(|&k| chars[k] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    for _ in i..=end {
                        out.push(' ');
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// At `r"`, `r#"`, `br"`...: the number of `#` and the index of the opening quote.
fn raw_string_start(chars: &[char], i: usize) -> Option<(usize, usize)> {
    let mut k = i;
    if chars.get(k) == Some(&'b') {
        k += 1;
    }
    if chars.get(k) != Some(&'r') {
        return None;
    }
    k += 1;
    let hashes = chars[k..].iter().take_while(|c| **c == '#').count();
    (chars.get(k + hashes) == Some(&'"')).then_some((hashes, k + hashes))
}

/// A cycle in `graph` as its path (first node repeated at the end), if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(BTreeMap::keys) {
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

// The checker itself: what it must see, and what it must not take for an import.

fn targets(text: &str, module: &[&str]) -> Vec<(usize, String)> {
    let module: Vec<String> = module.iter().map(|m| m.to_string()).collect();
    references(text, &module)
        .into_iter()
        .map(|r| (r.line, r.target))
        .collect()
}

#[test]
fn it_reads_use_lines_groups_and_inline_paths() {
    let text = "use crate::model::Hostname;\n\
                use crate::{\n    config::Config,\n    render::{self, CONFIG_FILE},\n};\n\
                fn f() { let _ = crate::slots::DEFAULT; }\n";
    assert_eq!(
        targets(text, &["config"]),
        [
            (1, "model".into()),
            (3, "config".into()),
            (4, "render".into()),
            (6, "slots".into())
        ]
    );
}

#[test]
fn it_follows_super_out_of_the_top_level_module() {
    let text = "use super::Health;\n\
                #[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::model::X;\n}\n";
    // In `sources::consul`, `super::` is `sources`; from its tests, `super::super::` is too.
    assert_eq!(targets(text, &["sources", "consul"]), []);
    // In the top-level `slots`, `super::` is the crate root, and from its tests
    // `super::super::` is.
    assert_eq!(
        targets(text, &["slots"]),
        [(1, "Health".into()), (5, "model".into())]
    );
}

#[test]
fn it_skips_comments_strings_and_macros_own_crate() {
    let text = "//! See [`crate::render`].\n\
                /* crate::haproxy */ let s = \"crate::status\";\n\
                let r = r#\"crate::controller \"quoted\"\"#; let c = '\"'; let l: &'static str = s;\n\
                macro_rules! m { () => { $crate::x }; }\n\
                use crate::model::Built;\n";
    assert_eq!(targets(text, &["status"]), [(5, "model".into())]);
}

#[test]
fn it_finds_a_cycle_and_names_its_edges() {
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (from, to) in [
        ("config", "render"),
        ("render", "model"),
        ("model", "config"),
    ] {
        graph
            .entry(from.into())
            .or_default()
            .insert(to.into(), format!("src/{from}.rs:1"));
    }
    let cycle = find_cycle(&graph).unwrap();
    assert_eq!(cycle, ["config", "render", "model", "config"]);
    graph.get_mut("model").unwrap().clear();
    assert_eq!(find_cycle(&graph), None);
}
