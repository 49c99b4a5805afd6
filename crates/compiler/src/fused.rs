//! `--fused-lookup` (nftables only): the policies of a tier that can fuse
//! become one set lookup per endpoint chain instead of a jump per policy.
//!
//! In an endpoint chain (`cali-tw-<iface>`, `cali-fw-<iface>`) each policy
//! of a tier is `pass and accept clear → jump cali-pi-<id>`, and the
//! tier's policies are followed by one `accept set → return`. A policy whose rules are all Allow rules (as every converted
//! Kubernetes `NetworkPolicy`'s are) of the shapes below decides nothing but
//! "allowed": for a run of such policies in a row, the walk accepts exactly
//! when one of their rules matches, whatever their order. The run becomes
//! a few rules, each `pass and accept clear` + lookup → set the accept bit
//! and return (what the policy's Allow and the tier's "return if accepted"
//! rule did):
//!
//! - `ip saddr . meta l4proto . th dport @cali40f-…` (egress: `ip daddr .
//!   …`) holding (peer, protocol, port) of the rules with TCP, UDP or SCTP
//!   and destination ports (ranges of at most [`MAX_RANGE`] ports);
//! - `ip saddr @cali40h-…` (egress: `ip daddr`) holding the peers of the
//!   rules without protocol and ports;
//! - per protocol, `meta l4proto tcp th dport @cali40p-…` for the rules
//!   with ports and any peer (Kubernetes `ports` without `from`);
//! - nothing but `pass and accept clear` when a rule allows everything (any peer, no
//!   protocol, no ports): then it is the run's only rule.
//!
//! A rule fuses when its peers are host addresses (a selector's set whose
//! members are all pods, or host nets) or anyone, and it has nothing else:
//! no Deny, Pass or Log, no notSelector/notNets/notPorts, no ICMP or
//! notProtocol, no named ports, no match on the endpoint's own side, not
//! nets and a selector together, not a protocol without ports. A
//! policy with a rule that does not fuse keeps its jump, in its place: runs
//! end there, so the order against Deny and Pass is the walk's. A policy
//! without rules in this family (a deny-all) fuses to nothing; a run of
//! deny-alls alone leaves one counting rule (`Fused lookup @none`). A
//! run with a peer rule keeps its lookup even while the peers' selector
//! has no members in this family (an empty set), so members joining only
//! add elements. The tier's end-of-tier drop and the profiles that follow
//! are untouched. Endpoints with the same run of policies share its sets.
//!
//! The `cali-pi-`/`cali-po-` chains stay in the table (explain's chain path
//! and the walk for what does not fuse); what a fused lookup accepts is
//! counted on its own rule, whose comment names the fused policies, not in
//! those chains. The model's answers (`explain`, the scenarios' oracle) do
//! not change.
//!
//! A fused set is named by what it stands for (family, kind, direction and
//! the run's policy ids), not by its elements, so that a pod joining or
//! leaving a selector's set changes elements of the fused sets built from
//! it and nothing else. The incremental compiler keeps, per fused set,
//! where its elements come from ([`Source`]: a rule's peers × ports), and
//! per endpoint chain which selector sets decide whether a policy fuses at
//! all (their size, against [`MAX_RULE_ELEMENTS`], and whether they hold
//! host addresses only): [`Upkeep`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::logical::{id_hash, Cond, LAction, LChain, LRule, LogicalRuleset};
use crate::lower_nft::{lower_chain, MAX_COMMENT};
use crate::nft::{
    AddrTarget, Chain, Dir, Match, PortTarget, Ruleset, Set, SetDelta, SetElement, SetKey,
    TableFamily,
};

/// The widest port range expanded into single (peer, protocol, port)
/// elements; a rule with a wider one keeps its policy's jump.
pub const MAX_RANGE: u32 = 64;
/// The most elements one rule may add (peers × ports).
pub(crate) const MAX_RULE_ELEMENTS: usize = 1 << 16;
/// How every fused set's comment starts (`fused lookup: <what>`): the
/// census and the bench's rewrite find the fused sets by it.
pub const SET_COMMENT: &str = "fused lookup";
/// How every fused rule's comment starts (`Fused lookup @<set>: … of
/// <policy ids>`); `explain --kernel` recognises a fused node by it.
pub const MARKER: &str = "Fused lookup @";

