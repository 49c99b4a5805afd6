//! The incremental compiler gives exactly what a full compile gives, after
//! every kind of change, on generated clusters (with network sets that
//! overlap pod addresses, so that nets inside nets are exercised, and
//! endpoints and policies that are now and then rejected, and service
//! accounts whose labels change under the pods using them); and its element
//! deltas turn the previous ruleset into the new one.

use std::collections::BTreeMap;

use bench::{generate, workload, Scale, NODE_UNDER_TEST};
use compiler::groups::Split;
use compiler::incremental::{IncrementalCompiler, Outcome};
use compiler::logical::LogicalRuleset;
use compiler::nft::Ruleset;
use compiler::{compile_nftables, CompileOptions};
use model::calico::{
    Action, GlobalNetworkSet, Kind, NetworkPolicy, NetworkSet, NetworkSetSpec, ObjectMeta,
    PolicyType, Profile, ProfileSpec, Resource, ResourceKey, ServiceAccountMatch, Tier, TierAction,
    TierSpec, WorkloadEndpoint,
};
use model::convert::namespace_profile_name;
use model::serviceaccount;
use model::state::ClusterState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn network_set(i: usize, rng: &mut StdRng) -> Resource {
    // Nets around the pod range 198.18.128.0/17 so that they contain pods,
    // each other, or nothing.
    let nets = (0..rng.random_range(1..4))
        .map(|_| {
            let len = rng.random_range(20..=32u8);
            let addr = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(198, 18, 128, 0)) + rng.random_range(0..4096),
            );
            ipnet::IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap().trunc())
        })
        .collect();
    let mut labels = model::selector::Labels::new();
    labels.insert("app".to_owned(), format!("app{}", rng.random_range(0..5)));
    labels.insert("tier".to_owned(), "web".to_owned());
    let metadata = |ns: Option<String>| ObjectMeta {
        name: format!("set{i}"),
        namespace: ns.map(Into::into),
        labels: labels.clone(),
        ..Default::default()
    };
    if i.is_multiple_of(2) {
        Resource::GlobalNetworkSet(GlobalNetworkSet {
            api_version: model::calico::API_VERSION.into(),
            metadata: metadata(None),
            spec: NetworkSetSpec { nets },
        })
    } else {
        Resource::NetworkSet(NetworkSet {
            api_version: model::calico::API_VERSION.into(),
            metadata: metadata(Some(bench::namespace_name(i % 4))),
            spec: NetworkSetSpec { nets },
        })
    }
}

/// A node (`nodes` peers match its addresses): labels change, addresses
/// now and then land among the pods' and the network sets'.
fn node(i: usize, rng: &mut StdRng) -> Resource {
    let host = rng.random_range(1..40u32);
    let v4 = if rng.random_bool(0.3) {
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 128, 0)) + host)
    } else {
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + host)
    };
    Resource::from_yaml(
        "node",
        &format!(
            "{{apiVersion: projectcalico.org/v3, kind: Node, metadata: {{name: n{i}, labels: {{zone: z{}}}}}, \
             spec: {{addresses: [{{address: '{v4}/24', type: CalicoNodeIP}}, {{address: 'fd00:198:18::{host:x}', type: InternalIP}}]}}}}",
            rng.random_range(0..3)
        ),
    )
    .unwrap()
}

/// Egress to nodes by label, and an `all()` rule that must not see them.
const NODE_POLICY: &str = "{apiVersion: projectcalico.org/v3, kind: GlobalNetworkPolicy, metadata: {name: to-nodes}, \
    spec: {order: 5, selector: all(), types: [Egress], egress: [\
    {action: Deny, destination: {selector: \"has(nftpolicy.io/node) && zone == 'z1'\"}}, \
    {action: Allow, protocol: TCP, destination: {selector: \"has(nftpolicy.io/node)\", ports: [80]}}, \
    {action: Pass, destination: {selector: all()}}]}}";

/// The profile of service account `sa<0..3>` in one of the first namespaces,
/// with `pcsa.` labels as the model converts a ServiceAccount.
fn account_profile(rng: &mut StdRng) -> Resource {
    let ns = bench::namespace_name(rng.random_range(0..4));
    let sa = format!("sa{}", rng.random_range(0..3));
    let mut labels = model::selector::Labels::new();
    labels.insert(
        format!("{}team", serviceaccount::LABEL_PREFIX),
        format!("t{}", rng.random_range(0..2)),
    );
    labels.insert(
        format!("{}projectcalico.org/name", serviceaccount::LABEL_PREFIX),
        sa.clone(),
    );
    Resource::Profile(Profile {
        api_version: model::calico::API_VERSION.into(),
        metadata: ObjectMeta {
            name: serviceaccount::profile_name(&ns, &sa),
            ..Default::default()
        },
        spec: ProfileSpec {
            labels_to_apply: labels,
            ..Default::default()
        },
    })
}

