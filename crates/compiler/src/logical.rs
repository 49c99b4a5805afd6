//! Cluster state + node → felix's logical ruleset: the chain tree with
//! felix's names and order, rules as conditions + actions, IP sets with
//! members, and the mark bits. Backend-neutral: the nftables and iptables
//! renderings are both derived from this.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use base64::Engine;
use ipnet::IpNet;
use model::calico::{Action, PolicyType, Port, ResourceKey, TierAction};
use model::endpoint::{Endpoint, EndpointFacts};
use model::selector::Selector;
use model::state::{
    ClusterState, Encap, LabelledNets, PolicyId, Rejection, ResolvedEntity, ResolvedPolicy,
    ResolvedRule, WorkloadEncap, IPIP_PROTOCOL,
};
use sha2::{Digest, Sha224};

use crate::label_index::LabelIndex;

pub const CHAIN_FORWARD: &str = "cali-FORWARD";
pub const CHAIN_INPUT: &str = "cali-INPUT";
pub const CHAIN_FROM_WL_DISPATCH: &str = "cali-from-wl-dispatch";
pub const CHAIN_TO_WL_DISPATCH: &str = "cali-to-wl-dispatch";
pub const CHAIN_WL_TO_HOST: &str = "cali-wl-to-host";
pub const WORKLOAD_IFACE_PREFIX: &str = "cali";
pub const DEFAULT_MARK_MASK: u32 = 0xffff_0000;
/// Felix's prefix for packets logged by a Log rule.
pub const LOG_PREFIX: &str = "calico-packet";
/// Start of the prefix of `--log-denied` records: `DROP <policy-id> …`.
pub const DENY_LOG_PREFIX: &str = "DROP";
/// nftables' limit on a log prefix (NF_LOG_PREFIXLEN without the NUL).
pub const MAX_LOG_PREFIX: usize = 127;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("mark mask {mask:#010x} has {bits} bit(s) set; nftpolicy needs at least 4 (accept, pass, scratch0, scratch1)")]
    MarkMask { mask: u32, bits: u32 },
}

/// What to do with traffic from a workload to the host itself, after the
/// workload's egress policy allowed it (felix's DefaultEndpointToHostAction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointToHostAction {
    /// Calico's manifests' setting: pods may reach their node (DNS caches,
    /// node-local services) once egress policy allows.
    #[default]
    Accept,
    Drop,
    /// Leave the decision to the rest of the host's INPUT rules.
    Return,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileOptions {
    pub node: String,
    pub mark_mask: u32,
    pub endpoint_to_host: EndpointToHostAction,
    /// `--log-denied`: an NFLOG record before every policy drop.
    pub log_denied: Option<LogDenied>,
    /// Encapsulated packets workloads may send (felix drops VXLAN and
    /// IP-in-IP from workloads unless told otherwise).
    pub encap: WorkloadEncap,
    /// `--fused-lookup`: fusable policies as one set lookup per endpoint
    /// chain in the nftables lowering ([`crate::fused`]).
    pub fused_lookup: bool,
}

/// Rate-limited logging of denied packets to an NFLOG group, with a prefix
/// naming the policy that denied (`DROP <policy-id> <direction> …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogDenied {
    pub group: u16,
    pub rate_per_second: u32,
}

impl CompileOptions {
    pub fn new(node: &str) -> Self {
        CompileOptions {
            node: node.to_owned(),
            mark_mask: DEFAULT_MARK_MASK,
            endpoint_to_host: EndpointToHostAction::default(),
            log_denied: None,
            encap: WorkloadEncap::default(),
            fused_lookup: false,
        }
    }
}

/// Calico's mark bits, taken lowest-first from the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkBits {
    pub mask: u32,
    pub accept: u32,
    pub pass: u32,
    pub scratch0: u32,
    pub scratch1: u32,
}

impl MarkBits {
    pub fn from_mask(mask: u32) -> Result<MarkBits, CompileError> {
        let mut bits = (0..32).map(|i| 1u32 << i).filter(|b| mask & b != 0);
        let mut next = || bits.next();
        match (next(), next(), next(), next()) {
            (Some(accept), Some(pass), Some(scratch0), Some(scratch1)) => Ok(MarkBits {
                mask,
                accept,
                pass,
                scratch0,
                scratch1,
            }),
            _ => Err(CompileError::MarkMask {
                mask,
                bits: mask.count_ones(),
            }),
        }
    }

    /// Every bit Calico uses (cleared on entry except `accept`).
    pub fn all(&self) -> u32 {
        self.accept | self.pass | self.scratch0 | self.scratch1
    }
}

