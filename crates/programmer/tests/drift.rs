//! Drift detection and adoption of what is in the kernel.

mod common;

use common::*;
use compiler::nft::*;
use programmer::{NftProgrammer, FOREIGN_RULE_PREFIX};

#[test]
fn foreign_changes_are_drift_and_the_next_apply_repairs_them() {
    if !nft_for("used to tamper") {
        return;
    }
    let (ns, mut p, rs) = setup_sample("drift");
    assert!(!p.has_drift().unwrap());

    // Someone adds rules to our table: one we can express, one we cannot.
    ns.nft(&[
        "add", "rule", "ip", TABLE_NAME, "to-wl2", "tcp", "dport", "22", "accept",
    ])
    .unwrap();
    ns.nft(&[
        "add", "rule", "ip", TABLE_NAME, "to-wl2", "ip", "ttl", "5", "accept", "comment", "\"ttl\"",
    ])
    .unwrap();
    assert!(p.has_drift().unwrap());
    let t = p.read_back(TableFamily::Ip, TABLE_NAME).unwrap().unwrap();
    let rules = &t.chains["to-wl2"].rules;
    assert_eq!(
        rules[0],
        rule(
            vec![l4(6), dport(22, 22, false)],
            vec![],
            Some(Verdict::Accept),
            ""
        )
    );
    let foreign = rules[1].comment.as_deref().unwrap();
    assert!(foreign.starts_with(FOREIGN_RULE_PREFIX), "{foreign}");
    assert!(foreign.contains("\"ttl\""), "{foreign}");

    // Adopt the kernel's state: the next apply rewrites just that chain.
    p.adopt().unwrap();
    assert!(!p.has_drift().unwrap());
    let tx = p.plan(&rs).unwrap();
    assert_eq!(
        tx.steps(),
        vec![("DELRULE", "chain ip nftpolicy to-wl2".to_owned())]
    );
    p.apply(&rs).unwrap();
    assert_eq!(
        p.read_back(TableFamily::Ip, TABLE_NAME).unwrap().as_ref(),
        Some(&rs.tables[0])
    );

    // Someone deletes an element.
    delete_an_element(&ns);
    assert!(p.has_drift().unwrap());
    p.adopt().unwrap();
    let r = p.apply(&rs).unwrap();
    assert_eq!(
        r.kinds.into_iter().collect::<Vec<_>>(),
        vec![("NEWSETELEM", 1)]
    );
    assert!(!p.has_drift().unwrap());
}

#[test]
fn a_new_programmer_adopts_the_existing_tables() {
    let (_ns, p, rs) = setup_sample("drift-adopt");
    drop(p);
    // An agent restart: the first apply reads what is there and sends
    // nothing (no duplicate rules).
    let mut p2 = NftProgrammer::new().unwrap();
    assert_eq!(p2.apply(&rs).unwrap().messages, 0);
    assert_eq!(
        p2.read_back(TableFamily::Ip, TABLE_NAME).unwrap().as_ref(),
        Some(&rs.tables[0])
    );
}
