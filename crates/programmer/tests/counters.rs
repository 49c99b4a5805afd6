//! Rule counters can be read, and rise with traffic.

mod common;

use std::net::UdpSocket;

use common::*;
use compiler::nft::*;

#[test]
fn output_counter_rises_with_traffic() {
    let (ns, mut p) = setup("counters");
    ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
    ns.exec(&["ip", "addr", "add", "198.18.0.1/32", "dev", "lo"])
        .unwrap();

    let mut t = Table::new(TableFamily::Ip, TABLE_NAME);
    t.chains.insert(
        "out".into(),
        base_chain(
            "out",
            Hook::Output,
            0,
            ChainPolicy::Accept,
            vec![
                rule(
                    vec![
                        l4(17),
                        addr(Dir::Dst, "198.18.0.1/32", false),
                        dport(9999, 9999, false),
                    ],
                    vec![Stmt::Counter],
                    None,
                    "udp to 198.18.0.1:9999",
                ),
                rule(vec![], vec![], None, "no counter"),
            ],
        ),
    );
    p.apply(&Ruleset { tables: vec![t] }).unwrap();
    let before = p.read_counters(TableFamily::Ip, TABLE_NAME, "out").unwrap();
    assert_eq!(before.len(), 2);
    assert_eq!(before[0].comment.as_deref(), Some("udp to 198.18.0.1:9999"));
    assert_eq!((before[0].packets, before[0].bytes), (0, 0));

    // The test thread is in the namespace: this socket is too.
    let sock = UdpSocket::bind("198.18.0.1:0").unwrap();
    for _ in 0..3 {
        sock.send_to(b"hello", "198.18.0.1:9999").unwrap();
    }
    let after = p.read_counters(TableFamily::Ip, TABLE_NAME, "out").unwrap();
    assert_eq!(after[0].packets, 3);
    assert_eq!(after[0].bytes, 3 * (20 + 8 + 5));
    assert_eq!((after[1].packets, after[1].bytes), (0, 0));
}
