//! `nftpolicy explain --datastore etcd://…`: the cluster written into a real
//! etcd with `nftpolicy apply` is explained as the same manifests read from
//! a file would be. Needs an etcd binary (Debian's etcd-server), no root.

use std::path::Path;
use std::process::Command;

mod common;
use common::{etcd_holding, web_deny_all};

/// `nftpolicy explain` from `from` to `to` port 80: exit code and stdout.
fn explain(nftpolicy: &Path, datastore: &str, from: &str, to: &str) -> (Option<i32>, String) {
    let out = Command::new(nftpolicy)
        .args(["explain", "--datastore", datastore])
        .args(["--from", from, "--to", to, "--port", "80"])
        .output()
        .expect("running nftpolicy explain");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.code() != Some(2),
        "explain failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), stdout)
}

#[test]
fn explain_reads_an_etcd_datastore() {
    let nftpolicy = lab::nftpolicy_binary();
    let (etcd, dir) = etcd_holding(&nftpolicy, &web_deny_all());
    let cluster = dir.path().join("cluster.yaml");

    let file = format!("file:{}", cluster.display());
    for (from, to, allowed) in [
        ("default/client", "default/web", false),
        ("default/web", "default/client", true),
    ] {
        let (code, text) = explain(&nftpolicy, &etcd.url(), from, to);
        assert_eq!(code, Some(if allowed { 0 } else { 1 }), "{text}");
        let verdict = if allowed { "ALLOWED" } else { "DENIED" };
        assert!(text.contains(verdict), "{from} -> {to}: {text}");
        if !allowed {
            assert!(text.contains("web-deny-all"), "names the policy: {text}");
        }
        // The same explanation as from the manifests themselves.
        assert_eq!(explain(&nftpolicy, &file, from, to), (code, text));
    }
}
