//! Seeded random clusters for differential testing (model = nftables =
//! iptables).
//!
//! Every case of a run has the same pods (namespace, name, node, addresses,
//! declared ports) and the same external hosts, so one [`crate::Lab`] serves
//! all cases: only pod labels, namespace labels and NetworkPolicies change,
//! and pods re-applied with new labels keep their addresses. Named ports
//! resolve to different numbers on different pods (`http` is 80 on some pods
//! and 8080 or 8081 on others), so named-port rules are exercised for real.
//!
//! A case is plain data ([`Case`]) that renders to scenario YAML and loads
//! through [`Scenario::parse`], so it passes the normal loader and its
//! validation; the same data is what shrinking cuts down.

use std::collections::BTreeMap;

use model::scenario::{Scenario, ScenarioError};
use serde_yaml::{Mapping, Value};

/// The namespaces every case has (labels vary).
pub const NAMESPACES: [&str; 3] = ["fz-a", "fz-b", "fz-c"];

/// A declared container port: name, number, protocol (`TCP`/`UDP`).
type PortDecl = (Option<&'static str>, u16, &'static str);

/// The fixed pods: namespace, name, node, last address octet, ports.
const PODS: [(&str, &str, &str, u8, &[PortDecl]); 7] = [
    (
        "fz-a",
        "a1",
        "node1",
        11,
        &[
            (Some("http"), 80, "TCP"),
            (Some("dns"), 53, "UDP"),
            (Some("metrics"), 9100, "TCP"),
        ],
    ),
    (
        "fz-a",
        "a2",
        "node2",
        12,
        &[(Some("http"), 8080, "TCP"), (None, 5432, "TCP")],
    ),
    (
        "fz-a",
        "a3",
        "node1",
        13,
        &[(Some("http"), 80, "TCP"), (Some("dns"), 5353, "UDP")],
    ),
    (
        "fz-b",
        "b1",
        "node2",
        14,
        &[
            (Some("http"), 8081, "TCP"),
            (Some("metrics"), 9101, "TCP"),
            (None, 53, "UDP"),
        ],
    ),
    (
        "fz-b",
        "b2",
        "node1",
        15,
        &[(Some("db"), 5432, "TCP"), (Some("dns"), 53, "UDP")],
    ),
    (
        "fz-c",
        "c1",
        "node2",
        16,
        &[(Some("http"), 80, "TCP"), (None, 6379, "TCP")],
    ),
    (
        "fz-c",
        "c2",
        "node1",
        17,
        &[
            (Some("metrics"), 9100, "TCP"),
            (Some("dns"), 5353, "UDP"),
            (Some("http"), 8080, "TCP"),
        ],
    ),
];

/// The fixed external hosts (outside the pod range, inside the test range).
pub const EXTERNALS: [(&str, &str); 2] = [("ext1", "198.19.200.10"), ("ext2", "198.19.201.20")];
/// What a probe may aim at an external host.
const EXTERNAL_PORTS: [(u16, &str); 3] = [(80, "TCP"), (443, "TCP"), (53, "UDP")];

const POD_LABELS: [(&str, &[&str]); 3] = [
    ("app", &["web", "db", "api"]),
    ("tier", &["front", "back"]),
    ("env", &["prod", "dev"]),
];
const NAMESPACE_LABELS: [(&str, &[&str]); 3] = [
    ("team", &["red", "blue"]),
    ("env", &["prod", "dev"]),
    // Set on every namespace by the loader, as the API server does.
    ("kubernetes.io/metadata.name", &NAMESPACES),
];

/// Labels of the lab's nodes (Node objects, matched by admin policies'
/// `nodes` peers).
const NODE_LABELS: [(&str, &[&str]); 2] =
    [("zone", &["east", "west"]), ("role", &["infra", "apps"])];
const NODE_NAMES: [&str; 2] = ["node1", "node2"];

const NUMERIC_PORTS: [u16; 10] = [53, 80, 443, 5353, 5432, 6379, 8080, 8081, 9100, 9101];
const NAMED_PORTS: [&str; 5] = ["http", "dns", "metrics", "db", "absent"];
const PORT_RANGES: [(u16, u16); 5] = [
    (80, 8080),
    (5000, 6000),
    (8080, 8081),
    (9100, 9101),
    (50, 60),
];

/// `ipBlock`s: (cidr, except). Pods are 198.18.130.11-17 and
/// fd00:198:18:82::11-17; externals 198.19.200.10 and 198.19.201.20.
const IP_BLOCKS: [(&str, &[&str]); 9] = [
    ("198.18.130.0/24", &["198.18.130.12/30"]),
    ("198.18.130.0/28", &[]),
    ("198.18.130.16/28", &["198.18.130.17/32"]),
    ("198.18.130.13/32", &[]),
    ("198.19.200.0/24", &[]),
    ("198.18.0.0/15", &["198.19.201.0/24", "198.18.130.11/32"]),
    ("198.19.0.0/16", &["198.19.200.10/32"]),
    ("fd00:198:18:82::/64", &["fd00:198:18:82::10/124"]),
    ("fd00:198:18::/48", &[]),
];

