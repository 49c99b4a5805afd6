//! `--fused-lookup` (nftables only): the policies of a tier that can fuse
//! become one set lookup per endpoint chain instead of a jump per policy.
//!
//! In an endpoint chain (`cali-tw-<iface>`, `cali-fw-<iface>`) each policy
//! of a tier is `pass clear → jump cali-pi-<id>` then `accept set →
//! return`. A policy whose rules are all Allow rules (as every converted
//! Kubernetes `NetworkPolicy`'s are) of the shapes below decides nothing but
//! "allowed": for a run of such policies in a row, the walk accepts exactly
//! when one of their rules matches, whatever their order. The run becomes
//! a few rules, each `pass clear` + lookup → set the accept bit and return
//! (what the policy's Allow and the "return if accepted" rule did):
//!
//! - `ip saddr . meta l4proto . th dport @cali40f-…` (egress: `ip daddr .
//!   …`) holding (peer, protocol, port) of the rules with TCP, UDP or SCTP
//!   and destination ports (ranges of at most [`MAX_RANGE`] ports);
//! - `ip saddr @cali40h-…` (egress: `ip daddr`) holding the peers of the
//!   rules without protocol and ports;
//! - per protocol, `meta l4proto tcp th dport @cali40p-…` for the rules
//!   with ports and any peer (Kubernetes `ports` without `from`);
//! - nothing but `pass clear` when a rule allows everything (any peer, no
//!   protocol, no ports): then it is the run's only rule.
//!
//! A rule fuses when its peers are host addresses (a selector's set whose
//! members are all pods, or host nets) or anyone, and it has nothing else:
//! no Deny, Pass or Log, no notSelector/notNets/notPorts, no ICMP or
//! notProtocol, no named ports, no match on the endpoint's own side, not
//! nets and a selector together, not a protocol without ports. A
//! policy with a rule that does not fuse keeps its jump, in its place: runs
//! end there, so the order against Deny and Pass is the walk's. A policy
//! without rules in this family (a deny-all) fuses to nothing; a run that
//! allows nothing leaves one counting rule (`Fused lookup @none`). The tier's
//! end-of-tier drop and the profiles that follow are untouched. Sets are
//! named by the hash of their elements, so endpoints selected by the same
//! policies share one.
//!
//! The `cali-pi-`/`cali-po-` chains stay in the table (explain's chain path
//! and the walk for what does not fuse); what a fused lookup accepts is
//! counted on its own rule, whose comment names the fused policies, not in
//! those chains. The model's answers (`explain`, the scenarios' oracle) do
//! not change. The incremental compiler compiles in full whenever this is
//! on (a pod's set membership is also a fused set's elements).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::logical::{id_hash, Cond, LAction, LChain, LRule, LogicalRuleset};
use crate::lower_nft::{lower_chain, MAX_COMMENT};
use crate::nft::{AddrTarget, Dir, Match, PortTarget, Ruleset, Set, SetElement, SetKey, Table};

/// The widest port range expanded into single (peer, protocol, port)
/// elements; a rule with a wider one keeps its policy's jump.
pub const MAX_RANGE: u32 = 64;
/// The most elements one rule may add (peers × ports).
const MAX_RULE_ELEMENTS: usize = 1 << 16;
/// How every fused rule's comment starts (`Fused lookup @<set>: … of
/// <policy ids>`); `explain --kernel` recognises a fused node by it.
pub const MARKER: &str = "Fused lookup @";

/// What a run of policies allows, in one family and direction.
#[derive(Debug, Default)]
struct Fusion {
    /// (peer, protocol, destination port).
    ports: BTreeSet<(IpAddr, u8, u16)>,
    /// Peers allowed whatever the protocol.
    hosts: BTreeSet<IpAddr>,
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
        self.hosts.extend(other.hosts);
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
    set: Option<Set>,
}

/// Rewrites the endpoint chains of `rs` (lowered from `l`) with fused
/// lookups, adding their sets. Called by `lower_nft::to_nftables` when
/// `l.fused_lookup` is set.
pub(crate) fn fuse(l: &LogicalRuleset, rs: &mut Ruleset) {
    for t in &mut rs.tables {
        for e in l.endpoints.values() {
            for (name, ingress) in [(&e.to_chain, true), (&e.from_chain, false)] {
                if let Some(chain) = l.chains.get(name) {
                    fuse_chain(l, t, chain, ingress);
                }
            }
        }
    }
}

fn fuse_chain(l: &LogicalRuleset, t: &mut Table, chain: &LChain, ingress: bool) {
    let v6 = t.family.is_v6();
    let marks = l.marks;
    let mut rules: Vec<LRule> = Vec::new();
    let mut lookups: Vec<Lookup> = Vec::new();
    let mut run = Fusion::default();
    let mut fused_any = false;
    let mut i = 0;
    while i < chain.rules.len() {
        let r = &chain.rules[i];
        let jump = match (&r.action, chain.rules.get(i + 1)) {
            (LAction::Jump(target), Some(next))
                if r.conditions == [Cond::MarkClear(marks.pass)]
                    && next.conditions == [Cond::MarkSet(marks.accept)]
                    && next.action == LAction::Return =>
            {
                l.chains.get(target)
            }
            _ => None,
        };
        if let Some(policy) = jump.and_then(|p| allows(l, p, v6, ingress)) {
            run.extend(policy);
            fused_any = true;
            i += 2;
            continue;
        }
        flush(&mut run, t, ingress, marks.pass, &mut rules, &mut lookups);
        rules.push(r.clone());
        i += 1;
    }
    flush(&mut run, t, ingress, marks.pass, &mut rules, &mut lookups);
    if !fused_any {
        return;
    }
    let fused = LChain {
        name: chain.name.clone(),
        rules,
    };
    let (mut lowered, sets) = lower_chain(l, t.family, &fused);
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
    t.chains.insert(lowered.name.clone(), lowered);
    t.sets.extend(sets);
    t.sets.extend(
        lookups
            .into_iter()
            .filter_map(|l| l.set)
            .map(|s| (s.name.clone(), s)),
    );
}

