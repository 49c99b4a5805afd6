//! Kubernetes → Calico, as calico-kube-controllers and libcalico-go's
//! Kubernetes converter do it:
//!
//! - Namespace `<ns>` → Profile `kns.<ns>` allowing all, applying the
//!   namespace's labels to its endpoints as `pcns.<label>`;
//! - Pod → WorkloadEndpoint `<node>-k8s-<pod>-eth0` with interface
//!   `cali` + sha1(`<ns>.<pod>`)[:11], the pod's named ports and profiles
//!   `kns.<ns>`, `ksa.<ns>.<account>`;
//! - ServiceAccount → Profile `ksa.<ns>.<name>` ([`crate::serviceaccount`]);
//! - NetworkPolicy `<name>` → Calico NetworkPolicy `knp.default.<name>`,
//!   order 1000, one Allow rule per (peer × protocol).
//!
//! Everything Kubernetes' API server would reject (bad CIDRs, port 0,
//! `endPort` below `port`, malformed label selectors) is rejected here, so
//! nothing half-valid reaches a dataplane. Rejections narrow
//! ([`crate::reject`]): a NetworkPolicy rejected for a bad rule (or marked
//! rejected by strict decoding) still isolates the pods its podSelector
//! selects — it becomes a stub with no rules, in the directions it names —
//! and only one whose podSelector cannot be read is an error naming it.

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1 as netv1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha1::{Digest, Sha1};

use crate::calico::{
    self, EndpointPort, EntityRule, ObjectMeta, PolicySpec, PolicyType, Port, Profile, ProfileSpec,
    Protocol, Resource, Rule, WorkloadEndpoint, WorkloadEndpointSpec,
};
use crate::kube::KubeObject;
use crate::labels::IStr;
use crate::reject;
use crate::selector::Selector;

pub const K8S_POLICY_PREFIX: &str = "knp.default.";
pub const NAMESPACE_PROFILE_PREFIX: &str = "kns.";
pub const K8S_POLICY_ORDER: f64 = 1000.0;
pub const ORCHESTRATOR_K8S: &str = "k8s";
/// The label the API server puts on every namespace.
pub const K8S_NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {reason}")]
pub struct ConvertError {
    /// The Kubernetes object, e.g. `NetworkPolicy default/web-deny-all`.
    pub object: String,
    pub reason: String,
}

/// Converts one Kubernetes object into the Calico resource that stands for
/// it. A pod without a node or an address yet, a finished pod (Succeeded,
/// Failed) and a `hostNetwork` pod have no endpoint: `Ok(None)`.
pub fn kube_to_calico(obj: &KubeObject) -> Result<Option<Resource>, ConvertError> {
    let err = |reason: String| ConvertError {
        object: obj.key().to_string(),
        reason,
    };
    match obj {
        KubeObject::Namespace(ns) => namespace_to_profile(ns)
            .map(|p| Some(Resource::Profile(p)))
            .map_err(err),
        KubeObject::Pod(pod) => pod_to_workload_endpoint(pod)
            .map(|w| w.map(Resource::WorkloadEndpoint))
            .map_err(err),
        KubeObject::NetworkPolicy(np) => network_policy_to_calico(np)
            .map(|p| Some(Resource::NetworkPolicy(p)))
            .map_err(err),
        KubeObject::Admin(p) => crate::admin::to_calico(p)
            .map(|p| Some(Resource::GlobalNetworkPolicy(p)))
            .map_err(err),
        KubeObject::ServiceAccount(sa) => crate::serviceaccount::to_profile(sa)
            .map(|p| Some(Resource::Profile(p)))
            .map_err(err),
        KubeObject::Node(node) => node_to_calico(node)
            .map(|n| Some(Resource::Node(n)))
            .map_err(err),
    }
}

/// A Kubernetes Node → Calico's Node of that name: its labels, and its
/// `InternalIP` and `ExternalIP` addresses (host names are not addresses
/// and are left out). An address that is not an IP, or an address type
/// Kubernetes does not define, is an error naming the node: a Deny to
/// nodes must not silently miss one of its addresses.
pub fn node_to_calico(node: &k8s_openapi::api::core::v1::Node) -> Result<calico::Node, String> {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    validate_labels(&labels).map_err(|e| format!("metadata.labels: {e}"))?;
    let mut addresses = Vec::new();
    let listed = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    for (i, a) in listed.iter().enumerate() {
        match a.type_.as_str() {
            "InternalIP" | "ExternalIP" => {
                let ip: std::net::IpAddr = a.address.parse().map_err(|_| {
                    format!(
                        "status.addresses[{i}].address {:?} is not an IP address",
                        a.address
                    )
                })?;
                addresses.push(calico::NodeAddress {
                    address: ip.to_string(),
                    kind: a.type_.clone(),
                });
            }
            "Hostname" | "InternalDNS" | "ExternalDNS" => {}
            other => {
                return Err(format!(
                    "status.addresses[{i}].type {other:?} is not one of InternalIP, ExternalIP, Hostname, InternalDNS, ExternalDNS"
                ))
            }
        }
    }
    let mut metadata = ObjectMeta {
        name: node.metadata.name.clone().unwrap_or_default(),
        labels: labels.into_iter().collect(),
        ..Default::default()
    };
    if let Some(reason) = crate::kube::rejection(&node.metadata) {
        // A rejected node stays in the nodes peers' sets, as a rejected
        // network set stays in its selectors' (crate::reject).
        reject::mark_rejected(&mut metadata.annotations, reason);
    }
    Ok(calico::Node {
        api_version: calico::API_VERSION.into(),
        metadata,
        spec: calico::NodeSpec { addresses },
    })
}

