//! Calico v3 resources as stored in etcd (`apiVersion: projectcalico.org/v3`).
//!
//! Only the subset nftpolicy enforces is modelled, and decoding is strict:
//! every field is either read, or listed in [`crate::fields`] as accepted
//! and ignored (with the reason it cannot change which packets are allowed);
//! an unknown or unimplemented field, and an unknown *value* of a field we
//! read (an action, a protocol, a port string), make the object rejected.
//! A rejected object whose scope can still be read decodes into a stub that
//! fails closed ([`crate::reject`]); one whose scope cannot is an error.
//! Either way nothing is half-understood.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::labels::IStr;
use crate::selector::{Labels, Selector, SelectorError};

pub const API_VERSION: &str = "projectcalico.org/v3";
/// etcd key prefix under which Calico stores v3 resources.
pub const ETCD_PREFIX: &str = "/calico/resources/v3/projectcalico.org/";

/// Labels every Kubernetes workload endpoint carries.
pub const LABEL_NAMESPACE: &str = "projectcalico.org/namespace";
pub const LABEL_ORCHESTRATOR: &str = "projectcalico.org/orchestrator";
pub const LABEL_SERVICE_ACCOUNT: &str = "projectcalico.org/serviceaccount";
/// The marker a Node carries as a selector sees it (its value: the node's
/// name). Only a selector that requires it (`has(nftpolicy.io/node) && …`,
/// what an AdminNetworkPolicy `nodes` peer becomes) matches nodes, and such
/// a selector matches nothing else ([`crate::state::LabelledNets::selected_by`]):
/// an ordinary selector such as `all()` never starts matching node addresses.
pub const LABEL_NODE: &str = "nftpolicy.io/node";
/// Prefix of namespace labels inherited by endpoints through the `kns.` profile.
pub const NAMESPACE_LABEL_PREFIX: &str = "pcns.";
/// Name label the `kns.` profile applies (`pcns.projectcalico.org/name`).
pub const NAMESPACE_NAME_LABEL: &str = "projectcalico.org/name";
pub const DEFAULT_TIER: &str = "default";
/// The `default` tier's order, which Calico fixes (libcalico-go's
/// `DefaultTierOrder`); a tier without an order comes after every other.
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;
/// Calico's staged policy kinds: what-if policies that never change which
/// packets pass. nftpolicy ignores them (see [`is_ignored_kind`]).
pub const STAGED_KINDS: [&str; 3] = [
    "StagedNetworkPolicy",
    "StagedGlobalNetworkPolicy",
    "StagedKubernetesNetworkPolicy",
];

/// Whether `kind` (of `apiVersion: projectcalico.org/v3`) is one nftpolicy
/// skips without reading: the staged policies, which felix only reports on
/// (flow logs) and never enforces. Skipping them cannot widen anything.
pub fn is_ignored_kind(kind: &str) -> bool {
    STAGED_KINDS.contains(&kind)
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    /// Interned: every pod in a namespace repeats it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<IStr>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    /// Why nftpolicy rejected this object, if it did: the stub's
    /// [`REJECTED_ANNOTATION`](crate::reject::REJECTED_ANNOTATION).
    pub fn rejection(&self) -> Option<&str> {
        self.annotations
            .get(crate::reject::REJECTED_ANNOTATION)
            .map(String::as_str)
    }
}

