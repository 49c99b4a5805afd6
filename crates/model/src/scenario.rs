//! Scenario files (`docs/scenarios.md`): a small cluster in
//! Kubernetes YAML plus the probes that must be allowed or denied, optionally
//! in steps. The same loaded [`Scenario`] drives the model check, the kernel
//! lab for each backend, and the demo, so all three see the same addresses
//! and node placement.
//!
//! Pods without addresses get them here, deterministically: IPv4 from
//! 198.18.128.0/17 and IPv6 from fd00:198:18:80::/64, dual-stack, in order
//! of first appearance; pods without `spec.nodeName` are spread round-robin
//! over [`NODES`]. Node objects name those nodes and get the addresses the
//! lab gives them ([`node_addresses`]), which `node/NAME` probes aim at.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Pod, PodIP, PodStatus};
use serde::Deserialize;

use crate::calico::{self, Protocol, Resource, ResourceKey};
use crate::convert::{self, interface_name};
use crate::kube::{self, KubeKey, KubeKind, KubeObject, Manifest};
use crate::semantics::{Evaluator, Packet, Verdict};
use crate::state::{ClusterState, WorkloadEncap, IPIP_PROTOCOL};

/// The nodes the lab builds; pods without a node are spread over them.
pub const NODES: [&str; 2] = ["node1", "node2"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
    #[error("{path}: step {step}: {reason}")]
    Step {
        path: String,
        step: usize,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
    pub externals: Vec<External>,
    pub steps: Vec<Step>,
    /// The nodes' configuration (what felix's FelixConfiguration would say).
    pub config: NodeConfig,
    /// Objects the scenario expects nftpolicy to reject (and so to fail
    /// closed on), as `kind namespace/name` texts ([`ObjectRef::text`]).
    pub rejected: Vec<String>,
}

/// Node configuration a scenario runs with, in felix's names; each key is
/// an `nftpolicy` flag in the lab.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `--allow-vxlan-packets-from-workloads`.
    #[serde(default, rename = "allowVXLANPacketsFromWorkloads")]
    pub allow_vxlan_packets_from_workloads: bool,
    /// `--allow-ipip-packets-from-workloads`.
    #[serde(default, rename = "allowIPIPPacketsFromWorkloads")]
    pub allow_ipip_packets_from_workloads: bool,
}

impl NodeConfig {
    pub fn encap(&self) -> WorkloadEncap {
        WorkloadEncap {
            allow_vxlan: self.allow_vxlan_packets_from_workloads,
            allow_ipip: self.allow_ipip_packets_from_workloads,
            ..WorkloadEncap::default()
        }
    }

    /// The `nftpolicy sync`/`run` flags that configure a node this way.
    pub fn agent_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.allow_vxlan_packets_from_workloads {
            args.push("--allow-vxlan-packets-from-workloads".to_owned());
        }
        if self.allow_ipip_packets_from_workloads {
            args.push("--allow-ipip-packets-from-workloads".to_owned());
        }
        args
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct External {
    pub name: String,
    pub ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub apply: Vec<Manifest>,
    pub delete: Vec<ObjectRef>,
    pub probes: Vec<Probe>,
}

/// An object to delete (or expected to be rejected): Kubernetes kinds by
/// default; Calico resources when `apiVersion: projectcalico.org/v3` is given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectRef {
    #[serde(default)]
    pub api_version: Option<String>,
    pub kind: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    /// `NetworkPolicy ns/name` (Kubernetes) or `projectcalico.org/v3
    /// GlobalNetworkPolicy name`; namespaced kinds default to `default`.
    pub fn text(&self) -> String {
        let calico = self.api_version.as_deref() == Some(calico::API_VERSION);
        let namespaced = if calico {
            calico::Kind::ALL
                .into_iter()
                .find(|k| k.name() == self.kind)
                .is_none_or(|k| k.is_namespaced())
        } else {
            KubeKind::parse(&self.kind).is_none_or(KubeKind::is_namespaced)
        };
        object_text(
            calico,
            &self.kind,
            namespaced.then(|| self.namespace.as_deref().unwrap_or("default")),
            &self.name,
        )
    }
}

