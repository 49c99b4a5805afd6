//! How many elements `--fused-lookup`'s sets hold on the benchmark's node,
//! per endpoint chain, and what a per-chain element budget would leave
//! fused: `cargo run --release -p bench --example fused_census -- POLICIES`
//! (compiles only; no kernel).
//!
//! A chain's elements are those of the fused sets its rules look up (sets
//! are shared by endpoints with the same run of policies, so the node's
//! total counts each set once). For each budget, a chain whose fused sets
//! hold more than the budget is counted as walking its chain instead.
//!
//! Peer classes: addresses that appear in exactly the same fused sets with
//! the same protocols and ports are interchangeable to every fused lookup.
//! A two-stage lookup (one node-wide map address → class id, then per chain
//! a set of (class, protocol, port)) would hold one element per address
//! plus, per chain, its distinct (class, protocol, port) triples: printed
//! as "two-stage".
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use compiler::nft::SetElement;

/// The address of a fused set's element and what goes with it (protocol
/// and port; none for an address alone).
fn split(e: &SetElement) -> Option<(IpAddr, Option<(u8, u16)>)> {
    match e {
        SetElement::NamedPort(a, proto, port) => Some((*a, Some((*proto, *port)))),
        SetElement::Net(n) if n.prefix_len() == n.max_prefix_len() => Some((n.addr(), None)),
        _ => None,
    }
}

fn hash_of(x: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    x.hash(&mut h);
    h.finish()
}

use bench::{generate, run::scale_for, NODE_UNDER_TEST};
use compiler::nft::referenced_sets;
use compiler::CompileOptions;

