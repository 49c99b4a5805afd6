//! What nftpolicy reads of each kind it decodes, field by field, and what it
//! does with every other field: the strict half of decoding.
//!
//! Every field a resource may hold is listed here as one of:
//!
//! - [`Field::Used`]: decoded and enforced (its *values* are checked where
//!   it is decoded);
//! - [`Field::Object`] / [`Field::List`]: an object (or a list of objects)
//!   whose own fields are listed too;
//! - [`Field::Ignored`]: accepted and not enforced, because it cannot change
//!   which packets are allowed (bookkeeping the API server adds, notes,
//!   routing details); the text says why;
//! - [`Field::Unimplemented`]: it changes what a policy means and nftpolicy
//!   does not implement it; the text says what it does. Present, it makes
//!   the object rejected;
//! - [`Field::UnimplementedUnlessDefault`]: the same, except that its
//!   default value (`false`, an empty list) means nothing and is accepted.
//!
//! A field that is not listed at all is unknown and makes the object
//! rejected too: a misspelt or newer field must never be dropped without a
//! word (an `Allow` limited by a field we skip would allow more than it
//! says). What a rejected object still does is decided in [`crate::reject`]:
//! rejections narrow what is allowed, never widen it.
//!
//! Adding a kind or a field: list it here, decode it in [`crate::calico`]
//! or [`crate::convert`], and the test `every_modelled_field_is_listed`
//! checks that the two agree.

use std::fmt;

use serde_json::Value;

/// How nftpolicy treats one field.
#[derive(Debug, Clone, Copy)]
pub enum Field {
    Used,
    Object(Fields),
    List(Fields),
    Ignored(&'static str),
    Unimplemented(&'static str),
    UnimplementedUnlessDefault(&'static str),
}

/// The fields of one object type: name → treatment.
pub type Fields = &'static [(&'static str, Field)];

/// A field that makes its object rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// Where it is, e.g. `spec.egress[0].destination.services`.
    pub path: String,
    pub kind: ProblemKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// Not a field of this kind (misspelt, or newer than nftpolicy).
    Unknown,
    /// A field nftpolicy does not implement; what it does.
    Unimplemented(&'static str),
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ProblemKind::Unknown => write!(f, "{}: unknown field", self.path),
            ProblemKind::Unimplemented(what) => {
                write!(f, "{}: not implemented by nftpolicy ({what})", self.path)
            }
        }
    }
}

/// The problems as one reason, e.g. for a log line.
pub fn describe(problems: &[FieldProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The fields of `value` (an object of type `fields`) that make it
/// rejected, in document order. Values of the wrong JSON type are left to
/// the decoder, which reports them with the expected type.
pub fn check(fields: Fields, value: &Value) -> Vec<FieldProblem> {
    let mut out = Vec::new();
    check_object(fields, value, "", &mut out);
    out
}

fn check_object(fields: Fields, value: &Value, at: &str, out: &mut Vec<FieldProblem>) {
    let Value::Object(map) = value else { return };
    for (name, v) in map {
        let path = if at.is_empty() {
            name.clone()
        } else {
            format!("{at}.{name}")
        };
        let Some((_, field)) = fields.iter().find(|(n, _)| n == name) else {
            out.push(FieldProblem {
                path,
                kind: ProblemKind::Unknown,
            });
            continue;
        };
        match field {
            Field::Used | Field::Ignored(_) => {}
            Field::Object(inner) => check_object(inner, v, &path, out),
            Field::List(inner) => {
                if let Value::Array(items) = v {
                    for (i, item) in items.iter().enumerate() {
                        check_object(inner, item, &format!("{path}[{i}]"), out);
                    }
                }
            }
            Field::Unimplemented(what) => out.push(FieldProblem {
                path,
                kind: ProblemKind::Unimplemented(what),
            }),
            Field::UnimplementedUnlessDefault(what) => {
                if !is_default(v) {
                    out.push(FieldProblem {
                        path,
                        kind: ProblemKind::Unimplemented(what),
                    })
                }
            }
        }
    }
}

/// `null`, `false`, `""`, `[]` or `{}`: the value an omitted field has.
fn is_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) => false,
    }
}

