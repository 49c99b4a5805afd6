//! Fail closed: traffic from or to an interface named like a workload
//! (`cali…`) but unknown to the datastore is dropped ("Unknown interface"),
//! on both backends, while known workloads keep working.

use std::time::Duration;

use lab::{nftpolicy_binary, write_state, Lab};
use model::kube::KubeKind;

mod common;

// The scenario: tests/tests/scenarios/fail-closed.yaml.

#[test]
fn unknown_workload_interfaces_are_dropped() {
    let scenario = common::scenario("fail-closed");
    let full = scenario.states().unwrap().remove(0);
    // The lab wires all three pods, but the datastore does not know `stranger`.
    let mut known = full.clone();
    known
        .kube
        .retain(|k, _| !(k.kind == KubeKind::Pod && k.name == "stranger"));
    let nftpolicy = nftpolicy_binary();
    let mut lab = Lab::build(&full.pods(), &[], &["node1", "node2"]).unwrap();
    let probes: Vec<_> = scenario.steps[0]
        .probes
        .iter()
        .map(|p| full.resolve_probe(p, &[]).unwrap())
        .collect();
    for backend in ["nftables", "iptables"] {
        let dir = lab.workdir().join(format!("fail-closed-{backend}"));
        write_state(&dir, &known).unwrap();
        lab.program_nodes(&dir, &nftpolicy, backend, Duration::from_secs(30))
            .unwrap();
        common::assert_probes(&mut lab, &probes, backend);
    }
}
