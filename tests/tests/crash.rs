//! Crash mid-apply: an `nftpolicy run` agent (nftables backend, file
//! datastore, inside a lab node) programs a small cluster; then one large
//! change lands at once (1,500 policies and 3,000 pods in one file, moved
//! into the datastore atomically, so the agent applies it as one big
//! transaction) and the agent gets SIGKILL at seeded random points between
//! noticing the change and having programmed it. After every kill the
//! kernel must hold EXACTLY the old desired ruleset or the new one — never
//! a mix — and a restarted agent must converge to the new ruleset, after
//! which the probes see the new policy.
//!
//! The expected rulesets are compiled here from the very files the agent
//! reads (`watcher::files::load` + `compiler::compile_nftables`) and
//! compared in read-back form with what `NftProgrammer::read_back` finds
//! in the node's namespace.
//!
//! The iptables backend is not covered: it programs with several restore
//! calls (ipset, then iptables-restore per family), each all-or-nothing on
//! its own but not together; see the report in the issue.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use compiler::nft::{Ruleset, SetElement, Table, TableFamily, TABLE_NAME};
use compiler::{compile_nftables, CompileOptions};
use lab::agents::in_namespace;
use lab::generate::Rng;
use lab::{nftpolicy_binary, write_state, Agents, Lab};
use model::scenario::{ResolvedProbe, Scenario};
use nix::sys::signal::Signal;
use programmer::NftProgrammer;

const SCENARIO: &str = r#"
name: crash-mid-apply
steps:
  - apply:
      - {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
      - apiVersion: v1
        kind: Pod
        metadata: {name: web, namespace: shop, labels: {app: web}}
        spec: {nodeName: node1, containers: [{name: w, ports: [{containerPort: 80, protocol: TCP}]}]}
      - apiVersion: v1
        kind: Pod
        metadata: {name: client, namespace: shop, labels: {app: client}}
        spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 80, protocol: TCP}]}]}
      - apiVersion: v1
        kind: Pod
        metadata: {name: intruder, namespace: shop, labels: {app: intruder}}
        spec: {nodeName: node1, containers: [{name: i, ports: [{containerPort: 80, protocol: TCP}]}]}
      - apiVersion: v1
        kind: Pod
        metadata: {name: other, namespace: shop, labels: {app: other}}
        spec: {nodeName: node1, containers: [{name: o, ports: [{containerPort: 80, protocol: TCP}]}]}
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: web-from-client, namespace: shop}
        spec:
          podSelector: {matchLabels: {app: web}}
          ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80}]}]
    probes:
      - {from: shop/client, to: shop/web, port: 80, expect: allow}
      - {from: shop/intruder, to: shop/web, port: 80, expect: deny}
      - {from: shop/other, to: shop/web, port: 80, expect: deny}
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: web-from-intruder, namespace: shop}
        spec:
          podSelector: {matchLabels: {app: web}}
          ingress: [{from: [{podSelector: {matchLabels: {app: intruder}}}], ports: [{port: 80}]}]
    probes:
      - {from: shop/client, to: shop/web, port: 80, expect: allow}
      - {from: shop/intruder, to: shop/web, port: 80, expect: allow}
      - {from: shop/other, to: shop/web, port: 80, expect: deny}
"#;

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
/// Kills at random points of the big apply.
const KILLS: usize = 8;
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

/// Both tables in read-back form.
type Tables = (Option<Table>, Option<Table>);

/// The desired ruleset in read-back form (sorted, de-duplicated elements,
/// addresses without host bits), as crates/programmer/tests/compiled.rs.
fn canonical(rs: &Ruleset) -> Tables {
    let mut rs = rs.clone();
    for t in &mut rs.tables {
        for s in t.sets.values_mut() {
            for e in &mut s.elements {
                if let SetElement::Net(n) = e {
                    *n = n.trunc();
                }
            }
            s.elements.sort();
            s.elements.dedup();
        }
    }
    let take = |f: TableFamily| rs.tables.iter().find(|t| t.family == f).cloned();
    (take(TableFamily::Ip), take(TableFamily::Ip6))
}

/// What node1's agent must program from the datastore directory `dir`.
fn desired(dir: &Path) -> Tables {
    let loaded = watcher::files::load(&[dir.to_owned()]).unwrap();
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let (_, rs) = compile_nftables(&loaded.state, &CompileOptions::new("node1")).unwrap();
    canonical(&rs)
}

