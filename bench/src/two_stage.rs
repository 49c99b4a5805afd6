//! A measurement harness, not the product: rewrites a compiled
//! `--fused-lookup` ruleset into a two-stage form, so that the per-packet
//! sweep and the census can measure that form before the compiler builds
//! it (incrementally) itself.
//!
//! The two stages, per table:
//!
//! 1. Peer classes. Two addresses are in one class when every fused set
//!    holds them with the same protocols and ports (or both, or neither,
//!    as peers of any protocol). A node-wide verdict map keyed by address
//!    (`cali-peer-class`) jumps to the class's chain (`cali-pc-<n>`), which
//!    writes the class number into the mark bits Calico's mask leaves free
//!    (the mask less accept, pass, scratch0 and scratch1: 12 bits with the
//!    default 0xffff0000) and returns.
//! 2. Each fused set becomes a set of `class . protocol . port`
//!    (`mark . inet_proto . inet_service`) or of classes (`mark`), looked
//!    up with `meta mark & <class bits> …` where the address was.
//!
//! An endpoint chain with fused lookups first clears the class bits and
//! classifies its peer (`ip saddr vmap @cali-peer-class`, `ip daddr` on
//! egress), right before its first fused lookup. Every form here is one
//! nft lists (a class carried from a map lookup into a concatenation in a
//! register is not: nft 1.0.6 aborts `nft list ruleset` on it).
//!
//! Classes are numbered in the order of their signatures, so the same
//! ruleset always gives the same numbers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use anyhow::bail;
use compiler::fused::MARKER;
use compiler::nft::{
    AddrTarget, Chain, Dir, MapKey, Match, Rule, Ruleset, Set, SetElement, SetKey, Stmt, Table,
    Verdict, VerdictMap,
};

/// The class map's name, in every table.
pub const CLASS_MAP: &str = "cali-peer-class";
/// Class chains are `cali-pc-<n>`.
pub const CLASS_CHAIN_PREFIX: &str = "cali-pc-";

/// What the rewrite made of one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableCensus {
    /// Addresses in the class map.
    pub addresses: usize,
    pub classes: usize,
    /// Elements of the rewritten fused sets.
    pub class_elements: usize,
    /// Elements of the fused sets before.
    pub address_elements: usize,
}

/// `n` deposited into the bits of `mask`, lowest bit first.
pub fn deposit(mut n: u32, mask: u32) -> u32 {
    let mut out = 0;
    for bit in (0..32).map(|i| 1u32 << i).filter(|b| mask & b != 0) {
        if n & 1 == 1 {
            out |= bit;
        }
        n >>= 1;
    }
    out
}

/// What an element of a fused set says about its peer: the address, and
/// the protocol and port (`None`: any protocol).
fn peer_of(e: &SetElement) -> Option<(IpAddr, Option<(u8, u16)>)> {
    match e {
        SetElement::NamedPort(a, proto, port) => Some((*a, Some((*proto, *port)))),
        SetElement::Net(n) if n.prefix_len() == n.max_prefix_len() => Some((n.addr(), None)),
        _ => None,
    }
}

/// What every fused set allows one address (by set name): protocols and
/// ports, or `None` for any protocol. Equal signatures make a class.
type Signature = BTreeMap<String, BTreeSet<Option<(u8, u16)>>>;

fn is_fused_set(s: &Set) -> bool {
    s.comment
        .as_deref()
        .is_some_and(|c| c.starts_with(compiler::fused::SET_COMMENT))
}

/// Rewrites every table of `rs` (see the module docs). `class_bits`: the
/// mark bits free for the class number. Fails when the classes do not fit.
pub fn rewrite(rs: &mut Ruleset, class_bits: u32) -> anyhow::Result<Vec<TableCensus>> {
    rs.tables
        .iter_mut()
        .map(|t| rewrite_table(t, class_bits))
        .collect()
}

