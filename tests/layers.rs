//! The crate's layers, bottom up, and the check that every file imports only
//! from its own layer or a lower one, with no import loop inside a layer (the
//! builder and the locker it builds aside). Read from the source: a `crate::`
//! or `super::` path in code (comments and test modules left out), resolved to
//! the file that defines it, `lib.rs`'s re-exports followed.
//!
//! A new file under `src/` must be given a layer here, which is the point: the
//! stack is decided, not discovered.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first: a module path (`ops::acquire`), or a folder's
/// `mod.rs` by the folder's name (`ops`).
const LAYERS: &[(&str, &[&str])] = &[
    (
        "values: arithmetic, tokens, errors",
        &[
            "address", "clock", "error", "lease", "metrics", "names", "quorum", "retry", "slot",
            "token", "value",
        ],
    ),
    (
        "the instance seam",
        &[
            "epoch",
            "instance",
            "instance::cluster",
            "instance::cluster::view",
            "instance::connect",
            "instance::memory",
            "instance::memory::adapter",
            "instance::memory::clock",
            "instance::memory::faults",
            "instance::memory::store",
            "instance::redis",
            "instance::sentinel",
            "peer",
            "peer::explain",
            "peer::sniff",
            "scripts",
            "tls",
        ],
    ),
    (
        "each instance's standing",
        &[
            "standing",
            "standing::identities",
            "standing::member",
            "standing::policy",
            "standing::state",
        ],
    ),
    (
        "what a locker shares",
        &["background", "handoff", "monitor::handle", "shared"],
    ),
    (
        "the monitor and the fan-out",
        &["fanout", "monitor", "monitor::probe"],
    ),
    (
        "the operations",
        &[
            "ops",
            "ops::acquire",
            "ops::attempts",
            "ops::extend",
            "ops::fencing",
            "ops::held",
            "ops::lifetime",
            "ops::pacing",
            "ops::release",
        ],
    ),
    ("the handles", &["guard", "lock", "status"]),
    (
        "the public front",
        &[
            "blocking",
            "builder",
            "builder::tls",
            "health",
            "inspect",
            "locker",
            "request",
            "semaphore",
        ],
    ),
];

/// Imports both ways allowed inside a layer: `QuorumLocker::builder()` and
/// `Builder::build()`.
const PAIRS: &[(&str, &str)] = &[("builder", "locker"), ("locker", "builder")];

/// Outside the stack: the facade, the fixture for tests, the CLI.
fn outside(module: &str) -> bool {
    module.is_empty() || module == "testing" || module.starts_with("testing::")
}

/// Every `.rs` file under `src/` but `bin/`, by module path.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<String, PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src/") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|name| name != "bin") {
                    walk(&path, src, out);
                }
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let relative = path
                .strip_prefix(src)
                .expect("under src/")
                .with_extension("");
            let mut parts: Vec<String> = relative
                .iter()
                .map(|part| part.to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            out.insert(parts.join("::"), path);
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The code of a file: comments and everything from its test module on left
/// out (tests may reach anywhere).
fn code(text: &str) -> String {
    let text = text
        .find("#[cfg(test)]\nmod tests")
        .map_or(text, |at| &text[..at]);
    text.lines()
        .map(|line| match line.find("//") {
            // A `//` inside a string would cut the line short: harmless here,
            // since a path is never split across one.
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths a file names, as `a::b::c` from the crate root: `crate::` and
/// `super::` paths, with `{…}` groups expanded one level at a time.
fn paths(module: &str, code: &str) -> Vec<String> {
    let mut found = Vec::new();
    // `super` of a folder's `mod.rs` is the folder's parent; of any other
    // file, the folder it is in.
    let parent: Vec<&str> = {
        let mut parts: Vec<&str> = module.split("::").filter(|p| !p.is_empty()).collect();
        parts.pop();
        parts
    };
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `my_crate::`, not `crate::`
            }
            let mut root = base.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            expand(&mut root, rest, &mut found);
        }
    }
    found
}

/// Reads one path at the start of `text` onto `root`, expanding a `{…}` group.
fn expand(root: &mut Vec<String>, text: &str, found: &mut Vec<String>) {
    let mut text = text;
    loop {
        let end = text
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(text.len());
        let segment = &text[..end];
        if !segment.is_empty() && segment != "self" {
            root.push(segment.to_string());
        }
        text = &text[end..];
        if let Some(after) = text.strip_prefix("::") {
            if let Some(group) = after.strip_prefix('{') {
                let close = matching_brace(group);
                for item in split_top(&group[..close]) {
                    expand(&mut root.clone(), item.trim(), found);
                }
                return;
            }
            text = after;
            continue;
        }
        found.push(root.join("::"));
        return;
    }
}

fn matching_brace(text: &str) -> usize {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

fn split_top(text: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0, 0, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items
}

/// `lib.rs`'s `pub use` lines: a re-exported name and the module it comes from.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for statement in code(lib).split(';') {
        let Some(at) = statement.find("pub use ") else {
            continue;
        };
        let mut found = Vec::new();
        expand(&mut Vec::new(), statement[at + 8..].trim(), &mut found);
        for path in found {
            if let Some((module, name)) = path.rsplit_once("::") {
                names.insert(name.to_string(), module.to_string());
            }
        }
    }
    names
}