/// The kinds of resource nftpolicy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    NetworkPolicy,
    GlobalNetworkPolicy,
    Profile,
    WorkloadEndpoint,
    NetworkSet,
    GlobalNetworkSet,
    Tier,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::NetworkPolicy,
        Kind::GlobalNetworkPolicy,
        Kind::Profile,
        Kind::WorkloadEndpoint,
        Kind::NetworkSet,
        Kind::GlobalNetworkSet,
        Kind::Tier,
        Kind::Node,
    ];

    /// The plural used in etcd keys.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networkpolicies",
            Kind::GlobalNetworkPolicy => "globalnetworkpolicies",
            Kind::Profile => "profiles",
            Kind::WorkloadEndpoint => "workloadendpoints",
            Kind::NetworkSet => "networksets",
            Kind::GlobalNetworkSet => "globalnetworksets",
            Kind::Tier => "tiers",
            Kind::Node => "nodes",
        }
    }

    pub fn from_plural(plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.plural() == plural)
    }

    pub fn is_namespaced(self) -> bool {
        matches!(
            self,
            Kind::NetworkPolicy | Kind::WorkloadEndpoint | Kind::NetworkSet
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            Kind::Profile => "Profile",
            Kind::WorkloadEndpoint => "WorkloadEndpoint",
            Kind::NetworkSet => "NetworkSet",
            Kind::GlobalNetworkSet => "GlobalNetworkSet",
            Kind::Tier => "Tier",
            Kind::Node => "Node",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Identity of a resource: kind, namespace (for namespaced kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub kind: Kind,
    /// Interned: every pod's key repeats its namespace.
    pub namespace: Option<IStr>,
    /// Shared between a key's clones (not interned: names are unique): the
    /// state, the watcher's revision map and the compiler's label index
    /// each keep a copy of every key, 250,000 at the benchmark's scale.
    pub name: IStr,
}

impl ResourceKey {
    pub fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Self {
        ResourceKey {
            kind,
            namespace: namespace.map(IStr::new),
            name: IStr::not_interned(name),
        }
    }

    /// The etcd key, in Calico's layout.
    pub fn etcd_key(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ETCD_PREFIX}{}/{ns}/{}", self.kind.plural(), self.name),
            None => format!("{ETCD_PREFIX}{}/{}", self.kind.plural(), self.name),
        }
    }

    /// Parses an etcd key in Calico's layout back into a resource key.
    pub fn from_etcd_key(key: &str) -> Option<ResourceKey> {
        let rest = key.strip_prefix(ETCD_PREFIX)?;
        let mut parts = rest.split('/');
        let kind = Kind::from_plural(parts.next()?)?;
        let a = parts.next()?;
        let b = parts.next();
        if parts.next().is_some() {
            return None;
        }
        match (kind.is_namespaced(), b) {
            (true, Some(name)) => Some(ResourceKey::new(kind, Some(a), name)),
            (false, None) => Some(ResourceKey::new(kind, None, a)),
            _ => None,
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Any resource nftpolicy reads, tagged by `kind` as in etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Resource {
    NetworkPolicy(NetworkPolicy),
    GlobalNetworkPolicy(GlobalNetworkPolicy),
    Profile(Profile),
    WorkloadEndpoint(WorkloadEndpoint),
    NetworkSet(NetworkSet),
    GlobalNetworkSet(GlobalNetworkSet),
    Tier(Tier),
    /// A node: its labels and addresses, for AdminNetworkPolicy `nodes`
    /// peers ([`crate::admin`]).
    Node(Node),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what}: not valid JSON/YAML for a Calico resource: {reason}")]
    Syntax { what: String, reason: String },
    #[error("{what}: apiVersion {found:?} is not {API_VERSION:?}")]
    ApiVersion { what: String, found: String },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::NetworkPolicy(_) => Kind::NetworkPolicy,
            Resource::GlobalNetworkPolicy(_) => Kind::GlobalNetworkPolicy,
            Resource::Profile(_) => Kind::Profile,
            Resource::WorkloadEndpoint(_) => Kind::WorkloadEndpoint,
            Resource::NetworkSet(_) => Kind::NetworkSet,
            Resource::GlobalNetworkSet(_) => Kind::GlobalNetworkSet,
            Resource::Tier(_) => Kind::Tier,
            Resource::Node(_) => Kind::Node,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::NetworkPolicy(r) => &r.metadata,
            Resource::GlobalNetworkPolicy(r) => &r.metadata,
            Resource::Profile(r) => &r.metadata,
            Resource::WorkloadEndpoint(r) => &r.metadata,
            Resource::NetworkSet(r) => &r.metadata,
            Resource::GlobalNetworkSet(r) => &r.metadata,
            Resource::Tier(r) => &r.metadata,
            Resource::Node(r) => &r.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Resource::NetworkPolicy(r) => &mut r.metadata,
            Resource::GlobalNetworkPolicy(r) => &mut r.metadata,
            Resource::Profile(r) => &mut r.metadata,
            Resource::WorkloadEndpoint(r) => &mut r.metadata,
            Resource::NetworkSet(r) => &mut r.metadata,
            Resource::GlobalNetworkSet(r) => &mut r.metadata,
            Resource::Tier(r) => &mut r.metadata,
            Resource::Node(r) => &mut r.metadata,
        }
    }

    pub fn key(&self) -> ResourceKey {
        let kind = self.kind();
        let meta = self.metadata();
        // The metadata's namespace is already interned: shared, not looked
        // up again.
        let namespace = match (&meta.namespace, kind.is_namespaced()) {
            (_, false) => None,
            (Some(ns), true) => Some(ns.clone()),
            (None, true) => Some(IStr::new("default")),
        };
        ResourceKey {
            kind,
            namespace,
            name: IStr::not_interned(&meta.name),
        }
    }

    /// Decodes a resource from JSON (the etcd value) and validates it.
    /// `what` names the source in errors (an etcd key, a file).
    pub fn from_json(what: &str, bytes: &[u8]) -> Result<Resource, DecodeError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Syntax {
                what: what.to_owned(),
                reason: e.to_string(),
            })?;
        Self::from_value(what, value)
    }

    /// Decodes a resource from YAML text and validates it.
    pub fn from_yaml(what: &str, text: &str) -> Result<Resource, DecodeError> {
        let value: serde_json::Value =
            serde_yaml::from_str(text).map_err(|e| DecodeError::Syntax {
                what: what.to_owned(),
                reason: e.to_string(),
            })?;
        Self::from_value(what, value)
    }

    /// Decodes a resource strictly (see the module docs): a valid resource;
    /// for a rejected one whose scope can be read, its stub
    /// ([`crate::reject`]); otherwise an error naming the object.
    pub fn from_value(what: &str, value: serde_json::Value) -> Result<Resource, DecodeError> {
        let described = describe_value(what, &value);
        if let Some(found) = value.get("apiVersion") {
            if found.as_str() != Some(API_VERSION) {
                return Err(DecodeError::ApiVersion {
                    what: described,
                    found: found
                        .as_str()
                        .map_or_else(|| found.to_string(), str::to_owned),
                });
            }
        }
        let problems = value
            .get("kind")
            .and_then(|k| k.as_str())
            .and_then(crate::fields::calico)
            .map(|fields| crate::fields::check(fields, &value))
            .unwrap_or_default();
        let decoded = decode_typed(&value).and_then(|r| r.validate().map(|()| r));
        let reason = match (decoded, problems.is_empty()) {
            (Ok(mut r), true) => {
                if let Resource::WorkloadEndpoint(w) = &mut r {
                    crate::serviceaccount::felix_labels(w);
                }
                return Ok(r);
            }
            (Ok(_), false) => crate::fields::describe(&problems),
            (Err(e), true) => e,
            (Err(e), false) => format!("{}; {e}", crate::fields::describe(&problems)),
        };
        crate::reject::calico_stub(&value, &reason).ok_or(DecodeError::Invalid {
            what: described,
            reason,
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("resources always serialize")
    }

    /// Checks what serde cannot: selectors parse, port ranges are ordered,
    /// ports are only used with protocols that have them.
    pub fn validate(&self) -> Result<(), String> {
        if self.metadata().name.is_empty() {
            return Err("metadata.name is empty".into());
        }
        match self {
            Resource::NetworkPolicy(p) => validate_policy_spec(&p.metadata.name, &p.spec),
            Resource::GlobalNetworkPolicy(p) => {
                validate_policy_spec(&p.metadata.name, &p.spec)?;
                if let Some(s) = &p.spec.namespace_selector {
                    parse_selector("spec.namespaceSelector", s)?;
                }
                Ok(())
            }
            Resource::Profile(p) => {
                validate_rules("spec.ingress", &p.spec.ingress)?;
                validate_rules("spec.egress", &p.spec.egress)
            }
            Resource::WorkloadEndpoint(w) => {
                if w.spec.interface_name.is_empty() {
                    return Err("spec.interfaceName is empty".into());
                }
                for p in &w.spec.ports {
                    if p.port == 0 {
                        return Err(format!("spec.ports {:?}: port 0 is not valid", p.name));
                    }
                }
                Ok(())
            }
            Resource::NetworkSet(_) | Resource::GlobalNetworkSet(_) => Ok(()),
            Resource::Tier(t) => validate_tier(t),
            Resource::Node(n) => validate_node(n),
        }
    }
}

/// libcalico-go's checks on a Tier: a name that is a DNS label, and the
/// `default` tier's order fixed at [`DEFAULT_TIER_ORDER`].
fn validate_tier(t: &Tier) -> Result<(), String> {
    let name = &t.metadata.name;
    let label_ok = name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !label_ok {
        return Err(format!(
            "metadata.name {name:?}: a tier name is a DNS label (lowercase letters, digits and '-', at most 63)"
        ));
    }
    // The built-in tiers' order and action are fixed (Calico's Tier CRD
    // rules); `default` may leave them out.
    if let Some((_, fixed, action)) = crate::admin::BUILTIN_TIERS
        .iter()
        .find(|(n, _, _)| n == name)
    {
        let order_ok = match t.spec.order {
            Some(order) => order == *fixed,
            None => name == DEFAULT_TIER,
        };
        if !order_ok {
            let order = t.spec.order.map_or("none".to_owned(), |o| o.to_string());
            return Err(format!(
                "spec.order {order}: the {name} tier's order is {fixed}"
            ));
        }
        let got = t.spec.default_action.unwrap_or_default();
        if got != *action && (name != DEFAULT_TIER || t.spec.default_action.is_some()) {
            return Err(format!(
                "spec.defaultAction {got:?}: the {name} tier's default action is {action:?}"
            ));
        }
    }
    if let Some(order) = t.spec.order {
        if !order.is_finite() {
            return Err(format!("spec.order {order} is not a number"));
        }
    }
    Ok(())
}

/// A node's addresses must be addresses (a `CalicoNodeIP` may carry its
/// prefix length, as calico-node writes it) and its labels valid.
fn validate_node(n: &Node) -> Result<(), String> {
    crate::convert::validate_labels(&n.metadata.labels)
        .map_err(|e| format!("metadata.labels: {e}"))?;
    for (i, a) in n.spec.addresses.iter().enumerate() {
        if !NODE_ADDRESS_TYPES.contains(&a.kind.as_str()) {
            return Err(format!(
                "spec.addresses[{i}].type {:?} is not one of {}",
                a.kind,
                NODE_ADDRESS_TYPES.join(", ")
            ));
        }
        node_address(&a.address).ok_or_else(|| {
            format!(
                "spec.addresses[{i}].address {:?} is not an IP address",
                a.address
            )
        })?;
    }
    Ok(())
}

/// `a.b.c.d`, `a.b.c.d/nn` (calico-node's `CalicoNodeIP`) or an IPv6
/// address, as the host net of the address.
pub fn node_address(text: &str) -> Option<IpNet> {
    let addr: std::net::IpAddr = if text.contains('/') {
        text.parse::<IpNet>().ok()?.addr()
    } else {
        text.parse().ok()?
    };
    Some(IpNet::from(addr))
}

/// serde's decoding of `value` by its `kind`, with errors naming the field
/// (`spec.ingress[0].action: unknown variant …`).
fn decode_typed(value: &serde_json::Value) -> Result<Resource, String> {
    fn typed<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, String> {
        serde_path_to_error::deserialize(value).map_err(|e| match e.path().to_string().as_str() {
            "." => e.inner().to_string(),
            path => format!("{path}: {}", e.inner()),
        })
    }
    match value.get("kind").and_then(|k| k.as_str()) {
        Some("NetworkPolicy") => typed(value).map(Resource::NetworkPolicy),
        Some("GlobalNetworkPolicy") => typed(value).map(Resource::GlobalNetworkPolicy),
        Some("Profile") => typed(value).map(Resource::Profile),
        Some("WorkloadEndpoint") => typed(value).map(Resource::WorkloadEndpoint),
        Some("NetworkSet") => typed(value).map(Resource::NetworkSet),
        Some("GlobalNetworkSet") => typed(value).map(Resource::GlobalNetworkSet),
        Some("Tier") => typed(value).map(Resource::Tier),
        Some("Node") => typed(value).map(Resource::Node),
        Some(other) => Err(format!(
            "kind {other:?} is not one nftpolicy reads ({})",
            Kind::ALL.map(Kind::name).join(", ")
        )),
        None => Err("kind is missing".into()),
    }
}

fn describe_value(what: &str, value: &serde_json::Value) -> String {
    let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("?");
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
    {
        Some(ns) => format!("{what}: {kind} {ns}/{name}"),
        None => format!("{what}: {kind} {name}"),
    }
}

fn parse_selector(field: &str, text: &str) -> Result<Selector, String> {
    Selector::parse(text).map_err(|e: SelectorError| format!("{field}: {e}"))
}

fn validate_policy_spec(name: &str, spec: &PolicySpec) -> Result<(), String> {
    parse_selector("spec.selector", &spec.selector)?;
    if let Some(s) = &spec.service_account_selector {
        parse_selector("spec.serviceAccountSelector", s)?;
    }
    validate_tiered_name(name, spec.tier())?;
    validate_rules("spec.ingress", &spec.ingress)?;
    validate_rules("spec.egress", &spec.egress)
}

/// libcalico-go's naming rule for tiered policies
/// (`names.ValidateTieredPolicyName`): a policy in tier `t` other than
/// `default` is named `t.<name>` — `foo` in tier `security` is
/// `security.foo`. In the default tier the prefix is optional (nftpolicy
/// keeps its names as they are: Kubernetes policies are `knp.default.…`).
pub fn validate_tiered_name(name: &str, tier: &str) -> Result<(), String> {
    if tier == DEFAULT_TIER || crate::admin::is_converted_name(name, tier) {
        return Ok(());
    }
    match name.strip_prefix(tier).and_then(|r| r.strip_prefix('.')) {
        Some(rest) if !rest.is_empty() => Ok(()),
        _ => Err(format!(
            "metadata.name {name:?}: a policy in tier {tier:?} must be named \"{tier}.<name>\" (Calico's tiered policy names)"
        )),
    }
}

fn validate_rules(field: &str, rules: &[Rule]) -> Result<(), String> {
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("{field}[{i}]");
        validate_icmp(&at, rule)?;
        for (side, entity) in [("source", &rule.source), ("destination", &rule.destination)] {
            let at = format!("{at}.{side}");
            for (f, s) in [
                ("selector", &entity.selector),
                ("notSelector", &entity.not_selector),
                ("namespaceSelector", &entity.namespace_selector),
            ] {
                if let Some(s) = s {
                    parse_selector(&format!("{at}.{f}"), s)?;
                }
            }
            if let Some(m) = &entity.service_accounts {
                crate::serviceaccount::validate_match(m)
                    .map_err(|e| format!("{at}.serviceAccounts.{e}"))?;
            }
            let has_ports = !entity.ports.is_empty() || !entity.not_ports.is_empty();
            if has_ports {
                match &rule.protocol {
                    Some(p) if p.has_ports() => {}
                    _ => {
                        return Err(format!(
                            "{at}: ports are only allowed with protocol TCP, UDP, SCTP or UDPLite"
                        ))
                    }
                }
            }
        }
        if let Some(v) = rule.ip_version {
            if v != 4 && v != 6 {
                return Err(format!("{at}.ipVersion: {v} is neither 4 nor 6"));
            }
        }
    }
    Ok(())
}

