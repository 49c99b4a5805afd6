//! Shared by the agent lab tests: our tables as the kernel holds them and
//! as the compiler says they must be, in the same (read-back) form.

#![allow(dead_code)]

use std::path::Path;

use compiler::nft::{Ruleset, Table, TableFamily, TABLE_NAME};
use compiler::{compile_nftables, CompileOptions};
use lab::agents::in_namespace;
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
