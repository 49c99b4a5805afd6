//! `cargo xtask latency`: programming-latency numbers (a benchmark, not a
//! test). For each pod count: a real etcd, one `nftpolicy run` agent (the
//! nftables backend) in a node namespace of its own, a cluster of that many
//! pods written with `nftpolicy apply`; then one pod's labels change
//! `--changes` times, each change applied and awaited, and the agent's
//! `nftpolicy_programming_latency_seconds` histogram (the part those
//! changes added) gives p50 and p99 estimates.
//!
//! The cluster: 10 namespaces, `pods` pods (100 of them on this node, the
//! rest on 20 other nodes), 5 policies per namespace selecting `app=app-<k>`
//! pods and allowing ingress from `role=frontend` pods of the namespace. The
//! changing pod is a remote one whose `role` flips between frontend and
//! backend, so each change moves an address in or out of a source set.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lab::agents::{nftpolicy_etcd, Agents};
use lab::{EtcdServer, Lab};

const NAMESPACES: usize = 10;
const POLICIES_PER_NAMESPACE: usize = 5;
const LOCAL_PODS: usize = 100;
const OTHER_NODES: usize = 20;
const NODE: &str = "node1";
/// How long the agent may take to apply the whole cluster, or one change.
const APPLY_TIMEOUT: Duration = Duration::from_secs(600);
const METRIC: &str = "nftpolicy_programming_latency_seconds";

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

    let before = histogram(&agents.metrics(NODE)?)?;
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
    let after = histogram(&agents.metrics(NODE)?)?;
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
        let role = if i % 3 == 0 { "frontend" } else { "backend" };
        pod_yaml(&mut y, i, role);
    }
    y
}

/// Pod `i`: namespace `ns-<i % 10>`, app `app-<i % 5>`, on this node for
/// the first [`LOCAL_PODS`], else on one of the other nodes; address
/// 198.18.1.0 + i (the lab's infrastructure /24 stays free).
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

/// A Prometheus histogram: cumulative bucket counts by upper bound.
#[derive(Debug, Default)]
struct Histogram {
    buckets: BTreeMap<u64, (f64, u64)>,
    sum: f64,
    count: u64,
}

/// Reads [`METRIC`] from Prometheus text.
fn histogram(text: &str) -> anyhow::Result<Histogram> {
    let mut h = Histogram::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(rest) = name.strip_prefix(&format!("{METRIC}_bucket{{le=\"")) {
            let le = rest.trim_end_matches("\"}");
            let bound: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().with_context(|| format!("bucket bound {le:?}"))?
            };
            // Keyed by the bound's bits: positive floats sort as their bits.
            h.buckets.insert(bound.to_bits(), (bound, value.parse()?));
        } else if name == format!("{METRIC}_sum") {
            h.sum = value.parse()?;
        } else if name == format!("{METRIC}_count") {
            h.count = value.parse()?;
        }
    }
    if h.buckets.is_empty() {
        bail!("no {METRIC} in the agent's metrics");
    }
    Ok(h)
}

impl Histogram {
    fn minus(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(k, (b, c))| {
                    let e = earlier.buckets.get(k).map_or(0, |(_, c)| *c);
                    (*k, (*b, c - e))
                })
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The q-quantile, interpolating linearly inside its bucket (as
    /// Prometheus' histogram_quantile does).
    fn quantile(&self, q: f64) -> f64 {
        let rank = q * self.count as f64;
        let mut lower = 0.0;
        let mut below = 0u64;
        for (bound, cumulative) in self.buckets.values() {
            if *cumulative as f64 >= rank {
                if bound.is_infinite() {
                    return lower;
                }
                let inside = (*cumulative - below) as f64;
                let frac = if inside > 0.0 {
                    (rank - below as f64) / inside
                } else {
                    1.0
                };
                return lower + (bound - lower) * frac;
            }
            lower = *bound;
            below = *cumulative;
        }
        lower
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_from_buckets() {
        let text = format!(
            "{METRIC}_bucket{{le=\"0.01\"}} 0\n{METRIC}_bucket{{le=\"0.1\"}} 10\n\
             {METRIC}_bucket{{le=\"1\"}} 20\n{METRIC}_bucket{{le=\"+Inf\"}} 20\n\
             {METRIC}_sum 3\n{METRIC}_count 20\n"
        );
        let h = histogram(&text).unwrap();
        assert!((h.quantile(0.5) - 0.1).abs() < 1e-9);
        assert!((h.quantile(0.25) - 0.055).abs() < 1e-9);
        assert!((h.quantile(0.99) - 0.982).abs() < 1e-9);
    }
}
