//! Huge objects through the whole path: a policy with 10,000 rules and a
//! selector matching 20,000 and 100,000 pods are compiled
//! from Calico resources, programmed into a fresh namespace's kernel in one
//! transaction and read back equal to the desired ruleset. The kernel
//! accepting the transaction is the proof that no netlink message exceeded
//! what it takes (set elements are split across NEWSETELEM messages by
//! `encode::elements`; the socket's send buffer grows with the batch).

mod common;
use common::canonical;

use std::net::Ipv4Addr;

use compiler::nft::{Ruleset, SetElement, TableFamily, TABLE_NAME};
use compiler::{compile_nftables, CompileOptions};
use model::calico::Resource;
use model::state::ClusterState;
use serde_json::{json, Value};

const NODE: &str = "node1";

fn resource(v: Value) -> Resource {
    Resource::from_value("huge test", v).expect("test resources are valid")
}

fn endpoint(node: &str, i: u32, app: &str, ip: Ipv4Addr) -> Resource {
    resource(json!({
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": format!("{node}-k8s-pod{i}-eth0"), "namespace": "default", "labels": {"app": app, "projectcalico.org/namespace": "default"}},
        "spec": {
            "orchestrator": "k8s", "node": node, "pod": format!("pod{i}"), "endpoint": "eth0",
            "interfaceName": format!("cali{i:011}"),
            "ipNetworks": [format!("{ip}/32")],
        },
    }))
}

/// The local pod every policy selects.
fn web_pod() -> Resource {
    endpoint(NODE, 0, "web", Ipv4Addr::new(198, 19, 255, 1))
}

fn policy(rules: Vec<Value>) -> Resource {
    resource(json!({
        "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
        "metadata": {"name": "default.huge", "namespace": "default"},
        "spec": {"selector": "app == 'web'", "types": ["Ingress"], "ingress": rules},
    }))
}

/// Compiles `state` for the local node, programs it, and checks the kernel
/// holds exactly that; returns the ruleset.
fn program_and_read_back(tag: &str, state: &ClusterState) -> Ruleset {
    let (logical, rs) = compile_nftables(state, &CompileOptions::new(NODE)).expect("compiles");
    assert!(
        logical.rejected.is_empty(),
        "rejected: {:?}",
        logical.rejected
    );
    let (_ns, mut p) = common::setup(tag);
    let report = p
        .apply(&rs)
        .unwrap_or_else(|e| panic!("{tag}: the kernel refused: {e}"));
    println!(
        "{tag}: {} messages, {} bytes, {:?}",
        report.messages, report.bytes, report.kinds
    );
    let want = canonical(&rs);
    for family in [TableFamily::Ip, TableFamily::Ip6] {
        let got = p.read_back(family, TABLE_NAME).unwrap();
        let want = want.tables.iter().find(|t| t.family == family);
        assert_eq!(
            got.as_ref(),
            want,
            "{tag}: {family:?} table differs from the desired one"
        );
    }
    assert!(!p.has_drift().unwrap(), "{tag}: drift right after apply");
    assert_eq!(
        p.apply(&rs).unwrap().messages,
        0,
        "{tag}: a second apply changes something"
    );
    rs
}

#[test]
fn a_policy_with_ten_thousand_rules_is_programmed_and_reads_back() {
    let rules: Vec<Value> = (0..10_000u32)
        .map(|i| {
            json!({
                "action": if i % 2 == 0 { "Allow" } else { "Deny" },
                "protocol": "TCP",
                "source": {"nets": [format!("{}/32", Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i))]},
                "destination": {"ports": [1024 + (i % 60_000) as u16]},
            })
        })
        .collect();
    let mut state = ClusterState::new();
    state.upsert(web_pod());
    state.upsert(policy(rules));
    let rs = program_and_read_back("huge-rules", &state);
    let v4 = rs
        .tables
        .iter()
        .find(|t| t.family == TableFamily::Ip)
        .unwrap();
    let longest = v4.chains.values().map(|c| c.rules.len()).max().unwrap();
    assert!(
        longest >= 10_000,
        "the policy chain has only {longest} rules"
    );
}

/// One policy whose ingress peer selector matches `pods` remote pods.
fn selector_matching(pods: u32) {
    let mut state = ClusterState::new();
    state.upsert(web_pod());
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    for i in 1..=pods {
        state.upsert(endpoint("node2", i, "client", Ipv4Addr::from(base + i)));
    }
    state.upsert(policy(vec![json!({
        "action": "Allow",
        "source": {"selector": "app == 'client'"},
    })]));
    let rs = program_and_read_back(&format!("huge-sel-{pods}"), &state);
    let v4 = rs
        .tables
        .iter()
        .find(|t| t.family == TableFamily::Ip)
        .unwrap();
    let covered: u64 = v4
        .sets
        .values()
        .flat_map(|s| &s.elements)
        .map(|e| match e {
            SetElement::Net(n) => 1u64 << (32 - n.prefix_len()),
            _ => 0,
        })
        .sum();
    assert!(
        covered >= u64::from(pods),
        "sets cover only {covered} addresses"
    );
}

#[test]
fn a_selector_matching_twenty_thousand_pods_is_programmed_and_reads_back() {
    selector_matching(20_000);
}

#[test]
fn a_selector_matching_a_hundred_thousand_pods_is_programmed_and_reads_back() {
    selector_matching(100_000);
}

/// A hash set read back right after 100,000 addresses went in: the kernel
/// resizes its table in the background meanwhile, and a dump spanning the
/// resize repeats some elements and skips others (readback re-reads it).
#[test]
fn a_hash_set_read_back_while_the_kernel_resizes_it_is_complete() {
    use compiler::nft::{Set, SetKey, Table};
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    let elements: Vec<SetElement> = (1..=100_000u32)
        .map(|i| {
            SetElement::Net(ipnet::IpNet::from(std::net::IpAddr::V4(Ipv4Addr::from(
                base + i,
            ))))
        })
        .collect();
    for round in 0..3 {
        let (_ns, mut p) = common::setup("hash-resize");
        let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
        let set = Set {
            name: "cali40s-pods".into(),
            key: SetKey::Host,
            elements: elements.clone().into(),
            comment: None,
        };
        t.sets.insert(set.name.clone(), set);
        let rs = Ruleset { tables: vec![t] };
        p.apply(&rs).unwrap();
        let got = p.read_back(TableFamily::Ip, TABLE_NAME).unwrap().unwrap();
        assert!(
            got == rs.tables[0],
            "round {round}: read back {} elements, {} of them distinct, of {}",
            got.sets["cali40s-pods"].elements.len(),
            got.sets["cali40s-pods"]
                .elements
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            elements.len()
        );
    }
}
