//! Small arbitrary cluster states (with Nodes, and selectors of `nodes`
//! peers): the nftables and iptables compilers
//! never panic, and every nftables set holds sorted, non-overlapping
//! elements of its table's family (the kernel rejects anything else).
//!
//! Inputs are structured (via `arbitrary`) over a small vocabulary of
//! namespaces, labels, addresses and ports so that selectors actually match
//! and sets overlap, which random bytes would almost never achieve.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use compiler::nft::{SetElement, SetKey, TableFamily};
use compiler::{compile_iptables, compile_nftables, CompileOptions};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use model::calico::Resource;
use model::state::ClusterState;
use serde_json::{json, Value};

const NODE: &str = "node1";
const NAMESPACES: [&str; 3] = ["prod", "dev", "kube-system"];
const KEYS: [&str; 3] = ["app", "tier", "role"];
const VALUES: [&str; 3] = ["web", "db", "api"];
const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];

#[derive(Arbitrary, Debug)]
struct Cluster {
    pods: Vec<Pod>,
    policies: Vec<Policy>,
    network_sets: Vec<NetworkSet>,
    namespace_labels: Vec<(u8, Label)>,
    /// Nodes: their addresses belong only to selectors requiring the
    /// node marker (`Sel::Node`, an admin policy's `nodes` peer).
    nodes: Vec<NodeObj>,
}

#[derive(Arbitrary, Debug)]
struct NodeObj {
    labels: Vec<Label>,
    addresses: Vec<Addr>,
}

#[derive(Arbitrary, Debug)]
struct Label(u8, u8);

#[derive(Arbitrary, Debug)]
struct Pod {
    namespace: u8,
    local: bool,
    labels: Vec<Label>,
    addresses: Vec<Addr>,
    ports: Vec<(u8, bool, u16)>,
}

#[derive(Arbitrary, Debug)]
enum Addr {
    /// 198.18.x.y/32 or a wider prefix, so endpoints and nets overlap.
    V4(u16, u8),
    V6(u16, u8),
}

#[derive(Arbitrary, Debug)]
struct Policy {
    global: bool,
    namespace: u8,
    order: Option<u8>,
    selector: Sel,
    types: u8,
    ingress: Vec<Rule>,
    egress: Vec<Rule>,
}

#[derive(Arbitrary, Debug)]
enum Sel {
    All,
    Eq(Label),
    Ne(Label),
    Has(u8),
    In(u8, Vec<u8>),
    Not(Box<Sel>),
    And(Box<Sel>, Box<Sel>),
    Or(Box<Sel>, Box<Sel>),
    /// `has(nftpolicy.io/node) && (…)`: what a `nodes` peer becomes.
    Node(Box<Sel>),
}

#[derive(Arbitrary, Debug)]
struct Rule {
    action: u8,
    protocol: Option<u8>,
    ip_version: Option<bool>,
    source: Entity,
    destination: Entity,
}

#[derive(Arbitrary, Debug)]
struct Entity {
    nets: Vec<Addr>,
    not_nets: Vec<Addr>,
    selector: Option<Sel>,
    not_selector: Option<Sel>,
    namespace_selector: Option<Sel>,
    ports: Vec<PortSpec>,
    not_ports: Vec<PortSpec>,
}

#[derive(Arbitrary, Debug)]
enum PortSpec {
    Single(u16),
    Range(u16, u16),
    Named(u8),
}

#[derive(Arbitrary, Debug)]
struct NetworkSet {
    global: bool,
    namespace: u8,
    labels: Vec<Label>,
    nets: Vec<Addr>,
}

fn pick<'a>(items: &[&'a str], i: u8) -> &'a str {
    items[usize::from(i) % items.len()]
}

fn few<T>(v: &[T], max: usize) -> &[T] {
    &v[..v.len().min(max)]
}

fn labels(ls: &[Label]) -> Value {
    let mut m = serde_json::Map::new();
    for Label(k, v) in few(ls, 3) {
        m.insert(pick(&KEYS, *k).into(), pick(&VALUES, *v).into());
    }
    Value::Object(m)
}

fn net(a: &Addr) -> String {
    match *a {
        Addr::V4(host, len) => {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) | u32::from(host % 512));
            let len = 23 + len % 10; // /23 … /32
            IpNet::new(IpAddr::V4(ip), len).unwrap().trunc().to_string()
        }
        Addr::V6(host, len) => {
            let ip = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, host % 512);
            let len = 119 + len % 10; // /119 … /128
            IpNet::new(IpAddr::V6(ip), len).unwrap().trunc().to_string()
        }
    }
}

fn host(a: &Addr) -> String {
    match *a {
        Addr::V4(host, _) => format!("198.18.{}.{}/32", (host >> 8) % 2, host & 0xff),
        Addr::V6(host, _) => format!("fd00:198:18::{:x}/128", host % 512),
    }
}

