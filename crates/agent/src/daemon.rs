//! `nftpolicy run`: the node agent.
//!
//! One loop: datastore updates fold into a cache; once the datastore is in
//! sync, every burst of updates (everything queued when the loop looks) is
//! compiled and applied as one transaction; every `--resync-interval` the
//! kernel is compared with what we last wrote and repaired. Nothing touches
//! the kernel before the first in-sync, and SIGTERM leaves the rules in
//! place (enforcement continues while the agent restarts).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use compiler::LogicalRuleset;
use model::state::ClusterState;
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use watcher::{Cache, Source, Update};

use crate::dataplane::{Backend, DataplaneArgs};
use crate::metrics::Metrics;

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub dataplane: DataplaneArgs,
    #[command(flatten)]
    pub datastore: DatastoreArgs,
    /// Seconds between full comparisons of the kernel with the desired
    /// ruleset (repairs drift).
    #[arg(long, env = "NFTPOLICY_RESYNC_INTERVAL", default_value = "90")]
    pub resync_interval: u64,
    /// Health endpoints (`/liveness`, `/readiness`), felix's port.
    #[arg(long, env = "NFTPOLICY_HEALTH_ADDR", default_value = "127.0.0.1:9099")]
    pub health_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`), felix's port.
    #[arg(long, env = "NFTPOLICY_METRICS_ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_addr: SocketAddr,
}

#[derive(Debug, Clone, Args)]
pub struct DatastoreArgs {
    /// `etcd://HOST:2379[,HOST:2379…]` (also `etcds://`, `https://`) or `file:PATH`.
    #[arg(long, env = "NFTPOLICY_DATASTORE")]
    pub datastore: String,
    /// CA certificate for etcd over TLS.
    #[arg(long, env = "NFTPOLICY_ETCD_CA")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate for etcd over TLS.
    #[arg(long, env = "NFTPOLICY_ETCD_CERT")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// Client key for etcd over TLS.
    #[arg(long, env = "NFTPOLICY_ETCD_KEY")]
    pub etcd_key: Option<std::path::PathBuf>,
    /// How often a file datastore is re-read for changes, in milliseconds.
    #[arg(long, env = "NFTPOLICY_FILE_POLL_MS", default_value = "500")]
    pub file_poll_ms: u64,
}

impl DatastoreArgs {
    pub fn source(&self) -> anyhow::Result<Source> {
        if let Some(path) = self.datastore.strip_prefix("file:") {
            return Ok(Source::Files {
                paths: vec![path.into()],
                poll: Duration::from_millis(self.file_poll_ms),
            });
        }
        Ok(Source::Etcd(self.etcd()?))
    }

    pub fn etcd(&self) -> anyhow::Result<watcher::etcd::EtcdConfig> {
        Ok(watcher::etcd::EtcdConfig::from_url(&self.datastore)
            .with_context(|| format!("--datastore {:?}", self.datastore))?
            .with_tls(
                self.etcd_ca.clone(),
                self.etcd_cert.clone(),
                self.etcd_key.clone(),
            ))
    }
}

/// What the health endpoints report, shared with the HTTP server.
#[derive(Debug, Default)]
pub struct Health {
    /// Unix seconds of the loop's last turn (liveness).
    pub last_tick: AtomicU64,
    /// In sync with the datastore and the last apply succeeded (readiness).
    pub ready: AtomicBool,
    /// Datastore revision of the last successful apply.
    pub applied_revision: AtomicU64,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The kernel side, on its own thread (netlink and restore tools block).
enum Programmer {
    Nft(programmer::NftProgrammer),
    Iptables(programmer::iptables::IptablesProgrammer),
}

struct Applied {
    logical: LogicalRuleset,
    elapsed: Duration,
}

impl Programmer {
    fn new(args: &DataplaneArgs) -> anyhow::Result<Programmer> {
        Ok(match args.backend {
            Backend::Nftables => {
                let mut p = programmer::NftProgrammer::new()
                    .context("opening the nf_tables netlink socket")?;
                // Adopt what a previous run left: unchanged chains are not
                // rewritten and keep their counters.
                p.adopt()
                    .context("reading our tables back from the kernel")?;
                Programmer::Nft(p)
            }
            Backend::Iptables => {
                Programmer::Iptables(programmer::iptables::IptablesProgrammer::new(
                    args.iptables_backend.programmer_backend(),
                ))
            }
        })
    }