/// libcalico-go's rules for ICMP matches: only with protocol ICMP or
/// ICMPv6 (an ICMP match on TCP could never hold, or would be dropped and
/// widen the rule), a code only with a type (felix ignores a lone code,
/// which would widen the rule), and an ipVersion that agrees with the
/// protocol.
fn validate_icmp(at: &str, rule: &Rule) -> Result<(), String> {
    let icmp_family = |p: Option<Protocol>| match p.map(|p| Protocol::from_number(p.number())) {
        Some(Protocol::Icmp) => Some(4),
        Some(Protocol::IcmpV6) => Some(6),
        _ => None,
    };
    for (f, icmp) in [("icmp", &rule.icmp), ("notICMP", &rule.not_icmp)] {
        let Some(icmp) = icmp else { continue };
        if icmp_family(rule.protocol).is_none() {
            return Err(format!(
                "{at}.{f}: ICMP matches need protocol ICMP or ICMPv6"
            ));
        }
        if icmp.code.is_some() && icmp.icmp_type.is_none() {
            return Err(format!("{at}.{f}: a code needs a type"));
        }
    }
    for (f, p) in [
        ("protocol", rule.protocol),
        ("notProtocol", rule.not_protocol),
    ] {
        if let (Some(want), Some(v)) = (icmp_family(p), rule.ip_version) {
            if want != v {
                return Err(format!(
                    "{at}: {f} {} needs ipVersion {want}, not {v}",
                    p.expect("icmp_family is Some")
                ));
            }
        }
    }
    Ok(())
}

