//! What splitting our tables by namespace group changes in the kernel
//! alone (the projection that decided to build `--table-groups`; the
//! agent's own numbers come from `nftbench worker-scale nft-netlink-gN`):
//! `cargo run --release -p bench --example split_projection -- POLICIES GROUPS [ROUNDS]` (root).
//!
//! The kernel validates a whole table when a commit adds a rule (README,
//! Performance), so a policy add costs in proportion to the table it lands
//! in. Here the benchmark's compiled ruleset is cut into GROUPS rulesets by
//! `compiler::groups::Split`: the local endpoints' namespaces are dealt
//! round-robin into groups, and a group's ruleset holds the base and
//! dispatch chains, the dispatch maps, and every chain and set its own
//! endpoints reach (so a policy or set used by endpoints of
//! two groups is in both). Each group is programmed into a network
//! namespace of its own, which costs a commit what it would cost beside
//! the others in one namespace: the kernel validates only the tables a
//! commit marked. The uncut ruleset goes into one more namespace. Then the
//! benchmark's operations, in the same run, through the same paths as the
//! agent's: a remote pod added and relabelled (element deltas; each group
//! holding an affected set gets its share) and a policy added and deleted
//! (the incremental compiler's patch, cut into one patch per group it
//! reaches), applied with `apply_elements` / `apply_patch`.
//!
//! Reported per operation: the kernel time (summed over the groups it
//! touched, one commit each here, where one transaction over all groups'
//! tables would pay the commit overhead once), how many groups it
//! touched, and the time `Split` took to cut the delta or patch. In each
//! group's dispatch maps the other groups' interfaces map to `return`
//! (see `compiler::groups`).
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bench::{generate, run::scale_for, workload, NODE_UNDER_TEST};
use compiler::groups::Split;
use compiler::nft::Ruleset;
use compiler::{CompileOptions, IncrementalCompiler, Outcome};
use model::calico::Resource;
use programmer::NftProgrammer;
use rand::SeedableRng;
use testkit::netns::Netns;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let policies: usize = args.get(1).map_or(Ok(10_000), |a| a.parse())?;
    let groups: usize = args.get(2).map_or(Ok(4), |a| a.parse())?;
    let rounds: usize = args.get(3).map_or(Ok(60), |a| a.parse())?;
    anyhow::ensure!(groups >= 1, "GROUPS must be at least 1");
    let scale = scale_for(policies);
    let mut state = generate(&scale);

    // Namespaces of the local endpoints, dealt round-robin into groups.
    let mut namespaces: Vec<(String, String)> = state
        .workload_endpoints()
        .filter(|(_, w)| w.spec.node == NODE_UNDER_TEST)
        .map(|(k, w)| {
            let ns = k.namespace.as_deref().unwrap_or_default().to_owned();
            (ns, w.spec.interface_name.clone())
        })
        .collect();
    namespaces.sort();
    let mut group_of_ns: BTreeMap<String, usize> = BTreeMap::new();
    for (ns, _) in &namespaces {
        let next = group_of_ns.len() % groups;
        group_of_ns.entry(ns.clone()).or_insert(next);
    }
    let group_of_iface: HashMap<String, usize> = namespaces
        .iter()
        .map(|(ns, iface)| (iface.clone(), group_of_ns[ns]))
        .collect();
    println!(
        "{} local endpoints in {} namespaces, {groups} groups",
        namespaces.len(),
        group_of_ns.len()
    );

    let group_of = |iface: &str| group_of_iface.get(iface).copied().unwrap_or(0);
    let mut inc = IncrementalCompiler::new(CompileOptions::new(NODE_UNDER_TEST));
    inc.rebuild(&state)?;
    let uncut = inc.ruleset();
    let mut split = Split::new(groups);
    let t = Instant::now();
    let cut = split.full(uncut, &group_of);
    println!("cut whole: {:.0} ms", ms(t.elapsed()));
    print_sizes("uncut", std::slice::from_ref(uncut));
    print_sizes("groups", &cut);

    // One namespace (and programmer) per group, one for the uncut ruleset.
    // Programmers go before their namespaces (declared after, dropped first).
    let spaces: Vec<Netns> = (0..=groups)
        .map(|_| Netns::create("split"))
        .collect::<Result<_, _>>()?;
    let mut progs: Vec<NftProgrammer> = spaces
        .iter()
        .map(|ns| ns.run(NftProgrammer::new)?.map_err(anyhow::Error::from))
        .collect::<Result<_, _>>()?;
    let (uncut_prog, group_progs) = progs.split_last_mut().expect("groups + 1 programmers");

    let slab = slab_mib();
    let report = uncut_prog.apply(uncut)?;
    println!(
        "cold uncut: kernel {:.0} ms, slab +{:.0} MiB",
        ms(report.kernel_time),
        slab_mib() - slab
    );
    let slab = slab_mib();
    let mut cold = Vec::new();
    for (p, r) in group_progs.iter_mut().zip(&cut) {
        cold.push(ms(p.apply(r)?.kernel_time));
    }
    println!(
        "cold groups: kernel {:.0} ms in all (per group {:?}), slab +{:.0} MiB",
        cold.iter().sum::<f64>(),
        cold.iter().map(|c| c.round()).collect::<Vec<_>>(),
        slab_mib() - slab
    );

    let local_app = state
        .workload_endpoints()
        .find(|(_, w)| w.spec.node == NODE_UNDER_TEST)
        .and_then(|(_, w)| w.metadata.labels.get("app").map(str::to_owned))
        .unwrap_or_else(|| "app0".into());
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    // op → (uncut kernel ms, cut kernel ms, groups touched, ms spent
    // cutting the delta or patch) per round.
    let mut samples: BTreeMap<&str, Vec<(f64, f64, usize, f64)>> = BTreeMap::new();
    for r in 0..rounds {
        let mut w = workload(&scale, scale.pods + r, &mut rng);
        w.spec.node = "node2".into();
        w.metadata.labels.insert("app".into(), local_app.clone());
        w.metadata.labels.insert("tier".into(), "web".into());
        let pod = Resource::WorkloadEndpoint(w.clone());
        let pod_key = pod.key();
        let mut relabelled = w;
        relabelled
            .metadata
            .labels
            .insert("app".into(), "relabelled".into());
        relabelled
            .metadata
            .labels
            .insert("tier".into(), "batch".into());
        let policy = Resource::NetworkPolicy(bench::run::extra_policy(
            &format!("bench-extra-{r}"),
            &local_app,
        ));
        let policy_key = policy.key();
        let steps: [(&str, _, Option<Resource>); 4] = [
            ("pod_add", pod_key.clone(), Some(pod)),
            (
                "pod_relabel",
                pod_key,
                Some(Resource::WorkloadEndpoint(relabelled)),
            ),
            ("policy_add", policy_key.clone(), Some(policy)),
            ("policy_delete", policy_key, None),
        ];
        for (op, key, new) in steps {
            let old = match new {
                Some(n) => state.upsert(n),
                None => state.remove(&key),
            };
            let changes = BTreeMap::from([(key, old)]);
            let sample = match inc.update(&state, &changes)? {
                Outcome::Elements(delta) => {
                    let whole = ms(uncut_prog.apply_elements(&delta)?.kernel_time);
                    let t = Instant::now();
                    let per_group = split.elements(&delta);
                    let cutting = ms(t.elapsed());
                    let (mut sum, mut touched) = (0.0, 0);
                    for (p, share) in group_progs.iter_mut().zip(per_group) {
                        if !share.is_empty() {
                            sum += ms(p.apply_elements(&share)?.kernel_time);
                            touched += 1;
                        }
                    }
                    (whole, sum, touched, cutting)
                }
                Outcome::Patch(patch) => {
                    let whole = ms(uncut_prog.apply_patch(&patch)?.kernel_time);
                    let t = Instant::now();
                    let per_group = split.patch(inc.ruleset(), &patch, &group_of);
                    let cutting = ms(t.elapsed());
                    let (mut sum, mut touched) = (0.0, 0);
                    for (p, share) in group_progs.iter_mut().zip(&per_group) {
                        if !share.is_empty() {
                            sum += ms(p.apply_patch(share)?.kernel_time);
                            touched += 1;
                        }
                    }
                    (whole, sum, touched, cutting)
                }
                Outcome::Rebuilt => anyhow::bail!("{op}: expected no full compile"),
            };
            samples.entry(op).or_default().push(sample);
        }
    }
    println!("op             uncut p50/p99 ms   groups p50/p99 ms   groups touched (max)   cutting p50/p99 ms");
    for (op, s) in &samples {
        let whole: Vec<f64> = s.iter().map(|x| x.0).collect();
        let split: Vec<f64> = s.iter().map(|x| x.1).collect();
        let cutting: Vec<f64> = s.iter().map(|x| x.3).collect();
        println!(
            "{op:<14} {:>7.2} / {:>6.2}   {:>7.2} / {:>6.2}   {:>20}   {:.3} / {:.3}",
            bench::run::percentile(&whole, 0.5),
            bench::run::percentile(&whole, 0.99),
            bench::run::percentile(&split, 0.5),
            bench::run::percentile(&split, 0.99),
            s.iter().map(|x| x.2).max().unwrap_or(0),
            bench::run::percentile(&cutting, 0.5),
            bench::run::percentile(&cutting, 0.99),
        );
    }
    drop(progs);
    drop(spaces);
    Ok(())
}

/// The kernel's slab memory (`Slab:` of /proc/meminfo), MiB.
fn slab_mib() -> f64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_sizes(what: &str, rulesets: &[Ruleset]) {
    let tables = rulesets.iter().flat_map(|r| &r.tables);
    let (mut chains, mut rules, mut sets, mut elements) = (0, 0, 0, 0);
    for t in tables {
        chains += t.chains.len();
        rules += t.chains.values().map(|c| c.rules.len()).sum::<usize>();
        sets += t.sets.len();
        elements += t.sets.values().map(|s| s.elements.len()).sum::<usize>();
    }
    let per: Vec<usize> = rulesets
        .iter()
        .map(|r| {
            r.tables
                .iter()
                .flat_map(|t| t.chains.values())
                .map(|c| c.rules.len())
                .sum()
        })
        .collect();
    println!(
        "{what}: {chains} chains, {rules} rules (per ruleset {per:?}), {sets} sets, {elements} elements"
    );
}
