//! Chaos: packets under faults. One lab node with the shop (web admits
//! client on 80/TCP, intruder is denied), an `nftpolicy run` agent on a
//! file datastore, and a prober thread that starts an allowed probe
//! (client → web:80) and a denied one (intruder → web:80) every
//! [`TICK`], concurrently, each judged by when it was sent. Meanwhile
//! faults come one after another: the agent SIGKILLed and restarted; our
//! rules tampered with twice (nftables: our table deleted, web's
//! to-workload chain flushed; iptables: all our chains flushed, web's
//! to-workload chain flushed); the policy widened and narrowed again in the
//! datastore; a malformed file added and removed; the datastore directory
//! removed, our rules tampered with while it is gone, the directory
//! restored; SIGTERM. The same shop then runs on etcd (etcd killed and
//! restarted, the node cut off while etcd compacts past the agent's watch,
//! etcd wiped and refilled) and on the Kubernetes API (the fake API server,
//! a test double: stopped, watches stalled and ended with `410 Gone`, the
//! node cut off), with the nftables backend: the datastore's faults do not
//! depend on the backend.
//!
//! Each fault is judged by what it allows: the agent's own faults and the
//! datastore's (restart, malformed input, an unreadable datastore, SIGTERM)
//! must not change a single verdict; tampering may change any verdict until
//! the agent repaired it; a policy change may show the old verdict until it
//! is applied. A fault's window ends at the first of [`STABLE_ROUNDS`]
//! consecutive correct rounds (bounded by [`TIMEOUT`]); any wrong verdict
//! after it, or outside what the fault allows, fails the test. The windows
//! are measured and reported (stderr and
//! `target/tmp/chaos-<run>.md`), never asserted.
//!
//! Both agents run with the defaults (`--resync-interval` 90 s): the
//! nftables agent repairs on nf_tables notifications, the iptables agent
//! (legacy x_tables sends none) on its table-size check
//! (`--iptables-check-ms`, 100 ms).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use compiler::nft::TABLE_NAME;
use lab::{nftpolicy_binary, write_state, Agents, Lab};
use model::scenario::{ResolvedProbe, StepState};
use nix::sys::signal::Signal;

mod common;
use common::{assert_probes, shop, wait_for};

/// A probe round (one probe of each flow) is started this often.
const TICK: Duration = Duration::from_millis(50);
/// A probe without an answer by then counts as denied (below TCP's 1 s
/// initial SYN retransmission, so a verdict is the first SYN's).
const PROBE_TIMEOUT: Duration = Duration::from_millis(900);
/// Consecutive correct rounds that end a fault's window.
const STABLE_ROUNDS: usize = 10;
/// Rounds probed while a fault that must change nothing lasts.
const HOLD_ROUNDS: usize = 10;
/// Bound on every wait (a debug agent starting, a repair, a poll).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Expected verdicts of the flows: [client → web:80, intruder → web:80].
type Verdicts = [bool; 2];
const SHOP: Verdicts = [true, false];
const WIDENED: Verdicts = [true, true];

/// One round of probes: when it was started and each flow's verdict
/// (`Err`: the lab failed, which fails the test).
struct Round {
    sent: Instant,
    results: [Option<Result<bool, String>>; 2],
}

impl Round {
    fn complete(&self) -> bool {
        self.results.iter().all(Option::is_some)
    }

    fn matches(&self, want: Verdicts) -> bool {
        self.results
            .iter()
            .zip(want)
            .all(|(r, w)| matches!(r, Some(Ok(v)) if *v == w))
    }
}

type Rounds = Arc<Mutex<Vec<Round>>>;

/// The probing thread (it owns the lab while it runs).
struct Prober {
    stop: Arc<AtomicBool>,
    rounds: Rounds,
    handle: JoinHandle<Lab>,
}