fn default_api_version() -> String {
    API_VERSION.to_owned()
}

fn default_api_version_shared() -> IStr {
    IStr::new(API_VERSION)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalNetworkPolicy {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Lower orders apply first; no order sorts last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    /// Empty selects everything (as `all()`).
    #[serde(default)]
    pub selector: String,
    /// GlobalNetworkPolicy only: restricts the endpoints by namespace labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    /// Restricts the endpoints by their service account's labels
    /// ([`crate::serviceaccount`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<PolicyType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
}

impl PolicySpec {
    /// The tier the policy belongs to (`default` when not given).
    pub fn tier(&self) -> &str {
        self.tier
            .as_deref()
            .filter(|t| !t.is_empty())
            .unwrap_or(DEFAULT_TIER)
    }

    /// The policy types in force: as written, or Calico's default (Ingress,
    /// plus Egress when egress rules exist).
    pub fn effective_types(&self) -> Vec<PolicyType> {
        if !self.types.is_empty() {
            return self.types.clone();
        }
        let mut t = vec![PolicyType::Ingress];
        if !self.egress.is_empty() {
            t.push(PolicyType::Egress);
        }
        t
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Pass,
    Log,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpFields>,
    #[serde(default, rename = "notICMP", skip_serializing_if = "Option::is_none")]
    pub not_icmp: Option<IcmpFields>,
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub source: EntityRule,
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub destination: EntityRule,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IcmpFields {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_nets: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    /// Endpoints by service account: names and/or a selector over the
    /// account's labels ([`crate::serviceaccount`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<ServiceAccountMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<Port>,
}

impl EntityRule {
    pub fn is_empty(&self) -> bool {
        self == &EntityRule::default()
    }
}

/// A rule's `serviceAccounts`: endpoints whose service account is one of
/// `names` and whose account's labels match `selector` (both, when both
/// are given; neither restricts anything, as in Calico).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// An IP protocol, by Calico name or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    IcmpV6,
    Sctp,
    UdpLite,
    Number(u8),
}

impl Protocol {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp => 1,
            Protocol::IcmpV6 => 58,
            Protocol::Sctp => 132,
            Protocol::UdpLite => 136,
            Protocol::Number(n) => n,
        }
    }

    /// The named variant for a number, so `6` and `TCP` compare equal.
    pub fn from_number(n: u8) -> Protocol {
        match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            1 => Protocol::Icmp,
            58 => Protocol::IcmpV6,
            132 => Protocol::Sctp,
            136 => Protocol::UdpLite,
            n => Protocol::Number(n),
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(
            Protocol::from_number(self.number()),
            Protocol::Tcp | Protocol::Udp | Protocol::Sctp | Protocol::UdpLite
        )
    }

    pub fn name(self) -> String {
        match self {
            Protocol::Tcp => "TCP".into(),
            Protocol::Udp => "UDP".into(),
            Protocol::Icmp => "ICMP".into(),
            Protocol::IcmpV6 => "ICMPv6".into(),
            Protocol::Sctp => "SCTP".into(),
            Protocol::UdpLite => "UDPLite".into(),
            Protocol::Number(n) => n.to_string(),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "TCP" | "tcp" => Protocol::Tcp,
            "UDP" | "udp" => Protocol::Udp,
            "ICMP" | "icmp" => Protocol::Icmp,
            "ICMPv6" | "icmpv6" => Protocol::IcmpV6,
            "SCTP" | "sctp" => Protocol::Sctp,
            "UDPLite" | "udplite" => Protocol::UdpLite,
            other => match other.parse::<u8>() {
                Ok(n) if n > 0 => Protocol::from_number(n),
                _ => return Err(format!("unknown protocol {other:?}")),
            },
        })
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Protocol::Number(n) => s.serialize_u8(*n),
            p => s.serialize_str(&p.name()),
        }
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) if (1..=255).contains(&n) => Ok(Protocol::from_number(n as u8)),
            Raw::N(n) => Err(serde::de::Error::custom(format!(
                "protocol number {n} out of range 1-255"
            ))),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A port in a rule: a number, an inclusive range `"a:b"`, or a named port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Port {
    Range { min: u16, max: u16 },
    Named(String),
}

