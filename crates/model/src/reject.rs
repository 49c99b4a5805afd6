//! Rejected objects: what nftpolicy does with an object it cannot enforce
//! as written — one with an unknown or unimplemented field
//! ([`crate::fields`]), an invalid value, or (for a policy in a tier other
//! than `default`) a name without its tier's prefix. A policy whose Tier
//! does not exist is rejected the same way while the tier is missing
//! ([`crate::state::ClusterState::tier_rejections`]); a Tier that cannot be
//! read is an error (no stub), so its policies are in a missing tier.
//!
//! **Rejections narrow, never widen.** When the part of the object that
//! says *what it applies to* can still be read, the object is kept as a
//! *stub*: that part alone, marked with the annotation
//! [`REJECTED_ANNOTATION`] holding the reason. The stub then fails closed:
//!
//! | rejected object | what its stub keeps | effect until it is fixed |
//! |---|---|---|
//! | NetworkPolicy, GlobalNetworkPolicy (Calico or Kubernetes) | selector (and namespaceSelector), tier, order, types | the endpoints it selects drop all traffic in the directions it names |
//! | Profile | labelsToApply | the endpoints using it drop all traffic, both directions |
//! | WorkloadEndpoint (or Pod) | labels, node, interface, addresses, profiles, named ports | it drops all its traffic, both directions; it stays a member of every selector's set, so Deny rules and notSelectors still see it |
//! | NetworkSet, GlobalNetworkSet | labels, nets | stays in every selector's set (nothing to drop: it is not an endpoint) |
//!
//! Only an object whose scope cannot be read (a selector that does not
//! parse, no name, addresses that are not addresses) is left out; it is
//! reported like every rejected object.
//!
//! The annotation travels with the stub wherever a resource goes — files,
//! etcd, the scenario loader — so a stub read back is the same stub, and
//! whoever reads it can tell the operator why (log, the
//! `nftpolicy_rejected_objects` gauge, `explain`). An object that already
//! carries the annotation is treated as rejected, whatever else it holds.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::calico::{
    EndpointPort, GlobalNetworkPolicy, GlobalNetworkSet, NetworkPolicy, NetworkSet, NetworkSetSpec,
    ObjectMeta, PolicySpec, PolicyType, Profile, ProfileSpec, Resource, WorkloadEndpoint,
    WorkloadEndpointSpec, API_VERSION,
};
use crate::labels::IStr;
use crate::selector::Selector;

/// The annotation marking a rejected object's stub; its value is the reason.
pub const REJECTED_ANNOTATION: &str = "nftpolicy.io/rejected";

/// Marks `annotations` as rejected for `reason`, keeping a reason already
/// there (a stub read back is rejected for the reason it was made for).
pub fn mark_rejected(annotations: &mut BTreeMap<String, String>, reason: &str) {
    annotations
        .entry(REJECTED_ANNOTATION.to_owned())
        .or_insert_with(|| reason.to_owned());
}

/// The stub of a rejected Calico resource (see the module docs), or `None`
/// when what it applies to cannot be read either.
pub fn calico_stub(value: &Value, reason: &str) -> Option<Resource> {
    let kind = value.get("kind")?.as_str()?;
    let mut metadata = ObjectMeta::deserialize(value.get("metadata")?).ok()?;
    if metadata.name.is_empty() {
        return None;
    }
    mark_rejected(&mut metadata.annotations, reason);
    let spec = value.get("spec").unwrap_or(&Value::Null);
    let api_version = API_VERSION.to_owned();
    Some(match kind {
        "NetworkPolicy" => Resource::NetworkPolicy(NetworkPolicy {
            api_version,
            metadata,
            spec: policy_outline(spec, false)?,
        }),
        "GlobalNetworkPolicy" => Resource::GlobalNetworkPolicy(GlobalNetworkPolicy {
            api_version,
            metadata,
            spec: policy_outline(spec, true)?,
        }),
        "Profile" => Resource::Profile(Profile {
            api_version,
            metadata,
            spec: ProfileSpec {
                labels_to_apply: optional(spec, "labelsToApply")?,
                ..Default::default()
            },
        }),
        "WorkloadEndpoint" => {
            let mut w = WorkloadEndpoint {
                api_version: api_version.into(),
                metadata,
                spec: endpoint_outline(spec)?,
            };
            crate::serviceaccount::felix_labels(&mut w);
            Resource::WorkloadEndpoint(w)
        }
        "NetworkSet" => Resource::NetworkSet(NetworkSet {
            api_version,
            metadata,
            spec: NetworkSetSpec {
                nets: optional(spec, "nets")?,
            },
        }),
        "GlobalNetworkSet" => Resource::GlobalNetworkSet(GlobalNetworkSet {
            api_version,
            metadata,
            spec: NetworkSetSpec {
                nets: optional(spec, "nets")?,
            },
        }),
        _ => return None,
    })
}