impl Prober {
    fn start(lab: Lab, probes: Vec<ResolvedProbe>) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds: Rounds = Arc::default();
        let (stop2, rounds2) = (stop.clone(), rounds.clone());
        let handle = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let i = {
                    let mut r = rounds2.lock().unwrap();
                    r.push(Round {
                        sent,
                        results: [None, None],
                    });
                    r.len() - 1
                };
                for (f, p) in probes.iter().enumerate() {
                    let rounds = rounds2.clone();
                    let launched = lab.launch_probe(p, move |r| {
                        let verdict = match r {
                            Ok(r) => r.allowed.ok_or(r.detail),
                            Err(e) => Err(e.to_string()),
                        };
                        rounds.lock().unwrap()[i].results[f] = Some(verdict);
                    });
                    if let Err(e) = launched {
                        rounds2.lock().unwrap()[i].results[f] = Some(Err(e.to_string()));
                    }
                }
                // The pace of the rounds, not a wait for a condition.
                std::thread::sleep((sent + TICK).saturating_duration_since(Instant::now()));
            }
            lab
        });
        Prober {
            stop,
            rounds,
            handle,
        }
    }

    /// Waits until `n` rounds started from now on have all their verdicts.
    fn hold(&self, n: usize) {
        let from = Instant::now();
        wait_for(&format!("{n} probe rounds"), TIMEOUT, || {
            assert!(!self.handle.is_finished(), "the probing thread died");
            let rounds = self.rounds.lock().unwrap();
            rounds
                .iter()
                .filter(|r| r.sent >= from && r.complete())
                .count()
                >= n
        });
    }

    /// Waits until [`STABLE_ROUNDS`] consecutive rounds started after
    /// `after` all give `want`; returns when the first of them was sent
    /// (the end of the fault's window).
    fn wait_correct(&self, after: Instant, want: Verdicts, what: &str) -> Instant {
        let mut start = None;
        wait_for(
            &format!("{what}: {STABLE_ROUNDS} consecutive correct probe rounds"),
            TIMEOUT,
            || {
                assert!(!self.handle.is_finished(), "the probing thread died");
                let rounds = self.rounds.lock().unwrap();
                let mut run: Option<(Instant, usize)> = None;
                for r in rounds.iter().filter(|r| r.sent >= after) {
                    if !r.complete() {
                        break;
                    }
                    run = match (r.matches(want), run) {
                        (false, _) => None,
                        (true, None) => Some((r.sent, 1)),
                        (true, Some((s, n))) => Some((s, n + 1)),
                    };
                    if let Some((s, n)) = run {
                        if n >= STABLE_ROUNDS {
                            start = Some(s);
                            return true;
                        }
                    }
                }
                false
            },
        );
        start.expect("set when the wait succeeded")
    }

    /// Stops probing; every round's verdicts and the lab back.
    fn finish(self) -> (Lab, Vec<Round>) {
        self.stop.store(true, Ordering::Relaxed);
        let lab = self.handle.join().expect("the probing thread panicked");
        // The last rounds' probes finish within their timeout.
        wait_for("the last probes", TIMEOUT, || {
            self.rounds.lock().unwrap().iter().all(Round::complete)
        });
        let rounds = std::mem::take(&mut *self.rounds.lock().unwrap());
        (lab, rounds)
    }
}

/// What a fault may do to verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Allows {
    /// Nothing: every verdict stays as it was.
    Nothing,
    /// Anything, until the agent has repaired it.
    AnythingUntilRepaired,
    /// The old verdict, until the change is applied.
    OldVerdictUntilApplied,
}

struct Fault {
    name: String,
    response: String,
    allows: Allows,
    at: Instant,
    before: Verdicts,
    after: Verdicts,
    /// The end of its window (faults that allow something).
    settled: Option<Instant>,
}

/// One row of the report.
struct Row {
    fault: String,
    response: String,
    wrong: usize,
    probes: usize,
    window: Option<Duration>,
}

