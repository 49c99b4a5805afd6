//! A seeded synthetic cluster generator: N namespaces, P policies, E local
//! endpoints on the node under test, M pods in total, with a realistic mix
//! of pod and namespace selectors, ipBlocks with except, port lists and
//! ranges, and named ports. Used by the criterion benchmarks here and by
//! `cargo xtask bench`.

pub mod alloc_count;
pub mod backends;
pub mod packet;
pub mod report;
pub mod run;
pub mod sweep;
pub mod two_stage;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use model::calico::{
    self, Action, EndpointPort, EntityRule, NetworkPolicy, ObjectMeta, PolicySpec, PolicyType,
    Port, Profile, ProfileSpec, Protocol, Resource, Rule, WorkloadEndpoint, WorkloadEndpointSpec,
};
use model::convert::{interface_name, namespace_profile_name, workload_endpoint_name};
use model::state::ClusterState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The node whose dataplane is measured.
pub const NODE_UNDER_TEST: &str = "node1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    pub namespaces: usize,
    pub policies: usize,
    /// Endpoints on the node under test.
    pub local_endpoints: usize,
    /// Pods in the whole cluster (≥ local_endpoints).
    pub pods: usize,
    /// Distinct values of the `app` label (drives selector sharing).
    pub apps: usize,
    pub seed: u64,
}

impl Scale {
    pub fn new(policies: usize, pods: usize) -> Scale {
        Scale {
            namespaces: (policies / 50).clamp(1, 200),
            policies,
            local_endpoints: 50.min(pods),
            pods,
            apps: (pods / 20).clamp(1, 500),
            seed: 1,
        }
    }
}

/// How many pods get an IPv4 address: 198.18.128.1 up to 198.19.255.254,
/// the upper half of the test range 198.18.0.0/15 (the lab's own addresses
/// are in the lower half).
pub const V4_PODS: usize = 98_302;

/// The addresses of pod `i`, inside the test ranges: an IPv6 one
/// (fd00:198:18:80::/64) for every pod, and an IPv4 one for the first
/// [`V4_PODS`]; past those a cluster is single-stack IPv6 (at 250,000 pods
/// there are not enough test IPv4 addresses to go round).
pub fn pod_ips(i: usize) -> Vec<IpAddr> {
    let v6 = Ipv6Addr::new(
        0xfd00,
        0x198,
        0x18,
        0x80,
        0,
        0,
        (i >> 16) as u16,
        (i as u16).wrapping_add(1),
    );
    if i < V4_PODS {
        let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 1)) + i as u32);
        vec![IpAddr::V4(v4), IpAddr::V6(v6)]
    } else {
        vec![IpAddr::V6(v6)]
    }
}

pub fn namespace_name(i: usize) -> String {
    format!("ns{i}")
}

/// A cluster state at the given scale, as the policy controller would store it.
pub fn generate(scale: &Scale) -> ClusterState {
    assert!(scale.namespaces > 0 && scale.apps > 0, "{scale:?}");
    let mut rng = StdRng::seed_from_u64(scale.seed);
    let mut state = ClusterState::new();
    for n in 0..scale.namespaces {
        let ns = namespace_name(n);
        let mut labels_to_apply = model::selector::Labels::new();
        labels_to_apply.insert("pcns.projectcalico.org/name".to_owned(), ns.clone());
        labels_to_apply.insert("pcns.team".to_owned(), format!("team{}", n % 10));
        let allow = Rule {
            action: Action::Allow,
            ..Default::default()
        };
        state.upsert(Resource::Profile(Profile {
            api_version: calico::API_VERSION.into(),
            metadata: ObjectMeta {
                name: namespace_profile_name(&ns),
                ..Default::default()
            },
            spec: ProfileSpec {
                ingress: vec![allow.clone()],
                egress: vec![allow],
                labels_to_apply,
            },
        }));
    }
    for i in 0..scale.pods {
        state.upsert(Resource::WorkloadEndpoint(workload(scale, i, &mut rng)));
    }
    for p in 0..scale.policies {
        state.upsert(Resource::NetworkPolicy(policy(scale, p, &mut rng)));
    }
    state
}

