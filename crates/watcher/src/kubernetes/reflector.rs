//! One kind's list + watch against the API server, as client-go's
//! reflector does it: a paginated LIST, then a WATCH from the list's
//! resource version with bookmarks; a watch that ends cleanly (its
//! timeout, the server closing it) is resumed from the last resource
//! version seen (an event's or a bookmark's); after a failure — a refused
//! connection, a broken stream, `410 Gone` (the version was compacted away)
//! — it LISTs again, so what changed meanwhile, deletions included, is
//! found by comparing lists; every failure but a 410 first waits
//! kube-runtime's `DefaultBackoff` (client-go's: 0.8 s doubling to 30 s,
//! jittered, reset after two quiet minutes).
//!
//! kube-runtime's `watcher` does the same but keeps bookmarks and watch
//! restarts to itself; the source needs both: bookmarks tell how far each
//! kind is known to be complete (so a revision the agent reports covers
//! every kind), and a watch re-established after an error is what makes
//! the source in sync again.

use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::watcher::DefaultBackoff;
use tokio::sync::mpsc;

use super::object::{RawObject, Watched};
use super::KubeOptions;

/// What a reflector tells the source, in order.
#[derive(Debug)]
pub enum Msg {
    /// A LIST starts: the objects until [`Msg::Listed`] are the whole kind.
    Listing,
    /// An object, from the LIST (`listed`) or a watch event (added or
    /// modified).
    Object {
        object: RawObject,
        listed: bool,
    },
    Deleted(RawObject),
    /// The LIST is complete, consistent at `resource_version`.
    Listed {
        resource_version: u64,
    },
    /// A watch is established (after the LIST, or resumed after an error).
    Watching,
    /// Everything up to this resource version has been delivered (a bookmark).
    Progress {
        resource_version: u64,
    },
    /// A request failed; the reflector backs off and retries.
    Failed(Failure),
    /// The API server does not serve the kind (404: an optional CRD not
    /// installed): there are no objects of it; the reflector lists again
    /// later.
    Absent,
}

/// How often a kind found absent is listed again.
const ABSENT_RETRY: Duration = Duration::from_secs(30);

/// A failed request, as the user needs to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    /// Refused (401/403): retrying will not help until someone changes the
    /// credentials or RBAC.
    pub refused: bool,
    /// 410 Gone: relisting at once, not an outage.
    pub expired: bool,
}

fn describe(kind: Watched, verb: &str, e: &kube::Error) -> Failure {
    match e {
        kube::Error::Api(status) if status.code == 403 => Failure {
            reason: format!(
                "the API server refused to {verb} {res} (403 Forbidden): {msg}; nftpolicy needs \
                 get, list and watch on {res} cluster-wide (deploy/rbac.yaml grants them)",
                res = kind.rbac_resource(),
                msg = status.message
            ),
            refused: true,
            expired: false,
        },
        kube::Error::Api(status) if status.code == 401 => Failure {
            reason: format!(
                "the API server did not accept our credentials to {verb} {} (401 Unauthorized): {}; \
                 check the service account token or the kubeconfig's user",
                kind.rbac_resource(),
                status.message
            ),
            refused: true,
            expired: false,
        },
        kube::Error::Api(status) if status.code == 410 => Failure {
            reason: format!(
                "{verb} {}: 410 Gone ({}); listing again",
                kind.rbac_resource(),
                status.message
            ),
            refused: false,
            expired: true,
        },
        other => Failure {
            reason: format!("{verb} {}: {other}", kind.rbac_resource()),
            refused: false,
            expired: false,
        },
    }
}

/// Runs one kind's reflector until `tx` closes.
pub async fn run(api: Api<RawObject>, kind: Watched, options: KubeOptions, tx: mpsc::Sender<Msg>) {
    let mut backoff = DefaultBackoff::default();
    let mut resource_version: Option<String> = None;
    loop {
        let failure = match &resource_version {
            None => match list(&api, kind, &options, &tx).await {
                Ok(Some(rv)) => {
                    resource_version = Some(rv);
                    continue;
                }
                Ok(None) => return,
                Err(ListError::Absent) => {
                    if tx.send(Msg::Absent).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(ABSENT_RETRY) => {}
                        _ = tx.closed() => return,
                    }
                    continue;
                }
                Err(ListError::Failed(f)) => f,
            },
            Some(rv) => match watch(&api, kind, &options, rv.clone(), &tx).await {
                WatchEnd::Closed => return,
                // A watch that ended (timeout, server closing it) resumes at once.
                WatchEnd::Ended(rv) => {
                    resource_version = Some(rv);
                    continue;
                }
                WatchEnd::Failed(f) => {
                    resource_version = None;
                    f
                }
            },
        };
        let expired = failure.expired;
        if tx.send(Msg::Failed(failure)).await.is_err() {
            return;
        }
        if !expired {
            let delay = backoff
                .next()
                .unwrap_or(Duration::from_secs(30))
                .max(options.backoff_min);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = tx.closed() => return,
            }
        }
    }
}

