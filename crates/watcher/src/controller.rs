//! The policy controller: Kubernetes Namespaces, Pods, NetworkPolicies,
//! ServiceAccounts and Nodes written into etcd as the Calico resources that stand for them (what
//! calico-kube-controllers does), for `nftpolicy apply|delete|controller`.
//!
//! Every write is a compare-and-swap: the key is read, and the put or delete
//! is an etcd transaction guarded by `mod_revision == <the one read>`; when
//! another writer got there first the whole step is redone from a fresh
//! read. So racing writers never overwrite a value they did not see, and
//! what each reports (created, updated, unchanged, deleted) is true of the
//! value it replaced. An unchanged value is not written (no revision bump).
//!
//! The controller owns, and [`sync_dir`] only ever deletes, the keys it
//! derives from Kubernetes: NetworkPolicies named `knp.default.*`, Profiles
//! named `kns.*` and `ksa.*` and WorkloadEndpoints with
//! `spec.orchestrator: k8s`, and Nodes (from Kubernetes Nodes, as
//! calico-kube-controllers' node controller keeps them).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp};
use model::calico::{Kind, Resource, ResourceKey, ETCD_PREFIX};
use model::convert::{
    k8s_policy_name, kube_to_calico, namespace_profile_name, workload_endpoint_name,
    K8S_POLICY_PREFIX, NAMESPACE_PROFILE_PREFIX, ORCHESTRATOR_K8S,
};
use model::kube::{KubeObject, Manifest};

use crate::etcd::{prefix_end, EtcdConfig, EtcdError, EtcdOptions};

/// Bound on each etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Compare-and-swap attempts per key before giving up.
const MAX_ATTEMPTS: usize = 20;
/// Keys per page when listing.
const PAGE_SIZE: i64 = 500;
/// [`run_controller`] re-syncs this often even without file changes, to
/// repair changes made to etcd behind its back.
const RESYNC_PERIOD: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("connecting to etcd: {0}")]
    Connect(#[from] EtcdError),
    #[error("reading {key} from etcd: {reason}")]
    Get { key: String, reason: String },
    #[error("writing {key} to etcd: {reason}")]
    Put { key: String, reason: String },
    #[error("deleting {key} from etcd: {reason}")]
    Delete { key: String, reason: String },
    #[error("{key}: {reason}")]
    Txn { key: String, reason: String },
    #[error("{object}: {reason}")]
    Convert { object: String, reason: String },
    #[error("{dir}: {} bad file(s) or object(s), nothing synced: {}", problems.len(), problems.join("; "))]
    Files { dir: String, problems: Vec<String> },
}

/// What happened (or, in a dry run, would happen) to one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Created,
    Updated,
    Unchanged,
    Deleted,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Created => "created",
            Action::Updated => "updated",
            Action::Unchanged => "unchanged",
            Action::Deleted => "deleted",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: ResourceKey,
    pub action: Action,
    /// The value written (created, updated), found equal (unchanged), or
    /// removed (deleted; `None` if it did not decode or was already gone).
    pub value: Option<Resource>,
    /// The etcd revision of the write; the key's mod revision when
    /// unchanged; `None` in a dry run or when there was nothing to delete.
    pub revision: Option<i64>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.action == Action::Unchanged && self.value.is_none() {
            return write!(f, "{} not found", self.key);
        }
        write!(f, "{} {}", self.key, self.action)
    }
}

async fn timeout<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// A key's value and mod revision.
type Current = Option<(Vec<u8>, i64)>;

