//! The Kubernetes admin policies of sigs.k8s.io/network-policy-api:
//! `AdminNetworkPolicy` and `BaselineAdminNetworkPolicy`
//! (`policy.networking.k8s.io/v1alpha1`) and `ClusterNetworkPolicy`
//! (`v1alpha2`, tiers `Admin` and `Baseline`), decoded strictly and
//! converted the way Calico converts them (libcalico-go
//! `lib/backend/k8s/conversion`, `lib/names`; Calico's Tier docs):
//!
//! | kind | Calico tier (order, defaultAction) | GlobalNetworkPolicy name | order |
//! |---|---|---|---|
//! | AdminNetworkPolicy | `adminnetworkpolicy` (1,000, Pass) | `kanp.adminnetworkpolicy.<name>` | priority |
//! | BaselineAdminNetworkPolicy | `baselineadminnetworkpolicy` (10,000,000, Pass) | `kbanp.baselineadminnetworkpolicy.<name>` | none |
//! | ClusterNetworkPolicy, tier Admin | `kube-admin` (1,000, Pass) | `kcnp.kube-admin.<name>` | priority |
//! | ClusterNetworkPolicy, tier Baseline | `kube-baseline` (10,000,000, Pass) | `kcnp.kube-baseline.<name>` | priority |
//!
//! The four tiers exist without a Tier object, as Calico creates them at
//! start-up ([`BUILTIN_TIERS`]); a Tier object of one of these names must
//! carry the pinned order and action. The admin tiers come before the
//! `default` tier (1,000,000: Kubernetes NetworkPolicies), the baseline
//! tiers after it, so per endpoint and direction a NetworkPolicy that
//! selects the pod decides (its tier ends with Deny) before the baseline
//! is consulted; a tier with no policy for the endpoint is skipped.
//!
//! The subject becomes the policy's `namespaceSelector` and `selector`
//! (`projectcalico.org/orchestrator == 'k8s'` and the pod selector); each
//! rule becomes one Calico rule per (protocol × peer), protocols sorted
//! (none, SCTP, TCP, UDP), as Calico emits them; actions Allow/Accept →
//! Allow, Deny → Deny, Pass → Pass. Peers: `namespaces` → a rule
//! `namespaceSelector`; `pods` → `namespaceSelector` + `selector`;
//! `networks` (egress) → `nets`; `nodes` (egress) → a `selector`
//! `has(nftpolicy.io/node) && <node labels>`, which matches the addresses
//! of the Nodes whose labels it selects (both families; see
//! [`crate::calico::LABEL_NODE`] for why no other selector sees nodes).
//! A named port matches the destination
//! pod's container port of that name with the protocol the pod declares
//! (the API's definition), so it is emitted for TCP, UDP and SCTP. The
//! policy's types are the directions it has rules for (Calico's: the admin
//! tiers pass by default, so a direction without rules decides nothing).
//!
//! Two policies of one kind at the same priority: the API leaves their
//! order undefined; nftpolicy (as felix) orders them by name.
//!
//! Invalid values
//! (a priority out of 0–1000, a port range whose start is above its end,
//! a peer with no or several fields, a BaselineAdminNetworkPolicy not named
//! `default`, a bad CIDR) reject the object too. Its stub keeps the
//! subject and drops what the policy would have decided, in the directions
//! it names, before any policy; an object whose subject cannot be read is
//! an error naming it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

use crate::calico::{
    self, Action, EntityRule, GlobalNetworkPolicy, PolicySpec, PolicyType, Port, Protocol, Rule,
    TierAction,
};
use crate::convert::{k8s_selector_to_calico, parse_cidr, simplify_ports, SelectorKind};
use crate::fields::{Field, Fields, LABEL_SELECTOR, METADATA};
use crate::reject;

pub const API_V1ALPHA1: &str = "policy.networking.k8s.io/v1alpha1";
pub const API_V1ALPHA2: &str = "policy.networking.k8s.io/v1alpha2";

pub const ADMIN_TIER: &str = "adminnetworkpolicy";
pub const BASELINE_TIER: &str = "baselineadminnetworkpolicy";
pub const KUBE_ADMIN_TIER: &str = "kube-admin";
pub const KUBE_BASELINE_TIER: &str = "kube-baseline";
/// Calico's `KubeAdminTierOrder` / `AdminNetworkPolicyTierOrder`.
pub const ADMIN_TIER_ORDER: f64 = 1_000.0;
/// Calico's `KubeBaselineTierOrder` / `BaselineAdminNetworkPolicyTierOrder`.
pub const BASELINE_TIER_ORDER: f64 = 10_000_000.0;

/// The tiers that exist without a Tier object, with their fixed order and
/// default action (Calico's `ensureTierExists` at start-up).
pub const BUILTIN_TIERS: [(&str, f64, TierAction); 5] = [
    (
        calico::DEFAULT_TIER,
        calico::DEFAULT_TIER_ORDER,
        TierAction::Deny,
    ),
    (ADMIN_TIER, ADMIN_TIER_ORDER, TierAction::Pass),
    (BASELINE_TIER, BASELINE_TIER_ORDER, TierAction::Pass),
    (KUBE_ADMIN_TIER, ADMIN_TIER_ORDER, TierAction::Pass),
    (KUBE_BASELINE_TIER, BASELINE_TIER_ORDER, TierAction::Pass),
];

