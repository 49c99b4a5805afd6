//! The Kubernetes API datastore (Calico's "KDD" mode): Namespaces, Pods,
//! NetworkPolicies and ServiceAccounts listed and watched on the API server
//! with kube-rs, and turned into the same [`Update`]s as the etcd and file
//! sources (Profiles `kns.*`, WorkloadEndpoints, NetworkPolicies
//! `knp.default.*`, Profiles `ksa.*`), through
//! the model's decoder and conversion.
//!
//! [`run`] starts one reflector per kind ([`reflector`]) and folds what they
//! report into one stream:
//!
//! - `InSync` only once every kind has been listed and is being watched,
//!   and again after each recovery (a relist after `410 Gone`, a watch
//!   re-established after an error); every object still rejected is
//!   reported `Invalid` (again) right before it;
//! - `Disconnected` when a kind's request fails (the reason names the kind,
//!   the verb, and for a 403 the permission that is missing);
//! - a relist reconciles: objects gone from it are deleted, so deletions
//!   made while disconnected are never lost;
//! - objects that cannot be decoded or converted are `Invalid`, named as
//!   `Pod <namespace>/<name>`; everything else flows;
//! - revisions: the API server's resource versions are etcd revisions,
//!   but the kinds are separate watches, so an event of one kind can
//!   arrive before an older one of another. An update's revision is
//!   therefore the resource version up to which *every* kind is known to be
//!   delivered (the lowest of the kinds' progress, from events, lists and
//!   bookmarks); when bookmarks move it past events already delivered, an
//!   `InSync` carries the new revision. An agent that reports revision R
//!   has thus seen every change up to R.
//!
//! Nothing of a Kubernetes object is kept: each is converted when it
//! arrives ([`tracker`] keeps its resource version, the Calico key and a
//! hash per object).

pub mod lease;
pub mod mirror;
pub mod object;
pub mod reflector;
pub mod tracker;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use kube::api::Api;
use model::kube::KubeKey;
use tokio::sync::mpsc;

use crate::Update;
use object::{RawObject, Watched};
use reflector::Msg;
use tracker::Tracker;

/// How to reach the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterAccess {
    /// In a pod: the service account's token and CA, and
    /// `KUBERNETES_SERVICE_HOST`/`_PORT`.
    InCluster,
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
}

/// Why the Kubernetes source could not be set up, or gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes datastore {datastore:?}: {reason}")]
    Url { datastore: String, reason: String },
    #[error("in-cluster Kubernetes configuration: {0} (outside a pod, give a kubeconfig: --datastore kubernetes:PATH, or set KUBECONFIG)")]
    InCluster(String),
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error("Kubernetes client: {0}")]
    Client(String),
    /// The API server refused a request (401/403), and the caller asked to
    /// give up on that rather than wait for RBAC to be fixed.
    #[error("{0}")]
    Refused(String),
}

impl ClusterAccess {
    /// Parses a `--datastore` value: `kubernetes` (the kubeconfig named by
    /// `KUBECONFIG` when set, else the in-cluster configuration, as Calico
    /// reads it) or `kubernetes:PATH`. `None`: not a Kubernetes datastore.
    pub fn from_datastore(datastore: &str) -> Option<Result<ClusterAccess, KubeError>> {
        let rest = datastore.strip_prefix("kubernetes")?;
        Some(match rest {
            "" => Ok(
                match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
                    // Like kubectl, the first file of a list.
                    Some(list) => ClusterAccess::Kubeconfig(
                        std::env::split_paths(&list)
                            .next()
                            .unwrap_or_else(|| PathBuf::from(&list)),
                    ),
                    None => ClusterAccess::InCluster,
                },
            ),
            _ => match rest.strip_prefix(':') {
                Some(path) if !path.is_empty() => Ok(ClusterAccess::Kubeconfig(path.into())),
                _ => Err(KubeError::Url {
                    datastore: datastore.to_owned(),
                    reason: "expected `kubernetes` or `kubernetes:PATH-TO-KUBECONFIG`".into(),
                }),
            },
        })
    }

    /// A client (no request is made yet).
    pub async fn client(&self) -> Result<kube::Client, KubeError> {
        let mut config = match self {
            ClusterAccess::InCluster => {
                kube::Config::incluster().map_err(|e| KubeError::InCluster(e.to_string()))?
            }
            ClusterAccess::Kubeconfig(path) => {
                let shown = path.display().to_string();
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    KubeError::Kubeconfig {
                        path: shown.clone(),
                        reason: e.to_string(),
                    }
                })?;
                kube::Config::from_custom_kubeconfig(
                    kc,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| KubeError::Kubeconfig {
                    path: shown,
                    reason: e.to_string(),
                })?
            }
        };
        config.connect_timeout = Some(Duration::from_secs(10));
        kube::Client::try_from(config).map_err(|e| KubeError::Client(e.to_string()))
    }
}