async fn get_one(kv: &mut KvClient, key: &str) -> Result<Current, Error> {
    let resp = timeout(kv.get(key, None))
        .await
        .map_err(|reason| Error::Get {
            key: key.to_owned(),
            reason,
        })?;
    Ok(resp
        .kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
}

/// Every key under `prefix` with its value and mod revision, read in pages
/// at one revision.
async fn list_prefix(
    kv: &mut KvClient,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>, i64)>, Error> {
    let err = |reason: String| Error::Get {
        key: format!("{prefix}*"),
        reason,
    };
    let end = prefix_end(prefix.as_bytes());
    let mut start = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut out = Vec::new();
    loop {
        let opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE_SIZE)
            .with_revision(revision);
        let resp = timeout(kv.get(start.clone(), Some(opts)))
            .await
            .map_err(err)?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            match std::str::from_utf8(kv.key()) {
                Ok(k) => out.push((k.to_owned(), kv.value().to_vec(), kv.mod_revision())),
                Err(_) => continue,
            }
        }
        match (resp.more(), resp.kvs().last()) {
            (true, Some(last)) => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok(out),
        }
    }
}

/// Whether the stored bytes already hold `r`.
fn holds(stored: &[u8], r: &Resource, json: &str) -> bool {
    stored == json.as_bytes()
        || Resource::from_json("", stored).is_ok_and(|mut s| {
            if s.kind().is_namespaced() && s.metadata().namespace.is_none() {
                s.metadata_mut().namespace = r.metadata().namespace.clone();
            }
            &s == r
        })
}

/// Writes `r` at its key unless it is already there. `known` is a first
/// read the caller already has (from a listing), saving a GET.
pub(crate) async fn put_resource(
    kv: &mut KvClient,
    r: &Resource,
    dry_run: bool,
    mut known: Option<Current>,
) -> Result<Change, Error> {
    let key = r.key();
    let ek = key.etcd_key();
    let json = r.to_json();
    for attempt in 0..MAX_ATTEMPTS {
        let current = match known.take() {
            Some(c) => c,
            None => get_one(kv, &ek).await?,
        };
        let change = |action, revision| Change {
            key: key.clone(),
            action,
            value: Some(r.clone()),
            revision,
        };
        if let Some((stored, rev)) = &current {
            if holds(stored, r, &json) {
                return Ok(change(Action::Unchanged, Some(*rev)));
            }
        }
        let action = if current.is_some() {
            Action::Updated
        } else {
            Action::Created
        };
        if dry_run {
            return Ok(change(action, None));
        }
        let seen = current.map_or(0, |(_, rev)| rev);
        let put = TxnOp::put(ek.as_str(), json.as_str(), None);
        let put_failed = |key, reason| Error::Put { key, reason };
        if let Some(revision) = if_unchanged(kv, &ek, seen, put, put_failed).await? {
            tracing::info!(key = %key, %action, ?revision, "wrote");
            return Ok(change(action, revision));
        }
        tracing::debug!(key = %ek, attempt, "changed under us; retrying from a fresh read");
    }
    Err(gave_up(ek))
}

/// Runs `op` on `ek` in a transaction guarded by its mod revision still
/// being `seen` (0: absent). `Some(revision)` when it ran, `None` when the
/// key changed under us; `failed` names a request that failed.
async fn if_unchanged(
    kv: &mut KvClient,
    ek: &str,
    seen: i64,
    op: TxnOp,
    failed: impl FnOnce(String, String) -> Error,
) -> Result<Option<Option<i64>>, Error> {
    let txn = Txn::new()
        .when([Compare::mod_revision(ek, CompareOp::Equal, seen)])
        .and_then([op]);
    let resp = timeout(kv.txn(txn))
        .await
        .map_err(|reason| failed(ek.to_owned(), reason))?;
    Ok(resp
        .succeeded()
        .then(|| resp.header().map(|h| h.revision())))
}

fn gave_up(ek: String) -> Error {
    Error::Txn {
        key: ek,
        reason: format!("kept changing under us; gave up after {MAX_ATTEMPTS} attempts"),
    }
}

