//! The cluster as Calico sees it: a set of v3 resources, plus the resolution
//! every consumer shares — which policies apply to an endpoint and in what
//! order, what a rule's selectors mean once namespaces are taken into
//! account, which addresses a selector's IP set holds.
//!
//! Both the reference semantics and the compiler go through this module, so
//! that the oracle and the dataplane cannot disagree on what a selector means.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::calico::{
    self, Action, IcmpFields, Kind, PolicySpec, PolicyType, Port, Protocol, Resource, ResourceKey,
    Rule, TierAction,
};
use crate::convert::{namespace_profile_name, K8S_POLICY_PREFIX};
use crate::endpoint::{Endpoint, EndpointFacts};
use crate::labels::IStr;
use crate::selector::{LabelView, Labels, Selector};

/// Every resource, keyed by kind, namespace and name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    /// Every kind but workload endpoints. Boxed: a `Resource` is as large
    /// as its largest kind (424 bytes), and a B-tree leaf holds eleven
    /// entries whether full or not; a boxed entry costs the tree 8 bytes.
    resources: BTreeMap<ResourceKey, Box<Resource>>,
    /// Workload endpoints, one per pod: what the dataplane reads of each
    /// ([`Endpoint`]), not the Calico resource.
    endpoints: BTreeMap<ResourceKey, Box<Endpoint>>,
}

/// One object of the state, as it is kept (an endpoint with its key,
/// which holds its name and namespace).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Entry<'a> {
    Resource(&'a Resource),
    Endpoint(&'a ResourceKey, &'a Endpoint),
}

impl Entry<'_> {
    /// The resource, an endpoint rebuilt from what the state kept
    /// ([`Endpoint::to_workload_endpoint`]).
    pub fn to_resource(self) -> Resource {
        match self {
            Entry::Resource(r) => r.clone(),
            Entry::Endpoint(k, e) => Resource::WorkloadEndpoint(e.to_workload_endpoint(k)),
        }
    }
}

/// Puts `value` at `key` in `map`; `replaced` is told the key, the value
/// that was there and the new one, and its answer returned (`None` if
/// there was none).
fn replace<V, R>(
    map: &mut BTreeMap<ResourceKey, Box<V>>,
    key: ResourceKey,
    value: V,
    replaced: impl FnOnce(&ResourceKey, V, &V) -> R,
) -> Option<R> {
    match map.entry(key) {
        std::collections::btree_map::Entry::Occupied(mut held) => {
            let old = std::mem::replace(&mut **held.get_mut(), value);
            Some(replaced(held.key(), old, held.get()))
        }
        std::collections::btree_map::Entry::Vacant(slot) => {
            slot.insert(Box::new(value));
            None
        }
    }
}

