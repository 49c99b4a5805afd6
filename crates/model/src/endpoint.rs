//! What the cluster state keeps of a workload endpoint.
//!
//! A cluster has one endpoint per pod, so the state does not keep the
//! Calico resource ([`WorkloadEndpoint`], 424 bytes before its strings)
//! but an [`Endpoint`]: the fields the dataplane and the reference
//! semantics read — labels, node, addresses, profiles, service account,
//! interface, named ports, and the rejection a stub carries
//! ([`crate::reject`]); its name and namespace are its key's, not kept
//! twice. What is left out (container id, pod name,
//! MAC, orchestrator, workload, endpoint name, uid, resource version,
//! creation time, other annotations) changes no verdict; `fields.rs` lists
//! each as ignored. Field paths mirror the resource's (`ep.spec.node`,
//! `ep.metadata.labels`), so code reads both alike.

use std::sync::Arc;

use ipnet::IpNet;

use crate::calico::{
    self, EndpointPort, Kind, ObjectMeta, ResourceKey, WorkloadEndpoint, WorkloadEndpointSpec,
};
use crate::labels::{IStr, Interner};
use crate::reject::REJECTED_ANNOTATION;
use crate::selector::Labels;

/// A workload endpoint as the state keeps it (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub metadata: EndpointMeta,
    pub spec: EndpointSpec,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointMeta {
    pub labels: Labels,
    /// The one annotation read: why nftpolicy rejected the endpoint.
    rejected: Option<Box<str>>,
}

impl EndpointMeta {
    /// Why nftpolicy rejected this endpoint, if it did (as
    /// [`ObjectMeta::rejection`]).
    pub fn rejection(&self) -> Option<&str> {
        self.rejected.as_deref()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub node: IStr,
    pub service_account_name: Option<IStr>,
    pub ip_networks: Box<[IpNet]>,
    /// Shared by every endpoint with the same list (a namespace's pods).
    pub profiles: Arc<[IStr]>,
    pub interface_name: String,
    /// Shared by every endpoint with the same list (a workload's pods).
    pub ports: Arc<[EndpointPort]>,
}

/// What a named-port set reads of an endpoint, borrowed from either form.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointFacts<'a> {
    pub node: &'a str,
    pub ports: &'a [EndpointPort],
}

impl Endpoint {
    /// The resource's key, and what the state keeps of it.
    pub fn split(w: WorkloadEndpoint) -> (ResourceKey, Endpoint) {
        let key = ResourceKey {
            kind: Kind::WorkloadEndpoint,
            namespace: w.metadata.namespace.clone(),
            name: IStr::not_interned(&w.metadata.name),
        };
        (key, Endpoint::kept_of(w))
    }

    /// What the state keeps of `w` (its key is the caller's: a state that
    /// already holds the key builds no other).
    pub fn kept_of(w: WorkloadEndpoint) -> Endpoint {
        let WorkloadEndpoint { metadata, spec, .. } = w;
        let rejected = metadata.rejection().map(Box::from);
        let mut labels = metadata.labels;
        labels.shrink_to_fit();
        let mut interface_name = spec.interface_name;
        interface_name.shrink_to_fit();
        Endpoint {
            metadata: EndpointMeta { labels, rejected },
            spec: EndpointSpec {
                node: spec.node,
                service_account_name: spec.service_account_name,
                ip_networks: spec.ip_networks.into_boxed_slice(),
                profiles: PROFILE_LISTS
                    .share(&spec.profiles, || Arc::from(spec.profiles.as_slice())),
                interface_name,
                ports: PORT_LISTS.share(&spec.ports, || Arc::from(spec.ports.as_slice())),
            },
        }
    }

    pub fn facts(&self) -> EndpointFacts<'_> {
        EndpointFacts {
            node: &self.spec.node,
            ports: &self.spec.ports,
        }
    }

    /// The resource at `key` back, with what the state kept: the fields
    /// left out are empty. An incremental compile reads a replaced endpoint
    /// this way.
    pub fn to_workload_endpoint(&self, key: &ResourceKey) -> WorkloadEndpoint {
        let mut metadata = ObjectMeta {
            name: key.name.to_string(),
            namespace: key.namespace.clone(),
            labels: self.metadata.labels.clone(),
            ..Default::default()
        };
        if let Some(why) = &self.metadata.rejected {
            metadata
                .annotations
                .insert(REJECTED_ANNOTATION.to_owned(), why.to_string());
        }
        WorkloadEndpoint {
            api_version: IStr::new(calico::API_VERSION),
            metadata,
            spec: WorkloadEndpointSpec {
                node: self.spec.node.clone(),
                service_account_name: self.spec.service_account_name.clone(),
                ip_networks: self.spec.ip_networks.to_vec(),
                profiles: self.spec.profiles.to_vec(),
                interface_name: self.spec.interface_name.clone(),
                ports: self.spec.ports.to_vec(),
                ..Default::default()
            },
        }
    }
}