/// Where some of a fused set's elements come from: one fused rule's peers
/// with its protocol and destination ports (`None`, no ports: the peers
/// alone, any protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    peers: Peers,
    proto: Option<u8>,
    ports: Vec<(u16, u16)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Peers {
    /// The members of a selector's IP set (all host addresses).
    Set(String),
    /// The rule's own host addresses, sorted.
    Hosts(Vec<IpAddr>),
}

impl Source {
    /// Whether `e` is one of the elements this source adds, with the IP
    /// sets' members as `l` has them.
    fn has(&self, l: &LogicalRuleset, e: &SetElement) -> bool {
        let addr = match (e, self.proto) {
            (SetElement::NamedPort(a, proto, port), Some(p)) if *proto == p => {
                if !self.ports.iter().any(|&(lo, hi)| (lo..=hi).contains(port)) {
                    return false;
                }
                *a
            }
            (SetElement::Net(n), None) => n.addr(),
            _ => return false,
        };
        match &self.peers {
            Peers::Hosts(hosts) => hosts.binary_search(&addr).is_ok(),
            Peers::Set(id) => l.ip_sets.get(id).is_some_and(|s| {
                let nets = if addr.is_ipv6() {
                    &s.nets_v6
                } else {
                    &s.nets_v4
                };
                nets.binary_search(&IpNet::from(addr)).is_ok()
            }),
        }
    }

    /// The elements this source adds for peer `addr`.
    fn elements_of(&self, addr: IpAddr, out: &mut BTreeSet<SetElement>) {
        match self.proto {
            Some(p) => {
                for &(lo, hi) in &self.ports {
                    out.extend((lo..=hi).map(|port| SetElement::NamedPort(addr, p, port)));
                }
            }
            None => {
                out.insert(SetElement::Net(IpNet::from(addr)));
            }
        }
    }
}

/// What a run of policies allows, in one family and direction.
#[derive(Debug, Default)]
struct Fusion {
    /// (peer, protocol, destination port).
    ports: BTreeSet<(IpAddr, u8, u16)>,
    port_sources: Vec<Source>,
    /// Peers allowed whatever the protocol.
    hosts: BTreeSet<IpAddr>,
    host_sources: Vec<Source>,
    /// Any peer, by protocol: destination port ranges.
    any_peer_ports: BTreeMap<u8, Vec<(u16, u16)>>,
    /// Any peer, any protocol: everything.
    any: bool,
    /// The fused policies' ids (from their chain names).
    policies: Vec<String>,
}

impl Fusion {
    fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    fn extend(&mut self, other: Fusion) {
        self.ports.extend(other.ports);
        self.port_sources.extend(other.port_sources);
        self.hosts.extend(other.hosts);
        self.host_sources.extend(other.host_sources);
        for (proto, ranges) in other.any_peer_ports {
            self.any_peer_ports.entry(proto).or_default().extend(ranges);
        }
        self.any |= other.any;
        self.policies.extend(other.policies);
    }
}

/// A fused rule's extra matches and the set it looks up, by the key its
/// placeholder's comment names (`Fused lookup @<key>: …`).
struct Lookup {
    key: String,
    matches: Vec<Match>,
    set: Option<(Set, Vec<Source>)>,
}

/// An endpoint chain lowered with its fused lookups.
pub(crate) struct FusedChain {
    /// `None`: nothing fused, the chain lowers as usual.
    pub(crate) lowered: Option<(Chain, BTreeMap<String, Set>)>,
    /// The fused sets among the lowered chain's sets, with where their
    /// elements come from.
    pub(crate) fused: Vec<(String, Vec<Source>)>,
    /// Selector IP sets whose members decide whether a policy of this
    /// chain fuses, with the rule's number of ports (0: none).
    pub(crate) deps: Vec<(String, usize)>,
}

/// Rewrites the endpoint chains of `rs` (lowered from `l`) with fused
/// lookups, adding their sets. Called by `lower_nft::to_nftables` when
/// `l.fused_lookup` is set; returns what [`Upkeep`] keeps.
pub(crate) fn fuse(l: &LogicalRuleset, rs: &mut Ruleset) -> Upkeep {
    let mut upkeep = Upkeep::default();
    for t in &mut rs.tables {
        for e in l.endpoints.values() {
            for (name, ingress) in [(&e.to_chain, true), (&e.from_chain, false)] {
                let Some(chain) = l.chains.get(name) else {
                    continue;
                };
                let f = fuse_chain(l, t.family, chain, ingress);
                upkeep.chain_lowered(t.family, name, &f.deps);
                if let Some((lowered, sets)) = f.lowered {
                    t.chains.insert(lowered.name.clone(), lowered);
                    t.sets.extend(sets);
                }
                for (set, sources) in f.fused {
                    upkeep.set_sources(t.family, &set, sources);
                }
            }
        }
    }
    upkeep
}

