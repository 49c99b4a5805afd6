//! Kubernetes inputs: Namespace, Pod, ServiceAccount, Node and NetworkPolicy
//! (networking.k8s.io/v1),
//! as `kubectl get -o yaml` prints them, in multi-document YAML and `v1/List`s.
//! Calico v3 resources may appear in the same files ([`Manifest::Calico`]).
//!
//! Decoding is strict ([`crate::fields`]): an object with an unknown or
//! unimplemented field is decoded anyway and marked rejected (the
//! [`REJECTED_ANNOTATION`](crate::reject::REJECTED_ANNOTATION) holds the
//! reason), so its conversion ([`crate::convert`]) yields a stub that fails
//! closed. A NetworkPolicy whose spec does not even decode is kept as its
//! podSelector and directions, marked the same way.

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::admin::{AdminKind, AdminPolicy};
use crate::calico::{self, PolicyType, Resource};
use crate::{fields, reject};

/// The rejection reason a Kubernetes object carries, if any.
pub fn rejection(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(reject::REJECTED_ANNOTATION))
        .map(String::as_str)
}

/// Marks a Kubernetes object rejected for `reason` (kept if already marked).
pub fn mark_rejected(meta: &mut ObjectMeta, reason: &str) {
    reject::mark_rejected(
        meta.annotations.get_or_insert_with(Default::default),
        reason,
    );
}

/// One Kubernetes object nftpolicy understands.
// Decoded once and moved into a conversion: boxing would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum KubeObject {
    Namespace(Namespace),
    Pod(Pod),
    NetworkPolicy(NetworkPolicy),
    /// AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy.
    Admin(AdminPolicy),
    /// Its labels select pods by account ([`crate::serviceaccount`]).
    ServiceAccount(ServiceAccount),
    /// Its labels and addresses are what admin policies' `nodes` peers match.
    Node(Node),
}

/// Which Kubernetes kind an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KubeKind {
    Namespace,
    Pod,
    NetworkPolicy,
    Admin(AdminKind),
    ServiceAccount,
    Node,
}

impl KubeKind {
    pub fn parse(kind: &str) -> Option<KubeKind> {
        match kind {
            "Namespace" => Some(KubeKind::Namespace),
            "Pod" => Some(KubeKind::Pod),
            "NetworkPolicy" => Some(KubeKind::NetworkPolicy),
            "ServiceAccount" => Some(KubeKind::ServiceAccount),
            "Node" => Some(KubeKind::Node),
            other => AdminKind::from_name(other).map(KubeKind::Admin),
        }
    }

    /// Namespaces, nodes and the admin policies have no namespace.
    pub fn is_namespaced(self) -> bool {
        !matches!(
            self,
            KubeKind::Namespace | KubeKind::Node | KubeKind::Admin(_)
        )
    }
}

impl fmt::Display for KubeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KubeKind::Namespace => "Namespace",
            KubeKind::Pod => "Pod",
            KubeKind::NetworkPolicy => "NetworkPolicy",
            KubeKind::Admin(k) => k.name(),
            KubeKind::ServiceAccount => "ServiceAccount",
            KubeKind::Node => "Node",
        })
    }
}

/// Identity of a Kubernetes object. Namespaces have no namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KubeKey {
    pub kind: KubeKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for KubeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

impl KubeObject {
    pub fn kind(&self) -> KubeKind {
        match self {
            KubeObject::Namespace(_) => KubeKind::Namespace,
            KubeObject::Pod(_) => KubeKind::Pod,
            KubeObject::NetworkPolicy(_) => KubeKind::NetworkPolicy,
            KubeObject::Admin(p) => KubeKind::Admin(p.admin_kind()),
            KubeObject::ServiceAccount(_) => KubeKind::ServiceAccount,
            KubeObject::Node(_) => KubeKind::Node,
        }
    }

    pub fn name(&self) -> &str {
        let meta = match self {
            KubeObject::Namespace(o) => &o.metadata,
            KubeObject::Pod(o) => &o.metadata,
            KubeObject::NetworkPolicy(o) => &o.metadata,
            KubeObject::Admin(o) => &o.metadata,
            KubeObject::ServiceAccount(o) => &o.metadata,
            KubeObject::Node(o) => &o.metadata,
        };
        meta.name.as_deref().unwrap_or("")
    }

