//! Shared by the agent lab tests: our tables as the kernel holds them and
//! as the compiler says they must be, in the same (read-back) form.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use compiler::nft::{Ruleset, Table, TableFamily, TABLE_NAME};
use compiler::{compile_nftables, CompileOptions};
use lab::agents::in_namespace;
use lab::Lab;
use model::scenario::{Probe, ResolvedProbe, Scenario, StepState};
use programmer::NftProgrammer;

/// A small cluster for the etcd tests (`manifests/web-deny-all.yaml`):
/// web (node1) denies all ingress, client (node2) is free.
pub fn web_deny_all() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests/web-deny-all.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

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

/// A lab test's scenario: `tests/tests/scenarios/<name>.yaml`.
pub fn scenario(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scenarios")
        .join(format!("{name}.yaml"));
    Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The shop (`scenarios/shop.yaml`: one node with web, client and
/// intruder in namespace shop; web admits client on port 80 only): its
/// cluster state and probes (client → web allowed, intruder → web denied).
pub fn shop() -> (StepState, Vec<ResolvedProbe>) {
    let scenario = scenario("shop");
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

/// `probes` resolved against `state` (pods by name, no externals).
pub fn resolve(state: &StepState, probes: &[Probe]) -> Vec<ResolvedProbe> {
    probes
        .iter()
        .map(|p| state.resolve_probe(p, &[]).unwrap())
        .collect()
}

/// Probes `probes` in `lab` and asserts each gets its expected verdict
/// (`when` says at which point of the test).
pub fn assert_probes(lab: &mut Lab, probes: &[ResolvedProbe], when: &str) {
    let results = lab.probe_all(probes).unwrap();
    for (p, r) in probes.iter().zip(&results) {
        assert_eq!(
            r.allowed,
            Some(p.probe.expect_allow),
            "{when}: {}: {}",
            p.probe,
            r.detail
        );
    }
}