fn object_text(calico: bool, kind: &str, namespace: Option<&str>, name: &str) -> String {
    let api = if calico {
        format!("{} ", calico::API_VERSION)
    } else {
        String::new()
    };
    match namespace {
        Some(ns) => format!("{api}{kind} {ns}/{name}"),
        None => format!("{api}{kind} {name}"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeEnd {
    Pod {
        namespace: String,
        name: String,
    },
    External(String),
    /// One of [`NODES`], at its address of the probe's family
    /// ([`node_addresses`]); only a probe's destination.
    Node(String),
}

impl fmt::Display for ProbeEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeEnd::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            ProbeEnd::External(n) => write!(f, "ext/{n}"),
            ProbeEnd::Node(n) => write!(f, "node/{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProbePort {
    Number(u16),
    Name(String),
}

impl fmt::Display for ProbePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbePort::Number(n) => write!(f, "{n}"),
            ProbePort::Name(n) => f.write_str(n),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Probe {
    pub from: ProbeEnd,
    pub to: ProbeEnd,
    pub port: ProbePort,
    pub protocol: Protocol,
    pub expect_allow: bool,
    pub family: Family,
}

impl Probe {
    /// An IP-in-IP probe: protocol 4, no port.
    pub fn is_ipip(&self) -> bool {
        self.protocol.number() == IPIP_PROTOCOL
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ipip() {
            write!(f, "{} -> {} IPIP", self.from, self.to)?;
        } else {
            write!(
                f,
                "{} -> {} {}/{}",
                self.from, self.to, self.port, self.protocol
            )?;
        }
        if self.family == Family::V6 {
            f.write_str(" (IPv6)")?;
        }
        Ok(())
    }
}

pub fn verdict_word(allowed: bool) -> &'static str {
    if allowed {
        "allow"
    } else {
        "deny"
    }
}

// ---------------------------------------------------------------------------
// Loading

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    externals: Vec<External>,
    #[serde(default)]
    objects: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    probes: Option<Vec<RawProbe>>,
    #[serde(default)]
    steps: Option<Vec<RawStep>>,
    #[serde(default)]
    config: NodeConfig,
    #[serde(default)]
    rejected: Vec<ObjectRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(default)]
    apply: Vec<serde_json::Value>,
    #[serde(default)]
    delete: Vec<ObjectRef>,
    #[serde(default)]
    probes: Vec<RawProbe>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    from: String,
    to: String,
    #[serde(default)]
    port: Option<serde_json::Value>,
    #[serde(default)]
    protocol: Option<String>,
    expect: String,
    #[serde(default)]
    family: Option<String>,
}

impl RawProbe {
    fn parse(&self) -> Result<Probe, String> {
        let end = |s: &str| -> Result<ProbeEnd, String> {
            match s.split_once('/') {
                Some(("ext", n)) if !n.is_empty() => Ok(ProbeEnd::External(n.into())),
                Some(("node", n)) if NODES.contains(&n) => Ok(ProbeEnd::Node(n.into())),
                Some(("node", n)) => Err(format!(
                    "node {n:?} is not one of the lab's nodes ({})",
                    NODES.join(", ")
                )),
                Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => {
                    Ok(ProbeEnd::Pod {
                        namespace: ns.into(),
                        name: n.into(),
                    })
                }
                _ => Err(format!(
                    "{s:?} is neither namespace/pod, ext/NAME nor node/NAME"
                )),
            }
        };
        let protocol = match self.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some("IPIP") => Protocol::Number(IPIP_PROTOCOL),
            Some(p) => return Err(format!("protocol {p:?} is not TCP, UDP, SCTP or IPIP")),
        };
        let port = match (&self.port, protocol.number() == IPIP_PROTOCOL) {
            (None, true) => ProbePort::Number(0),
            (Some(_), true) => return Err("an IPIP probe has no port".into()),
            (None, false) => return Err("port is missing".into()),
            (Some(serde_json::Value::Number(n)), false) => match n.as_u64() {
                Some(p) if (1..=65535).contains(&p) => ProbePort::Number(p as u16),
                _ => return Err(format!("port {n} out of range 1-65535")),
            },
            (Some(serde_json::Value::String(s)), false) => match s.parse::<u32>() {
                Ok(p) if (1..=65535).contains(&p) => ProbePort::Number(p as u16),
                Ok(p) => return Err(format!("port {p} out of range 1-65535")),
                Err(_) => ProbePort::Name(s.clone()),
            },
            (Some(other), false) => {
                return Err(format!("port {other} is neither a number nor a name"))
            }
        };
        let expect_allow = match self.expect.as_str() {
            "allow" => true,
            "deny" => false,
            e => return Err(format!("expect {e:?} is neither allow nor deny")),
        };
        let family = match self.family.as_deref() {
            None | Some("IPv4") => Family::V4,
            Some("IPv6") => Family::V6,
            Some(f) => return Err(format!("family {f:?} is neither IPv4 nor IPv6")),
        };
        let from = end(&self.from)?;
        if let ProbeEnd::Node(_) = from {
            return Err(format!(
                "from {from}: a node is only a probe's destination (`to`)"
            ));
        }
        let to = end(&self.to)?;
        if matches!(to, ProbeEnd::Node(_)) && protocol.number() == IPIP_PROTOCOL {
            return Err(format!(
                "to {to}: a node answers TCP, UDP and SCTP probes, not IPIP"
            ));
        }
        let probe = Probe {
            from,
            to,
            port,
            protocol,
            expect_allow,
            family,
        };
        if probe.from == probe.to {
            return Err("a pod never probes itself".into());
        }
        Ok(probe)
    }
}