pub fn namespace_profile_name(namespace: &str) -> String {
    format!("{NAMESPACE_PROFILE_PREFIX}{namespace}")
}

pub fn k8s_policy_name(name: &str) -> String {
    format!("{K8S_POLICY_PREFIX}{name}")
}

/// `"cali" + hex(sha1("<namespace>.<pod>"))[:11]`, as the Calico CNI plugin
/// names the host end of a pod's veth.
pub fn interface_name(namespace: &str, pod: &str) -> String {
    let digest = Sha1::digest(format!("{namespace}.{pod}").as_bytes());
    format!("cali{}", &hex::encode(digest)[..11])
}

/// Calico's WorkloadEndpoint name: `<node>-k8s-<pod>-<endpoint>`, with the
/// dashes inside each part doubled so the name splits back unambiguously.
pub fn workload_endpoint_name(node: &str, pod: &str, endpoint: &str) -> String {
    let esc = |s: &str| s.replace('-', "--");
    format!(
        "{}-{ORCHESTRATOR_K8S}-{}-{}",
        esc(node),
        esc(pod),
        esc(endpoint)
    )
}

/// The pod a [`workload_endpoint_name`] on `node` names, if it is one
/// (the state does not keep `spec.pod`: the name carries it).
pub fn workload_endpoint_pod(name: &str, node: &str) -> Option<String> {
    let rest = name.strip_prefix(&format!("{}-{ORCHESTRATOR_K8S}-", node.replace('-', "--")))?;
    // `<pod>-<endpoint>`, dashes inside each doubled: the pod ends at the
    // first single dash.
    let mut pod = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '-' {
            pod.push(c);
        } else if chars.peek() == Some(&'-') {
            chars.next();
            pod.push('-');
        } else {
            return (!pod.is_empty() && chars.peek().is_some()).then_some(pod);
        }
    }
    None
}

pub fn namespace_to_profile(ns: &Namespace) -> Result<Profile, String> {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    // The API server always adds this label; files written by hand may not.
    labels
        .entry(K8S_NAMESPACE_NAME_LABEL.to_owned())
        .or_insert_with(|| name.clone());
    validate_labels(&labels)?;
    let mut labels_to_apply: BTreeMap<String, String> = labels
        .into_iter()
        .map(|(k, v)| (format!("{}{k}", calico::NAMESPACE_LABEL_PREFIX), v))
        .collect();
    labels_to_apply.insert(
        format!(
            "{}{}",
            calico::NAMESPACE_LABEL_PREFIX,
            calico::NAMESPACE_NAME_LABEL
        ),
        name.clone(),
    );
    let allow = || Rule {
        action: calico::Action::Allow,
        ..Default::default()
    };
    let mut metadata = ObjectMeta {
        name: namespace_profile_name(&name),
        ..Default::default()
    };
    let rules = match crate::kube::rejection(&ns.metadata) {
        // A rejected namespace still labels its pods (selectors keep seeing
        // them), but its pods drop all traffic until it is fixed.
        Some(reason) => {
            reject::mark_rejected(&mut metadata.annotations, reason);
            vec![]
        }
        None => vec![allow()],
    };
    Ok(Profile {
        api_version: calico::API_VERSION.into(),
        metadata,
        spec: ProfileSpec {
            ingress: rules.clone(),
            egress: rules,
            labels_to_apply: labels_to_apply.into_iter().collect(),
        },
    })
}

/// The pod's addresses: `status.podIPs`, else `status.podIP`.
pub fn pod_ips(pod: &Pod) -> Result<Vec<std::net::IpAddr>, String> {
    let status = pod.status.as_ref();
    let mut texts: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|p| p.ip.clone()).collect())
        .unwrap_or_default();
    if texts.is_empty() {
        if let Some(ip) = status.and_then(|s| s.pod_ip.clone()) {
            texts.push(ip);
        }
    }
    texts
        .iter()
        .map(|t| {
            t.parse()
                .map_err(|_| format!("status.podIPs: {t:?} is not an IP address"))
        })
        .collect()
}