/// One of the first namespaces' profile with another `team` label, and
/// now and then its ingress narrowed to a deny or back to allow.
fn namespace_profile(state: &ClusterState, rng: &mut StdRng) -> Resource {
    let name = namespace_profile_name(&bench::namespace_name(rng.random_range(0..3)));
    let mut p = state.profile(&name).expect("generated").clone();
    p.spec.labels_to_apply.insert(
        "pcns.team".into(),
        format!("team{}", rng.random_range(0..10)),
    );
    if rng.random_bool(0.3) {
        p.spec.ingress[0].action = if rng.random_bool(0.5) {
            Action::Deny
        } else {
            Action::Allow
        };
    }
    Resource::Profile(p)
}

/// Makes `w` run as service account `sa<n>` of its namespace.
fn service_account(w: &mut WorkloadEndpoint, n: usize) {
    let ns = w.metadata.namespace.clone().unwrap_or_default();
    let sa = format!("sa{n}");
    w.spec.profiles.truncate(1);
    w.spec
        .profiles
        .push(serviceaccount::profile_name(&ns, &sa).into());
    w.spec.service_account_name = Some(sa.into());
    serviceaccount::felix_labels(w);
}

/// Now and then a policy limited by service account, and a rule matching
/// peers by account names and labels.
fn account_matches(p: &mut NetworkPolicy, rng: &mut StdRng) {
    if rng.random_bool(0.3) {
        p.spec.service_account_selector = Some(format!("team == 't{}'", rng.random_range(0..2)));
    }
    if let Some(rule) = p.spec.ingress.first_mut() {
        if rng.random_bool(0.4) {
            rule.source.service_accounts = Some(ServiceAccountMatch {
                names: vec![format!("sa{}", rng.random_range(0..3))],
                selector: rng
                    .random_bool(0.5)
                    .then(|| format!("team == 't{}'", rng.random_range(0..2))),
            });
        }
    }
}

/// Applies `r` (or deletes `key`) to `state`, remembering the first old value.
/// Tier `t1` or `t2` created or changed (order, default action), or
/// deleted (its policies then have a missing tier).
fn tier_change(rng: &mut StdRng) -> (ResourceKey, Option<Resource>) {
    let tier = Tier {
        api_version: model::calico::API_VERSION.into(),
        metadata: ObjectMeta {
            name: format!("t{}", rng.random_range(1..=2)),
            ..Default::default()
        },
        spec: TierSpec {
            // Before, between and after the built-in and default tiers.
            order: match rng.random_range(0..4) {
                0 => None,
                n => Some(f64::from(n) * 600.0 - 500.0),
            },
            default_action: rng.random_bool(0.5).then_some(TierAction::Pass),
        },
    };
    let r = Resource::Tier(tier);
    let key = r.key();
    (key, (!rng.random_bool(0.25)).then_some(r))
}

/// A policy in tier `t1` or `t2` now and then.
fn maybe_tiered(p: &mut NetworkPolicy, rng: &mut StdRng) {
    if rng.random_bool(0.3) {
        p.spec.tier = Some(format!("t{}", rng.random_range(1..=2)));
    }
}

/// Groups of the namespace-group cut in these tests.
const GROUPS: usize = 3;

/// A local interface's group: any function of its name will do here.
fn group_of(iface: &str) -> usize {
    iface.bytes().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    }) % GROUPS
}

/// The cut by group done plainly: per group, the dispatch maps with the
/// other groups' interfaces returning, and every chain reachable from the
/// base chains through jumps, gotos and the maps' elements, with the sets
/// they use.
fn reference_cut(r: &Ruleset) -> Vec<Ruleset> {
    use compiler::nft::{referenced_sets, Table, Verdict};
    (0..GROUPS)
        .map(|g| Ruleset {
            tables: r
                .tables
                .iter()
                .map(|t| {
                    let mut out = Table::new(t.family, &compiler::groups::table_name(g));
                    for (name, m) in &t.maps {
                        let mut m = m.clone();
                        for (iface, v) in &mut m.elements {
                            if group_of(iface) != g {
                                *v = Verdict::Return;
                            }
                        }
                        out.maps.insert(name.clone(), m);
                    }
                    let mut todo: Vec<String> = t
                        .chains
                        .values()
                        .filter(|c| c.base.is_some())
                        .map(|c| c.name.clone())
                        .collect();
                    while let Some(name) = todo.pop() {
                        if out.chains.contains_key(&name) {
                            continue;
                        }
                        let chain = t.chains[&name].clone();
                        for rule in &chain.rules {
                            match &rule.verdict {
                                Some(Verdict::Jump(to) | Verdict::Goto(to)) => {
                                    todo.push(to.clone())
                                }
                                Some(Verdict::IfNameVmap { map, .. }) => {
                                    todo.extend(out.maps[map].elements.values().filter_map(|v| {
                                        match v {
                                            Verdict::Jump(to) | Verdict::Goto(to) => {
                                                Some(to.clone())
                                            }
                                            _ => None,
                                        }
                                    }))
                                }
                                _ => {}
                            }
                        }
                        for set in referenced_sets(&chain) {
                            if let Some(s) = t.sets.get(set) {
                                out.sets.insert(set.to_owned(), s.clone());
                            }
                        }
                        out.chains.insert(name, chain);
                    }
                    out
                })
                .collect(),
        })
        .collect()
}

