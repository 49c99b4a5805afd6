//! The etcd source and the policy controller against a real etcd server
//! (started per test by `common::Etcd`, on loopback, killed on drop).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Etcd, Proxy};
use etcd_client::{Client, CompactionOptions, GetOptions};
use model::calico::{Kind, Resource, ResourceKey, ETCD_PREFIX};
use model::kube::{parse_manifests, Manifest};
use model::state::ClusterState;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use watcher::controller::{self, Action, Change};
use watcher::etcd::{EtcdConfig, EtcdError, EtcdOptions};
use watcher::{Cache, Update};

/// Bound on every wait for a condition.
const DEADLINE: Duration = Duration::from_secs(30);

/// A fresh etcd server and a client of it.
async fn started() -> (Etcd, Client) {
    let etcd = Etcd::start().await;
    let client = etcd.client().await;
    (etcd, client)
}

fn test_options() -> EtcdOptions {
    EtcdOptions {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        page_size: 2, // several pages even for small snapshots
        ..EtcdOptions::default()
    }
}

fn config(endpoints: &[String]) -> EtcdConfig {
    EtcdConfig {
        endpoints: endpoints.to_vec(),
        ..Default::default()
    }
}

/// A running etcd source and everything it sent.
struct Stream {
    rx: mpsc::Receiver<Update>,
    cache: Cache,
    log: Vec<Update>,
    task: JoinHandle<Result<(), EtcdError>>,
}

impl Stream {
    fn start(cfg: EtcdConfig, buffer: usize) -> Stream {
        let (tx, rx) = mpsc::channel(buffer);
        let task = tokio::spawn(watcher::etcd::run_with(cfg, test_options(), tx));
        Stream {
            rx,
            cache: Cache::new(),
            log: vec![],
            task,
        }
    }

    /// Starts the source and receives until its first InSync.
    async fn in_sync(cfg: EtcdConfig, buffer: usize) -> Stream {
        let mut s = Stream::start(cfg, buffer);
        s.until("in sync", |_, u| matches!(u, Update::InSync { .. }))
            .await;
        s
    }

    async fn next(&mut self) -> Update {
        match tokio::time::timeout(DEADLINE, self.rx.recv()).await {
            Ok(Some(u)) => {
                self.cache.apply(u.clone());
                self.log.push(u.clone());
                u
            }
            Ok(None) => panic!("the source ended; got {:#?}", self.log),
            Err(_) => panic!("no update within {DEADLINE:?}; got {:#?}", self.log),
        }
    }

    /// Receives until `done` holds (checked after each update); returns the
    /// log index of the update that made it hold.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&Cache, &Update) -> bool) -> usize {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let u = tokio::select! {
                u = self.next() => u,
                _ = tokio::time::sleep_until(deadline) => panic!("{what}: not within {DEADLINE:?}; got {:#?}", self.log),
            };
            if done(&self.cache, &u) {
                return self.log.len() - 1;
            }
        }
    }

    /// Receives until the source is in sync with exactly `expected`.
    async fn until_converged(&mut self, expected: &ClusterState) -> usize {
        if self.cache.in_sync && &self.cache.state == expected {
            return self.log.len();
        }
        self.until("convergence", |c, _| c.in_sync && &c.state == expected)
            .await
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn profile(name: &str, label: &str) -> String {
    format!(
        r#"{{"apiVersion":"projectcalico.org/v3","kind":"Profile","metadata":{{"name":"{name}"}},
        "spec":{{"ingress":[{{"action":"Allow"}}],"labelsToApply":{{"l":"{label}"}}}}}}"#
    )
}

fn policy(ns: &str, name: &str, selector: &str) -> String {
    format!(
        r#"{{"apiVersion":"projectcalico.org/v3","kind":"NetworkPolicy","metadata":{{"name":"{name}","namespace":"{ns}"}},
        "spec":{{"selector":"{selector}","types":["Ingress"]}}}}"#
    )
}

fn endpoint(ns: &str, name: &str, ip: &str) -> String {
    format!(
        r#"{{"apiVersion":"projectcalico.org/v3","kind":"WorkloadEndpoint","metadata":{{"name":"{name}","namespace":"{ns}"}},
        "spec":{{"orchestrator":"k8s","node":"node1","pod":"p","endpoint":"eth0","interfaceName":"cali0","ipNetworks":["{ip}/32"],"profiles":["kns.{ns}"]}}}}"#
    )
}

fn key(kind: Kind, ns: Option<&str>, name: &str) -> String {
    ResourceKey::new(kind, ns, name).etcd_key()
}

