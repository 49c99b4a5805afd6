//! The agent's loop with a real kernel: `serve` and its programmer thread
//! programming nftables in a namespace of the test's own, fed updates as a
//! datastore delivers them; what reaches the kernel is watched through
//! nf_tables' own change notifications (one per committed transaction, in
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
    testkit::cluster::state(yaml).resources().cloned().collect()
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

/// Runs the agent's loop on `tiered`'s cluster in a fresh namespace, sends
/// it each of `steps` (each one burst, delivered whole) once the previous
/// one's effects are in the kernel, and returns the transactions each
/// step committed, in order.
fn run_steps(steps: Vec<(Vec<Resource>, fn(&[Committed]) -> bool)>) -> Vec<Vec<Committed>> {
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
            let dataplane =
                ::dataplane::open(::dataplane::Kind::Nftables, iptables::Backend::Legacy)
                    .unwrap();
            let node = Node::new(Pipeline::new(CompileOptions::new("node1"), dataplane));
            let (tx, updates) = mpsc::channel(4096);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let agent = tokio::spawn(serve(
                LoopOptions {
                    whole_at_insync_only: false,
                    lanes: true,
                    resync_interval: Duration::from_secs(3600),
                    watch: crate::tamper::WatchArgs {
                        watch_kernel: false,
                    },
                    table_size_check: None,
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
            let mut revision = 0;
            for r in resources(&testkit::cluster::tiered()) {
                tx.try_send(upsert(r, &mut revision)).unwrap();
            }
            tx.try_send(Update::InSync { revision }).unwrap();
            // The first apply: one transaction.
            let cold = until(&committed, |seen| !seen.is_empty()).await;
            assert!(!cold[0].rules_changed.is_empty(), "{cold:?}");
            let mut out = Vec::new();
            for (burst, complete) in steps {
                // Sent in one go: the loop (on this thread) takes them as
                // one batch.
                for r in burst {
                    tx.try_send(upsert(r, &mut revision)).unwrap();
                }
                out.push(until(&committed, complete).await);
            }
            let _ = stop_tx.send(());
            assert!(agent.await.unwrap().unwrap());
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
    let deadline = Instant::now() + Duration::from_secs(60);
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
    assert!(pod < tier, "the pod change went out after the tier change: {seen:?}");
    assert!(!changes_web_chain(&seen[pod]), "one transaction for both: {seen:?}");
}

/// A burst of pod changes behind a tier change: all programmed before the
/// tier change, in fewer transactions than changes; then the next burst
/// does the same (a tier change is overtaken once, and only by what was
/// queued with it).
#[test]
fn a_burst_of_pod_changes_coalesces_and_goes_before_the_tier_change() {
    const N: u8 = 20;
    let burst = |tier: u32, from: u8| {
        let mut v = vec![soft_tier(tier)];
        v.extend((from..from + N).map(client));
        v
    };
    let steps = run_steps(vec![(burst(50, 10), both_seen), (burst(300, 40), both_seen)]);
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
