//! The compiler's real output, not hand-built IR: every scenario in
//! `tests/scenarios`, every step, for both lab nodes, applied one after the
//! other in one namespace (so every apply after the first is a diff between
//! two unrelated rulesets); after each apply the kernel must hold exactly
//! the desired ruleset.

mod common;
use common::canonical;

use std::path::Path;

use compiler::nft::{TableFamily, TABLE_NAME};
use compiler::{compile_nftables, CompileOptions};
use model::scenario::{Scenario, NODES};

#[test]
fn every_scenario_step_applies_and_reads_back() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());

    let (_ns, mut p) = common::setup("compiled");
    let mut applies = 0;
    let mut messages = 0;
    for file in &files {
        let scenario = Scenario::load(file).unwrap();
        for (step, state) in scenario.states().unwrap().iter().enumerate() {
            for node in NODES {
                let (_, rs) = compile_nftables(&state.cluster, &CompileOptions::new(node)).unwrap();
                let what = format!("{} step {} node {node}", file.display(), step + 1);
                let r = p.apply(&rs).unwrap_or_else(|e| panic!("{what}: {e}"));
                messages += r.messages;
                applies += 1;
                let want = canonical(&rs);
                for family in [TableFamily::Ip, TableFamily::Ip6] {
                    let got = p.read_back(family, TABLE_NAME).unwrap();
                    let want = want.tables.iter().find(|t| t.family == family);
                    assert_eq!(got.as_ref(), want, "{what}: {family:?} table differs");
                }
                assert!(!p.has_drift().unwrap(), "{what}");
                // Applying the same again sends nothing.
                assert_eq!(p.apply(&rs).unwrap().messages, 0, "{what}");
            }
        }
    }
    eprintln!(
        "{} scenarios, {applies} applies, {messages} messages",
        files.len()
    );
}

/// What each listing check compiles: the default, `--fused-lookup`, and
/// the default cut into three namespace groups' tables.
const VARIANTS: [(&str, bool, usize); 3] = [
    ("default", false, 1),
    ("--fused-lookup", true, 1),
    ("--table-groups 3", false, 3),
];

#[test]
fn nft_lists_our_programming_like_the_compilers_text_rendering() {
    // Two independent lowerings of the same IR — our netlink encoding and
    // compiler::render_nft's nft syntax loaded by nft — must list the same,
    // for every form the agent can program: `nft list ruleset` is what
    // operators (and other tools on the node) read, and a rule form nft
    // cannot print makes it fail for the whole ruleset.
    if !testkit::netns::nft_available() {
        eprintln!("skipping: the nft binary (the oracle) is not installed");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut mismatches = Vec::new();
    for (variant, fused_lookup, groups) in VARIANTS {
        let (ns, mut p) = common::setup("compiled-nft");
        let reference = testkit::netns::Netns::create("compiled-ref").unwrap();
        for file in &files {
            let scenario = Scenario::load(file).unwrap();
            let states = scenario.states().unwrap();
            let Some(state) = states.last() else { continue };
            let opts = CompileOptions {
                fused_lookup,
                ..CompileOptions::new(NODES[0])
            };
            let (logical, mut rs) = compile_nftables(&state.cluster, &opts).unwrap();
            if groups > 1 {
                rs = compiler::groups::cut_by_namespace(&logical, &rs, groups).1;
            }
            p.apply(&rs).unwrap();
            let ours = normalized(&ns.nft(&["-j", "list", "ruleset"]).unwrap_or_else(|e| {
                panic!("{variant}, {}: nft cannot list it: {e}", file.display())
            }));
            let script = format!("flush ruleset\n{}", compiler::render_nft::render(&rs));
            reference.nft_script(&[], &script).unwrap();
            let theirs = normalized(&reference.nft(&["-j", "list", "ruleset"]).unwrap());
            if ours != theirs {
                let diff: Vec<String> = ours
                    .iter()
                    .zip(theirs.iter())
                    .filter(|(a, b)| a != b)
                    .take(3)
                    .map(|(a, b)| format!("  ours:   {a}\n  render: {b}"))
                    .collect();
                mismatches.push(format!(
                    "{variant}, {}:\n{}",
                    file.display(),
                    diff.join("\n")
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} scenarios differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// `nft -j list ruleset` without what depends on the order of creation
/// (handles, object order, hash-set element order): one JSON line per
/// object, sorted, rules kept in chain order.
fn normalized(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut objects = Vec::new();
    let mut rules: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for item in v["nftables"].as_array().unwrap() {
        let mut item = item.clone();
        let Some((kind, body)) = item.as_object_mut().and_then(|o| o.iter_mut().next()) else {
            continue;
        };
        if kind == "metainfo" {
            continue;
        }
        let obj = body.as_object_mut().unwrap();
        obj.remove("handle");
        if let Some(serde_json::Value::Array(elems)) = obj.get_mut("elem") {
            elems.sort_by_key(|e| e.to_string());
        }
        let line = format!("{kind} {}", serde_json::Value::Object(obj.clone()));
        if kind == "rule" {
            let key = format!("{} {} {}", obj["family"], obj["table"], obj["chain"]);
            rules.entry(key).or_default().push(line);
        } else {
            objects.push(line);
        }
    }
    objects.sort();
    objects.extend(rules.into_values().flatten());
    objects
}