impl WorkloadEndpoint {
    pub fn facts(&self) -> EndpointFacts<'_> {
        EndpointFacts {
            node: &self.spec.node,
            ports: &self.spec.ports,
        }
    }
}

/// Equal lists shared between endpoints: one allocation per distinct list,
/// not per pod.
static PROFILE_LISTS: Interner<[IStr]> = Interner::new();
static PORT_LISTS: Interner<[EndpointPort]> = Interner::new();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calico::Protocol;

    fn endpoint(name: &str, port: u16) -> WorkloadEndpoint {
        WorkloadEndpoint {
            api_version: IStr::new(calico::API_VERSION),
            metadata: ObjectMeta {
                name: name.into(),
                namespace: Some(IStr::new("ns")),
                ..Default::default()
            },
            spec: WorkloadEndpointSpec {
                node: IStr::new("node1"),
                pod: name.into(),
                container_id: "c0ffee".into(),
                profiles: vec![IStr::new("kns.ns")],
                interface_name: "cali0".into(),
                ports: vec![EndpointPort {
                    name: IStr::new("http"),
                    protocol: Protocol::Tcp,
                    port,
                }],
                ..Default::default()
            },
        }
    }

    #[test]
    fn equal_lists_are_one_allocation_and_the_rest_round_trips() {
        let (key, a) = Endpoint::split(endpoint("a", 80));
        let (_, b) = Endpoint::split(endpoint("b", 80));
        let (_, c) = Endpoint::split(endpoint("c", 81));
        assert!(Arc::ptr_eq(&a.spec.ports, &b.spec.ports));
        assert!(!Arc::ptr_eq(&a.spec.ports, &c.spec.ports));
        assert!(Arc::ptr_eq(&a.spec.profiles, &c.spec.profiles));
        // What the dataplane reads comes back; what it does not is empty.
        let back = a.to_workload_endpoint(&key);
        assert_eq!(Endpoint::split(back.clone()), (key.clone(), a));
        assert_eq!(back.spec.container_id, "");
        assert_eq!(back.spec.ports, endpoint("a", 80).spec.ports);
        assert_eq!(
            key,
            crate::calico::Resource::WorkloadEndpoint(endpoint("a", 80)).key()
        );
    }

    #[test]
    fn the_state_keeps_the_callers_key_and_compacting_changes_nothing() {
        use crate::calico::Resource;
        use crate::state::ClusterState;
        let mut state = ClusterState::new();
        let mut keys = Vec::new();
        for i in 0..100 {
            let r = Resource::WorkloadEndpoint(endpoint(&format!("pod-{i:03}"), 80));
            let key = r.key();
            keys.push(key.clone());
            assert!(state.put_at(key, r));
        }
        // One copy of each name: the state's key is the caller's.
        let (held, _) = state.workload_endpoints().next().unwrap();
        assert!(std::ptr::eq(held.name.as_str(), keys[0].name.as_str()));
        // Equal content is equal, whether interned or not; not the same copy.
        let interned = IStr::new(keys[0].name.as_str());
        assert_eq!(interned, keys[0].name);
        assert!(!std::ptr::eq(interned.as_str(), keys[0].name.as_str()));

        let before = state.clone();
        state.compact();
        assert_eq!(state, before);
        for key in &keys {
            assert_eq!(state.endpoint(key), before.endpoint(key));
        }
        // Putting the same value again changes nothing.
        let again = Resource::WorkloadEndpoint(endpoint("pod-000", 80));
        assert!(!state.put_at(again.key(), again));
    }

    #[test]
    fn a_rejection_is_kept() {
        let mut w = endpoint("a", 80);
        w.metadata
            .annotations
            .insert(REJECTED_ANNOTATION.to_owned(), "bad port".into());
        let (key, e) = Endpoint::split(w);
        assert_eq!(e.metadata.rejection(), Some("bad port"));
        assert_eq!(
            e.to_workload_endpoint(&key).metadata.rejection(),
            Some("bad port")
        );
    }
}
