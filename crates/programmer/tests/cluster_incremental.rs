//! Incremental programming of a compiled 1,000-pod cluster: a new pod that
//! joins a selector is a transaction of set-element messages only; a changed
//! policy rewrites only that policy's chain.

use std::collections::BTreeMap;

use compiler::{compile_nftables, CompileOptions};
use model::convert::kube_to_calico;
use model::kube::{parse_manifests, Manifest};
use model::state::ClusterState;
use programmer::NftProgrammer;
use testkit::netns::Netns;

fn add(state: &mut ClusterState, yaml: &str) {
    for m in parse_manifests("test", yaml).unwrap() {
        let Manifest::Kube(o) = m else { panic!() };
        if let Some(r) = kube_to_calico(&o).unwrap() {
            state.upsert(r);
        }
    }
}

fn pod(i: u32, app: &str) -> String {
    let node = if i.is_multiple_of(10) {
        "node1"
    } else {
        "node2"
    };
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 128, 1)) + i);
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod{i}, namespace: shop, labels: {{app: {app}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

fn policy(port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web-from-client, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: client}}}}}}], ports: [{{port: {port}}}]}}]\n"
    )
}

const OTHER_POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-from-web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n";

#[test]
fn thousand_pod_cluster_updates_are_minimal() {
    let _ns = Netns::enter("clusterinc").unwrap();
    let mut state = ClusterState::new();
    add(
        &mut state,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    );
    for i in 0..1000 {
        add(
            &mut state,
            &pod(i, ["web", "client", "db", "batch"][i as usize % 4]),
        );
    }
    add(&mut state, &policy(80));
    add(&mut state, OTHER_POLICY);
    let opts = CompileOptions::new("node1");
    let mut p = NftProgrammer::new().unwrap();
    let first = p
        .apply(&compile_nftables(&state, &opts).unwrap().1)
        .unwrap();
    assert!(first.messages > 100, "{first:?}");

    // A remote pod joins the `app == client` selector.
    add(&mut state, &pod(1001, "client"));
    let report = p
        .apply(&compile_nftables(&state, &opts).unwrap().1)
        .unwrap();
    let kinds: Vec<&str> = report.kinds.keys().copied().collect();
    assert_eq!(kinds, ["NEWSETELEM"], "only set elements: {report:?}");
    assert_eq!(
        report.messages, 1,
        "one message: the pod is IPv4-only: {report:?}"
    );

    // One policy changes: only its chain is rewritten.
    add(&mut state, &policy(8080));
    let report = p
        .apply(&compile_nftables(&state, &opts).unwrap().1)
        .unwrap();
    let want: BTreeMap<&str, usize> = [("DELRULE", 2), ("NEWRULE", 4)].into_iter().collect();
    assert_eq!(report.kinds, want, "{report:?}");
    let changed = p.plan(&compile_nftables(&state, &opts).unwrap().1).unwrap();
    assert!(changed.is_empty(), "nothing left to do");
}
