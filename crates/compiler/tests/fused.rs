//! `--fused-lookup` (`compiler::fused`): golden renderings of fused endpoint
//! chains, and what stays a chain walk. Packet-level equivalence with the
//! walk is checked in the kernel (`cargo xtask e2e --fused-lookup`).

use std::path::Path;

use compiler::nft::{Match, Ruleset, SetElement, TableFamily};
use compiler::{compile_nftables, CompileOptions};
use expect_test::expect_file;
use model::scenario::Scenario;

fn fused(node: &str) -> CompileOptions {
    CompileOptions {
        fused_lookup: true,
        ..CompileOptions::new(node)
    }
}

fn scenario_state(name: &str) -> model::state::ClusterState {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/scenarios")
        .join(name);
    let s = Scenario::load(&path).unwrap();
    s.states().unwrap().remove(0).cluster
}

fn chain_rules<'r>(rs: &'r Ruleset, chain: &str) -> &'r [compiler::nft::Rule] {
    let t = rs
        .tables
        .iter()
        .find(|t| t.family == TableFamily::Ip)
        .unwrap();
    &t.chains[chain].rules
}

/// web is selected by a deny-all and two allow policies (ingress), worker
/// by two egress policies: each endpoint chain has one lookup where the
/// walk had a jump per policy; the policy chains stay.
#[test]
fn kubernetes_policies_fuse_golden() {
    let state = scenario_state("multiple-policies-union.yaml");
    let (_, rs) = compile_nftables(&state, &fused("node1")).unwrap();
    expect_file!["golden/fused-multiple-policies-union.node1.nft"]
        .assert_eq(&compiler::render_nft::render(&rs));
    let (logical, _) = compile_nftables(&state, &CompileOptions::new("node1")).unwrap();
    let web = &logical
        .endpoints
        .values()
        .find(|e| e.key.name.contains("web"))
        .unwrap()
        .to_chain;
    let rules = chain_rules(&rs, web);
    assert!(
        rules
            .iter()
            .all(|r| !matches!(&r.verdict, Some(compiler::nft::Verdict::Jump(c)) if c.starts_with("cali-pi-"))),
        "no policy jump left in {web}"
    );
    assert!(rules.iter().any(|r| r
        .matches
        .iter()
        .any(|m| matches!(m, Match::PeerPort { .. }))));
}

/// Rules with ports and no peer (`ports` without `from`) fuse into a port
/// set per protocol; an allow-all policy into a rule that accepts
/// everything the run sees.
#[test]
fn any_peer_rules_fuse_golden() {
    let state = scenario_state("ports-without-from.yaml");
    let (_, rs) = compile_nftables(&state, &fused("node1")).unwrap();
    let text = compiler::render_nft::render(&rs);
    expect_file!["golden/fused-ports-without-from.node1.nft"].assert_eq(&text);
    assert!(
        text.contains("meta l4proto tcp th dport @cali40p-"),
        "{text}"
    );
    let state = scenario_state("ingress-allow-all.yaml");
    let (_, rs) = compile_nftables(&state, &fused("node1")).unwrap();
    let text = compiler::render_nft::render(&rs);
    assert!(
        text.contains("return comment \"Fused lookup @any: any peer, any protocol of"),
        "{text}"
    );
}

/// Calico tiers with Deny and Pass rules keep their walk (golden), and the
/// option off changes nothing.
#[test]
fn deny_and_pass_keep_the_walk_golden() {
    let state = testkit::cluster::state(&testkit::cluster::tiered());
    let (_, on) = compile_nftables(&state, &fused("node1")).unwrap();
    expect_file!["golden/fused-tiers.node1.nft"].assert_eq(&compiler::render_nft::render(&on));
    let (_, off) = compile_nftables(&state, &CompileOptions::new("node1")).unwrap();
    expect_file!["golden/tiers.node1.nft"].assert_eq(&compiler::render_nft::render(&off));
}

