//! The Kubernetes source against the fake API server (a test double, see
//! testkit::apiserver): what the agent and the controller get from it, and
//! how it lives through faults.

use std::time::Duration;

use model::calico::{Kind, ResourceKey};
use serde_json::{json, Value};
use testkit::apiserver::FakeApiServer;
use tokio::sync::mpsc;
use watcher::kubernetes::{ClusterAccess, KubeError, KubeOptions};
use watcher::{Cache, Update};

struct Fixture {
    api: FakeApiServer,
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let api = FakeApiServer::start().expect("the fake API server starts");
    let (dir, kubeconfig) = api
        .temp_kubeconfig(Some("system:serviceaccount:kube-system:nftpolicy-node"))
        .unwrap();
    Fixture {
        api,
        _dir: dir,
        kubeconfig,
    }
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"team": name}}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn policy(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {}},
    })
}

fn wep(ns: &str, node: &str, pod: &str) -> ResourceKey {
    ResourceKey::new(
        Kind::WorkloadEndpoint,
        Some(ns),
        &model::convert::workload_endpoint_name(node, pod, "eth0"),
    )
}

/// A running source and the cache its updates fold into.
struct Watching {
    rx: mpsc::Receiver<Update>,
    task: tokio::task::JoinHandle<Result<(), KubeError>>,
    cache: Cache,
    seen: Vec<Update>,
}

fn options() -> KubeOptions {
    KubeOptions {
        page_size: 2,
        ..KubeOptions::default()
    }
}

fn start(f: &Fixture, options: KubeOptions) -> Watching {
    let (tx, rx) = mpsc::channel(64);
    let access = ClusterAccess::Kubeconfig(f.kubeconfig.clone());
    let task = tokio::spawn(watcher::kubernetes::run_with(access, options, tx));
    Watching {
        rx,
        task,
        cache: Cache::new(),
        seen: Vec::new(),
    }
}