/// Deletes `key` if it exists and `owned` accepts its value (re-checked on
/// every fresh read). Nothing to delete → `Unchanged` with no value.
pub(crate) async fn delete_key(
    kv: &mut KvClient,
    key: &ResourceKey,
    dry_run: bool,
    owned: &(dyn Fn(&[u8]) -> bool + Sync),
    mut known: Option<Current>,
) -> Result<Change, Error> {
    let ek = key.etcd_key();
    for attempt in 0..MAX_ATTEMPTS {
        let current = match known.take() {
            Some(c) => c,
            None => get_one(kv, &ek).await?,
        };
        let Some((stored, rev)) = current.filter(|(v, _)| owned(v)) else {
            return Ok(Change {
                key: key.clone(),
                action: Action::Unchanged,
                value: None,
                revision: None,
            });
        };
        let value = crate::etcd::decode(key, &ek, &stored).ok();
        if dry_run {
            return Ok(Change {
                key: key.clone(),
                action: Action::Deleted,
                value,
                revision: None,
            });
        }
        let delete = TxnOp::delete(ek.as_str(), None);
        let delete_failed = |key, reason| Error::Delete { key, reason };
        if let Some(revision) = if_unchanged(kv, &ek, rev, delete, delete_failed).await? {
            tracing::info!(key = %key, ?revision, "deleted");
            return Ok(Change {
                key: key.clone(),
                action: Action::Deleted,
                value,
                revision,
            });
        }
        tracing::debug!(key = %ek, attempt, "changed under us; retrying from a fresh read");
    }
    Err(gave_up(ek))
}

fn is_k8s_endpoint(value: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(value).is_ok_and(|v| {
        v.pointer("/spec/orchestrator").and_then(|o| o.as_str()) == Some(ORCHESTRATOR_K8S)
    })
}

fn any_value(_: &[u8]) -> bool {
    true
}

/// The Kubernetes workload endpoints of pod `namespace/pod`, found by their
/// `spec.pod` (for a pod whose node is not known).
/// Deletes the endpoints [`pod_endpoints`] found, each only while it still
/// holds the value read.
async fn delete_endpoints(
    kv: &mut KvClient,
    found: Vec<(ResourceKey, Vec<u8>, i64)>,
    dry_run: bool,
    changes: &mut Vec<Change>,
) -> Result<(), Error> {
    for (key, v, rev) in found {
        let known = Some(Some((v, rev)));
        changes.push(delete_key(kv, &key, dry_run, &is_k8s_endpoint, known).await?);
    }
    Ok(())
}

async fn pod_endpoints(
    kv: &mut KvClient,
    namespace: &str,
    pod: &str,
) -> Result<Vec<(ResourceKey, Vec<u8>, i64)>, Error> {
    let prefix = format!(
        "{ETCD_PREFIX}{}/{namespace}/",
        Kind::WorkloadEndpoint.plural()
    );
    let mut out = Vec::new();
    for (k, v, rev) in list_prefix(kv, &prefix).await? {
        let Some(key) = ResourceKey::from_etcd_key(&k) else {
            continue;
        };
        let matches = serde_json::from_slice::<serde_json::Value>(&v).is_ok_and(|j| {
            j.pointer("/spec/pod").and_then(|p| p.as_str()) == Some(pod)
                && j.pointer("/spec/orchestrator").and_then(|o| o.as_str())
                    == Some(ORCHESTRATOR_K8S)
        });
        if matches {
            out.push((key, v, rev));
        }
    }
    Ok(out)
}

fn convert(obj: &KubeObject) -> Result<Option<Resource>, Error> {
    kube_to_calico(obj).map_err(|e| Error::Convert {
        object: e.object,
        reason: e.reason,
    })
}

/// What `apply` does for one manifest.
enum Target {
    Put(Box<Resource>),
    /// A pod without an endpoint (not scheduled, no address yet, finished):
    /// any endpoint it had goes.
    NoEndpoint {
        namespace: String,
        pod: String,
    },
}

