//! What the Kubernetes source has sent, per Kubernetes object, and the
//! [`Update`]s each new fact about an object turns into.
//!
//! Per object it keeps only its resource version, the key of the Calico
//! resource it stands for and a hash of that resource (or why it was
//! rejected): never the Kubernetes object itself, so the source's memory is
//! a few dozen bytes per pod beyond the Calico resources the agent's state
//! holds anyway.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use model::calico::{Resource, ResourceKey};
use model::kube::KubeKey;

use super::object::{RawObject, Watched};
use crate::Update;

#[derive(Debug, Clone)]
struct Sent {
    resource_version: u64,
    /// The Calico resource last upserted for the object, and its hash.
    calico: Option<(ResourceKey, u64)>,
    /// Why the object is rejected, while it is.
    invalid: Option<String>,
}

/// What one new fact changed beyond the updates it produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Effect {
    /// An object that was rejected no longer is (fixed or deleted): the
    /// set of rejected objects shrank.
    pub invalid_cleared: bool,
}

#[derive(Debug, Default)]
pub struct Tracker {
    sent: HashMap<KubeKey, Sent>,
}

fn hash_of(r: &Resource) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    r.to_json().hash(&mut h);
    h.finish()
}

impl Tracker {
    /// An object as listed or watched. Its Calico resource is upserted
    /// (after a `Delete` of the key it stood for before, when that key
    /// changed: a pod moved to another node); an object that now stands
    /// for nothing deletes what it stood for; a rejected one deletes it too
    /// and is reported `Invalid` by name. An object seen at the same
    /// resource version (a relist) and a conversion equal to what was sent
    /// send nothing.
    pub fn object(
        &mut self,
        kind: Watched,
        object: RawObject,
        revision: i64,
        out: &mut Vec<Update>,
    ) -> Effect {
        let key = object.key(kind);
        let resource_version = object.resource_version();
        let prev = self.sent.remove(&key);
        if let Some(p) = &prev {
            if resource_version != 0 && p.resource_version == resource_version {
                self.sent.insert(key, prev.expect("matched"));
                return Effect::default();
            }
        }
        let was_invalid = prev.as_ref().is_some_and(|p| p.invalid.is_some());
        let old = prev.and_then(|p| p.calico);
        let delete_old = |out: &mut Vec<Update>, keep: Option<&ResourceKey>| {
            if let Some((old_key, _)) = &old {
                if Some(old_key) != keep {
                    out.push(Update::Delete {
                        key: old_key.clone(),
                        revision,
                    });
                }
            }
        };
        let sent = match object.into_calico(kind) {
            Ok(Some(resource)) => {
                let new_key = resource.key();
                let hash = hash_of(&resource);
                delete_old(out, Some(&new_key));
                let unchanged = old.as_ref() == Some(&(new_key.clone(), hash));
                if !unchanged {
                    out.push(Update::Upsert {
                        key: new_key.clone(),
                        resource,
                        revision,
                    });
                }
                Sent {
                    resource_version,
                    calico: Some((new_key, hash)),
                    invalid: None,
                }
            }
            Ok(None) => {
                delete_old(out, None);
                Sent {
                    resource_version,
                    calico: None,
                    invalid: None,
                }
            }
            Err(reason) => {
                delete_old(out, None);
                out.push(Update::Invalid {
                    key: key.to_string(),
                    reason: reason.clone(),
                    revision,
                });
                Sent {
                    resource_version,
                    calico: None,
                    invalid: Some(reason),
                }
            }
        };
        let invalid_cleared = was_invalid && sent.invalid.is_none();
        self.sent.insert(key, sent);
        Effect { invalid_cleared }
    }

    /// An object's deletion: what it stood for goes.
    pub fn deleted(
        &mut self,
        kind: Watched,
        object: &RawObject,
        revision: i64,
        out: &mut Vec<Update>,
    ) -> Effect {
        self.forget(&object.key(kind), revision, out)
    }

