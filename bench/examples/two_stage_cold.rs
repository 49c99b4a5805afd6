//! Cold programming of the benchmark's node in the two-stage form
//! (`bench::two_stage`) against the felix tree (the default, one table),
//! each in a fresh namespace, one transaction each, timed in one run:
//! `cargo run --release -p bench --example two_stage_cold -- POLICIES`
//! (needs root). The address form of the fused lookup is not programmed:
//! at 10,000 policies its 20 M elements are what the two stages replace.
//! Third: the felix tree first, then the two stages as a second
//! transaction (the walk is correct on its own; the lookups only shorten
//! it), each timed.
//!
//! Last, what a pod's class change costs once programmed: 20 rounds each
//! of moving one address to another class (a class-map element whose
//! verdict jumps: the kernel validates the table at such a commit) and
//! of adding and removing one class-set element (no jump), medians.
use std::time::Instant;

use bench::{generate, run::scale_for, NODE_UNDER_TEST};
use compiler::CompileOptions;
use testkit::netns::Netns;

/// `tp` applied as a patch: milliseconds to the kernel's acknowledgement.
fn timed_patch(
    p: &mut programmer::NftProgrammer,
    tp: compiler::nft::TablePatch,
) -> anyhow::Result<f64> {
    let patch = compiler::nft::RulesetPatch {
        tables: vec![tp],
        elements: Default::default(),
    };
    let t0 = Instant::now();
    p.apply_patch(&patch)?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

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
    let ns = Netns::create("tscold")?;
    let (moves, elements) = ns
        .run(|| -> anyhow::Result<(f64, f64)> {
            let mut p = programmer::NftProgrammer::new()?;
            p.apply(&two)?;
            let mut map = two.tables[0].maps[bench::two_stage::CLASS_MAP].clone();
            let table = two.tables[0].name.clone();
            let family = two.tables[0].family;
            let set = two.tables[0]
                .sets
                .values()
                .find(|s| s.key == compiler::nft::SetKey::MarkPort)
                .expect("a class set")
                .name
                .clone();
            let (mut moves, mut elements) = (Vec::new(), Vec::new());
            for round in 0..20 {
                let (addr, _) = map.elements.iter().nth(round).expect("addresses");
                let addr = addr.clone();
                let to = format!("{}{}", bench::two_stage::CLASS_CHAIN_PREFIX, 1 + round % 2);
                map.elements.insert(addr, compiler::nft::Verdict::Jump(to));
                let mut tp = compiler::nft::TablePatch::new(family, &table);
                tp.maps.insert(map.name.clone(), Some(map.clone()));
                moves.push(timed_patch(&mut p, tp)?);
                let delta = compiler::nft::ElementDelta {
                    sets: vec![compiler::nft::SetDelta {
                        family,
                        table: table.clone(),
                        set: set.clone(),
                        remove: vec![],
                        add: vec![compiler::nft::SetElement::MarkPort(
                            0xfff0_0000,
                            6,
                            40_000 + round as u16,
                        )],
                    }],
                };
                let t0 = Instant::now();
                p.apply_elements(&delta)?;
                elements.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            Ok((median(&mut moves), median(&mut elements)))
        })
        .map_err(|e| anyhow::anyhow!("{e}"))??;
    println!(
        "programmed two stages: moving an address to another class {moves:.2} ms (median of 20), adding a class-set element {elements:.2} ms"
    );
    // A commit that adds a rule with a verdict makes the kernel validate
    // the table (as a policy add does): timed on both rulesets.
    for (name, rs) in [("felix tree", &walk), ("two stages", &two)] {
        let ns = Netns::create("tscold")?;
        let ms = ns
            .run(|| -> anyhow::Result<f64> {
                let mut p = programmer::NftProgrammer::new()?;
                p.apply(rs)?;
                let (family, table) = (rs.tables[0].family, rs.tables[0].name.clone());
                let mut took = Vec::new();
                for round in 0..20 {
                    let mut tp = compiler::nft::TablePatch::new(family, &table);
                    let name = format!("bench-validate-{round}");
                    tp.chains.insert(
                        name.clone(),
                        Some(compiler::nft::Chain {
                            name,
                            base: None,
                            rules: vec![compiler::nft::Rule {
                                matches: vec![],
                                stmts: vec![],
                                verdict: Some(compiler::nft::Verdict::Accept),
                                comment: None,
                            }]
                            .into(),
                        }),
                    );
                    took.push(timed_patch(&mut p, tp)?);
                }
                Ok(median(&mut took))
            })
            .map_err(|e| anyhow::anyhow!("{e}"))??;
        println!("{name}: a commit adding a rule with a verdict {ms:.2} ms (median of 20)");
    }
    Ok(())
}