fn rewrite_table(t: &mut Table, class_bits: u32) -> anyhow::Result<TableCensus> {
    let mut census = TableCensus::default();
    // Each address's signature: per fused set, what it allows the address.
    let mut signature: HashMap<IpAddr, Signature> = HashMap::new();
    for s in t.sets.values().filter(|s| is_fused_set(s)) {
        census.address_elements += s.elements.len();
        if !matches!(s.key, SetKey::NamedPort | SetKey::Host) {
            continue;
        }
        for e in s.elements.iter() {
            let Some((addr, what)) = peer_of(e) else {
                bail!("fused set {}: element {e:?} is not a peer", s.name);
            };
            signature
                .entry(addr)
                .or_default()
                .entry(s.name.clone())
                .or_default()
                .insert(what);
        }
    }
    let mut signatures: Vec<_> = signature.values().cloned().collect();
    signatures.sort();
    signatures.dedup();
    let capacity = (1u64 << class_bits.count_ones()) - 1;
    if signatures.len() as u64 > capacity {
        bail!(
            "{} peer classes do not fit the {} free mark bits ({capacity} classes)",
            signatures.len(),
            class_bits.count_ones()
        );
    }
    let number = |sig: &Signature| -> u32 {
        signatures.binary_search(sig).expect("every signature") as u32 + 1
    };
    let class_of: HashMap<IpAddr, u32> = signature
        .iter()
        .map(|(addr, sig)| (*addr, number(sig)))
        .collect();
    census.addresses = class_of.len();
    census.classes = signatures.len();

    // Stage 2: the fused sets as class sets.
    let fused: Vec<String> = t
        .sets
        .values()
        .filter(|s| is_fused_set(s) && matches!(s.key, SetKey::NamedPort | SetKey::Host))
        .map(|s| s.name.clone())
        .collect();
    for name in &fused {
        let s = t.sets.get_mut(name).expect("listed");
        let mut elements = BTreeSet::new();
        for e in s.elements.iter() {
            let (addr, what) = peer_of(e).expect("checked");
            let mark = deposit(class_of[&addr], class_bits);
            elements.insert(match what {
                Some((proto, port)) => SetElement::MarkPort(mark, proto, port),
                None => SetElement::Mark(mark),
            });
        }
        census.class_elements += elements.len();
        s.key = if s.key == SetKey::NamedPort {
            SetKey::MarkPort
        } else {
            SetKey::Mark
        };
        s.elements = elements.into_iter().collect();
    }

    // Stage 1: the class map and chains.
    let mut map = VerdictMap {
        name: CLASS_MAP.into(),
        key: MapKey::Addr,
        elements: BTreeMap::new(),
        comment: Some("fused lookup: peer address → class".into()),
    };
    for (addr, class) in &class_of {
        map.elements.insert(
            addr.to_string(),
            Verdict::Jump(format!("{CLASS_CHAIN_PREFIX}{class}")),
        );
    }
    for class in 1..=signatures.len() as u32 {
        let mark = deposit(class, class_bits);
        let name = format!("{CLASS_CHAIN_PREFIX}{class}");
        t.chains.insert(
            name.clone(),
            Chain {
                name,
                base: None,
                rules: vec![Rule {
                    matches: vec![],
                    stmts: vec![Stmt::SetMark {
                        clear: class_bits & !mark,
                        set: mark,
                    }],
                    verdict: Some(Verdict::Return),
                    comment: Some(format!("peer class {class}")),
                }]
                .into(),
            },
        );
    }
    t.maps.insert(map.name.clone(), map);

    // The endpoint chains: lookups by class, classified first.
    let fused: BTreeSet<&str> = fused.iter().map(String::as_str).collect();
    for chain in t.chains.values_mut() {
        let ingress = chain.name.starts_with("cali-tw-");
        if !ingress && !chain.name.starts_with("cali-fw-") {
            continue;
        }
        let peer = if ingress { Dir::Src } else { Dir::Dst };
        let mut rules = Vec::with_capacity(chain.rules.len() + 2);
        let mut classified = false;
        for r in chain.rules.iter() {
            let fused_rule = r.comment.as_deref().is_some_and(|c| c.starts_with(MARKER));
            let mut r = r.clone();
            let mut rewritten = false;
            for m in &mut r.matches {
                let lookup = match m {
                    Match::PeerPort { set, negate: false }
                    | Match::NamedPort {
                        dir: Dir::Dst,
                        set,
                        negate: false,
                    } if fused.contains(set.as_str()) => Some((set.clone(), true)),
                    Match::Addr {
                        dir,
                        target: AddrTarget::Set(set),
                        negate: false,
                    } if *dir == peer && fused.contains(set.as_str()) => Some((set.clone(), false)),
                    _ => None,
                };
                if let Some((set, ports)) = lookup {
                    *m = Match::MarkLookup {
                        mask: class_bits,
                        ports,
                        set,
                    };
                    rewritten = true;
                }
            }
            if fused_rule && rewritten && !classified {
                rules.push(Rule {
                    matches: vec![],
                    stmts: vec![Stmt::SetMark {
                        clear: class_bits,
                        set: 0,
                    }],
                    verdict: None,
                    comment: Some("fused lookup: clear the peer class".into()),
                });
                rules.push(Rule {
                    matches: vec![],
                    stmts: vec![],
                    verdict: Some(Verdict::AddrVmap {
                        dir: peer,
                        map: CLASS_MAP.into(),
                    }),
                    comment: Some("fused lookup: the peer's class".into()),
                });
                classified = true;
            }
            rules.push(r);
        }
        chain.rules = rules.into();
    }
    Ok(census)
}