    /// The namespace, defaulted to `default` as the API server does.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            KubeObject::Namespace(_) | KubeObject::Node(_) | KubeObject::Admin(_) => None,
            KubeObject::Pod(o) => Some(o.metadata.namespace.as_deref().unwrap_or("default")),
            KubeObject::NetworkPolicy(o) => {
                Some(o.metadata.namespace.as_deref().unwrap_or("default"))
            }
            KubeObject::ServiceAccount(o) => {
                Some(o.metadata.namespace.as_deref().unwrap_or("default"))
            }
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            KubeObject::Namespace(o) => &o.metadata,
            KubeObject::Pod(o) => &o.metadata,
            KubeObject::NetworkPolicy(o) => &o.metadata,
            KubeObject::Admin(o) => &o.metadata,
            KubeObject::ServiceAccount(o) => &o.metadata,
            KubeObject::Node(o) => &o.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            KubeObject::Namespace(o) => &mut o.metadata,
            KubeObject::Pod(o) => &mut o.metadata,
            KubeObject::NetworkPolicy(o) => &mut o.metadata,
            KubeObject::Admin(o) => &mut o.metadata,
            KubeObject::ServiceAccount(o) => &mut o.metadata,
            KubeObject::Node(o) => &mut o.metadata,
        }
    }

    /// Why nftpolicy rejected this object, if it did (see [`crate::reject`]).
    pub fn rejection(&self) -> Option<&str> {
        rejection(self.metadata())
    }

    pub fn key(&self) -> KubeKey {
        KubeKey {
            kind: self.kind(),
            namespace: self.namespace().map(str::to_owned),
            name: self.name().to_owned(),
        }
    }
}

/// A document from a manifest file: Kubernetes or Calico.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    Kube(KubeObject),
    Calico(Resource),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{what}: malformed YAML: {reason}")]
    Yaml { what: String, reason: String },
    #[error("{what}: document {index} has no kind/apiVersion")]
    Untyped { what: String, index: usize },
    #[error("{what}: {api_version}/{kind} {name:?}: unsupported kind (nftpolicy reads v1 Namespace, Pod, ServiceAccount, Node, List, networking.k8s.io/v1 NetworkPolicy, policy.networking.k8s.io AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy and projectcalico.org/v3 resources)")]
    UnknownKind {
        what: String,
        api_version: String,
        kind: String,
        name: String,
    },
    #[error("{what}: {object}: {reason}")]
    Invalid {
        what: String,
        object: String,
        reason: String,
    },
    #[error(transparent)]
    Calico(#[from] calico::DecodeError),
}

/// Parses every document of a YAML (or JSON) text; `what` names the source
/// (usually the file) in errors.
pub fn parse_manifests(what: &str, text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| ManifestError::Yaml {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let value: serde_json::Value =
            serde_json::to_value(&value).map_err(|e| ManifestError::Yaml {
                what: what.to_owned(),
                reason: e.to_string(),
            })?;
        parse_value(what, index, value, &mut out)?;
    }
    Ok(out)
}

/// Decodes one already-parsed object (flattening `v1/List`).
pub fn parse_value(
    what: &str,
    index: usize,
    value: serde_json::Value,
    out: &mut Vec<Manifest>,
) -> Result<(), ManifestError> {
    let str_field = |v: &serde_json::Value, f: &str| {
        v.get(f)
            .and_then(|x| x.as_str())
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let api_version = str_field(&value, "apiVersion");
    let kind = str_field(&value, "kind");
    if kind.is_empty() || api_version.is_empty() {
        return Err(ManifestError::Untyped {
            what: what.to_owned(),
            index,
        });
    }
    let name = value
        .get("metadata")
        .map(|m| str_field(m, "name"))
        .unwrap_or_default();
    let object = {
        let ns = value
            .get("metadata")
            .map(|m| str_field(m, "namespace"))
            .unwrap_or_default();
        if ns.is_empty() {
            format!("{kind} {name}")
        } else {
            format!("{kind} {ns}/{name}")
        }
    };
    let invalid = |reason: String| ManifestError::Invalid {
        what: what.to_owned(),
        object: object.clone(),
        reason,
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = match value.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                None | Some(serde_json::Value::Null) => vec![],
                Some(_) => return Err(invalid("items is not a list".into())),
            };
            for item in items {
                parse_value(what, index, item, out)?;
            }
        }
        // Staged policies only preview what a policy would do; felix never
        // enforces them, so they are skipped (see calico::is_ignored_kind).
        (calico::API_VERSION, kind) if calico::is_ignored_kind(kind) => {}
        (calico::API_VERSION, _) => {
            out.push(Manifest::Calico(Resource::from_value(what, value)?));
        }
        ("v1", "Namespace" | "Pod" | "ServiceAccount" | "Node")
        | ("networking.k8s.io/v1", "NetworkPolicy") => {
            if name.is_empty() {
                return Err(invalid("metadata.name is missing".into()));
            }
            let problems = fields::kubernetes(&kind)
                .map(|f| fields::check(f, &value))
                .unwrap_or_default();
            let decoded = match kind.as_str() {
                "Namespace" => typed(&value).map(KubeObject::Namespace),
                "Pod" => typed(&value).map(KubeObject::Pod),
                "ServiceAccount" => typed(&value).map(KubeObject::ServiceAccount),
                "Node" => typed(&value).map(KubeObject::Node),
                _ => typed(&value).map(KubeObject::NetworkPolicy),
            };
            let obj = match (decoded, problems.is_empty()) {
                (Ok(obj), true) => obj,
                (Ok(mut obj), false) => {
                    mark_rejected(obj.metadata_mut(), &fields::describe(&problems));
                    obj
                }
                (Err(e), _) => {
                    let reason = if problems.is_empty() {
                        e
                    } else {
                        format!("{}; {e}", fields::describe(&problems))
                    };
                    match kind.as_str() {
                        "NetworkPolicy" => network_policy_outline(&value, &reason)
                            .map(KubeObject::NetworkPolicy)
                            .ok_or_else(|| invalid(reason))?,
                        _ => return Err(invalid(reason)),
                    }
                }
            };
            out.push(Manifest::Kube(obj));
        }
        (api, k) if AdminKind::parse(api, k).is_some() => {
            if name.is_empty() {
                return Err(invalid("metadata.name is missing".into()));
            }
            let problems = fields::kubernetes(&kind)
                .map(|f| fields::check(f, &value))
                .unwrap_or_default();
            let obj = match (typed::<AdminPolicy>(&value), problems.is_empty()) {
                (Ok(obj), true) => obj,
                (Ok(mut obj), false) => {
                    mark_rejected(&mut obj.metadata, &fields::describe(&problems));
                    obj
                }
                (Err(e), _) => {
                    let reason = if problems.is_empty() {
                        e
                    } else {
                        format!("{}; {e}", fields::describe(&problems))
                    };
                    let mut obj = admin_outline(&value).ok_or_else(|| invalid(reason.clone()))?;
                    mark_rejected(&mut obj.metadata, &reason);
                    obj
                }
            };
            out.push(Manifest::Kube(KubeObject::Admin(obj)));
        }
        _ => {
            return Err(ManifestError::UnknownKind {
                what: what.to_owned(),
                api_version,
                kind,
                name,
            })
        }
    }
    Ok(())
}

