//! The module layering, checked on the source: no import cycle between the crate's top-level
//! modules, and no module importing from a layer above its own. Run alone with
//! `cargo test --test it architecture -- --nocapture` to print the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom to top. A module may use the modules of the layers below its own, never its own
/// layer's others nor a layer above.
const LAYERS: &[&[&str]] = &[
    &["error", "fsutil", "runner", "aws", "clock"],
    &["secrets", "systemd", "docker", "facts", "config", "state", "fetch"],
    &["template", "logging", "runlock"],
    &["step"],
    &["role"],
    &["source"],
    &["reboot"],
    &["asg"],
    &["engine"],
    &["rollout"],
    &["metrics"],
    &["agent"],
    &["cli"],
];

/// `crate::x` names used by each top-level module, test modules left out.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            let top = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
            if top == "main" || top == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let code = match text.find("#[cfg(test)]\nmod tests") {
                Some(i) => &text[..i],
                None => &text[..],
            };
            let used = out.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    let group = &group[..group.find('}').unwrap_or(group.len())];
                    for item in group.split(',') {
                        let name: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                        if !name.is_empty() {
                            used.insert(name);
                        }
                    }
                } else {
                    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    used.insert(name);
                }
            }
            used.remove(&top);
        }
    }
    out
}

fn layer_of(m: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&m))
}

#[test]
fn modules_form_layers_without_cycles() {
    let graph = imports();
    for (m, used) in &graph {
        println!("{m} -> {}", used.iter().cloned().collect::<Vec<_>>().join(", "));
    }
    let mut wrong = Vec::new();
    for (m, used) in &graph {
        let Some(lm) = layer_of(m) else {
            wrong.push(format!("module {m} is in no layer: add it to LAYERS"));
            continue;
        };
        for u in used {
            match layer_of(u) {
                Some(lu) if lu < lm => {}
                Some(lu) => wrong.push(format!("{m} (layer {lm}) uses {u} (layer {lu})")),
                None if graph.contains_key(u) => wrong.push(format!("module {u} is in no layer")),
                // A crate-root item (a macro, a re-export), not a module.
                None => {}
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}