/// SplitMix64: small, seedable, and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// `lo..=hi`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenNamespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ipv4: String,
    pub ipv6: String,
    pub ports: Vec<(Option<String>, u16, String)>,
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName` (none: the `default` account).
    pub account: Option<String>,
}

/// A ServiceAccount: its labels select pods running as it.
#[derive(Debug, Clone, PartialEq)]
pub struct GenAccount {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenPolicy {
    pub namespace: String,
    pub name: String,
    /// The NetworkPolicy `spec`, as written.
    pub spec: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenProbe {
    /// `ns/pod` or `ext/NAME`.
    pub from: String,
    pub to: String,
    /// A number or a port name of the destination pod.
    pub port: String,
    pub protocol: String,
    pub ipv6: bool,
    /// What the file says is expected; the runner fills in the model's
    /// verdict before writing a reproduction.
    pub expect_allow: bool,
}

/// A Calico resource as written: `Tier` or `GlobalNetworkPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenCalico {
    pub kind: &'static str,
    pub name: String,
    pub spec: Value,
}

/// One generated cluster with its probes.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub name: String,
    pub namespaces: Vec<GenNamespace>,
    pub pods: Vec<GenPod>,
    pub policies: Vec<GenPolicy>,
    /// Calico tiers and tiered GlobalNetworkPolicies (in some cases).
    pub calico: Vec<GenCalico>,
    /// AdminNetworkPolicies, a BaselineAdminNetworkPolicy and
    /// ClusterNetworkPolicies (in some cases).
    pub admin: Vec<GenAdmin>,
    /// Service accounts (in some cases with Calico policies, which then
    /// match by account).
    pub accounts: Vec<GenAccount>,
    pub externals: Vec<(String, String)>,
    pub probes: Vec<GenProbe>,
    /// Node objects (name, labels), in some cases; probes may aim at the
    /// lab's nodes either way.
    pub nodes: Vec<(String, BTreeMap<String, String>)>,
}

/// Case `index` of the run seeded `seed`: each case has its own stream, so
/// a case is reproduced without generating the ones before it.
pub fn case(seed: u64, index: u64) -> Case {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xa076_1d64_78bd_642f));
    // Warm up so nearby seeds diverge at once.
    rng.next_u64();
    let namespaces = NAMESPACES
        .iter()
        .map(|ns| GenNamespace {
            name: (*ns).to_owned(),
            labels: random_labels(&mut rng, &NAMESPACE_LABELS[..2]),
        })
        .collect();
    let mut pods: Vec<GenPod> = PODS
        .iter()
        .map(|(ns, name, node, host, ports)| GenPod {
            namespace: (*ns).to_owned(),
            name: (*name).to_owned(),
            node: (*node).to_owned(),
            ipv4: format!("198.18.130.{host}"),
            ipv6: format!("fd00:198:18:82::{host}"),
            ports: ports
                .iter()
                .map(|(n, p, proto)| (n.map(str::to_owned), *p, (*proto).to_owned()))
                .collect(),
            labels: random_labels(&mut rng, &POD_LABELS),
            account: None,
        })
        .collect();
    let policies = (0..rng.between(1, 4))
        .map(|i| GenPolicy {
            namespace: (*rng.pick(&NAMESPACES)).to_owned(),
            name: format!("p{i}"),
            spec: random_policy_spec(&mut rng),
        })
        .collect();
    let externals: Vec<(String, String)> = EXTERNALS
        .iter()
        .map(|(n, ip)| ((*n).to_owned(), (*ip).to_owned()))
        .collect();
    let probes: Vec<GenProbe> = (0..12).map(|_| random_probe(&mut rng, &pods)).collect();
    // Drawn last, so that the rest of a case is what it was before tiers.
    let mut calico = random_tiers(&mut rng);
    let accounts = random_accounts(&mut rng, &mut pods, &mut calico);
    let admin = random_admin_policies(&mut rng);
    let nodes = random_nodes(&mut rng);
    let mut probes = probes;
    for _ in 0..rng.below(3) {
        probes.push(random_node_probe(&mut rng, &pods));
    }
    Case {
        name: format!("fuzz-{seed}-{index}"),
        namespaces,
        pods,
        policies,
        calico,
        admin,
        accounts,
        externals,
        probes,
        nodes,
    }
}

/// Node objects for the lab's nodes (addresses filled in by the loader),
/// each with random labels, in about half the cases.
fn random_nodes(rng: &mut Rng) -> Vec<(String, BTreeMap<String, String>)> {
    if !rng.chance(50) {
        return vec![];
    }
    let mut nodes = Vec::new();
    for n in NODE_NAMES {
        if rng.chance(85) {
            nodes.push((n.to_owned(), random_labels(rng, &NODE_LABELS)));
        }
    }
    nodes
}

