//! `--table-groups` at the command line: `auto` (the default) renders a
//! small cluster as one table per family, a count cuts it into that many
//! namespace groups' tables, iptables mode refuses a count above 1 (it has
//! one filter table) but takes `auto`, and a value that is neither is
//! refused by name.

mod common;
use common::*;

const CLUSTER: &str = r"
{apiVersion: v1, kind: Namespace, metadata: {name: shop}}
---
{apiVersion: v1, kind: Namespace, metadata: {name: bank}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node1, containers: [{name: w}]}
status: {podIP: 198.18.130.11}
---
apiVersion: v1
kind: Pod
metadata: {name: vault, namespace: bank, labels: {app: vault}}
spec: {nodeName: node1, containers: [{name: v}]}
status: {podIP: 198.18.130.12}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-shop, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {}}]}]
";

fn render(args: &[&str], env: Option<&str>) -> std::process::Output {
    let dir = TempDir::new("table-groups-render");
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
    let mut cmd = nftpolicy();
    cmd.args(["render", "--node", "node1"])
        .args(args)
        .arg(dir.path());
    cmd.env_remove("NFTPOLICY_TABLE_GROUPS");
    if let Some(v) = env {
        cmd.env("NFTPOLICY_TABLE_GROUPS", v);
    }
    cmd.output().unwrap()
}

fn tables(out: &std::process::Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.strip_prefix("table ")
                .map(|t| t.trim_end_matches(" {").to_owned())
        })
        .collect()
}

#[test]
fn auto_is_the_default_and_keeps_a_small_cluster_whole() {
    let whole = ["ip nftpolicy", "ip6 nftpolicy"];
    assert_eq!(tables(&render(&[], None)), whole);
    assert_eq!(tables(&render(&["--table-groups", "auto"], None)), whole);
    assert_eq!(tables(&render(&[], Some("auto"))), whole);
    assert_eq!(tables(&render(&["--table-groups", "1"], None)), whole);
}

#[test]
fn a_count_cuts_the_tables() {
    assert_eq!(
        tables(&render(&["--table-groups", "2"], None)),
        [
            "ip nftpolicy-g0",
            "ip6 nftpolicy-g0",
            "ip nftpolicy-g1",
            "ip6 nftpolicy-g1"
        ]
    );
    assert_eq!(tables(&render(&[], Some("2"))).len(), 4);
}

#[test]
fn iptables_mode_takes_auto_and_refuses_a_count() {
    let out = render(&["--backend", "iptables"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = render(&["--backend", "iptables", "--table-groups", "3"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--table-groups 3 needs the nftables backend"),
        "{err}"
    );
}

#[test]
fn neither_auto_nor_a_count_is_refused() {
    for bad in ["0", "65", "many"] {
        let out = render(&["--table-groups", bad], None);
        assert!(!out.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--table-groups")
                && err.contains("neither `auto` nor a count from 1 to 64"),
            "{bad}: {err}"
        );
    }
}
