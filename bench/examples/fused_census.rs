//! How many elements `--fused-lookup`'s sets hold on the benchmark's node,
//! per endpoint chain, and what a per-chain element budget would leave
//! fused: `cargo run --release -p bench --example fused_census -- POLICIES`
//! (compiles only; no kernel).
//!
//! A chain's elements are those of the fused sets its rules look up (sets
//! are shared by endpoints with the same run of policies, so the node's
//! total counts each set once). For each budget, a chain whose fused sets
//! hold more than the budget is counted as walking its chain instead.
use std::collections::{BTreeMap, BTreeSet};

use bench::{generate, run::scale_for, NODE_UNDER_TEST};
use compiler::nft::referenced_sets;
use compiler::CompileOptions;

fn main() -> anyhow::Result<()> {
    let policies: usize = std::env::args()
        .nth(1)
        .map_or(Ok(10_000), |a| a.parse())?;
    let state = generate(&scale_for(policies));
    let opts = CompileOptions {
        fused_lookup: true,
        ..CompileOptions::new(NODE_UNDER_TEST)
    };
    let (_, ruleset) = compiler::compile_nftables(&state, &opts)?;
    let (_, walk) = compiler::compile_nftables(&state, &CompileOptions::new(NODE_UNDER_TEST))?;
    let walk_elements: usize = walk
        .tables
        .iter()
        .flat_map(|t| t.sets.values())
        .map(|s| s.elements.len())
        .sum();
    println!("chain walk: {walk_elements} set elements on the node");
    for table in &ruleset.tables {
        let fused: BTreeMap<&str, usize> = table
            .sets
            .values()
            .filter(|s| {
                s.comment
                    .as_deref()
                    .is_some_and(|c| c.starts_with("fused lookup"))
            })
            .map(|s| (s.name.as_str(), s.elements.len()))
            .collect();
        let total: usize = fused.values().sum();
        // Endpoint chain → the fused sets it looks up.
        let mut chains: Vec<(&str, BTreeSet<&str>)> = Vec::new();
        for chain in table.chains.values() {
            if !(chain.name.starts_with("cali-tw-") || chain.name.starts_with("cali-fw-")) {
                continue;
            }
            let sets: BTreeSet<&str> = referenced_sets(chain)
                .filter(|s| fused.contains_key(s))
                .collect();
            chains.push((chain.name.as_str(), sets));
        }
        let per_chain: Vec<usize> = chains
            .iter()
            .map(|(_, sets)| sets.iter().map(|s| fused[s]).sum())
            .collect();
        let mut sorted = per_chain.clone();
        sorted.sort_unstable();
        let pct = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
        println!(
            "table {:?}: {} fused sets, {total} elements; {} endpoint chains, elements per chain p50 {} p90 {} max {}",
            table.family,
            fused.len(),
            chains.len(),
            pct(0.5),
            pct(0.9),
            pct(1.0)
        );
        for budget in [1_000, 4_000, 16_000, 65_536, 262_144] {
            let kept: BTreeSet<&str> = chains
                .iter()
                .zip(&per_chain)
                .filter(|(_, n)| **n <= budget)
                .flat_map(|((_, sets), _)| sets.iter().copied())
                .collect();
            let fused_chains = per_chain.iter().filter(|n| **n <= budget).count();
            let elements: usize = kept.iter().map(|s| fused[s]).sum();
            println!(
                "  budget {budget:>7} per chain: {fused_chains:>4} of {} chains fused, {elements:>9} elements",
                chains.len()
            );
        }
    }
    Ok(())
}