/// What differs between the incremental result and the full compile's,
/// object by object (the whole rulesets are too long to read).
fn differences(inc: &LogicalRuleset, full: &LogicalRuleset) -> String {
    let mut out = String::new();
    by_key("chain", &inc.chains, &full.chains, &mut out);
    by_key("endpoint", &inc.endpoints, &full.endpoints, &mut out);
    by_key("IP set", &inc.ip_sets, &full.ip_sets, &mut out);
    if inc.rejected != full.rejected {
        out.push_str(&format!(
            "rejected:\n  incremental {:?}\n  full        {:?}\n",
            inc.rejected, full.rejected
        ));
    }
    if inc.active_policies != full.active_policies {
        out.push_str(&format!(
            "active policies:\n  incremental {:?}\n  full        {:?}\n",
            inc.active_policies, full.active_policies
        ));
    }
    out
}

/// The same for the nftables rulesets, table by table.
fn nft_differences(inc: &Ruleset, full: &Ruleset) -> String {
    let mut out = String::new();
    for (a, b) in inc.tables.iter().zip(&full.tables) {
        let fam = format!("{:?}", a.family);
        by_key(&format!("{fam} chain"), &a.chains, &b.chains, &mut out);
        by_key(&format!("{fam} set"), &a.sets, &b.sets, &mut out);
        by_key(&format!("{fam} map"), &a.maps, &b.maps, &mut out);
    }
    out
}

fn by_key<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    what: &str,
    a: &BTreeMap<K, V>,
    b: &BTreeMap<K, V>,
    out: &mut String,
) {
    for k in a
        .keys()
        .chain(b.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (x, y) = (a.get(k), b.get(k));
        if x != y {
            out.push_str(&format!(
                "{what} {k:?}:\n  incremental {x:?}\n  full        {y:?}\n"
            ));
        }
    }
}

fn change(
    state: &mut ClusterState,
    changes: &mut BTreeMap<ResourceKey, Option<Resource>>,
    key: ResourceKey,
    r: Option<Resource>,
) {
    let old = match r {
        Some(r) => state.upsert(r),
        None => state.remove(&key),
    };
    changes.entry(key).or_insert(old);
}

/// A pod to change: a local one a third of the time (there are few).
fn pick<'a>(
    pods: &'a [model::calico::WorkloadEndpoint],
    rng: &mut StdRng,
) -> &'a model::calico::WorkloadEndpoint {
    let local: Vec<_> = pods
        .iter()
        .filter(|w| w.spec.node == NODE_UNDER_TEST)
        .collect();
    if !local.is_empty() && rng.random_bool(0.33) {
        local[rng.random_range(0..local.len())]
    } else {
        &pods[rng.random_range(0..pods.len())]
    }
}

#[test]
fn incremental_equals_full_compile() {
    equals_full_compile(false);
}

/// The same with `--fused-lookup`: the fused sets' elements follow the
/// selector sets' members, and the endpoint chains redone (or whose
/// policies start or stop fusing) are lowered with their fused lookups.
#[test]
fn incremental_equals_full_compile_fused() {
    equals_full_compile(true);
}