/// A pod probing one of the lab's nodes (its own or the other one).
fn random_node_probe(rng: &mut Rng, pods: &[GenPod]) -> GenProbe {
    let pod = rng.pick(pods);
    let (port, protocol) = *rng.pick(&EXTERNAL_PORTS);
    GenProbe {
        from: format!("{}/{}", pod.namespace, pod.name),
        to: format!("node/{}", pick_str(rng, &NODE_NAMES)),
        port: port.to_string(),
        protocol: protocol.to_owned(),
        ipv6: rng.chance(30),
        expect_allow: true,
    }
}

/// An admin policy as written: kind (`AdminNetworkPolicy`,
/// `BaselineAdminNetworkPolicy`, `ClusterNetworkPolicy`), name and spec.
#[derive(Debug, Clone, PartialEq)]
pub struct GenAdmin {
    pub kind: &'static str,
    pub name: String,
    pub spec: Value,
}

/// Egress `networks` of the admin policies: pods' and externals' ranges.
const ADMIN_NETWORKS: [&str; 5] = [
    "198.18.130.0/28",
    "198.19.200.0/24",
    "198.19.0.0/16",
    "fd00:198:18:82::/64",
    "fd00:198:18::/48",
];

/// In some cases, AdminNetworkPolicies (priorities that sometimes tie),
/// the BaselineAdminNetworkPolicy and ClusterNetworkPolicies of both
/// tiers, with every action, peer and port form the model implements.
fn random_admin_policies(rng: &mut Rng) -> Vec<GenAdmin> {
    let mut out = Vec::new();
    if !rng.chance(40) {
        return out;
    }
    for i in 0..rng.between(0, 2) {
        out.push(GenAdmin {
            kind: "AdminNetworkPolicy",
            name: format!("anp{i}"),
            spec: random_admin_spec(rng, "anp"),
        });
    }
    if rng.chance(50) {
        out.push(GenAdmin {
            kind: "BaselineAdminNetworkPolicy",
            name: "default".into(),
            spec: random_admin_spec(rng, "banp"),
        });
    }
    if rng.chance(40) {
        out.push(GenAdmin {
            kind: "ClusterNetworkPolicy",
            name: "cnp0".into(),
            spec: random_admin_spec(rng, "cnp"),
        });
    }
    out
}

fn random_admin_spec(rng: &mut Rng, kind: &str) -> Value {
    let subject = if rng.chance(50) {
        map([("namespaces", random_selector(rng, &NAMESPACE_LABELS))])
    } else {
        map([("pods", random_namespaced_pod(rng))])
    };
    let mut spec = map([("subject", subject)]);
    if kind != "banp" {
        insert(
            &mut spec,
            "priority",
            Value::from(*rng.pick(&[1, 5, 5, 10])),
        );
    }
    if kind == "cnp" {
        insert(&mut spec, "tier", s(pick_str(rng, &["Admin", "Baseline"])));
    }
    let actions: &[&str] = match kind {
        "anp" => &["Allow", "Deny", "Pass"],
        "banp" => &["Allow", "Deny"],
        _ => &["Accept", "Deny", "Pass"],
    };
    for (section, peer_key) in [("ingress", "from"), ("egress", "to")] {
        if !rng.chance(60) {
            continue;
        }
        let rules = (0..rng.between(1, 3))
            .map(|_| {
                let peers = (0..rng.between(1, 2))
                    .map(|_| random_admin_peer(rng, section == "egress"))
                    .collect();
                let mut rule = map([
                    ("action", s(pick_str(rng, actions))),
                    (peer_key, Value::Sequence(peers)),
                ]);
                if rng.chance(50) {
                    let (key, ports) = if kind == "cnp" {
                        (
                            "protocols",
                            (0..rng.between(1, 2))
                                .map(|_| random_cnp_protocol(rng))
                                .collect(),
                        )
                    } else {
                        (
                            "ports",
                            (0..rng.between(1, 2))
                                .map(|_| random_anp_port(rng))
                                .collect(),
                        )
                    };
                    insert(&mut rule, key, Value::Sequence(ports));
                }
                rule
            })
            .collect();
        insert(&mut spec, section, Value::Sequence(rules));
    }
    spec
}

fn random_namespaced_pod(rng: &mut Rng) -> Value {
    map([
        ("namespaceSelector", random_selector(rng, &NAMESPACE_LABELS)),
        ("podSelector", random_selector(rng, &POD_LABELS)),
    ])
}

fn random_admin_peer(rng: &mut Rng, egress: bool) -> Value {
    match rng.below(if egress { 12 } else { 8 }) {
        0..=3 => map([("namespaces", random_selector(rng, &NAMESPACE_LABELS))]),
        4..=7 => map([("pods", random_namespaced_pod(rng))]),
        10..=11 => map([("nodes", random_selector(rng, &NODE_LABELS))]),
        _ => {
            let nets = (0..rng.between(1, 2))
                .map(|_| s(pick_str(rng, &ADMIN_NETWORKS)))
                .collect();
            map([("networks", Value::Sequence(nets))])
        }
    }
}

