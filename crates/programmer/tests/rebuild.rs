//! `NftProgrammer::rebuild`: replacing our tables whole, atomically, when
//! diffs against a tampered kernel keep failing.

mod common;

use common::*;
use compiler::nft::*;

fn table(rs: &Ruleset, family: TableFamily) -> Option<Table> {
    rs.tables.iter().find(|t| t.family == family).cloned()
}

#[test]
fn rebuild_repairs_tampering_that_makes_every_diff_fail() {
    if !nft_for("used to tamper") {
        return;
    }
    let (ns, mut p, rs) = setup_sample("rebuild-tamper");

    // Someone deletes an element behind our back...
    delete_an_element(&ns);
    // ...and the next desired state deletes it too: the diff carries a
    // DELSETELEM of an element that is gone, which the kernel rejects.
    let mut desired = rs.clone();
    let t = desired
        .tables
        .iter_mut()
        .find(|t| t.family == TableFamily::Ip)
        .unwrap();
    t.sets
        .get_mut("addrs")
        .unwrap()
        .elements
        .retain(|e| *e != SetElement::Net(net("198.19.1.0/24")));
    t.chains.insert(
        "cali-new".into(),
        chain(
            "cali-new",
            vec![rule(vec![], vec![], Some(Verdict::Drop), "new")],
        ),
    );
    let (kind, errno, _) = rejected(&p.apply(&desired).unwrap_err());
    assert_eq!(kind, "DELSETELEM");
    assert_eq!(errno, libc::ENOENT);

    let report = p.rebuild(&desired).unwrap();
    assert_eq!(report.kinds.get("DESTROYTABLE"), Some(&2));
    assert_eq!(
        snapshot(&mut p),
        (
            table(&desired, TableFamily::Ip),
            table(&desired, TableFamily::Ip6)
        )
    );
    // The committed state is the desired one: nothing more to send, no drift.
    assert!(!p.has_drift().unwrap());
    assert_eq!(p.apply(&desired).unwrap().messages, 0);
}

#[test]
fn rebuild_creates_our_tables_when_none_exist() {
    let (_ns, mut p) = setup("rebuild-empty");
    let rs = sample_ruleset();
    p.rebuild(&rs).unwrap();
    assert_eq!(
        snapshot(&mut p),
        (table(&rs, TableFamily::Ip), table(&rs, TableFamily::Ip6))
    );
    // A rebuild to nothing removes our tables.
    p.rebuild(&Ruleset { tables: vec![] }).unwrap();
    assert_eq!(snapshot(&mut p), (None, None));
}

#[test]
fn a_rejected_rebuild_leaves_the_old_tables_in_force() {
    let (_ns, mut p, good) = setup_sample("rebuild-atomic");
    let before = snapshot(&mut p);

    let mut bad = good.clone();
    let t = table_mut(&mut bad, TableFamily::Ip6);
    t.chains.insert(
        "cali-broken".into(),
        chain(
            "cali-broken",
            vec![rule(
                vec![],
                vec![],
                Some(Verdict::Jump("cali-nowhere".into())),
                "broken jump",
            )],
        ),
    );
    let (kind, errno, object) = rejected(&p.rebuild(&bad).unwrap_err());
    assert_eq!(kind, "NEWRULE");
    assert_eq!(errno, libc::ENOENT);
    assert!(object.contains("broken jump"), "{object}");
    // Both tables are still there, exactly as before (the destroys at the
    // start of the batch were rolled back with the rest).
    assert_eq!(snapshot(&mut p), before);
    // And the programmer still believes what the kernel holds.
    assert!(!p.has_drift().unwrap());
    assert_eq!(p.apply(&good).unwrap().messages, 0);
}