/// Judges every round against the fault it was sent under; the rows of
/// the report and the verdicts outside what their fault allows.
fn judge(faults: &[Fault], rounds: &[Round]) -> (Vec<Row>, Vec<String>) {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let names = ["client -> web:80", "intruder -> web:80"];
    for (i, fault) in faults.iter().enumerate() {
        let until = faults.get(i + 1).map(|f| f.at);
        let mut row = Row {
            fault: fault.name.clone(),
            response: fault.response.clone(),
            wrong: 0,
            probes: 0,
            window: None,
        };
        for r in rounds
            .iter()
            .filter(|r| r.sent >= fault.at && until.is_none_or(|u| r.sent < u))
        {
            let offset = r.sent.duration_since(fault.at);
            let in_window = fault.settled.is_some_and(|s| r.sent < s);
            for (f, result) in r.results.iter().enumerate() {
                row.probes += 1;
                let verdict = match result {
                    Some(Ok(v)) => *v,
                    Some(Err(e)) => {
                        failures.push(format!("{}: {} at +{offset:?}: {e}", fault.name, names[f]));
                        continue;
                    }
                    None => {
                        failures.push(format!(
                            "{}: {} at +{offset:?}: no verdict",
                            fault.name, names[f]
                        ));
                        continue;
                    }
                };
                if verdict == fault.after[f] {
                    continue;
                }
                row.wrong += 1;
                let allowed = match fault.allows {
                    Allows::Nothing => false,
                    Allows::AnythingUntilRepaired => in_window,
                    Allows::OldVerdictUntilApplied => in_window && verdict == fault.before[f],
                };
                if !allowed {
                    failures.push(format!(
                        "{}: {} sent +{offset:?} after the fault was {} (expected {}){}",
                        fault.name,
                        names[f],
                        if verdict { "allowed" } else { "denied" },
                        if fault.after[f] { "allowed" } else { "denied" },
                        if in_window {
                            ", not what the fault allows"
                        } else {
                            ", outside the fault's window"
                        }
                    ));
                }
            }
        }
        if row.wrong > 0 {
            row.window = fault.settled.map(|s| s.duration_since(fault.at));
        }
        rows.push(row);
    }
    (rows, failures)
}

fn report(label: &str, rows: &[Row], rounds: usize, took: Duration) -> String {
    let mut out = format!(
        "chaos, {label}: {rounds} probe rounds (client -> web:80 allowed, \
         intruder -> web:80 denied, one of each every {TICK:?}) in {:.1} s\n\n\
         | fault | what nftpolicy does | wrong probes | window (fault to correct verdicts) |\n\
         |---|---|---|---|\n",
        took.as_secs_f64()
    );
    for r in rows {
        let window = match r.window {
            Some(w) => format!("{} ms", w.as_millis()),
            None => "—".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} of {} | {window} |",
            r.fault, r.response, r.wrong, r.probes
        );
    }
    out
}

