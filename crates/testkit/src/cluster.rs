//! Cluster builders for tests: [`state`] (a cluster state from manifests,
//! as the policy controller stores them) and the synthetic cluster of the
//! load tests (`cargo xtask latency` and
//! `soak`, which write it into etcd with `nftpolicy apply`, and the
//! benchmark's `churn_memory` example, which feeds it to the agent's
//! programming path in-process), as Kubernetes YAML.
//!
//! [`NAMESPACES`] namespaces, [`POLICIES_PER_NAMESPACE`] policies per
//! namespace selecting `app=app-<k>` pods and allowing ingress on port 80
//! from `role=frontend` pods of the namespace; pods spread over the
//! namespaces, the first [`LOCAL_PODS`] on [`NODE`], the rest on
//! [`OTHER_NODES`] other nodes.

use std::fmt::Write as _;

use model::convert::kube_to_calico;
use model::kube::{parse_manifests, Manifest};
use model::state::ClusterState;

/// A Pod manifest (a `---` document) in namespace `ns` on `node`, its
/// first address as `podIP` and all in `podIPs`; `labels` and `ports` are
/// YAML flow items (`app: web`, `{containerPort: 80}`).
pub fn pod(ns: &str, name: &str, node: &str, ips: &[&str], labels: &str, ports: &str) -> String {
    let ip_list: Vec<String> = ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, ports: [{ports}]}}]}}\nstatus: {{podIP: \"{}\", podIPs: [{}]}}\n",
        ips[0],
        ip_list.join(", ")
    )
}

/// Namespace `default`.
pub const DEFAULT_NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n";

/// The seed cluster of the compiler's and the iptables backend's tests:
/// web (node1, 198.18.128.1) under `web-deny-all`, client (node2,
/// 198.18.128.2), both serving port 80, in namespace `default`.
pub fn web_deny_all() -> String {
    format!(
        "{DEFAULT_NAMESPACE}{}{}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web-deny-all, namespace: default}}\nspec: {{podSelector: {{matchLabels: {{app: web}}}}, ingress: []}}\n",
        pod("default", "web", "node1", &["198.18.128.1"], "app: web", "{containerPort: 80}"),
        pod("default", "client", "node2", &["198.18.128.2"], "app: client", "{containerPort: 80}"),
    )
}

/// [`web_deny_all`] with Calico tiers in front of the default tier:
/// `security` (order 100) with a Deny and a Pass for web's ingress, and
/// `soft` (order 200, defaultAction Pass) allowing client — the goldens of
/// felix's per-tier endpoint chains.
pub fn tiered() -> String {
    format!(
        "{}---
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {{name: security}}
spec: {{order: 100}}
---
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {{name: soft}}
spec: {{order: 200, defaultAction: Pass}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: security.web-guard}}
spec:
  tier: security
  order: 10
  selector: app == 'web'
  types: [Ingress]
  ingress:
  - {{action: Deny, protocol: TCP, destination: {{ports: [22]}}}}
  - {{action: Pass}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: soft.web-from-client, namespace: default}}
spec:
  tier: soft
  selector: app == 'web'
  types: [Ingress]
  ingress:
  - {{action: Allow, source: {{selector: app == 'client'}}}}
",
        web_deny_all()
    )
}

/// The cluster state `yaml` (Kubernetes and/or Calico manifests) stands
/// for, as the policy controller would store it; panics on anything it
/// cannot read (a test's own input).
pub fn state(yaml: &str) -> ClusterState {
    let mut s = ClusterState::new();
    for m in parse_manifests("test.yaml", yaml).unwrap() {
        match m {
            Manifest::Kube(o) => {
                if let Some(r) = kube_to_calico(&o).unwrap() {
                    s.upsert(r);
                }
            }
            Manifest::Calico(r) => {
                s.upsert(r);
            }
        }
    }
    s
}

pub const NAMESPACES: usize = 10;
pub const POLICIES_PER_NAMESPACE: usize = 5;
pub const LOCAL_PODS: usize = 100;
pub const OTHER_NODES: usize = 20;
/// The node whose agent is measured.
pub const NODE: &str = "node1";

/// The namespaces, the policies, and pods `0..pods` (pod `i` with role
/// frontend when `i % 3 == 0`, see [`initial_role`]).
pub fn cluster_yaml(pods: usize) -> String {
    let mut y = String::new();
    for n in 0..NAMESPACES {
        let _ = writeln!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}}}"
        );
        for k in 0..POLICIES_PER_NAMESPACE {
            let _ = writeln!(
                y,
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: app-{k}-from-frontend, namespace: ns-{n}}}\n\
                 spec:\n  podSelector: {{matchLabels: {{app: app-{k}}}}}\n  \
                 ingress: [{{from: [{{podSelector: {{matchLabels: {{role: frontend}}}}}}], \
                 ports: [{{port: 80}}]}}]"
            );
        }
    }
    for i in 0..pods {
        pod_yaml(&mut y, i, initial_role(i));
    }
    y
}

/// The role label pod `i` has in [`cluster_yaml`].
pub fn initial_role(i: usize) -> &'static str {
    if i.is_multiple_of(3) {
        "frontend"
    } else {
        "backend"
    }
}

/// Appends pod `i`: namespace `ns-<i % 10>`, app `app-<i % 5>`, on [`NODE`]
/// for the first [`LOCAL_PODS`], else on one of the other nodes; address
/// 198.18.1.0 + i (the lab's infrastructure /24 stays free; the /15 holds
/// over 130,000 pods).
pub fn pod_yaml(y: &mut String, i: usize, role: &str) {
    let node = if i < LOCAL_PODS {
        NODE.to_owned()
    } else {
        format!("node-{}", 2 + i % OTHER_NODES)
    };
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 1, 0)) + i as u32);
    let _ = writeln!(
        y,
        "---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: pod-{i}, namespace: ns-{}, labels: {{app: app-{}, role: {role}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{containerPort: 80, protocol: TCP}}]}}]}}\n\
         status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}]}}",
        i % NAMESPACES,
        i % POLICIES_PER_NAMESPACE,
    );
}