pub fn pod_to_workload_endpoint(pod: &Pod) -> Result<Option<WorkloadEndpoint>, String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = pod.spec.as_ref();
    let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
    if spec.and_then(|s| s.host_network) == Some(true) {
        // The pod shares its node's network namespace and addresses: there
        // is no interface to police, and its (node) IP must not join pod
        // selector sets. Calico's converter skips such pods too.
        return Ok(None);
    }
    let ips = pod_ips(pod)?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if node.is_empty() || ips.is_empty() || matches!(phase, Some("Succeeded" | "Failed")) {
        // Not (or no longer) networked: Calico has no endpoint for it.
        return Ok(None);
    }
    if spec.and_then(|s| s.host_network) == Some(true) {
        // In the host's network namespace, with the node's addresses:
        // Calico makes no endpoint for it, so no selector matches the node
        // through it.
        return Ok(None);
    }
    let mut labels = pod.metadata.labels.clone().unwrap_or_default();
    validate_labels(&labels)?;
    labels.insert(calico::LABEL_NAMESPACE.into(), namespace.clone());
    labels.insert(calico::LABEL_ORCHESTRATOR.into(), ORCHESTRATOR_K8S.into());
    // The API server's ServiceAccount admission names `default` when the
    // pod names no account; the label as libcalico-go sets it (only when
    // short enough to be a label value; felix's view sets it regardless).
    let service_account =
        crate::serviceaccount::pod_account(spec.and_then(|s| s.service_account_name.as_deref()))
            .to_owned();
    if service_account.len() < 63 {
        labels.insert(
            calico::LABEL_SERVICE_ACCOUNT.into(),
            service_account.clone(),
        );
    }
    let mut ports = Vec::new();
    for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for p in c.ports.as_deref().unwrap_or_default() {
            if !(1..=65535).contains(&p.container_port) {
                return Err(format!(
                    "container {:?}: containerPort {} out of range 1-65535",
                    c.name, p.container_port
                ));
            }
            let protocol = k8s_protocol(p.protocol.as_deref())?;
            // Only named ports matter to policy: numeric ports match by number.
            if let Some(port_name) = &p.name {
                calico::validate_port_name(port_name)
                    .map_err(|e| format!("container {:?}: {e}", c.name))?;
                ports.push(EndpointPort {
                    name: port_name.into(),
                    protocol,
                    port: p.container_port as u16,
                });
            }
        }
    }
    let ip_networks = ips.into_iter().map(IpNet::from).collect();
    let profiles = vec![
        namespace_profile_name(&namespace).into(),
        crate::serviceaccount::profile_name(&namespace, &service_account).into(),
    ];
    let mut metadata = ObjectMeta {
        name: workload_endpoint_name(&node, &name, "eth0"),
        namespace: Some(namespace.as_str().into()),
        labels: labels.into_iter().collect(),
        ..Default::default()
    };
    if let Some(reason) = crate::kube::rejection(&pod.metadata) {
        reject::mark_rejected(&mut metadata.annotations, reason);
    }
    let mut wep = WorkloadEndpoint {
        api_version: calico::API_VERSION.into(),
        metadata,
        spec: WorkloadEndpointSpec {
            orchestrator: ORCHESTRATOR_K8S.into(),
            workload: IStr::default(),
            node: node.into(),
            container_id: String::new(),
            pod: name.clone(),
            endpoint: "eth0".into(),
            service_account_name: Some(service_account.into()),
            ip_networks,
            profiles,
            interface_name: interface_name(&namespace, &name),
            mac: None,
            ports,
        },
    };
    crate::serviceaccount::felix_labels(&mut wep);
    Ok(Some(wep))
}

pub fn network_policy_to_calico(
    np: &netv1::NetworkPolicy,
) -> Result<calico::NetworkPolicy, String> {
    let name = np.metadata.name.clone().unwrap_or_default();
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = np.spec.clone().unwrap_or_default();
    // What the policy applies to must be readable; the rest may be rejected.
    let selector = k8s_selector_to_calico(spec.pod_selector.as_ref(), SelectorKind::Pod)
        .map_err(|e| format!("spec.podSelector: {e}"))?;
    let mut metadata = ObjectMeta {
        name: k8s_policy_name(&name),
        namespace: Some(namespace.into()),
        ..Default::default()
    };
    let converted = match crate::kube::rejection(&np.metadata) {
        Some(reason) => Err(reason.to_owned()),
        None => k8s_policy_rules(&spec),
    };
    let (types, ingress, egress) = match converted {
        Ok(parts) => parts,
        Err(reason) => {
            reject::mark_rejected(&mut metadata.annotations, &reason);
            (k8s_policy_directions(&spec), vec![], vec![])
        }
    };
    Ok(calico::NetworkPolicy {
        api_version: calico::API_VERSION.into(),
        metadata,
        spec: PolicySpec {
            tier: None,
            order: Some(K8S_POLICY_ORDER),
            selector,
            namespace_selector: None,
            service_account_selector: None,
            types,
            ingress,
            egress,
        },
    })
}

