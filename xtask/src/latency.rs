//! `cargo xtask latency`: programming-latency numbers (a benchmark, not a
//! test). For each pod count: a real etcd, one `nftpolicy run` agent (the
//! nftables backend) in a node namespace of its own, a cluster of that many
//! pods written with `nftpolicy apply`; then one pod's labels change
//! `--changes` times, each change applied and awaited, and the agent's
//! `nftpolicy_programming_latency_seconds` histogram (the part those
//! changes added) gives p50 and p99 estimates.
//!
//! The cluster is [`crate::cluster`]'s: 10 namespaces, `pods` pods (100 of
//! them on this node, the rest on 20 other nodes), 5 policies per namespace
//! selecting `app=app-<k>` pods and allowing ingress from `role=frontend`
//! pods of the namespace. The changing pod is a remote one whose `role` flips between frontend and
//! backend, so each change moves an address in or out of a source set.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use lab::agents::{nftpolicy_etcd, Agents};
use lab::{EtcdServer, Lab};

use crate::cluster::{cluster_yaml, histogram, pod_yaml, LATENCY_METRIC, NODE};

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
}

pub fn run(args: &LatencyArgs) -> anyhow::Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("cargo xtask latency needs root: it creates a network namespace");
    }
    let nftpolicy = super::build_nftpolicy()?;
    println!(
        "{:>7} {:>8} {:>9} {:>10} {:>10} {:>12}",
        "pods", "changes", "initial", "p50", "p99", "mean/change"
    );
    for &pods in &args.pods {
        let m = measure(&nftpolicy, pods, args.changes)?;
        println!(
            "{:>7} {:>8} {:>8.1}s {:>8.1}ms {:>8.1}ms {:>10.1}ms",
            pods,
            args.changes,
            m.initial.as_secs_f64(),
            m.p50 * 1e3,
            m.p99 * 1e3,
            m.mean * 1e3
        );
    }
    println!("(p50/p99: linear interpolation inside the histogram's buckets; mean: sum/count)");
    Ok(true)
}

struct Measured {
    /// Writing the whole cluster until the agent had applied it.
    initial: Duration,
    p50: f64,
    p99: f64,
    mean: f64,
}

fn measure(nftpolicy: &Path, pods: usize, changes: usize) -> anyhow::Result<Measured> {
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
    let after = histogram(&agents.metrics(NODE)?, LATENCY_METRIC)?;
    let delta = after.minus(&before);
    if delta.count == 0 {
        bail!("the agent observed no programming latency for the {changes} changes");
    }
    Ok(Measured {
        initial,
        p50: delta.quantile(0.5),
        p99: delta.quantile(0.99),
        mean: delta.sum / delta.count as f64,
    })
}