fn selector(s: &Sel, depth: u32) -> String {
    if depth > 4 {
        return "all()".into();
    }
    match s {
        Sel::All => "all()".into(),
        Sel::Eq(Label(k, v)) => format!("{} == '{}'", pick(&KEYS, *k), pick(&VALUES, *v)),
        Sel::Ne(Label(k, v)) => format!("{} != '{}'", pick(&KEYS, *k), pick(&VALUES, *v)),
        Sel::Has(k) => format!("has({})", pick(&KEYS, *k)),
        Sel::In(k, vs) => {
            let vs: Vec<String> = few(vs, 3).iter().map(|v| format!("'{}'", pick(&VALUES, *v))).collect();
            format!("{} in {{{}}}", pick(&KEYS, *k), vs.join(", "))
        }
        Sel::Not(a) => format!("!({})", selector(a, depth + 1)),
        Sel::And(a, b) => format!("({}) && ({})", selector(a, depth + 1), selector(b, depth + 1)),
        Sel::Or(a, b) => format!("({}) || ({})", selector(a, depth + 1), selector(b, depth + 1)),
        Sel::Node(a) => format!("has({}) && ({})", model::calico::LABEL_NODE, selector(a, depth + 1)),
    }
}

fn port(p: &PortSpec) -> Value {
    match p {
        PortSpec::Single(p) => json!(p),
        PortSpec::Range(a, b) => json!(format!("{a}:{b}")),
        PortSpec::Named(n) => json!(pick(&PORT_NAMES, *n)),
    }
}

fn entity(e: &Entity) -> Value {
    let mut m = serde_json::Map::new();
    let nets = |v: &[Addr]| Value::from(few(v, 4).iter().map(net).collect::<Vec<_>>());
    m.insert("nets".into(), nets(&e.nets));
    m.insert("notNets".into(), nets(&e.not_nets));
    for (field, sel) in [
        ("selector", &e.selector),
        ("notSelector", &e.not_selector),
        ("namespaceSelector", &e.namespace_selector),
    ] {
        if let Some(s) = sel {
            m.insert(field.into(), selector(s, 0).into());
        }
    }
    m.insert("ports".into(), few(&e.ports, 4).iter().map(port).collect());
    m.insert("notPorts".into(), few(&e.not_ports, 2).iter().map(port).collect());
    Value::Object(m)
}

fn rule(r: &Rule) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("action".into(), pick(&["Allow", "Deny", "Pass", "Log"], r.action).into());
    if let Some(p) = r.protocol {
        m.insert("protocol".into(), pick(&["TCP", "UDP", "ICMP", "ICMPv6", "SCTP"], p).into());
    }
    if let Some(v6) = r.ip_version {
        m.insert("ipVersion".into(), if v6 { 6 } else { 4 }.into());
    }
    m.insert("source".into(), entity(&r.source));
    m.insert("destination".into(), entity(&r.destination));
    Value::Object(m)
}

