//! The cluster as Calico sees it: a set of v3 resources, plus the resolution
//! every consumer shares — which policies apply to an endpoint and in what
//! order, what a rule's selectors mean once namespaces are taken into
//! account, which addresses a selector's IP set holds.
//!
//! Both the reference semantics and the compiler go through this module, so
//! that the oracle and the dataplane cannot disagree on what a selector means.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::calico::{
    self, Action, IcmpFields, Kind, PolicySpec, PolicyType, Port, Protocol, Resource, ResourceKey,
    Rule, WorkloadEndpoint,
};
use crate::convert::K8S_POLICY_PREFIX;
use crate::selector::{LabelView, Labels, Selector};

/// Every resource, keyed by kind, namespace and name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    resources: BTreeMap<ResourceKey, Resource>,
}

impl ClusterState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a resource; returns the one it replaced.
    pub fn upsert(&mut self, r: Resource) -> Option<Resource> {
        self.resources.insert(r.key(), r)
    }

    pub fn remove(&mut self, key: &ResourceKey) -> Option<Resource> {
        self.resources.remove(key)
    }

    pub fn get(&self, key: &ResourceKey) -> Option<&Resource> {
        self.resources.get(key)
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    pub fn resources(&self) -> impl Iterator<Item = &Resource> {
        self.resources.values()
    }

    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Resource> {
        self.resources
            .range(ResourceKey::new(kind, None, "")..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, r)| r)
    }

    pub fn workload_endpoints(&self) -> impl Iterator<Item = &WorkloadEndpoint> {
        self.of_kind(Kind::WorkloadEndpoint)
            .filter_map(|r| match r {
                Resource::WorkloadEndpoint(w) => Some(w),
                _ => None,
            })
    }

    pub fn profile(&self, name: &str) -> Option<&calico::Profile> {
        match self.get(&ResourceKey::new(Kind::Profile, None, name)) {
            Some(Resource::Profile(p)) => Some(p),
            _ => None,
        }
    }

    /// The endpoint that owns `ip`, if any.
    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<&WorkloadEndpoint> {
        self.workload_endpoints()
            .find(|w| w.spec.ip_networks.iter().any(|n| n.contains(&ip)))
    }

    /// Labels a selector sees on an endpoint: those its profiles apply
    /// (`pcns.*` for Kubernetes namespaces), overridden by its own.
    pub fn endpoint_labels(&self, w: &WorkloadEndpoint) -> Labels {
        let mut labels = Labels::new();
        for p in &w.spec.profiles {
            if let Some(profile) = self.profile(p) {
                labels.extend(profile.spec.labels_to_apply.clone());
            }
        }
        labels.extend(w.metadata.labels.clone());
        labels
    }

    /// Everything with addresses a selector can match: endpoints and
    /// network sets, with the labels a selector sees on each.
    pub fn labelled_nets(&self) -> Vec<LabelledNets<'_>> {
        // Profiles looked up once, not once per endpoint: this runs over
        // every endpoint in the cluster on each full compile.
        let profiles: std::collections::HashMap<&str, &Labels> = self
            .of_kind(Kind::Profile)
            .filter_map(|r| match r {
                Resource::Profile(p) => Some((p.metadata.name.as_str(), &p.spec.labels_to_apply)),
                _ => None,
            })
            .collect();
        self.resources()
            .filter_map(|r| match r {
                Resource::WorkloadEndpoint(w) => {
                    let inherited = w
                        .spec
                        .profiles
                        .iter()
                        .filter_map(|p| profiles.get(p.as_str()).copied())
                        .collect();
                    Some(LabelledNets {
                        labels: LabelView::Layered {
                            own: &w.metadata.labels,
                            inherited,
                        },
                        nets: &w.spec.ip_networks,
                        endpoint: Some(w),
                    })
                }
                _ => self.labelled(r),
            })
            .collect()
    }

    /// `r` as a selector sees it, if it has addresses (an endpoint or a
    /// network set); `r` need not be in the state (an incremental compile
    /// passes the value a change replaced), but its labels are resolved
    /// against the profiles in the state.
    pub fn labelled<'a>(&'a self, r: &'a Resource) -> Option<LabelledNets<'a>> {
        match r {
            Resource::WorkloadEndpoint(w) => Some(LabelledNets {
                labels: LabelView::Owned(self.endpoint_labels(w)),
                nets: &w.spec.ip_networks,
                endpoint: Some(w),
            }),
            Resource::NetworkSet(s) => {
                let mut labels = s.metadata.labels.clone();
                labels.insert(
                    calico::LABEL_NAMESPACE.into(),
                    s.metadata.namespace.clone().unwrap_or_default(),
                );
                Some(LabelledNets {
                    labels: LabelView::Owned(labels),
                    nets: &s.spec.nets,
                    endpoint: None,
                })
            }
            Resource::GlobalNetworkSet(s) => Some(LabelledNets {
                labels: LabelView::Layered {
                    own: &s.metadata.labels,
                    inherited: vec![],
                },
                nets: &s.spec.nets,
                endpoint: None,
            }),
            _ => None,
        }
    }

    /// The policies, each resolved (selectors parsed and namespace-scoped).
    /// Resources were validated when decoded, so resolution cannot fail here
    /// except for a resource built in code; such a policy is skipped with
    /// its error returned beside the list.
    pub fn resolved_policies(&self) -> (Vec<ResolvedPolicy>, Vec<(ResourceKey, String)>) {
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        for r in self.resources() {
            let (spec, id) = match r {
                Resource::NetworkPolicy(p) => (
                    &p.spec,
                    PolicyId::namespaced(
                        p.metadata.namespace.as_deref().unwrap_or("default"),
                        &p.metadata.name,
                    ),
                ),
                Resource::GlobalNetworkPolicy(p) => {
                    (&p.spec, PolicyId::Global(p.metadata.name.clone()))
                }
                _ => continue,
            };
            match ResolvedPolicy::new(id, spec) {
                Ok(p) => ok.push(p),
                Err(e) => errors.push((r.key(), e)),
            }
        }
        ok.sort_by(|a, b| a.sort_key().partial_cmp(&b.sort_key()).unwrap());
        (ok, errors)
    }
}