fn kernel(node_ns: &str) -> Tables {
    in_namespace(node_ns, || {
        let mut p = NftProgrammer::new()?;
        Ok::<_, programmer::Error>((
            p.read_back(TableFamily::Ip, TABLE_NAME)?,
            p.read_back(TableFamily::Ip6, TABLE_NAME)?,
        ))
    })
    .unwrap()
    .unwrap()
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
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        if &kernel(node_ns) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the kernel did not reach the expected ruleset within {CONVERGE_TIMEOUT:?}"
        );
        // Polling the kernel: the agent offers no notification of it.
        std::thread::sleep(Duration::from_millis(100));
    }
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

fn assert_probes(lab: &mut Lab, probes: &[ResolvedProbe], when: &str) {
    let results = lab.probe_all(probes).unwrap();
    for (p, r) in probes.iter().zip(&results) {
        assert_eq!(
            r.allowed,
            Some(p.probe.expect_allow),
            "{when}: {}: {}",
            p.probe,
            r.detail
        );
    }
}

#[test]
fn nftables_sigkill_mid_apply_leaves_old_or_new_never_a_mix() {
    let scenario = Scenario::parse("crash-mid-apply.yaml", SCENARIO).unwrap();
    let states = scenario.states().unwrap();
    let nftpolicy = nftpolicy_binary();
    let mut lab = Lab::build(&states[0].pods(), &[], &["node1"]).unwrap();
    lab.set_probe_timeout(Duration::from_millis(1000));
    let node_ns = lab.node_namespace("node1").unwrap().to_owned();

    let datastore = lab.workdir().join("datastore");
    write_state(&datastore, &states[0]).unwrap();
    // The big file waits outside the datastore until it is moved in.
    let parked: PathBuf = lab.workdir().join("bulk.yaml.parked");
    let live: PathBuf = datastore.join("900-bulk.yaml");
    std::fs::write(&parked, extra_manifests()).unwrap();

    let old = desired(&datastore);
    swap_in(&parked, &live);
    let new = desired(&datastore);
    swap_in(&live, &parked);
    assert_ne!(old, new);
    eprintln!(
        "old ruleset: {:?}, new ruleset: {:?} (chains, rules, set elements)",
        size(&old),
        size(&new)
    );

    let fast_poll = ["--file-poll-ms".to_owned(), "20".to_owned()];
    let mut agents =
        Agents::start_file(&lab, &datastore, &nftpolicy, "nftables", &fast_poll).unwrap();
    agents.wait_applied(1, CONVERGE_TIMEOUT).unwrap();
    wait_kernel(&node_ns, &old, "first programming");
    assert_probes(
        &mut lab,
        &probes_of(&scenario, 0, &states[0]),
        "old ruleset",
    );

    // Calibration: how long from the big file landing to the agent having
    // programmed it (the window the kills are spread over).
    let started = Instant::now();
    swap_in(&parked, &live);
    agents.wait_applied(2, CONVERGE_TIMEOUT).unwrap();
    let window = started.elapsed();
    wait_kernel(&node_ns, &new, "calibration");
    eprintln!("the big change takes {window:?} from landing to programmed");

    let mut rng = Rng::new(SEED);
    let (mut saw_old, mut saw_new) = (0, 0);
    for kill in 0..KILLS {
        // Back to the old state, programmed by a fresh agent.
        swap_in(&live, &parked);
        agents.stop("node1", Signal::SIGKILL).unwrap();
        agents.restart("node1").unwrap();
        agents.wait_applied(1, CONVERGE_TIMEOUT).unwrap();
        wait_kernel(&node_ns, &old, "back to the old state");

        // Spread over the second half of the window (reading the files
        // comes first; compiling and the transaction come last) and a
        // little past it.
        let delay = window.mul_f64((500 + rng.below(1_000)) as f64 / 1_000.0);
        swap_in(&parked, &live);
        std::thread::sleep(delay);
        agents.stop("node1", Signal::SIGKILL).unwrap();
        let got = kernel(&node_ns);
        let verdict = if got == old {
            saw_old += 1;
            "old"
        } else if got == new {
            saw_new += 1;
            "new"
        } else {
            panic!(
                "kill {kill} after {delay:?}: the kernel holds neither the old nor the new \
                 ruleset: {:?} (old {:?}, new {:?})",
                size(&got),
                size(&old),
                size(&new)
            );
        };
        eprintln!("kill {kill} after {delay:?}: kernel holds the {verdict} ruleset");

        // A restarted agent converges to the new state.
        agents.restart("node1").unwrap();
        agents.wait_applied(1, CONVERGE_TIMEOUT).unwrap();
        wait_kernel(&node_ns, &new, "after restart");
    }
    eprintln!("{KILLS} kills: {saw_old} left the old ruleset, {saw_new} the new one");
    assert_probes(
        &mut lab,
        &probes_of(&scenario, 1, &states[1]),
        "new ruleset after the restarts",
    );
    drop(agents);
    drop(lab);
}