/// Runs a command in the node's namespace, failing the test if it fails.
fn in_node(node_ns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let mut input = child.stdin.take().expect("piped");
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Replaces `path` in one rename, as a careful writer (or a ConfigMap
/// update) does: the agent never sees it half written.
fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-chaos");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The `nftpolicy_rejected_objects` gauge of the agent.
fn rejected_objects(agents: &Agents) -> Option<i64> {
    let metrics = agents.metrics("node1").ok()?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("nftpolicy_rejected_objects "))
        .and_then(|v| v.trim().parse().ok())
}

/// The shop's policy widened: web admits client and intruder on 80.
const WIDENED_POLICY: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    - from: [{podSelector: {matchExpressions: [{key: app, operator: In, values: [client, intruder]}]}}]
      ports: [{port: 80}]
";

struct Chaos {
    /// Names the run in the report: the backend, and the datastore unless
    /// it is the file datastore.
    label: String,
    backend: &'static str,
    node_ns: String,
    agents: Agents,
    prober: Prober,
    faults: Vec<Fault>,
    expect: Verdicts,
    /// When the first fault (the steady state) began.
    t0: Instant,
}

impl Chaos {
    /// Starts probing `lab` with the agents running and the verdicts
    /// checked once, and holds the steady state (the first row).
    fn start(label: &str, backend: &'static str, mut lab: Lab, agents: Agents) -> Chaos {
        let probes = shop().1;
        assert_probes(&mut lab, &probes, &format!("{label}: before the faults"));
        let node_ns = lab.node_namespace("node1").unwrap().to_owned();
        let mut c = Chaos {
            label: label.to_owned(),
            backend,
            node_ns,
            agents,
            prober: Prober::start(lab, probes),
            faults: Vec::new(),
            expect: SHOP,
            t0: Instant::now(),
        };
        c.begin(
            "none (steady state)",
            "enforces the shop's policy",
            Allows::Nothing,
            SHOP,
        );
        c.prober.hold(HOLD_ROUNDS);
        c
    }

    /// Waits until the agent reports itself not ready (`/readiness` 503,
    /// `felix_resync_state 0`).
    fn wait_not_ready(&self, what: &str) {
        wait_for(
            &format!("{what}: the agent reporting not ready"),
            TIMEOUT,
            || {
                self.agents.status("node1").is_ok_and(|s| !s.ready)
                    && self
                        .agents
                        .metrics("node1")
                        .is_ok_and(|m| m.lines().any(|l| l == "felix_resync_state 0"))
            },
        );
    }

    /// Waits until the agent is ready again.
    fn wait_ready(&self, what: &str) {
        wait_for(&format!("{what}: the agent ready again"), TIMEOUT, || {
            self.agents.status("node1").is_ok_and(|s| s.ready)
        });
    }

    /// Stops probing, judges every round, writes the report
    /// (`target/tmp/chaos-<label>.md`) and fails on any verdict outside
    /// what its fault allows.
    fn finish(self, started: Instant) {
        let took = self.t0.elapsed();
        let Chaos {
            label,
            agents,
            prober,
            faults,
            ..
        } = self;
        let (lab, rounds) = prober.finish();
        let (rows, failures) = judge(&faults, &rounds);
        let table = report(&label, &rows, rounds.len(), took);
        eprintln!(
            "{table}\n(whole test, lab included: {:.1} s)",
            started.elapsed().as_secs_f64()
        );
        let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "chaos-{}.md",
            label.replace([' ', ',', '(', ')'], "")
        ));
        if let Err(e) = std::fs::write(&file, &table) {
            eprintln!("writing {}: {e}", file.display());
        }
        drop(agents);
        drop(lab);
        assert!(
            failures.is_empty(),
            "{label}: {} wrong verdict(s) outside what their fault allows:\n{}\n\n{table}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// The policy changed in the datastore by `write`, to `after`: the old
    /// verdicts may show until it is applied.
    fn change_policy(&mut self, name: &str, response: &str, after: Verdicts, write: impl FnOnce()) {
        self.begin(name, response, Allows::OldVerdictUntilApplied, after);
        write();
        self.settle();
    }

    /// The datastore's server stopped by `stop` (the agent must notice and
    /// say so), the agent SIGKILLed and restarted while it is down (a new
    /// agent touches nothing before its first complete list), the server
    /// started again by `start`: no verdict may change.
    fn outage<S>(
        &mut self,
        name: &str,
        response: &str,
        server: &mut S,
        stop: impl FnOnce(&mut S),
        start: impl FnOnce(&mut S),
    ) {
        self.begin(name, response, Allows::Nothing, self.expect);
        stop(server);
        self.wait_not_ready(name);
        self.prober.hold(HOLD_ROUNDS);
        self.agents.stop("node1", Signal::SIGKILL).unwrap();
        self.agents.restart("node1").unwrap();
        self.prober.hold(HOLD_ROUNDS);
        self.wait_not_ready(&format!("{name}: restarted agent"));
        start(server);
        self.wait_ready(name);
        self.prober.hold(HOLD_ROUNDS);
    }

    /// The node cut off from the datastore's server while `meanwhile`
    /// changes the policy there (to `after`): nothing may change until the
    /// node reaches the server again; then the old verdicts may show until
    /// the change is applied.
    fn cut_off(&mut self, name: &str, meanwhile: impl FnOnce(), back: &str, after: Verdicts) {
        self.begin(
            name,
            "cannot know: keeps the dataplane, not ready",
            Allows::Nothing,
            self.expect,
        );
        self.agents.cut_datastore();
        self.wait_not_ready(name);
        meanwhile();
        self.prober.hold(HOLD_ROUNDS);
        self.begin(
            "… reachable again",
            back,
            Allows::OldVerdictUntilApplied,
            after,
        );
        self.agents.restore_datastore();
        self.settle();
        self.wait_ready(name);
    }

    /// Notes a fault starting now (before it is injected, so that every
    /// probe it can affect is judged against it).
    fn begin(&mut self, name: &str, response: &str, allows: Allows, after: Verdicts) {
        self.faults.push(Fault {
            name: name.to_owned(),
            response: response.to_owned(),
            allows,
            at: Instant::now(),
            before: self.expect,
            after,
            settled: None,
        });
        self.expect = after;
    }

    /// Waits for the current fault's window to end (verdicts right again).
    fn settle(&mut self) {
        let fault = self.faults.last_mut().expect("a fault begun");
        let end = self.prober.wait_correct(
            fault.at,
            fault.after,
            &format!("{}: {}", self.label, fault.name),
        );
        fault.settled = Some(end);
    }

    /// Tampering: runs it in the node (as an admin would) and waits until
    /// the agent has repaired what it did.
    fn tamper(&mut self, t: &Tampering, name: &str, response: &str) {
        self.begin(name, response, Allows::AnythingUntilRepaired, self.expect);
        let args: Vec<&str> = t.args.iter().map(String::as_str).collect();
        in_node(&self.node_ns, t.program, &args, t.stdin.as_deref());
        self.settle();
    }

    fn iptables(&self) -> bool {
        self.backend == "iptables"
    }
}

/// A command that tampers with our rules in the node.
struct Tampering {
    name: String,
    program: &'static str,
    args: Vec<String>,
    stdin: Option<String>,
}

fn tampering(name: &str, program: &'static str, args: &[&str], stdin: Option<String>) -> Tampering {
    Tampering {
        name: name.to_owned(),
        program,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        stdin,
    }
}

/// nftables: our table deleted; web's to-workload chain flushed; what the
/// agent does about it.
fn tamperings_nftables(web_tw: &str) -> (Tampering, Tampering, String) {
    (
        tampering(
            "our table deleted (nft delete table)",
            "nft",
            &["delete", "table", "ip", TABLE_NAME],
            None,
        ),
        tampering(
            "web's to-workload chain flushed (nft flush chain)",
            "nft",
            &["flush", "chain", "ip", TABLE_NAME, web_tw],
            None,
        ),
        "nf_tables notification: resync at once, repaired in one transaction".to_owned(),
    )
}

/// iptables: all our chains flushed (one `iptables-restore --noflush`);
/// web's to-workload chain flushed; what the agent does about it.
fn tamperings_iptables(node_ns: &str, web_tw: &str) -> (Tampering, Tampering, String) {
    let save = in_node(node_ns, "iptables-legacy-save", &["-t", "filter"], None);
    let ours: Vec<&str> = save
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|chain| chain.starts_with("cali-"))
        .collect();
    assert!(ours.contains(&web_tw), "no {web_tw} in:\n{save}");
    let mut flush = String::from("*filter\n");
    for chain in &ours {
        let _ = writeln!(flush, ":{chain} - [0:0]");
    }
    flush.push_str("COMMIT\n");
    (
        tampering(
            &format!(
                "all {} of our chains flushed (iptables-restore --noflush)",
                ours.len()
            ),
            "iptables-legacy-restore",
            &["--noflush"],
            Some(flush),
        ),
        tampering(
            "web's to-workload chain flushed (iptables -F)",
            "iptables-legacy",
            &["-t", "filter", "-F", web_tw],
            None,
        ),
        "the table-size check (every 100 ms, --iptables-check-ms) sees the filter table \
         change; a resync (iptables-save, compare, iptables-restore) repairs it"
            .to_owned(),
    )
}