    fn forget(&mut self, key: &KubeKey, revision: i64, out: &mut Vec<Update>) -> Effect {
        let Some(sent) = self.sent.remove(key) else {
            return Effect::default();
        };
        if let Some((calico, _)) = sent.calico {
            out.push(Update::Delete {
                key: calico,
                revision,
            });
        }
        Effect {
            invalid_cleared: sent.invalid.is_some(),
        }
    }

    /// After a complete list of `kind`: every object of that kind sent
    /// before and not in `listed` was deleted meanwhile.
    pub fn reconcile(
        &mut self,
        kind: Watched,
        listed: &HashSet<KubeKey>,
        revision: i64,
        out: &mut Vec<Update>,
    ) -> Effect {
        let gone: Vec<KubeKey> = self
            .sent
            .keys()
            .filter(|k| k.kind == kind.kube_kind() && !listed.contains(*k))
            .cloned()
            .collect();
        let mut effect = Effect::default();
        for k in gone {
            effect.invalid_cleared |= self.forget(&k, revision, out).invalid_cleared;
        }
        effect
    }

    /// Every object rejected now, as `Invalid` updates.
    pub fn invalid(&self, revision: i64) -> Vec<Update> {
        let mut v: Vec<Update> = self
            .sent
            .iter()
            .filter_map(|(k, s)| {
                s.invalid.as_ref().map(|reason| Update::Invalid {
                    key: k.to_string(),
                    reason: reason.clone(),
                    revision,
                })
            })
            .collect();
        v.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        v
    }

    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, rv: u64, node: &str, extra: &str) -> RawObject {
        serde_json::from_str(&format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"a","resourceVersion":"{rv}"}},
                "spec":{{"nodeName":"{node}","containers":[{{"name":"c"}}]{extra}}},
                "status":{{"phase":"Running","podIP":"198.18.0.4"}}}}"#
        ))
        .unwrap()
    }

    fn kinds(out: &[Update]) -> Vec<String> {
        out.iter()
            .map(|u| match u {
                Update::Upsert { key, .. } => format!("upsert {}", key.name),
                Update::Delete { key, .. } => format!("delete {}", key.name),
                Update::Invalid { key, .. } => format!("invalid {key}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_pod_through_its_life() {
        let mut t = Tracker::default();
        let mut out = vec![];
        t.object(Watched::Pod, pod("p", 1, "n1", ""), 1, &mut out);
        assert_eq!(kinds(&out), ["upsert n1-k8s-p-eth0"]);
        out.clear();
        // Same resource version (a relist): nothing.
        t.object(Watched::Pod, pod("p", 1, "n1", ""), 2, &mut out);
        // A new version converting to the same endpoint: nothing either.
        t.object(
            Watched::Pod,
            pod("p", 2, "n1", r#","restartPolicy":"Never""#),
            2,
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        // Another node: the old key goes first.
        t.object(Watched::Pod, pod("p", 3, "n2", ""), 3, &mut out);
        assert_eq!(
            kinds(&out),
            ["delete n1-k8s-p-eth0", "upsert n2-k8s-p-eth0"]
        );
        out.clear();
        // Host network: no endpoint.
        t.object(
            Watched::Pod,
            pod("p", 4, "n2", r#","hostNetwork":true"#),
            4,
            &mut out,
        );
        assert_eq!(kinds(&out), ["delete n2-k8s-p-eth0"]);
        out.clear();
        // Malformed: rejected by name; valid again clears it.
        let e = t.object(
            Watched::Pod,
            pod("p", 5, "n2", r#","containers":7"#),
            5,
            &mut out,
        );
        assert_eq!(kinds(&out), ["invalid Pod a/p"]);
        assert!(!e.invalid_cleared);
        assert_eq!(t.invalid(5).len(), 1);
        out.clear();
        let e = t.object(Watched::Pod, pod("p", 6, "n2", ""), 6, &mut out);
        assert!(e.invalid_cleared);
        assert_eq!(kinds(&out), ["upsert n2-k8s-p-eth0"]);
        out.clear();
        // Gone from a relist: deleted.
        t.reconcile(Watched::Pod, &HashSet::new(), 7, &mut out);
        assert_eq!(kinds(&out), ["delete n2-k8s-p-eth0"]);
        assert!(t.is_empty());
    }
}