/// The logical ruleset for one node.
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalRuleset {
    pub marks: MarkBits,
    pub endpoint_to_host: EndpointToHostAction,
    /// Chains by name. Order inside a chain matters; between chains it does not.
    pub chains: BTreeMap<String, LChain>,
    /// Local workload interfaces → their `cali-fw-`/`cali-tw-` chains.
    pub endpoints: BTreeMap<String, LocalEndpoint>,
    /// IP sets by id, with members of both families.
    pub ip_sets: BTreeMap<String, IpSet>,
    /// Objects rejected ([`model::reject`]: their stubs fail closed) or
    /// that could not be compiled, with the reason, in key order.
    pub rejected: Vec<(ResourceKey, String)>,
    /// Policies with a chain on this node (felix's "active" policies).
    pub active_policies: Vec<PolicyId>,
    /// Lower with fused lookups ([`CompileOptions::fused_lookup`]).
    pub fused_lookup: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub key: ResourceKey,
    pub interface: String,
    pub from_chain: String,
    pub to_chain: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LChain {
    pub name: String,
    pub rules: Vec<LRule>,
}

/// One logical rule: all conditions must hold (and the Calico match, if
/// any), then the action is taken.
#[derive(Debug, Clone, PartialEq)]
pub struct LRule {
    pub conditions: Vec<Cond>,
    pub policy_match: Option<PolicyMatch>,
    pub action: LAction,
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// Input interface starts with `cali`.
    FromWorkload,
    /// Output interface starts with `cali`.
    ToWorkload,
    /// All of these mark bits clear.
    MarkClear(u32),
    /// All of these mark bits set.
    MarkSet(u32),
    CtEstablishedRelated,
    CtInvalid,
    /// IPv6 only: ICMPv6 of this type (neighbour discovery to the host).
    Icmpv6Type(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LAction {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    /// Set the bits, then carry on.
    SetMark(u32),
    /// Clear the bits, then carry on.
    ClearMark(u32),
    /// Calico Allow: set the accept bit and return.
    AllowReturn,
    /// Calico Pass: set the pass bit and return.
    PassReturn,
    /// Calico Log: log with this prefix and carry on.
    Log(String),
    /// `--log-denied`: if under the rate, send an NFLOG record with this
    /// prefix to the group, and carry on (the drop is the next rule).
    LogDenied {
        prefix: String,
        group: u16,
        rate_per_second: u32,
    },
    /// Only count (the "no rule matched" marker at the end of policy chains).
    Count,
    /// Dispatch by input interface to the `cali-fw-` chains.
    DispatchFromWorkload,
    /// Dispatch by output interface to the `cali-tw-` chains.
    DispatchToWorkload,
}

/// A Calico rule's match criteria, with selectors turned into IP set ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyMatch {
    /// 4 or 6; `None` = both.
    pub ip_version: Option<u8>,
    pub protocol: Option<u8>,
    pub not_protocol: Option<u8>,
    pub icmp: Option<(u8, Option<u8>)>,
    pub not_icmp: Option<(u8, Option<u8>)>,
    pub src: EntityMatch,
    pub dst: EntityMatch,
}

impl PolicyMatch {
    /// Whether the rule exists in the IPv4 (`v6 == false`) or IPv6 table:
    /// its ipVersion allows it, and — felix's `FilterRuleToIPVersion` — none
    /// of its CIDR lists (nets, notNets, source or destination) holds only
    /// the other family's CIDRs. Such a rule is left out of the family
    /// altogether: dropping just the CIDRs would leave a match-anything
    /// rule, "which would be a security hole".
    pub fn in_family(&self, v6: bool) -> bool {
        if self.ip_version.is_some_and(|v| (v == 6) != v6) {
            return false;
        }
        let other_family_only =
            |nets: &[IpNet]| !nets.is_empty() && nets.iter().all(|n| n.addr().is_ipv6() != v6);
        ![
            &self.src.nets,
            &self.src.not_nets,
            &self.dst.nets,
            &self.dst.not_nets,
        ]
        .into_iter()
        .any(|nets| other_family_only(nets))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntityMatch {
    pub nets: Vec<IpNet>,
    pub not_nets: Vec<IpNet>,
    /// Must be in this selector's IP set.
    pub selector_set: Option<String>,
    pub not_selector_set: Option<String>,
    /// Numeric port ranges (inclusive), coalesced; OR with `named_port_set`.
    pub ports: Vec<(u16, u16)>,
    /// (address, protocol, port) set for the named ports.
    pub named_port_set: Option<String>,
    pub not_ports: Vec<(u16, u16)>,
    pub not_named_port_set: Option<String>,
}

impl EntityMatch {
    pub fn has_ports(&self) -> bool {
        !self.ports.is_empty() || self.named_port_set.is_some()
    }
}

/// An IP set: felix's id (`s:…` selector, `n:…` named port), what it
/// stands for, and its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSet {
    pub id: String,
    pub kind: IpSetKind,
    /// Coalesced, non-overlapping, sorted.
    pub nets_v4: Vec<IpNet>,
    pub nets_v6: Vec<IpNet>,
    /// Named-port sets: (address, protocol, port), sorted.
    pub members_named: Vec<(IpAddr, u8, u16)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpSetKind {
    Selector(String),
    NamedPort {
        selector: Option<String>,
        protocol: u8,
        names: Vec<String>,
        /// Only the endpoints on this node: the set is matched against
        /// the local endpoint itself (an Allow rule's destination in
        /// ingress, its source in egress), so the others could never
        /// match (see [`Builder::calico_rule`]).
        node: Option<String>,
    },
}

impl IpSetKind {
    /// Whether `n` can be a member: any labelled object for a selector
    /// set (its selector decides); an endpoint, on `node` if the set
    /// names one, for a named-port set.
    pub fn admits(&self, n: &LabelledNets<'_>) -> bool {
        match self {
            IpSetKind::Selector(_) => true,
            IpSetKind::NamedPort { node, .. } => n
                .endpoint
                .is_some_and(|ep| node.as_ref().is_none_or(|node| ep.node == node)),
        }
    }
}

impl IpSet {
    /// Every member (of both families) is a single address: the nftables
    /// backend makes it a hash set ([`SetKey::Host`](crate::nft::SetKey)).
    /// Decided for both families at once, as the incremental compiler
    /// tracks it (a member that is not a host net in either family).
    pub fn hosts_only(&self) -> bool {
        self.nets_v4
            .iter()
            .chain(&self.nets_v6)
            .all(|n| n.prefix_len() == n.max_prefix_len())
    }

    /// A human-readable description, for set comments.
    pub fn describe(&self) -> String {
        match &self.kind {
            IpSetKind::Selector(s) => format!("selector: {s}"),
            IpSetKind::NamedPort {
                selector,
                protocol,
                names,
                node,
            } => format!(
                "named port {} proto {protocol} of {}{}",
                names.join(","),
                selector.as_deref().unwrap_or("all()"),
                node.as_ref()
                    .map(|n| format!(" on node {n}"))
                    .unwrap_or_default()
            ),
        }
    }
}

/// felix-style id hash: base64url(sha224(text)), first 23 characters.
pub fn id_hash(text: &str) -> String {
    let digest = Sha224::digest(text.as_bytes());
    let mut s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
    s.truncate(23);
    s
}

pub fn policy_chain(id: &PolicyId, dir: PolicyType) -> String {
    match dir {
        PolicyType::Ingress => format!("cali-pi-{id}"),
        PolicyType::Egress => format!("cali-po-{id}"),
    }
}

pub fn profile_chain(profile: &str, dir: PolicyType) -> String {
    match dir {
        PolicyType::Ingress => format!("cali-pri-{profile}"),
        PolicyType::Egress => format!("cali-pro-{profile}"),
    }
}

/// Compiles the cluster state for one node.
pub fn compile(
    state: &ClusterState,
    opts: &CompileOptions,
) -> Result<LogicalRuleset, CompileError> {
    Ok(compile_recording(state, opts, false)?.logical)
}

/// For each IP set id, which labelled objects (positions in
/// [`ClusterState::labelled_nets`]) are its members: what an incremental
/// compile starts from.
pub(crate) type SetMembers = HashMap<String, Vec<usize>>;

/// What a recording compile ([`compile_recording`]) hands over beside the
/// ruleset: the labelled objects, each IP set's member objects (positions
/// in `nets`) and the label index over the objects.
pub(crate) struct Recorded<'a> {
    pub nets: Vec<LabelledNets<'a>>,
    pub members: SetMembers,
    pub index: Option<LabelIndex>,
}

/// The resolved policies in policy order, each boxed: an incremental
/// policy change moves the others to their new positions, and moving
/// 10,000 pointers costs nothing where moving 10,000 policies (a few
/// hundred bytes each) took a millisecond.
#[allow(clippy::vec_box)]
pub(crate) type PolicyList = Vec<Box<ResolvedPolicy>>;

/// What one local endpoint's chains are made of: the policies selecting
/// it (positions in the resolved policy list, in policy order) and its
/// profiles that exist — or, in a direction a rejected object covers, only
/// that rejection (its chain then drops everything new).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EndpointUse {
    pub key: ResourceKey,
    pub interface: String,
    pub egress: Vec<usize>,
    pub ingress: Vec<usize>,
    pub profiles: Vec<String>,
    pub egress_rejected: Option<Rejection>,
    pub ingress_rejected: Option<Rejection>,
}

impl EndpointUse {
    /// Works out what policies and profiles apply to local endpoint `ep`.
    pub(crate) fn of(
        state: &ClusterState,
        key: &ResourceKey,
        ep: &Endpoint,
        policies: &[Box<ResolvedPolicy>],
    ) -> EndpointUse {
        let labels = state.endpoint_labels(ep);
        let selecting = |dir: PolicyType| -> Vec<usize> {
            policies
                .iter()
                .enumerate()
                .filter(|(_, p)| p.applies(dir) && p.selector.matches(&labels))
                .map(|(i, _)| i)
                .collect()
        };
        let mut u = EndpointUse {
            key: key.clone(),
            interface: ep.spec.interface_name.clone(),
            egress: selecting(PolicyType::Egress),
            ingress: selecting(PolicyType::Ingress),
            profiles: ep
                .spec
                .profiles
                .iter()
                .filter(|p| state.profile(p).is_some())
                .map(ToString::to_string)
                .collect(),
            egress_rejected: None,
            ingress_rejected: None,
        };
        u.settle_rejections(state, ep, policies);
        u
    }

    /// With the selecting policies listed: a direction a rejected object
    /// covers (the endpoint, a profile, or a selecting policy) lists only
    /// that rejection, and an endpoint rejected both ways uses no profile.
    pub(crate) fn settle_rejections(
        &mut self,
        state: &ClusterState,
        ep: &Endpoint,
        policies: &[Box<ResolvedPolicy>],
    ) {
        let rejected = |selected: &[usize]| {
            state.rejection_for(&self.key, ep, selected.iter().map(|&i| &*policies[i]))
        };
        let (egress, ingress) = (rejected(&self.egress), rejected(&self.ingress));
        if egress.is_some() {
            self.egress.clear();
        }
        if ingress.is_some() {
            self.ingress.clear();
        }
        if egress.is_some() && ingress.is_some() {
            self.profiles.clear();
        }
        self.egress_rejected = egress;
        self.ingress_rejected = ingress;
    }

    pub(crate) fn rejected(&self, dir: PolicyType) -> Option<&Rejection> {
        match dir {
            PolicyType::Egress => self.egress_rejected.as_ref(),
            PolicyType::Ingress => self.ingress_rejected.as_ref(),
        }
    }

    pub(crate) fn selected(&self, dir: PolicyType) -> &[usize] {
        match dir {
            PolicyType::Egress => &self.egress,
            PolicyType::Ingress => &self.ingress,
        }
    }

    pub(crate) fn selected_mut(&mut self, dir: PolicyType) -> &mut Vec<usize> {
        match dir {
            PolicyType::Egress => &mut self.egress,
            PolicyType::Ingress => &mut self.ingress,
        }
    }
}

/// A full compile with what an incremental compiler keeps of it.
pub(crate) struct Compiled<'a> {
    pub logical: LogicalRuleset,
    /// The resolved policies (what [`EndpointUse`] positions refer to).
    pub policies: PolicyList,
    pub uses: Vec<EndpointUse>,
    /// With `record`: the IP sets' member objects.
    pub recorded: Option<Recorded<'a>>,
}

/// [`compile`], with each IP set's member objects if `record`.
pub(crate) fn compile_recording<'a>(
    state: &'a ClusterState,
    opts: &CompileOptions,
    record: bool,
) -> Result<Compiled<'a>, CompileError> {
    let marks = MarkBits::from_mask(opts.mark_mask)?;
    // Gathering the labelled objects and indexing their labels is
    // independent of resolving the policies and working out which apply to
    // each local endpoint: on a node with two cores, both run at once
    // (each ~150 ms at 250,000 pods / 10,000 policies).
    let ((policies, unresolved, uses), (nets, index)) = std::thread::scope(|s| {
        let labelled = s.spawn(|| {
            let nets = state.labelled_nets();
            let index = LabelIndex::new(&nets);
            (nets, index)
        });
        let (policies, unresolved) = state.resolved_policies();
        let policies: PolicyList = policies.into_iter().map(Box::new).collect();
        let uses: Vec<EndpointUse> = state
            .workload_endpoints()
            .filter(|(_, w)| w.spec.node == opts.node)
            .map(|(key, ep)| EndpointUse::of(state, key, ep, &policies))
            .collect();
        let labelled = labelled
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        ((policies, unresolved, uses), labelled)
    });
    // By key, one entry per object (the incremental compiler keeps it so).
    let mut rejected: BTreeMap<ResourceKey, String> = unresolved.into_iter().collect();
    rejected.extend(state.rejected().map(|(key, why)| (key, why.to_owned())));
    rejected.extend(state.tier_rejections());
    let rejected: Vec<(ResourceKey, String)> = rejected.into_iter().collect();
    let mut b = Builder::new(
        marks,
        opts.log_denied,
        opts.encap,
        &opts.node,
        &nets,
        BTreeMap::new(),
        record,
    )
    .with_index(index);

    let mut chains = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    let mut active: BTreeSet<(usize, PolicyType)> = BTreeSet::new();
    let mut profiles: BTreeSet<&str> = BTreeSet::new();
    for u in &uses {
        for dir in [PolicyType::Egress, PolicyType::Ingress] {
            active.extend(u.selected(dir).iter().map(|i| (*i, dir)));
        }
        profiles.extend(u.profiles.iter().map(String::as_str));
        let (endpoint, endpoint_chains) = b.endpoint_chains(u, &policies);
        for c in endpoint_chains {
            chains.insert(c.name.clone(), c);
        }
        endpoints.insert(u.interface.clone(), endpoint);
    }

    let mut active_policies = BTreeSet::new();
    for (i, dir) in &active {
        let p = &policies[*i];
        active_policies.insert(p.id.clone());
        let chain = b.policy_chain(p, *dir);
        chains.insert(chain.name.clone(), chain);
    }
    for name in profiles {
        for chain in b.profile_chains(state, name) {
            chains.insert(chain.name.clone(), chain);
        }
    }
    for chain in static_chains(marks, opts.endpoint_to_host) {
        chains.insert(chain.name.clone(), chain);
    }
    let index = b.take_index();
    let (ip_sets, members) = b.finish();
    let recorded = members.map(|members| Recorded {
        nets,
        members,
        index,
    });
    Ok(Compiled {
        logical: LogicalRuleset {
            marks,
            endpoint_to_host: opts.endpoint_to_host,
            chains,
            endpoints,
            ip_sets,
            rejected,
            active_policies: active_policies.into_iter().collect(),
            fused_lookup: opts.fused_lookup,
        },
        policies,
        uses,
        recorded,
    })
}

