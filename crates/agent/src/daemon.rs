//! `nftpolicy run`: the node agent.
//!
//! One loop: datastore updates fold into a cache; once the datastore is in
//! sync, every burst of updates (everything queued when the loop looks) is
//! compiled and applied as one transaction — or two, when changes that
//! compile in full are queued with cheap ones: the cheap ones first (see
//! `crate::lanes`); every `--resync-interval` the
//! kernel is compared with what we last wrote and repaired. Nothing touches
//! the kernel before the first in-sync, and SIGTERM leaves the rules in
//! place (enforcement continues while the agent restarts).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use ::dataplane::{Node, Pipeline};
use model::calico::Kind;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};
use watcher::{Source, Update};

use crate::dataplane::{DataplaneArgs, EtcdTlsArgs};
use crate::lanes::{Pending, Queued};
use crate::metrics::Metrics;

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub dataplane: DataplaneArgs,
    #[command(flatten)]
    pub datastore: DatastoreArgs,
    #[command(flatten)]
    pub watch: crate::tamper::WatchArgs,
    /// Seconds between full comparisons of the kernel with the desired
    /// ruleset (repairs drift).
    #[arg(long, env = "NFTPOLICY_RESYNC_INTERVAL", default_value = "90")]
    pub resync_interval: u64,
    /// iptables backend with the legacy tools: every this many milliseconds,
    /// when no apply is under way, compare the entry count and size of the
    /// `filter` table (one getsockopt per family, no process) with what they
    /// were after our last write; a difference runs the full comparison and
    /// repair at once. `0` leaves repairs to --resync-interval.
    #[arg(long, env = "NFTPOLICY_IPTABLES_CHECK_MS", default_value = "100")]
    pub iptables_check_ms: u64,
    /// Health endpoints (`/liveness`, `/readiness`), felix's port.
    #[arg(long, env = "NFTPOLICY_HEALTH_ADDR", default_value = "127.0.0.1:9099")]
    pub health_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`), felix's port.
    #[arg(long, env = "NFTPOLICY_METRICS_ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_addr: SocketAddr,
}

#[derive(Debug, Clone, Args)]
pub struct DatastoreArgs {
    /// `kubernetes` (the API server: in-cluster, or the kubeconfig in
    /// KUBECONFIG), `kubernetes:KUBECONFIG`, `etcd://HOST:2379[,HOST:2379…]`
    /// (also `etcds://`, `https://`) or `file:PATH`.
    #[arg(long, env = "NFTPOLICY_DATASTORE")]
    pub datastore: String,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    /// How often a file datastore is re-read for changes, in milliseconds.
    #[arg(long, env = "NFTPOLICY_FILE_POLL_MS", default_value = "500")]
    pub file_poll_ms: u64,
}

impl DatastoreArgs {
    pub fn source(&self) -> anyhow::Result<Source> {
        Ok(
            crate::datastore::Datastore::parse(&self.datastore, &self.tls)?
                .source(Duration::from_millis(self.file_poll_ms)),
        )
    }

