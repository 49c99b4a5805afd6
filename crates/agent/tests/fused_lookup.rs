//! `--fused-lookup` at the command line: the nftables rendering has the
//! fused lookup where the walk had policy jumps; iptables mode, which has
//! no fused form, refuses the option instead of ignoring it.

mod common;
use common::*;

const CLUSTER: &str = r"
{apiVersion: v1, kind: Namespace, metadata: {name: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node1, containers: [{name: w, ports: [{containerPort: 80}]}]}
status: {podIP: 198.18.130.11}
---
apiVersion: v1
kind: Pod
metadata: {name: cli, namespace: shop, labels: {app: cli}}
spec: {nodeName: node2, containers: [{name: c}]}
status: {podIP: 198.18.130.12}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-cli, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: cli}}}], ports: [{port: 80}]}]
";

fn render(backend: &str) -> std::process::Output {
    let dir = TempDir::new(&format!("fused-{backend}"));
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
    nftpolicy()
        .args([
            "render",
            "--fused-lookup",
            "--node",
            "node1",
            "--backend",
            backend,
        ])
        .arg(dir.path())
        .output()
        .unwrap()
}

#[test]
fn nftables_renders_the_fused_lookup() {
    let out = render("nftables");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("ip saddr . meta l4proto . th dport @cali40f-")
            && text.contains("elements = { 198.18.130.12 . tcp . 80 }"),
        "{text}"
    );
    assert!(!text.contains("jump cali-pi-shop.web-from-cli"), "{text}");
}

#[test]
fn iptables_refuses_the_option() {
    let out = render("iptables");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--fused-lookup needs the nftables backend"),
        "{err}"
    );
}