fn main() -> anyhow::Result<()> {
    let policies: usize = std::env::args().nth(1).map_or(Ok(10_000), |a| a.parse())?;
    let state = generate(&scale_for(policies));
    let opts = CompileOptions {
        fused_lookup: true,
        ..CompileOptions::new(NODE_UNDER_TEST)
    };
    let (logical, ruleset) = compiler::compile_nftables(&state, &opts)?;
    let (_, walk) = compiler::compile_nftables(&state, &CompileOptions::new(NODE_UNDER_TEST))?;
    let walk_elements: usize = walk
        .tables
        .iter()
        .flat_map(|t| t.sets.values())
        .map(|s| s.elements.len())
        .sum();
    println!("chain walk: {walk_elements} set elements on the node");
    for table in &ruleset.tables {
        let fused: BTreeMap<&str, usize> = table
            .sets
            .values()
            .filter(|s| {
                s.comment
                    .as_deref()
                    .is_some_and(|c| c.starts_with(compiler::fused::SET_COMMENT))
            })
            .map(|s| (s.name.as_str(), s.elements.len()))
            .collect();
        let total: usize = fused.values().sum();
        // Endpoint chain → the fused sets it looks up.
        let mut chains: Vec<(&str, BTreeSet<&str>)> = Vec::new();
        for chain in table.chains.values() {
            if !(chain.name.starts_with("cali-tw-") || chain.name.starts_with("cali-fw-")) {
                continue;
            }
            let sets: BTreeSet<&str> = referenced_sets(chain)
                .filter(|s| fused.contains_key(s))
                .collect();
            chains.push((chain.name.as_str(), sets));
        }
        let per_chain: Vec<usize> = chains
            .iter()
            .map(|(_, sets)| sets.iter().map(|s| fused[s]).sum())
            .collect();
        let mut sorted = per_chain.clone();
        sorted.sort_unstable();
        let pct = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
        println!(
            "table {:?}: {} fused sets, {total} elements; {} endpoint chains, elements per chain p50 {} p90 {} max {}",
            table.family,
            fused.len(),
            chains.len(),
            pct(0.5),
            pct(0.9),
            pct(1.0)
        );
        // Each address's signature: the (set, protocol, port) entries it
        // is in, as an order-free hash.
        let mut signature: HashMap<IpAddr, u64> = HashMap::new();
        let mut other = 0usize;
        for set in table
            .sets
            .values()
            .filter(|s| fused.contains_key(s.name.as_str()))
        {
            for e in set.elements.iter() {
                match split(e) {
                    Some((addr, rest)) => {
                        *signature.entry(addr).or_default() ^= hash_of((&set.name, rest));
                    }
                    None => other += 1,
                }
            }
        }
        let classes: HashSet<u64> = signature.values().copied().collect();
        let two_stage: usize = chains
            .iter()
            .map(|(_, sets)| {
                let mut triples: HashSet<(u64, Option<(u8, u16)>)> = HashSet::new();
                for s in sets {
                    for e in table.sets[*s].elements.iter() {
                        if let Some((addr, rest)) = split(e) {
                            triples.insert((signature[&addr], rest));
                        }
                    }
                }
                triples.len()
            })
            .sum();
        println!(
            "  two-stage: {} addresses in {} classes; the chains' (class, protocol, port) triples {two_stage} (not shared between chains); {other} elements neither an address nor address . protocol . port",
            signature.len(),
            classes.len()
        );
        for budget in [1_000, 4_000, 16_000, 65_536, 262_144] {
            let kept: BTreeSet<&str> = chains
                .iter()
                .zip(&per_chain)
                .filter(|(_, n)| **n <= budget)
                .flat_map(|((_, sets), _)| sets.iter().copied())
                .collect();
            let fused_chains = per_chain.iter().filter(|n| **n <= budget).count();
            let elements: usize = kept.iter().map(|s| fused[s]).sum();
            println!(
                "  budget {budget:>7} per chain: {fused_chains:>4} of {} chains fused, {elements:>9} elements",
                chains.len()
            );
        }
    }
    // Classes kept by selector-set membership instead of by what the fused
    // sets hold: the peers' selector sets of every rule in a policy chain
    // (more than fuse: an upper bound), and per address the ones it is
    // in. What an incremental compiler could keep per address.
    for v6 in [false, true] {
        let mut peers: BTreeSet<&str> = BTreeSet::new();
        for c in logical.chains.values() {
            let ingress = c.name.starts_with("cali-pi-");
            if !ingress && !c.name.starts_with("cali-po-") {
                continue;
            }
            for r in &c.rules {
                if let Some(pm) = &r.policy_match {
                    let peer = if ingress { &pm.src } else { &pm.dst };
                    if let Some(id) = &peer.selector_set {
                        peers.insert(id.as_str());
                    }
                }
            }
        }
        let mut groups: HashMap<IpAddr, Vec<&str>> = HashMap::new();
        for id in &peers {
            let Some(set) = logical.ip_sets.get(*id) else {
                continue;
            };
            let nets = if v6 { &set.nets_v6 } else { &set.nets_v4 };
            for n in nets.iter().filter(|n| n.prefix_len() == n.max_prefix_len()) {
                groups.entry(n.addr()).or_default().push(id);
            }
        }
        let classes: HashSet<&Vec<&str>> = groups.values().collect();
        println!(
            "classes by peer selector sets ({}): {} sets, {} addresses in {} classes",
            if v6 { "IPv6" } else { "IPv4" },
            peers.len(),
            groups.len(),
            classes.len()
        );
    }
    let mut rewritten = ruleset.clone();
    let bits = bench::two_stage::class_bits(opts.mark_mask)?;
    let census = bench::two_stage::rewrite(&mut rewritten, bits)?;
    for (t, c) in rewritten.tables.iter().zip(census) {
        println!(
            "two stages (bench::two_stage), table {:?}: {} addresses in the class map, {} classes (room for {}), fused set elements {} (were {})",
            t.family,
            c.addresses,
            c.classes,
            (1u64 << bits.count_ones()) - 1,
            c.class_elements,
            c.address_elements
        );
    }
    Ok(())
}
