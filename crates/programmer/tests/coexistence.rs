//! Other tables in the same namespace (kube-proxy's, say) are never
//! touched: not by apply, not by remove_all.

mod common;

use common::*;
use compiler::nft::*;

const KUBE_PROXY: &str = "table ip kube-proxy {
  set cluster-ips { type ipv4_addr; elements = { 198.18.100.1, 198.18.100.2 }; }
  map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }
  chain services { ip daddr @cluster-ips counter accept comment \"kube-proxy\"; }
  chain filter-forward { type filter hook forward priority -110; policy accept; ct state new jump services; }
}
table ip6 nftpolicy-other { chain c { counter; }; }
";

#[test]
fn other_tables_survive_apply_and_remove_all() {
    if !nft_for("the stand-in for kube-proxy") {
        return;
    }
    let (ns, mut p) = setup("coexist");
    ns.nft_script(&[], KUBE_PROXY).unwrap();
    let theirs = || {
        (
            ns.nft(&["-j", "list", "table", "ip", "kube-proxy"])
                .unwrap(),
            ns.nft(&["-j", "list", "table", "ip6", "nftpolicy-other"])
                .unwrap(),
        )
    };
    let before = theirs();

    let mut rs = sample_ruleset();
    p.apply(&rs).unwrap();
    assert_eq!(theirs(), before);

    // Changes, a table removal, then everything of ours removed.
    rs.tables[0].chains.get_mut("cali-pol").unwrap().rules.pop();
    rs.tables.pop();
    p.apply(&rs).unwrap();
    assert_eq!(theirs(), before);
    // Another table changing does not count as drift of ours.
    ns.nft(&["add", "rule", "ip", "kube-proxy", "services", "counter"])
        .unwrap();
    assert!(!p.has_drift().unwrap());
    let before = theirs();

    p.remove_all().unwrap();
    assert_eq!(theirs(), before);
    assert_eq!(p.read_back(TableFamily::Ip, TABLE_NAME).unwrap(), None);
    assert_eq!(p.read_back(TableFamily::Ip6, TABLE_NAME).unwrap(), None);
    // Removing again (nothing there) is fine.
    p.remove_all().unwrap();
    // And the programmer starts over cleanly.
    p.apply(&sample_ruleset()).unwrap();
    assert_eq!(theirs(), before);
}
