//! Large batches: 10,000 set elements and 1,000 chains × 10 rules in one
//! transaction each; encoding 10,000 chains × 10 rules. Timings are printed
//! (run with `--nocapture`), never asserted.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use common::*;
use compiler::nft::*;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

fn policy_chains(t: &mut Table, chains: usize, rules: usize) {
    for i in 0..chains {
        let name = format!("cali-pi-{i:05}");
        let rs = (0..rules)
            .map(|j| {
                let m = match j % 4 {
                    0 => vec![l4(6), dport(1000 + j as u16, 1000 + j as u16, false)],
                    1 => vec![l4(17), addr_set(Dir::Src, "pods", false)],
                    2 => vec![
                        addr(Dir::Dst, "198.18.0.0/15", true),
                        Match::Mark {
                            mask: 0x10000,
                            value: 0,
                            negate: false,
                        },
                    ],
                    _ => vec![ifname(IfDir::In, "cali", true, false)],
                };
                rule(
                    m,
                    vec![Stmt::Counter],
                    Some(Verdict::Accept),
                    &format!("cali:{i:05}-{j}"),
                )
            })
            .collect();
        t.chains.insert(name.clone(), chain(&name, rs));
    }
    t.sets.insert(
        "pods".into(),
        Set {
            name: "pods".into(),
            key: SetKey::Addr,
            elements: vec![SetElement::Net(net("198.18.0.0/16"))].into(),
            comment: None,
        },
    );
}

#[test]
fn ten_thousand_elements_in_one_batch() {
    let (_ns, mut p) = setup("scale-elems");
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    let hosts: Vec<SetElement> = (0..10_000u32)
        .map(|i| {
            SetElement::Net(IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(base + 2 * i), 32).unwrap(),
            ))
        })
        .collect();
    let v6base = u128::from("fd00:198:18::".parse::<Ipv6Addr>().unwrap());
    let v6: Vec<SetElement> = (0..10_000u128)
        .map(|i| {
            SetElement::Net(IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(v6base + (i << 16)), 112).unwrap(),
            ))
        })
        .collect();
    let named: Vec<SetElement> = (0..10_000u32)
        .map(|i| SetElement::NamedPort(Ipv4Addr::from(base + i).into(), 6, 8080))
        .collect();
    let mut t4 = Table::new(TableFamily::Ip, TABLE_NAME);
    t4.sets.insert(
        "hosts".into(),
        Set {
            name: "hosts".into(),
            key: SetKey::Addr,
            elements: hosts.into(),
            comment: None,
        },
    );
    t4.sets.insert(
        "named".into(),
        Set {
            name: "named".into(),
            key: SetKey::NamedPort,
            elements: named.into(),
            comment: None,
        },
    );
    let mut t6 = Table::new(TableFamily::Ip6, TABLE_NAME);
    t6.sets.insert(
        "nets".into(),
        Set {
            name: "nets".into(),
            key: SetKey::Addr,
            elements: v6.into(),
            comment: None,
        },
    );
    let rs = Ruleset {
        tables: vec![t4, t6],
    };

    let tx = p.plan(&rs).unwrap();
    // Each message's element nest stays under 64 KiB.
    let elem_msgs = tx.kinds()["NEWSETELEM"];
    assert!(elem_msgs >= 10, "{elem_msgs}");
    for (_, payload) in tx.encoded() {
        assert!(
            payload.len() < 65_536 + 256,
            "message of {} bytes",
            payload.len()
        );
    }
    let r = p.apply(&rs).unwrap();
    eprintln!(
        "10k IPv4 hosts + 10k named ports + 10k IPv6 /112: {} messages, {} bytes, encode {:?}, kernel {:?}",
        r.messages, r.bytes, r.encode_time, r.kernel_time
    );
    let t0 = Instant::now();
    for t in &rs.tables {
        assert_eq!(p.read_back(t.family, TABLE_NAME).unwrap().as_ref(), Some(t));
    }
    eprintln!("read back 30k elements: {:?}", t0.elapsed());
}

#[test]
fn thousand_chains_of_ten_rules_in_one_batch() {
    let (_ns, mut p) = setup("scale-chains");
    let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
    policy_chains(&mut t, 1000, 10);
    t.chains.insert(
        "filter-FORWARD".into(),
        base_chain(
            "filter-FORWARD",
            Hook::Forward,
            0,
            ChainPolicy::Accept,
            (0..1000)
                .map(|i| {
                    rule(
                        vec![],
                        vec![],
                        Some(Verdict::Jump(format!("cali-pi-{i:05}"))),
                        "",
                    )
                })
                .collect(),
        ),
    );
    let rs = Ruleset { tables: vec![t] };
    let r = p.apply(&rs).unwrap();
    eprintln!(
        "1,000 chains × 10 rules: {} messages, {} bytes, encode {:?}, kernel {:?}",
        r.messages, r.bytes, r.encode_time, r.kernel_time
    );
    assert_eq!(r.kinds["NEWRULE"], 11_000);
    let t0 = Instant::now();
    let back = p.read_back(TableFamily::Ip, TABLE_NAME).unwrap();
    eprintln!("read back 11k rules: {:?}", t0.elapsed());
    assert_eq!(back.as_ref(), Some(&rs.tables[0]));
}

#[test]
fn encoding_ten_thousand_chains_of_ten_rules() {
    // Encoding only: nothing is sent (the socket still lives in a test
    // namespace, as all kernel work in tests does).
    let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
    policy_chains(&mut t, 10_000, 10);
    let rs = Ruleset { tables: vec![t] };
    let (_ns, p) = setup("scale-encode");
    let t0 = Instant::now();
    let tx = p.plan(&rs).unwrap();
    eprintln!(
        "encode 10,000 chains × 10 rules: {} messages, {} bytes in {:?} ({} build)",
        tx.messages(),
        tx.bytes(),
        t0.elapsed(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    assert_eq!(tx.kinds()["NEWRULE"], 100_000);
}