/// Writes the Calico resources for `manifests` (Kubernetes objects
/// converted with `kube_to_calico`, Calico manifests as they are).
/// Everything is converted before anything is written: one bad object fails
/// the whole call with [`Error::Convert`] and nothing is written. A pod that
/// has no endpoint (not scheduled, no address, finished) has its existing
/// endpoints deleted. With `dry_run`, reports what would be written.
pub async fn apply(
    client: &Client,
    manifests: &[Manifest],
    dry_run: bool,
) -> Result<Vec<Change>, Error> {
    let mut targets = Vec::new();
    for m in manifests {
        targets.push(match m {
            Manifest::Calico(r) => Target::Put(Box::new(r.clone())),
            Manifest::Kube(obj) => match convert(obj)? {
                Some(r) => Target::Put(Box::new(r)),
                None => Target::NoEndpoint {
                    namespace: obj.namespace().unwrap_or("default").to_owned(),
                    pod: obj.name().to_owned(),
                },
            },
        });
    }
    let mut kv = client.kv_client();
    let mut changes = Vec::new();
    for t in targets {
        match t {
            Target::Put(r) => changes.push(put_resource(&mut kv, &r, dry_run, None).await?),
            Target::NoEndpoint { namespace, pod } => {
                let found = pod_endpoints(&mut kv, &namespace, &pod).await?;
                delete_endpoints(&mut kv, found, dry_run, &mut changes).await?;
            }
        }
    }
    Ok(changes)
}

/// Deletes the Calico resources standing for `manifests`. A pod's endpoint
/// is found from `spec.nodeName`, or, without it, by listing the
/// namespace's endpoints for the pod's name. A key already absent is
/// reported `Unchanged` with no value (shown as "… not found"; for a pod
/// without node and without endpoint, the key names the node `?`). With
/// `dry_run`, reports what would be deleted.
pub async fn delete(
    client: &Client,
    manifests: &[Manifest],
    dry_run: bool,
) -> Result<Vec<Change>, Error> {
    let mut kv = client.kv_client();
    let mut changes = Vec::new();
    for m in manifests {
        let key = match m {
            Manifest::Calico(r) => r.key(),
            Manifest::Kube(KubeObject::Namespace(_)) => {
                ResourceKey::new(Kind::Profile, None, &namespace_profile_name(m_name(m)))
            }
            Manifest::Kube(KubeObject::Admin(p)) => ResourceKey::new(
                Kind::GlobalNetworkPolicy,
                None,
                &p.calico_name().ok_or_else(|| Error::Convert {
                    object: m_name(m).to_owned(),
                    reason: p.tier().err().unwrap_or_default(),
                })?,
            ),
            Manifest::Kube(obj @ KubeObject::NetworkPolicy(_)) => ResourceKey::new(
                Kind::NetworkPolicy,
                obj.namespace(),
                &k8s_policy_name(obj.name()),
            ),
            Manifest::Kube(obj @ KubeObject::Node(_)) => {
                ResourceKey::new(Kind::Node, None, obj.name())
            }
            Manifest::Kube(obj @ KubeObject::ServiceAccount(_)) => ResourceKey::new(
                Kind::Profile,
                None,
                &model::serviceaccount::profile_name(
                    obj.namespace().unwrap_or("default"),
                    obj.name(),
                ),
            ),
            Manifest::Kube(obj @ KubeObject::Pod(pod)) => {
                let namespace = obj.namespace().unwrap_or("default");
                let node = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .filter(|n| !n.is_empty());
                match node {
                    Some(node) => ResourceKey::new(
                        Kind::WorkloadEndpoint,
                        Some(namespace),
                        &workload_endpoint_name(node, obj.name(), "eth0"),
                    ),
                    None => {
                        let found = pod_endpoints(&mut kv, namespace, obj.name()).await?;
                        if found.is_empty() {
                            changes.push(Change {
                                key: ResourceKey::new(
                                    Kind::WorkloadEndpoint,
                                    Some(namespace),
                                    &workload_endpoint_name("?", obj.name(), "eth0"),
                                ),
                                action: Action::Unchanged,
                                value: None,
                                revision: None,
                            });
                        }
                        delete_endpoints(&mut kv, found, dry_run, &mut changes).await?;
                        continue;
                    }
                }
            }
        };
        changes.push(delete_key(&mut kv, &key, dry_run, &any_value, None).await?);
    }
    Ok(changes)
}