/// Field `name` of `obj` decoded as `T`: the default when absent or null,
/// `None` when it does not decode.
fn optional<T: Default + for<'de> Deserialize<'de>>(obj: &Value, name: &str) -> Option<T> {
    match obj.get(name) {
        None | Some(Value::Null) => Some(T::default()),
        Some(v) => T::deserialize(v).ok(),
    }
}

/// A selector field: absent is `None`, one that is not a parsable string
/// makes the outline unreadable (`Err`).
fn selector_field(obj: &Value, name: &str) -> Result<Option<String>, ()> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Selector::parse(s).map(|_| Some(s.clone())).map_err(|_| ()),
        Some(_) => Err(()),
    }
}

/// The directions a policy names: its `types` when they can be read; when
/// absent or empty, Calico's (and the API server's) default: Ingress, plus
/// Egress when it has egress rules; both when `types` is there but
/// unreadable, so the drop covers whatever it may have meant.
pub fn directions(types: Option<&Value>, egress: Option<&Value>) -> Vec<PolicyType> {
    let unset = match types {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    };
    match types.filter(|_| !unset) {
        None => {
            let mut t = vec![PolicyType::Ingress];
            let has_egress = match egress {
                None | Some(Value::Null) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
            };
            if has_egress {
                t.push(PolicyType::Egress);
            }
            t
        }
        Some(v) => Vec::<PolicyType>::deserialize(v)
            .unwrap_or_else(|_| vec![PolicyType::Ingress, PolicyType::Egress]),
    }
}

fn policy_outline(spec: &Value, global: bool) -> Option<PolicySpec> {
    let selector = selector_field(spec, "selector").ok()?.unwrap_or_default();
    let namespace_selector = if global {
        selector_field(spec, "namespaceSelector").ok()?
    } else {
        None
    };
    let tier = match spec.get("tier") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(_) => return None,
    };
    // The order only places a policy among the others; a rejected one drops
    // before any of them, so an unreadable order is simply left out.
    let order = spec.get("order").and_then(Value::as_f64);
    // Narrows what the stub selects; unreadable, the stub selects more
    // (drops more), never less.
    let service_account_selector = selector_field(spec, "serviceAccountSelector")
        .ok()
        .flatten();
    Some(PolicySpec {
        tier,
        order,
        selector,
        namespace_selector,
        service_account_selector,
        types: directions(spec.get("types"), spec.get("egress")),
        ingress: vec![],
        egress: vec![],
    })
}

