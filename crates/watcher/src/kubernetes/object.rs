//! What the Kubernetes source asks the API server for, and how one object
//! becomes Calico: the watched kinds, a raw object type that takes any JSON
//! (so one malformed object cannot fail a whole list page), and the
//! conversion through the model's decoder and converter.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ApiResource, DynamicResourceScope};
use model::admin::AdminKind;
use model::calico::Resource;
use model::kube::{KubeKey, KubeKind, Manifest, ManifestError};
use serde::Deserialize;
use serde_json::Value;

/// The kinds the source lists and watches (cluster-wide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Watched {
    Namespace,
    Pod,
    NetworkPolicy,
    /// Their labels select pods by account (`ksa.` profiles).
    ServiceAccount,
    /// Their labels and addresses are what admin policies' `nodes` peers
    /// match.
    Node,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
}

impl Watched {
    pub const ALL: [Watched; 8] = [
        Watched::Namespace,
        Watched::Pod,
        Watched::NetworkPolicy,
        Watched::ServiceAccount,
        Watched::Node,
        Watched::AdminNetworkPolicy,
        Watched::BaselineAdminNetworkPolicy,
        Watched::ClusterNetworkPolicy,
    ];

    /// A kind served by a CRD a cluster may not have installed (the
    /// network-policy-api's): its absence (404) is no outage, only no
    /// objects of the kind.
    pub fn optional(self) -> bool {
        self.admin_kind().is_some()
    }

    fn admin_kind(self) -> Option<AdminKind> {
        match self {
            Watched::AdminNetworkPolicy => Some(AdminKind::AdminNetworkPolicy),
            Watched::BaselineAdminNetworkPolicy => Some(AdminKind::BaselineAdminNetworkPolicy),
            Watched::ClusterNetworkPolicy => Some(AdminKind::ClusterNetworkPolicy),
            _ => None,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn kube_kind(self) -> KubeKind {
        match self {
            Watched::Namespace => KubeKind::Namespace,
            Watched::Pod => KubeKind::Pod,
            Watched::NetworkPolicy => KubeKind::NetworkPolicy,
            Watched::AdminNetworkPolicy
            | Watched::BaselineAdminNetworkPolicy
            | Watched::ClusterNetworkPolicy => {
                KubeKind::Admin(self.admin_kind().expect("an admin kind"))
            }
            Watched::ServiceAccount => KubeKind::ServiceAccount,
            Watched::Node => KubeKind::Node,
        }
    }

    pub fn api_resource(self) -> ApiResource {
        if let Some(k) = self.admin_kind() {
            let (group, version) = k.api_version().split_once('/').expect("a group/version");
            return ApiResource {
                group: group.into(),
                version: version.into(),
                api_version: k.api_version().into(),
                kind: k.name().into(),
                plural: k.plural().into(),
            };
        }
        let (group, version, kind, plural) = match self {
            Watched::Namespace => ("", "v1", "Namespace", "namespaces"),
            Watched::Pod => ("", "v1", "Pod", "pods"),
            Watched::ServiceAccount => ("", "v1", "ServiceAccount", "serviceaccounts"),
            Watched::Node => ("", "v1", "Node", "nodes"),
            Watched::NetworkPolicy => (
                "networking.k8s.io",
                "v1",
                "NetworkPolicy",
                "networkpolicies",
            ),
            _ => unreachable!("admin kinds are answered above"),
        };
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: if group.is_empty() {
                version.into()
            } else {
                format!("{group}/{version}")
            },
            kind: kind.into(),
            plural: plural.into(),
        }
    }

    /// The resource as RBAC names it (`pods`, `networkpolicies` in API
    /// group `networking.k8s.io`), for error messages.
    pub fn rbac_resource(self) -> &'static str {
        match self {
            Watched::Namespace => "namespaces",
            Watched::Pod => "pods",
            Watched::NetworkPolicy => "networkpolicies.networking.k8s.io",
            Watched::AdminNetworkPolicy => "adminnetworkpolicies.policy.networking.k8s.io",
            Watched::BaselineAdminNetworkPolicy => {
                "baselineadminnetworkpolicies.policy.networking.k8s.io"
            }
            Watched::ClusterNetworkPolicy => "clusternetworkpolicies.policy.networking.k8s.io",
            Watched::ServiceAccount => "serviceaccounts",
            Watched::Node => "nodes",
        }
    }
}