fn m_name(m: &Manifest) -> &str {
    match m {
        Manifest::Kube(o) => o.name(),
        Manifest::Calico(r) => &r.metadata().name,
    }
}

/// Whether the controller owns `key` (holding `value`): the only keys
/// [`sync_dir`] deletes. Besides Kubernetes NetworkPolicies, namespaces and
/// pods, the GlobalNetworkPolicies converted from admin policies
/// (`kanp.…`, `kbanp.…`, `kcnp.…`), and every Node (as
/// calico-kube-controllers' node controller keeps Calico's Nodes in step
/// with Kubernetes': a node gone from Kubernetes goes from etcd).
pub fn owns(key: &ResourceKey, value: &[u8]) -> bool {
    match key.kind {
        Kind::NetworkPolicy => key.name.starts_with(K8S_POLICY_PREFIX),
        Kind::GlobalNetworkPolicy => model::admin::is_converted_policy_name(&key.name),
        Kind::Profile => {
            key.name.starts_with(NAMESPACE_PROFILE_PREFIX)
                || key.name.starts_with(model::serviceaccount::PROFILE_PREFIX)
        }
        Kind::WorkloadEndpoint => is_k8s_endpoint(value),
        Kind::Node => true,
        _ => false,
    }
}

/// The Calico resources the Kubernetes objects under `dir` stand for.
/// Calico manifests in the directory are not the controller's and are
/// ignored (use [`apply`] for them). Any bad file or object fails the whole
/// read: a half-read directory must not delete what the unread part holds.
pub fn desired_from_dir(dir: &Path) -> Result<BTreeMap<ResourceKey, Resource>, Error> {
    let shown = dir.display().to_string();
    let files_err = |problems: Vec<String>| Error::Files {
        dir: shown.clone(),
        problems,
    };
    let (manifests, problems) = crate::files::read_manifests(&[dir.to_path_buf()])
        .map_err(|e| files_err(vec![e.to_string()]))?;
    if !problems.is_empty() {
        return Err(files_err(
            problems.iter().map(|p| p.error.to_string()).collect(),
        ));
    }
    let mut desired = BTreeMap::new();
    let mut problems = Vec::new();
    for (file, m) in manifests {
        match m {
            Manifest::Calico(r) => {
                tracing::debug!(file = %file.display(), object = %r.key(), "not a Kubernetes object; ignored by the controller");
            }
            Manifest::Kube(obj) => match kube_to_calico(&obj) {
                Ok(Some(r)) => {
                    desired.insert(r.key(), r);
                }
                Ok(None) => {}
                Err(e) => problems.push(format!("{}: {e}", file.display())),
            },
        }
    }
    if !problems.is_empty() {
        return Err(files_err(problems));
    }
    Ok(desired)
}

/// Makes etcd's Kubernetes-derived resources equal to `desired`: creates and
/// updates what differs, deletes owned keys (see [`owns`]) not in `desired`,
/// never touches any other key. Returns a change per desired key (maybe
/// `Unchanged`) and per deletion.
pub async fn sync_resources(
    client: &Client,
    desired: &BTreeMap<ResourceKey, Resource>,
    dry_run: bool,
) -> Result<Vec<Change>, Error> {
    let mut kv = client.kv_client();
    let mut current: BTreeMap<ResourceKey, (Vec<u8>, i64)> = BTreeMap::new();
    for kind in [Kind::NetworkPolicy, Kind::Profile, Kind::WorkloadEndpoint] {
        let prefix = format!("{ETCD_PREFIX}{}/", kind.plural());
        for (k, v, rev) in list_prefix(&mut kv, &prefix).await? {
            if let Some(key) = ResourceKey::from_etcd_key(&k) {
                current.insert(key, (v, rev));
            }
        }
    }
    let mut changes = Vec::new();
    for (key, r) in desired {
        let known = Some(current.get(key).cloned());
        changes.push(put_resource(&mut kv, r, dry_run, known).await?);
    }
    let owned_value = |key: &ResourceKey| {
        let key = key.clone();
        move |v: &[u8]| owns(&key, v)
    };
    for (key, (v, rev)) in &current {
        if desired.contains_key(key) || !owns(key, v) {
            continue;
        }
        let owned = owned_value(key);
        let known = Some(Some((v.clone(), *rev)));
        changes.push(delete_key(&mut kv, key, dry_run, &owned, known).await?);
    }
    Ok(changes)
}