/// Pod `i`: local to the node under test for the first `local_endpoints`.
pub fn workload(scale: &Scale, i: usize, rng: &mut StdRng) -> WorkloadEndpoint {
    let ns = namespace_name(i % scale.namespaces);
    let name = format!("pod{i}");
    let node = if i < scale.local_endpoints {
        NODE_UNDER_TEST.to_owned()
    } else {
        format!("node{}", 2 + i % 50)
    };
    let mut labels = model::selector::Labels::new();
    labels.insert(calico::LABEL_NAMESPACE.to_owned(), ns.clone());
    labels.insert(calico::LABEL_ORCHESTRATOR.to_owned(), "k8s".to_owned());
    // Local endpoints carry the first apps in turn, so that policies can be
    // made active on the node under test (see `policy`).
    let app = if i < scale.local_endpoints {
        i % scale.apps
    } else {
        rng.random_range(0..scale.apps)
    };
    labels.insert("app".to_owned(), format!("app{app}"));
    labels.insert("tier".to_owned(), ["web", "api", "db"][i % 3].to_owned());
    WorkloadEndpoint {
        api_version: calico::API_VERSION.into(),
        metadata: ObjectMeta {
            name: workload_endpoint_name(&node, &name, "eth0"),
            namespace: Some(ns.clone().into()),
            labels,
            ..Default::default()
        },
        spec: WorkloadEndpointSpec {
            orchestrator: "k8s".into(),
            node: node.into(),
            pod: name.clone(),
            endpoint: "eth0".into(),
            ip_networks: pod_ips(i).iter().map(|ip| (*ip).into()).collect(),
            profiles: vec![namespace_profile_name(&ns).into()],
            interface_name: interface_name(&ns, &name),
            ports: vec![
                EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8000 + (i % 3) as u16,
                },
                EndpointPort {
                    name: "metrics".into(),
                    protocol: Protocol::Tcp,
                    port: 9090,
                },
            ],
            ..Default::default()
        },
    }
}

/// Policy `p`: selects one app in its namespace; one to three ingress
/// rules drawn from the realistic mix.
pub fn policy(scale: &Scale, p: usize, rng: &mut StdRng) -> NetworkPolicy {
    let ns = namespace_name(p % scale.namespaces);
    let app = |rng: &mut StdRng| format!("app{}", rng.random_range(0..scale.apps));
    // 70 % of the policies select an app that local endpoints carry: they
    // are active on the node under test (otherwise it programs nothing).
    // Local endpoint i lives in namespace i % namespaces: pick one in the
    // policy's namespace and select its app.
    let ns_index = p % scale.namespaces;
    let locals_here = scale
        .local_endpoints
        .saturating_sub(ns_index)
        .div_ceil(scale.namespaces);
    let target = if locals_here > 0 && rng.random_bool(0.7) {
        let i = ns_index + scale.namespaces * rng.random_range(0..locals_here);
        format!("app{}", i % scale.apps)
    } else {
        app(rng)
    };
    let mut rules = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        let mut r = Rule {
            action: Action::Allow,
            protocol: Some(Protocol::Tcp),
            ..Default::default()
        };
        match rng.random_range(0..5) {
            0 => r.source.selector = Some(format!("app == '{}'", app(rng))),
            1 => {
                r.source.namespace_selector =
                    Some(format!("team == 'team{}'", rng.random_range(0..10)));
                r.source.selector = Some("tier == 'web'".to_owned());
            }
            2 => {
                let third = rng.random_range(0..=255u8);
                r.source.nets = vec![format!("198.19.{third}.0/24").parse().unwrap()];
                r.source.not_nets = vec![format!("198.19.{third}.128/25").parse().unwrap()];
            }
            3 => r.source.selector = Some(format!("app in {{'{}', '{}'}}", app(rng), app(rng))),
            _ => r.source = EntityRule::default(),
        }
        r.destination.ports = match rng.random_range(0..4) {
            0 => vec![Port::single(80), Port::single(443)],
            1 => vec![Port::Range {
                min: 8000,
                max: 8010,
            }],
            2 => vec![Port::Named("http".into())],
            _ => (0..rng.random_range(3..20))
                .map(|k| Port::single(10000 + k * 7))
                .collect(),
        };
        rules.push(r);
    }
    NetworkPolicy {
        api_version: calico::API_VERSION.into(),
        metadata: ObjectMeta {
            name: format!("knp.default.policy{p}"),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: PolicySpec {
            order: Some(1000.0),
            selector: format!("projectcalico.org/orchestrator == 'k8s' && app == '{target}'"),
            types: vec![PolicyType::Ingress],
            ingress: rules,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_addresses_are_test_addresses_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..300_000 {
            let ips = pod_ips(i);
            assert_eq!(ips.len(), if i < V4_PODS { 2 } else { 1 }, "pod {i}");
            for ip in ips {
                assert!(model::is_test_address(ip), "pod {i}: {ip}");
                assert!(seen.insert(ip), "pod {i}: {ip} twice");
            }
        }
    }
}
