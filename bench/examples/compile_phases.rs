//! Where a full compile spends its time: `cargo run --release -p bench --example compile_phases -- POLICIES PODS`.
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let scale = bench::Scale::new(args[0], args[1]);
    let state = bench::generate(&scale);
    let t = Instant::now();
    let (policies, _) = state.resolved_policies();
    println!("resolved_policies {:?} ({})", t.elapsed(), policies.len());
    let t = Instant::now();
    let nets = state.labelled_nets();
    println!("labelled_nets {:?} ({})", t.elapsed(), nets.len());
    let t = Instant::now();
    let local: Vec<_> = state
        .workload_endpoints()
        .filter(|(_, w)| w.spec.node == bench::NODE_UNDER_TEST)
        .collect();
    let mut n = 0;
    for (_, ep) in &local {
        let labels = state.endpoint_labels(ep);
        n += policies
            .iter()
            .filter(|p| p.selector.matches(&labels))
            .count();
    }
    println!("policy selection {:?} ({n})", t.elapsed());
    let opts = compiler::CompileOptions::new(bench::NODE_UNDER_TEST);
    let t = Instant::now();
    let logical = compiler::compile(&state, &opts).unwrap();
    println!("compile {:?}", t.elapsed());
    let t = Instant::now();
    let rs = compiler::lower_nft::to_nftables(&logical);
    println!("lower {:?} ({} tables)", t.elapsed(), rs.tables.len());
    let t = Instant::now();
    let mut inc = compiler::IncrementalCompiler::new(opts);
    inc.rebuild(&state).unwrap();
    println!("incremental rebuild {:?}", t.elapsed());
    let t = Instant::now();
    drop(inc);
    drop(logical);
    drop(rs);
    println!("drop {:?}", t.elapsed());
}