impl ClusterState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a resource; returns the one it replaced (an
    /// endpoint as the state kept it: [`Endpoint::to_workload_endpoint`]).
    pub fn upsert(&mut self, r: Resource) -> Option<Resource> {
        match r {
            Resource::WorkloadEndpoint(w) => {
                let (key, ep) = Endpoint::split(w);
                replace(&mut self.endpoints, key, ep, |key, old, _| {
                    Resource::WorkloadEndpoint(old.to_workload_endpoint(key))
                })
            }
            r => replace(&mut self.resources, r.key(), r, |_, old, _| old),
        }
    }

    /// Rebuilds the maps with full B-tree nodes. Keys inserted in order (a
    /// datastore's first list is in key order) leave each node about half
    /// full: at 250,000 pods the endpoint map's nodes take 23 MiB instead
    /// of 12. The agent calls this once the first list is in.
    pub fn compact(&mut self) {
        // Collecting from a sorted iterator builds the tree bottom-up,
        // every node full; the old one is freed node by node as it is read.
        self.endpoints = std::mem::take(&mut self.endpoints).into_iter().collect();
        self.resources = std::mem::take(&mut self.resources).into_iter().collect();
    }

    /// Adds or replaces a resource; whether what the state keeps of it
    /// changed ([`ClusterState::upsert`] without rebuilding the old one).
    pub fn put(&mut self, r: Resource) -> bool {
        self.put_at(r.key(), r)
    }

    /// [`ClusterState::put`] under `key`, which is `r`'s: a new object
    /// keeps this very key, whose name is then shared with the copies the
    /// caller holds (the etcd watcher keeps one of every key).
    pub fn put_at(&mut self, key: ResourceKey, r: Resource) -> bool {
        debug_assert_eq!(key, r.key());
        match r {
            Resource::WorkloadEndpoint(w) => replace(
                &mut self.endpoints,
                key,
                Endpoint::kept_of(w),
                |_, old, new| old != *new,
            ),
            r => replace(&mut self.resources, key, r, |_, old, new| old != *new),
        }
        .unwrap_or(true)
    }

    pub fn remove(&mut self, key: &ResourceKey) -> Option<Resource> {
        if key.kind == Kind::WorkloadEndpoint {
            self.endpoints
                .remove_entry(key)
                .map(|(key, old)| Resource::WorkloadEndpoint(old.to_workload_endpoint(&key)))
        } else {
            self.resources.remove(key).map(|old| *old)
        }
    }

    /// The object at `key`, as kept.
    pub fn entry(&self, key: &ResourceKey) -> Option<Entry<'_>> {
        if key.kind == Kind::WorkloadEndpoint {
            self.endpoints
                .get_key_value(key)
                .map(|(k, e)| Entry::Endpoint(k, e))
        } else {
            self.resources.get(key).map(|r| Entry::Resource(r))
        }
    }

    /// The resource at `key`; an endpoint is rebuilt from what the state
    /// kept ([`Endpoint::to_workload_endpoint`]).
    pub fn get(&self, key: &ResourceKey) -> Option<Cow<'_, Resource>> {
        self.entry(key).map(|e| match e {
            Entry::Resource(r) => Cow::Borrowed(r),
            Entry::Endpoint(..) => Cow::Owned(e.to_resource()),
        })
    }

    pub fn endpoint(&self, key: &ResourceKey) -> Option<&Endpoint> {
        self.endpoints.get(key).map(|e| &**e)
    }

    /// Whether the state already keeps `r` as it is: a change to a field
    /// it does not keep is no change.
    pub fn holds(&self, r: &Resource) -> bool {
        match r {
            Resource::WorkloadEndpoint(w) => {
                let (key, ep) = Endpoint::split(w.clone());
                self.endpoint(&key) == Some(&ep)
            }
            r => self
                .resources
                .get(&r.key())
                .is_some_and(|held| **held == *r),
        }
    }

    pub fn len(&self) -> usize {
        self.resources.len() + self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.endpoints.is_empty()
    }

    /// Every object with its key, in key order (kind, namespace, name).
    pub fn entries(&self) -> impl Iterator<Item = (&ResourceKey, Entry<'_>)> {
        let first_endpoint = ResourceKey::new(Kind::WorkloadEndpoint, None, "");
        let before = self
            .resources
            .range(..first_endpoint.clone())
            .map(|(k, r)| (k, Entry::Resource(r)));
        let after = self
            .resources
            .range(first_endpoint..)
            .map(|(k, r)| (k, Entry::Resource(r)));
        before
            .chain(
                self.endpoints
                    .iter()
                    .map(|(k, e)| (k, Entry::Endpoint(k, e))),
            )
            .chain(after)
    }

    /// Every resource in key order, endpoints rebuilt from what the state
    /// kept (for tools and tests; the compiler reads
    /// [`ClusterState::workload_endpoints`]).
    pub fn resources(&self) -> impl Iterator<Item = Cow<'_, Resource>> {
        self.entries().map(|(_, e)| match e {
            Entry::Resource(r) => Cow::Borrowed(r),
            Entry::Endpoint(..) => Cow::Owned(e.to_resource()),
        })
    }

    /// The resources of one kind other than [`Kind::WorkloadEndpoint`]
    /// (whose objects are [`ClusterState::workload_endpoints`]).
    ///
    /// # Panics
    /// For [`Kind::WorkloadEndpoint`].
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Resource> {
        assert!(
            kind != Kind::WorkloadEndpoint,
            "the state keeps endpoints apart: read workload_endpoints()"
        );
        self.resources
            .range(ResourceKey::new(kind, None, "")..)
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, r)| &**r)
    }

    /// Every resource but the workload endpoints.
    fn non_endpoints(&self) -> impl Iterator<Item = &Resource> {
        self.resources.values().map(|r| &**r)
    }

    /// Every workload endpoint with its key (name and namespace).
    pub fn workload_endpoints(&self) -> impl Iterator<Item = (&ResourceKey, &Endpoint)> {
        self.endpoints.iter().map(|(k, e)| (k, &**e))
    }

    pub fn profile(&self, name: &str) -> Option<&calico::Profile> {
        match self
            .resources
            .get(&ResourceKey::new(Kind::Profile, None, name))
            .map(|r| &**r)
        {
            Some(Resource::Profile(p)) => Some(p),
            _ => None,
        }
    }

    /// The endpoint that owns `ip`, if any.
    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<(&ResourceKey, &Endpoint)> {
        self.workload_endpoints()
            .find(|(_, w)| w.spec.ip_networks.iter().any(|n| n.contains(&ip)))
    }

    /// Labels a selector sees on an endpoint: those its profiles apply
    /// (`pcns.*` for Kubernetes namespaces), overridden by its own.
    pub fn endpoint_labels(&self, w: &Endpoint) -> Labels {
        endpoint_labels_with(&w.spec.profiles, &w.metadata.labels, &|name| {
            self.profile(name).map(|p| &p.spec.labels_to_apply)
        })
    }

    /// The keys of [`ClusterState::labelled_nets`], in the same order.
    pub fn labelled_keys(&self) -> impl Iterator<Item = ResourceKey> + '_ {
        self.entries()
            .filter(|(_, e)| is_labelled_entry(*e))
            .map(|(k, _)| k.clone())
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
        self.entries()
            .filter(|(_, e)| is_labelled_entry(*e))
            .filter_map(|(_, e)| match e {
                Entry::Endpoint(_, w) => {
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
                        nets: Cow::Borrowed(&w.spec.ip_networks),
                        endpoint: Some(w.facts()),
                        node: false,
                    })
                }
                Entry::Resource(r) => self.labelled(r),
            })
            .collect()
    }

    /// The object at `key` as a selector sees it ([`ClusterState::labelled`]).
    pub fn labelled_at(&self, key: &ResourceKey) -> Option<LabelledNets<'_>> {
        match self.entry(key)? {
            Entry::Resource(r) => self.labelled(r),
            Entry::Endpoint(_, w) => Some(LabelledNets {
                labels: LabelView::Owned(self.endpoint_labels(w)),
                nets: Cow::Borrowed(&w.spec.ip_networks),
                endpoint: Some(w.facts()),
                node: false,
            }),
        }
    }

    /// `r` as a selector sees it, if it has addresses (an endpoint or a
    /// network set); `r` need not be in the state (an incremental compile
    /// passes the value a change replaced), but its labels are resolved
    /// against the profiles in the state.
    pub fn labelled<'a>(&'a self, r: &'a Resource) -> Option<LabelledNets<'a>> {
        self.labelled_with(r, &|name| {
            self.profile(name).map(|p| &p.spec.labels_to_apply)
        })
    }

    /// [`ClusterState::labelled`] with the labels each profile applies
    /// given by `profile_labels` (`None`: no such profile): an incremental
    /// compile asks what an object looked like under a profile's old labels.
    pub fn labelled_with<'a>(
        &self,
        r: &'a Resource,
        profile_labels: &dyn Fn(&str) -> Option<&'a Labels>,
    ) -> Option<LabelledNets<'a>> {
        match r {
            Resource::WorkloadEndpoint(w) => Some(LabelledNets {
                labels: LabelView::Owned(endpoint_labels_with(
                    &w.spec.profiles,
                    &w.metadata.labels,
                    profile_labels,
                )),
                nets: Cow::Borrowed(&w.spec.ip_networks),
                endpoint: Some(w.facts()),
                node: false,
            }),
            Resource::NetworkSet(s) => {
                // As libcalico-go hands it to felix: its labels, its
                // namespace's, and the namespace label, so a rule's
                // namespaceSelector + selector reach it as they reach pods.
                let namespace = s.metadata.namespace.as_deref().unwrap_or("default");
                let mut labels = Labels::new();
                if let Some(applied) = profile_labels(&namespace_profile_name(namespace)) {
                    labels.overlay(applied);
                }
                labels.overlay(&s.metadata.labels);
                labels.insert(calico::LABEL_NAMESPACE.into(), namespace.to_owned());
                Some(LabelledNets {
                    labels: LabelView::Owned(labels),
                    nets: Cow::Borrowed(&s.spec.nets),
                    endpoint: None,
                    node: false,
                })
            }
            Resource::GlobalNetworkSet(s) => Some(LabelledNets {
                labels: LabelView::Layered {
                    own: &s.metadata.labels,
                    inherited: vec![],
                },
                nets: Cow::Borrowed(&s.spec.nets),
                endpoint: None,
                node: false,
            }),
            Resource::Node(n) => {
                // Its labels and the marker only node selectors require.
                let mut labels = n.metadata.labels.clone();
                labels.insert(calico::LABEL_NODE.into(), n.metadata.name.clone());
                Some(LabelledNets {
                    labels: LabelView::Owned(labels),
                    nets: Cow::Owned(n.nets()),
                    endpoint: None,
                    node: true,
                })
            }
            _ => {
                debug_assert!(!is_labelled(r), "is_labelled covers labelled_with");
                None
            }
        }
    }

    /// The tiers in evaluation order: by `order` (none last), then by name;
    /// the `default` tier (order [`calico::DEFAULT_TIER_ORDER`]) and the
    /// admin policies' tiers ([`crate::admin::BUILTIN_TIERS`]) are there
    /// whether or not a Tier resource names them.
    pub fn tiers(&self) -> Vec<TierInfo> {
        let mut tiers: Vec<TierInfo> = self
            .of_kind(Kind::Tier)
            .filter_map(|r| match r {
                Resource::Tier(t) => Some(TierInfo {
                    name: t.metadata.name.clone(),
                    order: t.spec.order,
                    default_action: t.spec.default_action.unwrap_or_default(),
                }),
                _ => None,
            })
            .collect();
        for (name, order, default_action) in crate::admin::BUILTIN_TIERS {
            if !tiers.iter().any(|t| t.name == name) {
                tiers.push(TierInfo {
                    name: name.to_owned(),
                    order: Some(order),
                    default_action,
                });
            }
        }
        tiers.sort_by(|a, b| {
            let key = |t: &TierInfo| t.order.unwrap_or(f64::INFINITY);
            key(a).total_cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
        });
        tiers
    }

    /// Policies whose tier does not exist, with the reason. felix does not
    /// program a policy whose tier is missing (the tier is invalid in its
    /// calculation graph) and Calico's API server refuses to create one;
    /// leaving it out could widen (a Deny in it would vanish), so nftpolicy
    /// rejects it instead: the endpoints it selects drop all traffic in its
    /// directions until the tier exists ([`crate::reject`]).
    pub fn tier_rejections(&self) -> Vec<(ResourceKey, String)> {
        let tiers = self.tiers();
        self.non_endpoints()
            .filter_map(|r| {
                let spec = match r {
                    Resource::NetworkPolicy(p) => &p.spec,
                    Resource::GlobalNetworkPolicy(p) => &p.spec,
                    _ => return None,
                };
                if r.metadata().rejection().is_some() {
                    return None;
                }
                let tier = spec.tier();
                (!tiers.iter().any(|t| t.name == tier)).then(|| (r.key(), missing_tier(tier)))
            })
            .collect()
    }

    /// The policies, each resolved (selectors parsed and namespace-scoped),
    /// in evaluation order — tier by tier ([`ClusterState::tiers`]), within
    /// a tier by `order` then id —, rejected ones
    /// ([`ResolvedPolicy::rejected`]) included: those with a rejected stub
    /// and those whose tier does not exist. Resources were validated when
    /// decoded, so resolution cannot fail here except for a resource built
    /// in code; such a policy is skipped with its error returned beside
    /// the list.
    pub fn resolved_policies(&self) -> (Vec<ResolvedPolicy>, Vec<(ResourceKey, String)>) {
        let tiers = self.tiers();
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        for r in self.non_endpoints() {
            match resolve_policy(r, &tiers) {
                Some(Ok(p)) => ok.push(p),
                Some(Err(e)) => errors.push((r.key(), e)),
                None => {}
            }
        }
        // Each policy's sort key once (it formats the id), not twice per
        // comparison: 10,000 policies took ~280,000 formats.
        let mut keyed: Vec<((usize, f64, String), ResolvedPolicy)> =
            ok.into_iter().map(|p| (p.sort_key(), p)).collect();
        keyed.sort_by(|(a, _), (b, _)| sort_key_order(a, b));
        (keyed.into_iter().map(|(_, p)| p).collect(), errors)
    }
}