    fn apply(
        &mut self,
        state: &ClusterState,
        args: &DataplaneArgs,
        metrics: &Metrics,
    ) -> anyhow::Result<Applied> {
        let start = Instant::now();
        let logical = compiler::compile(state, &args.compile_options())?;
        let result = match self {
            Programmer::Nft(p) => {
                metrics.nft_calls.inc();
                p.apply(&compiler::lower_nft::to_nftables(&logical))
                    .map(|_| ())
                    .map_err(|e| {
                        metrics.nft_errors.inc();
                        anyhow::Error::new(e).context("programming nftables")
                    })
            }
            Programmer::Iptables(p) => {
                let before = p.stats();
                let r = p
                    .apply(&compiler::render_iptables::to_iptables(&logical))
                    .map(|_| ())
                    .map_err(|e| anyhow::Error::new(e).context("programming iptables"));
                metrics.record_iptables(&before, &p.stats());
                r
            }
        };
        result?;
        Ok(Applied {
            logical,
            elapsed: start.elapsed(),
        })
    }

    /// Whether the kernel differs from what we last wrote.
    fn drifted(&mut self, state: &ClusterState, args: &DataplaneArgs) -> anyhow::Result<bool> {
        match self {
            Programmer::Nft(p) => Ok(p.has_drift()?),
            Programmer::Iptables(p) => {
                let logical = compiler::compile(state, &args.compile_options())?;
                let report = p.drift(&compiler::render_iptables::to_iptables(&logical))?;
                Ok(!report.is_noop())
            }
        }
    }

    /// Forget what we believe the kernel holds, so the next apply reads it.
    fn invalidate(&mut self) -> anyhow::Result<()> {
        match self {
            Programmer::Nft(p) => Ok(p.adopt()?),
            Programmer::Iptables(p) => {
                p.invalidate();
                Ok(())
            }
        }
    }