impl Scenario {
    /// Loads one scenario file and checks it fully: every object converts,
    /// every probe resolves, in every step.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        Self::parse(&shown, &text).map(|mut s| {
            s.path = path.to_owned();
            s
        })
    }

    /// Parses scenario text; `path` names it in errors.
    pub fn parse(path: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let format_err = |reason: String| ScenarioError::Format {
            path: path.to_owned(),
            reason,
        };
        let raw: RawScenario = serde_yaml::from_str(text).map_err(|e| format_err(e.to_string()))?;
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format_err(format!(
                "name {:?} must be non-empty [a-z0-9-]",
                raw.name
            )));
        }
        let raw_steps = match (raw.steps, raw.objects, raw.probes) {
            (Some(steps), None, None) => steps,
            (None, objects, probes) => vec![RawStep {
                apply: objects.unwrap_or_default(),
                delete: vec![],
                probes: probes.unwrap_or_default(),
            }],
            _ => {
                return Err(format_err(
                    "use either top-level objects/probes or steps, not both".into(),
                ))
            }
        };
        let mut steps = Vec::new();
        for (i, raw_step) in raw_steps.into_iter().enumerate() {
            let step_err = |reason: String| ScenarioError::Step {
                path: path.to_owned(),
                step: i + 1,
                reason,
            };
            let mut apply = Vec::new();
            for (j, v) in raw_step.apply.into_iter().enumerate() {
                kube::parse_value(path, j, v, &mut apply).map_err(|e| step_err(e.to_string()))?;
            }
            let probes = raw_step
                .probes
                .iter()
                .enumerate()
                .map(|(j, p)| {
                    p.parse()
                        .map_err(|e| step_err(format!("probe {}: {e}", j + 1)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            steps.push(Step {
                apply,
                delete: raw_step.delete,
                probes,
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for e in &raw.externals {
            if !names.insert(e.name.clone()) {
                return Err(format_err(format!("external {:?} declared twice", e.name)));
            }
            if !crate::is_test_address(e.ip) {
                return Err(format_err(format!(
                    "external {:?}: {} is outside 198.18.0.0/15 and fd00:198:18::/48",
                    e.name, e.ip
                )));
            }
        }
        let mut scenario = Scenario {
            name: raw.name,
            description: raw.description.unwrap_or_default(),
            path: PathBuf::from(path),
            externals: raw.externals,
            steps,
            config: raw.config,
            rejected: raw.rejected.iter().map(ObjectRef::text).collect(),
        };
        scenario.assign_nodes_and_addresses();
        scenario.fill_node_addresses().map_err(format_err)?;
        // Resolve everything now, so a bad scenario fails at load, naming
        // the file, step and object, before any kernel work starts.
        let states = scenario.states()?;
        // Every object nftpolicy rejects must be one the scenario expects to
        // be rejected (and every one it expects must be): a scenario never
        // passes because something was silently replaced by a drop.
        let mut seen = std::collections::BTreeSet::new();
        for (i, st) in states.iter().enumerate() {
            for (object, reason) in &st.rejected {
                if !scenario.rejected.contains(object) {
                    return Err(ScenarioError::Step {
                        path: path.to_owned(),
                        step: i + 1,
                        reason: format!(
                            "{object} is rejected ({reason}); list it under `rejected:` if that is what the scenario tests"
                        ),
                    });
                }
                seen.insert(object.clone());
            }
        }
        if let Some(missing) = scenario.rejected.iter().find(|o| !seen.contains(*o)) {
            return Err(format_err(format!(
                "{missing} is listed under `rejected:` but nftpolicy accepts it"
            )));
        }
        for (i, st) in states.iter().enumerate() {
            for (j, probe) in scenario.steps[i].probes.iter().enumerate() {
                st.resolve_probe(probe, &scenario.externals)
                    .map_err(|reason| ScenarioError::Step {
                        path: path.to_owned(),
                        step: i + 1,
                        reason: format!("probe {} ({probe}): {reason}", j + 1),
                    })?;
            }
        }
        Ok(scenario)
    }

    /// Gives every pod without a node or address one, the same in every
    /// step it appears in.
    fn assign_nodes_and_addresses(&mut self) {
        let mut assigned: BTreeMap<(String, String), (String, Vec<IpAddr>)> = BTreeMap::new();
        let mut next = 0u32;
        for step in &mut self.steps {
            for m in &mut step.apply {
                let Manifest::Kube(KubeObject::Pod(pod)) = m else {
                    continue;
                };
                let key = (
                    pod.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    pod.metadata.name.clone().unwrap_or_default(),
                );
                let (node, ips) = assigned
                    .entry(key)
                    .or_insert_with(|| {
                        let i = next;
                        next += 1;
                        (
                            NODES[i as usize % NODES.len()].to_owned(),
                            auto_addresses(i),
                        )
                    })
                    .clone();
                fill_pod(pod, &node, &ips);
            }
        }
    }

    /// Node objects name the lab's nodes; one without addresses gets the
    /// node's lab addresses ([`node_addresses`]) as `InternalIP`s, and one
    /// with addresses may only list those (the lab has no others).
    fn fill_node_addresses(&mut self) -> Result<(), String> {
        for (i, step) in self.steps.iter_mut().enumerate() {
            for m in &mut step.apply {
                let Manifest::Kube(KubeObject::Node(node)) = m else {
                    continue;
                };
                let name = node.metadata.name.clone().unwrap_or_default();
                let lab = node_addresses(&name).ok_or_else(|| {
                    format!(
                        "step {}: Node {name}: the lab's nodes are {}",
                        i + 1,
                        NODES.join(", ")
                    )
                })?;
                let status = node.status.get_or_insert_with(Default::default);
                let listed = status.addresses.get_or_insert_with(Vec::new);
                let ips: Vec<_> = listed
                    .iter()
                    .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                    .collect();
                if ips.is_empty() {
                    listed.extend(
                        lab.iter()
                            .map(|ip| k8s_openapi::api::core::v1::NodeAddress {
                                type_: "InternalIP".into(),
                                address: ip.to_string(),
                            }),
                    );
                    continue;
                }
                for a in ips {
                    if !a.address.parse().is_ok_and(|ip: IpAddr| lab.contains(&ip)) {
                        return Err(format!(
                            "step {}: Node {name}: address {} is not one the lab gives {name} ({} and {}); leave the addresses out to get them",
                            i + 1,
                            a.address,
                            lab[0],
                            lab[1]
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The cluster after each step, in order.
    pub fn states(&self) -> Result<Vec<StepState>, ScenarioError> {
        let mut state = StepState::default();
        let mut out = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            state
                .apply_step(step)
                .map_err(|reason| ScenarioError::Step {
                    path: self.path.display().to_string(),
                    step: i + 1,
                    reason,
                })?;
            out.push(state.clone());
        }
        Ok(out)
    }

    /// The model check: every probe of every step through the reference
    /// semantics.
    pub fn check_model(&self) -> Result<Vec<ProbeOutcome>, ScenarioError> {
        let mut outcomes = Vec::new();
        for (i, st) in self.states()?.iter().enumerate() {
            let eval = Evaluator::with_encap(&st.cluster, self.config.encap());
            for probe in &self.steps[i].probes {
                let resolved = st
                    .resolve_probe(probe, &self.externals)
                    .expect("probes were resolved at load");
                let verdict = eval.evaluate(&resolved.packet());
                outcomes.push(ProbeOutcome {
                    step: i + 1,
                    probe: probe.clone(),
                    got: Some(verdict.allowed()),
                    detail: explain_short(&verdict),
                });
            }
        }
        Ok(outcomes)
    }
}

/// The addresses the lab gives node `name` (one of [`NODES`]) on its
/// uplink: 198.18.0.<n> and fd00:198:18::<n>, n counting from 1.
pub fn node_addresses(name: &str) -> Option<[IpAddr; 2]> {
    let n = NODES.iter().position(|x| *x == name)? + 1;
    let n = u8::try_from(n).ok()?;
    Some([
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, n)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, u16::from(n))),
    ])
}

fn auto_addresses(i: u32) -> Vec<IpAddr> {
    let (hi, lo) = (i / 254, i % 254 + 1);
    let v4 = Ipv4Addr::new(198, 18, 128 + hi as u8, lo as u8);
    let v6 = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0x80, 0, 0, 0, (i + 1) as u16);
    vec![IpAddr::V4(v4), IpAddr::V6(v6)]
}

fn fill_pod(pod: &mut Pod, node: &str, ips: &[IpAddr]) {
    let spec = pod.spec.get_or_insert_with(Default::default);
    if spec.node_name.as_deref().unwrap_or("").is_empty() {
        spec.node_name = Some(node.to_owned());
    }
    let status = pod.status.get_or_insert_with(PodStatus::default);
    let has_ips = status.pod_ip.is_some() || status.pod_ips.as_ref().is_some_and(|v| !v.is_empty());
    if !has_ips {
        status.pod_ip = Some(ips[0].to_string());
        status.pod_ips = Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
    }
}

/// The cluster at one point of a scenario: the objects as written, and the
/// Calico resources they stand for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepState {
    pub kube: BTreeMap<KubeKey, KubeObject>,
    /// Calico resources written directly in the scenario.
    pub native: BTreeMap<ResourceKey, Resource>,
    pub cluster: ClusterState,
    /// Objects nftpolicy rejected ([`crate::reject`]), as
    /// [`ObjectRef::text`]s, with the reason.
    pub rejected: BTreeMap<String, String>,
}

impl StepState {
    fn apply_step(&mut self, step: &Step) -> Result<(), String> {
        for m in &step.apply {
            match m {
                Manifest::Kube(obj) => {
                    self.kube.insert(obj.key(), obj.clone());
                }
                Manifest::Calico(r) => {
                    self.native.insert(r.key(), r.clone());
                }
            }
        }
        for r in &step.delete {
            let calico = r.api_version.as_deref() == Some(calico::API_VERSION);
            let removed = if calico {
                let kind = calico::Kind::ALL
                    .into_iter()
                    .find(|k| k.name() == r.kind)
                    .ok_or_else(|| format!("delete: unknown Calico kind {:?}", r.kind))?;
                let ns = kind
                    .is_namespaced()
                    .then(|| r.namespace.as_deref().unwrap_or("default"));
                self.native
                    .remove(&ResourceKey::new(kind, ns, &r.name))
                    .is_some()
            } else {
                let kind = KubeKind::parse(&r.kind)
                    .ok_or_else(|| format!("delete: unknown kind {:?}", r.kind))?;
                let namespace = kind
                    .is_namespaced()
                    .then(|| r.namespace.clone().unwrap_or_else(|| "default".into()));
                self.kube
                    .remove(&KubeKey {
                        kind,
                        namespace,
                        name: r.name.clone(),
                    })
                    .is_some()
            };
            if !removed {
                return Err(format!(
                    "delete: {} {}/{} does not exist",
                    r.kind,
                    r.namespace.as_deref().unwrap_or(""),
                    r.name
                ));
            }
        }
        let mut cluster = ClusterState::new();
        let mut rejected = BTreeMap::new();
        for (key, obj) in &self.kube {
            if let Some(r) = convert::kube_to_calico(obj).map_err(|e| e.to_string())? {
                if let Some(why) = r.metadata().rejection() {
                    let text = object_text(
                        false,
                        &key.kind.to_string(),
                        key.namespace.as_deref(),
                        &key.name,
                    );
                    rejected.insert(text, why.to_owned());
                }
                cluster.upsert(r);
            }
        }
        for (key, r) in &self.native {
            if let Some(why) = r.metadata().rejection() {
                let text = object_text(true, key.kind.name(), key.namespace.as_deref(), &key.name);
                rejected.insert(text, why.to_owned());
            }
            cluster.upsert(r.clone());
        }
        for (key, why) in cluster.tier_rejections() {
            let text = object_text(true, key.kind.name(), key.namespace.as_deref(), &key.name);
            rejected.insert(text, why);
        }
        self.cluster = cluster;
        self.rejected = rejected;
        Ok(())
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        match self.kube.get(&KubeKey {
            kind: KubeKind::Pod,
            namespace: Some(namespace.into()),
            name: name.into(),
        }) {
            Some(KubeObject::Pod(p)) => Some(p),
            _ => None,
        }
    }

    /// Every pod with its node, addresses, interface and served ports.
    pub fn pods(&self) -> Vec<PodInfo> {
        self.kube
            .values()
            .filter_map(|o| match o {
                KubeObject::Pod(p) => PodInfo::of(p).ok(),
                _ => None,
            })
            .collect()
    }

    /// Turns a probe into addresses and a port number.
    pub fn resolve_probe(
        &self,
        probe: &Probe,
        externals: &[External],
    ) -> Result<ResolvedProbe, String> {
        let end = |e: &ProbeEnd| -> Result<(IpAddr, Option<PodInfo>), String> {
            match e {
                ProbeEnd::External(n) => externals
                    .iter()
                    .find(|x| &x.name == n)
                    .map(|x| (x.ip, None))
                    .ok_or_else(|| format!("external {n:?} is not declared")),
                ProbeEnd::Node(n) => node_addresses(n)
                    .into_iter()
                    .flatten()
                    .find(|ip| ip.is_ipv6() == (probe.family == Family::V6))
                    .map(|ip| (ip, None))
                    .ok_or_else(|| format!("node {n:?} is not one of the lab's nodes")),
                ProbeEnd::Pod { namespace, name } => {
                    let pod = self
                        .pod(namespace, name)
                        .ok_or_else(|| format!("pod {namespace}/{name} does not exist"))?;
                    let info = PodInfo::of(pod)?;
                    let ip = info
                        .ips
                        .iter()
                        .copied()
                        .find(|ip| ip.is_ipv6() == (probe.family == Family::V6))
                        .ok_or_else(|| {
                            format!("pod {namespace}/{name} has no {:?} address", probe.family)
                        })?;
                    Ok((ip, Some(info)))
                }
            }
        };
        let (src, src_pod) = end(&probe.from)?;
        let (dst, dst_pod) = end(&probe.to)?;
        if src.is_ipv6() != dst.is_ipv6() {
            return Err(format!("{src} and {dst} are of different families"));
        }
        let port = match (&probe.port, &dst_pod) {
            // Every endpoint of the lab answers IP-in-IP.
            _ if probe.is_ipip() => 0,
            (ProbePort::Number(n), None) => *n,
            (ProbePort::Name(n), None) => {
                return Err(format!("named port {n:?} on an external host or a node"))
            }
            (ProbePort::Number(n), Some(pod)) => {
                if !pod.serves(*n, probe.protocol) {
                    return Err(format!(
                        "{} does not declare port {n}/{} (the harness only serves declared ports)",
                        probe.to, probe.protocol
                    ));
                }
                *n
            }
            (ProbePort::Name(name), Some(pod)) => pod
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name) && p.protocol == probe.protocol)
                .map(|p| p.port)
                .ok_or_else(|| {
                    format!("{} has no {} port named {name:?}", probe.to, probe.protocol)
                })?,
        };
        Ok(ResolvedProbe {
            probe: probe.clone(),
            src,
            dst,
            port,
            src_pod,
            dst_pod,
        })
    }
}

/// A pod as the lab needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// The host end of the pod's veth, as Calico names it.
    pub interface: String,
    pub ports: Vec<ServedPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

impl PodInfo {
    pub fn of(pod: &Pod) -> Result<PodInfo, String> {
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let mut ports = Vec::new();
        for c in pod.spec.iter().flat_map(|s| &s.containers) {
            for p in c.ports.iter().flatten() {
                let protocol = match p.protocol.as_deref() {
                    None | Some("TCP") => Protocol::Tcp,
                    Some("UDP") => Protocol::Udp,
                    Some("SCTP") => Protocol::Sctp,
                    Some(other) => return Err(format!("unknown protocol {other:?}")),
                };
                ports.push(ServedPort {
                    name: p.name.clone(),
                    port: p.container_port as u16,
                    protocol,
                });
            }
        }
        Ok(PodInfo {
            interface: interface_name(&namespace, &name),
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            ips: convert::pod_ips(pod)?,
            namespace,
            name,
            ports,
        })
    }

    pub fn serves(&self, port: u16, protocol: Protocol) -> bool {
        self.ports
            .iter()
            .any(|p| p.port == port && p.protocol == protocol)
    }
}

/// A probe with addresses and a port number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedProbe {
    pub probe: Probe,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub src_pod: Option<PodInfo>,
    pub dst_pod: Option<PodInfo>,
}

impl ResolvedProbe {
    pub fn packet(&self) -> Packet {
        Packet {
            src: self.src,
            dst: self.dst,
            protocol: self.probe.protocol,
            src_port: None,
            dst_port: (!self.probe.is_ipip()).then_some(self.port),
            icmp: None,
        }
    }
}

// ---------------------------------------------------------------------------
// Results

/// One probe's result in one check.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOutcome {
    pub step: usize,
    pub probe: Probe,
    /// `None`: skipped (e.g. SCTP where the kernel cannot open SCTP sockets).
    pub got: Option<bool>,
    /// Why, where known (the model's decision).
    pub detail: Option<String>,
}

impl ProbeOutcome {
    pub fn passed(&self) -> bool {
        self.got == Some(self.probe.expect_allow)
    }
}

/// Totals across scenarios, printed as FORMAT.md's closing line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Tally {
    /// Prints one scenario's failing probes (FORMAT.md's `FAIL` lines) and
    /// adds its outcomes to the tally.
    pub fn report(
        &mut self,
        scenario: &Scenario,
        outcomes: &[ProbeOutcome],
        out: &mut impl std::io::Write,
    ) {
        let failures = outcomes
            .iter()
            .filter(|o| o.got.is_some() && !o.passed())
            .count();
        let skipped = outcomes.iter().filter(|o| o.got.is_none()).count();
        let _ = writeln!(
            out,
            "{} {} ({}): {} probes{}{}",
            if failures == 0 { "ok  " } else { "FAILED" },
            scenario.name,
            scenario.path.display(),
            outcomes.len(),
            if failures > 0 {
                format!(", {failures} failed")
            } else {
                String::new()
            },
            if skipped > 0 {
                format!(", {skipped} skipped")
            } else {
                String::new()
            }
        );
        for o in outcomes {
            match o.got {
                None => {
                    self.skipped += 1;
                    let _ = writeln!(
                        out,
                        "SKIP {}: {}",
                        o.probe,
                        o.detail.as_deref().unwrap_or("skipped")
                    );
                }
                Some(_) if o.passed() => self.passed += 1,
                Some(got) => {
                    self.failed += 1;
                    let _ = writeln!(
                        out,
                        "FAIL {}: expected {}, got {}",
                        o.probe,
                        verdict_word(o.probe.expect_allow),
                        verdict_word(got)
                    );
                    let _ = writeln!(
                        out,
                        "     (step {}{})",
                        o.step,
                        o.detail
                            .as_ref()
                            .map(|d| format!("; {d}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }

    /// A scenario that could not be loaded or run counts as one failure.
    pub fn error(&mut self, error: &dyn fmt::Display, out: &mut impl std::io::Write) {
        self.failed += 1;
        let _ = writeln!(out, "ERROR {error}");
    }

    pub fn closing_line(&self) -> String {
        if self.skipped > 0 {
            format!(
                "{} passed, {} failed, {} skipped",
                self.passed, self.failed, self.skipped
            )
        } else {
            format!("{} passed, {} failed", self.passed, self.failed)
        }
    }
}

/// One line saying which policy decided, for failure output.
pub fn explain_short(v: &Verdict) -> Option<String> {
    let parts: Vec<String> = [("egress", &v.egress), ("ingress", &v.ingress)]
        .into_iter()
        .filter_map(|(dir, ev)| {
            ev.as_ref()
                .map(|ev| format!("{dir} of {}: {}", ev.endpoint.name, ev.decision))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Scenario files under `paths` (files as given; directories searched
/// recursively for `*.yaml`/`*.yml`), sorted.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found)?;
            found.sort();
            out.extend(found);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(format!("{}: no such file or directory", p.display()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name: t
objects:
  - {apiVersion: v1, kind: Namespace, metadata: {name: ns}}
  - apiVersion: v1
    kind: Pod
    metadata: {name: a, namespace: ns, labels: {app: a}}
    spec: {containers: [{name: c, ports: [{containerPort: 80, protocol: TCP}]}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: b, namespace: ns}
    spec: {containers: [{name: c, ports: [{containerPort: 80, protocol: TCP}]}]}
  - apiVersion: projectcalico.org/v3
    kind: NetworkPolicy
    metadata: {name: p, namespace: ns}
    spec: {selector: app == 'a', ingress: [{action: Allow, http: {methods: [GET]}}]}
probes:
  - {from: ns/b, to: ns/a, port: 80, expect: deny}
"#;

    #[test]
    fn a_rejected_object_must_be_listed_and_a_listed_one_rejected() {
        let err = Scenario::parse("t.yaml", BASE).unwrap_err().to_string();
        assert!(
            err.contains("projectcalico.org/v3 NetworkPolicy ns/p is rejected (spec.ingress[0].http: not implemented")
                && err.contains("list it under `rejected:`"),
            "{err}"
        );
        let listed = BASE.replace(
            "name: t\n",
            "name: t\nrejected: [{apiVersion: projectcalico.org/v3, kind: NetworkPolicy, namespace: ns, name: p}]\n",
        );
        let s = Scenario::parse("t.yaml", &listed).unwrap();
        let outcomes = s.check_model().unwrap();
        assert!(outcomes.iter().all(ProbeOutcome::passed), "{outcomes:?}");
        let accepted = listed.replace("http: {methods: [GET]}", "protocol: TCP");
        let err = Scenario::parse("t.yaml", &accepted)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ns/p is listed under `rejected:` but nftpolicy accepts it"),
            "{err}"
        );
    }

    #[test]
    fn ipip_probes_have_no_port_and_config_sets_the_agent_flags() {
        let text = BASE
            .replace(
                "  - apiVersion: projectcalico.org/v3\n    kind: NetworkPolicy\n    metadata: {name: p, namespace: ns}\n    spec: {selector: app == 'a', ingress: [{action: Allow, http: {methods: [GET]}}]}\n",
                "",
            )
            .replace(
                "  - {from: ns/b, to: ns/a, port: 80, expect: deny}",
                "  - {from: ns/b, to: ns/a, protocol: IPIP, expect: allow}",
            )
            .replace("name: t\n", "name: t\nconfig: {allowIPIPPacketsFromWorkloads: true}\n");
        let s = Scenario::parse("t.yaml", &text).unwrap();
        assert_eq!(
            s.config.agent_args(),
            ["--allow-ipip-packets-from-workloads"]
        );
        assert_eq!(s.steps[0].probes[0].to_string(), "ns/b -> ns/a IPIP");
        assert!(s.check_model().unwrap()[0].passed());
        // felix's default drops it.
        let dropped = text.replace("config: {allowIPIPPacketsFromWorkloads: true}\n", "");
        let s = Scenario::parse("t.yaml", &dropped).unwrap();
        assert!(!s.check_model().unwrap()[0].passed());
        let with_port = text.replace("protocol: IPIP,", "protocol: IPIP, port: 80,");
        let err = Scenario::parse("t.yaml", &with_port)
            .unwrap_err()
            .to_string();
        assert!(err.contains("an IPIP probe has no port"), "{err}");
    }

    const NODES_BASE: &str = r#"
objects:
  - {apiVersion: v1, kind: Node, metadata: {name: node2, labels: {role: db}}}
  - {apiVersion: v1, kind: Namespace, metadata: {name: ns}}
  - apiVersion: v1
    kind: Pod
    metadata: {name: a, namespace: ns}
    spec: {containers: [{name: c, ports: [{containerPort: 80, protocol: TCP}]}]}
probes:
  - {from: ns/a, to: node/node2, port: 5432, expect: allow}
  - {from: ns/a, to: node/node1, port: 5432, family: IPv6, expect: allow}
name: t
"#;

    #[test]
    fn nodes_get_the_lab_addresses_and_probes_reach_them() {
        let s = Scenario::parse("t.yaml", NODES_BASE).unwrap();
        let st = &s.states().unwrap()[0];
        let node = st
            .cluster
            .get(&ResourceKey::new(calico::Kind::Node, None, "node2"));
        let Some(Resource::Node(n)) = node.as_deref() else {
            panic!("no node2")
        };
        let nets: Vec<String> = n.nets().iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["198.18.0.2/32", "fd00:198:18::2/128"]);
        let probes: Vec<String> = s.steps[0]
            .probes
            .iter()
            .map(|p| {
                let r = st.resolve_probe(p, &[]).unwrap();
                format!("{} {}", p.to, r.dst)
            })
            .collect();
        assert_eq!(
            probes,
            ["node/node2 198.18.0.2", "node/node1 fd00:198:18::1"]
        );
    }

    #[test]
    fn node_objects_and_probes_are_checked() {
        let err = |from: &str, to: &str| {
            Scenario::parse("t.yaml", &NODES_BASE.replace(from, to))
                .unwrap_err()
                .to_string()
        };
        let e = err("name: node2, labels", "name: node9, labels");
        assert!(
            e.contains("Node node9: the lab's nodes are node1, node2"),
            "{e}"
        );
        let e = err(
            "labels: {role: db}}",
            "labels: {role: db}}, status: {addresses: [{type: InternalIP, address: 198.18.0.9}]}",
        );
        assert!(
            e.contains("Node node2: address 198.18.0.9 is not one the lab gives node2"),
            "{e}"
        );
        let e = err(
            "labels: {role: db}}",
            "labels: {role: db}}, status: {addresses: [{type: InternalIP, address: 198.18.0.300}]}",
        );
        assert!(
            e.contains("Node node2: address 198.18.0.300 is not one the lab gives"),
            "{e}"
        );
        let e = err(
            "labels: {role: db}}",
            "labels: {role: db}}, status: {addresses: [{type: Elsewhere, address: x}]}",
        );
        assert!(
            e.contains("Node node2: status.addresses[0].type \"Elsewhere\" is not one of"),
            "{e}"
        );
        let e = err("labels: {role: db}}", "labels: {role: db}, taintz: 1}");
        assert!(e.contains("Node node2") && e.contains("taintz"), "{e}");
        let e = err("{from: ns/a, to: node/node2", "{from: node/node2, to: ns/a");
        assert!(e.contains("a node is only a probe's destination"), "{e}");
        let e = err("to: node/node2", "to: node/node3");
        assert!(
            e.contains("node \"node3\" is not one of the lab's nodes"),
            "{e}"
        );
        let e = err("to: node/node2, port: 5432", "to: node/node2, port: pg");
        assert!(
            e.contains("named port \"pg\" on an external host or a node"),
            "{e}"
        );
    }
}
