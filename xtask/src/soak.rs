//! `cargo xtask soak`: one `nftpolicy run` agent under a steady stream of
//! changes for a while (a load test, not a unit test). A real etcd, the
//! [`crate::cluster`] cluster with `--pods` pods written with `nftpolicy
//! apply`, one agent for [`NODE`] in a node namespace of its own; once it
//! has applied the cluster, `--rate` changes per second for `--seconds`
//! (seeded: label flips, pod additions, pod deletions), written in batches
//! every [`TICK`] with `nftpolicy apply|delete`.
//!
//! Measured: programming latency (the agent's
//! `nftpolicy_programming_latency_seconds` histogram over the change phase,
//! and our own write-to-applied time per batch, polled from the agent's
//! `/status`), the agent's resident memory (VmRSS every [`RSS_INTERVAL`]),
//! its ERROR/WARN log lines, its dataplane error counters, and whether it
//! stayed alive and caught up at the end. Results go to
//! `target/soak/soak-<unix time>.json`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use lab::agents::{nftpolicy_etcd, Agents};
use lab::generate::Rng;
use lab::{EtcdServer, Lab};

use crate::cluster::{
    cluster_yaml, histogram, initial_role, pod_yaml, scalar, Histogram, LATENCY_METRIC, NODE,
};

/// Changes are written in one batch per tick (one `nftpolicy apply` and
/// one `nftpolicy delete`): a process per change could not keep 100/s.
const TICK: Duration = Duration::from_millis(200);
/// How often the agent's `/status` is polled for the applied revision (the
/// resolution of our own latency measurement).
const STATUS_POLL: Duration = Duration::from_millis(20);
/// How often the agent's resident memory is sampled.
const RSS_INTERVAL: Duration = Duration::from_secs(2);
/// How long the agent may take to apply the initial cluster.
const INITIAL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the agent may take to catch up after the last change.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);
/// The memory rule's baseline window: the first minute of the change
/// phase, or its first third if the run is shorter than three minutes.
const BASELINE_WINDOW: Duration = Duration::from_secs(60);
/// Memory growth beyond this factor of the baseline fails the soak.
const MAX_RSS_GROWTH: f64 = 1.5;
/// The agent's dataplane error counters (felix's names).
const ERROR_COUNTERS: &[&str] = &[
    "felix_nft_errors",
    "felix_iptables_restore_errors",
    "felix_ipset_errors",
];

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SoakBackend {
    Nftables,
    Iptables,
}

#[derive(clap::Args)]
#[command(after_help = "\
Pass/fail: exits 1 if the agent logged any ERROR or WARN line, any of \
felix_nft_errors / felix_iptables_restore_errors / felix_ipset_errors grew, \
the agent exited, it had not applied the last change 120 s after the end, or \
its final VmRSS is more than 1.5x the highest VmRSS sampled in the baseline \
window (the first 60 s of the change phase, or its first third if the run is \
shorter than 3 minutes). Exits 2 if the soak itself could not run. \
Results: target/soak/soak-<unix time>.json.")]
pub struct SoakArgs {
    /// Pods in the cluster (100 of them on the measured node).
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Changes per second (40 % label flips, 30 % additions, 30 % deletions).
    #[arg(long, default_value_t = 100)]
    rate: usize,
    /// Length of the change phase, in seconds.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// The agent's dataplane backend.
    #[arg(long, value_enum, default_value_t = SoakBackend::Nftables)]
    backend: SoakBackend,
    /// Seed of the change sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run a debug build of the agent (quicker to build; its latencies are
    /// not the product's).
    #[arg(long)]
    debug_build: bool,
}

impl SoakArgs {
    /// The short version `cargo xtask test` runs.
    pub fn ci() -> SoakArgs {
        SoakArgs {
            pods: 10_000,
            rate: 100,
            seconds: 30,
            backend: SoakBackend::Nftables,
            seed: 1,
            debug_build: true,
        }
    }
}

