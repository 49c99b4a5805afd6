//! Where one pod or policy change's time goes at a scale (root; runs in its
//! own network namespace):
//! `cargo run --release -p bench --example pod_change_breakdown -- POLICIES [local|remote|policy] [PODS] [--fused-lookup] [--table-groups=N]`.
//! With `--table-groups=N` the tables are cut by namespace group as the
//! agent's `--table-groups N` does (the cut's time is in `update_ms`).
//! With `local`, the pods are added on the node itself and deleted again
//! (a patch of chains, sets and maps instead of set elements alone); with
//! `policy`, a policy like the benchmark's is added and deleted again; with
//! `tier`, alternately a tier holding one new policy is created and deleted,
//! and the `default` tier (every policy of the benchmark) gets a Tier
//! resource with `defaultAction: Pass` and loses it again. Calico (and
//! nftpolicy's decoder) refuse Pass for `default`; built in code here, it
//! stands in for a user tier holding 10,000 policies changing its default
//! action: every policy of the tier resolves again.
use std::collections::BTreeMap;
use std::time::Instant;

use bench::{generate, run::scale_for, workload, NODE_UNDER_TEST};
use compiler::{CompileOptions, IncrementalCompiler, Outcome};
use model::calico::Resource;
use rand::SeedableRng;

fn main() -> anyhow::Result<()> {
    // `--fused-lookup` anywhere: the compiler's fused lookups on.
    let fused = std::env::args().any(|a| a == "--fused-lookup");
    let groups: usize = std::env::args()
        .find_map(|a| a.strip_prefix("--table-groups=").map(str::to_owned))
        .map_or(Ok(1), |n| n.parse())?;
    let args: Vec<String> = std::env::args()
        .filter(|a| a != "--fused-lookup" && !a.starts_with("--table-groups="))
        .collect();
    let policies: usize = args.get(1).map_or(Ok(1000), |a| a.parse())?;
    let mode = args.get(2).cloned();
    let local = mode.as_deref() == Some("local");
    let policy = mode.as_deref() == Some("policy");
    let tier = mode.as_deref() == Some("tier");
    let mut scale = scale_for(policies);
    if let Some(pods) = args.get(3) {
        scale.pods = pods.parse()?;
    }
    let mut state = generate(&scale);
    let _ns = testkit::netns::Netns::enter("breakdown")?;
    let mut p = programmer::NftProgrammer::new()?;
    let mut inc = IncrementalCompiler::new(CompileOptions {
        fused_lookup: fused,
        ..CompileOptions::new(NODE_UNDER_TEST)
    });
    // The cold start first (what `cargo xtask bench` reports as cold
    // programming), split into the compile and the programmer's apply.
    let t = Instant::now();
    inc.rebuild(&state)?;
    let compiled = t.elapsed();
    let mut split = compiler::groups::Split::new(groups.max(1));
    let report = if groups > 1 {
        let logical = inc.logical().expect("compiled");
        let (s, cut) = compiler::groups::cut_by_namespace(logical, inc.ruleset(), groups);
        split = s;
        p.apply_owned(cut)?
    } else {
        p.apply(inc.ruleset())?
    };
    println!(
        "cold: compile {:.0} ms, apply {:.0} ms (encode {:.0} ms, kernel {:.0} ms), batch {:.1} MiB",
        compiled.as_secs_f64() * 1e3,
        (t.elapsed() - compiled).as_secs_f64() * 1e3,
        report.encode_time.as_secs_f64() * 1e3,
        report.kernel_time.as_secs_f64() * 1e3,
        report.bytes as f64 / 1048576.0,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    println!("change update_ms objects encode_ms kernel_ms total_ms");
    let rounds: usize = std::env::var("ROUNDS").map_or(Ok(10), |r| r.parse())?;
    for i in 0..rounds {
        // A policy created in the same update as its tier (mode `tier`).
        let mut with_tier = None;
        let r = if tier {
            // Even rounds: a tier before the others with a policy in it
            // (the policy is created with the tier and stays); odd
            // rounds: the default tier's own resource.
            let mut t = model::calico::Tier {
                api_version: model::calico::API_VERSION.into(),
                metadata: model::calico::ObjectMeta {
                    name: "bench-tier".into(),
                    ..Default::default()
                },
                spec: model::calico::TierSpec {
                    order: Some(50.0),
                    default_action: Some(model::calico::TierAction::Pass),
                },
            };
            if i % 2 == 0 {
                let mut p = bench::policy(&scale, scale.policies + i, &mut rng);
                p.spec.tier = Some("bench-tier".into());
                let p = Resource::NetworkPolicy(p);
                with_tier = Some(p.key());
                state.upsert(p);
            } else {
                t.metadata.name = model::calico::DEFAULT_TIER.into();
                t.spec.order = Some(model::calico::DEFAULT_TIER_ORDER);
            }
            Resource::Tier(t)
        } else if policy {
            Resource::NetworkPolicy(bench::policy(&scale, scale.policies + i, &mut rng))
        } else {
            let mut w = workload(&scale, scale.pods + i, &mut rng);
            w.spec.node = if local { NODE_UNDER_TEST } else { "node2" }.into();
            w.metadata.labels.insert("tier".into(), "web".into());
            Resource::WorkloadEndpoint(w)
        };
        let key = r.key();
        let mut steps = vec![("add", Some(r))];
        if local || policy || tier {
            steps.push(("delete", None));
        }
        for (what, r) in steps {
            let t = Instant::now();
            let old = match r {
                Some(r) => state.upsert(r),
                None => state.remove(&key),
            };
            let mut changes = BTreeMap::from([(key.clone(), old)]);
            if let Some(p) = with_tier.take() {
                changes.insert(p, None);
            }
            let outcome = match inc.update(&state, &changes)? {
                Outcome::Elements(delta) if groups > 1 => {
                    Outcome::Elements(compiler::groups::merge_elements(split.elements(&delta)))
                }
                Outcome::Patch(patch) if groups > 1 => {
                    let logical = inc.logical().expect("compiled");
                    let group_of = compiler::groups::by_namespace(logical, groups);
                    let cut = split.patch(inc.ruleset(), &patch, &group_of);
                    Outcome::Patch(compiler::groups::merge_patches(cut))
                }
                o => o,
            };
            let (report, objects) = match outcome {
                Outcome::Elements(delta) => (p.apply_elements(&delta)?, delta.len()),
                Outcome::Patch(patch) => {
                    let objects = patch.elements.len()
                        + patch
                            .tables
                            .iter()
                            .map(|t| t.chains.len() + t.sets.len() + t.maps.len())
                            .sum::<usize>();
                    (p.apply_patch(&patch)?, objects)
                }
                Outcome::Rebuilt => anyhow::bail!("expected no full compile"),
            };
            let total = t.elapsed();
            let update = total - report.encode_time - report.kernel_time;
            println!(
                "{what} {:.2} {objects} {:.2} {:.2} {:.2}",
                update.as_secs_f64() * 1e3,
                report.encode_time.as_secs_f64() * 1e3,
                report.kernel_time.as_secs_f64() * 1e3,
                total.as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}
