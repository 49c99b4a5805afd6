//! Does the agent's programming path keep memory under pod churn? Replays a
//! `cargo xtask soak`-like stream in-process (the soak cluster: 10
//! namespaces × 5 policies, PODS pods, the first 100 on the node under
//! test; then 40 % role flips, 30 % new pods, 30 % deletions) through what
//! the agent's programmer thread does: `watcher::Cache` → the incremental
//! compiler → `NftProgrammer` (in a private network namespace; root), one
//! apply per BATCH changes. Every REPORT changes it prints the live heap
//! (a counting global allocator), the allocation count, VmRSS, and what
//! glibc malloc holds in all its arenas and how much of that is free
//! (`mallinfo2`): live heap flat while RSS grows is fragmentation.
//!
//! `cargo run --release -p bench --example churn_memory -- [CHANGES] [MODE] [PODS] [BATCH] [REPORT] [threaded]`
//! with MODE `full` (default), `no-kernel` (compile, but program nothing)
//! or `cache-only` (fold into the cache alone); `threaded` decodes the
//! changes on a second thread, as the agent does (etcd watch on tokio
//! threads, programming on its own thread).
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use compiler::{CompileOptions, IncrementalCompiler, Outcome};
use model::calico::{Resource, ResourceKey};
use model::kube::Manifest;
use rand::{Rng, SeedableRng};
use watcher::{Cache, Update};

/// `System`, counting the bytes live and the allocations made.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NAMESPACES: usize = 10;
const POLICIES_PER_NAMESPACE: usize = 5;
const LOCAL_PODS: usize = 100;
const OTHER_NODES: usize = 20;
const NODE: &str = "node1";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Full,
    NoKernel,
    CacheOnly,
}

/// Pod `i` as `xtask/src/cluster.rs` writes it.
fn pod_yaml(y: &mut String, i: usize, role: &str) {
    let node = if i < LOCAL_PODS {
        NODE.to_owned()
    } else {
        format!("node-{}", 2 + i % OTHER_NODES)
    };
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 1, 0)) + i as u32);
    let _ = writeln!(
        y,
        "---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: pod-{i}, namespace: ns-{}, labels: {{app: app-{}, role: {role}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{containerPort: 80, protocol: TCP}}]}}]}}\n\
         status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}",
        i % NAMESPACES,
        i % POLICIES_PER_NAMESPACE,
    );
}

fn initial_role(i: usize) -> &'static str {
    if i.is_multiple_of(3) {
        "frontend"
    } else {
        "backend"
    }
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

fn cluster_yaml(pods: usize) -> String {
    let mut y = String::new();
    for n in 0..NAMESPACES {
        let _ = writeln!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}}}"
        );
        for k in 0..POLICIES_PER_NAMESPACE {
            let _ = writeln!(
                y,
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: app-{k}-from-frontend, namespace: ns-{n}}}\n\
                 spec:\n  podSelector: {{matchLabels: {{app: app-{k}}}}}\n  \
                 ingress: [{{from: [{{podSelector: {{matchLabels: {{role: frontend}}}}}}], \
                 ports: [{{port: 80}}]}}]"
            );
        }
    }
    for i in 0..pods {
        pod_yaml(&mut y, i, initial_role(i));
    }
    y
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

/// What the agent's programmer thread holds.
struct Agent {
    cache: Cache,
    changes: BTreeMap<ResourceKey, Option<Resource>>,
    compiler: IncrementalCompiler,
    programmer: Option<programmer::NftProgrammer>,
    revision: i64,
}

impl Agent {
    /// `Worker::fold`.
    fn fold(&mut self, updates: Vec<Update>) {
        for u in updates {
            if let Update::Upsert { key, .. } | Update::Delete { key, .. } = &u {
                if !self.changes.contains_key(key) {
                    let old = self.cache.state.get(key).cloned();
                    self.changes.insert(key.clone(), old);
                }
            }
            self.cache.apply(u);
        }
    }

    /// `Worker::apply` / `Programmer::apply` (nftables, never `full`).
    fn apply(&mut self, mode: Mode) -> anyhow::Result<()> {
        if mode == Mode::CacheOnly {
            self.changes.clear();
            return Ok(());
        }
        let outcome = self.compiler.update(&self.cache.state, &self.changes)?;
        self.changes.clear();
        let Some(p) = &mut self.programmer else {
            return Ok(());
        };
        match outcome {
            Outcome::Elements(delta) => p.apply_elements(&delta)?,
            Outcome::Patch(patch) => p.apply_patch(&patch)?,
            Outcome::Rebuilt => p.apply(self.compiler.ruleset())?,
        };
        Ok(())
    }

    fn upsert(&mut self, r: Resource) -> Update {
        self.revision += 1;
        Update::Upsert {
            key: r.key(),
            resource: r,
            revision: self.revision,
        }
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
    let mut agent = Agent {
        cache: Cache::new(),
        changes: BTreeMap::new(),
        compiler: IncrementalCompiler::new(CompileOptions::new(NODE)),
        programmer: match mode {
            Mode::Full => {
                let mut p = programmer::NftProgrammer::new()?;
                p.adopt()?;
                Some(p)
            }
            _ => None,
        },
        revision: 0,
    };
    let initial: Vec<Update> = resources(&cluster_yaml(pods))?
        .into_iter()
        .map(|r| agent.upsert(r))
        .collect();
    agent.fold(initial);
    agent.fold(vec![Update::InSync {
        revision: agent.revision,
    }]);
    agent.apply(mode)?;

    println!("changes objects live_heap_kb allocations_k vm_rss_kb malloc_heap_kb malloc_free_kb");
    let print = |done: usize, objects: usize| {
        // SAFETY: a plain glibc query, no arguments.
        let m = unsafe { libc::mallinfo2() };
        println!(
            "{done} {objects} {} {} {} {} {}",
            LIVE_BYTES.load(Ordering::Relaxed) / 1024,
            ALLOCATIONS.load(Ordering::Relaxed) / 1000,
            vm_rss_kb(),
            // What glibc holds from the system (all arenas and mmapped
            // chunks), and how much of it is free chunks it keeps.
            (m.arena + m.hblkhd) / 1024,
            m.fordblks / 1024,
        );
    };
    print(0, agent.cache.state.len());

    let mut churn = Churn::new(pods, agent.revision);
    let mut done = 0;
    let mut step = |agent: &mut Agent, updates: Vec<Update>| -> anyhow::Result<()> {
        agent.fold(updates);
        agent.apply(mode)?;
        let before = done;
        done += batch;
        if done / report != before / report {
            print(done, agent.cache.state.len());
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
