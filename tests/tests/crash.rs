//! Crash mid-apply: an `nftpolicy run` agent (file datastore, inside a lab
//! node) programs a small cluster; then one large change lands at once
//! (1,500 policies and 3,000 pods in one file, moved into the datastore
//! atomically, so the agent applies it as one big update) and the agent
//! gets SIGKILL at a point of that apply. After every kill the kernel must
//! hold a state the backend promises, and a restarted agent must converge
//! to the new ruleset, after which the probes see the new policy.
//!
//! Aiming the kills: each round first measures, with a freshly restarted
//! agent programming the old state exactly as in the kill that follows,
//! how long the big change takes from landing to the agent's "dataplane
//! programmed" log line (T); the kill then comes after a delay spread
//! (stratified over the rounds, jittered by a seed) across [0, 1.5 T]. So
//! some kills land before the kernel commit and some after, and the test
//! asserts both outcomes were seen.
//!
//! - nftables: one netlink transaction, so after every kill the kernel
//!   holds EXACTLY the old desired ruleset or the new one, never a mix
//!   (compared in read-back form with `compiler::compile_nftables`).
//! - iptables: an apply is up to four calls, each atomic on its own
//!   (`ipset restore` adding sets and members, `iptables-restore`,
//!   `ip6tables-restore`, `ipset restore` removing). After every kill each
//!   family's filter table holds exactly our old or our new chains and hook
//!   rules (compared by `cali:` rule hashes with `compiler::compile_iptables`),
//!   and every ipset the table's rules use exists.
//!
//! This test found that the agent used to program one atomic file change
//! as several applies (whatever part of the watcher's burst was queued), so
//! a kill between them left a partial state; the daemon now programs a file
//! datastore only at the `InSync` that closes each re-read (each round
//! prints the applies it saw).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use compiler::render_iptables::{rule_hash, IptablesRuleset, IptablesRulesets};
use compiler::{compile_iptables, CompileOptions};
use iptables::{IptablesProgrammer, KernelState, TableState};
use lab::agents::in_namespace;
use lab::generate::Rng;
use lab::{nftpolicy_binary, write_state, Agents, Lab};
use model::scenario::{ResolvedProbe, Scenario};
use nix::sys::signal::Signal;

mod common;
use common::{assert_probes, desired, kernel, Tables};

// The scenario: tests/tests/scenarios/crash-mid-apply.yaml.

/// The large change, on top of step 2's policy.
const EXTRA_POLICIES: usize = 1_500;
const EXTRA_PODS: usize = 3_000;
/// Of the extra pods, this many run on node1 (endpoints with chains of
/// their own); the others are remote (set members only).
const EXTRA_LOCAL_PODS: usize = 200;
/// Distinct `app` labels among the extra pods: each extra policy selects
/// one of them.
const APPS: usize = 50;
/// Distinct `tier` labels: the extra policies' ingress sources.
const TIERS: usize = 7;
const SEED: u64 = 0x0063_7261_7368;
/// Kill rounds per backend; round k kills within the k-th of as many
/// equal slices of [0, 1.5 T].
const ROUNDS: usize = 4;
const SPREAD: f64 = 1.5;
/// When a kill round kills the agent, after the new state lands.
#[derive(Clone, Copy)]
enum KillAt {
    /// This long after.
    After(Duration),
    /// Once the agent has logged the new state as programmed.
    Logged,
}

/// What the agent logs once a transaction is committed.
const PROGRAMMED: &str = "dataplane programmed";
/// Bound on every convergence wait (a debug build applying the big change).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);

/// The extra objects as one multi-document YAML file.
fn extra_manifests() -> String {
    let mut out = String::new();
    out.push_str(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: web-from-intruder, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: web}}\n  \
         ingress: [{from: [{podSelector: {matchLabels: {app: intruder}}}], ports: [{port: 80}]}]\n",
    );
    out.push_str(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: bulk, labels: {team: bulk}}\n",
    );
    for i in 0..EXTRA_PODS {
        // 198.19.100.0 upwards: clear of the lab's own pod addresses.
        let ip = format!("198.19.{}.{}", 100 + i / 250, 1 + i % 250);
        let node = if i < EXTRA_LOCAL_PODS {
            "node1"
        } else {
            "node9"
        };
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\n\
             metadata: {{name: bulk-{i}, namespace: bulk, labels: {{app: bulk-{}, tier: t{}}}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{containerPort: 8080, protocol: TCP}}]}}]}}\n\
             status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n",
            i % APPS,
            i % TIERS
        ));
    }
    for j in 0..EXTRA_POLICIES {
        out.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: bulk-{j}, namespace: bulk}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: bulk-{}}}}}\n  \
             ingress: [{{from: [{{podSelector: {{matchLabels: {{tier: t{}}}}}}}], \
             ports: [{{port: {}, protocol: TCP}}]}}]\n",
            j % APPS,
            j % TIERS,
            1000 + j
        ));
    }
    out
}