fn random_anp_port(rng: &mut Rng) -> Value {
    let protocol = pick_str(rng, &["TCP", "UDP"]);
    match rng.below(3) {
        0 => {
            let mut n = map([("port", Value::from(*rng.pick(&NUMERIC_PORTS)))]);
            if rng.chance(70) {
                insert(&mut n, "protocol", s(protocol));
            }
            map([("portNumber", n)])
        }
        1 => map([("namedPort", s(pick_str(rng, &NAMED_PORTS)))]),
        _ => {
            let (lo, hi) = *rng.pick(&PORT_RANGES);
            map([(
                "portRange",
                map([
                    ("protocol", s(protocol)),
                    ("start", Value::from(lo)),
                    ("end", Value::from(hi)),
                ]),
            )])
        }
    }
}

fn random_cnp_protocol(rng: &mut Rng) -> Value {
    if rng.chance(25) {
        return map([("destinationNamedPort", s(pick_str(rng, &NAMED_PORTS)))]);
    }
    let protocol = pick_str(rng, &["tcp", "udp"]);
    let port = match rng.below(3) {
        0 => map([]),
        1 => map([(
            "destinationPort",
            map([("number", Value::from(*rng.pick(&NUMERIC_PORTS)))]),
        )]),
        _ => {
            let (lo, hi) = *rng.pick(&PORT_RANGES);
            map([(
                "destinationPort",
                map([(
                    "range",
                    map([("start", Value::from(lo)), ("end", Value::from(hi))]),
                )]),
            )])
        }
    };
    map([(protocol, port)])
}

const ACCOUNTS: [&str; 2] = ["sa-x", "sa-y"];
const ACCOUNT_LABELS: [(&str, &[&str]); 1] = [("team", &["red", "blue"])];

/// In some cases with Calico policies: service accounts with labels in
/// every namespace, pods running as them (or as `default`), and the
/// policies limited by `serviceAccountSelector` and their rules' peers by
/// `serviceAccounts` (names, selector or both). Drawn after everything
/// else, so the rest of a case is what it was without them.
fn random_accounts(
    rng: &mut Rng,
    pods: &mut [GenPod],
    calico: &mut [GenCalico],
) -> Vec<GenAccount> {
    if !calico.iter().any(|c| c.kind == "GlobalNetworkPolicy") || !rng.chance(60) {
        return vec![];
    }
    let mut out = Vec::new();
    for ns in NAMESPACES {
        for name in ACCOUNTS {
            out.push(GenAccount {
                namespace: ns.to_owned(),
                name: name.to_owned(),
                labels: random_labels(rng, &ACCOUNT_LABELS),
            });
        }
    }
    for pod in pods.iter_mut() {
        pod.account = match rng.below(3) {
            0 => None,
            i => Some(ACCOUNTS[i - 1].to_owned()),
        };
    }
    for gnp in calico
        .iter_mut()
        .filter(|c| c.kind == "GlobalNetworkPolicy")
    {
        if rng.chance(30) {
            insert(
                &mut gnp.spec,
                "serviceAccountSelector",
                random_account_selector(rng),
            );
        }
        for (section, peer) in [("ingress", "source"), ("egress", "destination")] {
            for r in 0..seq_len(&gnp.spec, &[section]) {
                if !rng.chance(50) {
                    continue;
                }
                let mut m = Mapping::new();
                let both = rng.chance(30);
                if both || rng.chance(50) {
                    let names = match rng.below(3) {
                        0 => vec![s("default")],
                        1 => vec![s(pick_str(rng, &ACCOUNTS))],
                        _ => ACCOUNTS.iter().map(|a| s(a)).collect(),
                    };
                    m.insert(s("names"), Value::Sequence(names));
                }
                if both || m.is_empty() {
                    m.insert(s("selector"), random_account_selector(rng));
                }
                let Some(rule) = walk_mut(&mut gnp.spec, &[section, &r.to_string()]) else {
                    continue;
                };
                if walk_mut(rule, &[peer]).is_none() {
                    insert(rule, peer, Value::Mapping(Mapping::new()));
                }
                if let Some(entity) = walk_mut(rule, &[peer]) {
                    insert(entity, "serviceAccounts", Value::Mapping(m));
                }
            }
        }
    }
    out
}

fn random_account_selector(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 => s("all()"),
        1 => s("has(team)"),
        2 => s(&format!(
            "projectcalico.org/name == '{}'",
            pick_str(rng, &ACCOUNTS)
        )),
        _ => s(&format!("team == '{}'", pick_str(rng, ACCOUNT_LABELS[0].1))),
    }
}

const TIERS: [&str; 2] = ["t-alpha", "t-beta"];