fn equals_full_compile(fused: bool) {
    // More seeds for a longer search: INCREMENTAL_SEEDS=40 (release build).
    let seeds: u64 = std::env::var("INCREMENTAL_SEEDS").map_or(3, |s| s.parse().expect("a number"));
    let mut tier_steps_all: u64 = 0;
    // Patches of a policy change that left some group alone (groups here
    // follow interface names, not namespaces, so most reach every group).
    let mut policy_patches_sparing_a_group: u64 = 0;
    for seed in 1..=seeds {
        let mut scale = Scale::new(60, 400);
        scale.namespaces = 4;
        scale.apps = 5;
        scale.local_endpoints = 10;
        scale.seed = seed;
        let mut state = generate(&scale);
        let mut rng = StdRng::seed_from_u64(seed);
        for i in 0..6 {
            let r = network_set(i, &mut rng);
            state.upsert(r);
            state.upsert(node(i, &mut rng));
        }
        state.upsert(Resource::from_yaml("gnp", NODE_POLICY).unwrap());
        let opts = CompileOptions {
            fused_lookup: fused,
            ..CompileOptions::new(NODE_UNDER_TEST)
        };
        let mut inc = IncrementalCompiler::new(opts.clone());
        assert_eq!(
            inc.update(&state, &BTreeMap::new()).unwrap(),
            Outcome::Rebuilt
        );
        // The cut by namespace group follows along (compiler::groups).
        let mut split = Split::new(GROUPS);
        let mut groups_now = split.full(inc.ruleset(), &group_of);
        let mut next_pod = scale.pods;
        let mut fast = 0;
        // Steps whose delta or patch changes a fused set's elements.
        let mut fused_steps = 0;
        let is_fused = |d: &compiler::nft::SetDelta| {
            d.set.starts_with("cali40f-")
                || d.set.starts_with("cali40h-")
                || d.set.starts_with("cali60f-")
                || d.set.starts_with("cali60h-")
        };
        let mut patches = 0;
        let mut policy_steps = 0;
        let mut tier_steps = 0;
        for step in 0..150 {
            let mut changes = BTreeMap::new();
            // 1 to 3 changes per step, like a burst.
            for _ in 0..rng.random_range(1..=3) {
                let pods: Vec<_> = state
                    .workload_endpoints()
                    .map(|(key, ep)| ep.to_workload_endpoint(key))
                    .collect();
                match rng.random_range(0..10) {
                    0..=2 => {
                        let mut w = workload(&scale, next_pod, &mut rng);
                        next_pod += 1;
                        // Mostly remote; now and then local (patch path).
                        if rng.random_bool(0.75) {
                            w.spec.node = "node2".into();
                        } else {
                            w.spec.node = NODE_UNDER_TEST.into();
                        }
                        // Sometimes reuse another pod's address (shared nets).
                        if rng.random_bool(0.2) {
                            let other = &pods[rng.random_range(0..pods.len())];
                            w.spec.ip_networks = other.spec.ip_networks.clone();
                        }
                        let r = Resource::WorkloadEndpoint(w);
                        change(&mut state, &mut changes, r.key(), Some(r));
                    }
                    3..=4 => {
                        let w = pick(&pods, &mut rng);
                        let key = Resource::WorkloadEndpoint(w.clone()).key();
                        change(&mut state, &mut changes, key, None);
                    }
                    5..=7 => {
                        let mut w = pick(&pods, &mut rng).clone();
                        w.metadata
                            .labels
                            .insert("app".into(), format!("app{}", rng.random_range(0..5)));
                        if rng.random_bool(0.3) {
                            w.metadata.labels.insert("tier".into(), "web".into());
                        }
                        if rng.random_bool(0.2) {
                            w.spec.ports.retain(|p| p.name != "http");
                        }
                        // Now and then another service account, whose
                        // profile's labels it inherits.
                        if rng.random_bool(0.3) {
                            service_account(&mut w, rng.random_range(0..3));
                        }
                        // Now and then rejected (model::reject): it drops
                        // its own traffic, and stays in the sets.
                        if rng.random_bool(0.1) {
                            model::reject::mark_rejected(&mut w.metadata.annotations, "test");
                        } else if rng.random_bool(0.3) {
                            w.metadata.annotations.clear();
                        }
                        let r = Resource::WorkloadEndpoint(w);
                        change(&mut state, &mut changes, r.key(), Some(r));
                    }
                    8 if rng.random_bool(0.25) => {
                        let (key, r) = tier_change(&mut rng);
                        change(&mut state, &mut changes, key, r);
                    }
                    8 if rng.random_bool(0.3) => {
                        // A namespace relabelled (which namespaceSelectors
                        // match its pods and sets), its rules changed.
                        let r = namespace_profile(&state, &mut rng);
                        change(&mut state, &mut changes, r.key(), Some(r));
                    }
                    8 if rng.random_bool(0.4) => {
                        // A service account's labels change, appear or go.
                        let r = account_profile(&mut rng);
                        if rng.random_bool(0.2) {
                            change(&mut state, &mut changes, r.key(), None);
                        } else {
                            change(&mut state, &mut changes, r.key(), Some(r));
                        }
                    }
                    8 if rng.random_bool(0.4) => {
                        // A node is relabelled, readdressed, added or goes.
                        let r = node(rng.random_range(0..8), &mut rng);
                        if rng.random_bool(0.2) {
                            change(&mut state, &mut changes, r.key(), None);
                        } else {
                            change(&mut state, &mut changes, r.key(), Some(r));
                        }
                    }
                    8 => {
                        let r = network_set(rng.random_range(0..10), &mut rng);
                        if rng.random_bool(0.3) {
                            change(&mut state, &mut changes, r.key(), None);
                        } else {
                            change(&mut state, &mut changes, r.key(), Some(r));
                        }
                    }
                    _ => {
                        let mut p = bench::policy(&scale, rng.random_range(0..200), &mut rng);
                        account_matches(&mut p, &mut rng);
                        maybe_tiered(&mut p, &mut rng);
                        if rng.random_bool(0.2) {
                            // Its selected endpoints drop in its directions.
                            model::reject::mark_rejected(&mut p.metadata.annotations, "test");
                        }
                        // Orders move it among the others; a missing tier
                        // rejects it (its endpoints drop in its direction).
                        match rng.random_range(0..10) {
                            0..=2 => {
                                p.spec.order = Some(f64::from(rng.random_range(0..3u8)) * 500.0)
                            }
                            3 => p.spec.order = None,
                            4 => p.spec.tier = Some("no-such-tier".into()),
                            5 => p.spec.types = vec![PolicyType::Ingress, PolicyType::Egress],
                            _ => {}
                        }
                        let r = Resource::NetworkPolicy(p);
                        if rng.random_bool(0.3) {
                            change(&mut state, &mut changes, r.key(), None);
                        } else {
                            change(&mut state, &mut changes, r.key(), Some(r));
                        }
                    }
                }
            }
            let before = inc.ruleset().clone();
            let outcome = inc.update(&state, &changes).unwrap();
            let policy_changed = changes
                .keys()
                .any(|k| matches!(k.kind, Kind::NetworkPolicy | Kind::Tier));
            tier_steps += u64::from(
                changes.keys().any(|k| k.kind == Kind::Tier) && outcome != Outcome::Rebuilt,
            );
            let profile_changed = changes.keys().any(|k| k.kind == Kind::Profile);
            if (policy_changed || profile_changed) && outcome != Outcome::Rebuilt {
                policy_steps += 1;
            }
            let (logical, ruleset) = compile_nftables(&state, &opts).unwrap();
            assert!(
                inc.logical() == Some(&logical),
                "seed {seed} step {step}: logical ruleset differs after {:?}:\n{}",
                changes.keys().collect::<Vec<_>>(),
                differences(inc.logical().expect("compiled"), &logical)
            );
            assert!(
                inc.ruleset() == &ruleset,
                "seed {seed} step {step}: nftables ruleset differs after {:?}:\n{}",
                changes.keys().collect::<Vec<_>>(),
                nft_differences(inc.ruleset(), &ruleset)
            );
            match &outcome {
                Outcome::Rebuilt => groups_now = split.full(&ruleset, &group_of),
                Outcome::Elements(delta) => {
                    for (g, d) in split.elements(delta).iter().enumerate() {
                        d.apply_to(&mut groups_now[g]);
                    }
                }
                Outcome::Patch(patch) => {
                    let per_group = split.patch(inc.ruleset(), patch, &group_of);
                    if policy_changed && per_group.iter().any(|p| p.is_empty()) {
                        policy_patches_sparing_a_group += 1;
                    }
                    for (g, p) in per_group.iter().enumerate() {
                        p.apply_to(&mut groups_now[g]);
                    }
                }
            }
            let cut = reference_cut(&ruleset);
            for g in 0..GROUPS {
                assert!(
                    groups_now[g] == cut[g],
                    "seed {seed} step {step}: group {g} differs from a fresh cut after {:?}:\n{}",
                    changes.keys().collect::<Vec<_>>(),
                    nft_differences(&groups_now[g], &cut[g])
                );
            }
            let mut patched = before;
            let what = match outcome {
                Outcome::Elements(delta) => {
                    fast += 1;
                    fused_steps += usize::from(delta.sets.iter().any(is_fused));
                    delta.apply_to(&mut patched);
                    "delta"
                }
                Outcome::Patch(patch) => {
                    patches += 1;
                    fused_steps += usize::from(patch.elements.sets.iter().any(is_fused));
                    patch.apply_to(&mut patched);
                    "patch"
                }
                Outcome::Rebuilt => continue,
            };
            assert!(
                patched == ruleset,
                "seed {seed} step {step}: the {what} does not turn the old ruleset into the new"
            );
        }
        assert!(fast > 30, "most steps take the element path ({fast})");
        assert!(
            patches > 20,
            "local changes take the patch path ({patches})"
        );
        assert!(
            policy_steps > 10,
            "policy changes are patched, not compiled in full ({policy_steps})"
        );
        if fused {
            assert!(
                fused_steps > 10,
                "fused sets' elements follow the selector sets' members ({fused_steps})"
            );
        }
        tier_steps_all += tier_steps;
    }
    // Rarer than the others: counted over every seed.
    assert!(
        policy_patches_sparing_a_group >= seeds,
        "a policy change patches only the groups it reaches ({policy_patches_sparing_a_group})"
    );
    assert!(
        tier_steps_all > 2 * seeds,
        "tier changes are patched, not compiled in full ({tier_steps_all})"
    );
}

