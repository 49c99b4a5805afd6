//! Logical ruleset → nftables objects, the nftables way:
//!
//! - workload dispatch through verdict maps keyed by interface name;
//! - each selector → one named set per family, shared by every rule using it;
//! - a port list or CIDR list → one set-membership test, with sets of equal
//!   content shared (the kernel's cost grows with the number of sets);
//! - one or two ports / one CIDR → a plain comparison (no set at all);
//! - one Calico rule → one nft rule per family (two only when it mixes
//!   numeric and named ports, which nft cannot OR in one rule).

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::logical::{
    id_hash, Cond, EntityMatch, LAction, LChain, LRule, LogicalRuleset, PolicyMatch, CHAIN_FORWARD,
    CHAIN_FROM_WL_DISPATCH, CHAIN_INPUT, CHAIN_TO_WL_DISPATCH, WORKLOAD_IFACE_PREFIX,
};
use crate::nft::*;

/// Base chain names: felix's hook names, in our own table.
pub const BASE_FORWARD: &str = "filter-FORWARD";
pub const BASE_INPUT: &str = "filter-INPUT";
/// Hook priority of our base chains: `filter` (0). See ARCHITECTURE.md.
pub const BASE_PRIORITY: i32 = 0;
/// The kernel/nft limit on comment length we keep within.
pub const MAX_COMMENT: usize = 128;

pub fn to_nftables(l: &LogicalRuleset) -> Ruleset {
    to_nftables_kept(l).0
}

/// [`to_nftables`], with what the incremental compiler keeps of the fused
/// lookups.
pub(crate) fn to_nftables_kept(l: &LogicalRuleset) -> (Ruleset, crate::fused::Upkeep) {
    let mut rs = Ruleset {
        tables: [TableFamily::Ip, TableFamily::Ip6]
            .into_iter()
            .map(|f| lower_table(l, f))
            .collect(),
    };
    // Hook: `--fused-lookup` rewrites the endpoint chains (crate::fused).
    let upkeep = if l.fused_lookup {
        crate::fused::fuse(l, &mut rs)
    } else {
        crate::fused::Upkeep::default()
    };
    (rs, upkeep)
}

struct Lowering<'a> {
    l: &'a LogicalRuleset,
    family: TableFamily,
    sets: BTreeMap<String, Set>,
}

fn lower_table(l: &LogicalRuleset, family: TableFamily) -> Table {
    let mut t = Table::new(family, TABLE_NAME);
    let mut lw = Lowering {
        l,
        family,
        sets: BTreeMap::new(),
    };
    let accept_rule = Rule {
        matches: vec![Match::Mark {
            mask: l.marks.accept,
            value: l.marks.accept,
            negate: false,
        }],
        stmts: vec![Stmt::Counter],
        verdict: Some(Verdict::Accept),
        comment: Some("Policy explicitly accepted packet".into()),
    };
    for (name, hook, target) in [
        (BASE_FORWARD, Hook::Forward, CHAIN_FORWARD),
        (BASE_INPUT, Hook::Input, CHAIN_INPUT),
    ] {
        t.chains.insert(
            name.into(),
            Chain {
                name: name.into(),
                base: Some(BaseChain {
                    hook,
                    priority: BASE_PRIORITY,
                    policy: ChainPolicy::Accept,
                }),
                rules: vec![
                    Rule {
                        verdict: Some(Verdict::Jump(target.into())),
                        ..Default::default()
                    },
                    accept_rule.clone(),
                ]
                .into(),
            },
        );
    }
    for chain in l.chains.values() {
        t.chains.insert(chain.name.clone(), lw.chain(chain));
    }
    for map in dispatch_maps(l) {
        t.maps.insert(map.name.clone(), map);
    }
    t.sets = lw.sets;
    t
}

/// One logical chain in a table of `family`, with the sets its rules use
/// (what an incremental compile adds for a chain it creates or changes).
pub(crate) fn lower_chain(
    l: &LogicalRuleset,
    family: TableFamily,
    chain: &LChain,
) -> (Chain, BTreeMap<String, Set>) {
    let mut lw = Lowering {
        l,
        family,
        sets: BTreeMap::new(),
    };
    let chain = lw.chain(chain);
    (chain, lw.sets)
}