    pub fn etcd(&self) -> anyhow::Result<watcher::etcd::EtcdConfig> {
        Ok(watcher::etcd::EtcdConfig::from_url(&self.datastore)
            .with_context(|| format!("--datastore {:?}", self.datastore))?
            .with_tls(
                self.tls.etcd_ca.clone(),
                self.tls.etcd_cert.clone(),
                self.tls.etcd_key.clone(),
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

/// Consecutive failed applies after which the agent exits non-zero.
const MAX_APPLY_FAILURES: u32 = 6;

/// Work for the programmer thread, in order. The thread owns the cluster
/// state: updates are moved to it (never copied: at 250,000 pods a copy
/// per apply would cost more than the apply).
enum Job {
    /// Fold these datastore updates into the state.
    Updates(Vec<Update>),
    /// Program everything folded in so far.
    Apply {
        revision: i64,
        /// When the changes it programs were received, and of what.
        received: Vec<(Instant, Kind)>,
    },
    /// Compare the kernel with what we last wrote; repair if it differs.
    Resync,
    /// Compare the dataplane's change marker with the one after our last
    /// write or check; a `Resync` if it changed.
    Check,
    /// Last resort before giving up (nftables): see `Pipeline::rebuild`.
    Rebuild { revision: i64 },
}

/// Tests and measurements: one successful apply or repair.
#[cfg(test)]
#[derive(Debug)]
struct Programmed {
    /// When its changes were received, and of what.
    received: Vec<(Instant, Kind)>,
    started: Instant,
    /// When the kernel acknowledged it.
    acked: Instant,
}

/// What became of a job: every job reports back, so that the loop knows
/// when the programmer thread is free again.
struct JobDone {
    /// Whether the apply or repair succeeded; `None` when none was
    /// attempted (no drift found, nothing changed behind our back).
    ok: Option<bool>,
    revision: i64,
    /// Why it failed (for the message the agent exits with).
    error: Option<String>,
}

/// The programmer thread: the node's state, compiler and kernel side
/// ([`Node`]), and what the loop and the metrics need to hear of them.
struct Worker {
    node: Node,
    metrics: Arc<Metrics>,
    /// The error of the last failed apply or rebuild, until reported.
    last_error: Option<String>,
    /// The dataplane's change marker after our last write or resync (0:
    /// none), shared with the table-size check thread.
    marker: Arc<AtomicU64>,
    /// Tests and measurements: each successful apply's changes (when
    /// received, and of what) and when the kernel acknowledged it.
    #[cfg(test)]
    programmed: Option<std::sync::mpsc::Sender<Programmed>>,
}

impl Worker {
    /// Runs `program` (an apply or a repair), counting and logging its
    /// outcome; whether it succeeded.
    fn program(
        &mut self,
        revision: i64,
        received: &[(Instant, Kind)],
        program: impl FnOnce(&mut Node) -> Result<(), ::dataplane::Error>,
    ) -> bool {
        let start = Instant::now();
        let before = self.node.pipeline().dataplane().stats();
        let result = program(&mut self.node);
        self.metrics
            .record(&before, &self.node.pipeline().dataplane().stats());
        match result {
            Ok(()) => {
                let acked = Instant::now();
                let logical = self.node.pipeline().logical().expect("applied");
                self.metrics.observe_apply(logical, start.elapsed());
                for (r, _) in received {
                    self.metrics
                        .programming_latency
                        .observe(acked.duration_since(*r).as_secs_f64());
                }
                #[cfg(test)]
                if let Some(tx) = &self.programmed {
                    let _ = tx.send(Programmed {
                        received: received.to_vec(),
                        started: start,
                        acked,
                    });
                }
                info!(
                    revision,
                    endpoints = logical.endpoints.len(),
                    policies = logical.active_policies.len(),
                    rejected = logical.rejected.len(),
                    ms = start.elapsed().as_millis() as u64,
                    "dataplane programmed"
                );
                true
            }
            Err(e) => {
                let e = ::dataplane::error_chain(&e);
                error!(
                    revision,
                    "apply failed; the previous ruleset stays in force: {e}"
                );
                self.last_error = Some(e);
                false
            }
        }
    }

    /// `Some(ok)` when a repair was attempted.
    fn resync(&mut self) -> Option<bool> {
        match self.node.has_drift() {
            Ok(false) => None,
            Ok(true) => {
                warn!("the kernel differs from our last write; repairing");
                self.metrics.resyncs_repaired.inc();
                Some(self.program(-1, &[], Node::repair))
            }
            Err(e) => {
                warn!("drift check failed: {}", ::dataplane::error_chain(&e));
                None
            }
        }
    }

    /// Runs `job`; `None` when there is nothing to report.
    fn job(&mut self, job: Job) -> Option<(bool, i64)> {
        Some(match job {
            Job::Updates(updates) => {
                self.node.fold(updates);
                return None;
            }
            Job::Apply { revision, received } => {
                // Someone changed our tables since our last look: the
                // apply reads the kernel back instead of trusting its
                // belief, so it repairs that too.
                let known = self.marker.load(Ordering::Relaxed);
                if known != 0 && self.read_marker() != known {
                    let _ = self.node.pipeline_mut().dataplane_mut().invalidate();
                }
                (self.program(revision, &received, Node::apply), revision)
            }
            Job::Resync => (self.resync()?, -1),
            Job::Check => {
                // Again, now that no write of ours can be under way.
                if self.read_marker() == self.marker.load(Ordering::Relaxed) {
                    return None;
                }
                debug!("our tables changed behind our back; comparing them in full");
                let repaired = self.resync();
                self.marker.store(self.read_marker(), Ordering::Relaxed);
                (repaired?, -1)
            }
            Job::Rebuild { revision } => {
                let ok = match self.node.rebuild() {
                    Ok(rebuilt) => rebuilt,
                    Err(e) => {
                        let e = ::dataplane::error_chain(&e);
                        error!("{e}");
                        self.last_error = Some(e);
                        false
                    }
                };
                (ok, revision)
            }
        })
    }

    fn read_marker(&self) -> u64 {
        self.node
            .pipeline()
            .dataplane()
            .change_marker()
            .unwrap_or(0)
    }

    fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>, done: mpsc::UnboundedSender<JobDone>) {
        for job in jobs {
            // Folding is the first half of an apply: reported with it.
            let job = match job {
                Job::Updates(updates) => {
                    self.node.fold(updates);
                    continue;
                }
                job => job,
            };
            let wrote = matches!(job, Job::Apply { .. } | Job::Resync | Job::Rebuild { .. });
            let outcome = self.job(job);
            if wrote {
                // After our own writes and comparisons: the tables as they
                // are with nobody else's change in them.
                self.marker.store(self.read_marker(), Ordering::Relaxed);
            }
            let (ok, revision) = match outcome {
                Some((ok, revision)) => (Some(ok), revision),
                None => (None, -1),
            };
            let error = self.last_error.take();
            let _ = done.send(JobDone {
                ok,
                revision,
                error,
            });
        }
    }
}

/// What the loop needs to know of the datastore stream (the state itself
/// lives on the programmer thread).
#[derive(Debug, Default)]
struct SyncStatus {
    in_sync: bool,
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

    let source = args.datastore.source()?;
    // A file datastore delivers each re-read as updates closed by `InSync`:
    // only at that point is the state one the user wrote (a directory
    // swapped in one rename must not be programmed half-read). etcd
    // delivers each revision as it is committed: every event is one.
    let whole_at_insync_only = matches!(source, watcher::Source::Files { .. });
    let (updates, source_task) = source.spawn(1024);
    let opts = args.dataplane.compile_options()?;
    let loop_opts = LoopOptions {
        whole_at_insync_only,
        lanes: !whole_at_insync_only,
        resync_interval: Duration::from_secs(args.resync_interval.max(1)),
        watch: args.watch.clone(),
        // The cheap check between resyncs (iptables, legacy tools).
        table_size_check: (args.dataplane.kind() == ::dataplane::Kind::Iptables
            && args.dataplane.iptables_tools() == iptables::Backend::Legacy
            && args.iptables_check_ms > 0)
            .then(|| Duration::from_millis(args.iptables_check_ms)),
        #[cfg(test)]
        programmed: None,
    };
    let dataplane = args.dataplane.open()?;
    let node = Node::new(Pipeline::new(opts, dataplane));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        sigterm.recv().await;
        info!("SIGTERM: exiting; the rules stay in force");
    };
    serve(
        loop_opts,
        node,
        Stream {
            updates,
            source_task,
        },
        metrics,
        health,
        stop,
    )
    .await
}

/// How the loop behaves, apart from the node it programs.
#[derive(Debug, Clone)]
struct LoopOptions {
    /// Program only at the `InSync` closing a re-read (a file datastore).
    whole_at_insync_only: bool,
    /// Let a batch's cheap changes go ahead of its slow ones (`lanes`).
    lanes: bool,
    resync_interval: Duration,
    watch: crate::tamper::WatchArgs,
    /// `--iptables-check-ms` when it applies.
    table_size_check: Option<Duration>,
    /// See `Worker::programmed`.
    #[cfg(test)]
    programmed: Option<std::sync::mpsc::Sender<Programmed>>,
}

/// The datastore's update stream and the task feeding it.
struct Stream {
    updates: mpsc::Receiver<Update>,
    source_task: tokio::task::JoinHandle<Result<(), watcher::SourceError>>,
}

/// The agent's loop: folds the datastore's updates, hands them to the
/// programmer thread (which owns `node`), schedules repairs, until `stop`
/// completes (`Ok(true)`) or something fails for good.
#[allow(clippy::too_many_lines)] // one `select!` loop, read top to bottom
async fn serve(
    opts: LoopOptions,
    node: Node,
    stream: Stream,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<bool> {
    let Stream {
        mut updates,
        source_task,
    } = stream;
    let whole_at_insync_only = opts.whole_at_insync_only;
    // The programmer lives on its own thread; jobs in, results out.
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<JobDone>();
    let own_port = node.pipeline().dataplane().own_port();
    // The kernel watch starts after the first apply: while a socket
    // listens to nf_tables notifications the kernel builds one for every
    // object a commit creates, and the first commit creates them all (at
    // 1,000 policies / 25,000 pods it took 1.9 s instead of 0.24 s, and at
    // 10,000 / 250,000 the notifications overran the listener, whose
    // "lost notifications" then cost a full drift check). Before that
    // commit there is nothing of ours to tamper with; a change in the
    // moment between it and the subscription is left to the periodic
    // resync.
    let mut kernel_changes: Option<mpsc::Receiver<()>> = None;
    let marker = Arc::new(AtomicU64::new(0));
    let worker = Worker {
        node,
        metrics: metrics.clone(),
        last_error: None,
        marker: marker.clone(),
        #[cfg(test)]
        programmed: opts.programmed.clone(),
    };
    let programmer = std::thread::Builder::new()
        .name("programmer".into())
        .spawn(move || worker.run(job_rx, done_tx))?;

    let mut sync = SyncStatus::default();
    // Updates not yet handed to the programmer thread: `settled` form a
    // consistent state (see `whole_at_insync_only`), `unsettled` follow it.
    let mut settled = Pending::default();
    let mut unsettled: Vec<Queued> = Vec::new();
    let mut dirty = false;
    let mut busy = false;
    // A resync is due (the timer, or a foreign change to our tables); it
    // waits for the apply under way and at most one fast-lane apply.
    let mut resync_due = false;
    let mut resync_passed = false;
    let mut resync = tokio::time::interval(opts.resync_interval);
    resync.tick().await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut table_changes = opts
        .table_size_check
        .map(|every| crate::tamper::spawn_table_size_check(every, marker.clone()))
        .transpose()?;
    let mut applied_once = false;
    // Repeated kernel failures: retry with backoff (re-reading the kernel
    // each time), never in a tight loop; give up after MAX_APPLY_FAILURES.
    let mut failures: u32 = 0;
    let mut retry_at: Option<tokio::time::Instant> = None;
    tokio::pin!(stop);

    let result = loop {
        tokio::select! {
            u = updates.recv() => {
                let Some(u) = u else {
                    match source_task.await {
                        Ok(Err(e)) => break Err(anyhow::anyhow!("datastore source failed: {e}")),
                        _ => break Err(anyhow::anyhow!("datastore source ended")),
                    }
                };
                // Take everything queued: a burst becomes one transaction.
                let mut batch = vec![u];
                while let Ok(more) = updates.try_recv() {
                    batch.push(more);
                }
                let now = Instant::now();
                // The first list, before anything was programmed or queued:
                // its objects go to the programmer thread's cache as they
                // come (nothing is programmed before the `InSync` closing
                // it), not held here as whole resources until then — at
                // 250,000 pods that queue was over 250 MiB.
                let mut listing: Vec<Update> = Vec::new();
                let first_list = !applied_once
                    && settled.is_empty()
                    && unsettled
                        .iter()
                        .all(|q| matches!(q.update, Update::Disconnected { .. }));
                for u in batch {
                    // Counts and logs undecodable values (once each).
                    metrics.rejected.update(&u);
                    if let Some(r) = u.revision() {
                        sync.revision = sync.revision.max(r);
                    }
                    let mut received = None;
                    let closes = match &u {
                        Update::Disconnected { reason } => {
                            warn!("datastore disconnected, dataplane left as is: {reason}");
                            sync.in_sync = false;
                            health.ready.store(false, Ordering::Relaxed);
                            false
                        }
                        Update::InSync { revision } => {
                            info!(revision, "datastore in sync");
                            sync.in_sync = true;
                            // Also after a reconnect with nothing changed:
                            // the apply that follows (cheap when nothing
                            // changed) is what marks us ready again.
                            dirty = true;
                            true
                        }
                        Update::Upsert { .. } | Update::Delete { .. } | Update::Invalid { .. }
                            if first_list && !sync.in_sync =>
                        {
                            listing.push(u);
                            continue;
                        }
                        Update::Upsert { .. } | Update::Delete { .. } => {
                            received = Some(now);
                            !whole_at_insync_only
                        }
                        Update::Invalid { .. } => !whole_at_insync_only,
                    };
                    unsettled.push(Queued { update: u, received });
                    if closes {
                        dirty |= sync.in_sync;
                        settled.append(&mut unsettled);
                    }
                }
                if !listing.is_empty() {
                    job_tx.send(Job::Updates(listing))?;
                }
                metrics.resync_state.set(i64::from(sync.in_sync));
            }
            Some(done) = done_rx.recv() => {
                busy = false;
                // `None`: nothing was attempted (no drift found).
                if let Some(ok) = done.ok {
                    if ok {
                        if !applied_once {
                            kernel_changes = crate::tamper::spawn(&opts.watch, own_port)?;
                        }
                        applied_once = true;
                        if let Ok(revision) = u64::try_from(done.revision) {
                            health.applied_revision.store(revision, Ordering::Relaxed);
                        }
                        failures = 0;
                    } else {
                        failures += 1;
                        if failures >= MAX_APPLY_FAILURES {
                            break Err(anyhow::anyhow!(
                                "the kernel rejected {failures} consecutive transactions (the last: {}); \
                                 giving up so that the orchestrator restarts the agent; the kernel keeps what it holds \
                                 (our last committed ruleset, unless another program changed it)",
                                done.error.as_deref().unwrap_or("see the errors above")
                            ));
                        }
                        if failures == MAX_APPLY_FAILURES - 1 && own_port.is_some() && sync.in_sync {
                            busy = true;
                            job_tx.send(Job::Rebuild { revision: sync.revision })?;
                            continue;
                        }
                        let delay = Duration::from_secs(1 << (failures - 1).min(4));
                        warn!(failures, "retrying in {delay:?}");
                        retry_at = Some(tokio::time::Instant::now() + delay);
                    }
                    health.ready.store(ok && sync.in_sync, Ordering::Relaxed);
                }
            }
            _ = resync.tick() => {
                // After the apply under way; a resync that finds no drift
                // changes nothing. It repairs towards our last write, so it
                // also runs while the datastore is out of reach: the last
                // good dataplane is kept, not left to whoever tampers with
                // it meanwhile.
                resync_due |= applied_once;
            }
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                retry_at = None;
                dirty = true;
            }
            _ = tick.tick() => {
                health.last_tick.store(now_secs(), Ordering::Relaxed);
            }
            Some(()) = async { table_changes.as_mut()?.recv().await }, if table_changes.is_some() => {
                // Only when no apply is under way (the next notice comes
                // with the next check); the programmer thread compares
                // again, after whatever it was doing.
                if applied_once && !busy {
                    busy = true;
                    job_tx.send(Job::Check)?;
                }
            }
            Some(()) = async { kernel_changes.as_mut()?.recv().await }, if kernel_changes.is_some() => {
                resync_due |= applied_once;
            }
            () = &mut stop => break Ok(true),
        }
        if busy {
            continue;
        }
        let can_apply = (dirty || !settled.is_empty()) && sync.in_sync && retry_at.is_none();
        // A fast lane goes before a due resync once; the rest after it.
        let fast_first = can_apply && applied_once && settled.would_split(opts.lanes);
        if resync_due && (resync_passed || !fast_first) {
            resync_due = false;
            resync_passed = false;
            busy = true;
            job_tx.send(Job::Resync)?;
        } else if can_apply {
            resync_passed |= resync_due;
            // Nothing is split before the first apply: pods without their
            // policies would be allowed what the policies deny.
            let batch = settled.take(opts.lanes && applied_once);
            dirty = false;
            if batch.split {
                debug!(
                    updates = batch.updates.len(),
                    "fast lane: programming these before the slow changes queued with them"
                );
            }
            busy = true;
            // A fast lane programs everything up to its first held-back
            // update; the revision reported never goes back for it (only
            // for a datastore whose revisions did).
            let revision = match batch.revision {
                Some(r) => r.min(sync.revision).max(
                    i64::try_from(health.applied_revision.load(Ordering::Relaxed))
                        .unwrap_or(i64::MAX),
                ),
                None => sync.revision,
            };
            job_tx.send(Job::Updates(batch.updates))?;
            job_tx.send(Job::Apply {
                revision,
                received: batch.received,
            })?;
        }
    };
    // The programmer thread ends with its job channel, after the jobs
    // queued; the process does not wait for it (SIGTERM exits at once,
    // the rules stay in force).
    drop(job_tx);
    drop(programmer);
    result
}

#[cfg(test)]
#[path = "daemon_tests.rs"]
mod tests;
