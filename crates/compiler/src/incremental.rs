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
//! A local endpoint coming, going or changing also changes chains: its own
//! `cali-fw-`/`cali-tw-` chains and dispatch map entries, and the chains of
//! policies and profiles that start or stop applying on this node (with
//! the IP sets their rules use). Those few chains are built again and
//! returned as a [`RulesetPatch`]; member counts per policy, profile and
//! set say what starts and stops being needed.
//!
//! A member change that turns a selector set from all host addresses
//! (an nft hash set) to holding a CIDR (an interval set), or back, also
//! recompiles in full: the kernel cannot change a set's type in place.
//!
//! A policy change resolves only the changed policies and merges them into
//! the ordered list; the local endpoints that used a changed policy, or
//! that a new version selects, are redone as above (their chains, and the
//! policy chains and sets that start or stop being needed). A profile
//! change (a namespace or service account relabelled, a profile's rules)
//! re-evaluates the objects inheriting its labels against the sets, as a
//! relabelled pod is, redoes the local endpoints using it and builds its
//! chains again.
//!
//! A tier change (created, reordered, its default action changed, deleted)
//! is a change of every policy in that tier: they resolve again and move
//! to their new place; the other policies only get their tier's new rank.
//! What still recompiles in full ([`Outcome::Rebuilt`]): a set changing
//! type (above) and two local endpoints sharing an interface name.
//!
//! With `--fused-lookup` ([`crate::fused`]) a selector set's member
//! changes are also element changes of the fused sets built from it
//! ([`fused::Upkeep`](crate::fused::Upkeep) knows which, and checks each
//! candidate element against the sources that could add it); an endpoint
//! chain that is redone is lowered with its fused lookups again, its fused
//! sets compared with the table's; and a member change that turns whether
//! a policy fuses (a set crossing the element limit, or gaining a CIDR)
//! lowers the endpoint chains using it again. The result is the same as [`compile`](crate::compile)
//! either way (tests check this for every change kind).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use model::calico::{Kind, PolicyType, Resource, ResourceKey};
use model::convert::namespace_profile_name;
use model::endpoint::Endpoint;
use model::selector::{Labels, Selector};
use model::state::{
    policy_order, rejection_of, resolve_policy, sort_key_order, ClusterState, Entry, LabelledNets,
    PolicyId, RejectedObject, ResolvedPolicy, TierInfo,
};

use crate::fused::{self, MemberChanges, Upkeep};
use crate::label_index::LabelIndex;
use crate::logical::{
    compile_recording, named_port_members, policy_chain, profile_chain, Builder, CompileError,
    CompileOptions, EndpointUse, IpSet, IpSetKind, LChain, LocalEndpoint, LogicalRuleset,
    PolicyList, Recorded,
};
use crate::lower_nft::{dispatch_maps, ip_set_name, lower_chain, to_nftables_kept};
use crate::nft::{
    referenced_sets, ElementDelta, Ruleset, RulesetPatch, SetDelta, SetElement, SetKey,
    TableFamily, TablePatch,
};

/// What [`IncrementalCompiler::update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Compiled from scratch: program [`IncrementalCompiler::ruleset`] whole.
    Rebuilt,
    /// Only set elements changed (possibly none): program the delta.
    Elements(ElementDelta),
    /// Local endpoints changed: program the patch (chains, sets and maps
    /// to create, replace or delete, and element changes).
    Patch(RulesetPatch),
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
    /// The labelled objects by label value, kept up to date with every
    /// change: a new selector set looks its members up here.
    objects: LabelIndex,
    /// The resolved policies of the last full compile (what the positions
    /// in [`EndpointUse`] and `policy_refs` refer to).
    policies: PolicyList,
    /// Local endpoints: the policies and profiles their chains use.
    uses: HashMap<ResourceKey, EndpointUse>,
    /// Two local endpoints share an interface name (the full compile keeps
    /// one of them): local changes then recompile in full.
    shared_interfaces: bool,
    /// (policy position, direction) → local endpoints it applies to; its
    /// chain exists while this is above zero.
    policy_refs: PolicyRefs,
    /// Profile → local endpoints using it (its chains exist while > 0).
    profile_refs: HashMap<String, u32>,
    /// IP set id → chains whose rules use it (it exists while > 0).
    set_refs: HashMap<String, u32>,
    /// Per family: nft set → chains whose rules use it.
    nft_set_refs: BTreeMap<TableFamily, HashMap<String, u32>>,
    /// `--fused-lookup`: where the fused sets' elements come from, and
    /// which member changes refuse which endpoint chains.
    fused: Upkeep,
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
        /// Its set's kind, which says which endpoints it admits.
        kind: IpSetKind,
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
                ..
            } => MemberRule::NamedPort {
                selector: selector.as_deref().map(parse),
                protocol: *protocol,
                names: names.clone(),
                kind: kind.clone(),
            },
        }
    }

    fn selector(&self) -> Option<&Selector> {
        match self {
            MemberRule::Selector(s) => Some(s),
            MemberRule::NamedPort { selector, .. } => selector.as_ref(),
        }
    }

    /// The required label (with its values) a set is indexed under: the
    /// one with fewest values. `None`: the set requires no label value.
    fn index_label(&self) -> Option<(&str, Vec<&str>)> {
        self.selector().and_then(|s| {
            s.required_labels()
                .into_iter()
                .min_by_key(|(_, values)| values.len())
        })
    }

    fn matches(&self, n: &LabelledNets<'_>) -> bool {
        match self {
            MemberRule::Selector(s) => n.selected_by(s),
            MemberRule::NamedPort { selector, kind, .. } => {
                kind.admits(n) && selector.as_ref().is_none_or(|s| n.selected_by(s))
            }
        }
    }
}

/// Per set: element → +1 (joins) or −1 (leaves); 0 once it cancels out.
type NetChanges = BTreeMap<IpNet, i32>;
type NamedChanges = BTreeMap<(IpAddr, u16), i32>;