/// Why a LIST did not complete.
enum ListError {
    /// An optional kind the API server does not serve (404).
    Absent,
    Failed(Failure),
}

impl From<Failure> for ListError {
    fn from(f: Failure) -> Self {
        ListError::Failed(f)
    }
}

/// A paginated LIST; `Ok(None)` when `tx` closed.
async fn list(
    api: &Api<RawObject>,
    kind: Watched,
    options: &KubeOptions,
    tx: &mpsc::Sender<Msg>,
) -> Result<Option<String>, ListError> {
    if tx.send(Msg::Listing).await.is_err() {
        return Ok(None);
    }
    let mut params = ListParams::default().limit(options.page_size);
    let mut list_rv = None;
    loop {
        let page = match api.list(&params).await {
            Ok(page) => page,
            Err(kube::Error::Api(status)) if status.code == 404 && kind.optional() => {
                return Err(ListError::Absent)
            }
            Err(e) => return Err(describe(kind, "list", &e).into()),
        };
        if list_rv.is_none() {
            list_rv = page.metadata.resource_version.clone();
        }
        for object in page.items {
            if tx
                .send(Msg::Object {
                    object,
                    listed: true,
                })
                .await
                .is_err()
            {
                return Ok(None);
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => params = params.continue_token(&c),
            None => break,
        }
    }
    let Some(rv) = list_rv.filter(|rv| !rv.is_empty()) else {
        return Err(ListError::Failed(Failure {
            reason: format!(
                "list {}: the answer has no resourceVersion",
                kind.rbac_resource()
            ),
            refused: false,
            expired: false,
        }));
    };
    let resource_version = rv.parse().unwrap_or(0);
    if tx.send(Msg::Listed { resource_version }).await.is_err() {
        return Ok(None);
    }
    Ok(Some(rv))
}

enum WatchEnd {
    Closed,
    /// Ended without error; resume from this version.
    Ended(String),
    Failed(Failure),
}

async fn watch(
    api: &Api<RawObject>,
    kind: Watched,
    options: &KubeOptions,
    mut rv: String,
    tx: &mpsc::Sender<Msg>,
) -> WatchEnd {
    let params = WatchParams::default().timeout(options.watch_timeout_secs);
    let stream = match api.watch(&params, &rv).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Failed(describe(kind, "watch", &e)),
    };
    let mut stream = std::pin::pin!(stream);
    if tx.send(Msg::Watching).await.is_err() {
        return WatchEnd::Closed;
    }
    // No event and no bookmark for this long: the connection is dead.
    let idle = Duration::from_secs(u64::from(options.watch_timeout_secs) + 5);
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(idle, stream.next()) => n,
            _ = tx.closed() => return WatchEnd::Closed,
        };
        let msg = match next {
            Err(_) | Ok(None) => return WatchEnd::Ended(rv),
            Ok(Some(Err(e))) => return WatchEnd::Failed(describe(kind, "watch", &e)),
            Ok(Some(Ok(event))) => match event {
                WatchEvent::Added(object) | WatchEvent::Modified(object) => {
                    if let Some(v) = &object.meta_rv() {
                        rv = v.clone();
                    }
                    Msg::Object {
                        object,
                        listed: false,
                    }
                }
                WatchEvent::Deleted(object) => {
                    if let Some(v) = &object.meta_rv() {
                        rv = v.clone();
                    }
                    Msg::Deleted(object)
                }
                WatchEvent::Bookmark(b) => {
                    rv = b.metadata.resource_version;
                    Msg::Progress {
                        resource_version: rv.parse().unwrap_or(0),
                    }
                }
                WatchEvent::Error(status) => {
                    return WatchEnd::Failed(describe(kind, "watch", &kube::Error::Api(status)))
                }
            },
        };
        if tx.send(msg).await.is_err() {
            return WatchEnd::Closed;
        }
    }
}

impl RawObject {
    fn meta_rv(&self) -> Option<String> {
        kube::Resource::meta(self)
            .resource_version
            .clone()
            .filter(|v| !v.is_empty())
    }
}