/// The prefixes of converted policies' names, by tier (libcalico-go
/// `names.K8sAdminNetworkPolicyNamePrefix` …).
const NAME_PREFIXES: [(&str, &str); 4] = [
    (ADMIN_TIER, "kanp.adminnetworkpolicy."),
    (BASELINE_TIER, "kbanp.baselineadminnetworkpolicy."),
    (KUBE_ADMIN_TIER, "kcnp.kube-admin."),
    (KUBE_BASELINE_TIER, "kcnp.kube-baseline."),
];

/// Whether `name` is how Calico names a converted admin policy of `tier`
/// (those names do not start with `<tier>.`, yet are valid in it).
pub fn is_converted_name(name: &str, tier: &str) -> bool {
    NAME_PREFIXES
        .iter()
        .any(|(t, p)| *t == tier && name.strip_prefix(p).is_some_and(|r| !r.is_empty()))
}

/// Whether `name` is the name of a GlobalNetworkPolicy converted from an
/// admin policy (of any of the four tiers): what the policy controller
/// owns in etcd beside the Kubernetes NetworkPolicies it writes.
pub fn is_converted_policy_name(name: &str) -> bool {
    NAME_PREFIXES
        .iter()
        .any(|(t, _)| is_converted_name(name, t))
}

/// Which of the three kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AdminKind {
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
}

impl AdminKind {
    pub const ALL: [AdminKind; 3] = [
        AdminKind::AdminNetworkPolicy,
        AdminKind::BaselineAdminNetworkPolicy,
        AdminKind::ClusterNetworkPolicy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AdminKind::AdminNetworkPolicy => "AdminNetworkPolicy",
            AdminKind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
            AdminKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            AdminKind::ClusterNetworkPolicy => API_V1ALPHA2,
            _ => API_V1ALPHA1,
        }
    }

    /// The kind of `(apiVersion, kind)`, if it is one of these.
    pub fn parse(api_version: &str, kind: &str) -> Option<AdminKind> {
        AdminKind::ALL
            .into_iter()
            .find(|k| k.name() == kind && k.api_version() == api_version)
    }

    pub fn from_name(kind: &str) -> Option<AdminKind> {
        AdminKind::ALL.into_iter().find(|k| k.name() == kind)
    }

    /// The plural the API server serves the kind under.
    pub fn plural(self) -> &'static str {
        match self {
            AdminKind::AdminNetworkPolicy => "adminnetworkpolicies",
            AdminKind::BaselineAdminNetworkPolicy => "baselineadminnetworkpolicies",
            AdminKind::ClusterNetworkPolicy => "clusternetworkpolicies",
        }
    }
}

/// One AdminNetworkPolicy, BaselineAdminNetworkPolicy or
/// ClusterNetworkPolicy, as `kubectl get -o yaml` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AdminSpec,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminSpec {
    /// ClusterNetworkPolicy only: `Admin` or `Baseline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// AdminNetworkPolicy and ClusterNetworkPolicy: 0–1000, lower first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default)]
    pub subject: Subject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<AdminRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<AdminRule>>,
}

/// Exactly one of `namespaces` and `pods`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    #[serde(default)]
    pub pod_selector: LabelSelector,
}

/// An ingress (`from`) or egress (`to`) rule; `ports` in v1alpha1,
/// `protocols` in v1alpha2.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Peer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Peer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<AnpPort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<CnpProtocol>>,
}

/// Exactly one field.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
}

/// v1alpha1: exactly one of the three.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_number: Option<PortNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortNumber {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub port: i64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub start: i64,
    pub end: i64,
}

/// v1alpha2: exactly one field.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CnpProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<CnpPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<CnpPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<CnpPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CnpPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<CnpPort>,
}

/// Exactly one of `number` and `range`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<CnpRange>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CnpRange {
    pub start: i64,
    pub end: i64,
}

impl AdminPolicy {
    pub fn admin_kind(&self) -> AdminKind {
        AdminKind::from_name(&self.kind).unwrap_or(AdminKind::AdminNetworkPolicy)
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }

    /// The Calico tier its policy goes to; `Err` for a ClusterNetworkPolicy
    /// whose tier is neither Admin nor Baseline.
    pub fn tier(&self) -> Result<&'static str, String> {
        match self.admin_kind() {
            AdminKind::AdminNetworkPolicy => Ok(ADMIN_TIER),
            AdminKind::BaselineAdminNetworkPolicy => Ok(BASELINE_TIER),
            AdminKind::ClusterNetworkPolicy => match self.spec.tier.as_deref() {
                Some("Admin") => Ok(KUBE_ADMIN_TIER),
                Some("Baseline") => Ok(KUBE_BASELINE_TIER),
                other => Err(format!(
                    "spec.tier: {other:?} is neither \"Admin\" nor \"Baseline\""
                )),
            },
        }
    }

    /// The name of the GlobalNetworkPolicy it becomes; `None` when its tier
    /// cannot be read (a ClusterNetworkPolicy with a bad tier).
    pub fn calico_name(&self) -> Option<String> {
        let tier = self.tier().ok()?;
        let prefix = NAME_PREFIXES.iter().find(|(t, _)| *t == tier)?.1;
        Some(format!("{prefix}{}", self.name()))
    }
}

// ---------------------------------------------------------------------------
// Fields (see crate::fields)