impl Watching {
    /// Folds updates until `done` holds of the cache and the last update;
    /// panics with everything seen after 20 s.
    async fn until(&mut self, what: &str, done: impl Fn(&Cache, &Update) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let u = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(u)) => u,
                Ok(None) => panic!("the source ended waiting for {what}: {:?}", self.seen),
                Err(_) => panic!("no {what} within 20 s; seen: {:#?}", self.seen),
            };
            self.cache.apply(u.clone());
            self.seen.push(u.clone());
            if done(&self.cache, &u) {
                return;
            }
        }
    }

    async fn in_sync(&mut self) {
        self.until("InSync", |_, u| matches!(u, Update::InSync { .. }))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_in_pages_converts_and_names_what_it_rejects() {
    let f = fixture();
    f.api.apply(&namespace("a")).unwrap();
    f.api.apply(&namespace("b")).unwrap();
    for i in 0..5 {
        f.api
            .apply(&pod(
                "a",
                &format!("p{i}"),
                "n1",
                &format!("198.18.0.{}", 10 + i),
            ))
            .unwrap();
    }
    let mut host = pod("a", "host", "n1", "198.18.0.1");
    host["spec"]["hostNetwork"] = json!(true);
    f.api.apply(&host).unwrap();
    let mut pending = pod("a", "pending", "n1", "198.18.0.2");
    pending.as_object_mut().unwrap().remove("status");
    f.api.apply(&pending).unwrap();
    let mut done = pod("a", "done", "n1", "198.18.0.3");
    done["status"]["phase"] = json!("Succeeded");
    f.api.apply(&done).unwrap();
    f.api.apply(&policy("a", "deny")).unwrap();
    // Malformed objects the double stores as sent (no validation).
    let mut bad_pod = pod("b", "bad", "n1", "198.18.0.20");
    bad_pod["spec"]["containers"] = json!(3);
    f.api.apply(&bad_pod).unwrap();
    let mut bad_policy = policy("b", "port-zero");
    bad_policy["spec"]["ingress"] = json!([{"ports": [{"port": 0}]}]);
    f.api.apply(&bad_policy).unwrap();

    let mut w = start(&f, options());
    w.in_sync().await;
    let state = &w.cache.state;
    for i in 0..5 {
        assert!(
            state.get(&wep("a", "n1", &format!("p{i}"))).is_some(),
            "p{i}"
        );
    }
    for no_endpoint in ["host", "pending", "done"] {
        assert!(
            state.get(&wep("a", "n1", no_endpoint)).is_none(),
            "{no_endpoint} has no endpoint"
        );
    }
    assert!(state
        .get(&ResourceKey::new(Kind::Profile, None, "kns.a"))
        .is_some());
    assert!(state
        .get(&ResourceKey::new(
            Kind::NetworkPolicy,
            Some("a"),
            "knp.default.deny"
        ))
        .is_some());
    // The policy is understood as far as what it selects: it is kept as a
    // stub that fails closed, carrying the reason (model::reject); the
    // pod cannot be read at all and is named as rejected.
    let stub = state
        .get(&ResourceKey::new(
            Kind::NetworkPolicy,
            Some("b"),
            "knp.default.port-zero",
        ))
        .expect("the rejected policy's stub");
    let reason = stub.metadata().rejection().unwrap_or_default();
    assert!(reason.contains("port 0 out of range"), "{reason}");
    let rejected: Vec<(&String, &String)> = w.cache.invalid.iter().collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, "Pod b/bad");
    // Paginated: 9 pods at 2 per page.
    assert_eq!(f.api.requests("list", "pods"), 5);

    // Fixing the pod clears its rejection (an InSync re-reports the rest).
    f.api.apply(&pod("b", "bad", "n1", "198.18.0.20")).unwrap();
    w.until("the fixed pod", |c, u| {
        matches!(u, Update::InSync { .. }) && !c.invalid.contains_key("Pod b/bad")
    })
    .await;
    assert!(w.cache.state.get(&wep("b", "n1", "bad")).is_some());
    assert!(w.cache.invalid.is_empty(), "{:?}", w.cache.invalid);
    w.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_and_a_pod_that_changes_key() {
    let f = fixture();
    f.api.apply(&namespace("a")).unwrap();
    let mut w = start(&f, options());
    w.in_sync().await;
    f.api.apply(&pod("a", "web", "n1", "198.18.0.10")).unwrap();
    w.until("the pod", |c, _| {
        c.state.get(&wep("a", "n1", "web")).is_some()
    })
    .await;
    // Recreated on another node under the same name.
    f.api.delete(&pod("a", "web", "n1", "")).unwrap();
    f.api.apply(&pod("a", "web", "n2", "198.18.0.11")).unwrap();
    w.until("the moved pod", |c, _| {
        c.state.get(&wep("a", "n2", "web")).is_some()
            && c.state.get(&wep("a", "n1", "web")).is_none()
    })
    .await;
    // A finished pod's endpoint goes.
    let mut finished = pod("a", "web", "n2", "198.18.0.11");
    finished["status"]["phase"] = json!("Failed");
    f.api.apply(&finished).unwrap();
    w.until("the finished pod", |c, _| {
        c.state.get(&wep("a", "n2", "web")).is_none()
    })
    .await;
    // Deleting the namespace takes its profile.
    f.api.delete(&namespace("a")).unwrap();
    w.until("the namespace deletion", |c, _| {
        c.state
            .get(&ResourceKey::new(Kind::Profile, None, "kns.a"))
            .is_none()
    })
    .await;
    // The revision the source reports reaches the API server's, through
    // bookmarks, once every kind has caught up.
    let rv = f.api.resource_version() as i64;
    w.until("the API server's revision", |c, _| c.revision >= rv)
        .await;
    w.task.abort();
}

fn service_account(ns: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "automountServiceAccountToken": false,
    })
}

