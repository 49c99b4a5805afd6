//! Apply a ruleset using every IR construct, read it back, and compare with
//! what nft shows — for our programming and for nft's own loading of the
//! same ruleset written in nft syntax.

mod common;

use common::*;
use compiler::nft::{TableFamily, TABLE_NAME};
use testkit::netns::Netns;

fn read_back(p: &mut programmer::NftProgrammer, family: TableFamily) -> compiler::nft::Table {
    p.read_back(family, TABLE_NAME)
        .unwrap()
        .expect("table exists")
}

fn assert_tables_eq(got: &compiler::nft::Table, want: &compiler::nft::Table) {
    assert_eq!(got.sets, want.sets, "sets of {:?}", want.family);
    assert_eq!(got.maps, want.maps, "maps of {:?}", want.family);
    for (name, c) in &want.chains {
        let g = got
            .chains
            .get(name)
            .unwrap_or_else(|| panic!("chain {name} missing"));
        assert_eq!(g.base, c.base, "chain {name}");
        for (i, (a, b)) in g.rules.iter().zip(&c.rules).enumerate() {
            assert_eq!(a, b, "chain {name} rule #{i}");
        }
        assert_eq!(g.rules.len(), c.rules.len(), "chain {name} rule count");
    }
    assert_eq!(got, want);
}

#[test]
fn apply_then_read_back_equals_desired() {
    let (ns, mut p) = setup("rt");
    let rs = sample_ruleset();
    let report = p.apply(&rs).unwrap();
    assert_eq!(report.kinds.get("NEWTABLE"), Some(&2));
    assert_eq!(report.kinds.get("NEWCHAIN"), Some(&14));
    // Per family: 9 sets and 3 maps.
    assert_eq!(report.kinds.get("NEWSET"), Some(&24));
    for t in &rs.tables {
        assert_tables_eq(&read_back(&mut p, t.family), t);
    }
    assert!(!p.has_drift().unwrap());
    // Nothing changed: nothing to send.
    let again = p.apply(&rs).unwrap();
    assert_eq!(again.messages, 0);
    drop(ns);
}

/// `nft list ruleset` output with each table's `set` blocks in name order:
/// nft lists sets in creation order, and the programmer creates a new
/// table's sets most used first, nft those of a script in its order.
fn sets_in_name_order(listing: &str) -> String {
    let mut out = Vec::new();
    let mut sets: Vec<Vec<&str>> = Vec::new();
    let mut lines = listing.lines().peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("\tset ") {
            let mut block = vec![line];
            for l in lines.by_ref() {
                block.push(l);
                if l == "\t}" {
                    break;
                }
            }
            if lines.peek() == Some(&"") {
                lines.next();
            }
            sets.push(block);
            continue;
        }
        sets.sort();
        for b in sets.drain(..) {
            out.extend(b);
            out.push("");
        }
        out.push(line);
    }
    out.join("\n")
}

#[test]
fn nft_lists_our_ruleset_exactly_as_its_own() {
    if !nft_for("the oracle") {
        return;
    }
    let (ns, _p, rs) = setup_sample("rt-nft");
    let ours = ns.nft(&["list", "ruleset"]).unwrap();

    let reference = Netns::create("rt-ref").unwrap();
    reference
        .nft_script(&[], &compiler::render_nft::render(&rs))
        .unwrap();
    let theirs = reference.nft(&["list", "ruleset"]).unwrap();
    assert_eq!(
        sets_in_name_order(&ours),
        sets_in_name_order(&theirs),
        "nft lists our ruleset differently from its own"
    );

    // Spot checks in nft's JSON: comments and the rule count per chain.
    let json: serde_json::Value =
        serde_json::from_str(&ns.nft(&["-j", "list", "ruleset"]).unwrap()).unwrap();
    let items = json["nftables"].as_array().unwrap();
    let rules: Vec<&serde_json::Value> = items.iter().filter_map(|i| i.get("rule")).collect();
    let want_rules: usize = rs
        .tables
        .iter()
        .flat_map(|t| t.chains.values())
        .map(|c| c.rules.len())
        .sum();
    assert_eq!(rules.len(), want_rules);
    for t in &rs.tables {
        for c in t.chains.values() {
            let in_chain: Vec<_> = rules
                .iter()
                .filter(|r| r["family"] == t.family.keyword() && r["chain"] == c.name.as_str())
                .collect();
            assert_eq!(in_chain.len(), c.rules.len(), "chain {}", c.name);
            for (r, want) in in_chain.iter().zip(&c.rules) {
                assert_eq!(
                    r["comment"].as_str(),
                    want.comment.as_deref(),
                    "chain {}",
                    c.name
                );
            }
        }
    }
    let text = ns.nft(&["list", "table", "ip", TABLE_NAME]).unwrap();
    for needle in [
        "type ipv4_addr . inet_proto . inet_service",
        "elements = { \"cali1234\" : goto to-wl",
        "iifname vmap @ingress comment \"dispatch\"",
        "ct state established,related accept comment \"conntrack\"",
        "elements = { 0.0.0.0/0 }",
        "ip saddr . meta l4proto . th sport != @named drop",
    ] {
        assert!(text.contains(needle), "nft list lacks {needle:?}:\n{text}");
    }
}

#[test]
fn read_back_of_a_missing_table_is_none() {
    let (_ns, mut p) = setup("rt-none");
    assert_eq!(p.read_back(TableFamily::Ip, TABLE_NAME).unwrap(), None);
    assert_eq!(p.read_back(TableFamily::Ip6, "nope").unwrap(), None);
}

#[test]
fn ruleset_written_by_nft_reads_back_as_the_ir() {
    // The decoder against nft's encoding (not just ours).
    if !nft_for("the oracle") {
        return;
    }
    let (ns, mut p) = setup("rt-fromnft");
    let rs = sample_ruleset();
    ns.nft_script(&[], &compiler::render_nft::render(&rs))
        .unwrap();
    for t in &rs.tables {
        assert_tables_eq(&read_back(&mut p, t.family), t);
    }
    // Adopting it means the same ruleset needs no change.
    p.adopt().unwrap();
    assert!(p.plan(&rs).unwrap().is_empty());
}