/// A policy's types and rules, or why they cannot be enforced.
type PolicyParts = (Vec<PolicyType>, Vec<Rule>, Vec<Rule>);

fn k8s_policy_rules(spec: &netv1::NetworkPolicySpec) -> Result<PolicyParts, String> {
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        ingress.extend(
            k8s_rule_to_calico(r.from.as_deref(), r.ports.as_deref(), true)
                .map_err(|e| format!("spec.ingress[{i}]{e}"))?,
        );
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        egress.extend(
            k8s_rule_to_calico(r.to.as_deref(), r.ports.as_deref(), false)
                .map_err(|e| format!("spec.egress[{i}]{e}"))?,
        );
    }
    let types = match &spec.policy_types {
        Some(types) if !types.is_empty() => types
            .iter()
            .map(|t| match t.as_str() {
                "Ingress" => Ok(PolicyType::Ingress),
                "Egress" => Ok(PolicyType::Egress),
                other => Err(format!(
                    "spec.policyTypes: {other:?} is neither Ingress nor Egress"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => k8s_policy_directions(spec),
    };
    Ok((types, ingress, egress))
}

/// The directions a policy names: its policyTypes, or the API server's
/// defaulting (Ingress always, Egress when it has egress rules); both when
/// a policyType cannot be read, so a rejected policy drops whatever it may
/// have meant.
fn k8s_policy_directions(spec: &netv1::NetworkPolicySpec) -> Vec<PolicyType> {
    let types = spec
        .policy_types
        .as_ref()
        .map(|t| serde_json::Value::from(t.clone()));
    let egress = spec
        .egress
        .as_ref()
        .map(|e| serde_json::Value::from(vec![serde_json::Value::Null; e.len()]));
    reject::directions(types.as_ref(), egress.as_ref())
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SelectorKind {
    Pod,
    Namespace,
    /// An AdminNetworkPolicy `nodes` peer: restricted to nodes
    /// ([`calico::LABEL_NODE`]), as a pod selector is to Kubernetes pods.
    Node,
}

/// libcalico-go's `k8sSelectorToCalico`: pod selectors are restricted to
/// Kubernetes endpoints; an empty namespace selector means all namespaces.
pub(crate) fn k8s_selector_to_calico(
    s: Option<&LabelSelector>,
    kind: SelectorKind,
) -> Result<String, String> {
    let mut terms: Vec<String> = Vec::new();
    if kind == SelectorKind::Pod {
        terms.push(format!(
            "{} == '{ORCHESTRATOR_K8S}'",
            calico::LABEL_ORCHESTRATOR
        ));
    }
    if kind == SelectorKind::Node {
        terms.push(format!("has({})", calico::LABEL_NODE));
    }
    let Some(s) = s else {
        return Ok(terms.join(" && "));
    };
    let match_labels = s.match_labels.clone().unwrap_or_default();
    let exprs = s.match_expressions.clone().unwrap_or_default();
    if kind == SelectorKind::Namespace && match_labels.is_empty() && exprs.is_empty() {
        return Ok("all()".into());
    }
    for (k, v) in &match_labels {
        validate_label_key(k)?;
        validate_label_value(v).map_err(|e| format!("matchLabels {k:?}: {e}"))?;
        terms.push(format!("{k} == '{v}'"));
    }
    for e in &exprs {
        validate_label_key(&e.key)?;
        let values = e.values.clone().unwrap_or_default();
        for v in &values {
            validate_label_value(v)
                .map_err(|err| format!("matchExpressions {:?}: {err}", e.key))?;
        }
        let list = || {
            values
                .iter()
                .map(|v| format!("'{v}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let need_values = |want: bool| {
            if want == values.is_empty() {
                Err(format!(
                    "matchExpressions {:?}: operator {} {} values",
                    e.key,
                    e.operator,
                    if want { "needs" } else { "takes no" }
                ))
            } else {
                Ok(())
            }
        };
        match e.operator.as_str() {
            "In" => {
                need_values(true)?;
                terms.push(format!("{} in {{ {} }}", e.key, list()));
            }
            "NotIn" => {
                need_values(true)?;
                terms.push(format!("{} not in {{ {} }}", e.key, list()));
            }
            "Exists" => {
                need_values(false)?;
                terms.push(format!("has({})", e.key));
            }
            "DoesNotExist" => {
                need_values(false)?;
                terms.push(format!("! has({})", e.key));
            }
            other => {
                return Err(format!(
                    "matchExpressions {:?}: unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)",
                    e.key
                ))
            }
        }
    }
    let text = terms.join(" && ");
    // Belt and braces: what we produce must parse as a Calico selector.
    Selector::parse(&text).map_err(|e| e.to_string())?;
    Ok(text)
}

fn k8s_protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(format!("protocol {other:?} is not TCP, UDP or SCTP")),
    }
}

/// One Kubernetes port entry → (protocol, ports); `None` ports = every port.
fn k8s_port_to_calico(p: &netv1::NetworkPolicyPort) -> Result<(Protocol, Option<Port>), String> {
    let protocol = k8s_protocol(p.protocol.as_deref())?;
    let port = match (&p.port, p.end_port) {
        (None, None) => None,
        (None, Some(_)) => return Err("endPort is set without port".into()),
        (Some(IntOrString::Int(n)), end) => {
            let n = *n;
            if !(1..=65535).contains(&n) {
                return Err(format!("port {n} out of range 1-65535"));
            }
            match end {
                None => Some(Port::single(n as u16)),
                Some(e) if !(1..=65535).contains(&e) => {
                    return Err(format!("endPort {e} out of range 1-65535"))
                }
                Some(e) if e < n => {
                    return Err(format!("endPort {e} is below port {n}"));
                }
                Some(e) => Some(Port::Range {
                    min: n as u16,
                    max: e as u16,
                }),
            }
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err(format!("endPort cannot be used with named port {name:?}"));
            }
            calico::validate_port_name(name)?;
            Some(Port::Named(name.clone()))
        }
    };
    Ok((protocol, port))
}

/// libcalico-go's `k8sRuleToCalico`: one Allow rule per (peer × protocol),
/// each holding all the rule's ports for that protocol.
fn k8s_rule_to_calico(
    peers: Option<&[netv1::NetworkPolicyPeer]>,
    ports: Option<&[netv1::NetworkPolicyPort]>,
    ingress: bool,
) -> Result<Vec<Rule>, String> {
    // protocol → ports; `None` = all ports of that protocol. An empty port
    // list (or none) means every protocol: the single key `None`.
    let mut by_protocol: BTreeMap<Option<Protocol>, Option<Vec<Port>>> = BTreeMap::new();
    let ports = ports.unwrap_or_default();
    if ports.is_empty() {
        by_protocol.insert(None, None);
    }
    for (i, p) in ports.iter().enumerate() {
        let (protocol, port) = k8s_port_to_calico(p).map_err(|e| format!(".ports[{i}]: {e}"))?;
        let entry = by_protocol
            .entry(Some(protocol))
            .or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), port) {
            (Some(list), Some(port)) => list.push(port),
            // A port entry without a port allows the whole protocol.
            (_, None) => *entry = None,
            (None, Some(_)) => {}
        }
    }

    let peer_fields: Vec<EntityRule> = match peers {
        None | Some([]) => vec![EntityRule::default()],
        Some(peers) => peers
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                k8s_peer_to_calico(peer)
                    .map_err(|e| format!(".{}[{i}]: {e}", if ingress { "from" } else { "to" }))
            })
            .collect::<Result<_, _>>()?,
    };

    let mut rules = Vec::new();
    for peer in &peer_fields {
        for (protocol, ports) in &by_protocol {
            let ports = simplify_ports(ports.clone().unwrap_or_default());
            let mut rule = Rule {
                action: calico::Action::Allow,
                protocol: *protocol,
                ..Default::default()
            };
            if ingress {
                rule.source = peer.clone();
                rule.destination.ports = ports;
            } else {
                rule.destination = peer.clone();
                rule.destination.ports = ports;
            }
            rules.push(rule);
        }
    }
    Ok(rules)
}