/// `nftpolicy controller --from DIR --etcd URL`, once: makes etcd's
/// Kubernetes-derived resources equal to the directory's. See
/// [`desired_from_dir`] and [`sync_resources`].
pub async fn sync_dir(client: &Client, dir: &Path) -> Result<Vec<Change>, Error> {
    let d = dir.to_path_buf();
    let desired = tokio::task::spawn_blocking(move || desired_from_dir(&d))
        .await
        .map_err(|e| Error::Files {
            dir: dir.display().to_string(),
            problems: vec![e.to_string()],
        })??;
    sync_resources(client, &desired, false).await
}

/// What the directory's files look like (names, sizes, modification times).
fn dir_fingerprint(dir: &Path) -> Option<Vec<(PathBuf, u64, Option<std::time::SystemTime>)>> {
    let files = crate::files::manifest_files(&[dir.to_path_buf()]).ok()?;
    Some(
        files
            .into_iter()
            .map(|f| {
                let m = std::fs::metadata(&f).ok();
                let len = m.as_ref().map_or(u64::MAX, |m| m.len());
                (f, len, m.and_then(|m| m.modified().ok()))
            })
            .collect(),
    )
}

/// The controller loop: syncs `dir` into etcd, then polls the directory
/// every `interval` and re-syncs once a change has held still for one poll;
/// a failed sync is retried every `interval`, and a full re-sync runs every
/// five minutes regardless. Runs until cancelled; fails only on an etcd
/// configuration that cannot work.
pub async fn run_controller(dir: &Path, cfg: &EtcdConfig, interval: Duration) -> Result<(), Error> {
    let client = cfg.connect(&EtcdOptions::default()).await?;
    let mut synced_at: Option<(Option<Vec<_>>, Instant)> = None;
    let mut pending = None;
    loop {
        let d = dir.to_path_buf();
        let fp = tokio::task::spawn_blocking(move || dir_fingerprint(&d))
            .await
            .ok()
            .flatten();
        let due = match &synced_at {
            None => true,
            Some((at, when)) => {
                (at != &fp && pending.as_ref() == Some(&fp)) || when.elapsed() >= RESYNC_PERIOD
            }
        };
        if due {
            match sync_dir(&client, dir).await {
                Ok(changes) => {
                    let n = changes
                        .iter()
                        .filter(|c| c.action != Action::Unchanged)
                        .count();
                    tracing::info!(dir = %dir.display(), changes = n, "synced");
                    synced_at = Some((fp, Instant::now()));
                    pending = None;
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "sync failed; retrying");
                    pending = Some(fp);
                }
            }
        } else {
            pending = Some(fp);
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership() {
        let np = |n: &str| ResourceKey::new(Kind::NetworkPolicy, Some("a"), n);
        assert!(owns(&np("knp.default.x"), b""));
        assert!(!owns(&np("x"), b""));
        let p = |n: &str| ResourceKey::new(Kind::Profile, None, n);
        assert!(owns(&p("kns.a"), b""));
        assert!(!owns(&p("a"), b""));
        let w = ResourceKey::new(Kind::WorkloadEndpoint, Some("a"), "n-k8s-p-eth0");
        assert!(owns(&w, br#"{"spec":{"orchestrator":"k8s"}}"#));
        assert!(!owns(&w, br#"{"spec":{"orchestrator":"cni"}}"#));
        assert!(!owns(
            &ResourceKey::new(Kind::GlobalNetworkPolicy, None, "knp.default.x"),
            b""
        ));
    }
}
