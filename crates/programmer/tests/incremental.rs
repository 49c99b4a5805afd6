//! After the first apply, each apply sends only the difference.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use common::*;
use compiler::nft::*;
use programmer::{ApplyReport, NftProgrammer};

/// Applies `rs` and checks the kernel now holds exactly it.
fn apply_checked(p: &mut NftProgrammer, rs: &Ruleset) -> ApplyReport {
    let report = p.apply(rs).unwrap();
    for family in [TableFamily::Ip, TableFamily::Ip6] {
        let want = rs.tables.iter().find(|t| t.family == family);
        let got = p.read_back(family, TABLE_NAME).unwrap();
        assert_eq!(got.as_ref(), want, "{family:?} table after apply");
    }
    assert!(!p.has_drift().unwrap());
    report
}

fn ip(rs: &mut Ruleset) -> &mut Table {
    table_mut(rs, TableFamily::Ip)
}

fn kinds(pairs: &[(&'static str, usize)]) -> BTreeMap<&'static str, usize> {
    pairs.iter().copied().collect()
}

fn hosts(n: u32) -> Vec<SetElement> {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    (0..n)
        .map(|i| {
            SetElement::Net(ipnet::IpNet::V4(
                ipnet::Ipv4Net::new(Ipv4Addr::from(base + 2 * i), 32).unwrap(),
            ))
        })
        .collect()
}

fn one_set_table(elements: Vec<SetElement>) -> Ruleset {
    let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
    t.sets.insert(
        "big".into(),
        Set {
            name: "big".into(),
            key: SetKey::Addr,
            elements: elements.into(),
            comment: None,
        },
    );
    t.chains.insert(
        "c".into(),
        chain(
            "c",
            vec![rule(
                vec![addr_set(Dir::Src, "big", false)],
                vec![],
                Some(Verdict::Accept),
                "",
            )],
        ),
    );
    Ruleset { tables: vec![t] }
}

#[test]
fn adding_one_element_sends_one_newsetelem() {
    let (_ns, mut p) = setup("inc-elem");
    let mut elems = hosts(1000);
    apply_checked(&mut p, &one_set_table(elems.clone()));

    elems.push(SetElement::Net(net("198.19.0.1/32")));
    elems.sort();
    let rs = one_set_table(elems.clone());
    assert_eq!(p.plan(&rs).unwrap().kinds(), kinds(&[("NEWSETELEM", 1)]));
    let r = apply_checked(&mut p, &rs);
    assert_eq!(r.kinds, kinds(&[("NEWSETELEM", 1)]));

    // Removing one: one DELSETELEM.
    elems.retain(|e| *e != SetElement::Net(net("198.18.0.2/32")));
    let r = apply_checked(&mut p, &one_set_table(elems.clone()));
    assert_eq!(r.kinds, kinds(&[("DELSETELEM", 1)]));

    // Replacing hosts by a covering CIDR (overlapping the old elements)
    // deletes first, then adds, in one transaction.
    let covered = [net("198.18.0.4/32"), net("198.18.0.6/32")];
    elems.retain(|e| !matches!(e, SetElement::Net(n) if covered.contains(n)));
    elems.push(SetElement::Net(net("198.18.0.4/30")));
    elems.sort();
    let rs = one_set_table(elems.clone());
    let steps = p.plan(&rs).unwrap().steps();
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec!["DELSETELEM", "NEWSETELEM"]
    );
    apply_checked(&mut p, &rs);
}

#[test]
fn first_apply_is_one_batch_and_unchanged_apply_sends_nothing() {
    let (_ns, mut p) = setup("inc-first");
    let rs = sample_ruleset();
    let r = apply_checked(&mut p, &rs);
    assert!(r.messages > 100);
    assert_eq!(p.apply(&rs).unwrap().messages, 0);
}

fn many_chains(n: usize, rules_per_chain: usize) -> Table {
    let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
    for i in 0..n {
        let name = format!("cali-pi-{i}");
        let rules = (0..rules_per_chain)
            .map(|j| {
                rule(
                    vec![l4(6), dport(1000 + j as u16, 1000 + j as u16, false)],
                    vec![Stmt::Counter],
                    Some(Verdict::Accept),
                    &format!("policy {i} rule {j}"),
                )
            })
            .collect();
        t.chains.insert(name.clone(), chain(&name, rules));
    }
    t
}

#[test]
fn changing_one_chain_rewrites_only_that_chain() {
    let (_ns, mut p) = setup("inc-chain");
    let mut t = many_chains(50, 5);
    apply_checked(
        &mut p,
        &Ruleset {
            tables: vec![t.clone()],
        },
    );

    let c = t.chains.get_mut("cali-pi-7").unwrap();
    c.rules.insert(
        1,
        rule(vec![l4(17)], vec![], Some(Verdict::Drop), "new rule"),
    );
    let rs = Ruleset {
        tables: vec![t.clone()],
    };
    let tx = p.plan(&rs).unwrap();
    assert_eq!(tx.kinds(), kinds(&[("DELRULE", 1), ("NEWRULE", 6)]));
    assert!(
        tx.steps().iter().all(|(_, obj)| obj.contains("cali-pi-7")),
        "{:?}",
        tx.steps()
    );
    apply_checked(&mut p, &rs);

    // Emptying a chain: only the flush.
    t.chains.get_mut("cali-pi-8").unwrap().rules.clear();
    let r = apply_checked(&mut p, &Ruleset { tables: vec![t] });
    assert_eq!(r.kinds, kinds(&[("DELRULE", 1)]));
}

#[test]
fn structural_changes_keep_references_valid() {
    let (_ns, mut p) = setup("inc-struct");
    let mut rs = sample_ruleset();
    apply_checked(&mut p, &rs);

    // A new chain, jumped to from an existing one, and a map element
    // re-pointed at it.
    let t = ip(&mut rs);
    t.chains.insert(
        "cali-new".into(),
        chain(
            "cali-new",
            vec![rule(
                vec![],
                vec![Stmt::Counter],
                Some(Verdict::Return),
                "new",
            )],
        ),
    );
    t.chains.get_mut("to-wl2").unwrap().rules.push(rule(
        vec![],
        vec![],
        Some(Verdict::Jump("cali-new".into())),
        "",
    ));
    t.maps
        .get_mut("ingress")
        .unwrap()
        .elements
        .insert("cali5678".into(), Verdict::Goto("cali-new".into()));
    let r = apply_checked(&mut p, &rs);
    assert_eq!(
        r.kinds,
        kinds(&[
            ("NEWCHAIN", 1),
            ("NEWRULE", 2),
            ("DELSETELEM", 1),
            ("NEWSETELEM", 1)
        ])
    );

    // Remove a chain still referenced by a rule and a map element in the
    // old state; the references go in the same transaction.
    let t = ip(&mut rs);
    t.chains.remove("cali-new");
    t.chains.get_mut("to-wl2").unwrap().rules.clear();
    t.maps
        .get_mut("ingress")
        .unwrap()
        .elements
        .remove("cali5678");
    let r = apply_checked(&mut p, &rs);
    assert_eq!(
        r.kinds,
        kinds(&[("DELCHAIN", 1), ("DELRULE", 2), ("DELSETELEM", 1)])
    );

    // Base chain policy change: an in-place update.
    let t = ip(&mut rs);
    t.chains
        .get_mut("filter-INPUT")
        .unwrap()
        .base
        .as_mut()
        .unwrap()
        .policy = ChainPolicy::Drop;
    let r = apply_checked(&mut p, &rs);
    assert_eq!(r.kinds, kinds(&[("NEWCHAIN", 1)]));

    // Priority change: the kernel cannot update it; delete and re-create.
    let t = ip(&mut rs);
    t.chains
        .get_mut("filter-FORWARD")
        .unwrap()
        .base
        .as_mut()
        .unwrap()
        .priority = 10;
    let r = apply_checked(&mut p, &rs);
    assert_eq!(
        r.kinds,
        kinds(&[
            ("DELRULE", 1),
            ("DELCHAIN", 1),
            ("NEWCHAIN", 1),
            ("NEWRULE", 1)
        ])
    );

    // A set whose comment changes is re-created; chains using it are
    // flushed first and refilled after.
    let t = ip(&mut rs);
    t.sets.get_mut("ports").unwrap().comment = Some("other".into());
    let n_rules = t.chains["cali-pol"].rules.len();
    let r = apply_checked(&mut p, &rs);
    assert_eq!(
        r.kinds,
        kinds(&[
            ("DELRULE", 1),
            ("DELSET", 1),
            ("NEWSET", 1),
            ("NEWSETELEM", 1),
            ("NEWRULE", n_rules)
        ])
    );

    // A set and the rules using it removed together.
    let t = ip(&mut rs);
    t.sets.remove("named");
    t.chains.get_mut("cali-pol").unwrap().rules.retain(|r| {
        !r.matches
            .iter()
            .any(|m| matches!(m, Match::NamedPort { .. }))
    });
    apply_checked(&mut p, &rs);

    // A set and a map trading places under one name (one kernel namespace).
    let t = ip(&mut rs);
    let empty = t.sets.remove("empty").unwrap();
    t.chains.get_mut("cali-pol").unwrap().rules.retain(|r| {
        !r.matches
            .iter()
            .any(|m| matches!(m, Match::Addr { target: AddrTarget::Set(s), .. } if s == "empty"))
    });
    t.maps.insert(
        "empty".into(),
        VerdictMap {
            name: "empty".into(),
            key: MapKey::IfName,
            elements: BTreeMap::from([("cali9".to_owned(), Verdict::Accept)]),
            comment: empty.comment,
        },
    );
    apply_checked(&mut p, &rs);

    // Dropping the ip6 table altogether.
    rs.tables.retain(|t| t.family == TableFamily::Ip);
    let r = apply_checked(&mut p, &rs);
    assert_eq!(r.kinds, kinds(&[("DESTROYTABLE", 1)]));
}

#[test]
fn interval_edges_survive_deltas() {
    let (_ns, mut p) = setup("inc-edges");
    let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
    let set = |els: &[&str]| Set {
        name: "s".into(),
        key: SetKey::Addr,
        elements: els.iter().map(|e| SetElement::Net(net(e))).collect(),
        comment: None,
    };
    let ports = |els: &[(u16, u16)]| Set {
        name: "p".into(),
        key: SetKey::Port,
        elements: els
            .iter()
            .map(|&(min, max)| SetElement::Ports { min, max })
            .collect(),
        comment: None,
    };
    type Step<'a> = (Vec<&'a str>, Vec<(u16, u16)>);
    let steps: Vec<Step> = vec![
        (vec![], vec![]),
        (vec!["198.18.0.0/16"], vec![(80, 80)]),
        (vec!["0.0.0.0/8", "198.18.0.0/16"], vec![(0, 0), (80, 80)]),
        (
            vec![
                "0.0.0.0/8",
                "198.18.0.0/24",
                "198.18.1.0/24",
                "255.255.255.255/32",
            ],
            vec![(0, 79), (80, 80), (65535, 65535)],
        ),
        (vec!["0.0.0.0/0"], vec![(0, 65535)]),
        (vec!["198.18.0.0/15"], vec![(1, 65534)]),
        (vec![], vec![]),
    ];
    for (addrs, prts) in steps {
        t.sets.insert("s".into(), set(&addrs));
        t.sets.insert("p".into(), ports(&prts));
        apply_checked(
            &mut p,
            &Ruleset {
                tables: vec![t.clone()],
            },
        );
    }
}