const NAMESPACED_POD: Fields = &[
    ("namespaceSelector", Field::Object(LABEL_SELECTOR)),
    ("podSelector", Field::Object(LABEL_SELECTOR)),
];
const SUBJECT: Fields = &[
    ("namespaces", Field::Object(LABEL_SELECTOR)),
    ("pods", Field::Object(NAMESPACED_POD)),
];
/// An ingress peer has the subject's two forms.
const INGRESS_PEER: Fields = SUBJECT;
const EGRESS_PEER: Fields = &[
    ("namespaces", Field::Object(LABEL_SELECTOR)),
    ("pods", Field::Object(NAMESPACED_POD)),
    ("networks", Field::Used),
    ("nodes", Field::Object(LABEL_SELECTOR)),
];
const PORT_NUMBER: Fields = &[("protocol", Field::Used), ("port", Field::Used)];
const PORT_RANGE: Fields = &[
    ("protocol", Field::Used),
    ("start", Field::Used),
    ("end", Field::Used),
];
const ANP_PORT: Fields = &[
    ("portNumber", Field::Object(PORT_NUMBER)),
    ("namedPort", Field::Used),
    ("portRange", Field::Object(PORT_RANGE)),
];
const CNP_RANGE: Fields = &[("start", Field::Used), ("end", Field::Used)];
const CNP_PORT: Fields = &[("number", Field::Used), ("range", Field::Object(CNP_RANGE))];
const CNP_PORTS: Fields = &[("destinationPort", Field::Object(CNP_PORT))];
const CNP_PROTOCOL: Fields = &[
    ("tcp", Field::Object(CNP_PORTS)),
    ("udp", Field::Object(CNP_PORTS)),
    ("sctp", Field::Object(CNP_PORTS)),
    ("destinationNamedPort", Field::Used),
];
const RULE_NAME: Field = Field::Ignored("a label for people; Calico keeps it as a rule annotation");
const ANP_INGRESS: Fields = &[
    ("name", RULE_NAME),
    ("action", Field::Used),
    ("from", Field::List(INGRESS_PEER)),
    ("ports", Field::List(ANP_PORT)),
];
const ANP_EGRESS: Fields = &[
    ("name", RULE_NAME),
    ("action", Field::Used),
    ("to", Field::List(EGRESS_PEER)),
    ("ports", Field::List(ANP_PORT)),
];
const CNP_INGRESS: Fields = &[
    ("name", RULE_NAME),
    ("action", Field::Used),
    ("from", Field::List(INGRESS_PEER)),
    ("protocols", Field::List(CNP_PROTOCOL)),
];
const CNP_EGRESS: Fields = &[
    ("name", RULE_NAME),
    ("action", Field::Used),
    ("to", Field::List(EGRESS_PEER)),
    ("protocols", Field::List(CNP_PROTOCOL)),
];
const ANP_SPEC: Fields = &[
    ("priority", Field::Used),
    ("subject", Field::Object(SUBJECT)),
    ("ingress", Field::List(ANP_INGRESS)),
    ("egress", Field::List(ANP_EGRESS)),
];
const BANP_SPEC: Fields = &[
    ("subject", Field::Object(SUBJECT)),
    ("ingress", Field::List(ANP_INGRESS)),
    ("egress", Field::List(ANP_EGRESS)),
];
const CNP_SPEC: Fields = &[
    ("tier", Field::Used),
    ("priority", Field::Used),
    ("subject", Field::Object(SUBJECT)),
    ("ingress", Field::List(CNP_INGRESS)),
    ("egress", Field::List(CNP_EGRESS)),
];

macro_rules! admin_kind {
    ($spec:expr) => {
        &[
            ("apiVersion", Field::Used),
            ("kind", Field::Used),
            ("metadata", Field::Object(METADATA)),
            ("spec", Field::Object($spec)),
            (
                "status",
                Field::Ignored("conditions the implementations report"),
            ),
        ]
    };
}

/// The fields of one of the three kinds (`None`: another kind).
pub fn fields(kind: &str) -> Option<Fields> {
    Some(match AdminKind::from_name(kind)? {
        AdminKind::AdminNetworkPolicy => admin_kind!(ANP_SPEC),
        AdminKind::BaselineAdminNetworkPolicy => admin_kind!(BANP_SPEC),
        AdminKind::ClusterNetworkPolicy => admin_kind!(CNP_SPEC),
    })
}

// ---------------------------------------------------------------------------
// Conversion

