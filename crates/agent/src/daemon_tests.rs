//! The agent's loop with a real kernel: `serve` and its programmer thread
//! programming nftables in a namespace of the test's own, fed updates as a
//! datastore delivers them; what reaches the kernel is watched through
//! `nf_tables`' own change notifications (one per committed transaction, in
//! commit order). Assertions are on the order of effects, never on time.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use compiler::CompileOptions;
use model::calico::Resource;
use programmer::monitor::{ForeignChange, Monitor, ObjectKind};

use super::*;

/// One committed transaction, as the notifications describe it.
#[derive(Debug)]
struct Committed {
    /// Sets whose elements it added.
    elements_added: Vec<String>,
    /// Chains whose rules it changed.
    rules_changed: Vec<String>,
}

fn resources(yaml: &str) -> Vec<Resource> {
    testkit::cluster::state(yaml)
        .resources()
        .map(std::borrow::Cow::into_owned)
        .collect()
}

fn upsert(r: Resource, revision: &mut i64) -> Update {
    *revision += 1;
    Update::Upsert {
        key: r.key(),
        resource: r,
        revision: *revision,
    }
}

/// Tier `soft` of `testkit::cluster::tiered` at another order: a change
/// that compiles in full (the local endpoint `web`'s chain changes).
fn soft_tier(order: u32) -> Resource {
    resources(&format!(
        "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: soft}}\nspec: {{order: {order}, defaultAction: Pass}}\n"
    ))
    .remove(0)
}

/// A client pod on another node: its address joins the set of
/// `app == 'client'` that web's policy allows (element changes only).
fn client(i: u8) -> Resource {
    resources(&testkit::cluster::pod(
        "default",
        &format!("client-{i}"),
        "node2",
        &[&format!("198.18.129.{i}")],
        "app: client",
        "",
    ))
    .remove(0)
}

/// The agent's loop (`serve`, with its programmer thread) on a channel of
/// updates, programming nftables in the current thread's namespace; on a
/// tokio runtime.
struct Agent {
    tx: mpsc::Sender<Update>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<bool>>,
    revision: i64,
}

impl Agent {
    fn start(lanes: bool, programmed: Option<std_mpsc::Sender<Programmed>>) -> Agent {
        let dataplane =
            ::dataplane::open(::dataplane::Kind::Nftables, iptables::Backend::Legacy).unwrap();
        let node = Node::new(Pipeline::new(CompileOptions::new("node1"), dataplane));
        let (tx, updates) = mpsc::channel(4096);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            LoopOptions {
                whole_at_insync_only: false,
                lanes,
                resync_interval: Duration::from_hours(1),
                watch: crate::tamper::WatchArgs {
                    watch_kernel: false,
                },
                table_size_check: None,
                programmed,
            },
            node,
            Stream {
                updates,
                source_task: tokio::spawn(async { Ok(()) }),
            },
            Arc::new(Metrics::new().unwrap()),
            Arc::new(Health::default()),
            async {
                let _ = stop_rx.await;
            },
        ));
        Agent {
            tx,
            stop,
            task,
            revision: 0,
        }
    }

    /// Queues `r` without yielding: what is sent between two awaits
    /// reaches the loop as one burst.
    fn send_now(&mut self, r: Resource) {
        self.tx.try_send(upsert(r, &mut self.revision)).unwrap();
    }

    /// Sends `r`, waiting for room in the channel.
    async fn send(&mut self, r: Resource) {
        let u = upsert(r, &mut self.revision);
        self.tx.send(u).await.unwrap();
    }

    fn in_sync(&mut self) {
        self.tx
            .try_send(Update::InSync {
                revision: self.revision,
            })
            .unwrap();
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        assert!(self.task.await.unwrap().unwrap());
    }
}

/// Runs the agent's loop on `tiered`'s cluster in a fresh namespace, sends
/// it each of `steps` (each one burst, delivered whole) once the previous
/// one's effects are in the kernel, and returns the transactions each
/// step committed, in order.
/// A burst of changes, and when what it committed is complete.
type Step = (Vec<Resource>, fn(&[Committed]) -> bool);