/// A fused lookup's set, named by its content (`cali40f-…`) and shared
/// also between directions (so its comment names no direction).
fn fused_set(t: &Table, kind: &str, key: SetKey, elements: Vec<SetElement>, what: &str) -> Set {
    let fam = if t.family.is_v6() { "60" } else { "40" };
    let mut text = String::new();
    for e in &elements {
        let _ = write!(text, "{e:?},");
    }
    let name = format!("cali{fam}{kind}-{}", id_hash(&format!("{kind}:{text}")));
    Set {
        name,
        key,
        elements,
        comment: Some(format!("fused lookup: {what}")),
    }
}

/// A fused rule in place of a run: `pass clear` → `action`, its comment
/// `Fused lookup @<key>: <what> of <policy ids>` (the key finds its
/// matches after lowering).
fn placeholder(policies: &[String], key: &str, what: &str, pass: u32, action: LAction) -> LRule {
    let mut comment = format!("{MARKER}{key}: {what} of");
    for p in policies {
        let _ = write!(comment, " {p}");
    }
    comment.truncate(floor_char_boundary(&comment, MAX_COMMENT));
    LRule {
        conditions: vec![Cond::MarkClear(pass)],
        policy_match: None,
        action,
        comment,
    }
}

/// Ends a run: its lookup rules (none if it allows nothing) in place of
/// its policies' jumps.
fn flush(
    run: &mut Fusion,
    t: &Table,
    ingress: bool,
    pass: u32,
    rules: &mut Vec<LRule>,
    lookups: &mut Vec<Lookup>,
) {
    if run.is_empty() {
        return;
    }
    let run = std::mem::take(run);
    let before = lookups.len();
    let peer = if ingress { Dir::Src } else { Dir::Dst };
    let mut add = |key: String, matches: Vec<Match>, set: Option<Set>, what: &str| {
        rules.push(placeholder(
            &run.policies,
            &key,
            what,
            pass,
            LAction::AllowReturn,
        ));
        lookups.push(Lookup { key, matches, set });
    };
    let set = |kind: &str, key: SetKey, elements: Vec<SetElement>, what: &str| {
        fused_set(t, kind, key, elements, what)
    };
    if run.any {
        // Some rule allows everything: the run accepts every packet.
        add("any".into(), vec![], None, "any peer, any protocol");
        return;
    }
    if !run.ports.is_empty() {
        let what = "peer . proto . port";
        let elements = run
            .ports
            .iter()
            .map(|&(a, p, port)| SetElement::NamedPort(a, p, port))
            .collect();
        let s = set("f", SetKey::NamedPort, elements, what);
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
        add(s.name.clone(), vec![m], Some(s), what);
    }
    if !run.hosts.is_empty() {
        let what = "peers, any protocol";
        let elements = run
            .hosts
            .iter()
            .map(|&a| SetElement::Net(IpNet::from(a)))
            .collect();
        let s = set("h", SetKey::Host, elements, what);
        let m = Match::Addr {
            dir: peer,
            target: AddrTarget::Set(s.name.clone()),
            negate: false,
        };
        add(s.name.clone(), vec![m], Some(s), what);
    }
    for (proto, ranges) in run.any_peer_ports {
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
        add(s.name.clone(), m, Some(s), &what);
    }
    if lookups.len() == before {
        // The run allows nothing here (deny-alls): one counting rule keeps
        // its place visible, to `explain --kernel` and as a counter of what
        // reached it.
        rules.push(placeholder(
            &run.policies,
            "none",
            "allows nothing,",
            pass,
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
/// fuses; `None` keeps its jump.
fn allows(l: &LogicalRuleset, chain: &LChain, v6: bool, ingress: bool) -> Option<Fusion> {
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
        let nets: Vec<IpNet> = match (peer.nets.is_empty(), &peer.selector_set) {
            (false, None) => peer
                .nets
                .iter()
                .copied()
                .filter(|n| n.addr().is_ipv6() == v6)
                .collect(),
            (true, Some(set)) => {
                let s = l.ip_sets.get(set)?;
                if v6 { &s.nets_v6 } else { &s.nets_v4 }.clone()
            }
            // Nets and a selector both (their intersection).
            _ => return None,
        };
        if nets.iter().any(|n| n.prefix_len() != n.max_prefix_len()) {
            return None;
        }
        let peers = nets.iter().map(IpNet::addr);
        match (pm.protocol, dst.ports.is_empty()) {
            (None, true) => f.hosts.extend(peers),
            (Some(proto @ (6 | 17 | 132)), false) => {
                let mut ports = 0usize;
                for &(lo, hi) in &dst.ports {
                    if u32::from(hi) - u32::from(lo) + 1 > MAX_RANGE {
                        return None;
                    }
                    ports += usize::from(hi - lo) + 1;
                }
                if ports.saturating_mul(nets.len()) > MAX_RULE_ELEMENTS {
                    return None;
                }
                for a in peers {
                    for &(lo, hi) in &dst.ports {
                        f.ports.extend((lo..=hi).map(|port| (a, proto, port)));
                    }
                }
            }
            _ => return None,
        }
    }
    Some(f)
}
