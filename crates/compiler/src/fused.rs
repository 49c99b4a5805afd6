//! `--fused-lookup` (nftables only): the policies of a tier that can fuse
//! become one set lookup per endpoint chain instead of a jump per policy.
//!
//! In an endpoint chain (`cali-tw-<iface>`, `cali-fw-<iface>`) each policy
//! of a tier is `pass clear → jump cali-pi-<id>` then `accept set →
//! return`. A policy whose rules are all Allow rules (as every converted
//! Kubernetes `NetworkPolicy`'s are) of the shapes below decides nothing but
//! "allowed": for a run of such policies in a row, the walk accepts exactly
//! when one of their rules matches, whatever their order. The run becomes
//! at most two rules, each `pass clear` + lookup → set the accept bit and
//! return (what the policy's Allow and the "return if accepted" rule did):
//!
//! - `ip saddr . meta l4proto . th dport @cali40f-…` (egress: `ip daddr .
//!   …`) holding (peer, protocol, port) of the rules with TCP, UDP or SCTP
//!   and destination ports (ranges of at most [`MAX_RANGE`] ports);
//! - `ip saddr @cali40h-…` (egress: `ip daddr`) holding the peers of the
//!   rules without protocol and ports.
//!
//! A rule fuses when its peers are host addresses (a selector's set whose
//! members are all pods, or host nets) and it has nothing else: no Deny,
//! Pass or Log, no notSelector/notNets/notPorts, no ICMP or notProtocol, no
//! named ports, no match on the endpoint's own side, not "any peer". A
//! policy with a rule that does not fuse keeps its jump, in its place: runs
//! end there, so the order against Deny and Pass is the walk's. A policy
//! without rules in this family (a deny-all) fuses to nothing. The tier's
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

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::logical::{id_hash, Cond, LAction, LChain, LRule, LogicalRuleset};
use crate::lower_nft::{lower_chain, MAX_COMMENT};
use crate::nft::{AddrTarget, Dir, Match, Ruleset, Set, SetElement, SetKey, Table};

/// The widest port range expanded into single (peer, protocol, port)
/// elements; a rule with a wider one keeps its policy's jump.
pub const MAX_RANGE: u32 = 64;
/// The most elements one rule may add (peers × ports).
const MAX_RULE_ELEMENTS: usize = 1 << 16;
const MARKER: &str = "Fused lookup @";

/// What a run of policies allows, in one family and direction.
#[derive(Debug, Default)]
struct Fusion {
    /// (peer, protocol, destination port).
    ports: BTreeSet<(IpAddr, u8, u16)>,
    /// Peers allowed whatever the protocol.
    hosts: BTreeSet<IpAddr>,
    /// The fused policies' ids (from their chain names).
    policies: Vec<String>,
}

impl Fusion {
    fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
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
    let mut lookups: Vec<(String, Set)> = Vec::new();
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
            run.ports.extend(policy.ports);
            run.hosts.extend(policy.hosts);
            run.policies.extend(policy.policies);
            fused_any = true;
            i += 2;
            continue;
        }
        flush(&mut run, t, marks.pass, &mut rules, &mut lookups);
        rules.push(r.clone());
        i += 1;
    }
    flush(&mut run, t, marks.pass, &mut rules, &mut lookups);
    if !fused_any {
        return;
    }
    let fused = LChain {
        name: chain.name.clone(),
        rules,
    };
    let (mut lowered, sets) = lower_chain(l, t.family, &fused);
    for rule in &mut lowered.rules {
        let Some(set) = rule
            .comment
            .as_deref()
            .and_then(|c| c.strip_prefix(MARKER))
            .and_then(|c| c.split(':').next())
        else {
            continue;
        };
        let (_, s) = lookups
            .iter()
            .find(|(name, _)| name == set)
            .expect("a marked rule names its set");
        rule.matches.push(match (s.key, ingress) {
            (SetKey::NamedPort, true) => Match::PeerPort {
                set: s.name.clone(),
                negate: false,
            },
            (SetKey::NamedPort, false) => Match::NamedPort {
                dir: Dir::Dst,
                set: s.name.clone(),
                negate: false,
            },
            (_, ingress) => Match::Addr {
                dir: if ingress { Dir::Src } else { Dir::Dst },
                target: AddrTarget::Set(s.name.clone()),
                negate: false,
            },
        });
    }
    t.chains.insert(lowered.name.clone(), lowered);
    t.sets.extend(sets);
    t.sets.extend(lookups);
}

/// Ends a run: its lookup rules (none if it allows nothing) in place of
/// its policies' jumps.
fn flush(
    run: &mut Fusion,
    t: &Table,
    pass: u32,
    rules: &mut Vec<LRule>,
    lookups: &mut Vec<(String, Set)>,
) {
    if run.is_empty() {
        return;
    }
    let run = std::mem::take(run);
    let fam = if t.family.is_v6() { "60" } else { "40" };
    let mut add = |kind: &str, key: SetKey, elements: Vec<SetElement>, what: &str| {
        let mut text = String::new();
        for e in &elements {
            let _ = write!(text, "{e:?},");
        }
        let name = format!("cali{fam}{kind}-{}", id_hash(&format!("{kind}:{text}")));
        let mut comment = format!("{MARKER}{name}: {what} of");
        for p in &run.policies {
            let _ = write!(comment, " {p}");
        }
        comment.truncate(floor_char_boundary(&comment, MAX_COMMENT));
        rules.push(LRule {
            conditions: vec![Cond::MarkClear(pass)],
            policy_match: None,
            action: LAction::AllowReturn,
            comment,
        });
        let set = Set {
            name: name.clone(),
            key,
            elements,
            // Shared by content, also between directions: no direction here.
            comment: Some(format!("fused lookup: {what}")),
        };
        lookups.push((name, set));
    };
    if !run.ports.is_empty() {
        let elements = run
            .ports
            .iter()
            .map(|&(a, p, port)| SetElement::NamedPort(a, p, port))
            .collect();
        add("f", SetKey::NamedPort, elements, "peer . proto . port");
    }
    if !run.hosts.is_empty() {
        let elements = run
            .hosts
            .iter()
            .map(|&a| SetElement::Net(IpNet::from(a)))
            .collect();
        add("h", SetKey::Host, elements, "peers, any protocol");
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
            // Any peer, or nets and a selector both (their intersection).
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