pub fn run(args: &SoakArgs) -> anyhow::Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!("cargo xtask soak needs root: it creates a network namespace");
    }
    if args.pods == 0 || args.rate == 0 || args.seconds == 0 {
        bail!("--pods, --rate and --seconds must be positive");
    }
    let started = Instant::now();
    let built = super::build_nftpolicy_profile(!args.debug_build)?;
    // A private copy: a rebuild of the tree during the soak must not pull
    // the binary from under the `nftpolicy apply` calls.
    let copy_dir = tempfile::tempdir().context("creating a temporary directory")?;
    let nftpolicy = copy_dir.path().join("nftpolicy");
    std::fs::copy(&built, &nftpolicy)
        .with_context(|| format!("copying {} to {}", built.display(), nftpolicy.display()))?;
    let backend = match args.backend {
        SoakBackend::Nftables => "nftables",
        SoakBackend::Iptables => "iptables",
    };
    println!(
        "== soak: {} pods, {} changes/s for {} s, backend {backend}, seed {}",
        args.pods, args.rate, args.seconds, args.seed
    );
    let result = soak(&nftpolicy, args, backend)?;
    let verdict = result.verdict();
    result.print(&verdict);
    let json = result.to_json(args, backend, &verdict);
    write_results("soak", &json)?;
    println!(
        "== soak {} in {:.1}s",
        if verdict.is_empty() {
            "passed"
        } else {
            "FAILED"
        },
        started.elapsed().as_secs_f64()
    );
    Ok(verdict.is_empty())
}

/// Writes `json` to target/NAME/NAME-<unix time>.json and says where.
pub(crate) fn write_results(name: &str, json: &serde_json::Value) -> anyhow::Result<()> {
    let dir = super::root().join("target").join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let file = dir.join(format!("{name}-{unix}.json"));
    std::fs::write(&file, serde_json::to_string_pretty(json)? + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    println!("results: {}", file.display());
    Ok(())
}

/// Everything one soak measured.
struct SoakResult {
    /// Writing the cluster until the agent had applied it.
    initial: Duration,
    /// Changes written, and how long the change phase really took.
    changes: usize,
    change_phase: Duration,
    /// The agent's histogram over the change phase.
    histogram: Histogram,
    /// Our own write-to-applied times, one per batch, in seconds.
    batch_latencies: Vec<f64>,
    /// Batches the agent had not been seen applying when the phase ended.
    batches_unobserved: usize,
    /// (seconds into the change phase, VmRSS in kB).
    rss: Vec<(f64, u64)>,
    /// The last `/status` failure of the sampler, if any (the agent not
    /// answering).
    status_errors: usize,
    error_counters: BTreeMap<String, f64>,
    log_problems: Vec<String>,
    /// Why the agent is not alive and caught up at the end, if it is not.
    agent_failure: Option<String>,
}

fn soak(nftpolicy: &Path, args: &SoakArgs, backend: &str) -> anyhow::Result<SoakResult> {
    let etcd = EtcdServer::start()?;
    let lab = Lab::build(&[], &[], &[NODE])?;
    let dir = lab.workdir().join("soak");
    std::fs::create_dir_all(&dir)?;
    let cluster = dir.join("cluster.yaml");
    std::fs::write(&cluster, cluster_yaml(args.pods))?;
    // The cluster is written before the agent starts, as on a node that
    // joins a running cluster: an agent facing an empty etcd rightly warns
    // that it will not program it (README: What happens when), and the
    // soak fails on any warning.
    let initial_start = Instant::now();
    nftpolicy_etcd(nftpolicy, &etcd, "apply", &[cluster])?;
    let mut agents = Agents::start(&lab, &etcd, nftpolicy, backend, &[])?;
    agents.wait_applied(etcd.revision()?, INITIAL_TIMEOUT)?;
    let initial = initial_start.elapsed();
    println!(
        "initial cluster applied in {:.1}s; changing for {} s",
        initial.as_secs_f64(),
        args.seconds
    );
    let pid = agent_pid(&etcd.url()).context("finding the agent's process")?;
    let metrics_before = agents.metrics(NODE)?;
    let histogram_before = histogram(&metrics_before, LATENCY_METRIC)?;

    let pending: Mutex<VecDeque<(i64, Instant)>> = Mutex::new(VecDeque::new());
    let stop = AtomicBool::new(false);
    let phase_start = Instant::now();
    let (changes, sampled) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(&agents, pid, &pending, &stop, phase_start));
        let written = write_changes(nftpolicy, &etcd, &dir, args, &pending);
        stop.store(true, Ordering::Relaxed);
        let sampled = sampler.join().expect("the sampler does not panic");
        (written, sampled)
    });
    let changes = changes?;
    let change_phase = phase_start.elapsed();

    let agent_failure = match agents.wait_applied(etcd.revision()?, CATCH_UP_TIMEOUT) {
        Ok(()) if Path::new(&format!("/proc/{pid}")).exists() => None,
        Ok(()) => Some(format!("process {pid} is gone")),
        Err(e) => Some(e.to_string()),
    };
    let (histogram, error_counters) = match agents.metrics(NODE) {
        Ok(after) => (
            histogram(&after, LATENCY_METRIC)?.minus(&histogram_before),
            ERROR_COUNTERS
                .iter()
                .map(|c| {
                    let grew = scalar(&after, c).unwrap_or(0.0)
                        - scalar(&metrics_before, c).unwrap_or(0.0);
                    (c.to_string(), grew)
                })
                .collect(),
        ),
        Err(_) => (Histogram::default(), BTreeMap::new()),
    };
    drop(agents);
    let batches_unobserved = pending.lock().expect("not poisoned").len();
    let log_problems = log_problems(&lab.workdir().join(format!("agent-{NODE}.log")));
    Ok(SoakResult {
        initial,
        changes,
        change_phase,
        histogram,
        batch_latencies: sampled.latencies,
        batches_unobserved,
        rss: sampled.rss,
        status_errors: sampled.status_errors,
        error_counters,
        log_problems,
        agent_failure,
    })
}

