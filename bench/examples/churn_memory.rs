//! Does the agent's programming path keep memory under pod churn? Replays a
//! `cargo xtask soak`-like stream in-process (the soak cluster: 10
//! namespaces × 5 policies, PODS pods, the first 100 on the node under
//! test; then 40 % role flips, 30 % new pods, 30 % deletions) through what
//! the agent's programmer thread does — the same `dataplane::Node`: its
//! `watcher::Cache`, the incremental compiler and the nftables backend (in a
//! private network namespace; root), one apply per BATCH changes. Every REPORT changes it prints the live heap
//! (a counting global allocator), the allocation count, VmRSS, and what
//! glibc malloc holds in all its arenas and how much of that is free
//! (`mallinfo2`): live heap flat while RSS grows is fragmentation.
//!
//! `cargo run --release -p bench --example churn_memory -- [CHANGES] [MODE] [PODS] [BATCH] [REPORT] [threaded]`
//! with MODE `full` (default), `no-kernel` (compile, but program nothing)
//! or `cache-only` (fold into the cache alone); `threaded` decodes the
//! changes on a second thread, as the agent does (etcd watch on tokio
//! threads, programming on its own thread).
use std::collections::BTreeMap;

use compiler::CompileOptions;
use dataplane::{Dataplane, Kind, Node, Pipeline};
use model::calico::Resource;
use model::kube::Manifest;
use rand::{Rng, SeedableRng};
use testkit::cluster::{cluster_yaml, initial_role, pod_yaml, NODE};
use watcher::{Cache, Update};

#[global_allocator]
static GLOBAL: bench::alloc_count::Counting = bench::alloc_count::Counting;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Full,
    NoKernel,
    CacheOnly,
}

/// The Calico resources the policy controller writes for `yaml`.
fn resources(yaml: &str) -> anyhow::Result<Vec<Resource>> {
    let (manifests, errors) = watcher::files::parse_documents("churn", yaml);
    anyhow::ensure!(errors.is_empty(), "{errors:?}");
    let mut out = Vec::new();
    for m in manifests {
        match m {
            Manifest::Calico(r) => out.push(r),
            Manifest::Kube(obj) => out.extend(model::convert::kube_to_calico(&obj)?),
        }
    }
    Ok(out)
}

fn vm_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What the agent's programmer thread holds: a [`Node`] (the state, the
/// incremental compiler and the backend), or with `cache-only` the cache
/// alone.
enum Agent {
    Node(Box<Node>),
    CacheOnly(Cache),
}

impl Agent {
    fn fold(&mut self, updates: Vec<Update>) {
        match self {
            Agent::Node(node) => node.fold(updates),
            Agent::CacheOnly(cache) => {
                for u in updates {
                    cache.apply(u);
                }
            }
        }
    }

    fn apply(&mut self) -> anyhow::Result<()> {
        if let Agent::Node(node) = self {
            node.apply()?;
        }
        Ok(())
    }

    fn objects(&self) -> usize {
        match self {
            Agent::Node(node) => node.state().len(),
            Agent::CacheOnly(cache) => cache.state.len(),
        }
    }
}

fn upsert(revision: &mut i64, r: Resource) -> Update {
    *revision += 1;
    Update::Upsert {
        key: r.key(),
        resource: r,
        revision: *revision,
    }
}

/// The soak's change stream (`xtask/src/soak.rs` `write_changes`), as the
/// agent receives it: 40 % role flips, 30 % new pods, 30 % deletions (only
/// while more than half the pods are left), a pod at most once a batch.
struct Churn {
    rng: rand::rngs::StdRng,
    pods: usize,
    live: Vec<usize>,
    roles: BTreeMap<usize, &'static str>,
    next_pod: usize,
    revision: i64,
}

impl Churn {
    fn new(pods: usize, revision: i64) -> Churn {
        Churn {
            rng: rand::rngs::StdRng::seed_from_u64(1),
            pods,
            live: (0..pods).collect(),
            roles: (0..pods).map(|i| (i, initial_role(i))).collect(),
            next_pod: pods,
            revision,
        }
    }