/// [`ClusterState::endpoint_labels`] with each profile's labels given by
/// `profile_labels`.
fn endpoint_labels_with<'a>(
    profiles: &[IStr],
    own: &Labels,
    profile_labels: &dyn Fn(&str) -> Option<&'a Labels>,
) -> Labels {
    let mut labels = Labels::new();
    for p in profiles {
        if let Some(applied) = profile_labels(p) {
            labels.overlay(applied);
        }
    }
    labels.overlay(own);
    labels
}

/// `r` resolved as [`ClusterState::resolved_policies`] resolves each
/// policy, against `tiers` ([`ClusterState::tiers`]); `None` if `r` is not
/// a policy. An incremental compile resolves only the policies that
/// changed this way.
pub fn resolve_policy(r: &Resource, tiers: &[TierInfo]) -> Option<Result<ResolvedPolicy, String>> {
    let (spec, id) = policy_parts(r)?;
    let name = spec.tier();
    let (rank, tier, missing) = match tiers.iter().position(|t| t.name == name) {
        Some(i) => (i, tiers[i].clone(), None),
        None => (
            tiers.len(),
            TierInfo {
                name: name.to_owned(),
                order: None,
                default_action: TierAction::Deny,
            },
            Some(missing_tier(name)),
        ),
    };
    let rejected = r.metadata().rejection().or(missing.as_deref());
    Some(ResolvedPolicy::new(id, spec, rejected).map(|mut p| {
        p.tier = tier;
        p.tier_rank = rank;
        p
    }))
}

