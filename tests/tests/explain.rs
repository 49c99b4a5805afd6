//! `nftpolicy explain --kernel` against a real node: the kernel's trace of
//! a real connection must walk the model's chain path, in order, and reach
//! the model's verdict — for an ingress deny-all (end of tier), an egress
//! deny-all, an allowed connection, and a Calico tier that passes one
//! client on and drops the rest at its end. And `--log-denied` must send an
//! NFLOG record naming the denying policy.
//!
//! These tests need root (they create network namespaces).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lab::{netns, write_state, Lab};
use model::scenario::{ResolvedProbe, StepState};

mod common;

// All pods on node1, so one node sees both directions of every packet:
// web denies all ingress, locked denies all egress, client is free.
// The scenario: tests/tests/scenarios/explain-kernel.yaml.

const LOG_GROUP: u16 = 7;

fn ip() -> PathBuf {
    netns::find_tool("ip").expect("iproute2's ip")
}

struct Fixture {
    lab: Lab,
    probes: Vec<ResolvedProbe>,
    datastore: PathBuf,
    bin: PathBuf,
}

/// Builds the lab and programs node1 with `sync --once --log-denied`.
fn fixture() -> Fixture {
    fixture_with(&[])
}

/// [`fixture`] with more `sync` arguments.
fn fixture_with(extra: &[&str]) -> Fixture {
    fixture_of("explain-kernel", extra)
}

/// Node1 of scenario `name` (`tests/tests/scenarios`), programmed with
/// `sync --once --log-denied` and `extra`.
fn fixture_of(name: &str, extra: &[&str]) -> Fixture {
    let scenario = common::scenario(name);
    let state: StepState = scenario.states().unwrap().remove(0);
    let lab = Lab::build(&state.pods(), &scenario.externals, &["node1"]).expect("lab builds");
    let datastore = lab.workdir().join("state");
    write_state(&datastore, &state).expect("state written");
    let bin = lab::nftpolicy_binary();
    let mut sync = Command::new(ip());
    sync.args(["netns", "exec", lab.node_namespace("node1").unwrap()])
        .arg(&bin)
        .args(["sync", "--once", "--node", "node1", "--log-denied"])
        .args(["--log-group", &LOG_GROUP.to_string()])
        .args(extra)
        .arg(format!("--datastore=file:{}", datastore.display()));
    testkit::output_ok(&mut sync, "nftpolicy sync");
    let probes = scenario.steps[0]
        .probes
        .iter()
        .map(|p| state.resolve_probe(p, &scenario.externals).unwrap())
        .collect();
    Fixture {
        lab,
        probes,
        datastore,
        bin,
    }
}

/// What `explain --kernel` printed and how it exited.
struct Explained {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Explained {
    /// The model's chain paths (the line after each `egress`/`ingress`
    /// verdict line), as chain lists with their verdict.
    fn model_paths(&self) -> Vec<(Vec<String>, String)> {
        let lines: Vec<&str> = self.stdout.lines().collect();
        lines
            .windows(2)
            .filter(|w| {
                (w[0].starts_with("egress ") || w[0].starts_with("ingress "))
                    && !w[0].contains("no policy applies")
            })
            .map(|w| split_path(w[1].trim()))
            .collect()
    }

    /// The kernel's chain list and verdict.
    fn kernel_path(&self) -> (Vec<String>, String) {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with("kernel  ") && l.contains(" → "))
            .unwrap_or_else(|| panic!("no kernel path in:\n{}\n{}", self.stdout, self.stderr));
        split_path(line.trim_start_matches("kernel").trim())
    }
}

fn split_path(line: &str) -> (Vec<String>, String) {
    let mut parts: Vec<String> = line.split(" → ").map(str::to_owned).collect();
    let verdict = parts.pop().expect("a path has a verdict");
    (parts, verdict)
}

