//! An agent restart does not open or close anything: with `nftpolicy run`
//! agents over a real etcd, a background thread probes an allowed and a
//! denied connection over and over while web's node loses its agent
//! (SIGKILL, then separately SIGTERM) and gets it back. No allowed probe may
//! fail and no denied probe may pass at any time, the restarted agent must
//! become ready again at the datastore's revision, and (nftables) the
//! policy chain must keep its rules — same handles, counters still
//! counting from where they were — since an unchanged chain is not
//! rewritten.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compiler::nft::TableFamily;
use lab::agents::{in_namespace, write_step};
use lab::{nftpolicy_binary, Agents, EtcdServer, Lab};
use model::scenario::ResolvedProbe;
use nix::sys::signal::Signal;
use programmer::{NftProgrammer, RuleCounter};

mod common;

// The scenario: tests/tests/scenarios/agent-restart.yaml.

const POLICY_CHAIN: &str = "cali-pi-shop.web-from-client";
/// How long the agents may take to apply a revision.
const APPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Probe rounds to see in each phase (agent up, agent gone, agent back).
const ROUNDS_PER_PHASE: usize = 2;

/// The probing thread's findings.
#[derive(Default)]
struct Findings {
    rounds: usize,
    wrong: Vec<String>,
}

struct Prober {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
    handle: std::thread::JoinHandle<(Lab, Findings)>,
}

impl Prober {
    /// Moves the lab to a thread that probes `probes` round after round
    /// until stopped, noting every verdict that differs from the expected.
    fn start(mut lab: Lab, probes: Vec<ResolvedProbe>) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicUsize::new(0));
        let (stop2, rounds2) = (stop.clone(), rounds.clone());
        let handle = std::thread::spawn(move || {
            let mut findings = Findings::default();
            while !stop2.load(Ordering::Relaxed) {
                let started = Instant::now();
                match lab.probe_all(&probes) {
                    Ok(results) => {
                        for (p, r) in probes.iter().zip(results) {
                            if r.allowed != Some(p.probe.expect_allow) {
                                findings.wrong.push(format!(
                                    "round {} (+{:?}): {}: {}",
                                    findings.rounds,
                                    started.elapsed(),
                                    p.probe,
                                    r.detail
                                ));
                            }
                        }
                    }
                    Err(e) => findings
                        .wrong
                        .push(format!("round {}: {e}", findings.rounds)),
                }
                findings.rounds += 1;
                rounds2.fetch_add(1, Ordering::Relaxed);
            }
            (lab, findings)
        });
        Prober {
            stop,
            rounds,
            handle,
        }
    }

    /// Waits until `n` more rounds have completed.
    fn wait_rounds(&self, n: usize) {
        let target = self.rounds.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.rounds.load(Ordering::Relaxed) < target {
            assert!(!self.handle.is_finished(), "the probing thread died");
            assert!(Instant::now() < deadline, "probe rounds stalled");
            // A bounded wait on the prober's progress counter.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(self) -> (Lab, Findings) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("the probing thread panicked")
    }
}

fn policy_counters(node_ns: &str) -> Vec<RuleCounter> {
    in_namespace(node_ns, || {
        NftProgrammer::new()?.read_counters(
            TableFamily::Ip,
            compiler::nft::TABLE_NAME,
            POLICY_CHAIN,
        )
    })
    .unwrap()
    .unwrap()
}

fn restart_under_probes(backend: &str) {
    let scenario = common::scenario("agent-restart");
    let state = scenario.states().unwrap().remove(0);
    let probes: Vec<ResolvedProbe> = scenario.steps[0]
        .probes
        .iter()
        .map(|p| state.resolve_probe(p, &[]).unwrap())
        .collect();
    let nftpolicy = nftpolicy_binary();

    let etcd = EtcdServer::start().unwrap();
    let mut lab = Lab::build(&state.pods(), &[], &["node1", "node2"]).unwrap();
    lab.set_probe_timeout(Duration::from_millis(1000));
    let node1_ns = lab.node_namespace("node1").unwrap().to_owned();
    let mut agents = Agents::start(&lab, &etcd, &nftpolicy, backend, &[]).unwrap();
    let revision =
        write_step(&nftpolicy, &etcd, &lab.workdir().join("step"), None, &state).unwrap();
    agents.wait_applied(revision, APPLY_TIMEOUT).unwrap();

    let prober = Prober::start(lab, probes);
    prober.wait_rounds(ROUNDS_PER_PHASE);
    let before = (backend == "nftables").then(|| policy_counters(&node1_ns));

    for signal in [Signal::SIGKILL, Signal::SIGTERM] {
        agents.stop("node1", signal).unwrap();
        prober.wait_rounds(ROUNDS_PER_PHASE);
        agents.restart("node1").unwrap();
        agents
            .wait_applied(revision, APPLY_TIMEOUT)
            .unwrap_or_else(|e| panic!("after {signal}: the agent did not become ready: {e}"));
        let status = agents.status("node1").unwrap();
        assert!(
            status.ready && status.applied_revision >= revision,
            "{status:?}"
        );
        prober.wait_rounds(ROUNDS_PER_PHASE);
    }

    let after = (backend == "nftables").then(|| policy_counters(&node1_ns));
    let (lab, findings) = prober.finish();
    assert!(
        findings.wrong.is_empty(),
        "{backend}: wrong verdicts while the agent restarted ({} rounds):\n{}",
        findings.rounds,
        findings.wrong.join("\n")
    );
    if let (Some(before), Some(after)) = (before, after) {
        let handles = |c: &[RuleCounter]| c.iter().map(|r| r.handle).collect::<Vec<_>>();
        assert_eq!(
            handles(&before),
            handles(&after),
            "{POLICY_CHAIN} was rewritten by the restarted agent"
        );
        let packets = |c: &[RuleCounter]| c.iter().map(|r| r.packets).sum::<u64>();
        assert!(
            packets(&after) > packets(&before),
            "{POLICY_CHAIN}'s counters reset or stopped: before {before:?}, after {after:?}"
        );
    }
    drop(agents);
    drop(lab);
}

#[test]
fn nftables_agent_restart_keeps_enforcing_and_keeps_counters() {
    restart_under_probes("nftables");
}

#[test]
fn iptables_agent_restart_keeps_enforcing() {
    restart_under_probes("iptables");
}