/// Builds chains and the IP sets their rules use (with members from
/// `nets`). A full compile builds every chain with one; an incremental
/// one builds the few chains a local endpoint change needs on top of the
/// IP sets it already has.
pub(crate) struct Builder<'a> {
    marks: MarkBits,
    log_denied: Option<LogDenied>,
    encap: WorkloadEncap,
    /// The node compiled for (local-only named-port sets).
    node: String,
    nets: &'a [LabelledNets<'a>],
    /// Built when first needed, after `scans_left` sets were filled by
    /// scanning every labelled object ([`Builder::scan_first`]).
    index: Option<LabelIndex>,
    scans_left: usize,
    ip_sets: BTreeMap<String, IpSet>,
    /// Member objects of each IP set created here, when recording.
    members: Option<SetMembers>,
}

fn rule(conditions: Vec<Cond>, action: LAction, comment: &str) -> LRule {
    LRule {
        conditions,
        policy_match: None,
        action,
        comment: comment.to_owned(),
    }
}

impl<'a> Builder<'a> {
    /// A builder adding to `ip_sets`; with `record`, it notes the member
    /// objects of each IP set it creates (see [`Builder::finish`]).
    pub(crate) fn new(
        marks: MarkBits,
        log_denied: Option<LogDenied>,
        encap: WorkloadEncap,
        node: &str,
        nets: &'a [LabelledNets<'a>],
        ip_sets: BTreeMap<String, IpSet>,
        record: bool,
    ) -> Builder<'a> {
        Builder {
            marks,
            log_denied,
            encap,
            node: node.to_owned(),
            nets,
            index: None,
            scans_left: 0,
            ip_sets,
            members: record.then(HashMap::new),
        }
    }

    /// The IP sets (those given to [`Builder::new`] and those created
    /// since) and, when recording, the member objects of those created.
    pub(crate) fn finish(self) -> (BTreeMap<String, IpSet>, Option<SetMembers>) {
        (self.ip_sets, self.members)
    }

    /// The label index over the labelled objects, if a set needed one.
    pub(crate) fn take_index(&mut self) -> Option<LabelIndex> {
        self.index.take()
    }

    /// A local endpoint's dispatch entry and its `cali-fw-`/`cali-tw-` chains.
    pub(crate) fn endpoint_chains(
        &mut self,
        u: &EndpointUse,
        policies: &[Box<ResolvedPolicy>],
    ) -> (LocalEndpoint, [LChain; 2]) {
        let from = self.endpoint_chain(&u.interface, PolicyType::Egress, u, policies);
        let to = self.endpoint_chain(&u.interface, PolicyType::Ingress, u, policies);
        let endpoint = LocalEndpoint {
            key: u.key.clone(),
            interface: u.interface.clone(),
            from_chain: from.name.clone(),
            to_chain: to.name.clone(),
        };
        (endpoint, [from, to])
    }

    /// A profile's `cali-pri-` and `cali-pro-` chains.
    pub(crate) fn profile_chains(&mut self, state: &ClusterState, name: &str) -> Vec<LChain> {
        let Some(profile) = state.profile(name) else {
            return vec![];
        };
        let mut chains = Vec::new();
        for dir in [PolicyType::Ingress, PolicyType::Egress] {
            let rules = match dir {
                PolicyType::Ingress => &profile.spec.ingress,
                PolicyType::Egress => &profile.spec.egress,
            };
            let mut out = Vec::new();
            for (i, rule) in rules.iter().enumerate() {
                // Profiles are global: no namespace scoping of their selectors.
                match ResolvedRule::new(rule, None) {
                    Ok(r) => {
                        let logical =
                            self.calico_rule(&r, dir, &format!("profile {name} {dir:?} rule {i}"));
                        let prefix = format!("profile {name} {} rule {i}", dir_word(dir));
                        out.extend(
                            logical
                                .into_iter()
                                .flat_map(|l| self.with_deny_log(l, &prefix)),
                        );
                    }
                    Err(e) => {
                        // Fail closed: a profile rule we cannot read drops.
                        out.push(LRule {
                            conditions: vec![],
                            policy_match: None,
                            action: LAction::Drop,
                            comment: format!("profile {name} rule {i} rejected: {e}"),
                        });
                    }
                }
            }
            chains.push(LChain {
                name: profile_chain(name, dir),
                rules: out,
            });
        }
        chains
    }

    /// felix's `cali-tw-<iface>` (ingress) or `cali-fw-<iface>` (egress).
    fn endpoint_chain(
        &mut self,
        iface: &str,
        dir: PolicyType,
        u: &EndpointUse,
        policies: &[Box<ResolvedPolicy>],
    ) -> LChain {
        let selected = u.selected(dir);
        let profiles = &u.profiles;
        let m = self.marks;
        let name = match dir {
            PolicyType::Ingress => format!("cali-tw-{iface}"),
            PolicyType::Egress => format!("cali-fw-{iface}"),
        };
        let mut rules = vec![
            rule(
                vec![Cond::CtEstablishedRelated],
                LAction::Accept,
                "Accept established and related connections",
            ),
            rule(
                vec![Cond::CtInvalid],
                LAction::Drop,
                "Drop invalid connection-tracking state",
            ),
            rule(
                vec![],
                LAction::ClearMark(m.accept | m.pass),
                "Clear the accept and pass bits",
            ),
        ];
        if dir == PolicyType::Egress {
            rules.extend(encap_drops(self.encap));
        }
        if let Some(r) = u.rejected(dir) {
            let what = format!(
                "Rejected {}: drop all {} until it is fixed",
                r.object,
                dir_word(dir)
            );
            if let Some(log) = self.log_denied {
                let id = match &r.object {
                    model::state::RejectedObject::Policy(id) => id.to_string(),
                    other => other.to_string().replace(' ', ":"),
                };
                rules.push(rule(
                    vec![],
                    log_denied_action(log, &format!("{id} {} rejected", dir_word(dir))),
                    &format!("{what}: log denied"),
                ));
            }
            rules.push(rule(vec![], LAction::Drop, &what));
            return LChain { name, rules };
        }
        // felix's tiers (rules/endpoints.go): per tier with a policy for
        // this endpoint and direction, clear the pass bit, jump to each
        // policy while neither the pass nor the accept bit is set, return
        // if one accepted; at the end, unless the tier's defaultAction is
        // Pass, drop what no policy passed. A Pass (or a defaultAction
        // Pass) goes on to the next tier — whose first rule clears the pass
        // bit again — or the profiles.
        //
        // felix returns after each policy ("Return if policy accepted");
        // here each jump is skipped once a policy accepted and one return
        // ends the tier: the same verdicts with one rule per policy instead
        // of two. The kernel checks every rule of a table on each commit
        // that adds one (nf_tables' loop validation), so a policy change
        // costs time in proportion to the rules: at 10,000 policies this
        // removes a fifth of them.
        let tiers: Vec<&[usize]> = selected
            .chunk_by(|&a, &b| policies[a].tier_rank == policies[b].tier_rank)
            .collect();
        for tier in tiers {
            let info = &policies[tier[0]].tier;
            let name = &info.name;
            rules.push(rule(
                vec![],
                LAction::ClearMark(m.pass),
                &format!("Start of tier {name}"),
            ));
            for &i in tier {
                let p = &policies[i];
                rules.push(rule(
                    vec![Cond::MarkClear(m.pass | m.accept)],
                    LAction::Jump(policy_chain(&p.id, dir)),
                    &format!("Policy {}", p.id),
                ));
            }
            rules.push(rule(
                vec![Cond::MarkSet(m.accept)],
                LAction::Return,
                &format!("Return if a policy of tier {name} accepted"),
            ));
            if info.default_action == TierAction::Pass {
                continue;
            }
            if let (Some(log), Some(&last)) = (self.log_denied, tier.last()) {
                // Named after the last policy of the tier that selected the
                // endpoint: with one policy (the usual deny-all), the one
                // that denied.
                rules.push(rule(
                    vec![Cond::MarkClear(m.pass)],
                    log_denied_action(
                        log,
                        &format!("{} {} end-of-tier", policies[last].id, dir_word(dir)),
                    ),
                    &format!("Log denied: end of tier {name}"),
                ));
            }
            rules.push(rule(
                vec![Cond::MarkClear(m.pass)],
                LAction::Drop,
                &format!("End of tier {name}. Drop if no policies passed packet"),
            ));
        }
        for profile in profiles {
            rules.push(rule(
                vec![],
                LAction::Jump(profile_chain(profile, dir)),
                &format!("Profile {profile}"),
            ));
            rules.push(rule(
                vec![Cond::MarkSet(m.accept)],
                LAction::Return,
                "Return if profile accepted",
            ));
        }
        rules.push(rule(vec![], LAction::Drop, "Drop if no profiles matched"));
        LChain { name, rules }
    }

    pub(crate) fn policy_chain(&mut self, p: &ResolvedPolicy, dir: PolicyType) -> LChain {
        let name = policy_chain(&p.id, dir);
        let mut rules = Vec::new();
        for (i, r) in p.rules(dir).iter().enumerate() {
            let what = format!("Policy {} {} rule {i}", p.id, dir_word(dir));
            let logical = self.calico_rule(r, dir, &what);
            let prefix = format!("{} {} rule {i}", p.id, dir_word(dir));
            rules.extend(
                logical
                    .into_iter()
                    .flat_map(|l| self.with_deny_log(l, &prefix)),
            );
        }
        rules.push(rule(
            vec![],
            LAction::Count,
            &format!("Policy {} {}: no rule matched", p.id, dir_word(dir)),
        ));
        LChain { name, rules }
    }

    /// `rule`, preceded (under `--log-denied`, for a Deny) by a log rule with
    /// the same match: `limit` is a match, so the log cannot share the
    /// drop's rule without letting packets over the rate through.
    fn with_deny_log(&self, rule: LRule, what: &str) -> Vec<LRule> {
        match self.log_denied {
            Some(log) if rule.action == LAction::Drop => {
                let logged = LRule {
                    action: log_denied_action(log, what),
                    comment: format!("{}: log denied", rule.comment),
                    ..rule.clone()
                };
                vec![logged, rule]
            }
            _ => vec![rule],
        }
    }

    /// One Calico rule → one logical rule (or none, if it can never match),
    /// in a chain of direction `dir` of a local endpoint.
    ///
    /// The local endpoint is the destination of its ingress traffic and
    /// the source of its egress. So an Allow rule's named ports on that
    /// side use a set of this node's endpoints only: for traffic of a local
    /// endpoint it matches exactly what the cluster-wide set matches (at
    /// 250,000 pods, ~100 elements instead of 250,000 per family), and for
    /// any other address it can only match less, which for an Allow is
    /// narrower, never wider. Deny, Pass and Log rules and negated named
    /// ports keep the cluster-wide set: matching less there would let
    /// through more.
    fn calico_rule(&mut self, r: &ResolvedRule, dir: PolicyType, what: &str) -> Option<LRule> {
        let protocol = r.protocol.map(|p| p.number());
        let local_side = (r.action == Action::Allow).then_some(dir);
        let src = self.entity(&r.source, protocol, local_side == Some(PolicyType::Egress));
        let dst = self.entity(
            &r.destination,
            protocol,
            local_side == Some(PolicyType::Ingress),
        );
        let action = match r.action {
            Action::Allow => LAction::AllowReturn,
            Action::Deny => LAction::Drop,
            Action::Pass => LAction::PassReturn,
            Action::Log => LAction::Log(format!("{LOG_PREFIX}: ")),
        };
        Some(LRule {
            conditions: vec![],
            policy_match: Some(PolicyMatch {
                ip_version: r.ip_version,
                protocol,
                not_protocol: r.not_protocol.map(|p| p.number()),
                icmp: r
                    .icmp
                    .as_ref()
                    .and_then(|i| i.icmp_type.map(|t| (t, i.code))),
                not_icmp: r
                    .not_icmp
                    .as_ref()
                    .and_then(|i| i.icmp_type.map(|t| (t, i.code))),
                src,
                dst,
            }),
            action,
            comment: format!("{what}: {:?}", r.action),
        })
    }

    /// `local`: the entity is the local endpoint of an Allow rule (see
    /// [`Builder::calico_rule`]).
    fn entity(&mut self, e: &ResolvedEntity, protocol: Option<u8>, local: bool) -> EntityMatch {
        let (ports, named) = split_ports(&e.ports);
        let (not_ports, not_named) = split_ports(&e.not_ports);
        let proto = protocol.unwrap_or(0);
        EntityMatch {
            nets: e.nets.clone(),
            not_nets: e.not_nets.clone(),
            selector_set: e.selector.as_ref().map(|s| self.selector_set(s)),
            not_selector_set: e.not_selector.as_ref().map(|s| self.selector_set(s)),
            ports,
            named_port_set: (!named.is_empty())
                .then(|| self.named_port_set(e.selector.as_ref(), proto, named, local)),
            not_ports,
            not_named_port_set: (!not_named.is_empty())
                .then(|| self.named_port_set(e.selector.as_ref(), proto, not_named, false)),
        }
    }

    /// Use `index` (over the same labelled objects) from the first set on.
    pub(crate) fn with_index(mut self, index: LabelIndex) -> Self {
        self.index = Some(index);
        self
    }

    /// Fill the first `sets` sets by scanning every labelled object, and
    /// index them only if more follow: a full compile fills thousands of
    /// sets and needs the index at once, an incremental one fills a few
    /// and scans faster than it indexes every object in the cluster.
    pub(crate) fn scan_first(mut self, sets: usize) -> Self {
        self.scans_left = sets;
        self
    }

    /// Positions in the labelled nets that may match `sel` (all for `None`).
    fn candidates(&mut self, sel: Option<&Selector>) -> Vec<usize> {
        let all = || (0..self.nets.len()).collect();
        let Some(sel) = sel else { return all() };
        if self.index.is_none() {
            if self.scans_left > 0 {
                self.scans_left -= 1;
                return all();
            }
            self.index = Some(LabelIndex::new(self.nets));
        }
        self.index
            .as_ref()
            .and_then(|i| i.candidates(sel))
            .map_or_else(all, |slots| slots.into_iter().map(|s| s as usize).collect())
    }

    fn selector_set(&mut self, sel: &Selector) -> String {
        let canonical = sel.canonical();
        let id = format!("s:{}", id_hash(&format!("s:{canonical}")));
        if !self.ip_sets.contains_key(&id) {
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            let candidates = self.candidates(Some(sel));
            let mut matched = Vec::new();
            for i in candidates {
                let n = &self.nets[i];
                if n.selected_by(sel) {
                    matched.push(i);
                    for net in n.nets.iter() {
                        match net {
                            IpNet::V4(_) => v4.push(*net),
                            IpNet::V6(_) => v6.push(*net),
                        }
                    }
                }
            }
            if let Some(members) = &mut self.members {
                members.insert(id.clone(), matched);
            }
            self.ip_sets.insert(
                id.clone(),
                IpSet {
                    id: id.clone(),
                    kind: IpSetKind::Selector(canonical),
                    nets_v4: outermost(v4),
                    nets_v6: outermost(v6),
                    members_named: vec![],
                },
            );
        }
        id
    }

    fn named_port_set(
        &mut self,
        sel: Option<&Selector>,
        protocol: u8,
        mut names: Vec<String>,
        local: bool,
    ) -> String {
        names.sort();
        names.dedup();
        let canonical = sel.map(|s| s.canonical());
        let node = local.then(|| self.node.clone());
        let id = format!(
            "n:{}",
            id_hash(&format!(
                "n:{}:{protocol}:{}{}",
                canonical.as_deref().unwrap_or("all()"),
                names.join(","),
                node.as_ref()
                    .map(|n| format!(":on:{n}"))
                    .unwrap_or_default()
            ))
        );
        if !self.ip_sets.contains_key(&id) {
            let kind = IpSetKind::NamedPort {
                selector: canonical,
                protocol,
                names,
                node,
            };
            let IpSetKind::NamedPort { names, .. } = &kind else {
                unreachable!("built above")
            };
            let mut members = BTreeSet::new();
            let mut matched = Vec::new();
            let candidates = self.candidates(sel);
            for i in candidates {
                let n = &self.nets[i];
                if !kind.admits(n) || sel.is_some_and(|s| !n.selected_by(s)) {
                    continue;
                }
                let Some(ep) = n.endpoint else { continue };
                matched.push(i);
                for (addr, port) in named_port_members(ep, &n.nets, protocol, names) {
                    members.insert((addr, protocol, port));
                }
            }
            if let Some(m) = &mut self.members {
                m.insert(id.clone(), matched);
            }
            self.ip_sets.insert(
                id.clone(),
                IpSet {
                    id: id.clone(),
                    kind,
                    nets_v4: vec![],
                    nets_v6: vec![],
                    members_named: members.into_iter().collect(),
                },
            );
        }
        id
    }
}