/// The GlobalNetworkPolicy an admin policy becomes (see the module docs).
/// A policy nftpolicy cannot enforce as written becomes its rejected stub;
/// `Err` only when its subject (or tier) cannot be read.
pub fn to_calico(p: &AdminPolicy) -> Result<GlobalNetworkPolicy, String> {
    let tier = p.tier()?;
    let name = p.calico_name().unwrap_or_default();
    if p.name().is_empty() {
        return Err("metadata.name is missing".into());
    }
    let (namespace_selector, selector) = subject_selectors(&p.spec.subject)?;
    let mut metadata = calico::ObjectMeta {
        name,
        ..Default::default()
    };
    let order = match p.admin_kind() {
        AdminKind::BaselineAdminNetworkPolicy => None,
        _ => p.spec.priority.map(|n| n as f64),
    };
    let converted = match crate::kube::rejection(&p.metadata) {
        Some(reason) => Err(reason.to_owned()),
        None => rules(p),
    };
    let (types, ingress, egress) = match converted {
        Ok((ingress, egress)) => {
            let mut types = Vec::new();
            if !ingress.is_empty() {
                types.push(PolicyType::Ingress);
            }
            if !egress.is_empty() {
                types.push(PolicyType::Egress);
            }
            (types, ingress, egress)
        }
        Err(reason) => {
            reject::mark_rejected(&mut metadata.annotations, &reason);
            let mut types = Vec::new();
            if p.spec.ingress.is_some() {
                types.push(PolicyType::Ingress);
            }
            if p.spec.egress.is_some() {
                types.push(PolicyType::Egress);
            }
            if types.is_empty() {
                types = vec![PolicyType::Ingress, PolicyType::Egress];
            }
            (types, vec![], vec![])
        }
    };
    Ok(GlobalNetworkPolicy {
        api_version: calico::API_VERSION.into(),
        metadata,
        spec: PolicySpec {
            tier: Some(tier.to_owned()),
            order,
            selector,
            namespace_selector: Some(namespace_selector),
            service_account_selector: None,
            types,
            ingress,
            egress,
        },
    })
}

/// `(namespaceSelector, selector)` of the subject.
fn subject_selectors(s: &Subject) -> Result<(String, String), String> {
    match (&s.namespaces, &s.pods) {
        (Some(ns), None) => Ok((
            k8s_selector_to_calico(Some(ns), SelectorKind::Namespace)
                .map_err(|e| format!("spec.subject.namespaces: {e}"))?,
            k8s_selector_to_calico(None, SelectorKind::Pod)?,
        )),
        (None, Some(pods)) => Ok((
            k8s_selector_to_calico(Some(&pods.namespace_selector), SelectorKind::Namespace)
                .map_err(|e| format!("spec.subject.pods.namespaceSelector: {e}"))?,
            k8s_selector_to_calico(Some(&pods.pod_selector), SelectorKind::Pod)
                .map_err(|e| format!("spec.subject.pods.podSelector: {e}"))?,
        )),
        _ => Err("spec.subject: exactly one of namespaces and pods must be set".into()),
    }
}

fn rules(p: &AdminPolicy) -> Result<(Vec<Rule>, Vec<Rule>), String> {
    let kind = p.admin_kind();
    if p.metadata
        .namespace
        .as_deref()
        .is_some_and(|n| !n.is_empty())
    {
        return Err("metadata.namespace: the kind is cluster-scoped".into());
    }
    match kind {
        AdminKind::BaselineAdminNetworkPolicy => {
            if p.name() != "default" {
                return Err(format!(
                    "metadata.name {:?}: the one BaselineAdminNetworkPolicy is named \"default\"",
                    p.name()
                ));
            }
        }
        _ => match p.spec.priority {
            Some(n) if (0..=1000).contains(&n) => {}
            Some(n) => return Err(format!("spec.priority {n} is outside 0-1000")),
            None => return Err("spec.priority is missing".into()),
        },
    }
    let mut out = [Vec::new(), Vec::new()];
    for (dir, (field, list)) in [("ingress", &p.spec.ingress), ("egress", &p.spec.egress)]
        .into_iter()
        .enumerate()
    {
        for (i, r) in list.iter().flatten().enumerate() {
            let at = format!("spec.{field}[{i}]");
            out[dir].extend(rule(kind, r, dir == 0).map_err(|e| format!("{at}{e}"))?);
        }
    }
    let [ingress, egress] = out;
    Ok((ingress, egress))
}

fn action(kind: AdminKind, text: &str) -> Result<Action, String> {
    Ok(match (kind, text) {
        (AdminKind::ClusterNetworkPolicy, "Accept") => Action::Allow,
        (AdminKind::AdminNetworkPolicy | AdminKind::BaselineAdminNetworkPolicy, "Allow") => {
            Action::Allow
        }
        (_, "Deny") => Action::Deny,
        (AdminKind::AdminNetworkPolicy | AdminKind::ClusterNetworkPolicy, "Pass") => Action::Pass,
        (_, other) => {
            let allowed = match kind {
                AdminKind::AdminNetworkPolicy => "Allow, Deny, Pass",
                AdminKind::BaselineAdminNetworkPolicy => "Allow, Deny",
                AdminKind::ClusterNetworkPolicy => "Accept, Deny, Pass",
            };
            return Err(format!(".action: {other:?} is not one of {allowed}"));
        }
    })
}

