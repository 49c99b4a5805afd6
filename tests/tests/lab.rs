//! The kernel lab on its own, with unprogrammed nodes (everything allowed):
//! connectivity of every kind, that the checker can say deny, and that no
//! namespace outlives the lab — after drop, a panic, or Ctrl-C.
//!
//! These tests need root (they create network namespaces).

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lab::{netns, run_scenario, E2eOptions, Lab};
use model::calico::Protocol;

mod common;
use model::scenario::{
    collect_files, Family, Probe, ProbeEnd, ProbePort, ResolvedProbe, Scenario, StepState,
};

// Four dual-stack pods (web and db on node1, api and cache on node2, by
// order of appearance) and one external host beside node1.
// The scenario: tests/tests/scenarios/lab-test.yaml.

fn fixture() -> (Scenario, StepState) {
    let scenario = common::scenario("lab-test");
    let state = scenario.states().unwrap().remove(0);
    (scenario, state)
}

fn build(scenario: &Scenario, state: &StepState) -> Lab {
    Lab::build(&state.pods(), &scenario.externals, &["node1", "node2"]).expect("lab builds")
}

fn resolved(scenario: &Scenario, state: &StepState) -> Vec<ResolvedProbe> {
    scenario.steps[0]
        .probes
        .iter()
        .map(|p| state.resolve_probe(p, &scenario.externals).unwrap())
        .collect()
}