/// A lab node holding the shop's pods, probing with [`PROBE_TIMEOUT`].
fn lab_for(state: &StepState) -> Lab {
    let mut lab = Lab::build(&state.pods(), &[], &["node1"]).unwrap();
    lab.set_probe_timeout(PROBE_TIMEOUT);
    lab
}

/// For a datastore's chaos run: the agent binary, the start time, the shop,
/// its lab, and the lab's directory `writes` for what is written to the
/// datastore.
fn datastore_shop(writes: &str) -> (PathBuf, Instant, StepState, Lab, PathBuf) {
    let nftpolicy = nftpolicy_binary();
    let started = Instant::now();
    let (state, _) = shop();
    let lab = lab_for(&state);
    let dir = lab.workdir().join(writes);
    (nftpolicy, started, state, lab, dir)
}

/// The shop policy's file among the manifests `write_state` wrote to `dir`.
fn policy_file(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.to_string_lossy()
                .contains("networkpolicy-shop-web-from-client")
        })
        .expect("the policy's file")
}

fn chaos(backend: &'static str) {
    let nftpolicy = nftpolicy_binary();
    let started = Instant::now();
    let (state, probes) = shop();
    assert_eq!(
        probes
            .iter()
            .map(|p| p.probe.expect_allow)
            .collect::<Vec<_>>(),
        SHOP,
        "the shop's probes: client -> web allowed, intruder -> web denied"
    );
    let web_if = state
        .pods()
        .into_iter()
        .find(|p| p.name == "web")
        .expect("web")
        .interface;
    let web_tw = format!("cali-tw-{web_if}");
    let lab = lab_for(&state);
    let workdir = lab.workdir();
    let datastore = workdir.join("datastore");
    write_state(&datastore, &state).unwrap();
    let policy_file = policy_file(&datastore);
    let shop_policy = std::fs::read_to_string(&policy_file).unwrap();
    let mut agents = Agents::start_file(&lab, &datastore, &nftpolicy, backend, &[]).unwrap();
    agents.wait_applied(1, TIMEOUT).unwrap();
    let mut c = Chaos::start(backend, backend, lab, agents);

    // The agent SIGKILLed, then restarted.
    c.begin(
        "agent SIGKILLed, restarted",
        if c.iptables() {
            "rules stay while no agent runs; the new agent re-applies the same chains"
        } else {
            "rules stay while no agent runs; the new agent adopts them (nothing rewritten)"
        },
        Allows::Nothing,
        SHOP,
    );
    c.agents.stop("node1", Signal::SIGKILL).unwrap();
    c.prober.hold(HOLD_ROUNDS);
    c.agents.restart("node1").unwrap();
    c.agents.wait_applied(1, TIMEOUT).unwrap();
    c.prober.hold(HOLD_ROUNDS);

    // Tampering, twice.
    let (all, one, response) = if c.iptables() {
        tamperings_iptables(&c.node_ns, &web_tw)
    } else {
        tamperings_nftables(&web_tw)
    };
    c.tamper(&all, &all.name, &response);
    c.tamper(&one, &one.name, &response);
    c.prober.hold(HOLD_ROUNDS);

    // The policy changes in the datastore, and back.
    let applied =
        "file re-read (polled every 500 ms, taken once it held still for a poll), applied";
    c.change_policy(
        "policy widened in the datastore (intruder admitted)",
        applied,
        WIDENED,
        || replace_file(&policy_file, WIDENED_POLICY),
    );
    c.change_policy("policy narrowed again", applied, SHOP, || {
        replace_file(&policy_file, &shop_policy);
    });
    c.prober.hold(HOLD_ROUNDS);

    // A malformed file arrives, then goes.
    c.begin(
        "malformed file added, later removed",
        "file named in the log and counted in nftpolicy_rejected_objects; the rest is kept",
        Allows::Nothing,
        SHOP,
    );
    let malformed = datastore.join("500-malformed.yaml");
    replace_file(
        &malformed,
        "apiVersion: v1\nkind: [Pod\nmetadata: {name: x\n",
    );
    wait_for("the agent counting the malformed file", TIMEOUT, || {
        rejected_objects(&c.agents).is_some_and(|n| n > 0)
    });
    c.prober.hold(HOLD_ROUNDS);
    std::fs::remove_file(&malformed).unwrap();
    wait_for("the agent forgetting the malformed file", TIMEOUT, || {
        rejected_objects(&c.agents) == Some(0)
    });
    c.prober.hold(HOLD_ROUNDS);

    // The datastore directory goes away, then comes back.
    c.begin(
        "datastore directory removed",
        "keeps the last dataplane, not ready (felix_resync_state 0) until it can read it again",
        Allows::Nothing,
        SHOP,
    );
    let away = datastore.with_file_name("datastore-away");
    std::fs::rename(&datastore, &away).unwrap();
    c.wait_not_ready("datastore removed");
    c.prober.hold(HOLD_ROUNDS);
    c.tamper(
        &all,
        &format!(
            "{}, while the datastore is gone; then the directory restored",
            all.name
        ),
        "repaired all the same (towards its last write), still not ready; \
         ready again once the directory is back",
    );
    std::fs::rename(&away, &datastore).unwrap();
    c.wait_ready("datastore restored");
    c.prober.hold(HOLD_ROUNDS);

    // SIGTERM: the agent exits, the rules stay.
    c.begin(
        "agent SIGTERMed",
        "exits; the rules stay in force",
        Allows::Nothing,
        SHOP,
    );
    c.agents.stop("node1", Signal::SIGTERM).unwrap();
    c.prober.hold(HOLD_ROUNDS);

    c.finish(started);
}