/// A policy's spec and id; `None` for a resource that is not a policy.
fn policy_parts(r: &Resource) -> Option<(&calico::PolicySpec, PolicyId)> {
    match r {
        Resource::NetworkPolicy(p) => Some((
            &p.spec,
            PolicyId::namespaced(
                p.metadata.namespace.as_deref().unwrap_or("default"),
                &p.metadata.name,
            ),
        )),
        Resource::GlobalNetworkPolicy(p) => {
            Some((&p.spec, PolicyId::Global(p.metadata.name.clone())))
        }
        _ => None,
    }
}

/// Where [`resolve_policy`] would place `r` ([`ResolvedPolicy::sort_key`]),
/// without resolving its rules; `None` for a resource that is not a policy.
pub fn policy_sort_key(r: &Resource, tiers: &[TierInfo]) -> Option<(usize, f64, String)> {
    let (spec, id) = policy_parts(r)?;
    let rank = tiers
        .iter()
        .position(|t| t.name == spec.tier())
        .unwrap_or(tiers.len());
    Some(sort_key(rank, spec.order, &id))
}

/// Felix's order as a key: by tier, then by `order` ascending (none
/// last), then by id.
fn sort_key(tier_rank: usize, order: Option<f64>, id: &PolicyId) -> (usize, f64, String) {
    (tier_rank, order.unwrap_or(f64::INFINITY), id.to_string())
}