fn run_steps(steps: Vec<Step>) -> Vec<Vec<Committed>> {
    let ns = testkit::netns::Netns::create("hol").expect("a namespace (root)");
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Everything committed in the namespace from now on, in order.
        let mut monitor = Monitor::open().unwrap();
        let (committed_tx, committed) = std_mpsc::channel::<Committed>();
        let stop_watching = Arc::new(AtomicBool::new(false));
        let stopping = stop_watching.clone();
        let watching = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match monitor.wait_foreign(u32::MAX, Duration::from_millis(100)) {
                    Ok(Some(ForeignChange::Transaction(t))) => {
                        let names = |kind: ObjectKind| {
                            let mut v: Vec<String> = t
                                .objects
                                .iter()
                                .filter(|o| o.kind == kind && !o.deleted)
                                .map(|o| o.name.clone())
                                .collect();
                            v.sort();
                            v.dedup();
                            v
                        };
                        let _ = committed_tx.send(Committed {
                            elements_added: names(ObjectKind::Element),
                            rules_changed: names(ObjectKind::Rule),
                        });
                    }
                    Ok(Some(ForeignChange::Unknown)) => {
                        panic!("nf_tables notifications were lost")
                    }
                    Ok(None) => {}
                    Err(e) => panic!("monitor: {e}"),
                }
            }
        });
        let out = rt.block_on(async move {
            let mut agent = Agent::start(true, None);
            for r in resources(&testkit::cluster::tiered()) {
                agent.send_now(r);
            }
            agent.in_sync();
            // The first apply: one transaction.
            let cold = until(&committed, |seen| !seen.is_empty()).await;
            assert!(!cold[0].rules_changed.is_empty(), "{cold:?}");
            let mut out = Vec::new();
            for (burst, complete) in steps {
                // Sent in one go: the loop (on this thread) takes them as
                // one batch.
                for r in burst {
                    agent.send_now(r);
                }
                out.push(until(&committed, complete).await);
            }
            agent.stop().await;
            out
        });
        stop_watching.store(true, Ordering::Relaxed);
        watching.join().unwrap();
        out
    })
    .unwrap()
}

/// Waits (letting the loop run) until `complete` holds for what was
/// committed from now on; returns that.
async fn until(
    committed: &std_mpsc::Receiver<Committed>,
    complete: impl Fn(&[Committed]) -> bool,
) -> Vec<Committed> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_mins(1);
    while !complete(&seen) {
        assert!(
            Instant::now() < deadline,
            "still waiting; committed: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        while let Ok(c) = committed.try_recv() {
            seen.push(c);
        }
    }
    seen
}

/// Index of the first transaction for which `f` holds.
fn first(seen: &[Committed], f: impl Fn(&Committed) -> bool) -> Option<usize> {
    seen.iter().position(f)
}

fn adds_client_elements(c: &Committed) -> bool {
    c.elements_added.iter().any(|s| s.starts_with("cali40s-"))
}

fn changes_web_chain(c: &Committed) -> bool {
    c.rules_changed.iter().any(|s| s.starts_with("cali-tw-"))
}

fn both_seen(seen: &[Committed]) -> bool {
    first(seen, adds_client_elements).is_some() && first(seen, changes_web_chain).is_some()
}

/// A pod change that arrives with a tier change queued ahead of it (a full
/// compile) is programmed in a transaction of its own, before the tier
/// change, not together with it.
#[test]
fn a_pod_change_queued_behind_a_tier_change_is_programmed_first() {
    let steps = run_steps(vec![(vec![soft_tier(50), client(3)], both_seen)]);
    let seen = &steps[0];
    let pod = first(seen, adds_client_elements).unwrap();
    let tier = first(seen, changes_web_chain).unwrap();
    assert!(
        pod < tier,
        "the pod change went out after the tier change: {seen:?}"
    );
    assert!(
        !changes_web_chain(&seen[pod]),
        "one transaction for both: {seen:?}"
    );
}

/// A burst of pod changes behind a tier change: all programmed before the
/// tier change, in fewer transactions than changes; then the next burst
/// does the same.
#[test]
fn a_burst_of_pod_changes_coalesces_and_goes_before_the_tier_change() {
    const N: u8 = 20;
    let burst = |tier: u32, from: u8| {
        let mut v = vec![soft_tier(tier)];
        v.extend((from..from + N).map(client));
        v
    };
    let steps = run_steps(vec![
        (burst(50, 10), both_seen),
        (burst(300, 40), both_seen),
    ]);
    for seen in &steps {
        let tier = first(seen, changes_web_chain).unwrap();
        let pods: Vec<usize> = (0..seen.len())
            .filter(|&i| adds_client_elements(&seen[i]))
            .collect();
        assert!(
            pods.iter().all(|&i| i < tier),
            "pod changes went out with or after the tier change: {seen:?}"
        );
        assert!(
            pods.len() < usize::from(N),
            "{N} pod changes took {} transactions",
            pods.len()
        );
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().expect(name))
}