/// Endpoint chain `chain` (`ingress`: a `cali-tw-` chain) of a table of
/// `family`, lowered with its fused lookups.
pub(crate) fn fuse_chain(
    l: &LogicalRuleset,
    family: TableFamily,
    chain: &LChain,
    ingress: bool,
) -> FusedChain {
    let v6 = family.is_v6();
    let marks = l.marks;
    let mut rules: Vec<LRule> = Vec::new();
    let mut lookups: Vec<Lookup> = Vec::new();
    let mut deps = Vec::new();
    let mut run = Fusion::default();
    let mut fused_any = false;
    let mut i = 0;
    let flush = |run: &mut Fusion, rules: &mut Vec<LRule>, lookups: &mut Vec<Lookup>| {
        flush(
            run,
            family,
            ingress,
            marks.pass | marks.accept,
            rules,
            lookups,
        );
    };
    while i < chain.rules.len() {
        let r = &chain.rules[i];
        // A policy's jump (taken while neither the pass nor the accept
        // bit is set; the tier's one "return if accepted" follows its
        // policies).
        let jump = match &r.action {
            LAction::Jump(target)
                if r.conditions == [Cond::MarkClear(marks.pass | marks.accept)] =>
            {
                l.chains.get(target)
            }
            _ => None,
        };
        if let Some(policy) = jump.and_then(|p| allows(l, p, v6, ingress, &mut deps)) {
            run.extend(policy);
            fused_any = true;
            i += 1;
            continue;
        }
        flush(&mut run, &mut rules, &mut lookups);
        rules.push(r.clone());
        i += 1;
    }
    flush(&mut run, &mut rules, &mut lookups);
    if !fused_any {
        return FusedChain {
            lowered: None,
            fused: vec![],
            deps,
        };
    }
    let fused = LChain {
        name: chain.name.clone(),
        rules,
    };
    let (mut lowered, mut sets) = lower_chain(l, family, &fused);
    for rule in &mut lowered.rules {
        let Some(key) = rule
            .comment
            .as_deref()
            .and_then(|c| c.strip_prefix(MARKER))
            .and_then(|c| c.split(':').next())
        else {
            continue;
        };
        let lookup = lookups
            .iter()
            .find(|l| l.key == key)
            .expect("a marked rule names its lookup");
        rule.matches.extend(lookup.matches.iter().cloned());
    }
    let mut fused_sets = Vec::new();
    for (set, sources) in lookups.into_iter().filter_map(|l| l.set) {
        fused_sets.push((set.name.clone(), sources));
        sets.insert(set.name.clone(), set);
    }
    FusedChain {
        lowered: Some((lowered, sets)),
        fused: fused_sets,
        deps,
    }
}

/// A fused lookup's set, named by what it stands for: the family, the
/// kind of lookup (`what`), the direction and the run's policies — the
/// same in every endpoint chain with the same run, and the same while
/// only its elements change.
fn fused_set(
    family: TableFamily,
    kind: &str,
    key: SetKey,
    elements: Vec<SetElement>,
    what: &str,
    ingress: bool,
    policies: &[String],
) -> Set {
    let fam = if family.is_v6() { "60" } else { "40" };
    let mut text = format!("{kind}:{}:{what}:", if ingress { "in" } else { "out" });
    for p in policies {
        let _ = write!(text, "{p} ");
    }
    let name = format!("cali{fam}{kind}-{}", id_hash(&text));
    Set {
        name,
        key,
        elements: elements.into(),
        comment: Some(format!("{SET_COMMENT}: {what}")),
    }
}

/// A fused rule in place of a run: `unset` (the pass and accept bits)
/// clear → `action`, its comment
/// `Fused lookup @<key>: <what> of <policy ids>` (the key finds its
/// matches after lowering).
fn placeholder(policies: &[String], key: &str, what: &str, unset: u32, action: LAction) -> LRule {
    let mut comment = format!("{MARKER}{key}: {what} of");
    for p in policies {
        let _ = write!(comment, " {p}");
    }
    comment.truncate(floor_char_boundary(&comment, MAX_COMMENT));
    LRule {
        conditions: vec![Cond::MarkClear(unset)],
        policy_match: None,
        action,
        comment,
    }
}

