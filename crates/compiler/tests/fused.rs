//! `--fused-lookup` (`compiler::fused`): golden renderings of fused endpoint
//! chains, and what stays a chain walk. Packet-level equivalence with the
//! walk is checked in the kernel (`cargo xtask e2e --fused-lookup`).

use std::path::Path;

use compiler::nft::{Match, Ruleset, TableFamily};
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
