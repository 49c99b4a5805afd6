//! Several tables of ours per family (namespace groups, `nftpolicy-g<N>`):
//! applied in one transaction, patched and element-changed by table name,
//! adopted and checked for drift together, and a table of ours that the
//! desired ruleset lacks (another group count's) deleted.

mod common;

use common::*;
use compiler::nft::*;
use programmer::NftProgrammer;

/// The sample ruleset once per group: the same chain and set names in
/// every table.
fn grouped(groups: usize) -> Ruleset {
    let mut out = Ruleset::default();
    for g in 0..groups {
        for mut t in sample_ruleset().tables {
            t.name = compiler::groups::table_name(g);
            out.tables.push(t);
        }
    }
    out
}

/// The kernel holds exactly `rs`'s tables of ours, and nothing drifted.
#[track_caller]
fn holds(p: &mut NftProgrammer, rs: &Ruleset) {
    let want = canonical(rs);
    for family in [TableFamily::Ip, TableFamily::Ip6] {
        let mut names: Vec<String> = want
            .tables
            .iter()
            .filter(|t| t.family == family)
            .map(|t| t.name.clone())
            .collect();
        names.sort();
        assert_eq!(p.our_table_names(family).unwrap(), names, "{family:?}");
        for name in names {
            let got = p.read_back(family, &name).unwrap();
            let t = want
                .tables
                .iter()
                .find(|t| t.family == family && t.name == name);
            assert_eq!(got.as_ref(), t, "{family:?} {name}");
        }
    }
    assert!(!p.has_drift().unwrap());
}

#[test]
fn group_tables_are_applied_patched_and_replaced_together() {
    let (_ns, mut p) = setup("groups");
    let mut rs = grouped(3);
    p.apply(&rs).unwrap();
    holds(&mut p, &rs);

    // An element change to group 1's set only.
    let g1 = compiler::groups::table_name(1);
    let set = rs.tables[0]
        .sets
        .values()
        .find(|s| s.key == SetKey::Addr)
        .unwrap();
    let set_name = set.name.clone();
    let fresh = SetElement::Net("198.19.200.7/32".parse().unwrap());
    assert!(!set.elements.contains(&fresh));
    let delta = ElementDelta {
        sets: vec![SetDelta {
            family: TableFamily::Ip,
            table: g1.clone(),
            set: set_name.clone(),
            remove: vec![],
            add: vec![fresh.clone()],
        }],
    };
    p.apply_elements(&delta).unwrap();
    delta.apply_to(&mut rs);
    holds(&mut p, &rs);
    let in_table = |rs: &Ruleset, name: &str| {
        rs.tables
            .iter()
            .find(|t| t.family == TableFamily::Ip && t.name == name)
            .unwrap()
            .sets[&set_name]
            .elements
            .contains(&fresh)
    };
    assert!(in_table(&rs, &g1) && !in_table(&rs, &compiler::groups::table_name(0)));

    // A patch of group 2's table: one chain gains a rule.
    let g2 = compiler::groups::table_name(2);
    let t2 = rs
        .tables
        .iter()
        .find(|t| t.family == TableFamily::Ip && t.name == g2)
        .unwrap();
    let mut c = t2
        .chains
        .values()
        .find(|c| c.base.is_none())
        .unwrap()
        .clone();
    c.rules
        .push(rule(vec![], vec![], Some(Verdict::Drop), "added"));
    let mut tp = TablePatch::new(TableFamily::Ip, &g2);
    tp.chains.insert(c.name.clone(), Some(c));
    let patch = RulesetPatch {
        tables: vec![tp],
        elements: ElementDelta::default(),
    };
    p.apply_patch(&patch).unwrap();
    patch.apply_to(&mut rs);
    holds(&mut p, &rs);

    // A programmer started now adopts all three groups.
    let mut again = NftProgrammer::new().unwrap();
    again.adopt().unwrap();
    assert!(again.plan(&rs).unwrap().is_empty());

    // Fewer groups: the tables of the groups that went are deleted.
    let fewer = grouped(2);
    p.apply(&fewer).unwrap();
    holds(&mut p, &fewer);
    // Back to one ungrouped table: every group's table goes.
    let single = sample_ruleset();
    p.apply(&single).unwrap();
    holds(&mut p, &single);
    // And rebuild from there to groups replaces everything in one go.
    p.rebuild(&fewer).unwrap();
    holds(&mut p, &fewer);
}