#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// A measurement, not a check: how long pod changes wait while slow
/// changes (each a full compile) keep coming, through the agent's loop and
/// programmer thread into nftables in a namespace of its own, with the
/// lanes off (everything queued goes out as one apply, as before) and on.
/// The benchmark's cluster (`bench::generate`, `scale_for(HOL_POLICIES)`:
/// 10,000 policies and 250,000 pods by default); then for `HOL_SECONDS`
/// (60) a new pod on another node every `HOL_POD_MS` (20) ms and the
/// slow change every `HOL_TIER_MS` (1000) ms: a network set flipping
/// pod sets between hash and interval sets, a full compile (see
/// [`slow_change`]; a tier change is incremental now). Latency runs from
/// the loop receiving a change to the kernel's acknowledgement of the
/// apply that programmed it (what `nftpolicy_programming_latency_seconds`
/// observes). Needs root; minutes and about 2 GiB at the default scale:
/// `cargo test --release -p nftpolicy --bin nftpolicy head_of_line_latency
/// -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement (minutes, about 2 GiB at the default scale): see the README's Performance section"]
fn head_of_line_latency() {
    let policies = usize::try_from(env_or("HOL_POLICIES", 10_000)).unwrap();
    let seconds = env_or("HOL_SECONDS", 60);
    let pod_every = Duration::from_millis(env_or("HOL_POD_MS", 20));
    let slow_every = Duration::from_millis(env_or("HOL_TIER_MS", 1000));
    let scale = bench::run::scale_for(policies);
    println!(
        "{} policies, {} pods; a pod every {pod_every:?}, a network-set flip (full compile) every {slow_every:?}, for {seconds} s",
        scale.policies, scale.pods
    );
    println!("lanes | pod changes | p50 ms | p99 ms | max ms | slow changes | slow p50 ms | applies with a slow change, p50 / p99 / max ms | applies | applies with pods | other applies p50 / p99 ms");
    for lanes in [false, true] {
        let ns = testkit::netns::Netns::create("holbench").expect("a namespace (root)");
        let row = ns
            .run(move || measure(scale, lanes, seconds, pod_every, slow_every))
            .unwrap();
        println!("{row}");
    }
}

/// The slow change: NetworkSet `ns0/hol`, labelled `tier: web`, so that
/// its namespace's labels and its own put it in the benchmark's
/// `pcns.team == "team0" && tier == "web"` selector sets, holding a /24
/// (`cidr`) or a single address. Each flip turns those pod sets from hash
/// sets into interval sets or back, which compiles in full (about a second
/// at 10,000 policies): the slowest change left, and one the lanes hold
/// back.
fn slow_change(cidr: bool) -> Resource {
    let net = if cidr {
        "198.19.0.0/24"
    } else {
        "198.19.0.1/32"
    };
    resources(&format!(
        "apiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata: {{name: hol, namespace: ns0, labels: {{tier: web}}}}\nspec: {{nets: [{net}]}}\n"
    ))
    .remove(0)
}