/// Something with addresses and labels: an endpoint or a network set.
#[derive(Debug, Clone)]
pub struct LabelledNets<'a> {
    pub labels: LabelView<'a>,
    pub nets: &'a [IpNet],
    pub endpoint: Option<&'a WorkloadEndpoint>,
}

/// A policy's identity, as used in chain names (`cali-pi-<id>`).
///
/// Kubernetes policies keep the Calico v2.5 id `<namespace>.<name>` (so
/// `web-deny-all` in `default` is `cali-pi-default.web-deny-all`). Calico
/// policies get ids containing `/`, which no Kubernetes name or namespace may
/// contain: `ns/<namespace>/<name>` (two slashes) for a NetworkPolicy and
/// `gnp/<name>` (one slash) for a GlobalNetworkPolicy. So the three kinds
/// can never collide, whatever the names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyId {
    /// A Kubernetes NetworkPolicy (`knp.default.<name>` in Calico).
    Kubernetes { namespace: String, name: String },
    /// A Calico NetworkPolicy.
    Namespaced { namespace: String, name: String },
    /// A Calico GlobalNetworkPolicy.
    Global(String),
}

impl PolicyId {
    /// The id of Calico NetworkPolicy `name` in `namespace`, recognising the
    /// converted Kubernetes ones by their `knp.default.` prefix.
    pub fn namespaced(namespace: &str, name: &str) -> PolicyId {
        match name.strip_prefix(K8S_POLICY_PREFIX) {
            Some(k8s) => PolicyId::Kubernetes {
                namespace: namespace.into(),
                name: k8s.into(),
            },
            None => PolicyId::Namespaced {
                namespace: namespace.into(),
                name: name.into(),
            },
        }
    }

    /// The Calico resource this id stands for.
    pub fn resource_key(&self) -> ResourceKey {
        match self {
            PolicyId::Kubernetes { namespace, name } => ResourceKey::new(
                Kind::NetworkPolicy,
                Some(namespace),
                &format!("{K8S_POLICY_PREFIX}{name}"),
            ),
            PolicyId::Namespaced { namespace, name } => {
                ResourceKey::new(Kind::NetworkPolicy, Some(namespace), name)
            }
            PolicyId::Global(name) => ResourceKey::new(Kind::GlobalNetworkPolicy, None, name),
        }
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyId::Kubernetes { namespace, name } => write!(f, "{namespace}.{name}"),
            PolicyId::Namespaced { namespace, name } => write!(f, "ns/{namespace}/{name}"),
            PolicyId::Global(name) => write!(f, "gnp/{name}"),
        }
    }
}