/// Writes profile `name` labelled `label`; the revision of the write.
async fn put_profile(c: &mut Client, name: &str, label: &str) -> i64 {
    put(c, &key(Kind::Profile, None, name), &profile(name, label)).await
}

async fn put(c: &mut Client, key: &str, value: &str) -> i64 {
    c.put(key, value, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

async fn del(c: &mut Client, key: &str) -> i64 {
    let resp = c.delete(key, None).await.unwrap();
    assert_eq!(resp.deleted(), 1, "{key} existed");
    resp.header().unwrap().revision()
}

async fn revision(c: &mut Client) -> i64 {
    c.get("/", None).await.unwrap().header().unwrap().revision()
}

/// The valid resources under the prefix, straight from etcd.
async fn etcd_state(c: &mut Client) -> ClusterState {
    let resp = c
        .get(ETCD_PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut state = ClusterState::new();
    for kv in resp.kvs() {
        let k = kv.key_str().unwrap();
        let Some(key) = ResourceKey::from_etcd_key(k) else {
            continue;
        };
        if let Ok(r) = watcher::etcd::decode(&key, k, kv.value()) {
            state.upsert(r);
        }
    }
    state
}

async fn compact_all(c: &mut Client) -> i64 {
    let rev = revision(c).await;
    c.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    rev
}

/// Writes a key and waits for its upsert: the watch is live.
async fn wait_for_live_watch(c: &mut Client, s: &mut Stream) {
    let sentinel = key(Kind::Profile, None, "kns.sentinel");
    let rev = put_profile(c, "kns.sentinel", &s.log.len().to_string()).await;
    s.until("the sentinel", |_, u| {
        matches!(u, Update::Upsert { key, revision, .. } if key.etcd_key() == sentinel && *revision == rev)
    })
    .await;
}

fn is_delete_of(u: &Update, etcd_key: &str) -> bool {
    matches!(u, Update::Delete { key, .. } if key.etcd_key() == etcd_key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_watch() {
    let (etcd, mut c) = started().await;
    let (np, pr, wep) = (
        key(Kind::NetworkPolicy, Some("a"), "p1"),
        key(Kind::Profile, None, "kns.a"),
        key(Kind::WorkloadEndpoint, Some("a"), "node1-k8s-p-eth0"),
    );
    put(&mut c, &np, &policy("a", "p1", "app == 'x'")).await;
    put(&mut c, &pr, &profile("kns.a", "1")).await;
    put(
        &mut c,
        &wep,
        &endpoint("a", "node1-k8s-p-eth0", "198.18.0.1"),
    )
    .await;
    // Outside the layout: ignored.
    put(&mut c, "/calico/ipam/v2/assignment/x", "{}").await;
    put(
        &mut c,
        &format!("{ETCD_PREFIX}felixconfigurations/default"),
        "{}",
    )
    .await;
    put(&mut c, &format!("{ETCD_PREFIX}profiles/a/b"), "{}").await;
    let snapshot = revision(&mut c).await;

    let mut s = Stream::start(config(&[etcd.endpoint()]), 16);
    let mut got = vec![];
    for _ in 0..4 {
        got.push(s.next().await);
    }
    let keys: Vec<String> = got[..3]
        .iter()
        .map(|u| match u {
            Update::Upsert { key, revision, .. } => {
                assert!(*revision < snapshot);
                key.etcd_key()
            }
            other => panic!("expected an upsert, got {other:?}"),
        })
        .collect();
    assert_eq!(keys, [np.clone(), pr.clone(), wep.clone()]);
    assert_eq!(got[3], Update::InSync { revision: snapshot });
    assert_eq!(s.cache.state, etcd_state(&mut c).await);

    let changed = put(&mut c, &pr, &profile("kns.a", "2")).await;
    match s.next().await {
        Update::Upsert {
            key,
            resource: Resource::Profile(p),
            revision,
        } => {
            assert_eq!(key.etcd_key(), pr);
            assert_eq!(p.spec.labels_to_apply.get("l").expect("label"), "2");
            assert_eq!(revision, changed);
        }
        other => panic!("expected the profile's update, got {other:?}"),
    }
    let deleted = del(&mut c, &np).await;
    let u = s.next().await;
    assert!(is_delete_of(&u, &np), "{u:?}");
    assert_eq!(u.revision(), Some(deleted));
    // Ignored keys stay ignored when they change.
    put(&mut c, "/calico/ipam/v2/assignment/x", "{\"a\":1}").await;
    put(
        &mut c,
        &wep,
        &endpoint("a", "node1-k8s-p-eth0", "198.18.0.2"),
    )
    .await;
    let u = s.next().await;
    assert!(
        matches!(&u, Update::Upsert { key, .. } if key.etcd_key() == wep),
        "{u:?}"
    );
    assert_eq!(s.cache.state, etcd_state(&mut c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_endpoint_of_several_is_skipped() {
    let (etcd, mut c) = started().await;
    put_profile(&mut c, "kns.a", "1").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let mut s = Stream::start(config(&[dead, etcd.endpoint()]), 16);
    let expected = etcd_state(&mut c).await;
    s.until_converged(&expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_reported_by_key_and_the_rest_flows() {
    let (etcd, mut c) = started().await;
    let good = key(Kind::Profile, None, "kns.good");
    let syntax = key(Kind::Profile, None, "kns.syntax");
    let action = key(Kind::NetworkPolicy, Some("a"), "bad-action");
    let wrong_name = key(Kind::Profile, None, "kns.wrong");
    put(&mut c, &good, &profile("kns.good", "1")).await;
    put(&mut c, &syntax, "{not json").await;
    put(
        &mut c,
        &action,
        r#"{"apiVersion":"projectcalico.org/v3","kind":"NetworkPolicy","metadata":{"name":"bad-action","namespace":"a"},
            "spec":{"selector":"all()","ingress":[{"action":"Permit"}]}}"#,
    )
    .await;
    put(&mut c, &wrong_name, &profile("kns.other", "1")).await;
    put_profile(&mut c, "kns.good2", "1").await;

    let mut s = Stream::in_sync(config(&[etcd.endpoint()]), 16).await;
    let invalid: BTreeMap<&str, &str> = s
        .log
        .iter()
        .filter_map(|u| match u {
            Update::Invalid { key, reason, .. } => Some((key.as_str(), reason.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(invalid.len(), 2, "{:#?}", s.log);
    assert!(invalid[syntax.as_str()].contains(&syntax), "{invalid:?}");
    assert!(
        invalid[wrong_name.as_str()].contains("kns.other"),
        "{invalid:?}"
    );
    // An unknown action rejects the policy, but its selector reads: it
    // flows as a stub that fails closed (model::reject), naming the value.
    let rejected: Vec<(ResourceKey, &str)> = s.cache.state.rejected().collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0.etcd_key(), action);
    assert!(rejected[0].1.contains("Permit"), "{rejected:?}");
    assert_eq!(s.cache.state.len(), 3);
    assert_eq!(s.cache.state, etcd_state(&mut c).await);

    // Fixed: it flows. Broken: a Delete comes first, so nothing stale stays.
    put(&mut c, &syntax, &profile("kns.syntax", "1")).await;
    let u = s.next().await;
    assert!(
        matches!(&u, Update::Upsert { key, .. } if key.etcd_key() == syntax),
        "{u:?}"
    );
    assert!(!s.cache.invalid.contains_key(&syntax));
    put(&mut c, &good, "[]").await;
    let u = s.next().await;
    assert!(is_delete_of(&u, &good), "{u:?}");
    let u = s.next().await;
    assert!(
        matches!(&u, Update::Invalid { key, .. } if key == &good),
        "{u:?}"
    );
    assert_eq!(s.cache.state, etcd_state(&mut c).await);
    // Deleting an invalid key reports a Delete (clearing it from health).
    del(&mut c, &action).await;
    let u = s.next().await;
    assert!(is_delete_of(&u, &action), "{u:?}");
    assert!(!s.cache.invalid.contains_key(&action));
}

/// The consumer stops reading while a key is deleted, others written and
/// etcd compacted to its latest revision; when it reads again the deletion
/// is there and the state converges (whichever way: the buffered events, or
/// a compacted watch and a relist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_the_consumer_is_stopped() {
    let (etcd, mut c) = started().await;
    let (a, b, new) = (
        key(Kind::Profile, None, "kns.a"),
        key(Kind::Profile, None, "kns.b"),
        key(Kind::Profile, None, "kns.new"),
    );
    put(&mut c, &a, &profile("kns.a", "0")).await;
    put(&mut c, &b, &profile("kns.b", "0")).await;
    let mut s = Stream::in_sync(config(&[etcd.endpoint()]), 1).await;
    let mark = s.log.len();

    del(&mut c, &a).await;
    for i in 1..=30 {
        put(&mut c, &b, &profile("kns.b", &i.to_string())).await;
    }
    put(&mut c, &new, &profile("kns.new", "1")).await;
    compact_all(&mut c).await;

    let expected = etcd_state(&mut c).await;
    s.until_converged(&expected).await;
    assert!(
        s.log[mark..].iter().any(|u| is_delete_of(u, &a)),
        "{:#?}",
        &s.log[mark..]
    );
}

/// The connection is cut; meanwhile a key is deleted, another written and
/// etcd compacted. On reconnection the source relists and reconciles: the
/// deletion is emitted, then InSync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_cut_off_relists_and_reconciles() {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start(etcd.client_port).await;
    let mut c = etcd.client().await;
    let (a, b, unchanged) = (
        key(Kind::Profile, None, "kns.a"),
        key(Kind::NetworkPolicy, Some("n"), "b"),
        key(Kind::Profile, None, "kns.same"),
    );
    put(&mut c, &a, &profile("kns.a", "0")).await;
    put(&mut c, &b, &policy("n", "b", "all()")).await;
    put(&mut c, &unchanged, &profile("kns.same", "0")).await;
    let mut s = Stream::in_sync(config(&[proxy.endpoint()]), 16).await;
    wait_for_live_watch(&mut c, &mut s).await;

    proxy.cut();
    s.until("disconnected", |_, u| {
        matches!(u, Update::Disconnected { .. })
    })
    .await;
    let mark = s.log.len();
    del(&mut c, &a).await;
    put(&mut c, &b, &policy("n", "b", "x == 'y'")).await;
    let compacted = compact_all(&mut c).await;
    proxy.restore();

    let expected = etcd_state(&mut c).await;
    let at = s.until_converged(&expected).await;
    let after = &s.log[mark..=at];
    assert!(after.iter().any(|u| is_delete_of(u, &a)), "{after:#?}");
    assert!(
        matches!(after.last(), Some(Update::InSync { revision }) if *revision >= compacted),
        "{after:#?}"
    );
    // Reconciled, not replayed: the unchanged key is not sent again.
    assert!(
        !after
            .iter()
            .any(|u| matches!(u, Update::Upsert { key, .. } if key.etcd_key() == unchanged)),
        "{after:#?}"
    );
}

/// etcd is SIGKILLed: the source reports Disconnected and keeps retrying;
/// once etcd is back on the same data dir, changes made then arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_and_restarted() {
    let (mut etcd, mut c) = started().await;
    let (a, b) = (
        key(Kind::Profile, None, "kns.a"),
        key(Kind::Profile, None, "kns.b"),
    );
    put(&mut c, &a, &profile("kns.a", "0")).await;
    put(&mut c, &b, &profile("kns.b", "0")).await;
    let mut s = Stream::in_sync(config(&[etcd.endpoint()]), 16).await;
    wait_for_live_watch(&mut c, &mut s).await;

    etcd.kill();
    // Wait for the failed reconnection attempts rather than a fixed pause.
    let mut disconnects = 0;
    s.until("reconnection attempts", |_, u| {
        disconnects += matches!(u, Update::Disconnected { .. }) as usize;
        disconnects >= 3
    })
    .await;
    assert!(!s.cache.in_sync);

    etcd.restart().await;
    let mut c = etcd.client().await;
    del(&mut c, &a).await;
    put(&mut c, &b, &profile("kns.b", "1")).await;
    put_profile(&mut c, "kns.c", "1").await;
    let expected = etcd_state(&mut c).await;
    s.until_converged(&expected).await;
    assert!(s.log.iter().any(|u| is_delete_of(u, &a)));
}

/// etcd wiped and restarted empty: the source deletes nothing and sends no
/// `InSync` (an empty etcd is never taken for an empty cluster), says why
/// in a `Disconnected`, and once the store is written again (at lower
/// revisions than before) converges on it, values compared afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_etcd_is_not_an_empty_cluster() {
    let mut etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let (a, b) = (
        key(Kind::Profile, None, "kns.a"),
        key(Kind::Profile, None, "kns.b"),
    );
    // Revisions well above what the refilled store will reach.
    for i in 0..20 {
        put(&mut c, &a, &profile("kns.a", &i.to_string())).await;
    }
    put(&mut c, &b, &profile("kns.b", "0")).await;
    let mut s = Stream::in_sync(config(&[etcd.endpoint()]), 64).await;
    wait_for_live_watch(&mut c, &mut s).await;
    let before = s.cache.state.clone();

    etcd.restart_empty().await;
    let mark = s.log.len();
    s.until("the empty store reported", |_, u| {
        matches!(u, Update::Disconnected { reason } if reason == watcher::etcd::EMPTY_REASON)
    })
    .await;
    // A key nftpolicy does not read makes it list again: still nothing
    // of ours, so still nothing deleted.
    let mut c = etcd.client().await;
    put(
        &mut c,
        &format!("{ETCD_PREFIX}felixconfigurations/default"),
        "{}",
    )
    .await;
    let mut empty_reports = 0;
    while let Ok(u) = tokio::time::timeout(watcher::etcd::REFILL_QUIET * 4, s.next()).await {
        empty_reports += matches!(u, Update::Disconnected { .. }) as usize;
    }
    assert!(empty_reports >= 2, "{:#?}", &s.log[mark..]);
    assert!(
        !s.log[mark..]
            .iter()
            .any(|u| matches!(u, Update::Delete { .. } | Update::InSync { .. })),
        "{:#?}",
        &s.log[mark..]
    );
    assert_eq!(s.cache.state, before);

    // Written again: kns.a at revision 2 with a value it never had.
    put(&mut c, &a, &profile("kns.a", "new")).await;
    put_profile(&mut c, "kns.c", "1").await;
    let expected = etcd_state(&mut c).await;
    s.until_converged(&expected).await;
    assert!(s.log[mark..].iter().any(|u| is_delete_of(u, &b)));
}

fn manifests(yaml: &str) -> Vec<Manifest> {
    parse_manifests("test.yaml", yaml).unwrap()
}

fn namespace(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n---\n"
    )
}

fn pod(ns: &str, name: &str, node: Option<&str>, ip: &str) -> String {
    let node = node.map_or(String::new(), |n| format!("nodeName: {n}, "));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: web}}}}\n\
         spec: {{{node}containers: [{{name: c, ports: [{{name: http, containerPort: 80}}]}}]}}\n\
         status: {{podIP: {ip}}}\n---\n"
    )
}

fn k8s_policy(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{podSelector: {{matchLabels: {{app: web}}}}, ingress: [{{ports: [{{port: http}}]}}]}}\n---\n"
    )
}