fn k8s_peer_to_calico(peer: &netv1::NetworkPolicyPeer) -> Result<EntityRule, String> {
    let mut e = EntityRule::default();
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err("ipBlock cannot be combined with podSelector or namespaceSelector".into());
        }
        let cidr = parse_cidr(&block.cidr).map_err(|e| format!("ipBlock.cidr: {e}"))?;
        let mut except = Vec::new();
        for (i, x) in block.except.iter().flatten().enumerate() {
            let x = parse_cidr(x).map_err(|e| format!("ipBlock.except[{i}]: {e}"))?;
            if !cidr.contains(&x) {
                return Err(format!(
                    "ipBlock.except[{i}]: {x} is not inside cidr {cidr}"
                ));
            }
            except.push(x);
        }
        e.nets = vec![cidr];
        e.not_nets = except;
        return Ok(e);
    }
    if let Some(ps) = &peer.pod_selector {
        e.selector = Some(
            k8s_selector_to_calico(Some(ps), SelectorKind::Pod)
                .map_err(|err| format!("podSelector: {err}"))?,
        );
    }
    if let Some(ns) = &peer.namespace_selector {
        e.namespace_selector = Some(
            k8s_selector_to_calico(Some(ns), SelectorKind::Namespace)
                .map_err(|err| format!("namespaceSelector: {err}"))?,
        );
    }
    if e.selector.is_none() && e.namespace_selector.is_none() {
        return Err("a peer needs podSelector, namespaceSelector or ipBlock".into());
    }
    Ok(e)
}

