//! Incremental compilation: keep the last compiled ruleset and, when only
//! remote endpoints or network sets changed, work out which IP set
//! elements come and go instead of compiling the cluster again.
//!
//! Why: a full compile walks every policy and every labelled object (seconds
//! at 10,000 policies and 250,000 pods), while a pod joining, leaving or
//! relabelling on another node only changes members of the selector and
//! named-port sets whose selectors it matches (before or after). This
//! module keeps, per IP set, how many member objects contribute each net
//! (so a net shared by two objects stays until both leave), and an index
//! from labels to the sets whose selectors require them (so a change is
//! evaluated against the few sets it can affect, not against all).
//!
//! Anything else — a policy, profile or namespace change, a local endpoint
//! — recompiles in full ([`Outcome::Rebuilt`]); the result is the same as
//! [`compile`](crate::compile) either way (tests check this).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use model::calico::{Kind, Resource, ResourceKey};
use model::selector::Selector;
use model::state::{ClusterState, LabelledNets};

use crate::logical::{
    compile_recording, named_port_members, CompileError, CompileOptions, IpSet, IpSetKind,
    LogicalRuleset,
};
use crate::lower_nft::{ip_set_name, to_nftables};
use crate::nft::{ElementDelta, Ruleset, SetDelta, SetElement, TableFamily};

/// What [`IncrementalCompiler::update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Compiled from scratch: program [`IncrementalCompiler::ruleset`] whole.
    Rebuilt,
    /// Only set elements changed (possibly none): program the delta.
    Elements(ElementDelta),
}

/// The compiler's state between updates for one node.
#[derive(Debug, Default)]
pub struct IncrementalCompiler {
    opts: Option<CompileOptions>,
    logical: Option<LogicalRuleset>,
    ruleset: Ruleset,
    sets: HashMap<String, Membership>,
    /// (label, value) → ids of the sets whose selector requires it.
    by_label: HashMap<(String, String), Vec<String>>,
    /// Sets whose selector requires no particular label value.
    unindexed: Vec<String>,
}

#[derive(Debug)]
struct Membership {
    rule: MemberRule,
    /// Raw member nets and how many member objects contribute each.
    nets: BTreeMap<IpNet, u32>,
    /// Members that are not host routes (only they can contain others).
    wide_nets: usize,
    /// Named-port sets: (address, port) and how many objects contribute it.
    named: BTreeMap<(IpAddr, u16), u32>,
}

#[derive(Debug)]
enum MemberRule {
    Selector(Selector),
    NamedPort {
        selector: Option<Selector>,
        protocol: u8,
        names: Vec<String>,
    },
}

impl MemberRule {
    fn from_kind(kind: &IpSetKind) -> MemberRule {
        let parse = |s: &str| {
            Selector::parse(s)
                .unwrap_or_else(|e| panic!("a canonical selector re-parses (selector {s:?}: {e})"))
        };
        match kind {
            IpSetKind::Selector(s) => MemberRule::Selector(parse(s)),
            IpSetKind::NamedPort {
                selector,
                protocol,
                names,
            } => MemberRule::NamedPort {
                selector: selector.as_deref().map(parse),
                protocol: *protocol,
                names: names.clone(),
            },
        }
    }

    fn selector(&self) -> Option<&Selector> {
        match self {
            MemberRule::Selector(s) => Some(s),
            MemberRule::NamedPort { selector, .. } => selector.as_ref(),
        }
    }

    fn matches(&self, n: &LabelledNets<'_>) -> bool {
        match self {
            MemberRule::Selector(s) => s.matches(&n.labels),
            MemberRule::NamedPort { selector, .. } => {
                n.endpoint.is_some() && selector.as_ref().is_none_or(|s| s.matches(&n.labels))
            }
        }
    }
}

/// Per set: element → +1 (joins) or −1 (leaves); 0 once it cancels out.
type NetChanges = BTreeMap<IpNet, i32>;
type NamedChanges = BTreeMap<(IpAddr, u16), i32>;

impl Membership {
    fn new(rule: MemberRule) -> Membership {
        Membership {
            rule,
            nets: BTreeMap::new(),
            wide_nets: 0,
            named: BTreeMap::new(),
        }
    }

    /// Whether a member other than `net` itself contains `net`.
    fn covered(&self, net: IpNet) -> bool {
        if self.wide_nets == 0 {
            return false;
        }
        (0..net.prefix_len()).any(|len| {
            let sup = match net {
                IpNet::V4(n) => IpNet::V4(Ipv4Net::new(n.addr(), len).expect("len < 32").trunc()),
                IpNet::V6(n) => IpNet::V6(Ipv6Net::new(n.addr(), len).expect("len < 128").trunc()),
            };
            self.nets.contains_key(&sup)
        })
    }

