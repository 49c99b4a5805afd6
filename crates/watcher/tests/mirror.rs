//! The policy controller watching the API server (the fake one, a test
//! double) and writing a real etcd: full reconcile after each list,
//! per-event writes between, one leader among replicas.

mod common;

use std::time::Duration;

use model::calico::ETCD_PREFIX;
use serde_json::json;
use testkit::apiserver::FakeApiServer;
use tokio::sync::mpsc;
use watcher::etcd::EtcdConfig;
use watcher::kubernetes::lease::LeaseConfig;
use watcher::kubernetes::mirror::{self, MirrorError, MirrorStats};
use watcher::kubernetes::ClusterAccess;

fn pod(name: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "a", "labels": {"app": name}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip},
    })
}

/// etcd's keys under Calico's prefix, without it.
async fn keys(c: &mut etcd_client::Client) -> Vec<String> {
    let keys = common::calico_keys(c).await;
    keys.iter()
        .map(|k| k.trim_start_matches(ETCD_PREFIX).to_owned())
        .collect()
}

async fn eventually(c: &mut etcd_client::Client, what: &str, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = keys(c).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: etcd holds {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_the_api_server_into_etcd() {
    let etcd = common::Etcd::start().await;
    let mut c = etcd.client().await;
    // Left over from before: a stale endpoint the controller owns, and a
    // resource it does not own.
    c.put(
        format!("{ETCD_PREFIX}workloadendpoints/a/n1-k8s-stale-eth0"),
        r#"{"apiVersion":"projectcalico.org/v3","kind":"WorkloadEndpoint","metadata":{"name":"n1-k8s-stale-eth0","namespace":"a"},"spec":{"orchestrator":"k8s","node":"n1","pod":"stale","endpoint":"eth0","interfaceName":"cali0","ipNetworks":["198.18.0.99/32"]}}"#,
        None,
    )
    .await
    .unwrap();
    c.put(
        format!("{ETCD_PREFIX}globalnetworkpolicies/mine"),
        r#"{"apiVersion":"projectcalico.org/v3","kind":"GlobalNetworkPolicy","metadata":{"name":"mine"},"spec":{"selector":"all()"}}"#,
        None,
    )
    .await
    .unwrap();

    let mut api = FakeApiServer::start().unwrap();
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}))
        .unwrap();
    api.apply(&pod("web", "198.18.0.10")).unwrap();
    let (_dir, kubeconfig) = api
        .temp_kubeconfig(Some(
            "system:serviceaccount:kube-system:nftpolicy-controller",
        ))
        .unwrap();
    let etcd_cfg = EtcdConfig::from_url(&etcd.endpoint()).unwrap();
    let (stats_tx, mut stats) = mpsc::unbounded_channel::<MirrorStats>();
    let access = ClusterAccess::Kubeconfig(kubeconfig.clone());
    let cfg = etcd_cfg.clone();
    let controller =
        tokio::spawn(async move { mirror::run(access, &cfg, None, Some(stats_tx)).await });

    // The first complete list: created, the stale endpoint deleted, the
    // resource it does not own left alone.
    eventually(
        &mut c,
        "first reconcile",
        &[
            "globalnetworkpolicies/mine",
            "profiles/kns.a",
            "workloadendpoints/a/n1-k8s-web-eth0",
        ],
    )
    .await;

    // Events: one write each.
    api.apply(&pod("db", "198.18.0.11")).unwrap();
    api.apply(
        &json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "a"}, "spec": {"podSelector": {}}}),
    )
    .unwrap();
    api.delete(&pod("web", "")).unwrap();
    eventually(
        &mut c,
        "events",
        &[
            "globalnetworkpolicies/mine",
            "networkpolicies/a/knp.default.deny",
            "profiles/kns.a",
            "workloadendpoints/a/n1-k8s-db-eth0",
        ],
    )
    .await;
    let mut last = MirrorStats::default();
    while let Ok(s) = stats.try_recv() {
        last = s;
    }
    assert_eq!(last.full_reconciles, 1, "{last:?}");
    assert_eq!(last.event_writes, 3, "{last:?}");

    // The API server goes away; a deletion while it is down, and a
    // compaction: after the relist a full reconcile deletes it.
    api.stop();
    api.delete(&pod("db", "")).unwrap();
    api.compact();
    api.resume().unwrap();
    eventually(
        &mut c,
        "reconcile after the relist",
        &[
            "globalnetworkpolicies/mine",
            "networkpolicies/a/knp.default.deny",
            "profiles/kns.a",
        ],
    )
    .await;
    while let Ok(s) = stats.try_recv() {
        last = s;
    }
    assert!(last.full_reconciles >= 2, "{last:?}");
    controller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_writes() {
    let etcd = common::Etcd::start().await;
    let mut c = etcd.client().await;
    let api = FakeApiServer::start().unwrap();
    api.apply(
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}),
    )
    .unwrap();
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, None).unwrap();
    let etcd_cfg = EtcdConfig::from_url(&etcd.endpoint()).unwrap();
    let lease = |id: &str| LeaseConfig {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry_period: Duration::from_millis(200),
        ..LeaseConfig::new("kube-system", "nftpolicy-controller", id)
    };
    let start = |id: &'static str, stats: mpsc::UnboundedSender<MirrorStats>| {
        let access = ClusterAccess::Kubeconfig(kubeconfig.clone());
        let cfg = etcd_cfg.clone();
        let lease = lease(id);
        tokio::spawn(async move { mirror::run(access, &cfg, Some(lease), Some(stats)).await })
    };
    let (first_tx, mut first) = mpsc::unbounded_channel();
    let leader = start("first", first_tx);
    eventually(
        &mut c,
        "the leader's reconcile",
        &["profiles/kns.a", "profiles/kns.kube-system"],
    )
    .await;
    let (second_tx, mut second) = mpsc::unbounded_channel();
    let standby = start("second", second_tx);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        second.try_recv().is_err(),
        "the standby does nothing while the leader holds the lease"
    );
    assert!(first.try_recv().is_ok());

    // The leader dies without releasing: the standby takes over after the
    // lease expires, and writes.
    leader.abort();
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "b"}}))
        .unwrap();
    eventually(
        &mut c,
        "the new leader's writes",
        &[
            "profiles/kns.a",
            "profiles/kns.b",
            "profiles/kns.kube-system",
        ],
    )
    .await;
    assert!(second.try_recv().is_ok());

    // Someone else takes the lease: the standby-turned-leader steps down.
    let holder = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "nftpolicy-controller", "namespace": "kube-system"},
        "spec": {"holderIdentity": "intruder", "leaseDurationSeconds": 60}});
    api.apply(&holder).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), standby)
        .await
        .expect("steps down")
        .unwrap();
    assert!(
        matches!(ended, Err(MirrorError::LostLeadership)),
        "{ended:?}"
    );
}
