//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's
//! `leaderelection` does it, so that of several controller replicas exactly
//! one writes to etcd:
//!
//! - the Lease names its holder and when it last renewed; a candidate takes
//!   it when it is free, or when it has seen the same record unchanged for a
//!   whole lease duration (time measured on the candidate's own clock, so
//!   clocks need not agree);
//! - every write is an update at the resource version read (optimistic
//!   concurrency): two candidates cannot both win;
//! - the leader renews every `retry_period`; if it cannot for
//!   `renew_deadline` (shorter than the lease duration, so it stops before
//!   anyone else may start) it has lost, and must stop writing.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate's name (the pod's name, unique per replica).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: &str, name: &str, identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Held leadership: renewed in the background until dropped (which
/// releases the Lease) or lost.
pub struct Leadership {
    lost: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
    api: Api<Lease>,
    config: LeaseConfig,
}

impl Leadership {
    /// Resolves when leadership is lost (the Lease could not be renewed
    /// within the renew deadline, or another holder took it).
    pub async fn lost(&mut self) {
        while !*self.lost.borrow() {
            if self.lost.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives the Lease up so that another candidate takes over at once.
    pub async fn release(self) {
        self.renewer.abort();
        if *self.lost.borrow() {
            return;
        }
        if let Ok(mut lease) = self.api.get(&self.config.name).await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(&self.config.identity) {
                spec.holder_identity = None;
                let _ = self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }
}

impl Drop for Leadership {
    /// Stops renewing (a controller that is dropped, e.g. aborted, must not
    /// keep the Lease alive).
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// What a candidate remembers of the Lease it saw: the record, and when
/// (on its own clock) it last changed.
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

/// One attempt to take or renew the Lease. `Ok(true)`: we hold it.
async fn try_acquire(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let duration_secs = config.lease_duration.as_secs().max(1) as i32;
    let current = match api.get_opt(&config.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Someone else created it first.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        }
        Some(l) => l,
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let ours = holder.as_deref() == Some(config.identity.as_str());
    let changed = observed
        .as_ref()
        .is_none_or(|o| o.holder != holder || o.renew_time != spec.renew_time);
    if changed {
        *observed = Some(Observed {
            holder: holder.clone(),
            renew_time: spec.renew_time.clone(),
            at: Instant::now(),
        });
    }
    let expired = observed
        .as_ref()
        .is_some_and(|o| o.at.elapsed() >= config.lease_duration);
    if holder.is_some() && !ours && !expired {
        return Ok(false);
    }
    let mut next = current.clone();
    let s = next.spec.get_or_insert_with(Default::default);
    if !ours {
        s.acquire_time = Some(now());
        s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
    }
    s.holder_identity = Some(config.identity.clone());
    s.lease_duration_seconds = Some(duration_secs);
    s.renew_time = Some(now());
    match api
        .replace(&config.name, &PostParams::default(), &next)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until this candidate holds the Lease, then keeps renewing it.
pub async fn acquire(client: kube::Client, config: LeaseConfig) -> Leadership {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed = None;
    let mut waiting_logged = false;
    loop {
        match try_acquire(&api, &config, &mut observed).await {
            Ok(true) => break,
            Ok(false) => {
                if !waiting_logged {
                    tracing::info!(
                        lease = %format!("{}/{}", config.namespace, config.name),
                        holder = ?observed.as_ref().and_then(|o| o.holder.clone()),
                        "another controller is the leader; standing by"
                    );
                    waiting_logged = true;
                }
            }
            Err(e) => tracing::warn!(
                lease = %format!("{}/{}", config.namespace, config.name),
                "leader election: {e}"
            ),
        }
        tokio::time::sleep(config.retry_period).await;
    }
    tracing::info!(
        lease = %format!("{}/{}", config.namespace, config.name),
        identity = %config.identity,
        "became the leader"
    );
    let (lost_tx, lost) = watch::channel(false);
    let renewer = {
        let api = api.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let mut last_renewed = Instant::now();
            let mut observed = None;
            loop {
                tokio::time::sleep(config.retry_period).await;
                match try_acquire(&api, &config, &mut observed).await {
                    Ok(true) => last_renewed = Instant::now(),
                    Ok(false) => {
                        tracing::error!("leader election: another controller took the lease");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(e) => tracing::warn!("leader election: renewing the lease: {e}"),
                }
                if last_renewed.elapsed() >= config.renew_deadline {
                    tracing::error!(
                        "leader election: the lease was not renewed for {:?}; stepping down",
                        config.renew_deadline
                    );
                    let _ = lost_tx.send(true);
                    return;
                }
            }
        })
    };
    Leadership {
        lost,
        renewer,
        api,
        config,
    }
}