impl Membership {
    /// The membership of `set`, whose member objects are `objects`
    /// (positions in `nets`). Counted in bulk (sorted, then built in one
    /// go): a full compile runs this over every member of every set.
    fn of(set: &IpSet, objects: &[usize], nets: &[LabelledNets<'_>]) -> Membership {
        let mut m = Membership::new(MemberRule::from_kind(&set.kind));
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
                    .filter_map(|&i| nets[i].endpoint.map(|ep| (ep, &*nets[i].nets)))
                    .flat_map(|(ep, n)| named_port_members(ep, n, *protocol, names))
                    .collect();
                all.sort_unstable();
                m.named = counted(all);
            }
        }
        m
    }

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
                for net in n.nets.iter() {
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
                    named_port_members(ep, &n.nets, *protocol, names).collect();
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
        self.rebuild_then(state, |_, _| ())
    }

    /// [`IncrementalCompiler::rebuild`], handing the new rulesets to
    /// `program` as soon as they are lowered: what the incremental compiler
    /// keeps beside them (set memberships and their index, the label
    /// index's keys, reference counts — ~150 ms at 250,000 pods) is built
    /// on a second thread meanwhile, so a cold start's kernel transaction
    /// does not wait for it.
    pub fn rebuild_then<R>(
        &mut self,
        state: &ClusterState,
        program: impl FnOnce(&LogicalRuleset, &Ruleset) -> R,
    ) -> Result<R, CompileError> {
        let opts = self.options().clone();
        let compiled = compile_recording(state, &opts, true)?;
        let logical = compiled.logical;
        let (ruleset, fused) = to_nftables_kept(&logical);
        let recorded = compiled.recorded.expect("a recording compile records");
        let programmed = std::thread::scope(|s| {
            let records = s.spawn(|| {
                self.keep_records(state, recorded, compiled.uses, &logical, &ruleset);
            });
            let programmed = program(&logical, &ruleset);
            records
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            programmed
        });
        self.ruleset = ruleset;
        self.fused = fused;
        self.policies = compiled.policies;
        self.logical = Some(logical);
        Ok(programmed)
    }

    /// What [`IncrementalCompiler::rebuild_then`] keeps beside the rulesets
    /// it compiled.
    fn keep_records(
        &mut self,
        state: &ClusterState,
        recorded: Recorded<'_>,
        uses: Vec<EndpointUse>,
        logical: &LogicalRuleset,
        ruleset: &Ruleset,
    ) {
        let Recorded {
            nets,
            members,
            index,
        } = recorded;
        let sets: Vec<(String, Membership)> = logical
            .ip_sets
            .iter()
            .map(|(id, set)| {
                let objects = members.get(id).map(Vec::as_slice).unwrap_or_default();
                (id.clone(), Membership::of(set, objects, &nets))
            })
            .collect();
        // The full compile's index, unless it needed none.
        let objects = index.unwrap_or_else(|| LabelIndex::new(&nets));
        drop(nets);
        self.objects = objects.with_keys(state.labelled_keys());
        self.sets = HashMap::new();
        self.by_label = HashMap::new();
        self.unindexed = Vec::new();
        for (id, m) in sets {
            self.add_set(id, m);
        }

        self.policy_refs = PolicyRefs::default();
        self.profile_refs = HashMap::new();
        self.uses = HashMap::new();
        let mut interfaces = HashSet::new();
        self.shared_interfaces = false;
        for u in uses {
            self.shared_interfaces |= !interfaces.insert(u.interface.clone());
            refer_use(
                &mut self.policy_refs,
                &mut self.profile_refs,
                &u,
                1,
                |_, _| {},
            );
            self.uses.insert(u.key.clone(), u);
        }
        self.set_refs = HashMap::new();
        for c in logical.chains.values() {
            for id in chain_ip_sets(c) {
                *self.set_refs.entry(id.to_owned()).or_default() += 1;
            }
        }
        self.nft_set_refs = BTreeMap::new();
        for t in &ruleset.tables {
            let refs = self.nft_set_refs.entry(t.family).or_default();
            for c in t.chains.values() {
                for name in referenced_sets(c).collect::<BTreeSet<_>>() {
                    if t.sets.contains_key(name) {
                        *refs.entry(name.to_owned()).or_default() += 1;
                    }
                }
            }
        }
    }

    /// Registers a set's membership and indexes it under one required
    /// label (the one with fewest values): a set can only gain or lose an
    /// object carrying one of them.
    fn add_set(&mut self, id: String, m: Membership) {
        match m.rule.index_label() {
            Some((label, values)) => {
                for v in values {
                    self.by_label
                        .entry((label.to_owned(), v.to_owned()))
                        .or_default()
                        .push(id.clone());
                }
            }
            None => self.unindexed.push(id.clone()),
        }
        self.sets.insert(id, m);
    }

    /// Forgets a set's membership and index entries.
    fn remove_set(&mut self, id: &str) {
        let Some(m) = self.sets.remove(id) else {
            return;
        };
        match m.rule.index_label() {
            Some((label, values)) => {
                for v in values {
                    let key = (label.to_owned(), v.to_owned());
                    if let Some(ids) = self.by_label.get_mut(&key) {
                        ids.retain(|i| i != id);
                        if ids.is_empty() {
                            self.by_label.remove(&key);
                        }
                    }
                }
            }
            None => self.unindexed.retain(|i| i != id),
        }
    }

    /// The objects that may be members of `sets` (a superset), or `None`
    /// when one of them needs every object looked at (its selector
    /// requires no label value, or it has none).
    fn candidate_objects(&self, sets: &[IpSet]) -> Option<Vec<ResourceKey>> {
        let mut slots = BTreeSet::new();
        for set in sets {
            let rule = MemberRule::from_kind(&set.kind);
            slots.extend(self.objects.candidates(rule.selector()?)?);
        }
        Some(
            slots
                .into_iter()
                .filter_map(|s| self.objects.key(s).cloned())
                .collect(),
        )
    }

    /// Brings the compiled ruleset up to `state`. `changes` holds every
    /// resource changed since the last update, with its value before the
    /// changes (`None`: it did not exist).
    pub fn update(
        &mut self,
        state: &ClusterState,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
    ) -> Result<Outcome, CompileError> {
        Ok(self.update_then(state, changes, |_, _, _| ())?.0)
    }

    /// [`IncrementalCompiler::update`], then `program` with the rulesets
    /// and the outcome. When the update compiles in full, `program` runs
    /// while the incremental records are built
    /// ([`IncrementalCompiler::rebuild_then`]).
    pub fn update_then<R>(
        &mut self,
        state: &ClusterState,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
        program: impl FnOnce(&LogicalRuleset, &Ruleset, &Outcome) -> R,
    ) -> Result<(Outcome, R), CompileError> {
        let patched = if self.logical.is_none() || !self.can_patch(state, changes) {
            None
        } else {
            self.patch(state, changes)
        };
        match patched {
            Some(outcome) => {
                let logical = self.logical.as_ref().expect("patched a compiled ruleset");
                let programmed = program(logical, &self.ruleset, &outcome);
                Ok((outcome, programmed))
            }
            None => {
                let programmed = self.rebuild_then(state, |logical, ruleset| {
                    program(logical, ruleset, &Outcome::Rebuilt)
                })?;
                Ok((Outcome::Rebuilt, programmed))
            }
        }
    }

    /// The update of a compiled ruleset by `changes`, or `None` when it
    /// must compile in full.
    fn patch(
        &mut self,
        state: &ClusterState,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
    ) -> Option<Outcome> {
        let (net_changes, named_changes) = self.member_changes(state, changes);
        // A selector set is a hash set while every member is a host address
        // and an interval set otherwise (`SetKey::Host`). The kernel cannot
        // change a set's type in place: a change that flips one compiles in
        // full, and the programmer re-creates the set (and refills the
        // chains that use it) in the same transaction.
        if self.set_type_flips(&net_changes) {
            return None;
        }
        // Fused lookups (crate::fused): the endpoint chains whose fusing
        // the member changes turn around, and the fused sets' elements
        // they may change (settled once the sets and chains are).
        let logical = self.logical.as_ref().expect("compiled");
        let (relower, candidates) = if logical.fused_lookup {
            (
                self.fused.relower(logical, &net_changes),
                self.fused.candidates(&net_changes),
            )
        } else {
            (BTreeSet::new(), BTreeMap::new())
        };
        // A tier changed: the policies in it resolve again (their tier's
        // order, default action or existence changed), and every other
        // policy's tier rank follows the new tier list.
        let tier_policies = self.tier_changes(state, changes);
        self.note_rejections(state, changes, &tier_policies);
        let node = &self.options().node;
        let is_local = |r: Option<&Resource>| matches!(r, Some(Resource::WorkloadEndpoint(w)) if &w.spec.node == node);
        let mut local: BTreeSet<ResourceKey> = changes
            .iter()
            .filter(|(key, old)| {
                is_local(old.as_ref()) || state.endpoint(key).is_some_and(|w| &w.spec.node == node)
            })
            .map(|(key, _)| key.clone())
            .collect();
        // A profile changed: the local endpoints using it are redone (its
        // labels may change which policies select them, its rejection their
        // chains) and its chains are built again.
        let profiles: BTreeSet<String> = changes
            .keys()
            .filter(|k| k.kind == Kind::Profile)
            .map(|k| k.name.to_string())
            .collect();
        if !profiles.is_empty() {
            for key in self.uses.keys() {
                if let Some(w) = state.endpoint(key) {
                    if w.spec
                        .profiles
                        .iter()
                        .any(|p| profiles.contains(p.as_str()))
                    {
                        local.insert(key.clone());
                    }
                }
            }
        }
        // Endpoints redone only because policies changed: what they use
        // can be carried over (`PolicySwap::carried_use`).
        let mut only_policies = BTreeSet::new();
        let swap = self.policy_swap(state, changes, &tier_policies);
        if let Some(swap) = &swap {
            for key in &swap.endpoints {
                if local.insert(key.clone()) {
                    only_policies.insert(key.clone());
                }
            }
        }
        if local.is_empty() && swap.is_none() && relower.is_empty() {
            let mut delta = self.apply_changes(net_changes, named_changes);
            delta.sets.extend(self.reconcile_fused(candidates));
            return Some(Outcome::Elements(delta));
        }
        let local: Vec<&ResourceKey> = local.iter().collect();
        let mut patch = self.patch_local(
            state,
            &local,
            (swap, &only_policies),
            &profiles,
            (net_changes, named_changes),
            relower,
        );
        patch.elements.sets.extend(self.reconcile_fused(candidates));
        if patch.tables.is_empty() {
            return Some(Outcome::Elements(patch.elements));
        }
        Some(Outcome::Patch(patch))
    }

    /// The fused sets' elements after member changes (see
    /// [`Upkeep::reconcile`]).
    fn reconcile_fused(&mut self, candidates: fused::Candidates) -> Vec<SetDelta> {
        if candidates.is_empty() {
            return vec![];
        }
        let logical = self.logical.as_ref().expect("compiled");
        self.fused.reconcile(logical, &mut self.ruleset, candidates)
    }

    /// For tier changes in `changes`: the policies in the changed tiers
    /// (they resolve again, as if they had changed), after giving the
    /// others their tier's new rank. The tiers that did not change keep
    /// their relative order, so the policies in them stay in order.
    fn tier_changes(
        &mut self,
        state: &ClusterState,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
    ) -> Vec<ResourceKey> {
        let changed: HashSet<&str> = changes
            .keys()
            .filter(|k| k.kind == Kind::Tier)
            .map(|k| k.name.as_str())
            .collect();
        if changed.is_empty() {
            return vec![];
        }
        let tiers = state.tiers();
        for p in &mut self.policies {
            // As `resolve_policy` ranks it: a missing tier after every tier.
            p.tier_rank = tiers
                .iter()
                .position(|t| t.name == p.tier.name)
                .unwrap_or(tiers.len());
        }
        [Kind::NetworkPolicy, Kind::GlobalNetworkPolicy]
            .into_iter()
            .flat_map(|kind| state.of_kind(kind))
            .filter(|r| match r {
                Resource::NetworkPolicy(p) => changed.contains(p.spec.tier()),
                Resource::GlobalNetworkPolicy(p) => changed.contains(p.spec.tier()),
                _ => false,
            })
            .map(Resource::key)
            .collect()
    }

    /// The positions in the policy list of the changed policies `changed`,
    /// found by binary search: the list is sorted by sort key, and each
    /// one's old version in `changes` gives its old key (one without an
    /// old version was not in the list). `None` when one misses (its old
    /// version did not resolve, so it is not in the list either, or the
    /// ranks moved): then every policy's id is compared.
    fn find_by_old_key(
        &self,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
        changed: &HashSet<&ResourceKey>,
        tiers: &[model::state::TierInfo],
    ) -> Option<HashSet<usize>> {
        let mut at = HashSet::new();
        for key in changed {
            let Some(old) = changes.get(*key)? else {
                continue;
            };
            let sort_key = model::state::policy_sort_key(old, tiers)?;
            let i = self
                .policies
                .partition_point(|p| sort_key_order(&p.sort_key(), &sort_key).is_lt());
            let p = self.policies.get(i)?;
            (sort_key_order(&p.sort_key(), &sort_key).is_eq()).then_some(())?;
            at.insert(i);
        }
        Some(at)
    }

    /// The policy list after the policy changes in `changes` (`None`: there
    /// are none), and the local endpoints whose chains they touch: those
    /// using a policy that changed or went, and those a new or changed
    /// policy selects; `tier_policies` count as changed
    /// ([`IncrementalCompiler::tier_changes`]). Only the changed policies
    /// are resolved again; the others keep their relative order.
    fn policy_swap(
        &self,
        state: &ClusterState,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
        tier_policies: &[ResourceKey],
    ) -> Option<PolicySwap> {
        let changed: HashSet<&ResourceKey> = changes
            .keys()
            .filter(|k| matches!(k.kind, Kind::NetworkPolicy | Kind::GlobalNetworkPolicy))
            .chain(tier_policies)
            .collect();
        if changed.is_empty() {
            return None;
        }
        let tiers = state.tiers();
        let mut fresh: Vec<ResolvedPolicy> = changed
            .iter()
            .filter_map(|k| state.get(k))
            .filter_map(|r| resolve_policy(&r, &tiers))
            // A policy that does not resolve is left out, as a full compile
            // leaves it out (its error is in the rejected list).
            .filter_map(Result::ok)
            .collect();
        fresh.sort_by(policy_order);
        // By id: comparing keys would format one per policy in the cluster.
        let changed_ids: HashSet<PolicyId> = changed
            .iter()
            .map(|k| match k.kind {
                Kind::GlobalNetworkPolicy => PolicyId::Global(k.name.to_string()),
                _ => PolicyId::namespaced(k.namespace.as_deref().unwrap_or("default"), &k.name),
            })
            .collect();
        let every_id = || -> HashSet<usize> {
            // A few changed ids are compared with each policy's, which
            // costs less than hashing 10,000 ids.
            let few: Vec<&PolicyId> = changed_ids.iter().collect();
            (0..self.policies.len())
                .filter(|&i| {
                    let id = &self.policies[i].id;
                    if few.len() <= 8 {
                        few.contains(&id)
                    } else {
                        changed_ids.contains(id)
                    }
                })
                .collect()
        };
        let mut gone = match tier_policies.is_empty() {
            true => self.find_by_old_key(changes, &changed, &tiers),
            false => None,
        }
        .unwrap_or_else(every_id);
        debug_assert_eq!(gone, every_id(), "binary search found what a scan finds");
        // A policy that resolves as before apart from its tier (its tier's
        // order or default action changed, or it moved to another tier)
        // keeps its chain, which does not depend on the tier: it only
        // moves, and the endpoints using it are redone (their chains hold
        // the tier blocks).
        let mut retiered: Vec<(usize, TierInfo, usize)> = Vec::new();
        if !gone.is_empty() && !fresh.is_empty() {
            let at: HashMap<&PolicyId, usize> =
                gone.iter().map(|&i| (&self.policies[i].id, i)).collect();
            fresh.retain(|p| match at.get(&p.id) {
                Some(&i) if same_but_tier(&self.policies[i], p) => {
                    retiered.push((i, p.tier.clone(), p.tier_rank));
                    false
                }
                _ => true,
            });
            for (i, _, _) in &retiered {
                gone.remove(i);
            }
        }
        // Old positions whose policy leaves its place: changed (gone) or
        // retiered.
        let mut leaves = vec![false; self.policies.len()];
        for &i in gone.iter().chain(retiered.iter().map(|(i, _, _)| i)) {
            leaves[i] = true;
        }
        // The kept policies, still in order.
        let kept: Vec<usize> = (0..self.policies.len()).filter(|&i| !leaves[i]).collect();
        // What goes into the kept list, in order: the fresh policies and
        // the retiered ones (as their new tier places them), each with its
        // place among the kept ones (after every kept one that sorts
        // before or equal), found by binary search: a sort key formats the
        // id, so only O(log n) of them are made, not one per kept policy.
        let mut incoming: Vec<(Incoming, (usize, f64, String))> = fresh
            .iter()
            .enumerate()
            .map(|(f, p)| (Incoming::Fresh(f), p.sort_key()))
            .chain(retiered.iter().map(|(i, _, rank)| {
                let mut key = self.policies[*i].sort_key();
                key.0 = *rank;
                (Incoming::Retiered(*i), key)
            }))
            .collect();
        incoming.sort_by(|(_, a), (_, b)| sort_key_order(a, b));
        let incoming: Vec<(Incoming, usize)> = incoming
            .into_iter()
            .map(|(what, key)| {
                let at = kept.partition_point(|&i| {
                    sort_key_order(&self.policies[i].sort_key(), &key).is_le()
                });
                (what, at)
            })
            .collect();
        // Where the kept policies and the incoming ones go in the merged
        // list; the list itself is built when the swap is applied, moving
        // the policies rather than copying them.
        let mut moved = vec![None; self.policies.len()];
        let mut placed = vec![0; fresh.len()];
        let mut next = 0;
        let mut incoming = incoming.into_iter().peekable();
        let mut place = |what: Incoming, at: usize, moved: &mut Vec<Option<usize>>| match what {
            Incoming::Fresh(f) => placed[f] = at,
            Incoming::Retiered(i) => moved[i] = Some(at),
        };
        for (t, &i) in kept.iter().enumerate() {
            while let Some((what, _)) = incoming.next_if(|(_, at)| *at <= t) {
                place(what, next, &mut moved);
                next += 1;
            }
            moved[i] = Some(next);
            next += 1;
        }
        for (what, _) in incoming {
            place(what, next, &mut moved);
            next += 1;
        }
        let node = &self.options().node;
        let selecting: Vec<&ResolvedPolicy> = fresh
            .iter()
            .chain(retiered.iter().map(|(i, _, _)| &*self.policies[*i]))
            .collect();
        let endpoints = self
            .uses
            .values()
            .filter(|u| {
                let uses_gone = [&u.egress, &u.ingress]
                    .into_iter()
                    .flatten()
                    .any(|&i| leaves[i]);
                // A direction a policy rejects lists no policies: the
                // rejecting one is named in the rejection.
                let rejected_by_changed = [&u.egress_rejected, &u.ingress_rejected]
                    .into_iter()
                    .flatten()
                    .any(|r| {
                        matches!(&r.object, RejectedObject::Policy(id) if changed_ids.contains(id))
                    });
                uses_gone
                    || rejected_by_changed
                    || (!selecting.is_empty()
                        && match state.endpoint(&u.key) {
                            Some(w) if &w.spec.node == node => {
                                // Retiered ones too: a direction some
                                // rejected policy drops lists no policies,
                                // and the one named first may have moved.
                                let labels = state.endpoint_labels(w);
                                selecting.iter().any(|p| p.selector.matches(&labels))
                            }
                            _ => false,
                        })
            })
            .map(|u| u.key.clone())
            .collect();
        let fresh = fresh.into_iter().map(Box::new).collect();
        Some(PolicySwap {
            fresh,
            placed,
            moved,
            retiered,
            endpoints,
        })
    }

    /// Some selector set in `net_changes` now needs the other nft set type.
    fn set_type_flips(&self, net_changes: &HashMap<String, NetChanges>) -> bool {
        net_changes.keys().any(|id| {
            let hosts = self.sets.get(id).is_some_and(|m| m.wide_nets == 0);
            self.ruleset.tables.iter().any(|t| {
                t.sets.get(&ip_set_name(id, t.family)).is_some_and(|s| {
                    matches!(s.key, SetKey::Host | SetKey::Addr) && (s.key == SetKey::Host) != hosts
                })
            })
        })
    }

    /// Keeps the ruleset's list of rejected objects (in key order, as a full
    /// compile makes it) up to date with the changed endpoints and sets.
    fn note_rejections(
        &mut self,
        state: &ClusterState,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
        tier_policies: &[ResourceKey],
    ) {
        let rejected = &mut self.logical.as_mut().expect("checked by update").rejected;
        // Only a policy's rejection depends on the tiers (pod changes, the
        // common case, skip working them out).
        let tiers = if !tier_policies.is_empty()
            || changes
                .keys()
                .any(|k| matches!(k.kind, Kind::NetworkPolicy | Kind::GlobalNetworkPolicy))
        {
            state.tiers()
        } else {
            vec![]
        };
        for key in changes.keys().chain(tier_policies) {
            let at = rejected.partition_point(|(k, _)| k < key);
            if rejected.get(at).is_some_and(|(k, _)| k == key) {
                rejected.remove(at);
            }
            if let Some(why) = state.get(key).and_then(|r| rejection_of(&r, &tiers)) {
                rejected.insert(at, (key.clone(), why));
            }
        }
    }

    /// Every change is to an endpoint, a network set, a Node, a policy or a
    /// profile; local endpoint changes leave one endpoint per interface name.
    fn can_patch(
        &self,
        state: &ClusterState,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
    ) -> bool {
        let patchable = changes.keys().all(|key| {
            matches!(
                key.kind,
                Kind::WorkloadEndpoint
                    | Kind::NetworkSet
                    | Kind::GlobalNetworkSet
                    | Kind::Node
                    | Kind::NetworkPolicy
                    | Kind::GlobalNetworkPolicy
                    | Kind::Profile
                    | Kind::Tier
            )
        });
        if !patchable {
            return false;
        }
        let redoes = changes.keys().any(|key| {
            matches!(
                key.kind,
                Kind::NetworkPolicy | Kind::GlobalNetworkPolicy | Kind::Profile | Kind::Tier
            )
        });
        if redoes && self.shared_interfaces {
            return false;
        }
        let node = &self.options().node;
        fn local_iface<'r>(r: Option<&'r Resource>, node: &str) -> Option<&'r str> {
            match r {
                Some(Resource::WorkloadEndpoint(w)) if w.spec.node == node => {
                    Some(w.spec.interface_name.as_str())
                }
                _ => None,
            }
        }
        let leaving: HashSet<&ResourceKey> = changes
            .iter()
            .filter(|(_, old)| local_iface(old.as_ref(), node).is_some())
            .map(|(k, _)| k)
            .collect();
        if !leaving.is_empty() && self.shared_interfaces {
            return false;
        }
        let logical = self.logical.as_ref().expect("checked by update");
        let mut coming = HashSet::new();
        for key in changes.keys() {
            let Some(iface) = state
                .endpoint(key)
                .filter(|w| w.spec.node == *node)
                .map(|w| w.spec.interface_name.as_str())
            else {
                continue;
            };
            if self.shared_interfaces || !coming.insert(iface) {
                return false;
            }
            if let Some(e) = logical.endpoints.get(iface) {
                if !leaving.contains(&e.key) {
                    return false;
                }
            }
        }
        true
    }

    /// Works out the member changes of the existing sets.
    fn member_changes(
        &mut self,
        state: &ClusterState,
        changes: &BTreeMap<ResourceKey, Option<Resource>>,
    ) -> (HashMap<String, NetChanges>, HashMap<String, NamedChanges>) {
        let mut net_changes: HashMap<String, NetChanges> = HashMap::new();
        let mut named_changes: HashMap<String, NamedChanges> = HashMap::new();
        // What each changed profile applied before the changes: objects are
        // compared as they were (old value, old profile labels) and are.
        let old_profiles: HashMap<&str, Option<&Labels>> = changes
            .iter()
            .filter(|(key, _)| key.kind == Kind::Profile)
            .map(|(key, old)| {
                let labels = match old {
                    Some(Resource::Profile(p)) => Some(&p.spec.labels_to_apply),
                    _ => None,
                };
                (key.name.as_str(), labels)
            })
            .collect();
        let old_labels = |name: &str| match old_profiles.get(name) {
            Some(labels) => *labels,
            None => state.profile(name).map(|p| &p.spec.labels_to_apply),
        };
        // Objects that did not change but inherit labels from a profile
        // whose labels did: a namespace relabelled relabels its pods.
        let relabelled: HashSet<&str> = old_profiles
            .iter()
            .filter(|(name, old)| **old != state.profile(name).map(|p| &p.spec.labels_to_apply))
            .map(|(name, _)| *name)
            .collect();
        // Owned: an endpoint is rebuilt from what the state keeps of it.
        let inheriting: Vec<(ResourceKey, Resource)> = if relabelled.is_empty() {
            vec![]
        } else {
            state
                .entries()
                .filter(|(key, e)| inherits_from(*e, &relabelled) && !changes.contains_key(key))
                .map(|(key, e)| (key.clone(), e.to_resource()))
                .collect()
        };
        let all = changes
            .iter()
            .map(|(key, old)| (key, old.as_ref()))
            .chain(inheriting.iter().map(|(key, r)| (key, Some(r))));
        for (key, old) in all {
            let before = old.and_then(|r| state.labelled_with(r, &old_labels));
            let after = state.labelled_at(key);
            if let (Some(b), Some(a)) = (&before, &after) {
                if b.labels.to_labels() == a.labels.to_labels()
                    && b.nets == a.nets
                    && b.endpoint.map(|e| e.ports) == a.endpoint.map(|e| e.ports)
                {
                    continue;
                }
            }
            self.objects.relabel(
                key,
                before.as_ref().map(|b| &b.labels),
                after.as_ref().map(|a| &a.labels),
            );
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
        (net_changes, named_changes)
    }

    /// Local endpoints in `local` changed: rebuilds their chains, starts
    /// and stops policy and profile chains (and the IP sets their rules
    /// use), and returns the nftables objects that changed.
    fn patch_local(
        &mut self,
        state: &ClusterState,
        local: &[&ResourceKey],
        (swap, only_policies): (Option<PolicySwap>, &BTreeSet<ResourceKey>),
        changed_profiles: &BTreeSet<String>,
        (mut net_changes, mut named_changes): (MemberChanges, HashMap<String, NamedChanges>),
        relower: BTreeSet<String>,
    ) -> RulesetPatch {
        let opts = self.options().clone();
        let mut logical = self.logical.take().expect("checked by update");
        // Endpoint chains whose fused lookups change shape are lowered again.
        let mut changed_chains: BTreeSet<String> = relower;
        // Reference counts before this change, of what it touches.
        let mut policies_before: BTreeMap<(usize, PolicyType), u32> = BTreeMap::new();
        let mut profiles_before: BTreeMap<String, u32> = BTreeMap::new();
        let mut maybe_unused_sets: Vec<String> = Vec::new();

        // What the endpoints redone only for policy changes used before.
        let mut carried: HashMap<&ResourceKey, EndpointUse> = HashMap::new();
        // Endpoints that leave (or change): their chains go.
        for key in local {
            let Some(u) = self.uses.remove(*key) else {
                continue;
            };
            let ep = logical
                .endpoints
                .remove(&u.interface)
                .expect("every local endpoint has its dispatch entry");
            for name in [ep.from_chain, ep.to_chain] {
                if let Some(c) = logical.chains.remove(&name) {
                    self.unref_chain(&c, &mut maybe_unused_sets);
                }
                changed_chains.insert(name);
            }
            refer_use(
                &mut self.policy_refs,
                &mut self.profile_refs,
                &u,
                -1,
                |p, before| note_before(&mut policies_before, &mut profiles_before, p, before),
            );
            if only_policies.contains(*key) {
                carried.insert(*key, u);
            }
        }
        // Policies changed: the endpoints that used a changed or deleted
        // one have left above, so those policies' chains stop here; the
        // positions of the others move to the new list.
        let policies_swapped = swap.is_some();
        // The changed policies' old versions: no longer active unless
        // their new version is started below.
        let mut gone_ids: Vec<PolicyId> = Vec::new();
        if let Some(swap) = &swap {
            gone_ids = (0..swap.moved.len())
                .filter(|&i| swap.moved[i].is_none())
                .map(|i| self.policies[i].id.clone())
                .collect();
        }
        let mut swap = swap;
        if let Some(swap) = &mut swap {
            let mut remapped = BTreeMap::new();
            for ((i, dir), before) in policies_before {
                match swap.moved[i] {
                    Some(j) => {
                        remapped.insert((j, dir), before);
                    }
                    None => {
                        let name = policy_chain(&self.policies[i].id, dir);
                        if before > 0 {
                            if let Some(c) = logical.chains.remove(&name) {
                                self.unref_chain(&c, &mut maybe_unused_sets);
                            }
                            changed_chains.insert(name);
                        }
                    }
                }
            }
            policies_before = remapped;
            for u in self.uses.values_mut() {
                for i in u.egress.iter_mut().chain(u.ingress.iter_mut()) {
                    *i = swap.moved[*i].expect("endpoints not redone use unchanged policies");
                }
            }
            self.policies = swap.apply(std::mem::take(&mut self.policies));
            self.policy_refs.remap(&swap.moved, self.policies.len());
        }
        // Endpoints that come (or change): what they use.
        let coming: Vec<EndpointUse> = local
            .iter()
            .filter_map(|key| match state.endpoint(key) {
                Some(w) if w.spec.node == opts.node => Some(
                    carried
                        .remove(*key)
                        .zip(swap.as_ref())
                        .and_then(|(old, swap)| swap.carried_use(state, old, w, &self.policies))
                        .unwrap_or_else(|| EndpointUse::of(state, key, w, &self.policies)),
                ),
                _ => None,
            })
            .collect();
        for u in &coming {
            refer_use(
                &mut self.policy_refs,
                &mut self.profile_refs,
                u,
                1,
                |p, before| note_before(&mut policies_before, &mut profiles_before, p, before),
            );
        }
        let policy_now = |refs: &PolicyRefs, p| refs.get(p);
        let started_policies: Vec<(usize, PolicyType)> = policies_before
            .iter()
            .filter(|(p, before)| **before == 0 && policy_now(&self.policy_refs, **p) > 0)
            .map(|(p, _)| *p)
            .collect();
        let stopped_policies: Vec<(usize, PolicyType)> = policies_before
            .iter()
            .filter(|(p, before)| **before > 0 && policy_now(&self.policy_refs, **p) == 0)
            .map(|(p, _)| *p)
            .collect();
        let profile_now = |name: &str| self.profile_refs.get(name).copied().unwrap_or(0);
        // Changed profiles still in use are built again.
        let started_profiles: Vec<String> = profiles_before
            .iter()
            .filter(|(n, before)| {
                profile_now(n) > 0 && (**before == 0 || changed_profiles.contains(*n))
            })
            .map(|(n, _)| n.clone())
            .collect();
        let stopped_profiles: Vec<String> = profiles_before
            .iter()
            .filter(|(n, before)| **before > 0 && profile_now(n) == 0)
            .map(|(n, _)| n.clone())
            .collect();
        self.profile_refs.retain(|_, n| *n > 0);

        // Chains no local endpoint needs any more.
        let mut stopped_chains: Vec<String> = stopped_policies
            .iter()
            .map(|(i, dir)| policy_chain(&self.policies[*i].id, *dir))
            .collect();
        for name in &stopped_profiles {
            for dir in [PolicyType::Ingress, PolicyType::Egress] {
                stopped_chains.push(profile_chain(name, dir));
            }
        }
        for name in stopped_chains {
            if let Some(c) = logical.chains.remove(&name) {
                self.unref_chain(&c, &mut maybe_unused_sets);
            }
            changed_chains.insert(name);
        }

        // New chains: built first without labelled objects, which is
        // enough when every IP set they use exists; if one is new, built
        // again with all of them so that new sets get their members.
        let marks = logical.marks;
        let ip_sets = std::mem::take(&mut logical.ip_sets);
        let wanted = NewChains {
            state,
            policies: &self.policies,
            endpoints: &coming,
            policy_chains: &started_policies,
            profiles: &started_profiles,
        };
        let log_denied = opts.log_denied;
        let (endpoints, chains, mut ip_sets, members) = wanted.build(Builder::new(
            marks,
            log_denied,
            opts.encap,
            &opts.node,
            &[],
            ip_sets,
            true,
        ));
        let (endpoints, chains) = if members.is_empty() {
            logical.ip_sets = ip_sets;
            (endpoints, chains)
        } else {
            // The new sets' members: among the objects the label index
            // gives for their selectors when every one requires a label
            // value, else among every labelled object.
            let new_sets: Vec<IpSet> = members.keys().filter_map(|id| ip_sets.remove(id)).collect();
            let (nets, scans) = match self.candidate_objects(&new_sets) {
                Some(keys) => (
                    keys.iter().filter_map(|k| state.labelled_at(k)).collect(),
                    usize::MAX,
                ),
                None => (state.labelled_nets(), UNINDEXED_SCANS),
            };
            let (endpoints, chains, ip_sets, members) = wanted.build(
                Builder::new(
                    marks, log_denied, opts.encap, &opts.node, &nets, ip_sets, true,
                )
                .scan_first(scans),
            );
            for (id, objects) in &members {
                let m = Membership::of(&ip_sets[id], objects, &nets);
                self.add_set(id.clone(), m);
            }
            logical.ip_sets = ip_sets;
            (endpoints, chains)
        };
        for c in chains {
            if let Some(old) = logical.chains.remove(&c.name) {
                self.unref_chain(&old, &mut maybe_unused_sets);
            }
            for id in chain_ip_sets(&c) {
                *self.set_refs.entry(id.to_owned()).or_default() += 1;
            }
            changed_chains.insert(c.name.clone());
            logical.chains.insert(c.name.clone(), c);
        }
        for e in endpoints {
            logical.endpoints.insert(e.interface.clone(), e);
        }
        for u in coming {
            self.uses.insert(u.key.clone(), u);
        }
        if policies_swapped || !started_policies.is_empty() || !stopped_policies.is_empty() {
            // The sorted list of active policies, patched: out go the
            // changed policies' old versions and those no endpoint uses in
            // either direction now; in come those that started.
            let active = &mut logical.active_policies;
            let in_use = |j: usize| self.policy_refs.in_use(j);
            let stopped_ids = stopped_policies
                .iter()
                .filter(|(j, _)| !in_use(*j))
                .map(|(j, _)| &self.policies[*j].id);
            for id in gone_ids.iter().chain(stopped_ids) {
                if let Ok(at) = active.binary_search(id) {
                    active.remove(at);
                }
            }
            for (j, _) in &started_policies {
                let id = &self.policies[*j].id;
                if let Err(at) = active.binary_search(id) {
                    active.insert(at, id.clone());
                }
            }
        }
        // IP sets no chain uses any more.
        for id in maybe_unused_sets {
            if self.set_refs.get(&id) == Some(&0) {
                self.set_refs.remove(&id);
                logical.ip_sets.remove(&id);
                self.remove_set(&id);
                net_changes.remove(&id);
                named_changes.remove(&id);
            }
        }
        self.logical = Some(logical);

        let mut elements = self.apply_changes(net_changes, named_changes);
        let (tables, fused_changes) = self.patch_tables(&changed_chains);
        // Sets the patch creates are made with their elements, sets it
        // deletes need none.
        elements.sets.retain(|d| {
            !tables
                .iter()
                .any(|t| t.family == d.family && t.sets.contains_key(&d.set))
        });
        elements.sets.extend(fused_changes);
        RulesetPatch { tables, elements }
    }

    /// A chain goes: one user fewer for each IP set it uses.
    fn unref_chain(&mut self, c: &LChain, maybe_unused: &mut Vec<String>) {
        for id in chain_ip_sets(c) {
            if let Some(n) = self.set_refs.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    maybe_unused.push(id.to_owned());
                }
            }
        }
    }

    /// Lowers the changed chains into the nftables ruleset, with the sets
    /// they start or stop using and the dispatch maps, and returns what
    /// changed per table, and the element changes of fused sets that stay
    /// (an endpoint chain lowered again may give one new elements).
    fn patch_tables(
        &mut self,
        changed_chains: &BTreeSet<String>,
    ) -> (Vec<TablePatch>, Vec<SetDelta>) {
        let logical = self.logical.as_ref().expect("patched");
        // `--fused-lookup`: endpoint chains → ingress.
        let endpoint_chains: HashMap<&str, bool> = if logical.fused_lookup {
            logical
                .endpoints
                .values()
                .flat_map(|e| [(e.to_chain.as_str(), true), (e.from_chain.as_str(), false)])
                .collect()
        } else {
            HashMap::new()
        };
        let mut fused_changes = Vec::new();
        let mut patches = Vec::new();
        for table in &mut self.ruleset.tables {
            let family = table.family;
            let refs = self.nft_set_refs.entry(family).or_default();
            let mut patch = TablePatch::new(family, &table.name);
            let mut maybe_unused: Vec<String> = Vec::new();
            for name in changed_chains {
                if let Some(old) = table.chains.remove(name) {
                    for set in referenced_sets(&old).collect::<BTreeSet<_>>() {
                        if let Some(n) = refs.get_mut(set) {
                            *n -= 1;
                            if *n == 0 {
                                maybe_unused.push(set.to_owned());
                            }
                        }
                    }
                }
                if logical.fused_lookup {
                    self.fused.chain_removed(family, name);
                }
                let Some(lc) = logical.chains.get(name) else {
                    patch.chains.insert(name.clone(), None);
                    continue;
                };
                let (chain, sets, mut fused_sets) = match endpoint_chains.get(name.as_str()) {
                    Some(&ingress) => {
                        let f = fused::fuse_chain(logical, family, lc, ingress);
                        self.fused.chain_lowered(family, name, &f.deps);
                        let (chain, sets) = f
                            .lowered
                            .unwrap_or_else(|| lower_chain(logical, family, lc));
                        (chain, sets, f.fused)
                    }
                    None => {
                        let (chain, sets) = lower_chain(logical, family, lc);
                        (chain, sets, vec![])
                    }
                };
                for (set_name, set) in sets {
                    *refs.entry(set_name.clone()).or_default() += 1;
                    let at = fused_sets.iter().position(|(n, _)| *n == set_name);
                    match table.sets.entry(set_name.clone()) {
                        std::collections::btree_map::Entry::Vacant(slot) => {
                            patch.sets.insert(set_name.clone(), Some(set.clone()));
                            slot.insert(set);
                        }
                        // A fused set stays under its name while its
                        // elements change.
                        std::collections::btree_map::Entry::Occupied(mut slot)
                            if at.is_some() && slot.get().elements != set.elements =>
                        {
                            fused_changes.push(fused::element_delta(
                                family,
                                &table.name,
                                slot.get(),
                                &set,
                            ));
                            slot.get_mut().elements = set.elements;
                        }
                        std::collections::btree_map::Entry::Occupied(_) => {}
                    }
                    if let Some(at) = at {
                        let (_, sources) = fused_sets.swap_remove(at);
                        self.fused.set_sources(family, &set_name, sources);
                    }
                }
                table.chains.insert(name.clone(), chain.clone());
                patch.chains.insert(name.clone(), Some(chain));
            }
            for set in maybe_unused {
                if refs.get(&set) == Some(&0) {
                    refs.remove(&set);
                    table.sets.remove(&set);
                    if self.fused.is_fused(family, &set) {
                        self.fused.set_removed(family, &set);
                    }
                    patch.sets.insert(set, None);
                }
            }
            for map in dispatch_maps(logical) {
                if table.maps.get(&map.name) != Some(&map) {
                    table.maps.insert(map.name.clone(), map.clone());
                    patch.maps.insert(map.name.clone(), Some(map));
                }
            }
            if !patch.is_empty() {
                patches.push(patch);
            }
        }
        (patches, fused_changes)
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
                    table: table.name.clone(),
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

/// New sets a patch fills by scanning every labelled object before it
/// indexes them ([`Builder::scan_first`]): a policy adds a few.
const UNINDEXED_SCANS: usize = 8;

/// A policy change: the new policy list, where each old position went
/// (`None`: the policy changed or went), and the local endpoints to redo.
struct PolicySwap {
    /// The changed policies as they are now, in order, and their positions
    /// in the new list.
    fresh: PolicyList,
    placed: Vec<usize>,
    moved: Vec<Option<usize>>,
    /// Kept policies (old position) with their new tier and tier rank.
    retiered: Vec<(usize, TierInfo, usize)>,
    endpoints: Vec<ResourceKey>,
}

/// A policy joining the kept ones in [`IncrementalCompiler::policy_swap`].
#[derive(Debug, Clone, Copy)]
enum Incoming {
    /// `fresh[_]`.
    Fresh(usize),
    /// A kept policy (old position) with a new tier.
    Retiered(usize),
}

/// Whether `a` and `b` resolved the same apart from their tier.
fn same_but_tier(a: &ResolvedPolicy, b: &ResolvedPolicy) -> bool {
    // Destructured whole, so that a field added to `ResolvedPolicy` must be
    // placed here (a field left out would let a changed policy keep its
    // old chain).
    let ResolvedPolicy {
        id,
        tier: _,
        tier_rank: _,
        order,
        selector,
        types,
        ingress,
        egress,
        rejected,
    } = a;
    *id == b.id
        && *order == b.order
        && *selector == b.selector
        && *types == b.types
        && *ingress == b.ingress
        && *egress == b.egress
        && *rejected == b.rejected
}

impl PolicySwap {
    /// The new policy list, made of `old` (moved, not copied) and the
    /// fresh; `moved` and `placed` stay to map positions.
    fn apply(&mut self, mut old: PolicyList) -> PolicyList {
        for (i, tier, rank) in std::mem::take(&mut self.retiered) {
            old[i].tier = tier;
            old[i].tier_rank = rank;
        }
        let mut slots: Vec<Option<Box<ResolvedPolicy>>> = Vec::new();
        slots.resize_with(
            self.placed.len() + self.moved.iter().flatten().count(),
            || None,
        );
        for (p, j) in old.into_iter().zip(&self.moved) {
            if let Some(j) = j {
                slots[*j] = Some(p);
            }
        }
        for (p, j) in std::mem::take(&mut self.fresh)
            .into_iter()
            .zip(&self.placed)
        {
            slots[*j] = Some(p);
        }
        slots
            .into_iter()
            .map(|p| p.expect("every position is filled once"))
            .collect()
    }

    /// What local endpoint `key` uses after the swap, from what it used
    /// before (`old`, positions in the old list), when only policies
    /// changed for it (not its labels, profiles or node): the kept
    /// policies it used, at their new positions, and the fresh ones that
    /// select it — instead of matching every policy's selector again.
    /// `None` when `old` had a direction rejected (its lists are empty
    /// then, so they cannot be carried over).
    fn carried_use(
        &self,
        state: &ClusterState,
        old: EndpointUse,
        ep: &Endpoint,
        policies: &[Box<ResolvedPolicy>],
    ) -> Option<EndpointUse> {
        if old.egress_rejected.is_some() || old.ingress_rejected.is_some() {
            return None;
        }
        let labels = state.endpoint_labels(ep);
        let mut u = old;
        for dir in [PolicyType::Egress, PolicyType::Ingress] {
            let list = u.selected_mut(dir);
            let mut now: Vec<usize> = list.iter().filter_map(|&i| self.moved[i]).collect();
            now.extend(self.placed.iter().copied().filter(|&j| {
                let p = &policies[j];
                p.applies(dir) && p.selector.matches(&labels)
            }));
            now.sort_unstable();
            *list = now;
        }
        // As `EndpointUse::of` decides it, on the new lists.
        u.settle_rejections(state, ep, policies);
        Some(u)
    }
}

/// Chains a local endpoint change needs built: the endpoints' own, and
/// those of policies and profiles that start applying on this node.
struct NewChains<'s> {
    state: &'s ClusterState,
    policies: &'s [Box<ResolvedPolicy>],
    endpoints: &'s [EndpointUse],
    policy_chains: &'s [(usize, PolicyType)],
    profiles: &'s [String],
}