/// Parses a CIDR and normalises it to its network address, as Calico does.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    text.trim()
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("{text:?} is not a valid CIDR"))
}

/// libcalico-go's `SimplifyPorts`: numeric ports sorted and merged where
/// they overlap or touch; named ports after them, in their original order.
pub fn simplify_ports(ports: Vec<Port>) -> Vec<Port> {
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    let mut named = Vec::new();
    for p in ports {
        match p {
            Port::Range { min, max } => ranges.push((min, max)),
            Port::Named(n) => {
                if !named.contains(&Port::Named(n.clone())) {
                    named.push(Port::Named(n))
                }
            }
        }
    }
    ranges.sort();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (lo, hi) in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    merged
        .into_iter()
        .map(|(min, max)| Port::Range { min, max })
        .chain(named)
        .collect()
}

pub(crate) fn validate_labels<K: AsRef<str>, V: AsRef<str>>(
    labels: impl IntoIterator<Item = (K, V)>,
) -> Result<(), String> {
    for (k, v) in labels {
        let (k, v) = (k.as_ref(), v.as_ref());
        validate_label_key(k)?;
        validate_label_value(v).map_err(|e| format!("label {k:?}: {e}"))?;
    }
    Ok(())
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A DNS subdomain (RFC 1123) as Kubernetes uses it for object names and
/// label key prefixes: dot-separated lowercase alphanumeric parts with
/// inner `-`, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
        })
}

/// Kubernetes label key: optional DNS-subdomain prefix and `/`, then a name.
pub fn validate_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if prefix.is_none_or(is_dns_subdomain) && is_label_name(name) {
        Ok(())
    } else {
        Err(format!("invalid label key {k:?}"))
    }
}

pub fn validate_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_label_name(v) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value {v:?} (up to 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric)"
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn workload_endpoint_names_split_back_into_their_pod() {
        for (node, pod) in [("node1", "web"), ("my-node", "web-7f9-abc"), ("n", "a--b")] {
            let name = workload_endpoint_name(node, pod, "eth0");
            assert_eq!(
                workload_endpoint_pod(&name, node).as_deref(),
                Some(pod),
                "{name}"
            );
        }
        assert_eq!(workload_endpoint_pod("node1-k8s-web-eth0", "node2"), None);
        assert_eq!(workload_endpoint_pod("node1-k8s-web", "node1"), None);
    }

    use super::*;
    use crate::kube::{parse_manifests, Manifest};

    fn convert(yaml: &str) -> Result<Resource, ConvertError> {
        let m = parse_manifests("t.yaml", yaml).unwrap();
        let Manifest::Kube(obj) = &m[0] else { panic!() };
        kube_to_calico(obj).map(|r| r.unwrap())
    }

    /// Converts a `networking.k8s.io/v1` NetworkPolicy given from
    /// `metadata` on.
    fn convert_knp(rest: &str) -> Result<Resource, ConvertError> {
        convert(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{rest}"
        ))
    }

    #[test]
    fn nodes_become_calico_nodes_with_their_ip_addresses() {
        let node = |status: &str| {
            convert(&format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{zone: a}}}}\nspec: {{podCIDR: 10.0.0.0/24}}\nstatus: {status}\n"
            ))
        };
        let r = node("{addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 198.18.0.1}, {type: ExternalIP, address: 'fd00:198:18::1'}], capacity: {cpu: '2'}}").unwrap();
        expect_test::expect![[r#"{"kind":"Node","apiVersion":"projectcalico.org/v3","metadata":{"name":"n1","labels":{"zone":"a"}},"spec":{"addresses":[{"address":"198.18.0.1","type":"InternalIP"},{"address":"fd00:198:18::1","type":"ExternalIP"}]}}"#]]
            .assert_eq(&r.to_json());
        // What the controller writes to etcd reads back as the same node.
        assert_eq!(Resource::from_json("etcd", r.to_json().as_bytes()), Ok(r));
        let err = node("{addresses: [{type: InternalIP, address: 198.18.0.300}]}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Node n1: status.addresses[0].address \"198.18.0.300\" is not an IP address"
        );
        let err = node("{addresses: [{type: Elsewhere, address: 198.18.0.3}]}").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Node n1: status.addresses[0].type \"Elsewhere\""),
            "{err}"
        );
        // Calico's own Node (calico-node writes CalicoNodeIP with a prefix).
        let calico = |spec: &str| {
            Resource::from_yaml(
                "etcd",
                &format!("{{apiVersion: projectcalico.org/v3, kind: Node, metadata: {{name: n2}}, spec: {spec}}}"),
            )
        };
        let Ok(Resource::Node(n)) = calico("{bgp: {ipv4Address: 198.18.0.2/24}, addresses: [{address: 198.18.0.2/24, type: CalicoNodeIP}, {address: 198.18.0.2, type: InternalIP}]}") else {
            panic!()
        };
        assert_eq!(n.nets(), ["198.18.0.2/32".parse::<IpNet>().unwrap()]);
        let err = calico("{addresses: [{address: nowhere, type: InternalIP}]}").unwrap_err();
        assert!(
            err.to_string()
                .contains("Node n2: spec.addresses[0].address \"nowhere\" is not an IP address"),
            "{err}"
        );
    }

    #[test]
    fn interface_names_follow_calico() {
        // sha1("default.web") = 9f54a5c1ba1b…; felix's 15-character limit holds.
        let n = interface_name("default", "web");
        assert_eq!(n.len(), 15);
        assert!(n.starts_with("cali"));
        assert_eq!(
            workload_endpoint_name("node-1", "my-pod", "eth0"),
            "node--1-k8s-my--pod-eth0"
        );
    }

    #[test]
    fn converts_the_seed_policy() {
        let r = convert_knp(
            r#"metadata: {name: backend-from-frontend, namespace: myns}
spec:
  podSelector: {matchLabels: {role: backend}}
  policyTypes: [Ingress]
  ingress:
    - from:
        - podSelector: {matchLabels: {role: frontend}}
        - namespaceSelector: {}
          podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [b, a]}]}
        - ipBlock: {cidr: 198.18.1.7/16, except: [198.18.1.0/24]}
      ports:
        - {protocol: TCP, port: 6379}
        - {port: 7000, endPort: 7010}
        - {protocol: UDP, port: dns}