impl std::fmt::Display for ClusterAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterAccess::InCluster => f.write_str("kubernetes (in-cluster)"),
            ClusterAccess::Kubeconfig(p) => write!(f, "kubernetes:{}", p.display()),
        }
    }
}

/// Tuning of the Kubernetes source; the defaults suit production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeOptions {
    /// Objects per LIST page. client-go's default is 500; a page of
    /// Deployment pods is then about 1.8 MB of JSON and decoding it is the
    /// agent's peak memory: at 100 per page a KDD agent with 10,000 pods
    /// stays at 69 MiB instead of 104 MiB (`cargo xtask latency`).
    pub page_size: u32,
    /// Server-side timeout of each WATCH (it is resumed at once after).
    pub watch_timeout_secs: u32,
    /// Shortest wait after a failure (the backoff is client-go's).
    pub backoff_min: Duration,
    /// End with [`KubeError::Refused`] on a 401/403 instead of retrying
    /// (for one-shot reads: `sync --once`, `explain`).
    pub give_up_when_refused: bool,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            page_size: 100,
            watch_timeout_secs: 290,
            backoff_min: Duration::ZERO,
            give_up_when_refused: false,
        }
    }
}

/// Runs the Kubernetes source with the default options until the receiver
/// is dropped. Fails only on a configuration that cannot work.
pub async fn run(access: ClusterAccess, tx: mpsc::Sender<Update>) -> Result<(), KubeError> {
    run_with(access, KubeOptions::default(), tx).await
}