// ---------------------------------------------------------------------------
// Metadata (Kubernetes ObjectMeta; Calico v3 resources use the same)

const BOOKKEEPING: &str = "bookkeeping the API server or datastore adds";

/// `metadata` of every kind.
pub const METADATA: Fields = &[
    ("name", Field::Used),
    ("namespace", Field::Used),
    ("labels", Field::Used),
    (
        "annotations",
        Field::Ignored(
            "notes for people and tools; nftpolicy reads only its own \
             nftpolicy.io/rejected (see crate::reject)",
        ),
    ),
    ("resourceVersion", Field::Ignored(BOOKKEEPING)),
    ("uid", Field::Ignored(BOOKKEEPING)),
    ("generation", Field::Ignored(BOOKKEEPING)),
    ("creationTimestamp", Field::Ignored(BOOKKEEPING)),
    ("deletionTimestamp", Field::Ignored(BOOKKEEPING)),
    ("deletionGracePeriodSeconds", Field::Ignored(BOOKKEEPING)),
    ("managedFields", Field::Ignored(BOOKKEEPING)),
    ("ownerReferences", Field::Ignored(BOOKKEEPING)),
    ("finalizers", Field::Ignored(BOOKKEEPING)),
    ("generateName", Field::Ignored(BOOKKEEPING)),
    ("selfLink", Field::Ignored(BOOKKEEPING)),
];

// ---------------------------------------------------------------------------
// Calico v3 (projectcalico.org/v3)

const ICMP: Fields = &[("type", Field::Used), ("code", Field::Used)];

const SERVICE_ACCOUNT_MATCH: Fields = &[("names", Field::Used), ("selector", Field::Used)];

const ENTITY_RULE: Fields = &[
    ("nets", Field::Used),
    ("notNets", Field::Used),
    ("selector", Field::Used),
    ("notSelector", Field::Used),
    ("namespaceSelector", Field::Used),
    ("ports", Field::Used),
    ("notPorts", Field::Used),
    ("serviceAccounts", Field::Object(SERVICE_ACCOUNT_MATCH)),
    (
        "services",
        Field::Unimplemented("matches a Kubernetes Service's endpoints and ports"),
    ),
    (
        "domains",
        Field::Unimplemented("matches destinations by DNS name"),
    ),
];

const RULE: Fields = &[
    ("action", Field::Used),
    ("ipVersion", Field::Used),
    ("protocol", Field::Used),
    ("notProtocol", Field::Used),
    ("icmp", Field::Object(ICMP)),
    ("notICMP", Field::Object(ICMP)),
    ("source", Field::Object(ENTITY_RULE)),
    ("destination", Field::Object(ENTITY_RULE)),
    (
        "metadata",
        Field::Ignored("annotations on a rule: notes, shown by felix as comments"),
    ),
    (
        "http",
        Field::Unimplemented("matches HTTP methods and paths (application layer)"),
    ),
];

/// The fields a NetworkPolicy and a GlobalNetworkPolicy share.
macro_rules! policy_fields {
    ($($extra:expr),* $(,)?) => {
        &[
            ("tier", Field::Used),
            ("order", Field::Used),
            ("selector", Field::Used),
            ("types", Field::Used),
            ("ingress", Field::List(RULE)),
            ("egress", Field::List(RULE)),
            ("serviceAccountSelector", Field::Used),
            (
                "performanceHints",
                Field::UnimplementedUnlessDefault("hints on how felix should program the policy"),
            ),
            $($extra),*
        ]
    };
}

const NETWORK_POLICY_SPEC: Fields = policy_fields!();