/// Why `r` is in a full compile's rejected list, if it is: its own
/// rejection ([`crate::reject`]), else for a policy a missing tier, else a
/// policy that does not resolve — the precedence
/// [`ClusterState::rejected`], [`ClusterState::tier_rejections`] and
/// [`ClusterState::resolved_policies`] give when a compile merges them.
pub fn rejection_of(r: &Resource, tiers: &[TierInfo]) -> Option<String> {
    if let Some(why) = r.metadata().rejection() {
        return Some(why.to_owned());
    }
    let spec = match r {
        Resource::NetworkPolicy(p) => &p.spec,
        Resource::GlobalNetworkPolicy(p) => &p.spec,
        _ => return None,
    };
    if !tiers.iter().any(|t| t.name == spec.tier()) {
        return Some(missing_tier(spec.tier()));
    }
    resolve_policy(r, tiers).and_then(Result::err)
}

/// Evaluation order of resolved policies ([`ResolvedPolicy::sort_key`]).
pub fn policy_order(a: &ResolvedPolicy, b: &ResolvedPolicy) -> std::cmp::Ordering {
    sort_key_order(&a.sort_key(), &b.sort_key())
}

/// [`policy_order`] on sort keys computed once.
pub fn sort_key_order(a: &(usize, f64, String), b: &(usize, f64, String)) -> std::cmp::Ordering {
    a.0.cmp(&b.0)
        .then_with(|| a.1.total_cmp(&b.1))
        .then_with(|| a.2.cmp(&b.2))
}

fn missing_tier(tier: &str) -> String {
    format!(
        "spec.tier {tier:?}: no such Tier (create the Tier resource; until then the policy drops what it selects)"
    )
}

/// A tier as evaluation sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TierInfo {
    pub name: String,
    /// `None`: after every tier with an order.
    pub order: Option<f64>,
    pub default_action: TierAction,
}

impl Default for TierInfo {
    /// The `default` tier.
    fn default() -> Self {
        TierInfo {
            name: calico::DEFAULT_TIER.to_owned(),
            order: Some(calico::DEFAULT_TIER_ORDER),
            default_action: TierAction::Deny,
        }
    }
}

impl ClusterState {
    /// Every object nftpolicy rejected ([`crate::reject`]), with the reason.
    pub fn rejected(&self) -> impl Iterator<Item = (ResourceKey, &str)> {
        self.entries().filter_map(|(key, e)| {
            let why = match e {
                Entry::Resource(r) => r.metadata().rejection(),
                Entry::Endpoint(_, w) => w.metadata.rejection(),
            };
            why.map(|why| (key.clone(), why))
        })
    }

    /// Why `ep` drops all its traffic in `dir` (see [`crate::reject`]): it
    /// is rejected itself, or one of its profiles is, or one of the
    /// policies selecting it in `dir` (`selecting`, in policy order) is.
    pub fn rejection_for<'p>(
        &self,
        key: &ResourceKey,
        ep: &Endpoint,
        selecting: impl IntoIterator<Item = &'p ResolvedPolicy>,
    ) -> Option<Rejection> {
        if let Some(reason) = ep.metadata.rejection() {
            return Some(Rejection {
                object: RejectedObject::Endpoint(ResourceKey::new(
                    Kind::WorkloadEndpoint,
                    Some(key.namespace.as_deref().unwrap_or("default")),
                    &key.name,
                )),
                reason: reason.to_owned(),
            });
        }
        for name in ep.spec.profiles.iter() {
            if let Some(reason) = self.profile(name).and_then(|p| p.metadata.rejection()) {
                return Some(Rejection {
                    object: RejectedObject::Profile(name.to_string()),
                    reason: reason.to_owned(),
                });
            }
        }
        selecting.into_iter().find_map(|p| {
            p.rejected.as_ref().map(|reason| Rejection {
                object: RejectedObject::Policy(p.id.clone()),
                reason: reason.clone(),
            })
        })
    }
}

/// A rejected object that makes an endpoint drop all its traffic in a
/// direction until it is fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub object: RejectedObject,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectedObject {
    /// The endpoint itself.
    Endpoint(ResourceKey),
    /// A profile the endpoint uses.
    Profile(String),
    /// A policy selecting the endpoint.
    Policy(PolicyId),
}