#[test]
fn nftables_keeps_every_verdict_outside_each_faults_window() {
    chaos("nftables");
}

#[test]
fn iptables_keeps_every_verdict_outside_each_faults_window() {
    chaos("iptables");
}

/// `nftpolicy apply -f <manifest>` into `etcd`, as the controller writes;
/// etcd's revision after it.
fn etcd_apply(nftpolicy: &Path, etcd: &lab::EtcdServer, dir: &Path, yaml: &str) -> i64 {
    let file = dir.join("policy.yaml");
    std::fs::write(&file, yaml).unwrap();
    lab::agents::nftpolicy_etcd(nftpolicy, etcd, "apply", &[file]).unwrap();
    etcd.revision().unwrap()
}

/// The same shop on the etcd datastore (nftables backend: what etcd's
/// faults do is the same for both backends): etcd stopped, with the agent
/// restarted while it is down; policy changes; the node cut off from etcd
/// while the policy changes and etcd is compacted past the agent's watch;
/// etcd wiped and restarted empty, then written again.
#[test]
fn etcd_keeps_every_verdict_outside_each_faults_window() {
    let (nftpolicy, started, state, lab, dir) = datastore_shop("etcd-writes");
    let mut etcd = lab::EtcdServer::start().unwrap();
    let revision = lab::agents::write_step(&nftpolicy, &etcd, &dir, None, &state).unwrap();
    let shop_policy = std::fs::read_to_string(policy_file(&dir.join("apply"))).unwrap();
    let mut agents = Agents::start(&lab, &etcd, &nftpolicy, "nftables", &[]).unwrap();
    agents.wait_applied(revision, TIMEOUT).unwrap();
    let mut c = Chaos::start("nftables, etcd", "nftables", lab, agents);

    c.outage(
        "etcd SIGKILLed; the agent SIGKILLed and restarted while etcd is down; etcd restarted on its data",
        "keeps the dataplane, not ready (felix_resync_state 0) while etcd is unreachable; \
         a new agent touches nothing before its first complete list; \
         lists again and is ready once etcd answers",
        &mut etcd,
        lab::EtcdServer::kill,
        |e| e.restart().unwrap(),
    );
    let watched = "watch event, applied";
    let (widen, narrow) = (
        || etcd_apply(&nftpolicy, &etcd, &dir, WIDENED_POLICY),
        || etcd_apply(&nftpolicy, &etcd, &dir, &shop_policy),
    );
    c.change_policy(
        "policy widened in etcd (intruder admitted)",
        watched,
        WIDENED,
        || {
            widen();
        },
    );
    c.change_policy("policy narrowed again", watched, SHOP, || {
        narrow();
    });
    c.prober.hold(HOLD_ROUNDS);
    c.cut_off(
        "the node cut off from etcd; meanwhile the policy widened and etcd compacted past the agent's watch revision",
        || {
            widen();
            etcd.compact().unwrap();
        },
        "never resumes a watch from an old revision: reconnects (backoff), lists again, applies the difference",
        WIDENED,
    );
    c.change_policy("policy narrowed again", watched, SHOP, || {
        narrow();
    });
    c.prober.hold(HOLD_ROUNDS);

    c.begin(
        "etcd wiped and restarted empty; later the cluster written again",
        "an empty etcd is never programmed: keeps the dataplane, not ready, says why in the log; \
         once written again (and writes paused for 500 ms), lists and is ready",
        Allows::Nothing,
        SHOP,
    );
    etcd.restart_empty().unwrap();
    wait_for("the agent saying etcd is empty", TIMEOUT, || {
        c.agents
            .log("node1")
            .is_ok_and(|l| l.contains("etcd holds no Calico resource"))
    });
    c.wait_not_ready("etcd empty");
    c.prober.hold(HOLD_ROUNDS);
    lab::agents::write_step(&nftpolicy, &etcd, &dir, None, &state).unwrap();
    c.wait_ready("etcd written again");
    c.prober.hold(HOLD_ROUNDS);

    c.finish(started);
}

