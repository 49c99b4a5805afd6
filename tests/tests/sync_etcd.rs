//! `nftpolicy sync --once --datastore etcd://…` (and `kubernetes:…`): the
//! cluster written into a real etcd with `nftpolicy apply` (or held by the
//! fake API server) is programmed into a node's kernel exactly as the same
//! manifests read from a file are; a datastore that does not answer is a
//! clear error and leaves the dataplane as it is. Root (a
//! network namespace per run) and an etcd binary (Debian's etcd-server).

use std::path::Path;
use std::process::{Command, Output};

use serde::Deserialize;
use testkit::netns::Netns;

mod common;
use common::{desired, etcd_holding, kernel, web_deny_all, Tables};

/// Carries connections to 127.0.0.1:`port` inside `ns` to the host's
/// 127.0.0.1:`port` (where the test's etcd or API server listens), as a
/// node reaches its cluster's datastore. Runs until the test process ends.
fn relay_etcd_into(ns: &Netns, port: u16) {
    ns.exec(&["ip", "link", "set", "lo", "up"]).unwrap();
    let listener = lab::agents::in_namespace(ns.name(), move || {
        std::net::TcpListener::bind(("127.0.0.1", port))
    })
    .unwrap()
    .unwrap();
    // This thread and those it starts stay in the host's namespace: their
    // connects reach the real etcd.
    std::thread::spawn(move || {
        for inside in listener.incoming().flatten() {
            let Ok(outside) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            for (mut from, mut to) in [
                (inside.try_clone().unwrap(), outside.try_clone().unwrap()),
                (outside, inside),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
}

/// `nftpolicy sync --once` for node1 inside `ns`.
fn sync_once(nftpolicy: &Path, ns: &Netns, datastore: &str) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(nftpolicy)
        .args([
            "sync",
            "--once",
            "--node",
            "node1",
            "--datastore",
            datastore,
        ])
        .env_remove("NFTPOLICY_DATASTORE")
        .output()
        .expect("running nftpolicy sync")
}

/// `sync --once` from `datastore` succeeds and leaves in the kernel the
/// ruleset of the files in `dir`; returns what the kernel holds.
fn sync_like_files(nftpolicy: &Path, ns: &Netns, datastore: &str, dir: &Path) -> Tables {
    let out = sync_once(nftpolicy, ns, datastore);
    testkit::assert_success(&out, format_args!("sync --once from {datastore}"));
    let programmed = kernel(ns.name());
    assert_eq!(
        programmed,
        desired(dir),
        "the kernel holds the cluster's ruleset"
    );
    programmed
}

#[test]
fn sync_once_programs_an_etcd_datastore_like_the_same_files() {
    let nftpolicy = lab::nftpolicy_binary();
    let (etcd, dir) = etcd_holding(&nftpolicy, &web_deny_all());

    let ns = Netns::create("syncetcd").unwrap();
    relay_etcd_into(&ns, etcd.client_port());
    let programmed = sync_like_files(&nftpolicy, &ns, &etcd.url(), dir.path());
    let ip = programmed.0.as_ref().expect("an ip table");
    assert!(
        ip.chains.keys().any(|c| c.contains("web-deny-all")),
        "the policy's chain is programmed: {:?}",
        ip.chains.keys().collect::<Vec<_>>()
    );

    // etcd gone: a clear error naming the datastore, the kernel unchanged.
    let url = etcd.url();
    drop(etcd);
    let out = sync_once(&nftpolicy, &ns, &url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sync --once without etcd must fail");
    assert!(
        stderr.contains("datastore") && stderr.contains(&url),
        "the error names the datastore: {stderr}"
    );
    assert_eq!(
        kernel(ns.name()),
        programmed,
        "the dataplane is left as it is"
    );
}

/// `sync --once --datastore kubernetes:KUBECONFIG`: the same cluster held by
/// the fake API server (a test double), pods' addresses written through
/// their status, is programmed exactly as from the files; a missing
/// kubeconfig is a clear error and leaves the dataplane as it is.
#[test]
fn sync_once_programs_a_kubernetes_datastore_like_the_same_files() {
    let nftpolicy = lab::nftpolicy_binary();
    let api = lab::LabApi::start().unwrap();
    let cluster = web_deny_all();
    for doc in serde_yaml::Deserializer::from_str(&cluster) {
        let value = serde_yaml::Value::deserialize(doc).unwrap();
        let object: serde_json::Value = serde_json::to_value(value).unwrap();
        api.server.apply(&object).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), &cluster).unwrap();

    let ns = Netns::create("synckube").unwrap();
    relay_etcd_into(&ns, api.port());
    let datastore = api.datastore();
    let programmed = sync_like_files(&nftpolicy, &ns, &datastore, dir.path());

    // A kubeconfig that is not there: a clear error at once (an API server
    // that does not answer takes the same 15-s path as etcd above), the
    // dataplane as it is.
    let out = sync_once(&nftpolicy, &ns, "kubernetes:/nonexistent/kubeconfig");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("kubeconfig /nonexistent/kubeconfig"),
        "{stderr}"
    );
    assert_eq!(
        kernel(ns.name()),
        programmed,
        "the dataplane is left as it is"
    );
}
