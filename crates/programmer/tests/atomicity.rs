//! A transaction that fails part-way changes nothing, in the kernel or in
//! the programmer, and the error names the object.

mod common;

use common::*;
use compiler::nft::*;
use programmer::Error;

#[test]
fn jump_to_missing_chain_rolls_back_everything() {
    let (_ns, mut p, good) = setup_sample("atom-jump");
    let before = snapshot(&mut p);

    // Many valid changes, then one rule jumping to a chain that does not
    // exist, then more valid changes.
    let mut bad = good.clone();
    let t = table_mut(&mut bad, TableFamily::Ip);
    t.chains.insert(
        "cali-extra".into(),
        chain(
            "cali-extra",
            vec![rule(vec![], vec![], Some(Verdict::Accept), "")],
        ),
    );
    t.sets
        .get_mut("addrs")
        .unwrap()
        .elements
        .push(SetElement::Net(net("198.19.200.0/24")));
    let pol = t.chains.get_mut("cali-pol").unwrap();
    pol.rules.insert(
        3,
        rule(
            vec![],
            vec![],
            Some(Verdict::Jump("cali-nowhere".into())),
            "broken jump",
        ),
    );
    pol.rules
        .push(rule(vec![], vec![Stmt::Counter], None, "after"));

    let err = p.apply(&bad).unwrap_err();
    let (kind, errno, object) = rejected(&err);
    assert_eq!(kind, "NEWRULE");
    assert_eq!(errno, libc::ENOENT);
    assert!(
        object.contains("cali-pol") && object.contains("broken jump"),
        "{object}"
    );
    assert!(object.contains("rule #3"), "{object}");
    let msg = err.to_string();
    assert!(msg.contains("broken jump"), "{msg}");

    // The kernel still holds the previous ruleset, exactly.
    assert_eq!(snapshot(&mut p), before);
    // The programmer's committed state is unchanged too: re-applying the
    // good ruleset has nothing to do, and there is no drift.
    assert!(!p.has_drift().unwrap());
    assert!(p.plan(&good).unwrap().is_empty());
    assert_eq!(p.apply(&good).unwrap().messages, 0);
}

#[test]
fn overlapping_elements_roll_back_and_name_the_set() {
    let (_ns, mut p, good) = setup_sample("atom-overlap");
    let before = snapshot(&mut p);

    // The compiler is meant to coalesce; if it ever does not, the kernel
    // rejects the overlap (EEXIST) and nothing changes.
    let mut bad = good.clone();
    let t = table_mut(&mut bad, TableFamily::Ip);
    t.chains
        .get_mut("to-wl2")
        .unwrap()
        .rules
        .push(rule(vec![], vec![Stmt::Counter], None, "ok"));
    let s = t.sets.get_mut("upper").unwrap();
    s.elements.push(SetElement::Net(net("198.19.7.0/24")));
    s.elements.sort();

    let (kind, errno, object) = rejected(&p.apply(&bad).unwrap_err());
    assert_eq!(kind, "NEWSETELEM");
    assert_eq!(errno, libc::EEXIST);
    assert!(object.contains("set ip nftpolicy upper"), "{object}");
    // The extended ACK points at the offending element.
    assert!(object.contains("198.19.7.0"), "{object}");
    assert_eq!(snapshot(&mut p), before);
    assert!(!p.has_drift().unwrap());
    assert!(p.plan(&good).unwrap().is_empty());
}

#[test]
fn invalid_ir_is_refused_before_anything_is_sent() {
    let (_ns, mut p, good) = setup_sample("atom-ir");
    let mut bad = good.clone();
    bad.tables[0]
        .chains
        .get_mut("cali-pol")
        .unwrap()
        .rules
        .push(rule(
            vec![ifname(IfDir::In, "a-name-much-too-long", false, false)],
            vec![],
            None,
            "",
        ));
    let err = p.apply(&bad).unwrap_err();
    assert!(matches!(err, Error::Plan(_)), "{err:?}");
    assert!(err.to_string().contains("invalid desired ruleset"));

    let mut foreign = good.clone();
    foreign.tables[0].name = "kube-proxy".into();
    assert!(matches!(p.apply(&foreign).unwrap_err(), Error::Plan(_)));
    assert!(!p.has_drift().unwrap());
}