/// The fixed part of felix's tree: cali-FORWARD, cali-INPUT, dispatch and
/// workload-to-host chains.
fn static_chains(m: MarkBits, to_host: EndpointToHostAction) -> [LChain; 5] {
    {
        [
            LChain {
                name: CHAIN_FORWARD.into(),
                rules: vec![
                    rule(
                        vec![],
                        LAction::ClearMark(m.all() & !m.accept),
                        "Clear Calico's mark bits except accept",
                    ),
                    rule(
                        vec![Cond::FromWorkload],
                        LAction::Jump(CHAIN_FROM_WL_DISPATCH.into()),
                        "From workload: egress policy",
                    ),
                    rule(
                        vec![Cond::ToWorkload],
                        LAction::Jump(CHAIN_TO_WL_DISPATCH.into()),
                        "To workload: ingress policy",
                    ),
                ],
            },
            LChain {
                name: CHAIN_INPUT.into(),
                rules: vec![rule(
                    vec![Cond::FromWorkload],
                    LAction::Goto(CHAIN_WL_TO_HOST.into()),
                    "Workload to host",
                )],
            },
            LChain {
                name: CHAIN_FROM_WL_DISPATCH.into(),
                rules: vec![
                    rule(
                        vec![],
                        LAction::DispatchFromWorkload,
                        "Dispatch to the sender's cali-fw- chain",
                    ),
                    rule(vec![Cond::FromWorkload], LAction::Drop, "Unknown interface"),
                ],
            },
            LChain {
                name: CHAIN_TO_WL_DISPATCH.into(),
                rules: vec![
                    rule(
                        vec![],
                        LAction::DispatchToWorkload,
                        "Dispatch to the receiver's cali-tw- chain",
                    ),
                    rule(vec![Cond::ToWorkload], LAction::Drop, "Unknown interface"),
                ],
            },
            LChain {
                name: CHAIN_WL_TO_HOST.into(),
                rules: {
                    // IPv6 neighbour discovery and router solicitation to the
                    // host must pass whatever the egress policy, or a pod
                    // could not even resolve its gateway (felix does the same).
                    let mut r: Vec<LRule> = [130u8, 131, 132, 133, 135, 136]
                        .into_iter()
                        .map(|t| {
                            rule(
                                vec![Cond::Icmpv6Type(t)],
                                LAction::Accept,
                                "Allow IPv6 neighbour discovery to the host",
                            )
                        })
                        .collect();
                    r.push(rule(
                        vec![],
                        LAction::Jump(CHAIN_FROM_WL_DISPATCH.into()),
                        "Egress policy of the sending workload",
                    ));
                    r.push(rule(
                        vec![],
                        match to_host {
                            EndpointToHostAction::Accept => LAction::Accept,
                            EndpointToHostAction::Drop => LAction::Drop,
                            EndpointToHostAction::Return => LAction::Return,
                        },
                        "Configured DefaultEndpointToHostAction",
                    ));
                    r
                },
            },
        ]
    }
}