/// ServiceAccounts are watched as Calico reads them in KDD mode: each is
/// the profile `ksa.<ns>.<name>` applying its labels as `pcsa.` labels,
/// a label change reaches the profile, a deletion removes it, and pods
/// name their account's profile after their namespace's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_accounts_become_profiles_and_follow_their_labels() {
    let f = fixture();
    f.api.apply(&namespace("a")).unwrap();
    f.api
        .apply(&service_account("a", "batch", json!({"access": "queue"})))
        .unwrap();
    let mut p = pod("a", "worker", "n1", "198.18.0.10");
    p["spec"]["serviceAccountName"] = json!("batch");
    f.api.apply(&p).unwrap();
    f.api
        .apply(&pod("a", "plain", "n1", "198.18.0.11"))
        .unwrap();
    let mut w = start(&f, options());
    w.in_sync().await;
    let key = ResourceKey::new(Kind::Profile, None, "ksa.a.batch");
    let labels = |c: &Cache| match c.state.get(&key).as_deref() {
        Some(model::calico::Resource::Profile(p)) => Some(p.spec.labels_to_apply.clone()),
        _ => None,
    };
    let got = labels(&w.cache).expect("the account's profile");
    assert_eq!(
        format!("{got:?}"),
        r#"{"pcsa.access": "queue", "pcsa.projectcalico.org/name": "batch"}"#
    );
    let profiles = |c: &Cache, pod: &str| match c.state.endpoint(&wep("a", "n1", pod)) {
        Some(e) => e.spec.profiles.to_vec(),
        None => panic!("{pod}: no endpoint"),
    };
    assert_eq!(profiles(&w.cache, "worker"), ["kns.a", "ksa.a.batch"]);
    // No serviceAccountName: the account the API server would name.
    assert_eq!(profiles(&w.cache, "plain"), ["kns.a", "ksa.a.default"]);

    f.api
        .apply(&service_account("a", "batch", json!({"access": "none"})))
        .unwrap();
    w.until("the relabelled account", |c, _| {
        labels(c).is_some_and(|l| l.get("pcsa.access") == Some("none"))
    })
    .await;
    f.api
        .delete(&service_account("a", "batch", json!({})))
        .unwrap();
    w.until("the deleted account", |c, _| c.state.get(&key).is_none())
        .await;
    // An account with a field nftpolicy does not know is rejected by name;
    // its profile is a stub that still labels its pods (and drops their
    // traffic until it is fixed).
    let mut odd = service_account("a", "odd", json!({"x": "y"}));
    odd["spec"] = json!({});
    f.api.apply(&odd).unwrap();
    let odd_key = ResourceKey::new(Kind::Profile, None, "ksa.a.odd");
    w.until("the rejected account", |c, _| {
        c.state
            .get(&odd_key)
            .is_some_and(|r| r.metadata().rejection().is_some())
    })
    .await;
    assert_eq!(f.api.requests("list", "serviceaccounts"), 1);
    w.task.abort();
}

fn node(name: &str, labels: Value, address: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": "198.18.64.0/24"},
        "status": {"addresses": [
            {"type": "Hostname", "address": name},
            {"type": "InternalIP", "address": address},
        ]},
    })
}

