//! The benchmark's nft CLI backend turns one ruleset into the next with
//! `nft -f` scripts (`diff_script`); a selector set that changes type (hash
//! set of pods → interval set once a CIDR joins) must come out in the
//! kernel exactly as the new ruleset says. Needs root and `nft`.

use compiler::nft::{
    AddrTarget, Chain, Dir, Match, Rule, Ruleset, Set, SetElement, SetKey, Table, TableFamily,
    Verdict, TABLE_NAME,
};
use testkit::netns::Netns;

fn ruleset(key: SetKey, elements: &[&str]) -> Ruleset {
    let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
    t.sets.insert(
        "cali40s-x".into(),
        Set {
            name: "cali40s-x".into(),
            key,
            elements: elements
                .iter()
                .map(|e| SetElement::Net(e.parse().unwrap()))
                .collect(),
            comment: Some("selector: app == 'x'".into()),
        },
    );
    t.chains.insert(
        "cali-pi-x".into(),
        Chain {
            name: "cali-pi-x".into(),
            base: None,
            rules: vec![Rule {
                matches: vec![Match::Addr {
                    dir: Dir::Src,
                    target: AddrTarget::Set("cali40s-x".into()),
                    negate: false,
                }],
                stmts: vec![],
                verdict: Some(Verdict::Accept),
                comment: None,
            }]
            .into(),
        },
    );
    Ruleset { tables: vec![t] }
}

fn kernel_table(p: &mut programmer::NftProgrammer) -> Table {
    p.read_back(TableFamily::Ip, TABLE_NAME).unwrap().unwrap()
}

#[test]
fn a_set_changing_type_is_recreated_under_its_rules() {
    let hosts = ruleset(SetKey::Host, &["198.18.0.1/32", "198.18.0.2/32"]);
    let nets = ruleset(SetKey::Addr, &["198.18.0.1/32", "198.18.4.0/24"]);
    let ns = Netns::enter("clidiff").unwrap();
    let mut p = programmer::NftProgrammer::new().unwrap();
    ns.nft_script(&[], &compiler::render_nft::render(&hosts))
        .unwrap();
    assert_eq!(kernel_table(&mut p), hosts.tables[0]);
    for (old, new) in [(&hosts, &nets), (&nets, &hosts)] {
        let script = bench::backends::diff_script(old, new);
        ns.nft_script(&[], &script)
            .unwrap_or_else(|e| panic!("nft refused:\n{script}\n{e}"));
        assert_eq!(
            kernel_table(&mut p),
            programmer::canonical(&new.tables[0]),
            "{script}"
        );
    }
}
