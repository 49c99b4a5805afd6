//! `cargo xtask agent-memory`: the memory of the agent itself — the
//! `nftpolicy run` binary, its etcd watcher, cache, compiler and nftables
//! programmer — on the benchmark's cluster (issue 18: "measure the agent
//! itself, not the benchmark's own copies"). The cluster
//! (`bench/examples/dump_cluster.rs`, 10,000 policies / 250,000 pods by
//! default) is written into a real etcd with `nftpolicy apply`; one agent
//! runs in a network namespace as the node under test; once it has
//! programmed the last revision, its VmHWM (peak RSS) and VmRSS are read
//! from /proc. Results: target/agent-memory/agent-memory-<unix time>.json.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use lab::agents::{nftpolicy_etcd, Agents};
use lab::{EtcdServer, Lab};

/// How long the agent may take to list and program the cluster.
const APPLY_TIMEOUT: Duration = Duration::from_secs(900);
/// The node under test of the benchmark's cluster (`bench::NODE_UNDER_TEST`).
const NODE: &str = "node1";

#[derive(clap::Args)]
pub struct AgentMemoryArgs {
    /// Policies of the benchmark's cluster (its pods follow: 25 per policy,
    /// 250,000 at 10,000).
    #[arg(long, default_value_t = 10_000)]
    policies: usize,
}

pub fn run(args: &AgentMemoryArgs) -> anyhow::Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("cargo xtask agent-memory needs root: it creates a network namespace");
    }
    let built = super::build_nftpolicy_profile(true)?;
    let work = tempfile::tempdir().context("creating a temporary directory")?;
    let nftpolicy = work.path().join("nftpolicy");
    std::fs::copy(&built, &nftpolicy)
        .with_context(|| format!("copying {} to {}", built.display(), nftpolicy.display()))?;
    let cluster = work.path().join("cluster.yaml");
    let dumped = super::run_status(super::cargo().args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "bench",
        "--example",
        "dump_cluster",
        "--",
        &args.policies.to_string(),
        &cluster.display().to_string(),
    ]))?;
    if !dumped {
        bail!("the bench's dump_cluster example failed");
    }
    let etcd = EtcdServer::start()?;
    let lab = Lab::build(&[], &[], &[NODE])?;
    let started = Instant::now();
    nftpolicy_etcd(&nftpolicy, &etcd, "apply", &[cluster])?;
    let written = started.elapsed();
    println!("cluster written into etcd in {:.1}s", written.as_secs_f64());
    let started = Instant::now();
    let mut agents = Agents::start(&lab, &etcd, &nftpolicy, "nftables", &[])?;
    agents.wait_applied(etcd.revision()?, APPLY_TIMEOUT)?;
    let applied = started.elapsed();
    let pid = super::soak::agent_pid(&etcd.url())?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the agent's /proc/{pid}/status"))?;
    let kib = |field: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/{pid}/status"))
    };
    let (peak, now) = (kib("VmHWM:")?, kib("VmRSS:")?);
    drop(agents);
    println!(
        "agent (pid {pid}) listed and programmed {} policies in {:.1}s: peak RSS {:.0} MiB, RSS now {:.0} MiB",
        args.policies,
        applied.as_secs_f64(),
        peak as f64 / 1024.0,
        now as f64 / 1024.0
    );
    let json = serde_json::json!({
        "policies": args.policies,
        "write_seconds": written.as_secs_f64(),
        "list_and_program_seconds": applied.as_secs_f64(),
        "peak_rss_kib": peak,
        "rss_kib": now,
    });
    let dir = super::root().join("target/agent-memory");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let file = dir.join(format!("agent-memory-{unix}.json"));
    std::fs::write(&file, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    println!("results: {}", file.display());
    Ok(true)
}
