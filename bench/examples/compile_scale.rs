//! Prints compile time and output size at a scale: `cargo run --release -p bench --example compile_scale -- POLICIES PODS`.
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let scale = bench::Scale::new(
        args.first().copied().unwrap_or(1000),
        args.get(1).copied().unwrap_or(2000),
    );
    let t = Instant::now();
    let state = bench::generate(&scale);
    let gen = t.elapsed();
    let t = Instant::now();
    let (logical, rs) = compiler::compile_nftables(
        &state,
        &compiler::CompileOptions::new(bench::NODE_UNDER_TEST),
    )
    .unwrap();
    let comp = t.elapsed();
    let t4 = &rs.tables[0];
    let rules: usize = t4.chains.values().map(|c| c.rules.len()).sum();
    let elems: usize = t4.sets.values().map(|s| s.elements.len()).sum();
    println!("{scale:?}\ngenerate {gen:?} compile {comp:?}: active policies {}, v4 chains {}, rules {rules}, sets {}, elements {elems}", logical.active_policies.len(), t4.chains.len(), t4.sets.len());
}