fn size(t: &Tables) -> (usize, usize, usize) {
    let mut chains = 0;
    let mut rules = 0;
    let mut elements = 0;
    for t in [&t.0, &t.1].into_iter().flatten() {
        chains += t.chains.len();
        rules += t.chains.values().map(|c| c.rules.len()).sum::<usize>();
        elements += t.sets.values().map(|s| s.elements.len()).sum::<usize>();
    }
    (chains, rules, elements)
}

/// Waits (bounded) until the kernel holds `want`.
fn wait_kernel(node_ns: &str, want: &Tables, what: &str) {
    common::wait_kernel(node_ns, want, what, CONVERGE_TIMEOUT);
}

/// Moves `from` to `to` atomically (rename within one filesystem), so the
/// agent reads the whole big file or none of it.
fn swap_in(from: &Path, to: &Path) {
    std::fs::rename(from, to).unwrap();
}

fn probes_of(
    scenario: &Scenario,
    step: usize,
    state: &model::scenario::StepState,
) -> Vec<ResolvedProbe> {
    scenario.steps[step]
        .probes
        .iter()
        .map(|p| state.resolve_probe(p, &[]).unwrap())
        .collect()
}

/// The two tests each run a big agent; one at a time keeps the timing of
/// each round undisturbed by the other test.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Where a kill left the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    Old,
    New,
}

/// How many times the agent logged [`PROGRAMMED`] for the new state (the
/// big change: at least [`EXTRA_POLICIES`] active policies). Other applies
/// (a re-read that changed nothing, the old state) log it too. The log is
/// appended to across restarts.
fn new_state_programmed(log: &Path) -> usize {
    programmed_policies(log)
        .into_iter()
        .filter(|policies| *policies >= EXTRA_POLICIES)
        .count()
}