/// In some cases, Calico tiers (random order and defaultAction) and
/// GlobalNetworkPolicies in them or in the default tier, with Allow, Deny
/// and Pass rules: felix's per-tier evaluation against the model.
fn random_tiers(rng: &mut Rng) -> Vec<GenCalico> {
    let mut out = Vec::new();
    if !rng.chance(40) {
        return out;
    }
    let tiers = &TIERS[..rng.between(1, TIERS.len())];
    for name in tiers {
        let mut spec = Value::Mapping(Mapping::new());
        if rng.chance(80) {
            insert(
                &mut spec,
                "order",
                Value::from(*rng.pick(&[100.0, 200.0, 2e6])),
            );
        }
        if rng.chance(70) {
            insert(
                &mut spec,
                "defaultAction",
                s(pick_str(rng, &["Deny", "Pass"])),
            );
        }
        out.push(GenCalico {
            kind: "Tier",
            name: (*name).to_owned(),
            spec,
        });
    }
    for i in 0..rng.between(1, 3) {
        let tier = if rng.chance(80) {
            *rng.pick(tiers)
        } else {
            model::calico::DEFAULT_TIER
        };
        let mut spec = map([("tier", s(tier)), ("selector", random_calico_selector(rng))]);
        if rng.chance(50) {
            insert(
                &mut spec,
                "order",
                Value::from(*rng.pick(&[1.0, 5.0, 10.0])),
            );
        }
        const TYPES: [&[&str]; 3] = [&["Ingress"], &["Egress"], &["Ingress", "Egress"]];
        let types = rng.pick(&TYPES).to_vec();
        insert(
            &mut spec,
            "types",
            Value::Sequence(types.iter().map(|t| s(t)).collect()),
        );
        for t in types {
            let rules = (0..rng.between(1, 2))
                .map(|_| random_calico_rule(rng, t == "Ingress"))
                .collect();
            insert(&mut spec, &t.to_lowercase(), Value::Sequence(rules));
        }
        out.push(GenCalico {
            kind: "GlobalNetworkPolicy",
            name: format!("{tier}.g{i}"),
            spec,
        });
    }
    out
}

fn random_calico_selector(rng: &mut Rng) -> Value {
    let (key, values) = *rng.pick(&POD_LABELS);
    match rng.below(4) {
        0 => s("all()"),
        1 => s(&format!("has({key})")),
        _ => s(&format!("{key} == '{}'", rng.pick(values))),
    }
}

fn random_calico_rule(rng: &mut Rng, ingress: bool) -> Value {
    let mut rule = map([("action", s(pick_str(rng, &["Allow", "Deny", "Pass"])))]);
    let mut source = Value::Mapping(Mapping::new());
    let mut destination = Value::Mapping(Mapping::new());
    if rng.chance(50) {
        let peer = if ingress {
            &mut source
        } else {
            &mut destination
        };
        insert(peer, "selector", random_calico_selector(rng));
    }
    if rng.chance(50) {
        let (protocol, ports): (&str, &[u16]) =
            *rng.pick(&[("TCP", &[80, 5432, 8080][..]), ("UDP", &[53, 5353])]);
        insert(&mut rule, "protocol", s(protocol));
        if rng.chance(60) {
            let port = Value::from(*rng.pick(ports));
            insert(&mut destination, "ports", Value::Sequence(vec![port]));
        }
    }
    for (key, entity) in [("source", source), ("destination", destination)] {
        if entity.as_mapping().is_some_and(|m| !m.is_empty()) {
            insert(&mut rule, key, entity);
        }
    }
    rule
}

fn random_labels(rng: &mut Rng, vocabulary: &[(&str, &[&str])]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, values) in vocabulary {
        if rng.chance(60) {
            out.insert((*k).to_owned(), (*rng.pick(values)).to_owned());
        }
    }
    out
}

fn pick_str<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len())]
}