/// Built chains: dispatch entries, chains, every IP set, and the member
/// objects of the IP sets created while building.
type BuiltChains = (
    Vec<LocalEndpoint>,
    Vec<LChain>,
    BTreeMap<String, IpSet>,
    HashMap<String, Vec<usize>>,
);

impl NewChains<'_> {
    fn build(&self, mut b: Builder<'_>) -> BuiltChains {
        let mut endpoints = Vec::new();
        let mut chains = Vec::new();
        for u in self.endpoints {
            let (e, c) = b.endpoint_chains(u, self.policies);
            endpoints.push(e);
            chains.extend(c);
        }
        for (i, dir) in self.policy_chains {
            chains.push(b.policy_chain(&self.policies[*i], *dir));
        }
        for name in self.profiles {
            chains.extend(b.profile_chains(self.state, name));
        }
        let (ip_sets, members) = b.finish();
        (endpoints, chains, ip_sets, members.unwrap_or_default())
    }
}

/// Something a local endpoint's chains use.
enum Used<'a> {
    Policy((usize, PolicyType)),
    Profile(&'a str),
}

/// Adds `delta` (±1) to the counts of the policies and profiles `u` uses,
/// telling `note` each one's count before.
fn refer_use(
    policy_refs: &mut PolicyRefs,
    profile_refs: &mut HashMap<String, u32>,
    u: &EndpointUse,
    delta: i32,
    mut note: impl FnMut(Used<'_>, u32),
) {
    for dir in [PolicyType::Egress, PolicyType::Ingress] {
        for &i in u.selected(dir) {
            let n = policy_refs.count_mut((i, dir));
            note(Used::Policy((i, dir)), *n);
            *n = n.checked_add_signed(delta).expect("use counts stay >= 0");
        }
    }
    let profiles: BTreeSet<&String> = u.profiles.iter().collect();
    for name in profiles {
        let n = profile_refs.entry(name.clone()).or_default();
        note(Used::Profile(name), *n);
        *n = n.checked_add_signed(delta).expect("use counts stay >= 0");
    }
}

/// (policy position, direction) → how many local endpoints use it: a
/// vector by position, because a policy change moves positions
/// ([`PolicySwap`]) and moving plain counts costs a copy where a map
/// keyed by position cost a hash per active policy.
#[derive(Debug, Clone, Default)]
struct PolicyRefs(Vec<[u32; 2]>);

impl PolicyRefs {
    fn slot(dir: PolicyType) -> usize {
        match dir {
            PolicyType::Egress => 0,
            PolicyType::Ingress => 1,
        }
    }

    fn get(&self, (i, dir): (usize, PolicyType)) -> u32 {
        self.0.get(i).map_or(0, |c| c[Self::slot(dir)])
    }

    fn count_mut(&mut self, (i, dir): (usize, PolicyType)) -> &mut u32 {
        if i >= self.0.len() {
            self.0.resize(i + 1, [0; 2]);
        }
        &mut self.0[i][Self::slot(dir)]
    }

    /// Used in either direction.
    fn in_use(&self, i: usize) -> bool {
        self.0.get(i).is_some_and(|c| c != &[0; 2])
    }

    /// The counts at the policies' new positions (`moved[i]`: where the
    /// policy at `i` went, `None`: it went, and nothing may use it), for a
    /// list of `len` policies.
    fn remap(&mut self, moved: &[Option<usize>], len: usize) {
        let mut next = vec![[0; 2]; len];
        for (i, counts) in self.0.iter().enumerate() {
            match moved.get(i).copied().flatten() {
                Some(j) => next[j] = *counts,
                None => {
                    debug_assert_eq!(counts, &[0; 2], "every user of a changed policy was redone")
                }
            }
        }
        self.0 = next;
    }
}

/// Remembers the first count seen (the count before this change).
fn note_before(
    policies: &mut BTreeMap<(usize, PolicyType), u32>,
    profiles: &mut BTreeMap<String, u32>,
    used: Used<'_>,
    before: u32,
) {
    match used {
        Used::Policy(p) => {
            policies.entry(p).or_insert(before);
        }
        Used::Profile(name) => {
            profiles.entry(name.to_owned()).or_insert(before);
        }
    }
}

/// Whether `r` takes labels from one of `profiles` (an endpoint using it,
/// or a network set in the namespace it is the profile of).
fn inherits_from(e: Entry<'_>, profiles: &HashSet<&str>) -> bool {
    match e {
        Entry::Endpoint(_, w) => w
            .spec
            .profiles
            .iter()
            .any(|p| profiles.contains(p.as_str())),
        Entry::Resource(Resource::NetworkSet(n)) => profiles.contains(
            namespace_profile_name(n.metadata.namespace.as_deref().unwrap_or("default")).as_str(),
        ),
        _ => false,
    }
}

/// The IP sets a chain's rules use.
fn chain_ip_sets(c: &LChain) -> BTreeSet<&str> {
    c.rules
        .iter()
        .filter_map(|r| r.policy_match.as_ref())
        .flat_map(|m| [&m.src, &m.dst])
        .flat_map(|e| {
            [
                &e.selector_set,
                &e.not_selector_set,
                &e.named_port_set,
                &e.not_named_port_set,
            ]
        })
        .filter_map(|id| id.as_deref())
        .collect()
}
