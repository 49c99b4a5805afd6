//! Fail closed: traffic from or to an interface named like a workload
//! (`cali…`) but unknown to the datastore is dropped ("Unknown interface"),
//! on both backends, while known workloads keep working.

use std::time::Duration;

use common::check_probes;
use lab::{nftpolicy_binary, write_state, Lab};
use model::kube::KubeKind;
use model::scenario::Scenario;

mod common;

const SCENARIO: &str = r#"
name: fail-closed
objects:
  - {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
  - apiVersion: v1
    kind: Pod
    metadata: {name: web, namespace: shop}
    spec: {nodeName: node1, containers: [{name: w, ports: [{containerPort: 80, protocol: TCP}]}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: client, namespace: shop}
    spec: {nodeName: node2, containers: [{name: c, ports: [{containerPort: 80, protocol: TCP}]}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: stranger, namespace: shop}
    spec: {nodeName: node1, containers: [{name: s, ports: [{containerPort: 80, protocol: TCP}]}]}
probes:
  - {from: shop/client, to: shop/web, port: 80, expect: allow}
  - {from: shop/stranger, to: shop/web, port: 80, expect: deny}
  - {from: shop/stranger, to: shop/client, port: 80, expect: deny}
  - {from: shop/client, to: shop/stranger, port: 80, expect: deny}
  - {from: shop/web, to: shop/stranger, port: 80, expect: deny}
"#;

#[test]
fn unknown_workload_interfaces_are_dropped() {
    let scenario = Scenario::parse("fail-closed.yaml", SCENARIO).unwrap();
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
        check_probes(&mut lab, &probes, backend);
    }
}