/// The scenarios the kernel check runs with `--fused-lookup` exercise it:
/// most of them have a fused lookup on some node, and every step of every
/// scenario compiles with it.
#[test]
fn most_scenarios_have_a_fused_lookup() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/scenarios");
    let (mut total, mut fused_any) = (0, 0);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        total += 1;
        let s = Scenario::load(&path).unwrap();
        let mut seen = false;
        for st in s.states().unwrap() {
            for node in ["node1", "node2"] {
                let (_, rs) = compile_nftables(&st.cluster, &fused(node)).unwrap();
                seen |= rs.tables.iter().any(|t| {
                    t.chains.values().flat_map(|c| &c.rules).any(|r| {
                        r.comment
                            .as_deref()
                            .is_some_and(|c| c.starts_with("Fused lookup @"))
                    })
                });
            }
        }
        fused_any += usize::from(seen);
    }
    assert!(total > 50, "{total} scenarios");
    assert!(
        2 * fused_any > total,
        "{fused_any} of {total} scenarios fuse"
    );
    eprintln!("{fused_any} of {total} scenarios have a fused lookup");
}

/// With the option on, a pod's relabel is still an element change (a
/// pod's labels are also a fused set's elements): the fused sets built
/// from the selector sets it leaves and joins follow it, under the same
/// names, and the result equals a compile from scratch.
#[test]
fn incremental_patches_fused_sets_and_matches_a_full_compile() {
    use compiler::{IncrementalCompiler, Outcome};
    use model::calico::{Kind, Resource, ResourceKey};
    let mut state = scenario_state("multiple-policies-union.yaml");
    let mut inc = IncrementalCompiler::new(fused("node1"));
    assert_eq!(
        inc.update(&state, &std::collections::BTreeMap::default())
            .unwrap(),
        Outcome::Rebuilt
    );
    let a = state
        .workload_endpoints()
        .find(|(key, w)| {
            model::convert::workload_endpoint_pod(&key.name, &w.spec.node).as_deref() == Some("a")
        })
        .map(|(key, w)| w.to_workload_endpoint(key))
        .unwrap();
    let mut relabelled = a.clone();
    relabelled.metadata.labels.insert("role".into(), "b".into());
    state.upsert(Resource::WorkloadEndpoint(relabelled));
    let key = ResourceKey::new(
        Kind::WorkloadEndpoint,
        a.metadata.namespace.as_deref(),
        &a.metadata.name,
    );
    let changes = [(key, Some(Resource::WorkloadEndpoint(a)))].into();
    let before = inc.ruleset().clone();
    let Outcome::Elements(delta) = inc.update(&state, &changes).unwrap() else {
        panic!("a relabel is an element change");
    };
    let (_, full) = compile_nftables(&state, &fused("node1")).unwrap();
    assert_eq!(inc.ruleset(), &full);
    let mut patched = before;
    delta.apply_to(&mut patched);
    assert_eq!(patched, full);
    assert!(
        delta.sets.iter().any(|d| d.set.starts_with("cali40f-")),
        "{delta:?}"
    );
    // a (198.18.128.2) now reaches web on 8080 (b's port), no longer on 80.
    let a_ip: std::net::IpAddr = "198.18.128.2".parse().unwrap();
    let ip = full
        .tables
        .iter()
        .find(|t| t.family == TableFamily::Ip)
        .unwrap();
    let web_set = ip
        .chains
        .values()
        .flat_map(|c| &c.rules)
        .flat_map(|r| &r.matches)
        .find_map(|m| match m {
            Match::PeerPort { set, .. } => Some(&ip.sets[set]),
            _ => None,
        })
        .unwrap();
    assert!(web_set
        .elements
        .contains(&SetElement::NamedPort(a_ip, 6, 8080)));
    assert!(!web_set
        .elements
        .contains(&SetElement::NamedPort(a_ip, 6, 80)));
}
