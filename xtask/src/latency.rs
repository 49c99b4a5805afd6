//! `cargo xtask latency`: programming-latency numbers (a benchmark, not a
//! test). For each pod count: a real etcd (or, with `--datastore
//! kubernetes`, the fake API server — a test double — holding pods the
//! size a real API server serves), one `nftpolicy run` agent (the
//! nftables backend) in a node namespace of its own, a cluster of that many
//! pods written with `nftpolicy apply` (or into the API server); then one
//! pod's labels change `--changes` times, each change applied and awaited,
//! and the agent's `nftpolicy_programming_latency_seconds` histogram (the
//! part those changes added: from the agent receiving the change to the
//! kernel's acknowledgement) gives p50 and p99 estimates. The agent's
//! resident memory (VmRSS, and its peak VmHWM) and CPU time are read from
//! /proc after the initial sync.
//!
//! The cluster is [`crate::cluster`]'s: 10 namespaces, `pods` pods (100 of
//! them on this node, the rest on 20 other nodes), 5 policies per namespace
//! selecting `app=app-<k>` pods and allowing ingress from `role=frontend`
//! pods of the namespace. The changing pod is a remote one whose `role` flips between frontend and
//! backend, so each change moves an address in or out of a source set.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lab::agents::{nftpolicy_etcd, Agents};
use lab::{EtcdServer, Lab};

use crate::cluster::{
    api_namespaces_and_policies, api_pod, cluster_yaml, histogram, initial_role, pod_yaml,
    LATENCY_METRIC, LOCAL_PODS, NODE,
};

/// How long the agent may take to apply the whole cluster, or one change.
const APPLY_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args)]
pub struct LatencyArgs {
    /// Pod counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pods: Vec<usize>,
    /// Label changes per pod count.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// What the agent watches: etcd (written with `nftpolicy apply`) or
    /// the Kubernetes API server (the fake one, a test double: KDD mode).
    #[arg(long, value_enum, default_value_t = Store::Etcd)]
    datastore: Store,
    /// Measure a release build of the agent (as deployed).
    #[arg(long)]
    release: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    Etcd,
    Kubernetes,
}

pub fn run(args: &LatencyArgs) -> anyhow::Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("cargo xtask latency needs root: it creates a network namespace");
    }
    let nftpolicy = super::build_nftpolicy_profile(args.release)?;
    println!(
        "{} datastore, {} agent",
        match args.datastore {
            Store::Etcd => "etcd",
            Store::Kubernetes => "Kubernetes API (fake API server, a test double)",
        },
        if args.release { "release" } else { "debug" }
    );
    println!(
        "{:>7} {:>8} {:>9} {:>10} {:>10} {:>12} {:>9} {:>9} {:>9}",
        "pods", "changes", "initial", "p50", "p99", "mean/change", "RSS", "peak RSS", "sync CPU"
    );
    for &pods in &args.pods {
        let m = measure(&nftpolicy, pods, args.changes, args.datastore)?;
        println!(
            "{:>7} {:>8} {:>8.1}s {:>8.1}ms {:>8.1}ms {:>10.1}ms {:>6.0}MiB {:>6.0}MiB {:>8.1}s",
            pods,
            args.changes,
            m.initial.as_secs_f64(),
            m.p50 * 1e3,
            m.p99 * 1e3,
            m.mean * 1e3,
            m.rss_kib as f64 / 1024.0,
            m.peak_kib as f64 / 1024.0,
            m.sync_cpu.as_secs_f64(),
        );
    }
    println!(
        "(p50/p99: linear interpolation inside the histogram's buckets; mean: sum/count; \
         RSS after the initial sync; sync CPU: the agent's user+system time until then)"
    );
    let (pod, wep) = wire_sizes()?;
    println!(
        "one pod on the wire: {pod} bytes of JSON from the API server (KDD), \
         {wep} bytes of WorkloadEndpoint from etcd (etcd mode)"
    );
    Ok(true)
}

struct Measured {
    /// Writing the whole cluster until the agent had applied it (etcd), or
    /// from the agent's start until it had applied the cluster the API
    /// server already held (Kubernetes).
    initial: Duration,
    p50: f64,
    p99: f64,
    mean: f64,
    rss_kib: u64,
    peak_kib: u64,
    sync_cpu: Duration,
}

/// The size of one pod as the API server sends it and of the
/// WorkloadEndpoint etcd mode stores for it.
fn wire_sizes() -> anyhow::Result<(usize, usize)> {
    let pod = api_pod(LOCAL_PODS + 1, "frontend");
    let bytes = serde_json::to_vec(&pod)?.len();
    let mut out = Vec::new();
    model::kube::parse_value("pod", 0, pod, &mut out)?;
    let Some(model::kube::Manifest::Kube(obj)) = out.pop() else {
        bail!("not a Kubernetes object");
    };
    let wep = model::convert::kube_to_calico(&obj)?.context("the pod has an endpoint")?;
    Ok((bytes, wep.to_json().len()))
}