    /// Removes the *other* backend's state (switching backend).
    fn remove_other(&mut self, args: &DataplaneArgs) -> anyhow::Result<()> {
        match self {
            Programmer::Nft(_) => crate::sync::remove_iptables(args),
            Programmer::Iptables(_) => {
                programmer::NftProgrammer::new()?.remove_all()?;
                Ok(())
            }
        }
    }
}

/// Consecutive failed applies after which the agent exits non-zero.
const MAX_APPLY_FAILURES: u32 = 6;

enum Job {
    Apply {
        state: Box<ClusterState>,
        revision: i64,
        received: Vec<Instant>,
    },
    Resync {
        state: Box<ClusterState>,
    },
}

struct JobDone {
    ok: bool,
    revision: i64,
}

pub fn run(args: RunArgs) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> anyhow::Result<bool> {
    let metrics = Arc::new(Metrics::new()?);
    let health = Arc::new(Health::default());
    health.last_tick.store(now_secs(), Ordering::Relaxed);
    crate::http::serve_health(args.health_addr, health.clone()).await?;
    crate::http::serve_metrics(args.metrics_addr, metrics.clone()).await?;

    let (mut updates, source_task) = args.datastore.source()?.spawn(1024);

    // The programmer lives on its own thread; jobs in, results out.
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<JobDone>();
    let mut programmer = Programmer::new(&args.dataplane)?;
    let worker_args = args.dataplane.clone();
    let worker_metrics = metrics.clone();
    std::thread::Builder::new()
        .name("programmer".into())
        .spawn(move || {
            let mut removed_other = false;
            for job in job_rx {
                match job {
                    Job::Apply {
                        state,
                        revision,
                        received,
                    } => {
                        let ok = match programmer.apply(&state, &worker_args, &worker_metrics) {
                            Ok(applied) => {
                                let acked = Instant::now();
                                worker_metrics.observe_apply(&applied.logical, applied.elapsed);
                                for r in &received {
                                    worker_metrics
                                        .programming_latency
                                        .observe(acked.duration_since(*r).as_secs_f64());
                                }
                                info!(
                                    revision,
                                    endpoints = applied.logical.endpoints.len(),
                                    policies = applied.logical.active_policies.len(),
                                    rejected = applied.logical.rejected.len(),
                                    ms = applied.elapsed.as_millis() as u64,
                                    "dataplane programmed"
                                );
                                for (key, why) in &applied.logical.rejected {
                                    warn!(object = %key, "skipped: {why}");
                                }
                                if !removed_other {
                                    match programmer.remove_other(&worker_args) {
                                        Ok(()) => removed_other = true,
                                        Err(e) => {
                                            warn!("removing the other backend's state: {e:#}")
                                        }
                                    }
                                }
                                true
                            }
                            Err(e) => {
                                error!(
                                    revision,
                                    "apply failed; the previous ruleset stays in force: {e:#}"
                                );
                                let _ = programmer.invalidate();
                                false
                            }
                        };
                        let _ = done_tx.send(JobDone { ok, revision });
                    }
                    Job::Resync { state } => match programmer.drifted(&state, &worker_args) {
                        Ok(false) => {}
                        Ok(true) => {
                            warn!("the kernel differs from our last write; repairing");
                            worker_metrics.resyncs_repaired.inc();
                            let ok = programmer.invalidate().is_ok()
                                && programmer
                                    .apply(&state, &worker_args, &worker_metrics)
                                    .map_err(|e| error!("repair failed: {e:#}"))
                                    .is_ok();
                            let _ = done_tx.send(JobDone { ok, revision: -1 });
                        }
                        Err(e) => warn!("drift check failed: {e:#}"),
                    },
                }
            }
        })?;

    let mut cache = Cache::new();
    let mut received: Vec<Instant> = Vec::new();
    let mut dirty = false;
    let mut busy = false;
    let mut resync = tokio::time::interval(Duration::from_secs(args.resync_interval.max(1)));
    resync.tick().await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut applied_once = false;
    // Repeated kernel failures: retry with backoff (re-reading the kernel
    // each time), never in a tight loop; give up after MAX_APPLY_FAILURES.
    let mut failures: u32 = 0;
    let mut retry_at: Option<tokio::time::Instant> = None;

    loop {
        tokio::select! {
            u = updates.recv() => {
                let Some(u) = u else {
                    match source_task.await {
                        Ok(Err(e)) => bail!("datastore source failed: {e}"),
                        _ => bail!("datastore source ended"),
                    }
                };
                // Take everything queued: a burst becomes one transaction.
                let mut batch = vec![u];
                while let Ok(more) = updates.try_recv() {
                    batch.push(more);
                }
                let now = Instant::now();
                for u in batch {
                    match &u {
                        Update::Invalid { key, reason, .. } => {
                            metrics.rejected_objects.inc();
                            warn!(key, "skipped undecodable value: {reason}");
                        }
                        Update::Disconnected { reason } => {
                            warn!("datastore disconnected, dataplane left as is: {reason}");
                            health.ready.store(false, Ordering::Relaxed);
                        }
                        Update::InSync { revision } => info!(revision, "datastore in sync"),
                        _ => {}
                    }
                    if matches!(u, Update::Upsert { .. } | Update::Delete { .. }) {
                        received.push(now);
                    }
                    dirty |= cache.apply(u);
                }
                metrics.resync_state.set(if cache.in_sync { 1 } else { 0 });
                if cache.in_sync && !applied_once {
                    dirty = true;
                }
            }
            Some(done) = done_rx.recv() => {
                busy = false;
                if done.ok {
                    applied_once = true;
                    if done.revision >= 0 {
                        health.applied_revision.store(done.revision as u64, Ordering::Relaxed);
                    }
                    failures = 0;
                } else {
                    failures += 1;
                    if failures >= MAX_APPLY_FAILURES {
                        bail!(
                            "the kernel rejected {failures} consecutive transactions (see the errors above); \
                             giving up so that the orchestrator restarts the agent — the last good ruleset stays in force"
                        );
                    }
                    let delay = Duration::from_secs(1 << (failures - 1).min(4));
                    warn!(failures, "retrying in {delay:?}");
                    retry_at = Some(tokio::time::Instant::now() + delay);
                }
                health.ready.store(done.ok && cache.in_sync, Ordering::Relaxed);
            }
            _ = resync.tick() => {
                // Queued behind any apply on the programmer thread; a resync
                // that finds no drift sends nothing back.
                if cache.in_sync && applied_once {
                    job_tx.send(Job::Resync { state: Box::new(cache.state.clone()) })?;
                }
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                retry_at = None;
                dirty = true;
            }
            _ = tick.tick() => {
                health.last_tick.store(now_secs(), Ordering::Relaxed);
            }
            _ = sigterm.recv() => {
                info!("SIGTERM: exiting; the rules stay in force");
                return Ok(true);
            }
        }
        if dirty && !busy && cache.in_sync && retry_at.is_none() {
            dirty = false;
            busy = true;
            job_tx.send(Job::Apply {
                state: Box::new(cache.state.clone()),
                revision: cache.revision,
                received: std::mem::take(&mut received),
            })?;
        }
    }
}
