//! `nftpolicy explain` (no kernel) over Kubernetes admin policies: the
//! verdict names the converted policy and its tier, and a Pass walks on to
//! the NetworkPolicy and baseline tiers.

mod common;

use common::{nftpolicy, TempDir};

/// Namespace `data` with pods db, api and report (app=<name>) on node1.
fn pods() -> String {
    let mut out = "apiVersion: v1\nkind: Namespace\nmetadata: {name: data}\n".to_owned();
    for (i, name) in ["db", "api", "report"].iter().enumerate() {
        out += &format!(
            "---\n{{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: data, \
             labels: {{app: {name}}}}}, spec: {{nodeName: node1, containers: [{{name: c}}]}}, \
             status: {{podIP: 198.18.0.{}}}}}\n",
            10 + i
        );
    }
    out
}

const POLICIES: &str = r#"
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: delegate}
spec:
  priority: 5
  subject: {namespaces: {}}
  ingress:
    - {action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}}]}
    - {action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  ingress:
    - {action: Deny, from: [{namespaces: {}}]}
"#;

/// `nftpolicy explain` from one pod to another on TCP 80: (exit code, stdout).
fn explain(dir: &TempDir, from: &str, to: &str) -> (i32, String) {
    let datastore = format!("file:{}", dir.path().display());
    let out = nftpolicy()
        .args([
            "explain",
            "--datastore",
            &datastore,
            "--from",
            from,
            "--to",
            to,
        ])
        .args(["--port", "80"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn explain_names_the_admin_tiers() {
    let dir = TempDir::new("explain-admin");
    std::fs::write(dir.path().join("cluster.yaml"), pods() + POLICIES).unwrap();
    // An ANP Deny decides in tier adminnetworkpolicy.
    let (_, out) = explain(&dir, "data/db", "data/api");
    assert!(out.contains("DENIED"), "{out}");
    assert!(
        out.contains("policy gnp/kanp.adminnetworkpolicy.delegate in tier adminnetworkpolicy"),
        "{out}"
    );
    // A Pass goes on; no NetworkPolicy selects report, so the baseline decides.
    let (_, out) = explain(&dir, "data/api", "data/report");
    assert!(out.contains("DENIED"), "{out}");
    assert!(
        out.contains(
            "policy gnp/kbanp.baselineadminnetworkpolicy.default in tier baselineadminnetworkpolicy"
        ),
        "{out}"
    );
    assert!(
        out.contains("cali-pi-gnp/kanp.adminnetworkpolicy.delegate"),
        "the path passes through the ANP first: {out}"
    );
}

/// A node peer: egress to a node's address names the ANP rule, and to the
/// pods' own node (node1) the path enters through the node's INPUT chain.
#[test]
fn explain_follows_node_peers_and_the_input_path() {
    let dir = TempDir::new("explain-nodes");
    let nodes = r#"
---
{apiVersion: v1, kind: Node, metadata: {name: node1, labels: {role: control}}, status: {addresses: [{type: InternalIP, address: 198.18.1.1}]}}
---
{apiVersion: v1, kind: Node, metadata: {name: node2, labels: {role: worker}}, status: {addresses: [{type: InternalIP, address: 198.18.1.2}]}}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: no-control}
spec:
  priority: 1
  subject: {namespaces: {}}
  egress: [{action: Deny, to: [{nodes: {matchLabels: {role: control}}}]}]
"#;
    std::fs::write(dir.path().join("cluster.yaml"), pods() + nodes).unwrap();
    for (to, wanted) in [
        (
            "198.18.1.1",
            [
                "DENIED",
                "policy gnp/kanp.adminnetworkpolicy.no-control in tier adminnetworkpolicy",
                "cali-INPUT → cali-wl-to-host → cali-from-wl-dispatch → cali-fw-",
            ],
        ),
        (
            "198.18.1.2",
            [
                "ALLOWED",
                "Allow by rule 0 of profile kns.data",
                "cali-FORWARD → cali-from-wl-dispatch → cali-fw-",
            ],
        ),
    ] {
        let (_, out) = explain(&dir, "data/db", to);
        for w in wanted {
            assert!(out.contains(w), "{to}: no {w:?} in {out}");
        }
    }
}