/// The mark bits a mask leaves free for the class number: the mask less
/// Calico's accept, pass, scratch0 and scratch1 bits.
pub fn class_bits(mark_mask: u32) -> anyhow::Result<u32> {
    let marks = compiler::MarkBits::from_mask(mark_mask)?;
    let free = mark_mask & !marks.all();
    if free == 0 {
        bail!("mark mask {mark_mask:#010x} leaves no bits for peer classes");
    }
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;
    use compiler::CompileOptions;

    #[test]
    fn deposit_fills_the_mask_lowest_bit_first() {
        assert_eq!(deposit(1, 0xfff0_0000), 0x0010_0000);
        assert_eq!(deposit(0xfff, 0xfff0_0000), 0xfff0_0000);
        assert_eq!(deposit(0b101, 0x0a0a_0000), 0x0002_0000 | 0x0200_0000);
        assert_eq!(class_bits(0xffff_0000).unwrap(), 0xfff0_0000);
        assert!(class_bits(0x000f_0000).is_err());
    }

    /// The class form allows exactly what the address form allows: for
    /// every fused set, (address, protocol, port) is an element before iff
    /// (the address's class, protocol, port) is one after.
    #[test]
    fn class_sets_allow_exactly_what_the_address_sets_did() {
        let state = crate::generate(&crate::Scale::new(300, 2_000));
        let opts = CompileOptions {
            fused_lookup: true,
            ..CompileOptions::new(crate::NODE_UNDER_TEST)
        };
        let (_, before) = compiler::compile_nftables(&state, &opts).unwrap();
        let mut after = before.clone();
        let bits = class_bits(compiler::logical::DEFAULT_MARK_MASK).unwrap();
        let census = rewrite(&mut after, bits).unwrap();
        assert!(census.iter().any(|c| c.classes > 1), "{census:?}");
        for (b, a) in before.tables.iter().zip(&after.tables) {
            let class_of = |addr: IpAddr| -> Option<u32> {
                let Verdict::Jump(chain) = a.maps[CLASS_MAP].elements.get(&addr.to_string())?
                else {
                    panic!("class map verdicts are jumps")
                };
                let n: u32 = chain.strip_prefix(CLASS_CHAIN_PREFIX)?.parse().ok()?;
                Some(deposit(n, bits))
            };
            let mut members: HashMap<u32, Vec<IpAddr>> = HashMap::new();
            for k in a.maps[CLASS_MAP].elements.keys() {
                let addr: IpAddr = k.parse().unwrap();
                members
                    .entry(class_of(addr).unwrap())
                    .or_default()
                    .push(addr);
            }
            for s in b.sets.values().filter(|s| is_fused_set(s)) {
                let new = &a.sets[&s.name];
                for e in s.elements.iter() {
                    let want = match peer_of(e) {
                        Some((addr, Some((p, port)))) => {
                            SetElement::MarkPort(class_of(addr).unwrap(), p, port)
                        }
                        Some((addr, None)) => SetElement::Mark(class_of(addr).unwrap()),
                        None => continue,
                    };
                    assert!(new.elements.contains(&want), "{}: {e:?}", s.name);
                }
                for e in new.elements.iter() {
                    let (mark, what) = match e {
                        SetElement::MarkPort(m, p, port) => (*m, Some((*p, *port))),
                        SetElement::Mark(m) => (*m, None),
                        _ => continue,
                    };
                    for addr in &members[&mark] {
                        let old = match what {
                            Some((p, port)) => SetElement::NamedPort(*addr, p, port),
                            None => SetElement::Net((*addr).into()),
                        };
                        assert!(s.elements.contains(&old), "{}: {addr} {e:?}", s.name);
                    }
                }
            }
            // Every endpoint chain with a class lookup classifies its peer
            // before the first one.
            for c in a.chains.values() {
                let first_lookup = c.rules.iter().position(|r| {
                    r.matches
                        .iter()
                        .any(|m| matches!(m, Match::MarkLookup { .. }))
                });
                let classify = c
                    .rules
                    .iter()
                    .position(|r| matches!(r.verdict, Some(Verdict::AddrVmap { .. })));
                if let Some(at) = first_lookup {
                    assert!(classify.is_some_and(|c| c < at), "{}", c.name);
                }
            }
        }
    }
}