/// The deltas and patches, applied with `NftProgrammer::apply_elements`
/// and `apply_patch`, leave the kernel holding exactly the full compile's
/// ruleset.
#[test]
fn deltas_and_patches_reach_the_kernel() {
    reach_the_kernel(false);
}

/// The same with `--fused-lookup`: the fused sets' element changes too.
#[test]
fn deltas_and_patches_reach_the_kernel_fused() {
    reach_the_kernel(true);
}

fn reach_the_kernel(fused: bool) {
    let _ns = testkit::netns::Netns::enter("incdelta").unwrap();
    let mut p = programmer::NftProgrammer::new().unwrap();
    let mut scale = Scale::new(40, 300);
    scale.namespaces = 3;
    scale.apps = 4;
    scale.local_endpoints = 8;
    let mut state = generate(&scale);
    let mut rng = StdRng::seed_from_u64(7);
    for i in 0..4 {
        state.upsert(network_set(i, &mut rng));
    }
    let opts = CompileOptions {
        fused_lookup: fused,
        ..CompileOptions::new(NODE_UNDER_TEST)
    };
    let mut inc = IncrementalCompiler::new(opts.clone());
    inc.rebuild(&state).unwrap();
    p.apply(inc.ruleset()).unwrap();
    let mut next_pod = scale.pods;
    let (mut deltas, mut patches, mut type_flips) = (0, 0, 0);
    // [deleted, created] policy chains and sets, over all patches.
    #[derive(Debug, Default)]
    struct Seen {
        policy_chains: [usize; 2],
        sets: [usize; 2],
    }
    let mut seen = Seen::default();
    // Element changes of fused sets that reached the kernel.
    let mut fused_deltas = 0;
    let fused_set = |d: &compiler::nft::SetDelta| {
        ["cali40f-", "cali40h-", "cali60f-", "cali60h-"]
            .iter()
            .any(|p| d.set.starts_with(p))
    };
    for step in 0..100 {
        let mut changes = BTreeMap::new();
        let pods: Vec<_> = state
            .workload_endpoints()
            .map(|(key, ep)| ep.to_workload_endpoint(key))
            .collect();
        let remote = |rng: &mut StdRng| {
            pods.iter()
                .filter(|w| w.spec.node != NODE_UNDER_TEST)
                .nth(rng.random_range(0..100))
                .unwrap()
                .clone()
        };
        let local: Vec<_> = pods
            .iter()
            .filter(|w| w.spec.node == NODE_UNDER_TEST)
            .cloned()
            .collect();
        match step % 10 {
            0 => {
                let mut w = workload(&scale, next_pod, &mut rng);
                next_pod += 1;
                w.spec.node = "node2".into();
                let r = Resource::WorkloadEndpoint(w);
                change(&mut state, &mut changes, r.key(), Some(r));
            }
            1 => {
                let key = Resource::WorkloadEndpoint(remote(&mut rng)).key();
                change(&mut state, &mut changes, key, None);
            }
            2 => {
                let mut w = remote(&mut rng);
                w.metadata
                    .labels
                    .insert("app".into(), format!("app{}", rng.random_range(0..4)));
                let r = Resource::WorkloadEndpoint(w);
                change(&mut state, &mut changes, r.key(), Some(r));
            }
            3 => {
                let r = network_set(rng.random_range(0..6), &mut rng);
                change(&mut state, &mut changes, r.key(), Some(r));
            }
            // Local endpoints: come, change labels (so that policies start
            // and stop applying here), go.
            4 | 5 => {
                let mut w = workload(&scale, next_pod, &mut rng);
                next_pod += 1;
                w.spec.node = NODE_UNDER_TEST.into();
                w.metadata
                    .labels
                    .insert("app".into(), format!("app{}", rng.random_range(0..4)));
                let r = Resource::WorkloadEndpoint(w);
                change(&mut state, &mut changes, r.key(), Some(r));
            }
            6 => {
                let mut w = local[rng.random_range(0..local.len())].clone();
                w.metadata
                    .labels
                    .insert("app".into(), format!("app{}", rng.random_range(0..4)));
                let r = Resource::WorkloadEndpoint(w);
                change(&mut state, &mut changes, r.key(), Some(r));
            }
            7 => {
                let w = &local[rng.random_range(0..local.len())];
                let key = Resource::WorkloadEndpoint(w.clone()).key();
                change(&mut state, &mut changes, key, None);
            }
            // Policies come, change (selector, order, rules) and go.
            8 if rng.random_bool(0.3) => {
                let (key, r) = tier_change(&mut rng);
                change(&mut state, &mut changes, key, r);
            }
            8 => {
                let mut p = bench::policy(&scale, rng.random_range(0..60), &mut rng);
                maybe_tiered(&mut p, &mut rng);
                if rng.random_bool(0.3) {
                    p.spec.order = Some(f64::from(rng.random_range(0..3u8)) * 500.0);
                }
                let r = Resource::NetworkPolicy(p);
                if rng.random_bool(0.3) {
                    change(&mut state, &mut changes, r.key(), None);
                } else {
                    change(&mut state, &mut changes, r.key(), Some(r));
                }
            }
            // A namespace relabelled, its rules changed.
            _ => {
                let r = namespace_profile(&state, &mut rng);
                change(&mut state, &mut changes, r.key(), Some(r));
            }
        }
        match inc.update(&state, &changes).unwrap() {
            Outcome::Elements(delta) => {
                deltas += 1;
                fused_deltas += delta.sets.iter().filter(|d| fused_set(d)).count();
                p.apply_elements(&delta)
                    .unwrap_or_else(|e| panic!("step {step}: {e} ({delta:?})"));
            }
            Outcome::Patch(patch) => {
                patches += 1;
                fused_deltas += patch.elements.sets.iter().filter(|d| fused_set(d)).count();
                for t in &patch.tables {
                    for (name, c) in &t.chains {
                        if name.starts_with("cali-p") {
                            seen.policy_chains[usize::from(c.is_some())] += 1;
                        }
                    }
                    for s in t.sets.values() {
                        seen.sets[usize::from(s.is_some())] += 1;
                    }
                }
                p.apply_patch(&patch)
                    .unwrap_or_else(|e| panic!("step {step}: {e} ({patch:?})"));
            }
            // A network set that gives a pod selector set its first CIDR
            // (or takes its last) turns it from a hash set into an
            // interval set (or back): compiled in full, and the programmer
            // re-creates the set under the rules that use it.
            // A namespace relabel can do the same: it moves the network
            // sets in that namespace between namespaceSelector sets.
            Outcome::Rebuilt if step % 10 == 3 || step % 10 == 9 => {
                type_flips += 1;
                p.apply(inc.ruleset())
                    .unwrap_or_else(|e| panic!("step {step}: {e}"));
            }
            Outcome::Rebuilt => {
                panic!("step {step}: endpoint, policy and profile changes need no full compile")
            }
        }
        let want = compile_nftables(&state, &opts).unwrap().1;
        for t in &want.tables {
            let got = p
                .read_back(t.family, compiler::nft::TABLE_NAME)
                .unwrap()
                .unwrap();
            assert!(
                programmer::canonical(&got) == programmer::canonical(t),
                "step {step}: the kernel's {:?} table differs from a full compile",
                t.family
            );
        }
    }
    assert_eq!(deltas + type_flips + patches, 100);
    assert!(
        patches >= 50,
        "local, policy and profile changes patch ({patches})"
    );
    assert!(type_flips > 0, "no set changed its type");
    assert_eq!(
        fused,
        fused_deltas > 0,
        "fused sets' deltas: {fused_deltas}"
    );
    // The patches exercised policies starting and stopping to apply here,
    // with the sets their rules use.
    assert!(
        seen.policy_chains.iter().chain(&seen.sets).all(|n| *n > 0),
        "{seen:?}"
    );
}