/// The module a path lands in: its longest prefix that is a file.
fn resolve(
    path: &str,
    modules: &BTreeMap<String, PathBuf>,
    names: &BTreeMap<String, String>,
) -> Option<String> {
    let first = path.split("::").next().unwrap_or_default();
    let path = match names.get(first) {
        Some(module) if !modules.contains_key(first) => format!("{module}::{path}"),
        _ => path.to_string(),
    };
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|candidate| modules.contains_key(candidate))
}

/// Every core file's imports of other core files.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let names = reexports(&lib);
    let mut graph = BTreeMap::new();
    for (module, path) in &modules {
        if outside(module) {
            continue;
        }
        let text = std::fs::read_to_string(path).expect("read a source file");
        let targets: BTreeSet<String> = paths(module, &code(&text))
            .iter()
            .filter_map(|path| resolve(path, &modules, &names))
            .filter(|target| target != module && !outside(target))
            // A folder's `mod.rs` declares its files; that is not a use.
            .filter(|target| !target.starts_with(&format!("{module}::")))
            .collect();
        graph.insert(module.clone(), targets);
    }
    graph
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

#[test]
fn every_file_has_a_layer() {
    let missing: Vec<String> = imports()
        .into_keys()
        .filter(|module| layer_of(module).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "give these files a layer in tests/layers.rs: {missing:?}"
    );
    for (_, modules) in LAYERS {
        for module in *modules {
            assert!(
                imports().contains_key(*module),
                "tests/layers.rs names `{module}`, which is not a file under src/"
            );
        }
    }
}

#[test]
fn imports_only_go_down() {
    let mut upward = Vec::new();
    for (module, targets) in imports() {
        let Some(layer) = layer_of(&module) else {
            continue;
        };
        for target in targets {
            if let Some(above) = layer_of(&target).filter(|&other| other > layer) {
                upward.push(format!(
                    "{module} ({}) imports {target} ({})",
                    LAYERS[layer].0, LAYERS[above].0
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports up the stack:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_loop_inside_a_layer() {
    let graph = imports();
    let same_layer =
        |from: &str, to: &str| layer_of(from) == layer_of(to) && !PAIRS.contains(&(from, to));
    // A depth-first search for a back edge, over same-layer imports.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        same_layer: &dyn Fn(&str, &str) -> bool,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| *m == module) {
            let mut cycle: Vec<String> = path[at..].iter().map(|m| m.to_string()).collect();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        if !done.insert(module) {
            return None;
        }
        path.push(module);
        for target in graph.get(module).into_iter().flatten() {
            if same_layer(module, target) {
                if let Some(cycle) = visit(target, graph, same_layer, path, done) {
                    return Some(cycle);
                }
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = visit(module, &graph, &same_layer, &mut path, &mut done) {
            panic!("an import loop: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_reader_sees_real_imports() {
    // The check itself: a file known to import another is seen to.
    let graph = imports();
    let fanout = &graph["fanout"];
    assert!(fanout.contains("shared"), "{fanout:?}");
    assert!(fanout.contains("standing::state"), "{fanout:?}");
    let lock = &graph["lock"];
    assert!(lock.contains("ops::acquire"), "{lock:?}");
    // `crate::Error` comes through lib.rs's re-export.
    assert!(graph["request"].contains("error"), "{:?}", graph["request"]);
}
