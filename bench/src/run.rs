//! The measurements. Each (backend, point) runs in its own child process
//! (`nftbench worker …`) inside its own fresh network namespace, so CPU time
//! and peak RSS are that backend's alone.

use std::time::Instant;

use model::calico::{
    Action, NetworkPolicy, ObjectMeta, PolicySpec, PolicyType, Port, Protocol, Resource, Rule,
};
use model::state::ClusterState;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use testkit::netns::Netns;

use crate::backends::{self, Changes, Size};
use crate::{generate, workload, Scale, NODE_UNDER_TEST};

/// The incremental operations, timed from the state change to the ack.
pub const OPS: [&str; 4] = ["pod_add", "pod_relabel", "policy_add", "policy_delete"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleResult {
    pub backend: String,
    pub policies: usize,
    pub pods: usize,
    pub local_endpoints: usize,
    pub namespaces: usize,
    pub cold_ms: f64,
    /// Per operation: every sample in ms.
    pub ops: Vec<(String, Vec<f64>)>,
    pub size: Size,
    /// /proc/meminfo `Slab:` growth over the cold apply (kB; noisy, whole
    /// machine).
    pub slab_kb_delta: i64,
    pub cpu_user_ms: f64,
    pub cpu_sys_ms: f64,
    /// CPU of the helper processes (nft, iptables-restore, ipset).
    pub children_cpu_ms: f64,
    pub peak_rss_kib: u64,
    /// One full compile of the final state alone (nftables IR or iptables
    /// text): the part of every incremental operation that does not depend
    /// on the backend's transport.
    pub compile_ms: f64,
    /// Peak RSS right after generating the cluster (before any backend work).
    pub baseline_rss_kib: u64,
    /// Tables per family the nftables backend cut the ruleset into (what
    /// `--table-groups auto` chose); 0 for the others.
    #[serde(default)]
    pub table_groups: usize,
}

pub fn scale_for(policies: usize) -> Scale {
    // 25 pods per policy: 10,000 policies → 250,000 pods, whose selector
    // sets hold about 340,000 elements.
    let pods = (policies * 25).clamp(1_000, 250_000);
    let mut s = Scale::new(policies, pods);
    s.local_endpoints = if policies >= 5_000 { 100 } else { 50 };
    // `NFTBENCH_LOCAL_ENDPOINTS` overrides it: fewer local endpoints means
    // fewer namespaces with policies active here, so a smaller table — what
    // one table of several split by namespace would hold (README,
    // Performance: what a policy change costs against the table's size).
    if let Some(n) = std::env::var("NFTBENCH_LOCAL_ENDPOINTS").ok().map(|v| {
        v.parse::<usize>()
            .unwrap_or_else(|e| panic!("NFTBENCH_LOCAL_ENDPOINTS={v:?}: {e}"))
    }) {
        s.local_endpoints = n.clamp(1, pods);
    }
    s
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn slab_kb() -> i64 {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    m.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn rusage(who: i32) -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    (ms(ru.ru_utime), ms(ru.ru_stime))
}

/// An extra policy in namespace ns0 selecting the app of local endpoint 0.
pub fn extra_policy(name: &str, app: &str) -> NetworkPolicy {
    NetworkPolicy {
        api_version: model::calico::API_VERSION.into(),
        metadata: ObjectMeta {
            name: name.to_owned(),
            namespace: Some(crate::namespace_name(0).into()),
            ..Default::default()
        },
        spec: PolicySpec {
            order: Some(500.0),
            selector: format!("app == '{app}'"),
            types: vec![PolicyType::Ingress],
            ingress: vec![Rule {
                action: Action::Allow,
                protocol: Some(Protocol::Tcp),
                source: model::calico::EntityRule {
                    selector: Some("tier == 'web'".into()),
                    ..Default::default()
                },
                destination: model::calico::EntityRule {
                    ports: vec![Port::single(7000), Port::single(7001)],
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Default::default()
        },
    }
}

/// Upserts `r` into `state`; the change as the compiler wants it.
fn change(state: &mut ClusterState, r: Resource) -> Changes {
    let key = r.key();
    let old = state.upsert(r);
    Changes::from([(key, old)])
}

/// Cold programming and the incremental operations of one backend at one
/// scale, in a fresh network namespace.
pub fn scale_worker(backend: &str, policies: usize, reps: usize) -> anyhow::Result<ScaleResult> {
    scale_worker_with(backend, policies, reps, &backends::Options::default())
}

/// [`scale_worker`] with compile options (`nftbench worker-scale … --fused-lookup`).
pub fn scale_worker_with(
    backend: &str,
    policies: usize,
    reps: usize,
    options: &backends::Options,
) -> anyhow::Result<ScaleResult> {
    let scale = scale_for(policies);
    let mut state = generate(&scale);
    let baseline_rss_kib = vm_hwm_kib();
    let _ns = Netns::enter("bench")?;
    let (u0, s0) = rusage(libc::RUSAGE_SELF);
    let mut dp = backends::open_with(backend, NODE_UNDER_TEST, options)?;
    let slab0 = slab_kb();
    let t = Instant::now();
    dp.apply(&state, &Changes::new())?;
    let cold_ms = t.elapsed().as_secs_f64() * 1e3;
    let slab_kb_delta = slab_kb() - slab0;
    let size = dp.size();
    let table_groups = dp.table_groups();
    // `NFTBENCH_WATCH_KERNEL=1`: listen to nf_tables notifications from
    // here on, as the agent does after its first commit (`--watch-kernel`,
    // on by default): while a socket listens, every commit makes the
    // kernel build a notification per object it touches.
    let _listener = match std::env::var("NFTBENCH_WATCH_KERNEL").as_deref() {
        Ok("1") => Some(Listener::start()?),
        Ok("0") | Err(_) => None,
        Ok(other) => anyhow::bail!("NFTBENCH_WATCH_KERNEL={other:?}: 1 or 0"),
    };

    let local_app = state
        .workload_endpoints()
        .find(|(_, w)| w.spec.node == NODE_UNDER_TEST)
        .and_then(|(_, w)| w.metadata.labels.get("app").map(str::to_owned))
        .unwrap_or_else(|| "app0".into());
    let mut rng = StdRng::seed_from_u64(99);
    let mut ops: Vec<(String, Vec<f64>)> =
        OPS.iter().map(|o| (o.to_string(), Vec::new())).collect();
    // `NFTBENCH_GAP_MS`: idle time before each round. Back to back (the
    // default) every round finds caches warm from the last; an agent sees
    // changes seconds apart, and with 500 ms gaps every operation here
    // took 1.5-3x as long (README, Performance).
    let gap = std::env::var("NFTBENCH_GAP_MS")
        .ok()
        .map(|ms| ms.parse().map(std::time::Duration::from_millis))
        .transpose()
        .map_err(|e| anyhow::anyhow!("NFTBENCH_GAP_MS: {e}"))?;
    for r in 0..reps {
        if let Some(gap) = gap {
            std::thread::sleep(gap);
        }
        // A new remote pod carrying a popular app and tier=web: it joins
        // the selectors that match those labels.
        let mut w = workload(&scale, scale.pods + r, &mut rng);
        w.spec.node = "node2".into();
        w.metadata.labels.insert("app".into(), local_app.clone());
        w.metadata.labels.insert("tier".into(), "web".into());
        let key_added = Resource::WorkloadEndpoint(w.clone()).key();
        let t = Instant::now();
        let changes = change(&mut state, Resource::WorkloadEndpoint(w));
        dp.apply(&state, &changes)?;
        ops[0].1.push(t.elapsed().as_secs_f64() * 1e3);

        // The pod just added changes its labels: it leaves the selectors
        // it joined (an existing pod's relabel that matches no selector
        // before or after would cost nothing and measure nothing).
        let mut w = state
            .endpoint(&key_added)
            .expect("added above")
            .to_workload_endpoint(&key_added);
        w.metadata.labels.insert("app".into(), "relabelled".into());
        w.metadata.labels.insert("tier".into(), "batch".into());
        let t = Instant::now();
        let changes = change(&mut state, Resource::WorkloadEndpoint(w));
        dp.apply(&state, &changes)?;
        ops[1].1.push(t.elapsed().as_secs_f64() * 1e3);

        let p = extra_policy(&format!("bench-extra-{r}"), &local_app);
        let key = Resource::NetworkPolicy(p.clone()).key();
        let t = Instant::now();
        let changes = change(&mut state, Resource::NetworkPolicy(p));
        dp.apply(&state, &changes)?;
        ops[2].1.push(t.elapsed().as_secs_f64() * 1e3);

        let t = Instant::now();
        let old = state.remove(&key);
        dp.apply(&state, &Changes::from([(key.clone(), old)]))?;
        ops[3].1.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (u1, s1) = rusage(libc::RUSAGE_SELF);
    // The agent's peak: cold programming and the operations. Taken before
    // the one-shot compile below, which is the benchmark's own measurement
    // (it builds a second ruleset beside the dataplane's; the agent never
    // holds two).
    let peak_rss_kib = vm_hwm_kib();
    let opts = compiler::CompileOptions {
        fused_lookup: options.fused_lookup,
        ..compiler::CompileOptions::new(NODE_UNDER_TEST)
    };
    let t = Instant::now();
    if backend == "iptables" {
        compiler::compile_iptables(&state, &opts)?;
    } else {
        compiler::compile_nftables(&state, &opts)?;
    }
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let (cu, cs) = rusage(libc::RUSAGE_CHILDREN);
    drop(dp);
    Ok(ScaleResult {
        backend: backend.to_owned(),
        policies,
        pods: scale.pods,
        local_endpoints: scale.local_endpoints,
        namespaces: scale.namespaces,
        cold_ms,
        ops,
        size,
        slab_kb_delta,
        cpu_user_ms: u1 - u0,
        cpu_sys_ms: s1 - s0,
        children_cpu_ms: cu + cs,
        peak_rss_kib,
        compile_ms,
        baseline_rss_kib,
        table_groups,
    })
}

pub fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let idx = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[idx.min(v.len() - 1)]
}

/// A thread draining nf_tables notifications in the current network
/// namespace until dropped (what the agent's kernel watch reads).
struct Listener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    fn start() -> anyhow::Result<Listener> {
        use std::sync::atomic::Ordering;
        // Opened on this thread, which is in the benchmark's namespace.
        let mut monitor = programmer::monitor::Monitor::open()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                // Our own commits count as foreign here (no port to
                // ignore): the point is reading them, as the agent must.
                let _ = monitor.wait_foreign(u32::MAX, std::time::Duration::from_millis(50));
            }
        });
        Ok(Listener {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