    /// Members strictly inside `net`.
    fn inside(&self, net: IpNet) -> Vec<IpNet> {
        if net.prefix_len() == net.max_prefix_len() {
            return vec![];
        }
        let (lo, hi) = match net {
            IpNet::V4(n) => (
                IpNet::V4(Ipv4Net::new(n.network(), 0).expect("0 is valid")),
                IpNet::V4(Ipv4Net::new(n.broadcast(), 32).expect("32 is valid")),
            ),
            IpNet::V6(n) => (
                IpNet::V6(Ipv6Net::new(n.network(), 0).expect("0 is valid")),
                IpNet::V6(Ipv6Net::new(n.broadcast(), 128).expect("128 is valid")),
            ),
        };
        self.nets
            .range(lo..=hi)
            .map(|(k, _)| *k)
            .filter(|k| *k != net && net.contains(k))
            .collect()
    }

    /// One more object contributes `net`; records element changes.
    fn add_net(&mut self, net: IpNet, out: &mut NetChanges) {
        let net = net.trunc();
        let count = self.nets.entry(net).or_insert(0);
        *count += 1;
        if *count > 1 {
            return;
        }
        let wide = net.prefix_len() < net.max_prefix_len();
        if wide {
            self.wide_nets += 1;
        }
        if self.covered(net) {
            return;
        }
        *out.entry(net).or_insert(0) += 1;
        if wide {
            // Elements now inside `net` stop being elements. They were
            // elements iff nothing but `net` covers them now.
            for inner in self.inside(net) {
                if !self.covered_except(inner, net) {
                    *out.entry(inner).or_insert(0) -= 1;
                }
            }
        }
    }

    /// One object fewer contributes `net`; records element changes.
    fn remove_net(&mut self, net: IpNet, out: &mut NetChanges) {
        let net = net.trunc();
        let Some(count) = self.nets.get_mut(&net) else {
            debug_assert!(false, "removing {net}, which is not a member");
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        self.nets.remove(&net);
        let wide = net.prefix_len() < net.max_prefix_len();
        if self.covered(net) {
            if wide {
                self.wide_nets -= 1;
            }
            return;
        }
        *out.entry(net).or_insert(0) -= 1;
        if wide {
            let inner = self.inside(net);
            self.wide_nets -= 1;
            for inner in inner {
                if !self.covered(inner) {
                    *out.entry(inner).or_insert(0) += 1;
                }
            }
        }
    }

    /// Whether a member other than `inner` and `except` contains `inner`.
    fn covered_except(&self, inner: IpNet, except: IpNet) -> bool {
        (0..inner.prefix_len()).any(|len| {
            let sup = match inner {
                IpNet::V4(n) => IpNet::V4(Ipv4Net::new(n.addr(), len).expect("len < 32").trunc()),
                IpNet::V6(n) => IpNet::V6(Ipv6Net::new(n.addr(), len).expect("len < 128").trunc()),
            };
            sup != except && self.nets.contains_key(&sup)
        })
    }

    fn add_named(&mut self, member: (IpAddr, u16), out: &mut NamedChanges) {
        let count = self.named.entry(member).or_insert(0);
        *count += 1;
        if *count == 1 {
            *out.entry(member).or_insert(0) += 1;
        }
    }

    fn remove_named(&mut self, member: (IpAddr, u16), out: &mut NamedChanges) {
        if let Some(count) = self.named.get_mut(&member) {
            *count -= 1;
            if *count == 0 {
                self.named.remove(&member);
                *out.entry(member).or_insert(0) -= 1;
            }
        }
    }

    /// `n` leaves (`add == false`) or joins the set.
    fn contribute(
        &mut self,
        n: &LabelledNets<'_>,
        add: bool,
        nets: &mut NetChanges,
        named: &mut NamedChanges,
    ) {
        match &self.rule {
            MemberRule::Selector(_) => {
                for net in n.nets {
                    if add {
                        self.add_net(*net, nets);
                    } else {
                        self.remove_net(*net, nets);
                    }
                }
            }
            MemberRule::NamedPort {
                protocol, names, ..
            } => {
                let Some(ep) = n.endpoint else { return };
                let members: Vec<(IpAddr, u16)> =
                    named_port_members(ep, n.nets, *protocol, names).collect();
                for m in members {
                    if add {
                        self.add_named(m, named);
                    } else {
                        self.remove_named(m, named);
                    }
                }
            }
        }
    }
}

/// Sorted values → each distinct value with how often it occurs.
fn counted<T: Ord + Copy>(sorted: Vec<T>) -> BTreeMap<T, u32> {
    let mut out: Vec<(T, u32)> = Vec::with_capacity(sorted.len());
    for v in sorted {
        match out.last_mut() {
            Some((last, n)) if *last == v => *n += 1,
            _ => out.push((v, 1)),
        }
    }
    out.into_iter().collect()
}

impl IncrementalCompiler {
    pub fn new(opts: CompileOptions) -> IncrementalCompiler {
        IncrementalCompiler {
            opts: Some(opts),
            ..Default::default()
        }
    }

