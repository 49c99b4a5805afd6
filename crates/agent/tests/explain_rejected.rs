//! `nftpolicy explain` (no kernel) names what fails closed: a rejected
//! policy that drops a connection (with the reason), and felix's drop of
//! VXLAN sent by a workload (with the flag that allows it); `render` names
//! the rejected object on stderr and exits 1 while still printing the
//! ruleset, whose chain drops with a comment naming it. It also follows
//! service-account matches, and names a malformed one as rejected.

use std::path::PathBuf;
use std::process::Command;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
{apiVersion: v1, kind: Pod, metadata: {name: web, namespace: shop, labels: {app: web}}, spec: {nodeName: node1, containers: [{name: w}]}, status: {podIP: 198.18.0.10}}
---
{apiVersion: v1, kind: Pod, metadata: {name: api, namespace: shop, labels: {app: api}}, spec: {nodeName: node1, containers: [{name: a}]}, status: {podIP: 198.18.0.11}}
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
    file_with(CLUSTER)
}

fn file_with(text: &str) -> TempFile {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!(
        "nftpolicy-explain-rejected-{}-{n}.yaml",
        std::process::id()
    ));
    std::fs::write(&p, text).unwrap();
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

/// db accepts 5432 from pods of account frontend, and only db is selected
/// (by its account's labels); cache has a rule with a misspelt
/// `serviceAccounts` field, rejected.
const ACCOUNTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: backend, namespace: shop, labels: {role: db}}
---
{apiVersion: v1, kind: Pod, metadata: {name: db, namespace: shop, labels: {app: db}}, spec: {nodeName: node1, serviceAccountName: backend, containers: [{name: d}]}, status: {podIP: 198.18.0.20}}
---
{apiVersion: v1, kind: Pod, metadata: {name: web, namespace: shop, labels: {app: web}}, spec: {nodeName: node1, serviceAccountName: frontend, containers: [{name: w}]}, status: {podIP: 198.18.0.21}}
---
{apiVersion: v1, kind: Pod, metadata: {name: tool, namespace: shop}, spec: {nodeName: node1, containers: [{name: t}]}, status: {podIP: 198.18.0.22}}
---
{apiVersion: v1, kind: Pod, metadata: {name: cache, namespace: shop, labels: {app: cache}}, spec: {nodeName: node1, containers: [{name: c}]}, status: {podIP: 198.18.0.23}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: db-ingress, namespace: shop}
spec:
  selector: all()
  serviceAccountSelector: role == 'db'
  types: [Ingress]
  ingress:
    - {action: Allow, protocol: TCP, source: {serviceAccounts: {names: [frontend]}}, destination: {ports: [5432]}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: cache-ingress, namespace: shop}
spec:
  selector: app == 'cache'
  types: [Ingress]
  ingress:
    - {action: Allow, source: {serviceAccounts: {name: [web]}}}
"#;

#[test]
fn explain_follows_service_accounts() {
    let f = file_with(ACCOUNTS);
    let (code, out) = explain(&f, "shop/web", "shop/db", "5432", &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Allow by rule 0 of policy ns/shop/db-ingress in tier default"),
        "{out}"
    );
    // tool runs as `default`: not frontend.
    let (code, out) = explain(&f, "shop/tool", "shop/db", "5432", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("Deny at end of tier default"), "{out}");
    // The policy's serviceAccountSelector leaves web (account frontend) out.
    let (code, out) = explain(&f, "shop/tool", "shop/web", "80", &[]);
    assert_eq!(code, 0, "{out}");
    // The misspelt match is rejected, not read as "anyone".
    let (code, out) = explain(&f, "shop/web", "shop/cache", "80", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("policy ns/shop/cache-ingress is rejected (spec.ingress[0].source.serviceAccounts.name: unknown field"),
        "{out}"
    );
}