/// The active policy count of every [`PROGRAMMED`] line in the log.
fn programmed_policies(log: &Path) -> Vec<usize> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(PROGRAMMED))
        .filter_map(|line| {
            line.split_once(" policies=")?
                .1
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Waits (bounded) until the agent has logged the new state programmed
/// more than `before` times.
fn wait_new_state_programmed(log: &Path, before: usize) {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while new_state_programmed(log) <= before {
        assert!(
            Instant::now() < deadline,
            "the agent did not log {PROGRAMMED:?} for the new state within {CONVERGE_TIMEOUT:?}"
        );
        // Polling the log: the moment it is written is what is measured.
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The iptables tools an iptables-mode agent runs. Its children outlive a
/// SIGKILL: a restore whose input was complete still commits.
const RESTORE_TOOLS: [&str; 4] = ["iptables", "ip6tables", "ipset", "xtables-legacy-m"];

/// Waits (bounded) until no iptables or ipset process runs in `node_ns`.
fn wait_tools_gone(node_ns: &str) {
    let netns = std::fs::metadata(Path::new("/run/netns").join(node_ns))
        .unwrap()
        .ino();
    let wanted = format!("net:[{netns}]");
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let running: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter(|e| {
                std::fs::read_link(e.path().join("ns/net"))
                    .is_ok_and(|l| l.to_string_lossy() == wanted)
            })
            .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
            .map(|c| c.trim().to_owned())
            .filter(|c| RESTORE_TOOLS.iter().any(|t| c.starts_with(t)))
            .collect();
        if running.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still running in {node_ns}: {running:?}"
        );
        // Polling /proc: an orphaned restore tells nobody when it ends.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One backend's part of the kill rounds.
trait Backend {
    /// `--backend`.
    fn name(&self) -> &'static str;
    /// Waits (bounded) until the kernel holds the old (`Left::Old`) or the
    /// new ruleset.
    fn wait(&self, node_ns: &str, state: Left, what: &str);
    /// Where the kernel is after a kill; panics on a state the backend
    /// does not promise.
    fn judge(&self, node_ns: &str, what: &str) -> Left;
}

struct Nftables {
    old: Tables,
    new: Tables,
}

impl Backend for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn wait(&self, node_ns: &str, state: Left, what: &str) {
        wait_kernel(
            node_ns,
            if state == Left::Old {
                &self.old
            } else {
                &self.new
            },
            what,
        );
    }

    fn judge(&self, node_ns: &str, what: &str) -> Left {
        let got = kernel(node_ns);
        if got == self.old {
            Left::Old
        } else if got == self.new {
            Left::New
        } else {
            panic!(
                "{what}: the kernel holds neither the old nor the new ruleset: {:?} \
                 (old {:?}, new {:?}) (chains, rules, set elements)",
                size(&got),
                size(&self.old),
                size(&self.new)
            )
        }
    }
}

/// One family's filter table as far as it is ours: our chains and the
/// hook rules in built-in chains, each rule by its `cali:` hash.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OurTable {
    chains: BTreeMap<String, Vec<String>>,
    hooks: BTreeMap<String, Vec<String>>,
}

impl OurTable {
    fn rendered(r: &IptablesRuleset) -> OurTable {
        OurTable {
            chains: r
                .chains
                .keys()
                .map(|c| (c.clone(), r.chain_hashes(c).unwrap()))
                .collect(),
            // Ours at the top of a built-in chain, then ours appended to it
            // (other rules, if any, sit between and are not ours).
            hooks: r
                .hooks
                .keys()
                .chain(r.appended.keys())
                .map(|c| {
                    let rules = r
                        .hooks
                        .get(c)
                        .into_iter()
                        .chain(r.appended.get(c))
                        .flatten();
                    let hashes = rules.filter_map(|r| rule_hash(r)).map(str::to_owned);
                    (c.clone(), hashes.collect::<Vec<_>>())
                })
                .filter(|(_, h)| !h.is_empty())
                .collect(),
        }
    }

    fn in_kernel(t: &TableState) -> OurTable {
        OurTable {
            chains: t.chains.clone(),
            hooks: t
                .others
                .iter()
                .map(|(c, rules)| {
                    let hashes = rules.iter().filter_map(|r| r.hash.clone());
                    (c.clone(), hashes.collect::<Vec<_>>())
                })
                .filter(|(_, h)| !h.is_empty())
                .collect(),
        }
    }
}

struct Iptables {
    old: IptablesRulesets,
    new: IptablesRulesets,
}

fn desired_iptables(dir: &Path) -> IptablesRulesets {
    let loaded = watcher::files::load(&[dir.to_owned()]).unwrap();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    compile_iptables(&loaded.state, &CompileOptions::new("node1"))
        .unwrap()
        .1
}

fn iptables_kernel(node_ns: &str) -> KernelState {
    in_namespace(node_ns, || {
        IptablesProgrammer::new(iptables::Backend::Legacy)
            .read_kernel(&mut iptables::Report::default())
    })
    .unwrap()
    .unwrap()
}

impl Iptables {
    fn rendered(&self, state: Left) -> &IptablesRulesets {
        match state {
            Left::Old => &self.old,
            Left::New => &self.new,
        }
    }

    /// Each family's table: old, new, or neither (None).
    fn tables(&self, k: &KernelState) -> [(&'static str, Option<Left>); 2] {
        let which = |t: &TableState, pick: fn(&IptablesRulesets) -> &IptablesRuleset| {
            let got = OurTable::in_kernel(t);
            [Left::Old, Left::New]
                .into_iter()
                .find(|s| OurTable::rendered(pick(self.rendered(*s))) == got)
        };
        [
            ("IPv4", which(&k.v4, |r| &r.v4)),
            ("IPv6", which(&k.v6, |r| &r.v6)),
        ]
    }
}

impl Backend for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn wait(&self, node_ns: &str, state: Left, what: &str) {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let k = iptables_kernel(node_ns);
            let r = self.rendered(state);
            let sets_there =
                [&r.v4, &r.v6]
                    .iter()
                    .flat_map(|f| f.ipsets.iter())
                    .all(|(name, spec)| {
                        k.ipsets
                            .get(name)
                            .is_some_and(|s| s.members == spec.members)
                    });
            if sets_there && self.tables(&k).iter().all(|(_, t)| *t == Some(state)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the kernel did not reach the {state:?} iptables ruleset within \
                 {CONVERGE_TIMEOUT:?}"
            );
            // Polling the kernel: the agent offers no notification of it.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn judge(&self, node_ns: &str, what: &str) -> Left {
        let k = iptables_kernel(node_ns);
        let mut states = Vec::new();
        for (family, table) in self.tables(&k) {
            let state = table.unwrap_or_else(|| {
                panic!("{what}: the {family} filter table holds neither our old nor our new chains")
            });
            let r = self.rendered(state);
            let r = if family == "IPv4" { &r.v4 } else { &r.v6 };
            for name in r.ipsets.keys() {
                assert!(
                    k.ipsets.contains_key(name),
                    "{what}: the {family} table ({state:?}) uses ipset {name}, which is missing"
                );
            }
            states.push(state);
        }
        // The two families may differ (separate restore calls); the round
        // counts as new only once both are.
        if states.iter().all(|s| *s == Left::New) {
            Left::New
        } else {
            if states.contains(&Left::New) {
                eprintln!("{what}: IPv4 {:?}, IPv6 {:?}", states[0], states[1]);
            }
            Left::Old
        }
    }
}

/// Sets up the lab and runs the kill rounds against `backend`.
fn kill_rounds(make: impl FnOnce(&Path, &Path, &Path) -> Box<dyn Backend>) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scenario = common::scenario("crash-mid-apply");
    let states = scenario.states().unwrap();
    // (Builds the agent first if needed: not part of the test's time.)
    let nftpolicy = nftpolicy_binary();
    let setup = Instant::now();
    let mut lab = Lab::build(&states[0].pods(), &[], &["node1"]).unwrap();
    lab.set_probe_timeout(Duration::from_millis(1000));
    let node_ns = lab.node_namespace("node1").unwrap().to_owned();

    let datastore = lab.workdir().join("datastore");
    write_state(&datastore, &states[0]).unwrap();
    // The big file waits outside the datastore until it is moved in.
    let parked: PathBuf = lab.workdir().join("bulk.yaml.parked");
    let live: PathBuf = datastore.join("900-bulk.yaml");
    std::fs::write(&parked, extra_manifests()).unwrap();
    let backend = make(&datastore, &parked, &live);
    let name = backend.name();
    let log = lab.workdir().join("agent-node1.log");

    // One table: the kernel is compared with the compiler's uncut
    // ruleset, and the new state (about 12,500 rules a family) is large enough
    // that `--table-groups auto` would cut it into groups when an agent
    // starts over it (bench/tests/auto_groups.rs covers that).
    let args = [
        "--file-poll-ms".to_owned(),
        "20".to_owned(),
        "--table-groups".to_owned(),
        "1".to_owned(),
    ];
    let mut agents = Agents::start_file(&lab, &datastore, &nftpolicy, name, &args).unwrap();
    agents.wait_applied(1, CONVERGE_TIMEOUT).unwrap();
    backend.wait(&node_ns, Left::Old, "first programming");
    assert_probes(
        &mut lab,
        &probes_of(&scenario, 0, &states[0]),
        "old ruleset",
    );

    // A fresh agent that has programmed the old state, from the new one:
    // the same start for each measurement and each kill.
    let fresh_agent_at_old = |agents: &mut Agents| {
        if live.exists() {
            swap_in(&live, &parked);
        }
        agents.stop("node1", Signal::SIGKILL).unwrap();
        wait_tools_gone(&node_ns);
        agents.restart("node1").unwrap();
        agents.wait_applied(1, CONVERGE_TIMEOUT).unwrap();
        backend.wait(&node_ns, Left::Old, "back to the old state");
    };

    // Swaps the new state in, kills the agent at `at`, judges what the
    // kernel holds, and restarts the agent until it has the new state.
    let kill_and_restart = |agents: &mut Agents, at: KillAt, what: &str| -> Left {
        fresh_agent_at_old(agents);
        let before = new_state_programmed(&log);
        swap_in(&parked, &live);
        match at {
            KillAt::After(delay) => std::thread::sleep(delay),
            KillAt::Logged => wait_new_state_programmed(&log, before),
        }
        agents.stop("node1", Signal::SIGKILL).unwrap();
        wait_tools_gone(&node_ns);
        let logged = new_state_programmed(&log) > before;
        let state = backend.judge(&node_ns, what);
        eprintln!(
            "{what}: the kernel holds the {state:?} ruleset{}",
            match (state, logged) {
                (Left::New, false) => " (killed after the commit, before the log line)",
                (Left::Old, true) => " (logged as programmed?)",
                _ => "",
            }
        );
        assert!(
            !(state == Left::Old && logged),
            "{what}: the agent logged {PROGRAMMED:?} but the kernel holds the old ruleset"
        );
        // A restarted agent converges to the new state.
        agents.restart("node1").unwrap();
        agents.wait_applied(1, CONVERGE_TIMEOUT).unwrap();
        backend.wait(&node_ns, Left::New, "after restart");
        state
    };

    eprintln!("{name}: set up in {:?}", setup.elapsed());
    let started = Instant::now();
    let mut rng = Rng::new(SEED);
    let mut left = Vec::new();
    for round in 0..ROUNDS {
        // T: the big change, landing to programmed.
        fresh_agent_at_old(&mut agents);
        let before = new_state_programmed(&log);
        let applies_before = programmed_policies(&log).len();
        let landed = Instant::now();
        swap_in(&parked, &live);
        wait_new_state_programmed(&log, before);
        let t = landed.elapsed();
        // One file landing atomically should be one apply; more entries
        // here mean the agent programmed part of the change first.
        eprintln!(
            "{name} round {round}: the change was programmed as applies with {:?} policies",
            &programmed_policies(&log)[applies_before..]
        );

        // The kill, in this round's slice of [0, SPREAD × T].
        let fraction = (round as f64 + rng.below(1_000) as f64 / 1_000.0) / ROUNDS as f64 * SPREAD;
        let delay = t.mul_f64(fraction);
        let what = format!("{name} kill {round} at {fraction:.2} T ({delay:?} of {t:?})");
        left.push(kill_and_restart(&mut agents, KillAt::After(delay), &what));
    }
    // On a loaded machine T varies from round to round, and the timed
    // kills can all land on one side of the commit. Each side is then
    // covered by one more kill placed for it: at once (before the agent
    // has read the file), or once the agent has logged the commit.
    if !left.contains(&Left::Old) {
        left.push(kill_and_restart(
            &mut agents,
            KillAt::After(Duration::ZERO),
            &format!("{name} extra kill at once"),
        ));
    }
    if !left.contains(&Left::New) {
        left.push(kill_and_restart(
            &mut agents,
            KillAt::Logged,
            &format!("{name} extra kill after the commit was logged"),
        ));
    }
    let old = left.iter().filter(|s| **s == Left::Old).count();
    let new = left.len() - old;
    eprintln!(
        "{name}: {} kills in {:?}: {old} left the old ruleset, {new} the new one",
        left.len(),
        started.elapsed()
    );
    assert!(old > 0, "{name}: no kill landed before the commit");
    assert!(new > 0, "{name}: no kill landed after the commit");
    assert_probes(
        &mut lab,
        &probes_of(&scenario, 1, &states[1]),
        "new ruleset after the restarts",
    );
    drop(agents);
    drop(lab);
}

/// The expected old and new desired states, compiled with `compile` from
/// the datastore without and with the big file.
fn old_and_new<T: PartialEq>(
    datastore: &Path,
    parked: &Path,
    live: &Path,
    compile: impl Fn(&Path) -> T,
) -> (T, T) {
    let old = compile(datastore);
    swap_in(parked, live);
    let new = compile(datastore);
    swap_in(live, parked);
    assert!(old != new);
    (old, new)
}

#[test]
fn nftables_sigkill_mid_apply_leaves_old_or_new_never_a_mix() {
    kill_rounds(|datastore, parked, live| {
        let (old, new) = old_and_new(datastore, parked, live, desired);
        eprintln!(
            "old ruleset: {:?}, new ruleset: {:?} (chains, rules, set elements)",
            size(&old),
            size(&new)
        );
        Box::new(Nftables { old, new })
    });
}

#[test]
fn iptables_sigkill_mid_apply_leaves_each_table_old_or_new_with_its_sets() {
    kill_rounds(|datastore, parked, live| {
        let (old, new) = old_and_new(datastore, parked, live, desired_iptables);
        eprintln!(
            "old: {} + {} chains, new: {} + {} chains (IPv4 + IPv6)",
            old.v4.chains.len(),
            old.v6.chains.len(),
            new.v4.chains.len(),
            new.v6.chains.len()
        );
        Box::new(Iptables { old, new })
    });
}