impl fmt::Display for RejectedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectedObject::Endpoint(key) => write!(f, "endpoint {key}"),
            RejectedObject::Profile(name) => write!(f, "profile {name}"),
            RejectedObject::Policy(id) => write!(f, "policy {id}"),
        }
    }
}

/// Encapsulated packets felix drops when a workload sends them (first in
/// every `cali-fw-` chain), so that a pod cannot inject packets into the
/// VXLAN or IP-in-IP overlay; felix's `AllowVXLANPacketsFromWorkloads`,
/// `AllowIPIPPacketsFromWorkloads` and `VXLANPort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadEncap {
    pub allow_vxlan: bool,
    pub allow_ipip: bool,
    /// UDP destination port of VXLAN (felix's default 4789).
    pub vxlan_port: u16,
}

impl Default for WorkloadEncap {
    /// felix's defaults: both dropped, VXLAN on port 4789.
    fn default() -> Self {
        WorkloadEncap {
            allow_vxlan: false,
            allow_ipip: false,
            vxlan_port: 4789,
        }
    }
}

/// An encapsulation a workload may not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    /// UDP to the VXLAN port.
    Vxlan,
    /// IP protocol 4 (IP in IP).
    Ipip,
}

/// IP protocol 4: IPv4 encapsulated in IP.
pub const IPIP_PROTOCOL: u8 = 4;

impl WorkloadEncap {
    /// The encapsulation a packet from a workload is dropped for, if any.
    pub fn dropped(&self, protocol: Protocol, dst_port: Option<u16>) -> Option<Encap> {
        let p = protocol.number();
        if !self.allow_vxlan && p == Protocol::Udp.number() && dst_port == Some(self.vxlan_port) {
            return Some(Encap::Vxlan);
        }
        if !self.allow_ipip && p == IPIP_PROTOCOL {
            return Some(Encap::Ipip);
        }
        None
    }
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encap::Vxlan => "VXLAN",
            Encap::Ipip => "IP-in-IP",
        })
    }
}

/// Whether `r` is one of the objects with addresses and labels
/// ([`ClusterState::labelled`] gives `Some` exactly for these).
fn is_labelled_entry(e: Entry<'_>) -> bool {
    match e {
        Entry::Resource(r) => is_labelled(r),
        Entry::Endpoint(..) => true,
    }
}

fn is_labelled(r: &Resource) -> bool {
    matches!(
        r,
        Resource::WorkloadEndpoint(_)
            | Resource::NetworkSet(_)
            | Resource::GlobalNetworkSet(_)
            | Resource::Node(_)
    )
}

/// Something with addresses and labels: an endpoint, a network set or a
/// node.
#[derive(Debug, Clone)]
pub struct LabelledNets<'a> {
    pub labels: LabelView<'a>,
    pub nets: Cow<'a, [IpNet]>,
    /// An endpoint's node and named ports.
    pub endpoint: Option<EndpointFacts<'a>>,
    /// A node ([`calico::LABEL_NODE`]).
    pub node: bool,
}

impl LabelledNets<'_> {
    /// Whether `sel`'s IP set holds these addresses: a node only for a
    /// selector that requires [`calico::LABEL_NODE`] (a `nodes` peer),
    /// anything else only for a selector that does not — so that adding
    /// nodes changes no existing selector's members. The one rule the model
    /// and the compiler share.
    pub fn selected_by(&self, sel: &Selector) -> bool {
        self.node == sel.requires_label(calico::LABEL_NODE) && sel.matches(&self.labels)
    }
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
    /// The tier it belongs to, and that tier's place among the tiers.
    pub tier: TierInfo,
    pub tier_rank: usize,
    pub order: Option<f64>,
    /// Which endpoints it applies to (namespace scoping included).
    pub selector: Selector,
    pub types: Vec<PolicyType>,
    pub ingress: Vec<ResolvedRule>,
    pub egress: Vec<ResolvedRule>,
    /// Rejected ([`crate::reject`]): the endpoints it selects drop all
    /// traffic in its directions; its rules are not read.
    pub rejected: Option<String>,
}