/// Ends a run: its lookup rules (none if it allows nothing) in place of
/// its policies' jumps.
fn flush(
    run: &mut Fusion,
    family: TableFamily,
    ingress: bool,
    unset: u32,
    rules: &mut Vec<LRule>,
    lookups: &mut Vec<Lookup>,
) {
    if run.is_empty() {
        return;
    }
    let run = std::mem::take(run);
    let before = lookups.len();
    let peer = if ingress { Dir::Src } else { Dir::Dst };
    let mut add =
        |key: String, matches: Vec<Match>, set: Option<(Set, Vec<Source>)>, what: &str| {
            rules.push(placeholder(
                &run.policies,
                &key,
                what,
                unset,
                LAction::AllowReturn,
            ));
            lookups.push(Lookup { key, matches, set });
        };
    let set = |kind: &str, key: SetKey, elements: Vec<SetElement>, what: &str| {
        fused_set(family, kind, key, elements, what, ingress, &run.policies)
    };
    if run.any {
        // Some rule allows everything: the run accepts every packet.
        add("any".into(), vec![], None, "any peer, any protocol");
        return;
    }
    // Built when a rule adds to it, even with no elements yet: members
    // joining its selector sets then only add elements.
    if !run.port_sources.is_empty() {
        let what = "peer . proto . port";
        let elements = run
            .ports
            .iter()
            .map(|&(a, p, port)| SetElement::NamedPort(a, p, port))
            .collect();
        let s = set("f", SetKey::NamedPort, elements, what);
        let sources = run.port_sources.clone();
        let m = if ingress {
            Match::PeerPort {
                set: s.name.clone(),
                negate: false,
            }
        } else {
            Match::NamedPort {
                dir: Dir::Dst,
                set: s.name.clone(),
                negate: false,
            }
        };
        add(s.name.clone(), vec![m], Some((s, sources)), what);
    }
    if !run.host_sources.is_empty() {
        let what = "peers, any protocol";
        let elements = run
            .hosts
            .iter()
            .map(|&a| SetElement::Net(IpNet::from(a)))
            .collect();
        let s = set("h", SetKey::Host, elements, what);
        let sources = run.host_sources.clone();
        let m = Match::Addr {
            dir: peer,
            target: AddrTarget::Set(s.name.clone()),
            negate: false,
        };
        add(s.name.clone(), vec![m], Some((s, sources)), what);
    }
    for (proto, ranges) in &run.any_peer_ports {
        let (proto, ranges) = (*proto, ranges.clone());
        let what = format!("any peer, protocol {proto}, ports");
        let elements = crate::logical::coalesce_ports(ranges)
            .into_iter()
            .map(|(min, max)| SetElement::Ports { min, max })
            .collect();
        let s = set("p", SetKey::Port, elements, &what);
        let m = vec![
            Match::L4Proto {
                proto,
                negate: false,
            },
            Match::Port {
                dir: Dir::Dst,
                target: PortTarget::Set(s.name.clone()),
                negate: false,
            },
        ];
        // Its elements come from the policies' rules alone: no sources.
        add(s.name.clone(), m, Some((s, vec![])), &what);
    }
    if lookups.len() == before {
        // The run allows nothing here (deny-alls): one counting rule keeps
        // its place visible, to `explain --kernel` and as a counter of what
        // reached it.
        rules.push(placeholder(
            &run.policies,
            "none",
            "allows nothing,",
            unset,
            LAction::Count,
        ));
        lookups.push(Lookup {
            key: "none".into(),
            matches: vec![],
            set: None,
        });
    }
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// What policy chain `chain` allows in this family, if every rule of it
/// fuses; `None` keeps its jump. Notes in `deps` the selector IP sets
/// whose members decided it (with the rule's number of ports).
fn allows(
    l: &LogicalRuleset,
    chain: &LChain,
    v6: bool,
    ingress: bool,
    deps: &mut Vec<(String, usize)>,
) -> Option<Fusion> {
    let id = chain
        .name
        .strip_prefix(if ingress { "cali-pi-" } else { "cali-po-" })?;
    let mut f = Fusion {
        policies: vec![id.to_owned()],
        ..Fusion::default()
    };
    for r in &chain.rules {
        if r.action == LAction::Count && r.policy_match.is_none() && r.conditions.is_empty() {
            continue;
        }
        if !r.conditions.is_empty() || r.action != LAction::AllowReturn {
            return None;
        }
        let pm = r.policy_match.as_ref()?;
        if !pm.in_family(v6) {
            continue;
        }
        if pm.not_protocol.is_some() || pm.icmp.is_some() || pm.not_icmp.is_some() {
            return None;
        }
        let (peer, local) = if ingress {
            (&pm.src, &pm.dst)
        } else {
            (&pm.dst, &pm.src)
        };
        let (src, dst) = (&pm.src, &pm.dst);
        if !local.nets.is_empty()
            || local.selector_set.is_some()
            || !local.not_nets.is_empty()
            || local.not_selector_set.is_some()
            || !peer.not_nets.is_empty()
            || peer.not_selector_set.is_some()
            || src.has_ports()
            || !src.not_ports.is_empty()
            || src.not_named_port_set.is_some()
            || dst.named_port_set.is_some()
            || !dst.not_ports.is_empty()
            || dst.not_named_port_set.is_some()
        {
            return None;
        }
        if peer.nets.is_empty() && peer.selector_set.is_none() {
            // Any peer.
            match (pm.protocol, dst.ports.is_empty()) {
                (None, true) => f.any = true,
                (Some(proto @ (6 | 17 | 132)), false) => f
                    .any_peer_ports
                    .entry(proto)
                    .or_default()
                    .extend(dst.ports.iter().copied()),
                _ => return None,
            }
            continue;
        }
        // What the rule's protocol and ports add per peer (`None`: any
        // protocol), before looking at the peers.
        let proto = match (pm.protocol, dst.ports.is_empty()) {
            (None, true) => None,
            (Some(proto @ (6 | 17 | 132)), false) => Some(proto),
            _ => return None,
        };
        let mut ports = 0usize;
        if proto.is_some() {
            for &(lo, hi) in &dst.ports {
                if u32::from(hi) - u32::from(lo) + 1 > MAX_RANGE {
                    return None;
                }
                ports += usize::from(hi - lo) + 1;
            }
        }
        let (nets, peers): (&[IpNet], Peers) = match (peer.nets.is_empty(), &peer.selector_set) {
            (false, None) => {
                let mut hosts: Vec<IpAddr> = peer
                    .nets
                    .iter()
                    .filter(|n| n.addr().is_ipv6() == v6)
                    .map(IpNet::addr)
                    .collect();
                hosts.sort_unstable();
                hosts.dedup();
                (&peer.nets, Peers::Hosts(hosts))
            }
            (true, Some(set)) => {
                // Its members decide from now on: a change of them that
                // turns this rule's verdict around lowers the chain again.
                deps.push((set.clone(), ports));
                let s = l.ip_sets.get(set)?;
                let nets = if v6 { &s.nets_v6 } else { &s.nets_v4 };
                (nets, Peers::Set(set.clone()))
            }
            // Nets and a selector both (their intersection).
            _ => return None,
        };
        let nets = nets.iter().filter(|n| n.addr().is_ipv6() == v6);
        if nets.clone().any(|n| n.prefix_len() != n.max_prefix_len()) {
            return None;
        }
        if ports.saturating_mul(nets.clone().count()) > MAX_RULE_ELEMENTS {
            return None;
        }
        let source = Source {
            peers,
            proto,
            ports: if proto.is_some() {
                dst.ports.clone()
            } else {
                vec![]
            },
        };
        match proto {
            None => {
                f.hosts.extend(nets.map(IpNet::addr));
                f.host_sources.push(source);
            }
            Some(proto) => {
                for a in nets.map(IpNet::addr) {
                    for &(lo, hi) in &dst.ports {
                        f.ports.extend((lo..=hi).map(|port| (a, proto, port)));
                    }
                }
                f.port_sources.push(source);
            }
        }
    }
    Some(f)
}

/// What the incremental compiler keeps to patch fused lookups instead of
/// lowering everything again: where each fused set's elements come from,
/// and which endpoint chains a selector set's member changes may refuse.
#[derive(Debug, Default)]
pub(crate) struct Upkeep {
    /// (family, fused set) → where its elements come from.
    sources: HashMap<(TableFamily, String), Vec<Source>>,
    /// Selector IP set → the fused sets its members are peers of.
    by_ip_set: HashMap<String, BTreeSet<(TableFamily, String)>>,
    /// Selector IP set → (family, endpoint chain) → the port counts of the
    /// rules whose fusing depends on its members.
    watch: HashMap<String, BTreeMap<(TableFamily, String), BTreeSet<usize>>>,
    /// (family, endpoint chain) → the IP sets it is in `watch` under.
    watching: HashMap<(TableFamily, String), BTreeSet<String>>,
}

/// A selector IP set's element changes: net → +1 joins, −1 leaves.
pub(crate) type MemberChanges = HashMap<String, BTreeMap<IpNet, i32>>;

/// Per fused set: elements a member change may add or remove, each with
/// the position of a source adding it for a member that joined.
pub(crate) type Candidates = BTreeMap<(TableFamily, String), BTreeMap<SetElement, Option<usize>>>;

impl Upkeep {
    /// Endpoint chain `name` was lowered (again) with these `deps`.
    pub(crate) fn chain_lowered(
        &mut self,
        family: TableFamily,
        name: &str,
        deps: &[(String, usize)],
    ) {
        self.chain_removed(family, name);
        if deps.is_empty() {
            return;
        }
        let at = (family, name.to_owned());
        let mut ids = BTreeSet::new();
        for (id, ports) in deps {
            self.watch
                .entry(id.clone())
                .or_default()
                .entry(at.clone())
                .or_default()
                .insert(*ports);
            ids.insert(id.clone());
        }
        self.watching.insert(at, ids);
    }

    /// Chain `name` left the table (or is about to be lowered again).
    pub(crate) fn chain_removed(&mut self, family: TableFamily, name: &str) {
        let at = (family, name.to_owned());
        for id in self.watching.remove(&at).into_iter().flatten() {
            if let Some(w) = self.watch.get_mut(&id) {
                w.remove(&at);
                if w.is_empty() {
                    self.watch.remove(&id);
                }
            }
        }
    }

    /// Fused set `set`'s elements come from `sources` (as lowered now).
    pub(crate) fn set_sources(&mut self, family: TableFamily, set: &str, sources: Vec<Source>) {
        self.set_removed(family, set);
        let at = (family, set.to_owned());
        for s in &sources {
            if let Peers::Set(id) = &s.peers {
                self.by_ip_set
                    .entry(id.clone())
                    .or_default()
                    .insert(at.clone());
            }
        }
        self.sources.insert(at, sources);
    }

    /// Fused set `set` left the table (or is about to be described again).
    pub(crate) fn set_removed(&mut self, family: TableFamily, set: &str) {
        let at = (family, set.to_owned());
        for s in self.sources.remove(&at).into_iter().flatten() {
            if let Peers::Set(id) = &s.peers {
                if let Some(sets) = self.by_ip_set.get_mut(id) {
                    sets.remove(&at);
                    if sets.is_empty() {
                        self.by_ip_set.remove(id);
                    }
                }
            }
        }
    }

    /// Whether `name` is a fused set of this family.
    pub(crate) fn is_fused(&self, family: TableFamily, name: &str) -> bool {
        self.sources.contains_key(&(family, name.to_owned()))
    }

    /// The endpoint chains to lower again because `changes` (not yet
    /// applied to `l`) turn a policy of theirs from fusing to not or back:
    /// a selector set crossing a rule's element limit, or gaining or
    /// losing a net that is not a host address.
    pub(crate) fn relower(&self, l: &LogicalRuleset, changes: &MemberChanges) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (id, nets) in changes {
            let Some(watchers) = self.watch.get(id) else {
                continue;
            };
            let set = l.ip_sets.get(id);
            for family in [TableFamily::Ip, TableFamily::Ip6] {
                let v6 = family.is_v6();
                let mut grown: i64 = 0;
                let mut wide = false;
                for (net, change) in nets {
                    if net.addr().is_ipv6() != v6 || *change == 0 {
                        continue;
                    }
                    grown += i64::from(change.signum());
                    wide |= net.prefix_len() != net.max_prefix_len();
                }
                let before = set.map_or(0, |s| if v6 { s.nets_v6.len() } else { s.nets_v4.len() });
                let before = i64::try_from(before).unwrap_or(i64::MAX);
                let after = before + grown;
                let limit = i64::try_from(MAX_RULE_ELEMENTS).unwrap_or(i64::MAX);
                for ((f, chain), ports) in watchers {
                    if *f != family || out.contains(chain) {
                        continue;
                    }
                    let crosses = ports.iter().any(|&p| {
                        let p = i64::try_from(p).unwrap_or(i64::MAX);
                        (p.saturating_mul(before) > limit) != (p.saturating_mul(after) > limit)
                    });
                    if wide || crosses {
                        out.insert(chain.clone());
                    }
                }
            }
        }
        out
    }

    /// The elements of fused sets that `changes` may add or remove: each
    /// changed member as a peer of every source using its set, with the
    /// source (its position) that adds it if the member joined.
    pub(crate) fn candidates(&self, changes: &MemberChanges) -> Candidates {
        let mut out = Candidates::new();
        let mut elements = BTreeSet::new();
        for (id, nets) in changes {
            let Some(sets) = self.by_ip_set.get(id) else {
                continue;
            };
            for at in sets {
                let v6 = at.0.is_v6();
                let candidates = out.entry(at.clone()).or_default();
                for (i, s) in self.sources[at].iter().enumerate() {
                    if !matches!(&s.peers, Peers::Set(set) if set == id) {
                        continue;
                    }
                    for (net, change) in nets {
                        if *change != 0
                            && net.addr().is_ipv6() == v6
                            && net.prefix_len() == net.max_prefix_len()
                        {
                            s.elements_of(net.addr(), &mut elements);
                            let joined = (*change > 0).then_some(i);
                            for e in std::mem::take(&mut elements) {
                                let slot = candidates.entry(e).or_insert(None);
                                *slot = slot.or(joined);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Brings `candidates` in the fused sets of `rs` in line with the IP
    /// sets' members in `l` (already changed): an element is in a fused set
    /// while one of its sources adds it. Returns the changes, made to `rs`.
    pub(crate) fn reconcile(
        &self,
        l: &LogicalRuleset,
        rs: &mut Ruleset,
        candidates: Candidates,
    ) -> Vec<SetDelta> {
        let mut out = Vec::new();
        for ((family, name), elements) in candidates {
            let Some(sources) = self.sources.get(&(family, name.clone())) else {
                continue;
            };
            let Some(table) = rs.tables.iter_mut().find(|t| t.family == family) else {
                continue;
            };
            let Some(set) = table.sets.get_mut(&name) else {
                continue;
            };
            let mut d = SetDelta {
                family,
                table: table.name.clone(),
                set: name,
                remove: vec![],
                add: vec![],
            };
            for (e, joined) in elements {
                // The source a joining member came from first (it adds the
                // element unless the set was lowered again since), then all.
                let now = joined
                    .and_then(|i| sources.get(i))
                    .is_some_and(|s| s.has(l, &e))
                    || sources.iter().any(|s| s.has(l, &e));
                let was = set.elements.binary_search(&e).is_ok();
                match (was, now) {
                    (false, true) => d.add.push(e),
                    (true, false) => d.remove.push(e),
                    _ => {}
                }
            }
            if !d.add.is_empty() || !d.remove.is_empty() {
                d.apply_to_set(set);
                out.push(d);
            }
        }
        out
    }
}

/// The changes turning `old`'s elements into `new`'s (both sorted, sets
/// of table `family` `table`).
pub(crate) fn element_delta(family: TableFamily, table: &str, old: &Set, new: &Set) -> SetDelta {
    let mut d = SetDelta {
        family,
        table: table.to_owned(),
        set: new.name.clone(),
        remove: vec![],
        add: vec![],
    };
    let (mut a, mut b) = (
        old.elements.iter().peekable(),
        new.elements.iter().peekable(),
    );
    loop {
        match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match x.cmp(y) {
                std::cmp::Ordering::Less => d.remove.push(a.next().expect("peeked").clone()),
                std::cmp::Ordering::Greater => d.add.push(b.next().expect("peeked").clone()),
                std::cmp::Ordering::Equal => {
                    a.next();
                    b.next();
                }
            },
            (Some(_), None) => d.remove.push(a.next().expect("peeked").clone()),
            (None, Some(_)) => d.add.push(b.next().expect("peeked").clone()),
            (None, None) => break,
        }
    }
    d
}