    pub fn options(&self) -> &CompileOptions {
        self.opts.as_ref().expect("constructed with options")
    }

    /// The logical ruleset as of the last update (`None` before the first).
    pub fn logical(&self) -> Option<&LogicalRuleset> {
        self.logical.as_ref()
    }

    /// The nftables ruleset as of the last update (empty before the first).
    pub fn ruleset(&self) -> &Ruleset {
        &self.ruleset
    }

    /// Forgets everything: the next update compiles from scratch.
    pub fn reset(&mut self) {
        let opts = self.opts.take();
        *self = IncrementalCompiler {
            opts,
            ..Default::default()
        };
    }

    /// Compiles `state` from scratch.
    pub fn rebuild(&mut self, state: &ClusterState) -> Result<(), CompileError> {
        let opts = self.options().clone();
        let mut sets: HashMap<String, Membership> = HashMap::new();
        let mut record = |nets: &[LabelledNets<'_>],
                          members: &HashMap<String, Vec<usize>>,
                          ip_sets: &BTreeMap<String, IpSet>| {
            for (id, set) in ip_sets {
                let mut m = Membership::new(MemberRule::from_kind(&set.kind));
                let objects = members.get(id).map(Vec::as_slice).unwrap_or_default();
                // Counted in bulk (sorted, then built in one go): this runs
                // over every member of every set on each full compile.
                match &m.rule {
                    MemberRule::Selector(_) => {
                        let mut all: Vec<IpNet> = objects
                            .iter()
                            .flat_map(|&i| nets[i].nets.iter().map(|n| n.trunc()))
                            .collect();
                        all.sort_unstable();
                        m.nets = counted(all);
                        m.wide_nets = m
                            .nets
                            .keys()
                            .filter(|n| n.prefix_len() < n.max_prefix_len())
                            .count();
                    }
                    MemberRule::NamedPort {
                        protocol, names, ..
                    } => {
                        let mut all: Vec<(IpAddr, u16)> = objects
                            .iter()
                            .filter_map(|&i| nets[i].endpoint.map(|ep| (ep, nets[i].nets)))
                            .flat_map(|(ep, n)| named_port_members(ep, n, *protocol, names))
                            .collect();
                        all.sort_unstable();
                        m.named = counted(all);
                    }
                }
                sets.insert(id.clone(), m);
            }
        };
        let logical = compile_recording(state, &opts, Some(&mut record))?;
        let mut by_label: HashMap<(String, String), Vec<String>> = HashMap::new();
        let mut unindexed = Vec::new();
        for (id, m) in &sets {
            // Index under one required label (the one with fewest values):
            // a set can only gain or lose an object carrying one of them.
            let best = m.rule.selector().and_then(|s| {
                s.required_labels()
                    .into_iter()
                    .min_by_key(|(_, values)| values.len())
            });
            match best {
                Some((label, values)) => {
                    for v in values {
                        by_label
                            .entry((label.to_owned(), v.to_owned()))
                            .or_default()
                            .push(id.clone());
                    }
                }
                None => unindexed.push(id.clone()),
            }
        }
        self.ruleset = to_nftables(&logical);
        self.logical = Some(logical);
        self.sets = sets;
        self.by_label = by_label;
        self.unindexed = unindexed;
        Ok(())
    }

    /// Brings the compiled ruleset up to `state`. `changes` holds every
    /// resource changed since the last update, with its value before the
    /// changes (`None`: it did not exist).
    pub fn update(
        &mut self,
        state: &ClusterState,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
    ) -> Result<Outcome, CompileError> {
        if self.logical.is_none() || !self.members_only(state, changes) {
            self.rebuild(state)?;
            return Ok(Outcome::Rebuilt);
        }
        let mut net_changes: HashMap<String, NetChanges> = HashMap::new();
        let mut named_changes: HashMap<String, NamedChanges> = HashMap::new();
        for (key, old) in changes {
            let before = old.as_ref().and_then(|r| state.labelled(r));
            let after = state.get(key).and_then(|r| state.labelled(r));
            if let (Some(b), Some(a)) = (&before, &after) {
                if b.labels.to_labels() == a.labels.to_labels()
                    && b.nets == a.nets
                    && b.endpoint.map(|e| &e.spec.ports) == a.endpoint.map(|e| &e.spec.ports)
                {
                    continue;
                }
            }
            let mut candidates: HashSet<&str> = self.unindexed.iter().map(String::as_str).collect();
            for n in before.iter().chain(after.iter()) {
                for (k, v) in n.labels.pairs() {
                    // Allocation-free lookup would need a borrowed key type;
                    // the copy is small next to the selector evaluations.
                    if let Some(ids) = self.by_label.get(&(k.to_owned(), v.to_owned())) {
                        candidates.extend(ids.iter().map(String::as_str));
                    }
                }
            }
            for id in candidates {
                let m = self.sets.get_mut(id).expect("indexed sets exist");
                let nets = net_changes.entry(id.to_owned()).or_default();
                let named = named_changes.entry(id.to_owned()).or_default();
                if let Some(b) = before.as_ref().filter(|b| m.rule.matches(b)) {
                    m.contribute(b, false, nets, named);
                }
                if let Some(a) = after.as_ref().filter(|a| m.rule.matches(a)) {
                    m.contribute(a, true, nets, named);
                }
            }
        }
        Ok(Outcome::Elements(
            self.apply_changes(net_changes, named_changes),
        ))
    }

    /// Whether every change is to an object outside this node that only
    /// feeds IP set members (a remote endpoint, a network set).
    fn members_only(
        &self,
        state: &ClusterState,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
    ) -> bool {
        let node = &self.options().node;
        let remote = |r: Option<&Resource>| match r {
            None => true,
            Some(Resource::WorkloadEndpoint(w)) => &w.spec.node != node,
            Some(Resource::NetworkSet(_) | Resource::GlobalNetworkSet(_)) => true,
            Some(_) => false,
        };
        changes.iter().all(|(key, old)| {
            matches!(
                key.kind,
                Kind::WorkloadEndpoint | Kind::NetworkSet | Kind::GlobalNetworkSet
            ) && remote(old.as_ref())
                && remote(state.get(key))
        })
    }

    /// Applies element changes to the logical and nftables rulesets and
    /// returns them as nftables set deltas.
    fn apply_changes(
        &mut self,
        net_changes: HashMap<String, NetChanges>,
        named_changes: HashMap<String, NamedChanges>,
    ) -> ElementDelta {
        let logical = self.logical.as_mut().expect("checked by update");
        let mut delta = ElementDelta::default();
        let mut ids: Vec<&String> = net_changes
            .keys()
            .chain(named_changes.keys())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        ids.sort();
        for id in ids {
            let set = logical.ip_sets.get_mut(id).expect("changed sets exist");
            let mut per_family: BTreeMap<TableFamily, (Vec<SetElement>, Vec<SetElement>)> =
                BTreeMap::new();
            for (net, change) in net_changes.get(id).into_iter().flatten() {
                let (family, list) = match net {
                    IpNet::V4(_) => (TableFamily::Ip, &mut set.nets_v4),
                    IpNet::V6(_) => (TableFamily::Ip6, &mut set.nets_v6),
                };
                let (add, remove) = per_family.entry(family).or_default();
                match change.cmp(&0) {
                    std::cmp::Ordering::Greater => {
                        if let Err(i) = list.binary_search(net) {
                            list.insert(i, *net);
                        }
                        add.push(SetElement::Net(*net));
                    }
                    std::cmp::Ordering::Less => {
                        if let Ok(i) = list.binary_search(net) {
                            list.remove(i);
                        }
                        remove.push(SetElement::Net(*net));
                    }
                    std::cmp::Ordering::Equal => {}
                }
            }
            if let IpSetKind::NamedPort { protocol, .. } = set.kind {
                for ((addr, port), change) in named_changes.get(id).into_iter().flatten() {
                    let member = (*addr, protocol, *port);
                    let family = if addr.is_ipv6() {
                        TableFamily::Ip6
                    } else {
                        TableFamily::Ip
                    };
                    let (add, remove) = per_family.entry(family).or_default();
                    let element = SetElement::NamedPort(*addr, protocol, *port);
                    match change.cmp(&0) {
                        std::cmp::Ordering::Greater => {
                            if let Err(i) = set.members_named.binary_search(&member) {
                                set.members_named.insert(i, member);
                            }
                            add.push(element);
                        }
                        std::cmp::Ordering::Less => {
                            if let Ok(i) = set.members_named.binary_search(&member) {
                                set.members_named.remove(i);
                            }
                            remove.push(element);
                        }
                        std::cmp::Ordering::Equal => {}
                    }
                }
            }
            for (family, (add, remove)) in per_family {
                if add.is_empty() && remove.is_empty() {
                    continue;
                }
                let name = ip_set_name(id, family);
                // The set exists in a table only if a rule of that family
                // uses it.
                let Some(table) = self.ruleset.tables.iter_mut().find(|t| t.family == family)
                else {
                    continue;
                };
                let Some(nft_set) = table.sets.get_mut(&name) else {
                    continue;
                };
                let d = SetDelta {
                    family,
                    set: name,
                    remove,
                    add,
                };
                d.apply_to_set(nft_set);
                delta.sets.push(d);
            }
        }
        delta
    }
}