/// Nodes are watched for AdminNetworkPolicy `nodes` peers: each becomes
/// the Calico Node of its name with its labels and IP addresses, a label
/// change reaches it, a deletion removes it, and a node whose address is
/// not one is reported by name and left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_become_calico_nodes_and_follow_their_labels() {
    let f = fixture();
    f.api
        .apply(&node("n1", json!({"zone": "a"}), "198.18.0.1"))
        .unwrap();
    let mut w = start(&f, options());
    w.in_sync().await;
    let key = ResourceKey::new(Kind::Node, None, "n1");
    let zone = |c: &Cache| match c.state.get(&key).as_deref() {
        Some(model::calico::Resource::Node(n)) => {
            assert_eq!(format!("{:?}", n.nets()), "[198.18.0.1/32]");
            n.metadata.labels.get("zone").map(str::to_owned)
        }
        _ => None,
    };
    assert_eq!(zone(&w.cache).as_deref(), Some("a"));
    f.api
        .apply(&node("n1", json!({"zone": "b"}), "198.18.0.1"))
        .unwrap();
    w.until("the relabelled node", |c, _| {
        zone(c).as_deref() == Some("b")
    })
    .await;
    f.api.delete(&node("n1", json!({}), "")).unwrap();
    w.until("the deleted node", |c, _| c.state.get(&key).is_none())
        .await;
    f.api
        .apply(&node("n2", json!({}), "not-an-address"))
        .unwrap();
    w.until("the malformed node named", |_, u| {
        matches!(u, Update::Invalid { key, reason, .. }
            if key.contains("Node n2")
                && reason.contains("status.addresses[1].address \"not-an-address\" is not an IP address"))
    })
    .await;
    assert!(w
        .cache
        .state
        .get(&ResourceKey::new(Kind::Node, None, "n2"))
        .is_none());
    assert_eq!(f.api.requests("list", "nodes"), 1);
    w.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_and_compaction_lose_no_deletion() {
    let mut f = fixture();
    f.api.apply(&namespace("a")).unwrap();
    for name in ["keep", "gone-while-down", "gone-before-compaction"] {
        f.api.apply(&pod("a", name, "n1", "198.18.0.10")).unwrap();
    }
    f.api.apply(&policy("a", "gone-too")).unwrap();
    let mut w = start(&f, options());
    w.in_sync().await;
    assert_eq!(w.cache.state.workload_endpoints().count(), 3);

    // Connections cut: watches resume from their resource version.
    f.api.drop_connections();
    f.api
        .apply(&pod("a", "added-after-cut", "n1", "198.18.0.12"))
        .unwrap();
    w.until("the pod added after the cut", |c, _| {
        c.state.get(&wep("a", "n1", "added-after-cut")).is_some()
    })
    .await;

    // A restart: nothing listens for a while, objects are deleted meanwhile.
    f.api.stop();
    f.api
        .delete(&pod("a", "gone-while-down", "n1", ""))
        .unwrap();
    w.until("the outage", |_, u| {
        matches!(u, Update::Disconnected { .. })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(u) = w.rx.try_recv() {
        w.cache.apply(u.clone());
        w.seen.push(u);
    }
    assert!(
        w.cache
            .state
            .get(&wep("a", "n1", "gone-while-down"))
            .is_some(),
        "nothing learnt while the API server is down: {:#?}",
        w.seen
    );
    f.api.resume().unwrap();
    w.until("the deletion made while down", |c, _| {
        c.state.get(&wep("a", "n1", "gone-while-down")).is_none()
    })
    .await;
    w.in_sync().await;

    // Down again; deletions, then a compaction: the watch's version is
    // gone, so the source relists and reconciles.
    let lists_before = f.api.requests("list", "pods");
    f.api.stop();
    f.api
        .delete(&pod("a", "gone-before-compaction", "n1", ""))
        .unwrap();
    f.api.delete(&policy("a", "gone-too")).unwrap();
    f.api.compact();
    f.api.resume().unwrap();
    // Each kind relists when its own watch meets the compaction (410);
    // until then the source counts that kind as in sync, so an InSync may
    // come before the last kind has relisted: wait for both deletions.
    let gone_too = ResourceKey::new(Kind::NetworkPolicy, Some("a"), "knp.default.gone-too");
    w.until("the reconciled relist", |c, u| {
        matches!(u, Update::InSync { .. })
            && c.state
                .get(&wep("a", "n1", "gone-before-compaction"))
                .is_none()
            && c.state.get(&gone_too).is_none()
    })
    .await;
    assert!(f.api.requests("list", "pods") > lists_before, "relisted");
    assert!(w.cache.state.get(&wep("a", "n1", "keep")).is_some());

    // Open watches fall behind (the deletion is never sent on them) and
    // expire with 410 Gone after a compaction: only the relist finds it.
    let lists_before = f.api.requests("list", "pods");
    f.api.stall_watches();
    f.api.delete(&pod("a", "keep", "n1", "")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The earlier recovery may still be finishing: an InSync (one per
    // kind's bookmark), or a kind the wait above did not look at (service
    // accounts, say) meeting the compaction only now: it reports a
    // Disconnected and relists, and its objects are unchanged. No object
    // change may be delivered.
    let mut late = Vec::new();
    while let Ok(u) = w.rx.try_recv() {
        w.cache.apply(u.clone());
        late.push(u);
    }
    assert!(
        w.cache.state.get(&wep("a", "n1", "keep")).is_some()
            && late
                .iter()
                .all(|u| matches!(u, Update::InSync { .. } | Update::Disconnected { .. })),
        "nothing delivered while stalled: {late:?}"
    );
    f.api.expire_watches();
    w.until("the relist after 410", |c, u| {
        matches!(u, Update::InSync { .. }) && c.state.get(&wep("a", "n1", "keep")).is_none()
    })
    .await;
    assert!(w
        .seen
        .iter()
        .any(|u| matches!(u, Update::Disconnected { reason } if reason.contains("410 Gone"))));
    assert!(f.api.requests("list", "pods") > lists_before, "relisted");
    w.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_names_the_missing_permission() {
    let f = fixture();
    f.api.apply(&namespace("a")).unwrap();
    f.api.deny(None, "list", "pods");
    let mut w = start(&f, options());
    w.until("the refusal", |_, u| {
        matches!(u, Update::Disconnected { .. })
    })
    .await;
    let Some(Update::Disconnected { reason }) = w.seen.last() else {
        unreachable!()
    };
    for words in [
        "403",
        "list pods",
        "get, list and watch on pods",
        "nftpolicy-node",
    ] {
        assert!(reason.contains(words), "{words:?} in {reason}");
    }
    assert!(!w.seen.iter().any(|u| matches!(u, Update::InSync { .. })));
    // Granted: in sync (after the backoff).
    f.api.allow_all();
    w.in_sync().await;
    w.task.abort();

    // A one-shot read gives up at once instead.
    f.api.deny(None, "watch", "networkpolicies");
    let mut once = start(
        &f,
        KubeOptions {
            give_up_when_refused: true,
            ..options()
        },
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), &mut once.task)
        .await
        .expect("gives up at once")
        .unwrap();
    let err = ended.unwrap_err().to_string();
    assert!(
        err.contains("watch networkpolicies.networking.k8s.io"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_are_clear() {
    let missing = ClusterAccess::Kubeconfig("/nonexistent/kubeconfig".into());
    let Err(err) = missing.client().await else {
        panic!("a missing kubeconfig is an error")
    };
    let err = err.to_string();
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
    assert_eq!(
        ClusterAccess::from_datastore("kubernetes:/a/b")
            .unwrap()
            .unwrap(),
        ClusterAccess::Kubeconfig("/a/b".into())
    );
    assert!(ClusterAccess::from_datastore("kubernetes:")
        .unwrap()
        .is_err());
    assert!(ClusterAccess::from_datastore("kubernetesx")
        .unwrap()
        .is_err());
    assert!(ClusterAccess::from_datastore("etcd://a").is_none());
}

/// The network-policy-api kinds are watched like the others and become
/// their GlobalNetworkPolicies; a cluster without their CRDs (404) is in
/// sync with none of them, not stuck waiting for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_policies_are_watched_and_a_missing_crd_is_no_outage() {
    let f = fixture();
    for plural in [
        "adminnetworkpolicies",
        "baselineadminnetworkpolicies",
        "clusternetworkpolicies",
    ] {
        f.api.unserve(plural);
    }
    f.api.apply(&namespace("a")).unwrap();
    f.api.apply(&pod("a", "web", "n1", "198.18.0.10")).unwrap();
    let mut w = start(&f, options());
    w.in_sync().await;
    assert!(w.cache.state.get(&wep("a", "n1", "web")).is_some());
    assert!(
        !w.seen
            .iter()
            .any(|u| matches!(u, Update::Disconnected { .. })),
        "a CRD that is not installed is no outage: {:?}",
        w.seen
    );
    w.task.abort();

    // Installed: an AdminNetworkPolicy arrives as its GlobalNetworkPolicy,
    // in tier adminnetworkpolicy, and goes when deleted.
    f.api.serve_all();
    let anp = json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
        "metadata": {"name": "guard"},
        "spec": {"priority": 3, "subject": {"namespaces": {}},
                 "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]},
    });
    f.api.apply(&anp).unwrap();
    let mut w = start(&f, options());
    let key = ResourceKey::new(
        Kind::GlobalNetworkPolicy,
        None,
        "kanp.adminnetworkpolicy.guard",
    );
    w.until("the AdminNetworkPolicy", |c, _| c.state.get(&key).is_some())
        .await;
    let held = w.cache.state.get(&key);
    let Some(model::calico::Resource::GlobalNetworkPolicy(g)) = held.as_deref() else {
        panic!()
    };
    assert_eq!(g.spec.tier.as_deref(), Some("adminnetworkpolicy"));
    assert_eq!(g.spec.order, Some(3.0));
    f.api.delete(&anp).unwrap();
    w.until("the deletion", |c, _| c.state.get(&key).is_none())
        .await;
    w.task.abort();
}