fn s(text: &str) -> Value {
    Value::String(text.to_owned())
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

fn insert(v: &mut Value, key: &str, value: Value) {
    if let Value::Mapping(m) = v {
        m.insert(s(key), value);
    }
}

/// A label selector over `vocabulary`: empty (everything) a quarter of the
/// time, else matchLabels and/or matchExpressions with every operator.
fn random_selector(rng: &mut Rng, vocabulary: &[(&str, &[&str])]) -> Value {
    let mut sel = map([]);
    if rng.chance(25) {
        return sel;
    }
    let (labels, expressions) = match rng.below(3) {
        0 => (1, 0),
        1 => (0, rng.between(1, 2)),
        _ => (1, 1),
    };
    if labels > 0 {
        let (k, values) = *rng.pick(vocabulary);
        insert(
            &mut sel,
            "matchLabels",
            map([(k, s(pick_str(rng, values)))]),
        );
    }
    if expressions > 0 {
        let exprs = (0..expressions)
            .map(|_| {
                let (k, values) = *rng.pick(vocabulary);
                let op = *rng.pick(&["In", "NotIn", "Exists", "DoesNotExist"]);
                let mut e = map([("key", s(k)), ("operator", s(op))]);
                if op == "In" || op == "NotIn" {
                    let mut vs: Vec<Value> = Vec::new();
                    for _ in 0..rng.between(1, 2) {
                        let v = s(pick_str(rng, values));
                        if !vs.contains(&v) {
                            vs.push(v);
                        }
                    }
                    insert(&mut e, "values", Value::Sequence(vs));
                }
                e
            })
            .collect();
        insert(&mut sel, "matchExpressions", Value::Sequence(exprs));
    }
    sel
}

fn random_peer(rng: &mut Rng) -> Value {
    match rng.below(10) {
        0..=2 => map([("podSelector", random_selector(rng, &POD_LABELS))]),
        3..=4 => map([("namespaceSelector", random_selector(rng, &NAMESPACE_LABELS))]),
        5..=7 => map([
            ("namespaceSelector", random_selector(rng, &NAMESPACE_LABELS)),
            ("podSelector", random_selector(rng, &POD_LABELS)),
        ]),
        _ => {
            let (cidr, except) = rng.pick(&IP_BLOCKS);
            let mut block = map([("cidr", s(cidr))]);
            if !except.is_empty() {
                insert(
                    &mut block,
                    "except",
                    Value::Sequence(except.iter().map(|e| s(e)).collect()),
                );
            }
            map([("ipBlock", block)])
        }
    }
}

fn random_port(rng: &mut Rng) -> Value {
    let mut port = map([]);
    match rng.below(3) {
        0 => insert(&mut port, "protocol", s("TCP")),
        1 => insert(&mut port, "protocol", s("UDP")),
        _ => {} // defaults to TCP
    }
    match rng.below(20) {
        0..=9 => insert(&mut port, "port", Value::from(*rng.pick(&NUMERIC_PORTS))),
        10..=14 => insert(&mut port, "port", s(pick_str(rng, &NAMED_PORTS))),
        15..=17 => {
            let (lo, hi) = *rng.pick(&PORT_RANGES);
            insert(&mut port, "port", Value::from(lo));
            insert(&mut port, "endPort", Value::from(hi));
        }
        _ => {} // every port of the protocol
    }
    port
}

/// One ingress or egress rule: peers under `peer_key` (`from`/`to`) and
/// ports, each sometimes left out (= everything).
fn random_rule(rng: &mut Rng, peer_key: &str) -> Value {
    let mut rule = map([]);
    if !rng.chance(20) {
        let peers = (0..rng.between(1, 2)).map(|_| random_peer(rng)).collect();
        insert(&mut rule, peer_key, Value::Sequence(peers));
    }
    if !rng.chance(40) {
        let ports = (0..rng.between(1, 2)).map(|_| random_port(rng)).collect();
        insert(&mut rule, "ports", Value::Sequence(ports));
    }
    rule
}

fn random_policy_spec(rng: &mut Rng) -> Value {
    let mut spec = map([("podSelector", random_selector(rng, &POD_LABELS))]);
    let types: Option<&[&str]> = match rng.below(20) {
        0..=5 => None, // defaulted from the rules present
        6..=10 => Some(&["Ingress"]),
        11..=14 => Some(&["Egress"]),
        _ => Some(&["Ingress", "Egress"]),
    };
    if let Some(types) = types {
        insert(
            &mut spec,
            "policyTypes",
            Value::Sequence(types.iter().map(|t| s(t)).collect()),
        );
    }
    for (section, peer_key) in [("ingress", "from"), ("egress", "to")] {
        match rng.below(20) {
            0..=3 => {} // absent
            4..=6 => insert(&mut spec, section, Value::Sequence(vec![])),
            _ => {
                let rules = (0..rng.between(1, 3))
                    .map(|_| random_rule(rng, peer_key))
                    .collect();
                insert(&mut spec, section, Value::Sequence(rules));
            }
        }
    }
    spec
}

fn random_probe(rng: &mut Rng, pods: &[GenPod]) -> GenProbe {
    let from_external = rng.chance(15);
    let to_external = !from_external && rng.chance(15);
    let src = rng.below(pods.len());
    let from = if from_external {
        format!("ext/{}", rng.pick(&EXTERNALS).0)
    } else {
        format!("{}/{}", pods[src].namespace, pods[src].name)
    };
    if to_external {
        let (port, protocol) = *rng.pick(&EXTERNAL_PORTS);
        return GenProbe {
            from,
            to: format!("ext/{}", rng.pick(&EXTERNALS).0),
            port: port.to_string(),
            protocol: protocol.to_owned(),
            ipv6: false,
            expect_allow: true,
        };
    }
    // Any pod but the source.
    let mut dst = rng.below(pods.len() - 1);
    if !from_external && dst >= src {
        dst += 1;
    }
    let pod = &pods[dst];
    let (name, number, protocol) = rng.pick(&pod.ports).clone();
    let port = match name {
        Some(n) if rng.chance(40) => n,
        _ => number.to_string(),
    };
    GenProbe {
        from,
        to: format!("{}/{}", pod.namespace, pod.name),
        port,
        protocol,
        ipv6: !from_external && rng.chance(20),
        expect_allow: true,
    }
}

/// A manifest: `apiVersion`, `kind`, `metadata` and the given fields.
fn object<const N: usize>(
    api_version: &str,
    kind: &str,
    metadata: Value,
    fields: [(&str, Value); N],
) -> Value {
    let mut o = map([
        ("apiVersion", s(api_version)),
        ("kind", s(kind)),
        ("metadata", metadata),
    ]);
    for (k, v) in fields {
        insert(&mut o, k, v);
    }
    o
}

fn namespaced(name: &str, namespace: &str, labels: Value) -> Value {
    map([
        ("name", s(name)),
        ("namespace", s(namespace)),
        ("labels", labels),
    ])
}

impl Case {
    /// The case as a scenario file.
    pub fn to_yaml(&self) -> String {
        let mut objects = Vec::new();
        for ns in &self.namespaces {
            let meta = map([("name", s(&ns.name)), ("labels", labels(&ns.labels))]);
            objects.push(object("v1", "Namespace", meta, []));
        }
        for (name, l) in &self.nodes {
            let meta = map([("name", s(name)), ("labels", labels(l))]);
            objects.push(object("v1", "Node", meta, []));
        }
        for a in &self.accounts {
            let meta = namespaced(&a.name, &a.namespace, labels(&a.labels));
            objects.push(object("v1", "ServiceAccount", meta, []));
        }
        for pod in &self.pods {
            let ports = pod
                .ports
                .iter()
                .map(|(name, port, protocol)| {
                    let mut p = map([
                        ("containerPort", Value::from(*port)),
                        ("protocol", s(protocol)),
                    ]);
                    if let Some(n) = name {
                        insert(&mut p, "name", s(n));
                    }
                    p
                })
                .collect();
            let mut spec = map([
                ("nodeName", s(&pod.node)),
                (
                    "containers",
                    Value::Sequence(vec![map([
                        ("name", s("main")),
                        ("ports", Value::Sequence(ports)),
                    ])]),
                ),
            ]);
            if let Some(a) = &pod.account {
                insert(&mut spec, "serviceAccountName", s(a));
            }
            let ips = [&pod.ipv4, &pod.ipv6].map(|ip| map([("ip", s(ip))]));
            let status = map([
                ("podIP", s(&pod.ipv4)),
                ("podIPs", Value::Sequence(ips.to_vec())),
            ]);
            let meta = namespaced(&pod.name, &pod.namespace, labels(&pod.labels));
            objects.push(object(
                "v1",
                "Pod",
                meta,
                [("spec", spec), ("status", status)],
            ));
        }
        for p in &self.policies {
            let meta = map([("name", s(&p.name)), ("namespace", s(&p.namespace))]);
            let spec = [("spec", p.spec.clone())];
            objects.push(object("networking.k8s.io/v1", "NetworkPolicy", meta, spec));
        }
        for c in &self.calico {
            let meta = map([("name", s(&c.name))]);
            let spec = [("spec", c.spec.clone())];
            objects.push(object(model::calico::API_VERSION, c.kind, meta, spec));
        }
        for a in &self.admin {
            let api = model::admin::AdminKind::from_name(a.kind)
                .expect("a generated admin kind")
                .api_version();
            let meta = map([("name", s(&a.name))]);
            objects.push(object(api, a.kind, meta, [("spec", a.spec.clone())]));
        }
        let externals = self
            .externals
            .iter()
            .map(|(n, ip)| map([("name", s(n)), ("ip", s(ip))]))
            .collect();
        let probes = self
            .probes
            .iter()
            .map(|p| {
                let port = match p.port.parse::<u16>() {
                    Ok(n) => Value::from(n),
                    Err(_) => s(&p.port),
                };
                let mut v = map([
                    ("from", s(&p.from)),
                    ("to", s(&p.to)),
                    ("port", port),
                    ("protocol", s(&p.protocol)),
                    ("expect", s(model::scenario::verdict_word(p.expect_allow))),
                ]);
                if p.ipv6 {
                    insert(&mut v, "family", s("IPv6"));
                }
                v
            })
            .collect();
        let scenario = map([
            ("name", s(&self.name)),
            (
                "description",
                s("generated by lab::generate (differential test model = nftables = iptables)"),
            ),
            ("externals", Value::Sequence(externals)),
            ("objects", Value::Sequence(objects)),
            ("probes", Value::Sequence(probes)),
        ]);
        serde_yaml::to_string(&scenario).expect("plain YAML values serialize")
    }

    /// The case through the normal scenario loader (and its validation).
    pub fn scenario(&self) -> Result<Scenario, ScenarioError> {
        Scenario::parse(&format!("{}.yaml", self.name), &self.to_yaml())
    }

    /// Every case with one thing less: a policy, an ingress/egress rule, a
    /// peer or port of a rule, or a pod (with the probes touching it).
    /// Shrinking keeps the first of these that still reproduces.
    pub fn smaller(&self) -> Vec<Case> {
        let mut out = Vec::new();
        for i in 0..self.policies.len() {
            let mut c = self.clone();
            c.policies.remove(i);
            out.push(c);
        }
        for i in 0..self.nodes.len() {
            let mut c = self.clone();
            c.nodes.remove(i);
            out.push(c);
        }
        // Calico policies (a Tier stays while a policy is in it: a policy
        // in a missing tier is rejected, which the scenario would not list).
        for (i, p) in self.calico.iter().enumerate() {
            if p.kind == "Tier" {
                continue;
            }
            let mut c = self.clone();
            c.calico.remove(i);
            out.push(c);
        }
        for i in 0..self.admin.len() {
            let mut c = self.clone();
            c.admin.remove(i);
            out.push(c);
            for section in ["ingress", "egress"] {
                // An admin rule needs a peer: rules go, not their last peer.
                for r in 0..seq_len(&self.admin[i].spec, &[section]) {
                    let mut c = self.clone();
                    remove_at(&mut c.admin[i].spec, &[section], r);
                    out.push(c);
                }
            }
        }
        for i in 0..self.policies.len() {
            for section in ["ingress", "egress"] {
                let rules = seq_len(&self.policies[i].spec, &[section]);
                for r in 0..rules {
                    let mut c = self.clone();
                    remove_at(&mut c.policies[i].spec, &[section], r);
                    out.push(c);
                    for list in ["from", "to", "ports"] {
                        let path = [section, &r.to_string(), list];
                        for e in 0..seq_len(&self.policies[i].spec, &path) {
                            let mut c = self.clone();
                            remove_at(&mut c.policies[i].spec, &path, e);
                            out.push(c);
                        }
                    }
                }
            }
        }
        for i in 0..self.pods.len() {
            let id = format!("{}/{}", self.pods[i].namespace, self.pods[i].name);
            let mut c = self.clone();
            c.pods.remove(i);
            c.probes.retain(|p| p.from != id && p.to != id);
            if !c.probes.is_empty() {
                out.push(c);
            }
        }
        out
    }
}

fn labels(l: &BTreeMap<String, String>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in l {
        m.insert(s(k), s(v));
    }
    Value::Mapping(m)
}

/// Walks `path` (mapping keys, or sequence indexes as numbers).
fn walk_mut<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    let mut cur = v;
    for key in path {
        cur = match cur {
            Value::Mapping(m) => m.get_mut(*key)?,
            Value::Sequence(items) => items.get_mut(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn seq_len(v: &Value, path: &[&str]) -> usize {
    let mut v = v.clone();
    match walk_mut(&mut v, path) {
        Some(Value::Sequence(items)) => items.len(),
        _ => 0,
    }
}

fn remove_at(v: &mut Value, path: &[&str], index: usize) {
    if let Some(Value::Sequence(items)) = walk_mut(v, path) {
        items.remove(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated cases load through the normal loader, keep the pods' node
    /// and addresses fixed, and are reproducible from (seed, index).
    #[test]
    fn cases_load_and_pod_identities_stay_fixed() {
        let first = case(7, 0).scenario().unwrap().states().unwrap()[0].pods();
        assert_eq!(first.len(), PODS.len());
        for i in 0..300 {
            let c = case(7, i);
            assert_eq!(c, case(7, i), "case {i} is reproducible");
            let scenario = c
                .scenario()
                .unwrap_or_else(|e| panic!("case {i} does not load: {e}\n{}", c.to_yaml()));
            assert_eq!(scenario.states().unwrap()[0].pods(), first, "case {i}");
            scenario.check_model().unwrap();
        }
        assert_ne!(case(7, 0), case(7, 1));
        assert_ne!(case(7, 0), case(8, 0));
    }

    /// Over a few hundred cases every feature of the generator shows up.
    #[test]
    fn cases_cover_every_feature() {
        let text: String = (0..300).map(|i| case(1, i).to_yaml()).collect();
        for feature in [
            "operator: In",
            "operator: NotIn",
            "operator: Exists",
            "operator: DoesNotExist",
            "endPort:",
            "except:",
            "ipBlock:",
            "namespaceSelector:",
            "protocol: UDP",
            "port: http",
            "ingress: []",
            "egress: []",
            "family: IPv6",
            "from: ext/",
            "to: ext/",
            "kind: Tier",
            "defaultAction: Pass",
            "action: Pass",
            "kind: AdminNetworkPolicy",
            "kind: BaselineAdminNetworkPolicy",
            "kind: ClusterNetworkPolicy",
            "tier: Baseline",
            "action: Accept",
            "namedPort:",
            "portRange:",
            "destinationNamedPort:",
            "range:",
            "networks:",
            "pods:",
            "kind: ServiceAccount",
            "serviceAccountName: sa-",
            "serviceAccountSelector:",
            "serviceAccounts:",
            "names:",
            "kind: Node",
            "nodes:",
            "to: node/",
        ] {
            assert!(text.contains(feature), "no case has {feature:?}");
        }
        // Some policies with policyTypes, some without.
        assert!((0..50).any(|i| case(1, i)
            .policies
            .iter()
            .any(|p| seq_len(&p.spec, &["policyTypes"]) == 0)));
    }

    #[test]
    fn shrinking_only_removes() {
        let c = case(3, 5);
        for smaller in c.smaller() {
            assert!(smaller.to_yaml().len() < c.to_yaml().len());
            smaller.scenario().unwrap();
        }
    }
}