/// The pid of the `nftpolicy run` agent talking to the etcd at `etcd_url`
/// (`ip netns exec` execs it, so it is not the lab's child but its image).
pub(crate) fn agent_pid(etcd_url: &str) -> anyhow::Result<u32> {
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent = argv.first().is_some_and(|a| a.ends_with(b"nftpolicy"))
            && argv.get(1) == Some(&&b"run"[..])
            && argv.contains(&etcd_url.as_bytes());
        if is_agent {
            return Ok(pid);
        }
    }
    bail!("no nftpolicy run process with --datastore {etcd_url}")
}

/// Writes `args.rate` changes per second for `args.seconds`, a batch per
/// [`TICK`], queueing each batch's etcd revision with the time its writes
/// were done. Returns how many changes were written.
fn write_changes(
    nftpolicy: &Path,
    etcd: &EtcdServer,
    dir: &Path,
    args: &SoakArgs,
    pending: &Mutex<VecDeque<(i64, Instant)>>,
) -> anyhow::Result<usize> {
    let mut rng = Rng::new(args.seed);
    // Live pods and their role labels; new pods get the next index.
    let mut live: Vec<usize> = (0..args.pods).collect();
    let mut roles: BTreeMap<usize, &'static str> =
        (0..args.pods).map(|i| (i, initial_role(i))).collect();
    let mut next_pod = args.pods;
    let start = Instant::now();
    let duration = Duration::from_secs(args.seconds);
    let mut done = 0usize;
    let mut batch_no = 0usize;
    while start.elapsed() < duration {
        // Catch up when a batch took longer than a tick, so the rate holds
        // as long as the writer can keep it.
        let due = (start.elapsed().as_secs_f64() * args.rate as f64) as usize;
        let n = due.saturating_sub(done);
        if n == 0 {
            std::thread::sleep(TICK.min(duration.saturating_sub(start.elapsed())));
            continue;
        }
        let tick_end = Instant::now() + TICK;
        let mut upserts = String::new();
        let mut deletes = String::new();
        let mut touched = BTreeSet::new();
        for _ in 0..n {
            let roll = rng.below(100);
            // Deletions only while more than half the pods are left; a
            // pod is changed at most once per batch.
            let pick = if roll >= 40 && (roll < 70 || live.len() <= args.pods / 2) {
                None
            } else {
                Some(rng.below(live.len()))
            }
            .filter(|&at| !touched.contains(&live[at]));
            match pick {
                Some(at) if roll < 40 => {
                    let pod = live[at];
                    let role = roles.get_mut(&pod).expect("live pods have a role");
                    *role = if *role == "frontend" {
                        "backend"
                    } else {
                        "frontend"
                    };
                    pod_yaml(&mut upserts, pod, role);
                    touched.insert(pod);
                }
                Some(at) => {
                    let pod = live.swap_remove(at);
                    let role = roles.remove(&pod).expect("live pods have a role");
                    pod_yaml(&mut deletes, pod, role);
                    touched.insert(pod);
                }
                None => {
                    let pod = next_pod;
                    next_pod += 1;
                    live.push(pod);
                    roles.insert(pod, initial_role(pod));
                    pod_yaml(&mut upserts, pod, initial_role(pod));
                    touched.insert(pod);
                }
            }
        }
        batch_no += 1;
        for (verb, yaml) in [("apply", &upserts), ("delete", &deletes)] {
            if yaml.is_empty() {
                continue;
            }
            // One file per verb, rewritten each batch.
            let file = dir.join(format!("{verb}.yaml"));
            std::fs::write(&file, yaml)?;
            nftpolicy_etcd(nftpolicy, etcd, verb, &[file])
                .with_context(|| format!("writing batch {batch_no}"))?;
        }
        let revision = etcd.revision()?;
        pending
            .lock()
            .expect("not poisoned")
            .push_back((revision, Instant::now()));
        done += n;
        // The rest of the tick, so batches stay one tick's worth.
        std::thread::sleep(tick_end.saturating_duration_since(Instant::now()));
    }
    Ok(done)
}