/// A policy with its selectors parsed and scoped.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedPolicy {
    pub id: PolicyId,
    pub order: Option<f64>,
    /// Which endpoints it applies to (namespace scoping included).
    pub selector: Selector,
    pub types: Vec<PolicyType>,
    pub ingress: Vec<ResolvedRule>,
    pub egress: Vec<ResolvedRule>,
}

impl ResolvedPolicy {
    pub fn new(id: PolicyId, spec: &PolicySpec) -> Result<ResolvedPolicy, String> {
        let namespace = match &id {
            PolicyId::Kubernetes { namespace, .. } | PolicyId::Namespaced { namespace, .. } => {
                Some(namespace.as_str())
            }
            PolicyId::Global(_) => None,
        };
        let parse =
            |field: &str, s: &str| Selector::parse(s).map_err(|e| format!("{id}: {field}: {e}"));
        let mut selector = parse("spec.selector", &spec.selector)?;
        match namespace {
            Some(ns) => selector = namespace_is(ns).and(&selector),
            None => {
                if let Some(ns_sel) = &spec.namespace_selector {
                    let ns_sel = parse("spec.namespaceSelector", ns_sel)?;
                    selector = scoped_namespace_selector(&ns_sel).and(&selector);
                }
            }
        }
        let rules = |field: &str, rules: &[Rule]| -> Result<Vec<ResolvedRule>, String> {
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    ResolvedRule::new(r, namespace).map_err(|e| format!("{id}: {field}[{i}]: {e}"))
                })
                .collect()
        };
        Ok(ResolvedPolicy {
            id: id.clone(),
            order: spec.order,
            selector,
            types: spec.effective_types(),
            ingress: rules("spec.ingress", &spec.ingress)?,
            egress: rules("spec.egress", &spec.egress)?,
        })
    }

    /// Felix's order: by `order` ascending (none last), then by id.
    pub fn sort_key(&self) -> (f64, String) {
        (self.order.unwrap_or(f64::INFINITY), self.id.to_string())
    }

    pub fn applies(&self, dir: PolicyType) -> bool {
        self.types.contains(&dir)
    }

    pub fn rules(&self, dir: PolicyType) -> &[ResolvedRule] {
        match dir {
            PolicyType::Ingress => &self.ingress,
            PolicyType::Egress => &self.egress,
        }
    }
}

/// `projectcalico.org/namespace == '<ns>'`.
pub fn namespace_is(ns: &str) -> Selector {
    Selector::parse(&format!("{} == '{ns}'", calico::LABEL_NAMESPACE))
        .expect("namespace names are valid label values")
}

/// A namespaceSelector as written (`user == 'bob'`) → a selector over
/// endpoint labels (`pcns.user == "bob"`). `all()` means every namespaced
/// thing, so it becomes `has(projectcalico.org/namespace)`, which global
/// network sets do not match.
pub fn scoped_namespace_selector(ns_sel: &Selector) -> Selector {
    if ns_sel.is_all() {
        Selector::parse(&format!("has({})", calico::LABEL_NAMESPACE)).expect("valid")
    } else {
        ns_sel.with_label_prefix(calico::NAMESPACE_LABEL_PREFIX)
    }
}

/// A rule with its entity selectors scoped to the policy's namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedRule {
    pub action: Action,
    pub ip_version: Option<u8>,
    pub protocol: Option<Protocol>,
    pub not_protocol: Option<Protocol>,
    pub icmp: Option<IcmpFields>,
    pub not_icmp: Option<IcmpFields>,
    pub source: ResolvedEntity,
    pub destination: ResolvedEntity,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResolvedEntity {
    /// Selector and namespaceSelector combined, as libcalico-go does.
    pub selector: Option<Selector>,
    pub not_selector: Option<Selector>,
    pub nets: Vec<IpNet>,
    pub not_nets: Vec<IpNet>,
    pub ports: Vec<Port>,
    pub not_ports: Vec<Port>,
}