"#,
        )
        .unwrap();
        expect_test::expect![[r#"
            {"kind":"NetworkPolicy","apiVersion":"projectcalico.org/v3","metadata":{"name":"knp.default.backend-from-frontend","namespace":"myns"},"spec":{"order":1000.0,"selector":"projectcalico.org/orchestrator == 'k8s' && role == 'backend'","types":["Ingress"],"ingress":[{"action":"Allow","protocol":"TCP","source":{"selector":"projectcalico.org/orchestrator == 'k8s' && role == 'frontend'"},"destination":{"ports":[6379,"7000:7010"]}},{"action":"Allow","protocol":"UDP","source":{"selector":"projectcalico.org/orchestrator == 'k8s' && role == 'frontend'"},"destination":{"ports":["dns"]}},{"action":"Allow","protocol":"TCP","source":{"selector":"projectcalico.org/orchestrator == 'k8s' && tier not in { 'b', 'a' }","namespaceSelector":"all()"},"destination":{"ports":[6379,"7000:7010"]}},{"action":"Allow","protocol":"UDP","source":{"selector":"projectcalico.org/orchestrator == 'k8s' && tier not in { 'b', 'a' }","namespaceSelector":"all()"},"destination":{"ports":["dns"]}},{"action":"Allow","protocol":"TCP","source":{"nets":["198.18.0.0/16"],"notNets":["198.18.1.0/24"]},"destination":{"ports":[6379,"7000:7010"]}},{"action":"Allow","protocol":"UDP","source":{"nets":["198.18.0.0/16"],"notNets":["198.18.1.0/24"]},"destination":{"ports":["dns"]}}]}}"#]]
        .assert_eq(&r.to_json());
    }

    #[test]
    fn policy_types_default_from_egress_rules() {
        let r = convert(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: e}\nspec:\n  podSelector: {}\n  egress: [{}]\n",
        )
        .unwrap();
        let Resource::NetworkPolicy(p) = r else {
            panic!()
        };
        assert_eq!(p.spec.types, vec![PolicyType::Ingress, PolicyType::Egress]);
        assert_eq!(p.spec.egress, vec![Rule::default()]);
        assert_eq!(p.spec.selector, "projectcalico.org/orchestrator == 'k8s'");
    }

    #[test]
    fn invalid_policies_are_rejected_and_still_isolate_their_pods() {
        let base = |body: &str| {
            format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bad, namespace: ns}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n{body}")
        };
        for (body, want, types) in [
            (
                "  ingress: [{ports: [{port: 0}]}]",
                "port 0 out of range",
                "[Ingress]",
            ),
            (
                "  ingress: [{ports: [{port: 65536}]}]",
                "port 65536 out of range",
                "[Ingress]",
            ),
            (
                "  ingress: [{ports: [{port: 90, endPort: 80}]}]",
                "endPort 80 is below port 90",
                "[Ingress]",
            ),
            (
                "  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 198.18.0.0/33}}]}]",
                "spec.egress[0].to[0]: ipBlock.cidr: \"198.18.0.0/33\" is not a valid CIDR",
                "[Egress]",
            ),
            (
                "  ingress: [{from: [{podSelector: {matchLabels: {'a b': x}}}]}]",
                "invalid label key",
                "[Ingress]",
            ),
            (
                "  ingress: [{ports: [{protocol: ICMP, port: 1}]}]",
                "not TCP, UDP or SCTP",
                "[Ingress]",
            ),
            ("  policyTypes: [Sideways]", "Sideways", "[Ingress, Egress]"),
            (
                "  egress: [{to: [{ipBlock: {cidr: 198.19.0.0/16}, serviceAccount: x}]}]",
                "spec.egress[0].to[0].serviceAccount: unknown field",
                "[Ingress, Egress]",
            ),
            (
                "  ingress: {from: []}",
                "spec.ingress: invalid type",
                "[Ingress]",
            ),
        ] {
            let r = convert(&base(body)).unwrap();
            let Resource::NetworkPolicy(p) = &r else {
                panic!()
            };
            let why = r.metadata().rejection().unwrap_or_else(|| panic!("{body}"));
            assert!(why.contains(want), "{body}: {why}");
            assert_eq!(
                p.spec.selector,
                "projectcalico.org/orchestrator == 'k8s' && app == 'web'"
            );
            assert_eq!(format!("{:?}", p.spec.types), types, "{body}");
            assert!(p.spec.ingress.is_empty() && p.spec.egress.is_empty());
        }
        // Without a readable podSelector there is nothing to isolate: an
        // error naming the object.
        let err = convert(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: ns}\nspec:\n  podSelector: {matchLabels: {'a b': x}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("NetworkPolicy ns/bad: spec.podSelector"),
            "{err}"
        );
    }

    #[test]
    fn what_the_api_server_adds_is_accepted() {
        let r = convert_knp(
            r#"metadata:
  name: web
  namespace: ns
  uid: 0b5d5a4e-3b8e-4a51-a3f4-5d1f0e6f7a10
  resourceVersion: "4711"
  generation: 2
  creationTimestamp: "2024-05-01T10:00:00Z"
  annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
  managedFields: [{manager: kubectl, operation: Apply, apiVersion: networking.k8s.io/v1}]
spec: {podSelector: {}, policyTypes: [Ingress]}
status: {conditions: []}
"#,
        )
        .unwrap();
        assert_eq!(r.metadata().rejection(), None);
    }

    #[test]
    fn host_network_pods_have_no_endpoint() {
        let m = parse_manifests(
            "t.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ns}\nspec: {nodeName: n1, hostNetwork: true, containers: [{name: c}]}\nstatus: {podIP: 198.18.0.1}\n",
        )
        .unwrap();
        let Manifest::Kube(obj) = &m[0] else { panic!() };
        assert_eq!(kube_to_calico(obj), Ok(None));
    }

    #[test]
    fn namespaces_become_profiles_with_pcns_labels() {
        let r = convert(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: bob-apps, labels: {user: bob}}\n",
        )
        .unwrap();
        let Resource::Profile(p) = r else { panic!() };
        assert_eq!(p.metadata.name, "kns.bob-apps");
        let labels: Vec<_> = p.spec.labels_to_apply.iter().collect();
        assert_eq!(
            format!("{labels:?}"),
            r#"[("pcns.kubernetes.io/metadata.name", "bob-apps"), ("pcns.projectcalico.org/name", "bob-apps"), ("pcns.user", "bob")]"#
        );
    }

    #[test]
    fn pods_without_an_endpoint_of_their_own() {
        let pod = |extra_spec: &str, status: &str| {
            let m = parse_manifests(
                "t.yaml",
                &format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: a}}\n\
                     spec: {{nodeName: n1, containers: [{{name: c}}]{extra_spec}}}\n\
                     status: {status}\n"
                ),
            )
            .unwrap();
            let Manifest::Kube(obj) = &m[0] else { panic!() };
            kube_to_calico(obj).unwrap()
        };
        let running = "{phase: Running, podIP: 198.18.0.5}";
        assert!(pod("", running).is_some());
        assert_eq!(pod(", hostNetwork: true", running), None, "host network");
        assert_eq!(pod("", "{phase: Pending}"), None, "no address yet");
        assert_eq!(pod("", "{phase: Succeeded, podIP: 198.18.0.5}"), None);
        assert_eq!(pod("", "{phase: Failed, podIP: 198.18.0.5}"), None);
    }

    #[test]
    fn simplify_ports_merges_ranges() {
        let p = simplify_ports(vec![
            Port::single(81),
            Port::Named("http".into()),
            Port::single(80),
            Port::Range { min: 82, max: 90 },
            Port::single(100),
        ]);
        let text: Vec<String> = p.iter().map(|p| p.to_string()).collect();
        assert_eq!(text, ["80:90", "100", "http"]);
    }
}