/// serde's decoding of a Kubernetes object, with errors naming the field.
fn typed<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| match e.path().to_string().as_str() {
        "." => e.inner().to_string(),
        path => format!("{path}: {}", e.inner()),
    })
}

/// An admin policy whose rules do not decode, kept as its subject, tier
/// and priority (and which directions it has rules for), to be marked
/// rejected; `None` when even that cannot be read.
fn admin_outline(value: &serde_json::Value) -> Option<AdminPolicy> {
    let metadata = ObjectMeta::deserialize(value.get("metadata")?).ok()?;
    let spec = value.get("spec").unwrap_or(&serde_json::Value::Null);
    let get = |f: &str| spec.get(f).filter(|v| !v.is_null());
    let subject = match get("subject") {
        Some(v) => crate::admin::Subject::deserialize(v).ok()?,
        None => crate::admin::Subject::default(),
    };
    Some(AdminPolicy {
        api_version: value.get("apiVersion")?.as_str()?.to_owned(),
        kind: value.get("kind")?.as_str()?.to_owned(),
        metadata,
        spec: crate::admin::AdminSpec {
            tier: get("tier").and_then(|t| t.as_str()).map(str::to_owned),
            priority: get("priority").and_then(serde_json::Value::as_i64),
            subject,
            ingress: get("ingress").map(|_| vec![]),
            egress: get("egress").map(|_| vec![]),
        },
    })
}

/// A NetworkPolicy whose spec does not decode, kept as what it applies to
/// (podSelector and directions) and marked rejected; `None` when even that
/// cannot be read.
fn network_policy_outline(value: &serde_json::Value, reason: &str) -> Option<NetworkPolicy> {
    let mut metadata = ObjectMeta::deserialize(value.get("metadata")?).ok()?;
    mark_rejected(&mut metadata, reason);
    let spec = value.get("spec").unwrap_or(&serde_json::Value::Null);
    let pod_selector = match spec.get("podSelector") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(LabelSelector::deserialize(v).ok()?),
    };
    let policy_types = reject::directions(spec.get("policyTypes"), spec.get("egress"))
        .into_iter()
        .map(|t| match t {
            PolicyType::Ingress => "Ingress".to_owned(),
            PolicyType::Egress => "Egress".to_owned(),
        })
        .collect();
    Some(NetworkPolicy {
        metadata,
        spec: Some(NetworkPolicySpec {
            pod_selector,
            policy_types: Some(policy_types),
            ..Default::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_document_yaml_and_lists() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Pod, metadata: {name: p, namespace: a}, spec: {containers: [{name: c}]}}
  - {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: np}, spec: {podSelector: {}}}
---
"#;
        let m = parse_manifests("f.yaml", text).unwrap();
        assert_eq!(m.len(), 3);
        let Manifest::Kube(np) = &m[2] else { panic!() };
        assert_eq!(np.key().to_string(), "NetworkPolicy default/np");
    }

    #[test]
    fn unknown_kind_and_bad_yaml_name_the_file_and_object() {
        let e = parse_manifests(
            "f.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("f.yaml: v1/Service \"s\""), "{e}");
        let e = parse_manifests("g.yaml", "kind: [").unwrap_err();
        assert!(e.to_string().starts_with("g.yaml: malformed YAML"), "{e}");
        let e = parse_manifests(
            "h.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: 3}\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("h.yaml: Pod p:"), "{e}");
    }
}