impl ResolvedRule {
    pub fn new(rule: &Rule, namespace: Option<&str>) -> Result<ResolvedRule, String> {
        Ok(ResolvedRule {
            action: rule.action,
            ip_version: rule.ip_version,
            protocol: rule.protocol,
            not_protocol: rule.not_protocol,
            icmp: rule.icmp.clone(),
            not_icmp: rule.not_icmp.clone(),
            source: ResolvedEntity::new(&rule.source, namespace)
                .map_err(|e| format!("source.{e}"))?,
            destination: ResolvedEntity::new(&rule.destination, namespace)
                .map_err(|e| format!("destination.{e}"))?,
        })
    }
}

impl ResolvedEntity {
    /// libcalico-go's rule conversion: a namespaceSelector picks namespaces
    /// by their labels (`pcns.` prefix); without one, a selector in a
    /// namespaced policy only sees its own namespace.
    pub fn new(e: &calico::EntityRule, namespace: Option<&str>) -> Result<ResolvedEntity, String> {
        let parse = |field: &str, s: &Option<String>| -> Result<Option<Selector>, String> {
            s.as_deref()
                .map(|s| Selector::parse(s).map_err(|err| format!("{field}: {err}")))
                .transpose()
        };
        let sel = parse("selector", &e.selector)?;
        let not_sel = parse("notSelector", &e.not_selector)?;
        let ns_sel = parse("namespaceSelector", &e.namespace_selector)?;
        let scope = match (&ns_sel, namespace) {
            (Some(ns_sel), _) => Some(scoped_namespace_selector(ns_sel)),
            (None, Some(ns)) => Some(namespace_is(ns)),
            (None, None) => None,
        };
        let combine = |s: Option<Selector>, explicit_ns: bool| match (s, &scope) {
            (Some(s), Some(scope)) => Some(scope.and(&s)),
            (Some(s), None) => Some(s),
            // A namespaceSelector alone selects whole namespaces.
            (None, Some(scope)) if explicit_ns => Some(scope.clone()),
            (None, _) => None,
        };
        Ok(ResolvedEntity {
            selector: combine(sel, ns_sel.is_some()),
            not_selector: combine(not_sel, false),
            nets: e.nets.clone(),
            not_nets: e.not_nets.clone(),
            ports: e.ports.clone(),
            not_ports: e.not_ports.clone(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self == &ResolvedEntity::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_ids_never_collide() {
        let ids = [
            PolicyId::namespaced("default", "knp.default.web-deny-all"),
            PolicyId::namespaced("default", "web-deny-all"),
            PolicyId::Global("default.web-deny-all".into()),
            PolicyId::namespaced("gnp", "knp.default.x"),
            PolicyId::namespaced("gnp", "x"),
            PolicyId::Global("x".into()),
        ];
        let texts: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            texts,
            [
                "default.web-deny-all",
                "ns/default/web-deny-all",
                "gnp/default.web-deny-all",
                "gnp.x",
                "ns/gnp/x",
                "gnp/x"
            ]
        );
        let unique: std::collections::BTreeSet<_> = texts.iter().collect();
        assert_eq!(unique.len(), texts.len());
    }

    #[test]
    fn entity_selectors_are_namespace_scoped() {
        let e = calico::EntityRule {
            selector: Some("role == 'db'".into()),
            ..Default::default()
        };
        let r = ResolvedEntity::new(&e, Some("shop")).unwrap();
        assert_eq!(
            r.selector.unwrap().canonical(),
            Selector::parse("projectcalico.org/namespace == 'shop' && role == 'db'")
                .unwrap()
                .canonical()
        );
        let e = calico::EntityRule {
            namespace_selector: Some("user == 'bob'".into()),
            ..Default::default()
        };
        let r = ResolvedEntity::new(&e, Some("shop")).unwrap();
        assert_eq!(
            r.selector.unwrap().canonical(),
            Selector::parse("pcns.user == 'bob'").unwrap().canonical()
        );
        // No selector at all: any source, whatever the namespace.
        let r = ResolvedEntity::new(&calico::EntityRule::default(), Some("shop")).unwrap();
        assert!(r.selector.is_none());
    }
}