/// The Calico rules of one admin rule, or why it cannot be converted (the
/// reason starts with the field under the rule, `.to[0]: …`).
fn rule(kind: AdminKind, r: &AdminRule, ingress: bool) -> Result<Vec<Rule>, String> {
    let action = action(kind, &r.action)?;
    let ports = match kind {
        AdminKind::ClusterNetworkPolicy => {
            if r.ports.is_some() {
                return Err(".ports: v1alpha2 names ports in protocols".into());
            }
            cnp_ports(r.protocols.as_deref())?
        }
        _ => {
            if r.protocols.is_some() {
                return Err(".protocols: v1alpha1 names ports in ports".into());
            }
            anp_ports(r.ports.as_deref())?
        }
    };
    let (field, peers) = if ingress {
        ("from", r.from.as_deref())
    } else {
        ("to", r.to.as_deref())
    };
    if (if ingress { &r.to } else { &r.from }).is_some() {
        return Err(format!(
            ".{}: not a field of an {} rule",
            if ingress { "to" } else { "from" },
            if ingress { "ingress" } else { "egress" }
        ));
    }
    let peers = match peers {
        Some(p) if !p.is_empty() => p,
        _ => return Err(format!(".{field}: at least one peer is required")),
    };
    let entities = peers
        .iter()
        .enumerate()
        .map(|(i, peer)| peer_entity(peer, ingress).map_err(|e| format!(".{field}[{i}]{e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rules = Vec::new();
    for (protocol, ports) in &ports {
        for entity in &entities {
            let mut rule = Rule {
                action,
                protocol: *protocol,
                ..Default::default()
            };
            if ingress {
                rule.source = entity.clone();
            } else {
                rule.destination = entity.clone();
            }
            rule.destination.ports = ports.clone();
            rules.push(rule);
        }
    }
    Ok(rules)
}

fn peer_entity(peer: &Peer, ingress: bool) -> Result<EntityRule, String> {
    let set = [
        peer.namespaces.is_some(),
        peer.pods.is_some(),
        peer.networks.is_some(),
        peer.nodes.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(": exactly one of namespaces, pods, networks and nodes must be set".into());
    }
    let mut e = EntityRule::default();
    if let Some(ns) = &peer.namespaces {
        e.namespace_selector = Some(
            k8s_selector_to_calico(Some(ns), SelectorKind::Namespace)
                .map_err(|err| format!(".namespaces: {err}"))?,
        );
    } else if let Some(pods) = &peer.pods {
        e.namespace_selector = Some(
            k8s_selector_to_calico(Some(&pods.namespace_selector), SelectorKind::Namespace)
                .map_err(|err| format!(".pods.namespaceSelector: {err}"))?,
        );
        e.selector = Some(
            k8s_selector_to_calico(Some(&pods.pod_selector), SelectorKind::Pod)
                .map_err(|err| format!(".pods.podSelector: {err}"))?,
        );
    } else if let Some(nets) = &peer.networks {
        if ingress {
            return Err(".networks: only egress peers have networks".into());
        }
        if nets.is_empty() {
            return Err(".networks: at least one CIDR is required".into());
        }
        for (i, n) in nets.iter().enumerate() {
            e.nets
                .push(parse_cidr(n).map_err(|err| format!(".networks[{i}]: {err}"))?);
        }
    } else if let Some(nodes) = &peer.nodes {
        if ingress {
            return Err(".nodes: only egress peers have nodes".into());
        }
        e.selector = Some(
            k8s_selector_to_calico(Some(nodes), SelectorKind::Node)
                .map_err(|err| format!(".nodes: {err}"))?,
        );
    }
    Ok(e)
}

/// Ports by protocol (`None`: any protocol, no port match), protocols in
/// Calico's order.
type ByProtocol = BTreeMap<Option<Protocol>, Vec<Port>>;

/// Ports by protocol, in the order the rules are emitted.
type PortGroups = Vec<(Option<Protocol>, Vec<Port>)>;

fn protocol(text: Option<&str>) -> Result<Protocol, String> {
    match text.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!("protocol {other:?} is not TCP, UDP or SCTP")),
    }
}

fn port_number(n: i64) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {n} out of range 1-65535"))
}

fn port_range(start: i64, end: i64) -> Result<Port, String> {
    let (min, max) = (port_number(start)?, port_number(end)?);
    if min > max {
        return Err(format!("port range {start}-{end}: start is above end"));
    }
    Ok(Port::Range { min, max })
}

fn named(name: &str, by: &mut ByProtocol) -> Result<(), String> {
    calico::validate_port_name(name)?;
    // The pod's container port of that name, with the protocol it has.
    for p in [Protocol::Sctp, Protocol::Tcp, Protocol::Udp] {
        by.entry(Some(p))
            .or_default()
            .push(Port::Named(name.to_owned()));
    }
    Ok(())
}

fn finish(by: ByProtocol) -> PortGroups {
    let mut out: Vec<_> = by
        .into_iter()
        .map(|(p, ports)| (p, simplify_ports(ports)))
        .collect();
    // Calico sorts protocols by name: none, SCTP, TCP, UDP.
    out.sort_by_key(|(p, _)| p.map(|p| p.name()));
    out
}

fn anp_ports(ports: Option<&[AnpPort]>) -> Result<PortGroups, String> {
    let Some(ports) = ports else {
        return Ok(vec![(None, vec![])]);
    };
    if ports.is_empty() {
        return Err(".ports: an empty list (omit it to match every port)".into());
    }
    let mut by = ByProtocol::new();
    for (i, p) in ports.iter().enumerate() {
        let at = |e: String| format!(".ports[{i}]: {e}");
        match (&p.port_number, &p.named_port, &p.port_range) {
            (Some(n), None, None) => {
                let proto = protocol(n.protocol.as_deref()).map_err(at)?;
                let port = port_number(n.port).map_err(at)?;
                by.entry(Some(proto)).or_default().push(Port::single(port));
            }
            (None, Some(name), None) => named(name, &mut by).map_err(at)?,
            (None, None, Some(r)) => {
                let proto = protocol(r.protocol.as_deref()).map_err(at)?;
                let port = port_range(r.start, r.end).map_err(at)?;
                by.entry(Some(proto)).or_default().push(port);
            }
            _ => {
                return Err(at(
                    "exactly one of portNumber, namedPort and portRange must be set".into(),
                ))
            }
        }
    }
    Ok(finish(by))
}