/// The policy's manifest as the API server takes it.
fn json(yaml: &str) -> serde_json::Value {
    serde_yaml::from_str(yaml).unwrap()
}

/// The same shop on the Kubernetes datastore (the fake API server, a test
/// double; nftables backend): the API server stopped, with the agent
/// restarted while it is down; policy changes; watches that fall behind
/// and end with `410 Gone` while the policy changes; the node cut off
/// from the API server.
#[test]
fn kubernetes_keeps_every_verdict_outside_each_faults_window() {
    let (nftpolicy, started, state, lab, dir) = datastore_shop("api-writes");
    let mut api = lab::LabApi::start().unwrap();
    let revision = api
        .write_step(&lab::ApiClient::Http, &dir, None, &state)
        .unwrap();
    write_state(&dir, &state).unwrap();
    let shop_policy = json(&std::fs::read_to_string(policy_file(&dir)).unwrap());
    let widened = json(WIDENED_POLICY);
    let mut agents = Agents::start(&lab, &api, &nftpolicy, "nftables", &[]).unwrap();
    agents.wait_applied(revision as i64, TIMEOUT).unwrap();
    let mut c = Chaos::start("nftables, Kubernetes API", "nftables", lab, agents);

    c.outage(
        "API server stopped; the agent SIGKILLed and restarted while it is down; API server back",
        "keeps the dataplane, not ready while the API server is unreachable; \
         a new agent touches nothing before its first complete list; \
         lists again (or resumes its watches) and is ready once it answers",
        &mut api.server,
        testkit::apiserver::FakeApiServer::stop,
        |s| s.resume().unwrap(),
    );
    let watched = "watch event, applied";
    let (widen, narrow) = (
        || {
            api.server.apply(&widened).unwrap();
        },
        || {
            api.server.apply(&shop_policy).unwrap();
        },
    );
    c.change_policy(
        "policy widened in the API (intruder admitted)",
        watched,
        WIDENED,
        widen,
    );
    c.change_policy("policy narrowed again", watched, SHOP, narrow);
    c.prober.hold(HOLD_ROUNDS);

    c.begin(
        "watches fall behind (nothing delivered), the policy widened meanwhile",
        "cannot know: keeps the dataplane",
        Allows::Nothing,
        SHOP,
    );
    api.server.stall_watches();
    widen();
    c.prober.hold(HOLD_ROUNDS);
    c.change_policy(
        "… then every watch ends with 410 Gone (the change was compacted away)",
        "410 Gone: lists again at once (no backoff), applies the difference",
        WIDENED,
        || {
            api.server.expire_watches();
        },
    );
    c.wait_ready("relisted after 410 Gone");
    c.cut_off(
        "the node cut off from the API server; meanwhile the policy narrowed",
        narrow,
        "reconnects (client-go's backoff), lists or resumes its watches, applies the difference",
        SHOP,
    );
    c.prober.hold(HOLD_ROUNDS);

    c.finish(started);
}
