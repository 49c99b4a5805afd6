//! `--datastore`: where the cluster state comes from, for `run` (watched),
//! and `sync --once` and `explain` (read once).
//!
//! - `file:PATH`: manifests (files or a directory);
//! - `etcd://HOST:2379[,…]` (also `etcds://`, `http(s)://`): Calico's etcd
//!   layout, written by `nftpolicy controller`;
//! - `kubernetes`: the Kubernetes API server, as Calico's KDD mode — the
//!   kubeconfig named by `KUBECONFIG` when it is set, else the in-cluster
//!   service account; `kubernetes:PATH`: that kubeconfig.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use model::state::ClusterState;
use watcher::etcd::EtcdConfig;
use watcher::kubernetes::{ClusterAccess, KubeOptions};
use watcher::Source;

use crate::dataplane::EtcdTlsArgs;

/// A parsed `--datastore`.
#[derive(Debug, Clone, PartialEq)]
pub enum Datastore {
    Files(PathBuf),
    Etcd(EtcdConfig),
    Kubernetes(ClusterAccess),
}

/// How long reading a datastore once may take, retries included: the etcd
/// and Kubernetes sources retry an unreachable server forever, a command
/// must not.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(15);

impl Datastore {
    pub fn parse(url: &str, tls: &EtcdTlsArgs) -> anyhow::Result<Datastore> {
        if let Some(access) = ClusterAccess::from_datastore(url) {
            return Ok(Datastore::Kubernetes(access?));
        }
        match url.split_once(':') {
            Some(("file", path)) => Ok(Datastore::Files(PathBuf::from(path))),
            Some(("etcd" | "etcds" | "http" | "https", _)) => Ok(Datastore::Etcd(
                EtcdConfig::from_url(url)
                    .with_context(|| format!("--datastore {url:?}"))?
                    .with_tls(
                        tls.etcd_ca.clone(),
                        tls.etcd_cert.clone(),
                        tls.etcd_key.clone(),
                    ),
            )),
            _ => bail!(
                "datastore {url:?}: expected file:PATH, etcd://HOST:2379[,…], kubernetes or kubernetes:KUBECONFIG"
            ),
        }
    }

    /// The watched source (`nftpolicy run`).
    pub fn source(self, file_poll: Duration) -> Source {
        match self {
            Datastore::Files(path) => Source::Files {
                paths: vec![path],
                poll: file_poll,
            },
            Datastore::Etcd(cfg) => Source::Etcd(cfg),
            Datastore::Kubernetes(access) => Source::Kubernetes(access, KubeOptions::default()),
        }
    }

    /// Reads the datastore once: the cluster state and how many objects
    /// were skipped because they could not be read (each named on stderr).
    /// Errors name the datastore as `url` (what the user wrote).
    pub fn load(self, url: &str) -> anyhow::Result<(ClusterState, usize)> {
        match self {
            Datastore::Files(path) => crate::dataplane::load_files(&[path]),
            Datastore::Etcd(cfg) => snapshot(Source::Etcd(cfg), url),
            Datastore::Kubernetes(access) => {
                // A refused request will not be granted within the timeout:
                // say so now.
                let options = KubeOptions {
                    give_up_when_refused: true,
                    ..KubeOptions::default()
                };
                snapshot(Source::Kubernetes(access, options), url)
            }
        }
    }
}

/// The state a watched source delivers up to its first complete snapshot
/// (`InSync`), and how many objects could not be decoded (named on stderr
/// and left out, as `file:` does).
fn snapshot(source: Source, shown: &str) -> anyhow::Result<(ClusterState, usize)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (mut rx, task) = source.spawn(256);
        let mut cache = watcher::Cache::new();
        let deadline = tokio::time::Instant::now() + SNAPSHOT_TIMEOUT;
        loop {
            let update = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(update)) => update,
                Ok(None) => {
                    let why = match task.await {
                        Ok(Err(e)) => e.to_string(),
                        _ => "the datastore source ended".to_owned(),
                    };
                    bail!("datastore {shown}: {why}");
                }
                Err(_) => bail!(
                    "datastore {shown}: no complete read within {SNAPSHOT_TIMEOUT:?}{}",
                    cache
                        .disconnected
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ),
            };
            let in_sync = matches!(update, watcher::Update::InSync { .. });
            // An empty etcd is not read as an empty cluster; say so now
            // rather than at the timeout.
            if matches!(&update, watcher::Update::Disconnected { reason } if reason == watcher::etcd::EMPTY_REASON)
            {
                bail!("datastore {shown}: {}", watcher::etcd::EMPTY_REASON);
            }
            cache.apply(update);
            if in_sync {
                for (key, why) in &cache.invalid {
                    eprintln!("error: skipped {key}: {why}");
                }
                task.abort();
                return Ok((cache.state, cache.invalid.len()));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_urls() {
        let tls = EtcdTlsArgs::default();
        assert_eq!(
            Datastore::parse("file:/x", &tls).unwrap(),
            Datastore::Files("/x".into())
        );
        assert!(matches!(
            Datastore::parse("etcd://a:2379", &tls).unwrap(),
            Datastore::Etcd(_)
        ));
        assert_eq!(
            Datastore::parse("kubernetes:/k/config", &tls).unwrap(),
            Datastore::Kubernetes(ClusterAccess::Kubeconfig("/k/config".into()))
        );
        for bad in ["kubernetes:", "k8s", "/x", "kubernetesfoo"] {
            let e = Datastore::parse(bad, &tls).unwrap_err().to_string();
            assert!(e.contains("kubernetes"), "{bad}: {e}");
        }
    }
}