const GLOBAL_NETWORK_POLICY_SPEC: Fields = policy_fields!(
    ("namespaceSelector", Field::Used),
    (
        "doNotTrack",
        Field::UnimplementedUnlessDefault(
            "applies the policy before connection tracking, to host endpoints only"
        ),
    ),
    (
        "preDNAT",
        Field::UnimplementedUnlessDefault("applies the policy before DNAT, to host endpoints only"),
    ),
    (
        "applyOnForward",
        Field::UnimplementedUnlessDefault("applies host-endpoint policy to forwarded traffic"),
    ),
);

const PROFILE_SPEC: Fields = &[
    ("ingress", Field::List(RULE)),
    ("egress", Field::List(RULE)),
    ("labelsToApply", Field::Used),
];

const NAMES_THE_WORKLOAD: &str = "names the workload; selectors match labels, not these";

const ENDPOINT_PORT: Fields = &[
    ("name", Field::Used),
    ("protocol", Field::Used),
    ("port", Field::Used),
    (
        "hostPort",
        Field::Ignored("the host port is mapped to the pod's port before policy sees the packet"),
    ),
    (
        "hostIP",
        Field::Ignored("the host port is mapped to the pod's port before policy sees the packet"),
    ),
];

const WORKLOAD_ENDPOINT_SPEC: Fields = &[
    ("orchestrator", Field::Ignored(NAMES_THE_WORKLOAD)),
    ("workload", Field::Ignored(NAMES_THE_WORKLOAD)),
    ("containerID", Field::Ignored(NAMES_THE_WORKLOAD)),
    ("pod", Field::Ignored(NAMES_THE_WORKLOAD)),
    ("endpoint", Field::Ignored(NAMES_THE_WORKLOAD)),
    ("node", Field::Used),
    ("ipNetworks", Field::Used),
    ("profiles", Field::Used),
    ("interfaceName", Field::Used),
    ("ports", Field::List(ENDPOINT_PORT)),
    ("serviceAccountName", Field::Used),
    (
        "mac",
        Field::Ignored("a layer-2 address; policy matches IP addresses"),
    ),
    ("ipv4Gateway", Field::Ignored("routing, not policy")),
    ("ipv6Gateway", Field::Ignored("routing, not policy")),
    (
        "qosControls",
        Field::Ignored(
            "bandwidth and packet-rate limits; no effect on which connections are allowed",
        ),
    ),
    (
        "awsElasticIPs",
        Field::Ignored("addresses AWS translates outside the node; policy sees the pod's own"),
    ),
    (
        "ipNATs",
        Field::Unimplemented("floating IPs: more addresses that reach the endpoint"),
    ),
    (
        "allowSpoofedSourcePrefixes",
        Field::Unimplemented("source prefixes the endpoint may send from besides its own"),
    ),
];

const NETWORK_SET_SPEC: Fields = &[
    ("nets", Field::Used),
    (
        "allowedEgressDomains",
        Field::Unimplemented("DNS names whose addresses belong to the set"),
    ),
];

const TIER_SPEC: Fields = &[("order", Field::Used), ("defaultAction", Field::Used)];

const NODE_ADDRESS: Fields = &[("address", Field::Used), ("type", Field::Used)];

/// A Calico Node's tunnel addresses and MACs: the overlay's, not the ones
/// `nodes` peers match.
const NODE_TUNNEL: Field =
    Field::Ignored("an overlay (VXLAN) address or MAC: routing; nodes peers match spec.addresses");

const NODE_SPEC: Fields = &[
    ("addresses", Field::List(NODE_ADDRESS)),
    (
        "bgp",
        Field::Ignored("BGP peering (AS number, BGP addresses): routing"),
    ),
    ("ipv4VXLANTunnelAddr", NODE_TUNNEL),
    ("ipv6VXLANTunnelAddr", NODE_TUNNEL),
    ("vxlanTunnelMACAddr", NODE_TUNNEL),
    ("vxlanTunnelMACAddrV6", NODE_TUNNEL),
    (
        "wireguard",
        Field::Ignored("WireGuard: encryption between nodes, not policy"),
    ),
    ("orchRefs", Field::Ignored(BOOKKEEPING)),
];