/// The next apply reported (letting the loop run meanwhile).
async fn next_apply(applies: &std_mpsc::Receiver<Programmed>) -> Programmed {
    loop {
        if let Ok(a) = applies.try_recv() {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn measure(
    scale: bench::Scale,
    lanes: bool,
    seconds: u64,
    pod_every: Duration,
    slow_every: Duration,
) -> String {
    use rand::SeedableRng;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (programmed, applies) = std_mpsc::channel();
    rt.block_on(async move {
        let mut agent = Agent::start(lanes, Some(programmed));
        let state = bench::generate(&scale);
        let initial: Vec<Resource> = state
            .resources()
            .map(std::borrow::Cow::into_owned)
            .collect();
        drop(state);
        for r in initial {
            agent.send(r).await;
        }
        agent.send(slow_change(false)).await;
        agent.in_sync();
        // The cold apply.
        let _cold = next_apply(&applies).await;

        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut pods = tokio::time::interval(pod_every);
        let mut slow = tokio::time::interval(slow_every);
        slow.tick().await;
        let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let (mut sent_pods, mut sent_slow) = (0usize, 0usize);
        let mut seen = Vec::new();
        loop {
            tokio::select! {
                _ = pods.tick() => {
                    let mut w = bench::workload(&scale, scale.pods + sent_pods, &mut rng);
                    w.spec.node = "node2".into();
                    agent.send(Resource::WorkloadEndpoint(w)).await;
                    sent_pods += 1;
                }
                _ = slow.tick() => {
                    sent_slow += 1;
                    agent.send(slow_change(sent_slow % 2 == 1)).await;
                }
                () = tokio::time::sleep_until(end) => break,
            }
            while let Ok(a) = applies.try_recv() {
                seen.push(a);
            }
        }
        // Until every change sent is programmed.
        let programmed = |seen: &[Programmed]| seen.iter().map(|p| p.received.len()).sum::<usize>();
        while programmed(&seen) < sent_pods + sent_slow {
            seen.push(next_apply(&applies).await);
        }
        agent.stop().await;

        let mut pod_ms = Vec::new();
        let mut slow_ms = Vec::new();
        let mut with_pods = 0;
        let mut full_ms = Vec::new();
        let mut fast_ms = Vec::new();
        for Programmed {
            received,
            started,
            acked,
        } in &seen
        {
            with_pods += usize::from(received.iter().any(|(_, k)| *k == Kind::WorkloadEndpoint));
            let ms = acked.duration_since(*started).as_secs_f64() * 1e3;
            if received.iter().any(|(_, k)| *k == Kind::NetworkSet) {
                full_ms.push(ms);
            } else {
                fast_ms.push(ms);
            }
            for (at, kind) in received {
                let ms = acked.duration_since(*at).as_secs_f64() * 1e3;
                match kind {
                    Kind::WorkloadEndpoint => pod_ms.push(ms),
                    _ => slow_ms.push(ms),
                }
            }
        }
        pod_ms.sort_by(f64::total_cmp);
        slow_ms.sort_by(f64::total_cmp);
        full_ms.sort_by(f64::total_cmp);
        fast_ms.sort_by(f64::total_cmp);
        format!(
            "{} | {} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} / {:.0} / {:.0} | {} | {} | {:.0} / {:.0}",
            if lanes { "on" } else { "off" },
            pod_ms.len(),
            percentile(&pod_ms, 0.5),
            percentile(&pod_ms, 0.99),
            pod_ms.last().copied().unwrap_or(f64::NAN),
            slow_ms.len(),
            percentile(&slow_ms, 0.5),
            percentile(&full_ms, 0.5),
            percentile(&full_ms, 0.99),
            full_ms.last().copied().unwrap_or(f64::NAN),
            seen.len(),
            with_pods,
            percentile(&fast_ms, 0.5),
            percentile(&fast_ms, 0.99),
        )
    })
}

/// A Tier and its policy.
fn guard_tier(name: &str) -> [Resource; 2] {
    [
        resources(&format!(
            "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: {name}}}\nspec: {{order: 10}}\n"
        ))
        .remove(0),
        resources(&format!(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}.web}}\nspec:\n  tier: {name}\n  selector: app == 'web'\n  types: [Ingress]\n  ingress: [{{action: Pass}}]\n"
        ))
        .remove(0),
    ]
}

/// A policy of a new tier, queued with the tier and a pod change, waits
/// for the tier — whether it came after the tier or before it: the pod's
/// transaction comes first and changes no chain, so the policy is never
/// programmed as rejected for want of its tier (which would drop web's
/// traffic in between).
#[test]
fn a_policy_waits_for_its_tier_while_a_pod_change_goes_first() {
    let [tier, policy] = guard_tier("guard");
    let [tier2, policy2] = guard_tier("guard2");
    let steps = run_steps(vec![
        (vec![tier, policy, client(5)], both_seen),
        (vec![policy2, tier2, client(6)], both_seen),
    ]);
    for seen in &steps {
        let pod = first(seen, adds_client_elements).unwrap();
        let tier = first(seen, changes_web_chain).unwrap();
        assert!(pod < tier, "{seen:?}");
        assert!(
            seen[..tier].iter().all(|c| c.rules_changed.is_empty()),
            "a chain changed before the tier was programmed: {seen:?}"
        );
    }
}
