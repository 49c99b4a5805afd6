//! `nftpolicy sync --once --datastore etcd://…`: the cluster written into a
//! real etcd with `nftpolicy apply` is programmed into a node's kernel
//! exactly as the same manifests read from a file are; an etcd that does
//! not answer is a clear error and leaves the dataplane as it is. Root (a
//! network namespace per run) and an etcd binary (Debian's etcd-server).

use std::path::Path;
use std::process::{Command, Output};

use testkit::netns::Netns;

mod common;
use common::{desired, etcd_holding, kernel, web_deny_all};

/// Carries connections to 127.0.0.1:`port` inside `ns` to the host's
/// 127.0.0.1:`port` (where the test's etcd listens), as a node reaches its
/// cluster's etcd. Runs until the test process ends.
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

#[test]
fn sync_once_programs_an_etcd_datastore_like_the_same_files() {
    let nftpolicy = lab::nftpolicy_binary();
    let (etcd, dir) = etcd_holding(&nftpolicy, &web_deny_all());

    let ns = Netns::create("syncetcd").unwrap();
    relay_etcd_into(&ns, etcd.client_port());
    let out = sync_once(&nftpolicy, &ns, &etcd.url());
    assert!(
        out.status.success(),
        "sync --once from etcd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let programmed = kernel(ns.name());
    assert_eq!(
        programmed,
        desired(dir.path()),
        "the kernel holds the cluster's ruleset"
    );
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
