//! `cargo xtask agent-memory`: the memory of the agent itself — the
//! `nftpolicy run` binary, its etcd watcher, cache, compiler and nftables
//! programmer — on the benchmark's cluster (issue 18: "measure the agent
//! itself, not the benchmark's own copies"). The cluster
//! (`bench/examples/dump_cluster.rs`, 10,000 policies / 250,000 pods by
//! default) is written into a real etcd with `nftpolicy apply`; one agent
//! runs in a network namespace as the node under test; once it has
//! programmed the last revision, its VmHWM (peak RSS) and VmRSS are read
//! from /proc. Results: target/agent-memory/agent-memory-<unix time>.json.

use std::time::{Duration, Instant};

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
    /// An extra argument for `nftpolicy run` (repeatable), e.g.
    /// `--agent-arg=--watch-kernel=false`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
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
    let mut agents = Agents::start(&lab, &etcd, &nftpolicy, "nftables", &args.agent_args)?;
    // `ip netns exec` execs the agent: wait for its image to appear.
    let mut pid = super::soak::agent_pid(&etcd.url());
    for _ in 0..100 {
        if pid.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        pid = super::soak::agent_pid(&etcd.url());
    }
    let pid = pid?;
    // VmRSS every 100 ms while the agent lists and programs: where the
    // peak falls (the list, the first compile, the transaction).
    let revision = etcd.revision()?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let (applied, rss_curve) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut curve: Vec<(f64, u64)> = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((kb, _)) = super::latency::memory(pid) {
                    curve.push((started.elapsed().as_secs_f64(), kb));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            curve
        });
        // Nothing between here and `done` may return early: the sampler
        // would never stop.
        let applied = agents.wait_applied(revision, APPLY_TIMEOUT);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let curve = sampler.join().expect("the sampler does not panic");
        applied.map(|()| (started.elapsed(), curve))
    })?;
    // One line per second: the highest sample in it.
    let mut per_second: Vec<(u64, u64)> = Vec::new();
    for &(t, kb) in &rss_curve {
        let second = t as u64;
        match per_second.last_mut() {
            Some((s, max)) if *s == second => *max = (*max).max(kb),
            _ => per_second.push((second, kb)),
        }
    }
    for (second, kb) in &per_second {
        println!("  {second:>4} s  VmRSS {:>5.0} MiB", *kb as f64 / 1024.0);
    }
    let (now, peak) = super::latency::memory(pid)?;
    drop(agents);
    // The agent's own account of its start (timestamps of the list, the
    // first compile and apply).
    let log = lab.workdir().join(format!("agent-{NODE}.log"));
    if let Ok(text) = std::fs::read_to_string(&log) {
        println!("agent log ({}):", log.display());
        for line in text.lines().take(40) {
            println!("  {line}");
        }
    }
    println!(
        "agent (pid {pid}) listed and programmed {} policies in {:.1}s: peak RSS {:.0} MiB, RSS now {:.0} MiB",
        args.policies,
        applied.as_secs_f64(),
        peak as f64 / 1024.0,
        now as f64 / 1024.0
    );
    let json = serde_json::json!({
        "policies": args.policies,
        "agent_args": args.agent_args,
        "write_seconds": written.as_secs_f64(),
        "list_and_program_seconds": applied.as_secs_f64(),
        "peak_rss_kib": peak,
        "rss_kib": now,
        "rss_kib_per_second": per_second,
    });
    super::soak::write_results("agent-memory", &json)?;
    Ok(true)
}