fn cnp_ports(protocols: Option<&[CnpProtocol]>) -> Result<PortGroups, String> {
    let Some(protocols) = protocols else {
        return Ok(vec![(None, vec![])]);
    };
    if protocols.is_empty() {
        return Err(".protocols: an empty list (omit it to match every protocol)".into());
    }
    // Protocols whose every port matches: a `tcp: {}` without a port.
    let mut any_port: Vec<Protocol> = Vec::new();
    let mut by = ByProtocol::new();
    for (i, p) in protocols.iter().enumerate() {
        let at = |e: String| format!(".protocols[{i}]: {e}");
        let set = [
            p.tcp.as_ref().map(|x| (Protocol::Tcp, x)),
            p.udp.as_ref().map(|x| (Protocol::Udp, x)),
            p.sctp.as_ref().map(|x| (Protocol::Sctp, x)),
        ];
        let given: Vec<_> = set.into_iter().flatten().collect();
        match (given.as_slice(), &p.destination_named_port) {
            ([(proto, ports)], None) => match &ports.destination_port {
                None => any_port.push(*proto),
                Some(CnpPort {
                    number: Some(n),
                    range: None,
                }) => by
                    .entry(Some(*proto))
                    .or_default()
                    .push(Port::single(port_number(*n).map_err(at)?)),
                Some(CnpPort {
                    number: None,
                    range: Some(r),
                }) => by
                    .entry(Some(*proto))
                    .or_default()
                    .push(port_range(r.start, r.end).map_err(at)?),
                Some(_) => {
                    return Err(at(
                        "destinationPort: exactly one of number and range must be set".into(),
                    ))
                }
            },
            ([], Some(name)) => named(name, &mut by).map_err(at)?,
            _ => {
                return Err(at(
                    "exactly one of tcp, udp, sctp and destinationNamedPort must be set".into(),
                ))
            }
        }
    }
    for proto in any_port {
        // Every port of the protocol: its port list is dropped.
        by.insert(Some(proto), Vec::new());
    }
    Ok(finish(by))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calico::Resource;
    use crate::convert::kube_to_calico;
    use crate::kube::{parse_manifests, KubeObject, Manifest};

    fn convert(yaml: &str) -> Result<Resource, String> {
        let m = parse_manifests("t.yaml", yaml).map_err(|e| e.to_string())?;
        let Manifest::Kube(obj @ KubeObject::Admin(_)) = &m[0] else {
            panic!("{m:?}")
        };
        kube_to_calico(obj)
            .map(|r| r.expect("a policy"))
            .map_err(|e| e.to_string())
    }

    const ANP: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: guard, uid: 1c1c, resourceVersion: "7"}
spec:
  priority: 40
  subject:
    pods:
      namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}
  ingress:
    - name: from-b
      action: Allow
      from:
        - namespaces: {matchLabels: {team: b}}
        - pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: cli}}}
      ports:
        - portNumber: {port: 80}
        - portRange: {protocol: UDP, start: 5000, end: 5010}
        - namedPort: metrics
  egress:
    - action: Pass
      to: [{networks: [198.19.0.0/16, "fd00:198:18:ff::/64"]}]
    - action: Deny
      to: [{namespaces: {}}]
