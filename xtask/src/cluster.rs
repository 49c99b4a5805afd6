//! What `cargo xtask latency` and `cargo xtask soak` share: the synthetic
//! cluster they write into etcd with `nftpolicy apply`
//! (`testkit::cluster`) or into the fake API server as API objects
//! ([`api_pod`]), and reading the agent's Prometheus metrics.

use std::collections::BTreeMap;

use anyhow::{bail, Context};

pub use testkit::cluster::{
    cluster_yaml, initial_role, pod_yaml, LOCAL_PODS, NAMESPACES, NODE, OTHER_NODES,
    POLICIES_PER_NAMESPACE,
};

/// The agent's histogram of datastore change → kernel acknowledgement.
pub const LATENCY_METRIC: &str = "nftpolicy_programming_latency_seconds";

/// Pod `i` as a real API server serves it (what the Kubernetes datastore
/// receives): [`pod_yaml`]'s pod plus what the kubelet, the scheduler and
/// server-side apply add to a Deployment's pod — owner reference, managed
/// fields, resources, probes, volumes, conditions, container statuses —
/// about 4 KB of JSON, of which the conversion keeps labels, node,
/// addresses and named ports.
pub fn api_pod(i: usize, role: &str) -> serde_json::Value {
    let node = if i < LOCAL_PODS {
        NODE.to_owned()
    } else {
        format!("node-{}", 2 + i % OTHER_NODES)
    };
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 1, 0)) + i as u32)
        .to_string();
    let ns = format!("ns-{}", i % NAMESPACES);
    let app = format!("app-{}", i % POLICIES_PER_NAMESPACE);
    let time = "2025-01-01T00:00:00Z";
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("pod-{i}"),
            "namespace": ns,
            "generateName": format!("{app}-7c9d8f6b5-"),
            "labels": {"app": app, "role": role, "pod-template-hash": "7c9d8f6b5"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": time},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-7c9d8f6b5"),
                "uid": "6b0f6c3e-2b1a-4a57-9a3e-3f7c1d2e4b5a", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": time,
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}, "f:role": {}},
                    "f:ownerReferences": {".": {}, "k:{\"uid\":\"6b0f6c3e-2b1a-4a57-9a3e-3f7c1d2e4b5a\"}": {}}},
                    "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {},
                    "f:ports": {".": {}, "k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}, "f:name": {}, "f:protocol": {}}},
                    "f:resources": {".": {}, "f:limits": {".": {}, "f:memory": {}}, "f:requests": {".": {}, "f:cpu": {}, "f:memory": {}}}}},
                    "f:dnsPolicy": {}, "f:restartPolicy": {}, "f:schedulerName": {}, "f:terminationGracePeriodSeconds": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": time, "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}}
            ],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": "default",
            "containers": [{
                "name": "app",
                "image": "registry.example/app:1.2.3",
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
                "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 80, "scheme": "HTTP"}, "periodSeconds": 10},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            }],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
            "dnsPolicy": "ClusterFirst",
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": {
            "phase": "Running",
            "hostIP": "198.18.0.1",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": time,
            "qosClass": "Burstable",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": time},
                {"type": "Ready", "status": "True", "lastTransitionTime": time},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": time},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": time}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "started": true,
                "image": "registry.example/app:1.2.3", "imageID": "registry.example/app@sha256:0f3e1c9a7b2d4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f",
                "containerID": "containerd://4f1c2a9e8b7d6c5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e",
                "state": {"running": {"startedAt": time}}, "lastState": {}}],
        },
    })
}

/// The namespaces and policies of [`cluster_yaml`], as API objects.
pub fn api_namespaces_and_policies() -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for n in 0..NAMESPACES {
        out.push(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{n}")}}));
    }
    for n in 0..NAMESPACES {
        for k in 0..POLICIES_PER_NAMESPACE {
            out.push(serde_json::json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("app-{k}-from-frontend"), "namespace": format!("ns-{n}")},
                "spec": {"podSelector": {"matchLabels": {"app": format!("app-{k}")}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}], "ports": [{"port": 80}]}]},
            }));
        }
    }
    out
}

/// A Prometheus histogram: cumulative bucket counts by upper bound.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: BTreeMap<u64, (f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// Reads the histogram `metric` from Prometheus text.
pub fn histogram(text: &str, metric: &str) -> anyhow::Result<Histogram> {
    let mut h = Histogram::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(rest) = name.strip_prefix(&format!("{metric}_bucket{{le=\"")) {
            let le = rest.trim_end_matches("\"}");
            let bound: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().with_context(|| format!("bucket bound {le:?}"))?
            };
            // Keyed by the bound's bits: positive floats sort as their bits.
            h.buckets.insert(bound.to_bits(), (bound, value.parse()?));
        } else if name == format!("{metric}_sum") {
            h.sum = value.parse()?;
        } else if name == format!("{metric}_count") {
            h.count = value.parse()?;
        }
    }
    if h.buckets.is_empty() {
        bail!("no {metric} in the agent's metrics");
    }
    Ok(h)
}

/// The value of the unlabelled counter or gauge `metric` in Prometheus
/// text, if it is there.
pub fn scalar(text: &str, metric: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(name, _)| *name == metric)
        .and_then(|(_, v)| v.trim().parse().ok())
}

impl Histogram {
    pub fn minus(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(k, (b, c))| {
                    let e = earlier.buckets.get(k).map_or(0, |(_, c)| *c);
                    (*k, (*b, c - e))
                })
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The q-quantile, interpolating linearly inside its bucket (as
    /// Prometheus' histogram_quantile does).
    pub fn quantile(&self, q: f64) -> f64 {
        let rank = q * self.count as f64;
        let mut lower = 0.0;
        let mut below = 0u64;
        for (bound, cumulative) in self.buckets.values() {
            if *cumulative as f64 >= rank {
                if bound.is_infinite() {
                    return lower;
                }
                let inside = (*cumulative - below) as f64;
                let frac = if inside > 0.0 {
                    (rank - below as f64) / inside
                } else {
                    1.0
                };
                return lower + (bound - lower) * frac;
            }
            lower = *bound;
            below = *cumulative;
        }
        lower
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRIC: &str = LATENCY_METRIC;

    #[test]
    fn quantiles_from_buckets() {
        let text = format!(
            "{METRIC}_bucket{{le=\"0.01\"}} 0\n{METRIC}_bucket{{le=\"0.1\"}} 10\n\
             {METRIC}_bucket{{le=\"1\"}} 20\n{METRIC}_bucket{{le=\"+Inf\"}} 20\n\
             {METRIC}_sum 3\n{METRIC}_count 20\n"
        );
        let h = histogram(&text, METRIC).unwrap();
        assert!((h.quantile(0.5) - 0.1).abs() < 1e-9);
        assert!((h.quantile(0.25) - 0.055).abs() < 1e-9);
        assert!((h.quantile(0.99) - 0.982).abs() < 1e-9);
    }

    #[test]
    fn counters_by_exact_name() {
        let text = "# HELP felix_nft_errors x\nfelix_nft_errors 3\nfelix_nft_errors_total 9\n";
        assert_eq!(scalar(text, "felix_nft_errors"), Some(3.0));
        assert_eq!(scalar(text, "felix_ipset_errors"), None);
    }
}
