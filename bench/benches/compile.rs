//! Compile time for 100, 1,000 and 10,000 policies (node under test with
//! 50 local endpoints; 2,000 pods in the cluster).

use bench::{generate, Scale, NODE_UNDER_TEST};
use compiler::{compile_nftables, CompileOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile_nftables");
    group.sample_size(10);
    for policies in [100, 1_000, 10_000] {
        let state = generate(&Scale::new(policies, 2_000));
        let opts = CompileOptions::new(NODE_UNDER_TEST);
        group.bench_with_input(BenchmarkId::from_parameter(policies), &state, |b, s| {
            b.iter(|| compile_nftables(s, &opts).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, compile);
criterion_main!(benches);