"#;

    #[test]
    fn converts_like_calico() {
        // Tier adminnetworkpolicy, order = priority, name kanp.<tier>.<name>;
        // subject → namespaceSelector + selector; one rule per protocol ×
        // peer, protocols sorted; named ports under every protocol.
        expect_test::expect![[r#"
            {"kind":"GlobalNetworkPolicy","apiVersion":"projectcalico.org/v3","metadata":{"name":"kanp.adminnetworkpolicy.guard"},"spec":{"tier":"adminnetworkpolicy","order":40.0,"selector":"projectcalico.org/orchestrator == 'k8s' && app in { 'web' }","namespaceSelector":"team == 'a'","types":["Ingress","Egress"],"ingress":[{"action":"Allow","protocol":"SCTP","source":{"namespaceSelector":"team == 'b'"},"destination":{"ports":["metrics"]}},{"action":"Allow","protocol":"SCTP","source":{"selector":"projectcalico.org/orchestrator == 'k8s' && app == 'cli'","namespaceSelector":"all()"},"destination":{"ports":["metrics"]}},{"action":"Allow","protocol":"TCP","source":{"namespaceSelector":"team == 'b'"},"destination":{"ports":[80,"metrics"]}},{"action":"Allow","protocol":"TCP","source":{"selector":"projectcalico.org/orchestrator == 'k8s' && app == 'cli'","namespaceSelector":"all()"},"destination":{"ports":[80,"metrics"]}},{"action":"Allow","protocol":"UDP","source":{"namespaceSelector":"team == 'b'"},"destination":{"ports":["5000:5010","metrics"]}},{"action":"Allow","protocol":"UDP","source":{"selector":"projectcalico.org/orchestrator == 'k8s' && app == 'cli'","namespaceSelector":"all()"},"destination":{"ports":["5000:5010","metrics"]}}],"egress":[{"action":"Pass","destination":{"nets":["198.19.0.0/16","fd00:198:18:ff::/64"]}},{"action":"Deny","destination":{"namespaceSelector":"all()"}}]}}"#]]
        .assert_eq(&convert(ANP).unwrap().to_json());
    }

    #[test]
    fn node_peers_select_nodes_by_label_and_nothing_else() {
        let anp = convert(&ANP.replace(
            "[{networks: [198.19.0.0/16, \"fd00:198:18:ff::/64\"]}]",
            "[{nodes: {matchLabels: {kubernetes.io/os: linux}}}, {nodes: {}}]",
        ))
        .unwrap();
        let Resource::GlobalNetworkPolicy(g) = &anp else {
            panic!()
        };
        let selectors: Vec<_> = g.spec.egress[..2]
            .iter()
            .map(|r| r.destination.selector.as_deref().unwrap())
            .collect();
        assert_eq!(
            selectors,
            [
                "has(nftpolicy.io/node) && kubernetes.io/os == 'linux'",
                "has(nftpolicy.io/node)"
            ]
        );
        let node = |name: &str, os: &str, ip: &str| {
            Resource::from_yaml(
                "n",
                &format!("{{apiVersion: projectcalico.org/v3, kind: Node, metadata: {{name: {name}, labels: {{kubernetes.io/os: {os}}}}}, spec: {{addresses: [{{address: '{ip}/24', type: CalicoNodeIP}}, {{address: '{ip}', type: InternalIP}}]}}}}"),
            )
            .unwrap()
        };
        let mut state = crate::state::ClusterState::new();
        state.upsert(node("n1", "linux", "198.18.0.1"));
        state.upsert(node("n2", "windows", "198.18.0.2"));
        state.upsert(
            Resource::from_yaml(
                "s",
                "{apiVersion: projectcalico.org/v3, kind: GlobalNetworkSet, metadata: {name: s, labels: {kubernetes.io/os: linux}}, spec: {nets: [198.18.0.9/32]}}",
            )
            .unwrap(),
        );
        let nets = state.labelled_nets();
        let selected = |text: &str| -> Vec<String> {
            let sel = crate::selector::Selector::parse(text).unwrap();
            nets.iter()
                .filter(|n| n.selected_by(&sel))
                .flat_map(|n| n.nets.iter().map(ToString::to_string).collect::<Vec<_>>())
                .collect()
        };
        // The node peer: node addresses by label, never a network set.
        assert_eq!(selected(selectors[0]), ["198.18.0.1/32"]);
        assert_eq!(selected(selectors[1]), ["198.18.0.1/32", "198.18.0.2/32"]);
        // Ordinary selectors never see nodes.
        assert_eq!(selected("all()"), ["198.18.0.9/32"]);
        assert_eq!(selected("kubernetes.io/os == 'linux'"), ["198.18.0.9/32"]);
        assert_eq!(selected("!has(team)"), ["198.18.0.9/32"]);
    }

    #[test]
    fn baseline_and_cluster_policies_go_to_their_tiers() {
        let banp = convert(
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\nspec:\n  subject: {namespaces: {}}\n  ingress: [{action: Deny, from: [{namespaces: {}}]}]\n",
        )
        .unwrap();
        let Resource::GlobalNetworkPolicy(g) = &banp else {
            panic!()
        };
        assert_eq!(g.metadata.name, "kbanp.baselineadminnetworkpolicy.default");
        assert_eq!(g.spec.tier.as_deref(), Some(BASELINE_TIER));
        assert_eq!(g.spec.namespace_selector.as_deref(), Some("all()"));
        assert_eq!(g.spec.types, [PolicyType::Ingress]);
        for (tier, want) in [("Admin", KUBE_ADMIN_TIER), ("Baseline", KUBE_BASELINE_TIER)] {
            let cnp = convert(&format!(
                "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: c}}\nspec:\n  tier: {tier}\n  priority: 3\n  subject: {{namespaces: {{}}}}\n  egress: [{{action: Accept, to: [{{namespaces: {{}}}}], protocols: [{{udp: {{destinationPort: {{number: 53}}}}}}, {{tcp: {{}}}}]}}]\n"
            ))
            .unwrap();
            let Resource::GlobalNetworkPolicy(g) = &cnp else {
                panic!()
            };
            assert_eq!(g.metadata.name, format!("kcnp.{want}.c"));
            assert_eq!(g.spec.tier.as_deref(), Some(want));
            assert_eq!(g.spec.order, Some(3.0));
            // tcp without a port: every TCP port; UDP 53.
            let rules: Vec<String> = g
                .spec
                .egress
                .iter()
                .map(|r| format!("{:?} {:?} {:?}", r.action, r.protocol, r.destination.ports))
                .collect();
            assert_eq!(
                rules,
                [
                    "Allow Some(Tcp) []",
                    "Allow Some(Udp) [Range { min: 53, max: 53 }]"
                ]
            );
            // What nftpolicy writes to etcd reads back as the same policy.
            assert_eq!(
                Resource::from_json("etcd", cnp.to_json().as_bytes()),
                Ok(cnp)
            );
        }
    }

    #[test]
    fn what_cannot_be_enforced_is_rejected_and_fails_closed() {
        let with = |from: &str, to: &str| ANP.replace(from, to);
        for (yaml, want, types) in [
            (
                with(
                    "[{networks: [198.19.0.0/16, \"fd00:198:18:ff::/64\"]}]",
                    "[{nodes: {matchLabels: {'bad key': x}}}]",
                ),
                "spec.egress[0].to[0].nodes: ",
                "[Ingress, Egress]",
            ),
            (
                with(
                    "[{networks: [198.19.0.0/16, \"fd00:198:18:ff::/64\"]}]",
                    "[{nodes: {matchLabelz: {a: b}}}]",
                ),
                "spec.egress[0].to[0].nodes.matchLabelz: unknown field",
                "[Ingress, Egress]",
            ),
            (
                with(
                    "    - namespaces: {matchLabels: {team: b}}",
                    "    - nodes: {}",
                ),
                "spec.ingress[0].from[0].nodes: unknown field",
                "[Ingress, Egress]",
            ),
            (
                with("priority: 40", "priority: 1001"),
                "spec.priority 1001 is outside 0-1000",
                "[Ingress, Egress]",
            ),
            (
                with("start: 5000, end: 5010", "start: 5010, end: 5000"),
                "spec.ingress[0].ports[1]: port range 5010-5000: start is above end",
                "[Ingress, Egress]",
            ),
            (
                with("action: Pass", "action: Accept"),
                "spec.egress[0].action: \"Accept\" is not one of Allow, Deny, Pass",
                "[Ingress, Egress]",
            ),
            (
                with("198.19.0.0/16", "198.19.0.0/33"),
                "spec.egress[0].to[0].networks[0]",
                "[Ingress, Egress]",
            ),
            (
                with("    - namespaces: {matchLabels: {team: b}}", "    - {}"),
                "spec.ingress[0].from[0]: exactly one of",
                "[Ingress, Egress]",
            ),
            (
                with("  priority: 40", "  priority: 40\n  colour: red"),
                "spec.colour: unknown field",
                "[Ingress, Egress]",
            ),
            (
                with("      ports:\n", "      ports: 7\n      portz:\n"),
                "spec.ingress[0].portz: unknown field",
                "[Ingress, Egress]",
            ),
        ] {
            let r = convert(&yaml).unwrap_or_else(|e| panic!("{want}: {e}"));
            let Resource::GlobalNetworkPolicy(g) = &r else {
                panic!()
            };
            let why = r
                .metadata()
                .rejection()
                .unwrap_or_else(|| panic!("{want}: accepted"));
            assert!(why.contains(want), "{want}: {why}");
            assert_eq!(format!("{:?}", g.spec.types), types, "{want}");
            assert!(g.spec.ingress.is_empty() && g.spec.egress.is_empty());
            assert_eq!(g.spec.tier.as_deref(), Some(ADMIN_TIER));
            assert_eq!(g.spec.namespace_selector.as_deref(), Some("team == 'a'"));
            // The stub read back from etcd is the same stub.
            assert_eq!(
                Resource::from_json("etcd", r.to_json().as_bytes()),
                Ok(r.clone())
            );
        }
        // A BaselineAdminNetworkPolicy has no Pass and is named default.
        let banp = |name: &str, action: &str| {
            convert(&format!("apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  subject: {{namespaces: {{}}}}\n  egress: [{{action: {action}, to: [{{namespaces: {{}}}}]}}]\n"))
                .unwrap()
                .metadata()
                .rejection()
                .map(str::to_owned)
        };
        assert_eq!(banp("default", "Allow"), None);
        assert!(banp("default", "Pass")
            .unwrap()
            .contains("not one of Allow, Deny"));
        assert!(banp("other", "Deny")
            .unwrap()
            .contains("is named \"default\""));
        // Without a readable subject there is nothing to fail closed on.
        let err = convert(&ANP.replace(
            "podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}",
            "podSelector: {matchLabels: {'a b': c}}",
        ))
        .unwrap_err();
        assert!(
            err.starts_with("AdminNetworkPolicy guard: spec.subject.pods.podSelector"),
            "{err}"
        );
        let err = convert("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: c}\nspec: {tier: Middle, priority: 1, subject: {namespaces: {}}}\n").unwrap_err();
        assert!(err.contains("spec.tier: Some(\"Middle\")"), "{err}");
    }

    #[test]
    fn builtin_tiers_are_pinned_and_converted_names_valid() {
        let tier = |name: &str, spec: &str| {
            Resource::from_json(
                "k",
                format!(r#"{{"apiVersion":"projectcalico.org/v3","kind":"Tier","metadata":{{"name":"{name}"}},"spec":{spec}}}"#).as_bytes(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            tier(ADMIN_TIER, r#"{"order":1000,"defaultAction":"Pass"}"#),
            Ok(())
        );
        assert!(tier(ADMIN_TIER, r#"{"order":5,"defaultAction":"Pass"}"#)
            .unwrap_err()
            .contains("order is 1000"));
        assert!(tier(KUBE_BASELINE_TIER, r#"{"order":10000000}"#)
            .unwrap_err()
            .contains("default action is Pass"));
        assert_eq!(tier("default", "{}"), Ok(()));
        assert!(is_converted_name("kanp.adminnetworkpolicy.x", ADMIN_TIER));
        assert!(!is_converted_name(
            "kanp.adminnetworkpolicy.x",
            KUBE_ADMIN_TIER
        ));
        assert!(!is_converted_name("kcnp.kube-admin.", KUBE_ADMIN_TIER));
        assert!(is_converted_policy_name("kcnp.kube-baseline.x"));
        assert!(!is_converted_policy_name("security.x"));
    }
}
