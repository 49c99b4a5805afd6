//! The nftables backend with table groups (`--table-groups`), against the
//! kernel in a network namespace of its own: after every kind of change the
//! kernel holds exactly a fresh cut of the compiler's whole ruleset, and a
//! namespaced policy's add and delete leave the other groups' tables
//! untouched.

use std::collections::BTreeMap;

use compiler::groups;
use compiler::nft::{Table, TableFamily};
use compiler::CompileOptions;
use dataplane::{Changes, Kind, Pipeline, TableGroups};
use model::calico::Resource;
use model::state::ClusterState;
use programmer::NftProgrammer;
use testkit::cluster::{cluster_yaml, NODE};

const GROUPS: usize = 3;

/// Every table of ours, by (family, name), as the kernel holds it.
fn kernel(p: &mut NftProgrammer) -> BTreeMap<(TableFamily, String), Table> {
    let mut out = BTreeMap::new();
    for family in [TableFamily::Ip, TableFamily::Ip6] {
        for name in p.our_table_names(family).unwrap() {
            let t = p.read_back(family, &name).unwrap().unwrap();
            out.insert((family, name), t);
        }
    }
    out
}

/// The kernel holds a fresh cut of what the pipeline compiled.
#[track_caller]
fn holds_fresh_cut(pipeline: &Pipeline, p: &mut NftProgrammer) {
    let logical = pipeline.logical().expect("compiled");
    let (_, cut) = groups::cut_by_namespace(logical, pipeline.compiler().ruleset(), GROUPS);
    let want: BTreeMap<(TableFamily, String), Table> = cut
        .tables
        .iter()
        .map(|t| ((t.family, t.name.clone()), programmer::canonical(t)))
        .collect();
    assert!(kernel(p) == want, "the kernel differs from a fresh cut");
}

fn change(state: &mut ClusterState, r: Resource) -> Changes {
    let key = r.key();
    let old = state.upsert(r);
    Changes::from([(key, old)])
}

/// The one resource (not a namespace's profile) `yaml` stands for.
fn resource(yaml: &str) -> Resource {
    testkit::cluster::state(yaml)
        .resources()
        .map(std::borrow::Cow::into_owned)
        .find(|r| !matches!(r, Resource::Profile(_)))
        .expect("one resource")
}

#[test]
fn every_change_keeps_the_kernel_equal_to_a_fresh_cut() {
    let _ns = testkit::netns::Netns::enter("dp-groups").unwrap();
    let mut state = testkit::cluster::state(&cluster_yaml(300));
    let dp = dataplane::open_grouped(
        Kind::Nftables,
        iptables::Backend::Legacy,
        TableGroups::Fixed(GROUPS),
    )
    .unwrap();
    let mut pipeline = Pipeline::new(CompileOptions::new(NODE), dp);
    pipeline.apply(&state, &Changes::new()).unwrap();
    let mut p = NftProgrammer::new().unwrap();
    let names: Vec<String> = (0..GROUPS).map(groups::table_name).collect();
    assert_eq!(p.our_table_names(TableFamily::Ip).unwrap(), names);
    holds_fresh_cut(&pipeline, &mut p);

    // A policy in namespace ns-3 selecting its pods (some are local).
    let policy = resource(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: extra, namespace: ns-3}\n\
         spec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {role: backend}}}], ports: [{port: 8080}]}]}\n",
    );
    let key = policy.key();
    let mine = groups::table_name(groups::group_of_namespace("ns-3", GROUPS));
    let before = kernel(&mut p);
    let changes = change(&mut state, policy);
    pipeline.apply(&state, &changes).unwrap();
    let after = kernel(&mut p);
    holds_fresh_cut(&pipeline, &mut p);
    let mut untouched = 0;
    for (k, t) in &before {
        if k.1 == mine {
            assert!(after.get(k) != Some(t), "the policy's group {k:?} changed");
        } else {
            assert!(
                after.get(k) == Some(t),
                "another group's table {k:?} changed"
            );
            untouched += 1;
        }
    }
    assert!(untouched > 0, "ns-3's group is not the only one");

    // A remote pod joining the policy's source set: element changes.
    let pod = resource(&testkit::cluster::pod(
        "ns-3",
        "late",
        "node-9",
        &["198.18.3.200"],
        "app: app-0, role: backend",
        "{containerPort: 80}",
    ));
    let changes = change(&mut state, pod);
    pipeline.apply(&state, &changes).unwrap();
    holds_fresh_cut(&pipeline, &mut p);

    // A local pod in another namespace: dispatch maps and its chains.
    let local = resource(&testkit::cluster::pod(
        "ns-4",
        "local-late",
        NODE,
        &["198.18.3.201"],
        "app: app-4, role: frontend",
        "{containerPort: 80}",
    ));
    let changes = change(&mut state, local);
    pipeline.apply(&state, &changes).unwrap();
    holds_fresh_cut(&pipeline, &mut p);

    // The policy goes again: the other groups are still untouched.
    let before = kernel(&mut p);
    let old = state.remove(&key);
    pipeline
        .apply(&state, &Changes::from([(key, old)]))
        .unwrap();
    holds_fresh_cut(&pipeline, &mut p);
    let after = kernel(&mut p);
    for (k, t) in &before {
        if k.1 != mine {
            assert!(
                after.get(k) == Some(t),
                "another group's table {k:?} changed"
            );
        }
    }
}

#[test]
fn changing_the_group_count_replaces_the_tables() {
    let _ns = testkit::netns::Netns::enter("dp-regroup").unwrap();
    let state = testkit::cluster::state(&cluster_yaml(150));
    let mut p = NftProgrammer::new().unwrap();
    for count in [1, 3, 2, 1] {
        let dp = dataplane::open_grouped(
            Kind::Nftables,
            iptables::Backend::Legacy,
            TableGroups::Fixed(count),
        )
        .unwrap();
        let mut pipeline = Pipeline::new(CompileOptions::new(NODE), dp);
        pipeline.apply(&state, &Changes::new()).unwrap();
        let want: Vec<String> = if count == 1 {
            vec![compiler::nft::TABLE_NAME.to_owned()]
        } else {
            (0..count).map(groups::table_name).collect()
        };
        assert_eq!(
            p.our_table_names(TableFamily::Ip).unwrap(),
            want,
            "{count} groups"
        );
    }
}