/// Lab namespaces currently mounted whose name starts with `prefix`.
fn mounted_with(prefix: &str) -> Vec<String> {
    netns::list_lab_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn ip(args: &[&str]) -> String {
    let out = Command::new(netns::find_tool("ip").expect("iproute2"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A probe the scenario loader would refuse (an undeclared port), built by
/// hand from a resolved one.
fn to_port(base: &ResolvedProbe, port: u16, protocol: Protocol) -> ResolvedProbe {
    let mut p = base.clone();
    p.port = port;
    p.probe.port = ProbePort::Number(port);
    p.probe.protocol = protocol;
    p.probe.expect_allow = false;
    p
}

#[test]
fn unprogrammed_lab_allows_every_probe() {
    let (scenario, state) = fixture();
    let mut lab = build(&scenario, &state);
    let probes = resolved(&scenario, &state);
    let started = Instant::now();
    let results = lab.probe_all(&probes).unwrap();
    for (p, r) in probes.iter().zip(&results) {
        assert_eq!(r.allowed, Some(true), "{}: {}", p.probe, r.detail);
    }
    // (How long they took is printed, not asserted: timings are noisy here.)
    eprintln!("allowed probes took {:?}", started.elapsed());
    // Same node and cross node, both families, both protocols, external
    // both ways: the fixture covers them all.
    let node_of = |end: &ProbeEnd| match end {
        ProbeEnd::Pod { name, .. } => state
            .pods()
            .into_iter()
            .find(|p| &p.name == name)
            .map(|p| p.node),
        ProbeEnd::External(_) => None,
        ProbeEnd::Node(n) => Some(n.clone()),
    };
    let same_node = probes.iter().any(|p| {
        node_of(&p.probe.from).is_some() && node_of(&p.probe.from) == node_of(&p.probe.to)
    });
    let cross_node = probes.iter().any(|p| {
        node_of(&p.probe.from).is_some()
            && node_of(&p.probe.to).is_some()
            && node_of(&p.probe.from) != node_of(&p.probe.to)
    });
    assert!(same_node && cross_node);
    assert!(probes.iter().any(|p| p.probe.family == Family::V6));
    assert!(probes.iter().any(|p| p.probe.protocol == Protocol::Udp));
    assert_eq!(lab.namespaces().len(), 2 + 4 + 1);
}

#[test]
fn lab_is_wired_like_calico() {
    let (scenario, state) = fixture();
    let lab = build(&scenario, &state);
    for pod in state.pods() {
        let node_ns = lab.node_namespace(&pod.node).unwrap();
        let pod_ns = lab.pod_namespace(&pod.namespace, &pod.name).unwrap();
        // The node end carries Calico's interface name; host routes point
        // at it; the node answers ARP for the pod's peers.
        let link = ip(&["-n", node_ns, "-o", "link", "show", &pod.interface]);
        assert!(link.contains(&pod.interface), "{link}");
        let routes = ip(&["-n", node_ns, "route", "show", "dev", &pod.interface]);
        assert!(routes.contains(&format!("{}", pod.ips[0])), "{routes}");
        // The pod routes the test ranges only: no default route anywhere.
        for family in ["-4", "-6"] {
            let routes = ip(&["-n", pod_ns, family, "route"]);
            assert!(!routes.contains("default"), "{routes}");
        }
        let addrs = ip(&["-n", pod_ns, "-o", "addr", "show", "dev", "eth0"]);
        for addr in &pod.ips {
            let want = match addr {
                IpAddr::V4(a) => format!("{a}/32"),
                IpAddr::V6(a) => format!("{a}/128"),
            };
            assert!(addrs.contains(&want), "{addrs}");
        }
    }
    for node in ["node1", "node2"] {
        let ns = lab.node_namespace(node).unwrap();
        for family in ["-4", "-6"] {
            let routes = ip(&["-n", ns, family, "route"]);
            assert!(!routes.contains("default"), "{node}: {routes}");
        }
        // The external host hangs off node1 by an interface that is not
        // a pod's.
        let links = ip(&["-n", ns, "-o", "link"]);
        assert_eq!(links.contains("ext0"), node == "node1", "{links}");
    }
}

#[test]
fn probes_can_be_denied() {
    let (scenario, state) = fixture();
    let mut lab = build(&scenario, &state);
    lab.set_probe_timeout(Duration::from_millis(700));
    let probes = resolved(&scenario, &state);
    // Nobody serves these ports: TCP is reset, UDP draws a port
    // unreachable; both fail at once.
    let refused = vec![
        to_port(&probes[0], 5433, Protocol::Tcp),
        to_port(&probes[1], 5433, Protocol::Tcp),
        to_port(&probes[2], 6380, Protocol::Udp),
        to_port(&probes[3], 6380, Protocol::Udp),
        to_port(&probes[10], 81, Protocol::Tcp),
    ];
    for (p, r) in refused.iter().zip(lab.probe_all(&refused).unwrap()) {
        assert_eq!(r.allowed, Some(false), "{}: {}", p.probe, r.detail);
        assert!(r.elapsed < Duration::from_millis(500), "{}: {r:?}", p.probe);
    }

    // A destination that silently drops (its eth0 is down, so the node's
    // veth swallows packets) fails by timeout; the probes run at once, so
    // six of them take one timeout, not six.
    let db = lab.pod_namespace("shop", "db").unwrap().to_owned();
    ip(&["-n", &db, "link", "set", "eth0", "down"]);
    let silent: Vec<ResolvedProbe> = probes
        .iter()
        .filter(|p| matches!(&p.probe.to, ProbeEnd::Pod { name, .. } if name == "db"))
        .cloned()
        .chain(std::iter::repeat_n(probes[0].clone(), 3))
        .collect();
    assert_eq!(silent.len(), 6);
    let started = Instant::now();
    let results = lab.probe_all(&silent).unwrap();
    let took = started.elapsed();
    for (p, r) in silent.iter().zip(&results) {
        assert_eq!(r.allowed, Some(false), "{}: {}", p.probe, r.detail);
        assert!(r.detail.contains("no answer within"), "{}", r.detail);
    }
    assert!(
        took < Duration::from_millis(1400),
        "6 timeouts took {took:?}"
    );
}

#[test]
fn probe_from_or_to_an_unknown_endpoint_is_an_error() {
    let (scenario, state) = fixture();
    let mut lab = build(&scenario, &state);
    let mut p = resolved(&scenario, &state).remove(0);
    p.probe.from = ProbeEnd::Pod {
        namespace: "shop".into(),
        name: "ghost".into(),
    };
    assert!(lab.probe(&p).is_err());
    let mut p = resolved(&scenario, &state).remove(0);
    p.dst = "198.18.250.1".parse().unwrap();
    assert!(lab.probe(&p).is_err());
}

#[test]
fn namespaces_are_removed_on_drop() {
    let (scenario, state) = fixture();
    let lab = build(&scenario, &state);
    let prefix = lab.prefix().to_owned();
    let names = lab.namespaces();
    assert_eq!(mounted_with(&prefix), names);
    drop(lab);
    assert_eq!(mounted_with(&prefix), Vec::<String>::new());
}

#[test]
fn namespaces_are_removed_after_a_panic() {
    let (scenario, state) = fixture();
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = build(&scenario, &state);
        *prefix.lock().unwrap() = lab.prefix().to_owned();
        assert!(!mounted_with(lab.prefix()).is_empty());
        panic!("a test failing while the lab is up");
    }));
    assert!(result.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert_eq!(mounted_with(&prefix), Vec::<String>::new());
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed() {
    // A pid that surely belongs to nobody now: a child that has exited.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let name = format!("nplab{dead}-0-stale");
    ip(&["netns", "add", &name]);
    // A live process's namespaces are not touched.
    let live = format!("nplab{}-999999-live", std::process::id());
    ip(&["netns", "add", &live]);
    let removed = netns::remove_stale();
    let mounted = netns::list_lab_namespaces();
    ip(&["netns", "del", &live]);
    // Removed by this call, or by a lab being built concurrently (every
    // build sweeps first).
    assert!(!mounted.contains(&name), "{removed:?}");
    assert!(mounted.contains(&live));
}

#[test]
fn three_nodes_share_a_bridge_and_one_node_works_alone() {
    let text = r#"
name: three-nodes
objects:
  - {apiVersion: v1, kind: Namespace, metadata: {name: ns}}
  - {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: ns}, spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80}]}]}}
  - {apiVersion: v1, kind: Pod, metadata: {name: b, namespace: ns}, spec: {nodeName: node2, containers: [{name: c, ports: [{containerPort: 80}]}]}}
  - {apiVersion: v1, kind: Pod, metadata: {name: c, namespace: ns}, spec: {nodeName: node3, containers: [{name: c, ports: [{containerPort: 80, protocol: UDP}]}]}}