/// The groups' committed copies of a set share one element list, as the
/// cut makes them: a change every group gets keeps them one list, changed
/// without touching the caller's (copy on write), and a change to one
/// group's copy parts it from the others; the kernel follows either way.
#[test]
fn committed_copies_of_a_set_share_one_element_list() {
    let (_ns, mut p) = setup("groups-share");
    let mut rs = grouped(3);
    let set_name = rs.tables[0]
        .sets
        .values()
        .find(|s| s.key == SetKey::Addr)
        .unwrap()
        .name
        .clone();
    let ip_tables: Vec<usize> = (0..rs.tables.len())
        .filter(|&i| rs.tables[i].family == TableFamily::Ip)
        .collect();
    let list = rs.tables[ip_tables[0]].sets[&set_name].elements.clone();
    for &i in &ip_tables {
        rs.tables[i].sets.get_mut(&set_name).unwrap().elements = list.clone();
    }
    p.apply(&rs).unwrap();
    holds(&mut p, &rs);
    assert_eq!(p.distinct_element_lists(TableFamily::Ip, &set_name), 1);

    // One element more in every group: still one list, and the caller's
    // (the list `rs` holds) is not changed under it.
    let fresh = SetElement::Net("198.19.200.9/32".parse().unwrap());
    let delta = |groups: &[usize], e: &SetElement| ElementDelta {
        sets: groups
            .iter()
            .map(|&g| SetDelta {
                family: TableFamily::Ip,
                table: compiler::groups::table_name(g),
                set: set_name.clone(),
                remove: vec![],
                add: vec![e.clone()],
            })
            .collect(),
    };
    let all = delta(&[0, 1, 2], &fresh);
    p.apply_elements(&all).unwrap();
    assert!(!list.contains(&fresh), "the caller's list changed");
    all.apply_to(&mut rs);
    holds(&mut p, &rs);
    assert_eq!(p.distinct_element_lists(TableFamily::Ip, &set_name), 1);

    // One more in group 1 only: its copy parts from the other two.
    let another = SetElement::Net("198.19.200.10/32".parse().unwrap());
    let one = delta(&[1], &another);
    p.apply_elements(&one).unwrap();
    one.apply_to(&mut rs);
    holds(&mut p, &rs);
    assert_eq!(p.distinct_element_lists(TableFamily::Ip, &set_name), 2);
    assert!(p.plan(&rs).unwrap().is_empty());
}

#[test]
fn remove_all_deletes_every_group_table_and_nothing_else() {
    let (ns, mut p) = setup("groups-rm");
    p.apply(&grouped(2)).unwrap();
    let lookalike = nft_for("a table that only looks like a group's");
    if lookalike {
        ns.nft(&["add", "table", "ip", "nftpolicy-gx"]).unwrap();
    }
    p.remove_all().unwrap();
    for family in [TableFamily::Ip, TableFamily::Ip6] {
        assert_eq!(p.our_table_names(family).unwrap(), Vec::<String>::new());
    }
    if lookalike {
        ns.nft(&["list", "table", "ip", "nftpolicy-gx"])
            .expect("a table that is not ours stays");
    }
}

#[test]
fn a_table_name_that_is_not_ours_is_refused() {
    let (_ns, p) = setup("groups-name");
    let mut rs = sample_ruleset();
    rs.tables[0].name = "nftpolicy-gx".into();
    let err = p.plan(&rs).unwrap_err().to_string();
    assert!(err.contains("invalid desired ruleset"), "{err}");
    let mut rs = grouped(1);
    rs.tables.push(rs.tables[0].clone());
    let err = format!("{:?}", p.plan(&rs).unwrap_err());
    assert!(err.contains("DuplicateTable"), "{err}");
}
