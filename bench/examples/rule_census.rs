//! How the benchmark's nftables ruleset for the node under test splits
//! into chain kinds (rules per kind, per table):
//! `cargo run --release -p bench --example rule_census -- POLICIES`.
use std::collections::BTreeMap;

use bench::{generate, run::scale_for, NODE_UNDER_TEST};
use compiler::CompileOptions;

fn main() -> anyhow::Result<()> {
    let policies: usize = std::env::args().nth(1).map_or(Ok(10_000), |a| a.parse())?;
    let state = generate(&scale_for(policies));
    let (_, ruleset) = compiler::compile_nftables(&state, &CompileOptions::new(NODE_UNDER_TEST))?;
    for table in &ruleset.tables {
        // kind → (chains, rules, matches + statements + verdicts)
        let mut kinds: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
        for chain in table.chains.values() {
            let kind = chain.name.split('-').take(2).collect::<Vec<_>>().join("-");
            let e = kinds.entry(kind).or_default();
            e.0 += 1;
            e.1 += chain.rules.len();
            e.2 += chain
                .rules
                .iter()
                .map(|r| r.matches.len() + r.stmts.len() + usize::from(r.verdict.is_some()))
                .sum::<usize>();
        }
        println!(
            "table {:?} {}: {} sets, {} maps",
            table.family,
            table.name,
            table.sets.len(),
            table.maps.len()
        );
        for (kind, (chains, rules, parts)) in kinds {
            println!("  {kind:<24} {chains:>6} chains {rules:>7} rules {parts:>7} parts");
        }
    }
    Ok(())
}