probes:
  - {from: ns/a, to: ns/c, port: 80, protocol: UDP, expect: allow}
  - {from: ns/b, to: ns/c, port: 80, protocol: UDP, family: IPv6, expect: allow}
  - {from: ns/c, to: ns/a, port: 80, expect: allow}
  - {from: ns/c, to: ns/b, port: 80, family: IPv6, expect: allow}
"#;
    let scenario = Scenario::parse("three-nodes.yaml", text).unwrap();
    // run_scenario adds node3 (named by a pod) to the standard two.
    let outcomes = run_scenario(&scenario, &unprogrammed()).unwrap();
    assert_eq!(outcomes.len(), 4);
    for o in &outcomes {
        assert!(o.passed(), "{}: {:?}", o.probe, o.detail);
    }

    let state = &scenario.states().unwrap()[0];
    let pods: Vec<_> = state
        .pods()
        .into_iter()
        .map(|mut p| {
            p.node = "solo".into();
            p
        })
        .collect();
    let mut lab = Lab::build(&pods, &[], &["solo"]).unwrap();
    let probe = ResolvedProbe {
        probe: Probe {
            from: ProbeEnd::Pod {
                namespace: "ns".into(),
                name: "c".into(),
            },
            to: ProbeEnd::Pod {
                namespace: "ns".into(),
                name: "a".into(),
            },
            port: ProbePort::Number(80),
            protocol: Protocol::Tcp,
            expect_allow: true,
            family: Family::V4,
        },
        src: pods.iter().find(|p| p.name == "c").unwrap().ips[0],
        dst: pods.iter().find(|p| p.name == "a").unwrap().ips[0],
        port: 80,
        src_pod: None,
        dst_pod: None,
    };
    let r = lab.probe(&probe).unwrap();
    assert_eq!(r.allowed, Some(true), "{}", r.detail);
}