impl Port {
    pub fn single(p: u16) -> Port {
        Port::Range { min: p, max: p }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Port::Range { min, max } if min == max => write!(f, "{min}"),
            Port::Range { min, max } => write!(f, "{min}:{max}"),
            Port::Named(n) => f.write_str(n),
        }
    }
}

impl FromStr for Port {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let num = |t: &str| -> Result<u16, String> {
            match t.trim().parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                Ok(n) => Err(format!("port {n} out of range 1-65535")),
                Err(_) => Err(format!("invalid port number {t:?}")),
            }
        };
        if let Some((a, b)) = s.split_once(':') {
            let (min, max) = (num(a)?, num(b)?);
            if min > max {
                return Err(format!("port range {s:?}: start is above end"));
            }
            return Ok(Port::Range { min, max });
        }
        if s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() {
            return Ok(Port::single(num(s)?));
        }
        validate_port_name(s)?;
        Ok(Port::Named(s.to_owned()))
    }
}

/// Kubernetes IANA_SVC_NAME: 1-15 chars, lowercase alphanumerics and '-', at
/// least one letter, no leading/trailing/double '-'.
pub fn validate_port_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid port name {s:?} (1-15 lowercase letters, digits and '-', at least one letter)"
        ))
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Port::Range { min, max } if min == max => s.serialize_u16(*min),
            p => s.serialize_str(&p.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) if (1..=65535).contains(&n) => Ok(Port::single(n as u16)),
            Raw::N(n) => Err(serde::de::Error::custom(format!(
                "port {n} out of range 1-65535"
            ))),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A policy tier: tiers apply in `order` (none: last), then by name; a