/// A rule whose peers × ports sit at the fused lookup's element limit
/// (`compiler::fused`): a pod joining its peers' selector stops its policy
/// fusing (the policy's jump is back in the endpoint chain), the pod
/// leaving lets it fuse again — both patched, equal to a full compile.
#[test]
fn fusing_follows_the_element_limit() {
    let mut scale = Scale::new(10, 200);
    scale.namespaces = 2;
    scale.apps = 4;
    scale.local_endpoints = 4;
    let mut state = generate(&scale);
    // 16 remote peers × 4,096 ports = 65,536 elements: at the limit.
    let peers: Vec<WorkloadEndpoint> = state
        .workload_endpoints()
        .filter(|(_, w)| w.spec.node != NODE_UNDER_TEST)
        .take(17)
        .map(|(key, ep)| ep.to_workload_endpoint(key))
        .collect();
    for w in &peers[..16] {
        let mut w = w.clone();
        w.metadata.labels.insert("edge".into(), "yes".into());
        state.upsert(Resource::WorkloadEndpoint(w));
    }
    let ports: Vec<String> = (0..64u32)
        // Not adjacent, or they would merge into one range too wide to fuse.
        .map(|i| format!("'{}:{}'", 1000 + 65 * i, 1063 + 65 * i))
        .collect();
    state.upsert(
        Resource::from_yaml(
            "gnp",
            &format!(
                "{{apiVersion: projectcalico.org/v3, kind: GlobalNetworkPolicy, metadata: {{name: edge}}, \
                 spec: {{order: 1, selector: \"app == 'app0'\", types: [Ingress], ingress: [\
                 {{action: Allow, protocol: TCP, source: {{selector: \"edge == 'yes'\"}}, destination: {{ports: [{}]}}}}]}}}}",
                ports.join(", ")
            ),
        )
        .unwrap(),
    );
    let opts = CompileOptions {
        fused_lookup: true,
        ..CompileOptions::new(NODE_UNDER_TEST)
    };
    let mut inc = IncrementalCompiler::new(opts.clone());
    inc.rebuild(&state).unwrap();
    // Whether some endpoint chain fuses the policy (else it jumps to it).
    let fuses_edge = |rs: &Ruleset| {
        rs.tables.iter().all(|t| {
            t.chains.values().any(|c| {
                c.rules.iter().any(|r| {
                    r.comment.as_deref().is_some_and(|c| {
                        c.starts_with(compiler::fused::MARKER) && c.contains("gnp/edge")
                    })
                })
            })
        })
    };
    assert!(fuses_edge(inc.ruleset()), "at the limit, the policy fuses");
    let mut joined = peers[16].clone();
    joined.metadata.labels.insert("edge".into(), "yes".into());
    let key = Resource::WorkloadEndpoint(joined.clone()).key();
    let steps = [
        (Some(Resource::WorkloadEndpoint(joined)), false),
        (Some(Resource::WorkloadEndpoint(peers[16].clone())), true),
    ];
    for (step, (r, fuses)) in steps.into_iter().enumerate() {
        let mut changes = BTreeMap::new();
        change(&mut state, &mut changes, key.clone(), r);
        let before = inc.ruleset().clone();
        let outcome = inc.update(&state, &changes).unwrap();
        let (_, full) = compile_nftables(&state, &opts).unwrap();
        assert!(
            inc.ruleset() == &full,
            "step {step}: {}",
            nft_differences(inc.ruleset(), &full)
        );
        assert_eq!(fuses_edge(&full), fuses, "step {step}");
        let Outcome::Patch(patch) = outcome else {
            panic!("step {step}: the endpoint chains are lowered again: {outcome:?}");
        };
        let mut patched = before;
        patch.apply_to(&mut patched);
        assert!(
            patched == full,
            "step {step}: the patch gives the new ruleset"
        );
    }
}

