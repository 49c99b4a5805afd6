//! Shared by the agent lab tests: our tables as the kernel holds them and
//! as the compiler says they must be, in the same (read-back) form.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use compiler::nft::{Ruleset, Table, TableFamily, TABLE_NAME};
use compiler::{compile_nftables, CompileOptions};
use lab::agents::in_namespace;
use lab::Lab;
use model::scenario::{ResolvedProbe, Scenario, StepState};
use programmer::NftProgrammer;

/// A small cluster for the etcd tests: web (node1) denies all ingress,
/// client (node2) is free.
pub const WEB_DENY_ALL: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {nodeName: node1, containers: [{name: w, ports: [{containerPort: 80, protocol: TCP}]}]}
status: {podIP: 198.18.1.10, podIPs: [{ip: 198.18.1.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: node2, containers: [{name: c, ports: [{containerPort: 80, protocol: TCP}]}]}
status: {podIP: 198.18.1.11, podIPs: [{ip: 198.18.1.11}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-deny-all, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: []
"#;

/// A fresh etcd holding `manifests`, written with `nftpolicy apply` from
/// `cluster.yaml` in the returned directory.
pub fn etcd_holding(nftpolicy: &Path, manifests: &str) -> (lab::EtcdServer, tempfile::TempDir) {
    let etcd = lab::EtcdServer::start().expect("etcd starts");
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.yaml");
    std::fs::write(&cluster, manifests).unwrap();
    lab::agents::nftpolicy_etcd(nftpolicy, &etcd, "apply", std::slice::from_ref(&cluster))
        .expect("nftpolicy apply");
    (etcd, dir)
}

/// Both of our tables (ip, ip6) in read-back form.
pub type Tables = (Option<Table>, Option<Table>);

/// `rs` in read-back form (see `programmer::canonical`).
pub fn canonical(rs: &Ruleset) -> Tables {
    let take = |f: TableFamily| {
        rs.tables
            .iter()
            .find(|t| t.family == f)
            .map(programmer::canonical)
    };
    (take(TableFamily::Ip), take(TableFamily::Ip6))
}

/// What node1's agent must program from the file datastore `dir`.
pub fn desired(dir: &Path) -> Tables {
    let loaded = watcher::files::load(&[dir.to_owned()]).unwrap();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let (_, rs) = compile_nftables(&loaded.state, &CompileOptions::new("node1")).unwrap();
    canonical(&rs)
}

/// Our tables as the kernel holds them inside `node_ns`.
pub fn kernel(node_ns: &str) -> Tables {
    in_namespace(node_ns, || {
        let mut p = NftProgrammer::new()?;
        Ok::<_, programmer::Error>((
            p.read_back(TableFamily::Ip, TABLE_NAME)?,
            p.read_back(TableFamily::Ip6, TABLE_NAME)?,
        ))
    })
    .unwrap()
    .unwrap()
}

/// One node with web, client and intruder in namespace shop; web admits
/// client on port 80 only.
pub const SHOP: &str = r#"
name: shop
objects:
  - {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
  - apiVersion: v1
    kind: Pod
    metadata: {name: web, namespace: shop, labels: {app: web}}
    spec: {nodeName: node1, containers: [{name: w, ports: [{containerPort: 80, protocol: TCP}]}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: client, namespace: shop, labels: {app: client}}
    spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80, protocol: TCP}]}]}
  - apiVersion: v1
    kind: Pod
    metadata: {name: intruder, namespace: shop, labels: {app: intruder}}
    spec: {nodeName: node1, containers: [{name: i, ports: [{containerPort: 80, protocol: TCP}]}]}
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: web-from-client, namespace: shop}
    spec:
      podSelector: {matchLabels: {app: web}}
      ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80}]}]
probes:
  - {from: shop/client, to: shop/web, port: 80, expect: allow}
  - {from: shop/intruder, to: shop/web, port: 80, expect: deny}
"#;

/// [`SHOP`]'s cluster state and its probes (client → web allowed,
/// intruder → web denied).
pub fn shop() -> (StepState, Vec<ResolvedProbe>) {
    let scenario = Scenario::parse("shop.yaml", SHOP).unwrap();
    let state = scenario.states().unwrap().remove(0);
    let probes = scenario.steps[0]
        .probes
        .iter()
        .map(|p| state.resolve_probe(p, &[]).unwrap())
        .collect();
    (state, probes)
}

/// Waits until `cond` holds, at most `timeout` (then fails naming `what`);
/// returns how long it took. For what nothing notifies (the kernel, logs).
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// Waits (bounded) until the kernel of `node_ns` holds `want`.
pub fn wait_kernel(node_ns: &str, want: &Tables, what: &str, timeout: Duration) -> Duration {
    wait_for(
        &format!("{what}: the kernel reaching the desired ruleset"),
        timeout,
        || &kernel(node_ns) == want,
    )
}

/// Runs `probes` in `lab` and asserts each got its expected verdict.
pub fn check_probes(lab: &mut Lab, probes: &[ResolvedProbe], what: &str) {
    let results = lab.probe_all(probes).unwrap();
    for (p, r) in probes.iter().zip(&results) {
        assert_eq!(
            r.allowed,
            Some(p.probe.expect_allow),
            "{what}: {}: {}",
            p.probe,
            r.detail
        );
    }
}