fn unprogrammed() -> E2eOptions {
    let mut opts = E2eOptions::new("/nonexistent/nftpolicy");
    opts.program = false;
    opts
}

/// The fixtures of `tests/lab-fixtures` (no policies; every probe allowed,
/// pods churning between steps) pass end to end on unprogrammed nodes.
#[test]
fn lab_fixtures_pass_unprogrammed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("lab-fixtures");
    let files = collect_files(&[dir]).unwrap();
    assert!(files.len() >= 2);
    for file in files {
        let scenario = Scenario::load(&file).unwrap();
        let started = Instant::now();
        let outcomes = run_scenario(&scenario, &unprogrammed()).unwrap();
        assert!(!outcomes.is_empty());
        for o in &outcomes {
            assert!(
                o.passed(),
                "{} step {}: {}: {:?}",
                scenario.name,
                o.step,
                o.probe,
                o.detail
            );
        }
        // Seconds, not minutes: in practice well under one.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} took {:?}",
            scenario.name,
            started.elapsed()
        );
    }
}

/// Programming runs the given binary in every node namespace and reports
/// its failure with the node and the output.
#[test]
fn programming_failure_is_reported() {
    let (scenario, state) = fixture();
    let lab = build(&scenario, &state);
    let dir = lab.workdir().join("objects");
    lab::write_state(&dir, &state).unwrap();
    // `false` ignores its arguments and fails: stands in for a failing sync.
    let false_bin = netns::find_tool("false").unwrap();
    let err = lab
        .program_nodes(&dir, &false_bin, "nftables", Duration::from_secs(10))
        .unwrap_err();
    let shown = err.to_string();
    assert!(shown.contains("programming node1"), "{shown}");
    assert!(shown.contains("sync --once --node node1"), "{shown}");
    // `true` succeeds on every node.
    let true_bin = netns::find_tool("true").unwrap();
    lab.program_nodes(&dir, &true_bin, "nftables", Duration::from_secs(10))
        .unwrap();
}

/// Ctrl-C while a lab is up: the handler removes its namespaces and the
/// process exits with 130. The lab runs in a child process (this test
/// binary again, running only [`ctrl_c_child`]).
#[test]
fn ctrl_c_removes_the_namespaces() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "ctrl_c_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NPLAB_CTRL_C_CHILD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // The child prints its lab's prefix once the lab is up; a reader thread
    // lets the wait for it have a deadline.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let prefix = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // The harness's "test ctrl_c_child ... " shares the line.
            .find_map(|l| l.split_once("LAB UP ").map(|(_, p)| p.trim().to_owned()));
        let _ = tx.send(prefix);
    });
    let prefix = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Some(prefix)) => prefix,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child did not report its lab: {other:?}");
        }
    };
    assert!(!mounted_with(&prefix).is_empty());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    // `wait` would close the child's stdin first, which ends its wait for
    // the signal; keep it open until the child is gone.
    let stdin = child.stdin.take();
    let status = child.wait().unwrap();
    drop(stdin);
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_eq!(mounted_with(&prefix), Vec::<String>::new());
}

#[test]
#[ignore = "helper of ctrl_c_removes_the_namespaces"]
fn ctrl_c_child() {
    if std::env::var_os("NPLAB_CTRL_C_CHILD").is_none() {
        return;
    }
    let (scenario, state) = fixture();
    let _lab = build(&scenario, &state);
    // Straight to fd 1: the test harness captures `println!`.
    let mut out = std::io::stdout();
    writeln!(out, "LAB UP {}", _lab.prefix()).unwrap();
    out.flush().unwrap();
    // Wait for the signal: stdin never sends anything, and the handler
    // exits the process.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    panic!("the parent should have interrupted us");
}