/// felix's first rules of every `cali-fw-` chain: a workload may not send
/// VXLAN or IP-in-IP packets (it could inject them into the overlay), unless
/// the node is configured to allow them.
fn encap_drops(encap: WorkloadEncap) -> Vec<LRule> {
    let mut out = Vec::new();
    let drop = |protocol: u8, ports: Vec<(u16, u16)>, comment: &str| LRule {
        conditions: vec![],
        policy_match: Some(PolicyMatch {
            protocol: Some(protocol),
            dst: EntityMatch {
                ports,
                ..Default::default()
            },
            ..Default::default()
        }),
        action: LAction::Drop,
        comment: comment.to_owned(),
    };
    for e in [Encap::Vxlan, Encap::Ipip] {
        match e {
            Encap::Vxlan if !encap.allow_vxlan => out.push(drop(
                17,
                vec![(encap.vxlan_port, encap.vxlan_port)],
                "Drop VXLAN encapped packets originating in workloads",
            )),
            Encap::Ipip if !encap.allow_ipip => out.push(drop(
                IPIP_PROTOCOL,
                vec![],
                "Drop IPinIP encapped packets originating in workloads",
            )),
            _ => {}
        }
    }
    out
}

/// The `--log-denied` action for a drop described by `what` (policy id
/// first, so that a truncated prefix still names the policy).
fn log_denied_action(log: LogDenied, what: &str) -> LAction {
    let mut prefix = format!("{DENY_LOG_PREFIX} {what} ");
    if prefix.len() > MAX_LOG_PREFIX {
        let mut end = MAX_LOG_PREFIX;
        while !prefix.is_char_boundary(end) {
            end -= 1;
        }
        prefix.truncate(end);
    }
    LAction::LogDenied {
        prefix,
        group: log.group,
        rate_per_second: log.rate_per_second,
    }
}

