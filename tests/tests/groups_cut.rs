//! The tables cut by namespace group (`nftpolicy sync --table-groups 3`)
//! enforce every scenario as the whole tables do: for every step of every
//! scenario the project has, each node is programmed by the agent with its
//! ruleset cut into three tables per family by the namespaces of its local
//! pods (`nftpolicy-g0` … `g2`: in each, the other groups' interfaces
//! return from the dispatch maps), and every probe must get the scenario's
//! verdict. This is the evidence that felix's chain tree still holds when
//! a packet crosses from one group's table to another's (README,
//! Performance). The agents over etcd (CI's etcd e2e phase) run with
//! groups too, so patches and element changes are cut there.

use std::path::{Path, PathBuf};

use compiler::groups::group_of_namespace;
use lab::{run_scenario, E2eOptions};
use model::scenario::{collect_files, Scenario};

const GROUPS: usize = 3;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_scenario_holds_with_tables_cut_by_namespace_group() {
    let mut paths = vec![root().join("tests/scenarios")];
    paths.extend(testkit::extra_scenario_paths());
    let files = collect_files(&paths).unwrap();
    assert!(files.len() > 50, "the project's scenarios: {files:?}");
    let mut opts = E2eOptions::new(lab::nftpolicy_binary());
    opts.extra_args = vec!["--table-groups".into(), GROUPS.to_string()];
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
                        && group_of_namespace(&from.namespace, GROUPS)
                            != group_of_namespace(&to.namespace, GROUPS)
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