/// The Calico resources of `c` (invalid ones are simply left out, as the
/// datastore decoder would reject them).
fn resources(c: &Cluster) -> Vec<Resource> {
    let mut values = Vec::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        let mut ls = serde_json::Map::new();
        ls.insert("pcns.projectcalico.org/name".into(), (*ns).into());
        for (n, Label(k, v)) in few(&c.namespace_labels, 4) {
            if usize::from(*n) % NAMESPACES.len() == i {
                ls.insert(format!("pcns.{}", pick(&KEYS, *k)), pick(&VALUES, *v).into());
            }
        }
        values.push(json!({
            "apiVersion": "projectcalico.org/v3", "kind": "Profile",
            "metadata": {"name": format!("kns.{ns}")},
            "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}], "labelsToApply": ls},
        }));
    }
    for (i, p) in few(&c.pods, 6).iter().enumerate() {
        let ns = pick(&NAMESPACES, p.namespace);
        let node = if p.local { NODE } else { "node2" };
        let ports: Vec<Value> = few(&p.ports, 3)
            .iter()
            .map(|(n, udp, port)| json!({"name": pick(&PORT_NAMES, *n), "protocol": if *udp { "UDP" } else { "TCP" }, "port": port}))
            .collect();
        values.push(json!({
            "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {"name": format!("{node}-k8s-pod{i}-eth0"), "namespace": ns, "labels": labels(&p.labels)},
            "spec": {
                "orchestrator": "k8s", "node": node, "pod": format!("pod{i}"), "endpoint": "eth0",
                "interfaceName": format!("cali{i:011}"),
                "ipNetworks": few(&p.addresses, 2).iter().map(host).collect::<Vec<_>>(),
                "profiles": [format!("kns.{ns}")],
                "ports": ports,
            },
        }));
    }
    for (i, p) in few(&c.policies, 4).iter().enumerate() {
        let types: Vec<&str> = match p.types % 4 {
            0 => vec![],
            1 => vec!["Ingress"],
            2 => vec!["Egress"],
            _ => vec!["Ingress", "Egress"],
        };
        let mut spec = json!({
            "selector": selector(&p.selector, 0),
            "types": types,
            "ingress": few(&p.ingress, 3).iter().map(rule).collect::<Vec<_>>(),
            "egress": few(&p.egress, 3).iter().map(rule).collect::<Vec<_>>(),
        });
        if let Some(o) = p.order {
            spec["order"] = json!(f64::from(o));
        }
        let (kind, meta) = if p.global {
            ("GlobalNetworkPolicy", json!({"name": format!("default.gnp{i}")}))
        } else {
            ("NetworkPolicy", json!({"name": format!("default.np{i}"), "namespace": pick(&NAMESPACES, p.namespace)}))
        };
        values.push(json!({"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": meta, "spec": spec}));
    }
    for (i, s) in few(&c.network_sets, 3).iter().enumerate() {
        let (kind, meta) = if s.global {
            ("GlobalNetworkSet", json!({"name": format!("gns{i}"), "labels": labels(&s.labels)}))
        } else {
            ("NetworkSet", json!({"name": format!("ns{i}"), "namespace": pick(&NAMESPACES, s.namespace), "labels": labels(&s.labels)}))
        };
        let nets: Vec<String> = few(&s.nets, 4).iter().map(net).collect();
        values.push(json!({"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": meta, "spec": {"nets": nets}}));
    }
    for (i, n) in few(&c.nodes, 2).iter().enumerate() {
        let addresses: Vec<Value> = few(&n.addresses, 2)
            .iter()
            .map(|a| json!({"address": host(a), "type": "InternalIP"}))
            .collect();
        values.push(json!({
            "apiVersion": "projectcalico.org/v3", "kind": "Node",
            "metadata": {"name": format!("node{}", i + 1), "labels": labels(&n.labels)},
            "spec": {"addresses": addresses},
        }));
    }
    values
        .into_iter()
        .filter_map(|v| Resource::from_value("fuzz", v).ok())
        .collect()
}

/// First and last value of an element, comparable within one set.
fn span(e: &SetElement) -> (u128, u128) {
    match e {
        SetElement::Net(n) => {
            let v = |ip: IpAddr| match ip {
                IpAddr::V4(a) => u128::from(u32::from(a)),
                IpAddr::V6(a) => u128::from(a),
            };
            (v(n.network()), v(n.broadcast()))
        }
        SetElement::Ports { min, max } => (u128::from(*min), u128::from(*max)),
        SetElement::NamedPort(..) | SetElement::Mark(_) | SetElement::MarkPort(..) => {
            unreachable!("named-port and mark sets are not interval sets")
        }
    }
}

fn family_ok(family: TableFamily, e: &SetElement) -> bool {
    let v6 = match e {
        SetElement::Net(n) => matches!(n, IpNet::V6(_)),
        SetElement::NamedPort(ip, ..) => ip.is_ipv6(),
        SetElement::Ports { .. } | SetElement::Mark(_) | SetElement::MarkPort(..) => return true,
    };
    v6 == family.is_v6()
}

fuzz_target!(|cluster: Cluster| {
    let mut state = ClusterState::new();
    for r in resources(&cluster) {
        state.upsert(r);
    }
    let opts = CompileOptions::new(NODE);
    let nft = compile_nftables(&state, &opts);
    let ipt = compile_iptables(&state, &opts);
    assert_eq!(nft.is_ok(), ipt.is_ok(), "backends disagree on whether the state compiles");
    let Ok((_, ruleset)) = nft else {
        return;
    };
    for table in &ruleset.tables {
        for set in table.sets.values() {
            for e in &set.elements {
                assert!(family_ok(table.family, e), "set {} in {:?} table holds {e:?}", set.name, table.family);
            }
            for pair in set.elements.windows(2) {
                assert!(pair[0] < pair[1], "set {} is not sorted/unique: {:?}", set.name, set.elements);
            }
            if set.key.is_interval() {
                for pair in set.elements.windows(2) {
                    let (a, b) = (span(&pair[0]), span(&pair[1]));
                    assert!(a.1 < b.0, "set {} has overlapping or unsorted intervals {:?} {:?}", set.name, pair[0], pair[1]);
                }
            } else if set.key == SetKey::Host {
                for e in &set.elements {
                    assert!(
                        matches!(e, SetElement::Net(n) if n.prefix_len() == n.max_prefix_len()),
                        "hash set {} holds {e:?}, not a host address",
                        set.name
                    );
                }
            } else {
                assert_eq!(set.key, SetKey::NamedPort);
            }
        }
    }
});