fn dir_word(dir: PolicyType) -> &'static str {
    match dir {
        PolicyType::Ingress => "ingress",
        PolicyType::Egress => "egress",
    }
}

fn split_ports(ports: &[Port]) -> (Vec<(u16, u16)>, Vec<String>) {
    let mut ranges = Vec::new();
    let mut named = Vec::new();
    for p in ports {
        match p {
            Port::Range { min, max } => ranges.push((*min, *max)),
            Port::Named(n) => named.push(n.clone()),
        }
    }
    (coalesce_ports(ranges), named)
}

/// Sorts and merges port ranges that overlap or touch.
pub fn coalesce_ports(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The (address, port) members a named-port set gets from one endpoint:
/// its ports of `protocol` named in `names`, at each of its addresses.
pub(crate) fn named_port_members<'a>(
    ep: EndpointFacts<'a>,
    nets: &'a [IpNet],
    protocol: u8,
    names: &'a [String],
) -> impl Iterator<Item = (IpAddr, u16)> + 'a {
    ep.ports
        .iter()
        .filter(move |p| p.protocol.number() == protocol && names.iter().any(|n| *n == p.name))
        .flat_map(move |p| nets.iter().map(move |n| (n.addr(), p.port)))
}

/// A selector set's elements: the member nets not inside another member,
/// sorted. Unlike [`coalesce`], adjacent nets are not merged, so that one
/// endpoint joining or leaving changes exactly its own elements (what an
/// incremental update relies on); the kernel accepts adjacent intervals.
pub fn outermost(mut nets: Vec<IpNet>) -> Vec<IpNet> {
    for n in &mut nets {
        *n = n.trunc();
    }
    nets.sort_unstable();
    let mut out: Vec<IpNet> = Vec::with_capacity(nets.len());
    for n in nets {
        // Sorted by (network, prefix length): a net inside an earlier kept
        // one can only be inside the last kept one (kept nets are disjoint).
        if out.last().is_some_and(|last| last.contains(&n)) {
            continue;
        }
        out.push(n);
    }
    out
}

/// Merges CIDRs into the smallest equivalent list of non-overlapping CIDRs
/// (the kernel rejects overlapping intervals in a set).
pub fn coalesce(nets: Vec<IpNet>) -> Vec<IpNet> {
    let mut out = IpNet::aggregate(&nets);
    out.sort();
    out
}
