//! Datastores → one stream of typed Calico updates, and the Kubernetes →
//! Calico policy controller.
//!
//! - [`files`]: a directory (or list) of Kubernetes and/or Calico YAML, read
//!   once ([`files::load`]) or watched ([`files::watch`]);
//! - [`etcd`]: Calico's etcd v3 layout, listed then watched, with reconnect,
//!   relist and reconcile ([`etcd::run`]);
//! - [`kubernetes`]: the Kubernetes API server (Calico's KDD mode):
//!   Namespaces, Pods and NetworkPolicies listed and watched with kube-rs,
//!   converted as they arrive ([`kubernetes::run`]);
//! - [`controller`]: writes Kubernetes objects into etcd as Calico resources
//!   (`apply`, `delete`, `sync_dir`, `run_controller`).
//!
//! Every source sends [`Update`]s over a `tokio::sync::mpsc` channel;
//! [`Cache`] folds them into a [`ClusterState`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use model::calico::{Resource, ResourceKey};
use model::state::ClusterState;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub mod controller;
pub mod etcd;
pub mod files;
pub mod kubernetes;

/// One change from a datastore.
///
/// Guarantees every source keeps:
/// - after an `InSync`, the `Upsert`s and `Delete`s received so far, applied
///   in order, are the whole valid state of the datastore at that revision;
/// - an object that fails to decode is reported as `Invalid` and is *not*
///   part of the state: if its key held a valid resource before, a `Delete`
///   of that key comes first, so a stale value never stays in force;
/// - a `Delete` may name a key that was last reported `Invalid` (or never
///   reported at all); applying it is then a no-op;
/// - before each `InSync`, every key still invalid is reported (again), so
///   the `Invalid`s since the previous `InSync`, less the keys upserted or
///   deleted since, are the keys invalid at that point.
// Updates are moved once, through a channel; boxing the resource would buy
// nothing but indirection for every consumer.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Upsert {
        key: ResourceKey,
        resource: Resource,
        revision: i64,
    },
    Delete {
        key: ResourceKey,
        revision: i64,
    },
    /// The source has delivered a complete snapshot; everything before this is the full state.
    InSync {
        revision: i64,
    },
    /// A value that failed to decode: reported by key and skipped; everything else keeps flowing.
    Invalid {
        key: String,
        reason: String,
        revision: i64,
    },
    /// Connection lost / being re-established (for health and metrics).
    Disconnected {
        reason: String,
    },
}

impl Update {
    /// The datastore revision of the update: for etcd, the mod revision of
    /// the change (of the snapshot for `InSync` and for deletions found by a
    /// relist); for files, the generation of the directory read (1, 2, …);
    /// for the Kubernetes API server, the resource version up to which every
    /// watched kind has been delivered (see [`kubernetes`]).
    /// The agent can timestamp updates on receipt to measure programming
    /// latency per revision.
    pub fn revision(&self) -> Option<i64> {
        match self {
            Update::Upsert { revision, .. }
            | Update::Delete { revision, .. }
            | Update::InSync { revision }
            | Update::Invalid { revision, .. } => Some(*revision),
            Update::Disconnected { .. } => None,
        }
    }
}

/// The cluster state built from a stream of [`Update`]s.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cache {
    pub state: ClusterState,
    /// An `InSync` has been received since the last `Disconnected`.
    pub in_sync: bool,
    /// Whether an `InSync` was ever received.
    pub ever_synced: bool,
    /// The highest revision seen.
    pub revision: i64,
    /// Keys currently reported invalid, with the reason.
    pub invalid: BTreeMap<String, String>,
    /// Keys reported invalid since the last `InSync`.
    invalid_since_sync: BTreeSet<String>,
    /// Reason of the last `Disconnected`, cleared by `InSync`.
    pub disconnected: Option<String>,
}

impl Cache {
    pub fn new() -> Self {
        Self::default()
    }

    /// `key` has a valid value now, or none: no longer reported invalid.
    fn forget_invalid(&mut self, key: &ResourceKey) {
        // Nearly always empty: no etcd key is formatted for each update.
        if self.invalid.is_empty() && self.invalid_since_sync.is_empty() {
            return;
        }
        let etcd_key = key.etcd_key();
        self.invalid.remove(&etcd_key);
        self.invalid_since_sync.remove(&etcd_key);
    }

    /// Applies one update; returns whether the cluster state changed.
    pub fn apply(&mut self, update: Update) -> bool {
        if let Some(r) = update.revision() {
            self.revision = self.revision.max(r);
        }
        match update {
            Update::Upsert { key, resource, .. } => {
                self.forget_invalid(&key);
                self.state.put_at(key, resource)
            }
            Update::Delete { key, .. } => {
                self.forget_invalid(&key);
                self.state.remove(&key).is_some()
            }
            Update::InSync { .. } => {
                if !self.ever_synced {
                    self.state.compact();
                }
                let since = std::mem::take(&mut self.invalid_since_sync);
                self.invalid.retain(|k, _| since.contains(k));
                self.in_sync = true;
                self.ever_synced = true;
                self.disconnected = None;
                false
            }
            Update::Invalid { key, reason, .. } => {
                self.invalid_since_sync.insert(key.clone());
                self.invalid.insert(key, reason);
                false
            }
            Update::Disconnected { reason } => {
                self.in_sync = false;
                self.disconnected = Some(reason);
                false
            }
        }
    }
}

/// Where the cluster state comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Manifest files or directories, re-read when they change (polled).
    Files { paths: Vec<PathBuf>, poll: Duration },
    /// An etcd v3 cluster in Calico's layout.
    Etcd(etcd::EtcdConfig),
    /// The Kubernetes API server.
    Kubernetes(kubernetes::ClusterAccess, kubernetes::KubeOptions),
}

/// What ended a source task.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Etcd(#[from] etcd::EtcdError),
    #[error(transparent)]
    Files(#[from] files::FileError),
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubeError),
}

impl Source {
    /// Starts the source on the current tokio runtime. The task ends with
    /// `Ok(())` when the receiver is dropped, and with an error only for a
    /// configuration that can never work (e.g. unreadable TLS files); lost
    /// connections are retried forever and reported as
    /// [`Update::Disconnected`].
    pub fn spawn(
        self,
        buffer: usize,
    ) -> (mpsc::Receiver<Update>, JoinHandle<Result<(), SourceError>>) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let task = tokio::spawn(async move {
            match self {
                Source::Files { paths, poll } => files::watch(paths, poll, tx)
                    .await
                    .map_err(SourceError::from),
                Source::Etcd(cfg) => etcd::run(cfg, tx).await.map_err(SourceError::from),
                Source::Kubernetes(access, options) => kubernetes::run_with(access, options, tx)
                    .await
                    .map_err(SourceError::from),
            }
        });
        (rx, task)
    }
}