/// VmRSS and VmHWM of `pid`, in KiB.
pub(crate) fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{name} of process {pid}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// User + system CPU time of `pid`.
fn cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

fn measure(
    nftpolicy: &Path,
    pods: usize,
    changes: usize,
    store: Store,
) -> anyhow::Result<Measured> {
    if store == Store::Kubernetes {
        return measure_kubernetes(nftpolicy, pods, changes);
    }
    let etcd = EtcdServer::start()?;
    let lab = Lab::build(&[], &[], &[NODE])?;
    let mut agents = Agents::start(&lab, &etcd, nftpolicy, "nftables", &[])?;
    let dir = lab.workdir().join("cluster");
    std::fs::create_dir_all(&dir)?;
    let cluster = dir.join("cluster.yaml");
    std::fs::write(&cluster, cluster_yaml(pods))?;
    let started = Instant::now();
    nftpolicy_etcd(nftpolicy, &etcd, "apply", &[cluster])?;
    agents.wait_applied(etcd.revision()?, APPLY_TIMEOUT)?;
    let initial = started.elapsed();
    let pid = agents.pid(NODE)?.context("the agent is not running")?;
    let (rss_kib, peak_kib) = memory(pid)?;
    let sync_cpu = cpu(pid)?;

    let before = histogram(&agents.metrics(NODE)?, LATENCY_METRIC)?;
    // The last pod lives on another node.
    let changing = pods - 1;
    for i in 0..changes {
        let role = if i % 2 == 0 { "backend" } else { "frontend" };
        let file = dir.join(format!("change-{i}.yaml"));
        let mut yaml = String::new();
        pod_yaml(&mut yaml, changing, role);
        std::fs::write(&file, yaml)?;
        nftpolicy_etcd(nftpolicy, &etcd, "apply", &[file])?;
        agents.wait_applied(etcd.revision()?, APPLY_TIMEOUT)?;
    }
    finish(
        &agents,
        &before,
        changes,
        initial,
        (rss_kib, peak_kib),
        sync_cpu,
    )
}

fn finish(
    agents: &Agents,
    before: &crate::cluster::Histogram,
    changes: usize,
    initial: Duration,
    (rss_kib, peak_kib): (u64, u64),
    sync_cpu: Duration,
) -> anyhow::Result<Measured> {
    let after = histogram(&agents.metrics(NODE)?, LATENCY_METRIC)?;
    let delta = after.minus(before);
    if delta.count == 0 {
        bail!("the agent observed no programming latency for the {changes} changes");
    }
    Ok(Measured {
        initial,
        p50: delta.quantile(0.5),
        p99: delta.quantile(0.99),
        mean: delta.sum / delta.count as f64,
        rss_kib,
        peak_kib,
        sync_cpu,
    })
}

/// KDD: the cluster is in the fake API server before the agent starts; the
/// agent lists it, then each change is a pod replaced in the API server.
fn measure_kubernetes(nftpolicy: &Path, pods: usize, changes: usize) -> anyhow::Result<Measured> {
    let api = lab::LabApi::start()?;
    for o in api_namespaces_and_policies() {
        api.server
            .apply(&o)
            .map_err(|f| anyhow::anyhow!("{}", f.message))?;
    }
    for i in 0..pods {
        api.server
            .apply(&api_pod(i, initial_role(i)))
            .map_err(|f| anyhow::anyhow!("{}", f.message))?;
    }
    let lab = Lab::build(&[], &[], &[NODE])?;
    let started = Instant::now();
    let mut agents = Agents::start(&lab, &api, nftpolicy, "nftables", &[])?;
    agents.wait_applied(api.server.resource_version() as i64, APPLY_TIMEOUT)?;
    let initial = started.elapsed();
    let pid = agents.pid(NODE)?.context("the agent is not running")?;
    let memory_now = memory(pid)?;
    let sync_cpu = cpu(pid)?;
    let before = histogram(&agents.metrics(NODE)?, LATENCY_METRIC)?;
    let changing = pods - 1;
    for i in 0..changes {
        let role = if i % 2 == 0 { "backend" } else { "frontend" };
        let rv = api
            .server
            .apply(&api_pod(changing, role))
            .map_err(|f| anyhow::anyhow!("{}", f.message))?;
        agents.wait_applied(rv as i64, APPLY_TIMEOUT)?;
    }
    finish(&agents, &before, changes, initial, memory_now, sync_cpu)
}