/// The verdict maps dispatching to the local endpoints' chains (the same
/// in both families).
pub(crate) fn dispatch_maps(l: &LogicalRuleset) -> [VerdictMap; 2] {
    [
        (CHAIN_FROM_WL_DISPATCH, false),
        (CHAIN_TO_WL_DISPATCH, true),
    ]
    .map(|(map, to)| VerdictMap {
        name: map.into(),
        key: MapKey::IfName,
        elements: l
            .endpoints
            .values()
            .map(|e| {
                let chain = if to { &e.to_chain } else { &e.from_chain };
                (e.interface.clone(), Verdict::Goto(chain.clone()))
            })
            .collect(),
        comment: Some(format!(
            "Local workload interfaces → {} chains",
            if to { "cali-tw-" } else { "cali-fw-" }
        )),
    })
}

/// The nft set holding logical IP set `id` (`s:…`, `n:…`) in a table of
/// `family`: `cali40s-…`, `cali60n-…`.
pub fn ip_set_name(id: &str, family: TableFamily) -> String {
    let (kind, hash) = id.split_once(':').expect("ids are kind:hash");
    let fam = if family.is_v6() { "60" } else { "40" };
    format!("cali{fam}{kind}-{hash}")
}

pub fn truncate_comment(s: &str) -> String {
    let s = s.replace('"', "'");
    if s.len() <= MAX_COMMENT {
        return s;
    }
    let mut end = MAX_COMMENT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl Lowering<'_> {
    fn chain(&mut self, chain: &LChain) -> Chain {
        Chain {
            name: chain.name.clone(),
            base: None,
            rules: chain.rules.iter().flat_map(|r| self.rule(r)).collect(),
        }
    }

    fn rule(&mut self, r: &LRule) -> Vec<Rule> {
        let mut base = Vec::new();
        for c in &r.conditions {
            match c {
                Cond::FromWorkload | Cond::ToWorkload => base.push(Match::IfName {
                    dir: if *c == Cond::FromWorkload {
                        IfDir::In
                    } else {
                        IfDir::Out
                    },
                    name: WORKLOAD_IFACE_PREFIX.into(),
                    wildcard: true,
                    negate: false,
                }),
                Cond::MarkClear(bits) => base.push(Match::Mark {
                    mask: *bits,
                    value: 0,
                    negate: false,
                }),
                Cond::MarkSet(bits) => base.push(Match::Mark {
                    mask: *bits,
                    value: *bits,
                    negate: false,
                }),
                Cond::CtEstablishedRelated => base.push(Match::CtState(
                    CtStates::ESTABLISHED.union(CtStates::RELATED),
                )),
                Cond::CtInvalid => base.push(Match::CtState(CtStates::INVALID)),
                Cond::Icmpv6Type(t) => {
                    if !self.family.is_v6() {
                        return vec![];
                    }
                    base.push(Match::L4Proto {
                        proto: 58,
                        negate: false,
                    });
                    base.push(Match::Icmp {
                        icmp_type: *t,
                        code: None,
                        negate: false,
                    });
                }
            }
        }
        let alternatives = match &r.policy_match {
            None => vec![base],
            Some(pm) => match self.policy_match(pm) {
                None => return vec![],
                Some(alts) => alts
                    .into_iter()
                    .map(|mut a| {
                        let mut m = base.clone();
                        m.append(&mut a);
                        m
                    })
                    .collect(),
            },
        };
        let (stmts, verdict) = self.action(&r.action);
        let comment = Some(truncate_comment(&r.comment));
        alternatives
            .into_iter()
            .map(|matches| Rule {
                matches,
                stmts: stmts.clone(),
                verdict: verdict.clone(),
                comment: comment.clone(),
            })
            .collect()
    }

    fn action(&self, a: &LAction) -> (Vec<Stmt>, Option<Verdict>) {
        let m = self.l.marks;
        match a {
            LAction::Accept => (vec![], Some(Verdict::Accept)),
            LAction::Drop => (vec![Stmt::Counter], Some(Verdict::Drop)),
            LAction::Return => (vec![], Some(Verdict::Return)),
            LAction::Jump(c) => (vec![], Some(Verdict::Jump(c.clone()))),
            LAction::Goto(c) => (vec![], Some(Verdict::Goto(c.clone()))),
            LAction::SetMark(bits) => (
                vec![Stmt::SetMark {
                    clear: 0,
                    set: *bits,
                }],
                None,
            ),
            LAction::ClearMark(bits) => (
                vec![Stmt::SetMark {
                    clear: *bits,
                    set: 0,
                }],
                None,
            ),
            LAction::AllowReturn => (
                vec![
                    Stmt::Counter,
                    Stmt::SetMark {
                        clear: 0,
                        set: m.accept,
                    },
                ],
                Some(Verdict::Return),
            ),
            LAction::PassReturn => (
                vec![
                    Stmt::Counter,
                    Stmt::SetMark {
                        clear: 0,
                        set: m.pass,
                    },
                ],
                Some(Verdict::Return),
            ),
            LAction::Log(prefix) => (
                vec![
                    Stmt::Counter,
                    Stmt::Log {
                        prefix: prefix.clone(),
                        group: None,
                        rate_per_second: None,
                    },
                ],
                None,
            ),
            LAction::LogDenied {
                prefix,
                group,
                rate_per_second,
            } => (
                vec![Stmt::Log {
                    prefix: prefix.clone(),
                    group: Some(*group),
                    rate_per_second: Some(*rate_per_second),
                }],
                None,
            ),
            LAction::Count => (vec![Stmt::Counter], None),
            LAction::DispatchFromWorkload => (
                vec![],
                Some(Verdict::IfNameVmap {
                    dir: IfDir::In,
                    map: CHAIN_FROM_WL_DISPATCH.into(),
                }),
            ),
            LAction::DispatchToWorkload => (
                vec![],
                Some(Verdict::IfNameVmap {
                    dir: IfDir::Out,
                    map: CHAIN_TO_WL_DISPATCH.into(),
                }),
            ),
        }
    }

    /// The match lists (alternatives, ORed as separate rules) for a Calico
    /// rule in this family; `None` when it can never match here.
    fn policy_match(&mut self, pm: &PolicyMatch) -> Option<Vec<Vec<Match>>> {
        // Checked before any set is made, so that every set of a table is
        // used by one of its rules (an incremental compile counts on it).
        if !pm.in_family(self.family.is_v6()) {
            return None;
        }
        let mut m = Vec::new();
        if let Some(p) = pm.protocol {
            m.push(Match::L4Proto {
                proto: p,
                negate: false,
            });
        }
        if let Some(p) = pm.not_protocol {
            m.push(Match::L4Proto {
                proto: p,
                negate: true,
            });
        }
        if let Some((t, code)) = pm.icmp {
            m.push(Match::Icmp {
                icmp_type: t,
                code,
                negate: false,
            });
        }
        if let Some((t, code)) = pm.not_icmp {
            m.push(Match::Icmp {
                icmp_type: t,
                code,
                negate: true,
            });
        }
        let src = self.entity(&pm.src, Dir::Src, &mut m)?;
        let dst = self.entity(&pm.dst, Dir::Dst, &mut m)?;
        let mut out = Vec::new();
        for s in &src {
            for d in &dst {
                let mut rule = m.clone();
                rule.extend(s.iter().cloned());
                rule.extend(d.iter().cloned());
                out.push(rule);
            }
        }
        Some(out)
    }

    /// Appends the entity's address matches to `m`; returns the port
    /// alternatives (one empty alternative when it has no ports).
    fn entity(&mut self, e: &EntityMatch, dir: Dir, m: &mut Vec<Match>) -> Option<Vec<Vec<Match>>> {
        let v6 = self.family.is_v6();
        let of_family = |nets: &[IpNet]| -> Vec<IpNet> {
            nets.iter()
                .copied()
                .filter(|n| matches!(n, IpNet::V6(_)) == v6)
                .collect()
        };
        if !e.nets.is_empty() {
            let nets = of_family(&e.nets);
            if nets.is_empty() {
                return None; // only other-family CIDRs: never matches here
            }
            m.push(self.addr_match(dir, nets, false));
        }
        let not_nets = of_family(&e.not_nets);
        if !not_nets.is_empty() {
            m.push(self.addr_match(dir, not_nets, true));
        }
        if let Some(id) = &e.selector_set {
            m.push(Match::Addr {
                dir,
                target: AddrTarget::Set(self.ip_set(id)),
                negate: false,
            });
        }
        if let Some(id) = &e.not_selector_set {
            m.push(Match::Addr {
                dir,
                target: AddrTarget::Set(self.ip_set(id)),
                negate: true,
            });
        }
        if !e.not_ports.is_empty() {
            m.push(self.port_match(dir, &e.not_ports, true));
        }
        if let Some(id) = &e.not_named_port_set {
            m.push(Match::NamedPort {
                dir,
                set: self.ip_set(id),
                negate: true,
            });
        }
        let mut alts = Vec::new();
        if !e.ports.is_empty() {
            alts.push(vec![self.port_match(dir, &e.ports, false)]);
        }
        if let Some(id) = &e.named_port_set {
            alts.push(vec![Match::NamedPort {
                dir,
                set: self.ip_set(id),
                negate: false,
            }]);
        }
        if alts.is_empty() {
            alts.push(vec![]);
        }
        Some(alts)
    }

    fn addr_match(&mut self, dir: Dir, nets: Vec<IpNet>, negate: bool) -> Match {
        let nets = crate::logical::coalesce(nets);
        let target = if nets.len() == 1 {
            AddrTarget::Net(nets[0])
        } else {
            let text: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
            let fam = if self.family.is_v6() { "60" } else { "40" };
            let name = format!("cali{fam}c-{}", id_hash(&format!("c:{}", text.join(","))));
            self.sets.entry(name.clone()).or_insert_with(|| Set {
                name: name.clone(),
                key: SetKey::Addr,
                elements: nets.iter().map(|n| SetElement::Net(*n)).collect(),
                comment: Some(truncate_comment(&format!("CIDRs {}", text.join(" ")))),
            });
            AddrTarget::Set(name)
        };
        Match::Addr {
            dir,
            target,
            negate,
        }
    }

    fn port_match(&mut self, dir: Dir, ports: &[(u16, u16)], negate: bool) -> Match {
        let target = if let [(min, max)] = ports {
            PortTarget::Range {
                min: *min,
                max: *max,
            }
        } else {
            let text: Vec<String> = ports
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            let name = format!("calipt-{}", id_hash(&format!("p:{}", text.join(","))));
            self.sets.entry(name.clone()).or_insert_with(|| Set {
                name: name.clone(),
                key: SetKey::Port,
                elements: ports
                    .iter()
                    .map(|(min, max)| SetElement::Ports {
                        min: *min,
                        max: *max,
                    })
                    .collect(),
                comment: Some(truncate_comment(&format!("ports {}", text.join(" ")))),
            });
            PortTarget::Set(name)
        };
        Match::Port {
            dir,
            target,
            negate,
        }
    }

    /// The nft set for a logical IP set, created in this table on first use.
    fn ip_set(&mut self, id: &str) -> String {
        let set = &self.l.ip_sets[id];
        let kind = id.split_once(':').expect("ids are kind:hash").0;
        let name = ip_set_name(id, self.family);
        if !self.sets.contains_key(&name) {
            let v6 = self.family.is_v6();
            let (key, elements) = if kind == "n" {
                (
                    SetKey::NamedPort,
                    set.members_named
                        .iter()
                        .filter(|(ip, _, _)| ip.is_ipv6() == v6)
                        .map(|(ip, p, port)| SetElement::NamedPort(*ip, *p, *port))
                        .collect(),
                )
            } else {
                let nets = if v6 { &set.nets_v6 } else { &set.nets_v4 };
                (
                    if set.hosts_only() {
                        SetKey::Host
                    } else {
                        SetKey::Addr
                    },
                    nets.iter().map(|n| SetElement::Net(*n)).collect(),
                )
            };
            self.sets.insert(
                name.clone(),
                Set {
                    name: name.clone(),
                    key,
                    elements,
                    comment: Some(truncate_comment(&set.describe())),
                },
            );
        }
        name
    }
}
