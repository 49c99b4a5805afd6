//! A patch that changes a run of rules in a chain edits the chain in place
//! (`apply_patch`): the rules before and after the run stay in the kernel,
//! with their counters, and only the run is deleted and the new rules put
//! there. A chain that someone else changed is flushed and refilled
//! instead, which repairs it.

mod common;

use std::net::UdpSocket;

use common::*;
use compiler::nft::*;
use programmer::{ApplyReport, NftProgrammer};

/// Counts UDP to 198.18.0.1:`port` (loopback, in the test's namespace).
fn counted(port: u16, comment: &str) -> Rule {
    rule(
        vec![
            l4(17),
            addr(Dir::Dst, "198.18.0.1/32", false),
            dport(port, port, false),
        ],
        vec![Stmt::Counter],
        None,
        comment,
    )
}

fn out_chain(rules: &[&Rule]) -> Chain {
    base_chain(
        "out",
        Hook::Output,
        0,
        ChainPolicy::Accept,
        rules.iter().map(|r| (*r).clone()).collect(),
    )
}

fn patch(rules: &[&Rule]) -> RulesetPatch {
    let mut t = TablePatch::new(TableFamily::Ip, TABLE_NAME);
    t.chains.insert("out".into(), Some(out_chain(rules)));
    RulesetPatch {
        tables: vec![t],
        elements: ElementDelta::default(),
    }
}

/// (comment, packets) of the chain's rules, in the kernel's order.
fn counters(p: &mut NftProgrammer) -> Vec<(String, u64)> {
    p.read_counters(TableFamily::Ip, TABLE_NAME, "out")
        .unwrap()
        .into_iter()
        .map(|c| (c.comment.unwrap_or_default(), c.packets))
        .collect()
}

fn send(sock: &UdpSocket, port: u16, times: usize) {
    for _ in 0..times {
        sock.send_to(b"x", ("198.18.0.1", port)).unwrap();
    }
}

fn kind(report: &ApplyReport, kind: &str) -> usize {
    report.kinds.get(kind).copied().unwrap_or(0)
}

/// The kernel holds exactly `rules` in `out` (read back, every field).
fn assert_holds(p: &mut NftProgrammer, rules: &[&Rule]) {
    let mut want = Table::new(TableFamily::Ip, TABLE_NAME);
    want.chains.insert("out".into(), out_chain(rules));
    let got = p.read_back(TableFamily::Ip, TABLE_NAME).unwrap().unwrap();
    assert_eq!(got, programmer::canonical(&want));
}

fn named(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(c, n)| (c.to_string(), *n)).collect()
}

#[test]
fn a_changed_run_of_rules_is_edited_in_place_and_the_rest_keep_their_counters() {
    let (ns, mut p) = setup("rule-edits");
    ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
    ns.exec(&["ip", "addr", "add", "198.18.0.1/32", "dev", "lo"])
        .unwrap();
    let (a, b, c) = (counted(9001, "a"), counted(9002, "b"), counted(9003, "c"));
    let (x, d) = (counted(9009, "x"), counted(9004, "d"));
    let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
    t.chains.insert("out".into(), out_chain(&[&a, &b, &c]));
    p.apply(&Ruleset { tables: vec![t] }).unwrap();
    let sock = UdpSocket::bind("198.18.0.1:0").unwrap();
    send(&sock, 9001, 1);
    send(&sock, 9002, 2);
    send(&sock, 9003, 3);

    // A rule inserted in the middle (a policy added): one NEWRULE, no
    // flush, and the others still count what they counted.
    let r = p.apply_patch(&patch(&[&a, &x, &b, &c])).unwrap();
    assert_eq!((kind(&r, "NEWRULE"), kind(&r, "DELRULE")), (1, 0), "{r:?}");
    assert_holds(&mut p, &[&a, &x, &b, &c]);
    send(&sock, 9009, 4);
    assert_eq!(
        counters(&mut p),
        named(&[("a", 1), ("x", 4), ("b", 2), ("c", 3)])
    );

    // Removed again (the policy deleted): one DELRULE by handle, nothing
    // re-added.
    let r = p.apply_patch(&patch(&[&a, &b, &c])).unwrap();
    assert_eq!((kind(&r, "NEWRULE"), kind(&r, "DELRULE")), (0, 1), "{r:?}");
    assert_holds(&mut p, &[&a, &b, &c]);
    assert_eq!(counters(&mut p), named(&[("a", 1), ("b", 2), ("c", 3)]));

    // The last rule replaced: nothing kept after the run, so the new rule
    // goes at the end.
    let r = p.apply_patch(&patch(&[&a, &b, &d])).unwrap();
    assert_eq!((kind(&r, "NEWRULE"), kind(&r, "DELRULE")), (1, 1), "{r:?}");
    assert_holds(&mut p, &[&a, &b, &d]);
    assert_eq!(counters(&mut p), named(&[("a", 1), ("b", 2), ("d", 0)]));

    // The first rule replaced: the new one goes before the kept ones.
    let r = p.apply_patch(&patch(&[&x, &b, &d])).unwrap();
    assert_eq!((kind(&r, "NEWRULE"), kind(&r, "DELRULE")), (1, 1), "{r:?}");
    assert_holds(&mut p, &[&x, &b, &d]);
    assert_eq!(counters(&mut p), named(&[("x", 0), ("b", 2), ("d", 0)]));

    // Nothing in common: flushed and refilled, as before.
    let r = p.apply_patch(&patch(&[&a, &c])).unwrap();
    assert_eq!((kind(&r, "NEWRULE"), kind(&r, "DELRULE")), (2, 1), "{r:?}");
    assert_holds(&mut p, &[&a, &c]);
    assert_eq!(counters(&mut p), named(&[("a", 0), ("c", 0)]));
}

#[test]
fn a_chain_someone_else_changed_is_refilled_rather_than_edited() {
    if !nft_for("used to tamper") {
        return;
    }
    let (ns, mut p) = setup("rule-edits-foreign");
    let (a, b, x) = (counted(9001, "a"), counted(9002, "b"), counted(9009, "x"));
    let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
    t.chains.insert("out".into(), out_chain(&[&a, &b]));
    p.apply(&Ruleset { tables: vec![t] }).unwrap();

    // Someone inserts a rule at the top of our chain: the committed
    // handles no longer describe the chain, so it is not edited.
    ns.nft(&[
        "insert", "rule", "ip", TABLE_NAME, "out", "tcp", "dport", "22", "accept",
    ])
    .unwrap();
    let r = p.apply_patch(&patch(&[&a, &x, &b])).unwrap();
    assert_eq!((kind(&r, "NEWRULE"), kind(&r, "DELRULE")), (3, 1), "{r:?}");
    assert_holds(&mut p, &[&a, &x, &b]);
}