fn endpoint_outline(spec: &Value) -> Option<WorkloadEndpointSpec> {
    let text = |name: &str| -> Option<String> { optional::<String>(spec, name) };
    let interface_name = text("interfaceName")?;
    if interface_name.is_empty() {
        return None;
    }
    Some(WorkloadEndpointSpec {
        orchestrator: text("orchestrator").unwrap_or_default().into(),
        node: text("node")?.into(),
        pod: text("pod").unwrap_or_default(),
        endpoint: text("endpoint").unwrap_or_default().into(),
        ip_networks: optional::<Vec<IpNet>>(spec, "ipNetworks")?,
        profiles: optional::<Vec<IStr>>(spec, "profiles")?,
        interface_name,
        // Named ports keep resolving where they can (a Deny on a named port
        // must still see this endpoint); unreadable ones are left out.
        ports: optional::<Vec<EndpointPort>>(spec, "ports").unwrap_or_default(),
        // Its account's label keeps it in the sets that select by account.
        service_account_name: optional::<Option<IStr>>(spec, "serviceAccountName").flatten(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(json: &str) -> Resource {
        Resource::from_json("test", json.as_bytes()).unwrap()
    }

    #[test]
    fn a_policy_with_an_unimplemented_field_becomes_a_stub_that_keeps_its_scope() {
        let r = decode(
            r#"{"apiVersion":"projectcalico.org/v3","kind":"NetworkPolicy",
                "metadata":{"name":"p","namespace":"ns"},
                "spec":{"order":5,"selector":"app == 'web'",
                  "egress":[{"action":"Allow","destination":{"services":{"name":"api"}}}]}}"#,
        );
        let Resource::NetworkPolicy(p) = &r else {
            panic!("{r:?}")
        };
        assert_eq!(
            r.metadata().rejection(),
            Some("spec.egress[0].destination.services: not implemented by nftpolicy (matches a Kubernetes Service's endpoints and ports)")
        );
        assert_eq!(p.spec.selector, "app == 'web'");
        assert_eq!(p.spec.order, Some(5.0));
        // Calico's default types: Ingress, and Egress since it has egress rules.
        assert_eq!(p.spec.types, [PolicyType::Ingress, PolicyType::Egress]);
        assert!(p.spec.ingress.is_empty() && p.spec.egress.is_empty());
        // Read back, the stub is the same stub, for the same reason.
        assert_eq!(decode(&r.to_json()), r);
    }

    #[test]
    fn a_policy_in_another_tier_is_a_stub_of_that_tier() {
        let r = decode(
            r#"{"apiVersion":"projectcalico.org/v3","kind":"GlobalNetworkPolicy",
                "metadata":{"name":"sec"},
                "spec":{"tier":"security","selector":"all()","types":["Egress"],
                  "egress":[{"action":"Deny"}]}}"#,
        );
        let Resource::GlobalNetworkPolicy(p) = &r else {
            panic!()
        };
        assert!(r.metadata().rejection().unwrap().contains("tier"), "{r:?}");
        assert_eq!(p.spec.tier.as_deref(), Some("security"));
        assert_eq!(p.spec.types, [PolicyType::Egress]);
        assert_eq!(decode(&r.to_json()), r);
    }

    #[test]
    fn a_policy_whose_selector_cannot_be_read_is_left_out() {
        for spec in [
            r#"{"selector":"app = 'web'","egress":[{"action":"Allow","http":{}}]}"#,
            r#"{"selector":5}"#,
            r#"{"selector":"all()","tier":7,"bad":1}"#,
        ] {
            let json = format!(
                r#"{{"apiVersion":"projectcalico.org/v3","kind":"NetworkPolicy",
                    "metadata":{{"name":"p","namespace":"ns"}},"spec":{spec}}}"#
            );
            let err = Resource::from_json("k", json.as_bytes()).unwrap_err();
            assert!(
                err.to_string().starts_with("k: NetworkPolicy ns/p: "),
                "{err}"
            );
        }
    }

    #[test]
    fn unreadable_types_drop_both_directions() {
        assert_eq!(
            directions(Some(&serde_json::json!(["Sideways"])), None),
            [PolicyType::Ingress, PolicyType::Egress]
        );
        assert_eq!(directions(None, None), [PolicyType::Ingress]);
        assert_eq!(
            directions(None, Some(&serde_json::json!("oops"))),
            [PolicyType::Ingress, PolicyType::Egress]
        );
    }

    #[test]
    fn endpoints_and_sets_keep_their_identity() {
        let r = decode(
            r#"{"apiVersion":"projectcalico.org/v3","kind":"WorkloadEndpoint",
                "metadata":{"name":"w","namespace":"ns","labels":{"app":"db"}},
                "spec":{"node":"node1","interfaceName":"cali0123456789a","ipNetworks":["198.18.0.9/32"],
                  "profiles":["kns.ns"],"ipNATs":[{"internalIP":"198.18.0.9","externalIP":"198.19.0.9"}]}}"#,
        );
        let Resource::WorkloadEndpoint(w) = &r else {
            panic!()
        };
        assert!(r.metadata().rejection().unwrap().contains("ipNATs"));
        assert_eq!(w.metadata.labels.get("app"), Some("db"));
        assert_eq!(
            w.spec.ip_networks,
            ["198.18.0.9/32".parse::<IpNet>().unwrap()]
        );
        let r = decode(
            r#"{"apiVersion":"projectcalico.org/v3","kind":"GlobalNetworkSet","metadata":{"name":"s"},
                "spec":{"nets":["198.19.0.0/16"],"allowedEgressDomains":["example.com"]}}"#,
        );
        assert!(r
            .metadata()
            .rejection()
            .unwrap()
            .contains("allowedEgressDomains"));
    }
}
