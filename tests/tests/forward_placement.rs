//! Other software's FORWARD rules still see what policy accepted. felix
//! jumps to `cali-FORWARD` at the top of FORWARD but *appends* its accept
//! of policy-accepted packets, so that kube-proxy's or docker's FORWARD
//! rules after the jump still get a say; nftpolicy's iptables mode does the
//! same, and its nftables mode accepts only in its own base chain (another
//! table's chain on the forward hook still sees the packet).
//!
//! Per backend, a lab whose nodes carry another program's FORWARD rules —
//! a counting rule for TCP 80 and a DROP for TCP 8080 — programmed with no
//! policy (the namespace profile allows everything): client → web on 80
//! passes and is counted by the other program's rule, 8080 is dropped by
//! it although policy allowed it.

use std::process::Command;
use std::time::Duration;

use common::assert_probes;
use lab::{nftpolicy_binary, write_state, Lab};
use model::scenario::{Scenario, NODES};

mod common;

const SCENARIO: &str = r#"
name: forward-placement
objects:
  - {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
  - apiVersion: v1
    kind: Pod
    metadata: {name: web, namespace: shop}
    spec: {nodeName: node1, containers: [{name: w, ports: [{containerPort: 80, protocol: TCP}, {containerPort: 8080, protocol: TCP}]}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: client, namespace: shop}
    spec: {nodeName: node2, containers: [{name: c, ports: [{containerPort: 80, protocol: TCP}]}]}
probes:
  - {from: shop/client, to: shop/web, port: 80, expect: allow}
  - {from: shop/client, to: shop/web, port: 8080, expect: deny}
"#;

/// The other program's rules, per backend, as commands in a node's netns.
fn foreign_rules(backend: &str) -> Vec<Vec<&'static str>> {
    match backend {
        "iptables" => {
            let append = ["iptables-legacy", "-A", "FORWARD", "-p", "tcp", "--dport"];
            vec![
                [&append[..], &["80"]].concat(),
                [&append[..], &["8080", "-j", "DROP"]].concat(),
            ]
        }
        _ => vec![vec![
            "nft",
            "add table inet other; \
             add chain inet other forward { type filter hook forward priority 10; }; \
             add rule inet other forward tcp dport 80 counter; \
             add rule inet other forward tcp dport 8080 drop",
        ]],
    }
}

fn in_node(lab: &Lab, node: &str, argv: &[&str]) -> String {
    let ns = lab.node_namespace(node).expect("the lab has the node");
    let out = testkit::output_ok(
        Command::new("ip").args(["netns", "exec", ns]).args(argv),
        format!("{argv:?} in {node}"),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Packets the other program's TCP 80 rule counted on `node`.
fn foreign_count(lab: &Lab, backend: &str, node: &str) -> u64 {
    match backend {
        "iptables" => {
            let listing = in_node(
                lab,
                node,
                &["iptables-legacy", "-L", "FORWARD", "-v", "-x", "-n"],
            );
            listing
                .lines()
                .find(|l| l.contains("tcp dpt:80") && !l.contains("DROP"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no counting rule in FORWARD:\n{listing}"))
        }
        _ => {
            let listing = in_node(lab, node, &["nft", "list", "table", "inet", "other"]);
            listing
                .lines()
                .find(|l| l.contains("tcp dport 80 counter"))
                .and_then(|l| l.split("packets ").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no counting rule in table inet other:\n{listing}"))
        }
    }
}

#[test]
fn other_forward_rules_see_policy_accepted_packets() {
    let scenario = Scenario::parse("forward-placement.yaml", SCENARIO).unwrap();
    let state = scenario.states().unwrap().remove(0);
    let nftpolicy = nftpolicy_binary();
    for backend in ["iptables", "nftables"] {
        let lab = Lab::build(&state.pods(), &[], &NODES).unwrap();
        for node in NODES {
            for argv in foreign_rules(backend) {
                in_node(&lab, node, &argv);
            }
        }
        let dir = lab.workdir().join(backend);
        write_state(&dir, &state).unwrap();
        lab.program_nodes(&dir, &nftpolicy, backend, Duration::from_secs(30))
            .unwrap();
        if backend == "iptables" {
            // Ours around theirs: the jump first, the accept last.
            let saved = in_node(&lab, "node1", &["iptables-legacy-save", "-t", "filter"]);
            let fwd: Vec<&str> = saved
                .lines()
                .filter(|l| l.starts_with("-A FORWARD"))
                .collect();
            assert_eq!(fwd.len(), 4, "{saved}");
            assert!(fwd[0].ends_with("-j cali-FORWARD"), "{saved}");
            assert!(
                fwd[3].contains("Policy explicitly accepted packet"),
                "{saved}"
            );
        }
        let mut lab = lab;
        let probes: Vec<_> = scenario.steps[0]
            .probes
            .iter()
            .map(|p| state.resolve_probe(p, &[]).unwrap())
            .collect();
        assert_probes(&mut lab, &probes, backend);
        for node in NODES {
            assert!(
                foreign_count(&lab, backend, node) > 0,
                "{backend}: the other program's FORWARD rule on {node} saw no accepted packet"
            );
        }
    }
}