/// A Calico v3 resource with `spec` fields `spec` (and `extra` top-level
/// fields).
macro_rules! calico_kind {
    ($spec:expr $(, $extra:expr)*) => {
        &[
            ("apiVersion", Field::Used),
            ("kind", Field::Used),
            ("metadata", Field::Object(METADATA)),
            ("spec", Field::Object($spec)),
            $($extra,)*
        ]
    };
}

const CALICO_NODE_STATUS: (&str, Field) = (
    "status",
    Field::Ignored("what calico-node reports about itself (agent state, BGP)"),
);

/// The fields of a Calico v3 resource of `kind` (`None`: not a kind
/// nftpolicy reads).
pub fn calico(kind: &str) -> Option<Fields> {
    Some(match kind {
        "NetworkPolicy" => calico_kind!(NETWORK_POLICY_SPEC),
        "GlobalNetworkPolicy" => calico_kind!(GLOBAL_NETWORK_POLICY_SPEC),
        "Profile" => calico_kind!(PROFILE_SPEC),
        "WorkloadEndpoint" => calico_kind!(WORKLOAD_ENDPOINT_SPEC),
        "NetworkSet" | "GlobalNetworkSet" => calico_kind!(NETWORK_SET_SPEC),
        "Tier" => calico_kind!(TIER_SPEC),
        "Node" => calico_kind!(NODE_SPEC, CALICO_NODE_STATUS),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Kubernetes

const LABEL_SELECTOR_REQUIREMENT: Fields = &[
    ("key", Field::Used),
    ("operator", Field::Used),
    ("values", Field::Used),
];

pub(crate) const LABEL_SELECTOR: Fields = &[
    ("matchLabels", Field::Used),
    ("matchExpressions", Field::List(LABEL_SELECTOR_REQUIREMENT)),
];

const IP_BLOCK: Fields = &[("cidr", Field::Used), ("except", Field::Used)];

const PEER: Fields = &[
    ("podSelector", Field::Object(LABEL_SELECTOR)),
    ("namespaceSelector", Field::Object(LABEL_SELECTOR)),
    ("ipBlock", Field::Object(IP_BLOCK)),
];

const POLICY_PORT: Fields = &[
    ("protocol", Field::Used),
    ("port", Field::Used),
    ("endPort", Field::Used),
];

const INGRESS_RULE: Fields = &[
    ("from", Field::List(PEER)),
    ("ports", Field::List(POLICY_PORT)),
];
const EGRESS_RULE: Fields = &[
    ("to", Field::List(PEER)),
    ("ports", Field::List(POLICY_PORT)),
];

const K8S_NETWORK_POLICY_SPEC: Fields = &[
    ("podSelector", Field::Object(LABEL_SELECTOR)),
    ("policyTypes", Field::Used),
    ("ingress", Field::List(INGRESS_RULE)),
    ("egress", Field::List(EGRESS_RULE)),
];

const K8S_NETWORK_POLICY: Fields = &[
    ("apiVersion", Field::Used),
    ("kind", Field::Used),
    ("metadata", Field::Object(METADATA)),
    ("spec", Field::Object(K8S_NETWORK_POLICY_SPEC)),
    (
        "status",
        Field::Ignored("conditions the API server reports"),
    ),
];

const K8S_POD: Fields = &[
    ("apiVersion", Field::Used),
    ("kind", Field::Used),
    ("metadata", Field::Object(METADATA)),
    (
        "spec",
        Field::Ignored(
            "nodeName, hostNetwork, serviceAccountName and containers[].ports are read; \
             the rest (images, volumes, probes, …) does not change which packets are allowed",
        ),
    ),
    (
        "status",
        Field::Ignored(
            "podIP, podIPs and phase are read; the rest (conditions, container states) \
             does not change which packets are allowed",
        ),
    ),
];

const K8S_NAMESPACE: Fields = &[
    ("apiVersion", Field::Used),
    ("kind", Field::Used),
    ("metadata", Field::Object(METADATA)),
    ("spec", Field::Ignored("finalizers only")),
    (
        "status",
        Field::Ignored("phase and conditions the API server reports"),
    ),
];

const K8S_SERVICE_ACCOUNT: Fields = &[
    ("apiVersion", Field::Used),
    ("kind", Field::Used),
    ("metadata", Field::Object(METADATA)),
    (
        "secrets",
        Field::Ignored("credentials for the pods; policy matches the account's name and labels"),
    ),
    (
        "imagePullSecrets",
        Field::Ignored("credentials for the pods; policy matches the account's name and labels"),
    ),
    (
        "automountServiceAccountToken",
        Field::Ignored("credentials for the pods; policy matches the account's name and labels"),
    ),
];

/// What a Kubernetes Node's spec is: nothing a nodes peer reads.
const K8S_NODE_SPEC: (&str, Field) = (
    "spec",
    Field::Ignored(
        "podCIDRs, taints, providerID, unschedulable: scheduling and routing; \
         a nodes peer matches the node's labels and addresses only",
    ),
);

/// A Kubernetes Node's status: its addresses, read as the Pod's are.
const K8S_NODE_STATUS: (&str, Field) = (
    "status",
    Field::Ignored(
        "addresses (InternalIP, ExternalIP) are read; the rest (capacity, conditions, \
         images, …) does not change which packets are allowed",
    ),
);

const K8S_NODE: Fields = &[
    ("apiVersion", Field::Used),
    ("kind", Field::Used),
    ("metadata", Field::Object(METADATA)),
    K8S_NODE_SPEC,
    K8S_NODE_STATUS,
];

/// The fields of a Kubernetes object (`v1` Namespace, Pod and
/// ServiceAccount, `networking.k8s.io/v1` NetworkPolicy).
pub fn kubernetes(kind: &str) -> Option<Fields> {
    Some(match kind {
        "Namespace" => K8S_NAMESPACE,
        "Pod" => K8S_POD,
        "ServiceAccount" => K8S_SERVICE_ACCOUNT,
        "Node" => K8S_NODE,
        "NetworkPolicy" => K8S_NETWORK_POLICY,
        _ => return crate::admin::fields(kind),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calico::{self, Resource};

    fn problems(kind: &str, json: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(json).unwrap();
        check(calico(kind).unwrap(), &v)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn unknown_and_unimplemented_fields_are_named_with_their_path() {
        let p = problems(
            "GlobalNetworkPolicy",
            r#"{"apiVersion":"projectcalico.org/v3","kind":"GlobalNetworkPolicy",
                "metadata":{"name":"p","managedFields":[],"uid":"x","annotations":{"a":"b"}},
                "spec":{"selector":"all()","doNotTrack":false,"preDNAT":true,"selectr":"x",
                  "egress":[{"action":"Allow","destination":{"services":{"name":"s"}}},
                            {"action":"Allow","http":{"methods":["GET"]},"metadata":{"annotations":{}}}]}}"#,
        );
        assert_eq!(
            p,
            [
                "spec.egress[0].destination.services: not implemented by nftpolicy (matches a Kubernetes Service's endpoints and ports)",
                "spec.egress[1].http: not implemented by nftpolicy (matches HTTP methods and paths (application layer))",
                "spec.preDNAT: not implemented by nftpolicy (applies the policy before DNAT, to host endpoints only)",
                "spec.selectr: unknown field",
            ]
        );
        // The namespaced kind has no namespaceSelector, doNotTrack, …
        let p = problems(
            "NetworkPolicy",
            r#"{"spec":{"namespaceSelector":"a == 'b'","doNotTrack":false}}"#,
        );
        assert_eq!(
            p,
            [
                "spec.doNotTrack: unknown field",
                "spec.namespaceSelector: unknown field"
            ]
        );
    }

    /// Everything the model decodes and serializes is listed as `Used`, or
    /// the strict check would reject what nftpolicy itself writes.
    #[test]
    fn every_modelled_field_is_listed() {
        let rule = r#"{"action":"Deny","ipVersion":4,"protocol":"ICMP","notProtocol":"TCP",
            "icmp":{"type":8,"code":0},"notICMP":{"type":0},
            "source":{"nets":["198.18.0.0/16"],"notNets":["198.18.1.0/24"],"selector":"a == 'b'",
                      "notSelector":"c == 'd'","namespaceSelector":"all()",
                      "serviceAccounts":{"names":["sa"],"selector":"role == 'x'"}},
            "destination":{"selector":"x == 'y'"}}"#;
        let tcp_rule = r#"{"action":"Allow","protocol":"TCP",
            "source":{"ports":[1,"2:3","http"],"notPorts":[9]},
            "destination":{"ports":[80],"notPorts":["dns"]}}"#;
        let meta = r#"{"name":"x","namespace":"ns","labels":{"a":"b"},"annotations":{"n":"o"},
            "resourceVersion":"1","uid":"u","creationTimestamp":"2024-01-01T00:00:00Z"}"#;
        let docs = [
            format!(
                r#"{{"apiVersion":"projectcalico.org/v3","kind":"NetworkPolicy","metadata":{meta},
                "spec":{{"tier":"default","order":10,"selector":"all()","serviceAccountSelector":"a == 'b'","types":["Ingress","Egress"],
                "ingress":[{rule},{tcp_rule}],"egress":[{rule}]}}}}"#
            ),
            format!(
                r#"{{"apiVersion":"projectcalico.org/v3","kind":"GlobalNetworkPolicy","metadata":{{"name":"g"}},
                "spec":{{"order":10,"selector":"all()","namespaceSelector":"a == 'b'","types":["Ingress"],
                "ingress":[{rule}]}}}}"#
            ),
            format!(
                r#"{{"apiVersion":"projectcalico.org/v3","kind":"Profile","metadata":{{"name":"p"}},
                "spec":{{"ingress":[{rule}],"egress":[{tcp_rule}],"labelsToApply":{{"a":"b"}}}}}}"#
            ),
            r#"{"apiVersion":"projectcalico.org/v3","kind":"WorkloadEndpoint",
                "metadata":{"name":"w","namespace":"ns"},
                "spec":{"orchestrator":"k8s","workload":"","node":"n","containerID":"c","pod":"p",
                "endpoint":"eth0","serviceAccountName":"sa","ipNetworks":["198.18.0.1/32"],
                "profiles":["kns.ns"],"interfaceName":"cali0","mac":"aa:bb:cc:dd:ee:ff",
                "ports":[{"name":"http","protocol":"TCP","port":80}]}}"#
                .to_owned(),
            r#"{"apiVersion":"projectcalico.org/v3","kind":"NetworkSet","metadata":{"name":"s","namespace":"ns"},
                "spec":{"nets":["198.18.0.0/24"]}}"#
                .to_owned(),
            r#"{"apiVersion":"projectcalico.org/v3","kind":"GlobalNetworkSet","metadata":{"name":"s"},
                "spec":{"nets":["198.18.0.0/24"]}}"#
                .to_owned(),
            r#"{"apiVersion":"projectcalico.org/v3","kind":"Tier","metadata":{"name":"t"},
                "spec":{"order":100,"defaultAction":"Pass"}}"#
                .to_owned(),
        ];
        for doc in docs {
            let r = Resource::from_json("test", doc.as_bytes()).unwrap();
            assert_eq!(r.metadata().rejection(), None, "{doc}");
            // What nftpolicy writes back passes the check as well.
            let v: Value = serde_json::from_str(&r.to_json()).unwrap();
            let kind = v["kind"].as_str().unwrap().to_owned();
            assert_eq!(check(calico(&kind).unwrap(), &v), vec![], "{}", r.to_json());
        }
        let _ = calico::API_VERSION;
    }
}