/// Runs `explain --kernel` in node1's namespace, starts `probe` once the
/// trace rule is in place, and returns what explain printed.
fn explain(f: &mut Fixture, probe: &ResolvedProbe) -> Explained {
    let p = &probe.probe;
    let port = format!("{}/{}", probe.port, p.protocol);
    let mut child = Command::new(ip())
        .args(["netns", "exec", f.lab.node_namespace("node1").unwrap()])
        .arg(&f.bin)
        .args(["explain", "--kernel", "--node", "node1", "--wait", "60"])
        .args(["--from", &p.from.to_string(), "--to", &p.to.to_string()])
        .args(["--port", &port])
        .arg(format!("--datastore=file:{}", f.datastore.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running nftpolicy explain --kernel");
    let stderr = child.stderr.take().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let stderr_reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("tracing:") {
                let _ = ready_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // The trace rule is in place once explain says so (or it failed).
    let ready = ready_rx.recv_timeout(Duration::from_secs(60)).is_ok();
    if ready {
        f.lab.probe(probe).expect("probe runs");
    }
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    let stderr = stderr_reader.join().unwrap();
    assert!(
        ready,
        "explain --kernel never got ready:\n{stdout}\n{stderr}"
    );
    Explained {
        code: status.code(),
        stdout,
        stderr,
    }
}

/// The kernel's chain list contains the model's chains in the same order
/// (egress, then ingress unless egress denied) and the verdicts agree.
fn assert_agree(e: &Explained, expect_verdict: &str) {
    let model = e.model_paths();
    assert!(!model.is_empty(), "no model path in:\n{}", e.stdout);
    let mut expected_chains = Vec::new();
    let mut model_verdict = "accept".to_owned();
    for (chains, verdict) in model {
        expected_chains.extend(chains);
        if verdict == "drop" {
            model_verdict = verdict;
            break;
        }
    }
    let (kernel_chains, kernel_verdict) = e.kernel_path();
    let mut rest = kernel_chains.iter();
    for c in &expected_chains {
        assert!(
            rest.any(|k| k == c),
            "model chain {c} missing (or out of order) in kernel path {kernel_chains:?}\n{}",
            e.stdout
        );
    }
    assert_eq!(model_verdict, expect_verdict, "{}", e.stdout);
    assert_eq!(kernel_verdict, expect_verdict, "{}", e.stdout);
    let code = if expect_verdict == "accept" { 0 } else { 1 };
    assert_eq!(e.code, Some(code), "{}\n{}", e.stdout, e.stderr);
    assert!(e.stdout.contains("\nagree "), "{}", e.stdout);
}

/// Explains `probe`: model and kernel agree it is dropped, and the kernel's
/// path went through `chain`. The explanation and that path.
fn dropped_after(f: &mut Fixture, probe: &ResolvedProbe, chain: &str) -> (Explained, Vec<String>) {
    let e = explain(f, probe);
    assert_agree(&e, "drop");
    let (kernel, _) = e.kernel_path();
    assert!(kernel.iter().any(|c| c == chain), "{}", e.stdout);
    (e, kernel)
}

#[test]
fn kernel_trace_agrees_with_the_model() {
    let mut f = fixture();
    let probes = f.probes.clone();

    // Ingress deny-all: dropped at the end of web's tier, after the policy.
    let (e, _) = dropped_after(&mut f, &probes[0], "cali-pi-default.web-deny-all");
    assert!(
        e.stdout.contains("End of tier default"),
        "the dropping rule's comment is shown:\n{}",
        e.stdout
    );

    // Egress deny-all: dropped in locked's cali-fw- chain; ingress never runs.
    let policy = "cali-po-default.locked-egress-deny-all";
    let (e, kernel) = dropped_after(&mut f, &probes[1], policy);
    assert!(
        !kernel.iter().any(|c| c.starts_with("cali-tw-")),
        "{}",
        e.stdout
    );

    // Allowed, TCP and UDP: both directions' profiles accept.
    for probe in &probes[2..4] {
        let e = explain(&mut f, probe);
        assert_agree(&e, "accept");
    }

    // Tier security passes client: the kernel walks the tier's policy and
    // goes on to the profile, which accepts.
    let guard = "cali-pi-gnp/security.guard";
    let e = explain(&mut f, &probes[4]);
    assert_agree(&e, "accept");
    assert!(e.kernel_path().0.iter().any(|c| c == guard), "{}", e.stdout);
    // Anyone else is dropped at the end of tier security, after its policy.
    let (e, _) = dropped_after(&mut f, &probes[5], guard);
    assert!(
        e.stdout.contains("End of tier security"),
        "the dropping rule's comment is shown:\n{}",
        e.stdout
    );
}

/// Under `--fused-lookup` a policy fused into a set lookup has no chain on
/// the kernel's path: explain names it and still compares the rest — the
/// endpoint chains, the policies that did not fuse, the verdict.
#[test]
fn kernel_trace_agrees_under_fused_lookup() {
    let mut f = fixture_with(&["--fused-lookup"]);
    let probes = f.probes.clone();
    let agreed = |e: &Explained, code: i32| {
        assert_eq!(e.code, Some(code), "{}\n{}", e.stdout, e.stderr);
        assert!(e.stdout.contains("\nagree "), "{}", e.stdout);
    };

    // web's deny-all fuses to nothing: dropped at the end of its tier.
    let e = explain(&mut f, &probes[0]);
    agreed(&e, 1);
    assert!(
        e.stdout
            .contains("not walked: cali-pi-default.web-deny-all")
            && e.stdout.contains("End of tier default"),
        "{}",
        e.stdout
    );
    // Allowed by the profiles: nothing fused on the way.
    let e = explain(&mut f, &probes[2]);
    agreed(&e, 0);
    // security.guard has a Pass rule: it keeps its chain, walked.
    let e = explain(&mut f, &probes[4]);
    agreed(&e, 0);
    assert!(
        e.kernel_path()
            .0
            .iter()
            .any(|c| c == "cali-pi-gnp/security.guard"),
        "{}",
        e.stdout
    );
}

/// With `--table-groups 2` every packet walks two tables of ours, one per
/// group (here all pods share a namespace, so one table's dispatch maps
/// return them all): explain waits for the walk through both, shows each
/// event's table, and still agrees with the model.
#[test]
fn kernel_trace_agrees_with_table_groups() {
    let mut f = fixture_with(&["--table-groups", "2"]);
    let probes = f.probes.clone();
    let (e, _) = dropped_after(&mut f, &probes[0], "cali-pi-default.web-deny-all");
    for probe in &probes[2..4] {
        assert_agree(&explain(&mut f, probe), "accept");
    }
    // An accepted packet ends in both tables.
    let e2 = explain(&mut f, &probes[2]);
    for table in ["nftpolicy-g0", "nftpolicy-g1"] {
        assert!(e2.stdout.contains(table), "{table} in:\n{}", e2.stdout);
    }
    assert!(e.stdout.contains("End of tier default"), "{}", e.stdout);
}

/// Pods of two namespace groups on one node: the packet crosses from the
/// sender's group table to the receiver's, and the model's egress and
/// ingress chains are found in the two tables whatever order the kernel
/// walks them in.
#[test]
fn kernel_trace_agrees_between_two_table_groups() {
    let mut f = fixture_of("explain-kernel-groups", &["--table-groups", "2"]);
    let probes = f.probes.clone();
    for (i, (probe, verdict)) in probes.iter().zip(["accept", "drop", "accept"]).enumerate() {
        let e = explain(&mut f, probe);
        assert_agree_across_tables(&e, verdict);
        // client -> server: both pods' policies apply. Allowed, both are
        // walked, each in its own table; dropped, by whichever table the
        // kernel walks first (both directions deny port 81).
        let (kernel, _) = e.kernel_path();
        let pi = kernel.iter().any(|c| c.starts_with("cali-pi-"));
        let po = kernel.iter().any(|c| c.starts_with("cali-po-"));
        let walked = match i {
            0 => pi && po,
            1 => pi || po,
            _ => true,
        };
        assert!(walked, "policies walked:\n{}", e.stdout);
    }
}

/// Like [`assert_agree`] across two tables: each direction's chains
/// appear in order in the kernel's path (the tables' order is the
/// kernel's); for a dropped packet, at least the direction that dropped it
/// (its table may come first, and the other is then never walked).
fn assert_agree_across_tables(e: &Explained, expect_verdict: &str) {
    let (kernel_chains, kernel_verdict) = e.kernel_path();
    let walked = |chains: &[String]| {
        let mut rest = kernel_chains.iter();
        chains
            .iter()
            .filter(|c| *c != "cali-FORWARD")
            .all(|c| rest.any(|k| k == c))
    };
    let paths = e.model_paths();
    assert_eq!(
        paths.len(),
        2,
        "both directions are on node1:\n{}",
        e.stdout
    );
    let agree = if expect_verdict == "accept" {
        paths
            .iter()
            .all(|(chains, v)| v == "accept" && walked(chains))
    } else {
        paths
            .iter()
            .any(|(chains, v)| v == "drop" && walked(chains))
    };
    assert!(
        agree,
        "model {paths:?}, kernel {kernel_chains:?}:\n{}",
        e.stdout
    );
    assert_eq!(kernel_verdict, expect_verdict, "{}", e.stdout);
    let code = if expect_verdict == "accept" { 0 } else { 1 };
    assert_eq!(e.code, Some(code), "{}\n{}", e.stdout, e.stderr);
    assert!(e.stdout.contains("\nagree "), "{}", e.stdout);
}

#[test]
fn explain_kernel_in_iptables_mode_says_it_is_nftables_only() {
    let dir = tempdir_with_state();
    let out2 = Command::new(lab::nftpolicy_binary())
        .args(["explain", "--kernel", "--backend", "iptables"])
        .args(["--from", "198.18.1.1", "--to", "198.18.1.2", "--port", "80"])
        .arg(format!("--datastore=file:{}", dir.display()))
        .output()
        .unwrap();
    testkit::assert_refused(&out2, 2, "kernel tracing is nftables-only");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempdir_with_state() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nftpolicy-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("ns.yaml"),
        "{apiVersion: v1, kind: Namespace, metadata: {name: default}}\n",
    )
    .unwrap();
    dir
}

#[test]
fn log_denied_sends_an_nflog_record_naming_the_policy() {
    let mut f = fixture();
    let node_ns = Path::new("/run/netns").join(f.lab.node_namespace("node1").unwrap());
    let probe = f.probes[0].clone();
    let (client, web) = (probe.src, probe.dst);
    let (ready_tx, ready_rx) = mpsc::channel();
    // The listener lives on a thread of its own inside node1's namespace.
    let listener = std::thread::spawn(move || {
        let ns = std::fs::File::open(&node_ns).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut nflog = programmer::nflog::NflogListener::bind(LOG_GROUP, 128).unwrap();
        ready_tx.send(()).unwrap();
        let mut seen = Vec::new();
        // Until the denied SYN's record arrives (bounded: the probe's
        // retransmissions keep coming for its whole timeout).
        for _ in 0..50 {
            let records = nflog.next_records(Duration::from_secs(2)).unwrap();
            let done = records.iter().any(|r| r.addresses() == Some((client, web)));
            seen.extend(records);
            if done {
                break;
            }
        }
        seen
    });
    ready_rx.recv().unwrap();
    let result = f.lab.probe(&probe).unwrap();
    assert_eq!(result.allowed, Some(false), "{}", result.detail);
    let records = listener.join().unwrap();
    let ours: Vec<_> = records
        .iter()
        .filter(|r| r.addresses() == Some((client, web)))
        .collect();
    assert!(
        !ours.is_empty(),
        "no NFLOG record for {client} -> {web}: {records:?}"
    );
    assert!(
        ours.iter()
            .all(|r| r.prefix.starts_with("DROP ") && r.prefix.contains("default.web-deny-all")),
        "{ours:?}"
    );
}
