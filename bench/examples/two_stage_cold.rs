//! Cold programming of the benchmark's node in the two-stage form
//! (`bench::two_stage`) against the felix tree (the default, one table),
//! each in a fresh namespace, one transaction each, timed in one run:
//! `cargo run --release -p bench --example two_stage_cold -- POLICIES`
//! (needs root). The address form of the fused lookup is not programmed:
//! at 10,000 policies its 20 M elements are what the two stages replace.
//! Third: the felix tree first, then the two stages as a second
//! transaction (the walk is correct on its own; the lookups only shorten
//! it), each timed.
use std::time::Instant;

use bench::{generate, run::scale_for, NODE_UNDER_TEST};
use compiler::CompileOptions;
use testkit::netns::Netns;

fn main() -> anyhow::Result<()> {
    let policies: usize = std::env::args().nth(1).map_or(Ok(10_000), |a| a.parse())?;
    let state = generate(&scale_for(policies));
    let walk_opts = CompileOptions::new(NODE_UNDER_TEST);
    let (_, walk) = compiler::compile_nftables(&state, &walk_opts)?;
    let fused_opts = CompileOptions {
        fused_lookup: true,
        ..CompileOptions::new(NODE_UNDER_TEST)
    };
    let (_, mut two) = compiler::compile_nftables(&state, &fused_opts)?;
    bench::two_stage::rewrite(
        &mut two,
        bench::two_stage::class_bits(fused_opts.mark_mask)?,
    )?;
    for round in 0..2 {
        for (name, rs) in [("felix tree", &walk), ("two stages", &two)] {
            let ns = Netns::create("tscold")?;
            let took = ns
                .run(|| -> anyhow::Result<f64> {
                    let mut p = programmer::NftProgrammer::new()?;
                    let t = Instant::now();
                    p.apply(rs)?;
                    Ok(t.elapsed().as_secs_f64())
                })
                .map_err(|e| anyhow::anyhow!("{e}"))??;
            let objects: usize = rs
                .tables
                .iter()
                .map(|t| {
                    t.chains.len()
                        + t.sets.values().map(|s| 1 + s.elements.len()).sum::<usize>()
                        + t.maps.values().map(|m| 1 + m.elements.len()).sum::<usize>()
                })
                .sum();
            println!("round {round}: {name}: applied in {took:.2} s ({objects} chains, sets, maps and elements)");
        }
        let ns = Netns::create("tscold")?;
        let (walk_s, then_s) = ns
            .run(|| -> anyhow::Result<(f64, f64)> {
                let mut p = programmer::NftProgrammer::new()?;
                let t = Instant::now();
                p.apply(&walk)?;
                let walk_s = t.elapsed().as_secs_f64();
                let t = Instant::now();
                p.apply(&two)?;
                Ok((walk_s, t.elapsed().as_secs_f64()))
            })
            .map_err(|e| anyhow::anyhow!("{e}"))??;
        println!(
            "round {round}: felix tree in {walk_s:.2} s, then the two stages in {then_s:.2} s more"
        );
    }
    Ok(())
}
