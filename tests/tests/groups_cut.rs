//! The tables cut by namespace group (`compiler::groups`, which the agent
//! does not program yet) enforce every scenario as the whole tables do:
//! for every step of every scenario the project has, each node's compiled
//! ruleset is cut into three tables per family by the namespaces of its
//! local pods (`nftpolicy-g0` … `g2`: in each, the other groups'
//! interfaces return from the dispatch maps), loaded with `nft -f` into the
//! node's namespace, and every probe must get the scenario's verdict. This
//! is the evidence that felix's chain tree still holds when a packet
//! crosses from one group's table to another's (README, Performance).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use compiler::groups::{self, Split};
use compiler::{compile_nftables, CompileOptions};
use lab::{run_scenario, E2eOptions, NodeScript};
use model::scenario::{collect_files, NodeConfig, Scenario};
use model::state::ClusterState;

const GROUPS: usize = 3;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A namespace's group: any stable function of its name.
fn group_of_namespace(ns: &str) -> usize {
    ns.bytes()
        .fold(5381usize, |h, b| h.wrapping_mul(33) ^ usize::from(b))
        % GROUPS
}

/// `node`'s ruleset cut into groups, as one `nft -f` script that first
/// removes whatever the previous step's script made.
fn cut_script(node: &str, cluster: &ClusterState, config: &NodeConfig) -> Result<String, String> {
    let opts = CompileOptions {
        encap: config.encap(),
        ..CompileOptions::new(node)
    };
    let (_, whole) = compile_nftables(cluster, &opts).map_err(|e| e.to_string())?;
    let namespace_of: HashMap<String, String> = cluster
        .workload_endpoints()
        .filter(|(_, e)| e.spec.node == node)
        .map(|(k, e)| {
            let ns = k.namespace.as_deref().unwrap_or_default().to_owned();
            (e.spec.interface_name.clone(), ns)
        })
        .collect();
    let group_of = |iface: &str| {
        namespace_of
            .get(iface)
            .map_or(0, |ns| group_of_namespace(ns))
    };
    let cut = groups::merge(Split::new(GROUPS).full(&whole, &group_of));
    let mut script = String::new();
    for family in ["ip", "ip6"] {
        for g in 0..GROUPS {
            // Created if missing, so that the delete always has a table.
            script.push_str(&format!(
                "table {family} {0} {{}}\ndelete table {family} {0}\n",
                groups::table_name(g)
            ));
        }
    }
    script.push_str(&compiler::render_nft::render(&cut));
    Ok(script)
}

#[test]
fn every_scenario_holds_with_tables_cut_by_namespace_group() {
    let mut paths = vec![root().join("tests/scenarios")];
    paths.extend(testkit::extra_scenario_paths());
    let files = collect_files(&paths).unwrap();
    assert!(files.len() > 50, "the project's scenarios: {files:?}");
    let mut opts = E2eOptions::new("/nonexistent/nftpolicy");
    opts.nft_script = Some(NodeScript(Arc::new(cut_script)));
    let (mut probes, mut skipped, mut crossing) = (0, 0, 0);
    let mut failures = Vec::new();
    for file in &files {
        let scenario = Scenario::load(file).unwrap();
        // Probes between pods of two groups on one node: the packet is
        // judged by two tables.
        let states = scenario.states().unwrap();
        for (i, step) in scenario.steps.iter().enumerate() {
            for p in &step.probes {
                let r = states[i].resolve_probe(p, &scenario.externals).unwrap();
                if let (Some(from), Some(to)) = (&r.src_pod, &r.dst_pod) {
                    if from.node == to.node
                        && group_of_namespace(&from.namespace) != group_of_namespace(&to.namespace)
                    {
                        crossing += 1;
                    }
                }
            }
        }
        match run_scenario(&scenario, &opts) {
            Ok(outcomes) => {
                for o in outcomes {
                    // `None`: skipped, with the reason (SCTP where the
                    // kernel cannot open SCTP sockets), as the e2e run does.
                    if o.got.is_none() {
                        skipped += 1;
                        continue;
                    }
                    probes += 1;
                    if !o.passed() {
                        failures.push(format!(
                            "{} step {}: {} got {:?} ({})",
                            file.display(),
                            o.step,
                            o.probe,
                            o.got,
                            o.detail.unwrap_or_default()
                        ));
                    }
                }
            }
            Err(e) => failures.push(format!("{}: {e}", file.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {probes} probes failed with the cut tables:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(probes > 500, "{probes} probes");
    assert!(
        crossing > 20,
        "{crossing} probes cross between groups on one node"
    );
    eprintln!(
        "{probes} probes passed ({skipped} skipped), {crossing} of them between two groups on one node"
    );
}
