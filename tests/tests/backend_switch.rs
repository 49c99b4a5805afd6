//! Switching a live node between backends (`nftpolicy sync --once
//! --backend iptables`, then back to `--backend nftables`) never opens a
//! gap: while the switch runs, probes keep going, and every allowed
//! connection works and every denied one stays denied. After each switch
//! only the new backend's state is left in the kernel.
//!
//! Needs root (network namespaces).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lab::Lab;

mod common;

// The seed web-deny-all state: web (node1) takes no ingress; client
// (node2) is unrestricted. So client → web is denied (TCP and UDP) and
// web → client allowed.
// The scenario: tests/tests/scenarios/backend-switch.yaml.

const NODES: [&str; 2] = ["node1", "node2"];
/// Probe rounds that must complete after each switch before the next.
const ROUNDS_BETWEEN: usize = 3;
/// Generous: the machine may be busy; this bounds a hung test, it is not a
/// timing assertion.
const SWITCH_DEADLINE: Duration = Duration::from_secs(120);

/// Runs a command inside a node namespace; its stdout, or a panic with its
/// output.
fn in_netns(netns: &str, program: &Path, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} in {netns}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} in {netns} failed ({}):\n{}{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What each backend left in a node: (nftables tables of ours, iptables
/// lines naming cali- chains in either family, cali ipsets).
#[derive(Debug)]
struct Leftovers {
    nft_tables: Vec<String>,
    iptables_lines: Vec<String>,
    ipsets: Vec<String>,
}

fn leftovers(netns: &str) -> Leftovers {
    let nft_tables = in_netns(netns, Path::new("nft"), &["list", "tables"])
        .lines()
        .filter(|l| l.contains("nftpolicy"))
        .map(str::to_owned)
        .collect();
    let mut iptables_lines = Vec::new();
    for save in ["iptables-legacy-save", "ip6tables-legacy-save"] {
        iptables_lines.extend(
            in_netns(netns, Path::new(save), &[])
                .lines()
                .filter(|l| l.contains("cali-"))
                .map(|l| format!("{save}: {l}")),
        );
    }
    let ipsets = in_netns(netns, Path::new("ipset"), &["list", "-n"])
        .lines()
        .filter(|l| l.starts_with("cali"))
        .map(str::to_owned)
        .collect();
    Leftovers {
        nft_tables,
        iptables_lines,
        ipsets,
    }
}

struct Switcher {
    nftpolicy: PathBuf,
    datastore: PathBuf,
    /// (node name, node namespace).
    nodes: Vec<(String, String)>,
    rounds: Arc<AtomicUsize>,
}

impl Switcher {
    /// `nftpolicy sync --once --backend <backend>` on every node, one after
    /// the other (so probes also see one node switched and one not).
    fn switch_to(&self, backend: &str) {
        for (node, netns) in &self.nodes {
            in_netns(
                netns,
                &self.nftpolicy,
                &[
                    "sync",
                    "--once",
                    "--node",
                    node,
                    "--datastore",
                    &format!("file:{}", self.datastore.display()),
                    "--backend",
                    backend,
                ],
            );
        }
    }

    /// Waits until the prober has finished `n` more full rounds.
    fn wait_rounds(&self, n: usize) {
        let target = self.rounds.load(Ordering::SeqCst) + n + 1;
        let deadline = Instant::now() + SWITCH_DEADLINE;
        while self.rounds.load(Ordering::SeqCst) < target {
            assert!(
                Instant::now() < deadline,
                "the prober stopped making rounds"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn switching_backends_live_never_opens_or_closes_a_connection() {
    let scenario = common::scenario("backend-switch");
    let state = scenario.states().unwrap().remove(0);
    let probes: Vec<_> = scenario.steps[0]
        .probes
        .iter()
        .map(|p| state.resolve_probe(p, &scenario.externals).unwrap())
        .collect();
    let mut lab = Lab::build(&state.pods(), &scenario.externals, &NODES).expect("lab builds");
    let nftpolicy = lab::nftpolicy_binary();
    let datastore = lab.workdir().join("state");
    lab::write_state(&datastore, &state).unwrap();
    lab.program_nodes(&datastore, &nftpolicy, "nftables", Duration::from_secs(60))
        .expect("nodes programmed with nftables");

    let switcher = Switcher {
        nftpolicy,
        datastore,
        nodes: NODES
            .iter()
            .map(|n| (n.to_string(), lab.node_namespace(n).unwrap().to_owned()))
            .collect(),
        rounds: Arc::new(AtomicUsize::new(0)),
    };
    let rounds = switcher.rounds.clone();
    let done = Arc::new(AtomicBool::new(false));
    let switch_done = done.clone();
    // The switches run beside the prober; the lab (and its probes) stay on
    // this thread.
    let switching = std::thread::spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut seen = Vec::new();
            switcher.wait_rounds(1);
            switcher.switch_to("iptables");
            for (node, netns) in &switcher.nodes {
                seen.push((
                    format!("{node} after switching to iptables"),
                    leftovers(netns),
                ));
            }
            switcher.wait_rounds(ROUNDS_BETWEEN);
            switcher.switch_to("nftables");
            for (node, netns) in &switcher.nodes {
                seen.push((
                    format!("{node} after switching back to nftables"),
                    leftovers(netns),
                ));
            }
            switcher.wait_rounds(ROUNDS_BETWEEN);
            seen
        }));
        switch_done.store(true, Ordering::SeqCst);
        result
    });

    // Every round: every probe, every result recorded.
    let mut record = Vec::new();
    while !done.load(Ordering::SeqCst) {
        let results = lab.probe_all(&probes).expect("probes run");
        let round = rounds.load(Ordering::SeqCst);
        for (p, r) in probes.iter().zip(results) {
            record.push((round, p.probe.clone(), r));
        }
        rounds.fetch_add(1, Ordering::SeqCst);
    }
    let seen = match switching.join().expect("switcher thread") {
        Ok(seen) => seen,
        Err(panic) => std::panic::resume_unwind(panic),
    };

    let wrong: Vec<String> = record
        .iter()
        .filter(|(_, p, r)| r.allowed != Some(p.expect_allow))
        .map(|(round, p, r)| {
            format!(
                "round {round}: {p}: expected {}, got {:?} ({})",
                model::scenario::verdict_word(p.expect_allow),
                r.allowed,
                r.detail
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "during the backend switches {} of {} probes went wrong:\n{}",
        wrong.len(),
        record.len(),
        wrong.join("\n")
    );
    let total_rounds = rounds.load(Ordering::SeqCst);
    assert!(
        total_rounds > 2 * ROUNDS_BETWEEN,
        "only {total_rounds} rounds"
    );

    for (when, left) in &seen {
        if when.contains("iptables") {
            assert!(
                left.nft_tables.is_empty(),
                "{when}: nftables tables remain: {left:?}"
            );
            assert!(
                !left.iptables_lines.is_empty(),
                "{when}: no iptables chains: {left:?}"
            );
        } else {
            assert!(
                left.iptables_lines.is_empty() && left.ipsets.is_empty(),
                "{when}: iptables state remains: {left:?}"
            );
            assert_eq!(
                left.nft_tables.len(),
                2,
                "{when}: ip and ip6 nftpolicy tables: {left:?}"
            );
        }
    }
}
