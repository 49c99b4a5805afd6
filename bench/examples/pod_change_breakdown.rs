//! Where one pod change's time goes at a scale (root; runs in its own
//! network namespace): `cargo run --release -p bench --example pod_change_breakdown -- POLICIES`.
use std::collections::BTreeMap;
use std::time::Instant;

use bench::{generate, run::scale_for, workload, NODE_UNDER_TEST};
use compiler::{CompileOptions, IncrementalCompiler, Outcome};
use model::calico::Resource;
use rand::SeedableRng;

fn main() -> anyhow::Result<()> {
    let policies: usize = std::env::args().nth(1).map_or(Ok(1000), |a| a.parse())?;
    let scale = scale_for(policies);
    let mut state = generate(&scale);
    let _ns = programmer::testutil::Netns::enter("breakdown")?;
    let mut p = programmer::NftProgrammer::new()?;
    let mut inc = IncrementalCompiler::new(CompileOptions::new(NODE_UNDER_TEST));
    inc.rebuild(&state)?;
    p.apply(inc.ruleset())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    println!("update_ms elements encode_ms kernel_ms total_ms");
    for i in 0..10 {
        let mut w = workload(&scale, scale.pods + i, &mut rng);
        w.spec.node = "node2".into();
        w.metadata.labels.insert("tier".into(), "web".into());
        let r = Resource::WorkloadEndpoint(w);
        let t = Instant::now();
        let key = r.key();
        let old = state.upsert(r);
        let Outcome::Elements(delta) = inc.update(&state, &BTreeMap::from([(key, old)]))? else {
            anyhow::bail!("expected a member-only change");
        };
        let update = t.elapsed();
        let report = p.apply_elements(&delta)?;
        let total = t.elapsed();
        println!(
            "{:.2} {} {:.2} {:.2} {:.2}",
            update.as_secs_f64() * 1e3,
            delta.len(),
            report.encode_time.as_secs_f64() * 1e3,
            report.kernel_time.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