/// [`run`] with explicit options.
pub async fn run_with(
    access: ClusterAccess,
    options: KubeOptions,
    tx: mpsc::Sender<Update>,
) -> Result<(), KubeError> {
    let client = access.client().await?;
    // Short queues: each message may hold a whole decoded object.
    let (msg_tx, mut msg_rx) = mpsc::channel::<(Watched, Msg)>(16);
    let mut reflectors = Vec::new();
    for kind in Watched::ALL {
        let api: Api<RawObject> = Api::all_with(client.clone(), &kind.api_resource());
        let (kind_tx, mut kind_rx) = mpsc::channel(4);
        reflectors.push(tokio::spawn(reflector::run(
            api,
            kind,
            options.clone(),
            kind_tx,
        )));
        let msg_tx = msg_tx.clone();
        // Tags the kind's messages onto the shared channel.
        reflectors.push(tokio::spawn(async move {
            while let Some(m) = kind_rx.recv().await {
                if msg_tx.send((kind, m)).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(msg_tx);
    let abort = AbortOnDrop(reflectors.iter().map(|t| t.abort_handle()).collect());
    let mut source = Source::new(tx);
    let result = loop {
        let msg = tokio::select! {
            m = msg_rx.recv() => m,
            _ = source.tx.closed() => break Ok(()),
        };
        let Some((kind, msg)) = msg else {
            break Ok(());
        };
        if let Msg::Failed(f) = &msg {
            if f.refused && options.give_up_when_refused {
                break Err(KubeError::Refused(f.reason.clone()));
            }
        }
        if source.handle(kind, msg).await.is_err() {
            break Ok(());
        }
    };
    drop(abort);
    result
}

/// Aborts its tasks when dropped (also when the future holding it is).
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[derive(Debug, Default)]
struct KindState {
    /// Listed completely at least once since the last (re)list started.
    listed: bool,
    /// Its watch is established (no failure since).
    healthy: bool,
    /// Every change of this kind up to this resource version is delivered.
    progress: u64,
    /// During a LIST: the objects listed so far.
    listing: Option<HashSet<KubeKey>>,
    /// An optional kind the API server does not serve: complete and
    /// healthy with no objects, and no part of [`Source::complete`].
    absent: bool,
}

/// The fold of the reflectors' messages into [`Update`]s.
struct Source {
    tx: mpsc::Sender<Update>,
    tracker: Tracker,
    kinds: [KindState; Watched::ALL.len()],
    in_sync: bool,
    /// The highest revision an update carried.
    emitted: i64,
    /// The highest resource version of an event delivered (sent or found
    /// to change nothing).
    delivered: u64,
}

struct Closed;

impl Source {
    fn new(tx: mpsc::Sender<Update>) -> Source {
        Source {
            tx,
            tracker: Tracker::default(),
            kinds: Default::default(),
            in_sync: false,
            emitted: 0,
            delivered: 0,
        }
    }

    /// The resource version up to which every kind is delivered.
    fn complete(&self) -> i64 {
        self.kinds
            .iter()
            .filter(|k| !k.absent)
            .map(|k| k.progress)
            .min()
            .unwrap_or(0) as i64
    }

    async fn send(&mut self, updates: Vec<Update>) -> Result<(), Closed> {
        for u in updates {
            if let Some(r) = u.revision() {
                self.emitted = self.emitted.max(r);
            }
            self.tx.send(u).await.map_err(|_| Closed)?;
        }
        Ok(())
    }

    /// Every rejected object again, then `InSync`.
    async fn send_in_sync(&mut self) -> Result<(), Closed> {
        let revision = self.complete().max(self.emitted);
        let mut updates = self.tracker.invalid(revision);
        updates.push(Update::InSync { revision });
        self.send(updates).await?;
        if !self.in_sync {
            tracing::info!(
                revision,
                objects = self.tracker.len(),
                "Kubernetes API in sync"
            );
        }
        self.in_sync = true;
        Ok(())
    }

    async fn maybe_in_sync(&mut self) -> Result<(), Closed> {
        if !self.in_sync && self.kinds.iter().all(|k| k.listed && k.healthy) {
            self.send_in_sync().await?;
        }
        Ok(())
    }

    async fn handle(&mut self, kind: Watched, msg: Msg) -> Result<(), Closed> {
        let k = kind.index();
        let mut out = Vec::new();
        let effect = match msg {
            Msg::Listing => {
                self.kinds[k].absent = false;
                self.kinds[k].listed = false;
                self.kinds[k].listing = Some(HashSet::new());
                return Ok(());
            }
            Msg::Object { object, listed } => {
                let rv = object.resource_version();
                if listed {
                    if let Some(seen) = &mut self.kinds[k].listing {
                        seen.insert(object.key(kind));
                    }
                } else {
                    self.kinds[k].progress = self.kinds[k].progress.max(rv);
                    self.delivered = self.delivered.max(rv);
                }
                let revision = self.complete().max(self.emitted);
                self.tracker.object(kind, object, revision, &mut out)
            }
            Msg::Deleted(object) => {
                let rv = object.resource_version();
                self.kinds[k].progress = self.kinds[k].progress.max(rv);
                self.delivered = self.delivered.max(rv);
                let revision = self.complete().max(self.emitted);
                self.tracker.deleted(kind, &object, revision, &mut out)
            }
            Msg::Listed { resource_version } => {
                let state = &mut self.kinds[k];
                state.progress = state.progress.max(resource_version);
                state.listed = true;
                let seen = state.listing.take().unwrap_or_default();
                self.delivered = self.delivered.max(resource_version);
                let revision = self.complete().max(self.emitted);
                // Not in sync while a kind relists: the `InSync` that
                // follows re-reports what is still rejected.
                self.tracker.reconcile(kind, &seen, revision, &mut out);
                self.send(out).await?;
                return self.maybe_in_sync().await;
            }
            Msg::Watching => {
                self.kinds[k].healthy = true;
                return self.maybe_in_sync().await;
            }
            Msg::Absent => {
                let state = &mut self.kinds[k];
                let first = !state.absent;
                state.absent = true;
                state.listed = true;
                state.healthy = true;
                state.listing = None;
                if first {
                    tracing::info!(
                        kind = ?kind,
                        "the API server does not serve {} (CRD not installed): none are enforced",
                        kind.rbac_resource()
                    );
                }
                // Objects of the kind seen before the CRD went away go.
                let revision = self.complete().max(self.emitted);
                self.tracker
                    .reconcile(kind, &HashSet::new(), revision, &mut out);
                self.send(out).await?;
                return self.maybe_in_sync().await;
            }
            Msg::Progress { resource_version } => {
                self.kinds[k].progress = self.kinds[k].progress.max(resource_version);
                // Bookmarks moved the complete revision past events already
                // delivered with a lower one: say so.
                let complete = self.complete();
                if self.in_sync && self.delivered as i64 > self.emitted && complete > self.emitted {
                    self.send_in_sync().await?;
                }
                return Ok(());
            }
            Msg::Failed(f) => {
                let state = &mut self.kinds[k];
                state.healthy = false;
                if f.expired {
                    state.listed = false;
                }
                if f.refused {
                    tracing::error!(kind = ?kind, "{}", f.reason);
                } else {
                    tracing::warn!(kind = ?kind, "{}", f.reason);
                }
                self.in_sync = false;
                return self
                    .send(vec![Update::Disconnected { reason: f.reason }])
                    .await;
            }
        };
        self.send(out).await?;
        if effect.invalid_cleared && self.in_sync {
            // The set of rejected objects shrank: an `InSync` (after the
            // ones still rejected) is how consumers learn it.
            self.send_in_sync().await?;
        }
        Ok(())
    }
}