/// An object as the API server sent it: the JSON, plus the few metadata
/// fields the source needs, read leniently. Any JSON object decodes, so an
/// object the model rejects is reported by name instead of failing the
/// list or watch it came in.
#[derive(Debug, Clone, Default)]
pub struct RawObject {
    meta: ObjectMeta,
    pub value: Value,
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        let text = |f: &str| {
            value
                .get("metadata")
                .and_then(|m| m.get(f))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let meta = ObjectMeta {
            name: text("name"),
            namespace: text("namespace"),
            resource_version: text("resourceVersion"),
            ..ObjectMeta::default()
        };
        Ok(RawObject { meta, value })
    }
}

impl kube::Resource for RawObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }
    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }
    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }
    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }
    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

impl RawObject {
    /// The object's identity (namespaced kinds default to `default`, as
    /// the model does).
    pub fn key(&self, kind: Watched) -> KubeKey {
        KubeKey {
            kind: kind.kube_kind(),
            namespace: match kind {
                k if !k.kube_kind().is_namespaced() => None,
                _ => Some(
                    self.meta
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                ),
            },
            name: self.meta.name.clone().unwrap_or_default(),
        }
    }

    /// `metadata.resourceVersion` as a number (the API server's are etcd
    /// revisions); 0 when absent or not a number.
    pub fn resource_version(&self) -> u64 {
        self.meta
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Decodes the object with the model's decoder (as `nftpolicy` reads
    /// manifests, so the same objects are accepted and rejected in every
    /// datastore) and converts it with the model's Kubernetes → Calico
    /// conversion. `Ok(None)`: the object stands for no Calico resource (a
    /// pod without an endpoint). The JSON is consumed: nothing of the
    /// Kubernetes object is kept.
    pub fn into_calico(self, kind: Watched) -> Result<Option<Resource>, String> {
        let mut value = self.value;
        let Some(obj) = value.as_object_mut() else {
            return Err("not a JSON object".into());
        };
        // Lists leave out apiVersion and kind of their items.
        let ar = kind.api_resource();
        obj.entry("apiVersion")
            .or_insert_with(|| Value::String(ar.api_version.clone()));
        obj.entry("kind")
            .or_insert_with(|| Value::String(ar.kind.clone()));
        // Bookkeeping of the API server's, often the largest part of an
        // object, and nothing the conversion reads.
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
        let mut out = Vec::with_capacity(1);
        model::kube::parse_value("the API server", 0, value, &mut out).map_err(|e| match e {
            ManifestError::Invalid { reason, .. } => reason,
            other => other.to_string(),
        })?;
        let Some(Manifest::Kube(obj)) = out.pop() else {
            return Err(format!(
                "expected a {} from the API server",
                kind.kube_kind()
            ));
        };
        model::convert::kube_to_calico(&obj).map_err(|e| e.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawObject {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn list_items_without_type_convert() {
        let pod = raw(
            r#"{"metadata":{"name":"web","namespace":"a","resourceVersion":"42",
                "managedFields":[{"manager":"kubectl"}],"labels":{"app":"web"}},
               "spec":{"nodeName":"n1","containers":[{"name":"c"}]},
               "status":{"phase":"Running","podIP":"198.18.0.4"}}"#,
        );
        assert_eq!(pod.resource_version(), 42);
        assert_eq!(pod.key(Watched::Pod).to_string(), "Pod a/web");
        let Some(Resource::WorkloadEndpoint(w)) = pod.into_calico(Watched::Pod).unwrap() else {
            panic!("an endpoint")
        };
        assert_eq!(w.metadata.name, "n1-k8s-web-eth0");
    }

    #[test]
    fn malformed_objects_decode_and_are_rejected_by_the_model() {
        let bad =
            raw(r#"{"metadata":{"name":"p","namespace":"a","labels":7},"spec":{"containers":3}}"#);
        assert_eq!(bad.key(Watched::Pod).to_string(), "Pod a/p");
        let err = bad.into_calico(Watched::Pod).unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
        let policy = raw(
            r#"{"metadata":{"name":"np","namespace":"a"},"spec":{"podSelector":{},"ingress":[{"ports":[{"port":0}]}]}}"#,
        );
        // What it selects can be read: a stub that fails closed, with the
        // reason (model::reject).
        let Some(Resource::NetworkPolicy(stub)) =
            policy.into_calico(Watched::NetworkPolicy).unwrap()
        else {
            panic!("a NetworkPolicy stub")
        };
        let reason = stub.metadata.rejection().unwrap_or_default();
        assert!(reason.contains("port 0 out of range"), "{reason}");
    }
}
