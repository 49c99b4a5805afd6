//! `--table-groups auto`, the agent's default, against the kernel: a small
//! ruleset stays one table per family, a large one (the benchmark's
//! cluster at 5,000 policies, with 100 local endpoints) is cut into
//! namespace groups, and the count chosen at the first apply stays for the
//! life of the process.

use bench::{generate, run::extra_policy, Scale, NODE_UNDER_TEST};
use compiler::groups::{self, TableGroups, AUTO_MIN_RULES};
use compiler::nft::{TableFamily, TABLE_NAME};
use compiler::CompileOptions;
use dataplane::{Changes, Kind, Pipeline};
use model::calico::Resource;
use model::state::ClusterState;
use programmer::NftProgrammer;

/// A pipeline over the agent's nftables backend cut into `groups`.
fn pipeline(groups: TableGroups) -> Pipeline {
    let dp = dataplane::open_grouped(Kind::Nftables, iptables::Backend::Legacy, groups).unwrap();
    Pipeline::new(CompileOptions::new(NODE_UNDER_TEST), dp)
}

/// The agent as it runs by default, `--table-groups auto`.
fn agent_default() -> Pipeline {
    pipeline(TableGroups::Auto)
}

/// The names of our tables in a family when they are cut into `count`.
fn table_names(count: usize) -> Vec<String> {
    if count == 1 {
        vec![TABLE_NAME.to_owned()]
    } else {
        (0..count).map(groups::table_name).collect()
    }
}

fn large_cluster() -> ClusterState {
    let mut scale = Scale::new(5_000, 6_000);
    scale.local_endpoints = 100;
    generate(&scale)
}

#[test]
fn auto_keeps_a_small_ruleset_whole_and_cuts_a_large_one() {
    let _ns = testkit::netns::Netns::enter("auto-groups").unwrap();
    let mut kernel = NftProgrammer::new().unwrap();

    let small = generate(&Scale::new(40, 300));
    let mut pipeline = agent_default();
    pipeline.apply(&small, &Changes::new()).unwrap();
    assert_eq!(pipeline.dataplane().stats().table_groups, 1);
    for family in [TableFamily::Ip, TableFamily::Ip6] {
        assert_eq!(kernel.our_table_names(family).unwrap(), [TABLE_NAME]);
    }
    drop(pipeline);

    // The agent restarted over a large cluster: the tables it left are
    // replaced by the groups' tables, in one transaction.
    let mut large = large_cluster();
    let (_, whole) =
        compiler::compile_nftables(&large, &CompileOptions::new(NODE_UNDER_TEST)).unwrap();
    let rules = groups::largest_table_rules(&whole);
    assert!(
        rules >= AUTO_MIN_RULES,
        "the large cluster's table holds {rules} rules"
    );
    let want = groups::auto_groups(rules);
    assert!(want > 1, "{rules} rules: {want} groups");
    let mut pipeline = agent_default();
    pipeline.apply(&large, &Changes::new()).unwrap();
    assert_eq!(pipeline.dataplane().stats().table_groups, want as u64);
    let names = table_names(want);
    for family in [TableFamily::Ip, TableFamily::Ip6] {
        assert_eq!(kernel.our_table_names(family).unwrap(), names, "{family:?}");
    }

    // A policy added now is patched into the groups' tables, and the
    // kernel holds what the cut says.
    let app = large
        .workload_endpoints()
        .find(|(_, w)| w.spec.node == NODE_UNDER_TEST)
        .and_then(|(_, w)| w.metadata.labels.get("app").map(str::to_owned))
        .unwrap();
    let policy = Resource::NetworkPolicy(extra_policy("auto-groups-extra", &app));
    let key = policy.key();
    let old = large.upsert(policy);
    pipeline
        .apply(&large, &Changes::from([(key, old)]))
        .unwrap();
    assert!(!pipeline.has_drift().unwrap());
    for family in [TableFamily::Ip, TableFamily::Ip6] {
        assert_eq!(kernel.our_table_names(family).unwrap(), names, "{family:?}");
    }

    // The cluster shrinks under the running agent, even below what auto
    // would cut: the count stays (a new count would replace every table;
    // it is chosen again at the next start).
    assert!(pipeline.rebuild(&small).unwrap());
    assert_eq!(pipeline.dataplane().stats().table_groups, want as u64);
    for family in [TableFamily::Ip, TableFamily::Ip6] {
        assert_eq!(kernel.our_table_names(family).unwrap(), names, "{family:?}");
    }
}

/// Restarted over tables a previous run cut into a count that a ruleset
/// within 10 % of this one's size would get, `auto` keeps them; over a
/// count far from it, it cuts its own.
#[test]
fn auto_keeps_the_count_it_finds_while_it_fits() {
    let _ns = testkit::netns::Netns::enter("auto-keep").unwrap();
    let mut kernel = NftProgrammer::new().unwrap();
    let large = large_cluster();
    let (_, whole) =
        compiler::compile_nftables(&large, &CompileOptions::new(NODE_UNDER_TEST)).unwrap();
    let rules = groups::largest_table_rules(&whole);
    let fresh = groups::auto_groups(rules);
    let near = groups::auto_groups(rules * 9 / 10);
    assert!(
        near < fresh,
        "{rules} rules: 10 % fewer should get fewer groups than {fresh}"
    );
    for (found, kept) in [(near, near), (1, fresh), (fresh + 3, fresh)] {
        let mut earlier = pipeline(TableGroups::Fixed(found));
        earlier.apply(&large, &Changes::new()).unwrap();
        drop(earlier);

        let mut pipeline = agent_default();
        pipeline.apply(&large, &Changes::new()).unwrap();
        assert_eq!(
            pipeline.dataplane().stats().table_groups,
            kept as u64,
            "found {found} groups, {rules} rules"
        );
        assert_eq!(
            kernel.our_table_names(TableFamily::Ip).unwrap(),
            table_names(kept)
        );
        assert!(!pipeline.has_drift().unwrap());
    }
}