fn actions(changes: &[Change]) -> Vec<(String, Action)> {
    changes
        .iter()
        .map(|c| (c.key.etcd_key(), c.action))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_apply_is_idempotent_and_dry_run_writes_nothing() {
    let (_etcd, mut c) = started().await;
    let yaml = namespace("a", "team: x")
        + &pod("a", "web-1", Some("node-1"), "198.18.0.10")
        + &k8s_policy("a", "allow-http")
        + "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec: {selector: all()}\n";
    let m = manifests(&yaml);
    let wep = key(Kind::WorkloadEndpoint, Some("a"), "node--1-k8s-web--1-eth0");
    let all = [
        key(Kind::Profile, None, "kns.a"),
        wep.clone(),
        key(Kind::NetworkPolicy, Some("a"), "knp.default.allow-http"),
        key(Kind::GlobalNetworkPolicy, None, "g"),
    ];

    let before = revision(&mut c).await;
    let dry = controller::apply(&c, &m, true).await.unwrap();
    assert_eq!(
        actions(&dry),
        all.iter()
            .map(|k| (k.clone(), Action::Created))
            .collect::<Vec<_>>()
    );
    assert!(dry
        .iter()
        .all(|c| c.revision.is_none() && c.value.is_some()));
    assert_eq!(revision(&mut c).await, before, "a dry run writes nothing");

    let first = controller::apply(&c, &m, false).await.unwrap();
    assert_eq!(actions(&first), actions(&dry));
    // What was written is the resource's JSON, and decodes back to it.
    for change in &first {
        let stored = c.get(change.key.etcd_key(), None).await.unwrap();
        let stored = stored.kvs()[0].value();
        assert_eq!(stored, change.value.as_ref().unwrap().to_json().as_bytes());
    }
    let written = revision(&mut c).await;
    let second = controller::apply(&c, &m, false).await.unwrap();
    assert!(
        second.iter().all(|c| c.action == Action::Unchanged),
        "{second:#?}"
    );
    assert_eq!(revision(&mut c).await, written, "no write when unchanged");

    // One label changes: one update.
    let changed = manifests(&yaml.replace("team: x", "team: y"));
    let third = controller::apply(&c, &changed, false).await.unwrap();
    let updated: Vec<_> = third
        .iter()
        .filter(|c| c.action != Action::Unchanged)
        .map(|c| (c.key.etcd_key(), c.action))
        .collect();
    assert_eq!(updated, [(all[0].clone(), Action::Updated)]);

    // A pod that finished has no endpoint any more.
    let finished = manifests(
        &pod("a", "web-1", Some("node-1"), "198.18.0.10")
            .replace("status: {", "status: {phase: Succeeded, "),
    );
    let gone = controller::apply(&c, &finished, false).await.unwrap();
    assert_eq!(actions(&gone), [(wep, Action::Deleted)]);

    // A policy that cannot be enforced but whose podSelector reads is
    // written as its rejected stub: agents drop what it selects until it is
    // fixed, and say why.
    let rejected = manifests(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: b}\n\
         spec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n",
    );
    let written = controller::apply(&c, &rejected, false).await.unwrap();
    let stored = c.get(written[0].key.etcd_key(), None).await.unwrap();
    let stored = String::from_utf8_lossy(stored.kvs()[0].value()).into_owned();
    assert!(
        stored.contains(
            r#""nftpolicy.io/rejected":"spec.ingress[0].ports[0]: port 0 out of range 1-65535""#
        ),
        "{stored}"
    );

    // One whose podSelector cannot be read fails the whole apply, naming
    // it, and writes nothing.
    let before = revision(&mut c).await;
    let bad = manifests(
        &(namespace("b", "")
            + "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: b}\n\
               spec: {podSelector: {matchLabels: {'a b': c}}}\n"),
    );
    let err = controller::apply(&c, &bad, false).await.unwrap_err();
    assert!(
        matches!(&err, controller::Error::Convert { object, .. } if object == "NetworkPolicy b/bad"),
        "{err}"
    );
    assert_eq!(revision(&mut c).await, before);
}