impl ResolvedPolicy {
    pub fn new(
        id: PolicyId,
        spec: &PolicySpec,
        rejected: Option<&str>,
    ) -> Result<ResolvedPolicy, String> {
        let namespace = match &id {
            PolicyId::Kubernetes { namespace, .. } | PolicyId::Namespaced { namespace, .. } => {
                Some(namespace.as_str())
            }
            PolicyId::Global(_) => None,
        };
        let parse =
            |field: &str, s: &str| Selector::parse(s).map_err(|e| format!("{id}: {field}: {e}"));
        let mut selector = parse("spec.selector", &spec.selector)?;
        let mut selector_written = !spec.selector.trim().is_empty();
        match namespace {
            Some(ns) => selector = namespace_is(ns).and(&selector),
            None => {
                if let Some(ns_sel) = spec.namespace_selector.as_deref().filter(|s| !s.is_empty()) {
                    let ns_sel = parse("spec.namespaceSelector", ns_sel)?;
                    selector = scoped_namespace_selector(&ns_sel).and(&selector);
                    selector_written = true;
                }
            }
        }
        let selector = crate::serviceaccount::policy_selector(
            selector,
            spec.service_account_selector.as_deref(),
            namespace.is_none(),
            selector_written,
        )
        .map_err(|e| format!("{id}: {e}"))?;
        let rules = |field: &str, rules: &[Rule]| -> Result<Vec<ResolvedRule>, String> {
            if rejected.is_some() {
                return Ok(vec![]);
            }
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
            tier: TierInfo {
                name: spec.tier().to_owned(),
                ..TierInfo::default()
            },
            tier_rank: 0,
            order: spec.order,
            selector,
            types: spec.effective_types(),
            ingress: rules("spec.ingress", &spec.ingress)?,
            egress: rules("spec.egress", &spec.egress)?,
            rejected: rejected.map(str::to_owned),
        })
    }

    /// Felix's order: by tier, then by `order` ascending (none last),
    /// then by id.
    pub fn sort_key(&self) -> (usize, f64, String) {
        sort_key(self.tier_rank, self.order, &self.id)
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
/// endpoint labels (`pcns.user == "bob"`), as libcalico-go's
/// `getEndpointSelector` does it: `all()` means every namespaced thing, so
/// it becomes `has(projectcalico.org/namespace)`, which global network sets
/// do not match.
pub fn scoped_namespace_selector(ns_sel: &Selector) -> Selector {
    ns_sel.namespace_selector_with_prefix(calico::NAMESPACE_LABEL_PREFIX)
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
        // felix (calc/rule_convert.go): without an ipVersion, protocol ICMP
        // makes a rule IPv4-only and ICMPv6 IPv6-only.
        let implied_version = match rule.protocol.map(|p| Protocol::from_number(p.number())) {
            Some(Protocol::Icmp) => Some(4),
            Some(Protocol::IcmpV6) => Some(6),
            _ => None,
        };
        Ok(ResolvedRule {
            action: rule.action,
            ip_version: rule.ip_version.or(implied_version),
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
    /// libcalico-go's rule conversion (`getEndpointSelector` in
    /// `updateprocessors/rules.go`): a namespaceSelector picks namespaces by
    /// their labels (`pcns.` prefix); without one, a namespaced policy's rule
    /// sees only its own namespace. That scope applies as soon as any
    /// selector field is used — `selector`, `notSelector` or
    /// `namespaceSelector` — and becomes the rule's positive selector
    /// (`scope ∧ selector`, or the scope alone), while `notSelector` stays as
    /// written: a rule with only `notSelector: app == 'x'` in namespace `ns`
    /// matches `ns == 'ns' ∧ ¬(app == 'x')`, never other namespaces, hosts
    /// or external addresses. An empty selector text counts as unset.
    pub fn new(e: &calico::EntityRule, namespace: Option<&str>) -> Result<ResolvedEntity, String> {
        let parse = |field: &str, s: &Option<String>| -> Result<Option<Selector>, String> {
            s.as_deref()
                .filter(|s| !s.is_empty())
                .map(|s| Selector::parse(s).map_err(|err| format!("{field}: {err}")))
                .transpose()
        };
        let sel = parse("selector", &e.selector)?;
        // A service-account match is one more selector, before `selector`.
        let accounts = e
            .service_accounts
            .as_ref()
            .map(crate::serviceaccount::match_selector)
            .transpose()
            .map_err(|err| format!("serviceAccounts.{err}"))?
            .flatten();
        let sel = match (accounts, sel) {
            (Some(a), Some(s)) => Some(a.and(&s)),
            (a, s) => a.or(s),
        };
        let not_sel = parse("notSelector", &e.not_selector)?;
        let ns_sel = parse("namespaceSelector", &e.namespace_selector)?;
        let uses_selectors = sel.is_some() || not_sel.is_some() || ns_sel.is_some();
        let scope = match (&ns_sel, namespace) {
            (Some(ns_sel), _) => Some(scoped_namespace_selector(ns_sel)),
            (None, Some(ns)) => Some(namespace_is(ns)),
            (None, None) => None,
        };
        let selector = match (sel, scope) {
            (Some(s), Some(scope)) => Some(scope.and(&s)),
            (Some(s), None) => Some(s),
            (None, Some(scope)) if uses_selectors => Some(scope),
            (None, _) => None,
        };
        Ok(ResolvedEntity {
            selector,
            not_selector: not_sel,
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

    fn tiered(yaml: &str) -> ClusterState {
        let mut s = ClusterState::new();
        for doc in yaml.split("---") {
            s.upsert(Resource::from_yaml("test", doc).unwrap());
        }
        s
    }

    #[test]
    fn tiers_sort_by_order_then_name_with_the_default_tier_implicit() {
        let s = tiered(
            "{apiVersion: projectcalico.org/v3, kind: Tier, metadata: {name: zulu}, spec: {order: 100}}
---
{apiVersion: projectcalico.org/v3, kind: Tier, metadata: {name: last}}
---
{apiVersion: projectcalico.org/v3, kind: Tier, metadata: {name: alpha}, spec: {order: 100, defaultAction: Pass}}
---
{apiVersion: projectcalico.org/v3, kind: Tier, metadata: {name: late}, spec: {order: 2000000}}",
        );
        let tiers = s.tiers();
        let names: Vec<&str> = tiers.iter().map(|t| t.name.as_str()).collect();
        // The admin policies' tiers are built in too (crate::admin).
        assert_eq!(
            names,
            [
                "alpha",
                "zulu",
                "adminnetworkpolicy",
                "kube-admin",
                "default",
                "late",
                "baselineadminnetworkpolicy",
                "kube-baseline",
                "last"
            ]
        );
        assert_eq!(tiers[0].default_action, TierAction::Pass);
        assert_eq!(tiers[4], TierInfo::default());
        assert_eq!(tiers[2].order, Some(1000.0));
        assert_eq!(tiers[6].default_action, TierAction::Pass);
    }

    #[test]
    fn policies_sort_by_tier_then_order_and_a_missing_tier_rejects() {
        let s = tiered(
            "{apiVersion: projectcalico.org/v3, kind: Tier, metadata: {name: security}, spec: {order: 10}}
---
{apiVersion: projectcalico.org/v3, kind: GlobalNetworkPolicy, metadata: {name: a-first}, spec: {order: 1}}
---
{apiVersion: projectcalico.org/v3, kind: GlobalNetworkPolicy, metadata: {name: security.late}, spec: {tier: security, order: 50}}
---
{apiVersion: projectcalico.org/v3, kind: NetworkPolicy, metadata: {name: security.early, namespace: ns}, spec: {tier: security, order: 5}}
---
{apiVersion: projectcalico.org/v3, kind: GlobalNetworkPolicy, metadata: {name: gone.p}, spec: {tier: gone}}",
        );
        let (policies, errors) = s.resolved_policies();
        assert!(errors.is_empty());
        let ids: Vec<String> = policies.iter().map(|p| p.id.to_string()).collect();
        assert_eq!(
            ids,
            [
                "ns/ns/security.early",
                "gnp/security.late",
                "gnp/a-first",
                "gnp/gone.p"
            ]
        );
        assert!(policies[..3].iter().all(|p| p.rejected.is_none()));
        let why = policies[3].rejected.as_deref().unwrap();
        assert!(why.contains("spec.tier \"gone\": no such Tier"), "{why}");
        assert_eq!(
            s.tier_rejections(),
            [(
                ResourceKey::new(Kind::GlobalNetworkPolicy, None, "gone.p"),
                why.to_owned()
            )]
        );
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

    #[test]
    fn a_lone_not_selector_is_scoped_to_the_policy_namespace() {
        let e = calico::EntityRule {
            not_selector: Some("app == 'cli'".into()),
            ..Default::default()
        };
        let r = ResolvedEntity::new(&e, Some("shop")).unwrap();
        assert_eq!(r.selector, Some(namespace_is("shop")));
        assert_eq!(
            r.not_selector,
            Some(Selector::parse("app == 'cli'").unwrap())
        );
        // In a global policy nothing scopes it.
        let r = ResolvedEntity::new(&e, None).unwrap();
        assert_eq!(r.selector, None);
        // With a namespaceSelector, that is the scope (the notSelector stays).
        let e = calico::EntityRule {
            not_selector: Some("app == 'cli'".into()),
            namespace_selector: Some("all()".into()),
            ..Default::default()
        };
        let r = ResolvedEntity::new(&e, None).unwrap();
        assert_eq!(
            r.selector.unwrap().canonical(),
            "has(projectcalico.org/namespace)"
        );
        assert_eq!(r.not_selector.unwrap().canonical(), "app == \"cli\"");
    }

    #[test]
    fn icmp_without_ip_version_is_one_family() {
        let rule = |p: Protocol| calico::Rule {
            protocol: Some(p),
            ..Default::default()
        };
        assert_eq!(
            ResolvedRule::new(&rule(Protocol::Icmp), None)
                .unwrap()
                .ip_version,
            Some(4)
        );
        assert_eq!(
            ResolvedRule::new(&rule(Protocol::IcmpV6), None)
                .unwrap()
                .ip_version,
            Some(6)
        );
        assert_eq!(
            ResolvedRule::new(&rule(Protocol::Tcp), None)
                .unwrap()
                .ip_version,
            None
        );
    }
}
