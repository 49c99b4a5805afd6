//! The netlink encoder: time to plan (diff + encode) the cold transaction
//! for 100, 1,000 and 10,000 policies, and its size (printed once per
//! scale: messages and bytes). Runs inside a fresh network namespace
//! because `NftProgrammer` opens a netlink socket (nothing is sent).

use bench::{generate, Scale, NODE_UNDER_TEST};
use compiler::{compile_nftables, CompileOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use programmer::NftProgrammer;
use testkit::netns::Netns;

fn encode(c: &mut Criterion) {
    let _ns = match Netns::enter("encbench") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("skipping the encoder benchmark (needs root for a network namespace): {e}");
            return;
        }
    };
    let programmer = NftProgrammer::new().expect("netlink socket");
    let mut group = c.benchmark_group("nft_plan_cold");
    group.sample_size(10);
    for policies in [100, 1_000, 10_000] {
        let state = generate(&Scale::new(policies, 2_000));
        let (_, ruleset) = compile_nftables(&state, &CompileOptions::new(NODE_UNDER_TEST)).unwrap();
        let tx = programmer.plan(&ruleset).unwrap();
        eprintln!(
            "nft_plan_cold/{policies}: {} messages, {} bytes",
            tx.messages(),
            tx.bytes()
        );
        group.bench_with_input(BenchmarkId::from_parameter(policies), &ruleset, |b, rs| {
            b.iter(|| programmer.plan(rs).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
