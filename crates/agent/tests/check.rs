//! `nftpolicy check` as a user runs it: exit codes, result lines, errors.

use std::path::Path;

mod common;
use common::{nftpolicy, workspace, TempDir};

fn run(args: &[&Path]) -> (i32, String) {
    let out = nftpolicy().arg("check").args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

const WEB_DENY_ALL: &str = r#"
name: web-deny-all-copy
steps:
  - apply:
      - {apiVersion: v1, kind: Namespace, metadata: {name: default}}
      - {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: default, labels: {app: web}},
         spec: {containers: [{name: web, ports: [{containerPort: 80, protocol: TCP}]}]}}
      - {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: default, labels: {app: client}},
         spec: {containers: [{name: c, ports: [{containerPort: 80, protocol: TCP}]}]}}
    probes:
      - {from: default/client, to: default/web, port: 80, expect: allow}
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: web-deny-all, namespace: default}
        spec: {podSelector: {matchLabels: {app: web}}, ingress: []}
    probes:
      - {from: default/client, to: default/web, port: 80, expect: deny}
      - {from: default/web, to: default/client, port: 80, expect: allow}
"#;

#[test]
fn the_repository_scenarios_pass() {
    let (code, out) = run(&[&workspace().join("tests/scenarios")]);
    assert_eq!(code, 0, "{out}");
    let last = out.lines().last().unwrap();
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
}

#[test]
fn flipped_expectations_fail_the_check() {
    let dir = TempDir::new("flip");
    let good = dir.0.join("good.yaml");
    std::fs::write(&good, WEB_DENY_ALL).unwrap();
    let (code, out) = run(&[&good]);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("3 passed, 0 failed\n"), "{out}");

    let flipped = WEB_DENY_ALL
        .replace("expect: allow", "expect: TMP")
        .replace("expect: deny", "expect: allow")
        .replace("expect: TMP", "expect: deny");
    std::fs::write(&good, flipped).unwrap();
    let (code, out) = run(&[&good]);
    assert_eq!(code, 1, "{out}");
    for (expected, got) in [("deny", "allow"), ("allow", "deny")] {
        let line =
            format!("FAIL default/client -> default/web 80/TCP: expected {expected}, got {got}");
        assert!(out.contains(&line), "{out}");
    }
    assert!(
        out.contains("knp.default.web-deny-all") || out.contains("default.web-deny-all"),
        "the failure says which policy decided: {out}"
    );
    assert!(out.ends_with("0 passed, 3 failed\n"), "{out}");
}

#[test]
fn bad_input_is_named_and_the_rest_still_runs() {
    let dir = TempDir::new("bad");
    std::fs::write(dir.0.join("a-good.yaml"), WEB_DENY_ALL).unwrap();
    let policy = |spec: &str| {
        format!(
            "name: bad\nobjects:\n  - {{apiVersion: v1, kind: Namespace, metadata: {{name: ns}}}}\n  - apiVersion: networking.k8s.io/v1\n    kind: NetworkPolicy\n    metadata: {{name: broken, namespace: ns}}\n    spec: {spec}\nprobes: []\n"
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("b-yaml", "name: x\nobjects: [\n".into(), "b-yaml.yaml"),
        (
            "c-kind",
            "name: c\nobjects:\n  - {apiVersion: v1, kind: Service, metadata: {name: svc}}\n".into(),
            "v1/Service \"svc\": unsupported kind",
        ),
        ("d-cidr", policy("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 198.18.0.0/99}}]}]}"), "NetworkPolicy ns/broken is rejected (spec.ingress[0].from[0]: ipBlock.cidr: \"198.18.0.0/99\" is not a valid CIDR"),
        ("e-port0", policy("{podSelector: {}, ingress: [{ports: [{port: 0}]}]}"), "NetworkPolicy ns/broken is rejected (spec.ingress[0].ports[0]: port 0 out of range 1-65535"),
        ("f-port65536", policy("{podSelector: {}, egress: [{ports: [{port: 65536}]}]}"), "NetworkPolicy ns/broken is rejected (spec.egress[0].ports[0]: port 65536 out of range 1-65535"),
        ("g-endport", policy("{podSelector: {}, ingress: [{ports: [{port: 8080, endPort: 8000}]}]}"), "endPort 8000 is below port 8080"),
        ("h-selector", policy("{podSelector: {matchLabels: {'bad key!': x}}}"), "NetworkPolicy ns/broken: spec.podSelector: invalid label key \"bad key!\""),
        (
            "i-calico-selector",
            "name: i\nobjects:\n  - {apiVersion: projectcalico.org/v3, kind: GlobalNetworkPolicy, metadata: {name: g}, spec: {selector: \"app == 'x' &&\"}}\n".into(),
            "GlobalNetworkPolicy g: spec.selector: invalid selector \"app == 'x' &&\": unexpected end of input",
        ),
    ];
    for (name, text, _) in &cases {
        std::fs::write(dir.0.join(format!("{name}.yaml")), text).unwrap();
    }
    let (code, out) = run(&[&dir.0]);
    assert_eq!(code, 1, "{out}");
    for (name, _, want) in &cases {
        let line = out
            .lines()
            .find(|l| l.starts_with("ERROR") && l.contains(&format!("{name}.yaml")))
            .unwrap_or_else(|| panic!("no error line for {name}: {out}"));
        assert!(line.contains(want), "{name}: want {want:?} in {line:?}");
    }
    // The good scenario ran; every bad file counts as one failure.
    assert!(out.contains("ok   web-deny-all-copy"), "{out}");
    assert!(
        out.ends_with(&format!("3 passed, {} failed\n", cases.len())),
        "{out}"
    );
}

#[test]
fn a_missing_path_is_an_error() {
    let (code, out) = run(&[Path::new("/nonexistent/scenarios")]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("/nonexistent/scenarios: no such file or directory"),
        "{out}"
    );
}

#[test]
fn an_unreadable_datastore_or_empty_node_is_refused() {
    let out = nftpolicy()
        .args(["render", "--node", "node1", "/nonexistent/manifests"])
        .output()
        .unwrap();
    testkit::assert_refused(&out, 2, "/nonexistent/manifests: no such file or directory");
    assert!(out.stdout.is_empty(), "no ruleset is printed");
    let out = nftpolicy()
        .args(["render", "--node", "", "/tmp"])
        .env_remove("NFTPOLICY_NODE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must not be empty"));
}