/// Two writers apply, concurrently and repeatedly, different labels to the
/// same namespaces and different pods: every write is reported against the
/// value it replaced, none is lost or hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_concurrent_writers_lose_no_update() {
    let (_etcd, mut c) = started().await;
    const ROUNDS: usize = 8;
    let namespaces = ["n1", "n2", "n3"];
    let writer = |w: &'static str| {
        let client = c.clone();
        tokio::spawn(async move {
            let mut changes = vec![];
            for round in 0..ROUNDS {
                let mut yaml = String::new();
                for ns in namespaces {
                    yaml += &namespace(ns, &format!("writer: {w}, round: '{round}'"));
                }
                let ip = if w == "a" { 10 + round } else { 100 + round };
                yaml += &pod(
                    "n1",
                    &format!("p-{w}-{round}"),
                    Some("node1"),
                    &format!("198.18.1.{ip}"),
                );
                changes.extend(
                    controller::apply(&client, &manifests(&yaml), false)
                        .await
                        .unwrap(),
                );
            }
            changes
        })
    };
    let (a, b) = (writer("a"), writer("b"));
    let changes: Vec<Change> = [a.await.unwrap(), b.await.unwrap()].concat();

    // Every pod of both writers is there.
    let weps = c
        .get(
            format!("{ETCD_PREFIX}workloadendpoints/n1/"),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(weps.count(), 2 * ROUNDS as i64);

    for ns in namespaces {
        let k = key(Kind::Profile, None, &format!("kns.{ns}"));
        let writes: Vec<&Change> = changes
            .iter()
            .filter(|c| c.key.etcd_key() == k && c.action != Action::Unchanged)
            .collect();
        let created = writes
            .iter()
            .filter(|c| c.action == Action::Created)
            .count();
        assert_eq!(created, 1, "exactly one writer created {k}: {writes:#?}");
        let mut revisions: Vec<i64> = writes.iter().map(|c| c.revision.unwrap()).collect();
        revisions.sort();
        revisions.dedup();
        assert_eq!(revisions.len(), writes.len(), "one revision per write");
        let stored = c.get(k.as_str(), None).await.unwrap();
        let stored = &stored.kvs()[0];
        assert_eq!(
            stored.version() as usize,
            writes.len(),
            "every write to {k} was reported, and only those"
        );
        let last = writes.iter().max_by_key(|c| c.revision).unwrap();
        assert_eq!(stored.mod_revision(), last.revision.unwrap());
        assert_eq!(
            stored.value(),
            last.value.as_ref().unwrap().to_json().as_bytes()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_delete() {
    let (_etcd, mut c) = started().await;
    let yaml = namespace("a", "")
        + &pod("a", "web-1", Some("node-1"), "198.18.0.10")
        + &pod("a", "web-2", Some("node-2"), "198.18.0.11")
        + &k8s_policy("a", "allow-http");
    controller::apply(&c, &manifests(&yaml), false)
        .await
        .unwrap();
    // A non-k8s endpoint of a pod of the same name is not the controller's.
    let foreign = key(Kind::WorkloadEndpoint, Some("a"), "node-cni-web--2-eth0");
    put(
        &mut c,
        &foreign,
        &endpoint("a", "node-cni-web--2-eth0", "198.18.0.12")
            .replace("\"k8s\"", "\"cni\"")
            .replace("\"pod\":\"p\"", "\"pod\":\"web-2\""),
    )
    .await;

    // web-2 without its node: found by listing the namespace's endpoints.
    let to_delete = namespace("a", "")
        + &pod("a", "web-1", Some("node-1"), "198.18.0.10")
        + &pod("a", "web-2", None, "198.18.0.11")
        + &k8s_policy("a", "allow-http");
    let m = manifests(&to_delete);
    let expected = vec![
        (key(Kind::Profile, None, "kns.a"), Action::Deleted),
        (
            key(Kind::WorkloadEndpoint, Some("a"), "node--1-k8s-web--1-eth0"),
            Action::Deleted,
        ),
        (
            key(Kind::WorkloadEndpoint, Some("a"), "node--2-k8s-web--2-eth0"),
            Action::Deleted,
        ),
        (
            key(Kind::NetworkPolicy, Some("a"), "knp.default.allow-http"),
            Action::Deleted,
        ),
    ];
    let before = revision(&mut c).await;
    let dry = controller::delete(&c, &m, true).await.unwrap();
    assert_eq!(actions(&dry), expected);
    assert_eq!(revision(&mut c).await, before, "a dry run deletes nothing");

    let done = controller::delete(&c, &m, false).await.unwrap();
    assert_eq!(actions(&done), expected);
    assert!(done
        .iter()
        .all(|c| c.value.is_some() && c.revision.is_some()));
    assert_eq!(common::calico_keys(&mut c).await, [foreign.as_str()]);

    let again = controller::delete(&c, &m, false).await.unwrap();
    assert!(
        again
            .iter()
            .all(|c| c.action == Action::Unchanged && c.value.is_none()),
        "{again:#?}"
    );
    assert!(again[0].to_string().ends_with("not found"), "{}", again[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_sync_dir_touches_only_its_own_keys() {
    let (_etcd, mut c) = started().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        namespace("a", "team: x") + &pod("a", "web-1", Some("n1"), "198.18.0.10"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(
        dir.path().join("sub/np.yaml"),
        k8s_policy("a", "allow-http")
            + "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: from-dir}\nspec: {selector: all()}\n",
    )
    .unwrap();
    // Others' keys, and a stale key of the controller's own.
    let foreign = [
        (key(Kind::GlobalNetworkPolicy, None, "g"), r#"{"apiVersion":"projectcalico.org/v3","kind":"GlobalNetworkPolicy","metadata":{"name":"g"},"spec":{"selector":"all()"}}"#.to_owned()),
        (key(Kind::NetworkPolicy, Some("a"), "mine"), policy("a", "mine", "all()")),
        (key(Kind::Profile, None, "other"), profile("other", "1")),
        (
            key(Kind::WorkloadEndpoint, Some("a"), "h-cni-x-eth0"),
            endpoint("a", "h-cni-x-eth0", "198.18.0.99").replace("\"k8s\"", "\"cni\""),
        ),
    ];
    for (k, v) in &foreign {
        put(&mut c, k, v).await;
    }
    let stale = key(Kind::NetworkPolicy, Some("a"), "knp.default.old");
    put(&mut c, &stale, &policy("a", "knp.default.old", "all()")).await;
    let stale_wep = key(Kind::WorkloadEndpoint, Some("a"), "n1-k8s-gone-eth0");
    put(
        &mut c,
        &stale_wep,
        &endpoint("a", "n1-k8s-gone-eth0", "198.18.0.98"),
    )
    .await;

    let changes = controller::sync_dir(&c, dir.path()).await.unwrap();
    let mut got = actions(&changes);
    got.sort();
    let mut want = vec![
        (
            key(Kind::NetworkPolicy, Some("a"), "knp.default.allow-http"),
            Action::Created,
        ),
        (stale.clone(), Action::Deleted),
        (key(Kind::Profile, None, "kns.a"), Action::Created),
        (
            key(Kind::WorkloadEndpoint, Some("a"), "n1-k8s-web--1-eth0"),
            Action::Created,
        ),
        (stale_wep.clone(), Action::Deleted),
    ];
    want.sort();
    assert_eq!(got, want);
    for (k, v) in &foreign {
        let stored = c.get(k.as_str(), None).await.unwrap();
        assert_eq!(stored.kvs()[0].value(), v.as_bytes(), "{k} untouched");
    }
    let gnp = c
        .get(key(Kind::GlobalNetworkPolicy, None, "from-dir"), None)
        .await
        .unwrap();
    assert!(
        gnp.kvs().is_empty(),
        "Calico manifests are not the controller's"
    );

    let before = revision(&mut c).await;
    let again = controller::sync_dir(&c, dir.path()).await.unwrap();
    assert!(
        again.iter().all(|c| c.action == Action::Unchanged),
        "{again:#?}"
    );
    assert_eq!(revision(&mut c).await, before);

    // A bad file: nothing is synced, and the error names it.
    std::fs::write(dir.path().join("a.yaml"), "kind: [").unwrap();
    let err = controller::sync_dir(&c, dir.path()).await.unwrap_err();
    assert!(err.to_string().contains("a.yaml: malformed YAML"), "{err}");
    assert_eq!(revision(&mut c).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_controller_resyncs_on_file_changes() {
    let (etcd, mut c) = started().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ns.yaml");
    std::fs::write(&file, namespace("a", "v: '1'")).unwrap();
    let cfg = config(&[etcd.endpoint()]);
    let path = dir.path().to_path_buf();
    let task = tokio::spawn(async move {
        controller::run_controller(&path, &cfg, Duration::from_millis(50)).await
    });
    let profile_key = key(Kind::Profile, None, "kns.a");
    let label = |c: &mut Client| {
        let mut c = c.clone();
        let k = profile_key.clone();
        async move {
            let r = c.get(k.as_str(), None).await.unwrap();
            r.kvs().first().map(|kv| {
                let Resource::Profile(p) = Resource::from_json("", kv.value()).unwrap() else {
                    panic!()
                };
                p.spec
                    .labels_to_apply
                    .get("pcns.v")
                    .expect("label")
                    .to_owned()
            })
        }
    };
    let wait = |want: Option<&'static str>| {
        let c = c.clone();
        let label = &label;
        async move {
            let mut c = c;
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                if label(&mut c).await.as_deref() == want {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "label never became {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait(Some("1")).await;
    std::fs::write(&file, namespace("a", "v: '2'")).unwrap();
    wait(Some("2")).await;
    std::fs::remove_file(&file).unwrap();
    wait(None).await;
    task.abort();
    let _ = label(&mut c).await;
}

/// TLS with client certificates, configured as the CLI would
/// (`--etcd etcd://… --etcd-ca … --etcd-cert … --etcd-key …`); without a
/// client certificate the server refuses, and the source says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let etcd = Etcd::start_tls().await;
    let certs = etcd.tls.clone().unwrap();
    let mut c = etcd.client().await;
    put_profile(&mut c, "kns.a", "1").await;

    let url = format!("etcd://127.0.0.1:{}", etcd.client_port);
    let cfg = EtcdConfig::from_url(&url).unwrap().with_tls(
        Some(certs.ca.clone()),
        Some(certs.client_cert.clone()),
        Some(certs.client_key.clone()),
    );
    let client = cfg.connect(&test_options()).await.unwrap();
    let applied = controller::apply(&client, &manifests(&namespace("b", "")), false)
        .await
        .unwrap();
    assert_eq!(applied[0].action, Action::Created);

    let mut s = Stream::start(cfg, 16);
    let expected = etcd_state(&mut c).await;
    assert_eq!(expected.len(), 2);
    s.until_converged(&expected).await;

    let no_cert = EtcdConfig::from_url(&url)
        .unwrap()
        .with_tls(Some(certs.ca.clone()), None, None);
    let mut s = Stream::start(no_cert, 16);
    let u = s.next().await;
    assert!(matches!(u, Update::Disconnected { .. }), "{u:?}");

    // Unreadable TLS files are a configuration error, not a retry loop.
    let missing = EtcdConfig::from_url(&url).unwrap().with_tls(
        Some(certs.ca.with_extension("missing")),
        None,
        None,
    );
    let (tx, _rx) = mpsc::channel(1);
    let err = watcher::etcd::run(missing, tx).await.unwrap_err();
    assert!(err.to_string().contains("ca.missing"), "{err}");
}