/// What the sampler thread saw.
#[derive(Default)]
struct Sampled {
    latencies: Vec<f64>,
    rss: Vec<(f64, u64)>,
    status_errors: usize,
}

/// Until `stop`: polls the agent's `/status` every [`STATUS_POLL`],
/// resolving the pending batches it has applied, and samples its VmRSS
/// every [`RSS_INTERVAL`].
fn sample(
    agents: &Agents,
    pid: u32,
    pending: &Mutex<VecDeque<(i64, Instant)>>,
    stop: &AtomicBool,
    phase_start: Instant,
) -> Sampled {
    let mut out = Sampled::default();
    let mut next_rss = phase_start;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_rss {
            if let Some(kb) = vm_rss_kb(pid) {
                out.rss
                    .push((now.duration_since(phase_start).as_secs_f64(), kb));
            }
            next_rss += RSS_INTERVAL;
        }
        match agents.status(NODE) {
            Ok(status) => {
                let seen = Instant::now();
                let mut queue = pending.lock().expect("not poisoned");
                while queue
                    .front()
                    .is_some_and(|(rev, _)| *rev <= status.applied_revision)
                {
                    let (_, written) = queue.pop_front().expect("checked");
                    out.latencies
                        .push(seen.duration_since(written).as_secs_f64());
                }
            }
            Err(_) => out.status_errors += 1,
        }
        std::thread::sleep(STATUS_POLL);
    }
    out
}

/// VmRSS of `pid` in kB, if it still runs.
fn vm_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The agent's log lines at ERROR or WARN level (tracing's text format:
/// timestamp, level, …).
fn log_problems(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| matches!(l.split_whitespace().nth(1), Some("ERROR" | "WARN")))
        .map(str::to_owned)
        .collect()
}