/// A policy change patches only what it touches: the chains of the local
/// endpoints it selects (before or after) and its own, never another
/// endpoint's — also when a new order moves it past the policies those
/// endpoints use, whose lists are then carried over rather than matched
/// again — and each step equals a full compile.
#[test]
fn a_policy_change_patches_only_the_endpoints_it_touches() {
    let mut scale = Scale::new(40, 300);
    scale.namespaces = 2;
    scale.apps = 3;
    scale.local_endpoints = 12;
    scale.seed = 11;
    let mut state = generate(&scale);
    let opts = CompileOptions::new(NODE_UNDER_TEST);
    let mut inc = IncrementalCompiler::new(opts.clone());
    assert_eq!(
        inc.update(&state, &BTreeMap::new()).unwrap(),
        Outcome::Rebuilt
    );
    // The local endpoints by (namespace, app): the new policy selects one
    // group, the others must not be redone.
    let locals: Vec<(String, String, String)> = state
        .workload_endpoints()
        .filter(|(_, w)| w.spec.node == NODE_UNDER_TEST)
        .map(|(key, w)| {
            let w = w.to_workload_endpoint(key);
            (
                w.metadata
                    .namespace
                    .as_deref()
                    .unwrap_or_default()
                    .to_owned(),
                w.metadata.labels.get("app").unwrap_or_default().to_owned(),
                w.spec.interface_name.to_string(),
            )
        })
        .collect();
    let (ns, app, _) = locals[0].clone();
    let selected: Vec<&str> = locals
        .iter()
        .filter(|(n, a, _)| *n == ns && *a == app)
        .map(|(_, _, iface)| iface.as_str())
        .collect();
    assert!(
        selected.len() < locals.len(),
        "some local endpoints are not selected"
    );
    let mut rng = StdRng::seed_from_u64(1);
    let mut p = bench::policy(&scale, 0, &mut rng);
    p.metadata.name = "knp.default.touching".into();
    p.metadata.namespace = Some(ns.as_str().into());
    p.spec.selector = format!("projectcalico.org/orchestrator == 'k8s' && app == '{app}'");
    let key = Resource::NetworkPolicy(p.clone()).key();
    // Created first in order, moved last, then deleted.
    for (step, order) in [Some(1.0), Some(9000.0), None].into_iter().enumerate() {
        let mut changes = BTreeMap::new();
        let r = order.map(|o| {
            let mut p = p.clone();
            p.spec.order = Some(o);
            Resource::NetworkPolicy(p)
        });
        change(&mut state, &mut changes, key.clone(), r);
        let outcome = inc.update(&state, &changes).unwrap();
        let (logical, ruleset) = compile_nftables(&state, &opts).unwrap();
        assert!(
            inc.logical() == Some(&logical),
            "step {step}: {}",
            differences(inc.logical().expect("compiled"), &logical)
        );
        assert!(
            inc.ruleset() == &ruleset,
            "step {step}: {}",
            nft_differences(inc.ruleset(), &ruleset)
        );
        let Outcome::Patch(patch) = outcome else {
            panic!("step {step}: a policy change is a patch, not {outcome:?}");
        };
        let endpoint_chains: Vec<&String> = patch
            .tables
            .iter()
            .flat_map(|t| t.chains.keys())
            .filter(|c| c.starts_with("cali-tw-") || c.starts_with("cali-fw-"))
            .collect();
        for c in &endpoint_chains {
            let iface = &c["cali-tw-".len()..];
            assert!(
                selected.contains(&iface),
                "step {step}: the patch redoes {c}, which the policy does not select"
            );
        }
        for iface in &selected {
            assert!(
                endpoint_chains.contains(&&format!("cali-tw-{iface}")),
                "step {step}: the patch leaves cali-tw-{iface} out"
            );
        }
    }
}