    fn batch(&mut self, n: usize) -> anyhow::Result<Vec<Update>> {
        let mut updates = Vec::new();
        let mut touched = std::collections::BTreeSet::new();
        for _ in 0..n {
            let roll = self.rng.random_range(0..100);
            let pick = if roll >= 40 && (roll < 70 || self.live.len() <= self.pods / 2) {
                None
            } else {
                Some(self.rng.random_range(0..self.live.len()))
            }
            .filter(|&at| !touched.contains(&self.live[at]));
            let mut y = String::new();
            let delete = match pick {
                Some(at) if roll < 40 => {
                    let pod = self.live[at];
                    let role = self.roles.get_mut(&pod).expect("live pods have a role");
                    *role = if *role == "frontend" {
                        "backend"
                    } else {
                        "frontend"
                    };
                    pod_yaml(&mut y, pod, role);
                    touched.insert(pod);
                    false
                }
                Some(at) => {
                    let pod = self.live.swap_remove(at);
                    let role = self.roles.remove(&pod).expect("live pods have a role");
                    pod_yaml(&mut y, pod, role);
                    touched.insert(pod);
                    true
                }
                None => {
                    let pod = self.next_pod;
                    self.next_pod += 1;
                    self.live.push(pod);
                    self.roles.insert(pod, initial_role(pod));
                    pod_yaml(&mut y, pod, initial_role(pod));
                    touched.insert(pod);
                    false
                }
            };
            for r in resources(&y)? {
                self.revision += 1;
                updates.push(if delete {
                    Update::Delete {
                        key: r.key(),
                        revision: self.revision,
                    }
                } else {
                    Update::Upsert {
                        key: r.key(),
                        resource: r,
                        revision: self.revision,
                    }
                });
            }
        }
        Ok(updates)
    }
}

fn main() -> anyhow::Result<()> {
    let arg = |n: usize| std::env::args().nth(n);
    let total: usize = arg(1).map_or(Ok(60_000), |a| a.parse())?;
    let mode = match arg(2).as_deref() {
        None | Some("full") => Mode::Full,
        Some("no-kernel") => Mode::NoKernel,
        Some("cache-only") => Mode::CacheOnly,
        Some(m) => anyhow::bail!("MODE is full, no-kernel or cache-only, not {m}"),
    };
    let pods: usize = arg(3).map_or(Ok(10_000), |a| a.parse())?;
    let batch: usize = arg(4).map_or(Ok(20), |a| a.parse())?;
    let report: usize = arg(5).map_or(Ok(5_000), |a| a.parse())?;
    let threaded = arg(6).as_deref() == Some("threaded");

    let _ns = match mode {
        Mode::Full => Some(testkit::netns::Netns::enter("churnmem")?),
        _ => None,
    };
    let mut revision = 0;
    let mut agent = match mode {
        Mode::CacheOnly => Agent::CacheOnly(Cache::new()),
        Mode::Full | Mode::NoKernel => {
            let backend: Box<dyn Dataplane> = match mode {
                Mode::Full => dataplane::open(Kind::Nftables, iptables::Backend::Legacy)?,
                _ => Box::new(dataplane::Discard),
            };
            Agent::Node(Box::new(Node::new(Pipeline::new(
                CompileOptions::new(NODE),
                backend,
            ))))
        }
    };
    let initial: Vec<Update> = resources(&cluster_yaml(pods))?
        .into_iter()
        .map(|r| upsert(&mut revision, r))
        .collect();
    agent.fold(initial);
    agent.fold(vec![Update::InSync { revision }]);
    agent.apply()?;

    println!("changes objects live_heap_kb allocations_k vm_rss_kb malloc_heap_kb malloc_free_kb");
    let print = |done: usize, objects: usize| {
        // SAFETY: a plain glibc query, no arguments.
        let m = unsafe { libc::mallinfo2() };
        println!(
            "{done} {objects} {} {} {} {} {}",
            bench::alloc_count::live_bytes() / 1024,
            bench::alloc_count::allocations() / 1000,
            vm_rss_kb(),
            // What glibc holds from the system (all arenas and mmapped
            // chunks), and how much of it is free chunks it keeps.
            (m.arena + m.hblkhd) / 1024,
            m.fordblks / 1024,
        );
    };
    print(0, agent.objects());

    let mut churn = Churn::new(pods, revision);
    let mut done = 0;
    let mut step = |agent: &mut Agent, updates: Vec<Update>| -> anyhow::Result<()> {
        agent.fold(updates);
        agent.apply()?;
        let before = done;
        done += batch;
        if done / report != before / report {
            print(done, agent.objects());
        }
        Ok(())
    };
    let batches = total.div_ceil(batch);
    if threaded {
        // As in the agent: decoded on one thread, folded and programmed on
        // another (glibc gives each thread its own malloc arena).
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Update>>(4);
        std::thread::scope(|s| -> anyhow::Result<()> {
            let producer = s.spawn(move || -> anyhow::Result<()> {
                for _ in 0..batches {
                    if tx.send(churn.batch(batch)?).is_err() {
                        break;
                    }
                }
                Ok(())
            });
            for updates in rx {
                step(&mut agent, updates)?;
            }
            producer.join().expect("the producer does not panic")
        })?;
    } else {
        for _ in 0..batches {
            let updates = churn.batch(batch)?;
            step(&mut agent, updates)?;
        }
    }
    Ok(())
}
