//! `nftpolicy render --backend iptables` is input the real tools accept:
//! its `ipset restore` parts create the sets, and its `iptables-restore` /
//! `ip6tables-restore` parts pass `iptables-legacy-restore --test` (which
//! resolves every chain, target, match and set name against the kernel).
//!
//! Needs root: the sets are created inside a network namespace this test
//! makes and removes.

use std::path::Path;

use testkit::netns::Netns;

mod common;
use common::*;

/// A cluster with every kind of rule the renderer has: selectors (labels
/// and expressions, namespace and pod), named ports resolving to different
/// numbers, port ranges, UDP, ipBlocks with except in both families,
/// policy types with and without rules, pods on both nodes, dual-stack.
const CLUSTER: &str = r#"
{apiVersion: v1, kind: Namespace, metadata: {name: shop, labels: {team: red}}}
---
{apiVersion: v1, kind: Namespace, metadata: {name: ops, labels: {team: blue}}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web, tier: front}}
spec:
  nodeName: node1
  containers:
    - name: w
      ports:
        - {name: http, containerPort: 80, protocol: TCP}
        - {name: dns, containerPort: 53, protocol: UDP}
status:
  podIP: 198.18.130.11
  podIPs: [{ip: 198.18.130.11}, {ip: "fd00:198:18:82::11"}]
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api, tier: back}}
spec:
  nodeName: node1
  containers:
    - name: a
      ports:
        - {name: http, containerPort: 8080, protocol: TCP}
        - {containerPort: 5432, protocol: TCP}
status:
  podIP: 198.18.130.12
  podIPs: [{ip: 198.18.130.12}, {ip: "fd00:198:18:82::12"}]
---
apiVersion: v1
kind: Pod
metadata: {name: mon, namespace: ops, labels: {app: mon}}
spec:
  nodeName: node2
  containers:
    - name: m
      ports:
        - {name: metrics, containerPort: 9100, protocol: TCP}
status:
  podIP: 198.18.130.13
  podIPs: [{ip: 198.18.130.13}, {ip: "fd00:198:18:82::13"}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-in, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    - from:
        - podSelector: {matchExpressions: [{key: tier, operator: In, values: [back, front]}]}
        - namespaceSelector: {matchLabels: {team: blue}}
          podSelector: {matchExpressions: [{key: app, operator: Exists}]}
      ports:
        - {port: http}
        - {port: dns, protocol: UDP}
    - from:
        - ipBlock: {cidr: 198.19.0.0/16, except: [198.19.200.0/24, 198.19.201.7/32]}
        - ipBlock: {cidr: "fd00:198:18::/48", except: ["fd00:198:18:82::/64"]}
      ports:
        - {port: 80, endPort: 90}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-out, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}
  policyTypes: [Ingress, Egress]
  ingress: []
  egress:
    - to:
        - namespaceSelector: {matchExpressions: [{key: team, operator: DoesNotExist}]}
      ports:
        - {port: 9100, protocol: TCP}
        - {port: metrics}
        - {protocol: UDP}
    - to:
        - ipBlock: {cidr: 198.18.130.0/24, except: [198.18.130.12/30]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: ops}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#;

/// The rendered text's parts, by their `# IPv4: ipset restore`-style
/// headers: (header, body).
fn split_parts(rendered: &str) -> Vec<(String, String)> {
    let mut parts: Vec<(String, String)> = Vec::new();
    for line in rendered.lines() {
        if let Some(header) = line
            .strip_prefix("# IPv4: ")
            .map(|h| format!("IPv4 {h}"))
            .or_else(|| line.strip_prefix("# IPv6: ").map(|h| format!("IPv6 {h}")))
        {
            parts.push((header, String::new()));
        } else {
            let (_, body) = parts
                .last_mut()
                .unwrap_or_else(|| panic!("text before the first part header: {line:?}"));
            body.push_str(line);
            body.push('\n');
        }
    }
    parts
}

fn render(manifests: &Path, node: &str) -> String {
    let out = testkit::output_ok(
        nftpolicy()
            .args(["render", "--backend", "iptables", "--node", node])
            .arg(manifests),
        "render",
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd` inside `ns` with `input` on stdin; (success, stderr+stdout).
fn feed(ns: &Netns, cmd: &[&str], input: &str) -> (bool, String) {
    let (ok, stdout, stderr) = ns.output(cmd, input).unwrap();
    (ok, stderr + &stdout)
}

#[test]
fn rendered_iptables_passes_iptables_restore_test() {
    let dir = TempDir::new("cluster");
    std::fs::write(dir.0.join("cluster.yaml"), CLUSTER).unwrap();
    for node in ["node1", "node2"] {
        let rendered = render(&dir.0, node);
        let parts = split_parts(&rendered);
        let headers: Vec<&str> = parts.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(
            headers,
            [
                "IPv4 ipset restore",
                "IPv4 iptables-restore --noflush",
                "IPv6 ipset restore",
                "IPv6 ip6tables-restore --noflush",
            ],
            "{node}: parts of the rendered text"
        );
        let body = |i: usize| parts[i].1.as_str();
        // node1's pods really need sets and policy chains, in both
        // families; node2's pod has only a deny-all policy (chains, no sets).
        for i in [1, 3] {
            assert!(body(i).contains(":cali-pi-"), "{node}: {}", headers[i]);
            if node == "node1" {
                assert!(body(i).contains("--match-set"), "{node}: {}", headers[i]);
            }
        }

        // Sets are per network namespace: a fresh one holds none of ours.
        let ns = Netns::create("rendeript").expect("a network namespace (needs root)");
        for i in [0, 2] {
            let (ok, out) = feed(&ns, &["ipset", "restore"], body(i));
            assert!(
                ok,
                "{node}: ipset restore of {}:\n{out}\n{}",
                headers[i],
                body(i)
            );
        }
        for (i, tool) in [
            (1, "iptables-legacy-restore"),
            (3, "ip6tables-legacy-restore"),
        ] {
            let (ok, out) = feed(&ns, &[tool, "--test", "--noflush"], body(i));
            assert!(
                ok,
                "{node}: {tool} --test refused {}:\n{out}\n{}",
                headers[i],
                body(i)
            );
        }

        // --test really checks: without the sets the same rules are refused.
        if node != "node1" {
            continue;
        }
        let bare = Netns::create("rendeript-nosets").unwrap();
        let (ok, _) = feed(
            &bare,
            &["iptables-legacy-restore", "--test", "--noflush"],
            body(1),
        );
        assert!(
            !ok,
            "{node}: iptables-legacy-restore --test accepted rules naming missing sets"
        );
    }
}
