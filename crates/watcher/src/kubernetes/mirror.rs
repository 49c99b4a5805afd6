//! The policy controller watching the API server: the Kubernetes source's
//! Calico resources written into etcd (what calico-kube-controllers does
//! for Calico's etcd mode).
//!
//! Level-triggered, as kube-rs's runtime reconciles: the desired state is
//! the source's resources; after the first `InSync`, after every relist
//! (an `InSync` that follows a `Disconnected`), after a failed write, and
//! every five minutes, etcd's controller-owned keys are made equal to it
//! in full ([`crate::controller::sync_resources`]: creates, updates, and
//! deletes what is no longer wanted); between those, each upsert or
//! deletion is one compare-and-swap write. While the source is not in sync
//! nothing is written: deletions are only known once a relist completes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::Client;
use model::calico::{Resource, ResourceKey};
use tokio::sync::mpsc;

use super::lease::LeaseConfig;
use super::{ClusterAccess, KubeOptions};
use crate::controller::{delete_key, owns, put_resource, sync_resources, Action, Error};
use crate::etcd::{Backoff, EtcdConfig, EtcdOptions};
use crate::Update;

/// Full reconcile this often even when nothing happened (repairs what was
/// changed in etcd behind the controller's back).
const RESYNC_PERIOD: Duration = Duration::from_secs(300);

/// Why the API controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(transparent)]
    Kube(#[from] super::KubeError),
    #[error(transparent)]
    Etcd(#[from] Error),
    #[error("lost the leader election: another controller may be writing now; exiting so that this one restarts as a candidate")]
    LostLeadership,
    #[error("the Kubernetes source ended")]
    SourceEnded,
}

/// Counts of what the controller did, for tests and logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MirrorStats {
    pub full_reconciles: u64,
    pub event_writes: u64,
}

/// `nftpolicy controller --datastore etcd://…` (without `--from`): keeps
/// etcd equal to the API server until cancelled, `SIGTERM` or lost
/// leadership. With `election`, waits to be the leader first.
pub async fn run(
    access: ClusterAccess,
    etcd: &EtcdConfig,
    election: Option<LeaseConfig>,
    stats: Option<mpsc::UnboundedSender<MirrorStats>>,
) -> Result<(), MirrorError> {
    let kube_client = access.client().await?;
    let mut leadership = match election {
        Some(cfg) => Some(super::lease::acquire(kube_client.clone(), cfg).await),
        None => None,
    };
    let etcd_client = etcd
        .connect(&EtcdOptions::default())
        .await
        .map_err(Error::from)?;
    let (tx, mut rx) = mpsc::channel(1024);
    let mut source = tokio::spawn(super::run_with(access, KubeOptions::default(), tx));
    let _abort_source = super::AbortOnDrop(vec![source.abort_handle()]);
    let mut mirror = Mirror {
        client: etcd_client,
        desired: BTreeMap::new(),
        in_sync: false,
        needs_full: true,
        last_full: None,
        backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(15)),
        retry_at: None,
        stats: MirrorStats::default(),
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| {
            Error::Connect(crate::etcd::EtcdError::Connect {
                endpoints: String::new(),
                reason: format!("installing the SIGTERM handler: {e}"),
            })
        })?;
    let result = loop {
        let resync_due = mirror
            .last_full
            .map_or(tokio::time::Instant::now() + RESYNC_PERIOD, |t| {
                tokio::time::Instant::from_std(t + RESYNC_PERIOD)
            });
        let retry = mirror.retry_at.unwrap_or(resync_due).min(resync_due);
        tokio::select! {
            u = rx.recv() => {
                let Some(u) = u else {
                    break match (&mut source).await {
                        Ok(Err(e)) => Err(MirrorError::Kube(e)),
                        _ => Err(MirrorError::SourceEnded),
                    };
                };
                mirror.update(u).await;
            }
            _ = tokio::time::sleep_until(retry) => {
                mirror.retry_at = None;
                mirror.needs_full = true;
                mirror.reconcile_if_due().await;
            }
            _ = async { leadership.as_mut().expect("guarded").lost().await }, if leadership.is_some() => {
                break Err(MirrorError::LostLeadership);
            }
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: stopping; etcd keeps what it holds");
                break Ok(());
            }
        }
        if let Some(s) = &stats {
            let _ = s.send(mirror.stats.clone());
        }
    };
    if let Some(l) = leadership {
        l.release().await;
    }
    result
}

struct Mirror {
    client: Client,
    desired: BTreeMap<ResourceKey, Resource>,
    in_sync: bool,
    /// The next write is a full reconcile (first sync, relist, failure).
    needs_full: bool,
    last_full: Option<Instant>,
    backoff: Backoff,
    retry_at: Option<tokio::time::Instant>,
    stats: MirrorStats,
}

fn owned_by_us(key: &ResourceKey) -> impl Fn(&[u8]) -> bool + Sync + '_ {
    move |v: &[u8]| owns(key, v)
}

impl Mirror {
    async fn update(&mut self, u: Update) {
        match u {
            Update::Upsert { key, resource, .. } => {
                let write = self.in_sync && !self.needs_full;
                if write {
                    let r =
                        put_resource(&mut self.client.kv_client(), &resource, false, None).await;
                    self.wrote(r.map(|c| c.action != Action::Unchanged), &key);
                }
                self.desired.insert(key, resource);
            }
            Update::Delete { key, .. } => {
                self.desired.remove(&key);
                if self.in_sync && !self.needs_full {
                    let owned = owned_by_us(&key);
                    let r =
                        delete_key(&mut self.client.kv_client(), &key, false, &owned, None).await;
                    self.wrote(r.map(|c| c.action == Action::Deleted), &key);
                }
            }
            Update::InSync { .. } => {
                self.in_sync = true;
                self.reconcile_if_due().await;
            }
            Update::Disconnected { reason } => {
                if self.in_sync {
                    tracing::warn!(
                        "API server: {reason}; etcd is left as it is until the next complete list"
                    );
                }
                self.in_sync = false;
                self.needs_full = true;
            }
            // Logged by the source; a key it stood for was deleted first.
            Update::Invalid { .. } => {}
        }
    }

    fn wrote(&mut self, result: Result<bool, Error>, key: &ResourceKey) {
        match result {
            Ok(changed) => {
                if changed {
                    self.stats.event_writes += 1;
                }
            }
            Err(e) => {
                tracing::warn!(key = %key, "etcd write failed ({e}); a full reconcile follows");
                self.needs_full = true;
                self.schedule_retry();
            }
        }
    }

    fn schedule_retry(&mut self) {
        if self.retry_at.is_none() {
            self.retry_at = Some(tokio::time::Instant::now() + self.backoff.next_delay());
        }
    }

    async fn reconcile_if_due(&mut self) {
        if !self.in_sync || !self.needs_full {
            return;
        }
        match sync_resources(&self.client, &self.desired, false).await {
            Ok(changes) => {
                let changed = changes
                    .iter()
                    .filter(|c| c.action != Action::Unchanged)
                    .count();
                tracing::info!(
                    resources = self.desired.len(),
                    changed,
                    "etcd reconciled with the API server"
                );
                self.needs_full = false;
                self.last_full = Some(Instant::now());
                self.stats.full_reconciles += 1;
                self.backoff.reset();
            }
            Err(e) => {
                tracing::warn!("reconciling etcd failed ({e}); retrying");
                self.schedule_retry();
            }
        }
    }
}