/// The q-quantile of `values` (nearest rank), or None for none.
fn nearest_rank(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// The memory rule: the final sample against the highest sample of the
/// baseline window. Returns (baseline kB, final kB, max kB).
fn rss_levels(rss: &[(f64, u64)], phase: Duration) -> Option<(u64, u64, u64)> {
    let window = BASELINE_WINDOW.min(phase / 3).as_secs_f64();
    let baseline = rss
        .iter()
        .filter(|(t, _)| *t <= window)
        .map(|(_, kb)| *kb)
        .max()?;
    let last = rss.last()?.1;
    let max = rss.iter().map(|(_, kb)| *kb).max()?;
    Some((baseline, last, max))
}

impl SoakResult {
    /// Why the soak failed; empty if it passed.
    fn verdict(&self) -> Vec<String> {
        let mut why = Vec::new();
        if let Some(f) = &self.agent_failure {
            why.push(format!("agent not alive and caught up: {f}"));
        }
        if !self.log_problems.is_empty() {
            why.push(format!(
                "{} ERROR/WARN line(s) in the agent's log",
                self.log_problems.len()
            ));
        }
        for (counter, grew) in &self.error_counters {
            if *grew > 0.0 {
                why.push(format!("{counter} grew by {grew}"));
            }
        }
        match rss_levels(&self.rss, self.change_phase) {
            Some((baseline, last, _)) if last as f64 > baseline as f64 * MAX_RSS_GROWTH => why
                .push(format!(
                    "VmRSS grew from {baseline} kB (baseline) to {last} kB (> {MAX_RSS_GROWTH}x)"
                )),
            Some(_) => {}
            None => why.push("no VmRSS samples of the agent".into()),
        }
        why
    }

    fn print(&self, verdict: &[String]) {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |s| format!("{:.1} ms", s * 1e3));
        let h = &self.histogram;
        let hist = |q| (h.count > 0).then(|| h.quantile(q));
        let rate = self.changes as f64 / self.change_phase.as_secs_f64();
        println!();
        println!(
            "{:<38} {:.1} s",
            "initial cluster applied",
            self.initial.as_secs_f64()
        );
        println!(
            "{:<38} {} in {:.1} s ({rate:.1}/s)",
            "changes written",
            self.changes,
            self.change_phase.as_secs_f64()
        );
        println!("{:<38} {}", "agent programming runs (histogram)", h.count);
        println!("{:<38} {}", "agent latency p50 (histogram)", ms(hist(0.5)));
        println!("{:<38} {}", "agent latency p99 (histogram)", ms(hist(0.99)));
        println!(
            "{:<38} {}",
            "agent latency mean (histogram)",
            ms((h.count > 0).then(|| h.sum / h.count as f64))
        );
        println!(
            "{:<38} {} ({} unobserved at the end)",
            "batches write->applied (own)",
            self.batch_latencies.len(),
            self.batches_unobserved
        );
        println!(
            "{:<38} {}",
            "  p50",
            ms(nearest_rank(&self.batch_latencies, 0.5))
        );
        println!(
            "{:<38} {}",
            "  p99",
            ms(nearest_rank(&self.batch_latencies, 0.99))
        );
        println!(
            "{:<38} {}",
            "  max",
            ms(self.batch_latencies.iter().copied().reduce(f64::max))
        );
        if let Some((baseline, last, max)) = rss_levels(&self.rss, self.change_phase) {
            let first = self.rss.first().map_or(0, |r| r.1);
            println!(
                "{:<38} first {} MiB, baseline {} MiB, last {} MiB, max {} MiB ({} samples)",
                "agent VmRSS",
                first / 1024,
                baseline / 1024,
                last / 1024,
                max / 1024,
                self.rss.len()
            );
        }
        println!(
            "{:<38} {}",
            "/status not answering (polls)", self.status_errors
        );
        for (counter, grew) in &self.error_counters {
            println!("{:<38} +{grew}", counter);
        }
        println!(
            "{:<38} {}",
            "agent ERROR/WARN log lines",
            self.log_problems.len()
        );
        for line in self.log_problems.iter().take(5) {
            println!("    {line}");
        }
        println!(
            "{:<38} {}",
            "agent alive and caught up",
            self.agent_failure.as_deref().unwrap_or("yes")
        );
        println!("(histogram quantiles: linear interpolation inside buckets; own: nearest rank, 20 ms polling)");
        for why in verdict {
            println!("FAIL: {why}");
        }
    }

    fn to_json(&self, args: &SoakArgs, backend: &str, verdict: &[String]) -> serde_json::Value {
        let h = &self.histogram;
        let levels = rss_levels(&self.rss, self.change_phase);
        serde_json::json!({
            "pods": args.pods,
            "rate": args.rate,
            "seconds": args.seconds,
            "backend": backend,
            "seed": args.seed,
            "initial_apply_seconds": self.initial.as_secs_f64(),
            "changes": self.changes,
            "change_phase_seconds": self.change_phase.as_secs_f64(),
            "histogram": {
                "count": h.count,
                "sum_seconds": h.sum,
                "p50_seconds": (h.count > 0).then(|| h.quantile(0.5)),
                "p99_seconds": (h.count > 0).then(|| h.quantile(0.99)),
            },
            "batches": {
                "observed": self.batch_latencies.len(),
                "unobserved": self.batches_unobserved,
                "p50_seconds": nearest_rank(&self.batch_latencies, 0.5),
                "p99_seconds": nearest_rank(&self.batch_latencies, 0.99),
                "latencies_seconds": self.batch_latencies,
            },
            "rss_kb": {
                "baseline": levels.map(|l| l.0),
                "last": levels.map(|l| l.1),
                "max": levels.map(|l| l.2),
                "samples": self.rss.iter().map(|(t, kb)| serde_json::json!([t, kb])).collect::<Vec<_>>(),
            },
            "status_errors": self.status_errors,
            "error_counters": self.error_counters,
            "log_problems": self.log_problems,
            "agent_failure": self.agent_failure,
            "failures": verdict,
            "passed": verdict.is_empty(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_baseline_is_the_peak_of_the_first_third_of_a_short_run() {
        let rss = [
            (0.0, 100),
            (4.0, 120),
            (10.0, 110),
            (11.0, 170),
            (29.0, 181),
        ];
        // Window: 10 s of a 30 s run; 181 > 1.5 × 120.
        assert_eq!(
            rss_levels(&rss, Duration::from_secs(30)),
            Some((120, 181, 181))
        );
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&v, 0.5), Some(50.0));
        assert_eq!(nearest_rank(&v, 0.99), Some(99.0));
        assert_eq!(nearest_rank(&[], 0.5), None);
    }
}