/// policy's `Pass` and the end of a tier with `defaultAction: Pass` go on to
/// the next tier. The `default` tier exists whether or not it is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tier {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TierSpec,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TierSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    /// What happens at the end of the tier to a packet that policies of
    /// the tier selected but none decided: Deny (Calico's default) or Pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<TierAction>,
}

/// A tier's `defaultAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum TierAction {
    #[default]
    Deny,
    Pass,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ProfileSpec,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels_to_apply: Labels,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEndpoint {
    #[serde(default = "default_api_version_shared")]
    pub api_version: IStr,
    pub metadata: ObjectMeta,
    pub spec: WorkloadEndpointSpec,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEndpointSpec {
    #[serde(default)]
    pub orchestrator: IStr,
    #[serde(default)]
    pub workload: IStr,
    pub node: IStr,
    #[serde(default, rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub endpoint: IStr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<IStr>,
    #[serde(default, rename = "ipNetworks")]
    pub ip_networks: Vec<IpNet>,
    #[serde(default)]
    pub profiles: Vec<IStr>,
    pub interface_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    pub name: IStr,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSet {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NetworkSetSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalNetworkSet {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NetworkSetSpec,
}

/// A Calico v3 Node, as calico-node keeps it (`…/nodes/<name>`): what a
/// `nodes` peer needs of it, its labels and its addresses. The Kubernetes
/// Node converts into it ([`crate::convert`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    #[serde(default = "default_api_version")]
    pub api_version: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NodeSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
}

/// Address types of a Calico Node (`CalicoNodeIP`, the Kubernetes node's
/// `InternalIP` and `ExternalIP`).
pub const NODE_ADDRESS_TYPES: [&str; 3] = ["CalicoNodeIP", "InternalIP", "ExternalIP"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddress {
    pub address: String,
    #[serde(rename = "type")]
    pub kind: String,
}

impl Node {
    /// The node's addresses as host nets (`/32`, `/128`), each once, in
    /// order: what a `nodes` peer matches.
    pub fn nets(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = Vec::new();
        for a in &self.spec.addresses {
            if let Some(net) = node_address(&a.address) {
                if !out.contains(&net) {
                    out.push(net);
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSetSpec {
    #[serde(default)]
    pub nets: Vec<IpNet>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_keys_round_trip() {
        let k = ResourceKey::new(Kind::NetworkPolicy, Some("default"), "knp.default.web");
        assert_eq!(
            k.etcd_key(),
            "/calico/resources/v3/projectcalico.org/networkpolicies/default/knp.default.web"
        );
        assert_eq!(ResourceKey::from_etcd_key(&k.etcd_key()), Some(k));
        let g = ResourceKey::new(Kind::Profile, None, "kns.default");
        assert_eq!(ResourceKey::from_etcd_key(&g.etcd_key()), Some(g));
        assert_eq!(
            ResourceKey::from_etcd_key("/calico/resources/v3/projectcalico.org/profiles/a/b"),
            None
        );
    }

    #[test]
    fn decodes_a_policy_and_rejects_unknown_values() {
        let json = r#"{"apiVersion":"projectcalico.org/v3","kind":"NetworkPolicy",
            "metadata":{"name":"p","namespace":"ns"},
            "spec":{"order":100,"selector":"app == 'web'","types":["Ingress"],
              "ingress":[{"action":"Allow","protocol":"TCP",
                "source":{"nets":["198.18.0.0/16"],"notNets":["198.18.1.0/24"]},
                "destination":{"ports":[80,"8000:8080","http"]}}]}}"#;
        let r = Resource::from_json("test", json.as_bytes()).unwrap();
        let Resource::NetworkPolicy(p) = &r else {
            panic!()
        };
        assert_eq!(
            p.spec.ingress[0].destination.ports,
            vec![
                Port::single(80),
                Port::Range {
                    min: 8000,
                    max: 8080
                },
                Port::Named("http".into())
            ]
        );
        // serialize → decode is the identity
        assert_eq!(
            Resource::from_json("again", r.to_json().as_bytes()).unwrap(),
            r
        );

        // A bad value rejects the policy; its selector still reads, so it
        // decodes into a stub naming the reason (crate::reject).
        let rejected = |bad: String| -> String {
            let r = Resource::from_json("k", bad.as_bytes()).unwrap();
            assert_eq!(
                r.key(),
                ResourceKey::new(Kind::NetworkPolicy, Some("ns"), "p")
            );
            r.metadata().rejection().expect("rejected").to_owned()
        };
        let why = rejected(json.replace("\"Allow\"", "\"Permit\""));
        assert!(
            why.contains("spec.ingress[0].action") && why.contains("Permit"),
            "{why}"
        );
        let why = rejected(json.replace("8000:8080", "8080:8000"));
        assert!(why.contains("start is above end"), "{why}");
        let why = rejected(json.replace("\"TCP\"", "\"ICMP\""));
        assert!(why.contains("ports are only allowed"), "{why}");
        let why = rejected(json.replace("\"types\"", "\"type\""));
        assert_eq!(why, "spec.type: unknown field");

        // A selector that does not parse: nothing to fail closed on.
        let bad = json.replace("app == 'web'", "app = 'web'");
        let err = Resource::from_json("key1", bad.as_bytes()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("key1: NetworkPolicy ns/p: spec.selector"),
            "{err}"
        );
    }

    #[test]
    fn icmp_matches_follow_libcalico_validation() {
        let rule = |r: &str| {
            let json = format!(
                r#"{{"apiVersion":"projectcalico.org/v3","kind":"GlobalNetworkPolicy",
                    "metadata":{{"name":"g"}},"spec":{{"ingress":[{r}]}}}}"#
            );
            let r = Resource::from_json("k", json.as_bytes()).unwrap();
            r.metadata().rejection().map(str::to_owned)
        };
        assert_eq!(
            rule(r#"{"action":"Allow","protocol":"ICMP","icmp":{"type":8}}"#),
            None
        );
        assert_eq!(
            rule(
                r#"{"action":"Allow","protocol":"ICMPv6","ipVersion":6,"icmp":{"type":128,"code":0}}"#
            ),
            None
        );
        for (r, want) in [
            (
                r#"{"action":"Allow","protocol":"TCP","icmp":{"type":8}}"#,
                "need protocol ICMP",
            ),
            (
                r#"{"action":"Allow","icmp":{"type":8}}"#,
                "need protocol ICMP",
            ),
            (
                r#"{"action":"Allow","protocol":"ICMP","icmp":{"code":0}}"#,
                "a code needs a type",
            ),
            (
                r#"{"action":"Allow","protocol":"ICMP","ipVersion":6}"#,
                "needs ipVersion 4",
            ),
            (
                r#"{"action":"Allow","notProtocol":"ICMPv6","ipVersion":4}"#,
                "needs ipVersion 6",
            ),
        ] {
            let why = rule(r).expect(r);
            assert!(why.contains(want), "{r}: {why}");
        }
    }

    #[test]
    fn tiers_decode_strictly_and_tiered_policies_carry_their_prefix() {
        let tier = |spec: &str| {
            Resource::from_json(
                "k",
                format!(
                    r#"{{"apiVersion":"projectcalico.org/v3","kind":"Tier","metadata":{{"name":"security"}},"spec":{spec}}}"#
                )
                .as_bytes(),
            )
        };
        let Ok(Resource::Tier(t)) = tier(r#"{"order":100,"defaultAction":"Pass"}"#) else {
            panic!()
        };
        assert_eq!(t.spec.order, Some(100.0));
        assert_eq!(t.spec.default_action, Some(TierAction::Pass));
        assert_eq!(
            ResourceKey::from_etcd_key("/calico/resources/v3/projectcalico.org/tiers/security"),
            Some(ResourceKey::new(Kind::Tier, None, "security"))
        );
        // No stub for a Tier: an unknown field or action is an error, and
        // its policies are then in a missing tier (rejected, fail closed).
        for bad in [
            r#"{"defaultAction":"Allow"}"#,
            r#"{"order":1,"colour":"red"}"#,
        ] {
            let err = tier(bad).unwrap_err().to_string();
            assert!(err.starts_with("k: Tier security: "), "{err}");
        }
        let err = Resource::from_json(
            "k",
            br#"{"apiVersion":"projectcalico.org/v3","kind":"Tier","metadata":{"name":"default"},"spec":{"order":5}}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("the default tier's order is 1000000"),
            "{err}"
        );

        let gnp = |name: &str, tier: &str| {
            let json = format!(
                r#"{{"apiVersion":"projectcalico.org/v3","kind":"GlobalNetworkPolicy",
                    "metadata":{{"name":"{name}"}},"spec":{{"tier":"{tier}","selector":"all()"}}}}"#
            );
            Resource::from_json("k", json.as_bytes())
                .unwrap()
                .metadata()
                .rejection()
                .map(str::to_owned)
        };
        assert_eq!(gnp("security.block", "security"), None);
        assert_eq!(gnp("block", "default"), None);
        assert_eq!(gnp("default.block", "default"), None);
        for (name, tier) in [
            ("block", "security"),
            ("other.block", "security"),
            ("security.", "security"),
        ] {
            let why = gnp(name, tier).expect(name);
            assert!(why.contains("must be named \"security.<name>\""), "{why}");
        }
        assert!(is_ignored_kind("StagedNetworkPolicy") && !is_ignored_kind("Tier"));
    }

    #[test]
    fn protocols_by_name_and_number_are_equal() {
        assert_eq!("6".parse::<Protocol>().unwrap(), Protocol::Tcp);
        assert!("FOO".parse::<Protocol>().is_err());
        assert!("0".parse::<Protocol>().is_err());
    }
}
