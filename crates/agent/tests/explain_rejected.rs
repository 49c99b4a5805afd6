//! `nftpolicy explain` (no kernel) names what fails closed: a rejected
//! policy that drops a connection (with the reason), and felix's drop of
//! VXLAN sent by a workload (with the flag that allows it); `render` names
//! the rejected object on stderr and exits 1 while still printing the
//! ruleset, whose chain drops with a comment naming it.

use std::path::PathBuf;
use std::process::Command;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
{apiVersion: v1, kind: Pod, metadata: {name: web, namespace: shop, labels: {app: web}},
 spec: {nodeName: node1, containers: [{name: w}]}, status: {podIP: 198.18.0.10}}
---
{apiVersion: v1, kind: Pod, metadata: {name: api, namespace: shop, labels: {app: api}},
 spec: {nodeName: node1, containers: [{name: a}]}, status: {podIP: 198.18.0.11}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web-to-api-service, namespace: shop}
spec:
  selector: app == 'web'
  types: [Egress]
  egress:
    - {action: Allow, protocol: TCP, destination: {services: {name: api, namespace: shop}}}
"#;

struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A file of its own per call: the tests of this binary run in parallel,
/// and each one's guard removes its file.
fn cluster() -> TempFile {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!(
        "nftpolicy-explain-rejected-{}-{n}.yaml",
        std::process::id()
    ));
    std::fs::write(&p, CLUSTER).unwrap();
    TempFile(p)
}

fn nftpolicy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nftpolicy"))
        .args(args)
        .env_remove("NFTPOLICY_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `nftpolicy explain` over the cluster file, from one pod to another on
/// one port, with `extra` arguments: (exit code, stdout).
fn explain(f: &TempFile, from: &str, to: &str, port: &str, extra: &[&str]) -> (i32, String) {
    let datastore = format!("file:{}", f.0.display());
    let mut args = vec!["explain", "--datastore", &datastore];
    args.extend(["--from", from, "--to", to, "--port", port]);
    args.extend(extra);
    let (code, out, _) = nftpolicy(&args);
    (code, out)
}

#[test]
fn explain_names_the_rejected_policy_that_drops() {
    let f = cluster();
    let (code, out) = explain(&f, "shop/web", "shop/api", "80", &[]);
    assert_eq!(code, 1, "denied: {out}");
    assert!(out.contains("DENIED"), "{out}");
    assert!(
        out.contains("egress  shop/web: denied — Deny: policy ns/shop/web-to-api-service is rejected (spec.egress[0].destination.services: not implemented by nftpolicy"),
        "{out}"
    );
    assert!(
        out.contains("cali-FORWARD → cali-from-wl-dispatch → cali-fw-"),
        "{out}"
    );
    // The other way round the rejected policy names no direction: allowed.
    let (code, out) = explain(&f, "shop/api", "shop/web", "80", &[]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn explain_names_the_encapsulation_drop_and_its_switch() {
    let f = cluster();
    let (code, out) = explain(&f, "shop/api", "shop/web", "4789/UDP", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("Deny: VXLAN packets from workloads are dropped (allow them with --allow-vxlan-packets-from-workloads)"),
        "{out}"
    );
    let allow = ["--allow-vxlan-packets-from-workloads"];
    let (code, out) = explain(&f, "shop/api", "shop/web", "4789/UDP", &allow);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn render_names_the_rejected_policy_and_still_prints_the_ruleset() {
    let f = cluster();
    let path = f.0.display().to_string();
    let (code, out, err) = nftpolicy(&["render", "--node", "node1", &path]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("error: rejected NetworkPolicy shop/web-to-api-service: spec.egress[0].destination.services"),
        "{err}"
    );
    assert!(
        out.contains("counter drop comment \"Rejected policy ns/shop/web-to-api-service: drop all egress until it is fixed\""),
        "{out}"
    );
}
